//! `--seccomp-filter FILE`: the user-supplied filter file, in Firecracker's
//! compiled format (bitcode since Firecracker 1.10, bincode before) or
//! seccompiler's JSON, through the same `Filters::from_bpf` /
//! `Filters::from_json` entry points `ember` uses.
//!
//! Checks: no panic, no unbounded allocation from lengths in the file, and
//! an accepted file never yields an empty program (that means "no filter")
//! or one longer than the kernel's limit.

#![no_main]

use ember_seccomp::{Filters, ThreadCategory, BPF_MAX_LEN};
use libfuzzer_sys::fuzz_target;

fn check(filters: &Filters) {
    for cat in ThreadCategory::ALL {
        if let Some(p) = filters.get(cat) {
            assert!(!p.is_empty(), "an empty program must mean no filter");
            assert!(p.len() <= BPF_MAX_LEN, "{} instructions", p.len());
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(filters) = Filters::from_bpf(data) {
        check(&filters);
    }
    // JSON is the other accepted format; only try it on plausible input so
    // the binary decoder gets most of the time.
    if data.first() == Some(&b'{') {
        if let Ok(filters) = Filters::from_json(data) {
            check(&filters);
        }
    }
});
