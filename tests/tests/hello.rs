//! The smallest complete run: boot, print on the serial port, reset.

use std::fs;

use ember_tests::{default_config, guest_path, run_guest, Launch};
use serde_json::json;

const GREETING: &str = "Hello from the Ember test guest";

#[test]
fn hello_prints_and_exits_zero_on_i8042_reset() {
    let out = run_guest(&guest_path("hello"), &json!({})).unwrap();
    assert!(out.status.success(), "{out}");
    // The serial output reaches stdout byte for byte, exactly once.
    assert_eq!(
        out.stdout.lines().filter(|l| *l == GREETING).count(),
        1,
        "{out}"
    );
    assert!(out.stdout.contains(&format!("{GREETING}\n")), "{out}");
}

#[test]
fn hello_boots_with_firecracker_flags() {
    let dir = std::env::temp_dir().join(format!("ember-hello-log-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    let log = dir.join("ember.log");
    // Firecracker expects the log file (or FIFO) to exist already.
    fs::write(&log, "").unwrap();
    let out = Launch::new(&default_config(&guest_path("hello")))
        .arg("--id")
        .arg("hello-vm-1")
        .arg("--level")
        .arg("Debug")
        .arg("--log-path")
        .arg(&log)
        .arg("--boot-timer")
        .run()
        .unwrap();
    let logged = fs::read_to_string(&log).unwrap_or_default();
    let _ = fs::remove_dir_all(&dir);
    assert!(out.status.success(), "{out}\n--- log ---\n{logged}");
    assert!(out.stdout.contains(GREETING), "{out}");
    // Debug logging went to the file, not to the guest console.
    assert!(!logged.trim().is_empty(), "nothing logged at Debug level");
    assert!(
        logged.contains("hello-vm-1"),
        "log lines carry the instance id:\n{logged}"
    );
    assert!(!out.stdout.contains("hello-vm-1"), "{out}");
}

#[test]
fn hello_boots_with_two_vcpus() {
    let out = run_guest(
        &guest_path("hello"),
        &json!({"machine-config": {"vcpu_count": 2}}),
    )
    .unwrap();
    assert!(out.status.success(), "{out}");
    assert!(out.stdout.contains(GREETING), "{out}");
}
