//! Firecracker's metrics: one JSON object per line, written to a file or a
//! named pipe (`--metrics-path`, `PUT /metrics`, the `metrics` section of the
//! configuration file).
//!
//! A line looks like Firecracker's:
//!
//! ```json
//! {"utc_timestamp_ms":1700000000000,"api_server":{"process_startup_time_us":5120},
//!  "put_api_requests":{"actions_count":1,"actions_fails":0},"uart":{"write_count":812}}
//! ```
//!
//! Groups and fields carry Firecracker's names for what Ember has
//! (`api_server`, `get_api_requests`, `put_api_requests`,
//! `patch_api_requests`, `vcpu`, `uart`, `i8042`, `block`, `net`, `vsock`, `entropy`, `balloon`,
//! `latencies_us`, `vmm`, `logger`, and `seccomp` and `mmds`, which `main` registers).
//! Counters report the change since the
//! previous line, as Firecracker's `SharedIncMetric` does; gauges (times,
//! sizes) report their value.
//!
//! Counters are plain cumulative atomics ([`Counter`]); each device crate
//! declares its group once with [`ember_metrics::metric_group!`] and the
//! group reports itself ([`MetricGroup`]). The [`Metrics`] registry
//! remembers what each line reported and writes the difference, so a device
//! crate needs no knowledge of flushing, any number of readers can look at a
//! counter, and one group can be registered under several names.
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//!
//! use ember_config::Metrics as MetricsConfig;
//! use ember_logger::metrics::{Counter, MetricWriter, Metrics};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let path = dir.path().join("metrics.json");
//! let metrics = Metrics::new();
//!
//! // A device crate's counters, registered under their Firecracker group.
//! let reads = Arc::new(Counter::new());
//! let r = reads.clone();
//! metrics.register("block", Arc::new(move |out: &mut dyn MetricWriter| {
//!     out.counter("read_count", r.count());
//! }));
//!
//! metrics.configure(
//!     &MetricsConfig { metrics_path: path.clone(), emit_id: false, properties: None },
//!     "vm-1",
//! )?;
//! reads.add(3);
//! metrics.flush()?;
//! reads.add(2);
//! metrics.flush()?;
//!
//! let text = std::fs::read_to_string(&path)?;
//! let lines: Vec<serde_json::Value> =
//!     text.lines().map(serde_json::from_str).collect::<Result<_, _>>()?;
//! // Each line reports what happened since the previous one.
//! assert_eq!(lines[0]["block"]["read_count"], 3);
//! assert_eq!(lines[1]["block"]["read_count"], 2);
//! assert!(lines[1]["utc_timestamp_ms"].as_u64().is_some());
//! # Ok(())
//! # }
//! ```

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use ember_vcpu::VcpuMetrics;

use ember_config as config;

/// How often the VMM writes a metrics line on its own (Firecracker's period).
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(60);

/// Errors of the metrics system.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// A destination is already set; Firecracker allows one per process.
    #[error("Reinitialization of metrics not allowed.")]
    AlreadyConfigured,
    /// The metrics file or pipe could not be opened.
    #[error("cannot open the metrics file {path}: {source}")]
    Open {
        /// The `metrics_path` given.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

use ember_metrics::metric_group;
/// The shared metric types every crate counts with, and the group contract.
pub use ember_metrics::{Counter, Gauge, MetricGroup, MetricWriter};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
}

/// The fields one group reported: name, kind, value.
type Fields = Vec<(&'static str, Kind, u64)>;

/// Collects the fields of one group while a line is being written.
struct Collect<'a> {
    fields: &'a mut Fields,
}

impl MetricWriter for Collect<'_> {
    fn counter(&mut self, name: &'static str, total: u64) {
        self.fields.push((name, Kind::Counter, total));
    }

    fn gauge(&mut self, name: &'static str, value: u64) {
        self.fields.push((name, Kind::Gauge, value));
    }
}

metric_group! {
    /// `api_server`: process start-up times, set once the API socket listens.
    #[derive(Debug, Default)]
    pub struct ApiServerMetrics {
        /// Wall-clock time from process start (or the jailer's `--start-time-us`)
        /// to the API server being ready, in microseconds.
        pub process_startup_time_us: Gauge,
        /// CPU time over the same span, in microseconds.
        pub process_startup_time_cpu_us: Gauge,
    }
}

metric_group! {
    /// `get_api_requests`: GET requests received, per endpoint.
    #[derive(Debug, Default)]
    pub struct GetApiRequests {
        /// `GET /`.
        pub instance_info_count: Counter,
        /// `GET /machine-config`.
        pub machine_cfg_count: Counter,
        /// `GET /mmds`.
        pub mmds_count: Counter,
        /// `GET /version`.
        pub vmm_version_count: Counter,
    }
}

metric_group! {
    /// `put_api_requests`: PUT requests received and failed, per endpoint.
    #[derive(Debug, Default)]
    pub struct PutApiRequests {
        /// `PUT /actions`.
        pub actions_count: Counter,
        /// `PUT /actions` that failed.
        pub actions_fails: Counter,
        /// `PUT /boot-source`.
        pub boot_source_count: Counter,
        /// `PUT /boot-source` that failed.
        pub boot_source_fails: Counter,
        /// `PUT /drives/{id}`.
        pub drive_count: Counter,
        /// `PUT /drives/{id}` that failed.
        pub drive_fails: Counter,
        /// `PUT /logger`.
        pub logger_count: Counter,
        /// `PUT /logger` that failed.
        pub logger_fails: Counter,
        /// `PUT /machine-config`.
        pub machine_cfg_count: Counter,
        /// `PUT /machine-config` that failed.
        pub machine_cfg_fails: Counter,
        /// `PUT /metrics`.
        pub metrics_count: Counter,
        /// `PUT /metrics` that failed.
        pub metrics_fails: Counter,
        /// `PUT /network-interfaces/{id}`.
        pub network_count: Counter,
        /// `PUT /network-interfaces/{id}` that failed.
        pub network_fails: Counter,
        /// `PUT /mmds` and `PUT /mmds/config`.
        pub mmds_count: Counter,
        /// `PUT /mmds` and `PUT /mmds/config` that failed.
        pub mmds_fails: Counter,
        /// `PUT /vsock`.
        pub vsock_count: Counter,
        /// `PUT /vsock` that failed.
        pub vsock_fails: Counter,
        /// `PUT /serial`.
        pub serial_count: Counter,
        /// `PUT /serial` that failed.
        pub serial_fails: Counter,
        /// `PUT /cpu-config`.
        pub cpu_cfg_count: Counter,
        /// `PUT /cpu-config` that failed.
        pub cpu_cfg_fails: Counter,
    }
}

metric_group! {
    /// `patch_api_requests`: PATCH requests received and failed, per endpoint.
    #[derive(Debug, Default)]
    pub struct PatchApiRequests {
        /// `PATCH /drives/{id}`.
        pub drive_count: Counter,
        /// `PATCH /drives/{id}` that failed.
        pub drive_fails: Counter,
        /// `PATCH /network-interfaces/{id}`.
        pub network_count: Counter,
        /// `PATCH /network-interfaces/{id}` that failed.
        pub network_fails: Counter,
        /// `PATCH /machine-config`.
        pub machine_cfg_count: Counter,
        /// `PATCH /machine-config` that failed.
        pub machine_cfg_fails: Counter,
        /// `PATCH /mmds`.
        pub mmds_count: Counter,
        /// `PATCH /mmds` that failed.
        pub mmds_fails: Counter,
    }
}

metric_group! {
    /// `deprecated_api`: requests that used a deprecated part of the API.
    #[derive(Debug, Default)]
    pub struct DeprecatedApi {
        /// Requests with a deprecated field (`machine-config.cpu_template`).
        pub deprecated_http_api_calls: Counter,
    }
}

/// The API request groups, counted by the API server thread.
#[derive(Debug, Default)]
pub struct ApiRequestMetrics {
    /// `get_api_requests`.
    pub get: GetApiRequests,
    /// `put_api_requests`.
    pub put: PutApiRequests,
    /// `patch_api_requests`.
    pub patch: PatchApiRequests,
    /// `deprecated_api`.
    pub deprecated: DeprecatedApi,
}

metric_group! {
    /// `latencies_us`: how long the last pause, resume, snapshot creation and
    /// snapshot load took.
    #[derive(Debug, Default)]
    pub struct LatenciesUs {
        /// `PATCH /vm` Paused, as seen by the API, in microseconds.
        pub pause_vm: Gauge,
        /// `PATCH /vm` Resumed, as seen by the API, in microseconds.
        pub resume_vm: Gauge,
        /// Pausing the vCPUs, in the VMM, in microseconds.
        pub vmm_pause_vm: Gauge,
        /// Resuming the vCPUs, in the VMM, in microseconds.
        pub vmm_resume_vm: Gauge,
        /// Creating a full snapshot, in the VMM, in microseconds.
        pub vmm_full_create_snapshot: Gauge,
        /// Loading a snapshot, in the VMM, in microseconds.
        pub vmm_load_snapshot: Gauge,
    }
}

metric_group! {
    /// `vmm`: the VMM process as a whole.
    #[derive(Debug, Default)]
    pub struct VmmMetrics {
        /// 1 once the VMM has panicked.
        pub panic_count: Gauge,
    }
}

metric_group! {
    /// `logger`: lines the log and metrics writers could not deliver.
    #[derive(Debug, Default)]
    pub struct LoggerMetrics {
        /// Metrics lines not written because the pipe was full.
        pub missed_metrics_count: Counter,
        /// Metrics lines not written because of an I/O error.
        pub metrics_fails: Counter,
        /// Log lines not written.
        pub missed_log_count: Counter,
    }
}

struct Destination {
    file: File,
    /// `emit_id`: the instance id, written as a top-level `id`.
    id: Option<String>,
    /// `properties`, written as a top-level object.
    properties: Option<serde_json::Map<String, serde_json::Value>>,
    /// The end of a line a full pipe did not take; written before anything
    /// else so the reader never sees two lines interleaved.
    unwritten: Vec<u8>,
}

#[derive(Default)]
struct FlushState {
    dest: Option<Destination>,
    /// What the previous line reported for each counter, by group and field.
    reported: HashMap<(String, &'static str), u64>,
}

/// The registry of metric groups and the metrics writer.
///
/// Shared (`Arc<Metrics>`) between the VMM thread, which flushes it, and
/// whoever registers groups.
pub struct Metrics {
    groups: Mutex<Vec<(String, Arc<dyn MetricGroup>)>>,
    state: Mutex<FlushState>,
    api_server: Arc<ApiServerMetrics>,
    api_requests: Arc<ApiRequestMetrics>,
    vcpu: Arc<VcpuMetrics>,
    latencies: Arc<LatenciesUs>,
    vmm: Arc<VmmMetrics>,
    logger: Arc<LoggerMetrics>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<String> = lock(&self.groups).iter().map(|(n, _)| n.clone()).collect();
        f.debug_struct("Metrics").field("groups", &names).finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere must not silence metrics: the data is plain counters.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Metrics {
    /// A registry holding Ember's own groups (`api_server`,
    /// `get_api_requests`, `put_api_requests`, `patch_api_requests`,
    /// `deprecated_api`, `vcpu`,
    /// `latencies_us`, `vmm`, `logger`), with no destination yet.
    pub fn new() -> Self {
        let m = Metrics {
            groups: Mutex::new(Vec::new()),
            state: Mutex::new(FlushState::default()),
            api_server: Arc::default(),
            api_requests: Arc::default(),
            vcpu: Arc::default(),
            latencies: Arc::default(),
            vmm: Arc::default(),
            logger: Arc::default(),
        };
        m.register("api_server", m.api_server.clone());
        let api = m.api_requests.clone();
        m.register(
            "get_api_requests",
            Arc::new(move |o: &mut dyn MetricWriter| api.get.report(o)),
        );
        let api = m.api_requests.clone();
        m.register(
            "put_api_requests",
            Arc::new(move |o: &mut dyn MetricWriter| api.put.report(o)),
        );
        let api = m.api_requests.clone();
        m.register(
            "patch_api_requests",
            Arc::new(move |o: &mut dyn MetricWriter| api.patch.report(o)),
        );
        let api = m.api_requests.clone();
        m.register(
            "deprecated_api",
            Arc::new(move |o: &mut dyn MetricWriter| api.deprecated.report(o)),
        );
        m.register("vcpu", m.vcpu.clone());
        m.register("latencies_us", m.latencies.clone());
        m.register("vmm", m.vmm.clone());
        m.register("logger", m.logger.clone());
        m
    }

    /// Adds a group. Several groups registered under one name are added up
    /// into one object (counters are summed, gauges report the largest
    /// value): Firecracker's aggregate `block` group is every drive
    /// registered as `block`, and `block_<drive_id>` one drive.
    pub fn register(&self, name: impl Into<String>, group: Arc<dyn MetricGroup>) {
        lock(&self.groups).push((name.into(), group));
    }

    /// `api_server`.
    pub fn api_server(&self) -> Arc<ApiServerMetrics> {
        self.api_server.clone()
    }

    /// The API request groups, to hand to the API server.
    pub fn api_requests(&self) -> Arc<ApiRequestMetrics> {
        self.api_requests.clone()
    }

    /// `vcpu`.
    pub fn vcpu(&self) -> Arc<VcpuMetrics> {
        self.vcpu.clone()
    }

    /// `latencies_us`.
    pub fn latencies(&self) -> Arc<LatenciesUs> {
        self.latencies.clone()
    }

    /// `vmm`.
    pub fn vmm(&self) -> Arc<VmmMetrics> {
        self.vmm.clone()
    }

    /// `logger`.
    pub fn logger(&self) -> Arc<LoggerMetrics> {
        self.logger.clone()
    }

    /// Whether a destination is set.
    pub fn is_configured(&self) -> bool {
        lock(&self.state).dest.is_some()
    }

    /// Sets where lines go, once per process (Firecracker's rule).
    ///
    /// The file is created if needed and appended to. It is opened
    /// non-blocking and read-write, so a named pipe opens even before its
    /// reader does and a full pipe never stalls the VMM (the line is counted
    /// in `logger.missed_metrics_count` instead).
    pub fn configure(&self, cfg: &config::Metrics, instance_id: &str) -> Result<(), MetricsError> {
        let mut state = lock(&self.state);
        if state.dest.is_some() {
            return Err(MetricsError::AlreadyConfigured);
        }
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            // A symbolic link is not followed: it cannot redirect the lines.
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(&cfg.metrics_path)
            .map_err(|source| MetricsError::Open {
                path: cfg.metrics_path.clone(),
                source,
            })?;
        let properties = cfg.properties.as_ref().map(|p| {
            p.iter()
                .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
                .collect()
        });
        state.dest = Some(Destination {
            file,
            id: cfg.emit_id.then(|| instance_id.to_string()),
            properties,
            unwritten: Vec::new(),
        });
        Ok(())
    }

    /// The line that [`flush`](Self::flush) would write, without the
    /// newline, and without marking anything as reported.
    pub fn render(&self) -> String {
        let state = lock(&self.state);
        let (line, _) = self.render_line(&state);
        line
    }

    /// Writes one line with what changed since the previous line.
    ///
    /// Without a destination this does nothing (and resets nothing). When a
    /// pipe is full, nothing is lost: the counters carry over to the next
    /// line and `logger.missed_metrics_count` grows. Errors are real I/O
    /// failures of the destination.
    pub fn flush(&self) -> io::Result<()> {
        let mut state = lock(&self.state);
        let Some(dest) = state.dest.as_mut() else {
            return Ok(());
        };
        if !dest.unwritten.is_empty() {
            match write_some(&mut dest.file, &dest.unwritten) {
                Ok(n) => {
                    dest.unwritten.drain(..n);
                }
                Err(e) => {
                    self.logger.metrics_fails.inc();
                    return Err(e);
                }
            }
            if !dest.unwritten.is_empty() {
                self.logger.missed_metrics_count.inc();
                return Ok(());
            }
        }
        let (mut line, reported) = self.render_line(&state);
        line.push('\n');
        let Some(dest) = state.dest.as_mut() else {
            return Ok(());
        };
        match write_some(&mut dest.file, line.as_bytes()) {
            Ok(0) => {
                // Nothing went out: keep the counters for the next line.
                self.logger.missed_metrics_count.inc();
                Ok(())
            }
            Ok(n) => {
                if let Some(rest) = line.as_bytes().get(n..) {
                    dest.unwritten.extend_from_slice(rest);
                }
                state.reported = reported;
                Ok(())
            }
            Err(e) => {
                self.logger.metrics_fails.inc();
                Err(e)
            }
        }
    }

    /// Builds the line and the counter values it reports.
    fn render_line(&self, state: &FlushState) -> (String, HashMap<(String, &'static str), u64>) {
        // Groups in registration order, same-named ones merged.
        let mut merged: Vec<(String, Fields)> = Vec::new();
        for (name, group) in lock(&self.groups).iter() {
            let mut fields = Vec::new();
            group.report(&mut Collect {
                fields: &mut fields,
            });
            let slot = match merged.iter().position(|(n, _)| n == name) {
                Some(i) => &mut merged[i].1,
                None => {
                    merged.push((name.clone(), Vec::new()));
                    &mut merged.last_mut().expect("just pushed").1
                }
            };
            for (field, kind, value) in fields {
                match slot.iter_mut().find(|(f, _, _)| *f == field) {
                    Some((_, Kind::Counter, v)) => *v = v.saturating_add(value),
                    Some((_, Kind::Gauge, v)) => *v = (*v).max(value),
                    None => slot.push((field, kind, value)),
                }
            }
        }

        let mut reported = state.reported.clone();
        let mut line = String::with_capacity(1024);
        line.push_str("{\"utc_timestamp_ms\":");
        line.push_str(&utc_timestamp_ms().to_string());
        if let Some(dest) = &state.dest {
            if let Some(id) = &dest.id {
                line.push_str(",\"id\":");
                line.push_str(&json_string(id));
            }
            if let Some(p) = &dest.properties {
                line.push_str(",\"properties\":");
                line.push_str(&serde_json::Value::Object(p.clone()).to_string());
            }
        }
        for (group, fields) in merged {
            line.push(',');
            line.push_str(&json_string(&group));
            line.push_str(":{");
            for (i, (field, kind, value)) in fields.into_iter().enumerate() {
                if i > 0 {
                    line.push(',');
                }
                let shown = match kind {
                    Kind::Gauge => value,
                    Kind::Counter => {
                        let key = (group.clone(), field);
                        let before = reported.get(&key).copied().unwrap_or(0);
                        reported.insert(key, value);
                        // A group that went away (an unplugged device) can
                        // make the sum shrink: report no growth then.
                        value.saturating_sub(before)
                    }
                };
                line.push_str(&json_string(field));
                line.push(':');
                line.push_str(&shown.to_string());
            }
            line.push('}');
        }
        line.push('}');
        (line, reported)
    }
}

fn json_string(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

fn utc_timestamp_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// One `write`, retried on EINTR; `Ok(0)` when a non-blocking pipe is full.
fn write_some(file: &mut File, bytes: &[u8]) -> io::Result<usize> {
    loop {
        match file.write(bytes) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(0),
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::io::Read;

    use ember_legacy_devices::i8042::I8042Metrics;
    use ember_legacy_devices::serial::SerialMetrics;
    use ember_virtio_blk::BlockMetrics;
    use ember_virtio_net::NetMetrics;
    use ember_vsock::VsockMetrics;

    use super::*;

    fn config(path: PathBuf) -> config::Metrics {
        config::Metrics {
            metrics_path: path,
            emit_id: false,
            properties: None,
        }
    }

    fn lines(path: &std::path::Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn a_metrics_path_that_is_a_link_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        std::fs::write(&target, "keep").unwrap();
        let link = dir.path().join("m");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = Metrics::new().configure(&config(link), "id").unwrap_err();
        assert!(e.to_string().contains("symbolic links"), "{e}");
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep");
    }

    #[test]
    fn counters_report_the_delta_since_the_last_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m");
        let m = Metrics::new();
        m.configure(&config(path.clone()), "id").unwrap();
        let api = m.api_requests();
        api.put.actions_count.add(2);
        m.api_server().process_startup_time_us.set(1234);
        m.flush().unwrap();
        api.put.actions_count.inc();
        m.flush().unwrap();
        m.flush().unwrap();
        let l = lines(&path);
        assert_eq!(l.len(), 3);
        assert_eq!(l[0]["put_api_requests"]["actions_count"], 2);
        assert_eq!(l[1]["put_api_requests"]["actions_count"], 1);
        assert_eq!(l[2]["put_api_requests"]["actions_count"], 0);
        // Gauges keep their value.
        for line in &l {
            assert_eq!(line["api_server"]["process_startup_time_us"], 1234);
        }
        // The counter itself is cumulative.
        assert_eq!(api.put.actions_count.count(), 3);
    }

    #[test]
    fn a_line_has_firecracker_groups_and_the_timestamp_first() {
        let m = Metrics::new();
        let line = m.render();
        assert!(line.starts_with("{\"utc_timestamp_ms\":"), "{line}");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        for group in [
            "api_server",
            "get_api_requests",
            "put_api_requests",
            "patch_api_requests",
            "vcpu",
            "latencies_us",
            "vmm",
            "logger",
        ] {
            assert!(v[group].is_object(), "{group} missing in {line}");
        }
        for field in [
            "exit_io_in",
            "exit_io_out",
            "exit_mmio_read",
            "exit_mmio_write",
            "failures",
        ] {
            assert_eq!(v["vcpu"][field], 0, "{field}");
        }
        let now = utc_timestamp_ms();
        let ts = v["utc_timestamp_ms"].as_u64().unwrap();
        assert!(ts <= now && now - ts < 60_000);
    }

    #[test]
    fn same_named_groups_are_added_up() {
        let m = Metrics::new();
        let a = Arc::new(Counter::new());
        let b = Arc::new(Counter::new());
        for c in [a.clone(), b.clone()] {
            m.register(
                "block",
                Arc::new(move |o: &mut dyn MetricWriter| {
                    o.counter("read_count", c.count());
                    o.gauge("queue_size", c.count() * 10);
                }),
            );
        }
        a.add(3);
        b.add(4);
        let v: serde_json::Value = serde_json::from_str(&m.render()).unwrap();
        assert_eq!(v["block"]["read_count"], 7);
        assert_eq!(v["block"]["queue_size"], 40);
    }

    #[test]
    fn legacy_device_metrics_use_firecracker_names() {
        let m = Metrics::new();
        m.register("uart", Arc::new(SerialMetrics::default()));
        m.register("i8042", Arc::new(I8042Metrics::default()));
        let v: serde_json::Value = serde_json::from_str(&m.render()).unwrap();
        for f in [
            "error_count",
            "missed_read_count",
            "missed_write_count",
            "read_count",
            "write_count",
        ] {
            assert_eq!(v["uart"][f], 0, "uart.{f}");
        }
        for f in [
            "error_count",
            "missed_read_count",
            "missed_write_count",
            "reset_count",
        ] {
            assert_eq!(v["i8042"][f], 0, "i8042.{f}");
        }
    }

    #[test]
    fn device_groups_use_firecracker_names() {
        let m = Metrics::new();
        let block = Arc::new(BlockMetrics::default());
        block.read_count.add(2);
        block.update_count.inc();
        m.register("block", block.clone());
        m.register("block_rootfs", block);
        let net = Arc::new(NetMetrics::default());
        net.tx_packets_count.add(3);
        m.register("net", net);
        m.register("vsock", Arc::new(VsockMetrics::default()));
        let v: serde_json::Value = serde_json::from_str(&m.render()).unwrap();
        assert_eq!(v["block"]["read_count"], 2);
        assert_eq!(v["block_rootfs"]["update_count"], 1);
        assert_eq!(v["net"]["tx_packets_count"], 3);
        for f in ["conns_added", "rx_packets_count", "tx_flush_fails"] {
            assert_eq!(v["vsock"][f], 0, "vsock.{f}");
        }
    }

    #[test]
    fn id_and_properties_are_emitted_on_request() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m");
        let m = Metrics::new();
        let mut props = BTreeMap::new();
        props.insert("team".to_string(), "vmm".to_string());
        m.configure(
            &config::Metrics {
                metrics_path: path.clone(),
                emit_id: true,
                properties: Some(props),
            },
            "vm-7",
        )
        .unwrap();
        m.flush().unwrap();
        let l = lines(&path);
        assert_eq!(l[0]["id"], "vm-7");
        assert_eq!(l[0]["properties"]["team"], "vmm");
    }

    #[test]
    fn configure_twice_fails_with_firecracker_message() {
        let dir = tempfile::tempdir().unwrap();
        let m = Metrics::new();
        m.configure(&config(dir.path().join("a")), "id").unwrap();
        let e = m
            .configure(&config(dir.path().join("b")), "id")
            .unwrap_err();
        assert_eq!(e.to_string(), "Reinitialization of metrics not allowed.");
        assert!(m.is_configured());
    }

    #[test]
    fn bad_path_is_named() {
        let m = Metrics::new();
        let e = m
            .configure(&config(PathBuf::from("/nonexistent/dir/m")), "id")
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/dir/m"), "{e}");
        assert!(!m.is_configured());
    }

    #[test]
    fn flush_without_destination_keeps_counters() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m");
        let m = Metrics::new();
        m.vcpu().exit_io_out.add(5);
        m.flush().unwrap();
        m.configure(&config(path.clone()), "id").unwrap();
        m.flush().unwrap();
        assert_eq!(lines(&path)[0]["vcpu"]["exit_io_out"], 5);
    }

    #[test]
    fn full_fifo_does_not_block_and_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fifo");
        let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo on a NUL-terminated path we own.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let m = Metrics::new();
        // Opens without a reader (O_RDWR), so configuring never blocks.
        m.configure(&config(path.clone()), "id").unwrap();
        // Make lines big so the 64 KiB pipe fills quickly.
        let big = Arc::new(Counter::new());
        let names: Vec<&'static str> = (0..200)
            .map(|i| &*Box::leak(format!("padding_counter_number_{i}").into_boxed_str()))
            .collect();
        let b = big.clone();
        m.register(
            "padding",
            Arc::new(move |o: &mut dyn MetricWriter| {
                for n in &names {
                    o.counter(n, b.count());
                }
            }),
        );
        let vcpu = m.vcpu();
        let start = std::time::Instant::now();
        for _ in 0..40 {
            vcpu.exit_io_in.inc();
            m.flush().unwrap();
        }
        assert!(start.elapsed() < Duration::from_secs(5));
        assert!(m.logger().missed_metrics_count.count() > 0);

        // Drain the pipe: every complete line parses, and the exits add up
        // to 40 once the carried-over counts are flushed.
        let mut reader = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)
            .unwrap();
        let mut text = Vec::new();
        let mut total = 0u64;
        for _ in 0..100 {
            let mut buf = vec![0u8; 1 << 16];
            match reader.read(&mut buf) {
                Ok(n) => text.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
            m.flush().unwrap();
            if text.ends_with(b"\n") {
                let s = String::from_utf8(text.clone()).unwrap();
                total = s
                    .lines()
                    .map(|l| {
                        let v: serde_json::Value = serde_json::from_str(l).unwrap();
                        v["vcpu"]["exit_io_in"].as_u64().unwrap()
                    })
                    .sum();
                if total == 40 {
                    break;
                }
            }
        }
        assert_eq!(total, 40);
    }
}
