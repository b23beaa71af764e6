//! Boots a test guest through the `ember` binary: the README's "boot a VM".
//!
//! ```text
//! cargo run -p ember-tests --bin demo [GUEST] [-- EMBER_ARGS...]
//! ```
//!
//! Writes a Firecracker-style config for GUEST (default `hello`; the guests
//! are built by build.rs) into the temp directory, prints its path, and runs
//! `ember --no-api --config-file CONFIG EMBER_ARGS...` with the terminal as
//! its stdio, exiting with ember's exit code.

use std::env;
use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, ExitCode};

use ember_tests::{default_config, ember_binary, find_guest, guest_names};

fn main() -> ExitCode {
    let mut args = env::args().skip(1).peekable();
    let guest = match args.peek().map(String::as_str) {
        Some("--") => {
            args.next();
            "hello".to_string()
        }
        Some(name) if !name.starts_with('-') => {
            let name = name.to_string();
            args.next();
            if args.peek().map(String::as_str) == Some("--") {
                args.next();
            }
            name
        }
        _ => "hello".to_string(),
    };
    let ember_args: Vec<String> = args.collect();

    let Some(kernel) = find_guest(&guest) else {
        eprintln!(
            "demo: no guest named {guest:?}; choose one of: {}",
            guest_names().collect::<Vec<_>>().join(", ")
        );
        return ExitCode::from(2);
    };
    let dir = env::temp_dir().join("ember-demo");
    let config_path = dir.join(format!("{guest}.json"));
    let written = fs::create_dir_all(&dir).and_then(|()| {
        let text = serde_json::to_string_pretty(&default_config(&kernel))
            .map_err(std::io::Error::other)?;
        fs::write(&config_path, text + "\n")
    });
    if let Err(e) = written {
        eprintln!("demo: cannot write {}: {e}", config_path.display());
        return ExitCode::from(1);
    }

    let ember = ember_binary();
    println!("config: {}", config_path.display());
    let mut shown = format!(
        "{} --no-api --config-file {}",
        ember.display(),
        config_path.display()
    );
    for arg in &ember_args {
        shown.push(' ');
        shown.push_str(arg);
    }
    println!("running: {shown}");
    let status = Command::new(&ember)
        .arg("--no-api")
        .arg("--config-file")
        .arg(&config_path)
        .args(&ember_args)
        .status();
    match status {
        Ok(status) => match (status.code(), status.signal()) {
            (Some(code), _) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
            // Shells report death by signal N as 128 + N.
            (None, Some(sig)) => ExitCode::from(u8::try_from(128 + sig).unwrap_or(1)),
            (None, None) => ExitCode::from(1),
        },
        Err(e) => {
            eprintln!("demo: cannot run {}: {e}", ember.display());
            ExitCode::from(1)
        }
    }
}
