//! virtio-net end to end, with a real host peer: each test creates a
//! network namespace holding a TAP device with the host's address, starts
//! ember inside it (`ip netns exec`) with a `network-interfaces` entry for
//! that TAP, and talks to the `virtio_net` guest over UDP from a socket in
//! the namespace. The guest resolves the host with ARP, answers the host's
//! ARP requests, says hello, echoes datagrams and runs the commands
//! described in `guests/virtio_net.c`; the host kernel's ARP replies and
//! neighbour table show that real frames crossed the TAP both ways.

use std::collections::BTreeSet;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::thread;
use std::time::{Duration, Instant};

use ember_tests::netns::{recv_datagram, NetNs};
use ember_tests::{default_config, guest_path, merge_patch, Launch, Output, RunningVm};
use serde_json::{json, Value};

const TAP: &str = "embt0";
const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 2);
const HOST_PORT: u16 = 7001;
const GUEST_PORT: u16 = 7000;
const GUEST_MAC: &str = "06:00:0a:c8:00:02";
const HELLO: &[u8] = b"hello from the ember virtio-net guest";
/// Longest wait for one datagram or one report line.
const WAIT: Duration = Duration::from_secs(10);
/// Frames in the burst: more than the 256 receive buffers.
const BURST: usize = 600;
const QUEUE_SIZE: usize = 256;

// Feature bits (virtio 1.2 §5.1.3, §6).
const F_MTU: u32 = 3;
const F_MAC: u32 = 5;
const F_CSUM: u32 = 0;
const F_GUEST_CSUM: u32 = 1;
const F_VERSION_1: u32 = 32;

/// A guest running in its own namespace, and the host's UDP socket there.
/// Fields drop in order: the VM first, the namespace last.
struct Peer {
    vm: RunningVm,
    socket: UdpSocket,
    guest: SocketAddr,
    ns: NetNs,
}

/// A UDP socket with a receive buffer big enough for every echo of a burst
/// (SO_RCVBUFFORCE: root may exceed net.core.rmem_max).
fn udp_socket(addr: SocketAddrV4) -> io::Result<UdpSocket> {
    let socket = UdpSocket::bind(addr)?;
    let size: libc::c_int = 32 << 20;
    // SAFETY: setsockopt reads one c_int that lives across the call, on a
    // socket this function owns.
    let ret = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    socket.set_read_timeout(Some(WAIT))?;
    Ok(socket)
}

fn net_config(args: &str, iface: Value) -> Value {
    let mut config = default_config(&guest_path("virtio_net"));
    merge_patch(
        &mut config,
        &json!({
            "boot-source": {"boot_args": format!(
                "console=ttyS0 net.ip={GUEST_IP} net.host_ip={HOST_IP} net.port={GUEST_PORT} \
                 net.host_port={HOST_PORT} {args}"
            )},
            "network-interfaces": [iface],
        }),
    );
    config
}

fn iface() -> Value {
    json!({"iface_id": "eth0", "host_dev_name": TAP, "guest_mac": GUEST_MAC, "mtu": 1500})
}

/// Starts the guest with `config` next to a fresh TAP and waits for its
/// hello datagram.
fn start(config: &Value) -> Peer {
    let mut ns = NetNs::new().expect("create a network namespace");
    ns.add_tap(TAP, &format!("{HOST_IP}/24"))
        .expect("create the TAP");
    let socket = ns
        .run(|| udp_socket(SocketAddrV4::new(HOST_IP, HOST_PORT)))
        .expect("enter the namespace")
        .expect("bind the host socket");
    let vm = ns
        .wrap(Launch::new(config))
        .spawn()
        .expect("start ember in the namespace");
    let mut peer = Peer {
        vm,
        socket,
        guest: SocketAddr::V4(SocketAddrV4::new(GUEST_IP, GUEST_PORT)),
        ns,
    };
    let mut buf = [0u8; 2048];
    let (len, from) = match recv_datagram(&peer.socket, &mut buf) {
        Ok(got) => got,
        Err(e) => panic!("no hello from the guest: {e}\n{}", peer.output()),
    };
    assert_eq!(&buf[..len], HELLO, "{}", peer.output());
    let guest = peer.guest;
    assert_eq!(from, guest, "{}", peer.output());
    peer
}

impl Peer {
    /// The serial output so far, then the VM is killed: for failure messages.
    fn output(&mut self) -> String {
        // Let the serial lines of the last moments arrive.
        let _ = self.vm.wait_for_line(|_| false, Duration::from_millis(300));
        self.vm.stdout()
    }

    fn send(&self, payload: &[u8]) {
        self.socket
            .send_to(payload, self.guest)
            .expect("send a datagram to the guest");
    }

    fn recv(&mut self) -> Vec<u8> {
        let mut buf = [0u8; 2048];
        match recv_datagram(&self.socket, &mut buf) {
            Ok((len, from)) => {
                assert_eq!(from, self.guest);
                buf[..len].to_vec()
            }
            Err(e) => panic!("no datagram from the guest: {e}\n{}", self.output()),
        }
    }

    /// Sends "!quit" and waits for the guest to report and reset.
    fn quit(self) -> Output {
        self.send(b"!quit");
        let out = self
            .vm
            .wait(WAIT)
            .expect("ember exits after the guest resets");
        assert!(out.status.success(), "{out}");
        assert!(
            out.stdout.lines().any(|l| l == "virtio_net done"),
            "the guest did not finish\n{out}"
        );
        out
    }
}

/// The guest's "net: " lines, without the prefix.
fn lines(out: &Output) -> Vec<&str> {
    out.stdout
        .lines()
        .filter_map(|l| l.strip_prefix("net: "))
        .collect()
}

/// The value after `key` in the guest's final counter line.
fn counter(out: &Output, key: &str) -> u64 {
    let line = lines(out)
        .into_iter()
        .find(|l| l.starts_with("echoed "))
        .unwrap_or_else(|| panic!("no counter line\n{out}"));
    let words: Vec<&str> = line.split(' ').collect();
    words
        .iter()
        .position(|w| *w == key)
        .and_then(|i| words.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {line:?}"))
}

fn hex(s: &str) -> u64 {
    u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap_or_else(|e| panic!("{s:?}: {e}"))
}

fn features(out: &Output) -> (u64, u64) {
    let line = lines(out)
        .into_iter()
        .find_map(|l| l.strip_prefix("features offered "))
        .unwrap_or_else(|| panic!("no features line\n{out}"));
    let (offered, accepted) = line.split_once(" accepted ").expect("features line format");
    (hex(offered), hex(accepted))
}

/// Receives `count` datagrams on another thread while the caller sends.
fn collect(socket: &UdpSocket, count: usize) -> thread::JoinHandle<Vec<Vec<u8>>> {
    let socket = socket.try_clone().expect("clone the host socket");
    thread::spawn(move || {
        let mut got = Vec::new();
        let mut buf = [0u8; 2048];
        let deadline = Instant::now() + WAIT;
        while got.len() < count && Instant::now() < deadline {
            match recv_datagram(&socket, &mut buf) {
                Ok((len, _)) => got.push(buf[..len].to_vec()),
                Err(_) => break,
            }
        }
        got
    })
}

/// Sends "!hold", then a burst of BURST distinct datagrams while another
/// thread collects the echoes: the guest holds its receive buffers until
/// the device has filled them all, so the rest of the burst waits in the
/// TAP. Every datagram must come back exactly once.
fn burst_without_loss(peer: &mut Peer) {
    peer.send(b"!hold");
    let collector = collect(&peer.socket, BURST);
    let sent: BTreeSet<Vec<u8>> = (0..BURST)
        .map(|i| format!("burst {i:04} {}", "x".repeat(i % 200)).into_bytes())
        .collect();
    for payload in &sent {
        peer.send(payload);
    }
    let echoes = collector.join().expect("collector thread");
    let echoed: BTreeSet<Vec<u8>> = echoes.iter().cloned().collect();
    assert_eq!(
        echoes.len(),
        BURST,
        "{} of {BURST} datagrams came back\n{}",
        echoes.len(),
        peer.output()
    );
    assert_eq!(echoed, sent, "every datagram comes back exactly once");
}

/// Has the guest send `frames` datagrams of `payload` bytes at full speed
/// and checks they all arrive, in order.
fn bulk_transmit(peer: &mut Peer, frames: u64, payload: usize) {
    let collector = collect(&peer.socket, frames as usize + 1);
    peer.send(format!("!tx {frames} {payload}").as_bytes());
    let got = collector.join().expect("collector thread");
    let Some((last, data)) = got.split_last() else {
        panic!("nothing came back\n{}", peer.output());
    };
    let done = String::from_utf8_lossy(last);
    assert!(
        done.starts_with(&format!("!txdone {frames} ")),
        "{done:?} after {} datagrams\n{}",
        data.len(),
        peer.output()
    );
    assert_eq!(data.len() as u64, frames, "{}", peer.output());
    for (seq, d) in data.iter().enumerate() {
        assert_eq!(d.len(), payload);
        let mut word = [0u8; 8];
        word.copy_from_slice(&d[..8]);
        assert_eq!(u64::from_be_bytes(word), seq as u64, "frames out of order");
    }
}

/// ARP both ways, an echo, and a burst larger than the receive queue that
/// the guest lets pile up in the TAP before it takes any of it: every
/// datagram comes back, once.
#[test]
fn guest_resolves_the_host_answers_arp_and_echoes_a_burst_without_loss() {
    let mut peer = start(&net_config("", iface()));
    let tap_mac = peer.ns.mac(TAP).expect("TAP MAC");

    // The guest's ARP request taught the host kernel the guest's MAC.
    let neigh = peer.ns.neighbours(TAP).unwrap();
    assert!(
        neigh.contains(&format!("{GUEST_IP} lladdr {GUEST_MAC}")),
        "host neighbour table: {neigh:?}\n{}",
        peer.output()
    );
    // Forget it: the next datagram makes the host kernel ask, and the
    // guest must answer.
    peer.ns
        .ip(&["neigh", "flush", "dev", TAP])
        .expect("flush the neighbour table");
    peer.send(b"ping 1");
    assert_eq!(peer.recv(), b"ping 1");
    peer.send(b"ping 2");
    assert_eq!(peer.recv(), b"ping 2");
    let neigh = peer.ns.neighbours(TAP).unwrap();
    assert!(
        neigh.contains(&format!("{GUEST_IP} lladdr {GUEST_MAC}")),
        "the guest's ARP reply did not reach the host: {neigh:?}\n{}",
        peer.output()
    );

    burst_without_loss(&mut peer);

    let out = peer.quit();
    let lines = lines(&out);
    for want in [
        format!("mac {GUEST_MAC} mtu 1500"),
        "queues rx 256 tx 256 status 0xf rx buffers 256".to_string(),
        format!("arp request for {HOST_IP}"),
        format!("arp reply {HOST_IP} is at {tap_mac}"),
        format!("hello sent to {HOST_IP}:{HOST_PORT}"),
        format!("udp from {HOST_IP}:{HOST_PORT} len 6: ping 1"),
        format!("arp request from {HOST_IP} answered"),
        format!("hold: {QUEUE_SIZE} of {QUEUE_SIZE} receive buffers filled"),
    ] {
        assert!(lines.contains(&want.as_str()), "missing {want:?}\n{out}");
    }
    let (offered, accepted) = features(&out);
    for bit in [F_VERSION_1, F_MAC, F_MTU, F_CSUM, F_GUEST_CSUM] {
        assert_ne!(offered & 1 << bit, 0, "feature {bit} not offered\n{out}");
    }
    assert_eq!(
        accepted,
        1 << F_VERSION_1 | 1 << F_MAC | 1 << F_MTU,
        "{out}"
    );
    assert_eq!(counter(&out, "echoed"), 2 + BURST as u64, "{out}");
    assert_eq!(counter(&out, "bad_udp"), 0, "{out}");
    assert_eq!(counter(&out, "bad_num_buffers"), 0, "{out}");
    assert!(counter(&out, "arp_answered") >= 1, "{out}");
}

/// The guest transmits more frames than its queue holds, as fast as it can,
/// and counts a stream from the host: nothing lost, nothing reordered.
#[test]
fn bulk_transmit_and_receive_keep_every_frame_in_order() {
    const FRAMES: u64 = 2000;
    const PAYLOAD: usize = 1472;
    const RX_FRAMES: u64 = 500;
    let mut peer = start(&net_config("", iface()));

    bulk_transmit(&mut peer, FRAMES, PAYLOAD);

    peer.send(b"!rx");
    let payload = vec![0x5au8; PAYLOAD];
    for _ in 0..RX_FRAMES {
        peer.send(&payload);
    }
    peer.send(b"!rxend");
    let stat = String::from_utf8(peer.recv()).expect("ASCII reply");
    let words: Vec<&str> = stat.split(' ').collect();
    // Each frame: Ethernet, IPv4 and UDP headers and the payload.
    let frame = 14 + 20 + 8 + PAYLOAD as u64;
    assert_eq!(
        words[..3],
        [
            "!rxstat",
            &RX_FRAMES.to_string(),
            &(RX_FRAMES * frame).to_string()
        ]
    );

    let out = peer.quit();
    assert_eq!(counter(&out, "counted"), RX_FRAMES, "{out}");
    // The hello, the transmitted frames, the two replies (and ARP).
    assert!(counter(&out, "tx_frames") >= FRAMES + 3, "{out}");
    // Batched kicks: far fewer notifications than frames.
    assert!(counter(&out, "tx") < FRAMES / 4, "{out}");
}

/// With VIRTIO_F_EVENT_IDX the driver kicks only when the device's
/// avail_event asks for it (virtio 1.2 §2.7.10): a device that keeps
/// avail_event wrong stalls one of these.
#[test]
fn event_idx_suppression_loses_no_kick() {
    const F_EVENT_IDX: u32 = 29;
    let mut peer = start(&net_config("net.event_idx=1", iface()));
    peer.send(b"one");
    assert_eq!(peer.recv(), b"one");
    burst_without_loss(&mut peer);
    bulk_transmit(&mut peer, 3000, 1472);
    for i in 0..50 {
        let payload = format!("after {i}").into_bytes();
        peer.send(&payload);
        assert_eq!(peer.recv(), payload);
    }
    let out = peer.quit();
    let (_, accepted) = features(&out);
    assert_ne!(accepted & 1 << F_EVENT_IDX, 0, "{out}");
    assert_eq!(counter(&out, "echoed"), 51 + BURST as u64, "{out}");
    // The device asked for few of the transmit kicks.
    assert!(counter(&out, "tx") < 3000 / 8, "{out}");
}

/// Buffers described by two descriptors each, split inside the virtio-net
/// header, at its end (Linux's layout) and inside the IPv4 header, with a
/// gap between the two parts: the device gathers transmitted frames and
/// scatters received ones across the boundary, byte for byte.
#[test]
fn frames_cross_descriptor_boundaries_intact() {
    for split in [5, 12, 40] {
        let mut peer = start(&net_config(&format!("net.split={split}"), iface()));
        for len in [1usize, 7, 100, 555, 1000, 1472] {
            let payload: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
            peer.send(&payload);
            assert_eq!(peer.recv(), payload, "split {split}, {len} bytes");
        }
        let out = peer.quit();
        let lines = lines(&out);
        // Two descriptors per buffer: half as many buffers.
        assert!(
            lines.contains(&"queues rx 256 tx 256 status 0xf rx buffers 128"),
            "{out}"
        );
        assert_eq!(counter(&out, "echoed"), 6, "{out}");
        assert_eq!(counter(&out, "bad_udp"), 0, "{out}");
        assert_eq!(counter(&out, "bad_num_buffers"), 0, "{out}");
    }
}

/// A driver reset (status 0) and a fresh set-up, as when Linux reloads
/// virtio_net: the device comes back on new queues and carries frames.
#[test]
fn device_works_again_after_a_driver_reset() {
    let mut peer = start(&net_config("", iface()));
    peer.send(b"before");
    assert_eq!(peer.recv(), b"before");
    peer.send(b"!reset");
    assert_eq!(peer.recv(), HELLO, "hello again after the reset");
    for i in 0..20 {
        let payload = format!("after {i}").into_bytes();
        peer.send(&payload);
        assert_eq!(peer.recv(), payload);
    }
    let out = peer.quit();
    let lines = lines(&out);
    assert!(lines.contains(&"device reset and set up again"), "{out}");
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.starts_with("queues rx 256 tx 256 status 0xf"))
            .count(),
        2,
        "{out}"
    );
    // One echo before the reset, twenty after.
    assert_eq!(counter(&out, "echoed"), 21, "{out}");
}

/// A frame larger than the receive buffer (the TAP's MTU is raised, the
/// guest's buffers hold 1514-byte frames) is dropped whole, never cut to
/// fit, and the frames after it flow.
#[test]
fn oversized_frames_are_dropped_whole() {
    let mut peer = start(&net_config("", iface()));
    peer.ns
        .ip(&["link", "set", "dev", TAP, "mtu", "4000"])
        .expect("raise the TAP's MTU");
    for round in 0..3 {
        peer.send(&vec![b'L'; 3000]);
        let small = format!("small {round}").into_bytes();
        peer.send(&small);
        assert_eq!(peer.recv(), small, "round {round}");
    }
    let out = peer.quit();
    assert_eq!(counter(&out, "echoed"), 3, "{out}");
    assert_eq!(counter(&out, "bad_udp"), 0, "no truncated frame\n{out}");
    assert!(
        out.stderr
            .contains("larger than the 2048-byte receive chain"),
        "ember reports the drop\n{out}"
    );
}

/// Drives, network interfaces, vsock: attached in that order in the next
/// 4 KiB slots from 0xC000_1000, GSIs from 5, listed alike on the command
/// line and in the ACPI DSDT. Without `guest_mac` the device offers no MAC
/// (the driver would pick one), which the guest reports.
#[test]
fn devices_get_firecracker_slots_and_a_mac_only_when_configured() {
    let dir = tempfile::tempdir().expect("temp dir");
    let image = dir.path().join("disk.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(1 << 20))
        .expect("create the image");
    for discover in ["cmdline", "acpi"] {
        let mut ns = NetNs::new().expect("create a network namespace");
        ns.add_tap(TAP, &format!("{HOST_IP}/24"))
            .expect("create the TAP");
        let mut config = net_config(
            &format!("discover={discover}"),
            json!({"iface_id": "eth0", "host_dev_name": TAP}),
        );
        merge_patch(
            &mut config,
            &json!({
                "drives": [{"drive_id": "d", "path_on_host": image, "is_root_device": false}],
                "vsock": {"guest_cid": 3, "uds_path": dir.path().join(format!("v-{discover}.sock"))},
            }),
        );
        let out = ns
            .wrap(Launch::new(&config))
            .run()
            .expect("run ember in the namespace");
        assert!(out.status.success(), "{out}");
        let lines = lines(&out);
        let devices: Vec<&str> = lines
            .iter()
            .copied()
            .filter(|l| l.starts_with("virtio-mmio "))
            .collect();
        assert_eq!(
            devices,
            [
                "virtio-mmio 0xc0001000 gsi 5 device 2",
                "virtio-mmio 0xc0002000 gsi 6 device 1",
                "virtio-mmio 0xc0003000 gsi 7 device 19",
            ],
            "{discover}\n{out}"
        );
        let (offered, _) = features(&out);
        assert_eq!(offered & (1 << F_MAC | 1 << F_MTU), 0, "{out}");
        assert!(lines.contains(&"the device offers no MAC address"), "{out}");
    }
}

/// A TAP is attached to one VM at a time: a second ember on the same TAP
/// fails to start and says which TAP.
#[test]
fn a_tap_in_use_is_refused_by_name() {
    let mut ns = NetNs::new().expect("create a network namespace");
    ns.add_tap(TAP, &format!("{HOST_IP}/24"))
        .expect("create the TAP");
    let config = net_config("net.idle=5", iface());
    // The first VM holds the TAP until it idles out (seconds) or is killed
    // when `first` drops.
    let mut first = ns
        .wrap(Launch::new(&config))
        .spawn()
        .expect("start the first VM");
    let want = format!("net: arp request for {HOST_IP}");
    first
        .wait_for_line(|l| l == want, WAIT)
        .expect("the first VM is up");
    let second = ns.wrap(Launch::new(&config)).run().expect("run ember");
    assert!(!second.status.success(), "{second}");
    assert!(
        second.stderr.contains(TAP),
        "the error names the TAP\n{second}"
    );
    assert!(!second.stdout.contains("net: "), "no guest ran\n{second}");
    drop(first);
}

/// CPU time, in clock ticks, of the process's threads that are not vCPUs:
/// the event loop and the API, which must sleep while nothing happens.
fn vmm_thread_ticks(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(|t| t.ok())
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm"))
                .is_ok_and(|c| !c.starts_with("ember_vcpu"))
        })
        .filter_map(|t| std::fs::read_to_string(t.path().join("stat")).ok())
        .map(|stat| {
            // Fields after "(comm)": state is the first; utime, stime are
            // the 12th and 13th.
            let rest = stat.rfind(')').map_or("", |i| &stat[i + 1..]);
            let f: Vec<u64> = rest
                .split_whitespace()
                .skip(11)
                .take(2)
                .filter_map(|v| v.parse().ok())
                .collect();
            f.iter().sum::<u64>()
        })
        .sum()
}

/// Has the guest send `frames` datagrams, and calls `fault` once the first
/// hundred have arrived; returns the datagrams received after that and
/// whether the guest's `!txdone` came.
fn transmit_through(peer: &mut Peer, frames: u64, fault: impl FnOnce(&NetNs)) -> (usize, bool) {
    let socket = peer.socket.try_clone().expect("clone the host socket");
    peer.send(format!("!tx {frames} 64").as_bytes());
    let mut buf = [0u8; 2048];
    for _ in 0..100 {
        if recv_datagram(&socket, &mut buf).is_err() {
            panic!("the guest did not start sending\n{}", peer.output());
        }
    }
    fault(&peer.ns);
    let mut got = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        match recv_datagram(&socket, &mut buf) {
            Ok((len, _)) if buf[..len].starts_with(b"!txdone ") => return (got, true),
            Ok(_) => got += 1,
            Err(_) => break,
        }
    }
    (got, false)
}

/// The TAP is set down under a guest that transmits, then brought back up;
/// later it is deleted. The guest's transmissions always complete (frames
/// the TAP refuses are dropped and counted), traffic flows again once the
/// TAP is up, a deleted TAP leaves the event loop asleep, and the VM runs
/// on to a clean exit.
#[test]
fn a_tap_set_down_or_deleted_under_a_sending_guest() {
    const FRAMES: u64 = 60_000;
    let mut peer = start(&net_config("net.idle=3", iface()));
    let (got, done) = transmit_through(&mut peer, FRAMES, |ns| {
        ns.ip(&["link", "set", TAP, "down"])
            .expect("set the TAP down");
        thread::sleep(Duration::from_millis(300));
        ns.ip(&["link", "set", TAP, "up"]).expect("set the TAP up");
    });
    assert!(
        done,
        "no !txdone after the TAP came back\n{}",
        peer.output()
    );
    assert!(
        (got as u64) < FRAMES - 100,
        "every frame arrived although the TAP was down: {got}"
    );
    // Up again: an echo goes both ways.
    peer.send(b"after the TAP came back");
    assert_eq!(peer.recv(), b"after the TAP came back");

    // Deleted while the guest sends: its transmissions still complete.
    let pid = peer.vm.pid();
    let (_, done) = transmit_through(&mut peer, FRAMES, |ns| {
        ns.ip(&["link", "del", TAP]).expect("delete the TAP");
    });
    assert!(!done, "a !txdone crossed a deleted TAP");
    // The event loop sleeps: the dead TAP's error is not a busy loop.
    let before = vmm_thread_ticks(pid);
    thread::sleep(Duration::from_secs(1));
    let spent = vmm_thread_ticks(pid) - before;
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    assert!(
        spent * 10 < hz * 2,
        "the VMM's threads used {spent} of {hz} ticks in a second with the TAP gone"
    );
    // With nothing more to receive, the guest reports and resets.
    let out = peer
        .vm
        .wait(Duration::from_secs(60))
        .expect("ember exits after the guest resets");
    assert!(out.status.success(), "{out}");
    assert!(
        out.stdout.lines().any(|l| l == "virtio_net done"),
        "the guest did not finish\n{out}"
    );
    let tx: u64 = lines(&out)
        .into_iter()
        .find_map(|l| l.split(" tx_frames ").nth(1))
        .and_then(|v| v.split(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no tx_frames\n{out}"));
    assert!(tx >= 2 * FRAMES, "the guest sent {tx} frames\n{out}");
    let refused = out
        .stderr_lines()
        .iter()
        .filter(|l| l.contains("failed to write"))
        .count();
    assert!(refused >= 1, "no write failure logged\n{out}");
    assert!(
        refused <= 100,
        "{refused} lines of log for the refused frames: the log is flooded\n{out}"
    );
}
