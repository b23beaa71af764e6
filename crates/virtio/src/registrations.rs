// SPDX-License-Identifier: Apache-2.0

//! The event-loop registrations a device keeps while it is active.
//!
//! A transport activates and resets its device from a vCPU thread, which
//! cannot touch the event loop: the device signals its control EventFd
//! there, and the event loop thread then calls [`Registrations::sync`] to
//! watch what the new activation needs (queue notifications, a TAP) and
//! stop watching what the previous one had. The EventFds of a previous
//! activation must stay open until they are unregistered, or the event loop
//! would be left with a descriptor number that a new file may reuse:
//! [`Registrations::retire`] keeps them until then.

use std::os::fd::RawFd;

use event_manager::{EventOps, EventSet, Events};
use vmm_sys_util::eventfd::EventFd;

/// What went wrong while the registrations were made to match; the device
/// counts and logs each.
#[derive(Debug, thiserror::Error)]
pub enum RegistrationError {
    /// A descriptor of the previous activation could not be unregistered.
    #[error("cannot unregister descriptor {fd} from the event loop: {source}")]
    Remove {
        /// The descriptor.
        fd: RawFd,
        /// Why.
        source: event_manager::Error,
    },
    /// A descriptor of the current activation could not be registered.
    #[error("cannot register descriptor {fd} with the event loop: {source}")]
    Add {
        /// The descriptor.
        fd: RawFd,
        /// Why.
        source: event_manager::Error,
    },
}

/// The descriptors a device has registered for its current activation, and
/// the EventFds of previous activations awaiting unregistration.
#[derive(Debug, Default)]
pub struct Registrations {
    registered: Vec<RawFd>,
    retired: Vec<EventFd>,
}

impl Registrations {
    /// No registrations.
    pub fn new() -> Self {
        Self::default()
    }

    /// Keeps `evt`, a notification EventFd of an activation that ended,
    /// open until the next [`Registrations::sync`] has unregistered it.
    pub fn retire(&mut self, evt: EventFd) {
        self.retired.push(evt);
    }

    /// Whether any descriptor is registered.
    pub fn is_empty(&self) -> bool {
        self.registered.is_empty()
    }

    /// Makes the event loop watch exactly `wanted` (descriptor, event data,
    /// events): unregisters what the previous call registered, closes the
    /// retired EventFds, then registers each of `wanted`. Every descriptor
    /// is tried; the failures are returned for the device to count.
    pub fn sync(
        &mut self,
        ops: &mut EventOps,
        wanted: &[(RawFd, u32, EventSet)],
    ) -> Vec<RegistrationError> {
        let mut errors = Vec::new();
        for fd in self.registered.drain(..) {
            if let Err(source) = ops.remove(Events::empty_raw(fd)) {
                errors.push(RegistrationError::Remove { fd, source });
            }
        }
        // Unregistered: they can be closed now.
        self.retired.clear();
        for &(fd, data, set) in wanted {
            match ops.add(Events::with_data_raw(fd, data, set)) {
                Ok(()) => self.registered.push(fd),
                Err(source) => errors.push(RegistrationError::Add { fd, source }),
            }
        }
        errors
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;
    use std::sync::{Arc, Mutex};

    use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};

    use super::*;

    /// A subscriber that re-syncs to `wanted` on its control event and
    /// records the data of every other event.
    struct Probe {
        control: EventFd,
        wanted: Vec<(RawFd, u32, EventSet)>,
        regs: Registrations,
        seen: Vec<u32>,
        errors: usize,
    }

    impl MutEventSubscriber for Probe {
        fn process(&mut self, events: Events, ops: &mut EventOps) {
            if events.data() == 0 {
                let _ = self.control.read();
                let wanted = self.wanted.clone();
                self.errors += self.regs.sync(ops, &wanted).len();
            } else {
                self.seen.push(events.data());
            }
        }

        fn init(&mut self, ops: &mut EventOps) {
            ops.add(Events::with_data(&self.control, 0, EventSet::IN))
                .unwrap();
        }
    }

    #[test]
    fn sync_swaps_one_activation_for_the_next() {
        let a = EventFd::new(0).unwrap();
        let b = EventFd::new(0).unwrap();
        let mut manager = EventManager::<Arc<Mutex<Probe>>>::new().unwrap();
        let probe = Arc::new(Mutex::new(Probe {
            control: EventFd::new(0).unwrap(),
            wanted: vec![(a.as_raw_fd(), 1, EventSet::IN)],
            regs: Registrations::new(),
            seen: Vec::new(),
            errors: 0,
        }));
        manager.add_subscriber(probe.clone());
        let poke = |p: &Arc<Mutex<Probe>>| p.lock().unwrap().control.write(1).unwrap();

        // First activation: `a` is watched.
        poke(&probe);
        manager.run_with_timeout(100).unwrap();
        a.write(1).unwrap();
        manager.run_with_timeout(100).unwrap();
        assert_eq!(probe.lock().unwrap().seen, vec![1]);
        let _ = a.read();

        // The next one watches `b` only; `a`, retired, is closed once
        // unregistered.
        {
            let mut p = probe.lock().unwrap();
            p.regs.retire(a.try_clone().unwrap());
            p.wanted = vec![(b.as_raw_fd(), 2, EventSet::IN)];
        }
        poke(&probe);
        manager.run_with_timeout(100).unwrap();
        assert!(probe.lock().unwrap().regs.retired.is_empty());
        a.write(1).unwrap();
        b.write(1).unwrap();
        manager.run_with_timeout(100).unwrap();
        let p = probe.lock().unwrap();
        assert_eq!(p.seen, vec![1, 2], "`a` is no longer watched");
        assert_eq!(p.errors, 0);
        assert!(!p.regs.is_empty());
    }

    #[test]
    fn a_descriptor_that_cannot_be_watched_is_reported_and_the_rest_are() {
        let good = EventFd::new(0).unwrap();
        // A regular file: epoll refuses it.
        let file = std::fs::File::open(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml")).unwrap();
        let mut manager = EventManager::<Arc<Mutex<Probe>>>::new().unwrap();
        let probe = Arc::new(Mutex::new(Probe {
            control: EventFd::new(0).unwrap(),
            wanted: vec![
                (file.as_raw_fd(), 1, EventSet::IN),
                (good.as_raw_fd(), 2, EventSet::IN),
            ],
            regs: Registrations::new(),
            seen: Vec::new(),
            errors: 0,
        }));
        manager.add_subscriber(probe.clone());
        probe.lock().unwrap().control.write(1).unwrap();
        manager.run_with_timeout(100).unwrap();
        good.write(1).unwrap();
        manager.run_with_timeout(100).unwrap();
        let p = probe.lock().unwrap();
        assert_eq!(p.errors, 1);
        assert_eq!(p.seen, vec![2]);
    }
}
