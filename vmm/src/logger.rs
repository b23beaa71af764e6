//! Firecracker's log line format on top of the `log` crate:
//! `<timestamp> [<id>:<thread>(:<level>)(:<file>:<line>)] message`.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::{Mutex, OnceLock};

use crate::config::LogLevel;

/// Where the log goes and how lines look.
pub struct Logger {
    id: String,
    show_level: bool,
    show_origin: bool,
    module: Option<String>,
    out: Mutex<Box<dyn Write + Send>>,
}

static LOGGER: OnceLock<Logger> = OnceLock::new();
static TO_FILE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether the log goes to a file or pipe (not stderr).
pub fn logs_to_file() -> bool {
    TO_FILE.load(std::sync::atomic::Ordering::Relaxed)
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
}

fn open_log(path: &Path) -> Result<Box<dyn Write + Send>, LoggerError> {
    // A FIFO must not block the VMM when nobody reads it yet.
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .custom_flags(libc::O_NONBLOCK)
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
    TO_FILE.store(
        opts.log_path.is_some(),
        std::sync::atomic::Ordering::Relaxed,
    );
    let logger = Logger {
        id: if opts.id.is_empty() {
            "anonymous-instance".into()
        } else {
            opts.id.clone()
        },
        show_level: opts.show_level,
        show_origin: opts.show_origin,
        module: opts.module.clone(),
        out: Mutex::new(out),
    };
    LOGGER
        .set(logger)
        .map_err(|_| LoggerError::AlreadyConfigured)?;
    let logger = LOGGER.get().ok_or(LoggerError::AlreadyConfigured)?;
    log::set_logger(logger).map_err(|_| LoggerError::AlreadyConfigured)?;
    log::set_max_level(level.filter());
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
}

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        match &self.module {
            Some(m) => metadata.target().starts_with(m.as_str()),
            None => true,
        }
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let line = self.format(record);
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        // A log that cannot be written (full pipe) must not stop the VM.
        let _ = out.write_all(line.as_bytes());
    }

    fn flush(&self) {
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        let _ = out.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_format_matches_firecracker() {
        let logger = Logger {
            id: "vm1".into(),
            show_level: true,
            show_origin: false,
            module: None,
            out: Mutex::new(Box::new(std::io::sink())),
        };
        let line = logger.format(
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
}
