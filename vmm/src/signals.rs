//! The signals that end a VMM, handled as Firecracker handles them: SIGBUS,
//! SIGSEGV, SIGXFSZ, SIGXCPU, SIGHUP and SIGILL are logged ("Shutting down
//! VM after intercepting signal N, code C."), marked in the `signals`
//! metrics group, the metrics are written, and the process exits with
//! Firecracker's code for the signal. SIGPIPE is logged and counted, and
//! the write that raised it fails with EPIPE, which its caller handles.
//!
//! (SIGSYS is the seccomp crate's; SIGTERM and SIGINT stop the VM in order,
//! in `main`.)

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use ember_metrics::MetricWriter;
use vmm_sys_util::signal::register_signal_handler;

/// A fatal signal: its number, exit code and `signals` metric name, in
/// Firecracker's order.
struct Fatal {
    signum: libc::c_int,
    exit_code: u8,
    metric: &'static str,
}

const FATAL: [Fatal; 6] = [
    Fatal {
        signum: libc::SIGBUS,
        exit_code: 149,
        metric: "sigbus",
    },
    Fatal {
        signum: libc::SIGSEGV,
        exit_code: 150,
        metric: "sigsegv",
    },
    Fatal {
        signum: libc::SIGXFSZ,
        exit_code: 151,
        metric: "sigxfsz",
    },
    Fatal {
        signum: libc::SIGXCPU,
        exit_code: 154,
        metric: "sigxcpu",
    },
    Fatal {
        signum: libc::SIGHUP,
        exit_code: 156,
        metric: "sighup",
    },
    Fatal {
        signum: libc::SIGILL,
        exit_code: 157,
        metric: "sigill",
    },
];

/// Firecracker's exit code for a signal it did not expect in its handler.
const UNEXPECTED_ERROR: libc::c_int = 2;

/// The fatal signal received (at most one: the first ends the process).
static RECEIVED: AtomicU64 = AtomicU64::new(0);
/// SIGPIPEs received.
static SIGPIPES: AtomicU64 = AtomicU64::new(0);
/// What runs before the process exits (writes the metrics).
static LAST_WORDS: OnceLock<fn()> = OnceLock::new();

/// The exit code Firecracker gives `signum`, for the fatal signals.
pub fn exit_code(signum: libc::c_int) -> Option<u8> {
    FATAL
        .iter()
        .find(|f| f.signum == signum)
        .map(|f| f.exit_code)
}

/// Reports Firecracker's `signals` group: a 1 for the fatal signal that
/// ended the process (if any), the number of SIGPIPEs.
pub fn report(out: &mut dyn MetricWriter) {
    let received = RECEIVED.load(Ordering::Relaxed);
    for (i, f) in FATAL.iter().enumerate() {
        let hit = u64::from(received == f.signum as u64);
        out.gauge(f.metric, hit);
        // SIGPIPE sits between sigxcpu and sighup in Firecracker's list.
        if i == 3 {
            out.counter("sigpipe", SIGPIPES.load(Ordering::Relaxed));
        }
    }
}

extern "C" fn on_fatal(num: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t to an SA_SIGINFO handler.
    let (signo, code) = unsafe { ((*info).si_signo, (*info).si_code) };
    let Some(exit) = exit_code(num).filter(|_| signo == num) else {
        // SAFETY: ends the process at once.
        unsafe { libc::_exit(UNEXPECTED_ERROR) };
    };
    RECEIVED.store(num as u64, Ordering::Relaxed);
    // Like Firecracker's handler: log and write the metrics, which takes
    // locks; a signal raised while one of them is held would hang here
    // rather than exit.
    log::error!("Shutting down VM after intercepting signal {signo}, code {code}.");
    if let Some(last_words) = LAST_WORDS.get() {
        last_words();
    }
    log::logger().flush();
    // SAFETY: ends the process at once, without running anything else of it.
    unsafe { libc::_exit(libc::c_int::from(exit)) };
}

extern "C" fn on_sigpipe(num: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t to an SA_SIGINFO handler.
    let (signo, code) = unsafe { ((*info).si_signo, (*info).si_code) };
    if num != libc::SIGPIPE || signo != num {
        log::error!("Received invalid signal {signo}, code {code}.");
        return;
    }
    SIGPIPES.fetch_add(1, Ordering::Relaxed);
    log::error!("Received signal {signo}, code {code}.");
}

/// Installs the handlers; `last_words` runs before a fatal signal ends the
/// process (to write the metrics).
///
/// # Errors
///
/// The `sigaction` failure.
pub fn install(last_words: fn()) -> vmm_sys_util::errno::Result<()> {
    let _ = LAST_WORDS.set(last_words);
    for f in &FATAL {
        register_signal_handler(f.signum, on_fatal)?;
    }
    register_signal_handler(libc::SIGPIPE, on_sigpipe)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_are_firecrackers() {
        assert_eq!(exit_code(libc::SIGBUS), Some(149));
        assert_eq!(exit_code(libc::SIGSEGV), Some(150));
        assert_eq!(exit_code(libc::SIGXFSZ), Some(151));
        assert_eq!(exit_code(libc::SIGXCPU), Some(154));
        assert_eq!(exit_code(libc::SIGHUP), Some(156));
        assert_eq!(exit_code(libc::SIGILL), Some(157));
        assert_eq!(exit_code(libc::SIGTERM), None);
        assert_eq!(exit_code(libc::SIGPIPE), None);
    }

    #[test]
    fn the_group_has_firecrackers_fields_in_order() {
        let names: Vec<&str> = ember_metrics::totals(&report)
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(
            names,
            ["sigbus", "sigsegv", "sigxfsz", "sigxcpu", "sigpipe", "sighup", "sigill"]
        );
    }
}
