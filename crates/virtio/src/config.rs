// SPDX-License-Identifier: Apache-2.0

//! What every device repeats: the features it offers and the driver
//! accepted, and a configuration space read with bounds (virtio 1.2 §2.2,
//! §2.5).

/// The feature bits and configuration space of one device, in the spirit
/// of rust-vmm's `VirtioConfig`.
///
/// A device keeps one and answers the feature and configuration methods of
/// [`VirtioDevice`](crate::VirtioDevice) from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtioConfig {
    avail_features: u64,
    acked_features: u64,
    config_space: Vec<u8>,
}

impl VirtioConfig {
    /// A device offering `avail_features`, with `config_space` as its
    /// configuration space.
    pub fn new(avail_features: u64, config_space: Vec<u8>) -> Self {
        VirtioConfig {
            avail_features,
            acked_features: 0,
            config_space,
        }
    }

    /// The feature bits offered.
    pub fn avail_features(&self) -> u64 {
        self.avail_features
    }

    /// One 32-bit page of the offered features, as the transport's feature
    /// selector shows it (virtio 1.2 §4.2.2 DeviceFeaturesSel): page 0 is
    /// bits 0-31, page 1 bits 32-63, every other page 0.
    pub fn avail_features_page(&self, page: u32) -> u32 {
        features_page(self.avail_features, page)
    }

    /// The feature bits the driver accepted (0 before FEATURES_OK and after
    /// a reset).
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Whether the driver accepted feature `bit`.
    pub fn has_acked(&self, bit: u32) -> bool {
        bit < 64 && self.acked_features & (1u64 << bit) != 0
    }

    /// Records the features the driver accepted, keeping only those offered.
    pub fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
    }

    /// Size of the configuration space in bytes.
    pub fn config_size(&self) -> u64 {
        self.config_space.len() as u64
    }

    /// The configuration space.
    pub fn config_space(&self) -> &[u8] {
        &self.config_space
    }

    /// The configuration space, for a device that changes it (it then sends
    /// a configuration change interrupt).
    pub fn config_space_mut(&mut self) -> &mut [u8] {
        &mut self.config_space
    }

    /// Replaces the configuration space (its size may change).
    pub fn set_config_space(&mut self, config_space: Vec<u8>) {
        self.config_space = config_space;
    }

    /// Reads `data.len()` bytes at `offset`. A range outside the space
    /// reads as zeroes and returns `false`.
    pub fn read_config(&self, offset: u64, data: &mut [u8]) -> bool {
        let src = usize::try_from(offset)
            .ok()
            .and_then(|start| self.config_space.get(start..start.checked_add(data.len())?));
        match src {
            Some(src) => {
                data.copy_from_slice(src);
                true
            }
            None => {
                data.fill(0);
                false
            }
        }
    }

    /// Forgets the accepted features (a transport reset).
    pub fn reset(&mut self) {
        self.acked_features = 0;
    }
}

/// One 32-bit page of a 64-bit feature set: page 0 is bits 0-31, page 1
/// bits 32-63, and every other page 0 (no device here defines bits past
/// 63).
pub fn features_page(features: u64, page: u32) -> u32 {
    match page {
        0 => features as u32,
        1 => (features >> 32) as u32,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acked_features_are_a_subset_of_the_offer() {
        let mut c = VirtioConfig::new(0b1010 | (1 << 32), vec![]);
        c.ack_features(0b1111 | (1 << 32) | (1 << 40));
        assert_eq!(c.acked_features(), 0b1010 | (1 << 32));
        assert!(c.has_acked(1));
        assert!(!c.has_acked(0));
        assert!(!c.has_acked(64));
        c.reset();
        assert_eq!(c.acked_features(), 0);
        assert_eq!(c.avail_features(), 0b1010 | (1 << 32));
    }

    #[test]
    fn feature_pages() {
        let c = VirtioConfig::new(0x1234_5678_9abc_def0, vec![]);
        assert_eq!(c.avail_features_page(0), 0x9abc_def0);
        assert_eq!(c.avail_features_page(1), 0x1234_5678);
        assert_eq!(c.avail_features_page(2), 0);
        assert_eq!(c.avail_features_page(u32::MAX), 0);
    }

    #[test]
    fn config_reads_are_bounded() {
        let c = VirtioConfig::new(0, (0u8..8).collect());
        assert_eq!(c.config_size(), 8);
        let mut b = [0xffu8; 4];
        assert!(c.read_config(4, &mut b));
        assert_eq!(b, [4, 5, 6, 7]);
        let mut b = [0xffu8; 4];
        assert!(!c.read_config(6, &mut b));
        assert_eq!(b, [0; 4]);
        let mut b = [0xffu8; 2];
        assert!(!c.read_config(u64::MAX, &mut b));
        assert_eq!(b, [0; 2]);
    }
}
