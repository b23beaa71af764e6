//! Running `ember` on a Firecracker JSON config: to completion with a
//! timeout ([`Launch::run`]), or streaming its serial output
//! ([`RunningVm::wait_for_line`]) for guests that never stop by themselves.

use std::ffi::OsString;
use std::fmt;
use std::fs;
use std::io::{self, Read};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::{ember_binary, DEFAULT_TIMEOUT};

/// Errors from launching or supervising an `ember` process.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The temporary directory or the config file could not be written.
    #[error("cannot write VM config {path}: {source}")]
    WriteConfig {
        /// The file or directory that could not be created.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The config value could not be serialized.
    #[error("cannot serialize the VM config: {0}")]
    Serialize(#[from] serde_json::Error),
    /// The ember process could not be started.
    #[error("cannot start {binary}: {source}")]
    Spawn {
        /// The binary that failed to start.
        binary: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// `wait4` on the ember process failed.
    #[error("cannot wait for ember (pid {pid}): {source}")]
    Wait {
        /// The process id.
        pid: u32,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Ember was still running at the deadline and has been killed.
    #[error("ember was still running after {timeout:?} and was killed\n{output}")]
    Timeout {
        /// The time limit that was exceeded.
        timeout: Duration,
        /// Everything ember printed before it was killed.
        output: Box<Output>,
    },
    /// Ember exited before printing what [`RunningVm::wait_for_line`] waited for.
    #[error("ember exited before the expected serial output\n{output}")]
    Exited {
        /// Everything ember printed, and how it exited.
        output: Box<Output>,
    },
}

/// How an `ember` run ended and what it printed.
#[derive(Debug, Clone)]
pub struct Output {
    /// Exit status (a signal for a killed VM).
    pub status: ExitStatus,
    /// Standard output: the guest's serial console (lossy UTF-8).
    pub stdout: String,
    /// Standard error: ember's own diagnostics (lossy UTF-8).
    pub stderr: String,
    /// Wall time from spawning the process to reaping it.
    pub wall: Duration,
    /// User plus system CPU time of the process (`wait4` rusage).
    pub cpu: Duration,
}

impl Output {
    /// Non-empty lines of stderr, trailing whitespace removed.
    pub fn stderr_lines(&self) -> Vec<&str> {
        self.stderr
            .lines()
            .map(str::trim_end)
            .filter(|l| !l.is_empty())
            .collect()
    }
}

impl fmt::Display for Output {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "ember {} after {:?} (cpu {:?})",
            self.status, self.wall, self.cpu
        )?;
        writeln!(f, "--- stdout ---\n{}", self.stdout)?;
        write!(f, "--- stderr ---\n{}", self.stderr)
    }
}

/// Ember's default VM config for `kernel`, in Firecracker's JSON format:
/// one vCPU, 128 MiB, no `boot_args` (ember then uses Firecracker's default
/// command line).
pub fn default_config(kernel: &Path) -> Value {
    json!({
        "boot-source": {
            "kernel_image_path": kernel,
        },
        "machine-config": {
            "vcpu_count": 1,
            "mem_size_mib": 128,
            "smt": false,
        },
    })
}

/// Applies `patch` to `target` as a JSON merge patch (RFC 7396): objects
/// merge recursively, `null` removes a member, anything else replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Default::default());
    }
    if let Value::Object(map) = target {
        for (key, value) in patch {
            if value.is_null() {
                map.remove(key);
            } else {
                merge_patch(map.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
    }
}

/// Boots `guest` with [`default_config`] merged with `overrides` (a JSON merge
/// patch, `json!({})` for none) and waits up to [`DEFAULT_TIMEOUT`].
pub fn run_guest(guest: &Path, overrides: &Value) -> Result<Output, Error> {
    let mut config = default_config(guest);
    merge_patch(&mut config, overrides);
    Launch::new(&config).run()
}

/// One `ember --no-api --config-file` invocation, configured builder-style.
#[derive(Debug, Clone)]
pub struct Launch {
    config: ConfigSource,
    args: Vec<OsString>,
    timeout: Duration,
    binary: Option<PathBuf>,
    wrapper: Vec<OsString>,
}

#[derive(Debug, Clone)]
enum ConfigSource {
    Json(Value),
    Text(String),
}

impl Launch {
    /// Launches ember with `config` written to a temporary config file.
    pub fn new(config: &Value) -> Self {
        Self::with_source(ConfigSource::Json(config.clone()))
    }

    /// Launches ember with `text` written verbatim as the config file (for
    /// configs that are not valid JSON).
    pub fn from_text(text: impl Into<String>) -> Self {
        Self::with_source(ConfigSource::Text(text.into()))
    }

    fn with_source(config: ConfigSource) -> Self {
        Self {
            config,
            args: Vec::new(),
            timeout: DEFAULT_TIMEOUT,
            binary: None,
            wrapper: Vec::new(),
        }
    }

    /// Adds a command-line argument after `--no-api --config-file FILE`.
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Sets the time limit of [`Launch::run`] (default [`DEFAULT_TIMEOUT`]).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Runs `binary` instead of [`ember_binary`].
    pub fn binary(mut self, binary: impl Into<PathBuf>) -> Self {
        self.binary = Some(binary.into());
        self
    }

    /// Runs ember through a wrapper command: `program args... ember
    /// --no-api ...` (for example `ip netns exec NAME` to start it inside a
    /// network namespace). The wrapper must exec ember in the end, so that
    /// [`RunningVm::pid`] is ember's pid.
    pub fn wrapper<I, S>(mut self, program: impl Into<OsString>, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.wrapper = std::iter::once(program.into())
            .chain(args.into_iter().map(Into::into))
            .collect();
        self
    }

    /// Runs ember to completion. A VM still running after the timeout is
    /// killed and reported as [`Error::Timeout`] with its partial output.
    pub fn run(self) -> Result<Output, Error> {
        let timeout = self.timeout;
        self.spawn()?.wait(timeout)
    }

    /// Starts ember and returns at once; see [`RunningVm`].
    pub fn spawn(self) -> Result<RunningVm, Error> {
        let dir = TempDir::new()?;
        let config_path = dir.path().join("vm-config.json");
        let text = match &self.config {
            ConfigSource::Json(value) => serde_json::to_string_pretty(value)?,
            ConfigSource::Text(text) => text.clone(),
        };
        fs::write(&config_path, text).map_err(|source| Error::WriteConfig {
            path: config_path.clone(),
            source,
        })?;
        let binary = self.binary.unwrap_or_else(ember_binary);
        let mut command = match self.wrapper.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(&binary);
                command
            }
            None => Command::new(&binary),
        };
        let start = Instant::now();
        let mut child = command
            // Its own process group, so a timeout kills everything it started.
            .process_group(0)
            .arg("--no-api")
            .arg("--config-file")
            .arg(&config_path)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| Error::Spawn {
                // What failed to start: the wrapper if there is one.
                binary: self.wrapper.first().map_or(binary.clone(), PathBuf::from),
                source,
            })?;
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let (tx, rx) = mpsc::channel();
        let stdout_reader = stdout.map(|out| thread::spawn(move || pump(out, tx)));
        let stderr_reader = stderr.map(|err| thread::spawn(move || read_all(err)));
        Ok(RunningVm {
            child,
            start,
            stdout_rx: rx,
            stdout_reader,
            stderr_reader,
            stdout: Vec::new(),
            scanned: 0,
            stdout_closed: false,
            reaped: None,
            _dir: dir,
        })
    }
}

/// A running `ember` process whose serial output can be watched line by line.
///
/// Dropping it kills and reaps the VM, so a failing test never leaves one
/// behind.
pub struct RunningVm {
    child: Child,
    start: Instant,
    stdout_rx: Receiver<Vec<u8>>,
    stdout_reader: Option<JoinHandle<()>>,
    stderr_reader: Option<JoinHandle<Vec<u8>>>,
    stdout: Vec<u8>,
    /// Bytes of `stdout` already split into lines and shown to a predicate.
    scanned: usize,
    stdout_closed: bool,
    reaped: Option<Reaped>,
    _dir: TempDir,
}

#[derive(Debug, Clone, Copy)]
struct Reaped {
    status: ExitStatus,
    wall: Duration,
    cpu: Duration,
}

impl RunningVm {
    /// The process id of ember (or of the wrapper, until it execs ember).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Serial output received so far (lossy UTF-8).
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// Reads serial output until a complete line satisfies `pred`, and returns
    /// that line (without its `\r\n`). Lines already examined by an earlier
    /// call are not shown again. On timeout the VM is killed and
    /// [`Error::Timeout`] carries the output so far; if ember exits first,
    /// [`Error::Exited`] says how.
    pub fn wait_for_line(
        &mut self,
        mut pred: impl FnMut(&str) -> bool,
        timeout: Duration,
    ) -> Result<String, Error> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.scan(&mut pred) {
                return Ok(line);
            }
            if self.stdout_closed {
                // Stdout closes when ember exits; should it close stdout
                // and keep running, the deadline still applies.
                let budget = deadline.saturating_duration_since(Instant::now());
                return Err(match self.reap_within(budget)? {
                    Some(reaped) => Error::Exited {
                        output: Box::new(self.take_output(reaped)),
                    },
                    None => self.kill_for_timeout(timeout),
                });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(self.kill_for_timeout(timeout));
            }
            match self.stdout_rx.recv_timeout(deadline - now) {
                Ok(chunk) => self.stdout.extend_from_slice(&chunk),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    self.stdout_closed = true;
                    // A last line without '\n' is complete once the pipe closes.
                    if self.stdout.last().is_some_and(|b| *b != b'\n') {
                        self.stdout.push(b'\n');
                    }
                }
            }
        }
    }

    /// Shows each new complete line to `pred`; returns the first match.
    fn scan(&mut self, pred: &mut impl FnMut(&str) -> bool) -> Option<String> {
        while let Some(pos) = self.stdout[self.scanned..].iter().position(|b| *b == b'\n') {
            let end = self.scanned + pos;
            let line = String::from_utf8_lossy(&self.stdout[self.scanned..end]);
            let line = line.trim_end_matches('\r').to_string();
            self.scanned = end + 1;
            if pred(&line) {
                return Some(line);
            }
        }
        None
    }

    /// Waits up to `timeout` for ember to exit by itself.
    pub fn wait(mut self, timeout: Duration) -> Result<Output, Error> {
        let deadline = Instant::now() + timeout;
        // Drain stdout while waiting so a chatty guest never blocks on a full pipe.
        while !self.stdout_closed {
            let now = Instant::now();
            if now >= deadline {
                return Err(self.kill_for_timeout(timeout));
            }
            match self.stdout_rx.recv_timeout(deadline - now) {
                Ok(chunk) => self.stdout.extend_from_slice(&chunk),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => self.stdout_closed = true,
            }
        }
        // Stdout closes when ember exits (or closes it); give the process the
        // rest of the budget to be reaped.
        match self.reap_within(deadline.saturating_duration_since(Instant::now()))? {
            Some(reaped) => Ok(self.take_output(reaped)),
            None => Err(self.kill_for_timeout(timeout)),
        }
    }

    /// Kills the VM (SIGKILL) and returns what it printed.
    pub fn kill(mut self) -> Result<Output, Error> {
        let reaped = self.kill_and_reap()?;
        Ok(self.take_output(reaped))
    }

    fn kill_for_timeout(&mut self, timeout: Duration) -> Error {
        match self.kill_and_reap() {
            Ok(reaped) => Error::Timeout {
                timeout,
                output: Box::new(self.take_output(reaped)),
            },
            Err(e) => e,
        }
    }

    fn kill_and_reap(&mut self) -> Result<Reaped, Error> {
        if let Some(reaped) = self.reaped {
            return Ok(reaped);
        }
        if let Ok(pgid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: kill(2) has no memory effects. The child is not reaped
            // yet, so its pid (= its process group id, see spawn) cannot
            // have been reused. Errors (ESRCH if the group is gone) leave
            // nothing to do: the wait below still reaps the child.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
        }
        self.reap()
    }

    /// Blocks in `wait4` until the child exits.
    fn reap(&mut self) -> Result<Reaped, Error> {
        if let Some(reaped) = self.reaped {
            return Ok(reaped);
        }
        let reaped = wait4(self.child.id(), 0, self.start)?.ok_or_else(|| Error::Wait {
            pid: self.child.id(),
            source: io::Error::other("wait4 returned no status without WNOHANG"),
        })?;
        self.reaped = Some(reaped);
        Ok(reaped)
    }

    /// Polls `wait4(WNOHANG)` until the child exits or `budget` runs out.
    fn reap_within(&mut self, budget: Duration) -> Result<Option<Reaped>, Error> {
        if let Some(reaped) = self.reaped {
            return Ok(Some(reaped));
        }
        let deadline = Instant::now() + budget;
        loop {
            if let Some(reaped) = wait4(self.child.id(), libc::WNOHANG, self.start)? {
                self.reaped = Some(reaped);
                return Ok(Some(reaped));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            thread::sleep(Duration::from_micros(200));
        }
    }

    /// Collects the rest of stdout and all of stderr (the child is reaped,
    /// so both pipes reach EOF).
    fn take_output(&mut self, reaped: Reaped) -> Output {
        if let Some(reader) = self.stdout_reader.take() {
            let _ = reader.join();
        }
        while let Ok(chunk) = self.stdout_rx.try_recv() {
            self.stdout.extend_from_slice(&chunk);
        }
        self.stdout_closed = true;
        let stderr = self
            .stderr_reader
            .take()
            .and_then(|reader| reader.join().ok())
            .unwrap_or_default();
        Output {
            status: reaped.status,
            stdout: String::from_utf8_lossy(&self.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
            wall: reaped.wall,
            cpu: reaped.cpu,
        }
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        let _ = self.kill_and_reap();
    }
}

/// `wait4(pid, options)`: the exit status, wall time since `start` and the
/// child's CPU time, or `None` if WNOHANG found it still running.
fn wait4(pid: u32, options: libc::c_int, start: Instant) -> Result<Option<Reaped>, Error> {
    let raw_pid = libc::pid_t::try_from(pid).map_err(|_| Error::Wait {
        pid,
        source: io::Error::other("pid does not fit pid_t"),
    })?;
    let mut status: libc::c_int = 0;
    // SAFETY: all-zero is a valid `rusage` (plain integers and timevals).
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: `status` and `usage` are valid, writable, and live for the
        // call; `raw_pid` is our own unreaped child (std's Child never reaps
        // it because we never call its wait methods).
        let ret = unsafe { libc::wait4(raw_pid, &mut status, options, &mut usage) };
        if ret == raw_pid {
            break;
        }
        if ret == 0 {
            return Ok(None);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(Error::Wait { pid, source: err });
        }
    }
    let wall = start.elapsed();
    let cpu = timeval(usage.ru_utime) + timeval(usage.ru_stime);
    Ok(Some(Reaped {
        status: ExitStatus::from_raw(status),
        wall,
        cpu,
    }))
}

fn timeval(tv: libc::timeval) -> Duration {
    let secs = u64::try_from(tv.tv_sec).unwrap_or(0);
    let micros = u64::try_from(tv.tv_usec).unwrap_or(0);
    Duration::from_secs(secs) + Duration::from_micros(micros)
}

/// Forwards stdout chunks to the channel until EOF or the receiver is gone.
fn pump(mut out: ChildStdout, tx: mpsc::Sender<Vec<u8>>) {
    let mut buf = [0u8; 8192];
    loop {
        match out.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if tx.send(buf[..n].to_vec()).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

fn read_all(mut err: ChildStderr) -> Vec<u8> {
    let mut buf = Vec::new();
    let _ = err.read_to_end(&mut buf);
    buf
}

/// A directory under the system temp dir, removed with its contents on drop.
#[derive(Debug)]
pub(crate) struct TempDir(PathBuf);

impl TempDir {
    /// A new directory under the system temp dir.
    pub(crate) fn new() -> Result<Self, Error> {
        let parent = std::env::temp_dir();
        Self::new_in(&parent).map_err(|source| Error::WriteConfig {
            path: parent,
            source,
        })
    }

    /// A new directory inside `parent`.
    pub(crate) fn new_in(parent: &Path) -> io::Result<Self> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = parent.join(format!(
            "ember-tests-{}-{}-{nanos}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir(&path)?;
        Ok(Self(path))
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_patch_follows_rfc_7396() {
        let mut config = default_config(Path::new("/k"));
        merge_patch(
            &mut config,
            &json!({
                "boot-source": {"boot_args": "a=b"},
                "machine-config": {"mem_size_mib": 5120, "smt": null},
                "extra": [1, 2],
            }),
        );
        assert_eq!(
            config,
            json!({
                "boot-source": {"kernel_image_path": "/k", "boot_args": "a=b"},
                "machine-config": {"vcpu_count": 1, "mem_size_mib": 5120},
                "extra": [1, 2],
            })
        );
        merge_patch(&mut config, &json!({"machine-config": 3}));
        assert_eq!(config["machine-config"], json!(3));
    }

    /// A stand-in for ember, so the supervision logic is tested without KVM:
    /// it prints a JSON config file it is given, and runs any other "config
    /// file" as a shell script.
    fn fake_ember() -> PathBuf {
        static FAKE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
        FAKE.get_or_init(|| {
            use std::os::unix::fs::PermissionsExt;
            let dir = std::env::temp_dir().join(format!("ember-tests-fake-{}", std::process::id()));
            fs::create_dir_all(&dir).unwrap();
            let path = dir.join("ember");
            // argv: --no-api --config-file FILE ...
            fs::write(
                &path,
                "#!/bin/sh\n[ \"$1 $2\" = \"--no-api --config-file\" ] || exit 99\nf=$3\nshift 3\n\
                 case \"$(head -c1 \"$f\")\" in \"{\") cat \"$f\";; *) . \"$f\";; esac\n",
            )
            .unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
            path
        })
        .clone()
    }

    fn fake(script: &str) -> Launch {
        Launch::from_text(script).binary(fake_ember())
    }

    #[test]
    fn run_reports_exit_status_output_and_timing() {
        let out = fake("echo serial; echo diag >&2; exit 3")
            .arg("x")
            .run()
            .unwrap();
        assert_eq!(out.status.code(), Some(3), "{out}");
        assert_eq!(out.stdout, "serial\n");
        assert_eq!(out.stderr_lines(), ["diag"]);
        assert!(out.wall < DEFAULT_TIMEOUT);
    }

    #[test]
    fn run_passes_the_config_file_and_extra_args() {
        let config = json!({"machine-config": {"mem_size_mib": 64}});
        let out = Launch::new(&config).binary(fake_ember()).run().unwrap();
        assert!(out.status.success(), "{out}");
        assert_eq!(serde_json::from_str::<Value>(&out.stdout).unwrap(), config);

        let out = fake(r#"echo "$@""#).arg("--id").arg("vm1").run().unwrap();
        assert_eq!(out.stdout, "--id vm1\n", "{out}");
    }

    #[test]
    fn wrapper_runs_before_the_binary() {
        let out = fake(r#"echo "$@""#)
            .wrapper("env", ["EMBER_WRAPPED=1"])
            .arg("--id")
            .run()
            .unwrap();
        assert_eq!(out.stdout, "--id\n", "{out}");
        let out = fake("echo $EMBER_WRAPPED $$")
            .wrapper("env", ["EMBER_WRAPPED=yes"])
            .spawn()
            .unwrap();
        let pid = out.pid();
        let out = out.wait(DEFAULT_TIMEOUT).unwrap();
        assert_eq!(
            out.stdout,
            format!("yes {pid}\n"),
            "env execs the binary: same pid"
        );
    }

    #[test]
    fn run_measures_child_cpu_time() {
        let out = fake("i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done")
            .run()
            .unwrap();
        assert!(out.status.success(), "{out}");
        assert!(out.cpu >= Duration::from_millis(50), "{out}");
        assert!(out.wall >= out.cpu / 2, "{out}");
    }

    #[test]
    fn run_kills_a_hung_vm_and_keeps_its_output() {
        let start = Instant::now();
        let err = fake("echo partial; echo why >&2; sleep 60 & sleep 60")
            .timeout(Duration::from_millis(300))
            .run()
            .unwrap_err();
        assert!(start.elapsed() < Duration::from_secs(10));
        let Error::Timeout { timeout, output } = err else {
            panic!("expected a timeout, got {err}");
        };
        assert_eq!(timeout, Duration::from_millis(300));
        assert_eq!(output.stdout, "partial\n");
        assert_eq!(output.stderr, "why\n");
        assert_eq!(output.status.signal(), Some(libc::SIGKILL));
    }

    #[test]
    fn wait_for_line_streams_and_kill_collects_everything() {
        let mut vm =
            fake("echo one; echo 'two three'; printf 'fo'; printf 'ur\\r\\n'; exec sleep 60")
                .spawn()
                .unwrap();
        let line = vm
            .wait_for_line(|l| l.starts_with("two"), Duration::from_secs(10))
            .unwrap();
        assert_eq!(line, "two three");
        let line = vm.wait_for_line(|_| true, Duration::from_secs(10)).unwrap();
        assert_eq!(line, "four", "lines are shown once, without \\r\\n");
        let out = vm.kill().unwrap();
        assert_eq!(out.stdout, "one\ntwo three\nfour\r\n");
        assert_eq!(out.status.signal(), Some(libc::SIGKILL));
    }

    #[test]
    fn wait_for_line_times_out_and_reports_exit() {
        let mut vm = fake("echo one; exec sleep 60").spawn().unwrap();
        let err = vm
            .wait_for_line(|l| l == "never", Duration::from_millis(200))
            .unwrap_err();
        assert!(
            matches!(err, Error::Timeout { ref output, .. } if output.stdout == "one\n"),
            "{err}"
        );

        let mut vm = fake("echo one; exec >&-; sleep 60").spawn().unwrap();
        let err = vm
            .wait_for_line(|l| l == "never", Duration::from_millis(300))
            .unwrap_err();
        assert!(
            matches!(err, Error::Timeout { .. }),
            "closing stdout is not exiting: {err}"
        );

        let mut vm = fake("echo one; printf last; exit 7").spawn().unwrap();
        assert_eq!(
            vm.wait_for_line(|l| l == "last", Duration::from_secs(10))
                .unwrap(),
            "last"
        );
        let err = vm
            .wait_for_line(|_| true, Duration::from_secs(10))
            .unwrap_err();
        let Error::Exited { output } = err else {
            panic!("expected an early exit, got {err}");
        };
        assert_eq!(output.status.code(), Some(7));
    }
}
