//! The `ember` VMM: Firecracker's flags, configuration file and machine,
//! assembled from the Ember crates. The binary in `main.rs` is a thin
//! front-end over this library.

#![deny(missing_docs)]

pub mod api;
pub mod boot_timer;
pub mod devices;
pub mod event_loop;
pub mod seccomp;
pub mod terminal;
pub mod vm;
