// SPDX-License-Identifier: Apache-2.0

//! Fuzzes `ember_bus::Bus`: guest reads and writes of 1, 2, 4 and 8 bytes,
//! interleaved with device insertions and removals, checked against a plain
//! model of the bus (a list of ranges and a sparse byte map).
//!
//! Properties checked after every operation:
//! - an access is dispatched iff one registered range covers all of it, and
//!   the device then sees the base it was registered at and an offset whose
//!   access stays inside its range;
//! - an unhandled read returns all-ones; unhandled accesses are counted;
//! - reads return what earlier writes stored (each device is a sparse RAM);
//! - `insert` fails iff the new range overlaps a registered one, with
//!   `Error::Overlap` naming a range that really overlaps, and leaves the bus
//!   unchanged on failure; `BusRange::new` rejects exactly the zero-length
//!   and overflowing ranges.

#![no_main]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use arbitrary::Arbitrary;
use ember_bus::{Bus, BusDevice, BusKind, BusRange, Error, UnhandledAccesses};
use libfuzzer_sys::fuzz_target;

/// Devices present before the first operation: at the bottom of the address
/// space, on the PIO-style COM1 ports, on an MMIO page, and at the very top
/// of the 64-bit space (where `base + len` arithmetic overflows first).
const FIXED: [(u64, u64); 4] = [
    (0, 1),
    (0x3f8, 8),
    (0xd000_0000, 0x1000),
    (u64::MAX - 0x10, 0x10),
];

/// A sparse RAM that checks every access the bus hands it.
struct Ram {
    range: BusRange,
    bytes: BTreeMap<u64, u8>,
}

impl Ram {
    fn check(&self, base: u64, offset: u64, len: usize) {
        assert_eq!(base, self.range.base(), "device got the wrong base");
        let end = offset
            .checked_add(len as u64)
            .expect("offset + len overflows");
        assert!(
            end <= self.range.len(),
            "access at offset {offset:#x} of {len} byte(s) leaves {}",
            self.range
        );
    }
}

impl BusDevice for Ram {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        self.check(base, offset, data.len());
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = self.bytes.get(&(offset + i as u64)).copied().unwrap_or(0);
        }
    }

    fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
        self.check(base, offset, data.len());
        for (i, byte) in data.iter().enumerate() {
            self.bytes.insert(offset + i as u64, *byte);
        }
    }
}

/// Access width: what KVM reports for PIO and MMIO exits.
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

/// An address, usually near a registered range so that edges get hit.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Addr {
    /// `delta` bytes from the base of the `index`-th registered range
    /// (modulo the number of ranges), wrapping around the address space.
    Near { index: u8, delta: i16 },
    /// `delta` bytes from the last address of the `index`-th range.
    NearEnd { index: u8, delta: i16 },
    /// Any address.
    Raw(u64),
}

/// A range length, usually small.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Len {
    Small(u8),
    Raw(u64),
}

#[derive(Arbitrary, Debug)]
enum Op {
    Read { addr: Addr, size: Size },
    Write { addr: Addr, size: Size, value: u64 },
    Insert { base: Addr, len: Len },
    Remove { base: Addr },
}

/// What the bus should look like.
#[derive(Default)]
struct Model {
    /// Registered ranges, keyed by base.
    ranges: BTreeMap<u64, BusRange>,
    /// Bytes written through the bus, by absolute address.
    bytes: BTreeMap<u64, u8>,
    unhandled: UnhandledAccesses,
}

impl Model {
    fn resolve(&self, addr: Addr) -> u64 {
        let pick = |index: u8| {
            let n = self.ranges.len();
            (n > 0).then(|| *self.ranges.values().nth(usize::from(index) % n).unwrap())
        };
        match addr {
            Addr::Near { index, delta } => pick(index)
                .map_or(0, |r| r.base())
                .wrapping_add_signed(i64::from(delta)),
            Addr::NearEnd { index, delta } => pick(index)
                .map_or(u64::MAX, |r| r.last())
                .wrapping_add_signed(i64::from(delta)),
            Addr::Raw(addr) => addr,
        }
    }

    /// The range that covers all of `addr..addr + size`, if any.
    fn covering(&self, addr: u64, size: usize) -> Option<BusRange> {
        let last = addr.checked_add(size as u64 - 1)?;
        self.ranges
            .values()
            .find(|r| r.contains(addr) && r.contains(last))
            .copied()
    }

    fn insert(&mut self, bus: &mut Bus, range: BusRange) {
        let ram = Arc::new(Mutex::new(Ram {
            range,
            bytes: BTreeMap::new(),
        }));
        let overlapping: Vec<BusRange> = self
            .ranges
            .values()
            .filter(|r| r.overlaps(&range))
            .copied()
            .collect();
        match bus.insert(range, ram) {
            Ok(()) => {
                assert!(
                    overlapping.is_empty(),
                    "{range} was accepted although it overlaps {overlapping:?}"
                );
                self.ranges.insert(range.base(), range);
            }
            Err(Error::Overlap {
                kind,
                new,
                existing,
            }) => {
                assert_eq!(kind, BusKind::Mmio);
                assert_eq!(new, range);
                assert!(
                    overlapping.contains(&existing),
                    "{range} rejected because of {existing}, overlapping ranges are {overlapping:?}"
                );
            }
            Err(err) => panic!("insert of valid range {range} failed with {err}"),
        }
    }
}

fuzz_target!(|ops: Vec<Op>| {
    let mut bus = Bus::new(BusKind::Mmio);
    let mut model = Model::default();
    for (base, len) in FIXED {
        let range = BusRange::new(base, len).expect("fixed ranges are valid");
        model.insert(&mut bus, range);
    }

    for op in ops {
        match op {
            Op::Read { addr, size } => {
                let addr = model.resolve(addr);
                let size = size.bytes();
                let mut data = [0x5au8; 8];
                let data = &mut data[..size];
                let handled = bus.read(addr, data);
                match model.covering(addr, size) {
                    Some(_) => {
                        assert!(handled, "read of {size} at {addr:#x} not dispatched");
                        for (i, byte) in data.iter().enumerate() {
                            let expected = model.bytes.get(&(addr + i as u64)).copied();
                            assert_eq!(
                                *byte,
                                expected.unwrap_or(0),
                                "byte {i} of read at {addr:#x}"
                            );
                        }
                    }
                    None => {
                        assert!(!handled, "read of {size} at {addr:#x} dispatched");
                        assert!(
                            data.iter().all(|b| *b == 0xff),
                            "unhandled read gave {data:x?}"
                        );
                        model.unhandled.reads += 1;
                    }
                }
                let at = bus.device_at(addr).map(|(r, _)| r);
                let expected_at = model.ranges.values().find(|r| r.contains(addr)).copied();
                assert_eq!(at, expected_at, "device_at({addr:#x})");
            }
            Op::Write { addr, size, value } => {
                let addr = model.resolve(addr);
                let size = size.bytes();
                let data = &value.to_le_bytes()[..size];
                let handled = bus.write(addr, data);
                match model.covering(addr, size) {
                    Some(_) => {
                        assert!(handled, "write of {size} at {addr:#x} not dispatched");
                        for (i, byte) in data.iter().enumerate() {
                            model.bytes.insert(addr + i as u64, *byte);
                        }
                    }
                    None => {
                        assert!(!handled, "write of {size} at {addr:#x} dispatched");
                        model.unhandled.writes += 1;
                    }
                }
            }
            Op::Insert { base, len } => {
                let base = model.resolve(base);
                let len = match len {
                    Len::Small(len) => u64::from(len),
                    Len::Raw(len) => len,
                };
                match BusRange::new(base, len) {
                    Ok(range) => {
                        assert!(len != 0 && base.checked_add(len).is_some());
                        model.insert(&mut bus, range);
                    }
                    Err(Error::ZeroLength { base: b }) => {
                        assert_eq!((b, len), (base, 0));
                    }
                    Err(Error::Overflow { base: b, len: l }) => {
                        assert_eq!((b, l), (base, len));
                        assert!(len != 0 && base.checked_add(len).is_none());
                    }
                    Err(err) => panic!("BusRange::new({base:#x}, {len:#x}): {err}"),
                }
            }
            Op::Remove { base } => {
                let base = model.resolve(base);
                let removed = bus.remove(base).map(|(r, _)| r);
                let expected = model.ranges.remove(&base);
                assert_eq!(removed, expected, "remove({base:#x})");
                if let Some(range) = expected {
                    // A later device at this range starts with empty RAM.
                    model.bytes.retain(|addr, _| !range.contains(*addr));
                }
            }
        }

        assert_eq!(bus.unhandled(), model.unhandled);
        assert_eq!(bus.len(), model.ranges.len());
        assert!(bus.ranges().eq(model.ranges.values().copied()), "{bus:?}");
    }
});
