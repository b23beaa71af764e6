// SPDX-License-Identifier: Apache-2.0

//! The virtio-mmio transport (virtio 1.2 §4.2.2, version 2), independent of
//! KVM and of any particular device.
//!
//! A device implements `ember_virtio`'s [`VirtioDevice`]: its type, queue
//! sizes, feature bits, configuration space, and what to do at activation
//! and reset. This crate is only the transport: an [`MmioTransport`] wraps
//! the device and decodes the whole register file: the
//! feature handshake, queue setup, Status, interrupts and configuration
//! space. It enforces the initialization order of virtio 1.2 §3.1.1: a driver
//! that breaks it gets DEVICE_NEEDS_RESET and a configuration interrupt, never
//! a panic. At DRIVER_OK the transport validates the ready queues against
//! guest memory (with virtio-queue) and hands them to the device as
//! [`ActiveQueue`]s, each with the EventFd its notifications signal.
//!
//! Interrupts leave through [`VirtioInterrupt`]; the transport's
//! implementation, [`MmioInterrupt`], sets InterruptStatus bits and signals
//! the EventFd that the VMM registers as an irqfd.
//!
//! # Example
//!
//! ```
//! use std::sync::{Arc, Mutex};
//!
//! use ember_bus::BusDevice;
//! use ember_virtio::{ActivateError, ActiveQueue, VirtioDevice, VirtioInterrupt};
//! use ember_virtio_mmio::{MmioTransport, MMIO_MAGIC_VALUE};
//! use vm_memory::{GuestAddress, GuestMemoryMmap};
//! use vmm_sys_util::eventfd::EventFd;
//!
//! /// An entropy device (type 4) with one queue and no configuration.
//! struct Rng;
//!
//! impl VirtioDevice for Rng {
//!     fn device_type(&self) -> u32 { 4 }
//!     fn queue_max_sizes(&self) -> &[u16] { &[256] }
//!     fn features(&self) -> u64 { 1 << 32 } // VIRTIO_F_VERSION_1
//!     fn config_size(&self) -> u64 { 0 }
//!     fn read_config(&self, _offset: u64, _data: &mut [u8]) {}
//!     fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
//!     fn activate(
//!         &mut self,
//!         _mem: GuestMemoryMmap,
//!         _queues: Vec<ActiveQueue>,
//!         _interrupt: Arc<dyn VirtioInterrupt>,
//!     ) -> Result<(), ActivateError> {
//!         Ok(())
//!     }
//!     fn reset(&mut self) -> bool { true }
//! }
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)])?;
//! let irq = EventFd::new(0)?;
//! let mut transport = MmioTransport::new(mem, Arc::new(Mutex::new(Rng)), irq)?;
//!
//! // The driver's first read: MagicValue.
//! let mut data = [0u8; 4];
//! transport.read(0xd000_0000, 0, &mut data);
//! assert_eq!(u32::from_le_bytes(data), MMIO_MAGIC_VALUE);
//! // The VMM registers these as ioeventfds at base + NOTIFY_REG_OFFSET.
//! assert_eq!(transport.queue_notify_events().len(), 1);
//! # Ok(())
//! # }
//! ```

#![deny(missing_docs)]

mod state;
mod transport;

#[cfg(any(test, feature = "test-utils"))]
pub mod test_utils;

#[cfg(test)]
mod tests;

// The device contract, re-exported for the VMM that wires devices to this
// transport.
pub use ember_virtio::{ActivateError, ActiveQueue, InterruptKind, VirtioDevice, VirtioInterrupt};
pub use state::{MmioTransportState, QueueState, StateError};
pub use transport::{
    Error, MmioInterrupt, MmioMetrics, MmioTransport, CONFIG_SPACE_OFFSET, MMIO_MAGIC_VALUE,
    MMIO_SLOT_SIZE, MMIO_VERSION, NOTIFY_REG_OFFSET, VENDOR_ID,
};
