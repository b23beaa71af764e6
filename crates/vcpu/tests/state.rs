//! A vCPU's state saved from one VM and restored into a fresh vCPU of another, on the
//! real /dev/kvm.

use ember_boot::{BootProtocol, KernelEntry};
use ember_vcpu::{MsrEntry, Vcpu, VcpuConfig, VcpuState};
use kvm_bindings::{kvm_msr_entry, kvm_userspace_memory_region, Msrs};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

const MEM_SIZE: usize = 2 << 20;
const CODE: u64 = 0x10_0000;
/// MSR_STAR (SYSCALL segment selectors): writable, not touched by KVM on its own.
const MSR_STAR: u32 = 0xc000_0081;
/// IA32_TSC: moves on by itself between a save and the next.
const MSR_TSC: u32 = 0x10;

fn vm(kvm: &Kvm) -> (VmFd, GuestMemoryMmap) {
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
        // SAFETY: the region is a live mapping owned by `mem`, which the test keeps for
        // as long as the VM.
        unsafe { vm.set_user_memory_region(region).unwrap() };
    }
    (vm, mem)
}

fn entry() -> KernelEntry {
    KernelEntry {
        protocol: BootProtocol::LinuxBoot,
        entry_addr: GuestAddress(CODE),
        kernel_load: GuestAddress(CODE),
        kernel_end: CODE + 0x1000,
        setup_header: None,
    }
}

/// The state as JSON, without the MSRs that count time on their own.
fn comparable(state: &VcpuState) -> serde_json::Value {
    let mut v = serde_json::to_value(state).unwrap();
    let msrs: Vec<MsrEntry> = state
        .msrs
        .iter()
        .copied()
        .filter(|m| m.index != MSR_TSC)
        .collect();
    v["msrs"] = serde_json::to_value(msrs).unwrap();
    v
}

#[test]
fn a_configured_vcpu_round_trips_into_a_fresh_one() {
    let kvm = Kvm::new().unwrap();
    let (vm_a, mem_a) = vm(&kvm);
    let mut a = Vcpu::new(0, &vm_a).unwrap();
    let config = VcpuConfig {
        vcpu_count: 2,
        smt: false,
    };
    a.configure(&kvm, &mem_a, &entry(), &config).unwrap();
    // Marks the state where a fresh vCPU differs from it.
    let mut regs = a.fd().get_regs().unwrap();
    regs.rax = 0x1234_5678_9abc_def0;
    regs.r15 = 0x0f0f;
    a.fd().set_regs(&regs).unwrap();
    let star = Msrs::from_entries(&[kvm_msr_entry {
        index: MSR_STAR,
        data: 0x0023_0010_0000_0000,
        ..Default::default()
    }])
    .unwrap();
    assert_eq!(a.fd().set_msrs(&star).unwrap(), 1);

    let saved = a.save_state(&kvm).unwrap();
    assert!(
        saved
            .msrs
            .iter()
            .any(|m| m.index == MSR_STAR && m.data == 0x0023_0010_0000_0000),
        "{:x?}",
        saved.msrs
    );
    assert!(saved.cpuid.iter().any(|e| e.function == 1));
    // Through a file format and back.
    let text = serde_json::to_string(&saved).unwrap();
    let loaded: VcpuState = serde_json::from_str(&text).unwrap();

    let (vm_b, _mem_b) = vm(&kvm);
    let mut b = Vcpu::new(0, &vm_b).unwrap();
    let fresh = b.save_state(&kvm).unwrap();
    assert_ne!(fresh.regs.rax, saved.regs.rax);
    assert_ne!(fresh.sregs.cr0, saved.sregs.cr0);
    b.restore_state(&loaded).unwrap();
    let restored = b.save_state(&kvm).unwrap();
    assert_eq!(restored.regs.rax, 0x1234_5678_9abc_def0);
    assert_eq!(restored.regs.rip, CODE);
    assert_eq!(restored.sregs.cr0, saved.sregs.cr0);
    assert_eq!(comparable(&restored), comparable(&saved));
}

#[test]
fn a_state_whose_msr_kvm_refuses_is_reported_with_its_number() {
    let kvm = Kvm::new().unwrap();
    let (vm_a, _mem) = vm(&kvm);
    let a = Vcpu::new(0, &vm_a).unwrap();
    let mut state = a.save_state(&kvm).unwrap();
    // No such MSR: KVM stops at it.
    state.msrs.push(MsrEntry {
        index: 0x4fff_fff0,
        data: 1,
    });
    let (vm_b, _mem_b) = vm(&kvm);
    let mut b = Vcpu::new(0, &vm_b).unwrap();
    let e = b.restore_state(&state).unwrap_err().to_string();
    assert_eq!(e, "KVM refused MSR 0x4ffffff0 of the saved state");
}
