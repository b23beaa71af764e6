use ember_irqchip::IrqChipState;
use ember_legacy_devices::i8042::I8042State;
use ember_legacy_devices::serial::SerialDeviceState;
use ember_vcpu::{CpuidEntry, MsrEntry, VcpuState};
use ember_virtio_blk::BlockState;
use ember_virtio_mmio::{MmioTransportState, QueueState};
use ember_virtio_rng::EntropyState;
use ember_vsock::VsockState;

use super::*;

fn vcpu(rip: u64) -> VcpuState {
    let regs = kvm_bindings::kvm_regs {
        rip,
        ..Default::default()
    };
    VcpuState {
        cpuid: vec![CpuidEntry {
            function: 0,
            index: 0,
            flags: 0,
            eax: 0xd,
            ebx: 1,
            ecx: 2,
            edx: 3,
        }],
        msrs: vec![MsrEntry {
            index: 0x10,
            data: 42,
        }],
        regs,
        sregs: Default::default(),
        xsave: Default::default(),
        xcrs: Default::default(),
        debug_regs: Default::default(),
        lapic: Default::default(),
        mp_state: Default::default(),
        vcpu_events: Default::default(),
    }
}

fn transport() -> MmioTransportState {
    MmioTransportState {
        status: 0xf,
        device_features_sel: 0,
        driver_features_sel: 0,
        driver_features: 1 << 32,
        driver_features_beyond_64: false,
        acked_features: 1 << 32,
        queue_sel: 0,
        interrupt_status: 0,
        config_generation: 0,
        queues: vec![QueueState {
            size: 256,
            ready: true,
            desc_table: 0x1000,
            avail_ring: 0x2000,
            used_ring: 0x3000,
            next_avail: 7,
            next_used: 7,
        }],
    }
}

const CONFIG: &str = r#"{
    "boot-source": {"kernel_image_path": "/k"},
    "machine-config": {"vcpu_count": 2, "mem_size_mib": 64},
    "drives": [{"drive_id": "data", "path_on_host": "/d", "is_root_device": false, "is_read_only": true}],
    "vsock": {"guest_cid": 3, "uds_path": "/v.sock"},
    "entropy": {}
}"#;

fn state() -> MicrovmState {
    MicrovmState {
        config_json: CONFIG.to_string(),
        memory: memory_layout(64),
        vcpus: vec![vcpu(0x100_0000), vcpu(0x100_0010)],
        irqchip: IrqChipState {
            pic_master: Default::default(),
            pic_slave: Default::default(),
            ioapic: Default::default(),
            pit: Default::default(),
            clock: Default::default(),
        },
        serial: SerialDeviceState {
            baud_divisor_low: 12,
            baud_divisor_high: 0,
            interrupt_enable: 0,
            interrupt_identification: 1,
            line_control: 3,
            line_status: 0x60,
            modem_control: 8,
            modem_status: 0xb0,
            scratch: 0,
            in_buffer: vec![b'a'],
        },
        i8042: I8042State {
            status: 0,
            control: 0,
            outp: 0,
            cmd: 0,
            buffer: vec![],
        },
        drives: vec![VirtioDeviceState {
            id: "data".into(),
            addr: 0xc000_1000,
            gsi: 5,
            transport: transport(),
            device: BlockState {
                acked_features: 1 << 32,
                capacity: 8,
                read_only: true,
                drive_id: "data".into(),
            },
        }],
        nets: vec![],
        vsock: Some(VirtioDeviceState {
            id: "vsock".into(),
            addr: 0xc000_2000,
            gsi: 6,
            transport: transport(),
            device: VsockState {
                acked_features: 1 << 32,
                guest_cid: 3,
            },
        }),
        entropy: Some(VirtioDeviceState {
            id: "entropy".into(),
            addr: 0xc000_3000,
            gsi: 7,
            transport: transport(),
            device: EntropyState {
                acked_features: 1 << 32,
            },
        }),
        balloon: None,
    }
}

fn encoded() -> Vec<u8> {
    encode(&state()).unwrap()
}

/// Recomputes the checksum after a deliberate change.
fn reseal(bytes: &mut [u8]) {
    let at = bytes.len() - CRC_LEN;
    let crc = crc64(&bytes[..at]);
    bytes[at..].copy_from_slice(&crc.to_le_bytes());
}

#[test]
fn round_trip() {
    let bytes = encoded();
    assert_eq!(&bytes[..8], b"EMBRSNAP");
    let back = decode(&bytes).unwrap();
    assert_eq!(back.config_json, CONFIG);
    assert_eq!(back.memory, memory_layout(64));
    assert_eq!(back.vcpus.len(), 2);
    assert_eq!(back.vcpus[1].regs.rip, 0x100_0010);
    assert_eq!(back.vcpus[0].msrs, state().vcpus[0].msrs);
    assert_eq!(back.serial, state().serial);
    assert_eq!(back.drives, state().drives);
    assert_eq!(back.vsock, state().vsock);
    assert_eq!(back.entropy, state().entropy);
    assert_eq!(back.validate().unwrap().machine_config.vcpu_count, 2);
    assert_eq!(format_version(&bytes).unwrap(), SNAPSHOT_VERSION);
}

#[test]
fn every_truncation_is_refused() {
    let bytes = encoded();
    for len in 0..bytes.len() {
        let err = decode(&bytes[..len]).unwrap_err();
        assert!(
            matches!(err, SnapshotError::Truncated { .. }),
            "{len}: {err}"
        );
    }
}

#[test]
fn bad_magic() {
    let mut bytes = encoded();
    bytes[0] = b'X';
    let err = decode(&bytes).unwrap_err();
    assert!(matches!(err, SnapshotError::BadMagic(_)), "{err}");
    assert!(err.to_string().contains("bad magic"), "{err}");
}

#[test]
fn unsupported_versions() {
    for (at, value) in [
        (8, SNAPSHOT_VERSION.major + 1),
        (10, SNAPSHOT_VERSION.minor + 1),
    ] {
        let mut bytes = encoded();
        bytes[at..at + 2].copy_from_slice(&value.to_le_bytes());
        reseal(&mut bytes);
        let err = decode(&bytes).unwrap_err();
        assert!(
            matches!(err, SnapshotError::UnsupportedVersion { .. }),
            "{err}"
        );
        assert!(err
            .to_string()
            .contains("unsupported snapshot format version"));
    }
    // A newer patch version is read.
    let mut bytes = encoded();
    bytes[12..14].copy_from_slice(&7u16.to_le_bytes());
    reseal(&mut bytes);
    decode(&bytes).unwrap();
}

#[test]
fn every_flipped_byte_is_refused() {
    let bytes = encoded();
    for at in 0..bytes.len() {
        let mut bad = bytes.clone();
        bad[at] ^= 0x01;
        assert!(decode(&bad).is_err(), "flipped byte {at} accepted");
    }
    let mut bad = bytes.clone();
    bad[HEADER_LEN + 3] ^= 0x80;
    let err = decode(&bad).unwrap_err();
    assert!(matches!(err, SnapshotError::Checksum { .. }), "{err}");
}

#[test]
fn trailing_bytes_and_huge_lengths() {
    let mut bytes = encoded();
    bytes.push(0);
    let err = decode(&bytes).unwrap_err();
    assert!(
        matches!(err, SnapshotError::TrailingBytes { extra: 1 }),
        "{err}"
    );

    let mut bytes = encoded();
    bytes[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
    let err = decode(&bytes).unwrap_err();
    assert!(matches!(err, SnapshotError::Truncated { .. }), "{err}");

    let mut bytes = encoded();
    bytes[14] = 1;
    assert!(matches!(
        decode(&bytes).unwrap_err(),
        SnapshotError::Reserved(1)
    ));
}

#[test]
fn garbage_body_with_valid_checksum() {
    let mut bytes = encoded();
    for b in &mut bytes[HEADER_LEN..HEADER_LEN + 16] {
        *b = 0xff;
    }
    reseal(&mut bytes);
    assert!(decode(&bytes).is_err());
}

fn refused(change: impl FnOnce(&mut MicrovmState)) -> SnapshotError {
    let mut s = state();
    change(&mut s);
    let bytes = encode(&s).unwrap();
    decode_unchecked(&bytes).unwrap();
    decode(&bytes).unwrap_err()
}

#[test]
fn vcpu_count_must_match() {
    let err = refused(|s| {
        s.vcpus.pop();
    });
    assert!(
        matches!(
            err,
            SnapshotError::VcpuCount {
                states: 1,
                configured: 2
            }
        ),
        "{err}"
    );
}

#[test]
fn memory_layout_must_match() {
    let err = refused(|s| s.memory = memory_layout(32));
    assert!(matches!(err, SnapshotError::MemoryLayout { .. }), "{err}");
    let err = refused(|s| s.memory[0].file_offset = 4096);
    assert!(matches!(err, SnapshotError::MemoryLayout { .. }), "{err}");
}

#[test]
fn memory_file_length() {
    let s = state();
    assert_eq!(s.memory_len(), 64 << 20);
    s.check_memory_file(64 << 20).unwrap();
    let err = s.check_memory_file((64 << 20) - 1).unwrap_err();
    assert!(
        err.to_string().contains(
            "the memory file is 67108863 bytes, the snapshot's memory layout needs 67108864"
        ),
        "{err}"
    );
}

#[test]
fn device_set_must_match() {
    let err = refused(|s| {
        s.drives.clear();
    });
    assert!(err.to_string().contains("block devices []"), "{err}");
    let err = refused(|s| s.drives[0].id = "other".into());
    assert!(matches!(err, SnapshotError::Devices(_)), "{err}");
    let err = refused(|s| s.vsock = None);
    assert!(
        err.to_string().contains("without a vsock device state"),
        "{err}"
    );
    let err = refused(|s| s.drives[0].gsi = 9);
    assert!(err.to_string().contains("on GSI 9"), "{err}");
    let err = refused(|s| s.vsock.as_mut().unwrap().addr = 0xc000_1000);
    assert!(err.to_string().contains("0xc0002000"), "{err}");
    let err = refused(|s| s.entropy = None);
    assert!(
        err.to_string().contains("without an entropy device state"),
        "{err}"
    );
    let err = refused(|s| s.entropy.as_mut().unwrap().gsi = 6);
    assert!(err.to_string().contains("on GSI 6"), "{err}");
    // A balloon state without a balloon in the configuration.
    let err = refused(|s| {
        s.balloon = Some(VirtioDeviceState {
            id: "balloon".into(),
            addr: 0xc000_1000,
            gsi: 5,
            transport: transport(),
            device: balloon_state(),
        })
    });
    assert!(
        err.to_string().contains("a balloon device state without"),
        "{err}"
    );
}

fn balloon_state() -> ember_virtio_balloon::BalloonState {
    let config = ember_virtio_balloon::BalloonConfig {
        amount_mib: 4,
        deflate_on_oom: true,
        stats_polling_interval_s: 1,
        free_page_hinting: false,
        free_page_reporting: false,
    };
    ember_virtio_balloon::Balloon::new(&config).unwrap().save()
}

#[test]
fn the_balloon_takes_the_first_slot() {
    let mut s = state();
    let mut config: serde_json::Value = serde_json::from_str(CONFIG).unwrap();
    config["balloon"] = serde_json::json!({"amount_mib": 4, "deflate_on_oom": true});
    s.config_json = config.to_string();
    // Everything else moves down one slot.
    s.drives[0].addr = 0xc000_2000;
    s.drives[0].gsi = 6;
    let v = s.vsock.as_mut().unwrap();
    (v.addr, v.gsi) = (0xc000_3000, 7);
    let e = s.entropy.as_mut().unwrap();
    (e.addr, e.gsi) = (0xc000_4000, 8);
    let err = s.validate().unwrap_err();
    assert!(
        err.to_string()
            .contains("a balloon device configuration without"),
        "{err}"
    );
    s.balloon = Some(VirtioDeviceState {
        id: "balloon".into(),
        addr: 0xc000_1000,
        gsi: 5,
        transport: transport(),
        device: balloon_state(),
    });
    s.validate().unwrap();
    let back = decode(&encode(&s).unwrap()).unwrap();
    assert_eq!(back.balloon, s.balloon);
}

#[test]
fn config_must_be_valid() {
    let err = refused(|s| s.config_json = "{\"machine-config\": {\"vcpu_count\": 0}}".into());
    assert!(matches!(err, SnapshotError::Config(_)), "{err}");
    let err = refused(|s| s.config_json = "not json".into());
    assert!(matches!(err, SnapshotError::Config(_)), "{err}");
}

#[test]
fn version_prints_like_firecracker() {
    assert_eq!(format!("v{SNAPSHOT_VERSION}"), "v1.0.0");
}
