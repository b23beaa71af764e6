// SPDX-License-Identifier: Apache-2.0

//! The stack end to end, driven by a scripted client over Ethernet frames.

use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::pdu::*;
use crate::tcp::{MAX_CONNECTIONS, MAX_RETRIES, RCV_BUF_LEN};
use crate::*;

const GUEST_MAC: [u8; 6] = [0x06, 0, 0xac, 0x10, 0, 2];
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(172, 16, 0, 2);

struct Client {
    stack: MmdsNetworkStack,
    now: Instant,
}

struct Seg {
    seq: u32,
    ack: u32,
    flags: u8,
    window: u16,
    mss: Option<u16>,
    payload: Vec<u8>,
}

fn frame(dst_ip: Ipv4Addr, port: u16, seq: u32, ack: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; 2000];
    write_ethernet_header(&mut buf, DEFAULT_MAC_ADDR, GUEST_MAC, ETHERTYPE_IPV4).unwrap();
    let seg = TcpSegment {
        src_port: port,
        dst_port: 80,
        seq,
        ack,
        flags,
        window: 8192,
        mss: (flags & SYN != 0).then_some(1460),
        payload,
    };
    let len = seg.write(&mut buf[34..], GUEST_IP, dst_ip).unwrap();
    write_ipv4_header(&mut buf[14..], GUEST_IP, dst_ip, PROTOCOL_TCP, len).unwrap();
    buf.truncate(34 + len);
    buf
}

impl Client {
    fn new(version: MmdsVersion) -> Self {
        let mut m = Mmds::default();
        m.set_version(version);
        m.put_data(json!({"latest": {"meta-data": {"ami-id": "ami-1", "tags": {"a": "b"}}}}))
            .unwrap();
        let stack = MmdsNetworkStack::new(
            None,
            Arc::new(Mutex::new(m)),
            Arc::new(MmdsMetrics::default()),
        );
        Client {
            stack,
            now: Instant::now(),
        }
    }

    fn send(&mut self, port: u16, seq: u32, ack: u32, flags: u8, payload: &[u8]) {
        let f = frame(DEFAULT_IPV4_ADDR, port, seq, ack, flags, payload);
        assert!(self.stack.is_mmds_frame(&f));
        assert!(self.stack.detour_frame(&f, self.now));
    }

    fn recv(&mut self) -> Option<Seg> {
        let mut buf = [0u8; 2000];
        let len = self.stack.write_next_frame(&mut buf, self.now)?;
        let eth = EthernetFrame::parse(&buf[..len]).unwrap();
        assert_eq!(
            (eth.dst, eth.src, eth.ethertype),
            (GUEST_MAC, DEFAULT_MAC_ADDR, ETHERTYPE_IPV4)
        );
        assert!(ipv4_checksum_ok(&eth.payload[..20]));
        let ip = Ipv4Packet::parse(eth.payload).unwrap();
        assert_eq!((ip.src, ip.dst), (DEFAULT_IPV4_ADDR, GUEST_IP));
        assert!(tcp_checksum_ok(ip.payload, ip.src, ip.dst));
        let s = TcpSegment::parse(ip.payload).unwrap();
        Some(Seg {
            seq: s.seq,
            ack: s.ack,
            flags: s.flags,
            window: s.window,
            mss: s.mss,
            payload: s.payload.to_vec(),
        })
    }

    /// Handshake from `port`; returns (our next seq, server's next seq).
    fn connect(&mut self, port: u16) -> (u32, u32) {
        self.send(port, 1000, 0, SYN, &[]);
        let synack = self.recv().unwrap();
        assert_eq!(synack.flags, SYN | ACK);
        assert_eq!(synack.ack, 1001);
        assert_eq!(synack.mss, Some(1460));
        self.send(port, 1001, synack.seq.wrapping_add(1), ACK, &[]);
        (1001, synack.seq.wrapping_add(1))
    }

    /// Sends `request`, collects the response, acking each segment.
    fn request(&mut self, port: u16, seq: &mut u32, srv: &mut u32, request: &str) -> String {
        self.send(port, *seq, *srv, ACK | PSH, request.as_bytes());
        *seq += request.len() as u32;
        let mut body = Vec::new();
        while let Some(s) = self.recv() {
            assert_eq!(s.ack, *seq);
            if s.payload.is_empty() {
                continue;
            }
            assert_eq!(s.seq, *srv);
            *srv = srv.wrapping_add(s.payload.len() as u32);
            body.extend_from_slice(&s.payload);
            self.send(port, *seq, *srv, ACK, &[]);
        }
        String::from_utf8(body).unwrap()
    }
}

#[test]
fn arp_requests_for_the_service_are_answered() {
    let mut c = Client::new(MmdsVersion::V1);
    let mut f = vec![0u8; 42];
    write_ethernet_header(&mut f, [0xff; 6], GUEST_MAC, ETHERTYPE_ARP).unwrap();
    let req = ArpPacket {
        operation: ARP_REQUEST,
        sha: GUEST_MAC,
        spa: GUEST_IP,
        tha: [0; 6],
        tpa: DEFAULT_IPV4_ADDR,
    };
    req.write(&mut f[14..]).unwrap();
    assert!(c.stack.is_mmds_frame(&f));
    assert!(c.stack.detour_frame(&f, c.now));
    let mut buf = [0u8; 64];
    let len = c.stack.write_next_frame(&mut buf, c.now).unwrap();
    let eth = EthernetFrame::parse(&buf[..len]).unwrap();
    assert_eq!(
        (eth.dst, eth.src, eth.ethertype),
        (GUEST_MAC, DEFAULT_MAC_ADDR, ETHERTYPE_ARP)
    );
    let reply = ArpPacket::parse(eth.payload).unwrap();
    assert_eq!(
        reply,
        ArpPacket {
            operation: ARP_REPLY,
            sha: DEFAULT_MAC_ADDR,
            spa: DEFAULT_IPV4_ADDR,
            tha: GUEST_MAC,
            tpa: GUEST_IP
        }
    );
    assert!(c.stack.write_next_frame(&mut buf, c.now).is_none());
    // A reply too small for the buffer is an error, and stays pending.
    c.stack.detour_frame(&f, c.now);
    assert!(c.stack.write_next_frame(&mut buf[..30], c.now).is_none());
    assert_eq!(c.stack.metrics().tx_errors.count(), 1);
    assert!(c.stack.write_next_frame(&mut buf, c.now).is_some());

    // ARP for another address, and IPv4 elsewhere, are not the service's.
    let mut other = f.clone();
    other[38..42].copy_from_slice(&[10, 0, 0, 1]);
    assert!(!c.stack.is_mmds_frame(&other));
    assert!(!c
        .stack
        .is_mmds_frame(&frame(Ipv4Addr::new(8, 8, 8, 8), 1, 1, 0, SYN, &[])));
    assert!(!c.stack.is_mmds_frame(&f[..20]));
}

#[test]
fn a_get_over_tcp_returns_the_value_and_closes_cleanly() {
    let mut c = Client::new(MmdsVersion::V1);
    let (mut seq, mut srv) = c.connect(4000);
    assert_eq!(c.stack.metrics().connections_created.count(), 1);
    let r = c.request(
        4000,
        &mut seq,
        &mut srv,
        "GET /latest/meta-data/ami-id HTTP/1.1\r\n\r\n",
    );
    assert!(r.starts_with("HTTP/1.1 200 \r\n"), "{r}");
    assert!(r.ends_with("\r\n\r\nami-1"), "{r}");
    // A second request on the same connection.
    let r = c.request(
        4000,
        &mut seq,
        &mut srv,
        "GET /latest/meta-data HTTP/1.1\r\nAccept: application/json\r\n\r\n",
    );
    assert!(r.contains("Content-Type: application/json\r\n"), "{r}");
    assert!(r.ends_with(r#"{"ami-id":"ami-1","tags":{"a":"b"}}"#), "{r}");
    let r = c.request(
        4000,
        &mut seq,
        &mut srv,
        "GET /latest/meta-data/ HTTP/1.1\r\n\r\n",
    );
    assert!(r.ends_with("\r\n\r\nami-id\ntags/"), "{r}");

    // Guest closes: we ACK its FIN and send ours.
    c.send(4000, seq, srv, FIN | ACK, &[]);
    let fin = c.recv().unwrap();
    assert_eq!((fin.flags & FIN, fin.ack, fin.seq), (FIN, seq + 1, srv));
    c.send(4000, seq + 1, srv + 1, ACK, &[]);
    assert_eq!(c.stack.connections(), 0);
    assert_eq!(c.stack.metrics().connections_destroyed.count(), 1);
    assert!(c.recv().is_none());
}

#[test]
fn v2_tokens_over_tcp() {
    let mut c = Client::new(MmdsVersion::V2);
    let (mut seq, mut srv) = c.connect(4001);
    let r = c.request(
        4001,
        &mut seq,
        &mut srv,
        "GET /latest/meta-data/ami-id HTTP/1.1\r\n\r\n",
    );
    assert!(r.starts_with("HTTP/1.1 401 \r\n"), "{r}");
    let r = c.request(
        4001,
        &mut seq,
        &mut srv,
        "PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 10\r\n\r\n",
    );
    assert!(r.starts_with("HTTP/1.1 200 \r\n"), "{r}");
    let token = r.rsplit("\r\n\r\n").next().unwrap().to_string();
    let get = format!("GET /latest/meta-data/ami-id HTTP/1.1\r\nX-metadata-token: {token}\r\n\r\n");
    let r = c.request(4001, &mut seq, &mut srv, &get);
    assert!(r.ends_with("\r\n\r\nami-1"), "{r}");
    c.now += Duration::from_secs(11);
    let r = c.request(4001, &mut seq, &mut srv, &get);
    assert!(r.starts_with("HTTP/1.1 401 \r\n"), "{r}");
}

#[test]
fn large_responses_respect_mss_and_window_and_are_retransmitted() {
    let mut c = Client::new(MmdsVersion::V1);
    let big = "x".repeat(6000);
    c.stack
        .mmds()
        .lock()
        .unwrap()
        .put_data(json!({ "big": big }))
        .unwrap();
    // A peer with a small MSS and window.
    c.send(4002, 1, 0, SYN, &[]);
    let synack = c.recv().unwrap();
    let mut srv = synack.seq.wrapping_add(1);
    let f = {
        let mut buf = vec![0u8; 200];
        write_ethernet_header(&mut buf, DEFAULT_MAC_ADDR, GUEST_MAC, ETHERTYPE_IPV4).unwrap();
        let req = b"GET /big HTTP/1.1\r\n\r\n";
        let seg = TcpSegment {
            src_port: 4002,
            dst_port: 80,
            seq: 2,
            ack: srv,
            flags: ACK,
            window: 1000,
            mss: None,
            payload: req,
        };
        let len = seg
            .write(&mut buf[34..], GUEST_IP, DEFAULT_IPV4_ADDR)
            .unwrap();
        write_ipv4_header(
            &mut buf[14..],
            GUEST_IP,
            DEFAULT_IPV4_ADDR,
            PROTOCOL_TCP,
            len,
        )
        .unwrap();
        buf.truncate(34 + len);
        buf
    };
    assert!(c.stack.detour_frame(&f, c.now));
    let seq = 2 + 21;
    // The SYN had an MSS of 1460; the window is 1000 bytes.
    let mut got = 0;
    while let Some(s) = c.recv() {
        assert!(s.payload.len() <= 1000);
        got += s.payload.len();
    }
    assert_eq!(got, 1000);
    // Nothing acknowledged: after the timeout the first segment comes again.
    c.now += Duration::from_millis(250);
    let again = c.recv().unwrap();
    assert_eq!(again.seq, srv);
    assert_eq!(again.payload.len(), 1000);
    assert!(c.recv().is_none());
    // Acknowledge and open the window: the rest flows.
    let mut body = again.payload.clone();
    srv = srv.wrapping_add(1000);
    loop {
        c.send(4002, seq, srv, ACK, &[]);
        let mut progressed = false;
        while let Some(s) = c.recv() {
            if !s.payload.is_empty() {
                assert_eq!(s.seq, srv);
                srv = srv.wrapping_add(s.payload.len() as u32);
                body.extend_from_slice(&s.payload);
                progressed = true;
            }
        }
        if !progressed {
            break;
        }
    }
    let text = String::from_utf8(body).unwrap();
    assert!(
        text.ends_with(&format!("\"{}\"", "x".repeat(6000))) || text.ends_with(&"x".repeat(6000))
    );
    assert!(text.starts_with("HTTP/1.1 200 \r\n"));
}

#[test]
fn unanswered_segments_end_in_a_reset() {
    let mut c = Client::new(MmdsVersion::V1);
    c.send(4003, 1, 0, SYN, &[]);
    assert_eq!(c.recv().unwrap().flags, SYN | ACK);
    for _ in 0..MAX_RETRIES {
        c.now += Duration::from_secs(3);
        assert_eq!(c.recv().unwrap().flags, SYN | ACK);
    }
    c.now += Duration::from_secs(3);
    assert_eq!(c.recv().unwrap().flags & RST, RST);
    assert_eq!(c.stack.connections(), 0);
    assert_eq!(c.stack.metrics().connections_destroyed.count(), 1);
}

#[test]
fn garbage_gets_rst_and_connections_are_bounded() {
    let mut c = Client::new(MmdsVersion::V1);
    // An ACK for no connection.
    c.send(5000, 77, 1234, ACK, b"hello");
    let rst = c.recv().unwrap();
    assert_eq!((rst.flags, rst.seq), (RST, 1234));
    // Data without ACK for no connection.
    c.send(5000, 77, 0, PSH, b"hello");
    let rst = c.recv().unwrap();
    assert_eq!((rst.flags, rst.ack), (RST | ACK, 82));
    // An RST for no connection is ignored.
    c.send(5000, 77, 0, RST, &[]);
    assert!(c.recv().is_none());

    for port in 0..MAX_CONNECTIONS as u16 + 5 {
        c.now += Duration::from_millis(1);
        c.send(6000 + port, 1, 0, SYN, &[]);
        c.recv().unwrap();
    }
    assert_eq!(c.stack.connections(), MAX_CONNECTIONS);
    let m = c.stack.metrics();
    assert_eq!(m.connections_created.count(), MAX_CONNECTIONS as u64 + 5);
    assert_eq!(m.connections_destroyed.count(), 5);
}

#[test]
fn an_oversized_request_resets_the_connection() {
    let mut c = Client::new(MmdsVersion::V1);
    let (mut seq, srv) = c.connect(4004);
    let chunk = vec![b'a'; 1000];
    let mut sent = 0;
    let mut reset = false;
    while sent <= RCV_BUF_LEN && !reset {
        c.send(4004, seq, srv, ACK, &chunk);
        seq += 1000;
        sent += 1000;
        while let Some(s) = c.recv() {
            if s.flags & RST != 0 {
                reset = true;
            } else {
                assert!(usize::from(s.window) <= RCV_BUF_LEN);
            }
        }
    }
    assert!(reset);
    assert_eq!(c.stack.connections(), 0);
}

#[test]
fn out_of_order_data_is_dropped_and_reacknowledged() {
    let mut c = Client::new(MmdsVersion::V1);
    let (seq, srv) = c.connect(4005);
    c.send(4005, seq + 5, srv, ACK, b"/ HTTP/1.1\r\n\r\n");
    let dup = c.recv().unwrap();
    assert_eq!((dup.ack, dup.payload.len()), (seq, 0));
    assert_eq!(c.stack.metrics().rx_accepted_unusual.count(), 1);
    // The missing piece, then the rest (with an overlap), completes it.
    c.send(4005, seq, srv, ACK, b"GET ");
    c.recv().unwrap();
    c.send(4005, seq + 2, srv, ACK, b"T / HTTP/1.1\r\n\r\n");
    let mut text = Vec::new();
    while let Some(s) = c.recv() {
        text.extend(s.payload);
    }
    let text = String::from_utf8(text).unwrap();
    assert!(text.ends_with("latest/"), "{text}");
}

#[test]
fn malformed_frames_are_counted_not_fatal() {
    let mut c = Client::new(MmdsVersion::V1);
    let good = frame(DEFAULT_IPV4_ADDR, 1, 1, 0, SYN, &[]);
    for len in 0..good.len() {
        c.stack.detour_frame(&good[..len], c.now);
    }
    let m = c.stack.metrics();
    assert!(m.rx_bad_eth.count() > 0);
    assert!(m.rx_accepted_err.count() > 0);
    // Non-TCP IPv4 to the service is consumed and counted as unusual.
    let mut udp = good.clone();
    udp[23] = 17;
    assert!(c.stack.detour_frame(&udp, c.now));
    assert_eq!(c.stack.metrics().rx_accepted_unusual.count(), 1);
}
