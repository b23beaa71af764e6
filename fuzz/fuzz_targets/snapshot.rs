// SPDX-License-Identifier: Apache-2.0

//! Fuzzes `ember_snapshot::decode`, what `PUT /snapshot/load` and
//! `--describe-snapshot` run on a snapshot state file: hostile bytes.
//!
//! Checked: no panic, no allocation beyond the input's size; a decoded
//! state validates, re-encodes, and decodes again to the same bytes; the
//! memory file check and the format version never panic.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = ember_snapshot::format_version(data);
    let Ok(state) = ember_snapshot::decode(data) else {
        return;
    };
    let config = state.validate().expect("decode returned an invalid state");
    assert_eq!(
        usize::from(config.machine_config.vcpu_count),
        state.vcpus.len()
    );
    let len = state.memory_len();
    assert!(state.check_memory_file(len).is_ok());
    if len > 0 {
        assert!(state.check_memory_file(len - 1).is_err());
    }
    let bytes = ember_snapshot::encode(&state).expect("a decoded state encodes");
    let again = ember_snapshot::decode(&bytes).expect("a re-encoded state decodes");
    assert_eq!(
        ember_snapshot::encode(&again).expect("encodes"),
        bytes,
        "decode and encode are not inverse"
    );
});
