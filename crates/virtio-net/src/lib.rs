// SPDX-License-Identifier: Apache-2.0

//! A virtio network device (virtio 1.2 §5.1) backed by a host TAP device.
//!
//! [`Net`] implements [`ember_virtio::VirtioDevice`]: put it behind a
//! transport such as `ember_virtio_mmio::MmioTransport`. It has one receive queue (index
//! [`RX_INDEX`]) and one transmit queue (index [`TX_INDEX`]) of
//! [`QUEUE_SIZE`] entries, and moves Ethernet frames between them and a TAP
//! device opened with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`. Every frame, in
//! both directions, is preceded by the 12-byte `virtio_net_hdr_v1`, which
//! the TAP reads and writes as is, so checksum and segmentation offloads
//! (negotiated with the driver and set on the TAP with `TUNSETOFFLOAD`) cost
//! the device nothing.
//!
//! - Transmit: on a notification of the transmit queue, each descriptor
//!   chain is gathered into one buffer and written to the TAP. A chain with a
//!   device-writable descriptor, a buffer outside guest memory, fewer bytes
//!   than the headers or more than [`MAX_BUFFER_SIZE`] is dropped and
//!   counted, and always returned to the used ring.
//! - Receive: when the TAP is readable, each frame is read and scattered over
//!   the descriptors of the next receive chain. Without receive buffers the
//!   device stops reading, leaving frames queued in the TAP, until the driver
//!   posts buffers and notifies the receive queue. A frame larger than the
//!   chain it is read for is dropped and counted; the chain waits for the
//!   next frame. With `VIRTIO_NET_F_MRG_RXBUF` a frame is spread over as
//!   many chains as it needs, used one after the other, and the header's
//!   `num_buffers` says how many; a frame waits for more chains when the
//!   ring runs short, and is dropped and counted only when it is larger
//!   than a full ring.
//! - The driver is interrupted at most once per batch, honouring
//!   `VIRTIO_RING_F_EVENT_IDX` or `VRING_AVAIL_F_NO_INTERRUPT`.
//!
//! Counters, named after Firecracker's network metrics, are in
//! [`NetMetrics`].
//!
//! # Driving the device
//!
//! [`Net`] is an [`event_manager::MutEventSubscriber`]: add an
//! `Arc<Mutex<Net>>` to the VMM's `EventManager` and give a clone to the
//! transport as its `Arc<Mutex<dyn VirtioDevice>>`. At first it watches only
//! an internal control EventFd. When the driver sets DRIVER_OK, the device
//! signals that EventFd from the vCPU thread, and the event loop then
//! watches both queue notification EventFds and the TAP (edge-triggered).
//! A device reset signals it again and the event loop stops watching them.
//!
//! A VMM with another event loop calls [`Net::handle_rx_queue_event`],
//! [`Net::handle_tx_queue_event`] and [`Net::handle_tap_event`] itself.
//!
//! # Example
//!
//! ```no_run
//! use std::sync::{Arc, Mutex};
//!
//! use ember_virtio_mmio::{MmioTransport, VirtioDevice};
//! use ember_virtio_net::{parse_mac, Net, NetConfig};
//! use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
//! use vm_memory::{GuestAddress, GuestMemoryMmap};
//! use vmm_sys_util::eventfd::EventFd;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let config = NetConfig {
//!     iface_id: "eth0".to_string(),
//!     host_dev_name: "tap0".to_string(),
//!     guest_mac: Some(parse_mac("06:00:ac:10:00:02")?),
//!     mtu: None,
//!     rx_rate_limiter: Default::default(),
//!     tx_rate_limiter: Default::default(),
//! };
//! let net = Arc::new(Mutex::new(Net::new(config)?));
//!
//! let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)])?;
//! let device: Arc<Mutex<dyn VirtioDevice>> = net.clone();
//! let transport = MmioTransport::new(mem, device, EventFd::new(libc::EFD_NONBLOCK)?)?;
//! // Register transport.queue_notify_events() as ioeventfds and the interrupt
//! // EventFd as an irqfd, then let the event loop drive the device.
//! let mut event_manager = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new()?;
//! event_manager.add_subscriber(net.clone());
//! loop {
//!     event_manager.run()?;
//! }
//! # }
//! ```

#![deny(missing_docs)]

mod device;
mod event_handler;
mod metrics;
mod state;
mod tap;

#[cfg(test)]
mod tests;

use std::io;

pub use device::{tap_offload_flags, Net};
pub use ember_rate_limiter::{BucketSpec, BucketUpdate, RateLimiterConfig};
pub use metrics::NetMetrics;
pub use state::{NetState, NetStateError};
pub use tap::check_name as check_tap_name;

/// Index of the receive queue (virtio 1.2 §5.1.2: receiveq1).
pub const RX_INDEX: u16 = 0;
/// Index of the transmit queue (virtio 1.2 §5.1.2: transmitq1).
pub const TX_INDEX: u16 = 1;
/// Size of each queue (Firecracker's).
pub const QUEUE_SIZE: u16 = 256;
/// Bytes of `struct virtio_net_hdr_v1` before every frame: with
/// VIRTIO_F_VERSION_1 the header always has the `num_buffers` field
/// (virtio 1.2 §5.1.6).
pub const VNET_HDR_LEN: usize = 12;
/// Largest frame, header included, the device transmits or receives: the
/// header, an Ethernet header and 64 KiB of payload (a TSO/UFO frame), as in
/// Firecracker.
pub const MAX_BUFFER_SIZE: usize = 65562;
/// Bytes of configuration space: `mac`, `status`, `max_virtqueue_pairs` and
/// `mtu` of `struct virtio_net_config` (virtio 1.2 §5.1.4). Only `mac` (with
/// VIRTIO_NET_F_MAC) and `mtu` (with VIRTIO_NET_F_MTU) carry a value.
pub const CONFIG_SPACE_SIZE: usize = 12;
/// Smallest MTU the device accepts: the IPv4 minimum (RFC 791), Firecracker's
/// lower bound.
pub const MIN_MTU: u16 = 68;
/// Longest TAP device name: IFNAMSIZ (16) minus the terminating NUL.
pub const MAX_TAP_NAME_LEN: usize = 15;

/// What a network device is built from (Firecracker's `network-interfaces`
/// entry, without rate limiters).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// The interface's ID in the VMM's configuration.
    pub iface_id: String,
    /// Name of the host TAP device to attach to (created if it does not
    /// exist, which needs CAP_NET_ADMIN).
    pub host_dev_name: String,
    /// MAC address offered to the guest with VIRTIO_NET_F_MAC; without it the
    /// driver picks a random one.
    pub guest_mac: Option<[u8; 6]>,
    /// MTU offered to the guest with VIRTIO_NET_F_MTU, in
    /// `[MIN_MTU, 65535]`.
    pub mtu: Option<u16>,
    /// Rate limits on the frames the guest receives (none by default).
    pub rx_rate_limiter: RateLimiterConfig,
    /// Rate limits on the frames the guest sends (none by default).
    pub tx_rate_limiter: RateLimiterConfig,
}

/// Errors building a network device.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A MAC address is not six colon-separated pairs of hex digits.
    #[error(
        "invalid MAC address {0:?}: expected six colon-separated hex bytes, like 06:00:ac:10:00:02"
    )]
    InvalidMac(String),
    /// The configured MTU is below [`MIN_MTU`].
    #[error("MTU {0} of the network interface is out of range [{MIN_MTU}, 65535]")]
    InvalidMtu(u16),
    /// A rate limiter's timer could not be set up.
    #[error("network interface {iface_id}: cannot set up the rate limiter: {source}")]
    RateLimiter {
        /// The interface.
        iface_id: String,
        /// Cause.
        #[source]
        source: ember_rate_limiter::Error,
    },
    /// The TAP device name does not fit in IFNAMSIZ.
    #[error(
        "TAP device name {name:?} is {len} bytes long, the limit is {MAX_TAP_NAME_LEN} (IFNAMSIZ - 1)"
    )]
    TapNameTooLong {
        /// The name.
        name: String,
        /// Its length in bytes.
        len: usize,
    },
    /// The TAP device name contains a NUL byte or a '/'.
    #[error("TAP device name {0:?} contains a NUL byte or a '/'")]
    TapNameInvalid(String),
    /// `/dev/net/tun` could not be opened.
    #[error("cannot open TAP device {name}: cannot open /dev/net/tun: {source}")]
    OpenTun {
        /// The TAP device name.
        name: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// TUNSETIFF failed: the device is busy, not a TAP, or the process lacks
    /// CAP_NET_ADMIN to create it.
    #[error("cannot open TAP device {name}: {source}")]
    OpenTap {
        /// The TAP device name.
        name: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// TUNSETVNETHDRSZ failed.
    #[error("cannot set the virtio-net header size of TAP device {name} to {size}: {source}")]
    TapVnetHdrSize {
        /// The TAP device name.
        name: String,
        /// The header size.
        size: usize,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// TUNSETOFFLOAD failed.
    #[error("cannot set offload flags {flags:#x} on TAP device {name}: {source}")]
    TapOffload {
        /// The TAP device name.
        name: String,
        /// The TUN_F_* flags.
        flags: u32,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The device's control EventFd could not be created.
    #[error("cannot create the control EventFd of network interface {iface_id}: {source}")]
    EventFd {
        /// The interface ID.
        iface_id: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// Parses a MAC address written as six colon-separated pairs of hex digits
/// (`xx:xx:xx:xx:xx:xx`, either case), as Firecracker's `guest_mac`.
///
/// ```
/// use ember_virtio_net::parse_mac;
///
/// assert_eq!(parse_mac("06:00:AC:10:00:02").unwrap(), [6, 0, 0xac, 0x10, 0, 2]);
/// assert!(parse_mac("06:00:ac:10:00").is_err());
/// ```
pub fn parse_mac(s: &str) -> Result<[u8; 6], Error> {
    let invalid = || Error::InvalidMac(s.to_string());
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in mac.iter_mut() {
        let part = parts.next().ok_or_else(invalid)?;
        if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(invalid());
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| invalid())?;
    }
    if parts.next().is_some() {
        return Err(invalid());
    }
    Ok(mac)
}
