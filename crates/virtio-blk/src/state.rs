// SPDX-License-Identifier: Apache-2.0

//! The block device's guest-visible state, out and back in (for
//! snapshots).
//!
//! What the driver sees of a block device besides its queues (which the
//! transport saves) is the feature set it accepted, the drive ID it reads
//! with `VIRTIO_BLK_T_GET_ID`, and the configuration space, whose only
//! drive-dependent fields are the capacity and, through
//! `VIRTIO_BLK_F_RO`, whether the drive is read-only; the rest is made of
//! constants. Those come from the backing file and drive configuration
//! given when the device is rebuilt, so a restore checks that they agree
//! with the state rather than overwriting them. Requests in flight are not
//! part of the state: a snapshot is taken with the device drained.

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

use crate::Block;

/// The guest-visible state of a [`Block`] device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    /// Features the driver accepted (0 before FEATURES_OK).
    pub acked_features: u64,
    /// Capacity in 512-byte sectors, as the configuration space shows it.
    pub capacity: u64,
    /// Whether the drive is read-only (`VIRTIO_BLK_F_RO` offered).
    pub read_only: bool,
    /// The drive ID the driver reads with `VIRTIO_BLK_T_GET_ID`.
    pub drive_id: String,
}

/// Why a [`BlockState`] was refused.
#[derive(Debug, thiserror::Error)]
pub enum BlockStateError {
    /// Restoring needs a device that the driver has not started.
    #[error("the block device is activated: restore needs a device fresh from creation or reset")]
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
    /// The backing file has a different size than the saved drive.
    #[error("the state has a capacity of {state} sectors, the backing file {device}")]
    Capacity {
        /// Sectors in the state.
        state: u64,
        /// Sectors of the backing file.
        device: u64,
    },
    /// The drive is configured read-only and the state not, or the other
    /// way round.
    #[error("the state has read-only {state}, the drive is configured with {device}")]
    ReadOnly {
        /// In the state.
        state: bool,
        /// In the drive configuration.
        device: bool,
    },
    /// The drive ID differs from the saved one.
    #[error("the state has drive ID {state:?}, the drive is configured with {device:?}")]
    DriveId {
        /// In the state.
        state: String,
        /// In the drive configuration.
        device: String,
    },
}

impl Block {
    /// The device's guest-visible state.
    pub fn save(&self) -> BlockState {
        BlockState {
            acked_features: self.virtio.acked_features(),
            capacity: self.capacity(),
            read_only: self.config().is_read_only,
            drive_id: self.config().drive_id.clone(),
        }
    }

    /// Puts a saved state back into a device that is not activated, built
    /// from the drive configuration and backing file the state was taken
    /// with.
    ///
    /// The state is untrusted: accepted features outside the offer (or
    /// without VIRTIO_F_VERSION_1), and a capacity, read-only setting or
    /// drive ID that disagree with the drive, are refused, and nothing
    /// changes. The transport's own restore activates the device
    /// afterwards when the driver had started it.
    pub fn restore(&mut self, state: &BlockState) -> Result<(), BlockStateError> {
        if self.is_activated() {
            return Err(BlockStateError::InUse);
        }
        let offered = self.virtio.avail_features();
        let acked = state.acked_features;
        if acked & !offered != 0 || (acked != 0 && acked & (1u64 << VIRTIO_F_VERSION_1) == 0) {
            return Err(BlockStateError::Features { acked, offered });
        }
        if state.capacity != self.capacity() {
            return Err(BlockStateError::Capacity {
                state: state.capacity,
                device: self.capacity(),
            });
        }
        if state.read_only != self.config().is_read_only {
            return Err(BlockStateError::ReadOnly {
                state: state.read_only,
                device: self.config().is_read_only,
            });
        }
        if state.drive_id != self.config().drive_id {
            return Err(BlockStateError::DriveId {
                state: state.drive_id.clone(),
                device: self.config().drive_id.clone(),
            });
        }
        ember_virtio::VirtioDevice::ack_features(self, acked);
        Ok(())
    }
}

/// The snapshot contract, through the methods above.
impl ember_virtio::Persist for Block {
    type State = BlockState;
    type Error = BlockStateError;

    fn save(&self) -> BlockState {
        Block::save(self)
    }

    fn restore(&mut self, state: &BlockState) -> Result<(), BlockStateError> {
        Block::restore(self, state)
    }
}
