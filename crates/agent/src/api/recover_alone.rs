//! `POST /recover-alone` (`mainstay ctl recover-alone`): the way back when
//! this node is the only server left. Its etcd member, which lost its
//! quorum with the others, is re-formed as the only member of its cluster
//! (etcd's `--force-new-cluster`: same data, same cluster id, the others
//! removed), and the record of who forced it goes into `recoveries`. From
//! then on the node leads under the usual rules: it takes the leader key
//! once the old one's lease ran out, and in synchronous mode only if it
//! holds every acknowledged commit.
//!
//! Refused unless the request names the cluster (the typed confirmation),
//! while the cluster is paused, and while any other etcd member answers: a
//! member that answers means a server that is not gone, and two servers
//! each believing itself alone would both lead. What cannot be checked
//! from here is a server that runs but cannot be reached; the ship guide
//! says so (docs/ship-guide.md).

use super::actions::accept;
use super::serve::ClientAddress;
use super::{ApiState, error};
use axum::Extension;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use mainstay_core::RecoveryRecord;
use mainstay_dcs::{Dcs, DcsMember};
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long the re-formed member may take to lead alone and accept the
/// record.
const RECORD_WITHIN: Duration = Duration::from_secs(30);
/// Every other member is asked this many times, a second apart: one lost
/// answer on a lossy link must not make a running server look dead.
const PROBES: usize = 3;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecoverAlone {
    /// The cluster's name, typed by the operator.
    confirm: String,
    /// Who asks (user@host), for the record.
    #[serde(default)]
    by: String,
}

/// What this node knows when the request comes.
pub(crate) struct Situation<'a> {
    pub cluster: &'a str,
    pub paused: bool,
    pub runs_member: bool,
    /// This node's member follows a leader: etcd has its quorum here.
    pub has_quorum: bool,
    /// The other members as this node's member lists them, with whether
    /// each answered.
    pub others: &'a [(DcsMember, bool)],
}

/// Whether the request may go on: the status and reason if not. Pure:
/// the order of the checks is the order an operator fixes them in.
pub(crate) fn refusal(confirm: &str, s: &Situation) -> Option<(StatusCode, String)> {
    if !s.runs_member {
        return Some((
            StatusCode::CONFLICT,
            "this node does not run its own etcd member ([etcd] member = false): recover-alone \
             re-forms the node's member. An external etcd cluster that lost its quorum is \
             recovered with etcd's own procedure (etcd --force-new-cluster on its survivor)"
                .into(),
        ));
    }
    if confirm != s.cluster {
        return Some((
            StatusCode::BAD_REQUEST,
            format!(
                "the confirmation {confirm:?} is not this cluster's name: type the cluster's \
                 name, {}, exactly",
                s.cluster
            ),
        ));
    }
    if s.paused {
        return Some((
            StatusCode::CONFLICT,
            "the cluster is paused (maintenance mode): someone is working on it and no node \
             takes the lead by itself, so a recovered etcd would still leave no primary. Ask \
             whoever paused it; nothing was changed"
                .into(),
        ));
    }
    if s.has_quorum {
        return Some((
            StatusCode::CONFLICT,
            "this node's etcd member has a leader: etcd has its quorum, there is nothing to \
             recover (`mainstay ctl list` says why no node leads). Nothing was changed"
                .into(),
        ));
    }
    if s.others.is_empty() {
        return Some((
            StatusCode::CONFLICT,
            "this node's etcd member is already the only one: there is nothing to recover \
             (`mainstay ctl list` says why no node leads)"
                .into(),
        ));
    }
    let answering: Vec<String> = s
        .others
        .iter()
        .filter(|(_, answers)| *answers)
        .map(|(m, _)| format!("{} ({})", m.name, m.client_urls.join(",")))
        .collect();
    if !answering.is_empty() {
        return Some((
            StatusCode::CONFLICT,
            format!(
                "etcd member(s) {} answer: the other servers are not all gone, and a server \
                 that runs must not be cut out of the cluster (it would lead on its own \
                 too). Find out why this node has no quorum (a cable, a switch, a stopped \
                 agent); nothing was changed",
                answering.join(", ")
            ),
        ));
    }
    None
}

pub async fn recover_alone<D: Dcs>(
    State(state): State<Arc<ApiState<D>>>,
    client: Option<Extension<ClientAddress>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let request: RecoverAlone = match accept(&state.auth, &headers, &body) {
        Ok(request) => request,
        Err(refusal) => return refusal.into_response(),
    };
    let node = state.node();
    let spec = state.etcd_member.as_ref().map(|m| m.spec());
    let mut others = Vec::new();
    let mut has_quorum = false;
    let mut own_id = 0;
    if let Some(spec) = &spec
        && request.confirm == node.scope
        && !node.paused
    {
        let view = match state.dcs.dcs_view_at(&spec.client_url).await {
            Ok(view) => view,
            Err(err) => {
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "this node's etcd member ({}) does not answer ({err}): it must run to be \
                         re-formed; see the agent's log. Nothing was changed",
                        spec.client_url
                    ),
                );
            }
        };
        has_quorum = view.leader != 0;
        own_id = view.member_id;
        let listed: Vec<DcsMember> = view
            .members
            .into_iter()
            .filter(|m| m.id != format!("{:x}", view.member_id))
            .collect();
        // Polled together: the dead ones each cost one timeout a round.
        let answers = futures_util::future::join_all(listed.iter().map(|m| async {
            let Some(url) = m.client_urls.first() else {
                return false;
            };
            for probe in 0..PROBES {
                if probe > 0 {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                if state.dcs.dcs_answers_at(url).await {
                    return true;
                }
            }
            false
        }))
        .await;
        others = listed.into_iter().zip(answers).collect();
    }
    let situation = Situation {
        cluster: &node.scope,
        paused: node.paused,
        runs_member: spec.is_some(),
        has_quorum,
        others: &others,
    };
    if let Some((status, why)) = refusal(&request.confirm, &situation) {
        return error(status, why);
    }
    let removed: Vec<String> = others
        .iter()
        .map(|(m, _)| {
            if m.name.is_empty() {
                m.id.clone()
            } else {
                m.name.clone()
            }
        })
        .collect();
    let from = client.map_or_else(String::new, |Extension(ClientAddress(a))| a.to_string());
    let by = if request.by.is_empty() {
        "unknown".to_string()
    } else {
        request.by
    };
    tracing::warn!(
        %by, %from, removed = ?removed,
        "recover-alone: re-forming this node's etcd member as the only one of its cluster, \
         on request; the removed members must join again when their servers return"
    );
    let handle = state
        .etcd_member
        .clone()
        .expect("checked: the node runs its member");
    let forced = tokio::task::spawn_blocking(move || handle.force_new_cluster()).await;
    match forced {
        Ok(Ok(_)) => {}
        Ok(Err(err)) if err.kind() == std::io::ErrorKind::AlreadyExists => {
            return error(StatusCode::CONFLICT, err.to_string());
        }
        Ok(Err(err)) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("could not restart the etcd member alone: {err}; see the agent's log"),
            );
        }
        Err(err) => {
            return error(StatusCode::INTERNAL_SERVER_ERROR, format!("{err}"));
        }
    }
    let own_url = spec
        .as_ref()
        .map(|s| s.client_url.clone())
        .unwrap_or_default();
    if let Err(why) = leads_alone(&*state.dcs, &own_url, own_id).await {
        tracing::error!("recover-alone: {why}");
        return error(StatusCode::INTERNAL_SERVER_ERROR, why);
    }
    let record = RecoveryRecord {
        node: node.name.clone(),
        by,
        from,
        removed: removed.clone(),
        at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
    };
    let recorded = record_it(&*state.dcs, &record).await;
    if let Err(err) = &recorded {
        tracing::error!("recover-alone done but not recorded in the DCS: {err}");
    }
    axum::Json(json!({
        "recovered": node.name,
        "removed": removed,
        "recorded": recorded.is_ok(),
        "record_error": recorded.err(),
        "next": "this node leads once the old leader key expires (a few seconds), if the usual \
                 rules allow it (in synchronous mode, only a node that held every acknowledged \
                 commit). Servers that come back join this cluster again by themselves: start \
                 them with the network to this server connected",
    }))
    .into_response()
}

/// Waits until this node's member is the only one and leads: a forced
/// etcd that exited at once would be restarted without the flag, back in
/// the old membership.
async fn leads_alone<D: Dcs>(dcs: &D, own_url: &str, own_id: u64) -> Result<(), String> {
    let deadline = Instant::now() + RECORD_WITHIN;
    let mut last = String::from("no answer");
    while Instant::now() < deadline {
        match dcs.dcs_view_at(own_url).await {
            Ok(view) if view.members.len() == 1 && view.leader == own_id => return Ok(()),
            Ok(view) => {
                last = format!("{} member(s), leader {:x}", view.members.len(), view.leader)
            }
            Err(err) => last = err.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(format!(
        "etcd was restarted with --force-new-cluster but is not leading alone after {} s \
         ({last}): see the agent's log; run recover-alone again once etcd runs",
        RECORD_WITHIN.as_secs()
    ))
}

/// Writes the record once the re-formed member takes writes.
async fn record_it<D: Dcs>(dcs: &D, record: &RecoveryRecord) -> Result<(), String> {
    let deadline = Instant::now() + RECORD_WITHIN;
    loop {
        match dcs.append_recovery(record).await {
            Ok(()) => return Ok(()),
            Err(err) if Instant::now() >= deadline => return Err(err.to_string()),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(name: &str) -> DcsMember {
        DcsMember {
            id: format!("{name}-id"),
            name: name.into(),
            peer_urls: vec![format!("http://{name}:2380")],
            client_urls: vec![format!("http://{name}:2379")],
            leader: false,
            learner: false,
            answers: None,
        }
    }

    fn situation(others: &[(DcsMember, bool)]) -> Situation<'_> {
        Situation {
            cluster: "ship",
            paused: false,
            runs_member: true,
            has_quorum: false,
            others,
        }
    }

    #[test]
    fn goes_on_only_with_the_name_and_every_other_member_silent() {
        let others = [(member("b"), false), (member("witness"), false)];
        assert_eq!(refusal("ship", &situation(&others)), None);
    }

    #[test]
    fn each_refusal_says_what_and_why() {
        let silent = [(member("b"), false)];
        let (status, why) = refusal("shp", &situation(&silent)).unwrap();
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(why.contains("ship") && why.contains("\"shp\""), "{why}");

        let mut paused = situation(&silent);
        paused.paused = true;
        let (status, why) = refusal("ship", &paused).unwrap();
        assert_eq!(status, StatusCode::CONFLICT);
        assert!(why.contains("paused"), "{why}");

        let one_answers = [(member("b"), false), (member("witness"), true)];
        let (status, why) = refusal("ship", &situation(&one_answers)).unwrap();
        assert_eq!(status, StatusCode::CONFLICT);
        assert!(why.contains("witness (http://witness:2379)"), "{why}");
        assert!(!why.contains("b ("), "{why}");

        let (_, why) = refusal("ship", &situation(&[])).unwrap();
        assert!(why.contains("already the only one"), "{why}");

        // Every other member silent, but etcd has its quorum here (their
        // client ports blocked, say): nothing to recover.
        let mut quorum = situation(&silent);
        quorum.has_quorum = true;
        let (status, why) = refusal("ship", &quorum).unwrap();
        assert_eq!(status, StatusCode::CONFLICT);
        assert!(why.contains("has its quorum"), "{why}");

        let mut external = situation(&silent);
        external.runs_member = false;
        let (_, why) = refusal("ship", &external).unwrap();
        assert!(why.contains("member = false"), "{why}");
    }

    #[test]
    fn the_name_is_checked_before_anything_is_asked_of_etcd() {
        // A wrong name with members answering still says "wrong name": the
        // operator fixes the typing first, and nothing was probed for it.
        let answering = [(member("b"), true)];
        let (status, _) = refusal("nope", &situation(&answering)).unwrap();
        assert_eq!(status, StatusCode::BAD_REQUEST);
    }
}
