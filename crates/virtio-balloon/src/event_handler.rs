// SPDX-License-Identifier: Apache-2.0

//! How the balloon joins an event-manager event loop, the same way the
//! other virtio devices do.
//!
//! The statistics timer is watched for the device's lifetime, and armed
//! or stopped here when the device starts or stops (activation and reset
//! run on a vCPU thread, which does not touch timers). The queues'
//! notify EventFds are watched only while the device is active: the
//! transport activates and resets the device from a vCPU thread, which
//! cannot touch the event loop's registrations, so both signal the control
//! EventFd, and the event loop then registers (or unregisters) the queues.

use std::os::fd::AsRawFd;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use log::{error, warn};

use crate::Balloon;

/// Event data: the control EventFd.
const CONTROL: u32 = 0;
/// Event data: the statistics timer.
const STATS_TIMER: u32 = 1;
/// Event data of queue `i`: `QUEUE_BASE + i`.
const QUEUE_BASE: u32 = 16;

impl Balloon {
    /// Makes the event loop's registrations match the device state: drops
    /// the queues of a previous activation, then, when active, watches the
    /// current ones.
    fn sync_registrations(&mut self, ops: &mut EventOps) {
        let wanted: Vec<_> = self
            .queue_events()
            .map(|(i, evt)| (evt.as_raw_fd(), QUEUE_BASE + i as u32, EventSet::IN))
            .collect();
        for e in self.registrations.sync(ops, &wanted) {
            self.metrics().event_fails.inc();
            error!("virtio-balloon: {e}");
        }
    }

    fn handle_control_event(&mut self, ops: &mut EventOps) {
        if let Err(e) = ember_virtio::drain_eventfd(&self.control_evt) {
            self.metrics().event_fails.inc();
            error!("virtio-balloon: failed to read the control EventFd: {e}");
        }
        self.sync_registrations(ops);
        if let Err(e) = self.sync_stats_timer() {
            self.metrics().event_fails.inc();
            error!("virtio-balloon: cannot set the statistics timer: {e}");
        }
    }
}

impl MutEventSubscriber for Balloon {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let data = events.data();
        if !events.event_set().contains(EventSet::IN) {
            self.metrics().event_fails.inc();
            warn!(
                "virtio-balloon: unexpected event {:?} on source {data}",
                events.event_set()
            );
            return;
        }
        let result = match data {
            CONTROL => {
                self.handle_control_event(ops);
                Ok(())
            }
            STATS_TIMER => self.handle_stats_timer(),
            q if q >= QUEUE_BASE => self.handle_queue_event((q - QUEUE_BASE) as usize),
            _ => {
                self.metrics().event_fails.inc();
                warn!("virtio-balloon: event from unknown source {data}");
                Ok(())
            }
        };
        if let Err(e) = result {
            error!("virtio-balloon: {e}");
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        self.subscribed = true;
        if let Err(e) = ops.add(Events::with_data(&self.control_evt, CONTROL, EventSet::IN)) {
            self.metrics().event_fails.inc();
            error!("virtio-balloon: cannot register the control EventFd: {e}");
        }
        let fd = self.stats_timer_fd();
        if let Err(e) = ops.add(Events::with_data_raw(fd, STATS_TIMER, EventSet::IN)) {
            self.metrics().event_fails.inc();
            error!("virtio-balloon: cannot watch the statistics timer: {e}");
        }
        // Added to the event loop after activation: start watching now.
        if self.is_activated() {
            self.sync_registrations(ops);
            if let Err(e) = self.sync_stats_timer() {
                self.metrics().event_fails.inc();
                error!("virtio-balloon: cannot set the statistics timer: {e}");
            }
        }
    }
}
