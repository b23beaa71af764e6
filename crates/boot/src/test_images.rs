// SPDX-License-Identifier: Apache-2.0

//! Minimal kernel images built in memory for the unit tests.

use std::mem::size_of;

use linux_loader::elf::{Elf64_Ehdr, Elf64_Nhdr, Elf64_Phdr, EM_X86_64, PT_LOAD, PT_NOTE};
use linux_loader::loader::bootparam::setup_header;
use vm_memory::{ByteValued, GuestAddress, GuestMemoryMmap};

/// Guest memory of `mib` MiB laid out like a real VM.
pub fn mem(mib: usize) -> GuestMemoryMmap {
    crate::create_guest_memory(mib).unwrap()
}

/// A `PT_LOAD` segment: physical address, file bytes, memory size.
pub struct Segment {
    pub paddr: u64,
    pub data: Vec<u8>,
    pub memsz: u64,
}

/// An ELF64 x86_64 executable with `segments` as `PT_LOAD`s and, when
/// `pvh_entry` is set, a `PT_NOTE` holding an unrelated GNU note followed
/// by the Xen `XEN_ELFNOTE_PHYS32_ENTRY` note (64-bit descriptor, as Linux
/// emits it with `_ASM_PTR`).
pub fn elf(entry: u64, segments: &[Segment], pvh_entry: Option<u32>) -> Vec<u8> {
    let mut notes = Vec::new();
    if let Some(pvh) = pvh_entry {
        let gnu = Elf64_Nhdr {
            n_namesz: 4,
            n_descsz: 4,
            n_type: 3,
        };
        notes.extend_from_slice(gnu.as_slice());
        notes.extend_from_slice(b"GNU\0");
        notes.extend_from_slice(&[1, 2, 3, 4]);
        let xen = Elf64_Nhdr {
            n_namesz: 4,
            n_descsz: 8,
            n_type: 18,
        };
        notes.extend_from_slice(xen.as_slice());
        notes.extend_from_slice(b"Xen\0");
        notes.extend_from_slice(&u64::from(pvh).to_le_bytes());
    }

    let phnum = segments.len() + usize::from(pvh_entry.is_some());
    let ehsize = size_of::<Elf64_Ehdr>();
    let phsize = size_of::<Elf64_Phdr>();
    let mut offset = (ehsize + phnum * phsize) as u64;

    let mut ident = [0u8; 16];
    ident[..7].copy_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1]);
    let ehdr = Elf64_Ehdr {
        e_ident: ident,
        e_type: 2,
        e_machine: EM_X86_64,
        e_version: 1,
        e_entry: entry,
        e_phoff: ehsize as u64,
        e_ehsize: ehsize as u16,
        e_phentsize: phsize as u16,
        e_phnum: phnum as u16,
        ..Default::default()
    };
    let mut out = ehdr.as_slice().to_vec();
    let mut payload = Vec::new();
    for seg in segments {
        let phdr = Elf64_Phdr {
            p_type: PT_LOAD,
            p_flags: 7,
            p_offset: offset,
            p_vaddr: seg.paddr,
            p_paddr: seg.paddr,
            p_filesz: seg.data.len() as u64,
            p_memsz: seg.memsz,
            p_align: 0x1000,
        };
        out.extend_from_slice(phdr.as_slice());
        payload.extend_from_slice(&seg.data);
        offset += seg.data.len() as u64;
    }
    if pvh_entry.is_some() {
        let phdr = Elf64_Phdr {
            p_type: PT_NOTE,
            p_offset: offset,
            p_filesz: notes.len() as u64,
            p_memsz: notes.len() as u64,
            p_align: 4,
            ..Default::default()
        };
        out.extend_from_slice(phdr.as_slice());
        payload.extend_from_slice(&notes);
    }
    out.extend_from_slice(&payload);
    out
}

/// A one-segment vmlinux-like ELF at 16 MiB.
pub fn simple_elf(pvh_entry: Option<u32>) -> Vec<u8> {
    elf(
        0x100_0000,
        &[Segment {
            paddr: 0x100_0000,
            data: (0..0x3000u32).map(|i| (i % 251) as u8).collect(),
            memsz: 0x5000,
        }],
        pvh_entry,
    )
}

/// The setup header of the fake bzImage: boot protocol 2.15, 64-bit entry,
/// relocatable, 16 MiB preferred address, 1 MiB init_size.
pub fn bzimage_header(setup_sects: u8) -> setup_header {
    setup_header {
        setup_sects,
        boot_flag: 0xaa55,
        // `jmp` over the header, which ends at 0x26c.
        jump: 0x6aeb,
        header: 0x5372_6448,
        version: 0x020f,
        loadflags: 0x01,
        code32_start: 0x10_0000,
        initrd_addr_max: 0x7fff_ffff,
        kernel_alignment: 0x20_0000,
        relocatable_kernel: 1,
        min_alignment: 21,
        xloadflags: 0x03,
        cmdline_size: 2047,
        pref_address: 0x100_0000,
        init_size: 0x10_0000,
        ..Default::default()
    }
}

/// A fake bzImage: `setup_sects + 1` sectors of real-mode code with `hdr` at
/// 0x1f1, then `payload` bytes of "protected-mode kernel".
pub fn bzimage(hdr: &setup_header, payload: usize) -> Vec<u8> {
    let setup_sects = match hdr.setup_sects {
        0 => 4,
        n => usize::from(n),
    };
    let setup = (setup_sects + 1) * 512;
    let mut image = vec![0u8; setup + payload];
    image[0x1f1..0x1f1 + size_of::<setup_header>()].copy_from_slice(hdr.as_slice());
    for (i, b) in image[setup..].iter_mut().enumerate() {
        *b = (i % 253) as u8 ^ 0x5a;
    }
    image
}

/// Reads `len` bytes of guest memory.
pub fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    use vm_memory::Bytes;
    let mut buf = vec![0u8; len];
    mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
    buf
}
