//! What the guest finds at the 64-bit Linux boot entry: boot_params with the
//! command line and Firecracker's e820 map, paging on, RSI at the zero page.
//! The expected map is `ember_tests::layout::expected_e820`.

use ember_tests::layout::{expected_e820, E820Entry};
use ember_tests::{guest_path, run_guest, Output};
use serde_json::{json, Value};

/// CR0.PE, protected mode (Intel SDM vol. 3A, 2.5).
const CR0_PE: u64 = 1 << 0;
/// CR0.PG, paging.
const CR0_PG: u64 = 1 << 31;
/// CR4.PAE, required for long mode.
const CR4_PAE: u64 = 1 << 5;
/// Where ember puts the PML4 (Firecracker's `PML4_START`).
const PML4: u64 = 0x9000;
/// Where ember puts boot_params (Firecracker's `ZERO_PAGE_START`).
const ZERO_PAGE: u64 = 0x7000;

/// What the boot_info guest reported.
#[derive(Debug, Default)]
struct BootInfo {
    cmdline: Option<String>,
    e820: Vec<E820Entry>,
    cr0: u64,
    cr3: u64,
    cr4: u64,
    rsi: u64,
}

fn hex(s: &str) -> u64 {
    u64::from_str_radix(s.trim_start_matches("0x"), 16)
        .unwrap_or_else(|e| panic!("bad hex {s:?}: {e}"))
}

fn parse(out: &Output) -> BootInfo {
    let mut info = BootInfo::default();
    for line in out.stdout.lines() {
        let Some((key, value)) = line.split_once(": ") else {
            continue;
        };
        match key {
            "cmdline" => info.cmdline = Some(value.to_string()),
            "e820" => {
                let f: Vec<&str> = value.split(' ').collect();
                assert_eq!(f.len(), 3, "bad e820 line {line:?}");
                info.e820.push(E820Entry {
                    addr: hex(f[0]),
                    size: hex(f[1]),
                    kind: f[2].parse().unwrap(),
                });
            }
            "cr0" => info.cr0 = hex(value),
            "cr3" => info.cr3 = hex(value),
            "cr4" => info.cr4 = hex(value),
            "rsi" => info.rsi = hex(value),
            _ => {}
        }
    }
    info
}

fn boot(overrides: Value) -> (Output, BootInfo) {
    let out = run_guest(&guest_path("boot_info"), &overrides).unwrap();
    assert!(out.status.success(), "{out}");
    assert!(
        out.stdout.contains("\nrsi: "),
        "guest did not finish\n{out}"
    );
    let info = parse(&out);
    (out, info)
}

/// The map in address order: Firecracker writes it unsorted and Linux sorts
/// it, so only the set of ranges is guest-visible behaviour.
fn sorted(map: &[E820Entry]) -> Vec<E820Entry> {
    let mut map = map.to_vec();
    map.sort();
    map
}

fn assert_long_mode_entry(info: &BootInfo, out: &Output) {
    assert_eq!(info.cr0 & (CR0_PE | CR0_PG), CR0_PE | CR0_PG, "{out}");
    assert_eq!(info.cr4 & CR4_PAE, CR4_PAE, "{out}");
    assert_eq!(info.cr3, PML4, "{out}");
    assert_eq!(info.rsi, ZERO_PAGE, "{out}");
}

#[test]
fn boot_params_at_128_mib() {
    let args = "console=ttyS0 reboot=k panic=1 pci=off boot_info.marker=42";
    let (out, info) = boot(json!({
        "boot-source": {"boot_args": args},
        "machine-config": {"mem_size_mib": 128},
    }));
    assert_eq!(info.cmdline.as_deref(), Some(args), "{out}");
    assert_eq!(sorted(&info.e820), expected_e820(128), "{out}");
    assert_long_mode_entry(&info, &out);
}

#[test]
fn memory_above_3_gib_is_relocated_above_4_gib() {
    // Guest memory is mapped lazily: 5 GiB costs only what the guest touches.
    let (out, info) = boot(json!({
        "boot-source": {"boot_args": "console=ttyS0"},
        "machine-config": {"mem_size_mib": 5120},
    }));
    assert_eq!(sorted(&info.e820), expected_e820(5120), "{out}");
    let above_4g = info.e820.iter().find(|e| e.addr == 1 << 32);
    assert_eq!(above_4g.map(|e| e.size), Some(2 << 30), "{out}");
    assert_long_mode_entry(&info, &out);
}

#[test]
fn default_command_line_is_firecrackers() {
    let (out, info) = boot(json!({}));
    // Firecracker's DEFAULT_KERNEL_CMDLINE and the `pci=off` its builder adds.
    assert_eq!(
        info.cmdline.as_deref(),
        Some(
            "reboot=k panic=1 nomodule 8250.nr_uarts=0 i8042.noaux i8042.nomux i8042.dumbkbd \
             swiotlb=noforce pci=off"
        ),
        "{out}"
    );
}
