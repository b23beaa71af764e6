// SPDX-License-Identifier: Apache-2.0

//! Metric value types shared by every Ember crate: a [`Counter`] of events
//! and a [`Gauge`] holding a value, both atomic and lock-free, both
//! [`Serialize`] into what Firecracker's metrics line expects.
//!
//! A counter only grows. Read directly ([`Counter::count`]) it gives the
//! total so far; serialized it gives the growth since it was last
//! serialized, as Firecracker's `SharedIncMetric` does, so each metrics line
//! reports what happened since the previous one. A gauge
//! (Firecracker's `SharedStoreMetric`) serializes as its value.
//!
//! A device crate declares its metrics as a plain struct of these types and
//! derives `Serialize`; the struct then writes its own group of the line.
//!
//! # Example
//!
//! ```
//! use ember_metrics::{Counter, Gauge};
//! use serde::Serialize;
//!
//! #[derive(Default, Serialize)]
//! struct DiskMetrics {
//!     read_count: Counter,
//!     queue_size: Gauge,
//! }
//!
//! let m = DiskMetrics::default();
//! m.read_count.add(3);
//! m.queue_size.set(256);
//! assert_eq!(
//!     serde_json::to_string(&m).unwrap(),
//!     r#"{"read_count":3,"queue_size":256}"#
//! );
//! m.read_count.inc();
//! // The second line shows only what was counted since the first.
//! assert_eq!(
//!     serde_json::to_string(&m).unwrap(),
//!     r#"{"read_count":1,"queue_size":256}"#
//! );
//! assert_eq!(m.read_count.count(), 4);
//! ```

#![deny(missing_docs)]

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Serialize, Serializer};

/// A cumulative event counter, shared between threads without a lock.
///
/// Incrementing costs one relaxed atomic add. Serializing it writes the
/// growth since the previous serialization and remembers the total, as
/// Firecracker's `SharedIncMetric` does.
#[derive(Debug, Default)]
pub struct Counter {
    /// Everything counted so far.
    total: AtomicU64,
    /// `total` as of the last serialization.
    reported: AtomicU64,
}

impl Counter {
    /// A counter at zero.
    pub const fn new() -> Self {
        Counter {
            total: AtomicU64::new(0),
            reported: AtomicU64::new(0),
        }
    }

    /// Adds one.
    #[inline]
    pub fn inc(&self) {
        self.add(1);
    }

    /// Adds `n`.
    #[inline]
    pub fn add(&self, n: u64) {
        // Relaxed: counters order nothing, readers only want a total.
        self.total.fetch_add(n, Ordering::Relaxed);
    }

    /// Everything counted so far.
    pub fn count(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// The growth since the last serialization, without marking it as
    /// reported (Firecracker's `fetch_diff`): what aggregating several
    /// devices into one group adds up.
    pub fn fetch_diff(&self) -> u64 {
        self.count()
            .wrapping_sub(self.reported.load(Ordering::Relaxed))
    }
}

impl Serialize for Counter {
    /// The growth since the previous serialization; the current total
    /// becomes the new reference.
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let total = self.count();
        let before = self.reported.swap(total, Ordering::Relaxed);
        serializer.serialize_u64(total.wrapping_sub(before))
    }
}

/// A value reported as it is (a duration, a size): Firecracker's
/// `SharedStoreMetric`.
#[derive(Debug, Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    /// A gauge at zero.
    pub const fn new() -> Self {
        Gauge(AtomicU64::new(0))
    }

    /// Sets the value.
    #[inline]
    pub fn set(&self, value: u64) {
        self.0.store(value, Ordering::Relaxed);
    }

    /// The value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

impl Serialize for Gauge {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u64(self.get())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn counter_serializes_the_growth_since_the_last_line() {
        let c = Counter::new();
        assert_eq!(serde_json::to_string(&c).unwrap(), "0");
        c.add(5);
        c.inc();
        assert_eq!(c.fetch_diff(), 6);
        // fetch_diff marks nothing.
        assert_eq!(c.fetch_diff(), 6);
        assert_eq!(serde_json::to_string(&c).unwrap(), "6");
        assert_eq!(serde_json::to_string(&c).unwrap(), "0");
        c.add(2);
        assert_eq!(serde_json::to_string(&c).unwrap(), "2");
        assert_eq!(c.count(), 8);
        assert_eq!(c.fetch_diff(), 0);
    }

    #[test]
    fn counter_survives_wrapping_the_total() {
        let c = Counter::new();
        c.add(u64::MAX);
        assert_eq!(serde_json::to_string(&c).unwrap(), u64::MAX.to_string());
        c.add(3);
        assert_eq!(serde_json::to_string(&c).unwrap(), "3");
    }

    #[test]
    fn gauge_serializes_its_value_every_time() {
        let g = Gauge::new();
        g.set(42);
        assert_eq!(serde_json::to_string(&g).unwrap(), "42");
        assert_eq!(serde_json::to_string(&g).unwrap(), "42");
        g.set(7);
        assert_eq!(g.get(), 7);
        assert_eq!(serde_json::to_string(&g).unwrap(), "7");
    }

    #[test]
    fn counter_counts_from_many_threads() {
        let c = Arc::new(Counter::new());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let c = c.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        c.inc();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(c.count(), 4000);
        assert_eq!(serde_json::to_string(&*c).unwrap(), "4000");
    }
}
