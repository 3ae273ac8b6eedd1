//! The distributed configuration store (DCS) as mainstay sees it: a handful
//! of keys under `/mainstay/<cluster>/`, leases, conditional writes and a
//! watch. [`Dcs`] is the contract; [`EtcdDcs`] is the only code in mainstay
//! that talks to etcd, and [`MemoryDcs`] is a faithful in-process stand-in
//! for tests of the agent.
//!
//! Keys, relative to the cluster prefix:
//!
//! | key | value | lifetime |
//! |---|---|---|
//! | `initialize` | JSON [`InitializeRecord`] | created once, create-if-absent |
//! | `leader` | the leader's node name | on the leader's lease |
//! | `members/<node>` | JSON [`MemberStatus`] | on the node's lease |
//! | `history` | JSON array of [`HistoryEntry`] | permanent, CAS on mod revision |
//! | `config` | JSON object | permanent, CAS on mod revision |
//! | `failover` | JSON switchover/failover request | until handled |
//! | `sync` | JSON [`mainstay_core::SyncState`] | permanent, leader only |
//! | `failsafe` | JSON [`mainstay_core::FailsafeState`] | permanent, leader only |
//! | `recoveries` | JSON array of [`mainstay_core::RecoveryRecord`] | permanent, CAS on mod revision |
//!
//! Leadership writes are transactions conditioned on the leader key's
//! current state, so two nodes can never both believe a write made them
//! leader.

#![forbid(unsafe_code)]

mod etcd;
mod memory;

pub use etcd::{EtcdDcs, EtcdSettings, EtcdTls};
pub use memory::MemoryDcs;

use mainstay_core::{ClusterView, HistoryEntry, InitializeRecord, MemberStatus};
use std::future::Future;
use tokio::sync::mpsc;

pub type Result<T, E = DcsError> = std::result::Result<T, E>;

/// Why a DCS call failed. `Unreachable` and `Timeout` mean "nothing is
/// known about the outcome"; a write that timed out may still have applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DcsError {
    /// No etcd member answered, or the one that did has no leader.
    #[error("etcd is unreachable: {0}")]
    Unreachable(String),
    /// No answer within the request timeout.
    #[error("etcd did not answer within the request timeout")]
    Timeout,
    /// The request was refused because the state it depends on changed or is
    /// gone, e.g. the lease has expired.
    #[error("conflict: {0}")]
    Conflict(String),
    /// A key holds a value mainstay cannot read. Someone else wrote it, or a
    /// newer mainstay with an incompatible format.
    #[error("key {key} holds an unreadable value: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("{0}")]
    Other(String),
}

/// Something changed under the cluster prefix. Events are hints to look
/// again (`read_cluster`); they carry no values on purpose, so that the
/// reader always acts on one consistent view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    Changed {
        key: KeyKind,
        deleted: bool,
        /// The etcd revision of the change.
        revision: i64,
    },
    /// The watch broke (no etcd leader, connection lost, etcd silent). No
    /// further events follow on this channel: the caller re-opens the watch
    /// and reads the cluster again, since changes may have been missed.
    Error(String),
}

/// Which key an event is about.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum KeyKind {
    Initialize,
    Leader,
    Member(String),
    History,
    Config,
    Failover,
    Sync,
    Failsafe,
    Recoveries,
    /// A key this version of mainstay does not use.
    Other,
}

impl KeyKind {
    /// Classifies a key given relative to the cluster prefix.
    pub fn from_relative(key: &str) -> KeyKind {
        match key {
            keys::INITIALIZE => KeyKind::Initialize,
            keys::LEADER => KeyKind::Leader,
            keys::HISTORY => KeyKind::History,
            keys::CONFIG => KeyKind::Config,
            keys::FAILOVER => KeyKind::Failover,
            keys::SYNC => KeyKind::Sync,
            keys::FAILSAFE => KeyKind::Failsafe,
            keys::RECOVERIES => KeyKind::Recoveries,
            _ => match key.strip_prefix(keys::MEMBERS) {
                Some(name) if !name.is_empty() => KeyKind::Member(name.to_string()),
                _ => KeyKind::Other,
            },
        }
    }
}

/// The `config` key with the revision a conditional write must name.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigValue {
    pub value: serde_json::Value,
    pub mod_revision: i64,
}

/// Key names relative to `/mainstay/<cluster>/`.
pub mod keys {
    pub const INITIALIZE: &str = "initialize";
    pub const LEADER: &str = "leader";
    pub const MEMBERS: &str = "members/";
    pub const HISTORY: &str = "history";
    pub const CONFIG: &str = "config";
    pub const FAILOVER: &str = "failover";
    pub const SYNC: &str = "sync";
    pub const FAILSAFE: &str = "failsafe";
    pub const RECOVERIES: &str = "recoveries";

    pub fn member(name: &str) -> String {
        format!("{MEMBERS}{name}")
    }
}

/// Everything mainstay asks of its DCS. Every call is bounded by the
/// implementation's request timeout; none panics on bad data or a dead
/// server.
///
/// Revisions are etcd revisions. An `expected_mod_revision` of 0 means "the
/// key must not exist", as in etcd.
pub trait Dcs: Send + Sync + 'static {
    /// Grants a lease of `ttl_secs` and returns its id. etcd raises TTLs
    /// below its minimum (1.5 × election timeout, rounded up) silently.
    fn grant_lease(&self, ttl_secs: i64) -> impl Future<Output = Result<i64>> + Send;

    /// Renews the lease to its full TTL. Returns the TTL in seconds, or 0 if
    /// the lease no longer exists (expired or revoked).
    fn keep_alive(&self, lease: i64) -> impl Future<Output = Result<i64>> + Send;

    /// Revokes the lease, deleting every key on it. Revoking a lease that
    /// no longer exists succeeds.
    fn revoke_lease(&self, lease: i64) -> impl Future<Output = Result<()>> + Send;

    /// Reads every key of the cluster at one revision. A member key that
    /// does not parse is skipped with a warning; an unreadable `initialize`
    /// or `history` is a [`DcsError::Corrupt`].
    fn read_cluster(&self) -> impl Future<Output = Result<ClusterView>> + Send;

    /// Writes `members/<status.name>` on `lease`. Fails with
    /// [`DcsError::Conflict`] if the lease no longer exists.
    fn put_member(
        &self,
        status: &MemberStatus,
        lease: i64,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Creates the leader key with value `name` on `lease` if nobody holds
    /// it. Returns false if the key exists (whoever holds it).
    fn acquire_leader(&self, name: &str, lease: i64) -> impl Future<Output = Result<bool>> + Send;

    /// Deletes the leader key if it holds `name` on `lease`.
    fn release_leader(&self, name: &str, lease: i64) -> impl Future<Output = Result<bool>> + Send;

    /// Whether the leader key holds `name` on `lease`: the check after a
    /// successful keep-alive that leadership was really renewed.
    fn leader_held_by(&self, name: &str, lease: i64) -> impl Future<Output = Result<bool>> + Send;

    /// Moves the leader key from `from` on `lease_from` to `to` on
    /// `lease_to` in one transaction (switchover).
    fn hand_over_leader(
        &self,
        from: &str,
        lease_from: i64,
        to: &str,
        lease_to: i64,
    ) -> impl Future<Output = Result<bool>> + Send;

    /// Writes `initialize` if it does not exist.
    fn create_initialize(
        &self,
        record: &InitializeRecord,
    ) -> impl Future<Output = Result<bool>> + Send;

    /// Overwrites `initialize` if its mod revision is still the expected one.
    fn update_initialize(
        &self,
        record: &InitializeRecord,
        expected_mod_revision: i64,
    ) -> impl Future<Output = Result<bool>> + Send;

    /// Deletes `initialize` if its mod revision is still the expected one
    /// (e.g. to retry a bootstrap that failed).
    fn delete_initialize(
        &self,
        expected_mod_revision: i64,
    ) -> impl Future<Output = Result<bool>> + Send;

    /// Appends to `history` with a compare-and-swap, retrying a few times
    /// if another writer got in between. With `holder`, the write happens
    /// only while the leader key holds that name and lease (otherwise
    /// [`DcsError::Conflict`]): a fenced former leader must not record a
    /// timeline after the next leader recorded the same number.
    fn append_history(
        &self,
        entry: &HistoryEntry,
        holder: Option<(&str, i64)>,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Appends to `recoveries` with a compare-and-swap, retrying a few
    /// times if another writer got in between.
    fn append_recovery(
        &self,
        record: &mainstay_core::RecoveryRecord,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Reads `config`; `None` if it has never been written.
    fn read_config(&self) -> impl Future<Output = Result<Option<ConfigValue>>> + Send;

    /// Writes `config` if its mod revision is still the expected one (0:
    /// only if absent).
    fn write_config(
        &self,
        value: &serde_json::Value,
        expected_mod_revision: i64,
    ) -> impl Future<Output = Result<bool>> + Send;

    /// Writes `failover` if its mod revision is still the expected one (0:
    /// only if no request is pending).
    fn put_failover(
        &self,
        request: &mainstay_core::FailoverRequest,
        expected_mod_revision: i64,
    ) -> impl Future<Output = Result<bool>> + Send;

    /// Deletes `failover` if its mod revision is still the expected one.
    fn delete_failover(
        &self,
        expected_mod_revision: i64,
    ) -> impl Future<Output = Result<bool>> + Send;

    /// Writes `sync` if its mod revision is still the expected one (0: only
    /// if absent) and the leader key holds `holder` (name, lease).
    fn write_sync(
        &self,
        state: &mainstay_core::SyncState,
        expected_mod_revision: i64,
        holder: (&str, i64),
    ) -> impl Future<Output = Result<bool>> + Send;

    /// Writes `failsafe` if its mod revision is still the expected one (0:
    /// only if absent) and the leader key holds `holder` (name, lease).
    fn write_failsafe(
        &self,
        state: &mainstay_core::FailsafeState,
        expected_mod_revision: i64,
        holder: (&str, i64),
    ) -> impl Future<Output = Result<bool>> + Send;

    /// Deletes `members/<name>` (`ctl remove`): the member's agent must be
    /// gone, or it writes the key again on its next turn.
    fn delete_member(&self, name: &str) -> impl Future<Output = Result<()>> + Send;

    /// Watches every key of the cluster from now on. Open the watch
    /// *before* reading the cluster so that no change falls between the
    /// two. The channel ends after a [`WatchEvent::Error`], or when the
    /// receiver is dropped.
    fn watch(&self) -> impl Future<Output = Result<mpsc::Receiver<WatchEvent>>> + Send;

    /// If the DCS's own leader runs on this host (one of `local`, the
    /// host's addresses), hands that role to a member elsewhere and returns
    /// its name. etcd extends every lease by a full TTL when it elects a
    /// new leader, so a host holding both the etcd leader and the primary
    /// would, by dying, make the failover wait two lease lifetimes.
    fn keep_leader_away(
        &self,
        local: &[std::net::IpAddr],
    ) -> impl Future<Output = Result<Option<String>>> + Send;

    /// The DCS's own members (etcd's membership), each with whether it
    /// answers.
    fn dcs_members(&self) -> impl Future<Output = Result<Vec<DcsMember>>> + Send;

    /// Lets a new member in at `peer_url` (it takes its name when it
    /// starts); returns the membership with it.
    fn add_dcs_member(&self, peer_url: &str)
    -> impl Future<Output = Result<Vec<DcsMember>>> + Send;

    /// Removes the member of that name (or id, or peer URL while it has
    /// not started).
    fn remove_dcs_member(&self, name: &str) -> impl Future<Output = Result<()>> + Send;

    /// What the DCS member at `client_url` alone believes its cluster is;
    /// it answers without a quorum.
    fn dcs_view_at(&self, client_url: &str) -> impl Future<Output = Result<EndpointView>> + Send;

    /// Whether the DCS member at `client_url` answers a status request.
    fn dcs_answers_at(&self, client_url: &str) -> impl Future<Output = bool> + Send;
}

/// One member of the DCS itself (an etcd member), as
/// `mainstay ctl etcd-member list` shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DcsMember {
    /// etcd's member id in hex, as etcdctl writes it.
    pub id: String,
    /// Empty until a member added with `add_dcs_member` starts.
    pub name: String,
    pub peer_urls: Vec<String>,
    pub client_urls: Vec<String>,
    /// The raft leader of the DCS (not the database's leader).
    pub leader: bool,
    pub learner: bool,
    /// Whether it answered a status request within the request timeout;
    /// `None` before it started (no client URL yet).
    pub answers: Option<bool>,
}

/// One member's own view of its cluster.
#[derive(Clone, Debug, PartialEq)]
pub struct EndpointView {
    /// etcd's cluster id: the same on every member of one cluster, also
    /// after a `--force-new-cluster`.
    pub cluster_id: u64,
    /// The id of the member that answered.
    pub member_id: u64,
    /// The raft leader it follows; 0 without one (no quorum).
    pub leader: u64,
    /// The membership it believes in, `answers` unknown (`None`).
    pub members: Vec<DcsMember>,
}

/// Capacity of a watch channel. Events are only hints, so a reader that
/// falls this far behind loses nothing by being told to start over.
const WATCH_CHANNEL: usize = 256;

/// How many times `append_history` retries a compare-and-swap that lost.
const HISTORY_ATTEMPTS: usize = 5;

/// Names end up in keys; a `/` would make a member look like a nested key.
fn check_name(what: &str, name: &str) -> Result<()> {
    if name.is_empty() || name.contains('/') {
        return Err(DcsError::Other(format!(
            "{what} name {name:?} is empty or contains '/'"
        )));
    }
    Ok(())
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|e| DcsError::Other(format!("cannot encode JSON: {e}")))
}

fn corrupt(key: &str, reason: impl ToString) -> DcsError {
    DcsError::Corrupt {
        key: key.to_string(),
        reason: reason.to_string(),
    }
}

fn not_leader(name: &str) -> DcsError {
    DcsError::Conflict(format!(
        "the leader key no longer holds {name} on this lease: only the leader records history"
    ))
}

fn parse_history(full_key: &str, value: &[u8]) -> Result<Vec<HistoryEntry>> {
    serde_json::from_slice(value).map_err(|e| corrupt(full_key, e))
}

/// One key as read, relative to the prefix.
struct RawKey<'a> {
    key: &'a str,
    value: &'a [u8],
    mod_revision: i64,
    lease: i64,
}

/// Builds a [`ClusterView`] out of every key under `prefix`. Shared by both
/// implementations so they parse identically; `prefix` only names keys in
/// errors and warnings.
fn build_view<'a>(
    prefix: &str,
    revision: i64,
    raw: impl IntoIterator<Item = RawKey<'a>>,
) -> Result<ClusterView> {
    let mut view = ClusterView {
        revision,
        ..ClusterView::default()
    };
    for kv in raw {
        let full_key = || format!("{prefix}{}", kv.key);
        match KeyKind::from_relative(kv.key) {
            KeyKind::Initialize => {
                view.initialize =
                    Some(serde_json::from_slice(kv.value).map_err(|e| corrupt(&full_key(), e))?);
                view.initialize_revision = kv.mod_revision;
            }
            KeyKind::Leader => {
                let name = std::str::from_utf8(kv.value).map_err(|e| corrupt(&full_key(), e))?;
                view.leader = Some(mainstay_core::LeaderRecord {
                    name: name.to_string(),
                    lease_id: kv.lease,
                    mod_revision: kv.mod_revision,
                });
            }
            KeyKind::Member(name) => match serde_json::from_slice::<MemberStatus>(kv.value) {
                Ok(status) => {
                    view.members.insert(
                        name,
                        mainstay_core::MemberRecord {
                            status,
                            mod_revision: kv.mod_revision,
                            lease_id: kv.lease,
                        },
                    );
                }
                // One bad member must not blind every agent to the others.
                Err(e) => {
                    tracing::warn!(key = %full_key(), error = %e, "skipping unreadable member key")
                }
            },
            KeyKind::History => view.history = parse_history(&full_key(), kv.value)?,
            // A record for people: one written badly by hand must not
            // blind the agent.
            KeyKind::Recoveries => match serde_json::from_slice(kv.value) {
                Ok(records) => view.recoveries = records,
                Err(e) => {
                    tracing::warn!(key = %full_key(), error = %e, "skipping an unreadable recoveries key")
                }
            },
            KeyKind::Config => {
                // Validation is the agent's: a bad value must not blind it.
                view.config = serde_json::from_slice(kv.value)
                    .ok()
                    .or(Some(serde_json::Value::Null));
                view.config_revision = kv.mod_revision;
            }
            KeyKind::Failover => {
                view.failover = Some(mainstay_core::FailoverRecord {
                    request: serde_json::from_slice(kv.value)
                        .map_err(|e| format!("{}: {e}", full_key())),
                    mod_revision: kv.mod_revision,
                });
            }
            KeyKind::Sync => {
                view.sync = Some(mainstay_core::SyncRecord {
                    state: serde_json::from_slice(kv.value)
                        .map_err(|e| format!("{}: {e}", full_key())),
                    mod_revision: kv.mod_revision,
                });
            }
            KeyKind::Failsafe => {
                view.failsafe = Some(mainstay_core::FailsafeRecord {
                    state: serde_json::from_slice(kv.value)
                        .map_err(|e| format!("{}: {e}", full_key())),
                    mod_revision: kv.mod_revision,
                });
            }
            KeyKind::Other => {}
        }
    }
    Ok(view)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_kinds() {
        assert_eq!(KeyKind::from_relative("leader"), KeyKind::Leader);
        assert_eq!(
            KeyKind::from_relative("members/a"),
            KeyKind::Member("a".into())
        );
        assert_eq!(KeyKind::from_relative("members/"), KeyKind::Other);
        assert_eq!(KeyKind::from_relative("sync"), KeyKind::Sync);
        assert_eq!(KeyKind::from_relative("failsafe"), KeyKind::Failsafe);
        assert_eq!(KeyKind::from_relative("failover"), KeyKind::Failover);
        assert_eq!(KeyKind::from_relative("optime"), KeyKind::Other);
        assert_eq!(KeyKind::from_relative("initialize"), KeyKind::Initialize);
    }

    #[test]
    fn errors_read_well() {
        let e = DcsError::Corrupt {
            key: "/mainstay/c/initialize".into(),
            reason: "expected value at line 1 column 1".into(),
        };
        assert_eq!(
            e.to_string(),
            "key /mainstay/c/initialize holds an unreadable value: expected value at line 1 column 1"
        );
    }
}
