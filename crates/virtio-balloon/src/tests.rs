// SPDX-License-Identifier: Apache-2.0

//! Device tests against real guest memory and virtio-queue's
//! MockSplitQueue.

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::FromRawFd;
use std::sync::Arc;

use ember_virtio::{ActivateError, ActiveQueue, Persist, VirtioDevice};
use ember_virtio_mmio::test_utils::MockInterrupt;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::mmap::MmapRegion;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::{
    release, Balloon, BalloonConfig, BalloonState, BalloonStateError, ChainError, Error,
    StartHintingCmd, HINT_CMD_DONE, HINT_CMD_STOP, MAX_PFNS_PER_CHAIN,
};

/// Low region: 0 to 4 MiB; a gap; high region: 8 to 10 MiB.
const LOW: u64 = 0x40_0000;
const HIGH: u64 = 0x80_0000;
const HIGH_LEN: u64 = 0x20_0000;
/// Where tests put PFN lists and statistics.
const LIST: u64 = 0x8_0000;
/// Pages tests give back.
const DATA: u64 = 0x10_0000;

const R: u16 = 0;
const W: u16 = VRING_DESC_F_WRITE as u16;

fn new_memory() -> &'static GuestMemoryMmap {
    Box::leak(Box::new(
        GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), LOW as usize),
            (GuestAddress(HIGH), HIGH_LEN as usize),
        ])
        .unwrap(),
    ))
}

struct Harness {
    mem: &'static GuestMemoryMmap,
    vqs: Vec<MockSplitQueue<'static, GuestMemoryMmap>>,
    dev: Balloon,
    interrupt: Arc<MockInterrupt>,
    next_desc: Vec<u16>,
    next_used: Vec<u16>,
}

impl Harness {
    fn new(config: BalloonConfig) -> Self {
        let mut h = Harness::inactive(config, new_memory());
        h.activate();
        h
    }

    fn inactive(config: BalloonConfig, mem: &'static GuestMemoryMmap) -> Self {
        let dev = Balloon::new(&config).unwrap();
        let n = dev.queue_max_sizes().len();
        Harness {
            mem,
            vqs: (0..n)
                .map(|i| MockSplitQueue::create(mem, GuestAddress(i as u64 * 0x4000), 256))
                .collect(),
            dev,
            interrupt: Arc::new(MockInterrupt::default()),
            next_desc: vec![0; n],
            next_used: vec![0; n],
        }
    }

    fn activate(&mut self) {
        let features = self.dev.features();
        self.dev.ack_features(features);
        let queues = self
            .vqs
            .iter()
            .enumerate()
            .map(|(i, vq)| ActiveQueue {
                index: i as u16,
                queue: vq.create_queue::<Queue>().unwrap(),
                notify: EventFd::new(EFD_NONBLOCK).unwrap(),
            })
            .collect();
        self.dev
            .activate(self.mem.clone(), queues, self.interrupt.clone())
            .unwrap();
    }

    /// Adds a chain of `(addr, len, flags)` descriptors to queue `q`;
    /// returns its head.
    fn add_chain(&mut self, q: usize, descs: &[(u64, u32, u16)]) -> u16 {
        let n = descs.len() as u16;
        if self.next_desc[q] + n > 256 {
            self.next_desc[q] = 0;
        }
        let first = self.next_desc[q];
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, flags))| {
                let i = i as u16;
                let (flags, next) = if i + 1 < n {
                    (flags | VRING_DESC_F_NEXT as u16, first + i + 1)
                } else {
                    (flags, 0)
                };
                RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
            })
            .collect();
        self.vqs[q].add_desc_chains(&raw, first).unwrap();
        self.next_desc[q] += n;
        first
    }

    /// Writes `pfns` at `at` and posts them as one chain on queue `q`.
    fn post_pfns(&mut self, q: usize, at: u64, pfns: &[u32]) -> u16 {
        let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
        self.mem.write_slice(&bytes, GuestAddress(at)).unwrap();
        self.add_chain(q, &[(at, bytes.len() as u32, R)])
    }

    fn take_used(&mut self, q: usize) -> Vec<(u16, u32)> {
        let mut out = Vec::new();
        while self.next_used[q] != self.vqs[q].used().idx().load() {
            let elem = self.vqs[q]
                .used()
                .ring()
                .ref_at(usize::from(self.next_used[q] % 256))
                .unwrap()
                .load();
            out.push((elem.id() as u16, elem.len()));
            self.next_used[q] = self.next_used[q].wrapping_add(1);
        }
        out
    }

    fn fill(&self, addr: u64, len: usize, byte: u8) {
        self.mem
            .write_slice(&vec![byte; len], GuestAddress(addr))
            .unwrap();
    }

    fn byte(&self, addr: u64) -> u8 {
        self.mem.read_obj(GuestAddress(addr)).unwrap()
    }
}

fn pfn(addr: u64) -> u32 {
    (addr >> 12) as u32
}

fn stats_config() -> BalloonConfig {
    BalloonConfig {
        amount_mib: 2,
        stats_polling_interval_s: 1,
        ..Default::default()
    }
}

#[test]
fn features_queues_and_config_follow_the_configuration() {
    let b = Balloon::new(&BalloonConfig::default()).unwrap();
    assert_eq!(b.device_type(), 5);
    assert_eq!(b.queue_max_sizes(), [256, 256]);
    assert_eq!(b.features(), 1 << 32);
    assert_eq!(b.config_size(), 12);
    let b = Balloon::new(&BalloonConfig {
        amount_mib: 64,
        deflate_on_oom: true,
        stats_polling_interval_s: 5,
        free_page_hinting: true,
        free_page_reporting: true,
    })
    .unwrap();
    assert_eq!(b.queue_max_sizes().len(), 5);
    assert_eq!(
        b.features(),
        (1 << 32) | (1 << 1) | (1 << 2) | (1 << 3) | (1 << 5)
    );
    let mut space = [0u8; 12];
    b.read_config(0, &mut space);
    // num_pages = 64 MiB in 4 KiB pages, actual 0, hint command STOP.
    assert_eq!(space, [0, 0x40, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(b.config().amount_mib, 64);
    // Reporting alone sits right after the deflate queue.
    let b = Balloon::new(&BalloonConfig {
        free_page_reporting: true,
        ..Default::default()
    })
    .unwrap();
    assert_eq!(b.report_idx, Some(2));
    assert!(matches!(
        Balloon::new(&BalloonConfig {
            amount_mib: u32::MAX / 256 + 1,
            ..Default::default()
        }),
        Err(Error::TooMuchMemoryRequested(_))
    ));
}

#[test]
fn inflate_releases_exactly_the_listed_pages() {
    let mut h = Harness::new(BalloonConfig::default());
    h.fill(DATA - 0x1000, 0x11_000, 0xaa);
    h.fill(HIGH, 0x2000, 0xbb);
    // Pages 0, 1, 3 of DATA (unsorted, one repeated) and the first page of
    // the high region.
    let head = h.post_pfns(
        0,
        LIST,
        &[
            pfn(DATA + 0x3000),
            pfn(DATA),
            pfn(HIGH),
            pfn(DATA + 0x1000),
            pfn(DATA),
        ],
    );
    h.dev.process_inflate_queue().unwrap();
    assert_eq!(h.take_used(0), [(head, 0)]);
    for released in [DATA, DATA + 0x1fff, DATA + 0x3000, DATA + 0x3fff, HIGH] {
        assert_eq!(h.byte(released), 0, "{released:#x}");
    }
    for kept in [DATA + 0x2000, DATA + 0x4000, DATA - 1] {
        assert_eq!(h.byte(kept), 0xaa, "{kept:#x}");
    }
    assert_eq!(h.byte(HIGH + 0x1000), 0xbb);
    assert_eq!(h.interrupt.vring_count(), 1);
    assert_eq!(h.dev.metrics().event_fails.count(), 0);
}

#[test]
fn inflate_batches_span_many_chains_and_every_chain_comes_back() {
    let mut h = Harness::new(BalloonConfig::default());
    h.fill(DATA, 0x40_000, 0xaa);
    // More chains than one batch holds: 48 lists of 256 PFNs over the 64
    // pages at DATA, and a bad list in the middle.
    let chains = crate::INFLATE_BATCH_PFNS / MAX_PFNS_PER_CHAIN + 16;
    let mut heads = Vec::new();
    for c in 0..chains {
        if c == chains / 2 {
            heads.push(h.post_pfns(0, LIST + 0x400 * c as u64, &[pfn(LOW)]));
            continue;
        }
        let pfns: Vec<u32> = (0..256u64)
            .map(|i| pfn(DATA + ((c as u64 * 256 + i) % 64) * 0x1000))
            .collect();
        heads.push(h.post_pfns(0, LIST + 0x400 * c as u64, &pfns));
    }
    h.dev.process_inflate_queue().unwrap();
    let used: Vec<u16> = h.take_used(0).into_iter().map(|(head, _)| head).collect();
    assert_eq!(used, heads);
    assert_eq!(h.byte(DATA), 0);
    assert_eq!(h.byte(DATA + 0x3_ffff), 0);
    assert_eq!(h.dev.metrics().event_fails.count(), 1);
    assert_eq!(h.interrupt.vring_count(), 1);
}

#[test]
fn hostile_pfn_lists_release_nothing() {
    let mut h = Harness::new(BalloonConfig::default());
    h.fill(DATA, 0x2000, 0xaa);
    let good = pfn(DATA);
    // A page in the gap between the regions, past the end, the largest
    // PFN: the whole chain is refused, the good PFN beside them too.
    for bad in [pfn(LOW), pfn(HIGH + HIGH_LEN), u32::MAX] {
        h.post_pfns(0, LIST, &[good, bad]);
    }
    // Device-writable, a length that is not whole PFNs, too many PFNs,
    // a list outside guest memory.
    h.mem.write_obj(good, GuestAddress(LIST + 0x1000)).unwrap();
    h.add_chain(0, &[(LIST + 0x1000, 4, W)]);
    h.add_chain(0, &[(LIST + 0x1000, 6, R)]);
    let many = vec![good; MAX_PFNS_PER_CHAIN + 1];
    h.post_pfns(0, LIST + 0x2000, &many);
    h.add_chain(0, &[(LOW - 2, 4, R)]);
    h.dev.process_inflate_queue().unwrap();
    assert_eq!(h.take_used(0).len(), 7);
    assert_eq!(h.byte(DATA), 0xaa);
    assert_eq!(h.dev.metrics().event_fails.count(), 7);
}

#[test]
fn parse_errors_name_the_fault() {
    let mut h = Harness::new(BalloonConfig::default());
    h.post_pfns(0, LIST, &[pfn(LOW)]);
    h.add_chain(0, &[(LIST, 6, R)]);
    let mem = h.mem;
    let mut q: Queue = h.vqs[0].create_queue().unwrap();
    let mut pfns = Vec::new();
    use virtio_queue::QueueOwnedT;
    let mut iter = q.iter(mem).unwrap();
    let e = crate::parse_pfns(iter.next().unwrap(), mem, &mut pfns).unwrap_err();
    assert_eq!(e, ChainError::PfnOutsideMemory { pfn: pfn(LOW) });
    assert!(pfns.is_empty());
    let e = crate::parse_pfns(iter.next().unwrap(), mem, &mut pfns).unwrap_err();
    assert!(matches!(e, ChainError::BadLength { len: 6, .. }), "{e}");
}

#[test]
fn deflate_returns_chains_and_releases_nothing() {
    let mut h = Harness::new(BalloonConfig::default());
    h.fill(DATA, 0x1000, 0xaa);
    let head = h.post_pfns(1, LIST, &[pfn(DATA)]);
    h.dev.process_deflate_queue().unwrap();
    assert_eq!(h.take_used(1), [(head, 0)]);
    assert_eq!(h.byte(DATA), 0xaa);
    assert_eq!(h.dev.metrics().deflate_count.count(), 1);
}

fn write_stats(h: &Harness, at: u64, stats: &[(u16, u64)]) -> u32 {
    let bytes: Vec<u8> = stats
        .iter()
        .flat_map(|(t, v)| t.to_le_bytes().into_iter().chain(v.to_le_bytes()))
        .collect();
    h.mem.write_slice(&bytes, GuestAddress(at)).unwrap();
    bytes.len() as u32
}

#[test]
fn statistics_are_held_and_returned_at_each_poll() {
    let mut h = Harness::new(stats_config());
    assert!(matches!(
        Balloon::new(&BalloonConfig::default())
            .unwrap()
            .latest_stats(),
        Err(Error::StatisticsDisabled)
    ));
    let len = write_stats(&h, LIST, &[(4, 1000), (5, 5000), (99, 1)]);
    let head = h.add_chain(2, &[(LIST, len, R)]);
    h.dev.process_stats_queue().unwrap();
    // Held, not returned.
    assert!(h.take_used(2).is_empty());
    let s = h.dev.latest_stats().unwrap();
    assert_eq!((s.free_memory, s.total_memory), (Some(1000), Some(5000)));
    assert_eq!(s.swap_in, None);
    assert_eq!((s.target_pages, s.target_mib, s.actual_pages), (512, 2, 0));
    // The unknown tag is counted.
    assert_eq!(h.dev.metrics().stats_update_fails.count(), 1);
    let json = serde_json::to_value(s).unwrap();
    assert_eq!(json["free_memory"], 1000);
    assert!(json.get("swap_in").is_none());
    // The poll returns it.
    h.dev.request_stats().unwrap();
    assert_eq!(h.take_used(2), [(head, 0)]);
    h.dev.request_stats().unwrap();
    assert!(h.take_used(2).is_empty());
    // A malformed chain is held (the protocol goes on) and changes nothing.
    let head = h.add_chain(2, &[(LIST, 7, R)]);
    h.dev.process_stats_queue().unwrap();
    assert_eq!(h.dev.latest_stats().unwrap().free_memory, Some(1000));
    // A second buffer while one is held returns the first.
    let len = write_stats(&h, LIST, &[(4, 7)]);
    let second = h.add_chain(2, &[(LIST, len, R)]);
    h.dev.process_stats_queue().unwrap();
    assert_eq!(h.take_used(2), [(head, 0)]);
    assert_eq!(h.dev.stats_desc, Some(second));
    assert_eq!(h.dev.latest_stats().unwrap().free_memory, Some(7));
}

#[test]
fn the_statistics_timer_runs_only_while_the_device_does() {
    let mut h = Harness::new(stats_config());
    let armed = |b: &Balloon| {
        let mut spec = std::mem::MaybeUninit::<libc::itimerspec>::uninit();
        // SAFETY: the timer descriptor is the device's; the kernel writes
        // one itimerspec.
        let ret = unsafe { libc::timerfd_gettime(b.stats_timer_fd(), spec.as_mut_ptr()) };
        assert_eq!(ret, 0);
        // SAFETY: initialized by the successful call above.
        let spec = unsafe { spec.assume_init() };
        (
            spec.it_interval.tv_sec,
            spec.it_value.tv_sec > 0 || spec.it_value.tv_nsec > 0,
        )
    };
    h.dev.sync_stats_timer().unwrap();
    assert_eq!(armed(&h.dev), (1, true));
    h.dev.update_stats_polling_interval(3).unwrap();
    assert_eq!(armed(&h.dev).0, 3);
    h.dev.reset();
    h.dev.sync_stats_timer().unwrap();
    assert_eq!(armed(&h.dev), (0, false));
}

#[test]
fn the_polling_interval_changes_but_stats_stay_on_or_off() {
    let mut h = Harness::new(stats_config());
    let len = write_stats(&h, LIST, &[(4, 1)]);
    let head = h.add_chain(2, &[(LIST, len, R)]);
    h.dev.process_stats_queue().unwrap();
    assert!(matches!(
        h.dev.update_stats_polling_interval(0),
        Err(Error::StatisticsStateChange)
    ));
    h.dev.update_stats_polling_interval(3).unwrap();
    assert_eq!(h.dev.config().stats_polling_interval_s, 3);
    // The held buffer went back at once.
    assert_eq!(h.take_used(2), [(head, 0)]);
    let mut off = Balloon::new(&BalloonConfig::default()).unwrap();
    assert!(matches!(
        off.update_stats_polling_interval(1),
        Err(Error::StatisticsStateChange)
    ));
}

#[test]
fn the_target_changes_live_with_a_config_interrupt() {
    let mut b = Balloon::new(&BalloonConfig::default()).unwrap();
    assert!(matches!(b.update_size(1), Err(Error::DeviceNotActive)));
    let mut h = Harness::new(BalloonConfig::default());
    // 6 MiB of guest memory.
    h.dev.update_size(3).unwrap();
    assert_eq!(h.dev.num_pages(), 768);
    assert_eq!(h.interrupt.config_count(), 1);
    assert!(matches!(
        h.dev.update_size(7),
        Err(Error::TooMuchMemoryRequested(7))
    ));
    assert_eq!(h.dev.num_pages(), 768);
    // The driver writes `actual`, and only that.
    h.dev.write_config(4, &300u32.to_le_bytes());
    h.dev.write_config(0, &1u32.to_le_bytes());
    h.dev.write_config(8, &5u32.to_le_bytes());
    h.dev.write_config(u64::MAX, &[1]);
    assert_eq!((h.dev.num_pages(), h.dev.actual_pages()), (768, 300));
    let mut actual = [0u8; 4];
    h.dev.read_config(4, &mut actual);
    assert_eq!(u32::from_le_bytes(actual), 300);
    // Reset: a new driver starts with an empty balloon; the target stays.
    assert!(h.dev.reset());
    assert_eq!((h.dev.num_pages(), h.dev.actual_pages()), (768, 0));
}

#[test]
fn reported_free_ranges_are_released() {
    let mut h = Harness::new(BalloonConfig {
        free_page_reporting: true,
        ..Default::default()
    });
    h.fill(DATA, 0x4000, 0xaa);
    let head = h.add_chain(2, &[(DATA, 0x2000, W), (HIGH, 0x1000, W)]);
    // Not whole pages, across the gap: refused, nothing released.
    h.add_chain(2, &[(DATA + 0x3000, 0x1000, W), (DATA + 0x2800, 0x1000, W)]);
    h.add_chain(2, &[(LOW - 0x1000, 0x2000, W)]);
    h.dev.process_report_queue().unwrap();
    assert_eq!(h.take_used(2).first(), Some(&(head, 0)));
    assert_eq!((h.byte(DATA), h.byte(DATA + 0x1fff)), (0, 0));
    assert_eq!((h.byte(DATA + 0x2000), h.byte(DATA + 0x3000)), (0xaa, 0xaa));
    let m = h.dev.metrics();
    assert_eq!(m.free_page_report_freed.count(), 0x3000);
    assert_eq!(m.free_page_report_count.count(), 2);
    assert_eq!(m.free_page_report_fails.count(), 2);
}

#[test]
fn hinting_runs_release_only_the_current_runs_pages() {
    let mut h = Harness::new(BalloonConfig {
        free_page_hinting: true,
        ..Default::default()
    });
    h.fill(DATA, 0x4000, 0xaa);
    assert!(Balloon::new(&BalloonConfig::default())
        .unwrap()
        .start_hinting(StartHintingCmd::default())
        .is_err());
    // Before a run: the hint is returned untouched.
    h.add_chain(2, &[(DATA, 0x1000, W)]);
    h.dev.process_hint_queue().unwrap();
    assert_eq!(h.byte(DATA), 0xaa);

    h.dev.start_hinting(StartHintingCmd::default()).unwrap();
    let mut id = [0u8; 4];
    h.dev.read_config(8, &mut id);
    assert_eq!(u32::from_le_bytes(id), 2);
    assert_eq!(h.interrupt.config_count(), 1);
    // The driver echoes the id, hints two pages, then stops.
    h.mem.write_obj(2u32, GuestAddress(LIST)).unwrap();
    h.mem
        .write_obj(HINT_CMD_STOP, GuestAddress(LIST + 4))
        .unwrap();
    h.add_chain(2, &[(LIST, 4, R)]);
    h.add_chain(2, &[(DATA + 0x1000, 0x2000, W)]);
    h.dev.process_hint_queue().unwrap();
    assert_eq!(h.byte(DATA + 0x1000), 0);
    assert_eq!(h.byte(DATA + 0x2fff), 0);
    let status = h.dev.hinting_status().unwrap();
    assert_eq!((status.host_cmd, status.guest_cmd), (2, Some(2)));
    h.add_chain(2, &[(LIST + 4, 4, R)]);
    h.dev.process_hint_queue().unwrap();
    // acknowledge_on_stop: the host says DONE at once.
    assert_eq!(h.dev.hinting_status().unwrap().host_cmd, HINT_CMD_DONE);
    assert_eq!(h.interrupt.config_count(), 2);
    // A late hint after DONE is not released.
    h.add_chain(2, &[(DATA + 0x3000, 0x1000, W)]);
    h.dev.process_hint_queue().unwrap();
    assert_eq!(h.byte(DATA + 0x3000), 0xaa);
    assert_eq!(h.dev.metrics().free_page_hint_freed.count(), 0x2000);
    h.dev.stop_hinting().unwrap();
    // The next run gets a new id.
    h.dev
        .start_hinting(StartHintingCmd {
            acknowledge_on_stop: false,
        })
        .unwrap();
    assert_eq!(h.dev.hinting_status().unwrap().host_cmd, 3);
}

#[test]
fn activation_needs_every_queue() {
    let mut b = Balloon::new(&stats_config()).unwrap();
    let mem = new_memory();
    let q = |index| ActiveQueue {
        index,
        queue: Queue::new(256).unwrap(),
        notify: EventFd::new(EFD_NONBLOCK).unwrap(),
    };
    let e = b
        .activate(
            mem.clone(),
            vec![q(0), q(1)],
            Arc::new(MockInterrupt::default()),
        )
        .unwrap_err();
    assert!(matches!(e, ActivateError::QueueCount { expected: 3, .. }));
    let e = b
        .activate(
            mem.clone(),
            vec![q(0), q(1), q(1)],
            Arc::new(MockInterrupt::default()),
        )
        .unwrap_err();
    assert!(matches!(e, ActivateError::QueueNotReady(2)), "{e:?}");
    assert_eq!(b.metrics().activate_fails.count(), 2);
    b.activate(
        mem.clone(),
        vec![q(2), q(0), q(1)],
        Arc::new(MockInterrupt::default()),
    )
    .unwrap();
    assert!(b.is_activated());
}

#[test]
fn state_round_trips_and_hostile_states_are_refused() {
    let mut h = Harness::new(stats_config());
    let len = write_stats(&h, LIST, &[(4, 42)]);
    let head = h.add_chain(2, &[(LIST, len, R)]);
    h.dev.process_stats_queue().unwrap();
    h.dev.write_config(4, &100u32.to_le_bytes());
    let state = Persist::save(&h.dev);
    assert_eq!(state.stats_desc, Some(head));
    let json = serde_json::to_string(&state).unwrap();
    let back: BalloonState = serde_json::from_str(&json).unwrap();
    let mut fresh = Balloon::new(&stats_config()).unwrap();
    Persist::restore(&mut fresh, &back).unwrap();
    assert_eq!(Persist::save(&fresh), state);
    assert_eq!(fresh.latest_stats().unwrap().free_memory, Some(42));
    assert_eq!(fresh.actual_pages(), 100);

    assert!(matches!(
        h.dev.restore(&state),
        Err(BalloonStateError::InUse)
    ));
    let mut plain = Balloon::new(&BalloonConfig::default()).unwrap();
    let e = plain.restore(&state).unwrap_err();
    assert!(matches!(e, BalloonStateError::Features { .. }), "{e}");
    let mut s = state.clone();
    s.acked_features = 1 << 32;
    assert!(matches!(
        plain.restore(&s),
        Err(BalloonStateError::StatsMismatch { .. })
    ));
    let mut s = state.clone();
    s.stats_desc = Some(256);
    let mut fresh = Balloon::new(&stats_config()).unwrap();
    assert!(matches!(
        fresh.restore(&s),
        Err(BalloonStateError::StatsDesc(Some(256)))
    ));
    assert_eq!(fresh.actual_pages(), 0);
}

fn memfd(len: u64) -> std::fs::File {
    // SAFETY: the name is a valid NUL-terminated string; the result is
    // checked before it is owned.
    let fd = unsafe { libc::memfd_create(c"balloon-test".as_ptr(), 0) };
    assert!(fd >= 0);
    // SAFETY: a fresh descriptor nobody else owns.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_len(len).unwrap();
    file
}

fn file_memory(file: &std::fs::File, flags: i32) -> GuestMemoryMmap {
    let region = MmapRegion::build(
        Some(FileOffset::new(file.try_clone().unwrap(), 0)),
        0x10_0000,
        libc::PROT_READ | libc::PROT_WRITE,
        flags,
    )
    .unwrap();
    GuestMemoryMmap::from_regions(vec![GuestRegionMmap::new(region, GuestAddress(0)).unwrap()])
        .unwrap()
}

#[test]
fn shared_memory_is_punched_out_of_its_file() {
    let mut file = memfd(0x10_0000);
    let mem = file_memory(&file, libc::MAP_SHARED);
    mem.write_slice(&[0xaa; 0x2000], GuestAddress(0x1000))
        .unwrap();
    release(&mem, GuestAddress(0x1000), 0x1000).unwrap();
    // MADV_REMOVE freed the backing page: the file reads zero there.
    let mut buf = [0u8; 2];
    file.seek(SeekFrom::Start(0x1000)).unwrap();
    file.read_exact(&mut buf[..1]).unwrap();
    file.seek(SeekFrom::Start(0x2000)).unwrap();
    file.read_exact(&mut buf[1..]).unwrap();
    assert_eq!(buf, [0, 0xaa]);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x1000)).unwrap(), 0);
}

#[test]
fn private_file_memory_reads_zero_not_the_file() {
    let mut file = memfd(0x10_0000);
    file.write_all(&[0x55; 0x3000]).unwrap();
    let mem = file_memory(&file, libc::MAP_PRIVATE);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x1000)).unwrap(), 0x55);
    release(&mem, GuestAddress(0x1000), 0x1000).unwrap();
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x1000)).unwrap(), 0);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x2000)).unwrap(), 0x55);
    // The range is still mapped and usable.
    mem.write_obj(7u8, GuestAddress(0x1000)).unwrap();
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x1000)).unwrap(), 7);
    // Outside the region or not page-aligned: refused.
    assert!(release(&mem, GuestAddress(0xff000), 0x2000).is_err());
    assert!(release(&mem, GuestAddress(0x1800), 0x1000).is_err());
    assert!(release(&mem, GuestAddress(0x1000), 0).is_err());
}

#[test]
fn inflated_pages_leave_host_memory() {
    // 16 MiB touched, then given back: mincore(2) sees none of those
    // pages resident any more, and the pages beside them still are.
    let mem = Box::leak(Box::new(
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x200_0000)]).unwrap(),
    ));
    let mut h = Harness::inactive(BalloonConfig::default(), mem);
    h.activate();
    h.fill(0xf0_0000, 0x110_0000, 1);
    assert_eq!(resident_pages(mem, 0x100_0000, 4096), 4096);
    for chunk in 0..16u64 {
        let pfns: Vec<u32> = (0..256)
            .map(|i| pfn(0x100_0000 + (chunk * 256 + i) * 0x1000))
            .collect();
        h.post_pfns(0, LIST + chunk * 0x400, &pfns);
    }
    h.dev.process_inflate_queue().unwrap();
    assert_eq!(h.take_used(0).len(), 16);
    assert_eq!(resident_pages(mem, 0x100_0000, 4096), 0);
    assert_eq!(resident_pages(mem, 0xf0_0000, 256), 256);
}

/// Pages of `[addr, addr + pages * 4 KiB)` resident in host memory.
fn resident_pages(mem: &GuestMemoryMmap, addr: u64, pages: usize) -> usize {
    use vm_memory::GuestMemoryBackend;
    let host = mem.get_host_address(GuestAddress(addr)).unwrap();
    let mut vec = vec![0u8; pages];
    // SAFETY: the range is inside the mapping (checked by the caller's
    // layout), and `vec` holds one byte per page.
    let ret = unsafe { libc::mincore(host.cast(), pages * 4096, vec.as_mut_ptr()) };
    assert_eq!(ret, 0);
    vec.iter().filter(|&&b| b & 1 != 0).count()
}
