// SPDX-License-Identifier: Apache-2.0

//! Boot page tables for the 64-bit Linux entry.
//!
//! The 64-bit boot protocol starts the kernel in long mode, so paging must
//! already be on, with the kernel, the zero page and the command line
//! identity-mapped (Documentation/arch/x86/boot.rst, "64-bit Boot
//! Protocol"). As Firecracker does, the first GiB is identity-mapped with
//! 2 MiB pages: `PML4[0]` -> `PDPTE[0]` -> 512 PDEs with PS set (Intel SDM
//! vol. 3A section 4.5, 4-level paging).

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{PDE_START, PDPTE_START, PML4_START};
use crate::Error;

/// Page-table entry flag: present.
pub const PTE_PRESENT: u64 = 1 << 0;
/// Page-table entry flag: writable.
pub const PTE_WRITABLE: u64 = 1 << 1;
/// Page-directory entry flag: maps a 2 MiB page instead of a page table.
pub const PTE_PAGE_SIZE: u64 = 1 << 7;

/// Entries in one 4 KiB paging structure.
const ENTRIES: usize = 512;

/// Writes identity page tables covering the first GiB at [`PML4_START`],
/// [`PDPTE_START`] and [`PDE_START`] and returns the value for CR3
/// ([`PML4_START`]). Each table page is written whole, so stale entries from
/// an earlier boot of the same memory do not survive.
pub fn setup_identity_page_tables(mem: &GuestMemoryMmap) -> Result<u64, Error> {
    let mut pml4 = [0u64; ENTRIES];
    pml4[0] = PDPTE_START | PTE_PRESENT | PTE_WRITABLE;

    let mut pdpte = [0u64; ENTRIES];
    pdpte[0] = PDE_START | PTE_PRESENT | PTE_WRITABLE;

    let mut pde = [0u64; ENTRIES];
    for (i, entry) in pde.iter_mut().enumerate() {
        *entry = ((i as u64) << 21) | PTE_PAGE_SIZE | PTE_PRESENT | PTE_WRITABLE;
    }

    for (what, addr, table) in [
        ("PML4", PML4_START, &pml4),
        ("PDPTE", PDPTE_START, &pdpte),
        ("PDE", PDE_START, &pde),
    ] {
        // x86 paging structures are little-endian 64-bit entries.
        let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_le_bytes()).collect();
        mem.write_slice(&bytes, GuestAddress(addr))
            .map_err(|source| Error::GuestWrite { what, addr, source })?;
    }
    Ok(PML4_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_u64(mem: &GuestMemoryMmap, addr: u64) -> u64 {
        mem.read_obj(GuestAddress(addr)).unwrap()
    }

    #[test]
    fn identity_maps_first_gib() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        // Stale data that must be overwritten.
        mem.write_obj(0xdead_beefu64, GuestAddress(PML4_START + 8))
            .unwrap();
        let cr3 = setup_identity_page_tables(&mem).unwrap();
        assert_eq!(cr3, PML4_START);
        assert_eq!(read_u64(&mem, PML4_START), 0xa003);
        assert_eq!(read_u64(&mem, PML4_START + 8), 0);
        assert_eq!(read_u64(&mem, PDPTE_START), 0xb003);
        assert_eq!(read_u64(&mem, PDPTE_START + 8), 0);
        for i in 0..512u64 {
            assert_eq!(read_u64(&mem, PDE_START + i * 8), (i << 21) + 0x83);
        }
    }

    #[test]
    fn reports_missing_memory() {
        // Memory ends inside the PDPTE page.
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0xa800)]).unwrap();
        let err = setup_identity_page_tables(&mem).unwrap_err();
        assert!(
            matches!(
                err,
                Error::GuestWrite {
                    what: "PDPTE",
                    addr: PDPTE_START,
                    ..
                }
            ),
            "{err}"
        );
    }
}
