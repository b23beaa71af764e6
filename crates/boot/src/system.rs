// SPDX-License-Identifier: Apache-2.0

//! Command line, e820 map, zero page and PVH start info.

use std::mem::size_of;

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info, XEN_HVM_START_MAGIC_VALUE,
};
use linux_loader::loader::load_cmdline;
use vm_memory::{Address, ByteValued, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::layout::{
    CMDLINE_MAX_SIZE, CMDLINE_START, FIRST_ADDR_PAST_32BITS, FIRST_ADDR_PAST_64BITS_MMIO,
    HIMEM_START, MEMMAP_START, MMIO32_START, MMIO64_START, MODLIST_START, PCI_MMCONFIG_SIZE,
    PCI_MMCONFIG_START, PVH_INFO_START, SYSTEM_MEM_SIZE, SYSTEM_MEM_START, ZERO_PAGE_START,
};
use crate::loader::KERNEL_HDR_MAGIC;
use crate::{mptable, BootProtocol, Error, InitrdConfig, KernelEntry};

/// e820 type of usable RAM (Linux `E820_TYPE_RAM`; also the PVH memory map's
/// `XEN_HVM_MEMMAP_TYPE_RAM`).
pub const E820_RAM: u32 = 1;
/// e820 type of reserved memory (Linux `E820_TYPE_RESERVED`; PVH
/// `XEN_HVM_MEMMAP_TYPE_RESERVED`).
pub const E820_RESERVED: u32 = 2;

/// `boot_params.hdr.boot_flag` value (boot protocol: "0xAA55 magic number").
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// `type_of_loader` for a loader without an assigned ID.
const KERNEL_LOADER_OTHER: u8 = 0xff;
/// `kernel_alignment` Firecracker writes for an ELF kernel (16 MiB).
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
/// Boot protocol version that introduced `hdr.cmdline_size`.
const BOOT_PROTOCOL_2_06: u16 = 0x0206;
/// xloadflags bit 1: the kernel accepts boot_params and initrd above 4 GiB.
const XLF_CAN_BE_LOADED_ABOVE_4G: u16 = 1 << 1;
/// File offset of the setup header and of the byte that holds the
/// relative jump ending it (boot protocol: the header ends at 0x202 plus
/// the byte at 0x201).
const SETUP_HEADER_OFFSET: usize = 0x1f1;
const SETUP_HEADER_END_BASE: usize = 0x202;

/// One entry of the e820 memory map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// Start address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// [`E820_RAM`] or [`E820_RESERVED`].
    pub kind: u32,
}

/// The e820 map of `mem`, in the order Firecracker writes it (Linux sorts
/// it): RAM below the EBDA, the reserved system-data area
/// `[0x9fc00, 0xe0000)`, the reserved PCIe MMCONFIG window, RAM past the
/// 64-bit gap, RAM from 4 GiB, RAM from 1 MiB up to the 32-bit gap.
///
/// Like Firecracker, the RAM entries are derived from the last guest
/// address, so `mem` is expected to be laid out by
/// [`arch_memory_regions`](crate::arch_memory_regions).
pub fn e820_map(mem: &GuestMemoryMmap) -> Vec<E820Entry> {
    let last = mem.last_addr().raw_value();
    let end = last.saturating_add(1);
    let mut map = Vec::new();
    let mut push = |addr: u64, size: u64, kind: u32| {
        if size > 0 {
            map.push(E820Entry { addr, size, kind });
        }
    };
    push(0, end.min(SYSTEM_MEM_START), E820_RAM);
    push(SYSTEM_MEM_START, SYSTEM_MEM_SIZE, E820_RESERVED);
    push(PCI_MMCONFIG_START, PCI_MMCONFIG_SIZE, E820_RESERVED);
    if last > FIRST_ADDR_PAST_64BITS_MMIO {
        push(
            FIRST_ADDR_PAST_64BITS_MMIO,
            end - FIRST_ADDR_PAST_64BITS_MMIO,
            E820_RAM,
        );
    }
    if last > FIRST_ADDR_PAST_32BITS {
        push(
            FIRST_ADDR_PAST_32BITS,
            end.min(MMIO64_START) - FIRST_ADDR_PAST_32BITS,
            E820_RAM,
        );
    }
    if last >= HIMEM_START {
        push(HIMEM_START, end.min(MMIO32_START) - HIMEM_START, E820_RAM);
    }
    map
}

/// An empty command line with room for [`CMDLINE_MAX_SIZE`] bytes including
/// the NUL, so a longer one fails while it is built.
pub fn new_cmdline() -> Cmdline {
    // `Cmdline::new` only fails for a zero capacity.
    Cmdline::new(CMDLINE_MAX_SIZE).expect("CMDLINE_MAX_SIZE is not zero")
}

/// Builds a command line from a string, failing with
/// [`Error::CmdlineTooLong`] when it does not fit in [`CMDLINE_MAX_SIZE`]
/// bytes including the NUL.
pub fn cmdline_from_str(s: &str) -> Result<Cmdline, Error> {
    let len = s.trim().len() + 1;
    if len > CMDLINE_MAX_SIZE {
        return Err(Error::CmdlineTooLong {
            len,
            limit: CMDLINE_MAX_SIZE,
        });
    }
    let mut cmdline = new_cmdline();
    if !s.trim().is_empty() {
        cmdline.insert_str(s).map_err(Error::Cmdline)?;
    }
    Ok(cmdline)
}

/// Writes the boot structures the kernel reads at entry: the command line
/// at [`CMDLINE_START`], the MP table, and either the zero page (Linux
/// boot) or `hvm_start_info`, its module list and memory map (PVH).
///
/// The zero page is Firecracker's: `type_of_loader` 0xff, `boot_flag`
/// 0xaa55, `HdrS`, the command line pointer and size, `kernel_alignment`,
/// the initrd, and the [`e820_map`]. For a bzImage it starts from the
/// image's own setup header, as the boot protocol asks.
pub fn configure_system(
    mem: &GuestMemoryMmap,
    entry: &KernelEntry,
    cmdline: &Cmdline,
    initrd: Option<&InitrdConfig>,
    num_cpus: u8,
) -> Result<(), Error> {
    configure_system_with_rsdp(mem, entry, cmdline, initrd, num_cpus, None)
}

/// [`configure_system`], also telling the kernel where the ACPI RSDP is
/// (`boot_params.acpi_rsdp_addr` or `hvm_start_info.rsdp_paddr`), for a
/// VMM that has written ACPI tables. Without it the kernel scans the BIOS
/// area for the RSDP signature.
pub fn configure_system_with_rsdp(
    mem: &GuestMemoryMmap,
    entry: &KernelEntry,
    cmdline: &Cmdline,
    initrd: Option<&InitrdConfig>,
    num_cpus: u8,
    rsdp_addr: Option<GuestAddress>,
) -> Result<(), Error> {
    let cmdline_size = cmdline
        .as_cstring()
        .map_err(Error::Cmdline)?
        .as_bytes_with_nul()
        .len();
    if cmdline_size > CMDLINE_MAX_SIZE {
        return Err(Error::CmdlineTooLong {
            len: cmdline_size,
            limit: CMDLINE_MAX_SIZE,
        });
    }
    if let Some(hdr) = &entry.setup_header {
        let (version, max) = (hdr.version, hdr.cmdline_size);
        if version >= BOOT_PROTOCOL_2_06 && cmdline_size - 1 > max as usize {
            return Err(Error::CmdlineTooLongForKernel {
                len: cmdline_size - 1,
                max,
            });
        }
    }
    if let Some(initrd) = initrd {
        check_initrd(entry, initrd)?;
    }

    load_cmdline(mem, GuestAddress(CMDLINE_START), cmdline).map_err(|source| {
        Error::CmdlineWrite {
            addr: CMDLINE_START,
            source,
        }
    })?;
    mptable::setup_mptable(mem, num_cpus)?;

    let rsdp = rsdp_addr.map_or(0, |a| a.raw_value());
    match entry.protocol {
        BootProtocol::LinuxBoot => configure_64bit_boot(mem, entry, cmdline_size, initrd, rsdp),
        BootProtocol::PvhBoot => configure_pvh(mem, initrd, rsdp),
    }
}

fn check_initrd(entry: &KernelEntry, initrd: &InitrdConfig) -> Result<(), Error> {
    let initrd_start = initrd.address.raw_value();
    let initrd_end = initrd_start.saturating_add(initrd.size as u64);
    let kernel_start = entry.kernel_load.raw_value();
    if initrd_start < entry.kernel_end && kernel_start < initrd_end {
        return Err(Error::InitrdOverlapsKernel {
            initrd_start,
            initrd_end,
            kernel_start,
            kernel_end: entry.kernel_end,
        });
    }
    if let Some(hdr) = &entry.setup_header {
        let (max, xloadflags) = (hdr.initrd_addr_max, hdr.xloadflags);
        if xloadflags & XLF_CAN_BE_LOADED_ABOVE_4G == 0
            && initrd_end.saturating_sub(1) > u64::from(max)
        {
            // Only the 32-bit entry path needs this; the 64-bit kernel
            // reserves and, if needed, relocates the initrd itself.
            log::warn!(
                "initrd ends at {initrd_end:#x}, above the kernel's initrd_addr_max {max:#x}"
            );
        }
    }
    Ok(())
}

/// The part of a bzImage setup header that is really header: the rest of
/// the `setup_header` struct read from the image may be setup code for
/// older protocol versions, so it is cleared.
fn trimmed_setup_header(hdr: &setup_header) -> setup_header {
    let mut hdr = *hdr;
    let end = SETUP_HEADER_END_BASE + usize::from(hdr.jump >> 8) - SETUP_HEADER_OFFSET;
    let bytes = hdr.as_mut_slice();
    if end < bytes.len() {
        bytes[end..].fill(0);
    }
    hdr
}

fn configure_64bit_boot(
    mem: &GuestMemoryMmap,
    entry: &KernelEntry,
    cmdline_size: usize,
    initrd: Option<&InitrdConfig>,
    rsdp: u64,
) -> Result<(), Error> {
    let mut params = boot_params::default();
    if let Some(hdr) = &entry.setup_header {
        params.hdr = trimmed_setup_header(hdr);
    }
    params.acpi_rsdp_addr = rsdp;
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    // CMDLINE_START is a constant below 1 MiB and the size is at most 2048.
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_size as u32;
    if params.hdr.kernel_alignment == 0 {
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    if let Some(initrd) = initrd {
        // load_initrd places the initrd below the 32-bit MMIO gap.
        params.hdr.ramdisk_image = initrd.address.raw_value() as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
    }

    let e820 = e820_map(mem);
    if e820.len() > params.e820_table.len() {
        return Err(Error::TooManyE820Entries(e820.len()));
    }
    for (slot, e) in params.e820_table.iter_mut().zip(&e820) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    // At most 128, checked above.
    params.e820_entries = e820.len() as u8;

    LinuxBootConfigurator::write_bootparams(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(Error::BootParams)
}

fn configure_pvh(
    mem: &GuestMemoryMmap,
    initrd: Option<&InitrdConfig>,
    rsdp: u64,
) -> Result<(), Error> {
    let memmap: Vec<hvm_memmap_table_entry> = e820_map(mem)
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        })
        .collect();
    let modules: Vec<hvm_modlist_entry> = initrd
        .iter()
        .map(|i| hvm_modlist_entry {
            paddr: i.address.raw_value(),
            size: i.size as u64,
            cmdline_paddr: 0,
            reserved: 0,
        })
        .collect();
    // The memory map must not run into whatever follows the zero page slot.
    debug_assert!(memmap.len() * size_of::<hvm_memmap_table_entry>() <= 0x1000);

    let start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        flags: 0,
        nr_modules: modules.len() as u32,
        modlist_paddr: if modules.is_empty() { 0 } else { MODLIST_START },
        cmdline_paddr: CMDLINE_START,
        rsdp_paddr: rsdp,
        memmap_paddr: MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        reserved: 0,
    };
    let mut params = BootParams::new(&start_info, GuestAddress(PVH_INFO_START));
    params.set_sections(&memmap, GuestAddress(MEMMAP_START));
    if !modules.is_empty() {
        params.set_modules(&modules, GuestAddress(MODLIST_START));
    }
    PvhBootConfigurator::write_bootparams(&params, mem).map_err(Error::BootParams)
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use linux_loader::loader::bootparam::boot_params;
    use vm_memory::Bytes;

    use super::*;
    use crate::layout::MPTABLE_START;
    use crate::mptable::MpfIntel;
    use crate::test_images::{bzimage, bzimage_header, mem, read, simple_elf};
    use crate::{load_initrd, load_kernel};

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn ram(addr: u64, size: u64) -> E820Entry {
        E820Entry {
            addr,
            size,
            kind: E820_RAM,
        }
    }

    fn reserved(addr: u64, size: u64) -> E820Entry {
        E820Entry {
            addr,
            size,
            kind: E820_RESERVED,
        }
    }

    fn fixed_entries() -> Vec<E820Entry> {
        vec![
            ram(0, 0x9fc00),
            reserved(0x9fc00, 0xe0000 - 0x9fc00),
            reserved(0xeec0_0000, 256 * MIB),
        ]
    }

    #[test]
    fn e820_64_mib() {
        let mut expected = fixed_entries();
        expected.push(ram(MIB, 63 * MIB));
        assert_eq!(e820_map(&mem(64)), expected);
    }

    #[test]
    fn e820_exactly_3_gib() {
        let mut expected = fixed_entries();
        expected.push(ram(MIB, 3 * GIB - MIB));
        assert_eq!(e820_map(&mem(3 * 1024)), expected);
    }

    #[test]
    fn e820_4_gib() {
        let mut expected = fixed_entries();
        expected.push(ram(4 * GIB, GIB));
        expected.push(ram(MIB, 3 * GIB - MIB));
        assert_eq!(e820_map(&mem(4 * 1024)), expected);
    }

    #[test]
    fn e820_5_gib() {
        let mut expected = fixed_entries();
        expected.push(ram(4 * GIB, 2 * GIB));
        expected.push(ram(MIB, 3 * GIB - MIB));
        assert_eq!(e820_map(&mem(5 * 1024)), expected);
    }

    #[test]
    fn e820_past_the_64bit_gap() {
        // Regions are only mapped, never touched, so this costs no RAM.
        let mem = mem(300 * 1024);
        let mut expected = fixed_entries();
        expected.push(ram(512 * GIB, 45 * GIB));
        expected.push(ram(4 * GIB, 252 * GIB));
        expected.push(ram(MIB, 3 * GIB - MIB));
        assert_eq!(e820_map(&mem), expected);
    }

    #[test]
    fn e820_ram_matches_guest_memory() {
        use vm_memory::GuestMemoryRegion;
        for mib in [64, 3 * 1024, 4 * 1024, 5 * 1024] {
            let mem = mem(mib);
            let ram_bytes: u64 = e820_map(&mem)
                .iter()
                .filter(|e| e.kind == E820_RAM)
                .map(|e| e.size)
                .sum();
            let mem_bytes: u64 = mem.iter().map(|r| r.len()).sum();
            // Only the legacy hole [0x9fc00, 1 MiB) is held back.
            assert_eq!(ram_bytes, mem_bytes - (MIB - 0x9fc00), "{mib} MiB");
        }
    }

    fn zero_page(mem: &GuestMemoryMmap) -> boot_params {
        mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap()
    }

    fn cmdline(s: &str) -> Cmdline {
        cmdline_from_str(s).unwrap()
    }

    #[test]
    fn zero_page_for_an_elf() {
        let mem = mem(128);
        let entry = load_kernel(&mem, &mut Cursor::new(simple_elf(None))).unwrap();
        let initrd = load_initrd(&mem, &mut Cursor::new(vec![1u8; 5000])).unwrap();
        let line = "console=ttyS0 reboot=k panic=1";
        configure_system(&mem, &entry, &cmdline(line), Some(&initrd), 2).unwrap();

        let params = zero_page(&mem);
        assert_eq!({ params.hdr.type_of_loader }, 0xff);
        assert_eq!({ params.hdr.boot_flag }, 0xaa55);
        assert_eq!({ params.hdr.header }, 0x5372_6448);
        assert_eq!({ params.hdr.cmd_line_ptr }, 0x20000);
        assert_eq!({ params.hdr.cmdline_size } as usize, line.len() + 1);
        assert_eq!({ params.hdr.kernel_alignment }, 0x100_0000);
        assert_eq!(
            { params.hdr.ramdisk_image } as u64,
            initrd.address.raw_value()
        );
        assert_eq!({ params.hdr.ramdisk_size }, 5000);
        assert_eq!({ params.hdr.loadflags }, 0);
        assert_eq!({ params.acpi_rsdp_addr }, 0);

        let expected = e820_map(&mem);
        assert_eq!(usize::from(params.e820_entries), expected.len());
        for (got, want) in params.e820_table.iter().zip(&expected) {
            assert_eq!(
                ({ got.addr }, { got.size }, { got.r#type }),
                (want.addr, want.size, want.kind)
            );
        }
        assert_eq!({ params.e820_table[expected.len()].size }, 0);

        let mut want = line.as_bytes().to_vec();
        want.push(0);
        assert_eq!(read(&mem, CMDLINE_START, want.len()), want);

        let mpf: MpfIntel = mem.read_obj(GuestAddress(MPTABLE_START)).unwrap();
        assert_eq!(&mpf.signature, b"_MP_");
    }

    #[test]
    fn zero_page_for_a_bzimage() {
        let mem = mem(64);
        let mut hdr = bzimage_header(3);
        hdr.jump = 0x62eb; // header ends at 0x264: protocol 2.10-style.
        hdr.kernel_info_offset = 0x1234_5678;
        let entry = load_kernel(&mem, &mut Cursor::new(bzimage(&hdr, 0x800))).unwrap();
        configure_system_with_rsdp(
            &mem,
            &entry,
            &cmdline("console=ttyS0"),
            None,
            1,
            Some(GuestAddress(0xe0000)),
        )
        .unwrap();

        let params = zero_page(&mem);
        // Copied from the image.
        assert_eq!({ params.hdr.version }, 0x020f);
        assert_eq!({ params.hdr.setup_sects }, 3);
        assert_eq!({ params.hdr.xloadflags }, 3);
        assert_eq!({ params.hdr.loadflags }, 1);
        assert_eq!({ params.hdr.kernel_alignment }, 0x20_0000);
        assert_eq!({ params.hdr.pref_address }, 0x100_0000);
        assert_eq!({ params.hdr.code32_start }, 0x10_0000);
        // Past the end of the header: not copied.
        assert_eq!({ params.hdr.kernel_info_offset }, 0);
        // Written by the loader.
        assert_eq!({ params.hdr.type_of_loader }, 0xff);
        assert_eq!({ params.hdr.cmd_line_ptr }, 0x20000);
        assert_eq!({ params.hdr.cmdline_size }, 14);
        assert_eq!({ params.hdr.ramdisk_image }, 0);
        assert_eq!({ params.acpi_rsdp_addr }, 0xe0000);
        assert_eq!(usize::from(params.e820_entries), e820_map(&mem).len());
    }

    #[test]
    fn pvh_start_info_and_memmap() {
        let mem = mem(5 * 1024);
        let entry = load_kernel(&mem, &mut Cursor::new(simple_elf(Some(0x100_0040)))).unwrap();
        assert_eq!(entry.protocol, BootProtocol::PvhBoot);
        let initrd = load_initrd(&mem, &mut Cursor::new(vec![9u8; 0x1800])).unwrap();
        configure_system(&mem, &entry, &cmdline("root=/dev/vda"), Some(&initrd), 4).unwrap();

        let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(info.magic, 0x336e_c578);
        assert_eq!(info.version, 1);
        assert_eq!(info.cmdline_paddr, CMDLINE_START);
        assert_eq!(info.memmap_paddr, MEMMAP_START);
        assert_eq!(info.rsdp_paddr, 0);
        assert_eq!(info.nr_modules, 1);
        assert_eq!(info.modlist_paddr, MODLIST_START);

        let expected = e820_map(&mem);
        assert_eq!(info.memmap_entries as usize, expected.len());
        for (i, want) in expected.iter().enumerate() {
            let addr = MEMMAP_START + (i * size_of::<hvm_memmap_table_entry>()) as u64;
            let got: hvm_memmap_table_entry = mem.read_obj(GuestAddress(addr)).unwrap();
            assert_eq!(
                (got.addr, got.size, got.type_),
                (want.addr, want.size, want.kind)
            );
        }

        let module: hvm_modlist_entry = mem.read_obj(GuestAddress(MODLIST_START)).unwrap();
        assert_eq!(module.paddr, initrd.address.raw_value());
        assert_eq!(module.size, 0x1800);
        assert_eq!(read(&mem, CMDLINE_START, 14), b"root=/dev/vda\0");
    }

    #[test]
    fn pvh_without_initrd_has_no_module_list() {
        let mem = mem(64);
        let entry = load_kernel(&mem, &mut Cursor::new(simple_elf(Some(0x100_0040)))).unwrap();
        configure_system_with_rsdp(
            &mem,
            &entry,
            &new_cmdline(),
            None,
            1,
            Some(GuestAddress(0xe0000)),
        )
        .unwrap();
        let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!((info.nr_modules, info.modlist_paddr), (0, 0));
        assert_eq!(info.rsdp_paddr, 0xe0000);
        assert_eq!(read(&mem, CMDLINE_START, 1), [0]);
    }

    #[test]
    fn command_line_over_2048_bytes() {
        let long = "x".repeat(2048);
        let err = cmdline_from_str(&long).unwrap_err();
        assert_eq!(
            err.to_string(),
            "command line is 2049 bytes, the limit is 2048"
        );
        assert!(new_cmdline().insert_str(&long).is_err());

        // 2047 characters plus the NUL is exactly the limit.
        let fits = "y".repeat(2047);
        let line = cmdline_from_str(&fits).unwrap();
        let mem = mem(64);
        let entry = load_kernel(&mem, &mut Cursor::new(simple_elf(None))).unwrap();
        configure_system(&mem, &entry, &line, None, 1).unwrap();
        assert_eq!({ zero_page(&mem).hdr.cmdline_size }, 2048);

        // A command line built with a larger capacity is refused too.
        let mut big = Cmdline::new(4096).unwrap();
        big.insert_str(&long).unwrap();
        let err = configure_system(&mem, &entry, &big, None, 1).unwrap_err();
        assert!(matches!(
            err,
            Error::CmdlineTooLong {
                len: 2049,
                limit: 2048
            }
        ));
    }

    #[test]
    fn command_line_longer_than_the_bzimage_accepts() {
        let mem = mem(64);
        let mut hdr = bzimage_header(3);
        hdr.cmdline_size = 10;
        let entry = load_kernel(&mem, &mut Cursor::new(bzimage(&hdr, 0x800))).unwrap();
        let err = configure_system(&mem, &entry, &cmdline("console=ttyS0"), None, 1).unwrap_err();
        assert!(
            matches!(err, Error::CmdlineTooLongForKernel { len: 13, max: 10 }),
            "{err}"
        );
    }

    #[test]
    fn initrd_overlapping_the_kernel_is_refused() {
        let mem = mem(64);
        let entry = load_kernel(&mem, &mut Cursor::new(simple_elf(None))).unwrap();
        let initrd = InitrdConfig {
            address: GuestAddress(0x100_4000),
            size: 0x2000,
        };
        let err = configure_system(&mem, &entry, &new_cmdline(), Some(&initrd), 1).unwrap_err();
        assert!(matches!(err, Error::InitrdOverlapsKernel { .. }), "{err}");
    }

    #[test]
    fn bad_cpu_count_is_reported() {
        let mem = mem(64);
        let entry = load_kernel(&mem, &mut Cursor::new(simple_elf(None))).unwrap();
        let err = configure_system(&mem, &entry, &new_cmdline(), None, 255).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid vCPU count 255: the MP table describes 1 to 254 vCPUs"
        );
    }
}
