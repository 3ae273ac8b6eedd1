//! The invariants, checked after every stage of every step, and
//! convergence once the faults stop. The oracle reads the model's ground
//! truth (who writes when, on which clock, which bytes each WAL holds and
//! who wrote them) and shares no code with the core it judges: in
//! particular the lost-commit check is bookkeeping of the writable session
//! that wrote each acknowledged commit, never `timeline::divergence`.

use std::collections::BTreeMap;
use std::fmt;

use crate::driver::Sim;
use crate::known::KnownBug;
use crate::model::{Role, Wal};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Two PostgreSQL servers accepted writes at overlapping times.
    TwoWriters,
    /// A server accepted a write at or past the deadline its guard holds
    /// (or without an armed guard).
    PastDeadline,
    /// A server accepted writes while the leader key named another node.
    WriterNotLeader,
    /// A server accepted writes while etcd could have expired its lease
    /// (outside a failsafe promise from every member).
    LeaseExpired,
    /// Synchronous mode: a node without every acknowledged commit became
    /// writable, or the final primary lacks one.
    LostCommit,
    /// A node took the leader key in an election while an eligible member
    /// had more WAL on its timeline.
    BehindPromotion,
    /// A node followed a leader without a rewind onto WAL that is not a
    /// prefix of the leader's.
    DivergedReplica,
    /// A data directory was overwritten or moved aside under a running server.
    DataLoss,
    /// An agent stopped with a fatal error.
    Fatal,
    /// The cluster did not settle once the faults stopped.
    NoConvergence,
    /// The simulator itself panicked.
    Panic,
}

#[derive(Clone, Debug)]
pub(crate) struct Violation {
    pub(crate) kind: Kind,
    /// A bug of the core already known (see `known`), not yet fixed.
    pub(crate) known: Option<KnownBug>,
    pub(crate) seed: u64,
    pub(crate) at: u64,
    pub(crate) message: String,
    pub(crate) state: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "simulation seed {} failed at {} ms ({:?}{}): {}\n{}\nreplay: MAINSTAY_SIM_SEED={} \
             cargo test -p mainstay-core --test simulation -- --nocapture",
            self.seed,
            self.at,
            self.kind,
            self.known
                .map_or(String::new(), |k| format!(", known core bug {k:?}")),
            self.message,
            self.state,
            self.seed
        )
    }
}

impl Sim {
    /// Records the first violation; the run stops at the end of the step.
    pub(crate) fn fail(&self, kind: Kind, message: String) {
        self.fail_known(kind, None, message);
    }

    /// Records the first violation, maybe of a known core bug.
    pub(crate) fn fail_known(&self, kind: Kind, known: Option<KnownBug>, message: String) {
        if self.violation.borrow().is_some() {
            return;
        }
        let mut state: Vec<String> = self
            .nodes
            .iter()
            .map(|n| {
                format!(
                    "{} alive={} role={:?} following={:?} lease={:?} guard={:?} wal={:?} \
                     claim={:?}",
                    n.name,
                    n.agent_alive,
                    n.role,
                    n.following,
                    n.keeper.clock.lease(),
                    n.fencer,
                    n.data,
                    n.claim
                )
            })
            .collect();
        state.push(format!(
            "leader={:?} sync={:?} failsafe={:?} acked={:?}",
            self.dcs.leader, self.dcs.sync, self.dcs.failsafe, self.acked
        ));
        let violation = Violation {
            kind,
            known,
            seed: self.seed,
            at: self.now,
            message,
            state: state.join("\n"),
        };
        if self.trace {
            eprintln!("VIOLATION {violation}");
        }
        *self.violation.borrow_mut() = Some(violation);
    }

    /// The first acknowledged commit `wal` does not hold: (session,
    /// acknowledged end), and whether a known core bug explains it (none
    /// does today).
    pub(crate) fn missing_commit(&self, wal: &Wal) -> Option<(u64, u64, Option<KnownBug>)> {
        let missing = |acked: &BTreeMap<u64, u64>| {
            acked
                .iter()
                .find(|(epoch, end)| wal.epoch_at(**end - 1) != Some(**epoch))
                .map(|(e, x)| (*e, *x))
        };
        if let Some((e, x)) = missing(&self.acked) {
            return Some((e, x, None));
        }
        missing(&self.acked_unguarded).map(|(e, x)| (e, x, None))
    }

    /// Node `i`'s PostgreSQL accepts writes from now on.
    pub(crate) fn begin_writing(&mut self, i: usize) {
        let others: Vec<usize> = (0..self.nodes.len())
            .filter(|&j| j != i && self.nodes[j].accepts_writes(self.now))
            .collect();
        if let Some(&j) = others.first() {
            self.fail_known(
                Kind::TwoWriters,
                None,
                format!(
                    "{} starts accepting writes while {} still does",
                    self.nodes[i].name, self.nodes[j].name
                ),
            );
        }
        if !self.nodes[i].suspended(self.now) {
            self.nodes[i].writing_since = Some(self.now);
        }
    }

    /// Node `i`'s PostgreSQL stopped accepting writes at true time `at`.
    pub(crate) fn end_writing(&mut self, i: usize, at: u64) {
        if let Some(since) = self.nodes[i].writing_since.take() {
            self.log(|| {
                format!(
                    "{} accepted writes from {since} to {}",
                    self.nodes[i].name,
                    at.max(since)
                )
            });
        }
    }

    /// A node becomes writable on a new timeline: it must hold every
    /// acknowledged commit.
    pub(crate) fn check_promotion(&self, i: usize) {
        let me = &self.nodes[i];
        let Some(mine) = &me.data else { return };
        if let Some((epoch, end, known)) = self.missing_commit(mine) {
            self.fail_known(
                Kind::LostCommit,
                known,
                format!(
                    "{} promoted without an acknowledged commit: session {epoch} acknowledged \
                     up to {end}, {} holds {:?} (sync key {:?})",
                    me.name, me.name, mine, self.dcs.sync
                ),
            );
        }
    }

    /// A node took the leader key in an election (not on an operator's
    /// request): no eligible member may have had more WAL on its timeline.
    pub(crate) fn check_election(&self, i: usize) {
        let me = &self.nodes[i];
        let Some(mine) = &me.data else { return };
        if me.role != Role::Replica {
            return;
        }
        // The operator named this node: it may lose what others had.
        let requested = self
            .dcs
            .failover
            .as_ref()
            .is_some_and(|(r, _)| r.candidate.as_ref() == Some(&me.name));
        if requested {
            return;
        }
        for (j, other) in self.nodes.iter().enumerate() {
            let published = self
                .dcs
                .members
                .get(&other.name)
                .is_some_and(|m| Some(m.1) == other.lease.id);
            let eligible = j != i
                && self.visible_for_election(j)
                && published
                && other.role == Role::Replica
                && !other.tags.nofailover
                && self.sync_allows(&other.name)
                && (!self.config.failsafe_mode
                    || self.dcs.failsafe.as_ref().is_none_or(|(f, _)| {
                        f.leader == other.name || f.members.contains_key(&other.name)
                    }));
            if !eligible {
                continue;
            }
            let Some(theirs) = &other.data else { continue };
            if theirs.timeline == mine.timeline && theirs.end > mine.end {
                // This agent never saw the leader before this one, and the
                // member's status dates from that leader's time.
                let missed = me.saw_leader_revision < self.dcs.previous_leader_revision
                    && self
                        .dcs
                        .members
                        .get(&other.name)
                        .is_some_and(|m| m.0.view_had_leader);
                self.fail_known(
                    Kind::BehindPromotion,
                    missed.then_some(KnownBug::ElectionAfterMissedLeader),
                    format!(
                        "{} took the leader key at {} while eligible {} had {} on timeline {}",
                        me.name, mine.end, other.name, theirs.end, mine.timeline
                    ),
                );
            }
        }
    }

    /// Synchronous mode: whether `name` holds every acknowledged commit by
    /// the `sync` key (the leader that wrote it, or a member of it); without
    /// a key, no guarantee was given.
    pub(crate) fn sync_allows(&self, name: &str) -> bool {
        !self.config.synchronous_mode
            || self
                .dcs
                .sync
                .as_ref()
                .is_none_or(|(s, _)| s.leader == name || s.members.iter().any(|m| m == name))
    }

    /// Reachable and running long enough to have published a final status
    /// in an election (a member cut off during the election cannot be
    /// waited for forever).
    fn visible_for_election(&self, j: usize) -> bool {
        let node = &self.nodes[j];
        let mut window = 3 * self.timing.loop_wait;
        if self.plan.stale_views {
            window += 2 * self.timing.loop_wait + self.timing.dcs_timeout;
        }
        node.agent_runs(self.now)
            && node.dcs_link(self.now)
            && self.dcs.up(self.now)
            && !node.ha.busy()
            && self.now >= node.back_at.saturating_add(window)
            && self.now >= node.replica_since.saturating_add(window)
    }

    pub(crate) fn check_invariants(&self) {
        let now = self.now;
        let writers: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].accepts_writes(now))
            .collect();
        if let [a, b, ..] = writers[..] {
            self.fail_known(
                Kind::TwoWriters,
                None,
                format!(
                    "two nodes accept writes: {} and {}",
                    self.nodes[a].name, self.nodes[b].name
                ),
            );
        }
        self.check_deadlines();
        for &i in &writers {
            let writer = &self.nodes[i];
            if !writer.agent_alive {
                self.fail(
                    Kind::PastDeadline,
                    format!("{} accepts writes without a live agent", writer.name),
                );
            }
            if let Some(leader) = &self.dcs.leader
                && leader.name != writer.name
            {
                self.fail_known(
                    Kind::WriterNotLeader,
                    None,
                    format!(
                        "{} accepts writes while the leader key names {}",
                        writer.name, leader.name
                    ),
                );
            }
            let lease = writer.keeper.clock.lease();
            if !lease.members_confirmed && self.dcs.lease_expired(lease.id, now) {
                self.fail(
                    Kind::LeaseExpired,
                    format!(
                        "{} accepts writes although etcd may have expired its lease {:?}",
                        writer.name, lease.id
                    ),
                );
            }
        }
    }

    pub(crate) fn check_converged(&self) {
        let fail = |message: String| self.fail(Kind::NoConvergence, message);
        let listed = |name: &str| {
            !self.config.failsafe_mode
                || self
                    .dcs
                    .failsafe
                    .as_ref()
                    .is_none_or(|(f, _)| f.leader == name || f.members.contains_key(name))
        };
        let electable = self.nodes.iter().any(|n| {
            n.data.is_some() && !n.tags.nofailover && listed(&n.name) && self.sync_allows(&n.name)
        });
        if self.dcs.leader.is_none() && !electable {
            // Only nodes that may not lead hold data (nofailover, missing
            // acknowledged commits, outside the failsafe list): the cluster
            // waits for an operator, by design.
            return;
        }
        let Some(leader) = &self.dcs.leader else {
            return self.fail_known(
                Kind::NoConvergence,
                None,
                "no leader after the faults stopped".into(),
            );
        };
        let Some(primary) = self.nodes.iter().find(|n| n.name == leader.name) else {
            return fail(format!("the leader {} is no node", leader.name));
        };
        if primary.role != Role::Primary {
            return fail(format!("leader {} is not running as primary", leader.name));
        }
        let top = primary.data.as_ref().expect("a primary has data");
        if let Some((epoch, end, known)) = self.missing_commit(top) {
            self.fail_known(
                Kind::LostCommit,
                known,
                format!(
                    "the final primary {} lacks session {epoch}'s commit acknowledged up to {end}",
                    leader.name
                ),
            );
        }
        for node in &self.nodes {
            if node.name == leader.name {
                continue;
            }
            let Some(wal) = &node.data else {
                return fail(format!("{} has no data", node.name));
            };
            if node.role != Role::Replica || node.following.as_ref() != Some(&leader.name) {
                return fail(format!("{} is not a replica of {}", node.name, leader.name));
            }
            if !wal.is_prefix_of(top) {
                return fail(format!("{} cannot stream from {}", node.name, leader.name));
            }
        }
    }
}
