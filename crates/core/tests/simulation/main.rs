//! Deterministic simulation of whole clusters driven by the real decision
//! core (`decide`) and the real lease rules (`lease::LeaseClock`): etcd with
//! leases on its own clock, nodes with drifting clocks, a lease keeper and a
//! fencing guard per node, a model of PostgreSQL whose WAL records who wrote
//! every byte, and seeded random faults. After every step the invariants of
//! docs/rules.md section 8 are checked (`oracle`): no two servers accept
//! writes at overlapping times; none accepts a write at or past the exact
//! deadline its guard holds, or while another node holds the leader key, or
//! while etcd may have expired its lease (outside a failsafe promise); no
//! node lacking an acknowledged commit becomes writable (synchronous mode);
//! no replica follows without a rewind onto WAL that is not its leader's;
//! and once the faults stop the cluster must converge.
//!
//! Modules: `model` (clocks, WAL, etcd, nodes), `keeper` (lease keeping and
//! the guard), `shell` (the HA loop), `actions` (carrying out decisions,
//! after agent.rs), `known` (core bugs found and not fixed yet),
//! `faults` (what goes wrong), `driver` (the step loop, replication,
//! acknowledgements), `oracle` (the invariants).
//!
//! Odd seeds run in synchronous mode (strict or not, sometimes with
//! `synchronous_node_count` above 1), where the model acknowledges commits
//! only as PostgreSQL would (`ANY n` over the listed standbys) and no node
//! lacking an acknowledged commit may ever become writable.
//!
//! `MAINSTAY_SIM_SEEDS=N` sets how many seeds run (default 3000; `A..B` for a
//! range), `MAINSTAY_SIM_SEED=S` replays one seed with a step-by-step trace,
//! `MAINSTAY_SIM_SURVEY=1` lists every failing seed instead of stopping at
//! the first, `MAINSTAY_SIM_STRICT=1` fails on known core bugs too.
//! `MAINSTAY_SIM_THREADS` caps the worker threads (default: every CPU).

#![forbid(unsafe_code)]

mod actions;
mod driver;
mod faults;
mod keeper;
mod known;
mod model;
mod oracle;
mod shell;

use driver::Sim;
use faults::Fault;
use known::KnownBug;
use oracle::{Kind, Violation};
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

pub(crate) const STEP_MS: u64 = 50;
pub(crate) const FAULT_WINDOW_MS: u64 = 60_000;
pub(crate) const SETTLE_MS: u64 = 40_000;

/// The agent's `[timing]` profiles (`mainstay_core::Timing`), in milliseconds.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Timing {
    pub(crate) ttl: u64,
    pub(crate) loop_wait: u64,
    pub(crate) renew: u64,
    pub(crate) dcs_timeout: u64,
    pub(crate) margin: u64,
}

impl Timing {
    pub(crate) const DEFAULT: Timing = Timing::of(mainstay_core::Timing::DEFAULT);
    pub(crate) const FAST: Timing = Timing::of(mainstay_core::Timing::FAST);

    /// A profile of the agent's, in the simulation's milliseconds.
    const fn of(profile: mainstay_core::Timing) -> Timing {
        Timing {
            ttl: profile.ttl.as_millis() as u64,
            loop_wait: profile.loop_wait.as_millis() as u64,
            renew: profile.renew_interval.as_millis() as u64,
            dcs_timeout: profile.dcs_timeout.as_millis() as u64,
            margin: profile.fencing_margin.as_millis() as u64,
        }
    }
}

/// A bug planted in the harness, to prove the oracle can fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Plant {
    None,
    /// The guard acts a loop_wait after its deadline, and so does every
    /// Fence the agent carries out.
    LateFence,
    /// The last node is shown a `sync` key that names it: a standby that is
    /// not synchronous may take over.
    DoctoredSync,
}

#[derive(Default)]
struct Totals {
    seeds: u64,
    promotions: usize,
    sync_promotions: usize,
    acked: u64,
    moved_aside: usize,
    faults: [u64; Fault::ALL.len()],
    /// Seeds that hit a known core bug (see `known`).
    known: BTreeMap<KnownBug, Vec<u64>>,
}

impl Totals {
    fn add(&mut self, sim: &Sim) {
        self.seeds += 1;
        self.promotions += sim.promotions;
        if sim.config.synchronous_mode {
            self.sync_promotions += sim.promotions;
            self.acked += sim.acked_commits;
        }
        self.moved_aside += sim.nodes.iter().map(|n| n.moved_aside).sum::<usize>();
        for (k, fault) in Fault::ALL.iter().enumerate() {
            if sim.seen & (1 << *fault as u32) != 0 {
                self.faults[k] += 1;
            }
        }
    }

    fn merge(&mut self, other: Totals) {
        self.seeds += other.seeds;
        self.promotions += other.promotions;
        self.sync_promotions += other.sync_promotions;
        self.acked += other.acked;
        self.moved_aside += other.moved_aside;
        for (k, n) in other.faults.iter().enumerate() {
            self.faults[k] += n;
        }
        for (bug, seeds) in other.known {
            self.known.entry(bug).or_default().extend(seeds);
        }
    }
}

fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| v != "0")
}

/// One seed: the cluster as it ended (unless the simulator panicked) and
/// its violation, if any.
fn run_one(seed: u64, trace: bool, plant: Plant) -> (Option<Sim>, Option<Violation>) {
    let outcome = std::panic::catch_unwind(|| {
        let mut sim = Sim::new(seed, trace, plant);
        let violation = sim.run().err();
        (sim, violation)
    });
    match outcome {
        Ok((sim, violation)) => (Some(sim), violation),
        Err(_) => (
            None,
            Some(Violation {
                kind: Kind::Panic,
                known: None,
                seed,
                at: 0,
                message: "the simulator panicked (see above)".into(),
                state: String::new(),
            }),
        ),
    }
}

/// Runs `seeds` (on every CPU), returning the totals and the violation of
/// the lowest failing seed, if any. A known core bug fails nothing unless
/// `MAINSTAY_SIM_STRICT=1`; `MAINSTAY_SIM_SURVEY=1` goes on past failures
/// and lists every one.
fn run_seeds(seeds: std::ops::Range<u64>, plant: Plant) -> (Totals, Option<Violation>) {
    let threads = std::env::var("MAINSTAY_SIM_THREADS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    let survey = env_flag("MAINSTAY_SIM_SURVEY");
    let strict = env_flag("MAINSTAY_SIM_STRICT");
    let next = AtomicU64::new(seeds.start);
    let totals = Mutex::new(Totals::default());
    let first = Mutex::new(None::<Violation>);
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                let mut mine = Totals::default();
                loop {
                    let seed = next.fetch_add(1, Ordering::Relaxed);
                    let failed = first.lock().unwrap().as_ref().map(|v| v.seed);
                    if seed >= seeds.end || (!survey && failed.is_some_and(|s| s < seed)) {
                        break;
                    }
                    let (sim, violation) = run_one(seed, false, plant);
                    if let Some(sim) = &sim {
                        mine.add(sim);
                    }
                    let Some(violation) = violation else { continue };
                    if survey {
                        eprintln!(
                            "seed {} {:?} {:?} at {}: {}",
                            violation.seed,
                            violation.kind,
                            violation.known,
                            violation.at,
                            violation.message.chars().take(200).collect::<String>()
                        );
                    }
                    if let Some(bug) = violation.known.filter(|_| !strict) {
                        mine.known.entry(bug).or_default().push(seed);
                        continue;
                    }
                    let mut first = first.lock().unwrap();
                    if first.as_ref().is_none_or(|v| v.seed > seed) {
                        *first = Some(violation);
                    }
                }
                totals.lock().unwrap().merge(mine);
            });
        }
    });
    (totals.into_inner().unwrap(), first.into_inner().unwrap())
}

#[test]
fn clusters_stay_safe_and_converge_under_random_faults() {
    if let Ok(seed) = std::env::var("MAINSTAY_SIM_SEED") {
        let seed: u64 = seed.parse().expect("MAINSTAY_SIM_SEED must be a number");
        if let (_, Some(violation)) = run_one(seed, true, Plant::None) {
            panic!("{violation}");
        }
        return;
    }
    // `N` (seeds 0..N) or `A..B`.
    let range = std::env::var("MAINSTAY_SIM_SEEDS").unwrap_or_else(|_| "3000".into());
    let range = match range.split_once("..") {
        Some((a, b)) => a.parse().expect("a seed")..b.parse().expect("a seed"),
        None => 0..range.parse().expect("MAINSTAY_SIM_SEEDS must be N or A..B"),
    };
    let seeds = range.end - range.start;
    let started = std::time::Instant::now();
    let (mut totals, violation) = run_seeds(range, Plant::None);
    if let Some(violation) = violation {
        panic!("{violation}");
    }
    let elapsed = started.elapsed().as_secs_f64();
    eprintln!(
        "{seeds} seeds in {elapsed:.1} s ({:.0} seeds/s): {} promotions ({} in synchronous \
         mode, {} acknowledgements checked), {} data directories moved aside",
        seeds as f64 / elapsed,
        totals.promotions,
        totals.sync_promotions,
        totals.acked,
        totals.moved_aside
    );
    eprintln!("seeds per fault kind:");
    for (k, fault) in Fault::ALL.iter().enumerate() {
        eprintln!("  {:<26} {}", format!("{fault:?}"), totals.faults[k]);
    }
    for (bug, hit) in &mut totals.known {
        hit.sort();
        eprintln!(
            "KNOWN CORE BUG {bug:?} (not fixed; see tests/simulation/known.rs): {} seeds, e.g. \
             {:?}",
            hit.len(),
            &hit[..hit.len().min(8)]
        );
    }
    assert!(
        totals.sync_promotions > seeds as usize / 4,
        "synchronous-mode seeds should fail over too"
    );
    assert!(
        totals.promotions > seeds as usize / 2,
        "the faults should cause failovers"
    );
    for (k, fault) in Fault::ALL.iter().enumerate() {
        assert!(
            seeds < 1000 || totals.faults[k] * 100 >= seeds,
            "fault kind {fault:?} reached only {} of {seeds} seeds",
            totals.faults[k]
        );
    }
}

/// The seeds the planted-bug tests search: CI's 10,000.
const PLANTED_SEEDS: std::ops::Range<u64> = 0..10_000;

fn first_violation(plant: Plant) -> Violation {
    let (_, violation) = run_seeds(PLANTED_SEEDS, plant);
    let violation = violation.unwrap_or_else(|| {
        panic!("planted bug {plant:?}: no violation in seeds {PLANTED_SEEDS:?}")
    });
    eprintln!(
        "planted bug {plant:?}: first violation at seed {}: {:?}: {}",
        violation.seed, violation.kind, violation.message
    );
    violation
}

#[test]
fn a_fence_one_loop_late_is_caught() {
    let violation = first_violation(Plant::LateFence);
    assert_eq!(violation.kind, Kind::PastDeadline, "{violation}");
}

#[test]
fn a_standby_outside_sync_that_takes_over_is_caught() {
    let violation = first_violation(Plant::DoctoredSync);
    assert_eq!(violation.kind, Kind::LostCommit, "{violation}");
}

/// Each known core bug still happens: at its recorded seed or, if the core
/// or the simulator changed what that seed does, at some seed CI runs. A
/// failure here means a bug looks fixed: take it out of `known.rs`, so that
/// the simulator fails on it again.
#[test]
fn known_core_bugs_still_reproduce() {
    for (bug, seed) in KnownBug::SEEDS {
        let hit = |seed: u64| {
            run_one(seed, false, Plant::None)
                .1
                .is_some_and(|v| v.known == Some(bug))
        };
        if hit(seed) {
            continue;
        }
        let found = PLANTED_SEEDS.clone().find(|&s| hit(s));
        assert!(
            found.is_some(),
            "known core bug {bug:?} no longer happens in seeds {PLANTED_SEEDS:?}: if the core \
             fixed it, remove it from tests/simulation/known.rs"
        );
        eprintln!("known core bug {bug:?}: now at seed {found:?} (update known.rs)");
    }
}
