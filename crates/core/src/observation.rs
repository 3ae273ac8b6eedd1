//! What one turn of the HA loop sees: the settings the decisions depend on,
//! the local PostgreSQL as probed, this agent's lease, and the cluster as the
//! DCS holds it. Plain data, shared by every decision module.

use crate::dynamic::DynamicConfig;
use crate::types::{ClusterView, Lsn, Millis, PgRole, Tags};

/// One standby as the primary sees it in `pg_stat_replication`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Standby {
    /// Its `application_name`: the member's name.
    pub name: String,
    pub flush: Lsn,
    /// "sync", "quorum", "potential", "async".
    pub sync_state: String,
    pub streaming: bool,
}

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
        /// The newest timeline this data holds: `pg_controldata`'s, or a
        /// later one whose history file is in pg_wal (a promotion writes it
        /// before the first checkpoint on that timeline).
        timeline: u32,
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
