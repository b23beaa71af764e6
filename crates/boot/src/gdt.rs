// SPDX-License-Identifier: Apache-2.0

//! The boot GDT and IDT.
//!
//! Descriptor layout: Intel SDM vol. 3A section 3.4.5 ("Segment
//! Descriptors"). `gdt_entry` packs the same `flags` word as Linux's
//! `GDT_ENTRY()` macro (arch/x86/include/asm/segment.h): bits 0-7 are the
//! access byte (type, S, DPL, P) and bits 12-15 the AVL, L, D/B and G flags.

use std::mem::size_of;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{BOOT_GDT_OFFSET, BOOT_IDT_OFFSET};
use crate::Error;

/// Largest GDT that fits between [`BOOT_GDT_OFFSET`] and [`BOOT_IDT_OFFSET`].
pub const BOOT_GDT_MAX: usize = ((BOOT_IDT_OFFSET - BOOT_GDT_OFFSET) as usize) / size_of::<u64>();

/// GDT for the 64-bit Linux entry, as Firecracker writes it: null, 64-bit
/// code (selector 0x08), data (0x10), busy 32-bit TSS (0x18).
pub const GDT_TABLE: [u64; 4] = [
    gdt_entry(0, 0, 0),            // NULL
    gdt_entry(0xa09b, 0, 0xfffff), // CODE: G, L, present, execute/read, accessed
    gdt_entry(0xc093, 0, 0xfffff), // DATA: G, D/B, present, read/write, accessed
    gdt_entry(0x808b, 0, 0xfffff), // TSS: G, present, busy 32-bit TSS
];

/// GDT for the PVH entry, as Firecracker writes it. The Xen PVH ABI asks for
/// 32-bit flat code and data segments (base 0, limit 0xffffffff) and a
/// 32-bit TSS with base 0 and limit 0x67.
pub const PVH_GDT_TABLE: [u64; 4] = [
    gdt_entry(0, 0, 0),                // NULL
    gdt_entry(0xc09b, 0, 0xffff_ffff), // CODE: G, D/B, present, execute/read, accessed
    gdt_entry(0xc093, 0, 0xffff_ffff), // DATA: G, D/B, present, read/write, accessed
    gdt_entry(0x008b, 0, 0x67),        // TSS: present, busy 32-bit TSS
];

/// GDTR limit for a 4-entry table.
pub const BOOT_GDT_LIMIT: u16 = (4 * size_of::<u64>() - 1) as u16;
/// IDTR limit for the single null IDT entry.
pub const BOOT_IDT_LIMIT: u16 = (size_of::<u64>() - 1) as u16;

/// Builds a segment descriptor from Linux-style `flags`, a 32-bit base and a
/// 20-bit limit (bits above 19 are dropped, as the descriptor has no room
/// for them; with G set the CPU scales the limit by 4 KiB).
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// A segment descriptor decoded into the fields a vCPU's segment register
/// takes (KVM's `struct kvm_segment` has the same fields).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SegmentDescriptor {
    /// Segment base address.
    pub base: u64,
    /// Segment limit in bytes minus one, already scaled by 4 KiB when `g` is
    /// set. A VMCS/KVM segment limit is a 32-bit byte limit that is not
    /// scaled by the hardware, so a flat 4 GiB segment must read 0xffffffff
    /// (this matters for the 32-bit PVH entry).
    pub limit: u32,
    /// Segment type (4 bits).
    pub type_: u8,
    /// Present flag.
    pub present: u8,
    /// Descriptor privilege level (2 bits).
    pub dpl: u8,
    /// Default operation size / big flag.
    pub db: u8,
    /// Descriptor type: 1 for code/data, 0 for system segments.
    pub s: u8,
    /// 64-bit code segment flag.
    pub l: u8,
    /// Granularity flag.
    pub g: u8,
    /// Available-for-software bit.
    pub avl: u8,
    /// Selector that refers to this descriptor: its table index times 8
    /// (TI = 0, RPL = 0).
    pub selector: u16,
}

impl SegmentDescriptor {
    /// Whether a segment register loaded with this descriptor is unusable
    /// (it is not present), as KVM's `kvm_segment.unusable` expects.
    pub fn unusable(&self) -> bool {
        self.present == 0
    }
}

/// Decodes the descriptor `entry` found at `table_index` in the GDT.
pub fn decode(entry: u64, table_index: u8) -> SegmentDescriptor {
    let bit = |n: u32| ((entry >> n) & 1) as u8;
    let g = bit(55);
    let raw_limit = (((entry >> 32) & 0x000f_0000) | (entry & 0xffff)) as u32;
    SegmentDescriptor {
        base: ((entry >> 32) & 0xff00_0000) | ((entry >> 16) & 0x00ff_ffff),
        limit: if g == 0 {
            raw_limit
        } else {
            (raw_limit << 12) | 0xfff
        },
        type_: ((entry >> 40) & 0xf) as u8,
        present: bit(47),
        dpl: ((entry >> 45) & 0x3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g,
        avl: bit(52),
        selector: u16::from(table_index) * 8,
    }
}

/// Writes `table` at [`BOOT_GDT_OFFSET`] and a single null IDT entry at
/// [`BOOT_IDT_OFFSET`]. The null IDT makes any exception before the kernel
/// installs its own IDT a triple fault, i.e. a visible reset.
pub fn write_gdt_and_idt(mem: &GuestMemoryMmap, table: &[u64]) -> Result<(), Error> {
    if table.len() > BOOT_GDT_MAX {
        return Err(Error::GdtTooLarge {
            entries: table.len(),
            max: BOOT_GDT_MAX,
        });
    }
    for (index, entry) in table.iter().enumerate() {
        let addr = BOOT_GDT_OFFSET + (index * size_of::<u64>()) as u64;
        mem.write_obj(*entry, GuestAddress(addr))
            .map_err(|source| Error::GuestWrite {
                what: "GDT entry",
                addr,
                source,
            })?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_OFFSET))
        .map_err(|source| Error::GuestWrite {
            what: "IDT",
            addr: BOOT_IDT_OFFSET,
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem(size: usize) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).unwrap()
    }

    #[test]
    fn linux_table_matches_firecracker() {
        assert_eq!(GDT_TABLE[0], 0);
        assert_eq!(GDT_TABLE[1], 0x00af_9b00_0000_ffff);
        assert_eq!(GDT_TABLE[2], 0x00cf_9300_0000_ffff);
        assert_eq!(GDT_TABLE[3], 0x008f_8b00_0000_ffff);
    }

    #[test]
    fn pvh_table_matches_firecracker() {
        assert_eq!(PVH_GDT_TABLE[1], 0x00cf_9b00_0000_ffff);
        assert_eq!(PVH_GDT_TABLE[2], 0x00cf_9300_0000_ffff);
        assert_eq!(PVH_GDT_TABLE[3], 0x0000_8b00_0000_0067);
    }

    #[test]
    fn decode_code64() {
        let seg = decode(gdt_entry(0xa09b, 0x10_0000, 0xfffff), 1);
        assert_eq!(
            seg,
            SegmentDescriptor {
                base: 0x10_0000,
                limit: 0xffff_ffff,
                type_: 0xb,
                present: 1,
                dpl: 0,
                db: 0,
                s: 1,
                l: 1,
                g: 1,
                avl: 0,
                selector: 0x08,
            }
        );
        assert!(!seg.unusable());
    }

    #[test]
    fn decode_tss_and_null() {
        let tss = decode(PVH_GDT_TABLE[3], 3);
        assert_eq!((tss.type_, tss.s, tss.g, tss.limit), (0xb, 0, 0, 0x67));
        assert_eq!(tss.selector, 0x18);
        let null = decode(0, 0);
        assert!(null.unusable());
    }

    #[test]
    fn encode_decode_round_trip() {
        for &(flags, base, limit) in &[
            (0xa09bu16, 0u32, 0xfffffu32),
            (0xc093, 0x1234_5678, 0xabcde),
            (0x00f3, 0xff00_00ff, 0x0_1234),
            (0x10fb, 0x00ff_ff00, 0xf_0000),
        ] {
            let seg = decode(gdt_entry(flags, base, limit), 2);
            assert_eq!(seg.base, u64::from(base));
            let expected_limit = if flags & 0x8000 != 0 {
                (limit << 12) | 0xfff
            } else {
                limit
            };
            assert_eq!(seg.limit, expected_limit);
            assert_eq!(seg.type_, (flags & 0xf) as u8);
            assert_eq!(seg.s, ((flags >> 4) & 1) as u8);
            assert_eq!(seg.dpl, ((flags >> 5) & 3) as u8);
            assert_eq!(seg.present, ((flags >> 7) & 1) as u8);
            assert_eq!(seg.avl, ((flags >> 12) & 1) as u8);
            assert_eq!(seg.l, ((flags >> 13) & 1) as u8);
            assert_eq!(seg.db, ((flags >> 14) & 1) as u8);
            assert_eq!(seg.g, ((flags >> 15) & 1) as u8);
            assert_eq!(seg.selector, 16);
        }
    }

    #[test]
    fn written_tables_read_back() {
        let mem = mem(0x10000);
        // Dirty the IDT slot to check that it is cleared.
        mem.write_obj(u64::MAX, GuestAddress(BOOT_IDT_OFFSET))
            .unwrap();
        write_gdt_and_idt(&mem, &GDT_TABLE).unwrap();
        for (i, expected) in GDT_TABLE.iter().enumerate() {
            let got: u64 = mem
                .read_obj(GuestAddress(BOOT_GDT_OFFSET + 8 * i as u64))
                .unwrap();
            assert_eq!(got, *expected);
        }
        let idt: u64 = mem.read_obj(GuestAddress(BOOT_IDT_OFFSET)).unwrap();
        assert_eq!(idt, 0);
        assert_eq!(BOOT_GDT_LIMIT, 31);
        assert_eq!(BOOT_IDT_LIMIT, 7);
    }

    #[test]
    fn rejects_tables_overlapping_the_idt() {
        let mem = mem(0x10000);
        let err = write_gdt_and_idt(&mem, &[0; 5]).unwrap_err();
        assert!(matches!(err, Error::GdtTooLarge { entries: 5, max: 4 }));
    }

    #[test]
    fn fails_without_memory_for_the_tables() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x510)]).unwrap();
        let err = write_gdt_and_idt(&mem, &GDT_TABLE).unwrap_err();
        assert!(
            matches!(err, Error::GuestWrite { addr: 0x510, .. }),
            "{err}"
        );
    }
}
