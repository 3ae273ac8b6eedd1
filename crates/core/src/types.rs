//! Data shared by every part of mainstay: WAL positions, member status as
//! published in the DCS, the cluster view read back from it.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

pub use crate::tags::{TagValue, Tags};

/// A PostgreSQL WAL position (`pg_lsn`), as a plain byte offset.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Lsn(pub u64);

impl Lsn {
    /// Parses PostgreSQL's `X/Y` text form.
    pub fn parse(text: &str) -> Option<Lsn> {
        let (hi, lo) = text.trim().split_once('/')?;
        let hi = u64::from_str_radix(hi, 16).ok()?;
        let lo = u64::from_str_radix(lo, 16).ok()?;
        if hi > u32::MAX as u64 || lo > u32::MAX as u64 {
            return None;
        }
        Some(Lsn((hi << 32) | lo))
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

/// Monotonic time in milliseconds since an arbitrary origin. The agent derives
/// it from tokio's clock, the simulator from its fake clock.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Millis(pub u64);

impl Millis {
    pub fn plus(self, ms: u64) -> Millis {
        Millis(self.0.saturating_add(ms))
    }
    pub fn since(self, earlier: Millis) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

/// What a node's PostgreSQL is doing, as its agent reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PgRole {
    Primary,
    Replica,
    /// Not running (stopped, crashed, starting, being cloned...).
    Stopped,
}

/// The status one agent publishes in `members/<node>`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MemberStatus {
    pub name: String,
    pub role: PgRole,
    /// Free text for humans: "running", "starting", "cloning", "rewinding"...
    pub state: String,
    pub api_url: String,
    /// Where other nodes and clients reach this node's PostgreSQL.
    pub pg_host: String,
    pub pg_port: u16,
    pub timeline: u32,
    /// Primary: current write/flush position. Replica: last received position.
    pub received_lsn: Lsn,
    pub replayed_lsn: Lsn,
    pub flush_lsn: Lsn,
    /// The leader this replica streams from, when it is streaming.
    pub following: Option<String>,
    pub streaming: bool,
    pub tags: Tags,
    pub version: String,
    /// Revision of the DCS view the agent read just before observing its
    /// PostgreSQL for this status, and whether that view had a leader. A status
    /// read without a leader after the last leader was seen is final for the
    /// election: the old primary had fenced itself before its key vanished.
    pub view_revision: i64,
    pub view_had_leader: bool,
    /// The virtual IP this node holds now ("10.0.0.50/24"), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vip: Option<String>,
    /// Something an operator must fix on this node (e.g. PostgreSQL runs on
    /// fallback parameters), shown by `/cluster` and `ctl list`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
    /// This node's supervised services and the state of each ("running",
    /// "failed"...), by name; empty when it runs none.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub services: BTreeMap<String, String>,
    /// This node's replicated directories and where each stands
    /// ("source", "in sync", "2 failed", "error"), by path.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub files: BTreeMap<String, String>,
    /// What the node alerts its operators to (a replica's lag, its disk),
    /// in words.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub alerts: Vec<String>,
    /// A witness (`mainstay witness`): an etcd member's node with no
    /// PostgreSQL. It never leads (it is also tagged `nofailover`), gets no
    /// replication slot and is not asked to confirm a leader in failsafe
    /// mode: only nodes that could take over are.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub witness: bool,
    /// Parameters the server keeps at their old values until a restart.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending_restart: Vec<PendingRestart>,
    /// The newest timeline this node's data holds, also while PostgreSQL
    /// is stopped (`timeline` is then 0): what a first leader on
    /// registered data compares with (`decide::leaderless`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub data_timeline: u32,
    /// The operator's own tags (`[tags] dc = "one"`).
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "crate::tags::lenient"
    )]
    pub custom_tags: BTreeMap<String, TagValue>,
}

impl MemberRecord {
    /// A running member on 127.0.0.1:5432 at `lsn` on timeline 1, streaming
    /// from `following` when it is a replica: a fixture for tests of code
    /// that reads cluster views.
    pub fn example(name: &str, role: PgRole, lsn: u64, following: Option<&str>) -> MemberRecord {
        MemberRecord {
            status: MemberStatus {
                name: name.into(),
                role,
                state: "running".into(),
                api_url: String::new(),
                pg_host: "127.0.0.1".into(),
                pg_port: 5432,
                timeline: 1,
                received_lsn: Lsn(lsn),
                replayed_lsn: Lsn(lsn),
                flush_lsn: Lsn(lsn),
                following: following.map(Into::into),
                streaming: role == PgRole::Replica,
                tags: Tags::default(),
                version: String::new(),
                view_revision: 1,
                view_had_leader: true,
                vip: None,
                warning: None,
                services: Default::default(),
                files: Default::default(),
                alerts: Vec::new(),
                witness: false,
                pending_restart: Vec::new(),
                data_timeline: 1,
                custom_tags: BTreeMap::new(),
            },
            mod_revision: 1,
            lease_id: 1,
        }
    }
}

/// Content of the `initialize` key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitializeRecord {
    /// `None` while the bootstrap is in progress.
    pub system_id: Option<String>,
    pub by: String,
    /// Wall-clock time as an RFC 3339 string, for humans only.
    pub at: String,
    /// The record was made from data that existed before mainstay's keys
    /// did (etcd's data was lost, or another manager such as Patroni ran
    /// the cluster), and no node has led on it yet. Until one has, only a
    /// node whose own data last ran as the primary may take the leader
    /// key: a standby's data may lack commits that primary acknowledged,
    /// and it cannot know whether that primary still runs. Cleared by the
    /// first leader once its primary accepts writes.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub awaiting_first_leader: bool,
}

/// One timeline switch recorded in `history`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// The new timeline after the switch.
    pub timeline: u32,
    /// Where the previous timeline ended.
    pub switch_lsn: Lsn,
    pub reason: String,
    pub new_leader: String,
    pub at: String,
}

/// One `mainstay ctl recover-alone`, recorded in `recoveries` by the node
/// that forced it once its etcd member was re-formed alone: the cluster's
/// record of who overrode the quorum, and when.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryRecord {
    /// The node whose etcd member became the only one.
    pub node: String,
    /// Who asked, as the request said (user@host).
    pub by: String,
    /// Where the request came from (the API client's address).
    pub from: String,
    /// The etcd members it removed (names, or ids of unstarted ones).
    pub removed: Vec<String>,
    /// Wall-clock time as an RFC 3339 string.
    pub at: String,
}

/// The leader key as read from the DCS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaderRecord {
    pub name: String,
    pub lease_id: i64,
    pub mod_revision: i64,
}

/// A member key as read from the DCS, with the revision that wrote it.
#[derive(Clone, Debug, PartialEq)]
pub struct MemberRecord {
    pub status: MemberStatus,
    pub mod_revision: i64,
    /// The member's own lease: a switchover puts the leader key on it.
    pub lease_id: i64,
}

/// Content of the `sync` key: the standbys that hold every commit the
/// leader acknowledged, because PostgreSQL waits for all of them
/// (`synchronous_standby_names = 'ANY k (...)'` over exactly these k names,
/// or a superset while one is being added). Written only by the leader.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncState {
    pub leader: String,
    pub members: Vec<String>,
}

/// Content of the `failsafe` key: the members a leader in failsafe mode
/// relies on (name to REST API URL), itself included. When etcd is gone it
/// asks exactly these to confirm it, and while the key stands no node outside
/// it may take the leader key: a member that (re)joined after the list was
/// written was never asked, so its silence promises nothing. Written only by
/// the leader; not on a lease, since it matters most once leases expire.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailsafeState {
    pub leader: String,
    pub members: BTreeMap<String, String>,
}

/// The `failsafe` key as read; unreadable content is kept as an error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FailsafeRecord {
    pub state: Result<FailsafeState, String>,
    pub mod_revision: i64,
}

/// The `sync` key as read; unreadable content means "nobody is known to be
/// synchronous", the safe reading.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncRecord {
    pub state: Result<SyncState, String>,
    pub mod_revision: i64,
}

impl SyncRecord {
    /// Members guaranteed to hold every commit `leader` acknowledged.
    pub fn members_for(&self, leader: &str) -> &[String] {
        match &self.state {
            Ok(state) if state.leader == leader => &state.members,
            _ => &[],
        }
    }
}

/// Whether the current leader must agree (switchover) or not (failover).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailoverKind {
    /// Planned: the leader checks the candidate, stops writes, waits until
    /// the candidate has everything and hands the leader key over.
    Switchover,
    /// Manual: an operator names the node to promote, e.g. when there is no
    /// healthy leader. With a healthy leader it runs as a switchover.
    Failover,
}

/// Content of the `failover` key: a pending switchover or manual failover.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailoverRequest {
    pub kind: FailoverKind,
    /// The node that must be leader when the request runs (switchover).
    #[serde(default)]
    pub leader: Option<String>,
    /// The node to promote; `None`: the best eligible replica.
    #[serde(default)]
    pub candidate: Option<String>,
    /// Unix time (seconds) at which to run; `None`: at once.
    #[serde(default)]
    pub scheduled_at: Option<u64>,
    /// Unix time of the request, for humans.
    #[serde(default)]
    pub requested_at: u64,
}

/// The `failover` key as read: a request, or why it cannot be read (someone
/// wrote it by hand); the leader deletes an unreadable one with the reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FailoverRecord {
    pub request: Result<FailoverRequest, String>,
    pub mod_revision: i64,
}

/// Everything under `/mainstay/<cluster>/` at one etcd revision.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClusterView {
    /// The etcd revision at which this view was read.
    pub revision: i64,
    pub initialize: Option<InitializeRecord>,
    pub initialize_revision: i64,
    pub leader: Option<LeaderRecord>,
    pub members: BTreeMap<String, MemberRecord>,
    pub history: Vec<HistoryEntry>,
    /// Every `recover-alone` so far, oldest first.
    pub recoveries: Vec<RecoveryRecord>,
    pub failover: Option<FailoverRecord>,
    pub sync: Option<SyncRecord>,
    pub failsafe: Option<FailsafeRecord>,
    /// The `config` key (dynamic configuration) as stored, unvalidated:
    /// agents keep their last valid configuration when it does not parse.
    pub config: Option<serde_json::Value>,
    pub config_revision: i64,
}

impl ClusterView {
    pub fn leader_name(&self) -> Option<&str> {
        self.leader.as_ref().map(|l| l.name.as_str())
    }
    pub fn leader_status(&self) -> Option<&MemberStatus> {
        let name = self.leader_name()?;
        self.members.get(name).map(|m| &m.status)
    }
}

/// Physical replication slot name for a member: lower case, `[a-z0-9_]`.
pub fn slot_name(member: &str) -> String {
    let cleaned: String = member
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("mainstay_{cleaned}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_round_trips() {
        for text in ["0/0", "0/3000148", "1A/FF", "FFFFFFFF/FFFFFFFF"] {
            let lsn = Lsn::parse(text).unwrap();
            assert_eq!(lsn.to_string(), text);
        }
        assert_eq!(Lsn::parse("0/3000148").unwrap().0, 0x3000148);
        assert_eq!(Lsn::parse("1/0").unwrap().0, 1 << 32);
        for bad in ["", "0", "x/1", "1/", "100000000/0"] {
            assert_eq!(Lsn::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn slot_names_are_valid_identifiers() {
        assert_eq!(slot_name("node-1"), "mainstay_node_1");
        assert_eq!(slot_name("Ship.A"), "mainstay_ship_a");
    }
}

/// A parameter the running server keeps at its old value until a restart.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingRestart {
    pub name: String,
    /// What the server runs with, as `SHOW` says it (`128MB`, `100`).
    pub old_value: String,
    /// What the configuration asks for; `None` when the change came from
    /// elsewhere (a value removed, a file edited by hand).
    #[serde(default)]
    pub new_value: Option<String>,
}

fn is_zero(value: &u32) -> bool {
    *value == 0
}
