// SPDX-License-Identifier: Apache-2.0

//! Fuzzes the transmit path of `ember_virtio_net::Net`: an arbitrary
//! descriptor table, available ring and buffer contents in guest memory,
//! processed by `handle_tx_queue_event`, the call the event loop makes when
//! the driver notifies the transmit queue.
//!
//! The device writes to a real TAP device (root is needed), created once in
//! a private network namespace, brought up without ARP and IPv6 so that the
//! host sends nothing on it; an AF_PACKET socket bound to the TAP sees what
//! the device wrote.
//!
//! A model walks each published chain the way the virtio 1.2 §2.7.5 rules
//! (and the device's limits) say, and the following are checked:
//! - every popped chain with a valid head is returned to the used ring, in
//!   order, with length 0; a bad head counts an event failure instead;
//! - each chain ends in exactly one of sent, tap_write_fails (both allowed
//!   when the model expects a frame), tx_fails (bad descriptor) or
//!   tx_malformed_frames (bad size), as the model predicts;
//! - a frame sent with an all-zero virtio-net header comes out of the TAP
//!   byte for byte;
//! - at most one interrupt per notification; no panic anywhere.
//!
//! Input format (little-endian; missing bytes read as 0):
//! - `cfg: u8`: bits 0-3 log2 of the queue size (at most 8), bit 4
//!   VIRTIO_RING_F_EVENT_IDX, bit 5 use `avail_idx` instead of the number
//!   of published heads;
//! - `avail_idx: u16`;
//! - `ndesc: u8`, then `ndesc` descriptors of 13 bytes: `sel: u8`,
//!   `addr: u32`, `len: u32`, `flags: u16`, `next: u16`. `sel & 3` places
//!   the buffer: 0 in the first data area (`DATA1 + addr % DATA1_LEN`), 1 in
//!   the second memory region (`REGION2 + addr % REGION2_LEN`), 2 at `addr`,
//!   3 at `addr << 16`;
//! - `navail: u8`, then `navail` heads (`u16`);
//! - the rest: contents of the first data area, then of the second region.

#![no_main]

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ember_virtio::{ActiveQueue, InterruptKind, VirtioDevice, VirtioInterrupt};
use ember_virtio_net::{Net, NetConfig, MAX_BUFFER_SIZE, VNET_HDR_LEN};
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// Split ring layout of the transmit queue (virtio 1.2 §2.7).
const TX_DESC: u64 = 0x0;
const TX_AVAIL: u64 = 0x1000;
const TX_USED: u64 = 0x1400;
/// A one-entry receive queue, never used.
const RX_DESC: u64 = 0x2000;
const RX_AVAIL: u64 = 0x2010;
const RX_USED: u64 = 0x2020;
/// Data areas: the rest of the first region, and a second region after a
/// hole.
const DATA1: u64 = 0x3000;
const DATA1_LEN: u64 = 0xd000;
const REGION1_LEN: usize = 0x1_0000;
const REGION2: u64 = 0x2_0000;
const REGION2_LEN: u64 = 0x1_0000;

const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;
const VRING_DESC_F_INDIRECT: u16 = 4;
/// virtio-net header plus Ethernet header: the shortest frame sent.
const MIN_FRAME: usize = VNET_HDR_LEN + 14;

#[derive(Default)]
struct CountingInterrupt(AtomicUsize);

impl VirtioInterrupt for CountingInterrupt {
    fn trigger(&self, kind: InterruptKind) -> std::io::Result<()> {
        assert_eq!(
            kind,
            InterruptKind::Vring,
            "the device raised a config interrupt"
        );
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

struct Host {
    net: Net,
    socket: OwnedFd,
}

/// Opens the TAP (in a new network namespace) and the packet socket.
fn set_up() -> Host {
    // SAFETY: unshare takes a flag; it moves the calling thread, the one
    // that runs every input, into a new network namespace.
    let ret = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(ret, 0, "net_tx needs root: unshare(CLONE_NEWNET) failed");
    std::fs::write("/proc/sys/net/ipv6/conf/default/disable_ipv6", "1")
        .expect("disable IPv6 in the fuzzing namespace");
    let name = format!("embfz{}", std::process::id());
    let net = Net::new(NetConfig {
        iface_id: "eth0".to_string(),
        host_dev_name: name.clone(),
        guest_mac: None,
        mtu: None,
        rx_rate_limiter: Default::default(),
        tx_rate_limiter: Default::default(),
    })
    .expect("net_tx needs root to create a TAP device");

    // SAFETY: socket takes scalars; the result is checked.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    assert!(sock >= 0);
    // SAFETY: sock is a new descriptor that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(sock) };
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags = (libc::IFF_UP | libc::IFF_NOARP) as libc::c_short;
    // SAFETY: SIOCSIFFLAGS reads one ifreq, which lives across the call.
    let ret = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS as _, &mut ifr) };
    assert_eq!(ret, 0, "cannot bring {name} up");
    // SAFETY: as above; SIOCGIFINDEX writes the index into the ifreq.
    let ret = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFINDEX as _, &mut ifr) };
    assert_eq!(ret, 0);
    // SAFETY: SIOCGIFINDEX filled in the ifindex member.
    let ifindex = unsafe { ifr.ifr_ifru.ifru_ifindex };

    let protocol = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: socket takes scalars; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            libc::c_int::from(protocol),
        )
    };
    assert!(fd >= 0);
    // SAFETY: fd is a new descriptor that nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain old data; all zeroes is valid.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = protocol;
    addr.sll_ifindex = ifindex;
    // SAFETY: bind reads a sockaddr_ll of the given size.
    let ret = unsafe {
        libc::bind(
            socket.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    assert_eq!(ret, 0);
    // Room for a whole queue of the largest frames: 256 x 64 KiB.
    let rcvbuf: libc::c_int = 32 << 20;
    // SAFETY: SO_RCVBUFFORCE reads one int of the given size.
    let ret = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&rcvbuf as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(ret, 0, "SO_RCVBUFFORCE");
    Host { net, socket }
}

/// The next frame the TAP's interface received, if one comes within
/// `timeout`.
fn recv(socket: &OwnedFd, timeout: Duration) -> Option<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; MAX_BUFFER_SIZE + 64];
    loop {
        // SAFETY: recv writes at most `buf.len()` bytes into `buf`.
        let ret = unsafe { libc::recv(socket.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if ret >= 0 {
            buf.truncate(ret as usize);
            return Some(buf);
        }
        let now = Instant::now();
        if now >= deadline {
            return None;
        }
        let mut pfd = libc::pollfd {
            fd: socket.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = (deadline - now).as_millis().max(1) as libc::c_int;
        // SAFETY: poll reads and writes one pollfd.
        unsafe { libc::poll(&mut pfd, 1, ms) };
    }
}

fn drain(socket: &OwnedFd) {
    while recv(socket, Duration::ZERO).is_some() {}
}

/// Reads the input format described at the top; missing bytes are zeroes.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let n = N.min(self.0.len());
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        out
    }
    fn u8(&mut self) -> u8 {
        self.bytes::<1>()[0]
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.bytes())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.bytes())
    }
}

#[derive(Debug, Clone, Copy)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

/// What the device should do with one chain.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// A frame: sent, or refused by the TAP. `stable` is false when a buffer
    /// overlaps the used ring, which the device writes while it works.
    Frame { bytes: Vec<u8>, stable: bool },
    /// Counted in tx_fails.
    BadChain,
    /// Counted in tx_malformed_frames.
    BadSize,
    /// An indirect descriptor: only the accounting is checked.
    Unknown,
}

fn read_desc(mem: &GuestMemoryMmap, index: u16) -> Desc {
    let addr = TX_DESC + 16 * u64::from(index);
    Desc {
        addr: mem.read_obj(GuestAddress(addr)).unwrap(),
        len: mem.read_obj(GuestAddress(addr + 8)).unwrap(),
        flags: mem.read_obj(GuestAddress(addr + 12)).unwrap(),
        next: mem.read_obj(GuestAddress(addr + 14)).unwrap(),
    }
}

/// Walks the chain at `head` as virtio 1.2 §2.7.5 describes: at most
/// `size` descriptors from the table in guest memory, device-readable only,
/// at most 4 GiB in all, every buffer inside guest memory, and the total
/// within the device's limits.
fn model(mem: &GuestMemoryMmap, size: u16, head: u16) -> Outcome {
    let used_end = TX_USED + 6 + 8 * u64::from(size);
    let mut bytes = Vec::new();
    let mut stable = true;
    let mut index = head;
    for _ in 0..size {
        if index >= size {
            return Outcome::BadChain;
        }
        let desc = read_desc(mem, index);
        if desc.flags & VRING_DESC_F_INDIRECT != 0 {
            return Outcome::Unknown;
        }
        if bytes.len() as u64 + u64::from(desc.len) > u64::from(u32::MAX) {
            // virtio-queue ends a chain longer than 4 GiB (§2.7.5.2).
            return Outcome::BadChain;
        }
        if desc.flags & VRING_DESC_F_WRITE != 0 {
            return Outcome::BadChain;
        }
        let end = bytes.len() + desc.len as usize;
        if end > MAX_BUFFER_SIZE {
            return Outcome::BadSize;
        }
        let start = bytes.len();
        bytes.resize(end, 0);
        if mem
            .read_slice(&mut bytes[start..], GuestAddress(desc.addr))
            .is_err()
        {
            return Outcome::BadChain;
        }
        if desc.len > 0 && desc.addr < used_end && desc.addr + u64::from(desc.len) > TX_USED {
            stable = false;
        }
        if desc.flags & VRING_DESC_F_NEXT == 0 {
            return if bytes.len() < MIN_FRAME {
                Outcome::BadSize
            } else {
                Outcome::Frame { bytes, stable }
            };
        }
        index = desc.next;
    }
    // Still linked after `size` descriptors: a loop.
    Outcome::BadChain
}

fn queue(size: u16, desc: u64, avail: u64, used: u64, event_idx: bool) -> Queue {
    let mut queue = Queue::new(size).expect("queue size");
    queue.set_desc_table_address(Some(desc as u32), Some((desc >> 32) as u32));
    queue.set_avail_ring_address(Some(avail as u32), Some((avail >> 32) as u32));
    queue.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
    queue.set_ready(true);
    queue.set_event_idx(event_idx);
    queue
}

static HOST: Mutex<Option<Host>> = Mutex::new(None);

fuzz_target!(|data: &[u8]| {
    let mut guard = HOST.lock().unwrap_or_else(|e| e.into_inner());
    let host = guard.get_or_insert_with(set_up);
    let net = &mut host.net;
    drain(&host.socket);

    let mut input = Reader(data);
    let cfg = input.u8();
    let size = 1u16 << (cfg & 0xf).min(8);
    let event_idx = cfg & 0x10 != 0;
    let avail_override = (cfg & 0x20 != 0).then_some(input.u16());
    let ndesc = usize::from(input.u8()).min(usize::from(size));
    let table: Vec<Desc> = (0..ndesc)
        .map(|_| {
            let sel = input.u8();
            let addr = input.u32();
            let len = input.u32();
            let flags = input.u16();
            let next = input.u16();
            let addr = match sel & 3 {
                0 => DATA1 + u64::from(addr) % DATA1_LEN,
                1 => REGION2 + u64::from(addr) % REGION2_LEN,
                2 => u64::from(addr),
                _ => u64::from(addr) << 16,
            };
            Desc {
                addr,
                len,
                flags,
                next,
            }
        })
        .collect();
    let navail = input.u8();
    let heads: Vec<u16> = (0..navail).map(|_| input.u16()).collect();

    let mem = GuestMemoryMmap::<()>::from_ranges(&[
        (GuestAddress(0), REGION1_LEN),
        (GuestAddress(REGION2), REGION2_LEN as usize),
    ])
    .expect("guest memory");
    let rest = input.0;
    let (data1, data2) = rest.split_at(rest.len().min(DATA1_LEN as usize));
    mem.write_slice(data1, GuestAddress(DATA1)).unwrap();
    let data2 = &data2[..data2.len().min(REGION2_LEN as usize)];
    mem.write_slice(data2, GuestAddress(REGION2)).unwrap();
    for (i, d) in table.iter().enumerate() {
        let addr = GuestAddress(TX_DESC + 16 * i as u64);
        mem.write_obj(d.addr.to_le(), addr).unwrap();
        mem.write_obj(d.len.to_le(), GuestAddress(addr.0 + 8))
            .unwrap();
        mem.write_obj(d.flags.to_le(), GuestAddress(addr.0 + 12))
            .unwrap();
        mem.write_obj(d.next.to_le(), GuestAddress(addr.0 + 14))
            .unwrap();
    }
    for (i, head) in heads.iter().enumerate() {
        let slot = TX_AVAIL + 4 + 2 * (i as u64 % u64::from(size));
        mem.write_obj(head.to_le(), GuestAddress(slot)).unwrap();
    }
    let avail_idx = avail_override.unwrap_or(u16::from(navail));
    mem.write_obj(avail_idx.to_le(), GuestAddress(TX_AVAIL + 2))
        .unwrap();

    // What the device should do, computed before it runs (it does not write
    // to the buffers, but a chain may point at the rings it updates).
    let published = if avail_idx > size {
        None
    } else {
        Some(avail_idx)
    };
    let expected: Vec<(u16, Outcome)> = (0..published.unwrap_or(0))
        .map(|i| {
            let slot = TX_AVAIL + 4 + 2 * (u64::from(i) % u64::from(size));
            let head: u16 = mem.read_obj(GuestAddress(slot)).unwrap();
            (head, model(&mem, size, head))
        })
        .collect();

    let mut features = 1u64 << 32; // VIRTIO_F_VERSION_1
    if event_idx {
        features |= 1u64 << 29; // VIRTIO_RING_F_EVENT_IDX
    }
    net.ack_features(features);
    let irq = Arc::new(CountingInterrupt::default());
    let queues = vec![
        ActiveQueue {
            index: 0,
            queue: queue(1, RX_DESC, RX_AVAIL, RX_USED, event_idx),
            notify: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        },
        ActiveQueue {
            index: 1,
            queue: queue(size, TX_DESC, TX_AVAIL, TX_USED, event_idx),
            notify: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        },
    ];
    net.activate(mem.clone(), queues, irq.clone())
        .expect("activate");

    let m = net.metrics().clone();
    let before = [
        m.tx_packets_count.count(),
        m.tap_write_fails.count(),
        m.tx_fails.count(),
        m.tx_malformed_frames.count(),
        m.event_fails.count(),
    ];
    net.handle_tx_queue_event();
    let delta = |i: usize, now: u64| now - before[i];
    let sent = delta(0, m.tx_packets_count.count());
    let write_fails = delta(1, m.tap_write_fails.count());
    let bad_chains = delta(2, m.tx_fails.count());
    let bad_sizes = delta(3, m.tx_malformed_frames.count());
    let event_fails = delta(4, m.event_fails.count());

    assert!(irq.0.load(Ordering::SeqCst) <= 1, "more than one interrupt");
    if published.is_none() {
        // More entries than the ring holds: the device must not pop any.
        assert_eq!(sent + write_fails + bad_chains + bad_sizes, 0);
        assert!(event_fails >= 1);
    } else {
        let known = |o: &Outcome| !matches!(o, Outcome::Unknown);
        let count =
            |f: &dyn Fn(&Outcome) -> bool| expected.iter().filter(|(_, o)| f(o)).count() as u64;
        let frames = count(&|o| matches!(o, Outcome::Frame { .. }));
        let unknown = count(&|o| !known(o));
        let total = sent + write_fails + bad_chains + bad_sizes;
        assert_eq!(
            total,
            expected.len() as u64,
            "every chain is accounted for once"
        );
        if unknown == 0 {
            assert_eq!(sent + write_fails, frames, "frames");
            assert_eq!(
                bad_sizes,
                count(&|o| matches!(o, Outcome::BadSize)),
                "bad sizes"
            );
        }
        // Used ring: every head the device could return, in order, length 0.
        let bad_heads = expected.iter().filter(|(h, _)| *h >= size).count() as u64;
        assert_eq!(event_fails, bad_heads);
        let used_idx: u16 = mem.read_obj(GuestAddress(TX_USED + 2)).unwrap();
        let returned: Vec<(u16, u32)> = (0..used_idx)
            .map(|i| {
                let elem = TX_USED + 4 + 8 * (u64::from(i) % u64::from(size));
                let id: u32 = mem.read_obj(GuestAddress(elem)).unwrap();
                let len: u32 = mem.read_obj(GuestAddress(elem + 4)).unwrap();
                (id as u16, len)
            })
            .collect();
        let want: Vec<(u16, u32)> = expected
            .iter()
            .filter(|(h, _)| *h < size)
            .map(|(h, _)| (*h, 0))
            .collect();
        assert_eq!(returned, want, "used ring");

        // Plain frames (stable contents, zero header, no VLAN tag that the
        // kernel would move out of the data) come out of the TAP as they
        // were, in order; captures of other frames are skipped.
        let plain: Vec<&[u8]> = expected
            .iter()
            .filter_map(|(_, outcome)| match outcome {
                Outcome::Frame {
                    bytes,
                    stable: true,
                } => Some(bytes.as_slice()),
                _ => None,
            })
            .filter(|bytes| {
                let ethertype =
                    u16::from_be_bytes([bytes[VNET_HDR_LEN + 12], bytes[VNET_HDR_LEN + 13]]);
                bytes[..VNET_HDR_LEN].iter().all(|b| *b == 0)
                    && !matches!(ethertype, 0x8100 | 0x88a8 | 0x9100)
            })
            .map(|bytes| &bytes[VNET_HDR_LEN..])
            .collect();
        if sent == frames && unknown == 0 {
            let deadline = Instant::now() + Duration::from_secs(2);
            let mut matched = 0;
            while matched < plain.len() {
                let left = deadline.saturating_duration_since(Instant::now());
                let Some(got) = recv(&host.socket, left) else {
                    let lens: Vec<usize> = plain.iter().map(|f| f.len()).collect();
                    panic!("frame {matched} (frame lengths {lens:?}) never reached the TAP");
                };
                if got == plain[matched] {
                    matched += 1;
                }
            }
        }
    }
    assert!(net.reset());
});
