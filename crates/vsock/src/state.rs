// SPDX-License-Identifier: Apache-2.0

//! The vsock device's guest-visible state, out and back in (for
//! snapshots).
//!
//! Kept: the feature set the driver accepted and the configuration space,
//! which holds only `guest_cid` (virtio 1.2 §5.10.4); the CID comes from
//! the configuration given when the device is rebuilt, so a restore checks
//! that it agrees with the state rather than overwriting it. The queues
//! are the transport's to save.
//!
//! Reset, as Firecracker does: connections are not saved (their host
//! sockets do not survive the VMM process), and neither is the device's
//! own flow state (a transport reset waiting for the driver to refill the
//! event queue, TX stalled on a full RST queue). A restored device starts
//! with no connections; once the transport has reactivated it, the VMM
//! calls [`Vsock::send_transport_reset`] so that the driver drops its
//! sockets and reads `guest_cid` again (virtio 1.2 §5.10.6.5).

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

use crate::Vsock;

/// The guest-visible state of a [`Vsock`] device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    /// Features the driver accepted (0 before FEATURES_OK).
    pub acked_features: u64,
    /// The guest's context ID in the configuration space.
    pub guest_cid: u64,
}

/// Why a [`VsockState`] was refused.
#[derive(Debug, thiserror::Error)]
pub enum VsockStateError {
    /// Restoring needs a device that the driver has not started.
    #[error("the vsock device is activated: restore needs a device fresh from creation or reset")]
    InUse,
    /// Accepted features the device does not offer, or a non-empty set
    /// without VIRTIO_F_VERSION_1.
    #[error("accepted features {acked:#x} are not acceptable for offered features {offered:#x}")]
    Features {
        /// Accepted, from the state.
        acked: u64,
        /// Offered by the device.
        offered: u64,
    },
    /// The device is configured with a different guest CID.
    #[error("the state has guest CID {state}, the device is configured with {device}")]
    Cid {
        /// In the state.
        state: u64,
        /// In the device configuration.
        device: u64,
    },
}

impl Vsock {
    /// The device's guest-visible state (see the module documentation for
    /// what is left out).
    pub fn save(&self) -> VsockState {
        VsockState {
            acked_features: self.acked_features(),
            guest_cid: self.guest_cid(),
        }
    }

    /// Puts a saved state back into a device that is not activated, built
    /// with the guest CID the state was taken with.
    ///
    /// The state is untrusted: accepted features outside the offer (or
    /// without VIRTIO_F_VERSION_1) and a different CID are refused, and
    /// nothing changes. The transport's own restore activates the device
    /// afterwards when the driver had started it; the VMM then sends the
    /// transport reset event.
    pub fn restore(&mut self, state: &VsockState) -> Result<(), VsockStateError> {
        if self.is_activated() {
            return Err(VsockStateError::InUse);
        }
        let offered = ember_virtio::VirtioDevice::features(self);
        let acked = state.acked_features;
        if acked & !offered != 0 || (acked != 0 && acked & (1u64 << VIRTIO_F_VERSION_1) == 0) {
            return Err(VsockStateError::Features { acked, offered });
        }
        if state.guest_cid != self.guest_cid() {
            return Err(VsockStateError::Cid {
                state: state.guest_cid,
                device: self.guest_cid(),
            });
        }
        ember_virtio::VirtioDevice::ack_features(self, acked);
        Ok(())
    }
}

/// The snapshot contract, through the methods above.
impl ember_virtio::Persist for Vsock {
    type State = VsockState;
    type Error = VsockStateError;

    fn save(&self) -> VsockState {
        Vsock::save(self)
    }

    fn restore(&mut self, state: &VsockState) -> Result<(), VsockStateError> {
        Vsock::restore(self, state)
    }
}
