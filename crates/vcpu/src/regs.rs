//! Boot-time register state of a vCPU: MSRs, general-purpose registers, segments and
//! control registers, FPU and local APIC, as Firecracker's `arch/x86_64/{msr,regs,
//! interrupts}.rs` set them.

use std::collections::BTreeMap;

use ember_boot::gdt::{
    decode, write_gdt_and_idt, BOOT_GDT_LIMIT, BOOT_IDT_LIMIT, GDT_TABLE, PVH_GDT_TABLE,
};
use ember_boot::layout::{
    BOOT_GDT_OFFSET, BOOT_IDT_OFFSET, BOOT_STACK_POINTER, PVH_INFO_START, ZERO_PAGE_START,
};
use ember_boot::paging::setup_identity_page_tables;
use ember_boot::{BootProtocol, KernelEntry};
use ember_cpu_template::CustomCpuTemplate;
use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Address, GuestMemoryMmap};

use crate::Error;

// MSR indices (Intel SDM vol. 4, "Model-Specific Registers"; Linux msr-index.h).
pub(crate) const MSR_IA32_TSC: u32 = 0x10;
pub(crate) const MSR_IA32_SYSENTER_CS: u32 = 0x174;
pub(crate) const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
pub(crate) const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
pub(crate) const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
pub(crate) const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
pub(crate) const MSR_STAR: u32 = 0xc000_0081;
pub(crate) const MSR_LSTAR: u32 = 0xc000_0082;
pub(crate) const MSR_CSTAR: u32 = 0xc000_0083;
pub(crate) const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
pub(crate) const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// IA32_MISC_ENABLE[0]: fast-string operations (REP MOVS/STOS) enabled.
pub(crate) const MISC_ENABLE_FAST_STRING: u64 = 1;
/// IA32_MTRR_DEF_TYPE: MTRRs enabled (bit 11), default memory type write-back (6), so
/// memory outside any variable range is cacheable (Intel SDM vol. 3A, 12.11.2.1).
pub(crate) const MTRR_DEF_TYPE_ENABLED_WB: u64 = (1 << 11) | 6;

// Control register and EFER bits (Intel SDM vol. 3A, 2.5 and 2.2.1).
pub(crate) const X86_CR0_PE: u64 = 1 << 0;
pub(crate) const X86_CR0_ET: u64 = 1 << 4;
pub(crate) const X86_CR0_PG: u64 = 1 << 31;
pub(crate) const X86_CR4_PSE: u64 = 1 << 4;
pub(crate) const X86_CR4_PAE: u64 = 1 << 5;
pub(crate) const X86_CR4_LA57: u64 = 1 << 12;
pub(crate) const EFER_LME: u64 = 1 << 8;
pub(crate) const EFER_LMA: u64 = 1 << 10;

/// RFLAGS with only the always-one bit 1 set: interrupts disabled.
const RFLAGS_RESERVED: u64 = 0x2;

// Local APIC LVT registers and delivery modes (Intel SDM vol. 3A, 11.5.1).
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// The MSRs set for boot, as Firecracker's `create_boot_msr_entries`: the SYSENTER/SYSCALL
/// entry points and the TSC at their reset value, fast strings on, MTRRs on with a
/// write-back default.
pub(crate) fn boot_msr_entries() -> [kvm_msr_entry; 11] {
    let msr = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    [
        msr(MSR_IA32_SYSENTER_CS, 0),
        msr(MSR_IA32_SYSENTER_ESP, 0),
        msr(MSR_IA32_SYSENTER_EIP, 0),
        msr(MSR_STAR, 0),
        msr(MSR_CSTAR, 0),
        msr(MSR_KERNEL_GS_BASE, 0),
        msr(MSR_SYSCALL_MASK, 0),
        msr(MSR_LSTAR, 0),
        msr(MSR_IA32_TSC, 0),
        msr(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        msr(MSR_MTRR_DEF_TYPE, MTRR_DEF_TYPE_ENABLED_WB),
    ]
}

/// The MSRs a CPU template changes, read from the vCPU and changed by the template's
/// bitmaps, in address order.
pub(crate) fn template_msr_entries(
    fd: &VcpuFd,
    template: &CustomCpuTemplate,
) -> Result<Vec<kvm_msr_entry>, Error> {
    let mut wanted: Vec<u32> = template.msr_addresses().collect();
    wanted.sort_unstable();
    wanted.dedup();
    let entries: Vec<kvm_msr_entry> = wanted
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let mut msrs = Msrs::from_entries(&entries).map_err(Error::MsrList)?;
    // KVM stops at the first MSR it cannot read: those before it are valid.
    let read = fd.get_msrs(&mut msrs).map_err(Error::GetMsrs)?;
    let mut values: BTreeMap<u32, u64> = msrs
        .as_slice()
        .iter()
        .take(read)
        .map(|e| (e.index, e.data))
        .collect();
    template.apply_msrs(&mut values)?;
    Ok(values
        .into_iter()
        .map(|(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect())
}

/// Writes the boot MSRs and `extra` (a CPU template's) in one KVM_SET_MSRS, failing
/// unless KVM accepts every one. A boot MSR wins over a template's, as in Firecracker.
pub(crate) fn setup_msrs(fd: &VcpuFd, extra: &[kvm_msr_entry]) -> Result<(), Error> {
    let mut all: BTreeMap<u32, u64> = extra.iter().map(|e| (e.index, e.data)).collect();
    all.extend(boot_msr_entries().iter().map(|e| (e.index, e.data)));
    let entries: Vec<kvm_msr_entry> = all
        .into_iter()
        .map(|(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let msrs = Msrs::from_entries(&entries).map_err(Error::MsrList)?;
    let written = fd.set_msrs(&msrs).map_err(Error::SetMsrs)?;
    if written != entries.len() {
        // KVM stops at the first MSR it refuses.
        let refused = entries.get(written).map_or(0, |e| e.index);
        return Err(Error::SetMsrsIncomplete {
            written,
            total: entries.len(),
            refused,
        });
    }
    Ok(())
}

/// The general-purpose registers at the kernel entry point.
pub(crate) fn boot_regs(entry: &KernelEntry) -> kvm_regs {
    let rip = entry.entry_addr.raw_value();
    match entry.protocol {
        // PVH boot ABI (xen/include/public/arch-x86/hvm/start_info.h): EBX holds the
        // physical address of the hvm_start_info structure.
        BootProtocol::PvhBoot => kvm_regs {
            rflags: RFLAGS_RESERVED,
            rip,
            rbx: PVH_INFO_START,
            ..Default::default()
        },
        // Linux 64-bit boot protocol (Documentation/arch/x86/boot.rst): RSI points to the
        // zero page (boot_params); a usable stack is set up too, with RBP as its frame.
        BootProtocol::LinuxBoot => kvm_regs {
            rflags: RFLAGS_RESERVED,
            rip,
            rsp: BOOT_STACK_POINTER,
            rbp: BOOT_STACK_POINTER,
            rsi: ZERO_PAGE_START,
            ..Default::default()
        },
    }
}

/// The FPU at reset: all exceptions masked in the x87 control word (0x37f) and in MXCSR
/// (0x1f80) (Intel SDM vol. 1, 8.1.5 and 10.2.3).
pub(crate) fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// The GDT for `protocol`: null, code, data and TSS descriptors.
pub(crate) fn gdt_table(protocol: &BootProtocol) -> [u64; 4] {
    match protocol {
        BootProtocol::LinuxBoot => GDT_TABLE,
        // PVH starts in 32-bit protected mode with flat 4 GiB segments
        // (xen/include/public/arch-x86/hvm/start_info.h), as Firecracker's PVH table.
        BootProtocol::PvhBoot => PVH_GDT_TABLE,
    }
}

/// A KVM segment register loaded from GDT entry `index` of `table`.
fn segment(table: &[u64; 4], index: u8) -> kvm_segment {
    let d = decode(table[usize::from(index)], index);
    kvm_segment {
        base: d.base,
        limit: d.limit,
        selector: d.selector,
        type_: d.type_,
        present: d.present,
        dpl: d.dpl,
        db: d.db,
        s: d.s,
        l: d.l,
        g: d.g,
        avl: d.avl,
        // A segment that is not present cannot be used (VMX "unusable" attribute).
        unusable: u8::from(d.unusable()),
        padding: 0,
    }
}

/// Fills `sregs` for `protocol` and writes the GDT, IDT and (Linux) page tables into guest
/// memory.
pub(crate) fn configure_sregs(
    mem: &GuestMemoryMmap,
    sregs: &mut kvm_sregs,
    protocol: &BootProtocol,
) -> Result<(), Error> {
    let table = gdt_table(protocol);
    write_gdt_and_idt(mem, &table).map_err(|source| Error::Boot {
        what: "write the boot GDT and IDT",
        source,
    })?;
    // Limits are the table size minus one (Intel SDM vol. 3A, 3.5.1).
    sregs.gdt.base = BOOT_GDT_OFFSET;
    sregs.gdt.limit = BOOT_GDT_LIMIT;
    // An IDT with one empty gate: any exception before the kernel loads its own IDT
    // escalates to a triple fault, which the VMM reports.
    sregs.idt.base = BOOT_IDT_OFFSET;
    sregs.idt.limit = BOOT_IDT_LIMIT;

    let code = segment(&table, 1);
    let data = segment(&table, 2);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(&table, 3);

    match protocol {
        BootProtocol::PvhBoot => {
            // Protected mode, paging off (PVH boot ABI).
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
        }
        BootProtocol::LinuxBoot => {
            // 64-bit long mode with identity-mapped page tables (Linux 64-bit boot
            // protocol). CR0 keeps its reset bits (ET among them).
            sregs.cr0 |= X86_CR0_PE;
            sregs.efer |= EFER_LME | EFER_LMA;
            sregs.cr3 = setup_identity_page_tables(mem).map_err(|source| Error::Boot {
                what: "write the identity page tables",
                source,
            })?;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PG;
        }
    }
    Ok(())
}

/// Reads a 32-bit local APIC register from the `kvm_lapic_state` register page.
fn lapic_reg(regs: &[std::os::raw::c_char; 1024], offset: usize) -> u32 {
    let b = |i: usize| regs[offset + i] as u8;
    u32::from_le_bytes([b(0), b(1), b(2), b(3)])
}

fn set_lapic_reg(regs: &mut [std::os::raw::c_char; 1024], offset: usize, value: u32) {
    for (i, byte) in value.to_le_bytes().into_iter().enumerate() {
        regs[offset + i] = byte as std::os::raw::c_char;
    }
}

/// Replaces the delivery mode (bits 10:8) of an LVT entry.
fn with_delivery_mode(lvt: u32, mode: u32) -> u32 {
    (lvt & !0x700) | (mode << 8)
}

/// Wires LINT0 to ExtINT (the 8259 PIC output, virtual wire mode) and LINT1 to NMI, as the
/// MP specification (5.1) and Firecracker's `set_lint` do.
pub(crate) fn set_lint(fd: &VcpuFd) -> Result<(), Error> {
    let mut lapic = fd.get_lapic().map_err(Error::GetLapic)?;
    let lint0 = lapic_reg(&lapic.regs, APIC_LVT0);
    set_lapic_reg(
        &mut lapic.regs,
        APIC_LVT0,
        with_delivery_mode(lint0, APIC_MODE_EXTINT),
    );
    let lint1 = lapic_reg(&lapic.regs, APIC_LVT1);
    set_lapic_reg(
        &mut lapic.regs,
        APIC_LVT1,
        with_delivery_mode(lint1, APIC_MODE_NMI),
    );
    fd.set_lapic(&lapic).map_err(Error::SetLapic)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_mode_only_touches_bits_10_to_8() {
        assert_eq!(with_delivery_mode(0xffff_ffff, 0), 0xffff_f8ff);
        assert_eq!(
            with_delivery_mode(0x0001_0000, APIC_MODE_EXTINT),
            0x0001_0700
        );
        assert_eq!(with_delivery_mode(0x0001_0700, APIC_MODE_NMI), 0x0001_0400);
    }

    #[test]
    fn lapic_register_bytes_are_little_endian() {
        let mut regs = [0 as std::os::raw::c_char; 1024];
        set_lapic_reg(&mut regs, APIC_LVT1, 0x8001_0400);
        assert_eq!(regs[APIC_LVT1] as u8, 0x00);
        assert_eq!(regs[APIC_LVT1 + 1] as u8, 0x04);
        assert_eq!(regs[APIC_LVT1 + 3] as u8, 0x80);
        assert_eq!(lapic_reg(&regs, APIC_LVT1), 0x8001_0400);
    }

    #[test]
    fn pvh_gdt_is_flat_32_bit() {
        let table = gdt_table(&BootProtocol::PvhBoot);
        // Firecracker's PVH descriptors, byte for byte.
        assert_eq!(
            table,
            [
                0,
                0x00cf_9b00_0000_ffff,
                0x00cf_9300_0000_ffff,
                0x0000_8b00_0000_0067
            ]
        );
        let cs = segment(&table, 1);
        assert_eq!(
            (cs.base, cs.limit, cs.l, cs.db, cs.g),
            (0, 0xffff_ffff, 0, 1, 1)
        );
        assert_eq!(cs.selector, 0x8);
        let tr = segment(&table, 3);
        assert_eq!(
            (tr.limit, tr.g, tr.type_, tr.selector),
            (0x67, 0, 0xb, 0x18)
        );
    }

    #[test]
    fn linux_gdt_has_a_64_bit_code_segment() {
        let table = gdt_table(&BootProtocol::LinuxBoot);
        let cs = segment(&table, 1);
        assert_eq!(
            (cs.l, cs.db, cs.present, cs.s, cs.selector),
            (1, 0, 1, 1, 0x8)
        );
        let ds = segment(&table, 2);
        assert_eq!((ds.db, ds.selector, ds.unusable), (1, 0x10, 0));
        let null = segment(&table, 0);
        assert_eq!(null.unusable, 1);
    }
}
