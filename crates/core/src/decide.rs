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

use crate::candidate::{self, Candidate};
use crate::dynamic::DynamicConfig;
use crate::switchover::{LeaderVerdict, judge};
pub use crate::sync::Standby;
use crate::types::{ClusterView, Lsn, Millis, PgRole, Tags};
use std::collections::BTreeMap;
use std::time::Duration;

/// The part of the configuration the decisions depend on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    pub ttl_ms: u64,
    pub loop_wait_ms: u64,
    /// How long a candidate waits for every other eligible member to publish a
    /// status taken after the leader vanished, before ignoring the silent ones.
    pub election_wait_ms: u64,
    /// A replica that cannot stream from a running leader for this long
    /// checks its WAL against the leader's history again, and is rewound if it
    /// diverged (e.g. it had replayed WAL of a timeline the leader never saw).
    pub stuck_replica_ms: u64,
}

/// The local data directory as the agent found it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DataDir {
    /// Missing or empty: may be bootstrapped or cloned into.
    Empty,
    Initialized {
        system_id: String,
        /// `pg_controldata` says the cluster last ran as a primary (state
        /// "in production" or "shut down"); such a node needs crash recovery
        /// before its WAL position can be compared with a leader's.
        was_primary: bool,
    },
}

/// The local PostgreSQL as probed at the start of this turn.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalPg {
    pub data: DataDir,
    /// `Stopped` whenever it does not answer queries.
    pub role: PgRole,
    pub timeline: u32,
    /// Primary: flush position. Replica: the furthest of received and replayed.
    pub lsn: Lsn,
    /// The leader named in this replica's `primary_conninfo`.
    pub following: Option<String>,
    /// The WAL receiver is connected and streaming.
    pub streaming: bool,
    /// `synchronous_standby_names` as the server reports it.
    pub sync_standby_names: String,
    /// A primary's standbys (`pg_stat_replication`).
    pub standbys: Vec<Standby>,
}

impl LocalPg {
    pub fn accepts_writes(&self) -> bool {
        self.role == PgRole::Primary
    }
}

/// This agent's lease, as its lease keeper last confirmed it.
pub use crate::lease::Lease;

#[derive(Clone, Debug)]
pub struct Observation<'a> {
    pub now: Millis,
    pub name: &'a str,
    pub tags: &'a Tags,
    pub settings: &'a Settings,
    pub pg: &'a LocalPg,
    /// `None` when the DCS could not be read this turn.
    pub cluster: Option<&'a ClusterView>,
    pub lease: Lease,
    /// The cluster-wide dynamic configuration (the last valid one read).
    pub config: &'a DynamicConfig,
    /// Wall-clock Unix seconds, only for scheduled switchovers.
    pub wall_secs: u64,
    /// Failsafe mode: the last leader that asked this node over the REST API
    /// to confirm it while the DCS was unreachable, and when.
    pub failsafe_contact: Option<(&'a str, Millis)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// The DCS lost its keys but this node has data: record its system
    /// identifier (create-if-absent) instead of ever re-initializing.
    RegisterExistingData {
        system_id: String,
    },
    /// Claim the right to bootstrap (create-if-absent, no system id yet).
    ClaimInitialize,
    /// Someone's bootstrap was abandoned: delete `initialize` if unchanged.
    AbandonBootstrap {
        initialize_revision: i64,
    },
    /// initdb, start as primary, create roles. Requires the leader key.
    Bootstrap,
    /// Write the system identifier into `initialize` once bootstrap worked.
    RecordSystemId {
        system_id: String,
        initialize_revision: i64,
    },
    /// Rename the data directory out of the way (never delete).
    MoveAside {
        reason: String,
    },
    /// Create-if-absent transaction on the leader key with this node's lease.
    AcquireLeader,
    /// Delete the leader key if it still holds this node's name and lease.
    ReleaseLeader {
        reason: String,
    },
    /// Delete a leader key that names this node but sits on a lease of an
    /// earlier session (the agent restarted before that lease expired).
    ReleaseStaleLeader {
        lease_id: i64,
    },
    StartPrimary,
    StartReplica {
        leader: Option<String>,
    },
    /// Make a stopped node follow `leader`: finish crash recovery if it was a
    /// primary, compare histories and WAL positions, pg_rewind if it diverged
    /// (re-clone after moving the directory aside if rewind fails), then
    /// start as a replica.
    Rejoin {
        leader: String,
    },
    /// Clone from `leader` into the empty data directory, start as replica.
    BaseBackup {
        leader: String,
    },
    /// Promote the local replica (the leader key is already ours); `reason`
    /// goes into the timeline history ("failover", "switchover").
    Promote {
        reason: String,
    },
    /// Planned handover to `candidate`: stop writes with a clean shutdown,
    /// wait until the candidate has received everything, then move the
    /// leader key to its lease in one transaction. If any step fails the
    /// key stays here and the next turn restarts the primary.
    Switchover {
        candidate: String,
        failover_revision: i64,
    },
    /// Write the `sync` key (this leader, `members`) if its revision is still
    /// `expected_revision` and this node holds the leader key.
    WriteSync {
        members: Vec<String>,
        expected_revision: i64,
    },
    /// Write the `failsafe` key (the members this leader relies on) if its
    /// revision is still `expected_revision` and this node holds the leader
    /// key.
    WriteFailsafe {
        state: crate::types::FailsafeState,
        expected_revision: i64,
    },
    /// Set `synchronous_standby_names` to `ANY n (names)` (empty: none;
    /// `block`: '*', every commit waits for some standby) and reload.
    SetSyncStandbys {
        names: Vec<String>,
        block: bool,
    },
    /// Delete the `failover` key (done, refused or unreadable), if unchanged.
    ClearFailover {
        failover_revision: i64,
        reason: String,
    },
    /// Re-point a running replica at `leader` by reload, no restart, after
    /// the same divergence check as `Rejoin` (which it falls back to).
    Follow {
        leader: String,
    },
    /// Stop accepting writes now: immediate shutdown, no checkpoint.
    Fence {
        reason: String,
    },
    /// Keep one physical slot per other member, drop the rest of ours.
    SyncSlots {
        members: Vec<String>,
    },
    /// Stop the agent: continuing could damage data.
    Fatal {
        reason: String,
    },
}

impl Action {
    /// Actions that only maintain a steady state do not call for another turn.
    pub fn changes_state(&self) -> bool {
        !matches!(self, Action::SyncSlots { .. })
    }
}

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

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Decision {
    pub actions: Vec<Action>,
    /// Call `decide` again no later than this, even if nothing happens.
    pub wake_at: Option<Millis>,
    /// Why, for the log.
    pub note: String,
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
    for name in view.members.keys().filter(|m| *m != obs.name) {
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
            lead(state, obs, view)
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
            follow(state, obs, view, &leader.name)
        }
        None => {
            state.primary_restart_at = None;
            leaderless(state, obs, view)
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
    wait("the DCS is unreachable: no change")
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

fn lead(state: &mut CoreState, obs: &Observation<'_>, view: &ClusterView) -> Decision {
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
                    "the primary is down: restarting it (crash recovery)",
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
/// restarts keeps its slot (and the WAL it still needs).
fn slot_members(state: &mut CoreState, obs: &Observation<'_>) -> Vec<String> {
    let retention = obs.config.member_slots_ttl.saturating_mul(1000);
    state
        .slot_members
        .retain(|name, seen| name != obs.name && obs.now < seen.plus(retention));
    state.slot_members.keys().cloned().collect()
}

fn follow(
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

fn leaderless(state: &mut CoreState, obs: &Observation<'_>, view: &ClusterView) -> Decision {
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

#[cfg(test)]
mod tests {
    //! One observation in, the exact actions out.
    use super::*;
    use crate::types::{InitializeRecord, LeaderRecord, MemberRecord};

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
            config: &DynamicConfig::default(),
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
                retained,
                &primary,
                Some(&without_b),
                retained + 3000
            ))
            .is_empty()
        );
    }

    #[test]
    fn a_replica_that_cannot_stream_checks_for_divergence_and_the_timer_restarts_with_a_new_leader()
    {
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
}
