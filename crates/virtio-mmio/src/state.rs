// SPDX-License-Identifier: Apache-2.0

//! The transport's guest-visible state, out and back in (for snapshots).
//!
//! A restored state is untrusted input: every value is checked as the
//! register writes that produced it would have been, and a state that no
//! driver could have reached is refused with the offending value.

use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use crate::transport::{
    MmioTransport, ACKNOWLEDGE, DRIVER, DRIVER_OK, FAILED, FEATURES_OK, NEEDS_RESET,
};

/// One queue as the driver configured it, and how far the device got.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueState {
    /// QueueNum.
    pub size: u16,
    /// QueueReady.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Driver area (available ring) address.
    pub avail_ring: u64,
    /// Device area (used ring) address.
    pub used_ring: u64,
    /// Next available ring entry the device will pop.
    pub next_avail: u16,
    /// Next used ring entry the device will fill.
    pub next_used: u16,
}

/// The registers of a virtio-mmio transport.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioTransportState {
    /// Status.
    pub status: u32,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// DriverFeatures as written so far.
    pub driver_features: u64,
    /// The driver set a bit past 63.
    pub driver_features_beyond_64: bool,
    /// Features accepted at FEATURES_OK.
    pub acked_features: u64,
    /// QueueSel.
    pub queue_sel: u32,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// Every queue of the device, by index.
    pub queues: Vec<QueueState>,
}

/// Why a state was refused.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Restoring needs a transport fresh from creation or reset.
    #[error("the transport is in use (status {0:#x}): restore needs a reset transport")]
    InUse(u32),
    /// The state has a different number of queues than the device.
    #[error("the state has {state} queues, the device {device}")]
    QueueCount {
        /// Queues in the state.
        state: usize,
        /// Queues of the device.
        device: usize,
    },
    /// A Status value no handshake reaches.
    #[error("status {0:#x} is not a state of the virtio 1.2 §3.1.1 handshake")]
    Status(u32),
    /// Accepted features the device does not offer, or without
    /// VIRTIO_F_VERSION_1 after FEATURES_OK.
    #[error("accepted features {acked:#x} are not acceptable for offered features {offered:#x}")]
    Features {
        /// Accepted.
        acked: u64,
        /// Offered.
        offered: u64,
    },
    /// Interrupt status bits other than used-buffer and configuration.
    #[error("interrupt status {0:#x} has bits other than 0 and 1")]
    InterruptStatus(u32),
    /// A queue size or address that the registers would have refused.
    #[error("queue {index}: {what} {value:#x} refused")]
    Queue {
        /// Queue index.
        index: usize,
        /// Which field.
        what: &'static str,
        /// Its value.
        value: u64,
    },
    /// The device could not be restarted with the restored queues.
    #[error("the device cannot be reactivated: {0}")]
    Activate(#[source] crate::Error),
}

/// The Status values a driver reaches (virtio 1.2 §3.1.1), before the
/// device's NEEDS_RESET and the driver's FAILED bits.
const HANDSHAKE: [u32; 5] = [
    0,
    ACKNOWLEDGE,
    ACKNOWLEDGE | DRIVER,
    ACKNOWLEDGE | DRIVER | FEATURES_OK,
    ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
];

impl MmioTransport {
    /// The transport's registers and queues.
    ///
    /// A running device advances its own copy of the queues; the indices
    /// saved here are those the guest sees in the used ring, which are the
    /// device's when nothing is in flight (the VM paused and the device
    /// drained), the state a snapshot is taken in.
    pub fn save(&self) -> MmioTransportState {
        let queues = self
            .queues
            .iter()
            .map(|q| {
                let next_used = if self.activated {
                    self.mem
                        .read_obj::<u16>(GuestAddress(q.used_ring().wrapping_add(2)))
                        .map(u16::from_le)
                        .unwrap_or(q.next_used())
                } else {
                    q.next_used()
                };
                QueueState {
                    size: q.size(),
                    ready: q.ready(),
                    desc_table: q.desc_table(),
                    avail_ring: q.avail_ring(),
                    used_ring: q.used_ring(),
                    next_avail: if self.activated {
                        next_used
                    } else {
                        q.next_avail()
                    },
                    next_used,
                }
            })
            .collect();
        MmioTransportState {
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            driver_features_beyond_64: self.driver_features_beyond_64,
            acked_features: self.acked_features,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt.status(),
            config_generation: self.interrupt.config_generation(),
            queues,
        }
    }

    /// Puts a saved state back into a transport fresh from creation or
    /// reset. The device is told the accepted features and, when the state
    /// has DRIVER_OK, activated with the restored queues.
    ///
    /// Nothing changes when the state is refused.
    pub fn restore(&mut self, state: &MmioTransportState) -> Result<(), StateError> {
        if self.status != 0 || self.activated {
            return Err(StateError::InUse(self.status));
        }
        if state.queues.len() != self.queues.len() {
            return Err(StateError::QueueCount {
                state: state.queues.len(),
                device: self.queues.len(),
            });
        }
        let handshake = state.status & !(NEEDS_RESET | FAILED);
        if !HANDSHAKE.contains(&handshake) {
            return Err(StateError::Status(state.status));
        }
        let offered = self.locked_device().features();
        let version_1 = 1u64 << VIRTIO_F_VERSION_1;
        let features_ok = handshake & FEATURES_OK != 0;
        if state.acked_features & !offered != 0
            || (features_ok && state.acked_features & version_1 == 0)
            || (!features_ok && state.acked_features != 0)
        {
            return Err(StateError::Features {
                acked: state.acked_features,
                offered,
            });
        }
        if state.interrupt_status & !0b11 != 0 {
            return Err(StateError::InterruptStatus(state.interrupt_status));
        }
        let mut queues = Vec::with_capacity(self.queues.len());
        for (index, (saved, current)) in state.queues.iter().zip(&self.queues).enumerate() {
            let refused = |what, value| StateError::Queue { index, what, value };
            let mut q = Queue::new(current.max_size())
                .map_err(|_| refused("maximum size", u64::from(current.max_size())))?;
            q.try_set_size(saved.size)
                .map_err(|_| refused("size", u64::from(saved.size)))?;
            q.try_set_desc_table_address(GuestAddress(saved.desc_table))
                .map_err(|_| refused("descriptor table", saved.desc_table))?;
            q.try_set_avail_ring_address(GuestAddress(saved.avail_ring))
                .map_err(|_| refused("driver area", saved.avail_ring))?;
            q.try_set_used_ring_address(GuestAddress(saved.used_ring))
                .map_err(|_| refused("device area", saved.used_ring))?;
            if saved.ready && !features_ok {
                return Err(refused("ready before FEATURES_OK", 1));
            }
            q.set_ready(saved.ready);
            q.set_next_avail(saved.next_avail);
            q.set_next_used(saved.next_used);
            queues.push(q);
        }

        let previous = std::mem::replace(&mut self.queues, queues);
        self.status = state.status & !DRIVER_OK;
        self.acked_features = state.acked_features;
        if features_ok {
            self.locked_device().ack_features(state.acked_features);
        }
        if handshake & DRIVER_OK != 0 {
            if let Err(e) = self.activate() {
                self.queues = previous;
                self.status = 0;
                self.acked_features = 0;
                self.locked_device().reset();
                return Err(StateError::Activate(e));
            }
            self.activated = true;
        }
        self.status = state.status;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.driver_features = state.driver_features;
        self.driver_features_beyond_64 = state.driver_features_beyond_64;
        self.queue_sel = state.queue_sel;
        self.interrupt
            .status
            .store(state.interrupt_status, Ordering::SeqCst);
        self.interrupt
            .config_generation
            .store(state.config_generation, Ordering::SeqCst);
        Ok(())
    }
}

/// The snapshot contract, through the methods above.
impl ember_virtio::Persist for MmioTransport {
    type State = MmioTransportState;
    type Error = StateError;

    fn save(&self) -> MmioTransportState {
        MmioTransport::save(self)
    }

    fn restore(&mut self, state: &MmioTransportState) -> Result<(), StateError> {
        MmioTransport::restore(self, state)
    }
}
