// SPDX-License-Identifier: Apache-2.0

//! Kernel and initrd loading.
//!
//! The image is first inspected here (format, truncation, whether it fits in
//! guest memory) so that a bad image fails with a message that names the
//! problem; the copy into guest memory itself is done by linux-loader's
//! [`Elf`] and [`BzImage`] loaders.

use std::io::{self, Read, Seek, SeekFrom};
use std::mem::size_of;

use linux_loader::elf::{
    Elf64_Ehdr, Elf64_Phdr, EI_CLASS, EI_DATA, ELFCLASS64, ELFDATA2LSB, ELFMAG, EM_X86_64, PT_LOAD,
    PT_NOTE,
};
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{BzImage, Elf, KernelLoader, PvhBootCapability};
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{
    Address, ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap,
    GuestMemoryRegion, ReadVolatile, VolatileMemoryError, VolatileSlice,
};

use crate::layout::{GUEST_PAGE_SIZE, HIMEM_START};
use crate::{BootProtocol, Error, KernelEntry};

/// Offset of the setup header in a bzImage (boot protocol: "The real-mode
/// kernel header").
const SETUP_HEADER_OFFSET: u64 = 0x1f1;
/// Offset of the `HdrS` magic.
const HDRS_OFFSET: u64 = 0x202;
/// `HdrS` read as a little-endian u32.
pub(crate) const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
/// The 64-bit entry point sits 0x200 bytes into the protected-mode kernel
/// (boot protocol 2.12+, "64-bit Boot Protocol").
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// xloadflags bit 0: the kernel has the 64-bit entry at 0x200.
const XLF_KERNEL_64: u16 = 1 << 0;
/// Boot protocol version that introduced xloadflags.
const BOOT_PROTOCOL_2_12: u16 = 0x020c;
/// Boot protocol version that introduced `pref_address` and `init_size`.
const BOOT_PROTOCOL_2_10: u16 = 0x020a;

/// Total size of guest memory in bytes.
pub(crate) fn mem_size(mem: &GuestMemoryMmap) -> u64 {
    mem.iter().map(|r| r.len()).sum()
}

pub(crate) fn mem_mib(mem: &GuestMemoryMmap) -> u64 {
    mem_size(mem) >> 20
}

/// Adapts any `Read + Seek` to the [`ReadVolatile`] the linux-loader loaders
/// need, by bouncing through a small buffer.
struct VolatileReader<'a, F> {
    inner: &'a mut F,
    buf: Vec<u8>,
}

impl<'a, F: Read + Seek> VolatileReader<'a, F> {
    const CHUNK: usize = 64 * 1024;

    fn new(inner: &'a mut F) -> Self {
        VolatileReader {
            inner,
            buf: vec![0; Self::CHUNK],
        }
    }
}

impl<F: Read> Read for VolatileReader<'_, F> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf)
    }
}

impl<F: Seek> Seek for VolatileReader<'_, F> {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        self.inner.seek(pos)
    }
}

impl<F: Read> ReadVolatile for VolatileReader<'_, F> {
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        // Fill all of `buf` unless the source ends first: vm-memory's
        // `read_exact_volatile_from` makes a single call per region and
        // treats a short count as an error (read(2) on a regular file
        // returns everything asked for).
        let mut done = 0;
        while done < buf.len() {
            let want = (buf.len() - done).min(self.buf.len());
            let mut got = 0;
            while got < want {
                match self.inner.read(&mut self.buf[got..want]) {
                    Ok(0) => break,
                    Ok(n) => got += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(VolatileMemoryError::IOError(e)),
                }
            }
            buf.offset(done)?.copy_from(&self.buf[..got]);
            done += got;
            if got < want {
                break;
            }
        }
        Ok(done)
    }
}

fn file_len<F: Seek>(image: &mut F) -> Result<u64, Error> {
    image.seek(SeekFrom::End(0)).map_err(Error::KernelRead)
}

/// Reads exactly `buf.len()` bytes at `offset`, or returns `Ok(false)` when
/// the file ends first.
fn read_at<F: Read + Seek>(image: &mut F, offset: u64, buf: &mut [u8]) -> Result<bool, Error> {
    image
        .seek(SeekFrom::Start(offset))
        .map_err(Error::KernelRead)?;
    match image.read_exact(buf) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(Error::KernelRead(e)),
    }
}

fn check_fits(mem: &GuestMemoryMmap, addr: u64, size: u64) -> Result<(), Error> {
    let fits = usize::try_from(size)
        .map(|len| mem.check_range(GuestAddress(addr), len))
        .unwrap_or(false);
    if fits {
        Ok(())
    } else {
        Err(Error::KernelDoesNotFit {
            size,
            addr,
            mem_mib: mem_mib(mem),
        })
    }
}

/// Loads the kernel in `kernel` into guest memory.
///
/// An ELF vmlinux is loaded at the physical addresses of its `PT_LOAD`
/// segments; if it carries a Xen `XEN_ELFNOTE_PHYS32_ENTRY` note it is
/// booted through PVH at that entry, otherwise through the 64-bit Linux
/// boot protocol at `e_entry`. A bzImage's protected-mode kernel is loaded
/// at [`HIMEM_START`] and entered at its 64-bit entry, 0x200 bytes in.
pub fn load_kernel<F: Read + Seek>(
    mem: &GuestMemoryMmap,
    kernel: &mut F,
) -> Result<KernelEntry, Error> {
    let len = file_len(kernel)?;
    let mut magic = [0u8; 4];
    if read_at(kernel, 0, &mut magic)? && &magic == ELFMAG {
        return load_elf(mem, kernel, len);
    }
    let mut hdrs = [0u8; 4];
    if read_at(kernel, HDRS_OFFSET, &mut hdrs)? && u32::from_le_bytes(hdrs) == KERNEL_HDR_MAGIC {
        return load_bzimage(mem, kernel, len);
    }
    Err(Error::UnknownKernelFormat)
}

fn truncated_elf(what: String, end: u64, file_len: u64) -> Error {
    Error::TruncatedElf {
        what,
        end,
        file_len,
    }
}

fn load_elf<F: Read + Seek>(
    mem: &GuestMemoryMmap,
    image: &mut F,
    len: u64,
) -> Result<KernelEntry, Error> {
    let mut ehdr = Elf64_Ehdr::default();
    if !read_at(image, 0, ehdr.as_mut_slice())? {
        return Err(truncated_elf(
            "the ELF header".into(),
            size_of::<Elf64_Ehdr>() as u64,
            len,
        ));
    }
    if ehdr.e_ident[EI_CLASS] != ELFCLASS64 {
        return Err(Error::UnsupportedElf(format!(
            "ELF class {} (expected 2, 64-bit)",
            ehdr.e_ident[EI_CLASS]
        )));
    }
    if ehdr.e_ident[EI_DATA] != ELFDATA2LSB {
        return Err(Error::UnsupportedElf(format!(
            "ELF data encoding {} (expected 1, little-endian)",
            ehdr.e_ident[EI_DATA]
        )));
    }
    if ehdr.e_machine != EM_X86_64 {
        return Err(Error::UnsupportedElf(format!(
            "machine {} (expected {EM_X86_64}, x86_64)",
            ehdr.e_machine
        )));
    }
    if usize::from(ehdr.e_phentsize) != size_of::<Elf64_Phdr>() {
        return Err(Error::UnsupportedElf(format!(
            "program header entry size {} (expected {})",
            ehdr.e_phentsize,
            size_of::<Elf64_Phdr>()
        )));
    }
    if ehdr.e_entry < HIMEM_START {
        return Err(Error::UnsupportedElf(format!(
            "entry point {:#x} is below {HIMEM_START:#x}, where the boot structures live",
            ehdr.e_entry
        )));
    }

    let ph_end = u64::from(ehdr.e_phnum)
        .checked_mul(size_of::<Elf64_Phdr>() as u64)
        .and_then(|size| size.checked_add(ehdr.e_phoff))
        .unwrap_or(u64::MAX);
    if ph_end > len {
        return Err(truncated_elf(
            format!("{} program headers", ehdr.e_phnum),
            ph_end,
            len,
        ));
    }

    let mut lowest_load: Option<u64> = None;
    let mut kernel_end = 0u64;
    for index in 0..u64::from(ehdr.e_phnum) {
        let mut phdr = Elf64_Phdr::default();
        let offset = ehdr.e_phoff + index * size_of::<Elf64_Phdr>() as u64;
        if !read_at(image, offset, phdr.as_mut_slice())? {
            return Err(truncated_elf(
                format!("program header {index}"),
                ph_end,
                len,
            ));
        }
        if phdr.p_type != PT_LOAD && phdr.p_type != PT_NOTE {
            continue;
        }
        let seg_end = phdr.p_offset.saturating_add(phdr.p_filesz);
        if seg_end > len {
            return Err(truncated_elf(format!("segment {index}"), seg_end, len));
        }
        let size = phdr.p_memsz.max(phdr.p_filesz);
        if phdr.p_type != PT_LOAD || size == 0 {
            continue;
        }
        // Below 1 MiB live the zero page, command line, page tables, MP and
        // ACPI tables: a segment there would overwrite them (or be
        // overwritten).
        if phdr.p_paddr < HIMEM_START {
            return Err(Error::UnsupportedElf(format!(
                "segment {index} loads at {:#x}, below {HIMEM_START:#x} where the boot structures live",
                phdr.p_paddr
            )));
        }
        // A segment without file data (pure bss) is not copied by
        // linux-loader, but the kernel still uses its memory.
        check_fits(mem, phdr.p_paddr, size)?;
        lowest_load = Some(lowest_load.map_or(phdr.p_paddr, |low| low.min(phdr.p_paddr)));
        kernel_end = kernel_end.max(phdr.p_paddr + size);
    }
    let Some(kernel_load) = lowest_load else {
        return Err(Error::UnsupportedElf(
            "no loadable (PT_LOAD) segment".to_string(),
        ));
    };

    let mut reader = VolatileReader::new(image);
    let result = Elf::load(mem, None, &mut reader, Some(GuestAddress(HIMEM_START)))
        .map_err(Error::KernelLoad)?;

    let (protocol, entry_addr) = match result.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(addr) => (BootProtocol::PvhBoot, addr),
        _ => (BootProtocol::LinuxBoot, GuestAddress(ehdr.e_entry)),
    };
    log::debug!(
        "loaded ELF kernel [{kernel_load:#x}, {kernel_end:#x}), {protocol:?} entry at {:#x}",
        entry_addr.raw_value()
    );
    Ok(KernelEntry {
        protocol,
        entry_addr,
        kernel_load: GuestAddress(kernel_load),
        kernel_end,
        setup_header: None,
    })
}

fn load_bzimage<F: Read + Seek>(
    mem: &GuestMemoryMmap,
    image: &mut F,
    len: u64,
) -> Result<KernelEntry, Error> {
    let mut hdr = setup_header::default();
    if !read_at(image, SETUP_HEADER_OFFSET, hdr.as_mut_slice())? {
        return Err(Error::TruncatedBzImage {
            what: "the setup header",
            end: SETUP_HEADER_OFFSET + size_of::<setup_header>() as u64,
            file_len: len,
        });
    }
    // Copy the packed fields out before using them.
    let (version, xloadflags) = (hdr.version, hdr.xloadflags);
    if version < BOOT_PROTOCOL_2_12 || xloadflags & XLF_KERNEL_64 == 0 {
        return Err(Error::BzImageNot64Bit {
            version,
            xloadflags,
        });
    }
    // Boot protocol: "setup_sects ... If this field is 0, the real value is 4."
    let setup_sects = match hdr.setup_sects {
        0 => 4,
        n => u64::from(n),
    };
    let setup_size = (setup_sects + 1) * 512;
    if setup_size >= len {
        return Err(Error::TruncatedBzImage {
            what: "the protected-mode kernel",
            end: setup_size + 1,
            file_len: len,
        });
    }
    let payload = len - setup_size;
    check_fits(mem, HIMEM_START, payload)?;

    // The decompressor runs at max(load address aligned to kernel_alignment,
    // pref_address) for a relocatable kernel, at pref_address otherwise, and
    // needs init_size bytes there (arch/x86/boot/compressed/head_64.S).
    let mut kernel_end = HIMEM_START + payload;
    if version >= BOOT_PROTOCOL_2_10 {
        let (pref, init_size, align) = (
            hdr.pref_address,
            u64::from(hdr.init_size),
            u64::from(hdr.kernel_alignment),
        );
        let run_at = if hdr.relocatable_kernel != 0 && align.is_power_of_two() {
            ((HIMEM_START + align - 1) & !(align - 1)).max(pref)
        } else {
            pref
        };
        if init_size > 0 {
            check_fits(mem, run_at, init_size)?;
            kernel_end = kernel_end.max(run_at + init_size);
        }
    }

    let mut reader = VolatileReader::new(image);
    let result = BzImage::load(
        mem,
        Some(GuestAddress(HIMEM_START)),
        &mut reader,
        Some(GuestAddress(HIMEM_START)),
    )
    .map_err(Error::KernelLoad)?;

    // kernel_load is HIMEM_START, so this cannot overflow.
    let entry_addr = result.kernel_load.unchecked_add(BZIMAGE_64BIT_ENTRY_OFFSET);
    log::debug!(
        "loaded bzImage (boot protocol {version:#x}) at {HIMEM_START:#x}, 64-bit entry at {:#x}",
        entry_addr.raw_value()
    );
    Ok(KernelEntry {
        protocol: BootProtocol::LinuxBoot,
        entry_addr,
        kernel_load: result.kernel_load,
        kernel_end,
        setup_header: result.setup_header,
    })
}

/// Where an initrd was loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitrdConfig {
    /// Guest physical address of the first byte.
    pub address: GuestAddress,
    /// Size in bytes.
    pub size: usize,
}

/// Loads an initrd at the top of low RAM (the guest memory region that
/// starts at 0, below the MMIO gap), page aligned, as Firecracker does.
pub fn load_initrd<F: Read + Seek>(
    mem: &GuestMemoryMmap,
    image: &mut F,
) -> Result<InitrdConfig, Error> {
    let size = image.seek(SeekFrom::End(0)).map_err(Error::InitrdRead)?;
    image.rewind().map_err(Error::InitrdRead)?;
    if size == 0 {
        return Err(Error::EmptyInitrd);
    }
    let low_ram = mem.find_region(GuestAddress(0)).map_or(0, |r| r.len());
    let address = low_ram
        .checked_sub(size)
        .map(|top| top & !(GUEST_PAGE_SIZE - 1))
        .filter(|addr| *addr >= HIMEM_START)
        .ok_or(Error::InitrdDoesNotFit { size, low_ram })?;
    // `size` fits below `low_ram`, itself the length of a mapped region.
    let size = size as usize;
    mem.read_exact_volatile_from(GuestAddress(address), &mut VolatileReader::new(image), size)
        .map_err(|source| Error::InitrdLoad { address, source })?;
    log::debug!("loaded initrd of {size} bytes at {address:#x}");
    Ok(InitrdConfig {
        address: GuestAddress(address),
        size,
    })
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use super::*;
    use crate::test_images::{bzimage, bzimage_header, elf, mem, read, simple_elf, Segment};

    #[test]
    fn elf_segment_below_himem_is_refused() {
        // Entry point above 1 MiB, but a segment over the zero page.
        let image = elf(
            0x100_0000,
            &[
                Segment {
                    paddr: 0x7000,
                    data: vec![0xaa; 16],
                    memsz: 16,
                },
                Segment {
                    paddr: 0x100_0000,
                    data: vec![0x90; 16],
                    memsz: 16,
                },
            ],
            None,
        );
        let mem = mem(64);
        let e = load_kernel(&mem, &mut Cursor::new(&image))
            .unwrap_err()
            .to_string();
        assert!(e.contains("loads at 0x7000"), "{e}");
        assert_eq!(read(&mem, 0x7000, 16), vec![0; 16], "nothing was written");
    }

    #[test]
    fn elf_without_pvh_note_boots_linux_protocol() {
        let mem = mem(64);
        let image = simple_elf(None);
        let entry = load_kernel(&mem, &mut Cursor::new(&image)).unwrap();
        assert_eq!(entry.protocol, BootProtocol::LinuxBoot);
        assert_eq!(entry.entry_addr, GuestAddress(0x100_0000));
        assert_eq!(entry.kernel_load, GuestAddress(0x100_0000));
        assert_eq!(entry.kernel_end, 0x100_5000);
        assert!(entry.setup_header.is_none());
        // The segment's file bytes are in guest memory at p_paddr.
        let data_at = image.len() - 0x3000;
        assert_eq!(read(&mem, 0x100_0000, 0x3000), image[data_at..]);
    }

    #[test]
    fn elf_with_pvh_note_boots_pvh() {
        let mem = mem(64);
        let image = simple_elf(Some(0x100_0abc));
        let entry = load_kernel(&mem, &mut Cursor::new(&image)).unwrap();
        assert_eq!(entry.protocol, BootProtocol::PvhBoot);
        assert_eq!(entry.entry_addr, GuestAddress(0x100_0abc));
        assert_eq!(entry.kernel_load, GuestAddress(0x100_0000));
    }

    #[test]
    fn elf_from_a_file() {
        let path = std::env::temp_dir().join(format!("ember-boot-elf-{}", std::process::id()));
        std::fs::write(&path, simple_elf(None)).unwrap();
        let mem = mem(64);
        let result = load_kernel(&mem, &mut std::fs::File::open(&path).unwrap());
        std::fs::remove_file(&path).unwrap();
        assert_eq!(result.unwrap().entry_addr, GuestAddress(0x100_0000));
    }

    #[test]
    fn images_larger_than_the_copy_buffer() {
        // Several times the 64 KiB bounce buffer, and not a multiple of it.
        let data: Vec<u8> = (0..0x4_1234u32).map(|i| (i % 239) as u8).collect();
        let mem = mem(64);
        let image = elf(
            0x100_0000,
            &[Segment {
                paddr: 0x100_0000,
                data: data.clone(),
                memsz: data.len() as u64,
            }],
            None,
        );
        load_kernel(&mem, &mut Cursor::new(&image)).unwrap();
        assert_eq!(read(&mem, 0x100_0000, data.len()), data);

        let image = bzimage(&bzimage_header(3), 0x3_0001);
        load_kernel(&mem, &mut Cursor::new(&image)).unwrap();
        assert_eq!(read(&mem, HIMEM_START, 0x3_0001), image[4 * 512..]);

        let initrd = load_initrd(&mem, &mut Cursor::new(&data)).unwrap();
        assert_eq!(read(&mem, initrd.address.raw_value(), data.len()), data);
    }

    #[test]
    fn elf_with_several_segments() {
        let mem = mem(64);
        let image = elf(
            0x200_0000,
            &[
                Segment {
                    paddr: 0x200_0000,
                    data: vec![0xaa; 0x100],
                    memsz: 0x100,
                },
                Segment {
                    paddr: 0x180_0000,
                    data: vec![0xbb; 0x200],
                    memsz: 0x1000,
                },
                // Pure bss: nothing to copy, but it is part of the kernel.
                Segment {
                    paddr: 0x300_0000,
                    data: vec![],
                    memsz: 0x1000,
                },
            ],
            None,
        );
        let entry = load_kernel(&mem, &mut Cursor::new(&image)).unwrap();
        assert_eq!(entry.kernel_load, GuestAddress(0x180_0000));
        assert_eq!(entry.kernel_end, 0x300_1000);
        assert_eq!(read(&mem, 0x180_0000, 0x200), vec![0xbb; 0x200]);
        assert_eq!(read(&mem, 0x200_0000, 0x100), vec![0xaa; 0x100]);
    }

    #[test]
    fn neither_elf_nor_bzimage() {
        let mem = mem(64);
        for image in [vec![], vec![0x42u8; 16], vec![0x42u8; 4096]] {
            let err = load_kernel(&mem, &mut Cursor::new(&image)).unwrap_err();
            assert!(matches!(err, Error::UnknownKernelFormat));
            assert_eq!(
                err.to_string(),
                "kernel image is neither an ELF vmlinux nor a bzImage"
            );
        }
    }

    #[test]
    fn truncated_elf_header() {
        let mem = mem(64);
        let image = simple_elf(None)[..40].to_vec();
        let err = load_kernel(&mem, &mut Cursor::new(&image)).unwrap_err();
        assert!(
            matches!(
                err,
                Error::TruncatedElf {
                    end: 64,
                    file_len: 40,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn truncated_elf_program_headers() {
        let mem = mem(64);
        // A valid header claiming program headers past the end of the file.
        let mut image = simple_elf(None);
        image.truncate(64 + 20);
        let err = load_kernel(&mem, &mut Cursor::new(&image)).unwrap_err();
        assert!(
            matches!(
                err,
                Error::TruncatedElf {
                    end: 120,
                    file_len: 84,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("truncated ELF"), "{err}");
    }

    #[test]
    fn truncated_elf_segment() {
        let mem = mem(64);
        let mut image = simple_elf(None);
        image.truncate(image.len() - 1);
        let err = load_kernel(&mem, &mut Cursor::new(&image)).unwrap_err();
        assert!(err.to_string().contains("segment 0 extend(s)"), "{err}");
    }

    #[test]
    fn unsupported_elves() {
        let mem = mem(64);
        let mut image = simple_elf(None);
        image[4] = 1; // ELFCLASS32
        let err = load_kernel(&mem, &mut Cursor::new(&image)).unwrap_err();
        assert!(err.to_string().contains("ELF class 1"), "{err}");

        let mut image = simple_elf(None);
        image[18] = 183; // EM_AARCH64
        let err = load_kernel(&mem, &mut Cursor::new(&image)).unwrap_err();
        assert!(err.to_string().contains("machine 183"), "{err}");

        let image = elf(0x1000, &[], None);
        let err = load_kernel(&mem, &mut Cursor::new(&image)).unwrap_err();
        assert!(err.to_string().contains("entry point 0x1000"), "{err}");

        let image = elf(0x100_0000, &[], None);
        let err = load_kernel(&mem, &mut Cursor::new(&image)).unwrap_err();
        assert!(err.to_string().contains("no loadable"), "{err}");
    }

    #[test]
    fn kernel_that_does_not_fit() {
        let mem = mem(8);
        let image = simple_elf(None);
        let err = load_kernel(&mem, &mut Cursor::new(&image)).unwrap_err();
        assert!(
            matches!(
                err,
                Error::KernelDoesNotFit {
                    size: 0x5000,
                    addr: 0x100_0000,
                    mem_mib: 8
                }
            ),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            "kernel (20480 bytes at 0x1000000) does not fit in guest memory of 8 MiB"
        );
    }

    #[test]
    fn kernel_bss_past_the_end_of_memory() {
        // The file bytes fit, the bss does not.
        let mem = mem(17);
        let image = elf(
            0x100_0000,
            &[Segment {
                paddr: 0x100_0000,
                data: vec![1; 0x1000],
                memsz: 0x20_0000,
            }],
            None,
        );
        let err = load_kernel(&mem, &mut Cursor::new(&image)).unwrap_err();
        assert!(
            matches!(
                err,
                Error::KernelDoesNotFit {
                    size: 0x20_0000,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn bzimage_loads_at_himem_with_64bit_entry() {
        let mem = mem(64);
        let hdr = bzimage_header(3);
        let image = bzimage(&hdr, 0x4321);
        let entry = load_kernel(&mem, &mut Cursor::new(&image)).unwrap();
        assert_eq!(entry.protocol, BootProtocol::LinuxBoot);
        assert_eq!(entry.kernel_load, GuestAddress(HIMEM_START));
        assert_eq!(entry.entry_addr, GuestAddress(0x10_0200));
        // Decompression runs at pref_address (16 MiB) for init_size bytes.
        assert_eq!(entry.kernel_end, 0x110_0000);
        let got = entry.setup_header.unwrap();
        assert_eq!({ got.version }, 0x020f);
        assert_eq!({ got.setup_sects }, 3);
        assert_eq!({ got.code32_start }, 0x10_0000);
        assert_eq!(read(&mem, HIMEM_START, 0x4321), image[4 * 512..]);
    }

    #[test]
    fn bzimage_with_zero_setup_sects_means_four() {
        let mem = mem(64);
        let image = bzimage(&bzimage_header(0), 0x800);
        load_kernel(&mem, &mut Cursor::new(&image)).unwrap();
        assert_eq!(read(&mem, HIMEM_START, 0x800), image[5 * 512..]);
    }

    #[test]
    fn bzimage_without_64bit_entry_is_refused() {
        let mem = mem(64);
        let mut hdr = bzimage_header(3);
        hdr.xloadflags = 0;
        let err = load_kernel(&mem, &mut Cursor::new(bzimage(&hdr, 0x800))).unwrap_err();
        assert!(
            matches!(
                err,
                Error::BzImageNot64Bit {
                    version: 0x020f,
                    xloadflags: 0
                }
            ),
            "{err}"
        );
        let mut hdr = bzimage_header(3);
        hdr.version = 0x0204;
        let err = load_kernel(&mem, &mut Cursor::new(bzimage(&hdr, 0x800))).unwrap_err();
        assert!(err.to_string().contains("version 0x0204"), "{err}");
    }

    #[test]
    fn truncated_bzimage() {
        let mem = mem(64);
        let image = bzimage(&bzimage_header(3), 0x800);
        let err = load_kernel(&mem, &mut Cursor::new(&image[..0x600])).unwrap_err();
        assert!(matches!(err, Error::TruncatedBzImage { .. }), "{err}");
    }

    #[test]
    fn bzimage_decompression_area_must_fit() {
        let mem = mem(16);
        let err =
            load_kernel(&mem, &mut Cursor::new(bzimage(&bzimage_header(3), 0x800))).unwrap_err();
        assert!(
            matches!(
                err,
                Error::KernelDoesNotFit {
                    addr: 0x100_0000,
                    size: 0x10_0000,
                    mem_mib: 16
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn initrd_goes_to_the_top_of_low_ram() {
        let mem = mem(64);
        let image: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        let initrd = load_initrd(&mem, &mut Cursor::new(&image)).unwrap();
        let expected = ((64 << 20) - 10_000) & !0xfff;
        assert_eq!(initrd.address, GuestAddress(expected));
        assert_eq!(initrd.size, 10_000);
        assert_eq!(read(&mem, expected, 10_000), image);
    }

    #[test]
    fn initrd_stays_below_the_mmio_gap() {
        let mem = mem(5 * 1024);
        let initrd = load_initrd(&mem, &mut Cursor::new(vec![7u8; 0x2345])).unwrap();
        assert_eq!(initrd.address, GuestAddress(0xc000_0000 - 0x3000));
    }

    #[test]
    fn initrd_errors() {
        let mem = mem(8);
        let err = load_initrd(&mem, &mut Cursor::new(Vec::new())).unwrap_err();
        assert!(matches!(err, Error::EmptyInitrd));
        let err = load_initrd(&mem, &mut Cursor::new(vec![0u8; 8 << 20])).unwrap_err();
        assert!(matches!(
            err,
            Error::InitrdDoesNotFit {
                size: 0x80_0000,
                low_ram: 0x80_0000
            }
        ));
        // It would have to go below 1 MiB.
        let err = load_initrd(&mem, &mut Cursor::new(vec![0u8; (7 << 20) + 1])).unwrap_err();
        assert!(matches!(err, Error::InitrdDoesNotFit { .. }), "{err}");
    }
}
