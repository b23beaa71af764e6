//! vCPUs running small hand-assembled guests on the real /dev/kvm.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ember_boot::layout::{BOOT_STACK_POINTER, PML4_START, PVH_INFO_START, ZERO_PAGE_START};
use ember_boot::{BootProtocol, KernelEntry};
use ember_bus::{Bus, BusDevice, BusKind, BusRange};
use ember_vcpu::{ExitReason, Vcpu, VcpuConfig, VcpuHandle, VcpuMetrics, VmControl};
use kvm_bindings::{kvm_msr_entry, kvm_userspace_memory_region, Msrs};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Where the guest code goes: 1 MiB, inside the identity-mapped first GiB.
const CODE: u64 = 0x10_0000;
const MEM_SIZE: usize = 2 << 20;
/// The test port device: writes at offset 0 are recorded, a write at offset 1 stops the VM
/// like the i8042 reset does.
const PORT: u64 = 0x3f8;
/// The test MMIO device, outside RAM but inside the identity-mapped first GiB.
const MMIO: u64 = 0x1000_0000;
/// How long a test waits for the VM to stop before failing.
const TIMEOUT: Duration = Duration::from_secs(20);

struct TestVm {
    kvm: Kvm,
    vm: VmFd,
    mem: GuestMemoryMmap,
}

fn test_vm() -> TestVm {
    let kvm = Kvm::new().unwrap();
    let vm = kvm.create_vm().unwrap();
    ember_irqchip::setup(&vm).unwrap();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    for (slot, region) in mem.iter().enumerate() {
        let host = mem.get_host_address(region.start_addr()).unwrap();
        let region = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region is a live mapping owned by `mem`, which outlives the VM in
        // every test.
        unsafe { vm.set_user_memory_region(region).unwrap() };
    }
    TestVm { kvm, vm, mem }
}

fn entry(protocol: BootProtocol, addr: u64) -> KernelEntry {
    KernelEntry {
        protocol,
        entry_addr: GuestAddress(addr),
        kernel_load: GuestAddress(addr),
        kernel_end: addr + 0x1000,
        setup_header: None,
    }
}

/// Everything the test devices saw.
#[derive(Default)]
struct Seen {
    /// Writes at offset 0 of the port device.
    port_writes: Mutex<Vec<Vec<u8>>>,
    /// Number of port writes, for the spinning guests.
    port_count: AtomicU64,
    /// Writes to the MMIO device: (offset, data).
    mmio_writes: Mutex<Vec<(u64, Vec<u8>)>>,
    /// Slow reads (offset 2) started.
    slow_accesses: AtomicU64,
}

struct PortDevice {
    seen: Arc<Seen>,
    control: Arc<VmControl>,
}

impl BusDevice for PortDevice {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == 2 {
            // Keeps the vCPU thread in userspace, inside the exit, for a while.
            self.seen.slow_accesses.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(200));
            data.fill(0x5a);
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        match offset {
            0 => {
                self.seen.port_writes.lock().unwrap().push(data.to_vec());
                self.seen.port_count.fetch_add(1, Ordering::SeqCst);
            }
            1 => self.control.request_stop(ExitReason::GuestReset),
            _ => {}
        }
    }
}

struct MmioDevice {
    seen: Arc<Seen>,
}

impl BusDevice for MmioDevice {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        // Register at offset 0 reads 0x12345678.
        let value = 0x1234_5678u32.wrapping_add(offset as u32).to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = value.get(i).copied().unwrap_or(0);
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        self.seen
            .mmio_writes
            .lock()
            .unwrap()
            .push((offset, data.to_vec()));
    }
}

struct Running {
    _vm: TestVm,
    control: Arc<VmControl>,
    seen: Arc<Seen>,
    handles: Vec<VcpuHandle>,
    /// The exit counters every vCPU shares.
    metrics: Arc<VcpuMetrics>,
}

/// Writes `code` at [`CODE`] and runs it on `vcpus` vCPUs entered through the 64-bit Linux
/// protocol.
fn run_guest(code: &[u8], vcpus: u8) -> Running {
    let t = test_vm();
    t.mem.write_slice(code, GuestAddress(CODE)).unwrap();
    let control = VmControl::new().unwrap();
    let seen = Arc::new(Seen::default());

    let mut pio = Bus::new(BusKind::Pio);
    let port = PortDevice {
        seen: seen.clone(),
        control: control.clone(),
    };
    pio.insert(BusRange::new(PORT, 8).unwrap(), Arc::new(Mutex::new(port)))
        .unwrap();
    let mut mmio = Bus::new(BusKind::Mmio);
    let dev = MmioDevice { seen: seen.clone() };
    mmio.insert(
        BusRange::new(MMIO, 0x1000).unwrap(),
        Arc::new(Mutex::new(dev)),
    )
    .unwrap();
    let (pio, mmio) = (Arc::new(pio), Arc::new(mmio));

    ember_vcpu::register_kick_signal_handler().unwrap();
    let config = VcpuConfig {
        vcpu_count: vcpus,
        smt: false,
    };
    let entry = entry(BootProtocol::LinuxBoot, CODE);
    let metrics = Arc::new(VcpuMetrics::default());
    let mut handles = Vec::new();
    for index in 0..vcpus {
        let mut vcpu = Vcpu::new(index, &t.vm).unwrap();
        vcpu.configure(&t.kvm, &t.mem, &entry, &config).unwrap();
        vcpu.set_metrics(metrics.clone());
        let handle = vcpu
            .start(pio.clone(), mmio.clone(), t.mem.clone(), control.clone())
            .unwrap();
        assert_eq!(handle.index(), index);
        handles.push(handle);
    }
    Running {
        _vm: t,
        control,
        seen,
        handles,
        metrics,
    }
}

/// Waits for the exit eventfd, then for every vCPU thread, and returns the exit reason.
fn wait_for_exit(r: Running) -> (ExitReason, Arc<Seen>) {
    let mut pfd = libc::pollfd {
        fd: r.control.exit_event().as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is a valid pollfd for the duration of the call.
    let ready = unsafe { libc::poll(&mut pfd, 1, TIMEOUT.as_millis() as i32) };
    if ready != 1 {
        r.control.request_stop(ExitReason::Stopped);
        panic!("the VM did not stop within {TIMEOUT:?}");
    }
    join_all(r.handles);
    (r.control.exit_reason().unwrap(), r.seen)
}

/// Joins the vCPU threads, failing if they do not all end within [`TIMEOUT`].
fn join_all(handles: Vec<VcpuHandle>) {
    let (tx, rx) = mpsc::channel();
    let n = handles.len();
    for h in handles {
        let tx = tx.clone();
        std::thread::spawn(move || tx.send(h.join().is_ok()).unwrap());
    }
    for _ in 0..n {
        let ok = rx
            .recv_timeout(TIMEOUT)
            .expect("a vCPU thread did not end after the VM stopped");
        assert!(ok, "a vCPU thread panicked");
    }
}

#[test]
fn pio_writes_reach_the_bus_and_a_device_stop_ends_the_vcpu() {
    let code = [
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xb0, 0x41, // mov al, 'A'
        0xee, // out dx, al
        0xb0, 0x42, // mov al, 'B'
        0xee, // out dx, al
        0x66, 0xff, 0xc2, // inc dx
        0xee, // out dx, al: the device stops the VM
        0x66, 0xff, 0xca, // dec dx
        0xb0, 0x43, // mov al, 'C'
        0xee, // out dx, al: must never run
        0xeb, 0xfe, // jmp .
    ];
    let (reason, seen) = wait_for_exit(run_guest(&code, 1));
    assert_eq!(reason, ExitReason::GuestReset);
    assert!(reason.is_success());
    assert_eq!(
        *seen.port_writes.lock().unwrap(),
        vec![vec![b'A'], vec![b'B']]
    );
}

#[test]
fn mmio_reads_get_the_device_value_and_writes_reach_it() {
    let code = [
        0x8b, 0x04, 0x25, 0x00, 0x00, 0x00, 0x10, // mov eax, [0x10000000]
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xef, // out dx, eax: report what was read
        0xc7, 0x04, 0x25, 0x04, 0x00, 0x00, 0x10, 0x0d, 0xf0, 0xfe,
        0xca, // mov dword [0x10000004], 0xcafef00d
        0x66, 0xff, 0xc2, // inc dx
        0xee, // out dx, al: stop
        0xeb, 0xfe, // jmp .
    ];
    let (reason, seen) = wait_for_exit(run_guest(&code, 1));
    assert_eq!(reason, ExitReason::GuestReset);
    assert_eq!(
        *seen.port_writes.lock().unwrap(),
        vec![0x1234_5678u32.to_le_bytes().to_vec()]
    );
    assert_eq!(
        *seen.mmio_writes.lock().unwrap(),
        vec![(4, 0xcafe_f00du32.to_le_bytes().to_vec())]
    );
}

#[test]
fn exits_are_counted_by_kind() {
    let code = [
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xec, // in al, dx
        0x8b, 0x04, 0x25, 0x00, 0x00, 0x00, 0x10, // mov eax, [0x10000000]
        0xc7, 0x04, 0x25, 0x04, 0x00, 0x00, 0x10, 0x0d, 0xf0, 0xfe,
        0xca, // mov dword [0x10000004], 0xcafef00d
        0xee, // out dx, al
        0x66, 0xff, 0xc2, // inc dx
        0xee, // out dx, al: stop
        0xeb, 0xfe, // jmp .
    ];
    let running = run_guest(&code, 1);
    let m = running.metrics.clone();
    let (reason, _) = wait_for_exit(running);
    assert_eq!(reason, ExitReason::GuestReset);
    let counts = [
        m.exit_io_in.count(),
        m.exit_io_out.count(),
        m.exit_mmio_read.count(),
        m.exit_mmio_write.count(),
        m.failures.count(),
    ];
    assert_eq!(counts, [1, 2, 1, 1, 0]);

    // A vCPU that stops the VM on an error counts a failure.
    let code = [
        0x0f, 0x01, 0x1d, 0x02, 0x00, 0x00, 0x00, // lidt [rip + 2]: a zero-limit IDT
        0x0f, 0x0b, // ud2
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // limit 0, base 0
    ];
    let running = run_guest(&code, 1);
    let m = running.metrics.clone();
    let (reason, _) = wait_for_exit(running);
    assert!(!reason.is_success(), "{reason}");
    assert_eq!(m.failures.count(), 1);
}

#[test]
fn a_triple_fault_is_reported_with_its_rip() {
    let code = [
        0x0f, 0x01, 0x1d, 0x02, 0x00, 0x00, 0x00, // lidt [rip + 2]: a zero-limit IDT
        0x0f, 0x0b, // ud2
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // limit 0, base 0
    ];
    let (reason, _) = wait_for_exit(run_guest(&code, 1));
    match reason {
        ExitReason::TripleFault { vcpu: 0, rip } => {
            // The fault happened on the ud2.
            assert_eq!(rip, CODE + 7, "{reason}");
            assert!(reason.to_string().contains("triple-faulted"));
            assert!(!reason.is_success());
        }
        other => panic!("expected a triple fault, got: {other}"),
    }
}

#[test]
fn an_emulation_failure_reports_the_instruction_bytes() {
    // With IF=0 this host runs guest code through KVM's instruction emulator, which cannot
    // execute int3.
    let code = [0xcc, 0x90, 0x90, 0xeb, 0xfe];
    let (reason, _) = wait_for_exit(run_guest(&code, 1));
    match &reason {
        ExitReason::InternalError {
            vcpu: 0,
            suberror,
            rip,
            insn,
            ..
        } => {
            assert_eq!(*suberror, 1, "{reason}");
            assert_eq!(*rip, CODE, "{reason}");
            assert_eq!(insn.len(), 15);
            assert_eq!(insn[..code.len()], code);
            assert!(insn[code.len()..].iter().all(|b| *b == 0));
            let shown = reason.to_string();
            assert!(
                shown.starts_with(
                    "vCPU 0: KVM internal error, suberror 1 (emulation failure) at RIP 0x100000, instruction bytes: cc 90 90 eb fe 00"
                ),
                "{shown}"
            );
        }
        other => panic!("expected an internal error, got: {other}"),
    }
}

#[test]
fn a_paused_vcpu_has_finished_its_port_access_when_it_saves_its_state() {
    let code = [
        0x66, 0xba, 0xfa, 0x03, // mov dx, 0x3fa
        0xec, // in al, dx: a slow read
        0xeb, 0xfe, // 1: jmp 1b
    ];
    let r = run_guest(&code, 1);
    assert!(matches!(
        r.control.save_vcpu_states(),
        Err(ember_vcpu::Error::NotPaused)
    ));
    let deadline = Instant::now() + TIMEOUT;
    while r.seen.slow_accesses.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "the guest did not read");
        std::thread::sleep(Duration::from_millis(1));
    }
    // The pause lands while the vCPU is still in the exit of the IN: KVM
    // puts the data in AL and moves RIP past the IN only on the next
    // KVM_RUN (api.rst, KVM_EXIT_IO), which the vCPU must make before it
    // parks, or a restored guest would read again, and an OUT would write
    // again.
    r.control.pause().unwrap();
    let states = r.control.save_vcpu_states().unwrap();
    assert_eq!(states.len(), 1);
    assert_eq!(states[0].regs.rip, CODE + 5, "RIP is not past the IN");
    assert_eq!(states[0].regs.rax & 0xff, 0x5a, "AL does not hold the data");
    // Saving twice gives the same state; the guest read once.
    let again = r.control.save_vcpu_states().unwrap();
    assert_eq!(again[0].regs.rip, CODE + 5);
    r.control.resume();
    assert_eq!(r.seen.slow_accesses.load(Ordering::SeqCst), 1);
    r.control.request_stop(ExitReason::Stopped);
    let (reason, _) = wait_for_exit(r);
    assert_eq!(reason, ExitReason::Stopped);
}

#[test]
fn pause_stops_progress_and_resume_continues() {
    let code = [
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xee, // 1: out dx, al
        0xff, 0xc0, // inc eax
        0xeb, 0xfb, // jmp 1b
    ];
    let r = run_guest(&code, 1);
    let count = || r.seen.port_count.load(Ordering::SeqCst);
    let wait_for_progress = |from: u64| {
        let deadline = Instant::now() + TIMEOUT;
        while count() < from + 10 {
            assert!(Instant::now() < deadline, "the guest makes no progress");
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    wait_for_progress(0);

    r.control.pause().unwrap();
    let paused_at = count();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(count(), paused_at, "the guest ran while paused");

    r.control.resume();
    wait_for_progress(paused_at);

    // Pausing twice in a row works too.
    r.control.pause().unwrap();
    r.control.pause().unwrap();
    r.control.resume();

    r.control.request_stop(ExitReason::Stopped);
    let (reason, _) = wait_for_exit(r);
    assert_eq!(reason, ExitReason::Stopped);
}

#[test]
fn request_stop_from_another_thread_ends_a_spinning_guest() {
    // jmp . never exits to userspace: only the kick gets the vCPU out.
    let r = run_guest(&[0xeb, 0xfe], 1);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(r.control.exit_reason(), None);
    // A kick alone does not stop a running VM.
    r.handles[0].kick();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(r.control.exit_reason(), None);

    let control = r.control.clone();
    let start = Instant::now();
    std::thread::spawn(move || control.request_stop(ExitReason::Stopped))
        .join()
        .unwrap();
    let (reason, _) = wait_for_exit(r);
    assert_eq!(reason, ExitReason::Stopped);
    assert!(!reason.is_success());
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn request_stop_ends_every_vcpu_including_one_waiting_for_sipi() {
    // vCPU 1 never gets an INIT/SIPI, so it blocks inside KVM_RUN.
    let r = run_guest(&[0xeb, 0xfe], 2);
    std::thread::sleep(Duration::from_millis(100));
    r.control.pause().unwrap();
    r.control.resume();
    r.control.request_stop(ExitReason::Stopped);
    let (reason, _) = wait_for_exit(r);
    assert_eq!(reason, ExitReason::Stopped);
}

#[test]
fn configure_linux_boot_state() {
    let t = test_vm();
    let mut vcpu = Vcpu::new(1, &t.vm).unwrap();
    let config = VcpuConfig {
        vcpu_count: 2,
        smt: true,
    };
    vcpu.configure(
        &t.kvm,
        &t.mem,
        &entry(BootProtocol::LinuxBoot, 0x20_0000),
        &config,
    )
    .unwrap();
    let fd = vcpu.fd();

    let regs = fd.get_regs().unwrap();
    assert_eq!(regs.rip, 0x20_0000);
    assert_eq!(
        (regs.rsp, regs.rbp),
        (BOOT_STACK_POINTER, BOOT_STACK_POINTER)
    );
    assert_eq!(regs.rsi, ZERO_PAGE_START);
    assert_eq!(regs.rflags, 2);

    let sregs = fd.get_sregs().unwrap();
    assert_ne!(sregs.cr0 & 1, 0, "PE");
    assert_ne!(sregs.cr0 & (1 << 31), 0, "PG");
    assert_ne!(sregs.cr4 & (1 << 5), 0, "PAE");
    assert_eq!(sregs.efer & 0x500, 0x500, "LME|LMA");
    assert_eq!(sregs.cr3, PML4_START);
    assert_eq!((sregs.cs.l, sregs.cs.selector), (1, 0x8));
    assert_eq!(
        (sregs.ds.selector, sregs.ss.selector, sregs.tr.selector),
        (0x10, 0x10, 0x18)
    );
    assert_eq!((sregs.gdt.base, sregs.gdt.limit), (0x500, 31));
    assert_eq!((sregs.idt.base, sregs.idt.limit), (0x520, 7));
    // The GDT is in guest memory.
    let code_desc: u64 = t.mem.read_obj(GuestAddress(0x508)).unwrap();
    assert_eq!(code_desc, 0x00af_9b00_0000_ffff);

    let fpu = fd.get_fpu().unwrap();
    assert_eq!(fpu.fcw, 0x37f);

    let lapic = fd.get_lapic().unwrap();
    let reg = |off: usize| {
        u32::from_le_bytes([
            lapic.regs[off] as u8,
            lapic.regs[off + 1] as u8,
            lapic.regs[off + 2] as u8,
            lapic.regs[off + 3] as u8,
        ])
    };
    assert_eq!((reg(0x350) >> 8) & 7, 7, "LINT0 ExtINT");
    assert_eq!((reg(0x360) >> 8) & 7, 4, "LINT1 NMI");

    let mut msrs = Msrs::from_entries(&[
        kvm_msr_entry {
            index: 0x1a0, // IA32_MISC_ENABLE
            ..Default::default()
        },
        kvm_msr_entry {
            index: 0x2ff, // IA32_MTRR_DEF_TYPE
            ..Default::default()
        },
    ])
    .unwrap();
    assert_eq!(fd.get_msrs(&mut msrs).unwrap(), 2);
    assert_eq!(msrs.as_slice()[0].data & 1, 1, "fast strings");
    assert_eq!(msrs.as_slice()[1].data, 0x806, "MTRRs on, write-back");

    let cpuid = fd.get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES).unwrap();
    let leaf = |l: u32, s: u32| {
        *cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == l && e.index == s)
            .unwrap()
    };
    assert_eq!(leaf(1, 0).ebx >> 24, 1, "APIC id");
    assert_ne!(leaf(1, 0).ecx & (1 << 31), 0, "hypervisor");
    assert_eq!(leaf(0xb, 0).ebx & 0xffff, 2, "two threads per core");
    assert_eq!(leaf(0xb, 0).edx, 1, "x2APIC id");
}

#[test]
fn configure_pvh_boot_state() {
    let t = test_vm();
    let mut vcpu = Vcpu::new(0, &t.vm).unwrap();
    let config = VcpuConfig {
        vcpu_count: 1,
        smt: false,
    };
    vcpu.configure(
        &t.kvm,
        &t.mem,
        &entry(BootProtocol::PvhBoot, 0x20_0000),
        &config,
    )
    .unwrap();
    let regs = vcpu.fd().get_regs().unwrap();
    assert_eq!(
        (regs.rip, regs.rbx, regs.rflags),
        (0x20_0000, PVH_INFO_START, 2)
    );
    assert_eq!(regs.rsi, 0);
    let sregs = vcpu.fd().get_sregs().unwrap();
    assert_eq!(sregs.cr0 & 0x8000_0011, 0x11, "PE|ET, no paging");
    assert_eq!(sregs.cr4, 0);
    assert_eq!(sregs.efer & 0x400, 0, "not in long mode");
    assert_eq!(
        (sregs.cs.l, sregs.cs.db, sregs.cs.limit),
        (0, 1, 0xffff_ffff)
    );
    assert_eq!((sregs.tr.limit, sregs.tr.selector), (0x67, 0x18));
}

#[test]
fn configure_rejects_a_bad_topology() {
    let t = test_vm();
    let mut vcpu = Vcpu::new(2, &t.vm).unwrap();
    let entry = entry(BootProtocol::LinuxBoot, CODE);
    for vcpu_count in [0, 2, 33] {
        let err = vcpu
            .configure(
                &t.kvm,
                &t.mem,
                &entry,
                &VcpuConfig {
                    vcpu_count,
                    smt: false,
                },
            )
            .unwrap_err();
        assert!(
            matches!(err, ember_vcpu::Error::InvalidConfig { index: 2, .. }),
            "{err}"
        );
    }
}

#[test]
fn a_vcpu_without_an_irqchip_cannot_be_configured() {
    let kvm = Kvm::new().unwrap();
    let vm = kvm.create_vm().unwrap();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let mut vcpu = Vcpu::new(0, &vm).unwrap();
    let err = vcpu
        .configure(
            &kvm,
            &mem,
            &entry(BootProtocol::LinuxBoot, CODE),
            &VcpuConfig {
                vcpu_count: 1,
                smt: false,
            },
        )
        .unwrap_err();
    assert!(matches!(err, ember_vcpu::Error::GetLapic(_)), "{err}");
}
