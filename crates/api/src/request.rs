//! Routing and parsing: method, path and body in, [`VmmAction`] or
//! [`ApiError`] out. Pure functions, so they are unit-tested and fuzzed
//! without a socket.

use serde::de::DeserializeOwned;
use serde::Deserialize;

use super::action::{
    ApiError, BalloonStatsUpdate, BalloonUpdate, DriveUpdate, MachineConfigUpdate, MemBackend,
    MemBackendType, NetworkInterfaceUpdate, NetworkOverride, SnapshotCreateParams,
    SnapshotHugePages, SnapshotLoadParams, StartHintingCmd, VmmAction, VsockOverride,
};
use ember_config::{
    Balloon, BootSource, CustomCpuTemplate, Drive, Entropy, Logger, MachineConfig, Metrics,
    MmdsConfig, NetworkInterface, Serial, Vsock,
};
use ember_logger::metrics::{ApiRequestMetrics, Counter};

/// Firecracker's default for `--http-api-max-payload-size`, in bytes.
pub const DEFAULT_MAX_PAYLOAD: usize = 51_200;

/// One endpoint Ember serves: method and path template as in the OpenAPI
/// document.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    /// `GET`, `PUT` or `PATCH`.
    pub method: &'static str,
    /// Path template, e.g. `/drives/{drive_id}`.
    pub path: &'static str,
}

const fn route(method: &'static str, path: &'static str) -> Route {
    Route { method, path }
}

/// Every endpoint Ember serves (checked against `docs/openapi.yaml`).
pub const ROUTES: &[Route] = &[
    route("GET", "/"),
    route("GET", "/version"),
    route("GET", "/machine-config"),
    route("PUT", "/machine-config"),
    route("PATCH", "/machine-config"),
    route("PUT", "/boot-source"),
    route("PUT", "/drives/{drive_id}"),
    route("PATCH", "/drives/{drive_id}"),
    route("PUT", "/network-interfaces/{iface_id}"),
    route("PATCH", "/network-interfaces/{iface_id}"),
    route("PUT", "/vsock"),
    route("PUT", "/entropy"),
    route("PUT", "/cpu-config"),
    route("GET", "/mmds"),
    route("PUT", "/mmds"),
    route("PATCH", "/mmds"),
    route("PUT", "/mmds/config"),
    route("GET", "/balloon"),
    route("PUT", "/balloon"),
    route("PATCH", "/balloon"),
    route("GET", "/balloon/statistics"),
    route("PATCH", "/balloon/statistics"),
    route("PATCH", "/balloon/hinting/start"),
    route("GET", "/balloon/hinting/status"),
    route("PATCH", "/balloon/hinting/stop"),
    route("PUT", "/actions"),
    route("PATCH", "/vm"),
    route("GET", "/vm/config"),
    route("PUT", "/logger"),
    route("PUT", "/metrics"),
    route("PUT", "/serial"),
    route("PUT", "/snapshot/create"),
    route("PUT", "/snapshot/load"),
];

/// Firecracker endpoints Ember does not implement: they answer 400 with a
/// message saying so, not 404, because a Firecracker client may call them.
pub const NOT_IMPLEMENTED: &[&str] = &["/hotplug/memory", "/pmem/{id}"];

/// The resource a path names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Resource<'a> {
    Root,
    Version,
    MachineConfig,
    BootSource,
    /// `/drives` or `/drives/{id}`.
    Drives(Option<&'a str>),
    /// `/network-interfaces` or `/network-interfaces/{id}`.
    NetworkInterfaces(Option<&'a str>),
    Vsock,
    Entropy,
    CpuConfig,
    Mmds,
    MmdsConfig,
    Balloon,
    BalloonStatistics,
    BalloonHintingStart,
    BalloonHintingStatus,
    BalloonHintingStop,
    Actions,
    Vm,
    VmConfig,
    Logger,
    Metrics,
    Serial,
    SnapshotCreate,
    SnapshotLoad,
    /// A Firecracker endpoint Ember does not implement.
    NotImplemented,
}

impl Resource<'_> {
    fn methods(self) -> &'static [&'static str] {
        match self {
            Resource::Root | Resource::Version | Resource::VmConfig => &["GET"],
            Resource::MachineConfig | Resource::Mmds => &["GET", "PUT", "PATCH"],
            Resource::MmdsConfig => &["PUT"],
            Resource::Drives(_) | Resource::NetworkInterfaces(_) => &["PUT", "PATCH"],
            Resource::BootSource
            | Resource::Vsock
            | Resource::Entropy
            | Resource::CpuConfig
            | Resource::Actions
            | Resource::Logger
            | Resource::Metrics
            | Resource::Serial
            | Resource::SnapshotCreate
            | Resource::SnapshotLoad => &["PUT"],
            Resource::Vm | Resource::BalloonHintingStart | Resource::BalloonHintingStop => {
                &["PATCH"]
            }
            Resource::Balloon => &["GET", "PUT", "PATCH"],
            Resource::BalloonStatistics => &["GET", "PATCH"],
            Resource::BalloonHintingStatus => &["GET"],
            Resource::NotImplemented => &[],
        }
    }

    /// Methods Firecracker serves on this path and Ember does not.
    fn unimplemented_methods(self) -> &'static [&'static str] {
        &[]
    }
}

/// The path part of a request target: no query or fragment, no
/// `http://host` of the absolute form, no trailing slash.
fn clean_path(target: &str) -> &str {
    let mut path = target;
    if let Some(rest) = path
        .strip_prefix("http://")
        .or_else(|| path.strip_prefix("https://"))
    {
        path = rest.find('/').map_or("/", |i| &rest[i..]);
    }
    if let Some(i) = path.find(['?', '#']) {
        path = &path[..i];
    }
    if path.len() > 1 {
        path = path.strip_suffix('/').unwrap_or(path);
    }
    path
}

fn resolve(path: &str) -> Option<Resource<'_>> {
    let rest = path.strip_prefix('/')?;
    let mut segments = rest.split('/');
    let first = segments.next().unwrap_or("");
    let second = segments.next();
    let third = segments.next();
    let resource = match (first, second, third) {
        ("", None, None) => Resource::Root,
        ("version", None, None) => Resource::Version,
        ("machine-config", None, None) => Resource::MachineConfig,
        ("boot-source", None, None) => Resource::BootSource,
        ("drives", id, None) => Resource::Drives(id),
        ("network-interfaces", id, None) => Resource::NetworkInterfaces(id),
        ("vsock", None, None) => Resource::Vsock,
        ("entropy", None, None) => Resource::Entropy,
        ("cpu-config", None, None) => Resource::CpuConfig,
        ("actions", None, None) => Resource::Actions,
        ("vm", None, None) => Resource::Vm,
        ("vm", Some("config"), None) => Resource::VmConfig,
        ("logger", None, None) => Resource::Logger,
        ("metrics", None, None) => Resource::Metrics,
        ("serial", None, None) => Resource::Serial,
        ("mmds", None, None) => Resource::Mmds,
        ("mmds", Some("config"), None) => Resource::MmdsConfig,
        ("balloon", None, None) => Resource::Balloon,
        ("balloon", Some("statistics"), None) => Resource::BalloonStatistics,
        ("balloon", Some("hinting"), Some("start")) => Resource::BalloonHintingStart,
        ("balloon", Some("hinting"), Some("status")) => Resource::BalloonHintingStatus,
        ("balloon", Some("hinting"), Some("stop")) => Resource::BalloonHintingStop,
        ("hotplug", Some("memory"), None) | ("pmem", Some(_), None) => Resource::NotImplemented,
        ("snapshot", Some("create"), None) => Resource::SnapshotCreate,
        ("snapshot", Some("load"), None) => Resource::SnapshotLoad,
        _ => return None,
    };
    Some(resource)
}

/// The methods `path` accepts, for the `Allow` header of a 405 answer.
pub fn allowed_methods(path: &str) -> Option<&'static [&'static str]> {
    resolve(clean_path(path)).map(Resource::methods)
}

fn invalid_path(method: &str, path: &str) -> String {
    // Firecracker's words; its status is 400 where Ember's is 404 or 405.
    format!("Invalid request method and/or path: {method} {path}.")
}

/// Firecracker's resource id rule: not empty, letters, digits and `_`.
fn checked_id(id: Option<&str>) -> Result<&str, ApiError> {
    match id {
        None | Some("") => Err(ApiError::bad_request("The ID cannot be empty.")),
        Some(id) if id.chars().all(|c| c == '_' || c.is_alphanumeric()) => Ok(id),
        Some(_) => Err(ApiError::bad_request(
            "API Resource IDs can only contain alphanumeric characters and underscores.",
        )),
    }
}

fn from_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let fail = |why: String| {
        ApiError::bad_request(format!(
            "An error occurred when deserializing the json body of a request: {why}."
        ))
    };
    // serde would also read a struct from a JSON array of its fields.
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first.is_some_and(|b| *b != b'{') {
        return Err(fail("expected a JSON object".to_string()));
    }
    serde_json::from_slice(body).map_err(|e| fail(e.to_string()))
}

/// Any JSON value (the MMDS store need not be an object).
fn json_body(body: &[u8]) -> Result<serde_json::Value, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!(
            "An error occurred when deserializing the json body of a request: {e}."
        ))
    })
}

fn id_mismatch() -> ApiError {
    ApiError::bad_request("The id from the path does not match the id from the body!")
}

/// `action_type` of `PUT /actions`.
#[derive(Deserialize)]
enum ActionType {
    FlushMetrics,
    InstanceStart,
    SendCtrlAltDel,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ActionBody {
    action_type: ActionType,
}

/// `state` of `PATCH /vm`.
#[derive(Deserialize)]
enum VmStateName {
    Paused,
    Resumed,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VmStateBody {
    state: VmStateName,
}

/// The body of `PUT /snapshot/load` as sent: Firecracker's
/// `LoadSnapshotConfig`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotLoadBody {
    snapshot_path: std::path::PathBuf,
    #[serde(default)]
    mem_file_path: Option<std::path::PathBuf>,
    #[serde(default)]
    mem_backend: Option<MemBackend>,
    #[serde(default)]
    enable_diff_snapshots: bool,
    #[serde(default)]
    track_dirty_pages: bool,
    #[serde(default)]
    resume_vm: bool,
    #[serde(default)]
    network_overrides: Vec<NetworkOverride>,
    #[serde(default)]
    vsock_override: Option<VsockOverride>,
    #[serde(default)]
    clock_realtime: bool,
    #[serde(default)]
    huge_pages: SnapshotHugePages,
}

/// `PUT /snapshot/load`: exactly one of `mem_backend` and the deprecated
/// `mem_file_path`, with Firecracker's messages.
fn parse_snapshot_load(body: &[u8]) -> Result<SnapshotLoadParams, ApiError> {
    let fail = |why: &str| {
        ApiError::bad_request(format!(
            "An error occurred when deserializing the json body of a request: {why}."
        ))
    };
    let b = from_body::<SnapshotLoadBody>(body)?;
    let mem_backend =
        match (b.mem_backend, b.mem_file_path) {
            (Some(_), Some(_)) => return Err(fail(
                "too many fields: either `mem_backend` or `mem_file_path` exclusively is required",
            )),
            (None, None) => {
                return Err(fail(
                    "missing field: either `mem_backend` or `mem_file_path` is required",
                ))
            }
            (Some(backend), None) => backend,
            (None, Some(path)) => {
                log::warn!(
                "PUT /snapshot/load: mem_file_path and enable_diff_snapshots fields are deprecated."
            );
                MemBackend {
                    backend_type: MemBackendType::File,
                    backend_path: path,
                }
            }
        };
    Ok(SnapshotLoadParams {
        snapshot_path: b.snapshot_path,
        mem_backend,
        track_dirty_pages: b.track_dirty_pages || b.enable_diff_snapshots,
        resume_vm: b.resume_vm,
        network_overrides: b.network_overrides,
        vsock_override: b.vsock_override,
        clock_realtime: b.clock_realtime,
        huge_pages: b.huge_pages,
    })
}

/// `PUT /cpu-config`: a custom template in Firecracker's format. A malformed
/// one is refused with Firecracker's prefix and a reason that names the
/// CPUID leaf or MSR.
fn parse_cpu_config(body: &[u8]) -> Result<CustomCpuTemplate, ApiError> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    let why = if first.is_some_and(|b| *b != b'{') {
        "expected a JSON object".to_string()
    } else {
        match CustomCpuTemplate::from_json(body) {
            Ok(t) => return Ok(t),
            Err(e) => e.to_string(),
        }
    };
    Err(ApiError::bad_request(format!(
        "An error occurred when deserializing the json body of a request: {why}."
    )))
}

/// The deprecation notice of a request, as Firecracker gives it: logged as
/// a warning, and a `Deprecation: true` header on the answer.
pub fn deprecation(action: &VmmAction) -> Option<&'static str> {
    match action {
        VmmAction::PutMachineConfig(m) if m.cpu_template.is_some() => {
            Some("PUT /machine-config: cpu_template field is deprecated.")
        }
        VmmAction::PatchMachineConfig(u) if u.cpu_template.is_some() => {
            Some("PATCH /machine-config: cpu_template field is deprecated.")
        }
        _ => None,
    }
}

/// Parses one request into the action the VMM thread performs.
///
/// `path` is the request target as sent (a query string is ignored).
/// Errors carry Firecracker's status and `fault_message` (400), except an
/// unknown path (404) and a method the path does not accept (405); both use
/// Firecracker's message `Invalid request method and/or path: ...`.
pub fn parse_request(
    method: &str,
    path: &str,
    body: &[u8],
    max_payload: usize,
) -> Result<VmmAction, ApiError> {
    if body.len() > max_payload {
        return Err(payload_too_large(body.len(), max_payload));
    }
    let path = clean_path(path);
    let resource = resolve(path).ok_or_else(|| ApiError::new(404, invalid_path(method, path)))?;
    if resource == Resource::NotImplemented || resource.unimplemented_methods().contains(&method) {
        return Err(ApiError::bad_request(format!(
            "The requested operation is not supported: {method} {path} is not implemented by Ember."
        )));
    }
    if !resource.methods().contains(&method) {
        return Err(ApiError::new(405, invalid_path(method, path)));
    }
    match method {
        "GET" if !body.is_empty() => {
            return Err(ApiError::bad_request("GET request cannot have a body."))
        }
        "PUT" if body.is_empty() => return Err(ApiError::bad_request("Empty PUT request.")),
        // A hinting run starts with the defaults and stops without a body.
        "PATCH"
            if body.is_empty()
                && !matches!(
                    resource,
                    Resource::BalloonHintingStart | Resource::BalloonHintingStop
                ) =>
        {
            return Err(ApiError::bad_request("Empty PATCH request."))
        }
        _ => {}
    }

    let action = match (method, resource) {
        ("GET", Resource::Root) => VmmAction::GetInstanceInfo,
        ("GET", Resource::Version) => VmmAction::GetVersion,
        ("GET", Resource::VmConfig) => VmmAction::GetVmConfig,
        ("GET", Resource::MachineConfig) => VmmAction::GetMachineConfig,
        ("PUT", Resource::MachineConfig) => {
            VmmAction::PutMachineConfig(from_body::<MachineConfig>(body)?)
        }
        ("PATCH", Resource::MachineConfig) => {
            let update = from_body::<MachineConfigUpdate>(body)?;
            if update.is_empty() {
                return Err(ApiError::bad_request("Empty PATCH request."));
            }
            VmmAction::PatchMachineConfig(update)
        }
        ("PUT", Resource::BootSource) => VmmAction::PutBootSource(from_body::<BootSource>(body)?),
        ("PUT", Resource::Drives(id)) => {
            let id = checked_id(id)?;
            let drive = from_body::<Drive>(body)?;
            if drive.drive_id != id {
                return Err(id_mismatch());
            }
            VmmAction::PutDrive(drive)
        }
        ("PATCH", Resource::Drives(id)) => {
            let id = checked_id(id)?;
            let update = from_body::<DriveUpdate>(body)?;
            if update.drive_id != id {
                return Err(id_mismatch());
            }
            VmmAction::PatchDrive(update)
        }
        ("PUT", Resource::NetworkInterfaces(id)) => {
            let id = checked_id(id)?;
            let iface = from_body::<NetworkInterface>(body)?;
            if iface.iface_id != id {
                return Err(id_mismatch());
            }
            VmmAction::PutNetworkInterface(iface)
        }
        ("PATCH", Resource::NetworkInterfaces(id)) => {
            let id = checked_id(id)?;
            let update = from_body::<NetworkInterfaceUpdate>(body)?;
            if update.iface_id != id {
                return Err(id_mismatch());
            }
            VmmAction::PatchNetworkInterface(update)
        }
        ("PUT", Resource::Vsock) => VmmAction::PutVsock(from_body::<Vsock>(body)?),
        ("PUT", Resource::Entropy) => VmmAction::PutEntropy(from_body::<Entropy>(body)?),
        ("PUT", Resource::CpuConfig) => VmmAction::PutCpuConfig(parse_cpu_config(body)?),
        ("GET", Resource::Mmds) => VmmAction::GetMmds,
        ("PUT", Resource::Mmds) => VmmAction::PutMmds(json_body(body)?),
        ("PATCH", Resource::Mmds) => VmmAction::PatchMmds(json_body(body)?),
        ("PUT", Resource::MmdsConfig) => VmmAction::PutMmdsConfig(from_body::<MmdsConfig>(body)?),
        ("GET", Resource::Balloon) => VmmAction::GetBalloon,
        ("PUT", Resource::Balloon) => VmmAction::PutBalloon(from_body::<Balloon>(body)?),
        ("PATCH", Resource::Balloon) => VmmAction::PatchBalloon(from_body::<BalloonUpdate>(body)?),
        ("GET", Resource::BalloonStatistics) => VmmAction::GetBalloonStats,
        ("PATCH", Resource::BalloonStatistics) => {
            VmmAction::PatchBalloonStats(from_body::<BalloonStatsUpdate>(body)?)
        }
        ("PATCH", Resource::BalloonHintingStart) => {
            VmmAction::StartBalloonHinting(if body.is_empty() {
                StartHintingCmd::default()
            } else {
                from_body::<StartHintingCmd>(body)?
            })
        }
        ("GET", Resource::BalloonHintingStatus) => VmmAction::GetBalloonHintingStatus,
        ("PATCH", Resource::BalloonHintingStop) => VmmAction::StopBalloonHinting,
        ("PUT", Resource::Actions) => match from_body::<ActionBody>(body)?.action_type {
            ActionType::InstanceStart => VmmAction::InstanceStart,
            ActionType::SendCtrlAltDel => VmmAction::SendCtrlAltDel,
            ActionType::FlushMetrics => VmmAction::FlushMetrics,
        },
        ("PATCH", Resource::Vm) => match from_body::<VmStateBody>(body)?.state {
            VmStateName::Paused => VmmAction::Pause,
            VmStateName::Resumed => VmmAction::Resume,
        },
        ("PUT", Resource::Logger) => VmmAction::PutLogger(from_body::<Logger>(body)?),
        ("PUT", Resource::Metrics) => VmmAction::PutMetrics(from_body::<Metrics>(body)?),
        ("PUT", Resource::Serial) => VmmAction::PutSerial(from_body::<Serial>(body)?),
        ("PUT", Resource::SnapshotCreate) => {
            VmmAction::CreateSnapshot(from_body::<SnapshotCreateParams>(body)?)
        }
        ("PUT", Resource::SnapshotLoad) => VmmAction::LoadSnapshot(parse_snapshot_load(body)?),
        // `methods()` and this match list the same pairs.
        _ => return Err(ApiError::new(405, invalid_path(method, path))),
    };
    Ok(action)
}

/// The error for a body over `--http-api-max-payload-size`, with the words
/// of Firecracker's HTTP server.
pub fn payload_too_large(size: usize, max_payload: usize) -> ApiError {
    ApiError::bad_request(format!(
        "Request payload with size {size} is larger than the limit of {max_payload} allowed by server."
    ))
}

/// The request counter (and failure counter) of Firecracker's
/// `*_api_requests` groups that a request falls under, if any.
pub(crate) fn request_counters<'m>(
    metrics: &'m ApiRequestMetrics,
    method: &str,
    path: &str,
) -> Option<(&'m Counter, Option<&'m Counter>)> {
    let (g, p, pa) = (&metrics.get, &metrics.put, &metrics.patch);
    let counters = match (method, resolve(clean_path(path))?) {
        ("GET", Resource::Root) => (&g.instance_info_count, None),
        ("GET", Resource::Version) => (&g.vmm_version_count, None),
        ("GET", Resource::MachineConfig) => (&g.machine_cfg_count, None),
        ("GET", Resource::Mmds) => (&g.mmds_count, None),
        ("PUT", Resource::Mmds | Resource::MmdsConfig) => (&p.mmds_count, Some(&p.mmds_fails)),
        ("PATCH", Resource::Mmds) => (&pa.mmds_count, Some(&pa.mmds_fails)),
        ("PUT", Resource::Actions) => (&p.actions_count, Some(&p.actions_fails)),
        ("PUT", Resource::BootSource) => (&p.boot_source_count, Some(&p.boot_source_fails)),
        ("PUT", Resource::Drives(_)) => (&p.drive_count, Some(&p.drive_fails)),
        ("PUT", Resource::Logger) => (&p.logger_count, Some(&p.logger_fails)),
        ("PUT", Resource::MachineConfig) => (&p.machine_cfg_count, Some(&p.machine_cfg_fails)),
        ("PUT", Resource::Metrics) => (&p.metrics_count, Some(&p.metrics_fails)),
        ("PUT", Resource::NetworkInterfaces(_)) => (&p.network_count, Some(&p.network_fails)),
        ("PUT", Resource::Vsock) => (&p.vsock_count, Some(&p.vsock_fails)),
        ("PUT", Resource::Serial) => (&p.serial_count, Some(&p.serial_fails)),
        ("PUT", Resource::CpuConfig) => (&p.cpu_cfg_count, Some(&p.cpu_cfg_fails)),
        ("PATCH", Resource::Drives(_)) => (&pa.drive_count, Some(&pa.drive_fails)),
        ("PATCH", Resource::NetworkInterfaces(_)) => (&pa.network_count, Some(&pa.network_fails)),
        ("PATCH", Resource::MachineConfig) => (&pa.machine_cfg_count, Some(&pa.machine_cfg_fails)),
        _ => return None,
    };
    Some(counters)
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::*;
    use ember_config::{CacheType, HugePages, IoEngine, LogLevel};

    const MAX: usize = DEFAULT_MAX_PAYLOAD;

    fn ok(method: &str, path: &str, body: &str) -> VmmAction {
        parse_request(method, path, body.as_bytes(), MAX)
            .unwrap_or_else(|e| panic!("{method} {path} {body}: {e:?}"))
    }

    fn err(method: &str, path: &str, body: &str) -> ApiError {
        parse_request(method, path, body.as_bytes(), MAX).expect_err(body)
    }

    #[test]
    fn put_serial() {
        assert_eq!(
            ok("PUT", "/serial", r#"{"serial_out_path": "/tmp/console"}"#),
            VmmAction::PutSerial(ember_config::Serial {
                serial_out_path: Some(PathBuf::from("/tmp/console")),
                rate_limiter: None,
            })
        );
        assert_eq!(
            ok("PUT", "/serial", "{}"),
            VmmAction::PutSerial(ember_config::Serial::default())
        );
        let e = err("PUT", "/serial", r#"{"serial_out": "/tmp/console"}"#);
        assert!(e.message.contains("unknown field `serial_out`"), "{e:?}");
        assert_eq!(err("GET", "/serial", "").status, 405);
    }

    #[test]
    fn gets() {
        assert_eq!(ok("GET", "/", ""), VmmAction::GetInstanceInfo);
        assert_eq!(ok("GET", "/version", ""), VmmAction::GetVersion);
        assert_eq!(ok("GET", "/vm/config", ""), VmmAction::GetVmConfig);
        assert_eq!(
            ok("GET", "/machine-config", ""),
            VmmAction::GetMachineConfig
        );
        // Query strings, a trailing slash and the absolute form are accepted.
        assert_eq!(ok("GET", "/version?x=1", ""), VmmAction::GetVersion);
        assert_eq!(
            ok("GET", "/machine-config/", ""),
            VmmAction::GetMachineConfig
        );
        assert_eq!(
            ok("GET", "http://localhost/vm/config", ""),
            VmmAction::GetVmConfig
        );
        assert_eq!(
            ok("GET", "http://localhost", ""),
            VmmAction::GetInstanceInfo
        );
    }

    #[test]
    fn get_with_body_is_rejected() {
        let e = err("GET", "/", "{}");
        assert_eq!(
            (e.status, e.message.as_str()),
            (400, "GET request cannot have a body.")
        );
    }

    #[test]
    fn boot_source() {
        assert_eq!(
            ok(
                "PUT",
                "/boot-source",
                r#"{"kernel_image_path": "/k", "boot_args": "console=ttyS0", "initrd_path": "/i"}"#
            ),
            VmmAction::PutBootSource(BootSource {
                kernel_image_path: PathBuf::from("/k"),
                initrd_path: Some(PathBuf::from("/i")),
                boot_args: Some("console=ttyS0".into()),
            })
        );
        let e = err("PUT", "/boot-source", r#"{"boot_args": "x"}"#);
        assert_eq!(e.status, 400);
        assert!(
            e.message.starts_with(
                "An error occurred when deserializing the json body of a request: missing field `kernel_image_path`"
            ),
            "{}",
            e.message
        );
    }

    #[test]
    fn machine_config_put_and_patch() {
        let a = ok(
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 2, "mem_size_mib": 256, "huge_pages": "2M"}"#,
        );
        let VmmAction::PutMachineConfig(m) = a else {
            panic!("{a:?}")
        };
        assert_eq!((m.vcpu_count, m.mem_size_mib, m.smt), (2, 256, false));
        assert_eq!(m.huge_pages, HugePages::Hugetlbfs2M);
        // PUT needs both required fields.
        let e = err("PUT", "/machine-config", r#"{"vcpu_count": 2}"#);
        assert!(
            e.message.contains("missing field `mem_size_mib`"),
            "{}",
            e.message
        );

        assert_eq!(
            ok("PATCH", "/machine-config", r#"{"mem_size_mib": 512}"#),
            VmmAction::PatchMachineConfig(MachineConfigUpdate {
                mem_size_mib: Some(512),
                ..Default::default()
            })
        );
        let e = err("PATCH", "/machine-config", "{}");
        assert_eq!(
            (e.status, e.message.as_str()),
            (400, "Empty PATCH request.")
        );
    }

    #[test]
    fn drives() {
        let body = r#"{"drive_id": "rootfs", "path_on_host": "/r.ext4", "is_root_device": true,
                       "is_read_only": false, "cache_type": "Writeback", "io_engine": "Async"}"#;
        let a = ok("PUT", "/drives/rootfs", body);
        let VmmAction::PutDrive(d) = a else {
            panic!("{a:?}")
        };
        assert_eq!(d.drive_id, "rootfs");
        assert!(d.is_root_device);
        assert_eq!(d.cache_type, CacheType::Writeback);
        assert_eq!(d.io_engine, IoEngine::Async);

        let e = err("PUT", "/drives/other", body);
        assert_eq!(
            (e.status, e.message.as_str()),
            (
                400,
                "The id from the path does not match the id from the body!"
            )
        );
        let e = err("PUT", "/drives", body);
        assert_eq!(
            (e.status, e.message.as_str()),
            (400, "The ID cannot be empty.")
        );
        let e = err("PUT", "/drives/a-b", body);
        assert_eq!(
            e.message,
            "API Resource IDs can only contain alphanumeric characters and underscores."
        );

        assert_eq!(
            ok(
                "PATCH",
                "/drives/rootfs",
                r#"{"drive_id": "rootfs", "path_on_host": "/new"}"#
            ),
            VmmAction::PatchDrive(DriveUpdate {
                drive_id: "rootfs".into(),
                path_on_host: Some(PathBuf::from("/new")),
                rate_limiter: None,
            })
        );
        // PATCH accepts only PartialDrive's fields.
        let e = err(
            "PATCH",
            "/drives/rootfs",
            r#"{"drive_id": "rootfs", "is_read_only": true}"#,
        );
        assert!(
            e.message.contains("unknown field `is_read_only`"),
            "{}",
            e.message
        );
        let e = err("PATCH", "/drives/x", r#"{"drive_id": "rootfs"}"#);
        assert_eq!(
            e.message,
            "The id from the path does not match the id from the body!"
        );
    }

    #[test]
    fn network_interface() {
        let a = ok(
            "PUT",
            "/network-interfaces/eth0",
            r#"{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:ac:10:00:02", "mtu": 1500}"#,
        );
        let VmmAction::PutNetworkInterface(n) = a else {
            panic!("{a:?}")
        };
        assert_eq!(
            (n.iface_id.as_str(), n.host_dev_name.as_str()),
            ("eth0", "tap0")
        );
        assert_eq!(n.mtu, Some(1500));
        let e = err(
            "PUT",
            "/network-interfaces/eth1",
            r#"{"iface_id": "eth0", "host_dev_name": "tap0"}"#,
        );
        assert_eq!(
            e.message,
            "The id from the path does not match the id from the body!"
        );
    }

    #[test]
    fn patch_network_interface() {
        let a = ok(
            "PATCH",
            "/network-interfaces/eth0",
            r#"{"iface_id": "eth0", "rx_rate_limiter": {"bandwidth": {"size": 1000, "refill_time": 100}}}"#,
        );
        let VmmAction::PatchNetworkInterface(u) = a else {
            panic!("{a:?}")
        };
        assert_eq!(u.iface_id, "eth0");
        assert_eq!(u.rx_rate_limiter.unwrap().bandwidth.unwrap().size, 1000);
        assert!(u.tx_rate_limiter.is_none());
        let e = err(
            "PATCH",
            "/network-interfaces/eth1",
            r#"{"iface_id": "eth0"}"#,
        );
        assert_eq!(
            e.message,
            "The id from the path does not match the id from the body!"
        );
        // Only the rate limiters can change.
        let e = err(
            "PATCH",
            "/network-interfaces/eth0",
            r#"{"iface_id": "eth0", "host_dev_name": "tap9"}"#,
        );
        assert_eq!(e.status, 400);
    }

    #[test]
    fn vsock_logger_metrics() {
        assert_eq!(
            ok(
                "PUT",
                "/vsock",
                r#"{"guest_cid": 3, "uds_path": "/v.sock"}"#
            ),
            VmmAction::PutVsock(Vsock {
                guest_cid: 3,
                uds_path: PathBuf::from("/v.sock"),
                vsock_id: None,
            })
        );
        let a = ok("PUT", "/logger", r#"{"log_path": "/l", "level": "debug"}"#);
        let VmmAction::PutLogger(l) = a else {
            panic!("{a:?}")
        };
        assert_eq!(l.level, Some(LogLevel::Debug));
        let a = ok("PUT", "/metrics", r#"{"metrics_path": "/m"}"#);
        assert!(matches!(a, VmmAction::PutMetrics(m) if m.metrics_path == Path::new("/m")));
    }

    #[test]
    fn put_cpu_config() {
        let a = ok(
            "PUT",
            "/cpu-config",
            r#"{"cpuid_modifiers": [{"leaf": "0x1", "subleaf": "0x0", "flags": 0,
                "modifiers": [{"register": "ecx", "bitmap": "0bx0xxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}]}]}"#,
        );
        let VmmAction::PutCpuConfig(t) = a else {
            panic!("{a:?}")
        };
        assert_eq!(t.cpuid_modifiers[0].modifiers[0].bitmap.filter, 1 << 30);
        for (body, says) in [
            (
                r#"{"cpuid_modifiers": [{"leaf": "0x7", "subleaf": "0x0", "flags": 1,
                    "modifiers": [{"register": "exx", "bitmap": "0b1"}]}]}"#,
                "CPUID leaf 0x7 subleaf 0x0: invalid CPUID register \"exx\"",
            ),
            (
                r#"{"msr_modifiers": [{"addr": "0x10a", "bitmap": "0b1y"}]}"#,
                "MSR 0x10a: bitmap \"0b1y\" has the character 'y'",
            ),
            (r#"{"reg_modifiers": []}"#, "unknown field `reg_modifiers`"),
            ("[]", "expected a JSON object"),
        ] {
            let e = parse_request("PUT", "/cpu-config", body.as_bytes(), MAX).unwrap_err();
            assert_eq!(e.status, 400);
            assert!(
                e.message.starts_with(
                    "An error occurred when deserializing the json body of a request: "
                ),
                "{}",
                e.message
            );
            assert!(e.message.contains(says), "{}", e.message);
        }
        let e = parse_request("GET", "/cpu-config", b"", MAX).unwrap_err();
        assert_eq!(e.status, 405);
    }

    #[test]
    fn cpu_template_is_deprecated_as_in_firecracker() {
        let put = |body: &str| deprecation(&ok("PUT", "/machine-config", body));
        assert_eq!(put(r#"{"vcpu_count": 1, "mem_size_mib": 128}"#), None);
        // Even "None" is the deprecated field.
        for t in ["None", "T2A"] {
            assert_eq!(
                put(&format!(
                    r#"{{"vcpu_count": 1, "mem_size_mib": 128, "cpu_template": "{t}"}}"#
                )),
                Some("PUT /machine-config: cpu_template field is deprecated.")
            );
        }
        let patch = deprecation(&ok("PATCH", "/machine-config", r#"{"cpu_template": "T2"}"#));
        assert_eq!(
            patch,
            Some("PATCH /machine-config: cpu_template field is deprecated.")
        );
        assert_eq!(
            deprecation(&ok("PATCH", "/machine-config", r#"{"vcpu_count": 2}"#)),
            None
        );
    }

    #[test]
    fn put_entropy() {
        assert_eq!(
            ok("PUT", "/entropy", "{}"),
            VmmAction::PutEntropy(Entropy::default())
        );
        let a = ok(
            "PUT",
            "/entropy",
            r#"{"rate_limiter": {"bandwidth": {"size": 4096, "refill_time": 100}}}"#,
        );
        let VmmAction::PutEntropy(e) = a else {
            panic!("{a:?}")
        };
        let rl = e.rate_limiter.unwrap();
        assert_eq!(rl.bandwidth.unwrap().size, 4096);
        assert!(rl.ops.is_none());
        let e = err("PUT", "/entropy", r#"{"rate_limiter": {"bytes": 1}}"#);
        assert!(e.message.contains("unknown field `bytes`"), "{}", e.message);
        let e = err("PUT", "/entropy", r#"{"rate": 1}"#);
        assert!(e.message.contains("unknown field `rate`"), "{}", e.message);
        assert_eq!(err("PUT", "/entropy", "").message, "Empty PUT request.");
        assert_eq!(err("GET", "/entropy", "").status, 405);
        assert_eq!(allowed_methods("/entropy"), Some(&["PUT"][..]));
    }

    #[test]
    fn actions_and_vm_state() {
        for (t, a) in [
            ("InstanceStart", VmmAction::InstanceStart),
            ("SendCtrlAltDel", VmmAction::SendCtrlAltDel),
            ("FlushMetrics", VmmAction::FlushMetrics),
        ] {
            assert_eq!(
                ok("PUT", "/actions", &format!(r#"{{"action_type": "{t}"}}"#)),
                a
            );
        }
        let e = err("PUT", "/actions", r#"{"action_type": "Reboot"}"#);
        assert!(
            e.message.contains("unknown variant `Reboot`"),
            "{}",
            e.message
        );
        assert_eq!(
            ok("PATCH", "/vm", r#"{"state": "Paused"}"#),
            VmmAction::Pause
        );
        assert_eq!(
            ok("PATCH", "/vm", r#"{"state": "Resumed"}"#),
            VmmAction::Resume
        );
        let e = err("PATCH", "/vm", r#"{"state": "Stopped"}"#);
        assert_eq!(e.status, 400);
    }

    #[test]
    fn malformed_json_unknown_fields_and_wrong_types() {
        let e = err("PUT", "/boot-source", "{not json");
        assert_eq!(e.status, 400);
        assert!(
            e.message
                .starts_with("An error occurred when deserializing the json body of a request: "),
            "{}",
            e.message
        );
        let e = err(
            "PUT",
            "/boot-source",
            r#"{"kernel_image_path": "/k", "kernel": 1}"#,
        );
        assert!(
            e.message.contains("unknown field `kernel`"),
            "{}",
            e.message
        );
        let e = err(
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": "two", "mem_size_mib": 1}"#,
        );
        assert!(e.message.contains("invalid type"), "{}", e.message);
        let e = err(
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 300, "mem_size_mib": 1}"#,
        );
        assert!(e.message.contains("invalid value"), "{}", e.message);
        // A JSON array is not an object, even with the right fields.
        let e = err("PUT", "/boot-source", r#"["/k"]"#);
        assert!(
            e.message.contains("expected a JSON object"),
            "{}",
            e.message
        );
        let e = err("PUT", "/actions", "null");
        assert_eq!(e.status, 400);
    }

    #[test]
    fn missing_body() {
        let e = err("PUT", "/boot-source", "");
        assert_eq!((e.status, e.message.as_str()), (400, "Empty PUT request."));
        let e = err("PATCH", "/vm", "");
        assert_eq!(
            (e.status, e.message.as_str()),
            (400, "Empty PATCH request.")
        );
    }

    #[test]
    fn payload_limit() {
        let body = format!(r#"{{"kernel_image_path": "{}"}}"#, "k".repeat(100));
        assert!(parse_request("PUT", "/boot-source", body.as_bytes(), body.len()).is_ok());
        let e = parse_request("PUT", "/boot-source", body.as_bytes(), body.len() - 1).unwrap_err();
        assert_eq!(e.status, 400);
        assert_eq!(
            e.message,
            format!(
                "Request payload with size {} is larger than the limit of {} allowed by server.",
                body.len(),
                body.len() - 1
            )
        );
    }

    #[test]
    fn unknown_path_is_404_and_wrong_method_405() {
        let e = err("GET", "/nope", "");
        assert_eq!(
            (e.status, e.message.as_str()),
            (404, "Invalid request method and/or path: GET /nope.")
        );
        assert_eq!(err("PUT", "/drives/a/b", "{}").status, 404);
        assert_eq!(err("GET", "vm", "").status, 404);
        let e = err("GET", "/boot-source", "");
        assert_eq!(
            (e.status, e.message.as_str()),
            (405, "Invalid request method and/or path: GET /boot-source.")
        );
        assert_eq!(err("DELETE", "/drives/x", "").status, 405);
        assert_eq!(err("POST", "/actions", "{}").status, 405);
        assert_eq!(allowed_methods("/drives/x"), Some(&["PUT", "PATCH"][..]));
        assert_eq!(
            allowed_methods("/machine-config?a"),
            Some(&["GET", "PUT", "PATCH"][..])
        );
        assert_eq!(allowed_methods("/nope"), None);
    }

    #[test]
    fn snapshot_bodies() {
        assert_eq!(
            ok(
                "PUT",
                "/snapshot/create",
                r#"{"snapshot_path": "/s", "mem_file_path": "/m"}"#
            ),
            VmmAction::CreateSnapshot(SnapshotCreateParams {
                snapshot_type: crate::SnapshotType::Full,
                snapshot_path: PathBuf::from("/s"),
                mem_file_path: PathBuf::from("/m"),
            })
        );
        let VmmAction::LoadSnapshot(p) = ok(
            "PUT",
            "/snapshot/load",
            r#"{"snapshot_path": "/s", "mem_file_path": "/m", "enable_diff_snapshots": true,
                "network_overrides": [{"iface_id": "eth0", "host_dev_name": "tap9"}],
                "vsock_override": {"uds_path": "/v"}}"#,
        ) else {
            panic!("not a load");
        };
        assert_eq!(p.mem_backend.backend_type, MemBackendType::File);
        assert_eq!(p.mem_backend.backend_path, PathBuf::from("/m"));
        assert!(p.track_dirty_pages && !p.resume_vm && !p.clock_realtime);
        assert_eq!(p.network_overrides[0].host_dev_name, "tap9");
        assert_eq!(p.vsock_override.unwrap().uds_path, PathBuf::from("/v"));
        let e = err("PUT", "/snapshot/load", r#"{"snapshot_path": "/s"}"#);
        assert_eq!(
            e.message,
            "An error occurred when deserializing the json body of a request: missing field: either `mem_backend` or `mem_file_path` is required."
        );
        let e = err(
            "PUT",
            "/snapshot/load",
            r#"{"snapshot_path": "/s", "mem_file_path": "/m", "mem_backend": {"backend_type": "Uffd", "backend_path": "/u"}}"#,
        );
        assert!(e.message.contains("too many fields"), "{}", e.message);
        let e = err(
            "PUT",
            "/snapshot/create",
            r#"{"snapshot_type": "Half", "snapshot_path": "/s", "mem_file_path": "/m"}"#,
        );
        assert!(
            e.message.contains("unknown variant `Half`"),
            "{}",
            e.message
        );
        assert_eq!(err("GET", "/snapshot/load", "").status, 405);
    }

    #[test]
    fn mmds_requests() {
        assert_eq!(
            parse_request("GET", "/mmds", b"", 100).unwrap(),
            VmmAction::GetMmds
        );
        assert_eq!(
            parse_request("PUT", "/mmds", br#"{"a": {"b": 1}}"#, 100).unwrap(),
            VmmAction::PutMmds(serde_json::json!({"a": {"b": 1}}))
        );
        assert_eq!(
            parse_request("PATCH", "/mmds", br#"{"a": null}"#, 100).unwrap(),
            VmmAction::PatchMmds(serde_json::json!({"a": null}))
        );
        let VmmAction::PutMmdsConfig(c) = parse_request(
            "PUT",
            "/mmds/config",
            br#"{"version": "V2", "network_interfaces": ["eth0"], "ipv4_address": "169.254.170.2"}"#,
            200,
        )
        .unwrap() else {
            panic!("not PutMmdsConfig");
        };
        assert_eq!(c.version, ember_config::MmdsVersion::V2);
        assert_eq!(
            c.ipv4_address,
            Some(std::net::Ipv4Addr::new(169, 254, 170, 2))
        );
        let e = err("PUT", "/mmds", "{oops");
        assert!(
            e.message
                .starts_with("An error occurred when deserializing the json body"),
            "{}",
            e.message
        );
        let e = err(
            "PUT",
            "/mmds/config",
            r#"{"network_interfaces": ["eth0"], "x": 1}"#,
        );
        assert!(e.message.contains("unknown field `x`"), "{}", e.message);
        assert_eq!(err("GET", "/mmds/config", "").status, 405);
        assert_eq!(allowed_methods("/mmds"), Some(&["GET", "PUT", "PATCH"][..]));
    }

    #[test]
    fn balloon_requests() {
        let body = r#"{"amount_mib": 64, "deflate_on_oom": true, "stats_polling_interval_s": 1}"#;
        let VmmAction::PutBalloon(b) = ok("PUT", "/balloon", body) else {
            panic!("not PutBalloon");
        };
        assert_eq!((b.amount_mib, b.deflate_on_oom), (64, true));
        assert_eq!(b.stats_polling_interval_s, 1);
        assert!(!b.free_page_hinting && !b.free_page_reporting);
        let e = err("PUT", "/balloon", r#"{"amount_mib": 64}"#);
        assert!(e.message.contains("deflate_on_oom"), "{}", e.message);
        assert_eq!(ok("GET", "/balloon", ""), VmmAction::GetBalloon);
        assert_eq!(
            ok("PATCH", "/balloon", r#"{"amount_mib": 8}"#),
            VmmAction::PatchBalloon(BalloonUpdate { amount_mib: 8 })
        );
        let e = err(
            "PATCH",
            "/balloon",
            r#"{"amount_mib": 8, "deflate_on_oom": true}"#,
        );
        assert!(e.message.contains("unknown field"), "{}", e.message);
        assert_eq!(err("PATCH", "/balloon", "").message, "Empty PATCH request.");
        assert_eq!(
            ok("GET", "/balloon/statistics", ""),
            VmmAction::GetBalloonStats
        );
        assert_eq!(
            ok(
                "PATCH",
                "/balloon/statistics",
                r#"{"stats_polling_interval_s": 5}"#
            ),
            VmmAction::PatchBalloonStats(BalloonStatsUpdate {
                stats_polling_interval_s: 5
            })
        );
        assert_eq!(
            ok("PATCH", "/balloon/hinting/start", ""),
            VmmAction::StartBalloonHinting(StartHintingCmd {
                acknowledge_on_stop: true
            })
        );
        assert_eq!(
            ok(
                "PATCH",
                "/balloon/hinting/start",
                r#"{"acknowledge_on_stop": false}"#
            ),
            VmmAction::StartBalloonHinting(StartHintingCmd {
                acknowledge_on_stop: false
            })
        );
        assert_eq!(
            ok("GET", "/balloon/hinting/status", ""),
            VmmAction::GetBalloonHintingStatus
        );
        assert_eq!(
            ok("PATCH", "/balloon/hinting/stop", ""),
            VmmAction::StopBalloonHinting
        );
        assert_eq!(err("PUT", "/balloon/statistics", "{}").status, 405);
        assert_eq!(
            allowed_methods("/balloon"),
            Some(&["GET", "PUT", "PATCH"][..])
        );
    }

    #[test]
    fn firecracker_endpoints_ember_lacks_say_so() {
        for (m, p) in [("PUT", "/pmem/p0"), ("PUT", "/hotplug/memory")] {
            let e = err(m, p, "{}");
            assert_eq!(e.status, 400, "{m} {p}");
            assert!(
                e.message.contains("not implemented by Ember"),
                "{}",
                e.message
            );
        }
    }

    #[test]
    fn every_route_parses_and_counts() {
        let metrics = ApiRequestMetrics::default();
        for r in ROUTES {
            let path = r.path.replace("{drive_id}", "d").replace("{iface_id}", "i");
            assert!(allowed_methods(&path).unwrap().contains(&r.method));
            let counted = request_counters(&metrics, r.method, &path).is_some();
            // Firecracker counts every route except PATCH /vm, GET /vm/config
            // the snapshot calls and PUT /entropy (its metrics have no entropy
            // request counter).
            // Nor the balloon's.
            let uncounted = matches!(
                r.path,
                "/vm" | "/vm/config" | "/snapshot/create" | "/snapshot/load" | "/entropy"
            ) || r.path.starts_with("/balloon");
            assert_eq!(counted, !uncounted, "{r:?}");
        }
        for p in NOT_IMPLEMENTED {
            assert_eq!(
                allowed_methods(&p.replace("{id}", "x")),
                Some(&[][..]),
                "{p}"
            );
        }
    }
}
