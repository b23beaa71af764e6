// SPDX-License-Identifier: Apache-2.0

//! A virtio memory balloon (virtio 1.2 §5.5): Firecracker's `balloon`
//! device.
//!
//! [`Balloon`] implements [`ember_virtio::VirtioDevice`]: device type 5,
//! with the inflate and deflate queues, then, in this order and only when
//! configured, the statistics queue (VIRTIO_BALLOON_F_STATS_VQ), the free
//! page hinting queue (VIRTIO_BALLOON_F_FREE_PAGE_HINT) and the free page
//! reporting queue (VIRTIO_BALLOON_F_REPORTING); VIRTIO_BALLOON_F_DEFLATE_ON_OOM
//! is offered when configured. The 12-byte configuration space holds
//! `num_pages` (the target the host sets), `actual` (what the driver says
//! it holds) and the free page hint command id, as Firecracker has them.
//!
//! Pages the guest gives up (inflate PFNs, reported free ranges, hinted
//! ranges while a hinting run is on) are released to the host
//! ([`release`]): `madvise(MADV_DONTNEED)` for private anonymous memory,
//! `MADV_REMOVE` for shared memory (a memfd or a shared file: the backing
//! pages go), and a fresh anonymous mapping over a private file mapping (a
//! snapshot's memory file, which `MADV_DONTNEED` would only map again).
//! Host RSS drops by what is released; the guest reads zeroes there if it
//! touches the pages again (after a deflate, or at once under
//! DEFLATE_ON_OOM).
//!
//! Guest input is untrusted: every PFN and range is checked against guest
//! memory (whole 4 KiB pages inside one region) before anything is
//! released, chain sizes are bounded ([`MAX_PFNS_PER_CHAIN`],
//! [`MAX_STATS_BYTES`]), and a malformed chain is returned with nothing
//! done and counted (`event_fails`).
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//!
//! use ember_virtio::{ActiveQueue, VirtioDevice};
//! use ember_virtio_balloon::{Balloon, BalloonConfig};
//! use ember_virtio_mmio::test_utils::MockInterrupt;
//! use virtio_queue::desc::split::Descriptor;
//! use virtio_queue::desc::RawDescriptor;
//! use virtio_queue::mock::MockSplitQueue;
//! use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
//! use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let config = BalloonConfig { amount_mib: 1, ..Default::default() };
//! let mut balloon = Balloon::new(&config)?;
//! assert_eq!(balloon.device_type(), 5);
//!
//! let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x40_0000)])?;
//! let inflate = MockSplitQueue::new(&mem, 16);
//! let deflate = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 16);
//! // The driver inflates by pages 0x100 and 0x101 (PFNs at 0x8000).
//! mem.write_obj(0x100u32, GuestAddress(0x8000))?;
//! mem.write_obj(0x101u32, GuestAddress(0x8004))?;
//! inflate.add_desc_chains(&[RawDescriptor::from(Descriptor::new(0x8000, 8, 0, 0))], 0)?;
//!
//! balloon.ack_features(balloon.features());
//! let queues = [(0, &inflate), (1, &deflate)]
//!     .into_iter()
//!     .map(|(index, q)| {
//!         Ok(ActiveQueue { index, queue: q.create_queue()?, notify: EventFd::new(EFD_NONBLOCK)? })
//!     })
//!     .collect::<Result<Vec<_>, Box<dyn std::error::Error>>>()?;
//! balloon.activate(mem.clone(), queues, Arc::new(MockInterrupt::default()))?;
//! balloon.process_inflate_queue()?;
//!
//! assert_eq!(inflate.used().idx().load(), 1);
//! assert_eq!(balloon.metrics().inflate_count.count(), 1);
//! // Pages 0x100 and 0x101 went back to the host: they read as zeroes.
//! assert_eq!(mem.read_obj::<u64>(GuestAddress(0x10_0000))?, 0);
//! # Ok(())
//! # }
//! ```

#![deny(missing_docs)]

mod device;
mod event_handler;
mod metrics;
mod parse;
mod release;
mod state;

#[cfg(test)]
mod tests;

use std::io;

pub use device::{Balloon, HintingState, HintingStatus, StartHintingCmd, INFLATE_BATCH_PFNS};
pub use metrics::BalloonMetrics;
pub use parse::{
    parse_pfns, parse_ranges, parse_stats, pfn_ranges, BalloonStats, ChainError, HintChain,
    HINT_CMD_DONE, HINT_CMD_STOP,
};
pub use release::{release, ReleaseError};
pub use state::{BalloonState, BalloonStateError};

/// Size of each queue (Firecracker's).
pub const QUEUE_SIZE: u16 = 256;

/// Size of the configuration space: `num_pages`, `actual` and
/// `free_page_hint_cmd_id`, each a little-endian u32 (virtio 1.2 §5.5.4).
pub const CONFIG_SPACE_SIZE: usize = 12;

/// The balloon counts in 4 KiB pages whatever the host page size
/// (virtio 1.2 §5.5.6: "VIRTIO_BALLOON_PFN_SHIFT").
pub const PAGE_SHIFT: u32 = 12;

/// Bytes in a balloon page.
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;

/// Balloon pages in a MiB.
pub const PAGES_PER_MIB: u32 = 256;

/// Most PFNs one inflate or deflate chain may carry: Linux sends at most
/// 256 (`VIRTIO_BALLOON_ARRAY_PFNS_MAX`), as Firecracker accepts.
pub const MAX_PFNS_PER_CHAIN: usize = 256;

/// Most statistics one chain may carry (virtio 1.2 defines 16 tags; Linux
/// 6.12 added more, so there is room to grow while the work stays bounded).
pub const MAX_STATS_TAGS: usize = 256;

/// Most bytes of statistics one chain may carry.
pub const MAX_STATS_BYTES: usize = MAX_STATS_TAGS * STAT_SIZE;

/// Size of one statistic on the wire: `le16 tag; le64 val;`, packed.
pub const STAT_SIZE: usize = 10;

/// Feature bit: the statistics queue.
pub const VIRTIO_BALLOON_F_STATS_VQ: u32 = 1;
/// Feature bit: the driver deflates the balloon when the guest runs out of
/// memory.
pub const VIRTIO_BALLOON_F_DEFLATE_ON_OOM: u32 = 2;
/// Feature bit: the free page hinting queue.
pub const VIRTIO_BALLOON_F_FREE_PAGE_HINT: u32 = 3;
/// Feature bit: the free page reporting queue.
pub const VIRTIO_BALLOON_F_REPORTING: u32 = 5;

/// What a balloon is built from (Firecracker's `BalloonDeviceConfig`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BalloonConfig {
    /// Initial target, in MiB.
    pub amount_mib: u32,
    /// Offer VIRTIO_BALLOON_F_DEFLATE_ON_OOM.
    pub deflate_on_oom: bool,
    /// Seconds between statistics requests; 0 leaves the statistics queue
    /// out.
    pub stats_polling_interval_s: u16,
    /// Offer free page hinting.
    pub free_page_hinting: bool,
    /// Offer free page reporting.
    pub free_page_reporting: bool,
}

/// Target in MiB to pages, refused when it does not fit the 32-bit
/// `num_pages` field.
pub fn mib_to_pages(mib: u32) -> Result<u32, Error> {
    mib.checked_mul(PAGES_PER_MIB)
        .ok_or(Error::TooMuchMemoryRequested(mib))
}

/// Pages to whole MiB (rounded down, as Firecracker reports them).
pub fn pages_to_mib(pages: u32) -> u32 {
    pages / PAGES_PER_MIB
}

/// Errors building, driving or updating a balloon. The messages are
/// Firecracker's where it has one.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An EventFd or the statistics timer could not be created or armed.
    #[error("EventFd error: {0}")]
    EventFd(#[source] io::Error),
    /// The operation needs a running device.
    #[error("Device not activated yet.")]
    DeviceNotActive,
    /// A hinting call on a balloon configured without hinting.
    #[error("Attempting to use hinting when not enabled")]
    HintingNotEnabled,
    /// Statistics asked of a balloon configured without them.
    #[error("Received stats query when stats are disabled.")]
    StatisticsDisabled,
    /// The polling interval cannot go from 0 to more or back once built.
    #[error("Statistics cannot be enabled/disabled after activation.")]
    StatisticsStateChange,
    /// A target above guest memory, or beyond 32 bits of pages.
    #[error("Requested memory should be less than {0}MiB")]
    TooMuchMemoryRequested(u32),
    /// The driver could not be interrupted.
    #[error("Received error while sending an interrupt: {0}")]
    Interrupt(#[source] io::Error),
    /// The queue is unusable (the driver corrupted its rings).
    #[error("virtqueue error: {0}")]
    Queue(#[source] virtio_queue::Error),
}
