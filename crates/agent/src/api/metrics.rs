//! Prometheus text exposition (format 0.0.4) of a node snapshot.

use super::NodeSnapshot;
use super::health::lag;
use mainstay_core::PgRole;
use std::fmt::Write;

struct Out(String);

impl Out {
    fn metric(&mut self, name: &str, kind: &str, help: &str, samples: &[(String, f64)]) {
        let _ = writeln!(self.0, "# HELP mainstay_{name} {help}");
        let _ = writeln!(self.0, "# TYPE mainstay_{name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(self.0, "mainstay_{name}{labels} {value}");
        }
    }

    fn gauge(&mut self, name: &str, help: &str, value: f64) {
        self.metric(name, "gauge", help, &[(String::new(), value)]);
    }
}

/// Label values escaped as the exposition format requires.
pub(super) fn label(name: &str, value: &str) -> String {
    let escaped = value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n");
    format!("{name}=\"{escaped}\"")
}

fn flag(b: bool) -> f64 {
    if b { 1.0 } else { 0.0 }
}

/// The node's metrics; `replication` is `GET /replication/files`'s
/// document when `[[replicate]]` directories are configured.
pub fn render(node: &NodeSnapshot, replication: Option<&serde_json::Value>) -> String {
    let mut out = Out(String::with_capacity(8192));
    super::patroni_metrics::render(&mut out.0, node);
    if let Some(status) = replication {
        replication_metrics(&mut out, status);
    }
    out.metric(
        "info",
        "gauge",
        "Agent identity.",
        &[(
            format!(
                "{{{},{},{}}}",
                label("version", env!("CARGO_PKG_VERSION")),
                label("scope", &node.scope),
                label("name", &node.name)
            ),
            1.0,
        )],
    );
    out.gauge(
        "postgres_running",
        "PostgreSQL runs and answers queries.",
        flag(node.pg_running()),
    );
    out.gauge(
        "primary",
        "PostgreSQL runs as a primary.",
        flag(node.is_primary()),
    );
    out.gauge(
        "replica",
        "PostgreSQL runs as a replica.",
        flag(node.is_replica()),
    );
    out.gauge(
        "is_leader",
        "This node holds the leader key on a confirmed lease.",
        flag(node.holds_leader),
    );
    out.gauge(
        "cluster_unlocked",
        "The cluster has no leader.",
        flag(node.view.as_ref().is_some_and(|v| v.leader.is_none())),
    );
    out.gauge(
        "pause",
        "The cluster is in maintenance mode.",
        flag(node.paused),
    );
    out.gauge(
        "pending_restart",
        "PostgreSQL parameters changed that only a restart applies.",
        flag(!node.pending_restart.is_empty()),
    );
    out.gauge(
        "dcs_reachable",
        "The last read of the DCS succeeded.",
        flag(node.dcs_reachable),
    );
    if let Some(health) = node.health.as_ref().filter(|_| node.running) {
        out.gauge(
            "timeline",
            "Timeline PostgreSQL runs on.",
            f64::from(health.timeline),
        );
        let lsn = |l: Option<mainstay_core::Lsn>| l.map_or(0.0, |l| l.0 as f64);
        if health.in_recovery {
            out.gauge(
                "wal_receive_lsn_bytes",
                "Last WAL position received and flushed by this replica.",
                lsn(health.receive_lsn),
            );
            out.gauge(
                "wal_replay_lsn_bytes",
                "Last WAL position replayed by this replica.",
                lsn(health.replay_lsn),
            );
            if let Some(delay) = health.replay_delay_secs {
                out.gauge(
                    "replication_lag_seconds_self",
                    "Seconds since the last replayed transaction committed on the primary.",
                    delay,
                );
            }
        } else {
            out.gauge(
                "wal_flush_lsn_bytes",
                "WAL position flushed by this primary.",
                lsn(health.flush_lsn),
            );
            out.gauge(
                "wal_current_lsn_bytes",
                "WAL position written by this primary.",
                lsn(health.current_lsn),
            );
        }
    }
    if let (Some(view), Some(leader_lsn)) = (&node.view, node.leader_lsn()) {
        let samples: Vec<(String, f64)> = view
            .members
            .values()
            .filter(|m| {
                m.status.role == PgRole::Replica
                    && Some(m.status.name.as_str()) != view.leader_name()
            })
            .map(|m| {
                let lsn = m.status.received_lsn.max(m.status.replayed_lsn);
                (
                    format!("{{{}}}", label("member", &m.status.name)),
                    lag(leader_lsn, lsn) as f64,
                )
            })
            .collect();
        out.metric(
            "replication_lag_bytes",
            "gauge",
            "Bytes each replica is behind the leader's last published position.",
            &samples,
        );
    }
    if let Some(health) = node.health.as_ref().filter(|h| !h.in_recovery) {
        let samples: Vec<(String, f64)> = health
            .replicas
            .iter()
            .map(|r| {
                (
                    format!("{{{}}}", label("member", &r.application_name)),
                    r.replay_lag_secs.unwrap_or(0.0),
                )
            })
            .collect();
        out.metric(
            "replication_lag_seconds",
            "gauge",
            "Seconds from commit on this primary to replay on each replica (0 when idle).",
            &samples,
        );
    }
    if let Some(view) = &node.view {
        let count = |reason: &str| view.history.iter().filter(|e| e.reason == reason).count();
        out.metric(
            "failovers_total",
            "counter",
            "Automatic failovers recorded in the cluster history.",
            &[(String::new(), count("failover") as f64)],
        );
        out.metric(
            "switchovers_total",
            "counter",
            "Planned switchovers recorded in the cluster history.",
            &[(String::new(), count("switchover") as f64)],
        );
        out.gauge(
            "members",
            "Members with a key in the DCS.",
            view.members.len() as f64,
        );
    }
    if let Some(latency) = node.lease_renew_latency {
        out.gauge(
            "lease_renew_seconds",
            "Round trip of the last confirmed lease renewal.",
            latency.as_secs_f64(),
        );
    }
    if !node.proxy.is_empty() {
        type Pick = fn(&crate::proxy::TargetCounters) -> u64;
        let series: [(&str, &str, &str, Pick); 4] = [
            (
                "proxy_connections",
                "gauge",
                "Proxy connections open, per listener (rw, ro) and target.",
                |t| t.active,
            ),
            (
                "proxy_connections_total",
                "counter",
                "Proxy connections made, per listener and target.",
                |t| t.total,
            ),
            (
                "proxy_bytes_to_server_total",
                "counter",
                "Bytes forwarded from clients, per listener and target.",
                |t| t.bytes_to_server,
            ),
            (
                "proxy_bytes_to_client_total",
                "counter",
                "Bytes forwarded to clients, per listener and target.",
                |t| t.bytes_to_client,
            ),
        ];
        for (name, kind, help, pick) in series {
            let samples: Vec<(String, f64)> = node
                .proxy
                .iter()
                .map(|t| {
                    (
                        format!(
                            "{{{},{}}}",
                            label("listener", t.listener),
                            label("target", &t.target)
                        ),
                        pick(t) as f64,
                    )
                })
                .collect();
            out.metric(name, kind, help, &samples);
        }
    }
    if let Some((address, held)) = &node.vip {
        out.metric(
            "vip_held",
            "gauge",
            "1 while this node holds the virtual IP on its interface.",
            &[(format!("{{{}}}", label("address", address)), flag(*held))],
        );
    }
    if !node.proxy_refused.is_empty() {
        let samples: Vec<(String, f64)> = node
            .proxy_refused
            .iter()
            .map(|(listener, n)| (format!("{{{}}}", label("listener", listener)), *n as f64))
            .collect();
        out.metric(
            "proxy_refused_total",
            "counter",
            "Proxy connections closed because no target came within proxy.wait_for_leader.",
            &samples,
        );
    }
    if !node.services.is_empty() {
        let per_service = |value: &dyn Fn(&mainstay_services::ServiceStatus) -> f64| {
            node.services
                .iter()
                .map(|s| {
                    (
                        format!(
                            "{{{},{}}}",
                            label("service", &s.name),
                            label("placement", s.placement)
                        ),
                        value(s),
                    )
                })
                .collect::<Vec<_>>()
        };
        out.metric(
            "service_up",
            "gauge",
            "1 while the service runs and passes its checks on this node.",
            &per_service(&|s| flag(s.up())),
        );
        out.metric(
            "service_restarts_total",
            "counter",
            "Restarts of the service after it exited or failed its checks.",
            &per_service(&|s| s.restarts as f64),
        );
        out.metric(
            "service_check_failures_total",
            "counter",
            "Health checks of the service that failed.",
            &per_service(&|s| s.check_failures as f64),
        );
    }
    out.metric(
        "alert",
        "gauge",
        "1 for each alert this node raises now ([alerts]: a replica's lag, the data disk, a replicated directory).",
        &node
            .alerts
            .iter()
            .map(|a| {
                (
                    format!(
                        "{{{},{}}}",
                        label("alert", a.alert),
                        label("subject", &a.subject)
                    ),
                    1.0,
                )
            })
            .collect::<Vec<_>>(),
    );
    out.gauge(
        "loop_duration_seconds",
        "Duration of the last HA loop turn.",
        node.turn_duration.as_secs_f64(),
    );
    if let Some(free) = crate::alerts::disk_space(&node.data_dir).map(|s| s.available) {
        out.gauge(
            "data_dir_free_bytes",
            "Free space for unprivileged users on the data directory's file system.",
            free as f64,
        );
    }
    out.0
}

/// Per replicated directory: on the source, how far behind each receiver
/// is; on a receiver, what it received, moved aside and failed to apply.
fn replication_metrics(out: &mut Out, status: &serde_json::Value) {
    let empty = Vec::new();
    let dirs = status["directories"].as_array().unwrap_or(&empty);
    let directory = |d: &serde_json::Value| label("directory", d["path"].as_str().unwrap_or(""));
    let mut source = Vec::new();
    let mut behind: [Vec<(String, f64)>; 3] = Default::default();
    let mut received: [Vec<(String, f64)>; 4] = Default::default();
    for d in dirs {
        source.push((format!("{{{}}}", directory(d)), flag(d["role"] == "source")));
        for r in d["receivers"].as_array().unwrap_or(&empty) {
            let labels = format!(
                "{{{},{}}}",
                directory(d),
                label("receiver", r["receiver"].as_str().unwrap_or(""))
            );
            for (samples, key) in
                behind
                    .iter_mut()
                    .zip(["files_behind", "bytes_behind", "seconds_behind"])
            {
                samples.push((labels.clone(), r[key].as_f64().unwrap_or(0.0)));
            }
        }
        if d["role"] == "receiver" {
            let labels = format!("{{{}}}", directory(d));
            let failed = d["failed"].as_array().map_or(0, Vec::len) as f64;
            let values = [
                d["files_received"].as_f64().unwrap_or(0.0),
                d["bytes_received"].as_f64().unwrap_or(0.0),
                d["moved_aside_files"].as_f64().unwrap_or(0.0),
                failed,
            ];
            for (samples, value) in received.iter_mut().zip(values) {
                samples.push((labels.clone(), value));
            }
        }
    }
    out.metric(
        "replicated_source",
        "gauge",
        "1 while this node is the source of the replicated directory (it leads).",
        &source,
    );
    let [files, bytes, seconds] = behind;
    out.metric(
        "replicated_files_behind",
        "gauge",
        "Entries changed or deleted on the source that the receiver has not applied.",
        &files,
    );
    out.metric(
        "replicated_bytes_behind",
        "gauge",
        "Bytes of the changed files the receiver has not applied.",
        &bytes,
    );
    out.metric(
        "replicated_seconds_behind",
        "gauge",
        "Age of the oldest change the receiver has not applied (0 when none).",
        &seconds,
    );
    let [files, bytes, aside, failed] = received;
    out.metric(
        "replicated_received_files_total",
        "counter",
        "Files this receiver wrote from the source since the agent started.",
        &files,
    );
    out.metric(
        "replicated_received_bytes_total",
        "counter",
        "Bytes this receiver wrote from the source since the agent started.",
        &bytes,
    );
    out.metric(
        "replicated_moved_aside_files_total",
        "counter",
        "Files this receiver moved aside (only it had them) since the agent started.",
        &aside,
    );
    out.metric(
        "replicated_failed_files",
        "gauge",
        "Files the last round could not apply (retried next round).",
        &failed,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("member", "a\"b\\c\nd"), "member=\"a\\\"b\\\\c\\nd\"");
    }
}
