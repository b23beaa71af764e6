// SPDX-License-Identifier: Apache-2.0

//! The jail itself: checking the arguments against the system, then building
//! the jail and exec'ing into it, in Firecracker's order.

use std::convert::Infallible;
use std::ffi::CString;
use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::args::{ArgsError, JailerArgs};
use crate::cgroup::{CgroupError, CgroupPlan};
use crate::chroot::{self, ChrootError};
use crate::dir::Dir;
use crate::resource_limits::RlimitError;
use crate::undo::UndoLog;

/// Substrings one of which the exec file's name must contain. Firecracker
/// insists on "firecracker"; Ember also takes its own name.
pub const EXEC_FILE_NAMES: [&str; 2] = ["ember", "firecracker"];

/// Directories made inside the jail and handed to the jailed user, as
/// Firecracker: `/dev` and `/dev/net` for the device nodes, `/run` for the
/// default API socket. Each level is listed because `chown` is not recursive.
pub const JAIL_DIRS: [&str; 4] = ["/", "/dev", "/dev/net", "/run"];

/// Mode of [`JAIL_DIRS`]: only the jailed user may look inside.
pub const JAIL_DIR_MODE: u32 = 0o700;

/// A character device the jailed binary needs, made with `mknod` in the jail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceNode {
    /// Path inside the jail.
    pub path: &'static str,
    /// Major number.
    pub major: u32,
    /// Minor number.
    pub minor: u32,
}

/// `/dev/kvm`: misc device 10:232 (Documentation/admin-guide/devices.txt).
pub const DEV_KVM: DeviceNode = DeviceNode {
    path: "/dev/kvm",
    major: 10,
    minor: 232,
};

/// `/dev/net/tun`: misc device 10:200 (Documentation/networking/tuntap.rst).
pub const DEV_NET_TUN: DeviceNode = DeviceNode {
    path: "/dev/net/tun",
    major: 10,
    minor: 200,
};

/// `/dev/urandom`: memory device 1:9 (Documentation/admin-guide/devices.txt).
pub const DEV_URANDOM: DeviceNode = DeviceNode {
    path: "/dev/urandom",
    major: 1,
    minor: 9,
};

/// Path of the userfaultfd device. It is a misc device (major 10) with a
/// dynamic minor, which is looked up in `/proc/misc`.
pub const DEV_USERFAULTFD: &str = "/dev/userfaultfd";

/// Major number of misc devices (Documentation/admin-guide/devices.txt).
const MISC_MAJOR: u32 = 10;

/// `NS_GET_NSTYPE` = `_IO(0xb7, 0x3)` (include/uapi/linux/nsfs.h): the
/// `CLONE_NEW*` type of a namespace file descriptor.
const NS_GET_NSTYPE: libc::c_ulong = (0xb7 << 8) | 0x3;

/// Suffix of the file, next to the jailed binary, that holds its pid.
pub const PID_FILE_EXTENSION: &str = ".pid";

/// Why the jailer stopped.
#[derive(Debug, thiserror::Error)]
pub enum JailerError {
    /// The command line is wrong.
    #[error(transparent)]
    Args(#[from] ArgsError),
    /// A path given on the command line cannot be resolved.
    #[error("cannot resolve {what} {}: {source}", path.display())]
    ResolvePath {
        /// The option (`--exec-file`, `--chroot-base-dir`).
        what: &'static str,
        /// The path given.
        path: PathBuf,
        /// Why `realpath` failed.
        #[source]
        source: io::Error,
    },
    /// `--exec-file` is not a regular file.
    #[error("--exec-file {} is not a file", .0.display())]
    NotAFile(PathBuf),
    /// `--chroot-base-dir` is not a directory.
    #[error("--chroot-base-dir {} is not a directory", .0.display())]
    NotADirectory(PathBuf),
    /// The exec file's name contains neither "ember" nor "firecracker".
    #[error("invalid --exec-file name {0:?}: it must contain \"ember\" or \"firecracker\"")]
    ExecFileName(String),
    /// `--netns` cannot be opened.
    #[error("cannot open network namespace {}: {source}", path.display())]
    OpenNetns {
        /// The path given.
        path: PathBuf,
        /// Why `open` failed.
        #[source]
        source: io::Error,
    },
    /// `--netns` is not a network namespace.
    #[error("--netns {} is not a network namespace", .0.display())]
    NotANetns(PathBuf),
    /// A `/proc` file needed to plan the jail cannot be read.
    #[error("cannot read {}: {source}", path.display())]
    ReadProc {
        /// The file.
        path: PathBuf,
        /// Why the read failed.
        #[source]
        source: io::Error,
    },
    /// Setting up the cgroups failed.
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    /// The jail root cannot be created.
    #[error("cannot create chroot directory {}: {source}", path.display())]
    CreateChrootDir {
        /// The jail root.
        path: PathBuf,
        /// Why `mkdir` failed.
        #[source]
        source: io::Error,
    },
    /// A jail directory exists already and belongs to someone else than
    /// the jailer's user: it may hold links planted by a jailed user.
    #[error(
        "the jail directory {} exists and is owned by uid {owner}, not by the jailer's uid \
         {expected}: remove it, or use another --id",
        path.display()
    )]
    JailDirOwner {
        /// The directory.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// The jailer's effective uid.
        expected: u32,
    },
    /// The exec file cannot be copied into the jail.
    #[error("cannot copy {} to {}: {source}", from.display(), to.display())]
    CopyExecFile {
        /// The exec file.
        from: PathBuf,
        /// Its copy in the jail.
        to: PathBuf,
        /// Why the copy failed.
        #[source]
        source: io::Error,
    },
    /// `setns` into `--netns` failed.
    #[error("cannot join network namespace {}: {source}", path.display())]
    JoinNetns {
        /// The namespace file.
        path: PathBuf,
        /// Why `setns` failed.
        #[source]
        source: io::Error,
    },
    /// A resource limit cannot be installed.
    #[error(transparent)]
    Rlimit(#[from] RlimitError),
    /// `/dev/null` cannot be opened for `--daemonize`.
    #[error("cannot open /dev/null: {0}")]
    OpenDevNull(#[source] io::Error),
    /// Moving into the jail failed.
    #[error(transparent)]
    Chroot(#[from] ChrootError),
    /// A directory inside the jail cannot be set up.
    #[error("cannot {op} {}: {source}", path.display())]
    JailDir {
        /// What was attempted.
        op: &'static str,
        /// The directory, as seen from the host.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
    /// A device node cannot be created or handed to the jailed user.
    #[error("cannot {op} device node {} ({major}:{minor}): {source}", path.display())]
    DeviceNode {
        /// `create` or `change the owner of`.
        op: &'static str,
        /// The node, as seen from the host.
        path: PathBuf,
        /// Major number.
        major: u32,
        /// Minor number.
        minor: u32,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
    /// A step of `--daemonize` failed.
    #[error("cannot daemonize: {step}: {source}")]
    Daemonize {
        /// `fork`, `setsid` or `dup2`.
        step: &'static str,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
    /// `clone(CLONE_NEWPID)` failed.
    #[error("cannot clone into a new PID namespace: {0}")]
    Clone(#[source] io::Error),
    /// The pid file cannot be written.
    #[error("cannot write pid file {}: {source}", path.display())]
    PidFile {
        /// The pid file, as seen from the host.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
    /// Switching to `--uid`/`--gid` failed.
    #[error("cannot drop privileges: {call}({id}): {source}")]
    DropPrivileges {
        /// `setgroups`, `setgid` or `setuid`.
        call: &'static str,
        /// The id passed.
        id: u32,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
    /// `execve` of the jailed binary failed.
    #[error("cannot exec {}: {source}{hint}", path.display())]
    Exec {
        /// The binary, as seen from the host.
        path: PathBuf,
        /// Why `execve` failed.
        #[source]
        source: io::Error,
        /// A likely cause, or empty.
        hint: String,
    },
    /// Inherited file descriptors cannot be closed.
    #[error("cannot close inherited file descriptors: {0}")]
    CloseFds(#[source] io::Error),
    /// A path holds a NUL byte.
    #[error("path {} contains a NUL byte", .0.display())]
    NulInPath(PathBuf),
}

/// When the jailer started, in microseconds, passed on to the jailed binary
/// as `--start-time-us` and used for `--parent-cpu-time-us`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StartTimes {
    /// `CLOCK_MONOTONIC` at start.
    pub monotonic_us: u64,
    /// `CLOCK_PROCESS_CPUTIME_ID` at start.
    pub cpu_us: u64,
}

impl StartTimes {
    /// The clocks now.
    pub fn now() -> Self {
        Self {
            monotonic_us: clock_us(libc::CLOCK_MONOTONIC),
            cpu_us: clock_us(libc::CLOCK_PROCESS_CPUTIME_ID),
        }
    }
}

fn clock_us(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec the call writes into.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec).unwrap_or(0);
    secs.saturating_mul(1_000_000).saturating_add(nanos / 1000)
}

/// Closes every file descriptor above 2 and clears the environment, so
/// nothing the caller had open or set leaks into the jail.
///
/// # Errors
///
/// [`JailerError::CloseFds`] if neither `close_range` nor `/proc/self/fd`
/// is available.
pub fn sanitize_process() -> Result<(), JailerError> {
    close_inherited_fds()?;
    let keys: Vec<_> = std::env::vars_os().map(|(k, _)| k).collect();
    for key in keys {
        std::env::remove_var(key);
    }
    Ok(())
}

/// Closes every file descriptor above 2.
///
/// # Errors
///
/// [`JailerError::CloseFds`] if neither `close_range` nor `/proc/self/fd`
/// is available.
pub fn close_inherited_fds() -> Result<(), JailerError> {
    // SAFETY: close_range takes no pointers; closing descriptors this
    // process does not use any more is its whole point (Linux >= 5.9).
    let ret = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3 as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_UNSHARE,
        )
    };
    if ret == 0 {
        return Ok(());
    }
    // Older kernels: list the descriptors first, then close them, so the
    // directory being read is not closed under its own iterator.
    let fds: Vec<i32> = fs::read_dir("/proc/self/fd")
        .map_err(JailerError::CloseFds)?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|fd| *fd > 2)
        .collect();
    for fd in fds {
        // SAFETY: closing a descriptor number; EBADF (the directory's own,
        // already gone) is harmless.
        unsafe { libc::close(fd) };
    }
    Ok(())
}

/// The `<chroot-base>/<exec file name>/<id>/root` path of a jail.
pub fn chroot_dir(chroot_base: &Path, exec_file_name: &str, id: &str) -> PathBuf {
    chroot_base.join(exec_file_name).join(id).join("root")
}

/// The minor number of `userfaultfd` in the text of `/proc/misc`
/// (`<minor> <name>` lines).
pub fn userfaultfd_minor(proc_misc: &str) -> Option<u32> {
    proc_misc.lines().find_map(|line| {
        let mut it = line.split_whitespace();
        let minor = it.next()?;
        (it.next()? == "userfaultfd").then(|| minor.parse().ok())?
    })
}

/// The ELF interpreter (`PT_INTERP`) of a 64-bit little-endian ELF file,
/// i.e. the dynamic loader it needs; `None` for static or non-ELF files.
pub fn elf_interpreter(path: &Path) -> Option<String> {
    // ELF-64 Object File Format, "ELF Header" and "Program header table".
    const PT_INTERP: u32 = 3;
    let file = File::open(path).ok()?;
    let mut hdr = [0u8; 64];
    file.read_exact_at(&mut hdr, 0).ok()?;
    // e_ident: magic, EI_CLASS = ELFCLASS64 (2), EI_DATA = ELFDATA2LSB (1).
    if hdr[..4] != *b"\x7fELF" || hdr[4] != 2 || hdr[5] != 1 {
        return None;
    }
    let u16_at = |b: &[u8], o: usize| Some(u16::from_le_bytes(b.get(o..o + 2)?.try_into().ok()?));
    let u32_at = |b: &[u8], o: usize| Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?));
    let u64_at = |b: &[u8], o: usize| Some(u64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?));
    let phoff = u64_at(&hdr, 0x20)?;
    let phentsize = u16_at(&hdr, 0x36)?;
    let phnum = u16_at(&hdr, 0x38)?;
    if phentsize < 56 {
        return None;
    }
    for i in 0..u64::from(phnum) {
        let mut ph = vec![0u8; usize::from(phentsize)];
        let off = phoff.checked_add(i.checked_mul(u64::from(phentsize))?)?;
        file.read_exact_at(&mut ph, off).ok()?;
        if u32_at(&ph, 0)? != PT_INTERP {
            continue;
        }
        let p_offset = u64_at(&ph, 8)?;
        let p_filesz = u64_at(&ph, 32)?.min(4096);
        let mut interp = vec![0u8; usize::try_from(p_filesz).ok()?];
        file.read_exact_at(&mut interp, p_offset).ok()?;
        let end = interp.iter().position(|b| *b == 0).unwrap_or(interp.len());
        return Some(String::from_utf8_lossy(&interp[..end]).into_owned());
    }
    None
}

fn cstring(path: &Path) -> Result<CString, JailerError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| JailerError::NulInPath(path.into()))
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// A jail, checked against the system and ready to be built.
///
/// [`Env::new`] validates every argument without creating anything;
/// [`Env::run`] builds the jail and execs.
#[derive(Debug)]
pub struct Env {
    args: JailerArgs,
    exec_file_path: PathBuf,
    exec_file_name: String,
    chroot_base: PathBuf,
    chroot_dir: PathBuf,
    netns: Option<(PathBuf, File)>,
    cgroups: Option<CgroupPlan>,
    uffd_minor: Option<u32>,
    start: StartTimes,
}

impl Env {
    /// Checks the arguments against the system: the exec file, the chroot
    /// base, the network namespace and the cgroup hierarchies. Creates
    /// nothing.
    ///
    /// # Errors
    ///
    /// The first argument found wrong.
    pub fn new(args: JailerArgs, start: StartTimes) -> Result<Self, JailerError> {
        let exec_file_path =
            fs::canonicalize(&args.exec_file).map_err(|source| JailerError::ResolvePath {
                what: "--exec-file",
                path: args.exec_file.clone(),
                source,
            })?;
        if !exec_file_path.is_file() {
            return Err(JailerError::NotAFile(exec_file_path));
        }
        let exec_file_name = exec_file_path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| JailerError::NotAFile(exec_file_path.clone()))?;
        if !EXEC_FILE_NAMES.iter().any(|n| exec_file_name.contains(n)) {
            return Err(JailerError::ExecFileName(exec_file_name));
        }

        let base =
            fs::canonicalize(&args.chroot_base_dir).map_err(|source| JailerError::ResolvePath {
                what: "--chroot-base-dir",
                path: args.chroot_base_dir.clone(),
                source,
            })?;
        if !base.is_dir() {
            return Err(JailerError::NotADirectory(base));
        }
        let chroot_dir = chroot_dir(&base, &exec_file_name, &args.id);
        cstring(&chroot_dir)?;

        let netns = match &args.netns {
            Some(path) => Some((path.clone(), open_netns(path)?)),
            None => None,
        };

        let parent_cgroup = args
            .parent_cgroup
            .clone()
            .unwrap_or_else(|| PathBuf::from(&exec_file_name));
        let needs_mounts =
            !args.cgroups.is_empty() || args.cgroup_version == crate::CgroupVersion::V2;
        let cgroups = if needs_mounts {
            CgroupPlan::new(
                args.cgroup_version,
                &args.cgroups,
                &args.id,
                &parent_cgroup,
                &read_proc("/proc/mounts")?,
                &read_proc("/proc/self/cgroup")?,
            )?
        } else {
            None
        };

        let uffd_minor = fs::read_to_string("/proc/misc")
            .ok()
            .and_then(|t| userfaultfd_minor(&t));

        Ok(Self {
            args,
            exec_file_path,
            exec_file_name,
            chroot_base: base,
            chroot_dir,
            netns,
            cgroups,
            uffd_minor,
            start,
        })
    }

    /// The jail root, `<chroot-base>/<exec file name>/<id>/root`.
    pub fn chroot_dir(&self) -> &Path {
        &self.chroot_dir
    }

    /// The canonical path of the exec file.
    pub fn exec_file_path(&self) -> &Path {
        &self.exec_file_path
    }

    /// The exec file's name; also the binary's name in the jail.
    pub fn exec_file_name(&self) -> &str {
        &self.exec_file_name
    }

    /// The binary as the jailed process sees it: `/<exec file name>`.
    pub fn jailed_exec_file(&self) -> PathBuf {
        Path::new("/").join(&self.exec_file_name)
    }

    /// The pid file as the jailed process sees it: `/<exec file name>.pid`.
    pub fn jailed_pid_file(&self) -> PathBuf {
        PathBuf::from(format!("/{}{PID_FILE_EXTENSION}", self.exec_file_name))
    }

    /// The cgroups to set up, if any.
    pub fn cgroups(&self) -> Option<&CgroupPlan> {
        self.cgroups.as_ref()
    }

    /// The arguments the jailed binary gets, as Firecracker's jailer passes
    /// them: `--id`, the start times, then everything after `--`.
    pub fn exec_args(&self, parent_cpu_time_us: u64) -> Vec<String> {
        let mut v: Vec<String> = [
            "--id",
            &self.args.id,
            "--start-time-us",
            &self.start.monotonic_us.to_string(),
            // The jailed process's CPU clock restarts at exec; its own time
            // is counted from 0 and the jailer's is passed separately.
            "--start-time-cpu-us",
            "0",
            "--parent-cpu-time-us",
            &parent_cpu_time_us.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(self.args.extra_args.iter().cloned());
        v
    }

    /// A path inside the jail, as seen from the host (for messages).
    fn host_path(&self, jailed: &Path) -> PathBuf {
        self.chroot_dir
            .join(jailed.strip_prefix("/").unwrap_or(jailed))
    }

    /// Builds the jail and execs the binary in it.
    ///
    /// Returns only on failure. When a step before `pivot_root` fails,
    /// what this run created (directories, the copied binary, cgroups) is
    /// removed first. With `--daemonize` or `--new-pid-ns` the process that
    /// called this exits with status 0 once its child is on its way.
    ///
    /// # Errors
    ///
    /// The step that failed.
    pub fn run(self) -> Result<Infallible, JailerError> {
        let mut undo = UndoLog::new();
        let dev_null = match self.build_jail(&mut undo) {
            Ok(dev_null) => dev_null,
            Err(e) => {
                let pivoted = matches!(&e, JailerError::Chroot(c) if !c.before_pivot());
                if !pivoted {
                    undo.undo();
                }
                return Err(e);
            }
        };
        self.finish_in_jail(dev_null)
    }

    /// The steps that happen outside the jail, up to `pivot_root`.
    fn build_jail(&self, undo: &mut UndoLog) -> Result<Option<File>, JailerError> {
        let root = self.make_chroot_dir(undo)?;
        self.copy_exec_file(&root, undo)?;

        if let Some((path, file)) = &self.netns {
            // SAFETY: `file` is an open namespace file descriptor.
            check(unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) }).map_err(
                |source| JailerError::JoinNetns {
                    path: path.clone(),
                    source,
                },
            )?;
        }

        self.args.resource_limits.install()?;

        // The cgroup file systems are out of reach once in the jail.
        if let Some(plan) = &self.cgroups {
            plan.setup(std::process::id(), undo)?;
        }

        // /dev/null is not in the jail either.
        let dev_null = if self.args.daemonize {
            Some(
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open("/dev/null")
                    .map_err(JailerError::OpenDevNull)?,
            )
        } else {
            None
        };

        chroot::chroot(&self.chroot_dir)?;
        Ok(dev_null)
    }

    /// Creates `<base>/<exec file name>/<id>/root` one component at a time
    /// below the (canonical) chroot base, never through a link, and refuses
    /// a component that exists and is not the jailer's.
    fn make_chroot_dir(&self, undo: &mut UndoLog) -> Result<Dir, JailerError> {
        let mut path = self.chroot_base.clone();
        let mut dir = Dir::open_absolute(&path).map_err(|source| JailerError::CreateChrootDir {
            path: path.clone(),
            source,
        })?;
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        for name in [self.exec_file_name.as_str(), self.args.id.as_str(), "root"] {
            path.push(name);
            let opened =
                dir.open_or_create(name, 0o755)
                    .map_err(|source| JailerError::CreateChrootDir {
                        path: path.clone(),
                        source,
                    })?;
            if opened.created {
                undo.created_dir(&path);
            } else {
                let owner = opened
                    .dir
                    .owner()
                    .map_err(|source| JailerError::CreateChrootDir {
                        path: path.clone(),
                        source,
                    })?;
                if owner != me {
                    return Err(JailerError::JailDirOwner {
                        path,
                        owner,
                        expected: me,
                    });
                }
            }
            dir = opened.dir;
        }
        Ok(dir)
    }

    /// Copies the exec file into the jail root as a new file: an entry of
    /// that name (a link planted by the jailed user included) is an error.
    fn copy_exec_file(&self, root: &Dir, undo: &mut UndoLog) -> Result<(), JailerError> {
        // A copy, not a hard link, as Firecracker: two jailed processes must
        // not share the pages of one binary, and a link cannot cross devices.
        let to = self.chroot_dir.join(&self.exec_file_name);
        let err = |source| JailerError::CopyExecFile {
            from: self.exec_file_path.clone(),
            to: to.clone(),
            source,
        };
        let mut from = File::open(&self.exec_file_path).map_err(err)?;
        let mode = from.metadata().map_err(err)?.mode() & 0o777;
        let mut file = root.create_file(&self.exec_file_name, mode).map_err(err)?;
        undo.created_file(&to);
        io::copy(&mut from, &mut file).map_err(err)?;
        // The umask applied at creation; the copy keeps the source's mode.
        file.set_permissions(Permissions::from_mode(mode))
            .map_err(err)
    }

    /// The steps inside the jail, ending with exec.
    fn finish_in_jail(&self, dev_null: Option<File>) -> Result<Infallible, JailerError> {
        let root = Dir::open_absolute(Path::new("/")).map_err(|source| JailerError::JailDir {
            op: "open",
            path: self.chroot_dir.clone(),
            source,
        })?;
        for dir in JAIL_DIRS {
            self.setup_jail_dir(&root, dir)?;
        }
        self.mknod_and_own(&root, DEV_NET_TUN)?;
        self.mknod_and_own(&root, DEV_KVM)?;
        // Only MMDS v2 tokens need it, so, as Firecracker, a warning only.
        if let Err(e) = self.mknod_and_own(&root, DEV_URANDOM) {
            log::warn!("{e}; MMDS version 2 will not be available");
        }
        if let Some(minor) = self.uffd_minor {
            self.mknod_and_own(
                &root,
                DeviceNode {
                    path: DEV_USERFAULTFD,
                    major: MISC_MAJOR,
                    minor,
                },
            )?;
        }

        let mut parent_cpu_us = 0;
        let mut cpu_base = self.start.cpu_us;
        if let Some(dev_null) = dev_null {
            // CPU clocks are per process: keep what was spent before the forks.
            parent_cpu_us = clock_us(libc::CLOCK_PROCESS_CPUTIME_ID).saturating_sub(cpu_base);
            cpu_base = 0;
            daemonize(&dev_null)?;
        }
        parent_cpu_us += clock_us(libc::CLOCK_PROCESS_CPUTIME_ID).saturating_sub(cpu_base);

        if self.args.new_pid_ns {
            // SAFETY: a raw clone without CLONE_VM and with a NULL stack
            // behaves like fork (the child gets a copy of this stack); glibc's
            // clone() wrapper refuses a NULL stack, hence the syscall. The
            // jailer is single-threaded, so the child may run anything.
            let pid = unsafe {
                libc::syscall(
                    libc::SYS_clone,
                    // The kernel takes the flags as an unsigned long.
                    (libc::CLONE_NEWPID | libc::SIGCHLD) as libc::c_ulong,
                    0usize,
                    0usize,
                    0usize,
                    0usize,
                )
            };
            if pid < 0 {
                return Err(JailerError::Clone(io::Error::last_os_error()));
            }
            if pid == 0 {
                return Err(self.exec(parent_cpu_us));
            }
            // The child is PID 1 of its namespace; the host sees `pid`.
            self.write_pid_file(&root, pid)?;
            std::process::exit(0);
        }
        self.write_pid_file(&root, i64::from(std::process::id()))?;
        Err(self.exec(parent_cpu_us))
    }

    /// Walks `path` (absolute, inside the jail) from `root`, creating each
    /// missing directory with `mkdirat` and never following a link.
    fn walk(root: &Dir, path: &str, create: bool) -> io::Result<Dir> {
        let mut dir = root.try_clone()?;
        for name in path.split('/').filter(|n| !n.is_empty()) {
            dir = if create {
                dir.open_or_create(name, JAIL_DIR_MODE)?.dir
            } else {
                dir.open_dir(name)?
            };
        }
        Ok(dir)
    }

    fn setup_jail_dir(&self, root: &Dir, dir: &str) -> Result<(), JailerError> {
        let err = |op, source| JailerError::JailDir {
            op,
            path: self.host_path(Path::new(dir)),
            source,
        };
        let d = Self::walk(root, dir, true).map_err(|e| err("create directory", e))?;
        d.chmod(JAIL_DIR_MODE)
            .map_err(|e| err("change the mode of", e))?;
        d.chown(self.args.uid, self.args.gid)
            .map_err(|e| err("change the owner of", e))
    }

    fn mknod_and_own(&self, root: &Dir, dev: DeviceNode) -> Result<(), JailerError> {
        let path = Path::new(dev.path);
        let err = |op, source| JailerError::DeviceNode {
            op,
            path: self.host_path(path),
            major: dev.major,
            minor: dev.minor,
            source,
        };
        let (parent, name) = dev.path.rsplit_once('/').unwrap_or(("", dev.path));
        let dir = Self::walk(root, parent, false).map_err(|e| err("create", e))?;
        // S_IFCHR with read/write for the owner only, owned by the jailed
        // user.
        dir.mknod_owned(
            name,
            libc::S_IFCHR | libc::S_IRUSR | libc::S_IWUSR,
            libc::makedev(dev.major, dev.minor),
            self.args.uid,
            self.args.gid,
        )
        .map_err(|(op, e)| err(op, e))
    }

    fn write_pid_file(&self, root: &Dir, pid: i64) -> Result<(), JailerError> {
        let path = self.jailed_pid_file();
        let err = |source| JailerError::PidFile {
            path: self.host_path(&path),
            source,
        };
        let name = format!("{}{PID_FILE_EXTENSION}", self.exec_file_name);
        let mut file = root.create_file(&name, 0o644).map_err(err)?;
        write!(file, "{pid}").map_err(err)
    }

    /// Drops privileges and execs the binary; returns only the error.
    fn exec(&self, parent_cpu_us: u64) -> JailerError {
        let (uid, gid) = (self.args.uid, self.args.gid);
        // Supplementary groups first (root's would survive setgid), then the
        // group while still allowed to, then the user.
        // SAFETY: a zero-length list with a NULL pointer clears the groups.
        if let Err(source) = check(unsafe { libc::setgroups(0, std::ptr::null()) }) {
            return JailerError::DropPrivileges {
                call: "setgroups",
                id: 0,
                source,
            };
        }
        // SAFETY: setgid takes no pointers.
        if let Err(source) = check(unsafe { libc::setgid(gid) }) {
            return JailerError::DropPrivileges {
                call: "setgid",
                id: gid,
                source,
            };
        }
        // SAFETY: setuid takes no pointers.
        if let Err(source) = check(unsafe { libc::setuid(uid) }) {
            return JailerError::DropPrivileges {
                call: "setuid",
                id: uid,
                source,
            };
        }

        let jailed = self.jailed_exec_file();
        let source = Command::new(&jailed)
            .args(self.exec_args(parent_cpu_us))
            .env_clear()
            .exec();
        let mut hint = String::new();
        if source.kind() == io::ErrorKind::NotFound && jailed.exists() {
            if let Some(interp) = elf_interpreter(&jailed) {
                if !Path::new(&interp).exists() {
                    hint = format!(
                        "; it is dynamically linked and its interpreter {interp} is not in the \
                         jail: link it statically, or copy the interpreter and its libraries \
                         into {}",
                        self.chroot_dir.display()
                    );
                }
            }
        }
        JailerError::Exec {
            path: self.host_path(&jailed),
            source,
            hint,
        }
    }
}

fn open_netns(path: &Path) -> Result<File, JailerError> {
    let file = File::open(path).map_err(|source| JailerError::OpenNetns {
        path: path.into(),
        source,
    })?;
    // SAFETY: NS_GET_NSTYPE takes no argument; on a file that is not a
    // namespace it fails with ENOTTY.
    let kind = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE) };
    if kind != libc::CLONE_NEWNET {
        return Err(JailerError::NotANetns(path.into()));
    }
    Ok(file)
}

fn read_proc(path: &str) -> Result<String, JailerError> {
    fs::read_to_string(path).map_err(|source| JailerError::ReadProc {
        path: path.into(),
        source,
    })
}

/// Detaches from the caller: fork (the caller sees the jailer exit 0),
/// `setsid`, fork again (so the daemon is not a session leader and cannot
/// acquire a terminal), then stdio to `/dev/null`. As Firecracker's jailer.
fn daemonize(dev_null: &File) -> Result<(), JailerError> {
    let fork = || -> Result<(), JailerError> {
        // SAFETY: the jailer is single-threaded, so the child may run anything.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(JailerError::Daemonize {
                step: "fork",
                source: io::Error::last_os_error(),
            });
        }
        if pid > 0 {
            std::process::exit(0);
        }
        Ok(())
    };
    fork()?;
    // SAFETY: setsid takes no arguments; a fresh child is never a group leader.
    check(unsafe { libc::setsid() }).map_err(|source| JailerError::Daemonize {
        step: "setsid",
        source,
    })?;
    fork()?;
    for fd in [libc::STDIN_FILENO, libc::STDOUT_FILENO, libc::STDERR_FILENO] {
        // SAFETY: both descriptors are valid; dup2 replaces `fd` atomically.
        check(unsafe { libc::dup2(dev_null.as_raw_fd(), fd) }).map_err(|source| {
            JailerError::Daemonize {
                step: "dup2",
                source,
            }
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;
    use crate::args::{self, Action};

    fn parse(args: &[String]) -> JailerArgs {
        match args::parse(args).unwrap() {
            Action::Jail(a) => *a,
            other => panic!("expected a jail action, got {other:?}"),
        }
    }

    struct Fixture {
        dir: tempfile::TempDir,
        exec: PathBuf,
    }

    fn fixture(exec_name: &str) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("bin")).unwrap();
        fs::create_dir(dir.path().join("jails")).unwrap();
        let exec = dir.path().join("bin").join(exec_name);
        fs::write(&exec, "#!/bin/true\n").unwrap();
        Fixture { dir, exec }
    }

    fn args_for(f: &Fixture, id: &str, extra: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = vec![
            "--id".into(),
            id.into(),
            "--exec-file".into(),
            f.exec.display().to_string(),
            "--uid".into(),
            "1000".into(),
            "--gid".into(),
            "1001".into(),
            "--chroot-base-dir".into(),
            f.dir.path().join("jails").display().to_string(),
        ];
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    }

    fn times() -> StartTimes {
        StartTimes {
            monotonic_us: 1234,
            cpu_us: 56,
        }
    }

    #[test]
    fn chroot_path_is_base_name_id_root() {
        let f = fixture("ember");
        let env = Env::new(parse(&args_for(&f, "vm-1", &[])), times()).unwrap();
        let base = fs::canonicalize(f.dir.path().join("jails")).unwrap();
        assert_eq!(env.chroot_dir(), base.join("ember/vm-1/root"));
        assert_eq!(env.exec_file_name(), "ember");
        assert_eq!(env.jailed_exec_file(), PathBuf::from("/ember"));
        assert_eq!(env.jailed_pid_file(), PathBuf::from("/ember.pid"));
        assert_eq!(
            env.host_path(Path::new("/dev/kvm")),
            base.join("ember/vm-1/root/dev/kvm")
        );
        assert_eq!(
            chroot_dir(Path::new("/srv/jailer"), "firecracker", "a"),
            PathBuf::from("/srv/jailer/firecracker/a/root")
        );
        // Validation created nothing.
        assert_eq!(fs::read_dir(base).unwrap().count(), 0);
    }

    #[test]
    fn exec_file_is_resolved_before_naming_the_jail() {
        let f = fixture("ember-v1.2");
        let link = f.dir.path().join("bin/vmm-link");
        symlink(&f.exec, &link).unwrap();
        let mut a = parse(&args_for(&f, "x", &[]));
        a.exec_file = link;
        let env = Env::new(a, times()).unwrap();
        assert_eq!(env.exec_file_name(), "ember-v1.2");
        assert!(env.chroot_dir().ends_with("ember-v1.2/x/root"));
    }

    #[test]
    fn exec_file_must_exist_be_a_file_and_be_named_for_the_vmm() {
        let f = fixture("ember");
        let mut a = parse(&args_for(&f, "x", &[]));
        a.exec_file = f.dir.path().join("bin/missing-ember");
        let err = Env::new(a.clone(), times()).unwrap_err();
        assert!(matches!(
            err,
            JailerError::ResolvePath {
                what: "--exec-file",
                ..
            }
        ));
        assert!(err.to_string().contains("missing-ember"), "{err}");

        a.exec_file = f.dir.path().join("bin");
        let err = Env::new(a.clone(), times()).unwrap_err();
        assert!(matches!(err, JailerError::NotAFile(_)), "{err}");

        let g = fixture("qemu");
        let err = Env::new(parse(&args_for(&g, "x", &[])), times()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid --exec-file name \"qemu\": it must contain \"ember\" or \"firecracker\""
        );
        let h = fixture("firecracker-v1.7");
        Env::new(parse(&args_for(&h, "x", &[])), times()).unwrap();
    }

    #[test]
    fn chroot_base_must_be_an_existing_directory() {
        let f = fixture("ember");
        let mut a = parse(&args_for(&f, "x", &[]));
        a.chroot_base_dir = f.dir.path().join("nope");
        let err = Env::new(a.clone(), times()).unwrap_err();
        assert!(matches!(
            err,
            JailerError::ResolvePath {
                what: "--chroot-base-dir",
                ..
            }
        ));
        a.chroot_base_dir = f.exec.clone();
        let err = Env::new(a, times()).unwrap_err();
        assert!(matches!(err, JailerError::NotADirectory(_)), "{err}");
    }

    #[test]
    fn netns_must_be_a_network_namespace() {
        let f = fixture("ember");
        let missing = f.dir.path().join("no-ns");
        let a = parse(&args_for(
            &f,
            "x",
            &["--netns", &missing.display().to_string()],
        ));
        let err = Env::new(a, times()).unwrap_err();
        assert!(matches!(err, JailerError::OpenNetns { .. }), "{err}");

        let a = parse(&args_for(
            &f,
            "x",
            &["--netns", &f.exec.display().to_string()],
        ));
        let err = Env::new(a, times()).unwrap_err();
        assert!(matches!(err, JailerError::NotANetns(_)), "{err}");

        // The process's own network namespace is one.
        let a = parse(&args_for(&f, "x", &["--netns", "/proc/self/ns/net"]));
        Env::new(a, times()).unwrap();
        // A mount namespace is not.
        let a = parse(&args_for(&f, "x", &["--netns", "/proc/self/ns/mnt"]));
        let err = Env::new(a, times()).unwrap_err();
        assert!(matches!(err, JailerError::NotANetns(_)), "{err}");
    }

    #[test]
    fn unknown_cgroup_controllers_fail_validation() {
        let f = fixture("ember");
        let a = parse(&args_for(&f, "x", &["--cgroup", "nosuchcontroller.x=1"]));
        let err = Env::new(a, times()).unwrap_err();
        assert!(
            matches!(err, JailerError::Cgroup(CgroupError::ControllerNotMounted(ref c)) if c == "nosuchcontroller"),
            "{err}"
        );
    }

    #[test]
    fn exec_args_follow_firecracker() {
        let f = fixture("ember");
        let a = parse(&args_for(
            &f,
            "vm-9",
            &["--", "--no-api", "--config-file", "/config.json"],
        ));
        let env = Env::new(a, times()).unwrap();
        assert_eq!(
            env.exec_args(77),
            vec![
                "--id",
                "vm-9",
                "--start-time-us",
                "1234",
                "--start-time-cpu-us",
                "0",
                "--parent-cpu-time-us",
                "77",
                "--no-api",
                "--config-file",
                "/config.json"
            ]
        );
    }

    #[test]
    fn userfaultfd_minor_is_read_from_proc_misc() {
        assert_eq!(
            userfaultfd_minor(" 57 fuse\n125 userfaultfd\n232 kvm\n"),
            Some(125)
        );
        assert_eq!(userfaultfd_minor("232 kvm\n"), None);
        assert_eq!(userfaultfd_minor("x userfaultfd\n"), None);
    }

    #[test]
    fn elf_interpreter_is_found_in_dynamic_binaries_only() {
        // This test binary is linked dynamically against glibc.
        let me = std::env::current_exe().unwrap();
        let interp = elf_interpreter(&me).unwrap();
        assert!(interp.contains("ld-linux"), "{interp}");
        assert!(Path::new(&interp).exists());
        let f = fixture("ember");
        assert_eq!(elf_interpreter(&f.exec), None);
        assert_eq!(elf_interpreter(Path::new("/nonexistent")), None);
    }

    #[test]
    fn inherited_descriptors_are_closed() {
        let file = File::open("/proc/self/status").unwrap();
        let fd = file.as_raw_fd();
        assert!(fd > 2);
        // In a forked child, so the test harness keeps its descriptors. The
        // child only makes system calls (no allocation after fork).
        // SAFETY: fork in a test process; the child calls only
        // async-signal-safe functions before _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let ok = close_inherited_fds().is_ok();
            // SAFETY: fcntl on a plain integer descriptor.
            let closed = unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0;
            // SAFETY: fcntl on a plain integer descriptor.
            let stdio = unsafe { libc::fcntl(2, libc::F_GETFD) } >= 0;
            // SAFETY: _exit ends the child without running the parent's destructors.
            unsafe { libc::_exit(if ok && closed && stdio { 0 } else { 1 }) };
        }
        let mut status = 0;
        // SAFETY: waiting for the child just forked.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFEXITED(status));
        assert_eq!(libc::WEXITSTATUS(status), 0);
        // The parent's descriptor is untouched.
        // SAFETY: fcntl on a descriptor this test owns.
        assert!(unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0);
    }
}
