// SPDX-License-Identifier: Apache-2.0

//! What the driver puts in the balloon's queues, read and checked: PFN
//! lists (inflate, deflate), statistics, reported free ranges and free page
//! hints. Every parser reads guest memory through vm-memory only, checks
//! each page against guest memory, and bounds its work; nothing here
//! releases memory.

use serde::{Deserialize, Serialize};
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::{MAX_PFNS_PER_CHAIN, MAX_STATS_BYTES, PAGE_SHIFT, PAGE_SIZE, STAT_SIZE};

/// The hint command id that stops a run (virtio 1.2 §5.5.6.4,
/// VIRTIO_BALLOON_CMD_ID_STOP).
pub const HINT_CMD_STOP: u32 = 0;
/// The hint command id that tells the driver the host is done with the
/// hinted pages (VIRTIO_BALLOON_CMD_ID_DONE).
pub const HINT_CMD_DONE: u32 = 1;

/// Why a chain is not what its queue carries. The chain goes back to the
/// driver with nothing done.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// A device-writable descriptor where the device only reads.
    #[error("descriptor {position} of the chain ({addr:#x}, {len} bytes) is device-writable")]
    WriteOnly {
        /// Position of the descriptor in the chain (0 is the head).
        position: usize,
        /// Its guest address.
        addr: u64,
        /// Its length.
        len: u32,
    },
    /// A buffer whose length is not a whole number of entries.
    #[error("descriptor {position} is {len} bytes, not a multiple of {unit}")]
    BadLength {
        /// Position of the descriptor in the chain.
        position: usize,
        /// Its length.
        len: u32,
        /// The entry size (4 for a PFN, 10 for a statistic).
        unit: usize,
    },
    /// More entries than one chain may carry.
    #[error("the chain carries {len} bytes, more than the {max} allowed")]
    TooLong {
        /// Bytes in the chain so far.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A buffer that is not entirely guest memory.
    #[error("descriptor {position} of the chain ({addr:#x}, {len} bytes) is outside guest memory")]
    OutsideMemory {
        /// Position of the descriptor in the chain.
        position: usize,
        /// Its guest address.
        addr: u64,
        /// Its length.
        len: u32,
    },
    /// A page frame number whose page is not guest memory.
    #[error("page frame {pfn:#x} is not guest memory")]
    PfnOutsideMemory {
        /// The PFN, in 4 KiB pages.
        pfn: u32,
    },
    /// A reported or hinted range that is not whole pages of guest memory.
    #[error("range {addr:#x}+{len:#x} is not whole 4 KiB pages of guest memory")]
    BadRange {
        /// Its guest address.
        addr: u64,
        /// Its length.
        len: u32,
    },
}

/// Whether `[addr, addr + len)` is whole balloon pages inside one guest
/// memory region (Ember's regions never touch: MMIO gaps lie between
/// them).
pub(crate) fn is_guest_pages(mem: &GuestMemoryMmap, addr: GuestAddress, len: u64) -> bool {
    if len == 0 || addr.raw_value() % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 {
        return false;
    }
    let Some(region) = mem.find_region(addr) else {
        return false;
    };
    let Some(last) = addr.checked_add(len - 1) else {
        return false;
    };
    last <= vm_memory::GuestMemoryRegion::last_addr(region)
}

fn readable_buffer(
    mem: &GuestMemoryMmap,
    position: usize,
    addr: GuestAddress,
    len: u32,
    write_only: bool,
) -> Result<(), ChainError> {
    if write_only {
        return Err(ChainError::WriteOnly {
            position,
            addr: addr.0,
            len,
        });
    }
    if !GuestMemoryBackend::check_range(mem, addr, len as usize) {
        return Err(ChainError::OutsideMemory {
            position,
            addr: addr.0,
            len,
        });
    }
    Ok(())
}

/// Reads an inflate or deflate chain: device-readable buffers of
/// little-endian u32 page frame numbers (4 KiB pages), at most
/// [`MAX_PFNS_PER_CHAIN`] in all, each naming a page of guest memory.
///
/// `pfns` is cleared and receives the PFNs in order; it is left empty when
/// the chain is refused, so that nothing of a bad chain is acted on.
pub fn parse_pfns(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    pfns: &mut Vec<u32>,
) -> Result<(), ChainError> {
    pfns.clear();
    let result = read_pfns(chain, mem, pfns);
    if result.is_err() {
        pfns.clear();
    }
    result
}

fn read_pfns(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    pfns: &mut Vec<u32>,
) -> Result<(), ChainError> {
    for (position, desc) in chain.enumerate() {
        let (addr, len) = (desc.addr(), desc.len());
        readable_buffer(mem, position, addr, len, desc.is_write_only())?;
        if len as usize % 4 != 0 {
            return Err(ChainError::BadLength {
                position,
                len,
                unit: 4,
            });
        }
        let count = len as usize / 4;
        if pfns.len() + count > MAX_PFNS_PER_CHAIN {
            return Err(ChainError::TooLong {
                len: (pfns.len() + count) * 4,
                max: MAX_PFNS_PER_CHAIN * 4,
            });
        }
        let mut raw = [0u8; MAX_PFNS_PER_CHAIN * 4];
        let raw = &mut raw[..len as usize];
        // The range was checked above.
        mem.read_slice(raw, addr)
            .map_err(|_| ChainError::OutsideMemory {
                position,
                addr: addr.0,
                len,
            })?;
        for bytes in raw.chunks_exact(4) {
            let pfn = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
            let page = GuestAddress(u64::from(pfn) << PAGE_SHIFT);
            if !is_guest_pages(mem, page, PAGE_SIZE) {
                return Err(ChainError::PfnOutsideMemory { pfn });
            }
            pfns.push(pfn);
        }
    }
    Ok(())
}

/// Sorts and de-duplicates `pfns`, and merges consecutive pages into
/// `(first_pfn, pages)` runs, so that each run is released with one call.
pub fn pfn_ranges(pfns: &mut [u32]) -> Vec<(u64, u64)> {
    pfns.sort_unstable();
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    let mut prev: Option<u32> = None;
    for &pfn in pfns.iter() {
        if prev == Some(pfn) {
            continue;
        }
        match ranges.last_mut() {
            Some((first, count)) if *first + *count == u64::from(pfn) => *count += 1,
            _ => ranges.push((u64::from(pfn), 1)),
        }
        prev = Some(pfn);
    }
    ranges
}

/// Reads a statistics chain: device-readable buffers of packed
/// `le16 tag; le64 val;` entries (virtio 1.2 §5.5.6.3), at most
/// [`MAX_STATS_BYTES`] in all. Returns the (tag, value) pairs in order;
/// nothing when the chain is refused.
pub fn parse_stats(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
) -> Result<Vec<(u16, u64)>, ChainError> {
    let mut stats = Vec::new();
    let mut total = 0usize;
    for (position, desc) in chain.enumerate() {
        let (addr, len) = (desc.addr(), desc.len());
        readable_buffer(mem, position, addr, len, desc.is_write_only())?;
        if len as usize % STAT_SIZE != 0 {
            return Err(ChainError::BadLength {
                position,
                len,
                unit: STAT_SIZE,
            });
        }
        total += len as usize;
        if total > MAX_STATS_BYTES {
            return Err(ChainError::TooLong {
                len: total,
                max: MAX_STATS_BYTES,
            });
        }
        let mut raw = [0u8; MAX_STATS_BYTES];
        let raw = &mut raw[..len as usize];
        mem.read_slice(raw, addr)
            .map_err(|_| ChainError::OutsideMemory {
                position,
                addr: addr.0,
                len,
            })?;
        for e in raw.chunks_exact(STAT_SIZE) {
            let tag = u16::from_le_bytes([e[0], e[1]]);
            let mut val = [0u8; 8];
            val.copy_from_slice(&e[2..10]);
            stats.push((tag, u64::from_le_bytes(val)));
        }
    }
    Ok(stats)
}

/// Reads a free page reporting chain: every descriptor is a range of free
/// guest pages (virtio 1.2 §5.5.6.6), whole 4 KiB pages inside guest
/// memory. `ranges` is cleared and receives them; it is left empty when the
/// chain is refused.
pub fn parse_ranges(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    ranges: &mut Vec<(GuestAddress, u64)>,
) -> Result<(), ChainError> {
    ranges.clear();
    for desc in chain {
        let (addr, len) = (desc.addr(), desc.len());
        if !is_guest_pages(mem, addr, u64::from(len)) {
            ranges.clear();
            return Err(ChainError::BadRange { addr: addr.0, len });
        }
        ranges.push((addr, u64::from(len)));
    }
    Ok(())
}

/// One chain of the free page hinting queue (virtio 1.2 §5.5.6.4): a
/// device-readable 4-byte command id, hinted free ranges (device-writable
/// buffers), or both.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HintChain {
    /// The last command id the chain carries, if any.
    pub cmd: Option<u32>,
    /// The hinted ranges, whole pages of guest memory.
    pub ranges: Vec<(GuestAddress, u64)>,
}

impl HintChain {
    /// Reads a hinting chain; every range is checked against guest memory.
    pub fn parse(
        chain: DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
    ) -> Result<HintChain, ChainError> {
        let mut hint = HintChain::default();
        for (position, desc) in chain.enumerate() {
            let (addr, len) = (desc.addr(), desc.len());
            if desc.is_write_only() {
                if !is_guest_pages(mem, addr, u64::from(len)) {
                    return Err(ChainError::BadRange { addr: addr.0, len });
                }
                hint.ranges.push((addr, u64::from(len)));
                continue;
            }
            if len != 4 {
                return Err(ChainError::BadLength {
                    position,
                    len,
                    unit: 4,
                });
            }
            let cmd = mem
                .read_obj::<u32>(addr)
                .map_err(|_| ChainError::OutsideMemory {
                    position,
                    addr: addr.0,
                    len,
                })?;
            hint.cmd = Some(u32::from_le(cmd));
        }
        Ok(hint)
    }
}

/// The guest's memory statistics and the balloon's size, as
/// `GET /balloon/statistics` returns them (Firecracker's `BalloonStats`):
/// a statistic the driver never sent is left out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonStats {
    /// The target, in 4 KiB pages.
    pub target_pages: u32,
    /// The pages the driver says it holds.
    pub actual_pages: u32,
    /// The target, in MiB.
    pub target_mib: u32,
    /// What the driver holds, in MiB.
    pub actual_mib: u32,
    /// Memory swapped in (bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap_in: Option<u64>,
    /// Memory swapped out (bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap_out: Option<u64>,
    /// Major page faults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub major_faults: Option<u64>,
    /// Minor page faults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minor_faults: Option<u64>,
    /// Memory not used for anything (bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free_memory: Option<u64>,
    /// Total memory (bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_memory: Option<u64>,
    /// Memory available to new applications without swapping (bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub available_memory: Option<u64>,
    /// Memory reclaimable without I/O, such as the page cache (bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_caches: Option<u64>,
    /// Successful hugetlb page allocations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugetlb_allocations: Option<u64>,
    /// Failed hugetlb page allocations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugetlb_failures: Option<u64>,
    /// OOM killer invocations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oom_kill: Option<u64>,
    /// Allocation stalls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alloc_stall: Option<u64>,
    /// Pages scanned by kswapd.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub async_scan: Option<u64>,
    /// Pages scanned directly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct_scan: Option<u64>,
    /// Pages reclaimed by kswapd.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub async_reclaim: Option<u64>,
    /// Pages reclaimed directly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct_reclaim: Option<u64>,
}

impl BalloonStats {
    /// Records one statistic by its tag (Linux's
    /// `include/uapi/linux/virtio_balloon.h`, VIRTIO_BALLOON_S_*); returns
    /// `false` for a tag it does not know, which changes nothing.
    pub fn update(&mut self, tag: u16, val: u64) -> bool {
        let slot = match tag {
            0 => &mut self.swap_in,
            1 => &mut self.swap_out,
            2 => &mut self.major_faults,
            3 => &mut self.minor_faults,
            4 => &mut self.free_memory,
            5 => &mut self.total_memory,
            6 => &mut self.available_memory,
            7 => &mut self.disk_caches,
            8 => &mut self.hugetlb_allocations,
            9 => &mut self.hugetlb_failures,
            10 => &mut self.oom_kill,
            11 => &mut self.alloc_stall,
            12 => &mut self.async_scan,
            13 => &mut self.direct_scan,
            14 => &mut self.async_reclaim,
            15 => &mut self.direct_reclaim,
            _ => return false,
        };
        *slot = Some(val);
        true
    }
}
