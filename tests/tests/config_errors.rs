//! Bad configurations and kernels: ember refuses them with a non-zero exit
//! and one stderr line naming the problem, before running anything.

use std::fs;
use std::path::PathBuf;

use ember_tests::{default_config, guest_path, merge_patch, run_guest, Launch, Output};
use serde_json::json;

fn assert_refused(out: &Output, needles: &[&str]) {
    assert!(!out.status.success(), "{out}");
    assert!(out.status.code().is_some(), "exit, not a signal: {out}");
    assert!(out.stdout.is_empty(), "nothing may boot\n{out}");
    let lines = out.stderr_lines();
    assert_eq!(lines.len(), 1, "one line on stderr\n{out}");
    for needle in needles {
        assert!(
            lines[0].contains(needle),
            "stderr must mention {needle:?}\n{out}"
        );
    }
}

#[test]
fn unknown_field_is_rejected_by_name() {
    let out = run_guest(
        &guest_path("hello"),
        &json!({"machine-config": {"mem_size_mb": 128}}),
    )
    .unwrap();
    assert_refused(&out, &["mem_size_mb"]);
}

#[test]
fn unknown_section_is_ignored_with_a_warning_naming_it() {
    // Firecracker ignores a top-level key it does not know; Ember says so.
    let out = run_guest(
        &guest_path("hello"),
        &json!({"boot-sauce": {}, "serial": {"serial_out_path": "/nonexistent"}}),
    )
    .unwrap();
    assert!(out.status.success(), "{out}");
    assert!(
        out.stdout.contains("Hello from the Ember test guest"),
        "{out}"
    );
    for key in ["boot-sauce", "serial"] {
        let warnings: Vec<&str> = out
            .stderr_lines()
            .into_iter()
            .filter(|l| l.contains(&format!("unknown top-level key `{key}` ignored")))
            .collect();
        assert_eq!(warnings.len(), 1, "{out}");
    }
}

#[test]
fn every_firecracker_section_is_accepted_empty() {
    let config = json!({
        "boot-source": {"kernel_image_path": guest_path("hello"), "initrd_path": null, "boot_args": null},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 128, "smt": false},
        "drives": [], "network-interfaces": [], "vsock": null, "logger": null, "metrics": null,
        "balloon": null, "cpu-config": null, "mmds-config": null, "entropy": null,
        "pmem": [], "memory-hotplug": null,
    });
    let out = Launch::from_text(config.to_string()).run().unwrap();
    assert!(out.status.success(), "{out}");
    assert!(
        out.stdout.contains("Hello from the Ember test guest"),
        "{out}"
    );
    assert!(!out.stderr.contains("unknown"), "{out}");
}

#[test]
fn a_section_for_a_device_ember_lacks_is_refused_by_name() {
    for (section, body) in [
        (
            "pmem",
            json!([{"id": "p0", "path_on_host": "/p", "root_device": false}]),
        ),
        ("memory-hotplug", json!({"total_size_mib": 1024})),
    ] {
        let out = run_guest(&guest_path("hello"), &json!({ section: body })).unwrap();
        assert_refused(&out, &[&format!("`{section}`"), "not supported"]);
    }
}

#[test]
fn wrong_type_is_rejected_with_the_offending_value() {
    let out = run_guest(
        &guest_path("hello"),
        &json!({"machine-config": {"vcpu_count": "two"}}),
    )
    .unwrap();
    assert_refused(&out, &["\"two\""]);
}

#[test]
fn invalid_json_is_rejected() {
    let out = Launch::from_text("{\"boot-source\": ").run().unwrap();
    assert!(!out.status.success(), "{out}");
    assert_eq!(out.stderr_lines().len(), 1, "{out}");
}

#[test]
fn missing_kernel_file_is_named() {
    let missing = "/nonexistent/ember-tests/vmlinux";
    let out = Launch::new(&default_config(std::path::Path::new(missing)))
        .run()
        .unwrap();
    assert_refused(&out, &[missing]);
}

#[test]
fn missing_boot_source_is_rejected() {
    let mut config = default_config(&guest_path("hello"));
    merge_patch(&mut config, &json!({"boot-source": null}));
    let out = Launch::new(&config).run().unwrap();
    assert_refused(&out, &["boot-source"]);
}

#[test]
fn not_a_kernel_is_rejected() {
    let dir = std::env::temp_dir().join(format!("ember-not-a-kernel-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    let kernel: PathBuf = dir.join("kernel.txt");
    fs::write(
        &kernel,
        "this is a text file, not an ELF or a bzImage\n".repeat(64),
    )
    .unwrap();
    let out = Launch::new(&default_config(&kernel)).run().unwrap();
    let _ = fs::remove_dir_all(&dir);
    assert!(!out.status.success(), "{out}");
    assert!(out.stdout.is_empty(), "{out}");
    assert_eq!(out.stderr_lines().len(), 1, "one line on stderr\n{out}");
    assert!(
        out.stderr.to_lowercase().contains("kernel"),
        "stderr must say the kernel is the problem\n{out}"
    );
}
