//! The seccomp filters of Ember's threads: the `ember-seccomp` crate,
//! re-exported under the name the rest of the VMM uses.

pub use ember_seccomp::*;
