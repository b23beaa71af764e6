//! Configuring and starting a microVM through the API socket of the real
//! `ember` binary: every pre-boot endpoint's happy path, a full start, and
//! `--config-file` together with the API.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ember_tests::api::{ApiVm, Client};
use ember_tests::guest_path;
use serde_json::{json, Value};

const GREETING: &str = "Hello from the Ember test guest";
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

fn ok(api: &mut Client, method: &str, path: &str, body: &Value) {
    let r = api
        .request(method, path, Some(&body.to_string()))
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    assert_eq!(r.status, 204, "{method} {path}: {r:?}");
    assert_eq!(r.body, "", "{method} {path}");
}

fn get(api: &mut Client, path: &str) -> Value {
    let r = api.get(path).unwrap();
    assert_eq!(r.status, 200, "GET {path}: {r:?}");
    assert_eq!(r.header("content-type"), Some("application/json"));
    r.json()
}

fn image(dir: &Path, name: &str, len: u64) -> std::path::PathBuf {
    let path = dir.join(name);
    let f = fs::File::create(&path).unwrap();
    f.set_len(len).unwrap();
    path
}

#[test]
fn a_full_start_through_the_api_runs_the_guest() {
    let vm = ApiVm::spawn(&["--id", "api-boot-1"]).unwrap();
    let socket = vm.socket().to_path_buf();
    let rootfs = image(vm.dir(), "rootfs.img", 1 << 20);
    let mut api = vm.client().unwrap();

    ok(
        &mut api,
        "PUT",
        "/boot-source",
        &json!({"kernel_image_path": guest_path("hello"), "boot_args": "console=ttyS0"}),
    );
    ok(
        &mut api,
        "PUT",
        "/machine-config",
        &json!({"vcpu_count": 2, "mem_size_mib": 64}),
    );
    ok(
        &mut api,
        "PUT",
        "/drives/rootfs",
        &json!({"drive_id": "rootfs", "path_on_host": rootfs, "is_root_device": true, "is_read_only": false}),
    );
    assert_eq!(get(&mut api, "/")["state"], "Not started");
    ok(
        &mut api,
        "PUT",
        "/actions",
        &json!({"action_type": "InstanceStart"}),
    );

    // The guest prints and resets: ember exits 0, as without the API.
    let out = vm.wait(EXIT_TIMEOUT).unwrap();
    assert!(
        out.status.success(),
        "{:?}\n{}\n{}",
        out.status,
        out.stdout,
        out.stderr
    );
    assert_eq!(
        out.stdout.lines().filter(|l| *l == GREETING).count(),
        1,
        "{}",
        out.stdout
    );
    // The socket is removed on the way out.
    assert!(!socket.exists(), "{} left behind", socket.display());
}

#[test]
fn put_serial_sends_the_console_to_a_file_instead_of_stdout() {
    let vm = ApiVm::spawn(&["--id", "api-serial"]).unwrap();
    // Outlives the VM's own directory, which goes with it.
    let dir = tempfile::tempdir().unwrap();
    let console = dir.path().join("console.log");
    let mut api = vm.client().unwrap();

    ok(
        &mut api,
        "PUT",
        "/boot-source",
        &json!({"kernel_image_path": guest_path("hello"), "boot_args": "console=ttyS0"}),
    );
    ok(
        &mut api,
        "PUT",
        "/serial",
        &json!({"serial_out_path": console}),
    );
    // Not a configuration section in Firecracker's GET /vm/config.
    let c = get(&mut api, "/vm/config");
    assert!(c.get("serial").is_none(), "{c}");
    ok(
        &mut api,
        "PUT",
        "/actions",
        &json!({"action_type": "InstanceStart"}),
    );

    let out = vm.wait(EXIT_TIMEOUT).unwrap();
    assert!(out.status.success(), "{:?}\n{}", out.status, out.stderr);
    let text = fs::read_to_string(&console).unwrap();
    assert_eq!(text.lines().filter(|l| *l == GREETING).count(), 1, "{text}");
    assert!(!out.stdout.contains(GREETING), "{}", out.stdout);
}

#[test]
fn the_serial_rate_limiter_drops_and_counts_what_exceeds_it() {
    let dir = tempfile::tempdir().unwrap();
    let console = dir.path().join("console.log");
    let metrics = dir.path().join("metrics.json");
    let metrics_arg = metrics.to_str().unwrap().to_string();
    let vm = ApiVm::spawn(&["--id", "api-serial-rl", "--metrics-path", &metrics_arg]).unwrap();
    let mut api = vm.client().unwrap();
    ok(
        &mut api,
        "PUT",
        "/boot-source",
        &json!({"kernel_image_path": guest_path("hello"), "boot_args": "console=ttyS0"}),
    );
    // 10 bytes of burst, then 1 byte per 1000 s: nothing more in the test.
    ok(
        &mut api,
        "PUT",
        "/serial",
        &json!({"serial_out_path": console,
                "rate_limiter": {"size": 1, "one_time_burst": 9, "refill_time": 1_000_000}}),
    );
    ok(
        &mut api,
        "PUT",
        "/actions",
        &json!({"action_type": "InstanceStart"}),
    );
    let out = vm.wait(EXIT_TIMEOUT).unwrap();
    assert!(out.status.success(), "{:?}\n{}", out.status, out.stderr);
    assert_eq!(fs::read_to_string(&console).unwrap(), &GREETING[..10]);
    let lines = fs::read_to_string(&metrics).unwrap();
    let dropped: u64 = lines
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .map(|m| m["uart"]["rate_limiter_dropped_bytes"].as_u64().unwrap())
        .sum();
    assert_eq!(dropped, GREETING.len() as u64 + 1 - 10, "{lines}");
}

#[test]
fn every_pre_boot_endpoint_answers_and_is_reflected() {
    let vm = ApiVm::spawn(&["--id", "api-boot-2"]).unwrap();
    let mut api = vm.client().unwrap();

    let info = get(&mut api, "/");
    assert_eq!(info["id"], "api-boot-2");
    assert_eq!(info["state"], "Not started");
    assert_eq!(info["app_name"], "Ember");
    let version = get(&mut api, "/version");
    assert_eq!(version["firecracker_version"], "1.17.0");
    assert!(version["ember_version"].is_string(), "{version}");

    // Firecracker's defaults.
    let m = get(&mut api, "/machine-config");
    assert_eq!(
        (m["vcpu_count"].as_u64(), m["mem_size_mib"].as_u64()),
        (Some(1), Some(128))
    );

    ok(
        &mut api,
        "PUT",
        "/machine-config",
        &json!({"vcpu_count": 2, "mem_size_mib": 256, "smt": false}),
    );
    ok(
        &mut api,
        "PATCH",
        "/machine-config",
        &json!({"mem_size_mib": 512}),
    );
    let m = get(&mut api, "/machine-config");
    assert_eq!(m["vcpu_count"], 2, "{m}");
    assert_eq!(m["mem_size_mib"], 512, "{m}");

    let kernel = guest_path("hello");
    ok(
        &mut api,
        "PUT",
        "/boot-source",
        &json!({"kernel_image_path": kernel, "boot_args": "console=ttyS0 quiet"}),
    );
    let data = image(vm.dir(), "data.img", 1 << 20);
    ok(
        &mut api,
        "PUT",
        "/drives/data",
        &json!({"drive_id": "data", "path_on_host": data, "is_root_device": false, "is_read_only": true}),
    );
    ok(
        &mut api,
        "PUT",
        "/vsock",
        &json!({"guest_cid": 3, "uds_path": vm.dir().join("v.sock")}),
    );

    let log = vm.dir().join("ember.log");
    ok(
        &mut api,
        "PUT",
        "/logger",
        &json!({"log_path": log, "level": "Debug", "show_level": true}),
    );
    let metrics = vm.dir().join("metrics.json");
    ok(
        &mut api,
        "PUT",
        "/metrics",
        &json!({"metrics_path": metrics}),
    );
    // Metrics are set once per process, as in Firecracker.
    let r = api
        .put(
            "/metrics",
            &json!({"metrics_path": vm.dir().join("other.json")}),
        )
        .unwrap();
    assert_eq!(r.status, 400, "{r:?}");
    assert_eq!(
        r.fault_message(),
        "Metrics error: Reinitialization of metrics not allowed."
    );

    let c = get(&mut api, "/vm/config");
    assert_eq!(c["boot-source"]["kernel_image_path"], json!(kernel), "{c}");
    assert_eq!(c["boot-source"]["boot_args"], "console=ttyS0 quiet");
    assert_eq!(c["machine-config"]["mem_size_mib"], 512);
    assert_eq!(c["drives"][0]["drive_id"], "data");
    assert_eq!(c["drives"][0]["is_read_only"], true);
    assert_eq!(c["vsock"]["guest_cid"], 3);
    assert_eq!(c["logger"]["level"], "Debug", "{c}");
    assert_eq!(c["metrics"]["metrics_path"], json!(metrics));
    // Every section Firecracker answers, absent ones null or empty, and
    // every field of a drive.
    for absent in [
        "balloon",
        "cpu-config",
        "mmds-config",
        "entropy",
        "memory-hotplug",
    ] {
        assert!(c[absent].is_null(), "{absent}: {c}");
    }
    assert_eq!(c["pmem"], json!([]), "{c}");
    assert_eq!(c["network-interfaces"], json!([]), "{c}");
    assert_eq!(c["boot-source"]["initrd_path"], Value::Null, "{c}");
    for (field, value) in [
        ("partuuid", Value::Null),
        ("rate_limiter", Value::Null),
        ("socket", Value::Null),
        ("io_engine", json!("Sync")),
        ("cache_type", json!("Unsafe")),
        ("is_root_device", json!(false)),
    ] {
        assert_eq!(c["drives"][0][field], value, "{field}: {c}");
    }

    // The logger took effect at once: later requests are logged to the
    // file, with the level shown.
    get(&mut api, "/");
    let text = fs::read_to_string(&log).unwrap();
    assert!(
        text.lines()
            .any(|l| l.contains("[api-boot-2:ember_api:Info] API request: GET /")),
        "{text}"
    );
    // The metrics file exists from PUT /metrics on.
    assert!(metrics.exists());
}

#[test]
fn a_config_file_boots_at_once_and_the_api_serves_the_running_vm() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("vm.json");
    fs::write(
        &config,
        json!({
            "boot-source": {"kernel_image_path": guest_path("counter")},
            "machine-config": {"vcpu_count": 1, "mem_size_mib": 64},
        })
        .to_string(),
    )
    .unwrap();
    let config = config.to_str().unwrap().to_string();
    let mut vm = ApiVm::spawn(&["--config-file", config.as_str()]).unwrap();
    vm.wait_for_output(|o| o.contains("count 10\n"), EXIT_TIMEOUT)
        .unwrap();
    let mut api = vm.client().unwrap();
    assert_eq!(get(&mut api, "/")["state"], "Running");
    assert_eq!(get(&mut api, "/machine-config")["mem_size_mib"], 64);
    // It was started from the file: starting again is refused.
    let r = api
        .put("/actions", &json!({"action_type": "InstanceStart"}))
        .unwrap();
    assert_eq!(r.status, 400);
    assert_eq!(
        r.fault_message(),
        "The requested operation is not supported after starting the microVM."
    );
    let out = vm.kill();
    assert!(out.stdout.contains("count 10\n"));
}

#[test]
fn a_socket_path_in_use_is_refused_with_a_clear_error() {
    let vm = ApiVm::spawn::<&str>(&[]).unwrap();
    let socket = vm.socket().to_str().unwrap().to_string();
    let out = std::process::Command::new(ember_tests::ember_binary())
        .args(["--api-sock", socket.as_str()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("ember: error: the API socket path")
            && stderr.contains(socket.as_str())
            && stderr.contains("already exists"),
        "{stderr}"
    );
    // The first VMM still serves its socket.
    let r = vm.client().unwrap().get("/").unwrap();
    assert_eq!(r.status, 200);
}

fn sigterm(vm: &ApiVm) {
    signal(vm, libc::SIGTERM);
}

#[test]
fn sigterm_before_boot_removes_the_socket_and_ends_by_the_signal() {
    use std::os::unix::process::ExitStatusExt;

    let vm = ApiVm::spawn::<&str>(&[]).unwrap();
    let socket = vm.socket().to_path_buf();
    sigterm(&vm);
    let out = vm.wait(EXIT_TIMEOUT).unwrap();
    assert_eq!(out.status.signal(), Some(libc::SIGTERM), "{out:?}");
    assert!(!socket.exists(), "{} left behind", socket.display());
    assert_eq!(out.stderr, "", "a requested stop is not an error");
}

#[test]
fn sigterm_while_running_stops_the_vm_and_writes_the_last_metrics() {
    use std::os::unix::process::ExitStatusExt;

    let dir = tempfile::tempdir().unwrap();
    let (vm, _api, metrics) = running_with_metrics(dir.path());
    let socket = vm.socket().to_path_buf();
    sigterm(&vm);
    let out = vm.wait(EXIT_TIMEOUT).unwrap();
    assert_eq!(out.status.signal(), Some(libc::SIGTERM), "{out:?}");
    assert!(!socket.exists(), "{} left behind", socket.display());
    let last = last_metrics(&metrics);
    assert!(last["uart"]["write_count"].as_u64().unwrap() > 0, "{last}");
}

fn signal(vm: &ApiVm, signum: libc::c_int) {
    let pid = libc::pid_t::try_from(vm.pid()).unwrap();
    // SAFETY: kill(2) has no memory effects; the pid is our unreaped child.
    assert_eq!(unsafe { libc::kill(pid, signum) }, 0);
}

/// A VMM with a metrics file, booted with the counter guest.
fn running_with_metrics(dir: &Path) -> (ApiVm, Client, PathBuf) {
    let metrics = dir.join("metrics.json");
    let mut vm = ApiVm::spawn::<&str>(&[]).unwrap();
    let mut api = vm.client().unwrap();
    ok(
        &mut api,
        "PUT",
        "/metrics",
        &json!({"metrics_path": metrics}),
    );
    ok(
        &mut api,
        "PUT",
        "/boot-source",
        &json!({"kernel_image_path": guest_path("counter")}),
    );
    ok(
        &mut api,
        "PUT",
        "/actions",
        &json!({"action_type": "InstanceStart"}),
    );
    vm.wait_for_output(|o| o.contains("count 5\n"), EXIT_TIMEOUT)
        .unwrap();
    (vm, api, metrics)
}

fn last_metrics(path: &Path) -> Value {
    let lines = fs::read_to_string(path).unwrap();
    serde_json::from_str(lines.lines().last().unwrap()).unwrap()
}

#[test]
fn fatal_signals_end_with_firecrackers_exit_codes_and_metrics() {
    for (signum, code, metric) in [
        (libc::SIGHUP, 156, "sighup"),
        (libc::SIGBUS, 149, "sigbus"),
        (libc::SIGXCPU, 154, "sigxcpu"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (vm, _api, metrics) = running_with_metrics(dir.path());
        let socket = vm.socket().to_path_buf();
        signal(&vm, signum);
        let out = vm.wait(EXIT_TIMEOUT).unwrap();
        assert_eq!(out.status.code(), Some(code), "{metric}: {out:?}");
        assert!(
            out.stderr.contains(&format!(
                "Shutting down VM after intercepting signal {signum}, code 0."
            )),
            "{out:?}"
        );
        let last = last_metrics(&metrics);
        assert_eq!(last["signals"][metric], 1, "{last}");
        assert_eq!(last["signals"]["sigsegv"], 0, "{last}");
        assert!(last["uart"]["write_count"].as_u64().unwrap() > 0, "{last}");
        let deadline = std::time::Instant::now() + EXIT_TIMEOUT;
        while socket.exists() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert!(!socket.exists(), "{} left behind", socket.display());
    }
}

#[test]
fn sigpipe_is_counted_and_the_vmm_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let (mut vm, mut api, metrics) = running_with_metrics(dir.path());
    // One at a time: two pending SIGPIPEs would be delivered as one.
    signal(&vm, libc::SIGPIPE);
    let r = api.get("/").unwrap();
    assert_eq!(r.status, 200);
    ok(
        &mut api,
        "PUT",
        "/actions",
        &json!({"action_type": "FlushMetrics"}),
    );
    let last = last_metrics(&metrics);
    assert_eq!(last["signals"]["sigpipe"], 1, "{last}");
    assert_eq!(last["signals"]["sighup"], 0, "{last}");
    let before = vm.stdout().matches("count ").count();
    vm.wait_for_output(|o| o.matches("count ").count() > before + 2, EXIT_TIMEOUT)
        .unwrap();
}
