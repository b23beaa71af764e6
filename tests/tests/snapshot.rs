//! Snapshots end to end with the real `ember` binary: a counting guest is
//! paused, snapshotted and killed; new processes load the snapshot and the
//! count goes on from where it stopped, with nothing printed twice or lost.
//! Damaged snapshots and requests at the wrong time are refused with
//! Firecracker's errors, and the process keeps answering.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ember_tests::api::{ApiVm, Client, Response};
use ember_tests::{ember_binary, guest_path};
use serde_json::{json, Value};

const TIMEOUT: Duration = Duration::from_secs(30);

fn ok(r: std::io::Result<Response>) {
    let r = r.unwrap();
    assert_eq!(r.status, 204, "{r:?}");
}

fn refused(r: std::io::Result<Response>, words: &str) -> String {
    let r = r.unwrap();
    assert_eq!(r.status, 400, "{r:?}");
    let message = r.fault_message();
    assert!(message.contains(words), "`{words}` not in: {message}");
    message
}

/// Every `count N` line, in order.
fn counts(out: &str) -> Vec<u64> {
    out.lines()
        .filter_map(|l| l.strip_prefix("count "))
        .filter_map(|n| n.parse().ok())
        .collect()
}

/// The last count of a complete line: the output may end in the middle of
/// one (`count 3` of `count 31`).
fn last_count(out: &str) -> u64 {
    let complete = out.rfind('\n').map_or("", |i| &out[..i]);
    *counts(complete).last().expect("no complete count line")
}

/// The files one snapshot is made of.
struct Snapshot {
    state: PathBuf,
    mem: PathBuf,
    /// The serial output of the VM it was taken of, up to the snapshot.
    output: String,
}

/// Boots the counter guest with 2 vCPUs (the second one waits for its
/// start-up IPI), 32 MiB, a read-only drive and a vsock device, lets it
/// count, pauses it, snapshots it into `dir`, and kills it.
fn take_snapshot(dir: &Path) -> Snapshot {
    let mut vm = ApiVm::spawn(&["--id", "snap-source"]).unwrap();
    let mut api = vm.client().unwrap();
    let disk = dir.join("disk.img");
    fs::write(&disk, vec![0u8; 64 << 10]).unwrap();
    ok(api.put(
        "/boot-source",
        &json!({"kernel_image_path": guest_path("counter"), "boot_args": "console=ttyS0"}),
    ));
    ok(api.put(
        "/machine-config",
        &json!({"vcpu_count": 2, "mem_size_mib": 32}),
    ));
    ok(api.put(
        "/drives/data",
        &json!({"drive_id": "data", "path_on_host": disk, "is_root_device": false, "is_read_only": true}),
    ));
    ok(api.put(
        "/vsock",
        &json!({"guest_cid": 3, "uds_path": dir.join("v-source.sock")}),
    ));
    ok(api.put("/actions", &json!({"action_type": "InstanceStart"})));
    vm.wait_for_output(|o| counts(o).len() > 30, TIMEOUT)
        .unwrap();

    let state = dir.join("vm.state");
    let mem = dir.join("vm.mem");
    let body = json!({"snapshot_type": "Full", "snapshot_path": state, "mem_file_path": mem});
    // A running VM is refused, with Firecracker's words.
    refused(
        api.put("/snapshot/create", &body),
        "save/restore unavailable while running",
    );
    ok(api.patch("/vm", &json!({"state": "Paused"})));
    // Diff snapshots are refused by name, never written as Full.
    refused(
        api.put(
            "/snapshot/create",
            &json!({"snapshot_type": "Diff", "snapshot_path": state, "mem_file_path": mem}),
        ),
        "Diff snapshots are not supported",
    );
    assert!(!state.exists() && !mem.exists());
    // A file that cannot be created is named; the VM stays paused.
    let nowhere = dir.join("no-such-dir").join("vm.state");
    refused(
        api.put(
            "/snapshot/create",
            &json!({"snapshot_path": nowhere, "mem_file_path": mem}),
        ),
        "Cannot perform open on the snapshot backing file",
    );
    assert_eq!(api.get("/").unwrap().json()["state"], "Paused");
    let start = Instant::now();
    ok(api.put("/snapshot/create", &body));
    eprintln!("snapshot/create of 32 MiB took {:?}", start.elapsed());
    assert_eq!(fs::metadata(&mem).unwrap().len(), 32 << 20);
    // Memory the guest never touched is left as holes.
    let used = std::os::unix::fs::MetadataExt::blocks(&fs::metadata(&mem).unwrap()) * 512;
    assert!(
        used < 8 << 20,
        "{used} bytes of the memory file are allocated"
    );
    for file in [&state, &mem] {
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{}", file.display());
    }
    // Whatever the pipe still held when the vCPUs parked.
    std::thread::sleep(Duration::from_millis(100));
    let output = vm.stdout();
    let exit = vm.kill();
    assert_eq!(exit.stdout, output, "the guest printed while paused");
    Snapshot { state, mem, output }
}

fn load_body(snap: &Snapshot, dir: &Path, name: &str, resume: bool) -> Value {
    json!({
        "snapshot_path": snap.state,
        "mem_backend": {"backend_type": "File", "backend_path": snap.mem},
        "resume_vm": resume,
        "vsock_override": {"uds_path": dir.join(format!("v-{name}.sock"))},
    })
}

/// Checks that `before` then `after` are exactly `count 0\ncount 1\n...`:
/// not a byte repeated or lost where the snapshot cut the output (a line cut
/// by the snapshot is finished by the restored guest).
fn assert_contiguous(before: &str, after: &str) {
    let all = format!("{before}{after}");
    assert!(counts(&all).len() > counts(before).len() + 5, "{after}");
    let mut expected = String::new();
    let mut i = 0u64;
    while expected.len() < all.len() {
        expected.push_str(&format!("count {i}\n"));
        i += 1;
    }
    if all != expected[..all.len()] {
        let at = all
            .bytes()
            .zip(expected.bytes())
            .position(|(a, b)| a != b)
            .unwrap_or(0);
        panic!(
            "the output differs at byte {at} (snapshot at byte {}):\n...{}\n--- expected ---\n...{}",
            before.len(),
            &all[at.saturating_sub(40)..(at + 40).min(all.len())],
            &expected[at.saturating_sub(40)..(at + 40).min(expected.len())]
        );
    }
}

fn spawn(id: &str) -> (ApiVm, Client) {
    let vm = ApiVm::spawn(&["--id", id]).unwrap();
    let api = vm.client().unwrap();
    (vm, api)
}

/// Pauses the running `vm`, writes a Full snapshot of it into `dir` as
/// `<name>.state` and `<name>.mem`, and ends the process. Returns the files
/// and the serial output up to the snapshot.
fn pause_and_snapshot(mut vm: ApiVm, api: &mut Client, dir: &Path, name: &str) -> Snapshot {
    ok(api.patch("/vm", &json!({"state": "Paused"})));
    let state = dir.join(format!("{name}.state"));
    let mem = dir.join(format!("{name}.mem"));
    ok(api.put(
        "/snapshot/create",
        &json!({"snapshot_path": state, "mem_file_path": mem}),
    ));
    // Whatever the pipe still held when the vCPUs parked.
    std::thread::sleep(Duration::from_millis(100));
    let output = vm.stdout();
    drop(vm);
    Snapshot { state, mem, output }
}

/// A new process `id` that loads `snap` from its memory file and resumes
/// it, with `extra` fields (overrides) added to the load request.
fn load_resumed(id: &str, snap: &Snapshot, extra: Value) -> (ApiVm, Client) {
    let (vm, mut api) = spawn(id);
    let mut body = json!({
        "snapshot_path": snap.state,
        "mem_backend": {"backend_type": "File", "backend_path": snap.mem},
        "resume_vm": true,
    });
    if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
        body.extend(extra.clone());
    }
    ok(api.put("/snapshot/load", &body));
    (vm, api)
}

#[test]
fn a_loaded_snapshot_counts_on_from_where_it_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let snap = take_snapshot(dir.path());
    let last = last_count(&snap.output);

    // Resumed at once.
    let (mut vm, mut api) = spawn("snap-a");
    let start = Instant::now();
    ok(api.put("/snapshot/load", &load_body(&snap, dir.path(), "a", true)));
    vm.wait_for_output(|o| !o.is_empty(), TIMEOUT).unwrap();
    eprintln!(
        "PUT /snapshot/load to the first serial byte: {:?}",
        start.elapsed()
    );
    assert_eq!(api.get("/").unwrap().json()["state"], "Running");
    let out = vm
        .wait_for_output(
            |o| counts(o).last().is_some_and(|n| *n > last + 30),
            TIMEOUT,
        )
        .unwrap();
    assert_contiguous(&snap.output, &out);
    // The configuration came from the snapshot, the override applied.
    let config = api.get("/vm/config").unwrap().json();
    assert_eq!(config["machine-config"]["mem_size_mib"], 32, "{config}");
    assert_eq!(config["machine-config"]["vcpu_count"], 2, "{config}");
    assert_eq!(config["drives"][0]["drive_id"], "data", "{config}");
    assert_eq!(
        config["vsock"]["uds_path"],
        json!(dir.path().join("v-a.sock")),
        "{config}"
    );
    // A second load, or any configuration, is refused once loaded.
    refused(
        api.put("/snapshot/load", &load_body(&snap, dir.path(), "a2", true)),
        "The requested operation is not supported after starting the microVM.",
    );

    // Left paused, from the same files at the same time: nothing runs
    // until it is resumed, then the count goes on from the same place.
    let (mut vm2, mut api2) = spawn("snap-b");
    ok(api2.put("/snapshot/load", &load_body(&snap, dir.path(), "b", false)));
    assert_eq!(api2.get("/").unwrap().json()["state"], "Paused");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(vm2.stdout(), "", "a paused restored VM printed");
    ok(api2.patch("/vm", &json!({"state": "Resumed"})));
    let out2 = vm2
        .wait_for_output(
            |o| counts(o).last().is_some_and(|n| *n > last + 30),
            TIMEOUT,
        )
        .unwrap();
    assert_contiguous(&snap.output, &out2);

    // A restored VM can be snapshotted again, and that snapshot loads.
    ok(api2.patch("/vm", &json!({"state": "Paused"})));
    let again = Snapshot {
        state: dir.path().join("again.state"),
        mem: dir.path().join("again.mem"),
        output: String::new(),
    };
    ok(api2.put(
        "/snapshot/create",
        &json!({"snapshot_path": again.state, "mem_file_path": again.mem}),
    ));
    std::thread::sleep(Duration::from_millis(100));
    let before = format!("{}{}", snap.output, vm2.stdout());
    drop(vm2);
    let (mut vm3, mut api3) = spawn("snap-c");
    // The deprecated `mem_file_path` is still accepted.
    ok(api3.put(
        "/snapshot/load",
        &json!({
            "snapshot_path": again.state,
            "mem_file_path": again.mem,
            "resume_vm": true,
            "vsock_override": {"uds_path": dir.path().join("v-c.sock")},
        }),
    ));
    let last = last_count(&before);
    let out3 = vm3
        .wait_for_output(
            |o| counts(o).last().is_some_and(|n| *n > last + 30),
            TIMEOUT,
        )
        .unwrap();
    assert_contiguous(&before, &out3);
    drop(vm);
}

#[test]
fn damaged_snapshots_are_refused_and_the_api_keeps_answering() {
    let dir = tempfile::tempdir().unwrap();
    let snap = take_snapshot(dir.path());
    let good = fs::read(&snap.state).unwrap();
    let (mut vm, mut api) = spawn("snap-bad");

    let bad = |name: &str, bytes: &[u8]| -> Snapshot {
        let state = dir.path().join(name);
        fs::write(&state, bytes).unwrap();
        Snapshot {
            state,
            mem: snap.mem.clone(),
            output: String::new(),
        }
    };
    let cases: Vec<(Snapshot, &str)> = vec![
        (
            bad("truncated.state", &good[..good.len() / 2]),
            "the snapshot state file is truncated",
        ),
        (
            bad("flipped.state", &{
                let mut b = good.clone();
                b[good.len() / 2] ^= 0x40;
                b
            }),
            "snapshot checksum mismatch",
        ),
        (
            bad("magic.state", &{
                let mut b = good.clone();
                b[0] = b'X';
                b
            }),
            "bad magic number",
        ),
        (
            bad("empty.state", b""),
            "the snapshot state file is truncated",
        ),
    ];
    for (s, words) in &cases {
        let m = refused(
            api.put("/snapshot/load", &load_body(s, dir.path(), "x", true)),
            words,
        );
        assert!(m.starts_with("Load snapshot error: "), "{m}");
        assert_eq!(api.get("/").unwrap().json()["state"], "Not started");
    }

    // A memory file shorter than the layout.
    let short = dir.path().join("short.mem");
    fs::write(&short, vec![0u8; 4096]).unwrap();
    let body = json!({
        "snapshot_path": snap.state,
        "mem_backend": {"backend_type": "File", "backend_path": short},
    });
    refused(
        api.put("/snapshot/load", &body),
        "the memory file is 4096 bytes, the snapshot's memory layout needs 33554432",
    );
    // Missing files, by name.
    let missing = dir.path().join("missing.state");
    let body = json!({
        "snapshot_path": missing,
        "mem_backend": {"backend_type": "File", "backend_path": snap.mem},
    });
    refused(api.put("/snapshot/load", &body), "missing.state");
    // A page-fault handler that is not there.
    let uffd = json!({
        "snapshot_path": snap.state,
        "mem_backend": {"backend_type": "Uffd", "backend_path": dir.path().join("uffd.sock")},
    });
    refused(
        api.put("/snapshot/load", &uffd),
        "cannot connect to the page-fault handler",
    );
    // What Ember does not do is refused, not ignored.
    let realtime = json!({
        "snapshot_path": snap.state,
        "mem_backend": {"backend_type": "File", "backend_path": snap.mem},
        "clock_realtime": true,
    });
    refused(
        api.put("/snapshot/load", &realtime),
        "clock_realtime is not supported",
    );
    let both = json!({
        "snapshot_path": snap.state,
        "mem_file_path": snap.mem,
        "mem_backend": {"backend_type": "File", "backend_path": snap.mem},
    });
    refused(
        api.put("/snapshot/load", &both),
        "too many fields: either `mem_backend` or `mem_file_path` exclusively is required",
    );
    let neither = json!({"snapshot_path": snap.state});
    refused(
        api.put("/snapshot/load", &neither),
        "missing field: either `mem_backend` or `mem_file_path` is required",
    );
    let net = json!({
        "snapshot_path": snap.state,
        "mem_backend": {"backend_type": "File", "backend_path": snap.mem},
        "network_overrides": [{"iface_id": "eth0", "host_dev_name": "tap0"}],
    });
    refused(api.put("/snapshot/load", &net), "Unknown Network Device");
    assert_eq!(api.get("/").unwrap().json()["state"], "Not started");

    // After all that, the good snapshot still loads in the same process,
    // here with dirty page tracking on.
    let mut body = load_body(&snap, dir.path(), "ok", true);
    body["track_dirty_pages"] = json!(true);
    ok(api.put("/snapshot/load", &body));
    let machine = api.get("/machine-config").unwrap().json();
    assert_eq!(machine["track_dirty_pages"], true, "{machine}");
    let last = last_count(&snap.output);
    let out = vm
        .wait_for_output(
            |o| counts(o).last().is_some_and(|n| *n > last + 10),
            TIMEOUT,
        )
        .unwrap();
    assert_contiguous(&snap.output, &out);

    // --describe-snapshot reads the format version; --snapshot-version
    // prints the one Ember writes.
    let describe = Command::new(ember_binary())
        .arg("--describe-snapshot")
        .arg(&snap.state)
        .output()
        .unwrap();
    assert!(describe.status.success(), "{describe:?}");
    assert_eq!(String::from_utf8_lossy(&describe.stdout), "v1.0.0\n");
    let version = Command::new(ember_binary())
        .arg("--snapshot-version")
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&version.stdout), "v1.0.0\n");
    let describe = Command::new(ember_binary())
        .arg("--describe-snapshot")
        .arg(&snap.mem)
        .output()
        .unwrap();
    assert!(!describe.status.success());
    assert!(
        String::from_utf8_lossy(&describe.stderr).contains("bad magic number"),
        "{describe:?}"
    );
}

#[test]
fn snapshot_calls_out_of_order_get_firecracker_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (_vm, mut api) = spawn("snap-order");
    let create =
        json!({"snapshot_path": dir.path().join("s"), "mem_file_path": dir.path().join("m")});
    refused(
        api.put("/snapshot/create", &create),
        "The requested operation is not supported before starting the microVM.",
    );
    ok(api.put(
        "/boot-source",
        &json!({"kernel_image_path": guest_path("counter"), "boot_args": "console=ttyS0"}),
    ));
    let load = json!({
        "snapshot_path": dir.path().join("s"),
        "mem_backend": {"backend_type": "File", "backend_path": dir.path().join("m")},
    });
    refused(
        api.put("/snapshot/load", &load),
        "Load snapshot error: Loading a microVM snapshot not allowed after configuring boot-specific resources.",
    );
    // Unknown fields are refused, as Firecracker's parser does.
    refused(
        api.put(
            "/snapshot/create",
            &json!({"snapshot_path": "/s", "mem_file_path": "/m", "version": "1.0"}),
        ),
        "unknown field `version`",
    );
}

/// Every `blk0: loop N` line, in order.
fn loops(out: &str) -> Vec<u64> {
    out.lines()
        .filter_map(|l| l.strip_prefix("blk0: loop "))
        .filter_map(|n| n.parse().ok())
        .collect()
}

#[test]
fn block_io_goes_on_across_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    fs::File::create(&disk).unwrap().set_len(1 << 20).unwrap();
    let mut vm = ApiVm::spawn(&["--id", "snap-blk"]).unwrap();
    let mut api = vm.client().unwrap();
    ok(api.put(
        "/boot-source",
        &json!({"kernel_image_path": guest_path("virtio_blk"), "boot_args": "console=ttyS0 blk.test=loop"}),
    ));
    ok(api.put(
        "/machine-config",
        &json!({"vcpu_count": 1, "mem_size_mib": 32}),
    ));
    ok(api.put(
        "/drives/data",
        &json!({"drive_id": "data", "path_on_host": disk, "is_root_device": false, "is_read_only": false}),
    ));
    ok(api.put("/actions", &json!({"action_type": "InstanceStart"})));
    vm.wait_for_output(|o| loops(o).len() > 20, TIMEOUT)
        .unwrap();
    let snap = pause_and_snapshot(vm, &mut api, dir.path(), "blk");
    let before = snap.output.clone();
    let complete = before.rfind('\n').map_or("", |i| &before[..i]);
    let last = *loops(complete).last().unwrap();

    let start = Instant::now();
    let (mut vm, mut api) = load_resumed("snap-blk-2", &snap, json!({}));
    let after = vm
        .wait_for_output(
            |o| loops(o).last().is_some_and(|n| *n > last + 20) || o.contains("mismatch"),
            TIMEOUT,
        )
        .unwrap();
    eprintln!(
        "restored block guest: 20 more rounds after {:?}",
        start.elapsed()
    );
    assert!(!after.contains("mismatch"), "{after}");
    let all = loops(&format!("{before}{after}"));
    for (i, n) in all.iter().enumerate() {
        assert_eq!(
            *n, i as u64,
            "round {i} is {n}:\n{before}\n--- restored ---\n{after}"
        );
    }
    // The restored guest's writes reached the drive's file.
    ok(api.patch("/vm", &json!({"state": "Paused"})));
    let round = *loops(&vm.stdout()).last().unwrap();
    let image = fs::read(&disk).unwrap();
    let sector = (round % 64) * 8;
    let off = (sector * 512) as usize;
    for (i, b) in image[off..off + 8 * 512].iter().enumerate() {
        let at = (off + i) as u64;
        let want = (round + (at >> 9) * 13 + (at & 511) * 7) as u8;
        assert_eq!(*b, want, "round {round}, byte {at}");
    }
}

/// Connects to guest port `port` through the vsock device's socket `uds`
/// and checks one echo round trip.
fn vsock_echo(uds: &Path, port: u32, data: &[u8]) {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    let deadline = Instant::now() + TIMEOUT;
    let mut s = loop {
        match UnixStream::connect(uds) {
            Ok(s) => break s,
            Err(e) if Instant::now() > deadline => panic!("{}: {e}", uds.display()),
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    };
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
    let mut reply = Vec::new();
    let mut byte = [0u8; 1];
    while s.read(&mut byte).unwrap() == 1 && byte[0] != b'\n' {
        reply.push(byte[0]);
    }
    assert!(
        reply.starts_with(b"OK "),
        "{}",
        String::from_utf8_lossy(&reply)
    );
    s.write_all(data).unwrap();
    let mut back = vec![0u8; data.len()];
    s.read_exact(&mut back).unwrap();
    assert_eq!(back, data);
}

#[test]
fn a_vsock_driver_gets_a_transport_reset_after_a_load() {
    let dir = tempfile::tempdir().unwrap();
    let (mut vm, mut api) = spawn("snap-vsock");
    ok(api.put(
        "/boot-source",
        &json!({"kernel_image_path": guest_path("virtio_vsock"), "boot_args": "console=ttyS0 vsock.accepts=2 vsock.idle=100"}),
    ));
    ok(api.put(
        "/machine-config",
        &json!({"vcpu_count": 1, "mem_size_mib": 32}),
    ));
    let before_uds = dir.path().join("before.sock");
    ok(api.put("/vsock", &json!({"guest_cid": 3, "uds_path": before_uds})));
    ok(api.put("/actions", &json!({"action_type": "InstanceStart"})));
    vm.wait_for_output(|o| o.contains("vsock: queues rx"), TIMEOUT)
        .unwrap();
    // One connection served and closed before the snapshot.
    vsock_echo(&before_uds, 52, b"before the snapshot");
    vm.wait_for_output(|o| o.contains(" closed ("), TIMEOUT)
        .unwrap();
    // Let the device take the guest's last packet of that connection: a
    // restored device numbers host connections from the start again, and
    // would apply a stale RST to the new connection with the same ports.
    std::thread::sleep(Duration::from_millis(200));
    ok(api.patch("/vm", &json!({"state": "Paused"})));
    let state = dir.path().join("vsock.state");
    let mem = dir.path().join("vsock.mem");
    ok(api.put(
        "/snapshot/create",
        &json!({"snapshot_path": state, "mem_file_path": mem}),
    ));
    drop(vm);

    let (vm, mut api) = spawn("snap-vsock-2");
    let after_uds = dir.path().join("after.sock");
    ok(api.put(
        "/snapshot/load",
        &json!({
            "snapshot_path": state,
            "mem_backend": {"backend_type": "File", "backend_path": mem},
            "resume_vm": true,
            "vsock_override": {"uds_path": after_uds},
        }),
    ));
    // The receive buffers the driver posted before the snapshot carry the
    // new connection; once it closes, the guest reports and resets.
    if std::panic::catch_unwind(|| vsock_echo(&after_uds, 52, b"after the load")).is_err() {
        let e = vm.kill();
        panic!(
            "the echo after the load failed:\n{}\n{}",
            e.stdout, e.stderr
        );
    }
    let exit = vm.wait(TIMEOUT).unwrap();
    assert!(exit.status.success(), "{exit:?}");
    assert!(exit.stdout.contains("vsock: ok"), "{}", exit.stdout);
    // Exactly one event: VIRTIO_VSOCK_EVENT_TRANSPORT_RESET.
    assert!(exit.stdout.contains(" events 1 "), "{}", exit.stdout);
}

#[test]
fn a_network_interface_moves_to_the_overriding_tap() {
    let dir = tempfile::tempdir().unwrap();
    // Ember creates the TAPs (as root); they go away with the process.
    let (tap_a, tap_b) = (
        format!("esa{}", std::process::id() % 100_000),
        format!("esb{}", std::process::id() % 100_000),
    );
    let (mut vm, mut api) = spawn("snap-net");
    ok(api.put(
        "/boot-source",
        &json!({"kernel_image_path": guest_path("counter"), "boot_args": "console=ttyS0"}),
    ));
    ok(api.put(
        "/machine-config",
        &json!({"vcpu_count": 1, "mem_size_mib": 32}),
    ));
    ok(api.put(
        "/network-interfaces/eth0",
        &json!({"iface_id": "eth0", "host_dev_name": tap_a, "guest_mac": "06:00:ac:10:00:02"}),
    ));
    ok(api.put("/actions", &json!({"action_type": "InstanceStart"})));
    vm.wait_for_output(|o| counts(o).len() > 10, TIMEOUT)
        .unwrap();
    let snap = pause_and_snapshot(vm, &mut api, dir.path(), "net");
    let before = snap.output.clone();

    let (mut vm, mut api) = spawn("snap-net-2");
    let load = |overrides: Value| {
        json!({
            "snapshot_path": snap.state,
            "mem_backend": {"backend_type": "File", "backend_path": snap.mem},
            "resume_vm": true,
            "network_overrides": overrides,
        })
    };
    refused(
        api.put(
            "/snapshot/load",
            &load(json!([{"iface_id": "eth1", "host_dev_name": tap_b}])),
        ),
        "Unknown Network Device: `eth1`",
    );
    ok(api.put(
        "/snapshot/load",
        &load(json!([{"iface_id": "eth0", "host_dev_name": tap_b}])),
    ));
    let config = api.get("/vm/config").unwrap().json();
    let iface = &config["network-interfaces"][0];
    assert_eq!(iface["host_dev_name"], json!(tap_b), "{config}");
    assert_eq!(iface["guest_mac"], "06:00:ac:10:00:02", "{config}");
    let last = last_count(&before);
    let after = vm
        .wait_for_output(
            |o| counts(o).last().is_some_and(|n| *n > last + 20),
            TIMEOUT,
        )
        .unwrap();
    assert_contiguous(&before, &after);
    // The restored device holds the overriding TAP.
    let link = Command::new("ip")
        .args(["link", "show", &tap_b])
        .output()
        .unwrap();
    assert!(link.status.success(), "{link:?}");
}

/// A page-fault handler as Firecracker's examples are: it receives the
/// userfaultfd and the region list on a Unix socket, then copies each page
/// the VM faults on from the memory file.
struct PageFaultHandler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl PageFaultHandler {
    fn start(socket: &Path, mem_file: &Path) -> Self {
        use std::os::fd::AsRawFd;
        use std::os::unix::net::UnixListener;
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;

        use vmm_sys_util::sock_ctrl_msg::ScmSocket;

        /// `_IOWR(0xAA, 0x03, struct uffdio_copy)`.
        const UFFDIO_COPY: libc::c_ulong = 0xC028_AA03;
        const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
        #[repr(C)]
        struct UffdioCopy {
            dst: u64,
            src: u64,
            len: u64,
            mode: u64,
            copy: i64,
        }

        let listener = UnixListener::bind(socket).unwrap();
        let mem = fs::read(mem_file).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let done = stop.clone();
        let thread = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut buf = vec![0u8; 4096];
            let (n, uffd) = stream.recv_with_fd(&mut buf).unwrap();
            let uffd = uffd.expect("no userfaultfd came with the regions");
            let regions: Vec<Value> = serde_json::from_slice(&buf[..n]).unwrap();
            let regions: Vec<(u64, u64, u64)> = regions
                .iter()
                .map(|r| {
                    assert_eq!(r["page_size"], 4096, "{r}");
                    (
                        r["base_host_virt_addr"].as_u64().unwrap(),
                        r["size"].as_u64().unwrap(),
                        r["offset"].as_u64().unwrap(),
                    )
                })
                .collect();
            let mut served = 0u64;
            while !done.load(Ordering::SeqCst) {
                let mut pfd = libc::pollfd {
                    fd: uffd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                if unsafe { libc::poll(&mut pfd, 1, 20) } <= 0 {
                    continue;
                }
                let mut msg = [0u8; 32];
                // SAFETY: reads at most 32 bytes into `msg`.
                let got = unsafe { libc::read(uffd.as_raw_fd(), msg.as_mut_ptr().cast(), 32) };
                if got != 32 || msg[0] != UFFD_EVENT_PAGEFAULT {
                    continue;
                }
                let addr = u64::from_le_bytes(msg[16..24].try_into().unwrap());
                let page = addr & !4095;
                let (base, _, offset) = *regions
                    .iter()
                    .find(|(base, size, _)| (*base..base + size).contains(&page))
                    .expect("a fault outside guest memory");
                let at = (offset + page - base) as usize;
                let copy = UffdioCopy {
                    dst: page,
                    src: mem[at..at + 4096].as_ptr() as u64,
                    len: 4096,
                    mode: 0,
                    copy: 0,
                };
                // SAFETY: UFFDIO_COPY reads a `struct uffdio_copy` and the
                // 4 KiB at `src`, which `mem` holds for the call.
                let r = unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_COPY, &copy) };
                let eexist = std::io::Error::last_os_error().raw_os_error() == Some(libc::EEXIST);
                assert!(
                    r == 0 || eexist,
                    "UFFDIO_COPY: {}",
                    std::io::Error::last_os_error()
                );
                served += 1;
            }
            served
        });
        PageFaultHandler {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops the handler; returns how many faults it served.
    fn stop(mut self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap()
    }
}

#[test]
fn a_snapshot_loads_with_its_memory_served_by_a_page_fault_handler() {
    let dir = tempfile::tempdir().unwrap();
    let snap = take_snapshot(dir.path());
    let socket = dir.path().join("uffd.sock");
    let handler = PageFaultHandler::start(&socket, &snap.mem);

    let (mut vm, mut api) = spawn("snap-uffd");
    ok(api.put(
        "/snapshot/load",
        &json!({
            "snapshot_path": snap.state,
            "mem_backend": {"backend_type": "Uffd", "backend_path": socket},
            "resume_vm": true,
            "vsock_override": {"uds_path": dir.path().join("v-uffd.sock")},
        }),
    ));
    let last = last_count(&snap.output);
    let out = vm
        .wait_for_output(
            |o| counts(o).last().is_some_and(|n| *n > last + 30),
            TIMEOUT,
        )
        .unwrap();
    assert_contiguous(&snap.output, &out);
    drop(vm);
    let served = handler.stop();
    assert!(served > 0, "no page fault reached the handler");
}

/// Every `rng0: loop N len L zeroes Z` line, as (N, L, Z).
fn rng_rounds(out: &str) -> Vec<(u64, u64, u64)> {
    out.lines()
        .filter_map(|l| l.strip_prefix("rng0: loop "))
        .filter_map(|l| {
            let w: Vec<&str> = l.split(' ').collect();
            match w[..] {
                [n, "len", len, "zeroes", z] => {
                    Some((n.parse().ok()?, len.parse().ok()?, z.parse().ok()?))
                }
                _ => None,
            }
        })
        .collect()
}

#[test]
fn an_entropy_device_keeps_serving_across_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let (mut vm, mut api) = spawn("snap-rng");
    ok(api.put(
        "/boot-source",
        &json!({"kernel_image_path": guest_path("virtio_rng"), "boot_args": "console=ttyS0 rng.test=loop rng.size=256"}),
    ));
    ok(api.put(
        "/machine-config",
        &json!({"vcpu_count": 1, "mem_size_mib": 32}),
    ));
    ok(api.put("/entropy", &json!({})));
    ok(api.put("/actions", &json!({"action_type": "InstanceStart"})));
    vm.wait_for_output(|o| rng_rounds(o).len() > 20, TIMEOUT)
        .unwrap();
    let snap = pause_and_snapshot(vm, &mut api, dir.path(), "rng");
    let complete = snap.output.rfind('\n').map_or("", |i| &snap.output[..i]);
    let last = rng_rounds(complete).last().unwrap().0;

    let (mut vm, mut api) = load_resumed("snap-rng-2", &snap, json!({}));
    assert_eq!(
        api.get("/vm/config").unwrap().json()["entropy"],
        json!({"rate_limiter": null}),
        "the restored VM has its entropy device"
    );
    let after = vm
        .wait_for_output(
            |o| rng_rounds(o).last().is_some_and(|r| r.0 > last + 20) || o.contains("failed"),
            TIMEOUT,
        )
        .unwrap();
    assert!(!after.contains("failed"), "{after}");
    let all = rng_rounds(&format!("{}{after}", snap.output));
    for (i, (n, len, zeroes)) in all.iter().enumerate() {
        assert_eq!(*n, i as u64, "round {i}:\n{}\n---\n{after}", snap.output);
        assert_eq!(*len, 256, "round {i}");
        // 256 random bytes hold about one zero byte; 32 means no entropy.
        assert!(*zeroes < 32, "round {i}: {zeroes} zero bytes");
    }
}
