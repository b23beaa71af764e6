//! Just enough ELF64 parsing to check what the tests feed ember: the header,
//! the program headers and the PVH entry note.
//!
//! References: System V gABI (ELF header, program header, note layout) and
//! Xen's `public/elfnote.h` (`XEN_ELFNOTE_PHYS32_ENTRY`).

/// `PT_LOAD`: a loadable segment.
pub const PT_LOAD: u32 = 1;
/// `PT_NOTE`: a segment of notes.
pub const PT_NOTE: u32 = 4;
/// `XEN_ELFNOTE_PHYS32_ENTRY`: the note, owned by "Xen", that holds the
/// 32-bit physical PVH entry point (Xen `public/elfnote.h`).
pub const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

/// Why bytes are not the ELF64 file the tests need.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The file is shorter than a structure it must contain.
    #[error("truncated ELF: {what} needs bytes {start}..{end} but the file has {len}")]
    Truncated {
        /// The structure being read.
        what: &'static str,
        /// First byte of the structure.
        start: u64,
        /// One past its last byte.
        end: u64,
        /// Size of the file.
        len: usize,
    },
    /// The identification bytes are not those of a little-endian ELF64.
    #[error("not a little-endian ELF64 file (e_ident starts with {0:02x?})")]
    BadIdent([u8; 6]),
}

/// One program header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// `p_type` ([`PT_LOAD`], [`PT_NOTE`], ...).
    pub kind: u32,
    /// `p_offset`: where the segment's bytes start in the file.
    pub offset: u64,
    /// `p_vaddr`.
    pub vaddr: u64,
    /// `p_paddr`: the load address the VMM uses.
    pub paddr: u64,
    /// `p_filesz`.
    pub filesz: u64,
    /// `p_memsz`.
    pub memsz: u64,
}

/// The parts of an ELF64 file header the tests look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Elf64 {
    /// `e_type` (2 = `ET_EXEC`).
    pub kind: u16,
    /// `e_machine` (62 = `EM_X86_64`).
    pub machine: u16,
    /// `e_entry`.
    pub entry: u64,
    /// The program headers.
    pub segments: Vec<Segment>,
}

fn slice<'a>(bytes: &'a [u8], what: &'static str, start: u64, len: u64) -> Result<&'a [u8], Error> {
    let end = start.saturating_add(len);
    let err = || Error::Truncated {
        what,
        start,
        end,
        len: bytes.len(),
    };
    let s = usize::try_from(start).map_err(|_| err())?;
    let e = usize::try_from(end).map_err(|_| err())?;
    bytes.get(s..e).ok_or_else(err)
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(v)
}

impl Elf64 {
    /// Parses the file header and program headers of `bytes`.
    pub fn parse(bytes: &[u8]) -> Result<Self, Error> {
        // Offsets and sizes below are the gABI's Elf64_Ehdr / Elf64_Phdr.
        let hdr = slice(bytes, "ELF header", 0, 64)?;
        // \x7fELF, ELFCLASS64 (2), ELFDATA2LSB (1)
        if hdr[..6] != [0x7f, b'E', b'L', b'F', 2, 1] {
            let mut ident = [0u8; 6];
            ident.copy_from_slice(&hdr[..6]);
            return Err(Error::BadIdent(ident));
        }
        let phoff = u64_at(hdr, 0x20);
        let phentsize = u64::from(u16_at(hdr, 0x36)).max(56);
        let phnum = u64::from(u16_at(hdr, 0x38));
        let mut segments = Vec::new();
        for i in 0..phnum {
            let start = phoff.saturating_add(i * phentsize);
            let ph = slice(bytes, "program header", start, 56)?;
            segments.push(Segment {
                kind: u32_at(ph, 0),
                offset: u64_at(ph, 0x08),
                vaddr: u64_at(ph, 0x10),
                paddr: u64_at(ph, 0x18),
                filesz: u64_at(ph, 0x20),
                memsz: u64_at(ph, 0x28),
            });
        }
        Ok(Self {
            kind: u16_at(hdr, 0x10),
            machine: u16_at(hdr, 0x12),
            entry: u64_at(hdr, 0x18),
            segments,
        })
    }

    /// The PVH entry point from a `XEN_ELFNOTE_PHYS32_ENTRY` note in a
    /// `PT_NOTE` segment, if there is one. Malformed notes end the search.
    pub fn pvh_entry(&self, bytes: &[u8]) -> Option<u32> {
        self.segments
            .iter()
            .filter(|s| s.kind == PT_NOTE)
            .find_map(|s| {
                let notes = slice(bytes, "note segment", s.offset, s.filesz).ok()?;
                find_note(notes, b"Xen", XEN_ELFNOTE_PHYS32_ENTRY)
                    .and_then(|desc| desc.get(..4))
                    .map(|d| u32::from_le_bytes([d[0], d[1], d[2], d[3]]))
            })
    }

    /// Whether the file has a PVH entry note (see [`Elf64::pvh_entry`]).
    pub fn has_pvh_note(&self, bytes: &[u8]) -> bool {
        self.pvh_entry(bytes).is_some()
    }
}

/// The descriptor of the first note named `name` with type `kind` in a
/// sequence of Elf64 notes (namesz, descsz, type, name, desc; each padded to
/// 4 bytes).
fn find_note<'a>(mut notes: &'a [u8], name: &[u8], kind: u32) -> Option<&'a [u8]> {
    let pad = |n: usize| n.checked_add(3).map(|n| n & !3);
    while notes.len() >= 12 {
        let namesz = usize::try_from(u32_at(notes, 0)).ok()?;
        let descsz = usize::try_from(u32_at(notes, 4)).ok()?;
        let ty = u32_at(notes, 8);
        let name_end = 12usize.checked_add(pad(namesz)?)?;
        let desc_end = name_end.checked_add(pad(descsz)?)?;
        let note_name = notes.get(12..12 + namesz)?;
        let desc = notes.get(name_end..name_end + descsz)?;
        if ty == kind && note_name.strip_suffix(&[0]).unwrap_or(note_name) == name {
            return Some(desc);
        }
        notes = notes.get(desc_end..)?;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn note(name: &[u8], kind: u32, desc: &[u8]) -> Vec<u8> {
        let mut n = Vec::new();
        n.extend_from_slice(&(name.len() as u32).to_le_bytes());
        n.extend_from_slice(&(desc.len() as u32).to_le_bytes());
        n.extend_from_slice(&kind.to_le_bytes());
        n.extend_from_slice(name);
        n.resize(n.len().next_multiple_of(4), 0);
        n.extend_from_slice(desc);
        n.resize(n.len().next_multiple_of(4), 0);
        n
    }

    /// A minimal ELF64 with one PT_NOTE segment holding `notes`.
    fn elf_with_notes(notes: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 64 + 56];
        f[..6].copy_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1]);
        f[0x10..0x12].copy_from_slice(&2u16.to_le_bytes());
        f[0x12..0x14].copy_from_slice(&62u16.to_le_bytes());
        f[0x18..0x20].copy_from_slice(&0x100_0000u64.to_le_bytes());
        f[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        f[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        f[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        let ph = &mut f[64..];
        ph[..4].copy_from_slice(&PT_NOTE.to_le_bytes());
        ph[8..16].copy_from_slice(&120u64.to_le_bytes());
        ph[0x20..0x28].copy_from_slice(&(notes.len() as u64).to_le_bytes());
        f.extend_from_slice(notes);
        f
    }

    #[test]
    fn finds_the_pvh_entry_after_other_notes() {
        let mut notes = note(b"GNU\0", 3, &[1, 2, 3, 4, 5]);
        notes.extend(note(b"Xen\0", 17, &[9; 8]));
        notes.extend(note(
            b"Xen\0",
            XEN_ELFNOTE_PHYS32_ENTRY,
            &0x0100_0abcu32.to_le_bytes(),
        ));
        let f = elf_with_notes(&notes);
        let elf = Elf64::parse(&f).unwrap();
        assert_eq!(elf.machine, 62);
        assert_eq!(elf.entry, 0x100_0000);
        assert_eq!(elf.pvh_entry(&f), Some(0x0100_0abc));
    }

    #[test]
    fn no_pvh_entry_without_the_xen_note() {
        let f = elf_with_notes(&note(b"Linux\0", XEN_ELFNOTE_PHYS32_ENTRY, &[1, 0, 0, 0]));
        assert!(!Elf64::parse(&f).unwrap().has_pvh_note(&f));
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        assert!(matches!(
            Elf64::parse(b"MZ\x90\0"),
            Err(Error::Truncated { .. })
        ));
        assert!(matches!(Elf64::parse(&[0u8; 64]), Err(Error::BadIdent(_))));
        let mut f = elf_with_notes(&[]);
        f[0x38] = 50; // more program headers than the file holds
        assert!(matches!(Elf64::parse(&f), Err(Error::Truncated { .. })));
        // A note whose namesz runs past the segment.
        let mut bad = note(b"Xen\0", XEN_ELFNOTE_PHYS32_ENTRY, &[0; 4]);
        bad[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        let f = elf_with_notes(&bad);
        assert_eq!(Elf64::parse(&f).unwrap().pvh_entry(&f), None);
    }
}
