// SPDX-License-Identifier: Apache-2.0

//! Fuzzes `MmioTransport::restore`: a transport state is untrusted input (a
//! snapshot file). The input is either the state's serialized form (JSON,
//! first byte odd) or its fields drawn from raw bytes (first byte even), so
//! that both the decoder and the validation see hostile values.
//!
//! Checked: no panic; a refused state leaves the transport reset and the
//! device inactive; an accepted one saves back to the same registers and
//! queue configuration, the device is active exactly when the state has
//! DRIVER_OK, and a reset afterwards leaves everything reset.

#![no_main]

use std::sync::{Arc, Mutex};

use arbitrary::Unstructured;
use ember_bus::BusDevice;
use ember_virtio_mmio::test_utils::MockDevice;
use ember_virtio_mmio::{MmioTransport, MmioTransportState, QueueState};
use libfuzzer_sys::fuzz_target;
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// VIRTIO_F_VERSION_1 and VIRTIO_RING_F_EVENT_IDX.
const FEATURES: u64 = (1 << 32) | (1 << 29);
const STATUS: u64 = 0x70;
const DRIVER_OK: u32 = 4;

fn from_raw(u: &mut Unstructured<'_>) -> arbitrary::Result<MmioTransportState> {
    let count = u.int_in_range(0..=3)?;
    let mut queues = Vec::new();
    for _ in 0..count {
        queues.push(QueueState {
            size: u.arbitrary()?,
            ready: u.arbitrary()?,
            desc_table: u.arbitrary()?,
            avail_ring: u.arbitrary()?,
            used_ring: u.arbitrary()?,
            next_avail: u.arbitrary()?,
            next_used: u.arbitrary()?,
        });
    }
    Ok(MmioTransportState {
        status: u.arbitrary()?,
        device_features_sel: u.arbitrary()?,
        driver_features_sel: u.arbitrary()?,
        driver_features: u.arbitrary()?,
        driver_features_beyond_64: u.arbitrary()?,
        acked_features: u.arbitrary()?,
        queue_sel: u.arbitrary()?,
        interrupt_status: u.arbitrary()?,
        config_generation: u.arbitrary()?,
        queues,
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&kind, rest)) = data.split_first() else {
        return;
    };
    let state = if kind & 1 == 1 {
        match serde_json::from_slice::<MmioTransportState>(rest) {
            Ok(state) => state,
            Err(_) => return,
        }
    } else {
        match from_raw(&mut Unstructured::new(rest)) {
            Ok(state) => state,
            Err(_) => return,
        }
    };
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
    let mut device = MockDevice::new(2, &[16, 16]);
    device.features = FEATURES;
    let device = Arc::new(Mutex::new(device));
    let mut transport =
        MmioTransport::new(mem, device.clone(), EventFd::new(EFD_NONBLOCK).unwrap()).unwrap();

    let mut status = [0u8; 4];
    match transport.restore(&state) {
        Err(_) => {
            transport.read(0, STATUS, &mut status);
            assert_eq!(
                u32::from_le_bytes(status),
                0,
                "a refused state left a status"
            );
            assert!(!transport.is_activated());
            assert!(device.lock().unwrap().active.is_none());
        }
        Ok(()) => {
            let saved = transport.save();
            assert_eq!(saved.status, state.status);
            assert_eq!(saved.acked_features, state.acked_features);
            assert_eq!(saved.interrupt_status, state.interrupt_status);
            assert_eq!(saved.config_generation, state.config_generation);
            assert_eq!(saved.queues.len(), state.queues.len());
            for (a, b) in saved.queues.iter().zip(&state.queues) {
                assert_eq!(
                    (a.size, a.ready, a.desc_table, a.avail_ring, a.used_ring),
                    (b.size, b.ready, b.desc_table, b.avail_ring, b.used_ring)
                );
            }
            let running = state.status & DRIVER_OK != 0;
            assert_eq!(transport.is_activated(), running);
            assert_eq!(device.lock().unwrap().active.is_some(), running);
            transport.write(0, STATUS, &0u32.to_le_bytes());
            transport.read(0, STATUS, &mut status);
            assert_eq!(u32::from_le_bytes(status), 0);
            assert!(device.lock().unwrap().active.is_none());
        }
    }
});
