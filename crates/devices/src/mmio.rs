//! Placing virtio-mmio devices: slot addresses and GSIs as Firecracker
//! assigns them, the KVM irqfd and ioeventfds that keep interrupts and queue
//! kicks out of userspace, and the kernel command line entry. Each device
//! runs itself from the event loop (it is its own subscriber).

use std::sync::{Arc, Mutex};

use ember_boot::layout::{VIRTIO_MMIO_SLOT_SIZE, VIRTIO_MMIO_START};
use ember_bus::{Bus, BusRange};
use ember_irqchip::GsiAllocator;
use ember_virtio_mmio::{MmioTransport, VirtioDevice, NOTIFY_REG_OFFSET};
use kvm_ioctls::{IoEventAddress, VmFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Errors attaching a virtio device.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// No GSI left (5-23) for another device.
    #[error("cannot attach {device}: {source}")]
    Gsi {
        /// Device description.
        device: String,
        /// Cause.
        #[source]
        source: ember_irqchip::Error,
    },
    /// An eventfd could not be created or cloned.
    #[error("cannot attach {device}: eventfd: {source}")]
    EventFd {
        /// Device description.
        device: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The transport refused the device.
    #[error("cannot attach {device}: {source}")]
    Transport {
        /// Device description.
        device: String,
        /// Cause.
        #[source]
        source: ember_virtio_mmio::Error,
    },
    /// KVM refused the irqfd.
    #[error("cannot attach {device}: {source}")]
    Irqfd {
        /// Device description.
        device: String,
        /// Cause.
        #[source]
        source: ember_irqchip::Error,
    },
    /// KVM refused an ioeventfd.
    #[error("cannot attach {device}: KVM_IOEVENTFD at {addr:#x} failed: {source}")]
    Ioeventfd {
        /// Device description.
        device: String,
        /// Notify register address.
        addr: u64,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The MMIO bus refused the slot.
    #[error("cannot attach {device}: {source}")]
    Bus {
        /// Device description.
        device: String,
        /// Cause.
        #[source]
        source: ember_bus::Error,
    },
}

/// Where a virtio-mmio device sits: what the command line and the ACPI DSDT
/// tell the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioSlot {
    /// Base guest-physical address of the 4 KiB register window.
    pub addr: u64,
    /// Window size.
    pub len: u64,
    /// Interrupt line.
    pub gsi: u32,
}

impl MmioSlot {
    /// The `virtio_mmio.device=` kernel parameter, in Firecracker's format.
    pub fn cmdline_entry(&self) -> String {
        format!(
            "virtio_mmio.device={}K@0x{:08x}:{}",
            self.len / 1024,
            self.addr,
            self.gsi
        )
    }
}

/// Hands out virtio-mmio slots in Firecracker's order: 4 KiB windows from
/// 0xC000_1000 and GSIs from 5.
pub struct MmioAllocator {
    next_addr: u64,
    gsis: GsiAllocator,
}

impl Default for MmioAllocator {
    fn default() -> Self {
        Self {
            next_addr: VIRTIO_MMIO_START,
            gsis: GsiAllocator::new(),
        }
    }
}

impl MmioAllocator {
    /// The next free slot.
    pub fn allocate(&mut self, device: &str) -> Result<MmioSlot, DeviceError> {
        let gsi = self.gsis.allocate().map_err(|source| DeviceError::Gsi {
            device: device.to_string(),
            source,
        })?;
        let slot = MmioSlot {
            addr: self.next_addr,
            len: VIRTIO_MMIO_SLOT_SIZE,
            gsi,
        };
        self.next_addr += VIRTIO_MMIO_SLOT_SIZE;
        Ok(slot)
    }
}

/// A device attached to the MMIO bus.
pub struct AttachedDevice {
    /// Its slot.
    pub slot: MmioSlot,
    /// The transport (also on the bus).
    pub transport: Arc<Mutex<MmioTransport>>,
    /// Clones of the queue notify eventfds, for the event loop.
    pub queue_events: Vec<EventFd>,
}

/// Puts `device` behind a virtio-mmio transport in the next slot, with its
/// interrupt on an irqfd and every queue's notify register on an ioeventfd
/// (datamatch = queue index), so neither a kick nor an interrupt goes
/// through userspace.
pub fn attach_virtio_device(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    bus: &mut Bus,
    slots: &mut MmioAllocator,
    device: Arc<Mutex<dyn VirtioDevice>>,
    name: &str,
) -> Result<AttachedDevice, DeviceError> {
    let err_name = || name.to_string();
    let slot = slots.allocate(name)?;
    let irq = EventFd::new(EFD_NONBLOCK).map_err(|source| DeviceError::EventFd {
        device: err_name(),
        source,
    })?;
    ember_irqchip::register_irqfd(vm, &irq, slot.gsi).map_err(|source| DeviceError::Irqfd {
        device: err_name(),
        source,
    })?;
    let transport =
        MmioTransport::new(mem.clone(), device, irq).map_err(|source| DeviceError::Transport {
            device: err_name(),
            source,
        })?;
    let notify_addr = slot.addr + NOTIFY_REG_OFFSET;
    let mut queue_events = Vec::new();
    for (index, evt) in transport.queue_notify_events().iter().enumerate() {
        vm.register_ioevent(evt, &IoEventAddress::Mmio(notify_addr), index as u32)
            .map_err(|source| DeviceError::Ioeventfd {
                device: err_name(),
                addr: notify_addr,
                source,
            })?;
        queue_events.push(evt.try_clone().map_err(|source| DeviceError::EventFd {
            device: err_name(),
            source,
        })?);
    }
    let transport = Arc::new(Mutex::new(transport));
    let range = BusRange::new(slot.addr, slot.len).map_err(|source| DeviceError::Bus {
        device: err_name(),
        source,
    })?;
    bus.insert(range, transport.clone())
        .map_err(|source| DeviceError::Bus {
            device: err_name(),
            source,
        })?;
    Ok(AttachedDevice {
        slot,
        transport,
        queue_events,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_firecracker() {
        let mut a = MmioAllocator::default();
        let s0 = a.allocate("a").unwrap();
        let s1 = a.allocate("b").unwrap();
        assert_eq!((s0.addr, s0.gsi), (0xC000_1000, 5));
        assert_eq!((s1.addr, s1.gsi), (0xC000_2000, 6));
        assert_eq!(s0.cmdline_entry(), "virtio_mmio.device=4K@0xc0001000:5");
        for _ in 2..19 {
            a.allocate("x").unwrap();
        }
        let e = a.allocate("drive z").unwrap_err().to_string();
        assert!(e.contains("drive z"), "{e}");
    }
}
