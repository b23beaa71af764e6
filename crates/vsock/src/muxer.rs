// SPDX-License-Identifier: Apache-2.0

//! The Unix-socket backend: Firecracker's hybrid vsock multiplexer.
//!
//! - Host-initiated connections: a host process connects to the listening
//!   socket at `uds_path` and writes `CONNECT <port>\n`; the muxer allocates
//!   a local port (from 2^30 up, wrapping below 2^31, as Firecracker) and
//!   sends the guest a REQUEST. When the guest answers RESPONSE the host
//!   reads `OK <local port>\n` and bytes flow; an RST, or no answer within
//!   the request timeout, closes the host socket.
//! - Guest-initiated connections: a REQUEST to the host CID and port P
//!   connects to the Unix socket `<uds_path>_P` (without blocking); success
//!   answers RESPONSE, failure RST.
//!
//! Connections are keyed by (local port, guest port). The muxer owns every
//! host socket and keeps the set of file descriptors the event loop must
//! watch, and for which events; [`Muxer::sync`] applies the changes to the
//! event manager. A socket leaves that set before it is closed, so the event
//! manager never holds a stale descriptor.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::ffi::OsString;
use std::io::{self, Read};
use std::mem::offset_of;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use event_manager::{EventOps, Events};
use log::{debug, info, warn};
use vmm_sys_util::epoll::EventSet;

use crate::connection::{ConnState, Connection, Timeouts};
use crate::metrics::{inc, VsockMetrics};
use crate::packet::{
    RxBuffer, TxPacket, VsockHeader, OP_CREDIT_REQUEST, OP_REQUEST, OP_RST, TYPE_STREAM,
};
use crate::{FIRST_LOCAL_PORT, HOST_CID, MAX_CONNECTIONS};

/// Event data of the listening socket.
pub(crate) const DATA_LISTENER: u32 = 0x10;
/// Event data of an accepted host socket still waiting for `CONNECT`.
pub(crate) const DATA_HOST_PENDING: u32 = 0x11;
/// Event data of a connection's host socket.
pub(crate) const DATA_CONNECTION: u32 = 0x12;

/// RST packets for packets without a connection that may wait for RX
/// buffers (Firecracker's MUXER_RXQ_SIZE); when full, the device stops
/// taking TX packets until the guest posts RX buffers.
pub(crate) const MAX_QUEUED_RSTS: usize = 256;
/// Longest `CONNECT <port>\n` line a host may send.
const MAX_CONNECT_LINE: usize = 32;

/// Identifies a connection: (host-side port, guest-side port).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct ConnKey {
    pub(crate) local_port: u32,
    pub(crate) peer_port: u32,
}

/// Something owed to the guest, waiting for an RX buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RxItem {
    /// Whatever the connection has pending.
    Conn(ConnKey),
    /// An RST for a packet that had no connection.
    Rst(ConnKey),
}

/// An accepted host socket, reading its `CONNECT <port>\n` line.
#[derive(Debug)]
struct HostPending {
    stream: UnixStream,
    line: Vec<u8>,
}

/// A connection and the muxer's bookkeeping for it.
#[derive(Debug)]
struct Entry {
    conn: Connection,
    /// In `rxq`.
    queued: bool,
    /// The local port came from the allocator (host-initiated).
    allocated_port: bool,
}

/// The connection multiplexer.
#[derive(Debug)]
pub(crate) struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    conns: HashMap<ConnKey, Entry>,
    fd_keys: HashMap<RawFd, ConnKey>,
    host_pending: HashMap<RawFd, HostPending>,
    rxq: VecDeque<RxItem>,
    queued_rsts: usize,
    /// Connections with an expiry, by deadline.
    killq: BTreeSet<(Instant, ConnKey)>,
    local_ports: HashSet<u32>,
    last_local_port: u32,
    /// What the event manager watches: fd -> (event data, events).
    registered: HashMap<RawFd, (u32, EventSet)>,
    /// Descriptors whose watched events may have to change.
    dirty: Vec<RawFd>,
    /// Sockets to close once the event manager stopped watching them.
    closing: Vec<OwnedFd>,
    metrics: Arc<VsockMetrics>,
    pub(crate) timeouts: Timeouts,
}

impl Muxer {
    pub(crate) fn new(
        guest_cid: u64,
        uds_path: PathBuf,
        listener: UnixListener,
        metrics: Arc<VsockMetrics>,
    ) -> Self {
        Muxer {
            guest_cid,
            uds_path,
            listener,
            conns: HashMap::new(),
            fd_keys: HashMap::new(),
            host_pending: HashMap::new(),
            rxq: VecDeque::new(),
            queued_rsts: 0,
            killq: BTreeSet::new(),
            local_ports: HashSet::new(),
            last_local_port: FIRST_LOCAL_PORT - 1,
            registered: HashMap::new(),
            dirty: Vec::new(),
            closing: Vec::new(),
            metrics,
            timeouts: Timeouts::default(),
        }
    }

    pub(crate) fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Bytes of guest data waiting for the host socket of a connection.
    #[cfg(test)]
    pub(crate) fn buffered(&self, local_port: u32, peer_port: u32) -> Option<usize> {
        self.conns
            .get(&ConnKey {
                local_port,
                peer_port,
            })
            .map(|e| e.conn.buffered())
    }

    pub(crate) fn has_pending_rx(&self) -> bool {
        !self.rxq.is_empty()
    }

    /// Whether a TX packet can be taken: it may need an RST queued.
    pub(crate) fn can_take_tx(&self) -> bool {
        self.queued_rsts < MAX_QUEUED_RSTS
    }

    /// The earliest connection deadline.
    pub(crate) fn next_expiry(&self) -> Option<Instant> {
        self.killq.first().map(|(t, _)| *t)
    }

    /// Runs `f` on the connection `key`, then updates the muxer's view of
    /// it: the host acknowledgement when it became established, the RX
    /// queue, the kill queue and the watched events.
    fn with_conn(&mut self, key: ConnKey, f: impl FnOnce(&mut Connection)) {
        let Some(entry) = self.conns.get_mut(&key) else {
            return;
        };
        let prev_state = entry.conn.state();
        let prev_expiry = entry.conn.expiry();
        f(&mut entry.conn);
        if prev_state == ConnState::LocalInit && entry.conn.state() == ConnState::Established {
            entry.conn.send_ok();
        }
        if entry.conn.has_pending_rx() && !entry.queued {
            entry.queued = true;
            self.rxq.push_back(RxItem::Conn(key));
        }
        let expiry = entry.conn.expiry();
        if expiry != prev_expiry {
            if let Some(t) = prev_expiry {
                self.killq.remove(&(t, key));
            }
            if let Some(t) = expiry {
                self.killq.insert((t, key));
            }
        }
        self.dirty.push(entry.conn.as_raw_fd());
    }

    fn add_connection(&mut self, key: ConnKey, conn: Connection, allocated_port: bool) {
        let fd = conn.as_raw_fd();
        self.fd_keys.insert(fd, key);
        self.conns.insert(
            key,
            Entry {
                conn,
                queued: false,
                allocated_port,
            },
        );
        inc(&self.metrics.conns_added);
        self.with_conn(key, |_| {});
    }

    fn remove_connection(&mut self, key: ConnKey) {
        let Some(entry) = self.conns.remove(&key) else {
            return;
        };
        let fd = entry.conn.as_raw_fd();
        self.fd_keys.remove(&fd);
        if let Some(t) = entry.conn.expiry() {
            self.killq.remove(&(t, key));
        }
        if entry.allocated_port {
            self.local_ports.remove(&key.local_port);
        }
        if entry.queued {
            self.rxq.retain(|item| *item != RxItem::Conn(key));
        }
        self.closing.push(OwnedFd::from(entry.conn.into_stream()));
        inc(&self.metrics.conns_removed);
    }

    fn kill_connection(&mut self, key: ConnKey) {
        self.with_conn(key, Connection::kill);
    }

    fn enqueue_rst(&mut self, local_port: u32, peer_port: u32) {
        if self.queued_rsts >= MAX_QUEUED_RSTS {
            // can_take_tx() keeps TX processing from getting here.
            warn!("vsock: RST queue full; dropping RST for lp={local_port}, pp={peer_port}");
            return;
        }
        self.queued_rsts += 1;
        self.rxq.push_back(RxItem::Rst(ConnKey {
            local_port,
            peer_port,
        }));
    }

    /// Fills `buf` with the next packet owed to the guest; returns its
    /// header (already written to `buf` by the caller), or `None`.
    pub(crate) fn recv_pkt(&mut self, buf: &RxBuffer<'_>, now: Instant) -> Option<VsockHeader> {
        while let Some(item) = self.rxq.pop_front() {
            match item {
                RxItem::Rst(key) => {
                    self.queued_rsts = self.queued_rsts.saturating_sub(1);
                    inc(&self.metrics.rx_packets_count);
                    return Some(VsockHeader {
                        src_cid: HOST_CID,
                        dst_cid: self.guest_cid,
                        src_port: key.local_port,
                        dst_port: key.peer_port,
                        type_: TYPE_STREAM,
                        op: OP_RST,
                        ..Default::default()
                    });
                }
                RxItem::Conn(key) => {
                    let mut hdr = None;
                    if let Some(entry) = self.conns.get_mut(&key) {
                        entry.queued = false;
                    }
                    self.with_conn(key, |conn| hdr = conn.recv_pkt(buf, now));
                    let Some(hdr) = hdr else {
                        continue;
                    };
                    // A connection with more to say went to the back of the
                    // queue (round robin); one that sent RST is gone.
                    if hdr.op == OP_RST {
                        self.remove_connection(key);
                    }
                    return Some(hdr);
                }
            }
        }
        None
    }

    /// Takes one well-formed packet from the guest.
    pub(crate) fn send_pkt(&mut self, pkt: &TxPacket<'_>) {
        let hdr = *pkt.header();
        if hdr.src_cid != self.guest_cid {
            // Never answer a forged source.
            inc(&self.metrics.tx_dropped_packets);
            info!(
                "vsock: dropping a packet from CID {} (the guest is CID {})",
                hdr.src_cid, self.guest_cid
            );
            return;
        }
        inc(&self.metrics.tx_packets_count);
        if hdr.type_ != TYPE_STREAM {
            // virtio 1.2 §5.10.6.4: unknown socket types are answered RST.
            self.enqueue_rst(hdr.dst_port, hdr.src_port);
            return;
        }
        if hdr.dst_cid != HOST_CID {
            inc(&self.metrics.tx_dropped_packets);
            info!("vsock: dropping a packet for unknown CID {}", hdr.dst_cid);
            return;
        }
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        let known_op = (OP_REQUEST..=OP_CREDIT_REQUEST).contains(&hdr.op);
        if !self.conns.contains_key(&key) {
            match hdr.op {
                OP_REQUEST => self.connect_to_host(&hdr),
                // Never answer an RST with an RST.
                OP_RST => {}
                _ => self.enqueue_rst(hdr.dst_port, hdr.src_port),
            }
            return;
        }
        if hdr.op == OP_RST {
            self.remove_connection(key);
        } else if !known_op {
            info!(
                "vsock: unknown op {} on lp={}, pp={}; resetting the connection",
                hdr.op, key.local_port, key.peer_port
            );
            self.kill_connection(key);
        } else {
            self.with_conn(key, |conn| conn.send_pkt(pkt));
        }
    }

    /// A guest REQUEST: connect to `<uds_path>_<port>`.
    fn connect_to_host(&mut self, hdr: &VsockHeader) {
        if self.conns.len() + self.host_pending.len() >= MAX_CONNECTIONS {
            info!("vsock: connection limit ({MAX_CONNECTIONS}) reached; refusing a guest request");
            self.enqueue_rst(hdr.dst_port, hdr.src_port);
            return;
        }
        let mut path = OsString::from(self.uds_path.as_os_str());
        path.push(format!("_{}", hdr.dst_port));
        let path = PathBuf::from(path);
        match connect_nonblocking(&path) {
            Ok(stream) => {
                let key = ConnKey {
                    local_port: hdr.dst_port,
                    peer_port: hdr.src_port,
                };
                let conn = Connection::new_peer_init(
                    stream,
                    self.guest_cid,
                    hdr,
                    self.metrics.clone(),
                    self.timeouts,
                );
                self.add_connection(key, conn, false);
            }
            Err(e) => {
                debug!("vsock: guest connection to {} refused: {e}", path.display());
                self.enqueue_rst(hdr.dst_port, hdr.src_port);
            }
        }
    }

    /// The listening socket is readable: accept the host connections.
    pub(crate) fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.conns.len() + self.host_pending.len() >= MAX_CONNECTIONS {
                        warn!("vsock: connection limit ({MAX_CONNECTIONS}) reached; refusing a host connection");
                        continue;
                    }
                    if let Err(e) = stream.set_nonblocking(true) {
                        inc(&self.metrics.muxer_event_fails);
                        warn!("vsock: cannot make an accepted host socket non-blocking: {e}");
                        continue;
                    }
                    let fd = stream.as_raw_fd();
                    self.host_pending.insert(
                        fd,
                        HostPending {
                            stream,
                            line: Vec::new(),
                        },
                    );
                    self.dirty.push(fd);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    inc(&self.metrics.muxer_event_fails);
                    warn!("vsock: cannot accept a host connection: {e}");
                    break;
                }
            }
        }
    }

    /// An accepted host socket is readable: read its `CONNECT <port>\n`.
    pub(crate) fn read_connect(&mut self, fd: RawFd) {
        let Some(pending) = self.host_pending.get_mut(&fd) else {
            inc(&self.metrics.muxer_event_fails);
            return;
        };
        // One byte at a time: whatever the host sends after the newline
        // belongs to the connection.
        let outcome = loop {
            if pending.line.len() >= MAX_CONNECT_LINE {
                break Err("no newline in the first 32 bytes");
            }
            let mut byte = [0u8];
            match pending.stream.read(&mut byte) {
                Ok(0) => break Err("closed before a complete CONNECT line"),
                Ok(_) => {
                    pending.line.push(byte[0]);
                    if byte[0] == b'\n' {
                        break parse_connect(&pending.line).ok_or("not CONNECT <port>");
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break Err("read error"),
            }
        };
        let Some(pending) = self.host_pending.remove(&fd) else {
            return;
        };
        let peer_port = match outcome {
            Ok(port) if self.conns.len() < MAX_CONNECTIONS => port,
            Ok(_) => {
                warn!("vsock: connection limit ({MAX_CONNECTIONS}) reached; closing a host connection");
                self.closing.push(OwnedFd::from(pending.stream));
                return;
            }
            Err(why) => {
                info!(
                    "vsock: closing a host connection: {why} ({:?})",
                    String::from_utf8_lossy(&pending.line)
                );
                self.closing.push(OwnedFd::from(pending.stream));
                return;
            }
        };
        let local_port = self.allocate_local_port();
        let conn = Connection::new_local_init(
            pending.stream,
            self.guest_cid,
            local_port,
            peer_port,
            self.metrics.clone(),
            self.timeouts,
        );
        self.add_connection(
            ConnKey {
                local_port,
                peer_port,
            },
            conn,
            true,
        );
    }

    /// Firecracker's allocator: round robin over [2^30, 2^31).
    fn allocate_local_port(&mut self) -> u32 {
        // At most MAX_CONNECTIONS ports are in use, so this ends.
        loop {
            self.last_local_port = ((self.last_local_port + 1) & !(1 << 31)) | (1 << 30);
            if self.local_ports.insert(self.last_local_port) {
                return self.last_local_port;
            }
        }
    }

    /// A connection's host socket is ready.
    pub(crate) fn conn_event(&mut self, fd: RawFd, events: EventSet) {
        let Some(&key) = self.fd_keys.get(&fd) else {
            inc(&self.metrics.muxer_event_fails);
            return;
        };
        self.with_conn(key, |conn| conn.notify(events));
    }

    /// Resets every connection whose deadline passed.
    pub(crate) fn sweep_killq(&mut self, now: Instant) {
        while let Some(&(t, key)) = self.killq.first() {
            if t > now {
                break;
            }
            self.killq.remove(&(t, key));
            debug!(
                "vsock: lp={}, pp={} timed out; resetting",
                key.local_port, key.peer_port
            );
            self.with_conn(key, |conn| {
                conn.kill();
            });
        }
    }

    /// Drops every connection and accepted host socket (device reset or
    /// transport reset): their host sockets close at the next
    /// [`sync`](Self::sync). The listening socket stays.
    pub(crate) fn teardown(&mut self) {
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for key in keys {
            inc(&self.metrics.conns_killed);
            self.remove_connection(key);
        }
        for (_, pending) in self.host_pending.drain() {
            self.closing.push(OwnedFd::from(pending.stream));
        }
        self.rxq.clear();
        self.queued_rsts = 0;
        self.killq.clear();
        self.local_ports.clear();
    }

    /// Applies the changes of watched events to the event manager, and
    /// closes the sockets that were waiting for it. The listening socket is
    /// watched only while `listen` (the device is running).
    pub(crate) fn sync(&mut self, ops: &mut EventOps, listen: bool) {
        let lfd = self.listener.as_raw_fd();
        let want = listen.then_some((DATA_LISTENER, EventSet::IN));
        self.apply(ops, lfd, want);
        for fd in std::mem::take(&mut self.closing) {
            self.apply(ops, fd.as_raw_fd(), None);
            drop(fd);
        }
        let mut dirty = std::mem::take(&mut self.dirty);
        dirty.sort_unstable();
        dirty.dedup();
        for fd in dirty {
            let want = if let Some(key) = self.fd_keys.get(&fd) {
                self.conns
                    .get(key)
                    .map(|e| e.conn.polled_events())
                    .filter(|ev| !ev.is_empty())
                    .map(|ev| (DATA_CONNECTION, ev))
            } else if self.host_pending.contains_key(&fd) {
                Some((DATA_HOST_PENDING, EventSet::IN))
            } else {
                None
            };
            if !self.apply(ops, fd, want) {
                if let Some(&key) = self.fd_keys.get(&fd) {
                    // Unwatchable: reset it rather than let it hang. Its
                    // events become empty, applied at the next sync.
                    self.kill_connection(key);
                }
            }
        }
    }

    /// Makes the event manager watch `fd` for `want` (or not at all).
    /// Returns false if that failed.
    fn apply(&mut self, ops: &mut EventOps, fd: RawFd, want: Option<(u32, EventSet)>) -> bool {
        let current = self.registered.get(&fd).copied();
        if current == want {
            return true;
        }
        let result = match (current, want) {
            (None, Some((data, events))) => ops.add(Events::with_data_raw(fd, data, events)),
            (Some(_), Some((data, events))) => ops.modify(Events::with_data_raw(fd, data, events)),
            (Some((data, events)), None) => ops.remove(Events::with_data_raw(fd, data, events)),
            (None, None) => Ok(()),
        };
        match result {
            Ok(()) => {
                match want {
                    Some(w) => self.registered.insert(fd, w),
                    None => self.registered.remove(&fd),
                };
                true
            }
            Err(e) => {
                inc(&self.metrics.muxer_event_fails);
                warn!("vsock: cannot change the events watched for fd {fd}: {e:?}");
                if want.is_none() {
                    // The descriptor is about to close, which removes it
                    // from epoll anyway.
                    self.registered.remove(&fd);
                }
                false
            }
        }
    }
}

/// Parses Firecracker's host command `CONNECT <port>\n` (the keyword in any
/// case).
fn parse_connect(line: &[u8]) -> Option<u32> {
    let line = std::str::from_utf8(line).ok()?;
    let mut words = line.split_whitespace();
    if !words.next()?.eq_ignore_ascii_case("connect") {
        return None;
    }
    words.next()?.parse().ok()
}

/// Connects a Unix stream socket to `path` without blocking: a listener
/// whose backlog is full refuses (EAGAIN) instead of stalling the event
/// loop.
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    // SAFETY: sockaddr_un is plain old data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    let bytes = path.as_os_str().as_bytes();
    // Room for the terminating NUL.
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path longer than sun_path",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: a plain system call with constant arguments; the result is
    // checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor nothing else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = offset_of!(libc::sockaddr_un, sun_path) + bytes.len() + 1;
    loop {
        // SAFETY: `addr` is a valid sockaddr_un and `len` is within its size.
        let ret = unsafe {
            libc::connect(
                owned.as_raw_fd(),
                std::ptr::addr_of!(addr).cast::<libc::sockaddr>(),
                len as libc::socklen_t,
            )
        };
        if ret == 0 {
            return Ok(UnixStream::from(owned));
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_command() {
        assert_eq!(parse_connect(b"CONNECT 52\n"), Some(52));
        assert_eq!(parse_connect(b"connect 4294967295\n"), Some(u32::MAX));
        assert_eq!(parse_connect(b"CONNECT\n"), None);
        assert_eq!(parse_connect(b"CONNECT 4294967296\n"), None);
        assert_eq!(parse_connect(b"LISTEN 52\n"), None);
        assert_eq!(parse_connect(b"\xff 52\n"), None);
    }

    #[test]
    fn nonblocking_connect_errors() {
        let dir = tempfile::tempdir().unwrap();
        let err = connect_nonblocking(&dir.path().join("nobody")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        let long = PathBuf::from("/".repeat(200));
        let err = connect_nonblocking(&long).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        let path = dir.path().join("sock");
        let listener = UnixListener::bind(&path).unwrap();
        let stream = connect_nonblocking(&path).unwrap();
        let (_, _) = listener.accept().unwrap();
        drop(stream);
    }

    #[test]
    fn local_ports_follow_firecracker() {
        let dir = tempfile::tempdir().unwrap();
        let listener = UnixListener::bind(dir.path().join("v.sock")).unwrap();
        let mut muxer = Muxer::new(3, dir.path().join("v.sock"), listener, Arc::default());
        assert_eq!(muxer.allocate_local_port(), 1 << 30);
        assert_eq!(muxer.allocate_local_port(), (1 << 30) + 1);
        muxer.last_local_port = u32::MAX >> 1;
        // Wraps to 2^30, which is taken, so the next one.
        assert_eq!(muxer.allocate_local_port(), (1 << 30) + 2);
    }
}
