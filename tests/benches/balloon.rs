//! Balloon benchmark of the release `ember` binary and, when
//! `FIRECRACKER_BIN` names one, of Firecracker beside it, in one run on the
//! same guest.
//!
//! The guest is `virtio_balloon` (1 vCPU, [`GUEST_MIB`] MiB), which
//! touches [`TOUCH_MIB`] MiB and then follows the balloon's target: the
//! most a test guest can touch below the 1 GiB its page tables map. For
//! each VMM, [`RUNS`] times in a fresh process: boot it through the API
//! with a balloon of target 0, wait until the guest has touched its memory,
//! read the process's VmRSS, `PATCH /balloon` to [`TOUCH_MIB`], and time
//! from sending the request to the guest's `balloon: inflated` line (every
//! page given to the balloon and acknowledged by the VMM, which releases
//! it before acknowledging); read VmRSS again. Medians.
//!
//! Run with `FIRECRACKER_BIN=/path/to/firecracker cargo bench -p ember-tests
//! --bench balloon`.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use ember_tests::api::Client;
use ember_tests::{ember_binary, guest_path, median};
use serde_json::{json, Value};

const RUNS: usize = 5;
const GUEST_MIB: u64 = 1152;
const TOUCH_MIB: u64 = 960;
const TIMEOUT: Duration = Duration::from_secs(120);

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

    fn wait_for(&self, needle: &[u8]) {
        let start = Instant::now();
        loop {
            {
                let out = self.out.lock().unwrap();
                if out.windows(needle.len()).any(|w| w == needle) {
                    return;
                }
            }
            assert!(
                start.elapsed() < TIMEOUT,
                "{:?} never printed; got:\n{}",
                String::from_utf8_lossy(needle),
                String::from_utf8_lossy(&self.out.lock().unwrap())
            );
            thread::sleep(Duration::from_micros(100));
        }
    }

    fn rss_kib(&self) -> u64 {
        let text = fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
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

fn put(api: &mut Client, path: &str, body: Value) {
    let r = api.put(path, &body).unwrap();
    assert!(r.status == 204, "PUT {path}: {r:?}");
}

/// One run: (release time in ms, VmRSS before and after in MiB).
fn run(binary: &Path, dir: &Path) -> (f64, f64, f64) {
    let vmm = Vmm::spawn(binary, dir.join("api.sock"));
    let mut api = vmm.api();
    put(
        &mut api,
        "/boot-source",
        json!({"kernel_image_path": guest_path("virtio_balloon"),
               "boot_args": format!("console=ttyS0 reboot=k panic=1 balloon.touch={TOUCH_MIB}")}),
    );
    put(
        &mut api,
        "/machine-config",
        json!({"vcpu_count": 1, "mem_size_mib": GUEST_MIB}),
    );
    put(
        &mut api,
        "/balloon",
        json!({"amount_mib": 0, "deflate_on_oom": false}),
    );
    put(
        &mut api,
        "/actions",
        json!({"action_type": "InstanceStart"}),
    );
    vmm.wait_for(format!("balloon: touched {TOUCH_MIB} MiB").as_bytes());
    let before = vmm.rss_kib();
    let start = Instant::now();
    let r = api
        .patch("/balloon", &json!({"amount_mib": TOUCH_MIB}))
        .unwrap();
    assert!(r.status == 204, "PATCH /balloon: {r:?}");
    vmm.wait_for(format!("balloon: inflated {}", TOUCH_MIB * 256).as_bytes());
    let took = start.elapsed();
    let after = vmm.rss_kib();
    (
        took.as_secs_f64() * 1e3,
        before as f64 / 1024.0,
        after as f64 / 1024.0,
    )
}

fn bench(name: &str, binary: &Path) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let (mut times, mut befores, mut afters) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..RUNS {
        let (t, b, a) = run(binary, dir.path());
        times.push(t);
        befores.push(b);
        afters.push(a);
    }
    let t = median(times.clone());
    println!(
        "{name:<12} release {TOUCH_MIB} MiB: {t:8.1} ms median ({:.0} MiB/s; runs {:?} ms), VmRSS {:.0} MiB -> {:.0} MiB",
        TOUCH_MIB as f64 / (t / 1e3),
        times.iter().map(|t| t.round() as u64).collect::<Vec<_>>(),
        median(befores),
        median(afters),
    );
    t
}

fn main() {
    // `cargo bench` passes `--bench`; nothing to parse.
    let ember = bench("ember", &ember_binary());
    match std::env::var_os("FIRECRACKER_BIN").map(PathBuf::from) {
        Some(fc) => {
            let firecracker = bench("firecracker", &fc);
            println!("ember/firecracker release time: {:.2}", ember / firecracker);
        }
        None => println!("FIRECRACKER_BIN is not set: Ember's figures only"),
    }
}
