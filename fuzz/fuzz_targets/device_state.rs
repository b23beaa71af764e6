// SPDX-License-Identifier: Apache-2.0

//! Fuzzes the restore of device states (a snapshot file is untrusted):
//! the UART's `SerialDevice::from_state`, `Block::restore`,
//! `Vsock::restore`, `Entropy::restore` and `Balloon::restore`. The first
//! byte picks the device.
//!
//! Checked: no panic; a refused UART state raises no interrupt, a refused
//! block, vsock, entropy or balloon state changes nothing; an accepted state saves back
//! unchanged, and the restored UART hands the guest exactly its FIFO
//! bytes, oldest first, with LSR's data-ready bit following.

#![no_main]

use std::cell::RefCell;
use std::io;
use std::path::PathBuf;

use arbitrary::{Arbitrary, Unstructured};
use ember_bus::BusDevice;
use ember_legacy_devices::serial::{SerialDevice, SerialDeviceState, COM1_BASE};
use ember_legacy_devices::EventFdTrigger;
use ember_virtio::VirtioDevice;
use ember_virtio_balloon::{Balloon, BalloonConfig};
use ember_virtio_blk::{Block, BlockConfig, BlockState, CacheType, IoEngine};
use ember_virtio_rng::{Entropy, EntropyConfig, EntropyState};
use ember_vsock::{Vsock, VsockConfig, VsockState};
use libfuzzer_sys::fuzz_target;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const LCR: u64 = 3;
const LSR: u64 = 5;
const LCR_DLAB: u8 = 0x80;
const LSR_DATA_READY: u8 = 0x01;
/// Sectors of the block device's backing file.
const CAPACITY: u64 = 8;
const CID: u32 = 3;

/// A per-process scratch path.
fn scratch(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("ember-fuzz-{}-{name}", std::process::id()))
}

thread_local! {
    static BLOCK: RefCell<Block> = {
        let path = scratch("disk.img");
        std::fs::write(&path, vec![0u8; CAPACITY as usize * 512]).unwrap();
        let block = Block::new(&BlockConfig {
            drive_id: "rootfs".into(),
            path_on_host: path.clone(),
            is_read_only: false,
            cache_type: CacheType::Unsafe,
            io_engine: IoEngine::Sync,
            rate_limiter: Default::default(),
        })
        .unwrap();
        // The device keeps the file open; nothing is left behind.
        let _ = std::fs::remove_file(&path);
        RefCell::new(block)
    };
    static VSOCK: RefCell<Vsock> = {
        let path = scratch("v.sock");
        let _ = std::fs::remove_file(&path);
        RefCell::new(
            Vsock::new(VsockConfig {
                guest_cid: CID,
                uds_path: path,
            })
            .unwrap(),
        )
    };
    static ENTROPY: RefCell<Entropy> =
        RefCell::new(Entropy::new(&EntropyConfig::default()).unwrap());
    static BALLOON: RefCell<Balloon> = RefCell::new(
        Balloon::new(&BalloonConfig {
            amount_mib: 4,
            deflate_on_oom: true,
            stats_polling_interval_s: 1,
            free_page_hinting: true,
            free_page_reporting: true,
        })
        .unwrap(),
    );
}

fn uart(u: &mut Unstructured) -> arbitrary::Result<()> {
    let regs = <[u8; 9]>::arbitrary(u)?;
    let state = SerialDeviceState {
        baud_divisor_low: regs[0],
        baud_divisor_high: regs[1],
        interrupt_enable: regs[2],
        interrupt_identification: regs[3],
        line_control: regs[4],
        line_status: regs[5],
        modem_control: regs[6],
        modem_status: regs[7],
        scratch: regs[8],
        in_buffer: Vec::<u8>::arbitrary(u)?,
    };
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let trigger = EventFdTrigger::new(irq.try_clone().unwrap());
    let Ok(mut dev) = SerialDevice::from_state(&state, trigger, io::sink()) else {
        assert!(irq.read().is_err(), "a refused state raised an interrupt");
        return Ok(());
    };
    assert_eq!(dev.save(), state);
    dev.write(COM1_BASE, LCR, &[state.line_control & !LCR_DLAB]);
    let mut byte = [0u8];
    for &expected in &state.in_buffer {
        dev.read(COM1_BASE, LSR, &mut byte);
        assert_ne!(byte[0] & LSR_DATA_READY, 0, "data ready");
        dev.read(COM1_BASE, 0, &mut byte);
        assert_eq!(byte[0], expected);
    }
    dev.read(COM1_BASE, LSR, &mut byte);
    assert_eq!(byte[0] & LSR_DATA_READY, 0, "FIFO drained");
    Ok(())
}

fn block(u: &mut Unstructured) -> arbitrary::Result<()> {
    let state = BlockState {
        acked_features: u64::arbitrary(u)?,
        capacity: if bool::arbitrary(u)? {
            CAPACITY
        } else {
            u64::arbitrary(u)?
        },
        read_only: bool::arbitrary(u)?,
        drive_id: if bool::arbitrary(u)? {
            "rootfs".into()
        } else {
            String::arbitrary(u)?
        },
    };
    BLOCK.with_borrow_mut(|dev| {
        let before = dev.save();
        if dev.restore(&state).is_err() {
            assert_eq!(dev.save(), before, "a refused state changed the device");
            return;
        }
        assert_eq!(dev.save(), state);
        assert!(dev.reset());
        assert_eq!(dev.save(), before);
    });
    Ok(())
}

fn vsock(u: &mut Unstructured) -> arbitrary::Result<()> {
    let state = VsockState {
        acked_features: u64::arbitrary(u)?,
        guest_cid: if bool::arbitrary(u)? {
            u64::from(CID)
        } else {
            u64::arbitrary(u)?
        },
    };
    VSOCK.with_borrow_mut(|dev| {
        let before = dev.save();
        if dev.restore(&state).is_err() {
            assert_eq!(dev.save(), before, "a refused state changed the device");
            return;
        }
        assert_eq!(dev.save(), state);
        let mut cid = [0u8; 8];
        dev.read_config(0, &mut cid);
        assert_eq!(u64::from_le_bytes(cid), state.guest_cid);
        assert!(dev.reset());
        assert_eq!(dev.save(), before);
    });
    Ok(())
}

fn entropy(u: &mut Unstructured) -> arbitrary::Result<()> {
    let state = EntropyState {
        acked_features: u64::arbitrary(u)?,
    };
    ENTROPY.with_borrow_mut(|dev| {
        let before = dev.save();
        if dev.restore(&state).is_err() {
            assert_eq!(dev.save(), before, "a refused state changed the device");
            return;
        }
        assert_eq!(dev.save(), state);
        assert_eq!(state.acked_features & !dev.features(), 0, "not offered");
        assert!(dev.reset());
        assert_eq!(dev.save(), before);
    });
    Ok(())
}

fn balloon(u: &mut Unstructured) -> arbitrary::Result<()> {
    BALLOON.with_borrow_mut(|dev| {
        let before = dev.save();
        let mut state = before.clone();
        state.acked_features = u64::arbitrary(u)?;
        state.num_pages = u32::arbitrary(u)?;
        state.actual_pages = u32::arbitrary(u)?;
        state.hint_cmd_id = u32::arbitrary(u)?;
        state.stats_polling_interval_s = u16::arbitrary(u)?;
        state.stats_desc = Option::<u16>::arbitrary(u)?;
        state.hinting.host_cmd = u32::arbitrary(u)?;
        if dev.restore(&state).is_err() {
            assert_eq!(dev.save(), before, "a refused state changed the device");
            return Ok(());
        }
        let after = dev.save();
        assert_eq!(after.acked_features, state.acked_features);
        assert_eq!(after.acked_features & !dev.features(), 0, "not offered");
        assert_eq!(
            (after.num_pages, after.actual_pages, after.stats_desc),
            (state.num_pages, state.actual_pages, state.stats_desc)
        );
        assert!(dev.reset());
        Ok(())
    })
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let Ok(which) = u8::arbitrary(&mut u) else {
        return;
    };
    let _ = match which % 5 {
        0 => uart(&mut u),
        1 => block(&mut u),
        2 => vsock(&mut u),
        3 => entropy(&mut u),
        _ => balloon(&mut u),
    };
});
