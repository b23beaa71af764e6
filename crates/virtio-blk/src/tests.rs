// SPDX-License-Identifier: Apache-2.0

//! Device tests against real guest memory, a temporary image file and
//! virtio-queue's MockSplitQueue. Every behaviour test runs with both
//! engines.

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ember_virtio::{ActivateError, ActiveQueue, Persist, VirtioDevice};
use ember_virtio_mmio::test_utils::{leaked_memory, DriverQueue, MockInterrupt, QueueLayout};
use tempfile::NamedTempFile;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{
    VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::{
    Block, BlockConfig, BucketSpec, BucketUpdate, CacheType, Error, IoEngine, RateLimiterConfig,
    Request, RequestErrorKind, RequestType, MAX_DESCRIPTORS,
};

const MEM_SIZE: u64 = 0x40_0000;
const DISK_SIZE: u64 = 1 << 20;
const CAPACITY: u64 = DISK_SIZE / 512;

/// Where tests put request headers, status bytes, indirect tables and data.
const HDR: u64 = 0x1_0000;
const STATUS: u64 = 0x2_0000;
const TABLE: u64 = 0x3_0000;
const DATA: u64 = 0x10_0000;
const DATA2: u64 = 0x20_0000;

const R: u16 = 0;
const W: u16 = VRING_DESC_F_WRITE as u16;

struct Opts {
    engine: IoEngine,
    read_only: bool,
    cache_type: CacheType,
    drive_id: &'static str,
    /// Fill the image with a pattern (and keep it in the page cache).
    fill: bool,
    rate_limiter: RateLimiterConfig,
}

impl Opts {
    fn new(engine: IoEngine) -> Self {
        Opts {
            engine,
            read_only: false,
            cache_type: CacheType::Unsafe,
            drive_id: "drive-1",
            fill: true,
            rate_limiter: RateLimiterConfig::default(),
        }
    }
}

fn pattern(offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| ((offset + i) * 7 % 251) as u8)
        .collect()
}

struct Harness {
    mem: &'static GuestMemoryMmap,
    q: DriverQueue,
    block: Block,
    interrupt: Arc<MockInterrupt>,
    image: NamedTempFile,
    /// process_queue / handle_completion_event calls so far.
    steps: usize,
}

fn new_memory() -> &'static GuestMemoryMmap {
    leaked_memory(MEM_SIZE as usize)
}

fn image(fill: bool) -> NamedTempFile {
    let mut image = NamedTempFile::new().unwrap();
    if fill {
        image.write_all(&pattern(0, DISK_SIZE as usize)).unwrap();
        image.as_file().sync_all().unwrap();
    } else {
        image.as_file().set_len(DISK_SIZE).unwrap();
    }
    image
}

impl Harness {
    fn new(opts: Opts) -> Self {
        let mut h = Harness::inactive(opts);
        let features = h.block.features();
        h.activate(features);
        h
    }

    fn inactive(opts: Opts) -> Self {
        let image = image(opts.fill);
        let block = Block::new(&BlockConfig {
            drive_id: opts.drive_id.to_string(),
            path_on_host: image.path().to_path_buf(),
            is_read_only: opts.read_only,
            cache_type: opts.cache_type,
            io_engine: opts.engine,
            rate_limiter: opts.rate_limiter,
        })
        .unwrap();
        let mem = new_memory();
        Harness {
            mem,
            q: DriverQueue::new(mem, 256),
            block,
            interrupt: Arc::new(MockInterrupt::default()),
            image,
            steps: 0,
        }
    }

    fn activate(&mut self, features: u64) {
        self.block.ack_features(features);
        let queue: Queue = self.q.vq.create_queue().unwrap();
        self.block
            .activate(
                self.mem.clone(),
                vec![ActiveQueue {
                    index: 0,
                    queue,
                    notify: EventFd::new(EFD_NONBLOCK).unwrap(),
                }],
                self.interrupt.clone(),
            )
            .unwrap();
    }

    /// Adds one chain made of a single INDIRECT descriptor pointing at the
    /// given table (written at TABLE).
    fn add_indirect(&mut self, table: &[RawDescriptor]) -> u16 {
        for (i, desc) in table.iter().enumerate() {
            self.mem
                .write_obj(*desc, GuestAddress(TABLE + 16 * i as u64))
                .unwrap();
        }
        self.q
            .add_chain(&[(TABLE, 16 * table.len() as u32, VRING_DESC_F_INDIRECT as u16)])
    }

    fn header(&self, addr: u64, request_type: u32, sector: u64) {
        let mut hdr = [0u8; 16];
        hdr[..4].copy_from_slice(&request_type.to_le_bytes());
        hdr[8..].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&hdr, GuestAddress(addr)).unwrap();
    }

    fn range(&self, addr: u64, sector: u64, num_sectors: u32, flags: u32) {
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&sector.to_le_bytes());
        raw[8..12].copy_from_slice(&num_sectors.to_le_bytes());
        raw[12..].copy_from_slice(&flags.to_le_bytes());
        self.mem.write_slice(&raw, GuestAddress(addr)).unwrap();
    }

    /// Slot `i` gets its own header and status byte; the status starts as
    /// 0xff so that an untouched status is visible.
    fn slot(&self, i: u64) -> (u64, u64) {
        let status = STATUS + i;
        self.mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
        (HDR + 0x100 * i, status)
    }

    /// A read or write of `len` bytes at `sector`, data at `data`.
    fn rw(&mut self, slot: u64, request_type: u32, sector: u64, data: u64, len: u32) -> u64 {
        let (hdr, status) = self.slot(slot);
        self.header(hdr, request_type, sector);
        let flags = if request_type == VIRTIO_BLK_T_IN {
            W
        } else {
            R
        };
        self.q
            .add_chain(&[(hdr, 16, R), (data, len, flags), (status, 1, W)]);
        status
    }

    /// A request with a header and status and no data.
    fn bare(&mut self, slot: u64, request_type: u32) -> u64 {
        let (hdr, status) = self.slot(slot);
        self.header(hdr, request_type, 0);
        self.q.add_chain(&[(hdr, 16, R), (status, 1, W)]);
        status
    }

    /// A discard or write zeroes of one range.
    fn ranged(&mut self, slot: u64, request_type: u32, sector: u64, count: u32, flags: u32) -> u64 {
        let (hdr, status) = self.slot(slot);
        self.header(hdr, request_type, 0);
        let range = hdr + 0x20;
        self.range(range, sector, count, flags);
        self.q
            .add_chain(&[(hdr, 16, R), (range, 16, R), (status, 1, W)]);
        status
    }

    /// Processes the queue, then completion events until nothing is in
    /// flight.
    fn run(&mut self) {
        self.steps += 1;
        self.block.process_queue().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.block.pending_requests() > 0 {
            assert!(Instant::now() < deadline, "requests never completed");
            let evt = self.block.io_completion_event().unwrap();
            let mut pfd = libc::pollfd {
                fd: std::os::fd::AsRawFd::as_raw_fd(evt),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut pfd, 1, 100) };
            self.steps += 1;
            self.block.handle_completion_event().unwrap();
        }
    }

    fn status(&self, addr: u64) -> u8 {
        self.mem.read_obj(GuestAddress(addr)).unwrap()
    }

    fn guest_bytes(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    fn file_bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut file = self.image.reopen().unwrap();
        file.seek(SeekFrom::Start(offset)).unwrap();
        let mut buf = vec![0u8; len];
        file.read_exact(&mut buf).unwrap();
        buf
    }

    fn allocated_blocks(&self) -> u64 {
        self.image.as_file().metadata().unwrap().blocks()
    }

    /// Runs one request and returns its (used length, status byte).
    fn complete_one(&mut self, status: u64) -> (u32, u8) {
        self.run();
        let used = self.q.take_used();
        assert_eq!(used.len(), 1, "expected one used entry, got {used:?}");
        (used[0].1, self.status(status))
    }
}

macro_rules! both_engines {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[test]
                fn sync() {
                    super::$name(super::IoEngine::Sync);
                }
                #[test]
                fn io_uring() {
                    super::$name(super::IoEngine::Async);
                }
            }
        )*
    };
}

both_engines!(
    read_write_round_trip,
    batch_completes_with_one_interrupt,
    no_interrupt_when_driver_suppresses_them,
    flush_writeback,
    flush_unsafe,
    get_id,
    discard_punches_holes,
    write_zeroes,
    read_only_drive_rejects_writes,
    discard_and_write_zeroes_need_negotiation,
    malformed_chains,
    descriptor_loop_in_the_ring,
    indirect_descriptors,
    requests_past_a_malformed_one_still_work,
    random_chains_never_panic,
    full_engine_throttles_and_resumes,
    backing_file_update_changes_capacity_and_interrupts,
    bandwidth_limit_holds_requests_until_the_timer,
    ops_limit_counts_every_request,
    rate_limiter_updates_apply_live,
);

fn read_write_round_trip(engine: IoEngine) {
    let mut h = Harness::new(Opts::new(engine));
    let data = pattern(1000, 1024);
    h.mem.write_slice(&data[..512], GuestAddress(DATA)).unwrap();
    h.mem
        .write_slice(&data[512..], GuestAddress(DATA2))
        .unwrap();

    // A write scattered over two buffers.
    let (hdr, status) = h.slot(0);
    h.header(hdr, VIRTIO_BLK_T_OUT, 3);
    let head = h.q.add_chain(&[
        (hdr, 16, R),
        (DATA, 512, R),
        (DATA2, 512, R),
        (status, 1, W),
    ]);
    h.run();
    assert_eq!(h.q.take_used(), vec![(head, 1)]);
    assert_eq!(h.status(status), VIRTIO_BLK_S_OK as u8);
    assert_eq!(h.file_bytes(3 * 512, 1024), data);
    // Neighbouring sectors untouched.
    assert_eq!(h.file_bytes(2 * 512, 512), pattern(2 * 512, 512));
    assert_eq!(h.file_bytes(5 * 512, 512), pattern(5 * 512, 512));

    // Read it back into one buffer.
    let status = h.rw(1, VIRTIO_BLK_T_IN, 3, DATA + 0x1_0000, 1024);
    let (used_len, st) = h.complete_one(status);
    assert_eq!((used_len, st), (1025, VIRTIO_BLK_S_OK as u8));
    assert_eq!(h.guest_bytes(DATA + 0x1_0000, 1024), data);

    // The last sector of the disk is readable.
    let status = h.rw(2, VIRTIO_BLK_T_IN, CAPACITY - 1, DATA2, 512);
    assert_eq!(h.complete_one(status), (513, VIRTIO_BLK_S_OK as u8));
    assert_eq!(h.guest_bytes(DATA2, 512), pattern(DISK_SIZE - 512, 512));

    let m = h.block.metrics();
    assert_eq!(m.write_count.count(), 1);
    assert_eq!(m.write_bytes.count(), 1024);
    assert_eq!(m.read_count.count(), 2);
    assert_eq!(m.read_bytes.count(), 1536);
    assert_eq!(m.invalid_reqs_count.count(), 0);
    assert!(h.interrupt.vring_count() >= 3);
}

fn batch_completes_with_one_interrupt(engine: IoEngine) {
    let mut h = Harness::new(Opts::new(engine));
    let mut statuses = Vec::new();
    for i in 0..8 {
        statuses.push(h.rw(i, VIRTIO_BLK_T_IN, i * 8, DATA + i * 0x1000, 4096));
    }
    h.run();
    let used = h.q.take_used();
    assert_eq!(used.len(), 8);
    assert!(used.iter().all(|&(_, len)| len == 4097));
    for (i, status) in statuses.iter().enumerate() {
        assert_eq!(h.status(*status), VIRTIO_BLK_S_OK as u8);
        assert_eq!(
            h.guest_bytes(DATA + i as u64 * 0x1000, 4096),
            pattern(i as u64 * 8 * 512, 4096)
        );
    }
    match engine {
        // Everything completes in the one process_queue call.
        IoEngine::Sync => assert_eq!(h.interrupt.vring_count(), 1),
        // At most one interrupt per handler call, however many requests.
        IoEngine::Async => {
            assert!(h.interrupt.vring_count() >= 1);
            assert!(h.interrupt.vring_count() <= h.steps);
        }
    }
    // Notifications are re-enabled once the ring is drained.
    let used_flags: u16 = h.mem.read_obj(h.q.vq.used_addr()).unwrap();
    assert_eq!(used_flags, 0);
}

fn no_interrupt_when_driver_suppresses_them(engine: IoEngine) {
    let mut h = Harness::new(Opts::new(engine));
    h.mem
        .write_obj(VRING_AVAIL_F_NO_INTERRUPT as u16, h.q.vq.avail_addr())
        .unwrap();
    let status = h.rw(0, VIRTIO_BLK_T_IN, 0, DATA, 512);
    assert_eq!(h.complete_one(status), (513, VIRTIO_BLK_S_OK as u8));
    assert_eq!(h.interrupt.vring_count(), 0);
    assert_eq!(h.block.metrics().interrupts.count(), 0);

    h.mem.write_obj(0u16, h.q.vq.avail_addr()).unwrap();
    let status = h.rw(1, VIRTIO_BLK_T_IN, 0, DATA, 512);
    h.complete_one(status);
    assert!(h.interrupt.vring_count() >= 1);
}

fn flush_writeback(engine: IoEngine) {
    let mut opts = Opts::new(engine);
    opts.cache_type = CacheType::Writeback;
    let mut h = Harness::new(opts);
    assert_ne!(h.block.features() & (1 << VIRTIO_BLK_F_FLUSH), 0);
    let status = h.bare(0, VIRTIO_BLK_T_FLUSH);
    assert_eq!(h.complete_one(status), (1, VIRTIO_BLK_S_OK as u8));
    assert_eq!(h.block.metrics().flush_count.count(), 1);
}

fn flush_unsafe(engine: IoEngine) {
    let mut h = Harness::new(Opts::new(engine));
    assert_eq!(h.block.features() & (1 << VIRTIO_BLK_F_FLUSH), 0);
    let status = h.bare(0, VIRTIO_BLK_T_FLUSH);
    assert_eq!(h.complete_one(status), (1, VIRTIO_BLK_S_OK as u8));
    assert_eq!(h.block.metrics().flush_count.count(), 1);
    // Completed without the engine.
    assert_eq!(h.block.pending_requests(), 0);
}

fn get_id(engine: IoEngine) {
    let mut opts = Opts::new(engine);
    opts.drive_id = "a-drive-id-longer-than-twenty-bytes";
    let mut h = Harness::new(opts);
    h.mem.write_slice(&[0xee; 32], GuestAddress(DATA)).unwrap();
    let (hdr, status) = h.slot(0);
    h.header(hdr, VIRTIO_BLK_T_GET_ID, 0);
    h.q.add_chain(&[(hdr, 16, R), (DATA, 20, W), (status, 1, W)]);
    assert_eq!(h.complete_one(status), (21, VIRTIO_BLK_S_OK as u8));
    assert_eq!(h.guest_bytes(DATA, 20), b"a-drive-id-longer-th");
    assert_eq!(h.guest_bytes(DATA + 20, 1), [0xee]);

    // A short ID is zero-padded.
    let mut opts = Opts::new(engine);
    opts.drive_id = "root";
    let mut h = Harness::new(opts);
    h.mem.write_slice(&[0xee; 32], GuestAddress(DATA)).unwrap();
    let (hdr, status) = h.slot(0);
    h.header(hdr, VIRTIO_BLK_T_GET_ID, 0);
    h.q.add_chain(&[(hdr, 16, R), (DATA, 20, W), (status, 1, W)]);
    assert_eq!(h.complete_one(status), (21, VIRTIO_BLK_S_OK as u8));
    let mut expected = b"root".to_vec();
    expected.resize(20, 0);
    assert_eq!(h.guest_bytes(DATA, 20), expected);
}

fn discard_punches_holes(engine: IoEngine) {
    let mut h = Harness::new(Opts::new(engine));
    let before = h.allocated_blocks();
    assert!(before >= DISK_SIZE / 512, "image not allocated: {before}");
    // Discard the first 512 KiB.
    let status = h.ranged(0, VIRTIO_BLK_T_DISCARD, 0, 1024, 0);
    assert_eq!(h.complete_one(status), (1, VIRTIO_BLK_S_OK as u8));
    let after = h.allocated_blocks();
    assert!(
        after + 1024 <= before,
        "discard freed too little: {before} -> {after} blocks"
    );
    // The file keeps its size and the rest of its data.
    assert_eq!(h.image.as_file().metadata().unwrap().len(), DISK_SIZE);
    assert_eq!(h.file_bytes(0, 512), vec![0; 512]);
    assert_eq!(h.file_bytes(1024 * 512, 512), pattern(1024 * 512, 512));
    assert_eq!(h.block.metrics().discard_count.count(), 1);
}

fn write_zeroes(engine: IoEngine) {
    let mut h = Harness::new(Opts::new(engine));
    // Without unmap: zeroes, blocks stay allocated.
    let status = h.ranged(0, VIRTIO_BLK_T_WRITE_ZEROES, 8, 16, 0);
    assert_eq!(h.complete_one(status), (1, VIRTIO_BLK_S_OK as u8));
    assert_eq!(h.file_bytes(8 * 512, 16 * 512), vec![0; 16 * 512]);
    assert_eq!(h.file_bytes(7 * 512, 512), pattern(7 * 512, 512));
    assert_eq!(h.file_bytes(24 * 512, 512), pattern(24 * 512, 512));

    // With unmap: zeroes, and the blocks go away.
    let before = h.allocated_blocks();
    let status = h.ranged(1, VIRTIO_BLK_T_WRITE_ZEROES, 1024, 512, 1);
    assert_eq!(h.complete_one(status), (1, VIRTIO_BLK_S_OK as u8));
    assert_eq!(h.file_bytes(1024 * 512, 512 * 512), vec![0; 512 * 512]);
    assert!(h.allocated_blocks() + 512 <= before);
    assert_eq!(h.image.as_file().metadata().unwrap().len(), DISK_SIZE);
    assert_eq!(h.block.metrics().write_zeroes_count.count(), 2);
}

fn read_only_drive_rejects_writes(engine: IoEngine) {
    let mut opts = Opts::new(engine);
    opts.read_only = true;
    let mut h = Harness::new(opts);
    let features = h.block.features();
    assert_ne!(features & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(features & (1 << VIRTIO_BLK_F_DISCARD), 0);
    assert_eq!(features & (1 << VIRTIO_BLK_F_WRITE_ZEROES), 0);
    let blocks = h.allocated_blocks();

    h.mem.write_slice(&[0x5a; 512], GuestAddress(DATA)).unwrap();
    let status = h.rw(0, VIRTIO_BLK_T_OUT, 0, DATA, 512);
    assert_eq!(h.complete_one(status), (1, VIRTIO_BLK_S_IOERR as u8));
    // Discard and write zeroes (sent anyway) fail the same way.
    let status = h.ranged(1, VIRTIO_BLK_T_DISCARD, 0, 8, 0);
    assert_eq!(h.complete_one(status), (1, VIRTIO_BLK_S_IOERR as u8));
    let status = h.ranged(2, VIRTIO_BLK_T_WRITE_ZEROES, 0, 8, 1);
    assert_eq!(h.complete_one(status), (1, VIRTIO_BLK_S_IOERR as u8));

    assert_eq!(
        h.file_bytes(0, DISK_SIZE as usize),
        pattern(0, DISK_SIZE as usize)
    );
    assert_eq!(h.allocated_blocks(), blocks);
    assert_eq!(h.block.metrics().invalid_reqs_count.count(), 3);
    assert_eq!(h.block.metrics().write_count.count(), 0);

    // Reads still work.
    let status = h.rw(3, VIRTIO_BLK_T_IN, 1, DATA, 512);
    assert_eq!(h.complete_one(status), (513, VIRTIO_BLK_S_OK as u8));
    assert_eq!(h.guest_bytes(DATA, 512), pattern(512, 512));
}

fn discard_and_write_zeroes_need_negotiation(engine: IoEngine) {
    let mut h = Harness::inactive(Opts::new(engine));
    h.activate(1 << VIRTIO_F_VERSION_1);
    let status = h.ranged(0, VIRTIO_BLK_T_DISCARD, 0, 8, 0);
    assert_eq!(h.complete_one(status), (1, VIRTIO_BLK_S_UNSUPP as u8));
    let status = h.ranged(1, VIRTIO_BLK_T_WRITE_ZEROES, 0, 8, 0);
    assert_eq!(h.complete_one(status), (1, VIRTIO_BLK_S_UNSUPP as u8));
    assert_eq!(h.file_bytes(0, 8 * 512), pattern(0, 8 * 512));
}

/// How a malformed chain must end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// Returned with used length 0, status byte untouched.
    Dropped,
    /// Completed with this status (used length 1).
    Status(u32),
}

/// Builds one malformed request in a fresh harness and checks its fate,
/// the counters, and that the image did not change.
fn check_malformed(engine: IoEngine, name: &str, expect: Expect, build: impl FnOnce(&mut Harness)) {
    let mut h = Harness::new(Opts::new(engine));
    h.mem
        .write_slice(&[0x5a; 4096], GuestAddress(DATA))
        .unwrap();
    h.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    build(&mut h);
    h.run();
    let used = h.q.take_used();
    assert_eq!(used.len(), 1, "{name}: used entries {used:?}");
    let m = h.block.metrics();
    match expect {
        Expect::Dropped => {
            assert_eq!(used[0].1, 0, "{name}: used length");
            assert_eq!(h.status(STATUS), 0xff, "{name}: status written");
            assert_eq!(m.invalid_reqs_count.count(), 0, "{name}");
        }
        Expect::Status(status) => {
            assert_eq!(used[0].1, 1, "{name}: used length");
            assert_eq!(u32::from(h.status(STATUS)), status, "{name}: status");
            assert_eq!(m.invalid_reqs_count.count(), 1, "{name}");
        }
    }
    assert_eq!(m.execute_fails.count(), 1, "{name}: execute_fails");
    assert_eq!(m.read_count.count() + m.write_count.count(), 0, "{name}");
    assert_eq!(
        h.file_bytes(0, DISK_SIZE as usize),
        pattern(0, DISK_SIZE as usize),
        "{name}: image changed"
    );
}

fn malformed_chains(engine: IoEngine) {
    let ioerr = Expect::Status(VIRTIO_BLK_S_IOERR);
    let unsupp = Expect::Status(VIRTIO_BLK_S_UNSUPP);
    type Build = Box<dyn FnOnce(&mut Harness)>;
    let cases: Vec<(&str, Expect, Build)> = vec![
        (
            "missing status",
            Expect::Dropped,
            Box::new(|h| {
                let (hdr, _) = h.slot(0);
                h.header(hdr, VIRTIO_BLK_T_FLUSH, 0);
                h.q.add_chain(&[(hdr, 16, R)]);
            }),
        ),
        (
            "read-only status descriptor",
            Expect::Dropped,
            Box::new(|h| {
                let (hdr, status) = h.slot(0);
                h.header(hdr, VIRTIO_BLK_T_IN, 0);
                h.q.add_chain(&[(hdr, 16, R), (DATA, 512, W), (status, 1, R)]);
            }),
        ),
        (
            "empty status descriptor",
            Expect::Dropped,
            Box::new(|h| {
                let (hdr, status) = h.slot(0);
                h.header(hdr, VIRTIO_BLK_T_FLUSH, 0);
                h.q.add_chain(&[(hdr, 16, R), (status, 0, W)]);
            }),
        ),
        (
            "status outside guest memory",
            Expect::Dropped,
            Box::new(|h| {
                let (hdr, _) = h.slot(0);
                h.header(hdr, VIRTIO_BLK_T_FLUSH, 0);
                h.q.add_chain(&[(hdr, 16, R), (MEM_SIZE, 1, W)]);
            }),
        ),
        (
            "read with device-readable data",
            ioerr,
            Box::new(|h| {
                let (hdr, status) = h.slot(0);
                h.header(hdr, VIRTIO_BLK_T_IN, 0);
                h.q.add_chain(&[(hdr, 16, R), (DATA, 512, R), (status, 1, W)]);
            }),
        ),
        (
            "write with device-writable data",
            ioerr,
            Box::new(|h| {
                let (hdr, status) = h.slot(0);
                h.header(hdr, VIRTIO_BLK_T_OUT, 0);
                h.q.add_chain(&[(hdr, 16, R), (DATA, 512, W), (status, 1, W)]);
            }),
        ),
        (
            "read without data",
            ioerr,
            Box::new(|h| {
                h.bare(0, VIRTIO_BLK_T_IN);
            }),
        ),
        (
            "length not a sector multiple",
            ioerr,
            Box::new(|h| {
                h.rw(0, VIRTIO_BLK_T_OUT, 0, DATA, 513);
            }),
        ),
        (
            "read past the end",
            ioerr,
            Box::new(|h| {
                h.rw(0, VIRTIO_BLK_T_IN, CAPACITY, DATA, 512);
            }),
        ),
        (
            "write straddling the end",
            ioerr,
            Box::new(|h| {
                h.rw(0, VIRTIO_BLK_T_OUT, CAPACITY - 1, DATA, 1024);
            }),
        ),
        (
            "sector overflow",
            ioerr,
            Box::new(|h| {
                h.rw(0, VIRTIO_BLK_T_OUT, u64::MAX, DATA, 512);
            }),
        ),
        (
            // Walking stops one descriptor past the limit, so the status
            // byte at the end is never reached nor written.
            "too many descriptors",
            Expect::Dropped,
            Box::new(|h| {
                let (hdr, status) = h.slot(0);
                h.header(hdr, VIRTIO_BLK_T_IN, 0);
                let mut descs = vec![(hdr, 16, R)];
                for i in 0..MAX_DESCRIPTORS as u64 - 1 {
                    descs.push((DATA + 512 * i, 512, W));
                }
                descs.push((status, 1, W));
                h.q.add_chain(&descs);
            }),
        ),
        (
            "data outside guest memory",
            ioerr,
            Box::new(|h| {
                h.rw(0, VIRTIO_BLK_T_IN, 0, MEM_SIZE - 256, 512);
            }),
        ),
        (
            "data at a wrapping address",
            ioerr,
            Box::new(|h| {
                h.rw(0, VIRTIO_BLK_T_OUT, 0, u64::MAX - 255, 512);
            }),
        ),
        (
            "header outside guest memory",
            ioerr,
            Box::new(|h| {
                let (_, status) = h.slot(0);
                h.q.add_chain(&[(MEM_SIZE + 0x1000, 16, R), (status, 1, W)]);
            }),
        ),
        (
            "header too short",
            ioerr,
            Box::new(|h| {
                let (hdr, status) = h.slot(0);
                h.header(hdr, VIRTIO_BLK_T_FLUSH, 0);
                h.q.add_chain(&[(hdr, 8, R), (status, 1, W)]);
            }),
        ),
        (
            "readable after writable",
            ioerr,
            Box::new(|h| {
                let (hdr, status) = h.slot(0);
                h.header(hdr, VIRTIO_BLK_T_IN, 0);
                h.q.add_chain(&[
                    (hdr, 16, R),
                    (DATA, 512, W),
                    (DATA + 512, 512, R),
                    (status, 1, W),
                ]);
            }),
        ),
        (
            "unknown request type",
            unsupp,
            Box::new(|h| {
                h.bare(0, 99);
            }),
        ),
        (
            "get_id buffer too short",
            ioerr,
            Box::new(|h| {
                let (hdr, status) = h.slot(0);
                h.header(hdr, VIRTIO_BLK_T_GET_ID, 0);
                h.q.add_chain(&[(hdr, 16, R), (DATA, 10, W), (status, 1, W)]);
            }),
        ),
        (
            "discard with unmap",
            unsupp,
            Box::new(|h| {
                h.ranged(0, VIRTIO_BLK_T_DISCARD, 0, 8, 1);
            }),
        ),
        (
            "write zeroes with unknown flag",
            unsupp,
            Box::new(|h| {
                h.ranged(0, VIRTIO_BLK_T_WRITE_ZEROES, 0, 8, 4);
            }),
        ),
        (
            "discard past the end",
            ioerr,
            Box::new(|h| {
                h.ranged(0, VIRTIO_BLK_T_DISCARD, CAPACITY - 4, 8, 0);
            }),
        ),
        (
            "discard sector overflow",
            ioerr,
            Box::new(|h| {
                h.ranged(0, VIRTIO_BLK_T_DISCARD, u64::MAX - 2, 8, 0);
            }),
        ),
        (
            "write zeroes too large",
            ioerr,
            Box::new(|h| {
                h.ranged(0, VIRTIO_BLK_T_WRITE_ZEROES, 0, u32::MAX, 0);
            }),
        ),
        (
            "discard with two ranges",
            ioerr,
            Box::new(|h| {
                let (hdr, status) = h.slot(0);
                h.header(hdr, VIRTIO_BLK_T_DISCARD, 0);
                h.range(DATA, 0, 8, 0);
                h.range(DATA + 16, 16, 8, 0);
                h.q.add_chain(&[(hdr, 16, R), (DATA, 32, R), (status, 1, W)]);
            }),
        ),
        (
            "discard range of 15 bytes",
            ioerr,
            Box::new(|h| {
                let (hdr, status) = h.slot(0);
                h.header(hdr, VIRTIO_BLK_T_DISCARD, 0);
                h.q.add_chain(&[(hdr, 16, R), (DATA, 15, R), (status, 1, W)]);
            }),
        ),
        (
            "nested indirect table",
            Expect::Dropped,
            Box::new(|h| {
                let (hdr, status) = h.slot(0);
                h.header(hdr, VIRTIO_BLK_T_IN, 0);
                let next = VRING_DESC_F_NEXT as u16;
                let table = [
                    RawDescriptor::from(SplitDescriptor::new(hdr, 16, next, 1)),
                    // An indirect descriptor inside an indirect table
                    // (virtio 1.2 §2.7.5.3.1 forbids it) ends the chain.
                    RawDescriptor::from(SplitDescriptor::new(
                        TABLE,
                        48,
                        VRING_DESC_F_INDIRECT as u16 | next,
                        2,
                    )),
                    RawDescriptor::from(SplitDescriptor::new(status, 1, W, 0)),
                ];
                h.add_indirect(&table);
            }),
        ),
        (
            "indirect descriptor loop",
            Expect::Dropped,
            Box::new(|h| {
                let (hdr, _) = h.slot(0);
                h.header(hdr, VIRTIO_BLK_T_FLUSH, 0);
                let next = VRING_DESC_F_NEXT as u16;
                // 0 -> 1 -> 0 -> ...: the walk stops after the table size.
                let table = [
                    RawDescriptor::from(SplitDescriptor::new(hdr, 16, next, 1)),
                    RawDescriptor::from(SplitDescriptor::new(hdr, 16, next, 0)),
                ];
                h.add_indirect(&table);
            }),
        ),
        (
            // A table claiming 65535 entries whose first entry loops to
            // itself: the walk must stop after MAX_DESCRIPTORS + 1 steps
            // instead of reading 65535 descriptors per chain.
            "huge self-looping indirect table",
            Expect::Dropped,
            Box::new(|h| {
                let entry = RawDescriptor::from(SplitDescriptor::new(
                    DATA,
                    512,
                    VRING_DESC_F_NEXT as u16 | W,
                    0,
                ));
                h.mem.write_obj(entry, GuestAddress(TABLE)).unwrap();
                h.q.add_chain(&[(TABLE, 0xFFFF0, VRING_DESC_F_INDIRECT as u16)]);
            }),
        ),
        (
            "indirect table outside guest memory",
            Expect::Dropped,
            Box::new(|h| {
                h.q.add_chain(&[(MEM_SIZE, 64, VRING_DESC_F_INDIRECT as u16)]);
            }),
        ),
        (
            "indirect table of odd length",
            Expect::Dropped,
            Box::new(|h| {
                h.q.add_chain(&[(TABLE, 20, VRING_DESC_F_INDIRECT as u16)]);
            }),
        ),
    ];
    for (name, expect, build) in cases {
        check_malformed(engine, name, expect, build);
    }
}

fn descriptor_loop_in_the_ring(engine: IoEngine) {
    let mut h = Harness::new(Opts::new(engine));
    let (hdr, status) = h.slot(0);
    h.header(hdr, VIRTIO_BLK_T_FLUSH, 0);
    let next = VRING_DESC_F_NEXT as u16;
    // Descriptors 0 and 1 point at each other: the walk stops one
    // descriptor past what a request may have, and the chain goes back
    // with nothing written (its end, where a status byte would be, is never
    // reached).
    h.mem.write_obj(0x77u8, GuestAddress(status)).unwrap();
    h.q.vq
        .add_desc_chains(
            &[
                RawDescriptor::from(SplitDescriptor::new(hdr, 16, next, 1)),
                RawDescriptor::from(SplitDescriptor::new(status, 1, W | next, 0)),
            ],
            0,
        )
        .unwrap();
    assert_eq!(h.complete_one(status), (0, 0x77));
}

fn indirect_descriptors(engine: IoEngine) {
    let mut h = Harness::new(Opts::new(engine));
    let (hdr, status) = h.slot(0);
    h.header(hdr, VIRTIO_BLK_T_IN, 4);
    let next = VRING_DESC_F_NEXT as u16;
    let table = [
        RawDescriptor::from(SplitDescriptor::new(hdr, 16, next, 1)),
        RawDescriptor::from(SplitDescriptor::new(DATA, 512, W | next, 2)),
        RawDescriptor::from(SplitDescriptor::new(DATA2, 1024, W | next, 3)),
        RawDescriptor::from(SplitDescriptor::new(status, 1, W, 0)),
    ];
    h.add_indirect(&table);
    assert_eq!(h.complete_one(status), (1537, VIRTIO_BLK_S_OK as u8));
    assert_eq!(h.guest_bytes(DATA, 512), pattern(4 * 512, 512));
    assert_eq!(h.guest_bytes(DATA2, 1024), pattern(5 * 512, 1024));
}

fn requests_past_a_malformed_one_still_work(engine: IoEngine) {
    let mut h = Harness::new(Opts::new(engine));
    let bad = h.rw(0, VIRTIO_BLK_T_IN, CAPACITY, DATA, 512);
    let good = h.rw(1, VIRTIO_BLK_T_IN, 0, DATA2, 512);
    h.run();
    let used = h.q.take_used();
    assert_eq!(used.len(), 2);
    assert_eq!(h.status(bad), VIRTIO_BLK_S_IOERR as u8);
    assert_eq!(h.status(good), VIRTIO_BLK_S_OK as u8);
    assert_eq!(h.guest_bytes(DATA2, 512), pattern(0, 512));
}

fn full_engine_throttles_and_resumes(engine: IoEngine) {
    let mut opts = Opts::new(engine);
    opts.cache_type = CacheType::Writeback;
    let mut h = Harness::new(opts);
    h.block.set_max_in_flight(2);

    // Reads of cached data, which io_uring completes while submitting: the
    // device must carry on by itself once they are reaped.
    for i in 0..6u64 {
        h.rw(i, VIRTIO_BLK_T_IN, i, DATA + 512 * i, 512);
    }
    h.run();
    assert_eq!(h.q.take_used().len(), 6);
    for i in 0..6u64 {
        assert_eq!(h.status(STATUS + i), VIRTIO_BLK_S_OK as u8, "read {i}");
        assert_eq!(h.guest_bytes(DATA + 512 * i, 512), pattern(512 * i, 512));
    }

    // Flushes, which io_uring completes later from a worker: the completion
    // event resumes the queue.
    for i in 0..6u64 {
        h.bare(i, VIRTIO_BLK_T_FLUSH);
    }
    h.run();
    assert_eq!(h.q.take_used().len(), 6);
    for i in 0..6u64 {
        assert_eq!(h.status(STATUS + i), VIRTIO_BLK_S_OK as u8, "flush {i}");
    }

    let m = h.block.metrics();
    assert_eq!(m.read_count.count(), 6);
    assert_eq!(m.flush_count.count(), 6);
    if engine == IoEngine::Async {
        assert!(m.io_engine_throttled_events.count() >= 2);
    }
    // Notifications were turned back on at the end.
    let used_flags: u16 = h.mem.read_obj(h.q.vq.used_addr()).unwrap();
    assert_eq!(used_flags, 0);
}

fn bucket(size: u64, refill_time_ms: u64) -> Option<BucketSpec> {
    Some(BucketSpec {
        size,
        one_time_burst: 0,
        refill_time_ms,
    })
}

/// Waits for the rate limiter's timer, hands the event to the device and
/// completes what it started; returns the used entries.
fn after_rate_limiter_timer(h: &mut Harness) -> Vec<(u16, u32)> {
    let mut pfd = libc::pollfd {
        fd: h.block.rate_limiter_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let ready = unsafe { libc::poll(&mut pfd, 1, 5000) };
    assert_eq!(ready, 1, "the timer never fired");
    h.block.handle_rate_limiter_event().unwrap();
    h.run();
    h.q.take_used()
}

fn bandwidth_limit_holds_requests_until_the_timer(engine: IoEngine) {
    let mut opts = Opts::new(engine);
    // 1024 bytes per 100 ms.
    opts.rate_limiter.bandwidth = bucket(1024, 100);
    let mut h = Harness::new(opts);
    let start = Instant::now();
    for i in 0..4u64 {
        h.rw(i, VIRTIO_BLK_T_IN, i, DATA + 512 * i, 512);
    }
    h.run();
    let mut used = h.q.take_used();
    assert_eq!(used.len(), 2, "the bucket holds two reads");
    assert!(h.block.rate_limiter().is_blocked());
    let m = h.block.metrics().clone();
    assert_eq!(m.rate_limiter_throttled_events.count(), 1);
    // A kick while blocked processes nothing and does not spin.
    h.run();
    assert!(h.q.take_used().is_empty());
    assert_eq!(m.rate_limiter_throttled_events.count(), 2);
    while used.len() < 4 {
        assert!(start.elapsed() < Duration::from_secs(5));
        used.extend(after_rate_limiter_timer(&mut h));
    }
    // 1024 bytes beyond the bucket take 100 ms of refill.
    assert!(
        start.elapsed() >= Duration::from_millis(95),
        "{:?}",
        start.elapsed()
    );
    // Nothing dropped, nothing reordered.
    let heads: Vec<u16> = used.iter().map(|u| u.0).collect();
    assert_eq!(heads, [0, 3, 6, 9]);
    for i in 0..4u64 {
        assert_eq!(h.status(STATUS + i), VIRTIO_BLK_S_OK as u8, "read {i}");
        assert_eq!(h.guest_bytes(DATA + 512 * i, 512), pattern(512 * i, 512));
    }
    assert_eq!(m.read_count.count(), 4);
    assert!(m.rate_limiter_event_count.count() >= 1);
}

fn ops_limit_counts_every_request(engine: IoEngine) {
    let mut opts = Opts::new(engine);
    opts.cache_type = CacheType::Writeback;
    // Two operations per 100 ms; bytes unlimited.
    opts.rate_limiter.ops = bucket(2, 100);
    let mut h = Harness::new(opts);
    let start = Instant::now();
    h.bare(0, VIRTIO_BLK_T_FLUSH);
    h.rw(1, VIRTIO_BLK_T_IN, 0, DATA, 4096);
    h.bare(2, VIRTIO_BLK_T_FLUSH);
    h.rw(3, VIRTIO_BLK_T_OUT, 8, DATA, 4096);
    h.run();
    let mut used = h.q.take_used();
    assert_eq!(used.len(), 2);
    while used.len() < 4 {
        assert!(start.elapsed() < Duration::from_secs(5));
        used.extend(after_rate_limiter_timer(&mut h));
    }
    assert!(
        start.elapsed() >= Duration::from_millis(95),
        "{:?}",
        start.elapsed()
    );
    for i in 0..4u64 {
        assert_eq!(h.status(STATUS + i), VIRTIO_BLK_S_OK as u8, "request {i}");
    }
}

fn rate_limiter_updates_apply_live(engine: IoEngine) {
    let mut opts = Opts::new(engine);
    // One 512-byte read per 10 s: the second read would wait 10 s.
    opts.rate_limiter.bandwidth = bucket(512, 10_000);
    let mut h = Harness::new(opts);
    for i in 0..3u64 {
        h.rw(i, VIRTIO_BLK_T_IN, i, DATA + 512 * i, 512);
    }
    h.run();
    assert_eq!(h.q.take_used().len(), 1);
    assert!(h.block.rate_limiter().is_blocked());
    // A new, larger bucket: the device goes on at once, not in 10 s.
    let start = Instant::now();
    h.block.update_rate_limiter(
        BucketUpdate::Update(BucketSpec {
            size: 4096,
            one_time_burst: 0,
            refill_time_ms: 100,
        }),
        BucketUpdate::None,
    );
    assert_eq!(h.block.config().rate_limiter.bandwidth, bucket(4096, 100));
    assert_eq!(after_rate_limiter_timer(&mut h).len(), 2);
    assert!(start.elapsed() < Duration::from_secs(2));
    for i in 0..3u64 {
        assert_eq!(h.status(STATUS + i), VIRTIO_BLK_S_OK as u8, "read {i}");
    }
    // Removing the bucket removes the limit.
    h.block
        .update_rate_limiter(BucketUpdate::Disabled, BucketUpdate::None);
    assert!(h.block.rate_limiter().is_unlimited());
    assert_eq!(h.block.config().rate_limiter, RateLimiterConfig::default());
    for i in 0..8u64 {
        h.rw(i, VIRTIO_BLK_T_IN, i, DATA + 512 * i, 512);
    }
    h.run();
    assert_eq!(h.q.take_used().len(), 8);
}

/// An image of `size` bytes whose every byte is `byte`.
fn image_of(size: usize, byte: u8) -> NamedTempFile {
    let mut image = NamedTempFile::new().unwrap();
    image.write_all(&vec![byte; size]).unwrap();
    image
}

fn config_capacity(block: &Block) -> u64 {
    let mut capacity = [0u8; 8];
    block.read_config(0, &mut capacity);
    u64::from_le_bytes(capacity)
}

fn backing_file_update_changes_capacity_and_interrupts(engine: IoEngine) {
    let mut opts = Opts::new(engine);
    opts.cache_type = CacheType::Writeback;
    let mut h = Harness::new(opts);
    assert_eq!(config_capacity(&h.block), CAPACITY);

    // A flush left in flight: io_uring completes it later, from a worker.
    let flush = h.bare(0, VIRTIO_BLK_T_FLUSH);
    h.block.process_queue().unwrap();
    let vring_before = h.interrupt.vring_count();

    let bigger = image_of(2 * DISK_SIZE as usize, 0xab);
    h.block.update_backing_file(bigger.path()).unwrap();

    // The request in flight was completed to the driver before the switch.
    assert_eq!(h.block.pending_requests(), 0);
    assert_eq!(h.q.take_used().len(), 1);
    assert_eq!(h.status(flush), VIRTIO_BLK_S_OK as u8);
    if engine == IoEngine::Async {
        assert!(h.interrupt.vring_count() > vring_before);
    }
    // The guest sees the new size after one configuration interrupt.
    assert_eq!(h.block.capacity(), 2 * CAPACITY);
    assert_eq!(config_capacity(&h.block), 2 * CAPACITY);
    assert_eq!(h.interrupt.config_count(), 1);
    assert_eq!(h.block.config().path_on_host, bigger.path());
    assert_eq!(h.block.metrics().update_count.count(), 1);

    // Reads come from the new file, including past the old end...
    let status = h.rw(1, VIRTIO_BLK_T_IN, 0, DATA, 512);
    assert_eq!(h.complete_one(status), (513, VIRTIO_BLK_S_OK as u8));
    assert_eq!(h.guest_bytes(DATA, 512), vec![0xab; 512]);
    let status = h.rw(2, VIRTIO_BLK_T_IN, 2 * CAPACITY - 1, DATA2, 512);
    assert_eq!(h.complete_one(status), (513, VIRTIO_BLK_S_OK as u8));
    assert_eq!(h.guest_bytes(DATA2, 512), vec![0xab; 512]);
    // ...and writes go there, not to the old file.
    h.mem.write_slice(&[0x5a; 512], GuestAddress(DATA)).unwrap();
    let status = h.rw(3, VIRTIO_BLK_T_OUT, 5, DATA, 512);
    assert_eq!(h.complete_one(status), (1, VIRTIO_BLK_S_OK as u8));
    let mut written = vec![0u8; 512];
    let mut file = bigger.reopen().unwrap();
    file.seek(SeekFrom::Start(5 * 512)).unwrap();
    file.read_exact(&mut written).unwrap();
    assert_eq!(written, vec![0x5a; 512]);
    assert_eq!(h.file_bytes(5 * 512, 512), pattern(5 * 512, 512));

    // A path that cannot be opened changes nothing and names the path.
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.img");
    let err = h.block.update_backing_file(&missing).unwrap_err();
    assert!(err.to_string().contains("missing.img"), "{err}");
    assert_eq!(h.block.capacity(), 2 * CAPACITY);
    assert_eq!(h.interrupt.config_count(), 1);
    assert_eq!(h.block.config().path_on_host, bigger.path());
    assert_eq!(h.block.metrics().update_fails.count(), 1);

    // Back to a smaller file: requests past its end now fail.
    let smaller = image_of(DISK_SIZE as usize / 2, 0x11);
    h.block.update_backing_file(smaller.path()).unwrap();
    assert_eq!(config_capacity(&h.block), CAPACITY / 2);
    assert_eq!(h.interrupt.config_count(), 2);
    let status = h.rw(4, VIRTIO_BLK_T_IN, CAPACITY / 2, DATA, 512);
    assert_eq!(h.complete_one(status), (1, VIRTIO_BLK_S_IOERR as u8));
}

#[test]
fn backing_file_update_before_activation_needs_no_interrupt() {
    let mut h = Harness::inactive(Opts::new(IoEngine::Sync));
    let bigger = image_of(3 * DISK_SIZE as usize, 0);
    h.block.update_backing_file(bigger.path()).unwrap();
    assert_eq!(config_capacity(&h.block), 3 * CAPACITY);
    assert_eq!(h.interrupt.config_count(), 0);
    // The driver that starts the device later reads the new size.
    let features = h.block.features();
    h.activate(features);
    let status = h.rw(0, VIRTIO_BLK_T_IN, 3 * CAPACITY - 1, DATA, 512);
    assert_eq!(h.complete_one(status), (513, VIRTIO_BLK_S_OK as u8));
}

fn random_chains_never_panic(engine: IoEngine) {
    let mut h = Harness::new(Opts::new(engine));
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut added = 0u16;
    for round in 0..40 {
        for slot in 0..8u64 {
            let r = next();
            let (hdr, status) = h.slot(slot);
            let types = [
                VIRTIO_BLK_T_IN,
                VIRTIO_BLK_T_OUT,
                VIRTIO_BLK_T_FLUSH,
                VIRTIO_BLK_T_GET_ID,
                VIRTIO_BLK_T_DISCARD,
                VIRTIO_BLK_T_WRITE_ZEROES,
                (r >> 40) as u32,
            ];
            let sector = match r % 4 {
                0 => next() % CAPACITY,
                1 => next(),
                _ => next() % 64,
            };
            h.header(hdr, types[(r >> 8) as usize % types.len()], sector);
            h.range(
                hdr + 0x20,
                next() % (CAPACITY + 8),
                (next() % 64) as u32,
                (next() % 3) as u32,
            );
            let n = 1 + (next() % 5) as usize;
            let mut descs = vec![(hdr, 16 + (next() % 2) as u32 * 16, R)];
            for _ in 1..n {
                let addr = match next() % 8 {
                    0 => next(),
                    1 => MEM_SIZE - (next() % 1024),
                    _ => DATA + (next() % 0x10_0000),
                };
                let len = [512u32, 1024, 16, 20, 511, 4096][(next() % 6) as usize];
                let flags = if next() % 2 == 0 { R } else { W };
                descs.push((addr, len, flags));
            }
            if next() % 4 != 0 {
                descs.push((status, 1, W));
            }
            h.q.add_chain(&descs);
            added = added.wrapping_add(1);
        }
        h.run();
        // Every chain came back, valid or not.
        assert_eq!(h.q.used_idx(), added, "round {round}");
        h.q.rewind_table();
    }
}

#[test]
fn config_space_layout() {
    let mut image = NamedTempFile::new().unwrap();
    // Not a sector multiple: the tail is not visible.
    image.write_all(&vec![1u8; 3 * 512 + 100]).unwrap();
    let block = Block::new(&BlockConfig {
        drive_id: "d".into(),
        path_on_host: image.path().to_path_buf(),
        is_read_only: false,
        cache_type: CacheType::Unsafe,
        io_engine: IoEngine::Sync,
        rate_limiter: Default::default(),
    })
    .unwrap();
    assert_eq!(block.capacity(), 3);
    assert_eq!(block.config_size(), 60);
    let read = |offset: u64, len: usize| {
        let mut buf = vec![0u8; len];
        block.read_config(offset, &mut buf);
        buf
    };
    let u32_at = |offset: u64| u32::from_le_bytes(read(offset, 4).try_into().unwrap());
    assert_eq!(u64::from_le_bytes(read(0, 8).try_into().unwrap()), 3);
    assert_eq!(u32_at(12), 128, "seg_max");
    assert_eq!(u32_at(20), 512, "blk_size");
    assert_eq!(u32_at(36), u32::MAX, "max_discard_sectors");
    assert_eq!(u32_at(40), 1, "max_discard_seg");
    assert!(u32_at(44) >= 1, "discard_sector_alignment");
    assert_eq!(u32_at(48), 1 << 21, "max_write_zeroes_sectors");
    assert_eq!(u32_at(52), 1, "max_write_zeroes_seg");
    assert_eq!(read(56, 1), [1], "write_zeroes_may_unmap");
    // Byte-wise reads see the same little-endian value.
    assert_eq!(read(0, 1), [3]);
    // Out of range reads are zero rather than a panic.
    assert_eq!(read(58, 8), vec![0; 8]);
    assert_eq!(read(u64::MAX, 2), vec![0; 2]);
}

#[test]
fn config_writes_are_ignored_and_counted() {
    let mut h = Harness::new(Opts::new(IoEngine::Sync));
    h.block.write_config(0, &[9; 8]);
    let mut capacity = [0u8; 8];
    h.block.read_config(0, &mut capacity);
    assert_eq!(u64::from_le_bytes(capacity), CAPACITY);
    assert_eq!(h.block.metrics().cfg_fails.count(), 1);
}

#[test]
fn features_offered() {
    let h = Harness::inactive(Opts::new(IoEngine::Sync));
    let f = h.block.features();
    assert_ne!(f & (1 << VIRTIO_F_VERSION_1), 0);
    assert_ne!(f & (1 << VIRTIO_BLK_F_DISCARD), 0);
    assert_ne!(f & (1 << VIRTIO_BLK_F_WRITE_ZEROES), 0);
    assert_eq!(f & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(h.block.device_type(), 2);
    assert_eq!(h.block.queue_max_sizes(), &[256]);
}

#[test]
fn missing_backing_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nope.img");
    let err = Block::new(&BlockConfig {
        drive_id: "d".into(),
        path_on_host: path.clone(),
        is_read_only: true,
        cache_type: CacheType::Unsafe,
        io_engine: IoEngine::Sync,
        rate_limiter: Default::default(),
    })
    .unwrap_err();
    assert!(matches!(err, Error::OpenFile { .. }));
    let msg = err.to_string();
    assert!(msg.contains("nope.img"), "{msg}");
    assert!(msg.contains("No such file"), "{msg}");

    let err = Block::new(&BlockConfig {
        drive_id: "d".into(),
        path_on_host: dir.path().to_path_buf(),
        is_read_only: true,
        cache_type: CacheType::Unsafe,
        io_engine: IoEngine::Sync,
        rate_limiter: Default::default(),
    })
    .unwrap_err();
    assert!(matches!(err, Error::NotAFile(_)), "{err}");
}

#[test]
fn activation_needs_exactly_queue_zero() {
    let mut h = Harness::inactive(Opts::new(IoEngine::Sync));
    let queue = |h: &Harness| -> Queue { h.q.vq.create_queue().unwrap() };
    let two = vec![
        ActiveQueue {
            index: 0,
            queue: queue(&h),
            notify: EventFd::new(0).unwrap(),
        },
        ActiveQueue {
            index: 1,
            queue: queue(&h),
            notify: EventFd::new(0).unwrap(),
        },
    ];
    let err = h
        .block
        .activate(h.mem.clone(), two, h.interrupt.clone())
        .unwrap_err();
    assert!(matches!(
        err,
        ActivateError::QueueCount {
            expected: 1,
            actual: 2
        }
    ));
    let none = h
        .block
        .activate(h.mem.clone(), Vec::new(), h.interrupt.clone())
        .unwrap_err();
    assert!(matches!(none, ActivateError::QueueCount { actual: 0, .. }));
    assert_eq!(h.block.metrics().activate_fails.count(), 2);
    assert!(!h.block.is_activated());
    // Before activation, processing does nothing.
    h.block.process_queue().unwrap();

    let features = h.block.features();
    h.activate(features);
    assert!(h.block.is_activated());
    let again = h
        .block
        .activate(h.mem.clone(), Vec::new(), h.interrupt.clone())
        .unwrap_err();
    assert!(matches!(again, ActivateError::AlreadyActivated));
}

#[test]
fn reset_stops_processing() {
    for engine in [IoEngine::Sync, IoEngine::Async] {
        let mut h = Harness::new(Opts::new(engine));
        let status = h.rw(0, VIRTIO_BLK_T_IN, 0, DATA, 512);
        assert_eq!(h.complete_one(status), (513, VIRTIO_BLK_S_OK as u8));
        assert!(h.block.reset());
        assert!(!h.block.is_activated());
        assert_eq!(h.block.pending_requests(), 0);
        // A request left in the ring is not touched any more.
        let status = h.rw(1, VIRTIO_BLK_T_IN, 0, DATA2, 512);
        h.block.process_queue().unwrap();
        assert_eq!(h.q.take_used(), vec![]);
        assert_eq!(h.status(status), 0xff);
    }
}

#[test]
fn parse_accepts_any_layout() {
    let mem = new_memory();
    let vq = MockSplitQueue::new(mem, 16);
    let mut hdr = [0u8; 16];
    hdr[..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
    hdr[8..].copy_from_slice(&7u64.to_le_bytes());
    mem.write_slice(&hdr, GuestAddress(HDR)).unwrap();
    // The header split over two descriptors, the status byte merged into
    // the end of the data buffer.
    let chain = vq
        .build_desc_chain(&[
            RawDescriptor::from(SplitDescriptor::new(HDR, 10, 0, 0)),
            RawDescriptor::from(SplitDescriptor::new(HDR + 10, 6, 0, 0)),
            RawDescriptor::from(SplitDescriptor::new(DATA, 1025, W, 0)),
        ])
        .unwrap();
    let request = Request::parse(chain, mem, CAPACITY).unwrap();
    assert_eq!(request.request_type, RequestType::In);
    assert_eq!(request.sector, 7);
    assert_eq!(request.data_len, 1024);
    assert_eq!(request.status_addr, GuestAddress(DATA + 1024));
    assert_eq!(request.data.len(), 1);
}

#[test]
fn parse_reports_where_the_status_goes() {
    let mem = new_memory();
    let vq = MockSplitQueue::new(mem, 16);
    let mut hdr = [0u8; 16];
    hdr[..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
    mem.write_slice(&hdr, GuestAddress(HDR)).unwrap();
    let chain = vq
        .build_desc_chain(&[
            RawDescriptor::from(SplitDescriptor::new(HDR, 16, 0, 0)),
            RawDescriptor::from(SplitDescriptor::new(DATA, 100, 0, 0)),
            RawDescriptor::from(SplitDescriptor::new(STATUS, 1, W, 0)),
        ])
        .unwrap();
    let err = Request::parse(chain, mem, CAPACITY).unwrap_err();
    assert_eq!(err.kind(), &RequestErrorKind::LengthNotSectorMultiple(100));
    assert_eq!(err.status_addr(), Some(GuestAddress(STATUS)));
    assert_eq!(u32::from(err.status()), VIRTIO_BLK_S_IOERR);
    assert_eq!(err.to_string(), "data length 100 is not a multiple of 512");
}

#[test]
fn through_the_mmio_transport() {
    use ember_bus::BusDevice;
    use ember_virtio_mmio::test_utils::{initialize, write_reg};
    use ember_virtio_mmio::{MmioTransport, NOTIFY_REG_OFFSET};

    let image = image(true);
    let block = Arc::new(Mutex::new(
        Block::new(&BlockConfig {
            drive_id: "root".into(),
            path_on_host: image.path().to_path_buf(),
            is_read_only: false,
            cache_type: CacheType::Writeback,
            io_engine: IoEngine::Async,
            rate_limiter: Default::default(),
        })
        .unwrap(),
    ));
    let mem = new_memory();
    let device: Arc<Mutex<dyn VirtioDevice>> = block.clone();
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let mut transport = MmioTransport::new(mem.clone(), device, irq.try_clone().unwrap()).unwrap();

    // Capacity through the config window (offset 0x100).
    let mut capacity = [0u8; 8];
    transport.read(0, 0x100, &mut capacity);
    assert_eq!(u64::from_le_bytes(capacity), CAPACITY);

    let vq = MockSplitQueue::new(mem, 256);
    let features = block.lock().unwrap().features();
    let status = initialize(
        &mut transport,
        features,
        &[QueueLayout {
            size: 256,
            desc: vq.desc_table_addr().raw_value(),
            driver: vq.avail_addr().raw_value(),
            device: vq.used_addr().raw_value(),
        }],
    );
    assert_eq!(status, 0xf);
    assert!(block.lock().unwrap().is_activated());

    // A read, notified through the register (no ioeventfd here).
    let mut hdr = [0u8; 16];
    hdr[..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
    hdr[8..].copy_from_slice(&2u64.to_le_bytes());
    mem.write_slice(&hdr, GuestAddress(HDR)).unwrap();
    let next = VRING_DESC_F_NEXT as u16;
    vq.add_desc_chains(
        &[
            RawDescriptor::from(SplitDescriptor::new(HDR, 16, next, 1)),
            RawDescriptor::from(SplitDescriptor::new(DATA, 512, W | next, 2)),
            RawDescriptor::from(SplitDescriptor::new(STATUS, 1, W, 0)),
        ],
        0,
    )
    .unwrap();
    write_reg(&mut transport, NOTIFY_REG_OFFSET, 0);

    // What the VMM's event loop does.
    let notify = transport.queue_notify_events()[0].try_clone().unwrap();
    assert_eq!(notify.read().unwrap(), 1);
    notify.write(1).unwrap();
    let mut block = block.lock().unwrap();
    block.handle_queue_event().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while block.pending_requests() > 0 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(1));
        block.handle_completion_event().unwrap();
    }
    assert_eq!(vq.used().idx().load(), 1);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 0);
    assert_eq!(
        {
            let mut buf = vec![0u8; 512];
            mem.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
            buf
        },
        pattern(1024, 512)
    );
    // The used-buffer interrupt reached the transport and the irqfd.
    assert_eq!(transport.interrupt_status() & 1, 1);
    assert!(irq.read().is_ok());
    drop(block);

    // A reset through the transport stops the device.
    write_reg(&mut transport, 0x70, 0);
    assert_eq!(transport.device_status(), 0);
    assert!(!transport.is_activated());
}

#[test]
fn queue_index_past_the_ring_size_is_an_error_not_a_hang() {
    let mut h = Harness::new(Opts::new(IoEngine::Sync));
    // The driver claims 1000 new entries in a 256-entry ring.
    h.q.vq.avail().idx().store(1000);
    let err = h.block.process_queue().unwrap_err();
    assert!(matches!(err, Error::Queue(_)), "{err}");
    assert_eq!(h.q.take_used(), vec![]);
    assert_eq!(h.block.metrics().event_fails.count(), 1);
}

#[test]
fn handle_queue_event_clears_the_notify_eventfd() {
    let mut h = Harness::new(Opts::new(IoEngine::Sync));
    let status = h.rw(0, VIRTIO_BLK_T_IN, 0, DATA, 512);
    let notify = h.block.queue_event().unwrap().try_clone().unwrap();
    notify.write(1).unwrap();
    h.block.handle_queue_event().unwrap();
    assert!(notify.read().is_err(), "notify EventFd still signalled");
    assert_eq!(h.status(status), VIRTIO_BLK_S_OK as u8);
    assert_eq!(h.block.metrics().queue_event_count.count(), 1);
    // A queue event with nothing to do is counted as such.
    h.block.handle_queue_event().unwrap();
    assert_eq!(h.block.metrics().no_avail_buffer.count(), 1);
}

#[test]
fn runs_from_an_event_loop_through_activation_and_reset() {
    use ember_virtio_mmio::test_utils::{initialize, write_reg};
    use ember_virtio_mmio::{MmioTransport, NOTIFY_REG_OFFSET};
    use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};

    let image = image(true);
    let block = Arc::new(Mutex::new(
        Block::new(&BlockConfig {
            drive_id: "evl".into(),
            path_on_host: image.path().to_path_buf(),
            is_read_only: false,
            cache_type: CacheType::Unsafe,
            io_engine: IoEngine::Sync,
            rate_limiter: Default::default(),
        })
        .unwrap(),
    ));
    let mut events = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
    // Added before the driver starts the device, as the VMM does.
    events.add_subscriber(block.clone());
    let mem = new_memory();
    let device: Arc<Mutex<dyn VirtioDevice>> = block.clone();
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let mut transport = MmioTransport::new(mem.clone(), device, irq.try_clone().unwrap()).unwrap();
    let vq = MockSplitQueue::new(mem, 256);
    let features = block.lock().unwrap().features();
    let layout = QueueLayout {
        size: 256,
        desc: vq.desc_table_addr().raw_value(),
        driver: vq.avail_addr().raw_value(),
        device: vq.used_addr().raw_value(),
    };
    assert_eq!(initialize(&mut transport, features, &[layout]), 0xf);

    let read_at = |sector: u64, head: u16| {
        let mut hdr = [0u8; 16];
        hdr[..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
        hdr[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&hdr, GuestAddress(HDR)).unwrap();
        let next = VRING_DESC_F_NEXT as u16;
        vq.add_desc_chains(
            &[
                RawDescriptor::from(SplitDescriptor::new(HDR, 16, next, head + 1)),
                RawDescriptor::from(SplitDescriptor::new(DATA, 512, W | next, head + 2)),
                RawDescriptor::from(SplitDescriptor::new(STATUS, 1, W, 0)),
            ],
            head,
        )
        .unwrap();
    };
    // A kick before the event loop has seen the activation is kept.
    read_at(2, 0);
    write_reg(&mut transport, NOTIFY_REG_OFFSET, 0);
    for _ in 0..3 {
        events.run_with_timeout(100).unwrap();
        if vq.used().idx().load() == 1 {
            break;
        }
    }
    assert_eq!(vq.used().idx().load(), 1);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 0);
    assert_eq!(transport.interrupt_status() & 1, 1);
    assert!(irq.read().is_ok());
    assert_eq!(block.lock().unwrap().metrics().queue_event_count.count(), 1);

    // After a reset the event loop stops watching the queue: a kick on the
    // old EventFd is not processed.
    let notify = transport.queue_notify_events()[0].try_clone().unwrap();
    write_reg(&mut transport, 0x70, 0);
    assert!(!block.lock().unwrap().is_activated());
    events.run_with_timeout(100).unwrap();
    notify.write(1).unwrap();
    events.run_with_timeout(50).unwrap();
    assert_eq!(block.lock().unwrap().metrics().queue_event_count.count(), 1);
}

#[test]
fn event_idx_suppresses_interrupts_and_publishes_avail_event() {
    use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
    use virtio_queue::QueueT;

    let mut h = Harness::inactive(Opts::new(IoEngine::Sync));
    let features = h.block.features();
    assert_ne!(features & (1 << VIRTIO_RING_F_EVENT_IDX), 0);
    h.block.ack_features(features);
    let mut queue: Queue = h.q.vq.create_queue().unwrap();
    // What the transport does when the driver accepted EVENT_IDX.
    queue.set_event_idx(true);
    h.block
        .activate(
            h.mem.clone(),
            vec![ActiveQueue {
                index: 0,
                queue,
                notify: EventFd::new(EFD_NONBLOCK).unwrap(),
            }],
            h.interrupt.clone(),
        )
        .unwrap();
    // used_event (after the 256 ring entries of the available ring) = 1:
    // the driver wants an interrupt once the used index passes 1.
    let used_event = GuestAddress(h.q.vq.avail_addr().raw_value() + 4 + 2 * 256);
    let avail_event = GuestAddress(h.q.vq.used_addr().raw_value() + 4 + 8 * 256);
    h.mem.write_obj(1u16.to_le(), used_event).unwrap();

    h.rw(0, VIRTIO_BLK_T_IN, 0, DATA, 512);
    h.block.process_queue().unwrap();
    assert_eq!(h.q.take_used().len(), 1);
    // Used index 0 -> 1 does not pass used_event 1: no interrupt.
    assert_eq!(h.interrupt.vring_count(), 0);
    // The device published how far it read: kick me at avail index 1.
    assert_eq!(u16::from_le(h.mem.read_obj(avail_event).unwrap()), 1);

    h.rw(1, VIRTIO_BLK_T_IN, 0, DATA, 512);
    h.block.process_queue().unwrap();
    assert_eq!(h.q.take_used().len(), 1);
    // 1 -> 2 passes used_event 1.
    assert_eq!(h.interrupt.vring_count(), 1);
    assert_eq!(u16::from_le(h.mem.read_obj(avail_event).unwrap()), 2);
}

/// Activates `h` with its block device's features as they stand (after a
/// restore), as the transport does.
fn activate_as_restored(h: &mut Harness) {
    let queue: Queue = h.q.vq.create_queue().unwrap();
    h.block
        .activate(
            h.mem.clone(),
            vec![ActiveQueue {
                index: 0,
                queue,
                notify: EventFd::new(EFD_NONBLOCK).unwrap(),
            }],
            h.interrupt.clone(),
        )
        .unwrap();
}

#[test]
fn state_round_trip() {
    let mut h = Harness::inactive(Opts::new(IoEngine::Sync));
    // The driver took discard but not write-zeroes.
    let accepted = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_BLK_F_DISCARD);
    h.block.ack_features(accepted);
    let saved = Persist::save(&h.block);
    assert_eq!(saved.acked_features, accepted);
    assert_eq!(saved.capacity, CAPACITY);
    let text = serde_json::to_string(&saved).unwrap();
    let state: crate::BlockState = serde_json::from_str(&text).unwrap();

    let mut fresh = Harness::inactive(Opts::new(IoEngine::Sync));
    Persist::restore(&mut fresh.block, &state).unwrap();
    assert_eq!(fresh.block.save(), saved);
    assert_eq!(fresh.block.features(), h.block.features());
    let config = |block: &Block| {
        let mut space = vec![0u8; block.config_size() as usize];
        block.read_config(0, &mut space);
        space
    };
    assert_eq!(config(&fresh.block), config(&h.block));

    // The restored device serves what was negotiated, and only that.
    activate_as_restored(&mut h);
    activate_as_restored(&mut fresh);
    for h in [&mut h, &mut fresh] {
        let status = h.ranged(0, VIRTIO_BLK_T_DISCARD, 0, 8, 0);
        assert_eq!(h.complete_one(status), (1, VIRTIO_BLK_S_OK as u8));
        let status = h.ranged(1, VIRTIO_BLK_T_WRITE_ZEROES, 0, 8, 0);
        assert_eq!(h.complete_one(status), (1, VIRTIO_BLK_S_UNSUPP as u8));
    }
}

#[test]
fn hostile_states_are_refused() {
    use crate::{BlockState, BlockStateError};

    let mut h = Harness::inactive(Opts::new(IoEngine::Sync));
    let good = h.block.save();
    let version_1 = 1u64 << VIRTIO_F_VERSION_1;

    let unoffered = BlockState {
        acked_features: version_1 | (1 << 60),
        ..good.clone()
    };
    let offered = h.block.features();
    assert!(matches!(
        h.block.restore(&unoffered),
        Err(BlockStateError::Features { acked, offered: o })
            if acked == version_1 | (1 << 60) && o == offered
    ));
    let legacy = BlockState {
        acked_features: 1 << VIRTIO_BLK_F_DISCARD,
        ..good.clone()
    };
    assert!(matches!(
        h.block.restore(&legacy),
        Err(BlockStateError::Features { .. })
    ));
    let bigger = BlockState {
        capacity: CAPACITY + 1,
        ..good.clone()
    };
    assert!(matches!(
        h.block.restore(&bigger),
        Err(BlockStateError::Capacity { state, device })
            if state == CAPACITY + 1 && device == CAPACITY
    ));
    let read_only = BlockState {
        read_only: true,
        ..good.clone()
    };
    assert!(matches!(
        h.block.restore(&read_only),
        Err(BlockStateError::ReadOnly {
            state: true,
            device: false
        })
    ));
    let other_drive = BlockState {
        drive_id: "rootfs".into(),
        ..good.clone()
    };
    assert!(matches!(
        h.block.restore(&other_drive),
        Err(BlockStateError::DriveId { .. })
    ));
    // A read-only drive does not offer discard: a state accepting it is
    // refused there.
    let mut ro = Harness::inactive(Opts {
        read_only: true,
        ..Opts::new(IoEngine::Sync)
    });
    let discard = BlockState {
        acked_features: version_1 | (1 << VIRTIO_BLK_F_DISCARD),
        read_only: true,
        ..good.clone()
    };
    assert!(matches!(
        ro.block.restore(&discard),
        Err(BlockStateError::Features { .. })
    ));
    assert_eq!(h.block.save(), good, "a refused state changed the device");

    // A running device is not restored into.
    h.activate(h.block.features());
    assert!(matches!(
        h.block.restore(&good),
        Err(BlockStateError::InUse)
    ));
}
