//! What a turn asks the agent to do, in order, and why.

use crate::types::Millis;

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
    /// The first leader on registered data accepts writes: clear
    /// `awaiting_first_leader` in `initialize` if unchanged, so that any
    /// eligible member may take over from now on.
    RecordFirstLeader {
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

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Decision {
    pub actions: Vec<Action>,
    /// Call `decide` again no later than this, even if nothing happens.
    pub wake_at: Option<Millis>,
    /// Why, for the log.
    pub note: String,
}
