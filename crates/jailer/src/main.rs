// SPDX-License-Identifier: Apache-2.0

//! `ember-jailer`: builds a Firecracker-style jail and execs the VMM in it.
//!
//! See the `ember_jailer` library for the flags and the steps. Errors are
//! one line on stderr, `ember-jailer: error: <what failed, with which path>`,
//! and exit status 1.

use std::process::ExitCode;

use ember_jailer::args::{self, Action};
use ember_jailer::{sanitize_process, Env, JailerError, StartTimes, VERSION};

/// Prints warnings (and worse) on stderr; the jailer has no log file.
struct StderrLogger;

impl log::Log for StderrLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::Level::Warn
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            let level = record.level().as_str().to_ascii_lowercase();
            eprintln!("ember-jailer: {level}: {}", record.args());
        }
    }

    fn flush(&self) {}
}

static LOGGER: StderrLogger = StderrLogger;

fn run() -> Result<(), JailerError> {
    // Taken first, so the VMM can tell how long jailing took.
    let start = StartTimes::now();
    // As Firecracker: before even reading the arguments.
    sanitize_process()?;

    let argv: Vec<_> = std::env::args_os().skip(1).collect();
    match args::parse(&argv)? {
        Action::Help => {
            println!("Ember jailer v{VERSION}\n");
            print!("{}", args::help_text());
            Ok(())
        }
        Action::Version => {
            println!("Ember jailer v{VERSION}");
            Ok(())
        }
        Action::Jail(jail) => {
            let env = Env::new(*jail, start)?;
            match env.run()? {}
        }
    }
}

fn main() -> ExitCode {
    // Only fails if a logger is already set, which cannot happen here.
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(log::LevelFilter::Warn);
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ember-jailer: error: {e}");
            ExitCode::FAILURE
        }
    }
}
