// SPDX-License-Identifier: Apache-2.0

//! Network device counters, named as Firecracker names its net metrics.
//!
//! The struct reports itself as Firecracker's `net` group
//! ([`MetricGroup`](ember_metrics::MetricGroup)), in Firecracker's order.

use ember_metrics::{metric_group, Counter};

metric_group! {
    /// Counters of one network device.
    ///
    /// Every transmit chain the device pops ends in exactly one of
    /// `tx_packets_count`, `tx_fails`, `tx_malformed_frames` and
    /// `tap_write_fails`.
    #[derive(Debug, Default)]
    pub struct NetMetrics {
        /// Activations refused (wrong queues, already active, TAP offload
        /// setup failed).
        pub activate_fails: Counter,
        /// Driver writes to the (read-only) configuration space.
        pub cfg_fails: Counter,
        /// Times the device had a frame to receive, or was asked to, but the
        /// driver had posted no receive buffer.
        pub no_rx_avail_buffer: Counter,
        /// Transmit queue notifications that found no chain to send.
        pub no_tx_avail_buffer: Counter,
        /// Failures to read an EventFd, signal the interrupt, (un)register with
        /// the event loop, or walk the rings of a misbehaving driver.
        pub event_fails: Counter,
        /// Receive queue notifications handled.
        pub rx_queue_event_count: Counter,
        /// Receive rate limiter timer events handled.
        pub rx_event_rate_limiter_count: Counter,
        /// Frames (or receive events) held back by the receive rate limiter.
        pub rx_rate_limiter_throttled: Counter,
        /// TAP readiness events handled.
        pub rx_tap_event_count: Counter,
        /// Bytes delivered to the guest, virtio-net headers included.
        pub rx_bytes_count: Counter,
        /// Frames delivered to the guest.
        pub rx_packets_count: Counter,
        /// Receive errors: unusable receive chains (returned unused) and frames
        /// dropped because they did not fit (also in `rx_frames_too_big`) or
        /// could not be written to guest memory.
        pub rx_fails: Counter,
        /// Successful frame reads from the TAP delivered to the guest.
        pub rx_count: Counter,
        /// Frames read from the TAP and dropped because they were larger than
        /// the receive chain they were read for (with mergeable receive
        /// buffers: than all the chains of a full receive ring).
        pub rx_frames_too_big: Counter,
        /// TAP reads that failed with an error other than "no frame".
        pub tap_read_fails: Counter,
        /// TAP writes that failed (the frame is dropped).
        pub tap_write_fails: Counter,
        /// Bytes sent to the TAP, virtio-net headers included.
        pub tx_bytes_count: Counter,
        /// Transmit chains dropped for their size: shorter than the virtio-net
        /// and Ethernet headers, or longer than [`MAX_BUFFER_SIZE`].
        ///
        /// [`MAX_BUFFER_SIZE`]: crate::MAX_BUFFER_SIZE
        pub tx_malformed_frames: Counter,
        /// Transmit chains dropped for their descriptors: a device-writable
        /// descriptor, a buffer outside guest memory, or a broken `next` link.
        pub tx_fails: Counter,
        /// Successful TAP writes.
        pub tx_count: Counter,
        /// Frames sent to the TAP.
        pub tx_packets_count: Counter,
        /// Transmit queue notifications handled.
        pub tx_queue_event_count: Counter,
        /// Transmit rate limiter timer events handled.
        pub tx_rate_limiter_event_count: Counter,
        /// Frames (or transmit events) held back by the transmit rate
        /// limiter.
        pub tx_rate_limiter_throttled: Counter,
        /// Frames sent whose source MAC is not the configured guest MAC (they are
        /// still sent).
        pub tx_spoofed_mac_count: Counter,
    }
}

#[cfg(test)]
mod tests {
    use ember_metrics::totals;

    use super::*;

    #[test]
    fn reports_firecracker_names_in_order() {
        let m = NetMetrics::default();
        m.rx_bytes_count.add(1500);
        m.tx_packets_count.inc();
        let t = totals(&m);
        let names: Vec<&str> = t.iter().map(|(n, _)| *n).collect();
        assert_eq!(
            names,
            [
                "activate_fails",
                "cfg_fails",
                "no_rx_avail_buffer",
                "no_tx_avail_buffer",
                "event_fails",
                "rx_queue_event_count",
                "rx_event_rate_limiter_count",
                "rx_rate_limiter_throttled",
                "rx_tap_event_count",
                "rx_bytes_count",
                "rx_packets_count",
                "rx_fails",
                "rx_count",
                "rx_frames_too_big",
                "tap_read_fails",
                "tap_write_fails",
                "tx_bytes_count",
                "tx_malformed_frames",
                "tx_fails",
                "tx_count",
                "tx_packets_count",
                "tx_queue_event_count",
                "tx_rate_limiter_event_count",
                "tx_rate_limiter_throttled",
                "tx_spoofed_mac_count",
            ]
        );
        assert!(t.contains(&("rx_bytes_count", 1500)));
        assert!(t.contains(&("tx_packets_count", 1)));
        assert!(t.contains(&("rx_fails", 0)));
        assert_eq!(m.rx_bytes_count.count(), 1500);
    }
}
