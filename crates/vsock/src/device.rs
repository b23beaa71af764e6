// SPDX-License-Identifier: Apache-2.0

//! The virtio-vsock device (virtio 1.2 §5.10): the virtio side (features,
//! configuration space, activation, reset), the processing of the three
//! virtqueues, and the event-loop glue.

use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ember_virtio::{
    drain_eventfd, needs_interrupt, pop_or_enable_notification, take_queues, ActivateError,
    ActiveQueue, InterruptKind, VirtioConfig, VirtioDevice, VirtioInterrupt,
};
use event_manager::{EventOps, Events, MutEventSubscriber};
use log::{debug, error, warn};
use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::metrics::{inc, VsockMetrics};
use crate::muxer::{Muxer, DATA_CONNECTION, DATA_HOST_PENDING, DATA_LISTENER};
use crate::packet::{write_event, RxBuffer, TxPacket, EVENT_TRANSPORT_RESET, HEADER_SIZE};
use crate::{
    Error, VsockConfig, AVAIL_FEATURES, EVQ_INDEX, NUM_QUEUES, QUEUE_SIZE, RXQ_INDEX, TXQ_INDEX,
};

/// Event data of the internal activation EventFd.
const DATA_ACTIVATE: u32 = 0;
/// Event data of the internal control EventFd (reset, transport reset).
const DATA_CONTROL: u32 = 1;
/// Event data of the connection deadline timer.
const DATA_TIMER: u32 = 2;
/// Event data of queue `i`'s notify EventFd: `DATA_QUEUE + i`.
const DATA_QUEUE: u32 = 3;

const QUEUE_SIZES: [u16; NUM_QUEUES] = [QUEUE_SIZE; NUM_QUEUES];

/// What the device holds between DRIVER_OK and reset.
struct Active {
    mem: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    ev: Queue,
    /// Notify EventFds, by queue index.
    notify: Vec<EventFd>,
    interrupt: Arc<dyn VirtioInterrupt>,
}

/// A virtio-vsock device with Firecracker's Unix-socket backend.
///
/// See the [crate documentation](crate) for how a VMM creates and drives it.
pub struct Vsock {
    config: VsockConfig,
    cid: u64,
    virtio: VirtioConfig,
    muxer: Muxer,
    metrics: Arc<VsockMetrics>,
    activate_evt: EventFd,
    control_evt: EventFd,
    timer: TimerFd,
    timer_deadline: Option<Instant>,
    active: Option<Active>,
    /// Notify EventFds of a previous activation, still watched by the event
    /// loop until it handles the control event.
    retired: Vec<EventFd>,
    /// The event loop watches the queues, the control EventFd, the timer
    /// and the backend (rather than the activation EventFd).
    running: bool,
    /// A reset happened while running: the event loop must stop watching.
    teardown_pending: bool,
    /// A transport reset was sent; the guest has not refilled the event
    /// queue since (it does once it has reset its sockets), so RX waits.
    /// Holds the event queue's available index when the event was sent:
    /// the driver has refilled once its index moved past it.
    awaiting_event_ack: Option<u16>,
    /// TX processing stopped because the RST queue is full.
    tx_stalled: bool,
    /// Device and inode of the socket file this device created.
    socket_id: Option<(u64, u64)>,
}

impl std::fmt::Debug for Vsock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vsock")
            .field("config", &self.config)
            .field("acked_features", &self.virtio.acked_features())
            .field("activated", &self.active.is_some())
            .field("running", &self.running)
            .field("connections", &self.muxer.connection_count())
            .finish()
    }
}

fn drain(evt: &EventFd) -> io::Result<()> {
    drain_eventfd(evt)
}

impl Vsock {
    /// Creates the device: binds and listens on `config.uds_path`.
    ///
    /// Fails if `guest_cid` is below 3 (0-2 are reserved, virtio 1.2
    /// §5.10.4), if `uds_path` already exists, or if the socket cannot be
    /// bound there.
    pub fn new(config: VsockConfig) -> Result<Vsock, Error> {
        if config.guest_cid < 3 {
            return Err(Error::InvalidCid(config.guest_cid));
        }
        let activate_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?;
        let control_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?;
        let timer = TimerFd::new().map_err(|e| Error::Timer(e.into()))?;
        set_nonblocking(&timer).map_err(Error::Timer)?;

        let path = config.uds_path.clone();
        if fs::symlink_metadata(&path).is_ok() {
            return Err(Error::UdsPathExists(path));
        }
        let listener = UnixListener::bind(&path).map_err(|source| Error::Bind {
            path: path.clone(),
            source,
        })?;
        let socket_id = fs::metadata(&path).ok().map(|m| (m.dev(), m.ino()));
        if let Err(source) = listener.set_nonblocking(true) {
            let _ = fs::remove_file(&path);
            return Err(Error::Bind { path, source });
        }

        let metrics = Arc::new(VsockMetrics::default());
        let cid = u64::from(config.guest_cid);
        Ok(Vsock {
            muxer: Muxer::new(cid, path, listener, metrics.clone()),
            config,
            cid,
            // struct virtio_vsock_config { le64 guest_cid; } (virtio 1.2
            // §5.10.4).
            virtio: VirtioConfig::new(AVAIL_FEATURES, cid.to_le_bytes().to_vec()),
            metrics,
            activate_evt,
            control_evt,
            timer,
            timer_deadline: None,
            active: None,
            retired: Vec::new(),
            running: false,
            teardown_pending: false,
            awaiting_event_ack: None,
            tx_stalled: false,
            socket_id,
        })
    }

    /// The configuration the device was created with.
    pub fn config(&self) -> &VsockConfig {
        &self.config
    }

    /// The guest's context ID, as the guest reads it from the configuration
    /// space.
    pub fn guest_cid(&self) -> u64 {
        self.cid
    }

    /// The path of the listening socket.
    pub fn uds_path(&self) -> &Path {
        &self.config.uds_path
    }

    /// The device's counters.
    pub fn metrics(&self) -> &Arc<VsockMetrics> {
        &self.metrics
    }

    /// Whether the driver activated the device (DRIVER_OK) and has not reset
    /// it since.
    pub fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    /// Open connections.
    pub fn connection_count(&self) -> usize {
        self.muxer.connection_count()
    }

    /// Feature bits the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.virtio.acked_features()
    }

    /// Sends the guest `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` (virtio 1.2
    /// §5.10.6.5) and drops every connection, as after a snapshot restore:
    /// the driver resets its sockets and reads `guest_cid` again. The host
    /// sockets close when the event loop next runs. Packets to the guest wait
    /// until the driver kicks the event queue (it refills it once it handled
    /// the event).
    ///
    /// Fails if the device is not activated or the event queue has no
    /// usable buffer; the connections are dropped anyway.
    pub fn send_transport_reset(&mut self) -> Result<(), Error> {
        let Some(active) = self.active.as_mut() else {
            return Err(Error::NotActivated);
        };
        self.muxer.teardown();
        if let Err(e) = self.control_evt.write(1) {
            warn!("vsock: cannot signal the control EventFd: {e}");
        }
        let chain = match active.ev.iter(&active.mem) {
            Ok(mut iter) => iter.next(),
            Err(e) => {
                inc(&self.metrics.ev_queue_event_fails);
                return Err(Error::Queue(e));
            }
        };
        let Some(chain) = chain else {
            inc(&self.metrics.ev_queue_event_fails);
            return Err(Error::NoEventBuffer);
        };
        let head = chain.head_index();
        let written = write_event(&active.mem, chain, EVENT_TRANSPORT_RESET);
        add_used(
            &mut active.ev,
            &active.mem,
            head,
            *written.as_ref().unwrap_or(&0),
        );
        signal_used(active, &self.metrics, &[EVQ_INDEX]);
        match written {
            Ok(_) => {
                self.awaiting_event_ack = Some(watch_refill(&mut active.ev, &active.mem));
                Ok(())
            }
            Err(e) => {
                inc(&self.metrics.ev_queue_event_fails);
                Err(Error::EventBuffer(e))
            }
        }
    }

    /// Bytes of guest data a connection holds for its host socket.
    #[cfg(test)]
    pub(crate) fn buffered(&self, local_port: u32, peer_port: u32) -> Option<usize> {
        self.muxer.buffered(local_port, peer_port)
    }

    /// Shortens the request and shutdown timeouts.
    #[cfg(test)]
    pub(crate) fn set_timeouts(&mut self, request: Duration, shutdown: Duration) {
        self.muxer.timeouts = crate::connection::Timeouts { request, shutdown };
    }

    fn handle_activate(&mut self, ops: &mut EventOps) {
        if let Err(e) = drain(&self.activate_evt) {
            warn!("vsock: cannot read the activation EventFd: {e}");
        }
        let Some(active) = self.active.as_ref() else {
            // Reset before the event loop got here.
            return;
        };
        if self.running {
            return;
        }
        let mut register = vec![
            Events::with_data(&self.control_evt, DATA_CONTROL, EventSet::IN),
            Events::with_data(&self.timer, DATA_TIMER, EventSet::IN),
        ];
        for (i, evt) in (0u32..).zip(&active.notify) {
            register.push(Events::with_data(evt, DATA_QUEUE + i, EventSet::IN));
        }
        for events in register {
            if let Err(e) = ops.add(events) {
                inc(&self.metrics.activate_fails);
                error!("vsock: cannot watch fd {}: {e:?}", events.fd());
            }
        }
        if let Err(e) = ops.remove(Events::with_data(
            &self.activate_evt,
            DATA_ACTIVATE,
            EventSet::IN,
        )) {
            warn!("vsock: cannot stop watching the activation EventFd: {e:?}");
        }
        self.running = true;
    }

    fn handle_control(&mut self, ops: &mut EventOps) {
        if let Err(e) = drain(&self.control_evt) {
            warn!("vsock: cannot read the control EventFd: {e}");
        }
        if !self.teardown_pending {
            // A transport reset: the sync that follows closes the sockets.
            return;
        }
        self.teardown_pending = false;
        for evt in self.retired.drain(..) {
            if let Err(e) = ops.remove(Events::new(&evt, EventSet::IN)) {
                debug!("vsock: cannot stop watching a queue EventFd: {e:?}");
            }
        }
        for events in [
            Events::with_data(&self.control_evt, DATA_CONTROL, EventSet::IN),
            Events::with_data(&self.timer, DATA_TIMER, EventSet::IN),
        ] {
            if let Err(e) = ops.remove(events) {
                warn!("vsock: cannot stop watching fd {}: {e:?}", events.fd());
            }
        }
        self.running = false;
        if let Err(e) = self.timer.clear() {
            warn!("vsock: cannot disarm the connection timer: {e}");
        }
        self.timer_deadline = None;
        self.muxer.sync(ops, false);
        if let Err(e) = ops.add(Events::with_data(
            &self.activate_evt,
            DATA_ACTIVATE,
            EventSet::IN,
        )) {
            error!("vsock: cannot watch the activation EventFd: {e:?}");
        }
    }

    fn handle_queue_event(&mut self, fd: i32, queue: u32) -> bool {
        let evt = self
            .active
            .iter()
            .flat_map(|a| a.notify.iter())
            .chain(self.retired.iter())
            .find(|e| e.as_raw_fd() == fd);
        let failed = match evt.map(drain) {
            Some(Ok(())) => false,
            Some(Err(e)) => {
                warn!("vsock: cannot read the notify EventFd of queue {queue}: {e}");
                true
            }
            None => true,
        };
        let (count, fails) = match u16::try_from(queue) {
            Ok(RXQ_INDEX) => (
                &self.metrics.rx_queue_event_count,
                &self.metrics.rx_queue_event_fails,
            ),
            Ok(TXQ_INDEX) => (
                &self.metrics.tx_queue_event_count,
                &self.metrics.tx_queue_event_fails,
            ),
            _ => {
                // The guest refilled the event queue: it has handled the
                // transport reset.
                self.awaiting_event_ack = None;
                if failed {
                    inc(&self.metrics.ev_queue_event_fails);
                }
                return false;
            }
        };
        inc(if failed { fails } else { count });
        queue == u32::from(TXQ_INDEX)
    }

    /// Moves packets: TX (when `tx` or resuming a stall), then RX, until
    /// neither makes progress; interrupts the driver once.
    fn run_queues(&mut self, tx: bool) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let now = Instant::now();
        if let Some(idx) = self.awaiting_event_ack {
            // The refill may have come without a kick: the driver can add
            // a buffer before it sees the avail_event asking for one.
            if avail_idx(&active.ev, &active.mem).is_some_and(|current| current != idx) {
                self.awaiting_event_ack = None;
            }
        }
        let mut used = [false; NUM_QUEUES];
        let mut do_tx = tx || self.tx_stalled;
        loop {
            if do_tx {
                let (progress, stalled) = process_tx(active, &mut self.muxer, &self.metrics);
                used[usize::from(TXQ_INDEX)] |= progress;
                self.tx_stalled = stalled;
            }
            if self.awaiting_event_ack.is_none() {
                used[usize::from(RXQ_INDEX)] |=
                    process_rx(active, &mut self.muxer, &self.metrics, now);
            }
            // Delivered RSTs make room for the TX packets that waited.
            do_tx = self.tx_stalled && self.muxer.can_take_tx();
            if !do_tx {
                break;
            }
        }
        let queues: Vec<u16> = (0u16..)
            .zip(used)
            .filter_map(|(i, u)| u.then_some(i))
            .collect();
        if !queues.is_empty() {
            signal_used(active, &self.metrics, &queues);
        }
    }

    fn arm_timer(&mut self) {
        let next = self.muxer.next_expiry();
        if next == self.timer_deadline {
            return;
        }
        let result = match next {
            // A zero duration would disarm the timer: at least 1 ms.
            Some(t) => self.timer.reset(
                t.saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1)),
                None,
            ),
            None => self.timer.clear(),
        };
        match result {
            Ok(()) => self.timer_deadline = next,
            Err(e) => warn!("vsock: cannot arm the connection timer: {e}"),
        }
    }
}

/// Pops TX packets and hands them to the muxer. Returns (used any, stalled
/// because the muxer cannot take more).
fn process_tx(active: &mut Active, muxer: &mut Muxer, metrics: &VsockMetrics) -> (bool, bool) {
    // No kicks while the ring is drained (virtio 1.2 §2.7.10):
    // pop_or_enable_notification turns them back on once it is empty. A
    // stall keeps them off: the device resumes by itself when the muxer
    // can take packets again.
    if let Err(e) = active.tx.disable_notification(&active.mem) {
        inc(&metrics.tx_queue_event_fails);
        error!("vsock: cannot disable TX queue notifications: {e}");
    }
    let mut used = false;
    loop {
        if !muxer.can_take_tx() {
            return (used, true);
        }
        let chain = match pop_or_enable_notification(&mut active.tx, &active.mem) {
            Ok(chain) => chain,
            Err(e) => {
                // The driver published more buffers than the queue holds.
                inc(&metrics.tx_queue_event_fails);
                error!("vsock: TX queue is broken: {e}");
                return (used, false);
            }
        };
        let Some(chain) = chain else {
            return (used, false);
        };
        let head = chain.head_index();
        match TxPacket::parse(&active.mem, chain) {
            Ok(pkt) => muxer.send_pkt(&pkt),
            Err(e) => {
                inc(&metrics.tx_malformed_packets);
                debug!("vsock: dropping a malformed TX packet: {e}");
            }
        }
        add_used(&mut active.tx, &active.mem, head, 0);
        used = true;
    }
}

/// Fills RX buffers with what the muxer owes the guest. Returns whether any
/// buffer was used.
fn process_rx(
    active: &mut Active,
    muxer: &mut Muxer,
    metrics: &VsockMetrics,
    now: Instant,
) -> bool {
    // Kicks are only wanted once the device runs out of buffers with
    // something to deliver: pop_or_enable_notification turns them back on
    // then.
    if let Err(e) = active.rx.disable_notification(&active.mem) {
        inc(&metrics.rx_queue_event_fails);
        error!("vsock: cannot disable RX queue notifications: {e}");
    }
    let mut used = false;
    while muxer.has_pending_rx() {
        let chain = match pop_or_enable_notification(&mut active.rx, &active.mem) {
            Ok(chain) => chain,
            Err(e) => {
                inc(&metrics.rx_queue_event_fails);
                error!("vsock: RX queue is broken: {e}");
                break;
            }
        };
        let Some(chain) = chain else {
            // No buffers: the guest's next RX notification resumes.
            break;
        };
        let head = chain.head_index();
        let len = match RxBuffer::parse(&active.mem, chain) {
            Ok(buf) => match muxer.recv_pkt(&buf, now) {
                Some(hdr) => {
                    buf.write_header(&hdr);
                    // hdr.len <= MAX_PKT_BUF_SIZE.
                    HEADER_SIZE as u32 + hdr.len
                }
                None => {
                    // Nothing to say after all: give the buffer back.
                    active.rx.go_to_previous_position();
                    break;
                }
            },
            Err(e) => {
                inc(&metrics.rx_malformed_buffers);
                debug!("vsock: returning an unusable RX buffer: {e}");
                0
            }
        };
        add_used(&mut active.rx, &active.mem, head, len);
        used = true;
    }
    used
}

/// The driver's available index of `queue`, or `None` when the ring cannot
/// be read.
fn avail_idx(queue: &Queue, mem: &GuestMemoryMmap) -> Option<u16> {
    queue
        .avail_idx(mem, Ordering::Acquire)
        .ok()
        .map(|idx| idx.0)
}

/// After the transport reset event: asks for a kick at the driver's next
/// event buffer and returns the event queue's available index now.
///
/// The driver refills the event queue once it handled the event, and the
/// device waits for that. It keeps several event buffers, so the device's
/// own position (what `enable_notification` publishes) is behind the
/// driver's index: with VIRTIO_RING_F_EVENT_IDX avail_event is set to the
/// driver's index instead, which the refill passes (virtio 1.2 §2.7.10).
/// The caller also compares the index with the returned one on every run,
/// for a refill made before the driver saw avail_event.
fn watch_refill(ev: &mut Queue, mem: &GuestMemoryMmap) -> u16 {
    let idx = avail_idx(ev, mem).unwrap_or(0);
    if ev.event_idx_enabled() {
        // avail_event follows the used ring's entries (virtio 1.2 §2.7.8).
        let addr = ev
            .used_ring()
            .checked_add(4 + 8 * u64::from(ev.size()))
            .map(GuestAddress);
        let stored = addr.map(|addr| mem.store(idx.to_le(), addr, Ordering::Release));
        if !matches!(stored, Some(Ok(()))) {
            error!("vsock: cannot publish the event queue's avail_event");
        }
        // The store before the caller's next read of the index.
        std::sync::atomic::fence(Ordering::SeqCst);
    }
    idx
}

fn add_used(queue: &mut Queue, mem: &GuestMemoryMmap, head: u16, len: u32) {
    if let Err(e) = queue.add_used(mem, head, len) {
        error!("vsock: cannot return descriptor {head} to the used ring: {e}");
    }
}

/// Interrupts the driver for the used buffers of `queues`, unless it asked
/// for none on all of them.
fn signal_used(active: &mut Active, metrics: &VsockMetrics, queues: &[u16]) {
    let mut wanted = false;
    for &index in queues {
        let queue = match index {
            RXQ_INDEX => &mut active.rx,
            TXQ_INDEX => &mut active.tx,
            _ => &mut active.ev,
        };
        // An unreadable ring gets an interrupt rather than none.
        wanted |= needs_interrupt(queue, &active.mem).unwrap_or(true);
    }
    if wanted {
        if let Err(e) = active.interrupt.trigger(InterruptKind::Vring) {
            inc(&metrics.muxer_event_fails);
            error!("vsock: cannot interrupt the driver: {e}");
        }
    }
}

fn set_nonblocking(fd: &impl AsRawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own, with integer arguments; the
    // results are checked.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
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
        if !self.virtio.read_config(offset, data) {
            inc(&self.metrics.cfg_fails);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // The configuration space is read-only (virtio 1.2 §5.10.4).
        inc(&self.metrics.cfg_fails);
        warn!(
            "vsock: the driver wrote {} bytes of read-only configuration at {offset:#x}",
            data.len()
        );
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<ActiveQueue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        let result = self.do_activate(mem, queues, interrupt);
        if result.is_err() {
            inc(&self.metrics.activate_fails);
        }
        result
    }

    fn reset(&mut self) -> bool {
        if let Some(active) = self.active.take() {
            if self.running {
                // The event loop watches these: it must let go before they
                // close.
                self.retired.extend(active.notify);
                self.teardown_pending = true;
                if let Err(e) = self.control_evt.write(1) {
                    error!("vsock: cannot signal the control EventFd: {e}");
                }
            }
        }
        self.muxer.teardown();
        self.virtio.reset();
        self.awaiting_event_ack = None;
        self.tx_stalled = false;
        true
    }
}

impl Vsock {
    fn do_activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<ActiveQueue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::AlreadyActivated);
        }
        // RXQ_INDEX, TXQ_INDEX, EVQ_INDEX are 0, 1, 2: take_queues returns
        // them in that order.
        let [rx, tx, ev] = take_queues::<NUM_QUEUES>(queues)?;
        self.activate_evt.write(1).map_err(ActivateError::Io)?;
        self.active = Some(Active {
            mem,
            rx: rx.queue,
            tx: tx.queue,
            ev: ev.queue,
            notify: vec![rx.notify, tx.notify, ev.notify],
            interrupt,
        });
        self.awaiting_event_ack = None;
        self.tx_stalled = false;
        Ok(())
    }
}

impl MutEventSubscriber for Vsock {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut tx = false;
        match events.data() {
            DATA_ACTIVATE => self.handle_activate(ops),
            DATA_CONTROL => self.handle_control(ops),
            DATA_TIMER => {
                match self.timer.wait() {
                    Ok(_) => {}
                    Err(e) if e.errno() == libc::EAGAIN => {}
                    Err(e) => warn!("vsock: cannot read the connection timer: {e}"),
                }
                self.timer_deadline = None;
                self.muxer.sweep_killq(Instant::now());
            }
            DATA_LISTENER => self.muxer.accept(),
            DATA_HOST_PENDING => self.muxer.read_connect(events.fd()),
            DATA_CONNECTION => self.muxer.conn_event(events.fd(), events.event_set()),
            data if (DATA_QUEUE..DATA_QUEUE + NUM_QUEUES as u32).contains(&data) => {
                tx = self.handle_queue_event(events.fd(), data - DATA_QUEUE);
            }
            data => {
                inc(&self.metrics.muxer_event_fails);
                warn!("vsock: unexpected event (data {data}, fd {})", events.fd());
            }
        }
        self.run_queues(tx);
        self.muxer.sync(ops, self.running && !self.teardown_pending);
        if self.running {
            self.arm_timer();
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        // Nothing else is watched before activation: host connections wait
        // in the listen backlog (as in Firecracker).
        if let Err(e) = ops.add(Events::with_data(
            &self.activate_evt,
            DATA_ACTIVATE,
            EventSet::IN,
        )) {
            error!("vsock: cannot watch the activation EventFd: {e:?}");
        }
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        // Remove the socket file if it is still the one this device bound.
        let path = &self.config.uds_path;
        let same = fs::symlink_metadata(path)
            .ok()
            .map(|m| (m.dev(), m.ino()))
            .is_some_and(|id| Some(id) == self.socket_id);
        if same {
            let _ = fs::remove_file(path);
        }
    }
}
