//! Boot and exit-cost benchmark of the release `ember` binary.
//!
//! 1. hello: boot-to-exit wall and CPU time, median of 20 runs.
//! 2. storm: cost of one port-I/O exit through ember,
//!    `(wall(N) - wall(0)) / N` for N = 200000 scratch-register writes,
//!    median of 5 pairs.
//! 3. raw KVM: the storm guest's inner loop (the same instruction bytes at
//!    the same address, 64-bit mode, IF=0) in a minimal in-process loop
//!    (`KVM_RUN` -> `KVM_EXIT_IO` -> `KVM_RUN`, no device model), timed over
//!    200000 round trips: the floor ember's per-exit cost is compared with.
//!
//! Run with `cargo bench -p ember-tests --bench boot`.

use std::time::{Duration, Instant};

use ember_tests::elf::{Elf64, PT_LOAD};
use ember_tests::{guest_path, median, run_guest, Output};
use kvm_bindings::{
    kvm_pit_config, kvm_regs, kvm_segment, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES,
    KVM_PIT_SPEAKER_DUMMY,
};
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

/// Wall and CPU time of one storm run of `count` exits.
fn storm_run(count: u64) -> (Duration, Duration) {
    let out = run_guest(
        &guest_path("storm"),
        &json!({"boot-source": {"boot_args": format!("console=ttyS0 storm.count={count}")}}),
    )
    .unwrap();
    let out = checked(out, &format!("storm done {count}"));
    (out.wall, out.cpu)
}

/// Per-exit cost through ember, (median wall us, median CPU us).
fn storm_per_exit_us() -> (f64, f64) {
    let per_exit = |full: Duration, base: Duration| {
        full.saturating_sub(base).as_secs_f64() * 1e6 / STORM_EXITS as f64
    };
    let (walls, cpus) = (0..STORM_RUNS)
        .map(|_| {
            let (base_wall, base_cpu) = storm_run(0);
            let (full_wall, full_cpu) = storm_run(STORM_EXITS);
            (per_exit(full_wall, base_wall), per_exit(full_cpu, base_cpu))
        })
        .unzip();
    (median(walls), median(cpus))
}

/// CPU time the calling thread has used.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for clock_gettime to fill.
    let ret = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(ret, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// The storm guest's inner loop (`guests/storm.c`): `1: out %al, (%dx);
/// dec %rcx; jnz 1b`.
const STORM_LOOP: [u8; 6] = [0xee, 0x48, 0xff, 0xc9, 0x75, 0xfa];

/// Guest address of [`STORM_LOOP`] in the storm guest's ELF: its only
/// occurrence in a loadable segment, translated to the load address.
fn storm_loop_addr() -> u64 {
    let path = guest_path("storm");
    let bytes = std::fs::read(&path).expect("read the storm guest");
    let elf = Elf64::parse(&bytes).expect("parse the storm guest");
    let mut found = Vec::new();
    for seg in elf.segments.iter().filter(|s| s.kind == PT_LOAD) {
        let start = usize::try_from(seg.offset).expect("segment offset");
        let len = usize::try_from(seg.filesz).expect("segment size");
        let code = start
            .checked_add(len)
            .and_then(|end| bytes.get(start..end))
            .expect("PT_LOAD segment inside the storm guest's file");
        found.extend(
            code.windows(STORM_LOOP.len())
                .enumerate()
                .filter(|(_, w)| *w == STORM_LOOP)
                .map(|(i, _)| seg.paddr + i as u64),
        );
    }
    assert_eq!(
        found.len(),
        1,
        "{} must hold the storm loop {STORM_LOOP:02x?} exactly once (found at {found:#x?}): \
         keep guests/storm.c and this benchmark in step",
        path.display()
    );
    found[0]
}

/// Time of one KVM_RUN round trip in a bare VM that runs the storm guest's
/// inner loop: the same instruction bytes at the same guest address, in the
/// same mode (64-bit, paging on through the same identity map ember builds,
/// IF=0), with the same in-kernel irqchip and PIT and the CPUID KVM
/// supports; but no device model and no thread hand-off. Only
/// `KVM_RUN` -> `KVM_EXIT_IO` -> `KVM_RUN` remains.
///
/// Returns (wall us, CPU us) per exit.
fn raw_kvm_exit_us() -> (f64, f64) {
    // ember's boot layout (ember_boot::layout): GDT, IDT, the identity map of
    // the first GiB in 2 MiB pages (PML4, PDPT, PD), as the storm guest sees it.
    const GDT_ADDR: u64 = 0x500;
    const IDT_ADDR: u64 = 0x520;
    const PML4_ADDR: u64 = 0x9000;
    const PDPT_ADDR: u64 = 0xa000;
    const PD_ADDR: u64 = 0xb000;
    // Null, 64-bit code, data, TSS (Firecracker's and ember's boot GDT).
    const GDT: [u64; 4] = [
        0,
        0x00af_9b00_0000_ffff,
        0x00cf_9300_0000_ffff,
        0x008f_8b00_0000_ffff,
    ];
    // Page-table entry bits (Intel SDM vol. 3A, 4.5).
    const PRESENT_WRITABLE: u64 = 0x3;
    const PAGE_SIZE: u64 = 0x80;
    // CR0.PE, CR0.PG, CR4.PAE, EFER.LME|LMA (Intel SDM vol. 3A, 2.5 and 2.2.1).
    const CR0_PE: u64 = 1;
    const CR0_PG: u64 = 1 << 31;
    const CR4_PAE: u64 = 1 << 5;
    const EFER_LME_LMA: u64 = (1 << 8) | (1 << 10);
    const MEM_SIZE: usize = 32 << 20;

    let loop_addr = storm_loop_addr();
    assert!(loop_addr + (STORM_LOOP.len() as u64) < MEM_SIZE as u64);

    let kvm = Kvm::new().expect("open /dev/kvm");
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    let mem =
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory");
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
    // The same in-kernel irqchip and PIT ember runs with.
    vm.set_tss_address(0xfffb_d000).expect("KVM_SET_TSS_ADDR");
    vm.create_irq_chip().expect("KVM_CREATE_IRQCHIP");
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).expect("KVM_CREATE_PIT2");

    let write = |addr: u64, words: &[u64]| {
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        mem.write_slice(&bytes, GuestAddress(addr))
            .expect("write guest memory");
    };
    write(GDT_ADDR, &GDT);
    write(IDT_ADDR, &[0]);
    write(PML4_ADDR, &[PDPT_ADDR | PRESENT_WRITABLE]);
    write(PDPT_ADDR, &[PD_ADDR | PRESENT_WRITABLE]);
    let pd: Vec<u64> = (0..512u64)
        .map(|i| (i << 21) | PAGE_SIZE | PRESENT_WRITABLE)
        .collect();
    write(PD_ADDR, &pd);
    mem.write_slice(&STORM_LOOP, GuestAddress(loop_addr))
        .expect("write guest code");

    let mut vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .expect("KVM_GET_SUPPORTED_CPUID");
    vcpu.set_cpuid2(&cpuid).expect("KVM_SET_CPUID2");
    let mut sregs = vcpu.get_sregs().expect("KVM_GET_SREGS");
    let segment = |selector: u16, type_: u8, s: u8, l: u8, db: u8| kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db,
        s,
        l,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    sregs.cs = segment(0x08, 0xb, 1, 1, 0);
    let data = segment(0x10, 0x3, 1, 0, 1);
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.tr = segment(0x18, 0xb, 0, 0, 0);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 |= CR4_PAE;
    sregs.cr0 |= CR0_PE | CR0_PG;
    sregs.efer |= EFER_LME_LMA;
    vcpu.set_sregs(&sregs).expect("KVM_SET_SREGS");
    let regs = kvm_regs {
        rip: loop_addr,
        rax: 0x5a,
        rdx: 0x3ff,
        // More iterations than the benchmark ever runs: the loop never ends.
        rcx: u64::MAX,
        rflags: 0x2, // bit 1 is reserved and must be set; IF=0 as in the storm guest
        ..Default::default()
    };
    vcpu.set_regs(&regs).expect("KVM_SET_REGS");

    let mut round = |n: u32| {
        let (start, start_cpu) = (Instant::now(), thread_cpu());
        for _ in 0..n {
            match vcpu.run().expect("KVM_RUN") {
                VcpuExit::IoOut(0x3ff, [0x5a]) => {}
                other => panic!("unexpected exit {other:?}"),
            }
        }
        (start.elapsed(), thread_cpu() - start_cpu)
    };
    round(1000); // warm up
    let (wall, cpu) = round(RAW_EXITS);
    drop(vcpu);
    drop(vm);
    drop(mem);
    let us = |d: Duration| d.as_secs_f64() * 1e6 / f64::from(RAW_EXITS);
    (us(wall), us(cpu))
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
    let storm = wanted("storm").then(|| {
        let (us, cpu_us) = storm_per_exit_us();
        println!(
            "storm: {us:.2} us per PIO exit through ember, {cpu_us:.2} us CPU (median of {STORM_RUNS}, N = {STORM_EXITS})"
        );
        (us, cpu_us)
    });
    let raw = wanted("raw").then(|| {
        let (us, cpu_us) = raw_kvm_exit_us();
        println!(
            "raw KVM_RUN round trip: {us:.2} us per PIO exit, {cpu_us:.2} us CPU ({RAW_EXITS} exits, no device model)"
        );
        (us, cpu_us)
    });
    let exit_us = storm.map(|(us, _)| us);

    println!();
    if let (Some((exit_us, exit_cpu)), Some((raw_us, raw_cpu))) = (storm, raw) {
        println!("per-exit cost vs raw KVM: {}", verdict(exit_us, raw_us));
        // CPU time is what a loaded host (other jobs on the same cores)
        // disturbs least: the same comparison by CPU.
        println!("per-exit CPU vs raw KVM: {}", verdict(exit_cpu, raw_cpu));
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
