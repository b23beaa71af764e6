//! Per-thread seccomp filters, as Firecracker installs them: the VMM thread, the API
//! thread and every vCPU thread may make only the system calls their work needs, and for
//! `ioctl`, `fcntl`, `futex`, `mmap` and a few more only the argument values it uses.
//!
//! Any other system call is trapped (`SECCOMP_RET_TRAP`), as in Firecracker: the SIGSYS
//! handler ([`install_sigsys_handler`]) logs "Shutting down VM after intercepting a bad
//! syscall (N).", counts the fault ([`fault_count`], the `seccomp.num_faults` metric),
//! runs the process's last words (a metrics flush) and exits with
//! [`BAD_SYSCALL_EXIT_CODE`] (148). A SIGSYS that no filter raised (`kill -SYS`) is not
//! a fault: it is logged and the process exits with [`UNEXPECTED_SIGNAL_EXIT_CODE`] (2),
//! Firecracker's `UnexpectedError`.
//!
//! The filters are described, with a comment per rule, in
//! `crates/seccomp/filters/x86_64-unknown-linux-gnu.json` in seccompiler's JSON format
//! (one filter per thread category: `vmm`, `api`, `vcpu`), and compiled into BPF by
//! `build.rs`, so start-up only copies ready programs ([`Filters::builtin`]). There is
//! one build of them: no environment variable or run-time switch weakens them.
//!
//! Where each thread installs its filter, before it does anything a guest or an API
//! client can influence:
//!
//! - the API thread, first thing;
//! - each vCPU thread, first thing, before its first `KVM_RUN` ([`Filters::vcpu_hook`]);
//! - the VMM thread, once the VM is built and before the guest runs: the vCPUs start
//!   paused, the VMM thread [`apply`]s its filter, then resumes them. (A thread inherits
//!   the filters of the thread that creates it, so the vCPU threads must exist before the
//!   VMM thread's filter does, or they would be held to both.)
//!
//! What the flags select ([`SeccompConfig`]): `--no-seccomp`, no filters;
//! `--seccomp-filter FILE`, the filters in FILE instead of the built-in ones, either in
//! Firecracker's format (BPF compiled by `seccompiler-bin`: bitcode since Firecracker
//! 1.10, bincode before) or in seccompiler's JSON format; neither, the built-in filters.
//! A filter file is the one way to run with other filters, log-only ones included (the
//! end-to-end tests trace Ember that way): it takes a flag, never an environment
//! variable.
//!
//! # Example
//!
//! ```no_run
//! use ember_seccomp::{apply, install_sigsys_handler, Filters, SeccompConfig};
//!
//! fn last_words() {
//!     // Flush the metrics, for instance.
//! }
//!
//! let config = SeccompConfig::from_args(false, None)?;
//! let filters = Filters::load(&config)?;
//! install_sigsys_handler(Some(last_words))?;
//! // ... build the VM, start its vCPUs paused with `filters.vcpu_hook()` ...
//! if let Some(filter) = filters.vmm() {
//!     apply(&filter)?;
//! }
//! // ... resume the vCPUs, run the event loop.
//! # Ok::<(), ember_seccomp::SeccompError>(())
//! ```

#![deny(missing_docs)]

use std::collections::HashMap;
use std::fmt;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use seccompiler::TargetArch;
pub use seccompiler::{sock_filter, BpfProgram};

/// The filter description compiled into the binary (seccompiler's JSON format).
pub const DESCRIPTION: &str = include_str!("../filters/x86_64-unknown-linux-gnu.json");

/// Exit code after a forbidden system call was trapped (Firecracker's `BadSyscall`).
pub const BAD_SYSCALL_EXIT_CODE: u8 = 148;

/// Exit code after a SIGSYS that no filter raised, e.g. `kill -SYS` (Firecracker's
/// `UnexpectedError`).
pub const UNEXPECTED_SIGNAL_EXIT_CODE: u8 = 2;

/// `si_code` of a SIGSYS raised by a seccomp filter (`SYS_SECCOMP`,
/// asm-generic/siginfo.h).
pub const SYS_SECCOMP: libc::c_int = 1;

/// Largest file in Firecracker's binary format read, Firecracker's own limit: three
/// programs of at most 4096 eight-byte instructions fit.
pub const MAX_BINARY_FILE_LEN: usize = 100_000;

/// What a new vCPU thread runs first (the type of `ember_vcpu::ThreadHook`).
pub type ThreadHook =
    Box<dyn FnOnce() -> Result<(), Box<dyn std::error::Error + Send + Sync>> + Send>;

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
    /// A binary filter file is larger than Firecracker's limit.
    #[error("the binary filter file has {len} bytes; at most {MAX_BINARY_FILE_LEN} are read")]
    BinaryTooLarge {
        /// Its length.
        len: usize,
    },
    /// A binary filter file is neither Firecracker's bitcode format nor its older
    /// bincode format.
    #[error(
        "the binary filter file is not in Firecracker's format: as bitcode: {bitcode}; \
         as bincode: {bincode}"
    )]
    NotFirecrackerFormat {
        /// Why it is not bitcode.
        bitcode: String,
        /// Why it is not bincode.
        bincode: Box<SeccompError>,
    },
    /// A binary filter file reads as valid filters in both formats, differently.
    #[error("the binary filter file reads as different filters in bitcode and bincode")]
    Ambiguous,
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

impl SeccompError {
    /// Whether this says the file decoded but its filters are not Ember's.
    fn is_about_the_filters(&self) -> bool {
        matches!(
            self,
            SeccompError::UnknownCategory(_)
                | SeccompError::DuplicateCategory(_)
                | SeccompError::MissingCategory(_)
                | SeccompError::TooLong { .. }
        )
    }
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

/// One BPF instruction as `build.rs` writes it: (code, jt, jf, k).
type Insn = (u16, u8, u8, u32);

/// The programs `build.rs` compiled.
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
    /// Unless `config` is [`SeccompConfig::None`], this also keeps glibc from opening
    /// files behind the filters' back (see `prepare_glibc`). Call it before starting any
    /// thread, and install the SIGSYS handler ([`install_sigsys_handler`]).
    ///
    /// # Errors
    ///
    /// An unreadable or invalid filter file (see [`Filters::from_json`] and
    /// [`Filters::from_bpf`]).
    pub fn load(config: &SeccompConfig) -> Result<Filters, SeccompError> {
        let filters = match config {
            SeccompConfig::None => return Ok(Filters::none()),
            SeccompConfig::Default => Filters::builtin(),
            SeccompConfig::Custom(path) => Filters::from_file(path)?,
        };
        prepare_glibc();
        Ok(filters)
    }

    /// No filters (`--no-seccomp`).
    pub fn none() -> Filters {
        Filters::default()
    }

    /// The filters built into the binary; what they do not allow is trapped.
    pub fn builtin() -> Filters {
        let programs = &generated::BUILTIN;
        Filters {
            vmm: Some(Arc::new(refuse_unlink(program(programs.vmm)))),
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
    /// `seccompiler-bin`: a map from thread category to BPF program, each instruction a
    /// `u64` holding `struct sock_filter` in little-endian order. Since Firecracker 1.10
    /// the map is serialized with bitcode 0.6 (`bitcode::serialize` of a
    /// `BTreeMap<String, Vec<u64>>`); before, with bincode (fixed-width little-endian
    /// integers). Both are read; a file that reads as valid filters in both formats,
    /// differently, is refused. As in Firecracker, category names are case-insensitive
    /// and an empty program means no filter for that category.
    ///
    /// # Errors
    ///
    /// [`SeccompError::BinaryTooLarge`], [`SeccompError::NotFirecrackerFormat`],
    /// [`SeccompError::Ambiguous`] for malformed input; [`SeccompError::UnknownCategory`],
    /// [`SeccompError::DuplicateCategory`], [`SeccompError::MissingCategory`],
    /// [`SeccompError::TooLong`] for filters Ember cannot use.
    pub fn from_bpf(bytes: &[u8]) -> Result<Filters, SeccompError> {
        if bytes.len() > MAX_BINARY_FILE_LEN {
            return Err(SeccompError::BinaryTooLarge { len: bytes.len() });
        }
        let bitcode = Filters::from_bitcode(bytes);
        let bincode = Filters::from_bincode(bytes);
        match (bitcode, bincode) {
            (Ok(a), Ok(b)) if a == b => Ok(a),
            (Ok(_), Ok(_)) => Err(SeccompError::Ambiguous),
            (Ok(a), Err(_)) => Ok(a),
            (Err(_), Ok(b)) => Ok(b),
            // A file that decodes in one format but names the wrong categories: that
            // says more than "not the other format".
            (Err(BitcodeError::Filters(e)), Err(_)) => Err(e),
            (Err(BitcodeError::Decode(_)), Err(e)) if e.is_about_the_filters() => Err(e),
            (Err(BitcodeError::Decode(bitcode)), Err(bincode)) => {
                Err(SeccompError::NotFirecrackerFormat {
                    bitcode,
                    bincode: Box::new(bincode),
                })
            }
        }
    }

    /// Firecracker's current format: bitcode of a map from category to `u64`
    /// instructions.
    fn from_bitcode(bytes: &[u8]) -> Result<Filters, BitcodeError> {
        let map: HashMap<String, Vec<u64>> =
            bitcode::deserialize(bytes).map_err(|e| BitcodeError::Decode(e.to_string()))?;
        let mut programs = Vec::with_capacity(map.len());
        for (name, insns) in map {
            let program: BpfProgram = insns
                .into_iter()
                .map(|i| {
                    let b = i.to_le_bytes();
                    sock_filter {
                        code: u16::from_le_bytes([b[0], b[1]]),
                        jt: b[2],
                        jf: b[3],
                        k: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
                    }
                })
                .collect();
            let lower = name.to_lowercase();
            if programs.iter().any(|(n, _)| *n == lower) {
                return Err(BitcodeError::Filters(SeccompError::DuplicateCategory(name)));
            }
            programs.push((lower, program));
        }
        Filters::from_programs(programs).map_err(BitcodeError::Filters)
    }

    /// Firecracker's format before 1.10: bincode.
    fn from_bincode(bytes: &[u8]) -> Result<Filters, SeccompError> {
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
            let program = if category == ThreadCategory::Vmm && !program.is_empty() {
                refuse_unlink(program)
            } else {
                program
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

/// `AUDIT_ARCH_X86_64` (linux/audit.h).
const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;

/// What the VMM thread's filter does first, in front of the program proper: `unlink`
/// and `unlinkat` fail with `EPERM`, whatever the program says. The VMM thread never
/// removes a file once filtered: its sockets are removed by a separate process that
/// learnt their paths before the filter went in (see the `socket_reaper` module of
/// the `ember` crate), and the code that would remove them in place is answered
/// `EPERM` instead of being trapped.
fn refuse_unlink(program: BpfProgram) -> BpfProgram {
    // BPF_LD | BPF_W | BPF_ABS, BPF_JMP | BPF_JEQ | BPF_K, BPF_RET | BPF_K.
    const LD: u16 = 0x20;
    const JEQ: u16 = 0x15;
    const RET: u16 = 0x06;
    let insn = |code, jt, jf, k| sock_filter { code, jt, jf, k };
    let prefix = [
        // struct seccomp_data: nr at 0, arch at 4. Another architecture goes to
        // the program proper, which refuses it.
        insn(LD, 0, 0, 4),
        insn(JEQ, 0, 4, AUDIT_ARCH_X86_64),
        insn(LD, 0, 0, 0),
        insn(JEQ, 1, 0, libc::SYS_unlink as u32),
        insn(JEQ, 0, 1, libc::SYS_unlinkat as u32),
        insn(RET, 0, 0, libc::SECCOMP_RET_ERRNO | libc::EPERM as u32),
    ];
    // A program read back from a filter file that Ember's own filters were written
    // to already has it.
    if program.starts_with(&prefix) {
        return program;
    }
    let mut out = prefix.to_vec();
    out.extend(program);
    out
}

/// Why a file is not usable bitcode filters.
enum BitcodeError {
    /// Not bitcode of a map from strings to `u64` lists.
    Decode(String),
    /// A map, but not of Ember's categories.
    Filters(SeccompError),
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

/// Seccomp faults so far: the `seccomp.num_faults` metric.
static NUM_FAULTS: AtomicU64 = AtomicU64::new(0);

/// What the SIGSYS handler runs after logging, before it exits.
static LAST_WORDS: OnceLock<fn()> = OnceLock::new();

/// How many system calls the filters trapped: Firecracker's `seccomp.num_faults`.
/// It is at most 1, since the first one ends the process; the metrics line written on
/// the way out reports it.
pub fn fault_count() -> u64 {
    NUM_FAULTS.load(Ordering::Relaxed)
}

/// What a SIGSYS means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sigsys {
    /// A filter trapped system call `nr` (`si_code` is [`SYS_SECCOMP`]).
    BadSyscall {
        /// The system call number.
        nr: i32,
    },
    /// Another origin, e.g. `kill -SYS`: not a seccomp fault.
    Other {
        /// `si_code`.
        code: i32,
    },
}

impl Sigsys {
    /// Reads what the kernel put in `info` for SIGSYS.
    fn from_info(info: &SigsysInfo) -> Sigsys {
        if info.code == SYS_SECCOMP {
            Sigsys::BadSyscall { nr: info.syscall }
        } else {
            Sigsys::Other { code: info.code }
        }
    }

    /// The exit code: [`BAD_SYSCALL_EXIT_CODE`] for a fault,
    /// [`UNEXPECTED_SIGNAL_EXIT_CODE`] otherwise.
    pub fn exit_code(self) -> u8 {
        match self {
            Sigsys::BadSyscall { .. } => BAD_SYSCALL_EXIT_CODE,
            Sigsys::Other { .. } => UNEXPECTED_SIGNAL_EXIT_CODE,
        }
    }
}

/// Counts and logs `sigsys` as Firecracker's handler does, then runs the last words.
fn report(sigsys: Sigsys) {
    let code = match sigsys {
        Sigsys::BadSyscall { .. } => SYS_SECCOMP,
        Sigsys::Other { code } => code,
    };
    if let Sigsys::BadSyscall { .. } = sigsys {
        NUM_FAULTS.fetch_add(1, Ordering::Relaxed);
    }
    log::error!(
        "Shutting down VM after intercepting signal {}, code {code}.",
        libc::SIGSYS
    );
    if let Sigsys::BadSyscall { nr } = sigsys {
        log::error!("Shutting down VM after intercepting a bad syscall ({nr}).");
    }
    if let Some(last_words) = LAST_WORDS.get() {
        last_words();
    }
    log::logger().flush();
}

/// Reports a SIGSYS, then ends the process. Runs on the thread that made the call,
/// under its filter, with every other signal blocked.
///
/// Like Firecracker's handler it logs and flushes the metrics, which takes locks and
/// allocates: a filter that forbids a call made while the logger's, the metrics' or
/// malloc's lock is held would hang here instead of exiting. The system calls it makes
/// (`write`, `clock_gettime`, `futex`, memory allocation) are in every built-in filter.
extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for SIGSYS, laid out as SigsysInfo.
    let sigsys = Sigsys::from_info(unsafe { &*info.cast::<SigsysInfo>() });
    report(sigsys);
    // SAFETY: ends the process at once, without running anything else of it.
    unsafe { libc::_exit(libc::c_int::from(sigsys.exit_code())) };
}

/// Installs the SIGSYS handler: a system call a filter traps is logged ("Shutting down
/// VM after intercepting a bad syscall (N)."), counted in [`fault_count`], then
/// `last_words` runs (to flush the metrics) and the process exits with
/// [`BAD_SYSCALL_EXIT_CODE`]. A SIGSYS from elsewhere is logged and ends the process
/// with [`UNEXPECTED_SIGNAL_EXIT_CODE`], without counting a fault. Firecracker installs
/// it whether or not filters are in use; so does Ember.
///
/// # Errors
///
/// [`SeccompError::SigsysHandler`] when `sigaction` fails.
pub fn install_sigsys_handler(last_words: Option<fn()>) -> Result<(), SeccompError> {
    if let Some(f) = last_words {
        // A second call keeps the first function: there is one process to end.
        let _ = LAST_WORDS.set(f);
    }
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

    /// Whether a filter trapped a call: the child was killed by SIGSYS, or ended by the
    /// handler another test of this process installed (the fork inherits it).
    fn trapped(status: libc::c_int) -> bool {
        (libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS)
            || exited_with(status, i32::from(BAD_SYSCALL_EXIT_CODE))
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
        Filters::builtin()
            .get(category)
            .expect("every category has a built-in filter")
    }

    #[test]
    fn a_forbidden_system_call_is_trapped() {
        for category in ThreadCategory::ALL {
            let filter = builtin(category);
            // No thread of Ember opens network sockets or asks for its parent.
            let status = run_filtered(&filter, || {
                // SAFETY: a plain system call with integer arguments.
                unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
            });
            assert!(trapped(status), "{category}: status {status:#x}");
            let status = run_filtered(&filter, || {
                // SAFETY: getppid has no preconditions.
                unsafe { libc::getppid() };
            });
            assert!(trapped(status), "{category}: status {status:#x}");
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
        assert!(trapped(status), "status {status:#x}");
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

    /// The handler's last words in the tests: the fault count, on stderr.
    fn write_fault_count() {
        let msg: &[u8] = match fault_count() {
            0 => b"last words, faults=0\n",
            1 => b"last words, faults=1\n",
            _ => b"last words, faults=many\n",
        };
        // SAFETY: writes a static buffer to stderr.
        unsafe { libc::write(libc::STDERR_FILENO, msg.as_ptr().cast(), msg.len()) };
    }

    /// Runs `child` in a forked child with stderr on a pipe; returns its status and
    /// what it wrote.
    fn with_stderr(child: impl FnOnce() -> libc::c_int) -> (libc::c_int, String) {
        let mut fds = [0; 2];
        // SAFETY: creates a pipe into a local array.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        let status = in_child(|| {
            // SAFETY: points the child's stderr at the pipe.
            unsafe { libc::dup2(fds[1], libc::STDERR_FILENO) };
            child()
        });
        // SAFETY: closes the write end we own, so the read below sees EOF.
        unsafe { libc::close(fds[1]) };
        let mut out = String::new();
        // SAFETY: the read end is ours; File takes ownership and closes it.
        let mut reader = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fds[0]) };
        reader.read_to_string(&mut out).unwrap();
        (status, out)
    }

    #[test]
    fn a_trapped_call_is_counted_and_exits_148() {
        let filter = Filters::builtin().vcpu().unwrap();
        install_sigsys_handler(Some(write_fault_count)).unwrap();
        let (status, out) = with_stderr(|| {
            if apply(&filter).is_err() {
                return 3;
            }
            // SAFETY: getppid has no preconditions.
            unsafe { libc::getppid() };
            0
        });
        assert!(
            exited_with(status, 148),
            "status {status:#x}, stderr {out:?}"
        );
        assert_eq!(out, "last words, faults=1\n");
    }

    #[test]
    fn a_sigsys_sent_by_kill_is_not_a_fault() {
        install_sigsys_handler(Some(write_fault_count)).unwrap();
        let (status, out) = with_stderr(|| {
            // SAFETY: sends SIGSYS to this (child) process, as `kill -SYS` would.
            unsafe { libc::kill(libc::getpid(), libc::SIGSYS) };
            0
        });
        assert!(exited_with(status, 2), "status {status:#x}, stderr {out:?}");
        assert_eq!(out, "last words, faults=0\n");
    }

    #[test]
    fn the_vmm_thread_gets_eperm_for_unlink() {
        let dir = tempfile::tempdir().unwrap();
        let path = std::ffi::CString::new(dir.path().join("sock").to_str().unwrap()).unwrap();
        std::fs::write(dir.path().join("sock"), "").unwrap();
        let filters = Filters::from_json(DESCRIPTION.as_bytes()).unwrap();
        for filter in [Filters::builtin().vmm().unwrap(), filters.vmm().unwrap()] {
            let status = in_child(|| {
                if apply(&filter).is_err() {
                    return 3;
                }
                // SAFETY: `path` is NUL-terminated and outlives the call.
                let ret = unsafe { libc::unlink(path.as_ptr()) };
                let errno = io::Error::last_os_error().raw_os_error();
                // SAFETY: as above.
                let ret_at = unsafe { libc::unlinkat(libc::AT_FDCWD, path.as_ptr(), 0) };
                if ret == -1 && errno == Some(libc::EPERM) && ret_at == -1 {
                    0
                } else {
                    4
                }
            });
            assert!(exited_with(status, 0), "status {status:#x}");
            assert!(dir.path().join("sock").exists());
        }
    }

    #[test]
    fn sigsys_origins_are_told_apart() {
        let info = |code, syscall| SigsysInfo {
            signo: libc::SIGSYS,
            errno: 0,
            code,
            _pad: 0,
            call_addr: std::ptr::null_mut(),
            syscall,
            arch: 0,
        };
        let fault = Sigsys::from_info(&info(SYS_SECCOMP, 16));
        assert_eq!(fault, Sigsys::BadSyscall { nr: 16 });
        assert_eq!(fault.exit_code(), 148);
        // SI_USER: kill(2).
        let sent = Sigsys::from_info(&info(0, 16));
        assert_eq!(sent, Sigsys::Other { code: 0 });
        assert_eq!(sent.exit_code(), 2);
    }

    #[test]
    fn the_built_in_programs_match_the_description() {
        // build.rs compiled the same JSON: the programs must be what seccompiler makes
        // of it now.
        let compiled =
            seccompiler::compile_from_json(DESCRIPTION.as_bytes(), TargetArch::x86_64).unwrap();
        let builtin = Filters::builtin();
        for category in ThreadCategory::ALL {
            let program = builtin.get(category).unwrap();
            let proper = match category {
                ThreadCategory::Vmm => &program[6..],
                _ => &program[..],
            };
            assert_eq!(proper, &compiled[category.name()][..], "{category}");
            assert!(program.len() <= BPF_MAX_LEN);
            // What a program returns: allow, or trap; never log or errno.
            let rets: std::collections::BTreeSet<u32> = program
                .iter()
                .filter(|i| i.code == 0x06) // BPF_RET | BPF_K
                .map(|i| i.k)
                .collect();
            assert!(rets.contains(&libc::SECCOMP_RET_TRAP), "{category}");
            assert!(
                rets.iter().all(|r| [
                    libc::SECCOMP_RET_ALLOW,
                    libc::SECCOMP_RET_TRAP,
                    libc::SECCOMP_RET_KILL_PROCESS,
                    // The VMM thread's unlink.
                    libc::SECCOMP_RET_ERRNO | libc::EPERM as u32,
                ]
                .contains(r)),
                "{category}: {rets:x?}"
            );
        }
    }

    #[test]
    fn the_description_reads_as_it_behaves() {
        let doc: BTreeMap<String, Value> = serde_json::from_str(DESCRIPTION).unwrap();
        let names: Vec<&str> = doc.keys().map(String::as_str).collect();
        assert_eq!(names, ["api", "vcpu", "vmm"]);
        for (category, filter) in &doc {
            assert_eq!(filter["default_action"], "trap", "{category}");
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

    /// Firecracker's binary format before 1.10 (bincode).
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
        let builtin = Filters::builtin();
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
        let msg = err(&full[..full.len() - 3]);
        assert!(
            msg.starts_with("the binary filter file is not in Firecracker's format: as bitcode: "),
            "{msg}"
        );
        assert!(
            msg.ends_with(&format!(
                "as bincode: the BPF filter file ends at byte {}, in the middle of a BPF program",
                full.len() - 3
            )),
            "{msg}"
        );
        let mut longer = full.clone();
        longer.extend([0, 0]);
        assert!(err(&longer).ends_with("the BPF filter file has 2 bytes after its last filter"));
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
        let big = vec![0; MAX_BINARY_FILE_LEN + 1];
        assert_eq!(
            err(&big),
            "the binary filter file has 100001 bytes; at most 100000 are read"
        );
    }

    /// Firecracker's binary format since 1.10, as seccompiler-bin writes it.
    fn encode_bitcode(programs: &[(&str, &[sock_filter])]) -> Vec<u8> {
        let map: BTreeMap<String, Vec<u64>> = programs
            .iter()
            .map(|(name, program)| {
                let insns = program
                    .iter()
                    .map(|i| {
                        u64::from(i.code)
                            | u64::from(i.jt) << 16
                            | u64::from(i.jf) << 24
                            | u64::from(i.k) << 32
                    })
                    .collect();
                (name.to_string(), insns)
            })
            .collect();
        bitcode::serialize(&map).unwrap()
    }

    #[test]
    fn firecracker_bitcode_files_are_decoded() {
        let builtin = Filters::builtin();
        let (vmm, api, vcpu) = (
            builtin.vmm().unwrap(),
            builtin.api().unwrap(),
            builtin.vcpu().unwrap(),
        );
        let bytes = encode_bitcode(&[("Vcpu", &vcpu), ("vmm", &vmm), ("API", &api)]);
        assert_eq!(Filters::from_bpf(&bytes).unwrap(), builtin);
        let bytes = encode_bitcode(&[("vcpu", &vcpu), ("vmm", &[]), ("api", &api)]);
        assert_eq!(Filters::from_bpf(&bytes).unwrap().vmm(), None);

        let err = |bytes: &[u8]| Filters::from_bpf(bytes).unwrap_err().to_string();
        assert_eq!(
            err(&encode_bitcode(&[("vcpu", &vcpu), ("api", &api)])),
            "no filter for the `vmm` thread category"
        );
        assert_eq!(
            err(&encode_bitcode(&[
                ("vcpu", &vcpu),
                ("api", &api),
                ("vmm", &vmm),
                ("io", &vmm)
            ])),
            "unknown thread category `io`: the categories are vmm, api and vcpu"
        );
        let msg = err(&encode_bitcode(&[
            ("vcpu", &vcpu),
            ("api", &api),
            ("VCPU", &vmm),
        ]));
        assert!(msg.starts_with("two filters for the `"), "{msg}");
        // A cut file is refused, whatever the cut.
        let full = encode_bitcode(&[("vcpu", &vcpu), ("api", &api), ("vmm", &vmm)]);
        for cut in [1, 7, full.len() / 2, full.len() - 1] {
            assert!(Filters::from_bpf(&full[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn json_filter_files_are_compiled() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("filters.json");
        std::fs::write(&path, format!("\n  {DESCRIPTION}")).unwrap();
        let filters = Filters::from_file(&path).unwrap();
        assert_eq!(filters, Filters::builtin());

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
        assert!(Filters::builtin().vcpu_hook().is_some());
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
