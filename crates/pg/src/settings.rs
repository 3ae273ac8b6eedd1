//! What the agent tells this crate about the local PostgreSQL: paths, addresses,
//! credentials, extra parameters, and the small enums that select how to start
//! and stop it.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// Everything needed to run and reach one node's PostgreSQL.
#[derive(Clone, Debug)]
pub struct PgSettings {
    /// Directory holding `postgres`, `initdb`, `pg_basebackup`, ...
    pub bin_dir: PathBuf,
    pub data_dir: PathBuf,
    /// `listen_addresses`, e.g. `127.0.0.1`, `*`, `10.0.0.5,127.0.0.1`.
    pub listen_host: String,
    /// The address other nodes and clients use to reach this PostgreSQL.
    pub connect_host: String,
    pub port: u16,
    pub superuser: Credentials,
    pub replication: Credentials,
    pub rewind: Credentials,
    /// OS user that owns the data directory and runs PostgreSQL. Needed when
    /// the agent runs as root (PostgreSQL refuses to); `None` = current user.
    pub run_as: Option<String>,
    /// Extra `postgresql.conf` settings; they override mainstay's defaults.
    pub parameters: BTreeMap<String, String>,
    /// Managed by the leader in synchronous mode (see
    /// `Postgres::set_synchronous_standby_names`), never by `parameters`.
    pub synchronous_standby_names: String,
    /// libpq password file for the replication and rewind users.
    pub pgpass_file: PathBuf,
    /// This node's name: `application_name` and replication slot name.
    pub node_name: String,
    /// PostgreSQL's stdout/stderr. Default: `<data_dir>/../<node_name>.postgres.log`
    /// (outside the data directory so that clones and rewinds leave it alone).
    pub log_file: Option<PathBuf>,
    /// Private (0700) directory for the Unix socket.
    /// Default: `<data_dir>/../<node_name>.sock`.
    pub socket_dir: Option<PathBuf>,
    /// How long `start` waits for PostgreSQL to accept connections.
    pub start_timeout: Duration,
    /// How long `stop` waits before escalating to SIGKILL.
    pub stop_timeout: Duration,
    /// Upper bound for pg_basebackup and pg_rewind.
    pub clone_timeout: Duration,
    /// The program that runs as the postmaster's fencing guard when given
    /// `guard` as its first argument (see the `mainstay-guard` crate). The
    /// default, `/proc/self/exe`, is this very binary: its `main` must call
    /// `mainstay_guard::run_if_asked` first thing. A guard of the same build
    /// also survives a binary replaced on disk during an upgrade.
    pub guard_program: PathBuf,
}

impl PgSettings {
    /// Settings with mainstay's defaults for everything but the paths and name.
    pub fn new(
        bin_dir: impl Into<PathBuf>,
        data_dir: impl Into<PathBuf>,
        node_name: &str,
    ) -> PgSettings {
        let data_dir = data_dir.into();
        let parent = data_dir.parent().map(PathBuf::from).unwrap_or_default();
        PgSettings {
            bin_dir: bin_dir.into(),
            pgpass_file: parent.join(format!("{node_name}.pgpass")),
            data_dir,
            listen_host: "127.0.0.1".into(),
            connect_host: "127.0.0.1".into(),
            port: 5432,
            superuser: Credentials::new("postgres", ""),
            replication: Credentials::new("replicator", ""),
            rewind: Credentials::new("rewind_user", ""),
            run_as: None,
            parameters: BTreeMap::new(),
            synchronous_standby_names: String::new(),
            node_name: node_name.into(),
            log_file: None,
            socket_dir: None,
            start_timeout: Duration::from_secs(60),
            stop_timeout: Duration::from_secs(60),
            clone_timeout: Duration::from_secs(6 * 3600),
            guard_program: PathBuf::from("/proc/self/exe"),
        }
    }

    fn sibling(&self, suffix: &str) -> PathBuf {
        let parent = self
            .data_dir
            .parent()
            .map(PathBuf::from)
            .unwrap_or_default();
        parent.join(format!("{}{suffix}", self.node_name))
    }

    pub fn log_path(&self) -> PathBuf {
        self.log_file
            .clone()
            .unwrap_or_else(|| self.sibling(".postgres.log"))
    }

    pub fn socket_path(&self) -> PathBuf {
        self.socket_dir
            .clone()
            .unwrap_or_else(|| self.sibling(".sock"))
    }

    /// Where this node connects to its own PostgreSQL over TCP: the first
    /// listen address, or loopback when it listens on every address (the
    /// public `connect_host` may be a VIP or a name that points elsewhere).
    pub fn local_tcp_host(&self) -> String {
        let first = self
            .listen_host
            .split(',')
            .map(str::trim)
            .find(|h| !h.is_empty());
        match first {
            None | Some("*") | Some("0.0.0.0") => "127.0.0.1".into(),
            Some("::") => "::1".into(),
            Some(h) => h.into(),
        }
    }

    /// Where other nodes reach this one.
    pub fn conn_target(&self) -> ConnTarget {
        ConnTarget {
            host: self.connect_host.clone(),
            port: self.port,
            name: self.node_name.clone(),
        }
    }
}

/// A database user and its password. `Debug` never shows the password.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub user: String,
    pub password: String,
}

impl Credentials {
    pub fn new(user: &str, password: &str) -> Credentials {
        Credentials {
            user: user.into(),
            password: password.into(),
        }
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("password", &"<hidden>")
            .finish()
    }
}

/// Another node's PostgreSQL, usually the leader's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnTarget {
    pub host: String,
    pub port: u16,
    /// The node's name (for logs; slots and conninfo use this node's own name).
    pub name: String,
}

/// How `start` configures the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StartRole {
    Primary,
    /// A standby; streams from `leader` when given, else only replays what it has.
    Replica {
        leader: Option<ConnTarget>,
    },
}

/// How `stop` shuts the server down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopMode {
    /// SIGINT: disconnect clients, write a shutdown checkpoint.
    Fast,
    /// SIGQUIT: no checkpoint; the next start runs crash recovery. For fencing.
    Immediate,
}
