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
    // "triple fault", "triple-faulted", ...
    assert!(
        lines[0]
            .to_lowercase()
            .replace('-', " ")
            .contains("triple fault"),
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
    assert!(out.status.code().is_some(), "exit, not a signal: {out}");
    // The guest prints where its int3 is: "about to int3 at 0x...".
    let rip = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("about to int3 at "))
        .unwrap_or_else(|| panic!("guest did not report its int3 address\n{out}"))
        .to_string();
    assert!(!out.stdout.contains("after int3"), "{out}");
    let lines = out.stderr_lines();
    assert_eq!(lines.len(), 1, "one line on stderr\n{out}");
    let line = lines[0].to_lowercase();
    assert!(line.contains("internal error"), "{out}");
    assert!(line.contains("suberror 1"), "{out}");
    assert!(line.contains("rip"), "{out}");
    assert!(line.contains(&rip), "stderr must give RIP {rip}\n{out}");
    // The instruction bytes at RIP start with int3's opcode, 0xcc.
    let tokens: Vec<&str> = line
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|t| !t.is_empty())
        .collect();
    assert!(
        tokens
            .windows(2)
            .any(|w| w[1] == "cc" && !w[0].starts_with("0x")),
        "instruction bytes at RIP must start with cc\n{out}"
    );
}
