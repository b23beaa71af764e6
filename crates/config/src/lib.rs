//! Firecracker's JSON configuration file (`--config-file`), with the same
//! section and field names, parsed strictly and validated once.
//!
//! Unknown fields inside a section and wrong types are rejected with serde's
//! message, which names the field and the position in the file; a top-level
//! key that is not one of Firecracker's sections is ignored, as Firecracker
//! ignores it, and listed in [`VmConfig::unknown_keys`] for a warning.
//! Sections for devices Ember does not have yet are accepted empty (`null`,
//! `[]`, as Firecracker's own `GET /vm/config` writes them) and otherwise
//! rejected with an error that names them.
//!
//! Each device section converts itself into the configuration its device
//! crate builds from (`BlockConfig::from(&drive)`,
//! `NetConfig::try_from(&iface)`, `VsockConfig::from(&vsock)`,
//! `EntropyConfig::from(&entropy)`, `BalloonConfig::from(&balloon)`), so
//! the VMM
//! maps nothing by hand.
//!
//! # Example
//!
//! ```
//! use ember_config::VmConfig;
//! use ember_virtio_blk::BlockConfig;
//!
//! let config = VmConfig::from_json(
//!     r#"{
//!         "boot-source": {"kernel_image_path": "/vmlinux"},
//!         "drives": [{"drive_id": "rootfs", "path_on_host": "/rootfs.ext4",
//!                     "is_root_device": true, "cache_type": "Writeback"}]
//!     }"#,
//! )
//! .unwrap();
//! assert_eq!(config.machine_config.vcpu_count, 1);
//! let block = BlockConfig::from(&config.drives[0]);
//! assert_eq!(block.cache_type, ember_config::CacheType::Writeback);
//! assert_eq!(config.drives[0].root_args().as_deref(), Some("root=/dev/vda rw"));
//! ```

#![deny(missing_docs)]

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

pub use ember_mmds::MmdsVersion;
use ember_virtio_balloon::BalloonConfig;
use ember_virtio_blk::{BlockConfig, BucketSpec, RateLimiterConfig};
use ember_virtio_net::NetConfig;
use ember_virtio_rng::EntropyConfig;
use ember_vsock::VsockConfig;
use serde::{Deserialize, Serialize};

/// Boot arguments used when the configuration gives none: the command line
/// a Firecracker guest gets then, Firecracker's `DEFAULT_KERNEL_CMDLINE`
/// followed by the `pci=off` its builder adds when PCI is not enabled.
///
/// As in Firecracker, it gives the guest no console: `8250.nr_uarts=0`
/// leaves the UART unused. Give `boot_args` with `console=ttyS0` to see one.
pub const DEFAULT_BOOT_ARGS: &str = "reboot=k panic=1 nomodule 8250.nr_uarts=0 i8042.noaux \
                                     i8042.nomux i8042.dumbkbd swiotlb=noforce pci=off";

/// Largest vCPU count Firecracker accepts (its API schema's maximum), the
/// limit the vCPU crate enforces.
pub use ember_vcpu::MAX_VCPUS;

/// Errors of the configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The path given with `--config-file`.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The JSON does not match the schema (unknown field, wrong type, ...).
    #[error("invalid config file: {0}")]
    Parse(#[from] serde_json::Error),
    /// `boot-source` is missing.
    #[error("invalid config file: missing section `boot-source`")]
    MissingBootSource,
    /// A value is out of range or inconsistent.
    #[error("invalid config file: {0}")]
    Invalid(String),
    /// A section that Ember does not implement yet.
    #[error("config section `{0}` is not supported yet by Ember (leave it out, or empty)")]
    NotSupported(&'static str),
}

/// `boot-source`: the kernel, initrd and command line.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    /// Host path of the kernel (ELF vmlinux, PVH ELF or bzImage).
    pub kernel_image_path: PathBuf,
    /// Host path of an initrd.
    #[serde(default)]
    pub initrd_path: Option<PathBuf>,
    /// Kernel command line; [`DEFAULT_BOOT_ARGS`] when absent.
    #[serde(default)]
    pub boot_args: Option<String>,
}

/// `huge_pages` of `machine-config`.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub enum HugePages {
    /// Regular 4 KiB pages.
    #[default]
    None,
    /// Transparent huge pages (madvise).
    Transparent,
    /// Explicit 2 MiB hugetlbfs pages.
    #[serde(rename = "2M")]
    Hugetlbfs2M,
}

/// `machine-config`: vCPUs and memory.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// Number of vCPUs, 1 to 32 (1 or even with SMT).
    pub vcpu_count: u8,
    /// Guest memory in MiB.
    pub mem_size_mib: usize,
    /// Simultaneous multithreading in the guest topology.
    #[serde(default)]
    pub smt: bool,
    /// Dirty page tracking (KVM_MEM_LOG_DIRTY_PAGES) for diff snapshots.
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// Firecracker's static CPU template (deprecated there in favour of
    /// `cpu-config`); `"None"` means none. Checked against the host at boot.
    #[serde(default, skip_serializing_if = "no_static_template")]
    pub cpu_template: Option<StaticCpuTemplate>,
    /// Huge pages backing guest memory; only "None" is supported.
    #[serde(default)]
    pub huge_pages: HugePages,
}

/// True when `machine-config.cpu_template` names no template (absent or
/// `"None"`): Firecracker then leaves the field out of what it shows.
fn no_static_template(t: &Option<StaticCpuTemplate>) -> bool {
    matches!(t, None | Some(StaticCpuTemplate::None))
}

impl MachineConfig {
    /// The static template set, if any (`"None"` is none).
    pub fn static_template(&self) -> Option<StaticCpuTemplate> {
        self.cpu_template.filter(|t| *t != StaticCpuTemplate::None)
    }
}

impl Default for MachineConfig {
    fn default() -> Self {
        // Firecracker's defaults when `machine-config` is absent.
        Self {
            vcpu_count: 1,
            mem_size_mib: 128,
            smt: false,
            track_dirty_pages: false,
            cpu_template: None,
            huge_pages: HugePages::None,
        }
    }
}

pub use ember_cpu_template::{CustomCpuTemplate, StaticCpuTemplate};
pub use ember_virtio_blk::{CacheType, IoEngine};

/// `cache_type` of a drive, as the file spells it: the device's own
/// [`CacheType`], described to serde here.
#[derive(Deserialize, Serialize)]
#[serde(remote = "CacheType")]
enum CacheTypeDef {
    Unsafe,
    Writeback,
}

/// `io_engine` of a drive, as the file spells it: the device's own
/// [`IoEngine`].
#[derive(Deserialize, Serialize)]
#[serde(remote = "IoEngine")]
enum IoEngineDef {
    Sync,
    Async,
}

/// One bucket of Firecracker's token-bucket rate limiter.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TokenBucket {
    /// Bucket size.
    pub size: u64,
    /// Initial burst.
    #[serde(default)]
    pub one_time_burst: Option<u64>,
    /// Refill time in ms.
    pub refill_time: u64,
}

/// Firecracker's rate limiter object.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RateLimiter {
    /// Bandwidth bucket (bytes).
    #[serde(default)]
    pub bandwidth: Option<TokenBucket>,
    /// Operations bucket.
    #[serde(default)]
    pub ops: Option<TokenBucket>,
}

impl From<&TokenBucket> for BucketSpec {
    fn from(b: &TokenBucket) -> Self {
        BucketSpec {
            size: b.size,
            one_time_burst: b.one_time_burst.unwrap_or(0),
            refill_time_ms: b.refill_time,
        }
    }
}

impl From<&RateLimiter> for RateLimiterConfig {
    /// The device's limiter: a bucket with size or refill time 0 limits
    /// nothing, as in Firecracker.
    fn from(r: &RateLimiter) -> Self {
        RateLimiterConfig {
            bandwidth: r.bandwidth.as_ref().map(Into::into),
            ops: r.ops.as_ref().map(Into::into),
        }
    }
}

/// One entry of `drives`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Drive {
    /// Unique id of the drive; also its virtio-blk serial (GET_ID).
    pub drive_id: String,
    /// Host path of the raw image.
    #[serde(default)]
    pub path_on_host: Option<PathBuf>,
    /// Adds `root=` to the command line.
    pub is_root_device: bool,
    /// Partition UUID for `root=PARTUUID=`.
    #[serde(default)]
    pub partuuid: Option<String>,
    /// Read-only drive; absent means read-write, and is written back as
    /// `false`, as Firecracker's `GET /vm/config` shows it.
    #[serde(default, serialize_with = "read_only_or_false")]
    pub is_read_only: Option<bool>,
    /// Flush behaviour.
    #[serde(default, with = "CacheTypeDef")]
    pub cache_type: CacheType,
    /// I/O engine.
    #[serde(default, with = "IoEngineDef")]
    pub io_engine: IoEngine,
    /// Rate limiter.
    #[serde(default)]
    pub rate_limiter: Option<RateLimiter>,
    /// vhost-user socket (not supported).
    #[serde(default)]
    pub socket: Option<PathBuf>,
}

fn lower_case<S: serde::Serializer>(
    value: &Option<String>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match value {
        Some(text) => serializer.serialize_some(&text.to_ascii_lowercase()),
        None => serializer.serialize_none(),
    }
}

fn read_only_or_false<S: serde::Serializer>(
    value: &Option<bool>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.serialize_bool(value.unwrap_or(false))
}

/// One entry of `network-interfaces`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterface {
    /// Unique id of the interface.
    pub iface_id: String,
    /// Host TAP device name.
    pub host_dev_name: String,
    /// Guest MAC address, `xx:xx:xx:xx:xx:xx`; written back in lower case,
    /// as Firecracker writes it.
    #[serde(default, serialize_with = "lower_case")]
    pub guest_mac: Option<String>,
    /// MTU advertised with VIRTIO_NET_F_MTU.
    #[serde(default)]
    pub mtu: Option<u16>,
    /// RX rate limiter.
    #[serde(default)]
    pub rx_rate_limiter: Option<RateLimiter>,
    /// TX rate limiter.
    #[serde(default)]
    pub tx_rate_limiter: Option<RateLimiter>,
}

/// `vsock`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Vsock {
    /// Guest CID (>= 3).
    pub guest_cid: u32,
    /// Host Unix socket path.
    pub uds_path: PathBuf,
    /// Deprecated id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_id: Option<String>,
}

/// `entropy`: the virtio-rng device (Firecracker's `EntropyDeviceConfig`,
/// also the body of `PUT /entropy`).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Entropy {
    /// Rate limiter: `bandwidth` in bytes of random data, `ops` in
    /// requests.
    #[serde(default)]
    pub rate_limiter: Option<RateLimiter>,
}

/// `balloon`: the virtio-balloon device (Firecracker's
/// `BalloonDeviceConfig`, also the body of `PUT /balloon` and what
/// `GET /balloon` answers).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Balloon {
    /// Target balloon size in MiB.
    pub amount_mib: u32,
    /// Let the guest take pages back from the balloon when it runs out of
    /// memory (VIRTIO_BALLOON_F_DEFLATE_ON_OOM).
    pub deflate_on_oom: bool,
    /// Seconds between statistics updates; 0 disables statistics.
    #[serde(default)]
    pub stats_polling_interval_s: u16,
    /// Free page hinting.
    #[serde(default)]
    pub free_page_hinting: bool,
    /// Free page reporting.
    #[serde(default)]
    pub free_page_reporting: bool,
}

impl From<&Balloon> for BalloonConfig {
    fn from(b: &Balloon) -> Self {
        BalloonConfig {
            amount_mib: b.amount_mib,
            deflate_on_oom: b.deflate_on_oom,
            stats_polling_interval_s: b.stats_polling_interval_s,
            free_page_hinting: b.free_page_hinting,
            free_page_reporting: b.free_page_reporting,
        }
    }
}

impl From<BalloonConfig> for Balloon {
    fn from(b: BalloonConfig) -> Self {
        Balloon {
            amount_mib: b.amount_mib,
            deflate_on_oom: b.deflate_on_oom,
            stats_polling_interval_s: b.stats_polling_interval_s,
            free_page_hinting: b.free_page_hinting,
            free_page_reporting: b.free_page_reporting,
        }
    }
}

/// Firecracker's refusal of a balloon target above guest memory.
pub const BALLOON_TOO_LARGE: &str = "Amount of pages requested is too large.";

/// Log levels, Firecracker's names (case-insensitive on input).
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub enum LogLevel {
    /// Errors only.
    Error,
    /// Warnings and errors.
    #[default]
    Warning,
    /// Informational.
    Info,
    /// Debug.
    Debug,
    /// Trace.
    Trace,
    /// Nothing.
    Off,
}

impl std::str::FromStr for LogLevel {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "error" => LogLevel::Error,
            "warning" | "warn" => LogLevel::Warning,
            "info" => LogLevel::Info,
            "debug" => LogLevel::Debug,
            "trace" => LogLevel::Trace,
            "off" => LogLevel::Off,
            _ => {
                return Err(format!(
                "invalid log level `{s}`: expected one of Error, Warning, Info, Debug, Trace, Off"
            ))
            }
        })
    }
}

impl<'de> Deserialize<'de> for LogLevel {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl LogLevel {
    /// The `log` crate filter for this level.
    pub fn filter(self) -> log::LevelFilter {
        match self {
            LogLevel::Error => log::LevelFilter::Error,
            LogLevel::Warning => log::LevelFilter::Warn,
            LogLevel::Info => log::LevelFilter::Info,
            LogLevel::Debug => log::LevelFilter::Debug,
            LogLevel::Trace => log::LevelFilter::Trace,
            LogLevel::Off => log::LevelFilter::Off,
        }
    }
}

/// `logger`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Logger {
    /// Path of a file or named pipe for the log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_path: Option<PathBuf>,
    /// Level.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<LogLevel>,
    /// Print the level in each line.
    #[serde(default)]
    pub show_level: bool,
    /// Print file and line in each line.
    #[serde(default)]
    pub show_log_origin: bool,
    /// Module filter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
}

/// `metrics`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    /// Path of a file or named pipe for metrics lines.
    pub metrics_path: PathBuf,
    /// Emit the instance id.
    #[serde(default)]
    pub emit_id: bool,
    /// Extra properties.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub properties: Option<std::collections::BTreeMap<String, String>>,
}

/// The serial console's host side: Firecracker's `SerialConfig`, the body
/// of `PUT /serial`.
///
/// Not a section of the configuration file and not part of
/// `GET /vm/config`, as in Firecracker.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Serial {
    /// File or named pipe that receives the guest's console output instead
    /// of stdout; the console then reads no input.
    #[serde(default)]
    pub serial_out_path: Option<PathBuf>,
    /// Token bucket for the console output, in bytes: output over it is
    /// dropped and counted (`uart.rate_limiter_dropped_bytes`).
    #[serde(default)]
    pub rate_limiter: Option<TokenBucket>,
}

/// `mmds-config`: Firecracker's `MmdsConfig`, also the body of
/// `PUT /mmds/config`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MmdsConfig {
    /// `V1` (tokens optional, the default) or `V2` (tokens required).
    #[serde(default)]
    pub version: MmdsVersion,
    /// The interfaces (`iface_id`s) the service answers on.
    pub network_interfaces: Vec<String>,
    /// The service's address (default 169.254.169.254): link-local, not in
    /// 169.254.0.0/24 or 169.254.255.0/24.
    #[serde(default)]
    pub ipv4_address: Option<Ipv4Addr>,
    /// Answer IMDS text whatever a request's `Accept` header says.
    #[serde(default)]
    pub imds_compat: bool,
}

impl MmdsConfig {
    /// Firecracker's checks, with its messages: at least one interface,
    /// each one configured, a usable link-local address.
    pub fn validate(&self, interfaces: &[NetworkInterface]) -> Result<(), ConfigError> {
        if let Some(addr) = self.ipv4_address {
            if !is_link_local_valid(addr) {
                return Err(ConfigError::Invalid(
                    "The MMDS IPv4 address is not link local.".into(),
                ));
            }
        }
        if self.network_interfaces.is_empty() {
            return Err(ConfigError::Invalid(
                "The list of network interface IDs that allow forwarding MMDS requests is empty."
                    .into(),
            ));
        }
        if !self
            .network_interfaces
            .iter()
            .all(|id| interfaces.iter().any(|i| &i.iface_id == id))
        {
            return Err(ConfigError::Invalid(
                "The list of network interface IDs provided contains at least one ID that does not correspond to any existing network interface.".into(),
            ));
        }
        Ok(())
    }

    /// The address the service answers at.
    pub fn ipv4_addr(&self) -> Ipv4Addr {
        self.ipv4_address.unwrap_or(ember_mmds::DEFAULT_IPV4_ADDR)
    }

    /// As Firecracker's `GET /vm/config` shows it: the address filled in.
    pub fn as_built(&self) -> MmdsConfig {
        MmdsConfig {
            ipv4_address: Some(self.ipv4_addr()),
            ..self.clone()
        }
    }
}

/// Firecracker's rule for the service's address: 169.254.0.0/16 less its
/// first and last /24 (RFC 3927 §2.1 reserves them).
pub fn is_link_local_valid(addr: Ipv4Addr) -> bool {
    matches!(addr.octets(), [169, 254, 1..=254, _])
}

/// The sections of Firecracker's `VmmConfig`, the keys a configuration
/// file may have at its top level.
pub const SECTIONS: &[&str] = &[
    "balloon",
    "drives",
    "boot-source",
    "cpu-config",
    "logger",
    "machine-config",
    "metrics",
    "mmds-config",
    "network-interfaces",
    "vsock",
    "entropy",
    "pmem",
    "memory-hotplug",
];

/// The whole configuration file: Firecracker's `VmmConfig`.
///
/// Serialized, it is what Firecracker's `GET /vm/config` answers: every
/// section, `null` or `[]` when absent, every field of each device.
///
/// As in Firecracker, a top-level key that is not a section is ignored
/// (Ember also lists it in [`unknown_keys`](Self::unknown_keys), for a
/// warning), while an unknown field inside a section is an error. A section
/// for a device Ember does not have is accepted empty (`null`, `[]`) and
/// refused by name otherwise.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct VmConfig {
    /// `balloon`.
    #[serde(default)]
    pub balloon: Option<Balloon>,
    /// `drives`.
    #[serde(default, deserialize_with = "null_as_default")]
    pub drives: Vec<Drive>,
    /// `boot-source`.
    #[serde(rename = "boot-source", default)]
    pub boot_source: Option<BootSource>,
    /// `cpu-config`: a custom CPU template, inline or the path of a JSON
    /// file holding one (read when the configuration is parsed). It
    /// replaces `machine-config.cpu_template`.
    #[serde(rename = "cpu-config", default, deserialize_with = "template_or_path")]
    pub cpu_config: Option<CustomCpuTemplate>,
    /// `logger`.
    #[serde(default)]
    pub logger: Option<Logger>,
    /// `machine-config`.
    #[serde(
        rename = "machine-config",
        default,
        deserialize_with = "null_as_default"
    )]
    pub machine_config: MachineConfig,
    /// `metrics`.
    #[serde(default)]
    pub metrics: Option<Metrics>,
    /// `mmds-config`: where the metadata service answers.
    #[serde(rename = "mmds-config", default)]
    pub mmds_config: Option<MmdsConfig>,
    /// `network-interfaces`.
    #[serde(
        rename = "network-interfaces",
        default,
        deserialize_with = "null_as_default"
    )]
    pub network_interfaces: Vec<NetworkInterface>,
    /// `vsock`.
    #[serde(default)]
    pub vsock: Option<Vsock>,
    /// `entropy`.
    #[serde(default)]
    pub entropy: Option<Entropy>,
    /// `pmem` (not supported: only an empty list is accepted).
    #[serde(default, deserialize_with = "null_as_default")]
    pub pmem: Vec<serde_json::Value>,
    /// `memory-hotplug` (not supported).
    #[serde(rename = "memory-hotplug", default)]
    pub memory_hotplug: Option<serde_json::Value>,
    /// Where the serial console goes (`PUT /serial`); not read from the
    /// file nor written back, as Firecracker skips it.
    #[serde(skip)]
    pub serial: Option<Serial>,
    /// Top-level keys of the file that are not sections, ignored.
    #[serde(skip)]
    pub unknown_keys: Vec<String>,
}

/// `null` read as the type's default (an absent section).
fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// `cpu-config`: a template object, or the path of a file holding one.
fn template_or_path<'de, D>(d: D) -> Result<Option<CustomCpuTemplate>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    use std::io::Read;

    use serde::de::Error;
    let value = serde_json::Value::deserialize(d)?;
    let template = match value {
        serde_json::Value::Null => return Ok(None),
        serde_json::Value::String(path) => {
            // A template is a few KiB; a device that never ends (/dev/zero)
            // must not exhaust memory.
            const MAX_TEMPLATE_FILE: u64 = 16 << 20;
            let mut text = Vec::new();
            std::fs::File::open(&path)
                .and_then(|f| f.take(MAX_TEMPLATE_FILE + 1).read_to_end(&mut text))
                .map_err(|e| {
                    D::Error::custom(format!(
                        "cpu-config: cannot read the template file {path}: {e}"
                    ))
                })?;
            if text.len() as u64 > MAX_TEMPLATE_FILE {
                return Err(D::Error::custom(format!(
                    "cpu-config: the template file {path} is larger than {MAX_TEMPLATE_FILE} bytes"
                )));
            }
            CustomCpuTemplate::from_json(&text)
                .map_err(|e| D::Error::custom(format!("cpu-config: template file {path}: {e}")))?
        }
        other => CustomCpuTemplate::from_value(other)
            .map_err(|e| D::Error::custom(format!("cpu-config: {e}")))?,
    };
    Ok(Some(template))
}

impl VmConfig {
    /// Parses a configuration from JSON text, then validates it.
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        // serde would also accept a JSON array in place of the object.
        if text.trim_start().starts_with('[') {
            return Err(ConfigError::Invalid(
                "the top level must be a JSON object, not an array".into(),
            ));
        }
        let mut config: VmConfig = serde_json::from_str(text)?;
        // Parsed a second time, only for its keys: the first pass keeps
        // serde's positions in its error messages.
        let keys: serde_json::Map<String, serde_json::Value> = serde_json::from_str(text)?;
        config.unknown_keys = keys
            .into_iter()
            .map(|(key, _)| key)
            .filter(|key| !SECTIONS.contains(&key.as_str()))
            .collect();
        if config.cpu_config.is_some() {
            // Firecracker keeps one template: `cpu-config`, applied after
            // `machine-config`, replaces a static one.
            config.machine_config.cpu_template = None;
        }
        config.validate()?;
        Ok(config)
    }

    /// Reads, parses and validates a configuration file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json(&text)
    }

    /// The boot source, which a bootable configuration must have.
    pub fn boot_source(&self) -> Result<&BootSource, ConfigError> {
        self.boot_source
            .as_ref()
            .ok_or(ConfigError::MissingBootSource)
    }

    /// The command line the guest gets (before device entries are added).
    pub fn boot_args(&self) -> &str {
        self.boot_source
            .as_ref()
            .and_then(|b| b.boot_args.as_deref())
            .unwrap_or(DEFAULT_BOOT_ARGS)
    }

    /// The file or named pipe the serial console writes to (`PUT /serial`),
    /// if not stdout.
    pub fn serial_output(&self) -> Option<&Path> {
        self.serial.as_ref()?.serial_out_path.as_deref()
    }

    /// `GET /vm/config`: the configuration as Firecracker shows it, a
    /// `boot-source` with an empty `kernel_image_path` when none is set.
    pub fn to_api_json(&self) -> serde_json::Value {
        let mut value = serde_json::to_value(self).unwrap_or_default();
        if let Some(entropy) = &self.entropy {
            // Firecracker describes its entropy device from the device
            // itself: buckets that limit nothing are absent, and so is a
            // zero burst.
            value["entropy"] = serde_json::to_value(entropy.as_built()).unwrap_or_default();
        }
        // Firecracker does not show a custom template back.
        value["cpu-config"] = serde_json::Value::Null;
        if let Some(mmds) = &self.mmds_config {
            // Firecracker shows the address in use, the default included.
            value["mmds-config"] = serde_json::to_value(mmds.as_built()).unwrap_or_default();
        }
        if self.boot_source.is_none() {
            value["boot-source"] = serde_json::json!({
                "kernel_image_path": "",
                "initrd_path": null,
                "boot_args": null,
            });
        }
        value
    }

    /// Checks values and rejects what Ember does not implement.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.machine_config.validate()?;
        validate_drives(&self.drives)?;
        validate_network_interfaces(&self.network_interfaces)?;
        if let Some(v) = &self.vsock {
            // 0-2 are the hypervisor, the local loopback and the host;
            // u32::MAX is VMADDR_CID_ANY (linux/vm_sockets.h).
            if v.guest_cid < 3 || v.guest_cid == u32::MAX {
                return Err(ConfigError::Invalid(format!(
                    "vsock.guest_cid is {}, it must be 3 or more and less than {} (VMADDR_CID_ANY)",
                    v.guest_cid,
                    u32::MAX
                )));
            }
            if v.uds_path.as_os_str().is_empty() {
                return Err(ConfigError::Invalid("vsock.uds_path is empty".into()));
            }
            // The socket is bound at boot; a directory that is not there
            // is refused now, as Firecracker refuses it when it binds at
            // `PUT /vsock`.
            let dir = match v.uds_path.parent() {
                Some(d) if !d.as_os_str().is_empty() => d,
                _ => Path::new("."),
            };
            if !dir.is_dir() {
                return Err(ConfigError::Invalid(format!(
                    "vsock.uds_path {}: the directory {} does not exist",
                    v.uds_path.display(),
                    dir.display()
                )));
            }
        }
        if let Some(mmds) = &self.mmds_config {
            mmds.validate(&self.network_interfaces)?;
        }
        if let Some(b) = &self.balloon {
            // The balloon cannot be larger than guest memory.
            if b.amount_mib as usize > self.machine_config.mem_size_mib {
                return Err(ConfigError::Invalid(BALLOON_TOO_LARGE.into()));
            }
        }
        let unsupported: [(&'static str, bool); 2] = [
            ("memory-hotplug", self.memory_hotplug.is_some()),
            ("pmem", !self.pmem.is_empty()),
        ];
        if let Some((name, _)) = unsupported.iter().find(|(_, present)| *present) {
            return Err(ConfigError::NotSupported(name));
        }
        if let Some(serial) = &self.serial {
            if serial
                .serial_out_path
                .as_ref()
                .is_some_and(|p| p.as_os_str().is_empty())
            {
                return Err(ConfigError::Invalid(
                    "serial: serial_out_path is empty".into(),
                ));
            }
        }
        if let Some(boot) = &self.boot_source {
            if boot.kernel_image_path.as_os_str().is_empty() {
                return Err(ConfigError::Invalid(
                    "boot-source.kernel_image_path is empty".into(),
                ));
            }
        }
        Ok(())
    }
}

/// Checks the `drives` list as Firecracker does: unique ids, at most one
/// root device, a host path for every drive.
pub fn validate_drives(drives: &[Drive]) -> Result<(), ConfigError> {
    let mut roots = 0;
    for (i, d) in drives.iter().enumerate() {
        if d.drive_id.is_empty() {
            return Err(ConfigError::Invalid(format!(
                "drives[{i}].drive_id is empty"
            )));
        }
        if drives[..i].iter().any(|o| o.drive_id == d.drive_id) {
            return Err(ConfigError::Invalid(format!(
                "drives[{i}]: drive_id `{}` is used twice",
                d.drive_id
            )));
        }
        if d.socket.is_some() {
            return Err(ConfigError::Invalid(format!(
                "drive `{}`: vhost-user block devices (`socket`) are not supported by Ember",
                d.drive_id
            )));
        }
        if d.path_on_host
            .as_ref()
            .is_none_or(|p| p.as_os_str().is_empty())
        {
            return Err(ConfigError::Invalid(format!(
                "drive `{}`: path_on_host is required",
                d.drive_id
            )));
        }
        if d.is_root_device {
            roots += 1;
        }
    }
    if roots > 1 {
        return Err(ConfigError::Invalid(
            "a root block device already exists: only one drive can have is_root_device".into(),
        ));
    }
    Ok(())
}

impl Drive {
    /// The kernel command line words for a root drive, as Firecracker adds
    /// them: `root=/dev/vda` (or `root=PARTUUID=...`) then `ro` or `rw`.
    pub fn root_args(&self) -> Option<String> {
        if !self.is_root_device {
            return None;
        }
        let root = match &self.partuuid {
            Some(uuid) => format!("root=PARTUUID={uuid}"),
            None => "root=/dev/vda".to_string(),
        };
        let mode = if self.is_read_only.unwrap_or(false) {
            "ro"
        } else {
            "rw"
        };
        Some(format!("{root} {mode}"))
    }
}

/// Checks `network-interfaces`: unique ids and TAP names, a well-formed
/// MAC, an MTU in Firecracker's range.
pub fn validate_network_interfaces(ifaces: &[NetworkInterface]) -> Result<(), ConfigError> {
    for (i, n) in ifaces.iter().enumerate() {
        if n.iface_id.is_empty() {
            return Err(ConfigError::Invalid(format!(
                "network-interfaces[{i}].iface_id is empty"
            )));
        }
        ember_virtio_net::check_tap_name(&n.host_dev_name).map_err(|e| {
            ConfigError::Invalid(format!("network interface `{}`: {e}", n.iface_id))
        })?;
        if ifaces[..i].iter().any(|o| o.iface_id == n.iface_id) {
            return Err(ConfigError::Invalid(format!(
                "network-interfaces[{i}]: iface_id `{}` is used twice",
                n.iface_id
            )));
        }
        if ifaces[..i]
            .iter()
            .any(|o| o.host_dev_name == n.host_dev_name)
        {
            return Err(ConfigError::Invalid(format!(
                "network-interfaces[{i}]: host_dev_name `{}` is already used by another interface",
                n.host_dev_name
            )));
        }
        if let Some(mac) = &n.guest_mac {
            ember_virtio_net::parse_mac(mac).map_err(|e| {
                ConfigError::Invalid(format!("network interface `{}`: {e}", n.iface_id))
            })?;
        }
        if let Some(mtu) = n.mtu {
            if mtu < 68 {
                return Err(ConfigError::Invalid(format!(
                    "network interface `{}`: mtu {mtu} is below the minimum of 68",
                    n.iface_id
                )));
            }
        }
    }
    Ok(())
}

/// Drives in the order Firecracker attaches them: the root device first,
/// then the others in configuration order.
pub fn drives_in_attach_order(drives: &[Drive]) -> Vec<&Drive> {
    let mut out: Vec<&Drive> = drives.iter().filter(|d| d.is_root_device).collect();
    out.extend(drives.iter().filter(|d| !d.is_root_device));
    out
}

impl From<&Drive> for BlockConfig {
    fn from(drive: &Drive) -> Self {
        BlockConfig {
            drive_id: drive.drive_id.clone(),
            // Validation requires a path; an empty one fails to open.
            path_on_host: drive.path_on_host.clone().unwrap_or_default(),
            is_read_only: drive.is_read_only.unwrap_or(false),
            cache_type: drive.cache_type,
            io_engine: drive.io_engine,
            rate_limiter: drive
                .rate_limiter
                .as_ref()
                .map(Into::into)
                .unwrap_or_default(),
        }
    }
}

impl TryFrom<&NetworkInterface> for NetConfig {
    type Error = ember_virtio_net::Error;

    /// Fails only on a malformed `guest_mac`, which validation refuses first.
    fn try_from(iface: &NetworkInterface) -> Result<Self, Self::Error> {
        Ok(NetConfig {
            iface_id: iface.iface_id.clone(),
            host_dev_name: iface.host_dev_name.clone(),
            guest_mac: iface
                .guest_mac
                .as_deref()
                .map(ember_virtio_net::parse_mac)
                .transpose()?,
            mtu: iface.mtu,
            rx_rate_limiter: iface
                .rx_rate_limiter
                .as_ref()
                .map(Into::into)
                .unwrap_or_default(),
            tx_rate_limiter: iface
                .tx_rate_limiter
                .as_ref()
                .map(Into::into)
                .unwrap_or_default(),
        })
    }
}

impl From<&Vsock> for VsockConfig {
    fn from(vsock: &Vsock) -> Self {
        VsockConfig {
            guest_cid: vsock.guest_cid,
            uds_path: vsock.uds_path.clone(),
        }
    }
}

impl Entropy {
    /// The section as the device built from it has it, the way Firecracker
    /// answers it in `GET /vm/config`: a bucket with `size` or
    /// `refill_time` 0 limits nothing and is left out, a `one_time_burst`
    /// of 0 is absent, and a rate limiter without buckets is none.
    pub fn as_built(&self) -> Entropy {
        let bucket = |b: &Option<TokenBucket>| {
            b.as_ref()
                .filter(|b| b.size != 0 && b.refill_time != 0)
                .map(|b| TokenBucket {
                    one_time_burst: b.one_time_burst.filter(|&burst| burst != 0),
                    ..b.clone()
                })
        };
        let rate_limiter = self
            .rate_limiter
            .as_ref()
            .map(|r| RateLimiter {
                bandwidth: bucket(&r.bandwidth),
                ops: bucket(&r.ops),
            })
            .filter(|r| r.bandwidth.is_some() || r.ops.is_some());
        Entropy { rate_limiter }
    }
}

impl From<&Entropy> for EntropyConfig {
    fn from(entropy: &Entropy) -> Self {
        EntropyConfig {
            rate_limiter: entropy
                .rate_limiter
                .as_ref()
                .map(Into::into)
                .unwrap_or_default(),
        }
    }
}

impl MachineConfig {
    /// Checks the vCPU count, SMT rule and memory size as Firecracker does.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.vcpu_count == 0 || self.vcpu_count > MAX_VCPUS {
            return Err(ConfigError::Invalid(format!(
                "machine-config.vcpu_count is {}, it must be between 1 and {MAX_VCPUS}",
                self.vcpu_count
            )));
        }
        if self.smt && self.vcpu_count > 1 && self.vcpu_count % 2 == 1 {
            return Err(ConfigError::Invalid(format!(
                "machine-config.vcpu_count is {} with smt enabled: it must be 1 or an even number",
                self.vcpu_count
            )));
        }
        if self.mem_size_mib == 0 {
            return Err(ConfigError::Invalid(
                "machine-config.mem_size_mib must be greater than 0".into(),
            ));
        }
        if self.huge_pages != HugePages::None {
            return Err(ConfigError::Invalid(
                "machine-config.huge_pages other than \"None\" is not supported yet by Ember"
                    .into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"{"boot-source": {"kernel_image_path": "/k"}}"#;

    #[test]
    fn tap_names_and_vsock_directories_are_checked() {
        let with = |extra: &str| {
            VmConfig::from_json(&format!(
                r#"{{"boot-source": {{"kernel_image_path": "/k"}}, {extra}}}"#
            ))
        };
        let e = with(
            r#""network-interfaces": [{"iface_id": "n", "host_dev_name": "sixteen-bytes-xx"}]"#,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("network interface `n`") && e.contains("sixteen-bytes-xx"),
            "{e}"
        );
        let e = with(r#""network-interfaces": [{"iface_id": "n", "host_dev_name": "a/b"}]"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("a/b"), "{e}");
        with(r#""network-interfaces": [{"iface_id": "n", "host_dev_name": "fifteen-bytes-x"}]"#)
            .unwrap();

        let e = with(r#""vsock": {"guest_cid": 3, "uds_path": "/no/such/dir/v.sock"}"#)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("the directory /no/such/dir does not exist"),
            "{e}"
        );
        with(r#""vsock": {"guest_cid": 3, "uds_path": "/tmp/v.sock"}"#).unwrap();
        // A bare name is relative to the working directory, which exists.
        with(r#""vsock": {"guest_cid": 3, "uds_path": "v.sock"}"#).unwrap();
    }

    #[test]
    fn minimal_config_gets_firecracker_defaults() {
        let c = VmConfig::from_json(MINIMAL).unwrap();
        assert_eq!(c.machine_config.vcpu_count, 1);
        assert_eq!(c.machine_config.mem_size_mib, 128);
        assert!(!c.machine_config.smt);
        assert_eq!(c.boot_args(), DEFAULT_BOOT_ARGS);
        assert_eq!(c.boot_source().unwrap().kernel_image_path, Path::new("/k"));
    }

    #[test]
    fn sections_convert_into_device_configs() {
        let c = VmConfig::from_json(
            r#"{"boot-source": {"kernel_image_path": "/k"},
                "drives": [{"drive_id": "d", "path_on_host": "/d.img", "is_root_device": false,
                            "is_read_only": true, "io_engine": "Async",
                            "rate_limiter": {"bandwidth": {"size": 4096, "refill_time": 100,
                                                           "one_time_burst": 8192},
                                             "ops": {"size": 0, "refill_time": 100}}}],
                "network-interfaces": [{"iface_id": "n", "host_dev_name": "tap9",
                                        "guest_mac": "06:00:ac:10:00:02", "mtu": 1400}],
                "vsock": {"guest_cid": 3, "uds_path": "/v.sock"}}"#,
        )
        .unwrap();
        let block = BlockConfig::from(&c.drives[0]);
        assert_eq!(
            block,
            BlockConfig {
                drive_id: "d".into(),
                path_on_host: PathBuf::from("/d.img"),
                is_read_only: true,
                cache_type: CacheType::Unsafe,
                io_engine: IoEngine::Async,
                rate_limiter: RateLimiterConfig {
                    bandwidth: Some(BucketSpec {
                        size: 4096,
                        one_time_burst: 8192,
                        refill_time_ms: 100
                    }),
                    // Size 0: the device builds no bucket from it.
                    ops: Some(BucketSpec {
                        size: 0,
                        one_time_burst: 0,
                        refill_time_ms: 100
                    }),
                },
            }
        );
        let net = NetConfig::try_from(&c.network_interfaces[0]).unwrap();
        assert_eq!(net.host_dev_name, "tap9");
        assert_eq!(net.guest_mac, Some([0x06, 0, 0xac, 0x10, 0, 2]));
        assert_eq!(net.mtu, Some(1400));
        let mut bad = c.network_interfaces[0].clone();
        bad.guest_mac = Some("06:00".into());
        assert!(NetConfig::try_from(&bad).is_err());
        let vsock = VsockConfig::from(c.vsock.as_ref().unwrap());
        assert_eq!(
            (vsock.guest_cid, vsock.uds_path),
            (3, PathBuf::from("/v.sock"))
        );
        // The device's own enums serialize under the file's names.
        let text = serde_json::to_string(&c).unwrap();
        assert!(
            text.contains(r#""cache_type":"Unsafe","io_engine":"Async""#),
            "{text}"
        );
    }

    #[test]
    fn default_boot_args_are_what_a_firecracker_guest_gets() {
        // Firecracker's DEFAULT_KERNEL_CMDLINE (vmm_config/boot_source.rs),
        // then the `pci=off` of its builder.
        assert_eq!(
            DEFAULT_BOOT_ARGS,
            "reboot=k panic=1 nomodule 8250.nr_uarts=0 i8042.noaux i8042.nomux i8042.dumbkbd \
             swiotlb=noforce pci=off"
        );
    }

    #[test]
    fn full_machine_config() {
        let c = VmConfig::from_json(
            r#"{"boot-source": {"kernel_image_path": "/k", "boot_args": "console=ttyS0", "initrd_path": "/i"},
                "machine-config": {"vcpu_count": 2, "mem_size_mib": 256, "smt": true, "track_dirty_pages": true}}"#,
        )
        .unwrap();
        assert_eq!(c.machine_config.vcpu_count, 2);
        assert_eq!(c.machine_config.mem_size_mib, 256);
        assert!(c.machine_config.smt && c.machine_config.track_dirty_pages);
        assert_eq!(c.boot_args(), "console=ttyS0");
        assert_eq!(
            c.boot_source().unwrap().initrd_path.as_deref(),
            Some(Path::new("/i"))
        );
    }

    #[test]
    fn unknown_field_is_named() {
        let e = VmConfig::from_json(r#"{"boot-source": {"kernel_image_path": "/k", "kernel": 1}}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `kernel`"), "{e}");
    }

    #[test]
    fn unknown_top_level_keys_are_ignored_and_listed() {
        // Firecracker's VmmConfig ignores them; Ember lists them for a warning.
        let c = VmConfig::from_json(
            r#"{"boot-source": {"kernel_image_path": "/k"}, "boot-sauce": {}, "serial": {"serial_out_path": "/s"}}"#,
        )
        .unwrap();
        assert_eq!(c.unknown_keys, ["boot-sauce", "serial"]);
        assert_eq!(c.serial, None);
        assert!(VmConfig::from_json(MINIMAL)
            .unwrap()
            .unknown_keys
            .is_empty());
    }

    #[test]
    fn every_firecracker_section_is_accepted_empty() {
        let c = VmConfig::from_json(
            r#"{"boot-source": {"kernel_image_path": "/k", "initrd_path": null, "boot_args": null},
                "machine-config": null, "drives": [], "network-interfaces": [], "vsock": null,
                "logger": null, "metrics": null, "balloon": null, "cpu-config": null,
                "mmds-config": null, "entropy": null, "pmem": [], "memory-hotplug": null}"#,
        )
        .unwrap();
        assert_eq!(c.machine_config, MachineConfig::default());
        assert!(c.unknown_keys.is_empty(), "{:?}", c.unknown_keys);
        let c = VmConfig::from_json(
            r#"{"boot-source": {"kernel_image_path": "/k"}, "drives": null, "network-interfaces": null, "pmem": null}"#,
        )
        .unwrap();
        assert!(c.drives.is_empty() && c.network_interfaces.is_empty() && c.pmem.is_empty());
    }

    #[test]
    fn the_export_has_every_section_and_every_field() {
        let c = VmConfig::from_json(
            r#"{"boot-source": {"kernel_image_path": "/k"},
                "drives": [{"drive_id": "rootfs", "path_on_host": "/r", "is_root_device": true}],
                "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0",
                    "tx_rate_limiter": {"bandwidth": {"size": 1000000, "refill_time": 100}}},
                    {"iface_id": "eth1", "host_dev_name": "tap1", "guest_mac": "06:00:AC:10:00:02"}]}"#,
        )
        .unwrap();
        let v = c.to_api_json();
        let sections: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        let mut expected = SECTIONS.to_vec();
        expected.sort_unstable();
        let mut got = sections.clone();
        got.sort_unstable();
        assert_eq!(got, expected);
        for absent in [
            "balloon",
            "cpu-config",
            "logger",
            "metrics",
            "mmds-config",
            "vsock",
            "entropy",
            "memory-hotplug",
        ] {
            assert!(v[absent].is_null(), "{absent}: {v}");
        }
        assert_eq!(v["pmem"], serde_json::json!([]));
        assert_eq!(
            v["boot-source"],
            serde_json::json!({"kernel_image_path": "/k", "initrd_path": null, "boot_args": null})
        );
        assert_eq!(
            v["drives"][0],
            serde_json::json!({"drive_id": "rootfs", "path_on_host": "/r", "is_root_device": true,
                "partuuid": null, "is_read_only": false, "cache_type": "Unsafe",
                "io_engine": "Sync", "rate_limiter": null, "socket": null})
        );
        assert_eq!(
            v["network-interfaces"][0],
            serde_json::json!({"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": null,
                "mtu": null, "rx_rate_limiter": null,
                "tx_rate_limiter": {"bandwidth": {"size": 1000000, "one_time_burst": null,
                    "refill_time": 100}, "ops": null}})
        );
        assert_eq!(v["network-interfaces"][1]["guest_mac"], "06:00:ac:10:00:02");
        assert_eq!(
            v["machine-config"],
            serde_json::json!({"vcpu_count": 1, "mem_size_mib": 128, "smt": false,
                "track_dirty_pages": false, "huge_pages": "None"})
        );
        // Before a boot source is set, Firecracker shows an empty one.
        let v = VmConfig::default().to_api_json();
        assert_eq!(
            v["boot-source"],
            serde_json::json!({"kernel_image_path": "", "initrd_path": null, "boot_args": null})
        );
        // What it writes, it reads back, and writes again the same.
        let text = serde_json::to_string(&c).unwrap();
        let again = serde_json::to_string(&VmConfig::from_json(&text).unwrap()).unwrap();
        assert_eq!(again, text);
    }

    #[test]
    fn wrong_type_is_named() {
        let e = VmConfig::from_json(
            r#"{"boot-source": {"kernel_image_path": "/k"}, "machine-config": {"vcpu_count": "two", "mem_size_mib": 1}}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("invalid type") && e.contains("two"), "{e}");
        let e = VmConfig::from_json(r#"{"boot-source": {"kernel_image_path": 5}}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("invalid type"), "{e}");
        assert!(VmConfig::from_json("not json").is_err());
        assert!(VmConfig::from_json("[]").is_err());
    }

    #[test]
    fn vcpu_and_memory_limits() {
        let mk = |v: u32, smt: bool, mem: u64| {
            VmConfig::from_json(&format!(
                r#"{{"boot-source": {{"kernel_image_path": "/k"}}, "machine-config": {{"vcpu_count": {v}, "mem_size_mib": {mem}, "smt": {smt}}}}}"#
            ))
        };
        assert!(mk(0, false, 128)
            .unwrap_err()
            .to_string()
            .contains("between 1 and 32"));
        assert!(mk(33, false, 128).is_err());
        assert!(mk(300, false, 128)
            .unwrap_err()
            .to_string()
            .contains("invalid value"));
        assert!(mk(3, true, 128).unwrap_err().to_string().contains("even"));
        assert!(mk(3, false, 128).is_ok());
        assert!(mk(1, true, 128).is_ok());
        assert!(mk(1, false, 0)
            .unwrap_err()
            .to_string()
            .contains("mem_size_mib"));
    }

    #[test]
    fn drives_follow_firecracker_rules() {
        let c = VmConfig::from_json(
            r#"{"boot-source": {"kernel_image_path": "/k"}, "drives": [
                {"drive_id": "data", "path_on_host": "/d", "is_root_device": false},
                {"drive_id": "rootfs", "path_on_host": "/r", "is_root_device": true, "is_read_only": true, "cache_type": "Writeback", "io_engine": "Async"}]}"#,
        )
        .unwrap();
        let order: Vec<_> = drives_in_attach_order(&c.drives)
            .iter()
            .map(|d| d.drive_id.as_str())
            .collect();
        assert_eq!(order, ["rootfs", "data"]);
        assert_eq!(c.drives[1].root_args().as_deref(), Some("root=/dev/vda ro"));
        assert_eq!(c.drives[0].root_args(), None);
        assert_eq!(c.drives[1].cache_type, CacheType::Writeback);
        assert_eq!(c.drives[1].io_engine, IoEngine::Async);
        let mut d = c.drives[1].clone();
        d.partuuid = Some("0eaa91a0-01".into());
        d.is_read_only = Some(false);
        assert_eq!(
            d.root_args().as_deref(),
            Some("root=PARTUUID=0eaa91a0-01 rw")
        );

        for (body, needle) in [
            (
                r#"[{"drive_id": "a", "path_on_host": "/a", "is_root_device": true}, {"drive_id": "b", "path_on_host": "/b", "is_root_device": true}]"#,
                "only one drive",
            ),
            (
                r#"[{"drive_id": "a", "path_on_host": "/a", "is_root_device": false}, {"drive_id": "a", "path_on_host": "/b", "is_root_device": false}]"#,
                "used twice",
            ),
            (
                r#"[{"drive_id": "a", "is_root_device": false}]"#,
                "path_on_host is required",
            ),
            (
                r#"[{"drive_id": "a", "path_on_host": "/a", "is_root_device": false, "cache_type": "Fast"}]"#,
                "unknown variant",
            ),
            (r#"[{"drive_id": 1}]"#, "invalid type"),
        ] {
            let e = VmConfig::from_json(&format!(
                r#"{{"boot-source": {{"kernel_image_path": "/k"}}, "drives": {body}}}"#
            ))
            .unwrap_err()
            .to_string();
            assert!(e.contains(needle), "{e}");
        }
    }

    #[test]
    fn network_interfaces_are_validated() {
        let ok = VmConfig::from_json(
            r#"{"boot-source": {"kernel_image_path": "/k"}, "network-interfaces": [
                {"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:AC:10:00:02", "mtu": 1500}]}"#,
        )
        .unwrap();
        assert_eq!(ok.network_interfaces[0].mtu, Some(1500));
        for (body, needle) in [
            (
                r#"[{"iface_id": "a", "host_dev_name": "t0"}, {"iface_id": "a", "host_dev_name": "t1"}]"#,
                "used twice",
            ),
            (
                r#"[{"iface_id": "a", "host_dev_name": "t0"}, {"iface_id": "b", "host_dev_name": "t0"}]"#,
                "already used",
            ),
            (
                r#"[{"iface_id": "a", "host_dev_name": "t0", "guest_mac": "06:00:zz:10:00:02"}]"#,
                "network interface `a`",
            ),
            (
                r#"[{"iface_id": "a", "host_dev_name": "t0", "mtu": 20}]"#,
                "minimum of 68",
            ),
            (r#"[{"iface_id": "a"}]"#, "missing field `host_dev_name`"),
        ] {
            let e = VmConfig::from_json(&format!(
                r#"{{"boot-source": {{"kernel_image_path": "/k"}}, "network-interfaces": {body}}}"#
            ))
            .unwrap_err()
            .to_string();
            assert!(e.contains(needle), "{e}");
        }
    }

    #[test]
    fn vsock_is_validated() {
        let c = VmConfig::from_json(
            r#"{"boot-source": {"kernel_image_path": "/k"}, "vsock": {"guest_cid": 3, "uds_path": "/v.sock"}}"#,
        )
        .unwrap();
        assert_eq!(c.vsock.unwrap().guest_cid, 3);
        let e = VmConfig::from_json(
            r#"{"boot-source": {"kernel_image_path": "/k"}, "vsock": {"guest_cid": 2, "uds_path": "/v.sock"}}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("3 or more"), "{e}");
        let e = VmConfig::from_json(
            r#"{"boot-source": {"kernel_image_path": "/k"}, "vsock": {"guest_cid": 4294967295, "uds_path": "/v.sock"}}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("4294967295") && e.contains("VMADDR_CID_ANY"),
            "{e}"
        );
        let c = VmConfig::from_json(
            r#"{"boot-source": {"kernel_image_path": "/k"}, "vsock": {"guest_cid": 4294967294, "uds_path": "/v.sock"}}"#,
        )
        .unwrap();
        assert_eq!(c.vsock.unwrap().guest_cid, u32::MAX - 1);
    }

    #[test]
    fn metrics_section_is_accepted() {
        let c = VmConfig::from_json(
            r#"{"boot-source": {"kernel_image_path": "/k"}, "metrics": {"metrics_path": "/m", "emit_id": true, "properties": {"a": "b"}}}"#,
        )
        .unwrap();
        let m = c.metrics.unwrap();
        assert_eq!(m.metrics_path, Path::new("/m"));
        assert!(m.emit_id);
        assert_eq!(m.properties.unwrap()["a"], "b");
        let e = VmConfig::from_json(
            r#"{"boot-source": {"kernel_image_path": "/k"}, "metrics": {"path": "/m"}}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("unknown field `path`"), "{e}");
    }

    #[test]
    fn mmds_config_section() {
        let with = |mmds: &str| {
            VmConfig::from_json(&format!(
                r#"{{"boot-source": {{"kernel_image_path": "/k"}},
                    "network-interfaces": [{{"iface_id": "eth0", "host_dev_name": "t0"}}],
                    "mmds-config": {mmds}}}"#
            ))
        };
        let c = with(r#"{"network_interfaces": ["eth0"]}"#).unwrap();
        let m = c.mmds_config.clone().unwrap();
        assert_eq!(m.version, MmdsVersion::V1);
        assert_eq!(m.ipv4_addr(), Ipv4Addr::new(169, 254, 169, 254));
        assert_eq!(
            c.to_api_json()["mmds-config"],
            serde_json::json!({"version": "V1", "network_interfaces": ["eth0"],
                               "ipv4_address": "169.254.169.254", "imds_compat": false})
        );
        let c = with(
            r#"{"version": "V2", "network_interfaces": ["eth0"], "ipv4_address": "169.254.1.2", "imds_compat": true}"#,
        )
        .unwrap();
        let m = c.mmds_config.unwrap();
        assert_eq!((m.version, m.imds_compat), (MmdsVersion::V2, true));
        assert_eq!(m.ipv4_addr(), Ipv4Addr::new(169, 254, 1, 2));
        for (body, needle) in [
            (r#"{"network_interfaces": []}"#, "is empty"),
            (
                r#"{"network_interfaces": ["eth1"]}"#,
                "does not correspond to any existing network interface",
            ),
            (
                r#"{"network_interfaces": ["eth0"], "ipv4_address": "10.0.0.1"}"#,
                "not link local",
            ),
            (
                r#"{"network_interfaces": ["eth0"], "ipv4_address": "169.254.0.1"}"#,
                "not link local",
            ),
            (
                r#"{"network_interfaces": ["eth0"], "ipv4_address": "169.254.255.1"}"#,
                "not link local",
            ),
            (
                r#"{"network_interfaces": ["eth0"], "version": "V3"}"#,
                "unknown variant `V3`",
            ),
            (
                r#"{"network_interfaces": ["eth0"], "port": 80}"#,
                "unknown field `port`",
            ),
        ] {
            let e = with(body).unwrap_err().to_string();
            assert!(e.contains(needle), "{body}: {e}");
        }
    }

    #[test]
    fn balloon_section() {
        let c = VmConfig::from_json(
            r#"{"boot-source": {"kernel_image_path": "/k"},
                "balloon": {"amount_mib": 16, "deflate_on_oom": true, "stats_polling_interval_s": 2}}"#,
        )
        .unwrap();
        let b = c.balloon.as_ref().unwrap();
        assert_eq!(
            BalloonConfig::from(b),
            BalloonConfig {
                amount_mib: 16,
                deflate_on_oom: true,
                stats_polling_interval_s: 2,
                free_page_hinting: false,
                free_page_reporting: false,
            }
        );
        // GET /vm/config shows every field, as Firecracker does.
        assert_eq!(
            c.to_api_json()["balloon"],
            serde_json::json!({"amount_mib": 16, "deflate_on_oom": true,
                "stats_polling_interval_s": 2, "free_page_hinting": false,
                "free_page_reporting": false})
        );
        // deflate_on_oom is required, unknown fields are refused.
        for body in [
            r#"{"amount_mib": 1}"#,
            r#"{"amount_mib": 1, "deflate_on_oom": false, "size": 2}"#,
        ] {
            assert!(VmConfig::from_json(&format!(
                r#"{{"boot-source": {{"kernel_image_path": "/k"}}, "balloon": {body}}}"#
            ))
            .is_err());
        }
        // Not larger than guest memory.
        let e = VmConfig::from_json(
            r#"{"boot-source": {"kernel_image_path": "/k"}, "machine-config": {"vcpu_count": 1, "mem_size_mib": 64},
                "balloon": {"amount_mib": 65, "deflate_on_oom": false}}"#,
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("invalid config file: {BALLOON_TOO_LARGE}")
        );
    }

    #[test]
    fn later_sections_parse_but_are_not_supported_yet() {
        for (section, body) in [
            ("memory-hotplug", r#"{"total_size_mib": 1024}"#),
            ("pmem", r#"[{"id": "p", "path_on_host": "/p"}]"#),
        ] {
            let e = VmConfig::from_json(&format!(
                r#"{{"boot-source": {{"kernel_image_path": "/k"}}, "{section}": {body}}}"#
            ))
            .unwrap_err()
            .to_string();
            assert_eq!(
                e,
                format!(
                    "config section `{section}` is not supported yet by Ember (leave it out, or empty)"
                )
            );
        }
    }

    const TEMPLATE: &str = r#"{"cpuid_modifiers": [{"leaf": "0x1", "subleaf": "0x0", "flags": 0,
        "modifiers": [{"register": "ecx", "bitmap": "0bx0xxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}]}]}"#;

    #[test]
    fn cpu_templates_static_inline_and_from_a_file() {
        let c = VmConfig::from_json(
            r#"{"boot-source": {"kernel_image_path": "/k"},
                "machine-config": {"vcpu_count": 1, "mem_size_mib": 128, "cpu_template": "T2A"}}"#,
        )
        .unwrap();
        assert_eq!(
            c.machine_config.static_template(),
            Some(StaticCpuTemplate::T2A)
        );
        assert_eq!(c.to_api_json()["machine-config"]["cpu_template"], "T2A");
        // "None" is no template, and not shown.
        let c = VmConfig::from_json(
            r#"{"boot-source": {"kernel_image_path": "/k"},
                "machine-config": {"vcpu_count": 1, "mem_size_mib": 128, "cpu_template": "None"}}"#,
        )
        .unwrap();
        assert_eq!(c.machine_config.static_template(), None);
        assert!(c.to_api_json()["machine-config"]
            .get("cpu_template")
            .is_none());
        let e = VmConfig::from_json(
            r#"{"boot-source": {"kernel_image_path": "/k"},
                "machine-config": {"vcpu_count": 1, "mem_size_mib": 128, "cpu_template": "T3"}}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("unknown variant `T3`"), "{e}");

        // Inline; it replaces the static template, and is not shown back.
        let c = VmConfig::from_json(&format!(
            r#"{{"boot-source": {{"kernel_image_path": "/k"}}, "cpu-config": {TEMPLATE},
                "machine-config": {{"vcpu_count": 1, "mem_size_mib": 128, "cpu_template": "T2A"}}}}"#
        ))
        .unwrap();
        let t = c.cpu_config.as_ref().unwrap();
        assert_eq!(t.cpuid_modifiers[0].leaf, 1);
        assert_eq!(c.machine_config.static_template(), None);
        assert!(c.to_api_json()["cpu-config"].is_null());
        // It survives the round trip a snapshot makes of the configuration.
        let back: VmConfig = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back.cpu_config, c.cpu_config);

        // From a file.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.json");
        std::fs::write(&path, TEMPLATE).unwrap();
        let c = VmConfig::from_json(&format!(
            r#"{{"boot-source": {{"kernel_image_path": "/k"}}, "cpu-config": "{}"}}"#,
            path.display()
        ))
        .unwrap();
        assert_eq!(c.cpu_config.unwrap().cpuid_modifiers[0].leaf, 1);
        let e = VmConfig::from_json(
            r#"{"boot-source": {"kernel_image_path": "/k"}, "cpu-config": "/nonexistent/t.json"}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("cannot read the template file /nonexistent/t.json"),
            "{e}"
        );
        let e = VmConfig::from_json(
            r#"{"boot-source": {"kernel_image_path": "/k"}, "cpu-config": "/dev/zero"}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("the template file /dev/zero is larger than"),
            "{e}"
        );
    }

    #[test]
    fn a_malformed_cpu_config_names_the_leaf() {
        let e = VmConfig::from_json(
            r#"{"boot-source": {"kernel_image_path": "/k"}, "cpu-config": {"cpuid_modifiers": [
                {"leaf": "0x7", "subleaf": "0x0", "flags": 1,
                 "modifiers": [{"register": "ebx", "bitmap": "0b12"}]}]}}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("cpu-config: CPUID leaf 0x7 subleaf 0x0 register ebx: bitmap"),
            "{e}"
        );
    }

    #[test]
    fn entropy_section() {
        let c = VmConfig::from_json(
            r#"{"boot-source": {"kernel_image_path": "/k"},
                "entropy": {"rate_limiter": {"bandwidth": {"size": 4096, "refill_time": 100},
                                             "ops": {"size": 10, "one_time_burst": 5, "refill_time": 1000}}}}"#,
        )
        .unwrap();
        let entropy = c.entropy.as_ref().unwrap();
        assert_eq!(
            EntropyConfig::from(entropy).rate_limiter,
            RateLimiterConfig {
                bandwidth: Some(BucketSpec {
                    size: 4096,
                    one_time_burst: 0,
                    refill_time_ms: 100
                }),
                ops: Some(BucketSpec {
                    size: 10,
                    one_time_burst: 5,
                    refill_time_ms: 1000
                }),
            }
        );
        let v = c.to_api_json();
        assert_eq!(
            v["entropy"],
            serde_json::json!({"rate_limiter": {
                "bandwidth": {"size": 4096, "one_time_burst": null, "refill_time": 100},
                "ops": {"size": 10, "one_time_burst": 5, "refill_time": 1000}}})
        );
        // An empty section is a device without a rate limiter.
        let c =
            VmConfig::from_json(r#"{"boot-source": {"kernel_image_path": "/k"}, "entropy": {}}"#)
                .unwrap();
        assert_eq!(c.entropy, Some(Entropy::default()));
        assert_eq!(
            EntropyConfig::from(c.entropy.as_ref().unwrap()),
            EntropyConfig::default()
        );
        assert_eq!(
            c.to_api_json()["entropy"],
            serde_json::json!({"rate_limiter": null})
        );
        // Buckets that limit nothing are left out, as Firecracker, which
        // describes the device it built, leaves them out.
        let c = VmConfig::from_json(
            r#"{"boot-source": {"kernel_image_path": "/k"},
                "entropy": {"rate_limiter": {"bandwidth": {"size": 0, "refill_time": 100},
                                             "ops": {"size": 5, "one_time_burst": 0, "refill_time": 10}}}}"#,
        )
        .unwrap();
        assert_eq!(
            c.to_api_json()["entropy"],
            serde_json::json!({"rate_limiter": {"bandwidth": null,
                "ops": {"size": 5, "one_time_burst": null, "refill_time": 10}}})
        );
        let c = VmConfig::from_json(
            r#"{"boot-source": {"kernel_image_path": "/k"},
                "entropy": {"rate_limiter": {"ops": {"size": 5, "refill_time": 0}}}}"#,
        )
        .unwrap();
        assert_eq!(
            c.to_api_json()["entropy"],
            serde_json::json!({"rate_limiter": null})
        );
        // `null` is no device.
        let c =
            VmConfig::from_json(r#"{"boot-source": {"kernel_image_path": "/k"}, "entropy": null}"#)
                .unwrap();
        assert_eq!(c.entropy, None);
        let e = VmConfig::from_json(
            r#"{"boot-source": {"kernel_image_path": "/k"}, "entropy": {"rate": 1}}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("unknown field `rate`"), "{e}");
    }

    #[test]
    fn logger_section_is_accepted() {
        let c = VmConfig::from_json(
            r#"{"boot-source": {"kernel_image_path": "/k"}, "logger": {"log_path": "/l", "level": "debug", "show_level": true}}"#,
        )
        .unwrap();
        let l = c.logger.unwrap();
        assert_eq!(l.level, Some(LogLevel::Debug));
        assert!(l.show_level);
        let e = VmConfig::from_json(
            r#"{"boot-source": {"kernel_image_path": "/k"}, "logger": {"level": "loud"}}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("invalid log level `loud`"), "{e}");
    }

    #[test]
    fn missing_boot_source_is_reported_when_booting() {
        let c = VmConfig::from_json("{}").unwrap();
        assert!(matches!(
            c.boot_source(),
            Err(ConfigError::MissingBootSource)
        ));
    }
}
