//! `ember`: a microVM monitor that is a drop-in for the `firecracker`
//! binary: the same flags, the same JSON configuration file, the same
//! guest-visible machine.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;

use ember::config::{LogLevel, VmConfig};
use ember::{boot_timer, logger, terminal, vm};

/// Exit codes, Firecracker's values.
mod exit_code {
    /// The guest reset itself (i8042 0xFE): a clean end.
    pub const OK: u8 = 0;
    /// The VM ended in a failure (triple fault, KVM error, ...).
    pub const GENERIC_ERROR: u8 = 1;
    /// The configuration could not be applied.
    pub const BAD_CONFIGURATION: u8 = 152;
    /// The command line could not be parsed.
    pub const ARG_PARSING: u8 = 153;
}

/// Longest `--id` Firecracker accepts.
const MAX_ID_LEN: usize = 64;

/// Command-line flags, Firecracker's names.
#[derive(Parser, Debug)]
#[command(
    name = "ember",
    version,
    about = "Ember: a Firecracker-compatible microVM monitor"
)]
struct Cli {
    /// Path of the API Unix socket.
    #[arg(long, default_value = "/run/firecracker.socket")]
    api_sock: PathBuf,
    /// MicroVM id: letters, digits and '-', at most 64 characters.
    #[arg(long, default_value = "anonymous-instance")]
    id: String,
    /// JSON file describing the microVM (Firecracker's schema).
    #[arg(long)]
    config_file: Option<PathBuf>,
    /// Do not start the API server; requires --config-file.
    #[arg(long)]
    no_api: bool,
    /// Log file or named pipe (stderr when absent).
    #[arg(long)]
    log_path: Option<PathBuf>,
    /// Log level: Error, Warning, Info, Debug, Trace or Off.
    #[arg(long)]
    level: Option<LogLevel>,
    /// Only log messages of this module.
    #[arg(long)]
    module: Option<String>,
    /// Show the level in log lines.
    #[arg(long)]
    show_level: bool,
    /// Show file and line in log lines.
    #[arg(long)]
    show_log_origin: bool,
    /// Log the guest boot time when the guest writes 123 to 0xC000_0000.
    #[arg(long)]
    boot_timer: bool,
    /// Disable seccomp filtering.
    #[arg(long)]
    no_seccomp: bool,
    /// Custom seccomp filter file.
    #[arg(long)]
    seccomp_filter: Option<PathBuf>,
    /// Metrics file or named pipe.
    #[arg(long)]
    metrics_path: Option<PathBuf>,
    /// Process start time in microseconds (set by a jailer).
    #[arg(long)]
    start_time_us: Option<u64>,
    /// Process start CPU time in microseconds (set by a jailer).
    #[arg(long)]
    start_time_cpu_us: Option<u64>,
    /// Parent process CPU time in microseconds (set by a jailer).
    #[arg(long)]
    parent_cpu_time_us: Option<u64>,
    /// Largest API request body in bytes.
    #[arg(long, default_value_t = 51_200)]
    http_api_max_payload_size: usize,
    /// Largest MMDS data store in bytes.
    #[arg(long)]
    mmds_size_limit: Option<usize>,
}

fn fail(code: u8, message: impl std::fmt::Display) -> ExitCode {
    // The one line a user reads when the VMM stops on an error.
    eprintln!("ember: error: {message}");
    // The log gets the same line, unless it is stderr itself.
    if logger::logs_to_file() {
        log::error!("{message}");
        log::logger().flush();
    }
    ExitCode::from(code)
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

fn main() -> ExitCode {
    let start = Instant::now();
    let start_cpu_us = boot_timer::process_cpu_us();

    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            let msg = e.to_string();
            let first = msg.lines().next().unwrap_or("invalid arguments");
            return fail(exit_code::ARG_PARSING, first.trim_start_matches("error: "));
        }
    };
    if !valid_id(&cli.id) {
        return fail(
            exit_code::ARG_PARSING,
            format!(
                "invalid --id `{}`: use 1 to {MAX_ID_LEN} letters, digits or '-'",
                cli.id
            ),
        );
    }

    let config = match (&cli.config_file, cli.no_api) {
        (Some(path), _) => match VmConfig::from_file(path) {
            Ok(c) => Some(c),
            Err(e) => return fail(exit_code::BAD_CONFIGURATION, e),
        },
        (None, true) => return fail(exit_code::ARG_PARSING, "--no-api requires --config-file"),
        (None, false) => None,
    };

    let file_logger = config.as_ref().and_then(|c| c.logger.clone());
    let opts = logger::LoggerOptions {
        id: cli.id.clone(),
        level: cli.level.or(file_logger.as_ref().and_then(|l| l.level)),
        log_path: cli
            .log_path
            .clone()
            .or(file_logger.as_ref().and_then(|l| l.log_path.clone())),
        show_level: cli.show_level || file_logger.as_ref().is_some_and(|l| l.show_level),
        show_origin: cli.show_log_origin || file_logger.as_ref().is_some_and(|l| l.show_log_origin),
        module: cli
            .module
            .clone()
            .or(file_logger.as_ref().and_then(|l| l.module.clone())),
    };
    if let Err(e) = logger::init(&opts) {
        return fail(exit_code::BAD_CONFIGURATION, e);
    }
    log::info!("Running Ember v{}", env!("CARGO_PKG_VERSION"));

    if cli.seccomp_filter.is_some() {
        return fail(
            exit_code::ARG_PARSING,
            "--seccomp-filter is not supported yet by Ember",
        );
    }
    if cli.metrics_path.is_some() {
        return fail(
            exit_code::ARG_PARSING,
            "--metrics-path is not supported yet by Ember",
        );
    }
    let Some(config) = config else {
        return fail(
            exit_code::ARG_PARSING,
            format!(
                "the API server ({}) is not available yet in Ember: run with --no-api --config-file FILE",
                cli.api_sock.display()
            ),
        );
    };

    let run_opts = vm::RunOptions {
        boot_timer: cli.boot_timer,
        start: Some(start),
        start_cpu_us,
    };
    let vm = match vm::Vm::build(&config, &run_opts) {
        Ok(vm) => vm,
        Err(e) => return fail(exit_code::BAD_CONFIGURATION, e),
    };
    let _raw = terminal::RawTerminal::enable(libc::STDIN_FILENO);
    let reason = match vm.run() {
        Ok(r) => r,
        Err(e) => {
            drop(_raw);
            return fail(exit_code::GENERIC_ERROR, e);
        }
    };
    drop(_raw);
    if reason.is_success() {
        log::info!("{reason}");
        log::logger().flush();
        ExitCode::from(exit_code::OK)
    } else {
        fail(exit_code::GENERIC_ERROR, reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn firecracker_flags_parse() {
        let cli = Cli::try_parse_from([
            "ember",
            "--api-sock",
            "/tmp/a.sock",
            "--id",
            "vm-1",
            "--config-file",
            "/c.json",
            "--no-api",
            "--level",
            "Debug",
            "--log-path",
            "/l",
            "--boot-timer",
            "--show-level",
            "--show-log-origin",
        ])
        .unwrap();
        assert!(cli.no_api && cli.boot_timer && cli.show_level && cli.show_log_origin);
        assert_eq!(cli.level, Some(LogLevel::Debug));
        assert_eq!(
            cli.config_file.as_deref(),
            Some(std::path::Path::new("/c.json"))
        );
        assert!(Cli::try_parse_from(["ember", "--level", "loud"]).is_err());
        assert!(Cli::try_parse_from(["ember", "--bogus"]).is_err());
    }

    #[test]
    fn id_validation() {
        assert!(valid_id("anonymous-instance"));
        assert!(valid_id(&"a".repeat(64)));
        assert!(!valid_id(&"a".repeat(65)));
        assert!(!valid_id(""));
        assert!(!valid_id("a/b"));
    }
}
