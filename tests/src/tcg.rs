//! Real Linux under ember, inside a host with hardware-virtualization
//! semantics: QEMU in software emulation (TCG) with an emulated AMD CPU.
//!
//! The machines Ember is developed on run KVM as a nested PVM hypervisor,
//! where a stock Linux kernel never reaches init. QEMU's `-accel tcg -cpu
//! max` shows its guest an AMD CPU with SVM and nested paging, so Debian's
//! generic kernel loads `kvm-amd` there and gets a real `/dev/kvm`. This
//! module builds that test host and runs Linux scenarios in it:
//!
//! - the outer VM: Debian's generic kernel (`linux-image-*-amd64`) and an
//!   initramfs with busybox, the kvm modules, the `ember` binary under test
//!   with its shared libraries, socat and debugfs (and the programs of
//!   [`HostOptions`], such as a Firecracker binary for the `bench`
//!   scenario), and `tcg/outer-init.sh` as `/init`;
//! - the inner guest ember boots: Debian's cloud kernel (PVH vmlinux, see
//!   [`crate::linux`]), an initrd holding busybox, socat and the cloud
//!   kernel's virtio modules with `tcg/guest-init.sh` as `/init`, the same
//!   tree as an ext4 root filesystem, a second (read-only) drive and a
//!   third one to trim.
//!
//! The outer `/init` runs every scenario named on its command line in one
//! boot and prints each inner console and the facts it measured on the
//! serial port ([`Report`] parses them), then powers off. Downloads are
//! cached with [`crate::linux::cache_dir`].
//!
//! ```no_run
//! let report = ember_tests::tcg::run_scenarios(&["boot"], std::time::Duration::from_secs(600))
//!     .unwrap();
//! let boot = report.scenario("boot").unwrap();
//! assert_eq!(boot.fact("ember-rc"), Some("0"), "{report}");
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::env;
use std::fmt;
use std::fs;
use std::io::{self, BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use crate::ember_binary;
use crate::linux::{self, debian_cloud_kernel, image_package, package_files, FetchError};
use crate::vm::TempDir;

/// `/init` of the outer VM.
const OUTER_INIT: &str = include_str!("../tcg/outer-init.sh");
/// `/init` of the inner guest.
const GUEST_INIT: &str = include_str!("../tcg/guest-init.sh");

/// Modules of the generic kernel the outer VM loads, dependencies first:
/// `kvm` needs `irqbypass`, `kvm-amd` needs `kvm` and `ccp`; `tun` gives
/// ember its TAP device.
const OUTER_MODULES: [&str; 5] = ["irqbypass.ko", "kvm.ko", "ccp.ko", "kvm-amd.ko", "tun.ko"];

/// Modules of the cloud kernel the inner guest loads (`guest-init.sh`).
const GUEST_MODULES: [&str; 12] = [
    "virtio_ring.ko",
    "virtio.ko",
    "virtio_mmio.ko",
    "virtio_blk.ko",
    "failover.ko",
    "net_failover.ko",
    "virtio_net.ko",
    "vsock.ko",
    "vmw_vsock_virtio_transport_common.ko",
    "vmw_vsock_virtio_transport.ko",
    "virtio_balloon.ko",
    "virtio-rng.ko",
];

/// Memory of the outer VM: the initramfs, the guest images it copies and
/// one 256 MiB guest at a time.
const OUTER_MEM_MIB: u32 = 2048;

/// Prefix of an outer-VM protocol line (`tcg/outer-init.sh`).
const PROTOCOL: &str = "@@ember ";
/// Prefix of a line of an inner guest's console.
const INNER: &str = "@| ";
/// Prefix of a result line printed by the inner guest (`tcg/guest-init.sh`).
const GUEST: &str = "ember-guest: ";

/// Errors from building or running the TCG test host.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A kernel package could not be fetched.
    #[error(transparent)]
    Fetch(#[from] FetchError),
    /// A host tool the test host needs is not installed.
    #[error("`{tool}` is not installed (Debian package {package}); run tests/install-deps.sh")]
    ToolMissing {
        /// The command looked for.
        tool: &'static str,
        /// The Debian package that provides it.
        package: &'static str,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A tool ran and failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// Its standard error.
        stderr: String,
    },
    /// QEMU could not be started.
    #[error("cannot start qemu-system-x86_64: {0}")]
    Spawn(#[source] io::Error),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Every scenario `tcg/outer-init.sh` knows, in the order one boot runs them.
/// (`bench` and `shell` are run on their own: see [`run_scenarios_with`] and
/// [`run_shell`].)
pub const SCENARIOS: [&str; 5] = ["boot", "smp4", "devices", "services", "console"];

/// What a boot of the test host adds to the default one.
#[derive(Debug, Clone, Default)]
pub struct HostOptions {
    /// Dynamic executables to copy into the outer VM, each with the shared
    /// libraries `ldd` names: (path here, absolute path in the outer VM).
    pub programs: Vec<(PathBuf, String)>,
    /// Words appended to the outer kernel's command line, read by the outer
    /// `/init` (e.g. `ember.bench.runs=5`).
    pub cmdline: Vec<String>,
}

/// What one scenario printed and measured.
#[derive(Debug, Clone, Default)]
pub struct Scenario {
    /// The scenario's name.
    pub name: String,
    /// The inner guest's console (ember's stdout), line by line.
    pub console: Vec<String>,
    /// Ember's standard error, line by line.
    pub stderr: Vec<String>,
    /// Facts the outer VM measured (`@@ember fact NAME KEY VALUE`).
    pub facts: BTreeMap<String, String>,
    /// Whether the outer VM reported the scenario's end.
    pub finished: bool,
}

impl Scenario {
    /// Whether ember stopped because a vCPU of the guest triple-faulted.
    pub fn triple_faulted(&self) -> bool {
        self.stderr
            .iter()
            .any(|l| l.contains("triple-faulted (KVM_EXIT_SHUTDOWN)"))
    }

    /// A fact the outer VM measured, such as `ember-rc`.
    pub fn fact(&self, key: &str) -> Option<&str> {
        self.facts.get(key).map(String::as_str)
    }

    /// The last value the guest printed for `key` in an
    /// `ember-guest: key=value` line.
    pub fn guest(&self, key: &str) -> Option<&str> {
        self.guest_values(key).last().copied()
    }

    /// Every value the guest printed for `key`, in order.
    pub fn guest_values(&self, key: &str) -> Vec<&str> {
        self.console
            .iter()
            .filter_map(|line| line.split_once(GUEST).map(|(_, rest)| rest))
            .flat_map(str::split_whitespace)
            .filter_map(|word| word.split_once('='))
            .filter(|(k, _)| *k == key)
            .map(|(_, v)| v)
            .collect()
    }

    /// The kernel timestamp (seconds) of the first console line containing
    /// `text` that carries one (`[    1.234567] ...`).
    pub fn kernel_time(&self, text: &str) -> Option<f64> {
        self.console
            .iter()
            .filter(|l| l.contains(text))
            .find_map(|l| kernel_timestamp(l))
    }
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "--- scenario {} (finished: {})",
            self.name, self.finished
        )?;
        for (k, v) in &self.facts {
            writeln!(f, "fact {k} = {v}")?;
        }
        writeln!(f, "--- ember stderr")?;
        for line in &self.stderr {
            writeln!(f, "{line}")?;
        }
        writeln!(f, "--- guest console")?;
        for line in &self.console {
            writeln!(f, "{line}")?;
        }
        Ok(())
    }
}

/// The timestamp of a kernel log line, `[ seconds.micros] message`.
pub fn kernel_timestamp(line: &str) -> Option<f64> {
    let rest = line.trim_start().strip_prefix('[')?;
    let (stamp, _) = rest.split_once(']')?;
    stamp.trim().parse().ok()
}

/// Everything the test host printed: one boot's, or several boots' joined
/// by [`Report::merge`].
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// The outer VM's whole console, and the harness's own `harness:` lines
    /// (how QEMU exited, why it was stopped, where a boot begins).
    pub console: Vec<String>,
    /// Facts about the outer VM itself (`@@ember fact host KEY VALUE`).
    pub host: BTreeMap<String, String>,
    /// The scenarios, by name.
    pub scenarios: BTreeMap<String, Scenario>,
    /// Whether the outer VM reported that it ran every scenario (for a
    /// merged report: every requested scenario finished in some boot).
    pub complete: bool,
    /// Wall time from starting QEMU to its exit (all boots).
    pub wall: Duration,
    /// Seconds from starting QEMU to the outer `/init`'s first fact (the
    /// first boot).
    pub outer_boot: Option<Duration>,
}

impl Report {
    /// Parses the outer VM's console.
    pub fn parse(console: &[String]) -> Report {
        let mut report = Report {
            console: console.to_vec(),
            ..Report::default()
        };
        let mut current: Option<String> = None;
        for line in console {
            if let Some(text) = line.strip_prefix(INNER) {
                if let Some(s) = current.as_ref().and_then(|n| report.scenarios.get_mut(n)) {
                    s.console.push(text.to_string());
                }
                continue;
            }
            let Some(rest) = line.strip_prefix(PROTOCOL) else {
                continue;
            };
            let mut words = rest.splitn(4, ' ');
            match (words.next(), words.next(), words.next(), words.next()) {
                (Some("begin"), Some(name), _, _) => {
                    let name = name.trim().to_string();
                    report.scenarios.insert(
                        name.clone(),
                        Scenario {
                            name: name.clone(),
                            ..Scenario::default()
                        },
                    );
                    current = Some(name);
                }
                (Some("end"), Some(name), _, _) => {
                    if let Some(s) = report.scenarios.get_mut(name.trim()) {
                        s.finished = true;
                    }
                    current = None;
                }
                (Some("fact"), Some("host"), Some(key), value) => {
                    report
                        .host
                        .insert(key.to_string(), value.unwrap_or("").trim().to_string());
                }
                (Some("fact"), Some(name), Some(key), value) => {
                    if let Some(s) = report.scenarios.get_mut(name) {
                        s.facts
                            .insert(key.to_string(), value.unwrap_or("").trim().to_string());
                    }
                }
                (Some("stderr"), _, _, _) => {
                    if let Some(s) = current.as_ref().and_then(|n| report.scenarios.get_mut(n)) {
                        s.stderr
                            .push(rest.strip_prefix("stderr ").unwrap_or("").to_string());
                    }
                }
                (Some("all-done"), _, _, _) => report.complete = true,
                _ => {}
            }
        }
        report
    }

    /// The scenario `name`, if the outer VM began it.
    pub fn scenario(&self, name: &str) -> Option<&Scenario> {
        self.scenarios.get(name)
    }

    /// One report from the boots of the test host that ran `requested`, in
    /// order: each scenario as its last boot to finish it saw it (else as
    /// the last boot that began it), the consoles one after the other, and
    /// `complete` when every requested scenario finished.
    pub fn merge(requested: &[&str], boots: Vec<Report>) -> Report {
        let mut merged = Report::default();
        let count = boots.len();
        for (i, boot) in boots.into_iter().enumerate() {
            if count > 1 {
                merged.console.push(format!(
                    "harness: boot {} of {count} of the test host",
                    i + 1
                ));
            }
            merged.console.extend(boot.console);
            merged.host.extend(boot.host);
            merged.outer_boot = merged.outer_boot.or(boot.outer_boot);
            merged.wall += boot.wall;
            for (name, scenario) in boot.scenarios {
                let keep = merged.scenarios.get(&name).is_some_and(|s| s.finished);
                if !keep {
                    merged.scenarios.insert(name, scenario);
                }
            }
        }
        merged.complete = requested
            .iter()
            .all(|name| merged.scenario(name).is_some_and(|s| s.finished));
        merged
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "=== TCG test host: complete {}, wall {:?}, outer boot {:?}",
            self.complete, self.wall, self.outer_boot
        )?;
        writeln!(f, "=== outer console")?;
        for line in &self.console {
            writeln!(f, "{line}")?;
        }
        Ok(())
    }
}

/// The Debian packages and files the test host is built from.
#[derive(Debug, Clone)]
pub struct HostAssets {
    /// The generic kernel's package, e.g. `linux-image-6.1.0-57-amd64`.
    pub outer_package: String,
    /// Its bzImage.
    pub outer_kernel: PathBuf,
    /// Its modules, in [`OUTER_MODULES`] order.
    pub outer_modules: Vec<PathBuf>,
    /// The cloud kernel the inner guest runs.
    pub guest_kernel: linux::Kernel,
    /// The cloud kernel's modules, in [`GUEST_MODULES`] order.
    pub guest_modules: Vec<PathBuf>,
}

/// Fetches (or finds in the cache) both kernels and their modules.
pub fn host_assets() -> Result<HostAssets, Error> {
    let outer_package = match env::var_os("EMBER_HOST_LINUX_PACKAGE") {
        Some(p) => p.to_string_lossy().into_owned(),
        None => image_package("linux-image-amd64", "-amd64")?,
    };
    let mut names = vec!["vmlinuz-*"];
    names.extend(OUTER_MODULES);
    let mut outer = package_files(&outer_package, &names)?;
    let outer_kernel = outer.remove(0);
    let guest_kernel = debian_cloud_kernel()?;
    let guest_modules = package_files(&guest_kernel.package, &GUEST_MODULES)?;
    Ok(HostAssets {
        outer_package,
        outer_kernel,
        outer_modules: outer,
        guest_kernel,
        guest_modules,
    })
}

/// Path of `tool` in `PATH` or the sbin directories, if installed.
fn find_tool(tool: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH").unwrap_or_default();
    env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file())
}

fn require(tool: &'static str, package: &'static str) -> Result<PathBuf, Error> {
    find_tool(tool).ok_or(Error::ToolMissing { tool, package })
}

fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

fn run(cmd: &mut Command) -> Result<Vec<u8>, Error> {
    let out = cmd.output().map_err(|source| Error::Io {
        path: PathBuf::from(cmd.get_program()),
        source,
    })?;
    if !out.status.success() {
        return Err(Error::Command {
            command: describe(cmd),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(out.stdout)
}

/// A directory tree that becomes a cpio archive or an ext4 image.
struct Tree {
    root: PathBuf,
}

impl Tree {
    fn new(root: PathBuf) -> Result<Self, Error> {
        fs::create_dir_all(&root).map_err(io_err(&root))?;
        Ok(Tree { root })
    }

    /// Copies `from` to `to` (absolute inside the tree) with `mode`.
    fn copy(&self, from: &Path, to: &str, mode: u32) -> Result<(), Error> {
        let dest = self.root.join(to.trim_start_matches('/'));
        if let Some(dir) = dest.parent() {
            fs::create_dir_all(dir).map_err(io_err(dir))?;
        }
        fs::copy(from, &dest).map_err(io_err(from))?;
        fs::set_permissions(&dest, fs::Permissions::from_mode(mode)).map_err(io_err(&dest))
    }

    /// Writes `text` to `to` with `mode`.
    fn write(&self, to: &str, text: &[u8], mode: u32) -> Result<(), Error> {
        let dest = self.root.join(to.trim_start_matches('/'));
        if let Some(dir) = dest.parent() {
            fs::create_dir_all(dir).map_err(io_err(dir))?;
        }
        fs::write(&dest, text).map_err(io_err(&dest))?;
        fs::set_permissions(&dest, fs::Permissions::from_mode(mode)).map_err(io_err(&dest))
    }

    /// Copies the dynamic executable `bin` to `to`, with every shared
    /// library `ldd` names at its own path.
    fn copy_program(&self, bin: &Path, to: &str) -> Result<(), Error> {
        self.copy(bin, to, 0o755)?;
        let ldd = run(Command::new("ldd").arg(bin))?;
        for lib in shared_libraries(&String::from_utf8_lossy(&ldd)) {
            let lib_path = Path::new(&lib);
            self.copy(lib_path, &lib, 0o755)?;
        }
        Ok(())
    }

    /// Packs the tree as a `newc` cpio archive at `out`.
    fn cpio(&self, out: &Path) -> Result<(), Error> {
        let script = format!(
            "find . | sort | cpio --quiet -o -H newc -R 0:0 > '{}'",
            out.display()
        );
        run(Command::new("sh")
            .args(["-c", &script])
            .current_dir(&self.root))?;
        Ok(())
    }

    /// Builds an ext4 image of `size_mib` at `out` holding the tree.
    fn ext4(&self, out: &Path, size_mib: u32) -> Result<(), Error> {
        let mkfs = require("mkfs.ext4", "e2fsprogs")?;
        run(Command::new(mkfs)
            .args(["-q", "-F", "-E", "root_owner=0:0", "-d"])
            .arg(&self.root)
            .arg(out)
            .arg(format!("{size_mib}M")))?;
        Ok(())
    }
}

/// The absolute library paths in `ldd` output.
fn shared_libraries(ldd: &str) -> Vec<String> {
    ldd.lines()
        .filter_map(|line| {
            let line = line.trim();
            let path = match line.split_once("=>") {
                Some((_, rest)) => rest.trim(),
                None => line,
            };
            let path = path.split_whitespace().next()?;
            path.starts_with('/').then(|| path.to_string())
        })
        .collect()
}

/// Bytes that do not compress and that no filesystem stores as a hole.
fn noise(len: usize) -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// The inner guest's files, built by [`build_guest`].
#[derive(Debug, Clone)]
pub struct GuestFiles {
    /// The initrd (`newc` cpio): busybox, socat, the virtio modules and
    /// `tcg/guest-init.sh` as `/init`.
    pub initrd: PathBuf,
    /// The same tree as an ext4 image, without the initrd marker.
    pub root: PathBuf,
}

/// Builds the inner guest's initrd and root image in `work`.
pub fn build_guest(work: &Path, assets: &HostAssets) -> Result<GuestFiles, Error> {
    let busybox = require("busybox", "busybox-static")?;
    let socat = require("socat", "socat")?;
    require("cpio", "cpio")?;

    // The inner guest's tree: its initrd, and its root filesystem.
    let tree = work.join("guest-tree");
    // A tree left by an earlier build holds the initrd marker.
    let _ = fs::remove_dir_all(&tree);
    let guest = Tree::new(tree)?;
    guest.write("/init", GUEST_INIT.as_bytes(), 0o755)?;
    guest.copy(&busybox, "/bin/busybox", 0o755)?;
    guest.copy_program(&socat, "/bin/socat")?;
    for (module, name) in assets.guest_modules.iter().zip(GUEST_MODULES) {
        guest.copy(module, &format!("/lib/modules/{name}"), 0o644)?;
    }
    for dir in ["proc", "sys", "dev", "tmp", "mnt", "newroot", "etc"] {
        let d = guest.root.join(dir);
        fs::create_dir_all(&d).map_err(io_err(&d))?;
    }
    let root_img = work.join("root.ext4");
    guest.ext4(&root_img, 48)?;
    guest.write("/etc/ember-initrd", b"", 0o644)?;
    let initrd = work.join("initrd.cpio");
    guest.cpio(&initrd)?;
    Ok(GuestFiles {
        initrd,
        root: root_img,
    })
}

/// Builds the outer initramfs in `work`, with the extra `programs` of
/// [`HostOptions`], and returns its path.
fn build_initramfs(
    work: &Path,
    assets: &HostAssets,
    programs: &[(PathBuf, String)],
) -> Result<PathBuf, Error> {
    let busybox = require("busybox", "busybox-static")?;
    let socat = require("socat", "socat")?;
    let debugfs = require("debugfs", "e2fsprogs")?;
    let GuestFiles {
        initrd,
        root: root_img,
    } = build_guest(work, assets)?;

    // A read-only drive, and one whose filler the guest deletes and trims.
    let ro = Tree::new(work.join("ro-tree"))?;
    ro.write("/hello", b"read-only drive\n", 0o644)?;
    let ro_img = work.join("ro.ext4");
    ro.ext4(&ro_img, 8)?;
    let trim = Tree::new(work.join("trim-tree"))?;
    trim.write("/filler", &noise(16 << 20), 0o644)?;
    let trim_img = work.join("trim.ext4");
    trim.ext4(&trim_img, 32)?;

    // The outer VM.
    let outer = Tree::new(work.join("outer-tree"))?;
    outer.write("/init", OUTER_INIT.as_bytes(), 0o755)?;
    outer.copy(&busybox, "/bin/busybox", 0o755)?;
    let ember = ember_binary();
    let stripped = work.join("ember");
    // Debug builds carry tens of MiB of symbols the test host has no use for.
    let strip = Command::new("strip")
        .arg("-o")
        .arg(&stripped)
        .arg(&ember)
        .status();
    let ember = match strip {
        Ok(status) if status.success() => stripped,
        _ => ember,
    };
    outer.copy_program(&ember, "/usr/bin/ember")?;
    outer.copy_program(&socat, "/usr/bin/socat")?;
    outer.copy_program(&debugfs, "/usr/sbin/debugfs")?;
    for (from, to) in programs {
        outer.copy_program(from, to)?;
    }
    for (module, name) in assets.outer_modules.iter().zip(OUTER_MODULES) {
        outer.copy(module, &format!("/lib/modules/{name}"), 0o644)?;
    }
    outer.copy(&assets.guest_kernel.vmlinux, "/guest/vmlinux", 0o644)?;
    outer.copy(&initrd, "/guest/initrd.cpio", 0o644)?;
    outer.copy(&root_img, "/guest/root.ext4", 0o644)?;
    outer.copy(&ro_img, "/guest/ro.ext4", 0o644)?;
    outer.copy(&trim_img, "/guest/trim.ext4", 0o644)?;
    let initramfs = work.join("outer.cpio");
    outer.cpio(&initramfs)?;
    Ok(initramfs)
}

/// Whether this host's KVM runs a stock Linux kernel at a usable speed:
/// false on a nested PVM hypervisor (`kvm_pvm` loaded), where ring-0 guest
/// code is emulated, and on a CPU without VMX or SVM.
pub fn host_kvm_runs_stock_kernels() -> bool {
    if Path::new("/sys/module/kvm_pvm").exists() {
        return false;
    }
    fs::read_to_string("/proc/cpuinfo").is_ok_and(|info| {
        info.lines()
            .filter(|l| l.starts_with("flags"))
            .flat_map(str::split_whitespace)
            .any(|flag| flag == "vmx" || flag == "svm")
    })
}

/// The QEMU command that boots the test host on `initramfs` with the outer
/// `/init`'s `scenarios` and the `extra` command-line words.
fn qemu_command(
    qemu: &Path,
    assets: &HostAssets,
    initramfs: &Path,
    scenarios: &[&str],
    extra: &[String],
) -> Command {
    let mut append = format!(
        "console=ttyS0 panic=-1 quiet loglevel=4 ember.scenarios={}",
        scenarios.join(",")
    );
    for word in extra {
        append.push(' ');
        append.push_str(word);
    }
    let mut cmd = Command::new(qemu);
    cmd.args(["-accel", "tcg", "-cpu", "max", "-smp", "2"])
        .args(["-m", &OUTER_MEM_MIB.to_string()])
        .args(["-nodefaults", "-no-reboot", "-display", "none"])
        .args(["-serial", "stdio", "-monitor", "none"])
        .arg("-kernel")
        .arg(&assets.outer_kernel)
        .arg("-initrd")
        .arg(initramfs)
        .args(["-append", &append]);
    cmd
}

/// Boots the test host with the `shell` scenario: ember runs the Linux
/// guest with its console on this terminal, until the guest reboots
/// (`reboot -f`). Returns QEMU's exit status.
pub fn run_shell() -> Result<std::process::ExitStatus, Error> {
    let qemu = require("qemu-system-x86_64", "qemu-system-x86")?;
    let assets = host_assets()?;
    let work = TempDir::new_in(&env::temp_dir()).map_err(io_err(&env::temp_dir()))?;
    let initramfs = build_initramfs(work.path(), &assets, &[])?;
    qemu_command(&qemu, &assets, &initramfs, &["shell"], &[])
        .status()
        .map_err(Error::Spawn)
}

/// Boots the test host, runs `scenarios` (names from [`SCENARIOS`]) in it,
/// and returns what it printed. Everything, including any boot again after
/// a fault of the host itself (see [`run_scenarios_with`]), ends within
/// `timeout`; a report whose scenarios did not all finish says `complete:
/// false` and holds the console so far.
///
/// `EMBER_TCG_VERBOSE=1` echoes the outer console on stderr as it comes;
/// `EMBER_TCG_LOG=FILE` writes it to FILE when QEMU has exited.
pub fn run_scenarios(scenarios: &[&str], timeout: Duration) -> Result<Report, Error> {
    run_scenarios_with(scenarios, &HostOptions::default(), timeout)
}

/// [`run_scenarios`] on a test host with `options`: extra programs in the
/// outer VM and words on its command line. The `bench` scenario runs this
/// way (`tests/benches/real_linux.rs`).
///
/// The software-emulated test host is not what is under test, and it has
/// been seen to fail on its own: its kernel panicked (stack corruption in
/// its scheduler), locked up (a vCPU stuck in the emulated SVM for minutes)
/// or reset without a word. So each scenario has a time limit
/// ([`scenario_limit`]); when the host dies, resets or overruns a limit
/// before its last scenario, it is booted again for the scenarios it did
/// not finish, up to [`MAX_BOOTS`] boots in all and within `timeout` for
/// all of them. A scenario interrupted twice is not tried a third time.
/// The emulated CPU has also, rarely, triple-faulted a guest that runs
/// fine under the same binary on the next try (an SMP guest loading its
/// modules, a guest early in its boot): a scenario whose guest
/// triple-faulted runs once more in a new boot, and a second triple fault
/// is its result.
/// The report's console says what happened to each boot.
pub fn run_scenarios_with(
    scenarios: &[&str],
    options: &HostOptions,
    timeout: Duration,
) -> Result<Report, Error> {
    let qemu = require("qemu-system-x86_64", "qemu-system-x86")?;
    let assets = host_assets()?;
    let work = TempDir::new_in(&env::temp_dir()).map_err(io_err(&env::temp_dir()))?;
    let initramfs = build_initramfs(work.path(), &assets, &options.programs)?;

    let deadline = Instant::now() + timeout;
    let mut boots = Vec::new();
    let mut interrupted: BTreeMap<String, u32> = BTreeMap::new();
    let mut redone: BTreeSet<String> = BTreeSet::new();
    let mut todo: Vec<String> = scenarios.iter().map(|s| s.to_string()).collect();
    while !todo.is_empty() && boots.len() < MAX_BOOTS && Instant::now() < deadline {
        let names: Vec<&str> = todo.iter().map(String::as_str).collect();
        let qemu_log = work.path().join(format!("qemu-{}.log", boots.len() + 1));
        let mut boot = boot_host(
            &qemu, &assets, &initramfs, &names, options, deadline, &qemu_log,
        )?;
        let host_complete = boot.complete;
        let faulted = set_aside_triple_faults(&mut boot, &mut redone);
        if host_complete && faulted.is_empty() {
            boots.push(boot);
            break;
        }
        boot.complete = false;
        // The host ended or was stopped before its last scenario.
        let cut = if host_complete {
            None
        } else {
            boot.scenarios
                .values()
                .find(|s| !s.finished && !faulted.contains(&s.name))
                .map(|s| s.name.clone())
        };
        if let Some(name) = &cut {
            *interrupted.entry(name.clone()).or_default() += 1;
        }
        todo.retain(|name| {
            !boot.scenario(name).is_some_and(|s| s.finished)
                && interrupted.get(name).copied().unwrap_or(0) < 2
        });
        if !host_complete {
            eprintln!(
                "tcg: the test host ended during {} ({}); {}",
                cut.as_deref().unwrap_or("its own boot"),
                boot.console.last().map(String::as_str).unwrap_or(""),
                if todo.is_empty() {
                    "nothing left to run again".to_string()
                } else {
                    format!("booting it again for {}", todo.join(", "))
                }
            );
        }
        boots.push(boot);
    }
    let report = Report::merge(scenarios, boots);
    if let Some(path) = env::var_os("EMBER_TCG_LOG") {
        let path = PathBuf::from(path);
        fs::write(&path, report.console.join("\n") + "\n").map_err(io_err(&path))?;
    }
    Ok(report)
}

/// Marks unfinished, in `boot`, each finished scenario whose guest
/// triple-faulted and that is not in `redone` yet, so that it runs once more
/// in a new boot; a second triple fault stands as its result. Returns their
/// names and adds them to `redone`.
fn set_aside_triple_faults(boot: &mut Report, redone: &mut BTreeSet<String>) -> Vec<String> {
    let faulted: Vec<String> = boot
        .scenarios
        .values()
        .filter(|s| s.finished && s.triple_faulted() && !redone.contains(&s.name))
        .map(|s| s.name.clone())
        .collect();
    for name in &faulted {
        if let Some(s) = boot.scenarios.get_mut(name) {
            s.finished = false;
        }
        boot.console.push(format!(
            "harness: the guest of scenario {name} triple-faulted; it runs once more in a new boot"
        ));
        eprintln!("tcg: the guest of scenario {name} triple-faulted; running it once more");
        redone.insert(name.clone());
    }
    faulted
}

/// Most boots of the test host [`run_scenarios_with`] makes for one set of
/// scenarios.
pub const MAX_BOOTS: usize = 3;

/// How long scenario `name` may run in the test host before the harness
/// takes the host for hung: the outer `/init`'s own limit on it plus a
/// margin. Other scenarios (`bench`) have only the overall limit.
pub fn scenario_limit(name: &str) -> Option<Duration> {
    match name {
        "boot" | "smp4" => Some(Duration::from_secs(300 + 120)),
        "devices" | "services" | "console" => Some(Duration::from_secs(600 + 120)),
        _ => None,
    }
}

/// How long the outer kernel may take to reach its `/init`'s first line.
const OUTER_BOOT_LIMIT: Duration = Duration::from_secs(240);

/// Boots the test host once with `initramfs`, runs `scenarios` in it and
/// collects its report; stops QEMU at `deadline`, when a scenario overruns
/// its [`scenario_limit`], or when the outer `/init` does not start within
/// [`OUTER_BOOT_LIMIT`]. QEMU logs resets (a triple fault) to `qemu_log`.
#[allow(clippy::too_many_arguments)]
fn boot_host(
    qemu: &Path,
    assets: &HostAssets,
    initramfs: &Path,
    scenarios: &[&str],
    options: &HostOptions,
    deadline: Instant,
    qemu_log: &Path,
) -> Result<Report, Error> {
    let mut child = qemu_command(qemu, assets, initramfs, scenarios, &options.cmdline)
        .arg("-D")
        .arg(qemu_log)
        .args(["-d", "cpu_reset"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(Error::Spawn)?;
    let start = Instant::now();
    let verbose = env::var_os("EMBER_TCG_VERBOSE").is_some_and(|v| v != "0");

    let (tx, rx) = mpsc::channel::<(Instant, String)>();
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let err_tx = tx.clone();
    let readers = [
        stdout.map(|out| {
            thread::spawn(move || {
                for line in BufReader::new(out).split(b'\n').map_while(Result::ok) {
                    let line = String::from_utf8_lossy(&line).trim_end().to_string();
                    if tx.send((Instant::now(), line)).is_err() {
                        break;
                    }
                }
            })
        }),
        stderr.map(|err| {
            thread::spawn(move || {
                for line in BufReader::new(err).lines().map_while(Result::ok) {
                    let _ = err_tx.send((Instant::now(), format!("qemu: {line}")));
                }
            })
        }),
    ];

    let mut console = Vec::new();
    let mut watch = Watch::new(start);
    loop {
        let (limit, reason) = watch.next_limit(deadline);
        match rx.recv_timeout(limit.saturating_duration_since(Instant::now())) {
            Ok((at, line)) => {
                if verbose {
                    eprintln!(
                        "tcg {:6.1}s | {line}",
                        at.duration_since(start).as_secs_f64()
                    );
                }
                watch.line(at, &line);
                console.push(line);
            }
            Err(RecvTimeoutError::Timeout) => {
                console.push(format!(
                    "harness: QEMU stopped after {:?}: {}",
                    start.elapsed(),
                    watch.describe(reason)
                ));
                let _ = child.kill();
                break;
            }
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    match child.wait() {
        Ok(status) => console.push(format!("harness: QEMU exited ({status})")),
        Err(e) => console.push(format!("harness: cannot wait for QEMU: {e}")),
    }
    for reader in readers.into_iter().flatten() {
        let _ = reader.join();
    }
    if fs::read_to_string(qemu_log).is_ok_and(|log| log.contains("Triple fault")) {
        console.push("harness: the test host's CPU triple-faulted (QEMU log)".into());
    }
    let mut report = Report::parse(&console);
    report.wall = start.elapsed();
    report.outer_boot = watch.up.map(|at| at.duration_since(start));
    Ok(report)
}

/// The time limits of one boot of the test host, fed its console lines.
struct Watch {
    started: Instant,
    /// When the outer `/init` printed its first line.
    up: Option<Instant>,
    /// The scenario running now and when it began.
    running: Option<(String, Instant)>,
}

/// Which limit [`Watch::next_limit`] found first.
#[derive(Debug, Clone, Copy)]
enum Limit {
    Overall,
    OuterBoot,
    Scenario(Duration),
}

impl Watch {
    fn new(started: Instant) -> Self {
        Watch {
            started,
            up: None,
            running: None,
        }
    }

    fn line(&mut self, at: Instant, line: &str) {
        let Some(rest) = line.strip_prefix(PROTOCOL) else {
            return;
        };
        self.up.get_or_insert(at);
        if let Some(name) = rest.strip_prefix("begin ") {
            self.running = Some((name.trim().to_string(), at));
        } else if rest.starts_with("end ") {
            self.running = None;
        }
    }

    /// The next instant the harness gives up at, and which limit it is.
    fn next_limit(&self, deadline: Instant) -> (Instant, Limit) {
        let mut next = (deadline, Limit::Overall);
        let mut earlier = |at: Instant, limit: Limit| {
            if at < next.0 {
                next = (at, limit);
            }
        };
        if self.up.is_none() {
            earlier(self.started + OUTER_BOOT_LIMIT, Limit::OuterBoot);
        }
        if let Some((name, began)) = &self.running {
            if let Some(limit) = scenario_limit(name) {
                earlier(*began + limit, Limit::Scenario(limit));
            }
        }
        next
    }

    /// Why the harness gave up, in words.
    fn describe(&self, limit: Limit) -> String {
        match (limit, &self.running) {
            (Limit::Scenario(limit), Some((name, _))) => {
                format!("scenario {name} ran past its limit of {limit:?}")
            }
            (Limit::OuterBoot, _) => {
                format!("the outer /init did not start within {OUTER_BOOT_LIMIT:?}")
            }
            _ => "the overall time limit passed".to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(l: &[&str]) -> Vec<String> {
        l.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_scenario_cut_short_is_taken_from_the_boot_that_finished_it() {
        let first = Report::parse(&lines(&[
            "@@ember fact host kvm present",
            "@@ember begin boot",
            "@@ember fact boot ember-rc 0",
            "@@ember end boot",
            "@@ember begin smp4",
            "[   99.1] Kernel panic - not syncing: corrupted stack end detected inside scheduler",
            "harness: QEMU exited (exit status: 0)",
        ]));
        assert!(!first.complete);
        let second = Report::parse(&lines(&[
            "@@ember fact host kvm present",
            "@@ember begin smp4",
            "@@ember fact smp4 ember-rc 0",
            "@@ember end smp4",
            "@@ember all-done",
        ]));
        let merged = Report::merge(&["boot", "smp4"], vec![first, second]);
        assert!(merged.complete);
        assert_eq!(merged.scenario("boot").unwrap().fact("ember-rc"), Some("0"));
        let smp4 = merged.scenario("smp4").unwrap();
        assert!(smp4.finished);
        assert_eq!(smp4.fact("ember-rc"), Some("0"));
        assert_eq!(merged.console[0], "harness: boot 1 of 2 of the test host");
        assert!(merged
            .console
            .contains(&"harness: boot 2 of 2 of the test host".to_string()));
    }

    #[test]
    fn a_triple_faulted_guest_runs_once_more_and_a_second_fault_stands() {
        let faulted_run = || {
            Report::parse(&lines(&[
                "@@ember begin smp4",
                "@@ember fact smp4 ember-rc 1",
                "@@ember stderr ember: error: vCPU 1 triple-faulted (KVM_EXIT_SHUTDOWN) at RIP 0xfff0",
                "@@ember end smp4",
                "@@ember begin boot",
                "@@ember fact boot ember-rc 0",
                "@@ember end boot",
                "@@ember all-done",
            ]))
        };
        let mut redone = BTreeSet::new();
        let mut first = faulted_run();
        assert!(first.scenario("smp4").unwrap().triple_faulted());
        assert!(!first.scenario("boot").unwrap().triple_faulted());
        assert_eq!(set_aside_triple_faults(&mut first, &mut redone), ["smp4"]);
        assert!(!first.scenario("smp4").unwrap().finished);
        assert!(first.scenario("boot").unwrap().finished);
        // The second run faults again: it is the result.
        let mut second = faulted_run();
        assert!(set_aside_triple_faults(&mut second, &mut redone).is_empty());
        let merged = Report::merge(&["boot", "smp4"], vec![first, second]);
        assert!(merged.complete);
        assert_eq!(merged.scenario("smp4").unwrap().fact("ember-rc"), Some("1"));
        assert!(merged.console.iter().any(|l| l.contains("runs once more")));
    }

    #[test]
    fn a_merge_is_complete_only_when_every_requested_scenario_finished() {
        let cut = Report::parse(&lines(&["@@ember begin boot"]));
        let again = Report::parse(&lines(&["@@ember begin boot"]));
        let merged = Report::merge(&["boot"], vec![cut, again]);
        assert!(!merged.complete);
        assert!(!merged.scenario("boot").unwrap().finished);
        // A finished scenario is not replaced by a later unfinished run.
        let done = Report::parse(&lines(&["@@ember begin boot", "@@ember end boot"]));
        let cut = Report::parse(&lines(&["@@ember begin boot"]));
        let merged = Report::merge(&["boot"], vec![done, cut]);
        assert!(merged.complete);
    }

    #[test]
    fn the_watch_stops_a_scenario_at_its_limit_and_a_silent_boot_early() {
        let t0 = Instant::now();
        let deadline = t0 + Duration::from_secs(10_000);
        let mut watch = Watch::new(t0);
        let (at, limit) = watch.next_limit(deadline);
        let why = watch.describe(limit);
        assert_eq!(at, t0 + OUTER_BOOT_LIMIT);
        assert!(why.contains("/init"), "{why}");

        watch.line(
            t0 + Duration::from_secs(10),
            "@@ember fact host kvm present",
        );
        assert_eq!(watch.next_limit(deadline).0, deadline);

        let began = t0 + Duration::from_secs(20);
        watch.line(began, "@@ember begin smp4");
        let (at, limit) = watch.next_limit(deadline);
        let why = watch.describe(limit);
        assert_eq!(at, began + scenario_limit("smp4").unwrap());
        assert!(why.contains("smp4"), "{why}");
        // Lines of the inner guest do not move the limit.
        watch.line(began + Duration::from_secs(5), "@| [    1.0] Linux version");
        assert_eq!(watch.next_limit(deadline).0, at);
        // The overall limit wins when it comes first.
        assert_eq!(watch.next_limit(began).0, began);

        watch.line(began + Duration::from_secs(30), "@@ember end smp4");
        assert_eq!(watch.next_limit(deadline).0, deadline);
        // bench has no limit of its own.
        watch.line(began + Duration::from_secs(40), "@@ember begin bench");
        assert_eq!(watch.next_limit(deadline).0, deadline);
    }

    #[test]
    fn parses_the_outer_protocol() {
        let console: Vec<String> = [
            "Linux version 6.1",
            "@@ember fact host kvm present",
            "@@ember begin boot",
            "@| [    0.000000] Linux version 6.1.0",
            "@| ember-guest: cpus-online=0-1",
            "@| [    1.500000] ember-guest: init reached",
            "@| ember-guest: net-in-rc=0 net-in-md5=abc",
            "@@ember fact boot ember-rc 0",
            "@@ember stderr some warning",
            "@@ember end boot",
            "@@ember begin devices",
            "@| ember-guest: ping=ok",
            "@@ember all-done",
        ]
        .map(String::from)
        .to_vec();
        let report = Report::parse(&console);
        assert!(report.complete);
        assert_eq!(report.host.get("kvm").map(String::as_str), Some("present"));
        let boot = report.scenario("boot").unwrap();
        assert!(boot.finished);
        assert_eq!(boot.fact("ember-rc"), Some("0"));
        assert_eq!(boot.guest("cpus-online"), Some("0-1"));
        assert_eq!(boot.guest("net-in-md5"), Some("abc"));
        assert_eq!(boot.guest("net-in-rc"), Some("0"));
        assert_eq!(boot.kernel_time("init reached"), Some(1.5));
        assert_eq!(boot.stderr, ["some warning"]);
        assert_eq!(boot.console.len(), 4);
        let devices = report.scenario("devices").unwrap();
        assert!(!devices.finished, "no end line");
        assert_eq!(devices.guest("ping"), Some("ok"));
    }

    #[test]
    fn kernel_timestamps() {
        assert_eq!(kernel_timestamp("[   12.345678] rtc_cmos"), Some(12.345678));
        assert_eq!(kernel_timestamp("no stamp"), None);
        assert_eq!(kernel_timestamp("[ bad ] x"), None);
    }

    #[test]
    fn ldd_output_to_library_paths() {
        let ldd = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                   \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            shared_libraries(ldd),
            [
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
        );
    }
}
