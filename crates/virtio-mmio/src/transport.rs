// SPDX-License-Identifier: Apache-2.0

//! The virtio-mmio register file (virtio 1.2 §4.2.2, version 2 only).

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use ember_bus::BusDevice;
use ember_metrics::{metric_group, Counter};
use log::{debug, warn};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::{
    VIRTIO_MMIO_CONFIG, VIRTIO_MMIO_CONFIG_GENERATION, VIRTIO_MMIO_DEVICE_FEATURES,
    VIRTIO_MMIO_DEVICE_FEATURES_SEL, VIRTIO_MMIO_DEVICE_ID, VIRTIO_MMIO_DRIVER_FEATURES,
    VIRTIO_MMIO_DRIVER_FEATURES_SEL, VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INTERRUPT_STATUS,
    VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING, VIRTIO_MMIO_MAGIC_VALUE,
    VIRTIO_MMIO_QUEUE_AVAIL_HIGH, VIRTIO_MMIO_QUEUE_AVAIL_LOW, VIRTIO_MMIO_QUEUE_DESC_HIGH,
    VIRTIO_MMIO_QUEUE_DESC_LOW, VIRTIO_MMIO_QUEUE_NOTIFY, VIRTIO_MMIO_QUEUE_NUM,
    VIRTIO_MMIO_QUEUE_NUM_MAX, VIRTIO_MMIO_QUEUE_READY, VIRTIO_MMIO_QUEUE_SEL,
    VIRTIO_MMIO_QUEUE_USED_HIGH, VIRTIO_MMIO_QUEUE_USED_LOW, VIRTIO_MMIO_SHM_BASE_HIGH,
    VIRTIO_MMIO_SHM_BASE_LOW, VIRTIO_MMIO_SHM_LEN_HIGH, VIRTIO_MMIO_SHM_LEN_LOW,
    VIRTIO_MMIO_SHM_SEL, VIRTIO_MMIO_STATUS, VIRTIO_MMIO_VENDOR_ID, VIRTIO_MMIO_VERSION,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use ember_virtio::{
    features_page, ActivateError, ActiveQueue, InterruptKind, VirtioDevice, VirtioInterrupt,
};

/// Size of the MMIO window of one device: registers up to 0xff, configuration
/// space from 0x100 (virtio 1.2 §4.2.2).
pub const MMIO_SLOT_SIZE: u64 = 0x1000;
/// Offset of QueueNotify: the VMM registers one ioeventfd per queue here,
/// with the queue index as datamatch (virtio 1.2 §4.2.2, §4.2.3.3).
pub const NOTIFY_REG_OFFSET: u64 = VIRTIO_MMIO_QUEUE_NOTIFY as u64;
/// Offset of the device configuration space (virtio 1.2 §4.2.2, "Config").
pub const CONFIG_SPACE_OFFSET: u64 = VIRTIO_MMIO_CONFIG as u64;
/// MagicValue: "virt" in little-endian ASCII (virtio 1.2 §4.2.2).
pub const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// Version: 2 is the non-legacy interface (virtio 1.2 §4.2.2).
pub const MMIO_VERSION: u32 = 2;
/// VendorID reported to the driver (the same value as Firecracker).
pub const VENDOR_ID: u32 = 0;

// Register offsets as u64 for matching on bus offsets.
const REG_MAGIC_VALUE: u64 = VIRTIO_MMIO_MAGIC_VALUE as u64;
const REG_VERSION: u64 = VIRTIO_MMIO_VERSION as u64;
const REG_DEVICE_ID: u64 = VIRTIO_MMIO_DEVICE_ID as u64;
const REG_VENDOR_ID: u64 = VIRTIO_MMIO_VENDOR_ID as u64;
const REG_DEVICE_FEATURES: u64 = VIRTIO_MMIO_DEVICE_FEATURES as u64;
const REG_DEVICE_FEATURES_SEL: u64 = VIRTIO_MMIO_DEVICE_FEATURES_SEL as u64;
const REG_DRIVER_FEATURES: u64 = VIRTIO_MMIO_DRIVER_FEATURES as u64;
const REG_DRIVER_FEATURES_SEL: u64 = VIRTIO_MMIO_DRIVER_FEATURES_SEL as u64;
const REG_QUEUE_SEL: u64 = VIRTIO_MMIO_QUEUE_SEL as u64;
const REG_QUEUE_NUM_MAX: u64 = VIRTIO_MMIO_QUEUE_NUM_MAX as u64;
const REG_QUEUE_NUM: u64 = VIRTIO_MMIO_QUEUE_NUM as u64;
const REG_QUEUE_READY: u64 = VIRTIO_MMIO_QUEUE_READY as u64;
const REG_QUEUE_NOTIFY: u64 = VIRTIO_MMIO_QUEUE_NOTIFY as u64;
const REG_INTERRUPT_STATUS: u64 = VIRTIO_MMIO_INTERRUPT_STATUS as u64;
const REG_INTERRUPT_ACK: u64 = VIRTIO_MMIO_INTERRUPT_ACK as u64;
const REG_STATUS: u64 = VIRTIO_MMIO_STATUS as u64;
const REG_QUEUE_DESC_LOW: u64 = VIRTIO_MMIO_QUEUE_DESC_LOW as u64;
const REG_QUEUE_DESC_HIGH: u64 = VIRTIO_MMIO_QUEUE_DESC_HIGH as u64;
const REG_QUEUE_DRIVER_LOW: u64 = VIRTIO_MMIO_QUEUE_AVAIL_LOW as u64;
const REG_QUEUE_DRIVER_HIGH: u64 = VIRTIO_MMIO_QUEUE_AVAIL_HIGH as u64;
const REG_QUEUE_DEVICE_LOW: u64 = VIRTIO_MMIO_QUEUE_USED_LOW as u64;
const REG_QUEUE_DEVICE_HIGH: u64 = VIRTIO_MMIO_QUEUE_USED_HIGH as u64;
const REG_SHM_SEL: u64 = VIRTIO_MMIO_SHM_SEL as u64;
const REG_SHM_LEN_LOW: u64 = VIRTIO_MMIO_SHM_LEN_LOW as u64;
const REG_SHM_LEN_HIGH: u64 = VIRTIO_MMIO_SHM_LEN_HIGH as u64;
const REG_SHM_BASE_LOW: u64 = VIRTIO_MMIO_SHM_BASE_LOW as u64;
const REG_SHM_BASE_HIGH: u64 = VIRTIO_MMIO_SHM_BASE_HIGH as u64;
const REG_CONFIG_GENERATION: u64 = VIRTIO_MMIO_CONFIG_GENERATION as u64;

// Device status bits (virtio 1.2 §2.1).
pub(crate) const ACKNOWLEDGE: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
pub(crate) const DRIVER: u32 = VIRTIO_CONFIG_S_DRIVER;
pub(crate) const FEATURES_OK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
pub(crate) const DRIVER_OK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;
pub(crate) const NEEDS_RESET: u32 = VIRTIO_CONFIG_S_NEEDS_RESET;
pub(crate) const FAILED: u32 = VIRTIO_CONFIG_S_FAILED;

/// Most queues a device may declare: QueueSel and QueueNotify carry the index
/// as a 32-bit value, but every virtio device type uses far fewer, and
/// [`ActiveQueue::index`] is a u16.
const MAX_QUEUES: usize = u16::MAX as usize;

/// Errors of the transport: building an [`MmioTransport`], and why an
/// activation at DRIVER_OK failed (reported through logs and
/// [`MmioMetrics::activate_fails`], since the driver only sees
/// DEVICE_NEEDS_RESET).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A queue maximum size that virtio-queue refuses.
    #[error("queue {index}: maximum size {size} is not a power of two in 1..=32768")]
    InvalidQueueMaxSize {
        /// Queue index.
        index: usize,
        /// The size the device declared.
        size: u16,
    },
    /// The device declares more queues than an index register can select.
    #[error("device declares {0} queues, more than the {MAX_QUEUES} a transport supports")]
    TooManyQueues(usize),
    /// Creating (or, at activation, cloning) the EventFd signalled by
    /// QueueNotify failed.
    #[error("failed to create the notify EventFd of queue {index}: {source}")]
    NotifyEventFd {
        /// Queue index.
        index: usize,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A ready queue does not fit in guest memory.
    #[error(
        "queue {index} (size {size}, descriptors {desc:#x}, driver area {driver:#x}, device \
         area {device:#x}) is not inside guest memory"
    )]
    QueueOutsideMemory {
        /// Queue index.
        index: usize,
        /// QueueNum.
        size: u16,
        /// Descriptor table address.
        desc: u64,
        /// Driver area (available ring) address.
        driver: u64,
        /// Device area (used ring) address.
        device: u64,
    },
    /// virtio-queue refused the queue configuration.
    #[error("queue {index}: {source}")]
    Queue {
        /// Queue index.
        index: usize,
        /// What virtio-queue reported.
        #[source]
        source: virtio_queue::Error,
    },
    /// The device refused to start.
    #[error("device refused to activate: {0}")]
    Activate(#[from] ActivateError),
}

metric_group! {
    /// Counters of what the driver did that the transport refused or noticed.
    ///
    /// All counters only ever increase; they are atomics so that a metrics
    /// thread can read them without taking the bus lock. The struct reports
    /// itself as a [`MetricGroup`](ember_metrics::MetricGroup).
    #[derive(Debug, Default)]
    pub struct MmioMetrics {
        /// Register accesses that were not 32 bits wide and aligned (ignored).
        pub invalid_access_size: Counter,
        /// Accesses to offsets that hold no register, reads of write-only
        /// registers and writes to read-only registers (ignored).
        pub invalid_register: Counter,
        /// Configuration space accesses outside its length or of a size other
        /// than 1, 2, 4 or 8 bytes, or writes before the driver bound (ignored).
        pub invalid_config_access: Counter,
        /// Handshake violations that set DEVICE_NEEDS_RESET.
        pub order_violations: Counter,
        /// FEATURES_OK writes refused because of the accepted feature set.
        pub features_rejected: Counter,
        /// Successful activations at DRIVER_OK.
        pub activations: Counter,
        /// Activations refused by queue validation or by the device.
        pub activate_fails: Counter,
        /// Resets (writes of 0 to Status).
        pub resets: Counter,
        /// Resets the device could not complete (the transport reports FAILED).
        pub reset_fails: Counter,
        /// QueueNotify writes that reached the transport (no ioeventfd).
        pub notifies: Counter,
        /// QueueNotify writes naming a queue the device does not have.
        pub invalid_notifies: Counter,
    }
}

fn inc(counter: &Counter) {
    counter.inc();
}

/// Interrupt state shared by the transport and its device: the
/// InterruptStatus bits, the configuration generation and the EventFd that
/// the VMM registers as an irqfd.
#[derive(Debug)]
pub struct MmioInterrupt {
    pub(crate) status: AtomicU32,
    pub(crate) config_generation: AtomicU32,
    evt: EventFd,
}

impl MmioInterrupt {
    /// Creates the interrupt state around `evt`, the EventFd the VMM turns
    /// into the device's interrupt line.
    pub fn new(evt: EventFd) -> Self {
        MmioInterrupt {
            status: AtomicU32::new(0),
            config_generation: AtomicU32::new(0),
            evt,
        }
    }

    /// Current InterruptStatus bits.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Current ConfigGeneration value.
    pub fn config_generation(&self) -> u32 {
        self.config_generation.load(Ordering::SeqCst)
    }

    /// The EventFd signalled on every interrupt.
    pub fn event(&self) -> &EventFd {
        &self.evt
    }

    fn raise(&self, bit: u32) -> io::Result<()> {
        self.status.fetch_or(bit, Ordering::SeqCst);
        self.evt.write(1)
    }
}

impl VirtioInterrupt for MmioInterrupt {
    fn trigger(&self, kind: InterruptKind) -> io::Result<()> {
        match kind {
            InterruptKind::Vring => self.raise(VIRTIO_MMIO_INT_VRING),
            InterruptKind::Config => {
                // A configuration change interrupt means the configuration
                // changed: ConfigGeneration must change with it so that a
                // driver reading a multi-field value notices (virtio 1.2
                // §2.5, §4.2.2 "ConfigGeneration").
                self.config_generation.fetch_add(1, Ordering::SeqCst);
                self.raise(VIRTIO_MMIO_INT_CONFIG)
            }
        }
    }
}

/// The virtio-mmio transport of one device.
///
/// It decodes every register, keeps the queue configuration until the driver
/// sets DRIVER_OK, enforces the initialization order of virtio 1.2 §3.1.1 and
/// §4.2.2.2, and then hands the ready queues to the device.
///
/// The VMM wires it with:
/// - the bus: `MmioTransport` implements [`BusDevice`]; insert it (inside a
///   `Mutex`) over [`MMIO_SLOT_SIZE`] bytes at the device base;
/// - notifications: for each EventFd of [`queue_notify_events`]
///   (index `i`), a KVM ioeventfd at `base + NOTIFY_REG_OFFSET`, 4 bytes,
///   datamatch `i`;
/// - the interrupt: the EventFd given to [`new`] as a KVM irqfd for the
///   device's interrupt line.
///
/// [`queue_notify_events`]: MmioTransport::queue_notify_events
/// [`new`]: MmioTransport::new
pub struct MmioTransport {
    pub(crate) mem: GuestMemoryMmap,
    device: Arc<Mutex<dyn VirtioDevice>>,
    device_type: u32,
    pub(crate) queues: Vec<Queue>,
    notify_evts: Vec<EventFd>,
    pub(crate) interrupt: Arc<MmioInterrupt>,
    pub(crate) status: u32,
    pub(crate) device_features_sel: u32,
    pub(crate) driver_features_sel: u32,
    pub(crate) driver_features: u64,
    // The driver set a bit in a feature page past the first 64 bits.
    pub(crate) driver_features_beyond_64: bool,
    pub(crate) acked_features: u64,
    pub(crate) queue_sel: u32,
    pub(crate) activated: bool,
    metrics: Arc<MmioMetrics>,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device_type)
            .field("status", &self.status)
            .field("queues", &self.queues)
            .field("acked_features", &self.acked_features)
            .field("activated", &self.activated)
            .finish_non_exhaustive()
    }
}

impl MmioTransport {
    /// Creates the transport for `device`, reading and writing guest memory
    /// `mem`, raising interrupts through `interrupt_evt`.
    pub fn new(
        mem: GuestMemoryMmap,
        device: Arc<Mutex<dyn VirtioDevice>>,
        interrupt_evt: EventFd,
    ) -> Result<Self, Error> {
        let (device_type, max_sizes) = {
            let locked = device.lock().unwrap_or_else(PoisonError::into_inner);
            (locked.device_type(), locked.queue_max_sizes().to_vec())
        };
        if max_sizes.len() > MAX_QUEUES {
            return Err(Error::TooManyQueues(max_sizes.len()));
        }
        let mut queues = Vec::with_capacity(max_sizes.len());
        let mut notify_evts = Vec::with_capacity(max_sizes.len());
        for (index, &size) in max_sizes.iter().enumerate() {
            queues.push(Queue::new(size).map_err(|_| Error::InvalidQueueMaxSize { index, size })?);
            notify_evts.push(
                EventFd::new(EFD_NONBLOCK)
                    .map_err(|source| Error::NotifyEventFd { index, source })?,
            );
        }
        Ok(MmioTransport {
            mem,
            device,
            device_type,
            queues,
            notify_evts,
            interrupt: Arc::new(MmioInterrupt::new(interrupt_evt)),
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            driver_features_beyond_64: false,
            acked_features: 0,
            queue_sel: 0,
            activated: false,
            metrics: Arc::new(MmioMetrics::default()),
        })
    }

    /// One EventFd per queue, signalled when the driver notifies that queue.
    ///
    /// Register each as a KVM ioeventfd on `base + NOTIFY_REG_OFFSET` (4
    /// bytes) with datamatch = its index, so a notification never leaves the
    /// kernel. A QueueNotify write that does reach the transport signals the
    /// same EventFd.
    pub fn queue_notify_events(&self) -> &[EventFd] {
        &self.notify_evts
    }

    /// The Status register (virtio 1.2 §2.1).
    pub fn device_status(&self) -> u32 {
        self.status
    }

    /// The InterruptStatus register.
    pub fn interrupt_status(&self) -> u32 {
        self.interrupt.status()
    }

    /// The ConfigGeneration register.
    pub fn config_generation(&self) -> u32 {
        self.interrupt.config_generation()
    }

    /// Features the driver accepted at FEATURES_OK (0 before).
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Whether the device is running (DRIVER_OK accepted, no reset since).
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// The interrupt handle given to the device at activation.
    pub fn interrupt(&self) -> Arc<MmioInterrupt> {
        Arc::clone(&self.interrupt)
    }

    /// The device behind this transport.
    pub fn device(&self) -> &Arc<Mutex<dyn VirtioDevice>> {
        &self.device
    }

    /// The transport's counters.
    pub fn metrics(&self) -> &Arc<MmioMetrics> {
        &self.metrics
    }

    pub(crate) fn locked_device(&self) -> MutexGuard<'_, dyn VirtioDevice + 'static> {
        // A device that panicked while locked is still better driven than
        // taking the vCPU thread down with it.
        self.device.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn selected_queue(&self) -> Option<&Queue> {
        self.queues.get(usize::try_from(self.queue_sel).ok()?)
    }

    fn selected_queue_mut(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(usize::try_from(self.queue_sel).ok()?)
    }

    /// The driver broke the initialization order: virtio 1.2 §2.1.2 lets the
    /// device set DEVICE_NEEDS_RESET, and then it must send a configuration
    /// change notification.
    fn order_violation(&mut self, what: &str) {
        inc(&self.metrics.order_violations);
        // Logged once per reset: the guest must not be able to flood the log.
        if self.status & NEEDS_RESET == 0 {
            warn!(
                "virtio-mmio (device type {}): {what} in status {:#x}; device needs reset",
                self.device_type, self.status
            );
            self.status |= NEEDS_RESET;
            if let Err(e) = self.interrupt.raise(VIRTIO_MMIO_INT_CONFIG) {
                warn!("virtio-mmio: failed to signal the device-needs-reset interrupt: {e}");
            }
        }
    }

    /// Queue registers may be written after FEATURES_OK and before DRIVER_OK
    /// (virtio 1.2 §3.1.1 step 7), unless the device failed.
    fn queue_setup_allowed(&self) -> bool {
        self.status & (ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK | FAILED | NEEDS_RESET)
            == ACKNOWLEDGE | DRIVER | FEATURES_OK
    }

    /// DriverFeatures may be written after DRIVER and before FEATURES_OK
    /// (virtio 1.2 §3.1.1 steps 3-5).
    fn feature_write_allowed(&self) -> bool {
        self.status & (ACKNOWLEDGE | DRIVER | FEATURES_OK | FAILED | NEEDS_RESET)
            == ACKNOWLEDGE | DRIVER
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        match offset {
            REG_MAGIC_VALUE => MMIO_MAGIC_VALUE,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => self.device_type,
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => {
                let features = self.locked_device().features();
                features_page(features, self.device_features_sel)
            }
            // 0 means "queue not available" (virtio 1.2 §4.2.2).
            REG_QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            REG_QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => self.status,
            // No shared memory regions: a length of -1 (virtio 1.2 §4.2.2).
            REG_SHM_LEN_LOW | REG_SHM_LEN_HIGH | REG_SHM_BASE_LOW | REG_SHM_BASE_HIGH => u32::MAX,
            REG_CONFIG_GENERATION => self.interrupt.config_generation(),
            _ => {
                inc(&self.metrics.invalid_register);
                debug!("virtio-mmio: read of unreadable register {offset:#x}");
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            REG_DRIVER_FEATURES => self.write_driver_features(value),
            REG_QUEUE_SEL => self.queue_sel = value,
            REG_QUEUE_NUM
            | REG_QUEUE_DESC_LOW
            | REG_QUEUE_DESC_HIGH
            | REG_QUEUE_DRIVER_LOW
            | REG_QUEUE_DRIVER_HIGH
            | REG_QUEUE_DEVICE_LOW
            | REG_QUEUE_DEVICE_HIGH => self.write_queue_field(offset, value),
            REG_QUEUE_READY => self.write_queue_ready(value),
            REG_QUEUE_NOTIFY => self.notify(value),
            REG_INTERRUPT_ACK => {
                self.interrupt.status.fetch_and(!value, Ordering::SeqCst);
            }
            REG_STATUS => self.write_status(value),
            // No shared memory regions exist to select; every selection
            // reads back as absent.
            REG_SHM_SEL => {}
            _ => {
                inc(&self.metrics.invalid_register);
                debug!("virtio-mmio: write of {value:#x} to unwritable register {offset:#x}");
            }
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        if !self.feature_write_allowed() {
            self.order_violation("DriverFeatures written outside DRIVER..FEATURES_OK");
            return;
        }
        match self.driver_features_sel {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value),
            1 => {
                self.driver_features =
                    (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
            }
            // No device offers bits past 63: accepting one fails FEATURES_OK.
            _ => self.driver_features_beyond_64 |= value != 0,
        }
    }

    fn write_queue_field(&mut self, offset: u64, value: u32) {
        if !self.queue_setup_allowed() {
            self.order_violation("queue register written outside FEATURES_OK..DRIVER_OK");
            return;
        }
        let Some(queue) = self.selected_queue_mut() else {
            self.order_violation("queue register written for a queue the device does not have");
            return;
        };
        // virtio 1.2 §4.2.2.2: "When QueueReady is not zero, the driver MUST
        // NOT access QueueNum, QueueDescLow, ...".
        if queue.ready() {
            self.order_violation("queue register written while the queue is ready");
            return;
        }
        let low = |addr: u64| (addr & !0xffff_ffff) | u64::from(value);
        let high = |addr: u64| (addr & 0xffff_ffff) | (u64::from(value) << 32);
        let accepted = match offset {
            // Split rings need a power-of-two size no larger than QueueNumMax
            // (virtio 1.2 §2.7, §4.2.2.2); try_set_size checks both.
            REG_QUEUE_NUM => u16::try_from(value)
                .ok()
                .is_some_and(|size| queue.try_set_size(size).is_ok()),
            // Alignments of virtio 1.2 §2.7 (16, 2 and 4 bytes) are
            // checked by the try_set_* methods.
            REG_QUEUE_DESC_LOW => queue
                .try_set_desc_table_address(GuestAddress(low(queue.desc_table())))
                .is_ok(),
            REG_QUEUE_DESC_HIGH => queue
                .try_set_desc_table_address(GuestAddress(high(queue.desc_table())))
                .is_ok(),
            REG_QUEUE_DRIVER_LOW => queue
                .try_set_avail_ring_address(GuestAddress(low(queue.avail_ring())))
                .is_ok(),
            REG_QUEUE_DRIVER_HIGH => queue
                .try_set_avail_ring_address(GuestAddress(high(queue.avail_ring())))
                .is_ok(),
            REG_QUEUE_DEVICE_LOW => queue
                .try_set_used_ring_address(GuestAddress(low(queue.used_ring())))
                .is_ok(),
            REG_QUEUE_DEVICE_HIGH => queue
                .try_set_used_ring_address(GuestAddress(high(queue.used_ring())))
                .is_ok(),
            _ => false,
        };
        if !accepted {
            self.order_violation("invalid queue size or misaligned queue address");
        }
    }

    fn write_queue_ready(&mut self, value: u32) {
        match value {
            // Un-readying a queue before DRIVER_OK is what Linux does when it
            // tears queues down after a reset, or when queue setup failed.
            0 if self.status & DRIVER_OK == 0 => {
                if let Some(queue) = self.selected_queue_mut() {
                    queue.set_ready(false);
                } else {
                    inc(&self.metrics.invalid_register);
                }
            }
            // Stopping one queue of a running device needs
            // VIRTIO_F_RING_RESET, which no device here offers.
            0 => self.order_violation("QueueReady cleared while the device is running"),
            1 => {
                if !self.queue_setup_allowed() {
                    self.order_violation("QueueReady set outside FEATURES_OK..DRIVER_OK");
                } else if let Some(queue) = self.selected_queue_mut() {
                    queue.set_ready(true);
                } else {
                    self.order_violation("QueueReady set for a queue the device does not have");
                }
            }
            _ => self.order_violation("QueueReady written with a value other than 0 or 1"),
        }
    }

    fn notify(&mut self, value: u32) {
        inc(&self.metrics.notifies);
        // Without VIRTIO_F_NOTIFICATION_DATA the value is the queue index
        // (virtio 1.2 §4.2.3.3).
        let evt = usize::try_from(value)
            .ok()
            .and_then(|index| self.notify_evts.get(index));
        match evt {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    warn!("virtio-mmio: failed to signal the notify EventFd of queue {value}: {e}");
                }
            }
            None => {
                inc(&self.metrics.invalid_notifies);
                debug!("virtio-mmio: notify of nonexistent queue {value}");
            }
        }
    }

    /// Status writes follow virtio 1.2 §3.1.1: each step adds one bit to the
    /// previous value, 0 resets, FAILED may be set at any time.
    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // DEVICE_NEEDS_RESET is the device's bit; a driver doing
        // read-modify-write echoes it back.
        let value = value & !NEEDS_RESET;
        if value & FAILED != 0 {
            // The driver gave up on the device (virtio 1.2 §2.1.1).
            self.status |= FAILED;
            return;
        }
        let current = self.status & !NEEDS_RESET;
        if value == current {
            return;
        }
        if self.status & (NEEDS_RESET | FAILED) != 0 {
            // Only a reset leaves these states; NEEDS_RESET is already set.
            inc(&self.metrics.order_violations);
            return;
        }
        const ACK_DRIVER: u32 = ACKNOWLEDGE | DRIVER;
        const ACK_DRIVER_FEATURES: u32 = ACKNOWLEDGE | DRIVER | FEATURES_OK;
        const ALL: u32 = ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK;
        match (current, value) {
            (0, ACKNOWLEDGE) | (ACKNOWLEDGE, ACK_DRIVER) => self.status = value,
            (ACK_DRIVER, ACK_DRIVER_FEATURES) => self.features_ok(),
            (ACK_DRIVER_FEATURES, ALL) => self.driver_ok(),
            _ => self.order_violation("invalid Status transition"),
        }
    }

    /// virtio 1.2 §2.2.2: the device refuses FEATURES_OK (by not keeping the
    /// bit) when the driver accepted a feature it did not offer; the version
    /// 2 transport needs VIRTIO_F_VERSION_1 (§4.2.2.2, §6.1).
    fn features_ok(&mut self) {
        let offered = self.locked_device().features();
        let accepted = self.driver_features;
        let version_1 = 1u64 << VIRTIO_F_VERSION_1;
        if self.driver_features_beyond_64 || accepted & !offered != 0 || accepted & version_1 == 0 {
            inc(&self.metrics.features_rejected);
            debug!(
                "virtio-mmio (device type {}): refusing features {accepted:#x} (offered \
                 {offered:#x}, bits past 63: {})",
                self.device_type, self.driver_features_beyond_64
            );
            return;
        }
        self.acked_features = accepted;
        self.locked_device().ack_features(accepted);
        self.status |= FEATURES_OK;
    }

    fn driver_ok(&mut self) {
        match self.activate() {
            Ok(()) => {
                inc(&self.metrics.activations);
                self.activated = true;
                self.status |= DRIVER_OK;
            }
            Err(reason) => {
                inc(&self.metrics.activate_fails);
                self.order_violation(&format!("activation failed: {reason}"));
            }
        }
    }

    pub(crate) fn activate(&mut self) -> Result<(), Error> {
        let event_idx = self.acked_features & (1u64 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut active = Vec::new();
        // MAX_QUEUES keeps every index inside u16.
        let queues = (0u16..).zip(self.queues.iter().zip(&self.notify_evts));
        for (index, (queue, notify)) in queues {
            if !queue.ready() {
                continue;
            }
            if !queue.is_valid(&self.mem) {
                return Err(Error::QueueOutsideMemory {
                    index: usize::from(index),
                    size: queue.size(),
                    desc: queue.desc_table(),
                    driver: queue.avail_ring(),
                    device: queue.used_ring(),
                });
            }
            let mut state = queue.state();
            state.event_idx_enabled = event_idx;
            let queue = Queue::try_from(state).map_err(|source| Error::Queue {
                index: usize::from(index),
                source,
            })?;
            let notify = notify.try_clone().map_err(|source| Error::NotifyEventFd {
                index: usize::from(index),
                source,
            })?;
            active.push(ActiveQueue {
                index,
                queue,
                notify,
            });
        }
        let interrupt: Arc<dyn VirtioInterrupt> = self.interrupt.clone();
        self.locked_device()
            .activate(self.mem.clone(), active, interrupt)?;
        Ok(())
    }

    fn reset(&mut self) {
        inc(&self.metrics.resets);
        let stopped = self.locked_device().reset();
        for queue in &mut self.queues {
            queue.reset();
        }
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.driver_features_beyond_64 = false;
        self.acked_features = 0;
        self.queue_sel = 0;
        self.activated = false;
        // ConfigGeneration keeps counting: it only has to change.
        self.interrupt.status.store(0, Ordering::SeqCst);
        self.status = if stopped {
            0
        } else {
            inc(&self.metrics.reset_fails);
            warn!(
                "virtio-mmio (device type {}): device could not be reset",
                self.device_type
            );
            FAILED
        };
    }

    fn config_access_ok(&mut self, offset: u64, len: usize) -> bool {
        let size = self.locked_device().config_size();
        let ok = matches!(len, 1 | 2 | 4 | 8)
            && offset
                .checked_add(len as u64)
                .is_some_and(|end| end <= size);
        if !ok {
            inc(&self.metrics.invalid_config_access);
            debug!("virtio-mmio: config access of {len} bytes at {offset:#x} (size {size:#x})");
        }
        ok
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            let offset = offset - CONFIG_SPACE_OFFSET;
            if self.config_access_ok(offset, data.len()) {
                self.locked_device().read_config(offset, data);
            } else {
                data.fill(0);
            }
            return;
        }
        // virtio 1.2 §4.2.2.2: the driver MUST use 32-bit wide and aligned
        // accesses for the registers.
        let Ok(bytes) = <&mut [u8; 4]>::try_from(&mut *data) else {
            inc(&self.metrics.invalid_access_size);
            data.fill(0);
            return;
        };
        if offset % 4 != 0 {
            inc(&self.metrics.invalid_access_size);
            bytes.fill(0);
            return;
        }
        *bytes = self.read_register(offset).to_le_bytes();
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            let offset = offset - CONFIG_SPACE_OFFSET;
            // The driver writes configuration only once it drives the device.
            if self.status & DRIVER == 0 || self.status & FAILED != 0 {
                inc(&self.metrics.invalid_config_access);
                return;
            }
            if self.config_access_ok(offset, data.len()) {
                self.locked_device().write_config(offset, data);
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            inc(&self.metrics.invalid_access_size);
            return;
        };
        if offset % 4 != 0 {
            inc(&self.metrics.invalid_access_size);
            return;
        }
        self.write_register(offset, u32::from_le_bytes(bytes));
    }
}
