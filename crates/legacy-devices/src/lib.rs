// SPDX-License-Identifier: Apache-2.0

//! The legacy PC devices of a microVM: a 16550A UART for the console and an
//! i8042 controller through which the guest resets (ends) the VM.
//!
//! The register logic comes from rust-vmm's `vm-superio`; this crate adds
//! the [`ember_bus::BusDevice`] glue, metrics and eventfd-based interrupts.
//! Nothing here touches KVM: interrupts leave through
//! [`vm_superio::Trigger`] (in a VMM, an [`EventFdTrigger`] whose eventfd is
//! registered as an irqfd), so every device can be unit-tested alone.
//!
//! # Example: COM1 on a port-I/O bus
//!
//! ```
//! use std::sync::{Arc, Mutex};
//!
//! use ember_bus::{Bus, BusKind, BusRange};
//! use ember_legacy_devices::serial::{SerialDevice, COM1_BASE, COM1_LEN};
//! use ember_legacy_devices::EventFdTrigger;
//! use vmm_sys_util::eventfd::EventFd;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // In a VMM this eventfd is registered as the irqfd of GSI 4 (COM1_GSI).
//! let irq = EventFd::new(libc::EFD_NONBLOCK)?;
//! let serial = SerialDevice::new(EventFdTrigger::new(irq.try_clone()?), std::io::stdout());
//! let metrics = serial.metrics();
//!
//! let mut pio = Bus::new(BusKind::Pio);
//! pio.insert(BusRange::new(COM1_BASE, COM1_LEN)?, Arc::new(Mutex::new(serial)))?;
//! // Frozen and shared with the vCPU threads from here on.
//! let pio = Arc::new(pio);
//!
//! // What a vCPU does on a KVM_EXIT_IO for `outb('A', 0x3f8)`: the byte goes
//! // to stdout.
//! pio.write(COM1_BASE, b"A");
//! assert_eq!(metrics.bytes_written(), 1);
//!
//! // `inb(0x3fd)`: the line status register says the transmitter is empty.
//! let mut lsr = [0u8];
//! pio.read(COM1_BASE + 5, &mut lsr);
//! assert_ne!(lsr[0] & 0x20, 0);
//! # Ok(())
//! # }
//! ```

#![deny(missing_docs)]

use std::io;

use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

pub mod i8042;
pub mod serial;
pub mod token_bucket;

/// A [`Trigger`] that signals an eventfd by adding 1 to its counter.
///
/// The VMM registers the eventfd as a KVM irqfd (to raise a GSI) or polls it
/// (for the i8042 reset line).
#[derive(Debug)]
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    /// Wraps `fd`.
    pub fn new(fd: EventFd) -> Self {
        EventFdTrigger(fd)
    }

    /// A second trigger signalling the same eventfd.
    pub fn try_clone(&self) -> io::Result<Self> {
        self.0.try_clone().map(EventFdTrigger)
    }

    /// The eventfd this trigger signals.
    pub fn event_fd(&self) -> &EventFd {
        &self.0
    }
}

impl Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eventfd_trigger_writes_one() {
        let trigger = EventFdTrigger::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let clone = trigger.try_clone().unwrap();
        trigger.trigger().unwrap();
        clone.trigger().unwrap();
        assert_eq!(trigger.event_fd().read().unwrap(), 2);
        // Drained: a non-blocking read now fails with EAGAIN.
        assert_eq!(
            clone.event_fd().read().unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
    }
}
