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


if __name__ == "__main__":
    main()
