//! `ember`: a microVM monitor that is a drop-in for the `firecracker`
//! binary: the same flags, the same JSON configuration file, the same
//! guest-visible machine.

use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use clap::Parser;

use ember::seccomp::{Filters, SeccompConfig};
use ember::socket_reaper::SocketReaper;
use ember::{terminal, vm};
use ember_api::{
    start_api_server_with, ApiError, ApiServerHandle, PrebootApiController, PrebootOutcome,
    Responder, ServerOptions, SharedMmds, VmmAction, FIRECRACKER_API_VERSION,
};
use ember_config::{self as config, LogLevel, VmConfig};
use ember_devices::boot_timer;
use ember_logger::logger;
use ember_logger::metrics::{MetricWriter, Metrics};
use ember_mmds::{Mmds, MmdsMetrics};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Exit codes, Firecracker's values.
mod exit_code {
    /// The guest reset itself (i8042 0xFE): a clean end.
    pub const OK: u8 = 0;
    /// The VM ended in a failure (triple fault, KVM error, ...), or the VMM
    /// could not serve it (API socket, metrics file).
    pub const GENERIC_ERROR: u8 = 1;
    /// The configuration could not be applied.
    pub const BAD_CONFIGURATION: u8 = 152;
    /// The command line could not be parsed.
    pub const ARG_PARSING: u8 = 153;
}
/// Longest `--id` Firecracker accepts.
const MAX_ID_LEN: usize = 64;

/// The name the binary answers to: its own, or Firecracker's when it is
/// run as `firecracker` (a symbolic link, a copy, Firecracker's release name
/// `firecracker-v1.17.0-x86_64`), so that tools which read `--version` or
/// the start log line accept it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Personality {
    Ember,
    Firecracker,
}

impl Personality {
    /// From `argv[0]`: Firecracker when its file name starts with
    /// `firecracker`.
    fn from_argv0(argv0: Option<&std::ffi::OsStr>) -> Self {
        let name = argv0
            .map(std::path::Path::new)
            .and_then(std::path::Path::file_name)
            .and_then(std::ffi::OsStr::to_str)
            .unwrap_or("");
        if name.starts_with("firecracker") {
            Personality::Firecracker
        } else {
            Personality::Ember
        }
    }

    /// `--version`'s output: Firecracker's exact words (the version line
    /// and an empty line) under its name.
    fn version_text(self) -> String {
        match self {
            Personality::Firecracker => format!("Firecracker v{FIRECRACKER_API_VERSION}\n\n"),
            Personality::Ember => format!(
                "Ember v{} (Firecracker v{FIRECRACKER_API_VERSION} API)\n",
                env!("CARGO_PKG_VERSION")
            ),
        }
    }

    /// The product name log lines use.
    fn name(self) -> &'static str {
        match self {
            Personality::Firecracker => "Firecracker",
            Personality::Ember => "Ember",
        }
    }

    /// The first log line.
    fn start_line(self) -> String {
        match self {
            Personality::Firecracker => format!("Running Firecracker v{FIRECRACKER_API_VERSION}"),
            Personality::Ember => format!("Running Ember v{}", env!("CARGO_PKG_VERSION")),
        }
    }
}

/// Command-line flags, Firecracker's names.
#[derive(Parser, Debug)]
#[command(
    name = "ember",
    disable_version_flag = true,
    about = "Ember: a Firecracker-compatible microVM monitor"
)]
struct Cli {
    /// Print the version and exit.
    #[arg(long)]
    version: bool,
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
    /// Largest MMDS data store in bytes, serialized (default: the
    /// `--http-api-max-payload-size`, as in Firecracker).
    #[arg(long)]
    mmds_size_limit: Option<usize>,
    /// JSON file loaded into the MMDS data store at start.
    #[arg(long, value_name = "FILE")]
    metadata: Option<PathBuf>,
    /// Virtio devices on PCI: refused, Ember's virtio transport is
    /// virtio-mmio.
    #[arg(long)]
    enable_pci: bool,
    /// Print the snapshot format version this build writes, and exit.
    #[arg(long)]
    snapshot_version: bool,
    /// Print the format version of the snapshot state file FILE, and exit.
    #[arg(long, value_name = "FILE")]
    describe_snapshot: Option<PathBuf>,
}

/// The metadata store, bounded by `--mmds-size-limit` (default: the API's
/// payload limit, as in Firecracker) and filled from `--metadata`.
fn mmds_store(cli: &Cli) -> Result<SharedMmds, String> {
    let limit = cli.mmds_size_limit.unwrap_or(cli.http_api_max_payload_size);
    let mut mmds = Mmds::new(limit);
    if let Some(path) = &cli.metadata {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("--metadata {}: {e}", path.display()))?;
        let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
            format!(
                "--metadata {}: MMDS error: metadata provided not valid json: {e}",
                path.display()
            )
        })?;
        mmds.put_data(value)
            .map_err(|e| format!("--metadata {}: MMDS error: {e}", path.display()))?;
        log::info!("Successfully added metadata to mmds from file");
    }
    Ok(Arc::new(Mutex::new(mmds)))
}

/// `--snapshot-version` and `--describe-snapshot`: what Firecracker
/// prints (`v<major>.<minor>.<patch>`), then the process ends.
fn snapshot_flags(cli: &Cli) -> Option<u8> {
    if cli.snapshot_version {
        println!("v{}", ember_snapshot::SNAPSHOT_VERSION);
        return Some(exit_code::OK);
    }
    let path = cli.describe_snapshot.as_ref()?;
    let version = std::fs::File::open(path)
        .and_then(|f| {
            use std::io::Read;
            let mut header = Vec::new();
            f.take(ember_snapshot::HEADER_LEN as u64)
                .read_to_end(&mut header)
                .map(|_| header)
        })
        .map_err(|e| format!("cannot read snapshot file {}: {e}", path.display()))
        .and_then(|h| ember_snapshot::format_version(&h).map_err(|e| e.to_string()));
    Some(match version {
        Ok(v) => {
            println!("v{v}");
            exit_code::OK
        }
        Err(e) => fail(exit_code::GENERIC_ERROR, e),
    })
}

impl Cli {
    /// Firecracker flags Ember knows but cannot honour, and flag
    /// combinations Firecracker's parser refuses: the one-line reason.
    fn refusal(&self) -> Option<String> {
        if self.enable_pci {
            return Some(
                "--enable-pci: PCI is not supported by Ember, whose virtio devices use virtio-mmio"
                    .into(),
            );
        }
        if self.no_seccomp && self.seccomp_filter.is_some() {
            return Some("--no-seccomp cannot be used together with --seccomp-filter".into());
        }
        None
    }
}

fn fail(code: u8, message: impl std::fmt::Display) -> u8 {
    // The one line a user reads when the VMM stops on an error.
    eprintln!("ember: error: {message}");
    // The log gets the same line, unless it is stderr itself.
    if logger::logs_to_file() {
        log::error!("{message}");
        log::logger().flush();
    }
    code
}

/// The metrics the SIGSYS handler flushes before the process ends.
static METRICS: OnceLock<Arc<Metrics>> = OnceLock::new();

/// The fatal signal handlers' last words: a metrics line (with
/// `seccomp.num_faults` or the `signals` mark), as Firecracker writes on its
/// way out.
fn flush_metrics_on_fatal_signal() {
    if let Some(metrics) = METRICS.get() {
        if let Err(e) = metrics.flush() {
            log::error!("Failed to write metrics while stopping: {e}");
        }
    }
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

/// SIGTERM and SIGINT: the VMM stops the VM, writes its last metrics line,
/// removes its API socket, restores the terminal, then ends by the same
/// signal, so its parent sees what it would see of Firecracker (which does
/// not catch them).
mod stop_signal {
    use std::os::unix::io::RawFd;
    use std::sync::atomic::{AtomicI32, Ordering};

    use vmm_sys_util::signal::register_signal_handler;

    /// The eventfd the handler writes; -1 before [`install`].
    static EVENT_FD: AtomicI32 = AtomicI32::new(-1);
    /// The signal received, 0 for none.
    static RECEIVED: AtomicI32 = AtomicI32::new(0);

    extern "C" fn handle(signum: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
        // Only async-signal-safe operations: lock-free atomics and write(2).
        RECEIVED.store(signum, Ordering::SeqCst);
        let fd = EVENT_FD.load(Ordering::SeqCst);
        if fd >= 0 {
            // SAFETY: __errno_location returns this thread's errno, which
            // the interrupted code may be about to read: keep it.
            let saved = unsafe { *libc::__errno_location() };
            let one = 1u64.to_ne_bytes();
            // SAFETY: writes 8 bytes from a live buffer to the eventfd,
            // which stays open for the process's lifetime (it is leaked in
            // `install`). A full counter (EAGAIN) still leaves it readable.
            unsafe { libc::write(fd, one.as_ptr().cast(), one.len()) };
            // SAFETY: as above.
            unsafe { *libc::__errno_location() = saved };
        }
    }

    /// Makes SIGTERM and SIGINT write `fd` (kept open from now on).
    pub fn install(fd: RawFd) -> Result<(), vmm_sys_util::errno::Error> {
        EVENT_FD.store(fd, Ordering::SeqCst);
        register_signal_handler(libc::SIGTERM, handle)?;
        register_signal_handler(libc::SIGINT, handle)
    }

    /// The stop signal received, if any.
    pub fn received() -> Option<libc::c_int> {
        match RECEIVED.load(Ordering::SeqCst) {
            0 => None,
            signum => Some(signum),
        }
    }

    /// Ends the process by `signum` with its default action.
    pub fn reraise(signum: libc::c_int) {
        // SAFETY: restores the default disposition, then sends the signal
        // to this thread; the default action of SIGTERM and SIGINT ends the
        // process.
        unsafe {
            libc::signal(signum, libc::SIG_DFL);
            libc::raise(signum);
        }
    }

    /// `SIGTERM`, `SIGINT`.
    pub fn name(signum: libc::c_int) -> &'static str {
        match signum {
            libc::SIGTERM => "SIGTERM",
            libc::SIGINT => "SIGINT",
            _ => "a signal",
        }
    }
}

fn main() -> ExitCode {
    let personality = Personality::from_argv0(std::env::args_os().next().as_deref());
    // Everything `run` holds (the API socket, the terminal mode) is
    // released when it returns, before a stop signal ends the process.
    let code = run(personality);
    if let Some(signum) = stop_signal::received() {
        log::info!("stopped by {}", stop_signal::name(signum));
        log::logger().flush();
        stop_signal::reraise(signum);
    }
    log_exit(personality, code);
    ExitCode::from(code)
}

/// The last log line, with Firecracker's words, which its tools parse for
/// the exit status. An error's goes only to a log file: on stderr, `fail`
/// has already said why in one line.
fn log_exit(personality: Personality, code: u8) {
    let name = personality.name();
    if code == exit_code::OK {
        log::info!("{name} exiting successfully. exit_code=0");
    } else if logger::logs_to_file() {
        log::error!("{name} exiting with error. exit_code={code}");
    }
    log::logger().flush();
}

fn run(personality: Personality) -> u8 {
    let start = Instant::now();
    let start_cpu_us = boot_timer::process_cpu_us();

    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return exit_code::OK;
            }
            let msg = e.to_string();
            let first = msg.lines().next().unwrap_or("invalid arguments");
            return fail(exit_code::ARG_PARSING, first.trim_start_matches("error: "));
        }
    };
    if cli.version {
        print!("{}", personality.version_text());
        return exit_code::OK;
    }
    if let Some(reason) = cli.refusal() {
        return fail(exit_code::ARG_PARSING, reason);
    }
    if let Some(code) = snapshot_flags(&cli) {
        return code;
    }
    if !valid_id(&cli.id) {
        return fail(
            exit_code::ARG_PARSING,
            format!(
                "invalid --id `{}`: use 1 to {MAX_ID_LEN} letters, digits or '-'",
                cli.id
            ),
        );
    }

    // The VMM thread's filter refuses `unlink`: a child forked now, while the
    // process has one thread, removes the sockets at the end. Dropped after
    // the API server (declared before it), so it removes them last.
    let reaper = if cli.no_seccomp {
        None
    } else {
        match SocketReaper::start() {
            Ok(reaper) => Some(reaper),
            Err(e) => {
                return fail(
                    exit_code::GENERIC_ERROR,
                    format!("cannot start the socket-removing process: {e}"),
                )
            }
        }
    };

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
    log::info!("{}", personality.start_line());
    let mmds = match mmds_store(&cli) {
        Ok(store) => store,
        Err(e) => return fail(exit_code::BAD_CONFIGURATION, e),
    };
    // Firecracker ignores them without a word; a typo deserves one.
    for key in config.iter().flat_map(|c| &c.unknown_keys) {
        log::warn!("config file: unknown top-level key `{key}` ignored");
    }

    // A trapped system call is logged, counted and ends the process with 148;
    // installed whatever the filters, as Firecracker does.
    if let Err(e) = ember::seccomp::install_sigsys_handler(Some(flush_metrics_on_fatal_signal)) {
        return fail(exit_code::GENERIC_ERROR, e);
    }
    // SIGBUS, SIGSEGV, SIGXFSZ, SIGXCPU, SIGHUP, SIGILL: logged, metrics
    // written, Firecracker's exit code; SIGPIPE logged and counted.
    if let Err(e) = ember::signals::install(flush_metrics_on_fatal_signal) {
        return fail(
            exit_code::GENERIC_ERROR,
            format!("cannot install the signal handlers: {e}"),
        );
    }

    // Loaded before anything else runs, so a bad filter file stops the VMM
    // before it touches any resource (Firecracker: exit code 1).
    let seccomp_filters = match SeccompConfig::from_args(cli.no_seccomp, cli.seccomp_filter.clone())
        .and_then(|config| Filters::load(&config))
    {
        Ok(filters) => filters,
        Err(e) => return fail(exit_code::GENERIC_ERROR, e),
    };

    // Leaked: the signal handler may write it until the process ends.
    let stop = match EventFd::new(EFD_NONBLOCK) {
        Ok(evt) => &*Box::leak(Box::new(evt)),
        Err(e) => {
            return fail(
                exit_code::GENERIC_ERROR,
                format!("cannot create an eventfd: {e}"),
            )
        }
    };
    if let Err(e) = stop_signal::install(stop.as_raw_fd()) {
        return fail(
            exit_code::GENERIC_ERROR,
            format!("cannot install the SIGTERM/SIGINT handler: {e}"),
        );
    }

    let metrics = Arc::new(Metrics::new());
    metrics.register(
        "seccomp",
        Arc::new(|out: &mut dyn MetricWriter| {
            out.counter("num_faults", ember::seccomp::fault_count())
        }),
    );
    metrics.register("signals", Arc::new(ember::signals::report));
    let _ = METRICS.set(metrics.clone());
    // Firecracker: the command line's --metrics-path, else the file's
    // `metrics` section; the API's PUT /metrics only when neither is given.
    if let Some(path) = &cli.metrics_path {
        let cfg = config::Metrics {
            metrics_path: path.clone(),
            emit_id: false,
            properties: None,
        };
        if let Err(e) = metrics.configure(&cfg, &cli.id) {
            return fail(exit_code::GENERIC_ERROR, e);
        }
    } else if let Some(cfg) = config.as_ref().and_then(|c| c.metrics.as_ref()) {
        if let Err(e) = metrics.configure(cfg, &cli.id) {
            return fail(exit_code::BAD_CONFIGURATION, e);
        }
    }

    // Dropped when main returns, which stops the API thread and removes
    // the socket: nothing below may leave through std::process::exit.
    let api = if cli.no_api {
        None
    } else {
        let options = ServerOptions {
            metrics: metrics.api_requests(),
            thread_hook: seccomp_filters.api().map(ember::api_thread_hook),
            ..ServerOptions::new(cli.http_api_max_payload_size)
        };
        match start_api_server_with(&cli.api_sock, options) {
            Ok(api) => Some(api),
            Err(e) => return fail(exit_code::GENERIC_ERROR, e),
        }
    };
    if let Some(api) = &api {
        record_startup_time(&cli, start, &metrics);
        register_socket(reaper.as_ref(), api.socket_path());
    }

    let run_opts = vm::RunOptions {
        boot_timer: cli.boot_timer,
        start: Some(start),
        start_cpu_us: cli.start_time_cpu_us.unwrap_or(start_cpu_us),
        mmds,
        mmds_metrics: Arc::new(MmdsMetrics::default()),
    };
    metrics.register("mmds", run_opts.mmds_metrics.clone());
    let (vm, start_responder) = match (config, &api) {
        (Some(config), _) => match vm::Vm::build(&config, &run_opts) {
            Ok(vm) => (vm, None),
            Err(e) => return fail(exit_code::BAD_CONFIGURATION, e),
        },
        (None, Some(api)) => match serve_until_start(api, stop, &cli.id, &metrics, &run_opts) {
            PreBoot::Start(vm, responder) => (*vm, Some(responder)),
            PreBoot::Stopped => return exit_code::OK,
            PreBoot::ApiGone => {
                return fail(
                    exit_code::GENERIC_ERROR,
                    "the API server stopped before the microVM was started",
                )
            }
        },
        // Refused above: --no-api needs --config-file.
        (None, None) => return fail(exit_code::ARG_PARSING, "--no-api requires --config-file"),
    };

    if let Some(vsock) = &vm.config().vsock {
        register_socket(reaper.as_ref(), &vsock.uds_path);
    }
    if let Some(Err(e)) = reaper.as_ref().map(SocketReaper::seal) {
        log::warn!("the socket-removing process is gone: {e}");
    }

    // The terminal is the console's only when the console is not a file.
    let raw_terminal = match vm.config().serial_output() {
        Some(_) => None,
        None => terminal::RawTerminal::enable(libc::STDIN_FILENO),
    };
    let result = vm.run_with(vm::RunContext {
        api: api.as_ref(),
        metrics: Some(metrics),
        instance_id: cli.id.clone(),
        start: start_responder,
        seccomp: seccomp_filters,
        stop: Some(stop),
    });
    drop(raw_terminal);
    match result {
        // Stopped by SIGTERM or SIGINT: main ends the process by the signal.
        Ok(_) if stop_signal::received().is_some() => exit_code::OK,
        Ok(reason) if reason.is_success() => {
            log::info!("{reason}");
            log::logger().flush();
            exit_code::OK
        }
        Ok(reason) => fail(exit_code::GENERIC_ERROR, reason),
        Err(e) => fail(exit_code::GENERIC_ERROR, e),
    }
}

/// Has `reaper` remove the socket at `path` when the VMM ends.
fn register_socket(reaper: Option<&SocketReaper>, path: &std::path::Path) {
    if let Some(Err(e)) = reaper.map(|r| r.register(path)) {
        log::warn!("{} will not be removed at exit: {e}", path.display());
    }
}

/// Sets `api_server.process_startup_time_us` and `_cpu_us`: from the
/// jailer's `--start-time-us` / `--start-time-cpu-us` (plus
/// `--parent-cpu-time-us`) when given, as Firecracker does, else from the
/// start of `main` and of the process's CPU clock.
fn record_startup_time(cli: &Cli, start: Instant, metrics: &Metrics) {
    let wall_us = match cli.start_time_us {
        Some(t0) => monotonic_us().saturating_sub(t0),
        None => u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX),
    };
    let cpu_us = boot_timer::process_cpu_us()
        .saturating_sub(cli.start_time_cpu_us.unwrap_or(0))
        .saturating_add(cli.parent_cpu_time_us.unwrap_or(0));
    let m = metrics.api_server();
    m.process_startup_time_us.set(wall_us);
    m.process_startup_time_cpu_us.set(cpu_us);
    log::info!("API server ready after {wall_us} us, {cpu_us} CPU us");
}

/// CLOCK_MONOTONIC in microseconds: the clock the jailer's
/// `--start-time-us` is taken on.
fn monotonic_us() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000)
        .saturating_add(ts.tv_nsec as u64 / 1_000)
}

/// How the pre-boot phase ended.
enum PreBoot {
    /// `InstanceStart` built the VM; answer the request once it runs.
    Start(Box<vm::Vm>, Responder),
    /// A stop signal arrived.
    Stopped,
    /// The API thread ended.
    ApiGone,
}

/// Waits for the next API request, or a stop signal, or the end of the API
/// thread.
fn next_request(api: &ApiServerHandle, stop: &EventFd) -> Result<(VmmAction, Responder), PreBoot> {
    loop {
        if let Some(request) = api.try_recv() {
            return Ok(request);
        }
        if !api.is_running() {
            return Err(PreBoot::ApiGone);
        }
        let mut fds = [
            libc::pollfd {
                fd: api.request_event.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // Wakes up now and then to notice an API thread that died.
        // SAFETY: `fds` is a live array of 2 pollfd structs.
        unsafe { libc::poll(fds.as_mut_ptr(), 2, 1000) };
        if fds[1].revents != 0 {
            return Err(PreBoot::Stopped);
        }
    }
}

/// The pre-boot phase with the API: [`PrebootApiController`] answers every
/// request until `InstanceStart` builds the VM.
fn serve_until_start(
    api: &ApiServerHandle,
    stop: &EventFd,
    id: &str,
    metrics: &Metrics,
    run_opts: &vm::RunOptions,
) -> PreBoot {
    let mut controller = PrebootApiController::new(id, metrics).with_mmds(run_opts.mmds.clone());
    loop {
        let (action, responder) = match next_request(api, stop) {
            Ok(request) => request,
            Err(end) => return end,
        };
        let response = match controller.handle(action) {
            PrebootOutcome::Answer(response) => response,
            PrebootOutcome::Start(config) => match vm::Vm::build(&config, run_opts) {
                Ok(vm) => return PreBoot::Start(Box::new(vm), responder),
                Err(e) => Err(ApiError::bad_request(format!("Start microvm error: {e}"))),
            },
            PrebootOutcome::Load(params) => {
                let start = Instant::now();
                match vm::Vm::restore(&params, run_opts) {
                    Ok(vm) => {
                        let us = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
                        metrics.latencies().vmm_load_snapshot.set(us);
                        log::info!("'load snapshot' VMM action took {us} us.");
                        return PreBoot::Start(Box::new(vm), responder);
                    }
                    Err(e) => Err(ApiError::bad_request(format!(
                        "Load snapshot error: Failed to restore from snapshot: {e}"
                    ))),
                }
            }
        };
        responder.respond(response);
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
        assert!(
            Cli::try_parse_from(["ember", "--snapshot-version"])
                .unwrap()
                .snapshot_version
        );
        let cli = Cli::try_parse_from(["ember", "--describe-snapshot", "/s"]).unwrap();
        assert_eq!(
            cli.describe_snapshot.as_deref(),
            Some(std::path::Path::new("/s"))
        );
        assert!(Cli::try_parse_from(["ember", "--level", "loud"]).is_err());
        assert!(Cli::try_parse_from(["ember", "--bogus"]).is_err());
    }

    #[test]
    fn the_name_picks_the_personality() {
        use std::ffi::OsStr;
        for (argv0, expected) in [
            ("firecracker", Personality::Firecracker),
            ("/usr/bin/firecracker", Personality::Firecracker),
            ("./firecracker-v1.17.0-x86_64", Personality::Firecracker),
            ("ember", Personality::Ember),
            ("/opt/firecracker/bin/ember", Personality::Ember),
        ] {
            assert_eq!(
                Personality::from_argv0(Some(OsStr::new(argv0))),
                expected,
                "{argv0}"
            );
        }
        assert_eq!(Personality::from_argv0(None), Personality::Ember);
        assert_eq!(
            Personality::Firecracker.version_text(),
            "Firecracker v1.17.0\n\n"
        );
        assert_eq!(
            Personality::Firecracker.start_line(),
            "Running Firecracker v1.17.0"
        );
        assert!(Personality::Ember.version_text().starts_with("Ember v"));
        assert!(Personality::Ember
            .start_line()
            .starts_with("Running Ember v"));
    }

    #[test]
    fn firecracker_flags_ember_cannot_honour_are_refused_by_name() {
        let refusal = |args: &[&str]| {
            let mut argv = vec!["ember"];
            argv.extend_from_slice(args);
            Cli::try_parse_from(argv).unwrap().refusal()
        };
        assert_eq!(refusal(&["--metadata", "/m.json"]), None);
        let r = refusal(&["--enable-pci"]).unwrap();
        assert!(
            r.contains("--enable-pci") && r.contains("virtio-mmio"),
            "{r}"
        );
        let r = refusal(&["--no-seccomp", "--seccomp-filter", "/f"]).unwrap();
        assert!(
            r.contains("--no-seccomp") && r.contains("--seccomp-filter"),
            "{r}"
        );
        assert_eq!(
            refusal(&["--mmds-size-limit", "1024", "--no-seccomp"]),
            None
        );
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
