//! virtio-vsock end to end through Firecracker's hybrid Unix-socket
//! backend: the host connects to `uds_path` and asks for a guest port with
//! `CONNECT <port>\n`; the guest's connections to the host (CID 2) port P
//! reach a Unix listener at `<uds_path>_P`. The `virtio_vsock` guest
//! (`guests/virtio_vsock.c`) accepts, echoes or sinks host connections and
//! then opens its own; every byte is compared on the receiving side.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use ember_tests::{default_config, guest_path, merge_patch, Launch, Output, RunningVm};
use serde_json::json;

const GUEST_CID: u64 = 3;
const ECHO_PORT: u32 = 52;
const SINK_PORT: u32 = 54;
const HOST_ECHO_PORT: u32 = 53;
const HOST_SOURCE_PORT: u32 = 55;
/// First port of host-initiated connections (Firecracker's).
const FIRST_HOST_PORT: u32 = 1 << 30;
const WAIT: Duration = Duration::from_secs(10);

/// A guest with a vsock device, its socket directory and listeners.
/// Fields drop in order: the VM first, then the directory.
struct VsockVm {
    vm: RunningVm,
    uds: PathBuf,
    _dir: tempfile::TempDir,
}

/// The listener at `<uds>_<port>`, for guest connections to that port.
fn listen(uds: &Path, port: u32) -> UnixListener {
    let path = format!("{}_{port}", uds.display());
    let listener = UnixListener::bind(&path).unwrap_or_else(|e| panic!("bind {path}: {e}"));
    listener
        .set_nonblocking(true)
        .expect("non-blocking listener");
    listener
}

/// Boots the guest with `args`; `host_ports` get listeners first.
fn boot(args: &str, host_ports: &[u32]) -> (VsockVm, Vec<UnixListener>) {
    let dir = tempfile::tempdir().expect("temp dir");
    let uds = dir.path().join("v.sock");
    let listeners = host_ports.iter().map(|p| listen(&uds, *p)).collect();
    let mut config = default_config(&guest_path("virtio_vsock"));
    merge_patch(
        &mut config,
        &json!({
            "boot-source": {"boot_args": format!("console=ttyS0 {args}")},
            "vsock": {"guest_cid": GUEST_CID, "uds_path": uds},
        }),
    );
    let vm = Launch::new(&config).spawn().expect("start ember");
    (VsockVm { vm, uds, _dir: dir }, listeners)
}

impl VsockVm {
    /// Connects to the device's socket (retrying while ember starts).
    fn dial(&self) -> UnixStream {
        let deadline = Instant::now() + WAIT;
        loop {
            match UnixStream::connect(&self.uds) {
                Ok(s) => {
                    s.set_read_timeout(Some(WAIT)).expect("read timeout");
                    return s;
                }
                Err(_) if Instant::now() < deadline => {
                    thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("cannot connect to {}: {e}", self.uds.display()),
            }
        }
    }

    /// Opens a connection to guest port `port`; returns it and the host
    /// port from `OK <port>`, or the line the device sent instead.
    fn connect(&self, port: u32) -> Result<(UnixStream, u32), String> {
        let mut s = self.dial();
        s.write_all(format!("CONNECT {port}\n").as_bytes())
            .expect("send CONNECT");
        let line = read_line(&mut s).map_err(|e| format!("reading the reply: {e}"))?;
        match line.strip_prefix("OK ").and_then(|p| p.parse().ok()) {
            Some(host_port) => Ok((s, host_port)),
            None => Err(line),
        }
    }

    /// Waits for the guest to finish and checks it did.
    fn finish(self) -> Output {
        let out = self
            .vm
            .wait(WAIT)
            .expect("ember exits after the guest resets");
        assert!(out.status.success(), "{out}");
        assert!(
            out.stdout.lines().any(|l| l == "virtio_vsock done"),
            "the guest did not finish\n{out}"
        );
        out
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

/// Reads one `\n`-terminated line a byte at a time (nothing after it).
fn read_line(s: &mut UnixStream) -> io::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match read_some(s, &mut byte)? {
            0 => break,
            _ if byte[0] == b'\n' => break,
            _ => line.push(byte[0]),
        }
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

/// Accepts one connection on a non-blocking listener, waiting up to WAIT.
fn accept(listener: &UnixListener) -> UnixStream {
    let deadline = Instant::now() + WAIT;
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).expect("blocking stream");
                s.set_read_timeout(Some(WAIT)).expect("read timeout");
                return s;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) && Instant::now() < deadline =>
            {
                thread::sleep(Duration::from_millis(2));
            }
            Err(e) => panic!("the guest did not connect: {e}"),
        }
    }
}

/// Pseudo-random bytes (xorshift64), different for each seed.
fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// The guest's stream pattern (virtio_vsock.c `pattern_byte`): byte `o` of
/// the little-endian u64 `o / 8`.
fn pattern_byte(o: u64) -> u8 {
    (o / 8).to_le_bytes()[(o % 8) as usize]
}

/// Sends `data` on a second handle while reading as many bytes back.
fn echo_round_trip(stream: &mut UnixStream, data: &[u8]) -> Vec<u8> {
    let mut writer = stream.try_clone().expect("clone the stream");
    let payload = data.to_vec();
    let sender = thread::spawn(move || writer.write_all(&payload));
    let mut back = vec![0u8; data.len()];
    let read = stream.read_exact(&mut back);
    sender
        .join()
        .expect("writer thread")
        .expect("write to the guest");
    read.expect("read the echo");
    back
}

/// Reads until end of stream, writing every chunk back; returns the bytes.
fn serve_echo(stream: &mut UnixStream) -> Vec<u8> {
    let mut all = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match read_some(stream, &mut buf) {
            Ok(0) => return all,
            Ok(n) => {
                all.extend_from_slice(&buf[..n]);
                stream.write_all(&buf[..n]).expect("echo to the guest");
            }
            Err(e) => panic!("reading the guest's connection: {e}"),
        }
    }
}

fn lines(out: &Output) -> Vec<&str> {
    out.stdout
        .lines()
        .filter_map(|l| l.strip_prefix("vsock: "))
        .collect()
}

/// The value after `key` in the guest's final counter line.
fn counter(out: &Output, key: &str) -> u64 {
    let line = lines(out)
        .into_iter()
        .find(|l| l.starts_with("rx_pkts "))
        .unwrap_or_else(|| panic!("no counter line\n{out}"));
    let words: Vec<&str> = line.split(' ').collect();
    words
        .iter()
        .position(|w| *w == key)
        .and_then(|i| words.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {line:?}"))
}

/// The line reporting the closed connection that starts with `prefix`.
fn closed<'a>(out: &'a Output, prefix: &str) -> &'a str {
    lines(out)
        .into_iter()
        .find(|l| l.starts_with(prefix) && l.contains(" closed ("))
        .unwrap_or_else(|| panic!("no {prefix:?} close line\n{out}"))
}

fn assert_ok(out: &Output) {
    assert!(
        lines(out).contains(&"ok"),
        "the guest reports a failure\n{out}"
    );
    for key in ["overruns", "unexpected", "events"] {
        assert_eq!(counter(out, key), 0, "{key}\n{out}");
    }
}

/// The host connects and the guest echoes 512 KiB of random bytes; then
/// the guest connects to the host and gets its own pattern echoed.
#[test]
fn host_and_guest_initiated_streams_carry_every_byte() {
    const HOST_BYTES: usize = 512 * 1024;
    const GUEST_BYTES: u64 = 300 * 1024 + 13;
    let (vm, listeners) = boot(
        &format!("vsock.accepts=1 vsock.echo_out={GUEST_BYTES}"),
        &[HOST_ECHO_PORT],
    );

    let (mut stream, host_port) = vm.connect(ECHO_PORT).expect("the guest accepts");
    assert_eq!(host_port, FIRST_HOST_PORT, "Firecracker's first local port");
    let data = random_bytes(HOST_BYTES, 0x1234_5678);
    let back = echo_round_trip(&mut stream, &data);
    assert!(back == data, "the echo differs from what was sent");
    drop(stream);

    let mut guest_stream = accept(&listeners[0]);
    let got = serve_echo(&mut guest_stream);
    assert_eq!(got.len() as u64, GUEST_BYTES);
    if let Some(bad) = (0..GUEST_BYTES).find(|o| got[*o as usize] != pattern_byte(*o)) {
        panic!("the guest's stream is wrong at byte {bad}");
    }
    drop(guest_stream);

    let out = vm.finish();
    let lines = lines(&out);
    for want in [
        format!("guest_cid {GUEST_CID}"),
        "queues rx 256 tx 256 event 8 status 0xf rxbuf 4096 buf_alloc 262144".to_string(),
        format!("accepted port {ECHO_PORT} from cid 2 port {host_port} peer buf_alloc 65536"),
        format!("connected to port {HOST_ECHO_PORT} from port 1024 peer buf_alloc 65536"),
    ] {
        assert!(lines.contains(&want.as_str()), "missing {want:?}\n{out}");
    }
    let echo = closed(&out, "echo port");
    assert!(
        echo.starts_with(&format!(
            "echo port {ECHO_PORT} peer {host_port} closed (shutdown by peer) rx {HOST_BYTES} tx {HOST_BYTES} "
        )),
        "{out}"
    );
    let echo_out = closed(&out, "echo_out");
    assert!(
        echo_out.contains(&format!(" rx {GUEST_BYTES} tx {GUEST_BYTES} "))
            && echo_out.ends_with(" match"),
        "{out}"
    );
    let features = lines
        .iter()
        .find_map(|l| l.strip_prefix("features offered "))
        .unwrap_or_else(|| panic!("no features line\n{out}"));
    // VIRTIO_F_VERSION_1, VIRTIO_F_IN_ORDER and VIRTIO_RING_F_EVENT_IDX
    // offered; the driver takes VERSION_1 only.
    assert_eq!(features, "0x920000000 accepted 0x100000000", "{out}");
    assert_ok(&out);
}

/// A host connection to a port nobody listens on gets no `OK` (the guest
/// answers RST and the device closes the socket); a guest connection to a
/// host port without a listener is refused with RST. Devices found through
/// ACPI work the same.
#[test]
fn connections_to_closed_ports_are_refused_both_ways() {
    const CLOSED_HOST_PORT: u32 = 57;
    let (vm, _listeners) = boot(
        &format!(
            "discover=acpi vsock.accepts=1 vsock.echo_out=100 vsock.echo_port={CLOSED_HOST_PORT}"
        ),
        &[],
    );
    let refused = vm.connect(99).expect_err("nobody listens on port 99");
    assert_eq!(refused, "", "the socket closes without a reply");

    let (mut stream, host_port) = vm.connect(ECHO_PORT).expect("the guest accepts");
    assert_eq!(echo_round_trip(&mut stream, b"ping"), b"ping");
    stream.shutdown(Shutdown::Both).expect("close");

    let out = vm.finish();
    assert!(
        closed(&out, "echo_out").starts_with(&format!(
            "echo_out port 1024 peer {CLOSED_HOST_PORT} closed (refused) rx 0 tx 0"
        )),
        "{out}"
    );
    assert!(
        closed(&out, "echo port").contains(&format!(
            "peer {host_port} closed (shutdown by peer) rx 4 tx 4"
        )),
        "{out}"
    );
    // The RST answering the request to port 99.
    assert_eq!(counter(&out, "rsts"), 2, "{out}");
    assert_ok(&out);
}

/// A 4 KiB receive window: the host's 4 MiB reach the guest in hundreds of
/// credit rounds, never more than the window at a time; then 4 MiB from the
/// guest within the device's credit, in order.
#[test]
fn credit_flow_control_holds_in_both_directions() {
    const BYTES: usize = 4 << 20;
    let (vm, listeners) = boot(
        &format!("vsock.accepts=1 vsock.buf_alloc=4096 vsock.txbuf=16384 vsock.source_out={BYTES}"),
        &[HOST_SOURCE_PORT],
    );
    let (mut stream, host_port) = vm.connect(SINK_PORT).expect("the guest accepts");
    let data = random_bytes(BYTES, 99);
    stream.write_all(&data).expect("write to the guest");
    drop(stream);

    let mut source = accept(&listeners[0]);
    let mut got = Vec::with_capacity(BYTES);
    source
        .read_to_end(&mut got)
        .expect("read the guest's stream");
    assert_eq!(got.len(), BYTES);
    if let Some(bad) = (0..BYTES).find(|o| got[*o] != pattern_byte(*o as u64)) {
        panic!("the guest's stream is wrong at byte {bad}");
    }

    let out = vm.finish();
    assert!(
        closed(&out, "sink").starts_with(&format!(
            "sink port {SINK_PORT} peer {host_port} closed (shutdown by peer) rx {BYTES} tx 0"
        )),
        "{out}"
    );
    assert!(
        closed(&out, "source").contains(&format!(" rx 0 tx {BYTES} ")),
        "{out}"
    );
    // 4 MiB through a 4 KiB window: at least one credit update per window
    // went back to the device, which never sent past it (overruns 0).
    assert!(
        counter(&out, "credit_updates") >= (BYTES / 4096) as u64,
        "{out}"
    );
    assert_ok(&out);
}

/// Two host connections at once: each gets its own bytes back.
#[test]
fn concurrent_connections_are_kept_apart() {
    const BYTES: usize = 256 * 1024;
    let (vm, _listeners) = boot("vsock.accepts=2", &[]);
    let (a, port_a) = vm.connect(ECHO_PORT).expect("first connection");
    let (b, port_b) = vm.connect(ECHO_PORT).expect("second connection");
    assert_ne!(port_a, port_b);
    let workers: Vec<_> = [(a, 1u64), (b, 2u64)]
        .into_iter()
        .map(|(mut s, seed)| {
            thread::spawn(move || {
                let data = random_bytes(BYTES, seed);
                let back = echo_round_trip(&mut s, &data);
                (0..BYTES).find(|i| back[*i] != data[*i])
            })
        })
        .collect();
    for (i, w) in workers.into_iter().enumerate() {
        let bad = w.join().expect("worker");
        assert_eq!(bad, None, "connection {i} got other bytes from that offset");
    }
    let out = vm.finish();
    for port in [port_a, port_b] {
        assert!(
            lines(&out).iter().any(|l| l.starts_with(&format!(
                "echo port {ECHO_PORT} peer {port} closed (shutdown by peer) rx {BYTES} tx {BYTES}"
            ))),
            "{out}"
        );
    }
    assert_ok(&out);
}

/// Buffers described by two descriptors each, split inside the packet
/// header, at its end (Linux's transmit layout) and inside the payload,
/// with a gap between the parts: every byte still arrives in place.
#[test]
fn streams_cross_descriptor_boundaries_intact() {
    const HOST_BYTES: usize = 128 * 1024;
    const GUEST_BYTES: u64 = 50_000;
    for split in [20, 44, 100] {
        let (vm, listeners) = boot(
            &format!("vsock.split={split} vsock.accepts=1 vsock.echo_out={GUEST_BYTES}"),
            &[HOST_ECHO_PORT],
        );
        let (mut stream, _) = vm.connect(ECHO_PORT).expect("the guest accepts");
        let data = random_bytes(HOST_BYTES, split);
        assert!(
            echo_round_trip(&mut stream, &data) == data,
            "split {split}: the echo differs"
        );
        drop(stream);
        let mut guest_stream = accept(&listeners[0]);
        let got = serve_echo(&mut guest_stream);
        assert_eq!(got.len() as u64, GUEST_BYTES, "split {split}");
        assert!(
            (0..GUEST_BYTES).all(|o| got[o as usize] == pattern_byte(o)),
            "split {split}: the guest's stream is wrong"
        );
        drop(guest_stream);
        let out = vm.finish();
        assert!(closed(&out, "echo_out").ends_with(" match"), "{out}");
        assert_ok(&out);
    }
}

/// A driver reset (status 0) and a fresh set-up between connections, as
/// when Linux reloads the vsock transport: the device comes back on new
/// queues, and the guest's next connection works.
#[test]
fn device_works_again_after_a_driver_reset() {
    const GUEST_BYTES: u64 = 20_000;
    let (vm, listeners) = boot(
        &format!("vsock.reset=1 vsock.accepts=1 vsock.echo_out={GUEST_BYTES}"),
        &[HOST_ECHO_PORT],
    );
    let (mut stream, _) = vm.connect(ECHO_PORT).expect("the guest accepts");
    assert_eq!(echo_round_trip(&mut stream, b"before"), b"before");
    drop(stream);
    let mut guest_stream = accept(&listeners[0]);
    let got = serve_echo(&mut guest_stream);
    assert_eq!(got.len() as u64, GUEST_BYTES);
    drop(guest_stream);
    let out = vm.finish();
    let lines = lines(&out);
    assert!(lines.contains(&"device reset and set up again"), "{out}");
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.starts_with("queues rx 256"))
            .count(),
        2,
        "{out}"
    );
    assert!(closed(&out, "echo_out").ends_with(" match"), "{out}");
    assert_ok(&out);
}

/// Host agents often write their first bytes together with the CONNECT
/// line: they belong to the stream. A malformed line closes the socket.
#[test]
fn bytes_sent_with_the_connect_line_reach_the_guest() {
    let (vm, _listeners) = boot("vsock.accepts=1", &[]);
    let mut junk = vm.dial();
    junk.write_all(b"CONNECT fifty-two\n").expect("write");
    assert_eq!(read_line(&mut junk).expect("read"), "", "closed without OK");

    let mut s = vm.dial();
    s.write_all(b"CONNECT 52\nsent along with the line")
        .expect("write the line and data at once");
    let ok = read_line(&mut s).expect("read the reply");
    assert!(ok.starts_with("OK "), "{ok:?}");
    let mut back = vec![0u8; 24];
    s.read_exact(&mut back).expect("the echo");
    assert_eq!(back, b"sent along with the line");
    drop(s);
    let out = vm.finish();
    assert!(closed(&out, "echo port").contains(" rx 24 tx 24 "), "{out}");
    assert_ok(&out);
}

/// 64-byte receive buffers: the 256 of them hold far less than the
/// 256 KiB window, so the device keeps running out of buffers and must
/// resume when the guest posts more; 64-byte packets back.
#[test]
fn the_device_waits_for_receive_buffers_without_losing_bytes() {
    const BYTES: usize = 256 * 1024;
    let (vm, _listeners) = boot("vsock.accepts=1 vsock.rxbuf=64 vsock.txbuf=64", &[]);
    let (mut stream, _) = vm.connect(ECHO_PORT).expect("the guest accepts");
    let data = random_bytes(BYTES, 64);
    let back = echo_round_trip(&mut stream, &data);
    assert_eq!(
        (0..BYTES).find(|i| back[*i] != data[*i]),
        None,
        "first bad byte"
    );
    drop(stream);
    let out = vm.finish();
    assert!(
        closed(&out, "echo port").contains(&format!(" rx {BYTES} tx {BYTES} ")),
        "{out}"
    );
    // At most 64 bytes a packet, each way.
    assert!(counter(&out, "rx_pkts") >= (BYTES / 64) as u64, "{out}");
    assert!(counter(&out, "tx_pkts") >= (BYTES / 64) as u64, "{out}");
    assert_ok(&out);
}

/// Resident memory of process `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in\n{status}"))
}

/// Writes into a non-blocking `s` until no byte has gone for `quiet`, or
/// `cap` bytes went; returns the bytes written.
fn write_until_full(s: &mut UnixStream, cap: usize, quiet: Duration) -> usize {
    let chunk = random_bytes(64 * 1024, 7);
    s.set_nonblocking(true).expect("non-blocking stream");
    let mut written = 0;
    let mut last = Instant::now();
    while written < cap && last.elapsed() < quiet {
        match s.write(&chunk) {
            Ok(n) => {
                written += n;
                last = Instant::now();
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(5));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => panic!("write to the guest: {e}"),
        }
    }
    s.set_nonblocking(false).expect("blocking stream");
    written
}

/// Room for what a stalled connection may legitimately hold: the guest's
/// echo ring (256 KiB), the device's 64 KiB of credit and both host
/// sockets' buffers. Unbounded buffering would take everything offered.
const STALL_BOUND: usize = 4 << 20;

/// A host peer that writes to an echo port and never reads the echo: the
/// guest's replies stop at the credit the device advertises, the guest's
/// ring fills, and the host's writes stop being taken. Meanwhile ember's
/// memory stays flat, a second connection echoes every byte, and the VM
/// ends normally.
#[test]
fn a_host_peer_that_never_reads_stalls_only_its_own_connection() {
    const OTHER_BYTES: usize = 256 * 1024;
    // Stalled connections make no progress for seconds: a long idle limit.
    let (vm, _listeners) = boot("vsock.accepts=2 vsock.idle=200", &[]);
    let pid = vm.vm.pid();
    let (mut deaf, deaf_port) = vm.connect(ECHO_PORT).expect("the guest accepts");
    let rss_before = rss_kib(pid);
    let written = write_until_full(&mut deaf, 64 << 20, Duration::from_secs(2));
    assert!(
        written < STALL_BOUND,
        "{written} bytes were taken from a peer that never reads"
    );

    // The guest keeps polling; its echo waits for credit. Another
    // connection meanwhile carries its bytes both ways intact.
    let (mut other, other_port) = vm.connect(ECHO_PORT).expect("a second connection");
    let data = random_bytes(OTHER_BYTES, 11);
    assert!(
        echo_round_trip(&mut other, &data) == data,
        "the second connection's echo differs"
    );
    drop(other);
    thread::sleep(Duration::from_secs(3));
    let rss_after = rss_kib(pid);
    assert!(
        rss_after < rss_before + 4096,
        "ember's RSS grew from {rss_before} KiB to {rss_after} KiB"
    );
    // Nothing more got through while the echo went unread.
    assert_eq!(
        write_until_full(&mut deaf, 64 << 20, Duration::from_millis(500)),
        0,
        "the stalled connection took more bytes"
    );
    drop(deaf);

    let out = vm.finish();
    let line = closed(&out, &format!("echo port {ECHO_PORT} peer {deaf_port} "));
    let words: Vec<&str> = line.split(' ').collect();
    let count = |key: &str| -> usize {
        let i = words.iter().position(|w| *w == key).expect(key);
        words[i + 1].parse().expect("a number")
    };
    // The guest took at most what was written and sent back less: the
    // rest waited in its ring for credit that never came. The peer left
    // with the device still holding bytes for it: the device resets.
    assert!(count("rx") <= written, "{out}");
    assert!(count("tx") < count("rx"), "{out}");
    assert!(line.contains(" closed (reset) "), "{out}");
    assert!(
        closed(&out, &format!("echo port {ECHO_PORT} peer {other_port} ")).contains(&format!(
            " closed (shutdown by peer) rx {OTHER_BYTES} tx {OTHER_BYTES} "
        )),
        "{out}"
    );
    assert_ok(&out);
}

/// A host peer that floods a connection to a guest that takes 4 KiB at a
/// time and, its echo unread, stops taking any: the host's blocking writes
/// stall once the guest's window and the sockets' buffers are full, ember
/// takes no more than that and its memory stays flat, a sink connection
/// meanwhile gets all its bytes, and once the host reads again the flood
/// arrives whole.
#[test]
fn a_flooding_host_peer_is_held_back_by_the_guests_credit() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    const FLOOD_BYTES: usize = 2 << 20;
    const SINK_BYTES: usize = 1 << 20;
    let (mut vm, _listeners) = boot("vsock.accepts=2 vsock.buf_alloc=4096 vsock.idle=200", &[]);
    let pid = vm.vm.pid();
    let (mut flooded, flooded_port) = vm.connect(ECHO_PORT).expect("the guest accepts");
    let rss_before = rss_kib(pid);
    let sent = Arc::new(AtomicUsize::new(0));
    let data = random_bytes(FLOOD_BYTES, 21);
    let writer = {
        let mut s = flooded.try_clone().expect("clone the stream");
        let (sent, data) = (sent.clone(), data.clone());
        thread::spawn(move || {
            for chunk in data.chunks(16 * 1024) {
                s.write_all(chunk)?;
                sent.fetch_add(chunk.len(), Ordering::SeqCst);
            }
            io::Result::Ok(())
        })
    };
    // Wait until the writer makes no progress for two seconds.
    let mut last = (sent.load(Ordering::SeqCst), Instant::now());
    while last.1.elapsed() < Duration::from_secs(2) {
        thread::sleep(Duration::from_millis(20));
        let now = sent.load(Ordering::SeqCst);
        if now != last.0 {
            last = (now, Instant::now());
        }
    }
    let stalled_at = last.0;
    assert!(
        stalled_at < STALL_BOUND.min(FLOOD_BYTES),
        "{stalled_at} bytes were taken for a guest that stopped reading"
    );

    let (mut sink, sink_port) = vm.connect(SINK_PORT).expect("a sink connection");
    sink.write_all(&random_bytes(SINK_BYTES, 22))
        .expect("write to the sink");
    drop(sink);
    // The sink connection ends while the flooded one is still stalled.
    let sink_closed = vm
        .vm
        .wait_for_line(
            |l| l.starts_with("vsock: sink port") && l.contains(" closed ("),
            WAIT,
        )
        .expect("the sink connection closes");
    assert!(
        sink_closed.contains(&format!(" closed (shutdown by peer) rx {SINK_BYTES} tx 0 ")),
        "{sink_closed}"
    );
    thread::sleep(Duration::from_secs(1));
    let rss_after = rss_kib(pid);
    assert!(
        rss_after < rss_before + 4096,
        "ember's RSS grew from {rss_before} KiB to {rss_after} KiB"
    );
    assert_eq!(
        sent.load(Ordering::SeqCst),
        stalled_at,
        "the stalled writer moved on without a reader"
    );

    // The host reads again: every byte of the flood comes back in order.
    let mut back = vec![0u8; FLOOD_BYTES];
    flooded.read_exact(&mut back).expect("read the echo");
    writer
        .join()
        .expect("writer thread")
        .expect("write the flood");
    assert_eq!(
        (0..FLOOD_BYTES).find(|i| back[*i] != data[*i]),
        None,
        "first bad byte of the echo"
    );
    drop(flooded);

    let out = vm.finish();
    assert!(
        closed(&out, "sink").starts_with(&format!("sink port {SINK_PORT} peer {sink_port} ")),
        "{out}"
    );
    assert!(
        closed(&out, "echo port").starts_with(&format!(
            "echo port {ECHO_PORT} peer {flooded_port} closed (shutdown by peer) rx {FLOOD_BYTES} tx {FLOOD_BYTES}"
        )),
        "{out}"
    );
    assert_ok(&out);
}

/// A host peer that sends and then shuts down only its write side, waiting
/// for the reply: the guest is told SHUTDOWN(SEND) after every byte the
/// host sent and goes on sending; once its echo is all sent it shuts down
/// both ways, the device answers RST, and the host reads the whole echo,
/// in order, up to end of stream.
#[test]
fn a_host_half_close_still_gets_the_guests_reply() {
    const BYTES: usize = 1 << 20;
    let (vm, _listeners) = boot("vsock.accepts=1", &[]);
    let (mut stream, port) = vm.connect(ECHO_PORT).expect("the guest accepts");
    let data = random_bytes(BYTES, 31);
    let writer = {
        let mut s = stream.try_clone().expect("clone the stream");
        let data = data.clone();
        thread::spawn(move || {
            s.write_all(&data)?;
            s.shutdown(Shutdown::Write)
        })
    };
    let mut back = Vec::new();
    stream
        .read_to_end(&mut back)
        .expect("read the echo to its end");
    writer
        .join()
        .expect("writer thread")
        .expect("write, then shut down the write side");
    assert_eq!(back.len(), BYTES, "the echo is short");
    assert_eq!(
        (0..BYTES).find(|i| back[*i] != data[*i]),
        None,
        "first bad byte of the echo"
    );
    drop(stream);

    let out = vm.finish();
    // The device's SHUTDOWN(SEND) at the half-close, and no other.
    let prefix = format!("port {ECHO_PORT} peer {port} shutdown flags ");
    let shutdowns: Vec<&str> = lines(&out)
        .into_iter()
        .filter_map(|l| l.strip_prefix(prefix.as_str()))
        .collect();
    assert_eq!(shutdowns, ["2"], "{out}");
    assert!(
        closed(&out, &format!("echo port {ECHO_PORT} peer {port} ")).contains(&format!(
            " closed (closed after peer's shutdown) rx {BYTES} tx {BYTES} "
        )),
        "{out}"
    );
    // The RST came from the device.
    assert_eq!(counter(&out, "rsts"), 0, "{out}");
    assert_ok(&out);
}
