//! Host stdin reaches the guest through the UART: the VMM's event loop
//! reads stdin and feeds the 16550A's receive FIFO, waiting for the guest to
//! drain it when more than a FIFO's worth is pending.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ember_tests::{default_config, ember_binary, guest_path};

#[test]
fn stdin_lines_reach_the_guest_and_come_back() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("echo.json");
    std::fs::write(&config, default_config(&guest_path("echo")).to_string()).unwrap();
    let mut child = Command::new(ember_binary())
        .args(["--no-api", "--config-file"])
        .arg(&config)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // More than the 64-byte receive FIFO in one write: the rest must wait
    // in the VMM until the guest drains the FIFO, and nothing may be lost.
    let long = "x".repeat(100);
    let input = format!("hello\n{long}\nquit\n");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if start.elapsed() > Duration::from_secs(60) {
            child.kill().unwrap();
            panic!("the echo guest did not finish");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout: {stdout}\nstderr: {stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines,
        ["echo ready", "echo: hello", &format!("echo: {long}")],
        "stderr: {stderr}"
    );
}
