// SPDX-License-Identifier: Apache-2.0

//! Intel MultiProcessor Specification 1.4 table.
//!
//! The MP floating pointer structure and the configuration table are written
//! at [`MPTABLE_START`] (the EBDA, where Linux's `smp_scan_config` looks).
//! The content is Firecracker's: one processor entry per vCPU (APIC ID =
//! vCPU index, CPU 0 is the bootstrap processor), an ISA bus, the IOAPIC,
//! 24 I/O interrupt entries that map ISA IRQ n to IOAPIC pin n (the routing
//! `kvm_setup_default_irq_routing()` installs), and LINT0 = ExtINT,
//! LINT1 = NMI local interrupt entries.

use std::mem::size_of;

use vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::layout::{APIC_ADDR, IOAPIC_ADDR, IRQ_MAX, MPTABLE_START};
use crate::Error;

/// Most vCPUs the table can describe. xAPIC IDs are 8 bits, 0xff is the
/// broadcast ID, and the IOAPIC takes one ID (`num_cpus + 1`), as in
/// Firecracker.
pub const MAX_SUPPORTED_CPUS: u8 = 254;

// Entry types and flags, MP spec 1.4 chapter 4 (Linux asm/mpspec_def.h).
const MP_PROCESSOR: u8 = 0;
const MP_BUS: u8 = 1;
const MP_IOAPIC: u8 = 2;
const MP_INTSRC: u8 = 3;
const MP_LINTSRC: u8 = 4;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const MPC_APIC_USABLE: u8 = 1;
/// Polarity and trigger "conform to the bus specification".
const MP_IRQPOL_DEFAULT: u16 = 0;
const MP_INT: u8 = 0;
const MP_NMI: u8 = 1;
const MP_EXTINT: u8 = 3;

const SMP_MAGIC_IDENT: [u8; 4] = *b"_MP_";
const MPC_SIGNATURE: [u8; 4] = *b"PCMP";
/// Specification revision 1.4.
const MPC_SPEC: u8 = 4;
const MPC_OEM: [u8; 8] = *b"FC      ";
const MPC_PRODUCT_ID: [u8; 12] = *b"000000000000";
const BUS_TYPE_ISA: [u8; 6] = *b"ISA   ";
/// Local APIC version of an integrated (xAPIC) APIC.
const APIC_VERSION: u8 = 0x14;
/// CPU signature: family 6.
const CPU_STEPPING: u32 = 0x600;
/// CPUID.1:EDX feature flags: APIC and FPU.
const CPU_FEATURE_APIC: u32 = 0x200;
const CPU_FEATURE_FPU: u32 = 0x001;

/// MP floating pointer structure (MP spec 1.4 section 4.1).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct MpfIntel {
    /// `_MP_`.
    pub signature: [u8; 4],
    /// Physical address of the configuration table.
    pub physptr: u32,
    /// Length in 16-byte units (1).
    pub length: u8,
    /// Spec revision (4 = 1.4).
    pub specification: u8,
    /// Makes the 16 bytes sum to zero.
    pub checksum: u8,
    /// MP feature bytes (0: a configuration table is present).
    pub feature: [u8; 5],
}

/// MP configuration table header (MP spec 1.4 section 4.2).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct MpcTable {
    /// `PCMP`.
    pub signature: [u8; 4],
    /// Length of the header plus all entries.
    pub length: u16,
    /// Spec revision (4).
    pub spec: u8,
    /// Makes the header and entries sum to zero.
    pub checksum: u8,
    /// OEM ID.
    pub oem: [u8; 8],
    /// Product ID.
    pub productid: [u8; 12],
    /// OEM table pointer (0: none).
    pub oemptr: u32,
    /// OEM table size.
    pub oemsize: u16,
    /// Entry count.
    pub oemcount: u16,
    /// Local APIC address.
    pub lapic: u32,
    /// Extended table length and checksum (0: none).
    pub reserved: u32,
}

/// Processor entry (MP spec 1.4 section 4.3.1).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct MpcCpu {
    /// Entry type 0.
    pub type_: u8,
    /// Local APIC ID.
    pub apicid: u8,
    /// Local APIC version.
    pub apicver: u8,
    /// Enabled and bootstrap-processor flags.
    pub cpuflag: u8,
    /// CPU signature (stepping, model, family).
    pub cpufeature: u32,
    /// CPUID feature flags.
    pub featureflag: u32,
    /// Reserved.
    pub reserved: [u32; 2],
}

/// Bus entry (MP spec 1.4 section 4.3.2).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct MpcBus {
    /// Entry type 1.
    pub type_: u8,
    /// Bus ID.
    pub busid: u8,
    /// Bus type string.
    pub bustype: [u8; 6],
}

/// I/O APIC entry (MP spec 1.4 section 4.3.3).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct MpcIoapic {
    /// Entry type 2.
    pub type_: u8,
    /// I/O APIC ID.
    pub apicid: u8,
    /// I/O APIC version.
    pub apicver: u8,
    /// Usable flag.
    pub flags: u8,
    /// Register window address.
    pub apicaddr: u32,
}

/// I/O interrupt assignment entry (MP spec 1.4 section 4.3.4).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct MpcIntsrc {
    /// Entry type 3.
    pub type_: u8,
    /// Interrupt type (INT, NMI, SMI, ExtINT).
    pub irqtype: u8,
    /// Polarity and trigger mode.
    pub irqflag: u16,
    /// Source bus ID.
    pub srcbus: u8,
    /// Source bus IRQ.
    pub srcbusirq: u8,
    /// Destination I/O APIC ID.
    pub dstapic: u8,
    /// Destination I/O APIC pin.
    pub dstirq: u8,
}

/// Local interrupt assignment entry (MP spec 1.4 section 4.3.5).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct MpcLintsrc {
    /// Entry type 4.
    pub type_: u8,
    /// Interrupt type (INT, NMI, SMI, ExtINT).
    pub irqtype: u8,
    /// Polarity and trigger mode.
    pub irqflag: u16,
    /// Source bus ID.
    pub srcbusid: u8,
    /// Source bus IRQ.
    pub srcbusirq: u8,
    /// Destination local APIC ID (0xff: all).
    pub destapic: u8,
    /// Destination LINTn pin.
    pub destapiclint: u8,
}

// Sizes fixed by the MP spec.
const _: () = assert!(size_of::<MpfIntel>() == 16);
const _: () = assert!(size_of::<MpcTable>() == 44);
const _: () = assert!(size_of::<MpcCpu>() == 20);
const _: () = assert!(size_of::<MpcBus>() == 8);
const _: () = assert!(size_of::<MpcIoapic>() == 8);
const _: () = assert!(size_of::<MpcIntsrc>() == 8);
const _: () = assert!(size_of::<MpcLintsrc>() == 8);

// SAFETY: each struct is repr(C), made only of integers and integer arrays,
// and has no padding (the sizes are asserted above), so every byte pattern
// is a valid value.
unsafe impl ByteValued for MpfIntel {}
// SAFETY: as above.
unsafe impl ByteValued for MpcTable {}
// SAFETY: as above.
unsafe impl ByteValued for MpcCpu {}
// SAFETY: as above.
unsafe impl ByteValued for MpcBus {}
// SAFETY: as above.
unsafe impl ByteValued for MpcIoapic {}
// SAFETY: as above.
unsafe impl ByteValued for MpcIntsrc {}
// SAFETY: as above.
unsafe impl ByteValued for MpcLintsrc {}

/// Number of I/O interrupt entries: one per IOAPIC pin.
const NUM_INTSRC: usize = IRQ_MAX as usize + 1;

/// Bytes the floating pointer plus configuration table take for `num_cpus`.
pub fn mptable_size(num_cpus: u8) -> usize {
    size_of::<MpfIntel>()
        + size_of::<MpcTable>()
        + size_of::<MpcCpu>() * usize::from(num_cpus)
        + size_of::<MpcBus>()
        + size_of::<MpcIoapic>()
        + size_of::<MpcIntsrc>() * NUM_INTSRC
        + size_of::<MpcLintsrc>() * 2
}

fn byte_sum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b))
}

/// Serialises the configuration table: header, then entries.
fn build_config_table(num_cpus: u8) -> Vec<u8> {
    let ioapicid = num_cpus + 1;
    let mut entries: Vec<u8> = Vec::new();
    // Firecracker counts the floating pointer too; Linux walks the table by
    // `length` and ignores the count, so matching it costs nothing.
    let mut count: u16 = 1;
    let mut push = |bytes: &[u8]| {
        entries.extend_from_slice(bytes);
        count += 1;
    };

    for cpu_id in 0..num_cpus {
        let bsp = if cpu_id == 0 { CPU_BOOTPROCESSOR } else { 0 };
        push(
            MpcCpu {
                type_: MP_PROCESSOR,
                apicid: cpu_id,
                apicver: APIC_VERSION,
                cpuflag: CPU_ENABLED | bsp,
                cpufeature: CPU_STEPPING,
                featureflag: CPU_FEATURE_APIC | CPU_FEATURE_FPU,
                reserved: [0; 2],
            }
            .as_slice(),
        );
    }
    push(
        MpcBus {
            type_: MP_BUS,
            busid: 0,
            bustype: BUS_TYPE_ISA,
        }
        .as_slice(),
    );
    push(
        MpcIoapic {
            type_: MP_IOAPIC,
            apicid: ioapicid,
            apicver: APIC_VERSION,
            flags: MPC_APIC_USABLE,
            apicaddr: IOAPIC_ADDR as u32,
        }
        .as_slice(),
    );
    for irq in 0..NUM_INTSRC as u8 {
        push(
            MpcIntsrc {
                type_: MP_INTSRC,
                irqtype: MP_INT,
                irqflag: MP_IRQPOL_DEFAULT,
                srcbus: 0,
                srcbusirq: irq,
                dstapic: ioapicid,
                dstirq: irq,
            }
            .as_slice(),
        );
    }
    // LINT0 of every local APIC is wired to the 8259 (virtual wire mode),
    // LINT1 to NMI (MP spec 1.4 section 3.6.2.2 and figure 3-3).
    push(
        MpcLintsrc {
            type_: MP_LINTSRC,
            irqtype: MP_EXTINT,
            irqflag: MP_IRQPOL_DEFAULT,
            srcbusid: 0,
            srcbusirq: 0,
            destapic: 0,
            destapiclint: 0,
        }
        .as_slice(),
    );
    push(
        MpcLintsrc {
            type_: MP_LINTSRC,
            irqtype: MP_NMI,
            irqflag: MP_IRQPOL_DEFAULT,
            srcbusid: 0,
            srcbusirq: 0,
            destapic: 0xff,
            destapiclint: 1,
        }
        .as_slice(),
    );

    let mut header = MpcTable {
        signature: MPC_SIGNATURE,
        // At most 44 + 254 * 20 + 8 + 8 + 24 * 8 + 2 * 8 = 5348 bytes.
        length: (size_of::<MpcTable>() + entries.len()) as u16,
        spec: MPC_SPEC,
        checksum: 0,
        oem: MPC_OEM,
        productid: MPC_PRODUCT_ID,
        oemptr: 0,
        oemsize: 0,
        oemcount: count,
        lapic: APIC_ADDR as u32,
        reserved: 0,
    };
    header.checksum =
        0u8.wrapping_sub(byte_sum(header.as_slice()).wrapping_add(byte_sum(&entries)));

    let mut table = header.as_slice().to_vec();
    table.extend_from_slice(&entries);
    table
}

/// Writes the MP floating pointer and configuration table for `num_cpus`
/// vCPUs (1 to [`MAX_SUPPORTED_CPUS`]) at [`MPTABLE_START`].
pub fn setup_mptable(mem: &GuestMemoryMmap, num_cpus: u8) -> Result<(), Error> {
    if num_cpus == 0 || num_cpus > MAX_SUPPORTED_CPUS {
        return Err(Error::InvalidCpuCount {
            num_cpus,
            max: MAX_SUPPORTED_CPUS,
        });
    }
    let size = mptable_size(num_cpus);
    let base = GuestAddress(MPTABLE_START);
    if !mem.check_range(base, size) {
        return Err(Error::MptableDoesNotFit {
            size,
            addr: MPTABLE_START,
        });
    }

    let table_addr = base.unchecked_add(size_of::<MpfIntel>() as u64);
    let mut mpf = MpfIntel {
        signature: SMP_MAGIC_IDENT,
        // MPTABLE_START is a constant below 1 MiB.
        physptr: table_addr.raw_value() as u32,
        length: 1,
        specification: MPC_SPEC,
        checksum: 0,
        feature: [0; 5],
    };
    mpf.checksum = 0u8.wrapping_sub(byte_sum(mpf.as_slice()));

    let mut bytes = mpf.as_slice().to_vec();
    bytes.extend_from_slice(&build_config_table(num_cpus));
    debug_assert_eq!(bytes.len(), size);
    mem.write_slice(&bytes, base)
        .map_err(|source| Error::GuestWrite {
            what: "MP table",
            addr: MPTABLE_START,
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem_for(num_cpus: u8) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(MPTABLE_START), mptable_size(num_cpus))])
            .unwrap()
    }

    fn read_bytes(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    /// Walks the table the way Linux's `smp_read_mpc` does and returns the
    /// entries as (type, bytes).
    fn entries(mem: &GuestMemoryMmap) -> (MpfIntel, MpcTable, Vec<(u8, Vec<u8>)>) {
        let mpf: MpfIntel = mem.read_obj(GuestAddress(MPTABLE_START)).unwrap();
        let table: MpcTable = mem.read_obj(GuestAddress(u64::from(mpf.physptr))).unwrap();
        let mut out = Vec::new();
        let end = u64::from(mpf.physptr) + u64::from(table.length);
        let mut at = u64::from(mpf.physptr) + size_of::<MpcTable>() as u64;
        while at < end {
            let ty: u8 = mem.read_obj(GuestAddress(at)).unwrap();
            let len = if ty == MP_PROCESSOR { 20 } else { 8 };
            out.push((ty, read_bytes(mem, at, len)));
            at += len as u64;
        }
        assert_eq!(at, end);
        (mpf, table, out)
    }

    #[test]
    fn signatures_and_checksums() {
        let mem = mem_for(4);
        setup_mptable(&mem, 4).unwrap();
        let (mpf, table, _) = entries(&mem);
        assert_eq!(&mpf.signature, b"_MP_");
        assert_eq!(mpf.physptr as u64, MPTABLE_START + 16);
        assert_eq!((mpf.length, mpf.specification), (1, 4));
        assert_eq!(byte_sum(&read_bytes(&mem, MPTABLE_START, 16)), 0);

        assert_eq!(&table.signature, b"PCMP");
        assert_eq!(table.spec, 4);
        assert_eq!(table.lapic as u64, APIC_ADDR);
        assert_eq!(usize::from(table.length), mptable_size(4) - 16);
        let whole = read_bytes(&mem, u64::from(mpf.physptr), usize::from(table.length));
        assert_eq!(byte_sum(&whole), 0);
    }

    #[test]
    fn entries_describe_cpus_bus_ioapic_and_interrupts() {
        let num_cpus = 3;
        let mem = mem_for(num_cpus);
        setup_mptable(&mem, num_cpus).unwrap();
        let (_, table, entries) = entries(&mem);
        assert_eq!(usize::from(table.oemcount), entries.len() + 1);

        let cpus: Vec<_> = entries.iter().filter(|e| e.0 == MP_PROCESSOR).collect();
        assert_eq!(cpus.len(), 3);
        for (i, (_, bytes)) in cpus.iter().enumerate() {
            let cpu = MpcCpu::from_slice(bytes).copied().unwrap();
            assert_eq!(cpu.apicid as usize, i);
            assert_eq!(cpu.apicver, 0x14);
            let flags = if i == 0 { 3 } else { 1 };
            assert_eq!(cpu.cpuflag, flags);
            assert_eq!(cpu.featureflag, 0x201);
        }

        let bus: Vec<_> = entries.iter().filter(|e| e.0 == MP_BUS).collect();
        assert_eq!(bus.len(), 1);
        assert_eq!(&bus[0].1[2..8], b"ISA   ");

        let ioapics: Vec<_> = entries.iter().filter(|e| e.0 == MP_IOAPIC).collect();
        assert_eq!(ioapics.len(), 1);
        let ioapic = MpcIoapic::from_slice(&ioapics[0].1).copied().unwrap();
        assert_eq!(ioapic.apicid, num_cpus + 1);
        assert_eq!(ioapic.flags, 1);
        assert_eq!(u64::from(ioapic.apicaddr), IOAPIC_ADDR);

        let intsrc: Vec<_> = entries
            .iter()
            .filter(|e| e.0 == MP_INTSRC)
            .map(|e| MpcIntsrc::from_slice(&e.1).copied().unwrap())
            .collect();
        assert_eq!(intsrc.len(), 24);
        for (i, src) in intsrc.iter().enumerate() {
            assert_eq!((src.irqtype, src.srcbus), (MP_INT, 0));
            assert_eq!((src.srcbusirq as usize, src.dstirq as usize), (i, i));
            assert_eq!(src.dstapic, ioapic.apicid);
        }

        let lint: Vec<_> = entries
            .iter()
            .filter(|e| e.0 == MP_LINTSRC)
            .map(|e| MpcLintsrc::from_slice(&e.1).copied().unwrap())
            .collect();
        assert_eq!(lint.len(), 2);
        assert_eq!(
            (lint[0].irqtype, lint[0].destapic, lint[0].destapiclint),
            (3, 0, 0)
        );
        assert_eq!(
            (lint[1].irqtype, lint[1].destapic, lint[1].destapiclint),
            (1, 0xff, 1)
        );
    }

    #[test]
    fn max_cpus_fit_and_beyond_is_refused() {
        let mem = mem_for(MAX_SUPPORTED_CPUS);
        setup_mptable(&mem, MAX_SUPPORTED_CPUS).unwrap();
        let (_, _, entries) = entries(&mem);
        let cpus = entries.iter().filter(|e| e.0 == MP_PROCESSOR).count();
        assert_eq!(cpus, usize::from(MAX_SUPPORTED_CPUS));

        let err = setup_mptable(&mem, MAX_SUPPORTED_CPUS + 1).unwrap_err();
        assert!(matches!(
            err,
            Error::InvalidCpuCount {
                num_cpus: 255,
                max: 254
            }
        ));
        let err = setup_mptable(&mem, 0).unwrap_err();
        assert!(matches!(err, Error::InvalidCpuCount { num_cpus: 0, .. }));
    }

    #[test]
    fn too_little_memory() {
        let mem =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(MPTABLE_START), mptable_size(4) - 1)])
                .unwrap();
        let err = setup_mptable(&mem, 4).unwrap_err();
        assert!(matches!(err, Error::MptableDoesNotFit { .. }), "{err}");
    }

    #[test]
    fn fits_in_the_ebda_for_32_cpus() {
        // Firecracker's vCPU limit is 32; the table then stays in the 1 KiB EBDA.
        assert!(mptable_size(32) <= 1024);
    }
}
