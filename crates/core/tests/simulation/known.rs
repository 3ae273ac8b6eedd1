//! Bugs in the core this simulator found and that are not fixed yet (the
//! simulator must not fix the core). Each is recognised by a narrow
//! condition on the state at the moment of the violation, so that a
//! violation of another cause is never excused. A seed that hits one is
//! listed in the run's summary instead of failing it, unless
//! `MAINSTAY_SIM_STRICT=1`; the `known_bugs_still_reproduce` test replays one
//! seed of each, so that a fix in the core shows up here and its entry can
//! go.

use crate::driver::Sim;
use crate::model::Wal;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum KnownBug {
    /// timeline.rs `foreign_timeline` and the timeline claims: two nodes
    /// created the same timeline number from the same switch point (the
    /// second never saw the first's history file), so their history files
    /// are identical and only the claims can tell the WAL apart. They miss
    /// it when (a) the node following is a replica that streamed the losing
    /// copy (it never claimed anything), (b) the first creator leads again
    /// later (the *last* claim in the DCS history is taken as the owner), or
    /// (c) the creator's claim file was overwritten by a later claim (a
    /// promotion attempt that failed after claiming the next number). The
    /// node then follows the leader without a rewind onto different WAL.
    TimelineCreatedTwice,
    /// timeline.rs `divergence`: a local history that lacks an entry of the
    /// leader's (the same timeline number created twice from different
    /// parents: one node promoted to N from timeline N-2, having only seen
    /// the history file of N-1) passes as a prefix, since only local entries
    /// are looked up in the leader's history.
    HistoryEntryMissing,
    /// decide/leaderless.rs: a node that never saw a leadership (cut off
    /// or with failed reads while another node led) still counts its
    /// election wait from when it first saw no leader, long ago, so it
    /// takes the key at once, ignoring a member whose latest status dates
    /// from that leadership (not final for the election) though it has more
    /// WAL: the WAL only that member had is lost.
    ElectionAfterMissedLeader,
}

impl KnownBug {
    /// A seed that reproduces each (find current ones with
    /// `MAINSTAY_SIM_SURVEY=1`): replayed by `known_core_bugs_still_reproduce`.
    /// The rare ones (`HistoryEntryMissing`, `ElectionAfterMissedLeader`: a
    /// few seeds in 40,000) are checked by
    /// the tests below on the core directly, with the states they were
    /// found in.
    pub(crate) const SEEDS: [(KnownBug, u64); 1] = [(KnownBug::TimelineCreatedTwice, 68)];
}

/// The timeline number `wal` has the byte at `pos` on.
fn timeline_at(wal: &Wal, pos: u64) -> u32 {
    wal.history
        .iter()
        .find(|s| pos < s.switch_lsn.0)
        .map_or(wal.timeline, |s| s.timeline)
}

/// The first byte at which two WALs differ (their common length if one is
/// a prefix of the other).
fn first_difference(a: &Wal, b: &Wal) -> u64 {
    let mut pos = 0;
    let end = a.end.min(b.end);
    while pos < end {
        if a.epoch_at(pos) != b.epoch_at(pos) {
            return pos;
        }
        let next = |w: &Wal| {
            w.runs
                .iter()
                .map(|r| r.start)
                .find(|s| *s > pos)
                .unwrap_or(w.end)
        };
        pos = next(a).min(next(b));
    }
    end
}

impl Sim {
    /// A replica followed without a rewind onto WAL that differs: which
    /// known bug let it, if any.
    pub(crate) fn divergence_missed(
        &self,
        node: usize,
        local: &Wal,
        leader: &Wal,
    ) -> Option<KnownBug> {
        let pos = first_difference(local, leader);
        let timeline = timeline_at(local, pos);
        if pos < local.end.min(leader.end) && timeline == timeline_at(leader, pos) {
            // The one case the claims do cover: this node created the
            // timeline, and the DCS history gives it to someone else.
            let name = &self.nodes[node].name;
            let covered = self.nodes[node].claim.as_ref() == Some(&(timeline, name.clone()))
                && self
                    .dcs
                    .history
                    .iter()
                    .rev()
                    .find(|e| e.timeline == timeline)
                    .is_some_and(|e| e.new_leader != *name);
            return (!covered).then_some(KnownBug::TimelineCreatedTwice);
        }
        let missing = leader.history.iter().any(|theirs| {
            theirs.timeline < local.timeline
                && !local.history.iter().any(|s| s.timeline == theirs.timeline)
        });
        (missing && local.timeline <= leader.timeline).then_some(KnownBug::HistoryEntryMissing)
    }
}

#[cfg(test)]
mod tests {
    use mainstay_core::decide::{Action, DataDir, Lease, LocalPg, Settings};
    use mainstay_core::timeline::{Divergence, LeaderWal, LocalWal, TimelineSwitch, divergence};
    use mainstay_core::{
        ClusterView, CoreState, DynamicConfig, InitializeRecord, LeaderRecord, Lsn, MemberRecord,
        Millis, Observation, PgRole, Tags, decide,
    };

    const SETTINGS: Settings = Settings {
        ttl_ms: 4000,
        loop_wait_ms: 1000,
        election_wait_ms: 3000,
        stuck_replica_ms: 10_000,
    };

    fn decide_at(
        state: &mut CoreState,
        now: u64,
        pg: &LocalPg,
        view: &ClusterView,
        config: &DynamicConfig,
    ) -> Vec<Action> {
        let obs = Observation {
            now: Millis(now),
            name: "c",
            tags: &Tags::default(),
            settings: &SETTINGS,
            pg,
            cluster: Some(view),
            lease: Lease {
                id: Some(7),
                valid_until: Millis(now + 3000),
                members_confirmed: false,
            },
            config,
            wall_secs: 0,
            failsafe_contact: None,
        };
        decide(state, &obs).actions
    }

    fn view(system_id: Option<&str>, leader: Option<(&str, i64)>) -> ClusterView {
        ClusterView {
            revision: 100,
            initialize: Some(InitializeRecord {
                system_id: system_id.map(Into::into),
                by: "c".into(),
                at: String::new(),
                awaiting_first_leader: false,
            }),
            initialize_revision: 1,
            leader: leader.map(|(name, rev)| LeaderRecord {
                name: name.into(),
                lease_id: if name == "c" { 7 } else { 1 },
                mod_revision: rev,
            }),
            ..ClusterView::default()
        }
    }

    fn replica(lsn: u64) -> LocalPg {
        LocalPg {
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
        }
    }

    /// `KnownBug::ElectionAfterMissedLeader` (seed 14000): c saw leader a
    /// (revision 10), then no leader from t=1 s; it missed b's leadership
    /// (revision 20) entirely. At t=20 s b's latest status dates from b's
    /// time (not final) and b has more WAL: c takes the key at once, its
    /// election wait long over.
    #[test]
    fn election_after_a_missed_leader_does_not_wait_for_the_better_member() {
        let config = DynamicConfig {
            maximum_lag_on_failover: u64::MAX,
            ..DynamicConfig::default()
        };
        let mut state = CoreState::default();
        decide_at(
            &mut state,
            0,
            &replica(100),
            &view(Some("42"), Some(("a", 10))),
            &config,
        );
        decide_at(
            &mut state,
            1000,
            &replica(100),
            &view(Some("42"), None),
            &config,
        );
        let mut b = MemberRecord::example("b", PgRole::Replica, 200, Some("b"));
        b.status.view_had_leader = true;
        b.status.view_revision = 25;
        let mut later = view(Some("42"), None);
        later.members.insert("b".into(), b);
        assert_eq!(
            decide_at(&mut state, 20_000, &replica(100), &later, &config),
            vec![Action::AcquireLeader],
            "decide now waits for b: remove KnownBug::ElectionAfterMissedLeader"
        );
    }

    /// Found by the simulator (seeds 3079, 4831), fixed, kept as its
    /// regression test: in synchronous mode a bootstrap wrote no `sync` key
    /// before the new primary acknowledged commits, so a replica without
    /// them could win an ordinary election once the leader lost etcd.
    #[test]
    fn a_bootstrap_in_synchronous_mode_writes_the_sync_key_first() {
        let config = DynamicConfig {
            synchronous_mode: true,
            ..DynamicConfig::default()
        };
        let empty = LocalPg {
            data: DataDir::Empty,
            role: PgRole::Stopped,
            ..replica(0)
        };
        assert_eq!(
            decide_at(
                &mut CoreState::default(),
                0,
                &empty,
                &view(None, Some(("c", 5))),
                &config
            ),
            vec![
                Action::WriteSync {
                    members: Vec::new(),
                    expected_revision: 0,
                },
                Action::Bootstrap
            ],
            "in synchronous mode the key names the new leader before it writes"
        );
    }

    fn switches(points: &[(u32, u64)]) -> Vec<TimelineSwitch> {
        points
            .iter()
            .map(|&(timeline, at)| TimelineSwitch {
                timeline,
                switch_lsn: Lsn(at),
            })
            .collect()
    }

    /// `KnownBug::HistoryEntryMissing` as the simulator found it: n3, on
    /// timeline 5 at 99300 with timeline 6's history file from n2, promoted
    /// to 7; n2 later promoted from 6 to 7 at 106270. n0, a replica of n3's
    /// timeline 7, follows n2: its WAL from 99300 on is not n2's, yet the
    /// check finds no divergence (it never asks whether the leader's history
    /// has an entry the local one lacks).
    #[test]
    fn history_entry_missing_still_passes_as_a_prefix() {
        let shared = [(1, 47056), (2, 71921), (3, 80082), (4, 81083), (5, 99300)];
        let local = LocalWal {
            timeline: 7,
            end_lsn: Lsn(99718),
            history: switches(&shared),
        };
        let mut theirs = shared.to_vec();
        theirs.push((6, 106270));
        let leader = LeaderWal {
            timeline: 7,
            flush_lsn: Lsn(106271),
            history: switches(&theirs),
        };
        assert_eq!(
            divergence(&local, &leader),
            Divergence::None,
            "timeline::divergence now sees it: remove KnownBug::HistoryEntryMissing"
        );
    }
}
