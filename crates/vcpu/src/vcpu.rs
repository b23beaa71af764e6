//! A vCPU, its configuration for boot and its run loop.

use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;

use ember_boot::KernelEntry;
use ember_bus::Bus;
use ember_cpu_template::CustomCpuTemplate;
use kvm_bindings::{
    CpuId, KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::GuestMemoryMmap;

use crate::control::{KickTarget, RunState};
use crate::metrics::VcpuMetrics;
use crate::state::{StateError, VcpuState};
use crate::walk::{fetch_instruction, MAX_INSN_LEN};
use crate::{
    cpuid, register_kick_signal_handler, regs, Error, ExitReason, VcpuConfig, VmControl, MAX_VCPUS,
};

/// Work a new vCPU thread does first, before it enters the guest (see
/// [`Vcpu::start_with_hook`]), e.g. installing the thread's seccomp filter.
pub type ThreadHook =
    Box<dyn FnOnce() -> Result<(), Box<dyn std::error::Error + Send + Sync>> + Send>;

/// A KVM vCPU that has not started running yet.
#[derive(Debug)]
pub struct Vcpu {
    index: u8,
    fd: VcpuFd,
    metrics: Arc<VcpuMetrics>,
}

impl Vcpu {
    /// Creates vCPU `index` of `vm`. The VM's irqchip must exist already (see
    /// `ember_irqchip::setup`), or the vCPU gets no local APIC.
    ///
    /// # Errors
    ///
    /// [`Error::CreateVcpu`].
    pub fn new(index: u8, vm: &VmFd) -> Result<Self, Error> {
        let fd = vm
            .create_vcpu(u64::from(index))
            .map_err(|source| Error::CreateVcpu { index, source })?;
        Ok(Vcpu {
            index,
            fd,
            metrics: Arc::default(),
        })
    }

    /// The vCPU index, which is also its APIC id.
    pub fn index(&self) -> u8 {
        self.index
    }

    /// The KVM vCPU file descriptor, e.g. to read its state for a snapshot.
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// Counts this vCPU's exits in `metrics` (shared by the VM's vCPUs)
    /// instead of in counters of its own. Call before [`Vcpu::start`].
    pub fn set_metrics(&mut self, metrics: Arc<VcpuMetrics>) {
        self.metrics = metrics;
    }

    /// The counters this vCPU's exits go to.
    pub fn metrics(&self) -> &Arc<VcpuMetrics> {
        &self.metrics
    }

    /// Prepares the vCPU to enter the kernel at `entry`, as Firecracker does:
    ///
    /// - CPUID from KVM_GET_SUPPORTED_CPUID, normalised for this vCPU: APIC id (leaf 1
    ///   EBX\[31:24\], leaf 0xB x2APIC id), logical processor count and HTT, hypervisor bit,
    ///   thread/core topology (leaves 0x4, 0xB, AMD 0x8000_001d/0x8000_001e) from
    ///   `config.vcpu_count` and `config.smt`, host cache geometry, PMU hidden;
    /// - the boot MSRs (Firecracker's `create_boot_msr_entries`);
    /// - registers: Linux 64-bit boot: RIP = entry, RSP = RBP = `BOOT_STACK_POINTER`,
    ///   RSI = `ZERO_PAGE_START`; PVH: RIP = entry, RBX = `PVH_INFO_START`; RFLAGS = 2;
    /// - segments and control registers: Linux: the GDT and IDT written into guest memory,
    ///   64-bit segments, identity page tables, CR0.PE|PG, CR4.PAE, EFER.LME|LMA; PVH:
    ///   32-bit flat protected mode, CR0 = PE|ET, CR4 = 0;
    /// - FPU: FCW 0x37f, MXCSR 0x1f80;
    /// - local APIC: LINT0 in ExtINT mode, LINT1 in NMI mode.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] for an index not below `config.vcpu_count` or a count out
    /// of 1..=32, otherwise the step that failed.
    pub fn configure(
        &mut self,
        kvm: &Kvm,
        mem: &GuestMemoryMmap,
        entry: &KernelEntry,
        config: &VcpuConfig,
    ) -> Result<(), Error> {
        self.configure_with_template(kvm, mem, entry, config, None)
    }

    /// [`Vcpu::configure`] with a CPU template: its CPUID modifiers change the CPUID KVM
    /// supports before it is normalised, its MSR modifiers change the MSRs' values as
    /// KVM_GET_MSRS reads them, written with the boot MSRs (which win where both name one).
    ///
    /// # Errors
    ///
    /// As [`Vcpu::configure`]; [`Error::Template`] naming a leaf KVM does not report or
    /// an MSR it cannot read; [`Error::SetMsrsIncomplete`] naming an MSR it refuses.
    pub fn configure_with_template(
        &mut self,
        kvm: &Kvm,
        mem: &GuestMemoryMmap,
        entry: &KernelEntry,
        config: &VcpuConfig,
        template: Option<&CustomCpuTemplate>,
    ) -> Result<(), Error> {
        if config.vcpu_count == 0
            || config.vcpu_count > MAX_VCPUS
            || self.index >= config.vcpu_count
        {
            return Err(Error::InvalidConfig {
                index: self.index,
                vcpu_count: config.vcpu_count,
            });
        }
        // Read once here, so that a parked vCPU thread can save its state without /dev/kvm.
        if let Err(e) = crate::state::msr_indices(kvm) {
            log::warn!("vCPU {}: snapshots will fail: {e}", self.index);
        }
        let mut cpuid = supported_cpuid(kvm)?;
        if let Some(template) = template {
            cpuid::apply_template(&mut cpuid, template)?;
        }
        cpuid::normalize(&mut cpuid, self.index, config.vcpu_count, config.smt)?;
        self.fd.set_cpuid2(&cpuid).map_err(Error::SetCpuid)?;

        let template_msrs = match template {
            Some(t) if !t.msr_modifiers.is_empty() => regs::template_msr_entries(&self.fd, t)?,
            _ => Vec::new(),
        };
        regs::setup_msrs(&self.fd, &template_msrs)?;
        self.fd
            .set_regs(&regs::boot_regs(entry))
            .map_err(Error::SetRegs)?;
        self.fd.set_fpu(&regs::boot_fpu()).map_err(Error::SetFpu)?;
        let mut sregs = self.fd.get_sregs().map_err(Error::GetSregs)?;
        regs::configure_sregs(mem, &mut sregs, &entry.protocol)?;
        self.fd.set_sregs(&sregs).map_err(Error::SetSregs)?;
        regs::set_lint(&self.fd)
    }

    /// The vCPU's guest-visible state (see [`VcpuState::save`]).
    ///
    /// # Errors
    ///
    /// The ioctl that failed.
    pub fn save_state(&self, kvm: &Kvm) -> Result<VcpuState, StateError> {
        VcpuState::save(kvm, &self.fd)
    }

    /// Puts `state` into this vCPU instead of [`Vcpu::configure`]ing it (see
    /// [`VcpuState::restore`]).
    ///
    /// # Errors
    ///
    /// The ioctl that failed.
    pub fn restore_state(&mut self, state: &VcpuState) -> Result<(), StateError> {
        state.restore(&self.fd)
    }

    /// Spawns the vCPU thread, named `ember_vcpu<index>`, which loops on KVM_RUN and
    /// dispatches port I/O to `pio` and MMIO to `mmio` until `control` says the VM is
    /// exiting, or until the vCPU itself stops the VM (triple fault, KVM internal error,
    /// ...), in which case it records why in `control`.
    ///
    /// # Errors
    ///
    /// [`Error::SignalHandler`] when the kick handler cannot be installed,
    /// [`Error::Spawn`] when the thread cannot be created.
    pub fn start(
        self,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
        mem: GuestMemoryMmap,
        control: Arc<VmControl>,
    ) -> Result<VcpuHandle, Error> {
        self.start_with_hook(pio, mmio, mem, control, None)
    }

    /// [`Vcpu::start`], with `hook` run first on the new thread, before the vCPU registers
    /// with `control` and before its first KVM_RUN: the place to install the thread's
    /// seccomp filter, so that no guest instruction runs on an unfiltered vCPU thread. When
    /// the hook fails, the vCPU never enters the guest and the VM stops with
    /// [`ExitReason::Error`] naming the error.
    ///
    /// # Errors
    ///
    /// As [`Vcpu::start`].
    pub fn start_with_hook(
        self,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
        mem: GuestMemoryMmap,
        control: Arc<VmControl>,
        hook: Option<ThreadHook>,
    ) -> Result<VcpuHandle, Error> {
        // Without the handler, the kick signal would kill the process.
        register_kick_signal_handler()?;
        let Vcpu {
            index,
            mut fd,
            metrics,
        } = self;
        let immediate_exit: *mut u8 = &mut fd.get_kvm_run().immediate_exit;
        let target = Arc::new(KickTarget::new(index, immediate_exit));
        let thread_target = target.clone();
        let thread = std::thread::Builder::new()
            .name(format!("ember_vcpu{index}"))
            .spawn(move || {
                // Locals drop in reverse order: the guard retires the kick target before
                // the vCPU fd (and its kvm_run mapping) goes away, even on a panic.
                let mut runner = Runner {
                    index,
                    fd,
                    pio,
                    mmio,
                    mem,
                    metrics,
                };
                let guard = ThreadGuard {
                    index,
                    target: thread_target,
                    control,
                };
                if let Some(hook) = hook {
                    if let Err(e) = hook() {
                        guard.control.request_stop(ExitReason::Error {
                            vcpu: index,
                            message: format!("vCPU thread set-up failed: {e}"),
                        });
                        return;
                    }
                }
                // SAFETY: pthread_self has no preconditions.
                guard.target.set_thread(unsafe { libc::pthread_self() });
                guard.control.register(guard.target.clone());
                if let Some(reason) = runner.run(&guard.target, &guard.control) {
                    if !reason.is_success() {
                        runner.metrics.failures.inc();
                    }
                    guard.control.request_stop(reason);
                }
            })
            .map_err(|source| Error::Spawn { index, source })?;
        Ok(VcpuHandle {
            index,
            target,
            thread,
        })
    }
}

/// KVM_GET_SUPPORTED_CPUID, asked once per process and cached.
///
/// The answer depends only on the host CPU and the loaded KVM module, neither of which
/// changes while /dev/kvm is open (except the APIC id of the host CPU that ran the ioctl,
/// in leaves 1 and 0xB, which [`cpuid::normalize`] replaces with the vCPU's). Asking is not
/// cheap: KVM executes CPUID for every leaf and subleaf, and each CPUID traps to the
/// hypervisor below when the host is itself a VM (about 0.3 ms there). Firecracker likewise
/// asks once, when it opens /dev/kvm.
fn supported_cpuid(kvm: &Kvm) -> Result<CpuId, Error> {
    static SUPPORTED: OnceLock<CpuId> = OnceLock::new();
    if let Some(cpuid) = SUPPORTED.get() {
        return Ok(cpuid.clone());
    }
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(Error::GetSupportedCpuid)?;
    // Two threads racing here both asked KVM and got equivalent answers: keep either.
    Ok(SUPPORTED.get_or_init(|| cpuid).clone())
}

/// The state of a parked vCPU, read on its own thread.
fn save_parked_state(fd: &VcpuFd) -> Result<VcpuState, StateError> {
    let indices = crate::state::cached_msr_indices().ok_or(StateError::MsrListUnknown)?;
    VcpuState::save_with_msr_indices(indices, fd)
}

/// Cleans up when a vCPU thread ends, normally or by panic.
struct ThreadGuard {
    index: u8,
    target: Arc<KickTarget>,
    control: Arc<VmControl>,
}

impl Drop for ThreadGuard {
    fn drop(&mut self) {
        self.target.retire();
        if std::thread::panicking() {
            // Never leave the VM running with a dead vCPU.
            self.control.request_stop(ExitReason::Error {
                vcpu: self.index,
                message: "the vCPU thread panicked".to_string(),
            });
        }
        // Lets a pause() in progress stop waiting for this vCPU.
        self.control.unregister(&self.target);
    }
}

/// What a vCPU thread owns.
struct Runner {
    index: u8,
    fd: VcpuFd,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    mem: GuestMemoryMmap,
    metrics: Arc<VcpuMetrics>,
}

impl Runner {
    /// Runs the vCPU until the VM exits. Returns why, when this vCPU is the one that
    /// stops the VM; `None` when the VM was already exiting.
    ///
    /// The loop neither allocates nor locks, except for the device mutexes the buses take
    /// and on the way out.
    fn run(&mut self, target: &KickTarget, control: &VmControl) -> Option<ExitReason> {
        let vcpu = self.index;
        let mut io_pending = false;
        loop {
            // One atomic load per exit: a device that stopped the VM during the last exit
            // (the i8042 reset) ends this vCPU before the guest runs again.
            match control.state() {
                RunState::Running => {}
                // KVM finishes a port or MMIO access (the data of an IN, RIP past an OUT)
                // only on the next KVM_RUN: run once more with immediate_exit set, so that
                // a paused vCPU's saved state never replays or loses an access.
                RunState::Paused if io_pending => target.arm(),
                RunState::Paused => {
                    let fd = &self.fd;
                    if control.park(vcpu, &mut || save_parked_state(fd)) {
                        continue;
                    }
                    return None;
                }
                RunState::Exiting => return None,
            }
            io_pending = false;
            match self.fd.run() {
                Ok(exit) => match exit {
                    // Port numbers are 16 bits; the PIO bus is keyed by u64.
                    VcpuExit::IoIn(port, data) => {
                        io_pending = true;
                        self.metrics.exit_io_in.inc();
                        self.pio.read(u64::from(port), data);
                    }
                    VcpuExit::IoOut(port, data) => {
                        io_pending = true;
                        self.metrics.exit_io_out.inc();
                        self.pio.write(u64::from(port), data);
                    }
                    VcpuExit::MmioRead(addr, data) => {
                        io_pending = true;
                        self.metrics.exit_mmio_read.inc();
                        self.mmio.read(addr, data);
                    }
                    VcpuExit::MmioWrite(addr, data) => {
                        io_pending = true;
                        self.metrics.exit_mmio_write.inc();
                        self.mmio.write(addr, data);
                    }
                    // Nothing to do: KVM returned to let userspace look at signals or an
                    // interrupt window.
                    VcpuExit::Intr | VcpuExit::IrqWindowOpen => {}
                    VcpuExit::Hlt => return Some(ExitReason::Halted { vcpu }),
                    VcpuExit::Shutdown => {
                        return Some(ExitReason::TripleFault {
                            vcpu,
                            rip: self.fd.get_regs().map(|r| r.rip).unwrap_or(0),
                        })
                    }
                    VcpuExit::InternalError => return Some(self.internal_error()),
                    VcpuExit::FailEntry(reason, _cpu) => {
                        return Some(ExitReason::FailEntry { vcpu, reason })
                    }
                    VcpuExit::SystemEvent(kind, _data) => {
                        return Some(ExitReason::SystemEvent { vcpu, kind })
                    }
                    other => {
                        return Some(ExitReason::Error {
                            vcpu,
                            message: format!("unexpected KVM exit: {other:?}"),
                        })
                    }
                },
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    // Kicked (or another signal). Clear the request before the state check
                    // at the top of the loop: a kick landing after the clear changed the
                    // state first, so the check sees it.
                    target.clear();
                }
                Err(e) => {
                    return Some(ExitReason::Error {
                        vcpu,
                        message: format!("KVM_RUN failed: {e}"),
                    })
                }
            }
        }
    }

    /// Describes a KVM_EXIT_INTERNAL_ERROR: suberror and data from `kvm_run.internal`, RIP,
    /// and the instruction bytes at RIP read from guest memory.
    fn internal_error(&mut self) -> ExitReason {
        let vcpu = self.index;
        // SAFETY: KVM_RUN returned KVM_EXIT_INTERNAL_ERROR, so `internal` is the member of
        // the exit union that KVM filled in.
        let internal = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal };
        let ndata = (internal.ndata as usize).min(internal.data.len());
        let data = internal.data[..ndata].to_vec();

        let regs = self.fd.get_regs();
        let sregs = self.fd.get_sregs();
        let (rip, mut insn) = match (regs, sregs) {
            (Ok(regs), Ok(sregs)) => {
                let (insn, err) = fetch_instruction(&self.mem, &sregs, regs.rip);
                if let Some(err) = err {
                    log::warn!(
                        "vCPU {vcpu}: read {} instruction bytes at RIP {:#x}: {err}",
                        insn.len(),
                        regs.rip
                    );
                }
                (regs.rip, insn)
            }
            (regs, sregs) => {
                log::warn!(
                    "vCPU {vcpu}: cannot read the registers after an internal error: {:?} {:?}",
                    regs.err(),
                    sregs.err()
                );
                (0, Vec::new())
            }
        };
        if insn.is_empty() {
            insn = emulation_failure_bytes(internal.suberror, &data);
        }
        ExitReason::InternalError {
            vcpu,
            suberror: internal.suberror,
            rip,
            insn,
            data,
        }
    }
}

/// The instruction bytes KVM itself reports with an emulation failure, when it does:
/// `kvm_run.emulation_failure` overlays `internal` with `flags` in `data[0]`, then
/// `insn_size` and 15 `insn_bytes` in the next 16 bytes (linux/kvm.h).
fn emulation_failure_bytes(suberror: u32, data: &[u64]) -> Vec<u8> {
    if suberror != kvm_bindings::KVM_INTERNAL_ERROR_EMULATION || data.len() < 3 {
        return Vec::new();
    }
    if data[0] & u64::from(KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES) == 0 {
        return Vec::new();
    }
    let mut raw = [0u8; 16];
    raw[..8].copy_from_slice(&data[1].to_le_bytes());
    raw[8..].copy_from_slice(&data[2].to_le_bytes());
    let size = usize::from(raw[0]).min(MAX_INSN_LEN);
    raw[1..1 + size].to_vec()
}

/// A running vCPU thread.
#[derive(Debug)]
pub struct VcpuHandle {
    index: u8,
    target: Arc<KickTarget>,
    thread: JoinHandle<()>,
}

impl VcpuHandle {
    /// The vCPU index.
    pub fn index(&self) -> u8 {
        self.index
    }

    /// Interrupts the vCPU: it leaves KVM_RUN, looks at the run state, and goes back into
    /// the guest if the VM is still running.
    pub fn kick(&self) {
        self.target.kick();
    }

    /// Waits for the vCPU thread to end, which it does once the VM is exiting.
    ///
    /// # Errors
    ///
    /// The thread's panic payload if it panicked.
    pub fn join(self) -> std::thread::Result<()> {
        self.thread.join()
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::{FromRawFd, IntoRawFd};

    use ember_boot::BootProtocol;
    use ember_bus::BusKind;
    use kvm_bindings::{kvm_userspace_memory_region, KVM_EXIT_INTERNAL_ERROR};
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

    use super::*;

    /// A configured vCPU whose run loop is not started, to drive `internal_error` with a
    /// hand-made `kvm_run`.
    fn runner(mem: &GuestMemoryMmap) -> (VmFd, Runner) {
        let kvm = Kvm::new().unwrap();
        let vm = kvm.create_vm().unwrap();
        ember_irqchip::setup(&vm).unwrap();
        let host = mem.get_host_address(GuestAddress(0)).unwrap();
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: 2 << 20,
            userspace_addr: host as u64,
        };
        // SAFETY: `mem` is a live 2 MiB mapping that outlives the VM.
        unsafe { vm.set_user_memory_region(region).unwrap() };
        let mut vcpu = Vcpu::new(0, &vm).unwrap();
        let entry = KernelEntry {
            protocol: BootProtocol::LinuxBoot,
            entry_addr: GuestAddress(0x10_0000),
            kernel_load: GuestAddress(0x10_0000),
            kernel_end: 0x10_1000,
            setup_header: None,
        };
        let config = VcpuConfig {
            vcpu_count: 1,
            smt: false,
        };
        vcpu.configure(&kvm, mem, &entry, &config).unwrap();
        let runner = Runner {
            index: 0,
            fd: vcpu.fd,
            pio: Arc::new(Bus::new(BusKind::Pio)),
            mmio: Arc::new(Bus::new(BusKind::Mmio)),
            mem: mem.clone(),
            metrics: Arc::default(),
        };
        (vm, runner)
    }

    /// Fills `kvm_run` as KVM does for an emulation failure.
    fn fake_internal_error(runner: &mut Runner, data: &[u64]) {
        let run = runner.fd.get_kvm_run();
        run.exit_reason = KVM_EXIT_INTERNAL_ERROR;
        let mut internal = kvm_bindings::kvm_run__bindgen_ty_1__bindgen_ty_13 {
            suberror: 1,
            ndata: data.len() as u32,
            ..Default::default()
        };
        internal.data[..data.len()].copy_from_slice(data);
        run.__bindgen_anon_1.internal = internal;
    }

    #[test]
    fn internal_error_reads_the_bytes_at_rip_through_the_page_tables() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let (_vm, mut runner) = runner(&mem);
        let code: Vec<u8> = (0x40..0x4f).collect();
        mem.write_slice(&code, GuestAddress(0x10_0000)).unwrap();
        // KVM reported no instruction bytes: they can only come from guest memory.
        fake_internal_error(&mut runner, &[]);
        let reason = runner.internal_error();
        assert_eq!(
            reason,
            ExitReason::InternalError {
                vcpu: 0,
                suberror: 1,
                rip: 0x10_0000,
                insn: code,
                data: vec![],
            }
        );
    }

    #[test]
    fn internal_error_at_an_unmapped_rip() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let (_vm, mut runner) = runner(&mem);
        // The boot page tables map the first GiB only.
        let mut regs = runner.fd.get_regs().unwrap();
        regs.rip = 0xffff_ffff_8100_0000;
        runner.fd.set_regs(&regs).unwrap();
        fake_internal_error(&mut runner, &[0, 0, 0]);
        let reason = runner.internal_error();
        let ExitReason::InternalError {
            rip, insn, data, ..
        } = &reason
        else {
            panic!("{reason}");
        };
        assert_eq!(*rip, 0xffff_ffff_8100_0000);
        assert!(insn.is_empty());
        assert_eq!(data.len(), 3);
        assert!(
            reason
                .to_string()
                .contains("instruction bytes: unavailable"),
            "{reason}"
        );

        // Then the bytes KVM's emulator reported are used.
        let bytes = u64::from_le_bytes([2, 0x0f, 0x0b, 0, 0, 0, 0, 0]);
        fake_internal_error(&mut runner, &[1, bytes, 0]);
        let ExitReason::InternalError { insn, .. } = runner.internal_error() else {
            panic!("not an internal error");
        };
        assert_eq!(insn, [0x0f, 0x0b]);
    }

    #[test]
    fn supported_cpuid_is_asked_once_per_process() {
        let kvm = Kvm::new().unwrap();
        let first = supported_cpuid(&kvm).unwrap();
        // The same leaves as a fresh query. (Values may differ: KVM reports the APIC id of
        // the host CPU that ran the ioctl in leaves 1 and 0xB, which `cpuid::normalize`
        // replaces with the vCPU's.)
        let leaves = |c: &CpuId| -> Vec<(u32, u32)> {
            c.as_slice().iter().map(|e| (e.function, e.index)).collect()
        };
        let fresh = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
        assert_eq!(leaves(&first), leaves(&fresh));
        assert_eq!(first.as_slice()[0], fresh.as_slice()[0], "vendor leaf");
        // A handle on /dev/null cannot answer KVM_GET_SUPPORTED_CPUID (ENOTTY): the answer
        // can only come from the cache.
        let null = std::fs::File::open("/dev/null").unwrap();
        // SAFETY: `null` is an open fd whose ownership passes to the Kvm handle, which
        // closes it on drop.
        let not_kvm = unsafe { Kvm::from_raw_fd(null.into_raw_fd()) };
        assert!(not_kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).is_err());
        assert_eq!(
            supported_cpuid(&not_kvm).unwrap().as_slice(),
            first.as_slice()
        );
    }

    #[test]
    fn emulation_failure_bytes_are_decoded() {
        // flags = INSTRUCTION_BYTES, insn_size = 3, bytes 0f 0b 90.
        let data = [
            1u64,
            u64::from_le_bytes([3, 0x0f, 0x0b, 0x90, 0, 0, 0, 0]),
            0,
        ];
        assert_eq!(emulation_failure_bytes(1, &data), [0x0f, 0x0b, 0x90]);
        // 15 bytes spill into the third word.
        let data = [
            1u64,
            u64::from_le_bytes([15, 1, 2, 3, 4, 5, 6, 7]),
            u64::from_le_bytes([8, 9, 10, 11, 12, 13, 14, 15]),
        ];
        assert_eq!(
            emulation_failure_bytes(1, &data),
            (1..=15).collect::<Vec<u8>>()
        );
        // A size beyond 15 is clamped; no flag, short data or another suberror: nothing.
        let data = [1u64, u64::from_le_bytes([200, 1, 2, 3, 4, 5, 6, 7]), 0];
        assert_eq!(emulation_failure_bytes(1, &data).len(), 15);
        assert!(emulation_failure_bytes(1, &[0, 0x0301, 0]).is_empty());
        assert!(emulation_failure_bytes(1, &[1]).is_empty());
        assert!(emulation_failure_bytes(3, &data).is_empty());
    }

    /// An unconfigured vCPU of a fresh VM, with empty buses and no memory.
    fn bare_vcpu() -> (VmFd, Vcpu) {
        let kvm = Kvm::new().unwrap();
        let vm = kvm.create_vm().unwrap();
        ember_irqchip::setup(&vm).unwrap();
        let vcpu = Vcpu::new(0, &vm).unwrap();
        (vm, vcpu)
    }

    fn buses() -> (Arc<Bus>, Arc<Bus>) {
        (
            Arc::new(Bus::new(BusKind::Pio)),
            Arc::new(Bus::new(BusKind::Mmio)),
        )
    }

    #[test]
    fn the_start_hook_runs_first_on_the_vcpu_thread() {
        let (_vm, vcpu) = bare_vcpu();
        let (pio, mmio) = buses();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let control = VmControl::new().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let hook_control = control.clone();
        let hook: ThreadHook = Box::new(move || {
            tx.send(std::thread::current().name().map(str::to_string))
                .unwrap();
            // Stopping here means the run loop must end before its first KVM_RUN.
            hook_control.request_stop(ExitReason::GuestReset);
            Ok(())
        });
        let handle = vcpu
            .start_with_hook(pio, mmio, mem, control.clone(), Some(hook))
            .unwrap();
        handle.join().unwrap();
        assert_eq!(rx.recv().unwrap().as_deref(), Some("ember_vcpu0"));
        assert_eq!(control.exit_reason(), Some(ExitReason::GuestReset));
    }

    #[test]
    fn a_failing_start_hook_stops_the_vm_before_the_guest_runs() {
        let (_vm, vcpu) = bare_vcpu();
        let (pio, mmio) = buses();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let control = VmControl::new().unwrap();
        let hook: ThreadHook = Box::new(|| Err("cannot install the seccomp filter".into()));
        let handle = vcpu
            .start_with_hook(pio, mmio, mem, control.clone(), Some(hook))
            .unwrap();
        handle.join().unwrap();
        assert_eq!(
            control.exit_reason(),
            Some(ExitReason::Error {
                vcpu: 0,
                message: "vCPU thread set-up failed: cannot install the seccomp filter".into(),
            })
        );
        // The exit event fired, so the VMM's event loop learns about it.
        assert_eq!(control.exit_event().read().unwrap(), 1);
    }
}
