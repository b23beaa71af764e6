//! KVM vCPUs for an x86_64 microVM: boot-time configuration and the run loop that
//! dispatches exits to Ember's port-I/O and MMIO buses.
//!
//! A [`Vcpu`] is created after the VM's in-kernel irqchip, configured for the kernel's
//! entry point ([`Vcpu::configure`]: CPUID, MSRs, registers, page tables, FPU, local
//! APIC, the way Firecracker does it), then started on its own thread
//! ([`Vcpu::start`]). All vCPU threads share one [`VmControl`] through which the VMM and
//! the devices pause, resume and stop the VM; the first reason given for a stop
//! ([`ExitReason`]) is kept and the VMM learns about it through
//! [`VmControl::exit_event`]. A vCPU's guest-visible state goes out and back in as
//! one serializable [`VcpuState`] ([`Vcpu::save_state`], [`Vcpu::restore_state`]); the
//! vCPUs of a paused VM save their own, on their threads ([`VmControl::save_vcpu_states`]),
//! after finishing the port or MMIO access they exited for.
//!
//! # Example
//!
//! ```no_run
//! use std::sync::Arc;
//!
//! use ember_boot::{BootProtocol, KernelEntry};
//! use ember_bus::{Bus, BusKind};
//! use ember_vcpu::{register_kick_signal_handler, Vcpu, VcpuConfig, VmControl};
//! use vm_memory::{GuestAddress, GuestMemoryMmap};
//!
//! # fn entry() -> KernelEntry { unimplemented!() }
//! let kvm = kvm_ioctls::Kvm::new().unwrap();
//! let vm = kvm.create_vm().unwrap();
//! ember_irqchip::setup(&vm).unwrap();
//! let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 128 << 20)]).unwrap();
//! // ... register `mem` with KVM and load a kernel, which gives its entry point ...
//! let entry: KernelEntry = entry();
//!
//! register_kick_signal_handler().unwrap();
//! let control = VmControl::new().unwrap();
//! let config = VcpuConfig { vcpu_count: 1, smt: false };
//! let mut vcpu = Vcpu::new(0, &vm).unwrap();
//! vcpu.configure(&kvm, &mem, &entry, &config).unwrap();
//! let pio = Arc::new(Bus::new(BusKind::Pio));
//! let mmio = Arc::new(Bus::new(BusKind::Mmio));
//! let handle = vcpu.start(pio, mmio, mem, control.clone()).unwrap();
//!
//! // The VMM's event loop waits on this eventfd.
//! control.exit_event().read().unwrap();
//! println!("VM stopped: {}", control.exit_reason().unwrap());
//! handle.join().unwrap();
//! ```

#![deny(missing_docs)]

mod control;
mod cpuid;
mod metrics;
mod regs;
mod state;
mod vcpu;
mod walk;

use std::sync::OnceLock;

pub use control::{ExitReason, RunState, VmControl};
pub use cpuid::CpuidError;
pub use metrics::{Counter, VcpuMetrics};
pub use state::{msr_indices, CpuidEntry, MsrEntry, StateError, VcpuState};
pub use vcpu::{ThreadHook, Vcpu, VcpuHandle};
use vmm_sys_util::errno;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

/// Offset from SIGRTMIN of the signal that kicks vCPU threads out of KVM_RUN, as
/// Firecracker's `VCPU_RTSIG_OFFSET`.
pub const VCPU_KICK_SIGNAL_OFFSET: i32 = 0;

/// The vCPU topology of the microVM.
#[derive(Clone, Copy, Debug)]
pub struct VcpuConfig {
    /// Number of vCPUs, 1 to 32.
    pub vcpu_count: u8,
    /// Two threads per core (simultaneous multithreading) when there is more than one vCPU.
    pub smt: bool,
}

/// Most vCPUs a microVM may have, as Firecracker's `MAX_SUPPORTED_VCPUS`.
pub const MAX_VCPUS: u8 = 32;

/// Errors of vCPU set-up and control.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// KVM_CREATE_VCPU failed.
    #[error("failed to create vCPU {index} (KVM_CREATE_VCPU): {source}")]
    CreateVcpu {
        /// The vCPU index.
        index: u8,
        /// The error from KVM.
        #[source]
        source: errno::Error,
    },
    /// The vCPU index or count is out of range.
    #[error("invalid vCPU configuration: vCPU {index} of {vcpu_count} (the count must be 1 to {MAX_VCPUS} and the index below it)")]
    InvalidConfig {
        /// The vCPU index.
        index: u8,
        /// The configured count.
        vcpu_count: u8,
    },
    /// KVM_GET_SUPPORTED_CPUID failed.
    #[error("failed to read the CPUID KVM supports (KVM_GET_SUPPORTED_CPUID): {0}")]
    GetSupportedCpuid(#[source] errno::Error),
    /// The CPUID could not be normalised.
    #[error("failed to normalise the CPUID: {0}")]
    Cpuid(#[from] CpuidError),
    /// The CPU template cannot be applied to what KVM supports.
    #[error("{0}")]
    Template(#[from] ember_cpu_template::ApplyError),
    /// KVM_GET_MSRS failed while reading the MSRs a CPU template changes.
    #[error("failed to read the MSRs the CPU template changes (KVM_GET_MSRS): {0}")]
    GetMsrs(#[source] errno::Error),
    /// KVM_SET_CPUID2 failed.
    #[error("failed to set the vCPU's CPUID (KVM_SET_CPUID2): {0}")]
    SetCpuid(#[source] errno::Error),
    /// The MSR list could not be built.
    #[error("failed to build the boot MSR list: {0}")]
    MsrList(#[source] vmm_sys_util::fam::Error),
    /// KVM_SET_MSRS failed.
    #[error("failed to set the boot MSRs (KVM_SET_MSRS): {0}")]
    SetMsrs(#[source] errno::Error),
    /// KVM_SET_MSRS refused one of the boot MSRs or of those a CPU template changes.
    #[error("KVM accepted only {written} of the {total} boot and CPU template MSRs: it refused MSR {refused:#x}")]
    SetMsrsIncomplete {
        /// How many were set.
        written: usize,
        /// How many there are.
        total: usize,
        /// The first one refused.
        refused: u32,
    },
    /// KVM_SET_REGS failed.
    #[error("failed to set the general-purpose registers (KVM_SET_REGS): {0}")]
    SetRegs(#[source] errno::Error),
    /// KVM_GET_SREGS failed.
    #[error("failed to read the special registers (KVM_GET_SREGS): {0}")]
    GetSregs(#[source] errno::Error),
    /// KVM_SET_SREGS failed.
    #[error("failed to set the segment and control registers (KVM_SET_SREGS): {0}")]
    SetSregs(#[source] errno::Error),
    /// KVM_SET_FPU failed.
    #[error("failed to set the FPU registers (KVM_SET_FPU): {0}")]
    SetFpu(#[source] errno::Error),
    /// KVM_GET_LAPIC failed.
    #[error("failed to read the local APIC (KVM_GET_LAPIC; was the irqchip created before the vCPU?): {0}")]
    GetLapic(#[source] errno::Error),
    /// KVM_SET_LAPIC failed.
    #[error("failed to set the local APIC LINT0/LINT1 modes (KVM_SET_LAPIC): {0}")]
    SetLapic(#[source] errno::Error),
    /// Writing a boot structure into guest memory failed.
    #[error("failed to {what}: {source}")]
    Boot {
        /// What was being written.
        what: &'static str,
        /// The error from the boot crate.
        #[source]
        source: ember_boot::Error,
    },
    /// The exit eventfd could not be created.
    #[error("failed to create the VM exit eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    /// The kick signal handler could not be installed.
    #[error("failed to install the handler of the vCPU kick signal (SIGRTMIN+{VCPU_KICK_SIGNAL_OFFSET}): {0}")]
    SignalHandler(#[source] errno::Error),
    /// The vCPU thread could not be spawned.
    #[error("failed to spawn the thread of vCPU {index}: {source}")]
    Spawn {
        /// The vCPU index.
        index: u8,
        /// The error from the OS.
        #[source]
        source: std::io::Error,
    },
    /// The VM is stopping.
    #[error("the VM is stopping")]
    Exiting,
    /// Some vCPUs did not park in time.
    #[error("only {parked} of {total} vCPUs paused within 5 seconds")]
    PauseTimeout {
        /// vCPUs parked.
        parked: usize,
        /// vCPUs running.
        total: usize,
    },
    /// A vCPU state was asked of a VM that is not paused.
    #[error("the vCPUs are not paused")]
    NotPaused,
    /// A parked vCPU could not read its state.
    #[error("vCPU {index}: cannot save its state: {source}")]
    SaveState {
        /// The vCPU.
        index: u8,
        /// Cause.
        #[source]
        source: StateError,
    },
}

/// The handler of the kick signal: it does nothing, its only purpose is to interrupt
/// KVM_RUN (which then returns EINTR). It must not be `SIG_IGN`, or the kernel would
/// discard the signal without interrupting anything.
extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the no-op handler for the vCPU kick signal (SIGRTMIN+0, as Firecracker). Call
/// it once before starting vCPUs; [`Vcpu::start`] calls it too, later calls do nothing.
///
/// # Errors
///
/// [`Error::SignalHandler`] when `sigaction` fails.
pub fn register_kick_signal_handler() -> Result<(), Error> {
    static INSTALLED: OnceLock<Result<(), errno::Error>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| register_signal_handler(SIGRTMIN() + VCPU_KICK_SIGNAL_OFFSET, handle_kick))
        .map_err(Error::SignalHandler)
}
