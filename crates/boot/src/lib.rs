// SPDX-License-Identifier: Apache-2.0

//! The guest-visible x86_64 machine of a microVM, and how a kernel is put
//! into it.
//!
//! Everything here is a pure function over guest memory
//! ([`vm_memory::GuestMemoryMmap`]); nothing needs KVM. The machine is
//! Firecracker's: the same memory map ([`layout`]), e820 map, MP table,
//! boot GDT and identity page tables, and the same zero page (64-bit Linux
//! boot protocol) or `hvm_start_info` (Xen PVH ABI), so a guest cannot tell
//! the two monitors apart.
//!
//! Kernel images are parsed and copied by linux-loader's loaders; the boot
//! structures are linux-loader's `boot_params` and `hvm_start_info`, written
//! by its boot configurators.
//!
//! A boot goes: [`create_guest_memory`], [`load_kernel`], optionally
//! [`load_initrd`], then [`configure_system`]; the vCPU code then writes
//! [`gdt::write_gdt_and_idt`] and, for the 64-bit Linux entry,
//! [`paging::setup_identity_page_tables`], and starts the boot vCPU at
//! [`KernelEntry::entry_addr`].
//!
//! # Example
//!
//! ```no_run
//! use std::fs::File;
//!
//! use ember_boot::{gdt, layout, paging, BootProtocol};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mem = ember_boot::create_guest_memory(256)?;
//! let kernel = ember_boot::load_kernel(&mem, &mut File::open("vmlinux")?)?;
//! let initrd = ember_boot::load_initrd(&mem, &mut File::open("initrd.img")?)?;
//!
//! let cmdline = ember_boot::cmdline_from_str("console=ttyS0 reboot=k panic=1")?;
//! ember_boot::configure_system(&mem, &kernel, &cmdline, Some(&initrd), 2)?;
//!
//! match kernel.protocol {
//!     BootProtocol::LinuxBoot => {
//!         gdt::write_gdt_and_idt(&mem, &gdt::GDT_TABLE)?;
//!         let cr3 = paging::setup_identity_page_tables(&mem)?;
//!         // Long mode, CR3 = cr3, RIP = entry, RSI = layout::ZERO_PAGE_START.
//!         # let _ = (cr3, layout::ZERO_PAGE_START);
//!     }
//!     BootProtocol::PvhBoot => {
//!         gdt::write_gdt_and_idt(&mem, &gdt::PVH_GDT_TABLE)?;
//!         // 32-bit protected mode, paging off, RIP = entry,
//!         // RBX = layout::PVH_INFO_START.
//!     }
//! }
//! # Ok(())
//! # }
//! ```

#![deny(missing_docs)]

use std::io;

use vm_memory::GuestAddress;

pub mod acpi;
pub mod gdt;
pub mod layout;
mod loader;
mod memory;
pub mod mptable;
pub mod paging;
mod system;
#[cfg(test)]
mod test_images;

pub use acpi::{create_acpi_tables, VirtioMmioDeviceInfo};
pub use linux_loader::cmdline::Cmdline;
pub use loader::{load_initrd, load_kernel, InitrdConfig};
pub use memory::{arch_memory_regions, create_guest_memory};
pub use system::{
    cmdline_from_str, configure_system, configure_system_with_rsdp, e820_map, new_cmdline,
    E820Entry, E820_RAM, E820_RESERVED,
};

/// How the boot vCPU enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootProtocol {
    /// 64-bit Linux boot protocol: long mode with identity paging, %rsi
    /// pointing at the zero page (Documentation/arch/x86/boot.rst).
    LinuxBoot,
    /// Xen PVH: 32-bit protected mode, paging off, %ebx pointing at
    /// `hvm_start_info` (xen/include/public/arch-x86/hvm/start_info.h).
    PvhBoot,
}

impl std::fmt::Display for BootProtocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BootProtocol::LinuxBoot => f.write_str("Linux 64-bit boot protocol"),
            BootProtocol::PvhBoot => f.write_str("PVH boot protocol"),
        }
    }
}

/// A loaded kernel: where it is and how to enter it.
#[derive(Clone, Debug)]
pub struct KernelEntry {
    /// Boot protocol to use.
    pub protocol: BootProtocol,
    /// Address the boot vCPU starts at: `e_entry` for a vmlinux booted
    /// through the Linux protocol, the PVH note's entry for PVH, the load
    /// address plus 0x200 for a bzImage.
    pub entry_addr: GuestAddress,
    /// Lowest guest address the kernel was loaded at (lowest `PT_LOAD`
    /// physical address for an ELF, [`layout::HIMEM_START`] for a bzImage).
    pub kernel_load: GuestAddress,
    /// First guest address past the kernel. For an ELF, the end of the
    /// highest `PT_LOAD` segment including its bss; for a bzImage, the end
    /// of the image or of the `init_size` bytes its decompressor works in,
    /// whichever is higher.
    pub kernel_end: u64,
    /// The bzImage setup header (`boot_params.hdr` as found in the image),
    /// used to seed the zero page. `None` for an ELF.
    pub setup_header: Option<linux_loader::loader::bootparam::setup_header>,
}

/// Errors of guest memory creation, kernel and initrd loading and boot
/// structure setup.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The requested guest memory size is zero or too large.
    #[error("guest memory size of {mib} MiB is invalid: it must be between 1 and {max} MiB")]
    InvalidMemorySize {
        /// Requested size in MiB.
        mib: usize,
        /// Largest accepted size in MiB.
        max: usize,
    },
    /// Guest memory could not be mapped.
    #[error("cannot allocate {mib} MiB of guest memory: {source}")]
    GuestMemoryAlloc {
        /// Requested size in MiB.
        mib: usize,
        /// The mmap failure.
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    /// Reading or seeking the kernel image failed.
    #[error("cannot read the kernel image: {0}")]
    KernelRead(#[source] io::Error),
    /// The kernel image has neither the ELF magic nor the bzImage `HdrS`
    /// header.
    #[error("kernel image is neither an ELF vmlinux nor a bzImage")]
    UnknownKernelFormat,
    /// The ELF image is valid but not a bootable x86_64 kernel.
    #[error("unsupported ELF kernel image: {0}")]
    UnsupportedElf(String),
    /// A part of the ELF image lies past the end of the file.
    #[error(
        "truncated ELF kernel image: {what} extend(s) to byte {end}, past the end of the \
         {file_len}-byte file"
    )]
    TruncatedElf {
        /// The part that is cut off.
        what: String,
        /// File offset the part extends to.
        end: u64,
        /// Length of the file.
        file_len: u64,
    },
    /// A part of the bzImage lies past the end of the file.
    #[error(
        "truncated bzImage: {what} extends to byte {end}, past the end of the {file_len}-byte file"
    )]
    TruncatedBzImage {
        /// The part that is cut off.
        what: &'static str,
        /// File offset the part extends to.
        end: u64,
        /// Length of the file.
        file_len: u64,
    },
    /// The bzImage has no 64-bit entry point.
    #[error(
        "bzImage does not support the 64-bit boot protocol (boot protocol version {version:#06x}, \
         xloadflags {xloadflags:#x}; version 2.12 or later with XLF_KERNEL_64 is required)"
    )]
    BzImageNot64Bit {
        /// `hdr.version`.
        version: u16,
        /// `hdr.xloadflags`.
        xloadflags: u16,
    },
    /// A kernel segment (or the bzImage decompression area) lies outside
    /// guest RAM.
    #[error("kernel ({size} bytes at {addr:#x}) does not fit in guest memory of {mem_mib} MiB")]
    KernelDoesNotFit {
        /// Bytes needed.
        size: u64,
        /// Guest address they are needed at.
        addr: u64,
        /// Guest memory size in MiB.
        mem_mib: u64,
    },
    /// linux-loader failed to copy the kernel.
    #[error("failed to load the kernel image: {0}")]
    KernelLoad(#[source] linux_loader::loader::Error),
    /// Reading or seeking the initrd image failed.
    #[error("cannot read the initrd image: {0}")]
    InitrdRead(#[source] io::Error),
    /// The initrd image is empty.
    #[error("initrd image is empty")]
    EmptyInitrd,
    /// The initrd does not fit in low RAM above 1 MiB.
    #[error(
        "initrd ({size} bytes) does not fit in guest RAM between 1 MiB and the end of low RAM \
         at {low_ram:#x}"
    )]
    InitrdDoesNotFit {
        /// Initrd size in bytes.
        size: u64,
        /// End of the RAM region that starts at 0.
        low_ram: u64,
    },
    /// Copying the initrd into guest memory failed.
    #[error("failed to copy the initrd into guest memory at {address:#x}: {source}")]
    InitrdLoad {
        /// Load address.
        address: u64,
        /// The guest memory error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// The initrd would overwrite the kernel.
    #[error(
        "initrd [{initrd_start:#x}, {initrd_end:#x}) overlaps the kernel \
         [{kernel_start:#x}, {kernel_end:#x}); give the guest more memory"
    )]
    InitrdOverlapsKernel {
        /// First initrd byte.
        initrd_start: u64,
        /// End of the initrd.
        initrd_end: u64,
        /// First kernel byte.
        kernel_start: u64,
        /// End of the kernel.
        kernel_end: u64,
    },
    /// The command line, counted with its terminating NUL, exceeds the
    /// space at [`layout::CMDLINE_START`].
    #[error("command line is {len} bytes, the limit is {limit}")]
    CmdlineTooLong {
        /// Length including the NUL.
        len: usize,
        /// [`layout::CMDLINE_MAX_SIZE`].
        limit: usize,
    },
    /// The command line is longer than the bzImage says it accepts
    /// (`hdr.cmdline_size`, boot protocol 2.06+).
    #[error("command line is {len} bytes, the kernel accepts at most {max}")]
    CmdlineTooLongForKernel {
        /// Length without the NUL.
        len: usize,
        /// `hdr.cmdline_size`.
        max: u32,
    },
    /// The command line is not valid.
    #[error("invalid command line: {0}")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// Writing the command line failed.
    #[error("failed to write the command line at {addr:#x}: {source}")]
    CmdlineWrite {
        /// [`layout::CMDLINE_START`].
        addr: u64,
        /// linux-loader's error.
        #[source]
        source: linux_loader::loader::Error,
    },
    /// A boot structure could not be written to guest memory.
    #[error("failed to write the {what} at {addr:#x}: {source}")]
    GuestWrite {
        /// The structure.
        what: &'static str,
        /// Its guest address.
        addr: u64,
        /// The guest memory error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// linux-loader's boot configurator failed to write the zero page or
    /// the PVH structures.
    #[error("failed to write the boot parameters: {0}")]
    BootParams(#[source] linux_loader::configurator::Error),
    /// The e820 map does not fit in the zero page.
    #[error("the e820 map has {0} entries, the zero page holds at most 128")]
    TooManyE820Entries(usize),
    /// The vCPU count is zero or above what the MP table can describe.
    #[error("invalid vCPU count {num_cpus}: the MP table describes 1 to {max} vCPUs")]
    InvalidCpuCount {
        /// Requested vCPUs.
        num_cpus: u8,
        /// [`mptable::MAX_SUPPORTED_CPUS`].
        max: u8,
    },
    /// Guest memory does not cover the MP table.
    #[error("MP table ({size} bytes at {addr:#x}) does not fit in guest memory")]
    MptableDoesNotFit {
        /// Table size.
        size: usize,
        /// [`layout::MPTABLE_START`].
        addr: u64,
    },
    /// The GDT would overlap the IDT.
    #[error("GDT of {entries} entries does not fit below the IDT (at most {max})")]
    GdtTooLarge {
        /// Entries passed.
        entries: usize,
        /// [`gdt::BOOT_GDT_MAX`].
        max: usize,
    },
}
