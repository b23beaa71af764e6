// SPDX-License-Identifier: Apache-2.0

//! Vsock packets as they travel through the virtqueues (virtio 1.2 §5.10.6).
//!
//! Every buffer the driver places in the TX or RX queue starts with a
//! 44-byte little-endian [`VsockHeader`]; a data packet (`OP_RW`) carries
//! `len` bytes of payload right after it. The header and the payload may be
//! split over any number of descriptors (Linux puts them in two descriptors
//! on TX and in one on RX), so both are located by byte offset in the chain.
//!
//! [`TxPacket::parse`] and [`RxBuffer::parse`] validate everything the driver
//! wrote before the device touches a byte: the direction of every descriptor
//! (TX buffers are device-readable, RX buffers device-writable), that every
//! descriptor lies inside guest memory, that the chain holds a header, and,
//! for TX, that `len` is at most [`MAX_PKT_BUF_SIZE`] and fits in the chain.
//! They never panic and never return a slice outside guest memory.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use virtio_queue::DescriptorChain;
use vm_memory::bitmap::{Bitmap, BitmapSlice};
use vm_memory::volatile_memory::PtrGuardMut;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, VolatileSlice};

/// Size of `struct virtio_vsock_hdr` (virtio 1.2 §5.10.6).
pub const HEADER_SIZE: usize = 44;
/// Largest payload of one packet, in either direction (Firecracker's
/// `MAX_PKT_BUF_SIZE`). A TX packet announcing more is malformed; an RX
/// buffer larger than the header plus this is only filled up to it.
pub const MAX_PKT_BUF_SIZE: usize = 64 * 1024;

/// `VIRTIO_VSOCK_TYPE_STREAM`: the only socket type this device handles.
pub const TYPE_STREAM: u16 = 1;

/// `VIRTIO_VSOCK_OP_REQUEST`: connection request.
pub const OP_REQUEST: u16 = 1;
/// `VIRTIO_VSOCK_OP_RESPONSE`: connection accepted.
pub const OP_RESPONSE: u16 = 2;
/// `VIRTIO_VSOCK_OP_RST`: connection reset (refused, or torn down).
pub const OP_RST: u16 = 3;
/// `VIRTIO_VSOCK_OP_SHUTDOWN`: the sender stops receiving and/or sending.
pub const OP_SHUTDOWN: u16 = 4;
/// `VIRTIO_VSOCK_OP_RW`: stream data.
pub const OP_RW: u16 = 5;
/// `VIRTIO_VSOCK_OP_CREDIT_UPDATE`: the sender's buffer space changed.
pub const OP_CREDIT_UPDATE: u16 = 6;
/// `VIRTIO_VSOCK_OP_CREDIT_REQUEST`: asks the peer for a credit update.
pub const OP_CREDIT_REQUEST: u16 = 7;

/// `VIRTIO_VSOCK_SHUTDOWN_F_RECEIVE` (OP_SHUTDOWN flag): the sender will
/// receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// `VIRTIO_VSOCK_SHUTDOWN_F_SEND` (OP_SHUTDOWN flag): the sender will send no
/// more data.
pub const SHUTDOWN_SEND: u32 = 2;

/// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`: the `id` of the only event of the
/// event queue (virtio 1.2 §5.10.6.5).
pub const EVENT_TRANSPORT_RESET: u32 = 0;
/// Size of `struct virtio_vsock_event` (one le32 `id`).
pub const EVENT_SIZE: usize = 4;

/// Most descriptors a chain may have: the queue size (virtio 1.2
/// §2.7.5.3.1). virtio-queue alone would follow a looping indirect table
/// for up to 65535 descriptors.
pub const MAX_CHAIN_DESCRIPTORS: usize = crate::QUEUE_SIZE as usize;

/// Why a descriptor chain is not a usable vsock buffer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    /// The chain has more descriptors than the queue has entries.
    #[error("the descriptor chain has more than {MAX_CHAIN_DESCRIPTORS} descriptors")]
    ChainTooLong,
    /// A TX chain has a device-writable descriptor (virtio 1.2 §5.10.6.2:
    /// the driver fills TX buffers, the device only reads them).
    #[error("TX descriptor {index} of the chain is device-writable; TX buffers must be read-only")]
    WritableInTx {
        /// Position of the descriptor in the chain.
        index: usize,
    },
    /// An RX chain has a device-readable descriptor.
    #[error("RX descriptor {index} of the chain is device-readable; RX buffers must be writable")]
    ReadableInRx {
        /// Position of the descriptor in the chain.
        index: usize,
    },
    /// A descriptor points (partly) outside guest memory.
    #[error("descriptor {index} ({len} bytes at {addr:#x}) is not inside guest memory")]
    OutsideMemory {
        /// Position of the descriptor in the chain.
        index: usize,
        /// Guest physical address.
        addr: u64,
        /// Length in bytes.
        len: u32,
    },
    /// The chain cannot hold a packet header.
    #[error("descriptor chain holds {0} bytes, less than the {HEADER_SIZE}-byte packet header")]
    HeaderTooShort(usize),
    /// The header's `len` is larger than [`MAX_PKT_BUF_SIZE`].
    #[error("packet length {0} exceeds the {MAX_PKT_BUF_SIZE}-byte maximum")]
    PayloadTooLarge(u32),
    /// The header's `len` is larger than the chain's bytes after the header.
    #[error("packet length {len} exceeds the {available} bytes the chain holds after the header")]
    PayloadExceedsBuffer {
        /// The header's `len`.
        len: u32,
        /// Bytes after the header in the chain.
        available: usize,
    },
}

/// `struct virtio_vsock_hdr` (virtio 1.2 §5.10.6), decoded. All fields are
/// little-endian on the wire.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VsockHeader {
    /// Source context ID.
    pub src_cid: u64,
    /// Destination context ID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length in bytes.
    pub len: u32,
    /// Socket type ([`TYPE_STREAM`]).
    pub type_: u16,
    /// Operation (`OP_*`).
    pub op: u16,
    /// Operation flags (`SHUTDOWN_*` for [`OP_SHUTDOWN`]).
    pub flags: u32,
    /// Total receive buffer space of the sender for this connection.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from that buffer so far (wrapping).
    pub fwd_cnt: u32,
}

fn le_u16(b: &[u8; HEADER_SIZE], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le_u32(b: &[u8; HEADER_SIZE], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le_u64(b: &[u8; HEADER_SIZE], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

impl VsockHeader {
    /// Decodes a header from its wire format.
    pub fn from_bytes(bytes: &[u8; HEADER_SIZE]) -> Self {
        // Field offsets of the packed struct virtio_vsock_hdr.
        VsockHeader {
            src_cid: le_u64(bytes, 0),
            dst_cid: le_u64(bytes, 8),
            src_port: le_u32(bytes, 16),
            dst_port: le_u32(bytes, 20),
            len: le_u32(bytes, 24),
            type_: le_u16(bytes, 28),
            op: le_u16(bytes, 30),
            flags: le_u32(bytes, 32),
            buf_alloc: le_u32(bytes, 36),
            fwd_cnt: le_u32(bytes, 40),
        }
    }

    /// Decodes the header at the start of `bytes`.
    ///
    /// ```
    /// use ember_vsock::packet::{PacketError, VsockHeader, HEADER_SIZE, OP_RW};
    ///
    /// let hdr = VsockHeader { src_cid: 3, dst_cid: 2, op: OP_RW, len: 5, ..Default::default() };
    /// assert_eq!(VsockHeader::parse(&hdr.to_bytes()), Ok(hdr));
    /// assert_eq!(VsockHeader::parse(&[0; 10]), Err(PacketError::HeaderTooShort(10)));
    /// ```
    pub fn parse(bytes: &[u8]) -> Result<Self, PacketError> {
        bytes
            .get(..HEADER_SIZE)
            .and_then(|b| <&[u8; HEADER_SIZE]>::try_from(b).ok())
            .map(Self::from_bytes)
            .ok_or(PacketError::HeaderTooShort(bytes.len()))
    }

    /// Encodes the header in its wire format.
    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// The guest memory of a descriptor chain, in chain order, resolved to host
/// slices (a descriptor that straddles two memory regions gives two slices).
struct Segments<'a> {
    slices: Vec<VolatileSlice<'a>>,
    total: usize,
}

impl<'a> Segments<'a> {
    /// Resolves every descriptor of `chain`, which must all be
    /// device-writable (`writable`) or all device-readable.
    fn collect(
        mem: &'a GuestMemoryMmap,
        chain: DescriptorChain<&'a GuestMemoryMmap>,
        writable: bool,
    ) -> Result<Self, PacketError> {
        let mut slices = Vec::new();
        let mut total = 0usize;
        for (index, desc) in chain.enumerate() {
            if index >= MAX_CHAIN_DESCRIPTORS {
                return Err(PacketError::ChainTooLong);
            }
            if desc.is_write_only() != writable {
                return Err(if writable {
                    PacketError::ReadableInRx { index }
                } else {
                    PacketError::WritableInTx { index }
                });
            }
            let outside = PacketError::OutsideMemory {
                index,
                addr: desc.addr().0,
                len: desc.len(),
            };
            let len = desc.len() as usize;
            let mut covered = 0usize;
            for slice in GuestMemoryBackend::get_slices(mem, desc.addr(), len) {
                let slice = slice.map_err(|_| outside.clone())?;
                covered += slice.len();
                slices.push(slice);
            }
            if covered != len {
                return Err(outside);
            }
            // DescriptorChain stops before a chain exceeds 4 GiB (virtio 1.2
            // §2.7.5.2), so this cannot overflow a 64-bit usize.
            total = total.saturating_add(len);
        }
        Ok(Segments { slices, total })
    }

    /// The slices covering `[offset, offset + len)` of the chain, clamped to
    /// its end.
    fn range(&self, offset: usize, len: usize) -> Vec<VolatileSlice<'a>> {
        let mut out = Vec::new();
        let mut skip = offset;
        let mut want = len;
        for slice in &self.slices {
            if want == 0 {
                break;
            }
            if skip >= slice.len() {
                skip -= slice.len();
                continue;
            }
            let take = want.min(slice.len() - skip);
            // In bounds: skip < slice.len() and take <= slice.len() - skip.
            if let Ok(part) = slice.subslice(skip, take) {
                out.push(part);
            }
            skip = 0;
            want -= take;
        }
        out
    }

    /// Copies the first `dst.len()` bytes of the chain into `dst`; returns
    /// how many were available.
    fn read_prefix(&self, dst: &mut [u8]) -> usize {
        let mut done = 0;
        for slice in self.range(0, dst.len()) {
            let Some(chunk) = dst.get_mut(done..done + slice.len()) else {
                break;
            };
            done += slice.copy_to(chunk);
        }
        done
    }

    /// Copies `src` to the start of the chain; returns how many bytes fit.
    fn write_prefix(&self, src: &[u8]) -> usize {
        let mut done = 0;
        for slice in self.range(0, src.len()) {
            let Some(chunk) = src.get(done..done + slice.len()) else {
                break;
            };
            slice.copy_from(chunk);
            done += chunk.len();
        }
        done
    }
}

/// A packet the driver placed in the TX queue: its header and the guest
/// memory holding its payload (exactly `header.len` bytes).
pub struct TxPacket<'a> {
    header: VsockHeader,
    payload: Vec<VolatileSlice<'a>>,
}

impl std::fmt::Debug for TxPacket<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TxPacket")
            .field("header", &self.header)
            .field("payload_slices", &self.payload.len())
            .finish()
    }
}

impl<'a> TxPacket<'a> {
    /// Parses and validates the descriptor chain of a TX packet.
    ///
    /// The chain must be device-readable and inside `mem`, start with a
    /// whole header, and hold `len` (at most [`MAX_PKT_BUF_SIZE`]) bytes of
    /// payload after it. Bytes past the payload are ignored.
    pub fn parse(
        mem: &'a GuestMemoryMmap,
        chain: DescriptorChain<&'a GuestMemoryMmap>,
    ) -> Result<Self, PacketError> {
        let segments = Segments::collect(mem, chain, false)?;
        let mut raw = [0u8; HEADER_SIZE];
        if segments.read_prefix(&mut raw) < HEADER_SIZE {
            return Err(PacketError::HeaderTooShort(segments.total));
        }
        let header = VsockHeader::from_bytes(&raw);
        let len = header.len as usize;
        if len > MAX_PKT_BUF_SIZE {
            return Err(PacketError::PayloadTooLarge(header.len));
        }
        let available = segments.total - HEADER_SIZE;
        if len > available {
            return Err(PacketError::PayloadExceedsBuffer {
                len: header.len,
                available,
            });
        }
        Ok(TxPacket {
            header,
            payload: segments.range(HEADER_SIZE, len),
        })
    }

    /// The packet header.
    pub fn header(&self) -> &VsockHeader {
        &self.header
    }

    /// The payload, in order, as slices of guest memory; their lengths add
    /// up to `header().len`.
    pub fn payload(&self) -> &[VolatileSlice<'a>] {
        &self.payload
    }

    /// Copies the payload out of guest memory.
    pub fn payload_to_vec(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.header.len as usize];
        let mut done = 0;
        for slice in &self.payload {
            if let Some(chunk) = out.get_mut(done..done + slice.len()) {
                done += slice.copy_to(chunk);
            }
        }
        out
    }
}

/// A buffer the driver placed in the RX queue, for one packet to the guest:
/// the header goes at its start, up to [`payload_capacity`] bytes of payload
/// after it.
///
/// [`payload_capacity`]: RxBuffer::payload_capacity
pub struct RxBuffer<'a> {
    segments: Segments<'a>,
}

impl std::fmt::Debug for RxBuffer<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RxBuffer")
            .field("len", &self.segments.total)
            .finish()
    }
}

impl<'a> RxBuffer<'a> {
    /// Parses and validates the descriptor chain of an RX buffer: it must be
    /// device-writable, inside `mem`, and hold at least a header.
    pub fn parse(
        mem: &'a GuestMemoryMmap,
        chain: DescriptorChain<&'a GuestMemoryMmap>,
    ) -> Result<Self, PacketError> {
        let segments = Segments::collect(mem, chain, true)?;
        if segments.total < HEADER_SIZE {
            return Err(PacketError::HeaderTooShort(segments.total));
        }
        Ok(RxBuffer { segments })
    }

    /// Bytes of payload the buffer can take after the header, at most
    /// [`MAX_PKT_BUF_SIZE`].
    pub fn payload_capacity(&self) -> usize {
        (self.segments.total - HEADER_SIZE).min(MAX_PKT_BUF_SIZE)
    }

    /// The guest memory for up to `len` bytes of payload (clamped to
    /// [`payload_capacity`](Self::payload_capacity)).
    pub fn payload(&self, len: usize) -> Vec<VolatileSlice<'a>> {
        self.segments
            .range(HEADER_SIZE, len.min(self.payload_capacity()))
    }

    /// Writes `header` at the start of the buffer.
    pub fn write_header(&self, header: &VsockHeader) {
        // parse() checked that the buffer holds a whole header.
        self.segments.write_prefix(&header.to_bytes());
    }

    /// Copies `data` (clamped to the capacity) into the payload area;
    /// returns the bytes copied.
    pub fn write_payload(&self, data: &[u8]) -> usize {
        let mut done = 0;
        for slice in self.payload(data.len()) {
            if let Some(chunk) = data.get(done..done + slice.len()) {
                slice.copy_from(chunk);
                done += chunk.len();
            }
        }
        done
    }
}

/// Writes a `virtio_vsock_event` with `id` into an event queue buffer;
/// returns the bytes written ([`EVENT_SIZE`]).
pub(crate) fn write_event(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    id: u32,
) -> Result<u32, PacketError> {
    let segments = Segments::collect(mem, chain, true)?;
    if segments.total < EVENT_SIZE {
        return Err(PacketError::HeaderTooShort(segments.total));
    }
    segments.write_prefix(&id.to_le_bytes());
    Ok(EVENT_SIZE as u32)
}

/// At most this many slices go into one `readv`/`sendmsg` (well under
/// Linux's UIO_MAXIOV of 1024).
const MAX_IOVECS: usize = 64;

/// Gathers host iovecs for `slices`, keeping their pointer guards alive in
/// `guards` for as long as the iovecs are used.
fn iovecs<B: BitmapSlice>(
    slices: &[VolatileSlice<'_, B>],
    guards: &mut Vec<PtrGuardMut>,
) -> Vec<libc::iovec> {
    let slices = slices.get(..MAX_IOVECS).unwrap_or(slices);
    let mut out = Vec::with_capacity(slices.len());
    for slice in slices {
        let guard = slice.ptr_guard_mut();
        out.push(libc::iovec {
            iov_base: guard.as_ptr() as *mut libc::c_void,
            iov_len: slice.len(),
        });
        guards.push(guard);
    }
    out
}

/// Reads from `fd` straight into guest memory (one `readv`); returns the
/// bytes read, 0 at end of stream.
pub(crate) fn read_into(fd: &impl AsRawFd, slices: &[VolatileSlice<'_>]) -> io::Result<usize> {
    let mut guards = Vec::new();
    let iov = iovecs(slices, &mut guards);
    if iov.is_empty() {
        return Ok(0);
    }
    loop {
        // SAFETY: every iovec describes a live mapping of guest memory (the
        // guards keep it mapped for the call) of exactly the slice's length,
        // and `iov` holds `iov.len()` initialized iovecs.
        let ret = unsafe { libc::readv(fd.as_raw_fd(), iov.as_ptr(), iov.len() as libc::c_int) };
        if ret >= 0 {
            // Guest memory changed behind vm-memory's back: record it for
            // dirty-page tracking.
            let mut left = ret as usize;
            for slice in slices {
                let n = left.min(slice.len());
                slice.bitmap().mark_dirty(0, n);
                left -= n;
            }
            return Ok(ret as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Sends guest memory to the stream socket `fd` (one `sendmsg`, without
/// blocking and without SIGPIPE); returns the bytes sent.
pub(crate) fn send_from(fd: RawFd, slices: &[VolatileSlice<'_>]) -> io::Result<usize> {
    let mut guards = Vec::new();
    let mut iov = iovecs(slices, &mut guards);
    if iov.is_empty() {
        return Ok(0);
    }
    send_iovecs(fd, &mut iov)
}

/// Sends `buf` to the stream socket `fd` without blocking and without
/// SIGPIPE; returns the bytes sent.
pub(crate) fn send_bytes(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    let mut iov = [libc::iovec {
        iov_base: buf.as_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    }];
    send_iovecs(fd, &mut iov)
}

fn send_iovecs(fd: RawFd, iov: &mut [libc::iovec]) -> io::Result<usize> {
    // SAFETY: an all-zero msghdr is valid (no name, no control data).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_mut_ptr();
    msg.msg_iovlen = iov.len() as _;
    loop {
        // SAFETY: `msg` points at `iov`, whose entries describe memory the
        // callers keep alive and readable for the call; MSG_NOSIGNAL turns a
        // closed peer into EPIPE instead of a process-killing SIGPIPE.
        let ret = unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) };
        if ret >= 0 {
            return Ok(ret as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

#[cfg(test)]
mod tests {
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    use super::*;

    const W: u16 = VRING_DESC_F_WRITE as u16;

    fn mem(ranges: &[(u64, usize)]) -> GuestMemoryMmap {
        let ranges: Vec<_> = ranges.iter().map(|&(a, l)| (GuestAddress(a), l)).collect();
        GuestMemoryMmap::from_ranges(&ranges).unwrap()
    }

    /// Runs `f` on a chain of (addr, len, flags) descriptors.
    fn with_chain<R>(
        mem: &GuestMemoryMmap,
        descs: &[(u64, u32, u16)],
        f: impl FnOnce(DescriptorChain<&GuestMemoryMmap>) -> R,
    ) -> R {
        let queue = MockSplitQueue::new(mem, 16);
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .map(|&(a, l, fl)| RawDescriptor::from(Descriptor::new(a, l, fl, 0)))
            .collect();
        f(queue.build_desc_chain(&raw).unwrap())
    }

    fn sample() -> VsockHeader {
        VsockHeader {
            src_cid: 0x0102_0304_0506_0708,
            dst_cid: 2,
            src_port: 0x1122_3344,
            dst_port: 52,
            len: 10,
            type_: TYPE_STREAM,
            op: OP_RW,
            flags: SHUTDOWN_SEND,
            buf_alloc: 65536,
            fwd_cnt: 0xdead_beef,
        }
    }

    #[test]
    fn header_wire_format() {
        let bytes = sample().to_bytes();
        assert_eq!(bytes[0..8], [8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(bytes[16..20], [0x44, 0x33, 0x22, 0x11]);
        assert_eq!(bytes[24..28], [10, 0, 0, 0]);
        assert_eq!(bytes[28..30], [1, 0]);
        assert_eq!(bytes[30..32], [5, 0]);
        assert_eq!(bytes[32..36], [2, 0, 0, 0]);
        assert_eq!(bytes[40..44], [0xef, 0xbe, 0xad, 0xde]);
        assert_eq!(VsockHeader::from_bytes(&bytes), sample());
        let mut longer = bytes.to_vec();
        longer.push(0xff);
        assert_eq!(VsockHeader::parse(&longer), Ok(sample()));
        assert_eq!(
            VsockHeader::parse(&bytes[..43]),
            Err(PacketError::HeaderTooShort(43))
        );
    }

    #[test]
    fn tx_header_and_payload_may_be_split_anywhere() {
        let m = mem(&[(0, 0x10_0000)]);
        m.write_slice(&sample().to_bytes(), GuestAddress(0x1000))
            .unwrap();
        m.write_slice(b"0123456789", GuestAddress(0x1000 + 44))
            .unwrap();
        // Header in 3 pieces, payload starting in the third and ending in a
        // fourth, which holds more than needed.
        let descs = [
            (0x1000, 10, 0),
            (0x100a, 30, 0),
            (0x1028, 8, 0),
            (0x1030, 100, 0),
        ];
        with_chain(&m, &descs, |chain| {
            let pkt = TxPacket::parse(&m, chain).unwrap();
            assert_eq!(*pkt.header(), sample());
            assert_eq!(pkt.payload().len(), 2);
            assert_eq!(pkt.payload_to_vec(), b"0123456789");
        });
    }

    #[test]
    fn tx_descriptor_straddling_memory_regions() {
        let m = mem(&[(0, 0x1_0000), (0x1_0000, 0x1_0000)]);
        let at = 0xfff0;
        m.write_slice(&sample().to_bytes(), GuestAddress(at))
            .unwrap();
        m.write_slice(b"0123456789", GuestAddress(at + 44)).unwrap();
        with_chain(&m, &[(at, 54, 0)], |chain| {
            let pkt = TxPacket::parse(&m, chain).unwrap();
            assert_eq!(pkt.payload_to_vec(), b"0123456789");
        });
        // A descriptor running into a hole is rejected.
        let holed = mem(&[(0, 0x1_0000), (0x2_0000, 0x1_0000)]);
        with_chain(&holed, &[(at, 54, 0)], |chain| {
            assert_eq!(
                TxPacket::parse(&holed, chain).unwrap_err(),
                PacketError::OutsideMemory {
                    index: 0,
                    addr: at,
                    len: 54
                }
            );
        });
    }

    #[test]
    fn looping_chain_stops_at_the_queue_size() {
        use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT};
        let m = mem(&[(0, 0x20_0000)]);
        // One INDIRECT descriptor claiming a 65535-entry table whose first,
        // zero-length entry points back to itself. Without the bound the
        // walk reads 65535 descriptors and reports a short header instead.
        let entry = RawDescriptor::from(Descriptor::new(0x1000, 0, VRING_DESC_F_NEXT as u16, 0));
        m.write_obj(entry, GuestAddress(0x8000)).unwrap();
        let err = with_chain(
            &m,
            &[(0x8000, 0xFFFF0, VRING_DESC_F_INDIRECT as u16)],
            |c| TxPacket::parse(&m, c).unwrap_err(),
        );
        assert_eq!(err, PacketError::ChainTooLong);
    }

    #[test]
    fn tx_chains_are_validated() {
        let m = mem(&[(0, 0x10_0000)]);
        let mut hdr = sample();
        let mut put = |len: u32| {
            hdr.len = len;
            m.write_slice(&hdr.to_bytes(), GuestAddress(0x1000))
                .unwrap();
        };
        put(10);
        let err = with_chain(&m, &[(0x1000, 44, 0), (0x2000, 10, W)], |c| {
            TxPacket::parse(&m, c).unwrap_err()
        });
        assert_eq!(err, PacketError::WritableInTx { index: 1 });
        let err = with_chain(&m, &[(0x1000, 43, 0)], |c| {
            TxPacket::parse(&m, c).unwrap_err()
        });
        assert_eq!(err, PacketError::HeaderTooShort(43));
        let err = with_chain(&m, &[(0x1000, 44, 0), (0x2000, 9, 0)], |c| {
            TxPacket::parse(&m, c).unwrap_err()
        });
        assert_eq!(
            err,
            PacketError::PayloadExceedsBuffer {
                len: 10,
                available: 9
            }
        );
        put(MAX_PKT_BUF_SIZE as u32 + 1);
        let err = with_chain(&m, &[(0x1000, 44, 0), (0x2_0000, 0x2_0000, 0)], |c| {
            TxPacket::parse(&m, c).unwrap_err()
        });
        assert_eq!(err, PacketError::PayloadTooLarge(65537));
        put(MAX_PKT_BUF_SIZE as u32);
        let pkt_len = with_chain(&m, &[(0x1000, 44, 0), (0x2_0000, 0x2_0000, 0)], |c| {
            TxPacket::parse(&m, c).unwrap().payload_to_vec().len()
        });
        assert_eq!(pkt_len, MAX_PKT_BUF_SIZE);
        let err = with_chain(&m, &[(0xff_fff0, 44, 0)], |c| {
            TxPacket::parse(&m, c).unwrap_err()
        });
        assert!(matches!(err, PacketError::OutsideMemory { index: 0, .. }));
        // A zero-length packet needs no payload descriptor.
        put(0);
        let empty = with_chain(&m, &[(0x1000, 44, 0)], |c| {
            TxPacket::parse(&m, c).unwrap().payload().is_empty()
        });
        assert!(empty);
    }

    #[test]
    fn rx_buffers() {
        let m = mem(&[(0, 0x10_0000)]);
        let err = with_chain(&m, &[(0x1000, 100, 0)], |c| {
            RxBuffer::parse(&m, c).unwrap_err()
        });
        assert_eq!(err, PacketError::ReadableInRx { index: 0 });
        let err = with_chain(&m, &[(0x1000, 20, W), (0x2000, 20, W)], |c| {
            RxBuffer::parse(&m, c).unwrap_err()
        });
        assert_eq!(err, PacketError::HeaderTooShort(40));
        // Capacity is clamped to 64 KiB.
        let cap = with_chain(&m, &[(0x1_0000, 200_000, W)], |c| {
            RxBuffer::parse(&m, c).unwrap().payload_capacity()
        });
        assert_eq!(cap, MAX_PKT_BUF_SIZE);
        // Header and payload straddle descriptors.
        with_chain(
            &m,
            &[(0x1000, 30, W), (0x2000, 20, W), (0x3000, 4, W)],
            |c| {
                let buf = RxBuffer::parse(&m, c).unwrap();
                assert_eq!(buf.payload_capacity(), 10);
                buf.write_header(&sample());
                assert_eq!(buf.write_payload(b"abcdefghijklmnop"), 10);
            },
        );
        let mut raw = [0u8; HEADER_SIZE];
        m.read_slice(&mut raw[..30], GuestAddress(0x1000)).unwrap();
        m.read_slice(&mut raw[30..], GuestAddress(0x2000)).unwrap();
        assert_eq!(VsockHeader::from_bytes(&raw), sample());
        let mut payload = [0u8; 10];
        m.read_slice(&mut payload[..6], GuestAddress(0x2000 + 14))
            .unwrap();
        m.read_slice(&mut payload[6..], GuestAddress(0x3000))
            .unwrap();
        assert_eq!(&payload, b"abcdefghij");
    }
}
