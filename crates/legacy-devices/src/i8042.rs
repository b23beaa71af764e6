// SPDX-License-Identifier: Apache-2.0

//! A minimal i8042 PS/2 controller, register-compatible with Firecracker's.
//!
//! It exists for two things: the guest ends the VM by writing the CPU-reset
//! command `0xFE` to port 0x64 (Linux `reboot=k`, the default on x86), and
//! the host asks the guest to shut down by injecting Ctrl+Alt+Del. Linux's
//! `i8042` driver also probes the control register at boot, so the command
//! byte (CTR) and output port registers are emulated too.
//!
//! Register and bit names follow Linux `drivers/input/serio/i8042.h`.

use std::num::Wrapping;
use std::sync::Arc;

use ember_metrics::{metric_group, Counter};
use vm_superio::Trigger;

/// Port-I/O base of the controller: the data port, 0x60.
pub const I8042_BASE: u64 = 0x60;
/// Ports 0x60-0x64: data at offset 0, status/command at offset 4.
pub const I8042_LEN: u64 = 5;
/// The keyboard interrupts on ISA IRQ 1 (IBM PC/AT assignment).
pub const I8042_KBD_GSI: u32 = 1;

/// Offset of the data port (0x60).
const OFS_DATA: u64 = 0;
/// Offset of the status (read) / command (write) port (0x64).
const OFS_STATUS: u64 = 4;

// Controller commands, written to port 0x64 (i8042.h `I8042_CMD_*`).
/// Read the control register (command byte) through the data port.
const CMD_READ_CTR: u8 = 0x20;
/// Write the control register: its value follows on the data port.
const CMD_WRITE_CTR: u8 = 0x60;
/// Read the output port through the data port.
const CMD_READ_OUTP: u8 = 0xD0;
/// Write the output port: its value follows on the data port.
const CMD_WRITE_OUTP: u8 = 0xD1;
/// Pulse the CPU reset line (Linux `arch/x86/kernel/reboot.c`, BOOT_KBD).
const CMD_RESET_CPU: u8 = 0xFE;

// Status register bits (i8042.h `I8042_STR_*`).
/// Output buffer full: a byte is waiting on port 0x60.
const SB_OUT_DATA_AVAIL: u8 = 0x01;
/// The last port write was to the command port; the data port now expects
/// that command's parameter.
const SB_I8042_CMD_DATA: u8 = 0x08;
/// Keyboard not inhibited (the "keylock" switch is off).
const SB_KBD_ENABLED: u8 = 0x10;

// Control register bits (i8042.h `I8042_CTR_*`).
/// Keyboard interrupt enabled.
const CB_KBD_INT: u8 = 0x01;
/// System flag: power-on self test passed.
const CB_POST_OK: u8 = 0x04;

/// The keyboard's answer to any command sent to it ("ACK").
const KBD_ACK: u8 = 0xFA;

/// Set-2 scan code of the left Ctrl key.
pub const KEY_CTRL: u16 = 0x0014;
/// Set-2 scan code of the left Alt key.
pub const KEY_ALT: u16 = 0x0011;
/// Set-2 scan code of Delete: extended, `0xE0 0x71`.
pub const KEY_DEL: u16 = 0xE071;

/// Size of the controller's output buffer, in bytes (as Firecracker).
pub const BUF_SIZE: usize = 16;

/// Errors from injecting keys.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The output buffer has no room for the key's bytes.
    #[error("i8042 output buffer full: {needed} byte(s) needed, {free} free of {BUF_SIZE}")]
    InternalBufferFull {
        /// Bytes the key (or key sequence) needs.
        needed: usize,
        /// Bytes free in the buffer.
        free: usize,
    },
    /// The keyboard interrupt trigger failed.
    #[error("could not trigger the i8042 keyboard interrupt: {0}")]
    KbdInterruptFailure(String),
}

metric_group! {
    /// Counters kept by an [`I8042Device`]: Firecracker's `i8042` group,
    /// then Ember's own `invalid_access_count`.
    #[derive(Debug, Default)]
    pub struct I8042Metrics {
        /// Reset or keyboard interrupt triggers that failed.
        error_count: Counter,
        /// Byte reads of ports 0x61-0x63, which the controller does not
        /// decode.
        missed_read_count: Counter,
        /// Byte writes of ports 0x61-0x63, or unsupported commands written
        /// to port 0x64.
        missed_write_count: Counter,
        /// CPU-reset commands the guest issued.
        reset_count: Counter,
        /// Accesses that were not one byte wide or fell outside the 5 ports.
        invalid_access_count: Counter,
    }
}

impl I8042Metrics {
    /// CPU-reset commands the guest issued.
    pub fn reset_count(&self) -> u64 {
        self.reset_count.count()
    }

    /// Byte reads of ports 0x61-0x63, which the controller does not decode.
    pub fn missed_read_count(&self) -> u64 {
        self.missed_read_count.count()
    }

    /// Byte writes of ports 0x61-0x63, or unsupported commands written to
    /// port 0x64.
    pub fn missed_write_count(&self) -> u64 {
        self.missed_write_count.count()
    }

    /// Accesses that were not one byte wide or fell outside the 5 ports.
    pub fn invalid_access_count(&self) -> u64 {
        self.invalid_access_count.count()
    }

    /// Reset or keyboard interrupt triggers that failed.
    pub fn error_count(&self) -> u64 {
        self.error_count.count()
    }

    fn inc(counter: &Counter) {
        counter.inc();
    }
}

/// Firecracker-compatible minimal i8042: data port at offset 0 (0x60),
/// status/command port at offset 4 (0x64).
///
/// `reset` is triggered when the guest writes `0xFE` to the command port;
/// `kbd_interrupt` raises IRQ 1 when a byte is queued for the guest and the
/// guest enabled the keyboard interrupt in the control register.
#[derive(Debug)]
pub struct I8042Device<R: Trigger, K: Trigger> {
    reset: R,
    kbd_interrupt: K,
    /// Status register (port 0x64 reads).
    status: u8,
    /// Control register ("command byte").
    control: u8,
    /// Output port.
    outp: u8,
    /// Last command written to port 0x64, waiting for its data byte.
    cmd: u8,
    /// Output buffer: a ring of `BUF_SIZE` bytes read through port 0x60.
    buf: [u8; BUF_SIZE],
    bhead: Wrapping<usize>,
    btail: Wrapping<usize>,
    metrics: Arc<I8042Metrics>,
}

/// The guest-visible state of an [`I8042Device`], for snapshots.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct I8042State {
    /// Status register.
    pub status: u8,
    /// Control register (command byte).
    pub control: u8,
    /// Output port.
    pub outp: u8,
    /// Command waiting for its data byte (0: none).
    pub cmd: u8,
    /// Bytes waiting in the output buffer, oldest first.
    pub buffer: Vec<u8>,
}

/// Why an [`I8042State`] was refused.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// More bytes than the output buffer holds.
    #[error("output buffer of {0} bytes, the controller holds {BUF_SIZE}")]
    BufferTooLong(usize),
    /// The status says data is available and the buffer is empty, or the
    /// other way round.
    #[error("status {status:#04x} does not match an output buffer of {len} bytes")]
    Status {
        /// Status register.
        status: u8,
        /// Bytes in the buffer.
        len: usize,
    },
}

impl<R: Trigger, K: Trigger> I8042Device<R, K> {
    /// The controller's registers and output buffer.
    pub fn save(&self) -> I8042State {
        let buffer = (0..self.buf_len())
            .map(|i| self.buf[(self.bhead + Wrapping(i)).0 % BUF_SIZE])
            .collect();
        I8042State {
            status: self.status,
            control: self.control,
            outp: self.outp,
            cmd: self.cmd,
            buffer,
        }
    }

    /// Puts a saved state back. The state is untrusted: a buffer longer
    /// than the controller's, or a status whose data-available bit does
    /// not match the buffer, is refused and nothing changes.
    pub fn restore(&mut self, state: &I8042State) -> Result<(), StateError> {
        let len = state.buffer.len();
        if len > BUF_SIZE {
            return Err(StateError::BufferTooLong(len));
        }
        if (state.status & SB_OUT_DATA_AVAIL != 0) != (len > 0) {
            return Err(StateError::Status {
                status: state.status,
                len,
            });
        }
        self.status = state.status;
        self.control = state.control;
        self.outp = state.outp;
        self.cmd = state.cmd;
        self.buf = [0; BUF_SIZE];
        self.buf[..len].copy_from_slice(&state.buffer);
        self.bhead = Wrapping(0);
        self.btail = Wrapping(len);
        Ok(())
    }

    /// A controller in its power-on state: keyboard enabled, keyboard
    /// interrupt enabled, POST passed, output buffer empty.
    pub fn new(reset: R, kbd_interrupt: K) -> Self {
        I8042Device {
            reset,
            kbd_interrupt,
            status: SB_KBD_ENABLED,
            control: CB_POST_OK | CB_KBD_INT,
            outp: 0,
            cmd: 0,
            buf: [0; BUF_SIZE],
            bhead: Wrapping(0),
            btail: Wrapping(0),
            metrics: Arc::new(I8042Metrics::default()),
        }
    }

    /// The device's counters, shared.
    pub fn metrics(&self) -> Arc<I8042Metrics> {
        self.metrics.clone()
    }

    /// Queues the Ctrl+Alt+Del key presses (set-2 scan codes `0x14`, `0x11`,
    /// `0xE0 0x71`) and raises the keyboard interrupt, asking the guest to
    /// shut down.
    ///
    /// Nothing is queued unless all 4 bytes fit.
    pub fn trigger_ctrl_alt_del(&mut self) -> Result<(), Error> {
        const SEQUENCE_LEN: usize = 4;
        let free = BUF_SIZE - self.buf_len();
        if free < SEQUENCE_LEN {
            return Err(Error::InternalBufferFull {
                needed: SEQUENCE_LEN,
                free,
            });
        }
        self.trigger_key(KEY_CTRL)?;
        self.trigger_key(KEY_ALT)?;
        self.trigger_key(KEY_DEL)?;
        Ok(())
    }

    /// Queues the set-2 scan code `key` (one byte, or two when the high byte
    /// is an extension prefix such as `0xE0`) and raises the keyboard
    /// interrupt if the guest enabled it.
    pub fn trigger_key(&mut self, key: u16) -> Result<(), Error> {
        let [high, low] = key.to_be_bytes();
        let needed = if high != 0 { 2 } else { 1 };
        let free = BUF_SIZE - self.buf_len();
        if free < needed {
            return Err(Error::InternalBufferFull { needed, free });
        }
        if high != 0 {
            self.push_byte(high);
        }
        self.push_byte(low);
        self.trigger_kbd_interrupt()
    }

    /// Raises IRQ 1 unless the guest masked it in the control register
    /// (a masked interrupt is not an error: the guest polls instead).
    fn trigger_kbd_interrupt(&self) -> Result<(), Error> {
        if self.control & CB_KBD_INT == 0 {
            log::debug!("i8042: keyboard interrupt disabled by the guest");
            return Ok(());
        }
        self.kbd_interrupt.trigger().map_err(|err| {
            I8042Metrics::inc(&self.metrics.error_count);
            Error::KbdInterruptFailure(format!("{err:?}"))
        })
    }

    /// Raises IRQ 1 on behalf of the guest; a failure is logged, since the
    /// guest cannot be told.
    fn trigger_kbd_interrupt_logged(&self) {
        if let Err(err) = self.trigger_kbd_interrupt() {
            log::warn!("i8042: {err}");
        }
    }

    /// Appends `byte` to the output buffer. Callers check for room first.
    fn push_byte(&mut self, byte: u8) {
        self.status |= SB_OUT_DATA_AVAIL;
        if self.buf_len() == BUF_SIZE {
            return;
        }
        self.buf[self.btail.0 % BUF_SIZE] = byte;
        self.btail += Wrapping(1);
    }

    fn pop_byte(&mut self) -> Option<u8> {
        if self.buf_len() == 0 {
            return None;
        }
        let byte = self.buf[self.bhead.0 % BUF_SIZE];
        self.bhead += Wrapping(1);
        if self.buf_len() == 0 {
            self.status &= !SB_OUT_DATA_AVAIL;
        }
        Some(byte)
    }

    /// Empties the output buffer, so that the reply to a controller command
    /// is the next byte the guest reads.
    fn flush_buf(&mut self) {
        self.bhead = Wrapping(0);
        self.btail = Wrapping(0);
        self.status &= !SB_OUT_DATA_AVAIL;
    }

    fn buf_len(&self) -> usize {
        (self.btail - self.bhead).0
    }

    fn write_command(&mut self, command: u8) -> bool {
        match command {
            CMD_RESET_CPU => {
                // The guest asserts the CPU reset line: this is how it ends
                // the VM. The VMM stops when the trigger fires.
                I8042Metrics::inc(&self.metrics.reset_count);
                if let Err(err) = self.reset.trigger() {
                    I8042Metrics::inc(&self.metrics.error_count);
                    log::error!("i8042: could not trigger the reset event: {err:?}");
                }
            }
            CMD_READ_CTR => {
                self.flush_buf();
                self.push_byte(self.control);
            }
            CMD_WRITE_CTR => {
                self.flush_buf();
                self.status |= SB_I8042_CMD_DATA;
                self.cmd = command;
            }
            CMD_READ_OUTP => {
                self.flush_buf();
                self.push_byte(self.outp);
            }
            CMD_WRITE_OUTP => {
                // Firecracker does not flush the buffer here.
                self.status |= SB_I8042_CMD_DATA;
                self.cmd = command;
            }
            _ => return false,
        }
        true
    }

    fn write_data(&mut self, value: u8) {
        if self.status & SB_I8042_CMD_DATA != 0 {
            // The parameter of the last controller command.
            match self.cmd {
                CMD_WRITE_CTR => self.control = value,
                CMD_WRITE_OUTP => self.outp = value,
                _ => {}
            }
            self.status &= !SB_I8042_CMD_DATA;
        } else {
            // A command for the keyboard itself; a dumb keyboard
            // acknowledges everything.
            self.flush_buf();
            self.push_byte(KBD_ACK);
            self.trigger_kbd_interrupt_logged();
        }
    }

    fn read_data(&mut self) -> u8 {
        // An empty buffer reads as 0, as in Firecracker.
        let byte = self.pop_byte().unwrap_or(0);
        // More bytes pending: interrupt again so the guest reads the next.
        if self.status & SB_OUT_DATA_AVAIL != 0 {
            self.trigger_kbd_interrupt_logged();
        }
        byte
    }

    fn invalid_access(&self, what: &str, offset: u64, size: usize) {
        I8042Metrics::inc(&self.metrics.invalid_access_count);
        log::debug!("i8042: invalid {what} of {size} byte(s) at offset {offset:#x}");
    }
}

impl<R, K> ember_bus::BusDevice for I8042Device<R, K>
where
    R: Trigger + Send,
    K: Trigger + Send,
{
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        let [byte] = data else {
            data.fill(0xff);
            self.invalid_access("read", offset, data.len());
            return;
        };
        match offset {
            OFS_STATUS => *byte = self.status,
            OFS_DATA => *byte = self.read_data(),
            _ if offset < I8042_LEN => {
                *byte = 0xff;
                I8042Metrics::inc(&self.metrics.missed_read_count);
            }
            _ => {
                *byte = 0xff;
                self.invalid_access("read", offset, 1);
            }
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let [value] = *data else {
            self.invalid_access("write", offset, data.len());
            return;
        };
        match offset {
            OFS_STATUS => {
                if !self.write_command(value) {
                    I8042Metrics::inc(&self.metrics.missed_write_count);
                    log::debug!("i8042: unsupported controller command {value:#04x}");
                }
            }
            OFS_DATA => self.write_data(value),
            _ if offset < I8042_LEN => I8042Metrics::inc(&self.metrics.missed_write_count),
            _ => self.invalid_access("write", offset, 1),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Mutex;

    use ember_bus::BusDevice;

    use super::*;

    /// Counts its triggers; fails when told to.
    #[derive(Clone, Default)]
    struct CountingTrigger {
        count: Arc<AtomicU64>,
        fail: Arc<AtomicBool>,
    }

    impl CountingTrigger {
        fn count(&self) -> u64 {
            self.count.load(Ordering::SeqCst)
        }
        /// Returns and resets the count.
        fn take(&self) -> u64 {
            self.count.swap(0, Ordering::SeqCst)
        }
    }

    impl Trigger for CountingTrigger {
        type E = &'static str;

        fn trigger(&self) -> Result<(), Self::E> {
            if self.fail.load(Ordering::SeqCst) {
                return Err("trigger broken");
            }
            self.count.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    type Device = I8042Device<CountingTrigger, CountingTrigger>;

    fn device() -> (Device, CountingTrigger, CountingTrigger) {
        let reset = CountingTrigger::default();
        let kbd = CountingTrigger::default();
        (I8042Device::new(reset.clone(), kbd.clone()), reset, kbd)
    }

    fn inb(dev: &mut Device, offset: u64) -> u8 {
        let mut data = [0u8];
        dev.read(I8042_BASE, offset, &mut data);
        data[0]
    }

    fn outb(dev: &mut Device, offset: u64, value: u8) {
        dev.write(I8042_BASE, offset, &[value]);
    }

    #[test]
    fn state_round_trip() {
        let (mut dev, _, _) = device();
        // A command byte in flight, a changed control register and two
        // bytes waiting, with the ring wrapped.
        for _ in 0..BUF_SIZE - 1 {
            dev.push_byte(0);
            dev.pop_byte();
        }
        outb(&mut dev, OFS_STATUS, CMD_WRITE_CTR);
        outb(&mut dev, OFS_DATA, CB_POST_OK);
        dev.push_byte(0x11);
        dev.push_byte(0x22);
        outb(&mut dev, OFS_STATUS, CMD_WRITE_OUTP);
        let saved = dev.save();
        assert_eq!(saved.buffer, [0x11, 0x22]);
        let text = serde_json::to_string(&saved).unwrap();
        let state: I8042State = serde_json::from_str(&text).unwrap();

        let (mut fresh, _, _) = device();
        fresh.restore(&state).unwrap();
        assert_eq!(fresh.save(), saved);
        // The same reads, and the pending command takes its data byte.
        for dev in [&mut dev, &mut fresh] {
            assert_ne!(inb(dev, OFS_STATUS) & SB_OUT_DATA_AVAIL, 0);
            assert_eq!(inb(dev, OFS_DATA), 0x11);
            assert_eq!(inb(dev, OFS_DATA), 0x22);
            assert_eq!(inb(dev, OFS_STATUS) & SB_OUT_DATA_AVAIL, 0);
            outb(dev, OFS_DATA, 0x03);
            outb(dev, OFS_STATUS, CMD_READ_OUTP);
            assert_eq!(inb(dev, OFS_DATA), 0x03);
            outb(dev, OFS_STATUS, CMD_READ_CTR);
            assert_eq!(inb(dev, OFS_DATA), CB_POST_OK);
        }
    }

    #[test]
    fn hostile_states_are_refused() {
        let (mut dev, _, _) = device();
        let before = dev.save();
        let long = I8042State {
            buffer: vec![0; BUF_SIZE + 1],
            status: SB_OUT_DATA_AVAIL,
            ..before.clone()
        };
        assert!(matches!(
            dev.restore(&long),
            Err(StateError::BufferTooLong(17))
        ));
        let lying = I8042State {
            status: SB_OUT_DATA_AVAIL,
            ..before.clone()
        };
        assert!(matches!(
            dev.restore(&lying),
            Err(StateError::Status { len: 0, .. })
        ));
        let hidden = I8042State {
            buffer: vec![1],
            ..before.clone()
        };
        assert!(dev.restore(&hidden).is_err());
        assert_eq!(dev.save(), before);
    }

    #[test]
    fn power_on_state() {
        let (mut dev, reset, kbd) = device();
        assert_eq!(inb(&mut dev, OFS_STATUS), SB_KBD_ENABLED);
        // Empty buffer reads as 0 and raises nothing.
        assert_eq!(inb(&mut dev, OFS_DATA), 0);
        outb(&mut dev, OFS_STATUS, CMD_READ_CTR);
        assert_eq!(inb(&mut dev, OFS_DATA), CB_POST_OK | CB_KBD_INT);
        assert_eq!(reset.count(), 0);
        assert_eq!(kbd.count(), 0);
    }

    #[test]
    fn reset_command_triggers_once_per_command() {
        let (mut dev, reset, kbd) = device();
        let metrics = dev.metrics();
        outb(&mut dev, OFS_STATUS, CMD_RESET_CPU);
        assert_eq!(reset.count(), 1);
        assert_eq!(metrics.reset_count(), 1);
        outb(&mut dev, OFS_STATUS, CMD_RESET_CPU);
        assert_eq!(reset.count(), 2);
        assert_eq!(metrics.reset_count(), 2);

        // 0xFE on the data port or at another offset is not a reset.
        outb(&mut dev, OFS_DATA, CMD_RESET_CPU);
        outb(&mut dev, 1, CMD_RESET_CPU);
        dev.write(I8042_BASE, OFS_STATUS, &[CMD_RESET_CPU, CMD_RESET_CPU]);
        assert_eq!(reset.count(), 2);
        assert_eq!(metrics.reset_count(), 2);
        assert_eq!(kbd.count(), 1); // the data-port write was acknowledged
    }

    #[test]
    fn failing_reset_trigger_is_counted() {
        let (mut dev, reset, _kbd) = device();
        reset.fail.store(true, Ordering::SeqCst);
        outb(&mut dev, OFS_STATUS, CMD_RESET_CPU);
        assert_eq!(dev.metrics().reset_count(), 1);
        assert_eq!(dev.metrics().error_count(), 1);
    }

    #[test]
    fn ctrl_alt_del_bytes_in_order_with_interrupts() {
        let (mut dev, _reset, kbd) = device();
        dev.trigger_ctrl_alt_del().unwrap();
        // One interrupt per key.
        assert_eq!(kbd.take(), 3);
        assert_ne!(inb(&mut dev, OFS_STATUS) & SB_OUT_DATA_AVAIL, 0);

        let expected = [0x14, 0x11, 0xE0, 0x71];
        for (i, want) in expected.iter().enumerate() {
            assert_eq!(inb(&mut dev, OFS_DATA), *want, "byte {i}");
            // While bytes remain, each read re-raises the interrupt.
            let more = i + 1 < expected.len();
            assert_eq!(kbd.take(), u64::from(more), "interrupt after byte {i}");
            assert_eq!(inb(&mut dev, OFS_STATUS) & SB_OUT_DATA_AVAIL != 0, more);
        }
        assert_eq!(inb(&mut dev, OFS_DATA), 0);
        assert_eq!(kbd.count(), 0);
    }

    #[test]
    fn ctrl_alt_del_respects_masked_interrupt() {
        let (mut dev, _reset, kbd) = device();
        outb(&mut dev, OFS_STATUS, CMD_WRITE_CTR);
        outb(&mut dev, OFS_DATA, CB_POST_OK); // keyboard interrupt off
        dev.trigger_ctrl_alt_del().unwrap();
        assert_eq!(kbd.count(), 0);
        // The guest can still poll the bytes.
        assert_ne!(inb(&mut dev, OFS_STATUS) & SB_OUT_DATA_AVAIL, 0);
        assert_eq!(inb(&mut dev, OFS_DATA), 0x14);
        assert_eq!(kbd.count(), 0);
    }

    #[test]
    fn failing_kbd_interrupt_is_reported() {
        let (mut dev, _reset, kbd) = device();
        kbd.fail.store(true, Ordering::SeqCst);
        let err = dev.trigger_key(KEY_CTRL).unwrap_err();
        assert!(matches!(err, Error::KbdInterruptFailure(_)));
        assert!(err.to_string().contains("trigger broken"), "{err}");
        assert_eq!(dev.metrics().error_count(), 1);
        // The byte was queued anyway.
        assert_eq!(inb(&mut dev, OFS_DATA), 0x14);
    }

    #[test]
    fn buffer_full() {
        let (mut dev, _reset, kbd) = device();
        for _ in 0..BUF_SIZE - 3 {
            dev.trigger_key(KEY_CTRL).unwrap();
        }
        assert_eq!(dev.buf_len(), BUF_SIZE - 3);
        // 3 bytes free: the 4-byte sequence is refused whole.
        match dev.trigger_ctrl_alt_del() {
            Err(Error::InternalBufferFull { needed: 4, free: 3 }) => {}
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(dev.buf_len(), BUF_SIZE - 3);

        dev.trigger_key(KEY_ALT).unwrap();
        dev.trigger_key(KEY_DEL).unwrap();
        assert_eq!(dev.buf_len(), BUF_SIZE);
        assert!(matches!(
            dev.trigger_key(KEY_CTRL),
            Err(Error::InternalBufferFull { needed: 1, free: 0 })
        ));
        assert!(matches!(
            dev.trigger_key(KEY_DEL),
            Err(Error::InternalBufferFull { needed: 2, free: 0 })
        ));
        assert_eq!(kbd.take(), (BUF_SIZE - 3 + 2) as u64);

        // Everything queued comes out in order, then the buffer is empty.
        for _ in 0..BUF_SIZE - 3 {
            assert_eq!(inb(&mut dev, OFS_DATA), 0x14);
        }
        assert_eq!(inb(&mut dev, OFS_DATA), 0x11);
        assert_eq!(inb(&mut dev, OFS_DATA), 0xE0);
        assert_eq!(inb(&mut dev, OFS_DATA), 0x71);
        assert_eq!(inb(&mut dev, OFS_STATUS) & SB_OUT_DATA_AVAIL, 0);
        assert_eq!(inb(&mut dev, OFS_DATA), 0);

        // The ring wraps around correctly.
        dev.trigger_ctrl_alt_del().unwrap();
        assert_eq!(inb(&mut dev, OFS_DATA), 0x14);
    }

    #[test]
    fn control_register_round_trip() {
        let (mut dev, _reset, kbd) = device();
        outb(&mut dev, OFS_STATUS, CMD_WRITE_CTR);
        assert_ne!(inb(&mut dev, OFS_STATUS) & SB_I8042_CMD_DATA, 0);
        outb(&mut dev, OFS_DATA, 0x52);
        assert_eq!(inb(&mut dev, OFS_STATUS) & SB_I8042_CMD_DATA, 0);
        outb(&mut dev, OFS_STATUS, CMD_READ_CTR);
        assert_ne!(inb(&mut dev, OFS_STATUS) & SB_OUT_DATA_AVAIL, 0);
        assert_eq!(inb(&mut dev, OFS_DATA), 0x52);
        assert_eq!(inb(&mut dev, OFS_STATUS) & SB_OUT_DATA_AVAIL, 0);
        // Controller command replies are polled, not interrupt-driven.
        assert_eq!(kbd.count(), 0);
    }

    #[test]
    fn read_ctr_replaces_pending_bytes() {
        let (mut dev, _reset, _kbd) = device();
        dev.trigger_ctrl_alt_del().unwrap();
        outb(&mut dev, OFS_STATUS, CMD_READ_CTR);
        assert_eq!(inb(&mut dev, OFS_DATA), CB_POST_OK | CB_KBD_INT);
        assert_eq!(inb(&mut dev, OFS_STATUS) & SB_OUT_DATA_AVAIL, 0);
    }

    #[test]
    fn output_port_round_trip() {
        let (mut dev, _reset, _kbd) = device();
        outb(&mut dev, OFS_STATUS, CMD_WRITE_OUTP);
        assert_ne!(inb(&mut dev, OFS_STATUS) & SB_I8042_CMD_DATA, 0);
        outb(&mut dev, OFS_DATA, 0xA5);
        outb(&mut dev, OFS_STATUS, CMD_READ_OUTP);
        assert_eq!(inb(&mut dev, OFS_DATA), 0xA5);
        // The control register was not touched.
        outb(&mut dev, OFS_STATUS, CMD_READ_CTR);
        assert_eq!(inb(&mut dev, OFS_DATA), CB_POST_OK | CB_KBD_INT);
    }

    #[test]
    fn keyboard_commands_are_acknowledged() {
        let (mut dev, _reset, kbd) = device();
        outb(&mut dev, OFS_DATA, 0xF4); // keyboard "enable scanning"
        assert_eq!(kbd.take(), 1);
        assert_ne!(inb(&mut dev, OFS_STATUS) & SB_OUT_DATA_AVAIL, 0);
        assert_eq!(inb(&mut dev, OFS_DATA), KBD_ACK);
        assert_eq!(kbd.count(), 0);
    }

    #[test]
    fn invalid_and_missed_accesses_are_counted() {
        let (mut dev, reset, kbd) = device();
        let metrics = dev.metrics();

        let mut wide = [1u8, 2];
        dev.read(I8042_BASE, OFS_DATA, &mut wide);
        assert_eq!(wide, [0xff; 2]);
        dev.write(I8042_BASE, OFS_STATUS, &[CMD_RESET_CPU, 0]);
        dev.write(I8042_BASE, OFS_STATUS, &[]);
        let mut byte = [0u8];
        dev.read(I8042_BASE, I8042_LEN, &mut byte);
        assert_eq!(byte, [0xff]);
        dev.write(I8042_BASE, u64::MAX, &[0]);
        assert_eq!(metrics.invalid_access_count(), 5);

        assert_eq!(inb(&mut dev, 1), 0xff);
        assert_eq!(inb(&mut dev, 3), 0xff);
        assert_eq!(metrics.missed_read_count(), 2);
        outb(&mut dev, 2, 0);
        outb(&mut dev, OFS_STATUS, 0xAA); // controller self-test: unsupported
        assert_eq!(metrics.missed_write_count(), 2);

        assert_eq!(reset.count(), 0);
        assert_eq!(kbd.count(), 0);
        assert_eq!(inb(&mut dev, OFS_STATUS), SB_KBD_ENABLED);
    }

    #[test]
    fn reset_through_a_bus() {
        let (dev, reset, _kbd) = device();
        let mut bus = ember_bus::Bus::new(ember_bus::BusKind::Pio);
        bus.insert(
            ember_bus::BusRange::new(I8042_BASE, I8042_LEN).unwrap(),
            Arc::new(Mutex::new(dev)),
        )
        .unwrap();
        assert!(bus.write(I8042_BASE + OFS_STATUS, &[CMD_RESET_CPU]));
        assert_eq!(reset.count(), 1);
    }

    #[test]
    fn eventfd_triggers_work() {
        use vmm_sys_util::eventfd::EventFd;

        use crate::EventFdTrigger;

        let reset = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let kbd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = I8042Device::new(
            EventFdTrigger::new(reset.try_clone().unwrap()),
            EventFdTrigger::new(kbd.try_clone().unwrap()),
        );
        dev.write(I8042_BASE, OFS_STATUS, &[CMD_RESET_CPU]);
        assert_eq!(reset.read().unwrap(), 1);
        dev.trigger_ctrl_alt_del().unwrap();
        assert_eq!(kbd.read().unwrap(), 3);
    }
}
