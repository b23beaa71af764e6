//! API benchmark of the release `ember` binary.
//!
//! 1. Process start to API ready: spawn `ember --api-sock S`, connect to
//!    `S` every 100 us until a connection is accepted; wall time from
//!    spawn, and the process's CPU time up to that point (it is killed at
//!    once and its `wait4` rusage read: exec, dynamic loading and start-up,
//!    plus the kernel's teardown). Median of 20 runs.
//! 2. `PUT /actions InstanceStart` to the guest's first serial byte (hello
//!    guest, 128 MiB), and to the `204`: median of 20 runs.
//! 3. Memory: a 128 MiB guest (the counter guest) after boot, paused; the
//!    process's resident memory minus what the guest touched of its RAM
//!    (`/proc/<pid>/smaps`: the Rss of the mapping that holds the 128 MiB).
//!
//! Firecracker's published bounds: 8 CPU ms to API ready, 5 MiB of VMM
//! overhead. Run with `cargo bench -p ember-tests --bench api`.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ember_tests::api::ApiVm;
use ember_tests::{ember_binary, guest_path, median};
use serde_json::json;

const RUNS: usize = 20;
const GUEST_MIB: u64 = 128;
const FIRECRACKER_API_READY_CPU_MS: f64 = 8.0;
const FIRECRACKER_OVERHEAD_MIB: f64 = 5.0;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn tv(t: libc::timeval) -> Duration {
    Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000)
}

/// Spawn to accepted connection: (wall, CPU of the process).
// The child is reaped with wait4 (for its rusage), not Child::wait.
#[allow(clippy::zombie_processes)]
fn api_ready_once(dir: &std::path::Path, i: usize) -> (Duration, Duration) {
    let socket = dir.join(format!("bench-{i}.sock"));
    let start = Instant::now();
    let child = Command::new(ember_binary())
        .process_group(0)
        .arg("--api-sock")
        .arg(&socket)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn ember");
    let wall = loop {
        if UnixStream::connect(&socket).is_ok() {
            break start.elapsed();
        }
        assert!(start.elapsed() < Duration::from_secs(10), "API never ready");
        std::thread::sleep(Duration::from_micros(100));
    };
    let pid = libc::pid_t::try_from(child.id()).expect("pid");
    // SAFETY: kill(2) has no memory effects; the child is not reaped.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let mut status = 0;
    // SAFETY: all-zero is a valid rusage.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid out-pointers; `pid` is our unreaped child (Child's own
    // wait is never called).
    let ret = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(ret, pid, "wait4");
    let _ = std::fs::remove_file(&socket);
    (wall, tv(usage.ru_utime) + tv(usage.ru_stime))
}

fn api_ready() -> (f64, f64) {
    let dir = tempfile::tempdir().unwrap();
    api_ready_once(dir.path(), usize::MAX); // warm the page cache
    let (walls, cpus) = (0..RUNS)
        .map(|i| {
            let (w, c) = api_ready_once(dir.path(), i);
            (ms(w), ms(c))
        })
        .unzip();
    (median(walls), median(cpus))
}

/// InstanceStart to (first serial byte, 204), in ms.
fn instance_start_once() -> (f64, f64) {
    let mut vm = ApiVm::spawn::<&str>(&[]).unwrap();
    let mut api = vm.client().unwrap();
    let r = api
        .put(
            "/boot-source",
            &json!({"kernel_image_path": guest_path("hello"), "boot_args": "console=ttyS0"}),
        )
        .unwrap();
    assert_eq!(r.status, 204);
    let r = api
        .put(
            "/machine-config",
            &json!({"vcpu_count": 1, "mem_size_mib": GUEST_MIB}),
        )
        .unwrap();
    assert_eq!(r.status, 204);
    let body = r#"{"action_type": "InstanceStart"}"#;
    let start = Instant::now();
    api.send_raw(
        format!(
            "PUT /actions HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .unwrap();
    // The answer and the first byte race: wait for each on its own thread.
    let answer = std::thread::spawn(move || {
        let r = api.read_response().unwrap();
        (r.status, start.elapsed())
    });
    vm.wait_for_output(|o| !o.is_empty(), Duration::from_secs(10))
        .unwrap();
    let first_byte = start.elapsed();
    let (status, answered) = answer.join().unwrap();
    assert_eq!(status, 204);
    let out = vm.wait(Duration::from_secs(30)).unwrap();
    assert!(out.status.success(), "{}", out.stderr);
    (ms(first_byte), ms(answered))
}

fn instance_start() -> (f64, f64) {
    instance_start_once();
    let (bytes, answers) = (0..RUNS).map(|_| instance_start_once()).unzip();
    (median(bytes), median(answers))
}

/// (total Rss, guest RAM Rss) of `pid` in KiB, from /proc/<pid>/smaps.
fn rss_kib(pid: u32) -> (u64, u64) {
    let mut text = String::new();
    std::fs::File::open(format!("/proc/{pid}/smaps"))
        .and_then(|mut f| f.read_to_string(&mut text))
        .expect("read smaps");
    let field = |line: &str, name: &str| -> Option<u64> {
        line.strip_prefix(name)?
            .trim()
            .strip_suffix("kB")?
            .trim()
            .parse()
            .ok()
    };
    let (mut total, mut guest) = (0, 0);
    let mut size = 0;
    for line in text.lines() {
        if let Some(s) = field(line, "Size:") {
            size = s;
        } else if let Some(rss) = field(line, "Rss:") {
            total += rss;
            // The guest RAM: the mapping of its size. The kernel may have
            // merged it with an adjacent anonymous mapping of the same
            // protection (a malloc arena, 132 KiB): allow 1 MiB more, which
            // can only make the overhead look smaller by that much.
            let guest_kib = GUEST_MIB * 1024;
            if (guest_kib..guest_kib + 1024).contains(&size) {
                guest += rss;
            }
        }
    }
    (total, guest)
}

fn memory() -> (f64, f64, f64) {
    let mut vm = ApiVm::spawn::<&str>(&[]).unwrap();
    let mut api = vm.client().unwrap();
    for (path, body) in [
        (
            "/boot-source",
            json!({"kernel_image_path": guest_path("counter"), "boot_args": "console=ttyS0"}),
        ),
        (
            "/machine-config",
            json!({"vcpu_count": 1, "mem_size_mib": GUEST_MIB}),
        ),
        ("/actions", json!({"action_type": "InstanceStart"})),
    ] {
        assert_eq!(api.put(path, &body).unwrap().status, 204, "{path}");
    }
    vm.wait_for_output(|o| o.contains("count 200\n"), Duration::from_secs(30))
        .unwrap();
    assert_eq!(
        api.patch("/vm", &json!({"state": "Paused"}))
            .unwrap()
            .status,
        204
    );
    let (total, guest) = rss_kib(vm.pid());
    vm.kill();
    let mib = |kib: u64| kib as f64 / 1024.0;
    (mib(total), mib(guest), mib(total - guest))
}

fn main() {
    // Build (or locate) the release binary before timing anything.
    let bin = ember_binary();
    println!("ember: {}", bin.display());

    let (wall, cpu) = api_ready();
    println!(
        "start to API ready (median of {RUNS}): {wall:.2} ms wall, {cpu:.2} ms CPU \
         (Firecracker bound: {FIRECRACKER_API_READY_CPU_MS} CPU ms)"
    );

    let (first_byte, answered) = instance_start();
    println!(
        "InstanceStart to first serial byte (median of {RUNS}): {first_byte:.2} ms; \
         to the 204: {answered:.2} ms"
    );

    let (total, guest, overhead) = memory();
    println!(
        "memory with a {GUEST_MIB} MiB guest after boot: {total:.2} MiB resident, \
         {guest:.2} MiB of it guest RAM touched, VMM overhead {overhead:.2} MiB \
         (Firecracker bound: {FIRECRACKER_OVERHEAD_MIB} MiB)"
    );
}
