// SPDX-License-Identifier: Apache-2.0

//! Port-I/O and MMIO address buses.
//!
//! A [`Bus`] maps non-overlapping address ranges ([`BusRange`]) to devices and
//! dispatches guest accesses to them. A device sees each access as
//! `(base, offset, data)`: the base of the range it was registered at, the
//! offset of the access inside that range and the bytes moved.
//!
//! Devices implement either [`BusDevice`] (`&mut self`, the usual case: wrap
//! the device in a [`Mutex`] and the blanket impl turns it into a
//! [`BusDeviceSync`]) or [`BusDeviceSync`] directly (`&self`, for devices that
//! do their own locking and want concurrent access from several vCPUs).
//!
//! A bus is populated with `&mut self` before the VM starts, then frozen in an
//! [`Arc`] and shared by every vCPU thread. [`Bus::read`] and [`Bus::write`]
//! neither allocate nor lock (the device may lock itself): a lookup is one
//! binary search over the ranges, kept sorted in a contiguous array. A
//! microVM bus holds a handful of devices and is searched on every VM exit,
//! so this beats a tree, whose node walk costs more than the whole search.
//!
//! Accesses that no device fully covers are not errors (a guest may probe
//! absent hardware): writes are dropped, reads return
//! [`BusKind::unhandled_read_value`] (zero on the port-I/O bus, as
//! Firecracker's vCPU loop answers them; all-ones on MMIO, as an undriven
//! bus does), and both are counted ([`Bus::unhandled`]).
//!
//! # Example
//!
//! ```
//! use std::sync::{Arc, Mutex};
//!
//! use ember_bus::{Bus, BusDevice, BusKind, BusRange};
//!
//! /// One read/write byte register at every offset.
//! struct Scratch([u8; 8]);
//!
//! impl BusDevice for Scratch {
//!     fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
//!         for (i, byte) in data.iter_mut().enumerate() {
//!             *byte = self.0.get(offset as usize + i).copied().unwrap_or(0xff);
//!         }
//!     }
//!     fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
//!         for (i, byte) in data.iter().enumerate() {
//!             if let Some(reg) = self.0.get_mut(offset as usize + i) {
//!                 *reg = *byte;
//!             }
//!         }
//!     }
//! }
//!
//! # fn main() -> Result<(), ember_bus::Error> {
//! let mut bus = Bus::new(BusKind::Pio);
//! bus.insert(BusRange::new(0x3f8, 8)?, Arc::new(Mutex::new(Scratch([0; 8]))))?;
//! // Freeze the bus and share it with the vCPU threads.
//! let bus = Arc::new(bus);
//!
//! assert!(bus.write(0x3ff, &[0x5a]));
//! let mut data = [0u8; 1];
//! assert!(bus.read(0x3ff, &mut data));
//! assert_eq!(data, [0x5a]);
//!
//! // Nothing at 0x80: the read returns zero and is counted.
//! assert!(!bus.read(0x80, &mut data));
//! assert_eq!(data, [0]);
//! assert_eq!(bus.unhandled().reads, 1);
//! # Ok(())
//! # }
//! ```

#![deny(missing_docs)]

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

/// How many unhandled accesses of each direction are logged at `warn` level
/// before the bus falls back to `debug` only, so that a guest hammering an
/// absent port cannot flood the host log.
const UNHANDLED_WARN_LIMIT: u64 = 10;

/// Errors from building a [`Bus`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A range of length zero was requested.
    #[error("bus range at {base:#x} has length zero")]
    ZeroLength {
        /// Base address of the rejected range.
        base: u64,
    },
    /// `base + len` does not fit in a `u64`.
    #[error("bus range at {base:#x} with length {len:#x} overflows the 64-bit address space")]
    Overflow {
        /// Base address of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
    /// The new range shares at least one address with a registered device.
    #[error("{kind} range {new} overlaps existing device at {existing}")]
    Overlap {
        /// The bus the insertion was attempted on.
        kind: BusKind,
        /// The range that was being inserted.
        new: BusRange,
        /// The registered range it collides with.
        existing: BusRange,
    },
}

/// A device that handles accesses one at a time through `&mut self`.
///
/// Put it in a [`Mutex`] to register it on a [`Bus`]: `Mutex<T>` implements
/// [`BusDeviceSync`].
pub trait BusDevice: Send {
    /// Handles a guest read of `data.len()` bytes at `base + offset`; the
    /// device fills `data`.
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]);
    /// Handles a guest write of `data` at `base + offset`.
    fn write(&mut self, base: u64, offset: u64, data: &[u8]);
}

/// A device that handles accesses through `&self`, possibly from several
/// vCPU threads at once. This is what a [`Bus`] stores.
pub trait BusDeviceSync: Send + Sync {
    /// Handles a guest read of `data.len()` bytes at `base + offset`; the
    /// device fills `data`.
    fn read(&self, base: u64, offset: u64, data: &mut [u8]);
    /// Handles a guest write of `data` at `base + offset`.
    fn write(&self, base: u64, offset: u64, data: &[u8]);
}

impl<T: BusDevice> BusDeviceSync for Mutex<T> {
    fn read(&self, base: u64, offset: u64, data: &mut [u8]) {
        // A panic on another vCPU thread while it held the lock must not take
        // this device down too: the device state is plain registers, so keep
        // using it.
        self.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .read(base, offset, data)
    }

    fn write(&self, base: u64, offset: u64, data: &[u8]) {
        self.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .write(base, offset, data)
    }
}

impl<T: BusDeviceSync + ?Sized> BusDeviceSync for Arc<T> {
    fn read(&self, base: u64, offset: u64, data: &mut [u8]) {
        (**self).read(base, offset, data)
    }

    fn write(&self, base: u64, offset: u64, data: &[u8]) {
        (**self).write(base, offset, data)
    }
}

/// A non-empty range of bus addresses, `base..base + len`.
///
/// Displayed as `0x<first>-0x<last>` (both inclusive).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BusRange {
    base: u64,
    len: u64,
}

impl BusRange {
    /// Creates the range `base..base + len`.
    ///
    /// Fails when `len` is zero or `base + len` overflows a `u64`.
    pub fn new(base: u64, len: u64) -> Result<Self, Error> {
        if len == 0 {
            return Err(Error::ZeroLength { base });
        }
        if base.checked_add(len).is_none() {
            return Err(Error::Overflow { base, len });
        }
        Ok(BusRange { base, len })
    }

    /// First address of the range.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Number of addresses in the range (never zero).
    #[allow(clippy::len_without_is_empty)] // A BusRange is never empty.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Last address of the range (inclusive).
    pub fn last(&self) -> u64 {
        // `new` guarantees len >= 1 and base + len <= u64::MAX.
        self.base + (self.len - 1)
    }

    /// Whether `addr` lies inside the range.
    pub fn contains(&self, addr: u64) -> bool {
        self.base <= addr && addr <= self.last()
    }

    /// Whether the two ranges share at least one address.
    pub fn overlaps(&self, other: &BusRange) -> bool {
        self.base <= other.last() && other.base <= self.last()
    }

    /// Whether an access of `size` bytes starting at `addr` lies entirely
    /// inside the range.
    fn covers(&self, addr: u64, size: usize) -> bool {
        // One subtraction and two comparisons: this runs on every VM exit.
        // `addr < base` wraps to an offset >= len (len <= u64::MAX - base).
        let offset = addr.wrapping_sub(self.base);
        offset < self.len && u64::try_from(size).is_ok_and(|size| size <= self.len - offset)
    }
}

impl fmt::Display for BusRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}-{:#x}", self.base, self.last())
    }
}

/// The address space a [`Bus`] serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BusKind {
    /// x86 port I/O (`in`/`out` instructions), 16-bit addresses.
    Pio,
    /// Memory-mapped I/O.
    Mmio,
}

impl BusKind {
    /// The byte an unhandled read returns on this bus.
    ///
    /// Port I/O reads zero, as Firecracker's vCPU loop answers them: Linux
    /// probes absent legacy ports and must not mistake all-ones for a
    /// device. Its `rtc_cmos` probe reads the CMOS ports 0x70/0x71, and
    /// all-ones there (update-in-progress always set) keeps it polling for
    /// seconds on every boot. MMIO reads all-ones, as an undriven bus does.
    pub const fn unhandled_read_value(self) -> u8 {
        match self {
            BusKind::Pio => 0,
            BusKind::Mmio => 0xff,
        }
    }
}

impl fmt::Display for BusKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BusKind::Pio => "PIO",
            BusKind::Mmio => "MMIO",
        })
    }
}

/// How many guest accesses no device handled, per direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnhandledAccesses {
    /// Reads answered with [`BusKind::unhandled_read_value`] because no
    /// device covered them.
    pub reads: u64,
    /// Writes dropped because no device covered them.
    pub writes: u64,
}

/// A set of devices at non-overlapping address ranges.
pub struct Bus {
    kind: BusKind,
    /// Sorted by range base; ranges never overlap, so the entry with the
    /// greatest base `<= addr` is the only candidate for `addr`.
    devices: Vec<(BusRange, Arc<dyn BusDeviceSync>)>,
    unhandled_reads: AtomicU64,
    unhandled_writes: AtomicU64,
}

impl Bus {
    /// Creates an empty bus.
    pub fn new(kind: BusKind) -> Self {
        Bus {
            kind,
            devices: Vec::new(),
            unhandled_reads: AtomicU64::new(0),
            unhandled_writes: AtomicU64::new(0),
        }
    }

    /// Registers `device` at `range`.
    ///
    /// Fails with [`Error::Overlap`] if any address of `range` already
    /// belongs to a device; the bus is then unchanged.
    pub fn insert(&mut self, range: BusRange, device: Arc<dyn BusDeviceSync>) -> Result<(), Error> {
        // Only one neighbour can overlap: the last range starting at or
        // before `range.last()` (it covers everything that starts inside or
        // encloses `range`), because ranges on the bus are disjoint and
        // sorted.
        let after = self.entries_up_to(range.last());
        if let Some((existing, _)) = after.checked_sub(1).map(|i| &self.devices[i]) {
            if existing.overlaps(&range) {
                return Err(Error::Overlap {
                    kind: self.kind,
                    new: range,
                    existing: *existing,
                });
            }
        }
        // Every entry before `after` starts at or before `range.last()` and
        // does not overlap, so it ends before `range.base()`: inserting at
        // `after` keeps the array sorted.
        self.devices.insert(after, (range, device));
        Ok(())
    }

    /// Unregisters the device whose range starts at `base`.
    pub fn remove(&mut self, base: u64) -> Option<(BusRange, Arc<dyn BusDeviceSync>)> {
        let index = self
            .devices
            .binary_search_by_key(&base, |(range, _)| range.base())
            .ok()?;
        Some(self.devices.remove(index))
    }

    /// How many entries start at or before `addr`: the index of the first
    /// entry that starts after it.
    fn entries_up_to(&self, addr: u64) -> usize {
        self.devices
            .partition_point(|(range, _)| range.base() <= addr)
    }

    /// The device whose range contains `addr`, with that range.
    #[inline]
    pub fn device_at(&self, addr: u64) -> Option<(BusRange, &Arc<dyn BusDeviceSync>)> {
        let index = self.entries_up_to(addr).checked_sub(1)?;
        let (range, device) = self.devices.get(index)?;
        range.contains(addr).then_some((*range, device))
    }

    /// The device that covers all of `addr..addr + size`.
    #[inline]
    fn device_for(&self, addr: u64, size: usize) -> Option<(BusRange, &Arc<dyn BusDeviceSync>)> {
        let index = self.entries_up_to(addr).checked_sub(1)?;
        let (range, device) = self.devices.get(index)?;
        range.covers(addr, size).then_some((*range, device))
    }

    /// Dispatches a guest read of `data.len()` bytes at `addr`.
    ///
    /// Returns `false` when no single device covers the whole access: `data`
    /// is then filled with the bus's [`BusKind::unhandled_read_value`] and
    /// the access is counted in
    /// [`unhandled`](Self::unhandled).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        if let Some((range, device)) = self.device_for(addr, data.len()) {
            device.read(range.base(), addr - range.base(), data);
            return true;
        }
        data.fill(self.kind.unhandled_read_value());
        let seen = self.unhandled_reads.fetch_add(1, Ordering::Relaxed);
        self.log_unhandled(seen, "read", addr, data.len());
        false
    }

    /// Dispatches a guest write of `data` at `addr`.
    ///
    /// Returns `false` when no single device covers the whole access: the
    /// write is then dropped and counted in [`unhandled`](Self::unhandled).
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        if let Some((range, device)) = self.device_for(addr, data.len()) {
            device.write(range.base(), addr - range.base(), data);
            return true;
        }
        let seen = self.unhandled_writes.fetch_add(1, Ordering::Relaxed);
        self.log_unhandled(seen, "write", addr, data.len());
        false
    }

    // Off the hot path: guests rarely touch absent devices.
    #[cold]
    fn log_unhandled(&self, seen: u64, what: &str, addr: u64, size: usize) {
        if seen < UNHANDLED_WARN_LIMIT {
            log::warn!(
                "unhandled {} {what} of {size} byte(s) at {addr:#x}{}",
                self.kind,
                if seen + 1 == UNHANDLED_WARN_LIMIT {
                    " (further ones are logged at debug level)"
                } else {
                    ""
                }
            );
        } else {
            log::debug!(
                "unhandled {} {what} of {size} byte(s) at {addr:#x}",
                self.kind
            );
        }
    }

    /// Counts of accesses no device handled since the bus was created.
    pub fn unhandled(&self) -> UnhandledAccesses {
        UnhandledAccesses {
            reads: self.unhandled_reads.load(Ordering::Relaxed),
            writes: self.unhandled_writes.load(Ordering::Relaxed),
        }
    }

    /// The address space this bus serves.
    pub fn kind(&self) -> BusKind {
        self.kind
    }

    /// Number of registered devices.
    pub fn len(&self) -> usize {
        self.devices.len()
    }

    /// Whether no device is registered.
    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// The registered ranges, in ascending address order.
    pub fn ranges(&self) -> impl Iterator<Item = BusRange> + '_ {
        self.devices.iter().map(|(range, _)| *range)
    }
}

impl fmt::Debug for Bus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bus")
            .field("kind", &self.kind)
            .field("ranges", &self.ranges().collect::<Vec<_>>())
            .field("unhandled", &self.unhandled())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    /// Records the last access and answers reads with `offset + i`.
    #[derive(Default)]
    struct Recorder {
        last: Option<(u64, u64, Vec<u8>)>,
        reads: usize,
        writes: usize,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
            for (i, byte) in data.iter_mut().enumerate() {
                *byte = (offset as u8).wrapping_add(i as u8);
            }
            self.reads += 1;
            self.last = Some((base, offset, data.to_vec()));
        }

        fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
            self.writes += 1;
            self.last = Some((base, offset, data.to_vec()));
        }
    }

    fn range(base: u64, len: u64) -> BusRange {
        BusRange::new(base, len).unwrap()
    }

    fn recorder() -> Arc<Mutex<Recorder>> {
        Arc::new(Mutex::new(Recorder::default()))
    }

    #[test]
    fn range_rejects_zero_length_and_overflow() {
        assert!(matches!(
            BusRange::new(0x10, 0),
            Err(Error::ZeroLength { base: 0x10 })
        ));
        assert!(matches!(
            BusRange::new(u64::MAX, 1),
            Err(Error::Overflow {
                base: u64::MAX,
                len: 1
            })
        ));
        assert!(matches!(
            BusRange::new(1, u64::MAX),
            Err(Error::Overflow { .. })
        ));
        let r = BusRange::new(u64::MAX - 1, 1).unwrap();
        assert_eq!(r.last(), u64::MAX - 1);
        let r = BusRange::new(0, u64::MAX).unwrap();
        assert_eq!(r.last(), u64::MAX - 1);
    }

    #[test]
    fn range_accessors_and_edges() {
        let r = range(0x3f8, 8);
        assert_eq!(r.base(), 0x3f8);
        assert_eq!(r.len(), 8);
        assert_eq!(r.last(), 0x3ff);
        assert!(!r.contains(0x3f7));
        assert!(r.contains(0x3f8));
        assert!(r.contains(0x3ff));
        assert!(!r.contains(0x400));
        assert_eq!(r.to_string(), "0x3f8-0x3ff");
        assert!(r.covers(0x3f8, 8));
        assert!(r.covers(0x3ff, 1));
        assert!(!r.covers(0x3ff, 2));
        assert!(!r.covers(0x3f7, 1));
    }

    #[test]
    fn range_overlaps_every_kind() {
        let r = range(0x100, 0x10); // 0x100-0x10f
        let cases = [
            (range(0x100, 0x10), true),  // identical
            (range(0x104, 0x4), true),   // inside
            (range(0xf0, 0x11), true),   // straddles the start by one byte
            (range(0x10f, 0x10), true),  // straddles the end by one byte
            (range(0x0, 0x1000), true),  // encloses
            (range(0xf0, 0x10), false),  // ends right before
            (range(0x110, 0x10), false), // starts right after
        ];
        for (other, expected) in cases {
            assert_eq!(r.overlaps(&other), expected, "{r} vs {other}");
            assert_eq!(other.overlaps(&r), expected, "{other} vs {r}");
        }
    }

    #[test]
    fn kind_display() {
        assert_eq!(BusKind::Pio.to_string(), "PIO");
        assert_eq!(BusKind::Mmio.to_string(), "MMIO");
    }

    #[test]
    fn insert_rejects_every_kind_of_overlap() {
        let mut bus = Bus::new(BusKind::Mmio);
        let existing = range(0x1000, 0x100); // 0x1000-0x10ff
        bus.insert(existing, recorder()).unwrap();
        // A neighbour on each side, to check the search picks the right one.
        bus.insert(range(0x800, 0x100), recorder()).unwrap();
        bus.insert(range(0x2000, 0x100), recorder()).unwrap();

        let rejected = [
            range(0x1000, 0x100), // identical
            range(0x1010, 0x10),  // inside
            range(0xfff, 0x2),    // straddles the start
            range(0x10ff, 0x10),  // straddles the end
            range(0xf00, 0x400),  // encloses
            range(0x1000, 0x1),   // same base, shorter
        ];
        for new in rejected {
            match bus.insert(new, recorder()) {
                Err(Error::Overlap {
                    kind,
                    new: n,
                    existing: e,
                }) => {
                    assert_eq!(kind, BusKind::Mmio);
                    assert_eq!(n, new);
                    assert_eq!(e, existing);
                }
                other => panic!("{new} was not rejected: {other:?}"),
            }
        }
        // Enclosing two devices reports one of them.
        assert!(matches!(
            bus.insert(range(0x0, 0x10000), recorder()),
            Err(Error::Overlap { .. })
        ));
        assert_eq!(bus.len(), 3);

        // Exactly adjacent on both sides is fine.
        bus.insert(range(0xf00, 0x100), recorder()).unwrap();
        bus.insert(range(0x1100, 0x100), recorder()).unwrap();
        assert_eq!(bus.len(), 5);
    }

    #[test]
    fn overlap_error_message() {
        let mut bus = Bus::new(BusKind::Mmio);
        bus.insert(range(0xd000_0000, 0x1000), recorder()).unwrap();
        let err = bus
            .insert(range(0xd000_0800, 0x1000), recorder())
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "MMIO range 0xd0000800-0xd00017ff overlaps existing device at 0xd0000000-0xd0000fff"
        );
    }

    #[test]
    fn device_at_range_edges() {
        let mut bus = Bus::new(BusKind::Pio);
        assert!(bus.is_empty());
        bus.insert(range(0x3f8, 8), recorder()).unwrap();
        bus.insert(range(0x400, 4), recorder()).unwrap();
        assert_eq!(bus.len(), 2);
        assert!(!bus.is_empty());

        assert!(bus.device_at(0x3f7).is_none());
        assert_eq!(bus.device_at(0x3f8).unwrap().0, range(0x3f8, 8));
        assert_eq!(bus.device_at(0x3ff).unwrap().0, range(0x3f8, 8));
        assert_eq!(bus.device_at(0x400).unwrap().0, range(0x400, 4));
        assert_eq!(bus.device_at(0x403).unwrap().0, range(0x400, 4));
        assert!(bus.device_at(0x404).is_none());
        assert!(bus.device_at(0).is_none());
        assert!(bus.device_at(u64::MAX).is_none());
        assert_eq!(
            bus.ranges().collect::<Vec<_>>(),
            [range(0x3f8, 8), range(0x400, 4)]
        );
    }

    #[test]
    fn dispatch_passes_base_and_offset() {
        let dev = recorder();
        let mut bus = Bus::new(BusKind::Pio);
        bus.insert(range(0x3f8, 8), dev.clone()).unwrap();

        assert!(bus.write(0x3fb, &[0x80]));
        assert_eq!(dev.lock().unwrap().last, Some((0x3f8, 3, vec![0x80])));

        let mut data = [0u8; 2];
        assert!(bus.read(0x3fe, &mut data));
        assert_eq!(data, [6, 7]);
        assert_eq!(dev.lock().unwrap().last, Some((0x3f8, 6, vec![6, 7])));
        assert_eq!(bus.unhandled(), UnhandledAccesses::default());
    }

    #[test]
    fn access_straddling_device_end_is_unhandled() {
        let dev = recorder();
        let mut bus = Bus::new(BusKind::Mmio);
        bus.insert(range(0x1000, 0x10), dev.clone()).unwrap();
        // Another device right after: an access spanning both is still
        // unhandled, no device sees half of it.
        let next = recorder();
        bus.insert(range(0x1010, 0x10), next.clone()).unwrap();

        let mut data = [0u8; 4];
        assert!(!bus.read(0x100e, &mut data));
        assert_eq!(data, [0xff; 4]);
        assert!(!bus.write(0x100e, &[1, 2, 3, 4]));
        // The last byte alone is fine.
        assert!(bus.write(0x100f, &[9]));

        assert_eq!(dev.lock().unwrap().reads, 0);
        assert_eq!(dev.lock().unwrap().writes, 1);
        assert_eq!(next.lock().unwrap().writes, 0);
        assert_eq!(
            bus.unhandled(),
            UnhandledAccesses {
                reads: 1,
                writes: 1
            }
        );
    }

    #[test]
    fn unhandled_pio_reads_return_zero_and_are_counted() {
        let bus = Bus::new(BusKind::Pio);
        for n in 1..=20u64 {
            let mut data = [0xffu8, 0x12, 0x34, 0x56];
            assert!(!bus.read(0x80, &mut data));
            assert_eq!(data, [0; 4]);
            assert!(!bus.write(0x80, &[0]));
            assert_eq!(
                bus.unhandled(),
                UnhandledAccesses {
                    reads: n,
                    writes: n
                }
            );
        }
    }

    #[test]
    fn unhandled_mmio_reads_return_all_ones() {
        let bus = Bus::new(BusKind::Mmio);
        let mut data = [0u8; 4];
        assert!(!bus.read(0xd000_0000, &mut data));
        assert_eq!(data, [0xff; 4]);
        assert_eq!(bus.unhandled().reads, 1);
    }

    #[test]
    fn access_at_top_of_address_space_does_not_overflow() {
        let mut bus = Bus::new(BusKind::Mmio);
        bus.insert(range(u64::MAX - 0x10, 0x10), recorder())
            .unwrap();
        let mut data = [0u8; 8];
        assert!(bus.read(u64::MAX - 8, &mut data));
        assert!(!bus.read(u64::MAX - 7, &mut data));
        assert!(!bus.read(u64::MAX, &mut data));
    }

    #[test]
    fn remove_unregisters() {
        let dev = recorder();
        let mut bus = Bus::new(BusKind::Pio);
        bus.insert(range(0x60, 5), dev.clone()).unwrap();
        assert!(bus.remove(0x61).is_none());
        let (r, removed) = bus.remove(0x60).unwrap();
        assert_eq!(r, range(0x60, 5));
        assert!(bus.is_empty());
        assert!(!bus.write(0x60, &[1]));
        assert_eq!(dev.lock().unwrap().writes, 0);
        // The removed handle is the same device.
        removed.write(0x60, 0, &[1]);
        assert_eq!(dev.lock().unwrap().writes, 1);
        // The range is free again.
        bus.insert(range(0x60, 5), dev).unwrap();
    }

    #[test]
    fn out_of_order_inserts_and_removals_keep_lookups_exact() {
        // Inserted in scrambled order, with gaps and touching neighbours.
        let bases = [0x3f8u64, 0x20, 0x60, 0x40, 0x2f8, 0x64, 0x0, 0x80];
        let devices: Vec<_> = bases.iter().map(|_| recorder()).collect();
        let mut bus = Bus::new(BusKind::Pio);
        for (base, dev) in bases.iter().zip(&devices) {
            bus.insert(range(*base, 4), dev.clone()).unwrap();
        }
        let mut sorted = bases;
        sorted.sort_unstable();
        assert_eq!(
            bus.ranges().map(|r| r.base()).collect::<Vec<_>>(),
            sorted.to_vec()
        );
        let check = |bus: &Bus, present: &[u64]| {
            for (base, dev) in bases.iter().zip(&devices) {
                let before = dev.lock().unwrap().writes;
                let hit = bus.write(base + 3, &[0]);
                assert_eq!(hit, present.contains(base), "port {:#x}", base + 3);
                assert_eq!(dev.lock().unwrap().writes, before + usize::from(hit));
                // The address right past the 4 ports belongs to no device.
                if !bases.contains(&(base + 4)) {
                    assert!(bus.device_at(base + 4).is_none(), "{:#x}", base + 4);
                }
            }
        };
        check(&bus, &bases);
        // Remove from the middle, the front and the back.
        for base in [0x60, 0x0, 0x3f8] {
            assert_eq!(bus.remove(base).unwrap().0, range(base, 4));
        }
        check(&bus, &[0x20, 0x40, 0x2f8, 0x64, 0x80]);
        // Overlaps are still found against both neighbours of a gap.
        assert!(bus.insert(range(0x5e, 4), recorder()).is_ok());
        assert!(bus.insert(range(0x5c, 4), recorder()).is_err());
        assert!(bus.insert(range(0x62, 4), recorder()).is_err());
    }

    /// A `&self` device with its own synchronisation.
    #[derive(Default)]
    struct Counter(AtomicUsize);

    impl BusDeviceSync for Counter {
        fn read(&self, _base: u64, _offset: u64, data: &mut [u8]) {
            data.fill(self.0.load(Ordering::SeqCst) as u8);
        }
        fn write(&self, _base: u64, _offset: u64, _data: &[u8]) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn arc_blanket_impl_forwards() {
        let inner = Arc::new(Counter::default());
        let outer: Arc<Arc<Counter>> = Arc::new(inner.clone());
        let mut bus = Bus::new(BusKind::Mmio);
        bus.insert(range(0x1000, 4), outer).unwrap();
        assert!(bus.write(0x1000, &[0]));
        assert!(bus.write(0x1003, &[0]));
        assert_eq!(inner.0.load(Ordering::SeqCst), 2);
        let mut data = [0u8; 1];
        assert!(bus.read(0x1001, &mut data));
        assert_eq!(data, [2]);

        // `Arc<dyn BusDeviceSync>` itself is a `BusDeviceSync`.
        let dynamic: Arc<dyn BusDeviceSync> = inner.clone();
        BusDeviceSync::write(&dynamic, 0, 0, &[0]);
        assert_eq!(inner.0.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn mutex_blanket_impl_survives_poisoning() {
        let dev = recorder();
        let poisoner = dev.clone();
        let result = std::thread::spawn(move || {
            let _guard = poisoner.lock().unwrap();
            panic!("poison the lock");
        })
        .join();
        assert!(result.is_err());
        assert!(dev.is_poisoned());

        BusDeviceSync::write(&*dev, 0x10, 2, &[7]);
        let mut data = [0u8; 1];
        BusDeviceSync::read(&*dev, 0x10, 3, &mut data);
        assert_eq!(data, [3]);
        let guard = dev.lock().unwrap_or_else(PoisonError::into_inner);
        assert_eq!(guard.writes, 1);
        assert_eq!(guard.reads, 1);
    }

    #[test]
    fn bus_is_shared_between_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Bus>();

        let counter = Arc::new(Counter::default());
        let mut bus = Bus::new(BusKind::Pio);
        bus.insert(range(0x80, 1), counter.clone()).unwrap();
        let bus = Arc::new(bus);
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let bus = bus.clone();
                std::thread::spawn(move || {
                    for _ in 0..100 {
                        assert!(bus.write(0x80, &[0]));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(counter.0.load(Ordering::SeqCst), 400);
    }

    #[test]
    fn debug_lists_ranges() {
        let mut bus = Bus::new(BusKind::Pio);
        bus.insert(range(0x3f8, 8), recorder()).unwrap();
        let text = format!("{bus:?}");
        assert!(text.contains("Pio"), "{text}");
        assert!(text.contains("base: 1016"), "{text}");
    }
}
