//! Firecracker's REST API (`--api-sock`): HTTP/1.1 on a Unix socket, JSON
//! bodies, the paths, methods, fields and status codes of Firecracker's
//! Swagger description (`docs/openapi.yaml` lists what Ember serves).
//!
//! The server runs on its own thread ([`THREAD_NAME`]). It parses and
//! type-checks each request into a [`VmmAction`] ([`parse_request`]) and
//! passes it to the VMM thread over a channel, waking it through
//! [`ApiServerHandle::request_event`]. The VMM answers with a
//! [`VmmResponse`] through the [`Responder`] that came with the action;
//! answers go back to each client in the order it sent its requests.
//!
//! The VMM side is an [`ActionHandler`]: before boot,
//! [`PreBootResources`] applies every configuration request with
//! Firecracker's rules and the configuration file's validation, and hands
//! the resulting [`VmConfig`](ember_config::VmConfig) over on
//! `InstanceStart`; after boot, [`check_allowed`] says which actions remain
//! allowed.
//!
//! # Example
//!
//! ```
//! use std::io::{Read, Write};
//! use std::os::unix::net::UnixStream;
//!
//! use ember_api::{start_api_server, PreBootResources, DEFAULT_MAX_PAYLOAD};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let sock = dir.path().join("api.sock");
//! let api = start_api_server(&sock, DEFAULT_MAX_PAYLOAD)?;
//!
//! // A client, e.g. `curl --unix-socket api.sock -X PUT .../machine-config`.
//! let mut client = UnixStream::connect(&sock)?;
//! let body = r#"{"vcpu_count": 2, "mem_size_mib": 256}"#;
//! write!(
//!     client,
//!     "PUT /machine-config HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
//!     body.len()
//! )?;
//!
//! // The VMM thread: wait for the request and answer it.
//! let mut resources = PreBootResources::new("vm-1");
//! let (action, responder) = api.recv().expect("the API thread runs");
//! let answer = ember_api::ActionHandler::handle(&mut resources, action);
//! responder.respond(answer);
//!
//! let mut reply = [0u8; 64];
//! let n = client.read(&mut reply)?;
//! assert!(reply[..n].starts_with(b"HTTP/1.1 204 No Content\r\n"));
//! assert_eq!(resources.config().machine_config.vcpu_count, 2);
//! # Ok(())
//! # }
//! ```

#![deny(missing_docs)]

mod action;
pub mod http;
mod mmds;
mod preboot;
mod request;
mod runtime;
mod server;

pub use action::{
    ApiError, BalloonStats, BalloonStatsUpdate, BalloonUpdate, DriveUpdate, HintingStatus,
    InstanceInfo, InstanceState, MachineConfigUpdate, MemBackend, MemBackendType,
    NetworkInterfaceUpdate, NetworkOverride, SnapshotCreateParams, SnapshotHugePages,
    SnapshotLoadParams, SnapshotType, StartHintingCmd, VmmAction, VmmData, VmmResponse,
    VsockOverride, APP_NAME, EMBER_VERSION, FIRECRACKER_API_VERSION,
};
pub use http::{error_to_http, response_to_http, HttpResponse};
pub use mmds::SharedMmds;
pub use preboot::{
    check_allowed, patch_drive, ActionHandler, PreBootResources, PrebootApiController,
    PrebootOutcome,
};
pub use request::{
    allowed_methods, parse_request, payload_too_large, Route, DEFAULT_MAX_PAYLOAD, NOT_IMPLEMENTED,
    ROUTES,
};
pub use runtime::{BalloonAnswer, BalloonRequest, RuntimeApiController, RuntimeVm, VmActionError};
pub use server::{
    start_api_server, start_api_server_with, ApiServerError, ApiServerHandle, Responder,
    ServerOptions, ThreadHook, IDLE_EVICTION_GRACE, THREAD_NAME,
};
