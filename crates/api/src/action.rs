//! What the API thread hands to the VMM thread ([`VmmAction`]) and what it
//! gets back ([`VmmResponse`]).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use ember_config::{
    Balloon, BootSource, CustomCpuTemplate, Drive, Entropy, HugePages, Logger, MachineConfig,
    Metrics, MmdsConfig, NetworkInterface, RateLimiter, Serial, StaticCpuTemplate, VmConfig, Vsock,
};
pub use ember_virtio_balloon::{BalloonStats, HintingStatus, StartHintingCmd};

/// The `app_name` of `GET /`.
pub const APP_NAME: &str = "Ember";

/// The Firecracker release whose API Ember speaks: the
/// `firecracker_version` of `GET /version`, which tools read to decide what
/// they may call.
pub const FIRECRACKER_API_VERSION: &str = "1.17.0";

/// Ember's own version: `vmm_version` of `GET /`, `ember_version` of
/// `GET /version`.
pub const EMBER_VERSION: &str = env!("CARGO_PKG_VERSION");

/// One API request, parsed and type-checked, for the VMM thread.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmmAction {
    /// `GET /`.
    GetInstanceInfo,
    /// `GET /version`.
    GetVersion,
    /// `GET /vm/config`.
    GetVmConfig,
    /// `GET /machine-config`.
    GetMachineConfig,
    /// `PUT /boot-source`.
    PutBootSource(BootSource),
    /// `PUT /machine-config`: replaces the whole machine configuration
    /// (absent optional fields take their defaults).
    PutMachineConfig(MachineConfig),
    /// `PATCH /machine-config`: changes only the given fields.
    PatchMachineConfig(MachineConfigUpdate),
    /// `PUT /drives/{drive_id}`: adds a drive or replaces the one with the
    /// same id.
    PutDrive(Drive),
    /// `PATCH /drives/{drive_id}`: changes the backing file or rate limiter
    /// of a running VM's drive.
    PatchDrive(DriveUpdate),
    /// `PUT /network-interfaces/{iface_id}`.
    PutNetworkInterface(NetworkInterface),
    /// `PATCH /network-interfaces/{iface_id}`: changes the rate limiters of
    /// a running VM's network interface.
    PatchNetworkInterface(NetworkInterfaceUpdate),
    /// `PUT /vsock`.
    PutVsock(Vsock),
    /// `PUT /entropy`: adds the entropy device, or replaces its settings.
    PutEntropy(Entropy),
    /// `PUT /cpu-config`: a custom CPU template, replacing any template set
    /// before (static or custom).
    PutCpuConfig(CustomCpuTemplate),
    /// `GET /mmds`: the metadata store.
    GetMmds,
    /// `PUT /mmds`: replaces the metadata store.
    PutMmds(serde_json::Value),
    /// `PATCH /mmds`: merges into the metadata store (RFC 7396).
    PatchMmds(serde_json::Value),
    /// `PUT /mmds/config`: the service's version, address and interfaces.
    PutMmdsConfig(MmdsConfig),
    /// `PUT /balloon`: adds the balloon, or replaces its settings, before
    /// boot.
    PutBalloon(Balloon),
    /// `GET /balloon`.
    GetBalloon,
    /// `PATCH /balloon`: a new target for the running balloon.
    PatchBalloon(BalloonUpdate),
    /// `GET /balloon/statistics`.
    GetBalloonStats,
    /// `PATCH /balloon/statistics`: a new polling interval.
    PatchBalloonStats(BalloonStatsUpdate),
    /// `PATCH /balloon/hinting/start`.
    StartBalloonHinting(StartHintingCmd),
    /// `GET /balloon/hinting/status`.
    GetBalloonHintingStatus,
    /// `PATCH /balloon/hinting/stop`.
    StopBalloonHinting,
    /// `PUT /logger`.
    PutLogger(Logger),
    /// `PUT /metrics`.
    PutMetrics(Metrics),
    /// `PUT /serial`: where the guest's console output goes.
    PutSerial(Serial),
    /// `PUT /actions` `InstanceStart`.
    InstanceStart,
    /// `PUT /actions` `SendCtrlAltDel`.
    SendCtrlAltDel,
    /// `PUT /actions` `FlushMetrics`.
    FlushMetrics,
    /// `PATCH /vm` `{"state": "Paused"}`.
    Pause,
    /// `PATCH /vm` `{"state": "Resumed"}`.
    Resume,
    /// `PUT /snapshot/create`, on a paused VM.
    CreateSnapshot(SnapshotCreateParams),
    /// `PUT /snapshot/load`, before any other configuration.
    LoadSnapshot(SnapshotLoadParams),
}

impl VmmAction {
    /// Whether the action only reads state.
    pub fn is_get(&self) -> bool {
        matches!(
            self,
            VmmAction::GetInstanceInfo
                | VmmAction::GetVersion
                | VmmAction::GetVmConfig
                | VmmAction::GetMachineConfig
                | VmmAction::GetMmds
                | VmmAction::GetBalloon
        )
    }
}

/// `snapshot_type` of `PUT /snapshot/create`.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub enum SnapshotType {
    /// All of guest memory.
    #[default]
    Full,
    /// Only the pages written since the previous snapshot.
    Diff,
}

/// `PUT /snapshot/create`: Firecracker's `SnapshotCreateParams`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreateParams {
    /// Full (the default) or Diff.
    #[serde(default)]
    pub snapshot_type: SnapshotType,
    /// Where the microVM state goes.
    pub snapshot_path: PathBuf,
    /// Where the guest memory goes.
    pub mem_file_path: PathBuf,
}

/// `backend_type` of a memory backend.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub enum MemBackendType {
    /// Guest memory mapped from a file.
    File,
    /// Guest memory served by a userfaultfd handler listening on a socket.
    Uffd,
}

/// `mem_backend` of `PUT /snapshot/load`: Firecracker's `MemoryBackend`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MemBackend {
    /// File or Uffd.
    pub backend_type: MemBackendType,
    /// The memory file, or the UDS of the page-fault handler.
    pub backend_path: PathBuf,
}

/// One entry of `network_overrides`: Firecracker's `NetworkOverride`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NetworkOverride {
    /// The interface whose TAP changes.
    pub iface_id: String,
    /// The TAP it uses from now on.
    pub host_dev_name: String,
}

/// `vsock_override`: Firecracker's `VsockOverride`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VsockOverride {
    /// The Unix socket the vsock device listens on from now on.
    pub uds_path: PathBuf,
}

/// `PUT /snapshot/load`, parsed: `mem_file_path` (deprecated) is turned
/// into a File backend, `enable_diff_snapshots` (deprecated) into
/// `track_dirty_pages`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotLoadParams {
    /// The microVM state file.
    pub snapshot_path: PathBuf,
    /// Where guest memory comes from.
    pub mem_backend: MemBackend,
    /// Dirty page tracking in the restored VM.
    pub track_dirty_pages: bool,
    /// Resume the VM once it is loaded (else it stays paused).
    pub resume_vm: bool,
    /// TAP names replacing those in the snapshot.
    pub network_overrides: Vec<NetworkOverride>,
    /// A vsock socket path replacing the one in the snapshot.
    pub vsock_override: Option<VsockOverride>,
    /// Advance kvmclock by the wall-clock time since the snapshot.
    pub clock_realtime: bool,
    /// The restored VM's huge pages.
    pub huge_pages: SnapshotHugePages,
}

/// `huge_pages` of `PUT /snapshot/load`.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub enum SnapshotHugePages {
    /// What the snapshot was taken with (the default).
    #[default]
    Snapshot,
    /// Regular pages.
    None,
    /// Transparent huge pages.
    Transparent,
    /// Explicit 2 MiB hugetlbfs pages (needs the Uffd backend).
    #[serde(rename = "2M")]
    Hugetlbfs2M,
}

/// `PATCH /machine-config`: every field optional, at least one present.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MachineConfigUpdate {
    /// New vCPU count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpu_count: Option<u8>,
    /// New memory size in MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_size_mib: Option<usize>,
    /// New SMT setting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smt: Option<bool>,
    /// New static CPU template, replacing any template set before;
    /// `"None"` clears it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<StaticCpuTemplate>,
    /// New dirty page tracking setting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub track_dirty_pages: Option<bool>,
    /// New huge pages setting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<HugePages>,
}

impl MachineConfigUpdate {
    /// True when no field is given (Firecracker rejects such a PATCH).
    pub fn is_empty(&self) -> bool {
        self == &MachineConfigUpdate::default()
    }

    /// `base` with the given fields replaced. The result still has to be
    /// validated.
    pub fn apply(&self, base: &MachineConfig) -> MachineConfig {
        let cpu_template = match self.cpu_template {
            None => base.cpu_template,
            // Firecracker: the "None" template clears any template set.
            Some(StaticCpuTemplate::None) => None,
            Some(t) => Some(t),
        };
        MachineConfig {
            vcpu_count: self.vcpu_count.unwrap_or(base.vcpu_count),
            mem_size_mib: self.mem_size_mib.unwrap_or(base.mem_size_mib),
            smt: self.smt.unwrap_or(base.smt),
            track_dirty_pages: self.track_dirty_pages.unwrap_or(base.track_dirty_pages),
            cpu_template,
            huge_pages: self.huge_pages.unwrap_or(base.huge_pages),
        }
    }
}

/// `PATCH /drives/{drive_id}`: Firecracker's `PartialDrive`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DriveUpdate {
    /// The drive to change.
    pub drive_id: String,
    /// New backing file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<PathBuf>,
    /// New rate limiter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
}

/// `PATCH /network-interfaces/{iface_id}`: Firecracker's
/// `PartialNetworkInterface`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterfaceUpdate {
    /// The interface to change.
    pub iface_id: String,
    /// New receive rate limiter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiter>,
    /// New transmit rate limiter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiter>,
}

/// `PATCH /balloon`: Firecracker's `BalloonUpdateConfig`.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BalloonUpdate {
    /// New target, in MiB.
    pub amount_mib: u32,
}

/// `PATCH /balloon/statistics`: Firecracker's `BalloonUpdateStatsConfig`.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BalloonStatsUpdate {
    /// New polling interval, in seconds.
    pub stats_polling_interval_s: u16,
}

/// `state` of `GET /`, Firecracker's strings.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub enum InstanceState {
    /// Before `InstanceStart`.
    #[serde(rename = "Not started")]
    NotStarted,
    /// vCPUs running.
    Running,
    /// vCPUs paused with `PATCH /vm`.
    Paused,
}

/// `GET /`: Firecracker's `InstanceInfo`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct InstanceInfo {
    /// The `--id` of the microVM.
    pub id: String,
    /// Where the microVM is in its life.
    pub state: InstanceState,
    /// Ember's version.
    pub vmm_version: String,
    /// `"Ember"`.
    pub app_name: String,
}

impl InstanceInfo {
    /// The information for microVM `id` in `state`.
    pub fn new(id: impl Into<String>, state: InstanceState) -> Self {
        InstanceInfo {
            id: id.into(),
            state,
            vmm_version: EMBER_VERSION.to_string(),
            app_name: APP_NAME.to_string(),
        }
    }
}

/// What a successful action returns.
// One value per API request: boxing the configuration would only add an
// allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum VmmData {
    /// Nothing: `204 No Content`.
    Empty,
    /// `GET /`.
    InstanceInfo(InstanceInfo),
    /// `GET /version`: the `firecracker_version` string (normally
    /// [`FIRECRACKER_API_VERSION`]).
    Version(String),
    /// `GET /vm/config`.
    VmConfig(VmConfig),
    /// `GET /machine-config`.
    MachineConfig(MachineConfig),
    /// `GET /mmds`: the store (`{}` when empty).
    MmdsValue(serde_json::Value),
    /// `GET /balloon`.
    Balloon(Balloon),
    /// `GET /balloon/statistics`.
    BalloonStats(BalloonStats),
    /// `GET /balloon/hinting/status`.
    HintingStatus(HintingStatus),
}

/// A failed request: an HTTP status and the `fault_message` of Firecracker's
/// `Error` body.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    /// HTTP status code; 400 for everything the caller can fix.
    pub status: u16,
    /// Human-readable reason, sent as `{"fault_message": message}`.
    pub message: String,
}

impl ApiError {
    /// An error with any status.
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }

    /// `400 Bad Request`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, message)
    }

    /// `500 Internal Server Error`: the VMM failed, not the request.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, message)
    }

    /// Firecracker's answer to a configuration call once the VM runs.
    pub fn not_supported_post_boot() -> Self {
        Self::bad_request("The requested operation is not supported after starting the microVM.")
    }

    /// Firecracker's answer to a runtime call before the VM runs.
    pub fn not_supported_pre_boot() -> Self {
        Self::bad_request("The requested operation is not supported before starting the microVM.")
    }
}

/// The VMM thread's answer to one [`VmmAction`].
pub type VmmResponse = Result<VmmData, ApiError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patch_merges_only_given_fields() {
        let base = MachineConfig {
            vcpu_count: 2,
            mem_size_mib: 256,
            smt: true,
            track_dirty_pages: false,
            cpu_template: Some(StaticCpuTemplate::T2A),
            huge_pages: HugePages::None,
        };
        let u = MachineConfigUpdate {
            mem_size_mib: Some(512),
            ..Default::default()
        };
        let m = u.apply(&base);
        assert_eq!(m.mem_size_mib, 512);
        assert_eq!(m.vcpu_count, 2);
        assert!(m.smt);
        assert_eq!(m.cpu_template, Some(StaticCpuTemplate::T2A));
        let clear = MachineConfigUpdate {
            cpu_template: Some(StaticCpuTemplate::None),
            ..Default::default()
        };
        assert_eq!(clear.apply(&base).cpu_template, None);
        assert!(MachineConfigUpdate::default().is_empty());
        assert!(!u.is_empty());
    }

    #[test]
    fn instance_state_uses_firecracker_strings() {
        let info = InstanceInfo::new("vm", InstanceState::NotStarted);
        let v = serde_json::to_value(&info).unwrap();
        assert_eq!(v["state"], "Not started");
        assert_eq!(v["app_name"], "Ember");
        assert_eq!(v["id"], "vm");
        assert_eq!(v["vmm_version"], EMBER_VERSION);
        assert_eq!(
            serde_json::to_value(InstanceState::Paused).unwrap(),
            "Paused"
        );
    }
}
