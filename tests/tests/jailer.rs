//! The real `ember` binary confined by the real `ember-jailer`, as a
//! Firecracker user runs `firecracker` under Firecracker's `jailer`:
//!
//! ```text
//! ember-jailer --id ID --exec-file ember --uid 12345 --gid 12345
//!              --chroot-base-dir BASE --cgroup-version 1 --cgroup pids.max=N
//!              -- --no-api --config-file /config.json
//! ```
//!
//! The jail is `BASE/ember/ID/root`; everything ember opens is named by its
//! path inside it. Ember is linked dynamically against glibc and the jailer
//! puts no libraries in the jail, so the tests copy the ELF interpreter and
//! the libraries `ldd` lists into the root at their host paths.
//!
//! The tests need root, the v1 `pids` cgroup hierarchy and /dev/kvm, as the
//! development machines and CI runners have.

use std::fmt;
use std::fs;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use ember_tests::{default_config, ember_binary, guest_path};
use serde_json::Value;

const GREETING: &str = "Hello from the Ember test guest";
/// The unprivileged identity the jailer drops to.
const UID: u32 = 12345;
const GID: u32 = 12345;
/// A jailed hello run takes about 0.25 s here; this only catches hangs.
const TIMEOUT: Duration = Duration::from_secs(20);
/// Ember's exit status when the configuration cannot be applied
/// (Firecracker's `BAD_CONFIGURATION`).
const BAD_CONFIGURATION: i32 = 152;

/// Path of the `ember-jailer` binary, built on first use exactly as
/// [`ember_binary`] builds ember: `$CARGO build -p ember-jailer --bin
/// ember-jailer` with this test's profile and target directory.
/// `$EMBER_JAILER_BIN`, when set, names a prebuilt jailer instead.
fn jailer_binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(build_jailer)
}

fn build_jailer() -> PathBuf {
    if let Some(bin) = std::env::var_os("EMBER_JAILER_BIN") {
        return PathBuf::from(bin);
    }
    let exe = std::env::current_exe().expect("the test binary's path");
    // target/<profile>/deps/jailer-<hash>
    let profile_dir = exe
        .parent()
        .filter(|d| d.ends_with("deps"))
        .and_then(Path::parent)
        .unwrap_or_else(|| panic!("{} is not in target/<profile>/deps", exe.display()));
    let target_dir = profile_dir
        .parent()
        .unwrap_or_else(|| panic!("{} has no parent directory", profile_dir.display()));
    let profile = profile_dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("debug");
    let cargo = std::env::var_os("CARGO")
        .or_else(|| option_env!("CARGO").map(Into::into))
        .unwrap_or_else(|| "cargo".into());
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives inside the workspace");

    let mut cmd = Command::new(&cargo);
    cmd.args([
        "build",
        "--quiet",
        "-p",
        "ember-jailer",
        "--bin",
        "ember-jailer",
    ])
    .arg("--target-dir")
    .arg(target_dir)
    .current_dir(workspace);
    match profile {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "building ember-jailer failed ({}): {cmd:?}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let bin = profile_dir.join("ember-jailer");
    assert!(
        bin.is_file(),
        "cargo built ember-jailer but {} is missing",
        bin.display()
    );
    bin
}

/// The tests share `<cgroup mount>/ember` (the jailer's default parent
/// cgroup, the exec file's name): one at a time, so that one test's cleanup
/// never removes that directory while another's jailer is creating its
/// cgroup inside.
fn serialize() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Every cgroup hierarchy mounted on this machine (v1 and v2).
fn cgroup_mounts() -> Vec<PathBuf> {
    fs::read_to_string("/proc/mounts")
        .expect("/proc/mounts is readable")
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            match fields.as_slice() {
                [_, dir, "cgroup" | "cgroup2", ..] => Some(PathBuf::from(dir)),
                _ => None,
            }
        })
        .collect()
}

/// The mount point of the v1 hierarchy holding `controller`.
fn v1_mount(controller: &str) -> PathBuf {
    fs::read_to_string("/proc/mounts")
        .expect("/proc/mounts is readable")
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            match fields.as_slice() {
                [_, dir, "cgroup", options, ..] if options.split(',').any(|o| o == controller) => {
                    Some(PathBuf::from(dir))
                }
                _ => None,
            }
        })
        .unwrap_or_else(|| panic!("the cgroup v1 controller {controller} is not mounted"))
}

/// The files the dynamic loader maps for `binary`: its ELF interpreter and
/// every shared library, as absolute host paths (none for a static binary).
fn runtime_files(binary: &Path) -> Vec<PathBuf> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .unwrap_or_else(|e| panic!("cannot run ldd {}: {e}", binary.display()));
    if !out.status.success() {
        // "not a dynamic executable": nothing to copy.
        return Vec::new();
    }
    // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)`,
    // `/lib64/ld-linux-x86-64.so.2 (0x...)`, `linux-vdso.so.1 (0x...)`.
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let file = match line.split_once("=>") {
                Some((_, resolved)) => resolved.split_whitespace().next(),
                None => line.split_whitespace().next(),
            }?;
            file.starts_with('/').then(|| PathBuf::from(file))
        })
        .collect()
}

/// How one jailer run ended and what it (and the ember it became) printed.
struct Run {
    pid: u32,
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl fmt::Display for Run {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "jailed ember (pid {}) {}", self.pid, self.status)?;
        writeln!(f, "--- stdout ---\n{}", self.stdout)?;
        write!(f, "--- stderr ---\n{}", self.stderr)
    }
}

fn read_to_end(mut pipe: impl Read + Send + 'static) -> JoinHandle<String> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = pipe.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// Waits for `child` up to [`TIMEOUT`], killing its process group after it.
fn wait(mut child: Child) -> Run {
    let pid = child.id();
    let stdout = read_to_end(child.stdout.take().expect("piped stdout"));
    let stderr = read_to_end(child.stderr.take().expect("piped stderr"));
    let deadline = Instant::now() + TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("waitpid on the jailer") {
            break status;
        }
        if Instant::now() >= deadline {
            let pgid = libc::pid_t::try_from(pid).expect("pid fits pid_t");
            // SAFETY: kill(2) has no memory effects; the child is not reaped
            // yet, so its pid (its process group id, see `process_group(0)`)
            // cannot have been reused.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
            let _ = child.wait();
            panic!(
                "jailed ember was still running after {TIMEOUT:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                stdout.join().unwrap_or_default(),
                stderr.join().unwrap_or_default()
            );
        }
        thread::sleep(Duration::from_millis(5));
    };
    Run {
        pid,
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    }
}

/// A fresh chroot base directory under /tmp holding jails for ember. On
/// drop it removes the cgroups its runs created, then the base directory,
/// whether or not the test passed.
struct Jails {
    base: tempfile::TempDir,
    ember: PathBuf,
    /// The exec file's name: the jail's middle directory, the pid file's
    /// stem and the default parent cgroup.
    exec_name: String,
    ids: Vec<String>,
    /// Parent cgroups (`<mount>/<exec name>`) that did not exist before.
    new_parents: Vec<PathBuf>,
}

impl Jails {
    fn new() -> Self {
        let ember = ember_binary();
        let exec_name = ember
            .file_name()
            .and_then(|n| n.to_str())
            .expect("the ember binary has a UTF-8 file name")
            .to_string();
        let new_parents = cgroup_mounts()
            .into_iter()
            .map(|mount| mount.join(&exec_name))
            .filter(|parent| !parent.exists())
            .collect();
        Self {
            base: tempfile::Builder::new()
                .prefix("ember-jailer-e2e-")
                .tempdir_in("/tmp")
                .expect("a fresh directory under /tmp"),
            ember,
            exec_name,
            ids: Vec::new(),
            new_parents,
        }
    }

    /// A new jail id, unique across processes and runs.
    fn new_id(&mut self) -> String {
        static N: AtomicUsize = AtomicUsize::new(0);
        let id = format!(
            "e2e-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        self.ids.push(id.clone());
        id
    }

    /// `<base>/<exec name>/<id>/root`: the jail's `/`.
    fn root(&self, id: &str) -> PathBuf {
        self.base.path().join(&self.exec_name).join(id).join("root")
    }

    /// Creates a jail root holding `config` as `/config.json`, the hello
    /// guest as `/hello.elf`, and ember's interpreter and libraries.
    fn prepare(&mut self, config: &Value) -> String {
        let id = self.new_id();
        let root = self.root(&id);
        fs::create_dir_all(&root).unwrap();
        fs::copy(guest_path("hello"), root.join("hello.elf")).unwrap();
        fs::write(
            root.join("config.json"),
            serde_json::to_string_pretty(config).unwrap(),
        )
        .unwrap();
        for file in runtime_files(&self.ember) {
            let inside = root.join(file.strip_prefix("/").expect("an absolute path"));
            fs::create_dir_all(inside.parent().expect("a file has a parent")).unwrap();
            // fs::copy follows symlinks (/lib64/ld-linux-x86-64.so.2 is one):
            // the jail gets the file at the path the loader asks for.
            fs::copy(&file, &inside).unwrap_or_else(|e| {
                panic!(
                    "cannot copy {} to {}: {e}",
                    file.display(),
                    inside.display()
                )
            });
        }
        id
    }

    /// Runs `ember-jailer` for jail `id` with `jailer_args` before `--` and
    /// `--no-api --config-file /config.json` plus `ember_args` after.
    fn run(&self, id: &str, jailer_args: &[&str], ember_args: &[&str]) -> Run {
        let mut cmd = Command::new(jailer_binary());
        cmd.args(["--id", id])
            .arg("--exec-file")
            .arg(&self.ember)
            .args(["--uid", &UID.to_string(), "--gid", &GID.to_string()])
            .arg("--chroot-base-dir")
            .arg(self.base.path())
            .args(jailer_args)
            .args(["--", "--no-api", "--config-file", "/config.json"])
            .args(ember_args)
            // Its own process group, so a timeout kills whatever it started.
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        wait(child)
    }

    /// `<mount>/<exec name>/<id>`: the jail's cgroup in hierarchy `mount`.
    fn cgroup(&self, mount: &Path, id: &str) -> PathBuf {
        mount.join(&self.exec_name).join(id)
    }
}

impl Drop for Jails {
    fn drop(&mut self) {
        for mount in cgroup_mounts() {
            for id in &self.ids {
                let _ = fs::remove_dir(self.cgroup(&mount, id));
            }
        }
        // Only parents this test created, and only if nothing else is in them.
        for parent in &self.new_parents {
            let _ = fs::remove_dir(parent);
        }
        // `base` (a TempDir) is removed after this, with the device nodes
        // the jailer made in each root.
    }
}

fn read_trimmed(path: &Path) -> String {
    fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
        .trim()
        .to_string()
}

/// The `hello` config with the kernel named by its path inside the jail.
fn jailed_hello_config() -> Value {
    default_config(Path::new("/hello.elf"))
}

#[test]
fn jailed_ember_boots_hello_as_the_jail_user_inside_its_cgroup() {
    let _serial = serialize();
    let mut jails = Jails::new();
    let id = jails.prepare(&jailed_hello_config());
    let root = jails.root(&id);

    let run = jails.run(
        &id,
        &["--cgroup-version", "1", "--cgroup", "pids.max=64"],
        &["--log-path", "/ember.log"],
    );

    assert!(run.status.success(), "{run}");
    assert_eq!(
        run.stdout.lines().filter(|l| *l == GREETING).count(),
        1,
        "{run}"
    );

    // The jailer copied the exec file into the jail and ran that copy.
    let copied = fs::metadata(root.join(&jails.exec_name)).unwrap();
    assert_eq!(copied.len(), fs::metadata(&jails.ember).unwrap().len());

    // The log path `/ember.log` landed in the jail root: ember's `/` was
    // the chroot. Ember created the file, so its owner is ember's uid and
    // gid: the jailer dropped root before exec.
    let log_path = root.join("ember.log");
    let log = fs::read_to_string(&log_path)
        .unwrap_or_else(|e| panic!("no log at {}: {e}\n{run}", log_path.display()));
    let meta = fs::metadata(&log_path).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid()),
        (UID, GID),
        "owner of {}",
        log_path.display()
    );
    // The jailer passed `--id` on to ember, whose log lines carry it.
    assert!(
        log.contains(&format!("[{id}:main] Running Ember")),
        "the log lacks the jail id {id}:\n{log}"
    );

    // Without --new-pid-ns the jailer writes its own pid, then execs ember
    // in the same process: the pid we started.
    let pid_file = root.join(format!("{}.pid", jails.exec_name));
    assert_eq!(read_trimmed(&pid_file), run.pid.to_string());

    // The cgroup is `<pids mount>/<exec name>/<id>`, the Firecracker
    // default layout, with the value asked for.
    let cgroup = jails.cgroup(&v1_mount("pids"), &id);
    assert_eq!(read_trimmed(&cgroup.join("pids.max")), "64");
    // High-water mark of the cgroup's tasks: ember's main thread and its
    // vCPU thread ran inside it (the process has exited by now, so `tasks`
    // is empty again).
    let peak = cgroup.join("pids.peak");
    if peak.exists() {
        let peak: u32 = read_trimmed(&peak).parse().unwrap();
        assert!(
            peak >= 2,
            "pids.peak {peak}: ember's threads were elsewhere"
        );
    }
}

#[test]
fn the_cgroup_pid_limit_binds_the_jailed_ember() {
    let _serial = serialize();
    let mut jails = Jails::new();
    let id = jails.prepare(&jailed_hello_config());

    // One task: the jailer-turned-ember itself. Its vCPU thread is a second.
    let run = jails.run(
        &id,
        &["--cgroup-version", "1", "--cgroup", "pids.max=1"],
        &[],
    );

    assert_eq!(run.status.code(), Some(1), "{run}");
    // The vCPU thread cannot be created: clone(2) fails with EAGAIN.
    assert!(
        run.stderr
            .contains("Resource temporarily unavailable (os error 11)"),
        "{run}"
    );
    assert!(!run.stdout.contains(GREETING), "{run}");
    let events = read_trimmed(&jails.cgroup(&v1_mount("pids"), &id).join("pids.events"));
    assert_ne!(events, "max 0", "the pids limit was never hit");
}

#[test]
fn jailed_ember_cannot_reach_host_paths_outside_the_chroot() {
    let _serial = serialize();
    let mut jails = Jails::new();
    let host_kernel = guest_path("hello");
    assert!(host_kernel.is_file(), "{}", host_kernel.display());
    // The kernel named by its host path: fine outside the jail, absent inside.
    let id = jails.prepare(&default_config(&host_kernel));
    assert!(!jails
        .root(&id)
        .join(host_kernel.strip_prefix("/").unwrap())
        .exists());

    let run = jails.run(&id, &[], &[]);

    assert_eq!(run.status.code(), Some(BAD_CONFIGURATION), "{run}");
    let want = format!(
        "cannot open kernel image {}: No such file or directory",
        host_kernel.display()
    );
    assert!(run.stderr.contains(&want), "expected {want:?}\n{run}");
    assert!(!run.stdout.contains(GREETING), "{run}");
}

#[test]
fn jailed_ember_has_no_root_privileges() {
    let _serial = serialize();
    let mut jails = Jails::new();
    let id = jails.prepare(&jailed_hello_config());
    // Readable by root only: root would read it anyway (CAP_DAC_OVERRIDE),
    // uid 12345 must not.
    let kernel = jails.root(&id).join("hello.elf");
    fs::set_permissions(&kernel, fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(fs::metadata(&kernel).unwrap().uid(), 0);

    let run = jails.run(&id, &[], &[]);

    assert_eq!(run.status.code(), Some(BAD_CONFIGURATION), "{run}");
    assert!(
        run.stderr
            .contains("cannot open kernel image /hello.elf: Permission denied"),
        "{run}"
    );
}
