//! virtio-net throughput of the release `ember` binary with 1514-byte
//! Ethernet frames (UDP datagrams of 1472 bytes), and the VM exits it costs.
//!
//! Set-up: a network namespace with a TAP (`txqueuelen` 10000) holding the
//! host's address, ember running in it, and the `virtio_net` guest driving
//! its queues from ring 3 by polling (no interrupts), publishing in
//! batches of 64 frames.
//!
//! - TX (guest to host): the host sends "!tx N 1472"; the guest sends N
//!   datagrams as fast as its transmit queue allows. The host counts them on
//!   its UDP socket (32 MiB receive buffer, its own thread) and times the
//!   first to the last; the guest times the whole batch with the TSC.
//! - RX (host to guest): the host sends "!rx", then N datagrams as fast as
//!   `sendto` goes, then (after a pause) "!rxend"; the guest counts what it
//!   received and times the first to the last frame. Frames the guest cannot
//!   take in time wait in the TAP; when the TAP queue is full the kernel
//!   drops them, so the rate is the guest's receive rate with a backlog and
//!   the table also shows how many arrived.
//!
//! Each phase runs [`RUNS`] times in one VM; the table shows medians.
//! Exits per KiB: `perf stat -p` on ember, attached around one phase of N
//! and one of N/4 frames; the difference of the counts over the difference
//! of the frame bytes, so that fixed costs cancel. On this PVM host
//! `kvm:kvm_exit` is not emitted: `kvm:kvm_mmio` counts MMIO accesses
//! (queue notifications included, although they end in an ioeventfd) and
//! `kvm:kvm_userspace_exit` the exits that reach ember.
//!
//! Run with `cargo bench -p ember-tests --bench net`.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::thread;
use std::time::{Duration, Instant};

use ember_tests::netns::{recv_datagram, NetNs};
use ember_tests::perf::PerfStat;
use ember_tests::{
    default_config, ember_binary, guest_path, median, merge_patch, tsc_khz, Launch, RunningVm,
};
use serde_json::json;

const TAP: &str = "embt0";
const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 2);
const HOST_PORT: u16 = 7001;
const GUEST_PORT: u16 = 7000;
const PAYLOAD: usize = 1472;
/// Ethernet + IPv4 + UDP headers + payload.
const FRAME: u64 = 14 + 20 + 8 + PAYLOAD as u64;
const TX_FRAMES: u64 = 100_000;
const RX_FRAMES: u64 = 100_000;
const RUNS: usize = 5;
const TAP_QUEUE: u32 = 10_000;
/// Counted with perf; `kvm:kvm_exit` stays 0 on a PVM host (see above).
const EVENTS: [&str; 4] = [
    "kvm:kvm_exit",
    "kvm:kvm_mmio",
    "kvm:kvm_userspace_exit",
    "kvm:kvm_pio",
];

fn udp_socket() -> UdpSocket {
    let socket =
        UdpSocket::bind(SocketAddrV4::new(HOST_IP, HOST_PORT)).expect("bind the host socket");
    let size: libc::c_int = 32 << 20;
    // SAFETY: setsockopt reads one c_int that lives across the call.
    let ret = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(
        ret,
        0,
        "SO_RCVBUFFORCE: {}",
        std::io::Error::last_os_error()
    );
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    socket
}

struct Bench {
    vm: RunningVm,
    socket: UdpSocket,
    guest: SocketAddr,
    tsc_khz: f64,
    _ns: NetNs,
}

/// One TX phase: frames received, host rate and guest rate (frames/s).
struct Tx {
    received: u64,
    host_fps: f64,
    guest_fps: f64,
}

/// One RX phase: frames the guest counted, and its rate (frames/s).
struct Rx {
    counted: u64,
    guest_fps: f64,
    send_fps: f64,
}

impl Bench {
    fn start(tsc_khz: f64, args: &str) -> Self {
        let mut ns = NetNs::new().expect("network namespace");
        ns.add_tap(TAP, &format!("{HOST_IP}/24")).expect("TAP");
        ns.set_txqueuelen(TAP, TAP_QUEUE).expect("txqueuelen");
        let socket = ns.run(udp_socket).expect("enter the namespace");
        let mut config = default_config(&guest_path("virtio_net"));
        merge_patch(
            &mut config,
            &json!({
                "boot-source": {"boot_args": format!(
                    "console=ttyS0 net.ip={GUEST_IP} net.host_ip={HOST_IP} net.port={GUEST_PORT} \
                     net.host_port={HOST_PORT} net.idle=100 {args}"
                )},
                "network-interfaces": [{"iface_id": "eth0", "host_dev_name": TAP,
                                        "guest_mac": "06:00:0a:c8:00:02"}],
            }),
        );
        let vm = ns
            .wrap(Launch::new(&config).timeout(Duration::from_secs(600)))
            .spawn()
            .expect("start ember");
        let mut buf = [0u8; 2048];
        let (_, guest) = recv_datagram(&socket, &mut buf).expect("the guest's hello");
        Bench {
            vm,
            socket,
            guest,
            tsc_khz,
            _ns: ns,
        }
    }

    fn send(&self, payload: &[u8]) {
        self.socket.send_to(payload, self.guest).expect("sendto");
    }

    fn recv_text(&self) -> Option<String> {
        let mut buf = [0u8; 2048];
        let (len, _) = recv_datagram(&self.socket, &mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..len]).into_owned())
    }

    fn tx(&self, frames: u64) -> Tx {
        let socket = self.socket.try_clone().expect("clone the socket");
        let counter = thread::spawn(move || {
            let mut buf = [0u8; 2048];
            let (mut first, mut last) = (None, Instant::now());
            let mut received = 0u64;
            loop {
                let Ok((len, _)) = recv_datagram(&socket, &mut buf) else {
                    return (received, first, last, None);
                };
                if buf[0] == b'!' {
                    let done = String::from_utf8_lossy(&buf[..len]).into_owned();
                    return (received, first, last, Some(done));
                }
                last = Instant::now();
                first.get_or_insert(last);
                received += 1;
            }
        });
        self.send(format!("!tx {frames} {PAYLOAD}").as_bytes());
        let (received, first, last, done) = counter.join().expect("counter thread");
        let done = done.unwrap_or_else(|| panic!("no !txdone after {received} frames"));
        let ticks: f64 = done
            .split(' ')
            .nth(2)
            .and_then(|t| t.parse().ok())
            .unwrap_or_else(|| panic!("bad reply {done:?}"));
        let host_secs = first.map_or(f64::NAN, |f| (last - f).as_secs_f64());
        Tx {
            received,
            host_fps: received.saturating_sub(1) as f64 / host_secs,
            guest_fps: frames as f64 / (ticks / (self.tsc_khz * 1e3)),
        }
    }

    fn rx(&self, frames: u64) -> Rx {
        let payload = vec![0x5au8; PAYLOAD];
        self.send(b"!rx");
        let start = Instant::now();
        for _ in 0..frames {
            self.send(&payload);
        }
        let send_fps = frames as f64 / start.elapsed().as_secs_f64();
        // Let the backlog drain; "!rxend" must not be dropped with it.
        thread::sleep(Duration::from_millis(300));
        let stat = (0..5)
            .find_map(|_| {
                self.send(b"!rxend");
                self.recv_text().filter(|t| t.starts_with("!rxstat "))
            })
            .expect("!rxstat reply");
        let nums: Vec<f64> = stat
            .split(' ')
            .skip(1)
            .filter_map(|w| w.parse().ok())
            .collect();
        let (counted, ticks) = (nums[0], nums[2]);
        Rx {
            counted: counted as u64,
            guest_fps: (counted - 1.0) / (ticks / (self.tsc_khz * 1e3)),
            send_fps,
        }
    }

    /// Exit counts per KiB of frames over phases of `frames` and `frames/4`.
    fn exits_per_kib(&self, rx: bool, frames: u64) -> Option<Vec<f64>> {
        let measure = |n: u64| -> Option<(Vec<f64>, f64)> {
            let perf = PerfStat::attach(self.vm.pid(), &EVENTS)
                .map_err(|e| eprintln!("perf: {e}"))
                .ok()?;
            let moved = if rx {
                self.rx(n).counted
            } else {
                self.tx(n);
                n
            };
            let counts = perf.finish().map_err(|e| eprintln!("perf: {e}")).ok()?;
            Some((
                EVENTS.iter().map(|e| counts[*e] as f64).collect(),
                (moved * FRAME) as f64 / 1024.0,
            ))
        };
        let (big, big_kib) = measure(frames)?;
        let (small, small_kib) = measure(frames / 4)?;
        Some(
            big.iter()
                .zip(&small)
                .map(|(b, s)| (b - s) / (big_kib - small_kib))
                .collect(),
        )
    }
}

/// Medians of one driver configuration.
struct Results {
    tx_host_fps: f64,
    tx_guest_fps: f64,
    tx_lost: f64,
    rx_guest_fps: f64,
    rx_lost: f64,
    rx_send_fps: f64,
    tx_exits: Option<Vec<f64>>,
    rx_exits: Option<Vec<f64>>,
    counters: String,
}

fn run_config(tsc_khz: f64, args: &str) -> Results {
    let bench = Bench::start(tsc_khz, args);
    let (mut tx_host, mut tx_guest, mut tx_lost) = (Vec::new(), Vec::new(), Vec::new());
    let (mut rx_guest, mut rx_lost, mut rx_send) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..RUNS {
        let tx = bench.tx(TX_FRAMES);
        tx_host.push(tx.host_fps);
        tx_guest.push(tx.guest_fps);
        tx_lost.push((TX_FRAMES - tx.received) as f64);
        let rx = bench.rx(RX_FRAMES);
        rx_guest.push(rx.guest_fps);
        rx_lost.push((RX_FRAMES - rx.counted) as f64);
        rx_send.push(rx.send_fps);
    }
    let tx_exits = bench.exits_per_kib(false, TX_FRAMES);
    let rx_exits = bench.exits_per_kib(true, RX_FRAMES);
    bench.send(b"!quit");
    let out = bench.vm.wait(Duration::from_secs(30)).expect("ember exits");
    let counters = out
        .stdout
        .lines()
        .find(|l| l.starts_with("net: echoed "))
        .unwrap_or("net: (no counter line)")
        .to_string();
    Results {
        tx_host_fps: median(tx_host),
        tx_guest_fps: median(tx_guest),
        tx_lost: median(tx_lost),
        rx_guest_fps: median(rx_guest),
        rx_lost: median(rx_lost),
        rx_send_fps: median(rx_send),
        tx_exits,
        rx_exits,
        counters,
    }
}

fn main() {
    println!("ember: {}", ember_binary().display());
    let tsc_khz = tsc_khz();
    println!("guest TSC: {:.3} GHz (KVM_GET_TSC_KHZ)", tsc_khz / 1e6);
    let configs = [("flags", ""), ("event_idx", "net.event_idx=1")];
    let results: Vec<Results> = configs
        .iter()
        .map(|(_, args)| run_config(tsc_khz, args))
        .collect();

    let mib = |fps: f64| fps * FRAME as f64 / (1 << 20) as f64;
    let row = |label: &str, cells: Vec<String>| {
        print!("{label:<42}");
        for c in cells {
            print!(" {c:>11}");
        }
        println!();
    };
    let each = |f: &dyn Fn(&Results) -> (String, String)| -> Vec<String> {
        results
            .iter()
            .flat_map(|r| {
                let (tx, rx) = f(r);
                [tx, rx]
            })
            .collect()
    };
    println!();
    row(
        "virtio-net, 1514-byte frames",
        configs
            .iter()
            .flat_map(|(name, _)| [format!("TX {name}"), format!("RX {name}")])
            .collect(),
    );
    row(
        "frames/s (host socket / guest TSC)",
        each(&|r| {
            (
                format!("{:.0}", r.tx_host_fps),
                format!("{:.0}", r.rx_guest_fps),
            )
        }),
    );
    row(
        "frames/s (guest TSC, whole TX batch)",
        each(&|r| (format!("{:.0}", r.tx_guest_fps), String::new())),
    );
    row(
        "MiB/s of frames",
        each(&|r| {
            (
                format!("{:.1}", mib(r.tx_host_fps)),
                format!("{:.1}", mib(r.rx_guest_fps)),
            )
        }),
    );
    row(
        &format!("frames lost of {TX_FRAMES}"),
        each(&|r| (format!("{:.0}", r.tx_lost), format!("{:.0}", r.rx_lost))),
    );
    row(
        "host sendto rate (frames/s)",
        each(&|r| (String::new(), format!("{:.0}", r.rx_send_fps))),
    );
    for (i, event) in EVENTS.iter().enumerate() {
        let fmt = |v: &Option<Vec<f64>>| {
            v.as_ref()
                .map_or_else(|| "n/a".to_string(), |v| format!("{:.4}", v[i]))
        };
        row(
            &format!("{event} per KiB"),
            each(&|r| (fmt(&r.tx_exits), fmt(&r.rx_exits))),
        );
    }
    println!();
    println!(
        "{RUNS} runs of {TX_FRAMES} frames each way per VM; medians. TAP txqueuelen {TAP_QUEUE}."
    );
    println!("flags: notification suppression through VIRTQ_USED_F_NO_NOTIFY; event_idx:");
    println!("       VIRTIO_F_EVENT_IDX negotiated, kicks as avail_event asks.");
    println!("TX: frames/s between the first and last datagram on the host socket.");
    println!("RX: frames/s between the first and last frame the guest took; frames the");
    println!("    TAP could not queue are lost on the host side (the sender outruns the guest).");
    println!("Exits: perf stat -p over phases of N and N/4 frames, difference per KiB.");
    for ((name, _), r) in configs.iter().zip(&results) {
        println!("guest counters ({name}): {}", r.counters);
    }
}
