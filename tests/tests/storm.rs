//! Many port-I/O exits in a row: the 16550 scratch register.

use ember_tests::{guest_path, run_guest};
use serde_json::json;

fn storm(count: u64) -> ember_tests::Output {
    let out = run_guest(
        &guest_path("storm"),
        &json!({"boot-source": {"boot_args": format!("console=ttyS0 storm.count={count}")}}),
    )
    .unwrap();
    assert!(out.status.success(), "{out}");
    out
}

#[test]
fn storm_completes_every_write() {
    let out = storm(2000);
    assert!(out.stdout.lines().any(|l| l == "storm done 2000"), "{out}");
}

#[test]
fn storm_count_comes_from_the_command_line() {
    let out = storm(0);
    assert!(out.stdout.lines().any(|l| l == "storm done 0"), "{out}");
}
