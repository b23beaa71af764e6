//! Run state shared by the VMM and every vCPU thread: running, paused or exiting, why the
//! VM stopped, and how to interrupt a vCPU that is inside KVM_RUN.

use std::fmt;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kvm_bindings::{
    KVM_INTERNAL_ERROR_DELIVERY_EV, KVM_INTERNAL_ERROR_EMULATION, KVM_INTERNAL_ERROR_SIMUL_EX,
    KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::signal::SIGRTMIN;

use crate::state::{StateError, VcpuState};
use crate::Error;

/// Why a VM stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest pulsed the reset line through the i8042 controller (command 0xFE), which is
    /// how Linux reboots, and how Firecracker guests power off.
    GuestReset,
    /// A vCPU hit an exception while delivering a double fault (KVM_EXIT_SHUTDOWN).
    TripleFault {
        /// The vCPU.
        vcpu: u8,
        /// Its RIP after the fault, 0 if it could not be read.
        rip: u64,
    },
    /// A vCPU executed HLT and KVM handed it to userspace (KVM_EXIT_HLT); with the in-kernel
    /// local APIC this does not happen for ordinary HLTs.
    Halted {
        /// The vCPU.
        vcpu: u8,
    },
    /// The VMM stopped the VM.
    Stopped,
    /// KVM could not go on running a vCPU (KVM_EXIT_INTERNAL_ERROR), typically because its
    /// instruction emulator does not know the instruction at RIP.
    InternalError {
        /// The vCPU.
        vcpu: u8,
        /// KVM_INTERNAL_ERROR_* code.
        suberror: u32,
        /// Guest RIP, 0 if it could not be read.
        rip: u64,
        /// Up to 15 bytes at RIP, read from guest memory; empty when RIP does not map to
        /// guest memory.
        insn: Vec<u8>,
        /// The extra words KVM reported (`kvm_run.internal.data[..ndata]`).
        data: Vec<u64>,
    },
    /// The hardware refused to enter the guest (KVM_EXIT_FAIL_ENTRY).
    FailEntry {
        /// The vCPU.
        vcpu: u8,
        /// Hardware entry failure reason (e.g. VMX exit reason).
        reason: u64,
    },
    /// The guest asked for a system event through KVM (KVM_EXIT_SYSTEM_EVENT), e.g. a PSCI
    /// or ACPI reset or shutdown.
    SystemEvent {
        /// The vCPU.
        vcpu: u8,
        /// KVM_SYSTEM_EVENT_* type.
        kind: u32,
    },
    /// The vCPU thread failed: KVM_RUN returned an error, KVM reported an exit the VMM
    /// does not handle, or the thread panicked.
    Error {
        /// The vCPU.
        vcpu: u8,
        /// What happened.
        message: String,
    },
}

impl ExitReason {
    /// Whether the guest asked to stop: a reset through the i8042 or a KVM reset event.
    /// Everything else, including a stop by the VMM, is not a success.
    pub fn is_success(&self) -> bool {
        match self {
            ExitReason::GuestReset => true,
            ExitReason::SystemEvent { kind, .. } => *kind == KVM_SYSTEM_EVENT_RESET,
            _ => false,
        }
    }
}

/// The name of a KVM_INTERNAL_ERROR_* suberror (linux/kvm.h).
fn suberror_name(suberror: u32) -> &'static str {
    match suberror {
        KVM_INTERNAL_ERROR_EMULATION => "emulation failure",
        KVM_INTERNAL_ERROR_SIMUL_EX => "exception while delivering an exception",
        KVM_INTERNAL_ERROR_DELIVERY_EV => "event delivery failed",
        KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON => "unexpected hardware exit reason",
        _ => "unknown",
    }
}

/// The name of a KVM_SYSTEM_EVENT_* type (linux/kvm.h).
fn system_event_name(kind: u32) -> &'static str {
    match kind {
        KVM_SYSTEM_EVENT_SHUTDOWN => "shutdown",
        KVM_SYSTEM_EVENT_RESET => "reset",
        KVM_SYSTEM_EVENT_CRASH => "crash",
        _ => "system event",
    }
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitReason::GuestReset => write!(f, "guest reset the VM through the i8042 (0xFE)"),
            ExitReason::TripleFault { vcpu, rip } => write!(
                f,
                "vCPU {vcpu} triple-faulted (KVM_EXIT_SHUTDOWN) at RIP {rip:#x}"
            ),
            ExitReason::Halted { vcpu } => write!(f, "vCPU {vcpu} halted (KVM_EXIT_HLT)"),
            ExitReason::Stopped => write!(f, "the VMM stopped the VM"),
            ExitReason::InternalError {
                vcpu,
                suberror,
                rip,
                insn,
                data,
            } => {
                write!(
                    f,
                    "vCPU {vcpu}: KVM internal error, suberror {suberror} ({}) at RIP {rip:#x}, instruction bytes: ",
                    suberror_name(*suberror)
                )?;
                if insn.is_empty() {
                    write!(f, "unavailable (RIP could not be read or does not map to guest memory)")?;
                } else {
                    for (i, b) in insn.iter().enumerate() {
                        let sep = if i == 0 { "" } else { " " };
                        write!(f, "{sep}{b:02x}")?;
                    }
                }
                if !data.is_empty() {
                    write!(f, ", data:")?;
                    for d in data {
                        write!(f, " {d:#x}")?;
                    }
                }
                Ok(())
            }
            ExitReason::FailEntry { vcpu, reason } => write!(
                f,
                "vCPU {vcpu} could not enter the guest (KVM_EXIT_FAIL_ENTRY), hardware reason {reason:#x}"
            ),
            ExitReason::SystemEvent { vcpu, kind } => write!(
                f,
                "vCPU {vcpu} requested a {} (KVM_EXIT_SYSTEM_EVENT type {kind})",
                system_event_name(*kind)
            ),
            ExitReason::Error { vcpu, message } => write!(f, "vCPU {vcpu}: {message}"),
        }
    }
}

/// The run state of a VM, which every vCPU thread checks after each exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum RunState {
    /// The vCPUs run the guest.
    Running = 0,
    /// The vCPUs park outside KVM_RUN until resumed.
    Paused = 1,
    /// The VM is stopping; final.
    Exiting = 2,
}

/// A [`RunState`] in one atomic byte: the vCPU loop's check is one load.
struct AtomicRunState(AtomicU8);

impl AtomicRunState {
    fn new(state: RunState) -> Self {
        AtomicRunState(AtomicU8::new(state as u8))
    }

    #[inline]
    fn load(&self) -> RunState {
        match self.0.load(Ordering::SeqCst) {
            0 => RunState::Running,
            1 => RunState::Paused,
            // Only the three values are ever stored.
            _ => RunState::Exiting,
        }
    }

    fn store(&self, state: RunState) {
        self.0.store(state as u8, Ordering::SeqCst)
    }

    /// Sets `new` if the state is `current`; whether it did.
    fn transition(&self, current: RunState, new: RunState) -> bool {
        self.0
            .compare_exchange(current as u8, new as u8, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }
}

/// How long [`VmControl::pause`] waits for the vCPUs to park.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often [`VmControl::pause`] kicks the vCPUs that have not parked yet.
const PAUSE_REKICK: Duration = Duration::from_millis(20);

/// The `kvm_run.immediate_exit` byte of a vCPU and its thread, for kicking it out of
/// KVM_RUN from another thread.
pub(crate) struct KickTarget {
    index: u8,
    /// `&kvm_run.immediate_exit`; dereferenced only while `inner.alive` is set (kicks) or by
    /// the vCPU thread itself, which owns the mapping.
    immediate_exit: *const AtomicU8,
    inner: Mutex<KickInner>,
}

impl fmt::Debug for KickTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KickTarget")
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

struct KickInner {
    /// The vCPU thread, once it runs.
    thread: Option<libc::pthread_t>,
    /// Cleared by the vCPU thread before it unmaps `kvm_run` and exits.
    alive: bool,
}

// SAFETY: `immediate_exit` is only accessed atomically, by other threads only under the
// mutex while `alive` is set, and the vCPU thread clears `alive` (under the same mutex)
// before the mapping it points into goes away. `pthread_t` is a plain thread id.
unsafe impl Send for KickTarget {}
// SAFETY: as above; all shared mutable state is behind the mutex or atomic.
unsafe impl Sync for KickTarget {}

impl KickTarget {
    /// `immediate_exit` must point at the `immediate_exit` byte of a `kvm_run` mapping that
    /// stays mapped until [`KickTarget::retire`] is called, and that byte must only be
    /// accessed atomically.
    pub(crate) fn new(index: u8, immediate_exit: *mut u8) -> Self {
        KickTarget {
            index,
            immediate_exit: immediate_exit as *const AtomicU8,
            inner: Mutex::new(KickInner {
                thread: None,
                alive: true,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, KickInner> {
        // A panic while holding this lock cannot leave the data inconsistent.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Called on the vCPU thread when it starts, so that kicks can signal it.
    pub(crate) fn set_thread(&self, thread: libc::pthread_t) {
        self.lock().thread = Some(thread);
    }

    /// Called on the vCPU thread before `kvm_run` is unmapped: no kick touches it after.
    pub(crate) fn retire(&self) {
        let mut inner = self.lock();
        inner.alive = false;
        inner.thread = None;
    }

    /// Clears `immediate_exit`. Only the vCPU thread calls this, after KVM_RUN returned
    /// and before it checks the run state, so a kick that lands in between is not lost:
    /// the kicker changed the state before setting the byte.
    pub(crate) fn clear(&self) {
        // SAFETY: the calling vCPU thread owns the kvm_run mapping, which is alive while
        // it runs; the byte is only accessed atomically.
        unsafe { (*self.immediate_exit).store(0, Ordering::SeqCst) };
    }

    /// Sets `immediate_exit` from the vCPU thread itself: its next KVM_RUN completes the
    /// port or MMIO access userspace just handled, then returns EINTR without entering the
    /// guest.
    pub(crate) fn arm(&self) {
        // SAFETY: as in `clear`.
        unsafe { (*self.immediate_exit).store(1, Ordering::SeqCst) };
    }

    /// Makes the vCPU leave KVM_RUN now or refuse to enter it next: sets
    /// `kvm_run.immediate_exit` (KVM returns EINTR before entering the guest when it is set)
    /// then signals the thread so a KVM_RUN in progress returns EINTR too.
    pub(crate) fn kick(&self) {
        let inner = self.lock();
        if !inner.alive {
            return;
        }
        // SAFETY: `alive` is set, so the kvm_run mapping is still there (see `KickTarget`);
        // the byte is only accessed atomically from user space.
        unsafe { (*self.immediate_exit).store(1, Ordering::SeqCst) };
        if let Some(thread) = inner.thread {
            // SAFETY: the thread has not cleared `alive`, so it has not exited and `thread`
            // is a valid id; the kick signal has a no-op handler installed.
            let ret = unsafe { libc::pthread_kill(thread, SIGRTMIN()) };
            if ret != 0 {
                log::warn!(
                    "failed to signal vCPU {}: {}",
                    self.index,
                    std::io::Error::from_raw_os_error(ret)
                );
            }
        }
    }
}

struct Shared {
    /// The vCPUs started and not yet finished.
    vcpus: Vec<Arc<KickTarget>>,
    /// How many of them are parked in [`VmControl::park`].
    parked: usize,
    /// Bumped by [`VmControl::save_vcpu_states`]: each parked vCPU saves its state once
    /// per round.
    save_round: u64,
    /// The states saved in the current round, with the vCPU index.
    saved: Vec<(u8, Result<VcpuState, StateError>)>,
}

/// Shared run state of all vCPUs: running, paused or exiting. The first stop reason wins.
pub struct VmControl {
    state: AtomicRunState,
    reason: Mutex<Option<ExitReason>>,
    shared: Mutex<Shared>,
    changed: Condvar,
    exit_evt: EventFd,
}

impl fmt::Debug for VmControl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VmControl")
            .field("state", &self.state.load())
            .field("reason", &self.exit_reason())
            .finish()
    }
}

impl VmControl {
    /// Creates the control block of a running VM.
    ///
    /// # Errors
    ///
    /// [`Error::EventFd`] when the exit eventfd cannot be created.
    pub fn new() -> Result<Arc<Self>, Error> {
        Ok(Arc::new(VmControl {
            state: AtomicRunState::new(RunState::Running),
            reason: Mutex::new(None),
            shared: Mutex::new(Shared {
                vcpus: Vec::new(),
                parked: 0,
                save_round: 0,
                saved: Vec::new(),
            }),
            changed: Condvar::new(),
            exit_evt: EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?,
        }))
    }

    /// The eventfd written when the VM must stop; the VMM's event loop waits on it and then
    /// reads [`VmControl::exit_reason`].
    pub fn exit_event(&self) -> &EventFd {
        &self.exit_evt
    }

    fn shared(&self) -> MutexGuard<'_, Shared> {
        // The counters stay consistent across a panic: recover the guard.
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stops the VM: records `reason` if no reason was recorded before, sets the state to
    /// exiting, writes the exit eventfd and kicks every vCPU out of KVM_RUN. Any thread may
    /// call it, vCPU threads included (a device handler does, for the i8042 reset).
    pub fn request_stop(&self, reason: ExitReason) {
        let first = {
            let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
            if r.is_none() {
                log::info!("stopping the VM: {reason}");
                *r = Some(reason);
                true
            } else {
                log::debug!("VM already stopping; ignoring later reason: {reason}");
                false
            }
        };
        let shared = self.shared();
        self.state.store(RunState::Exiting);
        self.changed.notify_all();
        for vcpu in &shared.vcpus {
            vcpu.kick();
        }
        drop(shared);
        if first {
            if let Err(e) = self.exit_evt.write(1) {
                log::error!("failed to signal the VM exit eventfd: {e}");
            }
        }
    }

    /// Why the VM stopped, once a stop was requested.
    pub fn exit_reason(&self) -> Option<ExitReason> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Pauses the VM: sets the paused state, kicks every vCPU, and returns once every
    /// started vCPU thread is parked outside KVM_RUN. Call it from a VMM thread, never
    /// from a vCPU thread (a device handler), which would wait for itself.
    ///
    /// # Errors
    ///
    /// [`Error::Exiting`] when the VM is stopping (before or during the pause),
    /// [`Error::PauseTimeout`] when some vCPU does not park within 5 seconds (the state
    /// stays paused; call [`VmControl::resume`] to undo).
    pub fn pause(&self) -> Result<(), Error> {
        self.pause_within(PAUSE_TIMEOUT)
    }

    fn pause_within(&self, timeout: Duration) -> Result<(), Error> {
        let mut shared = self.shared();
        if self.state.load() == RunState::Exiting {
            return Err(Error::Exiting);
        }
        self.state.store(RunState::Paused);
        for vcpu in &shared.vcpus {
            vcpu.kick();
        }
        let deadline = Instant::now() + timeout;
        loop {
            match self.state.load() {
                RunState::Exiting => return Err(Error::Exiting),
                // Resumed by someone else meanwhile.
                RunState::Running => return Ok(()),
                RunState::Paused => {}
            }
            if shared.parked >= shared.vcpus.len() {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::PauseTimeout {
                    parked: shared.parked,
                    total: shared.vcpus.len(),
                });
            }
            let wait = PAUSE_REKICK.min(deadline - now);
            let (guard, timeout) = self
                .changed
                .wait_timeout(shared, wait)
                .unwrap_or_else(|e| e.into_inner());
            shared = guard;
            if timeout.timed_out() {
                // A kick cannot be lost, but kicking again is cheap insurance.
                for vcpu in &shared.vcpus {
                    vcpu.kick();
                }
            }
        }
    }

    /// Resumes a paused VM. Does nothing when the VM is running or exiting.
    pub fn resume(&self) {
        let _shared = self.shared();
        if self.state.transition(RunState::Paused, RunState::Running) {
            self.changed.notify_all();
        }
    }

    /// Whether a stop was requested: a single atomic load, checked after every exit.
    #[inline]
    pub fn is_exiting(&self) -> bool {
        self.state.load() == RunState::Exiting
    }

    /// The run state: one atomic load.
    #[inline]
    pub fn state(&self) -> RunState {
        self.state.load()
    }

    /// Adds a vCPU that is about to start.
    pub(crate) fn register(&self, target: Arc<KickTarget>) {
        let mut shared = self.shared();
        shared.vcpus.push(target);
        self.changed.notify_all();
    }

    /// Removes a vCPU whose thread is ending (or never started).
    pub(crate) fn unregister(&self, target: &Arc<KickTarget>) {
        let mut shared = self.shared();
        shared.vcpus.retain(|v| !Arc::ptr_eq(v, target));
        self.changed.notify_all();
    }

    /// Parks the calling vCPU thread while the VM is paused. Returns `true` when the VM
    /// runs again, `false` when it is exiting. While parked, the thread runs `save` once
    /// for each [`VmControl::save_vcpu_states`] round.
    pub(crate) fn park(
        &self,
        index: u8,
        save: &mut dyn FnMut() -> Result<VcpuState, StateError>,
    ) -> bool {
        let mut shared = self.shared();
        shared.parked += 1;
        let mut seen = shared.save_round;
        self.changed.notify_all();
        while self.state.load() == RunState::Paused {
            if shared.save_round != seen {
                seen = shared.save_round;
                drop(shared);
                let state = save();
                shared = self.shared();
                if shared.save_round == seen {
                    shared.saved.push((index, state));
                    self.changed.notify_all();
                }
                continue;
            }
            shared = self.changed.wait(shared).unwrap_or_else(|e| e.into_inner());
        }
        shared.parked -= 1;
        self.state.load() != RunState::Exiting
    }

    /// The state of every vCPU of a paused VM, by index: each parked vCPU thread reads its
    /// own (its pending port or MMIO access already completed, see the run loop), so the
    /// states are those the guest would resume from.
    ///
    /// # Errors
    ///
    /// [`Error::NotPaused`] unless the VM is paused with every vCPU parked,
    /// [`Error::SaveState`] naming the vCPU whose state could not be read,
    /// [`Error::PauseTimeout`] when a vCPU did not answer within 5 seconds.
    pub fn save_vcpu_states(&self) -> Result<Vec<VcpuState>, Error> {
        let mut shared = self.shared();
        if self.state.load() != RunState::Paused || shared.parked < shared.vcpus.len() {
            return Err(Error::NotPaused);
        }
        let total = shared.vcpus.len();
        shared.save_round = shared.save_round.wrapping_add(1);
        shared.saved.clear();
        self.changed.notify_all();
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        while shared.saved.len() < total {
            if self.state.load() != RunState::Paused {
                return Err(Error::NotPaused);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::PauseTimeout {
                    parked: shared.saved.len(),
                    total,
                });
            }
            let (guard, _) = self
                .changed
                .wait_timeout(shared, deadline - now)
                .unwrap_or_else(|e| e.into_inner());
            shared = guard;
        }
        let mut saved = std::mem::take(&mut shared.saved);
        drop(shared);
        saved.sort_by_key(|(index, _)| *index);
        saved
            .into_iter()
            .map(|(index, state)| state.map_err(|source| Error::SaveState { index, source }))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_is_one_clear_line() {
        let cases = [
            (ExitReason::GuestReset, "guest reset the VM through the i8042 (0xFE)"),
            (
                ExitReason::TripleFault { vcpu: 0, rip: 0x10_0004 },
                "vCPU 0 triple-faulted (KVM_EXIT_SHUTDOWN) at RIP 0x100004",
            ),
            (
                ExitReason::InternalError {
                    vcpu: 0,
                    suberror: 1,
                    rip: 0xffff_ffff_8100_0000,
                    insn: vec![0x0f, 0x0b, 0x90],
                    data: vec![],
                },
                "vCPU 0: KVM internal error, suberror 1 (emulation failure) at RIP 0xffffffff81000000, instruction bytes: 0f 0b 90",
            ),
            (
                ExitReason::InternalError {
                    vcpu: 1,
                    suberror: 3,
                    rip: 0x42,
                    insn: vec![],
                    data: vec![0x80000b0e, 0x2],
                },
                "vCPU 1: KVM internal error, suberror 3 (event delivery failed) at RIP 0x42, instruction bytes: unavailable (RIP could not be read or does not map to guest memory), data: 0x80000b0e 0x2",
            ),
            (
                ExitReason::SystemEvent { vcpu: 2, kind: KVM_SYSTEM_EVENT_RESET },
                "vCPU 2 requested a reset (KVM_EXIT_SYSTEM_EVENT type 2)",
            ),
            (
                ExitReason::FailEntry { vcpu: 0, reason: 0x21 },
                "vCPU 0 could not enter the guest (KVM_EXIT_FAIL_ENTRY), hardware reason 0x21",
            ),
            (ExitReason::Halted { vcpu: 3 }, "vCPU 3 halted (KVM_EXIT_HLT)"),
            (ExitReason::Stopped, "the VMM stopped the VM"),
            (
                ExitReason::Error { vcpu: 0, message: "KVM_RUN failed: boom".into() },
                "vCPU 0: KVM_RUN failed: boom",
            ),
        ];
        for (reason, text) in cases {
            let shown = reason.to_string();
            assert_eq!(shown, text);
            assert!(!shown.contains('\n'));
        }
    }

    #[test]
    fn success_is_only_a_guest_reset() {
        assert!(ExitReason::GuestReset.is_success());
        assert!(ExitReason::SystemEvent {
            vcpu: 0,
            kind: KVM_SYSTEM_EVENT_RESET
        }
        .is_success());
        assert!(!ExitReason::SystemEvent {
            vcpu: 0,
            kind: KVM_SYSTEM_EVENT_SHUTDOWN
        }
        .is_success());
        assert!(!ExitReason::Stopped.is_success());
        assert!(!ExitReason::TripleFault { vcpu: 0, rip: 0 }.is_success());
        assert!(!ExitReason::Halted { vcpu: 0 }.is_success());
    }

    #[test]
    fn first_stop_reason_wins_and_the_eventfd_fires_once() {
        let control = VmControl::new().unwrap();
        assert!(!control.is_exiting());
        assert_eq!(control.exit_reason(), None);
        control.request_stop(ExitReason::GuestReset);
        control.request_stop(ExitReason::Stopped);
        assert!(control.is_exiting());
        assert_eq!(control.exit_reason(), Some(ExitReason::GuestReset));
        assert_eq!(control.exit_event().read().unwrap(), 1);
        // Exiting is final: no pause, and resume does nothing.
        assert!(matches!(control.pause(), Err(Error::Exiting)));
        control.resume();
        assert!(control.is_exiting());
    }

    #[test]
    fn pause_without_vcpus_returns_at_once() {
        let control = VmControl::new().unwrap();
        control.pause().unwrap();
        assert_eq!(control.state(), RunState::Paused);
        control.resume();
        assert_eq!(control.state(), RunState::Running);
    }

    #[test]
    fn pause_waits_for_every_vcpu_to_park() {
        let control = VmControl::new().unwrap();
        let byte = Box::new(AtomicU8::new(0));
        let target = Arc::new(KickTarget::new(0, byte.as_ptr()));
        control.register(target.clone());
        // A thread that polls the state like the run loop does.
        let c = control.clone();
        let t = target.clone();
        let worker = std::thread::spawn(move || {
            let mut parks = 0;
            loop {
                match c.state() {
                    RunState::Exiting => break,
                    RunState::Paused => {
                        parks += 1;
                        if !c.park(0, &mut || unreachable!("no save round")) {
                            break;
                        }
                    }
                    _ => std::thread::yield_now(),
                }
            }
            t.retire();
            c.unregister(&t);
            parks
        });
        control.pause().unwrap();
        assert_eq!(control.shared().parked, 1);
        // The kick set immediate_exit.
        assert_eq!(byte.load(Ordering::SeqCst), 1);
        target.clear();
        control.resume();
        control.pause().unwrap();
        control.request_stop(ExitReason::Stopped);
        // The worker parks once or, if the second pause lands before it noticed the resume,
        // stays parked from the first.
        assert!(matches!(worker.join().unwrap(), 1 | 2));
        assert!(control.shared().vcpus.is_empty());
        // Kicking a retired target does nothing.
        byte.store(0, Ordering::SeqCst);
        target.kick();
        assert_eq!(byte.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn pause_times_out_when_a_vcpu_never_parks() {
        let control = VmControl::new().unwrap();
        let byte = Box::new(AtomicU8::new(0));
        let target = Arc::new(KickTarget::new(0, byte.as_ptr()));
        control.register(target.clone());
        let start = Instant::now();
        let timeout = Duration::from_millis(100);
        let err = control.pause_within(timeout).unwrap_err();
        assert!(
            matches!(
                err,
                Error::PauseTimeout {
                    parked: 0,
                    total: 1
                }
            ),
            "{err}"
        );
        assert!(start.elapsed() >= timeout);
        // It kept kicking the vCPU meanwhile.
        assert_eq!(byte.load(Ordering::SeqCst), 1);
        control.resume();
        target.retire();
        control.unregister(&target);
    }
}
