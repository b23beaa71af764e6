//! Builds the freestanding test guests in `guests/` with the host gcc and
//! records their paths for `ember_tests::guest_path`.
//!
//! Each guest is one C file linked with `start.S` and `lib.c` at 16 MiB by
//! `link.ld`, producing a static ELF64 the VMM enters through the 64-bit
//! Linux boot protocol entry.

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The guests, one `guests/<name>.c` each.
const GUESTS: &[&str] = &[
    "hello",
    "boot_info",
    "storm",
    "fault",
    "emulation_failure",
    "virtio_blk",
    "virtio_net",
    "virtio_mmds",
    "virtio_vsock",
    "virtio_rng",
    "virtio_balloon",
    "counter",
    "ctrl_alt_del",
    "echo",
    "cpuid",
];

/// Sources every guest links against.
const COMMON_SOURCES: &[&str] = &["start.S", "lib.c"];

/// Sources of the virtio guests (`virtio_*`): the ring-3 runtime (on this
/// host only CPL 3 code runs natively) and the virtio-mmio driver. Other
/// guests leave them out so that their boot stays as small as before.
const VIRTIO_SOURCES: &[&str] = &["usermode.S", "usermode.c", "virtio.c"];

/// Extra sources guest `name` links against.
fn extra_sources(name: &str) -> &'static [&'static str] {
    if name.starts_with("virtio_") {
        VIRTIO_SOURCES
    } else {
        &[]
    }
}

/// Flags for code that runs with no OS, no SSE state and possibly with IF=0
/// inside KVM's instruction emulator: general-purpose registers only,
/// absolute addressing, no red zone (no interrupt stack switch in the guest).
const CFLAGS: &[&str] = &[
    "-ffreestanding",
    "-mgeneral-regs-only",
    "-nostdlib",
    "-static",
    "-fno-pic",
    "-no-pie",
    "-fno-stack-protector",
    "-mno-red-zone",
    "-fno-asynchronous-unwind-tables",
    "-O2",
    "-Wall",
    "-Werror",
    "-Wl,--build-id=none",
    // No page alignment of segments: the guest is loaded by the VMM, not mmapped.
    "-Wl,-n",
];

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let src = manifest_dir.join("guests");
    let cc = env::var("EMBER_GUEST_CC").unwrap_or_else(|_| "gcc".to_string());

    println!("cargo:rerun-if-env-changed=EMBER_GUEST_CC");
    println!("cargo:rerun-if-changed={}", src.display());
    for entry in fs::read_dir(&src).unwrap_or_else(|e| panic!("cannot read {}: {e}", src.display()))
    {
        let path = entry.expect("readable guests/ entry").path();
        println!("cargo:rerun-if-changed={}", path.display());
    }

    check_compiler(&cc);

    let mut generated =
        String::from("/// Test guests built by build.rs: (name, path of the ELF).\n");
    generated.push_str("pub const GUESTS: &[(&str, &str)] = &[\n");
    for name in GUESTS {
        let elf = out_dir.join(format!("{name}.elf"));
        build_guest(&cc, &src, name, &elf);
        writeln!(
            generated,
            "    ({name:?}, {:?}),",
            elf.display().to_string()
        )
        .expect("write to String");
    }
    generated.push_str("];\n");
    fs::write(out_dir.join("guests.rs"), generated).expect("write guests.rs to OUT_DIR");
}

/// Fails the build with an actionable message when the C compiler is absent.
fn check_compiler(cc: &str) {
    match Command::new(cc).arg("--version").output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!(
            "`{cc} --version` failed ({}): the Ember test guests need gcc; \
             install it (apt-get install gcc) or set EMBER_GUEST_CC",
            out.status
        ),
        Err(e) => panic!(
            "cannot run `{cc}` ({e}): the Ember test guests are freestanding C built with gcc; \
             install it (apt-get install gcc) or set EMBER_GUEST_CC"
        ),
    }
}

fn build_guest(cc: &str, src: &Path, name: &str, elf: &Path) {
    let mut cmd = Command::new(cc);
    cmd.args(CFLAGS)
        .arg(format!("-Wl,-T,{}", src.join("link.ld").display()))
        .arg("-o")
        .arg(elf);
    for file in COMMON_SOURCES.iter().chain(extra_sources(name)) {
        cmd.arg(src.join(file));
    }
    cmd.arg(src.join(format!("{name}.c")));
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cc} for guest {name}: {e}"));
    if !out.status.success() {
        panic!(
            "building test guest {name} failed ({}):\n{:?}\n{}{}",
            out.status,
            cmd,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Warnings are errors (-Werror), but the linker only warns: surface them.
    let stderr = String::from_utf8_lossy(&out.stderr);
    for line in stderr.lines() {
        println!("cargo:warning=guest {name}: {line}");
    }
}
