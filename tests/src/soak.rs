//! VM lifecycles in bulk, and what they leave behind on the host: the soak
//! test (`tests/tests/soak.rs`, a short run) and benchmark
//! (`tests/benches/soak.rs`, thousands of runs, beside Firecracker).
//!
//! One lifecycle is what an orchestrator does to a VM: start the VMM, set
//! it up through the API (a drive, a network interface over a TAP the VMM
//! creates, a vsock device), `InstanceStart`, pause, resume, Ctrl+Alt+Del,
//! and wait for the VMM to exit by itself when the guest resets. The
//! lifecycles run `parallel` at a time from one process; before and after,
//! [`HostCounts`] takes what a leak would grow: the file descriptors,
//! threads and child processes of this process, the TAPs and bound Unix
//! sockets the VMs had, and memory.

use std::fs;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::api::Client;

/// How long one step of a lifecycle may take before it counts as failed.
const STEP_TIMEOUT: Duration = Duration::from_secs(20);
/// What the guest prints once it waits for Ctrl+Alt+Del.
const READY: &str = "ctrl_alt_del: waiting";

/// A soak run: which VMM, how many lifecycles, how many at a time.
#[derive(Debug, Clone)]
pub struct Soak {
    /// The VMM binary (Ember's or Firecracker's: same flags, same API).
    pub binary: PathBuf,
    /// Lifecycles in all.
    pub lifecycles: usize,
    /// Lifecycles running at once.
    pub parallel: usize,
    /// Give each VM a network interface over a TAP of its own, which the
    /// VMM creates (needs `CAP_NET_ADMIN`).
    pub with_tap: bool,
    /// The guest: one that resets on Ctrl+Alt+Del (`ctrl_alt_del`).
    pub kernel: PathBuf,
}

/// What a leak would grow, taken from this process and the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostCounts {
    /// Open file descriptors of this process.
    pub fds: usize,
    /// Threads of this process.
    pub threads: usize,
    /// Processes whose parent is this process (live or not yet reaped).
    pub children: usize,
    /// Network interfaces named as this run names its TAPs.
    pub taps: usize,
    /// Bound Unix sockets under this run's directory.
    pub unix_sockets: usize,
    /// Resident memory of this process, KiB.
    pub rss_kib: u64,
    /// The host's `MemAvailable`, KiB (the whole host: other work moves it).
    pub mem_available_kib: u64,
}

impl HostCounts {
    /// Whether everything but memory (which other work on the host moves)
    /// is as in `before`.
    pub fn leaked_nothing_since(&self, before: &HostCounts) -> bool {
        (
            self.fds,
            self.threads,
            self.children,
            self.taps,
            self.unix_sockets,
        ) == (
            before.fds,
            before.threads,
            before.children,
            before.taps,
            before.unix_sockets,
        )
    }
}

/// What a soak run did and left behind.
#[derive(Debug, Clone)]
pub struct SoakReport {
    /// Lifecycles that ran to a clean exit.
    pub completed: usize,
    /// One line per failed lifecycle.
    pub failures: Vec<String>,
    /// Wall time of the whole run.
    pub wall: Duration,
    /// Each completed lifecycle's duration, ms, sorted.
    pub lifecycle_ms: Vec<f64>,
    /// Counts before the first VMM started.
    pub before: HostCounts,
    /// Counts after the last VMM exited.
    pub after: HostCounts,
}

impl SoakReport {
    /// Lifecycles per second over the whole run.
    pub fn per_second(&self) -> f64 {
        self.completed as f64 / self.wall.as_secs_f64().max(1e-9)
    }

    /// The `p`-th percentile (0 to 100) of the lifecycle durations, ms.
    pub fn percentile_ms(&self, p: f64) -> f64 {
        if self.lifecycle_ms.is_empty() {
            return 0.0;
        }
        let last = self.lifecycle_ms.len() - 1;
        let at = ((p / 100.0) * last as f64).round() as usize;
        self.lifecycle_ms[at.min(last)]
    }
}

fn count_dir(path: &str) -> usize {
    fs::read_dir(path).map(|d| d.count()).unwrap_or(0)
}

fn status_kib(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Processes whose parent is `pid`.
fn children_of(pid: u32) -> usize {
    let Ok(dir) = fs::read_dir("/proc") else {
        return 0;
    };
    dir.filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|e| fs::read_to_string(e.path().join("stat")).ok())
        .filter(|stat| {
            // "pid (comm) state ppid ...": comm may hold spaces and parens.
            stat.rfind(')')
                .and_then(|i| stat[i + 1..].split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok())
                == Some(pid)
        })
        .count()
}

/// Takes the counts for a run whose TAP names start with `tap_prefix` and
/// whose files are under `dir`.
pub fn host_counts(tap_prefix: &str, dir: &Path) -> HostCounts {
    let taps = fs::read_dir("/sys/class/net")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().starts_with(tap_prefix))
                .count()
        })
        .unwrap_or(0);
    let dir = dir.to_string_lossy();
    let unix_sockets = fs::read_to_string("/proc/net/unix")
        .map(|t| t.lines().filter(|l| l.contains(dir.as_ref())).count())
        .unwrap_or(0);
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    HostCounts {
        fds: count_dir("/proc/self/fd"),
        threads: count_dir("/proc/self/task"),
        children: children_of(std::process::id()),
        taps,
        unix_sockets,
        rss_kib: status_kib(&status, "VmRSS:"),
        mem_available_kib: status_kib(&meminfo, "MemAvailable:"),
    }
}

/// A VMM process of one lifecycle, killed with its process group if the
/// lifecycle fails.
struct Vmm {
    child: Child,
    dir: PathBuf,
}

impl Vmm {
    fn output(&self) -> String {
        fs::read_to_string(self.dir.join("stdout")).unwrap_or_default()
    }

    fn stderr(&self) -> String {
        fs::read_to_string(self.dir.join("stderr")).unwrap_or_default()
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            if let Ok(pgid) = libc::pid_t::try_from(self.child.id()) {
                // SAFETY: kill(2) has no memory effects; the child is not
                // reaped, so its pid (its process group id) is still ours.
                unsafe { libc::kill(-pgid, libc::SIGKILL) };
            }
            let _ = self.child.wait();
        }
    }
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) -> Result<(), String> {
    let deadline = Instant::now() + STEP_TIMEOUT;
    while !done() {
        if Instant::now() >= deadline {
            return Err(format!("timed out waiting for {what}"));
        }
        thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

fn expect_204(api: &mut Client, method: &str, path: &str, body: Value) -> Result<(), String> {
    let r = api
        .request(method, path, Some(&body.to_string()))
        .map_err(|e| format!("{method} {path}: {e}"))?;
    if r.status != 204 {
        return Err(format!("{method} {path}: {} {}", r.status, r.body));
    }
    Ok(())
}

/// One lifecycle in `dir`, which it leaves empty of sockets; its duration.
fn lifecycle(soak: &Soak, dir: &Path, tap: &str, i: usize) -> Result<Duration, String> {
    let start = Instant::now();
    fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let socket = dir.join("api.sock");
    let file = |name: &str| fs::File::create(dir.join(name)).map_err(|e| e.to_string());
    let child = Command::new(&soak.binary)
        .process_group(0)
        .arg("--api-sock")
        .arg(&socket)
        .args(["--id", &format!("soak{i}")])
        // Firecracker logs to stdout by default, where its lines would cut
        // the guest's console lines: errors only.
        .args(["--level", "Error"])
        .stdin(Stdio::null())
        .stdout(file("stdout")?)
        .stderr(file("stderr")?)
        .spawn()
        .map_err(|e| format!("spawn {}: {e}", soak.binary.display()))?;
    let mut vmm = Vmm {
        child,
        dir: dir.to_path_buf(),
    };
    let result = drive(soak, &mut vmm, &socket, tap);
    let result = result.map_err(|e| {
        format!(
            "lifecycle {i}: {e}\n--- guest ---\n{}\n--- stderr ---\n{}",
            vmm.output(),
            vmm.stderr()
        )
    });
    drop(vmm);
    result?;
    Ok(start.elapsed())
}

fn drive(soak: &Soak, vmm: &mut Vmm, socket: &Path, tap: &str) -> Result<(), String> {
    wait_until("the API socket", || Client::connect(socket).is_ok())?;
    let mut api = Client::connect(socket).map_err(|e| e.to_string())?;
    let disk = vmm.dir.join("disk.img");
    fs::File::create(&disk)
        .and_then(|f| f.set_len(1 << 20))
        .map_err(|e| e.to_string())?;
    expect_204(
        &mut api,
        "PUT",
        "/boot-source",
        json!({"kernel_image_path": soak.kernel, "boot_args": "console=ttyS0"}),
    )?;
    expect_204(
        &mut api,
        "PUT",
        "/machine-config",
        json!({"vcpu_count": 1, "mem_size_mib": 32}),
    )?;
    expect_204(
        &mut api,
        "PUT",
        "/drives/data",
        json!({"drive_id": "data", "path_on_host": disk, "is_root_device": false, "is_read_only": false}),
    )?;
    if soak.with_tap {
        expect_204(
            &mut api,
            "PUT",
            "/network-interfaces/eth0",
            json!({"iface_id": "eth0", "host_dev_name": tap}),
        )?;
    }
    expect_204(
        &mut api,
        "PUT",
        "/vsock",
        json!({"guest_cid": 3, "uds_path": vmm.dir.join("v.sock")}),
    )?;
    expect_204(
        &mut api,
        "PUT",
        "/actions",
        json!({"action_type": "InstanceStart"}),
    )?;
    wait_until("the guest", || vmm.output().contains(READY))?;
    expect_204(&mut api, "PATCH", "/vm", json!({"state": "Paused"}))?;
    expect_204(&mut api, "PATCH", "/vm", json!({"state": "Resumed"}))?;
    expect_204(
        &mut api,
        "PUT",
        "/actions",
        json!({"action_type": "SendCtrlAltDel"}),
    )?;
    drop(api);
    let mut status = None;
    wait_until("the VMM to exit", || {
        status = vmm.child.try_wait().ok().flatten();
        status.is_some()
    })?;
    match status {
        Some(s) if s.success() => Ok(()),
        s => Err(format!("the VMM ended with {s:?}")),
    }
}

/// Runs `soak.lifecycles` lifecycles, `soak.parallel` at a time, under a
/// fresh directory of `std::env::temp_dir()`, and takes the counts around
/// them (after a short settle, as a process's last exit is reaped).
///
/// # Errors
///
/// The run's directory cannot be created.
pub fn run(soak: &Soak) -> io::Result<SoakReport> {
    let pid = std::process::id();
    let root = std::env::temp_dir().join(format!("ember-soak-{pid}"));
    let _ = fs::remove_dir_all(&root);
    fs::create_dir_all(&root)?;
    // "eks" + pid + "x" + index: at most 15 bytes, IFNAMSIZ's limit.
    let tap_prefix = format!("eks{}x", pid % 100_000);
    let before = host_counts(&tap_prefix, &root);
    let next = AtomicUsize::new(0);
    let results = Mutex::new((Vec::new(), Vec::new()));
    let start = Instant::now();
    thread::scope(|s| {
        for _ in 0..soak.parallel.max(1) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= soak.lifecycles {
                    return;
                }
                let dir = root.join(format!("vm{i}"));
                let tap = format!("{tap_prefix}{i}");
                let r = lifecycle(soak, &dir, &tap, i);
                let _ = fs::remove_dir_all(&dir);
                let mut results = results.lock().unwrap_or_else(|e| e.into_inner());
                match r {
                    Ok(d) => results.0.push(d.as_secs_f64() * 1e3),
                    Err(e) => results.1.push(e),
                }
            });
        }
    });
    let wall = start.elapsed();
    let mut after = host_counts(&tap_prefix, &root);
    let settle = Instant::now() + Duration::from_secs(2);
    while !after.leaked_nothing_since(&before) && Instant::now() < settle {
        thread::sleep(Duration::from_millis(20));
        after = host_counts(&tap_prefix, &root);
    }
    let _ = fs::remove_dir_all(&root);
    let (mut lifecycle_ms, failures) = results.into_inner().unwrap_or_else(|e| e.into_inner());
    lifecycle_ms.sort_by(f64::total_cmp);
    Ok(SoakReport {
        completed: lifecycle_ms.len(),
        failures,
        wall,
        lifecycle_ms,
        before,
        after,
    })
}

/// Whether this process may create TAPs (it runs as root).
pub fn can_create_taps() -> bool {
    // SAFETY: geteuid(2) cannot fail and has no memory effects.
    unsafe { libc::geteuid() == 0 }
}
