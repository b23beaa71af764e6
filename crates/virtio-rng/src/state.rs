// SPDX-License-Identifier: Apache-2.0

//! The entropy device's guest-visible state, out and back in (for
//! snapshots).
//!
//! Besides its queue (which the transport saves), all the driver sees of an
//! entropy device is the feature set it accepted: there is no configuration
//! space. Requests in flight are not state: a snapshot is taken with the
//! device drained, and the device keeps no request across calls.

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

use crate::Entropy;

/// The guest-visible state of an [`Entropy`] device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntropyState {
    /// Features the driver accepted (0 before FEATURES_OK).
    pub acked_features: u64,
}

/// Why an [`EntropyState`] was refused.
#[derive(Debug, thiserror::Error)]
pub enum EntropyStateError {
    /// Restoring needs a device that the driver has not started.
    #[error(
        "the entropy device is activated: restore needs a device fresh from creation or reset"
    )]
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
}

impl Entropy {
    /// The device's guest-visible state.
    pub fn save(&self) -> EntropyState {
        EntropyState {
            acked_features: self.virtio.acked_features(),
        }
    }

    /// Puts a saved state back into a device that is not activated.
    ///
    /// The state is untrusted: accepted features outside the offer, or
    /// without VIRTIO_F_VERSION_1, are refused and nothing changes. The
    /// transport's own restore activates the device afterwards when the
    /// driver had started it.
    pub fn restore(&mut self, state: &EntropyState) -> Result<(), EntropyStateError> {
        if self.is_activated() {
            return Err(EntropyStateError::InUse);
        }
        let offered = self.virtio.avail_features();
        let acked = state.acked_features;
        if acked & !offered != 0 || (acked != 0 && acked & (1u64 << VIRTIO_F_VERSION_1) == 0) {
            return Err(EntropyStateError::Features { acked, offered });
        }
        self.virtio.ack_features(acked);
        Ok(())
    }
}

/// The snapshot contract, through the methods above.
impl ember_virtio::Persist for Entropy {
    type State = EntropyState;
    type Error = EntropyStateError;

    fn save(&self) -> EntropyState {
        Entropy::save(self)
    }

    fn restore(&mut self, state: &EntropyState) -> Result<(), EntropyStateError> {
        Entropy::restore(self, state)
    }
}
