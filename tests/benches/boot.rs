//! Boot and exit-cost benchmark of the release `ember` binary.
//!
//! 1. hello: boot-to-exit wall and CPU time, median of 20 runs.
//! 2. storm: cost of one port-I/O exit through ember,
//!    `(wall(N) - wall(0)) / N` for N = 200000 scratch-register writes,
//!    median of 5 pairs.
//! 3. raw KVM: the same `out` to port 0x3ff in a minimal in-process loop
//!    (`KVM_RUN` -> `KVM_EXIT_IO` -> `KVM_RUN`, no device model), timed over
//!    200000 round trips: the floor ember's per-exit cost is compared with.
//!
//! Run with `cargo bench -p ember-tests --bench boot`.

use std::time::{Duration, Instant};

use ember_tests::{guest_path, run_guest, Output};
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit};
use serde_json::json;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

const HELLO_RUNS: usize = 20;
const STORM_EXITS: u64 = 200_000;
const STORM_RUNS: usize = 5;
const RAW_EXITS: u32 = 200_000;
/// The goal: ember within 5% of the reference.
const GOAL: f64 = 0.05;
/// Firecracker on this kind of machine (docs: the test environment notes):
/// hello-and-reset median wall and CPU, and one scratch-register exit.
const FIRECRACKER_HELLO_WALL_MS: f64 = 29.0;
const FIRECRACKER_HELLO_CPU_MS: f64 = 6.0;
const FIRECRACKER_EXIT_US: f64 = 14.5;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn checked(out: Output, expect: &str) -> Output {
    assert!(
        out.status.success() && out.stdout.contains(expect),
        "benchmark run failed\n{out}"
    );
    out
}

fn hello() -> (f64, f64) {
    let guest = guest_path("hello");
    let run = || checked(run_guest(&guest, &json!({})).unwrap(), "Hello");
    run(); // warm the page cache
    let (walls, cpus) = (0..HELLO_RUNS)
        .map(|_| {
            let out = run();
            (ms(out.wall), ms(out.cpu))
        })
        .unzip();
    (median(walls), median(cpus))
}

fn storm_wall(count: u64) -> Duration {
    let out = run_guest(
        &guest_path("storm"),
        &json!({"boot-source": {"boot_args": format!("console=ttyS0 storm.count={count}")}}),
    )
    .unwrap();
    checked(out, &format!("storm done {count}")).wall
}

fn storm_per_exit_us() -> f64 {
    let per_exit = (0..STORM_RUNS)
        .map(|_| {
            let base = storm_wall(0);
            let full = storm_wall(STORM_EXITS);
            full.saturating_sub(base).as_secs_f64() * 1e6 / STORM_EXITS as f64
        })
        .collect();
    median(per_exit)
}

/// Time of one KVM_RUN round trip for `out dx, al` in a bare VM.
fn raw_kvm_exit_us() -> f64 {
    // Real-mode guest at 0x1000: mov dx, 0x3ff; l: out dx, al; jmp l
    const CODE: [u8; 6] = [0xba, 0xff, 0x03, 0xee, 0xeb, 0xfd];
    const CODE_ADDR: u64 = 0x1000;
    const MEM_SIZE: usize = 0x1_0000;

    let kvm = Kvm::new().expect("open /dev/kvm");
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    // The same in-kernel irqchip ember runs with.
    vm.create_irq_chip().expect("KVM_CREATE_IRQCHIP");
    let mem =
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory");
    mem.write_slice(&CODE, GuestAddress(CODE_ADDR))
        .expect("write guest code");
    let host = mem
        .get_host_address(GuestAddress(0))
        .expect("host address of guest memory");
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: MEM_SIZE as u64,
        userspace_addr: host as u64,
    };
    // SAFETY: the region covers exactly the MEM_SIZE bytes `mem` mapped at
    // `host`, and `mem` outlives the VM: both are dropped explicitly below,
    // the vCPU and VM first.
    unsafe { vm.set_user_memory_region(region) }.expect("KVM_SET_USER_MEMORY_REGION");

    let mut vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
    let mut sregs = vcpu.get_sregs().expect("KVM_GET_SREGS");
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs).expect("KVM_SET_SREGS");
    let mut regs = vcpu.get_regs().expect("KVM_GET_REGS");
    regs.rip = CODE_ADDR;
    regs.rflags = 0x2; // bit 1 is reserved and must be set
    vcpu.set_regs(&regs).expect("KVM_SET_REGS");

    let mut round = |n: u32| {
        let start = Instant::now();
        for _ in 0..n {
            match vcpu.run().expect("KVM_RUN") {
                VcpuExit::IoOut(0x3ff, _) => {}
                other => panic!("unexpected exit {other:?}"),
            }
        }
        start.elapsed()
    };
    round(1000); // warm up
    let elapsed = round(RAW_EXITS);
    drop(vcpu);
    drop(vm);
    drop(mem);
    elapsed.as_secs_f64() * 1e6 / f64::from(RAW_EXITS)
}

fn verdict(value: f64, reference: f64) -> String {
    let over = value / reference - 1.0;
    let mark = if over <= GOAL { "within" } else { "MISSES" };
    format!(
        "{:+.1}% vs {reference:.2}: {mark} the 5% goal",
        over * 100.0
    )
}

fn main() {
    // Sections to run: any of "hello", "storm", "raw" (default: all).
    // `cargo bench` itself passes `--bench`, which is ignored.
    let only: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let wanted = |name: &str| only.is_empty() || only.iter().any(|a| a == name);
    if wanted("hello") || wanted("storm") {
        // Build (or find) the release binary before timing anything.
        println!("ember: {}", ember_tests::ember_binary().display());
    }

    let hello = wanted("hello").then(|| {
        let (wall, cpu) = hello();
        println!(
            "hello boot-to-exit: median wall {wall:.2} ms, median CPU {cpu:.2} ms ({HELLO_RUNS} runs)"
        );
        (wall, cpu)
    });
    let exit_us = wanted("storm").then(|| {
        let us = storm_per_exit_us();
        println!(
            "storm: {us:.2} us per PIO exit through ember (median of {STORM_RUNS}, N = {STORM_EXITS})"
        );
        us
    });
    let raw_us = wanted("raw").then(|| {
        let us = raw_kvm_exit_us();
        println!(
            "raw KVM_RUN round trip: {us:.2} us per PIO exit ({RAW_EXITS} exits, no device model)"
        );
        us
    });

    println!();
    if let (Some(exit_us), Some(raw_us)) = (exit_us, raw_us) {
        println!("per-exit cost vs raw KVM: {}", verdict(exit_us, raw_us));
    }
    if let Some(exit_us) = exit_us {
        println!(
            "per-exit cost vs Firecracker: {}",
            verdict(exit_us, FIRECRACKER_EXIT_US)
        );
    }
    if let Some((wall, cpu)) = hello {
        println!(
            "hello wall vs Firecracker: {}",
            verdict(wall, FIRECRACKER_HELLO_WALL_MS)
        );
        println!(
            "hello CPU vs Firecracker: {}",
            verdict(cpu, FIRECRACKER_HELLO_CPU_MS)
        );
    }
}
