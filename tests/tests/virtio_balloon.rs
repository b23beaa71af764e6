//! virtio-balloon end to end: the `virtio_balloon` guest touches some of
//! its memory, then follows the target the host sets (`PUT /balloon`, the
//! `balloon` config section, `PATCH /balloon`), inflating and deflating as
//! Linux's virtio_balloon driver does, and reports statistics. The tests
//! check the host side: the ember process's resident memory falls by what
//! the guest gave back, `GET /balloon/statistics` returns the guest's
//! numbers, and a deflated page comes back to the guest as a zero page.

use std::time::{Duration, Instant};

use ember_tests::api::{ApiVm, Client};
use ember_tests::{guest_path, run_guest};
use serde_json::{json, Value};

const TOUCH_MIB: u64 = 64;
const WAIT: Duration = Duration::from_secs(60);

/// Resident memory of process `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in\n{status}"))
}

fn put(api: &mut Client, path: &str, body: Value) {
    let r = api.put(path, &body).unwrap();
    assert_eq!(r.status, 204, "PUT {path}: {r:?}");
}

fn patch(api: &mut Client, path: &str, body: Value) -> ember_tests::api::Response {
    api.patch(path, &body).unwrap()
}

fn line(vm: &mut ApiVm, want: &str) -> String {
    vm.wait_for_output(|out| out.lines().any(|l| l == want), WAIT)
        .unwrap_or_else(|e| panic!("waiting for {want:?}: {e}"))
}

/// Polls `GET /balloon/statistics` until `pred` holds.
fn stats_until(api: &mut Client, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = api.get("/balloon/statistics").unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        let s = r.json();
        if pred(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "statistics never showed {what}: {s}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn inflate_returns_memory_to_the_host_and_deflate_gives_it_back() {
    let mut vm = ApiVm::spawn(&["--id", "balloon-e2e"]).unwrap();
    let mut api = vm.client().unwrap();
    put(
        &mut api,
        "/boot-source",
        json!({"kernel_image_path": guest_path("virtio_balloon"),
               "boot_args": format!("console=ttyS0 balloon.touch={TOUCH_MIB}")}),
    );
    put(
        &mut api,
        "/machine-config",
        json!({"vcpu_count": 1, "mem_size_mib": 256}),
    );
    put(
        &mut api,
        "/balloon",
        json!({"amount_mib": 0, "deflate_on_oom": true, "stats_polling_interval_s": 1}),
    );
    // Before boot: the configuration, and no runtime calls.
    let b = api.get("/balloon").unwrap().json();
    assert_eq!(
        b,
        json!({"amount_mib": 0, "deflate_on_oom": true, "stats_polling_interval_s": 1,
               "free_page_hinting": false, "free_page_reporting": false})
    );
    let r = patch(&mut api, "/balloon", json!({"amount_mib": 1}));
    assert_eq!(r.status, 400, "{r:?}");
    assert_eq!(
        r.fault_message(),
        "The requested operation is not supported before starting the microVM."
    );
    put(
        &mut api,
        "/actions",
        json!({"action_type": "InstanceStart"}),
    );

    let out = line(&mut vm, &format!("balloon: touched {TOUCH_MIB} MiB"));
    // VERSION_1, STATS_VQ and DEFLATE_ON_OOM offered and taken.
    assert!(
        out.lines()
            .any(|l| l == "balloon: features offered 0x100000006 accepted 0x100000006"),
        "{out}"
    );
    let touched = rss_kib(vm.pid());

    // A live target: the guest inflates by all it touched.
    let r = patch(&mut api, "/balloon", json!({"amount_mib": TOUCH_MIB}));
    assert_eq!(r.status, 204, "{r:?}");
    line(&mut vm, &format!("balloon: inflated {}", TOUCH_MIB * 256));
    let inflated = rss_kib(vm.pid());
    assert!(
        touched.saturating_sub(inflated) >= (TOUCH_MIB - 4) * 1024,
        "RSS {touched} KiB before the inflate, {inflated} KiB after"
    );
    assert_eq!(api.get("/balloon").unwrap().json()["amount_mib"], TOUCH_MIB);
    assert_eq!(
        api.get("/vm/config").unwrap().json()["balloon"]["amount_mib"],
        TOUCH_MIB
    );

    // The guest's statistics, refreshed every second.
    let s = stats_until(&mut api, "the inflated balloon", |s| {
        s["actual_pages"] == TOUCH_MIB * 256
    });
    assert_eq!(s["target_pages"], TOUCH_MIB * 256, "{s}");
    assert_eq!(
        (&s["target_mib"], &s["actual_mib"]),
        (&json!(TOUCH_MIB), &json!(TOUCH_MIB))
    );
    assert_eq!(s["free_memory"], 0x1234000, "{s}");
    assert!(s["total_memory"].as_u64().unwrap() > 200 << 20, "{s}");
    assert!(s.get("swap_in").is_none(), "{s}");
    let first = s["minor_faults"].as_u64().unwrap();
    stats_until(&mut api, "a refresh", |s| {
        s["minor_faults"].as_u64().unwrap() >= first + 2
    });

    // Firecracker's refusals after boot.
    let r = patch(
        &mut api,
        "/balloon/statistics",
        json!({"stats_polling_interval_s": 0}),
    );
    assert_eq!(r.status, 400, "{r:?}");
    assert_eq!(
        r.fault_message(),
        "Balloon update error: Balloon: Statistics cannot be enabled/disabled after activation."
    );
    let r = patch(&mut api, "/balloon", json!({"amount_mib": 300}));
    assert_eq!(r.status, 400, "{r:?}");
    assert_eq!(
        r.fault_message(),
        "Balloon update error: Balloon: Requested memory should be less than 300MiB"
    );
    let r = patch(&mut api, "/balloon/hinting/start", json!({}));
    assert_eq!(r.status, 400, "{r:?}");
    assert_eq!(
        r.fault_message(),
        "Balloon update error: Balloon: Attempting to use hinting when not enabled"
    );
    let r = api
        .put(
            "/balloon",
            &json!({"amount_mib": 1, "deflate_on_oom": false}),
        )
        .unwrap();
    assert_eq!(r.status, 400, "{r:?}");
    let r = patch(
        &mut api,
        "/balloon/statistics",
        json!({"stats_polling_interval_s": 2}),
    );
    assert_eq!(r.status, 204, "{r:?}");
    assert_eq!(
        api.get("/balloon").unwrap().json()["stats_polling_interval_s"],
        2
    );

    // Deflate: the guest takes its pages back; they read as zero pages,
    // and touching them again makes them resident again.
    let r = patch(&mut api, "/balloon", json!({"amount_mib": 0}));
    assert_eq!(r.status, 204, "{r:?}");
    let pages = TOUCH_MIB * 256;
    line(
        &mut vm,
        &format!("balloon: deflated to 0 zero {pages} of {pages}"),
    );
    let retouched = rss_kib(vm.pid());
    assert!(
        retouched >= inflated + (TOUCH_MIB - 4) * 1024,
        "RSS {inflated} KiB inflated, {retouched} KiB after the deflate"
    );
    let exit = vm.wait(WAIT).unwrap();
    assert!(exit.status.success(), "{}\n{}", exit.stdout, exit.stderr);
    assert!(
        exit.stdout.lines().any(|l| l == "virtio_balloon done"),
        "{}",
        exit.stdout
    );
}

#[test]
fn the_config_file_balloon_is_inflated_at_boot() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = dir.path().join("metrics.json");
    let out = run_guest(
        &guest_path("virtio_balloon"),
        &json!({
            "boot-source": {"boot_args": "console=ttyS0 balloon.touch=16 balloon.once=1"},
            "machine-config": {"vcpu_count": 1, "mem_size_mib": 128},
            "balloon": {"amount_mib": 8, "deflate_on_oom": false},
            "drives": [],
            "metrics": {"metrics_path": metrics},
        }),
    )
    .expect("run ember");
    assert!(out.status.success(), "{out}");
    // Only VERSION_1: no statistics queue, no DEFLATE_ON_OOM.
    assert!(
        out.stdout
            .lines()
            .any(|l| l == "balloon: features offered 0x100000000 accepted 0x100000000"),
        "{out}"
    );
    // The balloon sits in the first virtio slot, as in Firecracker.
    assert!(
        out.stdout
            .lines()
            .any(|l| l == "balloon: device at 0xc0001000"),
        "{out}"
    );
    assert!(
        out.stdout.lines().any(|l| l == "balloon: inflated 2048"),
        "{out}"
    );
    assert!(
        out.stdout.lines().any(|l| l == "virtio_balloon done"),
        "{out}"
    );
    let text = std::fs::read_to_string(&metrics).unwrap();
    let inflates: u64 = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| v["balloon"]["inflate_count"].as_u64())
        .sum();
    assert!(inflates >= 1, "{text}");
}

#[test]
fn a_balloon_larger_than_guest_memory_is_refused() {
    let out = run_guest(
        &guest_path("virtio_balloon"),
        &json!({
            "machine-config": {"vcpu_count": 1, "mem_size_mib": 64},
            "balloon": {"amount_mib": 65, "deflate_on_oom": false},
        }),
    )
    .expect("run ember");
    assert!(!out.status.success(), "{out}");
    assert!(
        out.stderr
            .contains("Amount of pages requested is too large."),
        "{out}"
    );
}

/// A snapshot of a VM whose guest has inflated its balloon loads into a
/// new process that knows the target and the guest's statistics, and the
/// restored guest follows a new target: it deflates, and the pages it
/// takes back read as zero pages.
#[test]
fn an_inflated_balloon_goes_on_across_a_snapshot() {
    const MIB: u64 = 16;
    let dir = tempfile::tempdir().unwrap();
    let mut vm = ApiVm::spawn(&["--id", "balloon-snap"]).unwrap();
    let mut api = vm.client().unwrap();
    put(
        &mut api,
        "/boot-source",
        json!({"kernel_image_path": guest_path("virtio_balloon"),
               "boot_args": format!("console=ttyS0 balloon.touch={MIB}")}),
    );
    put(
        &mut api,
        "/machine-config",
        json!({"vcpu_count": 1, "mem_size_mib": 64}),
    );
    put(
        &mut api,
        "/balloon",
        json!({"amount_mib": 0, "deflate_on_oom": true, "stats_polling_interval_s": 1}),
    );
    put(
        &mut api,
        "/actions",
        json!({"action_type": "InstanceStart"}),
    );
    line(&mut vm, &format!("balloon: touched {MIB} MiB"));
    let r = patch(&mut api, "/balloon", json!({"amount_mib": MIB}));
    assert_eq!(r.status, 204, "{r:?}");
    line(&mut vm, &format!("balloon: inflated {}", MIB * 256));
    stats_until(&mut api, "the inflated balloon", |s| {
        s["actual_pages"] == MIB * 256
    });
    let r = patch(&mut api, "/vm", json!({"state": "Paused"}));
    assert_eq!(r.status, 204, "{r:?}");
    let (state, mem) = (dir.path().join("vm.state"), dir.path().join("vm.mem"));
    put(
        &mut api,
        "/snapshot/create",
        json!({"snapshot_path": state, "mem_file_path": mem}),
    );
    drop(vm);

    let mut vm = ApiVm::spawn(&["--id", "balloon-snap-2"]).unwrap();
    let mut api = vm.client().unwrap();
    put(
        &mut api,
        "/snapshot/load",
        json!({"snapshot_path": state,
               "mem_backend": {"backend_type": "File", "backend_path": mem},
               "resume_vm": true}),
    );
    assert_eq!(api.get("/balloon").unwrap().json()["amount_mib"], MIB);
    // The restored device still polls the guest's statistics.
    let s = stats_until(&mut api, "the restored balloon", |s| {
        s["actual_pages"] == MIB * 256 && s["free_memory"] == 0x1234000
    });
    assert_eq!(s["target_mib"], MIB, "{s}");
    let r = patch(&mut api, "/balloon", json!({"amount_mib": 0}));
    assert_eq!(r.status, 204, "{r:?}");
    let pages = MIB * 256;
    line(
        &mut vm,
        &format!("balloon: deflated to 0 zero {pages} of {pages}"),
    );
    let exit = vm.wait(WAIT).unwrap();
    assert!(exit.status.success(), "{}\n{}", exit.stdout, exit.stderr);
}
