// SPDX-License-Identifier: Apache-2.0

use std::sync::{Arc, Mutex};

use ember_bus::BusDevice;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::test_utils::{
    initialize, negotiate, read_reg, setup_queue, write_reg, MockDevice, QueueLayout,
};
use crate::{InterruptKind, MmioTransport, VirtioDevice};

const MEM_SIZE: u64 = 0x10000;

// Register offsets (virtio 1.2 §4.2.2).
const MAGIC: u64 = 0x00;
const VERSION: u64 = 0x04;
const DEVICE_ID: u64 = 0x08;
const VENDOR_ID: u64 = 0x0c;
const DEVICE_FEATURES: u64 = 0x10;
const DEVICE_FEATURES_SEL: u64 = 0x14;
const DRIVER_FEATURES: u64 = 0x20;
const DRIVER_FEATURES_SEL: u64 = 0x24;
const QUEUE_SEL: u64 = 0x30;
const QUEUE_NUM_MAX: u64 = 0x34;
const QUEUE_NUM: u64 = 0x38;
const QUEUE_READY: u64 = 0x44;
const QUEUE_NOTIFY: u64 = 0x50;
const INTERRUPT_STATUS: u64 = 0x60;
const INTERRUPT_ACK: u64 = 0x64;
const STATUS: u64 = 0x70;
const QUEUE_DESC_LOW: u64 = 0x80;
const QUEUE_DESC_HIGH: u64 = 0x84;
const QUEUE_DRIVER_LOW: u64 = 0x90;
const QUEUE_DEVICE_LOW: u64 = 0xa0;
const SHM_SEL: u64 = 0xac;
const SHM_LEN_LOW: u64 = 0xb0;
const SHM_LEN_HIGH: u64 = 0xb4;
const CONFIG_GENERATION: u64 = 0xfc;
const CONFIG: u64 = 0x100;

const ACK: u32 = 1;
const DRIVER: u32 = 2;
const DRIVER_OK: u32 = 4;
const FEATURES_OK: u32 = 8;
const NEEDS_RESET: u32 = 0x40;
const FAILED: u32 = 0x80;

const VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;

const LAYOUT: QueueLayout = QueueLayout {
    size: 16,
    desc: 0x1000,
    driver: 0x2000,
    device: 0x3000,
};

struct Fixture {
    transport: MmioTransport,
    device: Arc<Mutex<MockDevice>>,
    irq: EventFd,
}

impl Fixture {
    fn new(device: MockDevice) -> Self {
        let mem =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
        let device = Arc::new(Mutex::new(device));
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let dyn_device: Arc<Mutex<dyn VirtioDevice>> = device.clone();
        let transport = MmioTransport::new(mem, dyn_device, irq.try_clone().unwrap()).unwrap();
        Fixture {
            transport,
            device,
            irq,
        }
    }

    /// A block-typed mock with queues of 256 and 64 entries, offering
    /// VERSION_1 and bit 5.
    fn standard() -> Self {
        let mut device = MockDevice::new(VIRTIO_ID_BLOCK, &[256, 64]);
        device.features = VERSION_1 | (1 << 5);
        Fixture::new(device)
    }

    fn read(&mut self, offset: u64) -> u32 {
        read_reg(&mut self.transport, offset)
    }

    fn write(&mut self, offset: u64, value: u32) {
        write_reg(&mut self.transport, offset, value)
    }

    fn status(&mut self) -> u32 {
        self.read(STATUS)
    }

    fn violations(&self) -> u64 {
        self.transport.metrics().order_violations.count()
    }

    /// Whether the interrupt EventFd was signalled since the last call.
    fn irq_signalled(&self) -> bool {
        self.irq.read().is_ok()
    }

    fn mock(&self) -> std::sync::MutexGuard<'_, MockDevice> {
        self.device.lock().unwrap()
    }

    /// Asserts DEVICE_NEEDS_RESET is set and the config interrupt was raised.
    fn assert_needs_reset(&mut self) {
        assert_ne!(self.status() & NEEDS_RESET, 0, "DEVICE_NEEDS_RESET not set");
        assert_ne!(self.read(INTERRUPT_STATUS) & 2, 0, "no config interrupt");
        assert!(self.irq_signalled(), "interrupt EventFd not signalled");
    }

    fn reach_features_ok(&mut self) {
        assert!(negotiate(&mut self.transport, VERSION_1));
    }
}

#[test]
fn identity_registers() {
    let mut f = Fixture::standard();
    assert_eq!(f.read(MAGIC), 0x7472_6976);
    assert_eq!(f.read(VERSION), 2);
    assert_eq!(f.read(DEVICE_ID), VIRTIO_ID_BLOCK);
    assert_eq!(f.read(VENDOR_ID), 0);
    assert_eq!(f.read(CONFIG_GENERATION), 0);
    assert_eq!(f.status(), 0);
    assert_eq!(f.read(INTERRUPT_STATUS), 0);
}

#[test]
fn device_features_are_paged() {
    let mut f = Fixture::standard();
    f.mock().features = VERSION_1 | (1 << 5) | (1 << 40);
    assert_eq!(f.read(DEVICE_FEATURES), 1 << 5);
    f.write(DEVICE_FEATURES_SEL, 1);
    assert_eq!(f.read(DEVICE_FEATURES), 1 | (1 << 8));
    f.write(DEVICE_FEATURES_SEL, 2);
    assert_eq!(f.read(DEVICE_FEATURES), 0);
}

#[test]
fn normal_handshake_activates_device_with_configured_queue() {
    let mut f = Fixture::standard();
    f.write(STATUS, ACK);
    assert_eq!(f.status(), ACK);
    f.write(STATUS, ACK | DRIVER);
    assert_eq!(f.status(), ACK | DRIVER);
    f.write(DRIVER_FEATURES_SEL, 0);
    f.write(DRIVER_FEATURES, 1 << 5);
    f.write(DRIVER_FEATURES_SEL, 1);
    f.write(DRIVER_FEATURES, 1);
    f.write(STATUS, ACK | DRIVER | FEATURES_OK);
    assert_eq!(f.status(), ACK | DRIVER | FEATURES_OK);
    assert_eq!(f.mock().acked_features, Some(VERSION_1 | (1 << 5)));
    assert_eq!(f.transport.acked_features(), VERSION_1 | (1 << 5));

    f.write(QUEUE_SEL, 0);
    assert_eq!(f.read(QUEUE_NUM_MAX), 256);
    assert_eq!(f.read(QUEUE_READY), 0);
    setup_queue(&mut f.transport, 0, LAYOUT);
    assert_eq!(f.read(QUEUE_READY), 1);
    assert_eq!(f.mock().activations, 0, "activated before DRIVER_OK");

    f.write(STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    assert_eq!(f.status(), ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    assert!(f.transport.is_activated());
    assert_eq!(f.violations(), 0);

    let mock = f.mock();
    assert_eq!(mock.activations, 1);
    let active = mock.active.as_ref().unwrap();
    // Only the ready queue is handed over.
    assert_eq!(active.queues.len(), 1);
    let q = &active.queues[0];
    assert_eq!(q.index, 0);
    assert_eq!(q.queue.size(), 16);
    assert_eq!(q.queue.desc_table(), LAYOUT.desc);
    assert_eq!(q.queue.avail_ring(), LAYOUT.driver);
    assert_eq!(q.queue.used_ring(), LAYOUT.device);
    assert!(q.queue.ready());
    assert!(!q.queue.event_idx_enabled());
}

#[test]
fn event_idx_accepted_enables_it_on_the_queues() {
    let mut device = MockDevice::new(VIRTIO_ID_BLOCK, &[16]);
    device.features = VERSION_1 | (1 << VIRTIO_RING_F_EVENT_IDX);
    let mut f = Fixture::new(device);
    let status = initialize(
        &mut f.transport,
        VERSION_1 | (1 << VIRTIO_RING_F_EVENT_IDX),
        &[LAYOUT],
    );
    assert_eq!(status, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    assert!(f.mock().active.as_ref().unwrap().queues[0]
        .queue
        .event_idx_enabled());
}

#[test]
fn features_not_offered_are_refused() {
    let mut f = Fixture::standard();
    // Bit 6 is not offered.
    assert!(!negotiate(&mut f.transport, VERSION_1 | (1 << 6)));
    assert_eq!(f.status(), ACK | DRIVER);
    assert_eq!(f.mock().acked_features, None);
    assert_eq!(f.transport.metrics().features_rejected.count(), 1);
    // Refusing FEATURES_OK is not a handshake violation.
    assert_eq!(f.status() & NEEDS_RESET, 0);
}

#[test]
fn features_without_version_1_are_refused() {
    let mut f = Fixture::standard();
    assert!(!negotiate(&mut f.transport, 1 << 5));
    assert_eq!(f.status(), ACK | DRIVER);
    assert_eq!(f.mock().acked_features, None);
}

#[test]
fn feature_bits_past_63_are_refused() {
    let mut f = Fixture::standard();
    f.write(STATUS, ACK);
    f.write(STATUS, ACK | DRIVER);
    f.write(DRIVER_FEATURES_SEL, 1);
    f.write(DRIVER_FEATURES, 1);
    f.write(DRIVER_FEATURES_SEL, 2);
    f.write(DRIVER_FEATURES, 1);
    f.write(STATUS, ACK | DRIVER | FEATURES_OK);
    assert_eq!(f.status(), ACK | DRIVER);
}

#[test]
fn driver_features_before_driver_bit_needs_reset() {
    let mut f = Fixture::standard();
    f.write(STATUS, ACK);
    f.write(DRIVER_FEATURES, 1);
    f.assert_needs_reset();
    assert_eq!(f.violations(), 1);
    // Every further step is refused until a reset.
    f.write(STATUS, ACK | DRIVER);
    assert_eq!(f.status(), ACK | NEEDS_RESET);
}

#[test]
fn driver_features_after_features_ok_needs_reset() {
    let mut f = Fixture::standard();
    f.reach_features_ok();
    f.write(DRIVER_FEATURES_SEL, 0);
    f.write(DRIVER_FEATURES, 1 << 5);
    f.assert_needs_reset();
    // The features the device acknowledged did not change.
    assert_eq!(f.mock().acked_features, Some(VERSION_1));
}

#[test]
fn skipping_a_status_step_needs_reset() {
    let mut f = Fixture::standard();
    f.write(STATUS, ACK | DRIVER);
    f.assert_needs_reset();
    assert_eq!(f.status(), NEEDS_RESET);
}

#[test]
fn driver_ok_straight_after_driver_needs_reset_and_does_not_activate() {
    let mut f = Fixture::standard();
    f.write(STATUS, ACK);
    f.write(STATUS, ACK | DRIVER);
    f.write(STATUS, ACK | DRIVER | DRIVER_OK);
    f.assert_needs_reset();
    assert_eq!(f.mock().activations, 0);
}

#[test]
fn clearing_a_status_bit_needs_reset() {
    let mut f = Fixture::standard();
    f.reach_features_ok();
    f.write(STATUS, ACK | FEATURES_OK);
    f.assert_needs_reset();
}

#[test]
fn rewriting_the_same_status_is_harmless() {
    let mut f = Fixture::standard();
    f.write(STATUS, ACK);
    f.write(STATUS, ACK);
    assert_eq!(f.status(), ACK);
    assert_eq!(f.violations(), 0);
}

#[test]
fn driver_ok_refused_after_needs_reset() {
    let mut f = Fixture::standard();
    f.reach_features_ok();
    setup_queue(&mut f.transport, 0, LAYOUT);
    // A violation: QueueNum while the queue is ready.
    f.write(QUEUE_NUM, 8);
    f.assert_needs_reset();
    // A driver echoing NEEDS_RESET in its read-modify-write gets no further.
    f.write(STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK | NEEDS_RESET);
    assert_eq!(f.status(), ACK | DRIVER | FEATURES_OK | NEEDS_RESET);
    assert_eq!(f.mock().activations, 0);
    assert!(!f.transport.is_activated());
}

#[test]
fn queue_registers_before_features_ok_need_reset() {
    let mut f = Fixture::standard();
    f.write(STATUS, ACK);
    f.write(STATUS, ACK | DRIVER);
    f.write(QUEUE_SEL, 0);
    f.write(QUEUE_NUM, 16);
    f.assert_needs_reset();
}

#[test]
fn queue_ready_before_features_ok_needs_reset() {
    let mut f = Fixture::standard();
    f.write(STATUS, ACK);
    f.write(QUEUE_READY, 1);
    f.assert_needs_reset();
    f.write(QUEUE_SEL, 0);
    assert_eq!(f.read(QUEUE_READY), 0);
}

#[test]
fn queue_registers_after_driver_ok_need_reset() {
    let mut f = Fixture::standard();
    let status = initialize(&mut f.transport, VERSION_1, &[LAYOUT]);
    assert_eq!(status, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    f.write(QUEUE_SEL, 1);
    f.write(QUEUE_DESC_LOW, 0x4000);
    f.assert_needs_reset();
}

#[test]
fn queue_ready_cleared_while_running_needs_reset() {
    let mut f = Fixture::standard();
    initialize(&mut f.transport, VERSION_1, &[LAYOUT]);
    f.write(QUEUE_SEL, 0);
    f.write(QUEUE_READY, 0);
    f.assert_needs_reset();
}

#[test]
fn queue_registers_of_a_ready_queue_need_reset() {
    let mut f = Fixture::standard();
    f.reach_features_ok();
    setup_queue(&mut f.transport, 0, LAYOUT);
    f.write(QUEUE_DESC_HIGH, 1);
    f.assert_needs_reset();
}

#[test]
fn queue_ready_with_other_value_needs_reset() {
    let mut f = Fixture::standard();
    f.reach_features_ok();
    f.write(QUEUE_READY, 2);
    f.assert_needs_reset();
}

#[test]
fn queue_registers_of_a_missing_queue_need_reset() {
    let mut f = Fixture::standard();
    f.reach_features_ok();
    f.write(QUEUE_SEL, 2);
    assert_eq!(f.read(QUEUE_NUM_MAX), 0);
    assert_eq!(f.read(QUEUE_READY), 0);
    f.write(QUEUE_NUM, 16);
    f.assert_needs_reset();
}

#[test]
fn queue_num_max_per_queue() {
    let mut f = Fixture::standard();
    f.write(QUEUE_SEL, 0);
    assert_eq!(f.read(QUEUE_NUM_MAX), 256);
    f.write(QUEUE_SEL, 1);
    assert_eq!(f.read(QUEUE_NUM_MAX), 64);
    f.write(QUEUE_SEL, u32::MAX);
    assert_eq!(f.read(QUEUE_NUM_MAX), 0);
}

#[test]
fn queue_num_above_max_needs_reset() {
    let mut f = Fixture::standard();
    f.reach_features_ok();
    f.write(QUEUE_SEL, 1);
    f.write(QUEUE_NUM, 128);
    f.assert_needs_reset();
}

#[test]
fn queue_num_not_power_of_two_needs_reset() {
    let mut f = Fixture::standard();
    f.reach_features_ok();
    f.write(QUEUE_NUM, 24);
    f.assert_needs_reset();
}

#[test]
fn queue_num_zero_or_huge_needs_reset() {
    let mut f = Fixture::standard();
    f.reach_features_ok();
    f.write(QUEUE_NUM, 0);
    f.assert_needs_reset();

    let mut f = Fixture::standard();
    f.reach_features_ok();
    f.write(QUEUE_NUM, 0x1_0000 | 16);
    f.assert_needs_reset();
}

#[test]
fn queue_num_at_max_and_minimum_accepted() {
    for (size, queue) in [(64u16, 1u32), (1, 0)] {
        let mut f = Fixture::standard();
        f.reach_features_ok();
        setup_queue(&mut f.transport, queue, QueueLayout { size, ..LAYOUT });
        f.write(STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
        assert_eq!(f.status(), ACK | DRIVER | FEATURES_OK | DRIVER_OK);
        let mock = f.mock();
        let active = &mock.active.as_ref().unwrap().queues[0];
        assert_eq!(u32::from(active.index), queue);
        assert_eq!(active.queue.size(), size);
    }
}

#[test]
fn misaligned_queue_address_needs_reset() {
    let mut f = Fixture::standard();
    f.reach_features_ok();
    // The descriptor table needs 16-byte alignment (virtio 1.2 §2.7.2).
    f.write(QUEUE_DESC_LOW, 0x1008);
    f.assert_needs_reset();

    let mut f = Fixture::standard();
    f.reach_features_ok();
    // The used ring needs 4-byte alignment.
    f.write(QUEUE_DEVICE_LOW, 0x3002);
    f.assert_needs_reset();

    let mut f = Fixture::standard();
    f.reach_features_ok();
    // The available ring needs 2-byte alignment.
    f.write(QUEUE_DRIVER_LOW, 0x2001);
    f.assert_needs_reset();
}

#[test]
fn queue_outside_guest_memory_fails_activation() {
    let mut f = Fixture::standard();
    let layout = QueueLayout {
        device: MEM_SIZE - 0x10,
        ..LAYOUT
    };
    let status = initialize(&mut f.transport, VERSION_1, &[layout]);
    assert_eq!(status, ACK | DRIVER | FEATURES_OK | NEEDS_RESET);
    assert!(f.irq_signalled());
    assert_eq!(f.mock().activations, 0);
    assert_eq!(f.transport.metrics().activate_fails.count(), 1);

    // A queue whose high address half puts it past guest memory.
    let mut f = Fixture::standard();
    let layout = QueueLayout {
        desc: 0x1_0000_1000,
        ..LAYOUT
    };
    let status = initialize(&mut f.transport, VERSION_1, &[layout]);
    assert_eq!(status & NEEDS_RESET, NEEDS_RESET);
    assert_eq!(f.mock().activations, 0);
}

#[test]
fn device_activation_failure_needs_reset() {
    let mut f = Fixture::standard();
    f.mock().fail_activate = true;
    let status = initialize(&mut f.transport, VERSION_1, &[LAYOUT]);
    assert_eq!(status, ACK | DRIVER | FEATURES_OK | NEEDS_RESET);
    assert_ne!(f.read(INTERRUPT_STATUS) & 2, 0);
    assert!(!f.transport.is_activated());
}

#[test]
fn reset_stops_device_and_clears_transport_state() {
    let mut f = Fixture::standard();
    initialize(&mut f.transport, VERSION_1, &[LAYOUT]);
    f.mock()
        .active
        .as_ref()
        .unwrap()
        .interrupt
        .trigger(InterruptKind::Vring)
        .unwrap();
    assert_eq!(f.read(INTERRUPT_STATUS), 1);
    // `initialize` starts with a reset of its own.
    let resets_before = f.mock().resets;

    f.write(STATUS, 0);
    assert_eq!(f.status(), 0);
    assert_eq!(f.read(INTERRUPT_STATUS), 0);
    assert!(!f.transport.is_activated());
    assert_eq!(f.transport.acked_features(), 0);
    assert_eq!(f.mock().resets, resets_before + 1);
    assert!(f.mock().active.is_none());
    f.write(QUEUE_SEL, 0);
    assert_eq!(f.read(QUEUE_READY), 0);

    // Linux un-readies its queues after the reset: not a violation.
    f.write(QUEUE_READY, 0);
    assert_eq!(f.status(), 0);
    assert_eq!(f.violations(), 0);

    // The device can be brought up again; the queue size went back to its
    // maximum and is set anew.
    let status = initialize(
        &mut f.transport,
        VERSION_1,
        &[QueueLayout { size: 32, ..LAYOUT }],
    );
    assert_eq!(status, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    let mock = f.mock();
    assert_eq!(mock.activations, 2);
    assert_eq!(mock.active.as_ref().unwrap().queues[0].queue.size(), 32);
}

#[test]
fn reset_clears_needs_reset() {
    let mut f = Fixture::standard();
    f.write(STATUS, DRIVER_OK);
    f.assert_needs_reset();
    f.write(STATUS, 0);
    assert_eq!(f.status(), 0);
    let status = initialize(&mut f.transport, VERSION_1, &[LAYOUT]);
    assert_eq!(status, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
}

#[test]
fn reset_refused_by_device_reports_failed() {
    let mut f = Fixture::standard();
    initialize(&mut f.transport, VERSION_1, &[LAYOUT]);
    f.mock().refuse_reset = true;
    f.write(STATUS, 0);
    assert_eq!(f.status(), FAILED);
    assert_eq!(f.transport.metrics().reset_fails.count(), 1);
    // Nothing but another reset gets out of FAILED.
    f.write(STATUS, ACK);
    assert_eq!(f.status(), FAILED);
    f.mock().refuse_reset = false;
    f.write(STATUS, 0);
    assert_eq!(f.status(), 0);
}

#[test]
fn failed_bit_is_kept() {
    let mut f = Fixture::standard();
    f.write(STATUS, ACK);
    f.write(STATUS, ACK | FAILED);
    assert_eq!(f.status(), ACK | FAILED);
    f.write(STATUS, ACK | DRIVER | FAILED);
    assert_eq!(f.status() & FAILED, FAILED);
}

#[test]
fn interrupt_status_and_ack() {
    let mut f = Fixture::standard();
    initialize(&mut f.transport, VERSION_1, &[LAYOUT]);
    let interrupt = f.mock().active.as_ref().unwrap().interrupt.clone();

    interrupt.trigger(InterruptKind::Vring).unwrap();
    assert_eq!(f.read(INTERRUPT_STATUS), 1);
    assert_eq!(f.transport.interrupt_status(), 1);
    assert!(f.irq_signalled());

    interrupt.trigger(InterruptKind::Config).unwrap();
    assert_eq!(f.read(INTERRUPT_STATUS), 3);
    assert!(f.irq_signalled());

    f.write(INTERRUPT_ACK, 1);
    assert_eq!(f.read(INTERRUPT_STATUS), 2);
    f.write(INTERRUPT_ACK, 2);
    assert_eq!(f.read(INTERRUPT_STATUS), 0);
    assert!(!f.irq_signalled());
}

#[test]
fn config_change_bumps_generation() {
    let mut f = Fixture::standard();
    initialize(&mut f.transport, VERSION_1, &[LAYOUT]);
    assert_eq!(f.read(CONFIG_GENERATION), 0);
    f.mock().change_config(0, &[0xaa]).unwrap();
    assert_eq!(f.read(CONFIG_GENERATION), 1);
    assert_eq!(f.transport.config_generation(), 1);
    assert_eq!(f.read(INTERRUPT_STATUS), 2);
    let mut byte = [0u8];
    f.transport.read(0, CONFIG, &mut byte);
    assert_eq!(byte, [0xaa]);
    // The generation survives a reset: it only has to change.
    f.write(STATUS, 0);
    assert_eq!(f.read(CONFIG_GENERATION), 1);
}

#[test]
fn config_space_reads_of_every_size() {
    let mut f = Fixture::standard();
    let mut b1 = [0u8; 1];
    f.transport.read(0, CONFIG + 3, &mut b1);
    assert_eq!(b1, [3]);
    let mut b2 = [0u8; 2];
    f.transport.read(0, CONFIG + 4, &mut b2);
    assert_eq!(b2, [4, 5]);
    let mut b4 = [0u8; 4];
    f.transport.read(0, CONFIG + 8, &mut b4);
    assert_eq!(b4, [8, 9, 10, 11]);
    let mut b8 = [0u8; 8];
    f.transport.read(0, CONFIG + 8, &mut b8);
    assert_eq!(b8, [8, 9, 10, 11, 12, 13, 14, 15]);
    assert_eq!(f.transport.metrics().invalid_config_access.count(), 0);
}

#[test]
fn config_space_out_of_range_or_odd_size_reads_zero() {
    let mut f = Fixture::standard();
    // Crosses the 16-byte end.
    let mut b4 = [0xffu8; 4];
    f.transport.read(0, CONFIG + 14, &mut b4);
    assert_eq!(b4, [0; 4]);
    // Entirely past it.
    let mut b1 = [0xffu8; 1];
    f.transport.read(0, CONFIG + 0x800, &mut b1);
    assert_eq!(b1, [0]);
    // 3 bytes is not an access size.
    let mut b3 = [0xffu8; 3];
    f.transport.read(0, CONFIG, &mut b3);
    assert_eq!(b3, [0; 3]);
    // An offset that would overflow.
    f.transport.read(0, u64::MAX, &mut b1);
    assert_eq!(b1, [0]);
    assert_eq!(f.transport.metrics().invalid_config_access.count(), 4);
}

#[test]
fn config_space_writes() {
    let mut f = Fixture::standard();
    // Before the driver bound: ignored.
    f.transport.write(0, CONFIG, &[0x55]);
    assert!(f.mock().config_writes.is_empty());

    f.write(STATUS, ACK);
    f.write(STATUS, ACK | DRIVER);
    f.transport.write(0, CONFIG + 2, &[0x11, 0x22]);
    f.transport
        .write(0, CONFIG + 8, &0x0102_0304_0506_0708u64.to_le_bytes());
    // Past the end: ignored.
    f.transport.write(0, CONFIG + 15, &[1, 2]);
    let mock = f.mock();
    assert_eq!(
        mock.config_writes,
        vec![(2, vec![0x11, 0x22]), (8, vec![8, 7, 6, 5, 4, 3, 2, 1]),]
    );
    assert_eq!(mock.config[2..4], [0x11, 0x22]);
}

#[test]
fn notify_signals_the_queue_eventfd() {
    let mut f = Fixture::standard();
    initialize(&mut f.transport, VERSION_1, &[LAYOUT]);
    let evts = f.transport.queue_notify_events();
    assert_eq!(evts.len(), 2);
    assert!(evts[0].read().is_err(), "notify EventFd signalled early");

    f.write(QUEUE_NOTIFY, 0);
    assert_eq!(f.transport.queue_notify_events()[0].read().unwrap(), 1);
    assert!(f.transport.queue_notify_events()[1].read().is_err());
    f.write(QUEUE_NOTIFY, 1);
    assert_eq!(f.transport.queue_notify_events()[1].read().unwrap(), 1);

    // The device's clone is the same EventFd.
    f.write(QUEUE_NOTIFY, 0);
    assert_eq!(
        f.mock().active.as_ref().unwrap().queues[0]
            .notify
            .read()
            .unwrap(),
        1
    );

    f.write(QUEUE_NOTIFY, 7);
    let metrics = f.transport.metrics();
    assert_eq!(metrics.notifies.count(), 4);
    assert_eq!(metrics.invalid_notifies.count(), 1);
}

#[test]
fn wrong_access_sizes_are_ignored_and_counted() {
    let mut f = Fixture::standard();
    let mut b2 = [0xffu8; 2];
    f.transport.read(0, MAGIC, &mut b2);
    assert_eq!(b2, [0, 0]);
    let mut b8 = [0xffu8; 8];
    f.transport.read(0, MAGIC, &mut b8);
    assert_eq!(b8, [0; 8]);
    // Unaligned 32-bit access.
    let mut b4 = [0xffu8; 4];
    f.transport.read(0, MAGIC + 1, &mut b4);
    assert_eq!(b4, [0; 4]);
    // Writes of the wrong size do not change Status.
    f.transport.write(0, STATUS, &[ACK as u8]);
    f.transport.write(0, STATUS, &u64::from(ACK).to_le_bytes());
    f.transport.write(0, STATUS + 2, &ACK.to_le_bytes());
    assert_eq!(f.status(), 0);
    assert_eq!(f.transport.metrics().invalid_access_size.count(), 6);
    assert_eq!(f.violations(), 0);
}

#[test]
fn unknown_and_read_only_registers() {
    let mut f = Fixture::standard();
    // A hole in the register map, legacy registers, and write-only ones.
    for offset in [0x18, 0x28, 0x40, QUEUE_NOTIFY, INTERRUPT_ACK, 0xc0, 0xf8] {
        assert_eq!(f.read(offset), 0, "offset {offset:#x}");
    }
    // Writes to read-only registers change nothing.
    f.write(MAGIC, 0);
    f.write(QUEUE_NUM_MAX, 4);
    f.write(INTERRUPT_STATUS, 0);
    f.write(CONFIG_GENERATION, 9);
    assert_eq!(f.read(MAGIC), 0x7472_6976);
    assert_eq!(f.read(QUEUE_NUM_MAX), 256);
    assert_eq!(f.read(CONFIG_GENERATION), 0);
    assert_eq!(f.transport.metrics().invalid_register.count(), 11);
    assert_eq!(f.status(), 0);
}

#[test]
fn no_shared_memory_regions() {
    let mut f = Fixture::standard();
    f.write(SHM_SEL, 0);
    assert_eq!(f.read(SHM_LEN_LOW), u32::MAX);
    assert_eq!(f.read(SHM_LEN_HIGH), u32::MAX);
}

#[test]
fn invalid_queue_max_size_is_refused() {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
    let device: Arc<Mutex<dyn VirtioDevice>> =
        Arc::new(Mutex::new(MockDevice::new(VIRTIO_ID_BLOCK, &[16, 100])));
    let err = MmioTransport::new(mem, device, EventFd::new(0).unwrap()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "queue 1: maximum size 100 is not a power of two in 1..=32768"
    );
}

#[test]
fn random_register_traffic_never_panics() {
    // A small deterministic generator: xorshift64.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut f = Fixture::standard();
    for _ in 0..20_000 {
        let r = next();
        let offset = (r >> 8) % 0x140;
        let len = [1usize, 2, 4, 8][(r & 3) as usize];
        let value = next();
        if r & 4 == 0 {
            let mut data = vec![0u8; len];
            f.transport.read(0, offset, &mut data);
        } else {
            // Bias toward the handshake so activation paths are reached.
            let bytes = value.to_le_bytes();
            f.transport.write(0, offset & !3, &bytes[..len]);
        }
    }
}

mod state {
    use vm_memory::Bytes;

    use super::*;
    use crate::{MmioTransportState, StateError, VirtioInterrupt};

    const LAYOUT: QueueLayout = QueueLayout {
        size: 16,
        desc: 0x1000,
        driver: 0x2000,
        device: 0x3000,
    };
    const FEATURES: u64 = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX);

    fn fresh() -> (MmioTransport, Arc<Mutex<MockDevice>>) {
        let mem =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
        let mut dev = MockDevice::new(VIRTIO_ID_BLOCK, &[16, 16]);
        dev.features = FEATURES;
        let dev = Arc::new(Mutex::new(dev));
        let t = MmioTransport::new(mem, dev.clone(), EventFd::new(EFD_NONBLOCK).unwrap()).unwrap();
        (t, dev)
    }

    fn running() -> (MmioTransport, Arc<Mutex<MockDevice>>) {
        let (mut t, dev) = fresh();
        let second = QueueLayout {
            desc: 0x4000,
            driver: 0x5000,
            device: 0x6000,
            ..LAYOUT
        };
        assert_eq!(initialize(&mut t, FEATURES, &[LAYOUT, second]), 0xf);
        (t, dev)
    }

    #[test]
    fn round_trip_keeps_what_the_guest_sees() {
        let (mut t, _dev) = running();
        // The device used three buffers of queue 0, and interrupted.
        t.mem
            .write_obj(3u16.to_le(), GuestAddress(LAYOUT.device + 2))
            .unwrap();
        t.interrupt().trigger(InterruptKind::Vring).unwrap();
        t.interrupt().trigger(InterruptKind::Config).unwrap();
        write_reg(&mut t, QUEUE_SEL, 1);
        let saved = t.save();
        assert_eq!(saved.queues[0].next_used, 3);
        assert_eq!(saved.queues[0].next_avail, 3);

        // Through a serialized form, into a fresh transport and device.
        let text = serde_json::to_string(&saved).unwrap();
        let state: MmioTransportState = serde_json::from_str(&text).unwrap();
        let (mut r, dev) = fresh();
        r.mem
            .write_obj(3u16.to_le(), GuestAddress(LAYOUT.device + 2))
            .unwrap();
        r.restore(&state).unwrap();
        assert_eq!(r.save(), saved);
        for reg in [
            STATUS,
            INTERRUPT_STATUS,
            CONFIG_GENERATION,
            QUEUE_SEL,
            QUEUE_NUM_MAX,
            QUEUE_READY,
        ] {
            assert_eq!(
                read_reg(&mut r, reg),
                read_reg(&mut t, reg),
                "register {reg:#x}"
            );
        }
        assert_eq!(read_reg(&mut r, STATUS), 0xf);
        assert_eq!(read_reg(&mut r, INTERRUPT_STATUS), 3);
        assert_eq!(read_reg(&mut r, CONFIG_GENERATION), 1);
        assert!(r.is_activated());
        assert_eq!(r.acked_features(), FEATURES);
        // The device runs again with the queues where they were.
        let dev = dev.lock().unwrap();
        assert_eq!(dev.acked_features, Some(FEATURES));
        let active = dev.active.as_ref().expect("device reactivated");
        let q = &active.queues[0].queue;
        assert_eq!((q.next_avail(), q.next_used()), (3, 3));
        assert_eq!(q.desc_table(), LAYOUT.desc);
        assert!(q.event_idx_enabled());
        assert_eq!(active.queues[1].queue.avail_ring(), 0x5000);
        // A reset still works on a restored transport.
        drop(dev);
        write_reg(&mut r, STATUS, 0);
        assert!(!r.is_activated());
    }

    #[test]
    fn round_trip_before_activation() {
        let (mut t, _) = fresh();
        write_reg(&mut t, STATUS, ACK);
        write_reg(&mut t, STATUS, ACK | DRIVER);
        write_reg(&mut t, DRIVER_FEATURES_SEL, 1);
        write_reg(&mut t, DRIVER_FEATURES, 1);
        let saved = t.save();
        let (mut r, dev) = fresh();
        r.restore(&saved).unwrap();
        assert_eq!(r.save(), saved);
        assert!(!r.is_activated());
        assert!(dev.lock().unwrap().active.is_none());
        // The driver carries on from where it was.
        write_reg(&mut r, STATUS, ACK | DRIVER | FEATURES_OK);
        assert_eq!(read_reg(&mut r, STATUS), ACK | DRIVER | FEATURES_OK);
        assert_eq!(r.acked_features(), 1 << VIRTIO_F_VERSION_1);
    }

    #[test]
    fn hostile_states_are_refused_and_change_nothing() {
        let (t, _) = running();
        let good = t.save();
        let cases: Vec<(MmioTransportState, &str)> = vec![
            (
                MmioTransportState {
                    status: DRIVER,
                    ..good.clone()
                },
                "status 0x2",
            ),
            (
                MmioTransportState {
                    acked_features: FEATURES | 1,
                    ..good.clone()
                },
                "accepted features",
            ),
            (
                MmioTransportState {
                    acked_features: 1 << VIRTIO_RING_F_EVENT_IDX,
                    ..good.clone()
                },
                "accepted features",
            ),
            (
                MmioTransportState {
                    interrupt_status: 4,
                    ..good.clone()
                },
                "interrupt status 0x4",
            ),
            (
                MmioTransportState {
                    queues: good.queues[..1].to_vec(),
                    ..good.clone()
                },
                "1 queues",
            ),
        ];
        let mut cases = cases;
        for (what, edit) in [
            ("size 0x3", 0usize),
            ("size 0x20", 1),
            ("descriptor table 0x1001", 2),
            ("device area 0xffffffffffffff", 3),
        ] {
            let mut s = good.clone();
            match edit {
                0 => s.queues[0].size = 3,
                1 => s.queues[0].size = 32,
                2 => s.queues[0].desc_table = 0x1001,
                _ => s.queues[1].used_ring = 0x00ff_ffff_ffff_ffff,
            }
            cases.push((s, what));
        }
        for (state, want) in cases {
            let (mut r, dev) = fresh();
            let err = r.restore(&state).unwrap_err();
            assert!(err.to_string().contains(want), "{err} (wanted {want})");
            assert_eq!(read_reg(&mut r, STATUS), 0);
            assert!(!r.is_activated());
            assert!(dev.lock().unwrap().active.is_none());
        }
        // A queue outside guest memory: the activation fails, nothing stays.
        let mut s = good.clone();
        s.queues[1].used_ring = 0x00ff_0000;
        let (mut r, dev) = fresh();
        let err = r.restore(&s).unwrap_err();
        assert!(matches!(err, StateError::Activate(_)), "{err}");
        assert_eq!(read_reg(&mut r, STATUS), 0);
        assert!(dev.lock().unwrap().active.is_none());
        // Only a reset transport takes a state.
        let (mut busy, _) = running();
        let err = busy.restore(&good).unwrap_err();
        assert!(matches!(err, StateError::InUse(0xf)), "{err}");
    }
}
