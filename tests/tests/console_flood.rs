//! A guest that writes to the console as fast as it can while nobody reads
//! Ember's stdout: once the pipe is full the bytes are dropped and counted,
//! the vCPU keeps running, Ember's memory stays flat and the API answers.

use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use ember_tests::api::Client;
use ember_tests::{default_config, ember_binary, guest_path};
use serde_json::{json, Value};

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap()
}

fn flush(api: &mut Client, path: &std::path::Path) -> Value {
    let r = api
        .put("/actions", &json!({"action_type": "FlushMetrics"}))
        .unwrap();
    assert_eq!(r.status, 204, "{r:?}");
    let text = std::fs::read_to_string(path).unwrap();
    serde_json::from_str(text.lines().last().unwrap()).unwrap()
}

#[test]
fn a_flooded_console_nobody_reads_drops_bytes_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("api.sock");
    let metrics = dir.path().join("metrics.json");
    let config = dir.path().join("vm.json");
    let mut cfg = default_config(&guest_path("counter"));
    cfg["boot-source"]["boot_args"] = json!("console=ttyS0");
    cfg["metrics"] = json!({"metrics_path": metrics});
    std::fs::write(&config, cfg.to_string()).unwrap();

    let mut child = Command::new(ember_binary())
        .arg("--api-sock")
        .arg(&socket)
        .arg("--config-file")
        .arg(&config)
        .stdin(Stdio::null())
        // Held and never read.
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut api = loop {
        if let Ok(c) = Client::connect(&socket) {
            break c;
        }
        assert!(Instant::now() < deadline, "no API socket");
        sleep(Duration::from_millis(20));
    };

    // Wait until the 64 KiB pipe is full and bytes are being dropped.
    let first = loop {
        let line = flush(&mut api, &metrics);
        if line["uart"]["missed_write_count"].as_u64().unwrap() > 0 {
            break line;
        }
        assert!(Instant::now() < deadline, "nothing dropped: {line}");
        sleep(Duration::from_millis(100));
    };
    let written = first["uart"]["write_count"].as_u64().unwrap();
    assert!(written <= 1 << 20, "{first}");
    let rss = rss_kib(pid);

    sleep(Duration::from_secs(2));
    // The vCPU went on writing (and the bytes went on being dropped), the
    // API answers, and memory did not grow with the lost output.
    let later = flush(&mut api, &metrics);
    assert!(
        later["vcpu"]["exit_io_out"].as_u64().unwrap() > 1000,
        "{later}"
    );
    assert!(
        later["uart"]["missed_write_count"].as_u64().unwrap() > 1000,
        "{later}"
    );
    assert_eq!(api.get("/").unwrap().status, 200);
    let grown = rss_kib(pid).saturating_sub(rss);
    assert!(grown < 2048, "RSS grew by {grown} KiB");
    assert!(child.try_wait().unwrap().is_none(), "ember exited");

    child.kill().unwrap();
    child.wait().unwrap();
}
