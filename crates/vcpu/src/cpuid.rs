//! CPUID normalisation: turns KVM_GET_SUPPORTED_CPUID into the CPUID one vCPU of the
//! microVM shows its guest, the way Firecracker does
//! (`cpu_config/x86_64/cpuid/{normalize,intel/normalize,amd/normalize}.rs`).
//!
//! The topology is one socket holding `vcpu_count` logical processors, two threads per core
//! when SMT is on, one otherwise. A vCPU's APIC id is its index. Values that KVM cannot know
//! (vendor, cache and TLB geometry) are passed through from the host; performance monitoring
//! is hidden.

use std::collections::BTreeMap;

use ember_cpu_template::{CpuidEntry, CustomCpuTemplate};
use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

/// Errors of the CPUID normalisation.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CpuidError {
    /// A leaf the normalisation edits is absent from the CPUID KVM reported.
    #[error("CPUID leaf {leaf:#x} subleaf {subleaf} is missing from KVM_GET_SUPPORTED_CPUID")]
    MissingLeaf {
        /// The leaf (EAX input).
        leaf: u32,
        /// The subleaf (ECX input).
        subleaf: u32,
    },
    /// The vCPU count cannot be described in CPUID.
    #[error("cannot describe {0} vCPUs in CPUID: the count must be 1 to 128")]
    VcpuCount(u8),
    /// The normalised CPUID has more entries than KVM accepts.
    #[error("the normalised CPUID has more entries than KVM_SET_CPUID2 accepts: {0}")]
    TooManyEntries(#[source] vmm_sys_util::fam::Error),
}

/// The 4 output registers of one CPUID query.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Regs {
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

/// Runs the CPUID instruction on the host.
pub(crate) fn host_cpuid(leaf: u32, subleaf: u32) -> Regs {
    // `__cpuid_count` is a safe function since Rust 1.87 and unsafe before.
    #[allow(unused_unsafe)]
    // SAFETY: CPUID is available on every x86_64 CPU and only reads identification data.
    let r = unsafe { std::arch::x86_64::__cpuid_count(leaf, subleaf) };
    Regs {
        eax: r.eax,
        ebx: r.ebx,
        ecx: r.ecx,
        edx: r.edx,
    }
}

// Vendor ids in leaf 0 EBX, EDX, ECX order (Intel SDM vol. 2A, CPUID, leaf 0).
const VENDOR_INTEL: &[u8; 12] = b"GenuineIntel";
const VENDOR_AMD: &[u8; 12] = b"AuthenticAMD";

/// Brand string for AMD guests, as Firecracker.
const AMD_BRAND_STRING: &[u8] = b"AMD EPYC";
/// Brand string for Intel guests, followed by the host frequency when the host brand has one.
const INTEL_BRAND_BASE: &[u8] = b"Intel(R) Xeon(R) Processor";
/// Length of the brand string in leaves 0x8000_0002..=0x8000_0004.
const BRAND_STRING_LEN: usize = 48;

/// Bits of the leaf 0xB / 0x1F level type field (Intel SDM vol. 2A, CPUID leaf 0BH).
const LEVEL_TYPE_THREAD: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;
/// APIC id bits below the package level in leaf 0xB subleaf 1: room for 128 logical
/// processors per package, as Firecracker.
const LEAF_B_CORE_SHIFT: u32 = 7;

type Key = (u32, u32);

/// Working copy of the CPUID, keyed by (leaf, subleaf).
struct Table(BTreeMap<Key, kvm_cpuid_entry2>);

impl Table {
    fn get_mut(&mut self, leaf: u32, subleaf: u32) -> Result<&mut kvm_cpuid_entry2, CpuidError> {
        self.0
            .get_mut(&(leaf, subleaf))
            .ok_or(CpuidError::MissingLeaf { leaf, subleaf })
    }

    fn insert(&mut self, leaf: u32, subleaf: u32, flags: u32, r: Regs) {
        self.0.insert(
            (leaf, subleaf),
            kvm_cpuid_entry2 {
                function: leaf,
                index: subleaf,
                flags,
                eax: r.eax,
                ebx: r.ebx,
                ecx: r.ecx,
                edx: r.edx,
                ..Default::default()
            },
        );
    }

    fn vendor(&self) -> Option<[u8; 12]> {
        let leaf0 = self.0.get(&(0, 0))?;
        Some(vendor_bytes(leaf0.ebx, leaf0.edx, leaf0.ecx))
    }
}

fn vendor_bytes(ebx: u32, edx: u32, ecx: u32) -> [u8; 12] {
    let mut v = [0u8; 12];
    v[0..4].copy_from_slice(&ebx.to_le_bytes());
    v[4..8].copy_from_slice(&edx.to_le_bytes());
    v[8..12].copy_from_slice(&ecx.to_le_bytes());
    v
}

/// Sets bit `bit` of `reg` to `value`.
fn set_bit(reg: &mut u32, bit: u32, value: bool) {
    *reg = (*reg & !(1 << bit)) | (u32::from(value) << bit);
}

/// Sets bits `lo..=hi` of `reg` to `value`, which the callers keep within the field.
fn set_bits(reg: &mut u32, lo: u32, hi: u32, value: u32) {
    let width = hi - lo + 1;
    let mask = if width == 32 {
        u32::MAX
    } else {
        ((1u32 << width) - 1) << lo
    };
    debug_assert!(u64::from(value) < (1u64 << width), "{value} does not fit");
    *reg = (*reg & !mask) | ((value << lo) & mask);
}

fn get_bits(reg: u32, lo: u32, hi: u32) -> u32 {
    let width = hi - lo + 1;
    if width == 32 {
        reg
    } else {
        (reg >> lo) & ((1u32 << width) - 1)
    }
}

/// Applies a CPU template's CPUID modifiers to `cpuid`, the CPUID KVM supports, before it
/// is normalised (the order Firecracker follows, so that the topology, APIC ids and
/// vendor stay the VMM's whatever the template says). On an error `cpuid` is unchanged.
pub(crate) fn apply_template(
    cpuid: &mut CpuId,
    template: &CustomCpuTemplate,
) -> Result<(), crate::Error> {
    if template.cpuid_modifiers.is_empty() {
        return Ok(());
    }
    let mut table: BTreeMap<Key, CpuidEntry> = cpuid
        .as_slice()
        .iter()
        .map(|e| {
            let entry = CpuidEntry {
                flags: e.flags,
                eax: e.eax,
                ebx: e.ebx,
                ecx: e.ecx,
                edx: e.edx,
            };
            ((e.function, e.index), entry)
        })
        .collect();
    template.apply_cpuid(&mut table)?;
    for e in cpuid.as_mut_slice() {
        if let Some(t) = table.get(&(e.function, e.index)) {
            e.flags = t.flags;
            e.eax = t.eax;
            e.ebx = t.ebx;
            e.ecx = t.ecx;
            e.edx = t.edx;
        }
    }
    Ok(())
}

/// Normalises `cpuid` for vCPU `cpu_index` of `cpu_count`, with two threads per core when
/// `smt` is set and there is more than one vCPU, using the host's CPUID for the values
/// passed through.
pub(crate) fn normalize(
    cpuid: &mut CpuId,
    cpu_index: u8,
    cpu_count: u8,
    smt: bool,
) -> Result<(), CpuidError> {
    normalize_with(cpuid, cpu_index, cpu_count, smt, &host_cpuid)
}

/// [`normalize`] with the host's CPUID given as a function, so tests can fake a host.
pub(crate) fn normalize_with(
    cpuid: &mut CpuId,
    cpu_index: u8,
    cpu_count: u8,
    smt: bool,
    host: &dyn Fn(u32, u32) -> Regs,
) -> Result<(), CpuidError> {
    if cpu_count == 0 || cpu_count > 128 {
        return Err(CpuidError::VcpuCount(cpu_count));
    }
    // Bits of the APIC id that number the threads of a core, and the threads per core.
    let cpu_bits = u8::from(cpu_count > 1 && smt);
    let cpus_per_core = 1u8 << cpu_bits;

    let mut t = Table(
        cpuid
            .as_slice()
            .iter()
            .map(|e| ((e.function, e.index), *e))
            .collect(),
    );

    update_vendor_id(&mut t, host)?;
    update_feature_info(&mut t, cpu_index, cpu_count)?;
    update_extended_topology(&mut t, cpu_index, cpu_count, cpu_bits, cpus_per_core)?;
    update_extended_cache_features(&mut t, host)?;

    match t.vendor() {
        Some(v) if &v == VENDOR_INTEL => intel::normalize(&mut t, cpu_count, cpus_per_core, host)?,
        Some(v) if &v == VENDOR_AMD => {
            amd::normalize(&mut t, cpu_index, cpu_count, cpus_per_core, host)?
        }
        other => log::warn!(
            "CPU vendor {:?} is neither Intel nor AMD: vendor-specific CPUID leaves are passed as KVM reported them",
            other.map(|v| String::from_utf8_lossy(&v).into_owned())
        ),
    }

    let entries: Vec<kvm_cpuid_entry2> = t.0.into_values().collect();
    *cpuid = CpuId::from_entries(&entries).map_err(CpuidError::TooManyEntries)?;
    Ok(())
}

/// Leaf 0: the vendor id is the host's, whatever KVM reported.
fn update_vendor_id(t: &mut Table, host: &dyn Fn(u32, u32) -> Regs) -> Result<(), CpuidError> {
    let leaf0 = t.get_mut(0, 0)?;
    let h = host(0, 0);
    leaf0.ebx = h.ebx;
    leaf0.ecx = h.ecx;
    leaf0.edx = h.edx;
    Ok(())
}

/// Leaf 1: APIC id, CLFLUSH line size, logical processor count, HTT and feature bits.
fn update_feature_info(t: &mut Table, cpu_index: u8, cpu_count: u8) -> Result<(), CpuidError> {
    // Intel SDM vol. 2A, CPUID leaf 01H.
    const ECX_PDCM: u32 = 15;
    const ECX_TSC_DEADLINE: u32 = 24;
    const ECX_HYPERVISOR: u32 = 31;
    const EDX_HTT: u32 = 28;
    // CLFLUSH line size in 8-byte units: 64-byte lines.
    const CLFLUSH_LINE: u32 = 8;

    let leaf1 = t.get_mut(1, 0)?;
    // No IA32_PERF_CAPABILITIES: the PMU is hidden (see leaf 0xA).
    set_bit(&mut leaf1.ecx, ECX_PDCM, false);
    // The in-kernel LAPIC timer emulates TSC-deadline mode.
    set_bit(&mut leaf1.ecx, ECX_TSC_DEADLINE, true);
    // Tell the guest it runs on a hypervisor.
    set_bit(&mut leaf1.ecx, ECX_HYPERVISOR, true);
    // EBX[31:24]: initial APIC id.
    set_bits(&mut leaf1.ebx, 24, 31, u32::from(cpu_index));
    // EBX[15:8]: CLFLUSH line size.
    set_bits(&mut leaf1.ebx, 8, 15, CLFLUSH_LINE);
    // EBX[23:16]: addressable logical processor ids in the package, a power of two.
    set_bits(
        &mut leaf1.ebx,
        16,
        23,
        u32::from(cpu_count.next_power_of_two()),
    );
    // HTT: EBX[23:16] is valid, i.e. the package has more than one logical processor.
    set_bit(&mut leaf1.edx, EDX_HTT, cpu_count > 1);
    Ok(())
}

/// Leaf 0xB: x2APIC id and the thread and core levels of the topology.
fn update_extended_topology(
    t: &mut Table,
    cpu_index: u8,
    cpu_count: u8,
    cpu_bits: u8,
    cpus_per_core: u8,
) -> Result<(), CpuidError> {
    // Linux 6.2+ KVM no longer reports subleaf 1 (commit "KVM: x86: Do not return host
    // topology information from KVM_GET_SUPPORTED_CPUID"); the core level needs it.
    t.0.entry((0xb, 1)).or_insert(kvm_cpuid_entry2 {
        function: 0xb,
        index: 1,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        ..Default::default()
    });
    for ((leaf, index), e) in t.0.range_mut((0xb, 0)..=(0xb, u32::MAX)) {
        debug_assert_eq!(*leaf, 0xb);
        e.eax = 0;
        e.ebx = 0;
        e.ecx = 0;
        // EDX: x2APIC id of this logical processor.
        e.edx = u32::from(cpu_index);
        e.flags = KVM_CPUID_FLAG_SIGNIFCANT_INDEX;
        match *index {
            0 => {
                // EAX[4:0]: shift to the next level id; EBX[15:0]: threads per core.
                set_bits(&mut e.eax, 0, 4, u32::from(cpu_bits));
                set_bits(&mut e.ebx, 0, 15, u32::from(cpus_per_core));
                // ECX[7:0] level number 0, ECX[15:8] level type.
                set_bits(&mut e.ecx, 8, 15, LEVEL_TYPE_THREAD);
            }
            1 => {
                set_bits(&mut e.eax, 0, 4, LEAF_B_CORE_SHIFT);
                set_bits(&mut e.ebx, 0, 15, u32::from(cpu_count));
                set_bits(&mut e.ecx, 0, 7, 1);
                set_bits(&mut e.ecx, 8, 15, LEVEL_TYPE_CORE);
            }
            // No further levels: level type 0 (invalid), level number echoed.
            n => e.ecx = n & 0xff,
        }
    }
    Ok(())
}

/// Leaves 0x8000_0005 and 0x8000_0006: L1/L2/L3 cache and TLB geometry from the host.
fn update_extended_cache_features(
    t: &mut Table,
    host: &dyn Fn(u32, u32) -> Regs,
) -> Result<(), CpuidError> {
    let h = host(0x8000_0005, 0);
    let e = t.get_mut(0x8000_0005, 0)?;
    (e.eax, e.ebx, e.ecx, e.edx) = (h.eax, h.ebx, h.ecx, h.edx);
    let h = host(0x8000_0006, 0);
    let e = t.get_mut(0x8000_0006, 0)?;
    (e.eax, e.ebx, e.ecx, e.edx) = (h.eax, h.ebx, h.ecx, h.edx);
    // EDX[17:16] are reserved on Intel.
    e.edx &= !0x0003_0000;
    Ok(())
}

/// Writes a 48-byte, NUL-padded brand string into leaves 0x8000_0002..=0x8000_0004.
fn apply_brand_string(t: &mut Table, brand: &[u8]) -> Result<(), CpuidError> {
    let mut bytes = [0u8; BRAND_STRING_LEN];
    let n = brand.len().min(BRAND_STRING_LEN - 1);
    bytes[..n].copy_from_slice(&brand[..n]);
    for (i, chunk) in bytes.chunks_exact(16).enumerate() {
        let leaf = 0x8000_0002 + i as u32;
        let e = t.get_mut(leaf, 0)?;
        let word =
            |k: usize| u32::from_le_bytes([chunk[k], chunk[k + 1], chunk[k + 2], chunk[k + 3]]);
        (e.eax, e.ebx, e.ecx, e.edx) = (word(0), word(4), word(8), word(12));
    }
    Ok(())
}

/// The host's brand string from leaves 0x8000_0002..=0x8000_0004.
fn host_brand_string(host: &dyn Fn(u32, u32) -> Regs) -> [u8; BRAND_STRING_LEN] {
    let mut bytes = [0u8; BRAND_STRING_LEN];
    for (i, chunk) in bytes.chunks_exact_mut(16).enumerate() {
        let r = host(0x8000_0002 + i as u32, 0);
        for (k, reg) in [r.eax, r.ebx, r.ecx, r.edx].into_iter().enumerate() {
            chunk[k * 4..k * 4 + 4].copy_from_slice(&reg.to_le_bytes());
        }
    }
    bytes
}

mod intel {
    use super::*;

    pub(super) fn normalize(
        t: &mut Table,
        cpu_count: u8,
        cpus_per_core: u8,
        host: &dyn Fn(u32, u32) -> Regs,
    ) -> Result<(), CpuidError> {
        update_deterministic_cache(t, cpu_count, cpus_per_core);
        // Leaf 6: no Turbo Boost (EAX[1]) and no energy-performance bias (ECX[3]): the guest
        // cannot select frequencies.
        let leaf6 = t.get_mut(6, 0)?;
        set_bit(&mut leaf6.eax, 1, false);
        set_bit(&mut leaf6.ecx, 3, false);
        // Leaf 7: FDP_EXCPTN_ONLY (EBX[6]) and ZERO_FCS_FDS (EBX[13]), which KVM emulates,
        // as Linux's KVM documentation recommends.
        let leaf7 = t.get_mut(7, 0)?;
        set_bit(&mut leaf7.ebx, 6, true);
        set_bit(&mut leaf7.ebx, 13, true);
        // Leaf 0xA: no architectural performance monitoring.
        let leaf_a = t.get_mut(0xa, 0)?;
        (leaf_a.eax, leaf_a.ebx, leaf_a.ecx, leaf_a.edx) = (0, 0, 0, 0);
        let brand = intel_brand_string(&host_brand_string(host));
        apply_brand_string(t, &brand)
    }

    /// Leaf 4: how many logical processors and cores share each cache.
    fn update_deterministic_cache(t: &mut Table, cpu_count: u8, cpus_per_core: u8) {
        let cores = cpu_count / cpus_per_core;
        for ((_, _), e) in t.0.range_mut((4, 0)..=(4, u32::MAX)) {
            // An all-zero subleaf ends the list (cache type 0, "no more caches").
            if e.eax == 0 && e.ebx == 0 && e.ecx == 0 && e.edx == 0 {
                break;
            }
            // EAX[25:14]: logical processors sharing the cache, minus one. L1 and L2 belong
            // to a core, L3 to the package.
            match get_bits(e.eax, 5, 7) {
                1 | 2 => set_bits(&mut e.eax, 14, 25, u32::from(cpus_per_core - 1)),
                3 => set_bits(&mut e.eax, 14, 25, u32::from(cpu_count - 1)),
                _ => {}
            }
            // EAX[31:26]: cores in the package, minus one.
            set_bits(&mut e.eax, 26, 31, u32::from(cores.max(1) - 1));
        }
    }

    /// "Intel(R) Xeon(R) Processor @ <host frequency>" when the host brand ends with a
    /// frequency such as "@ 3.00GHz", "Intel(R) Xeon(R) Processor" otherwise.
    pub(super) fn intel_brand_string(host: &[u8; BRAND_STRING_LEN]) -> Vec<u8> {
        let mut brand = INTEL_BRAND_BASE.to_vec();
        let end = host.iter().position(|b| *b == 0).unwrap_or(host.len());
        let host = &host[..end];
        let unit = host
            .windows(3)
            .position(|w| matches!(w, [b'T' | b'G' | b'M', b'H', b'z']));
        if let Some(unit) = unit {
            let digits = host[..unit]
                .iter()
                .rev()
                .take_while(|c| c.is_ascii_digit() || **c == b'.')
                .count();
            let start = unit - digits;
            if digits > 0 && start > 0 && host[start - 1] == b' ' {
                brand.extend_from_slice(b" @ ");
                brand.extend_from_slice(&host[start..unit + 3]);
            }
        }
        brand
    }
}

mod amd {
    use super::*;

    pub(super) fn normalize(
        t: &mut Table,
        cpu_index: u8,
        cpu_count: u8,
        cpus_per_core: u8,
        host: &dyn Fn(u32, u32) -> Regs,
    ) -> Result<(), CpuidError> {
        passthrough_cache_topology(t, host);
        // Leaf 7 EDX[29]: IA32_ARCH_CAPABILITIES does not exist on AMD, though KVM sets it.
        let leaf7 = t.get_mut(7, 0)?;
        set_bit(&mut leaf7.edx, 29, false);
        // Leaf 0x8000_0000: the largest extended leaf now includes 0x8000_001d/0x8000_001e.
        t.get_mut(0x8000_0000, 0)?.eax = 0x8000_001f;
        // Leaf 0x8000_0001 ECX[22]: TopologyExtensions, for leaves 0x8000_001d/0x8000_001e.
        set_bit(&mut t.get_mut(0x8000_0001, 0)?.ecx, 22, true);
        // Leaf 0x8000_0008 ECX: APIC id size 7 bits ([15:12]) and NC, the number of threads
        // minus one ([7:0]) (AMD APM vol. 3, CPUID Fn8000_0008_ECX).
        let leaf = t.get_mut(0x8000_0008, 0)?;
        set_bits(&mut leaf.ecx, 12, 15, 7);
        set_bits(&mut leaf.ecx, 0, 7, u32::from(cpu_count - 1));
        update_extended_cache_topology(t, cpu_count, cpus_per_core);
        update_extended_apic_id(t, cpu_index, cpus_per_core)?;
        apply_brand_string(t, AMD_BRAND_STRING)
    }

    /// Leaves 0x8000_001e and 0x8000_001d from the host: KVM reports none or zeroes.
    fn passthrough_cache_topology(t: &mut Table, host: &dyn Fn(u32, u32) -> Regs) {
        t.insert(0x8000_001e, 0, 0, host(0x8000_001e, 0));
        // Subleaves until cache type (EAX[4:0]) 0; bounded in case the host misbehaves.
        for subleaf in 0..16 {
            let r = host(0x8000_001d, subleaf);
            if r.eax & 0x1f == 0 {
                break;
            }
            t.insert(0x8000_001d, subleaf, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, r);
        }
    }

    /// Leaf 0x8000_001d EAX[25:14]: logical processors sharing each cache, minus one.
    fn update_extended_cache_topology(t: &mut Table, cpu_count: u8, cpus_per_core: u8) {
        for (_, e) in t.0.range_mut((0x8000_001d, 0)..=(0x8000_001d, u32::MAX)) {
            match get_bits(e.eax, 5, 7) {
                1 | 2 => set_bits(&mut e.eax, 14, 25, u32::from(cpus_per_core - 1)),
                3 => set_bits(&mut e.eax, 14, 25, u32::from(cpu_count - 1)),
                _ => {}
            }
        }
    }

    /// Leaf 0x8000_001e: extended APIC id, core id and node of this logical processor.
    fn update_extended_apic_id(
        t: &mut Table,
        cpu_index: u8,
        cpus_per_core: u8,
    ) -> Result<(), CpuidError> {
        let e = t.get_mut(0x8000_001e, 0)?;
        // EAX: extended APIC id.
        e.eax = u32::from(cpu_index);
        // EBX[7:0]: core (compute unit) id; consecutive threads share a core.
        set_bits(&mut e.ebx, 0, 7, u32::from(cpu_index / cpus_per_core));
        // EBX[15:8]: threads per core minus one.
        set_bits(&mut e.ebx, 8, 15, u32::from(cpus_per_core - 1));
        // ECX[10:8]: one node per package; ECX[7:0]: node 0.
        set_bits(&mut e.ecx, 8, 10, 0);
        set_bits(&mut e.ecx, 0, 7, 0);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regs(eax: u32, ebx: u32, ecx: u32, edx: u32) -> Regs {
        Regs { eax, ebx, ecx, edx }
    }

    fn vendor_regs(v: &[u8; 12]) -> Regs {
        let w = |i: usize| u32::from_le_bytes([v[i], v[i + 1], v[i + 2], v[i + 3]]);
        regs(0x10, w(0), w(8), w(4))
    }

    /// A fake host: the given vendor, a brand with a frequency, and recognisable cache
    /// leaves.
    fn fake_host(vendor: &'static [u8; 12]) -> impl Fn(u32, u32) -> Regs {
        move |leaf, subleaf| match (leaf, subleaf) {
            (0, _) => vendor_regs(vendor),
            (0x8000_0002..=0x8000_0004, _) => {
                let brand =
                    b"Fake(R) CPU 9000 @ 3.50GHz\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0";
                let off = (leaf - 0x8000_0002) as usize * 16;
                let w = |k: usize| {
                    u32::from_le_bytes([
                        brand[off + k],
                        brand[off + k + 1],
                        brand[off + k + 2],
                        brand[off + k + 3],
                    ])
                };
                regs(w(0), w(4), w(8), w(12))
            }
            (0x8000_0005, _) => regs(0x5555, 0x5555, 0x5555, 0x5555),
            (0x8000_0006, _) => regs(0x6666, 0x6666, 0x6666, 0xffff_ffff),
            (0x8000_001e, _) => regs(0xdead, 0xffff_ffff, 0xffff_ffff, 0),
            // L1d, L1i, L2, L3, then the end of the list.
            (0x8000_001d, 0) => regs((1 << 5) | 1, 0, 0, 0),
            (0x8000_001d, 1) => regs((1 << 5) | 2, 0, 0, 0),
            (0x8000_001d, 2) => regs((2 << 5) | 3, 0, 0, 0),
            (0x8000_001d, 3) => regs((3 << 5) | 3, 0, 0, 0),
            _ => Regs::default(),
        }
    }

    fn entry(leaf: u32, subleaf: u32, flags: u32, r: Regs) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function: leaf,
            index: subleaf,
            flags,
            eax: r.eax,
            ebx: r.ebx,
            ecx: r.ecx,
            edx: r.edx,
            ..Default::default()
        }
    }

    /// A CPUID shaped like KVM_GET_SUPPORTED_CPUID, with garbage in the fields the
    /// normalisation must overwrite.
    fn synthetic(vendor: &[u8; 12]) -> CpuId {
        let sig = KVM_CPUID_FLAG_SIGNIFCANT_INDEX;
        let entries = [
            entry(0, 0, 0, vendor_regs(vendor)),
            // APIC id 0xee, 0xff logical processors, PDCM set, hypervisor clear.
            entry(1, 0, 0, regs(0x000a_0f10, 0xeeff_0000, 1 << 15, 0)),
            entry(
                4,
                0,
                sig,
                regs((1 << 5) | 1 | (0x3f << 26) | (0xfff << 14), 0, 0, 0),
            ),
            entry(4, 1, sig, regs((2 << 5) | 3 | (0xfff << 14), 0, 0, 0)),
            entry(4, 2, sig, regs((3 << 5) | 3, 0, 0, 0)),
            entry(4, 3, sig, Regs::default()),
            entry(6, 0, 0, regs(0xffff_ffff, 0, 0xffff_ffff, 0)),
            entry(7, 0, sig, regs(0, 0, 0, 0xffff_ffff)),
            entry(0xa, 0, 0, regs(0x0803_0004, 7, 0, 0x603)),
            entry(0xb, 0, sig, regs(0x1f, 0xffff, 0xffff, 0xffff)),
            entry(0x8000_0000, 0, 0, regs(0x8000_0008, 0, 0, 0)),
            entry(0x8000_0001, 0, 0, Regs::default()),
            entry(0x8000_0002, 0, 0, Regs::default()),
            entry(0x8000_0003, 0, 0, Regs::default()),
            entry(0x8000_0004, 0, 0, Regs::default()),
            entry(0x8000_0005, 0, 0, Regs::default()),
            entry(0x8000_0006, 0, 0, Regs::default()),
            entry(0x8000_0008, 0, 0, regs(0x3030, 0, 0xffff, 0)),
        ];
        CpuId::from_entries(&entries).unwrap()
    }

    fn find(cpuid: &CpuId, leaf: u32, subleaf: u32) -> kvm_cpuid_entry2 {
        *cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == leaf && e.index == subleaf)
            .unwrap_or_else(|| panic!("leaf {leaf:#x}.{subleaf} missing"))
    }

    fn normalized(vendor: &'static [u8; 12], index: u8, count: u8, smt: bool) -> CpuId {
        let mut cpuid = synthetic(vendor);
        normalize_with(&mut cpuid, index, count, smt, &fake_host(vendor)).unwrap();
        cpuid
    }

    #[test]
    fn apic_id_and_hypervisor_bit() {
        for vendor in [VENDOR_INTEL, VENDOR_AMD] {
            for (index, count) in [(0u8, 1u8), (1, 2), (3, 4)] {
                let cpuid = normalized(vendor, index, count, false);
                let leaf1 = find(&cpuid, 1, 0);
                assert_eq!(leaf1.ebx >> 24, u32::from(index), "initial APIC id");
                assert_ne!(leaf1.ecx & (1 << 31), 0, "hypervisor bit");
                assert_eq!(leaf1.ecx & (1 << 15), 0, "PDCM hidden");
                assert_ne!(leaf1.ecx & (1 << 24), 0, "TSC deadline");
                assert_eq!((leaf1.ebx >> 8) & 0xff, 8, "CLFLUSH line size");
                // The signature in EAX is untouched.
                assert_eq!(leaf1.eax, 0x000a_0f10);
                for sub in [0, 1] {
                    assert_eq!(find(&cpuid, 0xb, sub).edx, u32::from(index), "x2APIC id");
                }
            }
        }
    }

    #[test]
    fn topology_for_1_2_4_vcpus_with_and_without_smt() {
        // (count, smt) -> (leaf 1 EBX[23:16], HTT, threads per core, 0xB.0 shift)
        let cases = [
            (1u8, false, 1u32, false, 1u32, 0u32),
            (1, true, 1, false, 1, 0),
            (2, false, 2, true, 1, 0),
            (2, true, 2, true, 2, 1),
            (4, false, 4, true, 1, 0),
            (4, true, 4, true, 2, 1),
        ];
        for (count, smt, logical, htt, per_core, shift) in cases {
            let cpuid = normalized(VENDOR_INTEL, count - 1, count, smt);
            let what = format!("{count} vCPUs, smt {smt}");
            let leaf1 = find(&cpuid, 1, 0);
            assert_eq!(
                (leaf1.ebx >> 16) & 0xff,
                logical,
                "{what}: logical processors"
            );
            assert_eq!(leaf1.edx & (1 << 28) != 0, htt, "{what}: HTT");

            let thread = find(&cpuid, 0xb, 0);
            assert_eq!(thread.eax & 0x1f, shift, "{what}: thread shift");
            assert_eq!(thread.ebx & 0xffff, per_core, "{what}: threads per core");
            assert_eq!(thread.ecx, LEVEL_TYPE_THREAD << 8, "{what}: thread level");
            assert_eq!(thread.flags, KVM_CPUID_FLAG_SIGNIFCANT_INDEX);
            // Subleaf 1 is added although KVM did not report it.
            let core = find(&cpuid, 0xb, 1);
            assert_eq!(core.eax & 0x1f, LEAF_B_CORE_SHIFT, "{what}: core shift");
            assert_eq!(core.ebx & 0xffff, u32::from(count), "{what}: processors");
            assert_eq!(core.ecx, (LEVEL_TYPE_CORE << 8) | 1, "{what}: core level");

            // Leaf 4: L1/L2 shared by the threads of a core, L3 by the package.
            let cores = u32::from(count) / per_core;
            let l1 = find(&cpuid, 4, 0).eax;
            assert_eq!((l1 >> 14) & 0xfff, per_core - 1, "{what}: L1 sharing");
            assert_eq!(l1 >> 26, cores - 1, "{what}: cores per package");
            assert_eq!(l1 & 0x3fff, (1 << 5) | 1, "{what}: cache type/level kept");
            let l3 = find(&cpuid, 4, 2).eax;
            assert_eq!(
                (l3 >> 14) & 0xfff,
                u32::from(count) - 1,
                "{what}: L3 sharing"
            );
            // The terminating zero subleaf stays zero.
            assert_eq!(find(&cpuid, 4, 3).eax, 0);

            // AMD: threads per core and core id in 0x8000_001e, count in 0x8000_0008.
            let amd = normalized(VENDOR_AMD, count - 1, count, smt);
            let ext = find(&amd, 0x8000_001e, 0);
            assert_eq!(ext.eax, u32::from(count) - 1, "{what}: extended APIC id");
            assert_eq!(
                ext.ebx & 0xff,
                (u32::from(count) - 1) / per_core,
                "{what}: core id"
            );
            assert_eq!(
                (ext.ebx >> 8) & 0xff,
                per_core - 1,
                "{what}: threads per core"
            );
            assert_eq!(ext.ecx & 0x7ff, 0, "{what}: one node");
            let nc = find(&amd, 0x8000_0008, 0).ecx;
            assert_eq!(nc & 0xff, u32::from(count) - 1, "{what}: NC");
            assert_eq!((nc >> 12) & 0xf, 7, "{what}: APIC id size");
            let l3 = find(&amd, 0x8000_001d, 3).eax;
            assert_eq!(
                (l3 >> 14) & 0xfff,
                u32::from(count) - 1,
                "{what}: AMD L3 sharing"
            );
            let l1 = find(&amd, 0x8000_001d, 0).eax;
            assert_eq!((l1 >> 14) & 0xfff, per_core - 1, "{what}: AMD L1 sharing");
        }
    }

    #[test]
    fn vendor_specific_leaves() {
        let intel = normalized(VENDOR_INTEL, 0, 1, false);
        let leaf_a = find(&intel, 0xa, 0);
        assert_eq!(
            (leaf_a.eax, leaf_a.ebx, leaf_a.ecx, leaf_a.edx),
            (0, 0, 0, 0)
        );
        let leaf6 = find(&intel, 6, 0);
        assert_eq!(leaf6.eax & 2, 0);
        assert_eq!(leaf6.ecx & 8, 0);
        assert_eq!(
            find(&intel, 7, 0).ebx & ((1 << 6) | (1 << 13)),
            (1 << 6) | (1 << 13)
        );
        assert_eq!(brand(&intel), "Intel(R) Xeon(R) Processor @ 3.50GHz");
        // Host cache geometry, with the reserved EDX[17:16] cleared.
        assert_eq!(find(&intel, 0x8000_0005, 0).ecx, 0x5555);
        assert_eq!(find(&intel, 0x8000_0006, 0).edx, 0xfffc_ffff);

        let amd = normalized(VENDOR_AMD, 0, 1, false);
        assert_eq!(find(&amd, 7, 0).edx & (1 << 29), 0);
        assert_eq!(find(&amd, 0x8000_0000, 0).eax, 0x8000_001f);
        assert_ne!(find(&amd, 0x8000_0001, 0).ecx & (1 << 22), 0);
        assert_eq!(brand(&amd), "AMD EPYC");
        // Leaf 0xA is left alone on AMD.
        assert_eq!(find(&amd, 0xa, 0).eax, 0x0803_0004);
        // Exactly the four host cache levels were passed through.
        assert_eq!(
            amd.as_slice()
                .iter()
                .filter(|e| e.function == 0x8000_001d)
                .count(),
            4
        );
    }

    fn brand(cpuid: &CpuId) -> String {
        let mut bytes = Vec::new();
        for leaf in 0x8000_0002..=0x8000_0004 {
            let e = find(cpuid, leaf, 0);
            for reg in [e.eax, e.ebx, e.ecx, e.edx] {
                bytes.extend_from_slice(&reg.to_le_bytes());
            }
        }
        let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
        String::from_utf8_lossy(&bytes[..end]).into_owned()
    }

    #[test]
    fn intel_brand_string_from_host() {
        let mut host = [0u8; BRAND_STRING_LEN];
        let s = b"Intel(R) Xeon(R) Platinum 8275CL CPU @ 3.00GHz";
        host[..s.len()].copy_from_slice(s);
        assert_eq!(
            intel::intel_brand_string(&host),
            b"Intel(R) Xeon(R) Processor @ 3.00GHz".to_vec()
        );
        let mut host = [0u8; BRAND_STRING_LEN];
        let s = b"Intel(R) Xeon(R) Platinum 8275CL CPU";
        host[..s.len()].copy_from_slice(s);
        assert_eq!(intel::intel_brand_string(&host), INTEL_BRAND_BASE.to_vec());
    }

    #[test]
    fn vendor_comes_from_the_host() {
        let mut cpuid = synthetic(VENDOR_INTEL);
        // KVM said Intel, the host is AMD: the AMD rules apply and leaf 0 says AMD.
        normalize_with(&mut cpuid, 0, 1, false, &fake_host(VENDOR_AMD)).unwrap();
        let leaf0 = find(&cpuid, 0, 0);
        assert_eq!(&vendor_bytes(leaf0.ebx, leaf0.edx, leaf0.ecx), VENDOR_AMD);
        assert_eq!(brand(&cpuid), "AMD EPYC");
    }

    #[test]
    fn errors() {
        let mut cpuid = synthetic(VENDOR_INTEL);
        let host = fake_host(VENDOR_INTEL);
        assert_eq!(
            normalize_with(&mut cpuid, 0, 0, false, &host),
            Err(CpuidError::VcpuCount(0))
        );
        let mut cpuid = CpuId::from_entries(&[entry(0, 0, 0, vendor_regs(VENDOR_INTEL))]).unwrap();
        let err = normalize_with(&mut cpuid, 0, 1, false, &host).unwrap_err();
        assert_eq!(
            err,
            CpuidError::MissingLeaf {
                leaf: 1,
                subleaf: 0
            }
        );
        assert_eq!(
            err.to_string(),
            "CPUID leaf 0x1 subleaf 0 is missing from KVM_GET_SUPPORTED_CPUID"
        );
    }

    #[test]
    fn host_supported_cpuid_normalizes() {
        let kvm = kvm_ioctls::Kvm::new().unwrap();
        let mut cpuid = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .unwrap();
        normalize(&mut cpuid, 1, 2, true).unwrap();
        let leaf1 = find(&cpuid, 1, 0);
        assert_eq!(leaf1.ebx >> 24, 1);
        assert_ne!(leaf1.ecx & (1 << 31), 0);
        assert_eq!(find(&cpuid, 0xb, 0).ebx & 0xffff, 2);
    }

    #[test]
    fn template_applies_before_normalisation() {
        // Leaf 1: hide RDRAND (ECX[30]) and, uselessly, the hypervisor bit (ECX[31]),
        // which the normalisation sets again; leaf 7: hide EDX[0..4].
        let template = CustomCpuTemplate::from_json(
            br#"{"cpuid_modifiers": [
                {"leaf": "0x1", "subleaf": "0x0", "flags": 0, "modifiers": [
                    {"register": "ecx", "bitmap": "0b00xxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}]},
                {"leaf": "0x7", "subleaf": "0x0", "flags": 1, "modifiers": [
                    {"register": "edx", "bitmap": "0b0000"}]}]}"#,
        )
        .unwrap();
        for vendor in [VENDOR_INTEL, VENDOR_AMD] {
            let mut cpuid = synthetic(vendor);
            cpuid.as_mut_slice()[1].ecx |= 1 << 30;
            apply_template(&mut cpuid, &template).unwrap();
            assert_eq!(find(&cpuid, 1, 0).ecx & (1 << 30), 0);
            assert_eq!(find(&cpuid, 7, 0).edx, 0xffff_fff0);
            normalize_with(&mut cpuid, 0, 1, false, &fake_host(vendor)).unwrap();
            let leaf1 = find(&cpuid, 1, 0);
            assert_eq!(leaf1.ecx & (1 << 30), 0, "the template's change survives");
            assert_ne!(leaf1.ecx & (1 << 31), 0, "the hypervisor bit is the VMM's");
        }
    }

    #[test]
    fn template_leaf_kvm_lacks_is_named() {
        let template = CustomCpuTemplate::from_json(
            br#"{"cpuid_modifiers": [{"leaf": "0x14", "subleaf": "0x0", "flags": 0,
                 "modifiers": [{"register": "eax", "bitmap": "0b0"}]}]}"#,
        )
        .unwrap();
        let mut cpuid = synthetic(VENDOR_AMD);
        let before = cpuid.clone();
        let err = apply_template(&mut cpuid, &template).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Template changes a CPUID entry not supported by KVM: Leaf: 0x14, Subleaf: 0x0"
        );
        assert_eq!(cpuid, before, "nothing is changed on an error");
    }
}
