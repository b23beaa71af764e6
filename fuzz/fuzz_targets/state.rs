// SPDX-License-Identifier: Apache-2.0

//! Fuzzes the readers of saved machine state: a vCPU's
//! (`ember_vcpu::VcpuState`) and the interrupt controllers'
//! (`ember_irqchip::IrqChipState`), deserialized from JSON as a state file
//! holds them.
//!
//! Beyond "never panics": a state that is accepted serializes back to the
//! same JSON value it was read from, so nothing read is silently dropped.

#![no_main]

use ember_irqchip::IrqChipState;
use ember_vcpu::VcpuState;
use libfuzzer_sys::fuzz_target;

fn round_trip<T: serde::Serialize + serde::de::DeserializeOwned>(data: &[u8]) {
    let Ok(state) = serde_json::from_slice::<T>(data) else {
        return;
    };
    let again = serde_json::to_vec(&state).expect("an accepted state serializes");
    let state2: T = serde_json::from_slice(&again)
        .unwrap_or_else(|e| panic!("a serialized state is refused: {e}"));
    assert_eq!(
        serde_json::to_value(&state2).unwrap(),
        serde_json::to_value(&state).unwrap()
    );
}

fuzz_target!(|data: &[u8]| {
    match data.split_first() {
        Some((0, rest)) => round_trip::<VcpuState>(rest),
        Some((_, rest)) => round_trip::<IrqChipState>(rest),
        None => {}
    }
});
