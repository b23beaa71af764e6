//! What the VMM tells its operator: Firecracker's log lines ([`logger`]) and
//! Firecracker's metrics lines ([`metrics`]), kept side by side as
//! Firecracker keeps them.
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//!
//! use ember_logger::metrics::{Counter, MetricWriter, Metrics};
//!
//! let metrics = Metrics::new();
//! let exits = Arc::new(Counter::new());
//! let e = exits.clone();
//! metrics.register("vcpu", Arc::new(move |out: &mut dyn MetricWriter| {
//!     out.counter("exit_io_out", e.count());
//! }));
//! exits.add(2);
//! let line: serde_json::Value = serde_json::from_str(&metrics.render()).unwrap();
//! assert_eq!(line["vcpu"]["exit_io_out"], 2);
//! ```

#![deny(missing_docs)]

pub mod logger;
pub mod metrics;
