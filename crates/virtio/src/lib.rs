// SPDX-License-Identifier: Apache-2.0

//! The virtio device contract, independent of any transport (virtio 1.2
//! §2, "Basic facilities of a virtio device").
//!
//! A device crate implements [`VirtioDevice`]: its type, queue sizes,
//! feature bits, configuration space, and what to do at activation and
//! reset. A transport (`ember-virtio-mmio`) decodes the driver's register
//! accesses, validates the queues the driver set up, and hands them to the
//! device at DRIVER_OK as [`ActiveQueue`]s, with a [`VirtioInterrupt`] to
//! signal used buffers and configuration changes. A device never sees a
//! register.
//!
//! What every device repeats lives here once:
//! - [`VirtioConfig`]: offered and accepted features (with the 32-bit page
//!   view a feature selector shows) and a bounded configuration space;
//! - [`take_queues`]: the activation guard on the set of ready queues;
//! - [`needs_interrupt`]: whether the driver wants an interrupt, with or
//!   without VIRTIO_F_EVENT_IDX;
//! - [`drain_eventfd`]: clearing a notify EventFd;
//! - [`Persist`]: the state a device saves for a snapshot and takes back.
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//!
//! use ember_virtio::{
//!     take_queues, ActivateError, ActiveQueue, VirtioConfig, VirtioDevice, VirtioInterrupt,
//! };
//! use vm_memory::GuestMemoryMmap;
//!
//! /// An entropy device (type 4) with one queue and no configuration.
//! struct Rng {
//!     virtio: VirtioConfig,
//!     queue: Option<ActiveQueue>,
//! }
//!
//! impl VirtioDevice for Rng {
//!     fn device_type(&self) -> u32 { 4 }
//!     fn queue_max_sizes(&self) -> &[u16] { &[256] }
//!     fn features(&self) -> u64 { self.virtio.avail_features() }
//!     fn ack_features(&mut self, features: u64) { self.virtio.ack_features(features) }
//!     fn config_size(&self) -> u64 { self.virtio.config_size() }
//!     fn read_config(&self, offset: u64, data: &mut [u8]) {
//!         self.virtio.read_config(offset, data);
//!     }
//!     fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
//!     fn activate(
//!         &mut self,
//!         _mem: GuestMemoryMmap,
//!         queues: Vec<ActiveQueue>,
//!         _interrupt: Arc<dyn VirtioInterrupt>,
//!     ) -> Result<(), ActivateError> {
//!         if self.queue.is_some() {
//!             return Err(ActivateError::AlreadyActivated);
//!         }
//!         let [queue] = take_queues::<1>(queues)?;
//!         self.queue = Some(queue);
//!         Ok(())
//!     }
//!     fn reset(&mut self) -> bool {
//!         self.queue = None;
//!         self.virtio.reset();
//!         true
//!     }
//! }
//!
//! let mut rng = Rng { virtio: VirtioConfig::new(1 << 32, Vec::new()), queue: None };
//! rng.ack_features(u64::MAX);
//! // Only what was offered is accepted.
//! assert_eq!(rng.virtio.acked_features(), 1 << 32);
//! ```

#![deny(missing_docs)]

mod config;
mod device;
mod persist;
mod queue;
mod registrations;

pub use config::{features_page, VirtioConfig};
pub use device::{ActivateError, ActiveQueue, InterruptKind, VirtioDevice, VirtioInterrupt};
pub use persist::Persist;
pub use queue::{drain_eventfd, needs_interrupt, pop_or_enable_notification, take_queues};
pub use registrations::{RegistrationError, Registrations};
