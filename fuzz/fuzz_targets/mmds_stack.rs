// SPDX-License-Identifier: Apache-2.0

//! Fuzzes the metadata service's guest-facing stack: `ember_mmds::
//! MmdsNetworkStack::{is_mmds_frame, detour_frame, write_next_frame}`, the
//! calls the network device makes for every frame the guest sends, with
//! the HTTP handler behind it, and `ember_mmds::http::respond` directly.
//!
//! The input is a list of operations, each starting with an op byte:
//! - 0: a raw frame: `len: u16` (mod 2048) then that many bytes;
//! - 1: time passes: `ms: u16`;
//! - 2: the device drains every frame the stack has for the guest;
//! - 3: a TCP segment to the service built from `port: u8`, `seq: u32`,
//!   `ack_delta: u16` (added to the last sequence number the stack sent,
//!   so the segment can hit the live window), `flags: u8`, `len: u8` and
//!   that many payload bytes (drawn from a few HTTP requests when the
//!   length's top bit is set);
//! - 4: an ARP request for the service;
//! - 5: a raw HTTP request for `respond`: `len: u8` then its bytes.
//!
//! Checked: no panic, no hang; every frame written fits the buffer and
//! parses as Ethernet carrying ARP or IPv4/TCP from the service; the open
//! connections and the frames written per drain stay bounded.

#![no_main]

use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ember_mmds::pdu::{
    write_ethernet_header, write_ipv4_header, ArpPacket, EthernetFrame, Ipv4Packet, TcpSegment,
    ARP_REQUEST, ETHERTYPE_ARP, ETHERTYPE_IPV4, PROTOCOL_TCP,
};
use ember_mmds::tcp::MAX_CONNECTIONS;
use ember_mmds::{Mmds, MmdsMetrics, MmdsNetworkStack, MmdsVersion, DEFAULT_IPV4_ADDR};
use libfuzzer_sys::fuzz_target;

const GUEST_MAC: [u8; 6] = [6, 0, 0, 0, 0, 2];
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(172, 16, 0, 2);
const REQUESTS: [&[u8]; 4] = [
    b"GET /latest/meta-data/ HTTP/1.1\r\nAccept: application/json\r\n\r\n",
    b"PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 5\r\n\r\n",
    b"GET /a HTTP/1.0\r\n\r\n",
    b"GET / HTTP/1.1\r\nX-metadata-token: 00\r\n\r\n",
];

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let n = N.min(self.0.len());
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        out
    }
    fn u8(&mut self) -> u8 {
        self.bytes::<1>()[0]
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.bytes())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.bytes())
    }
    fn take(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Reader(data);
    let cfg = input.u8();
    let mut mmds = Mmds::new(4096);
    if cfg & 1 != 0 {
        mmds.set_version(MmdsVersion::V2);
    }
    mmds.set_imds_compat(cfg & 2 != 0);
    mmds.put_data(serde_json::json!({"latest": {"meta-data": {"id": "i-1", "n": 3}}, "a": "x".repeat(3000)}))
        .unwrap();
    let mmds = Arc::new(Mutex::new(mmds));
    let metrics = Arc::new(MmdsMetrics::default());
    let mut stack = MmdsNetworkStack::new(None, mmds.clone(), metrics.clone());
    let mut now = Instant::now();
    let mut last_seq = 0u32;
    let mut out = [0u8; 1600];

    let mut ops = 0;
    while !input.0.is_empty() && ops < 512 {
        ops += 1;
        match input.u8() % 6 {
            0 => {
                let len = usize::from(input.u16() % 2048);
                let frame = input.take(len).to_vec();
                if stack.is_mmds_frame(&frame) {
                    stack.detour_frame(&frame, now);
                }
            }
            1 => now += Duration::from_millis(u64::from(input.u16())),
            2 => {
                let mut frames = 0;
                while let Some(len) = stack.write_next_frame(&mut out, now) {
                    frames += 1;
                    assert!(frames <= 10_000, "the stack does not run dry");
                    assert!(len <= out.len());
                    let eth = EthernetFrame::parse(&out[..len]).expect("ethernet");
                    match eth.ethertype {
                        ETHERTYPE_ARP => {
                            ArpPacket::parse(eth.payload).expect("arp");
                        }
                        ETHERTYPE_IPV4 => {
                            let ip = Ipv4Packet::parse(eth.payload).expect("ipv4");
                            assert_eq!(ip.src, DEFAULT_IPV4_ADDR);
                            let seg = TcpSegment::parse(ip.payload).expect("tcp");
                            last_seq = seg.seq.wrapping_add(seg.payload.len() as u32);
                        }
                        other => panic!("ethertype {other:#x}"),
                    }
                }
            }
            3 => {
                let port = 1000 + u16::from(input.u8() % 40);
                let seq = input.u32();
                let ack = last_seq.wrapping_add(u32::from(input.u16()));
                let flags = input.u8();
                let len = input.u8();
                let payload = if len & 0x80 != 0 {
                    REQUESTS[usize::from(len) % REQUESTS.len()].to_vec()
                } else {
                    input.take(usize::from(len)).to_vec()
                };
                let mut buf = vec![0u8; 1600];
                write_ethernet_header(&mut buf, [0; 6], GUEST_MAC, ETHERTYPE_IPV4).unwrap();
                let seg = TcpSegment {
                    src_port: port,
                    dst_port: 80,
                    seq,
                    ack,
                    flags,
                    window: 4096,
                    mss: None,
                    payload: &payload,
                };
                let n = seg.write(&mut buf[34..], GUEST_IP, DEFAULT_IPV4_ADDR).unwrap();
                write_ipv4_header(&mut buf[14..], GUEST_IP, DEFAULT_IPV4_ADDR, PROTOCOL_TCP, n)
                    .unwrap();
                buf.truncate(34 + n);
                assert!(stack.is_mmds_frame(&buf));
                stack.detour_frame(&buf, now);
            }
            4 => {
                let mut buf = vec![0u8; 42];
                write_ethernet_header(&mut buf, [0xff; 6], GUEST_MAC, ETHERTYPE_ARP).unwrap();
                let arp = ArpPacket {
                    operation: ARP_REQUEST,
                    sha: GUEST_MAC,
                    spa: GUEST_IP,
                    tha: [0; 6],
                    tpa: DEFAULT_IPV4_ADDR,
                };
                arp.write(&mut buf[14..]).unwrap();
                assert!(stack.is_mmds_frame(&buf));
                assert!(stack.detour_frame(&buf, now));
            }
            _ => {
                let len = usize::from(input.u8());
                let request = input.take(len).to_vec();
                let r = ember_mmds::http::respond(&mmds, &metrics, &request, now);
                assert!((200..600).contains(&r.status));
            }
        }
        assert!(stack.connections() <= MAX_CONNECTIONS);
    }
});
