//! The imperative shell around the decision core: it keeps the lease alive,
//! fences PostgreSQL when the lease may lapse, reads the DCS and the local
//! PostgreSQL, asks `mainstay_core::decide` what to do, does it, and publishes
//! this member's status. Three tasks, each with one job:
//! - the lease keeper renews the node's lease every `renew_interval` and
//!   computes the fencing deadline (send time of the last confirmed renewal +
//!   ttl - fencing margin), which it hands to the postmaster's fencing guard
//!   (a process of its own, see `mainstay-guard`): the guard stops a writable
//!   PostgreSQL the moment that deadline passes, even if this agent is
//!   frozen;
//! - the HA loop runs on every DCS watch event, every `loop_wait`, and at the
//!   deadlines the core asks for.

use crate::api::{ApiAuth, ApiState, Command, NodeSnapshot};
use crate::boot_clock;
use crate::config::{Config, EffectiveTiming};
use crate::proxy::{Access, ProxyStats, Route};
use crate::watchdog_keeper::Availability;
use axum::http::StatusCode;
use mainstay_core::decide::Standby;
use mainstay_core::decide::{DataDir, Lease, LocalPg, Settings};
use mainstay_core::lease::{KeyCheck, LeaseClock, LeaseTiming, Renewal};
use mainstay_core::sync::render_standby_names;
use mainstay_core::timeline::{
    Divergence, LeaderWal, LocalWal, divergence, foreign_timeline, parse_history,
};
use mainstay_core::{
    Action, ClusterView, CoreState, DynamicConfig, HistoryEntry, InitializeRecord, Lsn,
    MemberStatus, Millis, Observation, PgRole, SyncState, decide,
};
use mainstay_dcs::{Dcs, KeyKind, WatchEvent};
use mainstay_pg::{
    ClusterState, ConnTarget, Credentials, DataDirState, Health, PgSettings, Postgres, StartRole,
    StopMode,
};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

pub struct Agent<D: Dcs> {
    name: String,
    tags: mainstay_core::Tags,
    /// The kernel watchdog as probed at start-up, and its settings.
    watchdog: Availability,
    watchdog_config: crate::config::WatchdogConfig,
    timing: EffectiveTiming,
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
    api_listen: String,
    api_limits: crate::api::Limits,
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
    pending_restart: Vec<String>,
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
    api_tls_files: Option<(std::path::PathBuf, std::path::PathBuf)>,
    api_ca_file: Option<std::path::PathBuf>,
    /// The proxy: its listeners, and the route the HA loop gives it after
    /// every turn.
    proxy_listens: Vec<(crate::proxy::Access, &'static str, String)>,
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
    leading: watch::Sender<bool>,
    vip_held: watch::Sender<bool>,
}

pub fn pg_settings(config: &Config) -> PgSettings {
    let pg = &config.postgresql;
    let mut settings = PgSettings::new(&pg.bin_dir, &pg.data_dir, &config.name);
    settings.listen_host = pg.listen.clone();
    settings.connect_host = config.pg_connect_host();
    settings.port = pg.port;
    let credentials = |c: &crate::config::Credentials| Credentials::new(&c.username, &c.password);
    settings.superuser = credentials(&pg.superuser);
    settings.replication = credentials(&pg.replication);
    settings.rewind = credentials(config.rewind_credentials());
    // PostgreSQL refuses to run as root; as any other user it runs as us.
    settings.run_as = (unsafe { libc::geteuid() } == 0).then(|| pg.run_as.clone());
    settings.parameters = pg
        .parameters
        .iter()
        .map(|(k, v)| {
            let value = match v {
                toml::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            (k.clone(), value)
        })
        .collect();
    settings
}

impl<D: Dcs> Agent<D> {
    pub fn new(config: &Config, dcs: D) -> Agent<D> {
        let timing = config.timing.effective();
        let ms = |d: Duration| d.as_millis() as u64;
        let settings = Settings {
            ttl_ms: ms(timing.ttl),
            loop_wait_ms: ms(timing.loop_wait),
            election_wait_ms: 2 * ms(timing.loop_wait) + ms(timing.dcs_timeout),
            stuck_replica_ms: 30_000,
        };
        let origin = Instant::now();
        let pg = Postgres::new(pg_settings(config));
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
            settings,
            api_url: config.api_url(),
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
                    &config.api_url(),
                    &tags,
                    timing.ttl,
                )
            })),
            api_listen: config.api.listen.clone(),
            api_limits: config.api.limits(),
            dynamic: DynamicConfig::default(),
            dynamic_revision: None,
            file_parameters: pg_settings(config).parameters,
            parameters_dirty: false,
            parameters: Default::default(),
            pending_restart: Vec::new(),
            failsafe_contact: Arc::default(),
            failsafe_peers: Arc::default(),
            api_tls_files: config
                .api
                .cert_file
                .clone()
                .zip(config.api.key_file.clone()),
            api_ca_file: config.api.ca_file.clone(),
            proxy_listens: [
                (Access::ReadWrite, "proxy.listen", &config.proxy.listen),
                (
                    Access::ReadOnly,
                    "proxy.read_only_listen",
                    &config.proxy.read_only_listen,
                ),
            ]
            .into_iter()
            .filter_map(|(access, key, listen)| Some((access, key, listen.clone()?)))
            .collect(),
            proxy_wait: Duration::from_secs_f64(config.proxy.wait_for_leader),
            // Validated with the config.
            replica_max_lag: config.proxy.replica_max_lag.bytes().unwrap_or(0),
            route: watch::Sender::new(Route::nowhere()),
            proxy_stats: Arc::default(),
            view_read_at: None,
            // Validated with the config.
            vip: config.vip_spec().ok().flatten(),
            leading: watch::Sender::new(false),
            vip_held: watch::Sender::new(false),
            api_auth: ApiAuth {
                basic: config.api.username.clone().zip(config.api.password.clone()),
                token: config.api.token.clone(),
            },
        }
    }

    /// `POST /restart` and `POST /reinitialize`, between two turns.
    async fn run_command(&mut self, command: Command) -> Result<String, (StatusCode, String)> {
        let refuse = |code: StatusCode, reason: &str| Err((code, reason.to_string()));
        let view = self.last_view.clone();
        let lease = *self.lease.borrow();
        let leading = view.as_ref().is_some_and(|v| {
            v.leader
                .as_ref()
                .is_some_and(|l| l.name == self.name && Some(l.lease_id) == lease.id)
        });
        let leader_target = match view.as_ref().and_then(|v| v.leader_name()) {
            Some(leader) if leader != self.name => self.target(view.as_ref(), leader).ok(),
            _ => None,
        };
        let internal = |e: TurnError| match e {
            TurnError::Failed(r) | TurnError::Fatal(r) => (StatusCode::INTERNAL_SERVER_ERROR, r),
        };
        let leader_only = |what: &str| {
            let leader = view
                .as_ref()
                .and_then(|v| v.leader_name())
                .unwrap_or("nobody");
            Err((
                StatusCode::CONFLICT,
                format!("{what}: send this to {leader}"),
            ))
        };
        match command {
            Command::Remove(name) => {
                if !leading {
                    return leader_only("only the leader removes members");
                }
                if name == self.name {
                    return refuse(StatusCode::CONFLICT, "the leader cannot remove itself");
                }
                // The loop's view may predate the key's expiry: ask etcd now.
                let fresh =
                    tokio::time::timeout(self.timing.dcs_timeout, self.dcs.read_cluster()).await;
                let Ok(Ok(fresh)) = fresh else {
                    return refuse(StatusCode::SERVICE_UNAVAILABLE, "cannot read the DCS now");
                };
                if fresh.members.contains_key(&name) {
                    return refuse(
                        StatusCode::CONFLICT,
                        &format!(
                            "{name}'s agent is still running (its member key is live): stop it \
                             first, then remove it"
                        ),
                    );
                }
                let known = self.core.forget_member(&name);
                if !known {
                    return refuse(
                        StatusCode::NOT_FOUND,
                        &format!("{name} is not a member this leader keeps anything for"),
                    );
                }
                warn!(
                    member = name,
                    "member removed: its replication slot goes now"
                );
                self.wake.notify_one();
                Ok(format!("{name} removed: its replication slot is dropped"))
            }
            Command::CrashDrill => {
                if let Some(until) = self.stand_down_until.filter(|u| Instant::now() < *u) {
                    return refuse(
                        StatusCode::CONFLICT,
                        &format!(
                            "a crash drill is already running here: PostgreSQL is stopped and \
                             the lease left to expire; this node stands down for {} s more",
                            until.saturating_duration_since(Instant::now()).as_secs()
                        ),
                    );
                }
                if !leading {
                    return leader_only("a crash drill runs on the leader");
                }
                if self.dynamic.pause {
                    return refuse(
                        StatusCode::CONFLICT,
                        "the cluster is paused: nothing would take over; resume it first",
                    );
                }
                let Some(view) = view else {
                    return refuse(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "no view of the cluster yet",
                    );
                };
                let successors: Vec<&str> = view
                    .members
                    .values()
                    .map(|m| &m.status)
                    .filter(|s| {
                        s.name != self.name
                            && s.role == PgRole::Replica
                            && s.streaming
                            && !s.tags.nofailover
                            && (!self.dynamic.synchronous_mode
                                || mainstay_core::sync::may_take_over(&view, &s.name))
                    })
                    .map(|s| s.name.as_str())
                    .collect();
                if successors.is_empty() {
                    return refuse(
                        StatusCode::CONFLICT,
                        "no streaming replica could take over (nofailover tags, not \
                         streaming, or not synchronous): the drill would only cause an outage",
                    );
                }
                let until = Instant::now() + self.timing.ttl * 3 + Duration::from_secs(20);
                warn!(
                    ?successors,
                    "crash drill requested through the REST API: stopping PostgreSQL hard \
                     (immediate) and letting the lease expire, as if this host died"
                );
                // Stopped first: should that fail, nothing else changed and
                // the node keeps its role (renewals go on).
                self.stop(StopMode::Immediate).await.map_err(internal)?;
                self.renewals_paused.store(true, Ordering::SeqCst);
                self.stand_down_until = Some(until);
                self.wake.notify_one();
                Ok(format!(
                    "PostgreSQL stopped hard on {}; its lease expires without renewal and one \
                     of {} takes over",
                    self.name,
                    successors.join(", ")
                ))
            }
            Command::Restart => {
                if !self.pg.is_running() {
                    return refuse(
                        StatusCode::CONFLICT,
                        "PostgreSQL is not running here: nothing to restart",
                    );
                }
                let primary = self.fencer.writable();
                if primary && !leading {
                    return refuse(
                        StatusCode::CONFLICT,
                        "this primary does not hold the leader key: it is being fenced",
                    );
                }
                let settings = self.pg.settings();
                let problems = mainstay_pg::check_data_dir(
                    &settings.bin_dir,
                    settings.run_as.as_deref(),
                    &settings.data_dir,
                )
                .await
                .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
                if !problems.is_empty() {
                    let problems: Vec<String> = problems.into_iter().map(|p| p.message).collect();
                    return refuse(
                        StatusCode::CONFLICT,
                        &format!(
                            "not restarting: PostgreSQL would not start with its configuration \
                             files as they are ({}); fix them first, the server keeps running",
                            problems.join("; ")
                        ),
                    );
                }
                warn!(primary, "restart requested through the REST API");
                self.stop(StopMode::Fast).await.map_err(internal)?;
                let role = if primary {
                    self.fencer.set_writable(true);
                    StartRole::Primary
                } else {
                    StartRole::Replica {
                        leader: leader_target.as_ref().map(|(t, _)| t.clone()),
                    }
                };
                let started = self.start_pg(role).await;
                self.forget_writable_if_stopped();
                started.map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, format!("start: {e}")))?;
                if !primary {
                    self.following = leader_target.map(|(t, _)| t.name);
                }
                self.wake.notify_one();
                if let Some(reason) = self.parameters.fallback() {
                    return refuse(
                        StatusCode::CONFLICT,
                        &format!(
                            "PostgreSQL restarted, but on the last parameters it started with: \
                             {reason}; fix the configuration (`mainstay ctl edit-config`) and \
                             restart again"
                        ),
                    );
                }
                Ok("PostgreSQL restarted".into())
            }
            Command::Reinitialize => {
                if leading || self.fencer.writable() {
                    return refuse(
                        StatusCode::CONFLICT,
                        "the leader cannot be reinitialized: switch over first",
                    );
                }
                let Some((target, status)) = leader_target else {
                    return refuse(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "there is no leader to clone from",
                    );
                };
                if status.role != PgRole::Primary {
                    return refuse(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "the leader's PostgreSQL is not running as primary yet",
                    );
                }
                warn!(
                    from = target.name,
                    "reinitialize requested through the REST API"
                );
                if self.pg.is_running() {
                    self.stop(StopMode::Fast).await.map_err(internal)?;
                }
                if !matches!(
                    self.pg.data_dir_state(),
                    DataDirState::Missing | DataDirState::Empty
                ) {
                    self.reclone(&target, "reinitialize requested")
                        .await
                        .map_err(internal)?;
                } else {
                    self.pg.basebackup(&target).await.map_err(|e| {
                        (
                            StatusCode::INTERNAL_SERVER_ERROR,
                            format!("pg_basebackup: {e}"),
                        )
                    })?;
                }
                self.start_pg(StartRole::Replica {
                    leader: Some(target.clone()),
                })
                .await
                .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, format!("start: {e}")))?;
                self.following = Some(target.name.clone());
                self.wake.notify_one();
                Ok(format!(
                    "reinitialized from {}; the old data directory was moved aside",
                    target.name
                ))
            }
        }
    }

    /// Takes the view's dynamic configuration if it is valid; a bad one
    /// (written by hand) is reported once and changes nothing.
    fn absorb_dynamic_config(&mut self, view: &ClusterView) {
        if self.dynamic_revision == Some(view.config_revision) {
            return;
        }
        self.dynamic_revision = Some(view.config_revision);
        let parsed = match &view.config {
            None => Ok(DynamicConfig::default()),
            Some(value) => DynamicConfig::from_json(value),
        };
        match parsed {
            Ok(config) if config != self.dynamic => {
                info!(
                    revision = view.config_revision,
                    pause = config.pause,
                    maximum_lag_on_failover = config.maximum_lag_on_failover,
                    synchronous_mode = config.synchronous_mode,
                    "dynamic configuration changed"
                );
                self.parameters_dirty |=
                    config.postgresql.parameters != self.dynamic.postgresql.parameters;
                self.dynamic = config;
            }
            Ok(_) => {}
            Err(problem) => error!(
                revision = view.config_revision,
                "the dynamic configuration in the DCS is invalid ({problem}); keeping the last \
                 valid one: fix it with `mainstay ctl edit-config`"
            ),
        }
    }

    /// Failsafe mode (Patroni's idea): while this node leads, tell the lease
    /// keeper which members to ask for confirmation if renewals start to
    /// fail. Only a view from the DCS changes this; without one the last
    /// list stands.
    fn update_failsafe_peers(&self, view: &ClusterView, local: &LocalPg) {
        let lease = self.lease.borrow().id;
        let leading = view
            .leader
            .as_ref()
            .is_some_and(|l| l.name == self.name && Some(l.lease_id) == lease);
        // Exactly the members recorded in the failsafe key: a member outside
        // it cannot run for leader, and one on it is asked. Without a key
        // naming this leader there is no promise to ask for.
        let recorded = view
            .failsafe
            .as_ref()
            .and_then(|r| r.state.as_ref().ok())
            .filter(|f| f.leader == self.name);
        let peers = (self.dynamic.failsafe_mode && leading && local.accepts_writes())
            .then_some(recorded)
            .flatten()
            .map(|recorded| FailsafePeers {
                lease: lease.unwrap_or_default(),
                members: recorded
                    .members
                    .iter()
                    .filter(|(name, _)| **name != self.name)
                    .map(|(name, url)| (name.clone(), url.clone()))
                    .collect(),
            });
        *self
            .failsafe_peers
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = peers;
    }

    /// Before the failsafe list is written: from now on the lease keeper asks
    /// its new members too, whether or not the write lands (an answer that
    /// never came could still have been applied). A member is dropped from
    /// the keeper's list only once a view shows it off the key.
    fn widen_failsafe_peers(&self, written: &mainstay_core::FailsafeState) {
        let lease = self.lease.borrow().id.unwrap_or_default();
        let mut peers = self
            .failsafe_peers
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let current = peers.get_or_insert_with(|| FailsafePeers {
            lease,
            members: Vec::new(),
        });
        for (name, url) in &written.members {
            if *name != self.name && !current.members.iter().any(|(n, _)| n == name) {
                current.members.push((name.clone(), url.clone()));
            }
        }
    }

    /// Cluster-wide parameters, overridden by this node's own file, into
    /// `mainstay.conf`; a running server reloads, and what only a restart
    /// applies is reported as pending, never applied behind the operator's
    /// back.
    async fn apply_parameters(&mut self) {
        let mut parameters = self.dynamic.parameter_texts();
        parameters.extend(self.file_parameters.clone());
        let settings = self.pg.settings();
        let admission = self
            .parameters
            .admit(
                &parameters,
                &settings.parameters,
                &settings.bin_dir,
                settings.run_as.as_deref(),
            )
            .await;
        match admission {
            crate::parameter_guard::Admission::Apply => {}
            crate::parameter_guard::Admission::Keep => return,
            crate::parameter_guard::Admission::Retry => {
                self.parameters_dirty = true;
                return;
            }
        }
        match self.pg.set_parameters(parameters).await {
            Ok(pending) => {
                if !pending.is_empty() && pending != self.pending_restart {
                    warn!(
                        ?pending,
                        "PostgreSQL parameters changed that need a restart: `mainstay ctl restart` \
                         applies them"
                    );
                }
                self.pending_restart = pending;
            }
            Err(err) => {
                warn!("applying PostgreSQL parameters failed ({err}); retrying next turn");
                self.parameters_dirty = true;
            }
        }
    }

    /// Starts PostgreSQL. When it does not start with parameters it never
    /// started with here, it starts again with the last ones that did: a
    /// server down for a typo in the cluster's configuration is worse than
    /// one running on yesterday's settings, said loudly.
    async fn start_pg(&mut self, role: StartRole) -> mainstay_pg::Result<()> {
        let trying = self.pg.settings().parameters.clone();
        let failure = match self.pg.start(role.clone()).await {
            Ok(()) => {
                self.parameters.started_with(&trying);
                return Ok(());
            }
            Err(failure) => failure,
        };
        // Only the server itself failing to come up can be its parameters;
        // mainstay's own refusals (a standby's directory started as a
        // primary, say) say nothing about them.
        let server_failed = matches!(failure, mainstay_pg::Error::StartFailed { .. });
        let Some(good) = self
            .parameters
            .fallback_for(&trying)
            .filter(|_| server_failed)
        else {
            return Err(failure);
        };
        error!(
            %failure,
            "PostgreSQL did not start with the current parameters: starting it with the last \
             parameters it started with; this node will not take the leader key until the \
             configuration is fixed (`mainstay ctl edit-config`) and PostgreSQL restarted"
        );
        self.pg.set_parameters(good.clone()).await?;
        match self.pg.start(role).await {
            Ok(()) => {
                self.parameters
                    .fell_back(&trying, &good, &failure.to_string());
                // What runs is what is written: nothing waits for a restart.
                self.pending_restart.clear();
                Ok(())
            }
            Err(again) => {
                // Not the parameters after all (or not only them): the
                // cluster's stay written, as a replica must not be left
                // with settings lower than its primary's.
                error!(%again, "PostgreSQL did not start with the last good parameters either");
                if let Err(err) = self.pg.set_parameters(trying).await {
                    error!(%err, "writing the cluster's parameters back failed");
                }
                Err(failure)
            }
        }
    }

    /// This node's tags as published: a node that must not lead says so,
    /// so that elections neither choose it nor wait for it.
    fn published_tags(&self) -> mainstay_core::Tags {
        let mut tags = self.tags.clone();
        tags.nofailover |= self.parameters.fallback().is_some();
        tags
    }

    /// The snapshot the REST API serves (tests read it too).
    pub fn snapshot(&self) -> watch::Receiver<Arc<NodeSnapshot>> {
        self.snapshot.subscribe()
    }

    /// The proxy's route from the last view, trusted until that view could
    /// be older than the leader's lease.
    fn publish_route(&self) {
        let valid_until = self.view_read_at.map_or_else(Instant::now, |at| {
            at + self.timing.ttl - self.timing.fencing_margin
        });
        let route = match &self.last_view {
            Some(view) => Route::from_view(view, self.replica_max_lag, valid_until),
            None => Route::nowhere(),
        };
        self.route.send_if_modified(|current| {
            let changed = *current != route;
            *current = route;
            changed
        });
    }

    /// This node holds the leader key on a lease that cannot have expired.
    fn holds_leader(&self) -> bool {
        let lease = *self.lease.borrow();
        match (&self.last_view, lease.id) {
            (Some(view), Some(id)) if boot_clock::now() < lease.valid_until => view
                .leader
                .as_ref()
                .is_some_and(|l| l.name == self.name && l.lease_id == id),
            _ => false,
        }
    }

    /// Whether the VIP belongs here: leader, with PostgreSQL running as
    /// primary (as last observed).
    fn publish_leading(&self) {
        let leading = self.holds_leader()
            && self.pg_answering
            && self.pg.is_running()
            && self.last_health.as_ref().is_some_and(|h| !h.in_recovery);
        self.leading
            .send_if_modified(|current| std::mem::replace(current, leading) != leading);
    }

    fn publish_snapshot(&self, turn_started: Instant) {
        let holds_leader = self.holds_leader();
        let latency = self.renew_latency_us.load(Ordering::Relaxed);
        let previous = self.snapshot.borrow().clone();
        let snapshot = NodeSnapshot {
            data_dir: self.pg.settings().data_dir.clone(),
            running: self.pg.is_running(),
            health: self.last_health.clone().filter(|_| self.pg_answering),
            holds_leader,
            view: self.last_view.clone(),
            dcs_reachable: self.dcs_reachable,
            dcs_last_seen: self.dcs_last_seen,
            turn_finished_at: Some(std::time::Instant::now()),
            turn_duration: turn_started.elapsed(),
            note: self.last_note.clone(),
            lease_renew_latency: (latency > 0).then(|| Duration::from_micros(latency)),
            paused: self.dynamic.pause,
            pending_restart: self.pending_restart.clone(),
            config_warning: self.parameters.warning(),
            vip: self
                .vip
                .as_ref()
                .map(|v| (v.cidr(), *self.vip_held.borrow())),
            sync_standbys: self
                .last_view
                .as_ref()
                .and_then(|v| v.sync.as_ref())
                .and_then(|r| r.state.as_ref().ok())
                .filter(|s| {
                    self.last_view
                        .as_ref()
                        .and_then(|v| v.leader_name())
                        .is_some_and(|l| l == s.leader)
                })
                .map(|s| s.members.clone())
                .unwrap_or_default(),
            ..(*previous).clone()
        };
        self.publish_leading();
        self.snapshot.send_replace(Arc::new(snapshot));
    }

    /// Checks the capabilities and the interface (a startup error when
    /// either is missing), then runs the VIP task: it holds the address
    /// while this node leads with a running primary, for no longer than
    /// the lease's fencing deadline, which each renewal extends.
    async fn start_vip(
        &self,
        spec: crate::vip::VipSpec,
    ) -> Result<
        (
            tokio::sync::oneshot::Sender<()>,
            tokio::task::JoinHandle<()>,
        ),
        String,
    > {
        crate::vip::check_capabilities()?;
        let cidr = spec.cidr();
        let vip = crate::vip::Vip::open(spec).await?;
        info!(vip = %cidr, "virtual IP managed");
        let (hold_tx, hold_rx) = watch::channel(None);
        let (mut lease, mut leading) = (self.lease.clone(), self.leading.subscribe());
        tokio::spawn(async move {
            loop {
                let hold_until = if *leading.borrow_and_update() {
                    let lease = *lease.borrow_and_update();
                    lease.id.map(|_| boot_clock::instant_at(lease.valid_until))
                } else {
                    None
                };
                hold_tx.send_if_modified(|current| {
                    let changed = *current != hold_until;
                    *current = hold_until;
                    changed
                });
                tokio::select! {
                    changed = lease.changed() => if changed.is_err() { break },
                    changed = leading.changed() => if changed.is_err() { break },
                }
            }
        });
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(crate::vip::run(
            vip,
            hold_rx,
            self.vip_held.clone(),
            self.timing.loop_wait.min(Duration::from_secs(1)),
            stopped,
        ));
        Ok((stop, task))
    }

    fn millis(&self, at: Instant) -> Millis {
        Millis(at.saturating_duration_since(self.origin).as_millis() as u64)
    }

    /// Runs until `shutdown` resolves (SIGTERM/SIGINT) or a fatal error.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> Result<(), String> {
        info!(node = %self.name, ttl = ?self.timing.ttl, loop_wait = ?self.timing.loop_wait, "agent starting");
        // PostgreSQL never runs unguarded: a machine where the guard cannot
        // run is refused before anything is touched.
        mainstay_pg::check_guard(&self.pg.settings().guard_program)?;
        // The interface is checked before anything is written.
        let vip = match &self.vip {
            Some(spec) => Some(self.start_vip(spec.clone()).await?),
            None => None,
        };
        self.pg
            .write_pgpass()
            .await
            .map_err(|e| format!("cannot write the password file: {e}"))?;
        if self.pg.is_running() {
            // Not started by this agent, so no guard of ours enforces its
            // deadline (started by hand, or an earlier agent's guard could
            // not stop it): it may be a primary that nobody fences.
            warn!(
                "a PostgreSQL not started by this agent runs on the data directory: stopping it \
                 (immediate) so that it runs under a fencing guard"
            );
            self.pg
                .stop(StopMode::Immediate)
                .await
                .map_err(|e| format!("cannot stop the PostgreSQL found running: {e}"))?;
        }
        let lease_tx = self.lease_tx.take().ok_or("the agent runs only once")?;
        let tls = match &self.api_tls_files {
            Some((cert, key)) => Some(crate::tls::acceptor(cert, key)?),
            None => None,
        };
        let listener = crate::api::bind(&self.api_listen).await?;
        let mut listeners = Vec::new();
        for (access, key, listen) in &self.proxy_listens {
            listeners.push((*access, crate::proxy::bind(key, listen)?));
            info!(listen, listener = access.label(), "proxy listening");
        }
        let proxy = if listeners.is_empty() {
            None
        } else {
            Some(crate::proxy::spawn(
                listeners,
                self.route.subscribe(),
                self.proxy_wait,
                self.proxy_stats.clone(),
            )?)
        };
        // One command at a time: a second caller waits its turn.
        let (command_tx, mut commands) = tokio::sync::mpsc::channel(1);
        info!(listen = %self.api_listen, "REST API listening");
        let api = tokio::spawn(crate::api::serve(
            listener,
            crate::api::router(Arc::new(ApiState {
                proxy: (!self.proxy_listens.is_empty()).then(|| {
                    (
                        self.proxy_stats.clone(),
                        self.proxy_listens.iter().map(|l| l.0.label()).collect(),
                    )
                }),
                snapshot: self.snapshot.subscribe(),
                dcs: self.dcs.clone(),
                dcs_timeout: self.timing.dcs_timeout,
                ttl: self.timing.ttl,
                auth: self.api_auth.clone(),
                commands: command_tx,
                failsafe_contact: self.failsafe_contact.clone(),
                running_command: Default::default(),
                params: crate::api::ParamCheck {
                    bin_dir: self.pg.settings().bin_dir.clone(),
                    run_as: self.pg.settings().run_as.clone(),
                    file_parameters: self.file_parameters.clone(),
                },
                ca_file: self.api_ca_file.clone(),
            })),
            tls,
            self.api_limits,
        ));
        let keeper = tokio::spawn(keep_lease(LeaseKeeper {
            dcs: self.dcs.clone(),
            name: self.name.clone(),
            timing: self.timing,
            tx: lease_tx,
            fencer: self.fencer.clone(),
            wake: self.wake.clone(),
            latency_us: self.renew_latency_us.clone(),
            paused: self.renewals_paused.clone(),
            failsafe: Failsafe {
                peers: self.failsafe_peers.clone(),
                auth: self.api_auth.clone(),
                ca_file: self.api_ca_file.clone(),
            },
        }));
        let watcher = tokio::spawn(forward_watch(
            self.dcs.clone(),
            self.member_interest.clone(),
            self.wake.clone(),
        ));
        let dcs_leader_mover = tokio::spawn(keep_dcs_leader_away(
            self.dcs.clone(),
            self.leading.subscribe(),
        ));
        let watchdog = (self.watchdog == Availability::Ready).then(|| {
            let fencer = self.fencer.clone();
            tokio::spawn(crate::watchdog_keeper::keep(
                self.watchdog_config.clone(),
                self.lease.clone(),
                move || fencer.writable(),
                self.timing.fencing_margin,
            ))
        });
        tokio::pin!(shutdown);
        let result = loop {
            let turn_started = Instant::now();
            let mut next = turn_started + self.timing.loop_wait;
            let mut fatal = None;
            // A turn that changed something is followed at once by another,
            // so that e.g. taking the leader key and promoting happen together.
            for _ in 0..6 {
                match self.turn().await {
                    Ok((changed, wake_at)) => {
                        if let Some(at) = wake_at {
                            next = next.min(self.origin + Duration::from_millis(at.0));
                        }
                        if !changed {
                            break;
                        }
                    }
                    Err(TurnError::Fatal(reason)) => {
                        fatal = Some(reason);
                        break;
                    }
                    Err(TurnError::Failed(reason)) => {
                        warn!("{reason}");
                        break;
                    }
                }
            }
            self.publish_snapshot(turn_started);
            self.publish_route();
            if keeper.is_finished() {
                // Without it no deadline is ever extended: the guard would
                // fence a healthy primary.
                fatal = Some("the lease keeper stopped".into());
            }
            if let Some(reason) = fatal {
                error!("stopping the agent: {reason}");
                break Err(reason);
            }
            tokio::select! {
                _ = &mut shutdown => break Ok(()),
                Some((command, reply)) = commands.recv() => {
                    let answer = self.run_command(command).await;
                    let _ = reply.send(answer);
                }
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep_until(next.max(Instant::now() + Duration::from_millis(5))) => {}
            }
        };
        if let Some((stop, task)) = vip {
            // The address goes before PostgreSQL stops: clients get a quick
            // refusal from the next holder instead of a timeout here.
            let _ = stop.send(());
            let _ = tokio::time::timeout(Duration::from_secs(3), task).await;
        }
        self.shut_down().await;
        keeper.abort();
        if let Some(task) = watchdog {
            // PostgreSQL is stopped: the keeper's lease channel closes with
            // the lease keeper and the watchdog is closed cleanly, never
            // dropped (that would reset the host).
            let _ = tokio::time::timeout(Duration::from_secs(3), task).await;
        }
        api.abort();
        drop(proxy);
        watcher.abort();
        dcs_leader_mover.abort();
        result
    }
}

/// While this node leads, keeps etcd's leader on another host: if this
/// host died holding both, etcd's new leader would extend every lease,
/// ours included, by a full TTL and the failover would take twice as long.
async fn keep_dcs_leader_away<D: Dcs>(dcs: Arc<D>, mut leading: watch::Receiver<bool>) {
    const EVERY: Duration = Duration::from_secs(2);
    const MOVE_TIMEOUT: Duration = Duration::from_secs(5);
    loop {
        if !*leading.borrow_and_update() {
            if leading.changed().await.is_err() {
                return;
            }
            continue;
        }
        let local = local_addresses();
        match tokio::time::timeout(MOVE_TIMEOUT, dcs.keep_leader_away(&local)).await {
            Ok(Ok(Some(member))) => info!(
                to = %member,
                "moved etcd's leadership off this host: a host holding both the etcd leader \
                 and the primary would double the failover time if it died"
            ),
            Ok(Ok(None)) => {}
            Ok(Err(err)) => debug!("cannot check where etcd's leader runs: {err}"),
            Err(_) => debug!("cannot check where etcd's leader runs: no answer"),
        }
        tokio::select! {
            _ = tokio::time::sleep(EVERY) => {}
            changed = leading.changed() => if changed.is_err() { return },
        }
    }
}

/// Every address on this host's interfaces.
fn local_addresses() -> Vec<std::net::IpAddr> {
    let mut addresses = Vec::new();
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list` on success; it is walked read-only
    // and freed once below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return addresses;
    }
    let mut entry = list;
    while !entry.is_null() {
        // SAFETY: a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*entry };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_addr points at a sockaddr of the family it names.
            match i32::from(unsafe { (*ifa.ifa_addr).sa_family }) {
                libc::AF_INET => {
                    let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                    addresses.push(std::net::IpAddr::from(
                        u32::from_be(sin.sin_addr.s_addr).to_be_bytes(),
                    ));
                }
                libc::AF_INET6 => {
                    let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                    addresses.push(std::net::IpAddr::from(sin6.sin6_addr.s6_addr));
                }
                _ => {}
            }
        }
        entry = ifa.ifa_next;
    }
    // SAFETY: the list getifaddrs allocated, freed once.
    unsafe { libc::freeifaddrs(list) };
    addresses
}

enum TurnError {
    /// Logged; the loop goes on.
    Failed(String),
    /// Continuing could damage data: the agent stops.
    Fatal(String),
}

impl<D: Dcs> Agent<D> {
    /// One observe/decide/act round. Returns whether state changed and when
    /// the core wants to look again.
    async fn turn(&mut self) -> Result<(bool, Option<Millis>), TurnError> {
        // The DCS first, PostgreSQL second: a status probed after a view
        // without a leader is final for the election (see core::decide).
        let view =
            match tokio::time::timeout(self.timing.dcs_timeout, self.dcs.read_cluster()).await {
                Ok(Ok(view)) => Some(view),
                Ok(Err(err)) => {
                    warn!("cannot read the DCS: {err}");
                    None
                }
                Err(_) => {
                    warn!(
                        "cannot read the DCS: no answer within {:?}",
                        self.timing.dcs_timeout
                    );
                    None
                }
            };
        self.dcs_reachable = view.is_some();
        if let Some(view) = &view {
            let interest = match view.leader_name() {
                None => MemberInterest::All,
                // Replicas join or re-point as soon as a new leader says it
                // runs as primary, not a loop later.
                Some(leader)
                    if leader != self.name
                        && view
                            .leader_status()
                            .is_none_or(|s| s.role != PgRole::Primary) =>
                {
                    MemberInterest::One(leader.to_string())
                }
                Some(_) => MemberInterest::None,
            };
            *self
                .member_interest
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = interest;
            self.last_view = Some(view.clone());
            self.view_read_at = Some(Instant::now());
            self.dcs_last_seen = Some(std::time::SystemTime::now());
            self.absorb_dynamic_config(view);
            // Routes follow a new view at once, before this turn acts.
            self.publish_route();
        }
        if let Some(until) = self.stand_down_until {
            let successor = view
                .as_ref()
                .and_then(|v| v.leader_name())
                .filter(|l| *l != self.name);
            if successor.is_none() && Instant::now() < until {
                // `/patroni` and `ctl list` show why this node does nothing.
                let note = "crash drill: standing down until another node leads";
                if self.last_note != note {
                    info!("{note}");
                    self.last_note = note.into();
                }
                return Ok((false, None));
            }
            info!(
                successor = successor.unwrap_or("none yet"),
                "crash drill over: this node takes part again"
            );
            self.stand_down_until = None;
            self.renewals_paused.store(false, Ordering::SeqCst);
        }
        // While something waits for a restart, look again each turn: any
        // start of PostgreSQL (ctl restart, failover) may have applied it.
        if std::mem::take(&mut self.parameters_dirty) || !self.pending_restart.is_empty() {
            self.apply_parameters().await;
        }
        let local = self.observe_pg().await?;
        // A primary just promoted takes the VIP now, not after this turn.
        self.publish_leading();
        if let Some(view) = &view {
            self.update_failsafe_peers(view, &local);
        }
        let lease = *self.lease.borrow();
        let contact = self
            .failsafe_contact
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let contact = contact.map(|(leader, at)| (leader, self.millis(Instant::from_std(at))));
        let tags = self.published_tags();
        let obs = Observation {
            now: self.millis(Instant::now()),
            name: &self.name,
            tags: &tags,
            settings: &self.settings,
            pg: &local,
            cluster: view.as_ref(),
            lease: Lease {
                id: lease.id,
                valid_until: self.millis(boot_clock::instant_at(lease.valid_until)),
                members_confirmed: lease.members_confirmed,
            },
            config: &self.dynamic,
            wall_secs: unix_now(),
            failsafe_contact: contact.as_ref().map(|(l, at)| (l.as_str(), *at)),
        };
        let decision = decide(&mut self.core, &obs);
        if decision.note != self.last_note {
            info!("{}", decision.note);
            self.last_note = decision.note.clone();
        }
        let mut changed = false;
        let mut failure = None;
        for action in &decision.actions {
            if action.changes_state() {
                info!(?action, "acting");
            }
            match self.execute(action, view.as_ref(), &local, lease.id).await {
                Ok(()) => changed |= action.changes_state(),
                Err(TurnError::Failed(reason)) => {
                    failure = Some(format!("{action:?} failed: {reason}"));
                    changed = false;
                    break;
                }
                Err(fatal) => return Err(fatal),
            }
        }
        if let (Some(view), Some(lease_id)) = (&view, lease.id) {
            self.publish(view, lease_id).await;
        }
        match failure {
            Some(reason) => Err(TurnError::Failed(reason)),
            None => Ok((changed, decision.wake_at)),
        }
    }

    async fn observe_pg(&mut self) -> Result<LocalPg, TurnError> {
        let data = match self.pg.data_dir_state() {
            DataDirState::Missing | DataDirState::Empty => DataDir::Empty,
            DataDirState::Initialized(control) => DataDir::Initialized {
                system_id: control.system_identifier.to_string(),
                was_primary: matches!(
                    control.state,
                    ClusterState::InProduction
                        | ClusterState::ShutDown
                        | ClusterState::ShuttingDown
                        | ClusterState::InCrashRecovery
                ),
            },
            DataDirState::Unusable(reason) => {
                return Err(TurnError::Fatal(format!(
                    "the data directory {} is unusable ({reason}); mainstay will not touch it: \
                     move it away by hand to let this node clone",
                    self.pg.settings().data_dir.display()
                )));
            }
        };
        let mut local = LocalPg {
            data,
            role: PgRole::Stopped,
            timeline: 0,
            lsn: Lsn(0),
            following: None,
            streaming: false,
            sync_standby_names: String::new(),
            standbys: Vec::new(),
        };
        self.pg_answering = false;
        if !self.pg.is_running() {
            self.fencer.set_writable(false);
            self.last_health = None;
            return Ok(local);
        }
        match self.pg.probe().await {
            Ok(health) => {
                self.pg_answering = true;
                local.role = if health.in_recovery {
                    PgRole::Replica
                } else {
                    PgRole::Primary
                };
                local.timeline = health.timeline;
                local.lsn = health.wal_position();
                local.streaming = health.is_streaming();
                local.sync_standby_names = health.synchronous_standby_names.clone();
                local.standbys = health
                    .replicas
                    .iter()
                    .map(|r| Standby {
                        name: r.application_name.clone(),
                        flush: r.flush_lsn.unwrap_or_default(),
                        sync_state: r.sync_state.clone().unwrap_or_default(),
                        streaming: r.state.as_deref() == Some("streaming"),
                    })
                    .collect();
                self.fencer.set_writable(!health.in_recovery);
                self.last_health = Some(health);
            }
            // Running but not answering (busy, starting, shutting down after
            // a fence). A possibly writable server counts as a primary, so
            // that the core can fence it; anything else waits for an answer.
            Err(err) if self.fencer.writable() => {
                warn!("PostgreSQL (writable) runs but does not answer: {err}");
                local.role = PgRole::Primary;
                if let Some(health) = &self.last_health {
                    local.timeline = health.timeline;
                    local.lsn = health.wal_position();
                }
            }
            Err(err) => {
                return Err(TurnError::Failed(format!(
                    "PostgreSQL runs but does not answer yet: {err}"
                )));
            }
        }
        if local.role == PgRole::Replica {
            local.following = self.following.clone();
        }
        Ok(local)
    }

    fn target(
        &self,
        view: Option<&ClusterView>,
        leader: &str,
    ) -> Result<(ConnTarget, MemberStatus), TurnError> {
        let status = view
            .and_then(|v| v.members.get(leader))
            .map(|m| m.status.clone())
            .ok_or_else(|| {
                TurnError::Failed(format!("no member status for the leader {leader}"))
            })?;
        Ok((
            ConnTarget {
                host: status.pg_host.clone(),
                port: status.pg_port,
                name: leader.to_string(),
            },
            status,
        ))
    }

    async fn execute(
        &mut self,
        action: &Action,
        view: Option<&ClusterView>,
        local: &LocalPg,
        lease: Option<i64>,
    ) -> Result<(), TurnError> {
        let failed =
            |what: &str, err: &dyn std::fmt::Display| TurnError::Failed(format!("{what}: {err}"));
        let dcs_failed = |err: mainstay_dcs::DcsError| TurnError::Failed(format!("DCS: {err}"));
        let lease_id = || lease.ok_or_else(|| TurnError::Failed("no lease yet".into()));
        let now_text = || now_rfc3339();
        match action {
            Action::RegisterExistingData { system_id } => {
                warn!(
                    system_id,
                    "the DCS holds no cluster record: registering the existing data, never re-initializing"
                );
                let record = InitializeRecord {
                    system_id: Some(system_id.clone()),
                    by: self.name.clone(),
                    at: now_text(),
                };
                self.dcs
                    .create_initialize(&record)
                    .await
                    .map_err(dcs_failed)?;
            }
            Action::ClaimInitialize | Action::AcquireLeader
                if let Some(reason) = self.parameters.fallback() =>
            {
                return Err(TurnError::Failed(format!(
                    "not taking the leader key: PostgreSQL runs on fallback parameters ({reason})"
                )));
            }
            Action::ClaimInitialize | Action::AcquireLeader
                if let Some(reason) = self.watchdog.blocks_leadership() =>
            {
                return Err(TurnError::Failed(format!(
                    "not taking the leader key: watchdog.mode = \"required\" and the watchdog \
                     is unusable: {reason}"
                )));
            }
            Action::ClaimInitialize => {
                let record = InitializeRecord {
                    system_id: None,
                    by: self.name.clone(),
                    at: now_text(),
                };
                if !self
                    .dcs
                    .create_initialize(&record)
                    .await
                    .map_err(dcs_failed)?
                {
                    return Err(TurnError::Failed(
                        "another node claimed the bootstrap first".into(),
                    ));
                }
            }
            Action::AbandonBootstrap {
                initialize_revision,
            } => {
                self.dcs
                    .delete_initialize(*initialize_revision)
                    .await
                    .map_err(dcs_failed)?;
            }
            Action::Bootstrap => self.bootstrap(view).await?,
            Action::RecordSystemId {
                system_id,
                initialize_revision,
            } => {
                let record = InitializeRecord {
                    system_id: Some(system_id.clone()),
                    by: self.name.clone(),
                    at: now_text(),
                };
                if !self
                    .dcs
                    .update_initialize(&record, *initialize_revision)
                    .await
                    .map_err(dcs_failed)?
                {
                    return Err(TurnError::Failed(
                        "the cluster record changed under us".into(),
                    ));
                }
                info!(system_id, "cluster bootstrapped");
            }
            Action::MoveAside { reason } => {
                let moved = self
                    .pg
                    .move_aside(reason)
                    .map_err(|e| failed("moving the data directory aside", &e))?;
                warn!(to = %moved.display(), reason, "moved the data directory aside");
            }
            Action::AcquireLeader => {
                if !self
                    .dcs
                    .acquire_leader(&self.name, lease_id()?)
                    .await
                    .map_err(dcs_failed)?
                {
                    return Err(TurnError::Failed(
                        "another node took the leader key first".into(),
                    ));
                }
                info!("took the leader key");
            }
            Action::ReleaseLeader { reason } => {
                // Writes stop before the key goes, or two nodes could write.
                if self.pg.is_running() {
                    warn!(
                        reason,
                        "stopping PostgreSQL (immediate) before releasing leadership"
                    );
                    self.stop(StopMode::Immediate).await?;
                }
                self.dcs
                    .release_leader(&self.name, lease_id()?)
                    .await
                    .map_err(dcs_failed)?;
                warn!(reason, "released the leader key");
            }
            Action::ReleaseStaleLeader { lease_id } => {
                self.dcs
                    .release_leader(&self.name, *lease_id)
                    .await
                    .map_err(dcs_failed)?;
                info!(
                    lease_id,
                    "released a leader key that names this node on an earlier lease"
                );
            }
            Action::StartPrimary => {
                let before = local.timeline;
                // The watchdog must guard the server from its first moment.
                self.fencer.set_writable(true);
                let started = self.start_pg(StartRole::Primary).await;
                self.forget_writable_if_stopped();
                started.map_err(|e| failed("starting as primary", &e))?;
                self.following = None;
                if before != 0 {
                    self.confirm_timeline(
                        None,
                        Some(before),
                        local.lsn,
                        "restarted as primary",
                        lease_id()?,
                    )
                    .await;
                }
            }
            Action::StartReplica { leader } => {
                let target = match leader {
                    Some(name) => Some(self.target(view, name)?.0),
                    None => None,
                };
                self.start_pg(StartRole::Replica { leader: target })
                    .await
                    .map_err(|e| failed("starting as replica", &e))?;
                self.following = leader.clone();
            }
            Action::Rejoin { leader } => {
                let (target, status) = self.target(view, leader)?;
                self.rejoin(&target, &status, history(view)).await?;
            }
            Action::BaseBackup { leader } => {
                let (target, _) = self.target(view, leader)?;
                info!(from = leader, "cloning with pg_basebackup");
                self.pg
                    .basebackup(&target)
                    .await
                    .map_err(|e| failed("pg_basebackup", &e))?;
                self.start_pg(StartRole::Replica {
                    leader: Some(target),
                })
                .await
                .map_err(|e| failed("starting the clone", &e))?;
                self.following = Some(leader.clone());
            }
            Action::Promote { reason } => {
                // PostgreSQL takes the number after the newest history file.
                let claimed = local.timeline.max(self.pg.newest_history_timeline()) + 1;
                self.claim_timeline(claimed, local.lsn, reason, lease_id()?)
                    .await?;
                // A promotion that times out may still complete: guard first.
                self.fencer.set_writable(true);
                self.pg
                    .promote()
                    .await
                    .map_err(|e| failed("promoting", &e))?;
                self.following = None;
                // Proxies and replicas act on the member key saying primary:
                // say it now, not after the bookkeeping at the turn's end.
                let promoted = self.pg.probe().await.ok();
                if let (Some(health), Some(view)) = (&promoted, view) {
                    self.last_health = Some(health.clone());
                    self.publish(view, lease_id()?).await;
                }
                self.confirm_timeline(promoted, Some(claimed), local.lsn, reason, lease_id()?)
                    .await;
            }
            Action::Follow { leader } => {
                let (target, status) = self.target(view, leader)?;
                if let Divergence::Diverged { reason } = self
                    .running_divergence(&target, &status, history(view))
                    .await?
                {
                    warn!(
                        reason,
                        "this replica diverged from the new leader: stopping it to rewind"
                    );
                    self.stop(StopMode::Fast).await?;
                    return self.rejoin(&target, &status, history(view)).await;
                }
                self.pg
                    .follow(Some(&target))
                    .await
                    .map_err(|e| failed("re-pointing replication", &e))?;
                self.following = Some(leader.clone());
                info!(leader, "now following the new leader (reload, no restart)");
            }
            Action::Fence { reason } => {
                warn!(reason, "fencing: immediate shutdown of PostgreSQL");
                self.stop(StopMode::Immediate).await?;
            }
            Action::SyncSlots { members } => {
                let changes = self
                    .pg
                    .sync_slots(members)
                    .await
                    .map_err(|e| failed("replication slots", &e))?;
                if !changes.created.is_empty() || !changes.dropped.is_empty() {
                    info!(created = ?changes.created, dropped = ?changes.dropped, "replication slots changed");
                }
            }
            Action::Switchover {
                candidate,
                failover_revision,
            } => {
                self.switchover(view, candidate, *failover_revision, lease_id()?)
                    .await?
            }
            Action::WriteSync {
                members,
                expected_revision,
            } => {
                let state = SyncState {
                    leader: self.name.clone(),
                    members: members.clone(),
                };
                let written = tokio::time::timeout(
                    self.timing.dcs_timeout,
                    self.dcs
                        .write_sync(&state, *expected_revision, (&self.name, lease_id()?)),
                )
                .await
                .map_err(|_| TurnError::Failed("writing the sync key: DCS timeout".into()))?
                .map_err(dcs_failed)?;
                if !written {
                    return Err(TurnError::Failed(
                        "the sync key or the leader key changed meanwhile".into(),
                    ));
                }
                info!(?members, "synchronous standbys guaranteed (sync key)");
            }
            Action::WriteFailsafe {
                state,
                expected_revision,
            } => {
                self.widen_failsafe_peers(state);
                let written = tokio::time::timeout(
                    self.timing.dcs_timeout,
                    self.dcs
                        .write_failsafe(state, *expected_revision, (&self.name, lease_id()?)),
                )
                .await
                .map_err(|_| TurnError::Failed("writing the failsafe key: DCS timeout".into()))?
                .map_err(dcs_failed)?;
                if !written {
                    return Err(TurnError::Failed(
                        "the failsafe key or the leader key changed meanwhile".into(),
                    ));
                }
                let members: Vec<&String> = state.members.keys().collect();
                info!(
                    ?members,
                    "failsafe: the members this leader relies on (failsafe key)"
                );
            }
            Action::SetSyncStandbys { names, block } => {
                let value = render_standby_names(names, *block);
                self.pg
                    .set_synchronous_standby_names(&value)
                    .await
                    .map_err(|e| failed("setting synchronous_standby_names", &e))?;
                info!(
                    synchronous_standby_names = value,
                    "commits now wait for these standbys"
                );
            }
            Action::ClearFailover {
                failover_revision,
                reason,
            } => {
                if self
                    .dcs
                    .delete_failover(*failover_revision)
                    .await
                    .map_err(dcs_failed)?
                {
                    info!(reason, "failover request cleared");
                }
            }
            Action::Fatal { reason } => return Err(TurnError::Fatal(reason.clone())),
        }
        Ok(())
    }

    /// A planned handover (docs/rules.md section 5, "Switchover"): checkpoint
    /// while still writable, stop cleanly so the walsenders ship everything
    /// including the shutdown checkpoint, check that the candidate received
    /// it, then move the leader key to the candidate's lease in one
    /// transaction. On any failure the key is still ours and the next turn
    /// restarts the primary.
    async fn switchover(
        &mut self,
        view: Option<&ClusterView>,
        candidate: &str,
        failover_revision: i64,
        lease: i64,
    ) -> Result<(), TurnError> {
        let (target, _) = self.target(view, candidate)?;
        let candidate_lease = view
            .and_then(|v| v.members.get(candidate))
            .map(|m| m.lease_id)
            .ok_or_else(|| TurnError::Failed(format!("{candidate} has no member key")))?;
        let started = Instant::now();
        info!(candidate, "switchover: checkpoint, then a clean shutdown");
        if let Err(err) = self.pg.checkpoint().await {
            warn!("switchover: the checkpoint before shutdown failed ({err}); going on");
        }
        self.stop(StopMode::Fast).await?;
        let end = self
            .pg
            .control_data()
            .map_err(|e| TurnError::Failed(format!("pg_controldata after shutdown: {e}")))?
            .checkpoint_lsn;
        let limit = self.timing.ttl;
        let caught_up = self.pg.wait_until_received(&target, end, limit).await;
        let refusal = match caught_up {
            Err(err) => Some(format!("the candidate did not catch up: {err}")),
            Ok(_) => match self
                .dcs
                .hand_over_leader(&self.name, lease, candidate, candidate_lease)
                .await
            {
                Ok(true) => None,
                Ok(false) => Some("the leader or the candidate's lease changed".into()),
                Err(err) => Some(format!("handing the leader key over: {err}")),
            },
        };
        if let Some(reason) = refusal {
            error!(
                candidate,
                reason, "switchover aborted: this node stays leader and restarts its primary"
            );
            let _ = self.dcs.delete_failover(failover_revision).await;
            return Err(TurnError::Failed(format!("switchover aborted: {reason}")));
        }
        info!(
            candidate,
            elapsed = ?started.elapsed(),
            shutdown_checkpoint = %end,
            "switchover: leadership handed over; following the new leader"
        );
        Ok(())
    }

    fn forget_writable_if_stopped(&self) {
        if !self.pg.is_running() {
            self.fencer.set_writable(false);
        }
    }

    async fn stop(&mut self, mode: StopMode) -> Result<(), TurnError> {
        if mode == StopMode::Immediate {
            // The watchdog's path is synchronous and cannot wait on anything.
            self.pg.fencer().fence_now();
        }
        let result = self.pg.stop(mode).await;
        if !self.pg.is_running() {
            self.fencer.set_writable(false);
            self.following = None;
        }
        result.map_err(|e| TurnError::Failed(format!("stopping PostgreSQL: {e}")))
    }

    async fn bootstrap(&mut self, view: Option<&ClusterView>) -> Result<(), TurnError> {
        info!("initializing a new cluster (initdb with data checksums)");
        let result = async {
            self.pg.initdb().await.map_err(|e| format!("initdb: {e}"))?;
            self.fencer.set_writable(true);
            let started = self.start_pg(StartRole::Primary).await;
            self.forget_writable_if_stopped();
            started.map_err(|e| format!("first start: {e}"))?;
            self.pg
                .create_roles()
                .await
                .map_err(|e| format!("creating roles: {e}"))
        }
        .await;
        let Err(reason) = result else { return Ok(()) };
        error!(
            reason,
            "bootstrap failed: moving the attempt aside and giving the claim back"
        );
        if self.pg.is_running() {
            let _ = self.stop(StopMode::Immediate).await;
        }
        if !matches!(
            self.pg.data_dir_state(),
            DataDirState::Missing | DataDirState::Empty
        ) {
            match self.pg.move_aside("failed bootstrap") {
                Ok(path) => warn!(to = %path.display(), "moved the failed bootstrap aside"),
                Err(err) => error!("cannot move the failed bootstrap aside: {err}"),
            }
        }
        if let Some(lease) = self.lease.borrow().id {
            let _ = self.dcs.release_leader(&self.name, lease).await;
        }
        if let Some(view) = view {
            let _ = self.dcs.delete_initialize(view.initialize_revision).await;
        }
        let retry_in = self.core.bootstrap_failed(self.millis(Instant::now()));
        Err(TurnError::Failed(format!(
            "bootstrap failed: {reason}; this node claims it again in {} s at the earliest",
            retry_in.as_secs()
        )))
    }

    /// Before promoting: claim the next timeline in the data directory and,
    /// while this node holds the leader key, in the DCS history, so that a
    /// node that creates the same number unseen can later tell the WAL apart
    /// (see `timeline::foreign_timeline`). No promotion without both.
    async fn claim_timeline(
        &self,
        timeline: u32,
        switch_lsn: Lsn,
        reason: &str,
        lease: i64,
    ) -> Result<(), TurnError> {
        self.pg
            .write_timeline_claim(&self.name, timeline)
            .map_err(|e| TurnError::Failed(format!("recording the timeline claim: {e}")))?;
        let entry = HistoryEntry {
            timeline,
            switch_lsn,
            reason: reason.into(),
            new_leader: self.name.clone(),
            at: now_rfc3339(),
        };
        match tokio::time::timeout(
            self.timing.dcs_timeout,
            self.dcs.append_history(&entry, Some((&self.name, lease))),
        )
        .await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(err)) => Err(TurnError::Failed(format!(
                "recording timeline {timeline} in the DCS history: {err}"
            ))),
            Err(_) => Err(TurnError::Failed(format!(
                "recording timeline {timeline} in the DCS history: no answer within {:?}",
                self.timing.dcs_timeout
            ))),
        }
    }

    /// After a promotion or a restart as primary: if PostgreSQL ended on
    /// another timeline than claimed, claim the real one.
    async fn confirm_timeline(
        &self,
        probed: Option<mainstay_pg::Health>,
        claimed: Option<u32>,
        switch_lsn: Lsn,
        reason: &str,
        lease: i64,
    ) {
        let health = match probed {
            Some(health) => health,
            None => match self.pg.probe().await {
                Ok(health) => health,
                Err(_) => return,
            },
        };
        if claimed == Some(health.timeline) {
            info!(timeline = health.timeline, %switch_lsn, reason, "primary on the claimed timeline");
            return;
        }
        if self.pg.timeline_claim().map(|(t, _)| t) == Some(health.timeline) {
            return;
        }
        if let Err(TurnError::Failed(err) | TurnError::Fatal(err)) = self
            .claim_timeline(health.timeline, switch_lsn, reason, lease)
            .await
        {
            warn!("{err}");
        }
    }

    async fn leader_wal(
        &self,
        target: &ConnTarget,
        status: &MemberStatus,
    ) -> Result<LeaderWal, TurnError> {
        let text = self
            .pg
            .timeline_history(target, status.timeline)
            .await
            .map_err(|e| {
                TurnError::Failed(format!("reading the leader's timeline history: {e}"))
            })?;
        let history = parse_history(&text)
            .map_err(|e| TurnError::Failed(format!("the leader's history file: {e}")))?;
        Ok(LeaderWal {
            timeline: status.timeline,
            flush_lsn: status.flush_lsn.max(status.received_lsn),
            history,
        })
    }

    fn local_history(
        &self,
        timeline: u32,
    ) -> Result<Vec<mainstay_core::timeline::TimelineSwitch>, TurnError> {
        let text = self
            .pg
            .local_timeline_history(timeline)
            .map_err(|e| TurnError::Failed(format!("reading the local timeline history: {e}")))?;
        parse_history(&text).map_err(|e| TurnError::Failed(format!("the local history file: {e}")))
    }

    async fn running_divergence(
        &self,
        target: &ConnTarget,
        status: &MemberStatus,
        history: &[HistoryEntry],
    ) -> Result<Divergence, TurnError> {
        let Some(health) = &self.last_health else {
            return Ok(Divergence::None);
        };
        let local = LocalWal {
            timeline: health.timeline,
            end_lsn: health.wal_position(),
            history: self.local_history(health.timeline)?,
        };
        let leader = self.leader_wal(target, status).await?;
        if let Some(reason) = self.foreign_timeline(local.timeline, &leader, history) {
            return Ok(Divergence::Diverged { reason });
        }
        Ok(divergence(&local, &leader))
    }

    fn foreign_timeline(
        &self,
        timeline: u32,
        leader: &LeaderWal,
        history: &[HistoryEntry],
    ) -> Option<String> {
        let claim = self.pg.timeline_claim();
        let claim = claim.as_ref().map(|(t, node)| (*t, node.as_str()));
        foreign_timeline(&self.name, claim, timeline, leader, history)
    }

    /// Makes a stopped node a replica of `target`, rewinding it first if its
    /// WAL is not a prefix of the leader's.
    async fn rejoin(
        &mut self,
        target: &ConnTarget,
        status: &MemberStatus,
        history: &[HistoryEntry],
    ) -> Result<(), TurnError> {
        let failed =
            |what: &str, err: &dyn std::fmt::Display| TurnError::Failed(format!("{what}: {err}"));
        let state = self
            .pg
            .control_data()
            .map_err(|e| failed("pg_controldata", &e))?
            .state;
        // Only a crashed primary needs crash recovery before its WAL end can
        // be read; single-user mode on a standby would end its recovery.
        if matches!(
            state,
            ClusterState::InProduction | ClusterState::InCrashRecovery | ClusterState::ShuttingDown
        ) && self
            .pg
            .ensure_clean_shutdown()
            .await
            .map_err(|e| failed("crash recovery", &e))?
        {
            info!("finished crash recovery in single-user mode before comparing histories");
        }
        let control = self
            .pg
            .control_data()
            .map_err(|e| failed("pg_controldata", &e))?;
        let standby = matches!(
            control.state,
            ClusterState::ShutDownInRecovery | ClusterState::InArchiveRecovery
        );
        let (timeline, end_lsn) = if standby {
            let timeline = if control.min_recovery_end_timeline > 0 {
                control.min_recovery_end_timeline
            } else {
                control.timeline
            };
            (
                timeline,
                control.min_recovery_end_lsn.max(control.checkpoint_lsn),
            )
        } else {
            // The shutdown checkpoint record that starts at checkpoint_lsn is
            // local WAL too: a leader that switched timelines exactly there
            // never had it, so the exclusive end lies past its first byte.
            (control.timeline, Lsn(control.checkpoint_lsn.0 + 1))
        };
        let local = LocalWal {
            timeline,
            end_lsn,
            history: self.local_history(timeline)?,
        };
        let leader = self.leader_wal(target, status).await?;
        if let Some(reason) = self.foreign_timeline(local.timeline, &leader, history) {
            // Identical history files: pg_rewind would find nothing to do.
            warn!(
                leader = target.name,
                reason, "local WAL is not the leader's: moving the data directory aside to clone"
            );
            self.reclone(target, "timeline created twice").await?;
        } else {
            self.rewind_if_diverged(target, &local, &leader).await?;
        }
        self.start_pg(StartRole::Replica {
            leader: Some(target.clone()),
        })
        .await
        .map_err(|e| failed("starting as replica", &e))?;
        self.following = Some(target.name.clone());
        Ok(())
    }

    async fn rewind_if_diverged(
        &mut self,
        target: &ConnTarget,
        local: &LocalWal,
        leader: &LeaderWal,
    ) -> Result<(), TurnError> {
        match divergence(local, leader) {
            Divergence::None => info!(
                leader = target.name,
                "local WAL is a prefix of the leader's: no rewind needed"
            ),
            Divergence::Diverged { reason } => {
                warn!(
                    leader = target.name,
                    reason, "diverged from the leader: running pg_rewind"
                );
                if let Err(err) = self.pg.rewind(target).await {
                    warn!(
                        "pg_rewind failed ({err}): moving the data directory aside and cloning afresh"
                    );
                    self.reclone(target, "rewind failed").await?;
                }
            }
        }
        Ok(())
    }

    /// Moves the data directory aside (never deletes it) and clones afresh.
    async fn reclone(&mut self, target: &ConnTarget, reason: &str) -> Result<(), TurnError> {
        let failed =
            |what: &str, err: &dyn std::fmt::Display| TurnError::Failed(format!("{what}: {err}"));
        let moved = self
            .pg
            .move_aside(reason)
            .map_err(|e| failed("moving aside", &e))?;
        warn!(to = %moved.display(), reason, "moved the old data directory aside");
        self.pg
            .basebackup(target)
            .await
            .map_err(|e| failed("pg_basebackup", &e))
            .map(|_| ())
    }

    async fn publish(&mut self, view: &ClusterView, lease: i64) {
        let health = self.last_health.as_ref();
        let role = match health {
            Some(h) if self.pg.is_running() => {
                if h.in_recovery {
                    PgRole::Replica
                } else {
                    PgRole::Primary
                }
            }
            _ => PgRole::Stopped,
        };
        let status = MemberStatus {
            name: self.name.clone(),
            role,
            state: if role == PgRole::Stopped {
                "stopped".into()
            } else {
                "running".into()
            },
            api_url: self.api_url.clone(),
            pg_host: self.pg.settings().connect_host.clone(),
            pg_port: self.pg.settings().port,
            timeline: health.map_or(0, |h| h.timeline),
            received_lsn: health.map_or(Lsn(0), |h| h.wal_position()),
            replayed_lsn: health.and_then(|h| h.replay_lsn).unwrap_or_default(),
            flush_lsn: health.and_then(|h| h.flush_lsn).unwrap_or_default(),
            following: if role == PgRole::Replica {
                self.following.clone()
            } else {
                None
            },
            streaming: health.is_some_and(|h| h.is_streaming()),
            tags: self.published_tags(),
            version: env!("CARGO_PKG_VERSION").into(),
            view_revision: view.revision,
            view_had_leader: view.leader.is_some(),
            vip: self
                .vip
                .as_ref()
                .filter(|_| *self.vip_held.borrow())
                .map(|v| v.cidr()),
            warning: self.parameters.warning(),
        };
        // The key lives on the lease, so an unchanged status needs no write:
        // an idle cluster then costs etcd no fsync a second per member (flash
        // wear on small hosts). A key someone deleted, or one on an older
        // lease, is written again because the view shows it gone or
        // different. Without a leader an unchanged status is still written
        // once a loop, as the election waits for statuses newer than the
        // last leader's revision; but not at every turn: each write wakes
        // every other member (they watch all members while leaderless), whose
        // writes woke this one again, a storm that lasted as long as no node
        // could lead (a failing bootstrap, every member nofailover).
        let published = view.members.get(&self.name).is_some_and(|record| {
            record.lease_id == lease
                && MemberStatus {
                    view_revision: status.view_revision,
                    ..record.status.clone()
                } == status
        });
        let wrote_lately = self
            .last_member_write
            .is_some_and(|at| at.elapsed() < self.timing.loop_wait);
        if published && (view.leader.is_some() || wrote_lately) {
            return;
        }
        match tokio::time::timeout(self.timing.dcs_timeout, self.dcs.put_member(&status, lease))
            .await
        {
            Ok(Ok(())) => self.last_member_write = Some(Instant::now()),
            Ok(Err(err)) => warn!("cannot publish the member status: {err}"),
            Err(_) => warn!("cannot publish the member status: DCS timeout"),
        }
    }

    /// SIGTERM: a primary stops cleanly (replicas receive everything) and
    /// gives the leader key up so the best replica takes over at once.
    async fn shut_down(&mut self) {
        let lease = self.lease.borrow().id;
        let leading = match (self.dcs.read_cluster().await, lease) {
            (Ok(view), Some(lease)) => view
                .leader
                .is_some_and(|l| l.name == self.name && l.lease_id == lease),
            _ => false,
        };
        info!(leading, "shutting down: stopping PostgreSQL");
        if self.pg.is_running()
            && let Err(err) = self.pg.stop(StopMode::Fast).await
        {
            warn!("fast shutdown failed ({err}): immediate shutdown");
            self.pg.fencer().fence_now();
            let _ = self.pg.stop(StopMode::Immediate).await;
        }
        let stopped = !self.pg.is_running();
        if stopped {
            self.fencer.set_writable(false);
        }
        if let Some(lease) = lease {
            // A primary that may still accept writes keeps the key: the
            // others take over only once the lease (and the watchdog's
            // deadline before it) has run out.
            if leading && !stopped {
                error!("PostgreSQL did not stop: keeping the leader key until the lease expires");
                return;
            }
            if leading {
                match self.dcs.release_leader(&self.name, lease).await {
                    Ok(_) => info!("released the leader key: the best replica takes over"),
                    Err(err) => warn!("cannot release the leader key: {err}"),
                }
            }
            let _ = self.dcs.revoke_lease(lease).await;
        }
        info!("agent stopped");
    }
}

fn history(view: Option<&ClusterView>) -> &[HistoryEntry] {
    view.map_or(&[], |v| &v.history)
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// Renews the node's lease and tells the others when leadership may lapse.
struct LeaseKeeper<D> {
    dcs: Arc<D>,
    name: String,
    timing: EffectiveTiming,
    tx: watch::Sender<Lease>,
    fencer: mainstay_pg::Fencer,
    wake: Arc<Notify>,
    latency_us: Arc<std::sync::atomic::AtomicU64>,
    /// No keep-alive while set: the lease runs out as if the host died.
    paused: Arc<AtomicBool>,
    failsafe: Failsafe,
}

/// Whom a leader in failsafe mode asks, and how.
#[derive(Clone, Debug)]
struct FailsafePeers {
    /// The lease the leader key was on when the list was made.
    lease: i64,
    /// (name, API URL) of every other member.
    members: Vec<(String, String)>,
}

struct Failsafe {
    peers: Arc<std::sync::Mutex<Option<FailsafePeers>>>,
    auth: ApiAuth,
    ca_file: Option<std::path::PathBuf>,
}

impl Failsafe {
    /// The members on the list now, if there is one for this lease.
    fn current(&self, lease: Option<i64>) -> Option<std::collections::BTreeSet<String>> {
        let peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        peers
            .as_ref()
            .filter(|p| Some(p.lease) == lease)
            .map(|p| p.members.iter().map(|(name, _)| name.clone()).collect())
    }

    /// Asks every member to confirm this leader (concurrently, each within
    /// `timeout`); the members asked, only if all of them confirmed. A list
    /// with nobody else on it confirms nothing: a member that joins later
    /// was never asked.
    async fn confirmed(
        &self,
        name: &str,
        lease: Option<i64>,
        timeout: Duration,
    ) -> Option<std::collections::BTreeSet<String>> {
        let peers = self.peers.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let peers = peers.filter(|p| Some(p.lease) == lease && !p.members.is_empty())?;
        let body = serde_json::json!({ "leader": name });
        let handles: Vec<_> = peers
            .members
            .iter()
            .map(|(member, url)| {
                let client = self.auth.peer_client(url, timeout, &self.ca_file);
                let (body, member) = (body.clone(), member.clone());
                tokio::spawn(async move {
                    let answer = client
                        .request(hyper::Method::POST, "/failsafe", Some(&body))
                        .await;
                    (member, answer.is_ok_and(|a| a.status.is_success()))
                })
            })
            .collect();
        let mut refused = Vec::new();
        for handle in handles {
            match handle.await {
                Ok((_, true)) => {}
                Ok((member, false)) => refused.push(member),
                Err(_) => refused.push("?".into()),
            }
        }
        if !refused.is_empty() {
            warn!(
                ?refused,
                "failsafe: not every member confirmed this leader: it stops at its lease deadline"
            );
        }
        refused
            .is_empty()
            .then(|| peers.members.into_iter().map(|(name, _)| name).collect())
    }
}

async fn keep_lease<D: Dcs>(keeper: LeaseKeeper<D>) {
    let LeaseKeeper {
        dcs,
        name,
        timing,
        tx,
        fencer,
        wake,
        latency_us,
        paused,
        failsafe,
    } = keeper;
    let lease_timing = LeaseTiming {
        ttl_ms: timing.ttl.as_millis() as u64,
        fencing_margin_ms: timing.fencing_margin.as_millis() as u64,
    };
    let mut clock = LeaseClock::new(lease_timing, boot_clock::now());
    // The members whose confirmation the current failsafe deadline rests on.
    let mut confirmed_by = std::collections::BTreeSet::new();
    // The guard hears of every deadline before anyone acts on it.
    let publish = |clock: &LeaseClock| {
        let lease = clock.lease();
        fencer.set_deadline(boot_clock::boot_time(lease.valid_until));
        tx.send_replace(lease);
    };
    let ttl_secs = timing.ttl.as_secs() as i64;
    let mut ticker = tokio::time::interval(timing.renew_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        if paused.load(Ordering::SeqCst) {
            continue;
        }
        // The leader rewrote the failsafe list with a member it never asked:
        // the old list's promise no longer covers everyone who may lead.
        if clock.lease().members_confirmed
            && failsafe
                .current(clock.lease().id)
                .is_some_and(|now| !now.is_subset(&confirmed_by))
        {
            warn!("failsafe: the list of members changed since they confirmed this leader");
            clock.members_changed();
            publish(&clock);
        }
        let sent = boot_clock::now();
        let round_trip = Instant::now();
        let previous = clock.lease().id;
        let outcome = match previous {
            None => match tokio::time::timeout(timing.dcs_timeout, dcs.grant_lease(ttl_secs)).await
            {
                Ok(Ok(id)) => Renewal::Confirmed(id),
                Ok(Err(err)) => {
                    warn!("lease grant failed: {err}");
                    Renewal::NoAnswer
                }
                Err(_) => {
                    warn!(
                        "lease grant failed: no answer within {:?}",
                        timing.dcs_timeout
                    );
                    Renewal::NoAnswer
                }
            },
            Some(id) => match tokio::time::timeout(timing.dcs_timeout, dcs.keep_alive(id)).await {
                Ok(Ok(ttl)) if ttl > 0 => Renewal::Confirmed(id),
                Ok(Ok(_)) => Renewal::Expired,
                Ok(Err(err)) => {
                    warn!("lease renewal failed: {err}");
                    Renewal::NoAnswer
                }
                Err(_) => {
                    warn!(
                        "lease renewal failed: no answer within {:?}",
                        timing.dcs_timeout
                    );
                    Renewal::NoAnswer
                }
            },
        };
        let writable = fencer.writable();
        let key = match outcome {
            Renewal::Confirmed(id) => {
                let micros = round_trip.elapsed().as_micros().clamp(1, u64::MAX as u128) as u64;
                latency_us.store(micros, Ordering::Relaxed);
                if previous != Some(id) {
                    info!(lease = id, "lease granted");
                }
                if writable {
                    Some(check_leader_key(&*dcs, &name, id, &clock, timing.dcs_timeout).await)
                } else {
                    None
                }
            }
            _ => None,
        };
        let next = clock.on_renewal(sent, boot_clock::now(), outcome, key, writable);
        if let Some(why) = next.fenced {
            warn!("{why}: fencing");
        }
        if outcome == Renewal::Expired && !next.grant_for_take_back {
            warn!("the lease expired in etcd: requesting a new one");
        }
        if next.grant_for_take_back {
            warn!(
                "the lease expired in etcd while the members confirmed this primary \
                 (failsafe): requesting a new one to take the leader key back"
            );
            let granted = tokio::time::timeout(timing.dcs_timeout, dcs.grant_lease(ttl_secs))
                .await
                .ok()
                .and_then(Result::ok);
            clock.failsafe_lease_granted(granted);
        }
        publish(&clock);
        if next.wake_loop {
            wake.notify_one();
        }
        if next.ask_members {
            let asked = boot_clock::now();
            if let Some(by) = failsafe
                .confirmed(&name, clock.lease().id, timing.dcs_timeout)
                .await
            {
                debug!("failsafe: every member confirmed this leader");
                clock.members_confirmed(asked);
                confirmed_by = by;
                publish(&clock);
            }
        }
    }
}

/// Whether the leader key is still this node's (and, when only a failsafe
/// promise could use the answer, whether nobody holds it).
async fn check_leader_key<D: Dcs>(
    dcs: &D,
    name: &str,
    lease: i64,
    clock: &LeaseClock,
    timeout: Duration,
) -> KeyCheck {
    match tokio::time::timeout(timeout, dcs.leader_held_by(name, lease)).await {
        Ok(Ok(true)) => KeyCheck::Ours,
        Ok(Ok(false)) => KeyCheck::NotOurs {
            absent: clock.wants_absence_check() && leader_key_absent(dcs, timeout).await,
        },
        _ => KeyCheck::Unknown,
    }
}

/// Whether etcd answers that nobody holds the leader key.
async fn leader_key_absent<D: Dcs>(dcs: &D, timeout: Duration) -> bool {
    matches!(
        tokio::time::timeout(timeout, dcs.read_cluster()).await,
        Ok(Ok(view)) if view.leader.is_none()
    )
}

/// Member keys whose changes wake the HA loop at once.
#[derive(Clone, Debug, PartialEq, Eq)]
enum MemberInterest {
    /// No leader: an election waits for every member's status.
    All,
    /// A new leader that does not run as primary yet.
    One(String),
    None,
}

/// Turns DCS watch events into wake-ups of the HA loop. Member changes only
/// matter during an election or while a new leader is starting.
async fn forward_watch<D: Dcs>(
    dcs: Arc<D>,
    interest: Arc<std::sync::Mutex<MemberInterest>>,
    wake: Arc<Notify>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match dcs.watch().await {
            Ok(mut events) => {
                debug!("DCS watch open");
                while let Some(event) = events.recv().await {
                    match event {
                        WatchEvent::Changed {
                            key:
                                KeyKind::Leader
                                | KeyKind::Initialize
                                | KeyKind::Failover
                                | KeyKind::Sync
                                | KeyKind::Config,
                            ..
                        } => {
                            backoff = Duration::from_millis(100);
                            wake.notify_one();
                        }
                        WatchEvent::Changed {
                            key: KeyKind::Member(name),
                            ..
                        } => {
                            let wanted = match &*interest.lock().unwrap_or_else(|e| e.into_inner())
                            {
                                MemberInterest::All => true,
                                MemberInterest::One(leader) => *leader == name,
                                MemberInterest::None => false,
                            };
                            if wanted {
                                wake.notify_one();
                            }
                        }
                        WatchEvent::Changed { .. } => {}
                        WatchEvent::Error(reason) => {
                            warn!("DCS watch failed: {reason}");
                            break;
                        }
                    }
                }
            }
            Err(err) => warn!("cannot open the DCS watch: {err}"),
        }
        wake.notify_one();
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}
