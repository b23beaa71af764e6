// SPDX-License-Identifier: Apache-2.0

//! One vsock stream connection between a guest AF_VSOCK socket and a host
//! Unix stream socket: the connection state machine, credit-based flow
//! control, and the relaying of bytes (virtio 1.2 §5.10.6.3 - §5.10.6.6).
//!
//! Flow control, both ways, as Firecracker does it:
//! - Guest to host: the device advertises `buf_alloc` = [`CONN_TX_BUF_SIZE`]
//!   and counts in `fwd_cnt` only the bytes written to the host socket. Bytes
//!   the socket does not take wait in a [`TxBuf`] of that size, so the
//!   guest's credit (`buf_alloc - (sent - fwd_cnt)`) is exactly the free
//!   space left in it: a full buffer stops the guest, a guest that sends
//!   beyond its credit is reset.
//! - Host to guest: the device never sends more than the guest's free credit
//!   (`peer_buf_alloc - (rx_cnt - peer_fwd_cnt)`); at zero it asks for a
//!   credit update and stops polling the host socket, so unsent bytes stay in
//!   the socket and the host writer blocks.
//!
//! [`CONN_TX_BUF_SIZE`]: crate::CONN_TX_BUF_SIZE

use std::io;
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, warn};
use vmm_sys_util::epoll::EventSet;

use crate::metrics::{add, inc, VsockMetrics};
use crate::packet::{
    read_into, send_bytes, send_from, RxBuffer, TxPacket, VsockHeader, OP_CREDIT_REQUEST,
    OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW, OP_SHUTDOWN, SHUTDOWN_RCV,
    SHUTDOWN_SEND, TYPE_STREAM,
};
use crate::txbuf::TxBuf;
use crate::{CONN_CREDIT_UPDATE_THRESHOLD, CONN_TX_BUF_SIZE, HOST_CID};

/// How long the device waits for the guest, as Firecracker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Timeouts {
    /// For a RESPONSE (or RST) to a host-initiated REQUEST.
    pub(crate) request: Duration,
    /// For the guest's RST after a shutdown, before the device resets the
    /// connection itself.
    pub(crate) shutdown: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        // Firecracker's CONN_REQUEST_TIMEOUT_MS and CONN_SHUTDOWN_TIMEOUT_MS.
        Timeouts {
            request: Duration::from_millis(2000),
            shutdown: Duration::from_millis(2000),
        }
    }
}

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ConnState {
    /// Host-initiated, waiting for the guest's RESPONSE.
    LocalInit,
    /// Guest-initiated, the host socket connected, RESPONSE not sent yet.
    PeerInit,
    /// Handshake done: data flows both ways.
    Established,
    /// The host shut down only its write side: the guest was told
    /// SHUTDOWN(SEND) and may still send; the host closing its socket ends
    /// the connection.
    LocalHalfClosed,
    /// The host socket reached end of stream; the guest was asked to shut
    /// down.
    LocalClosed,
    /// The guest sent SHUTDOWN: it will receive no more (`no_recv`) and/or
    /// send no more (`no_send`). Flags accumulate (virtio 1.2 §5.10.6.6).
    PeerClosed { no_recv: bool, no_send: bool },
    /// Reset by the device: an RST is due, then the connection goes.
    Killed,
}

/// Packets a connection owes the guest (a bit set).
mod pending {
    pub(super) const REQUEST: u8 = 1 << 0;
    pub(super) const RESPONSE: u8 = 1 << 1;
    pub(super) const RST: u8 = 1 << 2;
    /// The host socket is readable: data (or end of stream) to deliver.
    pub(super) const RW: u8 = 1 << 3;
    pub(super) const CREDIT_UPDATE: u8 = 1 << 4;
}

/// One connection.
#[derive(Debug)]
pub(crate) struct Connection {
    state: ConnState,
    peer_cid: u64,
    local_port: u32,
    peer_port: u32,
    stream: UnixStream,
    tx_buf: TxBuf,
    /// Guest bytes written to the host socket (wrapping, virtio's fwd_cnt).
    fwd_cnt: Wrapping<u32>,
    /// The guest's receive buffer for this connection.
    peer_buf_alloc: u32,
    /// Bytes the guest has consumed of what we sent.
    peer_fwd_cnt: Wrapping<u32>,
    /// Bytes sent to the guest.
    rx_cnt: Wrapping<u32>,
    /// `fwd_cnt` as last told to the guest.
    last_fwd_cnt_to_peer: Wrapping<u32>,
    pending: u8,
    expiry: Option<Instant>,
    /// The host socket's write side was shut down after the guest's
    /// SHUTDOWN(SEND).
    write_shut: bool,
    metrics: Arc<VsockMetrics>,
    timeouts: Timeouts,
}

impl Connection {
    /// A connection the guest asked for with `request`, to the host socket
    /// `stream` (already connected). It owes the guest a RESPONSE.
    pub(crate) fn new_peer_init(
        stream: UnixStream,
        peer_cid: u64,
        request: &VsockHeader,
        metrics: Arc<VsockMetrics>,
        timeouts: Timeouts,
    ) -> Self {
        let mut conn = Self::new(
            stream,
            peer_cid,
            request.dst_port,
            request.src_port,
            ConnState::PeerInit,
            metrics,
            timeouts,
        );
        conn.peer_buf_alloc = request.buf_alloc;
        conn.peer_fwd_cnt = Wrapping(request.fwd_cnt);
        conn.pending = pending::RESPONSE;
        conn
    }

    /// A connection the host asked for on `stream`, to the guest's
    /// `peer_port`, from `local_port`. It owes the guest a REQUEST.
    pub(crate) fn new_local_init(
        stream: UnixStream,
        peer_cid: u64,
        local_port: u32,
        peer_port: u32,
        metrics: Arc<VsockMetrics>,
        timeouts: Timeouts,
    ) -> Self {
        let mut conn = Self::new(
            stream,
            peer_cid,
            local_port,
            peer_port,
            ConnState::LocalInit,
            metrics,
            timeouts,
        );
        conn.pending = pending::REQUEST;
        conn
    }

    fn new(
        stream: UnixStream,
        peer_cid: u64,
        local_port: u32,
        peer_port: u32,
        state: ConnState,
        metrics: Arc<VsockMetrics>,
        timeouts: Timeouts,
    ) -> Self {
        Connection {
            state,
            peer_cid,
            local_port,
            peer_port,
            stream,
            tx_buf: TxBuf::new(CONN_TX_BUF_SIZE as usize),
            fwd_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            rx_cnt: Wrapping(0),
            last_fwd_cnt_to_peer: Wrapping(0),
            pending: 0,
            expiry: None,
            write_shut: false,
            metrics,
            timeouts,
        }
    }

    pub(crate) fn state(&self) -> ConnState {
        self.state
    }

    pub(crate) fn expiry(&self) -> Option<Instant> {
        self.expiry
    }

    pub(crate) fn has_pending_rx(&self) -> bool {
        self.pending != 0
    }

    /// Bytes of guest data waiting for the host socket.
    #[cfg(test)]
    pub(crate) fn buffered(&self) -> usize {
        self.tx_buf.len()
    }

    pub(crate) fn into_stream(self) -> UnixStream {
        self.stream
    }

    fn take(&mut self, bit: u8) -> bool {
        let was = self.pending & bit != 0;
        self.pending &= !bit;
        was
    }

    /// Resets the connection: an RST is due to the guest, buffered guest
    /// data is dropped.
    pub(crate) fn kill(&mut self) {
        if self.state != ConnState::Killed {
            inc(&self.metrics.conns_killed);
        }
        self.state = ConnState::Killed;
        self.pending |= pending::RST;
        self.tx_buf.clear();
    }

    /// Sends the host end of a host-initiated connection its acknowledgement
    /// `OK <local_port>\n` (Firecracker's protocol); resets the connection
    /// if the socket does not take it whole.
    pub(crate) fn send_ok(&mut self) {
        let msg = format!("OK {}\n", self.local_port);
        match send_bytes(self.stream.as_raw_fd(), msg.as_bytes()) {
            Ok(n) if n == msg.len() => {}
            Ok(n) => {
                warn!(
                    "vsock: wrote {n} of {} bytes of the host acknowledgement (lp={}, pp={})",
                    msg.len(),
                    self.local_port,
                    self.peer_port
                );
                self.kill();
            }
            Err(e) => {
                warn!(
                    "vsock: cannot acknowledge the host connection (lp={}, pp={}): {e}",
                    self.local_port, self.peer_port
                );
                self.kill();
            }
        }
    }

    /// The guest's free credit: bytes we may still send it.
    fn peer_avail_credit(&self) -> u32 {
        // A driver reporting more consumed than sent is broken: treat as no
        // credit rather than as a huge one.
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Whether the guest's view of our free buffer space is low enough that
    /// it may stall without a credit update (Firecracker's rule).
    fn peer_needs_credit_update(&self) -> bool {
        let unreported = (self.fwd_cnt - self.last_fwd_cnt_to_peer).0;
        CONN_TX_BUF_SIZE.saturating_sub(unreported) < CONN_CREDIT_UPDATE_THRESHOLD
    }

    /// The header every packet of this connection starts from.
    fn header(&self, op: u16) -> VsockHeader {
        VsockHeader {
            src_cid: HOST_CID,
            dst_cid: self.peer_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: CONN_TX_BUF_SIZE,
            fwd_cnt: self.fwd_cnt.0,
        }
    }

    /// Produces the next packet this connection owes the guest, with its
    /// payload (if any) already in `buf`. `None` when it owes nothing.
    pub(crate) fn recv_pkt(&mut self, buf: &RxBuffer<'_>, now: Instant) -> Option<VsockHeader> {
        let hdr = self.next_rx(buf, now)?;
        self.rx_cnt += Wrapping(hdr.len);
        // Every header carries fwd_cnt: the guest is now up to date.
        self.last_fwd_cnt_to_peer = self.fwd_cnt;
        inc(&self.metrics.rx_packets_count);
        Some(hdr)
    }

    fn next_rx(&mut self, buf: &RxBuffer<'_>, now: Instant) -> Option<VsockHeader> {
        // A reset makes everything else moot.
        if self.take(pending::RST) {
            return Some(self.header(OP_RST));
        }
        if self.take(pending::RESPONSE) {
            self.state = ConnState::Established;
            return Some(self.header(OP_RESPONSE));
        }
        if self.take(pending::REQUEST) {
            self.expiry = Some(now + self.timeouts.request);
            return Some(self.header(OP_REQUEST));
        }
        if self.take(pending::RW) {
            if let Some(hdr) = self.read_stream(buf, now) {
                return Some(hdr);
            }
        }
        // A credit update is the least useful packet: send it only when
        // nothing else is due, since every other packet carries the credit.
        if self.take(pending::CREDIT_UPDATE) && self.pending == 0 {
            return Some(self.header(OP_CREDIT_UPDATE));
        }
        None
    }

    /// Turns readable host data into a packet: RW with the bytes, SHUTDOWN
    /// at end of stream, RST on a read error, CREDIT_REQUEST when the guest
    /// has no room. `None` when the socket had nothing after all, or the
    /// guest no longer receives.
    fn read_stream(&mut self, buf: &RxBuffer<'_>, now: Instant) -> Option<VsockHeader> {
        if self.state == ConnState::LocalHalfClosed {
            // The host closed the socket after its half-close.
            return Some(self.local_close(now));
        }
        match self.state {
            ConnState::Established | ConnState::PeerClosed { no_recv: false, .. } => {}
            // The guest will not receive any more (or the connection is
            // going away): the readiness is moot.
            _ => return None,
        }
        let credit = self.peer_avail_credit();
        if credit == 0 {
            // Polling of the host socket stops until the guest's credit
            // arrives (see polled_events).
            return Some(self.header(OP_CREDIT_REQUEST));
        }
        let max = buf.payload_capacity().min(credit as usize);
        if max == 0 {
            // A header-only RX buffer: the data waits for a real one.
            self.pending |= pending::RW;
            return Some(self.header(OP_CREDIT_UPDATE));
        }
        match read_into(&self.stream, &buf.payload(max)) {
            Ok(0) if self.state == ConnState::Established && !hung_up(&self.stream) => {
                // End of stream with the socket still open: the host shut
                // down its write side and may wait for a reply. The guest
                // learns it will receive no more, and may still send.
                self.state = ConnState::LocalHalfClosed;
                let mut hdr = self.header(OP_SHUTDOWN);
                hdr.flags = SHUTDOWN_SEND;
                Some(hdr)
            }
            Ok(0) => Some(self.local_close(now)),
            Ok(n) => {
                // More may be waiting: stay scheduled.
                self.pending |= pending::RW;
                add(&self.metrics.rx_bytes_count, n as u64);
                let mut hdr = self.header(OP_RW);
                // n <= max <= MAX_PKT_BUF_SIZE.
                hdr.len = n as u32;
                Some(hdr)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
            Err(e) => {
                inc(&self.metrics.rx_read_fails);
                warn!(
                    "vsock: cannot read the host socket (lp={}, pp={}): {e}",
                    self.local_port, self.peer_port
                );
                self.kill();
                self.take(pending::RST);
                Some(self.header(OP_RST))
            }
        }
    }

    /// The host side is gone, in both directions (Firecracker's semantics):
    /// asks the guest to shut down, and gives it a while to answer with RST.
    fn local_close(&mut self, now: Instant) -> VsockHeader {
        self.state = ConnState::LocalClosed;
        self.expiry = Some(now + self.timeouts.shutdown);
        let mut hdr = self.header(OP_SHUTDOWN);
        hdr.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
        hdr
    }

    /// Takes a packet from the guest for this connection (anything but RST,
    /// which the muxer handles).
    pub(crate) fn send_pkt(&mut self, pkt: &TxPacket<'_>) {
        let hdr = pkt.header();
        // Every packet carries the guest's credit.
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);

        match (self.state, hdr.op) {
            (
                ConnState::Established
                | ConnState::LocalHalfClosed
                | ConnState::PeerClosed { no_send: false, .. },
                OP_RW,
            ) => {
                if hdr.len == 0 {
                    debug!(
                        "vsock: empty data packet (lp={}, pp={})",
                        self.local_port, self.peer_port
                    );
                    return;
                }
                self.forward(pkt);
                if self.state != ConnState::Killed && self.peer_needs_credit_update() {
                    self.pending |= pending::CREDIT_UPDATE;
                }
            }
            (ConnState::LocalInit, OP_RESPONSE) => {
                self.expiry = None;
                self.state = ConnState::Established;
            }
            (
                ConnState::Established | ConnState::LocalHalfClosed | ConnState::PeerClosed { .. },
                OP_SHUTDOWN,
            ) => {
                let (mut no_recv, mut no_send) = match self.state {
                    ConnState::PeerClosed { no_recv, no_send } => (no_recv, no_send),
                    // The host sends no more: nothing is left to receive.
                    ConnState::LocalHalfClosed => (true, false),
                    _ => (false, false),
                };
                no_recv |= hdr.flags & SHUTDOWN_RCV != 0;
                no_send |= hdr.flags & SHUTDOWN_SEND != 0;
                self.state = ConnState::PeerClosed { no_recv, no_send };
                if no_recv && no_send {
                    if self.tx_buf.is_empty() {
                        self.pending |= pending::RST;
                    } else if self.expiry.is_none() {
                        // Give the host a while to take the buffered bytes.
                        self.expiry = Some(Instant::now() + self.timeouts.shutdown);
                    }
                }
                self.shut_write_when_flushed();
            }
            (
                ConnState::Established
                | ConnState::PeerInit
                | ConnState::PeerClosed { no_recv: false, .. },
                OP_CREDIT_UPDATE,
            ) => {
                // The credit was taken above; polling resumes if it was 0.
            }
            (
                ConnState::Established
                | ConnState::PeerInit
                | ConnState::LocalHalfClosed
                | ConnState::PeerClosed { no_send: false, .. },
                OP_CREDIT_REQUEST,
            ) => {
                self.pending |= pending::CREDIT_UPDATE;
            }
            (state, op) => {
                debug!(
                    "vsock: dropping op {op} in state {state:?} (lp={}, pp={})",
                    self.local_port, self.peer_port
                );
            }
        }
    }

    /// Writes an RW payload to the host socket, keeping what it does not
    /// take in the TX buffer.
    fn forward(&mut self, pkt: &TxPacket<'_>) {
        let payload = pkt.payload();
        // Bytes already waiting go first: append behind them.
        let written = if self.tx_buf.is_empty() {
            match send_from(self.stream.as_raw_fd(), payload) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                Err(e) => {
                    inc(&self.metrics.tx_write_fails);
                    warn!(
                        "vsock: cannot write to the host socket (lp={}, pp={}): {e}",
                        self.local_port, self.peer_port
                    );
                    self.kill();
                    return;
                }
            }
        } else {
            0
        };
        self.fwd_cnt += Wrapping(written as u32);
        add(&self.metrics.tx_bytes_count, written as u64);

        let rest = skip(payload, written);
        if self.tx_buf.push_slices(&rest).is_err() {
            // Only a driver ignoring its credit gets here (virtio 1.2
            // §5.10.6.3.1: the driver MUST NOT send more than the credit).
            warn!(
                "vsock: guest overran its credit by sending {} bytes with {} buffered \
                 (lp={}, pp={}); resetting the connection",
                pkt.header().len,
                self.tx_buf.len(),
                self.local_port,
                self.peer_port
            );
            self.kill();
        }
    }

    /// After the guest's SHUTDOWN(SEND), tells the host reader end of
    /// stream once every guest byte reached the socket.
    fn shut_write_when_flushed(&mut self) {
        if let ConnState::PeerClosed { no_send: true, .. } = self.state {
            if !self.write_shut && self.tx_buf.is_empty() {
                self.write_shut = true;
                if let Err(e) = self.stream.shutdown(Shutdown::Write) {
                    debug!(
                        "vsock: shutdown of the host socket (lp={}, pp={}): {e}",
                        self.local_port, self.peer_port
                    );
                }
            }
        }
    }

    /// The events the host socket must be polled for.
    pub(crate) fn polled_events(&self) -> EventSet {
        let mut events = EventSet::empty();
        if !self.tx_buf.is_empty() {
            events |= EventSet::OUT;
        }
        if self.state == ConnState::LocalHalfClosed && self.pending & pending::RW == 0 {
            // Only the host closing its socket matters now.
            events |= EventSet::HANG_UP;
        }
        let wants_data = match self.state {
            ConnState::Killed
            | ConnState::LocalHalfClosed
            | ConnState::LocalClosed
            | ConnState::PeerClosed { no_recv: true, .. } => false,
            // With no credit, leave the data in the socket: the host writer
            // gets back-pressure and nothing is lost.
            _ if self.peer_avail_credit() == 0 => false,
            // Readable data already noticed waits for an RX buffer; polling
            // again would spin on a level-triggered event.
            _ if self.pending & pending::RW != 0 => false,
            _ => true,
        };
        if wants_data {
            events |= EventSet::IN;
        }
        events
    }

    /// Handles readiness of the host socket.
    pub(crate) fn notify(&mut self, events: EventSet) {
        let wanted = self.polled_events();
        let trouble = EventSet::ERROR | EventSet::HANG_UP;
        if wanted.contains(EventSet::IN) && events.intersects(EventSet::IN | trouble) {
            self.pending |= pending::RW;
        }
        if wanted.contains(EventSet::HANG_UP) && events.intersects(trouble) {
            // After a half-close: read_stream turns it into the full close.
            self.pending |= pending::RW;
        }
        if events.intersects(EventSet::OUT | trouble) {
            if self.tx_buf.is_empty() {
                if events.contains(EventSet::OUT) {
                    inc(&self.metrics.conn_event_fails);
                    debug!("vsock: host socket writable with nothing to write");
                }
                return;
            }
            self.flush();
        }
    }

    fn flush(&mut self) {
        match self.tx_buf.flush_to(self.stream.as_raw_fd()) {
            Ok(n) => {
                self.fwd_cnt += Wrapping(n as u32);
                add(&self.metrics.tx_bytes_count, n as u64);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                inc(&self.metrics.tx_flush_fails);
                return;
            }
            Err(e) => {
                inc(&self.metrics.tx_flush_fails);
                warn!(
                    "vsock: cannot flush to the host socket (lp={}, pp={}): {e}",
                    self.local_port, self.peer_port
                );
                self.kill();
                return;
            }
        }
        let closed = matches!(
            self.state,
            ConnState::PeerClosed {
                no_recv: true,
                no_send: true
            }
        );
        if closed && self.tx_buf.is_empty() {
            self.pending |= pending::RST;
        } else if self.peer_needs_credit_update() {
            self.pending |= pending::CREDIT_UPDATE;
        }
        self.shut_write_when_flushed();
    }
}

impl AsRawFd for Connection {
    fn as_raw_fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }
}

/// Whether the other end of `stream` is closed (not merely shut down for
/// writing): closing marks this end shut for sending too, so even an empty
/// send fails with EPIPE.
fn hung_up(stream: &UnixStream) -> bool {
    send_bytes(stream.as_raw_fd(), &[]).is_err()
}

/// `slices` without their first `n` bytes.
fn skip<'a>(
    slices: &[vm_memory::VolatileSlice<'a>],
    mut n: usize,
) -> Vec<vm_memory::VolatileSlice<'a>> {
    let mut out = Vec::new();
    for slice in slices {
        if n >= slice.len() {
            n -= slice.len();
            continue;
        }
        if let Ok(rest) = slice.offset(n) {
            out.push(rest);
        }
        n = 0;
    }
    out
}
