//! Snapshot benchmark of the release `ember` binary and, when
//! `FIRECRACKER_BIN` names one, of Firecracker beside it, in one run on the
//! same guest.
//!
//! The guest is the counter guest (1 vCPU, 128 MiB, `console=ttyS0`), which
//! prints `count N` lines as fast as it can. For each VMM:
//!
//! 1. Create: boot it through the API, let it count to 20, pause,
//!    `PUT /snapshot/create` Full; the time of that request, and the size of
//!    the state and memory files (apparent and allocated).
//! 2. Restore latency: [`RUNS`] times, a fresh process,
//!    `PUT /snapshot/load` with the File backend and `resume_vm`, from
//!    sending the request to the first `count` byte on the console (the
//!    guest running again), and to the `204`. Medians.
//! 3. Clones: `SNAPSHOT_CLONES` (default 20) processes, already started,
//!    load the same files at once, paused: wall time until every load is
//!    answered, and restores per second; then all are resumed and, once
//!    each prints, the host memory each costs (Pss from
//!    `/proc/<pid>/smaps_rollup`, which splits the shared page cache of the
//!    memory file between its users), median over the clones.
//!
//! Run with `FIRECRACKER_BIN=/path/to/firecracker cargo bench -p ember-tests
//! --bench snapshot`.

use std::fs;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use ember_tests::api::Client;
use ember_tests::{ember_binary, guest_path, median};
use serde_json::{json, Value};

const RUNS: usize = 20;
const GUEST_MIB: u64 = 128;
const TIMEOUT: Duration = Duration::from_secs(30);

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// A VMM process with its API socket and a thread collecting its stdout.
struct Vmm {
    child: Child,
    socket: PathBuf,
    out: Arc<Mutex<Vec<u8>>>,
    reader: Option<JoinHandle<()>>,
}

impl Vmm {
    fn spawn(binary: &Path, socket: PathBuf) -> Vmm {
        let _ = fs::remove_file(&socket);
        let mut child = Command::new(binary)
            .arg("--api-sock")
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", binary.display()));
        let mut stdout = child.stdout.take().unwrap();
        let out = Arc::new(Mutex::new(Vec::new()));
        let sink = out.clone();
        let reader = thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        let start = Instant::now();
        while Client::connect(&socket).is_err() {
            assert!(start.elapsed() < TIMEOUT, "{}: no API", binary.display());
            thread::sleep(Duration::from_micros(200));
        }
        Vmm {
            child,
            socket,
            out,
            reader: Some(reader),
        }
    }

    fn api(&self) -> Client {
        Client::connect(&self.socket).unwrap()
    }

    /// Bytes of stdout from `from` on contain `needle`.
    fn printed_since(&self, from: usize, needle: &[u8]) -> bool {
        let out = self.out.lock().unwrap();
        out.get(from..)
            .is_some_and(|s| s.windows(needle.len()).any(|w| w == needle))
    }

    fn out_len(&self) -> usize {
        self.out.lock().unwrap().len()
    }

    fn wait_for(&self, from: usize, needle: &[u8]) {
        let start = Instant::now();
        while !self.printed_since(from, needle) {
            assert!(start.elapsed() < TIMEOUT, "{needle:?} never printed");
            thread::sleep(Duration::from_micros(100));
        }
    }

    fn pss_kib(&self) -> u64 {
        let text = fs::read_to_string(format!("/proc/{}/smaps_rollup", self.child.id())).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix("Pss:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        let _ = fs::remove_file(&self.socket);
    }
}

fn ok(api: &mut Client, method: &str, path: &str, body: Value) {
    let r = api.request(method, path, Some(&body.to_string())).unwrap();
    assert_eq!(r.status, 204, "{method} {path}: {r:?}");
}

fn load_body(dir: &Path) -> Value {
    json!({
        "snapshot_path": dir.join("vm.snap"),
        "mem_backend": {"backend_type": "File", "backend_path": dir.join("vm.mem")},
        "resume_vm": true,
    })
}

struct Figures {
    create_ms: f64,
    state_bytes: u64,
    mem_apparent: u64,
    mem_allocated: u64,
    first_byte_ms: f64,
    answer_ms: f64,
    clones: usize,
    clones_wall_ms: f64,
    pss_kib: f64,
}

fn create(binary: &Path, dir: &Path) -> f64 {
    let vm = Vmm::spawn(binary, dir.join("create.sock"));
    let mut api = vm.api();
    ok(
        &mut api,
        "PUT",
        "/boot-source",
        json!({"kernel_image_path": guest_path("counter"), "boot_args": "console=ttyS0"}),
    );
    ok(
        &mut api,
        "PUT",
        "/machine-config",
        json!({"vcpu_count": 1, "mem_size_mib": GUEST_MIB}),
    );
    ok(
        &mut api,
        "PUT",
        "/actions",
        json!({"action_type": "InstanceStart"}),
    );
    vm.wait_for(0, b"count 20\n");
    ok(&mut api, "PATCH", "/vm", json!({"state": "Paused"}));
    let start = Instant::now();
    ok(
        &mut api,
        "PUT",
        "/snapshot/create",
        json!({"snapshot_type": "Full", "snapshot_path": dir.join("vm.snap"),
               "mem_file_path": dir.join("vm.mem")}),
    );
    ms(start.elapsed())
}

/// One restore: (first console byte, 204), in ms.
fn restore_once(binary: &Path, dir: &Path, i: usize) -> (f64, f64) {
    let vm = Vmm::spawn(binary, dir.join(format!("r{i}.sock")));
    let mut api = vm.api();
    let from = vm.out_len();
    let body = load_body(dir).to_string();
    let start = Instant::now();
    api.send_raw(
        format!(
            "PUT /snapshot/load HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .unwrap();
    let answer = thread::spawn(move || {
        let r = api.read_response().unwrap();
        (r.status, start.elapsed())
    });
    vm.wait_for(from, b"count ");
    let first = start.elapsed();
    let (status, answered) = answer.join().unwrap();
    assert_eq!(status, 204);
    (ms(first), ms(answered))
}

/// `n` processes load the snapshot at once, paused: (wall until every load
/// is answered, median Pss in KiB once all are resumed and printing).
fn clones(binary: &Path, dir: &Path, n: usize) -> (f64, f64) {
    let vms: Vec<Vmm> = (0..n)
        .map(|i| Vmm::spawn(binary, dir.join(format!("c{i}.sock"))))
        .collect();
    let mut body = load_body(dir);
    // Paused, so that the guests already restored do not compete for the
    // CPU with the restores still running.
    body["resume_vm"] = json!(false);
    let start = Instant::now();
    let loaders: Vec<_> = vms
        .iter()
        .map(|vm| {
            let mut api = vm.api();
            let body = body.clone();
            thread::spawn(move || ok(&mut api, "PUT", "/snapshot/load", body))
        })
        .collect();
    for l in loaders {
        l.join().unwrap();
    }
    let wall = ms(start.elapsed());
    for vm in &vms {
        ok(&mut vm.api(), "PATCH", "/vm", json!({"state": "Resumed"}));
    }
    for vm in &vms {
        vm.wait_for(0, b"count ");
    }
    // Let every clone touch what it touches when running.
    thread::sleep(Duration::from_millis(500));
    let pss = median(vms.iter().map(|vm| vm.pss_kib() as f64).collect());
    (wall, pss)
}

fn measure(binary: &Path, clones_n: usize) -> Figures {
    let dir = tempfile::tempdir().unwrap();
    let create_ms = create(binary, dir.path());
    let state = fs::metadata(dir.path().join("vm.snap")).unwrap();
    let mem = fs::metadata(dir.path().join("vm.mem")).unwrap();
    restore_once(binary, dir.path(), usize::MAX); // warm the page cache
    let (firsts, answers): (Vec<f64>, Vec<f64>) = (0..RUNS)
        .map(|i| restore_once(binary, dir.path(), i))
        .unzip();
    let (clones_wall_ms, pss_kib) = clones(binary, dir.path(), clones_n);
    Figures {
        create_ms,
        state_bytes: state.len(),
        mem_apparent: mem.len(),
        mem_allocated: mem.blocks() * 512,
        first_byte_ms: median(firsts),
        answer_ms: median(answers),
        clones: clones_n,
        clones_wall_ms,
        pss_kib,
    }
}

fn main() {
    let clones_n = std::env::var("SNAPSHOT_CLONES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let mut vmms = vec![("ember".to_string(), ember_binary())];
    match std::env::var_os("FIRECRACKER_BIN").map(PathBuf::from) {
        Some(fc) => vmms.push(("firecracker".to_string(), fc)),
        None => println!("FIRECRACKER_BIN is not set: Ember's figures only"),
    }
    let figures: Vec<(String, Figures)> = vmms
        .into_iter()
        .map(|(name, bin)| {
            let f = measure(&bin, clones_n);
            (name, f)
        })
        .collect();
    println!(
        "snapshot of a {GUEST_MIB} MiB, 1-vCPU counter guest; restore medians of {RUNS}; {clones_n} clones"
    );
    println!(
        "{:<12} {:>10} {:>10} {:>12} {:>12} {:>12} {:>12} {:>12} {:>10} {:>10}",
        "vmm",
        "create ms",
        "state B",
        "mem B",
        "mem alloc B",
        "load->byte",
        "load->204",
        "clones ms",
        "clones/s",
        "Pss KiB"
    );
    for (name, f) in &figures {
        println!(
            "{:<12} {:>10.1} {:>10} {:>12} {:>12} {:>12.2} {:>12.2} {:>12.1} {:>10.1} {:>10.0}",
            name,
            f.create_ms,
            f.state_bytes,
            f.mem_apparent,
            f.mem_allocated,
            f.first_byte_ms,
            f.answer_ms,
            f.clones_wall_ms,
            f.clones as f64 / (f.clones_wall_ms / 1e3),
            f.pss_kib
        );
    }
    if let [(_, e), (_, fc)] = &figures[..] {
        println!(
            "ratios ember/firecracker: create {:.2}, load->first byte {:.2}, clone wall {:.2}, Pss {:.2}",
            e.create_ms / fc.create_ms,
            e.first_byte_ms / fc.first_byte_ms,
            e.clones_wall_ms / fc.clones_wall_ms,
            e.pss_kib / fc.pss_kib
        );
    }
}
