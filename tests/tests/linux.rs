//! Boots Debian's cloud kernel far enough to check the boot protocol: the
//! command line and the e820 map Linux reads, and the ACPI tables it finds,
//! as it prints them on the early console. The VM is killed once they have
//! been printed; a full Linux boot is too slow under this host's nested KVM.

use std::path::Path;
use std::time::Duration;

use ember_tests::elf::Elf64;
use ember_tests::layout::{expected_e820, sanitize, E820Entry, ISA_HOLE};
use ember_tests::linux::debian_cloud_kernel;
use ember_tests::{default_config, merge_patch, Error, Launch};
use serde_json::json;

const BOOT_ARGS: &str = "earlycon=uart8250,io,0x3f8 console=ttyS0 reboot=k panic=1 pci=off";
const MEM_MIB: u64 = 256;

/// Boots `kernel`, streams its console until the line after the last
/// `BIOS-e820:` line (or `timeout`), kills it and returns the console text.
fn early_console(kernel: &Path, timeout: Duration) -> String {
    let mut config = default_config(kernel);
    merge_patch(
        &mut config,
        &json!({
            "boot-source": {"boot_args": BOOT_ARGS},
            "machine-config": {"mem_size_mib": MEM_MIB},
        }),
    );
    let mut vm = Launch::new(&config).spawn().expect("start ember");
    let mut in_map = false;
    let waited = vm.wait_for_line(
        |line| {
            let e820 = line.contains("BIOS-e820:");
            let done = in_map && !e820;
            in_map |= e820;
            done
        },
        timeout,
    );
    match waited {
        Ok(_) => vm.kill().expect("kill the VM").stdout,
        // On timeout the assertions below still run on what was printed, so
        // a failure shows the console.
        Err(Error::Timeout { output, .. }) => output.stdout,
        Err(e) => panic!("{e}"),
    }
}

/// The text after `marker` on each console line that has it.
fn after<'a>(console: &'a str, marker: &str) -> Vec<&'a str> {
    console
        .lines()
        .filter_map(|l| l.split_once(marker).map(|(_, rest)| rest.trim_end()))
        .collect()
}

fn assert_boot_protocol(console: &str, extra_e820: &[E820Entry]) {
    assert_eq!(
        after(console, "Command line: "),
        [BOOT_ARGS],
        "Linux must see boot_args unchanged\n{console}"
    );
    let mut map = expected_e820(MEM_MIB);
    map.extend_from_slice(extra_e820);
    let want: Vec<String> = sanitize(&map).iter().map(|e| e.linux_line()).collect();
    assert_eq!(after(console, "BIOS-e820: "), want, "\n{console}");
}

#[test]
fn fetched_kernel_is_a_bzimage_and_a_pvh_vmlinux() {
    let kernel = debian_cloud_kernel().expect("fetch the Debian cloud kernel");
    let bz = std::fs::read(&kernel.bzimage).unwrap();
    // Linux boot protocol: "HdrS" at 0x202, 0xaa55 boot flag at 0x1fe.
    assert_eq!(&bz[0x202..0x206], b"HdrS");
    assert_eq!(&bz[0x1fe..0x200], [0x55, 0xaa]);
    let vmlinux = std::fs::read(&kernel.vmlinux).unwrap();
    let elf = Elf64::parse(&vmlinux).unwrap();
    assert_eq!(elf.machine, 62, "x86-64");
    let entry = elf.pvh_entry(&vmlinux).expect("PVH note");
    assert!(
        entry >= 0x100_0000,
        "PVH entry {entry:#x} is a physical address"
    );
}

#[test]
fn vmlinux_pvh_sees_the_command_line_and_e820_map() {
    let kernel = debian_cloud_kernel().expect("fetch the Debian cloud kernel");
    let console = early_console(&kernel.vmlinux, Duration::from_secs(120));
    // On a PVH boot Linux builds boot_params itself and reserves the legacy
    // ISA hole (arch/x86/platform/pvh/enlighten.c).
    assert_boot_protocol(&console, &[ISA_HOLE]);
}

#[test]
fn bzimage_sees_the_command_line_and_e820_map() {
    let kernel = debian_cloud_kernel().expect("fetch the Debian cloud kernel");
    // The decompressor runs with interrupts off, hence in KVM's instruction
    // emulator on this host: about two minutes before Linux prints anything.
    let console = early_console(&kernel.bzimage, Duration::from_secs(480));
    assert_boot_protocol(&console, &[]);
}

/// Linux's ACPI table discovery (`acpi_tb_print_table_header`) on the
/// tables ember writes for a VM with one drive: the RSDP where Firecracker
/// puts it, every table carrying ember's OEM id, and no ACPI error up to
/// the MADT line.
#[test]
fn vmlinux_finds_embers_acpi_tables() {
    const ACPI_ARGS: &str =
        "earlycon=uart8250,io,0x3f8 console=ttyS0 acpi=on reboot=k panic=1 pci=off";
    let kernel = debian_cloud_kernel().expect("fetch the Debian cloud kernel");
    let dir = tempfile::tempdir().expect("temp dir");
    let image = dir.path().join("disk.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(8 << 20))
        .expect("create the drive image");
    let mut config = default_config(&kernel.vmlinux);
    merge_patch(
        &mut config,
        &json!({
            "boot-source": {"boot_args": ACPI_ARGS},
            "machine-config": {"mem_size_mib": MEM_MIB},
            "drives": [{
                "drive_id": "disk0",
                "path_on_host": image,
                "is_root_device": false,
            }],
        }),
    );
    let mut vm = Launch::new(&config).spawn().expect("start ember");
    let console = match vm.wait_for_line(|l| l.contains("ACPI: APIC"), Duration::from_secs(60)) {
        Ok(_) => vm.kill().expect("kill the VM").stdout,
        Err(Error::Timeout { output, .. }) => output.stdout,
        Err(e) => panic!("{e}"),
    };
    // Up to and including the MADT line.
    let upto: Vec<&str> = console
        .lines()
        .scan(false, |done, l| {
            if *done {
                return None;
            }
            *done = l.contains("ACPI: APIC");
            Some(l)
        })
        .collect();
    let table = |sig: &str| {
        upto.iter()
            .find_map(|l| l.split_once(&format!("ACPI: {sig} ")).map(|(_, rest)| rest))
            .unwrap_or_else(|| panic!("no `ACPI: {sig}` line\n{console}"))
    };
    assert_eq!(
        table("RSDP").trim_end(),
        "0x00000000000E0000 000024 (v02 EMBER )",
        "\n{console}"
    );
    for sig in ["XSDT", "FACP", "DSDT", "APIC"] {
        // "0x... LENGTH (vNN EMBER  EMBERVM  ...)"
        let line = table(sig);
        assert!(
            line.contains("EMBER  EMBERVM"),
            "{sig} lacks ember's OEM id and table id: {line:?}\n{console}"
        );
    }
    let errors: Vec<&&str> = upto
        .iter()
        .filter(|l| l.contains("ACPI Error") || l.contains("ACPI BIOS Error"))
        .collect();
    assert!(errors.is_empty(), "{errors:#?}\n{console}");
}
