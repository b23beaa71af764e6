// SPDX-License-Identifier: Apache-2.0

//! Reads every table back from guest memory and checks it field by field;
//! the DSDT is decoded by a small AML parser, and `iasl -d` disassembles
//! the lot.

use std::path::Path as FsPath;
use std::process::Command;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::layout::{MPTABLE_START, SYSTEM_MEM_SIZE, SYSTEM_MEM_START, VIRTIO_MMIO_START};
use crate::mptable::setup_mptable;
use crate::test_images::mem;
use crate::{e820_map, E820_RESERVED};

// ---------------------------------------------------------------------------
// Reading tables back
// ---------------------------------------------------------------------------

fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
    buf
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

fn sum(b: &[u8]) -> u8 {
    b.iter().fold(0u8, |acc, x| acc.wrapping_add(*x))
}

/// A system description table read back: its address and bytes.
#[derive(Debug)]
struct Table {
    addr: u64,
    bytes: Vec<u8>,
}

impl Table {
    /// Reads the header's length, then the whole table.
    fn read(mem: &GuestMemoryMmap, addr: u64) -> Table {
        let header = read(mem, addr, 36);
        let len = u32_at(&header, 4) as usize;
        assert!(len >= 36, "table at {addr:#x} is {len} bytes");
        Table {
            addr,
            bytes: read(mem, addr, len),
        }
    }

    fn signature(&self) -> &[u8] {
        &self.bytes[0..4]
    }

    fn end(&self) -> u64 {
        self.addr + self.bytes.len() as u64
    }
}

/// Every table reachable from the RSDP, checked for the header fields all
/// tables share: length, checksum, OEM ID and OEM table ID.
struct Tables {
    rsdp: Vec<u8>,
    xsdt: Table,
    fadt: Table,
    madt: Table,
    dsdt: Table,
}

impl Tables {
    fn read(mem: &GuestMemoryMmap, rsdp_addr: GuestAddress) -> Tables {
        let rsdp = read(mem, rsdp_addr.0, 36);
        let xsdt = Table::read(mem, u64_at(&rsdp, 24));
        let entries: Vec<u64> = xsdt.bytes[36..]
            .chunks(8)
            .map(|e| u64::from_le_bytes(e.try_into().unwrap()))
            .collect();
        assert_eq!(entries.len(), 2, "XSDT lists the FADT and the MADT");
        let fadt = Table::read(mem, entries[0]);
        let madt = Table::read(mem, entries[1]);
        let dsdt = Table::read(mem, u64_at(&fadt.bytes, 140));
        let tables = Tables {
            rsdp,
            xsdt,
            fadt,
            madt,
            dsdt,
        };
        for t in tables.sdts() {
            assert_eq!(sum(&t.bytes), 0, "checksum of {:?}", t.signature());
            assert_eq!(&t.bytes[10..16], b"EMBER ");
            assert_eq!(&t.bytes[16..24], b"EMBERVM ");
            assert_eq!(u32_at(&t.bytes, 24), OEM_REVISION);
        }
        tables
    }

    fn sdts(&self) -> [&Table; 4] {
        [&self.xsdt, &self.fadt, &self.madt, &self.dsdt]
    }
}

fn devices(n: u32) -> Vec<VirtioMmioDeviceInfo> {
    (0..n)
        .map(|i| VirtioMmioDeviceInfo {
            addr: VIRTIO_MMIO_START + u64::from(i) * 0x1000,
            len: 0x1000,
            gsi: IRQ_BASE + i,
        })
        .collect()
}

/// Most devices the GSI range allows.
const MAX_DEVICES: u32 = IRQ_MAX - IRQ_BASE + 1;

// ---------------------------------------------------------------------------
// A parser for the AML subset the DSDT uses (ACPI 6.5 chapter 20)
// ---------------------------------------------------------------------------

#[derive(Debug, PartialEq)]
enum Value {
    Int(u64),
    Str(String),
    Buffer(Vec<u8>),
}

#[derive(Debug)]
enum Node {
    Device {
        path: String,
        children: Vec<Node>,
    },
    Name {
        name: String,
        value: Value,
    },
    Method {
        name: String,
        flags: u8,
        body: Vec<u8>,
    },
}

struct Aml<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Aml<'a> {
    fn byte(&mut self) -> u8 {
        let v = self.b[self.at];
        self.at += 1;
        v
    }

    fn take(&mut self, n: usize) -> &'a [u8] {
        let v = &self.b[self.at..self.at + n];
        self.at += n;
        v
    }

    /// PkgLength (section 20.2.4): returns the end offset of the package,
    /// which the encoded length counts from the PkgLength's first byte.
    fn pkg_end(&mut self) -> usize {
        let start = self.at;
        let lead = self.byte();
        let follow = lead >> 6;
        let len = if follow == 0 {
            usize::from(lead & 0x3f)
        } else {
            let mut len = usize::from(lead & 0x0f);
            for i in 0..follow {
                len |= usize::from(self.byte()) << (4 + 8 * i);
            }
            len
        };
        start + len
    }

    /// NameString (section 20.2.2), rendered the way ASL writes it.
    fn name_string(&mut self) -> String {
        let mut out = String::new();
        while self.b[self.at] == b'\\' || self.b[self.at] == b'^' {
            out.push(self.byte() as char);
        }
        let segs = match self.b[self.at] {
            0x2e => {
                self.at += 1;
                2
            }
            0x2f => {
                self.at += 1;
                usize::from(self.byte())
            }
            0x00 => {
                self.at += 1;
                0
            }
            _ => 1,
        };
        let parts: Vec<String> = (0..segs)
            .map(|_| String::from_utf8(self.take(4).to_vec()).unwrap())
            .collect();
        out + &parts.join(".")
    }

    /// DataRefObject: integers, strings and buffers.
    fn data(&mut self) -> Value {
        match self.byte() {
            0x00 => Value::Int(0),
            0x01 => Value::Int(1),
            0xff => Value::Int(u64::MAX),
            0x0a => Value::Int(u64::from(self.byte())),
            0x0b => Value::Int(u64::from(u16_at(self.take(2), 0))),
            0x0c => Value::Int(u64::from(u32_at(self.take(4), 0))),
            0x0e => Value::Int(u64_at(self.take(8), 0)),
            0x0d => {
                let len = self.b[self.at..].iter().position(|&c| c == 0).unwrap();
                let s = String::from_utf8(self.take(len).to_vec()).unwrap();
                self.at += 1;
                Value::Str(s)
            }
            0x11 => {
                let end = self.pkg_end();
                let Value::Int(size) = self.data() else {
                    panic!("buffer size is not an integer");
                };
                let bytes = self.take(end - self.at).to_vec();
                assert_eq!(bytes.len() as u64, size, "buffer size");
                Value::Buffer(bytes)
            }
            op => panic!("unexpected data opcode {op:#x} at {}", self.at - 1),
        }
    }

    fn term_list(&mut self, end: usize) -> Vec<Node> {
        let mut nodes = Vec::new();
        while self.at < end {
            let node = match self.byte() {
                0x08 => Node::Name {
                    name: self.name_string(),
                    value: self.data(),
                },
                0x14 => {
                    let end = self.pkg_end();
                    let name = self.name_string();
                    let flags = self.byte();
                    let body = self.take(end - self.at).to_vec();
                    Node::Method { name, flags, body }
                }
                0x5b => {
                    assert_eq!(self.byte(), 0x82, "only DeviceOp follows ExtOpPrefix");
                    let end = self.pkg_end();
                    let path = self.name_string();
                    let children = self.term_list(end);
                    Node::Device { path, children }
                }
                op => panic!("unexpected opcode {op:#x} at {}", self.at - 1),
            };
            nodes.push(node);
        }
        assert_eq!(self.at, end, "term list overruns its package");
        nodes
    }
}

fn parse_dsdt(dsdt: &[u8]) -> Vec<Node> {
    let mut aml = Aml { b: dsdt, at: 36 };
    aml.term_list(dsdt.len())
}

/// Resource descriptors of a `_CRS` buffer (ACPI 6.5 section 6.4), as
/// (tag, payload) up to the end tag, whose checksum must be 0 ("valid").
fn resources(buf: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    let mut at = 0;
    loop {
        let tag = buf[at];
        if tag & 0x80 != 0 {
            let len = usize::from(u16_at(buf, at + 1));
            out.push((tag, buf[at + 3..at + 3 + len].to_vec()));
            at += 3 + len;
        } else {
            let len = usize::from(tag & 7);
            if tag >> 3 == 0x0f {
                assert_eq!(len, 1);
                assert_eq!(buf[at + 1], 0, "end tag checksum");
                assert_eq!(at + 2, buf.len(), "bytes after the end tag");
                return out;
            }
            out.push((tag, buf[at + 1..at + 1 + len].to_vec()));
            at += 1 + len;
        }
    }
}

/// Decodes a compressed EISA ID (ACPI 6.5 section 6.1.5).
fn eisa_id(value: u64) -> String {
    let v = (value as u32).swap_bytes();
    let letter = |shift: u32| (((v >> shift) & 0x1f) as u8 + 0x40) as char;
    format!(
        "{}{}{}{:04X}",
        letter(26),
        letter(21),
        letter(16),
        v & 0xffff
    )
}

struct DeviceView<'a> {
    path: &'a str,
    children: &'a [Node],
}

impl DeviceView<'_> {
    fn name(&self, name: &str) -> &Value {
        self.children
            .iter()
            .find_map(|n| match n {
                Node::Name { name: n, value } if n == name => Some(value),
                _ => None,
            })
            .unwrap_or_else(|| panic!("{} has no {name}", self.path))
    }

    fn crs(&self) -> Vec<(u8, Vec<u8>)> {
        match self.name("_CRS") {
            Value::Buffer(b) => resources(b),
            v => panic!("{}._CRS is {v:?}", self.path),
        }
    }
}

fn devices_of(nodes: &[Node]) -> Vec<DeviceView<'_>> {
    nodes
        .iter()
        .map(|n| match n {
            Node::Device { path, children } => DeviceView { path, children },
            other => panic!("DSDT top level holds {other:?}"),
        })
        .collect()
}

// Resource descriptor tags and the expected extended-interrupt flags:
// consumer (bit 0) and edge-triggered (bit 1); active high and exclusive
// leave bits 2 and 3 clear.
const MEMORY32_FIXED: u8 = 0x86;
const EXTENDED_IRQ: u8 = 0x89;
const IO_PORT: u8 = 0x47;
const IRQ_FLAGS_CONSUMER_EDGE_HIGH_EXCLUSIVE: u8 = 0b0011;

fn extended_irq(gsi: u32) -> (u8, Vec<u8>) {
    let mut payload = vec![IRQ_FLAGS_CONSUMER_EDGE_HIGH_EXCLUSIVE, 1];
    payload.extend_from_slice(&gsi.to_le_bytes());
    (EXTENDED_IRQ, payload)
}

fn io_port(port: u16, len: u8) -> (u8, Vec<u8>) {
    let mut payload = vec![1];
    payload.extend_from_slice(&port.to_le_bytes());
    payload.extend_from_slice(&port.to_le_bytes());
    payload.extend_from_slice(&[1, len]);
    (IO_PORT, payload)
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[test]
fn rsdp_points_to_the_xsdt() {
    let mem = mem(128);
    let rsdp_addr = create_acpi_tables(&mem, 2, &devices(3)).unwrap();
    assert_eq!(rsdp_addr, GuestAddress(RSDP_ADDR));
    let tables = Tables::read(&mem, rsdp_addr);
    let rsdp = &tables.rsdp;

    assert_eq!(&rsdp[0..8], b"RSD PTR ");
    // ACPI 1.0 checksum over the first 20 bytes, extended over all 36.
    assert_eq!(sum(&rsdp[..20]), 0);
    assert_eq!(sum(rsdp), 0);
    assert_eq!(&rsdp[9..15], b"EMBER ");
    assert_eq!(rsdp[15], 2, "revision");
    assert_eq!(u32_at(rsdp, 16), 0, "no RSDT");
    assert_eq!(u32_at(rsdp, 20), 36, "length");
    assert_eq!(u64_at(rsdp, 24), tables.xsdt.addr);
    // Linux scans the BIOS area on 16-byte boundaries (ACPI 6.5 5.2.5.1).
    assert_eq!(RSDP_ADDR % 16, 0);
}

#[test]
fn xsdt_lists_fadt_and_madt() {
    let mem = mem(128);
    let tables = Tables::read(&mem, create_acpi_tables(&mem, 1, &[]).unwrap());
    let xsdt = &tables.xsdt;
    assert_eq!(xsdt.signature(), b"XSDT");
    assert_eq!(xsdt.bytes.len(), 36 + 2 * 8);
    assert_eq!(xsdt.bytes[8], 1, "revision");
    assert_eq!(u64_at(&xsdt.bytes, 36), tables.fadt.addr);
    assert_eq!(u64_at(&xsdt.bytes, 44), tables.madt.addr);
    assert_eq!(tables.fadt.signature(), b"FACP");
    assert_eq!(tables.madt.signature(), b"APIC");
    assert_eq!(tables.dsdt.signature(), b"DSDT");
}

#[test]
fn fadt_is_hardware_reduced_acpi_6_5() {
    let mem = mem(128);
    let tables = Tables::read(&mem, create_acpi_tables(&mem, 1, &[]).unwrap());
    let fadt = &tables.fadt.bytes;
    // ACPI 6.5 table 5.9 offsets.
    assert_eq!(fadt.len(), 276);
    assert_eq!(fadt[8], 6, "major version");
    assert_eq!(fadt[131], 5, "minor version");
    assert_eq!(u32_at(fadt, 36), 0, "no FACS (FIRMWARE_CTRL)");
    assert_eq!(u32_at(fadt, 40), 0, "32-bit DSDT unused");
    assert_eq!(u64_at(fadt, 132), 0, "no FACS (X_FIRMWARE_CTRL)");
    assert_eq!(u64_at(fadt, 140), tables.dsdt.addr, "X_DSDT");
    assert_eq!(u16_at(fadt, 46), 0, "no SCI");
    let flags = u32_at(fadt, 112);
    assert_eq!(
        flags,
        (1 << 20) | (1 << 4) | (1 << 5),
        "HW_REDUCED_ACPI, PWR_BUTTON, SLP_BUTTON"
    );
    assert_eq!(
        u16_at(fadt, 109),
        0b1_1100,
        "IAPC_BOOT_ARCH: no VGA, no MSI, ASPM controls"
    );
    assert_eq!(&fadt[268..276], b"EMBERVMM", "hypervisor vendor");
}

/// (type, bytes) of every MADT interrupt controller structure.
fn madt_entries(madt: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    let mut at = 44;
    while at < madt.len() {
        let len = usize::from(madt[at + 1]);
        out.push((madt[at], madt[at..at + len].to_vec()));
        at += len;
    }
    assert_eq!(at, madt.len());
    out
}

#[test]
fn madt_has_the_ioapic_and_one_lapic_per_vcpu() {
    for num_cpus in [1u8, 2, 32] {
        let mem = mem(128);
        let tables = Tables::read(&mem, create_acpi_tables(&mem, num_cpus, &[]).unwrap());
        let madt = &tables.madt.bytes;
        let n = usize::from(num_cpus);
        assert_eq!(madt.len(), 44 + 12 + 8 * n, "{num_cpus} vCPUs");
        assert_eq!(u32_at(madt, 36) as u64, APIC_ADDR);
        assert_eq!(u32_at(madt, 40), 0, "flags: no PCAT_COMPAT");

        let entries = madt_entries(madt);
        assert_eq!(entries.len(), 1 + n);
        let (ty, ioapic) = &entries[0];
        assert_eq!((*ty, ioapic.len()), (1, 12));
        assert_eq!(ioapic[2], num_cpus + 1, "IOAPIC ID as in the MP table");
        assert_eq!(u32_at(ioapic, 4) as u64, IOAPIC_ADDR);
        assert_eq!(u32_at(ioapic, 8), 0, "GSI base");

        let lapics: Vec<_> = entries[1..].iter().collect();
        assert!(lapics.iter().all(|(ty, e)| *ty == 0 && e.len() == 8));
        for (cpu, (_, lapic)) in lapics.iter().enumerate() {
            assert_eq!(usize::from(lapic[2]), cpu, "processor UID");
            assert_eq!(usize::from(lapic[3]), cpu, "APIC ID");
            assert_eq!(u32_at(lapic, 4), 1, "enabled");
        }
    }
}

#[test]
fn dsdt_describes_virtio_devices_com1_and_i8042() {
    let mem = mem(128);
    let devs = devices(3);
    let tables = Tables::read(&mem, create_acpi_tables(&mem, 1, &devs).unwrap());
    let dsdt = &tables.dsdt.bytes;
    assert_eq!(dsdt[8], 2, "revision 2: 64-bit AML integers");

    let nodes = parse_dsdt(dsdt);
    let all = devices_of(&nodes);
    let paths: Vec<&str> = all.iter().map(|d| d.path).collect();
    assert_eq!(paths, ["V000", "V001", "V002", "_SB_.COM1", "_SB_.PS2_"]);

    for (i, (dev, info)) in all.iter().zip(&devs).enumerate() {
        assert_eq!(dev.name("_HID"), &Value::Str("LNRO0005".into()));
        assert_eq!(dev.name("_UID"), &Value::Int(i as u64));
        assert_eq!(dev.name("_CCA"), &Value::Int(1));
        let mut window = vec![1]; // read-write
        window.extend_from_slice(&(info.addr as u32).to_le_bytes());
        window.extend_from_slice(&0x1000u32.to_le_bytes());
        assert_eq!(
            dev.crs(),
            [(MEMORY32_FIXED, window), extended_irq(info.gsi)],
            "{}",
            dev.path
        );
    }

    let com1 = &all[3];
    let Value::Int(hid) = com1.name("_HID") else {
        panic!("COM1 _HID is not an EISA ID");
    };
    assert_eq!(eisa_id(*hid), "PNP0501");
    assert_eq!(com1.name("_UID"), &Value::Int(0));
    assert_eq!(com1.name("_DDN"), &Value::Str("COM1".into()));
    assert_eq!(com1.crs(), [extended_irq(4), io_port(0x3f8, 8)]);

    let i8042 = &all[4];
    let Value::Int(hid) = i8042.name("_HID") else {
        panic!("i8042 _HID is not an EISA ID");
    };
    assert_eq!(eisa_id(*hid), "PNP0303");
    assert_eq!(
        i8042.crs(),
        [io_port(0x60, 1), io_port(0x64, 1), extended_irq(1)]
    );
    let sta = i8042.children.iter().find_map(|n| match n {
        Node::Method { name, flags, body } if name == "_STA" => Some((*flags, body.clone())),
        _ => None,
    });
    // Method(_STA, 0, NotSerialized) { Return (0x0F) }
    assert_eq!(sta, Some((0, vec![0xa4, 0x0a, 0x0f])));
}

#[test]
fn dsdt_without_devices_has_only_legacy_devices() {
    let mem = mem(128);
    let tables = Tables::read(&mem, create_acpi_tables(&mem, 1, &[]).unwrap());
    let nodes = parse_dsdt(&tables.dsdt.bytes);
    let paths: Vec<&str> = devices_of(&nodes).iter().map(|d| d.path).collect();
    assert_eq!(paths, ["_SB_.COM1", "_SB_.PS2_"]);
}

#[test]
fn dsdt_keeps_the_order_and_values_given() {
    // Not sorted by address or GSI: the order given is the probe order.
    let devs = [
        VirtioMmioDeviceInfo {
            addr: 0xc000_5000,
            len: 0x200,
            gsi: 9,
        },
        VirtioMmioDeviceInfo {
            addr: 0xc000_1000,
            len: 0x1000,
            gsi: 23,
        },
    ];
    let mem = mem(128);
    let tables = Tables::read(&mem, create_acpi_tables(&mem, 1, &devs).unwrap());
    let nodes = parse_dsdt(&tables.dsdt.bytes);
    let all = devices_of(&nodes);
    for (dev, info) in all.iter().zip(&devs) {
        let crs = dev.crs();
        assert_eq!(u32_at(&crs[0].1, 1) as u64, info.addr);
        assert_eq!(u32_at(&crs[0].1, 5) as u64, info.len);
        assert_eq!(crs[1], extended_irq(info.gsi));
    }
}

#[test]
fn tables_follow_the_ebda_in_the_reserved_area() {
    let mem = mem(128);
    let tables = Tables::read(&mem, create_acpi_tables(&mem, 32, &devices(4)).unwrap());
    let mut sdts = tables.sdts().to_vec();
    sdts.sort_by_key(|t| t.addr);
    // Firecracker's order and place: DSDT, FADT, MADT, XSDT from 0xa0000,
    // back to back.
    assert_eq!(sdts[0].addr, 0xa0000);
    let order: Vec<&[u8]> = sdts.iter().map(|t| t.signature()).collect();
    assert_eq!(order, [b"DSDT", b"FACP", b"APIC", b"XSDT"]);
    for pair in sdts.windows(2) {
        assert_eq!(pair[0].end(), pair[1].addr);
    }
}

/// Every table lies inside the e820-reserved system area, after the MP
/// table, and the MP table written before is unchanged.
fn check_coexistence(num_cpus: u8, num_devices: u32) {
    let mem = mem(128);
    setup_mptable(&mem, num_cpus).unwrap();
    let mp_len = mptable_size(num_cpus);
    let mp_before = read(&mem, MPTABLE_START, mp_len);

    let rsdp = create_acpi_tables(&mem, num_cpus, &devices(num_devices)).unwrap();
    let tables = Tables::read(&mem, rsdp);

    assert_eq!(read(&mem, MPTABLE_START, mp_len), mp_before);
    let mp_end = MPTABLE_START + mp_len as u64;
    let reserved = e820_map(&mem)
        .into_iter()
        .find(|e| e.addr == SYSTEM_MEM_START)
        .unwrap();
    assert_eq!(reserved.kind, E820_RESERVED);
    assert_eq!(reserved.size, SYSTEM_MEM_SIZE);
    for t in tables.sdts() {
        assert!(
            t.addr >= mp_end,
            "{:?} overlaps the MP table",
            t.signature()
        );
        assert!(
            t.end() <= RSDP_ADDR,
            "{:?} runs into the RSDP",
            t.signature()
        );
        assert!(t.addr >= reserved.addr && t.end() <= reserved.addr + reserved.size);
    }
    let mut sdts = tables.sdts().to_vec();
    sdts.sort_by_key(|t| t.addr);
    for pair in sdts.windows(2) {
        assert!(pair[0].end() <= pair[1].addr, "{pair:?}");
    }

    // And the MP table written after the ACPI tables leaves them intact.
    setup_mptable(&mem, num_cpus).unwrap();
    Tables::read(&mem, rsdp);
}

#[test]
fn mptable_and_acpi_coexist_for_32_vcpus_and_all_devices() {
    check_coexistence(32, MAX_DEVICES);
}

#[test]
fn mptable_and_acpi_coexist_for_the_most_vcpus() {
    // The MP table outgrows the 1 KiB EBDA; the tables move after it.
    assert!(EBDA_START + mptable_size(MAX_SUPPORTED_CPUS) as u64 > ACPI_TABLES_START);
    check_coexistence(MAX_SUPPORTED_CPUS, MAX_DEVICES);
    check_coexistence(38, 1);
}

#[test]
fn refuses_bad_cpu_counts() {
    let mem = mem(128);
    for n in [0, 255] {
        let err = create_acpi_tables(&mem, n, &[]).unwrap_err();
        assert!(
            matches!(err, Error::InvalidCpuCount { num_cpus, max: 254 } if num_cpus == n),
            "{err}"
        );
    }
    assert_eq!(read(&mem, RSDP_ADDR, 36), vec![0; 36]);
}

#[test]
fn refuses_bad_devices_and_writes_nothing() {
    let mem = mem(128);
    let ok = devices(1)[0];
    let cases = [
        VirtioMmioDeviceInfo { len: 0, ..ok },
        VirtioMmioDeviceInfo {
            addr: 0xffff_f800,
            ..ok
        },
        VirtioMmioDeviceInfo {
            addr: u64::MAX,
            ..ok
        },
    ];
    for dev in cases {
        let err = create_acpi_tables(&mem, 1, &[ok, dev]).unwrap_err();
        assert!(matches!(err, Error::DeviceWindow { index: 1, .. }), "{err}");
    }
    for gsi in [0, 4, IRQ_MAX + 1] {
        let err = create_acpi_tables(&mem, 1, &[VirtioMmioDeviceInfo { gsi, ..ok }]).unwrap_err();
        assert!(
            matches!(err, Error::InvalidGsi { index: 0, gsi: g, min: 5, max: 23 } if g == gsi),
            "{err}"
        );
    }
    let mut shared = devices(3);
    shared[2].gsi = shared[0].gsi;
    let err = create_acpi_tables(&mem, 1, &shared).unwrap_err();
    assert!(
        matches!(
            err,
            Error::SharedGsi {
                first: 0,
                second: 2,
                gsi: 5
            }
        ),
        "{err}"
    );

    // None of the refused calls wrote anything.
    assert_eq!(read(&mem, RSDP_ADDR, 36), vec![0; 36]);
    assert_eq!(read(&mem, ACPI_TABLES_START, 64), vec![0; 64]);

    // A window ending exactly at 4 GiB is fine.
    let top = VirtioMmioDeviceInfo {
        addr: 0xffff_f000,
        len: 0x1000,
        gsi: 5,
    };
    create_acpi_tables(&mem, 1, &[top]).unwrap();
    assert_eq!(&read(&mem, RSDP_ADDR, 8), b"RSD PTR ");
}

#[test]
fn refuses_memory_that_misses_the_tables() {
    // Memory that holds the tables but not the RSDP: nothing is written.
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RSDP_ADDR as usize)]).unwrap();
    let err = create_acpi_tables(&mem, 1, &[]).unwrap_err();
    assert!(
        matches!(
            err,
            Error::NotInGuestMemory {
                what: "RSDP",
                addr: RSDP_ADDR,
                len: 36
            }
        ),
        "{err}"
    );
    assert_eq!(read(&mem, ACPI_TABLES_START, 64), vec![0; 64]);

    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0xa0100)]).unwrap();
    let err = create_acpi_tables(&mem, 1, &[]).unwrap_err();
    assert!(matches!(err, Error::NotInGuestMemory { .. }), "{err}");
}

// ---------------------------------------------------------------------------
// iasl
// ---------------------------------------------------------------------------

/// Runs `iasl -d` on `file`, asserts it succeeds without errors or
/// warnings, and returns the disassembly.
fn iasl_disassemble(file: &FsPath) -> String {
    let out = Command::new("iasl")
        .arg("-d")
        .arg(file)
        .current_dir(file.parent().unwrap())
        .output();
    let out = match out {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "`iasl` is not on PATH: install the ACPI disassembler \
             (`apt-get install acpica-tools` on Debian) to run this test"
        ),
        Err(e) => panic!("cannot run iasl: {e}"),
    };
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "iasl -d {}:\n{log}", file.display());
    for bad in ["Error", "Warning", "Invalid", "Incorrect"] {
        assert!(!log.contains(bad), "iasl -d {}:\n{log}", file.display());
    }
    std::fs::read_to_string(file.with_extension("dsl")).unwrap()
}

#[test]
fn iasl_disassembles_every_table() {
    let mem = mem(128);
    let devs = devices(MAX_DEVICES);
    let tables = Tables::read(&mem, create_acpi_tables(&mem, 4, &devs).unwrap());
    let dir = tempfile::tempdir().unwrap();

    let mut dsl = std::collections::HashMap::new();
    let sdts = tables.sdts();
    // The RSDP is not a table with a standard header: `iasl -d` refuses
    // binary RSDPs, so rsdp_points_to_the_xsdt checks it field by field.
    let all: [(&str, &[u8]); 4] = [
        ("xsdt", &sdts[0].bytes),
        ("facp", &sdts[1].bytes),
        ("apic", &sdts[2].bytes),
        ("dsdt", &sdts[3].bytes),
    ];
    for (name, bytes) in all {
        let file = dir.path().join(format!("{name}.dat"));
        std::fs::write(&file, bytes).unwrap();
        dsl.insert(name, iasl_disassemble(&file));
    }

    assert!(
        dsl["facp"].contains("Hardware Reduced (V5) : 1"),
        "{}",
        dsl["facp"]
    );
    assert!(
        dsl["apic"].contains("Processor Local APIC"),
        "{}",
        dsl["apic"]
    );
    assert!(dsl["apic"].contains("I/O APIC"), "{}", dsl["apic"]);

    let dsdt = &dsl["dsdt"];
    assert!(
        dsdt.contains(r#"DefinitionBlock ("", "DSDT", 2, "EMBER ", "EMBERVM ""#),
        "{dsdt}"
    );
    assert_eq!(dsdt.matches("\"LNRO0005\"").count(), devs.len(), "{dsdt}");
    // Whitespace-insensitive: one block per device, in order.
    let flat = dsdt.split_whitespace().collect::<Vec<_>>().join(" ");
    let blocks: Vec<&str> = flat.split("Device (").skip(1).collect();
    assert_eq!(blocks.len(), devs.len() + 2, "{dsdt}");
    for (i, (block, dev)) in blocks.iter().zip(&devs).enumerate() {
        let expected = [
            format!("V{i:03})"),
            "Name (_HID, \"LNRO0005\")".to_string(),
            format!(
                "Memory32Fixed (ReadWrite, 0x{:08X}, // Address Base 0x00001000, // Address Length )",
                dev.addr
            ),
            format!(
                "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, ) {{ 0x{:08X}, }}",
                dev.gsi
            ),
        ];
        for e in expected {
            assert!(block.contains(&e), "missing {e} in\n{block}");
        }
    }
    let com1 = blocks[devs.len()];
    assert!(com1.starts_with("_SB.COM1)"), "{com1}");
    for e in [
        "EisaId (\"PNP0501\")",
        "IO (Decode16, 0x03F8, // Range Minimum 0x03F8, // Range Maximum 0x01, // Alignment 0x08, // Length )",
        "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, ) { 0x00000004, }",
    ] {
        assert!(com1.contains(e), "missing {e} in\n{com1}");
    }
    let i8042 = blocks[devs.len() + 1];
    assert!(i8042.starts_with("_SB.PS2)"), "{i8042}");
    for e in [
        "EisaId (\"PNP0303\")",
        "Return (0x0F)",
        "IO (Decode16, 0x0060,",
        "IO (Decode16, 0x0064,",
        "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, ) { 0x00000001, }",
    ] {
        assert!(i8042.contains(e), "missing {e} in\n{i8042}");
    }
    assert!(dsdt.contains("0xC0001000"), "{dsdt}");

    // The disassembly compiles back, without warnings, into the very AML
    // that was written (the header differs: iasl signs it as compiler).
    let recompiled = dir.path().join("recompiled");
    std::fs::create_dir(&recompiled).unwrap();
    std::fs::write(recompiled.join("dsdt.dsl"), dsdt).unwrap();
    let out = Command::new("iasl")
        .arg("dsdt.dsl")
        .current_dir(&recompiled)
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "iasl dsdt.dsl:\n{log}");
    assert!(log.contains("0 Errors, 0 Warnings"), "{log}");
    let aml = std::fs::read(recompiled.join("dsdt.aml")).unwrap();
    assert_eq!(aml[36..], sdts[3].bytes[36..]);
    assert!(dsdt.contains("EisaId (\"PNP0501\")"), "{dsdt}");
    assert!(dsdt.contains("EisaId (\"PNP0303\")"), "{dsdt}");
}
