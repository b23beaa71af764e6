//! Counting KVM events of a running VM with `perf stat -p`, for benchmarks
//! that report exits per unit of work.
//!
//! [`PerfStat::attach`] starts `perf stat -x, -e EVENTS -p PID` with a
//! control FIFO and returns only once perf acknowledged a command, that is
//! once it is attached and counting; [`PerfStat::finish`] stops it
//! (SIGINT) and returns the counts. Windows of two different sizes give a
//! per-unit cost with the fixed costs cancelled.
//!
//! On a PVM host (`kvm_pvm`), `kvm:kvm_exit` is never emitted; the exits a
//! device causes are visible as `kvm:kvm_mmio` (every MMIO access, the
//! queue notifications that end in an ioeventfd included),
//! `kvm:kvm_pio` and `kvm:kvm_userspace_exit` (exits that reach the VMM).
//!
//! ```no_run
//! use ember_tests::perf::PerfStat;
//!
//! # let pid = 1;
//! let perf = PerfStat::attach(pid, &["kvm:kvm_mmio", "kvm:kvm_userspace_exit"]).unwrap();
//! // ... the work ...
//! let counts = perf.finish().unwrap();
//! println!("{} MMIO exits", counts["kvm:kvm_mmio"]);
//! ```

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::vm::TempDir;

/// How long perf may take to attach.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors running perf.
#[derive(Debug, thiserror::Error)]
pub enum PerfError {
    /// A temporary file or FIFO could not be created or opened.
    #[error("perf: cannot set up {path}: {source}")]
    Setup {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// perf could not be started.
    #[error("cannot start perf: {0}")]
    Spawn(#[source] io::Error),
    /// perf did not acknowledge the control command in time, or exited.
    #[error("perf did not attach to pid {pid}: {detail}")]
    Attach {
        /// The process perf was to watch.
        pid: u32,
        /// What happened.
        detail: String,
    },
    /// perf's report could not be read or lacks an event.
    #[error("perf report {path}: {detail}")]
    Report {
        /// The report file.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },
}

/// A `perf stat` session attached to a process.
#[derive(Debug)]
pub struct PerfStat {
    child: Child,
    report: PathBuf,
    events: Vec<String>,
    _dir: TempDir,
}

fn mkfifo(path: &Path) -> Result<(), PerfError> {
    let setup = |source| PerfError::Setup {
        path: path.to_path_buf(),
        source,
    };
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| setup(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
    // SAFETY: mkfifo(3) reads the NUL-terminated path, which outlives the call.
    if unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) } != 0 {
        return Err(setup(io::Error::last_os_error()));
    }
    Ok(())
}

/// Opens a FIFO read-write: on Linux that never blocks, whoever else has
/// it open.
fn open_fifo(path: &Path) -> Result<File, PerfError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|source| PerfError::Setup {
            path: path.to_path_buf(),
            source,
        })
}

impl PerfStat {
    /// Attaches `perf stat` to `pid`, counting `events`; returns once perf
    /// counts.
    pub fn attach(pid: u32, events: &[&str]) -> Result<Self, PerfError> {
        let dir = TempDir::new().map_err(|e| PerfError::Setup {
            path: std::env::temp_dir(),
            source: io::Error::other(e.to_string()),
        })?;
        let ctl = dir.path().join("ctl");
        let ack = dir.path().join("ack");
        let report = dir.path().join("perf.csv");
        mkfifo(&ctl)?;
        mkfifo(&ack)?;
        let mut ctl_file = open_fifo(&ctl)?;
        let mut ack_file = open_fifo(&ack)?;
        let mut child = Command::new("perf")
            .args(["stat", "-x,", "-o"])
            .arg(&report)
            .arg("--control")
            .arg(format!("fifo:{},{}", ctl.display(), ack.display()))
            .args(events.iter().flat_map(|e| ["-e", e]))
            .args(["-p", &pid.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(PerfError::Spawn)?;
        // perf reads commands only from its counting loop: an "ack" means
        // the counters are attached and enabled.
        let result = ctl_file
            .write_all(b"enable\n")
            .map_err(|e| e.to_string())
            .and_then(|()| wait_for_ack(&mut ack_file, &mut child));
        if let Err(detail) = result {
            let _ = child.kill();
            let stderr = child
                .wait_with_output()
                .map(|out| String::from_utf8_lossy(&out.stderr).into_owned())
                .unwrap_or_default();
            return Err(PerfError::Attach {
                pid,
                detail: format!("{detail}; perf said: {}", stderr.trim()),
            });
        }
        Ok(PerfStat {
            child,
            report,
            events: events.iter().map(|e| e.to_string()).collect(),
            _dir: dir,
        })
    }

    /// Stops perf and returns the count of every event (clock events in
    /// whole milliseconds).
    pub fn finish(self) -> Result<HashMap<String, u64>, PerfError> {
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: kill(2) has no memory effects; perf is our unreaped
            // child, so the pid is still its own.
            unsafe { libc::kill(pid, libc::SIGINT) };
        }
        let stderr = self
            .child
            .wait_with_output()
            .map(|out| String::from_utf8_lossy(&out.stderr).into_owned())
            .unwrap_or_default();
        let report_error = |detail: String| PerfError::Report {
            path: self.report.clone(),
            detail,
        };
        let text = fs::read_to_string(&self.report)
            .map_err(|e| report_error(format!("{e}; perf said: {}", stderr.trim())))?;
        let mut counts = HashMap::new();
        // CSV lines: count,unit,event,run time,percentage,...
        for line in text.lines() {
            let fields: Vec<&str> = line.split(',').collect();
            if let (Some(count), Some(event)) = (fields.first(), fields.get(2)) {
                // Software clocks are fractional milliseconds: truncated.
                if let Ok(count) = count.parse::<f64>() {
                    counts.insert(event.to_string(), count as u64);
                }
            }
        }
        for event in &self.events {
            if !counts.contains_key(event) {
                return Err(report_error(format!("no count for {event} in {text:?}")));
            }
        }
        Ok(counts)
    }
}

/// Reads the FIFO until perf writes "ack", perf exits, or time runs out.
fn wait_for_ack(ack: &mut File, child: &mut Child) -> Result<(), String> {
    let deadline = Instant::now() + ATTACH_TIMEOUT;
    let mut got = Vec::new();
    let mut buf = [0u8; 64];
    loop {
        match ack.read(&mut buf) {
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(format!("reading the ack FIFO: {e}")),
        }
        if got.windows(3).any(|w| w == b"ack") {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("perf exited ({status})"));
        }
        if Instant::now() >= deadline {
            return Err(format!("no ack within {ATTACH_TIMEOUT:?}"));
        }
        thread::sleep(Duration::from_millis(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_events_of_a_running_process_between_attach_and_finish() {
        // A process that context-switches steadily.
        let mut busy = Command::new("sh")
            .args(["-c", "while :; do sleep 0.001; done"])
            .spawn()
            .unwrap();
        let perf = PerfStat::attach(busy.id(), &["context-switches", "task-clock"]);
        thread::sleep(Duration::from_millis(200));
        let counts = perf.and_then(PerfStat::finish);
        let _ = busy.kill();
        let _ = busy.wait();
        let counts = counts.unwrap();
        assert!(counts["context-switches"] > 10, "{counts:?}");
        assert!(counts.contains_key("task-clock"), "{counts:?}");
    }

    #[test]
    fn attach_to_a_missing_process_fails() {
        let err = PerfStat::attach(u32::MAX / 2, &["context-switches"]).unwrap_err();
        assert!(matches!(err, PerfError::Attach { .. }), "{err}");
    }
}
