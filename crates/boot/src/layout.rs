// SPDX-License-Identifier: Apache-2.0

//! Guest physical addresses of the x86_64 microVM.
//!
//! The map is Firecracker's, so a guest sees the same machine under either
//! monitor:
//!
//! ```text
//! 0x0000_0500  GDT (4 entries)              0x0000_0520  IDT (1 null entry)
//! 0x0000_6000  PVH hvm_start_info           0x0000_6040  PVH module list
//! 0x0000_7000  zero page (boot_params), or the PVH memory map
//! 0x0000_8ff0  initial stack pointer
//! 0x0000_9000  PML4, 0xa000 PDPTE, 0xb000 PDE (identity map of the first GiB)
//! 0x0002_0000  kernel command line (2048 bytes with the NUL)
//! 0x0009_fc00  EBDA: MP table; [0x9fc00, 0xe0000) reserved for system data
//! 0x000e_0000  ACPI RSDP
//! 0x0010_0000  HIMEM: bzImage protected-mode kernel
//! 0x0100_0000  (typical) vmlinux physical load address
//! top of RAM below 3 GiB: initrd, page aligned
//! 0xc000_0000  32-bit MMIO gap (1 GiB): boot device page, then virtio-mmio slots
//! 0xeec0_0000  PCIe MMCONFIG window (256 MiB, e820-reserved)
//! 0xfec0_0000  IOAPIC                       0xfee0_0000  local APIC
//! 0xfffb_d000  KVM TSS (3 pages)
//! 0x1_0000_0000  RAM that did not fit below the gap
//! 0x40_0000_0000 64-bit MMIO gap (256 GiB), RAM resumes at 512 GiB
//! ```

/// Size of a guest page; the initrd is aligned to it.
pub const GUEST_PAGE_SIZE: u64 = 0x1000;

/// Base of the boot GDT. The vCPU's GDTR points here.
pub const BOOT_GDT_OFFSET: u64 = 0x500;
/// Base of the boot IDT (a single null descriptor). The vCPU's IDTR points here.
pub const BOOT_IDT_OFFSET: u64 = 0x520;

/// Address of the PVH `hvm_start_info` structure; %rbx points here at a PVH
/// entry (Xen PVH ABI, "start of day" structure).
pub const PVH_INFO_START: u64 = 0x6000;
/// Address of the PVH module list (`hvm_modlist_entry` array), used to pass
/// the initrd.
pub const MODLIST_START: u64 = 0x6040;
/// Address of the PVH memory map (`hvm_memmap_table_entry` array). It shares
/// the zero page's address: a guest boots with one protocol or the other.
pub const MEMMAP_START: u64 = 0x7000;

/// The "zero page": Linux `struct boot_params`; %rsi points here at the
/// 64-bit Linux entry (Documentation/arch/x86/boot.rst, "64-bit Boot Protocol").
pub const ZERO_PAGE_START: u64 = 0x7000;

/// Initial stack pointer (%rsp and %rbp) of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;

/// Page-map level-4 table of the boot identity map; CR3 holds this address.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table of the boot identity map.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory of the boot identity map: 512 2 MiB pages covering the
/// first GiB.
pub const PDE_START: u64 = 0xb000;

/// Kernel command line address (`boot_params.hdr.cmd_line_ptr`,
/// `hvm_start_info.cmdline_paddr`).
pub const CMDLINE_START: u64 = 0x20000;
/// Kernel command line capacity in bytes, including the terminating NUL
/// (x86 `COMMAND_LINE_SIZE`).
pub const CMDLINE_MAX_SIZE: usize = 2048;

/// Start of the Extended BIOS Data Area: the last KiB of the first 640 KiB.
pub const EBDA_START: u64 = 0x9fc00;
/// Where the MP floating pointer structure and configuration table are
/// written. Linux scans the EBDA for the `_MP_` signature (Intel MP spec 1.4
/// section 4).
pub const MPTABLE_START: u64 = EBDA_START;

/// Address of the ACPI RSDP, inside the BIOS read-only area that the
/// kernel scans (ACPI 6.5 section 5.2.5.1).
pub const RSDP_ADDR: u64 = 0x000e_0000;

/// Start of the system-data area (MP table, ACPI tables).
pub const SYSTEM_MEM_START: u64 = EBDA_START;
/// Size of the system-data area: everything from the EBDA up to the RSDP.
/// The e820 map reports `[SYSTEM_MEM_START, RSDP_ADDR)` as reserved.
pub const SYSTEM_MEM_SIZE: u64 = RSDP_ADDR - SYSTEM_MEM_START;

/// Start of "high memory" (1 MiB): a bzImage's protected-mode kernel is
/// loaded here (the boot protocol's default `code32_start`), and ELF entry
/// points must not be below it.
pub const HIMEM_START: u64 = 0x0010_0000;

/// First address that does not fit in 32 bits.
pub const FIRST_ADDR_PAST_32BITS: u64 = 1 << 32;

/// Size of the 32-bit MMIO gap below 4 GiB.
pub const MMIO32_SIZE: u64 = 1 << 30;
/// Start of the 32-bit MMIO gap (3 GiB); low RAM ends here.
pub const MMIO32_START: u64 = FIRST_ADDR_PAST_32BITS - MMIO32_SIZE;

/// One page at the start of the MMIO gap, kept free for the boot-timer
/// device as in Firecracker.
pub const BOOT_DEVICE_MEM_START: u64 = MMIO32_START;
/// First virtio-mmio device slot.
pub const VIRTIO_MMIO_START: u64 = MMIO32_START + VIRTIO_MMIO_SLOT_SIZE;
/// Size of one virtio-mmio device slot (register file plus configuration
/// space, virtio 1.2 section 4.2.2).
pub const VIRTIO_MMIO_SLOT_SIZE: u64 = 0x1000;

/// IOAPIC register window (Linux `IO_APIC_DEFAULT_PHYS_BASE`).
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// Local APIC register window (Linux `APIC_DEFAULT_PHYS_BASE`).
pub const APIC_ADDR: u64 = 0xfee0_0000;

/// Size of the PCIe MMCONFIG window, the last 256 MiB of the MMIO gap
/// before the IOAPIC.
pub const PCI_MMCONFIG_SIZE: u64 = 256 << 20;
/// Start of the PCIe MMCONFIG window. Firecracker reports it as reserved in
/// the e820 map whether or not PCI is enabled, and so does this crate.
pub const PCI_MMCONFIG_START: u64 = IOAPIC_ADDR - PCI_MMCONFIG_SIZE;

/// Three pages KVM uses for the real-mode TSS (`KVM_SET_TSS_ADDR`), inside
/// the MMIO gap so they never shadow RAM.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;

/// Start of the 64-bit MMIO gap (256 GiB).
pub const MMIO64_START: u64 = 256 << 30;
/// Size of the 64-bit MMIO gap (256 GiB).
pub const MMIO64_SIZE: u64 = 256 << 30;
/// First address past the 64-bit MMIO gap, where RAM resumes.
pub const FIRST_ADDR_PAST_64BITS_MMIO: u64 = MMIO64_START + MMIO64_SIZE;

/// First legacy GSI free for devices (0-4 are the timer, keyboard, cascade
/// and serial ports).
pub const IRQ_BASE: u32 = 5;
/// Last legacy GSI: the IOAPIC has 24 pins.
pub const IRQ_MAX: u32 = 23;

/// Largest guest memory accepted by [`create_guest_memory`](crate::create_guest_memory),
/// in MiB (1022 GiB).
pub const MAX_MEM_SIZE_MIB: usize = 1022 << 10;

// The stack grows down from just below the page tables and stays above the
// zero page; the legacy area ends before the kernel.
const _: () = assert!(BOOT_STACK_POINTER < PML4_START);
const _: () = assert!(BOOT_STACK_POINTER > ZERO_PAGE_START + 4096);
const _: () = assert!(SYSTEM_MEM_START + SYSTEM_MEM_SIZE <= HIMEM_START);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contract_values() {
        assert_eq!(MMIO32_START, 0xc000_0000);
        assert_eq!(MMIO32_START + MMIO32_SIZE, FIRST_ADDR_PAST_32BITS);
        assert_eq!(VIRTIO_MMIO_START, 0xc000_1000);
        assert_eq!(PCI_MMCONFIG_START, 0xeec0_0000);
        assert_eq!(SYSTEM_MEM_START + SYSTEM_MEM_SIZE, 0xe0000);
        assert_eq!(FIRST_ADDR_PAST_64BITS_MMIO, 512 << 30);
    }

    #[test]
    fn boot_structures_do_not_overlap() {
        // (start, size) of every fixed structure below 1 MiB.
        let mut areas = [
            (BOOT_GDT_OFFSET, 32),
            (BOOT_IDT_OFFSET, 8),
            (PVH_INFO_START, 56),
            (MODLIST_START, 32),
            (ZERO_PAGE_START, 4096),
            (PML4_START, 4096),
            (PDPTE_START, 4096),
            (PDE_START, 4096),
            (CMDLINE_START, CMDLINE_MAX_SIZE as u64),
            (MPTABLE_START, SYSTEM_MEM_SIZE),
        ];
        areas.sort();
        for pair in areas.windows(2) {
            assert!(pair[0].0 + pair[0].1 <= pair[1].0, "{pair:x?}");
        }
    }
}
