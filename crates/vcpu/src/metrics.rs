//! Counters of the exits the vCPU threads handle: what the VMM reports as
//! Firecracker's `vcpu` metrics group.
//!
//! The run loop pays one relaxed atomic add per exit, with no allocation and
//! no lock, so counting stays invisible next to the cost of the exit itself.

/// The shared counter type: one relaxed atomic add per event.
pub use ember_metrics::Counter;

ember_metrics::metric_group! {
    /// VM exits handled by the vCPU threads of one VM, by kind, with
    /// Firecracker's field names. Every vCPU of the VM shares one instance (see
    /// [`Vcpu::set_metrics`](crate::Vcpu::set_metrics)).
    #[derive(Debug, Default)]
    pub struct VcpuMetrics {
        /// KVM_EXIT_IO, direction in (the guest read a port).
        pub exit_io_in: Counter,
        /// KVM_EXIT_IO, direction out (the guest wrote a port).
        pub exit_io_out: Counter,
        /// KVM_EXIT_MMIO reads.
        pub exit_mmio_read: Counter,
        /// KVM_EXIT_MMIO writes.
        pub exit_mmio_write: Counter,
        /// Exits that stopped a vCPU with an error: triple fault, KVM internal
        /// error, failed entry, unexpected exit, failed KVM_RUN, HLT.
        pub failures: Counter,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_add_up() {
        let m = VcpuMetrics::default();
        m.exit_io_out.inc();
        m.exit_io_out.add(4);
        m.failures.inc();
        assert_eq!(m.exit_io_out.count(), 5);
        assert_eq!(m.failures.count(), 1);
        assert_eq!(m.exit_io_in.count(), 0);
        assert_eq!(Counter::new().count(), 0);
    }
}
