// SPDX-License-Identifier: Apache-2.0

//! Fuzzes the custom CPU template parser (`PUT /cpu-config`, the
//! `cpu-config` section): `ember_cpu_template::CustomCpuTemplate::from_json`
//! on arbitrary bytes, and the application of what it accepts.
//!
//! Checked: no panic; every bitmap forces only bits of its register's width
//! and has no value bit outside its filter; a template accepted prints back
//! (Firecracker's JSON format) to the same template; applied to a CPUID
//! table holding every leaf it names, it changes no bit outside the filters
//! of the modifiers of that leaf and register, and leaves the last
//! modifier's forced bits at its values; a leaf the table lacks is refused
//! naming that leaf; MSRs likewise.
//!
//! Input: the JSON text, as a client sends it.

#![no_main]

use std::collections::BTreeMap;

use ember_cpu_template::{ApplyError, CpuidEntry, CpuidRegister, CustomCpuTemplate};
use libfuzzer_sys::fuzz_target;

fn register(e: &CpuidEntry, r: CpuidRegister) -> u32 {
    match r {
        CpuidRegister::Eax => e.eax,
        CpuidRegister::Ebx => e.ebx,
        CpuidRegister::Ecx => e.ecx,
        CpuidRegister::Edx => e.edx,
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(template) = CustomCpuTemplate::from_json(data) else {
        return;
    };
    for leaf in &template.cpuid_modifiers {
        for m in &leaf.modifiers {
            assert_eq!(
                m.bitmap.filter >> 32,
                0,
                "a 32-bit bitmap forces bit 32 or above"
            );
            assert_eq!(m.bitmap.value & !m.bitmap.filter, 0);
        }
    }
    for m in &template.msr_modifiers {
        assert_eq!(m.bitmap.value & !m.bitmap.filter, 0);
    }
    let again = CustomCpuTemplate::from_value(template.to_value())
        .expect("a template printed back is read back");
    assert_eq!(again, template);

    // A table with every named leaf, all registers a pattern of both bit values.
    let start = CpuidEntry {
        flags: 0,
        eax: 0x5555_5555,
        ebx: 0xaaaa_aaaa,
        ecx: 0x0f0f_0f0f,
        edx: 0xf0f0_f0f0,
    };
    let mut table: BTreeMap<(u32, u32), CpuidEntry> = template
        .cpuid_modifiers
        .iter()
        .map(|l| ((l.leaf, l.subleaf), start))
        .collect();
    template
        .apply_cpuid(&mut table)
        .expect("every leaf is there");
    for (&(leaf, subleaf), entry) in &table {
        for r in [
            CpuidRegister::Eax,
            CpuidRegister::Ebx,
            CpuidRegister::Ecx,
            CpuidRegister::Edx,
        ] {
            let mods: Vec<_> = template
                .cpuid_modifiers
                .iter()
                .filter(|l| (l.leaf, l.subleaf) == (leaf, subleaf))
                .flat_map(|l| l.modifiers.iter())
                .filter(|m| m.register == r)
                .collect();
            let touched = mods
                .iter()
                .fold(0u32, |acc, m| acc | m.bitmap.filter as u32);
            let got = register(entry, r);
            assert_eq!(got & !touched, register(&start, r) & !touched);
            if let Some(last) = mods.last() {
                assert_eq!(got & last.bitmap.filter as u32, last.bitmap.value as u32);
            }
        }
    }
    if let Some(first) = template.cpuid_modifiers.first() {
        let mut without = table.clone();
        without.remove(&(first.leaf, first.subleaf));
        assert_eq!(
            template.apply_cpuid(&mut without),
            Err(ApplyError::CpuidNotSupported {
                leaf: first.leaf,
                subleaf: first.subleaf
            })
        );
    }

    let mut msrs: BTreeMap<u32, u64> = template.msr_addresses().map(|a| (a, u64::MAX)).collect();
    template.apply_msrs(&mut msrs).expect("every MSR is there");
    if let Some(last) = template.msr_modifiers.last() {
        let same: Vec<_> = template
            .msr_modifiers
            .iter()
            .filter(|m| m.addr == last.addr)
            .collect();
        let touched = same.iter().fold(0u64, |acc, m| acc | m.bitmap.filter);
        assert_eq!(msrs[&last.addr] & !touched, !touched);
        assert_eq!(msrs[&last.addr] & last.bitmap.filter, last.bitmap.value);
        msrs.remove(&last.addr);
        assert_eq!(
            template.apply_msrs(&mut msrs),
            Err(ApplyError::MsrNotSupported(last.addr))
        );
    }
});
