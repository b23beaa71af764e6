//! Ember's snapshot state file: everything of a paused microVM except its
//! memory, as one [`MicrovmState`], encoded with a header and a checksum.
//!
//! ```text
//! offset  size  field
//! 0       8     magic, the bytes "EMBRSNAP"
//! 8       2     format major version (little endian)
//! 10      2     format minor version
//! 12      2     format patch version
//! 14      2     reserved, zero
//! 16      8     body length in bytes (little endian)
//! 24      n     body: the MicrovmState, bitcode-encoded
//! 24+n    8     CRC-64/XZ of every byte before it (little endian)
//! ```
//!
//! The file is untrusted input: [`decode`] checks the header, the length,
//! the checksum, then the state itself ([`MicrovmState::validate`]: the
//! configuration, the vCPU count, the memory layout, the device set and
//! where each device sits), and returns a [`SnapshotError`] naming what is
//! wrong; it never panics. Each device's own state is checked again by the
//! device when it is restored.
//!
//! The guest memory goes to a separate file, region after region in guest
//! address order ([`MicrovmState::memory`] gives each region's offset in
//! it), so that a restore can map it instead of reading it.
//!
//! # Example
//!
//! ```
//! use ember_snapshot::{decode, encode, SnapshotError, SNAPSHOT_VERSION};
//!
//! // A state comes from a paused VM; any byte string is checked on the way in.
//! let err = decode(b"not a snapshot").unwrap_err();
//! assert!(matches!(err, SnapshotError::Truncated { .. }));
//! assert_eq!(SNAPSHOT_VERSION.to_string(), "1.0.0");
//! # let _ = encode;
//! ```

#![deny(missing_docs)]

mod crc;

use std::fmt;

use ember_config::{drives_in_attach_order, VmConfig};
use ember_irqchip::IrqChipState;
use ember_legacy_devices::i8042::I8042State;
use ember_legacy_devices::serial::SerialDeviceState;
use ember_vcpu::VcpuState;
use ember_virtio_balloon::BalloonState;
use ember_virtio_blk::BlockState;
use ember_virtio_mmio::MmioTransportState;
use ember_virtio_net::NetState;
use ember_virtio_rng::EntropyState;
use ember_vsock::VsockState;
use serde::{Deserialize, Serialize};

pub use crc::crc64;

/// The first 8 bytes of every Ember snapshot state file.
pub const MAGIC: [u8; 8] = *b"EMBRSNAP";
/// Header length: magic, version, reserved, body length.
pub const HEADER_LEN: usize = 24;
/// Checksum length, after the body.
pub const CRC_LEN: usize = 8;
/// Largest state file [`decode`] reads: far above any real state (a few
/// hundred KiB for 32 vCPUs), low enough that a hostile length cannot make
/// the VMM allocate much.
pub const MAX_STATE_LEN: u64 = 64 << 20;

/// A snapshot format version, printed as Firecracker prints its own
/// (`--describe-snapshot`, `--snapshot-version`) without the `v`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Version {
    /// Incompatible layout changes.
    pub major: u16,
    /// Additions an older reader cannot read.
    pub minor: u16,
    /// Changes every reader of the same major and minor version reads.
    pub patch: u16,
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// The version Ember writes. It reads the same major version with a minor
/// version up to its own, as Firecracker does.
pub const SNAPSHOT_VERSION: Version = Version {
    major: 1,
    minor: 0,
    patch: 0,
};

/// Why a snapshot state (or its memory file) was refused.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The file ends before a field it must hold.
    #[error(
        "the snapshot state file is truncated: {what} needs {needed} bytes, the file has {len}"
    )]
    Truncated {
        /// The field that does not fit.
        what: &'static str,
        /// Bytes needed up to the end of that field.
        needed: u64,
        /// Bytes in the file.
        len: u64,
    },
    /// The file does not start with [`MAGIC`].
    #[error("not an Ember snapshot state file: bad magic number {0:02x?}")]
    BadMagic([u8; 8]),
    /// A version this build cannot read.
    #[error("unsupported snapshot format version {found}: this Ember reads {major}.0.0 to {current}", major = SNAPSHOT_VERSION.major, current = SNAPSHOT_VERSION)]
    UnsupportedVersion {
        /// The file's version.
        found: Version,
    },
    /// The reserved header field is not zero.
    #[error("the snapshot header's reserved field is {0:#x}, not 0")]
    Reserved(u16),
    /// The file is larger than [`MAX_STATE_LEN`] or than its header says.
    #[error("the snapshot state file has {extra} bytes after its checksum")]
    TrailingBytes {
        /// Bytes past the checksum.
        extra: u64,
    },
    /// The file is larger than any state Ember writes.
    #[error("the snapshot state file is {len} bytes, more than the {max} bytes a state can have")]
    TooLarge {
        /// Its length.
        len: u64,
        /// [`MAX_STATE_LEN`].
        max: u64,
    },
    /// The checksum does not match the bytes.
    #[error(
        "snapshot checksum mismatch: the file says {stored:#018x}, its bytes give {computed:#018x}"
    )]
    Checksum {
        /// In the file.
        stored: u64,
        /// Over the file's bytes.
        computed: u64,
    },
    /// The body is not a valid encoding of a [`MicrovmState`].
    #[error("cannot decode the snapshot state: {0}")]
    Decode(String),
    /// The state could not be encoded.
    #[error("cannot encode the snapshot state: {0}")]
    Encode(String),
    /// The saved configuration is not one Ember accepts.
    #[error("the snapshot's microVM configuration is invalid: {0}")]
    Config(String),
    /// The number of vCPU states differs from the configured count.
    #[error("the snapshot holds {states} vCPU states for a microVM of {configured} vCPUs")]
    VcpuCount {
        /// vCPU states in the file.
        states: usize,
        /// `machine-config.vcpu_count`.
        configured: u8,
    },
    /// The memory regions are not those of the configured memory size.
    #[error("the snapshot's memory layout {found:?} is not the layout of {mem_size_mib} MiB: {expected:?}")]
    MemoryLayout {
        /// Regions in the file, (guest address, size, file offset).
        found: Vec<(u64, u64, u64)>,
        /// Regions of the configured size.
        expected: Vec<(u64, u64, u64)>,
        /// `machine-config.mem_size_mib`.
        mem_size_mib: usize,
    },
    /// The memory file is too short for the layout.
    #[error("the memory file is {len} bytes, the snapshot's memory layout needs {needed}")]
    MemoryFileTooShort {
        /// Its length.
        len: u64,
        /// The layout's total size.
        needed: u64,
    },
    /// The saved devices are not those of the saved configuration, or not
    /// where Ember places them.
    #[error("the snapshot's devices do not match its configuration: {0}")]
    Devices(String),
}

/// One guest memory region and where its bytes are in the memory file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRegion {
    /// Guest-physical start address.
    pub guest_addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// Offset of its first byte in the memory file.
    pub file_offset: u64,
}

/// A virtio-mmio device: where it sits, its transport and its own state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioDeviceState<T> {
    /// `drive_id` or `iface_id`; `vsock` for the vsock device.
    pub id: String,
    /// Base address of its MMIO window.
    pub addr: u64,
    /// Its interrupt line.
    pub gsi: u32,
    /// The virtio-mmio registers and queues.
    pub transport: MmioTransportState,
    /// The device's own state.
    pub device: T,
}

/// Everything of a paused microVM but its memory.
#[derive(Debug, Serialize, Deserialize)]
pub struct MicrovmState {
    /// The configuration the VM runs with (`GET /vm/config`), as JSON: the
    /// machine configuration and every device's configuration (drive
    /// paths, TAP names, vsock CID and socket).
    pub config_json: String,
    /// Guest memory regions in guest address order.
    pub memory: Vec<MemoryRegion>,
    /// Every vCPU, by index.
    pub vcpus: Vec<VcpuState>,
    /// PICs, IOAPIC, PIT and KVM clock.
    pub irqchip: IrqChipState,
    /// COM1.
    pub serial: SerialDeviceState,
    /// The i8042.
    pub i8042: I8042State,
    /// Block devices in slot order.
    pub drives: Vec<VirtioDeviceState<BlockState>>,
    /// Network devices in slot order.
    pub nets: Vec<VirtioDeviceState<NetState>>,
    /// The vsock device.
    pub vsock: Option<VirtioDeviceState<VsockState>>,
    /// The entropy device.
    pub entropy: Option<VirtioDeviceState<EntropyState>>,
    /// The balloon.
    pub balloon: Option<VirtioDeviceState<BalloonState>>,
}

/// The memory layout Ember gives `mem_size_mib` MiB: (guest address, size,
/// file offset) per region.
pub fn memory_layout(mem_size_mib: usize) -> Vec<MemoryRegion> {
    let bytes = (mem_size_mib as u64).saturating_mul(1 << 20);
    let mut offset = 0u64;
    ember_boot::arch_memory_regions(bytes)
        .into_iter()
        .map(|(addr, size)| {
            let region = MemoryRegion {
                guest_addr: addr.0,
                size: size as u64,
                file_offset: offset,
            };
            offset = offset.saturating_add(size as u64);
            region
        })
        .collect()
}

fn triples(regions: &[MemoryRegion]) -> Vec<(u64, u64, u64)> {
    regions
        .iter()
        .map(|r| (r.guest_addr, r.size, r.file_offset))
        .collect()
}

impl MicrovmState {
    /// The saved configuration, parsed and validated.
    ///
    /// # Errors
    ///
    /// [`SnapshotError::Config`].
    pub fn config(&self) -> Result<VmConfig, SnapshotError> {
        VmConfig::from_json(&self.config_json).map_err(|e| SnapshotError::Config(e.to_string()))
    }

    /// Bytes of guest memory the layout holds: the memory file's least
    /// length.
    pub fn memory_len(&self) -> u64 {
        self.memory
            .iter()
            .map(|r| r.file_offset.saturating_add(r.size))
            .max()
            .unwrap_or(0)
    }

    /// Refuses a memory file of `len` bytes shorter than the layout.
    ///
    /// # Errors
    ///
    /// [`SnapshotError::MemoryFileTooShort`].
    pub fn check_memory_file(&self, len: u64) -> Result<(), SnapshotError> {
        let needed = self.memory_len();
        if len < needed {
            return Err(SnapshotError::MemoryFileTooShort { len, needed });
        }
        Ok(())
    }

    /// Checks that the state describes a VM Ember builds: a valid
    /// configuration, one vCPU state per configured vCPU, the memory layout
    /// of the configured size, and the configured devices, each in the
    /// slot and on the GSI Ember gives it (the balloon, drives root first,
    /// network interfaces, vsock, then the entropy device, from 0xc000_1000
    /// and GSI 5).
    ///
    /// # Errors
    ///
    /// The first inconsistency found.
    pub fn validate(&self) -> Result<VmConfig, SnapshotError> {
        let config = self.config()?;
        let machine = &config.machine_config;
        if self.vcpus.len() != usize::from(machine.vcpu_count) {
            return Err(SnapshotError::VcpuCount {
                states: self.vcpus.len(),
                configured: machine.vcpu_count,
            });
        }
        let expected = memory_layout(machine.mem_size_mib);
        if self.memory != expected {
            return Err(SnapshotError::MemoryLayout {
                found: triples(&self.memory),
                expected: triples(&expected),
                mem_size_mib: machine.mem_size_mib,
            });
        }

        let drive_ids: Vec<&str> = drives_in_attach_order(&config.drives)
            .into_iter()
            .map(|d| d.drive_id.as_str())
            .collect();
        let net_ids: Vec<&str> = config
            .network_interfaces
            .iter()
            .map(|n| n.iface_id.as_str())
            .collect();
        let mut slot = 0u64;
        let mut check = |kind: &str, id: &str, addr: u64, gsi: u32| {
            let want_addr = ember_boot::layout::VIRTIO_MMIO_START
                + slot * ember_boot::layout::VIRTIO_MMIO_SLOT_SIZE;
            let want_gsi = 5 + slot as u32;
            slot += 1;
            if addr != want_addr || gsi != want_gsi {
                return Err(SnapshotError::Devices(format!(
                    "{kind} `{id}` is at {addr:#x} on GSI {gsi}, Ember places it at {want_addr:#x} on GSI {want_gsi}"
                )));
            }
            Ok(())
        };
        let optional = |check: &mut SlotCheck<'_>,
                        kind: &str,
                        saved: Option<(&str, u64, u32)>,
                        configured: bool| {
            let a = if kind.starts_with(['a', 'e', 'i', 'o', 'u']) {
                "an"
            } else {
                "a"
            };
            match (saved, configured) {
                (Some((id, addr, gsi)), true) => check(kind, id, addr, gsi),
                (None, false) => Ok(()),
                (Some(_), false) => Err(SnapshotError::Devices(format!(
                    "{a} {kind} state without {a} {kind} configuration"
                ))),
                (None, true) => Err(SnapshotError::Devices(format!(
                    "{a} {kind} configuration without {a} {kind} state"
                ))),
            }
        };
        // Firecracker attaches the balloon first.
        optional(
            &mut check,
            "balloon device",
            self.balloon
                .as_ref()
                .map(|d| (d.id.as_str(), d.addr, d.gsi)),
            config.balloon.is_some(),
        )?;
        let saved: Vec<&str> = self.drives.iter().map(|d| d.id.as_str()).collect();
        if saved != drive_ids {
            return Err(SnapshotError::Devices(format!(
                "block devices {saved:?}, configured drives {drive_ids:?}"
            )));
        }
        for d in &self.drives {
            check("drive", &d.id, d.addr, d.gsi)?;
        }
        let saved: Vec<&str> = self.nets.iter().map(|d| d.id.as_str()).collect();
        if saved != net_ids {
            return Err(SnapshotError::Devices(format!(
                "network devices {saved:?}, configured interfaces {net_ids:?}"
            )));
        }
        for n in &self.nets {
            check("network interface", &n.id, n.addr, n.gsi)?;
        }
        optional(
            &mut check,
            "vsock device",
            self.vsock.as_ref().map(|d| (d.id.as_str(), d.addr, d.gsi)),
            config.vsock.is_some(),
        )?;
        optional(
            &mut check,
            "entropy device",
            self.entropy
                .as_ref()
                .map(|d| (d.id.as_str(), d.addr, d.gsi)),
            config.entropy.is_some(),
        )?;
        Ok(config)
    }
}

/// Checks that device `kind` `id` sits at `addr` on `gsi`, the next slot.
type SlotCheck<'a> = dyn FnMut(&str, &str, u64, u32) -> Result<(), SnapshotError> + 'a;

/// Encodes `state` as a state file's bytes.
///
/// # Errors
///
/// [`SnapshotError::Encode`] when the state cannot be serialized.
pub fn encode(state: &MicrovmState) -> Result<Vec<u8>, SnapshotError> {
    let body = bitcode::serialize(state).map_err(|e| SnapshotError::Encode(e.to_string()))?;
    let mut out = Vec::with_capacity(HEADER_LEN + body.len() + CRC_LEN);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&SNAPSHOT_VERSION.major.to_le_bytes());
    out.extend_from_slice(&SNAPSHOT_VERSION.minor.to_le_bytes());
    out.extend_from_slice(&SNAPSHOT_VERSION.patch.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&body);
    let crc = crc64(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(out)
}

fn u16_at(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([bytes[at], bytes[at + 1]])
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(b)
}

/// Reads the format version from the start of a state file (what
/// `--describe-snapshot` prints), after checking the magic number.
///
/// # Errors
///
/// [`SnapshotError::Truncated`] or [`SnapshotError::BadMagic`].
pub fn format_version(bytes: &[u8]) -> Result<Version, SnapshotError> {
    let len = bytes.len() as u64;
    if bytes.len() < 16 {
        return Err(SnapshotError::Truncated {
            what: "the header",
            needed: 16,
            len,
        });
    }
    let mut magic = [0u8; 8];
    magic.copy_from_slice(&bytes[..8]);
    if magic != MAGIC {
        return Err(SnapshotError::BadMagic(magic));
    }
    Ok(Version {
        major: u16_at(bytes, 8),
        minor: u16_at(bytes, 10),
        patch: u16_at(bytes, 12),
    })
}

/// Decodes and validates a state file's bytes ([`MicrovmState::validate`]).
///
/// # Errors
///
/// The first thing wrong, in file order: length, magic, version, reserved
/// field, body length, checksum, encoding, then the state's consistency.
pub fn decode(bytes: &[u8]) -> Result<MicrovmState, SnapshotError> {
    decode_unchecked(bytes).and_then(|state| state.validate().map(|_| state))
}

/// [`decode`] without [`MicrovmState::validate`]: the header, the checksum
/// and the encoding only.
///
/// # Errors
///
/// As [`decode`].
pub fn decode_unchecked(bytes: &[u8]) -> Result<MicrovmState, SnapshotError> {
    let len = bytes.len() as u64;
    if len > MAX_STATE_LEN {
        return Err(SnapshotError::TooLarge {
            len,
            max: MAX_STATE_LEN,
        });
    }
    let found = format_version(bytes)?;
    if found.major != SNAPSHOT_VERSION.major || found.minor > SNAPSHOT_VERSION.minor {
        return Err(SnapshotError::UnsupportedVersion { found });
    }
    if bytes.len() < HEADER_LEN {
        return Err(SnapshotError::Truncated {
            what: "the header",
            needed: HEADER_LEN as u64,
            len,
        });
    }
    let reserved = u16_at(bytes, 14);
    if reserved != 0 {
        return Err(SnapshotError::Reserved(reserved));
    }
    let body_len = u64_at(bytes, 16);
    let needed = (HEADER_LEN as u64)
        .saturating_add(body_len)
        .saturating_add(CRC_LEN as u64);
    if needed > len {
        return Err(SnapshotError::Truncated {
            what: "the body and checksum",
            needed,
            len,
        });
    }
    if needed < len {
        return Err(SnapshotError::TrailingBytes {
            extra: len - needed,
        });
    }
    // `needed == len`, which fits in memory: the casts are exact.
    let crc_at = HEADER_LEN + body_len as usize;
    let stored = u64_at(bytes, crc_at);
    let computed = crc64(&bytes[..crc_at]);
    if stored != computed {
        return Err(SnapshotError::Checksum { stored, computed });
    }
    bitcode::deserialize(&bytes[HEADER_LEN..crc_at])
        .map_err(|e| SnapshotError::Decode(e.to_string()))
}

#[cfg(test)]
mod tests;
