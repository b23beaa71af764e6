#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Writes the seed corpora under fuzz/corpus/<target>/.

The bus, uart and i8042 targets decode their input with `arbitrary` 1.x
(derived `Arbitrary` on the `Op` enums, `Vec<Op>` taking the rest of the
input). This script encodes op sequences the same way, so that each seed is a
meaningful scenario; `cargo +nightly fuzz fmt <target> <file>` prints how a
seed decodes. The encoding, from arbitrary 1.5:
  - integers: little-endian, zero-padded when the input runs out;
  - bool: one byte, bit 0;
  - enum variant i of n: a u32 x with (x * n) >> 32 == i;
  - Vec<T> as the whole input: each element is preceded by a byte with
    bit 0 set; a byte with bit 0 clear (or the end) stops the list.

Run from anywhere: `python3 fuzz/gen_corpus.py`.
"""

import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
U64_MAX = (1 << 64) - 1


def variant(i, n):
    """The enum tag selecting variant `i` of `n`."""
    return struct.pack("<I", -(-(i << 32) // n))


def u8(v):
    return struct.pack("<B", v)


def u16(v):
    return struct.pack("<H", v)


def i16(v):
    return struct.pack("<h", v)


def u64(v):
    return struct.pack("<Q", v)


def boolean(v):
    return u8(1 if v else 0)


def ops(*encoded):
    return b"".join(b"\x01" + op for op in encoded)


SIZES = {1: 0, 2: 1, 4: 2, 8: 3}


def size(n):
    return variant(SIZES[n], 4)


# --- bus ----------------------------------------------------------------
# Fixed ranges, in address order (the index of Addr::Near/NearEnd):
# 0: 0x0 len 1, 1: 0x3f8 len 8, 2: 0xd0000000 len 0x1000,
# 3: u64::MAX - 0x10 len 0x10.


def near(index, delta):
    return variant(0, 3) + u8(index) + i16(delta)


def near_end(index, delta):
    return variant(1, 3) + u8(index) + i16(delta)


def raw(addr):
    return variant(2, 3) + u64(addr)


def small(n):
    return variant(0, 2) + u8(n)


def raw_len(n):
    return variant(1, 2) + u64(n)


def bus_read(addr, n):
    return variant(0, 4) + addr + size(n)


def bus_write(addr, n, value):
    return variant(1, 4) + addr + size(n) + u64(value)


def bus_insert(base, length):
    return variant(2, 4) + base + length


def bus_remove(base):
    return variant(3, 4) + base


BUS = {
    "write_read_com1": ops(
        bus_write(near(1, 3), 1, 0x80),
        bus_read(near(1, 3), 1),
        bus_write(near(1, 0), 8, 0x1122334455667788),
        bus_read(near(1, 4), 4),
    ),
    "straddle_edges": ops(
        bus_write(near_end(2, -3), 8, U64_MAX),
        bus_read(near_end(2, -7), 8),
        bus_read(near(2, -1), 2),
        bus_read(near_end(1, 1), 1),
    ),
    "insert_remove": ops(
        bus_insert(raw(0x3F0), small(8)),
        bus_insert(raw(0x3F4), small(8)),
        bus_insert(raw(0x400), raw_len(U64_MAX)),
        bus_insert(raw(0x5), small(0)),
        bus_remove(near(1, 0)),
        bus_write(raw(0x3F0), 1, 0x42),
        bus_remove(raw(0x3F0)),
        bus_read(raw(0x3F0), 1),
        bus_insert(raw(0x3F0), small(8)),
        bus_read(raw(0x3F0), 1),
    ),
    "top_of_address_space": ops(
        bus_read(raw(U64_MAX - 8), 8),
        bus_read(raw(U64_MAX), 2),
        bus_write(near_end(3, 0), 1, 0xAA),
        bus_insert(raw(U64_MAX - 1), small(1)),
        bus_insert(raw(0), raw_len(U64_MAX)),
    ),
}

# --- uart ---------------------------------------------------------------
THR, IER, LCR, MCR, LSR = 0, 1, 3, 4, 5


def reg(r):
    return variant(0, 2) + u8(r)


def off_raw(o):
    return variant(1, 2) + u64(o)


def uart_read(offset, n=1):
    return variant(0, 4) + offset + size(n)


def uart_write(offset, value, n=1):
    return variant(1, 4) + offset + size(n) + u64(value)


def uart_enqueue(pattern, length):
    return variant(2, 4) + pattern + u8(length)


def uart_fail(failing):
    return variant(3, 4) + boolean(failing)


UART = {
    "hello": ops(
        uart_write(reg(IER), 0x02),
        uart_write(reg(THR), ord("h")),
        uart_write(reg(THR), ord("i")),
        uart_read(reg(LSR)),
        uart_read(reg(2)),
    ),
    "input": ops(
        uart_write(reg(IER), 0x01),
        uart_enqueue(b"abcd", 6),
        uart_read(reg(LSR)),
        *[uart_read(reg(THR)) for _ in range(7)],
        uart_read(reg(LSR)),
    ),
    "fifo_overflow": ops(
        uart_enqueue(b"wxyz", 200),
        uart_enqueue(b"more", 4),
        uart_read(reg(THR)),
        uart_enqueue(b"more", 4),
        uart_read(reg(LSR)),
    ),
    "loopback": ops(
        uart_write(reg(MCR), 0x18),
        uart_write(reg(THR), ord("x")),
        uart_enqueue(b"lost", 4),
        uart_read(reg(LSR)),
        uart_read(reg(THR)),
        uart_write(reg(MCR), 0x08),
        uart_write(reg(THR), ord("y")),
    ),
    "divisor_latch": ops(
        uart_write(reg(LCR), 0x83),
        uart_write(reg(0), 0x01),
        uart_write(reg(1), 0x00),
        uart_read(reg(0)),
        uart_write(reg(LCR), 0x03),
        uart_write(reg(THR), ord("A")),
    ),
    "output_fails": ops(
        uart_fail(True),
        uart_write(reg(THR), ord("a")),
        uart_fail(False),
        uart_write(reg(THR), ord("b")),
    ),
    "invalid_access": ops(
        uart_read(off_raw(8)),
        uart_write(reg(THR), 0x4142, 2),
        uart_read(off_raw(U64_MAX), 8),
        uart_write(off_raw(0x100), 0x41),
    ),
}

# --- i8042 --------------------------------------------------------------


def data():
    return variant(0, 4)


def status():
    return variant(1, 4)


def port(p):
    return variant(2, 4) + u8(p)


def port_raw(o):
    return variant(3, 4) + u64(o)


def kbd_read(offset, n=1):
    return variant(0, 4) + offset + size(n)


def kbd_write(offset, value, n=1):
    return variant(1, 4) + offset + size(n) + u64(value)


def ctrl_alt_del():
    return variant(2, 4)


def key(code):
    return variant(3, 4) + u16(code)


I8042 = {
    "reset": ops(kbd_write(status(), 0xFE)),
    "linux_probe": ops(
        kbd_read(status()),
        kbd_write(status(), 0x20),
        kbd_read(status()),
        kbd_read(data()),
        kbd_write(status(), 0x60),
        kbd_write(data(), 0x44),
        kbd_write(status(), 0x20),
        kbd_read(data()),
    ),
    "ctrl_alt_del_overflow": ops(
        *[ctrl_alt_del() for _ in range(5)],
        *[kbd_read(data()) for _ in range(18)],
        kbd_read(status()),
    ),
    "keyboard_commands": ops(
        kbd_write(data(), 0xFF),
        kbd_read(data()),
        key(0x1C),
        key(0xE071),
        kbd_write(status(), 0xD1),
        kbd_write(data(), 0x01),
        kbd_write(status(), 0xD0),
        kbd_read(data()),
        kbd_write(status(), 0x60),
        kbd_write(data(), 0x00),
        key(0x1C),
    ),
    "invalid_access": ops(
        kbd_read(port(1)),
        kbd_write(port(2), 0x00),
        kbd_read(data(), 2),
        kbd_write(status(), 0xFEFE, 4),
        kbd_read(port(5)),
        kbd_write(port_raw(U64_MAX), 0xFE),
        kbd_write(status(), 0xAA),
    ),
}

# --- kernel_loader --------------------------------------------------------
# Raw kernel images. Load addresses sit at 16 MiB, inside the target's
# 32 MiB guest memory and above HIMEM_START (1 MiB).

KERNEL_ADDR = 0x100_0000
# `hlt; jmp .-1`: something to execute.
CODE = b"\xf4\xeb\xfd" + b"\x90" * 13
PT_LOAD, PT_NOTE = 1, 4


def elf64(entry, segments, notes=b""):
    """An ELF64 x86_64 executable (System V gABI, ELF-64 Object File
    Format): `segments` are (paddr, data, memsz) PT_LOADs; `notes`, if any,
    is the content of one PT_NOTE."""
    ehsize, phsize = 64, 56
    phnum = len(segments) + (1 if notes else 0)
    offset = ehsize + phnum * phsize
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)  # 64-bit, LE, v1
    ehdr = ident + struct.pack(
        "<HHIQQQIHHHHHH",
        2,  # e_type: ET_EXEC
        62,  # e_machine: EM_X86_64
        1,  # e_version
        entry,
        ehsize,  # e_phoff
        0,  # e_shoff
        0,  # e_flags
        ehsize,
        phsize,
        phnum,
        0,  # e_shentsize
        0,  # e_shnum
        0,  # e_shstrndx
    )
    phdrs, payload = b"", b""
    for paddr, data, memsz in segments:
        phdrs += struct.pack(
            "<IIQQQQQQ", PT_LOAD, 7, offset + len(payload), paddr, paddr,
            len(data), memsz, 0x1000)
        payload += data
    if notes:
        phdrs += struct.pack(
            "<IIQQQQQQ", PT_NOTE, 4, offset + len(payload), 0, 0,
            len(notes), len(notes), 4)
        payload += notes
    return ehdr + phdrs + payload


def note(name, n_type, desc):
    """One ELF note: namesz, descsz, type, then name and desc padded to 4."""
    pad = lambda b: b + bytes(-len(b) % 4)
    return struct.pack("<III", len(name), len(desc), n_type) + pad(name) + pad(desc)


# XEN_ELFNOTE_PHYS32_ENTRY (xen/include/public/elfnote.h): type 18, name
# "Xen", the 32-bit PVH entry point (Linux emits it as a 64-bit _ASM_PTR).
PVH_NOTES = note(b"GNU\0", 3, b"\x01\x02\x03\x04") + note(
    b"Xen\0", 18, struct.pack("<Q", KERNEL_ADDR))


def bzimage():
    """A bzImage header (Documentation/arch/x86/boot.rst, "The real-mode
    kernel header") for boot protocol 2.15 with a 64-bit entry, one setup
    sector and a 512-byte protected-mode kernel."""
    setup_sects = 1
    image = bytearray((setup_sects + 1) * 512)
    image[0x1F1] = setup_sects
    struct.pack_into("<H", image, 0x1FE, 0xAA55)  # boot_flag
    image[0x200:0x202] = b"\xeb\x66"  # jump over the header
    image[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", image, 0x206, 0x020F)  # version 2.15
    image[0x211] = 0x01  # loadflags: LOADED_HIGH
    struct.pack_into("<I", image, 0x214, 0x10_0000)  # code32_start
    struct.pack_into("<I", image, 0x230, 0x20_0000)  # kernel_alignment
    image[0x234] = 1  # relocatable_kernel
    struct.pack_into("<H", image, 0x236, 0x1)  # xloadflags: XLF_KERNEL_64
    struct.pack_into("<I", image, 0x238, 2047)  # cmdline_size
    struct.pack_into("<Q", image, 0x258, KERNEL_ADDR)  # pref_address
    struct.pack_into("<I", image, 0x260, 0x10000)  # init_size
    return bytes(image) + CODE + bytes(512 - len(CODE))


KERNEL = {
    "elf64": elf64(KERNEL_ADDR, [(KERNEL_ADDR, CODE, len(CODE))]),
    "elf64_bss": elf64(
        KERNEL_ADDR,
        [(KERNEL_ADDR, CODE, 0x2000), (KERNEL_ADDR + 0x4000, b"", 0x1000)]),
    "elf64_pvh": elf64(KERNEL_ADDR, [(KERNEL_ADDR, CODE, len(CODE))], PVH_NOTES),
    "bzimage": bzimage(),
}

# --- config -------------------------------------------------------------

CONFIG = {
    "minimal.json": b'{"boot-source": {"kernel_image_path": "vmlinux"}}\n',
    "full.json": b"""{
  "boot-source": {
    "kernel_image_path": "vmlinux.bin",
    "initrd_path": "initrd.img",
    "boot_args": "console=ttyS0 reboot=k panic=1 pci=off"
  },
  "machine-config": {
    "vcpu_count": 2,
    "mem_size_mib": 1024,
    "smt": false,
    "track_dirty_pages": false,
    "huge_pages": "None"
  },
  "drives": [],
  "network-interfaces": [],
  "logger": {"log_path": "/tmp/log", "level": "Debug", "show_level": true}
}
""",
    "drive.json": b"""{
  "boot-source": {"kernel_image_path": "vmlinux"},
  "drives": [{"drive_id": "rootfs", "path_on_host": "rootfs.ext4",
              "is_root_device": true, "is_read_only": false,
              "rate_limiter": {"bandwidth": {"size": 1, "refill_time": 100}}}]
}
""",
    "bad_vcpus.json": b'{"machine-config": {"vcpu_count": 3, "mem_size_mib": 128, "smt": true}}\n',
    "unknown_field.json": b'{"boot-source": {"kernel_image_path": "k", "bogus": 1}}\n',
}


# --- virtio_mmio ------------------------------------------------------------
# Input: device_type u32, offered features u64, queues u8 (count - 1),
# max_log2 [u8; 4], then the ops.
MMIO_MAGIC, MMIO_VERSION, MMIO_DEVICE_ID, MMIO_VENDOR_ID = 0x00, 0x04, 0x08, 0x0C
MMIO_DEVICE_FEATURES, MMIO_DEVICE_FEATURES_SEL = 0x10, 0x14
MMIO_DRIVER_FEATURES, MMIO_DRIVER_FEATURES_SEL = 0x20, 0x24
MMIO_QUEUE_SEL, MMIO_QUEUE_NUM_MAX, MMIO_QUEUE_NUM = 0x30, 0x34, 0x38
MMIO_QUEUE_READY, MMIO_QUEUE_NOTIFY = 0x44, 0x50
MMIO_INTERRUPT_STATUS, MMIO_INTERRUPT_ACK, MMIO_STATUS = 0x60, 0x64, 0x70
MMIO_SHM_LEN_LOW, MMIO_CONFIG_GENERATION = 0xB0, 0xFC
ACK, DRV, DRIVER_OK, FEATURES_OK, FAILED = 1, 2, 4, 8, 128
VERSION_1, EVENT_IDX = 1 << 32, 1 << 29


def mmio_input(device_type, features, nqueues, max_log2, *encoded):
    return (struct.pack("<IQ", device_type, features) + u8(nqueues - 1)
            + bytes(max_log2) + ops(*encoded))


def reg_off(offset):
    return variant(0, 3) + u8(offset // 4)


def cfg_off(n):
    return variant(1, 3) + u8(n)


def raw_off(n):
    return variant(2, 3) + u16(n)


def low_addr(addr):
    assert addr % 16 == 0 and addr >> 4 < 0x10000
    return variant(0, 2) + u16(addr >> 4)


def raw_addr(addr):
    return variant(1, 2) + u64(addr)


def mmio_read(offset, n=4):
    return variant(0, 6) + offset + size(n)


def mmio_write(offset, value, n=4):
    return variant(1, 6) + offset + size(n) + u64(value)


def mmio_status(value):
    return variant(2, 6) + u8(value)


def mmio_setup_queue(index, qsize, desc, driver, device):
    return variant(3, 6) + u8(index) + u16(qsize) + desc + driver + device


def mmio_device_event(config, offset=0, value=0):
    return variant(4, 6) + boolean(config) + u8(offset) + u8(value)


def mmio_device_faults(fail_activate, refuse_reset):
    return variant(5, 6) + boolean(fail_activate) + boolean(refuse_reset)


def mmio_negotiate(features):
    """Driver steps 1-5 of virtio 1.2 section 3.1.1."""
    return [
        mmio_status(0),
        mmio_status(ACK),
        mmio_status(ACK | DRV),
        mmio_write(reg_off(MMIO_DEVICE_FEATURES_SEL), 1),
        mmio_read(reg_off(MMIO_DEVICE_FEATURES)),
        mmio_write(reg_off(MMIO_DRIVER_FEATURES_SEL), 0),
        mmio_write(reg_off(MMIO_DRIVER_FEATURES), features & 0xFFFFFFFF),
        mmio_write(reg_off(MMIO_DRIVER_FEATURES_SEL), 1),
        mmio_write(reg_off(MMIO_DRIVER_FEATURES), features >> 32),
        mmio_status(ACK | DRV | FEATURES_OK),
        mmio_read(reg_off(MMIO_STATUS)),
    ]


ALL_OK = ACK | DRV | FEATURES_OK | DRIVER_OK

VIRTIO_MMIO = {
    "linux_probe": mmio_input(
        2, VERSION_1 | EVENT_IDX, 1, [8, 0, 0, 0],
        *[mmio_read(reg_off(r)) for r in
          (MMIO_MAGIC, MMIO_VERSION, MMIO_DEVICE_ID, MMIO_VENDOR_ID)],
        *mmio_negotiate(VERSION_1 | EVENT_IDX),
        mmio_write(reg_off(MMIO_QUEUE_SEL), 0),
        mmio_read(reg_off(MMIO_QUEUE_NUM_MAX)),
        mmio_setup_queue(0, 16, low_addr(0x1000), low_addr(0x2000),
                         low_addr(0x3000)),
        mmio_read(cfg_off(0), 8),
        mmio_status(ALL_OK),
        mmio_write(reg_off(MMIO_QUEUE_NOTIFY), 0),
        mmio_device_event(False),
        mmio_read(reg_off(MMIO_INTERRUPT_STATUS)),
        mmio_write(reg_off(MMIO_INTERRUPT_ACK), 1),
        mmio_status(0),
    ),
    "rings_outside_memory": mmio_input(
        1, VERSION_1, 2, [4, 2, 0, 0],
        *mmio_negotiate(VERSION_1),
        # Descriptor table in the hole, available ring across the end of
        # the first region, used ring at the top of the address space.
        mmio_setup_queue(0, 16, low_addr(0x10000), low_addr(0xFFF0),
                         raw_addr((1 << 64) - 4)),
        mmio_setup_queue(1, 4, low_addr(0x20000), low_addr(0x20100),
                         low_addr(0x20200)),
        mmio_status(ALL_OK),
        mmio_read(reg_off(MMIO_STATUS)),
        mmio_status(0),
        *mmio_negotiate(VERSION_1),
        mmio_setup_queue(1, 4, low_addr(0x20000), low_addr(0x20100),
                         low_addr(0x2FFF0)),
        mmio_status(ALL_OK),
        mmio_status(0),
    ),
    "order_violations": mmio_input(
        3, VERSION_1, 1, [3, 0, 0, 0],
        mmio_status(ALL_OK),
        mmio_status(0),
        mmio_status(ACK | DRV | FEATURES_OK),
        mmio_status(0),
        mmio_write(reg_off(MMIO_QUEUE_NUM), 8),
        mmio_status(0),
        mmio_status(ACK),
        mmio_write(reg_off(MMIO_DRIVER_FEATURES), 1),
        mmio_status(0),
        *mmio_negotiate(VERSION_1),
        mmio_write(reg_off(MMIO_QUEUE_NUM), 3),
        mmio_read(reg_off(MMIO_STATUS)),
        mmio_status(ACK | DRV | FEATURES_OK | 64),
        mmio_status(FAILED),
        mmio_status(0),
        *mmio_negotiate(VERSION_1),
        mmio_write(reg_off(MMIO_QUEUE_READY), 2),
        mmio_status(0),
        *mmio_negotiate(1),
        mmio_status(0),
    ),
    "access_sizes_and_config": mmio_input(
        0x1A, VERSION_1, 1, [0, 0, 0, 0],
        mmio_read(reg_off(MMIO_MAGIC), 1),
        mmio_read(reg_off(MMIO_MAGIC), 8),
        mmio_read(raw_off(2), 4),
        mmio_write(raw_off(MMIO_STATUS), 1, 2),
        mmio_read(reg_off(MMIO_SHM_LEN_LOW)),
        mmio_read(reg_off(MMIO_CONFIG_GENERATION)),
        mmio_read(cfg_off(15), 1),
        mmio_read(cfg_off(12), 8),
        mmio_write(cfg_off(0), 0xAA, 1),
        mmio_status(ACK),
        mmio_status(ACK | DRV),
        mmio_write(cfg_off(4), 0x11223344, 4),
        mmio_read(cfg_off(0), 8),
        mmio_read(raw_off(0x1FF), 1),
        mmio_write(reg_off(MMIO_QUEUE_NOTIFY), 7),
    ),
    "device_faults": mmio_input(
        4, VERSION_1, 1, [1, 0, 0, 0],
        mmio_device_faults(True, False),
        *mmio_negotiate(VERSION_1),
        mmio_setup_queue(0, 2, low_addr(0x0), low_addr(0x100),
                         low_addr(0x200)),
        mmio_status(ALL_OK),
        mmio_device_faults(False, True),
        mmio_status(0),
        mmio_status(ACK),
        mmio_device_faults(False, False),
        mmio_status(0),
        *mmio_negotiate(VERSION_1),
        mmio_setup_queue(0, 2, low_addr(0x0), low_addr(0x100),
                         low_addr(0x200)),
        mmio_status(ALL_OK),
        mmio_device_event(True, 3, 0x77),
        mmio_read(reg_off(MMIO_CONFIG_GENERATION)),
        mmio_device_faults(False, True),
        mmio_status(0),
    ),
    "three_queues": mmio_input(
        3, VERSION_1 | EVENT_IDX | 1, 3, [8, 8, 0, 0],
        *mmio_negotiate(VERSION_1 | EVENT_IDX),
        mmio_setup_queue(0, 256, low_addr(0x20000), low_addr(0x21000),
                         low_addr(0x22000)),
        mmio_setup_queue(2, 1, low_addr(0x100), low_addr(0x200),
                         low_addr(0x300)),
        mmio_write(reg_off(MMIO_QUEUE_SEL), 1),
        mmio_write(reg_off(MMIO_QUEUE_READY), 0),
        mmio_status(ALL_OK),
        mmio_write(reg_off(MMIO_QUEUE_NOTIFY), 2),
        mmio_write(reg_off(MMIO_QUEUE_READY), 0),
        mmio_status(0),
    ),
}

# --- blk_request ------------------------------------------------------------
# Raw format, described in fuzz_targets/blk_request.rs.
F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
BLK_RO, BLK_AVAIL_IDX, BLK_DISCARD, BLK_WRITE_ZEROES = 0x10, 0x20, 0x40, 0x80
# sel values: 0 = offset into the first data area (whose contents follow the
# heads in the input), 1 = offset into the second region, 2 = raw address.
IN_DATA1, IN_REGION2, RAW = 0, 1, 2


def blk_desc(sel, addr, length, flags=0, next_=0):
    return struct.pack("<BIIHH", sel, addr, length, flags, next_)


def blk_header(kind, sector=0):
    return struct.pack("<IIQ", kind, 0, sector)


def blk_range(sector, num, flags=0):
    return struct.pack("<QII", sector, num, flags)


def blk_input(log2_size, descs, heads, data=b"", flags=0, cap=0,
              avail_idx=None):
    out = u8(log2_size | flags) + u8(cap)
    if flags & BLK_AVAIL_IDX:
        out += u16(avail_idx)
    out += u8(len(descs)) + b"".join(descs)
    out += u8(len(heads)) + b"".join(u16(h) for h in heads)
    return out + data


def blk_three(index, header_at, data, data_flags, status_at):
    """A header / data / status chain at descriptors index..index+2."""
    return [
        blk_desc(IN_DATA1, header_at, 16, F_NEXT, index + 1),
        blk_desc(data[0], data[1], data[2], data_flags | F_NEXT, index + 2),
        blk_desc(IN_REGION2, status_at, 1, F_WRITE),
    ]


# First data area contents: headers at 0x00, 0x10, ...; a 512-byte sector
# of data at 0x100.
BLK_DATA = (blk_header(T_OUT, 1) + blk_header(T_IN, 1) + blk_header(T_FLUSH)
            + blk_header(T_GET_ID) + blk_header(T_DISCARD)
            + blk_header(T_WRITE_ZEROES) + blk_range(2, 3)
            + blk_range(60, 4, 1) + blk_header(T_IN, 63) + blk_header(99))
BLK_DATA += bytes(0x100 - len(BLK_DATA)) + bytes(range(256)) * 2

BLK_REQUEST = {
    "read_write_flush_id": blk_input(
        4,
        blk_three(0, 0x00, (IN_DATA1, 0x100, 512), 0, 0x0)
        + blk_three(3, 0x10, (IN_REGION2, 0x1000, 512), F_WRITE, 0x1)
        + [blk_desc(IN_DATA1, 0x20, 16, F_NEXT, 7),
           blk_desc(IN_REGION2, 0x2, 1, F_WRITE)]
        + blk_three(8, 0x30, (IN_REGION2, 0x2000, 20), F_WRITE, 0x3),
        [0, 3, 6, 8], BLK_DATA),
    "discard_write_zeroes": blk_input(
        3,
        [blk_desc(IN_DATA1, 0x40, 32, F_NEXT, 1),
         blk_desc(IN_REGION2, 0x0, 1, F_WRITE),
         blk_desc(IN_DATA1, 0x50, 16, F_NEXT, 3),
         blk_desc(IN_DATA1, 0x70, 16, F_NEXT, 4),
         blk_desc(IN_REGION2, 0x1, 1, F_WRITE)],
        [0, 2], BLK_DATA, BLK_DISCARD | BLK_WRITE_ZEROES),
    "read_only_write": blk_input(
        2, blk_three(0, 0x00, (IN_DATA1, 0x100, 512), 0, 0x0), [0],
        BLK_DATA, BLK_RO),
    "indirect_table": blk_input(
        2,
        # Descriptor 0 points at a 3-entry table placed in the data area.
        [blk_desc(IN_DATA1, 0x200, 48, F_INDIRECT)],
        [0],
        BLK_DATA[:0x200]
        + struct.pack("<QIHH", 0x2010, 16, F_NEXT, 1)
        + struct.pack("<QIHH", 0x20000, 512, F_WRITE | F_NEXT, 2)
        + struct.pack("<QIHH", 0x20400, 1, F_WRITE, 0)),
    "loops_and_bad_heads": blk_input(
        2,
        [blk_desc(IN_DATA1, 0x00, 16, F_NEXT, 1),
         blk_desc(IN_DATA1, 0x10, 16, F_NEXT, 0),
         blk_desc(IN_DATA1, 0x20, 8, F_NEXT, 3),
         blk_desc(IN_DATA1, 0x28, 8, F_NEXT | F_WRITE, 2)],
        [0, 2, 4, 0xFFFF], BLK_DATA),
    "bad_layouts": blk_input(
        3,
        # Header split over two descriptors, the second one in the hole.
        [blk_desc(IN_DATA1, 0x10, 8, F_NEXT, 1),
         blk_desc(RAW, 0x18000, 8, F_NEXT, 2),
         blk_desc(IN_REGION2, 0x0, 1, F_WRITE),
         # Readable after writable.
         blk_desc(IN_DATA1, 0x10, 16, F_NEXT | F_WRITE, 4),
         blk_desc(IN_DATA1, 0x100, 512, F_NEXT, 5),
         blk_desc(IN_REGION2, 0x1, 1, F_WRITE),
         # Status byte across the end of the first region.
         blk_desc(RAW, 0xFFFF, 2, F_WRITE)],
        [0, 3, 6], BLK_DATA, cap=0xC0),
    "past_the_end": blk_input(
        2,
        blk_three(0, 0x80, (IN_REGION2, 0x0, 1024), F_WRITE, 0x800),
        [0], BLK_DATA, cap=0x41),
    "avail_overflow": blk_input(
        1, blk_three(0, 0x00, (IN_DATA1, 0x100, 512), 0, 0x0), [0],
        BLK_DATA[:0x40], BLK_AVAIL_IDX, avail_idx=3),
}


# --- rng_request ------------------------------------------------------------
# Raw format, described in fuzz_targets/rng_request.rs (descriptors as for
# blk_request).
RNG_LIMITED, RNG_AVAIL_IDX = 0x10, 0x20


def rng_input(log2_size, descs, heads, data=b"", flags=0, avail_idx=None):
    out = u8(log2_size | flags)
    if flags & RNG_AVAIL_IDX:
        out += u16(avail_idx)
    out += u8(len(descs)) + b"".join(descs)
    out += u8(len(heads)) + b"".join(u16(h) for h in heads)
    return out + data


# An indirect table at the start of the first data area: two writable
# buffers in the second region.
RNG_TABLE = (struct.pack("<QIHH", 0x20000 + 0x100, 64, F_WRITE | F_NEXT, 1)
             + struct.pack("<QIHH", 0x20000 + 0x200, 32, F_WRITE, 0))

RNG_REQUEST = {
    "writable": rng_input(
        3,
        [blk_desc(IN_REGION2, 0x0, 4096, F_WRITE),
         blk_desc(IN_REGION2, 0x1000, 100, F_WRITE | F_NEXT, 2),
         blk_desc(IN_REGION2, 0x2000, 60, F_WRITE)],
        [0, 1]),
    "readonly_and_outside": rng_input(
        3,
        [blk_desc(IN_REGION2, 0x0, 16, 0),
         blk_desc(IN_REGION2, 0x100, 16, F_WRITE | F_NEXT, 2),
         blk_desc(RAW, 0x18000, 16, F_WRITE),
         blk_desc(RAW, 0xFFFF0000, 64, F_WRITE)],
        [0, 1, 3]),
    "over_64k": rng_input(
        4,
        [blk_desc(IN_REGION2, 0x0, 0x10000, F_WRITE | F_NEXT, 1),
         blk_desc(IN_REGION2, 0x10000, 0x8000, F_WRITE)],
        [0]),
    "indirect": rng_input(
        2, [blk_desc(IN_DATA1, 0x0, 32, F_INDIRECT)], [0], RNG_TABLE),
    "loops_and_bad_heads": rng_input(
        2,
        [blk_desc(IN_REGION2, 0x0, 8, F_WRITE | F_NEXT, 1),
         blk_desc(IN_REGION2, 0x8, 8, F_WRITE | F_NEXT, 0)],
        [0, 9, 0xFFFF]),
    "rate_limited": rng_input(
        2,
        [blk_desc(IN_REGION2, 0x0, 8, F_WRITE),
         blk_desc(IN_REGION2, 0x8, 0, 0),
         blk_desc(IN_REGION2, 0x10, 8, F_WRITE)],
        [0, 1, 2], flags=RNG_LIMITED),
    "avail_overflow": rng_input(
        1, [blk_desc(IN_REGION2, 0x0, 8, F_WRITE)], [0],
        flags=RNG_AVAIL_IDX, avail_idx=5),
}


# --- cpu_template -----------------------------------------------------------
# The JSON text of PUT /cpu-config (fuzz_targets/cpu_template.rs).

CPU_TEMPLATE = {
    "empty": b"{}",
    "leaf1_ecx": b'{"cpuid_modifiers": [{"leaf": "0x1", "subleaf": "0x0", "flags": 0, '
                 b'"modifiers": [{"register": "ecx", "bitmap": '
                 b'"0bx0xxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}]}]}',
    "msr": b'{"msr_modifiers": [{"addr": "0x277", "bitmap": "0b00000100"}]}',
    "full": b'{"kvm_capabilities": ["171", "!56"], "cpuid_modifiers": [{"leaf": "0x7", '
            b'"subleaf": "0x0", "flags": 1, "modifiers": [{"register": "ebx", "bitmap": '
            b'"0b1111_1111_1110_1111_1101_1010_0001_0100"}, {"register": "ebx", "bitmap": '
            b'"0bxxxx1"}]}, {"leaf": "2147483649", "subleaf": "0b0", "flags": 0, "modifiers": '
            b'[{"register": "edx", "bitmap": "0"}]}], "msr_modifiers": [{"addr": "0x10a", '
            b'"bitmap": "0b0000000000000000000000000000000000000000000011111111111111111111"}, '
            b'{"addr": "0x10a", "bitmap": "x1x"}]}',
}


# --- balloon_request --------------------------------------------------------
# Raw format, described in fuzz_targets/balloon_request.rs (descriptors as
# for blk_request; sel 3 is a page number).
B_INFLATE, B_DEFLATE, B_STATS, B_REPORT, B_HINT = 0, 1, 2, 3, 4
B_AVAIL_IDX = 0x80
PAGE_NR = 3


def balloon_input(log2_size, kind, descs, heads, data=b"", avail_idx=None):
    out = u8(log2_size | kind << 4 | (B_AVAIL_IDX if avail_idx is not None else 0))
    if avail_idx is not None:
        out += u16(avail_idx)
    out += u8(len(descs)) + b"".join(descs)
    out += u8(len(heads)) + b"".join(u16(h) for h in heads)
    return out + data


def pfns(*numbers):
    return b"".join(struct.pack("<I", n) for n in numbers)


BALLOON_REQUEST = {
    # Pages 0x20, 0x21 (second region) and 0x3 (first region).
    "inflate": balloon_input(
        2, B_INFLATE, [blk_desc(IN_DATA1, 0x0, 12)], [0], pfns(0x20, 0x21, 0x3)),
    # A page in the hole, one past the end, the largest PFN, a length that
    # is not whole PFNs, a device-writable list.
    "inflate_hostile": balloon_input(
        3, B_INFLATE,
        [blk_desc(IN_DATA1, 0x0, 8), blk_desc(IN_DATA1, 0x8, 4),
         blk_desc(IN_DATA1, 0xc, 4), blk_desc(IN_DATA1, 0x0, 6),
         blk_desc(IN_DATA1, 0x0, 4, F_WRITE)],
        [0, 1, 2, 3, 4], pfns(0x20, 0x18, 0x40, 0xFFFFFFFF)),
    "deflate": balloon_input(
        1, B_DEFLATE, [blk_desc(IN_DATA1, 0x0, 8)], [0], pfns(0x22, 0x23)),
    "stats": balloon_input(
        1, B_STATS, [blk_desc(IN_DATA1, 0x0, 30)], [0],
        struct.pack("<HQHQHQ", 4, 0x1234000, 5, 0x8000000, 99, 1)),
    "stats_two_and_odd": balloon_input(
        2, B_STATS, [blk_desc(IN_DATA1, 0x0, 10), blk_desc(IN_DATA1, 0x0, 7)],
        [0, 1], struct.pack("<HQ", 3, 7)),
    "report": balloon_input(
        2, B_REPORT,
        [blk_desc(PAGE_NR, 0x21, 0x2000, F_WRITE | F_NEXT, 1),
         blk_desc(PAGE_NR, 0x3, 0x1000, F_WRITE),
         blk_desc(PAGE_NR, 0xf, 0x2000, F_WRITE),
         blk_desc(RAW, 0x20800, 0x1000, F_WRITE)],
        [0, 2, 3]),
    "hint_run": balloon_input(
        2, B_HINT,
        [blk_desc(IN_DATA1, 0x0, 4), blk_desc(PAGE_NR, 0x24, 0x2000, F_WRITE),
         blk_desc(IN_DATA1, 0x4, 4), blk_desc(PAGE_NR, 0x26, 0x1000, F_WRITE)],
        [0, 1, 2, 3], struct.pack("<II", 2, 0)),
    "indirect": balloon_input(
        2, B_INFLATE, [blk_desc(IN_DATA1, 0x0, 16, F_INDIRECT)], [0],
        struct.pack("<QIHH", 0x2100, 8, 0, 0) + b"\0" * (0x100 - 16) + pfns(0x25, 0x3)),
    "loops_and_bad_heads": balloon_input(
        2, B_INFLATE,
        [blk_desc(IN_DATA1, 0x0, 4, F_NEXT, 1), blk_desc(IN_DATA1, 0x0, 4, F_NEXT, 0)],
        [0, 9, 0xFFFF], pfns(0x20)),
    "avail_overflow": balloon_input(
        1, B_INFLATE, [blk_desc(IN_DATA1, 0x0, 4)], [0], pfns(0x20), avail_idx=5),
    # A looping list naming its own page (0x2), posted twice with a bad head
    # between: the second reading finds zeroes.
    "list_releases_its_own_page": balloon_input(
        2, B_INFLATE,
        [blk_desc(IN_DATA1, 0x1, 0, F_NEXT, 1), blk_desc(IN_DATA1, 0x0, 4, F_NEXT, 0)],
        [0, 0x2000, 0], pfns(0x2)),
}


def write_corpus(target, seeds):
    directory = os.path.join(HERE, "corpus", target)
    os.makedirs(directory, exist_ok=True)
    for name, content in seeds.items():
        with open(os.path.join(directory, name), "wb") as f:
            f.write(content)


def main():
    write_corpus("bus", BUS)
    write_corpus("uart", UART)
    write_corpus("i8042", I8042)
    write_corpus("config", CONFIG)
    write_corpus("kernel_loader", KERNEL)
    write_corpus("virtio_mmio", VIRTIO_MMIO)
    write_corpus("blk_request", BLK_REQUEST)
    write_corpus("rng_request", RNG_REQUEST)
    write_corpus("cpu_template", CPU_TEMPLATE)
    write_corpus("balloon_request", BALLOON_REQUEST)


if __name__ == "__main__":
    main()
