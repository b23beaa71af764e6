//! The `ember` VMM: Firecracker's flags, configuration file and machine,
//! assembled from the Ember crates. The binary in `main.rs` is a thin
//! front-end over this library.

#![deny(missing_docs)]

pub mod event_loop;
pub mod seccomp;
pub mod signals;
pub mod snapshot;
pub mod socket_reaper;
pub mod terminal;
pub mod uffd;
pub mod vm;

/// The API thread's start hook that installs `filter` (its seccomp filter)
/// before the thread serves anything.
pub fn api_thread_hook(filter: std::sync::Arc<seccomp::BpfProgram>) -> ember_api::ThreadHook {
    std::sync::Arc::new(move || seccomp::apply(&filter).map_err(Into::into))
}
