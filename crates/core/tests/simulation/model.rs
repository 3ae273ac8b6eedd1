//! The model: a seeded random source, clocks, WAL with the identity of every
//! byte, the DCS (etcd) and the nodes (agent, lease keeper, guard,
//! PostgreSQL).
//!
//! Nothing here decides anything the core decides: the model is the world
//! the simulated agents act on, and the oracle reads its ground truth.

use mainstay_core::decide::{DataDir, LocalPg};
use mainstay_core::lease::{Lease, LeaseClock, LeaseTiming};
use mainstay_core::sync::render_standby_names;
use mainstay_core::timeline::TimelineSwitch;
use mainstay_core::{
    ClusterView, CoreState, FailoverRecord, FailoverRequest, FailsafeRecord, FailsafeState,
    HistoryEntry, InitializeRecord, LeaderRecord, Lsn, MemberRecord, MemberStatus, Millis, PgRole,
    SyncRecord, SyncState, Tags,
};
use std::collections::BTreeMap;
use std::rc::Rc;

use crate::keeper::Keeper;
use crate::shell::Ha;

/// SplitMix64: small, fast and good enough to pick faults; no dependency.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    pub(crate) fn chance(&mut self, per_million: u64) -> bool {
        self.below(1_000_000) < per_million
    }
    /// A value in `lo..=hi`.
    pub(crate) fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi.saturating_sub(lo) + 1)
    }
}

/// One host's clock: `CLOCK_BOOTTIME` as its processes read it. It runs at
/// `1 + ppm / 1e6` of true time and keeps counting while the host is
/// suspended (so a suspended host finds it jumped forward on resume).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Clock {
    pub(crate) offset: u64,
    pub(crate) ppm: i64,
}

impl Clock {
    pub(crate) const EXACT: Clock = Clock { offset: 0, ppm: 0 };

    /// Local milliseconds at true time `t`.
    pub(crate) fn local(&self, t: u64) -> u64 {
        let skew = (t as i128 * self.ppm as i128).div_euclid(1_000_000);
        (self.offset as i128 + t as i128 + skew) as u64
    }

    /// The first true millisecond at which the local clock reads `at` or more.
    pub(crate) fn true_at(&self, at: u64) -> u64 {
        if at <= self.offset {
            return 0;
        }
        let span = (at - self.offset) as i128;
        let mut t = (span * 1_000_000 / (1_000_000 + self.ppm as i128)) as u64;
        t = t.saturating_sub(2);
        while self.local(t) < at {
            t += 1;
        }
        t
    }
}

/// Who wrote a stretch of WAL: one writable session of one primary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Run {
    pub(crate) start: u64,
    pub(crate) epoch: u64,
}

/// A data directory's WAL. `timeline`, `history` and `end` are what
/// PostgreSQL reports and what the agent reasons with; `runs` is the truth
/// only the simulator knows: which writable session wrote each byte.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Wal {
    pub(crate) system_id: u64,
    pub(crate) timeline: u32,
    pub(crate) history: Vec<TimelineSwitch>,
    pub(crate) end: u64,
    pub(crate) runs: Vec<Run>,
    /// The newest timeline history file in pg_wal (promotion picks the
    /// number after it).
    pub(crate) newest_history: u32,
}

impl Wal {
    /// The session that wrote byte `pos`, if this WAL holds it.
    pub(crate) fn epoch_at(&self, pos: u64) -> Option<u64> {
        if pos >= self.end {
            return None;
        }
        self.runs
            .iter()
            .rev()
            .find(|r| r.start <= pos)
            .map(|r| r.epoch)
    }

    /// Ground truth: every byte of this WAL is the same byte in `other`.
    pub(crate) fn is_prefix_of(&self, other: &Wal) -> bool {
        if self.system_id != other.system_id || self.end > other.end {
            return false;
        }
        for (k, run) in self.runs.iter().enumerate() {
            let Some(theirs) = other.runs.get(k) else {
                return false;
            };
            if theirs != run {
                return false;
            }
            let my_end = self.runs.get(k + 1).map_or(self.end, |r| r.start);
            let their_end = other.runs.get(k + 1).map_or(other.end, |r| r.start);
            let last = k + 1 == self.runs.len();
            if (last && my_end > their_end) || (!last && my_end != their_end) {
                return false;
            }
        }
        true
    }

    /// A primary in session `epoch` writes `bytes`.
    pub(crate) fn append(&mut self, epoch: u64, bytes: u64) {
        if bytes == 0 {
            return;
        }
        if self.runs.last().is_none_or(|r| r.epoch != epoch) {
            self.runs.push(Run {
                start: self.end,
                epoch,
            });
        }
        self.end += bytes;
    }

    /// A standby of `upstream` that has received up to `end`: the bytes are
    /// the upstream's, and so is the timeline they are on.
    pub(crate) fn streamed_from(upstream: &Wal, end: u64) -> Wal {
        let end = end.min(upstream.end);
        let runs = upstream
            .runs
            .iter()
            .filter(|r| r.start < end)
            .copied()
            .collect();
        let mut timeline = upstream.timeline;
        let mut history = upstream.history.clone();
        if let Some(k) = upstream.history.iter().position(|s| end <= s.switch_lsn.0) {
            timeline = upstream.history[k].timeline;
            history.truncate(k);
        }
        Wal {
            system_id: upstream.system_id,
            timeline,
            history,
            end,
            runs,
            newest_history: upstream.newest_history.max(upstream.timeline),
        }
    }

    /// Promotion (or the end of recovery without standby.signal): a new
    /// timeline after the newest history file.
    pub(crate) fn switch_timeline(&mut self) -> u32 {
        let next = self.timeline.max(self.newest_history) + 1;
        self.history.push(TimelineSwitch {
            timeline: self.timeline,
            switch_lsn: Lsn(self.end),
        });
        self.timeline = next;
        self.newest_history = next;
        next
    }
}

/// The leader key in etcd.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct LeaderKey {
    pub(crate) name: String,
    pub(crate) lease: i64,
    pub(crate) revision: i64,
}

/// etcd: keys, leases on its own clock, revisions, outages.
pub(crate) struct Dcs {
    pub(crate) clock: Clock,
    pub(crate) ttl: u64,
    pub(crate) revision: i64,
    pub(crate) initialize: Option<(InitializeRecord, i64)>,
    pub(crate) leader: Option<LeaderKey>,
    /// The revision of the leader key before the current one (0: none).
    pub(crate) previous_leader_revision: i64,
    latest_leader_revision: i64,
    /// name -> (status, lease, revision)
    pub(crate) members: BTreeMap<String, (MemberStatus, i64, i64)>,
    /// lease -> expiry on the DCS clock
    pub(crate) leases: BTreeMap<i64, u64>,
    pub(crate) next_lease: i64,
    pub(crate) history: Vec<HistoryEntry>,
    pub(crate) sync: Option<(SyncState, i64)>,
    pub(crate) failsafe: Option<(FailsafeState, i64)>,
    pub(crate) failover: Option<(FailoverRequest, i64)>,
    /// etcd has lost its quorum until then (true time): no request is
    /// served and no lease expires; a new etcd leader extends every lease.
    pub(crate) down_until: u64,
    /// The view at the last revision read.
    view: Option<(i64, Rc<ClusterView>)>,
}

impl Dcs {
    pub(crate) fn new(clock: Clock, ttl: u64) -> Dcs {
        Dcs {
            clock,
            ttl,
            revision: 0,
            initialize: None,
            leader: None,
            previous_leader_revision: 0,
            latest_leader_revision: 0,
            members: BTreeMap::new(),
            leases: BTreeMap::new(),
            next_lease: 0,
            history: Vec::new(),
            sync: None,
            failsafe: None,
            failover: None,
            down_until: 0,
            view: None,
        }
    }

    pub(crate) fn up(&self, now: u64) -> bool {
        now >= self.down_until
    }

    pub(crate) fn bump(&mut self) -> i64 {
        self.revision += 1;
        self.revision
    }

    /// A lease etcd still knows (expired ones linger until the next
    /// revocation tick; keep-alives on them fail, keys can still use them).
    pub(crate) fn lease_exists(&self, id: i64) -> bool {
        self.leases.contains_key(&id)
    }

    /// Whether etcd may have expired lease `id` by true time `now`.
    pub(crate) fn lease_expired(&self, id: Option<i64>, now: u64) -> bool {
        let Some(expiry) = id.and_then(|id| self.leases.get(&id)) else {
            return true;
        };
        self.up(now) && *expiry <= self.clock.local(now)
    }

    /// A keep-alive that reached etcd at `now`: the new expiry, or `None`
    /// if the lease is gone (or expired, awaiting revocation).
    pub(crate) fn keep_alive(&mut self, id: i64, now: u64) -> Option<i64> {
        let local = self.clock.local(now);
        let ttl = self.ttl;
        let expiry = self.leases.get_mut(&id)?;
        if *expiry <= local {
            return None;
        }
        *expiry = (*expiry).max(local + ttl);
        Some(id)
    }

    pub(crate) fn grant(&mut self, now: u64) -> i64 {
        self.next_lease += 1;
        let id = self.next_lease;
        let expiry = self.clock.local(now) + self.ttl;
        self.leases.insert(id, expiry);
        id
    }

    /// etcd's revocation tick (every 500 ms of its clock): expired leases go
    /// with their keys. Returns true when the leader key went.
    pub(crate) fn revoke_expired(&mut self, now: u64) -> bool {
        if !self.up(now) {
            return false;
        }
        let local = self.clock.local(now);
        let expired: Vec<i64> = self
            .leases
            .iter()
            .filter(|(_, at)| **at <= local)
            .map(|(id, _)| *id)
            .collect();
        let mut leader_gone = false;
        for id in expired {
            self.leases.remove(&id);
            if self.leader.as_ref().is_some_and(|l| l.lease == id) {
                self.leader = None;
                self.bump();
                leader_gone = true;
            }
            let gone: Vec<String> = self
                .members
                .iter()
                .filter(|m| m.1.1 == id)
                .map(|m| m.0.clone())
                .collect();
            for name in gone {
                self.members.remove(&name);
                self.bump();
            }
        }
        leader_gone
    }

    /// Someone deleted every key under the cluster's prefix (`etcdctl del
    /// --prefix`; leases and revisions go on): the agents must register
    /// their data again, and only the old primary's data may lead first.
    pub(crate) fn lose_every_key(&mut self) {
        self.initialize = None;
        self.leader = None;
        self.members.clear();
        self.history.clear();
        self.sync = None;
        self.failsafe = None;
        self.failover = None;
        self.bump();
    }

    /// etcd regained its quorum: the new leader's lessor extends every
    /// lease by a full ttl.
    pub(crate) fn recover(&mut self, now: u64) {
        let until = self.clock.local(now) + self.ttl;
        for expiry in self.leases.values_mut() {
            *expiry = (*expiry).max(until);
        }
    }

    /// A leader key is created (taken, or handed over).
    pub(crate) fn set_leader(&mut self, name: String, lease: i64) {
        self.previous_leader_revision = self.latest_leader_revision;
        let revision = self.bump();
        self.latest_leader_revision = revision;
        self.leader = Some(LeaderKey {
            name,
            lease,
            revision,
        });
    }

    pub(crate) fn holds_leader(&self, name: &str, lease: Option<i64>) -> bool {
        self.leader
            .as_ref()
            .is_some_and(|l| l.name == name && Some(l.lease) == lease)
    }

    fn build_view(&self) -> ClusterView {
        ClusterView {
            revision: self.revision,
            initialize: self.initialize.as_ref().map(|i| i.0.clone()),
            initialize_revision: self.initialize.as_ref().map_or(0, |i| i.1),
            leader: self.leader.as_ref().map(|l| LeaderRecord {
                name: l.name.clone(),
                lease_id: l.lease,
                mod_revision: l.revision,
            }),
            members: self
                .members
                .iter()
                .map(|(name, (status, lease, rev))| {
                    (
                        name.clone(),
                        MemberRecord {
                            status: status.clone(),
                            mod_revision: *rev,
                            lease_id: *lease,
                        },
                    )
                })
                .collect(),
            history: self.history.clone(),
            sync: self.sync.as_ref().map(|(state, rev)| SyncRecord {
                state: Ok(state.clone()),
                mod_revision: *rev,
            }),
            failsafe: self.failsafe.as_ref().map(|(state, rev)| FailsafeRecord {
                state: Ok(state.clone()),
                mod_revision: *rev,
            }),
            failover: self.failover.as_ref().map(|(request, rev)| FailoverRecord {
                request: Ok(request.clone()),
                mod_revision: *rev,
            }),
            ..ClusterView::default()
        }
    }

    /// The view at the current revision, for the oracle (not cached).
    pub(crate) fn view_now(&self) -> Rc<ClusterView> {
        match &self.view {
            Some((rev, view)) if *rev == self.revision => view.clone(),
            _ => Rc::new(self.build_view()),
        }
    }

    /// The view at the current revision (built once per revision).
    pub(crate) fn view(&mut self) -> Rc<ClusterView> {
        let view = self.view_now();
        self.view = Some((self.revision, view.clone()));
        view
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Role {
    Stopped,
    Primary,
    Replica,
}

/// The fencing guard's view of one postmaster: whether the agent declared
/// the server writable and the deadline it last sent (local ms).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Fencer {
    pub(crate) writable: bool,
    pub(crate) deadline: u64,
}

pub(crate) struct Node {
    pub(crate) name: String,
    pub(crate) tags: Tags,
    pub(crate) clock: Clock,

    // The host and its processes.
    pub(crate) agent_alive: bool,
    pub(crate) restart_at: u64,
    pub(crate) frozen_until: u64,
    pub(crate) suspended_until: u64,
    /// Suspended, and not yet seen to resume.
    pub(crate) asleep: bool,
    pub(crate) dcs_cut_until: u64,
    pub(crate) peer_cut_until: u64,
    /// When this node last came back from something that kept it from
    /// publishing (restart, partition, freeze, suspend).
    pub(crate) back_at: u64,
    pub(crate) renew_loss_per_million: u64,
    pub(crate) request_delay_max: u64,
    pub(crate) lag_until: u64,

    // The agent.
    pub(crate) core: CoreState,
    pub(crate) keeper: Keeper,
    pub(crate) ha: Ha,
    /// The lease as the keeper last published it to the HA loop.
    pub(crate) lease: Lease,
    pub(crate) fencer: Fencer,
    pub(crate) failsafe_peers: Option<(i64, Vec<String>)>,
    pub(crate) failsafe_contact: Option<(String, u64)>,
    /// The last view the HA loop read, and whether it could read one: the
    /// REST API answers failsafe requests from it.
    pub(crate) last_view: Option<Rc<ClusterView>>,
    pub(crate) dcs_reachable: bool,
    pub(crate) published: Option<(MemberStatus, u64)>,
    /// The newest leader key revision this agent's decisions saw.
    pub(crate) saw_leader_revision: i64,

    // PostgreSQL and its data directory.
    pub(crate) data: Option<Wal>,
    pub(crate) was_primary: bool,
    pub(crate) role: Role,
    pub(crate) following: Option<String>,
    pub(crate) streaming: bool,
    pub(crate) sync_names: Vec<String>,
    pub(crate) sync_block: bool,
    /// The timeline claim file in the data directory: (timeline, node).
    pub(crate) claim: Option<(u32, String)>,
    /// The writable session of the running primary (names its WAL).
    pub(crate) epoch: u64,
    pub(crate) moved_aside: usize,
    /// True time since which this node's PostgreSQL accepts writes.
    pub(crate) writing_since: Option<u64>,
    /// True time this node last started running as a replica.
    pub(crate) replica_since: u64,
    /// True time the running agent started.
    pub(crate) agent_started: u64,
    /// The members that confirmed this leader's current failsafe deadline
    /// (who the keeper asked), and when.
    pub(crate) confirmed_by: Option<(Vec<String>, u64)>,
    /// The members the keeper is asking right now, and since when.
    pub(crate) asking: Option<(Vec<String>, u64)>,
}

impl Node {
    pub(crate) fn new(name: String, tags: Tags, clock: Clock, timing: LeaseTiming) -> Node {
        let keeper = Keeper::new(LeaseClock::new(timing, Millis(clock.local(0))));
        Node {
            name,
            tags,
            clock,
            agent_alive: true,
            restart_at: 0,
            frozen_until: 0,
            suspended_until: 0,
            asleep: false,
            dcs_cut_until: 0,
            peer_cut_until: 0,
            back_at: 0,
            renew_loss_per_million: 0,
            request_delay_max: 20,
            lag_until: 0,
            core: CoreState::default(),
            lease: keeper.clock.lease(),
            keeper,
            ha: Ha::default(),
            fencer: Fencer::default(),
            failsafe_peers: None,
            failsafe_contact: None,
            last_view: None,
            dcs_reachable: false,
            published: None,
            saw_leader_revision: 0,
            data: None,
            was_primary: false,
            role: Role::Stopped,
            following: None,
            streaming: false,
            sync_names: Vec::new(),
            sync_block: false,
            claim: None,
            epoch: 0,
            moved_aside: 0,
            writing_since: None,
            replica_since: 0,
            agent_started: 0,
            confirmed_by: None,
            asking: None,
        }
    }

    pub(crate) fn suspended(&self, now: u64) -> bool {
        now < self.suspended_until
    }
    /// The agent's tasks run (alive, not frozen, host not suspended).
    pub(crate) fn agent_runs(&self, now: u64) -> bool {
        self.agent_alive && now >= self.frozen_until && !self.suspended(now)
    }
    /// The agent can reach etcd (its tasks may still be frozen).
    pub(crate) fn dcs_link(&self, now: u64) -> bool {
        now >= self.dcs_cut_until && !self.suspended(now)
    }
    pub(crate) fn peer_link(&self, now: u64) -> bool {
        now >= self.peer_cut_until && !self.suspended(now)
    }
    /// PostgreSQL accepts writes right now.
    pub(crate) fn accepts_writes(&self, now: u64) -> bool {
        self.role == Role::Primary && !self.suspended(now)
    }
    pub(crate) fn local(&self, now: u64) -> u64 {
        self.clock.local(now)
    }

    pub(crate) fn local_pg(&self) -> LocalPg {
        LocalPg {
            data: match &self.data {
                None => DataDir::Empty,
                Some(wal) => DataDir::Initialized {
                    system_id: wal.system_id.to_string(),
                    was_primary: self.was_primary,
                    timeline: wal.timeline.max(wal.newest_history),
                },
            },
            role: match self.role {
                Role::Stopped => PgRole::Stopped,
                Role::Primary => PgRole::Primary,
                Role::Replica => PgRole::Replica,
            },
            timeline: self.data.as_ref().map_or(0, |w| w.timeline),
            lsn: Lsn(self.data.as_ref().map_or(0, |w| w.end)),
            following: self.following.clone(),
            streaming: self.streaming,
            sync_standby_names: render_standby_names(&self.sync_names, self.sync_block),
            standbys: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_drifting_clock_converts_both_ways() {
        for ppm in [-10_000, -1, 0, 7, 10_000] {
            let clock = Clock { offset: 123, ppm };
            for t in [0, 1, 999, 50_000, 100_000] {
                let local = clock.local(t);
                let back = clock.true_at(local);
                assert!(back <= t && clock.local(back) == local, "{ppm} {t}");
            }
        }
    }

    #[test]
    fn truth_tells_a_prefix_from_a_branch() {
        let mut a = Wal {
            system_id: 1,
            timeline: 1,
            history: vec![],
            end: 0,
            runs: vec![],
            newest_history: 1,
        };
        a.append(1, 100);
        let mut b = a.clone();
        b.append(1, 50);
        assert!(a.is_prefix_of(&b) && !b.is_prefix_of(&a));
        let mut c = a.clone();
        c.append(2, 10);
        assert!(a.is_prefix_of(&c) && !c.is_prefix_of(&b) && !b.is_prefix_of(&c));
        let d = Wal::streamed_from(&c, 105);
        assert!(d.is_prefix_of(&c) && d.epoch_at(104) == Some(2));
    }
}
