//! Guests that break: ember must stop, exit non-zero and say why in one
//! line, never hang.

use std::time::Duration;

use ember_tests::{default_config, guest_path, Launch};

/// Generous: the guests fault within milliseconds of starting.
const LIMIT: Duration = Duration::from_secs(20);

#[test]
fn triple_fault_stops_the_vm_with_one_clear_line() {
    let out = Launch::new(&default_config(&guest_path("fault")))
        .timeout(LIMIT)
        .run()
        .expect("ember must stop by itself on a triple fault");
    assert!(!out.status.success(), "{out}");
    assert!(out.status.code().is_some(), "exit, not a signal: {out}");
    assert!(out.stdout.contains("about to fault\n"), "{out}");
    assert!(!out.stdout.contains("after fault"), "{out}");
    let lines = out.stderr_lines();
    assert_eq!(lines.len(), 1, "one line on stderr\n{out}");
    assert!(
        lines[0].to_lowercase().contains("triple fault"),
        "stderr must name the triple fault\n{out}"
    );
}

/// With IF=0 this host runs guest code through KVM's instruction emulator,
/// which cannot emulate int3: KVM_RUN returns KVM_EXIT_INTERNAL_ERROR with
/// suberror 1 (KVM_INTERNAL_ERROR_EMULATION).
#[test]
fn emulation_failure_names_suberror_rip_and_instruction() {
    let out = Launch::new(&default_config(&guest_path("emulation_failure")))
        .timeout(LIMIT)
        .run()
        .expect("ember must stop by itself on an internal error");
    assert!(!out.status.success(), "{out}");
    assert!(out.stdout.contains("about to int3\n"), "{out}");
    assert!(!out.stdout.contains("after int3"), "{out}");
    let lines = out.stderr_lines();
    assert_eq!(lines.len(), 1, "one line on stderr\n{out}");
    let line = lines[0].to_lowercase();
    assert!(line.contains("internal error"), "{out}");
    assert!(line.contains("suberror 1"), "{out}");
    assert!(line.contains("rip"), "{out}");
    // The faulting instruction is int3, opcode 0xcc.
    assert!(line.contains("cc"), "instruction bytes at RIP\n{out}");
}
