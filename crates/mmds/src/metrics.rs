// SPDX-License-Identifier: Apache-2.0

//! MMDS counters, named and ordered as Firecracker's `mmds` metrics group.

use ember_metrics::{metric_group, Counter};

metric_group! {
    /// Counters of the metadata service, shared by every interface it
    /// answers on; reported as Firecracker's `mmds` group.
    #[derive(Debug, Default)]
    pub struct MmdsMetrics {
        /// Frames the guest sent to the MMDS address, detoured from the TAP.
        pub rx_accepted: Counter,
        /// Detoured frames the stack could not handle (a malformed IPv4
        /// packet or TCP segment).
        pub rx_accepted_err: Counter,
        /// Unusual detoured traffic: non-TCP IPv4, segments refused by the
        /// TCP state machine, connections reset.
        pub rx_accepted_unusual: Counter,
        /// Detoured buffers that were not valid Ethernet frames.
        pub rx_bad_eth: Counter,
        /// GET requests with a token that is not valid (wrong or expired).
        pub rx_invalid_token: Counter,
        /// GET requests without a token.
        pub rx_no_token: Counter,
        /// TCP segments received and accepted by the stack.
        pub rx_count: Counter,
        /// Bytes of the frames the stack wrote for the guest.
        pub tx_bytes: Counter,
        /// Frames the stack produced (ARP replies and TCP segments).
        pub tx_count: Counter,
        /// Frames the stack failed to write (receive buffer too small).
        pub tx_errors: Counter,
        /// Frames delivered to the guest's receive queue.
        pub tx_frames: Counter,
        /// TCP connections accepted.
        pub connections_created: Counter,
        /// TCP connections closed, reset, or evicted.
        pub connections_destroyed: Counter,
    }
}
