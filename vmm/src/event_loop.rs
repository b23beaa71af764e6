//! The VMM thread's event loop: feeds host stdin to the guest's UART and
//! waits for the VM to stop. Built on event-manager so later devices (virtio
//! queues, the API socket) join the same loop as subscribers.

use std::io::Write;
use std::os::unix::io::RawFd;
use std::sync::{Arc, Mutex};

use ember_legacy_devices::serial::SerialDevice;
use ember_vcpu::VmControl;
use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::EventFd;

type Serial = Arc<Mutex<SerialDevice<Box<dyn Write + Send>>>>;

/// Watches the VM's exit eventfd.
struct ExitWatcher {
    fd: RawFd,
    fired: Arc<std::sync::atomic::AtomicBool>,
}

impl MutEventSubscriber for ExitWatcher {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() == self.fd {
            self.fired.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new_raw(self.fd, EventSet::IN)) {
            log::error!("cannot watch the VM exit event: {e:?}");
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
        let mut serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
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

/// A subscriber of the VMM thread's event loop.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Runs until the VM's exit event fires.
pub fn run(
    control: &VmControl,
    serial: Serial,
    input_ready: &EventFd,
    stdin: RawFd,
    devices: Vec<Subscriber>,
) -> Result<(), String> {
    use std::os::unix::io::AsRawFd;
    use std::sync::atomic::{AtomicBool, Ordering};

    let mut manager: EventManager<Subscriber> =
        EventManager::new().map_err(|e| format!("cannot create the event manager: {e:?}"))?;
    let fired = Arc::new(AtomicBool::new(false));
    manager.add_subscriber(Arc::new(Mutex::new(ExitWatcher {
        fd: control.exit_event().as_raw_fd(),
        fired: fired.clone(),
    })));
    // Non-blocking stdin so a spurious wake-up never stalls the loop.
    // SAFETY: fcntl on a file descriptor we were given; failure is harmless.
    unsafe {
        let flags = libc::fcntl(stdin, libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(stdin, libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
    }
    manager.add_subscriber(Arc::new(Mutex::new(StdinToSerial {
        stdin,
        input_ready: input_ready.as_raw_fd(),
        serial,
        pending: Vec::new(),
        stdin_open: false,
    })));
    for device in devices {
        manager.add_subscriber(device);
    }
    while !fired.load(Ordering::SeqCst) && !control.is_exiting() {
        manager.run().map_err(|e| format!("epoll failed: {e:?}"))?;
    }
    Ok(())
}
