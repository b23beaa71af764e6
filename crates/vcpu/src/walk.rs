//! Guest virtual-to-physical translation in software, to read the instruction bytes at the
//! guest's RIP when KVM reports an internal error.
//!
//! It follows the paging modes of the Intel SDM vol. 3A, chapter 4: no paging, 32-bit
//! paging (4.3), PAE paging (4.4) and 4-level / 5-level paging (4.5), with large pages. It
//! only reads guest memory, checks the present bit, and ignores access rights: the goal is
//! a diagnostic, not an MMU.

use kvm_bindings::kvm_sregs;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::regs::{EFER_LMA, X86_CR0_PE, X86_CR0_PG, X86_CR4_LA57, X86_CR4_PAE, X86_CR4_PSE};

/// Longest x86 instruction (Intel SDM vol. 2A, 2.3.11).
pub const MAX_INSN_LEN: usize = 15;

/// Present bit of every paging-structure entry.
const PTE_PRESENT: u64 = 1 << 0;
/// Page-size bit: the entry maps a large page.
const PTE_PS: u64 = 1 << 7;
/// Physical address bits 51:12 of a 64-bit paging-structure entry.
const PTE_ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// Why a guest virtual address could not be translated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WalkError {
    /// An entry on the walk has its present bit clear.
    #[error("{level} entry {entry:#x} at {table_addr:#x} for address {vaddr:#x} is not present")]
    NotPresent {
        /// The translated address.
        vaddr: u64,
        /// The paging-structure level, e.g. "PML4".
        level: &'static str,
        /// Where the entry was read.
        table_addr: u64,
        /// The entry.
        entry: u64,
    },
    /// A paging-structure entry lies outside guest memory.
    #[error(
        "{level} entry for address {vaddr:#x} would be at {table_addr:#x}, outside guest memory"
    )]
    TableOutsideMemory {
        /// The translated address.
        vaddr: u64,
        /// The paging-structure level.
        level: &'static str,
        /// Where the entry should have been.
        table_addr: u64,
    },
    /// The translation ends outside guest memory.
    #[error("address {vaddr:#x} translates to {paddr:#x}, outside guest memory")]
    OutsideMemory {
        /// The translated address.
        vaddr: u64,
        /// The physical address it maps to.
        paddr: u64,
    },
}

/// The paging mode of the vCPU, from CR0, CR4 and EFER.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// CR0.PG = 0: linear addresses are physical.
    Flat,
    /// 32-bit paging: two levels of 4-byte entries.
    Bits32 { pse: bool },
    /// PAE paging: a 4-entry PDPT then two levels of 8-byte entries.
    Pae,
    /// IA-32e paging with 4 or 5 levels.
    Long { levels: u8 },
}

fn mode(sregs: &kvm_sregs) -> Mode {
    if sregs.cr0 & X86_CR0_PG == 0 {
        Mode::Flat
    } else if sregs.efer & EFER_LMA != 0 {
        Mode::Long {
            levels: if sregs.cr4 & X86_CR4_LA57 != 0 { 5 } else { 4 },
        }
    } else if sregs.cr4 & X86_CR4_PAE != 0 {
        Mode::Pae
    } else {
        Mode::Bits32 {
            pse: sregs.cr4 & X86_CR4_PSE != 0,
        }
    }
}

/// The linear address of `rip`: CS.base + RIP, except in 64-bit code where CS.base is
/// ignored (Intel SDM vol. 3A, 3.4.4) and in real mode where it is CS.base + IP.
pub fn linear_rip(sregs: &kvm_sregs, rip: u64) -> u64 {
    if sregs.efer & EFER_LMA != 0 && sregs.cs.l == 1 {
        rip
    } else if sregs.cr0 & X86_CR0_PE == 0 {
        sregs.cs.base.wrapping_add(rip & 0xffff) & 0xf_ffff
    } else {
        sregs.cs.base.wrapping_add(rip) & 0xffff_ffff
    }
}

fn read_u64(
    mem: &GuestMemoryMmap,
    vaddr: u64,
    level: &'static str,
    addr: u64,
) -> Result<u64, WalkError> {
    mem.read_obj::<u64>(GuestAddress(addr))
        .map_err(|_| WalkError::TableOutsideMemory {
            vaddr,
            level,
            table_addr: addr,
        })
}

fn read_u32(
    mem: &GuestMemoryMmap,
    vaddr: u64,
    level: &'static str,
    addr: u64,
) -> Result<u64, WalkError> {
    mem.read_obj::<u32>(GuestAddress(addr))
        .map(u64::from)
        .map_err(|_| WalkError::TableOutsideMemory {
            vaddr,
            level,
            table_addr: addr,
        })
}

fn present(entry: u64, vaddr: u64, level: &'static str, table_addr: u64) -> Result<u64, WalkError> {
    if entry & PTE_PRESENT == 0 {
        Err(WalkError::NotPresent {
            vaddr,
            level,
            table_addr,
            entry,
        })
    } else {
        Ok(entry)
    }
}

/// Translates the linear address `vaddr` to a guest-physical address with the page tables
/// that `sregs` (CR0, CR3, CR4, EFER) designate.
pub fn translate(mem: &GuestMemoryMmap, sregs: &kvm_sregs, vaddr: u64) -> Result<u64, WalkError> {
    let paddr = match mode(sregs) {
        Mode::Flat => vaddr,
        Mode::Long { levels } => {
            const NAMES: [&str; 5] = ["PT", "PD", "PDPT", "PML4", "PML5"];
            let mut table = sregs.cr3 & PTE_ADDR_MASK;
            let mut level = levels;
            loop {
                // Bits 12 + 9 * (level - 1) .. of the address index this level.
                let shift = 12 + 9 * u32::from(level - 1);
                let name = NAMES[usize::from(level - 1)];
                let addr = table + ((vaddr >> shift) & 0x1ff) * 8;
                let entry = present(read_u64(mem, vaddr, name, addr)?, vaddr, name, addr)?;
                // 1 GiB pages at the PDPT, 2 MiB pages at the PD (4.5.4).
                if level == 1 || ((level == 2 || level == 3) && entry & PTE_PS != 0) {
                    let page_mask = (1u64 << shift) - 1;
                    break (entry & PTE_ADDR_MASK & !page_mask) | (vaddr & page_mask);
                }
                table = entry & PTE_ADDR_MASK;
                level -= 1;
            }
        }
        Mode::Pae => {
            let vaddr = vaddr & 0xffff_ffff;
            // CR3[31:5] holds the 32-byte aligned PDPT (4.4.1).
            let pdpt = sregs.cr3 & 0xffff_ffe0;
            let addr = pdpt + ((vaddr >> 30) & 3) * 8;
            let pdpte = present(read_u64(mem, vaddr, "PDPTE", addr)?, vaddr, "PDPTE", addr)?;
            let addr = (pdpte & PTE_ADDR_MASK) + ((vaddr >> 21) & 0x1ff) * 8;
            let pde = present(read_u64(mem, vaddr, "PD", addr)?, vaddr, "PD", addr)?;
            if pde & PTE_PS != 0 {
                (pde & PTE_ADDR_MASK & !0x1f_ffff) | (vaddr & 0x1f_ffff)
            } else {
                let addr = (pde & PTE_ADDR_MASK) + ((vaddr >> 12) & 0x1ff) * 8;
                let pte = present(read_u64(mem, vaddr, "PT", addr)?, vaddr, "PT", addr)?;
                (pte & PTE_ADDR_MASK) | (vaddr & 0xfff)
            }
        }
        Mode::Bits32 { pse } => {
            let vaddr = vaddr & 0xffff_ffff;
            let addr = (sregs.cr3 & 0xffff_f000) + ((vaddr >> 22) & 0x3ff) * 4;
            let pde = present(read_u32(mem, vaddr, "PD", addr)?, vaddr, "PD", addr)?;
            if pse && pde & PTE_PS != 0 {
                // 4 MiB page: bits 31:22 of the entry (PSE-36 high bits ignored).
                (pde & 0xffc0_0000) | (vaddr & 0x3f_ffff)
            } else {
                let addr = (pde & 0xffff_f000) + ((vaddr >> 12) & 0x3ff) * 4;
                let pte = present(read_u32(mem, vaddr, "PT", addr)?, vaddr, "PT", addr)?;
                (pte & 0xffff_f000) | (vaddr & 0xfff)
            }
        }
    };
    if mem.address_in_range(GuestAddress(paddr)) {
        Ok(paddr)
    } else {
        Err(WalkError::OutsideMemory { vaddr, paddr })
    }
}

/// Reads up to [`MAX_INSN_LEN`] bytes at guest RIP `rip`, translating each page separately,
/// and stopping early at the first byte that is unmapped or outside guest memory.
///
/// Returns the bytes read and, when fewer than [`MAX_INSN_LEN`] were read, why.
pub fn fetch_instruction(
    mem: &GuestMemoryMmap,
    sregs: &kvm_sregs,
    rip: u64,
) -> (Vec<u8>, Option<WalkError>) {
    let mut bytes = Vec::with_capacity(MAX_INSN_LEN);
    let mut vaddr = linear_rip(sregs, rip);
    while bytes.len() < MAX_INSN_LEN {
        let paddr = match translate(mem, sregs, vaddr) {
            Ok(p) => p,
            Err(e) => return (bytes, Some(e)),
        };
        // Stay within one 4 KiB page per translation: the next page may map elsewhere.
        let in_page = 0x1000 - (vaddr & 0xfff) as usize;
        let n = in_page.min(MAX_INSN_LEN - bytes.len());
        for i in 0..n as u64 {
            match mem.read_obj::<u8>(GuestAddress(paddr + i)) {
                Ok(b) => bytes.push(b),
                Err(_) => {
                    let e = WalkError::OutsideMemory {
                        vaddr: vaddr + i,
                        paddr: paddr + i,
                    };
                    return (bytes, Some(e));
                }
            }
        }
        vaddr = vaddr.wrapping_add(n as u64);
    }
    (bytes, None)
}

#[cfg(test)]
mod tests {
    use kvm_bindings::kvm_segment;

    use super::*;

    const MIB: usize = 1 << 20;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 * MIB)]).unwrap()
    }

    fn w64(mem: &GuestMemoryMmap, addr: u64, v: u64) {
        mem.write_obj(v, GuestAddress(addr)).unwrap();
    }

    fn w32(mem: &GuestMemoryMmap, addr: u64, v: u32) {
        mem.write_obj(v, GuestAddress(addr)).unwrap();
    }

    fn long_mode(cr3: u64) -> kvm_sregs {
        kvm_sregs {
            cr0: X86_CR0_PE | X86_CR0_PG,
            cr3,
            cr4: X86_CR4_PAE,
            efer: EFER_LMA | (1 << 8),
            cs: kvm_segment {
                l: 1,
                base: 0x1234_0000, // ignored in 64-bit mode
                ..Default::default()
            },
            ..Default::default()
        }
    }

    /// Indices of `va` at each level of 4-level paging: PML4, PDPT, PD, PT.
    fn idx(va: u64) -> [u64; 4] {
        [
            (va >> 39) & 0x1ff,
            (va >> 30) & 0x1ff,
            (va >> 21) & 0x1ff,
            (va >> 12) & 0x1ff,
        ]
    }

    #[test]
    fn long_mode_4k_pages_across_a_page_boundary() {
        let m = mem();
        // The kernel text address Linux uses, mapped with 4 KiB pages: the first page to
        // physical 0x30_0000, the next to 0x20_0000 (not contiguous).
        let va: u64 = 0xffff_ffff_8100_0ff8;
        let [l4, l3, l2, l1] = idx(va);
        w64(&m, 0x1000 + l4 * 8, 0x2000 | 3);
        w64(&m, 0x2000 + l3 * 8, 0x3000 | 3);
        w64(&m, 0x3000 + l2 * 8, 0x4000 | 3);
        w64(&m, 0x4000 + l1 * 8, 0x30_0000 | 3);
        w64(&m, 0x4000 + (l1 + 1) * 8, 0x20_0000 | 3);
        let code: Vec<u8> = (1..=15).collect();
        m.write_slice(&code[..8], GuestAddress(0x30_0ff8)).unwrap();
        m.write_slice(&code[8..], GuestAddress(0x20_0000)).unwrap();

        let sregs = long_mode(0x1000);
        assert_eq!(translate(&m, &sregs, va).unwrap(), 0x30_0ff8);
        let (bytes, err) = fetch_instruction(&m, &sregs, va);
        assert_eq!(err, None);
        assert_eq!(bytes, code);
    }

    #[test]
    fn long_mode_large_pages() {
        let m = mem();
        // 1 GiB page: VA 0x40_0000_0000 (PML4 0, PDPT 256) -> PA 0.
        w64(&m, 0x1000, 0x2000 | 3);
        w64(&m, 0x2000 + 256 * 8, PTE_PS | 3);
        // 2 MiB page: VA 0x8020_0000 (PDPT 2, PD 1) -> PA 0x20_0000.
        w64(&m, 0x2000 + 2 * 8, 0x3000 | 3);
        w64(&m, 0x3000 + 8, 0x20_0000 | PTE_PS | 3);
        let sregs = long_mode(0x1000);
        assert_eq!(translate(&m, &sregs, 0x40_0012_3456).unwrap(), 0x12_3456);
        assert_eq!(translate(&m, &sregs, 0x8021_2345).unwrap(), 0x21_2345);
    }

    #[test]
    fn long_mode_failures_are_explained() {
        let m = mem();
        let sregs = long_mode(0x1000);
        // Empty PML4.
        let err = translate(&m, &sregs, 0xffff_ffff_8100_0000).unwrap_err();
        assert!(
            matches!(err, WalkError::NotPresent { level: "PML4", .. }),
            "{err}"
        );
        assert!(err.to_string().contains("not present"));
        let (bytes, err) = fetch_instruction(&m, &sregs, 0xffff_ffff_8100_0000);
        assert!(bytes.is_empty());
        assert!(err.is_some());
        // A PDPT beyond the end of memory.
        w64(&m, 0x1000, 0x4000_0000 | 3);
        let err = translate(&m, &sregs, 0x1000).unwrap_err();
        assert!(
            matches!(err, WalkError::TableOutsideMemory { level: "PDPT", .. }),
            "{err}"
        );
        // A page beyond the end of memory.
        w64(&m, 0x1000, 0x2000 | 3);
        w64(&m, 0x2000, 0x8000_0000 | PTE_PS | 3);
        let err = translate(&m, &sregs, 0x10).unwrap_err();
        assert_eq!(
            err,
            WalkError::OutsideMemory {
                vaddr: 0x10,
                paddr: 0x8000_0010
            }
        );
    }

    #[test]
    fn fetch_stops_at_the_end_of_memory() {
        let m = mem();
        let end = (4 * MIB) as u64;
        m.write_slice(&[0x0f, 0x0b, 0x90], GuestAddress(end - 3))
            .unwrap();
        let sregs = kvm_sregs {
            cr0: X86_CR0_PE,
            ..Default::default()
        };
        let (bytes, err) = fetch_instruction(&m, &sregs, end - 3);
        assert_eq!(bytes, [0x0f, 0x0b, 0x90]);
        assert!(matches!(err, Some(WalkError::OutsideMemory { .. })));
    }

    #[test]
    fn no_paging_adds_the_cs_base() {
        let m = mem();
        m.write_slice(&[0xcc; 15], GuestAddress(0x10_0010)).unwrap();
        let mut sregs = kvm_sregs {
            cr0: X86_CR0_PE,
            ..Default::default()
        };
        sregs.cs.base = 0x10_0000;
        assert_eq!(linear_rip(&sregs, 0x10), 0x10_0010);
        let (bytes, err) = fetch_instruction(&m, &sregs, 0x10);
        assert_eq!((bytes, err), (vec![0xcc; 15], None));
        // Real mode: CS.base + IP, within the first MiB.
        sregs.cr0 = 0;
        sregs.cs.base = 0xf_0000;
        assert_eq!(linear_rip(&sregs, 0xfff0), 0xf_fff0);
    }

    #[test]
    fn pae_paging() {
        let m = mem();
        // VA 0xc010_1234: PDPTE 3, PD 0, PT 0x101.
        w64(&m, 0x1000 + 3 * 8, 0x2000 | 1);
        w64(&m, 0x2000, 0x3000 | 3);
        w64(&m, 0x3000 + 0x101 * 8, 0x5_6000 | 3);
        // 2 MiB page: VA 0x4020_0000 (PDPTE 1, PD 1) -> 0x20_0000.
        w64(&m, 0x1000 + 8, 0x4000 | 1);
        w64(&m, 0x4000 + 8, 0x20_0000 | PTE_PS | 3);
        let sregs = kvm_sregs {
            cr0: X86_CR0_PE | X86_CR0_PG,
            cr3: 0x1000,
            cr4: X86_CR4_PAE,
            ..Default::default()
        };
        assert_eq!(translate(&m, &sregs, 0xc010_1234).unwrap(), 0x5_6234);
        assert_eq!(translate(&m, &sregs, 0x4020_0042).unwrap(), 0x20_0042);
        let err = translate(&m, &sregs, 0x0).unwrap_err();
        assert!(matches!(err, WalkError::NotPresent { level: "PDPTE", .. }));
    }

    #[test]
    fn paging_32_bit() {
        let m = mem();
        // 4 KiB page: VA 0xc000_1abc (PD 0x300, PT 1) -> 0x7_0abc.
        w32(&m, 0x1000 + 0x300 * 4, 0x2000 | 3);
        w32(&m, 0x2000 + 4, 0x7_0000 | 3);
        // 4 MiB page: VA 0x0040_0010 (PD 1) -> 0x0000_0010 (frame 0) with PSE.
        w32(&m, 0x1000 + 4, (PTE_PS | 3) as u32);
        let mut sregs = kvm_sregs {
            cr0: X86_CR0_PE | X86_CR0_PG,
            cr3: 0x1000,
            cr4: X86_CR4_PSE,
            ..Default::default()
        };
        assert_eq!(translate(&m, &sregs, 0xc000_1abc).unwrap(), 0x7_0abc);
        assert_eq!(translate(&m, &sregs, 0x0040_0010).unwrap(), 0x10);
        // Without CR4.PSE the PS bit is ignored and the entry points to a page table at 0.
        sregs.cr4 = 0;
        assert!(translate(&m, &sregs, 0x0040_0010).is_err());
    }
}
