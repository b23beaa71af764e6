//! The guest-visible memory map ember must present: Firecracker's x86_64
//! layout, as e820 entries and as Linux prints them.

/// e820 type of usable RAM (ACPI 6.5 table 15.4, `AddressRangeMemory`).
pub const E820_RAM: u32 = 1;
/// e820 type of reserved ranges (`AddressRangeReserved`).
pub const E820_RESERVED: u32 = 2;

/// Start of the Extended BIOS Data Area: low RAM ends here (640 KiB minus
/// the 1 KiB EBDA), as in Firecracker's `arch::x86_64::layout::EBDA_START`.
pub const EBDA_START: u64 = 0x9fc00;
/// First byte above the legacy ISA hole: where high RAM and the kernel start.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO gap (3 GiB); RAM that would overlap it is
/// relocated above 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// First address past 32 bits, where relocated RAM starts.
pub const FIRST_ADDR_PAST_32BITS: u64 = 1 << 32;
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

/// The e820 map Firecracker gives a guest with `mem_size_mib` of memory:
/// `[0, EBDA_START)` RAM, `[HIMEM_START, min(mem, 3 GiB))` RAM and, when
/// memory exceeds 3 GiB, the rest relocated to `[4 GiB, 4 GiB + mem - 3 GiB)`.
pub fn expected_e820(mem_size_mib: u64) -> Vec<E820Entry> {
    let mem = mem_size_mib << 20;
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: HIMEM_START,
            size: mem.min(MMIO_GAP_START) - HIMEM_START,
            kind: E820_RAM,
        },
    ];
    if mem > MMIO_GAP_START {
        map.push(E820Entry {
            addr: FIRST_ADDR_PAST_32BITS,
            size: mem - MMIO_GAP_START,
            kind: E820_RAM,
        });
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_has_low_and_high_ram() {
        assert_eq!(
            expected_e820(128),
            [
                E820Entry {
                    addr: 0,
                    size: 0x9fc00,
                    kind: 1
                },
                E820Entry {
                    addr: 0x10_0000,
                    size: 0x7f0_0000,
                    kind: 1
                },
            ]
        );
    }

    #[test]
    fn memory_above_3_gib_moves_above_4_gib() {
        let map = expected_e820(5 << 10);
        assert_eq!(
            map[1],
            E820Entry {
                addr: 0x10_0000,
                size: 0xbff0_0000,
                kind: 1
            }
        );
        assert_eq!(
            map[2],
            E820Entry {
                addr: 1 << 32,
                size: 2 << 30,
                kind: 1
            }
        );
        assert_eq!(map.len(), 3);
        assert_eq!(
            expected_e820(3 << 10).len(),
            2,
            "exactly 3 GiB needs no high range"
        );
    }

    #[test]
    fn linux_line_matches_the_kernel_format() {
        assert_eq!(
            expected_e820(256)[0].linux_line(),
            "[mem 0x0000000000000000-0x000000000009fbff] usable"
        );
        assert_eq!(
            expected_e820(256)[1].linux_line(),
            "[mem 0x0000000000100000-0x000000000fffffff] usable"
        );
        assert_eq!(
            ISA_HOLE.linux_line(),
            "[mem 0x00000000000a0000-0x00000000000fffff] reserved"
        );
    }
}
