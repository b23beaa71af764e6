// SPDX-License-Identifier: Apache-2.0

//! Parsing one virtio-blk request out of a descriptor chain (virtio 1.2
//! §5.2.6).
//!
//! The chain is read as two byte streams, as VIRTIO_F_ANY_LAYOUT (implied by
//! VIRTIO_F_VERSION_1, virtio 1.2 §2.7.4) requires: the device-readable
//! descriptors carry the 16-byte header and then any driver-to-device data;
//! the device-writable descriptors carry any device-to-driver data and end
//! with the status byte. Linux puts header, data and status in separate
//! descriptors, but a driver may split or merge them at any byte.
//!
//! Nothing here touches guest memory outside `mem`: every descriptor range is
//! checked with `GuestMemory::check_range` before use, and reads go through
//! vm-memory's bounds-checked accessors.

use std::ops::Deref;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

use crate::{
    MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, MAX_WRITE_ZEROES_SECTORS, MAX_WRITE_ZEROES_SEG,
    SECTOR_SHIFT, SECTOR_SIZE, SEG_MAX,
};

/// Size of the request header: `le32 type; le32 reserved; le64 sector`
/// (virtio 1.2 §5.2.6).
pub const HEADER_SIZE: u32 = 16;
/// Size of one discard / write zeroes range: `le64 sector; le32 num_sectors;
/// le32 flags` (virtio 1.2 §5.2.6).
pub const RANGE_SIZE: u32 = 16;
/// Most descriptors one request may use: the header, [`SEG_MAX`] data
/// segments and the status.
pub const MAX_DESCRIPTORS: usize = SEG_MAX as usize + 2;

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestType {
    /// VIRTIO_BLK_T_IN: read sectors into guest memory.
    In,
    /// VIRTIO_BLK_T_OUT: write guest memory to sectors.
    Out,
    /// VIRTIO_BLK_T_FLUSH: make completed writes durable.
    Flush,
    /// VIRTIO_BLK_T_GET_ID: read the 20-byte device ID string.
    GetId,
    /// VIRTIO_BLK_T_DISCARD: the driver no longer needs some sectors.
    Discard,
    /// VIRTIO_BLK_T_WRITE_ZEROES: make some sectors read as zeroes.
    WriteZeroes,
}

/// A guest buffer: `len` bytes at `addr`, known to lie inside guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Guest physical address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
}

/// One range of a discard or write zeroes request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SectorRange {
    /// First sector.
    pub sector: u64,
    /// Number of sectors.
    pub num_sectors: u32,
    /// The driver allows deallocation (write zeroes only).
    pub unmap: bool,
}

/// A validated request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// What to do.
    pub request_type: RequestType,
    /// First sector of a read or write (the header's `sector`).
    pub sector: u64,
    /// Data buffers in order: device-writable for [`RequestType::In`] and
    /// [`RequestType::GetId`], device-readable for [`RequestType::Out`];
    /// empty otherwise.
    pub data: Vec<Segment>,
    /// Total length of `data`.
    pub data_len: u32,
    /// Ranges of a discard or write zeroes request.
    pub ranges: Vec<SectorRange>,
    /// Where the status byte goes.
    pub status_addr: GuestAddress,
}

/// Why a chain is not a valid request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestErrorKind {
    /// The chain does not end with a device-writable byte for the status.
    #[error("the chain has no device-writable status byte at its end")]
    MissingStatus,
    /// More descriptors than the advertised seg_max allows.
    #[error("the chain has more than {MAX_DESCRIPTORS} descriptors (walk stopped at {count})")]
    TooManyDescriptors {
        /// Descriptors in the chain.
        count: usize,
    },
    /// A device-readable descriptor follows a device-writable one, which
    /// virtio 1.2 §2.7.4.2 forbids.
    #[error("descriptor {index} is device-readable but follows a device-writable one")]
    ReadableAfterWritable {
        /// Position in the chain.
        index: usize,
    },
    /// A descriptor points outside guest memory.
    #[error("descriptor at {addr:#x} of length {len} is not inside guest memory")]
    OutOfGuestMemory {
        /// Guest address.
        addr: u64,
        /// Length.
        len: u32,
    },
    /// Fewer device-readable bytes than a header.
    #[error("only {0} device-readable bytes, less than the 16-byte header")]
    HeaderTooShort(u32),
    /// A request type this device does not implement.
    #[error("unsupported request type {0}")]
    UnsupportedType(u32),
    /// A read or write without data.
    #[error("{0:?} request without data")]
    MissingData(RequestType),
    /// Data in the direction the request type does not allow (for example a
    /// device-readable buffer in a read).
    #[error("{0:?} request carries data in the wrong direction")]
    WrongDirection(RequestType),
    /// Read or write length not a multiple of 512 (virtio 1.2 §5.2.6.1).
    #[error("data length {0} is not a multiple of 512")]
    LengthNotSectorMultiple(u32),
    /// More data than a u32 counts.
    #[error("data longer than 4 GiB")]
    DataTooLong,
    /// The request reaches past the end of the disk (or overflows).
    #[error("sectors {sector}..+{count} are not inside the {capacity}-sector disk")]
    SectorOutOfRange {
        /// First sector.
        sector: u64,
        /// Number of sectors.
        count: u64,
        /// Disk size in sectors.
        capacity: u64,
    },
    /// A GET_ID buffer shorter than the 20-byte ID.
    #[error("GET_ID buffer of {0} bytes is shorter than 20")]
    IdBufferTooShort(u32),
    /// Discard / write zeroes data that is not a whole number of ranges.
    #[error("range data of {0} bytes is not a non-zero multiple of 16")]
    RangeLength(u32),
    /// More ranges than max_discard_seg / max_write_zeroes_seg.
    #[error("{count} ranges, more than the {max} advertised")]
    TooManyRanges {
        /// Ranges in the request.
        count: u32,
        /// Advertised maximum.
        max: u32,
    },
    /// A range larger than max_discard_sectors / max_write_zeroes_sectors.
    #[error("range of {num_sectors} sectors, more than the {max} advertised")]
    RangeTooLarge {
        /// Sectors in the range.
        num_sectors: u32,
        /// Advertised maximum.
        max: u32,
    },
    /// Flags other than unmap, or unmap on a discard (virtio 1.2 §5.2.6.2:
    /// both are answered with VIRTIO_BLK_S_UNSUPP).
    #[error("unsupported range flags {0:#x}")]
    UnsupportedFlags(u32),
    /// Reading the header or a range from guest memory failed.
    #[error("failed to read guest memory at {0:#x}")]
    GuestMemory(u64),
}

/// A chain that is not a valid request, with where (if anywhere) to report
/// the failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind}")]
pub struct RequestError {
    kind: RequestErrorKind,
    status_addr: Option<GuestAddress>,
}

impl RequestError {
    /// Why the request is invalid.
    pub fn kind(&self) -> &RequestErrorKind {
        &self.kind
    }

    /// The status byte to write the failure to, when the chain has one.
    /// `None` means the chain can only be returned unused (used length 0).
    pub fn status_addr(&self) -> Option<GuestAddress> {
        self.status_addr
    }

    /// The status to report: VIRTIO_BLK_S_UNSUPP for request types and flags
    /// this device does not implement, VIRTIO_BLK_S_IOERR for everything else.
    pub fn status(&self) -> u8 {
        match self.kind {
            RequestErrorKind::UnsupportedType(_) | RequestErrorKind::UnsupportedFlags(_) => {
                VIRTIO_BLK_S_UNSUPP as u8
            }
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

/// A byte stream over several segments, to take prefixes off.
struct Stream {
    segments: Vec<Segment>,
}

impl Stream {
    fn len(&self) -> u64 {
        self.segments.iter().map(|s| u64::from(s.len)).sum()
    }

    /// Splits the stream after `n` bytes; `n` must not exceed `len()`.
    fn split_off_front(&mut self, mut n: u32) -> Vec<Segment> {
        let mut front = Vec::new();
        let mut rest = Vec::with_capacity(self.segments.len());
        for seg in self.segments.drain(..) {
            if n == 0 {
                rest.push(seg);
            } else if seg.len <= n {
                n -= seg.len;
                front.push(seg);
            } else {
                front.push(Segment {
                    addr: seg.addr,
                    len: n,
                });
                // Cannot wrap: the segment was checked to lie inside guest
                // memory.
                rest.push(Segment {
                    addr: seg.addr.unchecked_add(u64::from(n)),
                    len: seg.len - n,
                });
                n = 0;
            }
        }
        self.segments = rest;
        front
    }

    /// Removes the last byte and returns its address.
    fn pop_back_byte(&mut self) -> Option<GuestAddress> {
        while let Some(last) = self.segments.last_mut() {
            if last.len == 0 {
                self.segments.pop();
                continue;
            }
            last.len -= 1;
            let addr = last.addr.unchecked_add(u64::from(last.len));
            if last.len == 0 {
                self.segments.pop();
            }
            return Some(addr);
        }
        None
    }
}

/// Gathers `buf.len()` bytes from `segments` (which hold at least that many).
fn gather<G: GuestMemory>(mem: &G, segments: &[Segment], buf: &mut [u8]) -> Result<(), u64> {
    let mut done = 0;
    for seg in segments {
        if done == buf.len() {
            break;
        }
        let take = (seg.len as usize).min(buf.len() - done);
        let dst = &mut buf[done..done + take];
        mem.read_slice(dst, seg.addr)
            .map_err(|_| seg.addr.raw_value())?;
        done += take;
    }
    Ok(())
}

fn data_len(segments: &[Segment]) -> Result<u32, RequestErrorKind> {
    segments.iter().try_fold(0u32, |acc, s| {
        acc.checked_add(s.len).ok_or(RequestErrorKind::DataTooLong)
    })
}

fn check_range(sector: u64, count: u64, capacity: u64) -> Result<(), RequestErrorKind> {
    match sector.checked_add(count) {
        Some(end) if end <= capacity => Ok(()),
        _ => Err(RequestErrorKind::SectorOutOfRange {
            sector,
            count,
            capacity,
        }),
    }
}

impl Request {
    /// Parses and validates the request in `chain`, whose descriptors live in
    /// `mem`, for a disk of `capacity_sectors` 512-byte sectors.
    ///
    /// On error, [`RequestError::status_addr`] says whether the chain still
    /// has a status byte to report the failure in.
    pub fn parse<M>(
        chain: DescriptorChain<M>,
        mem: &M::Target,
        capacity_sectors: u64,
    ) -> Result<Request, RequestError>
    where
        M: Deref,
        M::Target: GuestMemory + Sized,
    {
        // Walk at most one descriptor more than a valid request can have.
        // virtio-queue bounds a chain only by the indirect table size (up to
        // 65535 entries, whatever the queue size), so walking a looping
        // chain to its end would let one guest kick cost the VMM a second of
        // CPU. A chain that long has no status byte we may trust: it is
        // returned with nothing written (virtio 1.2 §2.7.5.3.1 forbids
        // chains longer than the queue anyway).
        let mut descs: Vec<Descriptor> = Vec::with_capacity(4);
        let mut last = None;
        let mut count = 0usize;
        for desc in chain.take(MAX_DESCRIPTORS + 1) {
            count += 1;
            if descs.len() < MAX_DESCRIPTORS {
                descs.push(desc);
            }
            last = Some(desc);
        }
        if count > MAX_DESCRIPTORS {
            return Err(RequestError {
                kind: RequestErrorKind::TooManyDescriptors { count },
                status_addr: None,
            });
        }

        let status_addr = last.and_then(|desc| {
            (desc.is_write_only()
                && desc.len() > 0
                && mem.check_range(desc.addr(), desc.len() as usize, Permissions::Write))
            .then(|| desc.addr().unchecked_add(u64::from(desc.len() - 1)))
        });
        let Some(status_addr) = status_addr else {
            return Err(RequestError {
                kind: RequestErrorKind::MissingStatus,
                status_addr: None,
            });
        };
        let fail = |kind| RequestError {
            kind,
            status_addr: Some(status_addr),
        };
        let mut readable = Vec::with_capacity(descs.len());
        let mut writable = Vec::with_capacity(descs.len());
        for (index, desc) in descs.iter().enumerate() {
            let perm = if desc.is_write_only() {
                Permissions::Write
            } else {
                Permissions::Read
            };
            if !mem.check_range(desc.addr(), desc.len() as usize, perm) {
                return Err(fail(RequestErrorKind::OutOfGuestMemory {
                    addr: desc.addr().raw_value(),
                    len: desc.len(),
                }));
            }
            let seg = Segment {
                addr: desc.addr(),
                len: desc.len(),
            };
            if desc.is_write_only() {
                writable.push(seg);
            } else if writable.is_empty() {
                readable.push(seg);
            } else {
                return Err(fail(RequestErrorKind::ReadableAfterWritable { index }));
            }
        }

        let mut out = Stream { segments: readable };
        let mut inn = Stream { segments: writable };
        // The status byte is the last writable byte; it is the one computed
        // above, since the last descriptor is writable and non-empty.
        inn.pop_back_byte();

        let out_len = out.len();
        if out_len < u64::from(HEADER_SIZE) {
            return Err(fail(RequestErrorKind::HeaderTooShort(
                u32::try_from(out_len).unwrap_or(u32::MAX),
            )));
        }
        let header_segs = out.split_off_front(HEADER_SIZE);
        let mut header = [0u8; HEADER_SIZE as usize];
        gather(mem, &header_segs, &mut header)
            .map_err(|addr| fail(RequestErrorKind::GuestMemory(addr)))?;
        let (type_bytes, rest) = header.split_at(4);
        let sector_bytes = &rest[4..];
        let request_type = u32::from_le_bytes(type_bytes.try_into().unwrap_or_default());
        let sector = u64::from_le_bytes(sector_bytes.try_into().unwrap_or_default());

        let out_data = out.segments;
        let in_data = inn.segments;
        let out_len = data_len(&out_data).map_err(fail)?;
        let in_len = data_len(&in_data).map_err(fail)?;

        let mut request = Request {
            request_type: RequestType::Flush,
            sector,
            data: Vec::new(),
            data_len: 0,
            ranges: Vec::new(),
            status_addr,
        };
        match request_type {
            VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
                let (kind, data, len, other_len) = if request_type == VIRTIO_BLK_T_IN {
                    (RequestType::In, in_data, in_len, out_len)
                } else {
                    (RequestType::Out, out_data, out_len, in_len)
                };
                if other_len != 0 {
                    return Err(fail(RequestErrorKind::WrongDirection(kind)));
                }
                if len == 0 {
                    return Err(fail(RequestErrorKind::MissingData(kind)));
                }
                // virtio 1.2 §5.2.6.1: the data length of reads and writes is
                // a multiple of 512 bytes.
                if len % SECTOR_SIZE != 0 {
                    return Err(fail(RequestErrorKind::LengthNotSectorMultiple(len)));
                }
                check_range(sector, u64::from(len >> SECTOR_SHIFT), capacity_sectors)
                    .map_err(fail)?;
                request.request_type = kind;
                request.data = data;
                request.data_len = len;
            }
            // The sector field is unused for flushes and any data is ignored
            // (virtio 1.2 §5.2.6).
            VIRTIO_BLK_T_FLUSH => request.request_type = RequestType::Flush,
            VIRTIO_BLK_T_GET_ID => {
                if out_len != 0 {
                    return Err(fail(RequestErrorKind::WrongDirection(RequestType::GetId)));
                }
                if in_len < VIRTIO_BLK_ID_BYTES {
                    return Err(fail(RequestErrorKind::IdBufferTooShort(in_len)));
                }
                request.request_type = RequestType::GetId;
                request.data = in_data;
                request.data_len = in_len;
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                let discard = request_type == VIRTIO_BLK_T_DISCARD;
                let (kind, max_seg, max_sectors) = if discard {
                    (RequestType::Discard, MAX_DISCARD_SEG, MAX_DISCARD_SECTORS)
                } else {
                    (
                        RequestType::WriteZeroes,
                        MAX_WRITE_ZEROES_SEG,
                        MAX_WRITE_ZEROES_SECTORS,
                    )
                };
                if in_len != 0 {
                    return Err(fail(RequestErrorKind::WrongDirection(kind)));
                }
                if out_len == 0 || out_len % RANGE_SIZE != 0 {
                    return Err(fail(RequestErrorKind::RangeLength(out_len)));
                }
                let count = out_len / RANGE_SIZE;
                if count > max_seg {
                    return Err(fail(RequestErrorKind::TooManyRanges {
                        count,
                        max: max_seg,
                    }));
                }
                let mut stream = Stream { segments: out_data };
                for _ in 0..count {
                    let segs = stream.split_off_front(RANGE_SIZE);
                    let mut raw = [0u8; RANGE_SIZE as usize];
                    gather(mem, &segs, &mut raw)
                        .map_err(|addr| fail(RequestErrorKind::GuestMemory(addr)))?;
                    let (sector_bytes, rest) = raw.split_at(8);
                    let (num_bytes, flag_bytes) = rest.split_at(4);
                    let range_sector =
                        u64::from_le_bytes(sector_bytes.try_into().unwrap_or_default());
                    let num_sectors = u32::from_le_bytes(num_bytes.try_into().unwrap_or_default());
                    let flags = u32::from_le_bytes(flag_bytes.try_into().unwrap_or_default());
                    // virtio 1.2 §5.2.6.2: unknown flags, and unmap on a
                    // discard, are answered with VIRTIO_BLK_S_UNSUPP.
                    let known = if discard {
                        0
                    } else {
                        VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
                    };
                    if flags & !known != 0 {
                        return Err(fail(RequestErrorKind::UnsupportedFlags(flags)));
                    }
                    if num_sectors > max_sectors {
                        return Err(fail(RequestErrorKind::RangeTooLarge {
                            num_sectors,
                            max: max_sectors,
                        }));
                    }
                    check_range(range_sector, u64::from(num_sectors), capacity_sectors)
                        .map_err(fail)?;
                    request.ranges.push(SectorRange {
                        sector: range_sector,
                        num_sectors,
                        unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
                    });
                }
                request.request_type = kind;
            }
            other => return Err(fail(RequestErrorKind::UnsupportedType(other))),
        }
        Ok(request)
    }
}
