//! Decisions while nobody holds the leader key: wait for the members'
//! final statuses, then take the key only if no eligible member is further
//! ahead.

use super::*;
use crate::candidate::{self, Candidate};

pub(super) fn leaderless(
    state: &mut CoreState,
    obs: &Observation<'_>,
    view: &ClusterView,
) -> Decision {
    let pg = obs.pg;
    let since = *state.no_leader_since.get_or_insert(obs.now);
    if pg.accepts_writes() && crate::failsafe::confirmed(obs) {
        // The key expired while etcd was unreachable, but every member
        // confirmed this primary until `valid_until` and promised not to
        // take over, so none races for it: take the key back rather than
        // stop a healthy primary. Without that promise (a key deleted by
        // hand, say) the replicas race and this node must fence instead.
        return decision(
            vec![Action::AcquireLeader],
            "failsafe: the leader key expired while every member confirmed this primary: \
             taking it back",
        );
    }
    if pg.accepts_writes() {
        return decision(
            vec![Action::Fence {
                reason: "the leader key is gone while this node was primary".into(),
            }],
            "fencing: no leader key",
        );
    }
    if obs.config.failsafe_mode
        && let Some((leader, at)) = obs.failsafe_contact
        && leader != obs.name
        && obs.now < at.plus(obs.settings.ttl_ms)
    {
        // The leader lost the DCS but not us: it keeps writing while every
        // member confirms it, so nobody here may take over.
        let mut result = wait(format!(
            "no leader key, but {leader} leads in failsafe mode (confirmed by this node)"
        ));
        result.wake_at = Some(at.plus(obs.settings.ttl_ms));
        return result;
    }
    if let Err(why) = crate::failsafe::may_run_for_leader(obs, view) {
        return wait(why);
    }
    if let Some(until) = crate::failsafe::promise_may_stand_until(obs, state.first_turn) {
        let mut result = wait(
            "failsafe mode: this agent started less than a ttl ago, and before that it may \
             have promised a leader not to take over; not running for leader yet",
        );
        result.wake_at = Some(until);
        return result;
    }
    let sync_mode = obs.config.synchronous_mode;
    // A request whose candidate may not take over (synchronous mode or the
    // failsafe list refuse it) is not followed: waiting for it would leave
    // the cluster leaderless for good, since only a leader clears requests.
    let manual = view
        .failover
        .as_ref()
        .and_then(|f| f.request.as_ref().ok())
        .and_then(|r| r.candidate.as_deref())
        .filter(|c| view.members.contains_key(*c))
        .filter(|c| !sync_mode || crate::sync::may_take_over(view, c))
        .filter(|c| crate::failsafe::may_lead(obs, view, c).is_ok());
    if obs.config.pause && manual.is_none() {
        return wait("no leader, and the cluster is paused: no automatic failover");
    }
    let awaiting_first_leader = view
        .initialize
        .as_ref()
        .is_some_and(|init| init.awaiting_first_leader);
    if awaiting_first_leader && manual.is_none() {
        match first_leader(obs, view) {
            FirstLeader::TakeKey => {
                return decision(
                    vec![Action::AcquireLeader],
                    "the cluster was registered from existing data and this node's data last \
                     ran as its primary: taking the leader key to start it as the primary again",
                );
            }
            FirstLeader::Wait(why) => return wait(why),
            FirstLeader::StartStandby => {}
        }
    }
    match (&pg.data, pg.role) {
        (DataDir::Empty, _) => return wait("no leader to clone from"),
        (DataDir::Initialized { .. }, PgRole::Stopped) => {
            return decision(
                vec![Action::StartReplica { leader: None }],
                "no leader: starting as a standby to take part in the election",
            );
        }
        _ => {}
    }
    match manual {
        Some(candidate) if candidate == obs.name => {
            if obs.now >= obs.lease.valid_until {
                return wait("manual failover to this node: waiting for a lease renewal");
            }
            return decision(
                vec![Action::AcquireLeader],
                "no leader: taking over as the operator asked (manual failover)",
            );
        }
        Some(candidate) => {
            return wait(format!("no leader: manual failover to {candidate} pending"));
        }
        None => {}
    }
    if obs.tags.nofailover {
        return wait("no leader, and this node is tagged nofailover");
    }
    if sync_mode && !crate::sync::may_take_over(view, obs.name) {
        return wait(format!(
            "no leader; synchronous mode: only {:?} hold every acknowledged commit",
            crate::sync::allowed(view)
        ));
    }
    // A synchronous standby has every acknowledged commit: no lag limit.
    if !sync_mode
        && let Some((timeline, position)) = state.leader_position
        && timeline == pg.timeline
        && position.0.saturating_sub(pg.lsn.0) > obs.config.maximum_lag_on_failover
    {
        return wait(format!(
            "no leader, but this node is {} bytes behind the last leader position {position}: \
             more than maximum_lag_on_failover; a manual failover can override",
            position.0 - pg.lsn.0
        ));
    }
    let me = Candidate {
        name: obs.name,
        timeline: pg.timeline,
        lsn: pg.lsn,
        tags: obs.tags,
    };
    let mut fresh = Vec::new();
    let mut silent = Vec::new();
    for (name, member) in &view.members {
        let status = &member.status;
        if name == obs.name || status.tags.nofailover {
            continue;
        }
        if sync_mode && !crate::sync::may_take_over(view, name) {
            continue;
        }
        if crate::failsafe::may_lead(obs, view, name).is_err() {
            continue;
        }
        // A status read before the leader vanished may predate the last WAL
        // the old primary sent, and a member that restarted may not be a
        // replica yet: wait for a final word from each of them.
        let final_status =
            !status.view_had_leader && status.view_revision > state.last_leader_revision;
        if !final_status {
            silent.push(name.as_str());
            continue;
        }
        if status.role == PgRole::Replica {
            fresh.push(Candidate {
                name,
                timeline: status.timeline,
                lsn: status.received_lsn.max(status.replayed_lsn),
                tags: &status.tags,
            });
        }
    }
    if let Some(better) = candidate::better_than(&me, &fresh) {
        return wait(format!(
            "no leader: {} is a better candidate (timeline {}, {})",
            better.name, better.timeline, better.lsn
        ));
    }
    let deadline = since.plus(obs.settings.election_wait_ms);
    if !silent.is_empty() && obs.now < deadline {
        let mut result = wait(format!(
            "no leader: waiting for a fresh status from {}",
            silent.join(", ")
        ));
        result.wake_at = Some(deadline);
        return result;
    }
    if obs.now >= obs.lease.valid_until {
        return wait(
            "no leader: this node would be the best candidate but its lease is not confirmed",
        );
    }
    decision(
        vec![Action::AcquireLeader],
        format!(
            "no leader: this node is the best candidate (timeline {}, {})",
            pg.timeline, pg.lsn
        ),
    )
}

enum FirstLeader {
    TakeKey,
    /// Standby data: start it read-only (so that it is ready to follow),
    /// then wait for the first leader.
    StartStandby,
    Wait(String),
}

/// Who may lead first on data registered after the DCS lost its keys or
/// another manager ran the cluster: only data that last ran as the
/// primary, and not if a member's data reached a later timeline (this
/// would be an old primary left behind by a failover). A standby's data
/// waits for that primary's node, or for an operator's manual failover.
fn first_leader(obs: &Observation<'_>, view: &ClusterView) -> FirstLeader {
    let waiting = "the cluster was registered from existing data and no node whose data last \
                   ran as the primary has led yet: waiting for it (start the agent on the old \
                   primary's node; if that node is lost or its agent cannot lead, `mainstay ctl \
                   failover --candidate` names the node to promote)";
    let DataDir::Initialized {
        was_primary,
        timeline,
        ..
    } = &obs.pg.data
    else {
        return FirstLeader::Wait(waiting.into());
    };
    match obs.pg.role {
        PgRole::Stopped if *was_primary => {}
        PgRole::Stopped => return FirstLeader::StartStandby,
        _ => return FirstLeader::Wait(waiting.into()),
    }
    let ahead = view
        .members
        .iter()
        .filter(|(name, _)| *name != obs.name)
        .map(|(name, m)| (name, m.status.timeline.max(m.status.data_timeline)))
        .find(|(_, theirs)| theirs > timeline);
    if let Some((name, theirs)) = ahead {
        return FirstLeader::Wait(format!(
            "this node's data last ran as a primary on timeline {timeline}, but {name}'s data \
             reached timeline {theirs}: this data was left behind by a failover; not leading \
             (if {name}'s node cannot lead, `mainstay ctl failover --candidate` names a node)"
        ));
    }
    if obs.now >= obs.lease.valid_until {
        return FirstLeader::Wait("first leader: waiting for a lease renewal".into());
    }
    FirstLeader::TakeKey
}
