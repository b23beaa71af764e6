// SPDX-License-Identifier: Apache-2.0

//! A Firecracker-compatible jailer for Ember.
//!
//! `ember-jailer` takes the same flags as Firecracker's `jailer`, builds the
//! same jail and execs the VMM in it the same way, so scripts and
//! orchestrators written for Firecracker work unchanged:
//!
//! ```text
//! ember-jailer --id <id> --exec-file <ember> --uid <uid> --gid <gid>
//!              [--chroot-base-dir /srv/jailer] [--netns <path>]
//!              [--cgroup <file>=<value>]... [--cgroup-version 1|2]
//!              [--parent-cgroup <path>] [--resource-limit <res>=<value>]...
//!              [--daemonize] [--new-pid-ns] [-- <arguments for ember>]
//! ```
//!
//! The steps, in Firecracker's order:
//!
//! 1. close every inherited file descriptor above 2, clear the environment;
//! 2. check every argument ([`args::parse`], then [`Env::new`]): nothing is
//!    created before all of them are known to be good;
//! 3. create `<chroot-base>/<exec file name>/<id>/root` and copy the exec
//!    file into it. Every entry is made relative to a directory descriptor
//!    opened with `O_DIRECTORY | O_NOFOLLOW`, files with
//!    `O_CREAT | O_EXCL | O_NOFOLLOW` ([`dir::Dir`]): a symbolic link planted
//!    in the jail is never followed, and an existing jail directory that
//!    root does not own (the jailed user's `root` of an earlier run) is
//!    refused;
//! 4. join `--netns`, install the rlimits, create and fill the cgroups and
//!    move the process into them;
//! 5. `unshare(CLONE_NEWNS)`, make `/` a slave mount, bind-mount the jail
//!    root on itself, `pivot_root` into it, detach and remove the old root;
//! 6. create `/dev`, `/dev/net` and `/run` (mode 0700, owned by uid:gid),
//!    and the device nodes `/dev/net/tun`, `/dev/kvm`, `/dev/urandom` and,
//!    when the host has it, `/dev/userfaultfd`, the same way (`mkdirat`,
//!    `mknodat`, `fchownat(AT_SYMLINK_NOFOLLOW)`);
//! 7. `--daemonize`: fork, `setsid`, fork, stdio to `/dev/null`;
//! 8. `--new-pid-ns`: clone into a new PID namespace (the parent writes the
//!    child's pid and exits); otherwise write our own pid. The pid file is
//!    `/<exec file name>.pid` in the jail;
//! 9. drop supplementary groups, `setgid`, `setuid`, and exec
//!    `/<exec file name> --id <id> --start-time-us <t> --start-time-cpu-us 0
//!    --parent-cpu-time-us <t> <arguments after -->` with an empty environment.
//!
//! A failure before `pivot_root` removes what the run created (see
//! [`UndoLog`]); Firecracker's jailer leaves it behind.
//!
//! Everything the jailed VMM opens must be inside the jail: the caller puts
//! the config file, kernel and disk images in
//! `<chroot-base>/<exec file name>/<id>/root/` before starting the jailer
//! (the jailer does not mind the directory existing), and refers to them by
//! their path inside the jail (`--config-file /config.json`). The exec file
//! must be statically linked, or its loader and libraries copied in too.
//!
//! # Example
//!
//! ```
//! use ember_jailer::args::{self, Action};
//! use ember_jailer::CgroupVersion;
//!
//! let argv = [
//!     "--id", "vm-1", "--exec-file", "/usr/bin/ember", "--uid", "123", "--gid", "100",
//!     "--cgroup", "cpu.shares=512", "--", "--no-api", "--config-file", "/config.json",
//! ];
//! let Action::Jail(jail) = args::parse(&argv).unwrap() else { unreachable!() };
//! assert_eq!(jail.chroot_base_dir.to_str(), Some("/srv/jailer"));
//! assert_eq!(jail.cgroup_version, CgroupVersion::V1);
//! assert_eq!(jail.cgroups[0].controller(), "cpu");
//! assert_eq!(jail.extra_args, ["--no-api", "--config-file", "/config.json"]);
//! assert_eq!(
//!     ember_jailer::chroot_dir(&jail.chroot_base_dir, "ember", &jail.id).to_str(),
//!     Some("/srv/jailer/ember/vm-1/root"),
//! );
//!
//! // A bad id is refused before anything is created.
//! assert!(args::parse(&["--id", "../x", "--exec-file", "e", "--uid", "0", "--gid", "0"]).is_err());
//! ```

#![deny(missing_docs)]

pub mod args;
pub mod cgroup;
pub mod chroot;
pub mod dir;
mod env;
pub mod resource_limits;
mod undo;

pub use args::{Action, ArgsError, JailerArgs};
pub use cgroup::{CgroupError, CgroupPlan, CgroupProperty, CgroupVersion};
pub use chroot::ChrootError;
pub use env::{
    chroot_dir, close_inherited_fds, elf_interpreter, sanitize_process, userfaultfd_minor,
    DeviceNode, Env, JailerError, StartTimes, DEV_KVM, DEV_NET_TUN, DEV_URANDOM, DEV_USERFAULTFD,
    EXEC_FILE_NAMES, JAIL_DIRS, JAIL_DIR_MODE, PID_FILE_EXTENSION,
};
pub use resource_limits::{Resource, ResourceLimits, RlimitError};
pub use undo::UndoLog;

/// The jailer's version, printed by `--version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
