//! Decisions of a node while another holds the leader key: follow it,
//! rewind or re-clone when its WAL diverged, stand down a stale primary.

use super::*;

pub(super) fn follow(
    state: &mut CoreState,
    obs: &Observation<'_>,
    view: &ClusterView,
    leader: &str,
) -> Decision {
    let pg = obs.pg;
    if pg.streaming
        || state
            .not_streaming_since
            .as_ref()
            .is_some_and(|(of, _)| of != leader)
    {
        state.not_streaming_since = None;
    }
    if pg.accepts_writes() {
        return decision(
            vec![Action::Fence {
                reason: format!("{leader} holds the leader key"),
            }],
            "demoting: another node leads",
        );
    }
    let leader_ready = view
        .members
        .get(leader)
        .is_some_and(|m| m.status.role == PgRole::Primary);
    if let Some(status) = view.members.get(leader).map(|m| &m.status)
        && status.role == PgRole::Primary
    {
        state.leader_position = Some((status.timeline, status.flush_lsn.max(status.received_lsn)));
    }
    if obs.config.pause && pg.role == PgRole::Stopped {
        return wait(format!(
            "paused: PostgreSQL is stopped and stays so (leader {leader})"
        ));
    }
    match (&pg.data, pg.role) {
        (DataDir::Empty, _) if leader_ready => decision(
            vec![Action::BaseBackup {
                leader: leader.to_string(),
            }],
            format!("cloning from the leader {leader}"),
        ),
        (DataDir::Empty, _) => wait(format!(
            "waiting for the leader {leader} to run before cloning"
        )),
        // Timeline numbers alone cannot tell whether local WAL is a prefix
        // of the leader's (two nodes may promote to the same number), so
        // every start under a leader goes through the divergence check.
        (DataDir::Initialized { .. }, PgRole::Stopped) if leader_ready => decision(
            vec![Action::Rejoin {
                leader: leader.to_string(),
            }],
            format!("joining {leader} after a divergence check"),
        ),
        (DataDir::Initialized { .. }, PgRole::Stopped) => wait(format!(
            "waiting for the leader {leader} to run before joining it"
        )),
        (_, PgRole::Replica) if pg.following.as_deref() != Some(leader) && leader_ready => {
            decision(
                vec![Action::Follow {
                    leader: leader.to_string(),
                }],
                format!("re-pointing replication to the new leader {leader}"),
            )
        }
        (_, PgRole::Replica) if leader_ready && !pg.streaming && !obs.config.pause => {
            let since = state
                .not_streaming_since
                .get_or_insert_with(|| (leader.to_string(), obs.now))
                .1;
            let deadline = since.plus(obs.settings.stuck_replica_ms);
            if obs.now < deadline {
                let mut result = wait(format!("replica of {leader}, not streaming yet"));
                result.wake_at = Some(deadline);
                return result;
            }
            // Restarting a replica that merely cannot reach its leader would
            // not help; one whose WAL diverged is rewound by Follow's check.
            state.not_streaming_since = None;
            decision(
                vec![Action::Follow {
                    leader: leader.to_string(),
                }],
                format!(
                    "not streaming from {leader} for {} ms: checking for a divergence",
                    obs.settings.stuck_replica_ms
                ),
            )
        }
        (_, _) => wait(format!("replica of {leader}")),
    }
}
