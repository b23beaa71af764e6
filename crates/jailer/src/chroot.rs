// SPDX-License-Identifier: Apache-2.0

//! Moving the process into its jail: a new mount namespace and `pivot_root`.
//!
//! The steps and their order are Firecracker's (`chroot.rs` of its jailer):
//!
//! 1. `unshare(CLONE_NEWNS)`: a private copy of the mount table;
//! 2. `mount(NULL, "/", NULL, MS_SLAVE | MS_REC, NULL)`: nothing done from now
//!    on propagates back to the host (pivot_root(2) also refuses a shared
//!    parent mount);
//! 3. bind-mount the jail root on itself (pivot_root(2) wants the new root to
//!    be a mount point);
//! 4. `chdir` into it, `mkdir old_root`, `pivot_root(".", "old_root")`;
//! 5. `chdir("/")`, `umount2("old_root", MNT_DETACH)`, `rmdir("old_root")`.
//!
//! After step 5 the host's file systems are unreachable from the process.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::ptr;

/// Name of the directory the old root is parked in during `pivot_root`.
pub const OLD_ROOT_DIR: &str = "old_root";

/// A step of [`chroot`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ChrootError {
    /// The path holds a NUL byte.
    #[error("jail path {} contains a NUL byte", .0.display())]
    NulInPath(PathBuf),
    /// `unshare(CLONE_NEWNS)` failed.
    #[error("cannot unshare into a new mount namespace: {0}")]
    Unshare(#[source] io::Error),
    /// Making every mount a slave failed.
    #[error("cannot change the propagation of / to slave: {0}")]
    MountPropagation(#[source] io::Error),
    /// The jail root could not be bind-mounted on itself.
    #[error("cannot bind-mount the jail root {} on itself: {source}", path.display())]
    BindMount {
        /// The jail root.
        path: PathBuf,
        /// Why `mount` failed.
        #[source]
        source: io::Error,
    },
    /// `chdir` into the jail root failed.
    #[error("cannot change directory to the jail root {}: {source}", path.display())]
    Chdir {
        /// The jail root.
        path: PathBuf,
        /// Why `chdir` failed.
        #[source]
        source: io::Error,
    },
    /// The old-root directory could not be made.
    #[error("cannot create {} before pivoting root: {source}", path.display())]
    MkdirOldRoot {
        /// The directory.
        path: PathBuf,
        /// Why `mkdir` failed.
        #[source]
        source: io::Error,
    },
    /// `pivot_root` failed.
    #[error("cannot pivot root into {}: {source}", path.display())]
    PivotRoot {
        /// The jail root.
        path: PathBuf,
        /// Why `pivot_root` failed.
        #[source]
        source: io::Error,
    },
    /// `chdir("/")` after pivoting failed.
    #[error("cannot change directory to the new root: {0}")]
    ChdirNewRoot(#[source] io::Error),
    /// The old root could not be detached.
    #[error("cannot unmount the old root /{OLD_ROOT_DIR}: {0}")]
    UmountOldRoot(#[source] io::Error),
    /// The old-root directory could not be removed.
    #[error("cannot remove the old root directory /{OLD_ROOT_DIR}: {0}")]
    RmdirOldRoot(#[source] io::Error),
}

impl ChrootError {
    /// Whether the process still sees the host's root (the step failed
    /// before `pivot_root` succeeded), so host paths can still be cleaned.
    pub fn before_pivot(&self) -> bool {
        !matches!(
            self,
            Self::ChdirNewRoot(_) | Self::UmountOldRoot(_) | Self::RmdirOldRoot(_)
        )
    }
}

fn cstring(path: &Path) -> Result<CString, ChrootError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| ChrootError::NulInPath(path.into()))
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Makes `root` the process's `/`, in a new mount namespace.
///
/// If a step before `pivot_root` fails, the bind mount and the old-root
/// directory made so far are taken back, so `root` can be removed.
///
/// # Errors
///
/// The step that failed; see [`ChrootError::before_pivot`].
pub fn chroot(root: &Path) -> Result<(), ChrootError> {
    let root_c = cstring(root)?;
    let slash = c"/";
    let dot = c".";
    let old_root = c"old_root";
    let old_root_host = root.join(OLD_ROOT_DIR);

    // SAFETY: unshare takes no pointers; the flag is a valid CLONE_* constant.
    check(unsafe { libc::unshare(libc::CLONE_NEWNS) }).map_err(ChrootError::Unshare)?;

    // SAFETY: `slash` is a NUL-terminated string that outlives the call; the
    // other pointers may be NULL for a propagation change (mount(2)).
    check(unsafe {
        libc::mount(
            ptr::null(),
            slash.as_ptr(),
            ptr::null(),
            libc::MS_SLAVE | libc::MS_REC,
            ptr::null(),
        )
    })
    .map_err(ChrootError::MountPropagation)?;

    // SAFETY: `root_c` is NUL-terminated and outlives the call; a bind mount
    // ignores the type and data arguments.
    check(unsafe {
        libc::mount(
            root_c.as_ptr(),
            root_c.as_ptr(),
            ptr::null(),
            libc::MS_BIND | libc::MS_REC,
            ptr::null(),
        )
    })
    .map_err(|source| ChrootError::BindMount {
        path: root.into(),
        source,
    })?;

    let undo_bind = || {
        // SAFETY: `root_c` is NUL-terminated and outlives the call.
        unsafe { libc::umount2(root_c.as_ptr(), libc::MNT_DETACH) };
    };

    // SAFETY: `root_c` is NUL-terminated and outlives the call.
    if let Err(source) = check(unsafe { libc::chdir(root_c.as_ptr()) }) {
        undo_bind();
        return Err(ChrootError::Chdir {
            path: root.into(),
            source,
        });
    }

    // SAFETY: `old_root` is NUL-terminated and relative to the jail root,
    // the current directory.
    let ret = unsafe { libc::mkdir(old_root.as_ptr(), libc::S_IRUSR | libc::S_IWUSR) };
    if let Err(source) = check(ret) {
        undo_bind();
        return Err(ChrootError::MkdirOldRoot {
            path: old_root_host,
            source,
        });
    }

    // SAFETY: both strings are NUL-terminated; glibc has no pivot_root
    // wrapper, so the raw syscall takes (new_root, put_old).
    let ret = unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), old_root.as_ptr()) };
    if ret < 0 {
        let source = io::Error::last_os_error();
        // SAFETY: `old_root` is NUL-terminated; we are still in the jail root.
        unsafe { libc::rmdir(old_root.as_ptr()) };
        undo_bind();
        return Err(ChrootError::PivotRoot {
            path: root.into(),
            source,
        });
    }

    // pivot_root(2) does not promise the current directory is the new root.
    // SAFETY: `slash` is NUL-terminated.
    check(unsafe { libc::chdir(slash.as_ptr()) }).map_err(ChrootError::ChdirNewRoot)?;

    // SAFETY: `old_root` is NUL-terminated, relative to the new root.
    check(unsafe { libc::umount2(old_root.as_ptr(), libc::MNT_DETACH) })
        .map_err(ChrootError::UmountOldRoot)?;

    // SAFETY: `old_root` is NUL-terminated, relative to the new root.
    check(unsafe { libc::rmdir(old_root.as_ptr()) }).map_err(ChrootError::RmdirOldRoot)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_after_pivot_are_flagged() {
        let e = || io::Error::from_raw_os_error(libc::EPERM);
        assert!(ChrootError::Unshare(e()).before_pivot());
        assert!(ChrootError::PivotRoot {
            path: "/x".into(),
            source: e()
        }
        .before_pivot());
        assert!(!ChrootError::UmountOldRoot(e()).before_pivot());
        assert!(!ChrootError::RmdirOldRoot(e()).before_pivot());
        assert!(!ChrootError::ChdirNewRoot(e()).before_pivot());
    }

    #[test]
    fn a_nul_in_the_path_is_refused_before_any_syscall() {
        let err = chroot(Path::new("/tmp/a\0b")).unwrap_err();
        assert!(matches!(err, ChrootError::NulInPath(_)));
    }
}
