// SPDX-License-Identifier: Apache-2.0

//! Block device counters, named as Firecracker names them where it has one.

use std::sync::atomic::{AtomicU64, Ordering};

/// A monotonically increasing counter, readable from any thread.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }

    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// Current value.
    pub fn count(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Counters of one block device.
#[derive(Debug, Default)]
pub struct BlockMetrics {
    /// Activations refused (wrong queues, already active).
    pub activate_fails: Counter,
    /// Writes to the (read-only) configuration space.
    pub cfg_fails: Counter,
    /// Queue events that found no request to process.
    pub no_avail_buffer: Counter,
    /// Failures to read an EventFd, signal the interrupt, or walk the
    /// available ring of a misbehaving driver.
    pub event_fails: Counter,
    /// Descriptor chains that were not a valid request.
    pub execute_fails: Counter,
    /// Requests completed with a status other than VIRTIO_BLK_S_OK.
    pub invalid_reqs_count: Counter,
    /// Completed flush requests.
    pub flush_count: Counter,
    /// Queue notifications handled.
    pub queue_event_count: Counter,
    /// Bytes read from the disk into guest memory.
    pub read_bytes: Counter,
    /// Bytes written from guest memory to the disk.
    pub write_bytes: Counter,
    /// Successful reads.
    pub read_count: Counter,
    /// Successful writes.
    pub write_count: Counter,
    /// Successful discards.
    pub discard_count: Counter,
    /// Successful write zeroes.
    pub write_zeroes_count: Counter,
    /// Times the io_uring was full and processing paused until completions.
    pub io_engine_throttled_events: Counter,
    /// Completion events handled (async engine).
    pub io_completion_event_count: Counter,
    /// Used-buffer interrupts sent.
    pub interrupts: Counter,
    /// Backing files replaced on a running device
    /// ([`Block::update_backing_file`](crate::Block::update_backing_file)).
    pub update_count: Counter,
    /// Backing file replacements refused or failed.
    pub update_fails: Counter,
}
