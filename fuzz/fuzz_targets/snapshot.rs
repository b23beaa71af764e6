// SPDX-License-Identifier: Apache-2.0

//! Fuzzes `ember_snapshot::decode`, what `PUT /snapshot/load` and
//! `--describe-snapshot` run on a snapshot state file: hostile bytes.
//!
//! The first input byte chooses what the rest is: odd, a whole state file
//! (header, length and checksum checks); even, a body, which the target
//! wraps in a valid header and checksum so that the decoder and the state
//! validation see it (mutations rarely get past the checksum otherwise).
//!
//! Checked: no panic, no allocation beyond the input's size; a decoded
//! state validates, re-encodes, and decodes again to the same bytes; the
//! memory file check and the format version never panic.

#![no_main]

use ember_snapshot::{crc64, MAGIC, SNAPSHOT_VERSION};
use libfuzzer_sys::fuzz_target;

/// `body` in a state file with a valid header and checksum.
fn wrap(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 32);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&SNAPSHOT_VERSION.major.to_le_bytes());
    out.extend_from_slice(&SNAPSHOT_VERSION.minor.to_le_bytes());
    out.extend_from_slice(&SNAPSHOT_VERSION.patch.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(body);
    let crc = crc64(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&kind, rest)) = data.split_first() else {
        return;
    };
    let file = if kind & 1 == 1 {
        rest.to_vec()
    } else {
        wrap(rest)
    };
    let _ = ember_snapshot::format_version(&file);
    let Ok(state) = ember_snapshot::decode(&file) else {
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
