// SPDX-License-Identifier: Apache-2.0

//! How the device joins an event-manager event loop, the same way the
//! block, network and vsock devices do.
//!
//! The rate limiter's timerfd is watched for the device's lifetime. The
//! queue's notify EventFd is watched only while the device is active: the
//! transport activates and resets the device from a vCPU thread, which
//! cannot touch the event loop's registrations, so both signal the control
//! EventFd, and the event loop then registers (or unregisters) the queue.

use std::os::fd::AsRawFd;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use log::{error, warn};

use crate::Entropy;

/// Event data: the control EventFd.
const CONTROL: u32 = 0;
/// Event data: the queue notification.
const QUEUE: u32 = 1;
/// Event data: the rate limiter's timer.
const RATE_LIMITER: u32 = 2;

impl Entropy {
    /// Makes the event loop's registrations match the device state: drops
    /// the queue of a previous activation, then, when active, watches the
    /// current one.
    fn sync_registrations(&mut self, ops: &mut EventOps) {
        let wanted: Vec<_> = self
            .queue_event()
            .map(AsRawFd::as_raw_fd)
            .map(|fd| (fd, QUEUE, EventSet::IN))
            .into_iter()
            .collect();
        for e in self.registrations.sync(ops, &wanted) {
            self.metrics().entropy_event_fails.inc();
            error!("virtio-rng: {e}");
        }
    }

    fn handle_control_event(&mut self, ops: &mut EventOps) {
        if let Err(e) = ember_virtio::drain_eventfd(&self.control_evt) {
            self.metrics().entropy_event_fails.inc();
            error!("virtio-rng: failed to read the control EventFd: {e}");
        }
        self.sync_registrations(ops);
    }
}

impl MutEventSubscriber for Entropy {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let data = events.data();
        if !events.event_set().contains(EventSet::IN) {
            self.metrics().entropy_event_fails.inc();
            warn!(
                "virtio-rng: unexpected event {:?} on source {data}",
                events.event_set()
            );
            return;
        }
        let result = match data {
            CONTROL => {
                self.handle_control_event(ops);
                Ok(())
            }
            QUEUE => self.handle_queue_event(),
            RATE_LIMITER => self.handle_rate_limiter_event(),
            _ => {
                self.metrics().entropy_event_fails.inc();
                warn!("virtio-rng: event from unknown source {data}");
                Ok(())
            }
        };
        if let Err(e) = result {
            error!("virtio-rng: {e}");
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        self.subscribed = true;
        if let Err(e) = ops.add(Events::with_data(&self.control_evt, CONTROL, EventSet::IN)) {
            self.metrics().entropy_event_fails.inc();
            error!("virtio-rng: cannot register the control EventFd: {e}");
        }
        let fd = self.rate_limiter_fd();
        if let Err(e) = ops.add(Events::with_data_raw(fd, RATE_LIMITER, EventSet::IN)) {
            self.metrics().entropy_event_fails.inc();
            error!("virtio-rng: cannot watch the rate limiter's timer: {e}");
        }
        // Added to the event loop after activation: start watching now.
        if self.is_activated() {
            self.sync_registrations(ops);
        }
    }
}
