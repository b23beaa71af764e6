// SPDX-License-Identifier: Apache-2.0

//! Entropy device counters, with the names of Firecracker's
//! `EntropyDeviceMetrics`.
//!
//! The struct reports itself as Firecracker's `entropy` group
//! ([`MetricGroup`](ember_metrics::MetricGroup)).

use ember_metrics::{metric_group, Counter};

metric_group! {
    /// Counters of the entropy device.
    #[derive(Debug, Default)]
    pub struct EntropyMetrics {
        /// Activations refused (wrong queues, already active).
        pub activate_fails: Counter,
        /// Requests that were not served: chains with a device-readable
        /// descriptor or a buffer outside guest memory, host RNG failures,
        /// and failures to read an EventFd, update the used ring or signal
        /// the interrupt.
        pub entropy_event_fails: Counter,
        /// Requests (descriptor chains) handled, throttled ones included.
        pub entropy_event_count: Counter,
        /// Random bytes written into guest memory.
        pub entropy_bytes: Counter,
        /// Times the host's `getrandom` failed.
        pub host_rng_fails: Counter,
        /// Requests held back by the rate limiter.
        pub entropy_rate_limiter_throttled: Counter,
        /// Rate limiter timer events handled.
        pub rate_limiter_event_count: Counter,
    }
}

#[cfg(test)]
mod tests {
    use ember_metrics::totals;

    use super::*;

    #[test]
    fn field_names_are_firecrackers() {
        let m = EntropyMetrics::default();
        m.entropy_bytes.add(64);
        let names: Vec<&str> = totals(&m).into_iter().map(|(n, _)| n).collect();
        // Firecracker's EntropyDeviceMetrics, in its order.
        assert_eq!(
            names,
            [
                "activate_fails",
                "entropy_event_fails",
                "entropy_event_count",
                "entropy_bytes",
                "host_rng_fails",
                "entropy_rate_limiter_throttled",
                "rate_limiter_event_count",
            ]
        );
        assert!(totals(&m).contains(&("entropy_bytes", 64)));
    }
}
