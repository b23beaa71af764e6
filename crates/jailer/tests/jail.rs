// SPDX-License-Identifier: Apache-2.0

//! End-to-end tests: the real `ember-jailer` binary jails a small static
//! program (`tests/support/ember-probe.c`) that reports what it sees from
//! inside. They need root, cgroup v1 hierarchies, mount namespaces and gcc
//! with a static libc, as the development machines and CI runners have.

use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const JAILER: &str = env!("CARGO_BIN_EXE_ember-jailer");
const UID: u32 = 12345;
const GID: u32 = 12346;

/// The probe, compiled once per test run with a static libc so it needs
/// nothing inside the jail.
fn probe() -> &'static Path {
    static PROBE: OnceLock<PathBuf> = OnceLock::new();
    PROBE.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("jailer-probe");
        fs::create_dir_all(&dir).unwrap();
        let out = dir.join("ember-probe");
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/ember-probe.c");
        let status = Command::new("gcc")
            .args(["-static", "-O1", "-Wall", "-o"])
            .arg(&out)
            .arg(&src)
            .status()
            .expect("gcc must be installed to build the probe");
        assert!(status.success(), "gcc could not build {}", src.display());
        out
    })
}

fn unique() -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

/// Every cgroup hierarchy mounted on this machine.
fn cgroup_mounts() -> Vec<(PathBuf, bool)> {
    fs::read_to_string("/proc/mounts")
        .unwrap()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            match f.get(2) {
                Some(&"cgroup") => Some((PathBuf::from(f[1]), false)),
                Some(&"cgroup2") => Some((PathBuf::from(f[1]), true)),
                _ => None,
            }
        })
        .collect()
}

fn v1_mount(controller: &str) -> PathBuf {
    fs::read_to_string("/proc/mounts")
        .unwrap()
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup") && f.get(3)?.split(',').any(|o| o == controller))
                .then(|| PathBuf::from(f[1]))
        })
        .unwrap_or_else(|| panic!("cgroup v1 controller {controller} is not mounted"))
}

/// A fresh chroot base, id and parent cgroup; removes all of them on drop.
struct Jail {
    base: tempfile::TempDir,
    id: String,
    parent_cgroup: String,
}

impl Jail {
    fn new() -> Self {
        let n = unique();
        Self {
            base: tempfile::Builder::new()
                .prefix("ember-jailer-test")
                .tempdir()
                .unwrap(),
            id: format!("vm-{n}"),
            parent_cgroup: format!("ember-jailer-test-{n}"),
        }
    }

    fn root(&self) -> PathBuf {
        self.base
            .path()
            .join("ember-probe")
            .join(&self.id)
            .join("root")
    }

    fn cgroup(&self, mount: &Path) -> PathBuf {
        mount.join(&self.parent_cgroup).join(&self.id)
    }

    /// The jailer command line for the probe, with `extra` before `--`
    /// and `probe_args` after.
    fn command(&self, extra: &[&str], probe_args: &[&str]) -> Command {
        let mut cmd = Command::new(JAILER);
        cmd.args(["--id", &self.id, "--exec-file"])
            .arg(probe())
            .args(["--uid", &UID.to_string(), "--gid", &GID.to_string()])
            .arg("--chroot-base-dir")
            .arg(self.base.path())
            .args(["--parent-cgroup", &self.parent_cgroup])
            .args(extra)
            .arg("--")
            .args(probe_args);
        cmd
    }

    fn run(&self, extra: &[&str], probe_args: &[&str]) -> Output {
        self.command(extra, probe_args).output().unwrap()
    }

    /// Whether the chroot base is as empty as it was made.
    fn base_is_empty(&self) -> bool {
        fs::read_dir(self.base.path()).unwrap().next().is_none()
    }

    /// Whether any hierarchy holds the parent cgroup.
    fn any_cgroup_left(&self) -> bool {
        cgroup_mounts()
            .iter()
            .any(|(m, _)| m.join(&self.parent_cgroup).exists())
    }
}

impl Drop for Jail {
    fn drop(&mut self) {
        for (mount, _) in cgroup_mounts() {
            let _ = fs::remove_dir(self.cgroup(&mount));
            let _ = fs::remove_dir(mount.join(&self.parent_cgroup));
        }
    }
}

/// The probe's `key=value` report.
struct Report {
    lines: Vec<String>,
}

impl Report {
    fn parse(text: &str) -> Self {
        let lines: Vec<String> = text.lines().map(str::to_string).collect();
        assert_eq!(
            lines.last().map(String::as_str),
            Some("ready"),
            "incomplete probe report:\n{text}"
        );
        Self { lines }
    }

    /// The value of `key=` on a line of its own or among `k=v` pairs.
    fn get(&self, key: &str) -> &str {
        let prefix = format!("{key}=");
        for line in &self.lines {
            for word in line.split(' ') {
                if let Some(v) = word.strip_prefix(&prefix) {
                    return v;
                }
            }
            if let Some(v) = line.strip_prefix(&prefix) {
                return v;
            }
        }
        panic!("no {key} in probe report:\n{}", self.lines.join("\n"))
    }

    /// The line starting with `prefix`.
    fn line(&self, prefix: &str) -> &str {
        self.lines
            .iter()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} line in:\n{}", self.lines.join("\n")))
    }

    fn args(&self) -> Vec<&str> {
        let argc: usize = self.get("argc").parse().unwrap();
        (0..argc).map(|i| self.get(&format!("arg[{i}]"))).collect()
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Reads the probe's report up to `ready` while it keeps running.
fn read_report(child: &mut Child) -> Report {
    let stdout = child.stdout.take().unwrap();
    let mut text = String::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        text.push_str(&line);
        text.push('\n');
        if line == "ready" {
            break;
        }
    }
    Report::parse(&text)
}

fn wait_for_file(path: &Path, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(text) = fs::read_to_string(path) {
            if text.contains(needle) {
                return text;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{} never got {needle:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn probe_runs_jailed_as_the_given_user_in_its_cgroups() {
    let jail = Jail::new();
    // What a caller does before jailing the VMM: put its files in the root.
    fs::create_dir_all(jail.root()).unwrap();
    fs::write(jail.root().join("config.json"), "{}").unwrap();
    let outside = jail.base.path().join("outside-the-jail");
    fs::write(&outside, "secret").unwrap();
    let outside = outside.display().to_string();
    // An inherited descriptor, without close-on-exec, that must not get in.
    let leak = File::open("/proc/self/status").unwrap();
    let leak_fd = leak.as_raw_fd();

    let mut cmd = jail.command(
        &[
            "--cgroup",
            "cpu.shares=512",
            "--cgroup",
            "pids.max=10",
            "--cgroup",
            "cpuset.cpus=0",
        ],
        &[
            "--config-file",
            "/config.json",
            "--wait-stdin",
            &outside,
            "/ember-probe",
            "/config.json",
            "/etc/passwd",
            "/tmp",
        ],
    );
    cmd.env("EMBER_JAILER_TEST_SECRET", "leak")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: dup2 is async-signal-safe; it runs in the forked child only.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(leak_fd, 5) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    let report = read_report(&mut child);

    // Without --new-pid-ns the jailer execs in place: same pid.
    let pid = child.id().to_string();
    assert_eq!(report.get("pid"), pid);

    // While the probe waits on stdin, its cgroups hold it and the values.
    for (controller, file, value) in [
        ("cpu", "cpu.shares", "512"),
        ("pids", "pids.max", "10"),
        ("cpuset", "cpuset.cpus", "0"),
    ] {
        let cg = jail.cgroup(&v1_mount(controller));
        assert_eq!(fs::read_to_string(cg.join(file)).unwrap().trim(), value);
        let tasks = fs::read_to_string(cg.join("tasks")).unwrap();
        assert!(
            tasks.lines().any(|t| t == pid),
            "pid {pid} not in {}/tasks: {tasks:?}",
            cg.display()
        );
    }
    // cpuset.mems was not given but must be inherited for the attach to work.
    let mems = jail.cgroup(&v1_mount("cpuset")).join("cpuset.mems");
    assert!(!fs::read_to_string(mems).unwrap().trim().is_empty());

    drop(child.stdin.take());
    let status = child.wait().unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(status.success(), "{err}");
    assert!(err.is_empty(), "unexpected stderr: {err}");

    // Identity: the asked uid/gid, no supplementary groups, empty environment,
    // nothing inherited but stdio.
    assert_eq!(
        report.line("uid="),
        format!("uid={UID} gid={GID} euid={UID} egid={GID}")
    );
    assert_eq!(report.get("groups"), "0");
    assert_eq!(report.get("env_count"), "0");
    assert_eq!(report.get("open_fds"), "none");

    // The root is the jail: the copied binary is at /, the host is not.
    assert_eq!(report.get("cwd"), "/");
    assert_eq!(
        report.line("root="),
        "root=config.json dev ember-probe ember-probe.pid run"
    );
    assert_eq!(
        report.line(&format!("exists {outside}=")),
        format!("exists {outside}=0")
    );
    assert_eq!(report.line("exists /ember-probe="), "exists /ember-probe=1");
    assert_eq!(report.line("exists /config.json="), "exists /config.json=1");
    assert_eq!(report.line("exists /etc/passwd="), "exists /etc/passwd=0");
    assert_eq!(report.line("exists /tmp="), "exists /tmp=0");

    // Directories and device nodes belong to the jailed user.
    for dir in ["/", "/dev", "/dev/net", "/run"] {
        assert_eq!(
            report.line(&format!("stat {dir} ")),
            format!("stat {dir} mode=700 uid={UID} gid={GID}")
        );
    }
    for (dev, major, minor) in [
        ("/dev/kvm", 10, 232),
        ("/dev/net/tun", 10, 200),
        ("/dev/urandom", 1, 9),
    ] {
        assert_eq!(
            report.line(&format!("dev {dev} ")),
            format!("dev {dev} chr=1 major={major} minor={minor} mode=600 uid={UID} gid={GID}")
        );
    }
    if let Some(minor) = fs::read_to_string("/proc/misc")
        .unwrap()
        .lines()
        .find_map(|l| {
            let mut w = l.split_whitespace();
            let m = w.next()?;
            (w.next()? == "userfaultfd").then(|| m.to_string())
        })
    {
        assert_eq!(
            report.line("dev /dev/userfaultfd "),
            format!(
                "dev /dev/userfaultfd chr=1 major=10 minor={minor} mode=600 uid={UID} gid={GID}"
            )
        );
    }

    // Firecracker's arguments, then ours.
    let args = report.args();
    assert_eq!(args[0], "/ember-probe");
    assert_eq!(args[1..3], ["--id", jail.id.as_str()]);
    assert_eq!(args[3], "--start-time-us");
    assert!(args[4].parse::<u64>().unwrap() > 0);
    assert_eq!(args[5..7], ["--start-time-cpu-us", "0"]);
    assert_eq!(args[7], "--parent-cpu-time-us");
    args[8].parse::<u64>().unwrap();
    assert_eq!(
        args[9..12],
        ["--config-file", "/config.json", "--wait-stdin"]
    );

    // The default rlimits.
    assert_eq!(report.get("rlimit_nofile"), "2048/2048");
    assert_eq!(report.get("rlimit_fsize"), "-1/-1");

    // From the host: the jail's files.
    let root = jail.root();
    assert_eq!(
        fs::read(root.join("ember-probe")).unwrap(),
        fs::read(probe()).unwrap()
    );
    assert_eq!(
        fs::read_to_string(root.join("ember-probe.pid")).unwrap(),
        pid
    );
    let kvm = fs::metadata(root.join("dev/kvm")).unwrap();
    assert_eq!((kvm.uid(), kvm.gid()), (UID, GID));
    assert_eq!(kvm.rdev(), libc::makedev(10, 232));
    assert_eq!(kvm.permissions().mode() & 0o7777, 0o600);
    // The host's mount table was not touched: the jail root is no mount point.
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(!mounts.contains(&root.display().to_string()));
}

/// A cgroup v2 controller this machine offers, with a file and a value.
fn v2_controller(unified: &Path) -> (&'static str, &'static str, &'static str) {
    let available = fs::read_to_string(unified.join("cgroup.controllers")).unwrap();
    let has = |c: &str| available.split_whitespace().any(|a| a == c);
    if has("pids") {
        ("pids", "pids.max", "10")
    } else if has("hugetlb") {
        ("hugetlb", "hugetlb.2MB.max", "2097152")
    } else {
        panic!("the unified hierarchy offers neither pids nor hugetlb: {available:?}")
    }
}

#[test]
fn cgroup_v2_enables_the_controller_and_attaches() {
    let jail = Jail::new();
    let unified = cgroup_mounts()
        .into_iter()
        .find_map(|(m, v2)| v2.then_some(m))
        .expect("no cgroup2 file system is mounted");
    let (controller, file, value) = v2_controller(&unified);
    let root_control = unified.join("cgroup.subtree_control");
    let was_enabled = fs::read_to_string(&root_control)
        .unwrap()
        .split_whitespace()
        .any(|c| c == controller);

    let arg = format!("{file}={value}");
    let mut child = jail
        .command(
            &["--cgroup-version", "2", "--cgroup", &arg],
            &["--wait-stdin"],
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let report = read_report(&mut child);
    let cg = jail.cgroup(&unified);
    let procs = fs::read_to_string(cg.join("cgroup.procs")).unwrap();
    let value_read = fs::read_to_string(cg.join(file)).unwrap();
    let parent_control = fs::read_to_string(
        unified
            .join(&jail.parent_cgroup)
            .join("cgroup.subtree_control"),
    )
    .unwrap();
    drop(child.stdin.take());
    assert!(child.wait().unwrap().success());

    assert!(procs.lines().any(|p| p == report.get("pid")), "{procs:?}");
    assert_eq!(value_read.trim(), value);
    assert!(parent_control.split_whitespace().any(|c| c == controller));

    drop(jail);
    if !was_enabled {
        let _ = fs::write(&root_control, format!("-{controller}\n"));
    }
}

#[test]
fn new_pid_ns_makes_the_probe_pid_1() {
    let jail = Jail::new();
    let out = jail.run(&["--new-pid-ns"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report = Report::parse(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(report.get("pid"), "1");
    // The pid file holds the host's view of the probe's pid.
    let host_pid: u32 = fs::read_to_string(jail.root().join("ember-probe.pid"))
        .unwrap()
        .parse()
        .unwrap();
    assert!(host_pid > 1);
    assert_eq!(
        report.line("uid="),
        format!("uid={UID} gid={GID} euid={UID} egid={GID}")
    );
}

#[test]
fn daemonize_detaches_and_silences_stdio() {
    let jail = Jail::new();
    let start = Instant::now();
    let out = jail.run(&["--daemonize"], &["--out", "/probe.out"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(out.stdout.is_empty() && out.stderr.is_empty());
    assert!(start.elapsed() < Duration::from_secs(5));

    let text = wait_for_file(&jail.root().join("probe.out"), "ready\n");
    let report = Report::parse(&text);
    for fd in 0..3 {
        // /dev/null is character device 1:3.
        assert_eq!(
            report.line(&format!("stdio {fd} ")),
            format!("stdio {fd} type=chr major=1 minor=3")
        );
    }
    // A new session, of which the daemon is not the leader.
    let pid = report.get("pid");
    assert_eq!(report.get("sid"), report.get("pgid"));
    assert_ne!(report.get("sid"), pid);
    let pid_file = wait_for_file(&jail.root().join("ember-probe.pid"), pid);
    assert_eq!(pid_file, pid);
}

#[test]
fn netns_and_resource_limits_apply_to_the_probe() {
    let jail = Jail::new();
    let ns = format!("ember-jt-{}", unique());
    let added = Command::new("ip")
        .args(["netns", "add", &ns])
        .status()
        .unwrap();
    assert!(added.success(), "ip netns add {ns} failed");
    let path = format!("/var/run/netns/{ns}");
    let out = jail.run(
        &[
            "--netns",
            &path,
            "--resource-limit",
            "no-file=100",
            "--resource-limit",
            "fsize=4096",
        ],
        &[],
    );
    let _ = Command::new("ip").args(["netns", "delete", &ns]).status();
    assert!(out.status.success(), "{}", stderr(&out));
    let report = Report::parse(&String::from_utf8_lossy(&out.stdout));
    // A fresh network namespace has only its loopback device.
    assert_eq!(report.get("ifaces"), "lo");
    assert_eq!(report.get("rlimit_nofile"), "100/100");
    assert_eq!(report.get("rlimit_fsize"), "4096/4096");
}

#[test]
fn bad_arguments_fail_before_anything_is_created() {
    let jail = Jail::new();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--id".into(), "x".repeat(65)], "invalid --id"),
        (
            vec!["--id".into(), "vm_1".into()],
            "character '_' at position 2",
        ),
        (
            vec!["--exec-file".into(), "/nonexistent/ember".into()],
            "cannot resolve --exec-file /nonexistent/ember",
        ),
        (
            vec!["--exec-file".into(), "/bin/true".into()],
            "must contain \"ember\"",
        ),
        (
            vec!["--uid".into(), "root".into()],
            "invalid --uid \"root\"",
        ),
        (
            vec!["--cgroup".into(), "cpu.shares".into()],
            "invalid --cgroup",
        ),
        (
            vec!["--cgroup".into(), "nosuchctl.x=1".into()],
            "nosuchctl is not mounted",
        ),
        (
            vec!["--resource-limit".into(), "cpu=1".into()],
            "invalid --resource-limit",
        ),
        (
            vec!["--netns".into(), "/etc/hostname".into()],
            "not a network namespace",
        ),
        (
            vec!["--cgroup-version".into(), "3".into()],
            "invalid --cgroup-version",
        ),
        (
            vec!["--parent-cgroup".into(), "../x".into()],
            "invalid --parent-cgroup",
        ),
    ];
    for (overrides, expected) in cases {
        // Later values replace the defaults below.
        let mut opts: Vec<(String, String)> = vec![
            ("--id".into(), jail.id.clone()),
            ("--exec-file".into(), probe().display().to_string()),
            ("--uid".into(), UID.to_string()),
            ("--gid".into(), GID.to_string()),
            (
                "--chroot-base-dir".into(),
                jail.base.path().display().to_string(),
            ),
        ];
        for pair in overrides.chunks(2) {
            match opts.iter_mut().find(|(k, _)| *k == pair[0]) {
                Some(slot) => slot.1 = pair[1].clone(),
                None => opts.push((pair[0].clone(), pair[1].clone())),
            }
        }
        let out = Command::new(JAILER)
            .args(opts.iter().flat_map(|(k, v)| [k, v]))
            .output()
            .unwrap();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{overrides:?}: {err}");
        assert!(err.starts_with("ember-jailer: error: "), "{err}");
        assert!(
            err.contains(expected),
            "{overrides:?}: expected {expected:?} in {err}"
        );
        assert!(jail.base_is_empty(), "{overrides:?} left files behind");
        assert!(
            !jail.any_cgroup_left(),
            "{overrides:?} left a cgroup behind"
        );
    }

    // A missing required flag.
    let out = Command::new(JAILER)
        .args(["--id", &jail.id, "--uid", "1", "--gid", "1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("missing required argument --exec-file"));
    assert!(jail.base_is_empty());
}

#[test]
fn a_failed_cgroup_write_takes_back_the_jail_and_cgroups() {
    let jail = Jail::new();
    // The pids cgroup is made first, then the cpu file does not exist.
    let out = jail.run(
        &["--cgroup", "pids.max=5", "--cgroup", "cpu.nonexistent=1"],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("cpu.nonexistent"), "{err}");
    assert!(
        jail.base_is_empty(),
        "the chroot directories were left behind"
    );
    assert!(!jail.any_cgroup_left(), "a cgroup was left behind");
}

#[test]
fn a_failed_attach_moves_the_process_back_before_removing_cgroups() {
    let jail = Jail::new();
    // A cpuset with no CPUs takes no task: the pids attach succeeds first,
    // then the cpuset one fails. Removing the pids cgroup only works if the
    // process left it again.
    let out = jail.run(
        &["--cgroup", "pids.max=5", "--cgroup", "cpuset.cpus= "],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("cannot move pid"), "{err}");
    assert!(err.contains("cpuset"), "{err}");
    assert!(!err.contains("cleanup"), "cleanup failed: {err}");
    assert!(jail.base_is_empty());
    assert!(!jail.any_cgroup_left());
}

#[test]
fn what_the_caller_put_in_the_jail_survives_a_failure() {
    let jail = Jail::new();
    fs::create_dir_all(jail.root()).unwrap();
    fs::write(jail.root().join("vmlinux"), "kernel").unwrap();
    let out = jail.run(&["--cgroup", "cpu.nonexistent=1"], &[]);
    assert_eq!(out.status.code(), Some(1));
    let left: Vec<_> = fs::read_dir(jail.root())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["vmlinux"], "only the copied binary is removed");
}

#[test]
fn a_dynamically_linked_binary_fails_with_a_hint() {
    let jail = Jail::new();
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("ember-dynamic");
    fs::copy("/bin/true", &exe).unwrap();
    let out = Command::new(JAILER)
        .args(["--id", &jail.id, "--exec-file"])
        .arg(&exe)
        .args(["--uid", "1", "--gid", "1", "--chroot-base-dir"])
        .arg(jail.base.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("cannot exec"), "{err}");
    assert!(err.contains("ember-dynamic/"), "{err}");
    assert!(err.contains("is dynamically linked"), "{err}");
}

#[test]
fn help_and_version_print_and_succeed() {
    let out = Command::new(JAILER).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--id",
        "--exec-file",
        "--uid",
        "--gid",
        "--chroot-base-dir",
        "--netns",
        "--daemonize",
        "--new-pid-ns",
        "--cgroup",
        "--cgroup-version",
        "--parent-cgroup",
        "--resource-limit",
        "--version",
    ] {
        assert!(help.contains(flag), "{flag} missing from --help");
    }
    let out = Command::new(JAILER).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("Ember jailer v{}", env!("CARGO_PKG_VERSION"))
    );
}

/// A file outside the jail that a planted link points at, with what it
/// held before the jailer ran.
struct Target {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl Target {
    fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("ember-jailer-target")
            .tempdir()
            .unwrap();
        let path = dir.path().join("host-file");
        fs::write(&path, "root-owned host file").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        Self { _dir: dir, path }
    }

    /// The file still holds what it held, with the same mode and owner.
    fn assert_unchanged(&self) {
        assert_eq!(
            fs::read_to_string(&self.path).unwrap(),
            "root-owned host file",
            "the jailer wrote through a planted link"
        );
        let meta = fs::metadata(&self.path).unwrap();
        assert_eq!(meta.mode() & 0o7777, 0o600, "the mode changed");
        assert_eq!((meta.uid(), meta.gid()), (0, 0), "the owner changed");
    }
}

#[test]
fn a_link_planted_in_place_of_the_binary_is_not_written_through() {
    let jail = Jail::new();
    let target = Target::new();
    fs::create_dir_all(jail.root()).unwrap();
    std::os::unix::fs::symlink(&target.path, jail.root().join("ember-probe")).unwrap();
    let out = jail.run(&[], &[]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("cannot copy"), "{err}");
    assert!(err.contains("File exists"), "{err}");
    target.assert_unchanged();
    // The link is the caller's: it stays.
    assert!(fs::symlink_metadata(jail.root().join("ember-probe"))
        .unwrap()
        .file_type()
        .is_symlink());
}

#[test]
fn a_jail_root_left_to_the_jailed_user_is_refused() {
    // What a jailed user can do between two runs with the same id: its
    // `root` directory holds a link to a host file in place of the binary.
    let jail = Jail::new();
    let target = Target::new();
    fs::create_dir_all(jail.root()).unwrap();
    std::os::unix::fs::chown(jail.root(), Some(UID), Some(GID)).unwrap();
    std::os::unix::fs::symlink(&target.path, jail.root().join("ember-probe")).unwrap();
    let out = jail.run(&[], &[]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!("is owned by uid {UID}, not by the jailer's uid 0")),
        "{err}"
    );
    target.assert_unchanged();
}

#[test]
fn a_link_planted_in_place_of_the_jail_root_is_not_followed() {
    let jail = Jail::new();
    let target = Target::new();
    let outside = target.path.parent().unwrap().to_path_buf();
    let before: Vec<_> = fs::read_dir(&outside).unwrap().collect();
    fs::create_dir_all(jail.root().parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(&outside, jail.root()).unwrap();
    let out = jail.run(&[], &[]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("cannot create chroot directory"), "{err}");
    assert!(err.contains("Too many levels of symbolic links"), "{err}");
    target.assert_unchanged();
    // Nothing was copied into the directory the link points at, and it was
    // not handed to the jailed user.
    assert_eq!(fs::read_dir(&outside).unwrap().count(), before.len());
    assert_eq!(fs::metadata(&outside).unwrap().uid(), 0);
}

#[test]
fn a_link_planted_in_place_of_a_device_node_is_not_followed() {
    let jail = Jail::new();
    let target = Target::new();
    fs::create_dir_all(jail.root().join("dev")).unwrap();
    std::os::unix::fs::symlink(&target.path, jail.root().join("dev/kvm")).unwrap();
    let out = jail.run(&[], &[]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("cannot create device node"), "{err}");
    assert!(err.contains("dev/kvm (10:232): File exists"), "{err}");
    target.assert_unchanged();
    // The link itself was not handed to the jailed user either.
    let link = fs::symlink_metadata(jail.root().join("dev/kvm")).unwrap();
    assert_eq!(link.uid(), 0);

    // A link in place of the `dev` directory is not walked through.
    let jail = Jail::new();
    let dir = target.path.parent().unwrap();
    fs::create_dir_all(jail.root()).unwrap();
    std::os::unix::fs::symlink(dir, jail.root().join("dev")).unwrap();
    let out = jail.run(&[], &[]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("cannot create directory"), "{err}");
    assert!(err.contains("Too many levels of symbolic links"), "{err}");
    target.assert_unchanged();
    assert_eq!(fs::metadata(dir).unwrap().uid(), 0);
}
