// SPDX-License-Identifier: Apache-2.0

//! What a virtio device implements to sit behind a transport, and how it
//! raises interrupts.
//!
//! The split follows virtio 1.2 §2 ("Basic facilities of a virtio device"):
//! a device has a type, feature bits, a configuration space and virtqueues.
//! Everything about how the driver reaches those (registers, the handshake,
//! queue setup) belongs to the transport, so a device never sees a register.

use std::fmt;
use std::io;
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// Why a device refused to start at `DRIVER_OK`.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver made ready a different set of queues than the device needs.
    #[error("device needs {expected} ready queue(s), the driver made {actual} ready")]
    QueueCount {
        /// Queues the device needs.
        expected: usize,
        /// Queues the driver made ready.
        actual: usize,
    },
    /// A queue the device needs was not made ready by the driver.
    #[error("queue {0} is required by the device but was not made ready")]
    QueueNotReady(u16),
    /// The device is already running (activated twice without a reset).
    #[error("device is already activated")]
    AlreadyActivated,
    /// A host resource (eventfd, io_uring, ...) the device needs failed.
    #[error("device could not start: {0}")]
    Io(#[source] io::Error),
}

/// One virtqueue the driver made ready, handed to the device at `DRIVER_OK`.
#[derive(Debug)]
pub struct ActiveQueue {
    /// Index of the queue (the value the driver writes to QueueSel/QueueNotify).
    pub index: u16,
    /// The queue as the driver configured it (size, ring addresses, event
    /// index), validated against guest memory.
    pub queue: Queue,
    /// Signalled when the driver notifies this queue (a clone of the transport's
    /// notify EventFd for `index`; the VMM registers it as a KVM ioeventfd).
    pub notify: EventFd,
}

/// The two interrupt causes of the MMIO transport (virtio 1.2 §4.2.2,
/// InterruptStatus bits 0 and 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterruptKind {
    /// The device used buffers in at least one virtqueue.
    Vring,
    /// The device configuration changed (or the device needs a reset).
    Config,
}

/// How a device interrupts the driver.
///
/// Implementations record the cause where the driver can read it (for MMIO,
/// the InterruptStatus register) and then signal the interrupt line.
pub trait VirtioInterrupt: Send + Sync {
    /// Records `kind` and raises the interrupt.
    ///
    /// A device that changed its configuration space calls this with
    /// [`InterruptKind::Config`] before releasing its own lock, so that a
    /// driver reading ConfigGeneration around a config read sees the change.
    fn trigger(&self, kind: InterruptKind) -> io::Result<()>;
}

impl fmt::Debug for dyn VirtioInterrupt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("dyn VirtioInterrupt")
    }
}

/// A virtio device, independent of the transport that exposes it.
///
/// The transport calls these methods while decoding driver accesses; they
/// run on the vCPU thread that did the access, under the device's mutex.
pub trait VirtioDevice: Send {
    /// Virtio device ID (virtio 1.2 §5: 1 = network, 2 = block, ...).
    fn device_type(&self) -> u32;

    /// Maximum size of each virtqueue (QueueNumMax); the length of the slice
    /// is the number of queues. Every size must be a power of two no larger
    /// than 32768 (virtio 1.2 §2.7).
    fn queue_max_sizes(&self) -> &[u16];

    /// Feature bits the device offers. The transport adds nothing: a device
    /// that wants to be driven through the version 2 MMIO transport must offer
    /// `VIRTIO_F_VERSION_1` (bit 32) itself.
    fn features(&self) -> u64;

    /// Feature bits the driver accepted, called when the driver sets
    /// `FEATURES_OK` and the transport accepted the set (a subset of
    /// [`features`](Self::features) that includes `VIRTIO_F_VERSION_1`).
    fn ack_features(&mut self, features: u64) {
        let _ = features;
    }

    /// Size in bytes of the device configuration space.
    fn config_size(&self) -> u64;

    /// Reads `data.len()` bytes of configuration space at `offset`. The
    /// transport only calls this with a range inside
    /// [`config_size`](Self::config_size).
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes `data` into the configuration space at `offset` (a range inside
    /// [`config_size`](Self::config_size)). Devices with read-only
    /// configuration ignore it.
    fn write_config(&mut self, offset: u64, data: &[u8]);

    /// Starts the device when the driver sets `DRIVER_OK`.
    ///
    /// `queues` holds the ready queues in index order, already validated
    /// against `mem`. `interrupt` is how the device signals used buffers and
    /// configuration changes. On error the transport sets
    /// `DEVICE_NEEDS_RESET` and sends a configuration interrupt.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<ActiveQueue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), ActivateError>;

    /// Stops the device when the driver writes 0 to Status. Returns `true`
    /// when the device stopped and dropped its queues, memory and interrupt
    /// handle (or was not running); `false` leaves the transport reporting
    /// `FAILED`.
    fn reset(&mut self) -> bool;
}
