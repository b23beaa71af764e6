// SPDX-License-Identifier: Apache-2.0

//! Device tests against real guest memory, virtqueues laid out by a small
//! test driver, and real TAP devices.
//!
//! Each test that opens a TAP first moves its thread into a fresh network
//! namespace, with IPv6 disabled: the host stack then sends nothing on the
//! TAP by itself, tests cannot see each other's frames, and the interfaces
//! disappear with the test. The host side of the TAP is an AF_PACKET socket
//! bound to it: what the device writes to the TAP arrives on the socket, and
//! what is sent on the socket comes out of the TAP for the device to read.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ember_bus::BusDevice;
use ember_virtio::{ActivateError, ActiveQueue, Persist, VirtioDevice};
use ember_virtio_mmio::test_utils::{initialize, read_reg, MockInterrupt, QueueLayout};
use ember_virtio_mmio::{MmioTransport, NOTIFY_REG_OFFSET};
use event_manager::{EventManager, SubscriberOps};
use virtio_bindings::virtio_config::{VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_F_VERSION_1};
use virtio_bindings::virtio_mmio::VIRTIO_MMIO_INTERRUPT_STATUS;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_UFO, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_MTU,
};
use virtio_bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::{
    parse_mac, tap_offload_flags, BucketSpec, BucketUpdate, Error, Net, NetConfig,
    RateLimiterConfig, CONFIG_SPACE_SIZE, MAX_BUFFER_SIZE, QUEUE_SIZE, VNET_HDR_LEN,
};

const GUEST_MAC: [u8; 6] = [0x06, 0x00, 0xac, 0x10, 0x00, 0x02];
const HOST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
/// IEEE 802 local experimental EtherType: nothing in the host handles it.
const TEST_ETHERTYPE: u16 = 0x88b5;
const ETHERTYPE_ARP: u16 = 0x0806;

const MEM_SIZE: usize = 0x80_0000;
const RX_RING: u64 = 0x0;
const TX_RING: u64 = 0x8000;
const DATA_START: u64 = 0x10_0000;
/// Queue size used by most tests: small, so that bursts overflow it.
const SMALL_QUEUE: u16 = 16;
const TIMEOUT: Duration = Duration::from_secs(5);

const BASE_FEATURES: u64 = 1u64 << VIRTIO_F_VERSION_1;
const EVENT_IDX: u64 = 1u64 << VIRTIO_RING_F_EVENT_IDX;
const MRG_RXBUF: u64 = 1u64 << VIRTIO_NET_F_MRG_RXBUF;

static NEXT_TAP: AtomicUsize = AtomicUsize::new(0);

// ---------------------------------------------------------------------------
// Host side: network namespace, TAP configuration, packet socket.

/// Moves the calling thread into a new network namespace with IPv6 off.
fn isolate_network() {
    // SAFETY: unshare takes a flag and changes only the calling thread's
    // network namespace.
    let ret = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(
        ret,
        0,
        "unshare(CLONE_NEWNET): {}",
        std::io::Error::last_os_error()
    );
    // Interfaces created from now on start with IPv6 disabled: no router
    // solicitations or DAD probes on the TAP.
    std::fs::write("/proc/sys/net/ipv6/conf/default/disable_ipv6", "1")
        .expect("disable IPv6 in the test namespace");
}

/// A unique TAP name: `embt<pid><n>`.
fn tap_name() -> String {
    format!(
        "embt{}{}",
        std::process::id(),
        NEXT_TAP.fetch_add(1, Ordering::Relaxed)
    )
}

fn config(name: &str, guest_mac: Option<[u8; 6]>, mtu: Option<u16>) -> NetConfig {
    NetConfig {
        iface_id: "eth0".to_string(),
        host_dev_name: name.to_string(),
        guest_mac,
        mtu,
        rx_rate_limiter: Default::default(),
        tx_rate_limiter: Default::default(),
    }
}

/// A device on a new TAP, in a new network namespace.
fn new_net() -> Net {
    isolate_network();
    Net::new(config(&tap_name(), Some(GUEST_MAC), None)).expect("create the network device")
}

fn socket(domain: libc::c_int, kind: libc::c_int, protocol: libc::c_int) -> OwnedFd {
    // SAFETY: socket takes scalars; the result is checked.
    let fd = unsafe { libc::socket(domain, kind | libc::SOCK_CLOEXEC, protocol) };
    assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: fd is a new descriptor that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    ifr
}

fn if_ioctl(request: libc::c_ulong, ifr: &mut libc::ifreq) {
    let sock = socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
    // SAFETY: the SIOC* requests used here read and write one ifreq, which
    // lives across the call.
    let ret = unsafe { libc::ioctl(sock.as_raw_fd(), request as _, ifr as *mut libc::ifreq) };
    assert_eq!(
        ret,
        0,
        "ioctl {request:#x}: {}",
        std::io::Error::last_os_error()
    );
}

/// Brings the TAP up; with `noarp`, the host stack does not answer ARP.
fn bring_up(name: &str, noarp: bool) {
    let mut ifr = ifreq(name);
    let mut flags = libc::IFF_UP;
    if noarp {
        flags |= libc::IFF_NOARP;
    }
    ifr.ifr_ifru.ifru_flags = flags as libc::c_short;
    if_ioctl(libc::SIOCSIFFLAGS, &mut ifr);
}

fn if_index(name: &str) -> i32 {
    let mut ifr = ifreq(name);
    if_ioctl(libc::SIOCGIFINDEX, &mut ifr);
    // SAFETY: SIOCGIFINDEX filled in the ifindex member.
    unsafe { ifr.ifr_ifru.ifru_ifindex }
}

fn sockaddr_in(addr: [u8; 4]) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(addr),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; the kernel reads
    // the address family first.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

/// Gives the TAP an IPv4 address and netmask.
fn set_ipv4(name: &str, addr: [u8; 4], netmask: [u8; 4]) {
    let mut ifr = ifreq(name);
    ifr.ifr_ifru.ifru_addr = sockaddr_in(addr);
    if_ioctl(libc::SIOCSIFADDR, &mut ifr);
    let mut ifr = ifreq(name);
    ifr.ifr_ifru.ifru_netmask = sockaddr_in(netmask);
    if_ioctl(libc::SIOCSIFNETMASK, &mut ifr);
}

/// An ethtool boolean (ETHTOOL_GTXCSUM, ETHTOOL_GTSO) of an interface.
fn ethtool_get(name: &str, cmd: u32) -> u32 {
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    let mut value = EthtoolValue { cmd, data: 0 };
    let mut ifr = ifreq(name);
    ifr.ifr_ifru.ifru_data = (&mut value as *mut EthtoolValue).cast();
    if_ioctl(libc::SIOCETHTOOL, &mut ifr);
    value.data
}

/// The host end of the TAP: an AF_PACKET socket bound to it.
struct PacketSocket {
    fd: OwnedFd,
}

impl PacketSocket {
    fn new(ifindex: i32) -> PacketSocket {
        let protocol = (libc::ETH_P_ALL as u16).to_be();
        let fd = socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK,
            libc::c_int::from(protocol),
        );
        // SAFETY: sockaddr_ll is plain old data; all zeroes is valid.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = protocol;
        addr.sll_ifindex = ifindex;
        // SAFETY: bind reads a sockaddr_ll of the given size.
        let ret = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        assert_eq!(ret, 0, "bind: {}", std::io::Error::last_os_error());
        PacketSocket { fd }
    }

    /// Sends `frame` out of the interface, that is, into the TAP.
    fn send(&self, frame: &[u8]) {
        // SAFETY: send reads `frame.len()` bytes from the slice.
        let ret = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(
            ret,
            frame.len() as isize,
            "send: {}",
            std::io::Error::last_os_error()
        );
    }

    /// The next frame the interface received (what the device wrote to the
    /// TAP) with EtherType `ethertype`, waiting up to `timeout`.
    fn recv(&self, ethertype: u16, timeout: Duration) -> Option<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut buf = vec![0u8; MAX_BUFFER_SIZE];
            // SAFETY: sockaddr_ll is plain old data; all zeroes is valid.
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut from_len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            // SAFETY: recvfrom writes at most `buf.len()` bytes into `buf`
            // and at most `from_len` bytes into `from`.
            let ret = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                    (&mut from as *mut libc::sockaddr_ll).cast(),
                    &mut from_len,
                )
            };
            if ret >= 0 {
                buf.truncate(ret as usize);
                // Skip what the host itself sends into the TAP.
                if from.sll_pkttype != libc::PACKET_OUTGOING
                    && buf.get(12..14) == Some(&ethertype.to_be_bytes()[..])
                {
                    return Some(buf);
                }
                continue;
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            wait_readable(self.fd.as_raw_fd(), deadline - now);
        }
    }
}

fn wait_readable(fd: RawFd, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll reads and writes one pollfd.
    let ret = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as libc::c_int) };
    ret > 0
}

/// A test frame: `dst`, `src`, TEST_ETHERTYPE, then `payload`.
fn eth_frame(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(14 + payload.len());
    frame.extend_from_slice(&dst);
    frame.extend_from_slice(&src);
    frame.extend_from_slice(&ethertype.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

// ---------------------------------------------------------------------------
// Guest side: a driver writing descriptors and rings in guest memory.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Q {
    Rx,
    Tx,
}

#[derive(Debug)]
struct Ring {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
    /// Index both rings start at.
    start: u16,
}

struct Guest {
    mem: GuestMemoryMmap,
    rx: Ring,
    tx: Ring,
    next_data: u64,
}

impl Guest {
    fn new(size: u16) -> Guest {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)])
            .expect("guest memory");
        // Split virtqueue layout (virtio 1.2 §2.7): descriptor table (16
        // bytes per entry), available ring (flags, idx, ring[size],
        // used_event), then the used ring (flags, idx, ring[size] of 8-byte
        // elements, avail_event) aligned to 4. virtio-queue's MockSplitQueue
        // is not used: it places the used ring `size` bytes after the start
        // of the available ring's entries, on top of their second half.
        let ring = |base: u64| {
            let avail = base + 16 * u64::from(size);
            let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
            assert!(used + 6 + 8 * u64::from(size) <= base + 0x8000);
            Ring {
                size,
                desc: base,
                avail,
                used,
                next_desc: 0,
                avail_idx: 0,
                used_seen: 0,
                start: 0,
            }
        };
        let (rx, tx) = (ring(RX_RING), ring(TX_RING));
        Guest {
            mem,
            rx,
            tx,
            next_data: DATA_START,
        }
    }

    fn ring(&mut self, q: Q) -> &mut Ring {
        match q {
            Q::Rx => &mut self.rx,
            Q::Tx => &mut self.tx,
        }
    }

    fn layout(&self, q: Q) -> QueueLayout {
        let ring = if q == Q::Rx { &self.rx } else { &self.tx };
        QueueLayout {
            size: ring.size,
            desc: ring.desc,
            driver: ring.avail,
            device: ring.used,
        }
    }

    /// The queue as a transport would hand it over (without touching guest
    /// memory, unlike `MockSplitQueue::create`).
    fn queue(&self, q: Q, event_idx: bool) -> Queue {
        let ring = if q == Q::Rx { &self.rx } else { &self.tx };
        let mut queue = Queue::new(ring.size).expect("queue");
        let split = |addr: u64| (Some(addr as u32), Some((addr >> 32) as u32));
        let (lo, hi) = split(ring.desc);
        queue.set_desc_table_address(lo, hi);
        let (lo, hi) = split(ring.avail);
        queue.set_avail_ring_address(lo, hi);
        let (lo, hi) = split(ring.used);
        queue.set_used_ring_address(lo, hi);
        queue.set_ready(true);
        queue.set_event_idx(event_idx);
        queue.set_next_avail(ring.start);
        queue.set_next_used(ring.start);
        assert!(queue.is_valid(&self.mem));
        queue
    }

    /// Starts both rings of `q` (the driver's avail.idx, the device's
    /// used.idx) at `idx`, as after that many buffers went through. Call
    /// before activation.
    fn start_at(&mut self, q: Q, idx: u16) {
        let mem = self.mem.clone();
        let ring = self.ring(q);
        ring.start = idx;
        ring.avail_idx = idx;
        ring.used_seen = idx;
        mem.write_obj(idx.to_le(), GuestAddress(ring.avail + 2))
            .expect("avail idx");
        mem.write_obj(idx.to_le(), GuestAddress(ring.used + 2))
            .expect("used idx");
    }

    fn alloc(&mut self, len: usize) -> u64 {
        let addr = self.next_data;
        self.next_data = (addr + len as u64 + 15) & !15;
        assert!(
            self.next_data <= MEM_SIZE as u64,
            "test data overflows guest memory"
        );
        addr
    }

    /// Publishes a chain of `(addr, len, flags)` descriptors (NEXT links
    /// added) and returns its head.
    fn add_chain(&mut self, q: Q, descs: &[(u64, u32, u16)]) -> u16 {
        let mem = self.mem.clone();
        let ring = self.ring(q);
        let head = ring.next_desc;
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let index = ring.next_desc;
            ring.next_desc = (ring.next_desc + 1) % ring.size;
            let (flags, next) = if i + 1 < descs.len() {
                (flags | VRING_DESC_F_NEXT as u16, ring.next_desc)
            } else {
                (flags, 0)
            };
            let desc = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next));
            mem.write_obj(desc, GuestAddress(ring.desc + 16 * u64::from(index)))
                .expect("write descriptor");
        }
        self.publish(q, head);
        head
    }

    /// Writes `head` into the next available ring entry.
    fn publish(&mut self, q: Q, head: u16) {
        let mem = self.mem.clone();
        let ring = self.ring(q);
        let slot = ring.avail + 4 + 2 * u64::from(ring.avail_idx % ring.size);
        mem.write_obj(head.to_le(), GuestAddress(slot))
            .expect("avail entry");
        ring.avail_idx = ring.avail_idx.wrapping_add(1);
        mem.write_obj(ring.avail_idx.to_le(), GuestAddress(ring.avail + 2))
            .expect("avail idx");
    }

    /// Used ring entries `(id, len)` added since the last call.
    fn take_used(&mut self, q: Q) -> Vec<(u32, u32)> {
        let mem = self.mem.clone();
        let ring = self.ring(q);
        let idx: u16 = mem.read_obj(GuestAddress(ring.used + 2)).expect("used idx");
        let mut out = Vec::new();
        while ring.used_seen != idx {
            let elem = ring.used + 4 + 8 * u64::from(ring.used_seen % ring.size);
            let id: u32 = mem.read_obj(GuestAddress(elem)).expect("used id");
            let len: u32 = mem.read_obj(GuestAddress(elem + 4)).expect("used len");
            out.push((id, len));
            ring.used_seen = ring.used_seen.wrapping_add(1);
        }
        out
    }

    /// Posts a receive chain of write-only buffers of `lens` bytes.
    fn post_rx(&mut self, lens: &[u32]) -> RxBuffer {
        let segments: Vec<(u64, u32)> = lens
            .iter()
            .map(|&len| (self.alloc(len as usize), len))
            .collect();
        let descs: Vec<(u64, u32, u16)> = segments
            .iter()
            .map(|&(addr, len)| (addr, len, VRING_DESC_F_WRITE as u16))
            .collect();
        let head = self.add_chain(Q::Rx, &descs);
        RxBuffer { head, segments }
    }

    /// Queues `frame` for transmission behind a zeroed virtio-net header,
    /// split over three descriptors.
    fn send(&mut self, frame: &[u8]) -> u16 {
        let split = frame.len().min(20);
        let hdr = self.alloc(VNET_HDR_LEN);
        let first = self.alloc(split);
        let rest = self.alloc(frame.len() - split);
        self.mem
            .write_slice(&[0u8; VNET_HDR_LEN], GuestAddress(hdr))
            .expect("header");
        self.mem
            .write_slice(&frame[..split], GuestAddress(first))
            .expect("frame");
        self.mem
            .write_slice(&frame[split..], GuestAddress(rest))
            .expect("frame");
        self.add_chain(
            Q::Tx,
            &[
                (hdr, VNET_HDR_LEN as u32, 0),
                (first, split as u32, 0),
                (rest, (frame.len() - split) as u32, 0),
            ],
        )
    }

    /// Copies `len` bytes of guest memory at `addr`, bounds checked by the
    /// test itself.
    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.mem
            .read_slice(&mut buf, GuestAddress(addr))
            .expect("read guest memory");
        buf
    }

    fn avail_flags(&self, q: Q, flags: u16) {
        let ring = if q == Q::Rx { &self.rx } else { &self.tx };
        self.mem
            .write_obj(flags.to_le(), GuestAddress(ring.avail))
            .expect("avail flags");
    }

    fn set_used_event(&self, q: Q, value: u16) {
        let ring = if q == Q::Rx { &self.rx } else { &self.tx };
        let addr = ring.avail + 4 + 2 * u64::from(ring.size);
        self.mem
            .write_obj(value.to_le(), GuestAddress(addr))
            .expect("used_event");
    }

    fn used_flags(&self, q: Q) -> u16 {
        let ring = if q == Q::Rx { &self.rx } else { &self.tx };
        self.mem
            .read_obj(GuestAddress(ring.used))
            .expect("used flags")
    }

    fn avail_event(&self, q: Q) -> u16 {
        let ring = if q == Q::Rx { &self.rx } else { &self.tx };
        let addr = ring.used + 4 + 8 * u64::from(ring.size);
        self.mem.read_obj(GuestAddress(addr)).expect("avail_event")
    }
}

/// A posted receive chain.
struct RxBuffer {
    head: u16,
    segments: Vec<(u64, u32)>,
}

impl RxBuffer {
    /// The first `len` bytes the device wrote over the chain's buffers.
    fn contents(&self, guest: &Guest, len: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for &(addr, seg_len) in &self.segments {
            let n = (len - out.len()).min(seg_len as usize);
            out.extend(guest.read(addr, n));
        }
        assert_eq!(out.len(), len, "used length beyond the chain");
        out
    }
}

/// What the test keeps of an activation.
struct Activation {
    rx_kick: EventFd,
    tx_kick: EventFd,
    irq: Arc<MockInterrupt>,
}

impl Activation {
    fn kick(&self, q: Q) {
        let evt = if q == Q::Rx {
            &self.rx_kick
        } else {
            &self.tx_kick
        };
        evt.write(1).expect("kick");
    }
}

/// Negotiates `features` and activates the device on the guest's queues,
/// as the transport does at DRIVER_OK.
fn activate(net: &mut Net, guest: &Guest, features: u64) -> Activation {
    net.ack_features(features);
    let event_idx = features & EVENT_IDX != 0;
    let rx_kick = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    let tx_kick = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    let irq = Arc::new(MockInterrupt::default());
    let queues = vec![
        ActiveQueue {
            index: 0,
            queue: guest.queue(Q::Rx, event_idx),
            notify: rx_kick.try_clone().expect("clone"),
        },
        ActiveQueue {
            index: 1,
            queue: guest.queue(Q::Tx, event_idx),
            notify: tx_kick.try_clone().expect("clone"),
        },
    ];
    net.activate(guest.mem.clone(), queues, irq.clone())
        .expect("activate");
    Activation {
        rx_kick,
        tx_kick,
        irq,
    }
}

/// Calls `handle_tap_event` until `done` holds (the TAP is fed from
/// another socket, asynchronously in principle).
fn pump_tap(net: &mut Net, mut done: impl FnMut(&mut Net) -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        net.handle_tap_event();
        if done(net) {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting on the TAP");
        wait_readable(net.tap_fd(), Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------
// Configuration.

#[test]
fn parse_mac_accepts_six_hex_pairs_only() {
    assert_eq!(parse_mac("06:00:ac:10:00:02").unwrap(), GUEST_MAC);
    assert_eq!(
        parse_mac("FF:ee:00:01:9a:B0").unwrap(),
        [0xff, 0xee, 0, 1, 0x9a, 0xb0]
    );
    for bad in [
        "",
        "06:00:ac:10:00",
        "06:00:ac:10:00:02:03",
        "06:00:ac:10:00:2",
        "06:00:ac:10:00:0g",
        "06-00-ac-10-00-02",
        "06:00:ac:10:00:02:",
        "+6:00:ac:10:00:02",
        "006:0:ac:10:00:02",
    ] {
        let err = parse_mac(bad).unwrap_err();
        assert!(
            matches!(err, Error::InvalidMac(ref s) if s == bad),
            "{bad:?}"
        );
        assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
    }
}

#[test]
fn new_rejects_bad_names_and_mtu() {
    let err = Net::new(config("a123456789abcdef", None, None)).unwrap_err();
    assert!(
        matches!(err, Error::TapNameTooLong { len: 16, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("a123456789abcdef"), "{err}");
    assert!(err.to_string().contains("IFNAMSIZ"), "{err}");

    let err = Net::new(config("tap/0", None, None)).unwrap_err();
    assert!(matches!(err, Error::TapNameInvalid(_)), "{err:?}");

    let err = Net::new(config("tap0", None, Some(67))).unwrap_err();
    assert!(matches!(err, Error::InvalidMtu(67)), "{err:?}");
    assert!(err.to_string().contains("67"), "{err}");
}

#[test]
fn busy_tap_error_names_the_device() {
    isolate_network();
    let name = tap_name();
    let first = Net::new(config(&name, None, None)).expect("first open");
    assert_eq!(first.tap_name(), name);
    // A TAP without IFF_MULTI_QUEUE has a single owner.
    let err = Net::new(config(&name, None, None)).unwrap_err();
    assert!(matches!(err, Error::OpenTap { .. }), "{err:?}");
    assert!(
        err.to_string()
            .starts_with(&format!("cannot open TAP device {name}: ")),
        "{err}"
    );
}

#[test]
fn kernel_picks_the_number_in_a_name_pattern() {
    isolate_network();
    let net = Net::new(config("embtpat%d", None, None)).expect("open");
    assert_eq!(net.tap_name(), "embtpat0");
    assert!(if_index(net.tap_name()) > 0);
}

#[test]
fn features_and_config_space_follow_the_config() {
    isolate_network();
    let net = Net::new(config(&tap_name(), Some(GUEST_MAC), Some(9000))).expect("open");
    assert_eq!(net.device_type(), 1);
    assert_eq!(net.queue_max_sizes(), &[QUEUE_SIZE, QUEUE_SIZE]);
    let features = net.features();
    for bit in [
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_NET_F_GUEST_UFO,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
        VIRTIO_NET_F_HOST_UFO,
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_MTU,
        VIRTIO_NET_F_MRG_RXBUF,
    ] {
        assert_ne!(features & (1u64 << bit), 0, "feature bit {bit}");
    }

    assert_eq!(net.config_size(), CONFIG_SPACE_SIZE as u64);
    let mut mac = [0u8; 6];
    net.read_config(0, &mut mac);
    assert_eq!(mac, GUEST_MAC);
    let mut mtu = [0u8; 2];
    net.read_config(10, &mut mtu);
    assert_eq!(u16::from_le_bytes(mtu), 9000);
    let mut status_pairs = [0xffu8; 4];
    net.read_config(6, &mut status_pairs);
    assert_eq!(status_pairs, [0; 4]);
    let mut beyond = [0xffu8; 4];
    net.read_config(10, &mut beyond);
    assert_eq!(beyond, [0; 4], "a read past the end reads zeroes");
    assert_eq!(net.mtu(), Some(9000));
    assert_eq!(net.guest_mac(), Some(GUEST_MAC));

    let plain = Net::new(config(&tap_name(), None, None)).expect("open");
    assert_eq!(plain.features() & (1u64 << VIRTIO_NET_F_MAC), 0);
    assert_eq!(plain.features() & (1u64 << VIRTIO_NET_F_MTU), 0);
    let mut space = [0xffu8; CONFIG_SPACE_SIZE];
    plain.read_config(0, &mut space);
    assert_eq!(space, [0; CONFIG_SPACE_SIZE]);
}

#[test]
fn config_writes_are_ignored_and_counted() {
    let mut net = new_net();
    net.write_config(0, &[1, 2, 3, 4, 5, 6]);
    let mut mac = [0u8; 6];
    net.read_config(0, &mut mac);
    assert_eq!(mac, GUEST_MAC);
    assert_eq!(net.metrics().cfg_fails.count(), 1);
}

#[test]
fn ack_features_keeps_offered_bits_and_reset_clears_them() {
    let mut net = new_net();
    net.ack_features(u64::MAX);
    assert_eq!(net.acked_features(), net.features());
    assert!(net.reset());
    assert_eq!(net.acked_features(), 0);
}

#[test]
fn offload_flags_come_from_guest_receive_features() {
    let bit = |b: u32| 1u64 << b;
    assert_eq!(tap_offload_flags(0), 0);
    assert_eq!(
        tap_offload_flags(bit(VIRTIO_NET_F_GUEST_CSUM)),
        libc::TUN_F_CSUM
    );
    assert_eq!(
        tap_offload_flags(
            bit(VIRTIO_NET_F_GUEST_CSUM)
                | bit(VIRTIO_NET_F_GUEST_TSO4)
                | bit(VIRTIO_NET_F_GUEST_TSO6)
                | bit(VIRTIO_NET_F_GUEST_UFO)
        ),
        libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_UFO
    );
    assert_eq!(
        tap_offload_flags(bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_TSO6)),
        libc::TUN_F_CSUM | libc::TUN_F_TSO6
    );
    // Segmentation without checksum offload is not valid (virtio 1.2
    // §5.1.3.1) and the TAP would refuse it.
    assert_eq!(tap_offload_flags(bit(VIRTIO_NET_F_GUEST_TSO4)), 0);
    // Transmit-side features do not concern the TAP's reader.
    assert_eq!(
        tap_offload_flags(
            bit(VIRTIO_NET_F_CSUM)
                | bit(VIRTIO_NET_F_HOST_TSO4)
                | bit(VIRTIO_NET_F_HOST_TSO6)
                | bit(VIRTIO_NET_F_HOST_UFO)
        ),
        0
    );
}

/// ethtool's view of the TAP: ETHTOOL_GTXCSUM, ETHTOOL_GTSO.
fn tap_offloads(net: &Net) -> (u32, u32) {
    const ETHTOOL_GTXCSUM: u32 = 0x16;
    const ETHTOOL_GTSO: u32 = 0x1e;
    (
        ethtool_get(net.tap_name(), ETHTOOL_GTXCSUM),
        ethtool_get(net.tap_name(), ETHTOOL_GTSO),
    )
}

#[test]
fn activation_sets_tap_offloads_from_acked_features() {
    let mut net = new_net();
    let guest = Guest::new(SMALL_QUEUE);
    assert_eq!(tap_offloads(&net), (0, 0));

    let offloads = (1u64 << VIRTIO_NET_F_GUEST_CSUM)
        | (1u64 << VIRTIO_NET_F_GUEST_TSO4)
        | (1u64 << VIRTIO_NET_F_GUEST_TSO6);
    activate(&mut net, &guest, BASE_FEATURES | offloads);
    assert_eq!(tap_offloads(&net), (1, 1));

    assert!(net.reset());
    assert_eq!(tap_offloads(&net), (0, 0));

    activate(
        &mut net,
        &guest,
        BASE_FEATURES | (1u64 << VIRTIO_NET_F_GUEST_CSUM),
    );
    assert_eq!(tap_offloads(&net), (1, 0));
    assert!(net.reset());
    activate(&mut net, &guest, BASE_FEATURES);
    assert_eq!(tap_offloads(&net), (0, 0));
}

#[test]
fn activate_checks_the_queues() {
    let mut net = new_net();
    let guest = Guest::new(SMALL_QUEUE);
    let irq: Arc<MockInterrupt> = Arc::new(MockInterrupt::default());
    let one = vec![ActiveQueue {
        index: 0,
        queue: guest.queue(Q::Rx, false),
        notify: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
    }];
    let err = net
        .activate(guest.mem.clone(), one, irq.clone())
        .unwrap_err();
    assert!(
        matches!(
            err,
            ActivateError::QueueCount {
                expected: 2,
                actual: 1
            }
        ),
        "{err:?}"
    );

    let swapped = vec![
        ActiveQueue {
            index: 1,
            queue: guest.queue(Q::Rx, false),
            notify: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        },
        ActiveQueue {
            index: 2,
            queue: guest.queue(Q::Tx, false),
            notify: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        },
    ];
    let err = net.activate(guest.mem.clone(), swapped, irq).unwrap_err();
    assert!(matches!(err, ActivateError::QueueNotReady(0)), "{err:?}");
    assert!(!net.is_activated());

    activate(&mut net, &guest, BASE_FEATURES);
    assert!(net.is_activated());
    let again = activate_err(&mut net, &guest);
    assert!(
        matches!(again, ActivateError::AlreadyActivated),
        "{again:?}"
    );
    assert_eq!(net.metrics().activate_fails.count(), 3);
}

fn activate_err(net: &mut Net, guest: &Guest) -> ActivateError {
    let queues = vec![
        ActiveQueue {
            index: 0,
            queue: guest.queue(Q::Rx, false),
            notify: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        },
        ActiveQueue {
            index: 1,
            queue: guest.queue(Q::Tx, false),
            notify: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        },
    ];
    net.activate(
        guest.mem.clone(),
        queues,
        Arc::new(MockInterrupt::default()),
    )
    .unwrap_err()
}

// ---------------------------------------------------------------------------
// Transmit.

#[test]
fn transmitted_frame_comes_out_of_the_tap() {
    let mut net = new_net();
    bring_up(net.tap_name(), true);
    let host = PacketSocket::new(if_index(net.tap_name()));
    let mut guest = Guest::new(SMALL_QUEUE);
    let act = activate(&mut net, &guest, BASE_FEATURES);

    let frame = eth_frame(HOST_MAC, GUEST_MAC, TEST_ETHERTYPE, &pattern(1000, 7));
    let head = guest.send(&frame);
    act.kick(Q::Tx);
    net.handle_tx_queue_event();

    assert_eq!(guest.take_used(Q::Tx), vec![(u32::from(head), 0)]);
    assert_eq!(
        host.recv(TEST_ETHERTYPE, TIMEOUT).as_deref(),
        Some(&frame[..])
    );
    let m = net.metrics();
    assert_eq!(m.tx_packets_count.count(), 1);
    assert_eq!(m.tx_count.count(), 1);
    assert_eq!(
        m.tx_bytes_count.count(),
        (VNET_HDR_LEN + frame.len()) as u64
    );
    assert_eq!(m.tx_spoofed_mac_count.count(), 0);
    assert_eq!(m.tx_queue_event_count.count(), 1);
    assert_eq!(act.irq.vring_count(), 1);
    // The kick was consumed.
    assert!(act.tx_kick.read().is_err());

    // Another source MAC is counted, and still sent.
    let spoofed = eth_frame(
        HOST_MAC,
        [2, 2, 2, 2, 2, 2],
        TEST_ETHERTYPE,
        &pattern(60, 1),
    );
    guest.send(&spoofed);
    net.handle_tx_queue_event();
    assert_eq!(
        host.recv(TEST_ETHERTYPE, TIMEOUT).as_deref(),
        Some(&spoofed[..])
    );
    assert_eq!(net.metrics().tx_spoofed_mac_count.count(), 1);
    assert_eq!(net.metrics().tx_packets_count.count(), 2);
}

#[test]
fn a_batch_of_frames_gets_one_interrupt() {
    let mut net = new_net();
    bring_up(net.tap_name(), true);
    let host = PacketSocket::new(if_index(net.tap_name()));
    let mut guest = Guest::new(SMALL_QUEUE);
    let act = activate(&mut net, &guest, BASE_FEATURES);

    let frames: Vec<Vec<u8>> = (0..5u8)
        .map(|i| {
            eth_frame(
                HOST_MAC,
                GUEST_MAC,
                TEST_ETHERTYPE,
                &pattern(100 + usize::from(i), i),
            )
        })
        .collect();
    for frame in &frames {
        guest.send(frame);
    }
    net.handle_tx_queue_event();
    assert_eq!(guest.take_used(Q::Tx).len(), 5);
    for frame in &frames {
        assert_eq!(
            host.recv(TEST_ETHERTYPE, TIMEOUT).as_deref(),
            Some(&frame[..])
        );
    }
    assert_eq!(act.irq.vring_count(), 1);

    // A notification with nothing to send is counted, without interrupt.
    net.handle_tx_queue_event();
    assert_eq!(net.metrics().no_tx_avail_buffer.count(), 1);
    assert_eq!(act.irq.vring_count(), 1);
}

#[test]
fn malformed_transmit_chains_are_dropped_counted_and_returned() {
    let mut net = new_net();
    bring_up(net.tap_name(), true);
    let host = PacketSocket::new(if_index(net.tap_name()));
    let mut guest = Guest::new(SMALL_QUEUE);
    let act = activate(&mut net, &guest, BASE_FEATURES);
    let frame = eth_frame(HOST_MAC, GUEST_MAC, TEST_ETHERTYPE, &pattern(200, 3));
    let buf_with_frame = |guest: &mut Guest| {
        let addr = guest.alloc(VNET_HDR_LEN + frame.len());
        guest
            .mem
            .write_slice(&frame, GuestAddress(addr + VNET_HDR_LEN as u64))
            .unwrap();
        (addr, (VNET_HDR_LEN + frame.len()) as u32)
    };

    let mut heads = Vec::new();
    // A device-writable descriptor in a transmit chain.
    let (addr, len) = buf_with_frame(&mut guest);
    heads.push(guest.add_chain(
        Q::Tx,
        &[
            (addr, 12, 0),
            (addr + 12, len - 12, VRING_DESC_F_WRITE as u16),
        ],
    ));
    // Shorter than the headers.
    let (addr, _) = buf_with_frame(&mut guest);
    heads.push(guest.add_chain(Q::Tx, &[(addr, 20, 0)]));
    // Longer than MAX_BUFFER_SIZE.
    let big = guest.alloc(80_000);
    heads.push(guest.add_chain(Q::Tx, &[(big, 40_000, 0), (big + 40_000, 40_000, 0)]));
    // A buffer running off the end of guest memory.
    heads.push(guest.add_chain(Q::Tx, &[(MEM_SIZE as u64 - 50, 100, 0)]));
    // A `next` link past the end of the descriptor table.
    let (addr, len) = buf_with_frame(&mut guest);
    let broken = guest.tx.next_desc;
    guest.tx.next_desc += 1;
    let desc = RawDescriptor::from(SplitDescriptor::new(
        addr,
        len,
        VRING_DESC_F_NEXT as u16,
        SMALL_QUEUE + 100,
    ));
    guest
        .mem
        .write_obj(desc, GuestAddress(guest.tx.desc + 16 * u64::from(broken)))
        .unwrap();
    guest.publish(Q::Tx, broken);
    heads.push(broken);
    // A head index past the end of the descriptor table: nothing can be
    // returned for it.
    guest.publish(Q::Tx, SMALL_QUEUE + 3);
    // And a good frame after all that.
    heads.push(guest.send(&frame));

    act.kick(Q::Tx);
    net.handle_tx_queue_event();

    let used = guest.take_used(Q::Tx);
    let expected: Vec<(u32, u32)> = heads.iter().map(|&h| (u32::from(h), 0)).collect();
    assert_eq!(used, expected);
    let m = net.metrics();
    assert_eq!(
        m.tx_fails.count(),
        4,
        "writable, outside memory, broken link, bad head"
    );
    assert_eq!(m.tx_malformed_frames.count(), 2, "too short, too long");
    assert_eq!(m.tx_packets_count.count(), 1);
    assert_eq!(m.event_fails.count(), 1, "the bad head cannot be used");
    assert_eq!(act.irq.vring_count(), 1);

    // Only the good frame reached the TAP.
    assert_eq!(
        host.recv(TEST_ETHERTYPE, TIMEOUT).as_deref(),
        Some(&frame[..])
    );
    assert_eq!(host.recv(TEST_ETHERTYPE, Duration::from_millis(200)), None);
}

#[test]
fn a_frame_of_max_size_is_sent_and_one_byte_more_is_not() {
    let mut net = new_net();
    let mut guest = Guest::new(SMALL_QUEUE);
    activate(&mut net, &guest, BASE_FEATURES);
    // The TAP is down: the write fails, but the chain was accepted.
    let addr = guest.alloc(MAX_BUFFER_SIZE + 1);
    guest.add_chain(Q::Tx, &[(addr, MAX_BUFFER_SIZE as u32, 0)]);
    guest.add_chain(Q::Tx, &[(addr, MAX_BUFFER_SIZE as u32 + 1, 0)]);
    net.handle_tx_queue_event();
    assert_eq!(guest.take_used(Q::Tx).len(), 2);
    let m = net.metrics();
    assert_eq!(m.tx_malformed_frames.count(), 1);
    assert_eq!(m.tx_packets_count.count() + m.tap_write_fails.count(), 1);
}

// ---------------------------------------------------------------------------
// Receive.

#[test]
fn received_frame_lands_in_guest_buffers_behind_the_header() {
    let mut net = new_net();
    bring_up(net.tap_name(), true);
    let host = PacketSocket::new(if_index(net.tap_name()));
    let mut guest = Guest::new(SMALL_QUEUE);
    let act = activate(&mut net, &guest, BASE_FEATURES);
    // The header straddles the first two descriptors.
    let buffer = guest.post_rx(&[8, 30, 2000]);
    act.kick(Q::Rx);
    net.handle_rx_queue_event();
    assert!(guest.take_used(Q::Rx).is_empty(), "no frame yet");

    let frame = eth_frame(GUEST_MAC, HOST_MAC, TEST_ETHERTYPE, &pattern(900, 9));
    host.send(&frame);
    let mut used = Vec::new();
    pump_tap(&mut net, |_| {
        used.extend(guest.take_used(Q::Rx));
        !used.is_empty()
    });

    let len = VNET_HDR_LEN + frame.len();
    assert_eq!(used, vec![(u32::from(buffer.head), len as u32)]);
    let data = buffer.contents(&guest, len);
    // flags 0, gso_type NONE, hdr_len, gso_size, csum_* all 0, num_buffers 1.
    assert_eq!(&data[..VNET_HDR_LEN], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
    assert_eq!(&data[VNET_HDR_LEN..], &frame[..]);
    let m = net.metrics();
    assert_eq!(m.rx_packets_count.count(), 1);
    assert_eq!(m.rx_count.count(), 1);
    assert_eq!(m.rx_bytes_count.count(), len as u64);
    assert_eq!(m.rx_fails.count(), 0);
    assert_eq!(act.irq.vring_count(), 1);
}

#[test]
fn frames_wait_in_the_tap_until_buffers_are_posted() {
    const FRAMES: usize = 50;
    let net = Arc::new(Mutex::new(new_net()));
    let name = net.lock().unwrap().tap_name().to_string();
    bring_up(&name, true);
    let host = PacketSocket::new(if_index(&name));
    let mut guest = Guest::new(SMALL_QUEUE);
    let mut event_manager = EventManager::<Arc<Mutex<Net>>>::new().unwrap();
    event_manager.add_subscriber(net.clone());
    let act = activate(&mut net.lock().unwrap(), &guest, BASE_FEATURES | EVENT_IDX);
    assert_eq!(
        event_manager.run_with_timeout(100).unwrap(),
        1,
        "the activation"
    );

    // A burst three times the queue size, before the guest posts anything.
    let frames: Vec<Vec<u8>> = (0..FRAMES)
        .map(|i| {
            let mut payload = (i as u32).to_be_bytes().to_vec();
            payload.extend(pattern(64 + i, i as u8));
            eth_frame(GUEST_MAC, HOST_MAC, TEST_ETHERTYPE, &payload)
        })
        .collect();
    for frame in &frames {
        host.send(frame);
    }
    let deadline = Instant::now() + Duration::from_millis(300);
    while Instant::now() < deadline {
        event_manager.run_with_timeout(50).unwrap();
    }
    assert!(guest.take_used(Q::Rx).is_empty());
    let m = net.lock().unwrap().metrics().clone();
    assert!(m.no_rx_avail_buffer.count() >= 1);
    assert!(m.rx_tap_event_count.count() >= 1);
    assert_eq!(m.rx_packets_count.count(), 0);
    // With EVENT_IDX the device asked for a notification at the next buffer.
    assert_eq!(guest.avail_event(Q::Rx), 0);

    // The guest posts a queue's worth of buffers at a time, and more as
    // used ones come back.
    let mut received = Vec::new();
    let mut posted = std::collections::VecDeque::new();
    let deadline = Instant::now() + TIMEOUT;
    while received.len() < FRAMES {
        assert!(
            Instant::now() < deadline,
            "received {} frames",
            received.len()
        );
        if posted.is_empty() {
            for _ in 0..SMALL_QUEUE {
                posted.push_back(guest.post_rx(&[2048]));
            }
            act.kick(Q::Rx);
        }
        event_manager.run_with_timeout(50).unwrap();
        for (id, len) in guest.take_used(Q::Rx) {
            let buffer: RxBuffer = posted.pop_front().expect("a posted buffer");
            assert_eq!(id, u32::from(buffer.head), "buffers are used in order");
            let data = buffer.contents(&guest, len as usize);
            received.push(data[VNET_HDR_LEN..].to_vec());
        }
    }
    assert_eq!(received, frames, "every frame, once, in order");
    assert_eq!(m.rx_packets_count.count(), FRAMES as u64);
    assert_eq!(m.rx_fails.count(), 0);
    assert!(
        act.irq.vring_count() <= FRAMES.div_ceil(usize::from(SMALL_QUEUE)) + 1,
        "one interrupt per batch, got {}",
        act.irq.vring_count()
    );
}

#[test]
fn a_frame_too_big_for_the_buffer_is_dropped_and_the_buffer_reused() {
    let mut net = new_net();
    bring_up(net.tap_name(), true);
    let host = PacketSocket::new(if_index(net.tap_name()));
    let mut guest = Guest::new(SMALL_QUEUE);
    let act = activate(&mut net, &guest, BASE_FEATURES);
    let buffer = guest.post_rx(&[(VNET_HDR_LEN + 100) as u32]);

    let big = eth_frame(GUEST_MAC, HOST_MAC, TEST_ETHERTYPE, &pattern(600, 1));
    let small = eth_frame(GUEST_MAC, HOST_MAC, TEST_ETHERTYPE, &pattern(60, 2));
    host.send(&big);
    host.send(&small);
    let mut used = Vec::new();
    pump_tap(&mut net, |_| {
        used.extend(guest.take_used(Q::Rx));
        !used.is_empty()
    });

    let len = VNET_HDR_LEN + small.len();
    assert_eq!(used, vec![(u32::from(buffer.head), len as u32)]);
    assert_eq!(&buffer.contents(&guest, len)[VNET_HDR_LEN..], &small[..]);
    let m = net.metrics();
    assert_eq!(m.rx_frames_too_big.count(), 1);
    assert_eq!(m.rx_fails.count(), 1);
    assert_eq!(m.rx_packets_count.count(), 1);
    assert_eq!(act.irq.vring_count(), 1);
}

#[test]
fn an_unusable_receive_chain_is_returned_without_losing_the_frame() {
    let mut net = new_net();
    bring_up(net.tap_name(), true);
    let host = PacketSocket::new(if_index(net.tap_name()));
    let mut guest = Guest::new(SMALL_QUEUE);
    activate(&mut net, &guest, BASE_FEATURES);
    // Device-readable, then too small, then outside memory, then good.
    let addr = guest.alloc(2048);
    let read_only = guest.add_chain(Q::Rx, &[(addr, 2048, 0)]);
    let tiny = guest.add_chain(Q::Rx, &[(addr, 20, VRING_DESC_F_WRITE as u16)]);
    let outside = guest.add_chain(
        Q::Rx,
        &[(MEM_SIZE as u64 - 100, 2048, VRING_DESC_F_WRITE as u16)],
    );
    let good = guest.post_rx(&[2048]);

    let frame = eth_frame(GUEST_MAC, HOST_MAC, TEST_ETHERTYPE, &pattern(300, 5));
    host.send(&frame);
    let mut used = Vec::new();
    pump_tap(&mut net, |_| {
        used.extend(guest.take_used(Q::Rx));
        used.len() == 4
    });
    let len = (VNET_HDR_LEN + frame.len()) as u32;
    assert_eq!(
        used,
        vec![
            (u32::from(read_only), 0),
            (u32::from(tiny), 0),
            (u32::from(outside), 0),
            (u32::from(good.head), len)
        ]
    );
    assert_eq!(
        &good.contents(&guest, len as usize)[VNET_HDR_LEN..],
        &frame[..]
    );
    assert_eq!(net.metrics().rx_fails.count(), 3);
    assert_eq!(
        guest.read(addr, 2048),
        vec![0u8; 2048],
        "nothing written to bad chains"
    );
}

#[test]
fn host_answers_an_arp_request_from_the_guest() {
    let mut net = new_net();
    let name = net.tap_name().to_string();
    set_ipv4(&name, [10, 77, 0, 1], [255, 255, 255, 0]);
    bring_up(&name, false);
    let mut guest = Guest::new(SMALL_QUEUE);
    activate(&mut net, &guest, BASE_FEATURES);
    let buffers: Vec<RxBuffer> = (0..4).map(|_| guest.post_rx(&[2048])).collect();

    // Who has 10.77.0.1? Tell 10.77.0.2 (RFC 826).
    let mut arp = Vec::new();
    arp.extend_from_slice(&1u16.to_be_bytes()); // Ethernet
    arp.extend_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    arp.extend_from_slice(&[6, 4]);
    arp.extend_from_slice(&1u16.to_be_bytes()); // request
    arp.extend_from_slice(&GUEST_MAC);
    arp.extend_from_slice(&[10, 77, 0, 2]);
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&[10, 77, 0, 1]);
    guest.send(&eth_frame([0xff; 6], GUEST_MAC, ETHERTYPE_ARP, &arp));
    net.handle_tx_queue_event();
    assert_eq!(net.metrics().tx_packets_count.count(), 1);

    let mut used = Vec::new();
    pump_tap(&mut net, |_| {
        used.extend(guest.take_used(Q::Rx));
        !used.is_empty()
    });
    let (id, len) = used[0];
    let buffer = buffers
        .iter()
        .find(|b| u32::from(b.head) == id)
        .expect("a posted buffer");
    let reply = &buffer.contents(&guest, len as usize)[VNET_HDR_LEN..];
    assert_eq!(&reply[0..6], &GUEST_MAC, "to the guest");
    assert_eq!(&reply[12..14], &ETHERTYPE_ARP.to_be_bytes());
    assert_eq!(&reply[20..22], &2u16.to_be_bytes(), "an ARP reply");
    assert_eq!(&reply[28..32], &[10, 77, 0, 1], "from the host's address");
    assert_eq!(&reply[32..38], &GUEST_MAC);
}

// ---------------------------------------------------------------------------
// Mergeable receive buffers.

/// `num_buffers` of the virtio-net header at the start of `data`.
fn num_buffers(data: &[u8]) -> u16 {
    u16::from_le_bytes([data[10], data[11]])
}

/// The bytes of `used` entries `(id, len)`, read from `buffers` by head.
fn used_bytes(guest: &Guest, buffers: &[RxBuffer], used: &[(u32, u32)]) -> Vec<u8> {
    let mut out = Vec::new();
    for &(id, len) in used {
        let buffer = buffers
            .iter()
            .find(|b| u32::from(b.head) == id)
            .expect("a posted buffer");
        out.extend(buffer.contents(guest, len as usize));
    }
    out
}

#[test]
fn a_frame_spans_several_chains_with_mrg_rxbuf() {
    let mut net = new_net();
    bring_up(net.tap_name(), true);
    let host = PacketSocket::new(if_index(net.tap_name()));
    let mut guest = Guest::new(SMALL_QUEUE);
    let act = activate(&mut net, &guest, BASE_FEATURES | MRG_RXBUF);
    // 12 + 114 = 126 bytes over chains of 50 (two descriptors), 50 and 50.
    let buffers = vec![
        guest.post_rx(&[20, 30]),
        guest.post_rx(&[50]),
        guest.post_rx(&[50]),
    ];
    let frame = eth_frame(GUEST_MAC, HOST_MAC, TEST_ETHERTYPE, &pattern(100, 3));
    host.send(&frame);
    let mut used = Vec::new();
    pump_tap(&mut net, |_| {
        used.extend(guest.take_used(Q::Rx));
        !used.is_empty()
    });
    let heads: Vec<u32> = buffers.iter().map(|b| u32::from(b.head)).collect();
    assert_eq!(
        used,
        vec![(heads[0], 50), (heads[1], 50), (heads[2], 26)],
        "three chains, used in order, the last one in part"
    );
    let data = used_bytes(&guest, &buffers, &used);
    assert_eq!(num_buffers(&data), 3);
    assert_eq!(&data[..10], &[0; 10]);
    assert_eq!(&data[VNET_HDR_LEN..], &frame[..], "the bytes in order");
    let m = net.metrics();
    assert_eq!(m.rx_packets_count.count(), 1);
    assert_eq!(m.rx_bytes_count.count(), 126);
    assert_eq!(m.rx_fails.count(), 0);
    assert_eq!(act.irq.vring_count(), 1);

    // A frame that fits one chain says so.
    let small = guest.post_rx(&[2048]);
    host.send(&frame);
    let mut used = Vec::new();
    pump_tap(&mut net, |_| {
        used.extend(guest.take_used(Q::Rx));
        !used.is_empty()
    });
    assert_eq!(used, vec![(u32::from(small.head), 126)]);
    let data = small.contents(&guest, 126);
    assert_eq!(num_buffers(&data), 1);
    assert_eq!(&data[VNET_HDR_LEN..], &frame[..]);
}

#[test]
fn without_mrg_rxbuf_a_frame_takes_one_chain_or_is_dropped() {
    let mut net = new_net();
    bring_up(net.tap_name(), true);
    let host = PacketSocket::new(if_index(net.tap_name()));
    let mut guest = Guest::new(SMALL_QUEUE);
    activate(&mut net, &guest, BASE_FEATURES | EVENT_IDX);
    let buffers = [
        guest.post_rx(&[50]),
        guest.post_rx(&[50]),
        guest.post_rx(&[50]),
    ];
    let big = eth_frame(GUEST_MAC, HOST_MAC, TEST_ETHERTYPE, &pattern(100, 3));
    let small = eth_frame(GUEST_MAC, HOST_MAC, TEST_ETHERTYPE, &pattern(20, 4));
    host.send(&big);
    host.send(&small);
    let mut used = Vec::new();
    pump_tap(&mut net, |_| {
        used.extend(guest.take_used(Q::Rx));
        !used.is_empty()
    });
    let len = VNET_HDR_LEN + small.len();
    assert_eq!(used, vec![(u32::from(buffers[0].head), len as u32)]);
    let data = buffers[0].contents(&guest, len);
    assert_eq!(num_buffers(&data), 1);
    assert_eq!(&data[VNET_HDR_LEN..], &small[..]);
    let m = net.metrics();
    assert_eq!(m.rx_frames_too_big.count(), 1);
    assert_eq!(m.rx_packets_count.count(), 1);
}

#[test]
fn with_mrg_rxbuf_too_few_buffers_defer_the_frame() {
    let mut net = new_net();
    bring_up(net.tap_name(), true);
    let host = PacketSocket::new(if_index(net.tap_name()));
    let mut guest = Guest::new(SMALL_QUEUE);
    let act = activate(&mut net, &guest, BASE_FEATURES | MRG_RXBUF | EVENT_IDX);
    let mut buffers = vec![guest.post_rx(&[50]), guest.post_rx(&[50])];
    let frame = eth_frame(GUEST_MAC, HOST_MAC, TEST_ETHERTYPE, &pattern(100, 7));
    host.send(&frame);
    pump_tap(&mut net, |net| net.metrics().no_rx_avail_buffer.count() > 0);
    assert!(
        guest.take_used(Q::Rx).is_empty(),
        "nothing delivered in part"
    );
    assert_eq!(net.metrics().rx_packets_count.count(), 0);
    assert_eq!(net.metrics().rx_fails.count(), 0);
    // The device wants a kick when the third chain arrives.
    assert_eq!(guest.avail_event(Q::Rx), 2);
    assert_eq!(act.irq.vring_count(), 0);

    buffers.push(guest.post_rx(&[50]));
    act.kick(Q::Rx);
    net.handle_rx_queue_event();
    let used = guest.take_used(Q::Rx);
    let heads: Vec<u32> = buffers.iter().map(|b| u32::from(b.head)).collect();
    assert_eq!(used, vec![(heads[0], 50), (heads[1], 50), (heads[2], 26)]);
    let data = used_bytes(&guest, &buffers, &used);
    assert_eq!(num_buffers(&data), 3);
    assert_eq!(&data[VNET_HDR_LEN..], &frame[..]);
    assert_eq!(net.metrics().rx_packets_count.count(), 1);
    assert_eq!(net.metrics().rx_fails.count(), 0);
}

#[test]
fn with_mrg_rxbuf_a_frame_larger_than_the_ring_is_dropped() {
    let mut net = new_net();
    bring_up(net.tap_name(), true);
    let host = PacketSocket::new(if_index(net.tap_name()));
    let mut guest = Guest::new(SMALL_QUEUE);
    activate(&mut net, &guest, BASE_FEATURES | MRG_RXBUF);
    // A full ring of 20-byte chains: 16 * 20 = 320 bytes.
    let buffers: Vec<RxBuffer> = (0..SMALL_QUEUE).map(|_| guest.post_rx(&[20])).collect();
    let big = eth_frame(GUEST_MAC, HOST_MAC, TEST_ETHERTYPE, &pattern(400, 1));
    let small = eth_frame(GUEST_MAC, HOST_MAC, TEST_ETHERTYPE, &pattern(30, 2));
    host.send(&big);
    host.send(&small);
    let mut used = Vec::new();
    pump_tap(&mut net, |_| {
        used.extend(guest.take_used(Q::Rx));
        !used.is_empty()
    });
    // 12 + 44 = 56 bytes: three chains, the first ones of the ring.
    let heads: Vec<u32> = buffers.iter().map(|b| u32::from(b.head)).collect();
    assert_eq!(used, vec![(heads[0], 20), (heads[1], 20), (heads[2], 16)]);
    let data = used_bytes(&guest, &buffers, &used);
    assert_eq!(num_buffers(&data), 3);
    assert_eq!(&data[VNET_HDR_LEN..], &small[..]);
    let m = net.metrics();
    assert_eq!(m.rx_frames_too_big.count(), 1);
    assert_eq!(m.rx_fails.count(), 1);
    assert_eq!(m.rx_packets_count.count(), 1);
}

#[test]
fn with_mrg_rxbuf_unusable_chains_follow_the_frame() {
    let mut net = new_net();
    bring_up(net.tap_name(), true);
    let host = PacketSocket::new(if_index(net.tap_name()));
    let mut guest = Guest::new(SMALL_QUEUE);
    activate(&mut net, &guest, BASE_FEATURES | MRG_RXBUF);
    let first = guest.post_rx(&[50]);
    // Shorter than the header: unusable with MRG_RXBUF.
    let tiny = guest.post_rx(&[8]);
    let second = guest.post_rx(&[100]);
    let frame = eth_frame(GUEST_MAC, HOST_MAC, TEST_ETHERTYPE, &pattern(100, 5));
    host.send(&frame);
    let mut used = Vec::new();
    pump_tap(&mut net, |_| {
        used.extend(guest.take_used(Q::Rx));
        !used.is_empty()
    });
    assert_eq!(
        used,
        vec![
            (u32::from(first.head), 50),
            (u32::from(second.head), 76),
            (u32::from(tiny.head), 0)
        ],
        "the frame's chains form one run"
    );
    let buffers = [first, second];
    let data = used_bytes(&guest, &buffers, &used[..2]);
    assert_eq!(num_buffers(&data), 2);
    assert_eq!(&data[VNET_HDR_LEN..], &frame[..]);
    assert_eq!(net.metrics().rx_fails.count(), 1);
    assert_eq!(guest.read(tiny.segments[0].0, 8), vec![0u8; 8]);
}

// ---------------------------------------------------------------------------
// Notification suppression.

#[test]
fn no_interrupt_flag_is_honoured_without_event_idx() {
    let mut net = new_net();
    let mut guest = Guest::new(SMALL_QUEUE);
    let act = activate(&mut net, &guest, BASE_FEATURES);
    let frame = eth_frame(HOST_MAC, GUEST_MAC, TEST_ETHERTYPE, &pattern(60, 0));

    guest.avail_flags(Q::Tx, VRING_AVAIL_F_NO_INTERRUPT as u16);
    guest.send(&frame);
    net.handle_tx_queue_event();
    assert_eq!(guest.take_used(Q::Tx).len(), 1);
    assert_eq!(act.irq.vring_count(), 0);

    guest.avail_flags(Q::Tx, 0);
    guest.send(&frame);
    net.handle_tx_queue_event();
    assert_eq!(act.irq.vring_count(), 1);
    // After draining the ring, notifications are on again.
    assert_eq!(guest.used_flags(Q::Tx), 0);
}

#[test]
fn receive_notifications_are_wanted_only_without_buffers() {
    let mut net = new_net();
    let mut guest = Guest::new(SMALL_QUEUE);
    activate(&mut net, &guest, BASE_FEATURES);
    // No buffers: the device wants to hear about new ones.
    net.handle_tap_event();
    assert_eq!(guest.used_flags(Q::Rx), 0);
    assert_eq!(net.metrics().no_rx_avail_buffer.count(), 1);
    // Buffers and nothing to receive: no notifications needed.
    guest.post_rx(&[2048]);
    net.handle_rx_queue_event();
    assert_eq!(guest.used_flags(Q::Rx), VRING_USED_F_NO_NOTIFY as u16);
    assert!(guest.take_used(Q::Rx).is_empty(), "the buffer is kept");
}

#[test]
fn event_idx_suppresses_interrupts_and_notifications() {
    let mut net = new_net();
    let mut guest = Guest::new(SMALL_QUEUE);
    let act = activate(&mut net, &guest, BASE_FEATURES | EVENT_IDX);
    let frame = eth_frame(HOST_MAC, GUEST_MAC, TEST_ETHERTYPE, &pattern(60, 0));

    // used_event 0: interrupt when the used index moves past 0.
    guest.set_used_event(Q::Tx, 0);
    guest.send(&frame);
    net.handle_tx_queue_event();
    assert_eq!(act.irq.vring_count(), 1);
    // Still 0: the next used buffer needs no interrupt.
    guest.send(&frame);
    net.handle_tx_queue_event();
    assert_eq!(act.irq.vring_count(), 1);
    // The driver asks again at used index 2.
    guest.set_used_event(Q::Tx, 2);
    guest.send(&frame);
    net.handle_tx_queue_event();
    assert_eq!(act.irq.vring_count(), 2);
    assert_eq!(guest.take_used(Q::Tx).len(), 3);
    // The device wants a notification for the next chain, at avail index 3.
    assert_eq!(guest.avail_event(Q::Tx), 3);
}

#[test]
fn event_idx_wraps_at_2_16() {
    let mut net = new_net();
    let mut guest = Guest::new(SMALL_QUEUE);
    let start = u16::MAX - 1;
    guest.start_at(Q::Tx, start);
    let act = activate(&mut net, &guest, BASE_FEATURES | EVENT_IDX);
    let frame = eth_frame(HOST_MAC, GUEST_MAC, TEST_ETHERTYPE, &pattern(60, 0));

    // Interrupt when the used index passes 65535, that is at 0.
    guest.set_used_event(Q::Tx, u16::MAX);
    guest.send(&frame);
    net.handle_tx_queue_event(); // used 65534 -> 65535
    assert_eq!(act.irq.vring_count(), 0);
    assert_eq!(guest.avail_event(Q::Tx), u16::MAX);
    guest.send(&frame);
    net.handle_tx_queue_event(); // 65535 -> 0: passes 65535
    assert_eq!(act.irq.vring_count(), 1);
    assert_eq!(guest.avail_event(Q::Tx), 0);
    guest.send(&frame);
    net.handle_tx_queue_event(); // 0 -> 1
    assert_eq!(act.irq.vring_count(), 1);
    assert_eq!(guest.avail_event(Q::Tx), 1);
    assert_eq!(guest.take_used(Q::Tx).len(), 3);
}

// ---------------------------------------------------------------------------
// Event loop and transport.

#[test]
fn event_loop_follows_activation_and_reset() {
    let net = Arc::new(Mutex::new(new_net()));
    let name = net.lock().unwrap().tap_name().to_string();
    bring_up(&name, true);
    let host = PacketSocket::new(if_index(&name));
    let mut guest = Guest::new(SMALL_QUEUE);
    let mut event_manager = EventManager::<Arc<Mutex<Net>>>::new().unwrap();
    event_manager.add_subscriber(net.clone());
    assert_eq!(event_manager.run_with_timeout(0).unwrap(), 0);

    // Before activation nothing but the control EventFd is watched.
    let frame = eth_frame(HOST_MAC, GUEST_MAC, TEST_ETHERTYPE, &pattern(80, 4));
    guest.send(&frame);
    let act = activate(&mut net.lock().unwrap(), &guest, BASE_FEATURES);
    act.kick(Q::Tx);
    // The activation, then the kick that was already pending.
    assert_eq!(event_manager.run_with_timeout(100).unwrap(), 1);
    assert_eq!(event_manager.run_with_timeout(100).unwrap(), 1);
    assert_eq!(guest.take_used(Q::Tx).len(), 1);
    assert_eq!(
        host.recv(TEST_ETHERTYPE, TIMEOUT).as_deref(),
        Some(&frame[..])
    );

    // After a reset the queues and the TAP are not watched any more.
    assert!(net.lock().unwrap().reset());
    assert_eq!(event_manager.run_with_timeout(100).unwrap(), 1);
    act.kick(Q::Tx);
    host.send(&eth_frame(
        GUEST_MAC,
        HOST_MAC,
        TEST_ETHERTYPE,
        &pattern(60, 0),
    ));
    assert_eq!(event_manager.run_with_timeout(100).unwrap(), 0);

    // A new activation works with new notification EventFds, and the frame
    // that waited in the TAP is received.
    let mut guest = Guest::new(SMALL_QUEUE);
    let act = activate(&mut net.lock().unwrap(), &guest, BASE_FEATURES);
    let buffer = guest.post_rx(&[2048]);
    act.kick(Q::Rx);
    let deadline = Instant::now() + TIMEOUT;
    let mut used = Vec::new();
    while used.is_empty() {
        assert!(Instant::now() < deadline, "timed out");
        event_manager.run_with_timeout(50).unwrap();
        used.extend(guest.take_used(Q::Rx));
    }
    assert_eq!(used[0].0, u32::from(buffer.head));
    assert_eq!(net.lock().unwrap().metrics().event_fails.count(), 0);
}

#[test]
fn driven_through_the_mmio_transport() {
    let net = Arc::new(Mutex::new(new_net()));
    let name = net.lock().unwrap().tap_name().to_string();
    bring_up(&name, true);
    let host = PacketSocket::new(if_index(&name));
    let mut guest = Guest::new(SMALL_QUEUE);
    let mut event_manager = EventManager::<Arc<Mutex<Net>>>::new().unwrap();
    event_manager.add_subscriber(net.clone());

    let irq_evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let device: Arc<Mutex<dyn VirtioDevice>> = net.clone();
    let mut transport =
        MmioTransport::new(guest.mem.clone(), device, irq_evt.try_clone().unwrap()).unwrap();
    let features = BASE_FEATURES | EVENT_IDX | (1u64 << VIRTIO_NET_F_MAC);
    let status = initialize(
        &mut transport,
        features,
        &[guest.layout(Q::Rx), guest.layout(Q::Tx)],
    );
    assert_ne!(status & VIRTIO_CONFIG_S_DRIVER_OK, 0, "status {status:#x}");
    assert_eq!(net.lock().unwrap().acked_features(), features);
    assert!(net.lock().unwrap().is_activated());
    assert_eq!(
        event_manager.run_with_timeout(100).unwrap(),
        1,
        "the activation"
    );

    // Transmit, notified through the QueueNotify register.
    let frame = eth_frame(HOST_MAC, GUEST_MAC, TEST_ETHERTYPE, &pattern(500, 8));
    guest.send(&frame);
    transport.write(0, NOTIFY_REG_OFFSET, &1u32.to_le_bytes());
    assert_eq!(event_manager.run_with_timeout(100).unwrap(), 1);
    assert_eq!(guest.take_used(Q::Tx).len(), 1);
    assert_eq!(
        host.recv(TEST_ETHERTYPE, TIMEOUT).as_deref(),
        Some(&frame[..])
    );
    assert_eq!(irq_evt.read().unwrap(), 1);
    assert_eq!(
        read_reg(&mut transport, u64::from(VIRTIO_MMIO_INTERRUPT_STATUS)) & 1,
        1
    );

    // Receive.
    let buffer = guest.post_rx(&[2048]);
    transport.write(0, NOTIFY_REG_OFFSET, &0u32.to_le_bytes());
    let incoming = eth_frame(GUEST_MAC, HOST_MAC, TEST_ETHERTYPE, &pattern(700, 6));
    host.send(&incoming);
    let deadline = Instant::now() + TIMEOUT;
    let mut used = Vec::new();
    while used.is_empty() {
        assert!(Instant::now() < deadline, "timed out");
        event_manager.run_with_timeout(50).unwrap();
        used.extend(guest.take_used(Q::Rx));
    }
    let len = VNET_HDR_LEN + incoming.len();
    assert_eq!(used, vec![(u32::from(buffer.head), len as u32)]);
    assert_eq!(&buffer.contents(&guest, len)[VNET_HDR_LEN..], &incoming[..]);

    // Reset through the Status register.
    transport.write(
        0,
        u64::from(virtio_bindings::virtio_mmio::VIRTIO_MMIO_STATUS),
        &[0; 4],
    );
    assert!(!net.lock().unwrap().is_activated());
    assert_eq!(event_manager.run_with_timeout(100).unwrap(), 1);
    assert_eq!(net.lock().unwrap().metrics().event_fails.count(), 0);
}

#[test]
fn state_round_trip() {
    isolate_network();
    let mut net = Net::new(config(&tap_name(), Some(GUEST_MAC), Some(9000))).expect("open");
    let accepted = BASE_FEATURES
        | (1u64 << VIRTIO_NET_F_MAC)
        | (1u64 << VIRTIO_NET_F_GUEST_CSUM)
        | (1u64 << VIRTIO_NET_F_GUEST_TSO4);
    net.ack_features(accepted);
    let saved = Persist::save(&net);
    assert_eq!(saved.acked_features, accepted);
    assert_eq!(saved.guest_mac, Some(GUEST_MAC));
    assert_eq!(saved.mtu, Some(9000));
    let text = serde_json::to_string(&saved).unwrap();
    let state: crate::NetState = serde_json::from_str(&text).unwrap();

    // Another TAP: its name is the host's business, not the guest's.
    let mut fresh = Net::new(config(&tap_name(), Some(GUEST_MAC), Some(9000))).expect("open");
    Persist::restore(&mut fresh, &state).unwrap();
    assert_eq!(fresh.save(), saved);
    assert_eq!(fresh.acked_features(), net.acked_features());
    assert_eq!(fresh.features(), net.features());
    let space = |net: &Net| {
        let mut space = [0u8; CONFIG_SPACE_SIZE];
        net.read_config(0, &mut space);
        space
    };
    assert_eq!(space(&fresh), space(&net));

    // Reactivated with the restored features, the TAP gets the offloads
    // the driver negotiated.
    let guest = Guest::new(SMALL_QUEUE);
    activate(&mut fresh, &guest, state.acked_features);
    assert_eq!(tap_offloads(&fresh), (1, 1));
}

#[test]
fn hostile_states_are_refused() {
    use crate::{NetState, NetStateError};

    isolate_network();
    let mut net = Net::new(config(&tap_name(), Some(GUEST_MAC), None)).expect("open");
    let good = net.save();
    let offered = net.features();

    let unoffered = NetState {
        acked_features: BASE_FEATURES | (1u64 << VIRTIO_NET_F_CTRL_VQ),
        ..good.clone()
    };
    assert!(matches!(
        net.restore(&unoffered),
        Err(NetStateError::Features { acked, offered: o })
            if acked == unoffered.acked_features && o == offered
    ));
    let legacy = NetState {
        acked_features: 1u64 << VIRTIO_NET_F_MAC,
        ..good.clone()
    };
    assert!(matches!(
        net.restore(&legacy),
        Err(NetStateError::Features { .. })
    ));
    let other_mac = NetState {
        guest_mac: Some(HOST_MAC),
        ..good.clone()
    };
    assert!(matches!(
        net.restore(&other_mac),
        Err(NetStateError::Mac {
            state: Some(HOST_MAC),
            device: Some(GUEST_MAC)
        })
    ));
    let no_mac = NetState {
        guest_mac: None,
        ..good.clone()
    };
    assert!(matches!(
        net.restore(&no_mac),
        Err(NetStateError::Mac { state: None, .. })
    ));
    let mtu = NetState {
        mtu: Some(1500),
        ..good.clone()
    };
    assert!(matches!(
        net.restore(&mtu),
        Err(NetStateError::Mtu {
            state: Some(1500),
            device: None
        })
    ));
    assert_eq!(net.save(), good, "a refused state changed the device");

    // A running device is not restored into.
    let guest = Guest::new(SMALL_QUEUE);
    activate(&mut net, &guest, BASE_FEATURES);
    assert!(matches!(net.restore(&good), Err(NetStateError::InUse)));
}

// ---------------------------------------------------------------------------
// Rate limiters.

fn limited_net(rx: RateLimiterConfig, tx: RateLimiterConfig) -> Net {
    isolate_network();
    let mut c = config(&tap_name(), Some(GUEST_MAC), None);
    c.rx_rate_limiter = rx;
    c.tx_rate_limiter = tx;
    Net::new(c).expect("create the network device")
}

fn bucket(size: u64, refill_time_ms: u64) -> Option<BucketSpec> {
    Some(BucketSpec {
        size,
        one_time_burst: 0,
        refill_time_ms,
    })
}

#[test]
fn transmit_ops_limit_holds_frames_until_the_timer() {
    // Two frames per 100 ms.
    let tx = RateLimiterConfig {
        bandwidth: None,
        ops: bucket(2, 100),
    };
    let mut net = limited_net(RateLimiterConfig::default(), tx);
    bring_up(net.tap_name(), true);
    let host = PacketSocket::new(if_index(net.tap_name()));
    let mut guest = Guest::new(SMALL_QUEUE);
    let act = activate(&mut net, &guest, BASE_FEATURES);
    let frames: Vec<Vec<u8>> = (0..5u8)
        .map(|i| eth_frame(HOST_MAC, GUEST_MAC, TEST_ETHERTYPE, &pattern(200, i)))
        .collect();
    let start = Instant::now();
    for frame in &frames {
        guest.send(frame);
    }
    act.kick(Q::Tx);
    net.handle_tx_queue_event();
    let mut used = guest.take_used(Q::Tx);
    assert_eq!(used.len(), 2);
    assert!(net.tx_rate_limiter().is_blocked());
    // A kick while blocked sends nothing.
    net.handle_tx_queue_event();
    assert!(guest.take_used(Q::Tx).is_empty());
    while used.len() < frames.len() {
        assert!(start.elapsed() < TIMEOUT);
        assert!(wait_readable(net.tx_rate_limiter_fd(), TIMEOUT));
        net.handle_tx_rate_limiter_event();
        used.extend(guest.take_used(Q::Tx));
    }
    // Three frames beyond the bucket: 150 ms of refill.
    assert!(start.elapsed() >= Duration::from_millis(145));
    for frame in &frames {
        assert_eq!(
            host.recv(TEST_ETHERTYPE, TIMEOUT).as_deref(),
            Some(&frame[..]),
            "every frame, once, in order"
        );
    }
    let m = net.metrics();
    assert_eq!(m.tx_packets_count.count(), 5);
    assert!(m.tx_rate_limiter_throttled.count() >= 2);
    assert!(m.tx_rate_limiter_event_count.count() >= 1);
}

fn receive_is_paced_by_the_bandwidth_limit(features: u64) {
    const FRAMES: usize = 10;
    // 10 KiB per 100 ms, the first 10 KiB at once.
    let rx = RateLimiterConfig {
        bandwidth: bucket(10 * 1024, 100),
        ops: None,
    };
    let net = Arc::new(Mutex::new(limited_net(rx, RateLimiterConfig::default())));
    let name = net.lock().unwrap().tap_name().to_string();
    bring_up(&name, true);
    let host = PacketSocket::new(if_index(&name));
    let mut guest = Guest::new(SMALL_QUEUE);
    let mut event_manager = EventManager::<Arc<Mutex<Net>>>::new().unwrap();
    event_manager.add_subscriber(net.clone());
    let act = activate(&mut net.lock().unwrap(), &guest, features);
    event_manager.run_with_timeout(100).unwrap();
    let mut posted = std::collections::VecDeque::new();
    for _ in 0..SMALL_QUEUE {
        posted.push_back(guest.post_rx(&[2048]));
    }
    act.kick(Q::Rx);
    event_manager.run_with_timeout(50).unwrap();

    let frames: Vec<Vec<u8>> = (0..FRAMES)
        .map(|i| {
            let mut payload = (i as u32).to_be_bytes().to_vec();
            payload.extend(pattern(1400, i as u8));
            eth_frame(GUEST_MAC, HOST_MAC, TEST_ETHERTYPE, &payload)
        })
        .collect();
    let start = Instant::now();
    for frame in &frames {
        host.send(frame);
    }
    let mut received = Vec::new();
    while received.len() < FRAMES {
        assert!(start.elapsed() < TIMEOUT, "received {}", received.len());
        event_manager.run_with_timeout(50).unwrap();
        for (id, len) in guest.take_used(Q::Rx) {
            let buffer: RxBuffer = posted.pop_front().expect("a posted buffer");
            assert_eq!(id, u32::from(buffer.head));
            let data = buffer.contents(&guest, len as usize);
            received.push(data[VNET_HDR_LEN..].to_vec());
        }
    }
    let elapsed = start.elapsed();
    assert_eq!(received, frames, "every frame, once, in order");
    // About 14.3 KiB in all, 10 KiB at once: at least 40 ms of refill.
    let total: usize = frames.iter().map(|f| f.len() + VNET_HDR_LEN).sum();
    let floor = Duration::from_micros(((total - 10 * 1024) as u64 * 100_000) / (10 * 1024));
    assert!(elapsed >= floor, "{elapsed:?} < {floor:?}");
    let m = net.lock().unwrap().metrics().clone();
    assert!(m.rx_rate_limiter_throttled.count() >= 1);
    assert!(m.rx_event_rate_limiter_count.count() >= 1);
    assert_eq!(m.rx_fails.count(), 0);
}

#[test]
fn receive_bandwidth_limit_paces_frames_in_order() {
    receive_is_paced_by_the_bandwidth_limit(BASE_FEATURES);
}

#[test]
fn receive_bandwidth_limit_paces_merged_frames_in_order() {
    receive_is_paced_by_the_bandwidth_limit(BASE_FEATURES | MRG_RXBUF | EVENT_IDX);
}

#[test]
fn rate_limiter_updates_reach_a_live_device() {
    let mut net = limited_net(RateLimiterConfig::default(), RateLimiterConfig::default());
    net.update_rate_limiters(
        BucketUpdate::Update(bucket(1000, 100).unwrap()),
        BucketUpdate::None,
        BucketUpdate::None,
        BucketUpdate::Update(bucket(5, 100).unwrap()),
    );
    assert_eq!(net.config().rx_rate_limiter.bandwidth, bucket(1000, 100));
    assert_eq!(net.config().tx_rate_limiter.ops, bucket(5, 100));
    assert!(!net.rx_rate_limiter().is_unlimited());
    net.update_rate_limiters(
        BucketUpdate::Disabled,
        BucketUpdate::None,
        BucketUpdate::None,
        BucketUpdate::Disabled,
    );
    assert!(net.rx_rate_limiter().is_unlimited());
    assert!(net.tx_rate_limiter().is_unlimited());
    assert_eq!(net.config().rx_rate_limiter, RateLimiterConfig::default());
}

// ---------------------------------------------------------------------------
// The metadata service.

/// A frame to the metadata service: ARP for its address, then a TCP SYN.
fn mmds_arp_request() -> Vec<u8> {
    let mut arp = Vec::new();
    arp.extend_from_slice(&1u16.to_be_bytes());
    arp.extend_from_slice(&0x0800u16.to_be_bytes());
    arp.extend_from_slice(&[6, 4]);
    arp.extend_from_slice(&1u16.to_be_bytes());
    arp.extend_from_slice(&GUEST_MAC);
    arp.extend_from_slice(&[172, 16, 0, 2]);
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&[169, 254, 169, 254]);
    eth_frame([0xff; 6], GUEST_MAC, ETHERTYPE_ARP, &arp)
}

fn mmds_syn() -> Vec<u8> {
    use ember_mmds::pdu::{write_ipv4_header, TcpSegment, PROTOCOL_TCP, SYN};
    let src = std::net::Ipv4Addr::new(172, 16, 0, 2);
    let dst = ember_mmds::DEFAULT_IPV4_ADDR;
    let mut ip = vec![0u8; 60];
    let seg = TcpSegment {
        src_port: 40000,
        dst_port: 80,
        seq: 100,
        ack: 0,
        flags: SYN,
        window: 8192,
        mss: Some(1460),
        payload: &[],
    };
    let len = seg.write(&mut ip[20..], src, dst).unwrap();
    write_ipv4_header(&mut ip, src, dst, PROTOCOL_TCP, len).unwrap();
    ip.truncate(20 + len);
    eth_frame(ember_mmds::DEFAULT_MAC_ADDR, GUEST_MAC, 0x0800, &ip)
}

fn mmds_frames_are_answered_in_guest_memory(features: u64) {
    let mut net = new_net();
    bring_up(net.tap_name(), true);
    let host = PacketSocket::new(if_index(net.tap_name()));
    let mmds = Arc::new(Mutex::new(ember_mmds::Mmds::default()));
    let metrics = Arc::new(ember_mmds::MmdsMetrics::default());
    net.set_mmds_stack(Some(ember_mmds::MmdsNetworkStack::new(
        None,
        mmds,
        metrics.clone(),
    )));
    let mut guest = Guest::new(SMALL_QUEUE);
    let act = activate(&mut net, &guest, features);
    let buffers: Vec<RxBuffer> = (0..4).map(|_| guest.post_rx(&[2048])).collect();
    let reply_of = |guest: &Guest, (id, len): (u32, u32)| {
        let b = buffers
            .iter()
            .find(|b| u32::from(b.head) == id)
            .expect("a posted buffer");
        b.contents(guest, len as usize)
    };

    // ARP: answered by the device, before any TAP read.
    guest.send(&mmds_arp_request());
    act.kick(Q::Tx);
    net.handle_tx_queue_event();
    let used = guest.take_used(Q::Rx);
    assert_eq!(used.len(), 1, "one ARP reply delivered");
    let reply = reply_of(&guest, used[0]);
    assert_eq!(&reply[..VNET_HDR_LEN - 2], &[0u8; 10], "no offload flags");
    assert_eq!(num_buffers(&reply), 1);
    let reply = &reply[VNET_HDR_LEN..];
    assert_eq!(reply.len(), 42);
    assert_eq!(&reply[0..6], &GUEST_MAC);
    assert_eq!(&reply[6..12], &ember_mmds::DEFAULT_MAC_ADDR);
    assert_eq!(&reply[20..22], &2u16.to_be_bytes(), "an ARP reply");
    assert_eq!(&reply[28..32], &[169, 254, 169, 254]);
    assert!(act.irq.vring_count() >= 2, "TX and RX interrupts");

    // A SYN: the SYN-ACK comes back.
    guest.send(&mmds_syn());
    net.handle_tx_queue_event();
    let used = guest.take_used(Q::Rx);
    assert_eq!(used.len(), 1);
    let synack = &reply_of(&guest, used[0])[VNET_HDR_LEN..];
    assert_eq!(&synack[12..14], &0x0800u16.to_be_bytes());
    let tcp = ember_mmds::pdu::TcpSegment::parse(&synack[34..]).unwrap();
    assert_eq!((tcp.src_port, tcp.dst_port, tcp.ack), (80, 40000, 101));
    assert_eq!(tcp.flags, ember_mmds::pdu::SYN | ember_mmds::pdu::ACK);

    // Neither reached the TAP; other traffic still does.
    assert_eq!(net.metrics().tx_packets_count.count(), 0);
    let other = eth_frame(HOST_MAC, GUEST_MAC, TEST_ETHERTYPE, &pattern(100, 3));
    guest.send(&other);
    net.handle_tx_queue_event();
    assert_eq!(
        host.recv(TEST_ETHERTYPE, TIMEOUT).as_deref(),
        Some(&other[..])
    );
    assert_eq!(host.recv(ETHERTYPE_ARP, Duration::from_millis(50)), None);
    assert_eq!(host.recv(0x0800, Duration::from_millis(50)), None);
    assert_eq!(net.metrics().tx_packets_count.count(), 1);
    assert_eq!(metrics.rx_accepted.count(), 2);
    assert_eq!(metrics.tx_frames.count(), 2);
    assert_eq!(metrics.tx_bytes.count(), 42 + synack.len() as u64);
    assert_eq!(metrics.connections_created.count(), 1);
    assert_eq!(net.metrics().rx_packets_count.count(), 2);
}

#[test]
fn mmds_frames_are_answered_and_never_reach_the_tap() {
    mmds_frames_are_answered_in_guest_memory(BASE_FEATURES);
}

#[test]
fn mmds_frames_are_answered_with_mergeable_buffers() {
    mmds_frames_are_answered_in_guest_memory(BASE_FEATURES | MRG_RXBUF | EVENT_IDX);
}

#[test]
fn without_mmds_frames_to_its_address_go_to_the_tap() {
    let mut net = new_net();
    bring_up(net.tap_name(), true);
    let host = PacketSocket::new(if_index(net.tap_name()));
    let mut guest = Guest::new(SMALL_QUEUE);
    let act = activate(&mut net, &guest, BASE_FEATURES);
    guest.send(&mmds_arp_request());
    act.kick(Q::Tx);
    net.handle_tx_queue_event();
    assert_eq!(
        host.recv(ETHERTYPE_ARP, TIMEOUT).as_deref(),
        Some(&mmds_arp_request()[..])
    );
}

#[test]
fn mmds_frames_are_not_charged_to_the_transmit_limiter() {
    isolate_network();
    let mut cfg = config(&tap_name(), Some(GUEST_MAC), None);
    // One frame, then nothing for a long time.
    cfg.tx_rate_limiter = RateLimiterConfig {
        bandwidth: None,
        ops: Some(BucketSpec {
            size: 1,
            one_time_burst: 0,
            refill_time_ms: 1_000_000,
        }),
    };
    let mut net = Net::new(cfg).expect("device");
    let metrics = Arc::new(ember_mmds::MmdsMetrics::default());
    net.set_mmds_stack(Some(ember_mmds::MmdsNetworkStack::new(
        None,
        Arc::new(Mutex::new(ember_mmds::Mmds::default())),
        metrics.clone(),
    )));
    let mut guest = Guest::new(SMALL_QUEUE);
    activate(&mut net, &guest, BASE_FEATURES);
    for _ in 0..3 {
        guest.post_rx(&[2048]);
        guest.send(&mmds_arp_request());
    }
    net.handle_tx_queue_event();
    assert_eq!(guest.take_used(Q::Tx).len(), 3);
    assert_eq!(metrics.rx_accepted.count(), 3);
    assert_eq!(net.metrics().tx_rate_limiter_throttled.count(), 0);
}

#[test]
fn mmds_answers_go_through_the_receive_limiter() {
    isolate_network();
    let mut cfg = config(&tap_name(), Some(GUEST_MAC), None);
    // One frame for the guest, then nothing for a long time.
    cfg.rx_rate_limiter = RateLimiterConfig {
        bandwidth: None,
        ops: Some(BucketSpec {
            size: 1,
            one_time_burst: 0,
            refill_time_ms: 1_000_000,
        }),
    };
    let mut net = Net::new(cfg).expect("device");
    let metrics = Arc::new(ember_mmds::MmdsMetrics::default());
    net.set_mmds_stack(Some(ember_mmds::MmdsNetworkStack::new(
        None,
        Arc::new(Mutex::new(ember_mmds::Mmds::default())),
        metrics.clone(),
    )));
    let mut guest = Guest::new(SMALL_QUEUE);
    activate(&mut net, &guest, BASE_FEATURES);
    for _ in 0..4 {
        guest.post_rx(&[2048]);
    }
    guest.send(&mmds_arp_request());
    guest.send(&mmds_syn());
    net.handle_tx_queue_event();
    // The ARP reply got the one token; the SYN-ACK waits for the limiter.
    assert_eq!(guest.take_used(Q::Rx).len(), 1);
    assert!(net.metrics().rx_rate_limiter_throttled.count() > 0);
    assert_eq!(metrics.rx_accepted.count(), 2);
    assert_eq!(net.metrics().rx_packets_count.count(), 1);
}
