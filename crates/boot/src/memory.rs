// SPDX-License-Identifier: Apache-2.0

//! Guest RAM regions around the MMIO gaps.

use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::layout::{MAX_MEM_SIZE_MIB, MMIO32_SIZE, MMIO32_START, MMIO64_SIZE, MMIO64_START};
use crate::Error;

/// Splits `mem_size_bytes` of RAM into guest regions: from 0 up to the
/// 32-bit MMIO gap at [`MMIO32_START`], then from 4 GiB up to the 64-bit
/// gap at [`MMIO64_START`], then from 512 GiB. Returns no region for 0 bytes.
///
/// ```
/// use ember_boot::arch_memory_regions;
/// use vm_memory::GuestAddress;
///
/// assert_eq!(arch_memory_regions(1 << 30), vec![(GuestAddress(0), 1 << 30)]);
/// assert_eq!(
///     arch_memory_regions(4 << 30),
///     vec![(GuestAddress(0), 3 << 30), (GuestAddress(1 << 32), 1 << 30)]
/// );
/// ```
pub fn arch_memory_regions(mem_size_bytes: u64) -> Vec<(GuestAddress, usize)> {
    let mut regions = Vec::new();
    let mut start = 0u64;
    let mut remaining = mem_size_bytes;
    for (gap_start, gap_size) in [(MMIO32_START, MMIO32_SIZE), (MMIO64_START, MMIO64_SIZE)] {
        if remaining == 0 {
            return regions;
        }
        let room = gap_start - start;
        let len = remaining.min(room);
        regions.push((GuestAddress(start), len as usize));
        remaining -= len;
        start = gap_start + gap_size;
    }
    if remaining > 0 {
        regions.push((GuestAddress(start), remaining as usize));
    }
    regions
}

/// Maps `mem_size_mib` MiB of anonymous guest RAM laid out by
/// [`arch_memory_regions`]. Sizes of 0 or above
/// [`MAX_MEM_SIZE_MIB`] are refused.
pub fn create_guest_memory(mem_size_mib: usize) -> Result<GuestMemoryMmap, Error> {
    if mem_size_mib == 0 || mem_size_mib > MAX_MEM_SIZE_MIB {
        return Err(Error::InvalidMemorySize {
            mib: mem_size_mib,
            max: MAX_MEM_SIZE_MIB,
        });
    }
    // Bounded by MAX_MEM_SIZE_MIB, so the shift cannot overflow.
    let bytes = (mem_size_mib as u64) << 20;
    GuestMemoryMmap::from_ranges(&arch_memory_regions(bytes)).map_err(|source| {
        Error::GuestMemoryAlloc {
            mib: mem_size_mib,
            source,
        }
    })
}

#[cfg(test)]
mod tests {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

    use super::*;
    use crate::layout::{FIRST_ADDR_PAST_32BITS, FIRST_ADDR_PAST_64BITS_MMIO};

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    #[test]
    fn below_the_gap_is_one_region() {
        assert_eq!(
            arch_memory_regions(64 * MIB),
            vec![(GuestAddress(0), (64 * MIB) as usize)]
        );
        assert_eq!(
            arch_memory_regions(3 * GIB),
            vec![(GuestAddress(0), (3 * GIB) as usize)]
        );
        assert!(arch_memory_regions(0).is_empty());
    }

    #[test]
    fn above_the_gap_continues_at_4g() {
        assert_eq!(
            arch_memory_regions(4 * GIB),
            vec![
                (GuestAddress(0), (3 * GIB) as usize),
                (GuestAddress(FIRST_ADDR_PAST_32BITS), GIB as usize)
            ]
        );
        assert_eq!(
            arch_memory_regions(3 * GIB + 0x8000),
            vec![
                (GuestAddress(0), (3 * GIB) as usize),
                (GuestAddress(FIRST_ADDR_PAST_32BITS), 0x8000)
            ]
        );
    }

    #[test]
    fn above_the_64bit_gap_continues_at_512g() {
        let regions = arch_memory_regions(300 * GIB);
        assert_eq!(
            regions,
            vec![
                (GuestAddress(0), (3 * GIB) as usize),
                (GuestAddress(4 * GIB), (252 * GIB) as usize),
                (
                    GuestAddress(FIRST_ADDR_PAST_64BITS_MMIO),
                    (45 * GIB) as usize
                ),
            ]
        );
        let total: usize = regions.iter().map(|r| r.1).sum();
        assert_eq!(total as u64, 300 * GIB);
    }

    #[test]
    fn creates_memory_with_the_layout() {
        let mem = create_guest_memory(5 * 1024).unwrap();
        let regions: Vec<_> = mem.iter().map(|r| (r.start_addr(), r.len())).collect();
        assert_eq!(
            regions,
            vec![(GuestAddress(0), 3 * GIB), (GuestAddress(4 * GIB), 2 * GIB)]
        );
    }

    #[test]
    fn refuses_zero_and_absurd_sizes() {
        assert!(matches!(
            create_guest_memory(0),
            Err(Error::InvalidMemorySize { mib: 0, .. })
        ));
        let err = create_guest_memory(MAX_MEM_SIZE_MIB + 1).unwrap_err();
        assert!(err.to_string().contains("must be between 1 and"), "{err}");
        assert!(matches!(
            create_guest_memory(usize::MAX),
            Err(Error::InvalidMemorySize { .. })
        ));
    }
}
