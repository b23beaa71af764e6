// SPDX-License-Identifier: Apache-2.0

//! The per-interface network stack: which frames are the service's, and
//! the frames it answers with.

use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::data_store::Mmds;
use crate::metrics::MmdsMetrics;
use crate::pdu::{
    write_ethernet_header, ArpPacket, EthernetFrame, Ipv4Packet, TcpSegment, ARP_REPLY,
    ARP_REQUEST, ETHERTYPE_ARP, ETHERTYPE_IPV4, ETH_HDR_LEN, PROTOCOL_TCP,
};
use crate::tcp::{RecvEvent, TcpServer, WriteEvent};

/// The service's default IPv4 address.
pub const DEFAULT_IPV4_ADDR: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
/// The MAC address the service answers ARP with (Firecracker's).
pub const DEFAULT_MAC_ADDR: [u8; 6] = [0x06, 0x01, 0x23, 0x45, 0x67, 0x01];
/// The service's TCP port.
pub const DEFAULT_TCP_PORT: u16 = 80;

/// The metadata service as one interface sees it.
#[derive(Debug)]
pub struct MmdsNetworkStack {
    mac: [u8; 6],
    ipv4_addr: Ipv4Addr,
    remote_mac: [u8; 6],
    pending_arp_reply: Option<Ipv4Addr>,
    tcp: TcpServer,
    mmds: Arc<Mutex<Mmds>>,
    metrics: Arc<MmdsMetrics>,
}

impl MmdsNetworkStack {
    /// A stack answering at `ipv4_addr` (default [`DEFAULT_IPV4_ADDR`]) from
    /// the store `mmds`, counting in `metrics`.
    pub fn new(
        ipv4_addr: Option<Ipv4Addr>,
        mmds: Arc<Mutex<Mmds>>,
        metrics: Arc<MmdsMetrics>,
    ) -> Self {
        let ipv4_addr = ipv4_addr.unwrap_or(DEFAULT_IPV4_ADDR);
        MmdsNetworkStack {
            mac: DEFAULT_MAC_ADDR,
            ipv4_addr,
            remote_mac: [0; 6],
            pending_arp_reply: None,
            tcp: TcpServer::new(ipv4_addr, DEFAULT_TCP_PORT),
            mmds,
            metrics,
        }
    }

    /// The service's address.
    pub fn ipv4_addr(&self) -> Ipv4Addr {
        self.ipv4_addr
    }

    /// Moves the service to `addr`.
    pub fn set_ipv4_addr(&mut self, addr: Ipv4Addr) {
        self.ipv4_addr = addr;
        self.tcp.set_local_addr(addr);
    }

    /// The store it answers from.
    pub fn mmds(&self) -> &Arc<Mutex<Mmds>> {
        &self.mmds
    }

    /// The counters.
    pub fn metrics(&self) -> &Arc<MmdsMetrics> {
        &self.metrics
    }

    /// Open TCP connections.
    pub fn connections(&self) -> usize {
        self.tcp.connections()
    }

    /// Whether `frame` (no virtio-net header) is for the service: ARP whose
    /// target address is the service's, or IPv4 to the service's address.
    /// Such a frame must not reach the TAP.
    pub fn is_mmds_frame(&self, frame: &[u8]) -> bool {
        let Ok(eth) = EthernetFrame::parse(frame) else {
            return false;
        };
        let target = self.ipv4_addr.octets();
        match eth.ethertype {
            // ARP target protocol address at offset 24.
            ETHERTYPE_ARP => eth.payload.get(24..28) == Some(&target[..]),
            // IPv4 destination address at offset 16.
            ETHERTYPE_IPV4 => eth.payload.get(16..20) == Some(&target[..]),
            _ => false,
        }
    }

    /// Takes a frame [`is_mmds_frame`](Self::is_mmds_frame) accepted;
    /// returns whether the stack could make sense of it (either way the
    /// frame is consumed).
    pub fn detour_frame(&mut self, frame: &[u8], now: Instant) -> bool {
        let Ok(eth) = EthernetFrame::parse(frame) else {
            self.metrics.rx_bad_eth.inc();
            return false;
        };
        match eth.ethertype {
            ETHERTYPE_ARP => match ArpPacket::parse(eth.payload) {
                Ok(arp) if arp.operation == ARP_REQUEST && arp.tpa == self.ipv4_addr => {
                    self.remote_mac = arp.sha;
                    self.pending_arp_reply = Some(arp.spa);
                    true
                }
                _ => {
                    self.metrics.rx_accepted_err.inc();
                    false
                }
            },
            ETHERTYPE_IPV4 => self.detour_ipv4(&eth, now),
            _ => false,
        }
    }

    fn detour_ipv4(&mut self, eth: &EthernetFrame, now: Instant) -> bool {
        let Ok(ip) = Ipv4Packet::parse(eth.payload) else {
            self.metrics.rx_accepted_err.inc();
            return false;
        };
        if ip.protocol != PROTOCOL_TCP {
            self.metrics.rx_accepted_unusual.inc();
            return true;
        }
        let Ok(seg) = TcpSegment::parse(ip.payload) else {
            self.metrics.rx_accepted_err.inc();
            return false;
        };
        self.remote_mac = eth.src;
        let (mmds, metrics) = (&self.mmds, &self.metrics);
        let mut respond =
            |request: &[u8]| crate::http::respond(mmds, metrics, request, now).to_bytes();
        let event = self.tcp.receive(ip.src, &seg, now, &mut respond);
        self.metrics.rx_count.inc();
        match event {
            RecvEvent::Accepted => {}
            RecvEvent::NewConnection => self.metrics.connections_created.inc(),
            RecvEvent::NewConnectionReplacing => {
                self.metrics.connections_created.inc();
                self.metrics.connections_destroyed.inc();
            }
            RecvEvent::ConnectionDone => self.metrics.connections_destroyed.inc(),
            RecvEvent::Unusual => self.metrics.rx_accepted_unusual.inc(),
        }
        true
    }

    /// Whether a frame is ready for [`write_next_frame`](Self::write_next_frame).
    pub fn has_frame(&self, now: Instant) -> bool {
        self.pending_arp_reply.is_some() || self.tcp.has_segment(now)
    }

    /// When a retransmission falls due, if any is pending: the caller
    /// should call [`write_next_frame`](Self::write_next_frame) then.
    pub fn next_timeout(&self) -> Option<Instant> {
        self.tcp.next_timeout()
    }

    /// Writes the next frame for the guest (no virtio-net header) to `buf`;
    /// returns its length, or `None` when there is nothing to send (or
    /// `buf` is too small, counted in `tx_errors`).
    pub fn write_next_frame(&mut self, buf: &mut [u8], now: Instant) -> Option<usize> {
        if let Some(dest) = self.pending_arp_reply {
            let reply = ArpPacket {
                operation: ARP_REPLY,
                sha: self.mac,
                spa: self.ipv4_addr,
                tha: self.remote_mac,
                tpa: dest,
            };
            let written = write_ethernet_header(buf, self.remote_mac, self.mac, ETHERTYPE_ARP)
                .and_then(|()| reply.write(&mut buf[ETH_HDR_LEN..]));
            return match written {
                Ok(len) => {
                    self.pending_arp_reply = None;
                    self.metrics.tx_count.inc();
                    Some(ETH_HDR_LEN + len)
                }
                Err(_) => {
                    self.metrics.tx_errors.inc();
                    None
                }
            };
        }
        let written = write_ethernet_header(buf, self.remote_mac, self.mac, ETHERTYPE_IPV4)
            .and_then(|()| self.tcp.write_next(&mut buf[ETH_HDR_LEN..], now));
        match written {
            Ok(Some((len, event))) => {
                self.metrics.tx_count.inc();
                if event == WriteEvent::ConnectionReset {
                    self.metrics.connections_destroyed.inc();
                }
                Some(ETH_HDR_LEN + len)
            }
            Ok(None) => None,
            Err(_) => {
                self.metrics.tx_errors.inc();
                None
            }
        }
    }
}
