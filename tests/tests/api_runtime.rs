//! What the API does to a running microVM of the real `ember` binary:
//! pause and resume, Ctrl+Alt+Del, metrics, and a drive's backing file
//! replaced while the guest runs.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ember_tests::api::{ApiVm, Client};
use ember_tests::guest_path;
use serde_json::{json, Value};

const TIMEOUT: Duration = Duration::from_secs(30);

fn ok(r: std::io::Result<ember_tests::api::Response>) {
    let r = r.unwrap();
    assert_eq!(r.status, 204, "{r:?}");
}

/// Spawns ember, configures `guest` with `boot_args` (and `extra` calls),
/// starts it.
fn start(guest: &str, boot_args: &str, extra: impl FnOnce(&ApiVm, &mut Client)) -> (ApiVm, Client) {
    let vm = ApiVm::spawn(&["--id", "api-runtime"]).unwrap();
    let mut api = vm.client().unwrap();
    ok(api.put(
        "/boot-source",
        &json!({"kernel_image_path": guest_path(guest), "boot_args": boot_args}),
    ));
    extra(&vm, &mut api);
    ok(api.put("/actions", &json!({"action_type": "InstanceStart"})));
    (vm, api)
}

/// Every `count N` line, in order.
fn counts(out: &str) -> Vec<u64> {
    out.lines()
        .filter_map(|l| l.strip_prefix("count "))
        .filter_map(|n| n.parse().ok())
        .collect()
}

#[test]
fn pause_stops_the_guest_and_resume_continues_where_it_stopped() {
    let (mut vm, mut api) = start("counter", "console=ttyS0", |_, _| {});
    vm.wait_for_output(|o| counts(o).len() > 50, TIMEOUT)
        .unwrap();

    for round in 0..3 {
        ok(api.patch("/vm", &json!({"state": "Paused"})));
        assert_eq!(api.get("/").unwrap().json()["state"], "Paused");
        // Bytes written before the pause may still be in the pipe.
        std::thread::sleep(Duration::from_millis(50));
        let paused_at = vm.stdout();
        std::thread::sleep(Duration::from_millis(300));
        let later = vm.stdout();
        assert_eq!(
            later.len(),
            paused_at.len(),
            "round {round}: the guest printed while paused: {:?}",
            &later[paused_at.len()..]
        );
        // The API keeps answering while paused.
        assert_eq!(api.get("/machine-config").unwrap().status, 200);

        ok(api.patch("/vm", &json!({"state": "Resumed"})));
        assert_eq!(api.get("/").unwrap().json()["state"], "Running");
        let last = *counts(&paused_at).last().unwrap();
        vm.wait_for_output(
            |o| counts(o).last().is_some_and(|n| *n > last + 20),
            TIMEOUT,
        )
        .unwrap();
    }
    // No gap, no reset: every value once, in order.
    let all = counts(&vm.stdout());
    for (i, n) in all.iter().enumerate() {
        assert_eq!(*n, i as u64, "count {i} is {n}");
    }
    // Pausing twice or resuming a running VM is harmless.
    ok(api.patch("/vm", &json!({"state": "Resumed"})));
    ok(api.patch("/vm", &json!({"state": "Paused"})));
    ok(api.patch("/vm", &json!({"state": "Paused"})));
    ok(api.patch("/vm", &json!({"state": "Resumed"})));
    let last = *counts(&vm.stdout()).last().unwrap();
    vm.wait_for_output(|o| counts(o).last().is_some_and(|n| *n > last + 5), TIMEOUT)
        .unwrap();
}

#[test]
fn ctrl_alt_del_reaches_the_guest_which_resets() {
    let (mut vm, mut api) = start("ctrl_alt_del", "console=ttyS0", |_, _| {});
    vm.wait_for_output(|o| o.contains("ctrl_alt_del: waiting\n"), TIMEOUT)
        .unwrap();
    ok(api.put("/actions", &json!({"action_type": "SendCtrlAltDel"})));
    let out = vm.wait(TIMEOUT).unwrap();
    assert!(out.status.success(), "{:?}\n{}", out.status, out.stderr);
    let keys: Vec<&str> = out
        .stdout
        .lines()
        .filter_map(|l| l.strip_prefix("key "))
        .collect();
    assert_eq!(keys, ["0x14", "0x11", "0xe0", "0x71"], "{}", out.stdout);
    assert!(
        out.stdout.ends_with("ctrl_alt_del: reset\n"),
        "{}",
        out.stdout
    );
}

#[test]
fn ctrl_alt_del_while_paused_is_delivered_on_resume() {
    let (mut vm, mut api) = start("ctrl_alt_del", "console=ttyS0", |_, _| {});
    vm.wait_for_output(|o| o.contains("ctrl_alt_del: waiting\n"), TIMEOUT)
        .unwrap();
    ok(api.patch("/vm", &json!({"state": "Paused"})));
    ok(api.put("/actions", &json!({"action_type": "SendCtrlAltDel"})));
    std::thread::sleep(Duration::from_millis(200));
    assert!(!vm.stdout().contains("key "), "{}", vm.stdout());
    ok(api.patch("/vm", &json!({"state": "Resumed"})));
    let out = vm.wait(TIMEOUT).unwrap();
    assert!(out.status.success(), "{}", out.stderr);
    assert!(out.stdout.contains("key 0x71\n"), "{}", out.stdout);
}

fn metrics_lines(path: &Path) -> Vec<Value> {
    fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn sum(lines: &[Value], group: &str, field: &str) -> u64 {
    lines
        .iter()
        .map(|l| l[group][field].as_u64().unwrap_or(0))
        .sum()
}

#[test]
fn metrics_are_flushed_on_request_and_at_exit() {
    const STORM: u64 = 100_000;
    // Outlives the VM (and its directory).
    let dir = tempfile::tempdir().unwrap();
    let metrics = dir.path().join("metrics.json");
    let (vm, mut api) = start(
        "storm",
        &format!("console=ttyS0 storm.count={STORM}"),
        |_, api| {
            ok(api.put(
                "/metrics",
                &json!({"metrics_path": metrics, "emit_id": true}),
            ));
        },
    );
    ok(api.put("/actions", &json!({"action_type": "FlushMetrics"})));
    let flushed = metrics_lines(&metrics);
    assert_eq!(flushed.len(), 1, "one line per FlushMetrics: {flushed:?}");

    let out = vm.wait(TIMEOUT).unwrap();
    assert!(out.status.success(), "{}", out.stderr);
    assert!(out.stdout.contains(&format!("storm done {STORM}")));
    let lines = metrics_lines(&metrics);
    assert_eq!(lines.len(), 2, "the FlushMetrics line and the exit line");

    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    for l in &lines {
        let ts = l["utc_timestamp_ms"].as_u64().unwrap();
        assert!(ts <= now_ms && now_ms - ts < 60_000, "{ts} vs {now_ms}");
        assert_eq!(l["id"], "api-runtime");
    }
    let first = &lines[0];
    // Counted when received, so the FlushMetrics request is in its own line.
    assert_eq!(first["put_api_requests"]["actions_count"], 2, "{first}");
    assert_eq!(first["put_api_requests"]["boot_source_count"], 1);
    assert_eq!(first["put_api_requests"]["metrics_count"], 1);
    assert_eq!(first["put_api_requests"]["actions_fails"], 0);
    assert!(
        first["api_server"]["process_startup_time_us"]
            .as_u64()
            .unwrap()
            > 0
    );
    // Counters report what happened since the previous line: together,
    // at least one port write per storm iteration.
    assert!(
        sum(&lines, "vcpu", "exit_io_out") >= STORM,
        "{}",
        sum(&lines, "vcpu", "exit_io_out")
    );
    assert!(sum(&lines, "vcpu", "exit_io_in") > 0);
    assert_eq!(sum(&lines, "vcpu", "failures"), 0);
    assert_eq!(sum(&lines, "i8042", "reset_count"), 1);
    assert_eq!(
        sum(&lines, "uart", "write_count"),
        format!("storm done {STORM}\n").len() as u64
    );
}

#[test]
fn a_drive_backing_file_is_replaced_while_the_guest_runs() {
    let mut first = None;
    let (mut vm, mut api) = start("counter", "console=ttyS0", |vm, api| {
        let path = vm.dir().join("disk-1.img");
        fs::File::create(&path).unwrap().set_len(1 << 20).unwrap();
        ok(api.put(
            "/drives/scratch",
            &json!({"drive_id": "scratch", "path_on_host": path, "is_root_device": false, "is_read_only": false}),
        ));
        first = Some(path);
    });
    vm.wait_for_output(|o| o.contains("count 5\n"), TIMEOUT)
        .unwrap();
    let first = first.unwrap();
    let config = api.get("/vm/config").unwrap().json();
    assert_eq!(config["drives"][0]["path_on_host"], json!(first));

    let second = vm.dir().join("disk-2.img");
    fs::File::create(&second).unwrap().set_len(4 << 20).unwrap();
    ok(api.patch(
        "/drives/scratch",
        &json!({"drive_id": "scratch", "path_on_host": second}),
    ));
    let config = api.get("/vm/config").unwrap().json();
    assert_eq!(
        config["drives"][0]["path_on_host"],
        json!(second),
        "{config}"
    );
    assert_eq!(config["drives"][0]["is_read_only"], false);

    // A file that does not exist is refused by name, and nothing changes.
    let missing = vm.dir().join("disk-3.img");
    let r = api
        .patch(
            "/drives/scratch",
            &json!({"drive_id": "scratch", "path_on_host": missing}),
        )
        .unwrap();
    assert_eq!(r.status, 400, "{r:?}");
    assert!(
        r.fault_message().contains(missing.to_str().unwrap()),
        "{r:?}"
    );
    // A PATCH that changes nothing is refused, as Firecracker refuses it.
    let r = api
        .patch("/drives/scratch", &json!({"drive_id": "scratch"}))
        .unwrap();
    assert_eq!(r.status, 400, "{r:?}");
    assert!(
        r.fault_message()
            .starts_with("Drive config error: Unable to patch the block device: "),
        "{r:?}"
    );
    let config = api.get("/vm/config").unwrap().json();
    assert_eq!(config["drives"][0]["path_on_host"], json!(second));
    // Before boot only: a new drive.
    let r = api
        .put(
            "/drives/other",
            &json!({"drive_id": "other", "path_on_host": second, "is_root_device": false, "is_read_only": true}),
        )
        .unwrap();
    assert_eq!(r.status, 400);

    let before = *counts(&vm.stdout()).last().unwrap();
    let deadline = Instant::now() + TIMEOUT;
    vm.wait_for_output(
        |o| counts(o).last().is_some_and(|n| *n > before + 5),
        deadline - Instant::now(),
    )
    .unwrap();
}

#[test]
fn rate_limiters_change_on_a_running_vm() {
    let (mut vm, mut api) = start("counter", "console=ttyS0", |vm, api| {
        let path = vm.dir().join("disk.img");
        fs::File::create(&path).unwrap().set_len(1 << 20).unwrap();
        ok(api.put(
            "/drives/scratch",
            &json!({"drive_id": "scratch", "path_on_host": path, "is_root_device": false,
                    "rate_limiter": {"bandwidth": {"size": 4096, "refill_time": 100}}}),
        ));
    });
    vm.wait_for_output(|o| o.contains("count 2\n"), TIMEOUT)
        .unwrap();
    // Only ops: the bandwidth bucket stays.
    ok(api.patch(
        "/drives/scratch",
        &json!({"drive_id": "scratch", "rate_limiter": {"ops": {"size": 100, "refill_time": 1000}}}),
    ));
    let config = api.get("/vm/config").unwrap().json();
    let rl = &config["drives"][0]["rate_limiter"];
    assert_eq!(rl["bandwidth"]["size"], 4096, "{config}");
    assert_eq!(rl["ops"]["size"], 100, "{config}");

    // An interface the VM does not have: refused by name.
    let r = api
        .patch(
            "/network-interfaces/eth0",
            &json!({"iface_id": "eth0", "rx_rate_limiter": {"ops": {"size": 1, "refill_time": 1}}}),
        )
        .unwrap();
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.fault_message().contains("`eth0`"), "{r:?}");
    // The guest ran on throughout.
    let before = *counts(&vm.stdout()).last().unwrap();
    vm.wait_for_output(
        |o| counts(o).last().is_some_and(|n| *n > before + 2),
        TIMEOUT,
    )
    .unwrap();
}
