//! Assembles a microVM from a validated [`VmConfig`]: KVM, guest memory, the
//! in-kernel interrupt controllers, the legacy devices, the kernel and its
//! boot structures, and the vCPU threads; then runs it to its end, serving
//! the API and writing metrics meanwhile ([`Vm::run_with`]).

use std::fs::File;
use std::io::Write;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use ember_boot::{KernelEntry, VirtioMmioDeviceInfo};
use ember_bus::{Bus, BusKind, BusRange};
use ember_legacy_devices::i8042::{I8042Device, I8042_BASE, I8042_KBD_GSI, I8042_LEN};
use ember_legacy_devices::serial::{SerialDevice, COM1_BASE, COM1_GSI, COM1_LEN};
use ember_legacy_devices::EventFdTrigger;
use ember_vcpu::{ExitReason, Vcpu, VcpuConfig, VcpuHandle, VmControl};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::api::{ApiError, ApiServerHandle, Responder, VmmData};
use crate::boot_timer::BootTimer;
use crate::config::{drives_in_attach_order, CacheType, IoEngine, VmConfig};
use crate::devices::{attach_virtio_device, MmioAllocator, MmioSlot};
use crate::event_loop::{self, ApiDrive, LoopContext, RuntimeApi, Subscriber};
use crate::metrics::Metrics;
use crate::seccomp::Filters;
use ember_virtio_blk::{Block, BlockConfig};
use ember_virtio_mmio::MmioTransport;
use ember_virtio_net::{Net, NetConfig};
use ember_vsock::{Vsock, VsockConfig};

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
        /// "kernel image", "initrd".
        what: &'static str,
        /// The path from the configuration.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The configuration has no `boot-source`.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// Kernel, initrd, command line or boot structures.
    #[error("{0}")]
    Boot(#[source] ember_boot::Error),
    /// The ACPI tables could not be written.
    #[error("cannot write the ACPI tables: {0}")]
    Acpi(#[source] ember_boot::acpi::Error),
    /// The kernel command line is invalid or too long.
    #[error("invalid kernel command line: {0}")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// An eventfd could not be created.
    #[error("cannot create an eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    /// A device could not be placed on a bus.
    #[error("cannot add {device} to the {bus} bus: {source}")]
    Bus {
        /// Device name.
        device: &'static str,
        /// Bus name.
        bus: &'static str,
        /// Cause.
        #[source]
        source: ember_bus::Error,
    },
    /// vCPU creation, set-up or start.
    #[error(transparent)]
    Vcpu(#[from] ember_vcpu::Error),
    /// A drive could not be opened.
    #[error("drive `{id}`: {source}")]
    Drive {
        /// `drive_id`.
        id: String,
        /// Cause.
        #[source]
        source: ember_virtio_blk::Error,
    },
    /// A network interface could not be set up.
    #[error("network interface `{id}`: {source}")]
    Net {
        /// `iface_id`.
        id: String,
        /// Cause.
        #[source]
        source: ember_virtio_net::Error,
    },
    /// The vsock device could not be set up.
    #[error("vsock: {0}")]
    Vsock(#[source] ember_vsock::Error),
    /// A virtio device could not be attached.
    #[error(transparent)]
    Device(#[from] crate::devices::DeviceError),
    /// The event loop failed.
    #[error("event loop: {0}")]
    EventLoop(String),
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
}

/// The VM's i8042 controller: its reset line stops the VM, and the VMM
/// injects Ctrl+Alt+Del through it.
pub type I8042 = Arc<Mutex<I8042Device<ResetTrigger, EventFdTrigger>>>;

/// What serves a VM while it runs, besides its devices.
#[derive(Default)]
pub struct RunContext<'a> {
    /// The API server: post-boot requests are answered from the VMM's event
    /// loop.
    pub api: Option<&'a ApiServerHandle>,
    /// Where device and vCPU counters are registered; a line is written
    /// every [`FLUSH_INTERVAL`](crate::metrics::FLUSH_INTERVAL) and when the
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
    vm_fd: VmFd,
    mem: GuestMemoryMmap,
    control: Arc<VmControl>,
    pio_bus: Arc<Bus>,
    mmio_bus: Arc<Bus>,
    vcpus: Vec<Vcpu>,
    serial: Arc<Mutex<SerialDevice<Box<dyn Write + Send>>>>,
    serial_input_ready: EventFd,
    i8042: I8042,
    subscribers: Vec<Subscriber>,
    drives: Vec<DriveHandle>,
    nets: Vec<NetHandle>,
    vsock: Option<Arc<Mutex<Vsock>>>,
    virtio_slots: Vec<MmioSlot>,
    /// The configuration the VM was built from (`GET /vm/config`).
    config: VmConfig,
}

/// A network interface of the VM.
pub struct NetHandle {
    /// `iface_id`.
    pub id: String,
    /// The device.
    pub net: Arc<Mutex<Net>>,
    /// Its transport.
    pub transport: Arc<Mutex<MmioTransport>>,
}

/// A block device of the VM.
pub struct DriveHandle {
    /// `drive_id`.
    pub id: String,
    /// The device.
    pub block: Arc<Mutex<Block>>,
    /// Its transport.
    pub transport: Arc<Mutex<MmioTransport>>,
}

/// The i8042 reset line: asks every vCPU to stop with [`ExitReason::GuestReset`].
pub struct ResetTrigger(Arc<VmControl>);

impl ResetTrigger {
    /// The reset line of the VM run by `control`.
    pub fn new(control: Arc<VmControl>) -> Self {
        ResetTrigger(control)
    }
}

impl vm_superio::Trigger for ResetTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.request_stop(ExitReason::GuestReset);
        Ok(())
    }
}

fn eventfd() -> Result<EventFd, VmError> {
    EventFd::new(EFD_NONBLOCK).map_err(VmError::EventFd)
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

        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        ember_irqchip::check_capabilities(&kvm)?;
        let vm_fd = kvm.create_vm().map_err(VmError::CreateVm)?;

        let mem = ember_boot::create_guest_memory(machine.mem_size_mib).map_err(VmError::Memory)?;
        register_memory(&vm_fd, &mem, machine.track_dirty_pages)?;
        // The in-kernel PIC/IOAPIC/PIT must exist before any vCPU.
        ember_irqchip::setup(&vm_fd)?;

        let control = VmControl::new()?;
        let mut pio_bus = Bus::new(BusKind::Pio);
        let mut mmio_bus = Bus::new(BusKind::Mmio);

        // COM1, its interrupt delivered by KVM through an irqfd.
        let serial_evt = eventfd()?;
        ember_irqchip::register_irqfd(&vm_fd, &serial_evt, COM1_GSI)?;
        let serial_input_ready = eventfd()?;
        let out: Box<dyn Write + Send> = Box::new(std::io::stdout());
        let serial = Arc::new(Mutex::new(
            SerialDevice::new(EventFdTrigger::new(serial_evt), out)
                .with_input_ready(serial_input_ready.try_clone().map_err(VmError::EventFd)?),
        ));
        insert(
            &mut pio_bus,
            "the serial port",
            COM1_BASE,
            COM1_LEN,
            serial.clone(),
        )?;

        // i8042: 0xFE on port 0x64 resets (ends) the VM; keyboard IRQ 1.
        let kbd_evt = eventfd()?;
        ember_irqchip::register_irqfd(&vm_fd, &kbd_evt, I8042_KBD_GSI)?;
        let i8042 = Arc::new(Mutex::new(I8042Device::new(
            ResetTrigger(control.clone()),
            EventFdTrigger::new(kbd_evt),
        )));
        insert(
            &mut pio_bus,
            "the i8042",
            I8042_BASE,
            I8042_LEN,
            i8042.clone(),
        )?;

        // virtio-mmio devices: slots from 0xC000_1000, GSIs from 5, root
        // drive first, as Firecracker.
        let mut slots = MmioAllocator::default();
        let mut subscribers: Vec<Subscriber> = Vec::new();
        let mut virtio_slots = Vec::new();
        let mut extra_args = Vec::new();
        let mut drives = Vec::new();
        for drive in drives_in_attach_order(&config.drives) {
            let block_config = BlockConfig {
                drive_id: drive.drive_id.clone(),
                path_on_host: drive.path_on_host.clone().unwrap_or_default(),
                is_read_only: drive.is_read_only.unwrap_or(false),
                cache_type: match drive.cache_type {
                    CacheType::Unsafe => ember_virtio_blk::CacheType::Unsafe,
                    CacheType::Writeback => ember_virtio_blk::CacheType::Writeback,
                },
                io_engine: match drive.io_engine {
                    IoEngine::Sync => ember_virtio_blk::IoEngine::Sync,
                    IoEngine::Async => ember_virtio_blk::IoEngine::Async,
                },
            };
            let block = Block::new(&block_config).map_err(|source| VmError::Drive {
                id: drive.drive_id.clone(),
                source,
            })?;
            let block = Arc::new(Mutex::new(block));
            let name = format!("drive `{}`", drive.drive_id);
            let attached = attach_virtio_device(
                &vm_fd,
                &mem,
                &mut mmio_bus,
                &mut slots,
                block.clone(),
                &name,
            )?;
            subscribers.push(block.clone());
            if let Some(root) = drive.root_args() {
                extra_args.push(root);
            }
            extra_args.push(attached.slot.cmdline_entry());
            virtio_slots.push(attached.slot);
            drives.push(DriveHandle {
                id: drive.drive_id.clone(),
                block,
                transport: attached.transport,
            });
        }

        let mut nets = Vec::new();
        for iface in &config.network_interfaces {
            let guest_mac = match &iface.guest_mac {
                Some(mac) => {
                    Some(
                        ember_virtio_net::parse_mac(mac).map_err(|source| VmError::Net {
                            id: iface.iface_id.clone(),
                            source,
                        })?,
                    )
                }
                None => None,
            };
            let net = Net::new(NetConfig {
                iface_id: iface.iface_id.clone(),
                host_dev_name: iface.host_dev_name.clone(),
                guest_mac,
                mtu: iface.mtu,
            })
            .map_err(|source| VmError::Net {
                id: iface.iface_id.clone(),
                source,
            })?;
            let net = Arc::new(Mutex::new(net));
            let name = format!("network interface `{}`", iface.iface_id);
            let attached =
                attach_virtio_device(&vm_fd, &mem, &mut mmio_bus, &mut slots, net.clone(), &name)?;
            // The device registers its queue and TAP fds itself.
            subscribers.push(net.clone());
            extra_args.push(attached.slot.cmdline_entry());
            virtio_slots.push(attached.slot);
            nets.push(NetHandle {
                id: iface.iface_id.clone(),
                net,
                transport: attached.transport,
            });
        }

        let mut vsock = None;
        if let Some(v) = &config.vsock {
            let device = Vsock::new(VsockConfig {
                guest_cid: v.guest_cid,
                uds_path: v.uds_path.clone(),
            })
            .map_err(VmError::Vsock)?;
            let device = Arc::new(Mutex::new(device));
            let attached = attach_virtio_device(
                &vm_fd,
                &mem,
                &mut mmio_bus,
                &mut slots,
                device.clone(),
                "the vsock device",
            )?;
            subscribers.push(device.clone());
            extra_args.push(attached.slot.cmdline_entry());
            virtio_slots.push(attached.slot);
            vsock = Some(device);
        }

        let mut boot_args = config.boot_args().to_string();
        for arg in &extra_args {
            boot_args.push(' ');
            boot_args.push_str(arg);
        }
        let entry = load_kernel(
            &mem,
            boot_source,
            &boot_args,
            machine.vcpu_count,
            &virtio_slots,
        )?;

        if opts.boot_timer {
            let timer = Arc::new(Mutex::new(BootTimer::new(
                opts.start.unwrap_or_else(Instant::now),
                opts.start_cpu_us,
            )));
            insert(
                &mut mmio_bus,
                "the boot timer",
                ember_boot::layout::MMIO32_START,
                crate::boot_timer::BOOT_TIMER_LEN,
                timer,
            )?;
        }

        let vcpu_config = VcpuConfig {
            vcpu_count: machine.vcpu_count,
            smt: machine.smt,
        };
        let mut vcpus = Vec::with_capacity(machine.vcpu_count as usize);
        for index in 0..machine.vcpu_count {
            let mut vcpu = Vcpu::new(index, &vm_fd)?;
            vcpu.configure(&kvm, &mem, &entry, &vcpu_config)?;
            vcpus.push(vcpu);
        }

        Ok(Vm {
            _kvm: kvm,
            vm_fd,
            mem,
            control,
            pio_bus: Arc::new(pio_bus),
            mmio_bus: Arc::new(mmio_bus),
            vcpus,
            serial,
            serial_input_ready,
            i8042,
            subscribers,
            drives,
            nets,
            vsock,
            virtio_slots,
            config: config.clone(),
        })
    }

    /// The VM file descriptor.
    pub fn vm_fd(&self) -> &VmFd {
        &self.vm_fd
    }

    /// The block devices, in attach order.
    pub fn drives(&self) -> &[DriveHandle] {
        &self.drives
    }

    /// The network interfaces, in attach order.
    pub fn nets(&self) -> &[NetHandle] {
        &self.nets
    }

    /// The vsock device, if configured.
    pub fn vsock(&self) -> Option<&Arc<Mutex<Vsock>>> {
        self.vsock.as_ref()
    }

    /// The virtio-mmio slots in use, in attach order.
    pub fn virtio_slots(&self) -> &[MmioSlot] {
        &self.virtio_slots
    }

    /// The i8042 controller.
    pub fn i8042(&self) -> &I8042 {
        &self.i8042
    }

    /// The configuration the VM was built from.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Registers the counters of every device (Firecracker's groups `uart`,
    /// `i8042`, `block` and `block_<drive_id>`, `net` and `net_<iface_id>`,
    /// `vsock`) with `metrics`, and makes the vCPUs count their exits in its
    /// `vcpu` group.
    pub fn register_metrics(&mut self, metrics: &Metrics) {
        metrics.register("uart", lock(&self.serial).metrics());
        metrics.register("i8042", lock(&self.i8042).metrics());
        for d in &self.drives {
            let m = lock(&d.block).metrics().clone();
            metrics.register("block", m.clone());
            metrics.register(format!("block_{}", d.id), m);
        }
        for n in &self.nets {
            let m = lock(&n.net).metrics().clone();
            metrics.register("net", m.clone());
            metrics.register(format!("net_{}", n.id), m);
        }
        if let Some(v) = &self.vsock {
            metrics.register("vsock", lock(v).metrics().clone());
        }
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
                self.pio_bus.clone(),
                self.mmio_bus.clone(),
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
        self.control.resume();
        if let Some(r) = ctx.start.take() {
            r.respond(Ok(VmmData::Empty));
        }
        log::info!("microVM running with {} vCPU(s)", handles.len());

        let api = ctx.api.map(|server| {
            let drives = self
                .drives
                .iter()
                .map(|d| ApiDrive {
                    id: d.id.clone(),
                    block: d.block.clone(),
                })
                .collect();
            let handler = RuntimeApi::new(
                ctx.instance_id.clone(),
                self.config.clone(),
                self.control.clone(),
                self.i8042.clone(),
                drives,
                ctx.metrics.clone(),
            );
            (server, handler)
        });
        let loop_result = event_loop::run(LoopContext {
            control: &self.control,
            serial: self.serial.clone(),
            input_ready: &self.serial_input_ready,
            stdin: std::io::stdin().as_raw_fd(),
            devices: std::mem::take(&mut self.subscribers),
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
        loop_result.map_err(VmError::EventLoop)?;
        Ok(self.control.exit_reason().unwrap_or(ExitReason::Stopped))
    }
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

fn insert(
    bus: &mut Bus,
    device: &'static str,
    base: u64,
    len: u64,
    dev: Arc<dyn ember_bus::BusDeviceSync>,
) -> Result<(), VmError> {
    let bus_name = match bus.kind() {
        BusKind::Pio => "PIO",
        BusKind::Mmio => "MMIO",
    };
    let range = BusRange::new(base, len).map_err(|source| VmError::Bus {
        device,
        bus: bus_name,
        source,
    })?;
    bus.insert(range, dev).map_err(|source| VmError::Bus {
        device,
        bus: bus_name,
        source,
    })
}

/// Loads the kernel and initrd and writes the boot structures.
fn load_kernel(
    mem: &GuestMemoryMmap,
    boot: &crate::config::BootSource,
    boot_args: &str,
    vcpu_count: u8,
    virtio_slots: &[MmioSlot],
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
    let devices: Vec<VirtioMmioDeviceInfo> = virtio_slots
        .iter()
        .map(|s| VirtioMmioDeviceInfo {
            addr: s.addr,
            len: s.len,
            gsi: s.gsi,
        })
        .collect();
    let rsdp = ember_boot::create_acpi_tables(mem, vcpu_count, &devices).map_err(VmError::Acpi)?;
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
