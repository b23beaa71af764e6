//! virtio-vsock stream throughput of the release `ember` binary through
//! Firecracker's hybrid Unix-socket backend, and the VM exits it costs.
//!
//! The `virtio_vsock` guest polls its queues from ring 3 (no interrupts),
//! keeps the receive queue full, and sends a credit update whenever it has
//! consumed a quarter of the window it advertises (`buf_alloc`).
//!
//! - host -> guest: the host connects (`CONNECT 54`, the guest's sink
//!   port) and writes [`BYTES`] in 1 MiB writes, then shuts its side down;
//!   the guest counts and drops the bytes, and answers the device's
//!   SHUTDOWN with RST, which closes the host socket. Host time: from the
//!   first write to end of stream on the host socket, so every byte has
//!   reached the guest.
//! - guest -> host: the host connects to port 52 and closes at once (the
//!   go signal); the guest then connects to the host's listener at
//!   `<uds_path>_55` and writes [`BYTES`] of its pattern as fast as the
//!   device's credit (64 KiB) allows. Host time: first byte to end of
//!   stream.
//!
//! Two driver configurations: Linux's defaults (4 KiB receive buffers,
//! 256 KiB buf_alloc, 4 KiB packets) and large ones (64 KiB buffers and
//! packets, 4 MiB buf_alloc). Each cell is the median of [`RUNS`] boots.
//! The guest's own TSC timing (first to last byte it moved) is shown too.
//!
//! Exits per KiB: `perf stat -p` on ember, attached before the transfer
//! starts and counting until ember exits, over transfers of [`BYTES`] and a
//! quarter of it; the difference
//! of the counts over the difference of the KiB. On this PVM host
//! `kvm:kvm_exit` is not emitted; `kvm:kvm_mmio` counts MMIO accesses
//! (queue notifications included) and `kvm:kvm_userspace_exit` the exits
//! that reach ember.
//!
//! Run with `cargo bench -p ember-tests --bench vsock`.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ember_tests::perf::PerfStat;
use ember_tests::{
    default_config, ember_binary, guest_path, median, merge_patch, tsc_khz, Launch, RunningVm,
};
use serde_json::json;

const BYTES: u64 = 256 << 20;
const RUNS: usize = 3;
const SINK_PORT: u32 = 54;
const GO_PORT: u32 = 52;
const SOURCE_PORT: u32 = 55;
/// Counted with perf; `kvm:kvm_exit` stays 0 on a PVM host (see above).
const EVENTS: [&str; 4] = [
    "kvm:kvm_exit",
    "kvm:kvm_mmio",
    "kvm:kvm_userspace_exit",
    "kvm:kvm_pio",
];
const WAIT: Duration = Duration::from_secs(60);

/// Driver configurations: (label, rxbuf, txbuf, buf_alloc).
const CONFIGS: [(&str, u32, u32, u32); 2] = [
    ("4 KiB buffers, 256 KiB window", 4096, 4096, 256 << 10),
    ("64 KiB buffers, 4 MiB window", 65536, 65536, 4 << 20),
];

#[derive(Clone, Copy, PartialEq)]
enum Direction {
    HostToGuest,
    GuestToHost,
}

/// One booted guest, ready for one transfer.
struct Run {
    vm: RunningVm,
    uds: PathBuf,
    source: UnixListener,
    _dir: tempfile::TempDir,
}

/// One transfer: host-measured and guest-measured MiB/s.
struct Transfer {
    host_mib_s: f64,
    guest_mib_s: f64,
}

fn boot(direction: Direction, bytes: u64, config: (&str, u32, u32, u32)) -> Run {
    let (_, rxbuf, txbuf, buf_alloc) = config;
    let dir = tempfile::tempdir().expect("temp dir");
    let uds = dir.path().join("v.sock");
    let source = UnixListener::bind(format!("{}_{SOURCE_PORT}", uds.display()))
        .expect("bind the source listener");
    let source_out = match direction {
        Direction::HostToGuest => 0,
        Direction::GuestToHost => bytes,
    };
    let mut vm_config = default_config(&guest_path("virtio_vsock"));
    merge_patch(
        &mut vm_config,
        &json!({
            "boot-source": {"boot_args": format!(
                "console=ttyS0 vsock.accepts=1 vsock.rxbuf={rxbuf} vsock.txbuf={txbuf} \
                 vsock.buf_alloc={buf_alloc} vsock.source_out={source_out} vsock.idle=100"
            )},
            "vsock": {"guest_cid": 3, "uds_path": uds},
        }),
    );
    let mut vm = Launch::new(&vm_config)
        .timeout(Duration::from_secs(600))
        .spawn()
        .expect("start ember");
    vm.wait_for_line(|l| l.starts_with("vsock: queues "), WAIT)
        .expect("the guest's driver is up");
    Run {
        vm,
        uds,
        source,
        _dir: dir,
    }
}

/// `s.read(buf)`, retried when interrupted: with a receive timeout set,
/// Linux fails an interrupted read with EINTR rather than restarting it.
fn read_some(s: &mut UnixStream, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match s.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

fn connect(uds: &Path, port: u32) -> UnixStream {
    let mut s = UnixStream::connect(uds).expect("connect to the vsock socket");
    s.set_read_timeout(Some(WAIT)).expect("read timeout");
    s.write_all(format!("CONNECT {port}\n").as_bytes())
        .expect("CONNECT");
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while read_some(&mut s, &mut byte).expect("read the reply") == 1 && byte[0] != b'\n' {
        line.push(byte[0]);
    }
    assert!(
        line.starts_with(b"OK "),
        "{:?}",
        String::from_utf8_lossy(&line)
    );
    s
}

/// Reads until end of stream (or reset); returns the byte count and the
/// time from the first byte to the end.
fn drain(s: &mut UnixStream) -> (u64, Duration) {
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    let mut first = None;
    loop {
        match read_some(s, &mut buf) {
            Ok(0) => break,
            Ok(n) => {
                first.get_or_insert_with(Instant::now);
                total += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("read: {e}"),
        }
    }
    (total, first.map_or(Duration::ZERO, |f| f.elapsed()))
}

impl Run {
    /// Moves `bytes` in `direction`; returns the host-side time.
    fn transfer(&self, direction: Direction, bytes: u64) -> Duration {
        match direction {
            Direction::HostToGuest => {
                let mut s = connect(&self.uds, SINK_PORT);
                let chunk = vec![0xa5u8; 1 << 20];
                let start = Instant::now();
                let mut left = bytes;
                while left > 0 {
                    let n = left.min(chunk.len() as u64) as usize;
                    s.write_all(&chunk[..n]).expect("write to the guest");
                    left -= n as u64;
                }
                s.shutdown(Shutdown::Write).expect("shutdown");
                let (extra, _) = drain(&mut s);
                assert_eq!(extra, 0, "the sink sends nothing");
                start.elapsed()
            }
            Direction::GuestToHost => {
                let go = connect(&self.uds, GO_PORT);
                drop(go);
                let (mut s, _) = loop {
                    match self.source.accept() {
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        other => break other.expect("the guest connects"),
                    }
                };
                s.set_read_timeout(Some(WAIT)).expect("read timeout");
                let (total, time) = drain(&mut s);
                assert_eq!(total, bytes, "the guest's stream is short");
                time
            }
        }
    }

    /// Waits for the guest's report; returns its TSC ticks for the transfer.
    fn finish(self, direction: Direction) -> f64 {
        let out = self.vm.wait(WAIT).expect("ember exits");
        assert!(
            out.status.success() && out.stdout.contains("vsock: ok"),
            "benchmark run failed\n{out}"
        );
        let prefix = match direction {
            Direction::HostToGuest => "vsock: sink port",
            Direction::GuestToHost => "vsock: source port",
        };
        let line = out
            .stdout
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix} line\n{out}"));
        line.rsplit(' ')
            .next()
            .and_then(|t| t.parse().ok())
            .unwrap_or_else(|| panic!("bad line {line:?}"))
    }
}

fn measure(direction: Direction, config: (&str, u32, u32, u32), tsc_khz: f64) -> Transfer {
    let run = boot(direction, BYTES, config);
    let time = run.transfer(direction, BYTES);
    let ticks = run.finish(direction);
    let mib = BYTES as f64 / (1 << 20) as f64;
    Transfer {
        host_mib_s: mib / time.as_secs_f64(),
        guest_mib_s: mib / (ticks / (tsc_khz * 1e3)),
    }
}

/// Exit counts per KiB: perf over transfers of BYTES and BYTES / 4.
fn exits_per_kib(direction: Direction, config: (&str, u32, u32, u32)) -> Option<Vec<f64>> {
    let count = |bytes: u64| -> Option<Vec<f64>> {
        let run = boot(direction, bytes, config);
        let perf = PerfStat::attach(run.vm.pid(), &EVENTS)
            .map_err(|e| eprintln!("perf: {e}"))
            .ok()?;
        run.transfer(direction, bytes);
        // Until ember exits (perf then stops by itself): the guest's last
        // serial lines fall inside both windows, whatever the timing.
        run.finish(direction);
        let counts = perf.finish().map_err(|e| eprintln!("perf: {e}")).ok()?;
        Some(EVENTS.iter().map(|e| counts[*e] as f64).collect())
    };
    let big = count(BYTES)?;
    let small = count(BYTES / 4)?;
    let kib = (BYTES - BYTES / 4) as f64 / 1024.0;
    Some(big.iter().zip(&small).map(|(b, s)| (b - s) / kib).collect())
}

fn main() {
    println!("ember: {}", ember_binary().display());
    let tsc_khz = tsc_khz();
    println!("guest TSC: {:.3} GHz (KVM_GET_TSC_KHZ)", tsc_khz / 1e6);
    println!();
    println!(
        "{:<32} {:<12} {:>10} {:>8} {:>9} {:>9} {:>9} {:>9}",
        "virtio-vsock",
        "direction",
        "host MiB/s",
        "guest",
        "exit/KiB",
        "mmio/KiB",
        "uexit/KiB",
        "pio/KiB"
    );
    for config in CONFIGS {
        for (direction, name) in [
            (Direction::HostToGuest, "host->guest"),
            (Direction::GuestToHost, "guest->host"),
        ] {
            let runs: Vec<Transfer> = (0..RUNS)
                .map(|_| measure(direction, config, tsc_khz))
                .collect();
            let exits = exits_per_kib(direction, config);
            let fmt = |i: usize| {
                exits
                    .as_ref()
                    .map_or_else(|| "n/a".to_string(), |v| format!("{:.4}", v[i]))
            };
            println!(
                "{:<32} {:<12} {:>10.0} {:>8.0} {:>9} {:>9} {:>9} {:>9}",
                config.0,
                name,
                median(runs.iter().map(|r| r.host_mib_s).collect()),
                median(runs.iter().map(|r| r.guest_mib_s).collect()),
                fmt(0),
                fmt(1),
                fmt(2),
                fmt(3)
            );
        }
    }
    println!();
    println!(
        "{} MiB per transfer, median of {RUNS} boots. host MiB/s: host clock (first write",
        BYTES >> 20
    );
    println!("or byte to end of stream); guest: the guest's TSC, first to last byte it moved.");
    println!("exit = kvm:kvm_exit (never emitted on PVM), mmio = kvm:kvm_mmio, uexit =");
    println!("kvm:kvm_userspace_exit, pio = kvm:kvm_pio.");
    println!(
        "Exits: perf stat -p over transfers of {} and {} MiB, difference per KiB.",
        BYTES >> 20,
        BYTES >> 22
    );
}
