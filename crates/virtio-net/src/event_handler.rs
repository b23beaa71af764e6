// SPDX-License-Identifier: Apache-2.0

//! How the device joins an event-manager event loop.
//!
//! Before activation the device watches only its control EventFd and its
//! rate limiters' timers. The
//! transport activates and resets the device from a vCPU thread, which
//! cannot touch the event loop's registrations; both signal the control
//! EventFd instead, and the event loop then registers (or unregisters) the
//! queue notification EventFds and the TAP. The control EventFd stays
//! registered for the device's lifetime so that a reset, and a later
//! activation, can reach the event loop.

use std::os::fd::AsRawFd;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use log::{error, warn};

use crate::device::Net;

/// Event data: the control EventFd.
const CONTROL: u32 = 0;
/// Event data: the receive queue notification.
const RX_QUEUE: u32 = 1;
/// Event data: the transmit queue notification.
const TX_QUEUE: u32 = 2;
/// Event data: the TAP is readable.
const TAP: u32 = 3;
/// Event data: the receive rate limiter's timer.
const RX_RATE_LIMITER: u32 = 4;
/// Event data: the transmit rate limiter's timer.
const TX_RATE_LIMITER: u32 = 5;

impl Net {
    /// Makes the event loop's registrations match the device state: drops
    /// those of a previous activation, then, when active, watches both
    /// queues and the TAP.
    fn sync_registrations(&mut self, ops: &mut EventOps) {
        // The TAP is edge-triggered: the device reads it until it is empty
        // or the guest runs out of buffers, and a receive queue notification
        // resumes reading in the second case. Readiness that predates the
        // registration is reported once, so frames that arrived before
        // activation are not forgotten.
        let wanted: Vec<_> = match &self.active {
            Some(active) => vec![
                (active.rx_notify.as_raw_fd(), RX_QUEUE, EventSet::IN),
                (active.tx_notify.as_raw_fd(), TX_QUEUE, EventSet::IN),
                (self.tap_fd(), TAP, EventSet::IN | EventSet::EDGE_TRIGGERED),
            ],
            None => Vec::new(),
        };
        for e in self.registrations.sync(ops, &wanted) {
            self.metrics().event_fails.inc();
            error!("virtio-net: {e}");
        }
    }

    fn handle_control_event(&mut self, ops: &mut EventOps) {
        if let Err(e) = self.control_evt.read() {
            if e.kind() != std::io::ErrorKind::WouldBlock {
                self.metrics().event_fails.inc();
                error!("virtio-net: failed to read the control EventFd: {e}");
            }
        }
        self.sync_registrations(ops);
    }
}

impl MutEventSubscriber for Net {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let data = events.data();
        if !events.event_set().contains(EventSet::IN) {
            self.metrics().event_fails.inc();
            warn!(
                "virtio-net: unexpected event {:?} on source {data}",
                events.event_set()
            );
            return;
        }
        match data {
            CONTROL => self.handle_control_event(ops),
            RX_QUEUE => self.handle_rx_queue_event(),
            TX_QUEUE => self.handle_tx_queue_event(),
            TAP => self.handle_tap_event(),
            RX_RATE_LIMITER => self.handle_rx_rate_limiter_event(),
            TX_RATE_LIMITER => self.handle_tx_rate_limiter_event(),
            _ => {
                self.metrics().event_fails.inc();
                warn!("virtio-net: event from unknown source {data}");
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        self.subscribed = true;
        if let Err(e) = ops.add(Events::with_data(&self.control_evt, CONTROL, EventSet::IN)) {
            self.metrics().event_fails.inc();
            error!("virtio-net: cannot register the control EventFd: {e}");
        }
        // The rate limiters' timers, for the device's lifetime.
        for (fd, data) in [
            (self.rx_rate_limiter_fd(), RX_RATE_LIMITER),
            (self.tx_rate_limiter_fd(), TX_RATE_LIMITER),
        ] {
            if let Err(e) = ops.add(Events::with_data_raw(fd, data, EventSet::IN)) {
                self.metrics().event_fails.inc();
                error!("virtio-net: cannot watch a rate limiter's timer: {e}");
            }
        }
        // Added to the event loop after activation: start watching now.
        if self.active.is_some() {
            self.sync_registrations(ops);
        }
    }
}
