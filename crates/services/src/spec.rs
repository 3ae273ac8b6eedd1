//! A service as the node's configuration describes it, typed: every value
//! checked and every default applied where the file is read, so the
//! supervisor never parses anything.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Where a service runs, following the election.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Only on the node that leads with a running, writable primary; it
    /// starts after promotion and stops when the node stops leading, at
    /// the latest at the fencing deadline.
    WithLeader,
    /// On every node, whatever its role (a TURN relay).
    Everywhere,
    /// On nodes whose PostgreSQL runs as a replica (a read-only worker).
    WithReplica,
}

impl Placement {
    pub fn parse(text: &str) -> Option<Placement> {
        match text {
            "with-leader" => Some(Placement::WithLeader),
            "everywhere" => Some(Placement::Everywhere),
            "with-replica" => Some(Placement::WithReplica),
            _ => None,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Placement::WithLeader => "with-leader",
            Placement::Everywhere => "everywhere",
            Placement::WithReplica => "with-replica",
        }
    }
}

/// What a service that keeps failing does once its restarts are spent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnFailure {
    /// Stay down and show it failed.
    Report,
    /// A `with-leader` service: hand leadership to a healthy replica, as
    /// a switchover, unless the service already failed on the previous
    /// leader too.
    Failover,
}

/// Restarts after the service exits or fails its checks: the first after
/// `initial_backoff`, each next one after twice the previous wait up to
/// `max_backoff`; more than `limit` within `window` and the service is
/// failed (then `OnFailure` applies).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RestartPolicy {
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    pub limit: u32,
    pub window: Duration,
}

/// How a health check asks whether the service works.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CheckProbe {
    /// Its main process is alive.
    Process,
    /// A TCP connection to the address is accepted.
    Tcp(SocketAddr),
    /// An HTTP GET of `url` (plain http) answers `status`.
    Http { url: String, status: u16 },
    /// The command (argv, no shell) exits with 0.
    Command(Vec<String>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub probe: CheckProbe,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive failures before the service counts as unhealthy.
    pub failures: u32,
}

/// The OS account a service runs as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

/// Where a service's stdout and stderr go: one file, rotated when it
/// reaches `max_bytes`, keeping `keep` old files (`.1` the newest).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogSpec {
    pub path: PathBuf,
    pub max_bytes: u64,
    pub keep: u32,
}

/// One `[[service]]` of the node's configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    pub name: String,
    /// The program, resolved to an absolute path, and its arguments: no
    /// shell in between.
    pub program: PathBuf,
    pub args: Vec<String>,
    pub placement: Placement,
    /// `None`: the agent's own account.
    pub account: Option<Account>,
    pub working_directory: Option<PathBuf>,
    pub environment: BTreeMap<String, String>,
    pub log: LogSpec,
    /// Sent first when the service must stop; SIGKILL to its process group
    /// follows after `stop_grace`.
    pub stop_signal: i32,
    pub stop_grace: Duration,
    /// How long a start may take before its checks must pass.
    pub start_timeout: Duration,
    /// Services of this node that must run (and pass their checks) first.
    pub depends_on: Vec<String>,
    pub checks: Vec<HealthCheck>,
    pub restart: RestartPolicy,
    pub on_failure: OnFailure,
}
