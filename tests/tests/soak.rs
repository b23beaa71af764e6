//! A short soak: VM lifecycles (API set-up with a drive, a TAP and vsock,
//! start, pause, resume, Ctrl+Alt+Del, exit) four at a time, and nothing
//! left behind: this process's file descriptors, threads and children, the
//! TAPs and bound sockets the VMs had. `tests/benches/soak.rs` runs
//! thousands, beside Firecracker.

use ember_tests::soak::{self, Soak};
use ember_tests::{ember_binary, guest_path};

#[test]
fn lifecycles_run_clean_and_leave_nothing_behind() {
    let soak = Soak {
        binary: ember_binary(),
        lifecycles: 24,
        parallel: 4,
        with_tap: soak::can_create_taps(),
        kernel: guest_path("ctrl_alt_del"),
    };
    let report = soak::run(&soak).unwrap();
    assert!(
        report.failures.is_empty(),
        "{} of {} lifecycles failed; the first:\n{}",
        report.failures.len(),
        soak.lifecycles,
        report.failures[0]
    );
    assert_eq!(report.completed, soak.lifecycles);
    assert!(
        report.after.leaked_nothing_since(&report.before),
        "before {:?}\nafter  {:?}",
        report.before,
        report.after
    );
    eprintln!(
        "{} lifecycles in {:?} ({:.1}/s), median {:.1} ms, TAPs {}",
        report.completed,
        report.wall,
        report.per_second(),
        report.percentile_ms(50.0),
        soak.with_tap
    );
}
