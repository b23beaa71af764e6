//! Per-thread seccomp filters, as Firecracker installs them: the VMM thread, the API
//! thread and every vCPU thread may make only the system calls their work needs, and for
//! `ioctl`, `fcntl`, `futex`, `mmap` and a few more only the argument values it uses.
//! Any other system call kills the process (`SECCOMP_RET_KILL_PROCESS`).
//!
//! The filters are described, with a comment per rule, in
//! `vmm/seccomp/x86_64-unknown-linux-gnu.json` in seccompiler's JSON format (one filter
//! per thread category: `vmm`, `api`, `vcpu`), and compiled into BPF by `build.rs`, so
//! start-up only copies ready programs ([`Filters::builtin`]).
//!
//! Where each thread installs its filter, before it does anything a guest or an API
//! client can influence:
//!
//! - the API thread, first thing ([`ServerOptions::thread_hook`], with [`crate::api_thread_hook`]);
//! - each vCPU thread, first thing, before its first `KVM_RUN`
//!   ([`Filters::vcpu_hook`] with `ember_vcpu::Vcpu::start_with_hook`);
//! - the VMM thread, once the VM is built and before the guest runs: the vCPUs start
//!   paused, the VMM thread [`apply`]s its filter, then resumes them. (A thread inherits
//!   the filters of the thread that creates it, so the vCPU threads must exist before the
//!   VMM thread's filter does, or they would be held to both.)
//!
//! What the flags select ([`SeccompConfig`]): `--no-seccomp`, no filters;
//! `--seccomp-filter FILE`, the filters in FILE instead of the built-in ones, either in
//! Firecracker's format (BPF compiled by `seccompiler-bin`) or in seccompiler's JSON
//! format; neither, the built-in filters.
//!
//! For debugging, `EMBER_SECCOMP_ACTION` ([`FILTER_ACTION_ENV`]) changes what the
//! built-in filters do with a system call they do not allow: `trap` reports the system
//! call number on stderr and exits with code 148 ([`BAD_SYSCALL_EXIT_CODE`], as
//! Firecracker); `log` lets it through and has the kernel log it, so that `strace -f`
//! shows every system call made after each thread's `seccomp()` call, which is how the
//! lists in the description were found and how the end-to-end tests keep them in step.
//!
//! # Example
//!
//! ```no_run
//! use ember::seccomp::{apply, Filters, SeccompConfig};
//!
//! let config = SeccompConfig::from_args(false, None)?;
//! let filters = Filters::load(&config)?;
//! // ... build the VM, start its vCPUs paused with `filters.vcpu_hook()` ...
//! if let Some(filter) = filters.vmm() {
//!     apply(&filter)?;
//! }
//! // ... resume the vCPUs, run the event loop.
//! # Ok::<(), ember::seccomp::SeccompError>(())
//! ```
//!
//! [`ServerOptions::thread_hook`]: ember_api::ServerOptions::thread_hook

use std::fmt;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use ember_vcpu::ThreadHook;
use seccompiler::TargetArch;
pub use seccompiler::{sock_filter, BpfProgram};

/// The filter description compiled into the binary (seccompiler's JSON format).
pub const DESCRIPTION: &str = include_str!("../seccomp/x86_64-unknown-linux-gnu.json");

/// Environment variable that changes what the built-in filters do with a system call
/// they do not allow: `kill_process` (the default), `trap` or `log`.
pub const FILTER_ACTION_ENV: &str = "EMBER_SECCOMP_ACTION";

/// Exit code after a forbidden system call was trapped (Firecracker's `BadSyscall`).
pub const BAD_SYSCALL_EXIT_CODE: u8 = 148;

/// Longest BPF program the kernel accepts (`BPF_MAXINSNS`, linux/bpf_common.h).
pub const BPF_MAX_LEN: usize = 4096;

/// Largest `--seccomp-filter` file read. Three programs of at most 4096 eight-byte
/// instructions take under 100 kB in Firecracker's format; a JSON description of them
/// takes more.
pub const MAX_FILTER_FILE_LEN: u64 = 1 << 20;

/// Errors loading or installing seccomp filters.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// Both `--no-seccomp` and `--seccomp-filter` were given.
    #[error("--no-seccomp and --seccomp-filter {} cannot be used together", .0.display())]
    ConflictingFlags(PathBuf),
    /// `EMBER_SECCOMP_ACTION` has a value other than the three known ones.
    #[error("invalid {FILTER_ACTION_ENV} value `{0}`: use kill_process, trap or log")]
    InvalidAction(String),
    /// The `--seccomp-filter` file could not be read.
    #[error("cannot read the seccomp filter file {}: {source}", path.display())]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The `--seccomp-filter` file is larger than any valid one.
    #[error(
        "the seccomp filter file {} is larger than {MAX_FILTER_FILE_LEN} bytes",
        path.display()
    )]
    FileTooLarge {
        /// The file.
        path: PathBuf,
    },
    /// The `--seccomp-filter` file holds invalid filters.
    #[error("invalid seccomp filter file {}: {source}", path.display())]
    InvalidFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        source: Box<SeccompError>,
    },
    /// JSON filters did not compile.
    #[error("the JSON filters do not compile: {0}")]
    Json(#[source] seccompiler::Error),
    /// The BPF file ends in the middle of something.
    #[error("the BPF filter file ends at byte {len}, in the middle of {what}")]
    Truncated {
        /// What was being read.
        what: &'static str,
        /// The file length.
        len: usize,
    },
    /// The BPF file has bytes after its last filter.
    #[error("the BPF filter file has {extra} bytes after its last filter")]
    TrailingBytes {
        /// How many.
        extra: usize,
    },
    /// A thread category name is not UTF-8.
    #[error("a thread category name in the BPF filter file is not UTF-8")]
    CategoryName,
    /// A filter is for a thread category Ember does not have.
    #[error("unknown thread category `{0}`: the categories are vmm, api and vcpu")]
    UnknownCategory(String),
    /// A thread category has two filters.
    #[error("two filters for the `{0}` thread category")]
    DuplicateCategory(String),
    /// A thread category has no filter.
    #[error("no filter for the `{0}` thread category")]
    MissingCategory(&'static str),
    /// A program is longer than the kernel accepts.
    #[error("the `{category}` filter has {len} BPF instructions; the kernel takes at most {BPF_MAX_LEN}")]
    TooLong {
        /// Its thread category.
        category: String,
        /// Its length.
        len: usize,
    },
    /// The kernel refused the filter.
    #[error("cannot install the seccomp filter of thread `{thread}`: {source}")]
    Install {
        /// The thread's name.
        thread: String,
        /// Cause.
        #[source]
        source: seccompiler::Error,
    },
    /// The SIGSYS handler could not be installed.
    #[error("cannot install the SIGSYS handler that reports forbidden system calls: {0}")]
    SigsysHandler(#[source] vmm_sys_util::errno::Error),
}

/// The kinds of threads Ember runs, each with its own filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ThreadCategory {
    /// The main thread: VM set-up, then the event loop (devices, API requests).
    Vmm,
    /// The API server thread (`ember_api`).
    Api,
    /// A vCPU thread (`ember_vcpu<N>`).
    Vcpu,
}

impl ThreadCategory {
    /// Every category.
    pub const ALL: [ThreadCategory; 3] = [
        ThreadCategory::Vmm,
        ThreadCategory::Api,
        ThreadCategory::Vcpu,
    ];

    /// The category's name in filter files: `vmm`, `api` or `vcpu`.
    pub fn name(self) -> &'static str {
        match self {
            ThreadCategory::Vmm => "vmm",
            ThreadCategory::Api => "api",
            ThreadCategory::Vcpu => "vcpu",
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.name() == name)
    }
}

impl fmt::Display for ThreadCategory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Which filters to install, from Firecracker's flags.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SeccompConfig {
    /// `--no-seccomp`: none.
    None,
    /// The filters built into the binary.
    Default,
    /// `--seccomp-filter FILE`: the filters in FILE.
    Custom(PathBuf),
}

impl SeccompConfig {
    /// The configuration `--no-seccomp` and `--seccomp-filter` select.
    ///
    /// # Errors
    ///
    /// [`SeccompError::ConflictingFlags`] when both are given (Firecracker refuses that
    /// too).
    pub fn from_args(
        no_seccomp: bool,
        seccomp_filter: Option<PathBuf>,
    ) -> Result<Self, SeccompError> {
        match (no_seccomp, seccomp_filter) {
            (true, Some(path)) => Err(SeccompError::ConflictingFlags(path)),
            (true, None) => Ok(SeccompConfig::None),
            (false, Some(path)) => Ok(SeccompConfig::Custom(path)),
            (false, None) => Ok(SeccompConfig::Default),
        }
    }
}

/// What the built-in filters do with a system call they do not allow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MismatchAction {
    /// Kill the process (`SECCOMP_RET_KILL_PROCESS`).
    #[default]
    KillProcess,
    /// Send SIGSYS (`SECCOMP_RET_TRAP`), whose handler reports the system call and exits
    /// with [`BAD_SYSCALL_EXIT_CODE`].
    Trap,
    /// Allow it, and have the kernel log it (`SECCOMP_RET_LOG`).
    Log,
}

impl MismatchAction {
    /// The action `EMBER_SECCOMP_ACTION` asks for; [`MismatchAction::KillProcess`] when
    /// it is not set.
    ///
    /// # Errors
    ///
    /// [`SeccompError::InvalidAction`] for any other value.
    pub fn from_env() -> Result<Self, SeccompError> {
        match std::env::var_os(FILTER_ACTION_ENV) {
            None => Ok(MismatchAction::KillProcess),
            Some(value) => value
                .to_str()
                .ok_or_else(|| SeccompError::InvalidAction(value.to_string_lossy().into_owned()))?
                .parse(),
        }
    }
}

impl FromStr for MismatchAction {
    type Err = SeccompError;

    /// `kill_process`, `trap` or `log`, as in seccompiler's JSON.
    fn from_str(s: &str) -> Result<Self, SeccompError> {
        match s {
            "kill_process" => Ok(MismatchAction::KillProcess),
            "trap" => Ok(MismatchAction::Trap),
            "log" => Ok(MismatchAction::Log),
            other => Err(SeccompError::InvalidAction(other.to_string())),
        }
    }
}

/// One BPF instruction as `build.rs` writes it: (code, jt, jf, k).
type Insn = (u16, u8, u8, u32);

/// The programs `build.rs` compiled for one mismatch action.
struct BuiltinPrograms {
    vmm: &'static [Insn],
    api: &'static [Insn],
    vcpu: &'static [Insn],
}

mod generated {
    use super::BuiltinPrograms;

    include!(concat!(env!("OUT_DIR"), "/seccomp_filters.rs"));
}

fn program(insns: &[Insn]) -> BpfProgram {
    insns
        .iter()
        .map(|&(code, jt, jf, k)| sock_filter { code, jt, jf, k })
        .collect()
}

/// The filter of each thread category; `None` where a thread runs unfiltered.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filters {
    vmm: Option<Arc<BpfProgram>>,
    api: Option<Arc<BpfProgram>>,
    vcpu: Option<Arc<BpfProgram>>,
}

impl Filters {
    /// The filters `config` selects, ready to install.
    ///
    /// Unless `config` is [`SeccompConfig::None`], this also prepares the process for
    /// running filtered: it installs a SIGSYS handler that reports a trapped system call
    /// and exits with [`BAD_SYSCALL_EXIT_CODE`] (Firecracker does the same), and keeps
    /// glibc from opening files behind the filters' back (see `prepare_glibc`). Call it
    /// before starting any thread.
    ///
    /// # Errors
    ///
    /// An invalid `EMBER_SECCOMP_ACTION`, an unreadable or invalid filter file (see
    /// [`Filters::from_json`] and [`Filters::from_bpf`]), or a failure to install the
    /// SIGSYS handler.
    pub fn load(config: &SeccompConfig) -> Result<Filters, SeccompError> {
        let filters = match config {
            SeccompConfig::None => return Ok(Filters::none()),
            SeccompConfig::Default => Filters::builtin(MismatchAction::from_env()?),
            SeccompConfig::Custom(path) => Filters::from_file(path)?,
        };
        install_sigsys_handler()?;
        prepare_glibc();
        Ok(filters)
    }

    /// No filters (`--no-seccomp`).
    pub fn none() -> Filters {
        Filters::default()
    }

    /// The filters built into the binary, with `action` for what they do not allow.
    pub fn builtin(action: MismatchAction) -> Filters {
        let programs = match action {
            MismatchAction::KillProcess => &generated::KILL_PROCESS,
            MismatchAction::Trap => &generated::TRAP,
            MismatchAction::Log => &generated::LOG,
        };
        Filters {
            vmm: Some(Arc::new(program(programs.vmm))),
            api: Some(Arc::new(program(programs.api))),
            vcpu: Some(Arc::new(program(programs.vcpu))),
        }
    }

    /// Reads a `--seccomp-filter` file: seccompiler's JSON format when its first
    /// non-blank byte is `{`, Firecracker's BPF format otherwise.
    ///
    /// # Errors
    ///
    /// [`SeccompError::ReadFile`], [`SeccompError::FileTooLarge`], or
    /// [`SeccompError::InvalidFile`] with what is wrong with the filters.
    pub fn from_file(path: &Path) -> Result<Filters, SeccompError> {
        let read_err = |source| SeccompError::ReadFile {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::open(path).map_err(read_err)?;
        let mut bytes = Vec::new();
        file.take(MAX_FILTER_FILE_LEN + 1)
            .read_to_end(&mut bytes)
            .map_err(read_err)?;
        if bytes.len() as u64 > MAX_FILTER_FILE_LEN {
            return Err(SeccompError::FileTooLarge {
                path: path.to_path_buf(),
            });
        }
        let is_json = bytes
            .iter()
            .find(|b| !b.is_ascii_whitespace())
            .is_some_and(|b| *b == b'{');
        let filters = if is_json {
            Filters::from_json(&bytes)
        } else {
            Filters::from_bpf(&bytes)
        };
        filters.map_err(|source| SeccompError::InvalidFile {
            path: path.to_path_buf(),
            source: Box::new(source),
        })
    }

    /// Compiles filters in seccompiler's JSON format (the format of
    /// `vmm/seccomp/x86_64-unknown-linux-gnu.json`, and of Firecracker's
    /// `resources/seccomp/*.json`), with a filter for each of `vmm`, `api` and `vcpu`.
    ///
    /// # Errors
    ///
    /// [`SeccompError::Json`] when the JSON does not compile; the category errors of
    /// [`Filters::from_bpf`].
    pub fn from_json(json: &[u8]) -> Result<Filters, SeccompError> {
        let map =
            seccompiler::compile_from_json(json, TargetArch::x86_64).map_err(SeccompError::Json)?;
        Filters::from_programs(map)
    }

    /// Decodes Firecracker's `--seccomp-filter` format, the output of
    /// `seccompiler-bin`: a bincode map (fixed-width little-endian integers) from thread
    /// category to BPF program, each instruction 8 bytes (`struct sock_filter`). As in
    /// Firecracker, category names are case-insensitive and an empty program means no
    /// filter for that category.
    ///
    /// # Errors
    ///
    /// [`SeccompError::Truncated`], [`SeccompError::TrailingBytes`],
    /// [`SeccompError::CategoryName`] for malformed input;
    /// [`SeccompError::UnknownCategory`], [`SeccompError::DuplicateCategory`],
    /// [`SeccompError::MissingCategory`], [`SeccompError::TooLong`] for filters Ember
    /// cannot use.
    pub fn from_bpf(bytes: &[u8]) -> Result<Filters, SeccompError> {
        let mut reader = BincodeReader { bytes, pos: 0 };
        // Each entry takes at least 16 bytes (two lengths): a count the input cannot
        // hold is refused before anything is allocated.
        let count = reader.len(16, "the number of filters")?;
        let mut programs = Vec::with_capacity(count);
        for _ in 0..count {
            let name_len = reader.len(1, "a thread category name")?;
            let name = reader.take(name_len, "a thread category name")?;
            let name = std::str::from_utf8(name).map_err(|_| SeccompError::CategoryName)?;
            let len = reader.len(8, "a BPF program")?;
            let raw = reader.take(len * 8, "a BPF program")?;
            let program: BpfProgram = raw
                .chunks_exact(8)
                .map(|i| sock_filter {
                    code: u16::from_le_bytes([i[0], i[1]]),
                    jt: i[2],
                    jf: i[3],
                    k: u32::from_le_bytes([i[4], i[5], i[6], i[7]]),
                })
                .collect();
            programs.push((name.to_lowercase(), program));
        }
        let extra = bytes.len() - reader.pos;
        if extra != 0 {
            return Err(SeccompError::TrailingBytes { extra });
        }
        Filters::from_programs(programs)
    }

    /// Checks that `programs` has one program for each category and no other.
    fn from_programs(
        programs: impl IntoIterator<Item = (String, BpfProgram)>,
    ) -> Result<Filters, SeccompError> {
        let mut slots: [Option<BpfProgram>; 3] = Default::default();
        for (name, program) in programs {
            let Some(category) = ThreadCategory::from_name(&name) else {
                return Err(SeccompError::UnknownCategory(name));
            };
            if program.len() > BPF_MAX_LEN {
                return Err(SeccompError::TooLong {
                    category: name,
                    len: program.len(),
                });
            }
            let slot = &mut slots[category as usize];
            if slot.is_some() {
                return Err(SeccompError::DuplicateCategory(name));
            }
            *slot = Some(program);
        }
        let [vmm, api, vcpu] = slots;
        let take = |slot: Option<BpfProgram>, category: ThreadCategory| match slot {
            None => Err(SeccompError::MissingCategory(category.name())),
            Some(p) if p.is_empty() => Ok(None),
            Some(p) => Ok(Some(Arc::new(p))),
        };
        Ok(Filters {
            vmm: take(vmm, ThreadCategory::Vmm)?,
            api: take(api, ThreadCategory::Api)?,
            vcpu: take(vcpu, ThreadCategory::Vcpu)?,
        })
    }

    /// The filter of `category`, if it has one.
    pub fn get(&self, category: ThreadCategory) -> Option<Arc<BpfProgram>> {
        match category {
            ThreadCategory::Vmm => self.vmm.clone(),
            ThreadCategory::Api => self.api.clone(),
            ThreadCategory::Vcpu => self.vcpu.clone(),
        }
    }

    /// The VMM thread's filter.
    pub fn vmm(&self) -> Option<Arc<BpfProgram>> {
        self.vmm.clone()
    }

    /// The API thread's filter.
    pub fn api(&self) -> Option<Arc<BpfProgram>> {
        self.api.clone()
    }

    /// The vCPU threads' filter.
    pub fn vcpu(&self) -> Option<Arc<BpfProgram>> {
        self.vcpu.clone()
    }

    /// Whether no thread is filtered.
    pub fn is_empty(&self) -> bool {
        self.vmm.is_none() && self.api.is_none() && self.vcpu.is_none()
    }

    /// What `ember_vcpu::Vcpu::start_with_hook` should run first on each vCPU thread:
    /// installing the vCPU filter; `None` without one.
    pub fn vcpu_hook(&self) -> Option<ThreadHook> {
        let filter = self.vcpu.clone()?;
        Some(Box::new(move || apply(&filter).map_err(Into::into)))
    }
}

/// Reads Firecracker's bincode encoding (fixed-width little-endian integers).
struct BincodeReader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> BincodeReader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], SeccompError> {
        let truncated = SeccompError::Truncated {
            what,
            len: self.bytes.len(),
        };
        let end = self.pos.checked_add(n).ok_or(truncated)?;
        let slice = self
            .bytes
            .get(self.pos..end)
            .ok_or(SeccompError::Truncated {
                what,
                len: self.bytes.len(),
            })?;
        self.pos = end;
        Ok(slice)
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, SeccompError> {
        let raw = self.take(8, what)?;
        let mut word = [0u8; 8];
        word.copy_from_slice(raw);
        Ok(u64::from_le_bytes(word))
    }

    /// A length prefix of `unit`-byte elements, refused when the rest of the input
    /// cannot hold that many.
    fn len(&mut self, unit: usize, what: &'static str) -> Result<usize, SeccompError> {
        let n = self.u64(what)?;
        let rest = (self.bytes.len() - self.pos) / unit;
        match usize::try_from(n) {
            Ok(n) if n <= rest => Ok(n),
            _ => Err(SeccompError::Truncated {
                what,
                len: self.bytes.len(),
            }),
        }
    }
}

/// Installs `filter` on the calling thread, for good: seccomp filters cannot be removed,
/// and threads the caller creates afterwards inherit it. An empty program installs
/// nothing (Firecracker's meaning of an empty filter).
///
/// # Errors
///
/// [`SeccompError::TooLong`] for more than [`BPF_MAX_LEN`] instructions,
/// [`SeccompError::Install`] when `prctl(PR_SET_NO_NEW_PRIVS)` or `seccomp()` fails.
pub fn apply(filter: &[sock_filter]) -> Result<(), SeccompError> {
    if filter.is_empty() {
        return Ok(());
    }
    if filter.len() > BPF_MAX_LEN {
        return Err(SeccompError::TooLong {
            category: thread_name(),
            len: filter.len(),
        });
    }
    seccompiler::apply_filter(filter).map_err(|source| SeccompError::Install {
        thread: thread_name(),
        source,
    })
}

fn thread_name() -> String {
    std::thread::current()
        .name()
        .unwrap_or("unnamed")
        .to_string()
}

extern "C" {
    /// glibc: loads the time zone (`TZ`, `/etc/localtime`) once for the process.
    fn tzset();
}

/// glibc opens files on its own on two occasions that would come after the filters,
/// on threads whose filter has no `openat`:
///
/// - the first local time conversion (a log line's timestamp) reads `/etc/localtime`:
///   loading the zone now makes later conversions use what was loaded;
/// - the first time a per-thread malloc arena gives memory back (`shrink_heap`), glibc
///   reads `/proc/sys/vm/overcommit_memory`: with a single arena, the one of the main
///   thread (which is what musl, Firecracker's C library, has), threads started from
///   now on take memory with `brk` and give it back the same way. The vCPU run loop
///   does not allocate, so the threads do not contend for the arena's lock.
fn prepare_glibc() {
    // SAFETY: tzset only reads TZ and the zone file into glibc's own state.
    unsafe { tzset() };
    // SAFETY: mallopt only sets a malloc parameter; it takes effect for arenas not
    // created yet, which is every one if no thread has been started.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
}

/// The start of `siginfo_t` for SIGSYS (asm-generic/siginfo.h: three ints, padding to
/// the union at byte 16, then `_sigsys { void *_call_addr; int _syscall; unsigned int
/// _arch; }`).
#[repr(C)]
struct SigsysInfo {
    signo: libc::c_int,
    errno: libc::c_int,
    code: libc::c_int,
    _pad: libc::c_int,
    call_addr: *mut libc::c_void,
    syscall: libc::c_int,
    arch: libc::c_uint,
}

/// Reports a system call a filter trapped, then ends the process. Runs on the thread
/// that made the call, under its filter: only `write`, `gettid` and `exit_group`, which
/// every filter allows, and no allocation.
extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for SIGSYS, laid out as SigsysInfo.
    let nr = unsafe { (*info.cast::<SigsysInfo>()).syscall };
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    let mut msg = [0u8; 160];
    let mut len = 0;
    for part in [
        Part::Text("ember: seccomp: thread "),
        Part::Number(i64::from(tid)),
        Part::Text(" made system call "),
        Part::Number(i64::from(nr)),
        Part::Text(", which its filter does not allow; exiting with code "),
        Part::Number(i64::from(BAD_SYSCALL_EXIT_CODE)),
        Part::Text("\n"),
    ] {
        len = part.write(&mut msg, len);
    }
    // SAFETY: writes `len` initialized bytes of a stack buffer to stderr, then exits
    // without running anything else of the process.
    unsafe {
        libc::write(libc::STDERR_FILENO, msg.as_ptr().cast(), len);
        libc::_exit(libc::c_int::from(BAD_SYSCALL_EXIT_CODE));
    }
}

/// A piece of the SIGSYS report, formatted without allocating.
enum Part {
    Text(&'static str),
    Number(i64),
}

impl Part {
    /// Appends to `buf` at `at`, dropping what does not fit; returns the new length.
    fn write(&self, buf: &mut [u8], at: usize) -> usize {
        let mut digits = [0u8; 20];
        let bytes: &[u8] = match self {
            Part::Text(s) => s.as_bytes(),
            Part::Number(n) => {
                let mut v = n.unsigned_abs();
                let mut start = digits.len();
                loop {
                    start -= 1;
                    digits[start] = b'0' + (v % 10) as u8;
                    v /= 10;
                    if v == 0 {
                        break;
                    }
                }
                if *n < 0 {
                    start -= 1;
                    digits[start] = b'-';
                }
                &digits[start..]
            }
        };
        let mut at = at;
        for b in bytes {
            let Some(slot) = buf.get_mut(at) else { break };
            *slot = *b;
            at += 1;
        }
        at
    }
}

fn install_sigsys_handler() -> Result<(), SeccompError> {
    vmm_sys_util::signal::register_signal_handler(libc::SIGSYS, on_sigsys)
        .map_err(SeccompError::SigsysHandler)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde_json::Value;

    use super::*;

    // ioctl numbers (linux/kvm.h).
    const KVM_RUN: libc::c_ulong = 0xae80;
    const KVM_CREATE_VM: libc::c_ulong = 0xae01;

    /// Runs `child` in a forked child and returns its wait status. `child` must only
    /// make raw system calls: the child of a multithreaded process may not allocate.
    fn in_child(child: impl FnOnce() -> libc::c_int) -> libc::c_int {
        // SAFETY: the child only runs `child` (raw system calls) and `_exit`s.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", io::Error::last_os_error());
        if pid == 0 {
            let code = child();
            // SAFETY: ends the child without running the parent's destructors.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waits for our own child, writing its status into a local.
        let ret = unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(ret, pid, "waitpid: {}", io::Error::last_os_error());
        status
    }

    fn killed_by_sigsys(status: libc::c_int) -> bool {
        libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS
    }

    fn exited_with(status: libc::c_int, code: libc::c_int) -> bool {
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == code
    }

    /// In a child: installs `filter`, then makes `call`; exits 0 if the call returned.
    fn run_filtered(filter: &[sock_filter], call: impl FnOnce()) -> libc::c_int {
        in_child(|| {
            if apply(filter).is_err() {
                return 3;
            }
            call();
            0
        })
    }

    fn builtin(category: ThreadCategory) -> Arc<BpfProgram> {
        Filters::builtin(MismatchAction::KillProcess)
            .get(category)
            .expect("every category has a built-in filter")
    }

    #[test]
    fn a_forbidden_system_call_kills_the_process() {
        for category in ThreadCategory::ALL {
            let filter = builtin(category);
            // No thread of Ember opens network sockets or asks for its parent.
            let status = run_filtered(&filter, || {
                // SAFETY: a plain system call with integer arguments.
                unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
            });
            assert!(killed_by_sigsys(status), "{category}: status {status:#x}");
            let status = run_filtered(&filter, || {
                // SAFETY: getppid has no preconditions.
                unsafe { libc::getppid() };
            });
            assert!(killed_by_sigsys(status), "{category}: status {status:#x}");
        }
    }

    #[test]
    fn the_vcpu_filter_checks_ioctl_numbers() {
        let filter = builtin(ThreadCategory::Vcpu);
        // KVM_RUN is allowed (on a bad descriptor it just fails with EBADF)...
        let status = run_filtered(&filter, || {
            // SAFETY: an ioctl on an invalid descriptor touches no memory.
            unsafe { libc::ioctl(-1, KVM_RUN, 0) };
        });
        assert!(exited_with(status, 0), "status {status:#x}");
        // ... creating a VM is not.
        let status = run_filtered(&filter, || {
            // SAFETY: as above.
            unsafe { libc::ioctl(-1, KVM_CREATE_VM, 0) };
        });
        assert!(killed_by_sigsys(status), "status {status:#x}");
    }

    #[test]
    fn allowed_system_calls_go_through() {
        for category in ThreadCategory::ALL {
            let filter = builtin(category);
            let status = run_filtered(&filter, || {
                let byte = [b'x'];
                // SAFETY: writes one byte from a live buffer to an invalid descriptor,
                // then reads a clock into a local.
                unsafe {
                    libc::write(-1, byte.as_ptr().cast(), 1);
                    let mut ts: libc::timespec = std::mem::zeroed();
                    libc::syscall(libc::SYS_clock_gettime, libc::CLOCK_MONOTONIC, &mut ts);
                }
            });
            assert!(exited_with(status, 0), "{category}: status {status:#x}");
        }
    }

    #[test]
    fn the_trap_action_reports_the_system_call_and_exits_148() {
        let filter = Filters::builtin(MismatchAction::Trap).vcpu().unwrap();
        let mut fds = [0; 2];
        // SAFETY: creates a pipe into a local array.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        install_sigsys_handler().unwrap();
        let status = in_child(|| {
            // SAFETY: points the child's stderr at the pipe.
            unsafe { libc::dup2(fds[1], libc::STDERR_FILENO) };
            if apply(&filter).is_err() {
                return 3;
            }
            // SAFETY: getppid has no preconditions.
            unsafe { libc::getppid() };
            0
        });
        // SAFETY: closes the write end we own, so the read below sees EOF.
        unsafe { libc::close(fds[1]) };
        let mut out = String::new();
        // SAFETY: the read end is ours; File takes ownership and closes it.
        let mut reader = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fds[0]) };
        reader.read_to_string(&mut out).unwrap();
        assert!(
            exited_with(status, 148),
            "status {status:#x}, stderr {out:?}"
        );
        let getppid = libc::SYS_getppid.to_string();
        assert!(
            out.contains(&format!(
                "made system call {getppid}, which its filter does not allow"
            )),
            "{out:?}"
        );
    }

    #[test]
    fn the_log_action_lets_forbidden_calls_through() {
        let filter = Filters::builtin(MismatchAction::Log).vcpu().unwrap();
        // SAFETY: getpid has no preconditions.
        let parent = unsafe { libc::getpid() };
        let status = in_child(|| {
            if apply(&filter).is_err() {
                return 3;
            }
            // SAFETY: getppid has no preconditions.
            if unsafe { libc::getppid() } == parent {
                0
            } else {
                4
            }
        });
        assert!(exited_with(status, 0), "status {status:#x}");
    }

    #[test]
    fn the_built_in_programs_match_the_description() {
        // build.rs compiled the same JSON: the programs must be what seccompiler makes
        // of it now.
        let compiled =
            seccompiler::compile_from_json(DESCRIPTION.as_bytes(), TargetArch::x86_64).unwrap();
        let builtin = Filters::builtin(MismatchAction::KillProcess);
        for category in ThreadCategory::ALL {
            let program = builtin.get(category).unwrap();
            assert_eq!(*program, compiled[category.name()], "{category}");
            assert!(program.len() <= BPF_MAX_LEN);
        }
        // The other actions differ only in what a mismatch returns.
        let ret = |action| {
            Filters::builtin(action)
                .vcpu()
                .unwrap()
                .iter()
                .filter(|i| i.code == 0x06) // BPF_RET | BPF_K
                .map(|i| i.k)
                .collect::<std::collections::BTreeSet<u32>>()
        };
        assert!(ret(MismatchAction::KillProcess).contains(&libc::SECCOMP_RET_KILL_PROCESS));
        assert!(ret(MismatchAction::Trap).contains(&libc::SECCOMP_RET_TRAP));
        assert!(ret(MismatchAction::Log).contains(&libc::SECCOMP_RET_LOG));
        assert!(!ret(MismatchAction::Log).contains(&libc::SECCOMP_RET_TRAP));
    }

    #[test]
    fn the_description_reads_as_it_behaves() {
        let doc: BTreeMap<String, Value> = serde_json::from_str(DESCRIPTION).unwrap();
        let names: Vec<&str> = doc.keys().map(String::as_str).collect();
        assert_eq!(names, ["api", "vcpu", "vmm"]);
        for (category, filter) in &doc {
            assert_eq!(filter["default_action"], "kill_process", "{category}");
            assert_eq!(filter["filter_action"], "allow", "{category}");
            let mut conditional = BTreeMap::<&str, (bool, bool)>::new();
            for rule in filter["filter"].as_array().unwrap() {
                let name = rule["syscall"].as_str().unwrap();
                assert!(
                    rule["comment"].as_str().is_some_and(|c| !c.is_empty()),
                    "{category}: {name} has no comment saying why"
                );
                let entry = conditional.entry(name).or_default();
                if rule.get("args").is_some() {
                    entry.0 = true;
                } else {
                    entry.1 = true;
                }
            }
            // seccompiler drops an unconditional rule when the same call also has
            // conditional ones: the description would allow more than the filter.
            for (name, (with_args, without)) in conditional {
                assert!(
                    !(with_args && without),
                    "{category}: {name} has both conditional and unconditional rules"
                );
            }
        }
    }

    /// Firecracker's binary format, as seccompiler-bin writes it.
    fn encode(programs: &[(&str, &[sock_filter])]) -> Vec<u8> {
        let mut out = (programs.len() as u64).to_le_bytes().to_vec();
        for (name, program) in programs {
            out.extend((name.len() as u64).to_le_bytes());
            out.extend(name.as_bytes());
            out.extend((program.len() as u64).to_le_bytes());
            for i in *program {
                out.extend(i.code.to_le_bytes());
                out.extend([i.jt, i.jf]);
                out.extend(i.k.to_le_bytes());
            }
        }
        out
    }

    #[test]
    fn firecracker_bpf_files_are_decoded() {
        let builtin = Filters::builtin(MismatchAction::KillProcess);
        let (vmm, api, vcpu) = (
            builtin.vmm().unwrap(),
            builtin.api().unwrap(),
            builtin.vcpu().unwrap(),
        );
        // Names are case-insensitive, as in Firecracker; order does not matter.
        let bytes = encode(&[("VCPU", &vcpu), ("vmm", &vmm), ("Api", &api)]);
        assert_eq!(Filters::from_bpf(&bytes).unwrap(), builtin);

        // An empty program leaves that category unfiltered.
        let bytes = encode(&[("vcpu", &vcpu), ("vmm", &[]), ("api", &api)]);
        let filters = Filters::from_bpf(&bytes).unwrap();
        assert_eq!(filters.vmm(), None);
        assert_eq!(filters.vcpu(), Some(vcpu.clone()));

        let err = |bytes: &[u8]| Filters::from_bpf(bytes).unwrap_err().to_string();
        assert_eq!(
            err(&encode(&[("vcpu", &vcpu), ("api", &api)])),
            "no filter for the `vmm` thread category"
        );
        assert_eq!(
            err(&encode(&[
                ("vcpu", &vcpu),
                ("api", &api),
                ("vmm", &vmm),
                ("io", &vmm)
            ])),
            "unknown thread category `io`: the categories are vmm, api and vcpu"
        );
        assert_eq!(
            err(&encode(&[("vcpu", &vcpu), ("api", &api), ("VCPU", &vmm)])),
            "two filters for the `vcpu` thread category"
        );
        let full = encode(&[("vcpu", &vcpu), ("api", &api), ("vmm", &vmm)]);
        assert_eq!(
            err(&full[..full.len() - 3]),
            format!(
                "the BPF filter file ends at byte {}, in the middle of a BPF program",
                full.len() - 3
            )
        );
        let mut longer = full.clone();
        longer.extend([0, 0]);
        assert_eq!(
            err(&longer),
            "the BPF filter file has 2 bytes after its last filter"
        );
        // A length claim beyond the input is refused before anything is allocated.
        let mut huge = 1u64.to_le_bytes().to_vec();
        huge.extend(u64::MAX.to_le_bytes());
        huge.extend([0; 16]);
        assert!(err(&huge).contains("in the middle of a thread category name"));
        let too_long = vec![vcpu[0].clone(); BPF_MAX_LEN + 1];
        assert_eq!(
            err(&encode(&[
                ("vcpu", &too_long),
                ("api", &api),
                ("vmm", &vmm)
            ])),
            "the `vcpu` filter has 4097 BPF instructions; the kernel takes at most 4096"
        );
        assert!(err(b"adassafvc").contains("ends at byte 9"));
    }

    #[test]
    fn json_filter_files_are_compiled() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("filters.json");
        std::fs::write(&path, format!("\n  {DESCRIPTION}")).unwrap();
        let filters = Filters::from_file(&path).unwrap();
        assert_eq!(filters, Filters::builtin(MismatchAction::KillProcess));

        let path = dir.path().join("bad.json");
        std::fs::write(
            &path,
            r#"{"vmm": {"default_action": "trap", "filter_action": "allow",
                "filter": [{"syscall": "no_such_call"}]}}"#,
        )
        .unwrap();
        let msg = Filters::from_file(&path).unwrap_err().to_string();
        assert!(
            msg.starts_with(&format!(
                "invalid seccomp filter file {}: the JSON filters do not compile",
                path.display()
            )),
            "{msg}"
        );
        assert!(msg.contains("no_such_call"), "{msg}");

        let path = dir.path().join("partial.json");
        let vmm_only = r#"{"vmm": {"default_action": "trap", "filter_action": "allow",
            "filter": [{"syscall": "read"}]}}"#;
        std::fs::write(&path, vmm_only).unwrap();
        let msg = Filters::from_file(&path).unwrap_err().to_string();
        assert!(
            msg.ends_with("no filter for the `api` thread category"),
            "{msg}"
        );

        let missing = dir.path().join("missing.json");
        let msg = Filters::from_file(&missing).unwrap_err().to_string();
        assert!(
            msg.starts_with(&format!(
                "cannot read the seccomp filter file {}",
                missing.display()
            )),
            "{msg}"
        );
    }

    #[test]
    fn flags_select_the_configuration() {
        let path = PathBuf::from("/f.bpf");
        assert_eq!(
            SeccompConfig::from_args(false, None).unwrap(),
            SeccompConfig::Default
        );
        assert_eq!(
            SeccompConfig::from_args(true, None).unwrap(),
            SeccompConfig::None
        );
        assert_eq!(
            SeccompConfig::from_args(false, Some(path.clone())).unwrap(),
            SeccompConfig::Custom(path.clone())
        );
        assert_eq!(
            SeccompConfig::from_args(true, Some(path))
                .unwrap_err()
                .to_string(),
            "--no-seccomp and --seccomp-filter /f.bpf cannot be used together"
        );
        let none = Filters::load(&SeccompConfig::None).unwrap();
        assert!(none.is_empty());
        assert!(none.vcpu_hook().is_none());
        assert!(Filters::builtin(MismatchAction::KillProcess)
            .vcpu_hook()
            .is_some());
    }

    #[test]
    fn actions_parse() {
        assert_eq!(
            "trap".parse::<MismatchAction>().unwrap(),
            MismatchAction::Trap
        );
        assert_eq!(
            "log".parse::<MismatchAction>().unwrap(),
            MismatchAction::Log
        );
        assert_eq!(
            "kill_process".parse::<MismatchAction>().unwrap(),
            MismatchAction::KillProcess
        );
        assert_eq!(
            "kill".parse::<MismatchAction>().unwrap_err().to_string(),
            "invalid EMBER_SECCOMP_ACTION value `kill`: use kill_process, trap or log"
        );
    }

    #[test]
    fn an_empty_program_installs_nothing() {
        let status = in_child(|| {
            if apply(&[]).is_err() {
                return 3;
            }
            // SAFETY: getppid has no preconditions.
            unsafe { libc::getppid() };
            // SAFETY: prctl(PR_GET_SECCOMP) only reads the mode.
            unsafe { libc::prctl(libc::PR_GET_SECCOMP) }
        });
        assert!(exited_with(status, 0), "status {status:#x}");
    }
}
