//! JSON documents with Patroni's field names where the meaning is the same,
//! so that scripts and monitoring plugins written for Patroni read them.

use super::NodeSnapshot;
use super::health::lag;
use mainstay_core::{HistoryEntry, PgRole, Tags};
use serde_json::{Map, Value, json};
use std::time::UNIX_EPOCH;

fn tags(tags: &Tags) -> Value {
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
    Value::Object(map)
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
        let role = if health.in_recovery {
            "replica"
        } else {
            "primary"
        };
        doc.insert("role".into(), json!(role));
        doc.insert("server_version".into(), json!(health.server_version_num));
        doc.insert("timeline".into(), json!(health.timeline));
        doc.insert(
            "database_system_identifier".into(),
            json!(health.system_identifier.to_string()),
        );
        if health.in_recovery {
            doc.insert(
                "xlog".into(),
                json!({
                    "received_location": health.receive_lsn.map(|l| l.0),
                    "replayed_location": health.replay_lsn.map(|l| l.0),
                    "replayed_timestamp": Value::Null,
                    "paused": false,
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
                json!({ "location": health.current_lsn.map(|l| l.0) }),
            );
            let replication: Vec<Value> = health
                .replicas
                .iter()
                .map(|r| {
                    json!({
                        "application_name": r.application_name,
                        "client_addr": r.client_addr,
                        "state": r.state,
                        "sync_state": r.sync_state,
                        "sent_location": r.sent_lsn.map(|l| l.0),
                        "flush_location": r.flush_lsn.map(|l| l.0),
                        "replay_location": r.replay_lsn.map(|l| l.0),
                    })
                })
                .collect();
            doc.insert("replication".into(), Value::Array(replication));
        }
    } else {
        doc.insert("role".into(), json!("unknown"));
    }
    if let Some(view) = &node.view
        && view.leader.is_none()
    {
        doc.insert("cluster_unlocked".into(), json!(true));
    }
    if node.paused {
        doc.insert("pause".into(), json!(true));
    }
    if !node.pending_restart.is_empty() {
        doc.insert("pending_restart".into(), json!(true));
        doc.insert("pending_restart_reason".into(), json!(node.pending_restart));
    }
    if let Some(seen) = node.dcs_last_seen {
        let secs = seen.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        doc.insert("dcs_last_seen".into(), json!(secs));
    }
    let tags = tags(&node.tags);
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
    if node.is_sync_standby() {
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
            "version": env!("CARGO_PKG_VERSION"),
            "scope": node.scope,
            "name": node.name,
        }),
    );
    doc.insert(
        "mainstay".into(),
        json!({
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
        if let Some(seen) = node.dcs_last_seen {
            let secs = seen.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
            doc["dcs_last_seen"] = json!(secs);
        }
    }
    Some(doc)
}

/// `GET /cluster` from a view: the agents' and the witness's.
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
    let members: Vec<Value> = view
        .members
        .values()
        .map(|record| {
            let m = &record.status;
            let is_leader = leader == Some(m.name.as_str());
            let role = if m.witness {
                "witness"
            } else if is_leader {
                "leader"
            } else if sync.contains(&m.name) {
                "sync_standby"
            } else {
                "replica"
            };
            let state = match m.role {
                PgRole::Stopped if m.witness => "running",
                PgRole::Stopped => "stopped",
                PgRole::Replica if m.streaming => "streaming",
                _ => "running",
            };
            let mut member = json!({
                "name": m.name,
                "role": role,
                "state": state,
                "api_url": m.api_url,
                "host": m.pg_host,
                "port": m.pg_port,
                "timeline": m.timeline,
                "tags": tags(&m.tags),
            });
            if let Some(vip) = &m.vip {
                member["vip"] = json!(vip);
            }
            if let Some(warning) = &m.warning {
                member["warning"] = json!(warning);
            }
            if !m.services.is_empty() {
                member["services"] = json!(m.services);
            }
            if !m.files.is_empty() {
                member["files"] = json!(m.files);
            }
            if !m.alerts.is_empty() {
                member["alerts"] = json!(m.alerts);
            }
            if !is_leader && m.role == PgRole::Replica {
                let lsn = m.received_lsn.max(m.replayed_lsn);
                let lag_value = leader_lsn.map_or(json!("unknown"), |l| json!(lag(l, lsn)));
                let object = member.as_object_mut().expect("a JSON object");
                object.insert("lag".into(), lag_value);
                object.insert("lsn".into(), json!(lsn.0));
                object.insert("receive_lsn".into(), json!(m.received_lsn.0));
                object.insert("replay_lsn".into(), json!(m.replayed_lsn.0));
            }
            member
        })
        .collect();
    let mut doc = json!({ "members": members, "scope": scope });
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
