//! The command line as Firecracker's tools use it: the version and start
//! line under each name the binary answers to, and every Firecracker flag
//! either served or refused by name.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ember_tests::{default_config, ember_binary, guest_path, Launch};

const GREETING: &str = "Hello from the Ember test guest";

/// `ember` under another name: a symbolic link in a fresh directory.
fn linked_as(dir: &Path, name: &str) -> PathBuf {
    let link = dir.join(name);
    std::os::unix::fs::symlink(ember_binary(), &link).unwrap();
    link
}

fn run(binary: &Path, args: &[&str]) -> Output {
    Command::new(binary).args(args).output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn version_under_the_name_firecracker_is_firecrackers() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["firecracker", "firecracker-v1.17.0-x86_64"] {
        let out = run(&linked_as(dir.path(), name), &["--version"]);
        assert!(out.status.success(), "{out:?}");
        // Firecracker's main.rs: println!("Firecracker v{}\n", ...).
        assert_eq!(text(&out.stdout), "Firecracker v1.17.0\n\n", "{name}");
        assert!(out.stderr.is_empty(), "{out:?}");
    }
}

#[test]
fn version_under_its_own_name_is_embers() {
    let out = run(&ember_binary(), &["--version"]);
    assert!(out.status.success(), "{out:?}");
    let stdout = text(&out.stdout);
    assert!(
        stdout.starts_with(&format!("Ember v{}", env!("CARGO_PKG_VERSION"))),
        "{stdout}"
    );
    assert!(!stdout.starts_with("Firecracker"), "{stdout}");
}

/// Boots the hello guest with `binary`, logging at Info to a file; returns
/// the log.
fn start_log(binary: &Path) -> String {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("vmm.log");
    fs::write(&log, "").unwrap();
    let out = Launch::new(&default_config(&guest_path("hello")))
        .binary(binary)
        .arg("--level")
        .arg("Info")
        .arg("--log-path")
        .arg(&log)
        .run()
        .unwrap();
    assert!(out.status.success(), "{out}");
    assert!(out.stdout.contains(GREETING), "{out}");
    fs::read_to_string(&log).unwrap()
}

#[test]
fn the_start_line_names_firecracker_under_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let log = start_log(&linked_as(dir.path(), "firecracker"));
    assert!(log.contains("Running Firecracker v1.17.0\n"), "{log}");
    assert!(!log.contains("Running Ember"), "{log}");
    // The last line, which Firecracker's test framework reads the exit
    // status from.
    assert!(
        log.trim_end()
            .ends_with("Firecracker exiting successfully. exit_code=0"),
        "{log}"
    );
}

#[test]
fn a_failure_is_logged_with_its_exit_status_under_either_name() {
    let dir = tempfile::tempdir().unwrap();
    for (binary, name) in [
        (linked_as(dir.path(), "firecracker"), "Firecracker"),
        (ember_binary(), "Ember"),
    ] {
        let log = dir.path().join(format!("{name}.log"));
        fs::write(&log, "").unwrap();
        let out = Launch::new(&default_config(Path::new("/nonexistent/vmlinux")))
            .binary(&binary)
            .arg("--log-path")
            .arg(&log)
            .run()
            .unwrap();
        assert_eq!(out.status.code(), Some(152), "{out}");
        let log = fs::read_to_string(&log).unwrap();
        assert!(
            log.trim_end()
                .ends_with(&format!("{name} exiting with error. exit_code=152")),
            "{log}"
        );
    }
}

#[test]
fn the_start_line_names_ember_under_its_own_name() {
    let log = start_log(&ember_binary());
    assert!(
        log.contains(&format!("Running Ember v{}\n", env!("CARGO_PKG_VERSION"))),
        "{log}"
    );
    assert!(
        log.trim_end()
            .ends_with("Ember exiting successfully. exit_code=0"),
        "{log}"
    );
}

/// Runs the binary with `args` and checks it refused them as Firecracker
/// refuses a bad command line: status 153, one stderr line naming `needles`,
/// nothing started.
fn assert_refused(args: &[&str], needles: &[&str]) {
    let out = run(&ember_binary(), args);
    assert_eq!(out.status.code(), Some(153), "{args:?}: {out:?}");
    let stderr = text(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
    assert!(!stderr.contains("unexpected argument"), "{stderr}");
    assert!(out.stdout.is_empty(), "{out:?}");
}

#[test]
fn enable_pci_is_refused_naming_virtio_mmio() {
    assert_refused(&["--enable-pci"], &["--enable-pci", "PCI", "virtio-mmio"]);
}

#[test]
fn no_seccomp_with_a_filter_file_is_an_argument_error() {
    assert_refused(
        &["--no-seccomp", "--seccomp-filter", "/srv/filter.bpf"],
        &["--no-seccomp", "--seccomp-filter"],
    );
}

#[test]
fn every_firecracker_flag_is_known() {
    // Firecracker's own flags (its main.rs), each with a value where it
    // takes one; `--version` makes the binary stop once the line is parsed.
    // `--snapshot-version` and `--describe-snapshot` go with snapshots and
    // are not covered here.
    let flags: &[&[&str]] = &[
        &["--api-sock", "/tmp/unused.sock"],
        &["--id", "vm-1"],
        &["--seccomp-filter", "/srv/filter.bpf"],
        &["--no-seccomp"],
        &["--start-time-us", "1"],
        &["--start-time-cpu-us", "1"],
        &["--parent-cpu-time-us", "1"],
        &["--config-file", "/srv/vm.json"],
        &["--metadata", "/srv/metadata.json"],
        &["--no-api"],
        &["--log-path", "/srv/vmm.log"],
        &["--level", "Info"],
        &["--module", "ember"],
        &["--show-level"],
        &["--show-log-origin"],
        &["--metrics-path", "/srv/metrics"],
        &["--boot-timer"],
        &["--http-api-max-payload-size", "102400"],
        &["--mmds-size-limit", "102400"],
        &["--enable-pci"],
        &["--help"],
    ];
    for flag in flags {
        let mut args = vec!["--version"];
        args.extend_from_slice(flag);
        let out = run(&ember_binary(), &args);
        assert!(out.status.success(), "{flag:?}: {out:?}");
    }
}

#[test]
fn metadata_fills_the_store_within_the_mmds_size_limit() {
    let dir = tempfile::tempdir().unwrap();
    let metadata = dir.path().join("metadata.json");
    fs::write(
        &metadata,
        r#"{"latest": {"meta-data": {"instance-id": "i-0123456789abcdef"}}}"#,
    )
    .unwrap();
    let launch = |limit: &str| {
        Launch::new(&default_config(&guest_path("hello")))
            .arg("--metadata")
            .arg(&metadata)
            .arg("--mmds-size-limit")
            .arg(limit)
            .run()
            .unwrap()
    };
    // The serialized store is 61 bytes.
    let out = launch("60");
    assert_eq!(out.status.code(), Some(152), "{out}");
    assert!(
        out.stderr.contains("The MMDS patch request doesn't fit."),
        "{out}"
    );
    let out = launch("61");
    assert!(out.status.success(), "{out}");
}

#[test]
fn metadata_that_is_not_json_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let metadata = dir.path().join("metadata.json");
    fs::write(&metadata, "{not json").unwrap();
    let out = Launch::new(&default_config(&guest_path("hello")))
        .arg("--metadata")
        .arg(&metadata)
        .run()
        .unwrap();
    assert_eq!(out.status.code(), Some(152), "{out}");
    assert!(out.stderr.contains("not valid json"), "{out}");
}
