//! JSON documents with Patroni's field names where the meaning is the same,
//! so that scripts and monitoring plugins written for Patroni read them.

use super::NodeSnapshot;
use super::health::lag;
use mainstay_core::{HistoryEntry, Lsn, MemberStatus, PendingRestart, PgRole, TagValue, Tags};
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use std::time::UNIX_EPOCH;

/// The API version whose documents mainstay's follow. Monitoring reads
/// `patroni.version` to choose its rules (check_patroni expects a
/// replica's state to be "streaming" from 3.0.4 on); mainstay's own
/// version is `mainstay.version`.
pub const PATRONI_COMPATIBLE_VERSION: &str = "4.1.5";

/// Tags as Patroni shows them: a built-in boolean only when set, the
/// priority when not the default, custom tags always.
fn tags(tags: &Tags, custom: &BTreeMap<String, TagValue>) -> Value {
    let mut map = Map::new();
    for (name, set) in [
        ("nofailover", tags.nofailover),
        ("nosync", tags.nosync),
        ("noloadbalance", tags.noloadbalance),
    ] {
        if set {
            map.insert(name.into(), Value::Bool(true));
        }
    }
    if tags.priority != 0 {
        map.insert("priority".into(), json!(tags.priority));
    }
    for (name, value) in custom {
        map.insert(name.clone(), json!(value));
    }
    Value::Object(map)
}

/// A Unix time as Python prints a UTC `datetime`, which is what Patroni's
/// JSON carries (`2026-12-07 10:02:55.355211+00:00`).
pub(super) fn python_time(unix_secs: f64) -> Value {
    // RFC 3339 (and humantime) end with the year 9999; a server's clock
    // may say anything.
    const YEAR_10000: f64 = 253_402_300_800.0;
    if !unix_secs.is_finite() || !(0.0..YEAR_10000).contains(&unix_secs) {
        return Value::Null;
    }
    // To the microsecond, as PostgreSQL keeps it (f64 seconds are not exact).
    let micros = (unix_secs * 1e6).round() as u64;
    let time = UNIX_EPOCH + std::time::Duration::from_micros(micros);
    let text = humantime::format_rfc3339_micros(time).to_string();
    json!(text.replace('T', " ").replace('Z', "+00:00"))
}

/// Patroni's `pending_restart_reason`: each parameter with the value the
/// server runs and the one it will run after a restart.
fn pending_restart_reason(pending: &[PendingRestart]) -> Value {
    let reasons: Map<String, Value> = pending
        .iter()
        .map(|p| {
            (
                p.name.clone(),
                json!({ "old_value": p.old_value, "new_value": p.new_value }),
            )
        })
        .collect();
    Value::Object(reasons)
}

/// Patroni's `role`: what the server runs as, or when it does not run,
/// what it would run as (Patroni never says "unknown" there).
pub(super) fn patroni_role(node: &NodeSnapshot) -> &'static str {
    match node.health.as_ref().filter(|_| node.running) {
        Some(health) if !health.in_recovery => "primary",
        Some(_) => "replica",
        None if node.holds_leader => "primary",
        None => "replica",
    }
}

/// `GET /patroni` and the body of every health check.
pub fn node_status(node: &NodeSnapshot) -> Value {
    let mut doc = Map::new();
    let state = match (node.running, &node.health) {
        (true, Some(_)) => "running",
        (true, None) => "starting",
        (false, _) => "stopped",
    };
    doc.insert("state".into(), json!(state));
    if let Some(health) = node.health.as_ref().filter(|_| node.running) {
        if let Some(started) = health.postmaster_start_time {
            doc.insert("postmaster_start_time".into(), python_time(started));
        }
        doc.insert("role".into(), json!(patroni_role(node)));
        doc.insert("server_version".into(), json!(health.server_version_num));
        doc.insert("timeline".into(), json!(health.timeline));
        if health.in_recovery {
            doc.insert(
                "xlog".into(),
                json!({
                    "received_location": health.receive_lsn.or(health.replay_lsn).map(|l| l.0),
                    "replayed_location": health.replay_lsn.map(|l| l.0),
                    "replayed_timestamp": health.replay_timestamp.map(python_time),
                    "paused": health.replay_paused,
                }),
            );
            if let Some(receiver) = &health.wal_receiver {
                doc.insert("replication_state".into(), json!(receiver.status));
            }
            if let Some(delay) = health.replay_delay_secs {
                doc.insert("replay_delay_seconds".into(), json!(delay));
            }
        } else {
            doc.insert(
                "xlog".into(),
                json!({ "location": health.flush_lsn.or(health.current_lsn).map(|l| l.0) }),
            );
            let replication: Vec<Value> = health
                .replicas
                .iter()
                .map(|r| {
                    json!({
                        "usename": r.usename,
                        "application_name": r.application_name,
                        "client_addr": r.client_addr,
                        "state": r.state,
                        "sync_state": r.sync_state,
                        "sync_priority": r.sync_priority,
                        "sent_location": r.sent_lsn.map(|l| l.0),
                        "flush_location": r.flush_lsn.map(|l| l.0),
                        "replay_location": r.replay_lsn.map(|l| l.0),
                    })
                })
                .collect();
            if !replication.is_empty() {
                doc.insert("replication".into(), Value::Array(replication));
            }
        }
    } else {
        doc.insert("role".into(), json!(patroni_role(node)));
    }
    if let Some(id) = node.system_identifier {
        doc.insert("database_system_identifier".into(), json!(id.to_string()));
    }
    if node.view.as_ref().is_none_or(|view| view.leader.is_none()) {
        doc.insert("cluster_unlocked".into(), json!(true));
    }
    if node.failsafe_active {
        doc.insert("failsafe_mode_is_active".into(), json!(true));
    }
    if node.paused {
        doc.insert("pause".into(), json!(true));
    }
    if !node.pending_restart.is_empty() {
        doc.insert("pending_restart".into(), json!(true));
        doc.insert(
            "pending_restart_reason".into(),
            pending_restart_reason(&node.pending_restart),
        );
    }
    doc.insert("dcs_last_seen".into(), json!(node.dcs_last_seen_secs()));
    let tags = tags(&node.tags, &node.tags.custom);
    if tags.as_object().is_some_and(|t| !t.is_empty()) {
        doc.insert("tags".into(), tags);
    }
    if let Some(reason) = &node.watchdog_failed {
        // Patroni's key, and why.
        doc.insert("watchdog_failed".into(), json!(true));
        doc.insert("watchdog_failed_reason".into(), json!(reason));
    }
    if let Some(warning) = &node.config_warning {
        doc.insert("config_warning".into(), json!(warning));
    }
    if node.is_sync_standby() && node.is_replica() {
        doc.insert("sync_standby".into(), json!(true));
    }
    if !node.services.is_empty() {
        doc.insert("services".into(), json!(node.services));
    }
    if !node.alerts.is_empty() {
        doc.insert("alerts".into(), json!(node.alerts));
    }
    doc.insert(
        "patroni".into(),
        json!({
            "version": PATRONI_COMPATIBLE_VERSION,
            "scope": node.scope,
            "name": node.name,
        }),
    );
    doc.insert(
        "mainstay".into(),
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "leader": node.holds_leader,
            "dcs_reachable": node.dcs_reachable,
            "last_decision": node.note,
        }),
    );
    Value::Object(doc)
}

/// `GET /cluster`: every member as the DCS shows it. `None` before the
/// agent has read the DCS once.
pub fn cluster(node: &NodeSnapshot) -> Option<Value> {
    let view = node.view.as_ref()?;
    let mut doc = cluster_of(view, &node.scope, node.paused, node.leader_lsn());
    // The view is this node's last read: say when it is old.
    if !node.dcs_reachable {
        doc["dcs_reachable"] = json!(false);
        if node.dcs_last_seen.is_some() {
            doc["dcs_last_seen"] = json!(node.dcs_last_seen_secs());
        }
    }
    Some(doc)
}

/// Patroni's lag keys of a member that is not the leader: `lsn`,
/// `receive_lsn` and `replay_lsn` in PostgreSQL's text form, each with its
/// lag in bytes behind the leader's last published position, or
/// "unknown" for a member that reports no position (stopped).
fn lag_keys(member: &mut Map<String, Value>, status: &MemberStatus, leader_lsn: Option<Lsn>) {
    let (received, replayed) = match status.role {
        PgRole::Stopped => (None, None),
        PgRole::Replica => (
            Some(status.received_lsn.max(status.replayed_lsn)),
            Some(status.replayed_lsn),
        ),
        PgRole::Primary => (Some(status.flush_lsn), Some(status.flush_lsn)),
    };
    for (prefix, lsn) in [
        ("", received),
        ("receive_", received),
        ("replay_", replayed),
    ] {
        let (lsn_value, lag_value) = match (lsn.filter(|l| l.0 > 0), leader_lsn) {
            (Some(lsn), Some(leader)) => (json!(lsn.to_string()), json!(lag(leader, lsn))),
            (Some(lsn), None) => (json!(lsn.to_string()), json!("unknown")),
            (None, _) => (json!("unknown"), json!("unknown")),
        };
        member.insert(format!("{prefix}lsn"), lsn_value);
        member.insert(format!("{prefix}lag"), lag_value);
    }
}

/// `GET /cluster` from a view: the agents' and the witness's. Witnesses
/// run no PostgreSQL and Patroni has none: they are listed apart, so that
/// tools written for Patroni count database nodes only.
pub fn cluster_of(
    view: &mainstay_core::ClusterView,
    scope: &str,
    paused: bool,
    leader_lsn: Option<mainstay_core::Lsn>,
) -> Value {
    let leader = view.leader_name();
    let sync: &[String] = match (&view.sync, leader) {
        (Some(record), Some(leader)) => record.members_for(leader),
        _ => &[],
    };
    let mut members = Vec::new();
    let mut witnesses = Vec::new();
    for record in view.members.values() {
        let m = &record.status;
        if m.witness {
            witnesses.push(json!({
                "name": m.name,
                "api_url": m.api_url,
                "state": "running",
                "version": m.version,
            }));
            continue;
        }
        let is_leader = leader == Some(m.name.as_str());
        let role = if is_leader {
            "leader"
        } else if sync.contains(&m.name) {
            "sync_standby"
        } else {
            "replica"
        };
        let state = match m.role {
            PgRole::Stopped => "stopped",
            PgRole::Replica if m.streaming => "streaming",
            _ => "running",
        };
        let mut member = Map::new();
        member.insert("name".into(), json!(m.name));
        member.insert("role".into(), json!(role));
        member.insert("state".into(), json!(state));
        member.insert("api_url".into(), json!(m.api_url));
        member.insert("host".into(), json!(m.pg_host));
        member.insert("port".into(), json!(m.pg_port));
        // Patroni leaves out a timeline it does not know.
        if m.timeline > 0 {
            member.insert("timeline".into(), json!(m.timeline));
        }
        if !m.pending_restart.is_empty() {
            member.insert("pending_restart".into(), json!(true));
            member.insert(
                "pending_restart_reason".into(),
                pending_restart_reason(&m.pending_restart),
            );
        }
        member.insert("tags".into(), tags(&m.tags, &m.custom_tags));
        if !is_leader {
            lag_keys(&mut member, m, leader_lsn);
        }
        if let Some(vip) = &m.vip {
            member.insert("vip".into(), json!(vip));
        }
        if let Some(warning) = &m.warning {
            member.insert("warning".into(), json!(warning));
        }
        if !m.services.is_empty() {
            member.insert("services".into(), json!(m.services));
        }
        if !m.files.is_empty() {
            member.insert("files".into(), json!(m.files));
        }
        if !m.alerts.is_empty() {
            member.insert("alerts".into(), json!(m.alerts));
        }
        members.push(Value::Object(member));
    }
    let mut doc = json!({ "members": members, "scope": scope });
    if !witnesses.is_empty() {
        doc["witnesses"] = Value::Array(witnesses);
    }
    if paused {
        doc["pause"] = json!(true);
    }
    // mainstay's own key: who overrode the quorum, and when.
    if !view.recoveries.is_empty() {
        doc["recoveries"] = json!(view.recoveries);
    }
    if let Some(record) = &view.failover {
        doc["scheduled_switchover"] = match &record.request {
            Ok(request) => json!({
                "kind": request.kind,
                "at": request.scheduled_at.map(rfc3339),
                "from": request.leader,
                "to": request.candidate,
            }),
            Err(reason) => json!({ "unreadable": reason }),
        };
    }
    doc
}

/// A Unix time as RFC 3339, or as the bare number when it is beyond what
/// RFC 3339 can write (a request stored by hand may hold any number).
pub(super) fn rfc3339(unix_secs: u64) -> Value {
    const YEAR_10000: u64 = 253_402_300_800;
    match UNIX_EPOCH.checked_add(std::time::Duration::from_secs(unix_secs)) {
        Some(time) if unix_secs < YEAR_10000 => {
            json!(humantime::format_rfc3339_seconds(time).to_string())
        }
        _ => json!(unix_secs),
    }
}

/// `GET /history`: Patroni's rows `[timeline, lsn, reason, time, new_leader]`
/// where `timeline` is the one that ended.
pub fn history(entries: &[HistoryEntry]) -> Value {
    Value::Array(
        entries
            .iter()
            .map(|e| {
                json!([
                    e.timeline.saturating_sub(1),
                    e.switch_lsn.0,
                    e.reason,
                    e.at,
                    e.new_leader
                ])
            })
            .collect(),
    )
}

/// `GET /services`: this node's supervised services.
pub fn services(node: &NodeSnapshot) -> Value {
    json!({ "name": node.name, "services": node.services })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_read_as_python_prints_them_and_never_panic() {
        assert_eq!(
            python_time(1_796_664_389.913_436),
            json!("2026-12-07 17:26:29.913436+00:00")
        );
        for odd in [f64::NAN, -1.0, 1e300, 253_402_300_800.0] {
            assert_eq!(python_time(odd), Value::Null, "{odd}");
        }
    }
}
