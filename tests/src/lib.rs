//! End-to-end test harness for the `ember` binary.
//!
//! The tests boot small freestanding guests (C programs in `guests/`, built by
//! `build.rs`) and, for the boot protocol, a real Debian cloud kernel, through
//! the `ember` command line exactly as a Firecracker user would:
//! `ember --no-api --config-file CONFIG.json`. Guests report on the 16550
//! serial port (ember's stdout) and stop the VM through an i8042 reset, which
//! makes ember exit 0. Device guests (`virtio_blk`) do their work in ring 3,
//! where this host runs guest code natively rather than through KVM's
//! instruction emulator (`guests/usermode.h`).
//!
//! ```no_run
//! use ember_tests::{guest_path, run_guest};
//! use serde_json::json;
//!
//! let out = run_guest(&guest_path("hello"), &json!({})).unwrap();
//! assert!(out.status.success(), "{out}");
//! assert!(out.stdout.contains("Hello from the Ember test guest"));
//!
//! // Overrides are a JSON merge patch (RFC 7396) over the default config.
//! let out = run_guest(
//!     &guest_path("storm"),
//!     &json!({"boot-source": {"boot_args": "storm.count=1000"}}),
//! )
//! .unwrap();
//! assert!(out.stdout.contains("storm done 1000"));
//! ```
#![deny(missing_docs)]

pub mod api;
pub mod elf;
pub mod layout;
pub mod linux;
pub mod netns;
pub mod perf;
pub mod soak;
pub mod tcg;
mod vm;

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

pub use vm::{default_config, merge_patch, run_guest, Error, Launch, Output, RunningVm};

/// The median of `v` (the mean of the two middle values for an even
/// count; NaN for none), as every benchmark reports it.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The guest's TSC rate in kHz: the host's, as KVM reports it for a new
/// vCPU. Benchmarks convert the TSC readings guests report with it.
pub fn tsc_khz() -> f64 {
    let kvm = kvm_ioctls::Kvm::new().expect("open /dev/kvm");
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    let vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
    f64::from(vcpu.get_tsc_khz().expect("KVM_GET_TSC_KHZ"))
}

/// Default limit on one VM run: tiny guests finish in well under a second,
/// so hitting this means ember hung.
pub const DEFAULT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

mod generated {
    include!(concat!(env!("OUT_DIR"), "/guests.rs"));
}

/// Names of the test guests built by `build.rs`.
pub fn guest_names() -> impl Iterator<Item = &'static str> {
    generated::GUESTS.iter().map(|(name, _)| *name)
}

/// Path of the test guest `name`, or `None` if there is no such guest.
pub fn find_guest(name: &str) -> Option<PathBuf> {
    generated::GUESTS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, path)| PathBuf::from(path))
}

/// Path of the ELF of test guest `name` (`guests/<name>.c`).
///
/// # Panics
///
/// If no guest of that name exists: a typo in a test, not a runtime condition.
pub fn guest_path(name: &str) -> PathBuf {
    find_guest(name).unwrap_or_else(|| {
        panic!(
            "no test guest named {name:?}; known guests: {:?}",
            guest_names().collect::<Vec<_>>()
        )
    })
}

/// Path of the `ember` binary under test, built on first use.
///
/// `$EMBER_BIN`, when set, names a prebuilt binary to test instead (any
/// Firecracker-compatible VMM works). Otherwise this runs
/// `$CARGO build -p ember --bin ember` once per process, with the profile of
/// the running test or benchmark (`--release` when it lives in
/// `target/release`) and the same target directory, and returns
/// `target/<profile>/ember`.
///
/// # Panics
///
/// If the build fails; the panic message carries cargo's output.
pub fn ember_binary() -> PathBuf {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(build_ember).clone()
}

fn build_ember() -> PathBuf {
    if let Some(bin) = env::var_os("EMBER_BIN") {
        return PathBuf::from(bin);
    }
    let exe = env::current_exe().unwrap_or_else(|e| panic!("cannot locate the test binary: {e}"));
    let profile_dir = profile_dir(&exe)
        .unwrap_or_else(|| panic!("{} is not inside a cargo target directory", exe.display()));
    let target_dir = profile_dir
        .parent()
        .unwrap_or_else(|| panic!("{} has no parent directory", profile_dir.display()));
    let profile = profile_dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("debug");
    // The CARGO variable is set for processes cargo runs (tests, benches,
    // `cargo run`); fall back to the cargo that built this crate, then PATH.
    let cargo = env::var_os("CARGO")
        .or_else(|| option_env!("CARGO").map(Into::into))
        .unwrap_or_else(|| "cargo".into());
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")));

    let mut cmd = Command::new(&cargo);
    cmd.args(["build", "--quiet", "-p", "ember", "--bin", "ember"])
        .arg("--target-dir")
        .arg(target_dir)
        .current_dir(workspace);
    match profile {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "building ember failed ({}): {cmd:?}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let bin = profile_dir.join("ember");
    if !bin.is_file() {
        panic!("cargo built ember but {} does not exist", bin.display());
    }
    bin
}

/// `target/<profile>` for an executable in `target/<profile>/{deps,examples,}`.
fn profile_dir(exe: &Path) -> Option<PathBuf> {
    let dir = exe.parent()?;
    match dir.file_name()?.to_str()? {
        "deps" | "examples" => dir.parent().map(Path::to_path_buf),
        _ => Some(dir.to_path_buf()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_even_and_no_values() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(Vec::new()).is_nan());
    }

    #[test]
    fn every_guest_is_a_static_elf64_linked_at_16_mib() {
        for name in guest_names() {
            let bytes = std::fs::read(guest_path(name)).unwrap();
            let elf = elf::Elf64::parse(&bytes).unwrap();
            assert_eq!(elf.machine, 62, "{name}: e_machine must be EM_X86_64");
            assert_eq!(elf.kind, 2, "{name}: must be ET_EXEC");
            assert_eq!(
                elf.entry, 0x100_0000,
                "{name}: entry must be _start at 16 MiB"
            );
            let loads: Vec<_> = elf.segments.iter().filter(|s| s.kind == 1).collect();
            assert!(!loads.is_empty(), "{name}: no PT_LOAD segment");
            for seg in loads {
                assert_eq!(seg.paddr, seg.vaddr, "{name}: identity-mapped segments");
                assert!(seg.paddr >= 0x100_0000, "{name}: segment below 16 MiB");
                assert!(
                    seg.paddr + seg.memsz < 1 << 30,
                    "{name}: segment above 1 GiB"
                );
            }
            assert!(
                !elf.has_pvh_note(&bytes),
                "{name}: guests use the 64-bit entry"
            );
        }
    }

    #[test]
    fn the_expected_guests_exist() {
        let names: Vec<_> = guest_names().collect();
        for want in [
            "hello",
            "boot_info",
            "storm",
            "fault",
            "emulation_failure",
            "virtio_blk",
            "virtio_net",
            "virtio_vsock",
            "counter",
            "ctrl_alt_del",
            "echo",
        ] {
            assert!(names.contains(&want), "{want} missing from {names:?}");
        }
        assert!(find_guest("no-such-guest").is_none());
    }

    #[test]
    fn profile_dir_strips_deps_and_examples() {
        assert_eq!(
            profile_dir(Path::new("/t/debug/deps/hello-1234")),
            Some(PathBuf::from("/t/debug"))
        );
        assert_eq!(
            profile_dir(Path::new("/t/release/examples/x")),
            Some(PathBuf::from("/t/release"))
        );
        assert_eq!(
            profile_dir(Path::new("/t/release/demo")),
            Some(PathBuf::from("/t/release"))
        );
    }
}
