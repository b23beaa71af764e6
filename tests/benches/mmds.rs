//! Metadata-service requests per second and latency per request, seen from
//! the guest: the `virtio_mmds` guest (ring 3, polling, no interrupts)
//! resolves 169.254.169.254, then sends `mmds.bench=N` sequential
//! `GET /latest/meta-data/ami-id` requests on one TCP connection, each
//! sent, answered and acknowledged before the next, and times them with
//! the TSC. Every request costs the guest's transmit kick, the VMM's
//! answer into the receive queue, and the guest's ACK of it.
//!
//! The release `ember` binary, and when `FIRECRACKER_BIN` names one, that
//! binary too, on the same guest, the same store (`--metadata`) and the
//! same `mmds-config`, one after the other in this run; each VMM runs
//! [`RUNS`] VMs and the table shows medians.
//!
//! Run with `FIRECRACKER_BIN=/path/to/firecracker cargo bench -p
//! ember-tests --bench mmds` (`MMDS_REQUESTS` sets N, default 2000).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use ember_tests::netns::NetNs;
use ember_tests::{default_config, ember_binary, guest_path, median, merge_patch, tsc_khz, Launch};
use serde_json::json;

const TAP: &str = "embmb0";
const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 1);
const RUNS: usize = 5;

/// One VM: (requests answered, seconds they took).
fn run_once(binary: &Path, metadata: &Path, requests: u64) -> Option<(u64, f64)> {
    let mut config = default_config(&guest_path("virtio_mmds"));
    merge_patch(
        &mut config,
        &json!({
            "boot-source": {"boot_args": format!(
                "console=ttyS0 net.ip=10.201.0.2 net.host_ip={HOST_IP} mmds.bench={requests}"
            )},
            // Firecracker's parser needs the list.
            "drives": [],
            "network-interfaces": [{"iface_id": "eth0", "host_dev_name": TAP, "guest_mac": "06:00:0a:c9:00:02"}],
            "mmds-config": {"version": "V1", "network_interfaces": ["eth0"]},
        }),
    );
    let mut ns = NetNs::new().expect("create a network namespace");
    ns.add_tap(TAP, &format!("{HOST_IP}/24"))
        .expect("create the TAP");
    let out = ns
        .wrap(
            Launch::new(&config)
                .binary(binary)
                .arg("--metadata")
                .arg(metadata),
        )
        .timeout(std::time::Duration::from_secs(120))
        .run()
        .expect("run the VM");
    let line = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("mmds: bench "));
    let Some(line) = line else {
        println!("{}: no bench line\n{out}", binary.display());
        return None;
    };
    // "N requests T ticks"
    let words: Vec<&str> = line.split(' ').collect();
    let done: u64 = words.first()?.parse().ok()?;
    let ticks: f64 = words.get(2)?.parse().ok()?;
    if done != requests {
        println!(
            "{}: only {done} of {requests} requests answered\n{out}",
            binary.display()
        );
    }
    Some((done, ticks / (tsc_khz() * 1e3)))
}

fn main() {
    let requests: u64 = std::env::var("MMDS_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let dir = tempfile::tempdir().expect("temporary directory");
    let metadata = dir.path().join("metadata.json");
    std::fs::write(
        &metadata,
        json!({"latest": {"meta-data": {"ami-id": "ami-12345678", "instance-id": "i-0123456789abcdef0"}}})
            .to_string(),
    )
    .expect("write the metadata");
    let mut vmms: Vec<(String, PathBuf)> = vec![("ember".into(), ember_binary())];
    match std::env::var_os("FIRECRACKER_BIN").map(PathBuf::from) {
        Some(fc) => vmms.push(("firecracker".into(), fc)),
        None => println!("FIRECRACKER_BIN is not set: Ember's figures only"),
    }
    println!(
        "MMDS from the guest: {requests} sequential GETs on one connection, median of {RUNS} VMs"
    );
    println!("{:<12} {:>12} {:>14}", "vmm", "requests/s", "latency us");
    let mut rates = Vec::new();
    for (name, binary) in &vmms {
        let mut rps = Vec::new();
        let mut lat = Vec::new();
        for _ in 0..RUNS {
            if let Some((done, secs)) = run_once(binary, &metadata, requests) {
                if done > 0 && secs > 0.0 {
                    rps.push(done as f64 / secs);
                    lat.push(secs * 1e6 / done as f64);
                }
            }
        }
        let (r, l) = (median(rps), median(lat));
        println!("{name:<12} {r:>12.0} {l:>14.1}");
        rates.push(r);
    }
    if let [e, fc] = rates[..] {
        println!("ratio ember/firecracker requests/s: {:.2}", e / fc);
    }
}
