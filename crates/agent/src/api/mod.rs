//! The REST API every agent serves: Patroni-compatible health checks, status
//! documents, metrics. Handlers read the snapshot the HA loop publishes
//! after every turn and never wait on PostgreSQL beyond a bound: the health
//! checks and `/patroni` overlay a probe at most 100 ms old (`live.rs`),
//! which gives up after 0.8 s and then keeps the snapshot's answer, so a
//! slow or hung server cannot make a check hang (a check that times out
//! looks like a dead node to a load balancer). `/config` and `/cluster`
//! read the DCS, within `dcs_timeout`.

mod actions;
mod effective_config;
pub mod etcd_members;
mod files;
pub mod health;
mod live;
mod metrics;
mod openapi;
mod param_check;
mod patroni_metrics;
mod recover_alone;
mod serve;
pub(crate) mod status;

pub use param_check::{ParamCheck, ParamCheckError};
pub use serve::{Limits, MAX_BODY_BYTES, ServeError, bind, serve};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use health::{Check, Filters};
use mainstay_core::{ClusterView, Lsn, Tags};
use mainstay_dcs::Dcs;
use mainstay_pg::Health;
use serde_json::json;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::watch;

/// What the HA loop knew at the end of its last turn.
#[derive(Clone, Debug)]
pub struct NodeSnapshot {
    pub name: String,
    pub scope: String,
    pub api_url: String,
    pub tags: Tags,
    pub timing: mainstay_core::Timing,
    pub data_dir: PathBuf,
    /// A postmaster runs on the data directory.
    pub running: bool,
    /// The last probe of a running server; `None` if it did not answer.
    pub health: Option<Health>,
    /// The leader key holds this node's name and confirmed lease.
    pub holds_leader: bool,
    /// The last DCS view read successfully.
    pub view: Option<ClusterView>,
    /// The last read of the DCS worked.
    pub dcs_reachable: bool,
    pub dcs_last_seen: Option<SystemTime>,
    /// When the HA loop last finished a turn, and how long it took.
    pub turn_finished_at: Option<Instant>,
    pub turn_duration: Duration,
    /// Why the loop did what it did, as logged.
    pub note: String,
    /// Round trip of the last confirmed lease renewal.
    pub lease_renew_latency: Option<Duration>,
    pub paused: bool,
    /// PostgreSQL parameters changed that only a restart applies.
    pub pending_restart: Vec<mainstay_core::PendingRestart>,
    /// Proxy counters per listener and target (filled by `/metrics`).
    pub proxy: Vec<crate::proxy::TargetCounters>,
    /// Per configured proxy listener: connections closed for want of a
    /// target (filled by `/metrics`).
    pub proxy_refused: Vec<(&'static str, u64)>,
    /// Members the leader guarantees hold every acknowledged commit.
    pub sync_standbys: Vec<String>,
    /// The configured virtual IP and whether this node holds it now.
    pub vip: Option<(String, bool)>,
    /// Why the configured kernel watchdog cannot be used, if it cannot.
    pub watchdog_failed: Option<String>,
    /// The cluster's PostgreSQL parameters are refused here, or PostgreSQL
    /// runs on the last parameters it started with.
    pub config_warning: Option<String>,
    /// This node's supervised services (`[[service]]`), in start order.
    pub services: Vec<mainstay_services::ServiceStatus>,
    /// What this node alerts its operators to now (`[alerts]`).
    pub alerts: Vec<crate::alerts::Alert>,
    /// The data directory's system identifier, as last read from a
    /// running server (it does not change while the directory lives).
    pub system_identifier: Option<u64>,
    /// The last timeline a running server reported.
    pub last_timeline: Option<u32>,
    /// The postmaster's pid, while one runs.
    pub postmaster_pid: Option<i32>,
    /// `failsafe_mode` is on in the cluster's dynamic configuration.
    pub failsafe_enabled: bool,
    /// This node leads on its members' confirmations because etcd cannot
    /// be reached (Patroni's "failsafe mode is active").
    pub failsafe_active: bool,
}

impl NodeSnapshot {
    pub fn new(
        name: &str,
        scope: &str,
        api_url: &str,
        tags: &Tags,
        timing: mainstay_core::Timing,
    ) -> Self {
        NodeSnapshot {
            name: name.into(),
            scope: scope.into(),
            api_url: api_url.into(),
            tags: tags.clone(),
            timing,
            data_dir: PathBuf::new(),
            running: false,
            health: None,
            holds_leader: false,
            view: None,
            dcs_reachable: false,
            dcs_last_seen: None,
            turn_finished_at: None,
            turn_duration: Duration::ZERO,
            note: String::new(),
            lease_renew_latency: None,
            paused: false,
            pending_restart: Vec::new(),
            proxy: Vec::new(),
            proxy_refused: Vec::new(),
            services: Vec::new(),
            alerts: Vec::new(),
            sync_standbys: Vec::new(),
            vip: None,
            watchdog_failed: None,
            config_warning: None,
            system_identifier: None,
            last_timeline: None,
            postmaster_pid: None,
            failsafe_enabled: false,
            failsafe_active: false,
        }
    }

    pub fn pg_running(&self) -> bool {
        self.running && self.health.is_some()
    }

    pub fn is_primary(&self) -> bool {
        self.pg_running() && self.health.as_ref().is_some_and(|h| !h.in_recovery)
    }

    /// Patroni's `/primary`: leadership and a writable server together.
    pub fn is_primary_leader(&self) -> bool {
        self.holds_leader && self.is_primary()
    }

    pub fn is_replica(&self) -> bool {
        self.pg_running() && self.health.as_ref().is_some_and(|h| h.in_recovery)
    }

    pub fn is_sync_standby(&self) -> bool {
        self.sync_standbys.contains(&self.name)
    }

    /// The loop finished a turn recently (see `Timing::loop_alive_within`).
    pub fn loop_is_alive(&self) -> bool {
        let limit = self.timing.loop_alive_within(self.holds_leader);
        self.turn_finished_at
            .is_some_and(|at| at.elapsed() <= limit)
    }

    /// When the DCS was last read, in Unix seconds; 0 if never (Patroni's
    /// `dcs_last_seen`).
    pub fn dcs_last_seen_secs(&self) -> u64 {
        self.dcs_last_seen.map_or(0, unix_secs)
    }

    /// The leader's last published WAL position.
    pub fn leader_lsn(&self) -> Option<Lsn> {
        let status = self.view.as_ref()?.leader_status()?;
        Some(status.flush_lsn.max(status.received_lsn))
    }

    /// How far this replica is behind the leader's last published position.
    pub fn lag_bytes(&self) -> Option<u64> {
        let mine = self.health.as_ref()?.wal_position();
        Some(health::lag(self.leader_lsn()?, mine))
    }
}

pub use actions::ApiAuth;

/// A node whose PostgreSQL runs: a primary, or a replica streaming;
/// holding the leader key or not. A fixture for the API's tests.
#[cfg(test)]
pub(crate) fn running_node(in_recovery: bool, leader: bool) -> NodeSnapshot {
    let mut node = NodeSnapshot::new(
        "n",
        "c",
        "",
        &Tags::default(),
        mainstay_core::Timing::DEFAULT,
    );
    node.running = true;
    node.holds_leader = leader;
    node.health = Some(mainstay_pg::Health {
        in_recovery,
        timeline: 1,
        receive_lsn: in_recovery.then_some(mainstay_core::Lsn(1)),
        wal_receiver: in_recovery.then(|| mainstay_pg::WalReceiver {
            status: "streaming".into(),
            received_tli: 1,
            flushed_lsn: Some(mainstay_core::Lsn(1)),
            sender_host: None,
            sender_port: None,
            slot_name: None,
        }),
        ..mainstay_pg::Health::default()
    });
    node
}

/// Work the API hands to the HA loop, which alone touches PostgreSQL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Leader only: forget a member whose agent is gone for good (its slot
    /// goes now instead of after `member_slots_ttl`).
    Remove(String),
    /// Restart PostgreSQL in its current role.
    Restart,
    /// Replica only: move the data directory aside and clone afresh.
    Reinitialize,
    /// Restart this node's service NAME now, forgetting its restart
    /// history (a failed service gets another chance).
    RestartService(String),
    /// Leader only (`ctl drill`): stop PostgreSQL hard and let the lease
    /// expire without renewal, as if the host died, until another node
    /// leads.
    CrashDrill,
}

impl Command {
    /// What the command does, for "already in progress" answers.
    pub fn label(&self) -> String {
        match self {
            Command::Remove(name) => format!("removing member {name}"),
            Command::RestartService(name) => format!("restarting service {name}"),
            Command::Restart => "a restart".into(),
            Command::Reinitialize => "a reinitialization".into(),
            Command::CrashDrill => "a crash drill".into(),
        }
    }
}

/// Why the HA loop did not do a command; the API turns it into a status
/// code, so that the agent knows nothing of HTTP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommandRefusal {
    /// Not in this state: another node must do it, or something else runs.
    Conflict,
    /// Not now: the DCS or the leader cannot be reached.
    Unavailable,
    /// The named member is not known.
    NotFound,
    /// Tried, and it failed.
    Failed,
}

impl CommandRefusal {
    pub fn status(self) -> StatusCode {
        match self {
            CommandRefusal::Conflict => StatusCode::CONFLICT,
            CommandRefusal::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            CommandRefusal::NotFound => StatusCode::NOT_FOUND,
            CommandRefusal::Failed => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// The HA loop's answer: a message, or why not.
pub type CommandReply = tokio::sync::oneshot::Sender<Result<String, (CommandRefusal, String)>>;

pub struct ApiState<D> {
    pub snapshot: watch::Receiver<Arc<NodeSnapshot>>,
    pub dcs: Arc<D>,
    pub timing: mainstay_core::Timing,
    pub auth: ApiAuth,
    pub commands: tokio::sync::mpsc::Sender<(Command, CommandReply)>,
    /// Failsafe mode: the last leader that asked this node to confirm it.
    pub failsafe_contact: Arc<std::sync::Mutex<Option<(String, Instant)>>>,
    /// The proxy's counters, read live (a snapshot is up to a loop old),
    /// and the labels of its configured listeners.
    pub proxy: Option<(Arc<crate::proxy::ProxyStats>, Vec<&'static str>)>,
    /// The command handed to the HA loop and not answered yet, and since
    /// when: a second one is refused rather than queued behind it.
    pub running_command: std::sync::Mutex<Option<(String, Instant)>>,
    /// How this node checks PostgreSQL parameters (`POST /config/check`).
    pub params: ParamCheck,
    /// The CA that signed the other agents' API certificates.
    pub ca_file: Option<PathBuf>,
    /// The replicated directories (`[[replicate]]`), if any.
    pub replication: Option<Arc<mainstay_files::Replication>>,
    /// The node's own etcd member, when the agent runs one.
    pub etcd_member: Option<mainstay_etcd_member::MemberHandle>,
    /// Asks PostgreSQL on a health check's request (see `live.rs`).
    pub live: Arc<mainstay_pg::LiveProbe>,
}

impl<D: Dcs> ApiState<D> {
    /// The dynamic configuration as stored now (defaults if unreadable:
    /// only used to pre-check requests the leader checks again).
    async fn config_now(&self) -> mainstay_core::DynamicConfig {
        match tokio::time::timeout(self.timing.dcs_timeout, self.dcs.read_config()).await {
            Ok(Ok(Some(config))) => {
                mainstay_core::DynamicConfig::from_json(&config.value).unwrap_or_default()
            }
            _ => mainstay_core::DynamicConfig::default(),
        }
    }
}

pub fn unix_now() -> u64 {
    unix_secs(SystemTime::now())
}

/// `time` in Unix seconds (0 before 1970).
pub fn unix_secs(time: SystemTime) -> u64 {
    time.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl<D> ApiState<D> {
    fn node(&self) -> Arc<NodeSnapshot> {
        self.snapshot.borrow().clone()
    }
}

type Shared<D> = State<Arc<ApiState<D>>>;

pub fn router<D: Dcs + 'static>(state: Arc<ApiState<D>>) -> Router {
    let mut router = Router::new();
    for (paths, check) in [
        (
            &["/", "/primary", "/leader", "/master", "/read-write"][..],
            Check::Primary,
        ),
        (&["/replica"][..], Check::Replica),
        (&["/read-only"][..], Check::ReadOnly),
        (&["/sync", "/synchronous", "/quorum"][..], Check::Sync),
        (
            &[
                "/read-only-sync",
                "/read-only-synchronous",
                "/read-only-quorum",
            ][..],
            Check::ReadOnlySync,
        ),
        (
            &["/standby-leader", "/standby_leader"][..],
            Check::StandbyLeader,
        ),
        (&["/async", "/asynchronous"][..], Check::Async),
        (&["/health"][..], Check::Health),
        (&["/liveness"][..], Check::Liveness),
        (&["/readiness"][..], Check::Readiness),
    ] {
        let handler = move |state: Shared<D>, query: QueryResult| health_check(state, query, check);
        for path in paths {
            router = router.route(path, get(handler).options(handler));
        }
    }
    router
        .route("/patroni", get(patroni::<D>).options(patroni::<D>))
        .route("/cluster", get(cluster::<D>))
        .route("/history", get(history::<D>))
        .route(
            "/services",
            get(|State(state): Shared<D>| async move {
                axum::Json(status::services(&state.node())).into_response()
            }),
        )
        .route("/replication/files", get(files::status::<D>))
        .route("/replication/files/{index}/offer", get(files::offer::<D>))
        .route("/replication/files/{index}/file", get(files::file::<D>))
        .route(
            "/config",
            get(config::<D>)
                .patch(|State(s): Shared<D>, h: HeaderMap, b: Bytes| {
                    actions::change_config(s, h, b, false)
                })
                .put(|State(s): Shared<D>, h: HeaderMap, b: Bytes| {
                    actions::change_config(s, h, b, true)
                }),
        )
        .route("/config/check", post(param_check::check_here::<D>))
        .route(
            "/switchover",
            post(actions::switchover::<D>).delete(actions::cancel::<D>),
        )
        .route("/failover", post(actions::failover::<D>))
        .route("/failsafe", post(actions::failsafe::<D>))
        .route(
            "/services/{name}/restart",
            post(
                |s: Shared<D>,
                 h: HeaderMap,
                 path: Result<
                    axum::extract::Path<String>,
                    axum::extract::rejection::PathRejection,
                >,
                 body: Bytes| async move {
                    match path {
                        Ok(axum::extract::Path(name)) => {
                            actions::command(s, h, body, Command::RestartService(name)).await
                        }
                        Err(rejection) => error(
                            StatusCode::BAD_REQUEST,
                            format!("the service name in the path: {}", rejection.body_text()),
                        ),
                    }
                },
            ),
        )
        .route(
            "/members/{name}",
            axum::routing::delete(
                |s: Shared<D>,
                 h: HeaderMap,
                 path: Result<
                    axum::extract::Path<String>,
                    axum::extract::rejection::PathRejection,
                >| async move {
                    match path {
                        Ok(axum::extract::Path(name)) => {
                            actions::command(s, h, Bytes::new(), Command::Remove(name)).await
                        }
                        Err(rejection) => error(
                            StatusCode::BAD_REQUEST,
                            format!("the member name in the path: {}", rejection.body_text()),
                        ),
                    }
                },
            ),
        )
        .route(
            "/restart",
            post(|s: Shared<D>, h: HeaderMap, b: Bytes| {
                actions::command(s, h, b, Command::Restart)
            }),
        )
        .route(
            "/reinitialize",
            post(|s: Shared<D>, h: HeaderMap, b: Bytes| {
                actions::command(s, h, b, Command::Reinitialize)
            }),
        )
        .route(
            "/drill/crash",
            post(|s: Shared<D>, h: HeaderMap, b: Bytes| {
                actions::command(s, h, b, Command::CrashDrill)
            }),
        )
        .route(
            "/etcd/members",
            get(etcd_members::list::<ApiState<D>>).post(etcd_members::add::<ApiState<D>>),
        )
        .route(
            "/etcd/members/{name}",
            axum::routing::delete(etcd_members::remove::<ApiState<D>>),
        )
        .route("/recover-alone", post(recover_alone::recover_alone::<D>))
        .route("/metrics", get(metrics::<D>))
        .route(
            "/openapi.json",
            get(|| async { axum::Json(openapi::document()) }),
        )
        .fallback(not_found)
        .with_state(state)
}

type QueryResult =
    Result<Query<BTreeMap<String, String>>, axum::extract::rejection::QueryRejection>;

/// A JSON error with the reason: what was wrong and how to fix it.
pub fn error(status: StatusCode, reason: impl Into<String>) -> Response {
    (status, axum::Json(json!({ "error": reason.into() }))).into_response()
}

async fn not_found(uri: axum::http::Uri) -> Response {
    error(
        StatusCode::NOT_FOUND,
        format!("no endpoint {}: see /openapi.json for the list", uri.path()),
    )
}

async fn health_check<D>(State(state): Shared<D>, query: QueryResult, check: Check) -> Response {
    let query = match query {
        Ok(Query(query)) => query,
        Err(rejection) => return error(StatusCode::BAD_REQUEST, rejection.body_text()),
    };
    let filters = match Filters::parse(&query) {
        Ok(filters) => filters,
        Err(health::BadQuery(reason)) => return error(StatusCode::BAD_REQUEST, reason),
    };
    let node = match check {
        // Neither reads PostgreSQL.
        Check::Liveness | Check::StandbyLeader => state.node(),
        _ => state.node_now().await,
    };
    let code = if health::passes(check, &node, &filters) {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, axum::Json(status::node_status(&node))).into_response()
}

async fn patroni<D>(State(state): Shared<D>) -> Response {
    let node = state.node_now().await;
    axum::Json(status::node_status(&node)).into_response()
}

/// `node` with PostgreSQL as a probe at most `LiveProbe::MAX_AGE` old
/// found it.
pub(crate) async fn live_node(
    node: Arc<NodeSnapshot>,
    probe: &mainstay_pg::LiveProbe,
) -> Arc<NodeSnapshot> {
    if !node.running {
        return node;
    }
    let found = probe.now().await;
    let alive = node.postmaster_pid.is_none_or(mainstay_sys::process::alive);
    Arc::new(live::overlay(&node, &found, alive))
}

impl<D> ApiState<D> {
    async fn node_now(&self) -> Arc<NodeSnapshot> {
        live_node(self.node(), &self.live).await
    }
}

impl<D: Dcs> ApiState<D> {
    /// The node snapshot with a view read from the DCS now, so that `/cluster`
    /// shows what the members published since this agent's last turn; the
    /// snapshot's own view when the DCS does not answer in time.
    async fn fresh(&self) -> Arc<NodeSnapshot> {
        let node = self.node();
        match tokio::time::timeout(self.timing.dcs_timeout, self.dcs.read_cluster()).await {
            Ok(Ok(view)) => Arc::new(NodeSnapshot {
                view: Some(view),
                ..(*node).clone()
            }),
            _ => node,
        }
    }
}

async fn cluster<D: Dcs>(State(state): Shared<D>) -> Response {
    let node = state.fresh().await;
    match status::cluster(&node) {
        Some(body) => axum::Json(body).into_response(),
        None => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "this agent has not read the DCS yet (etcd has no quorum here, or does not answer): ask another node or retry",
        ),
    }
}

async fn history<D: Dcs>(State(state): Shared<D>) -> Response {
    let node = state.fresh().await;
    let Some(view) = &node.view else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "this agent has not read the DCS yet (etcd has no quorum here, or does not answer): ask another node or retry",
        );
    };
    axum::Json(status::history(&view.history)).into_response()
}

async fn config<D: Dcs>(State(state): Shared<D>) -> Response {
    match tokio::time::timeout(state.timing.dcs_timeout, state.dcs.read_config()).await {
        Ok(Ok(Some(config))) => {
            axum::Json(effective_config::effective(&config.value, &state.timing)).into_response()
        }
        Ok(Ok(None)) => {
            axum::Json(effective_config::effective(&json!({}), &state.timing)).into_response()
        }
        Ok(Err(err)) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("cannot read the dynamic configuration from the DCS: {err}"),
        ),
        Err(_) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "cannot read the dynamic configuration: the DCS did not answer within {:?}",
                state.timing.dcs_timeout
            ),
        ),
    }
}

async fn metrics<D>(State(state): Shared<D>) -> Response {
    let mut node = (*state.node()).clone();
    if let Some((stats, listeners)) = &state.proxy {
        node.proxy = stats.snapshot();
        node.proxy_refused = stats
            .refused()
            .into_iter()
            .filter(|(label, _)| listeners.contains(label))
            .collect();
    }
    let replication = match state.replication.clone() {
        // The status is read under the replication's lock: off the
        // runtime's threads.
        Some(r) => tokio::task::spawn_blocking(move || r.status()).await.ok(),
        None => None,
    };
    let text = metrics::render(&node, replication.as_ref());
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        text,
    )
        .into_response()
}
