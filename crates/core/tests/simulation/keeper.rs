//! Each node's lease keeper, fed exactly as the agent's `keep_lease` feeds
//! the core's `LeaseClock`: a renewal round every `renew_interval` (a grant
//! while it holds no lease), the leader-key check after a confirmed renewal
//! while PostgreSQL may be writable (and the absence check when only a
//! failsafe promise could use it), a new lease to take the key back, and the
//! failsafe confirmations from the members on the leader's list. Every
//! deadline goes to the node's fencing guard, which stops a writable
//! PostgreSQL at that deadline on the node's own clock, whatever the agent
//! is doing.

use mainstay_core::Millis;
use mainstay_core::lease::{KeyCheck, LeaseClock, Next, Renewal};

use crate::driver::Sim;
use crate::faults::Fault;
use crate::oracle::Kind;
use crate::{Plant, STEP_MS};

/// One request to etcd: etcd applies it when it arrives; the agent sees the
/// answer if it comes back before its timeout.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Req {
    arrives: u64,
    responds: u64,
    timeout_at: u64,
    lost: bool,
    applied: bool,
    result: Answer,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Answer {
    None,
    Lease(Option<i64>),
    Key { ours: bool, absent: bool },
}

#[derive(Clone, Copy, Debug)]
pub(crate) enum Ask {
    KeepAlive(i64),
    Grant,
    Key(i64),
    Absent,
}

#[derive(Clone, Copy, Debug)]
pub(crate) enum Phase {
    Idle,
    Renewing {
        sent: u64,
        ask: Ask,
        req: Req,
    },
    CheckingKey {
        sent: u64,
        id: i64,
        ask: Ask,
        req: Req,
        writable: bool,
    },
    Granting {
        next: Next,
        req: Req,
    },
    Asking {
        asked: u64,
        until: u64,
        all: bool,
    },
}

pub(crate) struct Keeper {
    pub(crate) clock: LeaseClock,
    /// Local time of the ticker's next tick.
    pub(crate) next_tick: u64,
    pub(crate) phase: Phase,
}

impl Keeper {
    pub(crate) fn new(clock: LeaseClock) -> Keeper {
        Keeper {
            next_tick: clock.lease().valid_until.0,
            clock,
            phase: Phase::Idle,
        }
    }
}

impl Sim {
    /// A fresh agent: a keeper with no lease, ticking at once.
    pub(crate) fn new_keeper(&self, i: usize) -> Keeper {
        let now = self.nodes[i].local(self.now);
        Keeper::new(LeaseClock::new(self.lease_timing(), Millis(now)))
    }

    fn request(&mut self, i: usize, ask: Ask) -> Req {
        let now = self.now;
        let node = &self.nodes[i];
        let lost = !node.dcs_link(now)
            || !self.dcs.up(now)
            || self.rng.chance(node.renew_loss_per_million);
        let max = node.request_delay_max;
        let to = self.rng.below(max);
        let back = self.rng.below(max);
        let local = node.local(now);
        let timeout_at = node.clock.true_at(local + self.timing.dcs_timeout);
        let mut req = Req {
            arrives: now + to,
            responds: now + to + back,
            timeout_at,
            lost,
            applied: false,
            result: Answer::None,
        };
        self.arrive(i, ask, &mut req);
        req
    }

    /// etcd applies a request the moment it arrives, whatever becomes of
    /// the answer.
    fn arrive(&mut self, i: usize, ask: Ask, req: &mut Req) {
        if req.applied || req.lost || self.now < req.arrives {
            return;
        }
        req.applied = true;
        if !self.dcs.up(self.now) {
            req.lost = true;
            return;
        }
        let now = self.now;
        req.result = match ask {
            Ask::KeepAlive(id) => Answer::Lease(self.dcs.keep_alive(id, now)),
            Ask::Grant => Answer::Lease(Some(self.dcs.grant(now))),
            Ask::Key(id) => Answer::Key {
                ours: self.dcs.holds_leader(&self.nodes[i].name, Some(id)),
                absent: self.dcs.leader.is_none(),
            },
            Ask::Absent => Answer::Key {
                ours: false,
                absent: self.dcs.leader.is_none(),
            },
        };
    }

    /// `Some(answer)` once the agent knows how the request ended (`None`
    /// inside: no answer in time).
    fn resolve(&mut self, i: usize, req: &Req) -> Option<Option<Answer>> {
        let now = self.now;
        // A request that never reaches etcd (or whose answer is lost) ends
        // with the agent's timeout.
        let due = if req.lost {
            req.timeout_at
        } else {
            req.responds.min(req.timeout_at)
        };
        if now < due {
            return None;
        }
        let node = &self.nodes[i];
        let mut answered = !req.lost && req.responds <= req.timeout_at && node.dcs_link(now);
        // Thawed after both the answer and the timer were due: either may
        // win the race inside the agent.
        if answered && now > req.timeout_at + STEP_MS {
            answered = self.rng.chance(500_000);
        }
        Some(answered.then_some(req.result))
    }

    /// One step of every lease keeper.
    pub(crate) fn keep_leases(&mut self) {
        for i in 0..self.nodes.len() {
            if !self.nodes[i].agent_alive {
                continue;
            }
            // Requests already sent reach etcd even from a frozen agent.
            let mut phase = self.nodes[i].keeper.phase;
            match &mut phase {
                Phase::Renewing { ask, req, .. } | Phase::CheckingKey { ask, req, .. } => {
                    self.arrive(i, *ask, req)
                }
                Phase::Granting { req, .. } => self.arrive(i, Ask::Grant, req),
                _ => {}
            }
            self.nodes[i].keeper.phase = phase;
            if self.nodes[i].agent_runs(self.now) {
                self.keeper_step(i);
            }
        }
    }

    fn keeper_step(&mut self, i: usize) {
        for _ in 0..4 {
            let local = self.nodes[i].local(self.now);
            let phase = self.nodes[i].keeper.phase;
            let next = match phase {
                Phase::Idle => {
                    let keeper = &self.nodes[i].keeper;
                    if local < keeper.next_tick {
                        return;
                    }
                    self.members_changed(i);
                    let keeper = &self.nodes[i].keeper;
                    // tokio's interval, MissedTickBehavior::Delay.
                    let late = local >= keeper.next_tick + STEP_MS;
                    let tick = if late { local } else { keeper.next_tick };
                    self.nodes[i].keeper.next_tick = tick + self.timing.renew;
                    let ask = match self.nodes[i].keeper.clock.lease().id {
                        Some(id) => Ask::KeepAlive(id),
                        None => Ask::Grant,
                    };
                    let req = self.request(i, ask);
                    Phase::Renewing {
                        sent: local,
                        ask,
                        req,
                    }
                }
                Phase::Renewing { sent, ask, req } => {
                    let Some(answer) = self.resolve(i, &req) else {
                        return;
                    };
                    let outcome = match (answer, ask) {
                        (Some(Answer::Lease(Some(id))), _) => Renewal::Confirmed(id),
                        (Some(Answer::Lease(None)), Ask::KeepAlive(_)) => Renewal::Expired,
                        _ => Renewal::NoAnswer,
                    };
                    let writable = self.nodes[i].fencer.writable;
                    match outcome {
                        Renewal::Confirmed(id) if writable => {
                            let ask = Ask::Key(id);
                            let req = self.request(i, ask);
                            Phase::CheckingKey {
                                sent,
                                id,
                                ask,
                                req,
                                writable,
                            }
                        }
                        _ => self.renewed(i, sent, outcome, None, writable),
                    }
                }
                Phase::CheckingKey {
                    sent,
                    id,
                    ask,
                    req,
                    writable,
                } => {
                    let Some(answer) = self.resolve(i, &req) else {
                        return;
                    };
                    let key = match (ask, answer) {
                        (Ask::Key(_), Some(Answer::Key { ours: true, .. })) => KeyCheck::Ours,
                        (Ask::Key(_), Some(Answer::Key { .. }))
                            if self.nodes[i].keeper.clock.wants_absence_check() =>
                        {
                            let ask = Ask::Absent;
                            let req = self.request(i, ask);
                            self.nodes[i].keeper.phase = Phase::CheckingKey {
                                sent,
                                id,
                                ask,
                                req,
                                writable,
                            };
                            continue;
                        }
                        (Ask::Key(_), Some(_)) => KeyCheck::NotOurs { absent: false },
                        (Ask::Key(_), None) => KeyCheck::Unknown,
                        (_, Some(Answer::Key { absent, .. })) => KeyCheck::NotOurs { absent },
                        (_, _) => KeyCheck::NotOurs { absent: false },
                    };
                    self.renewed(i, sent, Renewal::Confirmed(id), Some(key), writable)
                }
                Phase::Granting { next, req } => {
                    let Some(answer) = self.resolve(i, &req) else {
                        return;
                    };
                    let granted = match answer {
                        Some(Answer::Lease(id)) => id,
                        _ => None,
                    };
                    self.nodes[i].keeper.clock.failsafe_lease_granted(granted);
                    self.after_renewal(i, next)
                }
                Phase::Asking { asked, until, all } => {
                    if self.now < until {
                        return;
                    }
                    self.log(|| {
                        format!(
                            "{} keeper: members asked at {asked}: all {all}",
                            self.nodes[i].name
                        )
                    });
                    if all {
                        let asking = self.nodes[i].asking.take();
                        self.nodes[i].confirmed_by = asking;
                        self.nodes[i].keeper.clock.members_confirmed(Millis(asked));
                        self.publish_lease(i);
                    }
                    Phase::Idle
                }
            };
            self.nodes[i].keeper.phase = next;
            if matches!(next, Phase::Idle) && local < self.nodes[i].keeper.next_tick {
                return;
            }
        }
    }

    fn renewed(
        &mut self,
        i: usize,
        sent: u64,
        outcome: Renewal,
        key: Option<KeyCheck>,
        writable: bool,
    ) -> Phase {
        let now = Millis(self.nodes[i].local(self.now));
        let next = self.nodes[i]
            .keeper
            .clock
            .on_renewal(Millis(sent), now, outcome, key, writable);
        self.log(|| {
            format!(
                "{} keeper: renewal sent {sent} -> {outcome:?}, key {key:?}, writable {writable}: \
                 {:?} {next:?}",
                self.nodes[i].name,
                self.nodes[i].keeper.clock.lease()
            )
        });
        if let Some(why) = next.fenced {
            self.log(|| format!("{} keeper: {why}", self.nodes[i].name));
        }
        if next.grant_for_take_back {
            self.log(|| format!("{} keeper: failsafe take-back lease", self.nodes[i].name));
            let req = self.request(i, Ask::Grant);
            return Phase::Granting { next, req };
        }
        self.after_renewal(i, next)
    }

    fn after_renewal(&mut self, i: usize, next: Next) -> Phase {
        self.publish_lease(i);
        if next.wake_loop {
            self.wake(i, 0);
        }
        if !next.ask_members {
            return Phase::Idle;
        }
        self.ask_members(i)
    }

    /// The keeper hands the lease to the HA loop and the deadline to the
    /// guard (which fences at once if it has passed).
    pub(crate) fn publish_lease(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        let lease = node.keeper.clock.lease();
        node.lease = lease;
        node.fencer.deadline = lease.valid_until.0;
        self.guard(i);
    }

    /// agent.rs `keep_lease`: the list now names a member the current
    /// promise did not come from, so the promise no longer covers it.
    fn members_changed(&mut self, i: usize) {
        let node = &self.nodes[i];
        if !node.keeper.clock.lease().members_confirmed {
            return;
        }
        let lease = node.keeper.clock.lease().id;
        let by: &[String] = node.confirmed_by.as_ref().map_or(&[], |(by, _)| by);
        let grew = node
            .failsafe_peers
            .as_ref()
            .filter(|(l, _)| Some(*l) == lease)
            .is_some_and(|(_, now)| now.iter().any(|p| !by.contains(p)));
        if grew {
            self.log(|| format!("{} keeper: the failsafe list changed", self.nodes[i].name));
            self.nodes[i].keeper.clock.members_changed();
            self.publish_lease(i);
        }
    }

    /// `POST /failsafe` to every member on the list this leader keeps; each
    /// one that answers promises not to take over for a ttl.
    fn ask_members(&mut self, i: usize) -> Phase {
        let now = self.now;
        let asked = self.nodes[i].local(now);
        let lease = self.nodes[i].keeper.clock.lease().id;
        // A list with nobody else on it confirms nothing (agent.rs
        // `Failsafe::confirmed`).
        let Some(peers) = self.nodes[i]
            .failsafe_peers
            .clone()
            .filter(|(l, p)| Some(*l) == lease && !p.is_empty())
            .map(|(_, p)| p)
        else {
            return Phase::Idle;
        };
        self.count(Fault::FailsafeAsk);
        self.nodes[i].asking = Some((peers.clone(), now));
        let leader = self.nodes[i].name.clone();
        let mut all = true;
        for peer in peers {
            let Some(j) = self.nodes.iter().position(|n| n.name == peer) else {
                all = false;
                continue;
            };
            let member = &self.nodes[j];
            let reachable = self.nodes[i].peer_link(now)
                && member.peer_link(now)
                && member.agent_runs(now)
                && !self.rng.chance(self.nodes[i].renew_loss_per_million / 4);
            let refuses = member.dcs_reachable
                && member
                    .last_view
                    .as_ref()
                    .and_then(|v| v.leader_name())
                    .is_some_and(|l| l != leader);
            if !reachable || refuses {
                all = false;
                continue;
            }
            let at = member.local(now);
            self.nodes[j].failsafe_contact = Some((leader.clone(), at));
        }
        let until = if all {
            now + self.rng.below(3 * STEP_MS)
        } else {
            let local = self.nodes[i].local(now);
            self.nodes[i].clock.true_at(local + self.timing.dcs_timeout)
        };
        Phase::Asking { asked, until, all }
    }

    /// The node's fencing guard: armed with the last deadline while the
    /// agent declared the server writable, it stops a running PostgreSQL
    /// when the node's clock reaches it. It runs unless the host is
    /// suspended, whatever the agent is doing.
    pub(crate) fn guard(&mut self, i: usize) {
        let now = self.now;
        let node = &self.nodes[i];
        if node.role == crate::model::Role::Stopped || !node.fencer.writable || node.suspended(now)
        {
            return;
        }
        let deadline = node.fencer.deadline + self.guard_delay();
        if node.local(now) < deadline {
            return;
        }
        let at = node.clock.true_at(deadline).min(now);
        self.log(|| format!("{}: the guard fences at its deadline {deadline}", node.name));
        self.count(Fault::GuardFenced);
        self.stop_pg(i, at);
    }

    /// The planted late guard, or none.
    pub(crate) fn guard_delay(&self) -> u64 {
        if self.plant == Plant::LateFence {
            self.timing.loop_wait
        } else {
            0
        }
    }

    /// The guard's deadline check, done by the oracle: the exact deadline the
    /// guard was given, not the (planted) moment it acts.
    pub(crate) fn check_deadlines(&self) {
        for node in &self.nodes {
            if node.accepts_writes(self.now)
                && node.fencer.writable
                && node.local(self.now) >= node.fencer.deadline
            {
                self.fail(
                    Kind::PastDeadline,
                    format!(
                        "{} accepts writes at {} on its clock, past its fencing deadline {}",
                        node.name,
                        node.local(self.now),
                        node.fencer.deadline
                    ),
                );
            }
            if node.accepts_writes(self.now) && !node.fencer.writable {
                self.fail(
                    Kind::PastDeadline,
                    format!("{} accepts writes without an armed guard", node.name),
                );
            }
        }
    }
}
