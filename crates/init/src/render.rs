//! The files `init` writes, as text (pure): a node's or a witness's
//! configuration with a comment on each choice, and the systemd unit.

use crate::token::{Member, Token};
use std::path::Path;

/// Where a node keeps what `init` makes.
pub struct Layout<'a> {
    pub config_dir: &'a Path,
    pub data_root: &'a Path,
}

impl Layout<'_> {
    pub fn config(&self) -> std::path::PathBuf {
        self.config_dir.join("mainstay.toml")
    }
    pub fn ca(&self) -> std::path::PathBuf {
        self.config_dir.join("tls/ca.pem")
    }
    pub fn cert(&self) -> std::path::PathBuf {
        self.config_dir.join("tls/node.pem")
    }
    pub fn key(&self) -> std::path::PathBuf {
        self.config_dir.join("tls/node-key.pem")
    }
}

fn etcd_section(token: &Token, me: &Member, layout: &Layout<'_>) -> String {
    let p = &token.ports;
    let endpoints: Vec<String> = token
        .members
        .iter()
        .map(|m| format!("\"https://{}:{}\"", url_host(m.address), p.etcd_client))
        .collect();
    let initial: Vec<String> = token
        .members
        .iter()
        .map(|m| {
            format!(
                // Quoted: a name may hold a '.', which TOML would nest.
                "\"{}\" = \"https://{}:{}\"",
                m.name,
                url_host(m.address),
                p.etcd_peer
            )
        })
        .collect();
    format!(
        r#"[etcd]
# Every member's client URL: the agent moves to the next when one fails.
endpoints = [{endpoints}]
# This node runs its etcd member itself: one service per node.
member = true
data_dir = "{etcd_dir}"
client_url = "https://{host}:{client}"
peer_url = "https://{host}:{peer}"
# Read only when data_dir is new. After `mainstay ctl etcd-member add`, a
# replacement node says initial_cluster_state = "existing".
initial_cluster = {{ {initial} }}
# The node's certificate, signed by the cluster's CA: etcd's peers and
# clients and the REST API all use it.
ca_file = "{ca}"
cert_file = "{cert}"
key_file = "{key}"
"#,
        endpoints = endpoints.join(", "),
        etcd_dir = layout.data_root.join("etcd").display(),
        host = url_host(me.address),
        client = p.etcd_client,
        peer = p.etcd_peer,
        initial = initial.join(", "),
        ca = layout.ca().display(),
        cert = layout.cert().display(),
        key = layout.key().display(),
    )
}

fn api_section(token: &Token, me: &Member, layout: &Layout<'_>) -> String {
    format!(
        r#"[api]
listen = "{listen}"
# Credentials for changes (switchover, pause...): `mainstay ctl -c {config}`
# reads them from here.
username = "mainstay"
password = "{password}"
# HTTPS: the replicated directories' files travel over this API.
cert_file = "{cert}"
key_file = "{key}"
ca_file = "{ca}"
"#,
        listen = std::net::SocketAddr::new(me.address, token.ports.api),
        config = layout.config().display(),
        password = token.secrets.api_password,
        cert = layout.cert().display(),
        key = layout.key().display(),
        ca = layout.ca().display(),
    )
}

/// A data node's configuration.
pub fn node_config(token: &Token, me: &Member, layout: &Layout<'_>) -> String {
    let p = &token.ports;
    let vip = match &token.vip {
        Some((cidr, interface)) => format!(
            "# The address clients use: held by the leader while its PostgreSQL is primary.\n\
             vip = \"{cidr}\"\nvip_interface = \"{interface}\"\n"
        ),
        None => String::new(),
    };
    format!(
        r#"# Written by `mainstay init` for node {name} of cluster {cluster}.
# Every key is described in docs/configuration.md; `mainstay check -c {config}`
# says whether this node is ready to start.
cluster = "{cluster}"
name = "{name}"
{vip}
{etcd}
[postgresql]
data_dir = "{data}"
listen = "0.0.0.0"
connect_address = "{address}"
port = {pg_port}
superuser = {{ username = "postgres", password = "{superuser}" }}
replication = {{ username = "replicator", password = "{replication}" }}

{api}
[proxy]
# Connect here on any node to reach the primary, or a replica.
listen = "0.0.0.0:{proxy}"
read_only_listen = "0.0.0.0:{read_only}"

[timing]
profile = "default"
"#,
        name = me.name,
        cluster = token.cluster,
        config = layout.config().display(),
        etcd = etcd_section(token, me, layout),
        data = layout.data_root.join("postgresql/data").display(),
        address = me.address,
        pg_port = p.postgresql,
        superuser = token.secrets.superuser_password,
        replication = token.secrets.replication_password,
        api = api_section(token, me, layout),
        proxy = p.proxy,
        read_only = p.read_only_proxy,
    )
}

/// A witness's configuration.
pub fn witness_config(token: &Token, me: &Member, layout: &Layout<'_>) -> String {
    format!(
        r#"# Written by `mainstay init` for the witness {name} of cluster {cluster}:
# an etcd member and a small API, no PostgreSQL (docs/configuration.md#witness).
cluster = "{cluster}"
name = "{name}"

{etcd}
{api}
[timing]
profile = "default"
"#,
        name = me.name,
        cluster = token.cluster,
        etcd = etcd_section(token, me, layout),
        api = api_section(token, me, layout),
    )
}

/// The systemd unit that runs `program` as this node's agent or witness.
pub fn unit(program: &Path, config: &Path, witness: bool, account: Option<&str>) -> String {
    let (what, command) = if witness {
        ("witness (etcd member, no PostgreSQL)", "witness")
    } else {
        ("agent (PostgreSQL, etcd member, services)", "agent")
    };
    // Root needs no grant; an account gets exactly what root would use:
    // the VIP (adding an address, announcing it) and the fencing guard's
    // real-time priority. PostgreSQL then runs as that account too (the
    // guard drops these before starting it).
    let privileges = match account {
        None => "# The virtual IP: adding an address and announcing it.\n\
                 AmbientCapabilities=CAP_NET_ADMIN CAP_NET_RAW\n"
            .to_string(),
        Some(user) => format!(
            "User={user}\nGroup={user}\n\
             # The virtual IP (adding an address, announcing it) and the fencing\n\
             # guard's real-time priority, without root. Services that run as\n\
             # other users need CAP_SETUID CAP_SETGID too (a drop-in).\n\
             AmbientCapabilities=CAP_NET_ADMIN CAP_NET_RAW CAP_SYS_NICE\n\
             CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_RAW CAP_SYS_NICE\n"
        ),
    };
    format!(
        r#"# mainstay's unit: `mainstay init` writes it, the Debian package installs it.
[Unit]
Description=mainstay {what}
Documentation=https://github.com/mainstay-ha/mainstay
After=network-online.target
Wants=network-online.target

[Service]
# READY once it serves (before the first turn, which may clone a database).
Type=notify
NotifyAccess=main
ExecStart={program} {command} --config {config}
# Re-executes the binary now installed, in place: PostgreSQL, its fencing
# guard and the leader's lease carry over (what a package upgrade does).
ExecReload=/bin/kill -HUP $MAINPID
# Pinged by the agent's runtime every 30 s: a frozen agent is restarted
# (its fencing guard stops PostgreSQL the moment it dies).
WatchdogSec=60
# SIGTERM to the agent alone: it hands leadership over and stops
# PostgreSQL and etcd itself; what is left after TimeoutStopSec is killed.
KillMode=mixed
TimeoutStopSec=90
Restart=on-failure
RestartSec=2
{privileges}LimitNOFILE=65536

[Install]
WantedBy=multi-user.target
"#,
        program = program.display(),
        config = config.display(),
    )
}

/// An address as a URL's host (`[::1]` for IPv6).
fn url_host(address: std::net::IpAddr) -> String {
    match address {
        std::net::IpAddr::V4(v4) => v4.to_string(),
        std::net::IpAddr::V6(v6) => format!("[{v6}]"),
    }
}
