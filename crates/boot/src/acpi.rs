// SPDX-License-Identifier: Apache-2.0

//! ACPI tables that describe the machine to the guest.
//!
//! The set is Firecracker's: an RSDP (revision 2) at [`RSDP_ADDR`], an XSDT
//! that lists a FADT and a MADT, and a DSDT reached through the FADT's
//! `X_DSDT`. The platform is hardware-reduced ACPI (no PM registers, no
//! SCI, no FACS); the MADT describes one local APIC per vCPU and the
//! IOAPIC; the DSDT describes the virtio-mmio devices (`LNRO0005`, which
//! Linux binds to `virtio-mmio` through `drivers/acpi/acpi_platform.c`),
//! COM1 and the i8042.
//!
//! The tables are encoded by rust-vmm's `acpi_tables` crate and written
//! into the reserved system-data area `[SYSTEM_MEM_START, RSDP_ADDR)`,
//! starting at [`ACPI_TABLES_START`] (right after the 1 KiB EBDA that holds
//! the MP table, where Firecracker puts them) or after the MP table when
//! that outgrows the EBDA. The e820 map already reports that whole area as
//! reserved, and the MP table is left intact: Linux prefers ACPI, a kernel
//! booted with `acpi=off` still finds the MP table.
//!
//! # Example
//!
//! ```
//! use ember_boot::acpi::{create_acpi_tables, VirtioMmioDeviceInfo};
//! use ember_boot::layout;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mem = ember_boot::create_guest_memory(128)?;
//! let block = VirtioMmioDeviceInfo {
//!     addr: layout::VIRTIO_MMIO_START,
//!     len: layout::VIRTIO_MMIO_SLOT_SIZE,
//!     gsi: layout::IRQ_BASE,
//! };
//! let rsdp = create_acpi_tables(&mem, 2, &[block])?;
//! assert_eq!(rsdp.0, layout::RSDP_ADDR);
//! // Then: configure_system_with_rsdp(&mem, &kernel, &cmdline, initrd, 2, Some(rsdp)).
//! # Ok(())
//! # }
//! ```

use acpi_tables::aml::{
    Device, EISAName, Interrupt, Memory32Fixed, Method, Name, Path, ResourceTemplate, Return, IO,
    ONE,
};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError, GuestMemoryMmap};

use crate::layout::{APIC_ADDR, EBDA_START, IOAPIC_ADDR, IRQ_BASE, IRQ_MAX, RSDP_ADDR};
use crate::mptable::{mptable_size, MAX_SUPPORTED_CPUS};

/// OEM ID in the RSDP and in every table header (ACPI 6.5 section 5.2.6).
pub const OEM_ID: [u8; 6] = *b"EMBER ";
/// OEM table ID in every table header.
pub const OEM_TABLE_ID: [u8; 8] = *b"EMBERVM ";
/// OEM revision in every table header (Firecracker writes 0 too).
pub const OEM_REVISION: u32 = 0;
/// FADT `Hypervisor Vendor Identity` (ACPI 6.5 section 5.2.9, table 5.9;
/// present since ACPI 6.0), where Firecracker writes `FIRECKVM`.
pub const HYPERVISOR_VENDOR_ID: [u8; 8] = *b"EMBERVMM";

/// `_HID` Linux matches to the virtio-mmio driver
/// (`drivers/virtio/virtio_mmio.c`, `virtio_mmio_acpi_match`).
pub const VIRTIO_MMIO_HID: &str = "LNRO0005";

/// Size of the EBDA the MP table lives in.
const EBDA_SIZE: u64 = 0x400;
/// Where the first table goes: right after the EBDA, as in Firecracker
/// (`ACPI_MEM_START = EBDA_START + EBDA_SIZE`). With more vCPUs than the
/// EBDA's MP table holds (37), the tables move past the MP table.
pub const ACPI_TABLES_START: u64 = EBDA_START + EBDA_SIZE;

/// Revision of the DSDT: 2 makes AML integers 64-bit (ACPI 6.5 section
/// 5.2.11.1).
const DSDT_REVISION: u8 = 2;

// IA-PC boot architecture flags (ACPI 6.5 section 5.2.9.3, table 5.11).
// Firecracker sets these three and leaves "legacy devices" and "8042"
// clear; Linux then finds the i8042 through its `PNP0303` device in the
// DSDT.
/// No VGA hardware.
const IAPC_BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;
/// The OS must not enable MSIs.
const IAPC_BOOT_ARCH_MSI_NOT_SUPPORTED: u16 = 1 << 3;
/// The OS must not enable PCIe ASPM control.
const IAPC_BOOT_ARCH_PCIE_ASPM_CONTROLS: u16 = 1 << 4;
/// The FADT's `IAPC_BOOT_ARCH`.
const IAPC_BOOT_ARCH: u16 = IAPC_BOOT_ARCH_VGA_NOT_PRESENT
    | IAPC_BOOT_ARCH_MSI_NOT_SUPPORTED
    | IAPC_BOOT_ARCH_PCIE_ASPM_CONTROLS;

// COM1, Ember's only UART: I/O ports and ISA IRQ of the IBM PC/AT
// assignment. The i8042: data and command/status ports and keyboard IRQ
// (Linux `drivers/input/serio/i8042-io.h`). Same values as the
// legacy-devices crate, which this crate does not depend on.
/// COM1 I/O base.
const COM1_PORT: u16 = 0x3f8;
/// COM1 register count.
const COM1_PORT_LEN: u8 = 8;
/// COM1 interrupt.
const COM1_GSI: u32 = 4;
/// i8042 data port.
const I8042_DATA_PORT: u16 = 0x60;
/// i8042 command and status port.
const I8042_COMMAND_PORT: u16 = 0x64;
/// i8042 keyboard interrupt.
const I8042_KBD_GSI: u32 = 1;
/// `_STA` value: present, enabled, shown in the UI, functioning (ACPI 6.5
/// section 6.3.7).
const STA_PRESENT_AND_WORKING: u8 = 0x0f;

/// One virtio-mmio device as the guest should see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioMmioDeviceInfo {
    /// Guest physical base of the register window.
    pub addr: u64,
    /// Length of the register window (a slot is
    /// [`VIRTIO_MMIO_SLOT_SIZE`](crate::layout::VIRTIO_MMIO_SLOT_SIZE)).
    pub len: u64,
    /// IOAPIC pin the device interrupts on (edge-triggered, active high).
    pub gsi: u32,
}

/// Errors of ACPI table creation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The vCPU count is zero or above what the MADT (and the MP table,
    /// whose IOAPIC ID it shares) can describe.
    #[error("invalid vCPU count {num_cpus}: the MADT describes 1 to {max} vCPUs")]
    InvalidCpuCount {
        /// Requested vCPUs.
        num_cpus: u8,
        /// [`MAX_SUPPORTED_CPUS`].
        max: u8,
    },
    /// A device's register window is empty or does not lie below 4 GiB,
    /// so a `Memory32Fixed` descriptor cannot describe it.
    #[error(
        "virtio-mmio device {index} has register window [{addr:#x}, +{len:#x}), which is empty \
         or not below 4 GiB"
    )]
    DeviceWindow {
        /// Position of the device in the list.
        index: usize,
        /// Its base address.
        addr: u64,
        /// Its length.
        len: u64,
    },
    /// A device's GSI is not one of the IOAPIC pins free for devices.
    #[error("virtio-mmio device {index} uses GSI {gsi}; devices must use GSIs {min} to {max}")]
    InvalidGsi {
        /// Position of the device in the list.
        index: usize,
        /// The GSI.
        gsi: u32,
        /// [`IRQ_BASE`].
        min: u32,
        /// [`IRQ_MAX`].
        max: u32,
    },
    /// Two devices use the same GSI, but the DSDT declares every device
    /// interrupt exclusive.
    #[error("virtio-mmio devices {first} and {second} both use GSI {gsi}")]
    SharedGsi {
        /// The earlier device.
        first: usize,
        /// The later device.
        second: usize,
        /// The GSI.
        gsi: u32,
    },
    /// The tables run into the RSDP.
    #[error("ACPI tables need [{start:#x}, {end:#x}), past the RSDP at {limit:#x}")]
    TablesDoNotFit {
        /// First table byte.
        start: u64,
        /// End of the last table.
        end: u64,
        /// [`RSDP_ADDR`].
        limit: u64,
    },
    /// Guest memory does not cover a table.
    #[error("the {what} ({len} bytes at {addr:#x}) is not in guest memory")]
    NotInGuestMemory {
        /// The table.
        what: &'static str,
        /// Its guest address.
        addr: u64,
        /// Its length.
        len: usize,
    },
    /// Writing a table into guest memory failed.
    #[error("failed to write the {what} at {addr:#x}: {source}")]
    GuestWrite {
        /// The table.
        what: &'static str,
        /// Its guest address.
        addr: u64,
        /// The guest memory error.
        #[source]
        source: GuestMemoryError,
    },
}

/// Serialises an `acpi_tables` object.
fn to_bytes(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

/// Hands out consecutive guest addresses for the tables, in the order they
/// are built (DSDT, FADT, MADT, XSDT, as in Firecracker).
struct TablePlacer {
    tables: Vec<(&'static str, u64, Vec<u8>)>,
    next: u64,
}

impl TablePlacer {
    /// Places `bytes` at the next free address and returns that address.
    fn place(&mut self, what: &'static str, bytes: Vec<u8>) -> u64 {
        let addr = self.next;
        // At most a few KiB each; the sum is checked against RSDP_ADDR.
        self.next += bytes.len() as u64;
        self.tables.push((what, addr, bytes));
        addr
    }
}

/// Where the first table goes for `num_cpus` vCPUs: [`ACPI_TABLES_START`],
/// or the end of the MP table when it is longer than the EBDA.
fn tables_start(num_cpus: u8) -> u64 {
    let mptable_end = EBDA_START + mptable_size(num_cpus) as u64;
    ACPI_TABLES_START.max(mptable_end)
}

fn validate_devices(devices: &[VirtioMmioDeviceInfo]) -> Result<(), Error> {
    for (index, dev) in devices.iter().enumerate() {
        let end = dev.addr.checked_add(dev.len);
        if dev.len == 0 || end.is_none_or(|end| end > 1 << 32) {
            return Err(Error::DeviceWindow {
                index,
                addr: dev.addr,
                len: dev.len,
            });
        }
        if !(IRQ_BASE..=IRQ_MAX).contains(&dev.gsi) {
            return Err(Error::InvalidGsi {
                index,
                gsi: dev.gsi,
                min: IRQ_BASE,
                max: IRQ_MAX,
            });
        }
        if let Some(first) = devices[..index].iter().position(|d| d.gsi == dev.gsi) {
            return Err(Error::SharedGsi {
                first,
                second: index,
                gsi: dev.gsi,
            });
        }
    }
    Ok(())
}

/// AML of one virtio-mmio device, as Firecracker writes it
/// (`add_virtio_aml`): `_HID "LNRO0005"`, `_UID`, `_CCA` (DMA is cache
/// coherent) and a `_CRS` with the register window and one extended
/// interrupt (consumer, edge-triggered, active high, exclusive). Linux's
/// ACPI platform-device code turns `_CRS` into the memory and IRQ
/// resources `virtio_mmio_probe` reads.
fn virtio_mmio_aml(index: usize, dev: &VirtioMmioDeviceInfo, sink: &mut Vec<u8>) {
    // validate_devices checked that the window ends at or below 4 GiB and
    // allows at most IRQ_MAX - IRQ_BASE + 1 devices, so the casts are
    // lossless and the name keeps four characters.
    let uid = index as u32;
    let name = format!("V{index:03}");
    Device::new(
        Path::new(&name),
        vec![
            &Name::new("_HID".into(), &VIRTIO_MMIO_HID),
            &Name::new("_UID".into(), &uid),
            &Name::new("_CCA".into(), &ONE),
            &Name::new(
                "_CRS".into(),
                &ResourceTemplate::new(vec![
                    &Memory32Fixed::new(true, dev.addr as u32, dev.len as u32),
                    &Interrupt::new(true, true, false, false, dev.gsi),
                ]),
            ),
        ],
    )
    .to_aml_bytes(sink);
}

/// AML of the legacy devices, as Firecracker's `PortIODeviceManager`
/// writes it for the ports Ember emulates: COM1 (`PNP0501`, 16550A UART)
/// and the i8042 (`PNP0303`). Linux's PNP ACPI layer hands these to the
/// 8250 and i8042 drivers.
fn legacy_devices_aml(sink: &mut Vec<u8>) {
    Device::new(
        "_SB_.COM1".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0501")),
            &Name::new("_UID".into(), &0u8),
            &Name::new("_DDN".into(), &"COM1"),
            &Name::new(
                "_CRS".into(),
                &ResourceTemplate::new(vec![
                    &Interrupt::new(true, true, false, false, COM1_GSI),
                    &IO::new(COM1_PORT, COM1_PORT, 1, COM1_PORT_LEN),
                ]),
            ),
        ],
    )
    .to_aml_bytes(sink);

    Device::new(
        "_SB_.PS2_".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0303")),
            &Method::new(
                "_STA".into(),
                0,
                false,
                vec![&Return::new(&STA_PRESENT_AND_WORKING)],
            ),
            &Name::new(
                "_CRS".into(),
                &ResourceTemplate::new(vec![
                    &IO::new(I8042_DATA_PORT, I8042_DATA_PORT, 1, 1),
                    &IO::new(I8042_COMMAND_PORT, I8042_COMMAND_PORT, 1, 1),
                    &Interrupt::new(true, true, false, false, I8042_KBD_GSI),
                ]),
            ),
        ],
    )
    .to_aml_bytes(sink);
}

/// The DSDT: the virtio-mmio devices in the order given (their order in
/// the namespace is the order Linux probes them, so the root block device
/// should come first to become `/dev/vda`), then the legacy devices.
fn build_dsdt(devices: &[VirtioMmioDeviceInfo]) -> Vec<u8> {
    let mut aml = Vec::new();
    for (index, dev) in devices.iter().enumerate() {
        virtio_mmio_aml(index, dev, &mut aml);
    }
    legacy_devices_aml(&mut aml);

    let mut dsdt = Sdt::new(
        *b"DSDT",
        // The bare 36-byte header; append_slice grows it.
        36,
        DSDT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    dsdt.append_slice(&aml);
    dsdt.as_slice().to_vec()
}

/// The FADT (ACPI 6.5 section 5.2.9, revision 6.5 as Firecracker): a
/// hardware-reduced platform without fixed power or sleep buttons, the
/// DSDT through the 64-bit `X_DSDT`.
fn build_fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.iapc_boot_arch = IAPC_BOOT_ARCH.into();
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(HYPERVISOR_VENDOR_ID).into();
    to_bytes(&fadt.finalize())
}

/// The MADT (ACPI 6.5 section 5.2.12): local APICs at [`APIC_ADDR`], no
/// PC-AT 8259 flag (as Firecracker), the IOAPIC with GSI base 0 and the
/// MP table's IOAPIC ID (`num_cpus + 1`), then one enabled local APIC per
/// vCPU with APIC ID and processor UID equal to the vCPU index. No
/// interrupt source overrides: ISA IRQ n is GSI n, the routing KVM sets up
/// and the MP table reports.
fn build_madt(num_cpus: u8) -> Vec<u8> {
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(APIC_ADDR as u32),
    );
    // num_cpus is at most MAX_SUPPORTED_CPUS (254), so the ID is at most 255.
    madt.add_structure(IoApic::new(num_cpus + 1, IOAPIC_ADDR as u32, 0));
    for cpu in 0..num_cpus {
        madt.add_structure(ProcessorLocalApic::new(cpu, cpu, EnabledStatus::Enabled));
    }
    to_bytes(&madt)
}

fn build_xsdt(entries: &[u64]) -> Vec<u8> {
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    for &entry in entries {
        xsdt.add_entry(entry);
    }
    to_bytes(&xsdt)
}

/// Writes the RSDP, XSDT, FADT, MADT and DSDT for `num_cpus` vCPUs (1 to
/// [`MAX_SUPPORTED_CPUS`]) and `virtio_devices` into guest memory and
/// returns the RSDP address, [`RSDP_ADDR`], to pass to
/// [`configure_system_with_rsdp`](crate::configure_system_with_rsdp).
///
/// The tables go into the reserved area after the MP table (see the
/// [module documentation](self)), so this may run before or after
/// [`configure_system_with_rsdp`](crate::configure_system_with_rsdp).
/// Devices must have non-empty register windows below 4 GiB and distinct
/// GSIs from [`IRQ_BASE`] to [`IRQ_MAX`]. Nothing is written when the
/// arguments are refused.
pub fn create_acpi_tables(
    mem: &GuestMemoryMmap,
    num_cpus: u8,
    virtio_devices: &[VirtioMmioDeviceInfo],
) -> Result<GuestAddress, Error> {
    if num_cpus == 0 || num_cpus > MAX_SUPPORTED_CPUS {
        return Err(Error::InvalidCpuCount {
            num_cpus,
            max: MAX_SUPPORTED_CPUS,
        });
    }
    validate_devices(virtio_devices)?;

    let start = tables_start(num_cpus);
    let mut placer = TablePlacer {
        tables: Vec::new(),
        next: start,
    };
    let dsdt_addr = placer.place("DSDT", build_dsdt(virtio_devices));
    let fadt_addr = placer.place("FADT", build_fadt(dsdt_addr));
    let madt_addr = placer.place("MADT", build_madt(num_cpus));
    let xsdt_addr = placer.place("XSDT", build_xsdt(&[fadt_addr, madt_addr]));
    if placer.next > RSDP_ADDR {
        return Err(Error::TablesDoNotFit {
            start,
            end: placer.next,
            limit: RSDP_ADDR,
        });
    }
    let mut tables = placer.tables;
    tables.push(("RSDP", RSDP_ADDR, to_bytes(&Rsdp::new(OEM_ID, xsdt_addr))));

    // Check every range before writing any, so a refusal leaves memory as
    // it was.
    for (what, addr, bytes) in &tables {
        if !mem.check_range(GuestAddress(*addr), bytes.len()) {
            return Err(Error::NotInGuestMemory {
                what,
                addr: *addr,
                len: bytes.len(),
            });
        }
    }
    for (what, addr, bytes) in &tables {
        mem.write_slice(bytes, GuestAddress(*addr))
            .map_err(|source| Error::GuestWrite {
                what,
                addr: *addr,
                source,
            })?;
        log::debug!(
            "ACPI {what}: {} bytes at {addr:#x}",
            bytes.len(),
            addr = *addr
        );
    }
    Ok(GuestAddress(RSDP_ADDR))
}

#[cfg(test)]
mod tests;
