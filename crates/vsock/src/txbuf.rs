// SPDX-License-Identifier: Apache-2.0

//! The bounded buffer that holds guest-to-host bytes a host socket could not
//! take yet.
//!
//! Its size is the `buf_alloc` the device advertises for every connection,
//! and the device only counts bytes as forwarded (`fwd_cnt`) once they left
//! this buffer for the socket. A driver that respects the credit it is given
//! (virtio 1.2 §5.10.6.3) therefore can never overflow it; one that does not
//! gets its connection reset.

use std::io;
use std::os::fd::RawFd;

use vm_memory::VolatileSlice;

use crate::packet::send_bytes;

/// A ring buffer of `capacity` bytes, allocated on first use.
#[derive(Debug)]
pub(crate) struct TxBuf {
    data: Option<Box<[u8]>>,
    capacity: usize,
    /// Offset of the oldest byte.
    start: usize,
    /// Bytes held.
    len: usize,
}

/// The bytes do not fit in the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Full;

impl TxBuf {
    pub(crate) fn new(capacity: usize) -> Self {
        TxBuf {
            data: None,
            capacity,
            start: 0,
            len: 0,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(crate) fn clear(&mut self) {
        self.start = 0;
        self.len = 0;
    }

    /// Appends all of `slices` (guest memory), or nothing if they do not fit.
    pub(crate) fn push_slices(&mut self, slices: &[VolatileSlice<'_>]) -> Result<(), Full> {
        let total: usize = slices.iter().map(|s| s.len()).sum();
        if total > self.capacity - self.len {
            return Err(Full);
        }
        for slice in slices {
            let mut done = 0;
            while done < slice.len() {
                let (at, room) = self.tail_room();
                let n = room.min(slice.len() - done);
                let data = self.storage();
                // In bounds: `tail_room` returns a range inside `data`, and
                // `done + n <= slice.len()`.
                if let (Some(dst), Ok(src)) = (data.get_mut(at..at + n), slice.subslice(done, n)) {
                    src.copy_to(dst);
                }
                self.len += n;
                done += n;
            }
        }
        Ok(())
    }

    /// Appends all of `bytes`, or nothing if they do not fit.
    #[cfg(test)]
    pub(crate) fn push_bytes(&mut self, bytes: &[u8]) -> Result<(), Full> {
        if bytes.len() > self.capacity - self.len {
            return Err(Full);
        }
        let mut done = 0;
        while done < bytes.len() {
            let (at, room) = self.tail_room();
            let n = room.min(bytes.len() - done);
            let data = self.storage();
            data[at..at + n].copy_from_slice(&bytes[done..done + n]);
            self.len += n;
            done += n;
        }
        Ok(())
    }

    /// Sends as much as the socket `fd` takes; returns the bytes sent. An
    /// error is returned only if nothing was sent.
    pub(crate) fn flush_to(&mut self, fd: RawFd) -> io::Result<usize> {
        let mut sent = 0;
        while self.len > 0 {
            let first = self.len.min(self.capacity - self.start);
            let Some(chunk) = self
                .data
                .as_deref()
                .and_then(|d| d.get(self.start..self.start + first))
            else {
                break;
            };
            let n = match send_bytes(fd, chunk) {
                Ok(n) => n,
                Err(e) if sent == 0 => return Err(e),
                Err(_) => break,
            };
            self.start = (self.start + n) % self.capacity;
            self.len -= n;
            sent += n;
            if n < first {
                break;
            }
        }
        if self.len == 0 {
            self.start = 0;
        }
        Ok(sent)
    }

    /// Where the next bytes go, and how many fit there contiguously.
    fn tail_room(&self) -> (usize, usize) {
        let end = (self.start + self.len) % self.capacity;
        let contiguous = if end >= self.start {
            self.capacity - end
        } else {
            self.start - end
        };
        (end, contiguous.min(self.capacity - self.len))
    }

    fn storage(&mut self) -> &mut [u8] {
        let capacity = self.capacity;
        self.data
            .get_or_insert_with(|| vec![0u8; capacity].into_boxed_slice())
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    use super::*;

    fn drain(stream: &mut UnixStream) -> Vec<u8> {
        stream.set_nonblocking(true).unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        out
    }

    #[test]
    fn wraps_around_and_keeps_order() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut buf = TxBuf::new(8);
        assert!(buf.data.is_none(), "allocated lazily");
        buf.push_bytes(b"abcdef").unwrap();
        assert_eq!(buf.push_bytes(b"xyz"), Err(Full));
        assert_eq!(buf.len(), 6);
        // Consume 4 so that the next push wraps.
        buf.start = 4;
        buf.len = 2;
        buf.push_bytes(b"ghijk").unwrap();
        assert_eq!(buf.len(), 7);
        assert_eq!(buf.flush_to(a.as_raw_fd()).unwrap(), 7);
        assert!(buf.is_empty());
        assert_eq!(drain(&mut b), b"efghijk");
    }

    #[test]
    fn guest_slices_are_copied_whole_or_not_at_all() {
        let mut src = *b"0123456789";
        let slice = VolatileSlice::from(&mut src[..]);
        let mut buf = TxBuf::new(16);
        buf.push_slices(&[slice, slice.subslice(0, 4).unwrap()])
            .unwrap();
        assert_eq!(buf.len(), 14);
        assert_eq!(buf.push_slices(&[slice]), Err(Full));
        assert_eq!(buf.len(), 14);
        let (a, mut b) = UnixStream::pair().unwrap();
        buf.flush_to(a.as_raw_fd()).unwrap();
        assert_eq!(drain(&mut b), b"01234567890123");
    }

    #[test]
    fn flush_to_a_closed_peer_fails_without_sigpipe() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(b);
        let mut buf = TxBuf::new(16);
        buf.push_bytes(b"data").unwrap();
        let err = buf.flush_to(a.as_raw_fd()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
        assert_eq!(buf.len(), 4);
    }
}
