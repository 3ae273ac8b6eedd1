//! Failsafe mode's rules: a primary that loses etcd may go on writing only
//! while every member it relies on confirms it, and those members are named
//! in the `failsafe` key so that a member outside that list (one that
//! restarted or joined after the list was written, and was therefore never
//! asked) cannot win an election while the promise stands.

use crate::action::Action;
use crate::observation::Observation;
use crate::types::{ClusterView, FailsafeState};

/// Every member confirmed this node's primary until a deadline not yet past,
/// and the agent holds a lease to put the key on.
pub fn confirmed(obs: &Observation<'_>) -> bool {
    obs.lease.members_confirmed && obs.lease.id.is_some() && obs.now < obs.lease.valid_until
}

/// The list the leader must record: every member it sees that could take
/// over, itself included (a witness cannot, so it is not asked).
pub fn wanted(obs: &Observation<'_>, view: &ClusterView) -> FailsafeState {
    FailsafeState {
        leader: obs.name.to_string(),
        members: view
            .members
            .values()
            .filter(|m| !m.status.witness)
            .map(|m| (m.status.name.clone(), m.status.api_url.clone()))
            .collect(),
    }
}

/// For a leader with a running primary: rewrite the `failsafe` key when the
/// members it sees changed (only then: an idle cluster writes nothing).
pub fn record(obs: &Observation<'_>, view: &ClusterView) -> Option<Action> {
    // While the deadline rests on the listed members' promise (etcd is not
    // renewing), a new name on the list would be a member that never
    // promised and may run for leader: the list waits for etcd.
    if !obs.config.failsafe_mode || obs.lease.members_confirmed {
        return None;
    }
    let wanted = wanted(obs, view);
    let current = view.failsafe.as_ref();
    if current.is_some_and(|r| r.state.as_ref() == Ok(&wanted)) {
        return None;
    }
    Some(Action::WriteFailsafe {
        state: wanted,
        expected_revision: current.map_or(0, |r| r.mod_revision),
    })
}

/// Whether this node may take part in an election. In failsafe mode a
/// `failsafe` key written by another leader must name this node: the old
/// leader may still write, confirmed by every member on its list, and a node
/// it never asked cannot know. An unreadable key is read the safe way (it
/// could hold any list); the leader rewrites it, or an operator deletes it.
pub fn may_run_for_leader(obs: &Observation<'_>, view: &ClusterView) -> Result<(), String> {
    may_lead(obs, view, obs.name)
}

/// The same rule for any member `name`: an election waits only for members
/// that may run, or it would wait for ever for one that may not.
pub fn may_lead(obs: &Observation<'_>, view: &ClusterView, name: &str) -> Result<(), String> {
    if !obs.config.failsafe_mode {
        return Ok(());
    }
    let Some(record) = &view.failsafe else {
        return Ok(());
    };
    match &record.state {
        Ok(state) if state.leader == name || state.members.contains_key(name) => Ok(()),
        Ok(state) => Err(format!(
            "failsafe mode: not among the members {} relies on, so it may still write \
             with their confirmation; not running for leader (a member on that list will, \
             or {} itself takes the key back)",
            state.leader, state.leader
        )),
        Err(reason) => Err(format!(
            "failsafe mode: the failsafe key is unreadable ({reason}), so it may name a \
             leader that still writes; not running for leader (fix or delete the key, or \
             turn failsafe_mode off)"
        )),
    }
}

/// Until when a promise this node may have made before its agent started
/// (at `first_turn`) could still stand, if that is later than now. A member
/// that confirms a leader promises not to take over for a ttl, and the
/// promise lives in the agent's memory only: an agent that restarted
/// cannot know whether it made one, so in failsafe mode it does not run
/// for leader until a ttl after its start.
pub fn promise_may_stand_until(
    obs: &Observation<'_>,
    first_turn: Option<crate::types::Millis>,
) -> Option<crate::types::Millis> {
    let until = first_turn?.plus(obs.settings.ttl_ms);
    (obs.config.failsafe_mode && obs.now < until).then_some(until)
}

#[cfg(test)]
mod tests {
    //! The failsafe hole: a member that restarted while etcd was healthy
    //! drops out of the leader's list; etcd then becomes unreachable for the
    //! leader (which keeps writing, confirmed by the members on its list),
    //! the member comes back and publishes a new key, the leader's key
    //! expires: the member must not promote while the leader is confirmed.
    use super::*;
    use crate::decide::{DataDir, Lease, LocalPg, Settings, decide};
    use crate::types::{FailsafeRecord, Lsn, MemberRecord, Millis, PgRole, Tags};
    use crate::{CoreState, DynamicConfig};

    const SETTINGS: Settings = Settings {
        ttl_ms: 4000,
        loop_wait_ms: 1000,
        election_wait_ms: 2000,
        stuck_replica_ms: 30_000,
    };

    fn member(name: &str, lsn: u64) -> MemberRecord {
        let mut m = MemberRecord::example(name, PgRole::Replica, lsn, None);
        m.status.view_had_leader = false;
        m.status.view_revision = 50;
        m.status.api_url = format!("http://{name}:8008");
        m
    }

    fn leaderless_view(failsafe: Option<FailsafeRecord>) -> ClusterView {
        ClusterView {
            revision: 100,
            initialize: Some(crate::types::InitializeRecord {
                system_id: Some("42".into()),
                by: "a".into(),
                at: String::new(),
                awaiting_first_leader: false,
            }),
            initialize_revision: 1,
            // a's key expired with its lease; b and c publish theirs.
            members: [member("b", 100), member("c", 200)]
                .into_iter()
                .map(|m| (m.status.name.clone(), m))
                .collect(),
            failsafe,
            ..ClusterView::default()
        }
    }

    fn list(names: &[&str]) -> Option<FailsafeRecord> {
        Some(FailsafeRecord {
            state: Ok(FailsafeState {
                leader: "a".into(),
                members: names
                    .iter()
                    .map(|n| (n.to_string(), format!("http://{n}:8008")))
                    .collect(),
            }),
            mod_revision: 20,
        })
    }

    /// One turn of replica `name` (WAL up to `lsn`, no failsafe contact:
    /// nobody asked it) in a leaderless cluster.
    fn turn(
        state: &mut CoreState,
        name: &str,
        lsn: u64,
        view: &ClusterView,
        failsafe_mode: bool,
        now: u64,
    ) -> crate::decide::Decision {
        let tags = Tags::default();
        let config = DynamicConfig {
            failsafe_mode,
            ..DynamicConfig::default()
        };
        let pg = LocalPg {
            data: DataDir::Initialized {
                system_id: "42".into(),
                was_primary: false,
                timeline: 1,
            },
            role: PgRole::Replica,
            timeline: 1,
            lsn: Lsn(lsn),
            following: None,
            streaming: false,
            sync_standby_names: String::new(),
            standbys: Vec::new(),
        };
        let obs = Observation {
            now: Millis(now),
            name,
            tags: &tags,
            settings: &SETTINGS,
            pg: &pg,
            cluster: Some(view),
            lease: Lease {
                id: Some(9),
                valid_until: Millis(now + 3000),
                members_confirmed: false,
            },
            config: &config,
            wall_secs: 0,
            failsafe_contact: None,
        };
        decide(state, &obs)
    }

    /// Everything `name`, just started, decides every 500 ms until `until`.
    fn decides(
        name: &str,
        lsn: u64,
        view: &ClusterView,
        failsafe_mode: bool,
        until: u64,
    ) -> Vec<Action> {
        let mut state = CoreState::default();
        (0..until)
            .step_by(500)
            .flat_map(|now| turn(&mut state, name, lsn, view, failsafe_mode, now).actions)
            .collect()
    }

    /// What c (the most advanced replica; a never asked it) decides.
    fn c_decides(view: &ClusterView, failsafe_mode: bool) -> Vec<Action> {
        decides("c", 200, view, failsafe_mode, 10_000)
    }

    fn runs_for_leader(actions: &[Action]) -> bool {
        actions.contains(&Action::AcquireLeader)
    }

    #[test]
    fn a_member_outside_the_leaders_list_cannot_win_while_the_promise_stands() {
        assert!(!runs_for_leader(&c_decides(
            &leaderless_view(list(&["a", "b"])),
            true
        )));
        // The same turns elect c when it is on the list, when there is no
        // list, or when failsafe mode is off: the refusal above is the rule,
        // not a quirk of the scenario.
        assert!(runs_for_leader(&c_decides(
            &leaderless_view(list(&["a", "b", "c"])),
            true
        )));
        assert!(runs_for_leader(&c_decides(&leaderless_view(None), true)));
        assert!(runs_for_leader(&c_decides(
            &leaderless_view(list(&["a", "b"])),
            false
        )));
    }

    #[test]
    fn a_restarted_member_waits_out_a_promise_it_may_have_made() {
        let view = leaderless_view(list(&["a", "b", "c"]));
        let mut state = CoreState::default();
        // Started at 10 s: nothing before 14 s, whatever else holds.
        for now in (10_000..14_000).step_by(250) {
            let decision = turn(&mut state, "c", 200, &view, true, now);
            assert!(!runs_for_leader(&decision.actions), "at {now} ms");
        }
        let ran = (14_000..20_000)
            .step_by(250)
            .any(|now| runs_for_leader(&turn(&mut state, "c", 200, &view, true, now).actions));
        assert!(ran, "never ran for leader once the promise had lapsed");
    }

    /// b (listed, behind c) must not wait for c, which may not run.
    fn b_decides(view: &ClusterView) -> Vec<Action> {
        decides("b", 100, view, true, 20_000)
    }

    #[test]
    fn the_election_does_not_wait_for_a_better_member_that_may_not_run() {
        assert!(runs_for_leader(&b_decides(&leaderless_view(list(&[
            "a", "b"
        ])))));
        // With c listed too, b defers to c, which has more WAL.
        assert!(!runs_for_leader(&b_decides(&leaderless_view(list(&[
            "a", "b", "c"
        ])))));
    }

    #[test]
    fn a_request_for_a_member_that_may_not_run_does_not_block_the_election() {
        // The leader vanished with a failover request to c pending; c is
        // not on the list, so b must not wait for it (only a leader clears
        // requests).
        let mut view = leaderless_view(list(&["a", "b"]));
        view.failover = Some(crate::types::FailoverRecord {
            request: Ok(crate::types::FailoverRequest {
                kind: crate::types::FailoverKind::Failover,
                leader: None,
                candidate: Some("c".into()),
                scheduled_at: None,
                requested_at: 0,
            }),
            mod_revision: 30,
        });
        assert!(runs_for_leader(&b_decides(&view)));
    }

    #[test]
    fn an_unreadable_list_is_read_the_safe_way() {
        let corrupt = Some(FailsafeRecord {
            state: Err("expected value at line 1 column 1".into()),
            mod_revision: 20,
        });
        assert!(!runs_for_leader(&c_decides(
            &leaderless_view(corrupt),
            true
        )));
    }

    #[test]
    fn the_leader_rewrites_the_list_only_when_the_members_changed() {
        let tags = Tags::default();
        let config = DynamicConfig {
            failsafe_mode: true,
            ..DynamicConfig::default()
        };
        let pg = LocalPg {
            data: DataDir::Initialized {
                system_id: "42".into(),
                was_primary: true,
                timeline: 1,
            },
            role: PgRole::Primary,
            timeline: 1,
            lsn: Lsn(300),
            following: None,
            streaming: false,
            sync_standby_names: String::new(),
            standbys: Vec::new(),
        };
        let mut view = leaderless_view(None);
        let mut a = member("a", 300);
        a.status.role = PgRole::Primary;
        view.members.insert("a".into(), a);
        let observe = |view: &ClusterView| {
            let obs = Observation {
                now: Millis(0),
                name: "a",
                tags: &tags,
                settings: &SETTINGS,
                pg: &pg,
                cluster: None,
                lease: Lease {
                    id: Some(7),
                    valid_until: Millis(3000),
                    members_confirmed: false,
                },
                config: &config,
                wall_secs: 0,
                failsafe_contact: None,
            };
            record(&obs, view)
        };
        let Some(Action::WriteFailsafe {
            state,
            expected_revision: 0,
        }) = observe(&view)
        else {
            panic!("no list written");
        };
        assert_eq!(
            state.members.keys().collect::<Vec<_>>(),
            ["a", "b", "c"],
            "every member, the leader included"
        );
        view.failsafe = Some(FailsafeRecord {
            state: Ok(state),
            mod_revision: 30,
        });
        assert_eq!(observe(&view), None, "unchanged: nothing written");
        view.members.remove("c");
        assert!(matches!(
            observe(&view),
            Some(Action::WriteFailsafe {
                expected_revision: 30,
                ..
            })
        ));
    }
}
