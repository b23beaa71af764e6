// SPDX-License-Identifier: Apache-2.0

//! Fuzzes the 16550A UART (`ember_legacy_devices::serial::SerialDevice`)
//! through the `ember_bus::BusDevice` entry points the vCPU threads use, with
//! host input fed by `enqueue_input` as the VMM's stdin handler does.
//!
//! A small model of the UART's data path is checked along the way: the
//! receive FIFO contents (host input and loopback), what reaches the output
//! sink, the data-ready bit of LSR, the metrics, and how often the
//! input-ready eventfd fires.

#![no_main]

use std::collections::VecDeque;
use std::io::{self, Write};

use arbitrary::Arbitrary;
use ember_bus::BusDevice;
use ember_legacy_devices::serial::{SerialDevice, COM1_BASE, COM1_LEN};
use ember_legacy_devices::EventFdTrigger;
use libfuzzer_sys::fuzz_target;
use vmm_sys_util::eventfd::EventFd;

// Register offsets and bits, PC16550D datasheet table 2 / 16550 LSR, MCR.
const RBR_THR: u8 = 0;
const LCR: u8 = 3;
const MCR: u8 = 4;
const LSR: u8 = 5;
const LCR_DLAB: u8 = 0x80;
const MCR_LOOP: u8 = 0x10;
const LSR_DATA_READY: u8 = 0x01;
const LSR_THR_EMPTY: u8 = 0x20;
/// vm-superio's receive FIFO size.
const FIFO_SIZE: usize = 64;
/// Power-on LCR and MCR values (vm-superio: 8N1, OUT2 set).
const DEFAULT_LCR: u8 = 0x03;
const DEFAULT_MCR: u8 = 0x08;

/// Output sink that records bytes and fails on demand.
#[derive(Default)]
struct Sink {
    bytes: Vec<u8>,
    failing: bool,
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.failing {
            return Err(io::Error::other("sink told to fail"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

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

/// Register offset from the UART base, as the bus computes it.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Offset {
    /// One of the 8 registers (taken modulo 8).
    Reg(u8),
    /// Any offset, mostly outside the device.
    Raw(u64),
}

impl Offset {
    fn value(self) -> u64 {
        match self {
            Offset::Reg(reg) => u64::from(reg) % COM1_LEN,
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
    /// Host input: `pattern` repeated to `len` bytes, so one call can
    /// overflow the 64-byte FIFO.
    Enqueue {
        pattern: [u8; 4],
        len: u8,
    },
    /// Make the output sink fail (or recover), like a closed stdout.
    SetOutputFailing(bool),
}

/// The expected state of the UART's data path.
struct Model {
    fifo: VecDeque<u8>,
    lcr: u8,
    mcr: u8,
    output: Vec<u8>,
    bytes_read: u64,
    missed_reads: u64,
    missed_writes: u64,
    invalid: u64,
    input_ready: u64,
}

fn read_eventfd(evt: &EventFd) -> u64 {
    match evt.read() {
        Ok(count) => count,
        Err(err) if err.kind() == io::ErrorKind::WouldBlock => 0,
        Err(err) => panic!("eventfd read: {err}"),
    }
}

fuzz_target!(|ops: Vec<Op>| {
    let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    let input_ready = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    let trigger = EventFdTrigger::new(irq.try_clone().expect("eventfd clone"));
    let mut uart = SerialDevice::new(trigger, Sink::default())
        .with_input_ready(input_ready.try_clone().expect("eventfd clone"));
    let metrics = uart.metrics();
    let mut model = Model {
        fifo: VecDeque::new(),
        lcr: DEFAULT_LCR,
        mcr: DEFAULT_MCR,
        output: Vec::new(),
        bytes_read: 0,
        missed_reads: 0,
        missed_writes: 0,
        invalid: 0,
        input_ready: 0,
    };

    for op in ops {
        match op {
            Op::Read { offset, size } => {
                let offset = offset.value();
                let mut data = [0x5au8; 8];
                let data = &mut data[..size.bytes()];
                BusDevice::read(&mut uart, COM1_BASE, offset, data);
                if offset >= COM1_LEN || data.len() != 1 {
                    assert!(
                        data.iter().all(|b| *b == 0xff),
                        "invalid read gave {data:x?}"
                    );
                    model.invalid += 1;
                    continue;
                }
                let value = data[0];
                match offset as u8 {
                    RBR_THR if model.lcr & LCR_DLAB == 0 => match model.fifo.pop_front() {
                        Some(byte) => {
                            assert_eq!(value, byte, "RBR returned the wrong byte");
                            model.bytes_read += 1;
                            if model.fifo.is_empty() {
                                model.input_ready += 1;
                            }
                        }
                        None => {
                            assert_eq!(value, 0, "RBR with an empty FIFO");
                            model.missed_reads += 1;
                        }
                    },
                    LCR => assert_eq!(value, model.lcr, "LCR read back"),
                    MCR => assert_eq!(value, model.mcr, "MCR read back"),
                    LSR => {
                        assert_eq!(
                            value & LSR_DATA_READY != 0,
                            !model.fifo.is_empty(),
                            "LSR {value:#04x} with {} byte(s) in the FIFO",
                            model.fifo.len()
                        );
                        assert_ne!(value & LSR_THR_EMPTY, 0, "THR never fills up");
                    }
                    _ => {}
                }
            }
            Op::Write {
                offset,
                size,
                value,
            } => {
                let offset = offset.value();
                let data = &value.to_le_bytes()[..size.bytes()];
                BusDevice::write(&mut uart, COM1_BASE, offset, data);
                if offset >= COM1_LEN || data.len() != 1 {
                    model.invalid += 1;
                    continue;
                }
                let byte = data[0];
                match offset as u8 {
                    RBR_THR if model.lcr & LCR_DLAB == 0 => {
                        if model.mcr & MCR_LOOP != 0 {
                            if model.fifo.len() < FIFO_SIZE {
                                model.fifo.push_back(byte);
                            }
                        } else if uart.writer().failing {
                            model.missed_writes += 1;
                        } else {
                            model.output.push(byte);
                        }
                    }
                    LCR => model.lcr = byte,
                    MCR => model.mcr = byte,
                    _ => {}
                }
            }
            Op::Enqueue { pattern, len } => {
                let bytes: Vec<u8> = pattern.iter().copied().cycle().take(len.into()).collect();
                let queued = uart.enqueue_input(&bytes).expect("enqueue_input");
                let expected = if model.mcr & MCR_LOOP != 0 {
                    0
                } else {
                    bytes.len().min(FIFO_SIZE - model.fifo.len())
                };
                assert_eq!(queued, expected, "enqueue_input of {} byte(s)", bytes.len());
                model.fifo.extend(&bytes[..queued]);
            }
            Op::SetOutputFailing(failing) => uart.writer_mut().failing = failing,
        }

        assert_eq!(uart.fifo_capacity(), FIFO_SIZE - model.fifo.len());
        assert_eq!(metrics.bytes_written(), model.output.len() as u64);
        assert_eq!(metrics.bytes_read(), model.bytes_read);
        assert_eq!(metrics.missed_read_count(), model.missed_reads);
        assert_eq!(metrics.missed_write_count(), model.missed_writes);
        assert_eq!(metrics.invalid_access_count(), model.invalid);
        assert_eq!(metrics.error_count(), 0);
    }

    assert_eq!(uart.writer().bytes, model.output, "guest output");
    assert_eq!(
        read_eventfd(&input_ready),
        model.input_ready,
        "input-ready signals"
    );
});
