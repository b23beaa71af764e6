// SPDX-License-Identifier: Apache-2.0

//! Queue helpers every device needs: taking the activated queues apart,
//! deciding whether the driver wants an interrupt, draining a notify
//! EventFd.

use std::io;
use std::sync::atomic::Ordering;

use virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::device::{ActivateError, ActiveQueue};

/// The activation guard on queues: exactly `N` queues, with indices
/// `0..N`, returned in index order.
///
/// A wrong count is [`ActivateError::QueueCount`]; otherwise the first
/// index missing from the set is [`ActivateError::QueueNotReady`] (a
/// duplicate or out-of-range index leaves one missing).
pub fn take_queues<const N: usize>(
    queues: Vec<ActiveQueue>,
) -> Result<[ActiveQueue; N], ActivateError> {
    if queues.len() != N {
        return Err(ActivateError::QueueCount {
            expected: N,
            actual: queues.len(),
        });
    }
    let mut slots: [Option<ActiveQueue>; N] = std::array::from_fn(|_| None);
    for queue in queues {
        if let Some(slot @ None) = slots.get_mut(usize::from(queue.index)) {
            *slot = Some(queue);
        }
    }
    if let Some(missing) = (0u16..).zip(&slots).find(|(_, s)| s.is_none()) {
        return Err(ActivateError::QueueNotReady(missing.0));
    }
    Ok(slots.map(|slot| slot.expect("every slot was checked above")))
}

/// Whether the driver wants an interrupt for what the device added to
/// `queue`'s used ring since the last call.
///
/// With VIRTIO_F_EVENT_IDX this is virtio-queue's `used_event` check
/// (virtio 1.2 §2.7.7.2, wrapping at 2^16). Without it the device SHOULD
/// NOT interrupt while the driver sets VRING_AVAIL_F_NO_INTERRUPT in the
/// available ring's flags, which virtio-queue does not look at; Linux sets
/// it while it is already reaping used buffers.
///
/// An error means the ring could not be read: callers interrupt anyway, a
/// spurious interrupt being better than a lost one.
pub fn needs_interrupt(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
) -> Result<bool, virtio_queue::Error> {
    // Also fences the used ring writes before the reads below.
    if !queue.needs_notification(mem)? {
        return Ok(false);
    }
    if queue.event_idx_enabled() {
        return Ok(true);
    }
    let flags = mem
        .load::<u16>(GuestAddress(queue.avail_ring()), Ordering::Acquire)
        .map(u16::from_le)
        .unwrap_or(0);
    Ok(u32::from(flags) & VRING_AVAIL_F_NO_INTERRUPT == 0)
}

/// Pops the next chain; when the ring is empty, re-enables notifications
/// (with VIRTIO_F_EVENT_IDX this publishes avail_event) and looks again, so
/// that a chain the driver published meanwhile is not left without a
/// notification (virtio 1.2 §2.7.10).
///
/// A device drains a queue with notifications disabled and takes chains
/// through this function: notifications come back on exactly when it has
/// nothing left to do.
pub fn pop_or_enable_notification<'a>(
    queue: &mut Queue,
    mem: &'a GuestMemoryMmap,
) -> Result<Option<DescriptorChain<&'a GuestMemoryMmap>>, virtio_queue::Error> {
    loop {
        if let Some(chain) = queue.iter(mem)?.next() {
            return Ok(Some(chain));
        }
        if !queue.enable_notification(mem)? {
            return Ok(None);
        }
    }
}

/// Clears a non-blocking EventFd; an EventFd with nothing to read is not an
/// error.
pub fn drain_eventfd(evt: &EventFd) -> io::Result<()> {
    match evt.read() {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use virtio_queue::mock::MockSplitQueue;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    use super::*;

    fn queue(index: u16) -> ActiveQueue {
        ActiveQueue {
            index,
            queue: Queue::new(16).unwrap(),
            notify: EventFd::new(EFD_NONBLOCK).unwrap(),
        }
    }

    #[test]
    fn take_queues_checks_count_and_indices() {
        let [a, b] = take_queues::<2>(vec![queue(1), queue(0)]).unwrap();
        assert_eq!((a.index, b.index), (0, 1));
        let err = take_queues::<2>(vec![queue(0)]).unwrap_err();
        assert!(
            matches!(
                err,
                ActivateError::QueueCount {
                    expected: 2,
                    actual: 1
                }
            ),
            "{err:?}"
        );
        let err = take_queues::<2>(vec![queue(1), queue(2)]).unwrap_err();
        assert!(matches!(err, ActivateError::QueueNotReady(0)), "{err:?}");
        let err = take_queues::<3>(vec![queue(0), queue(0), queue(2)]).unwrap_err();
        assert!(matches!(err, ActivateError::QueueNotReady(1)), "{err:?}");
    }

    #[test]
    fn no_interrupt_flag_is_honoured_only_without_event_idx() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mock = MockSplitQueue::new(&mem, 16);
        let mut q: Queue = mock.create_queue().unwrap();
        q.add_used(&mem, 0, 0).unwrap();
        assert!(needs_interrupt(&mut q, &mem).unwrap());
        mem.write_obj(
            u16::to_le(VRING_AVAIL_F_NO_INTERRUPT as u16),
            mock.avail_addr(),
        )
        .unwrap();
        q.add_used(&mem, 1, 0).unwrap();
        assert!(!needs_interrupt(&mut q, &mem).unwrap());
        // With EVENT_IDX the flags are ignored: used_event decides.
        let mut q: Queue = mock.create_queue().unwrap();
        q.set_event_idx(true);
        let used_event = GuestAddress(mock.avail_addr().0 + 4 + 2 * 16);
        mem.write_obj(u16::to_le(0), used_event).unwrap();
        q.add_used(&mem, 0, 0).unwrap();
        // next_used went 0 -> 1 and used_event is 0: interrupt.
        assert!(needs_interrupt(&mut q, &mem).unwrap());
        q.add_used(&mem, 1, 0).unwrap();
        // 1 -> 2 does not cross used_event 0.
        assert!(!needs_interrupt(&mut q, &mem).unwrap());
    }

    #[test]
    fn used_event_wraps_at_2_16() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mock = MockSplitQueue::new(&mem, 16);
        let used_event = GuestAddress(mock.avail_addr().0 + 4 + 2 * 16);
        let mut q: Queue = mock.create_queue().unwrap();
        q.set_event_idx(true);
        q.set_next_used(u16::MAX - 1);
        // The driver wants an interrupt when the used index passes 65535.
        mem.write_obj(u16::MAX.to_le(), used_event).unwrap();
        q.add_used(&mem, 0, 0).unwrap(); // 65534 -> 65535
        assert!(!needs_interrupt(&mut q, &mem).unwrap());
        q.add_used(&mem, 1, 0).unwrap(); // 65535 -> 0: passes 65535
        assert_eq!(q.next_used(), 0);
        assert!(needs_interrupt(&mut q, &mem).unwrap());
        // A batch that crosses the wrap and used_event 0 at once.
        q.set_next_used(u16::MAX - 1);
        mem.write_obj(0u16.to_le(), used_event).unwrap();
        q.add_used(&mem, 2, 0).unwrap();
        q.add_used(&mem, 3, 0).unwrap();
        q.add_used(&mem, 4, 0).unwrap(); // 65534 -> 1
        assert!(needs_interrupt(&mut q, &mem).unwrap());
        // used_event far behind (the driver is not asking): none.
        mem.write_obj(0x8000u16.to_le(), used_event).unwrap();
        q.add_used(&mem, 5, 0).unwrap();
        assert!(!needs_interrupt(&mut q, &mem).unwrap());
    }

    #[test]
    fn avail_event_wraps_at_2_16() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mock = MockSplitQueue::new(&mem, 16);
        let avail_event = GuestAddress(mock.used_addr().0 + 4 + 8 * 16);
        let mut q: Queue = mock.create_queue().unwrap();
        q.set_event_idx(true);
        q.set_next_avail(u16::MAX);
        // The driver's avail idx is also 65535: nothing new.
        mem.write_obj(u16::MAX.to_le(), GuestAddress(mock.avail_addr().0 + 2))
            .unwrap();
        assert!(!q.enable_notification(&mem).unwrap());
        assert_eq!(u16::from_le(mem.read_obj(avail_event).unwrap()), u16::MAX);
        // The driver publishes one more entry: its index wraps to 0.
        mem.write_obj(0u16.to_le(), GuestAddress(mock.avail_addr().0 + 2))
            .unwrap();
        assert!(q.enable_notification(&mem).unwrap());
    }

    #[test]
    fn drain_eventfd_is_quiet_when_empty() {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        drain_eventfd(&evt).unwrap();
        evt.write(3).unwrap();
        drain_eventfd(&evt).unwrap();
        assert!(evt.read().is_err());
    }
}
