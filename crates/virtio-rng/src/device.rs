// SPDX-License-Identifier: Apache-2.0

//! The entropy device: requests parsed from descriptor chains, filled from
//! the host's `getrandom(2)` (directly, or through a ChaCha20 key it gives
//! for each larger request), paced by the rate limiter.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use ember_rate_limiter::{RateLimiter, TokenType};
use ember_virtio::{
    drain_eventfd, needs_interrupt, pop_or_enable_notification, take_queues, ActivateError,
    ActiveQueue, InterruptKind, Registrations, VirtioConfig, VirtioDevice, VirtioInterrupt,
};
use log::{debug, error};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::metrics::EntropyMetrics;
use crate::{EntropyConfig, Error, MAX_REQUEST_BYTES, QUEUE_SIZE};

/// Why a descriptor chain is not a request the device serves. The chain
/// goes back to the driver with nothing written (used length 0).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// A descriptor the device may only read: an entropy request is made of
    /// device-writable buffers only (virtio 1.2 §5.4.6.1).
    #[error("descriptor {position} of the chain ({addr:#x}, {len} bytes) is not device-writable")]
    ReadOnly {
        /// Position of the descriptor in the chain (0 is the head).
        position: usize,
        /// Its guest address.
        addr: u64,
        /// Its length.
        len: u32,
    },
    /// A buffer that is not entirely guest memory.
    #[error("descriptor {position} of the chain ({addr:#x}, {len} bytes) is outside guest memory")]
    OutsideMemory {
        /// Position of the descriptor in the chain (0 is the head).
        position: usize,
        /// Its guest address.
        addr: u64,
        /// Its length.
        len: u32,
    },
}

/// One guest request for random bytes: where they go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    segments: Vec<(GuestAddress, u32)>,
    len: u32,
}

impl Request {
    /// Reads a chain as an entropy request: every descriptor must be
    /// device-writable and inside guest memory (all are checked). The
    /// request covers the chain's buffers in order up to
    /// [`MAX_REQUEST_BYTES`].
    ///
    /// The work is bounded by the chain, which virtio-queue ends after the
    /// queue size (or an indirect table's entries), descriptor loops
    /// included.
    pub fn parse(
        chain: DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
    ) -> Result<Request, ChainError> {
        let mut segments = Vec::new();
        let mut len = 0u32;
        for (position, desc) in chain.enumerate() {
            let (addr, dlen) = (desc.addr(), desc.len());
            if !desc.is_write_only() {
                return Err(ChainError::ReadOnly {
                    position,
                    addr: addr.0,
                    len: dlen,
                });
            }
            if !GuestMemoryBackend::check_range(mem, addr, dlen as usize) {
                return Err(ChainError::OutsideMemory {
                    position,
                    addr: addr.0,
                    len: dlen,
                });
            }
            let take = dlen.min(MAX_REQUEST_BYTES - len);
            if take > 0 {
                segments.push((addr, take));
                len += take;
            }
        }
        Ok(Request { segments, len })
    }

    /// Bytes the request gets: the chain's length, at most
    /// [`MAX_REQUEST_BYTES`].
    pub fn len(&self) -> u32 {
        self.len
    }

    /// Whether the request gets no bytes (its buffers are empty).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The guest buffers the bytes go to, in order, as (address, length).
    pub fn segments(&self) -> &[(GuestAddress, u32)] {
        &self.segments
    }

    /// Fills the buffers with random bytes from the host, using `scratch`
    /// as the staging buffer; returns the bytes written to guest memory.
    /// See [`random_bytes`] for where the bytes come from.
    ///
    /// Nothing is written when the host cannot give random bytes.
    pub fn fill(&self, mem: &GuestMemoryMmap, scratch: &mut Vec<u8>) -> io::Result<u32> {
        let len = self.len as usize;
        scratch.resize(len, 0);
        random_bytes(&mut scratch[..len])?;
        let mut written = 0usize;
        for &(addr, seg) in &self.segments {
            let seg = seg as usize;
            // Checked when parsed; the memory map does not change while the
            // device runs.
            mem.write_slice(&scratch[written..written + seg], addr)
                .map_err(io::Error::other)?;
            written += seg;
        }
        // Random bytes are not kept on the host longer than needed.
        scratch[..len].fill(0);
        Ok(written as u32)
    }
}

/// Requests up to this many bytes are filled by `getrandom(2)` itself.
pub const DIRECT_MAX_BYTES: usize = 256;

/// Fills `buf` with random bytes from the host. Up to [`DIRECT_MAX_BYTES`],
/// straight from `getrandom(2)`; a larger buffer gets the ChaCha20
/// keystream under a fresh 256-bit key from `getrandom(2)`, which is how
/// the kernel's own generator expands its key (each request has its own
/// key, dropped once the request is filled). The kernel's `getrandom(2)`
/// gives about 330 MiB/s on a typical host, well below what a guest reading
/// 64 KiB requests can take; the keystream is several times faster.
pub fn random_bytes(buf: &mut [u8]) -> io::Result<()> {
    if buf.len() <= DIRECT_MAX_BYTES {
        return getrandom(buf);
    }
    let mut key = [0u8; 32];
    getrandom(&mut key)?;
    let mut rng = ChaCha20Rng::from_seed(key);
    key.fill(0);
    rng.fill_bytes(buf);
    Ok(())
}

/// Fills `buf` from the kernel's random number generator (the urandom
/// source, which blocks only until it is first initialized).
fn getrandom(mut buf: &mut [u8]) -> io::Result<()> {
    while !buf.is_empty() {
        // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`,
        // which is valid for writes of that length.
        let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        // 0 < n <= buf.len(): a request over 256 bytes may be cut short by
        // a signal.
        buf = &mut buf[n as usize..];
    }
    Ok(())
}

/// What the device did with one chain, for the fuzz target and tests:
/// parses it, asks the limiter, fills it. `None` when the limiter refused
/// (the caller gives the chain back); otherwise the used length.
pub fn fill_chain(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    limiter: &mut RateLimiter,
    scratch: &mut Vec<u8>,
    metrics: &EntropyMetrics,
) -> Option<u32> {
    metrics.entropy_event_count.inc();
    let request = match Request::parse(chain, mem) {
        Ok(request) => request,
        Err(e) => {
            metrics.entropy_event_fails.inc();
            // Debug level only, so that a guest cannot flood the log.
            debug!("virtio-rng: invalid request: {e}");
            return Some(0);
        }
    };
    if !limiter.is_unlimited() && !admit(limiter, request.len()) {
        metrics.entropy_rate_limiter_throttled.inc();
        return None;
    }
    if request.is_empty() {
        return Some(0);
    }
    match request.fill(mem, scratch) {
        Ok(n) => {
            metrics.entropy_bytes.add(u64::from(n));
            Some(n)
        }
        Err(e) => {
            metrics.host_rng_fails.inc();
            metrics.entropy_event_fails.inc();
            error!("virtio-rng: cannot get random bytes: {e}");
            Some(0)
        }
    }
}

/// Takes one operation and the request's bytes, as Firecracker does; `false`
/// (and nothing taken) when the request must wait.
///
/// Firecracker charges the whole chain length while it writes at most
/// [`MAX_REQUEST_BYTES`]; the bytes charged here are the bytes written. The
/// two differ only for chains longer than the cap.
fn admit(limiter: &mut RateLimiter, bytes: u32) -> bool {
    if !limiter.consume(1, TokenType::Ops) {
        return false;
    }
    if !limiter.consume(u64::from(bytes), TokenType::Bytes) {
        limiter.manual_replenish(1, TokenType::Ops);
        return false;
    }
    true
}

/// What an activated device holds.
pub(crate) struct Active {
    mem: GuestMemoryMmap,
    queue: Queue,
    pub(crate) notify: EventFd,
    interrupt: Arc<dyn VirtioInterrupt>,
}

/// A virtio entropy device (virtio 1.2 §5.4).
pub struct Entropy {
    config: EntropyConfig,
    pub(crate) virtio: VirtioConfig,
    metrics: Arc<EntropyMetrics>,
    limiter: RateLimiter,
    /// Staging buffer for random bytes, at most [`MAX_REQUEST_BYTES`].
    scratch: Vec<u8>,
    pub(crate) active: Option<Active>,
    /// Signalled at activation and reset, so that the event loop starts or
    /// stops watching the queue.
    pub(crate) control_evt: EventFd,
    /// Whether the device was added to an event loop.
    pub(crate) subscribed: bool,
    /// What the event loop watches for the current activation, and the
    /// notify EventFds of a previous one until it has stopped watching them.
    pub(crate) registrations: Registrations,
}

impl std::fmt::Debug for Entropy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entropy")
            .field("config", &self.config)
            .field("avail_features", &self.virtio.avail_features())
            .field("acked_features", &self.virtio.acked_features())
            .field("activated", &self.active.is_some())
            .field("rate_limiter", &self.limiter)
            .finish_non_exhaustive()
    }
}

impl Entropy {
    /// An entropy device with the given rate limiter.
    pub fn new(config: &EntropyConfig) -> Result<Entropy, Error> {
        let control_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?;
        let limiter = config.rate_limiter.build().map_err(Error::RateLimiter)?;
        // VIRTIO_RING_F_EVENT_IDX as the other devices offer it; virtio-rng
        // has no feature bits of its own and no configuration space
        // (virtio 1.2 §5.4.3, §5.4.4).
        let avail_features = (1u64 << VIRTIO_F_VERSION_1) | (1u64 << VIRTIO_RING_F_EVENT_IDX);
        Ok(Entropy {
            config: config.clone(),
            virtio: VirtioConfig::new(avail_features, Vec::new()),
            metrics: Arc::new(EntropyMetrics::default()),
            limiter,
            scratch: Vec::new(),
            active: None,
            control_evt,
            subscribed: false,
            registrations: Registrations::new(),
        })
    }

    /// The configuration the device was built from.
    pub fn config(&self) -> &EntropyConfig {
        &self.config
    }

    /// The device's counters (shared: clone the `Arc` to read them from
    /// another thread).
    pub fn metrics(&self) -> &Arc<EntropyMetrics> {
        &self.metrics
    }

    /// Whether the driver started the device and no reset happened since.
    pub fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    /// The queue's notify EventFd, once activated.
    pub fn queue_event(&self) -> Option<&EventFd> {
        self.active.as_ref().map(|active| &active.notify)
    }

    /// The rate limiter, as it stands.
    pub fn rate_limiter(&self) -> &RateLimiter {
        &self.limiter
    }

    /// The rate limiter's timerfd, readable when a block ends.
    pub fn rate_limiter_fd(&self) -> RawFd {
        self.limiter.as_raw_fd()
    }

    /// Handles a notification of the queue: clears the notify EventFd and
    /// processes the queue.
    pub fn handle_queue_event(&mut self) -> Result<(), Error> {
        if let Some(active) = &self.active {
            if let Err(e) = drain_eventfd(&active.notify) {
                self.metrics.entropy_event_fails.inc();
                error!("virtio-rng: failed to read the queue EventFd: {e}");
            }
        }
        self.process_queue()
    }

    /// Handles the rate limiter's timer: the block is over, the queue goes
    /// on where it stopped.
    pub fn handle_rate_limiter_event(&mut self) -> Result<(), Error> {
        self.metrics.rate_limiter_event_count.inc();
        if self.limiter.event_handler() {
            return self.process_queue();
        }
        Ok(())
    }

    /// Serves the available ring: fills each chain, puts it in the used
    /// ring, and interrupts the driver at most once. Stops when the ring is
    /// empty (with notifications re-enabled) or the rate limiter refuses a
    /// request (that chain goes back; notifications stay off until the
    /// limiter's timer resumes the queue). A no-op before activation and
    /// while the limiter is blocked.
    pub fn process_queue(&mut self) -> Result<(), Error> {
        let Some(active) = self.active.as_mut() else {
            return Ok(());
        };
        if self.limiter.is_blocked() {
            return Ok(());
        }
        let mut used_any = false;
        let mut result = Ok(());
        // No kicks while the ring is being drained (virtio 1.2 §2.7.10).
        if let Err(e) = active.queue.disable_notification(&active.mem) {
            self.metrics.entropy_event_fails.inc();
            return Err(Error::Queue(e));
        }
        loop {
            let chain = match pop_or_enable_notification(&mut active.queue, &active.mem) {
                Ok(Some(chain)) => chain,
                Ok(None) => break,
                Err(e) => {
                    // The driver published more entries than the queue
                    // holds: nothing sensible can be popped.
                    self.metrics.entropy_event_fails.inc();
                    result = Err(Error::Queue(e));
                    break;
                }
            };
            let head = chain.head_index();
            match fill_chain(
                chain,
                &active.mem,
                &mut self.limiter,
                &mut self.scratch,
                &self.metrics,
            ) {
                Some(len) => {
                    if let Err(e) = active.queue.add_used(&active.mem, head, len) {
                        self.metrics.entropy_event_fails.inc();
                        error!("virtio-rng: failed to add head {head} to the used ring: {e}");
                    }
                    used_any = true;
                }
                None => {
                    active.queue.go_to_previous_position();
                    break;
                }
            }
        }
        if used_any {
            signal_used(active, &self.metrics);
        }
        result
    }
}

/// Interrupts the driver once for everything added to the used ring since
/// the last call, unless it asked not to be.
fn signal_used(active: &mut Active, metrics: &EntropyMetrics) {
    match needs_interrupt(&mut active.queue, &active.mem) {
        Ok(true) => {}
        Ok(false) => return,
        Err(e) => {
            // Better a spurious interrupt than a lost one.
            metrics.entropy_event_fails.inc();
            error!("virtio-rng: cannot read the notification state: {e}");
        }
    }
    if let Err(e) = active.interrupt.trigger(InterruptKind::Vring) {
        metrics.entropy_event_fails.inc();
        error!("virtio-rng: failed to signal the used-buffer interrupt: {e}");
    }
}

impl VirtioDevice for Entropy {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        self.virtio.avail_features()
    }

    fn ack_features(&mut self, features: u64) {
        self.virtio.ack_features(features);
    }

    fn config_size(&self) -> u64 {
        0
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // No configuration space (virtio 1.2 §5.4.4); the transport never
        // calls this with a non-empty range.
        data.fill(0);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        debug!(
            "virtio-rng: driver wrote {} bytes of configuration at {offset:#x}",
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
        let [queue] =
            take_queues::<1>(queues).inspect_err(|_| self.metrics.activate_fails.inc())?;
        if let Err(e) = self.control_evt.write(1) {
            self.metrics.activate_fails.inc();
            return Err(ActivateError::Io(e));
        }
        self.active = Some(Active {
            mem,
            queue: queue.queue,
            notify: queue.notify,
            interrupt,
        });
        Ok(())
    }

    fn reset(&mut self) -> bool {
        if let Some(active) = self.active.take() {
            if self.subscribed {
                // The event loop may be watching it: it stays open until the
                // event loop has unregistered it.
                self.registrations.retire(active.notify);
                if let Err(e) = self.control_evt.write(1) {
                    self.metrics.entropy_event_fails.inc();
                    error!("virtio-rng: cannot signal the reset to the event loop: {e}");
                }
            }
        }
        self.virtio.reset();
        true
    }
}
