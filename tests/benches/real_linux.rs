//! Real Linux boot under Ember and Firecracker, side by side in one boot of
//! the TCG test host (`ember_tests::tcg`; docs/testing.md).
//!
//! The outer `/init`'s `bench` scenario runs the release `ember` and, when
//! `FIRECRACKER_BIN` names a Firecracker binary, that binary too,
//! alternately, on the same guest with the same config file: Debian's cloud
//! kernel (PVH vmlinux), 256 MiB, an initrd whose `/init` prints the
//! guest's `/proc/uptime` and runs `reboot -f`. For each run it measures
//!
//! - kernel start to init: the uptime the guest's `/init` read;
//! - the VMM's wall time from its start to its exit (seconds, `/proc/uptime`
//!   of the outer VM).
//!
//! Then VM exits per MiB: each VMM boots the guest with a read-only drive,
//! a TAP and a metrics file (`"metrics": {"metrics_path": ...}`) three
//! times: idle (drivers loaded, link up), reading `EMBER_BENCH_IO_MIB` MiB
//! (default 64; 0 skips this part) from the drive, and receiving as many
//! over TCP from the outer VM. Exits are the sum of the metrics' `vcpu`
//! counters `exit_io_in`, `exit_io_out`, `exit_mmio_read` and
//! `exit_mmio_write` (the same names in both VMMs); exits per MiB are the
//! transfer run's exits less the idle run's, over the MiB the guest
//! counted.
//!
//! The table shows median, min and max of each, per VMM, and the ratio of
//! Ember's median to Firecracker's. Times are software-emulation times:
//! only the ratio within one run carries over.
//!
//! ```sh
//! FIRECRACKER_BIN=/path/to/firecracker cargo bench -p ember-tests --bench real_linux
//! ```
//!
//! `EMBER_BENCH_RUNS` (default 5) sets the runs per VMM, `EMBER_BENCH_VCPUS`
//! (default 1) the guest's vCPUs; `EMBER_TCG_VERBOSE=1` streams the outer
//! console and `EMBER_TCG_LOG=FILE` keeps it.

use std::env;
use std::path::PathBuf;
use std::process::exit;
use std::time::Duration;

use ember_tests::tcg::{run_scenarios_with, HostOptions, Scenario};

const DEFAULT_RUNS: u32 = 5;
const DEFAULT_VCPUS: u32 = 1;
const DEFAULT_IO_MIB: u32 = 64;
/// The transfers of the exits-per-MiB part, after the idle run.
const IO_KINDS: [(&str, &str); 2] = [("blk", "virtio-blk read"), ("net", "virtio-net rx")];
/// Allowance for one VMM run, and for the outer VM's own boot.
const RUN_LIMIT: Duration = Duration::from_secs(300);
const OUTER_LIMIT: Duration = Duration::from_secs(300);

fn env_number(name: &str, default: u32) -> u32 {
    match env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v} is not a number")),
        Err(_) => default,
    }
}

/// Median, min and max of `values`; None when empty.
fn stats(values: &[f64]) -> Option<(f64, f64, f64)> {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = match n {
        0 => return None,
        _ if n % 2 == 1 => v[n / 2],
        _ => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    };
    Some((median, v[0], v[n - 1]))
}

/// The values of fact `{vmm}-{what}-{i}` for runs 1..=runs that parse.
fn series(s: &Scenario, vmm: &str, what: &str, runs: u32) -> Vec<f64> {
    (1..=runs)
        .filter_map(|i| s.fact(&format!("{vmm}-{what}-{i}"))?.parse().ok())
        .collect()
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument is not supported.
    let runs = env_number("EMBER_BENCH_RUNS", DEFAULT_RUNS).max(1);
    let vcpus = env_number("EMBER_BENCH_VCPUS", DEFAULT_VCPUS).max(1);
    let io_mib = env_number("EMBER_BENCH_IO_MIB", DEFAULT_IO_MIB);
    let firecracker = env::var_os("FIRECRACKER_BIN").map(PathBuf::from);
    let mut options = HostOptions {
        cmdline: vec![
            format!("ember.bench.runs={runs}"),
            format!("ember.bench.vcpus={vcpus}"),
            format!("ember.bench.io_mib={io_mib}"),
        ],
        ..HostOptions::default()
    };
    let vmms: &[&str] = match &firecracker {
        Some(bin) => {
            assert!(
                bin.is_file(),
                "FIRECRACKER_BIN={} is not a file",
                bin.display()
            );
            options
                .programs
                .push((bin.clone(), "/usr/bin/firecracker".to_string()));
            &["ember", "firecracker"]
        }
        None => {
            println!("FIRECRACKER_BIN is not set: Ember's figures only");
            &["ember"]
        }
    };

    let io_runs = if io_mib > 0 { 3 } else { 0 };
    let timeout = OUTER_LIMIT + RUN_LIMIT * (runs + io_runs) * vmms.len() as u32;
    let report = run_scenarios_with(&["bench"], &options, timeout)
        .unwrap_or_else(|e| panic!("cannot run the TCG test host: {e}"));
    let Some(s) = report.scenario("bench").filter(|s| s.finished) else {
        eprintln!("the bench scenario did not run to its end\n{report}");
        exit(1);
    };
    let mut failed = false;
    let io_tags: &[&str] = if io_mib > 0 {
        &["idle", "blk", "net"]
    } else {
        &[]
    };
    for vmm in vmms {
        let tags = (1..=runs).map(|i| i.to_string());
        for tag in tags.chain(io_tags.iter().map(|t| t.to_string())) {
            let rc = s.fact(&format!("{vmm}-rc-{tag}"));
            if rc != Some("0") {
                eprintln!("{vmm} run {tag} exited with {rc:?}");
                failed = true;
            }
        }
    }
    if failed {
        eprintln!("{s}");
    }

    println!(
        "Real Linux boot in the TCG test host: {runs} runs per VMM, {vcpus} vCPU(s), 256 MiB, \
         outer boot {:?}, whole run {:?}",
        report.outer_boot, report.wall
    );
    println!(
        "{:<24} {:<12} {:>8} {:>8} {:>8} {:>6}",
        "metric (s)", "vmm", "median", "min", "max", "runs"
    );
    let metrics = [
        ("kernel start to init", "init"),
        ("VMM start to exit", "wall"),
    ];
    for (label, key) in metrics {
        let mut medians = Vec::new();
        for vmm in vmms {
            let values = series(s, vmm, key, runs);
            match stats(&values) {
                Some((median, min, max)) => {
                    println!(
                        "{label:<24} {vmm:<12} {median:>8.2} {min:>8.2} {max:>8.2} {:>6}",
                        values.len()
                    );
                    medians.push(median);
                }
                None => println!("{label:<24} {vmm:<12} {:>8}", "n/a"),
            }
        }
        if let [ember, firecracker] = medians[..] {
            println!(
                "{label:<24} {:<12} {:>8.2}",
                "ember/fc",
                ember / firecracker
            );
        }
    }
    if io_mib > 0 {
        for (kind, label) in IO_KINDS {
            let label = format!("{label} exits/MiB");
            let mut values = Vec::new();
            for vmm in vmms {
                match exits_per_mib(s, vmm, kind) {
                    Some(v) => {
                        println!(
                            "{label:<24} {vmm:<12} {v:>8.1} {:>8} {:>8} {:>6}",
                            "", "", 1
                        );
                        values.push(v);
                    }
                    None => {
                        println!("{label:<24} {vmm:<12} {:>8}", "n/a");
                        failed = true;
                    }
                }
            }
            if let [ember, firecracker] = values[..] {
                println!(
                    "{label:<24} {:<12} {:>8.2}",
                    "ember/fc",
                    ember / firecracker
                );
            }
        }
    }
    if failed {
        exit(1);
    }
}

/// (exits of the `kind` run - exits of the idle run) / MiB the guest
/// counted in the `kind` run.
fn exits_per_mib(s: &Scenario, vmm: &str, kind: &str) -> Option<f64> {
    let number = |key: String| -> Option<f64> { s.fact(&key)?.parse().ok() };
    let exits = number(format!("{vmm}-exits-{kind}"))?;
    let idle = number(format!("{vmm}-exits-idle"))?;
    let mib = number(format!("{vmm}-bytes-{kind}"))? / f64::from(1u32 << 20);
    (mib > 0.0).then(|| (exits - idle) / mib)
}
