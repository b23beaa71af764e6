// SPDX-License-Identifier: Apache-2.0

//! The io_uring engine: operations are queued on the submission ring, sent
//! in one `io_uring_enter` per batch, and complete through an EventFd
//! registered with the ring.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use io_uring::{opcode, types, IoUring};
use log::error;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{DiskOp, Engine, IoVecs, Submitted};

/// Queues operations on an io_uring.
pub(crate) struct AsyncEngine {
    file: File,
    ring: IoUring,
    completion_evt: EventFd,
    /// Buffers of every operation the kernel may still use, by token: they
    /// must stay alive until the operation completes.
    in_flight: HashMap<u64, IoVecs>,
    /// Entries pushed since the last `io_uring_enter`.
    unsubmitted: usize,
    /// Most operations in flight at once: the submission ring size, so the
    /// completion ring (twice as large) never overflows.
    capacity: usize,
}

impl std::fmt::Debug for AsyncEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncEngine")
            .field("file", &self.file)
            .field("in_flight", &self.in_flight.len())
            .field("unsubmitted", &self.unsubmitted)
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

fn retry_eintr<T>(mut f: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match f() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

impl AsyncEngine {
    /// Sets up a ring of `entries` (a power of two) submission entries
    /// with a completion EventFd.
    pub(crate) fn new(file: File, entries: u32) -> io::Result<Self> {
        let ring = IoUring::new(entries)?;
        let completion_evt = EventFd::new(EFD_NONBLOCK)?;
        ring.submitter()
            .register_eventfd(completion_evt.as_raw_fd())?;
        let capacity = ring.params().sq_entries() as usize;
        Ok(AsyncEngine {
            file,
            ring,
            completion_evt,
            in_flight: HashMap::with_capacity(capacity),
            unsubmitted: 0,
            capacity,
        })
    }
}

impl Engine for AsyncEngine {
    fn file(&self) -> &File {
        &self.file
    }

    fn submit(&mut self, op: DiskOp, token: u64) -> Submitted {
        if self.in_flight.len() >= self.capacity {
            return Submitted::Full;
        }
        let fd = types::Fd(self.file.as_raw_fd());
        let (entry, iovecs) = match op {
            DiskOp::Read { offset, iovecs } => {
                let Ok(count) = u32::try_from(iovecs.0.len()) else {
                    return Submitted::Done(Err(io::Error::from_raw_os_error(libc::EINVAL)));
                };
                (
                    opcode::Readv::new(fd, iovecs.0.as_ptr(), count)
                        .offset(offset)
                        .build(),
                    iovecs,
                )
            }
            DiskOp::Write { offset, iovecs } => {
                let Ok(count) = u32::try_from(iovecs.0.len()) else {
                    return Submitted::Done(Err(io::Error::from_raw_os_error(libc::EINVAL)));
                };
                (
                    opcode::Writev::new(fd, iovecs.0.as_ptr(), count)
                        .offset(offset)
                        .build(),
                    iovecs,
                )
            }
            DiskOp::Flush => (
                opcode::Fsync::new(fd)
                    .flags(types::FsyncFlags::DATASYNC)
                    .build(),
                IoVecs::default(),
            ),
        };
        let entry = entry.user_data(token);
        // SAFETY: the entry points at the iovec array of `iovecs` (its heap
        // buffer does not move when the Vec is stored below) and the iovecs
        // point into guest memory, which the device keeps mapped; both stay
        // alive until the completion for `token` is reaped.
        let mut pushed = unsafe { self.ring.submission().push(&entry) }.is_ok();
        if !pushed && self.kick().is_ok() {
            // SAFETY: as above.
            pushed = unsafe { self.ring.submission().push(&entry) }.is_ok();
        }
        if !pushed {
            return Submitted::Full;
        }
        self.in_flight.insert(token, iovecs);
        self.unsubmitted += 1;
        Submitted::Queued
    }

    fn kick(&mut self) -> io::Result<()> {
        if self.unsubmitted == 0 {
            return Ok(());
        }
        let submitted = retry_eintr(|| self.ring.submit())?;
        self.unsubmitted = self.unsubmitted.saturating_sub(submitted);
        Ok(())
    }

    fn reap(&mut self, done: &mut Vec<(u64, io::Result<u32>)>) {
        for cqe in self.ring.completion() {
            let token = cqe.user_data();
            self.in_flight.remove(&token);
            let res = cqe.result();
            done.push((
                token,
                if res < 0 {
                    Err(io::Error::from_raw_os_error(-res))
                } else {
                    Ok(res.unsigned_abs())
                },
            ));
        }
    }

    fn completion_event(&self) -> Option<&EventFd> {
        Some(&self.completion_evt)
    }

    fn drain(&mut self, done: &mut Vec<(u64, io::Result<u32>)>) -> io::Result<()> {
        while !self.in_flight.is_empty() {
            self.kick()?;
            retry_eintr(|| self.ring.submit_and_wait(1))?;
            self.reap(done);
        }
        Ok(())
    }

    fn replace_file(&mut self, file: File) -> File {
        // The ring and its completion EventFd stay: the event loop keeps
        // watching the same descriptor.
        debug_assert!(
            self.in_flight.is_empty(),
            "file replaced with I/O in flight"
        );
        std::mem::replace(&mut self.file, file)
    }
}

impl Drop for AsyncEngine {
    fn drop(&mut self) {
        // The kernel may still write into guest memory through the queued
        // iovecs: wait for it before the buffers go away.
        let mut done = Vec::new();
        if let Err(e) = self.drain(&mut done) {
            error!("virtio-blk: failed to drain the io_uring on drop: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn poll_readable(evt: &EventFd) {
        let mut pfd = libc::pollfd {
            fd: evt.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let ret = unsafe { libc::poll(&mut pfd, 1, 10_000) };
        assert_eq!(ret, 1, "completion EventFd never signalled");
    }

    #[test]
    fn read_completes_through_the_eventfd() {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(b"hello, io_uring").unwrap();
        let mut engine = AsyncEngine::new(file, 4).unwrap();
        let mut buf = [0u8; 8];
        let iovecs = IoVecs(vec![libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }]);
        let op = DiskOp::Read { offset: 7, iovecs };
        assert!(matches!(engine.submit(op, 42), Submitted::Queued));
        // Nothing reaches the kernel before the kick.
        let mut done = Vec::new();
        engine.reap(&mut done);
        assert!(done.is_empty());
        engine.kick().unwrap();
        poll_readable(engine.completion_event().unwrap());
        engine.reap(&mut done);
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].0, 42);
        assert_eq!(done[0].1.as_ref().unwrap(), &8);
        assert_eq!(&buf, b"io_uring");
        assert!(engine.in_flight.is_empty());
    }

    #[test]
    fn full_ring_refuses_and_drain_waits() {
        let file = tempfile::tempfile().unwrap();
        let mut engine = AsyncEngine::new(file, 2).unwrap();
        assert!(matches!(engine.submit(DiskOp::Flush, 1), Submitted::Queued));
        assert!(matches!(engine.submit(DiskOp::Flush, 2), Submitted::Queued));
        assert!(matches!(engine.submit(DiskOp::Flush, 3), Submitted::Full));
        let mut done = Vec::new();
        engine.drain(&mut done).unwrap();
        let mut tokens: Vec<u64> = done.iter().map(|(t, _)| *t).collect();
        tokens.sort_unstable();
        assert_eq!(tokens, [1, 2]);
        assert!(done.iter().all(|(_, r)| r.is_ok()));
        assert!(matches!(engine.submit(DiskOp::Flush, 3), Submitted::Queued));
    }

    #[test]
    fn errors_come_back_as_os_errors() {
        // A read-only descriptor cannot be written.
        let path = tempfile::NamedTempFile::new().unwrap();
        let file = File::open(path.path()).unwrap();
        let mut engine = AsyncEngine::new(file, 2).unwrap();
        let buf = [0u8; 16];
        let iovecs = IoVecs(vec![libc::iovec {
            iov_base: buf.as_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        }]);
        assert!(matches!(
            engine.submit(DiskOp::Write { offset: 0, iovecs }, 9),
            Submitted::Queued
        ));
        let mut done = Vec::new();
        engine.drain(&mut done).unwrap();
        assert_eq!(done.len(), 1);
        assert_eq!(
            done[0].1.as_ref().unwrap_err().raw_os_error(),
            Some(libc::EBADF)
        );
    }
}
