//! The microVM's address map: every device the guest can reach, where it
//! sits and how its interrupt is wired, in one place.
//!
//! [`Devices`] owns the port-I/O and MMIO buses and places each device kind
//! with one attach function:
//!
//! | device | where | interrupt |
//! | --- | --- | --- |
//! | COM1 16550A ([`Devices::attach_serial`]) | ports 0x3f8-0x3ff | GSI 4 |
//! | i8042 ([`Devices::attach_i8042`]) | ports 0x60-0x64 | GSI 1 |
//! | boot timer ([`Devices::attach_boot_timer`]) | MMIO 0xc000_0000, 4 KiB | none |
//! | virtio-mmio slots, in attach order: the balloon ([`Devices::attach_balloon`]), drives ([`Devices::attach_block`], root first), network interfaces ([`Devices::attach_net`]), vsock ([`Devices::attach_vsock`]), the entropy device ([`Devices::attach_entropy`]) | MMIO from 0xc000_1000, 4 KiB each | GSI 5, 6, ... 23 |
//!
//! Interrupts reach KVM's in-kernel irqchip through irqfds and queue kicks
//! arrive on ioeventfds, so neither passes through the VMM thread. What the
//! guest must be told about the virtio devices comes out as kernel command
//! line words ([`Devices::kernel_args`]) and ACPI DSDT entries
//! ([`Devices::acpi_devices`]); the event-loop subscribers that run the
//! devices as [`Devices::take_subscribers`].
//!
//! # Example
//!
//! ```no_run
//! use ember_devices::Devices;
//! use ember_vcpu::VmControl;
//! use vm_memory::{GuestAddress, GuestMemoryMmap};
//!
//! let kvm = kvm_ioctls::Kvm::new().unwrap();
//! let vm = kvm.create_vm().unwrap();
//! ember_irqchip::setup(&vm).unwrap();
//! let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 128 << 20)]).unwrap();
//! let control = VmControl::new().unwrap();
//!
//! let mut devices = Devices::new(mem);
//! devices.attach_serial(&vm, Box::new(std::io::stdout())).unwrap();
//! devices.attach_i8042(&vm, control).unwrap();
//! let vsock = ember_config::Vsock {
//!     guest_cid: 3,
//!     uds_path: "/tmp/v.sock".into(),
//!     vsock_id: None,
//! };
//! devices.attach_vsock(&vm, &vsock).unwrap();
//! assert_eq!(
//!     devices.kernel_args(),
//!     ["virtio_mmio.device=4K@0xc0001000:5"]
//! );
//! // The vCPUs dispatch to `devices.pio_bus()` and `devices.mmio_bus()`.
//! ```

#![deny(missing_docs)]

pub mod boot_timer;
pub mod mmio;

use std::io::Write;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use ember_boot::layout::MMIO32_START;
use ember_boot::VirtioMmioDeviceInfo;
use ember_bus::{Bus, BusDeviceSync, BusKind, BusRange};
use ember_config::{
    Balloon as BalloonSection, Drive, Entropy as EntropySection, NetworkInterface,
    Vsock as VsockSection,
};
use ember_legacy_devices::i8042::{I8042Device, I8042_BASE, I8042_KBD_GSI, I8042_LEN};
use ember_legacy_devices::serial::{
    SerialDevice, SerialDeviceState, COM1_BASE, COM1_GSI, COM1_LEN,
};
use ember_legacy_devices::EventFdTrigger;
use ember_logger::metrics::Metrics;
use ember_vcpu::{ExitReason, VmControl};
use ember_virtio_balloon::{Balloon, BalloonConfig};
use ember_virtio_blk::{Block, BlockConfig};
use ember_virtio_mmio::MmioTransport;
use ember_virtio_net::{Net, NetConfig};
use ember_virtio_rng::{Entropy, EntropyConfig};
use ember_vsock::{Vsock, VsockConfig};
use event_manager::MutEventSubscriber;
use kvm_ioctls::VmFd;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::boot_timer::{BootTimer, BOOT_TIMER_LEN};
use crate::mmio::{attach_virtio_device, DeviceError, MmioAllocator, MmioSlot};

/// Errors placing a device.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An eventfd could not be created.
    #[error("cannot create an eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    /// KVM refused a legacy device's irqfd.
    #[error(transparent)]
    IrqChip(#[from] ember_irqchip::Error),
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
    /// The balloon could not be set up.
    #[error("balloon device: {0}")]
    Balloon(#[source] ember_virtio_balloon::Error),
    /// The entropy device could not be set up.
    #[error("entropy device: {0}")]
    Entropy(#[source] ember_virtio_rng::Error),
    /// A virtio device could not be attached.
    #[error(transparent)]
    Attach(#[from] DeviceError),
    /// A saved UART state was refused.
    #[error("serial port state: {0}")]
    SerialState(#[source] ember_legacy_devices::serial::SerialStateError),
    /// The buses are shared with running vCPUs: the address map is final.
    #[error("cannot add {0}: the vCPUs already use the buses")]
    BusesInUse(&'static str),
}

/// A subscriber of the VMM thread's event loop.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// A virtio device's MMIO transport, shared with the MMIO bus.
pub type Transport = Arc<Mutex<MmioTransport>>;

/// The VM's UART, writing the guest's console to a host stream.
pub type Serial = Arc<Mutex<SerialDevice<Box<dyn Write + Send>>>>;

/// The VM's i8042 controller: its reset line stops the VM, and the VMM
/// injects Ctrl+Alt+Del through it.
pub type I8042 = Arc<Mutex<I8042Device<ResetTrigger, EventFdTrigger>>>;

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

/// A block device of the VM.
pub struct DriveHandle {
    /// `drive_id`.
    pub id: String,
    /// The device.
    pub block: Arc<Mutex<Block>>,
    /// Its transport.
    pub transport: Arc<Mutex<MmioTransport>>,
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

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Device state stays usable after a panic elsewhere.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn eventfd() -> Result<EventFd, Error> {
    EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)
}

/// Every device of one microVM, the buses they sit on and the slots and
/// GSIs they were given.
pub struct Devices {
    mem: GuestMemoryMmap,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    slots: MmioAllocator,
    virtio_slots: Vec<MmioSlot>,
    kernel_args: Vec<String>,
    subscribers: Vec<Subscriber>,
    serial: Option<(Serial, EventFd)>,
    i8042: Option<I8042>,
    drives: Vec<DriveHandle>,
    nets: Vec<NetHandle>,
    vsock: Option<Arc<Mutex<Vsock>>>,
    vsock_transport: Option<Arc<Mutex<MmioTransport>>>,
    entropy: Option<Arc<Mutex<Entropy>>>,
    entropy_transport: Option<Arc<Mutex<MmioTransport>>>,
    balloon: Option<Arc<Mutex<Balloon>>>,
    balloon_transport: Option<Arc<Mutex<MmioTransport>>>,
}

impl Devices {
    /// No device yet; virtio devices will use `mem` as guest memory.
    pub fn new(mem: GuestMemoryMmap) -> Self {
        Devices {
            mem,
            pio: Arc::new(Bus::new(BusKind::Pio)),
            mmio: Arc::new(Bus::new(BusKind::Mmio)),
            slots: MmioAllocator::default(),
            virtio_slots: Vec::new(),
            kernel_args: Vec::new(),
            subscribers: Vec::new(),
            serial: None,
            i8042: None,
            drives: Vec::new(),
            nets: Vec::new(),
            vsock: None,
            vsock_transport: None,
            entropy: None,
            entropy_transport: None,
            balloon: None,
            balloon_transport: None,
        }
    }

    /// COM1 at port 0x3f8, its interrupt on GSI 4 through an irqfd, its
    /// output written to `out`.
    ///
    /// # Errors
    ///
    /// An eventfd, the irqfd or the bus refused.
    pub fn attach_serial(&mut self, vm: &VmFd, out: Box<dyn Write + Send>) -> Result<(), Error> {
        self.attach_serial_with_state(vm, out, None)
    }

    /// [`Devices::attach_serial`], the UART in a saved `state` (from a
    /// snapshot) instead of its power-on state.
    ///
    /// # Errors
    ///
    /// As [`Devices::attach_serial`], or the state is refused.
    pub fn attach_serial_with_state(
        &mut self,
        vm: &VmFd,
        out: Box<dyn Write + Send>,
        state: Option<&SerialDeviceState>,
    ) -> Result<(), Error> {
        let irq = eventfd()?;
        ember_irqchip::register_irqfd(vm, &irq, COM1_GSI)?;
        let input_ready = eventfd()?;
        let trigger = EventFdTrigger::new(irq);
        let device = match state {
            None => SerialDevice::new(trigger, out),
            Some(state) => {
                SerialDevice::from_state(state, trigger, out).map_err(Error::SerialState)?
            }
        };
        let serial = Arc::new(Mutex::new(
            device.with_input_ready(input_ready.try_clone().map_err(Error::EventFd)?),
        ));
        insert(
            &mut self.pio,
            "the serial port",
            COM1_BASE,
            COM1_LEN,
            serial.clone(),
        )?;
        self.serial = Some((serial, input_ready));
        Ok(())
    }

    /// The i8042 at ports 0x60-0x64, keyboard interrupt on GSI 1: a guest
    /// that writes 0xFE to port 0x64 stops the VM run by `control`.
    ///
    /// # Errors
    ///
    /// An eventfd, the irqfd or the bus refused.
    pub fn attach_i8042(&mut self, vm: &VmFd, control: Arc<VmControl>) -> Result<(), Error> {
        let kbd = eventfd()?;
        ember_irqchip::register_irqfd(vm, &kbd, I8042_KBD_GSI)?;
        let i8042 = Arc::new(Mutex::new(I8042Device::new(
            ResetTrigger::new(control),
            EventFdTrigger::new(kbd),
        )));
        insert(
            &mut self.pio,
            "the i8042",
            I8042_BASE,
            I8042_LEN,
            i8042.clone(),
        )?;
        self.i8042 = Some(i8042);
        Ok(())
    }

    /// Firecracker's boot timer on the first MMIO page (`--boot-timer`),
    /// counting from `start` and `start_cpu_us`.
    ///
    /// # Errors
    ///
    /// The bus refused.
    pub fn attach_boot_timer(&mut self, start: Instant, start_cpu_us: u64) -> Result<(), Error> {
        let timer = Arc::new(Mutex::new(BootTimer::new(start, start_cpu_us)));
        insert(
            &mut self.mmio,
            "the boot timer",
            MMIO32_START,
            BOOT_TIMER_LEN,
            timer,
        )
    }

    /// A virtio-blk device for `drive` in the next slot; a root drive also
    /// gets its `root=` words on the command line. Attach the root drive
    /// first, as Firecracker does.
    ///
    /// # Errors
    ///
    /// The image cannot be opened, or the slot cannot be set up.
    pub fn attach_block(&mut self, vm: &VmFd, drive: &Drive) -> Result<(), Error> {
        let block = Block::new(&BlockConfig::from(drive)).map_err(|source| Error::Drive {
            id: drive.drive_id.clone(),
            source,
        })?;
        let block = Arc::new(Mutex::new(block));
        let name = format!("drive `{}`", drive.drive_id);
        let attached = attach_virtio_device(
            vm,
            &self.mem,
            bus_mut(&mut self.mmio, "a virtio device")?,
            &mut self.slots,
            block.clone(),
            &name,
        )?;
        // The device registers its queue (and io_uring) fds itself.
        self.subscribers.push(block.clone());
        if let Some(root) = drive.root_args() {
            self.kernel_args.push(root);
        }
        self.placed(attached.slot);
        self.drives.push(DriveHandle {
            id: drive.drive_id.clone(),
            block,
            transport: attached.transport,
        });
        Ok(())
    }

    /// A virtio-net device on the TAP `iface.host_dev_name` in the next slot.
    ///
    /// # Errors
    ///
    /// The TAP cannot be opened, or the slot cannot be set up.
    pub fn attach_net(&mut self, vm: &VmFd, iface: &NetworkInterface) -> Result<(), Error> {
        let net = NetConfig::try_from(iface)
            .and_then(Net::new)
            .map_err(|source| Error::Net {
                id: iface.iface_id.clone(),
                source,
            })?;
        let net = Arc::new(Mutex::new(net));
        let name = format!("network interface `{}`", iface.iface_id);
        let attached = attach_virtio_device(
            vm,
            &self.mem,
            bus_mut(&mut self.mmio, "a virtio device")?,
            &mut self.slots,
            net.clone(),
            &name,
        )?;
        // The device registers its queue and TAP fds itself.
        self.subscribers.push(net.clone());
        self.placed(attached.slot);
        self.nets.push(NetHandle {
            id: iface.iface_id.clone(),
            net,
            transport: attached.transport,
        });
        Ok(())
    }

    /// The virtio-vsock device, listening on `vsock.uds_path`, in the next
    /// slot.
    ///
    /// # Errors
    ///
    /// The socket cannot be created, or the slot cannot be set up.
    pub fn attach_vsock(&mut self, vm: &VmFd, vsock: &VsockSection) -> Result<(), Error> {
        let device = Vsock::new(VsockConfig::from(vsock)).map_err(Error::Vsock)?;
        let (device, transport) = self.attach_subscribed(vm, device, "the vsock device")?;
        self.vsock = Some(device);
        self.vsock_transport = Some(transport);
        Ok(())
    }

    /// The virtio-rng entropy device in the next slot; Firecracker attaches
    /// it after the vsock device.
    ///
    /// # Errors
    ///
    /// The rate limiter's timer cannot be created, or the slot cannot be set
    /// up.
    pub fn attach_entropy(&mut self, vm: &VmFd, entropy: &EntropySection) -> Result<(), Error> {
        let device = Entropy::new(&EntropyConfig::from(entropy)).map_err(Error::Entropy)?;
        let (device, transport) = self.attach_subscribed(vm, device, "the entropy device")?;
        self.entropy = Some(device);
        self.entropy_transport = Some(transport);
        Ok(())
    }

    /// The virtio-balloon device in the next slot; Firecracker attaches it
    /// before every other virtio device.
    ///
    /// # Errors
    ///
    /// The statistics timer cannot be created, or the slot cannot be set up.
    pub fn attach_balloon(&mut self, vm: &VmFd, balloon: &BalloonSection) -> Result<(), Error> {
        let device = Balloon::new(&BalloonConfig::from(balloon)).map_err(Error::Balloon)?;
        let (device, transport) = self.attach_subscribed(vm, device, "the balloon device")?;
        self.balloon = Some(device);
        self.balloon_transport = Some(transport);
        Ok(())
    }

    /// Puts `device` in the next virtio slot, as `what`, and hands it to the
    /// event loop, where it registers its own descriptors (queues, timers,
    /// sockets). Returns the device and its transport.
    fn attach_subscribed<D>(
        &mut self,
        vm: &VmFd,
        device: D,
        what: &str,
    ) -> Result<(Arc<Mutex<D>>, Transport), Error>
    where
        D: ember_virtio_mmio::VirtioDevice + MutEventSubscriber + Send + 'static,
    {
        let device = Arc::new(Mutex::new(device));
        let attached = attach_virtio_device(
            vm,
            &self.mem,
            bus_mut(&mut self.mmio, "a virtio device")?,
            &mut self.slots,
            device.clone(),
            what,
        )?;
        self.subscribers.push(device.clone());
        self.placed(attached.slot);
        Ok((device, attached.transport))
    }

    /// Records a virtio slot: its command line entry and its ACPI entry.
    fn placed(&mut self, slot: MmioSlot) {
        self.kernel_args.push(slot.cmdline_entry());
        self.virtio_slots.push(slot);
    }

    /// What the kernel command line must add for these devices: root drive
    /// words and one `virtio_mmio.device=` per slot, in attach order.
    pub fn kernel_args(&self) -> &[String] {
        &self.kernel_args
    }

    /// The virtio-mmio slots in use, in attach order.
    pub fn virtio_slots(&self) -> &[MmioSlot] {
        &self.virtio_slots
    }

    /// The virtio-mmio devices as the ACPI DSDT describes them.
    pub fn acpi_devices(&self) -> Vec<VirtioMmioDeviceInfo> {
        self.virtio_slots
            .iter()
            .map(|s| VirtioMmioDeviceInfo {
                addr: s.addr,
                len: s.len,
                gsi: s.gsi,
            })
            .collect()
    }

    /// The port-I/O bus, to share with the vCPUs; once shared, no device
    /// can be attached ([`Error::BusesInUse`]).
    pub fn pio_bus(&self) -> &Arc<Bus> {
        &self.pio
    }

    /// The MMIO bus, to share with the vCPUs, as [`Devices::pio_bus`].
    pub fn mmio_bus(&self) -> &Arc<Bus> {
        &self.mmio
    }

    /// The event-loop subscribers that run the virtio devices; the list is
    /// left empty.
    pub fn take_subscribers(&mut self) -> Vec<Subscriber> {
        std::mem::take(&mut self.subscribers)
    }

    /// The UART and the eventfd it writes when the guest made room in its
    /// receive FIFO.
    pub fn serial(&self) -> Option<&(Serial, EventFd)> {
        self.serial.as_ref()
    }

    /// The i8042 controller.
    pub fn i8042(&self) -> Option<&I8042> {
        self.i8042.as_ref()
    }

    /// The block devices, in attach order.
    pub fn drives(&self) -> &[DriveHandle] {
        &self.drives
    }

    /// The network interfaces, in attach order.
    pub fn nets(&self) -> &[NetHandle] {
        &self.nets
    }

    /// The vsock device, if attached.
    pub fn vsock(&self) -> Option<&Arc<Mutex<Vsock>>> {
        self.vsock.as_ref()
    }

    /// The vsock device's transport, if attached.
    pub fn vsock_transport(&self) -> Option<&Arc<Mutex<MmioTransport>>> {
        self.vsock_transport.as_ref()
    }

    /// The entropy device, if attached.
    pub fn entropy(&self) -> Option<&Arc<Mutex<Entropy>>> {
        self.entropy.as_ref()
    }

    /// The entropy device's transport, if attached.
    pub fn entropy_transport(&self) -> Option<&Arc<Mutex<MmioTransport>>> {
        self.entropy_transport.as_ref()
    }

    /// The balloon, if attached.
    pub fn balloon(&self) -> Option<&Arc<Mutex<Balloon>>> {
        self.balloon.as_ref()
    }

    /// The balloon's transport, if attached.
    pub fn balloon_transport(&self) -> Option<&Arc<Mutex<MmioTransport>>> {
        self.balloon_transport.as_ref()
    }

    /// Registers the counters of every device with `metrics`, in
    /// Firecracker's groups: `uart`, `i8042`, `block` and
    /// `block_<drive_id>`, `net` and `net_<iface_id>`, `vsock`, `entropy`,
    /// `balloon`.
    pub fn register_metrics(&self, metrics: &Metrics) {
        if let Some((serial, _)) = &self.serial {
            metrics.register("uart", lock(serial).metrics());
        }
        if let Some(i8042) = &self.i8042 {
            metrics.register("i8042", lock(i8042).metrics());
        }
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
        if let Some(e) = &self.entropy {
            metrics.register("entropy", lock(e).metrics().clone());
        }
        if let Some(b) = &self.balloon {
            metrics.register("balloon", lock(b).metrics().clone());
        }
    }
}

/// The bus to attach `device` to, while no vCPU holds it.
fn bus_mut<'a>(bus: &'a mut Arc<Bus>, device: &'static str) -> Result<&'a mut Bus, Error> {
    Arc::get_mut(bus).ok_or(Error::BusesInUse(device))
}

fn insert(
    bus: &mut Arc<Bus>,
    device: &'static str,
    base: u64,
    len: u64,
    dev: Arc<dyn BusDeviceSync>,
) -> Result<(), Error> {
    let bus = bus_mut(bus, device)?;
    let bus_name = match bus.kind() {
        BusKind::Pio => "PIO",
        BusKind::Mmio => "MMIO",
    };
    let range = BusRange::new(base, len).map_err(|source| Error::Bus {
        device,
        bus: bus_name,
        source,
    })?;
    bus.insert(range, dev).map_err(|source| Error::Bus {
        device,
        bus: bus_name,
        source,
    })
}
