// SPDX-License-Identifier: Apache-2.0

//! Parsers and writers for the protocol data units the metadata service
//! speaks: Ethernet II frames (IEEE 802.3 §3.1), ARP for IPv4 over Ethernet
//! (RFC 826), IPv4 headers (RFC 791) and TCP segments (RFC 9293 §3.1).
//!
//! Every parser takes untrusted bytes, checks each length before using it,
//! and returns a [`PduError`] naming what was wrong; none panics. The
//! writers fill a caller's buffer and fail with [`PduError::BufferTooSmall`]
//! rather than write past it.

use std::net::Ipv4Addr;

/// EtherType of ARP.
pub const ETHERTYPE_ARP: u16 = 0x0806;
/// EtherType of IPv4.
pub const ETHERTYPE_IPV4: u16 = 0x0800;
/// Length of an Ethernet II header.
pub const ETH_HDR_LEN: usize = 14;
/// Length of an ARP packet for IPv4 over Ethernet.
pub const ARP_LEN: usize = 28;
/// Length of an IPv4 header without options.
pub const IPV4_HDR_LEN: usize = 20;
/// Length of a TCP header without options.
pub const TCP_HDR_LEN: usize = 20;
/// IPv4 protocol number of TCP.
pub const PROTOCOL_TCP: u8 = 6;
/// ARP operation: request.
pub const ARP_REQUEST: u16 = 1;
/// ARP operation: reply.
pub const ARP_REPLY: u16 = 2;

/// TCP flag FIN.
pub const FIN: u8 = 0x01;
/// TCP flag SYN.
pub const SYN: u8 = 0x02;
/// TCP flag RST.
pub const RST: u8 = 0x04;
/// TCP flag PSH.
pub const PSH: u8 = 0x08;
/// TCP flag ACK.
pub const ACK: u8 = 0x10;

/// What was wrong with a unit, or with the buffer given to a writer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PduError {
    /// Fewer bytes than the header needs.
    #[error("{what}: {len} bytes, at least {need} needed")]
    Truncated {
        /// The unit.
        what: &'static str,
        /// Bytes available.
        len: usize,
        /// Bytes needed.
        need: usize,
    },
    /// An ARP packet that is not IPv4 over Ethernet.
    #[error("ARP: hardware type {htype}, protocol {ptype:#06x}, lengths {hlen}/{plen}: not IPv4 over Ethernet")]
    ArpFormat {
        /// Hardware type.
        htype: u16,
        /// Protocol type.
        ptype: u16,
        /// Hardware address length.
        hlen: u8,
        /// Protocol address length.
        plen: u8,
    },
    /// An IPv4 header with a bad version or header length.
    #[error("IPv4: version {version}, header length {ihl} words")]
    Ipv4Header {
        /// The version field.
        version: u8,
        /// The IHL field.
        ihl: u8,
    },
    /// An IPv4 total length outside [header length, bytes received].
    #[error("IPv4: total length {total} with a {header}-byte header in {len} bytes")]
    Ipv4Length {
        /// Total length field.
        total: usize,
        /// Header length.
        header: usize,
        /// Bytes received.
        len: usize,
    },
    /// A fragment (the service does not reassemble).
    #[error("IPv4: fragment (flags and offset {0:#06x})")]
    Fragment(u16),
    /// A TCP data offset outside [5 words, segment length].
    #[error("TCP: data offset {offset} words in a {len}-byte segment")]
    TcpOffset {
        /// Data offset, in 32-bit words.
        offset: u8,
        /// Segment length.
        len: usize,
    },
    /// A TCP option whose length runs past the header.
    #[error("TCP: malformed option {kind} at offset {at}")]
    TcpOption {
        /// Option kind.
        kind: u8,
        /// Offset in the options.
        at: usize,
    },
    /// The output buffer is too small.
    #[error("output buffer of {len} bytes, {need} needed")]
    BufferTooSmall {
        /// Buffer length.
        len: usize,
        /// Bytes needed.
        need: usize,
    },
}

fn need(what: &'static str, buf: &[u8], need: usize) -> Result<(), PduError> {
    if buf.len() < need {
        return Err(PduError::Truncated {
            what,
            len: buf.len(),
            need,
        });
    }
    Ok(())
}

fn room(buf: &[u8], need: usize) -> Result<(), PduError> {
    if buf.len() < need {
        return Err(PduError::BufferTooSmall {
            len: buf.len(),
            need,
        });
    }
    Ok(())
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn mac_at(b: &[u8], at: usize) -> [u8; 6] {
    let mut m = [0u8; 6];
    m.copy_from_slice(&b[at..at + 6]);
    m
}

fn ip_at(b: &[u8], at: usize) -> Ipv4Addr {
    Ipv4Addr::new(b[at], b[at + 1], b[at + 2], b[at + 3])
}

/// The Internet checksum (RFC 1071) of `data`, continuing from `sum`.
fn sum16(mut sum: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    sum
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet II frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EthernetFrame<'a> {
    /// Destination MAC.
    pub dst: [u8; 6],
    /// Source MAC.
    pub src: [u8; 6],
    /// EtherType.
    pub ethertype: u16,
    /// What follows the header.
    pub payload: &'a [u8],
}

impl<'a> EthernetFrame<'a> {
    /// Parses a frame.
    pub fn parse(buf: &'a [u8]) -> Result<Self, PduError> {
        need("Ethernet", buf, ETH_HDR_LEN)?;
        Ok(EthernetFrame {
            dst: mac_at(buf, 0),
            src: mac_at(buf, 6),
            ethertype: be16(buf, 12),
            payload: &buf[ETH_HDR_LEN..],
        })
    }
}

/// Writes an Ethernet II header at the start of `buf`.
pub fn write_ethernet_header(
    buf: &mut [u8],
    dst: [u8; 6],
    src: [u8; 6],
    ethertype: u16,
) -> Result<(), PduError> {
    room(buf, ETH_HDR_LEN)?;
    buf[0..6].copy_from_slice(&dst);
    buf[6..12].copy_from_slice(&src);
    buf[12..14].copy_from_slice(&ethertype.to_be_bytes());
    Ok(())
}

/// An ARP packet for IPv4 over Ethernet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArpPacket {
    /// [`ARP_REQUEST`] or [`ARP_REPLY`] (other values are parsed as they are).
    pub operation: u16,
    /// Sender hardware address.
    pub sha: [u8; 6],
    /// Sender protocol address.
    pub spa: Ipv4Addr,
    /// Target hardware address.
    pub tha: [u8; 6],
    /// Target protocol address.
    pub tpa: Ipv4Addr,
}

impl ArpPacket {
    /// Parses an ARP packet, refusing anything but IPv4 over Ethernet.
    pub fn parse(buf: &[u8]) -> Result<Self, PduError> {
        need("ARP", buf, ARP_LEN)?;
        let (htype, ptype, hlen, plen) = (be16(buf, 0), be16(buf, 2), buf[4], buf[5]);
        if htype != 1 || ptype != ETHERTYPE_IPV4 || hlen != 6 || plen != 4 {
            return Err(PduError::ArpFormat {
                htype,
                ptype,
                hlen,
                plen,
            });
        }
        Ok(ArpPacket {
            operation: be16(buf, 6),
            sha: mac_at(buf, 8),
            spa: ip_at(buf, 14),
            tha: mac_at(buf, 18),
            tpa: ip_at(buf, 24),
        })
    }

    /// Writes the packet at the start of `buf`; returns its length.
    pub fn write(&self, buf: &mut [u8]) -> Result<usize, PduError> {
        room(buf, ARP_LEN)?;
        buf[0..2].copy_from_slice(&1u16.to_be_bytes());
        buf[2..4].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        buf[4] = 6;
        buf[5] = 4;
        buf[6..8].copy_from_slice(&self.operation.to_be_bytes());
        buf[8..14].copy_from_slice(&self.sha);
        buf[14..18].copy_from_slice(&self.spa.octets());
        buf[18..24].copy_from_slice(&self.tha);
        buf[24..28].copy_from_slice(&self.tpa.octets());
        Ok(ARP_LEN)
    }
}

/// An IPv4 packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Packet<'a> {
    /// Source address.
    pub src: Ipv4Addr,
    /// Destination address.
    pub dst: Ipv4Addr,
    /// Protocol number.
    pub protocol: u8,
    /// The payload, cut at the total length (Ethernet padding removed).
    pub payload: &'a [u8],
}

impl<'a> Ipv4Packet<'a> {
    /// Parses an unfragmented IPv4 packet. The header checksum is not
    /// checked: the packet comes from guest memory, where no link can
    /// corrupt it, and a guest offloading checksums may leave it unset.
    pub fn parse(buf: &'a [u8]) -> Result<Self, PduError> {
        need("IPv4", buf, IPV4_HDR_LEN)?;
        let (version, ihl) = (buf[0] >> 4, buf[0] & 0xf);
        if version != 4 || ihl < 5 {
            return Err(PduError::Ipv4Header { version, ihl });
        }
        let header = usize::from(ihl) * 4;
        let total = usize::from(be16(buf, 2));
        if total < header || total > buf.len() {
            return Err(PduError::Ipv4Length {
                total,
                header,
                len: buf.len(),
            });
        }
        // More-fragments flag or a fragment offset.
        let frag = be16(buf, 6);
        if frag & 0x3fff != 0 {
            return Err(PduError::Fragment(frag));
        }
        Ok(Ipv4Packet {
            src: ip_at(buf, 12),
            dst: ip_at(buf, 16),
            protocol: buf[9],
            payload: &buf[header..total],
        })
    }
}

/// Writes a 20-byte IPv4 header (TTL 64, don't fragment) for a payload of
/// `payload_len` bytes at the start of `buf`.
pub fn write_ipv4_header(
    buf: &mut [u8],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: u8,
    payload_len: usize,
) -> Result<(), PduError> {
    room(buf, IPV4_HDR_LEN)?;
    let total =
        u16::try_from(IPV4_HDR_LEN + payload_len).map_err(|_| PduError::BufferTooSmall {
            len: usize::from(u16::MAX),
            need: IPV4_HDR_LEN + payload_len,
        })?;
    let h = &mut buf[..IPV4_HDR_LEN];
    h[0] = 0x45;
    h[1] = 0;
    h[2..4].copy_from_slice(&total.to_be_bytes());
    h[4..6].copy_from_slice(&0u16.to_be_bytes());
    h[6..8].copy_from_slice(&0x4000u16.to_be_bytes());
    h[8] = 64;
    h[9] = protocol;
    h[10..12].copy_from_slice(&[0, 0]);
    h[12..16].copy_from_slice(&src.octets());
    h[16..20].copy_from_slice(&dst.octets());
    let csum = fold(sum16(0, h));
    h[10..12].copy_from_slice(&csum.to_be_bytes());
    Ok(())
}

/// A TCP segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpSegment<'a> {
    /// Source port.
    pub src_port: u16,
    /// Destination port.
    pub dst_port: u16,
    /// Sequence number.
    pub seq: u32,
    /// Acknowledgment number.
    pub ack: u32,
    /// Flags ([`FIN`], [`SYN`], [`RST`], [`PSH`], [`ACK`], ...).
    pub flags: u8,
    /// Receive window.
    pub window: u16,
    /// The maximum segment size option, if present.
    pub mss: Option<u16>,
    /// Data.
    pub payload: &'a [u8],
}

impl<'a> TcpSegment<'a> {
    /// Parses a segment and its MSS option. The checksum is not checked,
    /// for the reason given at [`Ipv4Packet::parse`].
    pub fn parse(buf: &'a [u8]) -> Result<Self, PduError> {
        need("TCP", buf, TCP_HDR_LEN)?;
        let offset = buf[12] >> 4;
        let header = usize::from(offset) * 4;
        if offset < 5 || header > buf.len() {
            return Err(PduError::TcpOffset {
                offset,
                len: buf.len(),
            });
        }
        let options = &buf[TCP_HDR_LEN..header];
        let mut mss = None;
        let mut at = 0;
        while at < options.len() {
            let kind = options[at];
            match kind {
                0 => break,
                1 => at += 1,
                _ => {
                    let len = usize::from(
                        *options
                            .get(at + 1)
                            .ok_or(PduError::TcpOption { kind, at })?,
                    );
                    if len < 2 || at + len > options.len() {
                        return Err(PduError::TcpOption { kind, at });
                    }
                    if kind == 2 {
                        if len != 4 {
                            return Err(PduError::TcpOption { kind, at });
                        }
                        mss = Some(be16(options, at + 2));
                    }
                    at += len;
                }
            }
        }
        Ok(TcpSegment {
            src_port: be16(buf, 0),
            dst_port: be16(buf, 2),
            seq: be32(buf, 4),
            ack: be32(buf, 8),
            flags: buf[13],
            window: be16(buf, 14),
            mss,
            payload: &buf[header..],
        })
    }

    /// Sequence space the segment occupies: its data, plus one for SYN and
    /// one for FIN.
    pub fn seq_len(&self) -> u32 {
        // A segment comes from a packet of at most 64 KiB.
        self.payload.len() as u32
            + u32::from(self.flags & SYN != 0)
            + u32::from(self.flags & FIN != 0)
    }

    /// Writes the segment (with its MSS option when set) and its checksum
    /// over the IPv4 pseudo-header at the start of `buf`; returns its length.
    pub fn write(&self, buf: &mut [u8], src: Ipv4Addr, dst: Ipv4Addr) -> Result<usize, PduError> {
        let header = TCP_HDR_LEN + if self.mss.is_some() { 4 } else { 0 };
        let len = header + self.payload.len();
        room(buf, len)?;
        let s = &mut buf[..len];
        s[0..2].copy_from_slice(&self.src_port.to_be_bytes());
        s[2..4].copy_from_slice(&self.dst_port.to_be_bytes());
        s[4..8].copy_from_slice(&self.seq.to_be_bytes());
        s[8..12].copy_from_slice(&self.ack.to_be_bytes());
        s[12] = ((header / 4) as u8) << 4;
        s[13] = self.flags;
        s[14..16].copy_from_slice(&self.window.to_be_bytes());
        s[16..20].copy_from_slice(&[0, 0, 0, 0]);
        if let Some(mss) = self.mss {
            s[20] = 2;
            s[21] = 4;
            s[22..24].copy_from_slice(&mss.to_be_bytes());
        }
        s[header..].copy_from_slice(self.payload);
        let mut sum = sum16(0, &src.octets());
        sum = sum16(sum, &dst.octets());
        sum += u32::from(PROTOCOL_TCP);
        sum += len as u32;
        let csum = fold(sum16(sum, s));
        s[16..18].copy_from_slice(&csum.to_be_bytes());
        Ok(len)
    }
}

/// Whether the IPv4 header checksum of `header` is right.
pub fn ipv4_checksum_ok(header: &[u8]) -> bool {
    fold(sum16(0, header)) == 0
}

/// Whether the TCP checksum of `segment` between `src` and `dst` is right.
pub fn tcp_checksum_ok(segment: &[u8], src: Ipv4Addr, dst: Ipv4Addr) -> bool {
    let mut sum = sum16(0, &src.octets());
    sum = sum16(sum, &dst.octets());
    sum += u32::from(PROTOCOL_TCP);
    sum += segment.len() as u32;
    fold(sum16(sum, segment)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
    const B: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

    #[test]
    fn ethernet_round_trip_and_truncation() {
        let mut buf = [0u8; 20];
        write_ethernet_header(&mut buf, [1; 6], [2; 6], ETHERTYPE_ARP).unwrap();
        let f = EthernetFrame::parse(&buf).unwrap();
        assert_eq!(
            (f.dst, f.src, f.ethertype, f.payload.len()),
            ([1; 6], [2; 6], ETHERTYPE_ARP, 6)
        );
        assert_eq!(
            EthernetFrame::parse(&buf[..13]),
            Err(PduError::Truncated {
                what: "Ethernet",
                len: 13,
                need: 14
            })
        );
        assert!(write_ethernet_header(&mut buf[..10], [0; 6], [0; 6], 0).is_err());
    }

    #[test]
    fn arp_round_trip_and_format_checks() {
        let p = ArpPacket {
            operation: ARP_REQUEST,
            sha: [3; 6],
            spa: A,
            tha: [0; 6],
            tpa: B,
        };
        let mut buf = [0u8; 28];
        assert_eq!(p.write(&mut buf).unwrap(), 28);
        assert_eq!(ArpPacket::parse(&buf).unwrap(), p);
        buf[5] = 16;
        assert!(matches!(
            ArpPacket::parse(&buf),
            Err(PduError::ArpFormat { plen: 16, .. })
        ));
        assert!(ArpPacket::parse(&buf[..27]).is_err());
    }

    #[test]
    fn ipv4_round_trip_checksum_and_checks() {
        let mut buf = [0u8; 64];
        write_ipv4_header(&mut buf, A, B, PROTOCOL_TCP, 10).unwrap();
        assert!(ipv4_checksum_ok(&buf[..20]));
        let p = Ipv4Packet::parse(&buf).unwrap();
        assert_eq!(
            (p.src, p.dst, p.protocol, p.payload.len()),
            (A, B, PROTOCOL_TCP, 10)
        );
        let mut bad = buf;
        bad[0] = 0x44;
        assert!(matches!(
            Ipv4Packet::parse(&bad),
            Err(PduError::Ipv4Header { ihl: 4, .. })
        ));
        assert!(matches!(
            Ipv4Packet::parse(&buf[..25]),
            Err(PduError::Ipv4Length { total: 30, .. })
        ));
        let mut frag = buf;
        frag[6] = 0x20;
        assert!(matches!(
            Ipv4Packet::parse(&frag),
            Err(PduError::Fragment(0x2000))
        ));
    }

    #[test]
    fn tcp_round_trip_checksum_and_options() {
        let seg = TcpSegment {
            src_port: 80,
            dst_port: 4000,
            seq: 7,
            ack: 9,
            flags: SYN | ACK,
            window: 2500,
            mss: Some(1460),
            payload: b"hey",
        };
        let mut buf = [0u8; 64];
        let len = seg.write(&mut buf, B, A).unwrap();
        assert_eq!(len, 27);
        assert!(tcp_checksum_ok(&buf[..len], B, A));
        assert!(!tcp_checksum_ok(&buf[..len], A, A));
        assert_eq!(TcpSegment::parse(&buf[..len]).unwrap(), seg);
        assert_eq!(seg.seq_len(), 4);
        // An option running past the header.
        let mut bad = buf;
        bad[21] = 9;
        assert!(matches!(
            TcpSegment::parse(&bad[..len]),
            Err(PduError::TcpOption { kind: 2, .. })
        ));
        let mut bad = buf;
        bad[12] = 0x40;
        assert!(matches!(
            TcpSegment::parse(&bad[..len]),
            Err(PduError::TcpOffset { offset: 4, .. })
        ));
        bad[12] = 0xf0;
        assert!(TcpSegment::parse(&bad[..len]).is_err());
        assert!(seg.write(&mut buf[..26], B, A).is_err());
    }
}
