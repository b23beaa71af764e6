//! Removing the API and vsock sockets when the VMM ends, from outside the VMM.
//!
//! The VMM thread's seccomp filter answers `unlink` with `EPERM`: a path cannot
//! be checked by a filter, so allowing `unlink` there would let a compromised VMM
//! remove any file its user may. The sockets are removed instead by a small child
//! process forked at start-up, before any thread or guest memory exists. The VMM
//! tells it, over a pipe, each socket it bound (path, device and inode), then
//! seals the list before the VMM thread installs its filter: later messages are
//! ignored. When the pipe closes (the VMM is done, or died), the child removes each
//! path that still names the same socket, says so on a second pipe, and exits. The
//! VMM waits for that answer before it exits, so the sockets are gone when its
//! parent sees it end.
//!
//! # Example
//!
//! ```no_run
//! use std::os::unix::net::UnixListener;
//!
//! let reaper = ember::socket_reaper::SocketReaper::start()?;
//! let _listener = UnixListener::bind("/tmp/example.sock")?;
//! reaper.register(std::path::Path::new("/tmp/example.sock"))?;
//! reaper.seal()?;
//! // ... install the filters, run ...
//! drop(reaper); // /tmp/example.sock is removed
//! # Ok::<(), std::io::Error>(())
//! ```

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::FromRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// The message that ends the list of sockets.
const SEAL: u8 = 0;
/// The message that announces a socket.
const SOCKET: u8 = 1;
/// Longest path accepted (`PATH_MAX`).
const MAX_PATH: usize = 4096;

/// Name of the socket-removing process (`/proc/<pid>/comm`).
pub const PROCESS_NAME: &str = "ember_sockets";

/// The handle of the socket-removing child process.
#[derive(Debug)]
pub struct SocketReaper {
    /// The write end of the list; closing it asks for the removal.
    to_child: Option<File>,
    /// The read end of the child's answer.
    from_child: File,
}

fn pipe() -> io::Result<(File, File)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array we own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 returned two new descriptors that nothing else owns.
    unsafe { Ok((File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1]))) }
}

impl SocketReaper {
    /// Forks the child. Call it before any other thread exists: the child keeps
    /// running this process's code.
    ///
    /// # Errors
    ///
    /// When a pipe cannot be made or `fork` fails.
    pub fn start() -> io::Result<SocketReaper> {
        let (list_rx, list_tx) = pipe()?;
        let (answer_rx, answer_tx) = pipe()?;
        // SAFETY: the process is single-threaded (the caller's contract), so the
        // child may run any code; it only runs `child` and `_exit`s.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(io::Error::last_os_error());
        }
        if pid == 0 {
            drop(list_tx);
            drop(answer_rx);
            child(list_rx, answer_tx);
            // SAFETY: ends the child without running the parent's destructors.
            unsafe { libc::_exit(0) };
        }
        Ok(SocketReaper {
            to_child: Some(list_tx),
            from_child: answer_rx,
        })
    }

    /// Tells the child about the socket bound at `path`, to remove at the end if
    /// the path still names it.
    ///
    /// # Errors
    ///
    /// When `path` cannot be looked at or the child is gone.
    pub fn register(&self, path: &Path) -> io::Result<()> {
        let meta = std::fs::symlink_metadata(path)?;
        let bytes = path.as_os_str().as_bytes();
        let mut msg = vec![SOCKET];
        msg.extend((bytes.len() as u32).to_le_bytes());
        msg.extend(bytes);
        msg.extend(meta.dev().to_le_bytes());
        msg.extend(meta.ino().to_le_bytes());
        self.send(&msg)
    }

    /// Ends the list: the child ignores anything sent after this.
    ///
    /// # Errors
    ///
    /// When the child is gone.
    pub fn seal(&self) -> io::Result<()> {
        self.send(&[SEAL])
    }

    fn send(&self, msg: &[u8]) -> io::Result<()> {
        match &self.to_child {
            // `Write` is implemented for `&File`: no `&mut self` needed.
            Some(f) => (&*f).write_all(msg),
            None => Err(io::Error::from(io::ErrorKind::BrokenPipe)),
        }
    }
}

impl Drop for SocketReaper {
    /// Asks the child to remove the sockets and waits until it has.
    fn drop(&mut self) {
        drop(self.to_child.take());
        let mut done = [0u8; 1];
        let _ = self.from_child.read(&mut done);
    }
}

/// What the child does: read the list until it is sealed, wait for the end,
/// remove the sockets that are still the ones registered, answer.
fn child(mut list: File, mut answer: File) {
    // SAFETY: PR_SET_NAME copies the NUL-terminated name (at most 16 bytes).
    unsafe { libc::prctl(libc::PR_SET_NAME, c"ember_sockets".as_ptr()) };
    // SAFETY: ignoring signals changes only this process's dispositions: a
    // Ctrl+C or SIGTERM sent to the process group must not stop the removal.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGTERM, libc::SIG_IGN);
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
    }
    let mut sockets: Vec<(CString, u64, u64)> = Vec::new();
    while let Ok(Some(socket)) = read_entry(&mut list) {
        sockets.push(socket);
    }
    // Wait for the VMM to close its end (or die); anything it writes is ignored.
    let mut sink = [0u8; 256];
    while matches!(list.read(&mut sink), Ok(n) if n > 0) {}
    for (path, dev, ino) in &sockets {
        // SAFETY: an all-zero `stat` is a valid value of this C struct.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: `path` is NUL-terminated; lstat writes into `st`.
        let ret = unsafe { libc::lstat(path.as_ptr(), &mut st) };
        if ret == 0
            && st.st_mode & libc::S_IFMT == libc::S_IFSOCK
            && st.st_dev == *dev
            && st.st_ino == *ino
        {
            // SAFETY: as above.
            unsafe { libc::unlink(path.as_ptr()) };
        }
    }
    let _ = answer.write_all(&[1]);
}

/// One entry of the list; `None` at the seal (or a malformed entry).
fn read_entry(list: &mut File) -> io::Result<Option<(CString, u64, u64)>> {
    let mut kind = [0u8; 1];
    list.read_exact(&mut kind)?;
    if kind[0] != SOCKET {
        return Ok(None);
    }
    let mut len = [0u8; 4];
    list.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_PATH {
        return Ok(None);
    }
    let mut path = vec![0u8; len];
    list.read_exact(&mut path)?;
    let mut ids = [0u8; 16];
    list.read_exact(&mut ids)?;
    let (dev, ino) = ids.split_at(8);
    let dev = u64::from_le_bytes(dev.try_into().unwrap_or_default());
    let ino = u64::from_le_bytes(ino.try_into().unwrap_or_default());
    Ok(CString::new(path).ok().map(|p| (p, dev, ino)))
}
