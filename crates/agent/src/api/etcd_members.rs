//! `/etcd/members`: etcd's own membership (`mainstay ctl etcd-member`).
//! Reading is open like `/cluster`; adding and removing a member take the
//! API's credentials. Removing a member that still answers is refused
//! without `?force=true`: a removed member stops for good and would need
//! its data moved aside to come back.

use super::actions::{ApiAuth, accept};
use super::error;
use axum::body::Bytes;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use mainstay_dcs::{Dcs, DcsError, DcsMember};
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::Arc;

/// What these handlers need of the server they run in: an agent's API or
/// a witness's.
pub trait EtcdAccess: Send + Sync + 'static {
    type Store: Dcs;
    fn dcs(&self) -> &Self::Store;
    fn timing(&self) -> &mainstay_core::Timing;
    fn auth(&self) -> &ApiAuth;
    /// The node's own etcd member, when it runs one.
    fn local_member(&self) -> Option<&mainstay_etcd_member::MemberHandle>;
}

impl<D: Dcs> EtcdAccess for super::ApiState<D> {
    type Store = D;
    fn dcs(&self) -> &D {
        &self.dcs
    }
    fn timing(&self) -> &mainstay_core::Timing {
        &self.timing
    }
    fn auth(&self) -> &ApiAuth {
        &self.auth
    }
    fn local_member(&self) -> Option<&mainstay_etcd_member::MemberHandle> {
        self.etcd_member.as_ref()
    }
}

type Shared<S> = State<Arc<S>>;

pub async fn list<S: EtcdAccess>(State(state): Shared<S>) -> Response {
    let local = local(state.local_member());
    match members(state.dcs(), state.timing()).await {
        Ok(members) => axum::Json(json!({ "members": members, "local": local })).into_response(),
        Err(response) => response,
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewMember {
    name: String,
    peer_url: String,
}

pub async fn add<S: EtcdAccess>(
    State(state): Shared<S>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let new: NewMember = match accept(state.auth(), &headers, &body) {
        Ok(new) => new,
        Err(refusal) => return refusal.into_response(),
    };
    if let Err(why) = check_member(&new) {
        return error(StatusCode::BAD_REQUEST, why);
    }
    let before = match members(state.dcs(), state.timing()).await {
        Ok(members) => members,
        Err(response) => return response,
    };
    if let Some(same) = before
        .iter()
        .find(|m| m.name == new.name || m.peer_urls.contains(&new.peer_url))
    {
        return error(
            StatusCode::CONFLICT,
            format!(
                "etcd has a member {} at {} already: remove it first (`mainstay ctl \
                 etcd-member remove {}`) if it is the one being replaced",
                display_name(same),
                same.peer_urls.join(","),
                display_name(same)
            ),
        );
    }
    if let Some(silent) = before.iter().find(|m| m.answers != Some(true)) {
        return error(
            StatusCode::CONFLICT,
            format!(
                "member {} does not answer: adding a member while another is down lowers \
                 what the cluster survives (the new one counts in the quorum before it \
                 runs); remove or repair {} first",
                display_name(silent),
                display_name(silent)
            ),
        );
    }
    // etcd 3.4 lets a one-member cluster grow to two, which then has no
    // quorum until the new member runs: the whole cluster would stop.
    let answering = before.iter().filter(|m| m.answers == Some(true)).count();
    let members_after = before.len() + 1;
    let quorum_after = members_after / 2 + 1;
    if answering < quorum_after {
        return error(
            StatusCode::CONFLICT,
            format!(
                "with {} member(s) answering, a {}th member would leave etcd without a \
                 quorum (it needs {quorum_after}) until the new one runs, and every node \
                 would stop writing meanwhile: grow the cluster from at least two \
                 answering members",
                answering,
                before.len() + 1
            ),
        );
    }
    let after = match state.dcs().add_dcs_member(&new.peer_url).await {
        Ok(after) => after,
        // The answer was lost, not necessarily the change: look.
        Err(DcsError::Timeout | DcsError::Unreachable(_)) => {
            match members(state.dcs(), state.timing()).await {
                Ok(after) if after.iter().any(|m| m.peer_urls.contains(&new.peer_url)) => after,
                Ok(_) => {
                    return error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "etcd did not answer in time and the member is not listed: nothing changed; try again",
                    );
                }
                Err(response) => return response,
            }
        }
        Err(err) => return dcs_error(err),
    };
    let initial_cluster: BTreeMap<String, String> =
        crate::etcd_rejoin::initial_cluster(&after, &new.name, &new.peer_url)
            .into_iter()
            .collect();
    tracing::warn!(name = %new.name, peer_url = %new.peer_url, "etcd member added on request; it joins when it starts");
    axum::Json(json!({
        "members": after,
        "initial_cluster": initial_cluster,
        "initial_cluster_state": "existing",
        "next": format!(
            "on {}, set [etcd] initial_cluster to the members above and initial_cluster_state = \"existing\", \
             with an empty etcd.data_dir, then start its agent",
            new.name
        ),
    }))
    .into_response()
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RemoveQuery {
    #[serde(default)]
    force: bool,
}

pub async fn remove<S: EtcdAccess>(
    State(state): Shared<S>,
    headers: HeaderMap,
    name: Result<Path<String>, PathRejection>,
    query: Result<Query<RemoveQuery>, QueryRejection>,
) -> Response {
    if let Err(refusal) = ApiAuth::check(state.auth(), &headers) {
        return refusal.into_response();
    }
    let (Path(name), Query(query)) = match (name, query) {
        (Ok(name), Ok(query)) => (name, query),
        (Err(rejection), _) => {
            return error(StatusCode::BAD_REQUEST, rejection.body_text());
        }
        (_, Err(rejection)) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!(
                    "{}: the only parameter is force=true",
                    rejection.body_text()
                ),
            );
        }
    };
    let listed = match members(state.dcs(), state.timing()).await {
        Ok(members) => members,
        Err(response) => return response,
    };
    let Some(member) = listed.iter().find(|m| {
        m.name == name || m.id == name || (m.name.is_empty() && m.peer_urls.contains(&name))
    }) else {
        return error(
            StatusCode::NOT_FOUND,
            format!("etcd has no member {name:?}: see `mainstay ctl etcd-member list`"),
        );
    };
    if listed.len() == 1 {
        return error(
            StatusCode::CONFLICT,
            "it is the only member: removing it would leave no etcd at all",
        );
    }
    // A node whose agent still writes its member key is alive, whatever a
    // single status probe from here said.
    let agent_alive =
        match tokio::time::timeout(state.timing().dcs_timeout, state.dcs().read_cluster()).await {
            Ok(Ok(view)) => view.members.contains_key(&member.name),
            _ => false,
        };
    if agent_alive && !query.force {
        return error(
            StatusCode::CONFLICT,
            format!(
                "{name}'s agent runs (its member key is live): stop it first (a removed etcd \
                 member stops for good), or add force=true"
            ),
        );
    }
    if member.answers == Some(true) && !query.force {
        return error(
            StatusCode::CONFLICT,
            format!(
                "member {name} answers: a removed member stops for good, so remove only a \
                 member whose node is gone or being replaced (stop its agent first), or \
                 add force=true"
            ),
        );
    }
    let id = member.id.clone();
    let mut last = None;
    for _ in 0..ATTEMPTS {
        match state.dcs().remove_dcs_member(&id).await {
            Ok(()) => {
                last = None;
                break;
            }
            Err(err @ (DcsError::Timeout | DcsError::Unreachable(_))) => {
                // Lost answer or lost request: removed if no longer listed.
                if let Ok(now) = members(state.dcs(), state.timing()).await
                    && !now.iter().any(|m| m.id == id)
                {
                    last = None;
                    break;
                }
                last = Some(err);
            }
            Err(err) => return dcs_error(err),
        }
    }
    if let Some(err) = last {
        return dcs_error(err);
    }
    tracing::warn!(member = %name, forced = query.force, "etcd member removed on request");
    axum::Json(json!({ "removed": display_name(member) })).into_response()
}

/// Right after a node died, etcd may be electing a leader or this agent's
/// client may still try the dead member first: a few tries ride that out.
const ATTEMPTS: usize = 3;

pub(crate) async fn members<D: Dcs>(
    dcs: &D,
    timing: &mainstay_core::Timing,
) -> Result<Vec<DcsMember>, Response> {
    // Each member's status request is bounded by the request timeout, and
    // they run together: two timeouts are enough for the whole answer.
    let mut last = DcsError::Timeout;
    for _ in 0..ATTEMPTS {
        match tokio::time::timeout(timing.dcs_timeout * 3, dcs.dcs_members()).await {
            Ok(Ok(members)) => return Ok(members),
            Ok(Err(err @ (DcsError::Timeout | DcsError::Unreachable(_)))) => last = err,
            Ok(Err(err)) => return Err(dcs_error(err)),
            Err(_) => last = DcsError::Timeout,
        }
    }
    Err(dcs_error(last))
}

fn dcs_error(err: DcsError) -> Response {
    let status = match err {
        DcsError::Unreachable(_) | DcsError::Timeout => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::CONFLICT,
    };
    error(status, format!("etcd refused or could not be asked: {err}"))
}

fn display_name(member: &DcsMember) -> String {
    if member.name.is_empty() {
        format!("{} (not started)", member.id)
    } else {
        member.name.clone()
    }
}

fn local(reader: Option<&mainstay_etcd_member::MemberHandle>) -> Value {
    let Some(reader) = reader else {
        return Value::Null;
    };
    let status = reader.status();
    let since = status.running_since.and_then(|t| {
        t.duration_since(std::time::UNIX_EPOCH)
            .ok()
            .map(|d| d.as_secs_f64())
    });
    json!({
        "pid": status.pid,
        "running_since": since,
        "starts": status.starts,
        "last_exit": status.last_exit,
    })
}

fn check_member(new: &NewMember) -> Result<(), String> {
    if !crate::config::valid_name(&new.name) {
        return Err(format!(
            "name {:?} is not a node name: use 1-63 letters, digits, '-', '_' or '.' (the \
             new node's `name`)",
            new.name
        ));
    }
    match crate::config::member_address(&new.peer_url) {
        Some(_) => Ok(()),
        None => Err(format!(
            "peer_url {:?} is not http(s)://ADDRESS:PORT: give the new node's etcd.peer_url, \
             e.g. http://10.0.0.4:2380",
            new.peer_url
        )),
    }
}
