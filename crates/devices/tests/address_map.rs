//! Where each device lands, on a real /dev/kvm VM (irqfds and ioeventfds
//! need one).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use ember_config::{Drive, Vsock};
use ember_devices::Devices;
use ember_logger::metrics::Metrics;
use ember_vcpu::{ExitReason, VmControl};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestAddress, GuestMemoryMmap};

fn vm() -> (Kvm, VmFd, GuestMemoryMmap) {
    let kvm = Kvm::new().unwrap();
    let vm = kvm.create_vm().unwrap();
    ember_irqchip::setup(&vm).unwrap();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    (kvm, vm, mem)
}

fn drive(dir: &Path, id: &str, root: bool) -> Drive {
    let path = dir.join(format!("{id}.img"));
    std::fs::File::create(&path)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    Drive {
        drive_id: id.into(),
        path_on_host: Some(path),
        is_root_device: root,
        partuuid: None,
        is_read_only: Some(true),
        cache_type: Default::default(),
        io_engine: Default::default(),
        rate_limiter: None,
        socket: None,
    }
}

#[test]
fn devices_land_where_firecracker_puts_them() {
    let (_kvm, vm, mem) = vm();
    let dir = tempfile::tempdir().unwrap();
    let control = VmControl::new().unwrap();
    let mut devices = Devices::new(mem);
    devices
        .attach_serial(&vm, Box::new(std::io::sink()))
        .unwrap();
    devices.attach_i8042(&vm, control.clone()).unwrap();
    devices.attach_boot_timer(Instant::now(), 0).unwrap();
    devices
        .attach_block(&vm, &drive(dir.path(), "rootfs", true))
        .unwrap();
    devices
        .attach_block(&vm, &drive(dir.path(), "data", false))
        .unwrap();
    devices
        .attach_vsock(
            &vm,
            &Vsock {
                guest_cid: 3,
                uds_path: dir.path().join("v.sock"),
                vsock_id: None,
            },
        )
        .unwrap();

    assert_eq!(
        devices.kernel_args(),
        [
            "root=/dev/vda ro",
            "virtio_mmio.device=4K@0xc0001000:5",
            "virtio_mmio.device=4K@0xc0002000:6",
            "virtio_mmio.device=4K@0xc0003000:7",
        ]
    );
    let acpi: Vec<(u64, u64, u32)> = devices
        .acpi_devices()
        .iter()
        .map(|d| (d.addr, d.len, d.gsi))
        .collect();
    assert_eq!(
        acpi,
        [
            (0xc000_1000, 0x1000, 5),
            (0xc000_2000, 0x1000, 6),
            (0xc000_3000, 0x1000, 7)
        ]
    );
    let pio: Vec<(u64, u64)> = devices
        .pio_bus()
        .ranges()
        .map(|r| (r.base(), r.len()))
        .collect();
    assert_eq!(pio, [(0x60, 5), (0x3f8, 8)]);
    let mmio: Vec<u64> = devices.mmio_bus().ranges().map(|r| r.base()).collect();
    assert_eq!(mmio, [0xc000_0000, 0xc000_1000, 0xc000_2000, 0xc000_3000]);
    // The drives' and the vsock's subscribers run them from the event loop.
    assert_eq!(devices.take_subscribers().len(), 3);
    assert_eq!(devices.drives()[0].id, "rootfs");

    // The i8042's reset line stops the VM.
    assert!(devices.i8042().is_some());
    let (pio, _mmio) = (devices.pio_bus().clone(), devices.mmio_bus().clone());
    assert!(pio.write(0x64, &[0xfe]));
    assert_eq!(control.exit_reason(), Some(ExitReason::GuestReset));
    // Shared with a vCPU, the map is final.
    let e = devices.attach_boot_timer(Instant::now(), 0).unwrap_err();
    assert_eq!(
        e.to_string(),
        "cannot add the boot timer: the vCPUs already use the buses"
    );
}

#[test]
fn a_second_device_on_the_same_ports_is_refused_by_name() {
    let (_kvm, vm, mem) = vm();
    let mut devices = Devices::new(mem);
    devices
        .attach_serial(&vm, Box::new(std::io::sink()))
        .unwrap();
    let e = devices
        .attach_serial(&vm, Box::new(std::io::sink()))
        .unwrap_err();
    assert!(
        e.to_string()
            .starts_with("cannot add the serial port to the PIO bus"),
        "{e}"
    );
}

#[test]
fn a_missing_image_names_the_drive_and_takes_no_slot() {
    let (_kvm, vm, mem) = vm();
    let mut devices = Devices::new(mem);
    let mut d = drive(Path::new("/"), "x", false);
    d.drive_id = "missing".into();
    d.path_on_host = Some(PathBuf::from("/nonexistent/missing.img"));
    let e = devices.attach_block(&vm, &d).unwrap_err().to_string();
    assert!(e.starts_with("drive `missing`: "), "{e}");
    assert!(devices.kernel_args().is_empty());
    assert!(devices.virtio_slots().is_empty());
}

#[test]
fn device_counters_register_under_firecracker_groups() {
    let (_kvm, vm, mem) = vm();
    let dir = tempfile::tempdir().unwrap();
    let mut devices = Devices::new(mem);
    devices
        .attach_serial(&vm, Box::new(std::io::sink()))
        .unwrap();
    devices
        .attach_block(&vm, &drive(dir.path(), "rootfs", true))
        .unwrap();
    let metrics = Arc::new(Metrics::new());
    devices.register_metrics(&metrics);
    assert!(devices.pio_bus().write(0x3f8, b"x"));
    let line: serde_json::Value = serde_json::from_str(&metrics.render()).unwrap();
    assert_eq!(line["uart"]["write_count"], 1, "{line}");
    assert!(line["block_rootfs"].is_object(), "{line}");
    assert!(line["block"].is_object(), "{line}");
}
