//! Soak benchmark: thousands of VM lifecycles (API set-up with a drive, a
//! TAP when run as root, and vsock; start, pause, resume, Ctrl+Alt+Del,
//! exit), `SOAK_PARALLEL` at a time (default 4), `SOAK_LIFECYCLES` in all
//! (default 2000), for Ember and, when `FIRECRACKER_BIN` names one, for
//! Firecracker in the same run. Prints lifecycles per second, the median
//! and 99th percentile lifecycle, failures, and the host's counts before
//! and after (this process's fds, threads and children, TAPs, bound Unix
//! sockets, RSS, the host's MemAvailable).
//!
//! `cargo bench -p ember-tests --bench soak`

use std::path::PathBuf;

use ember_tests::soak::{self, Soak, SoakReport};
use ember_tests::{ember_binary, guest_path};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let lifecycles = env("SOAK_LIFECYCLES", 2000);
    let parallel = env("SOAK_PARALLEL", 4);
    let mut vmms = vec![("ember".to_string(), ember_binary())];
    match std::env::var_os("FIRECRACKER_BIN").map(PathBuf::from) {
        Some(fc) => vmms.push(("firecracker".to_string(), fc)),
        None => println!("FIRECRACKER_BIN is not set: Ember's figures only"),
    }
    let with_tap = soak::can_create_taps();
    println!(
        "{lifecycles} lifecycles, {parallel} at a time, 1 vCPU 32 MiB ctrl_alt_del guest, drive, vsock{}",
        if with_tap { ", TAP" } else { "" }
    );
    let reports: Vec<(String, SoakReport)> = vmms
        .into_iter()
        .map(|(name, binary)| {
            let report = soak::run(&Soak {
                binary,
                lifecycles,
                parallel,
                with_tap,
                kernel: guest_path("ctrl_alt_del"),
            })
            .expect("soak run");
            (name, report)
        })
        .collect();
    println!(
        "{:<12} {:>6} {:>6} {:>9} {:>9} {:>9} {:>8}",
        "vmm", "ok", "failed", "per s", "p50 ms", "p99 ms", "wall s"
    );
    for (name, r) in &reports {
        println!(
            "{:<12} {:>6} {:>6} {:>9.1} {:>9.1} {:>9.1} {:>8.1}",
            name,
            r.completed,
            r.failures.len(),
            r.per_second(),
            r.percentile_ms(50.0),
            r.percentile_ms(99.0),
            r.wall.as_secs_f64()
        );
    }
    for (name, r) in &reports {
        println!("{name}: before {:?}", r.before);
        println!("{name}: after  {:?}", r.after);
        println!(
            "{name}: leaked nothing: {}; MemAvailable moved {} KiB",
            r.after.leaked_nothing_since(&r.before),
            r.after.mem_available_kib as i64 - r.before.mem_available_kib as i64
        );
        if let Some(f) = r.failures.first() {
            println!("{name}: first failure: {f}");
        }
    }
}
