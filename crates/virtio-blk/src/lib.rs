// SPDX-License-Identifier: Apache-2.0

//! A virtio block device (virtio 1.2 §5.2) backed by a raw image file on the
//! host.
//!
//! [`Block`] implements [`ember_virtio::VirtioDevice`]; put it behind a
//! transport such as `ember_virtio_mmio::MmioTransport`. It serves reads, writes, flushes,
//! GET_ID (the drive ID), discard and write zeroes, on one queue of
//! [`QUEUE_SIZE`] entries, with two I/O engines as in Firecracker:
//! [`IoEngine::Sync`] (`preadv`/`pwritev` straight into guest memory) and
//! [`IoEngine::Async`] (io_uring: every request popped in one queue
//! notification is submitted with one system call, completions come back
//! through an EventFd).
//!
//! Requests are parsed by [`Request::parse`], which validates everything the
//! guest wrote; a malformed request is completed with VIRTIO_BLK_S_IOERR or
//! VIRTIO_BLK_S_UNSUPP when it has a status byte, and returned unused
//! otherwise, and counted in [`BlockMetrics`].
//!
//! # Driving the device
//!
//! [`Block`] implements both [`ember_virtio::VirtioDevice`] and
//! [`event_manager::MutEventSubscriber`], as the network and vsock devices
//! do. The VMM keeps an `Arc<Mutex<Block>>`, gives the transport a clone as
//! `Arc<Mutex<dyn VirtioDevice>>` and adds another to its `EventManager`:
//! 1. When added, the device watches an internal control EventFd and, with
//!    the async engine, the io_uring completion EventFd.
//! 2. At DRIVER_OK the transport calls `activate` (vCPU thread), which keeps
//!    the queue and signals the control EventFd; on that event the device
//!    starts watching the queue's notify EventFd (the transport's
//!    `queue_notify_events()[0]`, a KVM ioeventfd). A kick that came before
//!    is not lost: the EventFd still holds it.
//! 3. A reset stops the device and signals the control EventFd again; the
//!    event loop then stops watching the queue.
//!
//! A VMM with a loop of its own can instead call
//! [`Block::handle_queue_event`] and [`Block::handle_completion_event`]
//! when those EventFds are readable.
//!
//! # Example
//!
//! ```
//! use std::sync::{Arc, Mutex};
//!
//! use ember_virtio_blk::{Block, BlockConfig, CacheType, IoEngine};
//! use ember_virtio_mmio::{MmioTransport, VirtioDevice};
//! use vm_memory::{GuestAddress, GuestMemoryMmap};
//! use vmm_sys_util::eventfd::EventFd;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let image = tempfile::NamedTempFile::new()?;
//! # image.as_file().set_len(1 << 20)?;
//! let config = BlockConfig {
//!     drive_id: "rootfs".to_string(),
//!     path_on_host: image.path().to_path_buf(),
//!     is_read_only: false,
//!     cache_type: CacheType::Unsafe,
//!     io_engine: IoEngine::Sync,
//!     rate_limiter: Default::default(),
//! };
//! let block = Arc::new(Mutex::new(Block::new(&config)?));
//! assert_eq!(block.lock().unwrap().capacity(), 2048);
//!
//! let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)])?;
//! let device: Arc<Mutex<dyn VirtioDevice>> = block.clone();
//! let transport = MmioTransport::new(mem, device, EventFd::new(0)?)?;
//! // Register transport.queue_notify_events()[0] as an ioeventfd, then run
//! // the device from the event loop.
//! assert_eq!(transport.queue_notify_events().len(), 1);
//! let mut events = event_manager::EventManager::<
//!     Arc<Mutex<dyn event_manager::MutEventSubscriber + Send>>,
//! >::new()?;
//! use event_manager::SubscriberOps;
//! events.add_subscriber(block);
//! # Ok(())
//! # }
//! ```

#![deny(missing_docs)]

mod device;
mod engine;
mod event_handler;
mod metrics;
mod request;
mod state;

#[cfg(test)]
mod tests;

use std::io;
use std::path::PathBuf;

pub use ember_rate_limiter::{BucketSpec, BucketUpdate, RateLimiterConfig};

pub use device::Block;
pub use metrics::BlockMetrics;
pub use request::{
    Request, RequestError, RequestErrorKind, RequestType, SectorRange, Segment, HEADER_SIZE,
    MAX_DESCRIPTORS, RANGE_SIZE,
};
pub use state::{BlockState, BlockStateError};

/// log2 of the sector size.
pub const SECTOR_SHIFT: u32 = 9;
/// Sectors are 512 bytes whatever the backing file (virtio 1.2 §5.2.4).
pub const SECTOR_SIZE: u32 = 1 << SECTOR_SHIFT;
/// Size of the one request queue (Firecracker's).
pub const QUEUE_SIZE: u16 = 256;
/// Data segments one request may carry (config `seg_max`).
pub const SEG_MAX: u32 = 128;
/// Largest discard range in sectors (config `max_discard_sectors`).
pub const MAX_DISCARD_SECTORS: u32 = u32::MAX;
/// Ranges per discard request (config `max_discard_seg`).
pub const MAX_DISCARD_SEG: u32 = 1;
/// Largest write zeroes range in sectors (config
/// `max_write_zeroes_sectors`): 1 GiB, to bound the time one request takes
/// on file systems that must write the zeroes.
pub const MAX_WRITE_ZEROES_SECTORS: u32 = 1 << 21;
/// Ranges per write zeroes request (config `max_write_zeroes_seg`).
pub const MAX_WRITE_ZEROES_SEG: u32 = 1;
/// Bytes of configuration space: `struct virtio_blk_config` up to and
/// including `write_zeroes_may_unmap` and its padding (virtio 1.2 §5.2.4).
pub const CONFIG_SPACE_SIZE: usize = 60;

/// How writes reach stable storage (Firecracker's `cache_type`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CacheType {
    /// The guest is not offered VIRTIO_BLK_F_FLUSH, and flush requests do
    /// nothing: data is durable only when the host writes it back.
    #[default]
    Unsafe,
    /// VIRTIO_BLK_F_FLUSH is offered and a flush is an `fdatasync` of the
    /// backing file.
    Writeback,
}

/// Which I/O engine serves the requests (Firecracker's `io_engine`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum IoEngine {
    /// Blocking `preadv`/`pwritev`/`fdatasync` on the device's thread.
    #[default]
    Sync,
    /// io_uring, with batched submission and an EventFd for completions.
    Async,
}

/// What a block device is built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockConfig {
    /// The drive's ID; its first 20 bytes answer VIRTIO_BLK_T_GET_ID.
    pub drive_id: String,
    /// The raw image (or host block device) backing the drive.
    pub path_on_host: PathBuf,
    /// Open the image read-only and offer VIRTIO_BLK_F_RO.
    pub is_read_only: bool,
    /// Flush behaviour.
    pub cache_type: CacheType,
    /// I/O engine.
    pub io_engine: IoEngine,
    /// Rate limits on the drive's requests (none by default).
    pub rate_limiter: RateLimiterConfig,
}

/// Errors building or running a block device.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The backing file could not be opened (missing, or not readable or
    /// writable as needed).
    #[error("cannot open block device backing file {}: {source}", .path.display())]
    OpenFile {
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The backing file's size could not be read.
    #[error("cannot get the size of block device backing file {}: {source}", .path.display())]
    FileSize {
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The backing path is neither a regular file nor a block device.
    #[error("block device backing file {} is not a regular file or a block device", .0.display())]
    NotAFile(PathBuf),
    /// Setting up the io_uring failed.
    #[error("cannot set up the io_uring engine: {0}")]
    IoUring(#[source] io::Error),
    /// The queue is unusable (the driver corrupted its rings).
    #[error("virtqueue error: {0}")]
    Queue(#[source] virtio_queue::Error),
    /// The EventFd that tells the event loop about activation and reset
    /// could not be created.
    #[error("cannot create the block device's control EventFd: {0}")]
    EventFd(#[source] io::Error),
    /// Waiting for the requests in flight (before replacing the backing
    /// file) failed.
    #[error("cannot wait for the block requests in flight: {0}")]
    Drain(#[source] io::Error),
    /// The rate limiter's timer could not be set up.
    #[error("cannot set up the drive's rate limiter: {0}")]
    RateLimiter(#[source] ember_rate_limiter::Error),
}
