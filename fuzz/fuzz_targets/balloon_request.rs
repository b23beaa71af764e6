// SPDX-License-Identifier: Apache-2.0

//! Fuzzes the balloon's guest input: `parse_pfns` (inflate and deflate
//! chains), `parse_stats`, `parse_ranges` (free page reports) and
//! `HintChain::parse` on every descriptor chain of an arbitrary split
//! virtqueue, then a whole `ember_virtio_balloon::Balloon` serving that
//! queue through `process_queue`, the call the VMM makes on a notification.
//!
//! Guest memory has two regions with a hole between them; the rings are
//! laid out as in the rng_request target (descriptor table at 0, available
//! ring at 0x1000, used ring at 0x1400).
//!
//! Checked: no panic and no hang; every PFN a parser accepts names a page
//! of guest memory, at most 256 per chain; every accepted range is whole
//! 4 KiB pages inside one region; at most 256 statistics per chain; and,
//! when the pages released overlap no ring, table or buffer the device
//! reads, guest memory changes only in the used ring and in the pages the
//! parsers named (which then read zero), so that no list, however hostile,
//! makes the device release anything else.
//!
//! Input format (little-endian; missing bytes read as 0):
//! - `cfg: u8`: bits 0-3 log2 of the queue size (at most 8), bits 4-6 the
//!   queue (0 inflate, 1 deflate, 2 statistics, 3 free page reporting, 4
//!   free page hinting, others inflate), bit 7 read `avail_idx` instead of
//!   using the number of heads;
//! - `avail_idx: u16` (only with cfg bit 7);
//! - `ndesc: u8` (at most the queue size), then `ndesc` descriptors of 13
//!   bytes: `sel: u8`, `addr: u32`, `len: u32`, `flags: u16`, `next: u16`;
//!   `sel & 3` places the buffer: 0 in the first data area (`DATA1 + addr %
//!   DATA1_LEN`), 1 in the second region (`REGION2 + addr % REGION2_LEN`),
//!   2 at `addr`, 3 at `addr << 12`; `sel & 4` takes `len` modulo 0x2000;
//! - `navail: u8`, then `navail` heads (`u16`);
//! - the rest: contents of the first data area (PFN lists, statistics,
//!   command ids and indirect tables live there).

#![no_main]

use std::sync::{Arc, Mutex};

use ember_virtio::{ActiveQueue, VirtioDevice};
use ember_virtio_balloon::{
    parse_pfns, parse_ranges, parse_stats, Balloon, BalloonConfig, HintChain, StartHintingCmd,
    MAX_PFNS_PER_CHAIN, MAX_STATS_TAGS,
};
use ember_virtio_mmio::test_utils::MockInterrupt;
use libfuzzer_sys::fuzz_target;
use virtio_queue::QueueOwnedT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

#[path = "common/virtq.rs"]
#[allow(dead_code)]
mod virtq;
use virtq::{
    make_queue, snapshot, Ranges, Reader, AVAIL, DATA1, DESC, USED, VRING_DESC_F_INDIRECT,
};

const REGION1_LEN: u64 = 0x1_0000;
const DATA1_LEN: u64 = REGION1_LEN - DATA1;
const REGION2: u64 = 0x2_0000;
const REGION2_LEN: u64 = 0x2_0000;
const REGIONS: [(u64, u64); 2] = [(0, REGION1_LEN), (REGION2, REGION2_LEN)];
/// Rings of the queues the input does not drive: empty, in a corner of
/// the second region.
const IDLE: u64 = REGION2 + REGION2_LEN - 0x4000;

const PAGE: u64 = 4096;

/// Whether `[addr, addr + len)` is whole pages inside one region.
fn guest_pages(addr: u64, len: u64) -> bool {
    len > 0
        && addr % PAGE == 0
        && len % PAGE == 0
        && REGIONS.iter().any(|&(base, size)| {
            addr >= base && addr.checked_add(len).is_some_and(|e| e <= base + size)
        })
}

/// Guest memory, mapped once and cleared for every input.
static MEM: Mutex<Option<GuestMemoryMmap>> = Mutex::new(None);

fuzz_target!(|data: &[u8]| {
    let mut guard = MEM.lock().unwrap_or_else(|e| e.into_inner());
    let mem = guard.get_or_insert_with(|| {
        let ranges: Vec<(GuestAddress, usize)> = REGIONS
            .iter()
            .map(|&(base, len)| (GuestAddress(base), len as usize))
            .collect();
        GuestMemoryMmap::<()>::from_ranges(&ranges).expect("guest memory")
    });
    // Non-zero everywhere, so that a released page shows.
    static FILL: [u8; REGION2_LEN as usize] = [0x11; REGION2_LEN as usize];
    for &(base, len) in &REGIONS {
        mem.write_slice(&FILL[..len as usize], GuestAddress(base))
            .unwrap();
    }
    // The idle queues' rings: nothing published.
    mem.write_slice(&[0u8; 0x4000], GuestAddress(IDLE)).unwrap();
    let mem = &*mem;

    let mut input = Reader(data);
    let cfg = input.u8();
    let size = 1u16 << (cfg & 0xf).min(8);
    let kind = (cfg >> 4) & 7;
    let avail_override = (cfg & 0x80 != 0).then(|| input.u16());

    let ndesc = u64::from(input.u8()).min(u64::from(size));
    for i in 0..u64::from(size) {
        let at = DESC + 16 * i;
        mem.write_slice(&[0u8; 16], GuestAddress(at)).unwrap();
        if i >= ndesc {
            continue;
        }
        let sel = input.u8();
        let addr = input.u32();
        let mut len = input.u32();
        let flags = input.u16();
        let next = input.u16();
        let addr = match sel & 3 {
            0 => DATA1 + u64::from(addr) % DATA1_LEN,
            1 => REGION2 + u64::from(addr) % REGION2_LEN,
            2 => u64::from(addr),
            _ => u64::from(addr) << 12,
        };
        if sel & 4 != 0 {
            len %= 0x2000;
        }
        mem.write_obj(addr.to_le(), GuestAddress(at)).unwrap();
        mem.write_obj(len.to_le(), GuestAddress(at + 8)).unwrap();
        mem.write_obj(flags.to_le(), GuestAddress(at + 12)).unwrap();
        mem.write_obj(next.to_le(), GuestAddress(at + 14)).unwrap();
    }
    mem.write_slice(&[0u8; 0x1000], GuestAddress(AVAIL))
        .unwrap();
    mem.write_slice(&[0u8; 0xc00], GuestAddress(USED)).unwrap();
    let navail = input.u8();
    for i in 0..u64::from(navail) {
        let head = input.u16();
        let slot = AVAIL + 4 + 2 * (i % u64::from(size));
        mem.write_obj(head.to_le(), GuestAddress(slot)).unwrap();
    }
    let avail_idx = avail_override.unwrap_or(u16::from(navail));
    mem.write_obj(avail_idx.to_le(), GuestAddress(AVAIL + 2))
        .unwrap();
    let rest = &input.0[..input.0.len().min(DATA1_LEN as usize)];
    mem.write_slice(rest, GuestAddress(DATA1)).unwrap();

    // What the device reads: rings and indirect tables.
    let mut reads = Ranges::default();
    reads.add(DESC, 16 * u64::from(size));
    reads.add(AVAIL, 6 + 2 * u64::from(size));
    reads.add(USED, 6 + 8 * u64::from(size));
    reads.add(IDLE, 0x4000);
    for i in 0..size {
        let addr = DESC + 16 * u64::from(i);
        let table: u64 = mem.read_obj(GuestAddress(addr)).unwrap();
        let len: u32 = mem.read_obj(GuestAddress(addr + 8)).unwrap();
        let flags: u16 = mem.read_obj(GuestAddress(addr + 12)).unwrap();
        if flags & VRING_DESC_F_INDIRECT != 0 {
            reads.add(table, u64::from(len));
        }
    }

    // Every published chain through the parser of its queue; what may be
    // released.
    let mut released = Ranges::default();
    let mut pfns = Vec::new();
    let mut ranges = Vec::new();
    let mut pre = make_queue(size, 0);
    if let Ok(iter) = pre.iter(mem) {
        for chain in iter {
            // The buffers are read too: a list may name its own page, and
            // a later chain then reads zeroes there.
            for d in chain.clone() {
                reads.add(d.addr().0, u64::from(d.len()));
            }
            match kind {
                2 => {
                    if let Ok(stats) = parse_stats(chain, mem) {
                        assert!(stats.len() <= MAX_STATS_TAGS);
                    }
                }
                3 => {
                    if parse_ranges(chain, mem, &mut ranges).is_ok() {
                        for &(a, l) in &ranges {
                            assert!(guest_pages(a.0, l), "range {:#x}+{l:#x}", a.0);
                            released.add(a.0, l);
                        }
                    } else {
                        assert!(ranges.is_empty());
                    }
                }
                4 => {
                    if let Ok(hint) = HintChain::parse(chain, mem) {
                        for &(a, l) in &hint.ranges {
                            assert!(guest_pages(a.0, l), "hint {:#x}+{l:#x}", a.0);
                            released.add(a.0, l);
                        }
                    }
                }
                k => {
                    if parse_pfns(chain, mem, &mut pfns).is_ok() {
                        assert!(pfns.len() <= MAX_PFNS_PER_CHAIN);
                        for &pfn in &pfns {
                            let addr = u64::from(pfn) * PAGE;
                            assert!(guest_pages(addr, PAGE), "pfn {pfn:#x}");
                            if k != 1 {
                                released.add(addr, PAGE);
                            }
                        }
                    } else {
                        assert!(pfns.is_empty());
                    }
                }
            }
        }
    }
    let predictable = !released.meets(&mut reads);
    let before = snapshot(mem, &REGIONS);

    // The device, with the queue the input drives.
    let config = BalloonConfig {
        amount_mib: 0,
        deflate_on_oom: true,
        stats_polling_interval_s: u16::from(kind == 2),
        free_page_hinting: kind == 4,
        free_page_reporting: kind == 3,
    };
    let mut balloon = Balloon::new(&config).expect("balloon");
    balloon.ack_features(balloon.features());
    let index = match kind {
        2..=4 => 2,
        1 => 1,
        _ => 0,
    };
    let queues = (0..balloon.queue_max_sizes().len())
        .map(|i| ActiveQueue {
            index: i as u16,
            queue: if i == index {
                make_queue(size, 0)
            } else {
                make_queue(size.min(64), IDLE)
            },
            notify: EventFd::new(EFD_NONBLOCK).expect("eventfd"),
        })
        .collect();
    balloon
        .activate(mem.clone(), queues, Arc::new(MockInterrupt::default()))
        .expect("activate");
    if kind == 4 {
        // Command ids 2 and up start runs: hinted pages of run 2 are
        // released.
        balloon
            .start_hinting(StartHintingCmd::default())
            .expect("hinting");
    }
    let _ = balloon.process_queue(index);
    if kind == 2 {
        let _ = balloon.request_stats();
        let _ = balloon.latest_stats();
    }
    assert!(balloon.reset(), "reset");

    if !predictable {
        return;
    }
    let after = snapshot(mem, &REGIONS);
    let used = Ranges(vec![(USED, USED + 6 + 8 * u64::from(size))]);
    for (r, &(base, _)) in REGIONS.iter().enumerate() {
        if before[r] == after[r] {
            continue;
        }
        for (i, (a, b)) in before[r].iter().zip(&after[r]).enumerate() {
            let addr = base + i as u64;
            if a == b || used.contains(addr) {
                continue;
            }
            assert!(
                released.contains(addr) && *b == 0,
                "guest memory at {addr:#x} changed from {a:#x} to {b:#x}"
            );
        }
    }
});
