//! Firecracker's log line format on top of the `log` crate:
//! `<timestamp> [<id>:<thread>(:<level>)(:<file>:<line>)] message`.
//!
//! The logger is installed once ([`init`], from the command line and the
//! configuration file) and can be changed afterwards ([`reconfigure`], for
//! `PUT /logger`): destination, level, and what each line shows.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};

use ember_config::{self as config, LogLevel};

/// What a line looks like and where it goes; changed by [`reconfigure`].
struct Settings {
    id: String,
    show_level: bool,
    show_origin: bool,
    module: Option<String>,
    out: Box<dyn Write + Send>,
}

/// Lines one call site may log per [`RATE_LIMIT_WINDOW`].
pub const RATE_LIMIT_BURST: u32 = 10;
/// The window of the per-call-site rate limit.
pub const RATE_LIMIT_WINDOW: std::time::Duration = std::time::Duration::from_secs(5);

/// What the rate limiter decided for one record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RateDecision {
    /// Write the line; `suppressed` lines of the same call site were dropped
    /// since the last one written.
    Log {
        /// Lines dropped before this one.
        suppressed: u64,
    },
    /// Drop the line.
    Drop,
}

#[derive(Debug)]
struct Site {
    window_start: std::time::Instant,
    in_window: u32,
    suppressed: u64,
}

/// A per-call-site rate limit, so that a guest that makes a device log on
/// every access cannot flood the log: each `file:line` may write
/// [`RATE_LIMIT_BURST`] lines per [`RATE_LIMIT_WINDOW`]; the next line
/// written says how many were dropped.
#[derive(Debug, Default)]
pub struct RateLimiter {
    sites: std::collections::HashMap<(&'static str, u32), Site>,
}

impl RateLimiter {
    /// Decides for a record from `site` at time `now`.
    pub fn check(&mut self, site: (&'static str, u32), now: std::time::Instant) -> RateDecision {
        let entry = self.sites.entry(site).or_insert(Site {
            window_start: now,
            in_window: 0,
            suppressed: 0,
        });
        if now.duration_since(entry.window_start) >= RATE_LIMIT_WINDOW {
            entry.window_start = now;
            entry.in_window = 0;
        }
        if entry.in_window >= RATE_LIMIT_BURST {
            entry.suppressed += 1;
            return RateDecision::Drop;
        }
        entry.in_window += 1;
        let suppressed = std::mem::take(&mut entry.suppressed);
        RateDecision::Log { suppressed }
    }
}

/// Where the log goes and how lines look.
pub struct Logger {
    settings: Mutex<Settings>,
    limiter: Mutex<RateLimiter>,
}

static LOGGER: OnceLock<Logger> = OnceLock::new();
static TO_FILE: AtomicBool = AtomicBool::new(false);

/// Whether the log goes to a file or pipe (not stderr).
pub fn logs_to_file() -> bool {
    TO_FILE.load(Ordering::Relaxed)
}

/// Options of the logger, from the command line or the `logger` section.
#[derive(Clone, Debug, Default)]
pub struct LoggerOptions {
    /// Instance id shown in each line.
    pub id: String,
    /// Level; Warning when absent and logging to stderr, Info with a file.
    pub level: Option<LogLevel>,
    /// Log file or named pipe; stderr when absent.
    pub log_path: Option<std::path::PathBuf>,
    /// Show the level.
    pub show_level: bool,
    /// Show file:line.
    pub show_origin: bool,
    /// Only log records whose module path starts with this.
    pub module: Option<String>,
}

/// Errors setting up the logger.
#[derive(Debug, thiserror::Error)]
pub enum LoggerError {
    /// The log file could not be opened.
    #[error("cannot open log file {path}: {source}")]
    Open {
        /// Path.
        path: std::path::PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The logger was already initialised.
    #[error("the logger is already configured")]
    AlreadyConfigured,
    /// [`reconfigure`] was called before [`init`].
    #[error("the logger is not installed yet")]
    NotInstalled,
}

fn open_log(path: &Path) -> Result<Box<dyn Write + Send>, LoggerError> {
    // A FIFO must not block the VMM when nobody reads it yet; a symbolic
    // link is not followed, so it cannot send the log elsewhere.
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(path)
        .map_err(|source| LoggerError::Open {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(Box::new(file))
}

/// Installs the process-wide logger.
pub fn init(opts: &LoggerOptions) -> Result<(), LoggerError> {
    let (out, default_level) = match &opts.log_path {
        Some(p) => (open_log(p)?, LogLevel::Info),
        None => (
            Box::new(std::io::stderr()) as Box<dyn Write + Send>,
            LogLevel::Warning,
        ),
    };
    let level = opts.level.unwrap_or(default_level);
    let logger = Logger {
        settings: Mutex::new(Settings {
            id: if opts.id.is_empty() {
                "anonymous-instance".into()
            } else {
                opts.id.clone()
            },
            show_level: opts.show_level,
            show_origin: opts.show_origin,
            module: opts.module.clone(),
            out,
        }),
        limiter: Mutex::new(RateLimiter::default()),
    };
    LOGGER
        .set(logger)
        .map_err(|_| LoggerError::AlreadyConfigured)?;
    let logger = LOGGER.get().ok_or(LoggerError::AlreadyConfigured)?;
    log::set_logger(logger).map_err(|_| LoggerError::AlreadyConfigured)?;
    log::set_max_level(level.filter());
    TO_FILE.store(opts.log_path.is_some(), Ordering::Relaxed);
    Ok(())
}

/// Applies a `PUT /logger` (or `logger` section) to the installed logger:
/// a `log_path` moves the log to that file or pipe, a `level` replaces the
/// level (without one, a logger that moves from stderr to a file goes from
/// Warning to Info, as [`init`] would have chosen), `module` replaces the
/// filter when given; `show_level` and `show_log_origin` are set as given.
/// On error nothing changes.
pub fn reconfigure(cfg: &config::Logger) -> Result<(), LoggerError> {
    let logger = LOGGER.get().ok_or(LoggerError::NotInstalled)?;
    let out = cfg.log_path.as_deref().map(open_log).transpose()?;
    let mut settings = logger.lock();
    let level = match cfg.level {
        Some(level) => Some(level.filter()),
        None if out.is_some() && !logs_to_file() => {
            Some(log::max_level().max(LogLevel::Info.filter()))
        }
        None => None,
    };
    if let Some(out) = out {
        // Whatever the old destination buffered goes out before it closes.
        let _ = settings.out.flush();
        settings.out = out;
        TO_FILE.store(true, Ordering::Relaxed);
    }
    settings.show_level = cfg.show_level;
    settings.show_origin = cfg.show_log_origin;
    if let Some(module) = &cfg.module {
        settings.module = Some(module.clone());
    }
    if let Some(level) = level {
        log::set_max_level(level);
    }
    Ok(())
}

/// Formats the local time as Firecracker does: `2024-01-31T12:34:56.123456789`.
pub fn timestamp() -> String {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
    // SAFETY: an all-zero `tm` is a valid value of this plain C struct.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid for the duration of the call.
    unsafe { libc::localtime_r(&ts.tv_sec, &mut tm) };
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:09}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec,
        ts.tv_nsec
    )
}

fn level_name(level: log::Level) -> &'static str {
    match level {
        log::Level::Error => "Error",
        log::Level::Warn => "Warn",
        log::Level::Info => "Info",
        log::Level::Debug => "Debug",
        log::Level::Trace => "Trace",
    }
}

impl Logger {
    fn lock(&self) -> MutexGuard<'_, Settings> {
        // A panic while logging must not silence the log.
        self.settings.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Settings {
    fn format(&self, record: &log::Record) -> String {
        let thread = std::thread::current();
        let mut prefix = format!("{}:{}", self.id, thread.name().unwrap_or("-"));
        if self.show_level {
            prefix.push(':');
            prefix.push_str(level_name(record.level()));
        }
        if self.show_origin {
            prefix.push_str(&format!(
                ":{}:{}",
                record.file().unwrap_or("?"),
                record.line().unwrap_or(0)
            ));
        }
        format!("{} [{}] {}\n", timestamp(), prefix, record.args())
    }

    fn wants(&self, metadata: &log::Metadata) -> bool {
        match &self.module {
            Some(m) => metadata.target().starts_with(m.as_str()),
            None => true,
        }
    }
}

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        self.lock().wants(metadata)
    }

    fn log(&self, record: &log::Record) {
        let mut settings = self.lock();
        if !settings.wants(record.metadata()) {
            return;
        }
        let mut line = settings.format(record);
        if let (Some(file), Some(lineno)) = (record.file_static(), record.line()) {
            let decision = self
                .limiter
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .check((file, lineno), std::time::Instant::now());
            match decision {
                RateDecision::Drop => return,
                RateDecision::Log { suppressed: 0 } => {}
                RateDecision::Log { suppressed } => {
                    line.insert_str(
                        0,
                        &format!(
                            "{} [{}] {suppressed} messages from {file}:{lineno} were suppressed by the log rate limit\n",
                            timestamp(),
                            settings.id
                        ),
                    );
                }
            }
        }
        // A log that cannot be written (full pipe) must not stop the VM.
        let _ = settings.out.write_all(line.as_bytes());
    }

    fn flush(&self) {
        let _ = self.lock().out.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_path_that_is_a_link_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        std::fs::write(&target, "keep").unwrap();
        let link = dir.path().join("log");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let Err(e) = open_log(&link) else {
            panic!("a link was opened")
        };
        assert!(e.to_string().contains("symbolic links"), "{e}");
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep");
    }

    #[test]
    fn rate_limit_per_call_site() {
        let mut r = RateLimiter::default();
        let t0 = std::time::Instant::now();
        let a = ("a.rs", 1);
        let b = ("b.rs", 7);
        for _ in 0..RATE_LIMIT_BURST {
            assert_eq!(r.check(a, t0), RateDecision::Log { suppressed: 0 });
        }
        assert_eq!(r.check(a, t0), RateDecision::Drop);
        assert_eq!(r.check(a, t0), RateDecision::Drop);
        // Another call site is not affected.
        assert_eq!(r.check(b, t0), RateDecision::Log { suppressed: 0 });
        // A new window reports what was dropped.
        let t1 = t0 + RATE_LIMIT_WINDOW;
        assert_eq!(r.check(a, t1), RateDecision::Log { suppressed: 2 });
        assert_eq!(r.check(a, t1), RateDecision::Log { suppressed: 0 });
    }

    #[test]
    fn line_format_matches_firecracker() {
        let settings = Settings {
            id: "vm1".into(),
            show_level: true,
            show_origin: false,
            module: None,
            out: Box::new(std::io::sink()),
        };
        let line = settings.format(
            &log::Record::builder()
                .args(format_args!("hello"))
                .level(log::Level::Warn)
                .build(),
        );
        // 2024-01-31T12:34:56.123456789 [vm1:<thread>:Warn] hello
        let (ts, rest) = line.split_once(' ').unwrap();
        assert_eq!(ts.len(), 29, "{ts}");
        assert_eq!(&ts[4..5], "-");
        assert_eq!(&ts[10..11], "T");
        assert_eq!(&ts[19..20], ".");
        assert!(rest.starts_with("[vm1:"), "{rest}");
        assert!(rest.ends_with(":Warn] hello\n"), "{rest}");
    }

    #[test]
    fn reconfigure_moves_the_log_and_changes_lines() {
        let dir = tempfile::tempdir().unwrap();
        let first = dir.path().join("first.log");
        let second = dir.path().join("second.log");
        init(&LoggerOptions {
            id: "vm-log".into(),
            level: Some(LogLevel::Info),
            log_path: Some(first.clone()),
            ..LoggerOptions::default()
        })
        .unwrap();
        assert!(logs_to_file());
        log::info!("line one");
        log::debug!("not shown at Info");
        let e = reconfigure(&config::Logger {
            log_path: Some(dir.path().join("no/such/dir/x.log")),
            level: Some(LogLevel::Trace),
            ..config::Logger::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("no/such/dir/x.log"), "{e}");
        // The failed call changed nothing.
        assert_eq!(log::max_level(), log::LevelFilter::Info);

        reconfigure(&config::Logger {
            log_path: Some(second.clone()),
            level: Some(LogLevel::Debug),
            show_level: true,
            ..config::Logger::default()
        })
        .unwrap();
        log::debug!("line two");
        log::logger().flush();
        let first = std::fs::read_to_string(&first).unwrap();
        let second = std::fs::read_to_string(&second).unwrap();
        assert!(
            first.contains("[vm-log:") && first.contains("] line one"),
            "{first}"
        );
        assert!(
            !first.contains("not shown") && !first.contains("line two"),
            "{first}"
        );
        assert!(second.contains(":Debug] line two"), "{second}");
        assert!(!second.contains("line one"), "{second}");
        assert!(matches!(
            init(&LoggerOptions::default()),
            Err(LoggerError::AlreadyConfigured)
        ));
    }
}
