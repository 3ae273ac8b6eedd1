//! Alerts a node raises for its operators: a replica replaying too late or
//! too far behind (judged on the leader, which sees every replica live in
//! `pg_stat_replication`), the data directory's disk running out, a
//! replicated directory's troubles (`mainstay_files::trouble`), and an etcd
//! member that does not answer (judged on the leader too: a dead witness
//! changes nothing until the next loss, which would then stop everything).
//! `evaluate` is pure: the caller gathers the probe and the disk's space
//! (`disk_space`, which `/metrics` reads too).

use crate::config::AlertThresholds;
use mainstay_pg::Health;
use mainstay_sys::fs::Space;
use serde::Serialize;

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Alert {
    /// `replication_lag`, `data_disk`, `replicated_files` or `etcd_member`.
    pub alert: &'static str,
    /// What it is about: a member's name, or this node's for its disk.
    pub subject: String,
    pub message: String,
}

/// etcd's members as the leader last asked them: how many there are, and
/// the names (or ids) of those that did not answer.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EtcdMembers {
    pub total: usize,
    pub silent: Vec<String>,
}

/// The alerts this node raises now.
pub fn evaluate(
    thresholds: &AlertThresholds,
    node: &str,
    health: Option<&Health>,
    disk: Option<Space>,
    files: Vec<mainstay_files::trouble::Trouble>,
    etcd: &EtcdMembers,
) -> Vec<Alert> {
    let mut alerts: Vec<Alert> = files
        .into_iter()
        .map(|trouble| Alert {
            alert: "replicated_files",
            subject: trouble.subject,
            message: trouble.message,
        })
        .collect();
    if let Some(primary) = health.filter(|h| !h.in_recovery) {
        let position = primary.current_lsn.or(primary.flush_lsn);
        for peer in &primary.replicas {
            let late = peer
                .replay_lag_secs
                .filter(|secs| *secs > thresholds.replication_lag.as_secs_f64());
            let behind = position
                .zip(peer.replay_lsn)
                .map(|(at, replayed)| at.0.saturating_sub(replayed.0))
                .filter(|bytes| *bytes > thresholds.replication_lag_bytes);
            let mut why = Vec::new();
            if let Some(secs) = late {
                why.push(format!(
                    "replays commits {secs:.1} s after the primary (alert above {:.1} s)",
                    thresholds.replication_lag.as_secs_f64()
                ));
            }
            if let Some(bytes) = behind {
                why.push(format!(
                    "is {} behind (alert above {})",
                    mebibytes(bytes),
                    mebibytes(thresholds.replication_lag_bytes)
                ));
            }
            if !why.is_empty() {
                alerts.push(Alert {
                    alert: "replication_lag",
                    subject: peer.application_name.clone(),
                    message: format!("{} {}", peer.application_name, why.join(" and ")),
                });
            }
        }
    }
    for silent in &etcd.silent {
        alerts.push(Alert {
            alert: "etcd_member",
            subject: silent.clone(),
            message: format!(
                "etcd member {silent} does not answer: {} of {} members do, and etcd \
                 stops if fewer than {} do",
                etcd.total - etcd.silent.len(),
                etcd.total,
                etcd.total / 2 + 1
            ),
        });
    }
    if let Some(space) = disk.filter(|s| s.total > 0) {
        let percent = space.available as f64 * 100.0 / space.total as f64;
        if space.available < thresholds.data_disk_free_bytes
            || percent < thresholds.data_disk_free_percent
        {
            alerts.push(Alert {
                alert: "data_disk",
                subject: node.to_string(),
                message: format!(
                    "{node}'s data disk has {} left ({percent:.1}%; alert below {} or {}%)",
                    mebibytes(space.available),
                    mebibytes(thresholds.data_disk_free_bytes),
                    thresholds.data_disk_free_percent
                ),
            });
        }
    }
    alerts
}

/// The space on the file system holding `path` (its nearest existing
/// ancestor's, for a data directory not made yet).
pub fn disk_space(path: &std::path::Path) -> Option<Space> {
    let existing = path.ancestors().find(|p| p.exists())?;
    mainstay_sys::fs::space(existing).ok()
}

fn mebibytes(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mainstay_core::Lsn;
    use mainstay_pg::ReplicationPeer;
    use std::time::Duration;

    const THRESHOLDS: AlertThresholds = AlertThresholds {
        replication_lag: Duration::from_secs(10),
        replication_lag_bytes: 64 << 20,
        data_disk_free_bytes: 1 << 30,
        data_disk_free_percent: 10.0,
        replicated_files_lag: Duration::from_secs(60),
    };

    fn peer(name: &str, lag_secs: Option<f64>, replay: u64) -> ReplicationPeer {
        ReplicationPeer {
            application_name: name.into(),
            client_addr: None,
            state: Some("streaming".into()),
            sent_lsn: None,
            write_lsn: None,
            flush_lsn: None,
            replay_lsn: Some(Lsn(replay)),
            sync_state: Some("async".into()),
            replay_lag_secs: lag_secs,
            usename: None,
            sync_priority: None,
        }
    }

    fn primary(replicas: Vec<ReplicationPeer>) -> Health {
        Health {
            in_recovery: false,
            current_lsn: Some(Lsn(1 << 30)),
            replicas,
            ..Health::default()
        }
    }

    #[test]
    fn a_late_or_distant_replica_raises_an_alert_on_the_leader() {
        let health = primary(vec![
            peer("node2", Some(12.5), (1 << 30) - 1024),
            peer("node3", Some(0.2), (1 << 30) - (100 << 20)),
            peer("node4", None, 1 << 30),
        ]);
        let alerts = evaluate(
            &THRESHOLDS,
            "node1",
            Some(&health),
            None,
            Vec::new(),
            &EtcdMembers::default(),
        );
        let subjects: Vec<&str> = alerts.iter().map(|a| a.subject.as_str()).collect();
        assert_eq!(subjects, ["node2", "node3"]);
        assert!(
            alerts[0].message.contains("12.5 s after the primary"),
            "{:?}",
            alerts[0]
        );
        assert!(
            alerts[1].message.contains("100.0 MiB behind"),
            "{:?}",
            alerts[1]
        );
        // A replica judges nobody's lag: the leader does.
        let replica = Health {
            in_recovery: true,
            ..health
        };
        assert!(
            evaluate(
                &THRESHOLDS,
                "node1",
                Some(&replica),
                None,
                Vec::new(),
                &EtcdMembers::default()
            )
            .is_empty()
        );
    }

    #[test]
    fn a_disk_running_out_raises_an_alert_by_size_or_share() {
        let gib = 1u64 << 30;
        let disk = |available, total| Some(Space { available, total });
        assert!(
            evaluate(
                &THRESHOLDS,
                "n",
                None,
                disk(50 * gib, 100 * gib),
                Vec::new(),
                &EtcdMembers::default()
            )
            .is_empty()
        );
        let by_share = evaluate(
            &THRESHOLDS,
            "n",
            None,
            disk(5 * gib, 100 * gib),
            Vec::new(),
            &EtcdMembers::default(),
        );
        assert_eq!(by_share[0].alert, "data_disk");
        assert!(by_share[0].message.contains("5.0%"), "{:?}", by_share[0]);
        let by_size = evaluate(
            &THRESHOLDS,
            "n",
            None,
            disk(gib / 2, 2 * gib),
            Vec::new(),
            &EtcdMembers::default(),
        );
        assert!(
            by_size[0].message.contains("512.0 MiB left"),
            "{:?}",
            by_size[0]
        );
    }

    #[test]
    fn a_silent_etcd_member_raises_an_alert_with_what_is_left() {
        let etcd = EtcdMembers {
            total: 3,
            silent: vec!["witness".into()],
        };
        let alerts = evaluate(&THRESHOLDS, "n", None, None, Vec::new(), &etcd);
        assert_eq!(alerts.len(), 1);
        assert_eq!(alerts[0].alert, "etcd_member");
        assert_eq!(alerts[0].subject, "witness");
        assert!(
            alerts[0].message.contains("2 of 3 members do")
                && alerts[0].message.contains("fewer than 2"),
            "{:?}",
            alerts[0]
        );
    }

    #[test]
    fn free_space_of_a_missing_path_is_its_parents() {
        assert!(disk_space(std::path::Path::new("/tmp/does/not/exist/yet")).is_some());
    }
}
