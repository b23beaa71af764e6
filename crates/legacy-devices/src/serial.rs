// SPDX-License-Identifier: Apache-2.0

//! The 16550A UART behind the guest console (`console=ttyS0`).
//!
//! [`SerialDevice`] puts `vm_superio::Serial` on an [`ember_bus::Bus`]: it
//! checks the access shape, keeps [`SerialMetrics`], feeds host input to the
//! receive FIFO and tells the VMM when the guest has drained that FIFO.

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use ember_metrics::{metric_group, Counter};
use ember_rate_limiter::{Reduction, TokenBucket};
use serde::{Deserialize, Serialize};
use vm_superio::serial::{Error as UartError, SerialEvents, SerialState};
use vm_superio::Serial;
use vmm_sys_util::eventfd::EventFd;

use crate::EventFdTrigger;

/// Port-I/O base of COM1 (IBM PC/AT assignment, used by Linux's
/// `earlycon=uart8250,io,0x3f8` and `console=ttyS0`).
pub const COM1_BASE: u64 = 0x3f8;
/// A 16550 decodes 8 consecutive ports (TI PC16550D datasheet, table 2).
pub const COM1_LEN: u64 = 8;
/// COM1 interrupts on ISA IRQ 4 (IBM PC/AT assignment).
pub const COM1_GSI: u32 = 4;

/// Receiver buffer / transmitter holding register (divisor latch low when
/// LCR.DLAB is set). PC16550D datasheet, table 2.
const RBR_THR_OFFSET: u8 = 0;
/// Line control register.
const LCR_OFFSET: u8 = 3;
/// LCR bit 7, divisor latch access: offsets 0 and 1 address the baud
/// divisor instead of the data and IER registers.
const LCR_DLAB: u8 = 0x80;
/// vm-superio's power-on LCR value (8 data bits, DLAB clear).
const DEFAULT_LCR: u8 = 0x03;

/// Receive FIFO size of a 16550A, in bytes (vm-superio's `FIFO_SIZE`).
pub const FIFO_SIZE: usize = 64;

// Register values vm-superio's model can hold (PC16550D datasheet, tables
// 3-7); a restored state is checked against them.
/// IER bits of a 16550A (the upper four are reserved).
const IER_VALID_BITS: u8 = 0x0f;
/// IIR "no interrupt pending" bit.
const IIR_NONE: u8 = 0x01;
/// IIR transmitter-holding-register-empty and received-data-available
/// causes, the only ones the model raises.
const IIR_THR_EMPTY: u8 = 0x02;
/// IIR received-data-available cause.
const IIR_RDA: u8 = 0x04;
/// LSR data ready: the receive FIFO holds a byte.
const LSR_DATA_READY: u8 = 0x01;
/// LSR bits the model always shows: transmitter holding register empty and
/// transmitter idle (the virtual transmitter never backs up).
const LSR_TX_READY: u8 = 0x60;
/// MSR as the model shows it outside loopback: CTS, DSR and DCD asserted;
/// the guest cannot write it.
const MSR_DEFAULT: u8 = 0xb0;

/// How many lost output bytes are logged at `warn` level before falling back
/// to `debug`, so that a broken console cannot flood the log.
const LOST_BYTE_WARN_LIMIT: u64 = 5;

metric_group! {
    /// Counters kept by a [`SerialDevice`]: Firecracker's `uart` group, then
    /// Ember's own `invalid_access_count`.
    #[derive(Debug, Default)]
    pub struct SerialMetrics {
        /// Interrupts (or input-ready notifications) that could not be
        /// signalled.
        error_count: Counter,
        /// Guest reads of the receiver buffer while the receive FIFO was
        /// empty.
        missed_read_count: Counter,
        /// Bytes the guest wrote to the transmitter that were lost because
        /// the output failed.
        missed_write_count: Counter,
        /// Bytes of host input the guest read from the receive FIFO.
        read_count: Counter,
        /// Bytes the guest wrote to the transmitter that reached the output.
        write_count: Counter,
        /// Output bytes dropped because they exceeded the output limit.
        rate_limiter_dropped_bytes: Counter,
        /// Accesses that were not one byte wide or fell outside the 8
        /// registers.
        invalid_access_count: Counter,
    }
}

impl SerialMetrics {
    /// Bytes the guest wrote to the transmitter that the output took or the
    /// output limit dropped (as Firecracker counts `write_count`).
    pub fn bytes_written(&self) -> u64 {
        self.write_count.count()
    }

    /// Bytes of host input the guest read from the receive FIFO.
    pub fn bytes_read(&self) -> u64 {
        self.read_count.count()
    }

    /// Guest reads of the receiver buffer while the receive FIFO was empty.
    pub fn missed_read_count(&self) -> u64 {
        self.missed_read_count.count()
    }

    /// Bytes the guest wrote to the transmitter that were lost because the
    /// output failed.
    pub fn missed_write_count(&self) -> u64 {
        self.missed_write_count.count()
    }

    /// Output bytes dropped because they exceeded the output limit
    /// ([`SerialDevice::set_output_limit`]).
    pub fn rate_limiter_dropped_bytes(&self) -> u64 {
        self.rate_limiter_dropped_bytes.count()
    }

    /// Accesses that were not one byte wide or fell outside the 8 registers.
    pub fn invalid_access_count(&self) -> u64 {
        self.invalid_access_count.count()
    }

    /// Interrupts (or input-ready notifications) that could not be signalled.
    pub fn error_count(&self) -> u64 {
        self.error_count.count()
    }

    /// Counts one event and returns the new total.
    fn inc(counter: &Counter) -> u64 {
        counter.inc();
        counter.count()
    }
}

/// The guest-visible state of a [`SerialDevice`], for snapshots: every
/// register and the bytes waiting in the receive FIFO.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialDeviceState {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register (pending causes).
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Bytes waiting in the receive FIFO, oldest first.
    pub in_buffer: Vec<u8>,
}

impl From<SerialState> for SerialDeviceState {
    fn from(s: SerialState) -> Self {
        SerialDeviceState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialDeviceState> for SerialState {
    fn from(s: &SerialDeviceState) -> Self {
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

/// Why a [`SerialDeviceState`] was refused.
#[derive(Debug, thiserror::Error)]
pub enum SerialStateError {
    /// More bytes than the receive FIFO holds.
    #[error("receive FIFO of {0} bytes, the UART holds {FIFO_SIZE}")]
    FifoTooLong(usize),
    /// A register value the UART cannot hold.
    #[error("{register} {value:#04x} is not a value the UART can hold")]
    Register {
        /// Which register.
        register: &'static str,
        /// Its value.
        value: u8,
    },
    /// The line status or pending interrupts disagree with the receive FIFO.
    #[error(
        "line status {line_status:#04x} and interrupt identification {iir:#04x} do not match \
         a receive FIFO of {len} bytes"
    )]
    Fifo {
        /// Line status register.
        line_status: u8,
        /// Interrupt identification register.
        iir: u8,
        /// Bytes in the FIFO.
        len: usize,
    },
    /// The interrupt pending in the state could not be raised.
    #[error("could not raise the restored UART interrupt: {0}")]
    Interrupt(#[source] io::Error),
}

impl SerialDeviceState {
    /// Checks the state against what vm-superio's 16550A can reach: IER
    /// within its four bits, IIR either "none" or the THR-empty and
    /// received-data causes, LSR with the transmitter always ready and
    /// data-ready set exactly when the FIFO holds bytes, MSR as the model
    /// presents it (the guest cannot write it), and no more than
    /// [`FIFO_SIZE`] bytes waiting.
    pub fn validate(&self) -> Result<(), SerialStateError> {
        let len = self.in_buffer.len();
        if len > FIFO_SIZE {
            return Err(SerialStateError::FifoTooLong(len));
        }
        let register = |register, value| Err(SerialStateError::Register { register, value });
        if self.interrupt_enable & !IER_VALID_BITS != 0 {
            return register("interrupt enable", self.interrupt_enable);
        }
        let iir = self.interrupt_identification;
        let causes = IIR_THR_EMPTY | IIR_RDA;
        if iir != IIR_NONE && (iir & !causes != 0 || iir == 0) {
            return register("interrupt identification", iir);
        }
        if self.line_status & !LSR_DATA_READY != LSR_TX_READY {
            return register("line status", self.line_status);
        }
        if self.modem_status != MSR_DEFAULT {
            return register("modem status", self.modem_status);
        }
        // Data ready follows the FIFO; a received-data cause is dropped by
        // every read, so it is never pending with the FIFO empty.
        if (self.line_status & LSR_DATA_READY != 0) != (len > 0) || (iir & IIR_RDA != 0 && len == 0)
        {
            return Err(SerialStateError::Fifo {
                line_status: self.line_status,
                iir,
                len,
            });
        }
        Ok(())
    }
}

/// Receives vm-superio's serial events.
struct UartEvents {
    metrics: Arc<SerialMetrics>,
    /// Set by `in_buffer_empty`, consumed after each guest read.
    drained: AtomicBool,
}

impl SerialEvents for UartEvents {
    fn buffer_read(&self) {}

    fn out_byte(&self) {
        SerialMetrics::inc(&self.metrics.write_count);
    }

    fn tx_lost_byte(&self) {
        SerialMetrics::inc(&self.metrics.missed_write_count);
    }

    fn in_buffer_empty(&self) {
        self.drained.store(true, Ordering::Relaxed);
    }
}

/// The UART's output: the host sink behind an optional token bucket.
///
/// Bytes over the limit are dropped and counted, and reported written, so
/// the guest sees a transmitter that never stalls (Firecracker's
/// `SerialOut`).
struct Output<W: Write> {
    out: W,
    limit: Option<TokenBucket>,
    metrics: Arc<SerialMetrics>,
}

impl<W: Write> Write for Output<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(limit) = &mut self.limit {
            let len = u64::try_from(buf.len()).unwrap_or(u64::MAX);
            // A write larger than the whole bucket empties it and is
            // dropped, as Firecracker's console does.
            if limit.reduce(len, Instant::now()) != Reduction::Success {
                self.metrics.rate_limiter_dropped_bytes.add(len);
                return Ok(buf.len());
            }
        }
        self.out.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// A 16550A UART: `vm_superio::Serial<EventFdTrigger, _, W>` as a
/// [`BusDevice`](ember_bus::BusDevice).
///
/// Guest output goes to `out`, one `write_all` + `flush` per byte (done by
/// vm-superio), so it shows up on the host promptly. Host input is fed with
/// [`enqueue_input`](Self::enqueue_input).
pub struct SerialDevice<W: Write + Send> {
    serial: Serial<EventFdTrigger, UartEvents, Output<W>>,
    metrics: Arc<SerialMetrics>,
    input_ready: Option<EventFd>,
    /// Copy of LCR, to tell receiver-buffer reads from divisor-latch reads.
    line_control: u8,
}

impl<W: Write + Send> SerialDevice<W> {
    /// A UART in its power-on state that raises `interrupt` and writes the
    /// guest's output to `out`.
    pub fn new(interrupt: EventFdTrigger, out: W) -> Self {
        let metrics = Arc::new(SerialMetrics::default());
        let events = UartEvents {
            metrics: metrics.clone(),
            drained: AtomicBool::new(false),
        };
        let out = Output {
            out,
            limit: None,
            metrics: metrics.clone(),
        };
        SerialDevice {
            serial: Serial::with_events(interrupt, events, out),
            metrics,
            input_ready: None,
            line_control: DEFAULT_LCR,
        }
    }

    /// A UART in a saved state (see [`save`](Self::save)), raising
    /// `interrupt` and writing the guest's output to `out`.
    ///
    /// The state is untrusted and checked first
    /// ([`SerialDeviceState::validate`]). A pending interrupt whose cause
    /// is enabled is raised again, as the level the guest's interrupt
    /// controller saw. Metrics start from zero.
    pub fn from_state(
        state: &SerialDeviceState,
        interrupt: EventFdTrigger,
        out: W,
    ) -> Result<Self, SerialStateError> {
        state.validate()?;
        let metrics = Arc::new(SerialMetrics::default());
        let events = UartEvents {
            metrics: metrics.clone(),
            drained: AtomicBool::new(false),
        };
        let out = Output {
            out,
            limit: None,
            metrics: metrics.clone(),
        };
        let serial = Serial::from_state(&SerialState::from(state), interrupt, events, out)
            .map_err(|e| match e {
                UartError::Trigger(e) | UartError::IOError(e) => SerialStateError::Interrupt(e),
                UartError::FullFifo => SerialStateError::FifoTooLong(state.in_buffer.len()),
            })?;
        Ok(SerialDevice {
            serial,
            metrics,
            input_ready: None,
            line_control: state.line_control,
        })
    }

    /// The UART's registers and receive FIFO.
    pub fn save(&self) -> SerialDeviceState {
        self.serial.state().into()
    }

    /// Signals `evt` each time the guest reads the last byte out of the
    /// receive FIFO (vm-superio's `SerialEvents::in_buffer_empty`), so the
    /// VMM knows it can feed more input.
    pub fn with_input_ready(mut self, evt: EventFd) -> Self {
        self.input_ready = Some(evt);
        self
    }

    /// The device's counters, shared.
    pub fn metrics(&self) -> Arc<SerialMetrics> {
        self.metrics.clone()
    }

    /// Queues host input for the guest and raises the receive interrupt if
    /// the guest enabled it.
    ///
    /// Returns how many leading bytes of `bytes` fit in the FIFO; the caller
    /// offers the rest again later (after `input_ready` fires). Returns 0
    /// when the FIFO is full or the UART is in loopback mode. A failure to
    /// signal the interrupt is logged and counted, not returned, since the
    /// bytes are queued by then and must not be offered twice.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> io::Result<usize> {
        let room = self.serial.fifo_capacity();
        if bytes.is_empty() || room == 0 {
            return Ok(0);
        }
        match self.serial.enqueue_raw_bytes(bytes) {
            Ok(queued) => Ok(queued),
            Err(UartError::FullFifo) => Ok(0),
            Err(UartError::Trigger(err)) => {
                SerialMetrics::inc(&self.metrics.error_count);
                log::error!("serial: could not raise the receive interrupt: {err}");
                Ok(room.min(bytes.len()))
            }
            Err(UartError::IOError(err)) => Err(err),
        }
    }

    /// Free space in the receive FIFO, in bytes.
    pub fn fifo_capacity(&self) -> usize {
        self.serial.fifo_capacity()
    }

    /// The guest output sink.
    pub fn writer(&self) -> &W {
        &self.serial.writer().out
    }

    /// The guest output sink, mutably.
    pub fn writer_mut(&mut self) -> &mut W {
        &mut self.serial.writer_mut().out
    }

    /// Limits the guest's output to what `limit` lets through (`None`: no
    /// limit). Bytes over it are dropped and counted in
    /// [`SerialMetrics::rate_limiter_dropped_bytes`]; the guest still sees
    /// them sent.
    pub fn set_output_limit(&mut self, limit: Option<TokenBucket>) {
        self.serial.writer_mut().limit = limit;
    }

    /// The register `offset` addresses, if it is one of the eight.
    fn register(offset: u64) -> Option<u8> {
        u8::try_from(offset)
            .ok()
            .filter(|reg| u64::from(*reg) < COM1_LEN)
    }

    fn read_register(&mut self, reg: u8) -> u8 {
        let free_before = self.serial.fifo_capacity();
        let value = self.serial.read(reg);
        if reg != RBR_THR_OFFSET || self.line_control & LCR_DLAB != 0 {
            return value;
        }
        let drained = self.serial.events().drained.swap(false, Ordering::Relaxed);
        if self.serial.fifo_capacity() == free_before {
            SerialMetrics::inc(&self.metrics.missed_read_count);
            return value;
        }
        SerialMetrics::inc(&self.metrics.read_count);
        if drained {
            if let Some(evt) = &self.input_ready {
                if let Err(err) = evt.write(1) {
                    SerialMetrics::inc(&self.metrics.error_count);
                    log::error!("serial: could not signal that input can be fed: {err}");
                }
            }
        }
        value
    }

    fn write_register(&mut self, reg: u8, value: u8) {
        if reg == LCR_OFFSET {
            self.line_control = value;
        }
        match self.serial.write(reg, value) {
            Ok(()) => {}
            // Already counted through `tx_lost_byte`.
            Err(UartError::IOError(err)) => {
                if self.metrics.missed_write_count() <= LOST_BYTE_WARN_LIMIT {
                    log::warn!("serial: guest output byte {value:#04x} lost: {err}");
                } else {
                    log::debug!("serial: guest output byte {value:#04x} lost: {err}");
                }
            }
            Err(UartError::Trigger(err)) => {
                SerialMetrics::inc(&self.metrics.error_count);
                log::error!(
                    "serial: could not raise an interrupt after writing register {reg}: {err}"
                );
            }
            Err(UartError::FullFifo) => {}
        }
    }

    fn invalid_access(&self, what: &str, offset: u64, size: usize) {
        let count = SerialMetrics::inc(&self.metrics.invalid_access_count);
        log::debug!("serial: invalid {what} of {size} byte(s) at offset {offset:#x} (#{count})");
    }
}

impl<W: Write + Send> ember_bus::BusDevice for SerialDevice<W> {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        match (Self::register(offset), &mut *data) {
            (Some(reg), [byte]) => *byte = self.read_register(reg),
            _ => {
                data.fill(0xff);
                self.invalid_access("read", offset, data.len());
            }
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        match (Self::register(offset), data) {
            (Some(reg), [byte]) => self.write_register(reg, *byte),
            _ => self.invalid_access("write", offset, data.len()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use ember_bus::BusDevice;

    use super::*;

    const IER: u64 = 1;
    const IIR: u64 = 2;
    const LCR: u64 = 3;
    const LSR: u64 = 5;
    const SCR: u64 = 7;
    const LSR_DATA_READY: u8 = 0x01;
    const LSR_THR_EMPTY: u8 = 0x20;
    const LSR_TX_IDLE: u8 = 0x40;
    const IER_RDA: u8 = 0x01;
    const IIR_RDA: u8 = 0x04;
    const FIFO_SIZE: usize = 64;

    /// A writer the test can still read after handing it to the device.
    #[derive(Clone, Default)]
    struct SharedBuf(Arc<Mutex<Vec<u8>>>);

    impl Write for SharedBuf {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A writer that always fails.
    struct Broken;

    impl Write for Broken {
        fn write(&mut self, _buf: &[u8]) -> io::Result<usize> {
            Err(io::Error::new(io::ErrorKind::BrokenPipe, "closed"))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn eventfd() -> EventFd {
        EventFd::new(libc::EFD_NONBLOCK).unwrap()
    }

    /// Reads an eventfd counter without blocking; 0 when it was not signalled.
    fn count(evt: &EventFd) -> u64 {
        match evt.read() {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => panic!("eventfd read failed: {e}"),
        }
    }

    fn serial<W: Write + Send>(out: W) -> (SerialDevice<W>, EventFd) {
        let irq = eventfd();
        let dev = SerialDevice::new(EventFdTrigger::new(irq.try_clone().unwrap()), out);
        (dev, irq)
    }

    fn inb<W: Write + Send>(dev: &mut SerialDevice<W>, offset: u64) -> u8 {
        let mut data = [0u8];
        dev.read(COM1_BASE, offset, &mut data);
        data[0]
    }

    fn outb<W: Write + Send>(dev: &mut SerialDevice<W>, offset: u64, value: u8) {
        dev.write(COM1_BASE, offset, &[value]);
    }

    #[test]
    fn thr_writes_reach_the_writer() {
        let out = SharedBuf::default();
        let (mut dev, _irq) = serial(out.clone());
        for byte in b"hello\n" {
            outb(&mut dev, 0, *byte);
        }
        assert_eq!(out.0.lock().unwrap().as_slice(), b"hello\n");
        assert_eq!(dev.metrics().bytes_written(), 6);
        assert_eq!(dev.metrics().missed_write_count(), 0);
        assert_eq!(dev.writer().0.lock().unwrap().len(), 6);
    }

    #[test]
    fn output_over_the_limit_is_dropped_and_counted() {
        use ember_rate_limiter::BucketSpec;
        let out = SharedBuf::default();
        let (mut dev, irq) = serial(out.clone());
        // 4 bytes, then one every 1000 s: none more during the test.
        dev.set_output_limit(TokenBucket::new(
            BucketSpec {
                size: 4,
                one_time_burst: 0,
                refill_time_ms: 1_000_000,
            },
            Instant::now(),
        ));
        for byte in b"hello" {
            outb(&mut dev, 0, *byte);
        }
        assert_eq!(out.0.lock().unwrap().as_slice(), b"hell");
        assert_eq!(dev.metrics().rate_limiter_dropped_bytes(), 1);
        // Not lost as far as the guest can tell: the transmitter stays
        // ready and interrupts for a dropped byte as for a sent one.
        outb(&mut dev, IER, 0x02);
        inb(&mut dev, IIR);
        let _ = count(&irq);
        outb(&mut dev, 0, b'\n');
        assert_eq!(count(&irq), 1);
        assert_ne!(inb(&mut dev, LSR) & LSR_THR_EMPTY, 0);
        assert_eq!(dev.metrics().rate_limiter_dropped_bytes(), 2);
        assert_eq!(dev.metrics().missed_write_count(), 0);
        assert_eq!(dev.metrics().bytes_written(), 6);
        dev.set_output_limit(None);
        outb(&mut dev, 0, b'!');
        assert_eq!(out.0.lock().unwrap().as_slice(), b"hell!");
    }

    #[test]
    fn divisor_latch_writes_do_not_reach_the_writer() {
        let out = SharedBuf::default();
        let (mut dev, _irq) = serial(out.clone());
        outb(&mut dev, LCR, 0x80 | 0x03);
        outb(&mut dev, 0, 0x01); // divisor low byte: 115200 baud
        assert_eq!(inb(&mut dev, 0), 0x01);
        outb(&mut dev, LCR, 0x03);
        assert!(out.0.lock().unwrap().is_empty());
        assert_eq!(dev.metrics().missed_read_count(), 0);
        outb(&mut dev, 0, b'x');
        assert_eq!(out.0.lock().unwrap().as_slice(), b"x");
    }

    #[test]
    fn lost_output_is_counted() {
        let (mut dev, _irq) = serial(Broken);
        outb(&mut dev, 0, b'a');
        outb(&mut dev, 0, b'b');
        assert_eq!(dev.metrics().missed_write_count(), 2);
        assert_eq!(dev.metrics().bytes_written(), 0);
        // The transmitter still looks ready, so the guest is not stuck.
        assert_ne!(inb(&mut dev, LSR) & LSR_THR_EMPTY, 0);
    }

    #[test]
    fn lsr_reports_transmitter_empty() {
        let (mut dev, _irq) = serial(io::sink());
        let lsr = inb(&mut dev, LSR);
        assert_eq!(
            lsr & (LSR_THR_EMPTY | LSR_TX_IDLE),
            LSR_THR_EMPTY | LSR_TX_IDLE
        );
        assert_eq!(lsr & LSR_DATA_READY, 0);
        outb(&mut dev, 0, b'a');
        assert_ne!(inb(&mut dev, LSR) & LSR_THR_EMPTY, 0);
    }

    #[test]
    fn scratch_register_round_trip() {
        let (mut dev, irq) = serial(io::sink());
        for value in [0x00, 0x5a, 0xa5, 0xff] {
            outb(&mut dev, SCR, value);
            assert_eq!(inb(&mut dev, SCR), value);
        }
        assert_eq!(count(&irq), 0);
        assert_eq!(dev.metrics().invalid_access_count(), 0);
    }

    #[test]
    fn input_fifo_raises_the_interrupt() {
        let (mut dev, irq) = serial(io::sink());
        outb(&mut dev, IER, IER_RDA);
        assert_eq!(count(&irq), 0);

        assert_eq!(dev.enqueue_input(b"ok").unwrap(), 2);
        assert_eq!(count(&irq), 1);
        assert_eq!(dev.fifo_capacity(), FIFO_SIZE - 2);
        assert_ne!(inb(&mut dev, LSR) & LSR_DATA_READY, 0);
        assert_eq!(inb(&mut dev, IIR) & 0x0f, IIR_RDA);

        assert_eq!(inb(&mut dev, 0), b'o');
        assert_eq!(inb(&mut dev, 0), b'k');
        assert_eq!(inb(&mut dev, LSR) & LSR_DATA_READY, 0);
        assert_eq!(dev.metrics().bytes_read(), 2);
        assert_eq!(dev.fifo_capacity(), FIFO_SIZE);

        // Reading with nothing queued returns 0 and is counted as a miss.
        assert_eq!(inb(&mut dev, 0), 0);
        assert_eq!(dev.metrics().missed_read_count(), 1);
        assert_eq!(dev.metrics().bytes_read(), 2);
    }

    #[test]
    fn input_without_rx_interrupt_enabled_stays_quiet() {
        let (mut dev, irq) = serial(io::sink());
        assert_eq!(dev.enqueue_input(b"x").unwrap(), 1);
        assert_eq!(count(&irq), 0);
        assert_ne!(inb(&mut dev, LSR) & LSR_DATA_READY, 0);
    }

    #[test]
    fn input_beyond_fifo_capacity_is_refused() {
        let (mut dev, _irq) = serial(io::sink());
        let input = [b'z'; FIFO_SIZE + 10];
        assert_eq!(dev.enqueue_input(&input).unwrap(), FIFO_SIZE);
        assert_eq!(dev.fifo_capacity(), 0);
        assert_eq!(dev.enqueue_input(&input[FIFO_SIZE..]).unwrap(), 0);
        assert_eq!(dev.enqueue_input(&[]).unwrap(), 0);
        inb(&mut dev, 0);
        assert_eq!(dev.enqueue_input(&input[FIFO_SIZE..]).unwrap(), 1);
    }

    #[test]
    fn input_ready_fires_after_the_guest_drains() {
        let ready = eventfd();
        let (dev, _irq) = serial(io::sink());
        let mut dev = dev.with_input_ready(ready.try_clone().unwrap());

        dev.enqueue_input(b"abc").unwrap();
        assert_eq!(inb(&mut dev, 0), b'a');
        assert_eq!(inb(&mut dev, 0), b'b');
        assert_eq!(count(&ready), 0);
        assert_eq!(inb(&mut dev, 0), b'c');
        assert_eq!(count(&ready), 1);

        // Reading an already empty FIFO does not wake the VMM again.
        inb(&mut dev, 0);
        assert_eq!(count(&ready), 0);

        dev.enqueue_input(b"d").unwrap();
        assert_eq!(inb(&mut dev, 0), b'd');
        assert_eq!(count(&ready), 1);
    }

    #[test]
    fn invalid_offsets_and_sizes_are_counted() {
        let out = SharedBuf::default();
        let (mut dev, irq) = serial(out.clone());
        let mut wide = [0u8; 2];
        dev.read(COM1_BASE, 0, &mut wide);
        assert_eq!(wide, [0xff; 2]);
        let mut byte = [0u8];
        dev.read(COM1_BASE, 8, &mut byte);
        assert_eq!(byte, [0xff]);
        dev.read(COM1_BASE, u64::MAX, &mut byte);
        assert_eq!(byte, [0xff]);
        dev.read(COM1_BASE, 0, &mut []);
        dev.write(COM1_BASE, 0, b"ab");
        dev.write(COM1_BASE, 0x100, b"a");
        dev.write(COM1_BASE, 0, &[]);
        assert_eq!(dev.metrics().invalid_access_count(), 7);
        assert!(out.0.lock().unwrap().is_empty());
        assert_eq!(count(&irq), 0);
    }

    #[test]
    fn state_round_trip() {
        let (mut dev, _irq) = serial(io::sink());
        // Registers away from power-on, the divisor changed, interrupts
        // enabled and three bytes waiting with a cause pending.
        outb(&mut dev, LCR, LCR_DLAB | 0x03);
        outb(&mut dev, 0, 0x01);
        outb(&mut dev, IER, 0x00);
        outb(&mut dev, LCR, 0x1b);
        outb(&mut dev, 4, 0x0b);
        outb(&mut dev, SCR, 0x5a);
        outb(&mut dev, IER, IER_RDA);
        dev.enqueue_input(b"abc").unwrap();
        let saved = dev.save();
        assert_eq!(saved.in_buffer, b"abc");
        assert_eq!(saved.baud_divisor_low, 0x01);
        let text = serde_json::to_string(&saved).unwrap();
        let state: SerialDeviceState = serde_json::from_str(&text).unwrap();

        let irq = eventfd();
        let mut fresh = SerialDevice::from_state(
            &state,
            EventFdTrigger::new(irq.try_clone().unwrap()),
            io::sink(),
        )
        .unwrap();
        // The pending received-data interrupt is raised again.
        assert_eq!(count(&irq), 1);
        assert_eq!(fresh.save(), saved);
        assert_eq!(fresh.fifo_capacity(), dev.fifo_capacity());
        for dev in [&mut dev, &mut fresh] {
            assert_eq!(inb(dev, IER), IER_RDA);
            assert_eq!(inb(dev, LCR), 0x1b);
            assert_eq!(inb(dev, 4), 0x0b);
            assert_eq!(inb(dev, SCR), 0x5a);
            assert_eq!(inb(dev, IIR) & 0x0f, IIR_RDA);
            assert_ne!(inb(dev, LSR) & LSR_DATA_READY, 0);
            assert_eq!(inb(dev, 0), b'a');
            assert_eq!(inb(dev, 0), b'b');
            assert_eq!(inb(dev, 0), b'c');
            assert_eq!(inb(dev, LSR) & LSR_DATA_READY, 0);
            outb(dev, LCR, LCR_DLAB | 0x1b);
            assert_eq!(inb(dev, 0), 0x01);
        }
        assert_eq!(fresh.metrics().bytes_read(), 3);
    }

    #[test]
    fn hostile_states_are_refused() {
        let (dev, _irq) = serial(io::sink());
        let good = dev.save();
        let refused = |state: &SerialDeviceState| {
            let irq = eventfd();
            let result = SerialDevice::from_state(
                state,
                EventFdTrigger::new(irq.try_clone().unwrap()),
                io::sink(),
            );
            assert_eq!(count(&irq), 0, "a refused state raised an interrupt");
            result.err().expect("state accepted")
        };
        let long = SerialDeviceState {
            in_buffer: vec![0; FIFO_SIZE + 1],
            line_status: LSR_TX_READY | LSR_DATA_READY,
            ..good.clone()
        };
        assert!(matches!(refused(&long), SerialStateError::FifoTooLong(65)));
        let ier = SerialDeviceState {
            interrupt_enable: 0x10,
            ..good.clone()
        };
        assert!(matches!(
            refused(&ier),
            SerialStateError::Register {
                register: "interrupt enable",
                value: 0x10
            }
        ));
        for iir in [0x00, 0x03, 0x08, 0xc1] {
            let state = SerialDeviceState {
                interrupt_identification: iir,
                ..good.clone()
            };
            assert!(matches!(
                refused(&state),
                SerialStateError::Register { value, .. } if value == iir
            ));
        }
        let lsr = SerialDeviceState {
            line_status: 0x00,
            ..good.clone()
        };
        assert!(matches!(
            refused(&lsr),
            SerialStateError::Register {
                register: "line status",
                ..
            }
        ));
        let msr = SerialDeviceState {
            modem_status: 0xff,
            ..good.clone()
        };
        assert!(matches!(
            refused(&msr),
            SerialStateError::Register {
                register: "modem status",
                ..
            }
        ));
        let lying = SerialDeviceState {
            line_status: LSR_TX_READY | LSR_DATA_READY,
            ..good.clone()
        };
        assert!(matches!(
            refused(&lying),
            SerialStateError::Fifo { len: 0, .. }
        ));
        let hidden = SerialDeviceState {
            in_buffer: vec![1],
            ..good.clone()
        };
        assert!(matches!(
            refused(&hidden),
            SerialStateError::Fifo { len: 1, .. }
        ));
        let phantom_rda = SerialDeviceState {
            interrupt_identification: IIR_RDA,
            ..good.clone()
        };
        assert!(matches!(
            refused(&phantom_rda),
            SerialStateError::Fifo { iir: 0x04, .. }
        ));
        assert!(good.validate().is_ok());
    }

    #[test]
    fn works_on_a_bus() {
        let out = SharedBuf::default();
        let (dev, _irq) = serial(out.clone());
        let metrics = dev.metrics();
        let mut bus = ember_bus::Bus::new(ember_bus::BusKind::Pio);
        bus.insert(
            ember_bus::BusRange::new(COM1_BASE, COM1_LEN).unwrap(),
            Arc::new(Mutex::new(dev)),
        )
        .unwrap();
        assert!(bus.write(COM1_BASE, b"!"));
        assert!(bus.write(COM1_BASE + SCR, &[0x42]));
        let mut data = [0u8];
        assert!(bus.read(COM1_BASE + SCR, &mut data));
        assert_eq!(data, [0x42]);
        assert_eq!(out.0.lock().unwrap().as_slice(), b"!");
        assert_eq!(metrics.bytes_written(), 1);
    }
}
