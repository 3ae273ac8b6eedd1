//! One observation in, the exact actions out.
use super::*;
use crate::dynamic::DynamicConfig;
use crate::types::{InitializeRecord, LeaderRecord, MemberRecord, Tags};

const SETTINGS: Settings = Settings {
    ttl_ms: 4000,
    loop_wait_ms: 1000,
    election_wait_ms: 2000,
    stuck_replica_ms: 30_000,
};

fn status(
    name: &str,
    role: PgRole,
    lsn: u64,
    view_revision: i64,
    view_had_leader: bool,
) -> MemberRecord {
    let mut record = MemberRecord::example(name, role, lsn, None);
    record.status.streaming = true;
    record.status.view_revision = view_revision;
    record.status.view_had_leader = view_had_leader;
    record.mod_revision = view_revision + 1;
    record.lease_id = 0;
    record
}

fn view(leader: Option<(&str, i64)>, members: Vec<MemberRecord>) -> ClusterView {
    ClusterView {
        revision: 100,
        initialize: Some(InitializeRecord {
            system_id: Some("42".into()),
            by: "a".into(),
            at: String::new(),
            awaiting_first_leader: false,
        }),
        initialize_revision: 1,
        leader: leader.map(|(name, lease_id)| LeaderRecord {
            name: name.into(),
            lease_id,
            mod_revision: 10,
        }),
        members: members
            .into_iter()
            .map(|m| (m.status.name.clone(), m))
            .collect(),
        ..ClusterView::default()
    }
}

fn pg(role: PgRole, lsn: u64) -> LocalPg {
    LocalPg {
        data: DataDir::Initialized {
            system_id: "42".into(),
            was_primary: role == PgRole::Primary,
            timeline: 1,
        },
        role,
        timeline: 1,
        lsn: Lsn(lsn),
        following: None,
        streaming: false,
        sync_standby_names: String::new(),
        standbys: Vec::new(),
    }
}

fn check(
    state: &mut CoreState,
    now: u64,
    pg: &LocalPg,
    cluster: Option<&ClusterView>,
    valid_until: u64,
) -> Vec<Action> {
    check_with(
        state,
        now,
        pg,
        cluster,
        valid_until,
        &DynamicConfig::default(),
    )
}

fn check_with(
    state: &mut CoreState,
    now: u64,
    pg: &LocalPg,
    cluster: Option<&ClusterView>,
    valid_until: u64,
    config: &DynamicConfig,
) -> Vec<Action> {
    let tags = Tags::default();
    let obs = Observation {
        now: Millis(now),
        name: "a",
        tags: &tags,
        settings: &SETTINGS,
        pg,
        cluster,
        lease: Lease {
            id: Some(7),
            valid_until: Millis(valid_until),
            members_confirmed: false,
        },
        config,
        wall_secs: 0,
        failsafe_contact: None,
    };
    decide(state, &obs).actions
}

fn is_fence(actions: &[Action]) -> bool {
    matches!(actions, [Action::Fence { .. }])
}

#[test]
fn in_failsafe_mode_a_confirmed_primary_takes_back_an_expired_leader_key() {
    let primary = pg(PgRole::Primary, 100);
    let leaderless = view(None, vec![]);
    // etcd back but not yet done revoking the expired lease: the key
    // still names this node on it (lease 7; the agent holds 8 now).
    let stale = view(Some(("a", 7)), vec![]);
    let decide_with = |cluster: &ClusterView, confirmed: bool, now: u64| {
        let tags = Tags::default();
        let config = DynamicConfig {
            failsafe_mode: true,
            ..DynamicConfig::default()
        };
        let obs = Observation {
            now: Millis(now),
            name: "a",
            tags: &tags,
            settings: &SETTINGS,
            pg: &primary,
            cluster: Some(cluster),
            lease: Lease {
                id: Some(8),
                valid_until: Millis(3000),
                members_confirmed: confirmed,
            },
            config: &config,
            wall_secs: 0,
            failsafe_contact: None,
        };
        decide(&mut CoreState::default(), &obs).actions
    };
    assert_eq!(
        decide_with(&leaderless, true, 2000),
        vec![Action::AcquireLeader]
    );
    assert_eq!(
        decide_with(&stale, true, 2000),
        vec![
            Action::ReleaseStaleLeader { lease_id: 7 },
            Action::AcquireLeader
        ]
    );
    // Past the confirmed deadline, or a deadline etcd's renewal gave
    // (a key deleted by hand: the replicas race for it): stop writing.
    for cluster in [&leaderless, &stale] {
        assert!(is_fence(&decide_with(cluster, true, 3000)));
        assert!(is_fence(&decide_with(cluster, false, 2000)));
    }
}

#[test]
fn a_leader_fences_at_its_lease_deadline_even_without_the_dcs() {
    let primary = pg(PgRole::Primary, 100);
    let v = view(Some(("a", 7)), vec![]);
    let mut state = CoreState::default();
    assert!(matches!(
        check(&mut state, 2999, &primary, Some(&v), 3000)[..],
        [Action::SyncSlots { .. }]
    ));
    assert!(is_fence(&check(&mut state, 3000, &primary, Some(&v), 3000)));
    assert!(check(&mut state, 2999, &primary, None, 3000).is_empty());
    assert!(is_fence(&check(&mut state, 3000, &primary, None, 3000)));
}

#[test]
fn a_writable_primary_always_asks_to_wake_at_its_deadline() {
    let primary = pg(PgRole::Primary, 100);
    let v = view(Some(("a", 7)), vec![]);
    let tags = Tags::default();
    let obs = Observation {
        now: Millis(10),
        name: "a",
        tags: &tags,
        settings: &SETTINGS,
        pg: &primary,
        cluster: Some(&v),
        lease: Lease {
            id: Some(7),
            valid_until: Millis(2500),
            members_confirmed: false,
        },
        config: &DynamicConfig::default(),
        wall_secs: 0,
        failsafe_contact: None,
    };
    assert_eq!(
        decide(&mut CoreState::default(), &obs).wake_at,
        Some(Millis(2500))
    );
}

#[test]
fn a_primary_that_sees_another_leader_or_none_fences() {
    let primary = pg(PgRole::Primary, 100);
    assert!(is_fence(&check(
        &mut CoreState::default(),
        0,
        &primary,
        Some(&view(Some(("b", 9)), vec![])),
        5000
    )));
    assert!(is_fence(&check(
        &mut CoreState::default(),
        0,
        &primary,
        Some(&view(None, vec![])),
        5000
    )));
    // Its own name on an older lease is not leadership either.
    assert!(is_fence(&check(
        &mut CoreState::default(),
        0,
        &primary,
        Some(&view(Some(("a", 3)), vec![])),
        5000
    )));
}

#[test]
fn the_most_advanced_replica_takes_over_and_promotes() {
    let replica = pg(PgRole::Replica, 500);
    let mut state = CoreState::default();
    // Saw the leader first, then it vanished.
    check(
        &mut state,
        0,
        &replica,
        Some(&view(Some(("c", 1)), vec![])),
        5000,
    );
    let behind = status("b", PgRole::Replica, 400, 50, false);
    assert_eq!(
        check(
            &mut state,
            10,
            &replica,
            Some(&view(None, vec![behind])),
            5000
        ),
        vec![Action::AcquireLeader]
    );
    let ahead = status("b", PgRole::Replica, 600, 50, false);
    assert!(
        check(
            &mut state,
            20,
            &replica,
            Some(&view(None, vec![ahead])),
            5000
        )
        .is_empty()
    );
    assert_eq!(
        check(
            &mut state,
            30,
            &replica,
            Some(&view(Some(("a", 7)), vec![])),
            5000
        ),
        vec![Action::Promote {
            reason: "failover".into()
        }]
    );
}

#[test]
fn only_a_due_request_for_this_node_makes_a_promotion_a_switchover() {
    let reason = |candidate: Option<&str>, scheduled_at: Option<u64>| {
        let view = ClusterView {
            failover: Some(crate::types::FailoverRecord {
                request: Ok(crate::types::FailoverRequest {
                    kind: crate::types::FailoverKind::Switchover,
                    leader: Some("a".into()),
                    candidate: candidate.map(str::to_string),
                    scheduled_at,
                    requested_at: 0,
                }),
                mod_revision: 1,
            }),
            ..ClusterView::default()
        };
        match promote(&view, "b", 1000) {
            Action::Promote { reason } => reason,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(reason(Some("b"), None), "switchover");
    assert_eq!(reason(None, Some(1000)), "switchover");
    // The leader died while a switchover waited for its time, or while
    // one named another member: this promotion is a failover.
    assert_eq!(reason(Some("b"), Some(5000)), "failover");
    assert_eq!(reason(Some("c"), None), "failover");
    assert_eq!(
        promote(&ClusterView::default(), "b", 1000),
        Action::Promote {
            reason: "failover".into()
        }
    );
}

#[test]
fn a_candidate_waits_for_final_statuses_but_not_forever() {
    let replica = pg(PgRole::Replica, 500);
    let mut state = CoreState::default();
    check(
        &mut state,
        0,
        &replica,
        Some(&view(Some(("c", 1)), vec![])),
        9000,
    );
    // b's status was read while the leader was still there.
    let stale = status("b", PgRole::Replica, 100, 5, true);
    assert!(
        check(
            &mut state,
            100,
            &replica,
            Some(&view(None, vec![stale.clone()])),
            9000
        )
        .is_empty()
    );
    assert!(
        check(
            &mut state,
            2000,
            &replica,
            Some(&view(None, vec![stale.clone()])),
            9000
        )
        .is_empty()
    );
    assert_eq!(
        check(
            &mut state,
            2100,
            &replica,
            Some(&view(None, vec![stale])),
            9000
        ),
        vec![Action::AcquireLeader]
    );
}

#[test]
fn no_candidate_acts_without_a_confirmed_lease() {
    let replica = pg(PgRole::Replica, 500);
    let mut state = CoreState::default();
    assert!(check(&mut state, 5000, &replica, Some(&view(None, vec![])), 5000).is_empty());
}

#[test]
fn a_replica_is_re_pointed_to_a_new_leader_once_it_runs() {
    let replica = pg(PgRole::Replica, 500);
    let not_yet = status("b", PgRole::Replica, 500, 50, true);
    assert!(
        check(
            &mut CoreState::default(),
            0,
            &replica,
            Some(&view(Some(("b", 2)), vec![not_yet])),
            0
        )
        .is_empty()
    );
    let running = status("b", PgRole::Primary, 500, 50, true);
    assert_eq!(
        check(
            &mut CoreState::default(),
            0,
            &replica,
            Some(&view(Some(("b", 2)), vec![running])),
            0
        ),
        vec![Action::Follow { leader: "b".into() }]
    );
}

#[test]
fn a_crashed_primary_is_restarted_once_then_leadership_is_released() {
    let stopped = pg(PgRole::Stopped, 0);
    let v = view(Some(("a", 7)), vec![]);
    let mut state = CoreState::default();
    assert_eq!(
        check(&mut state, 0, &stopped, Some(&v), 3000),
        vec![Action::StartPrimary]
    );
    assert!(matches!(
        check(&mut state, 10, &stopped, Some(&v), 3000)[..],
        [Action::ReleaseLeader { .. }]
    ));
}

#[test]
fn foreign_data_stops_the_agent_and_wiped_dcs_is_re_registered() {
    let mut foreign = pg(PgRole::Stopped, 0);
    foreign.data = DataDir::Initialized {
        system_id: "999".into(),
        was_primary: false,
        timeline: 1,
    };
    assert!(matches!(
        check(
            &mut CoreState::default(),
            0,
            &foreign,
            Some(&view(None, vec![])),
            0
        )[..],
        [Action::Fatal { .. }]
    ));
    let mut wiped = view(None, vec![]);
    wiped.initialize = None;
    assert_eq!(
        check(
            &mut CoreState::default(),
            0,
            &pg(PgRole::Stopped, 0),
            Some(&wiped),
            0
        ),
        vec![Action::RegisterExistingData {
            system_id: "42".into()
        }]
    );
}

#[test]
fn a_failed_bootstrap_is_claimed_again_only_after_a_growing_wait() {
    let mut empty = pg(PgRole::Stopped, 0);
    empty.data = DataDir::Empty;
    let mut new_cluster = view(None, vec![status("a", PgRole::Stopped, 0, 1, false)]);
    new_cluster.initialize = None;
    let mut state = CoreState::default();
    let claim = vec![Action::ClaimInitialize];
    assert_eq!(check(&mut state, 0, &empty, Some(&new_cluster), 0), claim);
    assert_eq!(state.bootstrap_failed(Millis(1000)), BOOTSTRAP_RETRY_FIRST);
    assert!(check(&mut state, 5999, &empty, Some(&new_cluster), 0).is_empty());
    assert_eq!(
        check(&mut state, 6000, &empty, Some(&new_cluster), 0),
        claim
    );
    assert_eq!(
        state.bootstrap_failed(Millis(7000)),
        BOOTSTRAP_RETRY_FIRST * 2
    );
    assert!(check(&mut state, 16_999, &empty, Some(&new_cluster), 0).is_empty());
    for _ in 0..20 {
        assert!(state.bootstrap_failed(Millis(7000)) <= BOOTSTRAP_RETRY_MAX);
    }
    assert_eq!(state.bootstrap_failed(Millis(7000)), BOOTSTRAP_RETRY_MAX);
    // Once some node bootstrapped the cluster, the count starts over.
    check(
        &mut state,
        8000,
        &empty,
        Some(&view(Some(("b", 9)), vec![])),
        0,
    );
    assert_eq!(state.bootstrap_failed(Millis(9000)), BOOTSTRAP_RETRY_FIRST);
}

#[test]
fn a_member_seen_as_a_replica_keeps_its_slot_once_this_node_leads() {
    let mut state = CoreState::default();
    // As a replica of "x", this node sees member "b" ...
    let before = view(
        Some(("x", 9)),
        vec![status("b", PgRole::Replica, 400, 50, true)],
    );
    check(&mut state, 0, &pg(PgRole::Replica, 400), Some(&before), 0);
    // ... which is killed; its key expires before this node leads.
    let now_leading = view(Some(("a", 7)), vec![]);
    let actions = check(
        &mut state,
        5000,
        &pg(PgRole::Primary, 500),
        Some(&now_leading),
        8000,
    );
    assert!(
        matches!(&actions[..], [Action::SyncSlots { members }] if members == &["b"]),
        "{actions:?}"
    );
}

#[test]
fn the_leader_keeps_a_vanished_members_slot_for_the_retention_period() {
    let primary = pg(PgRole::Primary, 500);
    let mut state = CoreState::default();
    let with_b = view(
        Some(("a", 7)),
        vec![status("b", PgRole::Replica, 400, 50, true)],
    );
    let slots = |actions: Vec<Action>| match &actions[..] {
        [Action::SyncSlots { members }] => members.clone(),
        other => panic!("{other:?}"),
    };
    assert_eq!(
        slots(check(&mut state, 0, &primary, Some(&with_b), 3000)),
        vec!["b"]
    );
    let without_b = view(Some(("a", 7)), vec![]);
    let retained = DynamicConfig::default().member_slots_ttl * 1000;
    assert_eq!(
        slots(check(
            &mut state,
            retained - 1,
            &primary,
            Some(&without_b),
            retained + 3000
        )),
        vec!["b"]
    );
    assert!(
        slots(check(
            &mut state,
            retained + 1,
            &primary,
            Some(&without_b),
            retained + 3000
        ))
        .is_empty()
    );
}

#[test]
fn with_no_slot_retention_a_present_member_still_keeps_its_slot() {
    let config = DynamicConfig {
        member_slots_ttl: 0,
        ..DynamicConfig::default()
    };
    let primary = pg(PgRole::Primary, 500);
    let mut state = CoreState::default();
    let mut turn = |now: u64, cluster: &ClusterView| {
        check_with(
            &mut state,
            now,
            &primary,
            Some(cluster),
            now + 3000,
            &config,
        )
    };
    let with_b = view(
        Some(("a", 7)),
        vec![status("b", PgRole::Replica, 400, 50, true)],
    );
    for now in [0, 1000, 2000] {
        let actions = turn(now, &with_b);
        assert!(
            matches!(&actions[..], [Action::SyncSlots { members }] if members == &["b"]),
            "{now}: {actions:?}"
        );
    }
    let actions = turn(3000, &view(Some(("a", 7)), vec![]));
    assert!(
        matches!(&actions[..], [Action::SyncSlots { members }] if members.is_empty()),
        "{actions:?}"
    );
}

#[test]
fn a_replica_that_cannot_stream_checks_for_divergence_and_the_timer_restarts_with_a_new_leader() {
    let mut replica = pg(PgRole::Replica, 100);
    replica.following = Some("b".into());
    let mut state = CoreState::default();
    let led_by = |leader: &str| {
        view(
            Some((leader, 2)),
            vec![status(leader, PgRole::Primary, 500, 50, true)],
        )
    };
    assert!(check(&mut state, 0, &replica, Some(&led_by("b")), 0).is_empty());
    // Another leader meanwhile: its own grace period starts.
    replica.following = Some("c".into());
    let stuck = SETTINGS.stuck_replica_ms;
    assert!(check(&mut state, stuck - 10, &replica, Some(&led_by("c")), 0).is_empty());
    assert!(check(&mut state, stuck + 10, &replica, Some(&led_by("c")), 0).is_empty());
    assert_eq!(
        check(&mut state, 2 * stuck, &replica, Some(&led_by("c")), 0),
        vec![Action::Follow { leader: "c".into() }]
    );
}

#[test]
fn a_replica_too_far_behind_the_last_leader_position_does_not_take_over() {
    let mut replica = pg(PgRole::Replica, 100);
    replica.following = Some("b".into());
    replica.streaming = true;
    let mut state = CoreState::default();
    let far = DynamicConfig::default().maximum_lag_on_failover + 1000;
    let led = view(
        Some(("b", 2)),
        vec![status("b", PgRole::Primary, 100 + far, 50, true)],
    );
    assert!(check(&mut state, 0, &replica, Some(&led), 5000).is_empty());
    // The leader is gone; nobody else is left to wait for.
    let gone = view(None, vec![]);
    assert!(check(&mut state, 100, &replica, Some(&gone), 5000).is_empty());
    // Caught up to within the limit: it takes over.
    let mut close = replica.clone();
    close.lsn = Lsn(100 + far - 2000);
    assert_eq!(
        check(&mut state, 200, &close, Some(&gone), 5000),
        vec![Action::AcquireLeader]
    );
}

/// Data registered after mainstay's keys were lost, or taken over from
/// Patroni: only the old primary's data may lead first.
fn registered(leader: Option<(&str, i64)>, members: Vec<MemberRecord>) -> ClusterView {
    let mut v = view(leader, members);
    if let Some(init) = v.initialize.as_mut() {
        init.awaiting_first_leader = true;
    }
    v
}

fn stopped(was_primary: bool, timeline: u32) -> LocalPg {
    let mut local = pg(PgRole::Stopped, 0);
    local.timeline = 0;
    local.data = DataDir::Initialized {
        system_id: "42".into(),
        was_primary,
        timeline,
    };
    local
}

#[test]
fn on_registered_data_only_the_old_primary_takes_the_key_first() {
    let members = || vec![status("b", PgRole::Replica, 100, 50, false)];
    // The old primary's node (stopped by its agent at start-up) takes the
    // key at once, without an election against the standbys.
    assert_eq!(
        check(
            &mut CoreState::default(),
            0,
            &stopped(true, 1),
            Some(&registered(None, members())),
            3000
        ),
        vec![Action::AcquireLeader]
    );
    // Not without a lease it can count on.
    assert!(
        check(
            &mut CoreState::default(),
            5000,
            &stopped(true, 1),
            Some(&registered(None, members())),
            3000
        )
        .is_empty()
    );
    // A standby's data starts read-only and then waits, however far
    // ahead it is: the old primary may still be writable under Patroni.
    assert_eq!(
        check(
            &mut CoreState::default(),
            0,
            &stopped(false, 1),
            Some(&registered(None, members())),
            3000
        ),
        vec![Action::StartReplica { leader: None }]
    );
    let mut state = CoreState::default();
    for now in [0, 10_000, 60_000] {
        assert!(
            check(
                &mut state,
                now,
                &pg(PgRole::Replica, 500),
                Some(&registered(None, members())),
                now + 3000
            )
            .is_empty()
        );
    }
    // The same replica on a cluster that had a leader since runs for it.
    assert!(
        !check(
            &mut CoreState::default(),
            0,
            &pg(PgRole::Replica, 500),
            Some(&view(None, members())),
            3000
        )
        .is_empty()
    );
}

#[test]
fn an_old_primary_left_behind_by_a_failover_does_not_lead_first() {
    let mut ahead = status("b", PgRole::Replica, 100, 50, false);
    ahead.status.timeline = 3;
    assert!(
        check(
            &mut CoreState::default(),
            0,
            &stopped(true, 2),
            Some(&registered(None, vec![ahead.clone()])),
            3000
        )
        .is_empty()
    );
    // A stopped member (the newer primary, fenced when the keys went)
    // publishes no running timeline, but its data's.
    let mut fenced = status("b", PgRole::Stopped, 0, 50, false);
    fenced.status.timeline = 0;
    fenced.status.data_timeline = 3;
    assert!(
        check(
            &mut CoreState::default(),
            0,
            &stopped(true, 2),
            Some(&registered(None, vec![fenced.clone()])),
            3000
        )
        .is_empty()
    );
    let mut named = registered(
        None,
        vec![fenced, status("a", PgRole::Replica, 900, 50, false)],
    );
    assert!(crate::first_leader::candidate_behind(&named, "a").is_some());
    named.members.get_mut("b").unwrap().status.data_timeline = 1;
    assert!(crate::first_leader::candidate_behind(&named, "a").is_none());
    // Its timeline counts the history files in pg_wal, not only
    // pg_control's (which lags until the first checkpoint).
    assert_eq!(
        check(
            &mut CoreState::default(),
            0,
            &stopped(true, 3),
            Some(&registered(None, vec![ahead])),
            3000
        ),
        vec![Action::AcquireLeader]
    );
}

#[test]
fn an_operator_names_a_standby_first_leader_with_a_manual_failover() {
    let mut cluster = registered(
        None,
        vec![
            status("a", PgRole::Replica, 500, 50, false),
            status("b", PgRole::Replica, 100, 50, false),
        ],
    );
    cluster.failover = Some(crate::types::FailoverRecord {
        request: Ok(crate::types::FailoverRequest {
            kind: crate::types::FailoverKind::Failover,
            leader: None,
            candidate: Some("a".into()),
            scheduled_at: None,
            requested_at: 0,
        }),
        mod_revision: 1,
    });
    assert_eq!(
        check(
            &mut CoreState::default(),
            0,
            &pg(PgRole::Replica, 500),
            Some(&cluster),
            3000
        ),
        vec![Action::AcquireLeader]
    );
    // Behind another member, the API refuses to name it; once a leader
    // ran, the usual checks apply instead.
    assert!(crate::first_leader::candidate_behind(&cluster, "b").is_some());
    assert!(crate::first_leader::candidate_behind(&cluster, "a").is_none());
    let members = cluster.members.values().cloned().collect();
    assert!(crate::first_leader::candidate_behind(&view(None, members), "b").is_none());
}

#[test]
fn the_first_leader_clears_the_mark_once_its_primary_accepts_writes() {
    let members = vec![status("b", PgRole::Replica, 100, 50, true)];
    let actions = check(
        &mut CoreState::default(),
        0,
        &pg(PgRole::Primary, 100),
        Some(&registered(Some(("a", 7)), members.clone())),
        3000,
    );
    assert_eq!(
        actions.last(),
        Some(&Action::RecordFirstLeader {
            initialize_revision: 1
        })
    );
    // Not when the turn fences it (its lease ran out).
    let fenced = check(
        &mut CoreState::default(),
        5000,
        &pg(PgRole::Primary, 100),
        Some(&registered(Some(("a", 7)), members.clone())),
        3000,
    );
    assert!(is_fence(&fenced), "{fenced:?}");
    // Starting (still stopped): not yet.
    let starting = check(
        &mut CoreState::default(),
        0,
        &stopped(true, 1),
        Some(&registered(Some(("a", 7)), members)),
        3000,
    );
    assert_eq!(starting, vec![Action::StartPrimary]);
}
