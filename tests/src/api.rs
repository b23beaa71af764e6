//! Driving `ember` through its API socket, as a Firecracker user does.
//!
//! [`ApiVm::spawn`] starts `ember --api-sock SOCKET [args]` and returns
//! once the socket accepts connections; [`ApiVm::client`] opens an HTTP/1.1
//! connection ([`Client`]) on it. The guest's serial console (ember's
//! stdout) is collected in the background and can be waited on.
//!
//! ```no_run
//! use ember_tests::api::ApiVm;
//! use ember_tests::guest_path;
//! use serde_json::json;
//!
//! let mut vm = ApiVm::spawn::<&str>(&[]).unwrap();
//! let mut api = vm.client().unwrap();
//! let boot = json!({"kernel_image_path": guest_path("hello")});
//! assert_eq!(api.put("/boot-source", &boot).unwrap().status, 204);
//! let start = json!({"action_type": "InstanceStart"});
//! assert_eq!(api.put("/actions", &start).unwrap().status, 204);
//! let out = vm.wait(std::time::Duration::from_secs(10)).unwrap();
//! assert!(out.status.success());
//! ```

use std::ffi::OsStr;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::ember_binary;

/// How long [`ApiVm::spawn`] waits for the socket, and a [`Client`] for an
/// answer.
pub const API_TIMEOUT: Duration = Duration::from_secs(10);

/// One HTTP response.
#[derive(Debug, Clone)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Header names (lower case) and values, in order.
    pub headers: Vec<(String, String)>,
    /// The body (lossy UTF-8).
    pub body: String,
}

impl Response {
    /// The body parsed as JSON (`Value::Null` when it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }

    /// The `fault_message` of an error body, or `""`.
    pub fn fault_message(&self) -> String {
        self.json()["fault_message"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// The value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// An HTTP/1.1 keep-alive connection to an API socket.
#[derive(Debug)]
pub struct Client {
    stream: UnixStream,
    buf: Vec<u8>,
}

fn bad_response(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

impl Client {
    /// Connects to the socket at `path`; reads time out after
    /// [`API_TIMEOUT`].
    pub fn connect(path: &Path) -> io::Result<Client> {
        let stream = UnixStream::connect(path)?;
        stream.set_read_timeout(Some(API_TIMEOUT))?;
        Ok(Client {
            stream,
            buf: Vec::new(),
        })
    }

    /// The underlying socket, for tests that misbehave on purpose.
    pub fn stream(&mut self) -> &mut UnixStream {
        &mut self.stream
    }

    /// Sends `method path` with an optional JSON body and reads the answer.
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> io::Result<Response> {
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n");
        match body {
            Some(body) => {
                req.push_str("Content-Type: application/json\r\n");
                req.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
                req.push_str(body);
            }
            None => req.push_str("\r\n"),
        }
        self.send_raw(req.as_bytes())?;
        self.read_response()
    }

    /// `GET path`.
    pub fn get(&mut self, path: &str) -> io::Result<Response> {
        self.request("GET", path, None)
    }

    /// `PUT path` with `body` as JSON.
    pub fn put(&mut self, path: &str, body: &Value) -> io::Result<Response> {
        self.request("PUT", path, Some(&body.to_string()))
    }

    /// `PATCH path` with `body` as JSON.
    pub fn patch(&mut self, path: &str, body: &Value) -> io::Result<Response> {
        self.request("PATCH", path, Some(&body.to_string()))
    }

    /// Writes `bytes` as they are.
    pub fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Reads one response (status line, headers, `Content-Length` body).
    pub fn read_response(&mut self) -> io::Result<Response> {
        let header_end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i;
            }
            self.fill()?;
        };
        let head = String::from_utf8_lossy(&self.buf[..header_end]).into_owned();
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad_response(format!("bad status line {status_line:?}")))?;
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let len: usize = headers
            .iter()
            .find(|(n, _)| n == "content-length")
            .map(|(_, v)| v.parse())
            .transpose()
            .map_err(|_| bad_response("bad Content-Length"))?
            .unwrap_or(0);
        let body_start = header_end + 4;
        while self.buf.len() < body_start + len {
            self.fill()?;
        }
        let body = String::from_utf8_lossy(&self.buf[body_start..body_start + len]).into_owned();
        self.buf.drain(..body_start + len);
        Ok(Response {
            status,
            headers,
            body,
        })
    }

    fn fill(&mut self) -> io::Result<()> {
        let mut chunk = [0u8; 4096];
        let n = self.stream.read(&mut chunk)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the server closed the connection",
            ));
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A private directory removed on drop.
#[derive(Debug)]
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new() -> io::Result<ScratchDir> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!(
            "ember-api-{}-{}-{nanos}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir(&dir)?;
        Ok(ScratchDir(dir))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// How an ember process ended.
#[derive(Debug, Clone)]
pub struct Exit {
    /// Exit status.
    pub status: ExitStatus,
    /// The serial console (lossy UTF-8).
    pub stdout: String,
    /// Ember's diagnostics (lossy UTF-8).
    pub stderr: String,
}

/// An `ember --api-sock` process. Dropping it kills it.
#[derive(Debug)]
pub struct ApiVm {
    child: Child,
    socket: PathBuf,
    stdout_rx: Receiver<Vec<u8>>,
    stdout: Vec<u8>,
    stdout_closed: bool,
    stderr_reader: Option<JoinHandle<Vec<u8>>>,
    exited: Option<ExitStatus>,
    dir: ScratchDir,
}

impl ApiVm {
    /// Starts `ember --api-sock <dir>/api.sock args...` and waits until the
    /// socket accepts a connection.
    pub fn spawn<S: AsRef<OsStr>>(args: &[S]) -> io::Result<ApiVm> {
        let mut vm = ApiVm::spawn_only(args)?;
        let deadline = Instant::now() + API_TIMEOUT;
        loop {
            if UnixStream::connect(&vm.socket).is_ok() {
                return Ok(vm);
            }
            if let Some(status) = vm.child.try_wait()? {
                vm.exited = Some(status);
                let stderr = vm.stderr_reader.take().and_then(|r| r.join().ok());
                return Err(io::Error::other(format!(
                    "ember exited ({status}) before its API socket accepted: {}",
                    String::from_utf8_lossy(&stderr.unwrap_or_default())
                )));
            }
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the API socket did not accept within 10 s",
                ));
            }
            thread::sleep(Duration::from_micros(200));
        }
    }

    /// Starts `ember --api-sock <dir>/api.sock args...` and returns at once.
    pub fn spawn_only<S: AsRef<OsStr>>(args: &[S]) -> io::Result<ApiVm> {
        let dir = ScratchDir::new()?;
        let socket = dir.0.join("api.sock");
        let mut child = Command::new(ember_binary())
            // Its own process group, so that killing it kills all of it.
            .process_group(0)
            .arg("--api-sock")
            .arg(&socket)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let (tx, stdout_rx) = mpsc::channel();
        if let Some(out) = child.stdout.take() {
            thread::spawn(move || pump(out, tx));
        }
        let stderr_reader = child
            .stderr
            .take()
            .map(|e| thread::spawn(move || read_all(e)));
        Ok(ApiVm {
            child,
            socket,
            stdout_rx,
            stdout: Vec::new(),
            stdout_closed: false,
            stderr_reader,
            exited: None,
            dir,
        })
    }

    /// The API socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// A private directory for the test's files, removed with the VM.
    pub fn dir(&self) -> &Path {
        &self.dir.0
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A new connection to the API socket.
    pub fn client(&self) -> io::Result<Client> {
        Client::connect(&self.socket)
    }

    fn take_stdout(&mut self, wait: Duration) {
        match self.stdout_rx.recv_timeout(wait) {
            Ok(chunk) => self.stdout.extend_from_slice(&chunk),
            Err(RecvTimeoutError::Timeout) => return,
            Err(RecvTimeoutError::Disconnected) => {
                self.stdout_closed = true;
                return;
            }
        }
        while let Ok(chunk) = self.stdout_rx.try_recv() {
            self.stdout.extend_from_slice(&chunk);
        }
    }

    /// The serial output received so far.
    pub fn stdout(&mut self) -> String {
        self.take_stdout(Duration::ZERO);
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// Waits until the serial output so far satisfies `pred`; returns the
    /// output, or an error with it on timeout or when ember exits first.
    pub fn wait_for_output(
        &mut self,
        mut pred: impl FnMut(&str) -> bool,
        timeout: Duration,
    ) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let out = String::from_utf8_lossy(&self.stdout).into_owned();
            if pred(&out) {
                return Ok(out);
            }
            let now = Instant::now();
            if self.stdout_closed || now >= deadline {
                let why = if self.stdout_closed {
                    "ember closed its stdout"
                } else {
                    "timed out"
                };
                return Err(format!("{why} waiting for serial output; got:\n{out}"));
            }
            self.take_stdout((deadline - now).min(Duration::from_millis(20)));
        }
    }

    /// Waits up to `timeout` for ember to exit by itself; kills it and
    /// returns an error with its output if it does not.
    pub fn wait(mut self, timeout: Duration) -> Result<Exit, String> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    self.exited = Some(status);
                    return Ok(self.collect(status));
                }
                Ok(None) => {}
                Err(e) => return Err(format!("cannot wait for ember: {e}")),
            }
            if Instant::now() >= deadline {
                let status = self.kill_now();
                let exit = self.collect(status);
                return Err(format!(
                    "ember still ran after {timeout:?} and was killed\n--- stdout ---\n{}\n--- stderr ---\n{}",
                    exit.stdout, exit.stderr
                ));
            }
            self.take_stdout(Duration::from_millis(5));
        }
    }

    /// Kills ember (SIGKILL) and returns what it printed.
    pub fn kill(mut self) -> Exit {
        let status = self.kill_now();
        self.collect(status)
    }

    fn kill_now(&mut self) -> ExitStatus {
        if let Some(status) = self.exited {
            return status;
        }
        if let Ok(pgid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: kill(2) has no memory effects; the child is not reaped
            // yet, so its pid (its process group id) is still ours.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
        }
        let status = self
            .child
            .wait()
            .unwrap_or_else(|e| panic!("cannot reap ember: {e}"));
        self.exited = Some(status);
        status
    }

    fn collect(&mut self, status: ExitStatus) -> Exit {
        while !self.stdout_closed {
            self.take_stdout(Duration::from_secs(1));
        }
        let stderr = self
            .stderr_reader
            .take()
            .and_then(|r| r.join().ok())
            .unwrap_or_default();
        Exit {
            status,
            stdout: String::from_utf8_lossy(&self.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
        }
    }
}

impl Drop for ApiVm {
    fn drop(&mut self) {
        self.kill_now();
    }
}

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
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        }
    }
}

fn read_all(mut err: ChildStderr) -> Vec<u8> {
    let mut buf = Vec::new();
    let _ = err.read_to_end(&mut buf);
    buf
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;

    use super::*;

    #[test]
    fn client_reads_pipelined_responses_and_bodies() {
        let dir = ScratchDir::new().unwrap();
        let path = dir.0.join("s");
        let listener = UnixListener::bind(&path).unwrap();
        let server = thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut req = [0u8; 1024];
            let n = s.read(&mut req).unwrap();
            s.write_all(
                b"HTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 400 Bad Request\r\nContent-Length: 24\r\n\r\n{\"fault_message\": \"no\"}\n",
            )
            .unwrap();
            String::from_utf8_lossy(&req[..n]).into_owned()
        });
        let mut c = Client::connect(&path).unwrap();
        let r = c.put("/x", &serde_json::json!({"a": 1})).unwrap();
        assert_eq!(r.status, 204);
        assert_eq!(r.body, "");
        let r = c.read_response().unwrap();
        assert_eq!(r.status, 400);
        assert_eq!(r.fault_message(), "no");
        assert_eq!(r.header("Content-Length"), Some("24"));
        let req = server.join().unwrap();
        assert!(req.starts_with("PUT /x HTTP/1.1\r\n"), "{req}");
        assert!(req.ends_with("\r\n\r\n{\"a\":1}"), "{req}");
    }
}
