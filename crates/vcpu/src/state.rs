//! State in, state out: everything of a vCPU the guest can observe, as one plain
//! serializable struct ([`VcpuState`]), read from a KVM vCPU ([`VcpuState::save`]) and
//! written into another ([`VcpuState::restore`]), as Firecracker's `VcpuState`.
//!
//! The KVM structures (registers, segment registers, XSAVE area, local APIC, pending
//! events) serialize as kvm-bindings lays them out; CPUID and MSRs, which are lists KVM
//! hands out in variable-size wrappers, are kept as plain vectors.

use std::sync::OnceLock;

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
    KVM_MAX_MSR_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd};
use serde::{Deserialize, Serialize};
use vmm_sys_util::errno;

/// The x2APIC register MSRs (Intel SDM Vol. 3, 11.12.1.2). They alias the local APIC
/// state, which is saved and restored whole; writing them back one by one would apply
/// side effects (an ICR write sends an IPI), so they are left out, as Firecracker does.
const X2APIC_MSRS: std::ops::RangeInclusive<u32> = 0x800..=0x8ff;

/// Errors saving or restoring a vCPU's state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A KVM_GET_* ioctl failed.
    #[error("cannot read the vCPU's {what} (KVM_GET_{ioctl}): {source}")]
    Get {
        /// What was being read.
        what: &'static str,
        /// The ioctl's name after `KVM_GET_`.
        ioctl: &'static str,
        /// The error from KVM.
        #[source]
        source: errno::Error,
    },
    /// A KVM_SET_* ioctl failed.
    #[error("cannot write the vCPU's {what} (KVM_SET_{ioctl}): {source}")]
    Set {
        /// What was being written.
        what: &'static str,
        /// The ioctl's name after `KVM_SET_`.
        ioctl: &'static str,
        /// The error from KVM.
        #[source]
        source: errno::Error,
    },
    /// A list is too long for KVM's wrapper.
    #[error("cannot build the {what} list of {len} entries: {source}")]
    List {
        /// "CPUID", "MSR".
        what: &'static str,
        /// Its length.
        len: usize,
        /// The wrapper's error.
        #[source]
        source: vmm_sys_util::fam::Error,
    },
    /// KVM_SET_MSRS stopped before the end of the list.
    #[error("KVM refused MSR {index:#x} of the saved state")]
    MsrRefused {
        /// The MSR refused.
        index: u32,
    },
    /// A vCPU thread was asked for its state before the MSR list was read from /dev/kvm
    /// (by [`msr_indices`]).
    #[error("the list of MSRs to save was never read from /dev/kvm")]
    MsrListUnknown,
}

/// The MSRs a vCPU state holds: KVM_GET_MSR_INDEX_LIST without the x2APIC range, asked
/// once per process (it depends only on the host and the KVM module) and cached.
///
/// # Errors
///
/// The ioctl failed.
pub fn msr_indices(kvm: &Kvm) -> Result<&'static [u32], StateError> {
    if let Some(indices) = MSR_INDICES.get() {
        return Ok(indices);
    }
    let list = get("MSR list", "MSR_INDEX_LIST", kvm.get_msr_index_list())?;
    let indices: Vec<u32> = list
        .as_slice()
        .iter()
        .copied()
        .filter(|i| !X2APIC_MSRS.contains(i))
        .collect();
    Ok(MSR_INDICES.get_or_init(|| indices))
}

static MSR_INDICES: OnceLock<Vec<u32>> = OnceLock::new();

/// The list [`msr_indices`] read, if it did.
pub(crate) fn cached_msr_indices() -> Option<&'static [u32]> {
    MSR_INDICES.get().map(Vec::as_slice)
}

/// One CPUID leaf as KVM reports it (`struct kvm_cpuid_entry2`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuidEntry {
    /// EAX input: the leaf.
    pub function: u32,
    /// ECX input: the sub-leaf.
    pub index: u32,
    /// `KVM_CPUID_FLAG_*`.
    pub flags: u32,
    /// EAX output.
    pub eax: u32,
    /// EBX output.
    pub ebx: u32,
    /// ECX output.
    pub ecx: u32,
    /// EDX output.
    pub edx: u32,
}

impl From<&kvm_cpuid_entry2> for CpuidEntry {
    fn from(e: &kvm_cpuid_entry2) -> Self {
        CpuidEntry {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
        }
    }
}

impl From<&CpuidEntry> for kvm_cpuid_entry2 {
    fn from(e: &CpuidEntry) -> Self {
        kvm_cpuid_entry2 {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
            ..Default::default()
        }
    }
}

/// One model-specific register.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsrEntry {
    /// The MSR number.
    pub index: u32,
    /// Its value.
    pub data: u64,
}

/// The guest-visible state of one vCPU.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// The CPUID the guest sees.
    pub cpuid: Vec<CpuidEntry>,
    /// Every MSR KVM saves (KVM_GET_MSR_INDEX_LIST) and could read, x2APIC ones
    /// excepted.
    pub msrs: Vec<MsrEntry>,
    /// General-purpose registers, RIP and RFLAGS.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers, EFER, APIC base.
    pub sregs: kvm_sregs,
    /// The XSAVE area: x87 FPU, SSE and the extended states.
    pub xsave: kvm_xsave,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debug_regs: kvm_debugregs,
    /// The local APIC's registers.
    pub lapic: kvm_lapic_state,
    /// Runnable, halted, waiting for INIT/SIPI.
    pub mp_state: kvm_mp_state,
    /// Pending exceptions, interrupts, NMIs and SMIs.
    pub vcpu_events: kvm_vcpu_events,
}

fn get<T>(
    what: &'static str,
    ioctl: &'static str,
    r: Result<T, errno::Error>,
) -> Result<T, StateError> {
    r.map_err(|source| StateError::Get {
        what,
        ioctl,
        source,
    })
}

fn set<T>(
    what: &'static str,
    ioctl: &'static str,
    r: Result<T, errno::Error>,
) -> Result<T, StateError> {
    r.map_err(|source| StateError::Set {
        what,
        ioctl,
        source,
    })
}

impl VcpuState {
    /// Reads the state of `vcpu`. The vCPU must not be running (its thread is parked or
    /// not started): KVM would otherwise return a state already out of date.
    ///
    /// # Errors
    ///
    /// The ioctl that failed.
    pub fn save(kvm: &Kvm, vcpu: &VcpuFd) -> Result<Self, StateError> {
        Self::save_with_msr_indices(msr_indices(kvm)?, vcpu)
    }

    /// [`VcpuState::save`] with the MSR list already read ([`msr_indices`]), for a
    /// thread that has no /dev/kvm at hand.
    ///
    /// # Errors
    ///
    /// The ioctl that failed.
    pub fn save_with_msr_indices(indices: &[u32], vcpu: &VcpuFd) -> Result<Self, StateError> {
        let cpuid = get("CPUID", "CPUID2", vcpu.get_cpuid2(KVM_MAX_CPUID_ENTRIES))?;
        Ok(VcpuState {
            cpuid: cpuid.as_slice().iter().map(CpuidEntry::from).collect(),
            msrs: read_msrs(vcpu, indices)?,
            regs: get("registers", "REGS", vcpu.get_regs())?,
            sregs: get("special registers", "SREGS", vcpu.get_sregs())?,
            xsave: get("XSAVE area", "XSAVE", vcpu.get_xsave())?,
            xcrs: get("XCRs", "XCRS", vcpu.get_xcrs())?,
            debug_regs: get("debug registers", "DEBUGREGS", vcpu.get_debug_regs())?,
            lapic: get("local APIC", "LAPIC", vcpu.get_lapic())?,
            mp_state: get("MP state", "MP_STATE", vcpu.get_mp_state())?,
            vcpu_events: get("pending events", "VCPU_EVENTS", vcpu.get_vcpu_events())?,
        })
    }

    /// Writes this state into `vcpu`, a vCPU created in a VM whose irqchip exists and
    /// that has not run: CPUID first (it decides which MSRs and XSAVE features are
    /// valid), pending events last, in Firecracker's order.
    ///
    /// # Errors
    ///
    /// The ioctl that failed, or [`StateError::MsrRefused`].
    pub fn restore(&self, vcpu: &VcpuFd) -> Result<(), StateError> {
        let entries: Vec<kvm_cpuid_entry2> = self.cpuid.iter().map(Into::into).collect();
        let cpuid = CpuId::from_entries(&entries).map_err(|source| StateError::List {
            what: "CPUID",
            len: entries.len(),
            source,
        })?;
        set("CPUID", "CPUID2", vcpu.set_cpuid2(&cpuid))?;
        set("MP state", "MP_STATE", vcpu.set_mp_state(self.mp_state))?;
        set("registers", "REGS", vcpu.set_regs(&self.regs))?;
        set("special registers", "SREGS", vcpu.set_sregs(&self.sregs))?;
        // SAFETY: KVM_SET_XSAVE reads the vCPU's XSAVE buffer size, which exceeds the
        // 4 KiB of `kvm_xsave` only for dynamically enabled features (AMX), which need a
        // permission (ARCH_REQ_XCOMP_GUEST_PERM) this process never asks for.
        set("XSAVE area", "XSAVE", unsafe {
            vcpu.set_xsave(&self.xsave)
        })?;
        set("XCRs", "XCRS", vcpu.set_xcrs(&self.xcrs))?;
        set(
            "debug registers",
            "DEBUGREGS",
            vcpu.set_debug_regs(&self.debug_regs),
        )?;
        set("local APIC", "LAPIC", vcpu.set_lapic(&self.lapic))?;
        write_msrs(vcpu, &self.msrs)?;
        set(
            "pending events",
            "VCPU_EVENTS",
            vcpu.set_vcpu_events(&self.vcpu_events),
        )
    }
}

/// Reads the MSRs `indices`, at most `KVM_MAX_MSR_ENTRIES` per call. KVM stops at the
/// first MSR it cannot read (one the host CPU lacks): that one is left out.
fn read_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Result<Vec<MsrEntry>, StateError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|source| StateError::List {
            what: "MSR",
            len: entries.len(),
            source,
        })?;
        let read = get("MSRs", "MSRS", vcpu.get_msrs(&mut msrs))?.min(chunk.len());
        out.extend(msrs.as_slice()[..read].iter().map(|e| MsrEntry {
            index: e.index,
            data: e.data,
        }));
        if read < chunk.len() {
            log::debug!("MSR {:#x} cannot be read: not saved", chunk[read]);
        }
        rest = &rest[(read + 1).min(chunk.len())..];
    }
    Ok(out)
}

/// Writes `msrs`, at most `KVM_MAX_MSR_ENTRIES` per call; every one must be accepted.
fn write_msrs(vcpu: &VcpuFd, msrs: &[MsrEntry]) -> Result<(), StateError> {
    for chunk in msrs.chunks(KVM_MAX_MSR_ENTRIES) {
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|m| kvm_msr_entry {
                index: m.index,
                data: m.data,
                ..Default::default()
            })
            .collect();
        let list = Msrs::from_entries(&entries).map_err(|source| StateError::List {
            what: "MSR",
            len: entries.len(),
            source,
        })?;
        let written = set("MSRs", "MSRS", vcpu.set_msrs(&list))?;
        if written < chunk.len() {
            return Err(StateError::MsrRefused {
                index: chunk[written].index,
            });
        }
    }
    Ok(())
}
