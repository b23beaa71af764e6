// SPDX-License-Identifier: Apache-2.0

//! Fuzzes `ember_virtio_mmio::MmioTransport` through `ember_bus::BusDevice`,
//! the calls a vCPU makes on an MMIO exit: register reads and writes of 1, 2,
//! 4 and 8 bytes at offsets 0..0x200 (registers and configuration space),
//! Status writes in any order, queue setup with ring addresses inside, across
//! and outside guest memory, QueueNotify, InterruptACK; plus what the device
//! behind it does (interrupts, configuration changes, failing activation or
//! reset). The device is `test_utils::MockDevice`, which records every call.
//!
//! A plain model of the register file (virtio 1.2 §4.2.2, with the
//! initialization order of §3.1.1) predicts every read, and after each
//! operation the following are checked:
//! - MagicValue, Version, DeviceID and VendorID always read back right;
//!   every other register reads what the model says (Status with
//!   DEVICE_NEEDS_RESET after an order violation, InterruptStatus,
//!   ConfigGeneration, QueueNumMax/QueueReady of the selected queue);
//! - the interrupt EventFd is signalled exactly when an interrupt is raised,
//!   and a queue's notify EventFd exactly when QueueNotify names it;
//! - the device is activated exactly when the model says, and then with the
//!   ready queues as the driver set them up (size, ring addresses, event
//!   index), every ring of which lies inside guest memory (checked against
//!   the memory layout here, not with virtio-queue);
//! - after a write of 0 to Status, everything reads as reset;
//! - the transport's counters match the model's; no panic anywhere.

#![no_main]

use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};

use arbitrary::Arbitrary;
use ember_bus::BusDevice;
use ember_virtio::{InterruptKind, VirtioDevice};
use ember_virtio_mmio::test_utils::MockDevice;
use ember_virtio_mmio::MmioTransport;
use libfuzzer_sys::fuzz_target;
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Guest memory: two regions with a hole between them, so that a ring can
/// start in memory and run off its end.
const REGIONS: [(u64, u64); 2] = [(0, 0x1_0000), (0x2_0000, 0x1_0000)];

// Register offsets (virtio 1.2 §4.2.2, version 2 layout). Defined here
// rather than taken from the transport so that the model stands alone.
const MAGIC_VALUE: u64 = 0x000;
const VERSION: u64 = 0x004;
const DEVICE_ID: u64 = 0x008;
const VENDOR_ID: u64 = 0x00c;
const DEVICE_FEATURES: u64 = 0x010;
const DEVICE_FEATURES_SEL: u64 = 0x014;
const DRIVER_FEATURES: u64 = 0x020;
const DRIVER_FEATURES_SEL: u64 = 0x024;
const QUEUE_SEL: u64 = 0x030;
const QUEUE_NUM_MAX: u64 = 0x034;
const QUEUE_NUM: u64 = 0x038;
const QUEUE_READY: u64 = 0x044;
const QUEUE_NOTIFY: u64 = 0x050;
const INTERRUPT_STATUS: u64 = 0x060;
const INTERRUPT_ACK: u64 = 0x064;
const STATUS: u64 = 0x070;
const QUEUE_DESC_LOW: u64 = 0x080;
const QUEUE_DESC_HIGH: u64 = 0x084;
const QUEUE_DRIVER_LOW: u64 = 0x090;
const QUEUE_DRIVER_HIGH: u64 = 0x094;
const QUEUE_DEVICE_LOW: u64 = 0x0a0;
const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const SHM_SEL: u64 = 0x0ac;
const SHM_LEN_LOW: u64 = 0x0b0;
const SHM_LEN_HIGH: u64 = 0x0b4;
const SHM_BASE_LOW: u64 = 0x0b8;
const SHM_BASE_HIGH: u64 = 0x0bc;
const CONFIG_GENERATION: u64 = 0x0fc;
const CONFIG: u64 = 0x100;

/// "virt" in little-endian ASCII.
const MAGIC: u32 = 0x7472_6976;

// Device status bits (virtio 1.2 §2.1).
const ACKNOWLEDGE: u32 = 1;
const DRIVER: u32 = 2;
const DRIVER_OK: u32 = 4;
const FEATURES_OK: u32 = 8;
const NEEDS_RESET: u32 = 64;
const FAILED: u32 = 128;

// InterruptStatus bits (virtio 1.2 §4.2.2).
const INT_VRING: u32 = 1;
const INT_CONFIG: u32 = 2;

const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// Bytes of configuration space of a `MockDevice`.
const CONFIG_SIZE: usize = 16;

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Size {
    B1,
    B2,
    B4,
    B8,
}

impl Size {
    fn bytes(self) -> usize {
        match self {
            Size::B1 => 1,
            Size::B2 => 2,
            Size::B4 => 4,
            Size::B8 => 8,
        }
    }
}

/// Where an access goes, inside the first 0x200 bytes of the window.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Offset {
    /// The `n`-th 32-bit register (mod 64).
    Reg(u8),
    /// `n` bytes into the configuration space (mod 32: past its end too).
    Config(u8),
    /// Any offset (mod 0x200).
    Raw(u16),
}

impl Offset {
    fn get(self) -> u64 {
        match self {
            Offset::Reg(n) => u64::from(n % 64) * 4,
            Offset::Config(n) => CONFIG + u64::from(n % 32),
            Offset::Raw(n) => u64::from(n % 0x200),
        }
    }
}

/// A ring address.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Addr {
    /// A 16-byte aligned address in the first MiB: in a region, across the
    /// end of one, or in the hole.
    Low(u16),
    /// Anything, misaligned or near the top of the address space included.
    Raw(u64),
}

impl Addr {
    fn get(self) -> u64 {
        match self {
            Addr::Low(n) => u64::from(n) << 4,
            Addr::Raw(a) => a,
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Op {
    Read {
        offset: Offset,
        size: Size,
    },
    Write {
        offset: Offset,
        size: Size,
        value: u64,
    },
    /// A 32-bit Status write of any value.
    Status(u8),
    /// Driver step 7 for one queue: QueueSel, QueueNum, the six address
    /// registers, QueueReady = 1, each one checked.
    SetupQueue {
        index: u8,
        size: u16,
        desc: Addr,
        driver: Addr,
        device: Addr,
    },
    /// The device signals used buffers, or changes one byte of its
    /// configuration (which raises a configuration interrupt when active).
    DeviceEvent {
        config: bool,
        offset: u8,
        value: u8,
    },
    /// From now on the device fails `activate` / refuses `reset`.
    DeviceFaults {
        fail_activate: bool,
        refuse_reset: bool,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    device_type: u32,
    /// Offered features (VIRTIO_F_VERSION_1 must be among them for
    /// FEATURES_OK to stick).
    features: u64,
    /// Number of queues minus one (mod 4).
    queues: u8,
    /// log2 of each queue's maximum size (mod 16).
    max_log2: [u8; 4],
    ops: Vec<Op>,
}

fn guest_memory() -> &'static GuestMemoryMmap {
    static MEM: OnceLock<GuestMemoryMmap> = OnceLock::new();
    MEM.get_or_init(|| {
        let ranges: Vec<(GuestAddress, usize)> = REGIONS
            .iter()
            .map(|&(base, len)| (GuestAddress(base), len as usize))
            .collect();
        GuestMemoryMmap::from_ranges(&ranges).expect("guest memory")
    })
}

/// Whether `len` bytes at `addr` lie inside one memory region (the regions
/// are not adjacent, so a range cannot span two).
fn inside_memory(addr: u64, len: u64) -> bool {
    let Some(end) = addr.checked_add(len) else {
        return false;
    };
    REGIONS
        .iter()
        .any(|&(base, size)| addr >= base && end <= base + size)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ModelQueue {
    max: u16,
    size: u16,
    desc: u64,
    driver: u64,
    device: u64,
    ready: bool,
}

impl ModelQueue {
    fn new(max: u16) -> Self {
        ModelQueue {
            max,
            size: max,
            desc: 0,
            driver: 0,
            device: 0,
            ready: false,
        }
    }

    /// Split ring sizes (virtio 1.2 §2.7): descriptor table 16 bytes per
    /// entry, available ring flags + idx + ring + used_event, used ring
    /// flags + idx + 8-byte elements + avail_event.
    fn in_memory(&self) -> bool {
        let n = u64::from(self.size);
        inside_memory(self.desc, 16 * n)
            && inside_memory(self.driver, 6 + 2 * n)
            && inside_memory(self.device, 6 + 8 * n)
    }
}

/// Counters the transport keeps (`MmioMetrics`).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Counters {
    invalid_access_size: u64,
    invalid_register: u64,
    invalid_config_access: u64,
    order_violations: u64,
    features_rejected: u64,
    activations: u64,
    activate_fails: u64,
    resets: u64,
    reset_fails: u64,
    notifies: u64,
    invalid_notifies: u64,
}

/// What the driver should see, and what the device should have been told.
#[derive(Debug)]
struct Model {
    device_type: u32,
    offered: u64,
    queues: Vec<ModelQueue>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    features_beyond_64: bool,
    acked: u64,
    queue_sel: u32,
    activated: bool,
    int_status: u32,
    config_generation: u32,
    config: [u8; CONFIG_SIZE],
    /// Interrupt EventFd signals since the last check.
    raised: u64,
    /// Notify EventFd signals per queue since the last check.
    notified: Vec<u64>,
    counters: Counters,
    // The mock device's view.
    device_active: bool,
    device_activations: usize,
    device_resets: usize,
    device_acked: Option<u64>,
    fail_activate: bool,
    refuse_reset: bool,
}

impl Model {
    fn new(device_type: u32, offered: u64, max_sizes: &[u16]) -> Self {
        let mut config = [0u8; CONFIG_SIZE];
        for (i, b) in config.iter_mut().enumerate() {
            *b = i as u8;
        }
        Model {
            device_type,
            offered,
            queues: max_sizes.iter().map(|&m| ModelQueue::new(m)).collect(),
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            features_beyond_64: false,
            acked: 0,
            queue_sel: 0,
            activated: false,
            int_status: 0,
            config_generation: 0,
            config,
            raised: 0,
            notified: vec![0; max_sizes.len()],
            counters: Counters::default(),
            device_active: false,
            device_activations: 0,
            device_resets: 0,
            device_acked: None,
            fail_activate: false,
            refuse_reset: false,
        }
    }

    fn selected(&mut self) -> Option<&mut ModelQueue> {
        self.queues.get_mut(usize::try_from(self.queue_sel).ok()?)
    }

    /// virtio 1.2 §2.1.2: on a driver error the device may set
    /// DEVICE_NEEDS_RESET, and must then send a configuration change
    /// notification (once: the bit stays until the reset).
    fn violation(&mut self) {
        self.counters.order_violations += 1;
        if self.status & NEEDS_RESET == 0 {
            self.status |= NEEDS_RESET;
            self.int_status |= INT_CONFIG;
            self.raised += 1;
        }
    }

    /// Queue registers belong between FEATURES_OK and DRIVER_OK (virtio 1.2
    /// §3.1.1 step 7).
    fn queue_setup_allowed(&self) -> bool {
        self.status & (ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK | FAILED | NEEDS_RESET)
            == ACKNOWLEDGE | DRIVER | FEATURES_OK
    }

    /// Feature bits are written between DRIVER and FEATURES_OK (steps 3-5).
    fn feature_write_allowed(&self) -> bool {
        self.status & (ACKNOWLEDGE | DRIVER | FEATURES_OK | FAILED | NEEDS_RESET)
            == ACKNOWLEDGE | DRIVER
    }

    fn read(&mut self, offset: u64, len: usize) -> Vec<u8> {
        if offset >= CONFIG {
            let at = offset - CONFIG;
            if config_access_ok(at, len) {
                let at = at as usize;
                return self.config[at..at + len].to_vec();
            }
            self.counters.invalid_config_access += 1;
            return vec![0; len];
        }
        // virtio 1.2 §4.2.2.2: registers are accessed 32 bits wide and
        // aligned; anything else reads as zeroes.
        if len != 4 || !offset.is_multiple_of(4) {
            self.counters.invalid_access_size += 1;
            return vec![0; len];
        }
        let value = match offset {
            MAGIC_VALUE => MAGIC,
            VERSION => 2,
            DEVICE_ID => self.device_type,
            VENDOR_ID => 0,
            DEVICE_FEATURES => match self.device_features_sel {
                0 => self.offered as u32,
                1 => (self.offered >> 32) as u32,
                _ => 0,
            },
            QUEUE_NUM_MAX => self.selected().map_or(0, |q| u32::from(q.max)),
            QUEUE_READY => self.selected().map_or(0, |q| u32::from(q.ready)),
            INTERRUPT_STATUS => self.int_status,
            STATUS => self.status,
            // No shared memory regions: length (and base) -1.
            SHM_LEN_LOW | SHM_LEN_HIGH | SHM_BASE_LOW | SHM_BASE_HIGH => u32::MAX,
            CONFIG_GENERATION => self.config_generation,
            _ => {
                self.counters.invalid_register += 1;
                0
            }
        };
        value.to_le_bytes().to_vec()
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG {
            // Configuration writes count once the driver drives the device.
            if self.status & DRIVER == 0 || self.status & FAILED != 0 {
                self.counters.invalid_config_access += 1;
                return;
            }
            let at = offset - CONFIG;
            if config_access_ok(at, data.len()) {
                let at = at as usize;
                self.config[at..at + data.len()].copy_from_slice(data);
            } else {
                self.counters.invalid_config_access += 1;
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            self.counters.invalid_access_size += 1;
            return;
        };
        if !offset.is_multiple_of(4) {
            self.counters.invalid_access_size += 1;
            return;
        }
        let value = u32::from_le_bytes(bytes);
        match offset {
            DEVICE_FEATURES_SEL => self.device_features_sel = value,
            DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            DRIVER_FEATURES => {
                if !self.feature_write_allowed() {
                    self.violation();
                    return;
                }
                match self.driver_features_sel {
                    0 => {
                        self.driver_features =
                            (self.driver_features & !0xffff_ffff) | u64::from(value)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
                    }
                    _ => self.features_beyond_64 |= value != 0,
                }
            }
            QUEUE_SEL => self.queue_sel = value,
            QUEUE_NUM | QUEUE_DESC_LOW | QUEUE_DESC_HIGH | QUEUE_DRIVER_LOW | QUEUE_DRIVER_HIGH
            | QUEUE_DEVICE_LOW | QUEUE_DEVICE_HIGH => self.write_queue_field(offset, value),
            QUEUE_READY => self.write_queue_ready(value),
            QUEUE_NOTIFY => {
                self.counters.notifies += 1;
                match self.notified.get_mut(value as usize) {
                    Some(n) => *n += 1,
                    None => self.counters.invalid_notifies += 1,
                }
            }
            INTERRUPT_ACK => self.int_status &= !value,
            STATUS => self.write_status(value),
            SHM_SEL => {}
            _ => self.counters.invalid_register += 1,
        }
    }

    fn write_queue_field(&mut self, offset: u64, value: u32) {
        if !self.queue_setup_allowed() {
            self.violation();
            return;
        }
        let Some(q) = self.selected() else {
            self.violation();
            return;
        };
        // virtio 1.2 §4.2.2.2: no queue register writes while QueueReady.
        if q.ready {
            self.violation();
            return;
        }
        let low = |addr: u64| (addr & !0xffff_ffff) | u64::from(value);
        let high = |addr: u64| (addr & 0xffff_ffff) | (u64::from(value) << 32);
        // Sizes are powers of two up to QueueNumMax; the rings are aligned to
        // 16, 2 and 4 bytes (virtio 1.2 §2.7). A refused value is not stored.
        let accepted = match offset {
            QUEUE_NUM => match u16::try_from(value) {
                Ok(size) if size != 0 && size.is_power_of_two() && size <= q.max => {
                    q.size = size;
                    true
                }
                _ => false,
            },
            QUEUE_DESC_LOW | QUEUE_DESC_HIGH => {
                let addr = if offset == QUEUE_DESC_LOW {
                    low(q.desc)
                } else {
                    high(q.desc)
                };
                let ok = addr % 16 == 0;
                if ok {
                    q.desc = addr;
                }
                ok
            }
            QUEUE_DRIVER_LOW | QUEUE_DRIVER_HIGH => {
                let addr = if offset == QUEUE_DRIVER_LOW {
                    low(q.driver)
                } else {
                    high(q.driver)
                };
                let ok = addr % 2 == 0;
                if ok {
                    q.driver = addr;
                }
                ok
            }
            _ => {
                let addr = if offset == QUEUE_DEVICE_LOW {
                    low(q.device)
                } else {
                    high(q.device)
                };
                let ok = addr % 4 == 0;
                if ok {
                    q.device = addr;
                }
                ok
            }
        };
        if !accepted {
            self.violation();
        }
    }

    fn write_queue_ready(&mut self, value: u32) {
        match value {
            // Tearing a queue down before DRIVER_OK is always allowed.
            0 if self.status & DRIVER_OK == 0 => match self.selected() {
                Some(q) => q.ready = false,
                None => self.counters.invalid_register += 1,
            },
            1 if self.queue_setup_allowed() => match self.selected() {
                Some(q) => q.ready = true,
                None => self.violation(),
            },
            _ => self.violation(),
        }
    }

    /// virtio 1.2 §3.1.1: 0 resets; otherwise each write adds the next bit
    /// (ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK); FAILED may be set at
    /// any time; DEVICE_NEEDS_RESET is the device's and is ignored.
    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let value = value & !NEEDS_RESET;
        if value & FAILED != 0 {
            self.status |= FAILED;
            return;
        }
        let current = self.status & !NEEDS_RESET;
        if value == current {
            return;
        }
        if self.status & (NEEDS_RESET | FAILED) != 0 {
            self.counters.order_violations += 1;
            return;
        }
        const AD: u32 = ACKNOWLEDGE | DRIVER;
        const ADF: u32 = AD | FEATURES_OK;
        match (current, value) {
            (0, ACKNOWLEDGE) | (ACKNOWLEDGE, AD) => self.status = value,
            (AD, ADF) => {
                let accepted = self.driver_features;
                // virtio 1.2 §2.2.2, §6.1: the device keeps FEATURES_OK only
                // for a subset of its offer that includes VERSION_1.
                if self.features_beyond_64
                    || accepted & !self.offered != 0
                    || accepted & VIRTIO_F_VERSION_1 == 0
                {
                    self.counters.features_rejected += 1;
                } else {
                    self.acked = accepted;
                    self.device_acked = Some(accepted);
                    self.status |= FEATURES_OK;
                }
            }
            (ADF, v) if v == ADF | DRIVER_OK => {
                let queues_ok = self.queues.iter().all(|q| !q.ready || q.in_memory());
                if queues_ok && !self.fail_activate {
                    self.counters.activations += 1;
                    self.device_activations += 1;
                    self.device_active = true;
                    self.activated = true;
                    self.status |= DRIVER_OK;
                } else {
                    self.counters.activate_fails += 1;
                    self.violation();
                }
            }
            _ => self.violation(),
        }
    }

    fn reset(&mut self) {
        self.counters.resets += 1;
        self.device_resets += 1;
        let stopped = !self.refuse_reset;
        if stopped {
            self.device_active = false;
        }
        for q in &mut self.queues {
            *q = ModelQueue::new(q.max);
        }
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.features_beyond_64 = false;
        self.acked = 0;
        self.queue_sel = 0;
        self.activated = false;
        self.int_status = 0;
        self.status = if stopped {
            0
        } else {
            self.counters.reset_fails += 1;
            FAILED
        };
    }
}

fn config_access_ok(offset: u64, len: usize) -> bool {
    matches!(len, 1 | 2 | 4 | 8)
        && offset
            .checked_add(len as u64)
            .is_some_and(|end| end <= CONFIG_SIZE as u64)
}

struct Harness {
    transport: MmioTransport,
    device: Arc<Mutex<MockDevice>>,
    irq: EventFd,
    model: Model,
}

fn lock(device: &Mutex<MockDevice>) -> MutexGuard<'_, MockDevice> {
    device.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Harness {
    fn read(&mut self, offset: u64, len: usize) {
        let mut data = [0xa5u8; 8];
        let data = &mut data[..len];
        self.transport.read(0, offset, data);
        let want = self.model.read(offset, len);
        assert_eq!(data, &want[..], "read of {len} byte(s) at {offset:#x}");
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.transport.write(0, offset, data);
        self.model.write(offset, data);
        self.check();
    }

    fn write32(&mut self, offset: u64, value: u32) {
        self.write(offset, &value.to_le_bytes());
    }

    fn reg(&mut self, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        self.transport.read(0, offset, &mut data);
        u32::from_le_bytes(data)
    }

    /// Compares everything observable with the model.
    fn check(&mut self) {
        assert_eq!(self.reg(MAGIC_VALUE), MAGIC, "MagicValue");
        assert_eq!(self.reg(VERSION), 2, "Version");
        assert_eq!(self.reg(DEVICE_ID), self.model.device_type, "DeviceID");
        assert_eq!(self.reg(VENDOR_ID), 0, "VendorID");
        for offset in [
            STATUS,
            INTERRUPT_STATUS,
            CONFIG_GENERATION,
            QUEUE_NUM_MAX,
            QUEUE_READY,
            DEVICE_FEATURES,
        ] {
            let got = self.reg(offset);
            let want = self.model.read(offset, 4);
            assert_eq!(
                got.to_le_bytes(),
                want[..],
                "register {offset:#x} (model {:?})",
                self.model
            );
        }
        let model = &mut self.model;
        assert_eq!(self.transport.device_status(), model.status);
        assert_eq!(self.transport.is_activated(), model.activated);
        assert_eq!(self.transport.acked_features(), model.acked);

        // Interrupt line and queue notifications.
        let raised = self.irq.read().unwrap_or(0);
        assert_eq!(raised, model.raised, "interrupt EventFd signals");
        model.raised = 0;
        for (index, evt) in self.transport.queue_notify_events().iter().enumerate() {
            let got = evt.read().unwrap_or(0);
            assert_eq!(
                got, model.notified[index],
                "notify EventFd of queue {index}"
            );
            model.notified[index] = 0;
        }

        let m = self.transport.metrics();
        let load = |c: &ember_metrics::Counter| c.count();
        let counters = Counters {
            invalid_access_size: load(&m.invalid_access_size),
            invalid_register: load(&m.invalid_register),
            invalid_config_access: load(&m.invalid_config_access),
            order_violations: load(&m.order_violations),
            features_rejected: load(&m.features_rejected),
            activations: load(&m.activations),
            activate_fails: load(&m.activate_fails),
            resets: load(&m.resets),
            reset_fails: load(&m.reset_fails),
            notifies: load(&m.notifies),
            invalid_notifies: load(&m.invalid_notifies),
        };
        assert_eq!(counters, model.counters, "transport counters");

        // The device.
        let dev = lock(&self.device);
        assert_eq!(dev.activations, model.device_activations, "activations");
        assert_eq!(dev.resets, model.device_resets, "device resets");
        assert_eq!(dev.acked_features, model.device_acked, "acked features");
        assert_eq!(dev.config[..], model.config[..], "configuration space");
        assert_eq!(dev.active.is_some(), model.device_active, "device active");
        if let Some(active) = &dev.active {
            for aq in &active.queues {
                let q = &aq.queue;
                let n = u64::from(q.size());
                assert!(
                    inside_memory(q.desc_table(), 16 * n)
                        && inside_memory(q.avail_ring(), 6 + 2 * n)
                        && inside_memory(q.used_ring(), 6 + 8 * n),
                    "queue {} activated with rings outside guest memory: {q:?}",
                    aq.index
                );
            }
            // Only meaningful while the transport still runs the device (a
            // refused reset leaves the device active with its old queues).
            if model.activated {
                let got: Vec<(u16, ModelQueue, bool)> = active
                    .queues
                    .iter()
                    .map(|aq| {
                        let q = &aq.queue;
                        let max = model
                            .queues
                            .get(usize::from(aq.index))
                            .unwrap_or_else(|| {
                                panic!("activated queue {} does not exist", aq.index)
                            })
                            .max;
                        let mq = ModelQueue {
                            max,
                            size: q.size(),
                            desc: q.desc_table(),
                            driver: q.avail_ring(),
                            device: q.used_ring(),
                            ready: q.ready(),
                        };
                        (aq.index, mq, q.event_idx_enabled())
                    })
                    .collect();
                let event_idx = model.acked & VIRTIO_RING_F_EVENT_IDX != 0;
                let want: Vec<(u16, ModelQueue, bool)> = model
                    .queues
                    .iter()
                    .enumerate()
                    .filter(|(_, q)| q.ready)
                    .map(|(i, q)| (i as u16, *q, event_idx))
                    .collect();
                assert_eq!(got, want, "queues handed to the device");
            }
        }
    }

    /// After a write of 0 to Status: every register reads as after power-on
    /// (virtio 1.2 §2.1, §4.2.2), for every queue.
    fn check_reset(&mut self) {
        let refused = self.model.refuse_reset;
        let status = self.reg(STATUS);
        assert_eq!(
            status,
            if refused { FAILED } else { 0 },
            "Status after reset"
        );
        assert_eq!(self.reg(INTERRUPT_STATUS), 0, "InterruptStatus after reset");
        assert!(!self.transport.is_activated());
        assert_eq!(self.transport.acked_features(), 0);
        assert_eq!(
            u64::from(self.reg(DEVICE_FEATURES)),
            self.model.offered & 0xffff_ffff,
            "DeviceFeaturesSel is 0 after reset"
        );
        if !refused {
            assert!(lock(&self.device).active.is_none(), "device still active");
        }
        let max: Vec<u16> = self.model.queues.iter().map(|q| q.max).collect();
        for (index, max) in max.into_iter().enumerate() {
            self.write32(QUEUE_SEL, index as u32);
            assert_eq!(self.reg(QUEUE_READY), 0, "queue {index} ready after reset");
            assert_eq!(self.reg(QUEUE_NUM_MAX), u32::from(max));
        }
        self.write32(QUEUE_SEL, 0);
    }
}

fuzz_target!(|input: Input| {
    let count = usize::from(input.queues % 4) + 1;
    let max_sizes: Vec<u16> = input.max_log2[..count]
        .iter()
        .map(|l| 1u16 << (l % 16))
        .collect();
    let mut mock = MockDevice::new(input.device_type, &max_sizes);
    mock.features = input.features;
    let device = Arc::new(Mutex::new(mock));
    let dyn_device: Arc<Mutex<dyn VirtioDevice>> = device.clone();
    let irq = EventFd::new(EFD_NONBLOCK).expect("eventfd");
    let transport = MmioTransport::new(
        guest_memory().clone(),
        dyn_device,
        irq.try_clone().expect("eventfd clone"),
    )
    .expect("valid queue sizes");
    let mut h = Harness {
        transport,
        device,
        irq,
        model: Model::new(input.device_type, input.features, &max_sizes),
    };
    h.check();

    for op in input.ops {
        match op {
            Op::Read { offset, size } => {
                h.read(offset.get(), size.bytes());
                h.check();
            }
            Op::Write {
                offset,
                size,
                value,
            } => {
                let offset = offset.get();
                let data = value.to_le_bytes();
                h.write(offset, &data[..size.bytes()]);
                if offset == STATUS && size.bytes() == 4 && value as u32 == 0 {
                    h.check_reset();
                }
            }
            Op::Status(value) => {
                h.write32(STATUS, u32::from(value));
                if value == 0 {
                    h.check_reset();
                }
            }
            Op::SetupQueue {
                index,
                size,
                desc,
                driver,
                device,
            } => {
                let (desc, driver, device) = (desc.get(), driver.get(), device.get());
                h.write32(QUEUE_SEL, u32::from(index % 8));
                h.write32(QUEUE_NUM, u32::from(size));
                h.write32(QUEUE_DESC_LOW, desc as u32);
                h.write32(QUEUE_DESC_HIGH, (desc >> 32) as u32);
                h.write32(QUEUE_DRIVER_LOW, driver as u32);
                h.write32(QUEUE_DRIVER_HIGH, (driver >> 32) as u32);
                h.write32(QUEUE_DEVICE_LOW, device as u32);
                h.write32(QUEUE_DEVICE_HIGH, (device >> 32) as u32);
                h.write32(QUEUE_READY, 1);
            }
            Op::DeviceEvent {
                config,
                offset,
                value,
            } => {
                let mut dev = lock(&h.device);
                let active = dev.active.is_some();
                if config {
                    let at = usize::from(offset) % CONFIG_SIZE;
                    dev.change_config(at, &[value]).expect("config interrupt");
                    h.model.config[at] = value;
                    if active {
                        // virtio 1.2 §2.5: a configuration change bumps
                        // ConfigGeneration.
                        h.model.config_generation = h.model.config_generation.wrapping_add(1);
                        h.model.int_status |= INT_CONFIG;
                        h.model.raised += 1;
                    }
                } else if let Some(a) = &dev.active {
                    a.interrupt
                        .trigger(InterruptKind::Vring)
                        .expect("used buffer interrupt");
                    h.model.int_status |= INT_VRING;
                    h.model.raised += 1;
                }
                drop(dev);
                h.check();
            }
            Op::DeviceFaults {
                fail_activate,
                refuse_reset,
            } => {
                let mut dev = lock(&h.device);
                dev.fail_activate = fail_activate;
                dev.refuse_reset = refuse_reset;
                drop(dev);
                h.model.fail_activate = fail_activate;
                h.model.refuse_reset = refuse_reset;
            }
        }
    }
});
