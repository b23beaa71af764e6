//! Snapshots of a running VM: what `PUT /snapshot/create` writes
//! ([`SnapshotSource::create`]) and what `PUT /snapshot/load` reads back
//! ([`LoadedSnapshot::open`], then [`crate::vm::Vm::restore`]).
//!
//! The state file is [`ember_snapshot`]'s; the memory file is guest memory,
//! region after region. A restore maps the memory file `MAP_PRIVATE`: pages
//! are read from the page cache when the guest touches them, and any number
//! of VMs restored from one file share its clean pages.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use ember_api::{MemBackendType, SnapshotCreateParams, SnapshotHugePages, SnapshotLoadParams};
use ember_config::VmConfig;
use ember_devices::mmio::MmioSlot;
use ember_devices::{Devices, Serial, I8042};
use ember_irqchip::IrqChipState;
use ember_snapshot::{MemoryRegion, MicrovmState, SnapshotError, VirtioDeviceState};
use ember_vcpu::VmControl;
use ember_virtio_balloon::Balloon;
use ember_virtio_blk::Block;
use ember_virtio_mmio::MmioTransport;
use ember_virtio_net::Net;
use ember_virtio_rng::Entropy;
use ember_vsock::Vsock;
use kvm_ioctls::VmFd;
use vm_memory::mmap::MmapRegion;
use vm_memory::{
    Address, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap,
    GuestMemoryRegion, GuestRegionMmap,
};

use crate::uffd::UffdBackend;

/// Why a snapshot could not be created.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    /// The vCPUs could not save their state.
    #[error("Cannot save the microVM state: {0}")]
    Vcpus(#[source] ember_vcpu::Error),
    /// The VM lacks a device every Ember VM has.
    #[error("Cannot save the microVM state: the VM has no {0}")]
    NoDevice(&'static str),
    /// The irqchip, PIT or clock state could not be read.
    #[error("Cannot save the microVM state: {0}")]
    IrqChip(#[source] ember_irqchip::Error),
    /// The configuration could not be serialized.
    #[error("Cannot save the microVM state: cannot serialize the configuration: {0}")]
    Config(#[source] serde_json::Error),
    /// The state could not be encoded.
    #[error("Cannot serialize the microVM state: {0}")]
    Encode(#[source] SnapshotError),
    /// The state file could not be written.
    #[error("Cannot perform {op} on the snapshot backing file {path}: {source}")]
    SnapshotFile {
        /// "open", "write".
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The memory file could not be written.
    #[error("Cannot perform {op} on the memory backing file {path}: {source}")]
    MemoryFile {
        /// "open", "write".
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// Why a snapshot could not be loaded. The API answers
/// `Load snapshot error: Failed to restore from snapshot: <this>`.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The state file could not be read.
    #[error(
        "Failed to get snapshot state from file: Failed to open snapshot file {path}: {source}"
    )]
    Open {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The state file was refused.
    #[error(
        "Failed to get snapshot state from file: Failed to load snapshot state from file: {0}"
    )]
    State(#[source] SnapshotError),
    /// A network override names an interface the snapshot does not have.
    #[error("Failed to get snapshot state from file: Unknown Network Device: `{0}`.")]
    UnknownNetworkDevice(String),
    /// A vsock override for a snapshot without vsock.
    #[error("Failed to get snapshot state from file: Unknown Vsock Device.")]
    UnknownVsockDevice,
    /// The Uffd memory backend could not be set up.
    #[error("Failed to load guest memory: Error creating guest memory from uffd: {0}")]
    Uffd(String),
    /// `clock_realtime: true`.
    #[error("clock_realtime is not supported by Ember: kvmclock resumes from its saved value")]
    ClockRealtimeUnsupported,
    /// `huge_pages` other than Snapshot or None.
    #[error("huge_pages other than \"Snapshot\" or \"None\" is not supported by Ember")]
    HugePagesUnsupported,
    /// The memory file could not be opened or mapped.
    #[error("Failed to load guest memory: Error creating guest memory from file {path}: {detail}")]
    Memory {
        /// The memory file.
        path: PathBuf,
        /// What failed.
        detail: String,
    },
    /// The memory file is shorter than the layout.
    #[error("Failed to load guest memory: {0}")]
    MemoryFileTooShort(#[source] SnapshotError),
    /// The VM could not be rebuilt.
    #[error("Failed to build microVM from snapshot: {0}")]
    Build(String),
    /// A saved state was refused by the device, vCPU or irqchip it belongs to.
    #[error("Failed to build microVM from snapshot: cannot restore {what}: {detail}")]
    Restore {
        /// "vCPU 0", "drive `rootfs`", ...
        what: String,
        /// Why.
        detail: String,
    },
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A virtio device of the running VM: id, device, transport, slot.
type VirtioHandle<D> = (String, Arc<Mutex<D>>, Arc<Mutex<MmioTransport>>, MmioSlot);

/// What a snapshot of the running VM is taken from.
pub struct SnapshotSource {
    vm_fd: Arc<VmFd>,
    mem: GuestMemoryMmap,
    control: Arc<VmControl>,
    serial: Option<Serial>,
    i8042: Option<I8042>,
    drives: Vec<VirtioHandle<Block>>,
    nets: Vec<VirtioHandle<Net>>,
    vsock: Option<VirtioHandle<Vsock>>,
    entropy: Option<VirtioHandle<Entropy>>,
    balloon: Option<VirtioHandle<Balloon>>,
}

impl SnapshotSource {
    /// The sources of a VM with these devices.
    pub fn new(
        vm_fd: Arc<VmFd>,
        mem: GuestMemoryMmap,
        control: Arc<VmControl>,
        devices: &Devices,
    ) -> Self {
        // Slots are recorded in attach order: the balloon, drives, network
        // interfaces, vsock, entropy. Every virtio device has one; were one missing, its zero
        // slot would be refused when the state is loaded.
        let slots = devices.virtio_slots();
        let mut slot = slots.iter().copied();
        let mut next = || {
            slot.next().unwrap_or(MmioSlot {
                addr: 0,
                len: 0,
                gsi: 0,
            })
        };
        let balloon = match (devices.balloon(), devices.balloon_transport()) {
            (Some(b), Some(t)) => Some(("balloon".to_string(), b.clone(), t.clone(), next())),
            _ => None,
        };
        let drives = devices
            .drives()
            .iter()
            .map(|d| (d.id.clone(), d.block.clone(), d.transport.clone(), next()))
            .collect();
        let nets = devices
            .nets()
            .iter()
            .map(|n| (n.id.clone(), n.net.clone(), n.transport.clone(), next()))
            .collect();
        let vsock = match (devices.vsock(), devices.vsock_transport()) {
            (Some(v), Some(t)) => Some(("vsock".to_string(), v.clone(), t.clone(), next())),
            _ => None,
        };
        let entropy = match (devices.entropy(), devices.entropy_transport()) {
            (Some(e), Some(t)) => Some(("entropy".to_string(), e.clone(), t.clone(), next())),
            _ => None,
        };
        SnapshotSource {
            vm_fd,
            mem,
            control,
            serial: devices.serial().map(|(s, _)| s.clone()),
            i8042: devices.i8042().cloned(),
            drives,
            nets,
            vsock,
            entropy,
            balloon,
        }
    }

    /// The state of the paused VM, which runs with `config`. Devices are
    /// saved first, vCPUs next, then the irqchip and clock, as Firecracker
    /// does.
    ///
    /// # Errors
    ///
    /// The part that could not be saved.
    pub fn save(&self, config: &VmConfig) -> Result<MicrovmState, CreateError> {
        fn virtio<D, S>(h: &VirtioHandle<D>, save: impl Fn(&D) -> S) -> VirtioDeviceState<S> {
            let (id, device, transport, slot) = h;
            VirtioDeviceState {
                id: id.clone(),
                addr: slot.addr,
                gsi: slot.gsi,
                transport: lock(transport).save(),
                device: save(&lock(device)),
            }
        }
        let serial = lock(
            self.serial
                .as_ref()
                .ok_or(CreateError::NoDevice("serial port"))?,
        )
        .save();
        let i8042 = lock(self.i8042.as_ref().ok_or(CreateError::NoDevice("i8042"))?).save();
        let drives = self.drives.iter().map(|h| virtio(h, Block::save)).collect();
        let nets = self.nets.iter().map(|h| virtio(h, Net::save)).collect();
        let vsock = self.vsock.as_ref().map(|h| virtio(h, Vsock::save));
        let entropy = self.entropy.as_ref().map(|h| virtio(h, Entropy::save));
        let balloon = self.balloon.as_ref().map(|h| virtio(h, Balloon::save));
        let vcpus = self
            .control
            .save_vcpu_states()
            .map_err(CreateError::Vcpus)?;
        let irqchip = IrqChipState::save(&self.vm_fd).map_err(CreateError::IrqChip)?;
        let mut offset = 0u64;
        let memory = self
            .mem
            .iter()
            .map(|r| {
                let region = MemoryRegion {
                    guest_addr: r.start_addr().0,
                    size: r.len(),
                    file_offset: offset,
                };
                offset += r.len();
                region
            })
            .collect();
        Ok(MicrovmState {
            config_json: serde_json::to_string(config).map_err(CreateError::Config)?,
            memory,
            vcpus,
            irqchip,
            serial,
            i8042,
            drives,
            nets,
            vsock,
            entropy,
            balloon,
        })
    }

    /// Writes a full snapshot of the paused VM: its state to
    /// `params.snapshot_path`, its memory to `params.mem_file_path`.
    ///
    /// # Errors
    ///
    /// The part that could not be saved or written.
    pub fn create(
        &self,
        config: &VmConfig,
        params: &SnapshotCreateParams,
    ) -> Result<(), CreateError> {
        let state = self.save(config)?;
        let bytes = ember_snapshot::encode(&state).map_err(CreateError::Encode)?;
        let snap_err = |op, source| CreateError::SnapshotFile {
            op,
            path: params.snapshot_path.clone(),
            source,
        };
        let mut file = create_private(&params.snapshot_path).map_err(|e| snap_err("open", e))?;
        file.write_all(&bytes).map_err(|e| snap_err("write", e))?;

        let mem_err = |op, source| CreateError::MemoryFile {
            op,
            path: params.mem_file_path.clone(),
            source,
        };
        let mut file = create_private(&params.mem_file_path).map_err(|e| mem_err("open", e))?;
        write_memory(&self.mem, &mut file).map_err(|e| mem_err("write", e))
    }
}

/// Bytes of guest memory copied out at a time.
const CHUNK: usize = 1 << 20;
/// The unit of the zero-page check: a page.
const PAGE: usize = 4096;
static ZEROS: [u8; PAGE] = [0; PAGE];

/// Writes guest memory to `file`, region after region, leaving a hole
/// where a page is all zeros (memory the guest never touched, mostly), so
/// that the file takes the room of the memory in use and untouched memory
/// is never copied into the page cache. The last page is always written:
/// the file has the layout's full length. Seeks and writes only (no
/// `pwrite`, no `ftruncate`), as the VMM thread's seccomp filter allows.
fn write_memory(mem: &GuestMemoryMmap, file: &mut File) -> std::io::Result<()> {
    use std::io::{Seek, SeekFrom};

    let io = |e: vm_memory::GuestMemoryError| std::io::Error::other(e.to_string());
    let total: u64 = mem.iter().map(|r| r.len()).sum();
    let mut buf = vec![0u8; CHUNK];
    let mut offset = 0u64;
    for region in mem.iter() {
        let mut done = 0u64;
        while done < region.len() {
            let len = usize::try_from(region.len() - done)
                .unwrap_or(CHUNK)
                .min(CHUNK);
            let chunk = &mut buf[..len];
            mem.read_slice(chunk, region.start_addr().unchecked_add(done))
                .map_err(io)?;
            for (i, page) in chunk.chunks(PAGE).enumerate() {
                let at = offset + (i * PAGE) as u64;
                let last = at + page.len() as u64 == total;
                // A slice comparison is a memcmp, fast in any build.
                if !last && page == &ZEROS[..page.len()] {
                    continue;
                }
                file.seek(SeekFrom::Start(at))?;
                file.write_all(page)?;
            }
            done += len as u64;
            offset += len as u64;
        }
    }
    Ok(())
}

/// Creates or truncates `path` for writing, readable by its owner only when
/// created: guest memory and vCPU state may hold the guest's secrets.
fn create_private(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

/// A state file read and checked, its overrides applied, and its memory
/// mapped: what [`crate::vm::Vm::restore`] rebuilds the VM from.
pub struct LoadedSnapshot {
    /// The VM's state.
    pub state: MicrovmState,
    /// Its configuration, overrides applied.
    pub config: VmConfig,
    /// Guest memory, mapped from the memory file or served through a
    /// userfaultfd.
    pub mem: GuestMemoryMmap,
    /// The userfaultfd and handler connection of the Uffd backend.
    pub uffd: Option<UffdBackend>,
}

fn read_state_file(path: &Path) -> Result<Vec<u8>, LoadError> {
    use std::io::Read;
    let open_err = |source| LoadError::Open {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(open_err)?;
    let mut bytes = Vec::new();
    // One byte past the limit is enough to tell a file that is too large.
    file.take(ember_snapshot::MAX_STATE_LEN + 1)
        .read_to_end(&mut bytes)
        .map_err(open_err)?;
    Ok(bytes)
}

impl LoadedSnapshot {
    /// Reads and checks the state file, applies the overrides and maps the
    /// memory file.
    ///
    /// # Errors
    ///
    /// The first thing refused.
    pub fn open(params: &SnapshotLoadParams) -> Result<Self, LoadError> {
        if params.clock_realtime {
            return Err(LoadError::ClockRealtimeUnsupported);
        }
        // Ember's VMs have regular pages only: the snapshot's setting.
        if !matches!(
            params.huge_pages,
            SnapshotHugePages::Snapshot | SnapshotHugePages::None
        ) {
            return Err(LoadError::HugePagesUnsupported);
        }
        let bytes = read_state_file(&params.snapshot_path)?;
        let state = ember_snapshot::decode(&bytes).map_err(LoadError::State)?;
        let mut config = state.validate().map_err(LoadError::State)?;
        for o in &params.network_overrides {
            let iface = config
                .network_interfaces
                .iter_mut()
                .find(|n| n.iface_id == o.iface_id)
                .ok_or_else(|| LoadError::UnknownNetworkDevice(o.iface_id.clone()))?;
            iface.host_dev_name = o.host_dev_name.clone();
        }
        if let Some(o) = &params.vsock_override {
            let vsock = config.vsock.as_mut().ok_or(LoadError::UnknownVsockDevice)?;
            vsock.uds_path = o.uds_path.clone();
        }
        config.machine_config.track_dirty_pages = params.track_dirty_pages;
        // The logger and metrics were the old process's; this one has its own.
        config.logger = None;
        config.metrics = None;
        let path = &params.mem_backend.backend_path;
        let (mem, uffd) = match params.mem_backend.backend_type {
            MemBackendType::File => (map_memory(path, &state)?, None),
            MemBackendType::Uffd => {
                let (mem, uffd) =
                    crate::uffd::guest_memory(&state.memory, path).map_err(LoadError::Uffd)?;
                (mem, Some(uffd))
            }
        };
        Ok(LoadedSnapshot {
            state,
            config,
            mem,
            uffd,
        })
    }
}

/// Maps each region of the layout `MAP_PRIVATE` from the memory file.
fn map_memory(path: &Path, state: &MicrovmState) -> Result<GuestMemoryMmap, LoadError> {
    let fail = |detail: String| LoadError::Memory {
        path: path.to_path_buf(),
        detail,
    };
    let file = File::open(path).map_err(|e| fail(e.to_string()))?;
    let len = file.metadata().map_err(|e| fail(e.to_string()))?.len();
    state
        .check_memory_file(len)
        .map_err(LoadError::MemoryFileTooShort)?;
    let file = Arc::new(file);
    let mut regions = Vec::with_capacity(state.memory.len());
    for r in &state.memory {
        let size = usize::try_from(r.size).map_err(|e| fail(e.to_string()))?;
        let mapping = MmapRegion::build(
            Some(FileOffset::from_arc(file.clone(), r.file_offset)),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
        )
        .map_err(|e| {
            fail(format!(
                "cannot map {size} bytes at offset {}: {e}",
                r.file_offset
            ))
        })?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(r.guest_addr))
            .ok_or_else(|| fail(format!("region at {:#x} overflows", r.guest_addr)))?;
        regions.push(region);
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| fail(e.to_string()))
}

/// Signals every queue of an activated transport once: a request the
/// driver had made available but the device had not taken when the snapshot
/// was written (its kick was consumed by the old process) is processed
/// without waiting for a kick that will not come. A spurious notification
/// is harmless (virtio 1.2 §2.7.23).
fn notify_queues(transport: &MmioTransport) {
    if !transport.is_activated() {
        return;
    }
    for evt in transport.queue_notify_events() {
        if let Err(e) = evt.write(1) {
            log::warn!("cannot signal a restored queue: {e}");
        }
    }
}

/// Restores the saved device states into the freshly attached `devices`.
///
/// # Errors
///
/// The first device state refused.
pub fn restore_devices(devices: &Devices, state: &MicrovmState) -> Result<(), LoadError> {
    let refused = |what: String, detail: String| LoadError::Restore { what, detail };
    if let (Some(saved), Some(balloon), Some(transport)) = (
        &state.balloon,
        devices.balloon(),
        devices.balloon_transport(),
    ) {
        let what = || "the balloon".to_string();
        lock(balloon)
            .restore(&saved.device)
            .map_err(|e| refused(what(), e.to_string()))?;
        let mut transport = lock(transport);
        transport
            .restore(&saved.transport)
            .map_err(|e| refused(what(), e.to_string()))?;
        notify_queues(&transport);
    }
    if let Some(i8042) = devices.i8042() {
        lock(i8042)
            .restore(&state.i8042)
            .map_err(|e| refused("the i8042".into(), e.to_string()))?;
    }
    for (saved, handle) in state.drives.iter().zip(devices.drives()) {
        let what = || format!("drive `{}`", saved.id);
        lock(&handle.block)
            .restore(&saved.device)
            .map_err(|e| refused(what(), e.to_string()))?;
        let mut transport = lock(&handle.transport);
        transport
            .restore(&saved.transport)
            .map_err(|e| refused(what(), e.to_string()))?;
        notify_queues(&transport);
    }
    for (saved, handle) in state.nets.iter().zip(devices.nets()) {
        let what = || format!("network interface `{}`", saved.id);
        lock(&handle.net)
            .restore(&saved.device)
            .map_err(|e| refused(what(), e.to_string()))?;
        let mut transport = lock(&handle.transport);
        transport
            .restore(&saved.transport)
            .map_err(|e| refused(what(), e.to_string()))?;
        notify_queues(&transport);
    }
    if let (Some(saved), Some(vsock), Some(transport)) =
        (&state.vsock, devices.vsock(), devices.vsock_transport())
    {
        let what = || "the vsock device".to_string();
        lock(vsock)
            .restore(&saved.device)
            .map_err(|e| refused(what(), e.to_string()))?;
        let mut transport = lock(transport);
        transport
            .restore(&saved.transport)
            .map_err(|e| refused(what(), e.to_string()))?;
        notify_queues(&transport);
        let mut vsock = lock(vsock);
        if vsock.is_activated() {
            // The host sockets of the old process are gone: the driver must
            // drop its connections (virtio 1.2 §5.10.6.5), as Firecracker does.
            if let Err(e) = vsock.send_transport_reset() {
                log::warn!("vsock: cannot send the transport reset event: {e}");
            }
        }
    }
    if let (Some(saved), Some(entropy), Some(transport)) = (
        &state.entropy,
        devices.entropy(),
        devices.entropy_transport(),
    ) {
        let what = || "the entropy device".to_string();
        lock(entropy)
            .restore(&saved.device)
            .map_err(|e| refused(what(), e.to_string()))?;
        let mut transport = lock(transport);
        transport
            .restore(&saved.transport)
            .map_err(|e| refused(what(), e.to_string()))?;
        notify_queues(&transport);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    #[test]
    fn memory_files_hold_every_region_in_order_with_holes_for_zero_pages() {
        // Two regions, as around the 32-bit MMIO gap, 3 MiB in all.
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 2 << 20),
            (GuestAddress(1 << 32), 1 << 20),
        ])
        .unwrap();
        mem.write_slice(b"first", GuestAddress(0x1234)).unwrap();
        mem.write_slice(b"second", GuestAddress((1 << 32) + 0x5000))
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mem");
        let mut file = create_private(&path).unwrap();
        write_memory(&mem, &mut file).unwrap();
        drop(file);

        let mut bytes = Vec::new();
        File::open(&path).unwrap().read_to_end(&mut bytes).unwrap();
        assert_eq!(bytes.len(), 3 << 20);
        assert_eq!(&bytes[0x1234..0x1239], b"first");
        let second = (2 << 20) + 0x5000;
        assert_eq!(&bytes[second..second + 6], b"second");
        let nonzero = bytes.iter().filter(|b| **b != 0).count();
        assert_eq!(nonzero, 11);
        // Two data pages, and the last page that gives the file its length.
        let meta = std::fs::metadata(&path).unwrap();
        let allocated = std::os::unix::fs::MetadataExt::blocks(&meta) * 512;
        assert!(allocated <= 64 << 10, "{allocated} bytes allocated");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    }
}
