//! virtio-blk throughput of the release `ember` binary, next to the host's
//! own speed on the same file.
//!
//! The `virtio_blk` guest (`blk.test=bench`) runs, with several requests
//! in flight (one kick per batch, polling the used ring, interrupts off):
//! sequential 128 KiB reads and writes over 128 MiB, and 4 KiB random reads
//! (an LCG over the whole disk) at queue depth 32 and 1. It times each
//! phase with the TSC; the host converts with KVM_GET_TSC_KHZ. The image is
//! a 256 MiB file, pre-written and read once so that reads hit the host
//! page cache. Each engine (Sync, Async) runs [`RUNS`] times; the table
//! shows medians. Every guest run sits between two `dd` runs and its read
//! speed is compared with their mean: other load on a 2-core machine moves
//! both, the ratio much less.
//!
//! Beside them: `dd if=IMAGE of=/dev/null bs=128k` after a warm-up, a
//! 128 KiB `pwrite` loop and a 4 KiB random `pread` loop in this process.
//! Exits per request come from `perf stat -e kvm:kvm_userspace_exit,
//! kvm:kvm_mmio` over two runs of different sizes (the difference cancels
//! boot and console output); the guest counts its own QueueNotify writes.
//!
//! Run with `cargo bench -p ember-tests --bench blk`. `EMBER_BIN` picks
//! another binary; `EMBER_BENCH_BLK_RATE_LIMITER`, when set, is the JSON
//! `rate_limiter` object given to the drive (for instance one so large it
//! never throttles, to measure what a configured limiter costs).

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ember_tests::{
    default_config, ember_binary, guest_path, median, merge_patch, tsc_khz, Launch, Output,
};
use serde_json::json;

const IMAGE_BYTES: u64 = 256 << 20;
const SEQ_MIB: u64 = 128;
const SEQ_BS: u64 = 128 << 10;
const RAND_OPS: u64 = 8192;
const RAND_BS: u64 = 4096;
const QUEUE_DEPTH: u64 = 32;
const RUNS: usize = 5;
/// The goal: guest 128 KiB reads at this fraction of the host's `dd`.
const GOAL: f64 = 0.8;
const ENGINES: [&str; 2] = ["Sync", "Async"];
const PHASES: [&str; 4] = ["seqread", "seqwrite", "randread", "randread_qd1"];

/// One phase as the guest reported it.
#[derive(Debug, Clone, Copy, Default)]
struct Phase {
    reqs: u64,
    bytes: u64,
    tsc: u64,
    notifies: u64,
    errors: u64,
}

impl Phase {
    fn secs(&self, tsc_khz: f64) -> f64 {
        self.tsc as f64 / (tsc_khz * 1e3)
    }
    fn mib_s(&self, tsc_khz: f64) -> f64 {
        self.bytes as f64 / (1 << 20) as f64 / self.secs(tsc_khz)
    }
    fn iops(&self, tsc_khz: f64) -> f64 {
        self.reqs as f64 / self.secs(tsc_khz)
    }
}

/// The guest's LCG (virtio_blk.c `next_sector`), as byte offsets.
struct Lcg(u64);

impl Lcg {
    fn next_offset(&mut self, blocks: u64, bs: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 33) % blocks) * bs
    }
}

fn make_image(path: &Path) {
    let f = File::create(path).expect("create the image");
    let mut chunk = vec![0u8; SEQ_BS as usize];
    for off in (0..IMAGE_BYTES).step_by(SEQ_BS as usize) {
        for (i, b) in chunk.iter_mut().enumerate() {
            *b = (off as usize / 4096 + i * 7) as u8;
        }
        f.write_all_at(&chunk, off).expect("fill the image");
    }
    f.sync_all().expect("sync the image");
}

/// Reads the whole file with 128 KiB preads; returns MiB/s.
fn host_seq_read(path: &Path) -> f64 {
    let f = File::open(path).unwrap();
    let mut buf = vec![0u8; SEQ_BS as usize];
    let start = Instant::now();
    for off in (0..IMAGE_BYTES).step_by(SEQ_BS as usize) {
        f.read_exact_at(&mut buf, off).unwrap();
    }
    IMAGE_BYTES as f64 / (1 << 20) as f64 / start.elapsed().as_secs_f64()
}

/// `dd if=path of=/dev/null bs=128k`: MiB/s from the seconds dd reports.
fn host_dd(path: &Path) -> Option<f64> {
    let out = Command::new("dd")
        .arg(format!("if={}", path.display()))
        .args(["of=/dev/null", "bs=128k"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stderr);
    // "268435456 bytes (268 MB, 256 MiB) copied, 0.0656 s, 4.1 GB/s"
    let line = text.lines().find(|l| l.contains(" copied, "))?;
    let bytes: f64 = line.split(' ').next()?.parse().ok()?;
    let secs: f64 = line
        .split(" copied, ")
        .nth(1)?
        .split(' ')
        .next()?
        .parse()
        .ok()?;
    Some(bytes / (1 << 20) as f64 / secs)
}

fn host_seq_write(path: &Path) -> f64 {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    let buf = vec![0x3cu8; SEQ_BS as usize];
    let total = SEQ_MIB << 20;
    let start = Instant::now();
    for off in (0..total).step_by(SEQ_BS as usize) {
        f.write_all_at(&buf, off).unwrap();
    }
    total as f64 / (1 << 20) as f64 / start.elapsed().as_secs_f64()
}

fn host_rand_read(path: &Path) -> f64 {
    let f = File::open(path).unwrap();
    let mut buf = vec![0u8; RAND_BS as usize];
    let mut lcg = Lcg(1);
    let blocks = IMAGE_BYTES / RAND_BS;
    let start = Instant::now();
    for _ in 0..RAND_OPS {
        f.read_exact_at(&mut buf, lcg.next_offset(blocks, RAND_BS))
            .unwrap();
    }
    RAND_OPS as f64 / start.elapsed().as_secs_f64()
}

/// The drive's `rate_limiter` from `EMBER_BENCH_BLK_RATE_LIMITER`, if set.
fn rate_limiter() -> Option<serde_json::Value> {
    let text = std::env::var("EMBER_BENCH_BLK_RATE_LIMITER").ok()?;
    Some(
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("EMBER_BENCH_BLK_RATE_LIMITER is not JSON ({e}): {text}")),
    )
}

fn bench_config(image: &Path, engine: &str, mib: u64, ops: u64) -> serde_json::Value {
    let mut config = default_config(&guest_path("virtio_blk"));
    let mut drive = json!({
        "drive_id": "bench",
        "path_on_host": image,
        "is_root_device": false,
        "io_engine": engine,
    });
    if let Some(limiter) = rate_limiter() {
        drive["rate_limiter"] = limiter;
    }
    merge_patch(
        &mut config,
        &json!({
            "boot-source": {"boot_args": format!(
                "console=ttyS0 blk.test=bench blk.mib={mib} blk.bs={SEQ_BS} blk.qd={QUEUE_DEPTH} \
                 blk.ops={ops} blk.rbs={RAND_BS} blk.seed=1"
            )},
            "drives": [drive],
        }),
    );
    config
}

fn parse_phases(out: &Output) -> Vec<(String, Phase)> {
    let mut phases = Vec::new();
    for line in out.stdout.lines() {
        let Some(rest) = line.strip_prefix("blk0: bench ") else {
            continue;
        };
        let mut words = rest.split(' ');
        let Some(name) = words.next() else { continue };
        let fields: Vec<&str> = words.collect();
        if !fields.contains(&"tsc") {
            continue;
        }
        assert!(
            !fields.contains(&"timeout"),
            "the guest timed out in {name}\n{out}"
        );
        let get = |key: &str| {
            fields
                .iter()
                .position(|w| *w == key)
                .and_then(|i| fields.get(i + 1))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no {key} in {line:?}"))
        };
        phases.push((
            name.to_string(),
            Phase {
                reqs: get("reqs"),
                bytes: get("bytes"),
                tsc: get("tsc"),
                notifies: get("notifies"),
                errors: get("errors"),
            },
        ));
    }
    phases
}

fn run_guest_bench(launch: Launch) -> Output {
    let out = launch
        .timeout(Duration::from_secs(300))
        .run()
        .expect("run ember");
    assert!(
        out.status.success() && out.stdout.contains("virtio_blk done"),
        "benchmark run failed\n{out}"
    );
    out
}

/// Counts of `perf stat -e kvm:kvm_userspace_exit,kvm:kvm_mmio` over one
/// run, or None without a working perf.
fn perf_counts(dir: &Path, image: &Path, engine: &str, mib: u64, ops: u64) -> Option<(f64, f64)> {
    let report = dir.join("perf.csv");
    let script = dir.join("perf-ember.sh");
    fs::write(
        &script,
        format!(
            "#!/bin/sh\nexec perf stat -x, -o '{}' -e kvm:kvm_userspace_exit,kvm:kvm_mmio -- '{}' \"$@\"\n",
            report.display(),
            ember_binary().display()
        ),
    )
    .ok()?;
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).ok()?;
    let out = Launch::new(&bench_config(image, engine, mib, ops))
        .binary(&script)
        .timeout(Duration::from_secs(300))
        .run()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = fs::read_to_string(&report).ok()?;
    let count = |event: &str| -> Option<f64> {
        text.lines()
            .find(|l| l.split(',').nth(2) == Some(event))?
            .split(',')
            .next()?
            .parse()
            .ok()
    };
    Some((count("kvm:kvm_userspace_exit")?, count("kvm:kvm_mmio")?))
}

fn main() {
    let dir = tempfile::tempdir().expect("temp dir");
    let image: PathBuf = dir.path().join("bench.img");
    println!("ember: {}", ember_binary().display());
    if let Some(limiter) = rate_limiter() {
        println!("drive rate_limiter: {limiter}");
    }
    make_image(&image);
    host_seq_read(&image); // warm the page cache
    let tsc_khz = tsc_khz();
    println!("guest TSC: {:.3} GHz (KVM_GET_TSC_KHZ)", tsc_khz / 1e6);

    let host_read = median((0..RUNS).map(|_| host_seq_read(&image)).collect());
    let host_write = median((0..RUNS).map(|_| host_seq_write(&image)).collect());
    let host_iops = median((0..RUNS).map(|_| host_rand_read(&image)).collect());
    host_seq_read(&image);

    // Guest runs alternate with dd runs, so that each guest read speed is
    // compared with the host's at that moment (other load on the machine
    // moves both). results[engine][phase] = (MiB/s, IOPS, notifies/request).
    let mut dds = Vec::new();
    let mut ratios: Vec<Vec<f64>> = vec![Vec::new(); ENGINES.len()];
    let mut per_phase: Vec<Vec<Vec<(f64, f64, f64)>>> =
        vec![vec![Vec::new(); PHASES.len()]; ENGINES.len()];
    for _ in 0..RUNS {
        for (e, engine) in ENGINES.iter().enumerate() {
            let before = host_dd(&image);
            let out = run_guest_bench(Launch::new(&bench_config(
                &image, engine, SEQ_MIB, RAND_OPS,
            )));
            let after = host_dd(&image);
            let phases = parse_phases(&out);
            assert!(
                PHASES
                    .iter()
                    .all(|n| phases.iter().any(|(name, _)| name == n)),
                "the guest skipped a phase\n{out}"
            );
            for (name, p) in phases {
                assert_eq!(p.errors, 0, "{engine} {name}: requests failed\n{out}");
                let Some(i) = PHASES.iter().position(|n| *n == name) else {
                    continue;
                };
                per_phase[e][i].push((
                    p.mib_s(tsc_khz),
                    p.iops(tsc_khz),
                    p.notifies as f64 / p.reqs as f64,
                ));
                if let (0, Some(b), Some(a)) = (i, before, after) {
                    ratios[e].push(p.mib_s(tsc_khz) / ((a + b) / 2.0));
                }
            }
            dds.extend(before.into_iter().chain(after));
        }
    }
    let dd = median(dds);
    let results: Vec<Vec<(f64, f64, f64)>> = per_phase
        .into_iter()
        .map(|phases| {
            phases
                .into_iter()
                .map(|v| {
                    (
                        median(v.iter().map(|x| x.0).collect()),
                        median(v.iter().map(|x| x.1).collect()),
                        median(v.iter().map(|x| x.2).collect()),
                    )
                })
                .collect()
        })
        .collect();

    // Exits per request: difference of two runs (full size and a quarter).
    let small = (SEQ_MIB / 4, RAND_OPS / 4);
    let requests = |mib: u64, ops: u64| 2 * ((mib << 20) / SEQ_BS) + 2 * ops;
    let delta_reqs = (requests(SEQ_MIB, RAND_OPS) - requests(small.0, small.1)) as f64;
    let mut exits = Vec::new();
    for engine in ENGINES {
        let full = perf_counts(dir.path(), &image, engine, SEQ_MIB, RAND_OPS);
        let part = perf_counts(dir.path(), &image, engine, small.0, small.1);
        exits.push(
            full.zip(part)
                .map(|((u1, m1), (u0, m0))| ((u1 - u0) / delta_reqs, (m1 - m0) / delta_reqs)),
        );
    }

    println!();
    println!(
        "{:<34} {:>12} {:>12} {:>12}",
        "virtio-blk, 256 MiB image in the page cache", "Sync", "Async", "host"
    );
    let row = |label: &str, phase: usize, iops: bool, host: f64| {
        let pick = |r: &(f64, f64, f64)| if iops { r.1 } else { r.0 };
        println!(
            "{label:<34} {:>12.0} {:>12.0} {:>12.0}",
            pick(&results[0][phase]),
            pick(&results[1][phase]),
            host
        );
    };
    row("seq read 128 KiB, QD 32 (MiB/s)", 0, false, dd);
    row("seq write 128 KiB, QD 32 (MiB/s)", 1, false, host_write);
    row("rand read 4 KiB, QD 32 (IOPS)", 2, true, host_iops);
    row("rand read 4 KiB, QD 1 (IOPS)", 3, true, host_iops);
    println!(
        "{:<34} {:>12} {:>12} {:>12.0}",
        "host pread loop 128 KiB (MiB/s)", "", "", host_read
    );
    println!("(host: seq read = dd bs=128k, median of the runs around the guest runs;");
    println!(" write = pwrite loop; IOPS = 4 KiB pread loop at the guest's offsets)");
    for (i, name) in PHASES.iter().enumerate() {
        println!(
            "{:<34} {:>12.3} {:>12.3}",
            format!("QueueNotify writes/request {name}"),
            results[0][i].2,
            results[1][i].2
        );
    }
    let fmt = |v: Option<(f64, f64)>, pick: fn((f64, f64)) -> f64| {
        v.map_or_else(|| "n/a".to_string(), |x| format!("{:.3}", pick(x)))
    };
    println!(
        "{:<34} {:>12} {:>12}",
        "userspace exits/request (perf)",
        fmt(exits[0], |x| x.0),
        fmt(exits[1], |x| x.0)
    );
    println!(
        "{:<34} {:>12} {:>12}",
        "MMIO exits/request, kvm:kvm_mmio",
        fmt(exits[0], |x| x.1),
        fmt(exits[1], |x| x.1)
    );
    println!();
    for (engine, r) in ENGINES.iter().zip(ratios) {
        let ratio = median(r);
        println!(
            "seq read {engine}: median {:.0}% of the dd runs around it (goal {:.0}%): {}",
            ratio * 100.0,
            GOAL * 100.0,
            if ratio >= GOAL { "met" } else { "MISSED" }
        );
    }
}
