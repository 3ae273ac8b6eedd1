//! Deterministic simulation of whole clusters driven by the real decision
//! core: an in-memory DCS with leases on a fake clock, a model of PostgreSQL
//! (timelines, WAL positions, replication, rewind) and seeded random faults
//! (agent crash, PostgreSQL crash, DCS partition, lost or slow lease renewals,
//! lagging replicas). After every step the invariants of docs/rules.md
//! section 8 are checked; once the faults stop the cluster must converge.
//!
//! Odd seeds run in synchronous mode (strict or not), where the model also
//! acknowledges commits only as PostgreSQL would (`ANY n` over the listed
//! standbys) and every promotion must keep every acknowledged commit.
//!
//! `MAINSTAY_SIM_SEEDS=N` sets how many seeds run (default 3000),
//! `MAINSTAY_SIM_SEED=S` replays one seed with a step-by-step trace.

use mainstay_core::decide::{DataDir, Lease, LocalPg, Settings, Standby};
use mainstay_core::sync::render_standby_names;
use mainstay_core::timeline::{Divergence, LeaderWal, LocalWal, TimelineSwitch, divergence};
use mainstay_core::{
    Action, ClusterView, CoreState, DynamicConfig, FailsafeRecord, FailsafeState, HistoryEntry,
    InitializeRecord, LeaderRecord, Lsn, MemberRecord, MemberStatus, Millis, Observation, PgRole,
    SyncRecord, SyncState, Tags, decide,
};
use std::collections::BTreeMap;

const STEP_MS: u64 = 50;
const TTL_MS: u64 = 4000;
const RENEW_MS: u64 = 1000;
const REQUEST_TIMEOUT_MS: u64 = 1000;
const MARGIN_MS: u64 = 1000;
const LOOP_WAIT_MS: u64 = 1000;
const FAULT_WINDOW_MS: u64 = 60_000;
const SETTLE_MS: u64 = 40_000;

/// SplitMix64: small, fast and good enough to pick faults; no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, per_million: u64) -> bool {
        self.below(1_000_000) < per_million
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Wal {
    system_id: u64,
    timeline: u32,
    end: u64,
    history: Vec<TimelineSwitch>,
}

impl Wal {
    fn local(&self) -> LocalWal {
        LocalWal {
            timeline: self.timeline,
            end_lsn: Lsn(self.end),
            history: self.history.clone(),
        }
    }
    fn leader(&self) -> LeaderWal {
        LeaderWal {
            timeline: self.timeline,
            flush_lsn: Lsn(self.end),
            history: self.history.clone(),
        }
    }
}

#[derive(Default)]
struct Dcs {
    revision: i64,
    initialize: Option<(InitializeRecord, i64)>,
    leader: Option<(String, i64, i64)>,
    members: BTreeMap<String, (MemberStatus, i64, i64)>,
    leases: BTreeMap<i64, u64>,
    next_lease: i64,
    history: Vec<HistoryEntry>,
    sync: Option<(SyncState, i64)>,
    failsafe: Option<(FailsafeState, i64)>,
}

impl Dcs {
    fn bump(&mut self) -> i64 {
        self.revision += 1;
        self.revision
    }
    /// Deletes expired leases and their keys; true when the leader key went.
    fn expire(&mut self, now: u64) -> bool {
        let expired: Vec<i64> = self
            .leases
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(id, _)| *id)
            .collect();
        let mut leader_gone = false;
        for id in expired {
            self.leases.remove(&id);
            if self.leader.as_ref().is_some_and(|l| l.1 == id) {
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
    fn view(&self) -> ClusterView {
        ClusterView {
            revision: self.revision,
            initialize: self.initialize.as_ref().map(|i| i.0.clone()),
            initialize_revision: self.initialize.as_ref().map_or(0, |i| i.1),
            leader: self
                .leader
                .as_ref()
                .map(|(name, lease_id, mod_revision)| LeaderRecord {
                    name: name.clone(),
                    lease_id: *lease_id,
                    mod_revision: *mod_revision,
                }),
            members: self
                .members
                .iter()
                .map(|(name, (status, _, rev))| {
                    (
                        name.clone(),
                        MemberRecord {
                            status: status.clone(),
                            mod_revision: *rev,
                            lease_id: 0,
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
            ..ClusterView::default()
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Role {
    Stopped,
    Primary,
    Replica,
}

struct Node {
    name: String,
    tags: Tags,
    agent_alive: bool,
    restart_at: u64,
    partitioned_until: u64,
    renew_loss_per_million: u64,
    renew_delay_max: u64,
    lag_until: u64,
    core: CoreState,
    lease_id: Option<i64>,
    valid_until: u64,
    /// Send time of the last renewal etcd accepted: etcd cannot expire the
    /// lease before this + ttl.
    earliest_expiry_base: u64,
    next_renew: u64,
    next_turn: u64,
    woken: bool,
    data: Option<Wal>,
    was_primary: bool,
    role: Role,
    following: Option<String>,
    streaming: bool,
    moved_aside: usize,
    /// synchronous_standby_names: the listed names, and '*' (block).
    sync_names: Vec<String>,
    sync_block: bool,
}

impl Node {
    fn reachable(&self, now: u64) -> bool {
        self.agent_alive && now >= self.partitioned_until
    }
    /// Reachable long enough to have published a final status in an election.
    fn visible_for_election(&self, now: u64) -> bool {
        let since = self.partitioned_until.max(self.restart_at);
        self.reachable(now) && now >= since + 2 * LOOP_WAIT_MS + LOOP_WAIT_MS
    }
    fn local_pg(&self) -> LocalPg {
        LocalPg {
            data: match &self.data {
                None => DataDir::Empty,
                Some(wal) => DataDir::Initialized {
                    system_id: wal.system_id.to_string(),
                    was_primary: self.was_primary,
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

/// A pending keep-alive or grant, resolved when its response would arrive.
struct Renewal {
    node: usize,
    sent: u64,
    arrives: u64,
    responds: u64,
    lease: Option<i64>,
}

struct Sim {
    seed: u64,
    rng: Rng,
    now: u64,
    dcs: Dcs,
    nodes: Vec<Node>,
    renewals: Vec<Renewal>,
    settings: Settings,
    /// Lag limits off: the model's lag faults would otherwise leave the
    /// cluster without an eligible candidate, which the convergence check
    /// (rightly, for this model) calls a failure. Unit tests cover the limit.
    config: DynamicConfig,
    trace: bool,
    next_system_id: u64,
    promotions: usize,
    /// The furthest commit acknowledged to a client, as a WAL prefix of the
    /// primary that acknowledged it (synchronous mode only).
    acked: Option<Wal>,
    acked_commits: u64,
}

impl Sim {
    fn new(seed: u64, trace: bool) -> Sim {
        let mut rng = Rng(seed);
        let count = 2 + rng.below(4) as usize;
        let nodes = (0..count)
            .map(|i| Node {
                name: format!("n{i}"),
                tags: Tags {
                    nofailover: count > 2 && i == count - 1 && rng.chance(200_000),
                    priority: rng.below(3) as i32,
                    nosync: false,
                    noloadbalance: false,
                },
                agent_alive: true,
                restart_at: 0,
                partitioned_until: 0,
                renew_loss_per_million: 0,
                renew_delay_max: 20,
                lag_until: 0,
                core: CoreState::default(),
                lease_id: None,
                valid_until: 0,
                earliest_expiry_base: 0,
                next_renew: 0,
                next_turn: rng.below(LOOP_WAIT_MS),
                woken: false,
                data: None,
                was_primary: false,
                role: Role::Stopped,
                following: None,
                streaming: false,
                moved_aside: 0,
                sync_names: Vec::new(),
                sync_block: false,
            })
            .collect();
        let synchronous_mode = seed % 2 == 1;
        let synchronous_mode_strict = synchronous_mode && rng.chance(300_000);
        Sim {
            seed,
            rng,
            now: 0,
            dcs: Dcs::default(),
            nodes,
            renewals: Vec::new(),
            config: DynamicConfig {
                maximum_lag_on_failover: u64::MAX,
                member_slots_ttl: 100,
                synchronous_mode,
                synchronous_mode_strict,
                synchronous_node_count: 1,
                ..DynamicConfig::default()
            },
            settings: Settings {
                ttl_ms: TTL_MS,
                loop_wait_ms: LOOP_WAIT_MS,
                election_wait_ms: 2 * LOOP_WAIT_MS,
                stuck_replica_ms: 10 * LOOP_WAIT_MS,
            },
            trace,
            next_system_id: 7_000_000_000_000_000_000,
            promotions: 0,
            acked: None,
            acked_commits: 0,
        }
    }

    fn log(&self, text: impl FnOnce() -> String) {
        if self.trace {
            eprintln!("[{:>6}ms] {}", self.now, text());
        }
    }

    fn fail(&self, what: String) -> ! {
        let states: Vec<String> = self
            .nodes
            .iter()
            .map(|n| {
                format!(
                    "{} alive={} role={:?} following={:?} wal={:?} lease={:?} valid_until={}",
                    n.name, n.agent_alive, n.role, n.following, n.data, n.lease_id, n.valid_until
                )
            })
            .collect();
        panic!(
            "simulation seed {} failed at {} ms: {what}\n{}\nleader={:?}\nreplay: MAINSTAY_SIM_SEED={} cargo test -p mainstay-core --test simulation -- --nocapture",
            self.seed,
            self.now,
            states.join("\n"),
            self.dcs.leader,
            self.seed
        );
    }

    fn run(&mut self) {
        while self.now < FAULT_WINDOW_MS + SETTLE_MS {
            self.now += STEP_MS;
            let faults = self.now < FAULT_WINDOW_MS;
            if faults {
                self.inject_faults();
            } else if self.now < FAULT_WINDOW_MS + STEP_MS {
                self.heal();
            }
            self.restart_agents();
            if self.dcs.expire(self.now) {
                self.wake_all();
            }
            self.resolve_renewals();
            self.send_renewals();
            self.replicate_and_write();
            self.check_invariants();
            for i in 0..self.nodes.len() {
                let node = &self.nodes[i];
                if node.agent_alive && (node.woken || self.now >= node.next_turn) {
                    self.turn(i);
                    self.check_invariants();
                }
            }
        }
        self.check_converged();
    }

    fn inject_faults(&mut self) {
        for i in 0..self.nodes.len() {
            let now = self.now;
            if self.nodes[i].agent_alive && self.rng.chance(1_500) {
                let down = 500 + self.rng.below(10_000);
                self.log(|| {
                    format!("FAULT agent {i} crashes for {down} ms (PostgreSQL dies with it)")
                });
                let node = &mut self.nodes[i];
                node.agent_alive = false;
                node.restart_at = now + down;
                node.role = Role::Stopped;
            }
            if self.nodes[i].role != Role::Stopped && self.rng.chance(1_500) {
                self.log(|| format!("FAULT PostgreSQL on {i} crashes"));
                self.nodes[i].role = Role::Stopped;
            }
            if self.rng.chance(1_500) {
                let until = now + 500 + self.rng.below(8_000);
                self.log(|| format!("FAULT node {i} cut off from the DCS until {until}"));
                self.nodes[i].partitioned_until = until;
            }
            if self.rng.chance(2_000) {
                let loss = self.rng.below(600_000);
                let delay = self.rng.below(REQUEST_TIMEOUT_MS * 3 / 2);
                self.log(|| {
                    format!("FAULT node {i} renewals: loss {loss}/1e6, delay up to {delay} ms")
                });
                self.nodes[i].renew_loss_per_million = loss;
                self.nodes[i].renew_delay_max = delay.max(1);
            }
            if self.rng.chance(3_000) {
                self.nodes[i].lag_until = now + self.rng.below(5_000);
            }
        }
    }

    fn heal(&mut self) {
        self.log(|| "faults stop".into());
        let now = self.now;
        for node in &mut self.nodes {
            node.partitioned_until = node.partitioned_until.min(now);
            node.renew_loss_per_million = 0;
            node.renew_delay_max = 20;
            node.lag_until = 0;
            if !node.agent_alive {
                node.restart_at = node.restart_at.min(now);
            }
        }
    }

    fn restart_agents(&mut self) {
        let now = self.now;
        for node in &mut self.nodes {
            if !node.agent_alive && now >= node.restart_at {
                node.agent_alive = true;
                node.core = CoreState::default();
                node.lease_id = None;
                node.valid_until = 0;
                node.next_renew = now;
                node.next_turn = now;
                node.following = None;
            }
        }
        for i in 0..self.nodes.len() {
            if self.nodes[i].agent_alive && self.nodes[i].restart_at == now {
                self.log(|| format!("agent {i} restarts"));
            }
        }
    }

    fn wake_all(&mut self) {
        let now = self.now;
        for node in &mut self.nodes {
            if node.reachable(now) {
                node.woken = true;
            }
        }
    }

    fn send_renewals(&mut self) {
        for i in 0..self.nodes.len() {
            let node = &self.nodes[i];
            if !node.agent_alive || self.now < node.next_renew {
                continue;
            }
            let reachable = node.reachable(self.now);
            let lost = self.rng.chance(node.renew_loss_per_million);
            let delay_max = node.renew_delay_max;
            let lease = node.lease_id;
            self.nodes[i].next_renew = self.now + RENEW_MS;
            if !reachable || lost {
                continue;
            }
            let to_dcs = self.rng.below(delay_max);
            let back = self.rng.below(delay_max);
            self.renewals.push(Renewal {
                node: i,
                sent: self.now,
                arrives: self.now + to_dcs,
                responds: self.now + to_dcs + back,
                lease,
            });
        }
    }

    /// etcd applies a request when it arrives; the client sees the answer only
    /// if it comes back within the request timeout.
    fn resolve_renewals(&mut self) {
        let now = self.now;
        let mut index = 0;
        while index < self.renewals.len() {
            if self.renewals[index].arrives > now {
                index += 1;
                continue;
            }
            let renewal = self.renewals.remove(index);
            let granted = match renewal.lease {
                Some(id) => match self.dcs.leases.get_mut(&id) {
                    Some(expiry) => {
                        *expiry = (*expiry).max(renewal.arrives + TTL_MS);
                        Some(id)
                    }
                    None => None,
                },
                None => {
                    self.dcs.next_lease += 1;
                    let id = self.dcs.next_lease;
                    self.dcs.leases.insert(id, renewal.arrives + TTL_MS);
                    Some(id)
                }
            };
            let answered = renewal.responds - renewal.sent <= REQUEST_TIMEOUT_MS;
            let node = &mut self.nodes[renewal.node];
            if !node.agent_alive || !answered || node.lease_id != renewal.lease {
                continue;
            }
            match granted {
                Some(id) => {
                    node.lease_id = Some(id);
                    node.earliest_expiry_base = node.earliest_expiry_base.max(renewal.sent);
                    node.valid_until = node.valid_until.max(renewal.sent + TTL_MS - MARGIN_MS);
                }
                None => {
                    node.lease_id = None;
                    node.valid_until = 0;
                }
            }
        }
    }

    fn replicate_and_write(&mut self) {
        let primaries: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].role == Role::Primary)
            .collect();
        for &p in &primaries {
            let grow = self.rng.below(400);
            if let Some(wal) = &mut self.nodes[p].data {
                wal.end += grow;
            }
        }
        for i in 0..self.nodes.len() {
            self.nodes[i].streaming = false;
            if self.nodes[i].role != Role::Replica {
                continue;
            }
            let Some(source) = self.nodes[i].following.clone() else {
                continue;
            };
            let Some(p) = self.nodes.iter().position(|n| n.name == source) else {
                continue;
            };
            if self.nodes[p].role != Role::Primary {
                continue;
            }
            let rate = if self.now < self.nodes[i].lag_until {
                self.rng.below(100)
            } else {
                100_000
            };
            let upstream = self.nodes[p]
                .data
                .clone()
                .expect("a running primary has data");
            let wal = self.nodes[i]
                .data
                .as_mut()
                .expect("a running replica has data");
            if divergence(&wal.local(), &upstream.leader()) != Divergence::None {
                continue;
            }
            wal.timeline = upstream.timeline;
            wal.history = upstream.history.clone();
            wal.end = (wal.end + rate).min(upstream.end);
            self.nodes[i].streaming = true;
        }
        if self.config.synchronous_mode {
            for &p in &primaries {
                self.acknowledge(p);
            }
        }
    }

    /// The standbys streaming from primary `p`, as `pg_stat_replication`
    /// would show them.
    fn standbys_of(&self, p: usize) -> Vec<Standby> {
        let primary = &self.nodes[p];
        self.nodes
            .iter()
            .filter(|n| {
                n.role == Role::Replica
                    && n.streaming
                    && n.following.as_ref() == Some(&primary.name)
            })
            .map(|n| Standby {
                name: n.name.clone(),
                flush: Lsn(n.data.as_ref().map_or(0, |w| w.end)),
                sync_state: if primary.sync_names.contains(&n.name) {
                    "quorum".into()
                } else {
                    "async".into()
                },
                streaming: true,
            })
            .collect()
    }

    /// PostgreSQL acknowledges a commit once it is flushed on every listed
    /// standby (`ANY n` over n names), on any standby ('*'), or at once with
    /// no names.
    fn acknowledge(&mut self, p: usize) {
        let Some(wal) = self.nodes[p].data.clone() else {
            return;
        };
        let standbys = self.standbys_of(p);
        let primary = &self.nodes[p];
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
        let further = match &self.acked {
            None => true,
            Some(old) => {
                // Only progress on this primary's branch counts.
                old.system_id == wal.system_id
                    && divergence(&old.local(), &wal.leader()) == Divergence::None
                    && acked_end > old.end
            }
        };
        if further {
            self.acked_commits += 1;
            self.acked = Some(Wal {
                end: acked_end,
                ..wal
            });
        }
    }

    fn turn(&mut self, i: usize) {
        self.nodes[i].woken = false;
        for _ in 0..6 {
            let reachable = self.nodes[i].reachable(self.now);
            let view = reachable.then(|| self.dcs.view());
            let mut pg = self.nodes[i].local_pg();
            if pg.role == PgRole::Primary {
                pg.standbys = self.standbys_of(i);
            }
            let node = &self.nodes[i];
            let tags = node.tags.clone();
            let name = node.name.clone();
            let obs = Observation {
                now: Millis(self.now),
                name: &name,
                tags: &tags,
                settings: &self.settings,
                pg: &pg,
                cluster: view.as_ref(),
                lease: Lease {
                    id: node.lease_id,
                    valid_until: Millis(node.valid_until),
                    // The simulated cluster runs without failsafe mode.
                    members_confirmed: false,
                },
                config: &self.config,
                wall_secs: self.now / 1000,
                failsafe_contact: None,
            };
            let mut core = node.core.clone();
            let decision = decide(&mut core, &obs);
            self.nodes[i].core = core;
            let next = self.now + LOOP_WAIT_MS;
            self.nodes[i].next_turn = decision
                .wake_at
                .map_or(next, |at| at.0.clamp(self.now + 1, next));
            self.log(|| format!("{name}: {} -> {:?}", decision.note, decision.actions));
            let mut changed = false;
            for action in &decision.actions {
                if !self.execute(i, action, reachable) {
                    changed = false;
                    break;
                }
                changed |= action.changes_state();
            }
            if let Some(view) = &view {
                self.publish(i, view);
            }
            if !changed {
                return;
            }
        }
    }

    fn publish(&mut self, i: usize, view: &ClusterView) {
        let node = &self.nodes[i];
        let Some(lease) = node.lease_id.filter(|id| self.dcs.leases.contains_key(id)) else {
            return;
        };
        let lsn = Lsn(node.data.as_ref().map_or(0, |w| w.end));
        let status = MemberStatus {
            name: node.name.clone(),
            role: node.local_pg().role,
            state: "running".into(),
            api_url: String::new(),
            pg_host: String::new(),
            pg_port: 0,
            timeline: node.data.as_ref().map_or(0, |w| w.timeline),
            received_lsn: lsn,
            replayed_lsn: lsn,
            flush_lsn: lsn,
            following: node.following.clone(),
            streaming: node.role == Role::Replica,
            tags: node.tags.clone(),
            version: String::new(),
            view_revision: view.revision,
            view_had_leader: view.leader.is_some(),
            vip: None,
        };
        let revision = self.dcs.bump();
        self.dcs
            .members
            .insert(node.name.clone(), (status, lease, revision));
    }

    /// Returns false when the action failed (the rest of the turn is skipped).
    fn execute(&mut self, i: usize, action: &Action, reachable: bool) -> bool {
        let now = self.now;
        let name = self.nodes[i].name.clone();
        let lease = self.nodes[i].lease_id;
        let needs_dcs = matches!(
            action,
            Action::RegisterExistingData { .. }
                | Action::ClaimInitialize
                | Action::AbandonBootstrap { .. }
                | Action::RecordSystemId { .. }
                | Action::AcquireLeader
                | Action::ReleaseLeader { .. }
        );
        if needs_dcs && !reachable {
            return false;
        }
        match action {
            Action::RegisterExistingData { system_id } => {
                if self.dcs.initialize.is_none() {
                    let rev = self.dcs.bump();
                    let record = InitializeRecord {
                        system_id: Some(system_id.clone()),
                        by: name,
                        at: String::new(),
                    };
                    self.dcs.initialize = Some((record, rev));
                }
            }
            Action::ClaimInitialize => {
                if self.dcs.initialize.is_some() {
                    return false;
                }
                let rev = self.dcs.bump();
                self.dcs.initialize = Some((
                    InitializeRecord {
                        system_id: None,
                        by: name,
                        at: String::new(),
                    },
                    rev,
                ));
            }
            Action::AbandonBootstrap {
                initialize_revision,
            } => {
                if self
                    .dcs
                    .initialize
                    .as_ref()
                    .is_some_and(|i| i.1 == *initialize_revision)
                {
                    self.dcs.initialize = None;
                    self.dcs.bump();
                }
            }
            Action::RecordSystemId {
                system_id,
                initialize_revision,
            } => {
                match &mut self.dcs.initialize {
                    Some((record, rev)) if *rev == *initialize_revision => {
                        record.system_id = Some(system_id.clone());
                    }
                    _ => return false,
                }
                self.dcs.bump();
                let rev = self.dcs.revision;
                self.dcs.initialize.as_mut().unwrap().1 = rev;
            }
            Action::Bootstrap => {
                let node = &mut self.nodes[i];
                if node.data.is_some() {
                    self.fail(format!("{name} ran initdb over an existing data directory"));
                }
                self.next_system_id += 1;
                let node = &mut self.nodes[i];
                node.data = Some(Wal {
                    system_id: self.next_system_id,
                    timeline: 1,
                    end: 100,
                    history: vec![],
                });
                node.role = Role::Primary;
                node.was_primary = true;
            }
            Action::MoveAside { .. } => {
                let node = &mut self.nodes[i];
                if node.role != Role::Stopped {
                    self.fail(format!(
                        "{name} moved a data directory aside while PostgreSQL ran"
                    ));
                }
                node.data = None;
                node.was_primary = false;
                node.moved_aside += 1;
            }
            Action::AcquireLeader => {
                let Some(id) = lease.filter(|id| self.dcs.leases.contains_key(id)) else {
                    return false;
                };
                if self.dcs.leader.is_some() {
                    return false;
                }
                let rev = self.dcs.bump();
                self.dcs.leader = Some((name, id, rev));
                self.wake_all();
            }
            Action::ReleaseStaleLeader { lease_id } => {
                if self
                    .dcs
                    .leader
                    .as_ref()
                    .is_some_and(|l| l.0 == name && l.1 == *lease_id)
                {
                    self.dcs.leader = None;
                    self.dcs.bump();
                    self.wake_all();
                }
            }
            Action::ReleaseLeader { .. } => {
                if self
                    .dcs
                    .leader
                    .as_ref()
                    .is_some_and(|l| l.0 == name && Some(l.1) == lease)
                {
                    self.dcs.leader = None;
                    self.dcs.bump();
                    self.wake_all();
                }
            }
            Action::StartPrimary => {
                if !self.nodes[i].was_primary {
                    self.check_promotion(i);
                }
                let node = &mut self.nodes[i];
                let wal = node.data.as_mut().expect("start needs data");
                let promoted = !node.was_primary;
                if promoted {
                    // PostgreSQL promotes at the end of recovery without
                    // standby.signal; the shell records the switch like a
                    // promotion.
                    wal.history.push(TimelineSwitch {
                        timeline: wal.timeline,
                        switch_lsn: Lsn(wal.end),
                    });
                    wal.timeline += 1;
                }
                let (timeline, switch_lsn) =
                    (wal.timeline, wal.history.last().map(|s| s.switch_lsn));
                node.role = Role::Primary;
                node.was_primary = true;
                node.following = None;
                if let (true, Some(switch_lsn)) = (promoted, switch_lsn) {
                    self.dcs.history.push(HistoryEntry {
                        timeline,
                        switch_lsn,
                        reason: "started as primary".into(),
                        new_leader: name,
                        at: String::new(),
                    });
                }
            }
            Action::StartReplica { leader } => {
                let node = &mut self.nodes[i];
                node.role = Role::Replica;
                node.following = leader.clone();
            }
            Action::Rejoin { leader } | Action::BaseBackup { leader } => {
                let Some(source) = self.nodes.iter().find(|n| &n.name == leader) else {
                    return false;
                };
                if source.role != Role::Primary {
                    return false;
                }
                let upstream = source.data.clone().expect("primary has data");
                let rewind_fails = self.rng.chance(50_000);
                let node = &mut self.nodes[i];
                if matches!(action, Action::BaseBackup { .. }) {
                    if node.data.is_some() {
                        self.fail(format!("{name} cloned over an existing data directory"));
                    }
                    node.data = Some(upstream);
                } else {
                    let wal = node.data.as_mut().expect("rejoin needs data");
                    if let Divergence::Diverged { .. } =
                        divergence(&wal.local(), &upstream.leader())
                    {
                        if rewind_fails {
                            node.moved_aside += 1;
                        }
                        // pg_rewind (or a fresh clone after moving the old
                        // directory aside) leaves a copy of the leader's WAL.
                        *wal = upstream;
                    }
                }
                node.was_primary = false;
                node.role = Role::Replica;
                node.following = Some(leader.clone());
            }
            Action::Promote { .. } => {
                self.check_promotion(i);
                let node = &mut self.nodes[i];
                if node.role != Role::Replica {
                    return false;
                }
                let wal = node.data.as_mut().expect("replica has data");
                let switch = Lsn(wal.end);
                wal.history.push(TimelineSwitch {
                    timeline: wal.timeline,
                    switch_lsn: switch,
                });
                wal.timeline += 1;
                let timeline = wal.timeline;
                node.role = Role::Primary;
                node.was_primary = true;
                node.following = None;
                self.promotions += 1;
                self.dcs.history.push(HistoryEntry {
                    timeline,
                    switch_lsn: switch,
                    reason: "failover".into(),
                    new_leader: name,
                    at: String::new(),
                });
            }
            Action::Follow { leader } => {
                let Some(source) = self.nodes.iter().find(|n| &n.name == leader) else {
                    return false;
                };
                if source.role != Role::Primary {
                    return false;
                }
                let upstream = source.data.clone();
                let node = &mut self.nodes[i];
                if let (Some(upstream), Some(wal)) = (upstream, node.data.as_mut())
                    && divergence(&wal.local(), &upstream.leader()) != Divergence::None
                {
                    // The shell stops the replica, rewinds and restarts it.
                    *wal = upstream;
                }
                self.nodes[i].following = Some(leader.clone());
            }
            Action::Fence { .. } => self.nodes[i].role = Role::Stopped,
            Action::SyncSlots { .. } => {}
            Action::WriteFailsafe {
                state,
                expected_revision,
            } => {
                let holds = self
                    .dcs
                    .leader
                    .as_ref()
                    .is_some_and(|l| l.0 == name && Some(l.1) == lease);
                let revision = self.dcs.failsafe.as_ref().map_or(0, |f| f.1);
                if !reachable || !holds || revision != *expected_revision {
                    return false;
                }
                let rev = self.dcs.bump();
                self.dcs.failsafe = Some((state.clone(), rev));
            }
            Action::WriteSync {
                members,
                expected_revision,
            } => {
                if !reachable {
                    return false;
                }
                let holds = self
                    .dcs
                    .leader
                    .as_ref()
                    .is_some_and(|l| l.0 == name && Some(l.1) == lease);
                let revision = self.dcs.sync.as_ref().map_or(0, |s| s.1);
                if !holds || revision != *expected_revision {
                    return false;
                }
                let rev = self.dcs.bump();
                self.dcs.sync = Some((
                    SyncState {
                        leader: name,
                        members: members.clone(),
                    },
                    rev,
                ));
            }
            Action::SetSyncStandbys { names, block } => {
                let node = &mut self.nodes[i];
                node.sync_names = names.clone();
                node.sync_block = *block;
            }
            // The simulation files no requests.
            Action::Switchover { .. } | Action::ClearFailover { .. } => {
                self.fail(format!("{name} acted on a failover request nobody made"))
            }
            Action::Fatal { reason } => {
                self.fail(format!("{name} stopped with a fatal error: {reason}"))
            }
        }
        let _ = now;
        true
    }

    /// No node is promoted while an eligible member on the same timeline has
    /// strictly more WAL. Eligible: its agent has reached the DCS through the
    /// whole election window and has published its member key in this session
    /// (a member cut off during the election cannot be waited for forever).
    fn check_promotion(&self, i: usize) {
        let me = &self.nodes[i];
        let Some(mine) = &me.data else { return };
        if let Some(acked) = &self.acked
            && (acked.system_id != mine.system_id
                || divergence(&acked.local(), &mine.leader()) != Divergence::None)
        {
            self.fail(format!(
                "{} promoted without an acknowledged commit: acknowledged up to {} on timeline \
                 {}, it has {} on timeline {} (sync key {:?})",
                me.name, acked.end, acked.timeline, mine.end, mine.timeline, self.dcs.sync
            ));
        }
        let view = self.dcs.view();
        for other in &self.nodes {
            let published = self
                .dcs
                .members
                .get(&other.name)
                .is_some_and(|m| Some(m.1) == other.lease_id);
            let eligible = other.visible_for_election(self.now)
                && published
                && other.role == Role::Replica
                && !other.tags.nofailover
                && (!self.config.synchronous_mode
                    || mainstay_core::sync::may_take_over(&view, &other.name));
            if other.name == me.name || !eligible {
                continue;
            }
            let Some(theirs) = &other.data else { continue };
            if theirs.timeline == mine.timeline && theirs.end > mine.end {
                self.fail(format!(
                    "{} promoted at {} while eligible {} had {} on timeline {}",
                    me.name, mine.end, other.name, theirs.end, mine.timeline
                ));
            }
        }
    }

    fn check_invariants(&self) {
        let writers: Vec<&Node> = self
            .nodes
            .iter()
            .filter(|n| n.role == Role::Primary)
            .collect();
        if writers.len() > 1 {
            let names: Vec<&str> = writers.iter().map(|n| n.name.as_str()).collect();
            self.fail(format!("two nodes accept writes: {names:?}"));
        }
        for writer in writers {
            if !writer.agent_alive {
                self.fail(format!(
                    "{} accepts writes without a live agent",
                    writer.name
                ));
            }
            if self.now >= writer.earliest_expiry_base + TTL_MS {
                self.fail(format!(
                    "{} accepts writes although its lease may have expired",
                    writer.name
                ));
            }
        }
    }

    fn check_converged(&self) {
        let electable = self
            .nodes
            .iter()
            .any(|n| n.data.is_some() && !n.tags.nofailover);
        if self.dcs.leader.is_none() && !electable {
            // Only nofailover nodes hold data: nobody may lead, by the
            // operator's own choice.
            return;
        }
        let view = self.dcs.view();
        let sync_electable = self.nodes.iter().any(|n| {
            n.data.is_some()
                && !n.tags.nofailover
                && mainstay_core::sync::may_take_over(&view, &n.name)
        });
        if self.config.synchronous_mode && self.dcs.leader.is_none() && !sync_electable {
            // Only nofailover nodes hold every acknowledged commit: promoting
            // anyone else could lose one, so the cluster waits for a human.
            return;
        }
        let Some((leader, _, _)) = &self.dcs.leader else {
            self.fail("no leader after the faults stopped".into())
        };
        let primary = self.nodes.iter().find(|n| &n.name == leader).unwrap();
        if primary.role != Role::Primary {
            self.fail(format!("leader {leader} is not running as primary"));
        }
        let top = primary.data.as_ref().unwrap();
        for node in &self.nodes {
            if &node.name == leader {
                continue;
            }
            let Some(wal) = &node.data else {
                self.fail(format!("{} has no data", node.name))
            };
            if node.role != Role::Replica || node.following.as_ref() != Some(leader) {
                self.fail(format!("{} is not a replica of {leader}", node.name));
            }
            if wal.system_id != top.system_id
                || divergence(&wal.local(), &top.leader()) != Divergence::None
            {
                self.fail(format!("{} cannot stream from {leader}", node.name));
            }
        }
    }
}

#[test]
fn clusters_stay_safe_and_converge_under_random_faults() {
    if let Ok(seed) = std::env::var("MAINSTAY_SIM_SEED") {
        let seed: u64 = seed.parse().expect("MAINSTAY_SIM_SEED must be a number");
        Sim::new(seed, true).run();
        return;
    }
    let seeds: u64 = std::env::var("MAINSTAY_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3000);
    let mut promotions = 0;
    let mut moved_aside = 0;
    let mut sync_promotions = 0;
    let mut acked = 0;
    for seed in 0..seeds {
        let mut sim = Sim::new(seed, false);
        sim.run();
        promotions += sim.promotions;
        if sim.config.synchronous_mode {
            sync_promotions += sim.promotions;
            acked += sim.acked_commits;
        }
        moved_aside += sim.nodes.iter().map(|n| n.moved_aside).sum::<usize>();
    }
    eprintln!(
        "{seeds} seeds: {promotions} promotions ({sync_promotions} in synchronous mode, \
         {acked} acknowledgements checked), {moved_aside} data directories moved aside"
    );
    assert!(
        sync_promotions > seeds as usize / 4,
        "synchronous-mode seeds should fail over too"
    );
    assert!(
        promotions > seeds as usize / 2,
        "the faults should cause failovers"
    );
}
