//! The API thread under its built-in seccomp filter, which traps any system
//! call it does not allow (SIGSYS, which ends this test binary): the server goes through its paths
//! (requests answered by a VMM thread, errors, a body too large, a stalled
//! request timing out, a connection refused for lack of room, clients
//! vanishing, shutdown). Should one of them need a call the filter lacks,
//! this test binary dies of SIGSYS.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::Duration;

use ember::seccomp::{sock_filter, Filters};
use ember_api::{
    start_api_server_with, ActionHandler, ApiServerError, ApiServerHandle, PreBootResources,
    ServerOptions, THREAD_NAME,
};

/// Sends `raw` on a new connection and reads until `n` complete answers
/// have arrived or the server closes the connection.
fn exchange_n(path: &Path, raw: &str, n: usize) -> String {
    let mut s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // The server may answer and close before it has read everything (a
    // refused connection, a body over the limit): the answer still counts.
    let _ = s.write_all(raw.as_bytes());
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while complete_answers(&out) < n {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(len) => out.extend_from_slice(&buf[..len]),
        }
    }
    String::from_utf8(out).unwrap()
}

/// Everything the server sends until it closes the connection (a reset
/// after the last byte counts as closing).
fn read_until_closed(s: &mut UnixStream) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(len) = s.read(&mut buf) {
        if len == 0 {
            break;
        }
        out.extend_from_slice(&buf[..len]);
    }
    String::from_utf8(out).unwrap()
}

fn exchange(path: &Path, raw: &str) -> String {
    exchange_n(path, raw, 1)
}

/// How many whole answers (head and Content-Length body) `bytes` holds.
fn complete_answers(bytes: &[u8]) -> usize {
    let text = String::from_utf8_lossy(bytes);
    let mut rest: &str = &text;
    let mut n = 0;
    while let Some(end) = rest.find("\r\n\r\n") {
        let len = rest[..end]
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(0);
        if rest.len() < end + 4 + len {
            break;
        }
        rest = &rest[end + 4 + len..];
        n += 1;
    }
    n
}

fn status(answer: &str) -> u16 {
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {answer:?}"))
}

/// Answers requests like the VMM thread does before boot, until `stop`;
/// then drops the server, which stops the API thread.
fn serve(api: ApiServerHandle, stop: Arc<AtomicBool>) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut handler = PreBootResources::new("seccomp-vm");
        let fd = api.request_event.as_raw_fd();
        while !stop.load(Ordering::SeqCst) {
            let mut p = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one live pollfd.
            unsafe { libc::poll(&mut p, 1, 50) };
            api.serve(&mut handler as &mut dyn ActionHandler);
            assert!(api.is_running(), "the API thread ended");
        }
    })
}

/// Both tests start an API thread of the same name in this one process; they
/// run one at a time so each sees only its own.
fn one_at_a_time() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// The highest `Seccomp:` mode (2: filtered) among the live API threads,
/// from procfs. A thread of an earlier server may still be exiting, so all
/// of them are looked at rather than the first one found.
fn api_thread_seccomp_mode() -> Option<u32> {
    let mut best = None;
    for task in fs::read_dir("/proc/self/task").ok()? {
        let Ok(task) = task else { continue };
        let task = task.path();
        let comm = fs::read_to_string(task.join("comm")).unwrap_or_default();
        if comm.trim_end() != THREAD_NAME {
            continue;
        }
        let Ok(status) = fs::read_to_string(task.join("status")) else {
            continue;
        };
        let mode: Option<u32> = status
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp:"))
            .and_then(|v| v.trim().parse().ok());
        best = best.max(mode);
    }
    best
}

#[test]
fn the_api_thread_serves_under_its_filter() {
    let _serial = one_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api.sock");
    let options = ServerOptions {
        request_timeout: Duration::from_millis(200),
        max_connections: 2,
        thread_hook: Filters::builtin().api().map(ember::api_thread_hook),
        ..ServerOptions::new(1024)
    };
    let api = start_api_server_with(&path, options).unwrap();
    // The filter is in place as soon as the server is started.
    assert_eq!(api_thread_seccomp_mode(), Some(2));
    let stop = Arc::new(AtomicBool::new(false));
    let vmm = serve(api, stop.clone());

    let get = "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let answer = exchange(&path, get);
    assert_eq!(status(&answer), 200, "{answer}");
    assert!(answer.contains("seccomp-vm"), "{answer}");

    let body = r#"{"vcpu_count": 2, "mem_size_mib": 256}"#;
    let put = format!(
        "PUT /machine-config HTTP/1.1\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    assert_eq!(status(&exchange(&path, &put)), 204);

    // Pipelined requests, then garbage.
    let pipelined = format!("{}{get}", get.replace("Connection: close\r\n", ""));
    let answer = exchange_n(&path, &pipelined, 2);
    assert_eq!(answer.matches("HTTP/1.1 200").count(), 2, "{answer}");
    assert_eq!(status(&exchange(&path, "BREW / HTCPCP/1.0\r\n\r\n")), 400);
    // A body over the 1024-byte limit.
    let big = format!(
        "PUT /machine-config HTTP/1.1\r\nContent-Length: 4096\r\n\r\n{}",
        "x".repeat(4096)
    );
    let answer = exchange(&path, &big);
    assert!((400..=413).contains(&status(&answer)), "{answer}");

    // A client that leaves in the middle of a request; then two that stall
    // half-way, taking all the room: a third is refused, and the two get
    // 408 once the request timeout passes.
    let mut gone = UnixStream::connect(&path).unwrap();
    gone.write_all(b"PUT /machine-config HTTP/1.1\r\nContent-Le")
        .unwrap();
    drop(gone);
    thread::sleep(Duration::from_millis(50));
    let stalled: Vec<UnixStream> = (0..2)
        .map(|_| {
            let mut s = UnixStream::connect(&path).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.write_all(b"GET / HT").unwrap();
            s
        })
        .collect();
    thread::sleep(Duration::from_millis(50));
    let refused = exchange(&path, get);
    assert_eq!(status(&refused), 503, "{refused}");
    for mut s in stalled {
        let answer = read_until_closed(&mut s);
        assert_eq!(status(&answer), 408, "{answer}");
    }

    // The server still answers; stopping it ends the filtered thread, which
    // the socket's removal shows.
    let answer = exchange(&path, get);
    assert_eq!(status(&answer), 200);
    stop.store(true, Ordering::SeqCst);
    vmm.join().unwrap();
    assert_eq!(api_thread_seccomp_mode(), None);
    assert!(!path.exists());
}

#[test]
fn a_filter_the_kernel_refuses_stops_the_server_from_starting() {
    let _serial = one_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api.sock");
    // An instruction code no BPF program may hold.
    let bogus = Arc::new(vec![sock_filter {
        code: 0xffff,
        jt: 0,
        jf: 0,
        k: 0,
    }]);
    let options = ServerOptions {
        thread_hook: Some(ember::api_thread_hook(bogus)),
        ..ServerOptions::default()
    };
    let err = start_api_server_with(&path, options).unwrap_err();
    assert!(matches!(err, ApiServerError::Seccomp(_)), "{err}");
    assert!(
        err.to_string()
            .starts_with("the API server thread did not start: cannot install the seccomp filter of thread `ember_api`"),
        "{err}"
    );
    // Nothing is left listening.
    assert!(!path.exists());
}
