// SPDX-License-Identifier: Apache-2.0

//! The network device: configuration, feature negotiation, and the two data
//! paths between the virtqueues and the TAP.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Instant;

use ember_mmds::MmdsNetworkStack;
use ember_rate_limiter::{BucketUpdate, RateLimiter, RateLimiterConfig, TokenType};
use ember_virtio::{
    drain_eventfd, needs_interrupt, pop_or_enable_notification, take_queues, ActivateError,
    ActiveQueue, InterruptKind, Registrations, VirtioConfig, VirtioDevice, VirtioInterrupt,
};
use log::{error, warn};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_UFO,
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryError, GuestMemoryMmap, Permissions};
use vmm_sys_util::eventfd::EventFd;

use crate::metrics::NetMetrics;
use crate::tap::Tap;
use crate::{
    Error, NetConfig, CONFIG_SPACE_SIZE, MAX_BUFFER_SIZE, MIN_MTU, QUEUE_SIZE, RX_INDEX, TX_INDEX,
    VNET_HDR_LEN,
};

/// Bytes of an Ethernet header (destination, source, EtherType). The TAP
/// refuses shorter frames (Linux `tun_get_user`).
const ETH_HLEN: usize = 14;
/// Offset of `num_buffers` in `struct virtio_net_hdr_v1` (virtio 1.2
/// §5.1.6).
const NUM_BUFFERS_OFFSET: usize = 10;
/// Offset of the source MAC address in a frame, header included.
const SRC_MAC_OFFSET: usize = VNET_HDR_LEN + 6;

const _: () =
    assert!(std::mem::size_of::<virtio_bindings::virtio_net::virtio_net_hdr_v1>() == VNET_HDR_LEN);

/// The TUN_F_* offload flags for the TAP, from the features the driver
/// accepted.
///
/// They describe what the receiving side (the driver) handles: with
/// VIRTIO_NET_F_GUEST_CSUM the TAP may hand over frames with a partial
/// checksum, and with GUEST_TSO4/TSO6/UFO also segmentation offload frames
/// (virtio 1.2 §5.1.6.4). Segmentation offloads need checksum offload
/// (§5.1.3.1), and the TAP refuses them without it, so they are only set
/// together with it.
pub fn tap_offload_flags(features: u64) -> u32 {
    let has = |bit: u32| features & (1u64 << bit) != 0;
    if !has(VIRTIO_NET_F_GUEST_CSUM) {
        return 0;
    }
    let mut flags = libc::TUN_F_CSUM;
    if has(VIRTIO_NET_F_GUEST_TSO4) {
        flags |= libc::TUN_F_TSO4;
    }
    if has(VIRTIO_NET_F_GUEST_TSO6) {
        flags |= libc::TUN_F_TSO6;
    }
    if has(VIRTIO_NET_F_GUEST_UFO) {
        flags |= libc::TUN_F_UFO;
    }
    flags
}

/// Why a transmit chain was dropped.
#[derive(Debug, thiserror::Error)]
enum TxChainError {
    #[error("descriptor {index} is device-writable")]
    WriteOnly { index: usize },
    #[error("buffer of {len} bytes at {addr:#x} is outside guest memory")]
    OutsideMemory { addr: u64, len: u32 },
    #[error("the chain is broken (bad head or next index, or a loop)")]
    Broken,
    #[error("the frame is longer than {MAX_BUFFER_SIZE} bytes")]
    TooLong,
    #[error("the frame is {0} bytes, shorter than the virtio-net and Ethernet headers")]
    TooShort(usize),
}

impl TxChainError {
    /// Size problems are malformed frames; everything else is a bad chain
    /// (Firecracker's `tx_malformed_frames` and `tx_fails`).
    fn is_malformed_frame(&self) -> bool {
        matches!(self, TxChainError::TooLong | TxChainError::TooShort(_))
    }
}

/// Why a receive chain could not be used.
#[derive(Debug, thiserror::Error)]
enum RxChainError {
    #[error("descriptor {index} is not device-writable")]
    ReadOnly { index: usize },
    #[error("buffer of {len} bytes at {addr:#x} is outside guest memory")]
    OutsideMemory { addr: u64, len: u32 },
    #[error("the chain is broken (bad head or next index, or a loop)")]
    Broken,
    #[error("the chain holds {capacity} bytes, less than the {min} bytes a buffer needs")]
    TooSmall { capacity: usize, min: usize },
}

/// Gathers a transmit chain (device-readable descriptors only, virtio 1.2
/// §5.1.6.2) into `buf`; returns the frame length, header included.
fn read_tx_chain(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    buf: &mut [u8],
) -> Result<usize, TxChainError> {
    let mut len = 0usize;
    let mut count = 0usize;
    let mut last_has_next = false;
    // At most the queue size (virtio 1.2 §2.7.5.3.1): virtio-queue would
    // follow a looping indirect table for up to 65535 descriptors. A chain
    // cut short here still says another descriptor follows: Broken.
    for desc in chain.take(usize::from(QUEUE_SIZE)) {
        if desc.is_write_only() {
            return Err(TxChainError::WriteOnly { index: count });
        }
        count += 1;
        let end = len
            .checked_add(desc.len() as usize)
            .filter(|end| *end <= buf.len())
            .ok_or(TxChainError::TooLong)?;
        let dst = buf.get_mut(len..end).ok_or(TxChainError::TooLong)?;
        mem.read_slice(dst, desc.addr())
            .map_err(|_| TxChainError::OutsideMemory {
                addr: desc.addr().0,
                len: desc.len(),
            })?;
        len = end;
        last_has_next = desc.has_next();
    }
    // virtio-queue ends the iteration quietly on a bad `next` index, an
    // unreadable descriptor or a loop: the last descriptor then still says
    // that another follows.
    if count == 0 || last_has_next {
        return Err(TxChainError::Broken);
    }
    if len < VNET_HDR_LEN + ETH_HLEN {
        return Err(TxChainError::TooShort(len));
    }
    Ok(len)
}

/// Checks a receive chain (device-writable descriptors only, virtio 1.2
/// §5.1.6.3) of at least `min` bytes and appends its buffers to
/// `segments`; returns its capacity in bytes. On error `segments` may hold
/// part of the chain: the caller truncates it.
fn parse_rx_chain(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    segments: &mut Vec<(GuestAddress, usize)>,
    min: usize,
) -> Result<usize, RxChainError> {
    let mut capacity = 0usize;
    let mut count = 0usize;
    let mut last_has_next = false;
    // At most the queue size (virtio 1.2 §2.7.5.3.1): virtio-queue would
    // follow a looping indirect table for up to 65535 descriptors. A chain
    // cut short here still says another descriptor follows: Broken.
    for desc in chain.take(usize::from(QUEUE_SIZE)) {
        if !desc.is_write_only() {
            return Err(RxChainError::ReadOnly { index: count });
        }
        count += 1;
        let len = desc.len() as usize;
        if len > 0 {
            if !mem.check_range(desc.addr(), len, Permissions::Write) {
                return Err(RxChainError::OutsideMemory {
                    addr: desc.addr().0,
                    len: desc.len(),
                });
            }
            segments.push((desc.addr(), len));
            // Cannot overflow: virtio-queue stops a chain at 4 GiB.
            capacity += len;
        }
        last_has_next = desc.has_next();
    }
    if count == 0 || last_has_next {
        return Err(RxChainError::Broken);
    }
    if capacity < min {
        return Err(RxChainError::TooSmall { capacity, min });
    }
    Ok(capacity)
}

/// Writes `frame` over the buffers of a receive chain, in order.
fn scatter(
    mem: &GuestMemoryMmap,
    segments: &[(GuestAddress, usize)],
    frame: &[u8],
) -> Result<(), GuestMemoryError> {
    let mut rest = frame;
    for &(addr, len) in segments {
        if rest.is_empty() {
            break;
        }
        let (now, later) = rest.split_at(len.min(rest.len()));
        mem.write_slice(now, addr)?;
        rest = later;
    }
    Ok(())
}

/// Reads the next frame from the TAP into `buf`, dropping and counting
/// frames too short to hold the virtio-net header. `None` when the TAP has
/// nothing to read or fails.
fn read_frame(tap: &Tap, buf: &mut [u8], metrics: &NetMetrics) -> Option<usize> {
    loop {
        match tap.read_frame(buf) {
            Ok(len) if len < VNET_HDR_LEN || len > buf.len() => {
                metrics.rx_fails.inc();
                warn!("virtio-net: dropped a {len}-byte frame read from the TAP");
            }
            Ok(len) => return Some(len),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
            Err(e) => {
                metrics.tap_read_fails.inc();
                error!("virtio-net: failed to read from TAP {}: {e}", tap.name());
                return None;
            }
        }
    }
}

/// Largest frame the metadata service writes: an Ethernet frame with a
/// 1500-byte payload.
const MMDS_FRAME_MAX: usize = ETH_HLEN + 1500;

/// Writes the metadata service's next frame for the guest, behind a
/// virtio-net header with no offload (its checksums are complete), into
/// `buf`; returns the length, header included. The service's frames come
/// before the TAP's, as in Firecracker.
fn mmds_frame(mmds: Option<&mut MmdsNetworkStack>, buf: &mut [u8]) -> Option<usize> {
    let mmds = mmds?;
    let end = buf.len().min(VNET_HDR_LEN + MMDS_FRAME_MAX);
    let (header, frame) = buf.get_mut(..end)?.split_at_mut(VNET_HDR_LEN);
    let len = mmds.write_next_frame(frame, Instant::now())?;
    header.fill(0);
    let metrics = mmds.metrics();
    metrics.tx_frames.inc();
    metrics.tx_bytes.add(len as u64);
    Some(VNET_HDR_LEN + len)
}

fn add_used(queue: &mut Queue, mem: &GuestMemoryMmap, head: u16, len: u32, metrics: &NetMetrics) {
    if let Err(e) = queue.add_used(mem, head, len) {
        metrics.event_fails.inc();
        error!("virtio-net: failed to add head {head} to the used ring: {e}");
    }
}

/// Interrupts the driver once for everything added to `queue`'s used ring
/// since the last call, unless it asked not to be.
fn signal_used(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    interrupt: &dyn VirtioInterrupt,
    metrics: &NetMetrics,
) {
    match needs_interrupt(queue, mem) {
        Ok(true) => {}
        Ok(false) => return,
        Err(e) => {
            // Better a spurious interrupt than a lost one.
            metrics.event_fails.inc();
            error!("virtio-net: cannot read the notification state: {e}");
        }
    }
    if let Err(e) = interrupt.trigger(InterruptKind::Vring) {
        metrics.event_fails.inc();
        error!("virtio-net: failed to signal the used-buffer interrupt: {e}");
    }
}

fn drain_event(evt: &EventFd, metrics: &NetMetrics) {
    if let Err(e) = drain_eventfd(evt) {
        metrics.event_fails.inc();
        error!("virtio-net: failed to read an EventFd: {e}");
    }
}

/// What an activated device holds.
pub(crate) struct Active {
    mem: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    pub(crate) rx_notify: EventFd,
    pub(crate) tx_notify: EventFd,
    interrupt: Arc<dyn VirtioInterrupt>,
}

/// A virtio network device (virtio 1.2 §5.1) backed by a host TAP device.
pub struct Net {
    config: NetConfig,
    tap: Tap,
    virtio: VirtioConfig,
    metrics: Arc<NetMetrics>,
    pub(crate) active: Option<Active>,
    /// Signalled at activation and reset, so that the event loop starts or
    /// stops watching the queues and the TAP.
    pub(crate) control_evt: EventFd,
    /// Whether the device was added to an event loop.
    pub(crate) subscribed: bool,
    /// What the event loop watches for the current activation (both
    /// queues and the TAP), and the notify EventFds of a previous one until
    /// it has stopped watching them.
    pub(crate) registrations: Registrations,
    rx_buf: Box<[u8]>,
    /// Length of a frame read into `rx_buf` and not yet delivered: with
    /// VIRTIO_NET_F_MRG_RXBUF a frame is read before the device knows how
    /// many receive chains it needs, and waits here for more of them.
    rx_pending: Option<usize>,
    rx_segments: Vec<(GuestAddress, usize)>,
    /// The receive chains gathered for one frame with
    /// VIRTIO_NET_F_MRG_RXBUF.
    rx_chains: Vec<RxChain>,
    /// Unusable receive chains met while gathering chains for one frame:
    /// returned after that frame's chains, which the driver reads as one
    /// run of `num_buffers` used entries.
    rx_unusable: Vec<u16>,
    tx_buf: Box<[u8]>,
    rx_limiter: RateLimiter,
    tx_limiter: RateLimiter,
    /// The metadata service, on an interface it answers on.
    mmds: Option<MmdsNetworkStack>,
    /// Whether the last transmit pass gave the metadata service a frame.
    mmds_took_frames: bool,
}

/// Takes one operation and `len` bytes from `limiter`, as Firecracker does
/// for each frame; `false` (and nothing taken) when the frame must wait.
fn admit(limiter: &mut RateLimiter, len: usize) -> bool {
    if limiter.is_unlimited() && !limiter.is_blocked() {
        return true;
    }
    if !limiter.consume(1, TokenType::Ops) {
        return false;
    }
    if !limiter.consume(len as u64, TokenType::Bytes) {
        limiter.manual_replenish(1, TokenType::Ops);
        return false;
    }
    true
}

/// One receive chain gathered for a frame: its head and its buffers,
/// `Net::rx_segments[segments]`.
#[derive(Debug, Clone)]
struct RxChain {
    head: u16,
    segments: std::ops::Range<usize>,
    capacity: usize,
}

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net")
            .field("config", &self.config)
            .field("tap", &self.tap.name())
            .field("avail_features", &self.virtio.avail_features())
            .field("acked_features", &self.virtio.acked_features())
            .field("activated", &self.active.is_some())
            .finish_non_exhaustive()
    }
}

impl Net {
    /// Opens the TAP device and builds the device.
    ///
    /// The TAP device is created if it does not exist (and then disappears
    /// with the device); attaching to an existing one needs it not to be in
    /// use by another process.
    pub fn new(config: NetConfig) -> Result<Net, Error> {
        if let Some(mtu) = config.mtu {
            if mtu < MIN_MTU {
                return Err(Error::InvalidMtu(mtu));
            }
        }
        crate::tap::check_name(&config.host_dev_name)?;
        let control_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| Error::EventFd {
            iface_id: config.iface_id.clone(),
            source,
        })?;
        let limiter = |c: &RateLimiterConfig| {
            c.build().map_err(|source| Error::RateLimiter {
                iface_id: config.iface_id.clone(),
                source,
            })
        };
        let rx_limiter = limiter(&config.rx_rate_limiter)?;
        let tx_limiter = limiter(&config.tx_rate_limiter)?;
        let tap = Tap::open(&config.host_dev_name)?;

        // Firecracker's feature set.
        let mut avail_features = (1u64 << VIRTIO_F_VERSION_1)
            | (1u64 << VIRTIO_RING_F_EVENT_IDX)
            | (1u64 << VIRTIO_NET_F_MRG_RXBUF)
            | (1u64 << VIRTIO_NET_F_CSUM)
            | (1u64 << VIRTIO_NET_F_GUEST_CSUM)
            | (1u64 << VIRTIO_NET_F_GUEST_TSO4)
            | (1u64 << VIRTIO_NET_F_GUEST_TSO6)
            | (1u64 << VIRTIO_NET_F_GUEST_UFO)
            | (1u64 << VIRTIO_NET_F_HOST_TSO4)
            | (1u64 << VIRTIO_NET_F_HOST_TSO6)
            | (1u64 << VIRTIO_NET_F_HOST_UFO);
        // struct virtio_net_config (virtio 1.2 §5.1.4): mac[6] at 0,
        // status at 6, max_virtqueue_pairs at 8, mtu at 10, little-endian.
        let mut config_space = [0u8; CONFIG_SPACE_SIZE];
        if let Some(mac) = config.guest_mac {
            avail_features |= 1u64 << VIRTIO_NET_F_MAC;
            config_space[..6].copy_from_slice(&mac);
        }
        if let Some(mtu) = config.mtu {
            avail_features |= 1u64 << VIRTIO_NET_F_MTU;
            config_space[10..12].copy_from_slice(&mtu.to_le_bytes());
        }

        Ok(Net {
            config,
            tap,
            virtio: VirtioConfig::new(avail_features, config_space.to_vec()),
            metrics: Arc::new(NetMetrics::default()),
            active: None,
            control_evt,
            subscribed: false,
            registrations: Registrations::new(),
            rx_buf: vec![0u8; MAX_BUFFER_SIZE].into_boxed_slice(),
            rx_pending: None,
            rx_segments: Vec::new(),
            rx_chains: Vec::new(),
            rx_unusable: Vec::new(),
            tx_buf: vec![0u8; MAX_BUFFER_SIZE].into_boxed_slice(),
            rx_limiter,
            tx_limiter,
            mmds: None,
            mmds_took_frames: false,
        })
    }

    /// Makes the metadata service answer on this interface (or stop, with
    /// `None`): frames the guest sends to its address go to `stack`
    /// instead of the TAP, and its answers reach the guest before the
    /// TAP's frames.
    pub fn set_mmds_stack(&mut self, stack: Option<MmdsNetworkStack>) {
        self.mmds = stack;
    }

    /// The metadata service's stack on this interface, if it answers here.
    pub fn mmds_stack(&self) -> Option<&MmdsNetworkStack> {
        self.mmds.as_ref()
    }

    /// The metadata service's stack on this interface, to change its
    /// address.
    pub fn mmds_stack_mut(&mut self) -> Option<&mut MmdsNetworkStack> {
        self.mmds.as_mut()
    }

    /// The receive rate limiter's timerfd, readable when a block ends.
    pub fn rx_rate_limiter_fd(&self) -> RawFd {
        self.rx_limiter.as_raw_fd()
    }

    /// The transmit rate limiter's timerfd, readable when a block ends.
    pub fn tx_rate_limiter_fd(&self) -> RawFd {
        self.tx_limiter.as_raw_fd()
    }

    /// The receive rate limiter, as it stands.
    pub fn rx_rate_limiter(&self) -> &RateLimiter {
        &self.rx_limiter
    }

    /// The transmit rate limiter, as it stands.
    pub fn tx_rate_limiter(&self) -> &RateLimiter {
        &self.tx_limiter
    }

    /// Changes the rate limiters of a live device
    /// (`PATCH /network-interfaces/{id}`).
    pub fn update_rate_limiters(
        &mut self,
        rx_bandwidth: BucketUpdate,
        rx_ops: BucketUpdate,
        tx_bandwidth: BucketUpdate,
        tx_ops: BucketUpdate,
    ) {
        self.rx_limiter.update_buckets(rx_bandwidth, rx_ops);
        self.tx_limiter.update_buckets(tx_bandwidth, tx_ops);
        let specs = |l: &RateLimiter| RateLimiterConfig {
            bandwidth: l.bandwidth().map(|b| b.spec()),
            ops: l.ops().map(|b| b.spec()),
        };
        self.config.rx_rate_limiter = specs(&self.rx_limiter);
        self.config.tx_rate_limiter = specs(&self.tx_limiter);
    }

    /// Handles the receive rate limiter's timer: receiving goes on where it
    /// stopped.
    pub fn handle_rx_rate_limiter_event(&mut self) {
        self.metrics.rx_event_rate_limiter_count.inc();
        if self.rx_limiter.event_handler() && self.process_rx() {
            self.signal(RX_INDEX);
        }
    }

    /// Handles the transmit rate limiter's timer: sending goes on where it
    /// stopped.
    pub fn handle_tx_rate_limiter_event(&mut self) {
        self.metrics.tx_rate_limiter_event_count.inc();
        if self.tx_limiter.event_handler() && self.process_tx() {
            self.signal(TX_INDEX);
        }
    }

    /// The configuration the device was built from.
    pub fn config(&self) -> &NetConfig {
        &self.config
    }

    /// The interface's ID in the VMM's configuration.
    pub fn iface_id(&self) -> &str {
        &self.config.iface_id
    }

    /// The TAP device's name, as the kernel reported it.
    pub fn tap_name(&self) -> &str {
        self.tap.name()
    }

    /// The TAP's file descriptor, for a VMM that polls it itself: when it is
    /// readable, call [`handle_tap_event`](Self::handle_tap_event). The
    /// device reads until the TAP is empty or the guest has no buffers, so
    /// edge-triggered polling is enough.
    pub fn tap_fd(&self) -> RawFd {
        self.tap.as_raw_fd()
    }

    /// The MAC address offered to the guest.
    pub fn guest_mac(&self) -> Option<[u8; 6]> {
        self.config.guest_mac
    }

    /// The MTU offered to the guest.
    pub fn mtu(&self) -> Option<u16> {
        self.config.mtu
    }

    /// Features the driver accepted (0 before negotiation and after a
    /// reset).
    pub fn acked_features(&self) -> u64 {
        self.virtio.acked_features()
    }

    /// The device's counters (shared: clone the `Arc` to read them from
    /// another thread).
    pub fn metrics(&self) -> &Arc<NetMetrics> {
        &self.metrics
    }

    /// Whether the driver started the device and no reset happened since.
    pub fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    /// Handles a notification of the receive queue (the driver posted
    /// buffers): clears the EventFd and receives the frames waiting in the
    /// TAP. A no-op before activation.
    pub fn handle_rx_queue_event(&mut self) {
        let Some(active) = &self.active else {
            return;
        };
        self.metrics.rx_queue_event_count.inc();
        drain_event(&active.rx_notify, &self.metrics);
        if self.process_rx() {
            self.signal(RX_INDEX);
        }
    }

    /// Handles the TAP becoming readable: receives frames until the TAP is
    /// empty or the driver has no buffers left. A no-op before activation.
    pub fn handle_tap_event(&mut self) {
        if self.active.is_none() {
            return;
        }
        self.metrics.rx_tap_event_count.inc();
        if self.process_rx() {
            self.signal(RX_INDEX);
        }
    }

    /// Handles a notification of the transmit queue: clears the EventFd and
    /// sends every chain the driver published. A no-op before activation.
    pub fn handle_tx_queue_event(&mut self) {
        let Some(active) = &self.active else {
            return;
        };
        self.metrics.tx_queue_event_count.inc();
        drain_event(&active.tx_notify, &self.metrics);
        if self.process_tx() {
            self.signal(TX_INDEX);
        }
        // Frames the metadata service took may have answers: deliver them.
        if std::mem::take(&mut self.mmds_took_frames) && self.process_rx() {
            self.signal(RX_INDEX);
        }
    }

    fn signal(&mut self, index: u16) {
        if let Some(active) = self.active.as_mut() {
            let queue = if index == RX_INDEX {
                &mut active.rx
            } else {
                &mut active.tx
            };
            signal_used(queue, &active.mem, &*active.interrupt, &self.metrics);
        }
    }

    /// Moves frames from the TAP into receive chains. Returns whether any
    /// chain was used.
    fn process_rx(&mut self) -> bool {
        if self.active.is_some() && self.rx_limiter.is_blocked() {
            // Frames wait in the TAP; the limiter's timer resumes.
            self.metrics.rx_rate_limiter_throttled.inc();
            return false;
        }
        if self.virtio.has_acked(VIRTIO_NET_F_MRG_RXBUF) {
            return self.process_rx_mergeable();
        }
        let Some(active) = self.active.as_mut() else {
            return false;
        };
        let metrics = &*self.metrics;
        let (mem, rx) = (&active.mem, &mut active.rx);
        // Notifications are only wanted once the device runs out of buffers:
        // pop_or_enable_notification turns them back on then.
        if let Err(e) = rx.disable_notification(mem) {
            metrics.event_fails.inc();
            error!("virtio-net: cannot disable receive queue notifications: {e}");
        }
        let mut used_any = false;
        loop {
            let chain = match pop_or_enable_notification(rx, mem) {
                Ok(Some(chain)) => chain,
                Ok(None) => {
                    // Frames stay in the TAP until the driver posts buffers
                    // and notifies the queue.
                    metrics.no_rx_avail_buffer.inc();
                    break;
                }
                Err(e) => {
                    metrics.event_fails.inc();
                    error!("virtio-net: cannot read the receive queue: {e}");
                    break;
                }
            };
            let head = chain.head_index();
            self.rx_segments.clear();
            let min = VNET_HDR_LEN + ETH_HLEN;
            let capacity = match parse_rx_chain(mem, chain, &mut self.rx_segments, min) {
                Ok(capacity) => capacity,
                Err(e) => {
                    metrics.rx_fails.inc();
                    warn!("virtio-net: unusable receive chain (head {head}): {e}");
                    add_used(rx, mem, head, 0, metrics);
                    used_any = true;
                    continue;
                }
            };
            // Read frames until one fits in this chain (a frame the rate
            // limiter held back comes first).
            let frame_len = loop {
                let read = match self.rx_pending.take() {
                    Some(len) => Ok(len),
                    None => match mmds_frame(self.mmds.as_mut(), &mut self.rx_buf) {
                        Some(len) => Ok(len),
                        None => self.tap.read_frame(&mut self.rx_buf),
                    },
                };
                match read {
                    Ok(len) if len > capacity || len > self.rx_buf.len() => {
                        metrics.rx_frames_too_big.inc();
                        metrics.rx_fails.inc();
                        warn!(
                            "virtio-net: dropped a {len}-byte frame, larger than the \
                             {capacity}-byte receive chain (head {head})"
                        );
                    }
                    Ok(len) if len < VNET_HDR_LEN => {
                        metrics.rx_fails.inc();
                        warn!("virtio-net: dropped a {len}-byte frame read from the TAP");
                    }
                    Ok(len) => break Some(len),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break None,
                    Err(e) => {
                        metrics.tap_read_fails.inc();
                        error!(
                            "virtio-net: failed to read from TAP {}: {e}",
                            self.tap.name()
                        );
                        break None;
                    }
                }
            };
            let Some(len) = frame_len else {
                // Nothing to receive: the chain goes back to the available
                // ring, untouched.
                rx.go_to_previous_position();
                break;
            };
            if !admit(&mut self.rx_limiter, len) {
                // The frame waits, read, for the limiter's timer.
                metrics.rx_rate_limiter_throttled.inc();
                self.rx_pending = Some(len);
                rx.go_to_previous_position();
                break;
            }
            let frame = &mut self.rx_buf[..len];
            // virtio 1.2 §5.1.6.4.1: without VIRTIO_NET_F_MRG_RXBUF the
            // device MUST set num_buffers to 1. The TAP leaves the field
            // as it was.
            frame[NUM_BUFFERS_OFFSET..VNET_HDR_LEN].copy_from_slice(&1u16.to_le_bytes());
            match scatter(mem, &self.rx_segments, frame) {
                Ok(()) => {
                    // Cannot truncate: len <= MAX_BUFFER_SIZE.
                    add_used(rx, mem, head, len as u32, metrics);
                    metrics.rx_count.inc();
                    metrics.rx_packets_count.inc();
                    metrics.rx_bytes_count.add(len as u64);
                }
                Err(e) => {
                    metrics.rx_fails.inc();
                    error!("virtio-net: failed to write a frame to guest memory: {e}");
                    add_used(rx, mem, head, 0, metrics);
                }
            }
            used_any = true;
        }
        used_any
    }

    /// Moves frames from the TAP into receive chains when the driver
    /// accepted VIRTIO_NET_F_MRG_RXBUF: a frame may take several chains,
    /// used one after the other, and the header in the first says how many
    /// (`num_buffers`, virtio 1.2 §5.1.6.4). Returns whether any chain was
    /// used.
    ///
    /// A frame is read once a first chain is there; if the ring runs out
    /// before the frame fits, the chains go back untouched and the frame
    /// waits in `rx_pending` for more buffers. A frame larger than all the
    /// chains a full ring holds is dropped and counted.
    fn process_rx_mergeable(&mut self) -> bool {
        let Some(active) = self.active.as_mut() else {
            return false;
        };
        let metrics = &*self.metrics;
        let (mem, rx) = (&active.mem, &mut active.rx);
        if let Err(e) = rx.disable_notification(mem) {
            metrics.event_fails.inc();
            error!("virtio-net: cannot disable receive queue notifications: {e}");
        }
        // The ring never holds more chains than its size (virtio-queue
        // refuses an available index further ahead).
        let max_chains = usize::from(rx.size());
        let mut used_any = false;
        'frames: loop {
            self.rx_chains.clear();
            self.rx_segments.clear();
            self.rx_unusable.clear();
            let mut start = rx.next_avail();
            let mut capacity = 0usize;
            // Gather chains until the frame fits.
            let len = loop {
                if let Some(len) = self.rx_pending.filter(|len| capacity >= *len) {
                    break len;
                }
                if self.rx_chains.len() + self.rx_unusable.len() >= max_chains {
                    let len = self.rx_pending.take().unwrap_or(0);
                    metrics.rx_frames_too_big.inc();
                    metrics.rx_fails.inc();
                    warn!(
                        "virtio-net: dropped a {len}-byte frame, larger than the \
                         {capacity} bytes of a full receive ring"
                    );
                    rx.set_next_avail(start);
                    continue 'frames;
                }
                let chain = match pop_or_enable_notification(rx, mem) {
                    Ok(Some(chain)) => chain,
                    Ok(None) => {
                        // The chains gathered so far go back; a pending
                        // frame waits until the driver posts more buffers
                        // and notifies the queue.
                        metrics.no_rx_avail_buffer.inc();
                        rx.set_next_avail(start);
                        break 'frames;
                    }
                    Err(e) => {
                        metrics.event_fails.inc();
                        error!("virtio-net: cannot read the receive queue: {e}");
                        rx.set_next_avail(start);
                        break 'frames;
                    }
                };
                let head = chain.head_index();
                let first = self.rx_segments.len();
                // virtio 1.2 §5.1.6.3.1: with VIRTIO_NET_F_MRG_RXBUF every
                // buffer holds at least the header.
                match parse_rx_chain(mem, chain, &mut self.rx_segments, VNET_HDR_LEN) {
                    Ok(chain_capacity) => {
                        self.rx_chains.push(RxChain {
                            head,
                            segments: first..self.rx_segments.len(),
                            capacity: chain_capacity,
                        });
                        capacity += chain_capacity;
                    }
                    Err(e) => {
                        self.rx_segments.truncate(first);
                        if self.rx_chains.is_empty() {
                            metrics.rx_fails.inc();
                            warn!("virtio-net: unusable receive chain (head {head}): {e}");
                            add_used(rx, mem, head, 0, metrics);
                            used_any = true;
                            start = rx.next_avail();
                        } else {
                            // Returned after the frame's own chains.
                            self.rx_unusable.push(head);
                        }
                        continue;
                    }
                }
                if self.rx_pending.is_none() {
                    let read = match mmds_frame(self.mmds.as_mut(), &mut self.rx_buf) {
                        Some(len) => Some(len),
                        None => read_frame(&self.tap, &mut self.rx_buf, metrics),
                    };
                    match read {
                        Some(len) => self.rx_pending = Some(len),
                        None => {
                            // Nothing to receive: the chains go back to the
                            // available ring, untouched.
                            rx.set_next_avail(start);
                            break 'frames;
                        }
                    }
                }
            };
            if !admit(&mut self.rx_limiter, len) {
                // The frame stays pending and its chains go back, for the
                // limiter's timer.
                metrics.rx_rate_limiter_throttled.inc();
                rx.set_next_avail(start);
                break 'frames;
            }
            self.rx_pending = None;
            let frame = &mut self.rx_buf[..len];
            // Cannot truncate: at most the queue size, a u16.
            let num_buffers = self.rx_chains.len() as u16;
            frame[NUM_BUFFERS_OFFSET..VNET_HDR_LEN].copy_from_slice(&num_buffers.to_le_bytes());
            // Every chain but the last is filled: gathering stopped as soon
            // as the frame fitted.
            let mut rest = &frame[..];
            let mut written = Ok(());
            for chain in &self.rx_chains {
                let (now, later) = rest.split_at(rest.len().min(chain.capacity));
                let segments = self.rx_segments.get(chain.segments.clone()).unwrap_or(&[]);
                if let Err(e) = scatter(mem, segments, now) {
                    written = Err(e);
                    break;
                }
                rest = later;
            }
            match written {
                Ok(()) => {
                    let mut rest = len;
                    for chain in &self.rx_chains {
                        let n = rest.min(chain.capacity);
                        rest -= n;
                        // Cannot truncate: n <= len <= MAX_BUFFER_SIZE.
                        add_used(rx, mem, chain.head, n as u32, metrics);
                    }
                    metrics.rx_count.inc();
                    metrics.rx_packets_count.inc();
                    metrics.rx_bytes_count.add(len as u64);
                }
                Err(e) => {
                    // Nothing is delivered: every chain comes back empty,
                    // which the driver drops as too short.
                    metrics.rx_fails.inc();
                    error!("virtio-net: failed to write a frame to guest memory: {e}");
                    for chain in &self.rx_chains {
                        add_used(rx, mem, chain.head, 0, metrics);
                    }
                }
            }
            for &head in &self.rx_unusable {
                metrics.rx_fails.inc();
                warn!("virtio-net: unusable receive chain (head {head})");
                add_used(rx, mem, head, 0, metrics);
            }
            used_any = true;
        }
        used_any
    }

    /// Sends every transmit chain to the TAP. Returns whether any chain was
    /// used.
    fn process_tx(&mut self) -> bool {
        let Some(active) = self.active.as_mut() else {
            return false;
        };
        if self.tx_limiter.is_blocked() {
            // The limiter's timer resumes.
            self.metrics.tx_rate_limiter_throttled.inc();
            return false;
        }
        let metrics = &*self.metrics;
        let (mem, tx) = (&active.mem, &mut active.tx);
        // No notifications while the ring is being drained (virtio 1.2
        // §2.7.10); pop_or_enable_notification turns them back on.
        if let Err(e) = tx.disable_notification(mem) {
            metrics.event_fails.inc();
            error!("virtio-net: cannot disable transmit queue notifications: {e}");
        }
        let mut used_any = false;
        loop {
            let chain = match pop_or_enable_notification(tx, mem) {
                Ok(Some(chain)) => chain,
                Ok(None) => break,
                Err(e) => {
                    metrics.event_fails.inc();
                    error!("virtio-net: cannot read the transmit queue: {e}");
                    break;
                }
            };
            let head = chain.head_index();
            match read_tx_chain(mem, chain, &mut self.tx_buf) {
                Ok(len) if !admit(&mut self.tx_limiter, len) => {
                    // The chain goes back; the limiter's timer resumes.
                    metrics.tx_rate_limiter_throttled.inc();
                    tx.go_to_previous_position();
                    break;
                }
                Ok(len)
                    if self
                        .mmds
                        .as_ref()
                        .is_some_and(|m| m.is_mmds_frame(&self.tx_buf[VNET_HDR_LEN..len])) =>
                {
                    // For the metadata service, never for the TAP; not
                    // charged to the limiter, as in Firecracker.
                    if let Some(mmds) = self.mmds.as_mut() {
                        mmds.metrics().rx_accepted.inc();
                        mmds.detour_frame(&self.tx_buf[VNET_HDR_LEN..len], Instant::now());
                    }
                    self.mmds_took_frames = true;
                    self.tx_limiter.manual_replenish(1, TokenType::Ops);
                    self.tx_limiter
                        .manual_replenish(len as u64, TokenType::Bytes);
                }
                Ok(len) => {
                    let frame = &self.tx_buf[..len];
                    if let Some(mac) = self.config.guest_mac {
                        if frame.get(SRC_MAC_OFFSET..SRC_MAC_OFFSET + 6) != Some(&mac[..]) {
                            metrics.tx_spoofed_mac_count.inc();
                        }
                    }
                    match self.tap.write_frame(frame) {
                        Ok(_) => {
                            metrics.tx_count.inc();
                            metrics.tx_packets_count.inc();
                            metrics.tx_bytes_count.add(len as u64);
                        }
                        Err(e) => {
                            metrics.tap_write_fails.inc();
                            warn!(
                                "virtio-net: failed to write a {len}-byte frame to TAP {}: {e}",
                                self.tap.name()
                            );
                        }
                    }
                }
                Err(e) => {
                    if e.is_malformed_frame() {
                        metrics.tx_malformed_frames.inc();
                    } else {
                        metrics.tx_fails.inc();
                    }
                    warn!("virtio-net: dropped transmit chain (head {head}): {e}");
                }
            }
            // The device writes nothing into transmit buffers.
            add_used(tx, mem, head, 0, metrics);
            used_any = true;
        }
        if !used_any && !self.tx_limiter.is_blocked() {
            metrics.no_tx_avail_buffer.inc();
        }
        used_any
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        self.virtio.avail_features()
    }

    fn ack_features(&mut self, features: u64) {
        self.virtio.ack_features(features);
    }

    fn config_size(&self) -> u64 {
        self.virtio.config_size()
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.virtio.read_config(offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // With VIRTIO_F_VERSION_1 the configuration is read-only for the
        // driver (virtio 1.2 §5.1.4.2: the driver MUST NOT write `mac`).
        self.metrics.cfg_fails.inc();
        warn!(
            "virtio-net: driver wrote {} bytes of configuration at {offset:#x}",
            data.len()
        );
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<ActiveQueue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        if self.active.is_some() {
            self.metrics.activate_fails.inc();
            return Err(ActivateError::AlreadyActivated);
        }
        // RX_INDEX is 0 and TX_INDEX 1: take_queues returns them in that order.
        let [rx, tx] =
            take_queues::<2>(queues).inspect_err(|_| self.metrics.activate_fails.inc())?;
        let flags = tap_offload_flags(self.virtio.acked_features());
        if let Err(e) = self.tap.set_offload(flags) {
            self.metrics.activate_fails.inc();
            error!(
                "virtio-net: cannot set offload flags {flags:#x} on TAP {}: {e}",
                self.tap.name()
            );
            return Err(ActivateError::Io(e));
        }
        if let Err(e) = self.control_evt.write(1) {
            self.metrics.activate_fails.inc();
            return Err(ActivateError::Io(e));
        }
        self.active = Some(Active {
            mem,
            rx: rx.queue,
            tx: tx.queue,
            rx_notify: rx.notify,
            tx_notify: tx.notify,
            interrupt,
        });
        Ok(())
    }

    fn reset(&mut self) -> bool {
        if let Some(active) = self.active.take() {
            if self.subscribed {
                // The event loop may be watching these: they stay open
                // until it has unregistered them.
                self.registrations.retire(active.rx_notify);
                self.registrations.retire(active.tx_notify);
                if let Err(e) = self.control_evt.write(1) {
                    self.metrics.event_fails.inc();
                    error!("virtio-net: cannot signal the reset to the event loop: {e}");
                }
            }
        }
        // A frame waiting for receive buffers goes with the queues.
        self.rx_pending = None;
        self.virtio.reset();
        if let Err(e) = self.tap.set_offload(0) {
            warn!(
                "virtio-net: cannot clear offload flags on TAP {}: {e}",
                self.tap.name()
            );
        }
        true
    }
}

#[cfg(test)]
mod chain_tests {
    use virtio_bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    use super::*;

    const TABLE: u64 = 0x8000;

    /// A chain of one INDIRECT descriptor pointing at a table of `n`
    /// one-byte descriptors (`flags`) linked 0 -> 1 -> ... -> n-1.
    fn long_indirect<R>(
        mem: &GuestMemoryMmap,
        n: u16,
        flags: u16,
        f: impl FnOnce(DescriptorChain<&GuestMemoryMmap>) -> R,
    ) -> R {
        for i in 0..n {
            let next = if i + 1 < n {
                VRING_DESC_F_NEXT as u16
            } else {
                0
            };
            let entry = RawDescriptor::from(Descriptor::new(
                0x1000 + u64::from(i),
                1,
                flags | next,
                i + 1,
            ));
            mem.write_obj(entry, GuestAddress(TABLE + 16 * u64::from(i)))
                .unwrap();
        }
        let queue = MockSplitQueue::new(mem, 16);
        let head = RawDescriptor::from(Descriptor::new(
            TABLE,
            16 * u32::from(n),
            VRING_DESC_F_INDIRECT as u16,
            0,
        ));
        f(queue.build_desc_chain(&[head]).unwrap())
    }

    #[test]
    fn chains_longer_than_the_queue_are_refused() {
        // virtio 1.2 §2.7.5.3.1: a chain may not be longer than the queue.
        // Walking stops there, which also bounds what a looping indirect
        // table (65535 entries per chain) can cost.
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap();
        let mut buf = vec![0u8; MAX_BUFFER_SIZE];
        let n = QUEUE_SIZE + 44;
        let tx = long_indirect(&mem, n, 0, |c| read_tx_chain(&mem, c, &mut buf));
        assert!(matches!(tx, Err(TxChainError::Broken)), "{tx:?}");
        let mut segments = Vec::new();
        let w = VRING_DESC_F_WRITE as u16;
        let rx = long_indirect(&mem, n, w, |c| parse_rx_chain(&mem, c, &mut segments, 1));
        assert!(matches!(rx, Err(RxChainError::Broken)), "{rx:?}");
        // A chain of exactly the queue size is fine.
        let tx = long_indirect(&mem, QUEUE_SIZE, 0, |c| read_tx_chain(&mem, c, &mut buf));
        assert_eq!(tx.unwrap(), usize::from(QUEUE_SIZE));
        let rx = long_indirect(&mem, QUEUE_SIZE, w, |c| {
            parse_rx_chain(&mem, c, &mut segments, 1)
        });
        assert_eq!(rx.unwrap(), usize::from(QUEUE_SIZE));
    }
}
