//! One turn of the HA loop: from what the agent observes to what it must do.
//!
//! The agent calls [`decide`] after reading the DCS and then probing its
//! PostgreSQL (in that order: a status probed after a view without a leader is
//! final for an election). It executes the returned actions in order, stopping
//! at the first failure, and calls again at once if any action changed state,
//! or at the latest at `wake_at` / after `loop_wait`.
//!
//! Safety rules (docs/rules.md sections 2, 3 and 6) that live here:
//! - a node may run a writable PostgreSQL only while it holds the leader key
//!   on a lease it has renewed recently enough (`lease.valid_until`);
//! - a node takes the leader key only if no eligible member is further ahead;
//! - nothing here ever removes a data directory: a failed bootstrap or an
//!   impossible rejoin moves it aside.

mod leader;
mod leaderless;
mod replica;
#[cfg(test)]
mod tests;

pub use crate::action::{Action, Decision};
pub use crate::observation::{DataDir, Lease, LocalPg, Observation, Settings, Standby};
use crate::types::{ClusterView, Lsn, Millis, PgRole};
use std::collections::BTreeMap;
use std::time::Duration;

/// A promotion is a switchover only when a request that was due named this
/// node (or anyone); a crash while a switchover waits for its time, or while
/// one names another member, is a failover, and the history says so.
fn promote(view: &ClusterView, me: &str, wall_secs: u64) -> Action {
    let planned = view
        .failover
        .as_ref()
        .and_then(|f| f.request.as_ref().ok())
        .is_some_and(|request| {
            request.scheduled_at.is_none_or(|at| at <= wall_secs)
                && request.candidate.as_deref().is_none_or(|c| c == me)
        });
    Action::Promote {
        reason: if planned { "switchover" } else { "failover" }.into(),
    }
}

/// Memory kept between turns; owned by the agent, changed only here.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CoreState {
    /// When this agent first saw the leader key missing, in this episode.
    no_leader_since: Option<Millis>,
    /// The highest mod revision of any leader key this agent has seen.
    last_leader_revision: i64,
    /// When this leader started its crashed PostgreSQL again.
    primary_restart_at: Option<Millis>,
    /// Since when this replica has failed to stream from which leader.
    not_streaming_since: Option<(String, Millis)>,
    /// Members whose slots the leader keeps, with when each was last seen.
    slot_members: BTreeMap<String, Millis>,
    /// The last WAL position the leader published (timeline, position): a
    /// replica further behind it than `maximum_lag_on_failover` does not
    /// take over automatically.
    leader_position: Option<(u32, Lsn)>,
    /// Synchronous mode: the names in effect and the primary's position when
    /// they were first seen in effect (see `sync::manage`).
    sync_catchup: Option<(Vec<String>, Lsn)>,
    /// Bootstraps of this node that failed in a row, and when it may claim
    /// the bootstrap again: each failure moves a data directory aside, so a
    /// failure that repeats (a bad parameter, a full disk) must not do it
    /// every turn.
    failed_bootstraps: u32,
    bootstrap_retry_at: Option<Millis>,
    /// When this agent's core first ran. A failsafe promise not to take
    /// over lives in the agent's memory only and is lost with a restart.
    first_turn: Option<Millis>,
}

/// The first retry after a failed bootstrap; each further failure doubles it.
pub const BOOTSTRAP_RETRY_FIRST: Duration = Duration::from_secs(5);
pub const BOOTSTRAP_RETRY_MAX: Duration = Duration::from_secs(300);

impl CoreState {
    /// `ctl remove`: the leader stops keeping a slot for `name` at once.
    pub fn forget_member(&mut self, name: &str) -> bool {
        self.slot_members.remove(name).is_some()
    }

    /// The agent's bootstrap failed at `now` (its attempt moved aside, its
    /// claim given back). Returns how long this node waits before it claims
    /// the bootstrap again; another node may claim it meanwhile.
    pub fn bootstrap_failed(&mut self, now: Millis) -> Duration {
        self.failed_bootstraps = self.failed_bootstraps.saturating_add(1);
        let doublings = (self.failed_bootstraps - 1).min(16);
        let wait = BOOTSTRAP_RETRY_FIRST
            .saturating_mul(1 << doublings)
            .min(BOOTSTRAP_RETRY_MAX);
        self.bootstrap_retry_at = Some(Millis(now.0 + wait.as_millis() as u64));
        wait
    }
}

fn decision(actions: Vec<Action>, note: impl Into<String>) -> Decision {
    Decision {
        actions,
        wake_at: None,
        note: note.into(),
    }
}

fn wait(note: impl Into<String>) -> Decision {
    decision(Vec::new(), note)
}

/// The heart of mainstay: see the module documentation.
pub fn decide(state: &mut CoreState, obs: &Observation<'_>) -> Decision {
    state.first_turn.get_or_insert(obs.now);
    let mut result = decide_inner(state, obs);
    // A writable primary must look again before its lease may lapse, even if
    // nothing else wakes the agent.
    if obs.pg.accepts_writes() {
        let deadline = obs.lease.valid_until;
        result.wake_at = Some(result.wake_at.map_or(deadline, |at| at.min(deadline)));
    }
    result
}

fn decide_inner(state: &mut CoreState, obs: &Observation<'_>) -> Decision {
    let pg = obs.pg;
    let Some(view) = obs.cluster else {
        return dcs_unreachable(obs);
    };
    if let Some(leader) = &view.leader {
        state.last_leader_revision = state.last_leader_revision.max(leader.mod_revision);
        state.no_leader_since = None;
    }
    // Every node remembers the members it sees, not only the leader: a
    // replica promoted after a member's key expired (that member killed a
    // moment before) still keeps a slot for it, so the member can stream
    // again when it comes back instead of waiting for a slot nobody makes.
    // A witness runs no PostgreSQL: a slot for it would keep WAL forever.
    let streaming_members = view
        .members
        .iter()
        .filter(|(name, m)| *name != obs.name && !m.status.witness);
    for (name, _) in streaming_members {
        state.slot_members.insert(name.clone(), obs.now);
    }

    // Bootstrap and registration come before any leadership question.
    let Some(init) = &view.initialize else {
        return match &pg.data {
            DataDir::Initialized { system_id, .. } => decision(
                vec![Action::RegisterExistingData {
                    system_id: system_id.clone(),
                }],
                "the DCS has no cluster record but local data exists: registering it",
            ),
            DataDir::Empty if view.leader.is_some() => {
                wait("a leader exists but the cluster record is missing: waiting")
            }
            // Others judge an abandoned bootstrap by the claimant's member
            // key, so it must be visible before the claim.
            DataDir::Empty if !view.members.contains_key(obs.name) => {
                wait("new cluster: publishing this member before claiming the bootstrap")
            }
            DataDir::Empty => match state.bootstrap_retry_at {
                Some(at) if obs.now < at => Decision {
                    actions: Vec::new(),
                    wake_at: Some(at),
                    // Stable while it waits, so that it is logged once.
                    note: format!(
                        "new cluster: the bootstrap failed here {} time(s) in a row; \
                         waiting before claiming it again",
                        state.failed_bootstraps
                    ),
                },
                _ => decision(
                    vec![Action::ClaimInitialize],
                    "new cluster: claiming the bootstrap",
                ),
            },
        };
    };
    let Some(cluster_system_id) = &init.system_id else {
        return bootstrap_in_progress(obs, view, &init.by);
    };
    state.failed_bootstraps = 0;
    state.bootstrap_retry_at = None;
    if let DataDir::Initialized { system_id, .. } = &pg.data
        && system_id != cluster_system_id
    {
        return decision(
            vec![Action::Fatal {
                reason: format!(
                    "the data directory belongs to PostgreSQL system {system_id} but cluster \
                     records system {cluster_system_id}: this node's data is from another \
                     cluster; move it aside to let this node clone, or fix the cluster name"
                ),
            }],
            "system identifier mismatch",
        );
    }

    let holds_key = |name: &str, lease: i64| name == obs.name && Some(lease) == obs.lease.id;
    match &view.leader {
        Some(leader) if holds_key(&leader.name, leader.lease_id) => {
            state.no_leader_since = None;
            let mut result = leader::lead(state, obs, view);
            let fencing = result
                .actions
                .iter()
                .any(|a| matches!(a, Action::Fence { .. }));
            if init.awaiting_first_leader && pg.accepts_writes() && !fencing {
                result.actions.push(Action::RecordFirstLeader {
                    initialize_revision: view.initialize_revision,
                });
            }
            result
        }
        Some(leader) if leader.name == obs.name => {
            state.primary_restart_at = None;
            if pg.accepts_writes() && crate::failsafe::confirmed(obs) {
                // etcd came back and this agent already holds a new lease,
                // but has not yet revoked the one that expired during the
                // outage: the key must move to the new lease, under the
                // same promise that lets a confirmed primary take back a key
                // that expired (see `leaderless`).
                return decision(
                    vec![
                        Action::ReleaseStaleLeader {
                            lease_id: leader.lease_id,
                        },
                        Action::AcquireLeader,
                    ],
                    "failsafe: the leader key is still on the lease that expired while every \
                     member confirmed this primary: moving it to the new lease",
                );
            }
            if pg.accepts_writes() {
                return decision(
                    vec![Action::Fence {
                        reason: "the leader key is on a lease this agent no longer holds".into(),
                    }],
                    "fencing: stale leadership",
                );
            }
            decision(
                vec![Action::ReleaseStaleLeader {
                    lease_id: leader.lease_id,
                }],
                "the leader key still names this node on an earlier lease: releasing it",
            )
        }
        Some(leader) => {
            state.primary_restart_at = None;
            replica::follow(state, obs, view, &leader.name)
        }
        None => {
            state.primary_restart_at = None;
            leaderless::leaderless(state, obs, view)
        }
    }
}

fn dcs_unreachable(obs: &Observation<'_>) -> Decision {
    if obs.pg.accepts_writes() && obs.now >= obs.lease.valid_until {
        return decision(
            vec![Action::Fence {
                reason: "the DCS is unreachable and the leader lease may have expired".into(),
            }],
            "fencing: lease deadline passed without a renewal",
        );
    }
    // Shown in /patroni and `ctl list`: with two data nodes, this is what a
    // replica says when the primary and the witness are both gone.
    wait(
        "etcd has no quorum here or does not answer: no change, and this node will not be \
         promoted until it does",
    )
}

fn bootstrap_in_progress(obs: &Observation<'_>, view: &ClusterView, by: &str) -> Decision {
    let pg = obs.pg;
    let leader_is_me = view
        .leader
        .as_ref()
        .is_some_and(|l| l.name == obs.name && Some(l.lease_id) == obs.lease.id);
    if by != obs.name {
        if !view.members.contains_key(by) && view.leader.is_none() {
            return decision(
                vec![Action::AbandonBootstrap {
                    initialize_revision: view.initialize_revision,
                }],
                format!("{by} started a bootstrap and vanished: releasing the claim"),
            );
        }
        return wait(format!("waiting for {by} to bootstrap the cluster"));
    }
    match (&pg.data, leader_is_me) {
        (DataDir::Empty, true) if obs.now < obs.lease.valid_until => {
            let mut actions = Vec::new();
            // As before a promotion: in synchronous mode the key must name
            // this leader (with no standby yet) before it acknowledges a
            // commit, or a replica without those commits could win an
            // ordinary election should this leader lose etcd.
            let record = view.sync.as_ref();
            let ours = record.is_some_and(|r| matches!(&r.state, Ok(s) if s.leader == obs.name));
            if obs.config.synchronous_mode && !ours {
                actions.push(Action::WriteSync {
                    members: Vec::new(),
                    expected_revision: record.map_or(0, |r| r.mod_revision),
                });
            }
            actions.push(Action::Bootstrap);
            decision(actions, "bootstrapping the cluster")
        }
        (DataDir::Empty, true) => wait("bootstrap waits for a lease renewal"),
        (DataDir::Empty, false) if view.leader.is_none() => decision(
            vec![Action::AcquireLeader],
            "taking leadership to bootstrap",
        ),
        (DataDir::Empty, false) => wait("bootstrap claimed but another node holds the leader key"),
        (DataDir::Initialized { system_id, .. }, true) if pg.accepts_writes() => decision(
            vec![Action::RecordSystemId {
                system_id: system_id.clone(),
                initialize_revision: view.initialize_revision,
            }],
            "bootstrap finished: recording the system identifier",
        ),
        (DataDir::Initialized { .. }, _) => {
            let mut actions = Vec::new();
            if pg.role != PgRole::Stopped {
                actions.push(Action::Fence {
                    reason: "an interrupted bootstrap is being retried".into(),
                });
            }
            actions.push(Action::MoveAside {
                reason: "interrupted bootstrap".into(),
            });
            decision(
                actions,
                "an earlier bootstrap of this node did not finish: moving it aside to retry",
            )
        }
    }
}
