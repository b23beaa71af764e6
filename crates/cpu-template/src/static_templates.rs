//! The static templates of `machine-config.cpu_template`: Firecracker's T2, T2S, C3 and
//! T2CL for Intel hosts and T2A for AMD hosts, each allowed on the CPU models Firecracker
//! allows it on. They present the instruction set of the EC2 instance family they are
//! named after (Intel SDM vol. 2A and AMD APM vol. 3, CPUID; Intel's "CPUID Enumeration and
//! Architectural MSRs" for IA32_ARCH_CAPABILITIES).

use serde::{Deserialize, Serialize};

use crate::{
    Bitmap, CpuidLeafModifier, CpuidRegister, CpuidRegisterModifier, CustomCpuTemplate, MsrModifier,
};

/// Vendor ids in CPUID leaf 0 EBX, EDX, ECX order.
const VENDOR_INTEL: &[u8; 12] = b"GenuineIntel";
const VENDOR_AMD: &[u8; 12] = b"AuthenticAMD";

/// `machine-config.cpu_template`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum StaticCpuTemplate {
    /// C3 (Intel Skylake, Cascade Lake, Ice Lake).
    C3,
    /// T2 (Intel Skylake, Cascade Lake, Ice Lake).
    T2,
    /// T2S (Intel Skylake, Cascade Lake).
    T2S,
    /// No template; setting it clears the template set before.
    #[default]
    None,
    /// T2CL (Intel Cascade Lake, Ice Lake).
    T2CL,
    /// T2A (AMD Milan).
    T2A,
}

impl std::fmt::Display for StaticCpuTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StaticCpuTemplate::C3 => "C3",
            StaticCpuTemplate::T2 => "T2",
            StaticCpuTemplate::T2S => "T2S",
            StaticCpuTemplate::None => "None",
            StaticCpuTemplate::T2CL => "T2CL",
            StaticCpuTemplate::T2A => "T2A",
        })
    }
}

/// Why a static template cannot be used on this host (Firecracker's words).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StaticTemplateError {
    /// The host's vendor is not the template's.
    #[error("CPU vendor mismatched between actual CPU and CPU template.")]
    CpuVendorMismatched,
    /// The host's model is not one the template is for.
    #[error("The current CPU model is not permitted to apply the CPU template.")]
    InvalidCpuModel,
    /// `None` names no template.
    #[error("Invalid static CPU template: None")]
    NoneTemplate,
}

/// A CPU family, model and stepping, as CPUID.01H:EAX encodes them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuModel {
    /// Extended family (EAX\[27:20\]).
    pub extended_family: u8,
    /// Extended model (EAX\[19:16\]).
    pub extended_model: u8,
    /// Family (EAX\[11:8\]).
    pub family: u8,
    /// Model (EAX\[7:4\]).
    pub model: u8,
    /// Stepping (EAX\[3:0\]).
    pub stepping: u8,
}

impl CpuModel {
    /// The model CPUID.01H:EAX describes.
    pub const fn from_eax(eax: u32) -> Self {
        // Each field is masked to its width first: the casts keep all of it.
        CpuModel {
            extended_family: ((eax >> 20) & 0xff) as u8,
            extended_model: ((eax >> 16) & 0xf) as u8,
            family: ((eax >> 8) & 0xf) as u8,
            model: ((eax >> 4) & 0xf) as u8,
            stepping: (eax & 0xf) as u8,
        }
    }
}

const SKYLAKE: CpuModel = CpuModel::from_eax(0x0005_0654);
const CASCADE_LAKE: CpuModel = CpuModel::from_eax(0x0005_0657);
const ICE_LAKE: CpuModel = CpuModel::from_eax(0x0006_06a6);
const MILAN: CpuModel = CpuModel::from_eax(0x00a0_0f11);

/// What a static template is checked against: the host's vendor and model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostCpu {
    /// Vendor id (`GenuineIntel`, `AuthenticAMD`).
    pub vendor: [u8; 12],
    /// Family, model and stepping.
    pub model: CpuModel,
}

impl HostCpu {
    /// The CPU this runs on, from CPUID leaves 0 and 1.
    pub fn read() -> Self {
        // `__cpuid` is a safe function since Rust 1.87 and unsafe before.
        #[allow(unused_unsafe)]
        // SAFETY: CPUID exists on every x86_64 CPU and only reads identification data.
        let (leaf0, leaf1) =
            unsafe { (std::arch::x86_64::__cpuid(0), std::arch::x86_64::__cpuid(1)) };
        let mut vendor = [0u8; 12];
        vendor[0..4].copy_from_slice(&leaf0.ebx.to_le_bytes());
        vendor[4..8].copy_from_slice(&leaf0.edx.to_le_bytes());
        vendor[8..12].copy_from_slice(&leaf0.ecx.to_le_bytes());
        HostCpu {
            vendor,
            model: CpuModel::from_eax(leaf1.eax),
        }
    }
}

impl StaticCpuTemplate {
    /// The vendor the template is for; `None` for [`StaticCpuTemplate::None`].
    pub fn vendor(self) -> Option<&'static [u8; 12]> {
        match self {
            StaticCpuTemplate::C3
            | StaticCpuTemplate::T2
            | StaticCpuTemplate::T2S
            | StaticCpuTemplate::T2CL => Some(VENDOR_INTEL),
            StaticCpuTemplate::T2A => Some(VENDOR_AMD),
            StaticCpuTemplate::None => None,
        }
    }

    /// The CPU models the template may be used on.
    pub fn models(self) -> &'static [CpuModel] {
        match self {
            StaticCpuTemplate::C3 | StaticCpuTemplate::T2 => &[SKYLAKE, CASCADE_LAKE, ICE_LAKE],
            StaticCpuTemplate::T2S => &[SKYLAKE, CASCADE_LAKE],
            StaticCpuTemplate::T2CL => &[CASCADE_LAKE, ICE_LAKE],
            StaticCpuTemplate::T2A => &[MILAN],
            StaticCpuTemplate::None => &[],
        }
    }

    /// The template's changes, whatever the host.
    pub fn template(self) -> CustomCpuTemplate {
        let table = match self {
            StaticCpuTemplate::C3 => &C3,
            StaticCpuTemplate::T2 => &T2,
            StaticCpuTemplate::T2S => &T2S,
            StaticCpuTemplate::T2CL => &T2CL,
            StaticCpuTemplate::T2A => &T2A,
            StaticCpuTemplate::None => return CustomCpuTemplate::default(),
        };
        table.to_template()
    }

    /// The template's changes, if `host` is a CPU the template may be used on.
    ///
    /// # Errors
    ///
    /// Firecracker's: another vendor, another model, or `None`.
    pub fn for_host(self, host: &HostCpu) -> Result<CustomCpuTemplate, StaticTemplateError> {
        let vendor = self.vendor().ok_or(StaticTemplateError::NoneTemplate)?;
        if &host.vendor != vendor {
            return Err(StaticTemplateError::CpuVendorMismatched);
        }
        if !self.models().contains(&host.model) {
            return Err(StaticTemplateError::InvalidCpuModel);
        }
        if self == StaticCpuTemplate::C3 && host.model == SKYLAKE {
            log::warn!(
                "On processors that do not enumerate FBSDP_NO, PSDP_NO and SBDR_SSDP_NO on \
                 IA32_ARCH_CAPABILITIES MSR, the guest kernel does not apply the mitigation \
                 against MMIO stale data vulnerability."
            );
        }
        Ok(self.template())
    }
}

/// A static template, as tables of (register, filter, value).
struct StaticTemplate {
    cpuid: &'static [Leaf],
    msrs: &'static [(u32, u64, u64)],
}

struct Leaf {
    leaf: u32,
    subleaf: u32,
    flags: u32,
    registers: &'static [(CpuidRegister, u32, u32)],
}

impl StaticTemplate {
    fn to_template(&self) -> CustomCpuTemplate {
        CustomCpuTemplate {
            kvm_capabilities: Vec::new(),
            cpuid_modifiers: self
                .cpuid
                .iter()
                .map(|l| CpuidLeafModifier {
                    leaf: l.leaf,
                    subleaf: l.subleaf,
                    flags: l.flags,
                    modifiers: l
                        .registers
                        .iter()
                        .map(|&(register, filter, value)| CpuidRegisterModifier {
                            register,
                            bitmap: Bitmap::new(filter.into(), value.into()),
                        })
                        .collect(),
                })
                .collect(),
            msr_modifiers: self
                .msrs
                .iter()
                .map(|&(addr, filter, value)| MsrModifier {
                    addr,
                    bitmap: Bitmap::new(filter, value),
                })
                .collect(),
        }
    }
}

use CpuidRegister::{Eax, Ebx, Ecx, Edx};

// The tables below give, per leaf, the bits each template forces (filter) and their values,
// identical to Firecracker's templates so that a guest sees the same CPU under either VMM.
// Leaf 0x1: family/model/stepping and feature flags; 0x7: structured extended features;
// 0xd: XSAVE state components and instructions; 0x8000_0001: extended features;
// 0x8000_0008: AMD extended features (T2A), Intel's WBNOINVD; MSR 0x10a:
// IA32_ARCH_CAPABILITIES.

const C3: StaticTemplate = StaticTemplate {
    cpuid: &[
        Leaf {
            leaf: 0x1,
            subleaf: 0x0,
            flags: 0,
            registers: &[
                (Eax, 0x0fff3fff, 0x000306e4),
                (Ecx, 0x0040dd3c, 0x00000000),
                (Edx, 0xa8641080, 0x00001080),
            ],
        },
        Leaf {
            leaf: 0x7,
            subleaf: 0x0,
            flags: 1,
            registers: &[
                (Ebx, 0xffafdd3c, 0x00000000),
                (Ecx, 0x4041481e, 0x00000000),
                (Edx, 0x0000000c, 0x00000000),
            ],
        },
        Leaf {
            leaf: 0xd,
            subleaf: 0x0,
            flags: 1,
            registers: &[(Eax, 0x000002f8, 0x00000000)],
        },
        Leaf {
            leaf: 0xd,
            subleaf: 0x1,
            flags: 1,
            registers: &[(Eax, 0x0000000e, 0x00000000)],
        },
        Leaf {
            leaf: 0x80000001,
            subleaf: 0x0,
            flags: 0,
            registers: &[(Ecx, 0x00000120, 0x00000000), (Edx, 0x04000000, 0x00000000)],
        },
    ],
    msrs: &[],
};

const T2: StaticTemplate = StaticTemplate {
    cpuid: &[
        Leaf {
            leaf: 0x1,
            subleaf: 0x0,
            flags: 0,
            registers: &[
                (Eax, 0x0fff3fff, 0x000306f2),
                (Ecx, 0x0004cdfc, 0x00000000),
                (Edx, 0xe8641080, 0x00001080),
            ],
        },
        Leaf {
            leaf: 0x7,
            subleaf: 0x0,
            flags: 1,
            registers: &[
                (Ebx, 0xffefda14, 0x00000200),
                (Ecx, 0x40415f5e, 0x00000000),
                (Edx, 0x0000011c, 0x00000000),
            ],
        },
        Leaf {
            leaf: 0xd,
            subleaf: 0x0,
            flags: 1,
            registers: &[(Eax, 0x000002f8, 0x00000000)],
        },
        Leaf {
            leaf: 0xd,
            subleaf: 0x1,
            flags: 1,
            registers: &[(Eax, 0x0000000e, 0x00000000)],
        },
        Leaf {
            leaf: 0x80000001,
            subleaf: 0x0,
            flags: 0,
            registers: &[(Ecx, 0x20000100, 0x00000000), (Edx, 0x04000000, 0x00000000)],
        },
        Leaf {
            leaf: 0x80000008,
            subleaf: 0x0,
            flags: 0,
            registers: &[(Ebx, 0x00000200, 0x00000000)],
        },
    ],
    msrs: &[],
};

const T2S: StaticTemplate = StaticTemplate {
    cpuid: &[
        Leaf {
            leaf: 0x1,
            subleaf: 0x0,
            flags: 0,
            registers: &[
                (Eax, 0x0fff3fff, 0x000306f2),
                (Ecx, 0x0004cdfc, 0x00000000),
                (Edx, 0xe8641080, 0x00001080),
            ],
        },
        Leaf {
            leaf: 0x7,
            subleaf: 0x0,
            flags: 1,
            registers: &[
                (Ebx, 0xffefda14, 0x00000200),
                (Ecx, 0x40415f5e, 0x00000000),
                (Edx, 0x0000011c, 0x00000000),
            ],
        },
        Leaf {
            leaf: 0xd,
            subleaf: 0x0,
            flags: 1,
            registers: &[(Eax, 0x000002f8, 0x00000000)],
        },
        Leaf {
            leaf: 0xd,
            subleaf: 0x1,
            flags: 1,
            registers: &[(Eax, 0x0000000e, 0x00000000)],
        },
        Leaf {
            leaf: 0x80000001,
            subleaf: 0x0,
            flags: 0,
            registers: &[(Ecx, 0x20000100, 0x00000000), (Edx, 0x04000000, 0x00000000)],
        },
        Leaf {
            leaf: 0x80000008,
            subleaf: 0x0,
            flags: 0,
            registers: &[(Ebx, 0x00000200, 0x00000000)],
        },
    ],
    msrs: &[(0x10a, 0xffffffffffffffff, 0x000000000c080c4c)],
};

const T2CL: StaticTemplate = StaticTemplate {
    cpuid: &[
        Leaf {
            leaf: 0x1,
            subleaf: 0x0,
            flags: 0,
            registers: &[
                (Eax, 0x0fff3fff, 0x000306f2),
                (Ecx, 0x0004cdfc, 0x00000000),
                (Edx, 0xe8641080, 0x00001080),
            ],
        },
        Leaf {
            leaf: 0x7,
            subleaf: 0x0,
            flags: 1,
            registers: &[
                (Ebx, 0xffefda14, 0x00000200),
                (Ecx, 0x40415f5e, 0x00000000),
                (Edx, 0x0000011c, 0x00000000),
            ],
        },
        Leaf {
            leaf: 0xd,
            subleaf: 0x0,
            flags: 1,
            registers: &[(Eax, 0x000002f8, 0x00000000)],
        },
        Leaf {
            leaf: 0xd,
            subleaf: 0x1,
            flags: 1,
            registers: &[(Eax, 0x0000000e, 0x00000000)],
        },
        Leaf {
            leaf: 0x80000001,
            subleaf: 0x0,
            flags: 0,
            registers: &[(Ecx, 0x200001c0, 0x00000000), (Edx, 0x07c00000, 0x00000000)],
        },
        Leaf {
            leaf: 0x80000008,
            subleaf: 0x0,
            flags: 0,
            registers: &[(Ebx, 0x00000200, 0x00000000)],
        },
    ],
    msrs: &[(0x10a, 0xffffffffe2f51e00, 0x0000000000000000)],
};

const T2A: StaticTemplate = StaticTemplate {
    cpuid: &[
        Leaf {
            leaf: 0x1,
            subleaf: 0x0,
            flags: 0,
            registers: &[
                (Eax, 0x0fff3fff, 0x000306f2),
                (Ecx, 0x0004cdfc, 0x00000000),
                (Edx, 0xe8641080, 0x00001080),
            ],
        },
        Leaf {
            leaf: 0x7,
            subleaf: 0x0,
            flags: 1,
            registers: &[
                (Ebx, 0xffefda14, 0x00000200),
                (Ecx, 0x40415f5e, 0x00000000),
                (Edx, 0x0000011c, 0x00000000),
            ],
        },
        Leaf {
            leaf: 0xd,
            subleaf: 0x0,
            flags: 1,
            registers: &[(Eax, 0x000002f8, 0x00000000)],
        },
        Leaf {
            leaf: 0xd,
            subleaf: 0x1,
            flags: 1,
            registers: &[(Eax, 0x0000000e, 0x00000000)],
        },
        Leaf {
            leaf: 0x80000001,
            subleaf: 0x0,
            flags: 0,
            registers: &[(Ecx, 0x200001c4, 0x00000000), (Edx, 0x06400000, 0x00000000)],
        },
        Leaf {
            leaf: 0x80000008,
            subleaf: 0x0,
            flags: 0,
            registers: &[(Ebx, 0x001c0205, 0x001c0004)],
        },
    ],
    msrs: &[],
};
#[cfg(test)]
mod tests {
    use super::*;

    const MILAN_HOST: HostCpu = HostCpu {
        vendor: *VENDOR_AMD,
        model: MILAN,
    };

    #[test]
    fn names_are_firecracker_s() {
        for (name, t) in [
            ("C3", StaticCpuTemplate::C3),
            ("T2", StaticCpuTemplate::T2),
            ("T2S", StaticCpuTemplate::T2S),
            ("None", StaticCpuTemplate::None),
            ("T2CL", StaticCpuTemplate::T2CL),
            ("T2A", StaticCpuTemplate::T2A),
        ] {
            assert_eq!(t.to_string(), name);
            assert_eq!(
                serde_json::from_str::<StaticCpuTemplate>(&format!("\"{name}\"")).unwrap(),
                t
            );
        }
        assert!(serde_json::from_str::<StaticCpuTemplate>("\"T3\"").is_err());
    }

    #[test]
    fn vendor_and_model_are_checked() {
        assert!(StaticCpuTemplate::T2A.for_host(&MILAN_HOST).is_ok());
        for intel in [
            StaticCpuTemplate::C3,
            StaticCpuTemplate::T2,
            StaticCpuTemplate::T2S,
            StaticCpuTemplate::T2CL,
        ] {
            assert_eq!(
                intel.for_host(&MILAN_HOST),
                Err(StaticTemplateError::CpuVendorMismatched)
            );
        }
        let zen4 = HostCpu {
            vendor: *VENDOR_AMD,
            model: CpuModel::from_eax(0x00a1_0f11),
        };
        assert_eq!(
            StaticCpuTemplate::T2A.for_host(&zen4),
            Err(StaticTemplateError::InvalidCpuModel)
        );
        let cascade = HostCpu {
            vendor: *VENDOR_INTEL,
            model: CASCADE_LAKE,
        };
        assert!(StaticCpuTemplate::T2S.for_host(&cascade).is_ok());
        assert_eq!(
            StaticCpuTemplate::T2A.for_host(&cascade),
            Err(StaticTemplateError::CpuVendorMismatched)
        );
        assert_eq!(
            StaticCpuTemplate::None.for_host(&cascade),
            Err(StaticTemplateError::NoneTemplate)
        );
    }

    #[test]
    fn t2a_masks_what_firecracker_masks() {
        let t = StaticCpuTemplate::T2A.template();
        let mut cpuid: std::collections::BTreeMap<(u32, u32), crate::CpuidEntry> = [
            (1, 0),
            (7, 0),
            (0xd, 0),
            (0xd, 1),
            (0x8000_0001, 0),
            (0x8000_0008, 0),
        ]
        .into_iter()
        .map(|k| {
            let all = crate::CpuidEntry {
                flags: 0,
                eax: u32::MAX,
                ebx: u32::MAX,
                ecx: u32::MAX,
                edx: u32::MAX,
            };
            (k, all)
        })
        .collect();
        t.apply_cpuid(&mut cpuid).unwrap();
        // Family 6 model 0x3f stepping 2 in the version, as Firecracker's T2A.
        assert_eq!(cpuid[&(1, 0)].eax & 0x0fff_3fff, 0x0003_06f2);
        // MONITOR (leaf 1 ECX[3]) hidden; MCE and MTRR (EDX[7], EDX[12]) kept on.
        assert_eq!(cpuid[&(1, 0)].ecx & (1 << 3), 0);
        assert_eq!(cpuid[&(1, 0)].edx & (1 << 7 | 1 << 12), 1 << 7 | 1 << 12);
        // AVX512F (leaf 7 EBX[16]) and SHA (EBX[29]) hidden, ERMS (EBX[9]) shown.
        assert_eq!(cpuid[&(7, 0)].ebx & (1 << 16 | 1 << 29), 0);
        assert_ne!(cpuid[&(7, 0)].ebx & (1 << 9), 0);
        assert_eq!(cpuid[&(7, 0)].flags, 1);
        // SVM, SSE4A (0x8000_0001 ECX[2], [6]) and 1 GiB pages (EDX[26]) hidden.
        assert_eq!(cpuid[&(0x8000_0001, 0)].ecx & (1 << 2 | 1 << 6), 0);
        assert_eq!(cpuid[&(0x8000_0001, 0)].edx & (1 << 26), 0);
        // CLZERO hidden, IbrsPreferred/IbrsSameMode/EferLmsleUnsupported set.
        assert_eq!(cpuid[&(0x8000_0008, 0)].ebx & 1, 0);
        assert_eq!(cpuid[&(0x8000_0008, 0)].ebx & (0b111 << 18), 0b111 << 18);
        assert!(t.msr_modifiers.is_empty());
    }

    #[test]
    fn every_table_is_consistent() {
        for t in [
            StaticCpuTemplate::C3,
            StaticCpuTemplate::T2,
            StaticCpuTemplate::T2S,
            StaticCpuTemplate::T2CL,
            StaticCpuTemplate::T2A,
        ] {
            let tpl = t.template();
            assert!(!tpl.cpuid_modifiers.is_empty(), "{t}");
            // A value bit outside its filter would be a typo in the table.
            for l in &tpl.cpuid_modifiers {
                for m in &l.modifiers {
                    assert_eq!(
                        m.bitmap.value & !m.bitmap.filter,
                        0,
                        "{t} leaf {:#x}",
                        l.leaf
                    );
                }
            }
            // The JSON form reads back to the same template.
            assert_eq!(
                crate::CustomCpuTemplate::from_value(tpl.to_value()).unwrap(),
                tpl
            );
        }
        assert_eq!(
            StaticCpuTemplate::T2S.template().msr_modifiers[0].addr,
            0x10a
        );
        assert_eq!(
            StaticCpuTemplate::None.template(),
            CustomCpuTemplate::default()
        );
    }
}
