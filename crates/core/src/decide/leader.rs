//! Decisions of the node that holds the leader key: keep the primary
//! writable and its lease renewed, run planned switchovers, manage slots and
//! the synchronous standbys.

use super::*;
use crate::switchover::{LeaderVerdict, judge};

pub(super) fn lead(state: &mut CoreState, obs: &Observation<'_>, view: &ClusterView) -> Decision {
    let pg = obs.pg;
    if obs.now >= obs.lease.valid_until {
        if pg.role != PgRole::Stopped {
            return decision(
                vec![Action::Fence {
                    reason: "the leader lease was not renewed in time".into(),
                }],
                "fencing: lease deadline passed",
            );
        }
        return wait("leader key held but the lease is not confirmed: waiting for a renewal");
    }
    match (&pg.data, pg.role) {
        (_, PgRole::Primary) => {
            state.primary_restart_at = None;
            let members = slot_members(state, obs);
            let mut actions = vec![Action::SyncSlots { members }];
            actions.extend(crate::failsafe::record(obs, view));
            if let Some(step) = crate::sync::manage(&mut state.sync_catchup, obs, view) {
                actions.push(step);
                return decision(actions, "leader: adjusting the synchronous standbys");
            }
            let Some(record) = &view.failover else {
                return decision(actions, "leader with a running primary");
            };
            let request = match &record.request {
                Ok(request) => request,
                Err(reason) => {
                    actions.push(Action::ClearFailover {
                        failover_revision: record.mod_revision,
                        reason: format!("unreadable request: {reason}"),
                    });
                    return decision(actions, "dropping an unreadable failover request");
                }
            };
            let lag = crate::switchover::Lag::Live {
                leader_lsn: pg.lsn,
                standbys: &pg.standbys,
            };
            match judge(request, view, obs.name, lag, obs.wall_secs, obs.config) {
                LeaderVerdict::HandOver(candidate) => decision(
                    vec![Action::Switchover {
                        candidate: candidate.clone(),
                        failover_revision: record.mod_revision,
                    }],
                    format!("switchover to {candidate}"),
                ),
                LeaderVerdict::Wait { at } => {
                    let mut result = decision(
                        actions,
                        format!("leader; switchover scheduled at Unix time {at}"),
                    );
                    let in_ms = at.saturating_sub(obs.wall_secs).saturating_mul(1000);
                    result.wake_at = Some(obs.now.plus(in_ms.min(obs.settings.loop_wait_ms)));
                    result
                }
                LeaderVerdict::Drop(reason) => {
                    actions.push(Action::ClearFailover {
                        failover_revision: record.mod_revision,
                        reason: reason.clone(),
                    });
                    decision(actions, format!("failover request: {reason}"))
                }
            }
        }
        (_, PgRole::Replica) => {
            let mut actions = Vec::new();
            if obs.config.synchronous_mode {
                // Before this node acknowledges anything, the sync key must
                // stop vouching for the old leader's standbys, and commits
                // must wait for standbys of this leader (or none, strict).
                let record = view.sync.as_ref();
                let ours = record.is_some_and(
                    |r| matches!(&r.state, Ok(s) if s.leader == obs.name && s.members.is_empty()),
                );
                if !ours {
                    actions.push(Action::WriteSync {
                        members: Vec::new(),
                        expected_revision: record.map_or(0, |r| r.mod_revision),
                    });
                }
                let block = obs.config.synchronous_mode_strict;
                if pg.sync_standby_names != crate::sync::render_standby_names(&[], block) {
                    actions.push(Action::SetSyncStandbys {
                        names: Vec::new(),
                        block,
                    });
                }
            }
            actions.push(promote(view, obs.name, obs.wall_secs));
            decision(actions, "this node holds the leader key: promoting")
        }
        (_, PgRole::Stopped) if obs.config.pause => {
            wait("leader without a running PostgreSQL; paused: not restarting it")
        }
        (DataDir::Empty, PgRole::Stopped) => decision(
            vec![Action::ReleaseLeader {
                reason: "leader without a data directory".into(),
            }],
            "cannot lead without data",
        ),
        (DataDir::Initialized { .. }, PgRole::Stopped) => match state.primary_restart_at {
            None => {
                state.primary_restart_at = Some(obs.now);
                let mut actions = Vec::new();
                // The key must vouch for this leader before it writes.
                let record = view.sync.as_ref();
                let ours =
                    record.is_some_and(|r| matches!(&r.state, Ok(s) if s.leader == obs.name));
                if obs.config.synchronous_mode && !ours {
                    actions.push(Action::WriteSync {
                        members: Vec::new(),
                        expected_revision: record.map_or(0, |r| r.mod_revision),
                    });
                }
                actions.push(Action::StartPrimary);
                decision(
                    actions,
                    "the primary is not running: starting it (with crash recovery if it stopped uncleanly)",
                )
            }
            Some(_) => {
                state.primary_restart_at = None;
                decision(
                    vec![Action::ReleaseLeader {
                        reason: "PostgreSQL did not come back as primary".into(),
                    }],
                    "giving leadership away: the primary could not be restarted",
                )
            }
        },
    }
}

/// Every other member seen within the slot retention, so that a member that
/// restarts keeps its slot (and the WAL it still needs). A member seen in
/// this turn's view keeps it whatever the retention, even none.
fn slot_members(state: &mut CoreState, obs: &Observation<'_>) -> Vec<String> {
    let retention = obs.config.member_slots_ttl.saturating_mul(1000);
    state
        .slot_members
        .retain(|name, seen| name != obs.name && obs.now <= seen.plus(retention));
    state.slot_members.keys().cloned().collect()
}
