//! A real Synapse (from PyPI, in the virtualenv `scripts/setup.sh` makes)
//! as a `with-leader` service: one homeserver configuration per node, the
//! same server name, signing key and secrets everywhere, and a start script
//! that creates the database on the first start, wherever leadership is
//! then.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// Where `scripts/setup.sh` installs Synapse; `MAINSTAY_SYNAPSE_VENV`
/// points elsewhere.
pub const DEFAULT_VENV: &str = "/opt/mainstay-synapse";
pub const VENV_ENV: &str = "MAINSTAY_SYNAPSE_VENV";

/// Synapse's client port on every lab host (a default port nowhere).
pub const PORT: u16 = 18088;
pub const SERVER_NAME: &str = "lab.mainstay.test";
/// The database Synapse uses on the cluster's PostgreSQL.
pub const DATABASE: &str = "synapse";

/// The virtualenv holding Synapse, or why there is none.
pub fn venv() -> Result<PathBuf, String> {
    let venv = std::env::var_os(VENV_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_VENV));
    let python = venv.join("bin/python");
    let marker = venv.join("bin/synapse_homeserver");
    if python.exists() && marker.exists() {
        Ok(venv)
    } else {
        Err(format!(
            "Synapse is not installed in {} (no bin/synapse_homeserver): run scripts/setup.sh, \
             or point {VENV_ENV} at a virtualenv with matrix-synapse[postgres]",
            venv.display()
        ))
    }
}

/// What every node's Synapse shares: the signing key, the secrets and the
/// start script.
pub struct Shared {
    pub dir: PathBuf,
    signing_key: PathBuf,
    start_script: PathBuf,
}

/// One secret for all the secrets the lab needs: it is a lab.
const LAB_SECRET: &str = "mainstay-lab-secret-not-for-production";
/// coturn's shared secret (TURN REST API credentials Synapse hands out).
pub const TURN_SECRET: &str = "mainstay-lab-turn-secret";

impl Shared {
    /// Writes the start script and makes the signing key (with Synapse's
    /// own tool) under `dir`.
    pub fn create(dir: &Path, venv: &Path) -> io::Result<Shared> {
        fs::create_dir_all(dir)?;
        let signing_key = dir.join("signing.key");
        let made = std::process::Command::new(venv.join("bin/generate_signing_key"))
            .arg("-o")
            .arg(&signing_key)
            .stdin(std::process::Stdio::null())
            .output()?;
        if !made.status.success() {
            return Err(io::Error::other(format!(
                "generate_signing_key: {}",
                String::from_utf8_lossy(&made.stderr).trim()
            )));
        }
        let start_script = dir.join("start-synapse.sh");
        fs::write(&start_script, start_script_text(venv))?;
        Ok(Shared {
            dir: dir.to_path_buf(),
            signing_key,
            start_script,
        })
    }

    /// Writes `node_dir/synapse/homeserver.yaml` and returns the node's
    /// `[[service]]` section. Synapse reaches its own node's PostgreSQL
    /// (`pg_port` on 127.0.0.1) and listens on every address of the host,
    /// so also on the VIP. TURN clients are given every node's coturn.
    pub fn node_service(
        &self,
        node_dir: &Path,
        pg_port: u16,
        listen: &str,
        port: u16,
        turn_uris: &[String],
    ) -> io::Result<String> {
        let dir = node_dir.join("synapse");
        fs::create_dir_all(dir.join("media"))?;
        let config = dir.join("homeserver.yaml");
        let turn_uris: Vec<String> = turn_uris.iter().map(|u| format!("\"{u}\"")).collect();
        fs::write(
            &config,
            format!(
                r#"# Written by mainstay's lab. Every node has the same server name, signing
# key and secrets; only this node's paths differ.
server_name: "{SERVER_NAME}"
listeners:
  - port: {port}
    bind_addresses: ["{listen}"]
    type: http
    tls: false
    x_forwarded: false
    resources:
      - names: [client]
        compress: false
database:
  name: psycopg2
  args:
    user: "{superuser}"
    password: "{password}"
    dbname: "{DATABASE}"
    host: "127.0.0.1"
    port: {pg_port}
    cp_min: 1
    cp_max: 10
    connect_timeout: 5
media_store_path: "{dir}/media"
signing_key_path: "{key}"
report_stats: false
macaroon_secret_key: "{LAB_SECRET}"
form_secret: "{LAB_SECRET}"
registration_shared_secret: "{LAB_SECRET}"
enable_registration: true
enable_registration_without_verification: true
trusted_key_servers: []
suppress_key_server_warning: true
presence:
  enabled: false
turn_uris: [{turn}]
turn_shared_secret: "{TURN_SECRET}"
turn_user_lifetime: 1h
# The lab's client sends 20 messages a second from one account.
rc_message: {{per_second: 1000, burst_count: 1000}}
rc_registration: {{per_second: 1000, burst_count: 1000}}
rc_login:
  address: {{per_second: 1000, burst_count: 1000}}
  account: {{per_second: 1000, burst_count: 1000}}
"#,
                dir = dir.display(),
                superuser = crate::demo::SUPERUSER,
                password = crate::demo::SUPERUSER_PASSWORD,
                key = self.signing_key.display(),
                turn = turn_uris.join(", "),
            ),
        )?;
        // The media store follows the leader like the database.
        Ok(format!(
            r#"
[[replicate]]
path = "{media}"
exclude = ["url_cache/**", "url_cache_thumbnails/**"]
settle = 0.2

[[service]]
name = "synapse"
command = ["/bin/sh", "{script}", "{config}", "{pg_port}"]
placement = "with-leader"
working_directory = "{dir}"
environment = {{ PGPASSWORD = "{password}" }}
stop_grace = 5
start_timeout = 60
on_failure = "failover"
[[service.check]]
kind = "http"
url = "http://127.0.0.1:{port}/health"
interval = 1
timeout = 1
failures = 3
"#,
            script = self.start_script.display(),
            media = dir.join("media").display(),
            config = config.display(),
            dir = dir.display(),
            password = crate::demo::SUPERUSER_PASSWORD,
        ))
    }
}

/// The installed Synapse's version ("" when there is none).
pub fn version() -> String {
    let Ok(venv) = venv() else {
        return String::new();
    };
    std::process::Command::new(venv.join("bin/python"))
        .args(["-c", "import synapse; print(synapse.__version__)"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|v| v.trim().to_string())
        .unwrap_or_default()
}

/// Creates Synapse's database if this is the first start anywhere (the
/// script runs on the leader, beside a writable primary), then becomes
/// Synapse. Arguments: the homeserver configuration, PostgreSQL's port.
fn start_script_text(venv: &Path) -> String {
    format!(
        r#"#!/bin/sh
# Written by mainstay's lab: Synapse beside this node's primary. The first
# start anywhere creates Synapse's database (UTF8, C collation, as Synapse
# requires); every start then becomes Synapse itself (exec), so that the
# agent's guard signals Synapse and nothing in between.
set -eu
config="$1"
port="$2"
psql="/usr/lib/postgresql/15/bin/psql -X -q -A -t -h 127.0.0.1 -p $port -U {superuser} -d postgres"
if [ "$($psql -c "SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'")" != 1 ]; then
    $psql -c "CREATE DATABASE {DATABASE} ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"
fi
exec "{venv}/bin/python" -m synapse.app.homeserver -c "$config"
"#,
        superuser = crate::demo::SUPERUSER,
        venv = venv.display(),
    )
}
