// SPDX-License-Identifier: Apache-2.0

//! The microVM's cgroups (`--cgroup`, `--cgroup-version`, `--parent-cgroup`).
//!
//! As Firecracker's jailer: the hierarchies are found in `/proc/mounts`; the
//! microVM's cgroup is `<hierarchy>/<parent-cgroup>/<id>`; every value is
//! written first and the process is attached last, because some controllers
//! (cpuset) refuse tasks until their files are filled.
//!
//! * **v1**: one hierarchy per controller (or per group of co-mounted
//!   controllers). Before a file is written, the parent's value is copied
//!   into it (a new v1 cgroup may start with empty files, and a child cannot
//!   hold a value its parent does not have). Ember also copies `cpuset.cpus`
//!   and `cpuset.mems` whenever the cpuset controller is used, since a cpuset
//!   with either file empty takes no tasks. The pid goes to `tasks`.
//! * **v2**: the unified hierarchy. Each controller used is enabled in the
//!   `cgroup.subtree_control` of every ancestor, from the hierarchy root
//!   down. The pid goes to `cgroup.procs`. With no `--cgroup` at all, the
//!   process is moved into `<parent-cgroup>` if that cgroup exists.
//!
//! Setup is logged in an [`UndoLog`]: directories created, and the cgroup
//! the process came from, so a failure can put the process back and remove
//! the new cgroups.

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::undo::UndoLog;

/// Which cgroup hierarchy to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    /// cgroup v1: one hierarchy per controller.
    V1,
    /// cgroup v2: the unified hierarchy.
    V2,
}

impl fmt::Display for CgroupVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::V1 => f.write_str("v1"),
            Self::V2 => f.write_str("v2"),
        }
    }
}

/// One `--cgroup <file>=<value>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupProperty {
    file: String,
    value: String,
}

impl CgroupProperty {
    /// A property; `file` is `<controller>.<property>` (see [`crate::args::parse_cgroup`]).
    pub fn new(file: &str, value: &str) -> Self {
        Self {
            file: file.to_string(),
            value: value.to_string(),
        }
    }

    /// The cgroup file, e.g. `cpu.shares`.
    pub fn file(&self) -> &str {
        &self.file
    }

    /// The value to write.
    pub fn value(&self) -> &str {
        &self.value
    }

    /// The controller: the file name up to its first '.'.
    pub fn controller(&self) -> &str {
        self.file.split('.').next().unwrap_or_default()
    }
}

/// What went wrong while finding or setting up the microVM's cgroups.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// No mounted v1 hierarchy carries the controller.
    #[error("cgroup controller {0} is not mounted as a cgroup v1 hierarchy (see /proc/mounts)")]
    ControllerNotMounted(String),
    /// No cgroup2 file system is mounted.
    #[error("no cgroup v2 (unified) hierarchy is mounted (see /proc/mounts)")]
    UnifiedMissing,
    /// The unified hierarchy does not offer the controller.
    #[error("cgroup controller {controller} is not available in {}", path.display())]
    ControllerUnavailable {
        /// The controller asked for.
        controller: String,
        /// The `cgroup.controllers` file consulted.
        path: PathBuf,
    },
    /// A cgroup directory could not be created.
    #[error("cannot create cgroup directory {}: {source}", path.display())]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// Why `mkdir` failed.
        #[source]
        source: io::Error,
    },
    /// A cgroup file could not be read.
    #[error("cannot read cgroup file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why the read failed.
        #[source]
        source: io::Error,
    },
    /// A cgroup file refused a value.
    #[error("cannot write {value:?} to cgroup file {}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The value.
        value: String,
        /// Why the write failed.
        #[source]
        source: io::Error,
    },
    /// Every ancestor's copy of a file is empty, so there is nothing to inherit.
    #[error("cannot inherit {file} into cgroup {}: the parent cgroups leave it empty", path.display())]
    InheritFromParent {
        /// The new cgroup.
        path: PathBuf,
        /// The file.
        file: String,
    },
    /// The process could not be moved into its cgroup.
    #[error("cannot move pid {pid} into cgroup {}: {source}", path.display())]
    Attach {
        /// The `tasks` or `cgroup.procs` file.
        path: PathBuf,
        /// The pid.
        pid: u32,
        /// Why the kernel refused.
        #[source]
        source: io::Error,
    },
}

/// A cgroup file system listed in `/proc/mounts`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupMount {
    /// Where it is mounted.
    pub dir: PathBuf,
    /// `cgroup` (v1) or `cgroup2` (v2).
    pub version: CgroupVersion,
    /// The mount options; for v1 they name the controllers (`rw,relatime,cpu,cpuacct`).
    pub options: Vec<String>,
}

impl CgroupMount {
    fn has_option(&self, name: &str) -> bool {
        self.options.iter().any(|o| o == name)
    }
}

/// The cgroup file systems in the text of `/proc/mounts`.
pub fn parse_mounts(text: &str) -> Vec<CgroupMount> {
    text.lines()
        .filter_map(|line| {
            // proc(5): device, mount point, type, options, dump, pass.
            let mut fields = line.split_whitespace();
            let _device = fields.next()?;
            let dir = fields.next()?;
            let version = match fields.next()? {
                "cgroup" => CgroupVersion::V1,
                "cgroup2" => CgroupVersion::V2,
                _ => return None,
            };
            let options = fields.next()?.split(',').map(str::to_string).collect();
            Some(CgroupMount {
                dir: PathBuf::from(unescape_mount_path(dir)),
                version,
                options,
            })
        })
        .collect()
}

/// Undoes the octal escapes (`\040` for a space) the kernel puts in mount paths.
fn unescape_mount_path(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            d.iter()
                .all(|b| (b'0'..=b'7').contains(b))
                .then(|| d.iter().fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0')))
        });
        match (bytes[i], octal) {
            (b'\\', Some(v)) if v <= 0xff => {
                out.push(v as u8);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup (relative to its hierarchy root) the process is in, from the
/// text of `/proc/self/cgroup` (`<id>:<controllers>:<path>` lines).
fn current_cgroup(self_cgroup: &str, mount: &CgroupMount) -> Option<PathBuf> {
    self_cgroup.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let id = parts.next()?;
        let controllers = parts.next()?;
        let path = parts.next()?;
        let matches = match mount.version {
            CgroupVersion::V2 => id == "0" && controllers.is_empty(),
            CgroupVersion::V1 => {
                !controllers.is_empty() && controllers.split(',').all(|c| mount.has_option(c))
            }
        };
        matches.then(|| PathBuf::from(path.trim_start_matches('/')))
    })
}

/// The microVM's cgroup in one hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup {
    version: CgroupVersion,
    /// The hierarchy's mount point.
    mount: PathBuf,
    /// `<mount>/<parent>/<id>`.
    location: PathBuf,
    /// Number of components of `<parent>`: how far up inheritance may look.
    parent_depth: usize,
    /// The controllers of this hierarchy that are used (v2: to enable).
    controllers: Vec<String>,
    properties: Vec<CgroupProperty>,
    /// The cgroup the process was in, as a directory, to return to on undo.
    original: PathBuf,
}

impl Cgroup {
    /// The directory of the microVM's cgroup.
    pub fn location(&self) -> &Path {
        &self.location
    }

    /// The properties written into it, in order.
    pub fn properties(&self) -> &[CgroupProperty] {
        &self.properties
    }

    /// The file the pid is written to.
    pub fn procs_file(&self) -> PathBuf {
        self.location.join(procs_file_name(self.version))
    }

    fn write_values(&self, undo: &mut UndoLog) -> Result<(), CgroupError> {
        undo.create_dir_all(&self.location)
            .map_err(|source| CgroupError::CreateDir {
                path: self.location.clone(),
                source,
            })?;
        match self.version {
            CgroupVersion::V1 => {
                if self.controllers.iter().any(|c| c == "cpuset") {
                    for file in ["cpuset.cpus", "cpuset.mems"] {
                        inherit_from_parent(&self.location, file, self.parent_depth)?;
                    }
                }
                for p in &self.properties {
                    inherit_from_parent(&self.location, p.file(), self.parent_depth)?;
                    write_line(&self.location.join(p.file()), p.value())?;
                }
            }
            CgroupVersion::V2 => {
                for controller in &self.controllers {
                    enable_controller(&self.mount, &self.location, controller)?;
                }
                for p in &self.properties {
                    write_line(&self.location.join(p.file()), p.value())?;
                }
            }
        }
        Ok(())
    }
}

fn procs_file_name(version: CgroupVersion) -> &'static str {
    match version {
        CgroupVersion::V1 => "tasks",
        CgroupVersion::V2 => "cgroup.procs",
    }
}

/// The cgroups to set up for one microVM, checked against the mounted hierarchies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupPlan {
    version: CgroupVersion,
    cgroups: Vec<Cgroup>,
    /// v2 without `--cgroup`: move into `<unified>/<parent>` if it exists.
    join_parent: Option<(PathBuf, PathBuf)>,
}

impl CgroupPlan {
    /// Plans the cgroups, or returns `None` when there is nothing to do
    /// (v1 without any `--cgroup`).
    ///
    /// `mounts` is the text of `/proc/mounts` and `self_cgroup` that of
    /// `/proc/self/cgroup`. For v2 the unified root's `cgroup.controllers`
    /// is read to check each controller is available. Nothing is created.
    ///
    /// # Errors
    ///
    /// A controller that is not mounted (v1) or not available (v2), or no
    /// unified hierarchy at all (v2).
    pub fn new(
        version: CgroupVersion,
        properties: &[CgroupProperty],
        id: &str,
        parent: &Path,
        mounts: &str,
        self_cgroup: &str,
    ) -> Result<Option<Self>, CgroupError> {
        let mounts = parse_mounts(mounts);
        let parent_depth = parent.components().count();
        let make = |mount: &CgroupMount| Cgroup {
            version,
            mount: mount.dir.clone(),
            location: mount.dir.join(parent).join(id),
            parent_depth,
            controllers: Vec::new(),
            properties: Vec::new(),
            original: mount
                .dir
                .join(current_cgroup(self_cgroup, mount).unwrap_or_default()),
        };

        match version {
            CgroupVersion::V1 => {
                if properties.is_empty() {
                    return Ok(None);
                }
                let mut cgroups: Vec<Cgroup> = Vec::new();
                for p in properties {
                    let controller = p.controller();
                    let mount = mounts
                        .iter()
                        .find(|m| m.version == CgroupVersion::V1 && m.has_option(controller))
                        .ok_or_else(|| CgroupError::ControllerNotMounted(controller.to_string()))?;
                    // Co-mounted controllers (cpu,cpuacct) share one cgroup.
                    let idx = match cgroups.iter().position(|c| c.mount == mount.dir) {
                        Some(i) => i,
                        None => {
                            cgroups.push(make(mount));
                            cgroups.len() - 1
                        }
                    };
                    let cg = &mut cgroups[idx];
                    if !cg.controllers.iter().any(|c| c == controller) {
                        cg.controllers.push(controller.to_string());
                    }
                    cg.properties.push(p.clone());
                }
                Ok(Some(Self {
                    version,
                    cgroups,
                    join_parent: None,
                }))
            }
            CgroupVersion::V2 => {
                let mount = mounts
                    .iter()
                    .find(|m| m.version == CgroupVersion::V2)
                    .ok_or(CgroupError::UnifiedMissing)?;
                if properties.is_empty() {
                    let parent_dir = mount.dir.join(parent);
                    return Ok(Some(Self {
                        version,
                        cgroups: Vec::new(),
                        join_parent: Some((parent_dir, make(mount).original)),
                    }));
                }
                let list = mount.dir.join("cgroup.controllers");
                let available = fs::read_to_string(&list).unwrap_or_default();
                let mut cg = make(mount);
                for p in properties {
                    let controller = p.controller();
                    if !available.split_whitespace().any(|c| c == controller) {
                        return Err(CgroupError::ControllerUnavailable {
                            controller: controller.to_string(),
                            path: list,
                        });
                    }
                    if !cg.controllers.iter().any(|c| c == controller) {
                        cg.controllers.push(controller.to_string());
                    }
                    cg.properties.push(p.clone());
                }
                Ok(Some(Self {
                    version,
                    cgroups: vec![cg],
                    join_parent: None,
                }))
            }
        }
    }

    /// The cgroups, one per hierarchy used.
    pub fn cgroups(&self) -> &[Cgroup] {
        &self.cgroups
    }

    /// Creates the cgroups, writes every value, then moves `pid` into them.
    ///
    /// Each directory created and each move is logged in `undo`.
    ///
    /// # Errors
    ///
    /// The first step that failed, naming its path.
    pub fn setup(&self, pid: u32, undo: &mut UndoLog) -> Result<(), CgroupError> {
        for cg in &self.cgroups {
            cg.write_values(undo)?;
        }
        for cg in &self.cgroups {
            attach(&cg.procs_file(), pid, &cg.original, self.version, undo)?;
        }
        if let Some((dir, original)) = &self.join_parent {
            if dir.is_dir() {
                let procs = dir.join(procs_file_name(self.version));
                attach(&procs, pid, original, self.version, undo)?;
            }
        }
        Ok(())
    }
}

fn attach(
    procs: &Path,
    pid: u32,
    original: &Path,
    version: CgroupVersion,
    undo: &mut UndoLog,
) -> Result<(), CgroupError> {
    write_whole(procs, &format!("{pid}\n")).map_err(|source| CgroupError::Attach {
        path: procs.to_path_buf(),
        pid,
        source,
    })?;
    undo.write_on_undo(&original.join(procs_file_name(version)), format!("{pid}\n"));
    Ok(())
}

/// The first line of a cgroup file, without its newline.
fn read_line(path: &Path) -> Result<String, CgroupError> {
    let text = fs::read_to_string(path).map_err(|source| CgroupError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(text.lines().next().unwrap_or_default().to_string())
}

/// Writes `text` to the existing file `path`, opened without following a
/// symbolic link in any component of its path: the cgroup files are in
/// cgroupfs, but the directories above them are walked too.
fn write_whole(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    crate::dir::open_existing_for_write(path)?.write_all(text.as_bytes())
}

/// Writes one value to a cgroup file (cgroupfs wants a whole line per write).
fn write_line(path: &Path, value: &str) -> Result<(), CgroupError> {
    write_whole(path, &format!("{value}\n")).map_err(|source| CgroupError::Write {
        path: path.to_path_buf(),
        value: value.to_string(),
        source,
    })
}

/// Copies `file` from the parent cgroup of `cgroup` into `cgroup`.
///
/// If the parent's copy is empty, it is first filled from its own parent,
/// up to `depth` levels (the depth of `--parent-cgroup`), as Firecracker's
/// `inherit_from_parent`. Another jailer filling the same parent at the same
/// time is harmless: only the final content of the parent matters.
fn inherit_from_parent(cgroup: &Path, file: &str, depth: usize) -> Result<(), CgroupError> {
    let parent_file = cgroup.with_file_name(file);
    let mut line = read_line(&parent_file)?;
    if line.is_empty() && depth > 0 {
        if let Some(parent) = parent_file.parent() {
            // The result does not matter: the re-read below decides.
            let _ = inherit_from_parent(parent, file, depth - 1);
            line = read_line(&parent_file)?;
        }
    }
    if line.is_empty() {
        return Err(CgroupError::InheritFromParent {
            path: cgroup.to_path_buf(),
            file: file.to_string(),
        });
    }
    write_line(&cgroup.join(file), &line)
}

/// Enables `controller` for `cgroup`: `+controller` into the
/// `cgroup.subtree_control` of every ancestor from the hierarchy root down.
fn enable_controller(mount: &Path, cgroup: &Path, controller: &str) -> Result<(), CgroupError> {
    let Ok(relative) = cgroup.strip_prefix(mount) else {
        return Ok(());
    };
    let mut dir = mount.to_path_buf();
    let mut dirs = vec![dir.clone()];
    let components: Vec<_> = relative.components().collect();
    // Every ancestor of the cgroup, not the cgroup itself.
    for c in components.iter().take(components.len().saturating_sub(1)) {
        dir.push(c);
        dirs.push(dir.clone());
    }
    for d in dirs {
        let control = d.join("cgroup.subtree_control");
        if control.exists() {
            write_line(&control, &format!("+{controller}"))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTS: &str = "\
sysfs /sys sysfs rw,nosuid 0 0
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,relatime,cpu,cpuacct 0 0
cgroup /sys/fs/cgroup/cpuset cgroup rw,relatime,cpuset 0 0
cgroup /sys/fs/cgroup/systemd cgroup rw,relatime,name=systemd 0 0
cgroup /sys/fs/cgroup/with\\040space cgroup rw,pids 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,nsdelegate 0 0
";

    const SELF_CGROUP: &str = "\
5:pids:/
4:name=systemd:/user.slice
3:cpuset:/
2:cpu,cpuacct:/user.slice/session-1.scope
0::/user.slice
";

    #[test]
    fn mounts_are_found_and_unescaped() {
        let m = parse_mounts(MOUNTS);
        assert_eq!(m.len(), 5);
        assert_eq!(m[0].dir, PathBuf::from("/sys/fs/cgroup/cpu,cpuacct"));
        assert_eq!(m[0].version, CgroupVersion::V1);
        assert!(m[0].has_option("cpuacct") && !m[0].has_option("cpuset"));
        assert_eq!(m[3].dir, PathBuf::from("/sys/fs/cgroup/with space"));
        assert_eq!(m[4].version, CgroupVersion::V2);
        assert_eq!(unescape_mount_path("a\\134b\\0"), "a\\b\\0");
    }

    #[test]
    fn current_cgroup_matches_the_hierarchy() {
        let m = parse_mounts(MOUNTS);
        assert_eq!(
            current_cgroup(SELF_CGROUP, &m[0]),
            Some(PathBuf::from("user.slice/session-1.scope"))
        );
        assert_eq!(current_cgroup(SELF_CGROUP, &m[1]), Some(PathBuf::new()));
        assert_eq!(
            current_cgroup(SELF_CGROUP, &m[2]),
            Some(PathBuf::from("user.slice"))
        );
        assert_eq!(
            current_cgroup(SELF_CGROUP, &m[4]),
            Some(PathBuf::from("user.slice"))
        );
    }

    #[test]
    fn v1_plan_places_cgroups_under_parent_and_id() {
        let props = [
            CgroupProperty::new("cpu.shares", "512"),
            CgroupProperty::new("cpuset.cpus", "0"),
            CgroupProperty::new("cpuacct.x", "1"),
        ];
        let plan = CgroupPlan::new(
            CgroupVersion::V1,
            &props,
            "vm1",
            Path::new("all/ember"),
            MOUNTS,
            SELF_CGROUP,
        )
        .unwrap()
        .unwrap();
        let cgs = plan.cgroups();
        assert_eq!(cgs.len(), 2, "cpu and cpuacct share one hierarchy");
        assert_eq!(
            cgs[0].location(),
            Path::new("/sys/fs/cgroup/cpu,cpuacct/all/ember/vm1")
        );
        assert_eq!(
            cgs[0].procs_file(),
            PathBuf::from("/sys/fs/cgroup/cpu,cpuacct/all/ember/vm1/tasks")
        );
        assert_eq!(cgs[0].parent_depth, 2);
        assert_eq!(cgs[0].controllers, vec!["cpu", "cpuacct"]);
        assert_eq!(cgs[0].properties().len(), 2);
        assert_eq!(
            cgs[0].original,
            PathBuf::from("/sys/fs/cgroup/cpu,cpuacct/user.slice/session-1.scope")
        );
        assert_eq!(
            cgs[1].location(),
            Path::new("/sys/fs/cgroup/cpuset/all/ember/vm1")
        );

        // Nothing to do without --cgroup.
        let none = CgroupPlan::new(
            CgroupVersion::V1,
            &[],
            "vm1",
            Path::new("ember"),
            MOUNTS,
            "",
        )
        .unwrap();
        assert_eq!(none, None);
    }

    #[test]
    fn unmounted_controllers_are_rejected_before_anything_is_made() {
        let err = CgroupPlan::new(
            CgroupVersion::V1,
            &[CgroupProperty::new("memory.limit_in_bytes", "1")],
            "vm1",
            Path::new("ember"),
            MOUNTS,
            SELF_CGROUP,
        )
        .unwrap_err();
        assert!(matches!(err, CgroupError::ControllerNotMounted(ref c) if c == "memory"));
        // "name=systemd" is an option, not a controller called "name".
        let err = CgroupPlan::new(
            CgroupVersion::V1,
            &[CgroupProperty::new("name.x", "1")],
            "vm1",
            Path::new("ember"),
            MOUNTS,
            SELF_CGROUP,
        )
        .unwrap_err();
        assert!(matches!(err, CgroupError::ControllerNotMounted(_)));
        let err = CgroupPlan::new(
            CgroupVersion::V2,
            &[],
            "vm1",
            Path::new("ember"),
            "cgroup /c cgroup rw,cpu 0 0\n",
            "",
        )
        .unwrap_err();
        assert!(matches!(err, CgroupError::UnifiedMissing));
    }

    /// A fake cgroup tree in a temporary directory.
    fn fake_v1(tmp: &Path) -> String {
        let cpuset = tmp.join("cpuset");
        let cpu = tmp.join("cpu");
        fs::create_dir_all(&cpuset).unwrap();
        fs::create_dir_all(&cpu).unwrap();
        fs::write(cpuset.join("cpuset.cpus"), "0-3\n").unwrap();
        fs::write(cpuset.join("cpuset.mems"), "0\n").unwrap();
        fs::write(cpu.join("cpu.shares"), "1024\n").unwrap();
        format!(
            "cgroup {} cgroup rw,cpuset 0 0\ncgroup {} cgroup rw,cpu 0 0\n",
            cpuset.display(),
            cpu.display()
        )
    }

    /// Plays the kernel: a new cgroup directory gets empty control files.
    fn make_cgroup_dirs(dirs: &[PathBuf], files: &[&str]) {
        for d in dirs {
            fs::create_dir_all(d).unwrap();
            for f in files {
                fs::write(d.join(f), "").unwrap();
            }
        }
    }

    #[test]
    fn v1_setup_inherits_writes_and_attaches() {
        let tmp = tempfile::tempdir().unwrap();
        let mounts = fake_v1(tmp.path());
        let cpuset = tmp.path().join("cpuset");
        let self_cgroup = "1:cpuset:/\n2:cpu:/\n";
        make_cgroup_dirs(
            &[cpuset.join("ember"), cpuset.join("ember/vm1")],
            &["cpuset.cpus", "cpuset.mems", "tasks"],
        );
        make_cgroup_dirs(
            &[
                tmp.path().join("cpu/ember"),
                tmp.path().join("cpu/ember/vm1"),
            ],
            &["cpu.shares", "tasks"],
        );

        let plan = CgroupPlan::new(
            CgroupVersion::V1,
            &[
                CgroupProperty::new("cpuset.cpus", "1"),
                CgroupProperty::new("cpu.shares", "512"),
            ],
            "vm1",
            Path::new("ember"),
            &mounts,
            self_cgroup,
        )
        .unwrap()
        .unwrap();
        let mut undo = UndoLog::new();
        plan.setup(4242, &mut undo).unwrap();

        let read = |p: &str| fs::read_to_string(tmp.path().join(p)).unwrap();
        assert_eq!(read("cpuset/ember/vm1/cpuset.cpus"), "1\n");
        // Not asked for, but a cpuset without mems takes no task.
        assert_eq!(read("cpuset/ember/vm1/cpuset.mems"), "0\n");
        // The empty parent was filled from the root on the way.
        assert_eq!(read("cpuset/ember/cpuset.cpus"), "0-3\n");
        assert_eq!(read("cpuset/ember/vm1/tasks"), "4242\n");
        assert_eq!(read("cpu/ember/vm1/cpu.shares"), "512\n");
        assert_eq!(read("cpu/ember/vm1/tasks"), "4242\n");

        // Undo moves the pid back to where it was (the hierarchy roots here).
        fs::write(cpuset.join("tasks"), "").unwrap();
        undo.undo();
        assert_eq!(read("cpuset/tasks"), "4242\n");
        assert_eq!(read("cpu/tasks"), "4242\n");
    }

    #[test]
    fn v1_inherit_fails_when_every_ancestor_is_empty() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("cpuset");
        make_cgroup_dirs(
            &[root.clone(), root.join("a"), root.join("a/vm")],
            &["cpuset.mems"],
        );
        let err = inherit_from_parent(&root.join("a/vm"), "cpuset.mems", 1).unwrap_err();
        assert!(
            matches!(err, CgroupError::InheritFromParent { ref file, .. } if file == "cpuset.mems")
        );
        let err = inherit_from_parent(&root.join("a/vm"), "missing.file", 1).unwrap_err();
        assert!(matches!(err, CgroupError::Read { .. }), "{err}");
    }

    #[test]
    fn v2_setup_enables_controllers_down_the_tree() {
        let tmp = tempfile::tempdir().unwrap();
        let unified = tmp.path().join("unified");
        fs::create_dir_all(&unified).unwrap();
        fs::write(unified.join("cgroup.controllers"), "cpu hugetlb pids\n").unwrap();
        let mounts = format!("cgroup2 {} cgroup2 rw 0 0\n", unified.display());
        make_cgroup_dirs(
            &[
                unified.clone(),
                unified.join("a"),
                unified.join("a/b"),
                unified.join("a/b/vm"),
            ],
            // The files cgroupfs provides; the jailer creates none.
            &["cgroup.subtree_control", "cgroup.procs", "pids.max"],
        );

        let err = CgroupPlan::new(
            CgroupVersion::V2,
            &[CgroupProperty::new("memory.max", "1")],
            "vm",
            Path::new("a/b"),
            &mounts,
            "0::/\n",
        )
        .unwrap_err();
        assert!(
            matches!(err, CgroupError::ControllerUnavailable { ref controller, .. } if controller == "memory")
        );

        let plan = CgroupPlan::new(
            CgroupVersion::V2,
            &[CgroupProperty::new("pids.max", "10")],
            "vm",
            Path::new("a/b"),
            &mounts,
            "0::/\n",
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            plan.cgroups()[0].procs_file(),
            unified.join("a/b/vm/cgroup.procs")
        );
        plan.setup(7, &mut UndoLog::new()).unwrap();
        let read = |p: &str| fs::read_to_string(unified.join(p)).unwrap();
        assert_eq!(read("cgroup.subtree_control"), "+pids\n");
        assert_eq!(read("a/cgroup.subtree_control"), "+pids\n");
        assert_eq!(read("a/b/cgroup.subtree_control"), "+pids\n");
        assert_eq!(read("a/b/vm/cgroup.subtree_control"), "");
        assert_eq!(read("a/b/vm/pids.max"), "10\n");
        assert_eq!(read("a/b/vm/cgroup.procs"), "7\n");
    }

    #[test]
    fn v2_without_properties_joins_an_existing_parent() {
        let tmp = tempfile::tempdir().unwrap();
        let unified = tmp.path().join("unified");
        let mounts = format!("cgroup2 {} cgroup2 rw 0 0\n", unified.display());
        let plan = CgroupPlan::new(
            CgroupVersion::V2,
            &[],
            "vm",
            Path::new("ember"),
            &mounts,
            "0::/\n",
        )
        .unwrap()
        .unwrap();
        // Absent parent: nothing happens.
        plan.setup(9, &mut UndoLog::new()).unwrap();
        assert!(!unified.join("ember").exists());
        make_cgroup_dirs(&[unified.join("ember")], &["cgroup.procs"]);
        plan.setup(9, &mut UndoLog::new()).unwrap();
        assert_eq!(
            fs::read_to_string(unified.join("ember/cgroup.procs")).unwrap(),
            "9\n"
        );
    }

    #[test]
    fn failed_writes_name_the_file_and_value() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("no/such/file");
        let err = write_line(&path, "5").unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "cannot write \"5\" to cgroup file {}: No such file or directory (os error 2)",
                path.display()
            )
        );
    }

    #[test]
    fn cgroup_files_are_not_written_through_links() {
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("real");
        fs::create_dir(&real).unwrap();
        fs::write(real.join("pids.max"), "").unwrap();
        // A linked parent directory, then a linked file.
        std::os::unix::fs::symlink(&real, tmp.path().join("cg")).unwrap();
        let err = write_line(&tmp.path().join("cg/pids.max"), "5").unwrap_err();
        assert!(err.to_string().contains("symbolic links"), "{err}");
        std::os::unix::fs::symlink(real.join("pids.max"), real.join("linked")).unwrap();
        let err = write_line(&real.join("linked"), "5").unwrap_err();
        assert!(err.to_string().contains("symbolic links"), "{err}");
        assert_eq!(fs::read_to_string(real.join("pids.max")).unwrap(), "");
        write_line(&real.join("pids.max"), "5").unwrap();
        assert_eq!(fs::read_to_string(real.join("pids.max")).unwrap(), "5\n");
    }
}
