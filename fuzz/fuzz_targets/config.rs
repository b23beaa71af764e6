// SPDX-License-Identifier: Apache-2.0

//! Fuzzes the `--config-file` parser, `ember_config::VmConfig::from_json`,
//! on arbitrary text (inputs that are not UTF-8 are skipped: the VMM reads
//! the file with `read_to_string`, which rejects them first).
//!
//! Beyond "never panics", a configuration that is accepted must survive a
//! round trip: serialised back to JSON, it parses and validates, and
//! serialises to the same JSON (ignored keys and an absent `is_read_only`,
//! written back as `false`, are the only things serialisation drops).

#![no_main]

use ember_config::VmConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = VmConfig::from_json(text) else {
        return;
    };
    let json = serde_json::to_string(&config).expect("an accepted config serialises");
    let reparsed = VmConfig::from_json(&json)
        .unwrap_or_else(|err| panic!("serialised config {json} is rejected: {err}"));
    assert!(reparsed.unknown_keys.is_empty(), "{json}");
    let again = serde_json::to_string(&reparsed).expect("a reparsed config serialises");
    assert_eq!(again, json, "round trip through {json}");
});
