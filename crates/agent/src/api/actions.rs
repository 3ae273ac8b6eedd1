//! Unsafe endpoints: switchover, failover, configuration changes, restart,
//! reinitialize. Each one authenticates, parses the body strictly (unknown
//! fields, wrong types and malformed JSON are refused with the reason), checks
//! the request against the cluster as it is now, and only then writes to the
//! DCS with a conditional transaction; a refused request changes nothing.

use super::{ApiState, Command, Shared, error};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use mainstay_core::dynamic::{DynamicConfig, merge_patch};
use mainstay_core::poison;
use mainstay_core::switchover::{Lag, unfit_candidate};
use mainstay_core::{ClusterView, FailoverKind, FailoverRequest, PgRole};
use mainstay_dcs::Dcs;
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;

/// Who may call unsafe methods.
#[derive(Clone, Default)]
pub struct ApiAuth {
    pub basic: Option<(String, String)>,
    pub token: Option<String>,
}

impl ApiAuth {
    pub(super) fn check(&self, headers: &HeaderMap) -> Result<(), Refusal> {
        if self.basic.is_none() && self.token.is_none() {
            return Err(Refusal::new(
                StatusCode::FORBIDDEN,
                "unsafe methods are disabled: set api.username and api.password, or api.token, \
                 in the agent's configuration",
            ));
        }
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let accepted = if let Some(token) = given.strip_prefix("Bearer ") {
            self.token
                .as_deref()
                .is_some_and(|t| same(t.as_bytes(), token.trim().as_bytes()))
        } else if let Some(encoded) = given.strip_prefix("Basic ") {
            use base64::Engine;
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(encoded.trim())
                .unwrap_or_default();
            self.basic.as_ref().is_some_and(|(user, password)| {
                same(format!("{user}:{password}").as_bytes(), &decoded)
            })
        } else {
            false
        };
        if accepted {
            return Ok(());
        }
        Err(Refusal::new(
            StatusCode::UNAUTHORIZED,
            "authentication required: HTTP basic (api.username/api.password) or a bearer \
             token (api.token)",
        ))
    }

    /// A client for another agent's API with this agent's own credentials
    /// (every agent of a cluster shares them) and CA.
    pub fn peer_client(
        &self,
        url: &str,
        timeout: Duration,
        ca_file: &Option<std::path::PathBuf>,
    ) -> crate::api_client::ApiClient {
        let mut client = crate::api_client::ApiClient::new(url).with_timeout(timeout);
        if let Some(ca) = ca_file
            && let Ok(with_ca) = client.clone().with_ca_file(ca)
        {
            client = with_ca;
        }
        match (&self.basic, &self.token) {
            (_, Some(token)) => client.with_token(token),
            (Some((user, password)), None) => client.with_basic_auth(user, password),
            (None, None) => client,
        }
    }
}

/// A refused request: the status code and the reason, sent as JSON.
pub struct Refusal(StatusCode, String);

impl Refusal {
    pub(super) fn new(code: StatusCode, reason: impl Into<String>) -> Refusal {
        Refusal(code, reason.into())
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let mut response = error(self.0, self.1);
        if self.0 == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Basic realm=\"mainstay\""),
            );
        }
        response
    }
}

/// Compares secrets in time independent of where they differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn parse<T: for<'de> Deserialize<'de>>(body: &Bytes) -> Result<T, Refusal> {
    let text = if body.iter().all(u8::is_ascii_whitespace) {
        &b"{}"[..]
    } else {
        &body[..]
    };
    let refused = |e: serde_json::Error| {
        Refusal::new(
            StatusCode::BAD_REQUEST,
            format!("the request body is not what this endpoint takes: {e}"),
        )
    };
    let value: Value = serde_json::from_slice(text).map_err(refused)?;
    // serde's derived structs also take an array as positional fields:
    // `[null, null]` would be a switchover to anyone.
    if !value.is_object() {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "the request body must be a JSON object, e.g. {\"candidate\": \"node2\"} (or {})",
        ));
    }
    serde_json::from_value(value).map_err(refused)
}

/// An authenticated request with a well-formed body, or why not.
pub(super) fn accept<T: for<'de> Deserialize<'de>>(
    auth: &ApiAuth,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<T, Refusal> {
    auth.check(headers)?;
    parse(body)
}

/// The view as the DCS holds it now; refusing on a stale view would be wrong.
pub(super) async fn current_view<D: Dcs>(state: &ApiState<D>) -> Result<ClusterView, Refusal> {
    match tokio::time::timeout(state.timing.dcs_timeout, state.dcs.read_cluster()).await {
        Ok(Ok(view)) => Ok(view),
        Ok(Err(err)) => Err(Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("cannot read the DCS: {err}"),
        )),
        Err(_) => Err(Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the DCS did not answer in time",
        )),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SwitchoverBody {
    leader: Option<String>,
    candidate: Option<String>,
    /// RFC 3339 time or Unix seconds.
    scheduled_at: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FailoverBody {
    candidate: Option<String>,
    leader: Option<String>,
}

fn parse_time(value: &Value) -> Result<u64, Refusal> {
    let bad = || {
        Refusal::new(
            StatusCode::BAD_REQUEST,
            format!(
                "scheduled_at = {value} is not a time: give RFC 3339 \
                 (\"2026-12-24T03:00:00Z\") or Unix seconds"
            ),
        )
    };
    match value {
        Value::Number(n) => n.as_u64().ok_or_else(bad),
        Value::String(s) => humantime::parse_rfc3339_weak(s)
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_secs())
            .ok_or_else(bad),
        _ => Err(bad()),
    }
}

pub async fn switchover<D: Dcs>(
    State(state): Shared<D>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let body: SwitchoverBody = match accept(&state.auth, &headers, &body) {
        Ok(body) => body,
        Err(refused) => return refused.into_response(),
    };
    let scheduled_at = match body.scheduled_at.as_ref().map(parse_time).transpose() {
        Ok(at) => at,
        Err(refused) => return refused.into_response(),
    };
    let view = match current_view(&state).await {
        Ok(view) => view,
        Err(refused) => return refused.into_response(),
    };
    let Some(leader) = view.leader_name().map(str::to_string) else {
        return error(
            StatusCode::PRECONDITION_FAILED,
            "the cluster has no leader: a switchover needs one; use a failover with a candidate",
        );
    };
    match &body.leader {
        Some(named) if *named != leader => {
            return error(
                StatusCode::PRECONDITION_FAILED,
                format!("{named} is not the leader: {leader} is"),
            );
        }
        _ => {}
    }
    let config = state.config_now().await;
    if let Some(at) = scheduled_at
        && let Some(reason) =
            mainstay_core::switchover::unfit_schedule(at, super::unix_now(), &config)
    {
        return error(StatusCode::BAD_REQUEST, reason);
    }
    // A scheduled request is checked now as an immediate one is (and again
    // by the leader when it runs): a typo must not wait days to be found.
    if let Some(candidate) = &body.candidate
        && let Some(reason) = unfit_candidate(&view, &leader, Lag::Unknown, candidate, &config)
    {
        return error(StatusCode::PRECONDITION_FAILED, reason);
    }
    if body.candidate.is_none() && config.pause {
        return error(
            StatusCode::PRECONDITION_FAILED,
            "the cluster is paused: mainstay picks no candidate on its own in maintenance \
             mode; name one with candidate",
        );
    }
    if body.candidate.is_none()
        && let Err(reason) =
            mainstay_core::switchover::best_candidate(&view, &leader, Lag::Unknown, &config)
    {
        return error(StatusCode::PRECONDITION_FAILED, reason);
    }
    let request = FailoverRequest {
        kind: FailoverKind::Switchover,
        leader: Some(leader.clone()),
        candidate: body.candidate.clone(),
        scheduled_at,
        requested_at: super::unix_now(),
    };
    submit(&state, request, &leader).await
}

pub async fn failover<D: Dcs>(
    State(state): Shared<D>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let body: FailoverBody = match accept(&state.auth, &headers, &body) {
        Ok(body) => body,
        Err(refused) => return refused.into_response(),
    };
    let Some(candidate) = body.candidate else {
        return error(
            StatusCode::BAD_REQUEST,
            "a failover names its candidate: {\"candidate\": \"node\"}",
        );
    };
    let view = match current_view(&state).await {
        Ok(view) => view,
        Err(refused) => return refused.into_response(),
    };
    let leader = view.leader_name().map(str::to_string);
    if let (Some(named), Some(leader)) = (&body.leader, &leader)
        && named != leader
    {
        return error(
            StatusCode::PRECONDITION_FAILED,
            format!("{named} is not the leader: {leader} is"),
        );
    }
    let config = state.config_now().await;
    if leader.is_none()
        && let Some(reason) = mainstay_core::first_leader::candidate_behind(&view, &candidate)
    {
        return error(StatusCode::PRECONDITION_FAILED, reason);
    }
    match &leader {
        Some(leader) => {
            if let Some(reason) = unfit_candidate(&view, leader, Lag::Unknown, &candidate, &config)
            {
                return error(StatusCode::PRECONDITION_FAILED, reason);
            }
        }
        None if config.synchronous_mode
            && !mainstay_core::sync::may_take_over(&view, &candidate) =>
        {
            return error(
                StatusCode::PRECONDITION_FAILED,
                format!(
                    "synchronous mode: {candidate} may miss acknowledged commits; only {:?} \
                     hold them all",
                    mainstay_core::sync::allowed(&view)
                ),
            );
        }
        None => match view.members.get(&candidate) {
            None => {
                return error(
                    StatusCode::PRECONDITION_FAILED,
                    format!("{candidate} is not a member of the cluster"),
                );
            }
            Some(member)
                if member.status.role == PgRole::Stopped && member.status.timeline == 0 =>
            {
                return error(
                    StatusCode::PRECONDITION_FAILED,
                    format!("{candidate} has no running PostgreSQL to promote"),
                );
            }
            Some(_) => {}
        },
    }
    let request = FailoverRequest {
        kind: FailoverKind::Failover,
        leader: None,
        candidate: Some(candidate.clone()),
        scheduled_at: None,
        requested_at: super::unix_now(),
    };
    submit(&state, request, leader.as_deref().unwrap_or("")).await
}

/// Stores the request (only if none is pending) and, unless scheduled, waits
/// until it ran: the candidate leads, or the leader dropped the request.
async fn submit<D: Dcs>(state: &ApiState<D>, request: FailoverRequest, leader: &str) -> Response {
    let kind = match request.kind {
        FailoverKind::Switchover => "switchover",
        FailoverKind::Failover => "failover",
    };
    match tokio::time::timeout(
        state.timing.dcs_timeout,
        state.dcs.put_failover(&request, 0),
    )
    .await
    {
        Ok(Ok(true)) => {}
        Ok(Ok(false)) => {
            let pending = match current_view(state).await.map(|v| v.failover) {
                Ok(Some(record)) => describe_pending(&record),
                _ => "another switchover or failover".into(),
            };
            return error(
                StatusCode::CONFLICT,
                format!(
                    "{pending} is pending: wait for it, or cancel it with DELETE /switchover \
                     (`mainstay ctl cancel-switchover`)"
                ),
            );
        }
        Ok(Err(err)) => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("cannot store the {kind} request: {err}"),
            );
        }
        Err(_) => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("cannot store the {kind} request: the DCS did not answer in time"),
            );
        }
    }
    if let Some(at) = request.scheduled_at {
        return (
            StatusCode::ACCEPTED,
            axum::Json(json!({ "message": format!("{kind} scheduled at Unix time {at}") })),
        )
            .into_response();
    }
    // Bounded: a switchover waits at most a ttl for the candidate, then the
    // candidate must promote; twice the ttl plus slack covers both.
    let deadline = tokio::time::Instant::now() + state.timing.switchover_wait_limit();
    while tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let Ok(Ok(view)) =
            tokio::time::timeout(state.timing.dcs_timeout, state.dcs.read_cluster()).await
        else {
            continue;
        };
        let new_leader = view.leader_status().filter(|s| s.role == PgRole::Primary);
        if let Some(status) = new_leader
            && status.name != leader
            && request
                .candidate
                .as_deref()
                .is_none_or(|c| c == status.name)
        {
            return axum::Json(json!({
                "message": format!("{kind} done: {} is the leader", status.name),
                "leader": status.name,
                "timeline": status.timeline,
            }))
            .into_response();
        }
        if view.failover.is_none() && view.leader_name() == Some(leader) && !leader.is_empty() {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "the {kind} did not happen: the leader {leader} refused or aborted it (see its log)"
                ),
            );
        }
    }
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("the {kind} did not finish in time: see GET /cluster"),
    )
}

/// "a switchover from a to b at 2026-12-24T03:00:00Z", for refusals.
fn describe_pending(record: &mainstay_core::FailoverRecord) -> String {
    let Ok(request) = &record.request else {
        return "an unreadable switchover or failover request".into();
    };
    let mut text = match request.kind {
        FailoverKind::Switchover => "a switchover".to_string(),
        FailoverKind::Failover => "a failover".to_string(),
    };
    if let Some(leader) = &request.leader {
        text.push_str(&format!(" from {leader}"));
    }
    if let Some(candidate) = &request.candidate {
        text.push_str(&format!(" to {candidate}"));
    }
    if let Some(at) = request.scheduled_at {
        match super::status::rfc3339(at) {
            Value::String(time) => text.push_str(&format!(" scheduled at {time}")),
            _ => text.push_str(&format!(" scheduled at Unix time {at}")),
        }
    }
    text
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FailsafeBody {
    leader: String,
}

/// `POST /failsafe`: a leader that lost the DCS asks this member to confirm
/// it. Confirming also promises not to take over for a ttl; refused when
/// this node knows the DCS names another leader (then the caller must fence).
pub async fn failsafe<D: Dcs>(
    State(state): Shared<D>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let body: FailsafeBody = match accept(&state.auth, &headers, &body) {
        Ok(body) => body,
        Err(refused) => return refused.into_response(),
    };
    let node = state.node();
    if let Some(view) = node.view.as_ref().filter(|_| node.dcs_reachable)
        && let Some(other) = view.leader_name().filter(|l| *l != body.leader)
    {
        return error(
            StatusCode::CONFLICT,
            format!("the DCS names {other} as leader, not {}", body.leader),
        );
    }
    // Only the leader that wrote the failsafe list may ask: a promise to any
    // name would let a stranger hold off every election, one ttl per call.
    let listed = node
        .view
        .as_ref()
        .and_then(|v| v.failsafe.as_ref())
        .and_then(|r| r.state.as_ref().ok())
        .map(|f| f.leader.clone());
    if listed.as_deref() != Some(body.leader.as_str()) {
        return error(
            StatusCode::CONFLICT,
            format!(
                "{} is not the leader of the failsafe list this node last read ({}): \
                 nothing to confirm",
                body.leader,
                listed.as_deref().unwrap_or("no list")
            ),
        );
    }
    *poison::lock(&state.failsafe_contact) = Some((body.leader, std::time::Instant::now()));
    axum::Json(json!({ "accepted": true, "member": node.name })).into_response()
}

/// `DELETE /switchover`: cancels a pending (scheduled) request.
pub async fn cancel<D: Dcs>(State(state): Shared<D>, headers: HeaderMap) -> Response {
    if let Err(refused) = state.auth.check(&headers) {
        return refused.into_response();
    }
    let view = match current_view(&state).await {
        Ok(view) => view,
        Err(refused) => return refused.into_response(),
    };
    let Some(record) = view.failover else {
        return error(
            StatusCode::NOT_FOUND,
            "no switchover or failover is pending",
        );
    };
    match state.dcs.delete_failover(record.mod_revision).await {
        Ok(true) => axum::Json(json!({ "message": "pending request cancelled" })).into_response(),
        Ok(false) => error(
            StatusCode::CONFLICT,
            "the request changed or ran meanwhile: look at GET /cluster",
        ),
        Err(err) => error(StatusCode::SERVICE_UNAVAILABLE, err.to_string()),
    }
}

/// `PATCH /config` (JSON merge patch) and `PUT /config` (replacement).
pub async fn change_config<D: Dcs>(
    state: Arc<ApiState<D>>,
    headers: HeaderMap,
    body: Bytes,
    replace: bool,
) -> Response {
    if let Err(refused) = state.auth.check(&headers) {
        return refused.into_response();
    }
    if body.iter().all(u8::is_ascii_whitespace) {
        return error(
            StatusCode::BAD_REQUEST,
            if replace {
                "the request body is empty: PUT /config replaces the whole dynamic \
                 configuration, so send the complete document (send {} to reset every \
                 key to its default)"
            } else {
                "the request body is empty: send a JSON merge patch such as {\"pause\": true}"
            },
        );
    }
    let mut change: Value = match accept(&state.auth, &headers, &body) {
        Ok(value) => value,
        Err(refused) => return refused.into_response(),
    };
    if !change.is_object() {
        return error(
            StatusCode::BAD_REQUEST,
            "the configuration is a JSON object, e.g. {\"pause\": true}",
        );
    }
    if let Err(refused) = super::effective_config::strip_timing(&mut change, &state.timing) {
        return error(StatusCode::BAD_REQUEST, format!("refused: {refused}"));
    }
    let current =
        match tokio::time::timeout(state.timing.dcs_timeout, state.dcs.read_config()).await {
            Ok(Ok(current)) => current,
            Ok(Err(err)) => return error(StatusCode::SERVICE_UNAVAILABLE, err.to_string()),
            Err(_) => {
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the DCS did not answer in time",
                );
            }
        };
    let (base, revision) = current
        .map(|c| (c.value, c.mod_revision))
        .unwrap_or((json!({}), 0));
    let new = if replace {
        change
    } else {
        merge_patch(&base, &change)
    };
    let parsed = match DynamicConfig::from_json(&new) {
        Ok(parsed) => parsed,
        Err(problem) => return error(StatusCode::BAD_REQUEST, format!("refused: {problem}")),
    };
    let stored_parameters = DynamicConfig::from_json(&base).map(|c| c.postgresql.parameters);
    if stored_parameters.as_ref() != Ok(&parsed.postgresql.parameters)
        && let Err(refused) = super::param_check::check_everywhere(&state, &new, &parsed).await
    {
        return refused.into_response();
    }
    match state.dcs.write_config(&new, revision).await {
        Ok(true) => {
            axum::Json(super::effective_config::effective(&new, &state.timing)).into_response()
        }
        Ok(false) => error(
            StatusCode::CONFLICT,
            "the configuration changed meanwhile: read it again and retry",
        ),
        Err(err) => error(StatusCode::SERVICE_UNAVAILABLE, err.to_string()),
    }
}

/// `POST /restart` and `POST /reinitialize`: handed to this node's HA loop,
/// which runs them between turns and answers here.
pub async fn command<D: Dcs>(
    State(state): Shared<D>,
    headers: HeaderMap,
    body: Bytes,
    command: Command,
) -> Response {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Empty {}
    if let Err(refused) = accept::<Empty>(&state.auth, &headers, &body) {
        return refused.into_response();
    }
    let _running = match RunningCommand::claim(&state, &command) {
        Ok(running) => running,
        Err(refused) => return refused.into_response(),
    };
    let (reply, answer) = tokio::sync::oneshot::channel();
    if state.commands.send((command, reply)).await.is_err() {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the agent is shutting down",
        );
    }
    match tokio::time::timeout(Duration::from_secs(600), answer).await {
        Ok(Ok(Ok(message))) => axum::Json(json!({ "message": message })).into_response(),
        Ok(Ok(Err((refusal, reason)))) => error(refusal.status(), reason),
        _ => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the agent did not finish the command in time: see its log",
        ),
    }
}

/// This node's one command in flight; released when the answer is sent or
/// the client goes away (the HA loop finishes the command either way).
struct RunningCommand<'a> {
    slot: &'a std::sync::Mutex<Option<(String, std::time::Instant)>>,
}

impl<'a> RunningCommand<'a> {
    fn claim<D>(state: &'a ApiState<D>, command: &Command) -> Result<Self, Refusal> {
        let mut slot = poison::lock(&state.running_command);
        if let Some((running, since)) = slot.as_ref() {
            return Err(Refusal::new(
                StatusCode::CONFLICT,
                format!(
                    "{running} is in progress on this node (for {} s): wait for it to \
                     finish, then retry",
                    since.elapsed().as_secs()
                ),
            ));
        }
        *slot = Some((command.label(), std::time::Instant::now()));
        Ok(RunningCommand {
            slot: &state.running_command,
        })
    }
}

impl Drop for RunningCommand<'_> {
    fn drop(&mut self) {
        *poison::lock(self.slot) = None;
    }
}
