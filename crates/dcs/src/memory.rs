//! [`Dcs`] held in memory, for tests of the agent: the same keys,
//! revisions, transactions, leases and watch events as etcd, with leases
//! running on tokio's clock so that tests with paused time expire them
//! instantly and deterministically.
//!
//! Each handle has a fault switch ([`MemoryDcs::set_unreachable`]); handles
//! made with [`MemoryDcs::client`] share the store but not the switch, like
//! several nodes connected to one etcd.

use crate::{
    ConfigValue, Dcs, DcsError, HISTORY_ATTEMPTS, KeyKind, RawKey, Result, WATCH_CHANNEL,
    WatchEvent, build_view, check_name, corrupt, keys, not_leader, parse_history, to_json,
};
use mainstay_core::poison;
use mainstay_core::{ClusterView, HistoryEntry, InitializeRecord, MemberStatus};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use tokio::sync::{Notify, broadcast, mpsc, watch};
use tokio::time::{Duration, Instant};

/// Only names keys in errors; the store holds one cluster.
const PREFIX: &str = "/mainstay/memory/";

/// A handle on an in-memory store. Clones share the store and the fault
/// switch.
#[derive(Clone)]
pub struct MemoryDcs {
    shared: Arc<Shared>,
    unreachable: Arc<watch::Sender<bool>>,
}

struct Shared {
    state: Mutex<State>,
    events: broadcast::Sender<Change>,
    /// Wakes the lease reaper when a lease is granted or the store dropped.
    reaper_wake: Arc<Notify>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.reaper_wake.notify_one();
    }
}

#[derive(Clone, Debug)]
struct Change {
    key: String,
    deleted: bool,
    revision: i64,
}

struct State {
    /// The store's revision; etcd starts at 1 and bumps it once per write
    /// that changes something.
    revision: i64,
    keys: BTreeMap<String, Entry>,
    leases: HashMap<i64, Lease>,
    next_lease: i64,
    reaper_started: bool,
    /// The store's own membership: one member that always answers, and
    /// those added since (never started: nothing runs them).
    dcs_members: Vec<crate::DcsMember>,
}

struct Entry {
    value: Vec<u8>,
    create_revision: i64,
    mod_revision: i64,
    lease: i64,
}

struct Lease {
    ttl: i64,
    deadline: Instant,
}

/// A transaction condition, with etcd's meaning for absent keys: every
/// revision reads as 0 and a value comparison fails.
enum Cmp<'a> {
    CreateRevision(&'a str, i64),
    ModRevision(&'a str, i64),
    Value(&'a str, &'a [u8]),
    Lease(&'a str, i64),
}

enum Op<'a> {
    Put {
        key: &'a str,
        value: Vec<u8>,
        lease: i64,
    },
    Delete(&'a str),
}

impl Default for MemoryDcs {
    fn default() -> Self {
        MemoryDcs::new()
    }
}

impl std::fmt::Debug for MemoryDcs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryDcs")
            .field("unreachable", &*self.unreachable.borrow())
            .finish_non_exhaustive()
    }
}

impl MemoryDcs {
    /// An empty store and a first handle on it.
    pub fn new() -> MemoryDcs {
        let (events, _) = broadcast::channel(1024);
        MemoryDcs {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    revision: 1,
                    keys: BTreeMap::new(),
                    leases: HashMap::new(),
                    // etcd's lease ids are large and never 0 (0 means "no lease").
                    next_lease: 0x7a00_0000_0001,
                    reaper_started: false,
                    dcs_members: vec![crate::DcsMember {
                        id: "1".into(),
                        name: "memory".into(),
                        peer_urls: vec!["memory://peer".into()],
                        client_urls: vec!["memory://client".into()],
                        leader: true,
                        learner: false,
                        answers: Some(true),
                    }],
                }),
                events,
                reaper_wake: Arc::new(Notify::new()),
            }),
            unreachable: Arc::new(watch::channel(false).0),
        }
    }

    /// Another handle on the same store with its own fault switch: one per
    /// simulated node.
    pub fn client(&self) -> MemoryDcs {
        MemoryDcs {
            shared: self.shared.clone(),
            unreachable: Arc::new(watch::channel(false).0),
        }
    }

    /// While set, every call through this handle (and its clones) fails
    /// with [`DcsError::Unreachable`] and its open watches end with an
    /// error, as with an etcd member cut off from its quorum. The store and
    /// its leases carry on, so leases held only through this handle expire.
    pub fn set_unreachable(&self, unreachable: bool) {
        self.unreachable.send_replace(unreachable);
    }

    /// Writes `value` at `key` (relative to the cluster prefix) without any
    /// check, as a foreign or buggy writer would.
    pub fn put_raw(&self, key: &str, value: impl Into<Vec<u8>>) {
        let mut state = self.state();
        let revision = state.revision + 1;
        state.put(key, value.into(), 0, revision, &self.shared.events);
        state.revision = revision;
    }

    /// The store's current revision.
    pub fn revision(&self) -> i64 {
        self.state().revision
    }

    fn state(&self) -> MutexGuard<'_, State> {
        let mut state = poison::lock(&self.shared.state);
        // Expire here as well as in the reaper: with paused time a call may
        // run before the reaper has been polled past a deadline.
        state.expire(Instant::now(), &self.shared.events);
        state
    }

    fn reachable(&self) -> Result<()> {
        if *self.unreachable.borrow() {
            return Err(DcsError::Unreachable(
                "the in-memory DCS is set unreachable for this node".into(),
            ));
        }
        Ok(())
    }

    /// A key only the leader writes: `value` if its revision is still the
    /// expected one and the leader key holds `holder` (name, lease).
    fn put_as_leader(
        &self,
        key: &'static str,
        value: Vec<u8>,
        expected: i64,
        holder: (&str, i64),
    ) -> Result<bool> {
        self.txn(
            &[
                Cmp::ModRevision(key, expected),
                Cmp::Value(keys::LEADER, holder.0.as_bytes()),
                Cmp::Lease(keys::LEADER, holder.1),
            ],
            vec![put(key, value, 0)],
        )
    }

    fn txn(&self, compares: &[Cmp<'_>], ops: Vec<Op<'_>>) -> Result<bool> {
        self.reachable()?;
        let mut state = self.state();
        if !compares.iter().all(|c| state.holds(c)) {
            return Ok(false);
        }
        // etcd checks leases before applying anything, failing the whole
        // transaction.
        for op in &ops {
            let lease = match op {
                Op::Put { lease, .. } => *lease,
                Op::Delete(_) => 0,
            };
            if lease != 0 && !state.leases.contains_key(&lease) {
                return Err(lease_gone());
            }
        }
        let revision = state.revision + 1;
        let mut changed = false;
        for op in ops {
            changed |= match op {
                Op::Put { key, value, lease } => {
                    state.put(key, value, lease, revision, &self.shared.events);
                    true
                }
                Op::Delete(key) => state.delete(key, revision, &self.shared.events),
            };
        }
        if changed {
            state.revision = revision;
        }
        Ok(true)
    }

    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, i64, i64)>> {
        self.reachable()?;
        let state = self.state();
        Ok(state
            .keys
            .get(key)
            .map(|e| (e.value.clone(), e.mod_revision, e.lease)))
    }

    fn start_reaper(&self, state: &mut State) {
        if !state.reaper_started {
            state.reaper_started = true;
            tokio::spawn(reap(
                Arc::downgrade(&self.shared),
                self.shared.reaper_wake.clone(),
            ));
        }
        self.shared.reaper_wake.notify_one();
    }
}

/// Deletes the keys of expired leases when they expire, as etcd does on its
/// own, so that watchers see the deletion without anyone calling in.
async fn reap(shared: Weak<Shared>, wake: Arc<Notify>) {
    loop {
        let woken = wake.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        let next_deadline = {
            let Some(shared) = shared.upgrade() else {
                return;
            };
            let mut state = poison::lock(&shared.state);
            state.expire(Instant::now(), &shared.events);
            state.leases.values().map(|l| l.deadline).min()
        };
        match next_deadline {
            Some(deadline) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(deadline) => {}
                    _ = &mut woken => {}
                }
            }
            None => woken.await,
        }
    }
}

impl State {
    fn holds(&self, compare: &Cmp<'_>) -> bool {
        match *compare {
            Cmp::CreateRevision(key, rev) => {
                self.keys.get(key).map_or(0, |e| e.create_revision) == rev
            }
            Cmp::ModRevision(key, rev) => self.keys.get(key).map_or(0, |e| e.mod_revision) == rev,
            Cmp::Value(key, value) => self.keys.get(key).is_some_and(|e| e.value == value),
            Cmp::Lease(key, lease) => self.keys.get(key).map_or(0, |e| e.lease) == lease,
        }
    }

    fn put(
        &mut self,
        key: &str,
        value: Vec<u8>,
        lease: i64,
        revision: i64,
        events: &broadcast::Sender<Change>,
    ) {
        let create_revision = self.keys.get(key).map_or(revision, |e| e.create_revision);
        self.keys.insert(
            key.to_string(),
            Entry {
                value,
                create_revision,
                mod_revision: revision,
                lease,
            },
        );
        let _ = events.send(Change {
            key: key.to_string(),
            deleted: false,
            revision,
        });
    }

    fn delete(&mut self, key: &str, revision: i64, events: &broadcast::Sender<Change>) -> bool {
        if self.keys.remove(key).is_none() {
            return false;
        }
        let _ = events.send(Change {
            key: key.to_string(),
            deleted: true,
            revision,
        });
        true
    }

    /// Revokes every lease past its deadline, each in its own revision as
    /// etcd does.
    fn expire(&mut self, now: Instant, events: &broadcast::Sender<Change>) {
        let mut expired: Vec<i64> = self
            .leases
            .iter()
            .filter(|(_, l)| l.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        expired.sort_unstable();
        for id in expired {
            self.revoke(id, events);
        }
    }

    fn revoke(&mut self, id: i64, events: &broadcast::Sender<Change>) {
        if self.leases.remove(&id).is_none() {
            return;
        }
        let doomed: Vec<String> = self
            .keys
            .iter()
            .filter(|(_, e)| e.lease == id)
            .map(|(k, _)| k.clone())
            .collect();
        if doomed.is_empty() {
            return;
        }
        let revision = self.revision + 1;
        for key in doomed {
            self.delete(&key, revision, events);
        }
        self.revision = revision;
    }
}

fn lease_gone() -> DcsError {
    DcsError::Conflict("the lease no longer exists: it expired or was revoked".into())
}

fn put<'a>(key: &'a str, value: Vec<u8>, lease: i64) -> Op<'a> {
    Op::Put { key, value, lease }
}

impl Dcs for MemoryDcs {
    async fn grant_lease(&self, ttl_secs: i64) -> Result<i64> {
        self.reachable()?;
        let mut state = self.state();
        let id = state.next_lease;
        state.next_lease += 1;
        // etcd raises short TTLs to its minimum rather than refusing them.
        let ttl = ttl_secs.max(1);
        state.leases.insert(
            id,
            Lease {
                ttl,
                deadline: Instant::now() + Duration::from_secs(ttl as u64),
            },
        );
        self.start_reaper(&mut state);
        Ok(id)
    }

    async fn keep_alive(&self, lease: i64) -> Result<i64> {
        self.reachable()?;
        let mut state = self.state();
        Ok(match state.leases.get_mut(&lease) {
            Some(l) => {
                l.deadline = Instant::now() + Duration::from_secs(l.ttl as u64);
                l.ttl
            }
            None => 0,
        })
    }

    async fn revoke_lease(&self, lease: i64) -> Result<()> {
        self.reachable()?;
        self.state().revoke(lease, &self.shared.events);
        Ok(())
    }

    async fn read_cluster(&self) -> Result<ClusterView> {
        self.reachable()?;
        let state = self.state();
        let raw = state.keys.iter().map(|(key, e)| RawKey {
            key,
            value: &e.value,
            mod_revision: e.mod_revision,
            lease: e.lease,
        });
        build_view(PREFIX, state.revision, raw)
    }

    async fn put_member(&self, status: &MemberStatus, lease: i64) -> Result<()> {
        check_name("member", &status.name)?;
        let key = keys::member(&status.name);
        self.txn(&[], vec![put(&key, to_json(status)?, lease)])?;
        Ok(())
    }

    async fn acquire_leader(&self, name: &str, lease: i64) -> Result<bool> {
        check_name("member", name)?;
        self.txn(
            &[Cmp::CreateRevision(keys::LEADER, 0)],
            vec![put(keys::LEADER, name.into(), lease)],
        )
    }

    async fn release_leader(&self, name: &str, lease: i64) -> Result<bool> {
        self.txn(
            &[
                Cmp::Value(keys::LEADER, name.as_bytes()),
                Cmp::Lease(keys::LEADER, lease),
            ],
            vec![Op::Delete(keys::LEADER)],
        )
    }

    async fn leader_held_by(&self, name: &str, lease: i64) -> Result<bool> {
        Ok(match self.get(keys::LEADER)? {
            Some((value, _, key_lease)) => value == name.as_bytes() && key_lease == lease,
            None => false,
        })
    }

    async fn hand_over_leader(
        &self,
        from: &str,
        lease_from: i64,
        to: &str,
        lease_to: i64,
    ) -> Result<bool> {
        check_name("member", to)?;
        self.txn(
            &[
                Cmp::Value(keys::LEADER, from.as_bytes()),
                Cmp::Lease(keys::LEADER, lease_from),
            ],
            vec![put(keys::LEADER, to.into(), lease_to)],
        )
    }

    async fn create_initialize(&self, record: &InitializeRecord) -> Result<bool> {
        self.txn(
            &[Cmp::CreateRevision(keys::INITIALIZE, 0)],
            vec![put(keys::INITIALIZE, to_json(record)?, 0)],
        )
    }

    async fn update_initialize(
        &self,
        record: &InitializeRecord,
        expected_mod_revision: i64,
    ) -> Result<bool> {
        self.txn(
            &[Cmp::ModRevision(keys::INITIALIZE, expected_mod_revision)],
            vec![put(keys::INITIALIZE, to_json(record)?, 0)],
        )
    }

    async fn delete_initialize(&self, expected_mod_revision: i64) -> Result<bool> {
        self.txn(
            &[Cmp::ModRevision(keys::INITIALIZE, expected_mod_revision)],
            vec![Op::Delete(keys::INITIALIZE)],
        )
    }

    async fn append_recovery(&self, record: &mainstay_core::RecoveryRecord) -> Result<()> {
        self.reachable()?;
        let mut records: Vec<serde_json::Value> = match self.get(keys::RECOVERIES)? {
            Some((value, _, _)) => serde_json::from_slice(&value).unwrap_or_default(),
            None => Vec::new(),
        };
        records.push(serde_json::to_value(record).map_err(|e| DcsError::Other(e.to_string()))?);
        self.txn(&[], vec![put(keys::RECOVERIES, to_json(&records)?, 0)])?;
        Ok(())
    }

    async fn append_history(
        &self,
        entry: &HistoryEntry,
        holder: Option<(&str, i64)>,
    ) -> Result<()> {
        let full_key = format!("{PREFIX}{}", keys::HISTORY);
        // Same read-then-CAS loop as over etcd, so that the retry path is
        // exercised by the same tests.
        for _ in 0..HISTORY_ATTEMPTS {
            let (mut history, mod_revision) = match self.get(keys::HISTORY)? {
                Some((value, mod_revision, _)) => (parse_history(&full_key, &value)?, mod_revision),
                None => (Vec::new(), 0),
            };
            history.push(entry.clone());
            let mut conditions = vec![Cmp::ModRevision(keys::HISTORY, mod_revision)];
            if let Some((name, lease)) = holder {
                conditions.push(Cmp::Value(keys::LEADER, name.as_bytes()));
                conditions.push(Cmp::Lease(keys::LEADER, lease));
            }
            if self.txn(&conditions, vec![put(keys::HISTORY, to_json(&history)?, 0)])? {
                return Ok(());
            }
            if let Some((name, lease)) = holder
                && !self.leader_held_by(name, lease).await?
            {
                return Err(not_leader(name));
            }
        }
        Err(DcsError::Conflict(format!(
            "{full_key} changed under every one of {HISTORY_ATTEMPTS} attempts to append to it"
        )))
    }

    async fn read_config(&self) -> Result<Option<ConfigValue>> {
        let Some((value, mod_revision, _)) = self.get(keys::CONFIG)? else {
            return Ok(None);
        };
        let value = serde_json::from_slice(&value)
            .map_err(|e| corrupt(&format!("{PREFIX}{}", keys::CONFIG), e))?;
        Ok(Some(ConfigValue {
            value,
            mod_revision,
        }))
    }

    async fn write_config(
        &self,
        value: &serde_json::Value,
        expected_mod_revision: i64,
    ) -> Result<bool> {
        self.txn(
            &[Cmp::ModRevision(keys::CONFIG, expected_mod_revision)],
            vec![put(keys::CONFIG, to_json(value)?, 0)],
        )
    }

    async fn put_failover(
        &self,
        request: &mainstay_core::FailoverRequest,
        expected_mod_revision: i64,
    ) -> Result<bool> {
        self.txn(
            &[Cmp::ModRevision(keys::FAILOVER, expected_mod_revision)],
            vec![put(keys::FAILOVER, to_json(request)?, 0)],
        )
    }

    async fn delete_failover(&self, expected_mod_revision: i64) -> Result<bool> {
        self.txn(
            &[Cmp::ModRevision(keys::FAILOVER, expected_mod_revision)],
            vec![Op::Delete(keys::FAILOVER)],
        )
    }

    async fn write_sync(
        &self,
        state: &mainstay_core::SyncState,
        expected_mod_revision: i64,
        holder: (&str, i64),
    ) -> Result<bool> {
        self.put_as_leader(keys::SYNC, to_json(state)?, expected_mod_revision, holder)
    }

    async fn write_failsafe(
        &self,
        state: &mainstay_core::FailsafeState,
        expected_mod_revision: i64,
        holder: (&str, i64),
    ) -> Result<bool> {
        self.put_as_leader(
            keys::FAILSAFE,
            to_json(state)?,
            expected_mod_revision,
            holder,
        )
    }

    async fn delete_member(&self, name: &str) -> Result<()> {
        check_name("member", name)?;
        let key = keys::member(name);
        self.txn(&[], vec![Op::Delete(&key)]).map(|_| ())
    }

    async fn dcs_members(&self) -> Result<Vec<crate::DcsMember>> {
        self.reachable()?;
        Ok(self.state().dcs_members.clone())
    }

    async fn add_dcs_member(&self, peer_url: &str) -> Result<Vec<crate::DcsMember>> {
        self.reachable()?;
        let mut state = self.state();
        if state
            .dcs_members
            .iter()
            .any(|m| m.peer_urls.iter().any(|u| u == peer_url))
        {
            return Err(DcsError::Other(format!(
                "{peer_url} is a member's peer URL already"
            )));
        }
        let id = format!("{:x}", state.dcs_members.len() + 1);
        state.dcs_members.push(crate::DcsMember {
            id,
            name: String::new(),
            peer_urls: vec![peer_url.to_string()],
            client_urls: Vec::new(),
            leader: false,
            learner: false,
            answers: None,
        });
        Ok(state.dcs_members.clone())
    }

    async fn remove_dcs_member(&self, name: &str) -> Result<()> {
        self.reachable()?;
        let mut state = self.state();
        let before = state.dcs_members.len();
        state
            .dcs_members
            .retain(|m| !(m.name == name || m.id == name || m.peer_urls.iter().any(|u| u == name)));
        if state.dcs_members.len() == before {
            return Err(DcsError::Other(format!("no member named {name:?}")));
        }
        Ok(())
    }

    async fn dcs_view_at(&self, client_url: &str) -> Result<crate::EndpointView> {
        let state = self.state();
        let Some(position) = state
            .dcs_members
            .iter()
            .position(|m| m.client_urls.iter().any(|u| u == client_url))
        else {
            return Err(DcsError::Unreachable(format!(
                "{client_url}: no such member"
            )));
        };
        Ok(crate::EndpointView {
            cluster_id: 1,
            member_id: position as u64 + 1,
            leader: if self.reachable().is_ok() { 1 } else { 0 },
            members: state
                .dcs_members
                .iter()
                .map(|m| crate::DcsMember {
                    answers: None,
                    leader: false,
                    ..m.clone()
                })
                .collect(),
        })
    }

    async fn dcs_answers_at(&self, client_url: &str) -> bool {
        // Only the store's own member runs.
        self.reachable().is_ok() && client_url == "memory://client"
    }

    async fn keep_leader_away(&self, _local: &[std::net::IpAddr]) -> Result<Option<String>> {
        // One process, no hosts: nothing to move.
        self.reachable()?;
        Ok(None)
    }

    async fn watch(&self) -> Result<mpsc::Receiver<WatchEvent>> {
        self.reachable()?;
        let changes = self.shared.events.subscribe();
        let (tx, rx) = mpsc::channel(WATCH_CHANNEL);
        tokio::spawn(forward_watch(changes, self.unreachable.subscribe(), tx));
        Ok(rx)
    }
}

async fn forward_watch(
    mut changes: broadcast::Receiver<Change>,
    mut unreachable: watch::Receiver<bool>,
    tx: mpsc::Sender<WatchEvent>,
) {
    // Once every handle sharing the switch is gone, nobody can flip it.
    let mut switch_alive = true;
    let error = loop {
        tokio::select! {
            _ = tx.closed() => return,
            switched = async { unreachable.wait_for(|cut_off| *cut_off).await.map(drop) }, if switch_alive => {
                match switched {
                    Ok(_) => break "the in-memory DCS is set unreachable for this node".to_string(),
                    Err(_) => switch_alive = false,
                }
            }
            change = changes.recv() => match change {
                Ok(change) => {
                    let event = WatchEvent::Changed {
                        key: KeyKind::from_relative(&change.key),
                        deleted: change.deleted,
                        revision: change.revision,
                    };
                    if tx.send(event).await.is_err() {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    break format!("the watch fell {n} events behind");
                }
                Err(broadcast::error::RecvError::Closed) => {
                    break "the in-memory DCS was dropped".to_string();
                }
            },
        }
    };
    let _ = tx.send(WatchEvent::Error(error)).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use mainstay_core::{Lsn, PgRole, Tags};

    fn status(name: &str) -> MemberStatus {
        MemberStatus {
            name: name.into(),
            role: PgRole::Primary,
            state: "running".into(),
            api_url: String::new(),
            pg_host: String::new(),
            pg_port: 5432,
            timeline: 1,
            received_lsn: Lsn(0),
            replayed_lsn: Lsn(0),
            flush_lsn: Lsn(0),
            following: None,
            streaming: false,
            tags: Tags::default(),
            version: String::new(),
            view_revision: 0,
            view_had_leader: false,
            vip: None,
            warning: None,
            services: Default::default(),
            files: Default::default(),
            alerts: Vec::new(),
            witness: false,
            pending_restart: Vec::new(),
            data_timeline: 0,
            custom_tags: Default::default(),
        }
    }

    async fn next(watch: &mut mpsc::Receiver<WatchEvent>) -> WatchEvent {
        tokio::time::timeout(Duration::from_secs(60), watch.recv())
            .await
            .expect("an event")
            .expect("an open channel")
    }

    /// Nobody calls in, yet the lease expires on time and the watch hears
    /// of it: the reaper runs on tokio's (here paused) clock.
    #[tokio::test(start_paused = true)]
    async fn leases_expire_on_their_own() {
        let dcs = MemoryDcs::new();
        let mut watch = dcs.watch().await.unwrap();
        let lease = dcs.grant_lease(3).await.unwrap();
        dcs.put_member(&status("a"), lease).await.unwrap();
        assert!(dcs.acquire_leader("a", lease).await.unwrap());
        let start = Instant::now();
        let mut deleted = Vec::new();
        while deleted.len() < 2 {
            if let WatchEvent::Changed {
                key, deleted: true, ..
            } = next(&mut watch).await
            {
                deleted.push(key);
            }
        }
        assert_eq!(start.elapsed(), Duration::from_secs(3));
        assert!(deleted.contains(&KeyKind::Leader));
        assert!(deleted.contains(&KeyKind::Member("a".into())));
    }

    /// A shorter lease granted later must still expire first.
    #[tokio::test(start_paused = true)]
    async fn reaper_follows_new_shorter_leases() {
        let dcs = MemoryDcs::new();
        let long = dcs.grant_lease(60).await.unwrap();
        let short = dcs.grant_lease(1).await.unwrap();
        assert!(dcs.acquire_leader("a", short).await.unwrap());
        dcs.put_member(&status("b"), long).await.unwrap();
        let mut watch = dcs.watch().await.unwrap();
        let start = Instant::now();
        assert_eq!(
            next(&mut watch).await,
            WatchEvent::Changed {
                key: KeyKind::Leader,
                deleted: true,
                revision: 4
            }
        );
        assert_eq!(start.elapsed(), Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn keep_alive_postpones_expiry() {
        let dcs = MemoryDcs::new();
        let lease = dcs.grant_lease(2).await.unwrap();
        assert!(dcs.acquire_leader("a", lease).await.unwrap());
        tokio::time::sleep(Duration::from_millis(1900)).await;
        assert_eq!(dcs.keep_alive(lease).await.unwrap(), 2);
        tokio::time::sleep(Duration::from_millis(1900)).await;
        assert!(dcs.leader_held_by("a", lease).await.unwrap());
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!dcs.leader_held_by("a", lease).await.unwrap());
        assert_eq!(dcs.keep_alive(lease).await.unwrap(), 0);
    }

    /// A node cut off from the DCS fails every call and loses its watch,
    /// while the others carry on and see its lease expire.
    #[tokio::test(start_paused = true)]
    async fn unreachable_is_per_node() {
        let a = MemoryDcs::new();
        let b = a.client();
        let lease = a.grant_lease(2).await.unwrap();
        assert!(a.acquire_leader("a", lease).await.unwrap());
        let mut a_watch = a.watch().await.unwrap();
        let mut b_watch = b.watch().await.unwrap();

        a.set_unreachable(true);
        assert!(matches!(next(&mut a_watch).await, WatchEvent::Error(_)));
        assert!(
            a_watch.recv().await.is_none(),
            "the watch ends after its error"
        );
        for result in [
            a.keep_alive(lease).await.map(|_| ()),
            a.read_cluster().await.map(|_| ()),
            a.acquire_leader("a", lease).await.map(|_| ()),
            a.watch().await.map(|_| ()),
        ] {
            assert!(
                matches!(result, Err(DcsError::Unreachable(_))),
                "{result:?}"
            );
        }
        // A clone shares the switch.
        assert!(a.clone().read_cluster().await.is_err());

        assert!(matches!(
            next(&mut b_watch).await,
            WatchEvent::Changed {
                key: KeyKind::Leader,
                deleted: true,
                ..
            }
        ));
        let lb = b.grant_lease(2).await.unwrap();
        assert!(b.acquire_leader("b", lb).await.unwrap());

        a.set_unreachable(false);
        assert_eq!(a.read_cluster().await.unwrap().leader_name(), Some("b"));
        assert_eq!(a.keep_alive(lease).await.unwrap(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_the_store_ends_reaper_and_watches() {
        let dcs = MemoryDcs::new();
        dcs.grant_lease(1000).await.unwrap();
        let mut watch = dcs.watch().await.unwrap();
        let reaper_wake = Arc::downgrade(&dcs.shared.reaper_wake);
        drop(dcs);
        assert!(matches!(next(&mut watch).await, WatchEvent::Error(_)));
        // The reaper holds the last strong reference to its Notify.
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert!(
            reaper_wake.upgrade().is_none(),
            "the reaper task is still alive"
        );
    }
}
