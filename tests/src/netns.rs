//! Network namespaces with TAP devices, to give a guest a real host peer
//! without touching the host's own network.
//!
//! [`NetNs::new`] creates a namespace named `embt-<pid>-<n>` (`ip netns
//! add`); [`NetNs::add_tap`] creates a persistent TAP device in it, gives it
//! an address and brings it up; [`NetNs::wrap`] makes a [`Launch`] start
//! ember inside it (`ip netns exec`), so that ember opens the TAP by name
//! exactly as Firecracker does; [`NetNs::run`] runs a closure on a thread
//! that has entered the namespace, which is how a test creates its host
//! sockets there (a socket stays in the namespace it was created in,
//! whichever thread uses it later). Dropping the [`NetNs`] deletes its TAP
//! devices and the namespace, also when the test failed.
//!
//! ```no_run
//! use std::net::UdpSocket;
//!
//! use ember_tests::netns::NetNs;
//!
//! let mut ns = NetNs::new().unwrap();
//! ns.add_tap("embt0", "10.200.0.1/24").unwrap();
//! let socket = ns.run(|| UdpSocket::bind("10.200.0.1:7001")).unwrap().unwrap();
//! ```

use std::fs::{self, File};
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, ExitStatus};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;

use crate::Launch;

/// Prefix of the namespaces this module creates.
const PREFIX: &str = "embt-";
/// Where `ip netns` keeps its namespace handles.
const NETNS_DIR: &str = "/run/netns";

/// Errors setting up or using a network namespace.
#[derive(Debug, thiserror::Error)]
pub enum NetNsError {
    /// A command could not be started.
    #[error("cannot run `{command}`: {source}")]
    Spawn {
        /// The command line.
        command: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A command exited with an error.
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        /// The command line.
        command: String,
        /// How it exited.
        status: ExitStatus,
        /// What it printed on stderr.
        stderr: String,
    },
    /// The output of a command was not what was expected.
    #[error("unexpected output of `{command}`: {detail}")]
    Output {
        /// The command line.
        command: String,
        /// What was wrong.
        detail: String,
    },
    /// The namespace handle could not be opened.
    #[error("cannot open network namespace {name}: {source}")]
    Open {
        /// The namespace.
        name: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// setns(2) into the namespace failed.
    #[error("cannot enter network namespace {name}: {source}")]
    Enter {
        /// The namespace.
        name: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The closure given to [`NetNs::run`] panicked.
    #[error("the thread running in network namespace {0} panicked")]
    Panicked(String),
}

/// `socket.recv_from(buf)`, retried when interrupted. With a receive
/// timeout set (SO_RCVTIMEO), Linux does not restart an interrupted
/// receive but fails it with EINTR (`sock_intr_errno`), even for a stop and
/// continue of the test process.
pub fn recv_datagram(socket: &UdpSocket, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
    loop {
        match socket.recv_from(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// A network namespace, deleted (with its TAP devices) on drop.
#[derive(Debug)]
pub struct NetNs {
    name: String,
    taps: Vec<String>,
}

/// Runs `ip args...` and returns its stdout.
fn ip(args: &[&str]) -> Result<String, NetNsError> {
    let command = format!("ip {}", args.join(" "));
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|source| NetNsError::Spawn {
            command: command.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(NetNsError::Failed {
            command,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Deletes the `embt-<pid>-*` namespaces of processes that no longer
/// exist: what a test killed before its drop guards ran left behind.
fn remove_stale() {
    let Ok(entries) = fs::read_dir(NETNS_DIR) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&["netns", "del", &name]);
        }
    }
}

impl NetNs {
    /// Creates a new, empty network namespace `embt-<pid>-<n>`.
    pub fn new() -> Result<Self, NetNsError> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        remove_stale();
        let name = format!(
            "{PREFIX}{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &name])?;
        Ok(Self {
            name,
            taps: Vec::new(),
        })
    }

    /// The namespace's name, as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n NAME args...` in the namespace and returns its stdout.
    pub fn ip(&self, args: &[&str]) -> Result<String, NetNsError> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// Creates the persistent TAP device `tap` in the namespace, gives it
    /// `address` (CIDR notation, e.g. `10.200.0.1/24`), turns IPv6 off on
    /// it (no router solicitations or DAD frames to confuse a guest) and
    /// brings it up. Its queue holds 1000 frames (`txqueuelen`).
    pub fn add_tap(&mut self, tap: &str, address: &str) -> Result<(), NetNsError> {
        self.ip(&["tuntap", "add", "dev", tap, "mode", "tap"])?;
        self.taps.push(tap.to_string());
        self.ip(&["addr", "add", address, "dev", tap])?;
        self.ip(&["link", "set", "dev", tap, "txqueuelen", "1000", "up"])?;
        let key = format!("net.ipv6.conf.{tap}.disable_ipv6=1");
        ip(&["netns", "exec", &self.name, "sysctl", "-q", "-w", &key])?;
        Ok(())
    }

    /// Sets how many frames the device `dev` queues (`txqueuelen`): for a
    /// TAP, how many frames for the guest wait for the VMM to read them.
    pub fn set_txqueuelen(&self, dev: &str, frames: u32) -> Result<(), NetNsError> {
        self.ip(&["link", "set", "dev", dev, "txqueuelen", &frames.to_string()])?;
        Ok(())
    }

    /// The MAC address of device `dev`.
    pub fn mac(&self, dev: &str) -> Result<String, NetNsError> {
        let out = self.ip(&["-o", "link", "show", "dev", dev])?;
        // "2: embt0: <...> ... link/ether f2:65:56:3b:22:9b brd ..."
        out.split_whitespace()
            .skip_while(|w| *w != "link/ether")
            .nth(1)
            .map(str::to_string)
            .ok_or_else(|| NetNsError::Output {
                command: format!("ip -n {} -o link show dev {dev}", self.name),
                detail: format!("no link/ether address in {out:?}"),
            })
    }

    /// The namespace's neighbour (ARP) table for `dev`, one entry a line.
    pub fn neighbours(&self, dev: &str) -> Result<String, NetNsError> {
        self.ip(&["neigh", "show", "dev", dev])
    }

    /// Makes `launch` start ember inside the namespace
    /// (`ip netns exec NAME ember ...`; `ip` execs ember, so the pid stays).
    pub fn wrap(&self, launch: Launch) -> Launch {
        launch.wrapper("ip", ["netns", "exec", self.name.as_str()])
    }

    /// Runs `f` on a new thread that has entered the namespace, and returns
    /// its result. Sockets created by `f` belong to the namespace.
    pub fn run<T, F>(&self, f: F) -> Result<T, NetNsError>
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        let path = Path::new(NETNS_DIR).join(&self.name);
        let handle = File::open(&path).map_err(|source| NetNsError::Open {
            name: self.name.clone(),
            source,
        })?;
        thread::scope(|scope| {
            scope
                .spawn(|| {
                    // SAFETY: setns(2) only changes this thread's network
                    // namespace; the descriptor is open for the call.
                    let ret = unsafe { libc::setns(handle.as_raw_fd(), libc::CLONE_NEWNET) };
                    if ret != 0 {
                        return Err(NetNsError::Enter {
                            name: self.name.clone(),
                            source: io::Error::last_os_error(),
                        });
                    }
                    Ok(f())
                })
                .join()
                .unwrap_or_else(|_| Err(NetNsError::Panicked(self.name.clone())))
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // A persistent TAP outlives its last user; deleting it first also
        // frees the name at once, whatever still holds the namespace.
        for tap in &self.taps {
            let _ = self.ip(&["link", "del", "dev", tap]);
        }
        let _ = ip(&["netns", "del", &self.name]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_tap_and_cleanup() {
        let mut ns = NetNs::new().unwrap();
        let name = ns.name().to_string();
        assert!(name.starts_with(&format!("embt-{}-", std::process::id())));
        ns.add_tap("embt0", "10.201.0.1/24").unwrap();
        ns.set_txqueuelen("embt0", 2000).unwrap();
        let link = ns.ip(&["-o", "link", "show", "dev", "embt0"]).unwrap();
        assert!(link.contains("qlen 2000"), "{link}");
        assert!(link.contains("UP"), "{link}");
        let mac = ns.mac("embt0").unwrap();
        assert_eq!(mac.len(), 17, "{mac}");
        // The device is in the namespace, not here.
        assert!(ip(&["link", "show", "dev", "embt0"]).is_err());
        let addrs = ns.run(|| {
            let s = std::net::UdpSocket::bind("10.201.0.1:0")?;
            s.local_addr()
        });
        assert!(
            addrs.unwrap().is_ok(),
            "the address exists in the namespace"
        );
        assert!(std::net::UdpSocket::bind("10.201.0.1:0").is_err());
        drop(ns);
        assert!(!Path::new(NETNS_DIR).join(&name).exists());
    }
}
