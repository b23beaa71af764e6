// SPDX-License-Identifier: Apache-2.0

//! The jailer's command line, parsed the way Firecracker's jailer parses it.
//!
//! Firecracker's jailer has its own small parser (`utils::arg_parser`), and
//! scripts written for it rely on its rules, so they are kept here:
//!
//! * every option is `--name value` (`--name=value` is accepted too);
//! * a value may not start with `--`, so `--id --uid` is a missing value, not
//!   an id of `--uid`;
//! * an option given twice is an error, except `--cgroup` and
//!   `--resource-limit`, which may repeat;
//! * `--help` or `--version` anywhere before `--` wins over everything else;
//! * everything after the first `--` is handed to the jailed binary untouched.
//!
//! This module checks the syntax of every value (id, numbers, the
//! `<file>=<value>` pairs); what needs the file system (the exec file, the
//! chroot base, the cgroup mounts) is checked by [`crate::Env::new`].

use std::ffi::OsString;
use std::num::ParseIntError;
use std::path::{Component, Path, PathBuf};

use crate::cgroup::{CgroupProperty, CgroupVersion};
use crate::resource_limits::{Resource, ResourceLimits};

/// Longest accepted `--id`, in bytes, as Firecracker's `validate_instance_id`.
pub const MAX_ID_LEN: usize = 64;

/// Default `--chroot-base-dir`, as Firecracker's jailer.
pub const DEFAULT_CHROOT_BASE: &str = "/srv/jailer";

/// What is wrong with the command line.
#[derive(Debug, thiserror::Error)]
pub enum ArgsError {
    /// A required option is absent.
    #[error("missing required argument --{0}")]
    MissingArgument(&'static str),
    /// An option that takes a value is last, or followed by another option.
    #[error("argument --{0} requires a value, but none was supplied")]
    MissingValue(&'static str),
    /// An argument that is not an option of the jailer.
    #[error("unexpected argument {0:?} (try --help)")]
    UnexpectedArgument(String),
    /// A flag was given a value (`--daemonize=yes`).
    #[error("argument --{0} is a flag and takes no value")]
    FlagWithValue(&'static str),
    /// A single-valued option was given twice.
    #[error("argument --{0} was provided more than once")]
    DuplicateArgument(&'static str),
    /// An argument is not valid UTF-8.
    #[error("argument {0:?} is not valid UTF-8")]
    NotUnicode(String),
    /// `--id` is empty or longer than [`MAX_ID_LEN`].
    #[error("invalid --id {id:?}: its length must be between 1 and {max}, not {len}", max = MAX_ID_LEN)]
    IdLength {
        /// The id given.
        id: String,
        /// Its length in bytes.
        len: usize,
    },
    /// `--id` holds a character other than an ASCII letter, digit or '-'.
    #[error(
        "invalid --id {id:?}: character {ch:?} at position {pos} is not a letter, a digit or '-'"
    )]
    IdChar {
        /// The id given.
        id: String,
        /// The first offending character.
        ch: char,
        /// Its position (in characters).
        pos: usize,
    },
    /// `--exec-file` is empty.
    #[error("--exec-file must not be empty")]
    EmptyExecFile,
    /// `--uid` is not a number in 0..2^32.
    #[error("invalid --uid {0:?}: expected an unsigned 32-bit number")]
    Uid(String),
    /// `--gid` is not a number in 0..2^32.
    #[error("invalid --gid {0:?}: expected an unsigned 32-bit number")]
    Gid(String),
    /// `--cgroup-version` is neither 1 nor 2.
    #[error("invalid --cgroup-version {0:?}: expected 1 or 2")]
    CgroupVersion(String),
    /// `--parent-cgroup` is absolute, empty, or holds `.` or `..`.
    #[error("invalid --parent-cgroup {0:?}: it must be a relative path without '.' or '..'")]
    ParentCgroup(String),
    /// `--cgroup` is not `<file>=<value>` with a non-empty value.
    #[error("invalid --cgroup {0:?}: expected <cgroup_file>=<value> (e.g. cpu.shares=10)")]
    CgroupFormat(String),
    /// The file of a `--cgroup` is not `<controller>.<property>`.
    #[error("invalid --cgroup {0:?}: the file must be named <controller>.<property>, without '/'")]
    CgroupFile(String),
    /// `--resource-limit` is not `<resource>=<value>`.
    #[error("invalid --resource-limit {0:?}: expected <resource>=<value> (e.g. no-file=1024)")]
    ResourceLimitFormat(String),
    /// The value of a `--resource-limit` is not an unsigned 64-bit number.
    #[error("invalid --resource-limit {arg:?}: {source}")]
    ResourceLimitValue {
        /// The whole argument.
        arg: String,
        /// Why the number did not parse.
        #[source]
        source: ParseIntError,
    },
    /// The resource of a `--resource-limit` is not `fsize` or `no-file`.
    #[error("invalid --resource-limit {0:?}: the resource must be fsize or no-file")]
    ResourceLimitName(String),
}

/// One option the jailer knows.
struct Spec {
    name: &'static str,
    takes_value: bool,
    required: bool,
    multiple: bool,
    help: &'static str,
}

/// The options, in the order `--help` lists them (Firecracker's names and texts).
const SPECS: &[Spec] = &[
    Spec {
        name: "id",
        takes_value: true,
        required: true,
        multiple: false,
        help: "Jail ID: letters, digits and '-', at most 64 characters.",
    },
    Spec {
        name: "exec-file",
        takes_value: true,
        required: true,
        multiple: false,
        help: "File path to exec into; its file name must contain \"ember\" or \"firecracker\".",
    },
    Spec {
        name: "uid",
        takes_value: true,
        required: true,
        multiple: false,
        help: "The user identifier the jailer switches to before exec.",
    },
    Spec {
        name: "gid",
        takes_value: true,
        required: true,
        multiple: false,
        help: "The group identifier the jailer switches to before exec.",
    },
    Spec {
        name: "chroot-base-dir",
        takes_value: true,
        required: false,
        multiple: false,
        help: "The base folder where chroot jails are located (default /srv/jailer).",
    },
    Spec {
        name: "netns",
        takes_value: true,
        required: false,
        multiple: false,
        help: "Path to the network namespace this microVM should join.",
    },
    Spec {
        name: "daemonize",
        takes_value: false,
        required: false,
        multiple: false,
        help: "Daemonize the jailer before exec, by invoking setsid(), and redirecting the \
               standard I/O file descriptors to /dev/null.",
    },
    Spec {
        name: "new-pid-ns",
        takes_value: false,
        required: false,
        multiple: false,
        help: "Exec into a new PID namespace.",
    },
    Spec {
        name: "cgroup",
        takes_value: true,
        required: false,
        multiple: true,
        help: "Cgroup and value to be set by the jailer, as <cgroup_file>=<value> \
               (e.g. cpu.shares=10). May be repeated.",
    },
    Spec {
        name: "resource-limit",
        takes_value: true,
        required: false,
        multiple: true,
        help: "Resource limit to be set by the jailer, as <resource>=<value> (e.g. \
               no-file=1024). May be repeated. Resources: fsize (largest file the process may \
               create, in bytes), no-file (one more than the largest file descriptor the \
               process may open; 2048 when not given).",
    },
    Spec {
        name: "cgroup-version",
        takes_value: true,
        required: false,
        multiple: false,
        help: "Select the cgroup version used by the jailer: 1 or 2 (default 1).",
    },
    Spec {
        name: "parent-cgroup",
        takes_value: true,
        required: false,
        multiple: false,
        help: "Parent cgroup in which the cgroup of this microVM will be placed (a relative \
               path; default: the exec file name).",
    },
    Spec {
        name: "version",
        takes_value: false,
        required: false,
        multiple: false,
        help: "Print the binary version number.",
    },
    Spec {
        name: "help",
        takes_value: false,
        required: false,
        multiple: false,
        help: "Show this help message.",
    },
];

/// Everything the jailer was asked to do, with every value syntactically valid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailerArgs {
    /// `--id`: the microVM id, also the last directory of the jail path.
    pub id: String,
    /// `--exec-file`: the binary to copy into the jail and exec.
    pub exec_file: PathBuf,
    /// `--uid`: the user the jailed binary runs as.
    pub uid: u32,
    /// `--gid`: the group the jailed binary runs as.
    pub gid: u32,
    /// `--chroot-base-dir`: where jails are built ([`DEFAULT_CHROOT_BASE`] by default).
    pub chroot_base_dir: PathBuf,
    /// `--netns`: a network namespace to join.
    pub netns: Option<PathBuf>,
    /// `--daemonize`: detach from the terminal and silence stdio before exec.
    pub daemonize: bool,
    /// `--new-pid-ns`: exec the binary as PID 1 of a new PID namespace.
    pub new_pid_ns: bool,
    /// `--cgroup`: cgroup files to write, in the order given.
    pub cgroups: Vec<CgroupProperty>,
    /// `--cgroup-version`: which cgroup hierarchy to use.
    pub cgroup_version: CgroupVersion,
    /// `--parent-cgroup`: where the microVM's cgroup goes; `None` means the exec file name.
    pub parent_cgroup: Option<PathBuf>,
    /// `--resource-limit`: rlimits to install.
    pub resource_limits: ResourceLimits,
    /// Everything after `--`, passed on to the jailed binary.
    pub extra_args: Vec<String>,
}

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// `--help`: print [`help_text`].
    Help,
    /// `--version`: print the version.
    Version,
    /// Build a jail and exec into it.
    Jail(Box<JailerArgs>),
}

/// Parses the jailer's arguments (without the program name).
///
/// # Errors
///
/// The first problem found, as an [`ArgsError`] naming the option and value.
pub fn parse<S: Into<OsString> + Clone>(args: &[S]) -> Result<Action, ArgsError> {
    let args = args
        .iter()
        .map(|a| {
            a.clone()
                .into()
                .into_string()
                .map_err(|s| ArgsError::NotUnicode(s.to_string_lossy().into_owned()))
        })
        .collect::<Result<Vec<String>, ArgsError>>()?;

    let (own, extra) = match args.iter().position(|a| a == "--") {
        Some(i) => (&args[..i], args[i + 1..].to_vec()),
        None => (&args[..], Vec::new()),
    };

    // Firecracker's parser looks for these two before anything else, so a
    // broken command line still answers --help.
    if own.iter().any(|a| a == "--help") {
        return Ok(Action::Help);
    }
    if own.iter().any(|a| a == "--version") {
        return Ok(Action::Version);
    }

    let mut values: Vec<Vec<String>> = vec![Vec::new(); SPECS.len()];
    let mut flags = vec![false; SPECS.len()];
    let mut iter = own.iter();
    while let Some(arg) = iter.next() {
        let Some(body) = arg.strip_prefix("--") else {
            return Err(ArgsError::UnexpectedArgument(arg.clone()));
        };
        let (name, inline) = match body.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (body, None),
        };
        let Some(i) = SPECS.iter().position(|s| s.name == name) else {
            return Err(ArgsError::UnexpectedArgument(arg.clone()));
        };
        let spec = &SPECS[i];
        let seen = flags[i] || !values[i].is_empty();
        if seen && !spec.multiple {
            return Err(ArgsError::DuplicateArgument(spec.name));
        }
        if spec.takes_value {
            let value = match inline {
                Some(v) => v,
                None => iter
                    .next()
                    .filter(|v| !v.starts_with("--"))
                    .ok_or(ArgsError::MissingValue(spec.name))?
                    .clone(),
            };
            values[i].push(value);
        } else {
            if inline.is_some() {
                return Err(ArgsError::FlagWithValue(spec.name));
            }
            flags[i] = true;
        }
    }

    for (i, spec) in SPECS.iter().enumerate() {
        if spec.required && values[i].is_empty() {
            return Err(ArgsError::MissingArgument(spec.name));
        }
    }

    let single = |name: &str| -> Option<String> {
        SPECS
            .iter()
            .position(|s| s.name == name)
            .and_then(|i| values[i].first().cloned())
    };
    let many = |name: &str| -> Vec<String> {
        SPECS
            .iter()
            .position(|s| s.name == name)
            .map(|i| values[i].clone())
            .unwrap_or_default()
    };
    let flag = |name: &str| -> bool {
        SPECS
            .iter()
            .position(|s| s.name == name)
            .is_some_and(|i| flags[i])
    };

    let id = single("id").ok_or(ArgsError::MissingArgument("id"))?;
    validate_instance_id(&id)?;

    let exec_file = single("exec-file").ok_or(ArgsError::MissingArgument("exec-file"))?;
    if exec_file.is_empty() {
        return Err(ArgsError::EmptyExecFile);
    }

    let uid_str = single("uid").ok_or(ArgsError::MissingArgument("uid"))?;
    let uid = uid_str
        .parse::<u32>()
        .map_err(|_| ArgsError::Uid(uid_str))?;
    let gid_str = single("gid").ok_or(ArgsError::MissingArgument("gid"))?;
    let gid = gid_str
        .parse::<u32>()
        .map_err(|_| ArgsError::Gid(gid_str))?;

    let chroot_base_dir =
        PathBuf::from(single("chroot-base-dir").unwrap_or_else(|| DEFAULT_CHROOT_BASE.into()));
    let netns = single("netns").map(PathBuf::from);

    let parent_cgroup = single("parent-cgroup")
        .map(|p| validate_parent_cgroup(&p).map(|()| PathBuf::from(p)))
        .transpose()?;

    let cgroup_version = match single("cgroup-version").as_deref() {
        None | Some("1") => CgroupVersion::V1,
        Some("2") => CgroupVersion::V2,
        Some(other) => return Err(ArgsError::CgroupVersion(other.to_string())),
    };

    let cgroups = many("cgroup")
        .iter()
        .map(|c| parse_cgroup(c))
        .collect::<Result<Vec<_>, _>>()?;

    let mut resource_limits = ResourceLimits::default();
    for arg in many("resource-limit") {
        let (resource, value) = parse_resource_limit(&arg)?;
        resource_limits.set(resource, value);
    }

    Ok(Action::Jail(Box::new(JailerArgs {
        id,
        exec_file: PathBuf::from(exec_file),
        uid,
        gid,
        chroot_base_dir,
        netns,
        daemonize: flag("daemonize"),
        new_pid_ns: flag("new-pid-ns"),
        cgroups,
        cgroup_version,
        parent_cgroup,
        resource_limits,
        extra_args: extra,
    })))
}

/// The `--help` text: one line per option, then a note on `--`.
pub fn help_text() -> String {
    let mut out = String::from(
        "Usage: ember-jailer --id <id> --exec-file <exec_file> --uid <uid> --gid <gid> \
         [options] [-- <arguments for the jailed binary>]\n\n",
    );
    for spec in SPECS {
        if spec.takes_value {
            out.push_str(&format!("--{} <{}>: {}\n", spec.name, spec.name, spec.help));
        } else {
            out.push_str(&format!("--{}: {}\n", spec.name, spec.help));
        }
    }
    out.push_str("\nAny arguments after the -- separator will be supplied to the jailed binary.\n");
    out
}

/// Checks a microVM id: 1 to [`MAX_ID_LEN`] ASCII letters, digits or '-'.
///
/// The id becomes a directory name in the jail path and a cgroup name, so
/// nothing that could climb out of either ('/', '.') may get through.
///
/// # Errors
///
/// [`ArgsError::IdLength`] or [`ArgsError::IdChar`].
pub fn validate_instance_id(id: &str) -> Result<(), ArgsError> {
    if id.is_empty() || id.len() > MAX_ID_LEN {
        return Err(ArgsError::IdLength {
            id: id.to_string(),
            len: id.len(),
        });
    }
    if let Some((pos, ch)) = id
        .chars()
        .enumerate()
        .find(|(_, c)| !(c.is_ascii_alphanumeric() || *c == '-'))
    {
        return Err(ArgsError::IdChar {
            id: id.to_string(),
            ch,
            pos,
        });
    }
    Ok(())
}

/// Checks `--parent-cgroup`: a non-empty relative path without `.` or `..`.
fn validate_parent_cgroup(parent: &str) -> Result<(), ArgsError> {
    let path = Path::new(parent);
    let bad = path.components().any(|c| {
        matches!(
            c,
            Component::RootDir | Component::CurDir | Component::ParentDir | Component::Prefix(_)
        )
    });
    if parent.is_empty() || bad || path.components().next().is_none() {
        return Err(ArgsError::ParentCgroup(parent.to_string()));
    }
    Ok(())
}

/// Parses one `--cgroup <file>=<value>`.
///
/// As Firecracker: exactly one '=', a non-empty value, and a file named
/// `<controller>.<property>` (more dots are allowed, as in
/// `hugetlb.2MB.max`). The file may not hold '/', so it cannot name a path
/// outside the microVM's cgroup directory.
///
/// # Errors
///
/// [`ArgsError::CgroupFormat`] or [`ArgsError::CgroupFile`].
pub fn parse_cgroup(arg: &str) -> Result<CgroupProperty, ArgsError> {
    let parts: Vec<&str> = arg.split('=').collect();
    let [file, value] = parts.as_slice() else {
        return Err(ArgsError::CgroupFormat(arg.to_string()));
    };
    if value.is_empty() {
        return Err(ArgsError::CgroupFormat(arg.to_string()));
    }
    let controller_ok = file
        .split_once('.')
        .is_some_and(|(c, p)| !c.is_empty() && !p.is_empty());
    if !controller_ok || file.contains('/') || *file == ".." {
        return Err(ArgsError::CgroupFile(arg.to_string()));
    }
    Ok(CgroupProperty::new(file, value))
}

/// Parses one `--resource-limit <resource>=<value>`.
///
/// # Errors
///
/// [`ArgsError::ResourceLimitFormat`], [`ArgsError::ResourceLimitValue`] or
/// [`ArgsError::ResourceLimitName`] (checked in that order, as Firecracker).
pub fn parse_resource_limit(arg: &str) -> Result<(Resource, u64), ArgsError> {
    let (name, value) = arg
        .split_once('=')
        .ok_or_else(|| ArgsError::ResourceLimitFormat(arg.to_string()))?;
    let value = value
        .parse::<u64>()
        .map_err(|source| ArgsError::ResourceLimitValue {
            arg: arg.to_string(),
            source,
        })?;
    let resource =
        Resource::from_arg(name).ok_or_else(|| ArgsError::ResourceLimitName(name.to_string()))?;
    Ok((resource, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jail<S: Into<OsString> + Clone>(args: &[S]) -> Result<JailerArgs, ArgsError> {
        match parse(args)? {
            Action::Jail(a) => Ok(*a),
            other => panic!("expected a jail action, got {other:?}"),
        }
    }

    const BASE: &[&str] = &[
        "--id",
        "vm-1",
        "--exec-file",
        "/usr/bin/ember",
        "--uid",
        "123",
        "--gid",
        "100",
    ];

    fn with(extra: &[&str]) -> Vec<String> {
        BASE.iter().chain(extra).map(|s| s.to_string()).collect()
    }

    #[test]
    fn minimal_command_line_gets_firecracker_defaults() {
        let a = jail(BASE).unwrap();
        assert_eq!(a.id, "vm-1");
        assert_eq!(a.exec_file, PathBuf::from("/usr/bin/ember"));
        assert_eq!((a.uid, a.gid), (123, 100));
        assert_eq!(a.chroot_base_dir, PathBuf::from("/srv/jailer"));
        assert_eq!(a.netns, None);
        assert!(!a.daemonize && !a.new_pid_ns);
        assert!(a.cgroups.is_empty());
        assert_eq!(a.cgroup_version, CgroupVersion::V1);
        assert_eq!(a.parent_cgroup, None);
        assert_eq!(a.resource_limits, ResourceLimits::default());
        assert_eq!(a.resource_limits.no_file(), 2048);
        assert_eq!(a.resource_limits.fsize(), None);
        assert!(a.extra_args.is_empty());
    }

    #[test]
    fn every_option_is_parsed() {
        let args = with(&[
            "--chroot-base-dir",
            "/tmp/jails",
            "--netns",
            "/var/run/netns/a",
            "--daemonize",
            "--new-pid-ns",
            "--cgroup",
            "cpu.shares=512",
            "--cgroup=cpuset.cpus=0",
            "--cgroup-version",
            "2",
            "--parent-cgroup",
            "all/ember",
            "--resource-limit",
            "fsize=1000",
            "--resource-limit",
            "no-file=64",
            "--",
            "--no-api",
            "--config-file",
            "/config.json",
            "--",
        ]);
        let a = jail(&args).unwrap();
        assert_eq!(a.chroot_base_dir, PathBuf::from("/tmp/jails"));
        assert_eq!(a.netns, Some(PathBuf::from("/var/run/netns/a")));
        assert!(a.daemonize && a.new_pid_ns);
        assert_eq!(
            a.cgroups,
            vec![
                CgroupProperty::new("cpu.shares", "512"),
                CgroupProperty::new("cpuset.cpus", "0")
            ]
        );
        assert_eq!(a.cgroups[1].controller(), "cpuset");
        assert_eq!(a.cgroup_version, CgroupVersion::V2);
        assert_eq!(a.parent_cgroup, Some(PathBuf::from("all/ember")));
        assert_eq!(a.resource_limits.fsize(), Some(1000));
        assert_eq!(a.resource_limits.no_file(), 64);
        // Only the first `--` separates; later ones belong to the binary.
        assert_eq!(
            a.extra_args,
            vec!["--no-api", "--config-file", "/config.json", "--"]
        );
    }

    #[test]
    fn help_and_version_win_before_the_separator_only() {
        assert_eq!(parse(&["--help"]).unwrap(), Action::Help);
        assert_eq!(parse(&["--bogus", "--version"]).unwrap(), Action::Version);
        assert_eq!(parse(&["--id", "x", "--help"]).unwrap(), Action::Help);
        // After `--` it is an argument for the jailed binary.
        let a = jail(&with(&["--", "--help"])).unwrap();
        assert_eq!(a.extra_args, vec!["--help"]);
        let help = help_text();
        for spec in SPECS {
            assert!(help.contains(&format!("--{}", spec.name)), "{}", spec.name);
        }
    }

    #[test]
    fn missing_required_flags_are_named() {
        for (i, name) in ["id", "exec-file", "uid", "gid"].iter().enumerate() {
            let mut args: Vec<&str> = BASE.to_vec();
            args.drain(i * 2..i * 2 + 2);
            let err = jail(&args).unwrap_err();
            assert!(
                matches!(err, ArgsError::MissingArgument(n) if n == *name),
                "{err}"
            );
            assert_eq!(
                err.to_string(),
                format!("missing required argument --{name}")
            );
        }
    }

    #[test]
    fn malformed_command_lines_are_rejected() {
        let err = jail(&["--id"]).unwrap_err();
        assert!(matches!(err, ArgsError::MissingValue("id")), "{err}");
        let err = jail(&["--id", "--uid", "1"]).unwrap_err();
        assert!(matches!(err, ArgsError::MissingValue("id")), "{err}");
        let err = jail(&with(&["--bogus"])).unwrap_err();
        assert!(matches!(err, ArgsError::UnexpectedArgument(ref a) if a == "--bogus"));
        let err = jail(&with(&["stray"])).unwrap_err();
        assert!(matches!(err, ArgsError::UnexpectedArgument(ref a) if a == "stray"));
        let err = jail(&with(&["--id", "vm-2"])).unwrap_err();
        assert!(matches!(err, ArgsError::DuplicateArgument("id")), "{err}");
        let err = jail(&with(&["--daemonize", "--daemonize"])).unwrap_err();
        assert!(matches!(err, ArgsError::DuplicateArgument("daemonize")));
        let err = jail(&with(&["--daemonize=yes"])).unwrap_err();
        assert!(matches!(err, ArgsError::FlagWithValue("daemonize")));
        let err = jail(&with(&["--uid", "1"])).unwrap_err();
        assert!(matches!(err, ArgsError::DuplicateArgument("uid")));
    }

    #[test]
    fn numbers_and_versions_are_checked() {
        let mut args: Vec<String> = with(&[]);
        args[5] = "-1".into();
        assert!(matches!(jail(&args).unwrap_err(), ArgsError::Uid(ref v) if v == "-1"));
        args[5] = "4294967296".into();
        assert!(matches!(jail(&args).unwrap_err(), ArgsError::Uid(_)));
        args[5] = "0".into();
        args[7] = "abc".into();
        let err = jail(&args).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid --gid \"abc\": expected an unsigned 32-bit number"
        );
        let err = jail(&with(&["--cgroup-version", "3"])).unwrap_err();
        assert!(matches!(err, ArgsError::CgroupVersion(ref v) if v == "3"));
    }

    #[test]
    fn instance_ids_follow_firecracker_rules() {
        validate_instance_id("a").unwrap();
        validate_instance_id("551e7604-e35c-42b3-b825-416853441234").unwrap();
        validate_instance_id(&"a".repeat(64)).unwrap();

        let err = validate_instance_id(&"a".repeat(65)).unwrap_err();
        assert!(matches!(err, ArgsError::IdLength { len: 65, .. }), "{err}");
        let err = validate_instance_id("").unwrap_err();
        assert!(matches!(err, ArgsError::IdLength { len: 0, .. }));
        for (id, ch, pos) in [
            ("vm_1", '_', 2),
            ("../x", '.', 0),
            ("a/b", '/', 1),
            ("a b", ' ', 1),
            ("vé", 'é', 1),
        ] {
            let err = validate_instance_id(id).unwrap_err();
            assert!(
                matches!(err, ArgsError::IdChar { ch: c, pos: p, .. } if c == ch && p == pos),
                "{id}: {err}"
            );
        }
        // The parser applies the same check.
        let mut args = with(&[]);
        args[1] = "bad/id".into();
        assert!(matches!(
            jail(&args).unwrap_err(),
            ArgsError::IdChar { ch: '/', .. }
        ));
    }

    #[test]
    fn cgroup_arguments_are_checked() {
        let ok = parse_cgroup("hugetlb.2MB.max=2097152").unwrap();
        assert_eq!(ok.controller(), "hugetlb");
        assert_eq!(ok.file(), "hugetlb.2MB.max");
        assert_eq!(ok.value(), "2097152");
        for bad in ["cpu.shares", "cpu.shares=", "cpu.shares=1=2", ""] {
            assert!(
                matches!(parse_cgroup(bad), Err(ArgsError::CgroupFormat(_))),
                "{bad}"
            );
        }
        for bad in [
            "=1",
            "cpushares=1",
            ".shares=1",
            "cpu.=1",
            "cpu.x/../y=1",
            "../cpu.x=1",
        ] {
            assert!(
                matches!(parse_cgroup(bad), Err(ArgsError::CgroupFile(_))),
                "{bad}"
            );
        }
        let err = jail(&with(&["--cgroup", "cpu.shares"])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid --cgroup \"cpu.shares\": expected <cgroup_file>=<value> (e.g. cpu.shares=10)"
        );
    }

    #[test]
    fn parent_cgroups_must_stay_relative() {
        for ok in ["ember", "a/b/c", "a/b/"] {
            validate_parent_cgroup(ok).unwrap();
        }
        for bad in ["", "/abs", "../up", "a/../b", "./a", "."] {
            assert!(
                matches!(validate_parent_cgroup(bad), Err(ArgsError::ParentCgroup(_))),
                "{bad}"
            );
        }
        let err = jail(&with(&["--parent-cgroup", "/root"])).unwrap_err();
        assert!(matches!(err, ArgsError::ParentCgroup(_)));
    }

    #[test]
    fn resource_limits_are_checked() {
        assert_eq!(
            parse_resource_limit("fsize=250000000").unwrap(),
            (Resource::Fsize, 250_000_000)
        );
        assert_eq!(
            parse_resource_limit("no-file=1024").unwrap(),
            (Resource::NoFile, 1024)
        );
        assert!(matches!(
            parse_resource_limit("no-file"),
            Err(ArgsError::ResourceLimitFormat(_))
        ));
        assert!(matches!(
            parse_resource_limit("no-file=lots"),
            Err(ArgsError::ResourceLimitValue { .. })
        ));
        assert!(matches!(
            parse_resource_limit("no-file=-1"),
            Err(ArgsError::ResourceLimitValue { .. })
        ));
        assert!(matches!(
            parse_resource_limit("cpu=1"),
            Err(ArgsError::ResourceLimitName(ref n)) if n == "cpu"
        ));
        let err = jail(&with(&["--resource-limit", "zzz"])).unwrap_err();
        assert!(matches!(err, ArgsError::ResourceLimitFormat(_)));
    }

    #[test]
    fn non_unicode_arguments_are_rejected() {
        use std::os::unix::ffi::OsStringExt;
        let bad = OsString::from_vec(vec![b'-', b'-', 0xff]);
        assert!(matches!(parse(&[bad]), Err(ArgsError::NotUnicode(_))));
    }
}
