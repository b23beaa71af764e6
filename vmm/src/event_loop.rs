//! The VMM thread's event loop, built on event-manager: it runs the devices
//! (virtio queues, host stdin to the UART), answers API requests while the
//! VM runs ([`RuntimeApiController`]), writes a metrics line every
//! [`FLUSH_INTERVAL`], and returns when the VM stops.
//!
//! Pausing: device subscribers live in one event manager, the VMM's own
//! sources (VM exit, API requests, metrics timer) in that one and in a
//! second one. While the VM is paused the loop waits on the second manager
//! only, so no device event is dispatched: the readiness of every device
//! descriptor, edge-triggered ones included (the TAP), stays queued in the
//! first manager's epoll set and is delivered on resume. Pause and resume
//! take effect between two rounds of the loop, never in the middle of a
//! round's dispatch.
//!
//! A stop request from outside (the `stop` eventfd, written by the binary's
//! SIGTERM and SIGINT handler) stops the VM like an i8042 reset would, so
//! that the VMM still writes its last metrics line and removes its socket.

use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use ember_devices::{Serial, Subscriber};
use ember_vcpu::VmControl;
use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::timerfd::TimerFd;

use ember_api::{ActionHandler, ApiServerHandle, InstanceState, RuntimeApiController, RuntimeVm};
use ember_logger::metrics::{Metrics, FLUSH_INTERVAL};

/// Why the event loop could not run on.
#[derive(Debug, thiserror::Error)]
pub enum EventLoopError {
    /// An event manager (epoll set) could not be created.
    #[error("cannot create the event manager: {0}")]
    CreateManager(#[source] event_manager::Error),
    /// The metrics timer could not be created or armed.
    #[error("cannot set up the metrics timer: {0}")]
    Timer(#[source] vmm_sys_util::errno::Error),
    /// Waiting for events failed.
    #[error("epoll failed: {0}")]
    Epoll(#[source] event_manager::Error),
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Device state stays usable after a panic elsewhere: the VMM must still
    // answer and stop cleanly.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What the VMM's own event sources asked for; acted on after each round.
#[derive(Debug, Default)]
struct Wakeups {
    exit: AtomicBool,
    api: AtomicBool,
    flush: AtomicBool,
    stop: AtomicBool,
}

/// Event data of the VMM's own sources.
const EXIT: u32 = 0;
const API: u32 = 1;
const TIMER: u32 = 2;
const STOP: u32 = 3;

/// Watches the VM's exit eventfd, the API request eventfd, the metrics
/// timer and the stop eventfd; registered with both event managers.
struct ControlEvents {
    exit: RawFd,
    api: Option<RawFd>,
    timer: Option<TimerFd>,
    stop: Option<RawFd>,
    wakeups: Arc<Wakeups>,
}

impl MutEventSubscriber for ControlEvents {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match events.data() {
            EXIT => self.wakeups.exit.store(true, Ordering::SeqCst),
            // The request eventfd is cleared by `ApiServerHandle::try_recv`.
            API => self.wakeups.api.store(true, Ordering::SeqCst),
            TIMER => {
                if let Some(timer) = &mut self.timer {
                    // Readable, so this does not block; it clears the timer.
                    if let Err(e) = timer.wait() {
                        log::warn!("cannot read the metrics timer: {e}");
                    }
                }
                self.wakeups.flush.store(true, Ordering::SeqCst);
            }
            STOP => self.wakeups.stop.store(true, Ordering::SeqCst),
            other => log::warn!("event from unknown VMM source {other}"),
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let mut sources = vec![(self.exit, EXIT, "the VM exit event")];
        if let Some(fd) = self.api {
            sources.push((fd, API, "the API request event"));
        }
        if let Some(timer) = &self.timer {
            sources.push((timer.as_raw_fd(), TIMER, "the metrics timer"));
        }
        if let Some(fd) = self.stop {
            sources.push((fd, STOP, "the stop event"));
        }
        for (fd, data, what) in sources {
            if let Err(e) = ops.add(Events::with_data_raw(fd, data, EventSet::IN)) {
                log::error!("cannot watch {what}: {e:?}");
            }
        }
    }
}

/// Moves bytes from host stdin into the UART's receive FIFO, holding what
/// does not fit until the guest drains the FIFO.
struct StdinToSerial {
    stdin: RawFd,
    input_ready: RawFd,
    serial: Serial,
    pending: Vec<u8>,
    stdin_open: bool,
}

impl StdinToSerial {
    fn flush_pending(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let mut serial = lock(&self.serial);
        match serial.enqueue_input(&self.pending) {
            Ok(n) => {
                self.pending.drain(..n);
            }
            Err(e) => log::warn!("cannot pass input to the serial port: {e}"),
        }
    }

    fn read_stdin(&mut self, ops: &mut EventOps) {
        let mut buf = [0u8; 64];
        // SAFETY: reads into a stack buffer of the given length.
        let n = unsafe { libc::read(self.stdin, buf.as_mut_ptr().cast(), buf.len()) };
        if n > 0 {
            self.pending.extend_from_slice(&buf[..n as usize]);
            self.flush_pending();
        } else if n == 0 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::WouldBlock
        {
            // EOF or a broken stdin: stop watching it, the VM goes on.
            self.stdin_open = false;
            let _ = ops.remove(Events::new_raw(self.stdin, EventSet::IN));
        }
        // While the FIFO is full, stop reading stdin so it is not busy-polled.
        if !self.pending.is_empty() && self.stdin_open {
            let _ = ops.remove(Events::new_raw(self.stdin, EventSet::IN));
            self.stdin_open = false;
        }
    }
}

impl MutEventSubscriber for StdinToSerial {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.stdin {
            if events
                .event_set()
                .intersects(EventSet::HANG_UP | EventSet::ERROR)
                && !events.event_set().contains(EventSet::IN)
            {
                self.stdin_open = false;
                let _ = ops.remove(Events::new_raw(self.stdin, EventSet::IN));
                return;
            }
            self.read_stdin(ops);
        } else if events.fd() == self.input_ready {
            let mut buf = [0u8; 8];
            // SAFETY: drains the eventfd counter into a stack buffer.
            unsafe { libc::read(self.input_ready, buf.as_mut_ptr().cast(), 8) };
            self.flush_pending();
            if self.pending.is_empty() && !self.stdin_open {
                // Resume reading stdin now that the guest has room.
                if ops.add(Events::new_raw(self.stdin, EventSet::IN)).is_ok() {
                    self.stdin_open = true;
                }
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new_raw(self.input_ready, EventSet::IN)) {
            log::warn!("serial input disabled: {e:?}");
            return;
        }
        // stdin may be /dev/null or a file, which epoll refuses: the guest
        // then simply gets no input.
        self.stdin_open = ops.add(Events::new_raw(self.stdin, EventSet::IN)).is_ok();
    }
}

/// What the event loop runs; `V` is the running VM as the API sees it.
pub struct LoopContext<'a, V> {
    /// The VM's run state.
    pub control: &'a VmControl,
    /// The UART, fed from `stdin`, and the eventfd it writes when the guest
    /// made room in its receive FIFO.
    pub serial: Option<(Serial, RawFd)>,
    /// Host input for the serial console.
    pub stdin: RawFd,
    /// The device subscribers (virtio queues, TAPs, vsock sockets).
    pub devices: Vec<Subscriber>,
    /// The API server and what answers it, when the API is served.
    pub api: Option<(&'a ApiServerHandle, RuntimeApiController<V>)>,
    /// Flushed every [`FLUSH_INTERVAL`] when given.
    pub metrics: Option<Arc<Metrics>>,
    /// An eventfd that, once readable, stops the VM
    /// ([`ExitReason::Stopped`](ember_vcpu::ExitReason::Stopped)).
    pub stop: Option<RawFd>,
}

/// Runs until the VM's exit event fires.
pub fn run<V: RuntimeVm>(ctx: LoopContext<'_, V>) -> Result<(), EventLoopError> {
    let LoopContext {
        control,
        serial,
        stdin,
        devices,
        mut api,
        metrics,
        stop,
    } = ctx;
    let new_manager = || -> Result<EventManager<Subscriber>, EventLoopError> {
        EventManager::new().map_err(EventLoopError::CreateManager)
    };
    let mut running = new_manager()?;
    let mut paused = new_manager()?;

    let timer = match &metrics {
        Some(_) => {
            let mut timer = TimerFd::new().map_err(EventLoopError::Timer)?;
            timer
                .reset(FLUSH_INTERVAL, Some(FLUSH_INTERVAL))
                .map_err(EventLoopError::Timer)?;
            Some(timer)
        }
        None => None,
    };
    let wakeups = Arc::new(Wakeups::default());
    let control_events: Subscriber = Arc::new(Mutex::new(ControlEvents {
        exit: control.exit_event().as_raw_fd(),
        api: api.as_ref().map(|(h, _)| h.request_event.as_raw_fd()),
        timer,
        stop,
        wakeups: wakeups.clone(),
    }));
    running.add_subscriber(control_events.clone());
    paused.add_subscriber(control_events);

    if let Some((serial, input_ready)) = serial {
        // Non-blocking stdin so a spurious wake-up never stalls the loop.
        // SAFETY: fcntl on a file descriptor we were given; failure is harmless.
        unsafe {
            let flags = libc::fcntl(stdin, libc::F_GETFL);
            if flags >= 0 {
                libc::fcntl(stdin, libc::F_SETFL, flags | libc::O_NONBLOCK);
            }
        }
        running.add_subscriber(Arc::new(Mutex::new(StdinToSerial {
            stdin,
            input_ready,
            serial,
            pending: Vec::new(),
            stdin_open: false,
        })));
    }
    for device in devices {
        running.add_subscriber(device);
    }

    loop {
        if wakeups.stop.swap(false, Ordering::SeqCst) {
            log::info!("stop requested from outside the VM");
            control.request_stop(ember_vcpu::ExitReason::Stopped);
        }
        if wakeups.exit.load(Ordering::SeqCst) || control.is_exiting() {
            return Ok(());
        }
        let is_paused = api
            .as_ref()
            .is_some_and(|(_, h)| h.state() == InstanceState::Paused);
        let manager = if is_paused { &mut paused } else { &mut running };
        manager.run().map_err(EventLoopError::Epoll)?;

        if wakeups.api.swap(false, Ordering::SeqCst) {
            if let Some((server, handler)) = api.as_mut() {
                while let Some((action, responder)) = server.try_recv() {
                    responder.respond(handler.handle(action));
                }
            }
        }
        if wakeups.flush.swap(false, Ordering::SeqCst) {
            if let Some(m) = &metrics {
                if let Err(e) = m.flush() {
                    log::warn!("cannot write the metrics: {e}");
                }
            }
        }
    }
}
