//! The API server over a real Unix socket: hand-written HTTP from std
//! `UnixStream`s, a VMM thread answering with `PreBootResources`.

use std::io::{Read, Write};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use ember_api::{
    start_api_server, start_api_server_with, ActionHandler, ApiServerError, ApiServerHandle,
    PreBootResources, ServerOptions, VmmAction, VmmResponse, DEFAULT_MAX_PAYLOAD,
    IDLE_EVICTION_GRACE, THREAD_NAME,
};

/// A reply as read off the socket.
#[derive(Debug)]
struct Reply {
    status: u16,
    head: String,
    body: String,
}

impl Reply {
    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {self:?}"))
    }

    fn fault(&self) -> String {
        self.json()["fault_message"]
            .as_str()
            .unwrap_or_else(|| panic!("no fault_message: {self:?}"))
            .to_string()
    }
}

struct Client {
    stream: UnixStream,
    buf: Vec<u8>,
}

impl Client {
    fn connect(path: &Path) -> Self {
        let stream = UnixStream::connect(path).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        Client {
            stream,
            buf: Vec::new(),
        }
    }

    fn send(&mut self, raw: &[u8]) {
        self.stream.write_all(raw).unwrap();
    }

    fn fill(&mut self) -> usize {
        let mut tmp = [0u8; 4096];
        let n = self.stream.read(&mut tmp).unwrap();
        self.buf.extend_from_slice(&tmp[..n]);
        n
    }

    /// Reads one reply; `None` if the server closed the connection first.
    fn try_reply(&mut self) -> Option<Reply> {
        let end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if self.fill() == 0 {
                return None;
            }
        };
        let head = String::from_utf8(self.buf[..end].to_vec()).unwrap();
        let status: u16 = head[9..12].parse().unwrap();
        let len = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .map(|v| v.trim().parse::<usize>().unwrap())
            .unwrap_or(0);
        while self.buf.len() < end + len {
            assert!(self.fill() > 0, "connection closed inside a body");
        }
        let body = String::from_utf8(self.buf[end..end + len].to_vec()).unwrap();
        self.buf.drain(..end + len);
        Some(Reply { status, head, body })
    }

    fn reply(&mut self) -> Reply {
        self.try_reply().expect("the server closed the connection")
    }

    fn call(&mut self, method: &str, path: &str, body: &str) -> Reply {
        self.send(request(method, path, body).as_bytes());
        self.reply()
    }

    /// Whether the server has closed the connection (EOF, nothing buffered).
    fn is_closed(&mut self) -> bool {
        self.buf.is_empty() && self.fill() == 0
    }
}

fn request(method: &str, path: &str, body: &str) -> String {
    if body.is_empty() {
        format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n\r\n")
    } else {
        format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    }
}

/// A VMM thread: `PreBootResources`, made slow for `GET /version`, counting
/// what it handles.
struct Vmm {
    handled: Arc<AtomicUsize>,
    _thread: thread::JoinHandle<()>,
}

struct SlowVersion {
    inner: PreBootResources,
    handled: Arc<AtomicUsize>,
}

impl ActionHandler for SlowVersion {
    fn handle(&mut self, action: VmmAction) -> VmmResponse {
        self.handled.fetch_add(1, Ordering::SeqCst);
        if action == VmmAction::GetVersion {
            thread::sleep(Duration::from_millis(150));
        }
        self.inner.handle(action)
    }
}

fn vmm(api: ApiServerHandle) -> Vmm {
    let handled = Arc::new(AtomicUsize::new(0));
    let mut handler = SlowVersion {
        inner: PreBootResources::new("test-vm"),
        handled: handled.clone(),
    };
    let thread = thread::spawn(move || {
        // The event-loop way: wait for the eventfd, then drain the queue.
        let fd = api.request_event.as_raw_fd();
        loop {
            let mut p = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one live pollfd.
            unsafe { libc::poll(&mut p, 1, 200) };
            api.serve(&mut handler);
            if !api.is_running() {
                return;
            }
        }
    });
    Vmm {
        handled,
        _thread: thread,
    }
}

fn socket(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("api.sock")
}

fn served() -> (tempfile::TempDir, PathBuf, Vmm) {
    let dir = tempfile::tempdir().unwrap();
    let path = socket(&dir);
    let api = start_api_server(&path, DEFAULT_MAX_PAYLOAD).unwrap();
    let vmm = vmm(api);
    (dir, path, vmm)
}

#[test]
fn endpoints_answer_with_firecracker_statuses() {
    let (_dir, path, _vmm) = served();
    let mut c = Client::connect(&path);

    let r = c.call("GET", "/", "");
    assert_eq!(r.status, 200, "{r:?}");
    assert!(
        r.head.contains("Content-Type: application/json\r\n"),
        "{r:?}"
    );
    let info = r.json();
    assert_eq!(info["state"], "Not started");
    assert_eq!(info["id"], "test-vm");
    assert_eq!(info["app_name"], "Ember");

    let r = c.call("GET", "/version", "");
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json()["firecracker_version"],
        ember_api::FIRECRACKER_API_VERSION
    );

    let r = c.call(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 2, "mem_size_mib": 256}"#,
    );
    assert_eq!(r.status, 204, "{r:?}");
    assert!(r.body.is_empty());
    let r = c.call("PATCH", "/machine-config", r#"{"mem_size_mib": 512}"#);
    assert_eq!(r.status, 204, "{r:?}");
    let r = c.call("GET", "/machine-config", "");
    assert_eq!(
        (
            r.json()["vcpu_count"].as_u64(),
            r.json()["mem_size_mib"].as_u64()
        ),
        (Some(2), Some(512))
    );
    let r = c.call("GET", "/vm/config", "");
    assert_eq!(r.json()["machine-config"]["mem_size_mib"], 512);

    let r = c.call(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 0, "mem_size_mib": 256}"#,
    );
    assert_eq!(r.status, 400);
    assert!(r.fault().starts_with("Machine config error: "), "{r:?}");

    let r = c.call("PUT", "/actions", r#"{"action_type": "FlushMetrics"}"#);
    assert_eq!(r.status, 400);
    assert_eq!(
        r.fault(),
        "The requested operation is not supported before starting the microVM."
    );

    let r = c.call("GET", "/nowhere", "");
    assert_eq!(r.status, 404);
    assert_eq!(
        r.fault(),
        "Invalid request method and/or path: GET /nowhere."
    );

    let r = c.call("GET", "/drives/rootfs", "");
    assert_eq!(r.status, 405);
    assert!(r.head.contains("Allow: PUT, PATCH\r\n"), "{r:?}");

    let r = c.call(
        "PUT",
        "/boot-source",
        r#"{"kernel_image_path": "/k", "bogus": 1}"#,
    );
    assert_eq!(r.status, 400);
    assert!(r.fault().contains("unknown field `bogus`"), "{r:?}");

    let r = c.call("PUT", "/boot-source", "");
    assert_eq!((r.status, r.fault().as_str()), (400, "Empty PUT request."));
}

#[test]
fn a_deprecated_cpu_template_gets_the_deprecation_header() {
    let (_dir, path, _vmm) = served();
    let mut c = Client::connect(&path);
    let r = c.call(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 1, "mem_size_mib": 128, "cpu_template": "T2A"}"#,
    );
    assert_eq!(r.status, 204, "{r:?}");
    assert!(r.head.contains("\r\nDeprecation: true\r\n"), "{r:?}");
    let r = c.call("GET", "/machine-config", "");
    assert_eq!(r.json()["cpu_template"], "T2A", "{r:?}");
    assert!(!r.head.contains("Deprecation"), "{r:?}");
    // Also on a refused request that used the field.
    let r = c.call(
        "PATCH",
        "/machine-config",
        r#"{"vcpu_count": 3, "smt": true, "cpu_template": "None"}"#,
    );
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.head.contains("\r\nDeprecation: true\r\n"), "{r:?}");
    let r = c.call(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 1, "mem_size_mib": 128}"#,
    );
    assert!(!r.head.contains("Deprecation"), "{r:?}");

    // A custom template replaces the static one, which is no longer shown.
    let r = c.call(
        "PUT",
        "/cpu-config",
        r#"{"cpuid_modifiers": [{"leaf": "0x1", "subleaf": "0x0", "flags": 0,
            "modifiers": [{"register": "ecx", "bitmap": "0bx0xxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}]}]}"#,
    );
    assert_eq!(r.status, 204, "{r:?}");
    let r = c.call("GET", "/machine-config", "");
    assert!(r.json().get("cpu_template").is_none(), "{r:?}");
    let r = c.call(
        "PUT",
        "/cpu-config",
        r#"{"msr_modifiers": [{"addr": "0x10a", "bitmap": "0b2"}]}"#,
    );
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.fault().contains("MSR 0x10a: bitmap \"0b2\""), "{r:?}");
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let (_dir, path, vmm) = served();
    let mut c = Client::connect(&path);
    // The first one is slow in the VMM; the second fails on the API thread
    // at once; the third and fourth go to the VMM again. Answers must still
    // come back in request order.
    let mut all = String::new();
    all += &request("GET", "/version", "");
    all += &request("GET", "/missing", "");
    all += &request(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 4, "mem_size_mib": 64}"#,
    );
    all += &request("GET", "/machine-config", "");
    c.send(all.as_bytes());
    let replies: Vec<Reply> = (0..4).map(|_| c.reply()).collect();
    assert_eq!(replies[0].status, 200);
    assert!(replies[0].json()["firecracker_version"].is_string());
    assert_eq!(replies[1].status, 404);
    assert_eq!(replies[2].status, 204);
    assert_eq!(replies[3].json()["vcpu_count"], 4);
    assert_eq!(vmm.handled.load(Ordering::SeqCst), 3);
}

#[test]
fn oversized_body_is_refused_and_the_connection_survives() {
    let (_dir, path, vmm) = served();
    let mut c = Client::connect(&path);
    let body = format!(r#"{{"kernel_image_path": "{}"}}"#, "k".repeat(60 * 1024));
    let r = c.call("PUT", "/boot-source", &body);
    assert_eq!(r.status, 400);
    assert_eq!(
        r.fault(),
        format!(
            "Request payload with size {} is larger than the limit of 51200 allowed by server.",
            body.len()
        )
    );
    // The body was skipped: the same connection goes on.
    let r = c.call("GET", "/machine-config", "");
    assert_eq!(r.status, 200);
    assert_eq!(
        vmm.handled.load(Ordering::SeqCst),
        1,
        "the big request never reached the VMM"
    );
}

#[test]
fn the_payload_limit_is_configurable() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket(&dir);
    let _vmm = vmm(start_api_server(&path, 100).unwrap());
    let mut c = Client::connect(&path);
    let body = format!(r#"{{"metrics_path": "{}"}}"#, "m".repeat(100));
    let r = c.call("PUT", "/metrics", &body);
    assert_eq!(r.status, 400);
    assert!(r.fault().contains("limit of 100 allowed"), "{r:?}");
}

#[test]
fn a_client_that_leaves_mid_request_disturbs_nobody() {
    let (_dir, path, vmm) = served();
    {
        let mut gone = Client::connect(&path);
        gone.send(b"PUT /machine-config HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"vcpu_count\":");
        // Dropped here: the socket closes with half a request sent.
    }
    {
        let mut gone = Client::connect(&path);
        gone.send(b"GET /vers");
    }
    let mut c = Client::connect(&path);
    let r = c.call("GET", "/machine-config", "");
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json()["vcpu_count"],
        1,
        "the half request was not applied"
    );
    assert_eq!(vmm.handled.load(Ordering::SeqCst), 1);
}

#[test]
fn a_slow_client_does_not_hold_up_another() {
    let (_dir, path, _vmm) = served();
    let slow_path = path.clone();
    let slow = thread::spawn(move || {
        let mut c = Client::connect(&slow_path);
        let raw = request(
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 2, "mem_size_mib": 300}"#,
        );
        for b in raw.as_bytes() {
            c.send(&[*b]);
            thread::sleep(Duration::from_millis(3));
        }
        c.reply()
    });
    // While the slow client trickles in, another one is served promptly.
    let mut fast = Client::connect(&path);
    let start = Instant::now();
    let mut served = 0;
    while !slow.is_finished() && served < 200 {
        let t = Instant::now();
        let r = fast.call("GET", "/", "");
        assert_eq!(r.status, 200);
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "{:?}",
            t.elapsed()
        );
        served += 1;
        thread::sleep(Duration::from_millis(5));
    }
    assert!(
        served >= 10,
        "only {served} requests in {:?}",
        start.elapsed()
    );
    let r = slow.join().unwrap();
    assert_eq!(r.status, 204, "{r:?}");
    let r = fast.call("GET", "/machine-config", "");
    assert_eq!(r.json()["mem_size_mib"], 300);
}

#[test]
fn a_stalled_request_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket(&dir);
    let opts = ServerOptions {
        request_timeout: Duration::from_millis(200),
        ..ServerOptions::new(DEFAULT_MAX_PAYLOAD)
    };
    let _vmm = vmm(start_api_server_with(&path, opts).unwrap());
    let mut c = Client::connect(&path);
    c.send(b"PUT /machine-config HTTP/1.1\r\nContent-Length: 50\r\n\r\n{");
    let start = Instant::now();
    let r = c.reply();
    assert_eq!(r.status, 408, "{r:?}");
    assert!(start.elapsed() >= Duration::from_millis(150));
    assert!(r.head.contains("Connection: close\r\n"));
    assert!(c.is_closed());
    // An idle connection is not a stalled request.
    let mut idle = Client::connect(&path);
    thread::sleep(Duration::from_millis(400));
    assert_eq!(idle.call("GET", "/", "").status, 200);
}

#[test]
fn connection_close_and_http_1_0_are_honoured() {
    let (_dir, path, _vmm) = served();
    let mut c = Client::connect(&path);
    c.send(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n");
    let r = c.reply();
    assert_eq!(r.status, 200);
    assert!(r.head.contains("Connection: close\r\n"));
    assert!(c.is_closed());

    let mut c = Client::connect(&path);
    c.send(b"GET /version HTTP/1.0\r\n\r\n");
    assert_eq!(c.reply().status, 200);
    assert!(c.is_closed());
}

#[test]
fn expect_100_continue_like_curl() {
    let (_dir, path, _vmm) = served();
    let mut c = Client::connect(&path);
    let body = r#"{"vcpu_count": 1, "mem_size_mib": 128}"#;
    c.send(
        format!(
            "PUT /machine-config HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    assert_eq!(c.reply().status, 100);
    c.send(body.as_bytes());
    assert_eq!(c.reply().status, 204);
}

#[test]
fn malformed_http_gets_400_and_a_close() {
    let (_dir, path, _vmm) = served();
    let mut c = Client::connect(&path);
    c.send(b"this is not http\r\n\r\n");
    let r = c.reply();
    assert_eq!(r.status, 400);
    assert!(r.fault().starts_with("Invalid request"), "{r:?}");
    assert!(c.is_closed());
}

#[test]
fn a_dropped_responder_answers_500() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket(&dir);
    let api = start_api_server(&path, DEFAULT_MAX_PAYLOAD).unwrap();
    let t = thread::spawn(move || {
        let (_action, responder) = api.recv().unwrap();
        drop(responder);
        // Keep the server up until the client has read its answer.
        thread::sleep(Duration::from_millis(300));
    });
    let mut c = Client::connect(&path);
    let r = c.call("GET", "/", "");
    assert_eq!(r.status, 500);
    assert_eq!(
        r.fault(),
        "The VMM dropped the request without answering it."
    );
    t.join().unwrap();
}

#[test]
fn socket_lifecycle() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket(&dir);
    std::fs::write(&path, b"").unwrap();
    let e = start_api_server(&path, DEFAULT_MAX_PAYLOAD).unwrap_err();
    assert!(matches!(e, ApiServerError::SocketExists(_)), "{e}");
    assert!(e.to_string().contains(path.to_str().unwrap()), "{e}");
    std::fs::remove_file(&path).unwrap();

    let e =
        start_api_server(Path::new("/nonexistent/dir/api.sock"), DEFAULT_MAX_PAYLOAD).unwrap_err();
    assert!(matches!(e, ApiServerError::Bind { .. }), "{e}");

    let api = start_api_server(&path, DEFAULT_MAX_PAYLOAD).unwrap();
    assert!(path.exists());
    // The server thread carries its name (seccomp and logs rely on it).
    let names: Vec<String> = std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|s| s.trim().to_string())
        .collect();
    assert!(names.iter().any(|n| n == "ember_api"), "{names:?}");
    assert!(api.is_running());
    drop(api);
    assert!(
        !path.exists(),
        "the socket is removed when the server stops"
    );
}

#[test]
fn too_many_connections_evicts_the_idle_or_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket(&dir);
    let opts = ServerOptions {
        max_connections: 2,
        ..ServerOptions::new(DEFAULT_MAX_PAYLOAD)
    };
    let _vmm = vmm(start_api_server_with(&path, opts).unwrap());
    // Two connections busy with half a request each: nothing to evict.
    let mut a = Client::connect(&path);
    a.send(b"GET / HT");
    let mut b = Client::connect(&path);
    b.send(b"GET / HT");
    thread::sleep(Duration::from_millis(100));
    let mut refused = Client::connect(&path);
    let r = refused.reply();
    assert_eq!(r.status, 503);
    assert_eq!(r.fault(), "Too many open connections");
    // Just answered, `a` belongs to a client about to send again: a
    // newcomer is refused rather than cut it off.
    a.send(b"TP/1.1\r\n\r\n");
    assert_eq!(a.reply().status, 200);
    let mut early = Client::connect(&path);
    assert_eq!(early.reply().status, 503);
    assert_eq!(a.call("GET", "/", "").status, 200, "`a` was kept");
    // Idle for longer than the grace, it makes way for a newcomer.
    thread::sleep(IDLE_EVICTION_GRACE + Duration::from_millis(100));
    let mut c = Client::connect(&path);
    assert_eq!(c.call("GET", "/", "").status, 200);
    assert!(
        a.is_closed(),
        "the idle connection was closed for the newcomer"
    );
    b.send(b"TP/1.1\r\n\r\n");
    assert_eq!(b.reply().status, 200);
}

#[test]
fn request_counts_reach_the_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket(&dir);
    let metrics = ember_logger::metrics::Metrics::new();
    let opts = ServerOptions {
        metrics: metrics.api_requests(),
        ..ServerOptions::new(DEFAULT_MAX_PAYLOAD)
    };
    let _vmm = vmm(start_api_server_with(&path, opts).unwrap());
    let mut c = Client::connect(&path);
    c.call(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 1, "mem_size_mib": 64}"#,
    );
    c.call(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 0, "mem_size_mib": 64}"#,
    );
    c.call("PUT", "/machine-config", "not json");
    c.call("GET", "/", "");
    c.call("PATCH", "/machine-config", r#"{"cpu_template": "None"}"#);
    c.call("PUT", "/cpu-config", "{}");
    c.call("PUT", "/cpu-config", r#"{"msr_modifiers": [{}]}"#);
    let line: serde_json::Value = serde_json::from_str(&metrics.render()).unwrap();
    assert_eq!(line["put_api_requests"]["machine_cfg_count"], 3);
    // One refused by the VMM, one by the parser.
    assert_eq!(line["put_api_requests"]["machine_cfg_fails"], 2);
    assert_eq!(line["get_api_requests"]["instance_info_count"], 1);
    assert_eq!(line["put_api_requests"]["cpu_cfg_count"], 2);
    assert_eq!(line["put_api_requests"]["cpu_cfg_fails"], 1);
    assert_eq!(line["deprecated_api"]["deprecated_http_api_calls"], 1);
}

#[test]
fn the_thread_hook_runs_first_on_the_api_thread_and_can_refuse_to_serve() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket(&dir);
    let ran_on = Arc::new(std::sync::Mutex::new(None));
    let seen = ran_on.clone();
    let opts = ServerOptions {
        thread_hook: Some(Arc::new(move || {
            *seen.lock().unwrap() = std::thread::current().name().map(String::from);
            Ok(())
        })),
        ..ServerOptions::new(DEFAULT_MAX_PAYLOAD)
    };
    let _vmm = vmm(start_api_server_with(&path, opts).unwrap());
    // Run before start_api_server_with returned, on the server's thread.
    assert_eq!(ran_on.lock().unwrap().as_deref(), Some(THREAD_NAME));
    let mut c = Client::connect(&path);
    assert_eq!(c.call("GET", "/", "").status, 200);

    let refused = socket(&dir).with_file_name("refused.sock");
    let opts = ServerOptions {
        thread_hook: Some(Arc::new(|| Err("no filter for you".into()))),
        ..ServerOptions::new(DEFAULT_MAX_PAYLOAD)
    };
    let e = start_api_server_with(&refused, opts).unwrap_err();
    assert_eq!(
        e.to_string(),
        "the API server thread did not start: no filter for you"
    );
    assert!(!refused.exists(), "no socket is left behind");
}
