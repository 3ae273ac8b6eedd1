//! Loading a node's file: parsing, then every check that refuses a bad
//! value with the key, the reason and the fix, before anything runs.

use super::*;

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
    pub(super) fn watchdog_config(&self) -> Result<WatchdogConfig, (&'static str, String)> {
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

    pub(super) fn validate(&self) -> Result<(), (&'static str, String)> {
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

    pub(super) fn check_timing(&self) -> Result<(), (&'static str, String)> {
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
