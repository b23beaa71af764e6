//! Assembles a microVM from a validated [`VmConfig`], in order: KVM and
//! guest memory, the in-kernel interrupt controllers, the devices (placed by
//! [`Devices`]), the kernel and its boot structures, the vCPUs; then runs it
//! to its end, serving the API and writing metrics meanwhile
//! ([`Vm::run_with`]).

use std::borrow::Cow;
use std::fs::File;
use std::io::Write;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use ember_api::{
    ApiError, ApiServerHandle, BalloonAnswer, BalloonRequest, Responder, RuntimeApiController,
    RuntimeVm, SharedMmds, SnapshotCreateParams, SnapshotLoadParams, VmActionError, VmmData,
};
use ember_boot::{KernelEntry, VirtioMmioDeviceInfo};
use ember_config::{drives_in_attach_order, VmConfig};
use ember_cpu_template::{CustomCpuTemplate, HostCpu, KvmCapability, StaticTemplateError};
use ember_devices::{Devices, I8042};
use ember_legacy_devices::serial::SerialDeviceState;
use ember_logger::metrics::Metrics;
use ember_mmds::{MmdsMetrics, MmdsNetworkStack};
use ember_rate_limiter::TokenBucket;
use ember_vcpu::{ExitReason, Vcpu, VcpuConfig, VcpuHandle, VmControl};
use ember_virtio_balloon::Balloon;
use ember_virtio_blk::{Block, BucketSpec, BucketUpdate};
use ember_virtio_net::Net;
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::event_loop::{self, LoopContext};
use crate::seccomp::Filters;
use crate::snapshot::{LoadError, LoadedSnapshot, SnapshotSource};

/// Everything that can stop a VM from being built.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// `/dev/kvm` could not be opened.
    #[error("cannot open /dev/kvm: {0} (is KVM available and are you allowed to use it?)")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// A KVM capability Ember needs is missing, or the irqchip failed.
    #[error(transparent)]
    IrqChip(#[from] ember_irqchip::Error),
    /// KVM_CREATE_VM failed.
    #[error("KVM_CREATE_VM failed: {0}")]
    CreateVm(#[source] kvm_ioctls::Error),
    /// Guest memory could not be created.
    #[error("cannot create guest memory: {0}")]
    Memory(#[source] ember_boot::Error),
    /// KVM_SET_USER_MEMORY_REGION failed.
    #[error("cannot register guest memory region {slot} with KVM: {source}")]
    SetMemoryRegion {
        /// Slot number.
        slot: u32,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A file named by the configuration could not be opened.
    #[error("cannot open {what} {path}: {source}")]
    OpenFile {
        /// "kernel image", "initrd", "serial output".
        what: &'static str,
        /// The path from the configuration.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The configuration has no `boot-source`.
    #[error(transparent)]
    Config(#[from] ember_config::ConfigError),
    /// Kernel, initrd, command line or boot structures.
    #[error("{0}")]
    Boot(#[source] ember_boot::Error),
    /// The ACPI tables could not be written.
    #[error("cannot write the ACPI tables: {0}")]
    Acpi(#[source] ember_boot::acpi::Error),
    /// The kernel command line is invalid or too long.
    #[error("invalid kernel command line: {0}")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// A device could not be placed.
    #[error(transparent)]
    Devices(#[from] ember_devices::Error),
    /// vCPU creation, set-up or start.
    #[error(transparent)]
    Vcpu(#[from] ember_vcpu::Error),
    /// The static CPU template is not for this host.
    #[error("Failed to get CPU template: {0}")]
    CpuTemplate(#[source] StaticTemplateError),
    /// The CPU template changes what KVM cannot take.
    #[error("Failed to create guest config: {0}")]
    GuestConfig(#[source] ember_vcpu::Error),
    /// KVM lacks capabilities the CPU template asks to be checked.
    #[error("Kvm error: Missing KVM capabilities: {0:#x?}")]
    MissingCapabilities(Vec<u32>),
    /// The event loop failed.
    #[error("event loop: {0}")]
    EventLoop(#[from] crate::event_loop::EventLoopError),
    /// The VMM thread could not install its seccomp filter.
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
}

/// Options that do not come from the configuration file.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Install the boot timer device (`--boot-timer`).
    pub boot_timer: bool,
    /// When the process started, for the boot timer.
    pub start: Option<Instant>,
    /// Process CPU time at start, microseconds.
    pub start_cpu_us: u64,
    /// The metadata store the interfaces of `mmds-config` answer from, and
    /// that `/mmds` reads and writes.
    pub mmds: SharedMmds,
    /// The metadata service's counters (the `mmds` metrics group).
    pub mmds_metrics: Arc<MmdsMetrics>,
}

/// What serves a VM while it runs, besides its devices.
#[derive(Default)]
pub struct RunContext<'a> {
    /// The API server: post-boot requests are answered from the VMM's event
    /// loop.
    pub api: Option<&'a ApiServerHandle>,
    /// Where device and vCPU counters are registered; a line is written
    /// every [`FLUSH_INTERVAL`](ember_logger::metrics::FLUSH_INTERVAL) and when the
    /// VM stops.
    pub metrics: Option<Arc<Metrics>>,
    /// The microVM id (`GET /`).
    pub instance_id: String,
    /// The `InstanceStart` request that built the VM: answered `204` once
    /// every vCPU runs, or `400` if one cannot start.
    pub start: Option<Responder>,
    /// The seccomp filters of the vCPU threads (installed first thing on
    /// each) and of the VMM thread (installed once the vCPU threads exist,
    /// before the guest runs).
    pub seccomp: Filters,
    /// An eventfd that, once readable, stops the VM (the binary writes it
    /// from its SIGTERM and SIGINT handler).
    pub stop: Option<&'a EventFd>,
}

/// A built, not yet running microVM.
pub struct Vm {
    // Kept alive for the VM's lifetime: the VM and vCPU fds depend on it.
    _kvm: Kvm,
    vm_fd: Arc<VmFd>,
    mem: GuestMemoryMmap,
    control: Arc<VmControl>,
    devices: Devices,
    vcpus: Vec<Vcpu>,
    /// The configuration the VM was built from (`GET /vm/config`).
    config: VmConfig,
    /// Restored from a snapshot without `resume_vm`.
    start_paused: bool,
    /// The metadata store, for `/mmds` while the VM runs.
    mmds: SharedMmds,
    /// Kept open for the VM's lifetime: the userfaultfd that serves guest
    /// memory (Uffd memory backend).
    _uffd: Option<crate::uffd::UffdBackend>,
}

/// The CPU template the vCPUs get: the custom one (`PUT /cpu-config`, the
/// `cpu-config` section), else the static one of `machine-config`, if it is
/// for this host's vendor and model (Firecracker's rule).
fn cpu_template(config: &VmConfig) -> Result<Option<Cow<'_, CustomCpuTemplate>>, VmError> {
    if let Some(custom) = &config.cpu_config {
        return Ok(Some(Cow::Borrowed(custom)));
    }
    match config.machine_config.static_template() {
        None => Ok(None),
        Some(t) => t
            .for_host(&HostCpu::read())
            .map(|t| Some(Cow::Owned(t)))
            .map_err(VmError::CpuTemplate),
    }
}

/// The capabilities Ember needs, less those a custom template's `"!N"`
/// removes, and those its `"N"` adds.
fn check_capabilities(kvm: &Kvm, template: Option<&CustomCpuTemplate>) -> Result<(), VmError> {
    let Some(template) = template else {
        return Ok(ember_irqchip::check_capabilities(kvm)?);
    };
    let removed: Vec<u32> = template
        .kvm_capabilities
        .iter()
        .filter_map(|c| match c {
            KvmCapability::Remove(n) => Some(*n),
            KvmCapability::Add(_) => None,
        })
        .collect();
    ember_irqchip::check_capabilities_except(kvm, &removed)?;
    let missing: Vec<u32> = template
        .capabilities_to_check(&[])
        .into_iter()
        .filter(|&cap| kvm.check_extension_raw(u64::from(cap)) <= 0)
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(VmError::MissingCapabilities(missing))
    }
}

/// KVM, guest memory registered with it, the irqchip, the run control and
/// every device of `config`, in Firecracker's slot order: what a booted and
/// a restored VM share. The UART starts in `serial` when given.
fn assemble(
    config: &VmConfig,
    mem: &GuestMemoryMmap,
    opts: &RunOptions,
    serial: Option<&SerialDeviceState>,
) -> Result<(Kvm, VmFd, Arc<VmControl>, Devices), VmError> {
    let machine = &config.machine_config;
    let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
    check_capabilities(&kvm, config.cpu_config.as_ref())?;
    let vm_fd = kvm.create_vm().map_err(VmError::CreateVm)?;
    register_memory(&vm_fd, mem, machine.track_dirty_pages)?;
    // The in-kernel PIC/IOAPIC/PIT must exist before any vCPU.
    ember_irqchip::setup(&vm_fd)?;

    let control = VmControl::new()?;
    let mut devices = Devices::new(mem.clone());
    let serial_out: Box<dyn Write + Send> = match config.serial_output() {
        Some(path) => Box::new(open_serial_output(path)?),
        None => console_stdout(),
    };
    devices.attach_serial_with_state(&vm_fd, serial_out, serial)?;
    if let (Some(limit), Some((uart, _))) = (serial_output_limit(config), devices.serial()) {
        uart.lock()
            .unwrap_or_else(|e| e.into_inner())
            .set_output_limit(Some(limit));
    }
    devices.attach_i8042(&vm_fd, control.clone())?;
    // virtio-mmio slots in Firecracker's order: the balloon, drives (root
    // first), network interfaces, vsock, entropy.
    if let Some(balloon) = &config.balloon {
        devices.attach_balloon(&vm_fd, balloon)?;
    }
    for drive in drives_in_attach_order(&config.drives) {
        devices.attach_block(&vm_fd, drive)?;
    }
    for iface in &config.network_interfaces {
        devices.attach_net(&vm_fd, iface)?;
    }
    if let Some(mmds) = &config.mmds_config {
        // The configuration file's version and compatibility mode (the API
        // set them already).
        {
            let mut store = opts.mmds.lock().unwrap_or_else(|e| e.into_inner());
            store.set_version(mmds.version);
            store.set_imds_compat(mmds.imds_compat);
        }
        for n in devices.nets() {
            if mmds.network_interfaces.contains(&n.id) {
                n.net
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .set_mmds_stack(Some(MmdsNetworkStack::new(
                        Some(mmds.ipv4_addr()),
                        opts.mmds.clone(),
                        opts.mmds_metrics.clone(),
                    )));
            }
        }
    }
    if let Some(vsock) = &config.vsock {
        devices.attach_vsock(&vm_fd, vsock)?;
    }
    if let Some(entropy) = &config.entropy {
        devices.attach_entropy(&vm_fd, entropy)?;
    }
    if opts.boot_timer {
        devices.attach_boot_timer(opts.start.unwrap_or_else(Instant::now), opts.start_cpu_us)?;
    }
    Ok((kvm, vm_fd, control, devices))
}

/// Opens the file or named pipe of `PUT /serial` as Firecracker does:
/// created when missing, read-write (so a named pipe opens without a reader
/// and never raises SIGPIPE), non-blocking. Ember also appends (an existing
/// file keeps its content) and refuses a symbolic link.
///
/// Non-blocking matters: a pipe nobody reads fills up, then each byte the
/// guest writes fails with `EAGAIN` and is dropped and counted in
/// `uart.missed_write_count`, instead of stalling the vCPU or piling up in
/// memory.
pub fn open_serial_output(path: &Path) -> Result<File, VmError> {
    use std::os::unix::fs::OpenOptionsExt;

    std::fs::OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
        .open(path)
        .map_err(|source| VmError::OpenFile {
            what: "serial output",
            path: path.to_path_buf(),
            source,
        })
}

/// The guest console on stdout, written so that the vCPU never waits for a
/// reader: a pipe nobody reads fills up, then each byte fails with `EAGAIN`
/// and is dropped and counted in `uart.missed_write_count`.
///
/// A pipe or terminal is reopened through `/proc/self/fd/1` as a
/// non-blocking description of its own, so the parent's (shared) stdout
/// stays blocking; Firecracker sets `O_NONBLOCK` on the shared one, which a
/// socket, or a pipe when `/proc` is missing (a jail), still gets here. A
/// regular file never blocks and keeps its shared offset: it is written as
/// it is.
pub fn console_stdout() -> Box<dyn Write + Send> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};

    let stdout = std::io::stdout();
    let kind = std::fs::metadata("/proc/self/fd/1")
        .or_else(|_| {
            use std::os::fd::AsFd;
            stdout
                .as_fd()
                .try_clone_to_owned()
                .map(File::from)?
                .metadata()
        })
        .map(|m| m.file_type());
    match kind {
        Ok(t) if t.is_file() => return Box::new(stdout),
        Ok(t) if t.is_fifo() || t.is_char_device() => {
            if let Ok(f) = std::fs::OpenOptions::new()
                .write(true)
                // O_NOCTTY: a terminal opened again must not become the
                // controlling one.
                .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
                .open("/proc/self/fd/1")
            {
                return Box::new(f);
            }
        }
        _ => {}
    }
    // SAFETY: F_GETFL/F_SETFL on the process's stdout descriptor.
    unsafe {
        let flags = libc::fcntl(libc::STDOUT_FILENO, libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(libc::STDOUT_FILENO, libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
    }
    Box::new(stdout)
}

/// The token bucket of `PUT /serial`'s `rate_limiter`, full from now on;
/// `None` without one, or with a zero size or refill time (no limit, as in
/// Firecracker).
fn serial_output_limit(config: &VmConfig) -> Option<TokenBucket> {
    let b = config.serial.as_ref()?.rate_limiter.as_ref()?;
    TokenBucket::new(BucketSpec::from(b), std::time::Instant::now())
}

fn open(what: &'static str, path: &Path) -> Result<File, VmError> {
    File::open(path).map_err(|source| VmError::OpenFile {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// Registers every guest memory region with KVM.
fn register_memory(vm: &VmFd, mem: &GuestMemoryMmap, track_dirty: bool) -> Result<(), VmError> {
    let flags = if track_dirty {
        kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
    } else {
        0
    };
    for (slot, region) in mem.iter().enumerate() {
        let slot = slot as u32;
        let region = kvm_bindings::kvm_userspace_memory_region {
            slot,
            flags,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the region describes a live mapping owned by `mem`, which
        // the `Vm` keeps for as long as the VM fd exists.
        unsafe { vm.set_user_memory_region(region) }
            .map_err(|source| VmError::SetMemoryRegion { slot, source })?;
    }
    Ok(())
}

impl Vm {
    /// Builds the VM described by `config`; nothing runs yet.
    pub fn build(config: &VmConfig, opts: &RunOptions) -> Result<Vm, VmError> {
        let boot_source = config.boot_source()?;
        let machine = &config.machine_config;
        // Checked first, as Firecracker does, before anything is built.
        let template = cpu_template(config)?;
        let mem = ember_boot::create_guest_memory(machine.mem_size_mib).map_err(VmError::Memory)?;
        let (kvm, vm_fd, control, devices) = assemble(config, &mem, opts, None)?;

        let mut boot_args = config.boot_args().to_string();
        for arg in devices.kernel_args() {
            boot_args.push(' ');
            boot_args.push_str(arg);
        }
        let entry = load_kernel(
            &mem,
            boot_source,
            &boot_args,
            machine.vcpu_count,
            &devices.acpi_devices(),
        )?;

        let vcpu_config = VcpuConfig {
            vcpu_count: machine.vcpu_count,
            smt: machine.smt,
        };
        let mut vcpus = Vec::with_capacity(machine.vcpu_count as usize);
        for index in 0..machine.vcpu_count {
            let mut vcpu = Vcpu::new(index, &vm_fd)?;
            vcpu.configure_with_template(&kvm, &mem, &entry, &vcpu_config, template.as_deref())
                .map_err(|e| match e {
                    ember_vcpu::Error::Template(_)
                    | ember_vcpu::Error::SetMsrsIncomplete { .. }
                        if template.is_some() =>
                    {
                        VmError::GuestConfig(e)
                    }
                    other => other.into(),
                })?;
            vcpus.push(vcpu);
        }

        Ok(Vm {
            _kvm: kvm,
            vm_fd: Arc::new(vm_fd),
            mem,
            control,
            devices,
            vcpus,
            config: config.clone(),
            start_paused: false,
            mmds: opts.mmds.clone(),
            _uffd: None,
        })
    }

    /// Rebuilds the VM a snapshot was taken of (`PUT /snapshot/load`): the
    /// same devices in the same slots, every saved state restored; it starts
    /// paused unless `params.resume_vm`.
    pub fn restore(params: &SnapshotLoadParams, opts: &RunOptions) -> Result<Vm, LoadError> {
        let LoadedSnapshot {
            state,
            config,
            mem,
            uffd,
        } = LoadedSnapshot::open(params)?;
        let build = |e: VmError| LoadError::Build(e.to_string());
        let refused = |what: String, e: &dyn std::fmt::Display| LoadError::Restore {
            what,
            detail: e.to_string(),
        };
        let (kvm, vm_fd, control, devices) =
            assemble(&config, &mem, opts, Some(&state.serial)).map_err(build)?;
        // A parked vCPU saves its state with the MSR list read here.
        ember_vcpu::msr_indices(&kvm).map_err(|e| refused("the MSR list".into(), &e))?;
        let mut vcpus = Vec::with_capacity(state.vcpus.len());
        for (index, saved) in state.vcpus.iter().enumerate() {
            let index = index as u8;
            let mut vcpu = Vcpu::new(index, &vm_fd).map_err(|e| build(e.into()))?;
            vcpu.restore_state(saved)
                .map_err(|e| refused(format!("vCPU {index}"), &e))?;
            vcpus.push(vcpu);
        }
        state
            .irqchip
            .restore(&vm_fd)
            .map_err(|e| refused("the irqchip".into(), &e))?;
        crate::snapshot::restore_devices(&devices, &state)?;
        Ok(Vm {
            _kvm: kvm,
            vm_fd: Arc::new(vm_fd),
            mem,
            control,
            devices,
            vcpus,
            config,
            start_paused: !params.resume_vm,
            mmds: opts.mmds.clone(),
            _uffd: uffd,
        })
    }

    /// The VM file descriptor.
    pub fn vm_fd(&self) -> &VmFd {
        &self.vm_fd
    }

    /// Whether the VM stays paused once its vCPU threads exist (a snapshot
    /// loaded without `resume_vm`).
    pub fn starts_paused(&self) -> bool {
        self.start_paused
    }

    /// The devices and where they sit.
    pub fn devices(&self) -> &Devices {
        &self.devices
    }

    /// The configuration the VM was built from.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Registers the counters of every device with `metrics` (see
    /// [`Devices::register_metrics`]), and makes the vCPUs count their exits
    /// in its `vcpu` group.
    pub fn register_metrics(&mut self, metrics: &Metrics) {
        self.devices.register_metrics(metrics);
        let vcpu = metrics.vcpu();
        for v in &mut self.vcpus {
            v.set_metrics(vcpu.clone());
        }
    }

    /// Starts the vCPUs and serves stdin to the serial port until the VM
    /// stops; returns why it stopped.
    pub fn run(self) -> Result<ExitReason, VmError> {
        self.run_with(RunContext::default())
    }

    /// Starts the vCPUs, answers `ctx.start`, then runs the event loop
    /// (devices, stdin to the serial port, the API if `ctx.api` is given,
    /// metrics) until the VM stops; writes a last metrics line and returns
    /// why the VM stopped.
    pub fn run_with(mut self, mut ctx: RunContext<'_>) -> Result<ExitReason, VmError> {
        if let Some(metrics) = &ctx.metrics {
            self.register_metrics(metrics);
        }
        let start_failed = |ctx: &mut RunContext<'_>, e: &VmError| {
            if let Some(r) = ctx.start.take() {
                r.respond(Err(ApiError::bad_request(format!(
                    "Start microvm error: {e}"
                ))));
            }
        };
        if let Err(e) = ember_vcpu::register_kick_signal_handler() {
            let e = VmError::from(e);
            start_failed(&mut ctx, &e);
            return Err(e);
        }
        // The vCPU threads start parked, so that the VMM thread's filter is
        // in place before the guest's first instruction; they must exist
        // before that filter does, or they would inherit it on top of theirs.
        // No vCPU is registered yet: this only sets the paused state.
        let _ = self.control.pause();
        let mut handles: Vec<VcpuHandle> = Vec::with_capacity(self.vcpus.len());
        for vcpu in std::mem::take(&mut self.vcpus) {
            match vcpu.start_with_hook(
                self.devices.pio_bus().clone(),
                self.devices.mmio_bus().clone(),
                self.mem.clone(),
                self.control.clone(),
                ctx.seccomp.vcpu_hook(),
            ) {
                Ok(h) => handles.push(h),
                Err(e) => {
                    self.control.request_stop(ExitReason::Stopped);
                    join_all(handles);
                    let e = VmError::from(e);
                    start_failed(&mut ctx, &e);
                    return Err(e);
                }
            }
        }
        if let Some(filter) = ctx.seccomp.vmm() {
            if let Err(e) = crate::seccomp::apply(&filter) {
                self.control.request_stop(ExitReason::Stopped);
                join_all(handles);
                let e = VmError::Seccomp(e);
                start_failed(&mut ctx, &e);
                return Err(e);
            }
        }
        if !self.start_paused {
            self.control.resume();
        }
        if let Some(r) = ctx.start.take() {
            r.respond(Ok(VmmData::Empty));
        }
        if self.start_paused {
            log::info!("microVM restored, paused, with {} vCPU(s)", handles.len());
        } else {
            log::info!("microVM running with {} vCPU(s)", handles.len());
        }

        let api = ctx.api.map(|server| {
            let running = RunningVm {
                control: self.control.clone(),
                i8042: self.devices.i8042().cloned(),
                drives: self
                    .devices
                    .drives()
                    .iter()
                    .map(|d| (d.id.clone(), d.block.clone()))
                    .collect(),
                nets: self
                    .devices
                    .nets()
                    .iter()
                    .map(|n| (n.id.clone(), n.net.clone()))
                    .collect(),
                balloon: self.devices.balloon().cloned(),
                snapshot: SnapshotSource::new(
                    self.vm_fd.clone(),
                    self.mem.clone(),
                    self.control.clone(),
                    &self.devices,
                ),
            };
            let mut controller = RuntimeApiController::new(
                ctx.instance_id.clone(),
                self.config.clone(),
                running,
                ctx.metrics.clone(),
            )
            .with_mmds(self.mmds.clone());
            if self.start_paused {
                controller = controller.paused();
            }
            (server, controller)
        });
        let loop_result = event_loop::run(LoopContext {
            control: &self.control,
            // A console written to a file reads no input, as in Firecracker.
            serial: self
                .devices
                .serial()
                .filter(|_| self.config.serial_output().is_none())
                .map(|(serial, ready)| (serial.clone(), ready.as_raw_fd())),
            stdin: std::io::stdin().as_raw_fd(),
            devices: self.devices.take_subscribers(),
            api,
            metrics: ctx.metrics.clone(),
            stop: ctx.stop.map(|e| e.as_raw_fd()),
        });
        // Whatever ended the loop, every vCPU must leave KVM_RUN.
        self.control.request_stop(ExitReason::Stopped);
        join_all(handles);
        let _ = std::io::stdout().flush();
        if let Some(metrics) = &ctx.metrics {
            if let Err(e) = metrics.flush() {
                log::warn!("cannot write the last metrics line: {e}");
            }
        }
        loop_result?;
        Ok(self.control.exit_reason().unwrap_or(ExitReason::Stopped))
    }
}

/// The running VM as the API's runtime controller sees it.
struct RunningVm {
    control: Arc<VmControl>,
    i8042: Option<I8042>,
    drives: Vec<(String, Arc<Mutex<Block>>)>,
    nets: Vec<(String, Arc<Mutex<Net>>)>,
    balloon: Option<Arc<Mutex<Balloon>>>,
    snapshot: SnapshotSource,
}

impl RuntimeVm for RunningVm {
    fn pause(&mut self) -> Result<(), VmActionError> {
        self.control
            .pause()
            .map_err(|e| VmActionError::Failed(e.into()))
    }

    fn resume(&mut self) {
        self.control.resume()
    }

    fn is_stopping(&self) -> bool {
        self.control.is_exiting()
    }

    fn send_ctrl_alt_del(&mut self) -> Result<(), VmActionError> {
        let i8042 = self
            .i8042
            .as_ref()
            .ok_or_else(|| VmActionError::Failed("the VM has no i8042".into()))?;
        lock(i8042)
            .trigger_ctrl_alt_del()
            .map_err(|e| VmActionError::Failed(e.into()))
    }

    fn replace_drive_file(&mut self, id: &str, path: &Path) -> Result<(), VmActionError> {
        let (_, block) = self
            .drives
            .iter()
            .find(|(d, _)| d == id)
            .ok_or_else(|| VmActionError::NoSuchDrive(id.to_string()))?;
        lock(block)
            .update_backing_file(path)
            .map_err(|e| VmActionError::Failed(e.into()))
    }

    fn update_net_rate_limiters(
        &mut self,
        id: &str,
        rx: Option<&ember_config::RateLimiter>,
        tx: Option<&ember_config::RateLimiter>,
    ) -> Result<(), VmActionError> {
        let (_, net) = self
            .nets
            .iter()
            .find(|(n, _)| n == id)
            .ok_or_else(|| VmActionError::NoSuchNetworkInterface(id.to_string()))?;
        let updates = |r: Option<&ember_config::RateLimiter>| match r {
            Some(r) => (bucket_update(&r.bandwidth), bucket_update(&r.ops)),
            None => (BucketUpdate::None, BucketUpdate::None),
        };
        let (rx_bandwidth, rx_ops) = updates(rx);
        let (tx_bandwidth, tx_ops) = updates(tx);
        lock(net).update_rate_limiters(rx_bandwidth, rx_ops, tx_bandwidth, tx_ops);
        Ok(())
    }

    fn update_drive_rate_limiter(
        &mut self,
        id: &str,
        update: &ember_config::RateLimiter,
    ) -> Result<(), VmActionError> {
        let (_, block) = self
            .drives
            .iter()
            .find(|(d, _)| d == id)
            .ok_or_else(|| VmActionError::NoSuchDrive(id.to_string()))?;
        lock(block)
            .update_rate_limiter(bucket_update(&update.bandwidth), bucket_update(&update.ops));
        Ok(())
    }

    fn balloon(&mut self, request: BalloonRequest) -> Result<BalloonAnswer, VmActionError> {
        let balloon = self.balloon.as_ref().ok_or(VmActionError::NoBalloon)?;
        let mut b = lock(balloon);
        // Firecracker's VMM error wraps the device's as "Balloon: ...".
        let failed =
            |e: ember_virtio_balloon::Error| VmActionError::Failed(format!("Balloon: {e}").into());
        Ok(match request {
            BalloonRequest::Config => BalloonAnswer::Config(b.config().into()),
            BalloonRequest::Stats => BalloonAnswer::Stats(b.latest_stats().map_err(failed)?),
            BalloonRequest::SetTarget(mib) => {
                b.update_size(mib).map_err(failed)?;
                BalloonAnswer::Done
            }
            BalloonRequest::SetStatsInterval(s) => {
                b.update_stats_polling_interval(s).map_err(failed)?;
                BalloonAnswer::Done
            }
            BalloonRequest::StartHinting(cmd) => {
                b.start_hinting(cmd).map_err(failed)?;
                BalloonAnswer::Done
            }
            BalloonRequest::HintingStatus => {
                BalloonAnswer::Hinting(b.hinting_status().map_err(failed)?)
            }
            BalloonRequest::StopHinting => {
                b.stop_hinting().map_err(failed)?;
                BalloonAnswer::Done
            }
        })
    }

    fn create_snapshot(
        &mut self,
        config: &VmConfig,
        params: &SnapshotCreateParams,
    ) -> Result<(), VmActionError> {
        self.snapshot
            .create(config, params)
            .map_err(|e| VmActionError::Failed(e.into()))
    }
}

/// Firecracker's reading of one bucket of a PATCH body.
fn bucket_update(bucket: &Option<ember_config::TokenBucket>) -> BucketUpdate {
    BucketUpdate::from_spec(bucket.as_ref().map(BucketSpec::from))
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn join_all(handles: Vec<VcpuHandle>) {
    for h in handles {
        let index = h.index();
        if h.join().is_err() {
            log::error!("vCPU {index} thread panicked");
        }
    }
}

/// Loads the kernel and initrd and writes the boot structures.
fn load_kernel(
    mem: &GuestMemoryMmap,
    boot: &ember_config::BootSource,
    boot_args: &str,
    vcpu_count: u8,
    devices: &[VirtioMmioDeviceInfo],
) -> Result<KernelEntry, VmError> {
    let mut kernel = open("kernel image", &boot.kernel_image_path)?;
    let entry = ember_boot::load_kernel(mem, &mut kernel).map_err(VmError::Boot)?;
    let initrd = match &boot.initrd_path {
        Some(path) => {
            let mut f = open("initrd", path)?;
            Some(ember_boot::load_initrd(mem, &mut f).map_err(VmError::Boot)?)
        }
        None => None,
    };
    let mut cmdline = ember_boot::new_cmdline();
    cmdline.insert_str(boot_args).map_err(VmError::Cmdline)?;
    // ACPI tables describe the UART, the i8042 and every virtio-mmio device
    // (how a kernel without VIRTIO_MMIO_CMDLINE_DEVICES finds them).
    let rsdp = ember_boot::create_acpi_tables(mem, vcpu_count, devices).map_err(VmError::Acpi)?;
    ember_boot::configure_system_with_rsdp(
        mem,
        &entry,
        &cmdline,
        initrd.as_ref(),
        vcpu_count,
        Some(rsdp),
    )
    .map_err(VmError::Boot)?;
    Ok(entry)
}

#[cfg(test)]
mod tests {
    use std::ffi::CString;
    use std::io::{ErrorKind, Write};
    use std::os::unix::ffi::OsStrExt;

    use super::*;

    #[test]
    fn serial_output_is_created_then_appended_to() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        open_serial_output(&path)
            .unwrap()
            .write_all(b"first\n")
            .unwrap();
        open_serial_output(&path)
            .unwrap()
            .write_all(b"second\n")
            .unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "first\nsecond\n");
    }

    #[test]
    fn serial_output_refuses_a_symbolic_link() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = open_serial_output(&link).unwrap_err().to_string();
        assert!(e.contains("serial output") && e.contains("link"), "{e}");
        assert!(!target.exists());
    }

    #[test]
    fn a_pipe_nobody_reads_never_blocks_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("console.fifo");
        let c_path = CString::new(fifo.as_os_str().as_bytes()).unwrap();
        // SAFETY: mkfifo reads the NUL-terminated path we own.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
        // Opens with no reader on the other end.
        let mut out = open_serial_output(&fifo).unwrap();
        let chunk = [b'x'; 4096];
        let mut written = 0usize;
        let error = loop {
            match out.write(&chunk) {
                Ok(n) => written += n,
                Err(e) => break e,
            }
            assert!(written <= 16 << 20, "the pipe took {written} bytes");
        };
        // The pipe's buffer is full: the write fails at once instead of
        // waiting, so the UART drops and counts the byte.
        assert_eq!(error.kind(), ErrorKind::WouldBlock);
        assert!(written > 0);
    }
}
