//! The imperative shell around the decision core: it keeps the lease alive,
//! fences PostgreSQL when the lease may lapse, reads the DCS and the local
//! PostgreSQL, asks `mainstay_core::decide` what to do, does it, and publishes
//! this member's status. Its tasks, each with one job:
//! - the lease keeper (`lease_keeper.rs`) renews the node's lease every
//!   `renew_interval` and computes the fencing deadline with the core's
//!   `LeaseClock`, which it hands to the postmaster's fencing guard (a
//!   process of its own, see `mainstay-guard`): the guard stops a writable
//!   PostgreSQL the moment that deadline passes, even if this agent is
//!   frozen;
//! - the HA loop (`run.rs`) runs a turn (`turn.rs`: read, probe, decide) on
//!   every DCS watch event (`watch_forward.rs`), every `loop_wait`, and at
//!   the deadlines the core asks for, and executes the actions
//!   (`execute.rs`, `rejoin.rs`); between turns it runs operator commands
//!   (`commands.rs`) and applies the dynamic configuration
//!   (`parameters.rs`); after each turn it publishes what others read
//!   (`publish.rs`); `failsafe.rs` is failsafe mode from the leader's side.

use crate::api::{ApiAuth, ApiState, Command, CommandRefusal, NodeSnapshot, unix_now};
use crate::boot_clock;
use crate::config::Config;
use crate::proxy::{Access, ProxyStats, Route};
use crate::watchdog_keeper::Availability;
use mainstay_core::decide::Standby;
use mainstay_core::decide::{DataDir, Lease, LocalPg, Settings};
use mainstay_core::lease::{KeyCheck, LeaseClock, Renewal};
use mainstay_core::poison;
use mainstay_core::sync::render_standby_names;
use mainstay_core::timeline::{
    Divergence, LeaderWal, LocalWal, divergence, foreign_timeline, parse_history,
};
use mainstay_core::{
    Action, ClusterView, CoreState, DynamicConfig, HistoryEntry, InitializeRecord, LocalState, Lsn,
    MemberStatus, Millis, Observation, PgRole, Published, SyncState, decide,
};
use mainstay_dcs::{Dcs, KeyKind, WatchEvent};
use mainstay_pg::{ClusterState, ConnTarget, DataDirState, Health, Postgres, StartRole, StopMode};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tracing::{Instrument, debug, error, info, info_span, warn};

mod commands;
mod execute;
mod failsafe;
mod lease_keeper;
mod parameters;
mod publish;
mod reexec;
mod rejoin;
mod run;
mod service_moves;
mod stray;
mod turn;
mod watch_forward;

pub use run::RunError;

use failsafe::{Failsafe, FailsafePeers};
use lease_keeper::{LeaseKeeper, keep_lease};
use watch_forward::{MemberInterest, forward_watch};

pub struct Agent<D: Dcs> {
    name: String,
    tags: mainstay_core::Tags,
    /// The kernel watchdog as probed at start-up, and its settings.
    watchdog: Availability,
    watchdog_config: crate::config::WatchdogConfig,
    timing: mainstay_core::Timing,
    settings: Settings,
    api_url: String,
    dcs: Arc<D>,
    pg: Postgres,
    core: CoreState,
    /// The lease as the keeper last confirmed it (boot-time milliseconds).
    lease: watch::Receiver<Lease>,
    /// Handed to the lease keeper when the agent runs.
    lease_tx: Option<watch::Sender<Lease>>,
    /// Whether this node's PostgreSQL may accept writes, and until when: what
    /// the postmaster's fencing guard enforces.
    fencer: mainstay_pg::Fencer,
    /// Which member keys the HA loop wants to hear about at once.
    member_interest: Arc<std::sync::Mutex<MemberInterest>>,
    wake: Arc<Notify>,
    origin: Instant,
    following: Option<String>,
    last_health: Option<Health>,
    /// The last probe got an answer (`last_health` may be older).
    pg_answering: bool,
    last_note: String,
    /// When this agent last wrote its member key (see `publish`).
    last_member_write: Option<Instant>,
    /// The last DCS view read, when, and whether the last read worked.
    last_view: Option<ClusterView>,
    dcs_last_seen: Option<std::time::SystemTime>,
    dcs_reachable: bool,
    /// Round trip of the last confirmed renewal, in microseconds (0: none).
    renew_latency_us: Arc<std::sync::atomic::AtomicU64>,
    /// A crash drill: until then (or until another node leads) this agent
    /// plays dead, its PostgreSQL stopped hard and its lease left to expire.
    stand_down_until: Option<Instant>,
    /// The lease keeper sends no keep-alive while set (crash drill).
    renewals_paused: Arc<AtomicBool>,
    /// What the REST API serves; replaced after every turn.
    snapshot: watch::Sender<Arc<NodeSnapshot>>,
    api_listen: std::net::SocketAddr,
    api_limits: crate::api::Limits,
    /// HAProxy's agent-check port and its state, when configured.
    agent_check: Option<(
        crate::config::AgentCheckConfig,
        Arc<crate::agent_check::AgentCheck>,
    )>,
    /// The last valid dynamic configuration read from the DCS, and the
    /// revision of the `config` key last looked at.
    dynamic: DynamicConfig,
    dynamic_revision: Option<i64>,
    api_auth: ApiAuth,
    /// PostgreSQL parameters from this node's file (they win over the
    /// cluster-wide ones), whether the effective set must be written again,
    /// and what the server says waits for a restart.
    file_parameters: std::collections::BTreeMap<String, String>,
    parameters_dirty: bool,
    pending_restart: Vec<mainstay_core::PendingRestart>,
    /// The newest timeline the data directory holds, as last observed (0:
    /// no data), published also while PostgreSQL is stopped.
    data_timeline: u32,
    /// PostgreSQL parameters and what became of them: the set the server
    /// last started with, a set this node's server refused (checked, or
    /// failed to start with), and why, while that lasts.
    parameters: crate::parameter_guard::ParameterGuard,
    /// Failsafe mode, as a member: the last leader that asked this node to
    /// confirm it (written by the REST API). As the leader: until when every
    /// member last confirmed it while the DCS was unreachable.
    failsafe_contact: Arc<std::sync::Mutex<Option<(String, std::time::Instant)>>>,
    /// As the leader in failsafe mode: whom the lease keeper asks when
    /// renewals fail (kept from the last view while the DCS is away).
    failsafe_peers: Arc<std::sync::Mutex<Option<FailsafePeers>>>,
    /// HTTPS for the API: certificate and key; and the CA for calling peers.
    api_tls_files: Option<crate::config::TlsFiles>,
    api_ca_file: Option<std::path::PathBuf>,
    /// The proxy: its listeners, and the route the HA loop gives it after
    /// every turn.
    proxy_listens: Vec<(crate::proxy::Access, &'static str, std::net::SocketAddr)>,
    proxy_wait: Duration,
    replica_max_lag: u64,
    route: watch::Sender<Route>,
    proxy_stats: Arc<ProxyStats>,
    /// When the last DCS view was read (the route is trusted from there).
    view_read_at: Option<Instant>,
    /// The virtual IP, if configured; whether this node leads with a
    /// running primary (published after every turn); whether it holds the
    /// VIP now (published by the VIP task).
    vip: Option<crate::vip::VipSpec>,
    /// What the subsystems that follow this agent see (`follow`).
    published: watch::Sender<Published>,
    vip_held: watch::Sender<bool>,
    /// `[[service]]`, and their supervisor once the agent runs.
    service_specs: Vec<mainstay_services::ServiceSpec>,
    services: Option<Arc<mainstay_services::Services>>,
    /// `[[replicate]]`, and their replication once the agent runs.
    replicate_specs: Vec<mainstay_files::ReplicateSpec>,
    replication: Option<Arc<mainstay_files::Replication>>,
    /// `[callbacks]`, run by a follower of the published state.
    hooks: mainstay_services::hooks::Hooks,
    cluster: String,
    alert_thresholds: crate::config::AlertThresholds,
    /// What this leader did about services that gave up here.
    service_moves: std::collections::BTreeMap<String, service_moves::ServiceMove>,
    /// The node's own etcd member, when the agent runs one.
    etcd_member: Option<mainstay_etcd_member::MemberHandle>,
    /// etcd's members as last asked while this node leads (empty
    /// otherwise): the `etcd_member` alerts.
    etcd_members: Arc<std::sync::Mutex<crate::alerts::EtcdMembers>>,
    /// From the image this one re-executed: the postmaster and the lease
    /// to take over.
    handover: Option<crate::reexec::Handover>,
    /// How to re-execute in place on SIGHUP (`systemctl reload`).
    reexec: Option<(crate::reexec::Program, tokio::signal::unix::Signal)>,
}

impl<D: Dcs> Agent<D> {
    /// Shows the node's own etcd member (run beside the agent) in the API.
    pub fn with_etcd_member(mut self, member: mainstay_etcd_member::MemberHandle) -> Agent<D> {
        self.etcd_member = Some(member);
        self
    }

    /// Takes over what the image this one re-executed from handed over.
    pub fn with_handover(mut self, handover: crate::reexec::Handover) -> Agent<D> {
        self.handover = Some(handover);
        self
    }

    /// Re-executes `program` in place when `signal` (SIGHUP) comes.
    pub fn with_reexec(
        mut self,
        program: crate::reexec::Program,
        signal: tokio::signal::unix::Signal,
    ) -> Agent<D> {
        self.reexec = Some((program, signal));
        self
    }

    pub fn new(config: &Config, dcs: D) -> Agent<D> {
        let timing = config.timing;
        let origin = Instant::now();
        let pg = Postgres::new(config.postgresql.clone());
        let watchdog = Availability::probe(&config.watchdog);
        let mut tags = config.tags.clone();
        if watchdog.blocks_leadership().is_some() {
            // Never elected, never waited for in an election; the shell
            // also refuses to take the key on request (manual failover,
            // bootstrap).
            tags.nofailover = true;
        }
        let (lease_tx, lease) = watch::channel(Lease {
            id: None,
            valid_until: boot_clock::now(),
            members_confirmed: false,
        });
        Agent {
            name: config.name.clone(),
            tags: tags.clone(),
            watchdog: watchdog.clone(),
            watchdog_config: config.watchdog.clone(),
            timing,
            settings: timing.decide_settings(),
            api_url: config.api.url.clone(),
            dcs: Arc::new(dcs),
            core: CoreState::default(),
            lease,
            lease_tx: Some(lease_tx),
            fencer: pg.fencer(),
            pg,
            member_interest: Arc::new(std::sync::Mutex::new(MemberInterest::All)),
            wake: Arc::new(Notify::new()),
            origin,
            following: None,
            last_health: None,
            pg_answering: false,
            last_note: String::new(),
            last_member_write: None,
            last_view: None,
            dcs_last_seen: None,
            dcs_reachable: false,
            renew_latency_us: Arc::default(),
            stand_down_until: None,
            renewals_paused: Arc::default(),
            snapshot: watch::Sender::new(Arc::new(NodeSnapshot {
                watchdog_failed: match &watchdog {
                    Availability::Unavailable { reason, .. } => Some(reason.clone()),
                    _ => None,
                },
                ..NodeSnapshot::new(
                    &config.name,
                    &config.cluster,
                    &config.api.url,
                    &tags,
                    timing,
                )
            })),
            api_listen: config.api.listen,
            agent_check: config
                .api
                .agent_check
                .map(|c| (c, Arc::new(crate::agent_check::AgentCheck::default()))),
            api_limits: crate::api::Limits {
                header_timeout: config.api.header_timeout,
                max_connections: config.api.max_connections,
            },
            dynamic: DynamicConfig::default(),
            dynamic_revision: None,
            file_parameters: config.postgresql.parameters.clone(),
            parameters_dirty: false,
            parameters: Default::default(),
            pending_restart: Vec::new(),
            data_timeline: 0,
            failsafe_contact: Arc::default(),
            failsafe_peers: Arc::default(),
            api_tls_files: config.api.tls.clone(),
            api_ca_file: config.api.ca_file.clone(),
            proxy_listens: [
                (Access::ReadWrite, "proxy.listen", config.proxy.listen),
                (
                    Access::ReadOnly,
                    "proxy.read_only_listen",
                    config.proxy.read_only_listen,
                ),
            ]
            .into_iter()
            .filter_map(|(access, key, listen)| Some((access, key, listen?)))
            .collect(),
            proxy_wait: config.proxy.wait_for_leader,
            replica_max_lag: config.proxy.replica_max_lag,
            route: watch::Sender::new(Route::nowhere()),
            proxy_stats: Arc::default(),
            view_read_at: None,
            vip: config.vip.clone(),
            published: watch::Sender::new(Published::default()),
            vip_held: watch::Sender::new(false),
            service_specs: config.services.clone(),
            services: None,
            replicate_specs: config.replicate.clone(),
            replication: None,
            hooks: config.hooks.clone(),
            cluster: config.cluster.clone(),
            alert_thresholds: config.alerts,
            service_moves: Default::default(),
            etcd_member: None,
            etcd_members: Default::default(),
            handover: None,
            reexec: None,
            api_auth: ApiAuth {
                basic: config.api.basic.clone(),
                token: config.api.token.clone(),
            },
        }
    }

    /// The cluster view and this node's place in it, republished after
    /// every turn: how a subsystem follows the agent (see
    /// `mainstay_core::published`).
    pub fn follow(&self) -> watch::Receiver<Published> {
        self.published.subscribe()
    }

    /// The snapshot the REST API serves (tests read it too).
    pub fn snapshot(&self) -> watch::Receiver<Arc<NodeSnapshot>> {
        self.snapshot.subscribe()
    }

    fn millis(&self, at: Instant) -> Millis {
        Millis(at.saturating_duration_since(self.origin).as_millis() as u64)
    }
}

enum TurnError {
    /// Logged; the loop goes on.
    Failed(String),
    /// Continuing could damage data: the agent stops.
    Fatal(String),
}

fn history(view: Option<&ClusterView>) -> &[HistoryEntry] {
    view.map_or(&[], |v| &v.history)
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests;
