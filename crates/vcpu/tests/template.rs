//! A CPU template applied to a vCPU on the real /dev/kvm: its CPUID changes reach
//! KVM_SET_CPUID2, its MSR changes KVM_SET_MSRS, and what KVM cannot take is named.

use ember_boot::{BootProtocol, KernelEntry};
use ember_cpu_template::CustomCpuTemplate;
use ember_vcpu::{Error, Vcpu, VcpuConfig};
use kvm_bindings::{kvm_msr_entry, Msrs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestAddress, GuestMemoryMmap};

/// IA32_PAT: every x86_64 CPU has it, KVM lets userspace write any valid memory types.
const MSR_PAT: u32 = 0x277;
/// EFER: bits 63:16 are reserved.
const MSR_EFER: u32 = 0xc000_0080;

fn vm(kvm: &Kvm) -> (VmFd, GuestMemoryMmap) {
    let vm = kvm.create_vm().unwrap();
    ember_irqchip::setup(&vm).unwrap();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
    (vm, mem)
}

fn entry() -> KernelEntry {
    KernelEntry {
        protocol: BootProtocol::LinuxBoot,
        entry_addr: GuestAddress(0x10_0000),
        kernel_load: GuestAddress(0x10_0000),
        kernel_end: 0x10_1000,
        setup_header: None,
    }
}

const CONFIG: VcpuConfig = VcpuConfig {
    vcpu_count: 1,
    smt: false,
};

struct Configured {
    result: Result<(), Error>,
    vcpu: Vcpu,
    _vm: VmFd,
}

fn configure(template: &str) -> Configured {
    let kvm = Kvm::new().unwrap();
    let (vm, mem) = vm(&kvm);
    let template = CustomCpuTemplate::from_json(template.as_bytes()).unwrap();
    let mut vcpu = Vcpu::new(0, &vm).unwrap();
    let result = vcpu.configure_with_template(&kvm, &mem, &entry(), &CONFIG, Some(&template));
    Configured {
        result,
        vcpu,
        _vm: vm,
    }
}

fn read_msr(vcpu: &Vcpu, index: u32) -> u64 {
    let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
        index,
        ..Default::default()
    }])
    .unwrap();
    assert_eq!(vcpu.fd().get_msrs(&mut msrs).unwrap(), 1);
    msrs.as_slice()[0].data
}

/// The entry of `leaf` (subleaf 0) KVM holds for the vCPU.
fn leaf(vcpu: &Vcpu, leaf: u32) -> kvm_bindings::kvm_cpuid_entry2 {
    *vcpu
        .fd()
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .unwrap()
        .as_slice()
        .iter()
        .find(|e| e.function == leaf && e.index == 0)
        .unwrap()
}

#[test]
fn cpuid_and_msr_changes_reach_the_vcpu() {
    let before = configure("{}");
    before.result.unwrap();
    let ext = leaf(&before.vcpu, 0x8000_0001);
    // Hide LAHF/SAHF in 64-bit mode (CPUID.8000_0001H:ECX[0]) and force family/model/
    // stepping 0x306f2 in leaf 1 EAX; set PAT entry 0 to write-through (4) instead of
    // write-back (6). (Leaf 1 ECX/EDX and leaf 7 are not used here: a PVM host replaces
    // them with the hardware's whatever the VMM sets.)
    let c = configure(
        r#"{"cpuid_modifiers": [
                {"leaf": "0x80000001", "subleaf": "0x0", "flags": 0, "modifiers": [
                    {"register": "ecx", "bitmap": "0b0"}]},
                {"leaf": "0x1", "subleaf": "0x0", "flags": 0, "modifiers": [
                    {"register": "eax", "bitmap": "0b0000_11111111_1111_00_11_1111_1111_1111"}]}],
            "msr_modifiers": [{"addr": "0x277", "bitmap": "0b00000100"}]}"#,
    );
    c.result.unwrap();
    let got = leaf(&c.vcpu, 0x8000_0001);
    assert_eq!(got.ecx, ext.ecx & !1, "{got:x?}");
    assert_eq!(got.edx, ext.edx);
    assert_eq!(leaf(&c.vcpu, 1).eax & 0x0fff_3fff, 0x0fff_3fff);
    let leaf1 = leaf(&c.vcpu, 1);
    assert_ne!(leaf1.ecx & (1 << 31), 0, "still normalised: hypervisor bit");
    assert_eq!(read_msr(&c.vcpu, MSR_PAT) & 0xff, 4);
    // The rest of PAT is KVM's reset value, 0x0007040600070406.
    assert_eq!(read_msr(&c.vcpu, MSR_PAT) >> 8, 0x0000_0704_0600_0704);
    assert_eq!(read_msr(&before.vcpu, MSR_PAT), 0x0007_0406_0007_0406);
}

#[test]
fn leaves_and_msrs_kvm_cannot_take_are_named() {
    let c = configure(
        r#"{"cpuid_modifiers": [{"leaf": "0x4fffffff", "subleaf": "0x0", "flags": 0, "modifiers": []}]}"#,
    );
    let e = c.result.unwrap_err();
    assert!(matches!(e, Error::Template(_)), "{e:?}");
    assert!(
        e.to_string().contains("Leaf: 0x4fffffff, Subleaf: 0x0"),
        "{e}"
    );

    // An MSR no CPU has: KVM_GET_MSRS reads nothing.
    let c = configure(r#"{"msr_modifiers": [{"addr": "0xdead0000", "bitmap": "0b1"}]}"#);
    let e = c.result.unwrap_err();
    assert_eq!(
        e.to_string(),
        "Template changes an MSR entry not supported by KVM: Register Address: 0xdead0000"
    );

    // EFER bit 63 is reserved: KVM reads EFER but refuses the value.
    let c = configure(&format!(
        r#"{{"msr_modifiers": [{{"addr": "0xc0000080", "bitmap": "0b1{}"}}]}}"#,
        "x".repeat(63)
    ));
    let e = c.result.unwrap_err();
    assert!(
        matches!(
            e,
            Error::SetMsrsIncomplete {
                refused: MSR_EFER,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("refused MSR 0xc0000080"), "{e}");
}

#[test]
fn a_snapshot_keeps_the_template_s_effect() {
    let c = configure(
        r#"{"cpuid_modifiers": [{"leaf": "0x80000001", "subleaf": "0x0", "flags": 0,
                "modifiers": [{"register": "ecx", "bitmap": "0b0"}]}],
            "msr_modifiers": [{"addr": "0x277", "bitmap": "0b00000100"}]}"#,
    );
    c.result.unwrap();
    let kvm = Kvm::new().unwrap();
    let saved = c.vcpu.save_state(&kvm).unwrap();
    let ext = saved
        .cpuid
        .iter()
        .find(|e| e.function == 0x8000_0001)
        .unwrap();
    assert_eq!(ext.ecx & 1, 0);
    assert!(saved
        .msrs
        .iter()
        .any(|m| m.index == MSR_PAT && m.data & 0xff == 4));

    // Restored into a vCPU of another VM that was given no template.
    let (vm, _mem) = vm(&kvm);
    let mut fresh = Vcpu::new(0, &vm).unwrap();
    fresh.restore_state(&saved).unwrap();
    assert_eq!(
        leaf(&fresh, 0x8000_0001).ecx,
        leaf(&c.vcpu, 0x8000_0001).ecx
    );
    assert_eq!(read_msr(&fresh, MSR_PAT) & 0xff, 4);
}
