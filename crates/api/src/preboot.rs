//! What the VMM thread does with actions: which are allowed in which state
//! ([`check_allowed`]), and the complete pre-boot configuration phase
//! ([`PreBootResources`]), which builds the [`VmConfig`] the VM boots from
//! with the same validation as the configuration file, and the pre-boot
//! controller ([`PrebootApiController`]), which also applies `PUT /logger`
//! and `PUT /metrics` at once and hands the configuration over on
//! `InstanceStart`.

use std::fs::{File, OpenOptions};
use std::path::Path;

use super::action::{
    ApiError, DriveUpdate, InstanceInfo, InstanceState, SnapshotLoadParams, VmmAction, VmmData,
    VmmResponse, FIRECRACKER_API_VERSION,
};
use crate::mmds::SharedMmds;
use ember_config::{ConfigError, Drive, NetworkInterface, StaticCpuTemplate, VmConfig};
use ember_logger::logger;
use ember_logger::metrics::Metrics;

/// Something that carries out actions: the VMM implements it for each phase
/// of a microVM's life.
pub trait ActionHandler {
    /// Performs `action` and says how it went.
    fn handle(&mut self, action: VmmAction) -> VmmResponse;
}

/// What the pre-boot controller made of one request.
// One value per API request: boxing the configuration would only add an
// allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum PrebootOutcome {
    /// Send this answer.
    Answer(VmmResponse),
    /// `InstanceStart` with a bootable configuration: build and start the
    /// VM from it, then answer.
    Start(VmConfig),
    /// `PUT /snapshot/load` before any configuration: restore the VM from
    /// the snapshot, then answer.
    Load(SnapshotLoadParams),
}

/// Answers API requests before the VM runs, as Firecracker's
/// `PrebootApiController`: configuration requests go to
/// [`PreBootResources`], `PUT /logger` and `PUT /metrics` take effect at
/// once, and `InstanceStart` hands over the configuration to boot.
pub struct PrebootApiController<'a> {
    resources: PreBootResources,
    instance_id: String,
    metrics: &'a Metrics,
    /// A boot-specific resource was configured: loading a snapshot is no
    /// longer allowed (Firecracker's `boot_path`).
    boot_path: bool,
}

impl<'a> PrebootApiController<'a> {
    /// A controller for the microVM `instance_id`, with Firecracker's
    /// default configuration, writing metrics through `metrics`.
    pub fn new(instance_id: impl Into<String>, metrics: &'a Metrics) -> Self {
        let instance_id = instance_id.into();
        PrebootApiController {
            resources: PreBootResources::new(instance_id.clone()),
            instance_id,
            metrics,
            boot_path: false,
        }
    }

    /// The configuration so far.
    pub fn config(&self) -> &VmConfig {
        self.resources.config()
    }

    /// Serves `/mmds` from `store` (the one the VM's devices will answer
    /// from) instead of a store of its own.
    pub fn with_mmds(mut self, store: SharedMmds) -> Self {
        self.resources.mmds = store;
        self
    }

    /// Handles one request.
    pub fn handle(&mut self, action: VmmAction) -> PrebootOutcome {
        if matches!(
            action,
            VmmAction::PutBootSource(_)
                | VmmAction::PutMachineConfig(_)
                | VmmAction::PatchMachineConfig(_)
                | VmmAction::PutDrive(_)
                | VmmAction::PutNetworkInterface(_)
                | VmmAction::PutVsock(_)
                | VmmAction::PutBalloon(_)
                | VmmAction::InstanceStart
        ) {
            self.boot_path = true;
        }
        let answer = match action {
            VmmAction::LoadSnapshot(_) if self.boot_path => Err(ApiError::bad_request(
                "Load snapshot error: Loading a microVM snapshot not allowed after configuring boot-specific resources.",
            )),
            VmmAction::LoadSnapshot(params) => return PrebootOutcome::Load(params),
            VmmAction::InstanceStart => match self.resources.boot_config() {
                Ok(config) => return PrebootOutcome::Start(config),
                Err(e) => Err(e),
            },
            VmmAction::PutLogger(cfg) => self.apply(VmmAction::PutLogger(cfg.clone()), || {
                logger::reconfigure(&cfg)
                    .map_err(|e| ApiError::bad_request(format!("Logger error: {e}")))
            }),
            VmmAction::PutMetrics(cfg) => {
                let (metrics, id) = (self.metrics, self.instance_id.clone());
                self.apply(VmmAction::PutMetrics(cfg.clone()), || {
                    metrics
                        .configure(&cfg, &id)
                        .map_err(|e| ApiError::bad_request(format!("Metrics error: {e}")))
                })
            }
            other => self.resources.handle(other),
        };
        PrebootOutcome::Answer(answer)
    }

    /// Records `action` in the configuration and carries it out with
    /// `apply`; the configuration keeps the action only if both succeed.
    fn apply(
        &mut self,
        action: VmmAction,
        apply: impl FnOnce() -> Result<(), ApiError>,
    ) -> VmmResponse {
        let mut candidate = self.resources.clone();
        candidate.handle(action)?;
        apply()?;
        self.resources = candidate;
        Ok(VmmData::Empty)
    }
}

/// Firecracker's rule for what may be called when: configuration before
/// `InstanceStart`; `PATCH /drives`, `PATCH /vm`, `SendCtrlAltDel` and
/// `FlushMetrics` after it; GETs always.
///
/// The error is Firecracker's 400 "The requested operation is not supported
/// before/after starting the microVM."
pub fn check_allowed(action: &VmmAction, state: InstanceState) -> Result<(), ApiError> {
    use VmmAction::*;
    let runtime_only = matches!(
        action,
        PatchDrive(_)
            | PatchNetworkInterface(_)
            | SendCtrlAltDel
            | FlushMetrics
            | Pause
            | Resume
            | CreateSnapshot(_)
            | PatchBalloon(_)
            | GetBalloonStats
            | PatchBalloonStats(_)
            | StartBalloonHinting(_)
            | GetBalloonHintingStatus
            | StopBalloonHinting
    );
    // The metadata store may be read and written at any time.
    let any_time = matches!(action, GetMmds | PutMmds(_) | PatchMmds(_));
    match state {
        _ if action.is_get() || any_time => Ok(()),
        InstanceState::NotStarted if runtime_only => Err(ApiError::not_supported_pre_boot()),
        InstanceState::NotStarted => Ok(()),
        InstanceState::Running | InstanceState::Paused if runtime_only => Ok(()),
        InstanceState::Running | InstanceState::Paused => Err(ApiError::not_supported_post_boot()),
    }
}

/// The microVM's configuration while it is built through the API.
///
/// Every change is applied to a copy that must pass
/// [`VmConfig::validate`] (the configuration file's checks) before it
/// replaces the current one, so the configuration is valid after every
/// successful request and a failed request changes nothing.
#[derive(Clone, Debug)]
pub struct PreBootResources {
    instance_id: String,
    config: VmConfig,
    /// The metadata store (shared, not copied, by clones).
    mmds: SharedMmds,
}

/// The fault message for a configuration error, without the file-oriented
/// prefix.
fn config_error(prefix: &str, e: ConfigError) -> ApiError {
    let detail = match e {
        ConfigError::Invalid(detail) => detail,
        other => other.to_string(),
    };
    ApiError::bad_request(format!("{prefix}: {detail}"))
}

/// Firecracker's refusal of guest memory smaller than the balloon target
/// set before.
fn check_balloon_fits(c: &VmConfig) -> Result<(), ApiError> {
    match &c.balloon {
        Some(b) if (b.amount_mib as usize) > c.machine_config.mem_size_mib => {
            Err(ApiError::bad_request(
                "Machine config error: The memory size (MiB) is smaller than the previously set balloon device target size.",
            ))
        }
        _ => Ok(()),
    }
}

fn check_openable(path: &Path, writable: bool) -> std::io::Result<File> {
    OpenOptions::new().read(true).write(writable).open(path)
}

impl PreBootResources {
    /// Firecracker's defaults: no boot source, 1 vCPU, 128 MiB, no devices.
    pub fn new(instance_id: impl Into<String>) -> Self {
        Self::with_config(instance_id, VmConfig::default())
    }

    /// Starts from a configuration that was already validated (a
    /// `--config-file` given together with the API).
    pub fn with_config(instance_id: impl Into<String>, config: VmConfig) -> Self {
        PreBootResources {
            instance_id: instance_id.into(),
            config,
            mmds: SharedMmds::default(),
        }
    }

    /// The configuration so far.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// The configuration so far, taken out.
    pub fn into_config(self) -> VmConfig {
        self.config
    }

    /// `GET /` before the VM starts.
    pub fn instance_info(&self) -> InstanceInfo {
        InstanceInfo::new(self.instance_id.clone(), InstanceState::NotStarted)
    }

    /// The configuration to boot from on `InstanceStart`: it must have a
    /// boot source. The error is Firecracker's message for a missing
    /// kernel.
    pub fn boot_config(&self) -> Result<VmConfig, ApiError> {
        if self.config.boot_source.is_none() {
            return Err(ApiError::bad_request(
                "Start microvm error: Cannot start microvm without kernel configuration.",
            ));
        }
        self.config
            .validate()
            .map_err(|e| config_error("Start microvm error", e))?;
        Ok(self.config.clone())
    }

    /// Applies `change` to a copy, validates the copy and keeps it.
    fn update(
        &mut self,
        prefix: &str,
        change: impl FnOnce(&mut VmConfig) -> Result<(), ApiError>,
    ) -> VmmResponse {
        let mut candidate = self.config.clone();
        change(&mut candidate)?;
        candidate.validate().map_err(|e| config_error(prefix, e))?;
        self.config = candidate;
        Ok(VmmData::Empty)
    }

    fn put_drive(config: &mut VmConfig, drive: Drive) -> Result<(), ApiError> {
        const P: &str = "Drive config error";
        let existing = config
            .drives
            .iter()
            .position(|d| d.drive_id == drive.drive_id);
        let other_root = config
            .drives
            .iter()
            .any(|d| d.is_root_device && d.drive_id != drive.drive_id);
        if drive.is_root_device && other_root {
            return Err(ApiError::bad_request(format!(
                "{P}: A root block device already exists!"
            )));
        }
        // A missing path or a vhost-user socket is the configuration
        // validation's to refuse; a file that cannot be opened is refused
        // now, as Firecracker does.
        if let Some(path) = &drive.path_on_host {
            let writable = !drive.is_read_only.unwrap_or(false);
            check_openable(path, writable).map_err(|e| {
                ApiError::bad_request(format!(
                    "{P}: Unable to create the virtio block device: cannot open {}: {e}",
                    path.display()
                ))
            })?;
        }
        match existing {
            Some(i) => config.drives[i] = drive,
            None => config.drives.push(drive),
        }
        // Firecracker keeps the root device first: it becomes /dev/vda.
        if let Some(root) = config.drives.iter().position(|d| d.is_root_device) {
            let d = config.drives.remove(root);
            config.drives.insert(0, d);
        }
        Ok(())
    }

    fn put_network_interface(
        config: &mut VmConfig,
        iface: NetworkInterface,
    ) -> Result<(), ApiError> {
        const P: &str = "Network config error";
        // The MAC format, the MTU range and the like are the configuration
        // validation's; these are the API's rules for replacing by id.
        for other in config
            .network_interfaces
            .iter()
            .filter(|n| n.iface_id != iface.iface_id)
        {
            if other.host_dev_name == iface.host_dev_name {
                return Err(ApiError::bad_request(format!(
                    "{P}: The host device name {} is already in use.",
                    iface.host_dev_name
                )));
            }
            if let (Some(a), Some(b)) = (&other.guest_mac, &iface.guest_mac) {
                if a.eq_ignore_ascii_case(b) {
                    return Err(ApiError::bad_request(format!(
                        "{P}: The guest MAC address {b} is already in use."
                    )));
                }
            }
        }
        match config
            .network_interfaces
            .iter()
            .position(|n| n.iface_id == iface.iface_id)
        {
            Some(i) => config.network_interfaces[i] = iface,
            None => config.network_interfaces.push(iface),
        }
        Ok(())
    }
}

impl ActionHandler for PreBootResources {
    /// Applies a pre-boot action with Firecracker's rules.
    ///
    /// `PUT /logger` and `PUT /metrics` are recorded in the configuration;
    /// opening the log or metrics file is the VMM's part. `InstanceStart`
    /// is the VMM's too (it builds the VM from
    /// [`boot_config`](Self::boot_config)): handing it here is a bug and
    /// answers 500.
    fn handle(&mut self, action: VmmAction) -> VmmResponse {
        check_allowed(&action, InstanceState::NotStarted)?;
        match action {
            VmmAction::GetInstanceInfo => Ok(VmmData::InstanceInfo(self.instance_info())),
            VmmAction::GetVersion => Ok(VmmData::Version(FIRECRACKER_API_VERSION.to_string())),
            VmmAction::GetVmConfig => Ok(VmmData::VmConfig(self.config.clone())),
            VmmAction::GetMachineConfig => {
                Ok(VmmData::MachineConfig(self.config.machine_config.clone()))
            }
            VmmAction::PutBootSource(boot) => self.update("Boot source error", |c| {
                const P: &str = "Boot source error";
                File::open(&boot.kernel_image_path).map_err(|e| {
                    ApiError::bad_request(format!("{P}: The kernel file cannot be opened: {e}"))
                })?;
                if let Some(initrd) = &boot.initrd_path {
                    File::open(initrd).map_err(|e| {
                        ApiError::bad_request(format!(
                            "{P}: The initrd file cannot be opened due to invalid path or invalid permissions. {e}"
                        ))
                    })?;
                }
                if let Some(args) = &boot.boot_args {
                    ember_boot::cmdline_from_str(args).map_err(|e| {
                        ApiError::bad_request(format!("{P}: The kernel command line is invalid: {e}"))
                    })?;
                }
                c.boot_source = Some(boot);
                Ok(())
            }),
            VmmAction::PutMachineConfig(m) => self.update("Machine config error", |c| {
                // Firecracker turns the PUT into an update of every field:
                // an absent `cpu_template` keeps the template set before.
                let keep = c.machine_config.cpu_template;
                if m.cpu_template.is_some() {
                    c.cpu_config = None;
                }
                c.machine_config = m;
                c.machine_config.cpu_template = match c.machine_config.cpu_template {
                    None => keep,
                    Some(t) => Some(t).filter(|t| *t != StaticCpuTemplate::None),
                };
                check_balloon_fits(c)
            }),
            VmmAction::PatchMachineConfig(u) => {
                if u.is_empty() {
                    return Err(ApiError::bad_request("Empty PATCH request."));
                }
                self.update("Machine config error", |c| {
                    if u.cpu_template.is_some() {
                        // One template at a time: a static one replaces a custom one.
                        c.cpu_config = None;
                    }
                    c.machine_config = u.apply(&c.machine_config);
                    check_balloon_fits(c)
                })
            }
            VmmAction::PutDrive(d) => {
                self.update("Drive config error", |c| Self::put_drive(c, d))
            }
            VmmAction::PutNetworkInterface(n) => self.update("Network config error", |c| {
                Self::put_network_interface(c, n)
            }),
            VmmAction::PutVsock(v) => self.update("Vsock config error", |c| {
                c.vsock = Some(v);
                Ok(())
            }),
            VmmAction::PutMmdsConfig(m) => {
                let (version, imds_compat) = (m.version, m.imds_compat);
                // Firecracker's message prefix (sic).
                self.update("MMMDS config error", |c| {
                    c.mmds_config = Some(m);
                    Ok(())
                })?;
                let mut store = crate::mmds::lock(&self.mmds);
                store.set_version(version);
                store.set_imds_compat(imds_compat);
                Ok(VmmData::Empty)
            }
            VmmAction::GetMmds => crate::mmds::get(&self.mmds),
            VmmAction::PutMmds(value) => crate::mmds::put(&self.mmds, value),
            VmmAction::PatchMmds(value) => crate::mmds::patch(&self.mmds, &value),
            VmmAction::PutEntropy(e) => self.update("Entropy config error", |c| {
                c.entropy = Some(e);
                Ok(())
            }),
            VmmAction::PutCpuConfig(t) => self.update("Cpu config error", |c| {
                // One template at a time: a custom one replaces a static one.
                c.machine_config.cpu_template = None;
                c.cpu_config = Some(t);
                Ok(())
            }),
            VmmAction::PutBalloon(b) => self.update("Balloon config error", |c| {
                c.balloon = Some(b);
                Ok(())
            }),
            VmmAction::GetBalloon => match &self.config.balloon {
                Some(b) => Ok(VmmData::Balloon(b.clone())),
                None => Err(ApiError::bad_request(
                    "Balloon config error: No balloon device found.",
                )),
            },
            VmmAction::PutSerial(serial) => self.update("Serial config error", |c| {
                c.serial = Some(serial);
                Ok(())
            }),
            VmmAction::PutLogger(l) => self.update("Logger error", |c| {
                c.logger = Some(l);
                Ok(())
            }),
            VmmAction::PutMetrics(m) => self.update("Metrics error", |c| {
                if c.metrics.is_some() {
                    return Err(ApiError::bad_request(
                        "Metrics error: Reinitialization of metrics not allowed.",
                    ));
                }
                c.metrics = Some(m);
                Ok(())
            }),
            VmmAction::InstanceStart => Err(ApiError::internal(
                "InstanceStart reached the pre-boot configuration instead of the VMM",
            )),
            VmmAction::LoadSnapshot(_) => Err(ApiError::internal(
                "LoadSnapshot reached the pre-boot configuration instead of the VMM",
            )),
            // Refused by `check_allowed` above.
            VmmAction::PatchDrive(_)
            | VmmAction::PatchNetworkInterface(_)
            | VmmAction::SendCtrlAltDel
            | VmmAction::FlushMetrics
            | VmmAction::Pause
            | VmmAction::Resume
            | VmmAction::CreateSnapshot(_)
            | VmmAction::PatchBalloon(_)
            | VmmAction::GetBalloonStats
            | VmmAction::PatchBalloonStats(_)
            | VmmAction::StartBalloonHinting(_)
            | VmmAction::GetBalloonHintingStatus
            | VmmAction::StopBalloonHinting => Err(ApiError::not_supported_pre_boot()),
        }
    }
}

/// `PATCH /drives/{id}` on a running VM: the drive as it is to become.
///
/// The VMM re-opens the backing file on the device, then stores the result
/// in its configuration (for `GET /vm/config`).
pub fn patch_drive(config: &VmConfig, update: &DriveUpdate) -> Result<Drive, ApiError> {
    let Some(drive) = config.drives.iter().find(|d| d.drive_id == update.drive_id) else {
        return Err(ApiError::bad_request(format!(
            "Drive config error: Unable to patch the block device: no drive has the id `{}`. Please verify the request arguments.",
            update.drive_id
        )));
    };
    // Firecracker takes a PATCH with neither field for a vhost-user drive's
    // configuration update, which a virtio-blk drive refuses; Ember has only
    // virtio-blk drives.
    if update.path_on_host.is_none() && update.rate_limiter.is_none() {
        return Err(ApiError::bad_request(
            "Drive config error: Unable to patch the block device: the request changes nothing: give path_on_host or rate_limiter. Please verify the request arguments.",
        ));
    }
    let mut drive = drive.clone();
    if let Some(path) = &update.path_on_host {
        let writable = !drive.is_read_only.unwrap_or(false);
        check_openable(path, writable).map_err(|e| {
            ApiError::bad_request(format!(
                "Drive config error: Unable to patch the block device: cannot open {}: {e}. Please verify the request arguments.",
                path.display()
            ))
        })?;
        drive.path_on_host = Some(path.clone());
    }
    if let Some(rl) = &update.rate_limiter {
        // A bucket the update leaves out stays as it was (Firecracker's
        // BucketUpdate::None).
        let mut merged = drive.rate_limiter.take().unwrap_or_default();
        if rl.bandwidth.is_some() {
            merged.bandwidth = rl.bandwidth.clone();
        }
        if rl.ops.is_some() {
            merged.ops = rl.ops.clone();
        }
        drive.rate_limiter = Some(merged);
    }
    Ok(drive)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::action::MachineConfigUpdate;
    use ember_config::{BootSource, Logger, MachineConfig, Metrics, Serial, TokenBucket, Vsock};

    fn kernel() -> tempfile::NamedTempFile {
        tempfile::NamedTempFile::new().unwrap()
    }

    fn answer(outcome: PrebootOutcome) -> VmmResponse {
        match outcome {
            PrebootOutcome::Answer(a) => a,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_preboot_controller_serves_the_metadata_store() {
        let registry = ember_logger::metrics::Metrics::new();
        let store = SharedMmds::new(std::sync::Mutex::new(ember_mmds::Mmds::new(40)));
        let mut c = PrebootApiController::new("vm-9", &registry).with_mmds(store.clone());
        use serde_json::json;
        assert_eq!(
            answer(c.handle(VmmAction::GetMmds)),
            Ok(VmmData::MmdsValue(json!({})))
        );
        let e = answer(c.handle(VmmAction::PatchMmds(json!({"a": 1})))).unwrap_err();
        assert_eq!(
            (e.status, e.message.as_str()),
            (400, "MMDS error: The MMDS data store is not initialized.")
        );
        answer(c.handle(VmmAction::PutMmds(json!({"a": {"b": "c"}})))).unwrap();
        answer(c.handle(VmmAction::PatchMmds(json!({"a": {"d": 1}})))).unwrap();
        assert_eq!(
            answer(c.handle(VmmAction::GetMmds)),
            Ok(VmmData::MmdsValue(json!({"a": {"b": "c", "d": 1}})))
        );
        let e = answer(c.handle(VmmAction::PutMmds(json!({"a": "x".repeat(40)})))).unwrap_err();
        assert_eq!(
            (e.status, e.message.as_str()),
            (
                413,
                "MMDS limit exceeded error: The MMDS patch request doesn't fit."
            )
        );
        // The store the devices answer from is the one written.
        assert_eq!(
            store.lock().unwrap().data_store_value(),
            &json!({"a": {"b": "c", "d": 1}})
        );
    }

    #[test]
    fn mmds_config_needs_existing_interfaces_and_sets_the_store() {
        let registry = ember_logger::metrics::Metrics::new();
        let store = SharedMmds::default();
        let mut c = PrebootApiController::new("vm-9", &registry).with_mmds(store.clone());
        let cfg = ember_config::MmdsConfig {
            version: ember_config::MmdsVersion::V2,
            network_interfaces: vec!["eth0".into()],
            ipv4_address: None,
            imds_compat: true,
        };
        let e = answer(c.handle(VmmAction::PutMmdsConfig(cfg.clone()))).unwrap_err();
        assert_eq!(
            e.message,
            "MMMDS config error: The list of network interface IDs provided contains at least one ID that does not correspond to any existing network interface."
        );
        assert_eq!(
            store.lock().unwrap().version(),
            ember_config::MmdsVersion::V1
        );
        answer(c.handle(VmmAction::PutNetworkInterface(
            serde_json::from_str(r#"{"iface_id": "eth0", "host_dev_name": "tap0"}"#).unwrap(),
        )))
        .unwrap();
        let bad = ember_config::MmdsConfig {
            ipv4_address: Some(std::net::Ipv4Addr::new(10, 0, 0, 1)),
            ..cfg.clone()
        };
        let e = answer(c.handle(VmmAction::PutMmdsConfig(bad))).unwrap_err();
        assert_eq!(
            e.message,
            "MMMDS config error: The MMDS IPv4 address is not link local."
        );
        answer(c.handle(VmmAction::PutMmdsConfig(cfg.clone()))).unwrap();
        assert_eq!(c.config().mmds_config, Some(cfg));
        let m = store.lock().unwrap();
        assert_eq!(
            (m.version(), m.imds_compat()),
            (ember_config::MmdsVersion::V2, true)
        );
        drop(m);
        // Configuration only before boot; the store at any time.
        assert!(check_allowed(
            &VmmAction::PutMmdsConfig(Default::default()),
            InstanceState::Running
        )
        .is_err());
        for a in [
            VmmAction::GetMmds,
            VmmAction::PutMmds(serde_json::json!({})),
            VmmAction::PatchMmds(serde_json::json!({})),
        ] {
            assert!(check_allowed(&a, InstanceState::Running).is_ok());
            assert!(check_allowed(&a, InstanceState::Paused).is_ok());
        }
    }

    #[test]
    fn the_preboot_controller_starts_only_a_bootable_configuration() {
        let registry = ember_logger::metrics::Metrics::new();
        let mut c = PrebootApiController::new("vm-9", &registry);
        match c.handle(VmmAction::InstanceStart) {
            PrebootOutcome::Answer(Err(e)) => assert_eq!(e.status, 400),
            other => panic!("{other:?}"),
        }
        let k = kernel();
        assert!(matches!(
            c.handle(boot(k.path())),
            PrebootOutcome::Answer(Ok(VmmData::Empty))
        ));
        match c.handle(VmmAction::InstanceStart) {
            PrebootOutcome::Start(config) => {
                assert_eq!(config.boot_source().unwrap().kernel_image_path, k.path())
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_preboot_controller_applies_metrics_at_once_and_keeps_only_what_worked() {
        let dir = tempfile::tempdir().unwrap();
        let registry = ember_logger::metrics::Metrics::new();
        let mut c = PrebootApiController::new("vm-9", &registry);
        let path = dir.path().join("metrics.json");
        let put = |path: PathBuf| {
            VmmAction::PutMetrics(Metrics {
                metrics_path: path,
                emit_id: false,
                properties: None,
            })
        };
        // A destination that cannot be opened changes nothing.
        match c.handle(put(dir.path().join("missing/m.json"))) {
            PrebootOutcome::Answer(Err(e)) => {
                assert!(e.message.starts_with("Metrics error: "), "{}", e.message)
            }
            other => panic!("{other:?}"),
        }
        assert!(c.config().metrics.is_none());
        assert!(matches!(
            c.handle(put(path.clone())),
            PrebootOutcome::Answer(Ok(VmmData::Empty))
        ));
        assert_eq!(c.config().metrics.as_ref().unwrap().metrics_path, path);
        registry.flush().unwrap();
        assert!(std::fs::read_to_string(&path).unwrap().starts_with('{'));
    }

    fn boot(path: &Path) -> VmmAction {
        VmmAction::PutBootSource(BootSource {
            kernel_image_path: path.to_path_buf(),
            initrd_path: None,
            boot_args: Some("console=ttyS0".into()),
        })
    }

    fn err(r: VmmResponse) -> ApiError {
        r.expect_err("expected an error")
    }

    #[test]
    fn state_rules() {
        let pre = InstanceState::NotStarted;
        for a in [
            VmmAction::GetInstanceInfo,
            VmmAction::GetVmConfig,
            VmmAction::InstanceStart,
            VmmAction::PutLogger(Logger::default()),
        ] {
            assert!(check_allowed(&a, pre).is_ok(), "{a:?}");
        }
        for a in [
            VmmAction::Pause,
            VmmAction::FlushMetrics,
            VmmAction::SendCtrlAltDel,
        ] {
            assert_eq!(
                check_allowed(&a, pre).unwrap_err().message,
                "The requested operation is not supported before starting the microVM."
            );
        }
        for post in [InstanceState::Running, InstanceState::Paused] {
            for a in [
                VmmAction::Pause,
                VmmAction::Resume,
                VmmAction::FlushMetrics,
                VmmAction::SendCtrlAltDel,
                VmmAction::GetMachineConfig,
                VmmAction::PatchDrive(DriveUpdate {
                    drive_id: "d".into(),
                    path_on_host: None,
                    rate_limiter: None,
                }),
            ] {
                assert!(check_allowed(&a, post).is_ok(), "{a:?}");
            }
            for a in [
                VmmAction::InstanceStart,
                VmmAction::PutMachineConfig(MachineConfig::default()),
                VmmAction::PatchMachineConfig(MachineConfigUpdate {
                    vcpu_count: Some(2),
                    ..Default::default()
                }),
                VmmAction::PutLogger(Logger::default()),
                VmmAction::PutSerial(Serial::default()),
            ] {
                let e = check_allowed(&a, post).unwrap_err();
                assert_eq!(e.status, 400);
                assert_eq!(
                    e.message,
                    "The requested operation is not supported after starting the microVM."
                );
            }
        }
    }

    #[test]
    fn defaults_and_gets() {
        let mut r = PreBootResources::new("vm-1");
        assert_eq!(
            r.handle(VmmAction::GetMachineConfig).unwrap(),
            VmmData::MachineConfig(MachineConfig::default())
        );
        let Ok(VmmData::InstanceInfo(info)) = r.handle(VmmAction::GetInstanceInfo) else {
            panic!()
        };
        assert_eq!(
            (info.id.as_str(), info.state),
            ("vm-1", InstanceState::NotStarted)
        );
        assert_eq!(
            r.handle(VmmAction::GetVersion).unwrap(),
            VmmData::Version(FIRECRACKER_API_VERSION.into())
        );
        assert_eq!(
            r.handle(VmmAction::GetVmConfig).unwrap(),
            VmmData::VmConfig(VmConfig::default())
        );
    }

    #[test]
    fn boot_source_is_checked_and_recorded() {
        let k = kernel();
        let mut r = PreBootResources::new("vm");
        assert_eq!(
            r.boot_config().unwrap_err().message,
            "Start microvm error: Cannot start microvm without kernel configuration."
        );
        let e = err(r.handle(boot(Path::new("/nonexistent/kernel"))));
        assert!(
            e.message
                .starts_with("Boot source error: The kernel file cannot be opened: "),
            "{}",
            e.message
        );
        assert!(
            r.config().boot_source.is_none(),
            "a failed PUT changes nothing"
        );
        let e = err(r.handle(VmmAction::PutBootSource(BootSource {
            kernel_image_path: k.path().to_path_buf(),
            initrd_path: Some(PathBuf::from("/nonexistent/initrd")),
            boot_args: None,
        })));
        assert!(e.message.contains("initrd"), "{}", e.message);
        let e = err(r.handle(VmmAction::PutBootSource(BootSource {
            kernel_image_path: k.path().to_path_buf(),
            initrd_path: None,
            boot_args: Some("x".repeat(5000)),
        })));
        assert!(
            e.message.contains("command line is invalid"),
            "{}",
            e.message
        );

        assert_eq!(r.handle(boot(k.path())).unwrap(), VmmData::Empty);
        let cfg = r.boot_config().unwrap();
        assert_eq!(cfg.boot_source.unwrap().kernel_image_path, k.path());
    }

    #[test]
    fn machine_config_put_patch_and_validation() {
        let mut r = PreBootResources::new("vm");
        let m = MachineConfig {
            vcpu_count: 2,
            mem_size_mib: 256,
            smt: true,
            ..MachineConfig::default()
        };
        assert_eq!(
            r.handle(VmmAction::PutMachineConfig(m.clone())).unwrap(),
            VmmData::Empty
        );
        assert_eq!(r.config().machine_config, m);
        // PATCH merges; the merged result is validated as a whole: 3 vCPUs
        // with SMT on is odd.
        let e = err(r.handle(VmmAction::PatchMachineConfig(MachineConfigUpdate {
            vcpu_count: Some(3),
            ..Default::default()
        })));
        assert_eq!(
            e.message,
            "Machine config error: machine-config.vcpu_count is 3 with smt enabled: it must be 1 or an even number"
        );
        assert_eq!(r.config().machine_config.vcpu_count, 2);
        r.handle(VmmAction::PatchMachineConfig(MachineConfigUpdate {
            smt: Some(false),
            vcpu_count: Some(3),
            ..Default::default()
        }))
        .unwrap();
        let c = &r.config().machine_config;
        assert_eq!((c.vcpu_count, c.mem_size_mib, c.smt), (3, 256, false));
        let e = err(r.handle(VmmAction::PutMachineConfig(MachineConfig {
            vcpu_count: 0,
            ..MachineConfig::default()
        })));
        assert!(e.message.contains("between 1 and 32"), "{}", e.message);
        let e = err(r.handle(VmmAction::PatchMachineConfig(MachineConfigUpdate::default())));
        assert_eq!(e.message, "Empty PATCH request.");
    }

    #[test]
    fn drive_rules_before_validation() {
        // These rules are checked before the configuration is validated, so
        // they hold whatever the configuration file supports.
        let f = kernel();
        let mut c = VmConfig::default();
        let drive = |id: &str, root: bool| Drive {
            drive_id: id.into(),
            path_on_host: Some(f.path().to_path_buf()),
            is_root_device: root,
            partuuid: None,
            is_read_only: Some(false),
            cache_type: Default::default(),
            io_engine: Default::default(),
            rate_limiter: None,
            socket: None,
        };
        PreBootResources::put_drive(&mut c, drive("data", false)).unwrap();
        PreBootResources::put_drive(&mut c, drive("rootfs", true)).unwrap();
        // The root device moves first.
        let ids: Vec<&str> = c.drives.iter().map(|d| d.drive_id.as_str()).collect();
        assert_eq!(ids, ["rootfs", "data"]);
        let e = PreBootResources::put_drive(&mut c, drive("other", true)).unwrap_err();
        assert_eq!(
            e.message,
            "Drive config error: A root block device already exists!"
        );
        // Replacing the root device by id is allowed, and so is demoting it.
        PreBootResources::put_drive(&mut c, drive("rootfs", true)).unwrap();
        PreBootResources::put_drive(&mut c, drive("rootfs", false)).unwrap();
        PreBootResources::put_drive(&mut c, drive("other", true)).unwrap();
        let ids: Vec<&str> = c.drives.iter().map(|d| d.drive_id.as_str()).collect();
        assert_eq!(ids, ["other", "rootfs", "data"]);
        let mut missing = drive("x", false);
        missing.path_on_host = Some(PathBuf::from("/nonexistent/disk"));
        let e = PreBootResources::put_drive(&mut c, missing).unwrap_err();
        assert!(e.message.contains("/nonexistent/disk"), "{}", e.message);
        assert_eq!(c.drives.len(), 3);
    }

    #[test]
    fn network_rules_before_validation() {
        let mut c = VmConfig::default();
        let iface = |id: &str, tap: &str, mac: Option<&str>| NetworkInterface {
            iface_id: id.into(),
            host_dev_name: tap.into(),
            guest_mac: mac.map(String::from),
            mtu: None,
            rx_rate_limiter: None,
            tx_rate_limiter: None,
        };
        PreBootResources::put_network_interface(
            &mut c,
            iface("eth0", "tap0", Some("06:00:00:00:00:01")),
        )
        .unwrap();
        let e = PreBootResources::put_network_interface(&mut c, iface("eth1", "tap0", None))
            .unwrap_err();
        assert_eq!(
            e.message,
            "Network config error: The host device name tap0 is already in use."
        );
        let e = PreBootResources::put_network_interface(
            &mut c,
            iface("eth1", "tap1", Some("06:00:00:00:00:01")),
        )
        .unwrap_err();
        assert_eq!(
            e.message,
            "Network config error: The guest MAC address 06:00:00:00:00:01 is already in use."
        );
        // Same id: replaced, even with the same tap.
        PreBootResources::put_network_interface(&mut c, iface("eth0", "tap0", None)).unwrap();
        assert_eq!(c.network_interfaces.len(), 1);
        assert_eq!(c.network_interfaces[0].guest_mac, None);
    }

    #[test]
    fn sections_go_through_config_validation() {
        // Whatever VmConfig::validate refuses, the API refuses with the same
        // words, and the configuration stays unchanged.
        let f = kernel();
        let mut r = PreBootResources::new("vm");
        let actions = [
            VmmAction::PutDrive(Drive {
                drive_id: "rootfs".into(),
                path_on_host: Some(f.path().to_path_buf()),
                is_root_device: true,
                partuuid: None,
                is_read_only: Some(true),
                cache_type: Default::default(),
                io_engine: Default::default(),
                rate_limiter: None,
                socket: None,
            }),
            VmmAction::PutVsock(Vsock {
                guest_cid: 3,
                uds_path: PathBuf::from("/tmp/v.sock"),
                vsock_id: None,
            }),
            VmmAction::PutMetrics(Metrics {
                metrics_path: PathBuf::from("/tmp/m"),
                emit_id: false,
                properties: None,
            }),
        ];
        for a in actions {
            let mut expected = r.config().clone();
            match &a {
                VmmAction::PutDrive(d) => expected.drives.push(d.clone()),
                VmmAction::PutVsock(v) => expected.vsock = Some(v.clone()),
                VmmAction::PutMetrics(m) => expected.metrics = Some(m.clone()),
                _ => unreachable!(),
            }
            let before = r.config().clone();
            match (r.handle(a), expected.validate()) {
                (Ok(VmmData::Empty), Ok(())) => assert_eq!(r.config(), &expected),
                (Err(e), Err(ce)) => {
                    assert_eq!(e.status, 400);
                    assert!(
                        e.message
                            .ends_with(&ce.to_string().replace("invalid config file: ", "")),
                        "{} / {ce}",
                        e.message
                    );
                    assert_eq!(r.config(), &before);
                }
                (got, want) => panic!("API {got:?} but config file {want:?}"),
            }
        }
    }

    #[test]
    fn one_cpu_template_at_a_time_as_in_firecracker() {
        use ember_config::{CustomCpuTemplate, StaticCpuTemplate};
        let mut r = PreBootResources::new("vm");
        let custom = CustomCpuTemplate::from_json(
            br#"{"msr_modifiers": [{"addr": "0x277", "bitmap": "0b100"}]}"#,
        )
        .unwrap();
        let m = |t: Option<StaticCpuTemplate>| MachineConfig {
            cpu_template: t,
            ..MachineConfig::default()
        };
        r.handle(VmmAction::PutMachineConfig(m(Some(StaticCpuTemplate::T2A))))
            .unwrap();
        assert_eq!(
            r.config().machine_config.static_template(),
            Some(StaticCpuTemplate::T2A)
        );
        // A PUT without the field keeps it.
        r.handle(VmmAction::PutMachineConfig(m(None))).unwrap();
        assert_eq!(
            r.config().machine_config.static_template(),
            Some(StaticCpuTemplate::T2A)
        );
        // A custom template replaces it, and is kept by a PUT without the field.
        r.handle(VmmAction::PutCpuConfig(custom.clone())).unwrap();
        assert_eq!(r.config().machine_config.cpu_template, None);
        assert_eq!(r.config().cpu_config.as_ref(), Some(&custom));
        r.handle(VmmAction::PutMachineConfig(m(None))).unwrap();
        assert_eq!(r.config().cpu_config.as_ref(), Some(&custom));
        match r.handle(VmmAction::GetMachineConfig).unwrap() {
            VmmData::MachineConfig(mc) => assert_eq!(mc.cpu_template, None),
            other => panic!("{other:?}"),
        }
        // A static one replaces the custom one; "None" clears everything.
        r.handle(VmmAction::PatchMachineConfig(MachineConfigUpdate {
            cpu_template: Some(StaticCpuTemplate::T2),
            ..Default::default()
        }))
        .unwrap();
        assert_eq!(r.config().cpu_config, None);
        assert_eq!(
            r.config().machine_config.static_template(),
            Some(StaticCpuTemplate::T2)
        );
        r.handle(VmmAction::PutCpuConfig(custom.clone())).unwrap();
        r.handle(VmmAction::PutMachineConfig(m(Some(
            StaticCpuTemplate::None,
        ))))
        .unwrap();
        assert_eq!(r.config().cpu_config, None);
        assert_eq!(r.config().machine_config.cpu_template, None);
        // Pre-boot only.
        let e =
            check_allowed(&VmmAction::PutCpuConfig(custom), InstanceState::Running).unwrap_err();
        assert_eq!(e.status, 400);
    }

    #[test]
    fn entropy_is_set_before_boot_only() {
        let mut r = PreBootResources::new("vm");
        let limited = ember_config::Entropy {
            rate_limiter: Some(ember_config::RateLimiter {
                bandwidth: Some(ember_config::TokenBucket {
                    size: 4096,
                    one_time_burst: None,
                    refill_time: 100,
                }),
                ops: None,
            }),
        };
        r.handle(VmmAction::PutEntropy(ember_config::Entropy::default()))
            .unwrap();
        assert_eq!(r.config().entropy, Some(ember_config::Entropy::default()));
        // A second PUT replaces the settings, as in Firecracker.
        r.handle(VmmAction::PutEntropy(limited.clone())).unwrap();
        assert_eq!(r.config().entropy, Some(limited.clone()));
        assert_eq!(
            r.config().to_api_json()["entropy"]["rate_limiter"]["bandwidth"]["size"],
            4096
        );
        let e = check_allowed(&VmmAction::PutEntropy(limited), InstanceState::Running).unwrap_err();
        assert_eq!(
            e.message,
            "The requested operation is not supported after starting the microVM."
        );
    }

    #[test]
    fn balloon_is_set_before_boot_and_fits_guest_memory() {
        let mut r = PreBootResources::new("vm");
        let e = r.handle(VmmAction::GetBalloon).unwrap_err();
        assert_eq!(e.message, "Balloon config error: No balloon device found.");
        let b = ember_config::Balloon {
            amount_mib: 64,
            deflate_on_oom: true,
            stats_polling_interval_s: 1,
            ..Default::default()
        };
        r.handle(VmmAction::PutBalloon(b.clone())).unwrap();
        assert_eq!(
            r.handle(VmmAction::GetBalloon).unwrap(),
            VmmData::Balloon(b.clone())
        );
        assert_eq!(r.config().to_api_json()["balloon"]["amount_mib"], 64);
        // 128 MiB of guest memory by default.
        let too_big = ember_config::Balloon {
            amount_mib: 129,
            ..b.clone()
        };
        let e = r.handle(VmmAction::PutBalloon(too_big)).unwrap_err();
        assert_eq!(
            e.message,
            "Balloon config error: Amount of pages requested is too large."
        );
        let e = r
            .handle(VmmAction::PatchMachineConfig(MachineConfigUpdate {
                mem_size_mib: Some(32),
                ..Default::default()
            }))
            .unwrap_err();
        assert_eq!(
            e.message,
            "Machine config error: The memory size (MiB) is smaller than the previously set balloon device target size."
        );
        assert_eq!(r.config().machine_config.mem_size_mib, 128);
        for runtime in [
            VmmAction::PatchBalloon(crate::BalloonUpdate { amount_mib: 1 }),
            VmmAction::GetBalloonStats,
            VmmAction::PatchBalloonStats(crate::BalloonStatsUpdate {
                stats_polling_interval_s: 2,
            }),
            VmmAction::StartBalloonHinting(crate::StartHintingCmd::default()),
            VmmAction::GetBalloonHintingStatus,
            VmmAction::StopBalloonHinting,
        ] {
            let e = r.handle(runtime).unwrap_err();
            assert_eq!(
                e.message,
                "The requested operation is not supported before starting the microVM."
            );
        }
        let e = check_allowed(&VmmAction::PutBalloon(b), InstanceState::Running).unwrap_err();
        assert_eq!(
            e.message,
            "The requested operation is not supported after starting the microVM."
        );
    }

    #[test]
    fn vsock_cid_and_metrics_once() {
        let mut c = PreBootResources::new("vm");
        let e = err(c.handle(VmmAction::PutVsock(Vsock {
            guest_cid: 2,
            uds_path: PathBuf::from("/v"),
            vsock_id: None,
        })));
        assert!(
            e.message.starts_with("Vsock config error: "),
            "{}",
            e.message
        );
        assert!(e.message.contains("guest_cid is 2,"), "{}", e.message);
        assert!(c.config().vsock.is_none());
        let e = err(c.handle(VmmAction::PutNetworkInterface(NetworkInterface {
            iface_id: "eth0".into(),
            host_dev_name: "tap0".into(),
            guest_mac: Some("zz".into()),
            mtu: None,
            rx_rate_limiter: None,
            tx_rate_limiter: None,
        })));
        assert!(
            e.message.starts_with("Network config error: "),
            "{}",
            e.message
        );
        assert!(c.config().network_interfaces.is_empty());
        // Metrics may be set once; simulate an accepted first PUT.
        c.config.metrics = Some(Metrics {
            metrics_path: PathBuf::from("/m"),
            emit_id: false,
            properties: None,
        });
        let e = err(c.handle(VmmAction::PutMetrics(Metrics {
            metrics_path: PathBuf::from("/m2"),
            emit_id: false,
            properties: None,
        })));
        assert_eq!(
            e.message,
            "Metrics error: Reinitialization of metrics not allowed."
        );
    }

    #[test]
    fn serial_output_and_its_rate_limiter_are_recorded() {
        let mut r = PreBootResources::new("vm");
        let serial = Serial {
            serial_out_path: Some(PathBuf::from("/tmp/console.log")),
            rate_limiter: None,
        };
        r.handle(VmmAction::PutSerial(serial.clone())).unwrap();
        assert_eq!(r.config().serial.as_ref(), Some(&serial));
        assert_eq!(
            r.config().serial_output(),
            Some(std::path::Path::new("/tmp/console.log"))
        );
        let limited = Serial {
            rate_limiter: Some(TokenBucket {
                size: 100,
                one_time_burst: None,
                refill_time: 10,
            }),
            ..serial.clone()
        };
        r.handle(VmmAction::PutSerial(limited.clone())).unwrap();
        assert_eq!(r.config().serial.as_ref(), Some(&limited));
        let empty = Serial {
            serial_out_path: Some(PathBuf::new()),
            rate_limiter: None,
        };
        let e = err(r.handle(VmmAction::PutSerial(empty)));
        assert_eq!(e.status, 400);
        assert_eq!(
            e.message,
            "Serial config error: serial: serial_out_path is empty"
        );
        assert_eq!(r.config().serial.as_ref(), Some(&limited));
        // Not a section of GET /vm/config, as in Firecracker.
        let text = serde_json::to_string(r.config()).unwrap();
        assert!(!text.contains("console.log"), "{text}");
    }

    #[test]
    fn logger_is_recorded_and_runtime_actions_refused() {
        let mut r = PreBootResources::new("vm");
        let l = Logger {
            log_path: Some(PathBuf::from("/l")),
            ..Logger::default()
        };
        r.handle(VmmAction::PutLogger(l.clone())).unwrap();
        assert_eq!(r.config().logger.as_ref(), Some(&l));
        for a in [
            VmmAction::Pause,
            VmmAction::Resume,
            VmmAction::SendCtrlAltDel,
        ] {
            assert_eq!(
                err(r.handle(a)).message,
                "The requested operation is not supported before starting the microVM."
            );
        }
        assert_eq!(err(r.handle(VmmAction::InstanceStart)).status, 500);
    }

    #[test]
    fn patch_drive_after_boot() {
        let f = kernel();
        let g = kernel();
        let mut c = VmConfig::default();
        c.drives.push(Drive {
            drive_id: "rootfs".into(),
            path_on_host: Some(f.path().to_path_buf()),
            is_root_device: true,
            partuuid: None,
            is_read_only: Some(true),
            cache_type: Default::default(),
            io_engine: Default::default(),
            rate_limiter: None,
            socket: None,
        });
        let d = patch_drive(
            &c,
            &DriveUpdate {
                drive_id: "rootfs".into(),
                path_on_host: Some(g.path().to_path_buf()),
                rate_limiter: None,
            },
        )
        .unwrap();
        assert_eq!(d.path_on_host.as_deref(), Some(g.path()));
        assert!(d.is_root_device);
        let e = patch_drive(
            &c,
            &DriveUpdate {
                drive_id: "nope".into(),
                path_on_host: None,
                rate_limiter: None,
            },
        )
        .unwrap_err();
        assert!(e.message.contains("`nope`"), "{}", e.message);
        // A PATCH that names only the drive is an error, as in Firecracker.
        let e = patch_drive(
            &c,
            &DriveUpdate {
                drive_id: "rootfs".into(),
                path_on_host: None,
                rate_limiter: None,
            },
        )
        .unwrap_err();
        assert_eq!(e.status, 400);
        assert!(
            e.message
                .starts_with("Drive config error: Unable to patch the block device: ")
                && e.message.contains("path_on_host or rate_limiter"),
            "{}",
            e.message
        );
    }
}
