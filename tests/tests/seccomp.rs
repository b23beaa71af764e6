//! Seccomp filters end to end.
//!
//! - Guests boot and run under the built-in filters, whose action for a system
//!   call they do not allow is to kill the process: nothing a guest path needs
//!   is missing.
//! - `--seccomp-filter` replaces them: a filter whose vCPU threads may not
//!   call KVM_RUN kills the VM before the guest prints anything, which also
//!   shows that each vCPU thread installs its filter before entering the guest.
//! - A filter that lacks a call a thread needs (Firecracker's
//!   `test_failing_filter`, for the vCPU, VMM and API threads) ends ember
//!   with 148, the log line "Shutting down VM after intercepting a bad
//!   syscall (N)." and `seccomp.num_faults` 1 in the metrics.
//! - No environment variable weakens the built-in filters: the programs
//!   installed in each thread, read back with PTRACE_SECCOMP_GET_FILTER, are
//!   the built-in ones.
//! - The filter description, `crates/seccomp/filters/x86_64-unknown-linux-gnu.json`,
//!   and the system calls the code makes stay in step: ember runs under
//!   `strace -f` with `--seccomp-filter` and the same description made
//!   log-only (the filters are installed where they always are, but let
//!   everything through), and every system call
//!   a thread makes after its `seccomp()` call is checked against the rules of
//!   its category. A test fails listing each call the filter would refuse, as
//!   `category: syscall(arguments)`, so a new system call shows up here with
//!   its ioctl number or flags before it kills a VM.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use ember_tests::netns::NetNs;
use ember_tests::{default_config, ember_binary, guest_path, merge_patch, Launch, Output};
use serde_json::{json, Value};

/// The description the binary's filters are compiled from.
const DESCRIPTION: &str =
    include_str!("../../crates/seccomp/filters/x86_64-unknown-linux-gnu.json");

/// KVM_RUN (linux/kvm.h: _IO(KVMIO, 0x80)).
const KVM_RUN: u64 = 0xae80;
/// How long one step of a scenario may take.
const WAIT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------
// The rules of the description, evaluated as seccompiler compiles them.

/// One argument comparison of a rule.
#[derive(Debug)]
struct Cond {
    index: usize,
    /// Compare the low 32 bits only.
    dword: bool,
    op: String,
    mask: u64,
    val: u64,
}

impl Cond {
    fn holds(&self, arg: u64) -> bool {
        let arg = if self.dword { arg & 0xffff_ffff } else { arg };
        match self.op.as_str() {
            "eq" => arg == self.val,
            "ne" => arg != self.val,
            "lt" => arg < self.val,
            "le" => arg <= self.val,
            "gt" => arg > self.val,
            "ge" => arg >= self.val,
            "masked_eq" => arg & self.mask == self.val,
            other => panic!("unknown comparison {other:?} in the description"),
        }
    }
}

/// Per category, per system call: the rules, any of which allows the call; a
/// rule allows it when all its conditions hold (an empty rule always does).
struct Rules(BTreeMap<String, BTreeMap<String, Vec<Vec<Cond>>>>);

impl Rules {
    fn parse(text: &str) -> Rules {
        let doc: BTreeMap<String, Value> =
            serde_json::from_str(text).expect("the description is JSON");
        let mut categories = BTreeMap::new();
        for (category, filter) in doc {
            let mut calls: BTreeMap<String, Vec<Vec<Cond>>> = BTreeMap::new();
            for rule in filter["filter"].as_array().expect("a filter list") {
                let name = rule["syscall"].as_str().expect("a syscall name");
                let conds = rule["args"]
                    .as_array()
                    .map(|args| args.iter().map(cond).collect())
                    .unwrap_or_default();
                calls.entry(name.to_string()).or_default().push(conds);
            }
            categories.insert(category, calls);
        }
        Rules(categories)
    }

    /// The arguments the rules for `name` compare.
    fn indices(&self, category: &str, name: &str) -> BTreeSet<usize> {
        self.0[category]
            .get(name)
            .into_iter()
            .flatten()
            .flatten()
            .map(|c| c.index)
            .collect()
    }

    /// Whether `category`'s filter lets `call` through; `Err` says why not.
    fn check(&self, category: &str, call: &Call) -> Result<(), String> {
        // The VMM thread's filter answers unlink with EPERM whatever the
        // description says (ember_seccomp's prefix); a separate process
        // removes the sockets.
        if category == "vmm" && (call.name == "unlink" || call.name == "unlinkat") {
            return Ok(());
        }
        let rules = self.0[category]
            .get(&call.name)
            .ok_or_else(|| "not in the filter".to_string())?;
        let mut unreadable = None;
        for conds in rules {
            let mut all = true;
            for c in conds {
                match call.arg(c.index) {
                    Some(v) if c.holds(v) => {}
                    Some(_) => {
                        all = false;
                        break;
                    }
                    None => {
                        unreadable = Some(c.index);
                        all = false;
                        break;
                    }
                }
            }
            if all {
                return Ok(());
            }
        }
        Err(match unreadable {
            Some(i) => format!("argument {i} is not a number in the trace"),
            None => "arguments not allowed".to_string(),
        })
    }
}

fn cond(v: &Value) -> Cond {
    let (op, mask) = match &v["op"] {
        Value::String(op) => (op.clone(), 0),
        Value::Object(m) => {
            let mask = m["masked_eq"].as_u64().expect("a masked_eq mask");
            ("masked_eq".to_string(), mask)
        }
        other => panic!("unknown op {other}"),
    };
    Cond {
        index: v["index"].as_u64().expect("an argument index") as usize,
        dword: v["type"] == "dword",
        op,
        mask,
        val: v["val"].as_u64().expect("a comparison value"),
    }
}

// ---------------------------------------------------------------------------
// strace output: `strace -f -ff -ttt -X raw -o DIR/t` writes DIR/t.<tid>.

/// One system call of a thread.
#[derive(Debug)]
struct Call {
    time: f64,
    name: String,
    args: Vec<String>,
}

impl Call {
    /// Argument `i` as a number: decimal, hex, negative, `NULL`, or `A|B`
    /// (how `-X raw` prints a flag word with a part it cannot name).
    fn arg(&self, i: usize) -> Option<u64> {
        let text = self.args.get(i)?.trim();
        if text == "NULL" {
            return Some(0);
        }
        let mut value = 0u64;
        for part in text.split('|').filter(|p| !p.is_empty()) {
            value |= if let Some(hex) = part.strip_prefix("0x") {
                u64::from_str_radix(hex, 16).ok()?
            } else {
                part.parse::<i64>().ok()? as u64
            };
        }
        Some(value)
    }

    fn describe(&self) -> String {
        let args: Vec<&str> = self
            .args
            .iter()
            .map(|a| if a.len() > 24 { "..." } else { a.as_str() })
            .collect();
        format!("{}({})", self.name, args.join(", "))
    }
}

/// What strace recorded for one thread.
#[derive(Debug)]
struct ThreadTrace {
    /// `main` for the thread that exec'd ember, else the name it gave itself.
    name: String,
    calls: Vec<Call>,
    /// `+++ killed by SIG... +++`.
    killed_by: Option<String>,
}

impl ThreadTrace {
    fn category(&self) -> Option<&'static str> {
        match self.name.as_str() {
            "main" => Some("vmm"),
            "ember_api" => Some("api"),
            n if n.starts_with("ember_vcpu") => Some("vcpu"),
            _ => None,
        }
    }

    fn seccomp_index(&self) -> Option<usize> {
        self.calls.iter().position(|c| c.name == "seccomp")
    }

    fn first_kvm_run(&self) -> Option<&Call> {
        self.calls
            .iter()
            .find(|c| c.name == "ioctl" && c.arg(1) == Some(KVM_RUN))
    }
}

/// Splits `a, {b, c}, "d,e")` into its top-level arguments.
fn split_args(s: &str) -> Vec<String> {
    let mut args = Vec::new();
    let mut cur = String::new();
    let mut depth = 0i32;
    let mut in_str = false;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if in_str {
            cur.push(c);
            match c {
                '\\' => cur.extend(chars.next()),
                '"' => in_str = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => {
                in_str = true;
                cur.push(c);
            }
            '{' | '[' => {
                depth += 1;
                cur.push(c);
            }
            '}' | ']' => {
                depth -= 1;
                cur.push(c);
            }
            ')' if depth == 0 => break,
            ',' if depth == 0 => args.push(std::mem::take(&mut cur).trim().to_string()),
            _ => cur.push(c),
        }
    }
    let last = cur.trim();
    if !last.is_empty() || !args.is_empty() {
        args.push(last.to_string());
    }
    args
}

fn parse_thread(text: &str) -> ThreadTrace {
    let mut trace = ThreadTrace {
        name: String::new(),
        calls: Vec::new(),
        killed_by: None,
    };
    for line in text.lines() {
        let Some((time, rest)) = line.split_once(' ') else {
            continue;
        };
        if let Some(sig) = rest.strip_prefix("+++ killed by ") {
            trace.killed_by = sig.split_whitespace().next().map(str::to_string);
            continue;
        }
        // Signal deliveries, exits, and the tail of a call whose start was
        // already recorded.
        if rest.starts_with("---") || rest.starts_with("+++") || rest.starts_with("<...") {
            continue;
        }
        let Some((name, args)) = rest.split_once('(') else {
            continue;
        };
        if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        let args = split_args(args.trim_end_matches(" <unfinished ...>"));
        let call = Call {
            time: time.parse().unwrap_or(0.0),
            name: name.to_string(),
            args,
        };
        if call.name == "execve" {
            trace.name = "main".into();
        } else if call.name == "prctl" && call.arg(0) == Some(15) && trace.name.is_empty() {
            // PR_SET_NAME: how Rust's std names a thread.
            trace.name = call.args.get(1).map_or("", |a| a.trim_matches('"')).into();
        }
        trace.calls.push(call);
    }
    trace
}

fn read_traces(dir: &Path) -> Vec<ThreadTrace> {
    let mut traces = Vec::new();
    for entry in fs::read_dir(dir).expect("read the trace directory") {
        let path = entry.expect("a trace file").path();
        let is_trace = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("t."));
        if is_trace {
            let text = fs::read_to_string(&path).expect("read a trace file");
            traces.push(parse_thread(&text));
        }
    }
    traces
}

/// Checks one run's threads: each installed its filter where it must, and
/// made no call after it that the filter would refuse. Adds what is wrong to
/// `problems`.
/// What the socket-removing process may do.
const SOCKET_PROCESS_CALLS: [&str; 13] = [
    "prctl",
    // std's debug check (F_GETFD) before closing a descriptor.
    "fcntl",
    "rt_sigaction",
    "close",
    "read",
    "newfstatat",
    "lstat",
    "unlink",
    "write",
    "munmap",
    "brk",
    "exit_group",
    "set_robust_list",
];

fn check_run(scenario: &str, dir: &Path, rules: &Rules, problems: &mut Problems) {
    let traces = read_traces(dir);
    assert!(
        traces.iter().any(|t| t.name == "main"),
        "{scenario}: no trace of ember's main thread in {}",
        dir.display()
    );
    let first_guest_entry = traces
        .iter()
        .filter(|t| t.category() == Some("vcpu"))
        .filter_map(|t| t.first_kvm_run().map(|c| c.time))
        .reduce(f64::min);
    for t in &traces {
        if t.killed_by.as_deref() == Some("SIGSYS") {
            let last = t.calls.last().map_or(String::new(), Call::describe);
            problems.add(format!(
                "{scenario}: thread {} was killed by SIGSYS after {last}",
                t.name
            ));
        }
        if t.name == "ember_sockets" {
            // The socket-removing process runs unfiltered: it must do nothing
            // but read its list, look at and remove the sockets, and answer.
            for c in &t.calls {
                if !SOCKET_PROCESS_CALLS.contains(&c.name.as_str()) {
                    problems.add(format!(
                        "{scenario}: the socket-removing process made {}",
                        c.describe()
                    ));
                }
            }
            continue;
        }
        let Some(category) = t.category() else {
            if !t.calls.is_empty() {
                problems.add(format!(
                    "{scenario}: thread {:?} belongs to no filter category",
                    t.name
                ));
            }
            continue;
        };
        let Some(start) = t.seccomp_index() else {
            problems.add(format!(
                "{scenario}: {category} thread {} never installed a filter",
                t.name
            ));
            continue;
        };
        let installed_at = t.calls[start].time;
        match category {
            "vcpu" => {
                let entered = t.calls[..start]
                    .iter()
                    .any(|c| c.name == "ioctl" && c.arg(1) == Some(KVM_RUN));
                if entered {
                    problems.add(format!(
                        "{scenario}: {} entered the guest before installing its filter",
                        t.name
                    ));
                }
            }
            "vmm" => {
                if first_guest_entry.is_some_and(|entry| entry < installed_at) {
                    problems.add(format!(
                        "{scenario}: the guest ran before the VMM thread installed its filter"
                    ));
                }
            }
            _ => {
                if t.calls[..start].iter().any(|c| c.name == "poll") {
                    problems.add(format!(
                        "{scenario}: the API thread served before installing its filter"
                    ));
                }
            }
        }
        for call in &t.calls[start + 1..] {
            if let Err(why) = rules.check(category, call) {
                // One line per refused call and argument values the rules
                // look at, whatever the other arguments were.
                let looked_at: Vec<String> = rules
                    .indices(category, &call.name)
                    .into_iter()
                    .map(|i| format!("arg{i}={}", call.args.get(i).map_or("?", String::as_str)))
                    .collect();
                let mut key = format!("{category}: {}", call.name);
                for arg in looked_at {
                    key.push(' ');
                    key.push_str(&arg);
                }
                problems.add_call(format!("{key} ({why})"), call.describe());
            }
        }
    }
}

/// What the traces show to be wrong: a line each, with an example call.
#[derive(Default)]
struct Problems(BTreeMap<String, String>);

impl Problems {
    fn add(&mut self, problem: String) {
        self.0.entry(problem).or_default();
    }

    /// A refused call, listed once per `key` with the first example.
    fn add_call(&mut self, key: String, example: String) {
        self.0.entry(key).or_insert(example);
    }

    fn assert_none(self) {
        let lines: Vec<String> = self
            .0
            .into_iter()
            .map(|(problem, example)| {
                if example.is_empty() {
                    problem
                } else {
                    format!("{problem}, e.g. {example}")
                }
            })
            .collect();
        assert!(
            lines.is_empty(),
            "the seccomp filters (crates/seccomp/filters/x86_64-unknown-linux-gnu.json) and the system \
             calls ember makes are out of step:\n  {}",
            lines.join("\n  ")
        );
    }
}

/// The description with `action` for what a filter does not allow.
fn description_with_action(action: &str) -> String {
    let mut doc: Value = serde_json::from_str(DESCRIPTION).expect("the description is JSON");
    for filter in doc.as_object_mut().expect("categories").values_mut() {
        filter["default_action"] = json!(action);
    }
    doc.to_string()
}

/// Where one traced run's files go, and the log-only filter file it runs
/// with.
struct TraceDir {
    traces: tempfile::TempDir,
    filter: tempfile::TempDir,
}

impl TraceDir {
    fn new() -> Self {
        let filter = tempfile::tempdir().expect("a temp dir for the filter");
        fs::write(
            filter.path().join("log-only.json"),
            description_with_action("log"),
        )
        .expect("write the log-only filter");
        TraceDir {
            traces: tempfile::tempdir().expect("a temp dir for traces"),
            filter,
        }
    }

    fn path(&self) -> &Path {
        self.traces.path()
    }

    /// The built-in filters' description, made log-only: given with
    /// `--seccomp-filter`, the filters are installed where they always
    /// are, but let everything through.
    fn log_only(&self) -> PathBuf {
        self.filter.path().join("log-only.json")
    }

    /// `strace ... -o DIR/t`, ready for the ember command line.
    fn command_prefix(&self) -> Vec<String> {
        ["strace", "-f", "-ff", "-qq", "-ttt", "-X", "raw", "-o"]
            .iter()
            .map(|s| s.to_string())
            .chain([self.path().join("t").display().to_string()])
            .collect()
    }

    /// `launch` run through strace, under the log-only filters.
    fn wrap(&self, launch: Launch) -> Launch {
        self.wrap_unfiltered(launch.arg("--seccomp-filter").arg(self.log_only()))
    }

    /// `launch` run through strace, with the filters it asks for.
    fn wrap_unfiltered(&self, launch: Launch) -> Launch {
        let prefix = self.command_prefix();
        launch.wrapper(&prefix[0], &prefix[1..])
    }
}

fn assert_strace_works() {
    let out = Command::new("strace")
        .arg("-V")
        .output()
        .unwrap_or_else(|e| panic!("these tests need strace (apt-get install strace): {e}"));
    assert!(out.status.success(), "strace -V failed: {out:?}");
}

// ---------------------------------------------------------------------------
// Guests.

fn config(guest: &str, patch: Value) -> Value {
    let mut config = default_config(&guest_path(guest));
    merge_patch(&mut config, &patch);
    config
}

fn not_killed(out: &Output) {
    assert_ne!(
        out.status.signal(),
        Some(libc::SIGSYS),
        "a seccomp filter killed ember (SIGSYS)\n{out}"
    );
}

/// The legacy guests, with the outcome each must have.
fn legacy_guests() -> Vec<(&'static str, Value, bool, &'static str)> {
    vec![
        (
            "hello",
            json!({"machine-config": {"vcpu_count": 2}}),
            true,
            "Hello from the Ember test guest",
        ),
        ("boot_info", json!({}), true, "cr0: "),
        (
            "storm",
            json!({"boot-source": {"boot_args": "storm.count=2000"}}),
            true,
            "storm done 2000",
        ),
        // A triple fault and a KVM emulation failure: the vCPU reads its
        // registers to report them.
        ("fault", json!({}), false, ""),
        ("emulation_failure", json!({}), false, ""),
    ]
}

/// A drive image for the `virtio_blk` guest's basic test.
struct BlkImage(tempfile::TempDir);

impl BlkImage {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("a temp dir");
        let f = fs::File::create(dir.path().join("data.img")).expect("create the image");
        f.set_len(8 << 20).expect("size the image");
        BlkImage(dir)
    }

    fn config(&self, engine: &str) -> Value {
        config(
            "virtio_blk",
            json!({
                "boot-source": {"boot_args": "console=ttyS0 blk.test=basic blk.seed=7 \
                    blk.sector=64 blk.sectors=16 blk.discard=1024 blk.discard_sectors=256 \
                    blk.zero=2048 blk.zero_sectors=256"},
                "drives": [{
                    "drive_id": "data0",
                    "path_on_host": self.0.path().join("data.img"),
                    "is_root_device": false,
                    "is_read_only": false,
                    "cache_type": "Writeback",
                    "io_engine": engine,
                }],
            }),
        )
    }
}

fn assert_blk_done(out: &Output) {
    not_killed(out);
    assert!(out.status.success(), "{out}");
    assert!(
        out.stdout.lines().any(|l| l == "virtio_blk done"),
        "the guest did not finish\n{out}"
    );
}

#[test]
fn guests_run_under_the_default_filters() {
    for (guest, patch, succeeds, line) in legacy_guests() {
        let out = Launch::new(&config(guest, patch))
            .run()
            .unwrap_or_else(|e| panic!("{guest}: {e}"));
        not_killed(&out);
        assert_eq!(out.status.success(), succeeds, "{guest}\n{out}");
        if succeeds {
            assert!(out.stdout.contains(line), "{guest}\n{out}");
        } else {
            assert_eq!(out.status.code(), Some(1), "{guest}\n{out}");
        }
    }
    let image = BlkImage::new();
    for engine in ["Sync", "Async"] {
        let out = Launch::new(&image.config(engine))
            .run()
            .unwrap_or_else(|e| panic!("virtio_blk {engine}: {e}"));
        assert_blk_done(&out);
    }
}

/// The description with the vCPU threads' KVM_RUN rule taken out.
fn description_without_kvm_run() -> String {
    let mut doc: Value = serde_json::from_str(DESCRIPTION).expect("the description is JSON");
    let rules = doc["vcpu"]["filter"]
        .as_array_mut()
        .expect("a vcpu filter list");
    let before = rules.len();
    rules.retain(|r| r["args"][0]["val"].as_u64() != Some(KVM_RUN));
    assert_eq!(rules.len(), before - 1, "one KVM_RUN rule");
    doc.to_string()
}

#[test]
fn a_custom_filter_is_enforced_from_the_first_kvm_run() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let filter = dir.path().join("no-kvm-run.json");
    fs::write(&filter, description_without_kvm_run()).expect("write the filter");
    let out = Launch::new(&config("hello", json!({})))
        .arg("--seccomp-filter")
        .arg(&filter)
        .run()
        .expect("run ember");
    assert_eq!(out.status.code(), Some(148), "{out}");
    assert!(
        !out.stdout.contains("Hello"),
        "the guest ran without KVM_RUN\n{out}"
    );

    // The same file with KVM_RUN allowed runs the guest.
    fs::write(&filter, DESCRIPTION).expect("write the filter");
    let out = Launch::new(&config("hello", json!({})))
        .arg("--seccomp-filter")
        .arg(&filter)
        .run()
        .expect("run ember");
    assert!(out.status.success(), "{out}");

    // A file that is not a filter stops ember before the VM is built.
    fs::write(&filter, "{\"vmm\": 1}").expect("write the filter");
    let out = Launch::new(&config("hello", json!({})))
        .arg("--seccomp-filter")
        .arg(&filter)
        .run()
        .expect("run ember");
    assert_eq!(out.status.code(), Some(1), "{out}");
    assert!(out.stderr.contains("invalid seccomp filter file"), "{out}");
    assert!(!out.stdout.contains("Hello"), "{out}");
}

#[test]
fn no_seccomp_installs_no_filter() {
    assert_strace_works();
    let traces = TraceDir::new();
    let out = traces
        .wrap_unfiltered(Launch::new(&config("hello", json!({}))).arg("--no-seccomp"))
        .run()
        .expect("run ember");
    assert!(out.status.success(), "{out}");
    for t in read_traces(traces.path()) {
        assert!(
            t.seccomp_index().is_none(),
            "thread {} installed a filter despite --no-seccomp",
            t.name
        );
    }

    let out = Launch::new(&config("hello", json!({})))
        .arg("--no-seccomp")
        .arg("--seccomp-filter")
        .arg("/nonexistent.json")
        .run()
        .expect("run ember");
    assert!(!out.status.success(), "{out}");
    assert!(out.stderr.contains("cannot be used"), "{out}");
}

#[test]
fn the_filters_allow_what_the_legacy_guests_cause() {
    assert_strace_works();
    let rules = Rules::parse(DESCRIPTION);
    let mut problems = Problems::default();
    for (guest, patch, succeeds, _) in legacy_guests() {
        let traces = TraceDir::new();
        let out = traces
            .wrap(Launch::new(&config(guest, patch)))
            .run()
            .unwrap_or_else(|e| panic!("{guest}: {e}"));
        assert_eq!(out.status.success(), succeeds, "{guest}\n{out}");
        check_run(guest, traces.path(), &rules, &mut problems);
    }
    problems.assert_none();
}

#[test]
fn the_filters_allow_what_virtio_blk_causes() {
    assert_strace_works();
    let rules = Rules::parse(DESCRIPTION);
    let mut problems = Problems::default();
    let image = BlkImage::new();
    for engine in ["Sync", "Async"] {
        let traces = TraceDir::new();
        let out = traces
            .wrap(Launch::new(&image.config(engine)))
            .run()
            .unwrap_or_else(|e| panic!("virtio_blk {engine}: {e}"));
        assert_blk_done(&out);
        check_run(
            &format!("virtio_blk {engine}"),
            traces.path(),
            &rules,
            &mut problems,
        );
    }
    problems.assert_none();
}

/// A host connection echoed by the guest, then the guest's own connection
/// to a host listener, echoed by the host.
#[test]
fn the_filters_allow_what_virtio_vsock_causes() {
    assert_strace_works();
    let rules = Rules::parse(DESCRIPTION);
    let dir = tempfile::tempdir().expect("a temp dir");
    let uds = dir.path().join("v.sock");
    let listener = UnixListener::bind(format!("{}_53", uds.display())).expect("bind port 53");
    let traces = TraceDir::new();
    let vm = traces
        .wrap(Launch::new(&config(
            "virtio_vsock",
            json!({
                "boot-source": {"boot_args": "console=ttyS0 vsock.accepts=1 vsock.echo_out=4096"},
                "vsock": {"guest_cid": 3, "uds_path": uds},
            }),
        )))
        .spawn()
        .expect("start ember");

    let deadline = Instant::now() + WAIT;
    let mut host = loop {
        match UnixStream::connect(&uds) {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("cannot connect to {}: {e}", uds.display()),
        }
    };
    host.set_read_timeout(Some(WAIT)).expect("a read timeout");
    host.write_all(b"CONNECT 52\n").expect("send CONNECT");
    let mut reply = BufReader::new(host.try_clone().expect("clone the stream"));
    let mut line = String::new();
    reply.read_line(&mut line).expect("read the CONNECT reply");
    assert!(line.starts_with("OK "), "{line:?}");
    host.write_all(b"ping over vsock")
        .expect("send to the guest");
    let mut echo = [0u8; 15];
    reply.read_exact(&mut echo).expect("read the echo");
    assert_eq!(&echo, b"ping over vsock");
    drop(reply);
    drop(host);

    let (mut guest, _) = listener.accept().expect("the guest connects");
    guest.set_read_timeout(Some(WAIT)).expect("a read timeout");
    let mut buf = vec![0u8; 4096];
    let mut got = 0;
    while got < buf.len() {
        let n = guest
            .read(&mut buf[got..])
            .expect("read the guest's stream");
        assert_ne!(n, 0, "the guest closed early");
        guest
            .write_all(&buf[got..got + n])
            .expect("echo to the guest");
        got += n;
    }
    let out = vm.wait(WAIT).expect("ember exits after the guest resets");
    drop(guest);
    not_killed(&out);
    assert!(
        out.stdout.lines().any(|l| l == "virtio_vsock done"),
        "{out}"
    );

    let mut problems = Problems::default();
    check_run("virtio_vsock", traces.path(), &rules, &mut problems);
    problems.assert_none();
}

/// The guest activates virtio-net on its vCPU thread (TUNSETOFFLOAD), says
/// hello over UDP, echoes a datagram and quits on "!quit".
#[test]
fn the_filters_allow_what_virtio_net_causes() {
    assert_strace_works();
    let rules = Rules::parse(DESCRIPTION);
    const HOST: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 1);
    const GUEST: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 2);
    let mut ns = NetNs::new().expect("create a network namespace");
    ns.add_tap("embs0", &format!("{HOST}/24"))
        .expect("create the TAP");
    let socket = ns
        .run(|| UdpSocket::bind(SocketAddrV4::new(HOST, 7101)))
        .expect("enter the namespace")
        .expect("bind the host socket");
    socket.set_read_timeout(Some(WAIT)).expect("a read timeout");
    let traces = TraceDir::new();
    let config = config(
        "virtio_net",
        json!({
            "boot-source": {"boot_args": format!(
                "console=ttyS0 net.ip={GUEST} net.host_ip={HOST} net.port=7100 net.host_port=7101"
            )},
            "network-interfaces": [{
                "iface_id": "eth0",
                "host_dev_name": "embs0",
                "guest_mac": "06:00:0a:c9:00:02",
            }],
        }),
    );
    let mut prefix = vec!["netns".to_string(), "exec".into(), ns.name().to_string()];
    prefix.extend(traces.command_prefix());
    let vm = Launch::new(&config)
        .arg("--seccomp-filter")
        .arg(traces.log_only())
        .wrapper("ip", prefix)
        .spawn()
        .expect("start ember in the namespace");
    let mut buf = [0u8; 2048];
    let (_, guest) = match socket.recv_from(&mut buf) {
        Ok(got) => got,
        Err(e) => panic!(
            "no hello from the guest: {e}\n{}",
            vm.kill().map_or_else(|e| e.to_string(), |o| o.to_string())
        ),
    };
    socket
        .send_to(b"echo me", guest)
        .expect("send to the guest");
    let (n, _) = socket.recv_from(&mut buf).expect("the echo");
    assert_eq!(&buf[..n], b"echo me");
    socket.send_to(b"!quit", guest).expect("send !quit");
    let out = vm.wait(WAIT).expect("ember exits after the guest resets");
    not_killed(&out);
    assert!(out.stdout.lines().any(|l| l == "virtio_net done"), "{out}");

    let mut problems = Problems::default();
    check_run("virtio_net", traces.path(), &rules, &mut problems);
    problems.assert_none();
}

/// The pid of the traced ember: the thread that exec'd it, whose trace file
/// is named after it.
fn traced_pid(dir: &Path) -> Option<libc::pid_t> {
    fs::read_dir(dir).ok()?.find_map(|entry| {
        let path = entry.ok()?.path();
        let pid = path.extension()?.to_str()?.parse().ok()?;
        let text = fs::read_to_string(&path).ok()?;
        text.contains(" execve(").then_some(pid)
    })
}

/// SIGTERM stops the VM from the VMM thread's event loop, after which ember
/// ends by the same signal, all under the filters.
#[test]
fn the_filters_allow_a_stop_by_sigterm() {
    assert_strace_works();
    let rules = Rules::parse(DESCRIPTION);
    let traces = TraceDir::new();
    let mut vm = traces
        .wrap(Launch::new(&config("ctrl_alt_del", json!({}))))
        .spawn()
        .expect("start ember");
    vm.wait_for_line(|l| l == "ctrl_alt_del: waiting", WAIT)
        .expect("the guest runs");
    let pid = traced_pid(traces.path()).expect("ember's trace");
    // SAFETY: sends a signal to the ember process this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let out = vm.wait(WAIT).expect("ember stops on SIGTERM");
    not_killed(&out);
    assert_eq!(out.status.signal(), Some(libc::SIGTERM), "{out}");

    let mut problems = Problems::default();
    check_run("SIGTERM", traces.path(), &rules, &mut problems);
    problems.assert_none();
}

// ---------------------------------------------------------------------------
// The API: the API thread's filter, and the VMM thread serving requests
// after boot.

/// One HTTP request on a fresh connection; returns the status code.
fn request(sock: &Path, method: &str, path: &str, body: &str) -> u16 {
    let mut s = UnixStream::connect(sock).expect("connect to the API socket");
    s.set_read_timeout(Some(WAIT)).expect("a read timeout");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("send the request");
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("read the answer");
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("{method} {path}: no status in {answer:?}"))
}

/// Ember's serial output, line by line.
struct Serial {
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Serial {
    fn new(child: &mut Child) -> Serial {
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Serial {
            lines,
            seen: Vec::new(),
        }
    }

    fn wait_for(&mut self, pred: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + WAIT;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let found = pred(&line);
                    self.seen.push(line);
                    if found {
                        return;
                    }
                }
                Err(_) => break,
            }
        }
        panic!("the expected serial line never came; got {:?}", self.seen);
    }
}

#[test]
fn the_filters_allow_what_the_api_causes() {
    assert_strace_works();
    let rules = Rules::parse(DESCRIPTION);
    let dir = tempfile::tempdir().expect("a temp dir");
    let sock = dir.path().join("api.sock");
    for (name, len) in [("disk.img", 1u64 << 20), ("disk2.img", 2 << 20)] {
        let f = fs::File::create(dir.path().join(name)).expect("create an image");
        f.set_len(len).expect("size the image");
    }
    let traces = TraceDir::new();
    let prefix = traces.command_prefix();
    let mut child = Command::new(&prefix[0])
        .args(&prefix[1..])
        .arg(ember_binary())
        .arg("--seccomp-filter")
        .arg(traces.log_only())
        .arg("--api-sock")
        .arg(&sock)
        .arg("--metrics-path")
        .arg(dir.path().join("metrics.json"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start ember");
    let mut serial = Serial::new(&mut child);
    let deadline = Instant::now() + WAIT;
    while !sock.exists() {
        assert!(Instant::now() < deadline, "the API socket never appeared");
        thread::sleep(Duration::from_millis(10));
    }

    let kernel = guest_path("ctrl_alt_del");
    let image = |name: &str| PathBuf::from(dir.path()).join(name);
    let steps = [
        (
            "PUT",
            "/boot-source",
            json!({"kernel_image_path": kernel, "boot_args": "console=ttyS0"}),
            204,
        ),
        (
            "PUT",
            "/machine-config",
            json!({"vcpu_count": 2, "mem_size_mib": 128}),
            204,
        ),
        (
            "PUT",
            "/drives/data0",
            json!({"drive_id": "data0", "path_on_host": image("disk.img"),
                   "is_root_device": false, "is_read_only": false}),
            204,
        ),
        ("GET", "/", Value::Null, 200),
        (
            "PUT",
            "/actions",
            json!({"action_type": "InstanceStart"}),
            204,
        ),
    ];
    for (method, path, body, want) in &steps {
        let body = if body.is_null() {
            String::new()
        } else {
            body.to_string()
        };
        assert_eq!(
            request(&sock, method, path, &body),
            *want,
            "{method} {path}"
        );
    }
    serial.wait_for(|l| l == "ctrl_alt_del: waiting");
    let after_boot = [
        ("GET", "/", String::new(), 200),
        ("GET", "/vm/config", String::new(), 200),
        ("PATCH", "/vm", json!({"state": "Paused"}).to_string(), 204),
        ("PATCH", "/vm", json!({"state": "Resumed"}).to_string(), 204),
        (
            "PUT",
            "/actions",
            json!({"action_type": "FlushMetrics"}).to_string(),
            204,
        ),
        (
            "PATCH",
            "/drives/data0",
            json!({"drive_id": "data0", "path_on_host": image("disk2.img")}).to_string(),
            204,
        ),
        (
            "PUT",
            "/machine-config",
            json!({"vcpu_count": 1}).to_string(),
            400,
        ),
        ("PUT", "/actions", "{not json".to_string(), 400),
        ("GET", "/no/such/path", String::new(), 400),
        (
            "PUT",
            "/actions",
            json!({"action_type": "SendCtrlAltDel"}).to_string(),
            204,
        ),
    ];
    for (method, path, body, want) in &after_boot {
        let got = request(&sock, method, path, body);
        // Unknown paths answer 400 or 404 depending on the method; both
        // went through the same code.
        if *want == 400 {
            assert!((400..500).contains(&got), "{method} {path}: {got}");
        } else {
            assert_eq!(got, *want, "{method} {path}");
        }
    }
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for ember") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "ember did not stop after Ctrl+Alt+Del; serial: {:?}",
                serial.seen
            );
        }
        thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success(), "{status:?}; serial: {:?}", serial.seen);

    let mut problems = Problems::default();
    check_run("api", traces.path(), &rules, &mut problems);
    let traces = read_traces(traces.path());
    assert!(
        traces.iter().any(|t| t.name == "ember_api"),
        "no API thread in the trace"
    );
    problems.assert_none();
}

#[test]
fn the_trace_parser_reads_strace_lines() {
    let t = parse_thread(
        "1.5 prctl(0xf, \"ember_vcpu1\") = 0\n\
         1.6 seccomp(0x1, 0, {len=177, filter=0x5555}) = 0\n\
         1.7 ioctl(12, 0xae80, 0) = 0\n\
         1.8 socket(0x1, 0x1|0x80800, 0) = 5\n\
         1.9 openat(-100, \"/a, b\", 0x80002) = 3\n\
         2.0 --- SIGRT_2 {si_signo=34} ---\n\
         2.1 ioctl(12, 0xae80 <unfinished ...>\n\
         2.2 +++ killed by SIGSYS (core dumped) +++\n",
    );
    assert_eq!(t.name, "ember_vcpu1");
    assert_eq!(t.category(), Some("vcpu"));
    assert_eq!(t.seccomp_index(), Some(1));
    assert_eq!(t.calls.len(), 6);
    assert_eq!(t.first_kvm_run().map(|c| c.time), Some(1.7));
    assert_eq!(t.calls[3].arg(1), Some(0x80801));
    assert_eq!(t.calls[4].arg(0), Some(-100i64 as u64));
    assert_eq!(t.calls[4].args[1], "\"/a, b\"");
    assert_eq!(t.calls[5].arg(1), Some(KVM_RUN));
    assert_eq!(t.killed_by.as_deref(), Some("SIGSYS"));

    let rules = Rules::parse(DESCRIPTION);
    assert_eq!(rules.check("vcpu", &t.calls[2]), Ok(()));
    // KVM_CREATE_VM is no vCPU's business; sockets are not either.
    let create_vm = parse_thread("1.0 ioctl(3, 0xae01, 0) = 4\n");
    assert!(rules.check("vcpu", &create_vm.calls[0]).is_err());
    assert_eq!(
        rules.check("vcpu", &t.calls[3]),
        Err("not in the filter".to_string())
    );
    assert_eq!(rules.check("vmm", &t.calls[3]), Ok(()));
}

// ---------------------------------------------------------------------------
// Firecracker's test_failing_filter, for each kind of thread.

/// The description without the rules `drop` picks in `category`.
fn description_without(category: &str, drop: impl Fn(&Value) -> bool) -> String {
    let mut doc: Value = serde_json::from_str(DESCRIPTION).expect("the description is JSON");
    let rules = doc[category]["filter"]
        .as_array_mut()
        .expect("a filter list");
    let before = rules.len();
    rules.retain(|r| !drop(r));
    assert!(rules.len() < before, "{category}: no rule dropped");
    doc.to_string()
}

/// Runs the hello guest with its API server, under `filter`, with a log
/// and a metrics file; asserts that a trapped call ended ember with 148,
/// that the log names one of `syscalls`, and that the metrics count one
/// fault.
fn assert_fails_with_a_bad_syscall(kind: &str, filter: String, syscalls: &[i64]) {
    let dir = tempfile::tempdir().expect("a temp dir");
    let filter_path = dir.path().join("filter.json");
    fs::write(&filter_path, filter).expect("write the filter");
    let config_path = dir.path().join("config.json");
    fs::write(&config_path, config("hello", json!({})).to_string()).expect("write the config");
    let (log, metrics) = (dir.path().join("log"), dir.path().join("metrics"));
    let out = Command::new(ember_binary())
        .arg("--api-sock")
        .arg(dir.path().join("api.sock"))
        .arg("--config-file")
        .arg(&config_path)
        .arg("--seccomp-filter")
        .arg(&filter_path)
        .arg("--log-path")
        .arg(&log)
        .arg("--metrics-path")
        .arg(&metrics)
        .stdin(Stdio::null())
        .output()
        .expect("run ember");
    let log = fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(out.status.code(), Some(148), "{kind}: {out:?}\nlog:\n{log}");
    let lines: Vec<String> = syscalls
        .iter()
        .map(|nr| format!("Shutting down VM after intercepting a bad syscall ({nr})."))
        .collect();
    assert!(
        lines.iter().any(|l| log.contains(l.as_str())),
        "{kind}: none of {lines:?} in the log:\n{log}"
    );
    let text = fs::read_to_string(&metrics).expect("the metrics file");
    let faults: u64 = text
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).expect("a metrics line is JSON");
            v["seccomp"]["num_faults"]
                .as_u64()
                .expect("a seccomp.num_faults field")
        })
        .sum();
    assert_eq!(faults, 1, "{kind}: metrics:\n{text}");
}

#[test]
fn a_vcpu_thread_that_makes_a_forbidden_call_stops_ember_with_148() {
    // ioctl(KVM_RUN) is system call 16.
    assert_fails_with_a_bad_syscall("vcpu", description_without_kvm_run(), &[16]);
}

#[test]
fn the_vmm_thread_that_makes_a_forbidden_call_stops_ember_with_148() {
    // The event loop waits with epoll_wait (232) or epoll_pwait (281).
    let filter = description_without("vmm", |r| {
        ["epoll_wait", "epoll_pwait"].contains(&r["syscall"].as_str().unwrap_or(""))
    });
    assert_fails_with_a_bad_syscall("vmm", filter, &[232, 281]);
}

#[test]
fn the_api_thread_that_makes_a_forbidden_call_stops_ember_with_148() {
    // The API server waits with poll (7).
    let filter = description_without("api", |r| r["syscall"] == "poll");
    assert_fails_with_a_bad_syscall("api", filter, &[7]);
}

// ---------------------------------------------------------------------------
// No environment variable weakens the built-in filters.

/// PTRACE_SECCOMP_GET_FILTER (linux/ptrace.h).
const PTRACE_SECCOMP_GET_FILTER: libc::c_uint = 0x420c;

/// The newest seccomp filter of thread `tid`, read with ptrace.
fn installed_filter(tid: libc::pid_t) -> Vec<(u16, u8, u8, u32)> {
    // SAFETY: seizes a thread of our child; no memory is passed.
    let ret = unsafe { libc::ptrace(libc::PTRACE_SEIZE, tid, 0, 0) };
    assert_eq!(
        ret,
        0,
        "PTRACE_SEIZE {tid}: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: as above.
    unsafe { libc::ptrace(libc::PTRACE_INTERRUPT, tid, 0, 0) };
    loop {
        let mut status = 0;
        // SAFETY: waits for the tracee to stop; writes a local.
        let ret = unsafe { libc::waitpid(tid, &mut status, libc::__WALL) };
        assert_eq!(
            ret,
            tid,
            "waitpid {tid}: {}",
            std::io::Error::last_os_error()
        );
        if libc::WIFSTOPPED(status) {
            break;
        }
    }
    let mut insns = vec![[0u8; 8]; 4096];
    // SAFETY: the kernel writes at most `count` 8-byte instructions, and the
    // buffer holds the kernel's maximum.
    let count = unsafe { libc::ptrace(PTRACE_SECCOMP_GET_FILTER, tid, 0usize, insns.as_mut_ptr()) };
    let err = std::io::Error::last_os_error();
    // SAFETY: lets the thread go on.
    unsafe { libc::ptrace(libc::PTRACE_DETACH, tid, 0, 0) };
    assert!(count > 0, "PTRACE_SECCOMP_GET_FILTER {tid}: {err}");
    insns
        .iter()
        .take(count as usize)
        .map(|i| {
            (
                u16::from_ne_bytes([i[0], i[1]]),
                i[2],
                i[3],
                u32::from_ne_bytes([i[4], i[5], i[6], i[7]]),
            )
        })
        .collect()
}

#[test]
fn no_environment_variable_weakens_the_built_in_filters() {
    let builtin = ember_seccomp::Filters::builtin();
    let expected = |category: ember_seccomp::ThreadCategory| -> Vec<(u16, u8, u8, u32)> {
        builtin
            .get(category)
            .expect("a built-in filter")
            .iter()
            .map(|i| (i.code, i.jt, i.jf, i.k))
            .collect()
    };
    let dir = tempfile::tempdir().expect("a temp dir");
    let config_path = dir.path().join("config.json");
    fs::write(&config_path, config("echo", json!({})).to_string()).expect("write the config");
    let mut child = Command::new(ember_binary())
        .arg("--api-sock")
        .arg(dir.path().join("api.sock"))
        .arg("--config-file")
        .arg(&config_path)
        // What once made the filters log-only, and names one might try.
        .env("EMBER_SECCOMP_ACTION", "log")
        .env("EMBER_SECCOMP", "0")
        .env("EMBER_NO_SECCOMP", "1")
        .env("FIRECRACKER_NO_SECCOMP", "1")
        .env("SECCOMP_ACTION", "allow")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start ember");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    // The guest prints once it runs, so every thread has its filter.
    let ready = lines.any(|l| l.is_ok_and(|l| l.contains("echo ready")));
    assert!(ready, "the echo guest did not start");
    let pid = child.id() as libc::pid_t;
    let mut seen = BTreeSet::new();
    let tids: Vec<libc::pid_t> = fs::read_dir(format!("/proc/{pid}/task"))
        .expect("the threads")
        .map(|e| {
            e.expect("a thread")
                .file_name()
                .to_string_lossy()
                .parse()
                .expect("a tid")
        })
        .collect();
    // The vCPU threads first (their /proc status), then the VMM thread, whose
    // ptrace stop ends the VM (its epoll_wait fails with EINTR), then the API
    // thread, which waits for the VMM thread to join it.
    let mut tids = tids;
    tids.sort_by_key(|&tid| {
        let comm = fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")).unwrap_or_default();
        match comm.trim() {
            c if c.starts_with("ember_vcpu") => 0,
            _ if tid == pid => 1,
            _ => 2,
        }
    });
    for tid in tids {
        let comm = fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm"))
            .unwrap_or_else(|e| format!("unreadable: {e}"));
        let comm = comm.trim();
        let category = if tid == pid {
            ember_seccomp::ThreadCategory::Vmm
        } else if comm == "ember_api" {
            ember_seccomp::ThreadCategory::Api
        } else if comm.starts_with("ember_vcpu") {
            ember_seccomp::ThreadCategory::Vcpu
        } else {
            continue;
        };
        if category == ember_seccomp::ThreadCategory::Vcpu {
            // A vCPU thread in KVM_RUN does not reach a ptrace stop on this
            // host: check that it is filtered, by one filter.
            let status = fs::read_to_string(format!("/proc/{pid}/task/{tid}/status"))
                .expect("the thread's status");
            assert!(status.contains("\nSeccomp:\t2\n"), "{comm}: {status}");
            assert!(
                status.contains("\nSeccomp_filters:\t1\n"),
                "{comm}: {status}"
            );
        } else {
            assert_eq!(
                installed_filter(tid),
                expected(category),
                "thread {comm} ({tid}) does not run the built-in {category} filter"
            );
        }
        seen.insert(category.name());
    }
    let _ = child.stdin.take().map(|mut s| s.write_all(b"quit\n"));
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), ["api", "vcpu", "vmm"]);
}

// ---------------------------------------------------------------------------
// The VMM thread may not unlink; the sockets are removed anyway.

#[test]
fn the_sockets_are_removed_without_unlink_on_the_vmm_thread() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let (api_sock, uds) = (dir.path().join("api.sock"), dir.path().join("v.sock"));
    // A file the VMM thread would remove if it could: its vsock path, which
    // is replaced by another file while the VM runs (the removal checks the
    // inode) is not touched either.
    let cfg = config("hello", json!({"vsock": {"guest_cid": 3, "uds_path": uds}}));
    let config_path = dir.path().join("config.json");
    fs::write(&config_path, cfg.to_string()).expect("write the config");
    let out = Command::new(ember_binary())
        .arg("--api-sock")
        .arg(&api_sock)
        .arg("--config-file")
        .arg(&config_path)
        .stdin(Stdio::null())
        .output()
        .expect("run ember");
    assert!(out.status.success(), "{out:?}");
    assert!(!api_sock.exists(), "the API socket was left behind");
    assert!(!uds.exists(), "the vsock socket was left behind");

    // Under strace: the VMM thread's unlink calls are refused with EPERM.
    assert_strace_works();
    let traces = TraceDir::new();
    let prefix = traces.command_prefix();
    let out = Command::new(&prefix[0])
        .args(&prefix[1..])
        .arg(ember_binary())
        .arg("--api-sock")
        .arg(&api_sock)
        .arg("--config-file")
        .arg(&config_path)
        .stdin(Stdio::null())
        .output()
        .expect("run ember under strace");
    assert!(out.status.success(), "{out:?}");
    assert!(
        !api_sock.exists() && !uds.exists(),
        "a socket was left behind"
    );
    // Per thread: unlink after the thread's seccomp() call is refused; the
    // socket-removing process (no filter) removes both sockets.
    let (mut refused, mut removed) = (0, 0);
    for entry in fs::read_dir(traces.path()).expect("the traces") {
        let text = fs::read_to_string(entry.expect("a trace").path()).unwrap_or_default();
        let mut filtered = false;
        for line in text.lines() {
            if line.contains(" seccomp(") {
                filtered = true;
            }
            if line.contains(" unlink(") {
                if filtered {
                    assert!(line.contains("EPERM"), "{line}");
                    refused += 1;
                } else if line.trim_end().ends_with("= 0") {
                    removed += 1;
                }
            }
        }
    }
    assert_eq!(removed, 2, "the sockets were not removed by the child");
    assert!(
        refused >= 2,
        "the VMM thread did not try to remove its sockets"
    );
}
