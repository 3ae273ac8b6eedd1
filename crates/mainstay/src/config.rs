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

impl Config {
    /// Reads and validates a file. Touches nothing on disk.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|err| ConfigError {
            path: path.to_path_buf(),
            key: None,
            message: format!("cannot read the file: {err}; check the path and its permissions"),
        })?;
        Config::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|err| ConfigError {
            path: path.to_path_buf(),
            key: None,
            message: format!(
                "{}\nfix: see docs/configuration.md for the keys, their types and an example",
                err.to_string().trim_end()
            ),
        })?;
        let refuse = |(key, message): (&str, String)| ConfigError {
            path: path.to_path_buf(),
            key: Some(key.to_string()),
            message,
        };
        config.validate().map_err(refuse)?;
        config.watchdog = config.watchdog_config().map_err(refuse)?;
        Ok(config)
    }

    /// `[watchdog]`, typed; called once the timing is known to be valid.
    fn watchdog_config(&self) -> Result<WatchdogConfig, (&'static str, String)> {
        let section = &self.watchdog_section;
        let mode = match section.mode.as_deref() {
            None => WatchdogMode::Off,
            Some(text) => WatchdogMode::parse(text).ok_or_else(|| {
                (
                    "watchdog.mode",
                    format!(
                        "{text:?} is not a mode: use \"off\" (the default: no watchdog), \
                         \"automatic\" (used when the device can be opened) or \"required\" \
                         (never lead without it)"
                    ),
                )
            })?,
        };
        let device = section
            .device
            .clone()
            .unwrap_or_else(default_watchdog_device);
        if device.as_os_str().is_empty() {
            return Err((
                "watchdog.device",
                "is empty: give the watchdog's character device, e.g. \"/dev/watchdog\"".into(),
            ));
        }
        if !device.is_absolute() {
            return Err((
                "watchdog.device",
                format!(
                    "{} is relative: give an absolute path, e.g. \"/dev/watchdog\"",
                    device.display()
                ),
            ));
        }
        let t = self.timing.effective();
        let s = |d: Duration| d.as_secs_f64();
        let safety = section.safety_margin.unwrap_or(0.0);
        if !(safety >= 0.0 && safety < s(t.ttl)) {
            return Err((
                "watchdog.safety_margin",
                format!(
                    "{safety} is out of range: give seconds, from 0 (the default) to less than timing.ttl"
                ),
            ));
        }
        let safety_margin = Duration::from_secs_f64(safety);
        let timeout = match mainstay_watchdog::timeout_for(
            t.ttl,
            t.fencing_margin,
            t.dcs_timeout,
            safety_margin,
        ) {
            Some(timeout) => timeout,
            None if mode == WatchdogMode::Off => Duration::ZERO,
            None => {
                return Err((
                    "watchdog.mode",
                    format!(
                        "\"{mode}\" needs a device timeout of at least 1 s, but timing.ttl ({}) - \
                         timing.fencing_margin ({}) - timing.dcs_timeout ({}) - \
                         watchdog.safety_margin ({}) leaves {:.2} s (a feed right after a renewal \
                         must end by the fencing deadline); raise timing.ttl, lower \
                         timing.fencing_margin, timing.dcs_timeout or watchdog.safety_margin, or \
                         set watchdog.mode = \"off\"",
                        s(t.ttl),
                        s(t.fencing_margin),
                        s(t.dcs_timeout),
                        safety,
                        s(t.ttl) - s(t.fencing_margin) - s(t.dcs_timeout) - safety
                    ),
                ));
            }
        };
        Ok(WatchdogConfig {
            mode,
            device,
            timeout,
            safety_margin,
        })
    }

    /// `mainstay config check`'s look at the watchdog: opens the device,
    /// sets its timeout and closes it cleanly at once (magic close, so that
    /// nothing stays armed; a driver with nowayout is refused before it is
    /// opened when sysfs says so). Only `config check` calls this:
    /// [`Config::load`] never touches the device.
    pub fn check_watchdog(&self, path: &Path) -> WatchdogCheck {
        let watchdog = &self.watchdog;
        let problem = |message: String| ConfigError {
            path: path.to_path_buf(),
            key: Some("watchdog.device".into()),
            message,
        };
        match watchdog.mode {
            WatchdogMode::Off => WatchdogCheck::Off,
            mode => match mainstay_watchdog::Watchdog::probe(&watchdog.settings()) {
                Ok(probe) => WatchdogCheck::Ready(format!(
                    "watchdog: {} ready ({probe}), mode {mode}",
                    watchdog.device.display()
                )),
                Err(err) if mode == WatchdogMode::Required => WatchdogCheck::Error(problem(
                    format!("mode \"required\", but this node could never lead: {err}"),
                )),
                Err(err) => WatchdogCheck::Warning(problem(format!(
                    "mode \"automatic\": this node would lead without a watchdog: {err}"
                ))),
            },
        }
    }

    /// The virtual IP, if configured (both keys or neither).
    pub fn vip_spec(&self) -> Result<Option<crate::vip::VipSpec>, (&'static str, String)> {
        match (&self.vip, &self.vip_interface) {
            (None, None) => Ok(None),
            (Some(_), None) => Err((
                "vip_interface",
                "is missing: vip needs the interface to add it on, e.g. vip_interface = \"eth0\""
                    .into(),
            )),
            (None, Some(_)) => Err((
                "vip",
                "is missing: vip_interface is set but no address, e.g. vip = \"10.0.0.50/24\""
                    .into(),
            )),
            (Some(vip), Some(interface)) => crate::vip::VipSpec::parse(vip, interface)
                .map(Some)
                .map_err(|e| ("vip", e)),
        }
    }

    fn validate(&self) -> Result<(), (&'static str, String)> {
        check_name("cluster", &self.cluster)?;
        check_name("name", &self.name)?;
        self.vip_spec()?;
        if self.etcd.endpoints.is_empty() {
            return Err((
                "etcd.endpoints",
                "is empty: list at least one etcd client URL, e.g. [\"http://10.0.0.1:2379\"]"
                    .into(),
            ));
        }
        for endpoint in &self.etcd.endpoints {
            if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
                return Err((
                    "etcd.endpoints",
                    format!(
                        "{endpoint:?} is not a URL: write it as http://HOST:PORT or https://HOST:PORT"
                    ),
                ));
            }
            if endpoint.starts_with("https://") && self.etcd.ca_file.is_none() {
                return Err((
                    "etcd.ca_file",
                    format!(
                        "{endpoint:?} uses https but no CA is configured: set etcd.ca_file to the PEM of the CA that signed etcd's certificate"
                    ),
                ));
            }
        }
        if self.etcd.username.is_some() != self.etcd.password.is_some() {
            return Err((
                "etcd.password",
                "etcd.username and etcd.password go together: set both or neither".into(),
            ));
        }
        if self.etcd.cert_file.is_some() != self.etcd.key_file.is_some() {
            return Err(("etcd.key_file", "a client certificate needs its key: set both etcd.cert_file and etcd.key_file, or neither".into()));
        }
        for (key, file) in [
            ("etcd.ca_file", &self.etcd.ca_file),
            ("etcd.cert_file", &self.etcd.cert_file),
            ("etcd.key_file", &self.etcd.key_file),
        ] {
            if let Some(file) = file
                && let Err(err) = std::fs::metadata(file)
            {
                return Err((key, format!("cannot read {}: {err}", file.display())));
            }
        }
        if self.api.username.is_some() != self.api.password.is_some() {
            return Err((
                "api.password",
                "api.username and api.password go together: set both or neither".into(),
            ));
        }
        if self.api.password.as_deref().is_some_and(str::is_empty)
            || self.api.token.as_deref().is_some_and(|t| t.len() < 16)
        {
            return Err((
                "api.token",
                "an empty password or a token shorter than 16 characters guards nothing: \
                 use a long random value (e.g. `openssl rand -hex 24`)"
                    .into(),
            ));
        }
        if self.api.cert_file.is_some() != self.api.key_file.is_some() {
            return Err((
                "api.key_file",
                "HTTPS needs both api.cert_file and api.key_file (PEM), or neither".into(),
            ));
        }
        for (key, file) in [
            ("api.cert_file", &self.api.cert_file),
            ("api.key_file", &self.api.key_file),
            ("api.ca_file", &self.api.ca_file),
        ] {
            if let Some(file) = file
                && let Err(err) = std::fs::metadata(file)
            {
                return Err((key, format!("cannot read {}: {err}", file.display())));
            }
        }
        for (key, listen, example) in [
            ("proxy.listen", &self.proxy.listen, "0.0.0.0:5000"),
            (
                "proxy.read_only_listen",
                &self.proxy.read_only_listen,
                "0.0.0.0:5001",
            ),
        ] {
            if let Some(listen) = listen
                && listen.parse::<std::net::SocketAddr>().is_err()
            {
                return Err((
                    key,
                    format!(
                        "{listen:?} is not an address: write it as IP:PORT, e.g. \"{example}\""
                    ),
                ));
            }
        }
        if self.proxy.listen.is_some() && self.proxy.listen == self.proxy.read_only_listen {
            return Err((
                "proxy.read_only_listen",
                "is the same address as proxy.listen: give each listener its own port".into(),
            ));
        }
        if let ByteSize::Text(text) = &self.proxy.replica_max_lag
            && self.proxy.replica_max_lag.bytes().is_none()
        {
            return Err((
                "proxy.replica_max_lag",
                format!(
                    "{text:?} is not a size: give bytes (16777216) or a number with a unit B, \
                     kB, MB, GB or TB (\"16MB\")"
                ),
            ));
        }
        if !(self.proxy.wait_for_leader > 0.0 && self.proxy.wait_for_leader <= 300.0) {
            return Err((
                "proxy.wait_for_leader",
                format!(
                    "{} is out of range: give seconds between 0 and 300",
                    self.proxy.wait_for_leader
                ),
            ));
        }
        if !(self.api.header_timeout >= 0.1 && self.api.header_timeout <= 300.0) {
            return Err((
                "api.header_timeout",
                format!(
                    "{} is out of range: give seconds from 0.1 to 300 (default 10)",
                    self.api.header_timeout
                ),
            ));
        }
        if !(1..=65_536).contains(&self.api.max_connections) {
            return Err((
                "api.max_connections",
                format!(
                    "{} is out of range: give a number from 1 to 65536 (default 256)",
                    self.api.max_connections
                ),
            ));
        }
        if self.api.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err((
                "api.listen",
                format!(
                    "{:?} is not an address: write it as IP:PORT, e.g. \"0.0.0.0:8008\"",
                    self.api.listen
                ),
            ));
        }
        let pg = &self.postgresql;
        if !pg.data_dir.is_absolute() {
            return Err((
                "postgresql.data_dir",
                format!(
                    "{} is relative: give an absolute path",
                    pg.data_dir.display()
                ),
            ));
        }
        if pg
            .data_dir
            .parent()
            .is_none_or(|p| p.as_os_str().is_empty() || p == Path::new("/"))
        {
            return Err(("postgresql.data_dir", "must be below a directory of its own (mainstay keeps its password file and logs beside it), e.g. /var/lib/mainstay/data".into()));
        }
        // PostgreSQL refuses a Unix socket path over 107 bytes and would
        // fail every start: refuse the file instead.
        let socket = crate::agent::pg_settings(self)
            .socket_path()
            .join(format!(".s.PGSQL.{}", pg.port));
        if socket.as_os_str().len() > 107 {
            return Err((
                "postgresql.data_dir",
                format!(
                    "puts PostgreSQL's socket at {} ({} bytes; the limit is 107): choose a \
                     shorter data directory path",
                    socket.display(),
                    socket.as_os_str().len()
                ),
            ));
        }
        if !pg.bin_dir.join("postgres").exists() {
            return Err((
                "postgresql.bin_dir",
                format!(
                    "{} has no `postgres` binary: point it at PostgreSQL 15's bin directory, e.g. /usr/lib/postgresql/15/bin",
                    pg.bin_dir.display()
                ),
            ));
        }
        if pg.port == 0 {
            return Err(("postgresql.port", "must be between 1 and 65535".into()));
        }
        if pg.connect_address.is_none()
            && (pg.listen.contains('*') || pg.listen.contains("0.0.0.0") || pg.listen.contains(','))
        {
            return Err((
                "postgresql.connect_address",
                format!(
                    "postgresql.listen is {:?}, which other nodes cannot dial: set connect_address to this node's address",
                    pg.listen
                ),
            ));
        }
        for (key, credentials) in [
            ("postgresql.superuser", &pg.superuser),
            ("postgresql.replication", &pg.replication),
        ] {
            if credentials.username.is_empty() || credentials.password.is_empty() {
                return Err((key, "needs a non-empty username and password".into()));
            }
        }
        if pg.superuser.username == pg.replication.username {
            return Err((
                "postgresql.replication.username",
                "must differ from the superuser's: replication gets a role of its own".into(),
            ));
        }
        for (name, value) in &pg.parameters {
            if !matches!(
                value,
                toml::Value::String(_)
                    | toml::Value::Integer(_)
                    | toml::Value::Float(_)
                    | toml::Value::Boolean(_)
            ) {
                return Err((
                    "postgresql.parameters",
                    format!("{name} must be a string, number or boolean"),
                ));
            }
        }
        self.check_timing()
    }

    fn check_timing(&self) -> Result<(), (&'static str, String)> {
        let t = self.timing.effective();
        let s = |d: Duration| d.as_secs_f64();
        if t.ttl.as_secs() < ETCD_MIN_TTL_SECS {
            return Err((
                "timing.ttl",
                format!(
                    "{} s is below etcd's minimum lease ({ETCD_MIN_TTL_SECS} s): raise it",
                    t.ttl.as_secs()
                ),
            ));
        }
        for (key, value) in [
            ("timing.loop_wait", t.loop_wait),
            ("timing.renew_interval", t.renew_interval),
            ("timing.dcs_timeout", t.dcs_timeout),
            ("timing.fencing_margin", t.fencing_margin),
        ] {
            if value < Duration::from_millis(50) {
                return Err((
                    key,
                    format!("{} s is too short: use at least 0.05", s(value)),
                ));
            }
        }
        if t.renew_interval > t.ttl / 3 {
            return Err((
                "timing.renew_interval",
                format!(
                    "{} s is more than ttl/3 ({:.2} s): renew at least three times per lease",
                    s(t.renew_interval),
                    s(t.ttl) / 3.0
                ),
            ));
        }
        if t.fencing_margin >= t.ttl {
            return Err(("timing.fencing_margin", "must be shorter than ttl".into()));
        }
        // A keep-alive sent just before the previous confirmation ran out must
        // be able to come back (or time out) before the fencing deadline.
        if t.renew_interval + t.dcs_timeout >= t.ttl - t.fencing_margin {
            return Err((
                "timing",
                format!(
                    "renew_interval ({}) + dcs_timeout ({}) must be less than ttl ({}) - fencing_margin ({}): \
                     otherwise a leader could lose its lease before it notices; lower the first two or raise ttl",
                    s(t.renew_interval),
                    s(t.dcs_timeout),
                    s(t.ttl),
                    s(t.fencing_margin)
                ),
            ));
        }
        if t.loop_wait > t.ttl {
            return Err(("timing.loop_wait", "must not exceed ttl".into()));
        }
        Ok(())
    }

    pub fn rewind_credentials(&self) -> &Credentials {
        self.postgresql
            .rewind
            .as_ref()
            .unwrap_or(&self.postgresql.superuser)
    }

    pub fn pg_connect_host(&self) -> String {
        self.postgresql
            .connect_address
            .clone()
            .unwrap_or_else(|| self.postgresql.listen.clone())
    }

    pub fn api_url(&self) -> String {
        self.api.connect_url.clone().unwrap_or_else(|| {
            let scheme = if self.api.cert_file.is_some() {
                "https"
            } else {
                "http"
            };
            format!("{scheme}://{}", self.api.listen)
        })
    }
}

fn check_name(key: &'static str, value: &str) -> Result<(), (&'static str, String)> {
    let valid = !value.is_empty()
        && value.len() <= 63
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if valid {
        Ok(())
    } else {
        Err((
            key,
            format!("{value:?} is not a valid name: use 1-63 letters, digits, '-', '_' or '.'"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
cluster = "ship"
name = "node1"
[etcd]
endpoints = ["http://127.0.0.1:2379"]
[postgresql]
data_dir = "/var/lib/mainstay/data"
port = 5432
superuser = { username = "postgres", password = "s3cret" }
replication = { username = "replicator", password = "r3pl" }
"#;

    /// Validation refuses a `bin_dir` without `postgres`, so these tests need
    /// PostgreSQL 15 where the default points; without it they fail, unless
    /// `MAINSTAY_ALLOW_SKIP=1` (then they return).
    fn postgres_installed() -> bool {
        let ok = default_bin_dir().join("postgres").exists();
        if !ok {
            mainstay_testkit::skip(&format!(
                "needs PostgreSQL 15 in {}: run scripts/setup.sh",
                default_bin_dir().display()
            ));
        }
        ok
    }

    fn check(extra: &str, key: Option<&str>, needle: &str) {
        check_text(&format!("{GOOD}{extra}"), key, needle);
    }

    fn check_text(text: &str, key: Option<&str>, needle: &str) {
        let extra = text;
        match Config::parse(Path::new("test.toml"), text) {
            Ok(_) => panic!("accepted: {extra}"),
            Err(err) => {
                assert_eq!(err.key.as_deref(), key, "{err}");
                assert!(err.to_string().contains(needle), "{err} lacks {needle}");
            }
        }
    }

    #[test]
    fn a_good_file_parses_with_defaults() {
        if !postgres_installed() {
            return;
        }
        let config = Config::parse(Path::new("t"), GOOD).unwrap();
        let t = config.timing.effective();
        assert_eq!(t.ttl, Duration::from_secs(4));
        assert_eq!(config.postgresql.run_as, "postgres");
        assert!(!format!("{config:?}").contains("s3cret"));
    }

    #[test]
    fn bad_files_name_the_key() {
        if !postgres_installed() {
            return;
        }
        check("[timing]\nttl = 1\n", Some("timing.ttl"), "etcd's minimum");
        check(
            "[timing]\nttl = 4\nrenew_interval = 2\n",
            Some("timing.renew_interval"),
            "ttl/3",
        );
        check(
            "[timing]\nrenew_interval = 1\ndcs_timeout = 2\n",
            Some("timing"),
            "fencing_margin",
        );
        check("[timing]\nttl = \"4s\"\n", None, "invalid type");
        check("bogus = 1\n", None, "unknown field");
        check("[tags]\npriority = \"high\"\n", None, "invalid type");
        check(
            "[api]\nlisten = \"nowhere\"\n",
            Some("api.listen"),
            "IP:PORT",
        );
    }

    #[test]
    fn bad_vip_and_proxy_settings_name_the_key() {
        if !postgres_installed() {
            return;
        }
        let top = |lines: &str| format!("{lines}\n{GOOD}");
        check_text(
            &top("vip = \"10.0.0.50/24\""),
            Some("vip_interface"),
            "eth0",
        );
        check_text(&top("vip_interface = \"eth0\""), Some("vip"), "no address");
        check_text(
            &top("vip = \"10.0.0.50\"\nvip_interface = \"eth0\""),
            Some("vip"),
            "prefix length",
        );
        check(
            "[proxy]\nread_only_listen = \"everywhere\"\n",
            Some("proxy.read_only_listen"),
            "IP:PORT",
        );
        let long = GOOD.replace(
            "/var/lib/mainstay/data",
            &format!("/{}/data", "x".repeat(90)),
        );
        check_text(&long, Some("postgresql.data_dir"), "limit is 107");
        check(
            "[proxy]\nreplica_max_lag = \"lots\"\n",
            Some("proxy.replica_max_lag"),
            "16MB",
        );
        check(
            "[proxy]\nlisten = \"0.0.0.0:5000\"\nread_only_listen = \"0.0.0.0:5000\"\n",
            Some("proxy.read_only_listen"),
            "own port",
        );
        let good = top("vip = \"10.0.0.50/24\"\nvip_interface = \"eth0\"");
        let config = Config::parse(Path::new("t"), &good).unwrap();
        assert_eq!(config.vip_spec().unwrap().unwrap().cidr(), "10.0.0.50/24");
    }

    #[test]
    fn the_watchdog_section_is_typed_with_a_timeout_from_the_timing() {
        if !postgres_installed() {
            return;
        }
        let parse = |extra: &str| Config::parse(Path::new("t"), &format!("{GOOD}{extra}")).unwrap();
        let off = parse("").watchdog;
        assert_eq!(off.mode, WatchdogMode::Off);
        assert_eq!(off.device, Path::new("/dev/watchdog"));
        // Default profile: 4 - 1 - 1 = 2 s.
        assert_eq!(off.timeout, Duration::from_secs(2));
        let required =
            parse("[watchdog]\nmode = \"required\"\ndevice = \"/dev/watchdog1\"\n").watchdog;
        assert_eq!(required.mode, WatchdogMode::Required);
        assert_eq!(required.timeout, Duration::from_secs(2));
        let settings = required.settings();
        assert_eq!(settings.device, Path::new("/dev/watchdog1"));
        assert_eq!(settings.timeout, Duration::from_secs(2));
        // Fast profile: 2 - 0.5 - 0.4 = 1.1, rounded down to 1 s.
        let fast =
            parse("[timing]\nprofile = \"fast\"\n[watchdog]\nmode = \"automatic\"\n").watchdog;
        assert_eq!(fast.mode, WatchdogMode::Automatic);
        assert_eq!(fast.timeout, Duration::from_secs(1));
        // A safety margin comes off the timeout: 4 - 1 - 1 - 0.5 = 1.5 -> 1 s.
        let margin = parse("[watchdog]\nmode = \"required\"\nsafety_margin = 0.5\n").watchdog;
        assert_eq!(margin.timeout, Duration::from_secs(1));
        assert_eq!(margin.safety_margin, Duration::from_millis(500));
        // Timing too short for a watchdog is fine while it is off.
        let short = "[timing]\nprofile = \"fast\"\ndcs_timeout = 0.6\n";
        assert_eq!(parse(short).watchdog.timeout, Duration::ZERO);
    }

    #[test]
    fn bad_watchdog_settings_name_the_key_and_the_fix() {
        if !postgres_installed() {
            return;
        }
        check(
            "[watchdog]\nmode = \"sometimes\"\n",
            Some("watchdog.mode"),
            "\"sometimes\" is not a mode: use \"off\"",
        );
        check(
            "[watchdog]\nmode = \"on\"\n",
            Some("watchdog.mode"),
            "\"required\"",
        );
        check(
            "[watchdog]\nmode = \"automatic\"\ndevice = \"\"\n",
            Some("watchdog.device"),
            "is empty: give the watchdog's character device, e.g. \"/dev/watchdog\"",
        );
        check(
            "[watchdog]\ndevice = \"watchdog0\"\n",
            Some("watchdog.device"),
            "absolute path",
        );
        check(
            "[watchdog]\nsafety_margin = -1\n",
            Some("watchdog.safety_margin"),
            "out of range",
        );
        check(
            "[watchdog]\nsafety_margin = inf\n",
            Some("watchdog.safety_margin"),
            "out of range",
        );
        check("[watchdog]\ntimeout = 5\n", None, "unknown field");
        // ttl 2 - fencing_margin 0.5 - dcs_timeout 0.6 = 0.9 s: no 1 s watchdog fits.
        for (timing, left) in [
            (
                "[timing]\nprofile = \"fast\"\ndcs_timeout = 0.6\n",
                "0.90 s",
            ),
            ("[watchdog]\nsafety_margin = 1.5\n", "0.50 s"),
        ] {
            for mode in ["required", "automatic"] {
                let extra = if timing.contains("[watchdog]") {
                    format!("{timing}mode = \"{mode}\"\n")
                } else {
                    format!("{timing}[watchdog]\nmode = \"{mode}\"\n")
                };
                let text = format!("{GOOD}{extra}");
                let err = Config::parse(Path::new("t"), &text).unwrap_err();
                assert_eq!(err.key.as_deref(), Some("watchdog.mode"), "{err}");
                let message = err.to_string();
                for needle in [
                    "needs a device timeout of at least 1 s",
                    "timing.ttl",
                    "timing.fencing_margin",
                    "timing.dcs_timeout",
                    left,
                    "set watchdog.mode = \"off\"",
                ] {
                    assert!(message.contains(needle), "{message} lacks {needle}");
                }
            }
        }
    }

    /// These machines have no watchdog device: `config check` is tested on
    /// what it refuses, never on a real watchdog.
    #[test]
    fn config_check_reports_an_unusable_watchdog_by_mode() {
        if !postgres_installed() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("watchdog");
        let regular = dir.path().join("file");
        std::fs::write(&regular, "").unwrap();
        let config = |mode: &str, device: &Path| {
            let extra = format!(
                "[watchdog]\nmode = \"{mode}\"\ndevice = \"{}\"\n",
                device.display()
            );
            Config::parse(Path::new("node.toml"), &format!("{GOOD}{extra}")).unwrap()
        };
        let file = Path::new("node.toml");
        assert!(matches!(
            config("off", &missing).check_watchdog(file),
            WatchdogCheck::Off
        ));
        let WatchdogCheck::Error(err) = config("required", &missing).check_watchdog(file) else {
            panic!("a required, missing watchdog must be an error");
        };
        assert_eq!(err.key.as_deref(), Some("watchdog.device"));
        let line = err.to_string();
        assert!(!line.contains('\n'), "one line: {line}");
        for needle in [
            "node.toml: key `watchdog.device`",
            "mode \"required\", but this node could never lead",
            missing.to_str().unwrap(),
            "modprobe softdog",
        ] {
            assert!(line.contains(needle), "{line} lacks {needle}");
        }
        let WatchdogCheck::Warning(err) = config("automatic", &regular).check_watchdog(file) else {
            panic!("an automatic, unusable watchdog must be a warning");
        };
        let line = err.to_string();
        assert!(line.contains("would lead without a watchdog"), "{line}");
        assert!(line.contains("is not a watchdog device"), "{line}");
        assert_eq!(std::fs::read(&regular).unwrap(), b"", "nothing written");
    }

    #[test]
    fn missing_and_malformed_keys_are_refused() {
        for text in [
            "cluster = \"a\"\n",
            "cluster = \"a\" name = \"b\"",
            "name = \"b\"\ncluster = \"a\"\n[etcd]\nendpoints = []\n",
        ] {
            assert!(Config::parse(Path::new("t"), text).is_err(), "{text}");
        }
        let bad_name = GOOD.replace("\"node1\"", "\"node 1\"");
        assert_eq!(
            Config::parse(Path::new("t"), &bad_name)
                .unwrap_err()
                .key
                .as_deref(),
            Some("name")
        );
    }

    #[test]
    fn api_client_limits_are_bounded() {
        if !postgres_installed() {
            return;
        }
        let with =
            |extra: &str| GOOD.replace("[postgresql]", &format!("[api]\n{extra}\n[postgresql]"));
        let config = Config::parse(
            Path::new("t"),
            &with("header_timeout = 2.5\nmax_connections = 10"),
        )
        .unwrap();
        assert_eq!(
            config.api.limits().header_timeout,
            Duration::from_millis(2500)
        );
        assert_eq!(config.api.limits().max_connections, 10);
        for (extra, key) in [
            ("header_timeout = 0", "api.header_timeout"),
            ("header_timeout = 301", "api.header_timeout"),
            ("header_timeout = nan", "api.header_timeout"),
            ("max_connections = 0", "api.max_connections"),
        ] {
            let refused = Config::parse(Path::new("t"), &with(extra)).unwrap_err();
            assert_eq!(refused.key.as_deref(), Some(key), "{extra}");
        }
    }
}
