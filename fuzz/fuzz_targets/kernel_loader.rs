// SPDX-License-Identifier: Apache-2.0

//! Fuzzes `ember_boot::load_kernel` on arbitrary kernel images (ELF vmlinux,
//! PVH ELF, bzImage or garbage) loaded into a 32 MiB guest memory that is
//! created once and reused.
//!
//! A kernel that loads must lie inside guest memory (`kernel_load` below
//! `kernel_end`, `kernel_end` within the 32 MiB), and a bzImage is entered
//! 0x200 bytes past its load address at `HIMEM_START`.

#![no_main]

use std::io::Cursor;
use std::sync::OnceLock;

use ember_boot::layout::HIMEM_START;
use ember_boot::{load_kernel, BootProtocol};
use libfuzzer_sys::fuzz_target;
use vm_memory::GuestMemoryMmap;

const MEM_SIZE_MIB: usize = 32;

fn guest_memory() -> &'static GuestMemoryMmap {
    static MEM: OnceLock<GuestMemoryMmap> = OnceLock::new();
    MEM.get_or_init(|| {
        ember_boot::create_guest_memory(MEM_SIZE_MIB).expect("32 MiB of guest memory")
    })
}

fuzz_target!(|data: &[u8]| {
    let mem = guest_memory();
    let Ok(entry) = load_kernel(mem, &mut Cursor::new(data)) else {
        return;
    };
    let mem_end = (MEM_SIZE_MIB as u64) << 20;
    let load = entry.kernel_load.0;
    assert!(
        load < entry.kernel_end && entry.kernel_end <= mem_end,
        "kernel [{load:#x}, {:#x}) outside guest memory",
        entry.kernel_end
    );
    if entry.setup_header.is_some() {
        // 64-bit boot protocol entry of a bzImage (Documentation/arch/x86/boot.rst).
        assert_eq!(entry.protocol, BootProtocol::LinuxBoot);
        assert_eq!(load, HIMEM_START);
        assert_eq!(entry.entry_addr.0, HIMEM_START + 0x200);
    }
});
