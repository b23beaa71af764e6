// SPDX-License-Identifier: Apache-2.0

//! Device tests: a simulated guest driver (split virtqueues written into a
//! `GuestMemoryMmap`) talks to the device through a real `EventManager`, and
//! real Unix sockets in a temporary directory play the host side.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ember_virtio::{ActivateError, ActiveQueue, Persist, VirtioDevice};
use ember_virtio_mmio::test_utils::{self, MockInterrupt, QueueLayout};
use ember_virtio_mmio::{MmioTransport, CONFIG_SPACE_OFFSET};
use event_manager::{EventManager, SubscriberOps};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_F_IN_ORDER, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::packet::*;
use crate::{Error, Vsock, VsockConfig, AVAIL_FEATURES, CONN_TX_BUF_SIZE, FIRST_LOCAL_PORT};

const CID: u64 = 3;
const QSIZE: u16 = 256;
const MEM_SIZE: usize = 16 << 20;
const QUEUE_ADDRS: [u64; 3] = [0x1_0000, 0x2_0000, 0x3_0000];
/// One buffer slot: a header and the largest payload, rounded up.
const SLOT: u64 = 0x1_1000;
const RX_BASE: u64 = 0x10_0000;
const TX_BASE: u64 = 0x60_0000;
const EV_BASE: u64 = 0xB0_0000;
const RAW_BASE: u64 = 0xC0_0000;
/// Buffers in flight per queue.
const SLOTS: u16 = 64;
/// TX descriptors 0..128 are two per slot; raw chains use the rest.
const RAW_DESC: u16 = 2 * SLOTS;
/// What Linux posts: a header and 4 KiB (VIRTIO_VSOCK_DEFAULT_RX_BUF_SIZE).
const RX_BUF_LEN: u32 = (HEADER_SIZE + 4096) as u32;
const NEXT: u16 = VRING_DESC_F_NEXT as u16;
const WRITE: u16 = VRING_DESC_F_WRITE as u16;

/// The driver side of one split virtqueue.
struct GuestQueue {
    desc: u64,
    avail: u64,
    used: u64,
    avail_idx: u16,
    used_idx: u16,
}

impl GuestQueue {
    /// Lays out a queue of QSIZE entries at `addr` (virtio 1.2 §2.7: the
    /// descriptor table, then the available ring, then the 4-aligned used
    /// ring) and zeroes its rings.
    ///
    /// virtio-queue's `MockSplitQueue` is not used for the layout: it sizes
    /// the available ring in elements rather than bytes, so with more than
    /// a few entries its used ring overlaps the end of the available ring.
    fn new(mem: &GuestMemoryMmap, addr: u64) -> (Self, Queue) {
        let size = u64::from(QSIZE);
        let desc = addr;
        let avail = desc + 16 * size;
        let used = (avail + 6 + 2 * size + 3) & !3;
        mem.write_slice(
            &vec![0u8; (used + 6 + 8 * size - addr) as usize],
            GuestAddress(addr),
        )
        .unwrap();
        let mut queue = Queue::new(QSIZE).unwrap();
        queue.set_size(QSIZE);
        queue.set_desc_table_address(Some(desc as u32), Some((desc >> 32) as u32));
        queue.set_avail_ring_address(Some(avail as u32), Some((avail >> 32) as u32));
        queue.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
        queue.set_ready(true);
        assert!(queue.is_valid(mem));
        let gq = GuestQueue {
            desc,
            avail,
            used,
            avail_idx: 0,
            used_idx: 0,
        };
        (gq, queue)
    }

    fn layout(&self) -> QueueLayout {
        QueueLayout {
            size: QSIZE,
            desc: self.desc,
            driver: self.avail,
            device: self.used,
        }
    }

    fn set_desc(&self, mem: &GuestMemoryMmap, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let desc = RawDescriptor::from(Descriptor::new(addr, len, flags, next));
        mem.write_obj(desc, GuestAddress(self.desc + 16 * u64::from(i)))
            .unwrap();
    }

    fn publish(&mut self, mem: &GuestMemoryMmap, head: u16) {
        let slot = u64::from(self.avail_idx % QSIZE);
        mem.write_obj(head.to_le(), GuestAddress(self.avail + 4 + 2 * slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx.to_le(), GuestAddress(self.avail + 2))
            .unwrap();
    }

    /// Starts both rings (the driver's avail.idx, the device's used.idx)
    /// at index `idx`, as after that many buffers went through.
    fn start_at(&mut self, mem: &GuestMemoryMmap, queue: &mut Queue, idx: u16) {
        self.avail_idx = idx;
        self.used_idx = idx;
        mem.write_obj(idx.to_le(), GuestAddress(self.avail + 2))
            .unwrap();
        mem.write_obj(idx.to_le(), GuestAddress(self.used + 2))
            .unwrap();
        queue.set_next_avail(idx);
        queue.set_next_used(idx);
    }

    /// Sets used_event: the driver wants an interrupt once the used index
    /// passes `value` (virtio 1.2 §2.7.10).
    fn set_used_event(&self, mem: &GuestMemoryMmap, value: u16) {
        let addr = self.avail + 4 + 2 * u64::from(QSIZE);
        mem.write_obj(value.to_le(), GuestAddress(addr)).unwrap();
    }

    /// avail_event: the device wants a kick once the available index
    /// passes it.
    fn avail_event(&self, mem: &GuestMemoryMmap) -> u16 {
        let addr = self.used + 4 + 8 * u64::from(QSIZE);
        u16::from_le(mem.read_obj(GuestAddress(addr)).unwrap())
    }

    /// New used ring entries: (head, length).
    fn take_used(&mut self, mem: &GuestMemoryMmap) -> Vec<(u16, u32)> {
        let idx = u16::from_le(mem.read_obj::<u16>(GuestAddress(self.used + 2)).unwrap());
        let mut out = Vec::new();
        while self.used_idx != idx {
            let at = self.used + 4 + 8 * u64::from(self.used_idx % QSIZE);
            let id = u32::from_le(mem.read_obj::<u32>(GuestAddress(at)).unwrap());
            let len = u32::from_le(mem.read_obj::<u32>(GuestAddress(at + 4)).unwrap());
            out.push((id as u16, len));
            self.used_idx = self.used_idx.wrapping_add(1);
        }
        out
    }
}

/// A device, a simulated driver, and the event loop.
struct Ctx {
    _dir: tempfile::TempDir,
    uds: PathBuf,
    mem: GuestMemoryMmap,
    dev: Arc<Mutex<Vsock>>,
    em: EventManager<Arc<Mutex<Vsock>>>,
    irq: Arc<MockInterrupt>,
    kicks: Vec<EventFd>,
    queues: Vec<GuestQueue>,
    rx_free: Vec<u16>,
    tx_free: Vec<u16>,
    ev_free: Vec<u16>,
    /// Post freed RX buffers again, as a driver does.
    auto_rx: bool,
    received: VecDeque<(VsockHeader, Vec<u8>)>,
    tx_done: Vec<(u16, u32)>,
    rx_used: Vec<(u16, u32)>,
    /// The driver accepts VIRTIO_RING_F_EVENT_IDX.
    event_idx: bool,
    /// Index at which the rings start.
    start_idx: u16,
}

impl Ctx {
    /// An activated device whose driver accepted VIRTIO_RING_F_EVENT_IDX,
    /// with rings starting at index `start_idx`.
    fn with_event_idx(start_idx: u16) -> Self {
        let mut ctx = Self::inactive();
        ctx.event_idx = true;
        ctx.start_idx = start_idx;
        ctx.activate();
        ctx.post_rx(SLOTS as usize);
        ctx
    }

    fn new() -> Self {
        let mut ctx = Self::inactive();
        ctx.activate();
        ctx.post_rx(SLOTS as usize);
        ctx
    }

    /// A device added to the event loop, not activated.
    fn inactive() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let dev = Vsock::new(VsockConfig {
            guest_cid: CID as u32,
            uds_path: uds.clone(),
        })
        .unwrap();
        let dev = Arc::new(Mutex::new(dev));
        let mut em = EventManager::<Arc<Mutex<Vsock>>>::new().unwrap();
        em.add_subscriber(dev.clone());
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        Ctx {
            _dir: dir,
            uds,
            mem,
            dev,
            em,
            irq: Arc::new(MockInterrupt::default()),
            kicks: Vec::new(),
            queues: Vec::new(),
            rx_free: Vec::new(),
            tx_free: Vec::new(),
            ev_free: Vec::new(),
            auto_rx: true,
            received: VecDeque::new(),
            tx_done: Vec::new(),
            rx_used: Vec::new(),
            event_idx: false,
            start_idx: 0,
        }
    }

    /// Sets up fresh queues, activates the device and lets the event loop
    /// see it.
    fn activate(&mut self) {
        let mut active = Vec::new();
        self.queues.clear();
        self.kicks.clear();
        for (i, addr) in QUEUE_ADDRS.iter().enumerate() {
            let (mut gq, mut queue) = GuestQueue::new(&self.mem, *addr);
            // What the transport does when the driver accepted EVENT_IDX.
            queue.set_event_idx(self.event_idx);
            gq.start_at(&self.mem, &mut queue, self.start_idx);
            let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
            active.push(ActiveQueue {
                index: i as u16,
                queue,
                notify: kick.try_clone().unwrap(),
            });
            self.queues.push(gq);
            self.kicks.push(kick);
        }
        self.rx_free = (0..SLOTS).rev().collect();
        self.tx_free = (0..SLOTS).rev().collect();
        self.ev_free = (0..4).rev().collect();
        self.received.clear();
        let features = if self.event_idx {
            AVAIL_FEATURES
        } else {
            AVAIL_FEATURES & !(1 << VIRTIO_RING_F_EVENT_IDX)
        };
        self.dev().ack_features(features);
        self.dev()
            .activate(self.mem.clone(), active, self.irq.clone())
            .unwrap();
        self.run();
    }

    fn dev(&self) -> MutexGuard<'_, Vsock> {
        self.dev.lock().unwrap()
    }

    /// Runs the event loop until it has nothing left to do.
    fn run(&mut self) {
        for _ in 0..100_000 {
            if self.em.run_with_timeout(0).unwrap() == 0 {
                return;
            }
        }
        panic!("the event loop never goes idle");
    }

    /// Whether the event loop has work right now (it must not spin).
    fn busy(&mut self) -> bool {
        self.em.run_with_timeout(0).unwrap() != 0
    }

    fn kick(&self, queue: usize) {
        self.kicks[queue].write(1).unwrap();
    }

    /// Posts up to `n` RX buffers of RX_BUF_LEN bytes.
    fn post_rx(&mut self, n: usize) {
        for _ in 0..n {
            let Some(slot) = self.rx_free.pop() else {
                break;
            };
            let addr = RX_BASE + u64::from(slot) * SLOT;
            self.queues[0].set_desc(&self.mem, slot, addr, RX_BUF_LEN, WRITE, 0);
            self.queues[0].publish(&self.mem, slot);
        }
        self.kick(0);
    }

    /// Posts an RX chain of raw descriptors (addr, len, flags).
    fn post_raw_rx(&mut self, descs: &[(u64, u32, u16)]) {
        Self::write_chain(&self.mem, &self.queues[0], descs);
        self.queues[0].publish(&self.mem, RAW_DESC);
        self.kick(0);
    }

    fn write_chain(mem: &GuestMemoryMmap, q: &GuestQueue, descs: &[(u64, u32, u16)]) {
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let idx = RAW_DESC + i as u16;
            let more = i + 1 < descs.len();
            let flags = if more { flags | NEXT } else { flags };
            q.set_desc(mem, idx, addr, len, flags, idx + 1);
        }
    }

    /// Runs the loop and collects what the device returned, reposting RX
    /// buffers, until nothing changes.
    fn pump(&mut self) {
        for _ in 0..10_000 {
            self.run();
            let mut progress = false;
            for (head, len) in self.queues[0].take_used(&self.mem) {
                progress = true;
                self.rx_used.push((head, len));
                if head >= SLOTS {
                    continue;
                }
                let addr = RX_BASE + u64::from(head) * SLOT;
                if len as usize >= HEADER_SIZE {
                    let mut raw = [0u8; HEADER_SIZE];
                    self.mem.read_slice(&mut raw, GuestAddress(addr)).unwrap();
                    let hdr = VsockHeader::from_bytes(&raw);
                    assert_eq!(len as usize, HEADER_SIZE + hdr.len as usize);
                    let mut data = vec![0u8; hdr.len as usize];
                    self.mem
                        .read_slice(&mut data, GuestAddress(addr + HEADER_SIZE as u64))
                        .unwrap();
                    self.received.push_back((hdr, data));
                }
                self.rx_free.push(head);
            }
            for (head, len) in self.queues[1].take_used(&self.mem) {
                progress = true;
                self.tx_done.push((head, len));
                if head < RAW_DESC {
                    self.tx_free.push(head / 2);
                }
            }
            if self.auto_rx && progress && !self.rx_free.is_empty() {
                let n = self.rx_free.len();
                self.post_rx(n);
            }
            if !progress {
                return;
            }
        }
        panic!("the device never stops sending packets");
    }

    /// Sends a packet on TX, as Linux does: header and payload in two
    /// descriptors.
    fn send(&mut self, mut hdr: VsockHeader, payload: &[u8]) {
        hdr.len = payload.len() as u32;
        if self.tx_free.is_empty() {
            self.pump();
        }
        let slot = self.tx_free.pop().expect("no free TX slot");
        let addr = TX_BASE + u64::from(slot) * SLOT;
        self.mem
            .write_slice(&hdr.to_bytes(), GuestAddress(addr))
            .unwrap();
        let head = 2 * slot;
        if payload.is_empty() {
            self.queues[1].set_desc(&self.mem, head, addr, HEADER_SIZE as u32, 0, 0);
        } else {
            let data = addr + 0x100;
            self.mem.write_slice(payload, GuestAddress(data)).unwrap();
            self.queues[1].set_desc(&self.mem, head, addr, HEADER_SIZE as u32, NEXT, head + 1);
            self.queues[1].set_desc(&self.mem, head + 1, data, payload.len() as u32, 0, 0);
        }
        self.queues[1].publish(&self.mem, head);
        self.kick(1);
        self.pump();
    }

    /// Sends a TX chain of raw descriptors (addr, len, flags).
    fn send_raw(&mut self, descs: &[(u64, u32, u16)]) {
        Self::write_chain(&self.mem, &self.queues[1], descs);
        self.queues[1].publish(&self.mem, RAW_DESC);
        self.kick(1);
        self.pump();
    }

    /// Posts an event queue buffer of `len` bytes.
    fn post_event_buffer(&mut self, len: u32) {
        let slot = self.ev_free.pop().unwrap();
        let addr = EV_BASE + u64::from(slot) * 0x100;
        self.mem
            .write_obj(0xffff_ffffu32, GuestAddress(addr))
            .unwrap();
        self.queues[2].set_desc(&self.mem, slot, addr, len, WRITE, 0);
        self.queues[2].publish(&self.mem, slot);
    }

    fn next_packet(&mut self) -> (VsockHeader, Vec<u8>) {
        self.pump();
        self.received.pop_front().expect("no packet for the guest")
    }

    fn no_packet(&mut self) {
        self.pump();
        assert!(
            self.received.is_empty(),
            "unexpected: {:?}",
            self.received.front()
        );
    }

    /// A host process connects to the guest's `port`; the guest accepts
    /// with `buf_alloc`. Returns the host socket and the guest's view.
    fn host_connect(&mut self, port: u32, buf_alloc: u32) -> (UnixStream, GuestConn) {
        let mut host = UnixStream::connect(&self.uds).unwrap();
        host.write_all(format!("CONNECT {port}\n").as_bytes())
            .unwrap();
        let (req, _) = self.next_packet();
        assert_eq!(req.op, OP_REQUEST);
        assert_eq!(req.dst_port, port);
        let mut conn = GuestConn::new(port, req.src_port, buf_alloc);
        conn.absorb(&req);
        self.send(conn.hdr(OP_RESPONSE), &[]);
        let ok = format!("OK {}\n", req.src_port);
        let mut got = vec![0u8; ok.len()];
        host.set_nonblocking(false).unwrap();
        host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        host.read_exact(&mut got).unwrap();
        assert_eq!(String::from_utf8(got).unwrap(), ok);
        host.set_nonblocking(true).unwrap();
        (host, conn)
    }

    /// The guest connects to the host's `port`, where `listener` listens.
    fn guest_connect(
        &mut self,
        listener: &UnixListener,
        port: u32,
        guest_port: u32,
        buf_alloc: u32,
    ) -> (UnixStream, GuestConn) {
        let mut conn = GuestConn::new(guest_port, port, buf_alloc);
        self.send(conn.hdr(OP_REQUEST), &[]);
        let (resp, _) = self.next_packet();
        assert_eq!(resp.op, OP_RESPONSE, "{resp:?}");
        assert_eq!((resp.src_port, resp.dst_port), (port, guest_port));
        conn.absorb(&resp);
        let (host, _) = listener.accept().unwrap();
        host.set_nonblocking(true).unwrap();
        (host, conn)
    }
}

/// The guest's side of one connection, with its credit bookkeeping.
#[derive(Debug, Clone, Copy)]
struct GuestConn {
    port: u32,
    host_port: u32,
    buf_alloc: u32,
    /// Bytes the guest consumed.
    fwd_cnt: u32,
    /// Bytes the guest sent.
    tx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
}

impl GuestConn {
    fn new(port: u32, host_port: u32, buf_alloc: u32) -> Self {
        GuestConn {
            port,
            host_port,
            buf_alloc,
            fwd_cnt: 0,
            tx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
        }
    }

    fn hdr(&self, op: u16) -> VsockHeader {
        VsockHeader {
            src_cid: CID,
            dst_cid: 2,
            src_port: self.port,
            dst_port: self.host_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: self.buf_alloc,
            fwd_cnt: self.fwd_cnt,
        }
    }

    fn absorb(&mut self, hdr: &VsockHeader) {
        assert_eq!((hdr.src_cid, hdr.dst_cid), (2, CID));
        assert_eq!((hdr.src_port, hdr.dst_port), (self.host_port, self.port));
        assert_eq!(hdr.type_, TYPE_STREAM);
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = hdr.fwd_cnt;
    }

    fn credit(&self) -> u32 {
        self.peer_buf_alloc - self.tx_cnt.wrapping_sub(self.peer_fwd_cnt)
    }

    /// Sends up to `chunk` bytes of `data[*sent..]` within the credit.
    fn send_data(&mut self, ctx: &mut Ctx, data: &[u8], sent: &mut usize, chunk: usize) -> bool {
        let n = chunk.min(self.credit() as usize).min(data.len() - *sent);
        if n == 0 {
            return false;
        }
        ctx.send(self.hdr(OP_RW), &data[*sent..*sent + n]);
        *sent += n;
        self.tx_cnt = self.tx_cnt.wrapping_add(n as u32);
        true
    }
}

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed;
    (0..len)
        .map(|_| {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            (x >> 16) as u8
        })
        .collect()
}

/// Reads what the socket has right now; `None` at end of stream.
fn read_available(stream: &mut UnixStream, out: &mut Vec<u8>) -> Option<usize> {
    let mut buf = [0u8; 65536];
    let mut total = 0;
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return None,
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                total += n;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Some(total),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return None,
            Err(e) => panic!("host read: {e}"),
        }
    }
}

/// Writes as much of `data[*sent..]` as the socket takes now.
fn write_some(stream: &mut UnixStream, data: &[u8], sent: &mut usize) -> usize {
    let mut total = 0;
    while *sent < data.len() {
        match stream.write(&data[*sent..]) {
            Ok(n) => {
                *sent += n;
                total += n;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("host write: {e}"),
        }
    }
    total
}

fn assert_closed(stream: &mut UnixStream) {
    stream.set_nonblocking(false).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut rest = Vec::new();
    match stream.read_to_end(&mut rest) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("host socket not closed: {e}"),
    }
}

#[test]
fn virtio_identity_and_config_space() {
    let ctx = Ctx::inactive();
    let mut dev = ctx.dev();
    assert_eq!(dev.device_type(), 19);
    assert_eq!(dev.queue_max_sizes(), &[256, 256, 256]);
    assert_eq!(
        dev.features(),
        (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_IN_ORDER) | (1 << VIRTIO_RING_F_EVENT_IDX)
    );
    assert_eq!(dev.config_size(), 8);
    let mut cid = [0u8; 8];
    dev.read_config(0, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), CID);
    let mut high = [0xffu8; 4];
    dev.read_config(4, &mut high);
    assert_eq!(high, [0; 4]);
    let mut low = [0u8; 1];
    dev.read_config(0, &mut low);
    assert_eq!(low, [3]);
    // Read-only: ignored and counted.
    dev.write_config(0, &[9, 9, 9, 9]);
    dev.read_config(0, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), CID);
    assert_eq!(dev.metrics().cfg_fails(), 1);
    dev.ack_features(AVAIL_FEATURES);
    assert_eq!(dev.acked_features(), AVAIL_FEATURES);
    assert_eq!(dev.guest_cid(), CID);
    assert_eq!(dev.uds_path(), ctx.uds.as_path());
}

#[test]
fn new_rejects_bad_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.sock");
    let err = Vsock::new(VsockConfig {
        guest_cid: 2,
        uds_path: path.clone(),
    })
    .unwrap_err();
    assert!(matches!(err, Error::InvalidCid(2)));
    assert!(err.to_string().contains("at least 3"));
    assert!(!path.exists(), "nothing bound for an invalid CID");

    std::fs::write(&path, b"").unwrap();
    let err = Vsock::new(VsockConfig {
        guest_cid: 3,
        uds_path: path.clone(),
    })
    .unwrap_err();
    assert!(
        matches!(err, Error::UdsPathExists(ref p) if *p == path),
        "{err}"
    );
    assert!(err.to_string().contains("already exists"));

    let missing = dir.path().join("no/such/dir/v.sock");
    let err = Vsock::new(VsockConfig {
        guest_cid: 3,
        uds_path: missing.clone(),
    })
    .unwrap_err();
    assert!(
        matches!(err, Error::Bind { ref path, .. } if *path == missing),
        "{err}"
    );
    assert!(err.to_string().contains("cannot bind"));

    // The socket file goes with the device.
    let sock = dir.path().join("w.sock");
    let dev = Vsock::new(VsockConfig {
        guest_cid: 3,
        uds_path: sock.clone(),
    })
    .unwrap();
    assert!(sock.exists());
    drop(dev);
    assert!(!sock.exists());
}

#[test]
fn activation_needs_the_three_queues() {
    let ctx = Ctx::inactive();
    let mem = ctx.mem.clone();
    let (_, queue) = GuestQueue::new(&mem, QUEUE_ADDRS[0]);
    let one = vec![ActiveQueue {
        index: 0,
        queue,
        notify: EventFd::new(0).unwrap(),
    }];
    let mut dev = ctx.dev();
    let err = dev.activate(mem, one, ctx.irq.clone()).unwrap_err();
    assert!(matches!(
        err,
        ActivateError::QueueCount {
            expected: 3,
            actual: 1
        }
    ));
    assert_eq!(dev.metrics().activate_fails(), 1);
    assert!(!dev.is_activated());
}

#[test]
fn host_initiated_connection() {
    let mut ctx = Ctx::new();
    let mut host = UnixStream::connect(&ctx.uds).unwrap();
    host.write_all(b"CONNECT 52\n").unwrap();
    let (req, data) = ctx.next_packet();
    assert!(data.is_empty());
    assert_eq!(
        req,
        VsockHeader {
            src_cid: 2,
            dst_cid: CID,
            src_port: FIRST_LOCAL_PORT,
            dst_port: 52,
            len: 0,
            type_: TYPE_STREAM,
            op: OP_REQUEST,
            flags: 0,
            buf_alloc: CONN_TX_BUF_SIZE,
            fwd_cnt: 0,
        }
    );
    assert!(ctx.irq.vring_count() > 0, "the guest was interrupted");
    // Nothing reaches the host before the guest accepts.
    host.set_nonblocking(true).unwrap();
    let mut early = Vec::new();
    assert_eq!(read_available(&mut host, &mut early), Some(0));

    let mut conn = GuestConn::new(52, req.src_port, 65536);
    conn.absorb(&req);
    ctx.send(conn.hdr(OP_RESPONSE), &[]);
    let mut ok = Vec::new();
    read_available(&mut host, &mut ok);
    assert_eq!(ok, b"OK 1073741824\n");
    assert_eq!(ctx.dev().connection_count(), 1);
    assert_eq!(ctx.dev().metrics().conns_added(), 1);

    // The next host connection gets the next port; the keyword's case does
    // not matter, and bytes after the newline are stream data.
    let mut second = UnixStream::connect(&ctx.uds).unwrap();
    second.write_all(b"connect 53\nearly").unwrap();
    let (req2, _) = ctx.next_packet();
    assert_eq!((req2.src_port, req2.dst_port), (FIRST_LOCAL_PORT + 1, 53));
    let mut conn2 = GuestConn::new(53, req2.src_port, 65536);
    conn2.absorb(&req2);
    ctx.send(conn2.hdr(OP_RESPONSE), &[]);
    let (rw, data) = ctx.next_packet();
    assert_eq!((rw.op, rw.dst_port), (OP_RW, 53));
    assert_eq!(data, b"early");

    // A host that does not speak the protocol is disconnected.
    let mut bad = UnixStream::connect(&ctx.uds).unwrap();
    bad.write_all(b"HELLO 52\n").unwrap();
    ctx.no_packet();
    assert_closed(&mut bad);
    let mut long = UnixStream::connect(&ctx.uds).unwrap();
    long.write_all(&[b'7'; 40]).unwrap();
    ctx.no_packet();
    assert_closed(&mut long);
    assert_eq!(ctx.dev().connection_count(), 2);
}

#[test]
fn relays_hundreds_of_kib_both_ways_byte_exact() {
    let mut ctx = Ctx::new();
    let (mut host, mut conn) = ctx.host_connect(1234, 64 * 1024);
    let to_host = pattern(300 * 1024 + 17, 1);
    let to_guest = pattern(300 * 1024 + 5, 2);
    let (mut sent_by_guest, mut sent_by_host) = (0, 0);
    let mut host_got = Vec::new();
    let mut guest_got = Vec::new();
    let mut last_reported = 0u32;
    for _ in 0..20_000 {
        if host_got.len() == to_host.len() && guest_got.len() == to_guest.len() {
            break;
        }
        conn.send_data(&mut ctx, &to_host, &mut sent_by_guest, 4096);
        write_some(&mut host, &to_guest, &mut sent_by_host);
        ctx.pump();
        read_available(&mut host, &mut host_got);
        while let Some((hdr, data)) = ctx.received.pop_front() {
            conn.absorb(&hdr);
            match hdr.op {
                OP_RW => {
                    guest_got.extend_from_slice(&data);
                    conn.fwd_cnt = conn.fwd_cnt.wrapping_add(data.len() as u32);
                }
                OP_CREDIT_UPDATE | OP_CREDIT_REQUEST => {}
                op => panic!("unexpected op {op}"),
            }
        }
        // A guest tells the device when it has consumed half its buffer.
        if conn.fwd_cnt.wrapping_sub(last_reported) >= conn.buf_alloc / 2 {
            last_reported = conn.fwd_cnt;
            ctx.send(conn.hdr(OP_CREDIT_UPDATE), &[]);
        }
    }
    assert_eq!(host_got.len(), to_host.len());
    assert!(host_got == to_host, "guest-to-host bytes differ");
    assert_eq!(guest_got.len(), to_guest.len());
    assert!(guest_got == to_guest, "host-to-guest bytes differ");
    let m = ctx.dev().metrics().clone();
    assert_eq!(m.tx_bytes_count(), to_host.len() as u64);
    assert_eq!(m.rx_bytes_count(), to_guest.len() as u64);
    assert_eq!(m.tx_malformed_packets(), 0);
}

#[test]
fn guest_initiated_connection_and_refusal() {
    let mut ctx = Ctx::new();
    let listener = UnixListener::bind(format!("{}_52", ctx.uds.display())).unwrap();
    let (mut host, mut conn) = ctx.guest_connect(&listener, 52, 1000, 65536);
    assert_eq!(conn.credit(), CONN_TX_BUF_SIZE);
    let mut sent = 0;
    conn.send_data(&mut ctx, b"ping", &mut sent, 4096);
    let mut got = Vec::new();
    read_available(&mut host, &mut got);
    assert_eq!(got, b"ping");
    host.write_all(b"pong").unwrap();
    let (rw, data) = ctx.next_packet();
    assert_eq!((rw.op, rw.len, rw.fwd_cnt), (OP_RW, 4, 4));
    assert_eq!(data, b"pong");

    // Nobody listens on port 53: connection refused.
    let refused = GuestConn::new(1001, 53, 65536);
    ctx.send(refused.hdr(OP_REQUEST), &[]);
    let (rst, _) = ctx.next_packet();
    assert_eq!(
        (rst.op, rst.src_cid, rst.dst_cid, rst.src_port, rst.dst_port),
        (OP_RST, 2, CID, 53, 1001)
    );
    assert_eq!(ctx.dev().connection_count(), 1);
}

#[test]
fn guest_shutdown_half_close_then_full_close() {
    let mut ctx = Ctx::new();
    let listener = UnixListener::bind(format!("{}_7", ctx.uds.display())).unwrap();
    let (mut host, mut conn) = ctx.guest_connect(&listener, 7, 2000, 65536);
    let mut sent = 0;
    conn.send_data(&mut ctx, b"last words", &mut sent, 4096);
    // SHUTDOWN(SEND): the host reads the data, then end of stream.
    let mut shut = conn.hdr(OP_SHUTDOWN);
    shut.flags = SHUTDOWN_SEND;
    ctx.send(shut, &[]);
    let mut got = Vec::new();
    assert_eq!(read_available(&mut host, &mut got), None);
    assert_eq!(got, b"last words");
    // The other direction still works.
    host.write_all(b"reply").unwrap();
    let (rw, data) = ctx.next_packet();
    assert_eq!((rw.op, data.as_slice()), (OP_RW, &b"reply"[..]));
    // SHUTDOWN(RCV) completes it: the device resets and closes.
    let mut shut = conn.hdr(OP_SHUTDOWN);
    shut.flags = SHUTDOWN_RCV;
    ctx.send(shut, &[]);
    let (rst, _) = ctx.next_packet();
    assert_eq!(rst.op, OP_RST);
    assert_eq!(ctx.dev().connection_count(), 0);
    assert_eq!(ctx.dev().metrics().conns_removed(), 1);
    let err = host.write(b"x").unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
}

#[test]
fn host_close_is_a_shutdown_answered_by_rst() {
    let mut ctx = Ctx::new();
    let (host, conn) = ctx.host_connect(99, 65536);
    drop(host);
    let (shut, _) = ctx.next_packet();
    assert_eq!(shut.op, OP_SHUTDOWN);
    assert_eq!(shut.flags, SHUTDOWN_RCV | SHUTDOWN_SEND);
    assert_eq!(ctx.dev().connection_count(), 1);
    ctx.send(conn.hdr(OP_RST), &[]);
    ctx.no_packet();
    assert_eq!(ctx.dev().connection_count(), 0);
    assert_eq!(ctx.dev().metrics().conns_removed(), 1);
}

#[test]
fn host_half_close_is_a_send_shutdown_and_the_guest_may_still_reply() {
    let mut ctx = Ctx::new();
    let (mut host, mut conn) = ctx.host_connect(99, 65536);
    host.write_all(b"request").unwrap();
    host.shutdown(std::net::Shutdown::Write).unwrap();
    let (rw, data) = ctx.next_packet();
    assert_eq!((rw.op, data.as_slice()), (OP_RW, &b"request"[..]));
    conn.absorb(&rw);
    // End of stream with the socket still open: SHUTDOWN(SEND) alone.
    let (shut, _) = ctx.next_packet();
    assert_eq!((shut.op, shut.flags), (OP_SHUTDOWN, SHUTDOWN_SEND));
    ctx.no_packet();
    let mut sent = 0;
    conn.send_data(&mut ctx, b"reply", &mut sent, 4096);
    let mut got = Vec::new();
    assert_eq!(read_available(&mut host, &mut got), Some(5));
    assert_eq!(got, b"reply");
    // The host closing its socket ends the connection both ways.
    drop(host);
    let (shut, _) = ctx.next_packet();
    assert_eq!(
        (shut.op, shut.flags),
        (OP_SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND)
    );
    ctx.send(conn.hdr(OP_RST), &[]);
    ctx.no_packet();
    assert_eq!(ctx.dev().connection_count(), 0);
}

#[test]
fn unanswered_shutdown_and_request_time_out() {
    let mut ctx = Ctx::new();
    ctx.dev()
        .set_timeouts(Duration::from_millis(50), Duration::from_millis(50));

    // The host closes; the guest never answers the SHUTDOWN.
    let (host, _) = ctx.host_connect(99, 65536);
    drop(host);
    let (shut, _) = ctx.next_packet();
    assert_eq!(shut.op, OP_SHUTDOWN);

    // A second host connection whose REQUEST the guest ignores.
    let mut waiting = UnixStream::connect(&ctx.uds).unwrap();
    waiting.write_all(b"CONNECT 100\n").unwrap();
    let (req, _) = ctx.next_packet();
    assert_eq!(req.op, OP_REQUEST);

    let start = Instant::now();
    while ctx.dev().connection_count() > 0 && start.elapsed() < Duration::from_secs(5) {
        ctx.em.run_with_timeout(100).unwrap();
        ctx.pump();
    }
    assert!(start.elapsed() >= Duration::from_millis(40));
    let rsts: Vec<u32> = ctx
        .received
        .iter()
        .filter(|(h, _)| h.op == OP_RST)
        .map(|(h, _)| h.dst_port)
        .collect();
    assert_eq!(rsts.len(), 2, "{:?}", ctx.received);
    assert!(rsts.contains(&99) && rsts.contains(&100));
    assert_closed(&mut waiting);
    assert_eq!(ctx.dev().metrics().conns_killed(), 2);
}

#[test]
fn guest_rst_refuses_a_host_connection() {
    let mut ctx = Ctx::new();
    let mut host = UnixStream::connect(&ctx.uds).unwrap();
    host.write_all(b"CONNECT 52\n").unwrap();
    let (req, _) = ctx.next_packet();
    let mut conn = GuestConn::new(52, req.src_port, 0);
    conn.absorb(&req);
    ctx.send(conn.hdr(OP_RST), &[]);
    ctx.no_packet();
    let mut rest = Vec::new();
    host.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "no OK for a refused connection");
    assert_eq!(ctx.dev().connection_count(), 0);
}

#[test]
fn host_to_guest_stops_without_credit_and_loses_nothing() {
    // Not a multiple of the RX buffer size, so that the credit, not the
    // buffer, limits a packet.
    const GUEST_BUF: u32 = 6000;
    let mut ctx = Ctx::new();
    let (mut host, mut conn) = ctx.host_connect(5, GUEST_BUF);
    let data = pattern(4 << 20, 3);
    let mut written = 0;
    write_some(&mut host, &data, &mut written);
    ctx.pump();
    let mut got = Vec::new();
    let mut credit_requests = 0;
    while let Some((hdr, payload)) = ctx.received.pop_front() {
        conn.absorb(&hdr);
        match hdr.op {
            OP_RW => got.extend_from_slice(&payload),
            OP_CREDIT_REQUEST => credit_requests += 1,
            op => panic!("unexpected op {op}"),
        }
    }
    // Exactly the guest's buffer, then a request for more credit.
    assert_eq!(got.len(), GUEST_BUF as usize);
    assert_eq!(credit_requests, 1);
    // The device stopped reading the host socket: the event loop is idle,
    // and the host writer meets back-pressure.
    assert!(!ctx.busy());
    write_some(&mut host, &data, &mut written);
    assert!(written < data.len(), "the host socket never filled");
    ctx.pump();
    assert!(ctx.received.is_empty());

    // The guest consumes and grants credit, repeatedly, until all arrived.
    for _ in 0..10_000 {
        if got.len() == data.len() {
            break;
        }
        conn.fwd_cnt = got.len() as u32;
        ctx.send(conn.hdr(OP_CREDIT_UPDATE), &[]);
        write_some(&mut host, &data, &mut written);
        ctx.pump();
        while let Some((hdr, payload)) = ctx.received.pop_front() {
            conn.absorb(&hdr);
            if hdr.op == OP_RW {
                assert!(got.len() + payload.len() <= conn.fwd_cnt as usize + GUEST_BUF as usize);
                got.extend_from_slice(&payload);
            }
        }
    }
    assert_eq!(got.len(), data.len());
    assert!(got == data, "bytes differ");
}

#[test]
fn guest_to_host_is_bounded_by_credit_and_resumes() {
    let mut ctx = Ctx::new();
    let listener = UnixListener::bind(format!("{}_8", ctx.uds.display())).unwrap();
    let (mut host, mut conn) = ctx.guest_connect(&listener, 8, 3000, 65536);
    let data = pattern(2 << 20, 4);
    let mut sent = 0;
    // The host does not read: the guest runs out of credit.
    for _ in 0..10_000 {
        if !conn.send_data(&mut ctx, &data, &mut sent, 4096) {
            break;
        }
        while let Some((hdr, _)) = ctx.received.pop_front() {
            conn.absorb(&hdr);
        }
    }
    assert!(sent < data.len(), "the host socket took everything");
    assert_eq!(conn.credit(), 0);
    // What the socket did not take waits in the device, bounded by the
    // credit (forwarded bytes are reported to the guest lazily, so the
    // guest may stop before the buffer is full).
    let buffered = ctx.dev().buffered(8, 3000).unwrap();
    assert!(
        buffered > 0 && buffered <= CONN_TX_BUF_SIZE as usize,
        "{buffered}"
    );
    // Nothing moves until the host reads.
    assert!(!ctx.busy());

    let mut got = Vec::new();
    for _ in 0..10_000 {
        if got.len() == data.len() {
            break;
        }
        read_available(&mut host, &mut got);
        ctx.pump();
        while let Some((hdr, _)) = ctx.received.pop_front() {
            assert_eq!(hdr.op, OP_CREDIT_UPDATE);
            conn.absorb(&hdr);
        }
        while conn.send_data(&mut ctx, &data, &mut sent, 4096) {}
    }
    assert_eq!(got.len(), data.len());
    assert!(got == data, "bytes differ");
    assert_eq!(ctx.dev().buffered(8, 3000), Some(0));
}

#[test]
fn guest_overrunning_its_credit_is_reset() {
    let mut ctx = Ctx::new();
    let listener = UnixListener::bind(format!("{}_9", ctx.uds.display())).unwrap();
    let (_host, conn) = ctx.guest_connect(&listener, 9, 4000, 65536);
    let chunk = pattern(4096, 5);
    let mut reset = false;
    for _ in 0..2000 {
        // Ignores the credit.
        ctx.send(conn.hdr(OP_RW), &chunk);
        if let Some(buffered) = ctx.dev().buffered(9, 4000) {
            assert!(buffered <= CONN_TX_BUF_SIZE as usize);
        }
        if ctx.received.iter().any(|(h, _)| h.op == OP_RST) {
            reset = true;
            break;
        }
        ctx.received.clear();
    }
    assert!(reset);
    assert_eq!(ctx.dev().connection_count(), 0);
    assert_eq!(ctx.dev().metrics().conns_killed(), 1);
}

#[test]
fn malformed_packets_are_dropped_and_counted() {
    let mut ctx = Ctx::new();
    let good = GuestConn::new(1000, 52, 65536);
    let hdr_addr = RAW_BASE;
    let data_addr = RAW_BASE + 0x1000;
    let write_hdr = |ctx: &Ctx, len: u32| {
        let mut h = good.hdr(OP_REQUEST);
        h.len = len;
        ctx.mem
            .write_slice(&h.to_bytes(), GuestAddress(hdr_addr))
            .unwrap();
    };
    let metrics = ctx.dev().metrics().clone();

    // Shorter than a header.
    write_hdr(&ctx, 0);
    ctx.send_raw(&[(hdr_addr, 20, 0)]);
    // The header split over two descriptors is fine, but `len` (100) is
    // more than the chain holds after it (50).
    write_hdr(&ctx, 100);
    ctx.send_raw(&[
        (hdr_addr, 30, 0),
        (hdr_addr + 30, 14, 0),
        (data_addr, 50, 0),
    ]);
    // `len` above 64 KiB.
    write_hdr(&ctx, 70_000);
    ctx.send_raw(&[(hdr_addr, 44, 0), (data_addr, 70_000, 0)]);
    // A device-writable descriptor in a TX chain.
    write_hdr(&ctx, 0);
    ctx.send_raw(&[(hdr_addr, 44, WRITE)]);
    // Outside guest memory.
    ctx.send_raw(&[(MEM_SIZE as u64 - 20, 44, 0)]);
    assert_eq!(metrics.tx_malformed_packets(), 5);
    assert_eq!(metrics.tx_packets_count(), 0);
    ctx.no_packet();
    // Every chain went back to the driver.
    assert_eq!(ctx.tx_done.len(), 5);

    // A foreign source CID is dropped without an answer; so is a packet for
    // a CID other than the host's.
    let mut forged = good.hdr(OP_REQUEST);
    forged.src_cid = 4;
    ctx.send(forged, &[]);
    let mut elsewhere = good.hdr(OP_REQUEST);
    elsewhere.dst_cid = 5;
    ctx.send(elsewhere, &[]);
    ctx.no_packet();
    assert_eq!(metrics.tx_dropped_packets(), 2);

    // An unknown socket type and an unknown op are answered RST; so is
    // anything but REQUEST without a connection. RST is not answered.
    let mut dgram = good.hdr(OP_REQUEST);
    dgram.type_ = 2;
    ctx.send(dgram, &[]);
    assert_eq!(ctx.next_packet().0.op, OP_RST);
    ctx.send(good.hdr(99), &[]);
    assert_eq!(ctx.next_packet().0.op, OP_RST);
    for op in [
        OP_RESPONSE,
        OP_SHUTDOWN,
        OP_RW,
        OP_CREDIT_UPDATE,
        OP_CREDIT_REQUEST,
    ] {
        ctx.send(good.hdr(op), &[]);
        let (rst, _) = ctx.next_packet();
        assert_eq!((rst.op, rst.src_port, rst.dst_port), (OP_RST, 52, 1000));
    }
    ctx.send(good.hdr(OP_RST), &[]);
    ctx.no_packet();

    // An unknown op on a live connection resets it.
    let listener = UnixListener::bind(format!("{}_52", ctx.uds.display())).unwrap();
    let (mut host, conn) = ctx.guest_connect(&listener, 52, 1000, 65536);
    ctx.send(conn.hdr(0), &[]);
    assert_eq!(ctx.next_packet().0.op, OP_RST);
    assert_eq!(ctx.dev().connection_count(), 0);
    assert_closed(&mut host);
    assert_eq!(metrics.tx_malformed_packets(), 5);
}

#[test]
fn unusable_rx_buffers_are_returned_and_counted() {
    let mut ctx = Ctx::inactive();
    ctx.activate();
    ctx.auto_rx = false;
    // Too small for a header, then device-readable.
    ctx.post_raw_rx(&[(RAW_BASE, 20, WRITE)]);
    let refused = GuestConn::new(1001, 53, 65536);
    ctx.send(refused.hdr(OP_REQUEST), &[]);
    assert_eq!(ctx.dev().metrics().rx_malformed_buffers(), 1);
    assert_eq!(ctx.rx_used.last(), Some(&(RAW_DESC, 0)));
    ctx.post_raw_rx(&[(RAW_BASE, 4096, 0)]);
    ctx.pump();
    assert_eq!(ctx.dev().metrics().rx_malformed_buffers(), 2);
    assert!(ctx.received.is_empty());
    // The RST still waits and goes into the first good buffer.
    ctx.post_rx(1);
    let (rst, _) = ctx.next_packet();
    assert_eq!(rst.op, OP_RST);
}

#[test]
fn transport_reset_event() {
    let mut ctx = Ctx::new();
    let (mut host, _) = ctx.host_connect(52, 65536);

    // No event buffer: the connections go anyway, the caller is told.
    let err = ctx.dev().send_transport_reset().unwrap_err();
    assert!(matches!(err, Error::NoEventBuffer), "{err}");
    ctx.run();
    assert_eq!(ctx.dev().connection_count(), 0);
    assert_closed(&mut host);

    let (mut host, _) = ctx.host_connect(53, 65536);
    ctx.post_event_buffer(4);
    let irqs = ctx.irq.vring_count();
    ctx.dev().send_transport_reset().unwrap();
    let used = ctx.queues[2].take_used(&ctx.mem);
    assert_eq!(used.len(), 1);
    assert_eq!(used[0].1, 4);
    let id: u32 = ctx
        .mem
        .read_obj(GuestAddress(EV_BASE + u64::from(used[0].0) * 0x100))
        .unwrap();
    assert_eq!(id, EVENT_TRANSPORT_RESET);
    assert!(ctx.irq.vring_count() > irqs);
    ctx.run();
    assert_closed(&mut host);

    // Until the driver refills the event queue, nothing goes to the guest.
    let mut next = UnixStream::connect(&ctx.uds).unwrap();
    next.write_all(b"CONNECT 54\n").unwrap();
    ctx.no_packet();
    ctx.post_event_buffer(4);
    ctx.kick(2);
    let (req, _) = ctx.next_packet();
    assert_eq!((req.op, req.dst_port), (OP_REQUEST, 54));

    // An event buffer too small for the event (after the one left over).
    ctx.dev().send_transport_reset().unwrap();
    ctx.post_event_buffer(2);
    let err = ctx.dev().send_transport_reset().unwrap_err();
    assert!(matches!(err, Error::EventBuffer(_)), "{err}");
    assert_eq!(ctx.dev().metrics().ev_queue_event_fails(), 2);
}

#[test]
fn transport_reset_needs_activation() {
    let ctx = Ctx::inactive();
    let err = ctx.dev().send_transport_reset().unwrap_err();
    assert!(matches!(err, Error::NotActivated));
}

#[test]
fn device_reset_closes_everything_and_reactivation_works() {
    let mut ctx = Ctx::new();
    let (mut host, _) = ctx.host_connect(52, 65536);
    assert!(ctx.dev().reset());
    assert!(!ctx.dev().is_activated());
    ctx.run();
    assert_closed(&mut host);
    assert_eq!(ctx.dev().connection_count(), 0);

    // The listening socket is not served until the driver is back.
    let mut waiting = UnixStream::connect(&ctx.uds).unwrap();
    waiting.write_all(b"CONNECT 60\n").unwrap();
    ctx.run();
    assert!(!ctx.busy());

    ctx.activate();
    ctx.post_rx(SLOTS as usize);
    let (req, _) = ctx.next_packet();
    assert_eq!((req.op, req.dst_port), (OP_REQUEST, 60));
}

#[test]
fn reset_before_the_event_loop_ran() {
    let mut ctx = Ctx::inactive();
    ctx.activate();
    assert!(ctx.dev().reset());
    // Activation, reset and activation again with no event loop turn in
    // between.
    let mut queues = Vec::new();
    for (i, addr) in QUEUE_ADDRS.iter().enumerate() {
        let (gq, queue) = GuestQueue::new(&ctx.mem, *addr);
        ctx.queues[i] = gq;
        queues.push(ActiveQueue {
            index: i as u16,
            queue,
            notify: ctx.kicks[i].try_clone().unwrap(),
        });
    }
    ctx.rx_free = (0..SLOTS).rev().collect();
    ctx.tx_free = (0..SLOTS).rev().collect();
    ctx.dev()
        .activate(ctx.mem.clone(), queues, ctx.irq.clone())
        .unwrap();
    ctx.run();
    ctx.post_rx(4);
    let mut host = UnixStream::connect(&ctx.uds).unwrap();
    host.write_all(b"CONNECT 61\n").unwrap();
    assert_eq!(ctx.next_packet().0.op, OP_REQUEST);
}

#[test]
fn works_behind_the_mmio_transport() {
    let mut ctx = Ctx::inactive();
    let mut layouts = Vec::new();
    for addr in QUEUE_ADDRS {
        let (gq, _) = GuestQueue::new(&ctx.mem, addr);
        layouts.push(gq.layout());
        ctx.queues.push(gq);
    }
    let device: Arc<Mutex<dyn VirtioDevice>> = ctx.dev.clone();
    let mut transport = MmioTransport::new(
        ctx.mem.clone(),
        device,
        EventFd::new(libc::EFD_NONBLOCK).unwrap(),
    )
    .unwrap();
    let status = test_utils::initialize(&mut transport, AVAIL_FEATURES, &layouts);
    assert_ne!(status & VIRTIO_CONFIG_S_DRIVER_OK, 0);
    assert_eq!(
        test_utils::read_reg(&mut transport, CONFIG_SPACE_OFFSET),
        CID as u32
    );
    assert_eq!(ctx.dev().acked_features(), AVAIL_FEATURES);
    ctx.kicks = transport
        .queue_notify_events()
        .iter()
        .map(|e| e.try_clone().unwrap())
        .collect();
    ctx.rx_free = (0..SLOTS).rev().collect();
    ctx.tx_free = (0..SLOTS).rev().collect();
    ctx.run();
    ctx.post_rx(8);
    let mut host = UnixStream::connect(&ctx.uds).unwrap();
    host.write_all(b"CONNECT 52\n").unwrap();
    ctx.run();
    // The transport's interrupt status shows the used buffer.
    assert_ne!(transport.interrupt_status() & 1, 0);
    let used = ctx.queues[0].take_used(&ctx.mem);
    assert_eq!(used.len(), 1);
    let mut raw = [0u8; HEADER_SIZE];
    ctx.mem
        .read_slice(
            &mut raw,
            GuestAddress(RX_BASE + u64::from(used[0].0) * SLOT),
        )
        .unwrap();
    assert_eq!(VsockHeader::from_bytes(&raw).op, OP_REQUEST);
}

#[test]
fn state_round_trip() {
    let ctx = Ctx::inactive();
    ctx.dev().ack_features(AVAIL_FEATURES);
    let saved = Persist::save(&*ctx.dev());
    assert_eq!(saved.acked_features, AVAIL_FEATURES);
    assert_eq!(saved.guest_cid, CID);
    let text = serde_json::to_string(&saved).unwrap();
    let state: crate::VsockState = serde_json::from_str(&text).unwrap();

    // Another socket path: it is the host's business, not the guest's.
    let mut fresh = Ctx::inactive();
    Persist::restore(&mut *fresh.dev(), &state).unwrap();
    assert_eq!(fresh.dev().save(), saved);
    assert_eq!(fresh.dev().acked_features(), ctx.dev().acked_features());
    let cid = |dev: &Vsock| {
        let mut space = [0u8; 8];
        dev.read_config(0, &mut space);
        space
    };
    assert_eq!(cid(&fresh.dev()), cid(&ctx.dev()));
    assert_eq!(fresh.dev().metrics().cfg_fails(), 0);

    // What a VMM does next: reactivate, tell the driver its connections
    // are gone, and carry on once it refilled the event queue.
    fresh.activate();
    fresh.post_rx(SLOTS as usize);
    assert_eq!(fresh.dev().connection_count(), 0);
    fresh.post_event_buffer(4);
    fresh.dev().send_transport_reset().unwrap();
    fresh.post_event_buffer(4);
    fresh.kick(2);
    fresh.run();
    let (_host, _conn) = fresh.host_connect(52, 65536);
    assert_eq!(fresh.dev().connection_count(), 1);
}

#[test]
fn hostile_states_are_refused() {
    use crate::{VsockState, VsockStateError};

    let mut ctx = Ctx::inactive();
    let good = ctx.dev().save();
    let offered = ctx.dev().features();

    let unoffered = VsockState {
        acked_features: AVAIL_FEATURES | (1 << 33),
        ..good.clone()
    };
    assert!(matches!(
        ctx.dev().restore(&unoffered),
        Err(VsockStateError::Features { acked, offered: o })
            if acked == AVAIL_FEATURES | (1 << 33) && o == offered
    ));
    let legacy = VsockState {
        acked_features: 1 << VIRTIO_F_IN_ORDER,
        ..good.clone()
    };
    assert!(matches!(
        ctx.dev().restore(&legacy),
        Err(VsockStateError::Features { .. })
    ));
    let other_cid = VsockState {
        guest_cid: 4,
        ..good.clone()
    };
    assert!(matches!(
        ctx.dev().restore(&other_cid),
        Err(VsockStateError::Cid {
            state: 4,
            device: CID
        })
    ));
    let reserved = VsockState {
        guest_cid: 2,
        ..good.clone()
    };
    assert!(ctx.dev().restore(&reserved).is_err());
    assert_eq!(ctx.dev().save(), good, "a refused state changed the device");

    // A running device is not restored into.
    ctx.activate();
    assert!(matches!(
        ctx.dev().restore(&good),
        Err(VsockStateError::InUse)
    ));
}

// ---------------------------------------------------------------------------
// Notification suppression (VIRTIO_RING_F_EVENT_IDX).

/// A refused connection: the guest sends REQUEST to a port nobody listens
/// on and gets RST back, one TX and one RX buffer used.
fn refused_request(ctx: &mut Ctx, port: u32) {
    let refused = GuestConn::new(port, 53, 65536);
    ctx.send(refused.hdr(OP_REQUEST), &[]);
    let (rst, _) = ctx.next_packet();
    assert_eq!((rst.op, rst.dst_port), (OP_RST, port));
}

#[test]
fn event_idx_publishes_avail_event_and_suppresses_interrupts() {
    let mut ctx = Ctx::with_event_idx(0);
    assert!(ctx.dev().acked_features() & (1 << VIRTIO_RING_F_EVENT_IDX) != 0);
    let irqs = ctx.irq.vring_count();
    // used_event far ahead on both queues: no interrupt wanted.
    ctx.queues[0].set_used_event(&ctx.mem, 0x8000);
    ctx.queues[1].set_used_event(&ctx.mem, 0x8000);
    refused_request(&mut ctx, 1000);
    assert_eq!(ctx.irq.vring_count(), irqs, "suppressed by used_event");
    // The TX ring was drained: a kick is wanted at the next chain.
    assert_eq!(ctx.queues[1].avail_event(&ctx.mem), 1);

    // The driver asks for an interrupt when the TX used index passes 1.
    ctx.queues[1].set_used_event(&ctx.mem, 1);
    refused_request(&mut ctx, 1001);
    assert_eq!(ctx.irq.vring_count(), irqs + 1);
    assert_eq!(ctx.queues[1].avail_event(&ctx.mem), 2);
    // Still 1: the next one needs none.
    refused_request(&mut ctx, 1002);
    assert_eq!(ctx.irq.vring_count(), irqs + 1);
    assert_eq!(ctx.queues[1].avail_event(&ctx.mem), 3);
}

#[test]
fn event_idx_wraps_at_2_16() {
    let start = u16::MAX - 1;
    let mut ctx = Ctx::with_event_idx(start);
    let irqs = ctx.irq.vring_count();
    ctx.queues[0].set_used_event(&ctx.mem, start.wrapping_add(0x8000));
    // Interrupt when the TX used index passes 65535, that is at 0.
    ctx.queues[1].set_used_event(&ctx.mem, u16::MAX);
    refused_request(&mut ctx, 1000); // TX used 65534 -> 65535
    assert_eq!(ctx.irq.vring_count(), irqs);
    assert_eq!(ctx.queues[1].avail_event(&ctx.mem), u16::MAX);
    refused_request(&mut ctx, 1001); // 65535 -> 0: passes 65535
    assert_eq!(ctx.irq.vring_count(), irqs + 1);
    assert_eq!(ctx.queues[1].avail_event(&ctx.mem), 0);
    refused_request(&mut ctx, 1002); // 0 -> 1
    assert_eq!(ctx.irq.vring_count(), irqs + 1);
    assert_eq!(ctx.queues[1].avail_event(&ctx.mem), 1);
}

#[test]
fn event_idx_rx_asks_for_buffers_when_it_runs_out() {
    let mut ctx = Ctx::with_event_idx(0);
    ctx.auto_rx = false;
    let rx_posted = ctx.queues[0].avail_idx;
    // Use up every RX buffer with refusals, and one more.
    for port in 0..u32::from(SLOTS) + 1 {
        let refused = GuestConn::new(2000 + port, 53, 65536);
        ctx.send(refused.hdr(OP_REQUEST), &[]);
    }
    assert_eq!(ctx.received.len(), usize::from(SLOTS));
    // Out of buffers with an RST still owed: a kick is wanted at the next
    // buffer.
    assert_eq!(ctx.queues[0].avail_event(&ctx.mem), rx_posted);
    ctx.post_rx(1);
    ctx.pump();
    assert_eq!(ctx.received.len(), usize::from(SLOTS) + 1);
}

#[test]
fn event_idx_transport_reset_does_not_wait_for_a_suppressed_kick() {
    let mut ctx = Ctx::with_event_idx(0);
    // The driver keeps several event buffers, as Linux does.
    ctx.post_event_buffer(4);
    ctx.post_event_buffer(4);
    ctx.post_event_buffer(4);
    ctx.dev().send_transport_reset().unwrap();
    assert_eq!(ctx.queues[2].take_used(&ctx.mem).len(), 1);
    // A kick is wanted at the driver's next event buffer, past the two it
    // still has: the device's own position (1) would never be passed.
    assert_eq!(ctx.queues[2].avail_event(&ctx.mem), 3);
    ctx.run();

    let mut next = UnixStream::connect(&ctx.uds).unwrap();
    next.write_all(b"CONNECT 54\n").unwrap();
    ctx.no_packet();
    // The driver refills without a kick (it did not see avail_event yet):
    // the device notices on its next run.
    ctx.post_event_buffer(4);
    let mut other = UnixStream::connect(&ctx.uds).unwrap();
    other.write_all(b"CONNECT 55\n").unwrap();
    let (req, _) = ctx.next_packet();
    assert_eq!((req.op, req.dst_port), (OP_REQUEST, 54));
    let (req, _) = ctx.next_packet();
    assert_eq!((req.op, req.dst_port), (OP_REQUEST, 55));

    // And with a kick, as the avail_event asks.
    ctx.dev().send_transport_reset().unwrap();
    ctx.run();
    assert_eq!(ctx.queues[2].avail_event(&ctx.mem), 4);
    let mut third = UnixStream::connect(&ctx.uds).unwrap();
    third.write_all(b"CONNECT 56\n").unwrap();
    ctx.no_packet();
    // Use the slot the first event took: the driver reposts it.
    ctx.ev_free.push(0);
    ctx.post_event_buffer(4);
    ctx.kick(2);
    let (req, _) = ctx.next_packet();
    assert_eq!((req.op, req.dst_port), (OP_REQUEST, 56));
}
