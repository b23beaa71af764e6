// SPDX-License-Identifier: Apache-2.0

//! The microVM metadata service (MMDS), as Firecracker offers it: a JSON
//! document the host fills through the API, which the guest reads over
//! HTTP at a link-local address (169.254.169.254 by default) on the network
//! interfaces the host names.
//!
//! - [`Mmds`] is the store: `PUT` replaces it, `PATCH` merges into it
//!   (RFC 7396, [`json_patch`]), both bounded by a size limit; `GET` of a
//!   path answers JSON or EC2 IMDS text ([`OutputFormat`]). It also issues
//!   the V2 session tokens ([`MmdsVersion`]).
//! - [`http::respond`] answers one guest HTTP request from the store.
//! - [`MmdsNetworkStack`] is what a network device calls: it recognises
//!   the frames the guest sends to the service (ARP for its address, IPv4
//!   to it), consumes them, and writes the answers (ARP replies, TCP
//!   segments from [`tcp::TcpServer`]) for the device to deliver. Its
//!   parsers ([`pdu`]) take hostile input and never panic; connections,
//!   buffers and queued resets are bounded.
//!
//! Nothing here touches KVM, a TAP or guest memory: the stack is pure
//! functions over byte buffers, and time is passed in.
//!
//! # Example
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use std::time::Instant;
//!
//! use ember_mmds::{Mmds, MmdsMetrics, MmdsNetworkStack};
//!
//! let mut mmds = Mmds::default();
//! mmds.put_data(serde_json::json!({"instance-id": "i-1"})).unwrap();
//! let mmds = Arc::new(Mutex::new(mmds));
//! let mut stack = MmdsNetworkStack::new(None, mmds, Arc::new(MmdsMetrics::default()));
//!
//! // An ARP request from 10.0.0.2 for 169.254.169.254.
//! let mut frame = vec![0xff; 6];
//! frame.extend([0x06, 0, 0, 0, 0, 2, 0x08, 0x06]);
//! frame.extend([0, 1, 8, 0, 6, 4, 0, 1, 0x06, 0, 0, 0, 0, 2, 10, 0, 0, 2]);
//! frame.extend([0; 6]);
//! frame.extend([169, 254, 169, 254]);
//! assert!(stack.is_mmds_frame(&frame));
//! assert!(stack.detour_frame(&frame, Instant::now()));
//!
//! let mut reply = [0u8; 1514];
//! let len = stack.write_next_frame(&mut reply, Instant::now()).unwrap();
//! assert_eq!(len, 42);
//! assert_eq!(&reply[..6], &[0x06, 0, 0, 0, 0, 2]); // to the asker
//! assert_eq!(&reply[20..22], &[0, 2]); // an ARP reply
//! ```

#![deny(missing_docs)]

mod data_store;
pub mod http;
mod metrics;
pub mod pdu;
mod stack;
pub mod tcp;
mod token;

#[cfg(test)]
mod tests;

pub use data_store::{
    json_patch, Mmds, MmdsError, MmdsVersion, OutputFormat, DEFAULT_DATA_STORE_LIMIT,
};
pub use metrics::MmdsMetrics;
pub use stack::{MmdsNetworkStack, DEFAULT_IPV4_ADDR, DEFAULT_MAC_ADDR, DEFAULT_TCP_PORT};
pub use token::{
    TokenError, MAX_TOKENS, MAX_TOKEN_TTL_SECONDS, MIN_TOKEN_TTL_SECONDS, PATH_TO_TOKEN,
};
