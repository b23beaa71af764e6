// SPDX-License-Identifier: Apache-2.0

//! A virtio entropy device (virtio-rng, virtio 1.2 §5.4): Firecracker's
//! `entropy` device.
//!
//! [`Entropy`] implements [`ember_virtio::VirtioDevice`]: device type 4, one
//! request queue of [`QUEUE_SIZE`] entries, no configuration space, and the
//! features VIRTIO_F_VERSION_1 and VIRTIO_RING_F_EVENT_IDX. Every chain the
//! driver posts is a request for random bytes: its device-writable buffers
//! are filled from the host's `getrandom(2)` (see [`random_bytes`]), up to
//! [`MAX_REQUEST_BYTES`] per chain (Firecracker's cap), and the chain is returned with the number
//! of bytes written as its used length.
//!
//! Guest input is untrusted: a chain with a device-readable descriptor, or
//! with a buffer outside guest memory, is returned with length 0 and
//! counted (`entropy_event_fails`), and nothing is written; the work per
//! chain is bounded by the cap and by the chain length virtio-queue allows.
//!
//! A [`RateLimiter`](ember_rate_limiter::RateLimiter) may limit the device
//! as Firecracker's does: one operation per request and, in the bandwidth
//! bucket, the bytes the request gets. A request it refuses goes back to
//! the available ring; the limiter's timer resumes the queue.
//!
//! # Driving the device
//!
//! As the block, network and vsock devices, [`Entropy`] is also an
//! [`event_manager::MutEventSubscriber`]: added to the VMM's event loop it
//! watches a control EventFd and the rate limiter's timer; `activate` and
//! `reset` (on a vCPU thread) signal the control EventFd, and the event loop
//! then starts or stops watching the queue's notify EventFd. A VMM with a
//! loop of its own can call [`Entropy::handle_queue_event`] and
//! [`Entropy::handle_rate_limiter_event`] instead.
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//!
//! use ember_virtio::{ActiveQueue, VirtioDevice};
//! use ember_virtio_mmio::test_utils::MockInterrupt;
//! use ember_virtio_rng::{Entropy, EntropyConfig};
//! use virtio_queue::desc::split::Descriptor;
//! use virtio_queue::desc::RawDescriptor;
//! use virtio_queue::mock::MockSplitQueue;
//! use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
//! use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut rng = Entropy::new(&EntropyConfig::default())?;
//! assert_eq!(rng.device_type(), 4);
//!
//! // A driver posts one device-writable buffer of 64 bytes.
//! let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)])?;
//! let vq = MockSplitQueue::new(&mem, 16);
//! let write = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;
//! let desc = RawDescriptor::from(Descriptor::new(0x8000, 64, write, 0));
//! vq.add_desc_chains(&[desc], 0)?;
//!
//! rng.ack_features(rng.features());
//! let queue = ActiveQueue { index: 0, queue: vq.create_queue()?, notify: EventFd::new(EFD_NONBLOCK)? };
//! rng.activate(mem.clone(), vec![queue], Arc::new(MockInterrupt::default()))?;
//! rng.process_queue()?;
//!
//! // The chain came back with 64 bytes written.
//! assert_eq!(vq.used().idx().load(), 1);
//! assert_eq!(vq.used().ring().ref_at(0)?.load().len(), 64);
//! assert_eq!(rng.metrics().entropy_bytes.count(), 64);
//! # Ok(())
//! # }
//! ```

#![deny(missing_docs)]

mod device;
mod event_handler;
mod metrics;
mod state;

#[cfg(test)]
mod tests;

use std::io;

pub use ember_rate_limiter::{BucketSpec, BucketUpdate, RateLimiterConfig};

pub use device::{fill_chain, random_bytes, ChainError, Entropy, Request, DIRECT_MAX_BYTES};
pub use metrics::EntropyMetrics;
pub use state::{EntropyState, EntropyStateError};

/// Size of the one request queue (Firecracker's).
pub const QUEUE_SIZE: u16 = 256;

/// Most bytes one request gets, whatever the size of its buffers
/// (Firecracker's `MAX_ENTROPY_BYTES`): it bounds the time and host memory
/// one chain takes. A driver that wants more posts more chains.
pub const MAX_REQUEST_BYTES: u32 = 64 * 1024;

/// What an entropy device is built from (Firecracker's
/// `EntropyDeviceConfig`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EntropyConfig {
    /// Rate limits on the device's requests (none by default).
    pub rate_limiter: RateLimiterConfig,
}

/// Errors building or running an entropy device.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The EventFd that tells the event loop about activation and reset
    /// could not be created.
    #[error("cannot create the entropy device's control EventFd: {0}")]
    EventFd(#[source] io::Error),
    /// The rate limiter's timer could not be set up.
    #[error("cannot set up the entropy device's rate limiter: {0}")]
    RateLimiter(#[source] ember_rate_limiter::Error),
    /// The queue is unusable (the driver corrupted its rings).
    #[error("virtqueue error: {0}")]
    Queue(#[source] virtio_queue::Error),
}
