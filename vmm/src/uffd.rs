//! The Uffd memory backend of `PUT /snapshot/load`, as Firecracker speaks
//! it: guest memory is anonymous and registered with a userfaultfd; the
//! userfaultfd and a JSON description of the regions go to the page-fault
//! handler listening on `backend_path`, which then populates each page the
//! guest (or a device) first touches, from wherever it keeps the memory.
//!
//! The message is one `sendmsg` with the userfaultfd as `SCM_RIGHTS` and
//! this body: `[{"base_host_virt_addr": .., "size": .., "offset": ..,
//! "page_size": 4096, "page_size_kib": 4096}, ...]` (Firecracker's
//! `GuestRegionUffdMapping`; `page_size_kib` holds bytes, as Firecracker's
//! deprecated field does).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use ember_snapshot::MemoryRegion;
use serde::Serialize;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// linux/userfaultfd.h.
const UFFD_API: u64 = 0xAA;
/// `_IOWR(0xAA, 0x3F, struct uffdio_api)`.
const UFFDIO_API: libc::c_ulong = 0xC018_AA3F;
/// `_IOWR(0xAA, 0x00, struct uffdio_register)`.
const UFFDIO_REGISTER: libc::c_ulong = 0xC020_AA00;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
/// Firecracker asks for it (balloon devices); a handler may rely on it.
const UFFD_FEATURE_EVENT_REMOVE: u64 = 1 << 3;
/// Ember's guest memory uses regular pages.
const PAGE_SIZE: usize = 4096;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioRegister {
    start: u64,
    len: u64,
    mode: u64,
    ioctls: u64,
}

/// One region as the page-fault handler learns it.
#[derive(Serialize)]
struct RegionMapping {
    base_host_virt_addr: u64,
    size: usize,
    offset: u64,
    page_size: usize,
    page_size_kib: usize,
}

/// What keeps a Uffd-backed VM's memory served: the userfaultfd (a copy
/// stays here so that a handler that exits leaves the guest waiting rather
/// than reading zeros) and the connection to the handler.
#[derive(Debug)]
pub struct UffdBackend {
    _uffd: OwnedFd,
    _socket: UnixStream,
}

fn os_error(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

/// Anonymous guest memory in the snapshot's layout, registered with a new
/// userfaultfd that is sent to the handler at `socket`.
///
/// # Errors
///
/// What failed, in words.
pub fn guest_memory(
    layout: &[MemoryRegion],
    socket: &Path,
) -> Result<(GuestMemoryMmap, UffdBackend), String> {
    let ranges: Vec<(GuestAddress, usize)> = layout
        .iter()
        .map(|r| {
            usize::try_from(r.size)
                .map(|size| (GuestAddress(r.guest_addr), size))
                .map_err(|e| e.to_string())
        })
        .collect::<Result<_, _>>()?;
    let mem = GuestMemoryMmap::from_ranges(&ranges).map_err(|e| e.to_string())?;

    // SAFETY: userfaultfd takes flags only and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if fd < 0 {
        return Err(os_error("cannot create a userfaultfd"));
    }
    // SAFETY: the syscall returned a new fd that nothing else owns.
    let uffd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut api = UffdioApi {
        api: UFFD_API,
        features: UFFD_FEATURE_EVENT_REMOVE,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API reads and writes a `struct uffdio_api`, which
    // `api` is laid out as, and lives across the call.
    if unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_API, &mut api) } < 0 {
        return Err(os_error("UFFDIO_API failed"));
    }

    let mut mappings = Vec::new();
    for (region, saved) in mem.iter().zip(layout) {
        let start = region.as_ptr() as u64;
        let mut reg = UffdioRegister {
            start,
            len: region.len(),
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes a `struct
        // uffdio_register`, which `reg` is laid out as; the range is a
        // mapping `mem` owns.
        if unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_REGISTER, &mut reg) } < 0 {
            return Err(os_error(&format!(
                "cannot register guest memory at {:#x} with the userfaultfd",
                saved.guest_addr
            )));
        }
        mappings.push(RegionMapping {
            base_host_virt_addr: start,
            size: region.len() as usize,
            offset: saved.file_offset,
            page_size: PAGE_SIZE,
            page_size_kib: PAGE_SIZE,
        });
    }
    let body = serde_json::to_string(&mappings).map_err(|e| e.to_string())?;
    let stream = UnixStream::connect(socket).map_err(|e| {
        format!(
            "cannot connect to the page-fault handler at {}: {e}",
            socket.display()
        )
    })?;
    stream
        .send_with_fd(body.as_bytes(), uffd.as_raw_fd())
        .map_err(|e| format!("cannot send the userfaultfd to the page-fault handler: {e}"))?;
    Ok((
        mem,
        UffdBackend {
            _uffd: uffd,
            _socket: stream,
        },
    ))
}
