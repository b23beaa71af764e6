// SPDX-License-Identifier: Apache-2.0

//! Vsock device counters, named as Firecracker's `vsock` metrics, plus three
//! of Ember's own for packets the device refused.

use ember_metrics::{Counter, Metric, MetricGroup, MetricWriter};

macro_rules! vsock_metrics {
    ($( $(#[$doc:meta])* $name:ident ),* $(,)?) => {
        /// Counters of one vsock device. Monotonic; readable from any
        /// thread. Reports itself as Firecracker's `vsock` group
        /// ([`MetricGroup`]).
        #[derive(Debug, Default)]
        pub struct VsockMetrics {
            $( pub(crate) $name: Counter, )*
        }

        impl VsockMetrics {
            $(
                $(#[$doc])*
                pub fn $name(&self) -> u64 {
                    self.$name.count()
                }
            )*
        }

        impl MetricGroup for VsockMetrics {
            fn report(&self, out: &mut dyn MetricWriter) {
                $( self.$name.report(stringify!($name), out); )*
            }
        }
    };
}

vsock_metrics! {
    /// Activations refused (wrong queues, already active, EventFd failure).
    activate_fails,
    /// Writes to the read-only configuration space.
    cfg_fails,
    /// RX queue events that could not be handled (EventFd read failure, or a
    /// driver that published more buffers than the queue holds).
    rx_queue_event_fails,
    /// TX queue events that could not be handled.
    tx_queue_event_fails,
    /// Event queue events that could not be handled, and transport resets
    /// that found no event buffer.
    ev_queue_event_fails,
    /// Backend events that could not be handled (accept or registration
    /// failures, events for unknown descriptors).
    muxer_event_fails,
    /// Connection events that were not expected (writable with nothing to
    /// write).
    conn_event_fails,
    /// RX queue notifications handled.
    rx_queue_event_count,
    /// TX queue notifications handled.
    tx_queue_event_count,
    /// Bytes read from host sockets and delivered to the guest.
    rx_bytes_count,
    /// Bytes from the guest written to host sockets.
    tx_bytes_count,
    /// Packets delivered to the guest.
    rx_packets_count,
    /// Well-formed packets received from the guest.
    tx_packets_count,
    /// Connections created (host- or guest-initiated).
    conns_added,
    /// Connections reset by the device (timeout, I/O error, protocol
    /// violation, transport reset).
    conns_killed,
    /// Connections removed.
    conns_removed,
    /// Kill queue resynchronisations. Ember's kill queue is an ordered set
    /// that never needs one: always 0, kept for Firecracker's format.
    killq_resync,
    /// Failures to flush buffered guest data to a host socket.
    tx_flush_fails,
    /// Failures to write guest data to a host socket.
    tx_write_fails,
    /// Failures to read from a host socket.
    rx_read_fails,
    /// TX descriptor chains that were not a valid packet (short header,
    /// `len` larger than the chain or than 64 KiB, wrong direction, outside
    /// guest memory). Returned unused, nothing answered.
    tx_malformed_packets,
    /// Well-formed TX packets dropped without an answer: wrong source CID
    /// (not the guest's) or destination CID (not the host's).
    tx_dropped_packets,
    /// RX descriptor chains that could not hold a packet (shorter than the
    /// header, wrong direction, outside guest memory). Returned unused.
    rx_malformed_buffers,
}

pub(crate) fn inc(counter: &Counter) {
    counter.inc();
}

pub(crate) fn add(counter: &Counter, n: u64) {
    counter.add(n);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_firecracker_names() {
        let m = VsockMetrics::default();
        inc(&m.conns_added);
        add(&m.rx_bytes_count, 42);
        let snap = ember_metrics::totals(&m);
        assert_eq!(snap.len(), 23);
        assert!(snap.contains(&("conns_added", 1)));
        assert!(snap.contains(&("rx_bytes_count", 42)));
        assert_eq!(m.rx_bytes_count(), 42);
        // Reporting takes nothing away.
        assert_eq!(ember_metrics::totals(&m), snap);
        for name in [
            "activate_fails",
            "cfg_fails",
            "rx_queue_event_fails",
            "tx_queue_event_fails",
            "ev_queue_event_fails",
            "muxer_event_fails",
            "conn_event_fails",
            "rx_queue_event_count",
            "tx_queue_event_count",
            "rx_packets_count",
            "tx_packets_count",
            "conns_killed",
            "conns_removed",
            "killq_resync",
            "tx_flush_fails",
            "tx_write_fails",
            "rx_read_fails",
        ] {
            assert!(snap.iter().any(|(n, _)| *n == name), "{name} missing");
        }
    }
}
