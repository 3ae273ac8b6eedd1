//! The node's TOML configuration: parsing, defaults, and the validation that
//! refuses a file before anything touches the disk. Every error names the key
//! and says how to fix it; timing is checked so that a leader can always fence
//! itself before its lease can expire in etcd.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// etcd refuses leases shorter than 1.5 × its election timeout (1.5 s with
/// its defaults) by silently lengthening them; leases are whole seconds.
const ETCD_MIN_TTL_SECS: u64 = 2;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Cluster name: keys live under `/mainstay/<cluster>/`.
    pub cluster: String,
    /// This node's name, unique in the cluster.
    pub name: String,
    /// A virtual IP with its prefix ("10.0.0.50/24") that the leader holds
    /// on `vip_interface` while its PostgreSQL runs as primary.
    pub vip: Option<String>,
    pub vip_interface: Option<String>,
    pub etcd: EtcdConfig,
    pub postgresql: PgConfig,
    #[serde(default)]
    pub api: ApiConfig,
    #[serde(default)]
    pub proxy: ProxyConfig,
    #[serde(default)]
    pub timing: Timing,
    #[serde(default)]
    pub tags: mainstay_core::Tags,
    /// The `[watchdog]` section as written; `watchdog` is its typed form.
    #[serde(default, rename = "watchdog")]
    watchdog_section: WatchdogSection,
    /// The kernel watchdog, typed and checked against the timing when the
    /// file is parsed (never read from the file directly).
    #[serde(skip)]
    pub watchdog: WatchdogConfig,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdConfig {
    pub endpoints: Vec<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

impl fmt::Debug for EtcdConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdConfig")
            .field("endpoints", &self.endpoints)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("ca_file", &self.ca_file)
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .finish()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Credentials {{ username: {:?}, password: *** }}",
            self.username
        )
    }
}

pub fn default_bin_dir() -> PathBuf {
    PathBuf::from("/usr/lib/postgresql/15/bin")
}
fn default_listen() -> String {
    "127.0.0.1".into()
}
fn default_pg_port() -> u16 {
    5432
}
fn default_run_as() -> String {
    "postgres".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PgConfig {
    #[serde(default = "default_bin_dir")]
    pub bin_dir: PathBuf,
    pub data_dir: PathBuf,
    /// `listen_addresses`.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// The address other nodes and clients use; defaults to `listen` unless
    /// that is a wildcard.
    pub connect_address: Option<String>,
    #[serde(default = "default_pg_port")]
    pub port: u16,
    /// OS user that runs PostgreSQL when the agent runs as root.
    #[serde(default = "default_run_as")]
    pub run_as: String,
    pub superuser: Credentials,
    pub replication: Credentials,
    /// pg_rewind's user; defaults to the superuser.
    pub rewind: Option<Credentials>,
    /// Extra postgresql.conf parameters (values as strings).
    #[serde(default)]
    pub parameters: BTreeMap<String, toml::Value>,
}

fn default_api_listen() -> String {
    "127.0.0.1:8008".into()
}

fn default_wait_for_leader() -> f64 {
    10.0
}

fn default_replica_max_lag() -> ByteSize {
    ByteSize::Text("16MB".into())
}

/// A size in bytes, written as a number or with a unit ("16MB").
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum ByteSize {
    Bytes(u64),
    Text(String),
}

impl ByteSize {
    pub fn bytes(&self) -> Option<u64> {
        match self {
            ByteSize::Bytes(n) => Some(*n),
            ByteSize::Text(text) => crate::api::health::parse_size(text),
        }
    }
}

/// The built-in proxy (each listener off unless its address is set).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// Where clients connect to reach the primary, e.g. "0.0.0.0:5000".
    pub listen: Option<String>,
    /// Where clients connect to reach a replica (or the primary when no
    /// replica qualifies), e.g. "0.0.0.0:5001".
    pub read_only_listen: Option<String>,
    /// Replicas further behind the leader take no new read-only connections.
    #[serde(default = "default_replica_max_lag")]
    pub replica_max_lag: ByteSize,
    /// Seconds a new connection waits for a target during a failover
    /// before it is closed.
    #[serde(default = "default_wait_for_leader")]
    pub wait_for_leader: f64,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            listen: None,
            read_only_listen: None,
            replica_max_lag: default_replica_max_lag(),
            wait_for_leader: default_wait_for_leader(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    #[serde(default = "default_api_listen")]
    pub listen: String,
    /// URL other agents and tools use; defaults to `http://<listen>`.
    pub connect_url: Option<String>,
    /// HTTP basic credentials for unsafe methods (POST, PUT, PATCH, DELETE).
    pub username: Option<String>,
    pub password: Option<String>,
    /// A bearer token accepted for unsafe methods, instead of or besides
    /// the basic credentials.
    pub token: Option<String>,
    /// Serve HTTPS with this PEM certificate chain and private key.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// The CA that signed the agents' API certificates: what `mainstay ctl`
    /// and the agents (failsafe mode) trust when they call an https API.
    pub ca_file: Option<PathBuf>,
    /// Seconds a client has to send a request's header (from connecting, or
    /// from the previous response on a kept-alive connection) and again its
    /// body; a slower or idle connection is closed.
    #[serde(default = "default_header_timeout")]
    pub header_timeout: f64,
    /// Connections open at once; more are closed as they arrive.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
}

fn default_header_timeout() -> f64 {
    10.0
}

fn default_max_connections() -> usize {
    256
}

impl ApiConfig {
    /// The bounds on clients (validated with the configuration).
    pub fn limits(&self) -> crate::api::Limits {
        crate::api::Limits {
            header_timeout: Duration::from_secs_f64(self.header_timeout),
            max_connections: self.max_connections,
        }
    }
}

impl fmt::Debug for ApiConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiConfig")
            .field("listen", &self.listen)
            .field("connect_url", &self.connect_url)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<secret>"))
            .field("token", &self.token.as_ref().map(|_| "<secret>"))
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .field("ca_file", &self.ca_file)
            .field("header_timeout", &self.header_timeout)
            .field("max_connections", &self.max_connections)
            .finish()
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: default_api_listen(),
            connect_url: None,
            username: None,
            password: None,
            token: None,
            cert_file: None,
            key_file: None,
            ca_file: None,
            header_timeout: default_header_timeout(),
            max_connections: default_max_connections(),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    /// LAN defaults: failover in about 4 s.
    #[default]
    Default,
    /// About 2 s; needs etcd with a short election timeout (see docs).
    Fast,
}

/// Timing, in seconds (fractions allowed except for `ttl`). Unset values come
/// from the profile.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timing {
    #[serde(default)]
    pub profile: Profile,
    /// Lifetime of the leader lease in etcd (whole seconds).
    pub ttl: Option<u64>,
    /// Period of the HA loop when nothing happens.
    pub loop_wait: Option<f64>,
    /// Period of lease keep-alives.
    pub renew_interval: Option<f64>,
    /// Upper bound of one etcd request.
    pub dcs_timeout: Option<f64>,
    /// A leader that has not renewed stops writing this long before its lease
    /// can expire in etcd.
    pub fencing_margin: Option<f64>,
}

/// The timing in force, after profile defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EffectiveTiming {
    pub ttl: Duration,
    pub loop_wait: Duration,
    pub renew_interval: Duration,
    pub dcs_timeout: Duration,
    pub fencing_margin: Duration,
}

impl Timing {
    pub fn effective(&self) -> EffectiveTiming {
        let (ttl, loop_wait, renew, timeout, margin) = match self.profile {
            Profile::Default => (4, 1.0, 1.0, 1.0, 1.0),
            Profile::Fast => (2, 0.5, 0.5, 0.4, 0.5),
        };
        let secs = |value: Option<f64>, default: f64| {
            Duration::from_secs_f64(value.unwrap_or(default).max(0.0))
        };
        EffectiveTiming {
            ttl: Duration::from_secs(self.ttl.unwrap_or(ttl)),
            loop_wait: secs(self.loop_wait, loop_wait),
            renew_interval: secs(self.renew_interval, renew),
            dcs_timeout: secs(self.dcs_timeout, timeout),
            fencing_margin: secs(self.fencing_margin, margin),
        }
    }
}

pub use mainstay_watchdog::Mode as WatchdogMode;

/// `[watchdog]` as written in the file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct WatchdogSection {
    mode: Option<String>,
    device: Option<PathBuf>,
    safety_margin: Option<f64>,
}

pub fn default_watchdog_device() -> PathBuf {
    PathBuf::from("/dev/watchdog")
}

/// The kernel watchdog (`[watchdog]`), as the agent uses it: the leader
/// opens `device` with `timeout`, feeds it only while a feed cannot outlive
/// its fencing deadline, and disarms it (magic close) when it stops leading.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchdogConfig {
    /// off (never opened), automatic (used if it can be opened and
    /// configured, otherwise a warning), required (a node that cannot open
    /// and configure it never takes the leader key).
    pub mode: WatchdogMode,
    /// The watchdog's character device (absolute), `/dev/watchdog` by default.
    pub device: PathBuf,
    /// The device timeout, whole seconds:
    /// `floor(ttl - fencing_margin - dcs_timeout - safety_margin)`, so that a
    /// feed right after a renewal confirmed within `dcs_timeout` ends by the
    /// fencing deadline. At least 1 s unless `mode` is off (then zero when
    /// the timing leaves less).
    pub timeout: Duration,
    /// How much earlier than the fencing deadline the watchdog must fire
    /// (for a hardware timer that fires late); 0 by default.
    pub safety_margin: Duration,
}

impl Default for WatchdogConfig {
    fn default() -> Self {
        WatchdogConfig {
            mode: WatchdogMode::Off,
            device: default_watchdog_device(),
            timeout: Duration::ZERO,
            safety_margin: Duration::ZERO,
        }
    }
}

impl WatchdogConfig {
    /// What `mainstay_watchdog::Watchdog::open` takes.
    pub fn settings(&self) -> mainstay_watchdog::Settings {
        mainstay_watchdog::Settings {
            device: self.device.clone(),
            timeout: self.timeout,
            safety_margin: self.safety_margin,
        }
    }
}

/// What `mainstay config check` found about the watchdog.
#[derive(Debug)]
pub enum WatchdogCheck {
    /// `watchdog.mode` is off: the device was not opened.
    Off,
    /// The device opened, took its timeout and was closed cleanly; a line
    /// describing it.
    Ready(String),
    /// Mode automatic, device unusable: the node would lead without it.
    Warning(ConfigError),
    /// Mode required, device unusable: the node would never lead.
    Error(ConfigError),
}

/// A refused configuration: where, what, and how to fix it.
#[derive(Debug)]
pub struct ConfigError {
    pub path: PathBuf,
    pub key: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.key {
            Some(key) => write!(f, "{}: key `{key}`: {}", self.path.display(), self.message),
            None => write!(f, "{}: {}", self.path.display(), self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

#[cfg(test)]
mod tests;
mod validate;
