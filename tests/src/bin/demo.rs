//! The README's "boot a VM": a Linux microVM with a shell, or a tiny test
//! guest.
//!
//! ```text
//! cargo run -p ember-tests --bin demo [linux] [-- EMBER_ARGS...]
//! cargo run -p ember-tests --bin demo tiny [GUEST] [-- EMBER_ARGS...]
//! ```
//!
//! `linux` (the default) boots Debian's cloud kernel with a busybox initrd
//! assembled locally (see `ember_tests::tcg`) to an interactive shell on the
//! console; `reboot -f` ends it. Where this host's KVM cannot run a stock
//! kernel at a usable speed (a nested PVM hypervisor, or no VMX/SVM), it says
//! so and runs the same guest under ember inside the TCG test host (QEMU in
//! software emulation with an emulated AMD CPU with SVM).
//!
//! `tiny` writes a Firecracker-style config for GUEST (default `hello`; the
//! guests are built by build.rs) into the temp directory, prints its path,
//! and runs `ember --no-api --config-file CONFIG EMBER_ARGS...` with the
//! terminal as its stdio, exiting with ember's exit code.

use std::env;
use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, ExitCode, ExitStatus};

use ember_tests::{default_config, ember_binary, find_guest, guest_names, merge_patch, tcg};
use serde_json::{json, Value};

fn main() -> ExitCode {
    let mut args = env::args().skip(1).peekable();
    match args.peek().map(String::as_str) {
        Some("tiny") => {
            args.next();
            tiny(args)
        }
        Some("linux") => {
            args.next();
            linux(args)
        }
        None | Some("--") => linux(args),
        Some(other) => {
            eprintln!("demo: unknown mode {other:?}; use `linux` (default) or `tiny [GUEST]`");
            ExitCode::from(2)
        }
    }
}

/// Boots Linux to a shell, directly or inside the TCG test host.
fn linux(args: impl Iterator<Item = String>) -> ExitCode {
    let ember_args: Vec<String> = args.skip_while(|a| a == "--").collect();
    if !tcg::host_kvm_runs_stock_kernels() {
        println!(
            "demo: this host's KVM is a nested PVM hypervisor (or lacks VMX/SVM), where Linux \
             needs minutes to boot: running it under ember inside QEMU's TCG test host instead"
        );
        if !ember_args.is_empty() {
            eprintln!("demo: EMBER_ARGS are not passed into the test host");
        }
        return match tcg::run_shell() {
            Ok(status) => exit_code(status),
            Err(e) => {
                eprintln!("demo: {e}");
                ExitCode::from(1)
            }
        };
    }
    let dir = env::temp_dir().join("ember-demo");
    let files = fs::create_dir_all(&dir)
        .map_err(|e| e.to_string())
        .and_then(|()| tcg::host_assets().map_err(|e| e.to_string()))
        .and_then(|assets| {
            let guest = tcg::build_guest(&dir, &assets).map_err(|e| e.to_string())?;
            Ok((assets, guest))
        });
    let (assets, guest) = match files {
        Ok(files) => files,
        Err(e) => {
            eprintln!("demo: {e}");
            return ExitCode::from(1);
        }
    };
    let mut config = default_config(&assets.guest_kernel.vmlinux);
    merge_patch(
        &mut config,
        &json!({
            "boot-source": {
                "initrd_path": guest.initrd,
                "boot_args": "console=ttyS0 reboot=k panic=1 pci=off ember.scenario=console",
            },
            "machine-config": {"vcpu_count": 2, "mem_size_mib": 256},
        }),
    );
    println!("demo: a shell comes up on the console; `reboot -f` ends the VM");
    run_ember(&dir.join("linux.json"), &config, &ember_args)
}

/// Boots one of the tiny test guests.
fn tiny(mut args: std::iter::Peekable<impl Iterator<Item = String>>) -> ExitCode {
    let guest = match args.peek().map(String::as_str) {
        Some("--") => {
            args.next();
            "hello".to_string()
        }
        Some(name) if !name.starts_with('-') => {
            let name = name.to_string();
            args.next();
            if args.peek().map(String::as_str) == Some("--") {
                args.next();
            }
            name
        }
        _ => "hello".to_string(),
    };
    let ember_args: Vec<String> = args.collect();

    let Some(kernel) = find_guest(&guest) else {
        eprintln!(
            "demo: no guest named {guest:?}; choose one of: {}",
            guest_names().collect::<Vec<_>>().join(", ")
        );
        return ExitCode::from(2);
    };
    let dir = env::temp_dir().join("ember-demo");
    run_ember(
        &dir.join(format!("{guest}.json")),
        &default_config(&kernel),
        &ember_args,
    )
}

/// Writes `config` to `config_path` and runs ember on it with the terminal
/// as its stdio.
fn run_ember(config_path: &Path, config: &Value, ember_args: &[String]) -> ExitCode {
    let written = config_path
        .parent()
        .map_or(Ok(()), fs::create_dir_all)
        .and_then(|()| {
            let text = serde_json::to_string_pretty(config).map_err(std::io::Error::other)?;
            fs::write(config_path, text + "\n")
        });
    if let Err(e) = written {
        eprintln!("demo: cannot write {}: {e}", config_path.display());
        return ExitCode::from(1);
    }

    let ember = ember_binary();
    println!("config: {}", config_path.display());
    let mut shown = format!(
        "{} --no-api --config-file {}",
        ember.display(),
        config_path.display()
    );
    for arg in ember_args {
        shown.push(' ');
        shown.push_str(arg);
    }
    println!("running: {shown}");
    let status = Command::new(&ember)
        .arg("--no-api")
        .arg("--config-file")
        .arg(config_path)
        .args(ember_args)
        .status();
    match status {
        Ok(status) => exit_code(status),
        Err(e) => {
            eprintln!("demo: cannot run {}: {e}", ember.display());
            ExitCode::from(1)
        }
    }
}

/// The exit code of a child, as a shell reports it.
fn exit_code(status: ExitStatus) -> ExitCode {
    match (status.code(), status.signal()) {
        (Some(code), _) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        // Shells report death by signal N as 128 + N.
        (None, Some(sig)) => ExitCode::from(u8::try_from(128 + sig).unwrap_or(1)),
        (None, None) => ExitCode::from(1),
    }
}
