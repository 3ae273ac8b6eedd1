//! Loading a node's file: parsing, then turning each section into its
//! typed part, refusing a bad value with the key, the reason and the fix
//! before anything runs. Every default is a named constant here.

use super::file::*;
use super::*;
use mainstay_dcs::EtcdTls;
use mainstay_pg::Credentials;

/// A refused value: its key, and what is wrong with it and how to fix it.
type Refusal = (&'static str, String);

/// etcd refuses leases shorter than 1.5 × its election timeout (1.5 s with
/// its defaults) by silently lengthening them; leases are whole seconds.
const ETCD_MIN_TTL_SECS: u64 = 2;
/// A longer lease would mean as long an outage when a leader dies; it also
/// keeps every duration derived from the ttl far from overflowing.
const MAX_TTL_SECS: u64 = 3600;

const DEFAULT_PG_LISTEN: &str = "127.0.0.1";
const DEFAULT_PG_PORT: u16 = 5432;
const DEFAULT_RUN_AS: &str = "postgres";
const DEFAULT_API_LISTEN: &str = "127.0.0.1:8008";
const DEFAULT_HEADER_TIMEOUT_SECS: f64 = 10.0;
const DEFAULT_MAX_CONNECTIONS: usize = 256;
/// HAProxy's default `agent-inter` is 2 s; the documented configuration
/// polls every 0.5 s, which this covers twice over.
const DEFAULT_AGENT_CHECK_WAIT_SECS: f64 = 1.0;
/// A longer wait delays every switchover by as much.
const MAX_AGENT_CHECK_WAIT_SECS: f64 = 10.0;
const DEFAULT_REPLICA_MAX_LAG: u64 = 16 << 20;
const DEFAULT_WAIT_FOR_LEADER_SECS: f64 = 10.0;
/// A replica more than 10 s behind is what a ship's operators are told to
/// watch for; a full disk is the commonest cause of a dead database.
const DEFAULT_LAG_ALERT_SECS: f64 = 10.0;
/// A minute: a settle time and a few rounds even on a slow link.
const DEFAULT_FILES_LAG_ALERT_SECS: f64 = 60.0;
const DEFAULT_LAG_ALERT_BYTES: u64 = 64 << 20;
const DEFAULT_DISK_FREE_ALERT_BYTES: u64 = 1 << 30;
const DEFAULT_DISK_FREE_ALERT_PERCENT: f64 = 10.0;

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
        let file: File = toml::from_str(text).map_err(|err| ConfigError {
            path: path.to_path_buf(),
            key: None,
            message: format!(
                "{}\nfix: see docs/configuration.md for the keys, their types and an example",
                err.to_string().trim_end()
            ),
        })?;
        Config::from_file(file).map_err(|(key, message)| ConfigError {
            path: path.to_path_buf(),
            key: Some(key),
            message,
        })
    }

    fn from_file(file: File) -> Result<Config, (String, String)> {
        let owned = |(key, message): Refusal| (key.to_string(), message);
        check_name("cluster", &file.cluster).map_err(owned)?;
        check_name("name", &file.name).map_err(owned)?;
        let timing = timing(&file.timing).map_err(owned)?;
        let postgresql = postgresql(file.postgresql, &file.name).map_err(owned)?;
        // Beside the data directory, like PostgreSQL's own log.
        let log_dir = postgresql
            .data_dir
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let replicate = super::replicate::directories(file.replicate, &postgresql.data_dir)?;
        let mut avoid: Vec<&Path> = vec![&postgresql.data_dir];
        avoid.extend(replicate.iter().map(|r| r.path.as_path()));
        Ok(Config {
            vip: vip(file.vip.as_deref(), file.vip_interface.as_deref()).map_err(owned)?,
            etcd_member: super::etcd_member::member(
                &file.etcd,
                &file.name,
                &file.cluster,
                timing.ttl,
                &avoid,
            )
            .map_err(owned)?,
            etcd: etcd(file.etcd, &file.cluster, &timing).map_err(owned)?,
            api: api(file.api).map_err(owned)?,
            proxy: proxy(file.proxy).map_err(owned)?,
            watchdog: watchdog(&file.watchdog, &timing).map_err(owned)?,
            services: super::service::services(file.services, &log_dir, &file.name)?,
            hooks: super::service::hooks(file.callbacks)?,
            alerts: alerts(file.alerts).map_err(owned)?,
            replicate,
            postgresql,
            timing,
            tags: super::tags::tags(file.tags)?,
            cluster: file.cluster,
            name: file.name,
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
}

/// `[timing]`: the profile's values, each overridden by the file's.
pub(super) fn timing(section: &TimingSection) -> Result<Timing, Refusal> {
    let profile = match section.profile {
        Profile::Default => Timing::DEFAULT,
        Profile::Fast => Timing::FAST,
    };
    if section.ttl.is_some_and(|ttl| ttl > MAX_TTL_SECS) {
        return Err((
            "timing.ttl",
            format!(
                "is over {MAX_TTL_SECS} s: a dead leader would be replaced only that late; lower it"
            ),
        ));
    }
    let t = Timing {
        ttl: section.ttl.map_or(profile.ttl, Duration::from_secs),
        loop_wait: seconds("timing.loop_wait", section.loop_wait, profile.loop_wait)?,
        renew_interval: seconds(
            "timing.renew_interval",
            section.renew_interval,
            profile.renew_interval,
        )?,
        dcs_timeout: seconds(
            "timing.dcs_timeout",
            section.dcs_timeout,
            profile.dcs_timeout,
        )?,
        fencing_margin: seconds(
            "timing.fencing_margin",
            section.fencing_margin,
            profile.fencing_margin,
        )?,
    };
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
    Ok(t)
}

/// Seconds as written (fractions allowed), or the default.
fn seconds(key: &'static str, value: Option<f64>, default: Duration) -> Result<Duration, Refusal> {
    match value {
        None => Ok(default),
        Some(value) => Duration::try_from_secs_f64(value).map_err(|_| {
            (
                key,
                format!("{value} is not a duration: give seconds, e.g. 1 or 0.5"),
            )
        }),
    }
}

/// The virtual IP, if configured (both keys or neither).
fn vip(vip: Option<&str>, interface: Option<&str>) -> Result<Option<VipSpec>, Refusal> {
    match (vip, interface) {
        (None, None) => Ok(None),
        (Some(_), None) => Err((
            "vip_interface",
            "is missing: vip needs the interface to add it on, e.g. vip_interface = \"eth0\""
                .into(),
        )),
        (None, Some(_)) => Err((
            "vip",
            "is missing: vip_interface is set but no address, e.g. vip = \"10.0.0.50/24\"".into(),
        )),
        (Some(vip), Some(interface)) => VipSpec::parse(vip, interface)
            .map(Some)
            .map_err(|e| ("vip", e)),
    }
}

pub(super) fn etcd(
    section: EtcdSection,
    cluster: &str,
    timing: &Timing,
) -> Result<EtcdSettings, Refusal> {
    if section.endpoints.is_empty() {
        return Err((
            "etcd.endpoints",
            "is empty: list at least one etcd client URL, e.g. [\"http://10.0.0.1:2379\"]".into(),
        ));
    }
    for endpoint in &section.endpoints {
        if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
            return Err((
                "etcd.endpoints",
                format!(
                    "{endpoint:?} is not a URL: write it as http://HOST:PORT or https://HOST:PORT"
                ),
            ));
        }
        if endpoint.starts_with("https://") && section.ca_file.is_none() {
            return Err((
                "etcd.ca_file",
                format!(
                    "{endpoint:?} uses https but no CA is configured: set etcd.ca_file to the PEM of the CA that signed etcd's certificate"
                ),
            ));
        }
    }
    if section.username.is_some() != section.password.is_some() {
        return Err((
            "etcd.password",
            "etcd.username and etcd.password go together: set both or neither".into(),
        ));
    }
    if section.cert_file.is_some() != section.key_file.is_some() {
        return Err(("etcd.key_file", "a client certificate needs its key: set both etcd.cert_file and etcd.key_file, or neither".into()));
    }
    for (key, file) in [
        ("etcd.ca_file", &section.ca_file),
        ("etcd.cert_file", &section.cert_file),
        ("etcd.key_file", &section.key_file),
    ] {
        if let Some(file) = file
            && let Err(err) = std::fs::metadata(file)
        {
            return Err((key, format!("cannot read {}: {err}", file.display())));
        }
    }
    let tls = (section.ca_file.is_some() || section.cert_file.is_some()).then_some(EtcdTls {
        ca_file: section.ca_file,
        cert_file: section.cert_file,
        key_file: section.key_file,
    });
    let mut settings = EtcdSettings::new(section.endpoints, cluster);
    settings.request_timeout = timing.dcs_timeout;
    settings.connect_timeout = timing.dcs_timeout;
    settings.username = section.username;
    settings.password = section.password;
    settings.tls = tls;
    Ok(settings)
}

pub(super) fn api(section: ApiSection) -> Result<ApiConfig, Refusal> {
    if section.username.is_some() != section.password.is_some() {
        return Err((
            "api.password",
            "api.username and api.password go together: set both or neither".into(),
        ));
    }
    if section.password.as_deref().is_some_and(str::is_empty)
        || section.token.as_deref().is_some_and(|t| t.len() < 16)
    {
        return Err((
            "api.token",
            "an empty password or a token shorter than 16 characters guards nothing: \
                 use a long random value (e.g. `openssl rand -hex 24`)"
                .into(),
        ));
    }
    if section.cert_file.is_some() != section.key_file.is_some() {
        return Err((
            "api.key_file",
            "HTTPS needs both api.cert_file and api.key_file (PEM), or neither".into(),
        ));
    }
    for (key, file) in [
        ("api.cert_file", &section.cert_file),
        ("api.key_file", &section.key_file),
        ("api.ca_file", &section.ca_file),
    ] {
        if let Some(file) = file
            && let Err(err) = std::fs::metadata(file)
        {
            return Err((key, format!("cannot read {}: {err}", file.display())));
        }
    }
    let header_timeout = section
        .header_timeout
        .unwrap_or(DEFAULT_HEADER_TIMEOUT_SECS);
    if !(0.1..=300.0).contains(&header_timeout) {
        return Err((
            "api.header_timeout",
            format!(
                "{header_timeout} is out of range: give seconds from 0.1 to 300 (default {DEFAULT_HEADER_TIMEOUT_SECS})"
            ),
        ));
    }
    let max_connections = section.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS);
    if !(1..=65_536).contains(&max_connections) {
        return Err((
            "api.max_connections",
            format!(
                "{max_connections} is out of range: give a number from 1 to 65536 (default {DEFAULT_MAX_CONNECTIONS})"
            ),
        ));
    }
    let listen = socket_address(
        "api.listen",
        section.listen.as_deref().unwrap_or(DEFAULT_API_LISTEN),
        "0.0.0.0:8008",
    )?;
    let agent_check = match section.agent_check_listen {
        None => {
            if section.agent_check_wait.is_some() {
                return Err((
                    "api.agent_check_wait",
                    "is set without api.agent_check_listen: set the port too, or remove it".into(),
                ));
            }
            None
        }
        Some(text) => {
            let agent_listen = socket_address("api.agent_check_listen", &text, "0.0.0.0:8009")?;
            if agent_listen == listen
                || (agent_listen.port() == listen.port()
                    && (agent_listen.ip().is_unspecified() || listen.ip().is_unspecified()))
            {
                return Err((
                    "api.agent_check_listen",
                    format!(
                        "{agent_listen} is the REST API's own address ({listen}): give the \
                         agent check a port of its own, e.g. \"0.0.0.0:8009\""
                    ),
                ));
            }
            let wait = section
                .agent_check_wait
                .unwrap_or(DEFAULT_AGENT_CHECK_WAIT_SECS);
            if !(0.0..=MAX_AGENT_CHECK_WAIT_SECS).contains(&wait) {
                return Err((
                    "api.agent_check_wait",
                    format!(
                        "{wait} is out of range: give seconds from 0 to {MAX_AGENT_CHECK_WAIT_SECS}, \
                         at least HAProxy's agent-inter (default {DEFAULT_AGENT_CHECK_WAIT_SECS})"
                    ),
                ));
            }
            Some(AgentCheckConfig {
                listen: agent_listen,
                step_down_wait: Duration::from_secs_f64(wait),
            })
        }
    };
    let tls = section
        .cert_file
        .zip(section.key_file)
        .map(|(cert_file, key_file)| TlsFiles {
            cert_file,
            key_file,
        });
    let url = section.connect_url.unwrap_or_else(|| {
        let scheme = if tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{listen}")
    });
    Ok(ApiConfig {
        listen,
        url,
        basic: section.username.zip(section.password),
        token: section.token,
        tls,
        ca_file: section.ca_file,
        header_timeout: Duration::from_secs_f64(header_timeout),
        max_connections,
        agent_check,
    })
}

fn socket_address(key: &'static str, text: &str, example: &str) -> Result<SocketAddr, Refusal> {
    text.parse().map_err(|_| {
        (
            key,
            format!("{text:?} is not an address: write it as IP:PORT, e.g. \"{example}\""),
        )
    })
}

fn proxy(section: ProxySection) -> Result<ProxyConfig, Refusal> {
    let listen = section
        .listen
        .map(|text| socket_address("proxy.listen", &text, "0.0.0.0:5000"))
        .transpose()?;
    let read_only_listen = section
        .read_only_listen
        .map(|text| socket_address("proxy.read_only_listen", &text, "0.0.0.0:5001"))
        .transpose()?;
    if listen.is_some() && listen == read_only_listen {
        return Err((
            "proxy.read_only_listen",
            "is the same address as proxy.listen: give each listener its own port".into(),
        ));
    }
    let replica_max_lag = match section.replica_max_lag {
        None => DEFAULT_REPLICA_MAX_LAG,
        Some(ByteSize::Bytes(bytes)) => bytes,
        Some(ByteSize::Text(text)) => parse_size(&text).ok_or_else(|| {
            (
                "proxy.replica_max_lag",
                format!(
                    "{text:?} is not a size: give bytes (16777216) or a number with a unit B, \
                     kB, MB, GB or TB (\"16MB\")"
                ),
            )
        })?,
    };
    let wait_for_leader = section
        .wait_for_leader
        .unwrap_or(DEFAULT_WAIT_FOR_LEADER_SECS);
    if !(wait_for_leader > 0.0 && wait_for_leader <= 300.0) {
        return Err((
            "proxy.wait_for_leader",
            format!("{wait_for_leader} is out of range: give seconds between 0 and 300"),
        ));
    }
    Ok(ProxyConfig {
        listen,
        read_only_listen,
        replica_max_lag,
        wait_for_leader: Duration::from_secs_f64(wait_for_leader),
    })
}

fn alerts(section: AlertsSection) -> Result<AlertThresholds, Refusal> {
    let size = |key: &'static str, value: Option<ByteSize>, default: u64| match value {
        None => Ok(default),
        Some(ByteSize::Bytes(bytes)) => Ok(bytes),
        Some(ByteSize::Text(text)) => parse_size(&text).ok_or_else(|| {
            (
                key,
                format!("{text:?} is not a size: give bytes or a number with kB, MB, GB or TB"),
            )
        }),
    };
    let lag = section.replication_lag.unwrap_or(DEFAULT_LAG_ALERT_SECS);
    if !(lag > 0.0 && lag <= 86_400.0) {
        return Err((
            "alerts.replication_lag",
            format!("{lag} is out of range: give seconds above 0, at most a day"),
        ));
    }
    let files_lag = section
        .replicated_files_lag
        .unwrap_or(DEFAULT_FILES_LAG_ALERT_SECS);
    if !(files_lag > 0.0 && files_lag <= 86_400.0) {
        return Err((
            "alerts.replicated_files_lag",
            format!("{files_lag} is out of range: give seconds above 0, at most a day"),
        ));
    }
    let percent = section
        .data_disk_free_percent
        .unwrap_or(DEFAULT_DISK_FREE_ALERT_PERCENT);
    if !(0.0..100.0).contains(&percent) {
        return Err((
            "alerts.data_disk_free_percent",
            format!("{percent} is out of range: give a percentage from 0 to below 100"),
        ));
    }
    Ok(AlertThresholds {
        replication_lag: Duration::from_secs_f64(lag),
        replication_lag_bytes: size(
            "alerts.replication_lag_bytes",
            section.replication_lag_bytes,
            DEFAULT_LAG_ALERT_BYTES,
        )?,
        data_disk_free_bytes: size(
            "alerts.data_disk_free",
            section.data_disk_free,
            DEFAULT_DISK_FREE_ALERT_BYTES,
        )?,
        data_disk_free_percent: percent,
        replicated_files_lag: Duration::from_secs_f64(files_lag),
    })
}

fn postgresql(section: PgSection, name: &str) -> Result<PgSettings, Refusal> {
    let pg = section;
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
    let bin_dir = pg.bin_dir.unwrap_or_else(default_bin_dir);
    let mut settings = PgSettings::new(bin_dir, pg.data_dir, name);
    settings.port = pg.port.unwrap_or(DEFAULT_PG_PORT);
    // PostgreSQL refuses a Unix socket path over 107 bytes and would
    // fail every start: refuse the file instead.
    let socket = settings
        .socket_path()
        .join(format!(".s.PGSQL.{}", settings.port));
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
    if !settings.bin_dir.join("postgres").exists() {
        return Err((
            "postgresql.bin_dir",
            format!(
                "{} has no `postgres` binary: point it at PostgreSQL 15's bin directory, e.g. {DEFAULT_BIN_DIR}",
                settings.bin_dir.display()
            ),
        ));
    }
    if settings.port == 0 {
        return Err(("postgresql.port", "must be between 1 and 65535".into()));
    }
    let listen = pg.listen.unwrap_or_else(|| DEFAULT_PG_LISTEN.into());
    let connect_host = match pg.connect_address {
        Some(address) => address,
        None if listen.contains('*') || listen.contains("0.0.0.0") || listen.contains(',') => {
            return Err((
                "postgresql.connect_address",
                format!(
                    "postgresql.listen is {listen:?}, which other nodes cannot dial: set connect_address to this node's address"
                ),
            ));
        }
        None => listen.clone(),
    };
    settings.listen_host = listen;
    settings.connect_host = connect_host;
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
    let credentials = |c: &CredentialsSection| Credentials::new(&c.username, &c.password);
    settings.superuser = credentials(&pg.superuser);
    settings.replication = credentials(&pg.replication);
    settings.rewind = credentials(pg.rewind.as_ref().unwrap_or(&pg.superuser));
    // PostgreSQL refuses to run as root; as any other user it runs as us.
    settings.run_as = (mainstay_sys::process::geteuid() == 0)
        .then(|| pg.run_as.unwrap_or_else(|| DEFAULT_RUN_AS.into()));
    for (name, value) in pg.parameters {
        let value = match value {
            toml::Value::String(text) => text,
            value @ (toml::Value::Integer(_) | toml::Value::Float(_) | toml::Value::Boolean(_)) => {
                value.to_string()
            }
            _ => {
                return Err((
                    "postgresql.parameters",
                    format!("{name} must be a string, number or boolean"),
                ));
            }
        };
        settings.parameters.insert(name, value);
    }
    Ok(settings)
}

fn watchdog(section: &WatchdogSection, t: &Timing) -> Result<WatchdogConfig, Refusal> {
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
    let timeout =
        match mainstay_watchdog::timeout_for(t.ttl, t.fencing_margin, t.dcs_timeout, safety_margin)
        {
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

pub(super) fn check_name(key: &'static str, value: &str) -> Result<(), (&'static str, String)> {
    if super::valid_name(value) {
        Ok(())
    } else {
        Err((
            key,
            format!("{value:?} is not a valid name: use 1-63 letters, digits, '-', '_' or '.'"),
        ))
    }
}
