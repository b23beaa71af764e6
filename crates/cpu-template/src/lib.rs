//! Firecracker's CPU templates for x86_64: what the guest sees of the host CPU, changed
//! bit by bit in CPUID leaves and model-specific registers.
//!
//! A [`CustomCpuTemplate`] is read from Firecracker's JSON format (`PUT /cpu-config`, the
//! `cpu-config` section of a configuration file); a [`StaticCpuTemplate`]
//! (`machine-config.cpu_template`) names one built in. Either is applied to the CPUID
//! table KVM supports ([`CustomCpuTemplate::apply_cpuid`]) and to the values of the MSRs
//! it names ([`CustomCpuTemplate::apply_msrs`]) before the VMM hands them to each vCPU.
//! Nothing here talks to KVM, so the parser can be fuzzed and tested alone.
//!
//! # Example
//!
//! ```
//! use std::collections::BTreeMap;
//!
//! use ember_cpu_template::{CpuidEntry, CustomCpuTemplate};
//!
//! // Hide RDRAND (CPUID.01H:ECX[30]) from the guest.
//! let template = CustomCpuTemplate::from_json(
//!     br#"{"cpuid_modifiers": [{"leaf": "0x1", "subleaf": "0x0", "flags": 0,
//!          "modifiers": [{"register": "ecx", "bitmap": "0bx0xxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}]}]}"#,
//! )
//! .unwrap();
//! let mut cpuid = BTreeMap::from([((1, 0), CpuidEntry { ecx: u32::MAX, ..Default::default() })]);
//! template.apply_cpuid(&mut cpuid).unwrap();
//! assert_eq!(cpuid[&(1, 0)].ecx, !(1 << 30));
//! ```

#![deny(missing_docs)]

mod bitmap;
mod static_templates;

use std::collections::BTreeMap;

pub use bitmap::Bitmap;
use serde::{Deserialize, Serialize};
pub use static_templates::{CpuModel, HostCpu, StaticCpuTemplate, StaticTemplateError};

/// A template that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// The JSON does not have the template's shape (unknown top-level field, wrong type,
    /// missing field).
    #[error("{0}")]
    Json(#[from] serde_json::Error),
    /// A value is malformed; `location` names the leaf, MSR or list entry.
    #[error("{location}: {reason}")]
    Invalid {
        /// Where: `CPUID leaf 0x7 subleaf 0x0`, `MSR 0x10a`, `cpuid_modifiers[2].leaf`.
        location: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// A template KVM's CPUID or MSRs cannot take.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ApplyError {
    /// The template changes a CPUID leaf KVM does not report.
    #[error("Template changes a CPUID entry not supported by KVM: Leaf: {leaf:#x}, Subleaf: {subleaf:#x}")]
    CpuidNotSupported {
        /// The leaf (EAX input).
        leaf: u32,
        /// The subleaf (ECX input).
        subleaf: u32,
    },
    /// The template changes an MSR KVM cannot read.
    #[error("Template changes an MSR entry not supported by KVM: Register Address: {0:#x}")]
    MsrNotSupported(u32),
}

/// A CPUID output register.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CpuidRegister {
    /// EAX.
    Eax,
    /// EBX.
    Ebx,
    /// ECX.
    Ecx,
    /// EDX.
    Edx,
}

impl CpuidRegister {
    fn name(self) -> &'static str {
        match self {
            CpuidRegister::Eax => "eax",
            CpuidRegister::Ebx => "ebx",
            CpuidRegister::Ecx => "ecx",
            CpuidRegister::Edx => "edx",
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "eax" => CpuidRegister::Eax,
            "ebx" => CpuidRegister::Ebx,
            "ecx" => CpuidRegister::Ecx,
            "edx" => CpuidRegister::Edx,
            _ => return None,
        })
    }
}

/// One register of a CPUID leaf and the bits to force in it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CpuidRegisterModifier {
    /// The register.
    pub register: CpuidRegister,
    /// The bits, for 32 bits.
    pub bitmap: Bitmap,
}

/// The changes to one CPUID leaf and subleaf.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct CpuidLeafModifier {
    /// The leaf (EAX input).
    pub leaf: u32,
    /// The subleaf (ECX input).
    pub subleaf: u32,
    /// The KVM flags of the entry (`KVM_CPUID_FLAG_SIGNIFCANT_INDEX` = 1, ...): they
    /// replace KVM's.
    pub flags: u32,
    /// The registers changed, applied in order.
    pub modifiers: Vec<CpuidRegisterModifier>,
}

/// The bits to force in one MSR.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MsrModifier {
    /// The MSR's address.
    pub addr: u32,
    /// The bits, for 64 bits.
    pub bitmap: Bitmap,
}

/// A KVM capability a template adds to the VMM's checks, or removes from them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KvmCapability {
    /// Checked before the vCPUs are configured (`"171"`).
    Add(u32),
    /// Not checked (`"!171"`).
    Remove(u32),
}

/// A custom CPU template: Firecracker's `CustomCpuTemplate` for x86_64.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CustomCpuTemplate {
    /// KVM capabilities to check, or not to check, before the vCPUs are configured.
    pub kvm_capabilities: Vec<KvmCapability>,
    /// CPUID changes, applied in order.
    pub cpuid_modifiers: Vec<CpuidLeafModifier>,
    /// MSR changes, applied in order.
    pub msr_modifiers: Vec<MsrModifier>,
}

/// One CPUID entry of a vCPU, for [`CustomCpuTemplate::apply_cpuid`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuidEntry {
    /// KVM's flags for the entry.
    pub flags: u32,
    /// EAX output.
    pub eax: u32,
    /// EBX output.
    pub ebx: u32,
    /// ECX output.
    pub ecx: u32,
    /// EDX output.
    pub edx: u32,
}

impl CpuidEntry {
    fn register_mut(&mut self, register: CpuidRegister) -> &mut u32 {
        match register {
            CpuidRegister::Eax => &mut self.eax,
            CpuidRegister::Ebx => &mut self.ebx,
            CpuidRegister::Ecx => &mut self.ecx,
            CpuidRegister::Edx => &mut self.edx,
        }
    }
}

impl CustomCpuTemplate {
    /// Reads a template in Firecracker's JSON format.
    ///
    /// # Errors
    ///
    /// [`TemplateError::Json`] when the JSON does not have the template's shape,
    /// [`TemplateError::Invalid`] naming the leaf or MSR whose number, register or bitmap
    /// is malformed.
    pub fn from_json(json: &[u8]) -> Result<Self, TemplateError> {
        let raw: RawTemplate = serde_json::from_slice(json)?;
        raw.try_into()
    }

    /// [`CustomCpuTemplate::from_json`] for a JSON value already parsed (an inline
    /// `cpu-config` section).
    ///
    /// # Errors
    ///
    /// As [`CustomCpuTemplate::from_json`].
    pub fn from_value(value: serde_json::Value) -> Result<Self, TemplateError> {
        let raw: RawTemplate = serde_json::from_value(value)?;
        raw.try_into()
    }

    /// The template in Firecracker's JSON format, as [`CustomCpuTemplate::from_json`]
    /// reads it.
    pub fn to_value(&self) -> serde_json::Value {
        serde_json::to_value(RawTemplate::from(self)).unwrap_or_default()
    }

    /// The addresses of the MSRs the template changes, in order, repeated if changed twice.
    pub fn msr_addresses(&self) -> impl ExactSizeIterator<Item = u32> + '_ {
        self.msr_modifiers.iter().map(|m| m.addr)
    }

    /// Applies the CPUID modifiers to `cpuid`, keyed by (leaf, subleaf) as KVM lists its
    /// entries (subleaf 0 for a leaf without `KVM_CPUID_FLAG_SIGNIFCANT_INDEX`). Each
    /// modified entry takes the modifier's flags.
    ///
    /// # Errors
    ///
    /// [`ApplyError::CpuidNotSupported`] for the first leaf `cpuid` lacks; `cpuid` is then
    /// partly modified.
    pub fn apply_cpuid(
        &self,
        cpuid: &mut BTreeMap<(u32, u32), CpuidEntry>,
    ) -> Result<(), ApplyError> {
        for leaf in &self.cpuid_modifiers {
            let entry =
                cpuid
                    .get_mut(&(leaf.leaf, leaf.subleaf))
                    .ok_or(ApplyError::CpuidNotSupported {
                        leaf: leaf.leaf,
                        subleaf: leaf.subleaf,
                    })?;
            entry.flags = leaf.flags;
            for m in &leaf.modifiers {
                let r = entry.register_mut(m.register);
                *r = m.bitmap.apply32(*r);
            }
        }
        Ok(())
    }

    /// Applies the MSR modifiers to `msrs`, the values of the MSRs read from the vCPU.
    ///
    /// # Errors
    ///
    /// [`ApplyError::MsrNotSupported`] for the first MSR `msrs` lacks.
    pub fn apply_msrs(&self, msrs: &mut BTreeMap<u32, u64>) -> Result<(), ApplyError> {
        for m in &self.msr_modifiers {
            let value = msrs
                .get_mut(&m.addr)
                .ok_or(ApplyError::MsrNotSupported(m.addr))?;
            *value = m.bitmap.apply(*value);
        }
        Ok(())
    }

    /// The capabilities to check beyond `required`, and which of `required` not to check:
    /// `(required + added - removed)`, in order, without repeats.
    pub fn capabilities_to_check(&self, required: &[u32]) -> Vec<u32> {
        let mut caps: Vec<u32> = required.to_vec();
        for c in &self.kvm_capabilities {
            match *c {
                KvmCapability::Add(cap) if !caps.contains(&cap) => caps.push(cap),
                KvmCapability::Add(_) => {}
                KvmCapability::Remove(cap) => caps.retain(|&c| c != cap),
            }
        }
        caps
    }
}

// The JSON shape, as Firecracker writes it: numbers as "0x..."/"0b..." strings, bitmaps as
// tri-state strings. Read loosely first, then checked with errors that name the leaf or MSR.

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawTemplate {
    #[serde(default)]
    kvm_capabilities: Vec<String>,
    #[serde(default)]
    cpuid_modifiers: Vec<RawLeaf>,
    #[serde(default)]
    msr_modifiers: Vec<RawMsr>,
}

#[derive(Deserialize, Serialize)]
struct RawLeaf {
    leaf: String,
    subleaf: String,
    flags: u32,
    modifiers: Vec<RawRegister>,
}

#[derive(Deserialize, Serialize)]
struct RawRegister {
    register: String,
    bitmap: String,
}

#[derive(Deserialize, Serialize)]
struct RawMsr {
    addr: String,
    bitmap: String,
}

fn invalid(location: impl Into<String>, reason: impl Into<String>) -> TemplateError {
    TemplateError::Invalid {
        location: location.into(),
        reason: reason.into(),
    }
}

/// A number as Firecracker's API describes them: `0x` hexadecimal, `0b` binary or
/// decimal.
fn parse_number(text: &str) -> Result<u32, String> {
    let parsed = if let Some(hex) = text.strip_prefix("0x") {
        u32::from_str_radix(hex, 16)
    } else if let Some(bin) = text.strip_prefix("0b") {
        u32::from_str_radix(bin, 2)
    } else {
        text.parse::<u32>()
    };
    parsed.map_err(|e| {
        format!("\"{text}\" is not a 32-bit number (0x hexadecimal, 0b binary or decimal): {e}")
    })
}

impl TryFrom<RawTemplate> for CustomCpuTemplate {
    type Error = TemplateError;

    fn try_from(raw: RawTemplate) -> Result<Self, TemplateError> {
        let mut kvm_capabilities = Vec::with_capacity(raw.kvm_capabilities.len());
        for (i, text) in raw.kvm_capabilities.iter().enumerate() {
            let (remove, digits) = match text.strip_prefix('!') {
                Some(d) => (true, d),
                None => (false, text.as_str()),
            };
            let cap = digits.parse::<u32>().map_err(|e| {
                invalid(
                    format!("kvm_capabilities[{i}]"),
                    format!("\"{text}\" is not a KVM capability number (or ! and one): {e}"),
                )
            })?;
            kvm_capabilities.push(if remove {
                KvmCapability::Remove(cap)
            } else {
                KvmCapability::Add(cap)
            });
        }

        let mut cpuid_modifiers = Vec::with_capacity(raw.cpuid_modifiers.len());
        for (i, l) in raw.cpuid_modifiers.iter().enumerate() {
            let leaf = parse_number(&l.leaf)
                .map_err(|e| invalid(format!("cpuid_modifiers[{i}].leaf"), e))?;
            let subleaf = parse_number(&l.subleaf).map_err(|e| {
                invalid(format!("cpuid_modifiers[{i}] (leaf {leaf:#x}).subleaf"), e)
            })?;
            let location = || format!("CPUID leaf {leaf:#x} subleaf {subleaf:#x}");
            let mut modifiers = Vec::with_capacity(l.modifiers.len());
            for r in &l.modifiers {
                let register = CpuidRegister::from_name(&r.register).ok_or_else(|| {
                    invalid(
                        location(),
                        format!(
                            "invalid CPUID register \"{}\": it must be one of eax, ebx, ecx, edx",
                            r.register
                        ),
                    )
                })?;
                let bitmap = Bitmap::parse(&r.bitmap, 32).map_err(|e| {
                    invalid(format!("{} register {}", location(), register.name()), e)
                })?;
                modifiers.push(CpuidRegisterModifier { register, bitmap });
            }
            cpuid_modifiers.push(CpuidLeafModifier {
                leaf,
                subleaf,
                flags: l.flags,
                modifiers,
            });
        }

        let mut msr_modifiers = Vec::with_capacity(raw.msr_modifiers.len());
        for (i, m) in raw.msr_modifiers.iter().enumerate() {
            let addr = parse_number(&m.addr)
                .map_err(|e| invalid(format!("msr_modifiers[{i}].addr"), e))?;
            let bitmap =
                Bitmap::parse(&m.bitmap, 64).map_err(|e| invalid(format!("MSR {addr:#x}"), e))?;
            msr_modifiers.push(MsrModifier { addr, bitmap });
        }

        Ok(CustomCpuTemplate {
            kvm_capabilities,
            cpuid_modifiers,
            msr_modifiers,
        })
    }
}

impl From<&CustomCpuTemplate> for RawTemplate {
    fn from(t: &CustomCpuTemplate) -> Self {
        RawTemplate {
            kvm_capabilities: t
                .kvm_capabilities
                .iter()
                .map(|c| match c {
                    KvmCapability::Add(cap) => cap.to_string(),
                    KvmCapability::Remove(cap) => format!("!{cap}"),
                })
                .collect(),
            cpuid_modifiers: t
                .cpuid_modifiers
                .iter()
                .map(|l| RawLeaf {
                    leaf: format!("{:#x}", l.leaf),
                    subleaf: format!("{:#x}", l.subleaf),
                    flags: l.flags,
                    modifiers: l
                        .modifiers
                        .iter()
                        .map(|m| RawRegister {
                            register: m.register.name().to_string(),
                            bitmap: m.bitmap.to_bit_string(32),
                        })
                        .collect(),
                })
                .collect(),
            msr_modifiers: t
                .msr_modifiers
                .iter()
                .map(|m| RawMsr {
                    addr: format!("{:#x}", m.addr),
                    bitmap: m.bitmap.to_bit_string(64),
                })
                .collect(),
        }
    }
}

impl Serialize for CustomCpuTemplate {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        RawTemplate::from(self).serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for CustomCpuTemplate {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        RawTemplate::deserialize(deserializer)?
            .try_into()
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEMPLATE: &str = r#"{
        "kvm_capabilities": ["171", "!172"],
        "cpuid_modifiers": [
            {"leaf": "0x1", "subleaf": "0x0", "flags": 0, "modifiers": [
                {"register": "ecx", "bitmap": "0bx0xxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"},
                {"register": "eax", "bitmap": "0b1111"}
            ]},
            {"leaf": "0b111", "subleaf": "0x0", "flags": 1, "modifiers": [
                {"register": "ebx", "bitmap": "0bxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx_0_x"}
            ]}
        ],
        "msr_modifiers": [
            {"addr": "0x10a", "bitmap": "0b1x0"}
        ]
    }"#;

    fn table() -> BTreeMap<(u32, u32), CpuidEntry> {
        BTreeMap::from([
            (
                (1, 0),
                CpuidEntry {
                    flags: 0,
                    eax: 0xa0_0f11,
                    ebx: 0,
                    ecx: u32::MAX,
                    edx: 7,
                },
            ),
            (
                (7, 0),
                CpuidEntry {
                    flags: 0,
                    ebx: 0b11,
                    ..Default::default()
                },
            ),
        ])
    }

    #[test]
    fn parses_firecracker_format() {
        let t = CustomCpuTemplate::from_json(TEMPLATE.as_bytes()).unwrap();
        assert_eq!(
            t.kvm_capabilities,
            [KvmCapability::Add(171), KvmCapability::Remove(172)]
        );
        assert_eq!(t.cpuid_modifiers.len(), 2);
        assert_eq!(t.cpuid_modifiers[1].leaf, 7);
        assert_eq!(t.cpuid_modifiers[1].flags, 1);
        assert_eq!(
            t.cpuid_modifiers[0].modifiers[0],
            CpuidRegisterModifier {
                register: CpuidRegister::Ecx,
                bitmap: Bitmap::new(1 << 30, 0)
            }
        );
        assert_eq!(
            t.msr_modifiers,
            [MsrModifier {
                addr: 0x10a,
                bitmap: Bitmap::new(0b101, 0b100)
            }]
        );
        // Every section may be left out.
        assert_eq!(
            CustomCpuTemplate::from_json(b"{}").unwrap(),
            CustomCpuTemplate::default()
        );
    }

    #[test]
    fn round_trips_through_json() {
        let t = CustomCpuTemplate::from_json(TEMPLATE.as_bytes()).unwrap();
        let text = serde_json::to_string(&t).unwrap();
        assert_eq!(CustomCpuTemplate::from_json(text.as_bytes()).unwrap(), t);
        assert_eq!(CustomCpuTemplate::from_value(t.to_value()).unwrap(), t);
        assert_eq!(t.to_value()["cpuid_modifiers"][1]["leaf"], "0x7");
    }

    #[test]
    fn applies_to_cpuid_and_msrs() {
        let t = CustomCpuTemplate::from_json(TEMPLATE.as_bytes()).unwrap();
        let mut cpuid = table();
        t.apply_cpuid(&mut cpuid).unwrap();
        assert_eq!(cpuid[&(1, 0)].ecx, !(1 << 30));
        assert_eq!(cpuid[&(1, 0)].eax, 0xa0_0f1f);
        assert_eq!(cpuid[&(1, 0)].edx, 7, "an unnamed register is untouched");
        assert_eq!(cpuid[&(7, 0)].ebx, 0b01);
        assert_eq!(
            cpuid[&(7, 0)].flags,
            1,
            "the modifier's flags replace KVM's"
        );

        let mut msrs = BTreeMap::from([(0x10a, 0b011u64), (0x10, 5)]);
        t.apply_msrs(&mut msrs).unwrap();
        assert_eq!(msrs[&0x10a], 0b110);
        assert_eq!(msrs[&0x10], 5);
    }

    #[test]
    fn leaves_and_msrs_kvm_lacks_are_named() {
        let t = CustomCpuTemplate::from_json(
            br#"{"cpuid_modifiers": [{"leaf": "0x8000001f", "subleaf": "0x1", "flags": 0, "modifiers": []}]}"#,
        )
        .unwrap();
        let e = t.apply_cpuid(&mut table()).unwrap_err();
        assert_eq!(
            e,
            ApplyError::CpuidNotSupported {
                leaf: 0x8000_001f,
                subleaf: 1
            }
        );
        assert!(
            e.to_string().contains("Leaf: 0x8000001f, Subleaf: 0x1"),
            "{e}"
        );

        let t = CustomCpuTemplate::from_json(
            br#"{"msr_modifiers": [{"addr": "0x4b564d05", "bitmap": "0b1"}]}"#,
        )
        .unwrap();
        let e = t.apply_msrs(&mut BTreeMap::new()).unwrap_err();
        assert_eq!(e, ApplyError::MsrNotSupported(0x4b56_4d05));
        assert!(e.to_string().contains("0x4b564d05"), "{e}");
    }

    fn error(json: &str) -> String {
        CustomCpuTemplate::from_json(json.as_bytes())
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn malformed_templates_are_named() {
        let leaf = |register: &str, bitmap: &str| {
            format!(
                r#"{{"cpuid_modifiers": [{{"leaf": "0x7", "subleaf": "0x0", "flags": 1,
                    "modifiers": [{{"register": "{register}", "bitmap": "{bitmap}"}}]}}]}}"#
            )
        };
        let e = error(&leaf("ecx", "0b10q"));
        assert!(
            e.starts_with("CPUID leaf 0x7 subleaf 0x0 register ecx: "),
            "{e}"
        );
        assert!(e.contains("'q'"), "{e}");
        let e = error(&leaf("esi", "0b1"));
        assert!(
            e.starts_with("CPUID leaf 0x7 subleaf 0x0: invalid CPUID register \"esi\""),
            "{e}"
        );
        let e = error(&leaf("ebx", &"1".repeat(33)));
        assert!(e.contains("more than 32 bits"), "{e}");

        let e = error(r#"{"msr_modifiers": [{"addr": "0x10a", "bitmap": "0b2"}]}"#);
        assert!(e.starts_with("MSR 0x10a: "), "{e}");
        let e = error(r#"{"msr_modifiers": [{"addr": "ten", "bitmap": "0b1"}]}"#);
        assert!(
            e.starts_with("msr_modifiers[0].addr: \"ten\" is not a 32-bit number"),
            "{e}"
        );
        let t = CustomCpuTemplate::from_json(
            br#"{"msr_modifiers": [{"addr": "266", "bitmap": "0b1"}]}"#,
        );
        assert_eq!(
            t.unwrap().msr_modifiers[0].addr,
            0x10a,
            "decimal, as the API describes"
        );
        let e = error(
            r#"{"cpuid_modifiers": [{"leaf": "0x1ffffffff", "subleaf": "0x0", "flags": 0, "modifiers": []}]}"#,
        );
        assert!(e.starts_with("cpuid_modifiers[0].leaf: "), "{e}");
        let e = error(r#"{"kvm_capabilities": ["!x"]}"#);
        assert!(e.starts_with("kvm_capabilities[0]: "), "{e}");
        let e = error(r#"{"cpuid_modifier": []}"#);
        assert!(e.contains("unknown field `cpuid_modifier`"), "{e}");
        let e =
            error(r#"{"cpuid_modifiers": [{"leaf": "0x1", "subleaf": "0x0", "modifiers": []}]}"#);
        assert!(e.contains("missing field `flags`"), "{e}");
    }

    #[test]
    fn capabilities_are_added_and_removed() {
        let t = CustomCpuTemplate::from_json(br#"{"kvm_capabilities": ["9", "!3", "1"]}"#).unwrap();
        assert_eq!(t.capabilities_to_check(&[1, 3, 5]), [1, 5, 9]);
    }
}
