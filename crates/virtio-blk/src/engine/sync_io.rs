// SPDX-License-Identifier: Apache-2.0

//! The synchronous engine: every operation completes inside `submit`.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use vmm_sys_util::eventfd::EventFd;

use super::{DiskOp, Engine, Submitted};

/// Linux's IOV_MAX: the most iovecs one `preadv`/`pwritev` takes.
const IOV_MAX: usize = 1024;

/// Performs operations with blocking system calls.
#[derive(Debug)]
pub(crate) struct SyncEngine {
    file: File,
}

impl SyncEngine {
    pub(crate) fn new(file: File) -> Self {
        SyncEngine { file }
    }
}

/// Transfers every byte of `iovecs` at `offset`, retrying after short
/// transfers and interruptions. Returns the bytes transferred, which is less
/// than requested only when the file ended.
pub(crate) fn transfer_all(
    file: &File,
    iovecs: &mut [libc::iovec],
    mut offset: u64,
    write: bool,
) -> io::Result<u32> {
    let fd = file.as_raw_fd();
    let mut done: u64 = 0;
    let mut start = 0;
    while start < iovecs.len() {
        if iovecs[start].iov_len == 0 {
            start += 1;
            continue;
        }
        let batch = &iovecs[start..];
        let count = batch.len().min(IOV_MAX) as libc::c_int;
        let pos = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
        let ret = if write {
            // SAFETY: `batch` holds `count` valid iovecs; each points into the
            // guest memory mapping, which stays mapped for the call.
            unsafe { libc::pwritev(fd, batch.as_ptr(), count, pos) }
        } else {
            // SAFETY: as above; the kernel writes only inside the described
            // buffers, all within guest memory.
            unsafe { libc::preadv(fd, batch.as_ptr(), count, pos) }
        };
        if ret < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if ret == 0 {
            break;
        }
        let mut n = ret as usize;
        done += n as u64;
        offset += n as u64;
        // Skip what was transferred.
        while n > 0 && start < iovecs.len() {
            let iov = &mut iovecs[start];
            if n >= iov.iov_len {
                n -= iov.iov_len;
                start += 1;
            } else {
                // SAFETY: `n < iov_len`, so the new base stays inside the same
                // buffer.
                iov.iov_base = unsafe { iov.iov_base.cast::<u8>().add(n) }.cast();
                iov.iov_len -= n;
                n = 0;
            }
        }
    }
    u32::try_from(done).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))
}

impl Engine for SyncEngine {
    fn file(&self) -> &File {
        &self.file
    }

    fn submit(&mut self, op: DiskOp, _token: u64) -> Submitted {
        Submitted::Done(match op {
            DiskOp::Read { offset, mut iovecs } => {
                transfer_all(&self.file, &mut iovecs.0, offset, false)
            }
            DiskOp::Write { offset, mut iovecs } => {
                transfer_all(&self.file, &mut iovecs.0, offset, true)
            }
            DiskOp::Flush => self.file.sync_data().map(|()| 0),
        })
    }

    fn kick(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn reap(&mut self, _done: &mut Vec<(u64, io::Result<u32>)>) {}

    fn completion_event(&self) -> Option<&EventFd> {
        None
    }

    fn drain(&mut self, _done: &mut Vec<(u64, io::Result<u32>)>) -> io::Result<()> {
        Ok(())
    }

    fn replace_file(&mut self, file: File) -> File {
        std::mem::replace(&mut self.file, file)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn scattered_read_and_short_read_at_end_of_file() {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(b"0123456789").unwrap();
        let mut a = [0u8; 3];
        let mut b = [0u8; 4];
        let mut iovecs = [
            libc::iovec {
                iov_base: a.as_mut_ptr().cast(),
                iov_len: a.len(),
            },
            libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            },
        ];
        assert_eq!(transfer_all(&file, &mut iovecs, 1, false).unwrap(), 7);
        assert_eq!(&a, b"123");
        assert_eq!(&b, b"4567");

        // Only 2 bytes left past offset 8.
        let mut c = [0u8; 4];
        let mut iovecs = [libc::iovec {
            iov_base: c.as_mut_ptr().cast(),
            iov_len: c.len(),
        }];
        assert_eq!(transfer_all(&file, &mut iovecs, 8, false).unwrap(), 2);
        assert_eq!(&c[..2], b"89");
    }

    #[test]
    fn write_then_flush() {
        let file = tempfile::tempfile().unwrap();
        let mut engine = SyncEngine::new(file);
        let data = *b"abcd";
        let iovecs = super::super::IoVecs(vec![libc::iovec {
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        }]);
        match engine.submit(DiskOp::Write { offset: 2, iovecs }, 0) {
            Submitted::Done(Ok(4)) => {}
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(
            engine.submit(DiskOp::Flush, 1),
            Submitted::Done(Ok(0))
        ));
        assert_eq!(engine.file().metadata().unwrap().len(), 6);
    }
}
