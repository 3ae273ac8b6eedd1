//! Patroni's metric families (`patroni_*`, labels `scope` and `name`) with
//! Patroni's meanings, beside mainstay's own, so that alerts and
//! dashboards written for Patroni find their series: the 23 families
//! Patroni 4.1.5 serves, in its order, with its types and help texts.

use super::NodeSnapshot;
use super::status::{PATRONI_COMPATIBLE_VERSION, patroni_role};
use std::fmt::Write;

/// Patroni's `PostgresqlState` numbers (`patroni_postgres_state`); they
/// never change, as Patroni promises for its dashboards.
const STATE_RUNNING: i32 = 5;
const STATE_STARTING: i32 = 6;
const STATE_STOPPED: i32 = 12;
const POSTGRES_STATES: &str = "0=initdb, 1=initdb_failed, 2=custom_bootstrap, \
    3=custom_bootstrap_failed, 4=creating_replica, 5=running, 6=starting, \
    7=bootstrap_starting, 8=start_failed, 9=restarting, 10=restart_failed, 11=stopping, \
    12=stopped, 13=stop_failed, 14=crashed";

/// `4.1.5` → `040105`, as Patroni pads its version.
fn padded(version: &str) -> String {
    version
        .split('.')
        .map(|part| format!("{part:0>2}"))
        .collect()
}

fn flag(on: bool) -> String {
    u8::from(on).to_string()
}

/// Appends Patroni's families to `out`.
pub fn render(out: &mut String, node: &NodeSnapshot) {
    let labels = format!(
        "{{{},{}}}",
        super::metrics::label("scope", &node.scope),
        super::metrics::label("name", &node.name)
    );
    let mut family = |name: &str, kind: &str, help: &str, value: String| {
        let _ = writeln!(out, "# HELP patroni_{name} {help}");
        if name == "postgres_state" {
            let _ = writeln!(out, "# Values: {POSTGRES_STATES}");
        }
        let _ = writeln!(out, "# TYPE patroni_{name} {kind}");
        let _ = writeln!(out, "patroni_{name}{labels} {value}");
    };
    let health = node.health.as_ref().filter(|_| node.pg_running());
    let role = patroni_role(node);
    let replica = health.filter(|h| h.in_recovery);
    let primary = health.filter(|h| !h.in_recovery);
    let lsn = |l: Option<mainstay_core::Lsn>| l.map_or(0, |l| l.0).to_string();
    let seconds = |s: Option<f64>| s.map_or_else(|| "0".to_string(), |s| s.to_string());
    family(
        "version",
        "gauge",
        "Patroni semver without periods.",
        padded(PATRONI_COMPATIBLE_VERSION),
    );
    family(
        "postgres_running",
        "gauge",
        "Value is 1 if Postgres is running, 0 otherwise.",
        flag(health.is_some()),
    );
    family(
        "postmaster_start_time",
        "gauge",
        "Epoch seconds since Postgres started.",
        seconds(health.and_then(|h| h.postmaster_start_time)),
    );
    family(
        "primary",
        "gauge",
        "Value is 1 if this node is the leader, 0 otherwise.",
        flag(role == "primary"),
    );
    family(
        "xlog_location",
        "counter",
        "Current location of the Postgres transaction log, 0 if this node is not the leader.",
        lsn(primary.and_then(|h| h.flush_lsn.or(h.current_lsn))),
    );
    family(
        "standby_leader",
        "gauge",
        "Value is 1 if this node is the standby_leader, 0 otherwise.",
        flag(false),
    );
    family(
        "replica",
        "gauge",
        "Value is 1 if this node is a replica, 0 otherwise.",
        flag(role == "replica"),
    );
    family(
        "sync_standby",
        "gauge",
        "Value is 1 if this node is a sync standby, 0 otherwise.",
        flag(replica.is_some() && node.is_sync_standby()),
    );
    family(
        "quorum_standby",
        "gauge",
        "Value is 1 if this node is a quorum standby, 0 otherwise.",
        flag(false),
    );
    family(
        "xlog_received_location",
        "counter",
        "Current location of the received Postgres transaction log, 0 if this node is not a replica.",
        lsn(replica.and_then(|h| h.receive_lsn.or(h.replay_lsn))),
    );
    family(
        "xlog_replayed_location",
        "counter",
        "Current location of the replayed Postgres transaction log, 0 if this node is not a replica.",
        lsn(replica.and_then(|h| h.replay_lsn)),
    );
    family(
        "xlog_replayed_timestamp",
        "gauge",
        "Current timestamp of the replayed Postgres transaction log, 0 if null.",
        seconds(replica.and_then(|h| h.replay_timestamp)),
    );
    family(
        "xlog_paused",
        "gauge",
        "Value is 1 if the Postgres xlog is paused, 0 otherwise.",
        flag(replica.is_some_and(|h| h.replay_paused)),
    );
    // Patroni serves these two only with a server version, which a
    // server that does not run has not.
    if health.is_some() {
        family(
            "postgres_streaming",
            "gauge",
            "Value is 1 if Postgres is streaming, 0 otherwise.",
            flag(replica.is_some_and(|h| h.is_streaming())),
        );
        // mainstay replicas stream; they never restore from an archive.
        family(
            "postgres_in_archive_recovery",
            "gauge",
            "Value is 1 if Postgres is replicating from archive, 0 otherwise.",
            flag(false),
        );
    }
    family(
        "postgres_server_version",
        "gauge",
        "Version of Postgres (if running), 0 otherwise.",
        health.map_or(0, |h| h.server_version_num).to_string(),
    );
    family(
        "cluster_unlocked",
        "gauge",
        "Value is 1 if the cluster is unlocked, 0 if locked.",
        flag(node.view.as_ref().is_none_or(|v| v.leader.is_none())),
    );
    family(
        "failsafe_mode_is_active",
        "gauge",
        "Value is 1 if failsafe mode is active, 0 if inactive.",
        flag(node.failsafe_active),
    );
    family(
        "postgres_timeline",
        "gauge",
        "Postgres timeline of this node (if running), 0 otherwise.",
        health.map_or(0, |h| h.timeline).to_string(),
    );
    family(
        "dcs_last_seen",
        "gauge",
        "Epoch timestamp when DCS was last contacted successfully by Patroni.",
        node.dcs_last_seen_secs().to_string(),
    );
    family(
        "pending_restart",
        "gauge",
        "Value is 1 if the node needs a restart, 0 otherwise.",
        flag(!node.pending_restart.is_empty()),
    );
    family(
        "is_paused",
        "gauge",
        "Value is 1 if auto failover is disabled, 0 otherwise.",
        flag(node.paused),
    );
    let state = match (node.running, health) {
        (true, Some(_)) => STATE_RUNNING,
        (true, None) => STATE_STARTING,
        (false, _) => STATE_STOPPED,
    };
    family(
        "postgres_state",
        "gauge",
        "Numeric representation of Postgres state.",
        state.to_string(),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_version_is_padded_as_patroni_pads_it() {
        assert_eq!(padded("4.1.5"), "040105");
        assert_eq!(padded("3.0.12"), "030012");
    }

    #[test]
    fn a_stopped_node_reports_every_family_with_zeros() {
        let node = NodeSnapshot::new(
            "n1",
            "c",
            "",
            &Default::default(),
            mainstay_core::Timing::DEFAULT,
        );
        let mut out = String::new();
        render(&mut out, &node);
        let samples: Vec<&str> = out.lines().filter(|l| !l.starts_with('#')).collect();
        // Patroni's 23 families less the two a stopped server leaves out.
        assert_eq!(samples.len(), 21, "{out}");
        assert!(out.contains("patroni_version{scope=\"c\",name=\"n1\"} 040105"));
        assert!(out.contains("patroni_postgres_running{scope=\"c\",name=\"n1\"} 0"));
        // Patroni's stopped node is a replica that does not run.
        assert!(out.contains("patroni_replica{scope=\"c\",name=\"n1\"} 1"));
        assert!(out.contains("patroni_cluster_unlocked{scope=\"c\",name=\"n1\"} 1"));
        assert!(out.contains("patroni_postgres_state{scope=\"c\",name=\"n1\"} 12"));
        assert!(!out.contains("patroni_postgres_streaming"));
    }
}
