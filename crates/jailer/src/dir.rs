// SPDX-License-Identifier: Apache-2.0

//! Creating files in the jail without following symbolic links.
//!
//! The jailed user owns the jail root, so anything in it may have been
//! replaced by a symbolic link since the last run. A path-based `copy`,
//! `mknod` or `chown` would follow such a link out of the jail, as root. So
//! every entry the jailer creates is made relative to a [`Dir`]: a directory
//! descriptor opened with `O_DIRECTORY | O_NOFOLLOW`, one path component at
//! a time, and files are created with `O_CREAT | O_EXCL | O_NOFOLLOW`
//! (`mkdirat`, `mknodat` and `openat`): an existing entry, link or not, is
//! an error, never something written through.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Component, Path};

/// A directory opened with `O_DIRECTORY | O_NOFOLLOW`: entries are created
/// and opened relative to it, never through a path.
#[derive(Debug)]
pub struct Dir(OwnedFd);

/// What [`Dir::open_or_create`] found.
#[derive(Debug)]
pub struct Opened {
    /// The directory.
    pub dir: Dir,
    /// Whether this call created it.
    pub created: bool,
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// `name` as one path component: not empty, no `/`, not `.` or `..`.
fn component(name: &str) -> io::Result<CString> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not a single path component"),
        ));
    }
    CString::new(name).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a name"))
}

/// Opens the existing file at the absolute `path` for writing, with no
/// symbolic link in any component ([`Dir::open_absolute`] for its parent,
/// then [`Dir::open_existing_for_write`]).
///
/// # Errors
///
/// `InvalidInput` for a path without a parent or a name; the error of the
/// step that failed.
pub fn open_existing_for_write(path: &Path) -> io::Result<File> {
    let invalid = || {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a file path", path.display()),
        )
    };
    let parent = path.parent().ok_or_else(invalid)?;
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(invalid)?;
    Dir::open_absolute(parent)?.open_existing_for_write(name)
}

/// Whether `name` in `at` is a symbolic link (never follows it).
fn is_link(at: libc::c_int, name: &std::ffi::CStr) -> bool {
    // SAFETY: an all-zero `stat` is a valid value of this C struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `name` is NUL-terminated; fstatat writes into `st`.
    let ret = unsafe { libc::fstatat(at, name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) };
    ret == 0 && st.st_mode & libc::S_IFMT == libc::S_IFLNK
}

const DIR_FLAGS: libc::c_int =
    libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_RDONLY;

impl Dir {
    /// Opens the absolute directory `path` with `O_DIRECTORY | O_NOFOLLOW`
    /// on every component, starting from `/`: a symbolic link anywhere on
    /// the way fails with `ELOOP` (or `ENOTDIR`).
    ///
    /// # Errors
    ///
    /// `InvalidInput` for a relative path or one with `..`; the error of the
    /// `openat` that failed.
    pub fn open_absolute(path: &Path) -> io::Result<Dir> {
        let mut dir = Dir::open_fd(libc::AT_FDCWD, c"/")?;
        for part in path.components() {
            match part {
                Component::RootDir => {}
                Component::CurDir => {}
                Component::Normal(name) => {
                    let name = name.to_str().ok_or_else(|| {
                        io::Error::new(io::ErrorKind::InvalidInput, "a name is not UTF-8")
                    })?;
                    dir = dir.open_dir(name)?;
                }
                Component::ParentDir | Component::Prefix(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("{} is not a plain absolute path", path.display()),
                    ))
                }
            }
        }
        if !path.is_absolute() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not absolute", path.display()),
            ));
        }
        Ok(dir)
    }

    fn open_fd(at: libc::c_int, name: &std::ffi::CStr) -> io::Result<Dir> {
        // SAFETY: `name` is NUL-terminated and outlives the call; the flags
        // create nothing.
        let fd = match check(unsafe { libc::openat(at, name.as_ptr(), DIR_FLAGS) }) {
            Ok(fd) => fd,
            // With O_DIRECTORY, Linux reports a link as ENOTDIR: say ELOOP
            // ("Too many levels of symbolic links"), as O_NOFOLLOW alone does.
            Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) && is_link(at, name) => {
                return Err(io::Error::from_raw_os_error(libc::ELOOP))
            }
            Err(e) => return Err(e),
        };
        // SAFETY: openat returned a new descriptor that nothing else owns.
        Ok(Dir(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Opens the subdirectory `name`, refusing a symbolic link.
    ///
    /// # Errors
    ///
    /// `ELOOP` or `ENOTDIR` for a link or a non-directory, any other error
    /// of `openat`.
    pub fn open_dir(&self, name: &str) -> io::Result<Dir> {
        Dir::open_fd(self.0.as_raw_fd(), &component(name)?)
    }

    /// Creates the subdirectory `name` with `mode`, or opens it if it
    /// exists; a symbolic link or a non-directory in its place is an error.
    ///
    /// # Errors
    ///
    /// The error of `mkdirat` (other than `EEXIST`) or of [`Dir::open_dir`].
    pub fn open_or_create(&self, name: &str, mode: libc::mode_t) -> io::Result<Opened> {
        let c = component(name)?;
        // SAFETY: `c` is NUL-terminated; mkdirat never follows a link in
        // the last component.
        let created = match check(unsafe { libc::mkdirat(self.0.as_raw_fd(), c.as_ptr(), mode) }) {
            Ok(_) => true,
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => false,
            Err(e) => return Err(e),
        };
        Ok(Opened {
            dir: Dir::open_fd(self.0.as_raw_fd(), &c)?,
            created,
        })
    }

    /// Creates the regular file `name` for writing with
    /// `O_CREAT | O_EXCL | O_NOFOLLOW`: any existing entry is an error.
    ///
    /// # Errors
    ///
    /// `EEXIST` when `name` exists (a link included), any other error of
    /// `openat`.
    pub fn create_file(&self, name: &str, mode: libc::mode_t) -> io::Result<File> {
        let c = component(name)?;
        let flags =
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        // SAFETY: `c` is NUL-terminated; the mode is passed as the variadic
        // argument open(2) reads with O_CREAT.
        let fd = check(unsafe {
            libc::openat(self.0.as_raw_fd(), c.as_ptr(), flags, mode as libc::c_uint)
        })?;
        // SAFETY: openat returned a new descriptor that nothing else owns.
        Ok(unsafe { File::from_raw_fd(fd) })
    }

    /// Opens the existing file `name` for writing from its start
    /// (`O_TRUNC`), refusing a link (`O_NOFOLLOW`) and creating nothing.
    ///
    /// # Errors
    ///
    /// `ELOOP` for a link, `ENOENT` for a missing file, any other error of
    /// `openat`.
    pub fn open_existing_for_write(&self, name: &str) -> io::Result<File> {
        let c = component(name)?;
        let flags = libc::O_WRONLY | libc::O_TRUNC | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        // SAFETY: `c` is NUL-terminated; the flags create nothing.
        let fd = check(unsafe { libc::openat(self.0.as_raw_fd(), c.as_ptr(), flags) })?;
        // SAFETY: openat returned a new descriptor that nothing else owns.
        Ok(unsafe { File::from_raw_fd(fd) })
    }

    /// Creates the character device `name` (`mknodat`, which fails on any
    /// existing entry) with `mode` and `dev`, then gives it to `uid:gid`
    /// without following a link.
    ///
    /// # Errors
    ///
    /// `("create", e)` or `("change the owner of", e)`.
    pub fn mknod_owned(
        &self,
        name: &str,
        mode: libc::mode_t,
        dev: libc::dev_t,
        uid: u32,
        gid: u32,
    ) -> Result<(), (&'static str, io::Error)> {
        let c = component(name).map_err(|e| ("create", e))?;
        // SAFETY: `c` is NUL-terminated and outlives the call.
        check(unsafe { libc::mknodat(self.0.as_raw_fd(), c.as_ptr(), mode, dev) })
            .map_err(|e| ("create", e))?;
        // SAFETY: as above; AT_SYMLINK_NOFOLLOW changes the entry itself.
        check(unsafe {
            libc::fchownat(
                self.0.as_raw_fd(),
                c.as_ptr(),
                uid,
                gid,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        })
        .map_err(|e| ("change the owner of", e))?;
        Ok(())
    }

    /// Another descriptor for the same directory.
    ///
    /// # Errors
    ///
    /// The error of `fcntl(F_DUPFD_CLOEXEC)`.
    pub fn try_clone(&self) -> io::Result<Dir> {
        Ok(Dir(self.0.try_clone()?))
    }

    /// Sets the mode of the directory itself.
    ///
    /// # Errors
    ///
    /// The error of `fchmod`.
    pub fn chmod(&self, mode: libc::mode_t) -> io::Result<()> {
        // SAFETY: fchmod on a descriptor we own.
        check(unsafe { libc::fchmod(self.0.as_raw_fd(), mode) }).map(drop)
    }

    /// Gives the directory itself to `uid:gid`.
    ///
    /// # Errors
    ///
    /// The error of `fchown`.
    pub fn chown(&self, uid: u32, gid: u32) -> io::Result<()> {
        // SAFETY: fchown on a descriptor we own.
        check(unsafe { libc::fchown(self.0.as_raw_fd(), uid, gid) }).map(drop)
    }

    /// The owner of the directory itself.
    ///
    /// # Errors
    ///
    /// The error of `fstat`.
    pub fn owner(&self) -> io::Result<u32> {
        // SAFETY: an all-zero `stat` is a valid value of this C struct.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstat writes into the struct we own.
        check(unsafe { libc::fstat(self.0.as_raw_fd(), &mut st) })?;
        Ok(st.st_uid)
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::MetadataExt;

    use super::*;

    #[test]
    fn links_are_refused_at_every_step() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path();
        let outside = base.join("outside");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("target"), "keep").unwrap();
        std::os::unix::fs::symlink(&outside, base.join("link")).unwrap();

        let dir = Dir::open_absolute(base).unwrap();
        // A link to a directory is not opened, created through, or followed.
        let e = dir.open_dir("link").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ELOOP), "{e}");
        let e = dir.open_or_create("link", 0o700).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ELOOP), "{e}");
        let e = Dir::open_absolute(&base.join("link")).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ELOOP), "{e}");

        // A link to a file is not written through.
        std::os::unix::fs::symlink(outside.join("target"), base.join("file")).unwrap();
        let e = dir.create_file("file", 0o644).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EEXIST), "{e}");
        assert_eq!(fs::read_to_string(outside.join("target")).unwrap(), "keep");

        // Names are single components.
        for bad in ["", ".", "..", "a/b"] {
            assert!(dir.open_dir(bad).is_err(), "{bad:?}");
        }
        assert!(Dir::open_absolute(Path::new("relative")).is_err());
        assert!(Dir::open_absolute(&base.join("outside/../outside")).is_err());
    }

    #[test]
    fn directories_and_files_are_made_and_reported() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Dir::open_absolute(tmp.path()).unwrap();
        let made = dir.open_or_create("d", 0o700).unwrap();
        assert!(made.created);
        let again = dir.open_or_create("d", 0o700).unwrap();
        assert!(!again.created);
        again.dir.chmod(0o750).unwrap();
        let meta = fs::metadata(tmp.path().join("d")).unwrap();
        assert_eq!(meta.mode() & 0o7777, 0o750);
        assert_eq!(made.dir.owner().unwrap(), meta.uid());

        use std::io::Write;
        let mut f = made.dir.create_file("f", 0o600).unwrap();
        f.write_all(b"x").unwrap();
        assert_eq!(fs::read_to_string(tmp.path().join("d/f")).unwrap(), "x");
        let e = made.dir.create_file("f", 0o600).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EEXIST));
    }
}
