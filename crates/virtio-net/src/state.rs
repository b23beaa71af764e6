// SPDX-License-Identifier: Apache-2.0

//! The network device's guest-visible state, out and back in (for
//! snapshots).
//!
//! Besides its queues (which the transport saves), the driver sees the
//! feature set it accepted and the configuration space: the MAC address
//! (with VIRTIO_NET_F_MAC) and the MTU (with VIRTIO_NET_F_MTU); `status`
//! and `max_virtqueue_pairs` are not offered and read as zero. The MAC and
//! MTU come from the interface configuration given when the device is
//! rebuilt, so a restore checks that they agree with the state rather than
//! overwriting them; a guest whose MAC changed under it would keep sending
//! frames the device counts as spoofed. The TAP's offload flags follow the
//! accepted features when the transport reactivates the device. Frames in
//! flight are not part of the state: a snapshot is taken with the device
//! drained, and frames the TAP holds stay in the TAP.

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

use crate::Net;

/// The guest-visible state of a [`Net`] device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    /// Features the driver accepted (0 before FEATURES_OK).
    pub acked_features: u64,
    /// The MAC address in the configuration space, if one is offered.
    pub guest_mac: Option<[u8; 6]>,
    /// The MTU in the configuration space, if one is offered.
    pub mtu: Option<u16>,
}

/// Why a [`NetState`] was refused.
#[derive(Debug, thiserror::Error)]
pub enum NetStateError {
    /// Restoring needs a device that the driver has not started.
    #[error(
        "the network device is activated: restore needs a device fresh from creation or reset"
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
    /// The interface is configured with a different guest MAC address.
    #[error(
        "the state has guest MAC {state:02x?}, the interface is configured with {device:02x?}"
    )]
    Mac {
        /// In the state.
        state: Option<[u8; 6]>,
        /// In the interface configuration.
        device: Option<[u8; 6]>,
    },
    /// The interface is configured with a different MTU.
    #[error("the state has MTU {state:?}, the interface is configured with {device:?}")]
    Mtu {
        /// In the state.
        state: Option<u16>,
        /// In the interface configuration.
        device: Option<u16>,
    },
}

impl Net {
    /// The device's guest-visible state.
    pub fn save(&self) -> NetState {
        NetState {
            acked_features: self.acked_features(),
            guest_mac: self.guest_mac(),
            mtu: self.mtu(),
        }
    }

    /// Puts a saved state back into a device that is not activated, built
    /// from the interface configuration the state was taken with.
    ///
    /// The state is untrusted: accepted features outside the offer (or
    /// without VIRTIO_F_VERSION_1), and a MAC address or MTU that disagree
    /// with the interface configuration, are refused, and nothing changes.
    /// The transport's own restore activates the device afterwards when
    /// the driver had started it.
    pub fn restore(&mut self, state: &NetState) -> Result<(), NetStateError> {
        if self.is_activated() {
            return Err(NetStateError::InUse);
        }
        let offered = ember_virtio::VirtioDevice::features(self);
        let acked = state.acked_features;
        if acked & !offered != 0 || (acked != 0 && acked & (1u64 << VIRTIO_F_VERSION_1) == 0) {
            return Err(NetStateError::Features { acked, offered });
        }
        if state.guest_mac != self.guest_mac() {
            return Err(NetStateError::Mac {
                state: state.guest_mac,
                device: self.guest_mac(),
            });
        }
        if state.mtu != self.mtu() {
            return Err(NetStateError::Mtu {
                state: state.mtu,
                device: self.mtu(),
            });
        }
        ember_virtio::VirtioDevice::ack_features(self, acked);
        Ok(())
    }
}

/// The snapshot contract, through the methods above.
impl ember_virtio::Persist for Net {
    type State = NetState;
    type Error = NetStateError;

    fn save(&self) -> NetState {
        Net::save(self)
    }

    fn restore(&mut self, state: &NetState) -> Result<(), NetStateError> {
        Net::restore(self, state)
    }
}
