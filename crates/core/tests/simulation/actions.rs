//! The actions of the core's decisions as the agent carries them out
//! (crates/agent/src/agent/): the same checks (timeline claims, the
//! divergence check before following, the guard armed before a server may
//! write, no start past the deadline), the same order of stops and key
//! releases. Actions on PostgreSQL take time on a share of seeds and can
//! fail; the truth about WAL judges what the divergence check decided.

use mainstay_core::decide::Action;
use mainstay_core::timeline::{Divergence, LeaderWal, LocalWal, divergence, foreign_timeline};
use mainstay_core::{ClusterView, HistoryEntry, InitializeRecord, Lsn, Millis, SyncState};

use crate::Plant;
use crate::driver::Sim;
use crate::faults::Fault;
use crate::model::{Role, Wal};
use crate::oracle::Kind;

/// What completes when a slow action ends.
pub(crate) enum Effect {
    /// A DCS write, already applied, answered in time or not.
    Answer(bool),
    Bootstrap,
    StartPrimary,
    StartReplica(Option<String>),
    Promote,
    Join {
        leader: String,
        plan: Plan,
    },
    Clone(String),
    Reload(String),
    /// The agent waited for its immediate shutdown; `ok` is how that went.
    Stopped(bool),
    /// Planted: the fence lands a loop late.
    LateFence,
    Switchover {
        candidate: String,
        candidate_lease: i64,
        end: u64,
        failover_revision: i64,
        waited: bool,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Plan {
    AsIs,
    Rewind,
    Reclone,
}

pub(crate) type Started = Result<Option<(u64, Effect)>, String>;

impl Sim {
    /// How long an action takes on this seed (0: at once).
    fn takes(&mut self, lo: u64, hi: u64) -> u64 {
        if self.plan.slow_actions {
            self.rng.between(lo, hi)
        } else {
            0
        }
    }

    /// Whether an action that can fail fails now.
    fn fails(&mut self, per_million: u64) -> bool {
        let fails = self.plan.slow_actions && self.faults_on && self.rng.chance(per_million);
        if fails {
            self.count(Fault::ActionFailure);
        }
        fails
    }

    fn peer_link_now(&self, i: usize) -> bool {
        self.nodes[i].peer_link(self.now)
    }

    fn later(&self, ms: u64, effect: Effect) -> Started {
        Ok(Some((self.now + ms, effect)))
    }

    /// A DCS write: applied at once if etcd can be reached; under slow-DCS
    /// faults the answer may come after the agent gave up on it.
    fn dcs_write(&mut self, i: usize, apply: impl FnOnce(&mut Sim) -> bool) -> Started {
        let now = self.now;
        if !self.nodes[i].dcs_link(now) || !self.dcs.up(now) {
            return Err("DCS unreachable".into());
        }
        let ok = apply(self);
        if self.faults_on && self.plan.stale_views && self.rng.chance(100_000) {
            let latency = self.rng.below(self.timing.dcs_timeout * 3 / 2);
            let answered = latency <= self.timing.dcs_timeout;
            return self.later(
                latency.min(self.timing.dcs_timeout),
                Effect::Answer(ok && answered),
            );
        }
        if ok { Ok(None) } else { Err("refused".into()) }
    }

    pub(crate) fn begin(&mut self, i: usize, action: &Action) -> Started {
        let name = self.nodes[i].name.clone();
        let turn = self.nodes[i].ha.acting.as_ref().expect("a turn");
        let lease = turn.lease;
        let view = turn.view.clone();
        match action {
            Action::RegisterExistingData { system_id } => self.dcs_write(i, |sim| {
                if sim.dcs.initialize.is_none() {
                    let rev = sim.dcs.bump();
                    let record = InitializeRecord {
                        system_id: Some(system_id.clone()),
                        by: name,
                        at: String::new(),
                        awaiting_first_leader: true,
                    };
                    sim.dcs.initialize = Some((record, rev));
                    sim.recorded_ids.extend(system_id.parse::<u64>());
                }
                true
            }),
            Action::ClaimInitialize => self.dcs_write(i, |sim| {
                if sim.dcs.initialize.is_some() {
                    return false;
                }
                let rev = sim.dcs.bump();
                let record = InitializeRecord {
                    system_id: None,
                    by: name,
                    at: String::new(),
                    awaiting_first_leader: false,
                };
                sim.dcs.initialize = Some((record, rev));
                sim.wake_all();
                true
            }),
            Action::AbandonBootstrap {
                initialize_revision,
            } => self.dcs_write(i, |sim| {
                if sim
                    .dcs
                    .initialize
                    .as_ref()
                    .is_some_and(|i| i.1 == *initialize_revision)
                {
                    sim.dcs.initialize = None;
                    sim.dcs.bump();
                    sim.wake_all();
                }
                true
            }),
            Action::RecordSystemId {
                system_id,
                initialize_revision,
            } => self.dcs_write(i, |sim| {
                let rev = sim.dcs.revision + 1;
                match &mut sim.dcs.initialize {
                    Some((record, at)) if *at == *initialize_revision => {
                        record.system_id = Some(system_id.clone());
                        *at = rev;
                    }
                    _ => return false,
                }
                sim.recorded_ids.extend(system_id.parse::<u64>());
                sim.dcs.bump();
                sim.wake_all();
                true
            }),
            Action::RecordFirstLeader {
                initialize_revision,
            } => self.dcs_write(i, |sim| {
                let rev = sim.dcs.revision + 1;
                match &mut sim.dcs.initialize {
                    Some((record, at)) if *at == *initialize_revision => {
                        record.awaiting_first_leader = false;
                        *at = rev;
                    }
                    _ => return false,
                }
                sim.dcs.bump();
                sim.wake_all();
                true
            }),
            Action::Bootstrap => {
                if self.nodes[i].data.is_some() {
                    self.fail(Kind::DataLoss, format!("{name} ran initdb over its data"));
                }
                self.nodes[i].fencer.writable = true;
                let ms = self.takes(300, 2000);
                self.later(ms, Effect::Bootstrap)
            }
            Action::MoveAside { .. } => {
                if self.nodes[i].role != Role::Stopped {
                    self.fail(
                        Kind::DataLoss,
                        format!("{name} moved a data directory aside while PostgreSQL ran"),
                    );
                }
                self.move_aside(i);
                Ok(None)
            }
            Action::AcquireLeader => self.dcs_write(i, |sim| {
                let Some(id) = lease.filter(|id| sim.dcs.lease_exists(*id)) else {
                    return false;
                };
                if sim.dcs.leader.is_some() {
                    return false;
                }
                sim.dcs.set_leader(name, id);
                sim.wake_all();
                sim.check_election(i);
                true
            }),
            Action::ReleaseLeader { .. } => {
                // Writes stop before the key goes.
                if self.nodes[i].role != Role::Stopped {
                    self.agent_stop(i);
                }
                self.release(i, lease)
            }
            Action::ReleaseStaleLeader { lease_id } => self.release(i, Some(*lease_id)),
            Action::StartPrimary => {
                self.nodes[i].fencer.writable = true;
                let ms = self.takes(100, 1000);
                self.later(ms, Effect::StartPrimary)
            }
            Action::StartReplica { leader } => {
                if let Some(leader) = leader
                    && !view
                        .as_ref()
                        .is_some_and(|v| v.members.contains_key(leader))
                {
                    return Err(format!("{leader} is not a member"));
                }
                let ms = self.takes(100, 1000);
                self.later(ms, Effect::StartReplica(leader.clone()))
            }
            Action::Rejoin { leader } => {
                let plan = self.plan_join(i, leader, view.as_deref(), false)?;
                let ms = self.takes(200, 4000);
                self.later(
                    ms,
                    Effect::Join {
                        leader: leader.clone(),
                        plan,
                    },
                )
            }
            Action::BaseBackup { leader } => {
                if self.nodes[i].data.is_some() {
                    self.fail(Kind::DataLoss, format!("{name} cloned over its data"));
                }
                self.source(i, leader)?;
                let ms = self.takes(1000, 8000);
                self.later(ms, Effect::Clone(leader.clone()))
            }
            Action::Promote { reason } => {
                let Some(wal) = &self.nodes[i].data else {
                    return Err("no data".into());
                };
                let claimed = wal.timeline.max(wal.newest_history) + 1;
                let switch = Lsn(wal.end);
                self.claim_timeline(i, claimed, switch, reason, lease)?;
                self.nodes[i].fencer.writable = true;
                self.guard(i);
                let ms = self.takes(50, 1500);
                self.later(ms, Effect::Promote)
            }
            Action::Follow { leader } => {
                let plan = self.plan_join(i, leader, view.as_deref(), true)?;
                if plan == Plan::AsIs {
                    let ms = self.takes(0, 200);
                    return self.later(ms, Effect::Reload(leader.clone()));
                }
                self.agent_stop(i);
                let ms = self.takes(200, 4000);
                self.later(
                    ms,
                    Effect::Join {
                        leader: leader.clone(),
                        plan,
                    },
                )
            }
            Action::Fence { .. } => {
                if self.plant == Plant::LateFence {
                    let ms = self.timing.loop_wait;
                    return self.later(ms, Effect::LateFence);
                }
                self.agent_stop(i);
                let ms = self.takes(0, 100);
                let ok = !self.fails(20_000);
                self.later(ms, Effect::Stopped(ok))
            }
            Action::SyncSlots { .. } => Ok(None),
            Action::Switchover {
                candidate,
                failover_revision,
            } => self.begin_switchover(i, candidate, *failover_revision, view.as_deref()),
            Action::WriteSync {
                members,
                expected_revision,
            } => self.dcs_write(i, |sim| {
                let revision = sim.dcs.sync.as_ref().map_or(0, |s| s.1);
                if !sim.dcs.holds_leader(&name, lease) || revision != *expected_revision {
                    return false;
                }
                let rev = sim.dcs.bump();
                let state = SyncState {
                    leader: name,
                    members: members.clone(),
                };
                sim.dcs.sync = Some((state, rev));
                sim.wake_all();
                true
            }),
            Action::WriteFailsafe {
                state,
                expected_revision,
            } => {
                // agent.rs `widen_failsafe_peers`: the keeper asks the new
                // members from now on, whether or not the write lands.
                let node = &mut self.nodes[i];
                let own = node.name.clone();
                let peers = node
                    .failsafe_peers
                    .get_or_insert_with(|| (lease.unwrap_or_default(), Vec::new()));
                for member in state.members.keys() {
                    if *member != own && !peers.1.contains(member) {
                        peers.1.push(member.clone());
                    }
                }
                self.dcs_write(i, |sim| {
                    let revision = sim.dcs.failsafe.as_ref().map_or(0, |f| f.1);
                    if !sim.dcs.holds_leader(&name, lease) || revision != *expected_revision {
                        return false;
                    }
                    let rev = sim.dcs.bump();
                    sim.dcs.failsafe = Some((state.clone(), rev));
                    true
                })
            }
            Action::SetSyncStandbys { names, block } => {
                let node = &mut self.nodes[i];
                node.sync_names = names.clone();
                node.sync_block = *block;
                Ok(None)
            }
            Action::ClearFailover {
                failover_revision, ..
            } => self.dcs_write(i, |sim| {
                if sim
                    .dcs
                    .failover
                    .as_ref()
                    .is_some_and(|f| f.1 == *failover_revision)
                {
                    sim.dcs.failover = None;
                    sim.dcs.bump();
                    sim.wake_all();
                }
                true
            }),
            Action::Fatal { reason } => {
                let abandoned = self.nodes[i]
                    .data
                    .as_ref()
                    .is_some_and(|w| !self.recorded_ids.contains(&w.system_id));
                if !abandoned {
                    self.fail(Kind::Fatal, format!("{name} stopped: {reason}"));
                    return Err(reason.clone());
                }
                // Data of a bootstrap that lost its claim (the node was cut
                // off before recording it, another node bootstrapped): the
                // agent stops, as documented, and the operator moves the
                // directory aside.
                self.count(Fault::OperatorMovedAside);
                self.agent_exits(i, self.now + 2_000);
                self.move_aside(i);
                Err(reason.clone())
            }
        }
    }

    fn release(&mut self, i: usize, lease: Option<i64>) -> Started {
        let name = self.nodes[i].name.clone();
        self.dcs_write(i, |sim| {
            if sim.dcs.holds_leader(&name, lease) {
                sim.dcs.leader = None;
                sim.dcs.bump();
                sim.wake_all();
            }
            true
        })
    }

    /// The agent's own immediate stop (through the guard).
    fn agent_stop(&mut self, i: usize) {
        self.stop_pg(i, self.now);
        let node = &mut self.nodes[i];
        node.fencer.writable = false;
        node.following = None;
    }

    fn move_aside(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        node.data = None;
        node.was_primary = false;
        node.claim = None;
        node.moved_aside += 1;
    }

    /// The timeline claim before a promotion: in the data directory, then in
    /// the DCS history while this node holds the leader key.
    fn claim_timeline(
        &mut self,
        i: usize,
        timeline: u32,
        switch_lsn: Lsn,
        reason: &str,
        lease: Option<i64>,
    ) -> Result<(), String> {
        let name = self.nodes[i].name.clone();
        self.nodes[i].claim = Some((timeline, name.clone()));
        let now = self.now;
        if !self.nodes[i].dcs_link(now) || !self.dcs.up(now) {
            return Err("claiming the timeline: DCS unreachable".into());
        }
        if !self.dcs.holds_leader(&name, lease) {
            return Err("claiming the timeline: not the leader".into());
        }
        self.dcs.history.push(HistoryEntry {
            timeline,
            switch_lsn,
            reason: reason.into(),
            new_leader: name,
            at: String::new(),
        });
        self.dcs.bump();
        Ok(())
    }

    /// The leader's PostgreSQL, if this node can reach it running.
    fn source(&self, i: usize, leader: &str) -> Result<usize, String> {
        let p = self
            .nodes
            .iter()
            .position(|n| n.name == leader)
            .ok_or("no such node")?;
        let ok = self.nodes[p].role == Role::Primary
            && self.nodes[p].peer_link(self.now)
            && self.nodes[i].peer_link(self.now);
        if ok {
            Ok(p)
        } else {
            Err(format!("cannot reach a running {leader}"))
        }
    }

    /// What the shell would do to follow `leader`: the core's divergence
    /// check (and timeline claims) on what the agent can read. Judged here
    /// against the truth: following as is onto WAL that is not a prefix of
    /// the leader's is a violation.
    fn plan_join(
        &mut self,
        i: usize,
        leader: &str,
        view: Option<&ClusterView>,
        running: bool,
    ) -> Result<Plan, String> {
        let status = view
            .and_then(|v| v.members.get(leader))
            .map(|m| m.status.clone())
            .ok_or_else(|| format!("{leader} is not a member"))?;
        let p = self.source(i, leader)?;
        if !running && self.nodes[i].was_primary {
            // Crash recovery in single-user mode ends with a checkpoint
            // record: local WAL like any other.
            self.fresh_epoch(i);
            let epoch = self.nodes[i].epoch;
            if let Some(wal) = &mut self.nodes[i].data {
                wal.append(epoch, 1);
            }
            self.nodes[i].was_primary = false;
        }
        let Some(wal) = self.nodes[i].data.clone() else {
            return Err("no data".into());
        };
        let local = LocalWal {
            timeline: wal.timeline,
            end_lsn: Lsn(wal.end),
            history: wal.history.clone(),
        };
        let theirs = self.nodes[p].data.clone().expect("a primary has data");
        let leader_wal = LeaderWal {
            timeline: status.timeline,
            flush_lsn: status.flush_lsn.max(status.received_lsn),
            history: theirs.history.clone(),
        };
        let history = view.map_or(&[][..], |v| &v.history[..]);
        let name = self.nodes[i].name.clone();
        let claim = self.nodes[i].claim.clone();
        let claim = claim.as_ref().map(|(t, n)| (*t, n.as_str()));
        let plan = if foreign_timeline(&name, claim, local.timeline, &leader_wal, history).is_some()
        {
            Plan::Reclone
        } else if divergence(&local, &leader_wal) != Divergence::None {
            Plan::Rewind
        } else {
            Plan::AsIs
        };
        if plan == Plan::AsIs && !wal.is_prefix_of(&theirs) {
            let known = self.divergence_missed(i, &wal, &theirs);
            self.fail_known(
                Kind::DivergedReplica,
                known,
                format!(
                    "{name} follows {leader} without a rewind, but its WAL is not a prefix of \
                     the leader's: local {wal:?}, leader {theirs:?}, DCS history {history:?}"
                ),
            );
        }
        Ok(plan)
    }

    pub(crate) fn fresh_epoch(&mut self, i: usize) {
        self.next_epoch += 1;
        self.nodes[i].epoch = self.next_epoch;
    }

    fn begin_switchover(
        &mut self,
        i: usize,
        candidate: &str,
        failover_revision: i64,
        view: Option<&ClusterView>,
    ) -> Started {
        let candidate_lease = view
            .and_then(|v| v.members.get(candidate))
            .map(|m| m.lease_id)
            .ok_or_else(|| format!("{candidate} has no member key"))?;
        self.count(Fault::SwitchoverRun);
        if self.nodes[i].role == Role::Primary {
            // A clean shutdown: a checkpoint record, shipped to every
            // connected standby before the server exits.
            let epoch = self.nodes[i].epoch;
            if let Some(wal) = &mut self.nodes[i].data {
                wal.append(epoch, 1);
            }
            let mine = self.nodes[i].data.clone().expect("a primary has data");
            for j in 0..self.nodes.len() {
                if self.streams_from(j, i)
                    && let Some(wal) = &self.nodes[j].data
                    && wal.is_prefix_of(&mine)
                {
                    self.nodes[j].data = Some(Wal::streamed_from(&mine, mine.end));
                }
            }
        }
        self.agent_stop(i);
        let end = self.nodes[i].data.as_ref().map_or(0, |w| w.end);
        let ms = self.takes(100, 1500);
        self.later(
            ms,
            Effect::Switchover {
                candidate: candidate.into(),
                candidate_lease,
                end,
                failover_revision,
                waited: false,
            },
        )
    }

    pub(crate) fn complete(&mut self, i: usize, effect: Effect) -> Result<(), String> {
        let now = self.now;
        let name = self.nodes[i].name.clone();
        match effect {
            Effect::Answer(ok) => ok.then_some(()).ok_or("no answer in time".into()),
            Effect::Bootstrap => {
                let refused = self.nodes[i].local(now) >= self.nodes[i].fencer.deadline;
                if refused || self.fails(100_000) {
                    return Err(self.bootstrap_failed(i));
                }
                self.next_system_id += 1;
                self.fresh_epoch(i);
                let node = &mut self.nodes[i];
                let mut wal = Wal {
                    system_id: self.next_system_id,
                    timeline: 1,
                    history: vec![],
                    end: 0,
                    runs: vec![],
                    newest_history: 1,
                };
                wal.append(node.epoch, 100);
                node.data = Some(wal);
                node.was_primary = true;
                self.start_writing(i);
                Ok(())
            }
            Effect::StartPrimary => {
                // The guard never starts a postmaster past its deadline, and
                // PostgreSQL refuses to start a standby's data as a primary.
                let refused =
                    self.nodes[i].local(now) >= self.nodes[i].fencer.deadline + self.guard_delay();
                let standby = !self.nodes[i].was_primary;
                if refused || standby || self.fails(30_000) || self.nodes[i].data.is_none() {
                    self.nodes[i].fencer.writable = false;
                    return Err("starting as primary failed (or was refused)".into());
                }
                self.fresh_epoch(i);
                let node = &mut self.nodes[i];
                node.was_primary = true;
                node.following = None;
                self.start_writing(i);
                Ok(())
            }
            Effect::StartReplica(leader) => {
                if self.fails(30_000) || self.nodes[i].data.is_none() {
                    return Err("starting as replica failed".into());
                }
                // Running in recovery: the control file says so from now on.
                let node = &mut self.nodes[i];
                node.role = Role::Replica;
                node.replica_since = now;
                node.was_primary = false;
                node.following = leader;
                Ok(())
            }
            Effect::Promote => {
                if self.nodes[i].role != Role::Replica || self.fails(50_000) {
                    return Err("promotion failed".into());
                }
                self.check_promotion(i);
                let wal = self.nodes[i].data.as_mut().expect("a replica has data");
                wal.switch_timeline();
                self.promotions += 1;
                self.fresh_epoch(i);
                self.nodes[i].following = None;
                self.start_writing(i);
                let turn = self.nodes[i].ha.acting.as_ref().expect("a turn");
                if let Some(view) = turn.view.clone() {
                    let lease = turn.lease;
                    self.publish(i, &view, lease);
                }
                Ok(())
            }
            Effect::Join { leader, plan } => {
                let p = self.source(i, &leader)?;
                let upstream = self.nodes[p].data.clone().expect("a primary has data");
                let plan = match plan {
                    Plan::Rewind if self.fails(100_000) => Plan::Reclone,
                    plan => plan,
                };
                if plan == Plan::Reclone {
                    self.move_aside(i);
                }
                if plan != Plan::AsIs {
                    self.nodes[i].data = Some(Wal::streamed_from(&upstream, upstream.end));
                    self.nodes[i].claim = self.nodes[p].claim.clone();
                }
                if self.fails(30_000) {
                    return Err("starting as replica failed".into());
                }
                let node = &mut self.nodes[i];
                node.was_primary = false;
                node.role = Role::Replica;
                node.replica_since = now;
                node.following = Some(leader);
                Ok(())
            }
            Effect::Clone(leader) => {
                let p = self.source(i, &leader)?;
                if self.fails(50_000) {
                    return Err("pg_basebackup failed".into());
                }
                if self.nodes[i].data.is_some() {
                    self.fail(Kind::DataLoss, format!("{name} cloned over its data"));
                }
                let upstream = self.nodes[p].data.clone().expect("a primary has data");
                let claim = self.nodes[p].claim.clone();
                let node = &mut self.nodes[i];
                node.data = Some(Wal::streamed_from(&upstream, upstream.end));
                node.claim = claim;
                node.was_primary = false;
                node.role = Role::Replica;
                node.replica_since = now;
                node.following = Some(leader);
                Ok(())
            }
            Effect::Reload(leader) => {
                self.nodes[i].following = Some(leader);
                Ok(())
            }
            Effect::Stopped(ok) => ok.then_some(()).ok_or("the stop timed out".into()),
            Effect::LateFence => {
                self.agent_stop(i);
                Ok(())
            }
            Effect::Switchover {
                candidate,
                candidate_lease,
                end,
                failover_revision,
                waited,
            } => {
                // Asked of the candidate's PostgreSQL: its received position.
                let caught_up = self.peer_link_now(i)
                    && self.nodes.iter().any(|n| {
                        n.name == candidate
                            && n.peer_link(now)
                            && n.data.as_ref().is_some_and(|w| w.end >= end)
                    });
                if !caught_up && !waited {
                    return self
                        .later(
                            self.timing.ttl,
                            Effect::Switchover {
                                candidate,
                                candidate_lease,
                                end,
                                failover_revision,
                                waited: true,
                            },
                        )
                        .map(|next| {
                            let turn = self.nodes[i].ha.acting.as_mut().expect("a turn");
                            turn.current = next;
                        });
                }
                let lease = self.nodes[i].ha.acting.as_ref().and_then(|t| t.lease);
                let handed = caught_up
                    && self.nodes[i].dcs_link(now)
                    && self.dcs.up(now)
                    && self.dcs.holds_leader(&name, lease)
                    && self.dcs.members.get(&candidate).map(|m| m.1) == Some(candidate_lease);
                if handed {
                    self.dcs.set_leader(candidate, candidate_lease);
                    self.wake_all();
                    return Ok(());
                }
                if self.nodes[i].dcs_link(now)
                    && self.dcs.up(now)
                    && self
                        .dcs
                        .failover
                        .as_ref()
                        .is_some_and(|f| f.1 == failover_revision)
                {
                    self.dcs.failover = None;
                    self.dcs.bump();
                    self.wake_all();
                }
                Err("switchover aborted".into())
            }
        }
    }

    /// agent.rs `bootstrap`'s failure path: stop, move aside, give the
    /// leader key and the claim back, wait before claiming again.
    fn bootstrap_failed(&mut self, i: usize) -> String {
        self.agent_stop(i);
        if self.nodes[i].data.is_some() {
            self.move_aside(i);
        }
        let name = self.nodes[i].name.clone();
        let lease = self.nodes[i].lease.id;
        let now = self.now;
        if self.nodes[i].dcs_link(now) && self.dcs.up(now) {
            if self.dcs.holds_leader(&name, lease) {
                self.dcs.leader = None;
                self.dcs.bump();
                self.wake_all();
            }
            let revision = self.nodes[i]
                .ha
                .acting
                .as_ref()
                .and_then(|t| t.view.as_ref())
                .map(|v| v.initialize_revision);
            if revision.is_some() && self.dcs.initialize.as_ref().map(|r| r.1) == revision {
                self.dcs.initialize = None;
                self.dcs.bump();
            }
        }
        let local = Millis(self.nodes[i].local(now));
        self.nodes[i].core.bootstrap_failed(local);
        "bootstrap failed".into()
    }

    /// PostgreSQL is a running primary from now on (and, for the oracle,
    /// accepts writes): the guard must already hold a live deadline.
    fn start_writing(&mut self, i: usize) {
        self.nodes[i].role = Role::Primary;
        self.guard(i);
        if self.nodes[i].role == Role::Primary {
            self.begin_writing(i);
        }
    }
}
