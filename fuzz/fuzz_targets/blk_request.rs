// SPDX-License-Identifier: Apache-2.0

//! Fuzzes virtio-blk request handling: `ember_virtio_blk::Request::parse` on
//! every descriptor chain of an arbitrary split virtqueue, and a whole
//! `ember_virtio_blk::Block` (sync engine, on a small file) processing that
//! queue through `process_queue`, the call the VMM makes on a notification.
//!
//! Guest memory has two regions with a hole between them. The descriptor
//! table, available ring and buffer contents come from the input; the rings
//! are laid out as virtio 1.2 §2.7 says (descriptor table 16 * N bytes at 0,
//! available ring at 0x1000, used ring at 0x1400).
//!
//! Parsing is checked against a model written from virtio 1.2 §5.2.6 over
//! the descriptors virtio-queue yields: a chain longer than the device
//! takes (seg_max + 2) is refused, with its status byte or without; a chain
//! without a device-writable last byte has no status; otherwise a request is
//! accepted exactly when no rule is broken, with the same type, sector, data buffers (as byte ranges),
//! ranges and status address, and a rejection names one of the rules the
//! model found broken.
//!
//! The device is checked for: no panic and no hang (descriptor loops
//! included); its backing file never changes size, and a read-only device
//! never changes it at all; a published count larger than the queue makes it
//! fail without touching memory. When nothing the device writes (status
//! bytes, read data, the used ring) overlaps anything it reads (rings,
//! indirect tables, device-readable buffers), its behaviour is fully
//! predictable, and then: the used ring holds exactly the posted heads (in
//! order, with the right lengths); guest memory outside the used ring equals
//! the model's (status bytes and read data where they belong, nothing
//! elsewhere); the file holds what the model wrote; one interrupt at most.
//!
//! Input format (little-endian; missing bytes read as 0):
//! - `cfg: u8`: bits 0-3 log2 of the queue size (at most 8), bit 4 use the
//!   read-only device, bit 5 read `avail_idx` instead of using the number of
//!   heads, bit 6 accept VIRTIO_BLK_F_DISCARD, bit 7 accept
//!   VIRTIO_BLK_F_WRITE_ZEROES;
//! - `cap: u8`: the disk size given to the standalone `parse` calls: bits
//!   6-7 select the device's own, `cap & 63`, `u64::MAX - (cap & 63)` or the
//!   largest size in bytes that fits a u64;
//! - `avail_idx: u16` (only with cfg bit 5);
//! - `ndesc: u8` (at most N), then `ndesc` descriptors of 13 bytes: `sel:
//!   u8`, `addr: u32`, `len: u32`, `flags: u16`, `next: u16`. `sel & 3`
//!   places the buffer: 0 in the first data area (`DATA1 + addr %
//!   DATA1_LEN`), 1 in the second region (`REGION2 + addr % REGION2_LEN`), 2
//!   at `addr`, 3 at `addr << 16`; `sel & 4` takes `len` modulo 0x1000;
//! - `navail: u8`, then `navail` heads (`u16`);
//! - the rest: contents of the first data area, then of the second region.

#![no_main]

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use ember_virtio::{ActiveQueue, VirtioDevice};
use ember_virtio_blk::{
    Block, BlockConfig, CacheType, IoEngine, Request, RequestError, RequestErrorKind, RequestType,
    SectorRange, Segment, MAX_DESCRIPTORS, MAX_DISCARD_SECTORS, MAX_DISCARD_SEG,
    MAX_WRITE_ZEROES_SECTORS, MAX_WRITE_ZEROES_SEG,
};
use libfuzzer_sys::fuzz_target;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, QueueOwnedT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

#[path = "common/virtq.rs"]
#[allow(dead_code)]
mod virtq;
use virtq::{
    make_queue, CountingInterrupt, Ranges, Reader, AVAIL, DATA1, DESC, USED, VRING_DESC_F_INDIRECT,
};

const REGION1_LEN: u64 = 0x1_0000;
const DATA1_LEN: u64 = REGION1_LEN - DATA1;
const REGION2: u64 = 0x2_0000;
const REGION2_LEN: u64 = 0x1_0000;
const REGIONS: [(u64, u64); 2] = [(0, REGION1_LEN), (REGION2, REGION2_LEN)];

/// Backing files: 64 sectors and a partial one, which the guest never sees.
const SECTORS: u64 = 64;
const FILE_LEN: usize = SECTORS as usize * 512 + 200;
const DRIVE_ID: &str = "fuzz-drive-id-longer-than-twenty-bytes";

// virtio 1.2 §5.2.3, §5.2.6.
const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const VIRTIO_BLK_F_DISCARD: u64 = 1 << 13;
const VIRTIO_BLK_F_WRITE_ZEROES: u64 = 1 << 14;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;
const WRITE_ZEROES_FLAG_UNMAP: u32 = 1;
const ID_BYTES: usize = 20;

/// Contents of both backing files at the start of every input.
fn pattern() -> Vec<u8> {
    (0..FILE_LEN)
        .map(|i| (i as u8).wrapping_mul(7) ^ (i >> 9) as u8 ^ 0x5a)
        .collect()
}

struct Disks {
    rw: Block,
    rw_file: File,
    ro: Block,
    ro_file: File,
    /// `pattern()`, computed once.
    pattern: Vec<u8>,
    /// Whether hole punching works where the files live (a discard then
    /// reads back as zeroes; otherwise it does nothing).
    discard_zeroes: bool,
}

fn scratch_dir() -> PathBuf {
    let shm = PathBuf::from("/dev/shm");
    if shm.is_dir() {
        shm
    } else {
        std::env::temp_dir()
    }
}

/// Creates a file holding `pattern()` and a device on it; the name is
/// removed at once (the descriptors keep the file).
fn disk(name: &str, read_only: bool, cache_type: CacheType) -> (Block, File) {
    let path = scratch_dir().join(format!("ember-fuzz-blk-{}-{name}", std::process::id()));
    std::fs::write(&path, pattern()).expect("create the backing file");
    let block = Block::new(&BlockConfig {
        drive_id: DRIVE_ID.to_string(),
        path_on_host: path.clone(),
        is_read_only: read_only,
        cache_type,
        io_engine: IoEngine::Sync,
        rate_limiter: Default::default(),
    })
    .expect("block device");
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .expect("open the backing file");
    std::fs::remove_file(&path).expect("unlink the backing file");
    assert_eq!(block.capacity(), SECTORS);
    (block, file)
}

fn punch_hole_works() -> bool {
    let path = scratch_dir().join(format!("ember-fuzz-blk-{}-probe", std::process::id()));
    let Ok(file) = File::create(&path) else {
        return false;
    };
    let _ = std::fs::remove_file(&path);
    if file.write_all_at(&[1u8; 8192], 0).is_err() {
        return false;
    }
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: fallocate takes scalars and a descriptor that `file` owns.
    unsafe { libc::fallocate(file.as_raw_fd(), mode, 100, 1000) == 0 }
}

fn set_up() -> Disks {
    let (rw, rw_file) = disk("rw", false, CacheType::Writeback);
    let (ro, ro_file) = disk("ro", true, CacheType::Unsafe);
    Disks {
        rw,
        rw_file,
        ro,
        ro_file,
        pattern: pattern(),
        discard_zeroes: punch_hole_works(),
    }
}

/// Whether `len` bytes at `addr` are guest memory. As in vm-memory, an
/// empty range is, wherever it is (it is never accessed).
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

/// Byte ranges `(addr, len)` with empty ones dropped and contiguous ones
/// merged: two segment lists cover the same bytes in the same order iff
/// their normal forms are equal.
fn normalize(segments: impl IntoIterator<Item = (u64, u64)>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (addr, len) in segments {
        if len == 0 {
            continue;
        }
        match out.last_mut() {
            Some(last) if last.0 + last.1 == addr => last.1 += len,
            _ => out.push((addr, len)),
        }
    }
    out
}

/// `n` bytes starting `skip` bytes into the stream formed by `segments`
/// (all inside guest memory, holding at least `skip + n` bytes).
fn stream_bytes(mem: &GuestMemoryMmap, segments: &[(u64, u64)], skip: u64, n: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(n);
    let mut pos = 0u64;
    for &(addr, len) in segments {
        if out.len() == n {
            break;
        }
        let end = pos + len;
        if end > skip {
            let from = skip.saturating_sub(pos);
            let take = (len - from).min((n - out.len()) as u64) as usize;
            let mut buf = vec![0u8; take];
            mem.read_slice(&mut buf, GuestAddress(addr + from))
                .expect("model read inside guest memory");
            out.extend_from_slice(&buf);
        }
        pos = end;
    }
    assert_eq!(out.len(), n, "stream shorter than the model assumed");
    out
}

/// The segments after dropping the first `skip` bytes.
fn skip_front(segments: &[(u64, u64)], mut skip: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for &(addr, len) in segments {
        if skip >= len {
            skip -= len;
        } else {
            out.push((addr + skip, len - skip));
            skip = 0;
        }
    }
    out
}

/// The segments without their last byte.
fn drop_last_byte(segments: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = segments.iter().copied().filter(|s| s.1 > 0).collect();
    if let Some(last) = out.last_mut() {
        last.1 -= 1;
    }
    out
}

/// What the model says about one chain.
#[derive(Debug)]
enum Expect {
    /// No status byte: rejected, nowhere to report it.
    NoStatus,
    /// More descriptors than the device takes: rejected, with the last
    /// descriptor's status byte (if it has one) or none (a device may stop
    /// walking a chain once it is too long to be valid).
    TooLong { status_addr: Option<u64> },
    /// Rejected for one of `reasons`, reported at `status_addr`.
    Reject {
        status_addr: u64,
        reasons: Vec<RequestErrorKind>,
    },
    /// Accepted.
    Accept(Request),
}

fn sectors_ok(sector: u64, count: u64, capacity: u64) -> bool {
    sector.checked_add(count).is_some_and(|end| end <= capacity)
}

/// virtio 1.2 §5.2.6 over the descriptors of one chain, for a disk of
/// `capacity` sectors. The request is two byte streams (VIRTIO_F_ANY_LAYOUT,
/// §2.7.4): the device-readable descriptors hold the 16-byte header and any
/// data for the device; the device-writable ones hold any data for the
/// driver and end with the status byte. The limits are the ones the device
/// advertises (seg_max, max_discard_seg, ...).
fn model(mem: &GuestMemoryMmap, descs: &[Descriptor], capacity: u64) -> Expect {
    let status = descs.last().and_then(|d| {
        let (addr, len) = (d.addr().0, u64::from(d.len()));
        (d.is_write_only() && len > 0 && inside(addr, len)).then(|| addr + len - 1)
    });
    if descs.len() > MAX_DESCRIPTORS {
        return Expect::TooLong {
            status_addr: status,
        };
    }
    let Some(status_addr) = status else {
        return Expect::NoStatus;
    };
    let reject = |reasons: Vec<RequestErrorKind>| Expect::Reject {
        status_addr,
        reasons,
    };

    // Structure: every buffer in guest memory, device-readable ones first
    // (§2.7.4.2).
    let mut reasons = Vec::new();
    let mut seen_writable = false;
    let (mut readable, mut writable) = (Vec::new(), Vec::new());
    for (index, d) in descs.iter().enumerate() {
        let (addr, len) = (d.addr().0, d.len());
        if !inside(addr, u64::from(len)) {
            reasons.push(RequestErrorKind::OutOfGuestMemory { addr, len });
        }
        if d.is_write_only() {
            seen_writable = true;
            writable.push((addr, u64::from(len)));
        } else {
            if seen_writable {
                reasons.push(RequestErrorKind::ReadableAfterWritable { index });
            }
            readable.push((addr, u64::from(len)));
        }
    }
    if !reasons.is_empty() {
        return reject(reasons);
    }

    let readable_len: u64 = readable.iter().map(|s| s.1).sum();
    let writable_len: u64 = writable.iter().map(|s| s.1).sum();
    if readable_len < 16 {
        return reject(vec![RequestErrorKind::HeaderTooShort(readable_len as u32)]);
    }
    let out_len = readable_len - 16;
    let in_len = writable_len - 1;
    let (Ok(out_len), Ok(in_len)) = (u32::try_from(out_len), u32::try_from(in_len)) else {
        return reject(vec![RequestErrorKind::DataTooLong]);
    };
    // struct virtio_blk_req: le32 type, le32 reserved, le64 sector.
    let header = stream_bytes(mem, &readable, 0, 16);
    let request_type = u32::from_le_bytes(header[0..4].try_into().unwrap());
    let sector = u64::from_le_bytes(header[8..16].try_into().unwrap());
    let out_data = skip_front(&readable, 16);
    let in_data = drop_last_byte(&writable);

    let mut request = Request {
        request_type: RequestType::Flush,
        sector,
        data: Vec::new(),
        data_len: 0,
        ranges: Vec::new(),
        status_addr: GuestAddress(status_addr),
    };
    let mut reasons = Vec::new();
    match request_type {
        T_IN | T_OUT => {
            let (kind, data, len, other) = if request_type == T_IN {
                (RequestType::In, in_data, in_len, out_len)
            } else {
                (RequestType::Out, out_data, out_len, in_len)
            };
            if other != 0 {
                reasons.push(RequestErrorKind::WrongDirection(kind));
            }
            if len == 0 {
                reasons.push(RequestErrorKind::MissingData(kind));
            }
            // §5.2.6.1: reads and writes are whole sectors.
            if len % 512 != 0 {
                reasons.push(RequestErrorKind::LengthNotSectorMultiple(len));
            }
            let count = u64::from(len / 512);
            if !sectors_ok(sector, count, capacity) {
                reasons.push(RequestErrorKind::SectorOutOfRange {
                    sector,
                    count,
                    capacity,
                });
            }
            request.request_type = kind;
            request.data = to_segments(&data);
            request.data_len = len;
        }
        T_FLUSH => {}
        T_GET_ID => {
            if out_len != 0 {
                reasons.push(RequestErrorKind::WrongDirection(RequestType::GetId));
            }
            if (in_len as usize) < ID_BYTES {
                reasons.push(RequestErrorKind::IdBufferTooShort(in_len));
            }
            request.request_type = RequestType::GetId;
            request.data = to_segments(&in_data);
            request.data_len = in_len;
        }
        T_DISCARD | T_WRITE_ZEROES => {
            let discard = request_type == T_DISCARD;
            let (kind, max_seg, max_sectors, known_flags) = if discard {
                (
                    RequestType::Discard,
                    MAX_DISCARD_SEG,
                    MAX_DISCARD_SECTORS,
                    0,
                )
            } else {
                (
                    RequestType::WriteZeroes,
                    MAX_WRITE_ZEROES_SEG,
                    MAX_WRITE_ZEROES_SECTORS,
                    WRITE_ZEROES_FLAG_UNMAP,
                )
            };
            if in_len != 0 {
                reasons.push(RequestErrorKind::WrongDirection(kind));
            }
            // struct virtio_blk_discard_write_zeroes: le64 sector, le32
            // num_sectors, le32 flags.
            if out_len == 0 || out_len % 16 != 0 {
                reasons.push(RequestErrorKind::RangeLength(out_len));
            } else {
                let count = out_len / 16;
                if count > max_seg {
                    reasons.push(RequestErrorKind::TooManyRanges {
                        count,
                        max: max_seg,
                    });
                }
                for i in 0..u64::from(count.min(max_seg)) {
                    let raw = stream_bytes(mem, &readable, 16 + 16 * i, 16);
                    let range_sector = u64::from_le_bytes(raw[0..8].try_into().unwrap());
                    let num_sectors = u32::from_le_bytes(raw[8..12].try_into().unwrap());
                    let flags = u32::from_le_bytes(raw[12..16].try_into().unwrap());
                    // §5.2.6.2: unknown flags, and unmap on a discard, are
                    // unsupported.
                    if flags & !known_flags != 0 {
                        reasons.push(RequestErrorKind::UnsupportedFlags(flags));
                    }
                    if num_sectors > max_sectors {
                        reasons.push(RequestErrorKind::RangeTooLarge {
                            num_sectors,
                            max: max_sectors,
                        });
                    }
                    if !sectors_ok(range_sector, u64::from(num_sectors), capacity) {
                        reasons.push(RequestErrorKind::SectorOutOfRange {
                            sector: range_sector,
                            count: u64::from(num_sectors),
                            capacity,
                        });
                    }
                    request.ranges.push(SectorRange {
                        sector: range_sector,
                        num_sectors,
                        unmap: flags & WRITE_ZEROES_FLAG_UNMAP != 0,
                    });
                }
            }
            request.request_type = kind;
        }
        other => reasons.push(RequestErrorKind::UnsupportedType(other)),
    }
    if reasons.is_empty() {
        Expect::Accept(request)
    } else {
        reject(reasons)
    }
}

fn to_segments(ranges: &[(u64, u64)]) -> Vec<Segment> {
    ranges
        .iter()
        .map(|&(addr, len)| Segment {
            addr: GuestAddress(addr),
            len: len as u32,
        })
        .collect()
}

fn normal_data(data: &[Segment]) -> Vec<(u64, u64)> {
    normalize(data.iter().map(|s| (s.addr.0, u64::from(s.len))))
}

/// Parses `chain` and checks the result against the model.
fn check_parse(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    descs: &[Descriptor],
    capacity: u64,
) -> Result<Request, RequestError> {
    let got = Request::parse(chain, mem, capacity);
    let want = model(mem, descs, capacity);
    match (&want, &got) {
        (Expect::NoStatus, Err(e)) => {
            assert_eq!(e.kind(), &RequestErrorKind::MissingStatus);
            assert_eq!(e.status_addr(), None);
        }
        (Expect::TooLong { status_addr }, Err(e)) => match e.kind() {
            RequestErrorKind::MissingStatus => assert_eq!(e.status_addr(), None),
            RequestErrorKind::TooManyDescriptors { count } => {
                assert!(*count > MAX_DESCRIPTORS, "{count} descriptors are too many");
                if let Some(addr) = e.status_addr() {
                    assert_eq!(Some(addr.0), *status_addr, "status of a long chain");
                }
            }
            other => panic!(
                "a chain of {} descriptors rejected for {other:?}",
                descs.len()
            ),
        },
        (
            Expect::Reject {
                status_addr,
                reasons,
            },
            Err(e),
        ) => {
            assert!(
                reasons.contains(e.kind()),
                "rejected for {:?}, the model found {reasons:?} ({descs:?})",
                e.kind()
            );
            assert_eq!(e.status_addr(), Some(GuestAddress(*status_addr)));
            let unsupported = matches!(
                e.kind(),
                RequestErrorKind::UnsupportedType(_) | RequestErrorKind::UnsupportedFlags(_)
            );
            assert_eq!(e.status(), if unsupported { S_UNSUPP } else { S_IOERR });
        }
        (Expect::Accept(want), Ok(got)) => {
            assert_eq!(
                (want.request_type, want.sector, want.data_len, &want.ranges),
                (got.request_type, got.sector, got.data_len, &got.ranges),
                "accepted request ({descs:?})"
            );
            assert_eq!(want.status_addr, got.status_addr, "status address");
            assert_eq!(
                normal_data(&want.data),
                normal_data(&got.data),
                "data buffers"
            );
            let total: u64 = got.data.iter().map(|s| u64::from(s.len)).sum();
            assert_eq!(total, u64::from(got.data_len), "data_len");
            for s in &got.data {
                assert!(
                    inside(s.addr.0, u64::from(s.len)),
                    "data outside memory: {s:?}"
                );
            }
        }
        _ => panic!("model: {want:?}, parse: {got:?} ({descs:?})"),
    }
    got
}

/// A copy of guest memory the model writes to.
struct Shadow(Vec<Vec<u8>>);

impl Shadow {
    fn new() -> Shadow {
        Shadow(
            REGIONS
                .iter()
                .map(|&(_, len)| vec![0u8; len as usize])
                .collect(),
        )
    }

    /// Copies guest memory in (the buffers are reused: fresh allocations
    /// of this size cost page faults on every input).
    fn load(&mut self, mem: &GuestMemoryMmap) {
        for (buf, &(base, _)) in self.0.iter_mut().zip(&REGIONS) {
            mem.read_slice(buf, GuestAddress(base)).unwrap();
        }
    }

    fn slot(&mut self, addr: u64) -> &mut u8 {
        for (i, &(base, len)) in REGIONS.iter().enumerate() {
            if addr >= base && addr < base + len {
                return &mut self.0[i][(addr - base) as usize];
            }
        }
        panic!("model access outside guest memory at {addr:#x}");
    }

    fn write(&mut self, segments: &[Segment], mut data: &[u8]) {
        for s in segments {
            for i in 0..u64::from(s.len) {
                let Some((&b, rest)) = data.split_first() else {
                    return;
                };
                *self.slot(s.addr.0 + i) = b;
                data = rest;
            }
        }
    }

    fn read(&mut self, segments: &[Segment]) -> Vec<u8> {
        let mut out = Vec::new();
        for s in segments {
            for i in 0..u64::from(s.len) {
                out.push(*self.slot(s.addr.0 + i));
            }
        }
        out
    }
}

/// Everything that lives across inputs.
struct Host {
    disks: Disks,
    mem: GuestMemoryMmap,
    zeroes: Vec<u8>,
    /// Guest memory as the model expects it, and as the device left it.
    expected: Shadow,
    actual: Shadow,
    /// The file as the model expects it, and as read back.
    file: Vec<u8>,
    contents: Vec<u8>,
}

fn set_up_host() -> Host {
    let ranges: Vec<(GuestAddress, usize)> = REGIONS
        .iter()
        .map(|&(base, len)| (GuestAddress(base), len as usize))
        .collect();
    Host {
        disks: set_up(),
        mem: GuestMemoryMmap::from_ranges(&ranges).expect("guest memory"),
        zeroes: vec![0u8; REGION1_LEN.max(REGION2_LEN) as usize],
        expected: Shadow::new(),
        actual: Shadow::new(),
        file: vec![0u8; FILE_LEN],
        contents: vec![0u8; FILE_LEN + 1],
    }
}

fn read_desc(mem: &GuestMemoryMmap, index: u16) -> (u64, u32, u16) {
    let addr = DESC + 16 * u64::from(index);
    (
        mem.read_obj(GuestAddress(addr)).unwrap(),
        mem.read_obj(GuestAddress(addr + 8)).unwrap(),
        mem.read_obj(GuestAddress(addr + 12)).unwrap(),
    )
}

static HOST: Mutex<Option<Host>> = Mutex::new(None);

fuzz_target!(|data: &[u8]| {
    let mut guard = HOST.lock().unwrap_or_else(|e| e.into_inner());
    let host = guard.get_or_insert_with(set_up_host);
    let Host {
        disks,
        mem,
        zeroes,
        expected: shadow,
        actual,
        file,
        contents,
    } = host;
    let mem = &*mem;

    let mut input = Reader(data);
    let cfg = input.u8();
    let size = 1u16 << (cfg & 0xf).min(8);
    let read_only = cfg & 0x10 != 0;
    let mut features = VIRTIO_F_VERSION_1;
    if cfg & 0x40 != 0 {
        features |= VIRTIO_BLK_F_DISCARD;
    }
    if cfg & 0x80 != 0 {
        features |= VIRTIO_BLK_F_WRITE_ZEROES;
    }
    let cap = input.u8();
    let parse_capacity = match cap >> 6 {
        0 => SECTORS,
        1 => u64::from(cap & 63),
        2 => u64::MAX - u64::from(cap & 63),
        _ => u64::MAX >> 9,
    };
    let avail_override = (cfg & 0x20 != 0).then(|| input.u16());

    // Fresh memory for every input.
    for &(base, len) in &REGIONS {
        mem.write_slice(&zeroes[..len as usize], GuestAddress(base))
            .unwrap();
    }
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
    let rest = input.0;
    let (data1, data2) = rest.split_at(rest.len().min(DATA1_LEN as usize));
    mem.write_slice(data1, GuestAddress(DATA1)).unwrap();
    let data2 = &data2[..data2.len().min(REGION2_LEN as usize)];
    mem.write_slice(data2, GuestAddress(REGION2)).unwrap();

    // What the device reads (rings, indirect tables, device-readable
    // buffers) and writes (used ring, status bytes, read data).
    let (mut reads, mut writes) = (Ranges::default(), Ranges::default());
    reads.add(DESC, 16 * u64::from(size));
    reads.add(AVAIL, 6 + 2 * u64::from(size));
    writes.add(USED, 6 + 8 * u64::from(size));
    for i in 0..size {
        let (addr, len, flags) = read_desc(mem, i);
        if flags & VRING_DESC_F_INDIRECT != 0 {
            reads.add(addr, u64::from(len));
        }
    }

    // Every published chain, parsed on memory as the driver left it, with
    // the input's disk size and with the device's. A head posted twice is
    // the same chain: parse it once.
    let mut parsed: HashMap<u16, Result<Request, RequestError>> = HashMap::new();
    let mut pre = make_queue(size, 0);
    let heads: Option<Vec<u16>> = pre.iter(mem).ok().map(|iter| {
        iter.map(|chain| {
            let head = chain.head_index();
            if parsed.contains_key(&head) {
                return head;
            }
            let descs: Vec<Descriptor> = chain.clone().collect();
            // virtio-queue ends a chain after N descriptors, or after the
            // entries of one indirect table: descriptor loops end.
            assert!(
                descs.len() <= usize::from(u16::MAX),
                "chain of {}",
                descs.len()
            );
            if parse_capacity != SECTORS {
                let _ = check_parse(chain.clone(), mem, &descs, parse_capacity);
            }
            parsed.insert(head, check_parse(chain, mem, &descs, SECTORS));
            for d in descs.iter().filter(|d| !d.is_write_only()) {
                reads.add(d.addr().0, u64::from(d.len()));
            }
            head
        })
        .collect()
    });
    assert_eq!(heads.is_none(), avail_idx > size, "published count check");

    // What the device should do, in order.
    shadow.load(mem);
    file.copy_from_slice(&disks.pattern);
    let mut file_exact = true;
    let mut expected_used: Vec<(u32, u32)> = Vec::new();
    let mut parse_errors = 0u64;
    let mut drive_id = [0u8; ID_BYTES];
    for (dst, src) in drive_id.iter_mut().zip(DRIVE_ID.bytes()) {
        *dst = src;
    }
    for head in heads.iter().flatten() {
        let (status, used_len) = match &parsed[head] {
            Err(e) => {
                parse_errors += 1;
                match e.status_addr() {
                    Some(addr) => (Some((addr, e.status())), 1),
                    None => (None, 0),
                }
            }
            Ok(r) => {
                let at = |sector: u64| (sector * 512) as usize;
                let ack_discard = features & VIRTIO_BLK_F_DISCARD != 0 && !read_only;
                let ack_wz = features & VIRTIO_BLK_F_WRITE_ZEROES != 0 && !read_only;
                let (status, to_guest) = match r.request_type {
                    // §5.2.6.2: a read-only device fails every write.
                    RequestType::Out | RequestType::Discard | RequestType::WriteZeroes
                        if read_only =>
                    {
                        (S_IOERR, 0)
                    }
                    RequestType::Discard if !ack_discard => (S_UNSUPP, 0),
                    RequestType::WriteZeroes if !ack_wz => (S_UNSUPP, 0),
                    RequestType::In => {
                        let from = at(r.sector);
                        shadow.write(&r.data, &file[from..from + r.data_len as usize]);
                        for s in &r.data {
                            writes.add(s.addr.0, u64::from(s.len));
                        }
                        (S_OK, r.data_len)
                    }
                    RequestType::Out => {
                        let bytes = shadow.read(&r.data);
                        let from = at(r.sector);
                        file[from..from + bytes.len()].copy_from_slice(&bytes);
                        (S_OK, 0)
                    }
                    RequestType::GetId => {
                        shadow.write(&r.data, &drive_id);
                        for s in &r.data {
                            writes.add(s.addr.0, u64::from(s.len));
                        }
                        (S_OK, ID_BYTES as u32)
                    }
                    RequestType::Flush => (S_OK, 0),
                    RequestType::Discard | RequestType::WriteZeroes => {
                        for range in &r.ranges {
                            let (from, n) = (at(range.sector), at(u64::from(range.num_sectors)));
                            if r.request_type == RequestType::WriteZeroes || disks.discard_zeroes {
                                file[from..from + n].fill(0);
                            } else if n > 0 {
                                file_exact = false;
                            }
                        }
                        (S_OK, 0)
                    }
                };
                (Some((r.status_addr, status)), to_guest + 1)
            }
        };
        if let Some((addr, value)) = status {
            *shadow.slot(addr.0) = value;
            writes.add(addr.0, 1);
        }
        if *head < size {
            expected_used.push((u32::from(*head), used_len));
        }
    }
    // When nothing the device writes overlaps anything it reads, it sees
    // exactly what the model saw, and its behaviour is the model's.
    let predictable = !reads.meets(&mut writes);

    // Run the device.
    let (block, backing) = if read_only {
        (&mut disks.ro, &disks.ro_file)
    } else {
        disks
            .rw_file
            .write_all_at(&disks.pattern, 0)
            .expect("reset the rw file");
        (&mut disks.rw, &disks.rw_file)
    };
    block.ack_features(features);
    let irq = Arc::new(CountingInterrupt::default());
    let queue = ActiveQueue {
        index: 0,
        queue: make_queue(size, 0),
        notify: EventFd::new(EFD_NONBLOCK).expect("eventfd"),
    };
    block
        .activate(mem.clone(), vec![queue], irq.clone())
        .expect("activate");
    let metrics = block.metrics().clone();
    let fails_before = metrics.execute_fails.count();
    let result = block.process_queue();
    let parse_fails = metrics.execute_fails.count() - fails_before;
    assert!(block.reset(), "reset");

    let n = backing.read_at(contents, 0).expect("read the backing file");
    assert_eq!(n, FILE_LEN, "the backing file changed size");
    assert_eq!(
        backing.metadata().expect("file size").len(),
        FILE_LEN as u64
    );
    let contents = &contents[..n];
    if read_only {
        assert!(
            contents == disks.pattern,
            "a read-only device changed its file"
        );
    }

    let used_idx: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap();
    let Some(heads) = heads else {
        // More entries published than the ring holds: nothing is popped.
        assert!(result.is_err(), "avail idx {avail_idx} > {size} accepted");
        assert_eq!(used_idx, 0);
        assert_eq!(irq.0.load(Ordering::SeqCst), 0);
        return;
    };
    if !predictable {
        return;
    }
    assert!(result.is_ok(), "process_queue: {result:?}");
    assert_eq!(parse_fails, parse_errors, "invalid requests counted");
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
    let interrupts = irq.0.load(Ordering::SeqCst);
    assert_eq!(interrupts, usize::from(!heads.is_empty()), "interrupts");

    // Guest memory: everything but the used ring (checked above) as the
    // model left it.
    actual.load(mem);
    let used_end = (USED + 6 + 8 * u64::from(size)) as usize;
    actual.0[0][USED as usize..used_end].fill(0);
    shadow.0[0][USED as usize..used_end].fill(0);
    for (r, &(base, _)) in REGIONS.iter().enumerate() {
        if actual.0[r] != shadow.0[r] {
            let i = (0..actual.0[r].len())
                .find(|&i| actual.0[r][i] != shadow.0[r][i])
                .unwrap_or(0);
            panic!(
                "guest memory at {:#x} is {:#x}, the model says {:#x}",
                base + i as u64,
                actual.0[r][i],
                shadow.0[r][i]
            );
        }
    }
    if !read_only && file_exact {
        assert!(contents == &file[..], "file contents differ from the model");
    }
});
