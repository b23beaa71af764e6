// SPDX-License-Identifier: Apache-2.0

//! A virtio-vsock device (virtio 1.2 §5.10, device type 19) with
//! Firecracker's hybrid Unix-socket backend, so that host agents written for
//! Firecracker work unchanged:
//!
//! - **Host to guest**: the device listens on `uds_path`. A host process
//!   connects and writes `CONNECT <port>\n`; the guest gets a connection
//!   request to `<port>` from a host port of 2^30 or more; once the guest
//!   accepts, the host reads `OK <host port>\n` and the socket carries the
//!   stream. If the guest refuses (RST) or does not answer within 2 s, the
//!   host socket is closed.
//! - **Guest to host**: a guest connection to CID 2, port P, is connected to
//!   the Unix socket `<uds_path>_P`; if nobody listens there the guest gets
//!   RST (connection refused).
//!
//! The full connection state machine is implemented: REQUEST, RESPONSE,
//! RST, SHUTDOWN with its RCV/SEND flags, RW, CREDIT_UPDATE and
//! CREDIT_REQUEST, with credit-based flow control in both directions (the
//! guest is never sent more than its free credit; guest data the host
//! socket cannot take waits in a per-connection buffer of
//! [`CONN_TX_BUF_SIZE`], which is also the credit the guest is given, so
//! buffering is bounded). The event queue carries
//! `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` ([`Vsock::send_transport_reset`]).
//!
//! Everything the driver writes is validated ([`packet`]): chains with a
//! short header, a `len` beyond the chain or beyond 64 KiB, a descriptor of
//! the wrong direction or outside guest memory are returned unused and
//! counted; packets with a foreign source CID are dropped; unknown socket
//! types and operations are answered RST. Counters are in [`VsockMetrics`],
//! with Firecracker's names.
//!
//! # Driving the device
//!
//! [`Vsock`] implements both [`ember_virtio::VirtioDevice`] and
//! [`event_manager::MutEventSubscriber`]. The VMM keeps one
//! `Arc<Mutex<Vsock>>`, gives a clone to an
//! `ember_virtio_mmio::MmioTransport` (as `Arc<Mutex<dyn VirtioDevice>>`)
//! and adds another to its `EventManager`, which must keep running:
//!
//! 1. When added, the device watches only an internal activation EventFd.
//! 2. At DRIVER_OK the transport calls `activate` (vCPU thread), which keeps
//!    the queues and signals that EventFd.
//! 3. On that event the device starts watching the three queue notify
//!    EventFds, an internal control EventFd, a timer (request and shutdown
//!    timeouts) and the backend: the listening socket, and each host socket
//!    as connections come and go.
//! 4. A device reset (vCPU thread) drops the connections and signals the
//!    control EventFd; on that event the device stops watching everything
//!    but the activation EventFd, and the host sockets close.
//!
//! # Example
//!
//! ```
//! use std::io::Write;
//! use std::os::unix::net::UnixStream;
//! use std::sync::{Arc, Mutex};
//!
//! use ember_virtio_mmio::{MmioTransport, VirtioDevice};
//! use ember_vsock::{Vsock, VsockConfig};
//! use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
//! use vm_memory::{GuestAddress, GuestMemoryMmap};
//! use vmm_sys_util::eventfd::EventFd;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = tempfile::tempdir()?;
//! let uds_path = dir.path().join("v.sock");
//! let vsock = Arc::new(Mutex::new(Vsock::new(VsockConfig {
//!     guest_cid: 3,
//!     uds_path: uds_path.clone(),
//! })?));
//!
//! let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)])?;
//! let device: Arc<Mutex<dyn VirtioDevice>> = vsock.clone();
//! let transport = MmioTransport::new(mem, device, EventFd::new(libc::EFD_NONBLOCK)?)?;
//! // Register transport.queue_notify_events() as ioeventfds and the
//! // transport's interrupt EventFd as an irqfd, then run the event loop.
//! assert_eq!(transport.queue_notify_events().len(), 3);
//! let mut event_manager = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new()?;
//! event_manager.add_subscriber(vsock.clone());
//!
//! // A host agent can connect right away; the guest sees the request once
//! // its driver has activated the device.
//! let mut agent = UnixStream::connect(&uds_path)?;
//! agent.write_all(b"CONNECT 52\n")?;
//! event_manager.run_with_timeout(0)?;
//! # Ok(())
//! # }
//! ```

#![deny(missing_docs)]

mod connection;
mod device;
mod metrics;
mod muxer;
pub mod packet;
mod state;
mod txbuf;

#[cfg(test)]
mod tests;

use std::io;
use std::path::PathBuf;

use virtio_bindings::virtio_config::{VIRTIO_F_IN_ORDER, VIRTIO_F_VERSION_1};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

pub use device::Vsock;
pub use metrics::VsockMetrics;
pub use packet::{PacketError, RxBuffer, TxPacket, VsockHeader};
pub use state::{VsockState, VsockStateError};

/// Index of the receive queue, device to driver (virtio 1.2 §5.10.2).
pub const RXQ_INDEX: u16 = 0;
/// Index of the transmit queue, driver to device.
pub const TXQ_INDEX: u16 = 1;
/// Index of the event queue.
pub const EVQ_INDEX: u16 = 2;
/// Number of virtqueues.
pub const NUM_QUEUES: usize = 3;
/// Size of each queue (Firecracker's).
pub const QUEUE_SIZE: u16 = 256;
/// Bytes of configuration space: `le64 guest_cid` (virtio 1.2 §5.10.4).
pub const CONFIG_SPACE_SIZE: u64 = 8;
/// The host's context ID (virtio 1.2 §5.10.4: `VMADDR_CID_HOST`).
pub const HOST_CID: u64 = 2;
/// Features offered: `VIRTIO_F_VERSION_1`, `VIRTIO_F_IN_ORDER` (the device
/// uses buffers in the order they were made available) and
/// `VIRTIO_RING_F_EVENT_IDX` (kicks and interrupts only past the indices
/// each side publishes, virtio 1.2 §2.7.7, §2.7.10), as in Firecracker.
pub const AVAIL_FEATURES: u64 =
    (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_IN_ORDER) | (1 << VIRTIO_RING_F_EVENT_IDX);
/// Receive buffer per connection the device advertises (`buf_alloc`), and
/// the most guest data it buffers for a host socket (Firecracker's
/// `CONN_TX_BUF_SIZE`).
pub const CONN_TX_BUF_SIZE: u32 = 64 * 1024;
/// The device sends a credit update when the guest may believe it has less
/// free space than this (Firecracker's `CONN_CREDIT_UPDATE_THRESHOLD`).
pub const CONN_CREDIT_UPDATE_THRESHOLD: u32 = 4 * 1024;
/// Most connections (plus host sockets that have not sent `CONNECT` yet)
/// at a time (Firecracker's `MAX_CONNECTIONS`).
pub const MAX_CONNECTIONS: usize = 1023;
/// First local port of host-initiated connections: 2^30 (Firecracker's).
pub const FIRST_LOCAL_PORT: u32 = 1 << 30;

/// What a vsock device is built from (Firecracker's `vsock` configuration).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's context ID; at least 3 (0-2 are reserved).
    pub guest_cid: u32,
    /// Where the device listens for host connections. Guest connections to
    /// port P go to `<uds_path>_P`. Must not exist yet.
    pub uds_path: PathBuf,
}

/// Errors creating or operating a vsock device.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The guest CID is one of the reserved values 0, 1 and 2.
    #[error("vsock guest CID {0} is invalid: it must be at least 3 (0-2 are reserved)")]
    InvalidCid(u32),
    /// Something is already at `uds_path`.
    #[error("vsock socket path {} already exists; remove it first", .0.display())]
    UdsPathExists(PathBuf),
    /// The listening socket could not be bound at `uds_path`.
    #[error("cannot bind the vsock socket at {}: {source}", .path.display())]
    Bind {
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// An internal EventFd could not be created.
    #[error("cannot create a vsock EventFd: {0}")]
    EventFd(#[source] io::Error),
    /// The connection timer could not be created.
    #[error("cannot create the vsock connection timer: {0}")]
    Timer(#[source] io::Error),
    /// The operation needs an activated device.
    #[error("the vsock device is not activated")]
    NotActivated,
    /// The event queue has no buffer for the event.
    #[error("the vsock event queue has no buffer available")]
    NoEventBuffer,
    /// The event queue's buffer cannot hold the event.
    #[error("unusable vsock event queue buffer: {0}")]
    EventBuffer(#[source] PacketError),
    /// The driver broke a queue (it published more buffers than it holds).
    #[error("vsock virtqueue error: {0}")]
    Queue(#[source] virtio_queue::Error),
}
