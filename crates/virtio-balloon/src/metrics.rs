// SPDX-License-Identifier: Apache-2.0

//! Balloon counters, with the names of Firecracker's
//! `BalloonDeviceMetrics`.
//!
//! The struct reports itself as Firecracker's `balloon` group
//! ([`MetricGroup`](ember_metrics::MetricGroup)).

use ember_metrics::{metric_group, Counter};

metric_group! {
    /// Counters of the balloon device.
    #[derive(Debug, Default)]
    pub struct BalloonMetrics {
        /// Activations refused (wrong queues, already active).
        pub activate_fails: Counter,
        /// Inflate queue notifications handled.
        pub inflate_count: Counter,
        /// Statistics buffers received from the driver.
        pub stats_updates_count: Counter,
        /// Statistics the device could not take: malformed statistics
        /// chains and unknown tags.
        pub stats_update_fails: Counter,
        /// Deflate queue notifications handled.
        pub deflate_count: Counter,
        /// Failures handling the queues: malformed chains, ranges the host
        /// refused to release, EventFd, used ring and interrupt failures.
        pub event_fails: Counter,
        /// Ranges received on the free page reporting queue.
        pub free_page_report_count: Counter,
        /// Bytes released through free page reporting.
        pub free_page_report_freed: Counter,
        /// Reported ranges that were not released.
        pub free_page_report_fails: Counter,
        /// Ranges received on the free page hinting queue during a run.
        pub free_page_hint_count: Counter,
        /// Bytes released through free page hinting.
        pub free_page_hint_freed: Counter,
        /// Hinted ranges that were not released.
        pub free_page_hint_fails: Counter,
    }
}

#[cfg(test)]
mod tests {
    use ember_metrics::totals;

    use super::*;

    #[test]
    fn field_names_are_firecrackers() {
        let m = BalloonMetrics::default();
        m.inflate_count.inc();
        let names: Vec<&str> = totals(&m).into_iter().map(|(n, _)| n).collect();
        // Firecracker's BalloonDeviceMetrics, in its order.
        assert_eq!(
            names,
            [
                "activate_fails",
                "inflate_count",
                "stats_updates_count",
                "stats_update_fails",
                "deflate_count",
                "event_fails",
                "free_page_report_count",
                "free_page_report_freed",
                "free_page_report_fails",
                "free_page_hint_count",
                "free_page_hint_freed",
                "free_page_hint_fails",
            ]
        );
        assert!(totals(&m).contains(&("inflate_count", 1)));
    }
}
