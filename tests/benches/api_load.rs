//! The API under load beside a busy vCPU: does serving many API clients
//! slow the guest's exits, and is any request lost?
//!
//! The storm guest makes `API_LOAD_EXITS` port-I/O exits (default 200,000)
//! while `API_LOAD_CLIENTS` clients (default 100) poll the API, each
//! sending `GET /` then `GET /vm/config` on a new connection every
//! `API_LOAD_INTERVAL_MS` (default 100 ms), as monitoring agents do. The
//! per-exit cost is (time to "storm done N" minus time to "storm done 0")
//! / N, timed from the `InstanceStart` request, median of 3 pairs of runs,
//! with and without the clients. Every request must be answered `200`;
//! requests refused with `503` (the VMM's connection cap) and requests that
//! got no answer are counted apart. With `FIRECRACKER_BIN`, Firecracker
//! runs the same in the same run.
//!
//! `cargo bench -p ember-tests --bench api_load`

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use ember_tests::api::Client;
use ember_tests::{ember_binary, guest_path, median};
use serde_json::json;

const RUNS: usize = 3;
const TIMEOUT: Duration = Duration::from_secs(120);

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Requests answered, refused with 503, and lost (no answer or another
/// status), over all clients.
#[derive(Default)]
struct Tally {
    answered: AtomicU64,
    refused: AtomicU64,
    lost: AtomicU64,
}

/// Sets the flag when dropped: on the way out of a scope, even unwinding.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

struct Vmm {
    child: Child,
    out: PathBuf,
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(binary: &Path, dir: &Path, socket: &Path) -> Vmm {
    let out = dir.join("stdout");
    let _ = fs::remove_file(socket);
    let child = Command::new(binary)
        .process_group(0)
        .arg("--api-sock")
        .arg(socket)
        // Firecracker logs every request to stdout, where its lines would
        // cut the guest's: errors only.
        .args(["--level", "Error"])
        .stdin(Stdio::null())
        .stdout(fs::File::create(&out).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", binary.display()));
    let start = Instant::now();
    while Client::connect(socket).is_err() {
        assert!(start.elapsed() < TIMEOUT, "{}: no API", binary.display());
        thread::sleep(Duration::from_micros(200));
    }
    Vmm { child, out }
}

fn poll_once(socket: &Path, tally: &Tally, stop: &AtomicBool) {
    for path in ["/", "/vm/config"] {
        let status = Client::connect(socket)
            .and_then(|mut c| c.get(path))
            .map(|r| r.status);
        // Requests still in flight when the guest ended are not counted:
        // the VMM exits with the guest.
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let counter = match status {
            Ok(200) => &tally.answered,
            Ok(503) => &tally.refused,
            // The guest ends the VMM when it is done, a moment before the
            // clients are told to stop: a request that failed because the
            // VMM was gone is not lost.
            _ if Client::connect(socket).is_err() => return,
            _ => &tally.lost,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// One storm run of `exits` exits with `clients` pollers; the time from
/// `InstanceStart` to the guest's last line.
fn storm(binary: &Path, exits: u64, clients: u64, interval: Duration, tally: &Tally) -> Duration {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("api.sock");
    let vmm = spawn(binary, dir.path(), &socket);
    let mut api = Client::connect(&socket).unwrap();
    for (path, body) in [
        (
            "/boot-source",
            json!({"kernel_image_path": guest_path("storm"), "boot_args": format!("console=ttyS0 storm.count={exits}")}),
        ),
        (
            "/machine-config",
            json!({"vcpu_count": 1, "mem_size_mib": 128}),
        ),
    ] {
        assert_eq!(api.put(path, &body).unwrap().status, 204, "{path}");
    }
    let stop = AtomicBool::new(false);
    let done = format!("storm done {exits}");
    thread::scope(|s| {
        for _ in 0..clients {
            s.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    poll_once(&socket, tally, &stop);
                    thread::sleep(interval);
                }
            });
        }
        // The clients stop however this ends, a failed assertion included.
        let _stop = StopOnDrop(&stop);
        let start = Instant::now();
        // A new connection: a VMM at its connection cap may have closed the
        // idle set-up one (Ember closes the longest-idle connection) or
        // refuse a new one for a moment (503).
        loop {
            let r = Client::connect(&socket)
                .and_then(|mut c| c.put("/actions", &json!({"action_type": "InstanceStart"})));
            match r {
                Ok(r) if r.status == 204 => break,
                Ok(r) if r.status != 503 => panic!("InstanceStart: {r:?}"),
                _ => assert!(start.elapsed() < TIMEOUT, "InstanceStart never answered"),
            }
        }
        loop {
            if fs::read_to_string(&vmm.out).is_ok_and(|o| o.contains(&done)) {
                break;
            }
            assert!(start.elapsed() < TIMEOUT, "no `{done}`");
            thread::sleep(Duration::from_micros(500));
        }
        start.elapsed()
    })
}

/// Median per-exit cost, us, with `clients` pollers.
fn per_exit_us(binary: &Path, exits: u64, clients: u64, interval: Duration, tally: &Tally) -> f64 {
    median(
        (0..RUNS)
            .map(|_| {
                let base = storm(binary, 0, clients, interval, tally);
                let full = storm(binary, exits, clients, interval, tally);
                full.saturating_sub(base).as_secs_f64() * 1e6 / exits as f64
            })
            .collect(),
    )
}

fn main() {
    let exits = env("API_LOAD_EXITS", 200_000);
    let clients = env("API_LOAD_CLIENTS", 100);
    let interval = Duration::from_millis(env("API_LOAD_INTERVAL_MS", 100));
    let mut vmms = vec![("ember".to_string(), ember_binary())];
    match std::env::var_os("FIRECRACKER_BIN").map(PathBuf::from) {
        Some(fc) => vmms.push(("firecracker".to_string(), fc)),
        None => println!("FIRECRACKER_BIN is not set: Ember's figures only"),
    }
    println!(
        "storm guest, {exits} exits; {clients} clients, GET / and GET /vm/config every {interval:?}; medians of {RUNS}"
    );
    println!(
        "{:<12} {:>12} {:>12} {:>8} {:>10} {:>8} {:>6}",
        "vmm", "idle us", "loaded us", "ratio", "answered", "503", "lost"
    );
    for (name, binary) in vmms {
        let idle = per_exit_us(&binary, exits, 0, interval, &Tally::default());
        let tally = Tally::default();
        let loaded = per_exit_us(&binary, exits, clients, interval, &tally);
        println!(
            "{:<12} {:>12.2} {:>12.2} {:>8.3} {:>10} {:>8} {:>6}",
            name,
            idle,
            loaded,
            loaded / idle,
            tally.answered.load(Ordering::Relaxed),
            tally.refused.load(Ordering::Relaxed),
            tally.lost.load(Ordering::Relaxed)
        );
    }
}
