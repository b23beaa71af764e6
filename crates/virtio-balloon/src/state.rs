// SPDX-License-Identifier: Apache-2.0

//! The balloon's guest-visible state, out and back in (for snapshots).
//!
//! Besides its queues (which the transport saves), the driver sees the
//! accepted features and the configuration space (target, `actual`, hint
//! command id). The device also holds the statistics buffer the driver
//! posted (its head index, returned at the next poll), the last statistics
//! and the hinting run's state; all go into the snapshot, so that a
//! restored guest gets its statistics buffer back and `GET
//! /balloon/statistics` answers as before.

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

use crate::device::HintingState;
use crate::{Balloon, BalloonStats, QUEUE_SIZE};

/// The guest-visible state of a [`Balloon`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonState {
    /// Features the driver accepted (0 before FEATURES_OK).
    pub acked_features: u64,
    /// The target, in 4 KiB pages.
    pub num_pages: u32,
    /// What the driver says it holds, in 4 KiB pages.
    pub actual_pages: u32,
    /// The free page hint command id in the configuration space.
    pub hint_cmd_id: u32,
    /// Seconds between statistics polls (0: no statistics queue).
    pub stats_polling_interval_s: u16,
    /// Head of the statistics chain the device holds, if any.
    pub stats_desc: Option<u16>,
    /// The last statistics the driver sent.
    #[serde(with = "stats_fields")]
    pub latest_stats: BalloonStats,
    /// Free page hinting state.
    pub hinting: HintingState,
}

/// [`BalloonStats`] as a plain tuple of every field: its own
/// serialization leaves absent statistics out (for the API), which formats
/// without field names (the snapshot file's) cannot read back.
mod stats_fields {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use crate::BalloonStats;

    type Fields = ([u32; 4], [Option<u64>; 16]);

    pub fn serialize<S: Serializer>(s: &BalloonStats, ser: S) -> Result<S::Ok, S::Error> {
        let fields: Fields = (
            [s.target_pages, s.actual_pages, s.target_mib, s.actual_mib],
            [
                s.swap_in,
                s.swap_out,
                s.major_faults,
                s.minor_faults,
                s.free_memory,
                s.total_memory,
                s.available_memory,
                s.disk_caches,
                s.hugetlb_allocations,
                s.hugetlb_failures,
                s.oom_kill,
                s.alloc_stall,
                s.async_scan,
                s.direct_scan,
                s.async_reclaim,
                s.direct_reclaim,
            ],
        );
        fields.serialize(ser)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(de: D) -> Result<BalloonStats, D::Error> {
        let ([target_pages, actual_pages, target_mib, actual_mib], o) = Fields::deserialize(de)?;
        Ok(BalloonStats {
            target_pages,
            actual_pages,
            target_mib,
            actual_mib,
            swap_in: o[0],
            swap_out: o[1],
            major_faults: o[2],
            minor_faults: o[3],
            free_memory: o[4],
            total_memory: o[5],
            available_memory: o[6],
            disk_caches: o[7],
            hugetlb_allocations: o[8],
            hugetlb_failures: o[9],
            oom_kill: o[10],
            alloc_stall: o[11],
            async_scan: o[12],
            direct_scan: o[13],
            async_reclaim: o[14],
            direct_reclaim: o[15],
        })
    }
}

/// Why a [`BalloonState`] was refused.
#[derive(Debug, thiserror::Error)]
pub enum BalloonStateError {
    /// Restoring needs a device that the driver has not started.
    #[error("the balloon is activated: restore needs a device fresh from creation or reset")]
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
    /// Statistics on in the state and off in the device, or the reverse
    /// (the queue set differs).
    #[error("statistics polling interval {state}s does not match the device's {device}s")]
    StatsMismatch {
        /// From the state.
        state: u16,
        /// The device's.
        device: u16,
    },
    /// A held statistics chain on a device without statistics, or a head
    /// past the queue.
    #[error("statistics buffer {0:?} cannot be held by this device")]
    StatsDesc(Option<u16>),
}

impl Balloon {
    /// The device's guest-visible state.
    pub fn save(&self) -> BalloonState {
        BalloonState {
            acked_features: self.virtio.acked_features(),
            num_pages: self.num_pages(),
            actual_pages: self.actual_pages(),
            hint_cmd_id: self.hinting.host_cmd,
            stats_polling_interval_s: self.stats_polling_interval_s,
            stats_desc: self.stats_desc,
            latest_stats: self.latest_stats,
            hinting: self.hinting,
        }
    }

    /// Puts a saved state back into a device built from the same
    /// configuration and not activated. The state is untrusted: anything
    /// the device could not have produced is refused and nothing changes.
    pub fn restore(&mut self, state: &BalloonState) -> Result<(), BalloonStateError> {
        if self.is_activated() {
            return Err(BalloonStateError::InUse);
        }
        let offered = self.virtio.avail_features();
        let acked = state.acked_features;
        if acked & !offered != 0 || (acked != 0 && acked & (1u64 << VIRTIO_F_VERSION_1) == 0) {
            return Err(BalloonStateError::Features { acked, offered });
        }
        let (device, st) = (
            self.stats_polling_interval_s,
            state.stats_polling_interval_s,
        );
        if (device == 0) != (st == 0) {
            return Err(BalloonStateError::StatsMismatch { state: st, device });
        }
        if let Some(head) = state.stats_desc {
            if st == 0 || head >= QUEUE_SIZE {
                return Err(BalloonStateError::StatsDesc(state.stats_desc));
            }
        }
        self.virtio.ack_features(acked);
        let space = self.virtio.config_space_mut();
        space[0..4].copy_from_slice(&state.num_pages.to_le_bytes());
        space[4..8].copy_from_slice(&state.actual_pages.to_le_bytes());
        space[8..12].copy_from_slice(&state.hint_cmd_id.to_le_bytes());
        self.stats_polling_interval_s = st;
        self.stats_desc = state.stats_desc;
        self.latest_stats = state.latest_stats;
        self.hinting = state.hinting;
        self.hinting.host_cmd = state.hint_cmd_id;
        Ok(())
    }
}

/// The snapshot contract, through the methods above.
impl ember_virtio::Persist for Balloon {
    type State = BalloonState;
    type Error = BalloonStateError;

    fn save(&self) -> BalloonState {
        Balloon::save(self)
    }

    fn restore(&mut self, state: &BalloonState) -> Result<(), BalloonStateError> {
        Balloon::restore(self, state)
    }
}
