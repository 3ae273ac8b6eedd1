//! The judgement against Patroni 4.1.5's own answers (testdata/: how they
//! were captured), each state as a real cluster showed it.

use super::*;
use serde_json::json;

fn doc(name: &str) -> Json {
    let text = match name {
        "cluster_healthy" => include_str!("../../testdata/patroni-4.1.5/cluster_healthy.json"),
        "cluster_paused" => include_str!("../../testdata/patroni-4.1.5/cluster_paused.json"),
        "cluster_lagging" => include_str!("../../testdata/patroni-4.1.5/cluster_lagging.json"),
        "cluster_replica_stopped" => {
            include_str!("../../testdata/patroni-4.1.5/cluster_replica_stopped.json")
        }
        "cluster_scheduled" => include_str!("../../testdata/patroni-4.1.5/cluster_scheduled.json"),
        "cluster_standby" => include_str!("../../testdata/patroni-4.1.5/cluster_standby.json"),
        "cluster_creating_replica" => {
            include_str!("../../testdata/patroni-4.1.5/cluster_creating_replica.json")
        }
        "config_bootstrap" => include_str!("../../testdata/patroni-4.1.5/config_bootstrap.json"),
        "config_edited_paused" => {
            include_str!("../../testdata/patroni-4.1.5/config_edited_paused.json")
        }
        "config_standby" => include_str!("../../testdata/patroni-4.1.5/config_standby.json"),
        "patroni_leader" => include_str!("../../testdata/patroni-4.1.5/patroni_leader.json"),
        "patroni_replica" => include_str!("../../testdata/patroni-4.1.5/patroni_replica.json"),
        "patroni_standby_leader" => {
            include_str!("../../testdata/patroni-4.1.5/patroni_standby_leader.json")
        }
        other => panic!("no document {other}"),
    };
    serde_json::from_str(text).unwrap()
}

fn judged(
    scope: &str,
    name: &str,
    patroni: &Json,
    cluster: &Json,
    config: &Json,
) -> Result<Healthy, Vec<String>> {
    judge(
        scope,
        name,
        &Answers {
            patroni,
            cluster,
            config,
        },
    )
}

fn problems(cluster: &str) -> Vec<String> {
    judged(
        "capture",
        "p1",
        &doc("patroni_leader"),
        &doc(cluster),
        &doc("config_bootstrap"),
    )
    .unwrap_err()
}

#[test]
fn a_running_leader_with_every_replica_streaming_is_taken_over() {
    let healthy = judged(
        "capture",
        "p2",
        &doc("patroni_replica"),
        &doc("cluster_healthy"),
        &doc("config_bootstrap"),
    )
    .unwrap();
    assert_eq!(
        healthy,
        Healthy {
            leader: "p1".into(),
            members: vec!["p1".into(), "p2".into(), "p3".into()],
            paused: false,
            slots: vec!["p2".into(), "p3".into()],
            replica_slots: vec![
                ("p2".into(), vec!["p1".into(), "p3".into()]),
                ("p3".into(), vec!["p1".into(), "p2".into()]),
            ],
            pending_restart: vec![],
            maximum_lag: 1_048_576,
            lagging: vec![],
            version: "4.1.5".into(),
            answered_by: "p2".into(),
        }
    );
}

#[test]
fn a_paused_cluster_is_fine_and_said_so_with_its_pending_restarts() {
    let healthy = judged(
        "capture",
        "p3",
        &doc("patroni_leader"),
        &doc("cluster_paused"),
        &doc("config_edited_paused"),
    )
    .unwrap();
    assert!(healthy.paused);
    assert_eq!(healthy.pending_restart.len(), 3);
    assert_eq!(
        healthy.pending_restart[0],
        "p1 (max_connections 120 -> 150, max_wal_senders 10 -> 12)"
    );
}

#[test]
fn a_streaming_replica_behind_by_more_than_maximum_lag_on_failover_is_only_reported() {
    let lagging = |config: &Json| {
        judged(
            "capture",
            "p1",
            &doc("patroni_leader"),
            &doc("cluster_lagging"),
            config,
        )
        .unwrap()
        .lagging
    };
    assert_eq!(lagging(&json!({})), ["p2: 5484384 bytes"]);
    // The cluster's own limit, from GET /config, decides what is reported.
    assert!(lagging(&json!({"maximum_lag_on_failover": 8_388_608})).is_empty());
}

#[test]
fn a_stopped_replica_is_refused_even_in_a_paused_cluster() {
    let refused = problems("cluster_replica_stopped");
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert!(
        refused[0].starts_with(
            "`p3`: its state is `stopped`, not `streaming`; its lag is `unknown`, not a number"
        ),
        "{refused:?}"
    );
}

#[test]
fn a_scheduled_switchover_is_refused() {
    let refused = problems("cluster_scheduled");
    assert_eq!(
        refused,
        [
            "a switchover from `p1` to `p2` is scheduled at 2027-01-01T00:00:00+00:00: let it \
             happen first, or cancel it (patronictl flush capture switchover)"
        ]
    );
}

#[test]
fn a_standby_cluster_is_refused() {
    let refused = judged(
        "capture-standby",
        "s1",
        &doc("patroni_standby_leader"),
        &doc("cluster_standby"),
        &doc("config_standby"),
    )
    .unwrap_err();
    assert_eq!(refused.len(), 2, "{refused:?}");
    assert!(
        refused[0].contains("no member holds the leader lock"),
        "{refused:?}"
    );
    assert!(
        refused[1].starts_with("`s1` is a standby_leader"),
        "{refused:?}"
    );
    // While it was still cloning: no leader, and a member not streaming.
    let refused = judged(
        "capture-standby",
        "s1",
        &doc("patroni_standby_leader"),
        &doc("cluster_creating_replica"),
        &json!({}),
    )
    .unwrap_err();
    assert_eq!(refused.len(), 2, "{refused:?}");
    assert!(refused[1].contains("`creating replica`"), "{refused:?}");
}

#[test]
fn every_problem_is_listed_not_just_the_first() {
    let refused = judged(
        "ship",
        "node1",
        &doc("patroni_leader"),
        &doc("cluster_replica_stopped"),
        &doc("config_bootstrap"),
    )
    .unwrap_err();
    assert_eq!(refused.len(), 3, "{refused:?}");
    assert!(
        refused[0].contains("serves cluster `capture`"),
        "{refused:?}"
    );
    assert!(
        refused[0].contains("the file's scope is `ship`"),
        "{refused:?}"
    );
    assert!(refused[1].starts_with("`p3`"), "{refused:?}");
    assert!(
        refused[2].starts_with(
            "`node1` (the file's `name`) is not a member of the cluster (members: p1, p2, p3)"
        ),
        "{refused:?}"
    );
    let nothing = judged("ship", "node1", &json!({}), &json!({}), &json!({})).unwrap_err();
    assert_eq!(nothing.len(), 3, "{nothing:?}");
    assert!(nothing[2].contains("(members: none)"), "{nothing:?}");
}

#[test]
fn slots_are_those_patroni_made_for_the_members_it_streams_to() {
    let mut cluster = doc("cluster_healthy");
    cluster["members"][1]["name"] = json!("Node-2.example");
    cluster["members"][2]["tags"] = json!({"nostream": true});
    let healthy = judged(
        "capture",
        "p1",
        &doc("patroni_leader"),
        &cluster,
        &doc("config_bootstrap"),
    )
    .unwrap();
    assert_eq!(healthy.slots, ["node_2_example"]);
    assert_eq!(
        healthy.replica_slots,
        [
            ("Node-2.example".to_string(), vec!["p1".to_string()]),
            (
                "p3".to_string(),
                vec!["p1".to_string(), "node_2_example".to_string()]
            ),
        ]
    );
    let ttl_zero = judged(
        "capture",
        "p1",
        &doc("patroni_leader"),
        &doc("cluster_healthy"),
        &json!({"member_slots_ttl": 0}),
    )
    .unwrap();
    assert_eq!(ttl_zero.slots, ["p2", "p3"]);
    assert!(ttl_zero.replica_slots.is_empty());
    let no_slots = judged(
        "capture",
        "p1",
        &doc("patroni_leader"),
        &doc("cluster_healthy"),
        &json!({"postgresql": {"use_slots": false}}),
    )
    .unwrap();
    assert!(no_slots.slots.is_empty());
    assert_eq!(slot_name_from_member_name("db@1"), "dbu00641");
    assert_eq!(slot_name_from_member_name("nöde"), "nu0246de");
    assert_eq!(slot_name_from_member_name(&"x".repeat(80)).len(), 63);
}
