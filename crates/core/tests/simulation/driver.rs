//! The driver: one seeded cluster, stepped through time. Each step: faults
//! (or their end), processes coming and going, the guards, etcd's
//! revocation tick, the lease keepers, replication and client writes, the
//! HA loops; the oracle checks after every stage that can break something.

use mainstay_core::decide::{Settings, Standby};
use mainstay_core::lease::LeaseTiming;
use mainstay_core::{DynamicConfig, Lsn, Tags};
use std::cell::RefCell;
use std::collections::BTreeMap;

use crate::faults::{Fault, FaultPlan, Rejoin, drifting};
use crate::model::{Clock, Dcs, Node, Rng, Role, Wal};
use crate::oracle::Violation;
use crate::{FAULT_WINDOW_MS, Plant, SETTLE_MS, STEP_MS, Timing};

pub(crate) struct Sim {
    pub(crate) seed: u64,
    pub(crate) rng: Rng,
    pub(crate) now: u64,
    pub(crate) timing: Timing,
    pub(crate) settings: Settings,
    /// Lag limits off: the model's lag faults would otherwise leave the
    /// cluster without an eligible candidate, which the convergence check
    /// (rightly, for this model) calls a failure. Unit tests cover the limit.
    pub(crate) config: DynamicConfig,
    pub(crate) plan: FaultPlan,
    pub(crate) faults_on: bool,
    pub(crate) plant: Plant,
    pub(crate) trace: bool,
    pub(crate) dcs: Dcs,
    pub(crate) nodes: Vec<Node>,
    pub(crate) next_system_id: u64,
    /// System identifiers the DCS ever recorded as the cluster's.
    pub(crate) recorded_ids: Vec<u64>,
    pub(crate) next_epoch: u64,
    next_revoke: u64,
    pub(crate) promotions: usize,
    /// Synchronous mode: for each writable session, the furthest position
    /// a client was told its commit is safe (the lost-commit oracle), while
    /// the `sync` key named the primary as its leader ...
    pub(crate) acked: BTreeMap<u64, u64>,
    /// ... and while it did not (a primary must write the key first; the
    /// simulator once found a bootstrap that did not).
    pub(crate) acked_unguarded: BTreeMap<u64, u64>,
    pub(crate) acked_commits: u64,
    /// Which fault kinds this seed actually got.
    pub(crate) seen: u64,
    pub(crate) rejoin: Rejoin,
    pub(crate) dcs_was_down: bool,
    pub(crate) violation: RefCell<Option<Violation>>,
}

impl Sim {
    pub(crate) fn new(seed: u64, trace: bool, plant: Plant) -> Sim {
        let mut rng = Rng(seed);
        let count = 2 + rng.below(4) as usize;
        let plan = FaultPlan::draw(&mut rng, count);
        let timing = if plan.fast_timing {
            Timing::FAST
        } else {
            Timing::DEFAULT
        };
        let drift = |rng: &mut Rng| {
            if plan.drift {
                drifting(rng)
            } else {
                Clock::EXACT
            }
        };
        let lease_timing = LeaseTiming {
            ttl_ms: timing.ttl,
            fencing_margin_ms: timing.margin,
        };
        let mut nodes: Vec<Node> = (0..count)
            .map(|i| {
                let tags = Tags {
                    nofailover: count > 2 && i == count - 1 && rng.chance(200_000),
                    priority: rng.below(3) as i32,
                    ..Tags::default()
                };
                Node::new(format!("n{i}"), tags, drift(&mut rng), lease_timing)
            })
            .collect();
        for node in &mut nodes {
            node.ha.next_turn = rng.below(timing.loop_wait);
        }
        let dcs = Dcs::new(drift(&mut rng), timing.ttl);
        let synchronous_mode = seed % 2 == 1;
        let synchronous_mode_strict = synchronous_mode && rng.chance(300_000);
        let synchronous_node_count = if synchronous_mode && plan.sync_count_above_one {
            2 + rng.below(count as u64 - 2) as u32
        } else {
            1
        };
        let mut sim = Sim {
            seed,
            rng,
            now: 0,
            settings: Settings {
                ttl_ms: timing.ttl,
                loop_wait_ms: timing.loop_wait,
                election_wait_ms: 2 * timing.loop_wait + timing.dcs_timeout,
                stuck_replica_ms: 10 * timing.loop_wait,
            },
            timing,
            config: DynamicConfig {
                maximum_lag_on_failover: u64::MAX,
                member_slots_ttl: 100,
                synchronous_mode,
                synchronous_mode_strict,
                synchronous_node_count,
                failsafe_mode: plan.failsafe,
                ..DynamicConfig::default()
            },
            plan,
            faults_on: true,
            plant,
            trace,
            dcs,
            nodes,
            next_system_id: 7_000_000_000_000_000_000,
            recorded_ids: Vec::new(),
            next_epoch: 0,
            next_revoke: 0,
            promotions: 0,
            acked: BTreeMap::new(),
            acked_unguarded: BTreeMap::new(),
            acked_commits: 0,
            seen: 0,
            rejoin: Rejoin::Off,
            dcs_was_down: false,
            violation: RefCell::new(None),
        };
        sim.count_plan();
        sim
    }

    pub(crate) fn lease_timing(&self) -> LeaseTiming {
        LeaseTiming {
            ttl_ms: self.timing.ttl,
            fencing_margin_ms: self.timing.margin,
        }
    }

    pub(crate) fn log(&self, text: impl FnOnce() -> String) {
        if self.trace {
            eprintln!("[{:>6}ms] {}", self.now, text());
        }
    }

    pub(crate) fn count(&mut self, fault: Fault) {
        self.seen |= 1 << fault as u32;
    }

    pub(crate) fn failed(&self) -> bool {
        self.violation.borrow().is_some()
    }

    /// Runs the seed to its end, or to the first violation.
    pub(crate) fn run(&mut self) -> Result<(), Violation> {
        if self.trace {
            eprintln!(
                "seed {}: {} nodes, {:?}, {:?}, sync {} (strict {}, count {}), failsafe {}",
                self.seed,
                self.nodes.len(),
                self.timing,
                self.plan,
                self.config.synchronous_mode,
                self.config.synchronous_mode_strict,
                self.config.synchronous_node_count,
                self.config.failsafe_mode
            );
        }
        while self.now < FAULT_WINDOW_MS + SETTLE_MS && !self.failed() {
            self.now += STEP_MS;
            self.faults_on = self.now < FAULT_WINDOW_MS;
            if self.faults_on {
                self.inject_faults();
            } else if self.now < FAULT_WINDOW_MS + STEP_MS {
                self.heal();
            } else if self.now == FAULT_WINDOW_MS + SETTLE_MS / 4 {
                self.operator_names_first_leader();
            }
            self.etcd_back();
            self.lifecycle();
            for i in 0..self.nodes.len() {
                self.guard(i);
            }
            self.revocation_tick();
            self.keep_leases();
            self.replicate_and_write();
            self.check_invariants();
            self.run_loops();
            self.check_invariants();
        }
        if !self.failed() {
            self.check_converged();
        }
        match self.violation.take() {
            Some(violation) => Err(violation),
            None => Ok(()),
        }
    }

    /// etcd revokes expired leases (and their keys) every 500 ms.
    fn revocation_tick(&mut self) {
        let local = self.dcs.clock.local(self.now);
        if local < self.next_revoke {
            return;
        }
        self.next_revoke = local + 500;
        if self.dcs.revoke_expired(self.now) {
            self.wake_all();
        }
    }

    /// A key every agent watches changed: each one that can hear it wakes,
    /// maybe late.
    pub(crate) fn wake_all(&mut self) {
        for i in 0..self.nodes.len() {
            if self.nodes[i].dcs_link(self.now) {
                let delay = self.watch_delay();
                self.wake(i, delay);
            }
        }
    }

    /// A member key changed: it matters while there is no leader.
    pub(crate) fn wake_for_members(&mut self) {
        if self.dcs.leader.is_none() {
            self.wake_all();
        }
    }

    fn watch_delay(&mut self) -> u64 {
        if self.faults_on && self.plan.stale_views && self.rng.chance(200_000) {
            self.count(Fault::WatchDelay);
            self.rng.below(2 * self.timing.loop_wait)
        } else {
            0
        }
    }

    pub(crate) fn wake(&mut self, i: usize, delay: u64) {
        let at = self.now + delay;
        let ha = &mut self.nodes[i].ha;
        ha.woken_at = Some(ha.woken_at.map_or(at, |w| w.min(at)));
    }

    /// PostgreSQL stops (crash, fence, shutdown); for the oracle it stopped
    /// accepting writes at true time `at`.
    pub(crate) fn stop_pg(&mut self, i: usize, at: u64) {
        self.end_writing(i, at);
        let node = &mut self.nodes[i];
        node.role = Role::Stopped;
        node.streaming = false;
    }

    /// Whether replica `r` streams from primary `p` right now.
    pub(crate) fn streams_from(&self, r: usize, p: usize) -> bool {
        let (replica, primary) = (&self.nodes[r], &self.nodes[p]);
        r != p
            && replica.role == Role::Replica
            && replica.following.as_ref() == Some(&primary.name)
            && primary.accepts_writes(self.now)
            && replica.peer_link(self.now)
            && primary.peer_link(self.now)
            && !replica.suspended(self.now)
    }

    fn replicate_and_write(&mut self) {
        let now = self.now;
        let primaries: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].accepts_writes(now))
            .collect();
        for &p in &primaries {
            let grow = self.rng.below(400);
            let epoch = self.nodes[p].epoch;
            if let Some(wal) = &mut self.nodes[p].data {
                wal.append(epoch, grow);
            }
        }
        for r in 0..self.nodes.len() {
            self.nodes[r].streaming = false;
            let Some(source) = self.nodes[r].following.as_ref() else {
                continue;
            };
            let Some(p) = self.nodes.iter().position(|n| &n.name == source) else {
                continue;
            };
            if !self.streams_from(r, p) {
                continue;
            }
            let rate = if now < self.nodes[r].lag_until {
                self.rng.below(100)
            } else {
                100_000
            };
            let (left, right) = self.nodes.split_at_mut(r.max(p));
            let (replica, primary) = if r < p {
                (&mut left[r], &right[0])
            } else {
                (&mut right[0], &left[p])
            };
            let upstream = primary.data.as_ref().expect("a running primary has data");
            let wal = replica.data.as_mut().expect("a running replica has data");
            if !wal.is_prefix_of(upstream) {
                // PostgreSQL refuses to stream WAL that does not continue
                // its own.
                continue;
            }
            catch_up(wal, upstream, wal.end + rate);
            replica.streaming = true;
        }
        if self.config.synchronous_mode {
            for &p in &primaries {
                self.acknowledge(p);
            }
        }
    }

    /// The standbys streaming from primary `p`, as `pg_stat_replication`
    /// would show them.
    pub(crate) fn standbys_of(&self, p: usize) -> Vec<Standby> {
        let primary = &self.nodes[p];
        (0..self.nodes.len())
            .filter(|&r| self.streams_from(r, p) && self.nodes[r].streaming)
            .map(|r| {
                let n = &self.nodes[r];
                Standby {
                    name: n.name.clone(),
                    flush: Lsn(n.data.as_ref().map_or(0, |w| w.end)),
                    sync_state: if primary.sync_names.contains(&n.name) {
                        "quorum".into()
                    } else {
                        "async".into()
                    },
                    streaming: true,
                }
            })
            .collect()
    }

    /// PostgreSQL acknowledges a commit once it is flushed on every listed
    /// standby (`ANY n` over n names), on any standby ('*'), or at once with
    /// no names. The oracle records, for the session that wrote it, the
    /// furthest position acknowledged.
    fn acknowledge(&mut self, p: usize) {
        let standbys = self.standbys_of(p);
        let primary = &self.nodes[p];
        let Some(wal) = &primary.data else { return };
        // No client writes to a cluster whose bootstrap is not recorded.
        let recorded = self
            .dcs
            .initialize
            .as_ref()
            .and_then(|i| i.0.system_id.as_ref());
        if recorded != Some(&wal.system_id.to_string()) {
            return;
        }
        let flushed = |name: &String| {
            standbys
                .iter()
                .find(|s| &s.name == name)
                .map_or(0, |s| s.flush.0)
        };
        let acked_end = if !primary.sync_names.is_empty() {
            primary.sync_names.iter().map(flushed).min().unwrap_or(0)
        } else if primary.sync_block {
            standbys.iter().map(|s| s.flush.0).max().unwrap_or(0)
        } else {
            wal.end
        };
        let acked_end = acked_end.min(wal.end);
        if acked_end == 0 {
            return;
        }
        let epoch = wal.epoch_at(acked_end - 1).expect("inside the WAL");
        let guarded = self
            .dcs
            .sync
            .as_ref()
            .is_some_and(|(s, _)| s.leader == primary.name);
        let acked = if guarded {
            &mut self.acked
        } else {
            &mut self.acked_unguarded
        };
        let known = acked.entry(epoch).or_insert(0);
        if acked_end > *known {
            *known = acked_end;
            self.acked_commits += 1;
        }
    }

    /// Processes that come back: agents restart, hosts resume (the guard
    /// runs before PostgreSQL takes a write).
    fn lifecycle(&mut self) {
        let now = self.now;
        for i in 0..self.nodes.len() {
            if !self.nodes[i].agent_alive && now >= self.nodes[i].restart_at {
                self.log(|| format!("agent {i} restarts"));
                let keeper = self.new_keeper(i);
                let node = &mut self.nodes[i];
                node.agent_alive = true;
                node.agent_started = now;
                node.confirmed_by = None;
                node.asking = None;
                node.back_at = node.back_at.max(now);
                node.core = Default::default();
                node.lease = keeper.clock.lease();
                node.keeper = keeper;
                node.ha = Default::default();
                node.ha.next_turn = now;
                node.fencer = Default::default();
                node.failsafe_peers = None;
                node.failsafe_contact = None;
                node.last_view = None;
                node.dcs_reachable = false;
                node.published = None;
                node.saw_leader_revision = 0;
                node.following = None;
            }
            if self.nodes[i].asleep && !self.nodes[i].suspended(now) {
                self.log(|| format!("node {i} resumes"));
                self.nodes[i].asleep = false;
                self.nodes[i].back_at = self.nodes[i].back_at.max(now);
                self.guard(i);
                if self.nodes[i].role == Role::Primary {
                    self.begin_writing(i);
                }
            }
        }
    }
}

/// A standby receives up to `end` of its upstream's WAL, which it already
/// holds a prefix of.
fn catch_up(wal: &mut Wal, upstream: &Wal, end: u64) {
    let end = end.min(upstream.end);
    if end <= wal.end && wal.timeline == upstream.timeline {
        return;
    }
    wal.end = wal.end.max(end);
    let have = wal.runs.len();
    wal.runs.extend(
        upstream.runs[have.min(upstream.runs.len())..]
            .iter()
            .filter(|r| r.start < wal.end),
    );
    if wal.timeline != upstream.timeline || wal.history.len() != upstream.history.len() {
        let fresh = Wal::streamed_from(upstream, wal.end);
        wal.timeline = fresh.timeline;
        wal.history = fresh.history;
    }
    wal.newest_history = wal.newest_history.max(upstream.newest_history);
}
