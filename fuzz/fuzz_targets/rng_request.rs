// SPDX-License-Identifier: Apache-2.0

//! Fuzzes virtio-rng request handling: `ember_virtio_rng::Request::parse` on
//! every descriptor chain of an arbitrary split virtqueue, and a whole
//! `ember_virtio_rng::Entropy` device serving that queue through
//! `process_queue`, the call the VMM makes on a notification, with or
//! without a rate limiter that admits one request.
//!
//! Guest memory has two regions with a hole between them; the rings are
//! laid out as in the blk_request target (descriptor table at 0, available
//! ring at 0x1000, used ring at 0x1400).
//!
//! Parsing is checked against a model written from virtio 1.2 §5.4.6 over
//! the descriptors virtio-queue yields: a chain is refused at its first
//! descriptor that is device-readable (ReadOnly) or not entirely guest
//! memory (OutsideMemory), naming its position; otherwise it is accepted
//! with its non-empty buffers, in order, cut at 64 KiB.
//!
//! The device is checked for: no panic and no hang (descriptor loops
//! included); a published count larger than the queue makes it fail
//! without touching memory; at most one interrupt. When the random bytes
//! it writes overlap nothing it reads (rings, indirect tables), its
//! behaviour is fully predictable, and then: no used length over 64 KiB,
//! the used ring holds the model's heads and lengths (up to the request the
//! limiter refuses), guest memory outside the served buffers and the used
//! ring is unchanged, and the counters agree.
//!
//! Input format (little-endian; missing bytes read as 0):
//! - `cfg: u8`: bits 0-3 log2 of the queue size (at most 8), bit 4 a rate
//!   limiter that admits one request, bit 5 read `avail_idx` instead of
//!   using the number of heads;
//! - `avail_idx: u16` (only with cfg bit 5);
//! - `ndesc: u8` (at most N), then `ndesc` descriptors of 13 bytes: `sel:
//!   u8`, `addr: u32`, `len: u32`, `flags: u16`, `next: u16`. `sel & 3`
//!   places the buffer: 0 in the first data area (`DATA1 + addr %
//!   DATA1_LEN`), 1 in the second region (`REGION2 + addr % REGION2_LEN`), 2
//!   at `addr`, 3 at `addr << 16`; `sel & 4` takes `len` modulo 0x1000;
//! - `navail: u8`, then `navail` heads (`u16`);
//! - the rest: contents of the first data area (indirect tables live
//!   there).

#![no_main]

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use ember_virtio::{ActiveQueue, VirtioDevice};
use ember_virtio_rng::{
    BucketSpec, ChainError, Entropy, EntropyConfig, RateLimiterConfig, Request, MAX_REQUEST_BYTES,
};
use libfuzzer_sys::fuzz_target;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::QueueOwnedT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

#[path = "common/virtq.rs"]
#[allow(dead_code)]
mod virtq;
use virtq::{
    make_queue, snapshot, unchanged_outside, CountingInterrupt, Ranges, Reader, AVAIL, DATA1, DESC,
    USED, VRING_DESC_F_INDIRECT,
};

const REGION1_LEN: u64 = 0x1_0000;
const DATA1_LEN: u64 = REGION1_LEN - DATA1;
const REGION2: u64 = 0x2_0000;
const REGION2_LEN: u64 = 0x2_0000;
const REGIONS: [(u64, u64); 2] = [(0, REGION1_LEN), (REGION2, REGION2_LEN)];

const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Whether `len` bytes at `addr` are guest memory (an empty range always
/// is, as in vm-memory).
fn inside(addr: u64, len: u64) -> bool {
    if len == 0 {
        return true;
    }
    let Some(end) = addr.checked_add(len) else {
        return false;
    };
    REGIONS
        .iter()
        .any(|&(base, size)| addr >= base && end <= base + size)
}

/// The model's reading of one chain.
fn model(descs: &[Descriptor]) -> Result<(Vec<(u64, u32)>, u32), ChainError> {
    let mut segments = Vec::new();
    let mut len = 0u32;
    for (position, d) in descs.iter().enumerate() {
        let (addr, dlen) = (d.addr().0, d.len());
        if !d.is_write_only() {
            return Err(ChainError::ReadOnly {
                position,
                addr,
                len: dlen,
            });
        }
        if !inside(addr, u64::from(dlen)) {
            return Err(ChainError::OutsideMemory {
                position,
                addr,
                len: dlen,
            });
        }
        let take = dlen.min(MAX_REQUEST_BYTES - len);
        if take > 0 {
            segments.push((addr, take));
            len += take;
        }
    }
    Ok((segments, len))
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
    static ZEROES: [u8; REGION2_LEN as usize] = [0; REGION2_LEN as usize];
    for &(base, len) in &REGIONS {
        mem.write_slice(&ZEROES[..len as usize], GuestAddress(base))
            .unwrap();
    }
    let mem = &*mem;

    let mut input = Reader(data);
    let cfg = input.u8();
    let size = 1u16 << (cfg & 0xf).min(8);
    let limited = cfg & 0x10 != 0;
    let avail_override = (cfg & 0x20 != 0).then(|| input.u16());

    let ndesc = u64::from(input.u8()).min(u64::from(size));
    for i in 0..ndesc {
        let sel = input.u8();
        let addr = input.u32();
        let mut len = input.u32();
        let flags = input.u16();
        let next = input.u16();
        let addr = match sel & 3 {
            0 => DATA1 + u64::from(addr) % DATA1_LEN,
            1 => REGION2 + u64::from(addr) % REGION2_LEN,
            2 => u64::from(addr),
            _ => u64::from(addr) << 16,
        };
        if sel & 4 != 0 {
            len %= 0x1000;
        }
        let at = DESC + 16 * i;
        mem.write_obj(addr.to_le(), GuestAddress(at)).unwrap();
        mem.write_obj(len.to_le(), GuestAddress(at + 8)).unwrap();
        mem.write_obj(flags.to_le(), GuestAddress(at + 12)).unwrap();
        mem.write_obj(next.to_le(), GuestAddress(at + 14)).unwrap();
    }
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
    // The harness reads the used ring back.
    reads.add(USED, 6 + 8 * u64::from(size));
    for i in 0..size {
        let addr = DESC + 16 * u64::from(i);
        let table: u64 = mem.read_obj(GuestAddress(addr)).unwrap();
        let len: u32 = mem.read_obj(GuestAddress(addr + 8)).unwrap();
        let flags: u16 = mem.read_obj(GuestAddress(addr + 12)).unwrap();
        if flags & VRING_DESC_F_INDIRECT != 0 {
            reads.add(table, u64::from(len));
        }
    }

    // Every published chain, parsed and checked against the model, and what
    // the device should do with it, in order.
    let mut writes = Ranges::default();
    writes.add(USED, 6 + 8 * u64::from(size));
    let mut expected_used: Vec<(u32, u32)> = Vec::new();
    let (mut fails, mut bytes, mut served) = (0u64, 0u64, 0usize);
    let mut admitted = 0u32;
    let mut refused = false;
    let mut pre = make_queue(size, 0);
    let chains: Option<Vec<()>> = pre.iter(mem).ok().map(|iter| {
        iter.map(|chain| {
            let head = chain.head_index();
            let descs: Vec<Descriptor> = chain.clone().collect();
            let parsed = Request::parse(chain, mem);
            let want = model(&descs);
            match (&parsed, &want) {
                (Ok(r), Ok((segments, len))) => {
                    let got: Vec<(u64, u32)> =
                        r.segments().iter().map(|&(a, l)| (a.0, l)).collect();
                    assert_eq!(&got, segments, "segments");
                    assert_eq!(r.len(), *len, "length");
                    assert!(r.len() <= MAX_REQUEST_BYTES);
                }
                (Err(e), Err(w)) => assert_eq!(e, w, "refusal"),
                (got, want) => panic!("parse {got:?}, model {want:?}"),
            }
            if refused {
                return;
            }
            let used_len = match want {
                Err(_) => {
                    fails += 1;
                    0
                }
                Ok((segments, len)) => {
                    if limited && admitted == 1 {
                        refused = true;
                        return;
                    }
                    admitted += 1;
                    for (addr, l) in segments {
                        writes.add(addr, u64::from(l));
                    }
                    bytes += u64::from(len);
                    len
                }
            };
            served += 1;
            if head < size {
                expected_used.push((u32::from(head), used_len));
            } else {
                // The used ring refuses a head past the queue.
                fails += 1;
            }
        })
        .collect()
    });
    assert_eq!(chains.is_none(), avail_idx > size, "published count check");
    let predictable = !reads.meets(&mut writes);
    let before = snapshot(mem, &REGIONS);

    // Run the device.
    let rate_limiter = if limited {
        RateLimiterConfig {
            bandwidth: None,
            // One request, then a wait far longer than any run.
            ops: Some(BucketSpec {
                size: 1,
                one_time_burst: 0,
                refill_time_ms: 1_000_000,
            }),
        }
    } else {
        RateLimiterConfig::default()
    };
    let mut rng = Entropy::new(&EntropyConfig { rate_limiter }).expect("entropy device");
    rng.ack_features(VIRTIO_F_VERSION_1);
    let irq = Arc::new(CountingInterrupt::default());
    let queue = ActiveQueue {
        index: 0,
        queue: make_queue(size, 0),
        notify: EventFd::new(EFD_NONBLOCK).expect("eventfd"),
    };
    rng.activate(mem.clone(), vec![queue], irq.clone())
        .expect("activate");
    let result = rng.process_queue();
    let metrics = rng.metrics().clone();
    assert!(rng.reset(), "reset");

    let interrupts = irq.0.load(Ordering::SeqCst);
    assert!(interrupts <= 1, "{interrupts} interrupts");
    let used_idx: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap();
    if chains.is_none() {
        // More entries published than the ring holds: nothing is popped.
        assert!(result.is_err(), "avail idx {avail_idx} > {size} accepted");
        assert_eq!(used_idx, 0);
        assert_eq!(interrupts, 0);
        // Only the used ring's flags may change (notifications off).
        let used = Ranges(vec![(USED, USED + 6 + 8 * u64::from(size))]);
        unchanged_outside(&REGIONS, &before, &snapshot(mem, &REGIONS), &used);
        return;
    }
    if !predictable {
        return;
    }
    // Random bytes written over the used ring (a buffer there) would make
    // its lengths random too: checked only when no buffer overlaps it.
    for i in 0..used_idx.min(size) {
        let len: u32 = mem
            .read_obj(GuestAddress(USED + 4 + 8 * u64::from(i) + 4))
            .unwrap();
        assert!(len <= MAX_REQUEST_BYTES, "used length {len}");
    }
    assert!(result.is_ok(), "process_queue: {result:?}");
    let used: Vec<(u32, u32)> = (0..used_idx)
        .map(|i| {
            let elem = USED + 4 + 8 * (u64::from(i) % u64::from(size));
            (
                mem.read_obj(GuestAddress(elem)).unwrap(),
                mem.read_obj(GuestAddress(elem + 4)).unwrap(),
            )
        })
        .collect();
    assert_eq!(used, expected_used, "used ring (id, len)");
    assert_eq!(
        metrics.entropy_event_count.count(),
        served as u64 + u64::from(refused),
        "requests counted"
    );
    assert_eq!(
        metrics.entropy_event_fails.count(),
        fails,
        "failures counted"
    );
    assert_eq!(metrics.entropy_bytes.count(), bytes, "bytes counted");
    assert_eq!(
        metrics.entropy_rate_limiter_throttled.count(),
        u64::from(refused)
    );
    // Nothing written outside the served buffers and the used ring.
    unchanged_outside(&REGIONS, &before, &snapshot(mem, &REGIONS), &writes);
});
