//! Seeded faults: which kinds a seed gets, when each strikes, and the end
//! of all of them (after which the cluster must converge).

use mainstay_core::switchover::{Lag, best_candidate, unfit_candidate};
use mainstay_core::{FailoverKind, FailoverRequest, PgRole};

use crate::driver::Sim;
use crate::model::{Clock, Rng, Role};

/// Everything counted per seed (a bit each in `Sim::seen`): fault kinds,
/// seed-wide settings, and a few events that show the faults bite.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fault {
    AgentCrash,
    PgCrash,
    DcsCut,
    RenewalTrouble,
    ReplicationLag,
    AgentFreeze,
    ClockDrift,
    NodeSuspend,
    SlowActions,
    ActionFailure,
    StaleView,
    WatchDelay,
    FailsafeMode,
    EtcdQuorumLoss,
    EtcdCutFromAll,
    MemberRejoinDuringOutage,
    SwitchoverRequest,
    FailoverRequest,
    SyncCountAboveOne,
    StrictSync,
    PeerCut,
    FastTiming,
    GuardFenced,
    FailsafeAsk,
    SwitchoverRun,
    OperatorMovedAside,
    EtcdKeysLost,
}

impl Fault {
    pub(crate) const ALL: [Fault; 27] = [
        Fault::AgentCrash,
        Fault::PgCrash,
        Fault::DcsCut,
        Fault::RenewalTrouble,
        Fault::ReplicationLag,
        Fault::AgentFreeze,
        Fault::ClockDrift,
        Fault::NodeSuspend,
        Fault::SlowActions,
        Fault::ActionFailure,
        Fault::StaleView,
        Fault::WatchDelay,
        Fault::FailsafeMode,
        Fault::EtcdQuorumLoss,
        Fault::EtcdCutFromAll,
        Fault::MemberRejoinDuringOutage,
        Fault::SwitchoverRequest,
        Fault::FailoverRequest,
        Fault::SyncCountAboveOne,
        Fault::StrictSync,
        Fault::PeerCut,
        Fault::FastTiming,
        Fault::GuardFenced,
        Fault::FailsafeAsk,
        Fault::SwitchoverRun,
        Fault::OperatorMovedAside,
        Fault::EtcdKeysLost,
    ];
}

/// The kinds of fault one seed may get (the classic ones, crashes,
/// partitions from etcd, lost renewals and lag, every seed gets).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct FaultPlan {
    pub(crate) freeze: bool,
    pub(crate) drift: bool,
    pub(crate) suspend: bool,
    pub(crate) slow_actions: bool,
    pub(crate) stale_views: bool,
    pub(crate) failsafe: bool,
    pub(crate) etcd_outage: bool,
    pub(crate) rejoin_during_outage: bool,
    pub(crate) switchover: bool,
    pub(crate) manual_failover: bool,
    pub(crate) sync_count_above_one: bool,
    pub(crate) peer_cut: bool,
    pub(crate) fast_timing: bool,
    pub(crate) keys_lost: bool,
}

/// The member-rejoins-during-outage sequence, step by step.
#[derive(Clone, Debug, Default)]
pub(crate) enum Rejoin {
    #[default]
    Off,
    /// Crash a member at this time (retried until there is a leader).
    Planned(u64),
    /// The member is down; once the leader's failsafe list dropped it, the
    /// leader loses etcd.
    MemberDown {
        member: usize,
        leader: usize,
        since: u64,
    },
    /// The leader is cut off from etcd; the member comes back then.
    LeaderCut {
        member: usize,
        back_at: u64,
    },
    Done,
}

impl FaultPlan {
    pub(crate) fn draw(rng: &mut Rng, nodes: usize) -> FaultPlan {
        let mut pick = |per_million| rng.chance(per_million);
        let failsafe = pick(300_000);
        FaultPlan {
            freeze: pick(300_000),
            drift: pick(500_000),
            suspend: pick(250_000),
            slow_actions: pick(500_000),
            stale_views: pick(300_000),
            failsafe,
            etcd_outage: pick(if failsafe { 700_000 } else { 250_000 }),
            rejoin_during_outage: failsafe && nodes > 2 && pick(500_000),
            switchover: pick(300_000),
            manual_failover: pick(200_000),
            sync_count_above_one: nodes > 2 && pick(400_000),
            peer_cut: pick(400_000),
            fast_timing: pick(250_000),
            keys_lost: pick(300_000),
        }
    }
}

impl Sim {
    /// Seed-wide settings count once, up front.
    pub(crate) fn count_plan(&mut self) {
        let plan = self.plan;
        for (on, fault) in [
            (plan.drift, Fault::ClockDrift),
            (plan.slow_actions, Fault::SlowActions),
            (plan.failsafe, Fault::FailsafeMode),
            (
                self.config.synchronous_node_count > 1,
                Fault::SyncCountAboveOne,
            ),
            (self.config.synchronous_mode_strict, Fault::StrictSync),
            (plan.fast_timing, Fault::FastTiming),
        ] {
            if on {
                self.count(fault);
            }
        }
        if plan.rejoin_during_outage {
            self.rejoin = Rejoin::Planned(5_000 + self.rng.below(30_000));
        }
    }

    pub(crate) fn inject_faults(&mut self) {
        let now = self.now;
        for i in 0..self.nodes.len() {
            if self.nodes[i].agent_alive && self.rng.chance(1_500) {
                let down = 500 + self.rng.below(10_000);
                self.log(|| {
                    format!("FAULT agent {i} crashes for {down} ms (the guard fences at once)")
                });
                self.crash_agent(i, now + down);
            }
            if self.nodes[i].role != Role::Stopped && self.rng.chance(1_500) {
                self.log(|| format!("FAULT PostgreSQL on {i} crashes"));
                self.count(Fault::PgCrash);
                self.stop_pg(i, now);
            }
            if self.rng.chance(1_500) {
                let until = now + 500 + self.rng.below(8_000);
                self.log(|| format!("FAULT node {i} cut off from the DCS until {until}"));
                self.count(Fault::DcsCut);
                self.cut_from_dcs(i, until);
            }
            if self.rng.chance(2_000) {
                let loss = self.rng.below(600_000);
                let delay = self.rng.below(self.timing.dcs_timeout * 3 / 2);
                self.log(|| {
                    format!("FAULT node {i} requests: loss {loss}/1e6, delay up to {delay} ms")
                });
                self.count(Fault::RenewalTrouble);
                self.nodes[i].renew_loss_per_million = loss;
                self.nodes[i].request_delay_max = delay.max(1);
            }
            if self.rng.chance(3_000) {
                self.count(Fault::ReplicationLag);
                self.nodes[i].lag_until = now + self.rng.below(5_000);
            }
            if self.plan.freeze
                && self.nodes[i].agent_alive
                && now >= self.nodes[i].frozen_until
                && self.rng.chance(700)
            {
                let until = now + 500 + self.rng.below(12_000);
                self.log(|| format!("FAULT agent {i} frozen until {until}"));
                self.count(Fault::AgentFreeze);
                let node = &mut self.nodes[i];
                node.frozen_until = until;
                node.back_at = node.back_at.max(until);
            }
            if self.plan.suspend && !self.nodes[i].asleep && self.rng.chance(400) {
                let until = now + 500 + self.rng.below(15_000);
                self.log(|| format!("FAULT host {i} suspended until {until}"));
                self.count(Fault::NodeSuspend);
                self.end_writing(i, now);
                let node = &mut self.nodes[i];
                node.suspended_until = until;
                node.asleep = true;
                node.back_at = node.back_at.max(until);
            }
            if self.plan.peer_cut && self.rng.chance(1_000) {
                let until = now + 500 + self.rng.below(8_000);
                self.log(|| format!("FAULT node {i} cut off from the other nodes until {until}"));
                self.count(Fault::PeerCut);
                let node = &mut self.nodes[i];
                node.peer_cut_until = node.peer_cut_until.max(until);
            }
        }
        if self.plan.etcd_outage && self.dcs.up(now) && self.rng.chance(400) {
            let until = now + 2_000 + self.rng.below(13_000);
            if self.rng.chance(500_000) {
                self.log(|| format!("FAULT etcd loses its quorum until {until}"));
                self.count(Fault::EtcdQuorumLoss);
                self.dcs.down_until = until;
                self.dcs_was_down = true;
            } else {
                self.log(|| format!("FAULT every node cut off from etcd until {until}"));
                self.count(Fault::EtcdCutFromAll);
                for i in 0..self.nodes.len() {
                    self.cut_from_dcs(i, until);
                }
            }
        }
        if self.plan.keys_lost && self.settled() && self.dcs.up(now) && self.rng.chance(2_000) {
            self.log(|| "FAULT every key of the cluster is deleted from etcd".into());
            self.count(Fault::EtcdKeysLost);
            self.dcs.lose_every_key();
            self.wake_all();
        }
        if self.plan.switchover && self.rng.chance(1_500) {
            self.operator_request(FailoverKind::Switchover);
        }
        if self.plan.manual_failover && self.rng.chance(1_000) {
            self.operator_request(FailoverKind::Failover);
        }
        self.rejoin_step();
    }

    fn crash_agent(&mut self, i: usize, restart_at: u64) {
        self.count(Fault::AgentCrash);
        self.agent_exits(i, restart_at);
    }

    /// The agent's process ends; it starts again at `restart_at`.
    pub(crate) fn agent_exits(&mut self, i: usize, restart_at: u64) {
        // The guard sees its socket close and fences at once.
        self.stop_pg(i, self.now);
        let node = &mut self.nodes[i];
        node.agent_alive = false;
        node.restart_at = restart_at;
        node.back_at = node.back_at.max(restart_at);
    }

    fn cut_from_dcs(&mut self, i: usize, until: u64) {
        let node = &mut self.nodes[i];
        node.dcs_cut_until = node.dcs_cut_until.max(until);
        node.back_at = node.back_at.max(until);
    }

    /// An operator's request through the REST API, with the API's checks.
    fn operator_request(&mut self, kind: FailoverKind) {
        if !self.dcs.up(self.now) || self.dcs.failover.is_some() {
            return;
        }
        let view = self.dcs.view();
        let names: Vec<String> = self.nodes.iter().map(|n| n.name.clone()).collect();
        let pick = names[self.rng.below(names.len() as u64) as usize].clone();
        let leader = view.leader_name().map(str::to_string);
        let request = match (kind, leader) {
            (FailoverKind::Switchover, Some(leader)) => {
                let candidate = self.rng.chance(500_000).then_some(pick);
                let refused = match &candidate {
                    Some(c) => {
                        unfit_candidate(&view, &leader, Lag::Unknown, c, &self.config).is_some()
                    }
                    None => best_candidate(&view, &leader, Lag::Unknown, &self.config).is_err(),
                };
                if refused {
                    return;
                }
                self.count(Fault::SwitchoverRequest);
                FailoverRequest {
                    kind,
                    leader: Some(leader),
                    candidate,
                    scheduled_at: None,
                    requested_at: self.now / 1000,
                }
            }
            (FailoverKind::Switchover, None) => return,
            (FailoverKind::Failover, leader) => {
                let refused = match &leader {
                    Some(leader) => {
                        unfit_candidate(&view, leader, Lag::Unknown, &pick, &self.config).is_some()
                    }
                    None if self.config.synchronous_mode
                        && !mainstay_core::sync::may_take_over(&view, &pick) =>
                    {
                        true
                    }
                    None if mainstay_core::first_leader::candidate_behind(&view, &pick)
                        .is_some() =>
                    {
                        true
                    }
                    None => view
                        .members
                        .get(&pick)
                        .is_none_or(|m| m.status.role == PgRole::Stopped && m.status.timeline == 0),
                };
                if refused {
                    return;
                }
                self.count(Fault::FailoverRequest);
                FailoverRequest {
                    kind,
                    leader: None,
                    candidate: Some(pick),
                    scheduled_at: None,
                    requested_at: self.now / 1000,
                }
            }
        };
        self.log(|| format!("REQUEST {request:?}"));
        let revision = self.dcs.bump();
        self.dcs.failover = Some((request, revision));
        self.wake_all();
    }

    /// Every node runs, the leader's a writable primary and every other
    /// node a replica on its timeline: the state an operator's slip
    /// (`etcdctl del --prefix`) may strike. Not earlier: with the keys gone,
    /// nothing in the DCS says which data is newest, so keys lost while a
    /// failover is under way can let an old primary's data lead (if every
    /// node with the newer timeline is out of reach), and a node without
    /// data bootstraps a new cluster, as with Patroni. Nor in failsafe
    /// mode: the `failsafe` key, which tells who promised the primary not
    /// to take over, goes with the others.
    fn settled(&self) -> bool {
        if self.config.failsafe_mode {
            return false;
        }
        let Some(leader) = &self.dcs.leader else {
            return false;
        };
        let Some(primary) = self.nodes.iter().find(|n| n.name == leader.name) else {
            return false;
        };
        let timeline = primary.data.as_ref().map(|w| w.timeline);
        primary.role == Role::Primary
            && self.nodes.iter().all(|n| {
                n.agent_alive
                    && n.data.as_ref().map(|w| w.timeline) == timeline
                    && (n.name == leader.name
                        || (n.role == Role::Replica
                            && n.following.as_deref() == Some(leader.name.as_str())))
            })
    }

    /// After the keys were lost with no old primary's data left to lead
    /// (a failover was under way, say), the agents wait for an operator:
    /// this one reads the members' positions and names the furthest ahead
    /// with a manual failover, as docs/operations.md tells them to.
    pub(crate) fn operator_names_first_leader(&mut self) {
        let awaiting = self
            .dcs
            .initialize
            .as_ref()
            .is_some_and(|(record, _)| record.awaiting_first_leader);
        if !awaiting || self.dcs.leader.is_some() || self.dcs.failover.is_some() {
            return;
        }
        let view = self.dcs.view();
        let furthest = view
            .members
            .values()
            .filter(|m| !m.status.witness)
            .max_by_key(|m| {
                (
                    m.status.timeline,
                    m.status.received_lsn.max(m.status.replayed_lsn),
                )
            });
        let Some(candidate) = furthest.map(|m| m.status.name.clone()) else {
            return;
        };
        let request = FailoverRequest {
            kind: FailoverKind::Failover,
            leader: None,
            candidate: Some(candidate),
            scheduled_at: None,
            requested_at: self.now / 1000,
        };
        self.log(|| format!("OPERATOR names the first leader: {request:?}"));
        let revision = self.dcs.bump();
        self.dcs.failover = Some((request, revision));
        self.wake_all();
    }

    /// A member restarts while etcd is healthy and stays away long enough
    /// to drop off the leader's failsafe list; the leader then loses etcd
    /// (not its members); the member comes back while the leader writes on
    /// the other members' confirmation.
    fn rejoin_step(&mut self) {
        let now = self.now;
        match self.rejoin.clone() {
            Rejoin::Planned(at) if now >= at => {
                let leader = self.dcs.leader.as_ref().and_then(|l| {
                    self.nodes
                        .iter()
                        .position(|n| n.name == l.name && n.role == Role::Primary)
                });
                let Some(leader) = leader else {
                    self.rejoin = Rejoin::Planned(now + 2_000);
                    return;
                };
                let member = (0..self.nodes.len())
                    .find(|&j| j != leader && self.nodes[j].agent_alive)
                    .filter(|_| self.dcs.up(now));
                let Some(member) = member else {
                    self.rejoin = Rejoin::Planned(now + 2_000);
                    return;
                };
                self.log(|| format!("SEQUENCE member {member} restarts while etcd is healthy"));
                self.crash_agent(member, u64::MAX);
                self.rejoin = Rejoin::MemberDown {
                    member,
                    leader,
                    since: now,
                };
            }
            Rejoin::MemberDown {
                member,
                leader,
                since,
            } => {
                let name = &self.nodes[member].name;
                let dropped = self
                    .dcs
                    .failsafe
                    .as_ref()
                    .is_some_and(|(f, _)| !f.members.contains_key(name))
                    && !self.dcs.members.contains_key(name);
                if dropped && self.nodes[leader].role == Role::Primary {
                    let until = now + 8_000 + self.rng.below(8_000);
                    self.log(|| format!("SEQUENCE leader {leader} loses etcd until {until}"));
                    self.cut_from_dcs(leader, until);
                    self.rejoin = Rejoin::LeaderCut {
                        member,
                        back_at: now + 1_000 + self.rng.below(2_000),
                    };
                } else if now > since + 20_000 {
                    self.nodes[member].restart_at = now;
                    self.rejoin = Rejoin::Done;
                }
            }
            Rejoin::LeaderCut { member, back_at } if now >= back_at => {
                self.log(|| format!("SEQUENCE member {member} comes back"));
                self.count(Fault::MemberRejoinDuringOutage);
                self.nodes[member].restart_at = now;
                self.rejoin = Rejoin::Done;
            }
            _ => {}
        }
    }

    /// The faults stop: links heal, frozen agents thaw, hosts resume, etcd
    /// is back, dead agents restart. Clocks keep their drift.
    pub(crate) fn heal(&mut self) {
        self.log(|| "faults stop".into());
        let now = self.now;
        for node in &mut self.nodes {
            node.dcs_cut_until = node.dcs_cut_until.min(now);
            node.peer_cut_until = node.peer_cut_until.min(now);
            node.frozen_until = node.frozen_until.min(now);
            node.suspended_until = node.suspended_until.min(now);
            node.renew_loss_per_million = 0;
            node.request_delay_max = 20;
            node.lag_until = 0;
            if !node.agent_alive {
                node.restart_at = node.restart_at.min(now);
            }
        }
        self.dcs.down_until = self.dcs.down_until.min(now);
        self.rejoin = Rejoin::Done;
    }

    /// etcd regained its quorum: a new leader extends every lease.
    pub(crate) fn etcd_back(&mut self) {
        if self.dcs_was_down && self.dcs.up(self.now) {
            self.dcs_was_down = false;
            self.dcs.recover(self.now);
            self.wake_all();
        }
    }
}

/// A drifting clock for a host (or etcd), ±1 %.
pub(crate) fn drifting(rng: &mut Rng) -> Clock {
    Clock {
        offset: rng.below(1_000_000_000),
        ppm: rng.below(20_001) as i64 - 10_000,
    }
}
