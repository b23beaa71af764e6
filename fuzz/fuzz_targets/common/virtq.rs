// SPDX-License-Identifier: Apache-2.0

//! What the virtqueue request targets (`blk_request`, `rng_request`,
//! `balloon_request`) share: the input reader, the ring layout at the start
//! of a region, sets of guest ranges, a counting interrupt and copies of
//! guest memory. Each target includes it with `#[path]`; not every target
//! uses every item.

use std::sync::atomic::{AtomicUsize, Ordering};

use ember_virtio::{InterruptKind, VirtioInterrupt};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Descriptor table, from the start of a queue's area.
pub const DESC: u64 = 0x0;
/// Available ring, from the start of a queue's area.
pub const AVAIL: u64 = 0x1000;
/// Used ring, from the start of a queue's area.
pub const USED: u64 = 0x1400;
/// First byte after the rings: where a target's data area starts.
pub const DATA1: u64 = 0x2000;

/// VRING_DESC_F_INDIRECT.
pub const VRING_DESC_F_INDIRECT: u16 = 4;

/// Reads a target's input format; missing bytes are zeroes.
pub struct Reader<'a>(pub &'a [u8]);

impl Reader<'_> {
    pub fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let n = N.min(self.0.len());
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        out
    }
    pub fn u8(&mut self) -> u8 {
        self.bytes::<1>()[0]
    }
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.bytes())
    }
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.bytes())
    }
}

/// Half-open guest address ranges.
#[derive(Default)]
pub struct Ranges(pub Vec<(u64, u64)>);

impl Ranges {
    /// Adds `len` bytes at `addr`; an empty range adds nothing.
    pub fn add(&mut self, addr: u64, len: u64) {
        if len > 0 {
            self.0.push((addr, addr.saturating_add(len)));
        }
    }

    /// Whether a range holds `addr`.
    pub fn contains(&self, addr: u64) -> bool {
        self.0.iter().any(|&(a, b)| addr >= a && addr < b)
    }

    /// Whether a range of `self` overlaps one of `other` (both sorted in
    /// place, then merged in one pass).
    pub fn meets(&mut self, other: &mut Ranges) -> bool {
        self.0.sort_unstable();
        other.0.sort_unstable();
        let (a, b) = (&self.0, &other.0);
        let (mut i, mut j) = (0, 0);
        while i < a.len() && j < b.len() {
            if a[i].0 < b[j].1 && b[j].0 < a[i].1 {
                return true;
            }
            if a[i].1 <= b[j].1 {
                i += 1;
            } else {
                j += 1;
            }
        }
        false
    }
}

/// Counts used-buffer interrupts; a configuration interrupt fails the
/// input (none of these devices changes its configuration on a request).
#[derive(Default)]
pub struct CountingInterrupt(pub AtomicUsize);

impl VirtioInterrupt for CountingInterrupt {
    fn trigger(&self, kind: InterruptKind) -> std::io::Result<()> {
        assert_eq!(kind, InterruptKind::Vring, "configuration interrupt");
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// A ready queue of `size` entries whose rings are at `base` + [`DESC`],
/// [`AVAIL`] and [`USED`].
pub fn make_queue(size: u16, base: u64) -> Queue {
    let mut q = Queue::new(size).expect("queue size");
    q.set_desc_table_address(Some((base + DESC) as u32), Some(0));
    q.set_avail_ring_address(Some((base + AVAIL) as u32), Some(0));
    q.set_used_ring_address(Some((base + USED) as u32), Some(0));
    q.set_ready(true);
    q
}

/// A copy of each of `regions` (base, length) of guest memory.
pub fn snapshot(mem: &GuestMemoryMmap, regions: &[(u64, u64)]) -> Vec<Vec<u8>> {
    regions
        .iter()
        .map(|&(base, len)| {
            let mut buf = vec![0u8; len as usize];
            mem.read_slice(&mut buf, GuestAddress(base)).unwrap();
            buf
        })
        .collect()
}

/// Checks that guest memory (two [`snapshot`]s of `regions`) changed only
/// inside `allowed`.
pub fn unchanged_outside(
    regions: &[(u64, u64)],
    before: &[Vec<u8>],
    after: &[Vec<u8>],
    allowed: &Ranges,
) {
    for (r, &(base, _)) in regions.iter().enumerate() {
        if before[r] == after[r] {
            continue;
        }
        for (i, (a, b)) in before[r].iter().zip(&after[r]).enumerate() {
            let addr = base + i as u64;
            assert!(
                a == b || allowed.contains(addr),
                "guest memory at {addr:#x} changed from {a:#x} to {b:#x}"
            );
        }
    }
}
