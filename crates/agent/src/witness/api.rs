//! The witness's REST API: what a load balancer, a monitoring check and
//! `mainstay ctl` need of a node that runs no PostgreSQL. `/health` and
//! `/readiness` answer 200 while etcd answers here with a quorum, so a
//! check on the witness says whether the cluster still has its third vote.

use super::WitnessSnapshot;
use crate::api::etcd_members::{self, EtcdAccess};
use crate::api::{ApiAuth, error};
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use mainstay_dcs::Dcs;
use serde_json::{Value, json};
use std::sync::Arc;
use tokio::sync::watch;

pub(super) struct WitnessState<D> {
    pub name: String,
    pub scope: String,
    pub timing: mainstay_core::Timing,
    pub dcs: Arc<D>,
    pub auth: ApiAuth,
    pub member: Option<mainstay_etcd_member::MemberHandle>,
    pub snapshot: watch::Receiver<WitnessSnapshot>,
}

impl<D: Dcs> EtcdAccess for WitnessState<D> {
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
        self.member.as_ref()
    }
}

type Shared<D> = State<Arc<WitnessState<D>>>;

pub(super) fn router<D: Dcs>(state: Arc<WitnessState<D>>) -> Router {
    Router::new()
        .route(
            "/liveness",
            get(|| async { axum::Json(json!({"state": "running"})) }),
        )
        .route("/health", get(health::<D>))
        .route("/readiness", get(health::<D>))
        .route("/patroni", get(patroni::<D>))
        .route("/cluster", get(cluster::<D>))
        .route("/metrics", get(metrics::<D>))
        .route(
            "/etcd/members",
            get(etcd_members::list::<WitnessState<D>>).post(etcd_members::add::<WitnessState<D>>),
        )
        .route(
            "/etcd/members/{name}",
            axum::routing::delete(etcd_members::remove::<WitnessState<D>>),
        )
        .fallback(|uri: axum::http::Uri| async move {
            error(
                StatusCode::NOT_FOUND,
                format!(
                    "no endpoint {} on a witness: it runs no PostgreSQL; ask a data node, or \
                     use /health, /patroni, /cluster, /etcd/members, /metrics",
                    uri.path()
                ),
            )
        })
        .with_state(state)
}

/// The witness's own status, in `/patroni`'s shape where it applies.
fn status<D: Dcs>(state: &WitnessState<D>) -> (bool, Value) {
    let snapshot = state.snapshot.borrow().clone();
    let member = state.member.as_ref().map(|m| m.status());
    let member_running = member.as_ref().is_some_and(|m| m.pid.is_some());
    let healthy = snapshot.dcs_reachable && member_running;
    let mut doc = json!({
        "state": if healthy { "running" } else { "unhealthy" },
        "role": "witness",
        "dcs_reachable": snapshot.dcs_reachable,
        "patroni": {"version": env!("CARGO_PKG_VERSION"), "scope": state.scope, "name": state.name},
        "etcd_member": {
            "pid": member.as_ref().and_then(|m| m.pid),
            "starts": member.as_ref().map_or(0, |m| m.starts),
            "last_exit": member.as_ref().and_then(|m| m.last_exit.clone()),
        },
    });
    if let Some(seen) = snapshot
        .dcs_last_seen
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
    {
        doc["dcs_last_seen"] = json!(seen.as_secs());
    }
    if let Some(why) = &snapshot.dcs_error {
        doc["reason"] = json!(format!("etcd does not answer here with a quorum: {why}"));
    } else if !member_running {
        doc["reason"] = json!("this node's etcd member is not running (see the log)");
    }
    (healthy, doc)
}

async fn health<D: Dcs>(State(state): Shared<D>) -> Response {
    let (healthy, doc) = status(&state);
    let code = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, axum::Json(doc)).into_response()
}

async fn patroni<D: Dcs>(State(state): Shared<D>) -> Response {
    axum::Json(status(&state).1).into_response()
}

async fn cluster<D: Dcs>(State(state): Shared<D>) -> Response {
    let view = match tokio::time::timeout(state.timing.dcs_timeout, state.dcs.read_cluster()).await
    {
        Ok(Ok(view)) => Some(view),
        _ => state.snapshot.borrow().view.clone(),
    };
    let Some(view) = view else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "this witness has not read etcd since it started (no quorum here?): ask another node",
        );
    };
    let paused = view
        .config
        .as_ref()
        .and_then(|c| c.get("pause"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let leader_lsn = view
        .leader_status()
        .map(|s| s.flush_lsn.max(s.received_lsn));
    axum::Json(crate::api::status::cluster_of(
        &view,
        &state.scope,
        paused,
        leader_lsn,
    ))
    .into_response()
}

async fn metrics<D: Dcs>(State(state): Shared<D>) -> Response {
    let (healthy, _) = status(&state);
    let snapshot = state.snapshot.borrow().clone();
    let member = state
        .member
        .as_ref()
        .map(|m| m.status())
        .unwrap_or_default();
    let labels = format!("scope=\"{}\",name=\"{}\"", state.scope, state.name);
    let text = format!(
        "# HELP mainstay_witness_healthy 1 while etcd answers here with a quorum and this node's member runs.\n\
         # TYPE mainstay_witness_healthy gauge\n\
         mainstay_witness_healthy{{{labels}}} {}\n\
         # HELP mainstay_dcs_reachable 1 if the last read of etcd worked.\n\
         # TYPE mainstay_dcs_reachable gauge\n\
         mainstay_dcs_reachable{{{labels}}} {}\n\
         # HELP mainstay_etcd_member_starts Times this node's etcd member was started.\n\
         # TYPE mainstay_etcd_member_starts counter\n\
         mainstay_etcd_member_starts{{{labels}}} {}\n",
        u8::from(healthy),
        u8::from(snapshot.dcs_reachable),
        member.starts,
    );
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        text,
    )
        .into_response()
}
