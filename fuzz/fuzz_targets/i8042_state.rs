// SPDX-License-Identifier: Apache-2.0

//! Fuzzes `I8042Device::restore` with hostile states (a snapshot file is
//! untrusted), then drives the restored controller through its ports.
//!
//! Checked: no panic; a refused state changes nothing; an accepted one
//! saves back unchanged, and the guest reads exactly its buffered bytes
//! from the data port, oldest first, with the status bit following.

#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use ember_bus::BusDevice;
use ember_legacy_devices::i8042::{I8042Device, I8042State, I8042_BASE};
use ember_legacy_devices::EventFdTrigger;
use libfuzzer_sys::fuzz_target;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let Ok((status, control, outp, cmd)) = <(u8, u8, u8, u8)>::arbitrary(&mut u) else {
        return;
    };
    let Ok(buffer) = Vec::<u8>::arbitrary(&mut u) else {
        return;
    };
    let state = I8042State {
        status,
        control,
        outp,
        cmd,
        buffer,
    };
    let trigger = || EventFdTrigger::new(EventFd::new(EFD_NONBLOCK).unwrap());
    let mut dev = I8042Device::new(trigger(), trigger());
    let before = dev.save();
    if dev.restore(&state).is_err() {
        assert_eq!(dev.save(), before, "a refused state changed the device");
        return;
    }
    assert_eq!(dev.save(), state);
    for &expected in &state.buffer {
        let mut s = [0u8];
        dev.read(I8042_BASE, 4, &mut s);
        assert_ne!(s[0] & 1, 0, "data available");
        let mut b = [0u8];
        dev.read(I8042_BASE, 0, &mut b);
        assert_eq!(b[0], expected);
    }
    let mut s = [0u8];
    dev.read(I8042_BASE, 4, &mut s);
    assert_eq!(s[0] & 1, 0, "buffer drained");
    // Whatever command was pending takes a data byte without panicking.
    dev.write(I8042_BASE, 0, &[0x5a]);
});
