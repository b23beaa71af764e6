//! virtio-rng end to end: the `virtio_rng` guest finds the entropy device
//! (through the `virtio_mmio.device=` command line or the ACPI DSDT),
//! initializes it as Linux's virtio_mmio and virtio_rng drivers do, reads
//! random bytes and reports what it got on the serial port; the test checks
//! the report, the `entropy` metrics and, with a rate limiter, the time the
//! reads take.

use std::time::Duration;

use ember_tests::api::ApiVm;
use ember_tests::{guest_path, run_guest, Output};
use serde_json::{json, Value};

/// Feature bits (virtio 1.2 §6).
const F_VERSION_1: u32 = 32;
const F_EVENT_IDX: u32 = 29;

fn boot(args: &str, extra: Value) -> Output {
    let mut config = json!({
        "boot-source": {"boot_args": format!("console=ttyS0 {args}")},
    });
    ember_tests::merge_patch(&mut config, &extra);
    let out = run_guest(&guest_path("virtio_rng"), &config).expect("run ember");
    assert!(out.status.success(), "{out}");
    assert!(
        out.stdout.lines().any(|l| l == "virtio_rng done"),
        "the guest did not finish\n{out}"
    );
    out
}

/// The guest's `rng0: ` lines, without the prefix.
fn device_lines(out: &Output) -> Vec<String> {
    out.stdout
        .lines()
        .filter_map(|l| l.strip_prefix("rng0: "))
        .map(str::to_string)
        .collect()
}

fn find<'a>(lines: &'a [String], prefix: &str, out: &Output) -> &'a str {
    lines
        .iter()
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} line\n{out}"))
}

fn hex(s: &str) -> u64 {
    u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap_or_else(|e| panic!("{s:?}: {e}"))
}

fn reads_random_bytes(discover: &str) {
    let dir = tempfile::tempdir().unwrap();
    let metrics = dir.path().join("metrics.json");
    let out = boot(
        &format!("discover={discover} rng.reads=4 rng.size=4096"),
        json!({"entropy": {}, "metrics": {"metrics_path": metrics}}),
    );
    if discover == "acpi" {
        assert!(
            out.stdout.lines().any(|l| l == "acpi rsdp 0xe0000"),
            "{out}"
        );
    }
    assert!(out.stdout.lines().any(|l| l == "rng devices 1"), "{out}");
    let lines = device_lines(&out);
    let (offered, accepted) = find(&lines, "features offered ", &out)
        .split_once(" accepted ")
        .expect("features line format");
    assert_eq!(hex(offered), 1 << F_VERSION_1 | 1 << F_EVENT_IDX, "{out}");
    assert_eq!(hex(accepted), 1 << F_VERSION_1, "{out}");
    assert_eq!(find(&lines, "queue 0 size ", &out), "256 status 0xf");

    for i in 0..4 {
        let line = find(&lines, &format!("read {i} len "), &out);
        let (len, zeroes) = line.split_once(" zeroes ").expect("read line format");
        assert_eq!(len, "4096", "{out}");
        // Random data has about 16 zero bytes in 4096; 0xa5 filler none,
        // an untouched or zeroed buffer far more or none at all is caught
        // by the distinct check below.
        let zeroes: u64 = zeroes.parse().unwrap();
        assert!(zeroes < 100, "{line}\n{out}");
    }
    let summary = find(&lines, "bytes ", &out);
    let parts: Vec<&str> = summary.split(' ').collect();
    assert_eq!(parts[0], "16384", "{out}");
    assert_eq!(parts[3], "distinct", "{out}");
    let split = find(&lines, "split len ", &out);
    assert!(split.starts_with("160 zeroes "), "{out}");
    let zeroes: u64 = split.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(zeroes < 20, "{split}");
    // A device-readable buffer comes back empty and untouched.
    assert_eq!(find(&lines, "readonly len ", &out), "0 untouched");

    // The metrics lines have Firecracker's `entropy` group; counters are
    // written as their growth since the previous line, so add up every
    // line.
    let text = std::fs::read_to_string(&metrics).expect("read the metrics file");
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("metrics line is JSON"))
        .collect();
    let last = lines.last().expect("a metrics line");
    assert!(last["entropy"].is_object(), "{text}");
    let sum = |f: &str| -> u64 {
        lines
            .iter()
            .map(|v| v["entropy"][f].as_u64().unwrap_or(0))
            .sum()
    };
    assert_eq!(sum("entropy_bytes"), 16384 + 160, "{text}");
    assert_eq!(sum("entropy_event_count"), 6, "{text}");
    assert_eq!(sum("entropy_event_fails"), 1, "{text}");
    assert_eq!(sum("host_rng_fails"), 0, "{text}");
    assert_eq!(sum("entropy_rate_limiter_throttled"), 0, "{text}");
}

#[test]
fn reads_random_bytes_found_on_the_command_line() {
    reads_random_bytes("cmdline");
}

#[test]
fn reads_random_bytes_found_through_acpi() {
    reads_random_bytes("acpi");
}

#[test]
fn without_the_device_the_guest_finds_none() {
    let out = boot("rng.reads=2", json!({}));
    assert!(
        out.stdout.lines().any(|l| l == "virtio-mmio devices 0"),
        "{out}"
    );
    assert!(out.stdout.lines().any(|l| l == "rng devices 0"), "{out}");
    assert!(device_lines(&out).is_empty(), "{out}");
}

#[test]
fn entropy_slot_follows_the_other_devices() {
    // Firecracker's order: drives, network interfaces, vsock, entropy.
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let out = boot(
        "rng.reads=2",
        json!({
            "drives": [{"drive_id": "d", "path_on_host": image, "is_root_device": false}],
            "vsock": {"guest_cid": 3, "uds_path": dir.path().join("v.sock")},
            "entropy": {},
        }),
    );
    let devices: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| l.starts_with("virtio-mmio 0x"))
        .collect();
    assert_eq!(
        devices,
        [
            "virtio-mmio 0xc0001000 gsi 5 device 2",
            "virtio-mmio 0xc0002000 gsi 6 device 19",
            "virtio-mmio 0xc0003000 gsi 7 device 4",
        ],
        "{out}"
    );
    assert!(out.stdout.lines().any(|l| l == "rng devices 1"), "{out}");
}

/// Boots the guest reading `total` bytes 4 KiB at a time; returns the
/// wall time of the run and the guest's report.
fn throughput(total: u64, entropy: Value) -> (Duration, String) {
    let out = boot(
        &format!("rng.size=4096 rng.total={total}"),
        json!({"entropy": entropy}),
    );
    let lines = device_lines(&out);
    let line = find(&lines, "throughput bytes ", &out).to_string();
    assert!(line.starts_with(&format!("{total} tsc ")), "{line}\n{out}");
    (out.wall, out.to_string())
}

#[test]
fn rate_limiter_paces_the_reads() {
    // 4 KiB per 100 ms: 64 KiB is the full bucket's 4 KiB at once, then 15
    // more refills of 100 ms each.
    let limiter = json!({"rate_limiter": {"bandwidth": {"size": 4096, "refill_time": 100}}});
    let (limited, out) = throughput(65536, limiter);
    assert!(
        limited >= Duration::from_millis(1450),
        "64 KiB took {limited:?} under a 4 KiB per 100 ms limit\n{out}"
    );
    assert!(
        limited < Duration::from_secs(20),
        "64 KiB took {limited:?}\n{out}"
    );
    // Without the limit the same reads are much faster: the time above is
    // the limiter's.
    let (free, out) = throughput(65536, json!({}));
    assert!(
        free + Duration::from_millis(1000) < limited,
        "unlimited {free:?}, limited {limited:?}\n{out}"
    );
}

#[test]
fn put_entropy_through_the_api() {
    let vm = ApiVm::spawn(&["--id", "rng-api"]).unwrap();
    let mut api = vm.client().unwrap();
    let put = |api: &mut ember_tests::api::Client, path: &str, body: Value| {
        let r = api.put(path, &body).unwrap();
        assert_eq!(r.status, 204, "PUT {path}: {r:?}");
    };
    put(
        &mut api,
        "/boot-source",
        json!({"kernel_image_path": guest_path("virtio_rng"), "boot_args": "console=ttyS0 rng.reads=2"}),
    );
    // Unknown fields are refused with serde's words, as in Firecracker.
    let r = api.put("/entropy", &json!({"rate": 1})).unwrap();
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.fault_message().contains("unknown field `rate`"), "{r:?}");
    assert!(api.get("/vm/config").unwrap().json()["entropy"].is_null());
    put(&mut api, "/entropy", json!({}));
    let limiter = json!({"bandwidth": {"size": 100000, "refill_time": 100}});
    put(&mut api, "/entropy", json!({"rate_limiter": limiter}));
    let c = api.get("/vm/config").unwrap().json();
    assert_eq!(
        c["entropy"],
        json!({"rate_limiter": {"bandwidth": {"size": 100000, "one_time_burst": null,
            "refill_time": 100}, "ops": null}}),
        "{c}"
    );
    let r = api
        .put("/actions", &json!({"action_type": "InstanceStart"}))
        .unwrap();
    assert_eq!(r.status, 204, "{r:?}");
    let out = vm.wait(Duration::from_secs(30)).unwrap();
    assert!(out.status.success(), "{}\n{}", out.stdout, out.stderr);
    assert!(
        out.stdout.lines().any(|l| l == "rng devices 1"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout
            .lines()
            .any(|l| l.starts_with("rng0: bytes 8192 ") && l.ends_with(" distinct")),
        "{}",
        out.stdout
    );
}
