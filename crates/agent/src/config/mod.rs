//! The node's configuration, parsed once: loading a file yields one
//! validated [`Config`] made of a typed part per subsystem, with every
//! default applied and every derived value computed. Nothing downstream
//! parses a value again or unwraps something "validated earlier".
//!
//! `file.rs` is the file as written, `validate.rs` turns it into these
//! types (refusing a bad value with its key, the reason and the fix,
//! before anything touches the disk; timing is checked so that a leader can
//! always fence itself before etcd can expire its lease), `size.rs` and
//! `vip.rs` read two value syntaxes, `service.rs` the `[[service]]` sections. This module imports none of the code
//! that consumes it: subsystems take their part from here.
//!
//! Where a type of a lower crate already says what a subsystem needs, the
//! part is that type: the core's [`Timing`], the DCS's `EtcdSettings`,
//! PostgreSQL's `PgSettings`. The `[[service]]` and `[[replicate]]`
//! sections of later subsystems become parts of their own here.

use mainstay_core::Timing;
use mainstay_dcs::EtcdSettings;
use mainstay_pg::PgSettings;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

mod etcd_member;
mod file;
mod replicate;
mod service;
mod size;
mod tags;
mod validate;
mod vip;
mod witness;

pub use size::parse_size;
pub use vip::VipSpec;
pub use witness::WitnessConfig;

/// A node's configuration, validated.
#[derive(Debug)]
pub struct Config {
    /// Cluster name: keys live under `/mainstay/<cluster>/`.
    pub cluster: String,
    /// This node's name, unique in the cluster.
    pub name: String,
    /// `[timing]`: the profile's values with the file's overrides.
    pub timing: Timing,
    /// `[etcd]`, with request and connect timeouts of `timing.dcs_timeout`.
    pub etcd: EtcdSettings,
    /// `[etcd] member = true`: the node's own etcd member, which the agent
    /// runs, with raft timing matched to `timing.ttl`.
    pub etcd_member: Option<mainstay_etcd_member::MemberSpec>,
    /// `[postgresql]`: paths, addresses, credentials (`rewind` defaults to
    /// the superuser), `run_as` only when the agent runs as root (PostgreSQL
    /// refuses to run as root; as any other user it runs as the agent), and
    /// `parameters` as the strings written to postgresql.conf.
    pub postgresql: PgSettings,
    pub api: ApiConfig,
    pub proxy: ProxyConfig,
    /// `vip` on `vip_interface`, which the leader holds while its
    /// PostgreSQL runs as primary.
    pub vip: Option<VipSpec>,
    pub tags: mainstay_core::Tags,
    /// `[watchdog]`, with the device timeout the timing allows.
    pub watchdog: WatchdogConfig,
    /// `[[service]]`, in start order (each after those it depends on).
    pub services: Vec<mainstay_services::ServiceSpec>,
    /// `[callbacks]`: commands run when PostgreSQL starts, stops or
    /// changes role.
    pub hooks: mainstay_services::hooks::Hooks,
    /// `[alerts]`: when replication lag and disk space raise an alert.
    pub alerts: AlertThresholds,
    /// `[[replicate]]`: directories copied from the leader's node to the
    /// others.
    pub replicate: Vec<mainstay_files::ReplicateSpec>,
}

/// `[alerts]`: past these, the node reports an alert (`/patroni`,
/// `/cluster`, `ctl list`, `mainstay_alert` in `/metrics`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AlertThresholds {
    /// A replica replaying commits later than this after the primary (seen
    /// on the leader).
    pub replication_lag: Duration,
    /// A replica this many bytes behind the leader.
    pub replication_lag_bytes: u64,
    /// The data directory's file system has less than this left ...
    pub data_disk_free_bytes: u64,
    /// ... or less than this share of its size, in percent.
    pub data_disk_free_percent: f64,
    /// A receiver of a replicated directory whose oldest unapplied change
    /// is older than this (seen on the source), or that keeps failing
    /// files for longer.
    pub replicated_files_lag: Duration,
}

/// A cluster's, node's or member's name: 1-63 letters, digits, '-', '_' or
/// '.' (it goes into etcd keys and member names).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// An etcd member's URL as a member needs it, `http(s)://ADDRESS:PORT`
/// with a real address (etcd listens where it is reached, and only on
/// addresses): that address.
pub fn member_address(url: &str) -> Option<SocketAddr> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))?;
    let address: SocketAddr = rest.parse().ok()?;
    (address.port() != 0 && !address.ip().is_unspecified()).then_some(address)
}

/// Where PostgreSQL 15's programs are unless `postgresql.bin_dir` says.
pub fn default_bin_dir() -> PathBuf {
    PathBuf::from(DEFAULT_BIN_DIR)
}

const DEFAULT_BIN_DIR: &str = "/usr/lib/postgresql/15/bin";

/// `[api]`: the REST API.
#[derive(Clone)]
pub struct ApiConfig {
    pub listen: SocketAddr,
    /// The URL other agents and tools use: `connect_url`, or
    /// `http(s)://<listen>`.
    pub url: String,
    /// HTTP basic credentials for unsafe methods (POST, PUT, PATCH, DELETE).
    pub basic: Option<(String, String)>,
    /// A bearer token accepted for unsafe methods, instead of or besides
    /// the basic credentials.
    pub token: Option<String>,
    /// HTTPS with this PEM certificate chain and private key.
    pub tls: Option<TlsFiles>,
    /// The CA that signed the agents' API certificates: what `mainstay ctl`
    /// and the agents (failsafe mode, parameter checks) trust.
    pub ca_file: Option<PathBuf>,
    /// Time a client has to send a request's header (from connecting, or
    /// from the previous response on a kept-alive connection) and again
    /// its body.
    pub header_timeout: Duration,
    /// Connections open at once; more are closed as they arrive.
    pub max_connections: usize,
    /// HAProxy's `agent-check` port, when configured.
    pub agent_check: Option<AgentCheckConfig>,
}

/// `[api] agent_check_listen`: where load balancers ask this node "up or
/// down for this role?", and how long a leader handing over says "down"
/// before it stops PostgreSQL.
#[derive(Clone, Copy, Debug)]
pub struct AgentCheckConfig {
    pub listen: SocketAddr,
    pub step_down_wait: Duration,
}

#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

impl fmt::Debug for ApiConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiConfig")
            .field("listen", &self.listen)
            .field("url", &self.url)
            .field(
                "basic",
                &self.basic.as_ref().map(|(user, _)| (user, "<secret>")),
            )
            .field("token", &self.token.as_ref().map(|_| "<secret>"))
            .field("tls", &self.tls)
            .field("ca_file", &self.ca_file)
            .field("header_timeout", &self.header_timeout)
            .field("max_connections", &self.max_connections)
            .finish()
    }
}

/// `[proxy]`: the built-in proxy, each listener off unless its address is
/// set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyConfig {
    /// Where clients connect to reach the primary.
    pub listen: Option<SocketAddr>,
    /// Where clients connect to reach a replica (or the primary when no
    /// replica qualifies).
    pub read_only_listen: Option<SocketAddr>,
    /// Replicas further behind the leader, in bytes, take no new read-only
    /// connections.
    pub replica_max_lag: u64,
    /// How long a new connection waits for a target during a failover
    /// before it is closed.
    pub wait_for_leader: Duration,
}

pub use mainstay_watchdog::Mode as WatchdogMode;

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
