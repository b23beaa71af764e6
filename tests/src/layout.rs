//! The guest-visible memory map ember must present: Firecracker's x86_64
//! layout, as e820 entries and as Linux prints them.
//!
//! The constants are restated from Firecracker's `arch::x86_64::layout`
//! rather than imported from ember, so the tests check ember against
//! Firecracker and not against itself.

/// e820 type of usable RAM (ACPI 6.5 table 15.4, `AddressRangeMemory`).
pub const E820_RAM: u32 = 1;
/// e820 type of reserved ranges (`AddressRangeReserved`).
pub const E820_RESERVED: u32 = 2;

/// Start of the Extended BIOS Data Area; low RAM ends here (640 KiB minus
/// the 1 KiB EBDA). Firecracker `arch::x86_64::layout::EBDA_START`.
pub const EBDA_START: u64 = 0x9fc00;
/// Where the ACPI RSDP lives; Firecracker reserves `[EBDA_START, RSDP_ADDR)`
/// for system data (MP table, ACPI tables): `SYSTEM_MEM_START/SIZE`.
pub const RSDP_ADDR: u64 = 0xe_0000;
/// First byte above the legacy ISA hole: where high RAM and the kernel start.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO gap (3 GiB); RAM that would overlap it is
/// relocated above 4 GiB.
pub const MMIO32_START: u64 = 0xc000_0000;
/// The PCIe MMCONFIG window, the last 256 MiB of the MMIO gap before the
/// IOAPIC (0xfec0_0000); Firecracker reports it as reserved.
pub const PCI_MMCONFIG_START: u64 = 0xeec0_0000;
/// Size of the PCIe MMCONFIG window.
pub const PCI_MMCONFIG_SIZE: u64 = 256 << 20;
/// First address past 32 bits, where relocated RAM starts.
pub const FIRST_ADDR_PAST_32BITS: u64 = 1 << 32;
/// Start of the 64-bit MMIO gap (256 GiB); RAM resumes after its 256 GiB.
pub const MMIO64_START: u64 = 256 << 30;
/// Size of the 64-bit MMIO gap.
pub const MMIO64_SIZE: u64 = 256 << 30;
/// The legacy ISA hole Linux reserves itself on a PVH boot
/// (`arch/x86/platform/pvh/enlighten.c`, `ISA_START_ADDRESS`..`ISA_END_ADDRESS`).
pub const ISA_HOLE: E820Entry = E820Entry {
    addr: 0xa_0000,
    size: 0x6_0000,
    kind: E820_RESERVED,
};

/// One e820 range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct E820Entry {
    /// First byte.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// Range type ([`E820_RAM`], [`E820_RESERVED`], ...).
    pub kind: u32,
}

impl E820Entry {
    /// The entry as Linux's `e820__print_table` prints it after the
    /// `BIOS-e820: ` prefix: `[mem 0x%016Lx-0x%016Lx] <type>`, end inclusive.
    pub fn linux_line(&self) -> String {
        let last = self.addr.saturating_add(self.size).saturating_sub(1);
        let kind = match self.kind {
            E820_RAM => "usable".to_string(),
            E820_RESERVED => "reserved".to_string(),
            3 => "ACPI data".to_string(),
            4 => "ACPI NVS".to_string(),
            5 => "unusable".to_string(),
            other => format!("type {other}"),
        };
        format!("[mem {:#018x}-{:#018x}] {kind}", self.addr, last)
    }
}

/// The e820 map Firecracker (`arch::x86_64::configure_64bit_boot`, and the
/// PVH memory map of `configure_pvh`) gives a guest with `mem_size_mib` of
/// memory, sorted by address:
///
/// - `[0, EBDA_START)` RAM;
/// - `[EBDA_START, RSDP_ADDR)` reserved for system data;
/// - `[HIMEM_START, min(mem, 3 GiB))` RAM;
/// - the PCIe MMCONFIG window, reserved;
/// - memory beyond 3 GiB relocated to `[4 GiB, ...)` RAM, up to the 64-bit
///   MMIO gap, and the rest after that gap.
pub fn expected_e820(mem_size_mib: u64) -> Vec<E820Entry> {
    let mem = mem_size_mib << 20;
    let ram = |addr, size| E820Entry {
        addr,
        size,
        kind: E820_RAM,
    };
    let mut map = vec![
        ram(0, EBDA_START),
        E820Entry {
            addr: EBDA_START,
            size: RSDP_ADDR - EBDA_START,
            kind: E820_RESERVED,
        },
        ram(HIMEM_START, mem.min(MMIO32_START) - HIMEM_START),
        E820Entry {
            addr: PCI_MMCONFIG_START,
            size: PCI_MMCONFIG_SIZE,
            kind: E820_RESERVED,
        },
    ];
    // Guest RAM past the 32-bit gap (Firecracker `arch_memory_regions`).
    let high = mem.saturating_sub(MMIO32_START);
    let below_64bit_gap = high.min(MMIO64_START - FIRST_ADDR_PAST_32BITS);
    if below_64bit_gap > 0 {
        map.push(ram(FIRST_ADDR_PAST_32BITS, below_64bit_gap));
    }
    if high > below_64bit_gap {
        map.push(ram(MMIO64_START + MMIO64_SIZE, high - below_64bit_gap));
    }
    map
}

/// `map` as Linux keeps it after `e820__update_table`: sorted, where ranges
/// overlap the larger type wins, and adjacent ranges of one type are merged.
pub fn sanitize(map: &[E820Entry]) -> Vec<E820Entry> {
    let mut points: Vec<u64> = map
        .iter()
        .flat_map(|e| [e.addr, e.addr.saturating_add(e.size)])
        .collect();
    points.sort_unstable();
    points.dedup();
    let mut out: Vec<E820Entry> = Vec::new();
    for pair in points.windows(2) {
        let (start, end) = (pair[0], pair[1]);
        let kind = map
            .iter()
            .filter(|e| e.addr <= start && end <= e.addr.saturating_add(e.size))
            .map(|e| e.kind)
            .max();
        let Some(kind) = kind else { continue };
        match out.last_mut() {
            Some(last) if last.kind == kind && last.addr + last.size == start => {
                last.size += end - start;
            }
            _ => out.push(E820Entry {
                addr: start,
                size: end - start,
                kind,
            }),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const fn e(addr: u64, size: u64, kind: u32) -> E820Entry {
        E820Entry { addr, size, kind }
    }

    #[test]
    fn small_guest_has_low_and_high_ram_around_reserved_system_areas() {
        assert_eq!(
            expected_e820(128),
            [
                e(0, 0x9fc00, E820_RAM),
                e(0x9fc00, 0x40400, E820_RESERVED),
                e(0x10_0000, 0x7f0_0000, E820_RAM),
                e(0xeec0_0000, 0x1000_0000, E820_RESERVED),
            ]
        );
    }

    #[test]
    fn memory_above_3_gib_moves_above_4_gib() {
        let map = expected_e820(5 << 10);
        assert_eq!(map[2], e(0x10_0000, 0xbff0_0000, E820_RAM));
        assert_eq!(map[4], e(1 << 32, 2 << 30, E820_RAM));
        assert_eq!(map.len(), 5);
        assert_eq!(
            expected_e820(3 << 10).len(),
            4,
            "exactly 3 GiB needs no high range"
        );
    }

    #[test]
    fn memory_past_the_64_bit_gap_resumes_at_512_gib() {
        let map = expected_e820(300 << 10);
        assert_eq!(map[4], e(1 << 32, 252 << 30, E820_RAM));
        assert_eq!(map[5], e(512 << 30, 45 << 30, E820_RAM));
    }

    #[test]
    fn sanitize_merges_like_linux() {
        let mut map = expected_e820(256);
        map.push(ISA_HOLE);
        map.reverse();
        assert_eq!(
            sanitize(&map),
            [
                e(0, 0x9fc00, E820_RAM),
                // [0x9fc00, 0xe0000) and the ISA hole [0xa0000, 0x100000) merge.
                e(0x9fc00, 0x6_0400, E820_RESERVED),
                e(0x10_0000, 0xff0_0000, E820_RAM),
                e(0xeec0_0000, 0x1000_0000, E820_RESERVED),
            ]
        );
        // Where RAM and reserved overlap, reserved (the larger type) wins.
        assert_eq!(
            sanitize(&[e(0, 0x3000, E820_RAM), e(0x1000, 0x1000, E820_RESERVED)]),
            [
                e(0, 0x1000, E820_RAM),
                e(0x1000, 0x1000, E820_RESERVED),
                e(0x2000, 0x1000, E820_RAM),
            ]
        );
    }

    #[test]
    fn linux_line_matches_the_kernel_format() {
        assert_eq!(
            expected_e820(256)[0].linux_line(),
            "[mem 0x0000000000000000-0x000000000009fbff] usable"
        );
        assert_eq!(
            expected_e820(256)[2].linux_line(),
            "[mem 0x0000000000100000-0x000000000fffffff] usable"
        );
        assert_eq!(
            ISA_HOLE.linux_line(),
            "[mem 0x00000000000a0000-0x00000000000fffff] reserved"
        );
    }
}
