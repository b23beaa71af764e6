//! The VMM thread's event loop, built on event-manager: it runs the devices
//! (virtio queues, host stdin to the UART), answers API requests while the
//! VM runs ([`RuntimeApi`]), writes a metrics line every
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

use std::io::Write;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use ember_legacy_devices::serial::SerialDevice;
use ember_vcpu::VmControl;
use ember_virtio_blk::Block;
use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::api::{
    check_allowed, patch_drive, ActionHandler, ApiError, ApiServerHandle, InstanceInfo,
    InstanceState, VmmAction, VmmData, VmmResponse, FIRECRACKER_API_VERSION,
};
use crate::vm::I8042;
use ember_config::VmConfig;
use ember_logger::metrics::{Metrics, FLUSH_INTERVAL};

type Serial = Arc<Mutex<SerialDevice<Box<dyn Write + Send>>>>;

/// A subscriber of the VMM thread's event loop.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

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

/// A block device as the API sees it.
pub struct ApiDrive {
    /// `drive_id`.
    pub id: String,
    /// The device.
    pub block: Arc<Mutex<Block>>,
}

/// The VMM's side of the API once the VM runs: Firecracker's post-boot
/// actions (`GET`s, `PATCH /vm`, `PATCH /drives`, `SendCtrlAltDel`,
/// `FlushMetrics`), each checked with [`check_allowed`] first.
pub struct RuntimeApi {
    instance_id: String,
    config: VmConfig,
    control: Arc<VmControl>,
    i8042: I8042,
    drives: Vec<ApiDrive>,
    metrics: Option<Arc<Metrics>>,
    state: InstanceState,
}

impl RuntimeApi {
    /// The API of a running VM built from `config`.
    pub fn new(
        instance_id: impl Into<String>,
        config: VmConfig,
        control: Arc<VmControl>,
        i8042: I8042,
        drives: Vec<ApiDrive>,
        metrics: Option<Arc<Metrics>>,
    ) -> Self {
        RuntimeApi {
            instance_id: instance_id.into(),
            config,
            control,
            i8042,
            drives,
            metrics,
            state: InstanceState::Running,
        }
    }

    /// `Running` or `Paused`.
    pub fn state(&self) -> InstanceState {
        self.state
    }

    /// The configuration the VM runs with, as `GET /vm/config` shows it.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    fn pause(&mut self) -> VmmResponse {
        if self.state == InstanceState::Paused {
            return Ok(VmmData::Empty);
        }
        let start = Instant::now();
        self.control.pause().map_err(|e| {
            // A vCPU that did not park must not stay half-paused.
            self.control.resume();
            ApiError::bad_request(format!("Failed to pause the microVM: {e}"))
        })?;
        let us = elapsed_us(start);
        self.state = InstanceState::Paused;
        if let Some(m) = &self.metrics {
            m.latencies().vmm_pause_vm.set(us);
        }
        log::info!("microVM paused ({us} us)");
        Ok(VmmData::Empty)
    }

    fn resume(&mut self) -> VmmResponse {
        if self.state == InstanceState::Running {
            return Ok(VmmData::Empty);
        }
        if self.control.is_exiting() {
            return Err(ApiError::bad_request(
                "Failed to resume the microVM: the VM is stopping",
            ));
        }
        let start = Instant::now();
        self.control.resume();
        let us = elapsed_us(start);
        self.state = InstanceState::Running;
        if let Some(m) = &self.metrics {
            m.latencies().vmm_resume_vm.set(us);
        }
        log::info!("microVM resumed ({us} us)");
        Ok(VmmData::Empty)
    }

    fn patch_drive(&mut self, update: &crate::api::DriveUpdate) -> VmmResponse {
        let drive = patch_drive(&self.config, update)?;
        let Some(index) = self
            .config
            .drives
            .iter()
            .position(|d| d.drive_id == update.drive_id)
        else {
            // patch_drive found it: the configuration did not change since.
            return Err(ApiError::internal(format!(
                "drive `{}` vanished from the configuration",
                update.drive_id
            )));
        };
        if let Some(path) = &update.path_on_host {
            let Some(handle) = self.drives.iter().find(|d| d.id == update.drive_id) else {
                return Err(ApiError::internal(format!(
                    "drive `{}` is configured but has no device",
                    update.drive_id
                )));
            };
            lock(&handle.block)
                .update_backing_file(path)
                .map_err(|e| {
                    ApiError::bad_request(format!(
                        "Drive config error: Unable to patch the block device: {e}. Please verify the request arguments."
                    ))
                })?;
            log::info!(
                "drive `{}` now backed by {}",
                update.drive_id,
                path.display()
            );
        }
        if update.rate_limiter.is_some() {
            log::warn!(
                "drive `{}`: rate limiters are accepted but not applied",
                update.drive_id
            );
        }
        self.config.drives[index] = drive;
        Ok(VmmData::Empty)
    }
}

fn elapsed_us(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX)
}

impl ActionHandler for RuntimeApi {
    fn handle(&mut self, action: VmmAction) -> VmmResponse {
        check_allowed(&action, self.state)?;
        match action {
            VmmAction::GetInstanceInfo => Ok(VmmData::InstanceInfo(InstanceInfo::new(
                self.instance_id.clone(),
                self.state,
            ))),
            VmmAction::GetVersion => Ok(VmmData::Version(FIRECRACKER_API_VERSION.to_string())),
            VmmAction::GetVmConfig => Ok(VmmData::VmConfig(self.config.clone())),
            VmmAction::GetMachineConfig => {
                Ok(VmmData::MachineConfig(self.config.machine_config.clone()))
            }
            VmmAction::Pause => self.pause(),
            VmmAction::Resume => self.resume(),
            VmmAction::SendCtrlAltDel => {
                lock(&self.i8042).trigger_ctrl_alt_del().map_err(|e| {
                    ApiError::bad_request(format!("Failed to send Ctrl+Alt+Del: {e}"))
                })?;
                log::info!("sent Ctrl+Alt+Del to the guest");
                Ok(VmmData::Empty)
            }
            VmmAction::FlushMetrics => {
                if let Some(m) = &self.metrics {
                    m.flush().map_err(|e| {
                        ApiError::bad_request(format!("Failed to write the metrics: {e}"))
                    })?;
                }
                Ok(VmmData::Empty)
            }
            VmmAction::PatchDrive(update) => self.patch_drive(&update),
            // Configuration calls: `check_allowed` refused them above.
            VmmAction::PutBootSource(_)
            | VmmAction::PutMachineConfig(_)
            | VmmAction::PatchMachineConfig(_)
            | VmmAction::PutDrive(_)
            | VmmAction::PutNetworkInterface(_)
            | VmmAction::PutVsock(_)
            | VmmAction::PutLogger(_)
            | VmmAction::PutMetrics(_)
            | VmmAction::InstanceStart => Err(ApiError::not_supported_post_boot()),
        }
    }
}

/// What the event loop runs.
pub struct LoopContext<'a> {
    /// The VM's run state.
    pub control: &'a VmControl,
    /// The UART, fed from `stdin`.
    pub serial: Serial,
    /// Written by the UART when the guest made room in its receive FIFO.
    pub input_ready: &'a EventFd,
    /// Host input for the serial console.
    pub stdin: RawFd,
    /// The device subscribers (virtio queues, TAPs, vsock sockets).
    pub devices: Vec<Subscriber>,
    /// The API server and what answers it, when the API is served.
    pub api: Option<(&'a ApiServerHandle, RuntimeApi)>,
    /// Flushed every [`FLUSH_INTERVAL`] when given.
    pub metrics: Option<Arc<Metrics>>,
    /// An eventfd that, once readable, stops the VM
    /// ([`ExitReason::Stopped`](ember_vcpu::ExitReason::Stopped)).
    pub stop: Option<RawFd>,
}

/// Runs until the VM's exit event fires.
pub fn run(ctx: LoopContext<'_>) -> Result<(), String> {
    let LoopContext {
        control,
        serial,
        input_ready,
        stdin,
        devices,
        mut api,
        metrics,
        stop,
    } = ctx;
    let new_manager = || -> Result<EventManager<Subscriber>, String> {
        EventManager::new().map_err(|e| format!("cannot create the event manager: {e:?}"))
    };
    let mut running = new_manager()?;
    let mut paused = new_manager()?;

    let timer = match &metrics {
        Some(_) => {
            let mut timer =
                TimerFd::new().map_err(|e| format!("cannot create the metrics timer: {e}"))?;
            timer
                .reset(FLUSH_INTERVAL, Some(FLUSH_INTERVAL))
                .map_err(|e| format!("cannot arm the metrics timer: {e}"))?;
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
        input_ready: input_ready.as_raw_fd(),
        serial,
        pending: Vec::new(),
        stdin_open: false,
    })));
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
        manager.run().map_err(|e| format!("epoll failed: {e:?}"))?;

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

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use ember_bus::BusDevice;
    use ember_legacy_devices::i8042::I8042Device;
    use ember_legacy_devices::EventFdTrigger;
    use ember_virtio_blk::{BlockConfig, CacheType, IoEngine};
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    use super::*;
    use crate::api::{DriveUpdate, MachineConfigUpdate};
    use crate::vm::ResetTrigger;
    use ember_config::{BootSource, Drive, Logger};

    struct Setup {
        dir: tempfile::TempDir,
        api: RuntimeApi,
        control: Arc<VmControl>,
        i8042: I8042,
        block: Arc<Mutex<Block>>,
        metrics: Arc<Metrics>,
    }

    fn image(dir: &Path, name: &str, len: u64) -> PathBuf {
        let path = dir.join(name);
        std::fs::File::create(&path).unwrap().set_len(len).unwrap();
        path
    }

    fn setup() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let disk = image(dir.path(), "disk.img", 1 << 20);
        let block = Arc::new(Mutex::new(
            Block::new(&BlockConfig {
                drive_id: "rootfs".into(),
                path_on_host: disk.clone(),
                is_read_only: false,
                cache_type: CacheType::Unsafe,
                io_engine: IoEngine::Sync,
            })
            .unwrap(),
        ));
        let config = VmConfig {
            boot_source: Some(BootSource {
                kernel_image_path: PathBuf::from("/k"),
                initrd_path: None,
                boot_args: None,
            }),
            drives: vec![Drive {
                drive_id: "rootfs".into(),
                path_on_host: Some(disk),
                is_root_device: true,
                partuuid: None,
                is_read_only: Some(false),
                cache_type: Default::default(),
                io_engine: Default::default(),
                rate_limiter: None,
                socket: None,
            }],
            ..VmConfig::default()
        };
        let control = VmControl::new().unwrap();
        let i8042: I8042 = Arc::new(Mutex::new(I8042Device::new(
            ResetTrigger::new(control.clone()),
            EventFdTrigger::new(EventFd::new(EFD_NONBLOCK).unwrap()),
        )));
        let metrics = Arc::new(Metrics::new());
        let api = RuntimeApi::new(
            "vm-7",
            config,
            control.clone(),
            i8042.clone(),
            vec![ApiDrive {
                id: "rootfs".into(),
                block: block.clone(),
            }],
            Some(metrics.clone()),
        );
        Setup {
            dir,
            api,
            control,
            i8042,
            block,
            metrics,
        }
    }

    fn state(api: &mut RuntimeApi) -> InstanceState {
        match api.handle(VmmAction::GetInstanceInfo) {
            Ok(VmmData::InstanceInfo(info)) => {
                assert_eq!(info.id, "vm-7");
                info.state
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn pause_and_resume_change_the_state_and_time_it() {
        let mut s = setup();
        assert_eq!(state(&mut s.api), InstanceState::Running);
        s.api.handle(VmmAction::Pause).unwrap();
        assert_eq!(state(&mut s.api), InstanceState::Paused);
        // Idempotent, as in Firecracker.
        s.api.handle(VmmAction::Pause).unwrap();
        s.api.handle(VmmAction::Resume).unwrap();
        assert_eq!(state(&mut s.api), InstanceState::Running);
        s.api.handle(VmmAction::Resume).unwrap();
        let line: serde_json::Value = serde_json::from_str(&s.metrics.render()).unwrap();
        assert!(line["latencies_us"]["vmm_pause_vm"].is_u64(), "{line}");

        // A stopping VM cannot be paused, and the state stays.
        s.control.request_stop(ember_vcpu::ExitReason::Stopped);
        let e = s.api.handle(VmmAction::Pause).unwrap_err();
        assert_eq!(e.status, 400);
        assert!(
            e.message.starts_with("Failed to pause the microVM"),
            "{}",
            e.message
        );
        assert_eq!(state(&mut s.api), InstanceState::Running);
    }

    #[test]
    fn configuration_calls_are_refused_after_boot() {
        let mut s = setup();
        for action in [
            VmmAction::InstanceStart,
            VmmAction::PutLogger(Logger::default()),
            VmmAction::PatchMachineConfig(MachineConfigUpdate {
                vcpu_count: Some(2),
                ..Default::default()
            }),
        ] {
            let e = s.api.handle(action).unwrap_err();
            assert_eq!(
                e.message,
                "The requested operation is not supported after starting the microVM."
            );
        }
        assert!(matches!(
            s.api.handle(VmmAction::GetVersion),
            Ok(VmmData::Version(v)) if v == FIRECRACKER_API_VERSION
        ));
        assert!(matches!(
            s.api.handle(VmmAction::GetMachineConfig),
            Ok(VmmData::MachineConfig(m)) if m.vcpu_count == 1
        ));
    }

    #[test]
    fn ctrl_alt_del_queues_the_scan_codes() {
        let mut s = setup();
        s.api.handle(VmmAction::SendCtrlAltDel).unwrap();
        let mut i8042 = lock(&s.i8042);
        let mut bytes = Vec::new();
        for _ in 0..4 {
            let mut b = [0u8];
            i8042.read(0x60, 0, &mut b);
            bytes.push(b[0]);
        }
        assert_eq!(bytes, [0x14, 0x11, 0xe0, 0x71]);
    }

    #[test]
    fn patch_drive_swaps_the_file_and_updates_the_config() {
        let mut s = setup();
        let bigger = image(s.dir.path(), "bigger.img", 4 << 20);
        s.api
            .handle(VmmAction::PatchDrive(DriveUpdate {
                drive_id: "rootfs".into(),
                path_on_host: Some(bigger.clone()),
                rate_limiter: None,
            }))
            .unwrap();
        assert_eq!(lock(&s.block).capacity(), 8192);
        assert_eq!(
            s.api.config().drives[0].path_on_host.as_ref(),
            Some(&bigger)
        );
        match s.api.handle(VmmAction::GetVmConfig) {
            Ok(VmmData::VmConfig(c)) => assert_eq!(c.drives[0].path_on_host, Some(bigger.clone())),
            other => panic!("{other:?}"),
        }

        let missing = s.dir.path().join("missing.img");
        let e = s
            .api
            .handle(VmmAction::PatchDrive(DriveUpdate {
                drive_id: "rootfs".into(),
                path_on_host: Some(missing.clone()),
                rate_limiter: None,
            }))
            .unwrap_err();
        assert_eq!(e.status, 400);
        assert!(
            e.message.contains(missing.to_str().unwrap()),
            "{}",
            e.message
        );
        assert_eq!(
            s.api.config().drives[0].path_on_host.as_ref(),
            Some(&bigger)
        );
        assert_eq!(lock(&s.block).capacity(), 8192);

        let e = s
            .api
            .handle(VmmAction::PatchDrive(DriveUpdate {
                drive_id: "other".into(),
                path_on_host: Some(bigger),
                rate_limiter: None,
            }))
            .unwrap_err();
        assert!(
            e.message.contains("no drive has the id `other`"),
            "{}",
            e.message
        );
    }

    #[test]
    fn flush_metrics_writes_a_line() {
        let mut s = setup();
        // Without a destination there is nothing to write, and no error.
        s.api.handle(VmmAction::FlushMetrics).unwrap();
        let path = s.dir.path().join("metrics.json");
        s.metrics
            .configure(
                &ember_config::Metrics {
                    metrics_path: path.clone(),
                    emit_id: true,
                    properties: None,
                },
                "vm-7",
            )
            .unwrap();
        s.api.handle(VmmAction::FlushMetrics).unwrap();
        s.api.handle(VmmAction::FlushMetrics).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 2, "{text}");
        assert!(text.starts_with("{\"utc_timestamp_ms\":"), "{text}");
    }
}
