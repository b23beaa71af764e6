// SPDX-License-Identifier: Apache-2.0

//! The block device: configuration, feature negotiation, queue processing.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::sync::Arc;

use ember_rate_limiter::{BucketUpdate, RateLimiter, RateLimiterConfig, TokenType};
use ember_virtio::{
    drain_eventfd, needs_interrupt, take_queues, ActivateError, ActiveQueue, InterruptKind,
    Registrations, VirtioConfig, VirtioDevice, VirtioInterrupt,
};
use log::{debug, error, warn};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::engine::{AsyncEngine, DiskOp, Engine, IoVecs, Submitted, SyncEngine};
use crate::metrics::BlockMetrics;
use crate::request::{Request, RequestType, SectorRange, Segment};
use crate::{
    BlockConfig, CacheType, Error, IoEngine, CONFIG_SPACE_SIZE, MAX_DISCARD_SECTORS,
    MAX_DISCARD_SEG, MAX_WRITE_ZEROES_SECTORS, MAX_WRITE_ZEROES_SEG, QUEUE_SIZE, SECTOR_SHIFT,
    SECTOR_SIZE, SEG_MAX,
};

/// Requests the device keeps in flight at once: a well-behaved driver cannot
/// have more than the queue size outstanding; a driver that reuses heads
/// while they are in flight is throttled at that point.
const MAX_IN_FLIGHT: usize = QUEUE_SIZE as usize;

/// What an activated device holds.
pub(crate) struct Active {
    mem: GuestMemoryMmap,
    queue: Queue,
    pub(crate) notify: EventFd,
    interrupt: Arc<dyn VirtioInterrupt>,
}

/// A request handed to the engine, waiting for its result.
#[derive(Debug, Clone, Copy)]
struct Pending {
    head: u16,
    request_type: RequestType,
    data_len: u32,
    status_addr: GuestAddress,
}

/// What became of one descriptor chain.
enum Outcome {
    /// Finished: put `head` in the used ring with `used_len`.
    Completed { head: u16, used_len: u32 },
    /// Handed to the engine; it completes later.
    Queued,
    /// The engine is full: give the chain back to the available ring.
    Throttled,
    /// The rate limiter refused the request: give the chain back; the
    /// limiter's timer resumes the queue.
    RateLimited,
}

/// The backing file and everything a request needs to execute.
struct Disk {
    engine: Box<dyn Engine>,
    nsectors: u64,
    read_only: bool,
    cache_type: CacheType,
    id: [u8; VIRTIO_BLK_ID_BYTES as usize],
    discard: bool,
    write_zeroes: bool,
    pending: Vec<Option<Pending>>,
    free: Vec<usize>,
    in_use: usize,
    max_in_flight: usize,
    limiter: RateLimiter,
}

/// Writes the status byte; returns the bytes that adds to the used length.
fn write_status(mem: &GuestMemoryMmap, addr: GuestAddress, status: u32) -> u32 {
    match mem.write_obj(status as u8, addr) {
        Ok(()) => 1,
        Err(e) => {
            // Cannot happen for a parsed request (the address was checked);
            // the chain is then returned with nothing written.
            error!("virtio-blk: failed to write the status byte at {addr:?}: {e}");
            0
        }
    }
}

/// Host iovecs for guest buffers; marks them dirty when the device writes
/// into them.
fn build_iovecs(
    mem: &GuestMemoryMmap,
    segments: &[Segment],
    device_writes: bool,
) -> Result<IoVecs, GuestMemoryError> {
    let mut iovecs = Vec::with_capacity(segments.len());
    for seg in segments {
        for slice in GuestMemoryBackend::get_slices(mem, seg.addr, seg.len as usize) {
            let slice = slice?;
            if device_writes {
                slice.bitmap().mark_dirty(0, slice.len());
            }
            iovecs.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: slice.len(),
            });
        }
    }
    Ok(IoVecs(iovecs))
}

fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let offset =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let len = libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    loop {
        // SAFETY: fallocate only reads its scalar arguments; the descriptor
        // belongs to `file`, which outlives the call.
        let ret = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset, len) };
        if ret == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

fn is_unsupported(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS)
    )
}

/// Writes zero bytes over a range, for file systems without
/// FALLOC_FL_ZERO_RANGE.
fn write_zero_bytes(file: &File, offset: u64, len: u64) -> io::Result<()> {
    const CHUNK: usize = 64 * 1024;
    let zeroes = vec![0u8; CHUNK];
    let mut done = 0u64;
    while done < len {
        let n = usize::try_from(len - done).map_or(CHUNK, |left| left.min(CHUNK));
        let mut iov = [libc::iovec {
            iov_base: zeroes.as_ptr() as *mut libc::c_void,
            iov_len: n,
        }];
        let written = crate::engine::transfer_all(file, &mut iov, offset + done, true)?;
        if written == 0 {
            return Err(io::Error::from(io::ErrorKind::WriteZero));
        }
        done += u64::from(written);
    }
    Ok(())
}

/// Executes one discard or write zeroes range.
fn deallocate(file: &File, kind: RequestType, range: &SectorRange) -> io::Result<()> {
    if range.num_sectors == 0 {
        return Ok(());
    }
    // Cannot overflow: parsing checked the range against the disk size,
    // which is at most u64::MAX >> 9 sectors.
    let offset = range.sector << SECTOR_SHIFT;
    let len = u64::from(range.num_sectors) << SECTOR_SHIFT;
    let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    if kind == RequestType::Discard || range.unmap {
        match fallocate(file, punch, offset, len) {
            Ok(()) => return Ok(()),
            // A discard is only a hint (virtio 1.2 §5.2.6.2 "MAY
            // deallocate"): without hole punching it does nothing.
            Err(e) if is_unsupported(&e) && kind == RequestType::Discard => return Ok(()),
            Err(e) if is_unsupported(&e) => {}
            Err(e) => return Err(e),
        }
    }
    match fallocate(
        file,
        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
        offset,
        len,
    ) {
        Err(e) if is_unsupported(&e) => write_zero_bytes(file, offset, len),
        other => other,
    }
}

impl Disk {
    fn alloc(&mut self, pending: Pending) -> Option<u64> {
        if self.in_use >= self.max_in_flight {
            return None;
        }
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None => {
                self.pending.push(None);
                self.pending.len() - 1
            }
        };
        self.pending[slot] = Some(pending);
        self.in_use += 1;
        Some(slot as u64)
    }

    fn take(&mut self, token: u64) -> Option<Pending> {
        let slot = usize::try_from(token).ok()?;
        let pending = self.pending.get_mut(slot)?.take()?;
        self.free.push(slot);
        self.in_use -= 1;
        Some(pending)
    }

    fn clear(&mut self) {
        self.pending.clear();
        self.free.clear();
        self.in_use = 0;
    }

    /// Parses and starts (or finishes) the request in `chain`.
    fn start(
        &mut self,
        chain: DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
        metrics: &BlockMetrics,
    ) -> Outcome {
        let head = chain.head_index();
        let request = match Request::parse(chain, mem, self.nsectors) {
            Ok(request) => request,
            Err(e) => {
                metrics.execute_fails.inc();
                // Counted; logged at debug level only, so that a guest
                // cannot flood the log.
                debug!("virtio-blk: invalid request (head {head}): {e}");
                let used_len = match e.status_addr() {
                    Some(addr) => {
                        metrics.invalid_reqs_count.inc();
                        write_status(mem, addr, u32::from(e.status()))
                    }
                    None => 0,
                };
                return Outcome::Completed { head, used_len };
            }
        };
        if !self.limiter.is_unlimited() && !admit(&mut self.limiter, &request) {
            metrics.rate_limiter_throttled_events.inc();
            return Outcome::RateLimited;
        }
        let status_addr = request.status_addr;
        let complete = |status: u32, to_guest: u32| {
            if status != VIRTIO_BLK_S_OK {
                metrics.invalid_reqs_count.inc();
            }
            Outcome::Completed {
                head,
                used_len: to_guest + write_status(mem, status_addr, status),
            }
        };

        let kind = request.request_type;
        match kind {
            // virtio 1.2 §5.2.6.2: with VIRTIO_BLK_F_RO, writes fail with
            // IOERR and write nothing; the file is open read-only anyway.
            RequestType::Out | RequestType::Discard | RequestType::WriteZeroes
                if self.read_only =>
            {
                debug!("virtio-blk: {kind:?} request on a read-only drive");
                complete(VIRTIO_BLK_S_IOERR, 0)
            }
            RequestType::Discard if !self.discard => complete(VIRTIO_BLK_S_UNSUPP, 0),
            RequestType::WriteZeroes if !self.write_zeroes => complete(VIRTIO_BLK_S_UNSUPP, 0),
            RequestType::GetId => {
                let mut left: &[u8] = &self.id;
                for seg in &request.data {
                    if left.is_empty() {
                        break;
                    }
                    let n = left.len().min(seg.len as usize);
                    if let Err(e) = mem.write_slice(&left[..n], seg.addr) {
                        error!("virtio-blk: failed to write the device ID: {e}");
                        return complete(VIRTIO_BLK_S_IOERR, 0);
                    }
                    left = &left[n..];
                }
                complete(VIRTIO_BLK_S_OK, VIRTIO_BLK_ID_BYTES)
            }
            // With an unsafe cache the host page cache is the disk: a flush
            // has nothing to do (Firecracker's CacheType::Unsafe).
            RequestType::Flush if self.cache_type == CacheType::Unsafe => {
                metrics.flush_count.inc();
                complete(VIRTIO_BLK_S_OK, 0)
            }
            RequestType::Discard | RequestType::WriteZeroes => {
                let file = self.engine.file();
                match request
                    .ranges
                    .iter()
                    .try_for_each(|range| deallocate(file, kind, range))
                {
                    Ok(()) => {
                        if kind == RequestType::Discard {
                            metrics.discard_count.inc();
                        } else {
                            metrics.write_zeroes_count.inc();
                        }
                        complete(VIRTIO_BLK_S_OK, 0)
                    }
                    Err(e) => {
                        error!("virtio-blk: {kind:?} failed: {e}");
                        complete(VIRTIO_BLK_S_IOERR, 0)
                    }
                }
            }
            RequestType::In | RequestType::Out | RequestType::Flush => {
                let pending = Pending {
                    head,
                    request_type: kind,
                    data_len: request.data_len,
                    status_addr,
                };
                let op = match kind {
                    RequestType::Flush => Ok(DiskOp::Flush),
                    _ => build_iovecs(mem, &request.data, kind == RequestType::In).map(|iovecs| {
                        // Cannot overflow: the range was checked against the
                        // disk size.
                        let offset = request.sector << SECTOR_SHIFT;
                        if kind == RequestType::In {
                            DiskOp::Read { offset, iovecs }
                        } else {
                            DiskOp::Write { offset, iovecs }
                        }
                    }),
                };
                let op = match op {
                    Ok(op) => op,
                    Err(e) => {
                        error!("virtio-blk: cannot map request buffers: {e}");
                        return complete(VIRTIO_BLK_S_IOERR, 0);
                    }
                };
                let Some(token) = self.alloc(pending) else {
                    metrics.io_engine_throttled_events.inc();
                    return Outcome::Throttled;
                };
                match self.engine.submit(op, token) {
                    Submitted::Done(result) => {
                        self.take(token);
                        Outcome::Completed {
                            head,
                            used_len: finish(pending, result, mem, metrics),
                        }
                    }
                    Submitted::Queued => Outcome::Queued,
                    Submitted::Full => {
                        self.take(token);
                        metrics.io_engine_throttled_events.inc();
                        Outcome::Throttled
                    }
                }
            }
        }
    }
}

/// Takes the request's tokens, as Firecracker does: one operation for every
/// request, and its data length in bytes for reads and writes. `false` (and
/// nothing taken) when it must wait.
fn admit(limiter: &mut RateLimiter, request: &Request) -> bool {
    if !limiter.consume(1, TokenType::Ops) {
        return false;
    }
    if matches!(request.request_type, RequestType::In | RequestType::Out)
        && !limiter.consume(u64::from(request.data_len), TokenType::Bytes)
    {
        limiter.manual_replenish(1, TokenType::Ops);
        return false;
    }
    true
}

/// Completes an engine operation: counts it, writes the status, and returns
/// the used length (bytes written into guest memory, status included).
fn finish(
    pending: Pending,
    result: io::Result<u32>,
    mem: &GuestMemoryMmap,
    metrics: &BlockMetrics,
) -> u32 {
    let (status, to_guest) = match (pending.request_type, result) {
        (RequestType::In, Ok(n)) => {
            metrics.read_bytes.add(u64::from(n));
            if n == pending.data_len {
                metrics.read_count.inc();
                (VIRTIO_BLK_S_OK, n)
            } else {
                error!(
                    "virtio-blk: short read of {n} bytes instead of {}",
                    pending.data_len
                );
                (VIRTIO_BLK_S_IOERR, n)
            }
        }
        (RequestType::Out, Ok(n)) => {
            metrics.write_bytes.add(u64::from(n));
            if n == pending.data_len {
                metrics.write_count.inc();
                (VIRTIO_BLK_S_OK, 0)
            } else {
                error!(
                    "virtio-blk: short write of {n} bytes instead of {}",
                    pending.data_len
                );
                (VIRTIO_BLK_S_IOERR, 0)
            }
        }
        (_, Ok(_)) => {
            metrics.flush_count.inc();
            (VIRTIO_BLK_S_OK, 0)
        }
        (kind, Err(e)) => {
            error!("virtio-blk: {kind:?} request failed: {e}");
            (VIRTIO_BLK_S_IOERR, 0)
        }
    };
    if status != VIRTIO_BLK_S_OK {
        metrics.invalid_reqs_count.inc();
    }
    to_guest + write_status(mem, pending.status_addr, status)
}

fn add_used(active: &mut Active, head: u16, len: u32, metrics: &BlockMetrics) {
    if let Err(e) = active.queue.add_used(&active.mem, head, len) {
        metrics.event_fails.inc();
        error!("virtio-blk: failed to add head {head} to the used ring: {e}");
    }
}

/// Interrupts the driver once for everything added to the used ring since
/// the last call, unless it asked not to be.
fn signal_used(active: &mut Active, metrics: &BlockMetrics) {
    match needs_interrupt(&mut active.queue, &active.mem) {
        Ok(true) => {}
        Ok(false) => return,
        Err(e) => {
            // Better a spurious interrupt than a lost one.
            metrics.event_fails.inc();
            error!("virtio-blk: cannot read the notification state: {e}");
        }
    }
    match active.interrupt.trigger(InterruptKind::Vring) {
        Ok(()) => metrics.interrupts.inc(),
        Err(e) => {
            metrics.event_fails.inc();
            error!("virtio-blk: failed to signal the used-buffer interrupt: {e}");
        }
    }
}

fn drain_event(evt: &EventFd, metrics: &BlockMetrics) {
    if let Err(e) = drain_eventfd(evt) {
        metrics.event_fails.inc();
        error!("virtio-blk: failed to read an EventFd: {e}");
    }
}

/// A virtio block device (virtio 1.2 §5.2) backed by a raw image file.
pub struct Block {
    config: BlockConfig,
    pub(crate) virtio: VirtioConfig,
    metrics: Arc<BlockMetrics>,
    disk: Disk,
    pub(crate) active: Option<Active>,
    /// Signalled at activation and reset, so that the event loop starts or
    /// stops watching the queue.
    pub(crate) control_evt: EventFd,
    /// Whether the device was added to an event loop.
    pub(crate) subscribed: bool,
    /// What the event loop watches for the current activation, and the
    /// notify EventFds of a previous one until it has stopped watching them.
    pub(crate) registrations: Registrations,
    throttled: bool,
    completions: Vec<(u64, io::Result<u32>)>,
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("config", &self.config)
            .field("capacity", &self.disk.nsectors)
            .field("avail_features", &self.virtio.avail_features())
            .field("acked_features", &self.virtio.acked_features())
            .field("activated", &self.active.is_some())
            .field("pending", &self.disk.in_use)
            .finish_non_exhaustive()
    }
}

/// Builds the configuration space (virtio 1.2 §5.2.4, little-endian).
fn build_config_space(nsectors: u64, discard_alignment: u32) -> [u8; CONFIG_SPACE_SIZE] {
    let mut space = [0u8; CONFIG_SPACE_SIZE];
    let mut put = |offset: usize, bytes: &[u8]| {
        space[offset..offset + bytes.len()].copy_from_slice(bytes);
    };
    put(0, &nsectors.to_le_bytes()); // capacity
    put(12, &SEG_MAX.to_le_bytes()); // seg_max
    put(20, &SECTOR_SIZE.to_le_bytes()); // blk_size
    put(36, &MAX_DISCARD_SECTORS.to_le_bytes());
    put(40, &MAX_DISCARD_SEG.to_le_bytes());
    put(44, &discard_alignment.to_le_bytes()); // discard_sector_alignment
    put(48, &MAX_WRITE_ZEROES_SECTORS.to_le_bytes());
    put(52, &MAX_WRITE_ZEROES_SEG.to_le_bytes());
    put(56, &[1]); // write_zeroes_may_unmap: unmap requests punch holes
    space
}

/// The first 20 bytes of the drive ID, zero-padded (virtio 1.2 §5.2.6: the
/// ID string is not NUL-terminated when it is 20 bytes long).
fn drive_id_bytes(drive_id: &str) -> [u8; VIRTIO_BLK_ID_BYTES as usize] {
    let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
    for (dst, src) in id.iter_mut().zip(drive_id.as_bytes()) {
        *dst = *src;
    }
    id
}

/// An opened backing file and what the configuration space says about it.
struct BackingFile {
    file: File,
    nsectors: u64,
    discard_alignment: u32,
}

/// Opens the image at `path` (read-only for a read-only drive) and sizes it.
///
/// A file whose size is not a multiple of 512 bytes is accepted with a
/// warning; the tail is not visible to the guest.
fn open_backing_file(path: &Path, read_only: bool) -> Result<BackingFile, Error> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(path)
        .map_err(|source| Error::OpenFile {
            path: path.to_path_buf(),
            source,
        })?;
    let metadata = file.metadata().map_err(|source| Error::FileSize {
        path: path.to_path_buf(),
        source,
    })?;
    let file_type = metadata.file_type();
    if !file_type.is_file() && !file_type.is_block_device() {
        return Err(Error::NotAFile(path.to_path_buf()));
    }
    // Seeking works for block devices too, whose metadata size is 0.
    let size = file
        .seek(SeekFrom::End(0))
        .map_err(|source| Error::FileSize {
            path: path.to_path_buf(),
            source,
        })?;
    if size % u64::from(SECTOR_SIZE) != 0 {
        warn!(
            "virtio-blk: {} is {size} bytes, not a multiple of {SECTOR_SIZE}; the last {} \
             bytes are not visible to the guest",
            path.display(),
            size % u64::from(SECTOR_SIZE)
        );
    }
    // Hole punching works in file system blocks: tell the guest to align
    // discards to them.
    let discard_alignment = u32::try_from((metadata.blksize() >> SECTOR_SHIFT).max(1)).unwrap_or(1);
    Ok(BackingFile {
        file,
        nsectors: size >> SECTOR_SHIFT,
        discard_alignment,
    })
}

impl Block {
    /// Opens the backing file (read-only for a read-only drive) and sets up
    /// the I/O engine.
    ///
    /// A file whose size is not a multiple of 512 bytes is accepted with a
    /// warning; the tail is not visible to the guest.
    pub fn new(config: &BlockConfig) -> Result<Block, Error> {
        let BackingFile {
            file,
            nsectors,
            discard_alignment,
        } = open_backing_file(&config.path_on_host, config.is_read_only)?;

        let control_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?;
        let engine: Box<dyn Engine> = match config.io_engine {
            IoEngine::Sync => Box::new(SyncEngine::new(file)),
            IoEngine::Async => {
                Box::new(AsyncEngine::new(file, u32::from(QUEUE_SIZE)).map_err(Error::IoUring)?)
            }
        };

        // VIRTIO_RING_F_EVENT_IDX as Firecracker offers it: the driver
        // then kicks and takes interrupts only past the indices each side
        // publishes (virtio 1.2 §2.7.7, §2.7.10).
        let mut avail_features = (1u64 << VIRTIO_F_VERSION_1)
            | (1u64 << VIRTIO_RING_F_EVENT_IDX)
            | (1u64 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1u64 << VIRTIO_BLK_F_SEG_MAX)
            | (1u64 << VIRTIO_BLK_F_BLK_SIZE);
        if config.cache_type == CacheType::Writeback {
            avail_features |= 1u64 << VIRTIO_BLK_F_FLUSH;
        }
        if config.is_read_only {
            avail_features |= 1u64 << VIRTIO_BLK_F_RO;
        } else {
            avail_features |= (1u64 << VIRTIO_BLK_F_DISCARD) | (1u64 << VIRTIO_BLK_F_WRITE_ZEROES);
        }

        Ok(Block {
            config: config.clone(),
            virtio: VirtioConfig::new(
                avail_features,
                build_config_space(nsectors, discard_alignment).to_vec(),
            ),
            metrics: Arc::new(BlockMetrics::default()),
            disk: Disk {
                engine,
                nsectors,
                read_only: config.is_read_only,
                cache_type: config.cache_type,
                id: drive_id_bytes(&config.drive_id),
                discard: false,
                write_zeroes: false,
                pending: Vec::new(),
                free: Vec::new(),
                in_use: 0,
                max_in_flight: MAX_IN_FLIGHT,
                limiter: config.rate_limiter.build().map_err(Error::RateLimiter)?,
            },
            active: None,
            control_evt,
            subscribed: false,
            registrations: Registrations::new(),
            throttled: false,
            completions: Vec::new(),
        })
    }

    /// The configuration the device was built from.
    pub fn config(&self) -> &BlockConfig {
        &self.config
    }

    /// Disk size in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.disk.nsectors
    }

    /// Replaces the backing file of a device that may be running
    /// (Firecracker's `PATCH /drives/{id}` with a new `path_on_host`).
    ///
    /// The new file is opened with the drive's read-only setting; on error
    /// nothing changes. Requests the engine still has in flight are finished
    /// on the old file and completed to the driver first, so every request
    /// is served by exactly one file. The capacity in the configuration
    /// space follows the new file and, once the driver has started the
    /// device, a configuration change interrupt tells it to re-read the
    /// capacity (virtio 1.2 §5.2.4: the driver re-reads `capacity` on a
    /// configuration change notification; the MMIO transport also bumps
    /// ConfigGeneration, §4.2.2).
    pub fn update_backing_file(&mut self, path: &Path) -> Result<(), Error> {
        let backing = match open_backing_file(path, self.config.is_read_only) {
            Ok(backing) => backing,
            Err(e) => {
                self.metrics.update_fails.inc();
                return Err(e);
            }
        };
        // Finish what the old file owes the driver.
        let drained = self.disk.engine.drain(&mut self.completions);
        let used = self.complete_reaped();
        if let Err(e) = drained {
            self.metrics.update_fails.inc();
            if used {
                if let Some(active) = self.active.as_mut() {
                    signal_used(active, &self.metrics);
                }
            }
            return Err(Error::Drain(e));
        }
        let old = self.disk.engine.replace_file(backing.file);
        // What the old file holds in the host page cache stays there; a
        // writeback drive makes it durable as it would on a flush.
        if self.config.cache_type == CacheType::Writeback && !self.config.is_read_only {
            if let Err(e) = old.sync_data() {
                warn!(
                    "virtio-blk: flushing the previous backing file {} failed: {e}",
                    self.config.path_on_host.display()
                );
            }
        }
        drop(old);
        self.disk.nsectors = backing.nsectors;
        self.virtio.set_config_space(
            build_config_space(backing.nsectors, backing.discard_alignment).to_vec(),
        );
        self.config.path_on_host = path.to_path_buf();
        self.metrics.update_count.inc();
        if let Some(active) = self.active.as_mut() {
            if used {
                signal_used(active, &self.metrics);
            }
            if let Err(e) = active.interrupt.trigger(InterruptKind::Config) {
                self.metrics.event_fails.inc();
                error!("virtio-blk: failed to signal the configuration change: {e}");
            }
        }
        Ok(())
    }

    /// The device's counters (shared: clone the `Arc` to read them from
    /// another thread).
    pub fn metrics(&self) -> &Arc<BlockMetrics> {
        &self.metrics
    }

    /// Whether the driver started the device and no reset happened since.
    pub fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    /// Requests handed to the I/O engine and not completed yet.
    pub fn pending_requests(&self) -> usize {
        self.disk.in_use
    }

    /// The queue's notify EventFd, once activated (the same EventFd as the
    /// transport's `queue_notify_events()[0]`).
    pub fn queue_event(&self) -> Option<&EventFd> {
        self.active.as_ref().map(|active| &active.notify)
    }

    /// The EventFd the io_uring signals when requests complete (async
    /// engine only). Poll it and call
    /// [`handle_completion_event`](Self::handle_completion_event).
    pub fn io_completion_event(&self) -> Option<&EventFd> {
        self.disk.engine.completion_event()
    }

    /// Handles a notification of the queue: clears the notify EventFd and
    /// processes the queue. Call it when the EventFd signals.
    pub fn handle_queue_event(&mut self) -> Result<(), Error> {
        self.metrics.queue_event_count.inc();
        if let Some(active) = &self.active {
            drain_event(&active.notify, &self.metrics);
        }
        self.process_queue()
    }

    /// Handles the io_uring completion EventFd: completes every finished
    /// request, interrupts once, and resumes a queue that was paused because
    /// the ring was full.
    pub fn handle_completion_event(&mut self) -> Result<(), Error> {
        self.metrics.io_completion_event_count.inc();
        if let Some(evt) = self.disk.engine.completion_event() {
            drain_event(evt, &self.metrics);
        }
        let resume = std::mem::take(&mut self.throttled);
        self.run(resume)
    }

    /// Drains the available ring: parses each request, executes it (sync
    /// engine) or submits the whole batch with one system call (async
    /// engine), puts what completed in the used ring, and interrupts the
    /// driver at most once. A no-op before activation.
    pub fn process_queue(&mut self) -> Result<(), Error> {
        if self.throttled {
            return Ok(());
        }
        if self.disk.limiter.is_blocked() {
            self.metrics.rate_limiter_throttled_events.inc();
            return Ok(());
        }
        self.run(true)
    }

    /// Handles the rate limiter's timer: the block is over, the queue goes
    /// on where it stopped. Call it when [`rate_limiter_fd`](Self::rate_limiter_fd)
    /// is readable.
    pub fn handle_rate_limiter_event(&mut self) -> Result<(), Error> {
        self.metrics.rate_limiter_event_count.inc();
        if self.disk.limiter.event_handler() {
            return self.process_queue();
        }
        Ok(())
    }

    /// The rate limiter's timerfd, readable when a block ends.
    pub fn rate_limiter_fd(&self) -> RawFd {
        self.disk.limiter.as_raw_fd()
    }

    /// The rate limiter, as it stands.
    pub fn rate_limiter(&self) -> &RateLimiter {
        &self.disk.limiter
    }

    /// Changes the rate limiter of a live device (`PATCH /drives/{id}`).
    pub fn update_rate_limiter(&mut self, bandwidth: BucketUpdate, ops: BucketUpdate) {
        self.disk.limiter.update_buckets(bandwidth, ops);
        let spec = |b: Option<&ember_rate_limiter::TokenBucket>| b.map(|b| b.spec());
        self.config.rate_limiter = RateLimiterConfig {
            bandwidth: spec(self.disk.limiter.bandwidth()),
            ops: spec(self.disk.limiter.ops()),
        };
    }

    /// Reaps finished engine operations into the used ring; returns whether
    /// any completed.
    fn reap(&mut self) -> bool {
        if self.active.is_none() {
            return false;
        }
        self.disk.engine.reap(&mut self.completions);
        self.complete_reaped()
    }

    /// Puts the results in `self.completions` in the used ring; returns
    /// whether there were any.
    fn complete_reaped(&mut self) -> bool {
        let Some(active) = self.active.as_mut() else {
            // Nobody to complete to (the device was reset): the results are
            // dropped with the rings.
            self.completions.clear();
            return false;
        };
        let any = !self.completions.is_empty();
        for (token, result) in self.completions.drain(..) {
            match self.disk.take(token) {
                Some(pending) => {
                    let used_len = finish(pending, result, &active.mem, &self.metrics);
                    add_used(active, pending.head, used_len, &self.metrics);
                }
                None => error!("virtio-blk: completion for unknown request {token}"),
            }
        }
        any
    }

    fn run(&mut self, mut pop: bool) -> Result<(), Error> {
        let mut used_any = self.reap();
        let mut result = Ok(());
        while pop {
            match self.pop_requests() {
                Ok(used) => used_any |= used,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
            // io_uring completes reads and writes of cached data during the
            // submission itself: finish them in this batch.
            let reaped = self.reap();
            used_any |= reaped;
            // If the engine was full but those completions made room, carry
            // on now rather than wait for a completion event that may have
            // been consumed already. Progress (reaped) bounds the loop.
            pop = self.throttled && reaped && self.disk.in_use < self.disk.max_in_flight;
            if pop {
                self.throttled = false;
            }
        }
        // Used entries are signalled even when the ring turned out broken.
        if used_any {
            if let Some(active) = self.active.as_mut() {
                signal_used(active, &self.metrics);
            }
        }
        result
    }

    /// Lowers the in-flight limit so that tests reach the throttling path.
    #[cfg(test)]
    pub(crate) fn set_max_in_flight(&mut self, max: usize) {
        self.disk.max_in_flight = max;
    }

    /// Pops and starts requests until the available ring is empty (with
    /// notifications re-enabled) or the engine is full.
    fn pop_requests(&mut self) -> Result<bool, Error> {
        let Some(active) = self.active.as_mut() else {
            return Ok(false);
        };
        let mut used_any = false;
        let mut popped_any = false;
        loop {
            // No kicks while the ring is being drained (virtio 1.2 §2.7.10).
            active
                .queue
                .disable_notification(&active.mem)
                .map_err(Error::Queue)?;
            let mut popped = 0usize;
            loop {
                let chain = match active.queue.iter(&active.mem) {
                    Ok(mut iter) => iter.next(),
                    Err(e) => {
                        // The driver published more entries than the queue
                        // holds: nothing sensible can be popped.
                        self.metrics.event_fails.inc();
                        let _ = self.disk.engine.kick();
                        return Err(Error::Queue(e));
                    }
                };
                let Some(chain) = chain else {
                    break;
                };
                popped += 1;
                match self.disk.start(chain, &active.mem, &self.metrics) {
                    Outcome::Completed { head, used_len } => {
                        add_used(active, head, used_len, &self.metrics);
                        used_any = true;
                    }
                    Outcome::Queued => {}
                    Outcome::Throttled => {
                        active.queue.go_to_previous_position();
                        self.throttled = true;
                        break;
                    }
                    Outcome::RateLimited => {
                        active.queue.go_to_previous_position();
                        break;
                    }
                }
            }
            popped_any |= popped > 0;
            // One system call submits the whole batch.
            if let Err(e) = self.disk.engine.kick() {
                error!("virtio-blk: failed to submit requests: {e}");
            }
            if self.throttled || self.disk.limiter.is_blocked() {
                // Notifications stay off: the completion event or the rate
                // limiter's timer resumes.
                break;
            }
            // Re-enable notifications, then check again for requests that
            // arrived meanwhile (virtio-queue's documented loop). Those must
            // be popped even when this pass popped nothing: the driver may
            // have read the flags while they were off and skipped its kick
            // (virtio 1.2 §2.7.10), so no other notification will come.
            let more = active
                .queue
                .enable_notification(&active.mem)
                .map_err(Error::Queue)?;
            if !more {
                break;
            }
        }
        if !popped_any {
            self.metrics.no_avail_buffer.inc();
        }
        Ok(used_any)
    }

    fn stop(&mut self) -> bool {
        let mut done = Vec::new();
        // Results are dropped: after a reset the rings belong to nobody.
        let drained = self.disk.engine.drain(&mut done);
        self.disk.clear();
        self.throttled = false;
        match drained {
            Ok(()) => true,
            Err(e) => {
                error!("virtio-blk: failed to drain in-flight requests: {e}");
                false
            }
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        self.virtio.avail_features()
    }

    fn ack_features(&mut self, features: u64) {
        self.virtio.ack_features(features);
        self.disk.discard = self.virtio.has_acked(VIRTIO_BLK_F_DISCARD);
        self.disk.write_zeroes = self.virtio.has_acked(VIRTIO_BLK_F_WRITE_ZEROES);
    }

    fn config_size(&self) -> u64 {
        self.virtio.config_size()
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.virtio.read_config(offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Nothing in the block configuration is writable without
        // VIRTIO_BLK_F_CONFIG_WCE, which is not offered.
        self.metrics.cfg_fails.inc();
        debug!(
            "virtio-blk: driver wrote {} bytes of configuration at {offset:#x}",
            data.len()
        );
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<ActiveQueue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        if self.active.is_some() {
            self.metrics.activate_fails.inc();
            return Err(ActivateError::AlreadyActivated);
        }
        let [queue] =
            take_queues::<1>(queues).inspect_err(|_| self.metrics.activate_fails.inc())?;
        if let Err(e) = self.control_evt.write(1) {
            self.metrics.activate_fails.inc();
            return Err(ActivateError::Io(e));
        }
        self.active = Some(Active {
            mem,
            queue: queue.queue,
            notify: queue.notify,
            interrupt,
        });
        Ok(())
    }

    fn reset(&mut self) -> bool {
        let stopped = self.stop();
        if let Some(active) = self.active.take() {
            if self.subscribed {
                // The event loop may be watching it: it stays open until the
                // event loop has unregistered it.
                self.registrations.retire(active.notify);
                if let Err(e) = self.control_evt.write(1) {
                    self.metrics.event_fails.inc();
                    error!("virtio-blk: cannot signal the reset to the event loop: {e}");
                }
            }
        }
        self.virtio.reset();
        self.disk.discard = false;
        self.disk.write_zeroes = false;
        stopped
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        self.stop();
        // Firecracker flushes a writeback drive when it goes away.
        if self.config.cache_type == CacheType::Writeback && !self.config.is_read_only {
            if let Err(e) = self.disk.engine.file().sync_data() {
                error!("virtio-blk: final flush failed: {e}");
            }
        }
    }
}
