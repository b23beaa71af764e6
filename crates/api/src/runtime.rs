//! The runtime controller: Firecracker's post-boot actions (`GET`s,
//! `PATCH /vm`, `PATCH /drives`, `SendCtrlAltDel`, `FlushMetrics`), each
//! checked with [`check_allowed`] first, carried out on the running VM
//! through the [`RuntimeVm`] trait the VMM implements. It is the
//! counterpart of [`PrebootApiController`](crate::PrebootApiController).

use std::error::Error;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use ember_config::{Balloon, RateLimiter, VmConfig};
use ember_logger::metrics::Metrics;

use crate::action::{
    ApiError, BalloonStats, DriveUpdate, HintingStatus, InstanceInfo, InstanceState,
    NetworkInterfaceUpdate, SnapshotCreateParams, SnapshotType, StartHintingCmd, VmmAction,
    VmmData, VmmResponse, FIRECRACKER_API_VERSION,
};
use crate::mmds::SharedMmds;
use crate::preboot::{check_allowed, patch_drive, ActionHandler};

/// Why a running VM refused an action.
#[derive(Debug, thiserror::Error)]
pub enum VmActionError {
    /// The configuration names a drive the VM has no device for.
    #[error("drive `{0}` is configured but has no device")]
    NoSuchDrive(String),
    /// The configuration names a network interface the VM has no device
    /// for.
    #[error("network interface `{0}` is configured but has no device")]
    NoSuchNetworkInterface(String),
    /// The VM has no balloon (Firecracker's words).
    #[error("Failed perform action on device: Device not found")]
    NoBalloon,
    /// The vCPUs or a device failed; the message is theirs.
    #[error(transparent)]
    Failed(Box<dyn Error + Send + Sync>),
}

/// What the API asks of a running VM's balloon.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BalloonRequest {
    /// Its configuration, with the current target.
    Config,
    /// The guest's latest statistics.
    Stats,
    /// A new target in MiB.
    SetTarget(u32),
    /// A new statistics polling interval in seconds.
    SetStatsInterval(u16),
    /// Start a free page hinting run.
    StartHinting(StartHintingCmd),
    /// The hinting run's state.
    HintingStatus,
    /// End the hinting run.
    StopHinting,
}

/// The balloon's answer to a [`BalloonRequest`].
// One value per API request: boxing the statistics would only add an
// allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BalloonAnswer {
    /// Done; nothing to return.
    Done,
    /// For [`BalloonRequest::Config`].
    Config(Balloon),
    /// For [`BalloonRequest::Stats`].
    Stats(BalloonStats),
    /// For [`BalloonRequest::HintingStatus`].
    Hinting(HintingStatus),
}

/// What the runtime controller asks of the running VM.
pub trait RuntimeVm {
    /// Parks every vCPU outside the guest; returns once all are parked.
    fn pause(&mut self) -> Result<(), VmActionError>;
    /// Lets the vCPUs run again; nothing when they run or the VM stops.
    fn resume(&mut self);
    /// Whether the VM is stopping.
    fn is_stopping(&self) -> bool;
    /// Queues Ctrl+Alt+Del on the keyboard controller.
    fn send_ctrl_alt_del(&mut self) -> Result<(), VmActionError>;
    /// Backs the block device `drive_id` with the file at `path`.
    fn replace_drive_file(&mut self, drive_id: &str, path: &Path) -> Result<(), VmActionError>;
    /// Changes the rate limiters of the network interface `iface_id`: each
    /// bucket `rx` or `tx` gives replaces the device's (size or refill time
    /// 0 removes it), each they leave out stays.
    fn update_net_rate_limiters(
        &mut self,
        iface_id: &str,
        rx: Option<&RateLimiter>,
        tx: Option<&RateLimiter>,
    ) -> Result<(), VmActionError>;
    /// Changes the rate limiter of the block device `drive_id`: each bucket
    /// `update` gives replaces the device's (size or refill time 0 removes
    /// it), each it leaves out stays.
    fn update_drive_rate_limiter(
        &mut self,
        drive_id: &str,
        update: &RateLimiter,
    ) -> Result<(), VmActionError>;
    /// Carries out `request` on the balloon: [`VmActionError::NoBalloon`]
    /// without one, [`VmActionError::Failed`] with the device's reason.
    fn balloon(&mut self, request: BalloonRequest) -> Result<BalloonAnswer, VmActionError>;
    /// Writes a full snapshot of the paused VM, which runs with `config`:
    /// its state to `params.snapshot_path`, its memory to
    /// `params.mem_file_path`. Only called on a paused VM, with a Full
    /// snapshot type.
    fn create_snapshot(
        &mut self,
        config: &VmConfig,
        params: &SnapshotCreateParams,
    ) -> Result<(), VmActionError>;
}

/// Firecracker's prefix for a failed runtime GET of the balloon.
const INTERNAL: &str = "Internal VMM error";
/// Firecracker's prefix for a failed balloon change.
const BALLOON_UPDATE: &str = "Balloon update error";

/// Answers API requests once the VM runs.
pub struct RuntimeApiController<V> {
    instance_id: String,
    config: VmConfig,
    vm: V,
    metrics: Option<Arc<Metrics>>,
    state: InstanceState,
    mmds: Option<SharedMmds>,
}

impl<V: RuntimeVm> RuntimeApiController<V> {
    /// The controller of `vm`, which was built from `config` and runs.
    pub fn new(
        instance_id: impl Into<String>,
        config: VmConfig,
        vm: V,
        metrics: Option<Arc<Metrics>>,
    ) -> Self {
        RuntimeApiController {
            instance_id: instance_id.into(),
            config,
            vm,
            metrics,
            state: InstanceState::Running,
            mmds: None,
        }
    }

    /// The controller of a VM restored from a snapshot and left paused.
    pub fn paused(mut self) -> Self {
        self.state = InstanceState::Paused;
        self
    }

    /// `Running` or `Paused`.
    pub fn state(&self) -> InstanceState {
        self.state
    }

    /// The configuration the VM runs with, as `GET /vm/config` shows it.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Serves `/mmds` from `store`, the store the devices answer from.
    pub fn with_mmds(mut self, store: SharedMmds) -> Self {
        self.mmds = Some(store);
        self
    }

    /// The store, if the VM has one: as in Firecracker, only when MMDS was
    /// configured or filled before boot.
    fn mmds(&self) -> Result<&SharedMmds, ApiError> {
        self.mmds
            .as_ref()
            .filter(|m| self.config.mmds_config.is_some() || crate::mmds::lock(m).is_initialized())
            .ok_or_else(|| crate::mmds::error(ember_mmds::MmdsError::NotInitialized))
    }

    fn pause(&mut self) -> VmmResponse {
        if self.state == InstanceState::Paused {
            return Ok(VmmData::Empty);
        }
        let start = Instant::now();
        if let Err(e) = self.vm.pause() {
            // A vCPU that did not park must not stay half-paused.
            self.vm.resume();
            return Err(ApiError::bad_request(format!(
                "Failed to pause the microVM: {e}"
            )));
        }
        let us = elapsed_us(start);
        self.state = InstanceState::Paused;
        if let Some(m) = &self.metrics {
            m.latencies().vmm_pause_vm.set(us);
        }
        log::info!("microVM paused ({us} us)");
        Ok(VmmData::Empty)
    }

    fn resume(&mut self) -> VmmResponse {
        if self.state == InstanceState::Running {
            return Ok(VmmData::Empty);
        }
        if self.vm.is_stopping() {
            return Err(ApiError::bad_request(
                "Failed to resume the microVM: the VM is stopping",
            ));
        }
        let start = Instant::now();
        self.vm.resume();
        let us = elapsed_us(start);
        self.state = InstanceState::Running;
        if let Some(m) = &self.metrics {
            m.latencies().vmm_resume_vm.set(us);
        }
        log::info!("microVM resumed ({us} us)");
        Ok(VmmData::Empty)
    }

    fn create_snapshot(&mut self, params: &SnapshotCreateParams) -> VmmResponse {
        const P: &str = "Create snapshot error";
        if self.state != InstanceState::Paused {
            return Err(ApiError::bad_request(format!(
                "{P}: Cannot save the microVM state: Operation not allowed: save/restore unavailable while running"
            )));
        }
        if params.snapshot_type == SnapshotType::Diff {
            return Err(ApiError::bad_request(format!(
                "{P}: Diff snapshots are not supported by Ember: create a Full snapshot"
            )));
        }
        let start = Instant::now();
        self.vm
            .create_snapshot(&self.config, params)
            .map_err(|e| ApiError::bad_request(format!("{P}: {e}")))?;
        let us = elapsed_us(start);
        if let Some(m) = &self.metrics {
            m.latencies().vmm_full_create_snapshot.set(us);
        }
        log::info!("'create full snapshot' VMM action took {us} us.");
        Ok(VmmData::Empty)
    }

    fn patch_drive(&mut self, update: &DriveUpdate) -> VmmResponse {
        let drive = patch_drive(&self.config, update)?;
        let Some(index) = self
            .config
            .drives
            .iter()
            .position(|d| d.drive_id == update.drive_id)
        else {
            // patch_drive found it: the configuration did not change since.
            return Err(ApiError::internal(format!(
                "drive `{}` vanished from the configuration",
                update.drive_id
            )));
        };
        if let Some(path) = &update.path_on_host {
            match self.vm.replace_drive_file(&update.drive_id, path) {
                Ok(()) => {}
                Err(e @ (VmActionError::NoSuchDrive(_) | VmActionError::NoSuchNetworkInterface(_) | VmActionError::NoBalloon)) => {
                    return Err(ApiError::internal(e.to_string()))
                }
                Err(VmActionError::Failed(e)) => {
                    return Err(ApiError::bad_request(format!(
                        "Drive config error: Unable to patch the block device: {e}. Please verify the request arguments."
                    )))
                }
            }
            log::info!(
                "drive `{}` now backed by {}",
                update.drive_id,
                path.display()
            );
        }
        if let Some(rl) = &update.rate_limiter {
            match self.vm.update_drive_rate_limiter(&update.drive_id, rl) {
                Ok(()) => {}
                Err(e @ (VmActionError::NoSuchDrive(_) | VmActionError::NoSuchNetworkInterface(_) | VmActionError::NoBalloon)) => {
                    return Err(ApiError::internal(e.to_string()))
                }
                Err(VmActionError::Failed(e)) => {
                    return Err(ApiError::bad_request(format!(
                        "Drive config error: Unable to patch the block device: {e}. Please verify the request arguments."
                    )))
                }
            }
            log::info!("drive `{}`: rate limiter updated", update.drive_id);
        }
        self.config.drives[index] = drive;
        Ok(VmmData::Empty)
    }
}

impl<V: RuntimeVm> RuntimeApiController<V> {
    /// One balloon request; a failure is answered with `prefix`, as
    /// Firecracker prefixes its VMM errors.
    fn balloon(&mut self, request: BalloonRequest, prefix: &str) -> VmmResponse {
        let answer = self
            .vm
            .balloon(request)
            .map_err(|e| ApiError::bad_request(format!("{prefix}: {e}")))?;
        // GET /vm/config follows the live balloon.
        if let Some(b) = &mut self.config.balloon {
            match request {
                BalloonRequest::SetTarget(mib) => b.amount_mib = mib,
                BalloonRequest::SetStatsInterval(s) => b.stats_polling_interval_s = s,
                _ => {}
            }
        }
        Ok(match answer {
            BalloonAnswer::Done => VmmData::Empty,
            BalloonAnswer::Config(b) => VmmData::Balloon(b),
            BalloonAnswer::Stats(s) => VmmData::BalloonStats(s),
            BalloonAnswer::Hinting(h) => VmmData::HintingStatus(h),
        })
    }
}

/// `base` with the buckets `update` gives (Firecracker's per-bucket
/// update: an absent bucket stays as it was).
fn merge_rate_limiter(
    base: Option<RateLimiter>,
    update: Option<&RateLimiter>,
) -> Option<RateLimiter> {
    let Some(update) = update else {
        return base;
    };
    let mut merged = base.unwrap_or_default();
    if update.bandwidth.is_some() {
        merged.bandwidth = update.bandwidth.clone();
    }
    if update.ops.is_some() {
        merged.ops = update.ops.clone();
    }
    Some(merged)
}

fn elapsed_us(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX)
}

impl<V: RuntimeVm> RuntimeApiController<V> {
    fn patch_network_interface(&mut self, update: &NetworkInterfaceUpdate) -> VmmResponse {
        let Some(index) = self
            .config
            .network_interfaces
            .iter()
            .position(|n| n.iface_id == update.iface_id)
        else {
            return Err(ApiError::bad_request(format!(
                "Network interface config error: no network interface has the id `{}`.",
                update.iface_id
            )));
        };
        if update.rx_rate_limiter.is_none() && update.tx_rate_limiter.is_none() {
            return Ok(VmmData::Empty);
        }
        self.vm
            .update_net_rate_limiters(
                &update.iface_id,
                update.rx_rate_limiter.as_ref(),
                update.tx_rate_limiter.as_ref(),
            )
            .map_err(|e| match e {
                VmActionError::Failed(e) => {
                    ApiError::bad_request(format!("Network interface config error: {e}"))
                }
                other => ApiError::internal(other.to_string()),
            })?;
        let iface = &mut self.config.network_interfaces[index];
        iface.rx_rate_limiter = merge_rate_limiter(
            iface.rx_rate_limiter.take(),
            update.rx_rate_limiter.as_ref(),
        );
        iface.tx_rate_limiter = merge_rate_limiter(
            iface.tx_rate_limiter.take(),
            update.tx_rate_limiter.as_ref(),
        );
        log::info!(
            "network interface `{}`: rate limiters updated",
            update.iface_id
        );
        Ok(VmmData::Empty)
    }
}

impl<V: RuntimeVm> ActionHandler for RuntimeApiController<V> {
    fn handle(&mut self, action: VmmAction) -> VmmResponse {
        check_allowed(&action, self.state)?;
        match action {
            VmmAction::GetInstanceInfo => Ok(VmmData::InstanceInfo(InstanceInfo::new(
                self.instance_id.clone(),
                self.state,
            ))),
            VmmAction::GetVersion => Ok(VmmData::Version(FIRECRACKER_API_VERSION.to_string())),
            VmmAction::GetVmConfig => Ok(VmmData::VmConfig(self.config.clone())),
            VmmAction::GetMachineConfig => {
                Ok(VmmData::MachineConfig(self.config.machine_config.clone()))
            }
            VmmAction::GetMmds => crate::mmds::get(self.mmds()?),
            VmmAction::PutMmds(value) => crate::mmds::put(self.mmds()?, value),
            VmmAction::PatchMmds(value) => crate::mmds::patch(self.mmds()?, &value),
            VmmAction::Pause => self.pause(),
            VmmAction::Resume => self.resume(),
            VmmAction::SendCtrlAltDel => {
                self.vm.send_ctrl_alt_del().map_err(|e| {
                    ApiError::bad_request(format!("Failed to send Ctrl+Alt+Del: {e}"))
                })?;
                log::info!("sent Ctrl+Alt+Del to the guest");
                Ok(VmmData::Empty)
            }
            VmmAction::FlushMetrics => {
                if let Some(m) = &self.metrics {
                    m.flush().map_err(|e| {
                        ApiError::bad_request(format!("Failed to write the metrics: {e}"))
                    })?;
                }
                Ok(VmmData::Empty)
            }
            VmmAction::PatchDrive(update) => self.patch_drive(&update),
            VmmAction::PatchNetworkInterface(update) => self.patch_network_interface(&update),
            VmmAction::CreateSnapshot(params) => self.create_snapshot(&params),
            VmmAction::GetBalloon => self.balloon(BalloonRequest::Config, INTERNAL),
            VmmAction::GetBalloonStats => self.balloon(BalloonRequest::Stats, INTERNAL),
            VmmAction::GetBalloonHintingStatus => {
                self.balloon(BalloonRequest::HintingStatus, BALLOON_UPDATE)
            }
            VmmAction::PatchBalloon(u) => {
                self.balloon(BalloonRequest::SetTarget(u.amount_mib), BALLOON_UPDATE)
            }
            VmmAction::PatchBalloonStats(u) => self.balloon(
                BalloonRequest::SetStatsInterval(u.stats_polling_interval_s),
                BALLOON_UPDATE,
            ),
            VmmAction::StartBalloonHinting(cmd) => {
                self.balloon(BalloonRequest::StartHinting(cmd), BALLOON_UPDATE)
            }
            VmmAction::StopBalloonHinting => {
                self.balloon(BalloonRequest::StopHinting, BALLOON_UPDATE)
            }
            // Configuration calls: `check_allowed` refused them above.
            VmmAction::PutBootSource(_)
            | VmmAction::PutMachineConfig(_)
            | VmmAction::PatchMachineConfig(_)
            | VmmAction::PutDrive(_)
            | VmmAction::PutNetworkInterface(_)
            | VmmAction::PutVsock(_)
            | VmmAction::PutEntropy(_)
            | VmmAction::PutCpuConfig(_)
            | VmmAction::PutMmdsConfig(_)
            | VmmAction::PutBalloon(_)
            | VmmAction::PutLogger(_)
            | VmmAction::PutMetrics(_)
            | VmmAction::PutSerial(_)
            | VmmAction::LoadSnapshot(_)
            | VmmAction::InstanceStart => Err(ApiError::not_supported_post_boot()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use ember_config::{BootSource, Drive, Logger, TokenBucket};

    use crate::NetworkInterfaceUpdate;

    use super::*;
    use crate::MachineConfigUpdate;

    /// A scripted VM: records what the controller asked, answers as the
    /// script says. What the real VM does with each call (vCPUs parked,
    /// scan codes queued, the drive's capacity) is tested end to end with
    /// the `ember` binary.
    #[derive(Default)]
    struct FakeVm {
        calls: Vec<String>,
        /// Pause fails, as when a vCPU cannot be parked.
        stopping: bool,
        /// Drive ids the VM has devices for.
        drives: Vec<String>,
        /// The snapshot requests that reached the VM.
        snapshots: Vec<SnapshotCreateParams>,
        /// The balloon, if the VM has one.
        balloon: Option<Balloon>,
    }

    impl RuntimeVm for FakeVm {
        fn pause(&mut self) -> Result<(), VmActionError> {
            self.calls.push("pause".into());
            if self.stopping {
                return Err(VmActionError::Failed("the VM is stopping".into()));
            }
            Ok(())
        }

        fn resume(&mut self) {
            self.calls.push("resume".into());
        }

        fn is_stopping(&self) -> bool {
            self.stopping
        }

        fn send_ctrl_alt_del(&mut self) -> Result<(), VmActionError> {
            self.calls.push("ctrl_alt_del".into());
            Ok(())
        }

        fn replace_drive_file(&mut self, id: &str, path: &Path) -> Result<(), VmActionError> {
            self.calls.push(format!("replace {id} {}", path.display()));
            if !self.drives.iter().any(|d| d == id) {
                return Err(VmActionError::NoSuchDrive(id.to_string()));
            }
            std::fs::File::open(path)
                .map(drop)
                .map_err(|e| VmActionError::Failed(format!("{}: {e}", path.display()).into()))
        }

        fn update_net_rate_limiters(
            &mut self,
            id: &str,
            rx: Option<&RateLimiter>,
            tx: Option<&RateLimiter>,
        ) -> Result<(), VmActionError> {
            let size = |r: Option<&RateLimiter>| r.map(|r| r.bandwidth.as_ref().map(|b| b.size));
            self.calls
                .push(format!("net {id} rx={:?} tx={:?}", size(rx), size(tx)));
            if id != "eth0" {
                return Err(VmActionError::NoSuchNetworkInterface(id.to_string()));
            }
            Ok(())
        }

        fn update_drive_rate_limiter(
            &mut self,
            id: &str,
            update: &RateLimiter,
        ) -> Result<(), VmActionError> {
            self.calls.push(format!(
                "rate_limiter {id} bandwidth={:?} ops={:?}",
                update.bandwidth.as_ref().map(|b| b.size),
                update.ops.as_ref().map(|b| b.size)
            ));
            if !self.drives.iter().any(|d| d == id) {
                return Err(VmActionError::NoSuchDrive(id.to_string()));
            }
            Ok(())
        }

        fn create_snapshot(
            &mut self,
            _config: &VmConfig,
            params: &SnapshotCreateParams,
        ) -> Result<(), VmActionError> {
            self.snapshots.push(params.clone());
            Ok(())
        }

        fn balloon(&mut self, request: BalloonRequest) -> Result<BalloonAnswer, VmActionError> {
            self.calls.push(format!("balloon {request:?}"));
            let b = self.balloon.as_mut().ok_or(VmActionError::NoBalloon)?;
            match request {
                BalloonRequest::Config => Ok(BalloonAnswer::Config(b.clone())),
                BalloonRequest::SetTarget(mib) if mib > 128 => Err(VmActionError::Failed(
                    format!("Balloon: Requested memory should be less than {mib}MiB").into(),
                )),
                BalloonRequest::SetTarget(mib) => {
                    b.amount_mib = mib;
                    Ok(BalloonAnswer::Done)
                }
                BalloonRequest::SetStatsInterval(s) => {
                    b.stats_polling_interval_s = s;
                    Ok(BalloonAnswer::Done)
                }
                BalloonRequest::Stats => Ok(BalloonAnswer::Stats(BalloonStats {
                    target_mib: b.amount_mib,
                    ..Default::default()
                })),
                BalloonRequest::HintingStatus => {
                    Ok(BalloonAnswer::Hinting(HintingStatus::default()))
                }
                BalloonRequest::StartHinting(_) | BalloonRequest::StopHinting => {
                    Ok(BalloonAnswer::Done)
                }
            }
        }
    }

    #[test]
    fn balloon_requests_reach_the_device_and_the_configuration_follows() {
        let b = Balloon {
            amount_mib: 16,
            deflate_on_oom: false,
            stats_polling_interval_s: 1,
            ..Default::default()
        };
        let config = VmConfig {
            balloon: Some(b.clone()),
            ..Default::default()
        };
        let vm = FakeVm {
            balloon: Some(b.clone()),
            ..Default::default()
        };
        let mut c = RuntimeApiController::new("vm", config, vm, None);
        assert_eq!(
            c.handle(VmmAction::GetBalloon).unwrap(),
            VmmData::Balloon(b)
        );
        c.handle(VmmAction::PatchBalloon(crate::BalloonUpdate {
            amount_mib: 32,
        }))
        .unwrap();
        c.handle(VmmAction::PatchBalloonStats(crate::BalloonStatsUpdate {
            stats_polling_interval_s: 4,
        }))
        .unwrap();
        let live = c.config().balloon.clone().unwrap();
        assert_eq!((live.amount_mib, live.stats_polling_interval_s), (32, 4));
        let VmmData::BalloonStats(s) = c.handle(VmmAction::GetBalloonStats).unwrap() else {
            panic!("no statistics");
        };
        assert_eq!(s.target_mib, 32);
        let e = c
            .handle(VmmAction::PatchBalloon(crate::BalloonUpdate {
                amount_mib: 200,
            }))
            .unwrap_err();
        assert_eq!(
            e.message,
            "Balloon update error: Balloon: Requested memory should be less than 200MiB"
        );
        assert_eq!(c.config().balloon.as_ref().unwrap().amount_mib, 32);
        let e = c
            .handle(VmmAction::PutBalloon(Balloon::default()))
            .unwrap_err();
        assert_eq!(
            e.message,
            "The requested operation is not supported after starting the microVM."
        );

        let mut none =
            RuntimeApiController::new("vm", VmConfig::default(), FakeVm::default(), None);
        let e = none.handle(VmmAction::GetBalloon).unwrap_err();
        assert_eq!(
            e.message,
            "Internal VMM error: Failed perform action on device: Device not found"
        );
        let e = none.handle(VmmAction::StopBalloonHinting).unwrap_err();
        assert_eq!(
            e.message,
            "Balloon update error: Failed perform action on device: Device not found"
        );
    }

    struct Setup {
        dir: tempfile::TempDir,
        api: RuntimeApiController<FakeVm>,
        metrics: Arc<Metrics>,
    }

    fn image(dir: &Path, name: &str, len: u64) -> PathBuf {
        let path = dir.join(name);
        std::fs::File::create(&path).unwrap().set_len(len).unwrap();
        path
    }

    fn setup() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let disk = image(dir.path(), "disk.img", 1 << 20);
        let config = VmConfig {
            boot_source: Some(BootSource {
                kernel_image_path: PathBuf::from("/k"),
                initrd_path: None,
                boot_args: None,
            }),
            drives: vec![Drive {
                drive_id: "rootfs".into(),
                path_on_host: Some(disk),
                is_root_device: true,
                partuuid: None,
                is_read_only: Some(false),
                cache_type: Default::default(),
                io_engine: Default::default(),
                rate_limiter: None,
                socket: None,
            }],
            network_interfaces: vec![
                serde_json::from_str(r#"{"iface_id": "eth0", "host_dev_name": "tap0"}"#).unwrap(),
                serde_json::from_str(r#"{"iface_id": "gone", "host_dev_name": "tap1"}"#).unwrap(),
            ],
            ..VmConfig::default()
        };
        let metrics = Arc::new(Metrics::new());
        let vm = FakeVm {
            drives: vec!["rootfs".into()],
            ..FakeVm::default()
        };
        let api = RuntimeApiController::new("vm-7", config, vm, Some(metrics.clone()));
        Setup { dir, api, metrics }
    }

    #[test]
    fn the_store_is_served_at_runtime_only_if_mmds_was_set_up() {
        use serde_json::json;
        let store = SharedMmds::default();
        let mut api = setup().api.with_mmds(store.clone());
        for a in [
            VmmAction::GetMmds,
            VmmAction::PutMmds(json!({"a": 1})),
            VmmAction::PatchMmds(json!({"a": 1})),
        ] {
            let e = api.handle(a).unwrap_err();
            assert_eq!(
                (e.status, e.message.as_str()),
                (400, "MMDS error: The MMDS data store is not initialized.")
            );
        }
        store.lock().unwrap().put_data(json!({"a": 1})).unwrap();
        api.handle(VmmAction::PatchMmds(json!({"b": 2}))).unwrap();
        assert_eq!(
            api.handle(VmmAction::GetMmds).unwrap(),
            VmmData::MmdsValue(json!({"a": 1, "b": 2}))
        );
        api.handle(VmmAction::PutMmds(json!({"c": 3}))).unwrap();
        assert_eq!(store.lock().unwrap().data_store_value(), &json!({"c": 3}));
        assert_eq!(
            api.handle(VmmAction::PutMmdsConfig(Default::default()))
                .unwrap_err()
                .message,
            "The requested operation is not supported after starting the microVM."
        );
    }

    fn state(api: &mut RuntimeApiController<FakeVm>) -> InstanceState {
        match api.handle(VmmAction::GetInstanceInfo) {
            Ok(VmmData::InstanceInfo(info)) => {
                assert_eq!(info.id, "vm-7");
                info.state
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn pause_and_resume_change_the_state_and_time_it() {
        let mut s = setup();
        assert_eq!(state(&mut s.api), InstanceState::Running);
        s.api.handle(VmmAction::Pause).unwrap();
        assert_eq!(state(&mut s.api), InstanceState::Paused);
        // Idempotent, as in Firecracker.
        s.api.handle(VmmAction::Pause).unwrap();
        s.api.handle(VmmAction::Resume).unwrap();
        assert_eq!(state(&mut s.api), InstanceState::Running);
        s.api.handle(VmmAction::Resume).unwrap();
        let line: serde_json::Value = serde_json::from_str(&s.metrics.render()).unwrap();
        assert!(line["latencies_us"]["vmm_pause_vm"].is_u64(), "{line}");

        assert_eq!(s.api.vm.calls, ["pause", "resume"]);

        // A stopping VM cannot be paused, and the state stays.
        s.api.vm.stopping = true;
        let e = s.api.handle(VmmAction::Pause).unwrap_err();
        assert_eq!(e.status, 400);
        assert!(
            e.message.starts_with("Failed to pause the microVM"),
            "{}",
            e.message
        );
        assert_eq!(state(&mut s.api), InstanceState::Running);
        // The failed pause did not leave the vCPUs half-paused.
        assert_eq!(s.api.vm.calls, ["pause", "resume", "pause", "resume"]);
    }

    #[test]
    fn snapshots_are_taken_only_of_a_paused_vm_and_only_full() {
        let mut s = setup();
        let full = SnapshotCreateParams {
            snapshot_type: SnapshotType::Full,
            snapshot_path: PathBuf::from("/s"),
            mem_file_path: PathBuf::from("/m"),
        };
        let e = s
            .api
            .handle(VmmAction::CreateSnapshot(full.clone()))
            .unwrap_err();
        assert_eq!(e.status, 400);
        assert!(
            e.message.contains("save/restore unavailable while running"),
            "{}",
            e.message
        );
        s.api.handle(VmmAction::Pause).unwrap();
        let diff = SnapshotCreateParams {
            snapshot_type: SnapshotType::Diff,
            ..full.clone()
        };
        let e = s.api.handle(VmmAction::CreateSnapshot(diff)).unwrap_err();
        assert!(
            e.message.contains("Diff snapshots are not supported"),
            "{}",
            e.message
        );
        assert!(s.api.vm.snapshots.is_empty());
        s.api
            .handle(VmmAction::CreateSnapshot(full.clone()))
            .unwrap();
        assert_eq!(s.api.vm.snapshots, [full]);
        let line: serde_json::Value = serde_json::from_str(&s.metrics.render()).unwrap();
        assert!(
            line["latencies_us"]["vmm_full_create_snapshot"].is_u64(),
            "{line}"
        );
        // Loading is for a fresh process only.
        let e = s
            .api
            .handle(VmmAction::LoadSnapshot(crate::SnapshotLoadParams {
                snapshot_path: PathBuf::from("/s"),
                mem_backend: crate::MemBackend {
                    backend_type: crate::MemBackendType::File,
                    backend_path: PathBuf::from("/m"),
                },
                track_dirty_pages: false,
                resume_vm: false,
                network_overrides: vec![],
                vsock_override: None,
                clock_realtime: false,
                huge_pages: Default::default(),
            }))
            .unwrap_err();
        assert_eq!(e, ApiError::not_supported_post_boot());
    }

    #[test]
    fn configuration_calls_are_refused_after_boot() {
        let mut s = setup();
        for action in [
            VmmAction::InstanceStart,
            VmmAction::PutLogger(Logger::default()),
            VmmAction::PatchMachineConfig(MachineConfigUpdate {
                vcpu_count: Some(2),
                ..Default::default()
            }),
        ] {
            let e = s.api.handle(action).unwrap_err();
            assert_eq!(
                e.message,
                "The requested operation is not supported after starting the microVM."
            );
        }
        assert!(matches!(
            s.api.handle(VmmAction::GetVersion),
            Ok(VmmData::Version(v)) if v == FIRECRACKER_API_VERSION
        ));
        assert!(matches!(
            s.api.handle(VmmAction::GetMachineConfig),
            Ok(VmmData::MachineConfig(m)) if m.vcpu_count == 1
        ));
    }

    #[test]
    fn ctrl_alt_del_reaches_the_vm() {
        let mut s = setup();
        s.api.handle(VmmAction::SendCtrlAltDel).unwrap();
        assert_eq!(s.api.vm.calls, ["ctrl_alt_del"]);
    }

    #[test]
    fn patch_drive_swaps_the_file_and_updates_the_config() {
        let mut s = setup();
        let bigger = image(s.dir.path(), "bigger.img", 4 << 20);
        s.api
            .handle(VmmAction::PatchDrive(DriveUpdate {
                drive_id: "rootfs".into(),
                path_on_host: Some(bigger.clone()),
                rate_limiter: None,
            }))
            .unwrap();
        assert_eq!(
            s.api.vm.calls,
            [format!("replace rootfs {}", bigger.display())]
        );
        assert_eq!(
            s.api.config().drives[0].path_on_host.as_ref(),
            Some(&bigger)
        );
        match s.api.handle(VmmAction::GetVmConfig) {
            Ok(VmmData::VmConfig(c)) => assert_eq!(c.drives[0].path_on_host, Some(bigger.clone())),
            other => panic!("{other:?}"),
        }

        let missing = s.dir.path().join("missing.img");
        let e = s
            .api
            .handle(VmmAction::PatchDrive(DriveUpdate {
                drive_id: "rootfs".into(),
                path_on_host: Some(missing.clone()),
                rate_limiter: None,
            }))
            .unwrap_err();
        assert_eq!(e.status, 400);
        assert!(
            e.message.contains(missing.to_str().unwrap()),
            "{}",
            e.message
        );
        // A refused file leaves the configuration as it was.
        assert_eq!(
            s.api.config().drives[0].path_on_host.as_ref(),
            Some(&bigger)
        );

        let e = s
            .api
            .handle(VmmAction::PatchDrive(DriveUpdate {
                drive_id: "other".into(),
                path_on_host: Some(bigger),
                rate_limiter: None,
            }))
            .unwrap_err();
        assert!(
            e.message.contains("no drive has the id `other`"),
            "{}",
            e.message
        );
    }

    #[test]
    fn patch_drive_rate_limiter_reaches_the_device_and_merges_per_bucket() {
        let mut s = setup();
        let bucket = |size| TokenBucket {
            size,
            one_time_burst: None,
            refill_time: 100,
        };
        let patch = |rl: RateLimiter| {
            VmmAction::PatchDrive(DriveUpdate {
                drive_id: "rootfs".into(),
                path_on_host: None,
                rate_limiter: Some(rl),
            })
        };
        s.api
            .handle(patch(RateLimiter {
                bandwidth: Some(bucket(4096)),
                ops: Some(bucket(10)),
            }))
            .unwrap();
        // Only ops changes: bandwidth stays in the configuration.
        s.api
            .handle(patch(RateLimiter {
                bandwidth: None,
                ops: Some(bucket(20)),
            }))
            .unwrap();
        assert_eq!(
            s.api.vm.calls,
            [
                "rate_limiter rootfs bandwidth=Some(4096) ops=Some(10)",
                "rate_limiter rootfs bandwidth=None ops=Some(20)"
            ]
        );
        let rl = s.api.config().drives[0].rate_limiter.clone().unwrap();
        assert_eq!(rl.bandwidth, Some(bucket(4096)));
        assert_eq!(rl.ops, Some(bucket(20)));

        // A drive the VM has no device for: an error, the config unchanged.
        s.api.vm.drives.clear();
        let e = s
            .api
            .handle(patch(RateLimiter {
                bandwidth: Some(bucket(1)),
                ops: None,
            }))
            .unwrap_err();
        assert_eq!(e.status, 500);
        assert_eq!(
            s.api.config().drives[0]
                .rate_limiter
                .as_ref()
                .unwrap()
                .bandwidth,
            Some(bucket(4096))
        );
    }

    #[test]
    fn patch_network_interface_updates_its_rate_limiters() {
        let mut s = setup();
        let bucket = |size| TokenBucket {
            size,
            one_time_burst: None,
            refill_time: 100,
        };
        let limiter = |size| RateLimiter {
            bandwidth: Some(bucket(size)),
            ops: None,
        };
        let patch = |id: &str, rx: Option<RateLimiter>, tx: Option<RateLimiter>| {
            VmmAction::PatchNetworkInterface(NetworkInterfaceUpdate {
                iface_id: id.into(),
                rx_rate_limiter: rx,
                tx_rate_limiter: tx,
            })
        };
        s.api
            .handle(patch("eth0", Some(limiter(1000)), None))
            .unwrap();
        s.api
            .handle(patch("eth0", None, Some(limiter(2000))))
            .unwrap();
        assert_eq!(
            s.api.vm.calls,
            [
                "net eth0 rx=Some(Some(1000)) tx=None",
                "net eth0 rx=None tx=Some(Some(2000))"
            ]
        );
        let iface = &s.api.config().network_interfaces[0];
        assert_eq!(iface.rx_rate_limiter, Some(limiter(1000)));
        assert_eq!(iface.tx_rate_limiter, Some(limiter(2000)));

        // An interface that is not configured: 400, nothing asked of the VM.
        let e = s
            .api
            .handle(patch("eth9", Some(limiter(1)), None))
            .unwrap_err();
        assert_eq!(e.status, 400);
        assert!(e.message.contains("`eth9`"), "{}", e.message);
        assert_eq!(s.api.vm.calls.len(), 2);
        // Configured but without a device: an internal error, config kept.
        let e = s
            .api
            .handle(patch("gone", Some(limiter(1)), None))
            .unwrap_err();
        assert_eq!(e.status, 500);
        assert_eq!(s.api.config().network_interfaces[1].rx_rate_limiter, None);
    }

    #[test]
    fn flush_metrics_writes_a_line() {
        let mut s = setup();
        // Without a destination there is nothing to write, and no error.
        s.api.handle(VmmAction::FlushMetrics).unwrap();
        let path = s.dir.path().join("metrics.json");
        s.metrics
            .configure(
                &ember_config::Metrics {
                    metrics_path: path.clone(),
                    emit_id: true,
                    properties: None,
                },
                "vm-7",
            )
            .unwrap();
        s.api.handle(VmmAction::FlushMetrics).unwrap();
        s.api.handle(VmmAction::FlushMetrics).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 2, "{text}");
        assert!(text.starts_with("{\"utc_timestamp_ms\":"), "{text}");
    }
}
