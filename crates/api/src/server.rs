//! The API server thread: one thread, non-blocking sockets and `poll(2)`,
//! a buffer per connection, answers written in request order.
//!
//! Requests are parsed on this thread and sent to the VMM thread over a
//! channel, with an eventfd the VMM's event loop watches; the VMM answers
//! through a [`Responder`], which wakes this thread with a second eventfd.
//! A slow or vanished client only ever costs its own buffer.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::action::{ApiError, VmmAction, VmmResponse};
use super::http::{
    error_to_http, response_to_http, Decoded, HttpRequest, RequestDecoder, CONTINUE,
};
use super::preboot::ActionHandler;
use super::request::{
    allowed_methods, deprecation, parse_request, request_counters, DEFAULT_MAX_PAYLOAD,
};
use ember_logger::metrics::ApiRequestMetrics;

/// Name of the API server thread.
pub const THREAD_NAME: &str = "ember_api";

/// How long a connection must have been idle (no request under way, no
/// answer pending) before a newcomer past the connection cap may take its
/// place. A connection just accepted, or just answered, belongs to a client
/// about to send: closing it would lose that request, so the newcomer gets
/// `503` instead.
pub const IDLE_EVICTION_GRACE: Duration = Duration::from_millis(500);

/// Errors starting the API server.
#[derive(Debug, thiserror::Error)]
pub enum ApiServerError {
    /// Something already exists at the socket path.
    #[error("the API socket path {0} already exists: remove it or choose another --api-sock")]
    SocketExists(PathBuf),
    /// The socket could not be created.
    #[error("cannot bind the API socket {path}: {source}")]
    Bind {
        /// The `--api-sock` path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// An eventfd could not be created.
    #[error("cannot create an eventfd for the API server: {0}")]
    EventFd(#[source] io::Error),
    /// The thread could not be started.
    #[error("cannot start the API server thread: {0}")]
    Spawn(#[source] io::Error),
    /// The API thread's [`ThreadHook`] could not install its seccomp
    /// filter; it did not serve.
    #[error("the API server thread did not start: {0}")]
    Seccomp(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// What the API thread runs first, before it serves anything: the VMM
/// installs the thread's seccomp filter with it. An error stops the thread
/// before it reads a byte.
pub type ThreadHook =
    Arc<dyn Fn() -> Result<(), Box<dyn std::error::Error + Send + Sync>> + Send + Sync>;

/// How the server behaves; [`ServerOptions::new`] gives Firecracker's
/// limits.
#[derive(Clone)]
pub struct ServerOptions {
    /// Largest request body, `--http-api-max-payload-size`.
    pub max_payload: usize,
    /// How long a request may take to arrive once its first byte has: a
    /// client that stalls longer gets `408` and is disconnected.
    pub request_timeout: Duration,
    /// Open connections served at once; past that the longest-idle one is
    /// closed if it has been idle for [`IDLE_EVICTION_GRACE`], or else the
    /// new one gets `503`.
    pub max_connections: usize,
    /// Where request counts go (`*_api_requests` metrics groups).
    pub metrics: Arc<ApiRequestMetrics>,
    /// Run first on the API thread (its seccomp filter); `None` runs it
    /// unfiltered.
    pub thread_hook: Option<ThreadHook>,
}

impl std::fmt::Debug for ServerOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerOptions")
            .field("max_payload", &self.max_payload)
            .field("request_timeout", &self.request_timeout)
            .field("max_connections", &self.max_connections)
            .field("thread_hook", &self.thread_hook.is_some())
            .finish_non_exhaustive()
    }
}

impl ServerOptions {
    /// `max_payload`, a 30 s request timeout, 32 connections, fresh
    /// counters.
    pub fn new(max_payload: usize) -> Self {
        ServerOptions {
            max_payload,
            request_timeout: Duration::from_secs(30),
            max_connections: 32,
            metrics: Arc::default(),
            thread_hook: None,
        }
    }
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_PAYLOAD)
    }
}

/// Answers one request. Dropping it unanswered answers
/// `500 {"fault_message": "The VMM dropped the request without answering it."}`,
/// so a client never waits forever.
#[derive(Debug)]
pub struct Responder {
    id: u64,
    tx: Sender<(u64, VmmResponse)>,
    wake: Arc<EventFd>,
    answered: bool,
}

impl Responder {
    /// Sends the answer to the API thread, which writes it to the client.
    pub fn respond(mut self, response: VmmResponse) {
        self.send(response);
    }

    fn send(&mut self, response: VmmResponse) {
        if self.answered {
            return;
        }
        self.answered = true;
        // Both fail only when the API thread is gone, and then nobody waits.
        let _ = self.tx.send((self.id, response));
        let _ = self.wake.write(1);
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.send(Err(ApiError::internal(
            "The VMM dropped the request without answering it.",
        )));
    }
}

/// The VMM thread's end of the API server.
#[derive(Debug)]
pub struct ApiServerHandle {
    /// Readable when requests are queued: register it with the event loop,
    /// then call [`try_recv`](Self::try_recv) until it returns `None`.
    pub request_event: EventFd,
    requests: Receiver<(VmmAction, Responder)>,
    shutdown: EventFd,
    thread: Option<JoinHandle<()>>,
    metrics: Arc<ApiRequestMetrics>,
    socket_path: PathBuf,
    socket_id: Option<(u64, u64)>,
}

impl ApiServerHandle {
    /// The next queued request, without blocking.
    ///
    /// Clears `request_event` before looking at the queue, so a request
    /// that arrives meanwhile makes it readable again: no wake-up is lost.
    pub fn try_recv(&self) -> Option<(VmmAction, Responder)> {
        // EAGAIN just means the counter was already clear.
        let _ = self.request_event.read();
        self.requests.try_recv().ok()
    }

    /// The next request, waiting for it; `None` once the API thread has
    /// stopped. For a VMM that has nothing else to do before boot.
    pub fn recv(&self) -> Option<(VmmAction, Responder)> {
        let item = self.requests.recv().ok();
        let _ = self.request_event.read();
        item
    }

    /// Answers every queued request with `handler`; returns how many.
    pub fn serve(&self, handler: &mut dyn ActionHandler) -> usize {
        let mut n = 0;
        while let Some((action, responder)) = self.try_recv() {
            responder.respond(handler.handle(action));
            n += 1;
        }
        n
    }

    /// The request counters the server updates.
    pub fn request_metrics(&self) -> Arc<ApiRequestMetrics> {
        self.metrics.clone()
    }

    /// The socket path.
    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    /// Whether the API thread still runs.
    pub fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }
}

impl Drop for ApiServerHandle {
    /// Stops the thread and removes the socket, if it is still ours.
    fn drop(&mut self) {
        let _ = self.shutdown.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let ours = std::fs::symlink_metadata(&self.socket_path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        if ours.is_some() && ours == self.socket_id {
            let _ = std::fs::remove_file(&self.socket_path);
        }
    }
}

/// Binds `socket_path` and starts the API server thread with
/// Firecracker's limits and a `max_payload`-byte body limit.
pub fn start_api_server(
    socket_path: &Path,
    max_payload: usize,
) -> Result<ApiServerHandle, ApiServerError> {
    start_api_server_with(socket_path, ServerOptions::new(max_payload))
}

/// Binds `socket_path` and starts the API server thread.
///
/// Fails if anything exists at the path (Firecracker does not reuse a
/// socket either) or the socket cannot be bound.
pub fn start_api_server_with(
    socket_path: &Path,
    options: ServerOptions,
) -> Result<ApiServerHandle, ApiServerError> {
    if std::fs::symlink_metadata(socket_path).is_ok() {
        return Err(ApiServerError::SocketExists(socket_path.to_path_buf()));
    }
    let bind_err = |source| ApiServerError::Bind {
        path: socket_path.to_path_buf(),
        source,
    };
    let listener = UnixListener::bind(socket_path).map_err(bind_err)?;
    listener.set_nonblocking(true).map_err(bind_err)?;
    let socket_id = std::fs::symlink_metadata(socket_path)
        .ok()
        .map(|m| (m.dev(), m.ino()));

    let request_event = EventFd::new(EFD_NONBLOCK).map_err(ApiServerError::EventFd)?;
    let shutdown = EventFd::new(EFD_NONBLOCK).map_err(ApiServerError::EventFd)?;
    let wake = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(ApiServerError::EventFd)?);
    let (to_vmm, requests) = mpsc::channel();
    let (responses_tx, responses_rx) = mpsc::channel();
    let metrics = options.metrics.clone();
    let hook = options.thread_hook.clone();

    let server = Server {
        listener,
        shutdown: shutdown.try_clone().map_err(ApiServerError::EventFd)?,
        responses_rx,
        conns: Vec::new(),
        dispatch: Dispatch {
            to_vmm,
            request_event: request_event.try_clone().map_err(ApiServerError::EventFd)?,
            responses_tx,
            wake,
            next_id: 0,
            options,
        },
    };
    // The thread says whether its filter is in place before this returns, so
    // that no request is ever served by an unfiltered thread.
    let (installed_tx, installed) = mpsc::sync_channel(1);
    let thread = std::thread::Builder::new()
        .name(THREAD_NAME.to_string())
        .spawn(move || {
            if let Some(hook) = hook {
                let result = hook();
                let failed = result.is_err();
                let _ = installed_tx.send(result);
                if failed {
                    return;
                }
            }
            drop(installed_tx);
            server.run()
        })
        .map_err(ApiServerError::Spawn)?;
    // Without a filter the sender is dropped at once: `Err(RecvError)`.
    if let Ok(Err(e)) = installed.recv() {
        let _ = thread.join();
        let _ = std::fs::remove_file(socket_path);
        return Err(ApiServerError::Seccomp(e));
    }
    Ok(ApiServerHandle {
        request_event,
        requests,
        shutdown,
        thread: Some(thread),
        metrics,
        socket_path: socket_path.to_path_buf(),
        socket_id,
    })
}

/// Requests answered but not yet written, per connection, past which the
/// server stops reading that connection (a client that pipelines without
/// reading answers).
const MAX_PIPELINED: usize = 32;

/// Output bytes buffered per connection past which reading stops.
const MAX_OUTPUT: usize = 256 * 1024;

/// Bytes read from one connection per wake-up, so one fast client cannot
/// starve the others.
const READ_BUDGET: usize = 64 * 1024;

enum Slot {
    Ready {
        bytes: Vec<u8>,
        close: bool,
    },
    Waiting {
        id: u64,
        close: bool,
        method: String,
        path: String,
        /// The request used a deprecated field: the answer says so.
        deprecated: bool,
    },
}

struct Connection {
    stream: UnixStream,
    decoder: RequestDecoder,
    /// Answers in request order.
    slots: VecDeque<Slot>,
    out: Vec<u8>,
    /// Write what is in `out`, then close.
    closing: bool,
    /// The client sent EOF (it may still read answers).
    peer_closed: bool,
    /// The socket failed: drop the connection.
    dead: bool,
    /// A request took too long to arrive: nothing more is read.
    timed_out: bool,
    /// When the request being received started arriving.
    partial_since: Option<Instant>,
    last_active: Instant,
}

impl Connection {
    fn new(stream: UnixStream, max_payload: usize) -> Self {
        Connection {
            stream,
            decoder: RequestDecoder::new(max_payload),
            slots: VecDeque::new(),
            out: Vec::new(),
            closing: false,
            peer_closed: false,
            dead: false,
            timed_out: false,
            partial_since: None,
            last_active: Instant::now(),
        }
    }

    fn wants_read(&self) -> bool {
        !self.peer_closed
            && !self.closing
            && !self.dead
            && !self.timed_out
            && !self.decoder.is_broken()
            && self.slots.len() < MAX_PIPELINED
            && self.out.len() < MAX_OUTPUT
    }

    fn is_idle(&self) -> bool {
        self.slots.is_empty() && self.out.is_empty() && !self.decoder.in_request()
    }

    fn is_done(&self) -> bool {
        self.dead
            || (self.out.is_empty()
                && (self.closing || (self.peer_closed && self.slots.is_empty())))
    }

    /// Moves answers that are ready, in order, to the output buffer.
    fn collect_output(&mut self) {
        while let Some(Slot::Ready { .. }) = self.slots.front() {
            let Some(Slot::Ready { bytes, close }) = self.slots.pop_front() else {
                break;
            };
            self.out.extend_from_slice(&bytes);
            if close {
                self.closing = true;
                self.slots.clear();
                break;
            }
        }
    }

    /// Writes as much output as the socket takes.
    fn write_output(&mut self) {
        while !self.out.is_empty() && !self.dead {
            // SAFETY: sends from a live buffer of the given length on a
            // socket we own; MSG_NOSIGNAL turns a vanished client into EPIPE
            // instead of a SIGPIPE for the whole process.
            let n = unsafe {
                libc::send(
                    self.stream.as_raw_fd(),
                    self.out.as_ptr().cast(),
                    self.out.len(),
                    libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
                )
            };
            if n >= 0 {
                self.out.drain(..n as usize);
                self.last_active = Instant::now();
                continue;
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => break,
                _ => {
                    log::debug!("API client went away while being answered: {e}");
                    self.dead = true;
                }
            }
        }
    }
}

/// The parts of the server a connection needs while its requests are
/// dispatched.
struct Dispatch {
    to_vmm: Sender<(VmmAction, Responder)>,
    request_event: EventFd,
    responses_tx: Sender<(u64, VmmResponse)>,
    wake: Arc<EventFd>,
    next_id: u64,
    options: ServerOptions,
}

fn encode_error(error: &ApiError, path: &str, close: bool) -> Vec<u8> {
    let allow = if error.status == 405 {
        allowed_methods(path)
    } else {
        None
    };
    error_to_http(error).encode(allow, close)
}

impl Dispatch {
    fn request(&mut self, req: HttpRequest) -> Slot {
        let close = !req.keep_alive;
        let counters = request_counters(&self.options.metrics, &req.method, &req.path);
        if let Some((count, _)) = counters {
            count.inc();
        }
        let action =
            match parse_request(&req.method, &req.path, &req.body, self.options.max_payload) {
                Ok(action) => action,
                Err(e) => {
                    if let Some((_, Some(fails))) = counters {
                        fails.inc();
                    }
                    log::warn!(
                        "API request {} {} refused: {} {}",
                        req.method,
                        req.path,
                        e.status,
                        e.message
                    );
                    return Slot::Ready {
                        bytes: encode_error(&e, &req.path, close),
                        close,
                    };
                }
            };
        log::info!("API request: {} {}", req.method, req.path);
        let deprecated = match deprecation(&action) {
            Some(message) => {
                // Firecracker warns as it answers, once per request.
                log::warn!("{message}");
                self.options
                    .metrics
                    .deprecated
                    .deprecated_http_api_calls
                    .inc();
                true
            }
            None => false,
        };
        self.next_id = self.next_id.wrapping_add(1);
        let id = self.next_id;
        let responder = Responder {
            id,
            tx: self.responses_tx.clone(),
            wake: self.wake.clone(),
            answered: false,
        };
        if let Err(mpsc::SendError((_, mut responder))) = self.to_vmm.send((action, responder)) {
            // The VMM thread has gone; answer here instead.
            responder.answered = true;
            let e = ApiError::internal("The VMM is not running: the request was not carried out.");
            return Slot::Ready {
                bytes: encode_error(&e, &req.path, close),
                close,
            };
        }
        if let Err(e) = self.request_event.write(1) {
            log::error!("cannot signal the API request event: {e}");
        }
        Slot::Waiting {
            id,
            close,
            method: req.method,
            path: req.path,
            deprecated,
        }
    }

    /// Turns buffered bytes into answers or requests for the VMM, as long
    /// as the connection may take more.
    fn pump(&mut self, c: &mut Connection) {
        if c.timed_out {
            return;
        }
        while c.slots.len() < MAX_PIPELINED && !c.closing && !c.dead {
            let Some(item) = c.decoder.decode() else {
                break;
            };
            let slot = match item {
                Decoded::Request(req) => self.request(req),
                Decoded::Continue => Slot::Ready {
                    bytes: CONTINUE.to_vec(),
                    close: false,
                },
                Decoded::Reject { error, close } => {
                    log::warn!("API request refused: {} {}", error.status, error.message);
                    Slot::Ready {
                        bytes: encode_error(&error, "", close),
                        close,
                    }
                }
            };
            c.slots.push_back(slot);
        }
        if c.decoder.in_request() {
            c.partial_since.get_or_insert_with(Instant::now);
        } else {
            c.partial_since = None;
        }
    }

    fn read(&mut self, c: &mut Connection) {
        let mut budget = READ_BUDGET;
        let mut buf = [0u8; 4096];
        while budget > 0 && c.wants_read() {
            match c.stream.read(&mut buf) {
                Ok(0) => {
                    c.peer_closed = true;
                    if c.decoder.in_request() {
                        log::debug!("API client closed the connection in the middle of a request");
                    }
                    break;
                }
                Ok(n) => {
                    budget = budget.saturating_sub(n);
                    c.last_active = Instant::now();
                    c.decoder.feed(buf.get(..n).unwrap_or_default());
                    self.pump(c);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    log::debug!("API connection read failed: {e}");
                    c.dead = true;
                }
            }
        }
    }
}

struct Server {
    listener: UnixListener,
    shutdown: EventFd,
    responses_rx: Receiver<(u64, VmmResponse)>,
    conns: Vec<Connection>,
    dispatch: Dispatch,
}

fn pollfd(fd: RawFd, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

const READABLE: libc::c_short = libc::POLLIN | libc::POLLHUP | libc::POLLERR;

impl Server {
    fn run(mut self) {
        log::info!("API server started.");
        loop {
            let mut fds = vec![
                pollfd(self.shutdown.as_raw_fd(), libc::POLLIN),
                pollfd(self.dispatch.wake.as_raw_fd(), libc::POLLIN),
                pollfd(self.listener.as_raw_fd(), libc::POLLIN),
            ];
            for c in &self.conns {
                let mut events = 0;
                if c.wants_read() {
                    events |= libc::POLLIN;
                }
                if !c.out.is_empty() {
                    events |= libc::POLLOUT;
                }
                // poll(2) reports a hang-up even for an empty event set; a
                // negative fd is skipped, so a client that has left while
                // the VMM works on its request does not make this loop spin.
                let fd = if events == 0 {
                    -1
                } else {
                    c.stream.as_raw_fd()
                };
                fds.push(pollfd(fd, events));
            }
            let timeout = self.poll_timeout_ms();
            // SAFETY: `fds` is a live array of `fds.len()` pollfd structs.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    log::error!("API server poll failed: {e}");
                    std::thread::sleep(Duration::from_millis(10));
                }
                continue;
            }
            if fds[0].revents != 0 {
                log::debug!("API server stopping.");
                return;
            }
            if fds[1].revents != 0 {
                let _ = self.dispatch.wake.read();
            }
            self.take_responses();
            for (c, fd) in self.conns.iter_mut().zip(&fds[3..]) {
                if fd.revents & READABLE != 0 {
                    self.dispatch.read(c);
                }
            }
            for c in &mut self.conns {
                // Answers may have freed room for requests already buffered.
                self.dispatch.pump(c);
                c.collect_output();
                c.write_output();
            }
            self.expire(Instant::now());
            self.conns.retain(|c| !c.is_done());
            if fds[2].revents != 0 {
                self.accept();
            }
        }
    }

    fn poll_timeout_ms(&self) -> libc::c_int {
        let now = Instant::now();
        let timeout = self.dispatch.options.request_timeout;
        self.conns
            .iter()
            .filter_map(|c| c.partial_since)
            .map(|since| (since + timeout).saturating_duration_since(now))
            .min()
            // Round up so the deadline has passed when poll returns.
            .map(|d| libc::c_int::try_from(d.as_millis() + 1).unwrap_or(libc::c_int::MAX))
            .unwrap_or(-1)
    }

    fn take_responses(&mut self) {
        loop {
            let (id, response) = match self.responses_rx.try_recv() {
                Ok(r) => r,
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => return,
            };
            let slot = self.conns.iter_mut().find_map(|c| {
                c.slots
                    .iter_mut()
                    .find(|s| matches!(s, Slot::Waiting { id: i, .. } if *i == id))
            });
            // The client may have gone: its answer is dropped.
            let Some(slot) = slot else { continue };
            let Slot::Waiting {
                close,
                method,
                path,
                deprecated,
                ..
            } = slot
            else {
                continue;
            };
            if let Err(e) = &response {
                if let Some((_, Some(fails))) =
                    request_counters(&self.dispatch.options.metrics, method, path)
                {
                    fails.inc();
                }
                log::warn!(
                    "API request {method} {path} failed: {} {}",
                    e.status,
                    e.message
                );
            }
            let mut answer = match &response {
                Err(e) => {
                    let allow = if e.status == 405 {
                        allowed_methods(path)
                    } else {
                        None
                    };
                    (error_to_http(e), allow)
                }
                Ok(_) => (response_to_http(&response), None),
            };
            answer.0.deprecated = *deprecated;
            let bytes = answer.0.encode(answer.1, *close);
            *slot = Slot::Ready {
                bytes,
                close: *close,
            };
        }
    }

    fn accept(&mut self) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    log::warn!("API server cannot accept a connection: {e}");
                    return;
                }
            };
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            if self.conns.len() >= self.dispatch.options.max_connections {
                self.reap();
            }
            if self.conns.len() >= self.dispatch.options.max_connections {
                let now = Instant::now();
                let idle = self
                    .conns
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| {
                        c.is_idle()
                            && now.saturating_duration_since(c.last_active) >= IDLE_EVICTION_GRACE
                    })
                    .min_by_key(|(_, c)| c.last_active)
                    .map(|(i, _)| i);
                match idle {
                    Some(i) => {
                        self.conns.swap_remove(i);
                    }
                    None => {
                        let e = ApiError::new(503, "Too many open connections");
                        let mut c = Connection::new(stream, 0);
                        c.out = error_to_http(&e).encode(None, true);
                        c.write_output();
                        continue;
                    }
                }
            }
            self.conns
                .push(Connection::new(stream, self.dispatch.options.max_payload));
        }
    }

    /// Reads what the idle connections hold, so that clients that have
    /// left since the last poll (their end of file not read yet) no longer
    /// count against the connection cap, and drops the finished ones.
    fn reap(&mut self) {
        for c in &mut self.conns {
            if c.is_idle() {
                self.dispatch.read(c);
                c.collect_output();
                c.write_output();
            }
        }
        self.conns.retain(|c| !c.is_done());
    }

    fn expire(&mut self, now: Instant) {
        let timeout = self.dispatch.options.request_timeout;
        for c in &mut self.conns {
            let Some(since) = c.partial_since else {
                continue;
            };
            if now.saturating_duration_since(since) < timeout {
                continue;
            }
            let e = ApiError::new(
                408,
                format!(
                    "Request timeout: the request did not arrive within {} ms.",
                    timeout.as_millis()
                ),
            );
            c.partial_since = None;
            c.timed_out = true;
            c.slots.push_back(Slot::Ready {
                bytes: error_to_http(&e).encode(None, true),
                close: true,
            });
            c.collect_output();
            c.write_output();
        }
    }
}
