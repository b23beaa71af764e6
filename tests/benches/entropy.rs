//! Entropy (virtio-rng) throughput seen from the guest: the release `ember`
//! binary and, when `FIRECRACKER_BIN` names one, Firecracker beside it on
//! the same guest and config, in one run.
//!
//! The `virtio_rng` guest (ring 3, one request in flight, polling the used
//! ring, interrupts off) reads `rng.total` bytes `rng.size` at a time
//! (`rng.total=`, its throughput step) and times the loop with the TSC;
//! the host converts with KVM_GET_TSC_KHZ. Each request costs the guest's
//! QueueNotify exit and the VMM's `getrandom` into guest memory. Two
//! request sizes: [`BIG`] bytes (Firecracker's most per request, 64 KiB)
//! over [`BIG_TOTAL`], where filling the buffer dominates, and [`SMALL`]
//! bytes over [`SMALL_TOTAL`], where the exit does. Each VMM boots the
//! guest [`RUNS`] times per size, each in a fresh process, the two VMMs
//! alternating; the table shows medians. Beside them, `getrandom(2)` in
//! this process with the same chunk sizes: the host's ceiling.
//!
//! Then the same reads under a `bandwidth` rate limiter of [`LIMIT_SIZE`]
//! bytes per [`LIMIT_REFILL_MS`] ms (1 MiB/s) over [`LIMITED_TOTAL`]: a
//! bucket starts full, so a VMM that keeps to the limit takes at least
//! `(total - size) / rate`; the table shows that floor, each VMM's time
//! and its rate over the run.
//!
//! Run with `FIRECRACKER_BIN=/path/to/firecracker cargo bench -p ember-tests
//! --bench entropy`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ember_tests::{default_config, ember_binary, guest_path, median, merge_patch, tsc_khz, Launch};
use serde_json::{json, Value};

const RUNS: usize = 5;
const MIB: u64 = 1 << 20;
/// Firecracker's (and Ember's) largest fill per request.
const BIG: u64 = 64 << 10;
const BIG_TOTAL: u64 = 32 * MIB;
const SMALL: u64 = 4 << 10;
const SMALL_TOTAL: u64 = 8 * MIB;
const LIMITED_RUNS: usize = 3;
const LIMITED_TOTAL: u64 = 3 * MIB;
/// 128 KiB per 125 ms: 1 MiB/s.
const LIMIT_SIZE: u64 = 128 << 10;
const LIMIT_REFILL_MS: u64 = 125;

/// `getrandom(2)` into a `chunk`-byte buffer until `total` bytes: MiB/s.
fn host_getrandom(chunk: u64, total: u64) -> f64 {
    let mut buf = vec![0u8; chunk as usize];
    let start = Instant::now();
    let mut got = 0u64;
    while got < total {
        // SAFETY: the pointer and length describe `buf`, which lives
        // across the call; getrandom writes at most that many bytes.
        let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
        assert!(n > 0, "getrandom: {}", std::io::Error::last_os_error());
        got += n as u64;
    }
    got as f64 / MIB as f64 / start.elapsed().as_secs_f64()
}

/// One VM reading `total` bytes `size` at a time from an entropy device
/// configured as `entropy`: the seconds the guest's loop took.
fn run_once(binary: &Path, size: u64, total: u64, entropy: &Value, tsc_khz: f64) -> f64 {
    let mut config = default_config(&guest_path("virtio_rng"));
    merge_patch(
        &mut config,
        &json!({
            "boot-source": {"boot_args": format!(
                "console=ttyS0 reboot=k panic=1 rng.size={size} rng.total={total}"
            )},
            // Firecracker's parser needs the list.
            "drives": [],
            "entropy": entropy,
        }),
    );
    let out = Launch::new(&config)
        .binary(binary)
        .arg("--level")
        .arg("Error")
        .timeout(Duration::from_secs(120))
        .run()
        .unwrap_or_else(|e| panic!("{}: {e}", binary.display()));
    // "rng0: throughput bytes N tsc T"
    let line = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("rng0: throughput bytes "))
        .unwrap_or_else(|| panic!("{}: no throughput line\n{out}", binary.display()));
    let (bytes, ticks) = line
        .split_once(" tsc ")
        .unwrap_or_else(|| panic!("throughput line format: {line:?}"));
    assert_eq!(bytes, total.to_string(), "{}\n{out}", binary.display());
    let ticks: f64 = ticks.parse().unwrap_or_else(|e| panic!("{line:?}: {e}"));
    ticks / (tsc_khz * 1e3)
}

/// Runs every VMM `runs` times, alternating; returns each VMM's seconds.
fn alternate(
    vmms: &[(String, PathBuf)],
    runs: usize,
    size: u64,
    total: u64,
    entropy: &Value,
    tsc_khz: f64,
) -> Vec<Vec<f64>> {
    let mut secs = vec![Vec::new(); vmms.len()];
    for _ in 0..runs {
        for (i, (_, binary)) in vmms.iter().enumerate() {
            secs[i].push(run_once(binary, size, total, entropy, tsc_khz));
        }
    }
    secs
}

fn mib_s(total: u64, secs: f64) -> f64 {
    total as f64 / MIB as f64 / secs
}

fn main() {
    let tsc_khz = tsc_khz();
    let mut vmms: Vec<(String, PathBuf)> = vec![("ember".into(), ember_binary())];
    match std::env::var_os("FIRECRACKER_BIN").map(PathBuf::from) {
        Some(fc) => vmms.push(("firecracker".into(), fc)),
        None => println!("FIRECRACKER_BIN is not set: Ember's figures only"),
    }
    println!("guest TSC: {:.3} GHz (KVM_GET_TSC_KHZ)", tsc_khz / 1e6);
    println!(
        "virtio-rng, no rate limiter: median of {RUNS} VMs per VMM, each a fresh process, \
         one request in flight"
    );
    println!(
        "{:<12} {:>10} {:>10} {:>12} {:>14}  runs (MiB/s)",
        "vmm", "request", "total", "MiB/s", "us/request"
    );
    for (size, total) in [(BIG, BIG_TOTAL), (SMALL, SMALL_TOTAL)] {
        let requests = (total / size) as f64;
        let secs = alternate(&vmms, RUNS, size, total, &json!({}), tsc_khz);
        let mut rates = Vec::new();
        for ((name, _), s) in vmms.iter().zip(&secs) {
            let rate = median(s.iter().map(|&t| mib_s(total, t)).collect());
            println!(
                "{name:<12} {:>7} KiB {:>6} MiB {rate:>12.1} {:>14.1}  {:?}",
                size >> 10,
                total / MIB,
                median(s.clone()) * 1e6 / requests,
                s.iter()
                    .map(|&t| mib_s(total, t).round() as u64)
                    .collect::<Vec<_>>(),
            );
            rates.push(rate);
        }
        let host = median((0..RUNS).map(|_| host_getrandom(size, total)).collect());
        println!(
            "{:<12} {:>7} KiB {:>6} MiB {host:>12.1}  (getrandom(2) in this process)",
            "host",
            size >> 10,
            total / MIB
        );
        if let [e, fc] = rates[..] {
            println!(
                "ember/firecracker MiB/s, {} KiB requests: {:.2}",
                size >> 10,
                e / fc
            );
        }
    }

    let limiter = json!({"rate_limiter": {"bandwidth": {
        "size": LIMIT_SIZE, "refill_time": LIMIT_REFILL_MS}}});
    let rate = LIMIT_SIZE as f64 * 1000.0 / LIMIT_REFILL_MS as f64;
    let floor = (LIMITED_TOTAL - LIMIT_SIZE) as f64 / rate;
    println!();
    println!(
        "with a rate limiter, bandwidth {} KiB per {LIMIT_REFILL_MS} ms ({:.2} MiB/s): \
         {} MiB in {} KiB requests, median of {LIMITED_RUNS} VMs; \
         a full bucket then the refill rate needs at least {floor:.3} s",
        LIMIT_SIZE >> 10,
        rate / MIB as f64,
        LIMITED_TOTAL / MIB,
        BIG >> 10
    );
    println!(
        "{:<12} {:>10} {:>12} {:>12}",
        "vmm", "seconds", "MiB/s", "limit MiB/s"
    );
    let secs = alternate(&vmms, LIMITED_RUNS, BIG, LIMITED_TOTAL, &limiter, tsc_khz);
    for ((name, _), s) in vmms.iter().zip(&secs) {
        let t = median(s.clone());
        println!(
            "{name:<12} {t:>10.3} {:>12.3} {:>12.3}{}",
            mib_s(LIMITED_TOTAL, t),
            rate / MIB as f64,
            if s.iter().all(|&t| t >= floor * 0.98) {
                ""
            } else {
                "  FASTER THAN THE LIMIT"
            }
        );
    }
}
