// SPDX-License-Identifier: Apache-2.0

//! Fuzzes the i8042 controller (`ember_legacy_devices::i8042::I8042Device`)
//! through the `ember_bus::BusDevice` entry points the vCPU threads use,
//! interleaved with the host-side `trigger_ctrl_alt_del` and `trigger_key`.
//!
//! The controller is checked against a model of its visible state: the
//! status register, the bytes read from the data port, the control register
//! and output port, the number of CPU resets and keyboard interrupts
//! signalled, and the metrics.

#![no_main]

use std::collections::VecDeque;
use std::io;

use arbitrary::Arbitrary;
use ember_bus::BusDevice;
use ember_legacy_devices::i8042::{
    Error, I8042Device, BUF_SIZE, I8042_BASE, I8042_LEN, KEY_ALT, KEY_CTRL, KEY_DEL,
};
use ember_legacy_devices::EventFdTrigger;
use libfuzzer_sys::fuzz_target;
use vmm_sys_util::eventfd::EventFd;

// Ports and bits, Linux drivers/input/serio/i8042.h.
const OFS_DATA: u64 = 0;
const OFS_STATUS: u64 = 4;
const STR_OBF: u8 = 0x01;
const STR_CMDDAT: u8 = 0x08;
const STR_KEYLOCK: u8 = 0x10;
const CTR_KBDINT: u8 = 0x01;
const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_READ_OUTP: u8 = 0xD0;
const CMD_WRITE_OUTP: u8 = 0xD1;
const CMD_RESET_CPU: u8 = 0xFE;
const KBD_ACK: u8 = 0xFA;
/// Power-on control register: keyboard interrupt on, POST passed.
const DEFAULT_CTR: u8 = 0x05;

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Size {
    B1,
    B2,
    B4,
    B8,
}

impl Size {
    fn bytes(self) -> usize {
        match self {
            Size::B1 => 1,
            Size::B2 => 2,
            Size::B4 => 4,
            Size::B8 => 8,
        }
    }
}

/// Port offset from 0x60, as the bus computes it.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Offset {
    /// Data port (0x60).
    Data,
    /// Status/command port (0x64).
    Status,
    /// One of the 5 ports, or just past them (modulo 6).
    Port(u8),
    /// Any offset.
    Raw(u64),
}

impl Offset {
    fn value(self) -> u64 {
        match self {
            Offset::Data => OFS_DATA,
            Offset::Status => OFS_STATUS,
            Offset::Port(port) => u64::from(port) % (I8042_LEN + 1),
            Offset::Raw(offset) => offset,
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Op {
    Read {
        offset: Offset,
        size: Size,
    },
    Write {
        offset: Offset,
        size: Size,
        value: u64,
    },
    CtrlAltDel,
    Key(u16),
}

/// The expected state of the controller.
struct Model {
    buf: VecDeque<u8>,
    /// Command waiting for its data byte (status bit 3).
    pending: Option<u8>,
    control: u8,
    outp: u8,
    resets: u64,
    kbd_irqs: u64,
    missed_reads: u64,
    missed_writes: u64,
    invalid: u64,
}

impl Model {
    fn status(&self) -> u8 {
        let mut status = STR_KEYLOCK;
        if !self.buf.is_empty() {
            status |= STR_OBF;
        }
        if self.pending.is_some() {
            status |= STR_CMDDAT;
        }
        status
    }

    fn kbd_irq(&mut self) {
        if self.control & CTR_KBDINT != 0 {
            self.kbd_irqs += 1;
        }
    }

    /// Queues a reply to a controller or keyboard command, which drops
    /// whatever was still unread.
    fn reply(&mut self, byte: u8) {
        self.buf.clear();
        self.buf.push_back(byte);
    }

    fn key(&mut self, key: u16) -> Result<(), usize> {
        let [high, low] = key.to_be_bytes();
        let needed = if high != 0 { 2 } else { 1 };
        if BUF_SIZE - self.buf.len() < needed {
            return Err(needed);
        }
        if high != 0 {
            self.buf.push_back(high);
        }
        self.buf.push_back(low);
        self.kbd_irq();
        Ok(())
    }

    fn command(&mut self, command: u8) {
        match command {
            CMD_RESET_CPU => self.resets += 1,
            CMD_READ_CTR => self.reply(self.control),
            CMD_WRITE_CTR => {
                self.buf.clear();
                self.pending = Some(command);
            }
            CMD_READ_OUTP => self.reply(self.outp),
            CMD_WRITE_OUTP => self.pending = Some(command),
            _ => self.missed_writes += 1,
        }
    }

    fn data_write(&mut self, value: u8) {
        match self.pending.take() {
            Some(CMD_WRITE_CTR) => self.control = value,
            Some(CMD_WRITE_OUTP) => self.outp = value,
            Some(other) => unreachable!("command {other:#04x} never waits for data"),
            None => {
                self.reply(KBD_ACK);
                self.kbd_irq();
            }
        }
    }

    fn data_read(&mut self) -> u8 {
        let byte = self.buf.pop_front().unwrap_or(0);
        if !self.buf.is_empty() {
            self.kbd_irq();
        }
        byte
    }
}

fn read_eventfd(evt: &EventFd) -> u64 {
    match evt.read() {
        Ok(count) => count,
        Err(err) if err.kind() == io::ErrorKind::WouldBlock => 0,
        Err(err) => panic!("eventfd read: {err}"),
    }
}

fuzz_target!(|ops: Vec<Op>| {
    let reset = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    let kbd = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    let mut i8042 = I8042Device::new(
        EventFdTrigger::new(reset.try_clone().expect("eventfd clone")),
        EventFdTrigger::new(kbd.try_clone().expect("eventfd clone")),
    );
    let metrics = i8042.metrics();
    let mut model = Model {
        buf: VecDeque::new(),
        pending: None,
        control: DEFAULT_CTR,
        outp: 0,
        resets: 0,
        kbd_irqs: 0,
        missed_reads: 0,
        missed_writes: 0,
        invalid: 0,
    };

    for op in ops {
        match op {
            Op::Read { offset, size } => {
                let offset = offset.value();
                let mut data = [0x5au8; 8];
                let data = &mut data[..size.bytes()];
                BusDevice::read(&mut i8042, I8042_BASE, offset, data);
                if offset >= I8042_LEN || data.len() != 1 {
                    assert!(
                        data.iter().all(|b| *b == 0xff),
                        "invalid read gave {data:x?}"
                    );
                    model.invalid += 1;
                } else {
                    let expected = match offset {
                        OFS_DATA => model.data_read(),
                        OFS_STATUS => model.status(),
                        _ => {
                            model.missed_reads += 1;
                            0xff
                        }
                    };
                    assert_eq!(data[0], expected, "read of port {:#x}", I8042_BASE + offset);
                }
            }
            Op::Write {
                offset,
                size,
                value,
            } => {
                let offset = offset.value();
                let data = &value.to_le_bytes()[..size.bytes()];
                BusDevice::write(&mut i8042, I8042_BASE, offset, data);
                if offset >= I8042_LEN || data.len() != 1 {
                    model.invalid += 1;
                } else {
                    match offset {
                        OFS_DATA => model.data_write(data[0]),
                        OFS_STATUS => model.command(data[0]),
                        _ => model.missed_writes += 1,
                    }
                }
            }
            Op::CtrlAltDel => {
                let result = i8042.trigger_ctrl_alt_del();
                if BUF_SIZE - model.buf.len() < 4 {
                    match result {
                        Err(Error::InternalBufferFull { needed: 4, free }) => {
                            assert_eq!(free, BUF_SIZE - model.buf.len());
                        }
                        other => panic!("Ctrl+Alt+Del with a full buffer: {other:?}"),
                    }
                } else {
                    assert!(result.is_ok(), "Ctrl+Alt+Del: {result:?}");
                    for key in [KEY_CTRL, KEY_ALT, KEY_DEL] {
                        model.key(key).expect("room was checked");
                    }
                }
            }
            Op::Key(key) => match (i8042.trigger_key(key), model.key(key)) {
                (Ok(()), Ok(())) => {}
                (Err(Error::InternalBufferFull { needed, free }), Err(expected_needed)) => {
                    assert_eq!(needed, expected_needed);
                    assert_eq!(free, BUF_SIZE - model.buf.len());
                }
                (result, expected) => panic!("key {key:#06x}: {result:?}, expected {expected:?}"),
            },
        }

        assert_eq!(metrics.reset_count(), model.resets);
        assert_eq!(metrics.missed_read_count(), model.missed_reads);
        assert_eq!(metrics.missed_write_count(), model.missed_writes);
        assert_eq!(metrics.invalid_access_count(), model.invalid);
        assert_eq!(metrics.error_count(), 0);
    }

    assert_eq!(read_eventfd(&reset), model.resets, "reset signals");
    assert_eq!(read_eventfd(&kbd), model.kbd_irqs, "keyboard interrupts");
    // Drain the device and compare what is left with the model.
    for _ in 0..=BUF_SIZE {
        let mut byte = [0u8];
        BusDevice::read(&mut i8042, I8042_BASE, OFS_DATA, &mut byte);
        assert_eq!(byte[0], model.data_read(), "draining the output buffer");
    }
    let mut status = [0u8];
    BusDevice::read(&mut i8042, I8042_BASE, OFS_STATUS, &mut status);
    assert_eq!(status[0], model.status());
    let mut control = [0u8];
    BusDevice::write(&mut i8042, I8042_BASE, OFS_STATUS, &[CMD_READ_CTR]);
    BusDevice::read(&mut i8042, I8042_BASE, OFS_DATA, &mut control);
    assert_eq!(control[0], model.control, "control register");
});
