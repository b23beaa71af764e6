//! Bad API input against the real `ember` binary: each gets Firecracker's
//! status and message, and the microVM (before or after boot) keeps going.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use ember_tests::api::{ApiVm, Client, Response};
use ember_tests::guest_path;
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(30);

/// The last counter value printed so far.
fn last_count(out: &str) -> Option<u64> {
    out.lines()
        .rev()
        .find_map(|l| l.strip_prefix("count ")?.parse().ok())
}

/// The VMM still answers, and the guest still makes progress.
fn still_running(vm: &mut ApiVm, api: &mut Client) {
    let r = api.get("/").unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["state"], "Running");
    let before = last_count(&vm.stdout()).unwrap_or(0);
    vm.wait_for_output(|o| last_count(o).is_some_and(|n| n > before + 5), TIMEOUT)
        .unwrap();
}

fn expect_400(r: Response, needle: &str) {
    assert_eq!(r.status, 400, "{r:?}");
    let msg = r.fault_message();
    assert!(msg.contains(needle), "{needle:?} not in {msg:?}");
}

#[test]
fn bad_requests_get_firecracker_errors_before_and_after_boot() {
    let mut vm = ApiVm::spawn::<&str>(&[]).unwrap();
    let mut api = vm.client().unwrap();

    // Before boot.
    expect_400(
        api.request("PUT", "/boot-source", Some("{\"kernel_image_path\": "))
            .unwrap(),
        "An error occurred when deserializing the json body of a request",
    );
    expect_400(
        api.put("/boot-source", &json!({"kernel": "/k"})).unwrap(),
        "unknown field `kernel`",
    );
    expect_400(
        api.put(
            "/machine-config",
            &json!({"vcpu_count": "two", "mem_size_mib": 128}),
        )
        .unwrap(),
        "invalid type",
    );
    let big = json!({"kernel_image_path": "k".repeat(60_000)});
    expect_400(
        api.put("/boot-source", &big).unwrap(),
        "is larger than the limit of 51200 allowed by server",
    );
    let missing = vm.dir().join("no-such-disk.img");
    expect_400(
        api.put(
            "/drives/rootfs",
            &json!({"drive_id": "rootfs", "path_on_host": missing, "is_root_device": true, "is_read_only": false}),
        )
        .unwrap(),
        missing.to_str().unwrap(),
    );
    // Refused when sent, not at InstanceStart: a TAP name no device can
    // have, a vsock socket in a directory that is not there.
    expect_400(
        api.put(
            "/network-interfaces/eth0",
            &json!({"iface_id": "eth0", "host_dev_name": "a-name-far-too-long-for-a-tap"}),
        )
        .unwrap(),
        "a-name-far-too-long-for-a-tap",
    );
    let nowhere = vm.dir().join("no-such-dir").join("v.sock");
    expect_400(
        api.put("/vsock", &json!({"guest_cid": 3, "uds_path": nowhere}))
            .unwrap(),
        "does not exist",
    );
    let r = api.get("/vm/config").unwrap().json();
    assert_eq!(r["network-interfaces"], json!([]), "{r}");
    assert_eq!(r["vsock"], json!(null), "{r}");
    expect_400(
        api.put("/actions", &json!({"action_type": "FlushMetrics"}))
            .unwrap(),
        "not supported before starting the microVM",
    );
    expect_400(
        api.put("/actions", &json!({"action_type": "InstanceStart"}))
            .unwrap(),
        "Cannot start microvm without kernel configuration",
    );
    // A start that fails leaves the VMM waiting for a better configuration.
    let r = api.get("/").unwrap();
    assert_eq!(r.json()["state"], "Not started");

    // The same connection still works: boot.
    let r = api
        .put(
            "/boot-source",
            &json!({"kernel_image_path": guest_path("counter")}),
        )
        .unwrap();
    assert_eq!(r.status, 204, "{r:?}");
    let r = api
        .put("/actions", &json!({"action_type": "InstanceStart"}))
        .unwrap();
    assert_eq!(r.status, 204, "{r:?}");
    vm.wait_for_output(|o| o.contains("count 3\n"), TIMEOUT)
        .unwrap();

    // After boot.
    expect_400(
        api.put("/actions", &json!({"action_type": "InstanceStart"}))
            .unwrap(),
        "not supported after starting the microVM",
    );
    expect_400(
        api.put(
            "/boot-source",
            &json!({"kernel_image_path": guest_path("hello")}),
        )
        .unwrap(),
        "not supported after starting the microVM",
    );
    expect_400(
        api.patch("/machine-config", &json!({"vcpu_count": 2}))
            .unwrap(),
        "not supported after starting the microVM",
    );
    expect_400(
        api.request("PATCH", "/vm", Some("{\"state\": \"Paused\""))
            .unwrap(),
        "An error occurred when deserializing the json body of a request",
    );
    expect_400(
        api.patch("/vm", &json!({"state": "Stopped"})).unwrap(),
        "unknown variant",
    );
    expect_400(
        api.patch("/vm", &json!({"state": "Paused", "extra": 1}))
            .unwrap(),
        "unknown field `extra`",
    );
    expect_400(
        api.request(
            "PUT",
            "/actions",
            Some(&format!("{{\"action_type\": \"{}\"}}", "x".repeat(52_000))),
        )
        .unwrap(),
        "is larger than the limit of 51200 allowed by server",
    );
    let r = api.get("/no-such-path").unwrap();
    assert_eq!(r.status, 404, "{r:?}");
    still_running(&mut vm, &mut api);
}

#[test]
fn vanishing_and_slow_clients_do_not_disturb_the_running_vm() {
    let mut vm = ApiVm::spawn::<&str>(&[]).unwrap();
    let mut api = vm.client().unwrap();
    let r = api
        .put(
            "/boot-source",
            &json!({"kernel_image_path": guest_path("counter")}),
        )
        .unwrap();
    assert_eq!(r.status, 204);
    let r = api
        .put("/actions", &json!({"action_type": "InstanceStart"}))
        .unwrap();
    assert_eq!(r.status, 204);
    vm.wait_for_output(|o| o.contains("count 3\n"), TIMEOUT)
        .unwrap();

    // A client that leaves in the middle of a request: headers promise a
    // body that never comes.
    {
        let mut s = UnixStream::connect(vm.socket()).unwrap();
        s.write_all(b"PATCH /vm HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"state\"")
            .unwrap();
    }
    // One that leaves in the middle of the request line.
    {
        let mut s = UnixStream::connect(vm.socket()).unwrap();
        s.write_all(b"GET /vers").unwrap();
    }
    // One that sends a request and leaves without reading the answer.
    {
        let mut s = UnixStream::connect(vm.socket()).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    }
    still_running(&mut vm, &mut api);

    // A slow client, one byte every 2 ms, while another is served at once.
    let socket = vm.socket().to_path_buf();
    let slow = std::thread::spawn(move || {
        let mut s = UnixStream::connect(&socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        for b in b"GET /machine-config HTTP/1.1\r\nConnection: close\r\n\r\n" {
            s.write_all(&[*b]).unwrap();
            std::thread::sleep(Duration::from_millis(2));
        }
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        answer
    });
    let start = Instant::now();
    let r = api.get("/version").unwrap();
    assert_eq!(r.status, 200);
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "a slow client held up another for {:?}",
        start.elapsed()
    );
    let answer = slow.join().unwrap();
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    assert!(answer.contains("\"vcpu_count\":1"), "{answer}");
    still_running(&mut vm, &mut api);

    // Unknown drive and missing file for PATCH /drives.
    expect_400(
        api.patch(
            "/drives/nope",
            &json!({"drive_id": "nope", "path_on_host": "/dev/null"}),
        )
        .unwrap(),
        "no drive has the id `nope`",
    );
    let mut fresh = vm.client().unwrap();
    still_running(&mut vm, &mut fresh);
}
