// SPDX-License-Identifier: Apache-2.0

//! Block device counters, named as Firecracker names them where it has one.
//!
//! The struct reports itself as Firecracker's `block` group
//! ([`MetricGroup`](ember_metrics::MetricGroup)): Firecracker's fields
//! first, then Ember's own (`discard_count`, `write_zeroes_count`,
//! `io_completion_event_count`, `interrupts`).

use ember_metrics::{metric_group, Counter};

metric_group! {
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
        /// Rate limiter timer events handled.
        pub rate_limiter_event_count: Counter,
        /// Backing files replaced on a running device
        /// ([`Block::update_backing_file`](crate::Block::update_backing_file)).
        pub update_count: Counter,
        /// Backing file replacements refused or failed.
        pub update_fails: Counter,
        /// Bytes read from the disk into guest memory.
        pub read_bytes: Counter,
        /// Bytes written from guest memory to the disk.
        pub write_bytes: Counter,
        /// Successful reads.
        pub read_count: Counter,
        /// Successful writes.
        pub write_count: Counter,
        /// Requests (or queue notifications) held back by the rate limiter.
        pub rate_limiter_throttled_events: Counter,
        /// Times the io_uring was full and processing paused until completions.
        pub io_engine_throttled_events: Counter,
        /// Successful discards.
        pub discard_count: Counter,
        /// Successful write zeroes.
        pub write_zeroes_count: Counter,
        /// Completion events handled (async engine).
        pub io_completion_event_count: Counter,
        /// Used-buffer interrupts sent.
        pub interrupts: Counter,
    }
}

#[cfg(test)]
mod tests {
    use ember_metrics::totals;

    use super::*;

    #[test]
    fn reports_every_counter_by_its_total() {
        let m = BlockMetrics::default();
        m.read_count.add(3);
        m.write_bytes.add(4096);
        let t = totals(&m);
        assert_eq!(t.len(), 21);
        let get = |n: &str| t.iter().find(|(f, _)| *f == n).unwrap().1;
        assert_eq!(get("read_count"), 3);
        assert_eq!(get("write_bytes"), 4096);
        assert_eq!(get("flush_count"), 0);
        m.read_count.inc();
        assert!(totals(&m).contains(&("read_count", 4)));
    }

    #[test]
    fn field_order_is_firecracker_then_ember() {
        let names: Vec<&str> = totals(&BlockMetrics::default())
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(
            names,
            [
                "activate_fails",
                "cfg_fails",
                "no_avail_buffer",
                "event_fails",
                "execute_fails",
                "invalid_reqs_count",
                "flush_count",
                "queue_event_count",
                "rate_limiter_event_count",
                "update_count",
                "update_fails",
                "read_bytes",
                "write_bytes",
                "read_count",
                "write_count",
                "rate_limiter_throttled_events",
                "io_engine_throttled_events",
                "discard_count",
                "write_zeroes_count",
                "io_completion_event_count",
                "interrupts",
            ]
        );
    }
}
