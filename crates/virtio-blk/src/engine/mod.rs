// SPDX-License-Identifier: Apache-2.0

//! How reads, writes and flushes reach the backing file.
//!
//! Two engines, as in Firecracker: [`SyncEngine`] performs each operation
//! with `preadv`/`pwritev`/`fdatasync` before returning; [`AsyncEngine`]
//! queues them on an io_uring, sends a whole batch with one system call, and
//! reports completions through an EventFd registered with the ring. Both read
//! and write guest memory in place: the iovecs point into the guest memory
//! mapping, so no bounce buffer is involved.

mod async_io;
mod sync_io;

use std::fs::File;
use std::io;

pub(crate) use async_io::AsyncEngine;
pub(crate) use sync_io::{transfer_all, SyncEngine};
use vmm_sys_util::eventfd::EventFd;

/// Host iovecs pointing into guest memory.
#[derive(Debug, Default)]
pub(crate) struct IoVecs(pub(crate) Vec<libc::iovec>);

// SAFETY: the pointers refer to the guest memory mapping, which is shared
// with the guest and the vCPU threads anyway and which the device keeps
// mapped (it holds a `GuestMemoryMmap`) while operations are in flight; they
// carry no thread affinity.
unsafe impl Send for IoVecs {}

/// One operation on the backing file.
#[derive(Debug)]
pub(crate) enum DiskOp {
    /// Read into the buffers, starting at byte `offset` of the file.
    Read { offset: u64, iovecs: IoVecs },
    /// Write the buffers, starting at byte `offset` of the file.
    Write { offset: u64, iovecs: IoVecs },
    /// Make written data durable (`fdatasync`).
    Flush,
}

/// What became of a submitted operation.
#[derive(Debug)]
pub(crate) enum Submitted {
    /// Finished already: the number of bytes transferred, or the error.
    Done(io::Result<u32>),
    /// Queued; its completion will come out of [`Engine::reap`].
    Queued,
    /// The engine cannot take more operations until some complete.
    Full,
}

/// An I/O engine for the block device.
pub(crate) trait Engine: Send {
    /// The backing file.
    fn file(&self) -> &File;

    /// Performs or queues `op`; `token` identifies it in completions.
    fn submit(&mut self, op: DiskOp, token: u64) -> Submitted;

    /// Sends every queued operation to the kernel.
    fn kick(&mut self) -> io::Result<()>;

    /// Moves the results of finished operations into `done` as
    /// `(token, result)`.
    fn reap(&mut self, done: &mut Vec<(u64, io::Result<u32>)>);

    /// The EventFd signalled when operations finish, for engines that queue.
    fn completion_event(&self) -> Option<&EventFd>;

    /// Waits until nothing is in flight, moving the results into `done`.
    fn drain(&mut self, done: &mut Vec<(u64, io::Result<u32>)>) -> io::Result<()>;

    /// Makes later operations use `file`; returns the previous file. Only
    /// valid with nothing in flight (after [`drain`](Self::drain)): queued
    /// operations name the file descriptor they were submitted with.
    fn replace_file(&mut self, file: File) -> File;
}
