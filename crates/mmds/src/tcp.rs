// SPDX-License-Identifier: Apache-2.0

//! A minimal TCP server (RFC 9293) for one port, answering HTTP requests.
//!
//! It does what a metadata client needs and no more: passive open, in-order
//! data into a bounded receive buffer (its free space is the advertised
//! window), one response at a time sent within the peer's window in
//! segments of the peer's MSS, retransmission of its own unacknowledged
//! segments after a timeout (doubling, at most [`MAX_RETRIES`] times before
//! the connection is reset), FIN in both directions, and RST for segments
//! that belong to no connection. Out-of-order data is dropped and
//! re-acknowledged, so the guest retransmits it.
//!
//! Everything is bounded: at most [`MAX_CONNECTIONS`] connections (a new
//! one evicts the least recently active), [`RCV_BUF_LEN`] bytes of request
//! per connection (a request that does not fit resets the connection), one
//! response per connection in flight, at most [`MAX_PENDING_RESETS`] RSTs
//! queued.

use std::collections::{HashMap, VecDeque};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use crate::pdu::{
    write_ipv4_header, PduError, TcpSegment, ACK, FIN, IPV4_HDR_LEN, PROTOCOL_TCP, PSH, RST, SYN,
    TCP_HDR_LEN,
};

/// Most connections at once (Firecracker's).
pub const MAX_CONNECTIONS: usize = 30;
/// Most RSTs waiting to be sent (Firecracker's).
pub const MAX_PENDING_RESETS: usize = 100;
/// Receive buffer per connection: the largest request (Firecracker's).
pub const RCV_BUF_LEN: usize = 2500;
/// Timeout-based retransmissions before a connection is reset
/// (Firecracker's).
pub const MAX_RETRIES: u32 = 15;
/// First retransmission timeout.
pub const INITIAL_RTO: Duration = Duration::from_millis(200);
/// Largest retransmission timeout.
const MAX_RTO: Duration = Duration::from_secs(2);
/// MSS assumed when the peer's SYN has none (RFC 9293 §3.7.1).
pub const DEFAULT_MSS: u16 = 536;
/// MSS this end announces and the most it sends in one segment.
pub const OUR_MSS: u16 = 1460;

/// `a` comes after `b` in sequence space.
fn after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

/// What a received segment did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecvEvent {
    /// Accepted by a connection.
    Accepted,
    /// A new connection.
    NewConnection,
    /// A new connection that evicted the least recently active one.
    NewConnectionReplacing,
    /// A connection ended (FIN exchange completed or RST received).
    ConnectionDone,
    /// Refused: answered with RST, or dropped and re-acknowledged.
    Unusual,
}

/// What a written segment did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteEvent {
    /// A segment.
    Segment,
    /// A segment that reset a connection (retransmissions exhausted, or a
    /// request over [`RCV_BUF_LEN`]).
    ConnectionReset,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    SynReceived,
    Established,
}

#[derive(Debug)]
struct Connection {
    state: State,
    iss: u32,
    snd_una: u32,
    snd_nxt: u32,
    snd_max: u32,
    rcv_nxt: u32,
    peer_window: u32,
    mss: u16,
    recv: Vec<u8>,
    /// Response bytes not yet acknowledged; `send[0]` is at `send_base`.
    send: Vec<u8>,
    send_base: u32,
    fin_received: bool,
    fin_queued: bool,
    fin_acked: bool,
    ack_pending: bool,
    synack_pending: bool,
    rto: Duration,
    rto_deadline: Option<Instant>,
    retries: u32,
    last_activity: Instant,
    reset: bool,
}

impl Connection {
    fn fin_seq(&self) -> u32 {
        self.send_base.wrapping_add(self.send.len() as u32)
    }

    fn window(&self) -> u16 {
        (RCV_BUF_LEN - self.recv.len()) as u16
    }

    fn has_unacked(&self) -> bool {
        self.snd_una != self.snd_max
    }
}

#[derive(Debug, Clone, Copy)]
struct Reset {
    remote: (Ipv4Addr, u16),
    seq: u32,
    ack: Option<u32>,
}

/// The server: connections to one local address and port.
#[derive(Debug)]
pub struct TcpServer {
    local_addr: Ipv4Addr,
    port: u16,
    connections: HashMap<(Ipv4Addr, u16), Connection>,
    resets: VecDeque<Reset>,
    next_iss: u32,
}

impl TcpServer {
    /// A server on `local_addr:port`, with no connection.
    pub fn new(local_addr: Ipv4Addr, port: u16) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        TcpServer {
            local_addr,
            port,
            connections: HashMap::new(),
            resets: VecDeque::new(),
            next_iss: seed,
        }
    }

    /// The local address.
    pub fn local_addr(&self) -> Ipv4Addr {
        self.local_addr
    }

    /// Changes the local address; existing connections are dropped.
    pub fn set_local_addr(&mut self, addr: Ipv4Addr) {
        self.local_addr = addr;
        self.connections.clear();
        self.resets.clear();
    }

    /// Open connections.
    pub fn connections(&self) -> usize {
        self.connections.len()
    }

    /// RSTs waiting to be sent.
    pub fn pending_resets(&self) -> usize {
        self.resets.len()
    }

    fn queue_reset(&mut self, remote: (Ipv4Addr, u16), seg: &TcpSegment) {
        if self.resets.len() >= MAX_PENDING_RESETS {
            return;
        }
        // RFC 9293 §3.10.7.1: answer an ACK with its ack number as our
        // sequence number, anything else with an ACK of what it carried.
        let reset = if seg.flags & ACK != 0 {
            Reset {
                remote,
                seq: seg.ack,
                ack: None,
            }
        } else {
            Reset {
                remote,
                seq: 0,
                ack: Some(seg.seq.wrapping_add(seg.seq_len())),
            }
        };
        self.resets.push_back(reset);
    }

    /// Handles one segment from `src`; complete requests are answered with
    /// `respond`.
    pub fn receive(
        &mut self,
        src: Ipv4Addr,
        seg: &TcpSegment,
        now: Instant,
        respond: &mut dyn FnMut(&[u8]) -> Vec<u8>,
    ) -> RecvEvent {
        let remote = (src, seg.src_port);
        if seg.dst_port != self.port {
            if seg.flags & RST == 0 {
                self.queue_reset(remote, seg);
            }
            return RecvEvent::Unusual;
        }
        let Some(conn) = self.connections.get_mut(&remote) else {
            return self.receive_unknown(remote, seg, now);
        };
        conn.last_activity = now;

        if seg.flags & RST != 0 {
            // Only an RST within the window ends the connection (RFC 5961 §3).
            let offset = seg.seq.wrapping_sub(conn.rcv_nxt);
            if offset < RCV_BUF_LEN as u32 || offset == 0 {
                self.connections.remove(&remote);
                return RecvEvent::ConnectionDone;
            }
            return RecvEvent::Unusual;
        }
        if seg.flags & SYN != 0 {
            if conn.state == State::SynReceived && seg.seq.wrapping_add(1) == conn.rcv_nxt {
                // The peer did not get our SYN-ACK.
                conn.synack_pending = true;
                return RecvEvent::Accepted;
            }
            self.connections.remove(&remote);
            self.queue_reset(remote, seg);
            return RecvEvent::ConnectionDone;
        }
        if seg.flags & ACK == 0 {
            return RecvEvent::Unusual;
        }

        // Acknowledgment.
        let ack = seg.ack;
        if after(ack, conn.snd_max) {
            conn.ack_pending = true;
            return RecvEvent::Unusual;
        }
        if conn.state == State::SynReceived {
            if after(ack, conn.iss) {
                conn.state = State::Established;
                conn.synack_pending = false;
            } else {
                return RecvEvent::Unusual;
            }
        }
        if after(ack, conn.snd_una) {
            let data_acked = if after(ack, conn.send_base) {
                (ack.wrapping_sub(conn.send_base) as usize).min(conn.send.len())
            } else {
                0
            };
            conn.send.drain(..data_acked);
            conn.send_base = conn.send_base.wrapping_add(data_acked as u32);
            if conn.fin_queued && conn.send.is_empty() && after(ack, conn.send_base) {
                conn.fin_acked = true;
            }
            conn.snd_una = ack;
            if after(conn.snd_una, conn.snd_nxt) {
                conn.snd_nxt = conn.snd_una;
            }
            conn.retries = 0;
            conn.rto = INITIAL_RTO;
            conn.rto_deadline = conn.has_unacked().then(|| now + conn.rto);
        }
        conn.peer_window = u32::from(seg.window);

        // Data, in order only.
        let mut event = RecvEvent::Accepted;
        if !seg.payload.is_empty() {
            conn.ack_pending = true;
            let skip = conn.rcv_nxt.wrapping_sub(seg.seq) as usize;
            if !conn.fin_received && skip < seg.payload.len() && !after(seg.seq, conn.rcv_nxt) {
                let data = &seg.payload[skip..];
                let take = data.len().min(RCV_BUF_LEN - conn.recv.len());
                conn.recv.extend_from_slice(&data[..take]);
                conn.rcv_nxt = conn.rcv_nxt.wrapping_add(take as u32);
            } else {
                event = RecvEvent::Unusual;
            }
        }
        if seg.flags & FIN != 0 {
            conn.ack_pending = true;
            let fin_at = seg.seq.wrapping_add(seg.payload.len() as u32);
            if !conn.fin_received && fin_at == conn.rcv_nxt {
                conn.fin_received = true;
                conn.rcv_nxt = conn.rcv_nxt.wrapping_add(1);
            }
        }

        // One response at a time, as Firecracker's endpoint.
        if conn.send.is_empty() && !conn.fin_queued {
            if let Some(end) = crate::http::request_end(&conn.recv) {
                let response = respond(&conn.recv[..end]);
                conn.recv.drain(..end);
                conn.send = response;
                // A window update rides on the next segment.
                conn.ack_pending = true;
            } else if conn.recv.len() == RCV_BUF_LEN {
                conn.reset = true;
            }
        }
        if conn.fin_received && conn.send.is_empty() {
            conn.fin_queued = true;
        }
        if conn.fin_received && conn.fin_acked {
            self.connections.remove(&remote);
            return RecvEvent::ConnectionDone;
        }
        event
    }

    fn receive_unknown(
        &mut self,
        remote: (Ipv4Addr, u16),
        seg: &TcpSegment,
        now: Instant,
    ) -> RecvEvent {
        if seg.flags & RST != 0 {
            return RecvEvent::Unusual;
        }
        if seg.flags & (SYN | ACK) != SYN {
            self.queue_reset(remote, seg);
            return RecvEvent::Unusual;
        }
        let mut event = RecvEvent::NewConnection;
        if self.connections.len() >= MAX_CONNECTIONS {
            if let Some(oldest) = self
                .connections
                .iter()
                .min_by_key(|(_, c)| c.last_activity)
                .map(|(k, _)| *k)
            {
                self.connections.remove(&oldest);
            }
            event = RecvEvent::NewConnectionReplacing;
        }
        let iss = self.next_iss;
        self.next_iss = self
            .next_iss
            .wrapping_mul(1_103_515_245)
            .wrapping_add(12_345);
        let start = iss.wrapping_add(1);
        self.connections.insert(
            remote,
            Connection {
                state: State::SynReceived,
                iss,
                snd_una: iss,
                snd_nxt: iss,
                snd_max: iss,
                rcv_nxt: seg.seq.wrapping_add(1),
                peer_window: u32::from(seg.window),
                mss: seg.mss.unwrap_or(DEFAULT_MSS).clamp(64, OUR_MSS),
                recv: Vec::new(),
                send: Vec::new(),
                send_base: start,
                fin_received: false,
                fin_queued: false,
                fin_acked: false,
                ack_pending: false,
                synack_pending: true,
                rto: INITIAL_RTO,
                rto_deadline: None,
                retries: 0,
                last_activity: now,
                reset: false,
            },
        );
        event
    }

    /// When a retransmission falls due, if one is pending.
    pub fn next_timeout(&self) -> Option<Instant> {
        self.connections
            .values()
            .filter_map(|c| c.rto_deadline)
            .min()
    }

    /// Whether a segment is ready to be written now.
    pub fn has_segment(&self, now: Instant) -> bool {
        !self.resets.is_empty()
            || self.connections.values().any(|c| {
                c.reset
                    || c.synack_pending
                    || c.ack_pending
                    || c.rto_deadline.is_some_and(|d| d <= now)
                    || Self::sendable(c) > 0
                    || (c.fin_queued && c.snd_nxt == c.fin_seq() && !c.fin_acked)
            })
    }

    /// Bytes of the response that may be sent now.
    fn sendable(c: &Connection) -> usize {
        if c.state != State::Established {
            return 0;
        }
        let end = c.fin_seq();
        if !after(end, c.snd_nxt) {
            return 0;
        }
        let in_flight = c.snd_nxt.wrapping_sub(c.snd_una);
        let window_left = c.peer_window.saturating_sub(in_flight);
        (end.wrapping_sub(c.snd_nxt) as usize)
            .min(window_left as usize)
            .min(usize::from(c.mss))
    }

    /// Writes the next IPv4 packet (header and TCP segment) to `buf`, if any
    /// is due; returns its length.
    pub fn write_next(
        &mut self,
        buf: &mut [u8],
        now: Instant,
    ) -> Result<Option<(usize, WriteEvent)>, PduError> {
        let need = IPV4_HDR_LEN + TCP_HDR_LEN + 4;
        if buf.len() < need {
            return Err(PduError::BufferTooSmall {
                len: buf.len(),
                need,
            });
        }
        if let Some(r) = self.resets.pop_front() {
            let seg = TcpSegment {
                src_port: self.port,
                dst_port: r.remote.1,
                seq: r.seq,
                ack: r.ack.unwrap_or(0),
                flags: RST | if r.ack.is_some() { ACK } else { 0 },
                window: 0,
                mss: None,
                payload: &[],
            };
            return self
                .emit(buf, r.remote.0, &seg)
                .map(|n| Some((n, WriteEvent::Segment)));
        }

        // Retransmission timeouts.
        let mut dead = Vec::new();
        for (key, c) in self.connections.iter_mut() {
            if c.rto_deadline.is_some_and(|d| d <= now) {
                c.retries += 1;
                if c.retries > MAX_RETRIES {
                    dead.push(*key);
                    continue;
                }
                c.rto = (c.rto * 2).min(MAX_RTO);
                c.rto_deadline = Some(now + c.rto);
                // Go back to the oldest unacknowledged byte.
                c.snd_nxt = c.snd_una;
                if c.state == State::SynReceived {
                    c.synack_pending = true;
                }
            }
        }
        for key in dead {
            if let Some(c) = self.connections.get_mut(&key) {
                c.reset = true;
            }
        }

        let local = self.local_addr;
        let port = self.port;
        let Some((&key, _)) = self.connections.iter().find(|(_, c)| {
            c.reset
                || c.synack_pending
                || c.ack_pending
                || Self::sendable(c) > 0
                || (c.fin_queued && c.snd_nxt == c.fin_seq() && !c.fin_acked)
        }) else {
            return Ok(None);
        };
        let Some(c) = self.connections.get_mut(&key) else {
            return Ok(None);
        };
        let mut seg = TcpSegment {
            src_port: port,
            dst_port: key.1,
            seq: c.snd_nxt,
            ack: c.rcv_nxt,
            flags: ACK,
            window: c.window(),
            mss: None,
            payload: &[],
        };
        if c.reset {
            seg.flags = RST | ACK;
            let seg = TcpSegment {
                seq: c.snd_max,
                ..seg
            };
            let n = Self::emit_at(buf, local, key.0, &seg)?;
            self.connections.remove(&key);
            return Ok(Some((n, WriteEvent::ConnectionReset)));
        }
        let mut advance = 0u32;
        let mut payload = Vec::new();
        if c.synack_pending {
            seg.seq = c.iss;
            seg.flags = SYN | ACK;
            seg.mss = Some(OUR_MSS);
            c.synack_pending = false;
            c.snd_nxt = c.iss;
            advance = 1;
        } else {
            let n = Self::sendable(c);
            if n > 0 {
                let from = c.snd_nxt.wrapping_sub(c.send_base) as usize;
                let n = n.min(buf.len() - need);
                payload.extend_from_slice(&c.send[from..from + n]);
                seg.flags |= PSH;
                advance = n as u32;
            }
            if c.fin_queued && c.snd_nxt.wrapping_add(advance) == c.fin_seq() && !c.fin_acked {
                seg.flags |= FIN;
                advance += 1;
            }
        }
        seg.payload = &payload;
        let n = Self::emit_at(buf, local, key.0, &seg)?;
        c.ack_pending = false;
        if advance > 0 {
            c.snd_nxt = c.snd_nxt.wrapping_add(advance);
            if after(c.snd_nxt, c.snd_max) {
                c.snd_max = c.snd_nxt;
            }
            if c.rto_deadline.is_none() {
                c.rto_deadline = Some(now + c.rto);
            }
        }
        Ok(Some((n, WriteEvent::Segment)))
    }

    fn emit(&self, buf: &mut [u8], dst: Ipv4Addr, seg: &TcpSegment) -> Result<usize, PduError> {
        Self::emit_at(buf, self.local_addr, dst, seg)
    }

    fn emit_at(
        buf: &mut [u8],
        src: Ipv4Addr,
        dst: Ipv4Addr,
        seg: &TcpSegment,
    ) -> Result<usize, PduError> {
        let (header, rest) = buf.split_at_mut(IPV4_HDR_LEN);
        let len = seg.write(rest, src, dst)?;
        write_ipv4_header(header, src, dst, PROTOCOL_TCP, len)?;
        Ok(IPV4_HDR_LEN + len)
    }
}
