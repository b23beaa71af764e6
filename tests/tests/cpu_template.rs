//! CPU templates end to end: the `cpuid` guest executes CPUID for the leaves
//! templates change and reads IA32_PAT, and prints what it got; the tests
//! compare that with no template, the static T2A template (this host is an
//! AMD Milan) and custom templates given in the config file and through
//! `PUT /cpu-config`. A template for another vendor, a malformed one, and
//! one KVM cannot take are refused with a message naming the problem.
//!
//! On a PVM host (`/sys/module/kvm_pvm`) KVM replaces leaf 1 ECX/EDX, leaf 7
//! and leaf 0xD (the instruction-set and XSAVE leaves) with the hardware's
//! whatever the VMM sets, because the guest's ring-3 code runs natively and
//! uses the hardware's features anyway (Firecracker's templates meet the same
//! limit there); the checks of those registers only run where KVM keeps what
//! the VMM gives it.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use ember_cpu_template::{CpuidRegister, StaticCpuTemplate};
use ember_tests::api::ApiVm;
use ember_tests::{guest_path, run_guest, Output};
use serde_json::{json, Value};

/// (leaf, subleaf) -> [eax, ebx, ecx, edx], and IA32_PAT, as the guest saw them.
struct Seen {
    cpuid: BTreeMap<(u32, u32), [u32; 4]>,
    pat: u64,
}

fn hex(s: &str) -> u64 {
    u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap_or_else(|e| panic!("{s:?}: {e}"))
}

fn seen(stdout: &str) -> Seen {
    assert!(
        stdout.lines().any(|l| l == "cpuid done"),
        "the guest did not finish:\n{stdout}"
    );
    let mut cpuid = BTreeMap::new();
    let mut pat = None;
    for line in stdout.lines() {
        let words: Vec<&str> = line.split(' ').collect();
        match words.as_slice() {
            ["cpuid", leaf, sub, a, b, c, d] => {
                let r = |s: &str| u32::try_from(hex(s)).unwrap();
                cpuid.insert((r(leaf), r(sub)), [r(a), r(b), r(c), r(d)]);
            }
            ["msr", "0x277", value] => pat = Some(hex(value)),
            _ => {}
        }
    }
    Seen {
        cpuid,
        pat: pat.unwrap_or_else(|| panic!("no PAT line:\n{stdout}")),
    }
}

fn boot(extra: &Value) -> Seen {
    let out: Output = run_guest(&guest_path("cpuid"), extra).expect("run ember");
    assert!(out.status.success(), "{out}");
    seen(&out.stdout)
}

fn pvm() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// Registers KVM lets the VMM decide on this host.
fn vmm_decides(leaf: u32, register: CpuidRegister) -> bool {
    let hardware_s = leaf == 7
        || leaf == 0xd
        || (leaf == 1 && matches!(register, CpuidRegister::Ecx | CpuidRegister::Edx));
    !(pvm() && hardware_s)
}

fn index(register: CpuidRegister) -> usize {
    match register {
        CpuidRegister::Eax => 0,
        CpuidRegister::Ebx => 1,
        CpuidRegister::Ecx => 2,
        CpuidRegister::Edx => 3,
    }
}

/// The host this runs on is one T2A is for (Firecracker allows T2A on AMD Milan only).
fn t2a_host() -> bool {
    StaticCpuTemplate::T2A
        .for_host(&ember_cpu_template::HostCpu::read())
        .is_ok()
}

#[test]
fn t2a_shows_the_guest_the_cpu_firecracker_shows() {
    if !t2a_host() {
        // The refusal on other hosts is `a_template_for_another_cpu_is_refused_at_start`.
        eprintln!("not an AMD Milan host: T2A cannot be applied here");
        return;
    }
    let plain = boot(&json!({}));
    let t2a = boot(&json!({"machine-config": {"cpu_template": "T2A"}}));
    let template = StaticCpuTemplate::T2A.template();
    let mut checked = 0;
    let mut changed = 0;
    for leaf in &template.cpuid_modifiers {
        for m in &leaf.modifiers {
            if !vmm_decides(leaf.leaf, m.register) {
                continue;
            }
            let key = (leaf.leaf, leaf.subleaf);
            let got = t2a.cpuid[&key][index(m.register)];
            let before = plain.cpuid[&key][index(m.register)];
            let filter = m.bitmap.filter as u32;
            assert_eq!(
                got & filter,
                m.bitmap.value as u32,
                "leaf {:#x}.{} {:?}: {got:#x} (without the template {before:#x})",
                leaf.leaf,
                leaf.subleaf,
                m.register
            );
            // The bits the template leaves alone are the host's.
            assert_eq!(
                got & !filter,
                before & !filter,
                "leaf {:#x} {:?}",
                leaf.leaf,
                m.register
            );
            checked += 1;
            changed += usize::from(got != before);
        }
    }
    assert!(checked >= 4, "only {checked} registers checked");
    assert!(
        changed >= 3,
        "T2A changed only {changed} registers the guest sees"
    );
    // Family 6, model 0x3f, stepping 2 in leaf 1 EAX, as Firecracker's T2A.
    assert_eq!(t2a.cpuid[&(1, 0)][0] & 0x0fff_3fff, 0x0003_06f2);
    // CLZERO hidden.
    assert_eq!(t2a.cpuid[&(0x8000_0008, 0)][1] & 1, 0);
}

const HIDE_PREFETCHW_AND_RDRAND: &str = r#"{
    "cpuid_modifiers": [
        {"leaf": "0x80000001", "subleaf": "0x0", "flags": 0, "modifiers": [
            {"register": "ecx", "bitmap": "0bxxxxxxxxxxxxxxxxxxxxxxx0xxxxxxxx"}]},
        {"leaf": "0x1", "subleaf": "0x0", "flags": 0, "modifiers": [
            {"register": "ecx", "bitmap": "0bx0xxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}]}],
    "msr_modifiers": [{"addr": "0x277", "bitmap": "0b00000100"}]
}"#;

fn assert_hidden(plain: &Seen, custom: &Seen) {
    // PREFETCHW (CPUID.8000_0001H:ECX[8]) was there and is gone; nothing else moved.
    let before = plain.cpuid[&(0x8000_0001, 0)];
    let after = custom.cpuid[&(0x8000_0001, 0)];
    assert_ne!(before[2] & (1 << 8), 0, "the host has no PREFETCHW to hide");
    assert_eq!(after[2], before[2] & !(1 << 8));
    assert_eq!(after[3], before[3]);
    if vmm_decides(1, CpuidRegister::Ecx) {
        assert_eq!(custom.cpuid[&(1, 0)][2] & (1 << 30), 0);
    }
    // PAT entry 0 write-through instead of write-back.
    assert_eq!(plain.pat & 0xff, 6);
    assert_eq!(custom.pat, (plain.pat & !0xff) | 4);
}

#[test]
fn a_custom_template_in_the_config_file_hides_a_feature() {
    let plain = boot(&json!({}));
    let template: Value = serde_json::from_str(HIDE_PREFETCHW_AND_RDRAND).unwrap();
    let custom = boot(&json!({"cpu-config": template}));
    assert_hidden(&plain, &custom);

    // The same template from a file.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("template.json");
    std::fs::write(&path, HIDE_PREFETCHW_AND_RDRAND).unwrap();
    let from_file = boot(&json!({"cpu-config": path}));
    assert_hidden(&plain, &from_file);
}

fn api_vm() -> (ApiVm, ember_tests::api::Client) {
    let vm = ApiVm::spawn(&["--id", "cpu-template"]).unwrap();
    let mut api = vm.client().unwrap();
    let r = api
        .put(
            "/boot-source",
            &json!({"kernel_image_path": guest_path("cpuid"), "boot_args": "console=ttyS0"}),
        )
        .unwrap();
    assert_eq!(r.status, 204, "{r:?}");
    (vm, api)
}

fn start(api: &mut ember_tests::api::Client) -> ember_tests::api::Response {
    api.put("/actions", &json!({"action_type": "InstanceStart"}))
        .unwrap()
}

#[test]
fn put_cpu_config_hides_a_feature() {
    let plain = boot(&json!({}));
    let (vm, mut api) = api_vm();
    let template: Value = serde_json::from_str(HIDE_PREFETCHW_AND_RDRAND).unwrap();
    let r = api.put("/cpu-config", &template).unwrap();
    assert_eq!(r.status, 204, "{r:?}");
    // Not shown back, as in Firecracker.
    assert!(api.get("/vm/config").unwrap().json()["cpu-config"].is_null());
    let r = start(&mut api);
    assert_eq!(r.status, 204, "{r:?}");
    let out = vm.wait(Duration::from_secs(30)).unwrap();
    assert!(out.status.success(), "{}\n{}", out.stdout, out.stderr);
    assert_hidden(&plain, &seen(&out.stdout));
}

#[test]
fn machine_config_cpu_template_is_deprecated_and_shown() {
    let (_vm, mut api) = api_vm();
    let r = api
        .put(
            "/machine-config",
            &json!({"vcpu_count": 1, "mem_size_mib": 128, "cpu_template": "T2A"}),
        )
        .unwrap();
    assert_eq!(r.status, 204, "{r:?}");
    assert_eq!(r.header("Deprecation"), Some("true"), "{r:?}");
    let r = api.get("/machine-config").unwrap();
    assert_eq!(r.json()["cpu_template"], "T2A", "{r:?}");
    assert_eq!(r.header("Deprecation"), None);
    let r = api
        .patch("/machine-config", &json!({"cpu_template": "None"}))
        .unwrap();
    assert_eq!(r.status, 204, "{r:?}");
    assert_eq!(r.header("Deprecation"), Some("true"), "{r:?}");
    assert!(api
        .get("/machine-config")
        .unwrap()
        .json()
        .get("cpu_template")
        .is_none());
    let r = api
        .put(
            "/machine-config",
            &json!({"vcpu_count": 1, "mem_size_mib": 128}),
        )
        .unwrap();
    assert_eq!(r.header("Deprecation"), None, "{r:?}");
}

#[test]
fn a_template_for_another_cpu_is_refused_at_start() {
    // Intel's T2 on an AMD host, or AMD's T2A on an Intel one.
    let other = match StaticCpuTemplate::T2.for_host(&ember_cpu_template::HostCpu::read()) {
        Err(ember_cpu_template::StaticTemplateError::CpuVendorMismatched) => "T2",
        _ => "T2A",
    };
    let (_vm, mut api) = api_vm();
    let r = api
        .put(
            "/machine-config",
            &json!({"vcpu_count": 1, "mem_size_mib": 128, "cpu_template": other}),
        )
        .unwrap();
    assert_eq!(r.status, 204, "{r:?}");
    let r = start(&mut api);
    assert_eq!(r.status, 400, "{r:?}");
    assert_eq!(
        r.fault_message(),
        "Start microvm error: Failed to get CPU template: CPU vendor mismatched between actual CPU and CPU template."
    );
}

#[test]
fn malformed_templates_are_refused_naming_the_leaf_or_msr() {
    let (_vm, mut api) = api_vm();
    for (template, says) in [
        (
            json!({"cpuid_modifiers": [{"leaf": "0x80000001", "subleaf": "0x0", "flags": 0,
                "modifiers": [{"register": "ecx", "bitmap": "0b01z1"}]}]}),
            "CPUID leaf 0x80000001 subleaf 0x0 register ecx: bitmap \"0b01z1\" has the character 'z'",
        ),
        (
            json!({"cpuid_modifiers": [{"leaf": "0x1", "subleaf": "0x0", "flags": 0,
                "modifiers": [{"register": "rax", "bitmap": "0b1"}]}]}),
            "CPUID leaf 0x1 subleaf 0x0: invalid CPUID register \"rax\"",
        ),
        (
            json!({"msr_modifiers": [{"addr": "0x277", "bitmap": format!("0b{}", "1".repeat(65))}]}),
            "MSR 0x277: bitmap",
        ),
    ] {
        let r = api.put("/cpu-config", &template).unwrap();
        assert_eq!(r.status, 400, "{r:?}");
        let m = r.fault_message();
        assert!(
            m.starts_with("An error occurred when deserializing the json body of a request: "),
            "{m}"
        );
        assert!(m.contains(says), "{m}");
    }
}

#[test]
fn what_kvm_cannot_take_fails_the_start_naming_it() {
    for (template, says) in [
        (
            json!({"cpuid_modifiers": [{"leaf": "0x4fffffff", "subleaf": "0x0", "flags": 0,
                "modifiers": [{"register": "eax", "bitmap": "0b1"}]}]}),
            "Start microvm error: Failed to create guest config: Template changes a CPUID entry not supported by KVM: Leaf: 0x4fffffff, Subleaf: 0x0",
        ),
        (
            json!({"msr_modifiers": [{"addr": "0xdead0000", "bitmap": "0b1"}]}),
            "Start microvm error: Failed to create guest config: Template changes an MSR entry not supported by KVM: Register Address: 0xdead0000",
        ),
        (
            json!({"kvm_capabilities": ["4294967295"]}),
            "Start microvm error: Kvm error: Missing KVM capabilities: [\n    0xffffffff,\n]",
        ),
    ] {
        let (_vm, mut api) = api_vm();
        let r = api.put("/cpu-config", &template).unwrap();
        assert_eq!(r.status, 204, "{r:?}");
        let r = start(&mut api);
        assert_eq!(r.status, 400, "{r:?}");
        assert_eq!(r.fault_message(), says);
    }
}
