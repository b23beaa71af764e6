//! KVM in-kernel interrupt controllers for an x86_64 microVM.
//!
//! The guest sees the same legacy interrupt hardware as on Firecracker: a pair of
//! cascaded 8259A PICs, one 82093AA IOAPIC with 24 pins and an 8254 PIT, all
//! emulated inside KVM. This crate
//!
//! - checks that KVM offers what the VMM relies on ([`check_capabilities`]),
//! - creates the interrupt controllers ([`setup`]),
//! - hands out the GSIs devices may use ([`GsiAllocator`]),
//! - wires an [`EventFd`] to a GSI so a device thread can raise an interrupt
//!   without going through the VMM ([`register_irqfd`]),
//! - saves and restores the controllers' and the KVM clock's state as one
//!   serializable struct ([`IrqChipState`]).
//!
//! # Example
//!
//! ```no_run
//! use ember_irqchip::{check_capabilities, register_irqfd, setup, GsiAllocator};
//! use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
//!
//! let kvm = kvm_ioctls::Kvm::new().unwrap();
//! check_capabilities(&kvm).unwrap();
//! let vm = kvm.create_vm().unwrap();
//! // The irqchip must exist before the first vCPU is created.
//! setup(&vm).unwrap();
//! let vcpu = vm.create_vcpu(0).unwrap();
//!
//! let mut gsis = GsiAllocator::new();
//! let gsi = gsis.allocate().unwrap();
//! let irq = EventFd::new(EFD_NONBLOCK).unwrap();
//! register_irqfd(&vm, &irq, gsi).unwrap();
//! irq.write(1).unwrap(); // the device raises its interrupt
//! # drop(vcpu);
//! ```

#![deny(missing_docs)]

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2, KVM_CLOCK_TSC_STABLE,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use serde::{Deserialize, Serialize};
use vmm_sys_util::errno;
use vmm_sys_util::eventfd::EventFd;

/// Guest-physical address of the three pages KVM needs for the TSS when it runs real-mode
/// code on Intel VMX (KVM_SET_TSS_ADDR). It lies in the hole below the 4 GiB boundary, under
/// the IOAPIC (0xfec0_0000), like on Firecracker, so it never overlaps guest RAM or MMIO
/// devices.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;

/// Highest GSI reserved for legacy ISA devices: 0 is the PIT, 1 the i8042 keyboard, 2 the
/// PIC cascade, 3 and 4 the serial ports COM2 and COM1.
pub const GSI_LEGACY_MAX: u32 = 4;

/// First GSI handed out to other devices (virtio-mmio) by [`GsiAllocator`].
pub const GSI_DEVICE_FIRST: u32 = 5;

/// Last GSI handed out by [`GsiAllocator`]: the IOAPIC has 24 pins, 0 to 23
/// (82093AA datasheet, I/O redirection table registers).
pub const GSI_DEVICE_LAST: u32 = 23;

/// Errors of the interrupt controller set-up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// KVM lacks a capability the VMM needs.
    #[error("KVM does not support {0}, which Ember needs for its in-kernel interrupt controllers")]
    MissingCapability(&'static str),
    /// KVM_SET_TSS_ADDR failed.
    #[error("failed to set the TSS address to {addr:#x} (KVM_SET_TSS_ADDR): {source}")]
    SetTssAddress {
        /// The address that was passed.
        addr: u64,
        /// The error from KVM.
        #[source]
        source: errno::Error,
    },
    /// KVM_CREATE_IRQCHIP reported that the VM already has interrupt controllers.
    #[error("the VM already has an in-kernel irqchip (KVM_CREATE_IRQCHIP: EEXIST): setup() may run only once per VM")]
    IrqChipExists,
    /// KVM_CREATE_IRQCHIP was refused because vCPUs already exist.
    #[error(
        "KVM_CREATE_IRQCHIP was refused (EINVAL): the irqchip must be created before any vCPU"
    )]
    IrqChipAfterVcpu,
    /// KVM_CREATE_IRQCHIP failed for another reason.
    #[error("failed to create the in-kernel PIC and IOAPIC (KVM_CREATE_IRQCHIP): {0}")]
    CreateIrqChip(#[source] errno::Error),
    /// KVM_CREATE_PIT2 reported that the VM already has a PIT.
    #[error("the VM already has an in-kernel PIT (KVM_CREATE_PIT2: EEXIST): setup() may run only once per VM")]
    PitExists,
    /// KVM_CREATE_PIT2 failed for another reason.
    #[error("failed to create the in-kernel i8254 PIT (KVM_CREATE_PIT2): {0}")]
    CreatePit(#[source] errno::Error),
    /// Every GSI in the device range is in use.
    #[error("no free GSI left: all of {GSI_DEVICE_FIRST}..={GSI_DEVICE_LAST} are allocated")]
    GsiExhausted,
    /// KVM_IRQFD (assign) failed.
    #[error("failed to attach an eventfd to GSI {gsi} (KVM_IRQFD): {source}")]
    RegisterIrqfd {
        /// The GSI.
        gsi: u32,
        /// The error from KVM.
        #[source]
        source: errno::Error,
    },
    /// KVM_IRQFD (deassign) failed.
    #[error("failed to detach an eventfd from GSI {gsi} (KVM_IRQFD deassign): {source}")]
    UnregisterIrqfd {
        /// The GSI.
        gsi: u32,
        /// The error from KVM.
        #[source]
        source: errno::Error,
    },
    /// KVM_GET_IRQCHIP failed.
    #[error("failed to read the {chip} state (KVM_GET_IRQCHIP): {source}")]
    GetIrqChip {
        /// Which controller.
        chip: &'static str,
        /// The error from KVM.
        #[source]
        source: errno::Error,
    },
    /// KVM_SET_IRQCHIP failed.
    #[error("failed to restore the {chip} state (KVM_SET_IRQCHIP): {source}")]
    SetIrqChip {
        /// Which controller.
        chip: &'static str,
        /// The error from KVM.
        #[source]
        source: errno::Error,
    },
    /// KVM_GET_PIT2 failed.
    #[error("failed to read the PIT state (KVM_GET_PIT2): {0}")]
    GetPit(#[source] errno::Error),
    /// KVM_SET_PIT2 failed.
    #[error("failed to restore the PIT state (KVM_SET_PIT2): {0}")]
    SetPit(#[source] errno::Error),
    /// KVM_GET_CLOCK failed.
    #[error("failed to read the KVM clock (KVM_GET_CLOCK): {0}")]
    GetClock(#[source] errno::Error),
    /// KVM_SET_CLOCK failed.
    #[error("failed to restore the KVM clock (KVM_SET_CLOCK): {0}")]
    SetClock(#[source] errno::Error),
}

/// The capabilities the VMM relies on, with the name used in error messages.
const REQUIRED_CAPABILITIES: [(Cap, &str); 7] = [
    (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
    (Cap::Pit2, "KVM_CAP_PIT2"),
    (Cap::PitState2, "KVM_CAP_PIT_STATE2"),
    (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
    (Cap::Irqfd, "KVM_CAP_IRQFD"),
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
];

/// Checks that KVM offers every capability the VMM needs for its interrupt controllers,
/// devices and memory.
///
/// # Errors
///
/// [`Error::MissingCapability`] naming the first missing capability, e.g. `KVM_CAP_PIT2`.
pub fn check_capabilities(kvm: &Kvm) -> Result<(), Error> {
    check_capabilities_except(kvm, &[])
}

/// [`check_capabilities`] without the capabilities numbered in `skip` (a CPU template's
/// `"!N"` entries: the user takes responsibility for them).
///
/// # Errors
///
/// As [`check_capabilities`].
pub fn check_capabilities_except(kvm: &Kvm, skip: &[u32]) -> Result<(), Error> {
    check_with(|cap| skip.contains(&(cap as u32)) || kvm.check_extension(cap))
}

fn check_with(mut has: impl FnMut(Cap) -> bool) -> Result<(), Error> {
    for (cap, name) in REQUIRED_CAPABILITIES {
        if !has(cap) {
            return Err(Error::MissingCapability(name));
        }
    }
    Ok(())
}

/// Creates the in-kernel interrupt controllers of `vm`: the TSS area, the PICs and IOAPIC,
/// and the PIT.
///
/// This must run before the first vCPU is created: KVM creates each vCPU's local APIC only
/// when the VM already has an irqchip, and refuses KVM_CREATE_IRQCHIP once a vCPU exists.
/// It may run only once per VM.
///
/// The PIT is created with `KVM_PIT_SPEAKER_DUMMY`, as on Firecracker, so that KVM also
/// emulates the PC speaker port 0x61 that Linux pokes while calibrating its timers.
///
/// # Errors
///
/// [`Error::IrqChipExists`] or [`Error::PitExists`] on a second call,
/// [`Error::IrqChipAfterVcpu`] when vCPUs already exist, otherwise the failing ioctl.
pub fn setup(vm: &VmFd) -> Result<(), Error> {
    // The value always fits: the address is below 4 GiB and usize is 64 bits on x86_64.
    vm.set_tss_address(KVM_TSS_ADDRESS as usize)
        .map_err(|source| Error::SetTssAddress {
            addr: KVM_TSS_ADDRESS,
            source,
        })?;
    vm.create_irq_chip().map_err(|e| match e.errno() {
        libc::EEXIST => Error::IrqChipExists,
        libc::EINVAL => Error::IrqChipAfterVcpu,
        _ => Error::CreateIrqChip(e),
    })?;
    let pit_config = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit_config).map_err(|e| match e.errno() {
        libc::EEXIST => Error::PitExists,
        _ => Error::CreatePit(e),
    })
}

/// Hands out the GSIs devices may use: [`GSI_DEVICE_FIRST`]..=[`GSI_DEVICE_LAST`], in
/// increasing order, each once. GSIs 0..=[`GSI_LEGACY_MAX`] belong to the legacy devices at
/// their fixed ISA numbers and are never handed out.
#[derive(Debug, Clone)]
pub struct GsiAllocator {
    next: u32,
}

impl GsiAllocator {
    /// Creates an allocator whose first GSI is [`GSI_DEVICE_FIRST`].
    pub fn new() -> Self {
        GsiAllocator {
            next: GSI_DEVICE_FIRST,
        }
    }

    /// Returns the next free GSI.
    ///
    /// # Errors
    ///
    /// [`Error::GsiExhausted`] once [`GSI_DEVICE_LAST`] has been handed out.
    pub fn allocate(&mut self) -> Result<u32, Error> {
        if self.next > GSI_DEVICE_LAST {
            return Err(Error::GsiExhausted);
        }
        let gsi = self.next;
        self.next += 1;
        Ok(gsi)
    }
}

impl Default for GsiAllocator {
    fn default() -> Self {
        Self::new()
    }
}

/// Makes every write to `evt` raise GSI `gsi` in the guest (KVM_IRQFD), without a trip
/// through the VMM.
///
/// # Errors
///
/// [`Error::RegisterIrqfd`], e.g. when the VM has no irqchip or `evt` is already attached.
pub fn register_irqfd(vm: &VmFd, evt: &EventFd, gsi: u32) -> Result<(), Error> {
    vm.register_irqfd(evt, gsi)
        .map_err(|source| Error::RegisterIrqfd { gsi, source })
}

/// Detaches `evt` from GSI `gsi`.
///
/// # Errors
///
/// [`Error::UnregisterIrqfd`] when KVM refuses.
pub fn unregister_irqfd(vm: &VmFd, evt: &EventFd, gsi: u32) -> Result<(), Error> {
    vm.unregister_irqfd(evt, gsi)
        .map_err(|source| Error::UnregisterIrqfd { gsi, source })
}

/// The state of the in-kernel PICs, IOAPIC and PIT and of the KVM clock, for snapshots.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct IrqChipState {
    /// The master 8259A PIC (IRQs 0-7).
    pub pic_master: kvm_irqchip,
    /// The slave 8259A PIC (IRQs 8-15).
    pub pic_slave: kvm_irqchip,
    /// The IOAPIC.
    pub ioapic: kvm_irqchip,
    /// The i8254 PIT.
    pub pit: kvm_pit_state2,
    /// The KVM clock (kvmclock's time base), so guest time does not jump on restore.
    pub clock: kvm_clock_data,
}

/// The controllers of KVM_GET_IRQCHIP with the names used in error messages.
const CHIPS: [(u32, &str); 3] = [
    (KVM_IRQCHIP_PIC_MASTER, "master PIC"),
    (KVM_IRQCHIP_PIC_SLAVE, "slave PIC"),
    (KVM_IRQCHIP_IOAPIC, "IOAPIC"),
];

impl IrqChipState {
    /// Reads the state of the in-kernel interrupt controllers and the PIT of `vm`.
    ///
    /// # Errors
    ///
    /// The failing ioctl, e.g. when [`setup`] has not run on `vm`.
    pub fn save(vm: &VmFd) -> Result<Self, Error> {
        let mut chips = [kvm_irqchip::default(); 3];
        for (chip, (id, name)) in chips.iter_mut().zip(CHIPS) {
            chip.chip_id = id;
            vm.get_irqchip(chip)
                .map_err(|source| Error::GetIrqChip { chip: name, source })?;
        }
        let pit = vm.get_pit2().map_err(Error::GetPit)?;
        let mut clock = vm.get_clock().map_err(Error::GetClock)?;
        // KVM_SET_CLOCK refuses this flag, which only reports a host property.
        clock.flags &= !KVM_CLOCK_TSC_STABLE;
        let [pic_master, pic_slave, ioapic] = chips;
        Ok(IrqChipState {
            pic_master,
            pic_slave,
            ioapic,
            pit,
            clock,
        })
    }

    /// Writes this state back into the in-kernel interrupt controllers and PIT of `vm`.
    ///
    /// The PIT reloads its counters, so the `count_load_time` of each channel afterwards is
    /// the time of the restore, as KVM_SET_PIT2 does.
    ///
    /// # Errors
    ///
    /// The failing ioctl.
    pub fn restore(&self, vm: &VmFd) -> Result<(), Error> {
        // The chip id travels inside the structure; force it to the slot it was saved from so
        // that a modified state cannot be written into the wrong controller.
        let chips = [self.pic_master, self.pic_slave, self.ioapic];
        for (mut chip, (id, name)) in chips.into_iter().zip(CHIPS) {
            chip.chip_id = id;
            vm.set_irqchip(&chip)
                .map_err(|source| Error::SetIrqChip { chip: name, source })?;
        }
        vm.set_pit2(&self.pit).map_err(Error::SetPit)?;
        vm.set_clock(&self.clock).map_err(Error::SetClock)
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    use super::*;

    fn vm_with_irqchip() -> VmFd {
        let kvm = Kvm::new().unwrap();
        let vm = kvm.create_vm().unwrap();
        setup(&vm).unwrap();
        vm
    }

    fn pic_master(vm: &VmFd) -> kvm_irqchip {
        let mut chip = kvm_irqchip {
            chip_id: KVM_IRQCHIP_PIC_MASTER,
            ..Default::default()
        };
        vm.get_irqchip(&mut chip).unwrap();
        chip
    }

    /// The raw bytes of a controller's state, for comparisons.
    fn chip_bytes(chip: &kvm_irqchip) -> [u8; 512] {
        // SAFETY: every field of the union is plain bytes; `dummy` covers all 512 of them.
        let dummy = unsafe { chip.chip.dummy };
        dummy.map(|b| b as u8)
    }

    #[test]
    fn capabilities_present_on_this_host() {
        let kvm = Kvm::new().unwrap();
        check_capabilities(&kvm).unwrap();
    }

    #[test]
    fn missing_capability_is_named() {
        let err = check_with(|cap| cap != Cap::Pit2).unwrap_err();
        assert!(matches!(err, Error::MissingCapability("KVM_CAP_PIT2")));
        assert!(err.to_string().contains("KVM_CAP_PIT2"));
        let err = check_with(|cap| cap != Cap::SetTssAddr).unwrap_err();
        assert!(matches!(
            err,
            Error::MissingCapability("KVM_CAP_SET_TSS_ADDR")
        ));
        check_with(|_| true).unwrap();
    }

    #[test]
    fn setup_creates_pic_ioapic_and_pit() {
        let vm = vm_with_irqchip();
        // Both ioctls fail with ENXIO on a VM without an irqchip or PIT.
        IrqChipState::save(&vm).unwrap();
        // A vCPU created afterwards gets an in-kernel local APIC.
        let vcpu = vm.create_vcpu(0).unwrap();
        vcpu.get_lapic().unwrap();
    }

    #[test]
    fn state_is_unavailable_without_setup() {
        let kvm = Kvm::new().unwrap();
        let vm = kvm.create_vm().unwrap();
        let err = IrqChipState::save(&vm).unwrap_err();
        assert!(
            matches!(
                err,
                Error::GetIrqChip {
                    chip: "master PIC",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn second_setup_is_a_clear_error() {
        let vm = vm_with_irqchip();
        let err = setup(&vm).unwrap_err();
        assert!(matches!(err, Error::IrqChipExists), "{err}");
        assert!(err.to_string().contains("only once"));
    }

    #[test]
    fn setup_after_vcpu_creation_is_refused() {
        let kvm = Kvm::new().unwrap();
        let vm = kvm.create_vm().unwrap();
        let _vcpu = vm.create_vcpu(0).unwrap();
        let err = setup(&vm).unwrap_err();
        assert!(matches!(err, Error::IrqChipAfterVcpu), "{err}");
    }

    #[test]
    fn gsi_allocator_range_and_exhaustion() {
        let mut gsis = GsiAllocator::new();
        let all: Vec<u32> = (0..19).map(|_| gsis.allocate().unwrap()).collect();
        assert_eq!(
            all,
            (GSI_DEVICE_FIRST..=GSI_DEVICE_LAST).collect::<Vec<_>>()
        );
        assert_eq!(all.first(), Some(&5));
        assert_eq!(all.last(), Some(&23));
        assert!(all.iter().all(|gsi| *gsi > GSI_LEGACY_MAX));
        assert!(matches!(gsis.allocate(), Err(Error::GsiExhausted)));
        // It stays exhausted.
        assert!(matches!(gsis.allocate(), Err(Error::GsiExhausted)));
    }

    /// Waits until the master PIC's IRR has `bit` set (irqfd injection runs on a kernel
    /// work queue, so it is asynchronous).
    fn wait_for_pic_irr(vm: &VmFd, bit: u8) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            // SAFETY: `pic` is the member KVM fills in for the master PIC.
            let irr = unsafe { pic_master(vm).chip.pic.irr };
            if irr & (1 << bit) != 0 {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }

    #[test]
    fn irqfd_raises_the_gsi() {
        let vm = vm_with_irqchip();
        let mut gsis = GsiAllocator::new();
        let gsi = gsis.allocate().unwrap();
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        register_irqfd(&vm, &evt, gsi).unwrap();
        // Attaching the same eventfd twice is refused.
        let err = register_irqfd(&vm, &evt, gsi).unwrap_err();
        assert!(err.to_string().contains("GSI 5"), "{err}");

        // GSIs 0-15 are routed to the PICs too: an edge on GSI 5 latches IRR bit 5 of the
        // master PIC, where it stays because no vCPU acknowledges it.
        evt.write(1).unwrap();
        assert!(wait_for_pic_irr(&vm, 5), "GSI {gsi} never reached the PIC");

        // Once detached, the eventfd no longer reaches the guest.
        unregister_irqfd(&vm, &evt, gsi).unwrap();
        let mut chip = pic_master(&vm);
        chip.chip.pic.irr = 0;
        chip.chip.pic.last_irr = 0;
        vm.set_irqchip(&chip).unwrap();
        evt.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        // SAFETY: as above.
        assert_eq!(unsafe { pic_master(&vm).chip.pic.irr } & (1 << 5), 0);
    }

    #[test]
    fn state_round_trips_through_serde_into_a_fresh_vm() {
        let vm = vm_with_irqchip();
        let mut state = IrqChipState::save(&vm).unwrap();
        // Writing a union member is safe; this is the one KVM uses for the master PIC.
        state.pic_master.chip.pic.imr = 0x5a;
        state.pit.channels[2].count = 0x4321;
        // One hour ahead: a restored guest's clock goes on from its saved time.
        state.clock.clock += 3_600_000_000_000;
        let text = serde_json::to_string(&state).unwrap();
        let loaded: IrqChipState = serde_json::from_str(&text).unwrap();

        let fresh = vm_with_irqchip();
        loaded.restore(&fresh).unwrap();
        let restored = IrqChipState::save(&fresh).unwrap();
        assert_eq!(
            chip_bytes(&restored.pic_master),
            chip_bytes(&state.pic_master)
        );
        assert_eq!(
            chip_bytes(&restored.pic_slave),
            chip_bytes(&state.pic_slave)
        );
        assert_eq!(chip_bytes(&restored.ioapic), chip_bytes(&state.ioapic));
        assert_eq!(restored.pit.channels[2].count, 0x4321);
        assert!(
            restored.clock.clock >= state.clock.clock,
            "{} < {}",
            restored.clock.clock,
            state.clock.clock
        );
        assert!(restored.clock.clock - state.clock.clock < 60_000_000_000);
    }

    #[test]
    fn save_modify_restore_round_trip() {
        let vm = vm_with_irqchip();
        let first = IrqChipState::save(&vm).unwrap();

        // Change every controller through the set ioctls.
        let mut changed = first.clone();
        // SAFETY: the members written are those KVM uses for each chip id.
        unsafe {
            changed.pic_master.chip.pic.imr ^= 0xa5;
            changed.pic_slave.chip.pic.imr ^= 0x3c;
            changed.ioapic.chip.ioapic.redirtbl[7].bits = 0x0000_0000_0001_0031;
        }
        changed.pit.channels[0].count = 0x1234;
        changed.restore(&vm).unwrap();
        let modified = IrqChipState::save(&vm).unwrap();
        assert_ne!(
            chip_bytes(&modified.pic_master),
            chip_bytes(&first.pic_master)
        );
        assert_ne!(
            chip_bytes(&modified.pic_slave),
            chip_bytes(&first.pic_slave)
        );
        assert_ne!(chip_bytes(&modified.ioapic), chip_bytes(&first.ioapic));
        // SAFETY: as above.
        let entry7 = unsafe { modified.ioapic.chip.ioapic.redirtbl[7].bits };
        assert_eq!(entry7, 0x1_0031);
        assert_eq!(modified.pit.channels[0].count, 0x1234);

        first.restore(&vm).unwrap();
        let again = IrqChipState::save(&vm).unwrap();
        assert_eq!(chip_bytes(&again.pic_master), chip_bytes(&first.pic_master));
        assert_eq!(chip_bytes(&again.pic_slave), chip_bytes(&first.pic_slave));
        assert_eq!(chip_bytes(&again.ioapic), chip_bytes(&first.ioapic));
        // KVM_SET_PIT2 reloads each counter, which stamps `count_load_time` with the time of
        // the restore; everything else must match.
        let mut pit = again.pit;
        for (channel, saved) in pit.channels.iter_mut().zip(first.pit.channels) {
            channel.count_load_time = saved.count_load_time;
        }
        assert_eq!(pit, first.pit);
    }
}
