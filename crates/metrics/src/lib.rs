// SPDX-License-Identifier: Apache-2.0

//! Metric value types shared by every Ember crate: a [`Counter`] of events
//! and a [`Gauge`] holding a value, both atomic and lock-free, and the
//! [`MetricGroup`] contract through which a struct of them reports itself.
//!
//! A counter only grows; a gauge (Firecracker's `SharedStoreMetric`) holds a
//! value. A group reports each counter's total and each gauge's value to a
//! [`MetricWriter`]; the metrics writer turns totals into Firecracker's
//! per-line growth, so one group can be reported under several names (the
//! aggregate `block` group and `block_<drive_id>`) without one report
//! stealing another's counts.
//!
//! A device crate declares its metrics once, with [`metric_group!`]: the
//! struct and its report are generated from the one list of fields, so
//! adding a counter touches one line.
//!
//! # Example
//!
//! ```
//! use ember_metrics::{metric_group, totals, Counter, Gauge};
//!
//! metric_group! {
//!     /// Counters of a disk.
//!     #[derive(Debug, Default)]
//!     pub struct DiskMetrics {
//!         /// Reads done.
//!         pub read_count: Counter,
//!         /// Queue size.
//!         pub queue_size: Gauge,
//!     }
//! }
//!
//! let m = DiskMetrics::default();
//! m.read_count.add(3);
//! m.queue_size.set(256);
//! assert_eq!(totals(&m), [("read_count", 3), ("queue_size", 256)]);
//! m.read_count.inc();
//! assert_eq!(m.read_count.count(), 4);
//! ```

#![deny(missing_docs)]

use std::sync::atomic::{AtomicU64, Ordering};

/// A cumulative event counter, shared between threads without a lock.
///
/// Incrementing costs one relaxed atomic add.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// A counter at zero.
    pub const fn new() -> Self {
        Counter(AtomicU64::new(0))
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
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// Everything counted so far.
    pub fn count(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
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

/// Receives the fields of one group, in order.
pub trait MetricWriter {
    /// A counter, by its total so far.
    fn counter(&mut self, name: &'static str, total: u64);
    /// A gauge, by its value.
    fn gauge(&mut self, name: &'static str, value: u64);
}

/// One field of a group: a [`Counter`] or a [`Gauge`].
pub trait Metric {
    /// Reports the field under `name`.
    fn report(&self, name: &'static str, out: &mut dyn MetricWriter);
}

impl Metric for Counter {
    fn report(&self, name: &'static str, out: &mut dyn MetricWriter) {
        out.counter(name, self.count());
    }
}

impl Metric for Gauge {
    fn report(&self, name: &'static str, out: &mut dyn MetricWriter) {
        out.gauge(name, self.get());
    }
}

/// Something that reports a group of metrics: a struct declared with
/// [`metric_group!`], or a closure.
pub trait MetricGroup: Send + Sync {
    /// Reports every field of the group, in a fixed order.
    fn report(&self, out: &mut dyn MetricWriter);
}

impl<F: Fn(&mut dyn MetricWriter) + Send + Sync> MetricGroup for F {
    fn report(&self, out: &mut dyn MetricWriter) {
        self(out)
    }
}

/// Every field of `group` as `(name, total or value)`, in order: for tests
/// and for readers that want plain numbers.
pub fn totals(group: &dyn MetricGroup) -> Vec<(&'static str, u64)> {
    struct Collect(Vec<(&'static str, u64)>);
    impl MetricWriter for Collect {
        fn counter(&mut self, name: &'static str, total: u64) {
            self.0.push((name, total));
        }
        fn gauge(&mut self, name: &'static str, value: u64) {
            self.0.push((name, value));
        }
    }
    let mut c = Collect(Vec::new());
    group.report(&mut c);
    c.0
}

/// Declares a struct of [`Counter`]s and [`Gauge`]s and its
/// [`MetricGroup`] report: each field reported under its own name, in
/// declaration order.
///
/// Attributes and doc comments on the struct and its fields are kept.
/// See the crate example.
#[macro_export]
macro_rules! metric_group {
    (
        $(#[$meta:meta])*
        $vis:vis struct $name:ident {
            $( $(#[$fmeta:meta])* $fvis:vis $field:ident : $ty:ty ),* $(,)?
        }
    ) => {
        $(#[$meta])*
        $vis struct $name {
            $( $(#[$fmeta])* $fvis $field: $ty, )*
        }

        impl $crate::MetricGroup for $name {
            fn report(&self, out: &mut dyn $crate::MetricWriter) {
                $( $crate::Metric::report(&self.$field, stringify!($field), out); )*
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    metric_group! {
        #[derive(Default)]
        struct Sample {
            reads: Counter,
            size: Gauge,
            writes: Counter,
        }
    }

    #[test]
    fn a_group_reports_its_fields_in_order_with_their_kind() {
        #[derive(Default)]
        struct Kinds(Vec<(&'static str, bool, u64)>);
        impl MetricWriter for Kinds {
            fn counter(&mut self, name: &'static str, total: u64) {
                self.0.push((name, true, total));
            }
            fn gauge(&mut self, name: &'static str, value: u64) {
                self.0.push((name, false, value));
            }
        }
        let s = Sample::default();
        s.reads.add(5);
        s.size.set(7);
        s.writes.inc();
        let mut k = Kinds::default();
        s.report(&mut k);
        assert_eq!(
            k.0,
            [("reads", true, 5), ("size", false, 7), ("writes", true, 1)]
        );
        // Reporting takes nothing away: a second report sees the same totals.
        assert_eq!(totals(&s), [("reads", 5), ("size", 7), ("writes", 1)]);
    }

    #[test]
    fn closures_are_groups() {
        let c = Arc::new(Counter::new());
        c.add(2);
        let c2 = c.clone();
        let g = move |out: &mut dyn MetricWriter| out.counter("x", c2.count());
        assert_eq!(totals(&g), [("x", 2)]);
    }

    #[test]
    fn counter_wraps_instead_of_panicking() {
        let c = Counter::new();
        c.add(u64::MAX);
        c.add(3);
        assert_eq!(c.count(), 2);
    }

    #[test]
    fn gauge_holds_its_last_value() {
        let g = Gauge::new();
        g.set(42);
        assert_eq!(g.get(), 42);
        g.set(7);
        assert_eq!(g.get(), 7);
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
    }
}
