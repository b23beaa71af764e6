// SPDX-License-Identifier: Apache-2.0

//! Test helpers shared by device crates: a scriptable [`MockDevice`], a
//! counting [`MockInterrupt`], register-level driver steps that walk a
//! transport through the virtio 1.2 §3.1.1 initialization sequence, and a
//! [`DriverQueue`] that plays the driver's side of one split queue.
//!
//! Compiled for this crate's tests and, for other crates, behind the
//! `test-utils` feature.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use ember_bus::BusDevice;
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::{
    VIRTIO_MMIO_DRIVER_FEATURES, VIRTIO_MMIO_DRIVER_FEATURES_SEL, VIRTIO_MMIO_QUEUE_AVAIL_HIGH,
    VIRTIO_MMIO_QUEUE_AVAIL_LOW, VIRTIO_MMIO_QUEUE_DESC_HIGH, VIRTIO_MMIO_QUEUE_DESC_LOW,
    VIRTIO_MMIO_QUEUE_NUM, VIRTIO_MMIO_QUEUE_READY, VIRTIO_MMIO_QUEUE_SEL,
    VIRTIO_MMIO_QUEUE_USED_HIGH, VIRTIO_MMIO_QUEUE_USED_LOW, VIRTIO_MMIO_STATUS,
};
use virtio_bindings::virtio_ring::VRING_DESC_F_NEXT;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::transport::MmioTransport;
use ember_virtio::{ActivateError, ActiveQueue, InterruptKind, VirtioDevice, VirtioInterrupt};

/// What a [`MockDevice`] received at activation.
#[derive(Debug)]
pub struct MockActivation {
    /// Guest memory handed to the device.
    pub mem: GuestMemoryMmap,
    /// The ready queues.
    pub queues: Vec<ActiveQueue>,
    /// The interrupt handle.
    pub interrupt: Arc<dyn VirtioInterrupt>,
}

/// A virtio device whose every answer is a public field, and which records
/// every call the transport makes.
#[derive(Debug)]
pub struct MockDevice {
    /// Reported device ID.
    pub device_type: u32,
    /// Reported queue maximum sizes.
    pub queue_sizes: Vec<u16>,
    /// Offered features.
    pub features: u64,
    /// Configuration space contents.
    pub config: Vec<u8>,
    /// Features received through `ack_features`.
    pub acked_features: Option<u64>,
    /// Every `write_config` call, in order.
    pub config_writes: Vec<(u64, Vec<u8>)>,
    /// Number of successful activations.
    pub activations: usize,
    /// Number of `reset` calls.
    pub resets: usize,
    /// When set, `activate` fails.
    pub fail_activate: bool,
    /// When set, `reset` reports that the device could not stop.
    pub refuse_reset: bool,
    /// Present while the device is activated.
    pub active: Option<MockActivation>,
}

impl MockDevice {
    /// A device of `device_type` with the given queues, offering only
    /// `VIRTIO_F_VERSION_1`, with 16 bytes of configuration space holding
    /// 0, 1, 2, ... 15.
    pub fn new(device_type: u32, queue_sizes: &[u16]) -> Self {
        MockDevice {
            device_type,
            queue_sizes: queue_sizes.to_vec(),
            features: 1u64 << VIRTIO_F_VERSION_1,
            config: (0u8..16).collect(),
            acked_features: None,
            config_writes: Vec::new(),
            activations: 0,
            resets: 0,
            fail_activate: false,
            refuse_reset: false,
            active: None,
        }
    }

    /// Changes the configuration space as a device would, and raises the
    /// configuration interrupt when activated.
    pub fn change_config(&mut self, offset: usize, data: &[u8]) -> io::Result<()> {
        if let Some(dst) = self.config.get_mut(offset..offset + data.len()) {
            dst.copy_from_slice(data);
        }
        match &self.active {
            Some(active) => active.interrupt.trigger(InterruptKind::Config),
            None => Ok(()),
        }
    }
}

impl VirtioDevice for MockDevice {
    fn device_type(&self) -> u32 {
        self.device_type
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = Some(features);
    }

    fn config_size(&self) -> u64 {
        self.config.len() as u64
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let start = offset as usize;
        if let Some(src) = self.config.get(start..start + data.len()) {
            data.copy_from_slice(src);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.config_writes.push((offset, data.to_vec()));
        let start = offset as usize;
        if let Some(dst) = self.config.get_mut(start..start + data.len()) {
            dst.copy_from_slice(data);
        }
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<ActiveQueue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        if self.fail_activate {
            return Err(ActivateError::QueueNotReady(0));
        }
        if self.active.is_some() {
            return Err(ActivateError::AlreadyActivated);
        }
        self.activations += 1;
        self.active = Some(MockActivation {
            mem,
            queues,
            interrupt,
        });
        Ok(())
    }

    fn reset(&mut self) -> bool {
        self.resets += 1;
        if self.refuse_reset {
            return false;
        }
        self.active = None;
        true
    }
}

/// An interrupt that counts what it was asked to raise.
#[derive(Debug, Default)]
pub struct MockInterrupt {
    /// Number of [`InterruptKind::Vring`] triggers.
    pub vring: AtomicUsize,
    /// Number of [`InterruptKind::Config`] triggers.
    pub config: AtomicUsize,
}

impl MockInterrupt {
    /// Number of used-buffer interrupts raised so far.
    pub fn vring_count(&self) -> usize {
        self.vring.load(Ordering::SeqCst)
    }

    /// Number of configuration interrupts raised so far.
    pub fn config_count(&self) -> usize {
        self.config.load(Ordering::SeqCst)
    }
}

impl VirtioInterrupt for MockInterrupt {
    fn trigger(&self, kind: InterruptKind) -> io::Result<()> {
        match kind {
            InterruptKind::Vring => self.vring.fetch_add(1, Ordering::SeqCst),
            InterruptKind::Config => self.config.fetch_add(1, Ordering::SeqCst),
        };
        Ok(())
    }
}

/// Where a driver put one split virtqueue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLayout {
    /// QueueNum.
    pub size: u16,
    /// Descriptor table address (QueueDescLow/High).
    pub desc: u64,
    /// Driver area: the available ring (QueueDriverLow/High).
    pub driver: u64,
    /// Device area: the used ring (QueueDeviceLow/High).
    pub device: u64,
}

/// Reads the 32-bit register at `offset`.
pub fn read_reg(transport: &mut MmioTransport, offset: u64) -> u32 {
    let mut data = [0u8; 4];
    transport.read(0, offset, &mut data);
    u32::from_le_bytes(data)
}

/// Writes the 32-bit register at `offset`.
pub fn write_reg(transport: &mut MmioTransport, offset: u64, value: u32) {
    transport.write(0, offset, &value.to_le_bytes());
}

/// Driver steps 1-5 of virtio 1.2 §3.1.1: reset, ACKNOWLEDGE, DRIVER, write
/// `features`, FEATURES_OK. Returns whether the device kept FEATURES_OK.
pub fn negotiate(transport: &mut MmioTransport, features: u64) -> bool {
    let status = u64::from(VIRTIO_MMIO_STATUS);
    write_reg(transport, status, 0);
    write_reg(transport, status, VIRTIO_CONFIG_S_ACKNOWLEDGE);
    write_reg(
        transport,
        status,
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
    );
    for page in 0..2u32 {
        write_reg(transport, u64::from(VIRTIO_MMIO_DRIVER_FEATURES_SEL), page);
        write_reg(
            transport,
            u64::from(VIRTIO_MMIO_DRIVER_FEATURES),
            (features >> (32 * page)) as u32,
        );
    }
    write_reg(
        transport,
        status,
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK,
    );
    read_reg(transport, status) & VIRTIO_CONFIG_S_FEATURES_OK != 0
}

/// Driver step 7 for one queue: select it, write its size and addresses, and
/// set QueueReady.
pub fn setup_queue(transport: &mut MmioTransport, index: u32, layout: QueueLayout) {
    let regs = [
        (VIRTIO_MMIO_QUEUE_SEL, index),
        (VIRTIO_MMIO_QUEUE_NUM, u32::from(layout.size)),
        (VIRTIO_MMIO_QUEUE_DESC_LOW, layout.desc as u32),
        (VIRTIO_MMIO_QUEUE_DESC_HIGH, (layout.desc >> 32) as u32),
        (VIRTIO_MMIO_QUEUE_AVAIL_LOW, layout.driver as u32),
        (VIRTIO_MMIO_QUEUE_AVAIL_HIGH, (layout.driver >> 32) as u32),
        (VIRTIO_MMIO_QUEUE_USED_LOW, layout.device as u32),
        (VIRTIO_MMIO_QUEUE_USED_HIGH, (layout.device >> 32) as u32),
        (VIRTIO_MMIO_QUEUE_READY, 1),
    ];
    for (offset, value) in regs {
        write_reg(transport, u64::from(offset), value);
    }
}

/// The whole initialization: [`negotiate`], [`setup_queue`] for each layout
/// (queue `i` gets `queues[i]`), then DRIVER_OK. Returns the final Status.
pub fn initialize(transport: &mut MmioTransport, features: u64, queues: &[QueueLayout]) -> u32 {
    negotiate(transport, features);
    for (index, layout) in queues.iter().enumerate() {
        setup_queue(transport, index as u32, *layout);
    }
    let status = u64::from(VIRTIO_MMIO_STATUS);
    write_reg(
        transport,
        status,
        VIRTIO_CONFIG_S_ACKNOWLEDGE
            | VIRTIO_CONFIG_S_DRIVER
            | VIRTIO_CONFIG_S_FEATURES_OK
            | VIRTIO_CONFIG_S_DRIVER_OK,
    );
    read_reg(transport, status)
}

/// `size` bytes of guest memory from address 0, leaked so that a
/// [`DriverQueue`] (which borrows it) can live as long as the test.
pub fn leaked_memory(size: usize) -> &'static GuestMemoryMmap {
    Box::leak(Box::new(
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size)]).expect("test guest memory"),
    ))
}

/// The driver's side of one split queue in test memory (virtio-queue's
/// `MockSplitQueue` underneath): chains go into the descriptor table and
/// the available ring, used entries come back out.
pub struct DriverQueue {
    /// The queue's rings and table; `create_queue` gives the device's side.
    pub vq: MockSplitQueue<'static, GuestMemoryMmap>,
    size: u16,
    next_desc: u16,
    next_used: u16,
}

impl DriverQueue {
    /// A queue of `size` entries placed by `MockSplitQueue` in `mem`.
    pub fn new(mem: &'static GuestMemoryMmap, size: u16) -> Self {
        DriverQueue {
            vq: MockSplitQueue::new(mem, size),
            size,
            next_desc: 0,
            next_used: 0,
        }
    }

    /// Adds a chain of `(addr, len, flags)` descriptors (NEXT is added
    /// between them) to the descriptor table and the available ring;
    /// returns its head. Descriptors are taken in order, from the start of
    /// the table again when the chain would not fit.
    pub fn add_chain(&mut self, descs: &[(u64, u32, u16)]) -> u16 {
        let n = descs.len() as u16;
        if self.next_desc + n > self.size {
            self.next_desc = 0;
        }
        let first = self.next_desc;
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, flags))| {
                let i = i as u16;
                let (flags, next) = if i + 1 < n {
                    (flags | VRING_DESC_F_NEXT as u16, first + i + 1)
                } else {
                    (flags, 0)
                };
                RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
            })
            .collect();
        self.vq
            .add_desc_chains(&raw, first)
            .expect("the chain fits the descriptor table");
        self.next_desc += n;
        first
    }

    /// Starts the next chain at the first descriptor of the table again
    /// (for chains the device has used).
    pub fn rewind_table(&mut self) {
        self.next_desc = 0;
    }

    /// The used ring's index.
    pub fn used_idx(&self) -> u16 {
        self.vq.used().idx().load()
    }

    /// The used entries added since the last call, as (head, length).
    pub fn take_used(&mut self) -> Vec<(u16, u32)> {
        let mut out = Vec::new();
        while self.next_used != self.used_idx() {
            let elem = self
                .vq
                .used()
                .ring()
                .ref_at(usize::from(self.next_used % self.size))
                .expect("a used ring entry")
                .load();
            out.push((elem.id() as u16, elem.len()));
            self.next_used = self.next_used.wrapping_add(1);
        }
        out
    }
}
