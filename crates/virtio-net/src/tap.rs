// SPDX-License-Identifier: Apache-2.0

//! The host side: a TAP device with a virtio-net header on every frame
//! (Linux `Documentation/networking/tuntap.rst`).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use crate::{Error, MAX_TAP_NAME_LEN, VNET_HDR_LEN};

/// An open TAP device. The interface disappears when this is dropped,
/// unless it was made persistent (`ip tuntap add`) beforehand.
#[derive(Debug)]
pub(crate) struct Tap {
    file: File,
    name: String,
}

/// Checks that `name` can name a TAP device: it fits in `ifreq.ifr_name`
/// with its NUL and holds no character the kernel refuses.
pub fn check_name(name: &str) -> Result<(), Error> {
    if name.len() > MAX_TAP_NAME_LEN {
        return Err(Error::TapNameTooLong {
            name: name.to_string(),
            len: name.len(),
        });
    }
    // The kernel rejects '/' in interface names (dev_valid_name); a NUL
    // would silently truncate the name.
    if name.bytes().any(|b| b == 0 || b == b'/') {
        return Err(Error::TapNameInvalid(name.to_string()));
    }
    Ok(())
}

fn ioctl_result(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Tap {
    /// Attaches to (or creates) the TAP device `name`, non-blocking, with
    /// `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` (Firecracker's flags: no
    /// IFF_ONE_QUEUE, which Linux ignores since 3.8) and a
    /// [`VNET_HDR_LEN`]-byte virtio-net header. Offloads start disabled.
    pub(crate) fn open(name: &str) -> Result<Tap, Error> {
        check_name(name)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|source| Error::OpenTun {
                name: name.to_string(),
                source,
            })?;

        // SAFETY: ifreq is plain old data; all zeroes is a valid value.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as _;
        // SAFETY: TUNSETIFF reads and writes one ifreq, which lives across
        // the call; the descriptor belongs to `file`.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF as _, &mut ifr) };
        ioctl_result(ret).map_err(|source| Error::OpenTap {
            name: name.to_string(),
            source,
        })?;
        // The kernel writes back the name it used (it expands a "%d").
        let actual: Vec<u8> = ifr
            .ifr_name
            .iter()
            .take_while(|c| **c != 0)
            .map(|c| *c as u8)
            .collect();
        let tap = Tap {
            file,
            name: String::from_utf8_lossy(&actual).into_owned(),
        };

        let size = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int, which lives across the
        // call; the descriptor belongs to `tap.file`.
        let ret = unsafe { libc::ioctl(tap.as_raw_fd(), libc::TUNSETVNETHDRSZ as _, &size) };
        ioctl_result(ret).map_err(|source| Error::TapVnetHdrSize {
            name: tap.name.clone(),
            size: VNET_HDR_LEN,
            source,
        })?;
        // A persistent TAP keeps the offloads of its previous user: the
        // driver has not negotiated any yet.
        tap.set_offload(0).map_err(|source| Error::TapOffload {
            name: tap.name.clone(),
            flags: 0,
            source,
        })?;
        Ok(tap)
    }

    /// The interface name (as the kernel reported it).
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// Tells the TAP which offloads its reader handles (TUN_F_* flags):
    /// frames with partial checksums or GSO come out of the TAP only when
    /// enabled here.
    pub(crate) fn set_offload(&self, flags: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value; the descriptor
        // belongs to `self.file`.
        let ret = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD as _,
                libc::c_ulong::from(flags),
            )
        };
        ioctl_result(ret)
    }

    /// Reads one frame (header included) into `buf`. Returns the frame's
    /// full length, which is larger than `buf.len()` when the frame did not
    /// fit and was truncated (the TAP reports the length of the frame, not
    /// what it copied).
    pub(crate) fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            // SAFETY: the kernel writes at most `buf.len()` bytes into the
            // buffer, which is valid for writes for its whole length.
            let ret =
                unsafe { libc::read(self.file.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if ret >= 0 {
                return Ok(ret as usize);
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }

    /// Writes one frame (header included).
    pub(crate) fn write_frame(&self, frame: &[u8]) -> io::Result<usize> {
        loop {
            // SAFETY: the kernel reads at most `frame.len()` bytes from the
            // slice.
            let ret =
                unsafe { libc::write(self.file.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
            if ret >= 0 {
                return Ok(ret as usize);
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}
