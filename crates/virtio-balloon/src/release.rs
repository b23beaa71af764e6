// SPDX-License-Identifier: Apache-2.0

//! Giving guest pages back to the host.
//!
//! How depends on how the region is mapped:
//! - private anonymous memory (Ember's guest memory at boot):
//!   `madvise(MADV_DONTNEED)` drops the pages; the guest reads zeroes there
//!   next time;
//! - shared memory (a memfd or a file mapped `MAP_SHARED`):
//!   `MADV_DONTNEED` would only unmap the pages from this process, so
//!   `MADV_REMOVE` punches the hole in the backing object;
//! - a private file mapping (guest memory restored from a snapshot's memory
//!   file): `MADV_DONTNEED` would map the file's page again on the next
//!   access, so a fresh anonymous private mapping is put over the range
//!   (`MAP_FIXED`), which holds no page until the guest touches it.

use std::io;

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::parse::is_guest_pages;

/// Why a range was not released.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    /// The range is not whole 4 KiB pages inside one guest memory region.
    #[error("range {addr:#x}+{len:#x} is not whole pages of one guest memory region")]
    Range {
        /// Guest address.
        addr: u64,
        /// Length in bytes.
        len: u64,
    },
    /// The host refused the call.
    #[error("cannot release {addr:#x}+{len:#x}: {source}")]
    Host {
        /// Guest address.
        addr: u64,
        /// Length in bytes.
        len: u64,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
}

/// Releases `[addr, addr + len)` of guest memory to the host. The range
/// must be whole 4 KiB pages inside one region; anything else is refused
/// before any call is made, so no host memory outside the guest is ever
/// touched.
pub fn release(mem: &GuestMemoryMmap, addr: GuestAddress, len: u64) -> Result<(), ReleaseError> {
    let range = || ReleaseError::Range { addr: addr.0, len };
    if !is_guest_pages(mem, addr, len) {
        return Err(range());
    }
    let (region, offset) = mem.to_region_addr(addr).ok_or_else(range)?;
    let host = region.get_host_address(offset).map_err(|_| range())?;
    let len_usize = usize::try_from(len).map_err(|_| range())?;
    let shared = region.flags() & libc::MAP_SHARED != 0;
    let file_backed = region.file_offset().is_some();
    let host_err = |source| ReleaseError::Host {
        addr: addr.0,
        len,
        source,
    };
    if file_backed && !shared {
        // SAFETY: `host..host + len` lies inside this region's mapping (the
        // range was checked against the region above), which the region
        // owns for its lifetime; replacing it with an anonymous private
        // mapping of the same protection keeps it valid for every access
        // vm-memory and KVM make (they see zeroes, as after MADV_DONTNEED).
        let ret = unsafe {
            libc::mmap(
                host.cast(),
                len_usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_FIXED | libc::MAP_ANONYMOUS | libc::MAP_PRIVATE | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ret == libc::MAP_FAILED {
            return Err(host_err(io::Error::last_os_error()));
        }
        return Ok(());
    }
    let advice = if shared {
        libc::MADV_REMOVE
    } else {
        libc::MADV_DONTNEED
    };
    // SAFETY: `host..host + len` lies inside this region's mapping (checked
    // above); dropping its pages leaves the mapping in place, and guest
    // memory is only ever accessed volatilely, so a page that reads as zero
    // afterwards is what the guest asked for.
    let ret = unsafe { libc::madvise(host.cast(), len_usize, advice) };
    if ret != 0 {
        return Err(host_err(io::Error::last_os_error()));
    }
    Ok(())
}
