//! The fault suite: three hosts as network namespaces on a bridge, each with
//! an etcd member, an agent and PostgreSQL, and a client namespace whose
//! writers commit continuously through the VIP and through the nodes'
//! read-write proxies. Each scenario injects one fault, lets the cluster
//! settle, and checks the writers' evidence:
//! (a) in synchronous mode no acknowledged id is missing; in asynchronous
//!     mode the loss is counted (an unacknowledged row is an unknown
//!     outcome, never loss nor error);
//! (b) no two nodes accepted writes at overlapping times (server commit
//!     timestamps per node and timeline: every namespace shares the
//!     machine's clock);
//! (c) the cluster converged: one primary, every other node streaming, every
//!     data directory still there.
//!
//! A plain binary (`harness = false`): scenarios run one after another and
//! the suite ends with a table and `N passed, N failed`. Needs root; without
//! it the suite says it was skipped.

mod common;

use common::{Harness, connect, prerequisites, test_dir};
use mainstay::demo::{LAB_PG_PORT, LAB_PROXY_PORT, LocalCluster, SUPERUSER, SUPERUSER_PASSWORD};
use mainstay_testkit::netns::{self, Lab};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const VIP: &str = "10.213.0.50";

/// One acknowledged write: who acknowledged it, on which timeline, when
/// (server clock, microseconds since the epoch) and when the client heard.
#[derive(Clone, Debug)]
struct Ack {
    id: i64,
    node: String,
    timeline: u32,
    committed_us: i64,
    heard: Instant,
}

#[derive(Default)]
struct Evidence {
    acked: Vec<Ack>,
    /// Writes whose outcome the client cannot know (the connection broke
    /// during the commit): neither loss nor error if absent.
    unknown: Vec<i64>,
}

/// The figures a scenario prints.
struct Outcome {
    unavailable_ms: u64,
    acked: usize,
    lost: usize,
    unknown: usize,
    duplicates: i64,
}

struct Writers {
    stop: Arc<AtomicBool>,
    evidence: Arc<Mutex<Evidence>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

fn conninfo(hosts: &str, port: &str) -> String {
    format!(
        "host={hosts} port={port} user={SUPERUSER} password={SUPERUSER_PASSWORD} dbname=postgres connect_timeout=1"
    )
}

impl Writers {
    /// One writer through the VIP, one through the proxies of every node.
    async fn start(h: &Harness) -> Writers {
        let hosts: Vec<&str> = h.cluster.nodes.iter().map(|n| n.host.as_str()).collect();
        let ports = vec![LAB_PROXY_PORT.to_string(); hosts.len()].join(",");
        let paths = [
            conninfo(VIP, &LAB_PG_PORT.to_string()),
            conninfo(&hosts.join(","), &ports),
        ];
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ready = async {
                let c = connect(&paths[0]).await.map_err(|e| e.to_string())?;
                c.batch_execute(
                    "CREATE TABLE IF NOT EXISTS fault_writes (id bigint, writer int, at timestamptz DEFAULT clock_timestamp())",
                )
                .await
                .map_err(|e| e.to_string())
            };
            match ready.await {
                Ok(()) => break,
                Err(e) => assert!(
                    Instant::now() < deadline,
                    "cannot write through the VIP: {e}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let evidence = Arc::new(Mutex::new(Evidence::default()));
        let next_id = Arc::new(AtomicI64::new(1));
        let tasks = paths
            .into_iter()
            .enumerate()
            .map(|(writer, conninfo)| {
                tokio::spawn(write_loop(
                    writer as i32,
                    conninfo,
                    next_id.clone(),
                    evidence.clone(),
                    stop.clone(),
                ))
            })
            .collect();
        Writers {
            stop,
            evidence,
            tasks,
        }
    }

    fn acked_since(&self, after: Instant, not_node: Option<&str>) -> Option<Instant> {
        let evidence = self.evidence.lock().unwrap();
        evidence
            .acked
            .iter()
            .filter(|a| a.heard > after && Some(a.node.as_str()) != not_node)
            .map(|a| a.heard)
            .min()
    }

    /// The longest time without an acknowledged write from `at` until now.
    fn longest_gap_since(&self, at: Instant) -> u64 {
        let evidence = self.evidence.lock().unwrap();
        let mut heard: Vec<Instant> = evidence
            .acked
            .iter()
            .map(|a| a.heard)
            .filter(|h| *h >= at)
            .collect();
        heard.sort();
        let mut previous = at;
        let mut longest = Duration::ZERO;
        for h in heard.into_iter().chain([Instant::now()]) {
            longest = longest.max(h.duration_since(previous));
            previous = h;
        }
        longest.as_millis() as u64
    }

    async fn finish(self) -> Evidence {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            let _ = task.await;
        }
        Arc::try_unwrap(self.evidence)
            .ok()
            .map(|m| m.into_inner().unwrap())
            .unwrap_or_default()
    }
}

async fn write_loop(
    writer: i32,
    conninfo: String,
    next_id: Arc<AtomicI64>,
    evidence: Arc<Mutex<Evidence>>,
    stop: Arc<AtomicBool>,
) {
    let mut client = None;
    while !stop.load(Ordering::Relaxed) {
        if client.is_none() {
            match tokio::time::timeout(Duration::from_secs(2), connect(&conninfo)).await {
                Ok(Ok(c)) => client = Some(c),
                _ => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            }
        }
        let Some(c) = &client else { continue };
        let id = next_id.fetch_add(1, Ordering::Relaxed);
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&id, &writer];
        let insert = c.query_one(
            "INSERT INTO fault_writes (id, writer) VALUES ($1, $2) RETURNING \
             current_setting('data_directory'), pg_walfile_name(pg_current_wal_lsn()), \
             (extract(epoch FROM at) * 1000000)::bigint",
            &params,
        );
        match tokio::time::timeout(Duration::from_secs(3), insert).await {
            Ok(Ok(row)) => {
                let dir: String = row.get(0);
                let walfile: String = row.get(1);
                let ack = Ack {
                    id,
                    node: dir.rsplit('/').nth(1).unwrap_or_default().to_string(),
                    timeline: u32::from_str_radix(&walfile[..8], 16).unwrap_or(0),
                    committed_us: row.get(2),
                    heard: Instant::now(),
                };
                evidence.lock().unwrap().acked.push(ack);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Ok(Err(e)) if e.as_db_error().is_some() => {
                // The server refused the statement (read-only, shutting
                // down): nothing was committed.
                client = None;
            }
            _ => {
                evidence.lock().unwrap().unknown.push(id);
                client = None;
            }
        }
    }
}

/// The checks every scenario ends with; `sync`: no acknowledged write may
/// be missing.
async fn check(h: &Harness, evidence: &Evidence, sync: bool, unavailable_ms: u64) -> Outcome {
    let leader = h.healthy(Duration::from_secs(120)).await;
    for node in &h.cluster.nodes {
        assert!(
            node.data_dir().join("PG_VERSION").exists(),
            "{}'s data directory is gone",
            node.name
        );
    }
    let client = h.client(&leader).await;
    let rows = client
        .query("SELECT id FROM fault_writes", &[])
        .await
        .expect("reading the writes");
    let mut present = BTreeMap::new();
    for row in rows {
        *present.entry(row.get::<_, i64>(0)).or_insert(0i64) += 1;
    }
    let duplicates: i64 = present.values().map(|n| n - 1).sum();
    let lost: Vec<i64> = evidence
        .acked
        .iter()
        .map(|a| a.id)
        .filter(|id| !present.contains_key(id))
        .collect();
    if sync {
        assert!(
            lost.is_empty(),
            "synchronous mode lost acknowledged ids {lost:?}"
        );
    }
    // No two writers at once: per (node, timeline), the span of server
    // commit times; spans of different nodes must not overlap.
    let mut spans: BTreeMap<(String, u32), (i64, i64)> = BTreeMap::new();
    for a in &evidence.acked {
        let span = spans
            .entry((a.node.clone(), a.timeline))
            .or_insert((a.committed_us, a.committed_us));
        span.0 = span.0.min(a.committed_us);
        span.1 = span.1.max(a.committed_us);
    }
    let spans: Vec<_> = spans.into_iter().collect();
    for (i, (a, (a_from, a_to))) in spans.iter().enumerate() {
        for (b, (b_from, b_to)) in &spans[i + 1..] {
            if a.0 != b.0 {
                assert!(
                    a_to < b_from || b_to < a_from,
                    "two writers at once: {a:?} accepted writes {a_from}..{a_to} µs, \
                     {b:?} {b_from}..{b_to} µs"
                );
            }
        }
    }
    let nodes: BTreeSet<&str> = evidence.acked.iter().map(|a| a.node.as_str()).collect();
    assert!(!nodes.is_empty(), "no write was acknowledged at all");
    Outcome {
        unavailable_ms,
        acked: evidence.acked.len(),
        lost: lost.len(),
        unknown: evidence.unknown.len(),
        duplicates,
    }
}

async fn enable_sync(h: &Harness, leader: &str) {
    common::patch_config(h, leader, serde_json::json!({"synchronous_mode": true})).await;
    common::wait_sync_standby(h, Duration::from_secs(60)).await;
}

/// The leader and how long writes were unavailable after `fault` (from the
/// fault to the first write a node other than the old leader acknowledged).
async fn disrupt(
    h: &mut Harness,
    writers: &Writers,
    fault: impl FnOnce(&mut Harness, usize),
) -> u64 {
    let leader = h.healthy(Duration::from_secs(120)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let l = h.cluster.node_index(&leader).unwrap();
    let at = Instant::now();
    fault(h, l);
    first_write_elsewhere(writers, at, &leader).await
}

/// Milliseconds from `at` to the first write a node other than `old`
/// acknowledged (at most 90 s).
async fn first_write_elsewhere(writers: &Writers, at: Instant, old: &str) -> u64 {
    let deadline = at + Duration::from_secs(90);
    loop {
        if let Some(first) = writers.acked_since(at, Some(old)) {
            return first.duration_since(at).as_millis() as u64;
        }
        assert!(
            Instant::now() < deadline,
            "no write on a node other than {old} within 90 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

type Running<'a> = std::pin::Pin<Box<dyn Future<Output = Outcome> + 'a>>;
type ScenarioFn = dyn Fn(&mut Harness) -> Running<'_> + Sync;

fn kill_primary(sync: bool) -> impl Fn(&mut Harness) -> Running<'_> + Sync {
    move |h| {
        Box::pin(async move {
            let leader = h.healthy(Duration::from_secs(120)).await;
            if sync {
                enable_sync(h, &leader).await;
            }
            let writers = Writers::start(h).await;
            let unavailable = disrupt(h, &writers, |h, l| h.cluster.kill_node(l)).await;
            // The killed node comes back and rejoins.
            restart_stopped_agents(h);
            let evidence = writers.finish().await;
            check(h, &evidence, sync, unavailable).await
        })
    }
}

/// The primary's agent alone is killed: its PostgreSQL (the agent's child,
/// with a parent-death signal) goes with it, and so does the VIP, before
/// any other node is promoted.
fn kill_primary_agent(h: &mut Harness) -> Running<'_> {
    Box::pin(async move {
        h.healthy(Duration::from_secs(120)).await;
        let writers = Writers::start(h).await;
        let unavailable = disrupt(h, &writers, |h, l| {
            let pid = h.cluster.agent_pid(l).unwrap();
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        })
        .await;
        let old = stopped_agents(h)[0];
        // Its server stopped with it and nothing holds the VIP there.
        assert!(
            h.cluster.nodes[old].postmaster_pid().is_none(),
            "PostgreSQL outlived its agent"
        );
        let addresses = h.cluster.lab.as_ref().unwrap().addresses(old).unwrap();
        assert!(
            !addresses.iter().any(|a| a.starts_with(VIP)),
            "the VIP stayed on the killed agent's host: {addresses:?}"
        );
        restart_stopped_agents(h);
        let evidence = writers.finish().await;
        check(h, &evidence, false, unavailable).await
    })
}

/// The healthy cluster's leader, with the writers running for 2 s.
async fn under_load(h: &Harness) -> (String, Writers) {
    let leader = h.healthy(Duration::from_secs(120)).await;
    let writers = Writers::start(h).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    (leader, writers)
}

fn stopped_agents(h: &mut Harness) -> Vec<usize> {
    (0..h.cluster.nodes.len())
        .filter(|&i| !h.cluster.agent_running(i))
        .collect()
}

/// Brings back every node whose agent was killed; they rejoin.
fn restart_stopped_agents(h: &mut Harness) {
    for i in stopped_agents(h) {
        h.cluster.start_agent(i).unwrap();
    }
}

/// The primary host's cable is pulled (its agent and PostgreSQL keep
/// running, cut off from etcd and from clients), then plugged back.
fn primary_link_down(h: &mut Harness) -> Running<'_> {
    Box::pin(async move {
        h.healthy(Duration::from_secs(120)).await;
        let writers = Writers::start(h).await;
        let mut cut = None;
        let unavailable = disrupt(h, &writers, |h, l| {
            h.cluster.lab.as_ref().unwrap().set_link(l, false).unwrap();
            cut = Some(l);
        })
        .await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        h.cluster
            .lab
            .as_ref()
            .unwrap()
            .set_link(cut.unwrap(), true)
            .unwrap();
        let evidence = writers.finish().await;
        check(h, &evidence, false, unavailable).await
    })
}

/// A replica's cable is pulled for 8 s: no failover, writes go on.
fn replica_isolated(h: &mut Harness) -> Running<'_> {
    Box::pin(async move {
        let (leader, writers) = under_load(h).await;
        let replica = h.other_than(&leader);
        let r = h.cluster.node_index(&replica).unwrap();
        let at = Instant::now();
        h.cluster.lab.as_ref().unwrap().set_link(r, false).unwrap();
        tokio::time::sleep(Duration::from_secs(8)).await;
        h.cluster.lab.as_ref().unwrap().set_link(r, true).unwrap();
        let view = h.view().await;
        assert_eq!(
            view.leader_name(),
            Some(leader.as_str()),
            "a replica's isolation moved the leader"
        );
        let unavailable = writers.longest_gap_since(at);
        let evidence = writers.finish().await;
        let outcome = check(h, &evidence, false, unavailable).await;
        assert_eq!(h.healthy(Duration::from_secs(60)).await, leader);
        outcome
    })
}

/// PostgreSQL alone crashes on the primary (SIGKILL of the postmaster):
/// the agent brings it back; the cluster converges.
fn primary_postgres_crash(h: &mut Harness) -> Running<'_> {
    Box::pin(async move {
        let (leader, writers) = under_load(h).await;
        let l = h.cluster.node_index(&leader).unwrap();
        let pid = h.cluster.nodes[l].postmaster_pid().unwrap();
        let at = Instant::now();
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let deadline = at + Duration::from_secs(90);
        while writers
            .acked_since(at + Duration::from_millis(500), None)
            .is_none()
        {
            assert!(
                Instant::now() < deadline,
                "no write within 90 s of the crash"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let unavailable = writers.longest_gap_since(at);
        let evidence = writers.finish().await;
        check(h, &evidence, false, unavailable).await
    })
}

/// A planned switchover while the writers run: nothing acknowledged is lost.
fn switchover_under_load(h: &mut Harness) -> Running<'_> {
    Box::pin(async move {
        let (leader, writers) = under_load(h).await;
        let candidate = h.other_than(&leader);
        let at = Instant::now();
        let (code, _, err) = common::run_ctl(
            h,
            &leader,
            &["switchover", "--candidate", &candidate, "--force"],
        )
        .await;
        assert_eq!(code, 0, "{err}");
        first_write_elsewhere(&writers, at, &leader).await;
        let unavailable = writers.longest_gap_since(at);
        let evidence = writers.finish().await;
        let outcome = check(h, &evidence, false, unavailable).await;
        assert_eq!(outcome.lost, 0, "a switchover lost acknowledged writes");
        outcome
    })
}

/// The primary is killed, and the new one as soon as it has written: the
/// last node standing takes over; both come back and rejoin.
fn two_quick_failovers(h: &mut Harness) -> Running<'_> {
    Box::pin(async move {
        h.healthy(Duration::from_secs(120)).await;
        let writers = Writers::start(h).await;
        let at = Instant::now();
        let first = disrupt(h, &writers, |h, l| h.cluster.kill_node(l)).await;
        let second = disrupt_now(h, &writers).await;
        restart_stopped_agents(h);
        let unavailable = writers.longest_gap_since(at).max(first).max(second);
        let evidence = writers.finish().await;
        check(h, &evidence, false, unavailable).await
    })
}

/// Kills the current primary (agent and PostgreSQL) at once, without waiting
/// for the cluster to be whole; returns the time to the next primary's write.
async fn disrupt_now(h: &mut Harness, writers: &Writers) -> u64 {
    let leader = h
        .wait_for("a primary", Duration::from_secs(60), async |v| {
            v.leader_status()
                .filter(|s| s.role == mainstay_core::PgRole::Primary)
                .map(|s| s.name.clone())
        })
        .await;
    let l = h.cluster.node_index(&leader).unwrap();
    let at = Instant::now();
    h.cluster.kill_node(l);
    first_write_elsewhere(writers, at, &leader).await
}

fn run_scenario(scenario: &ScenarioFn) -> Result<Outcome, String> {
    std::thread::scope(|scope| {
        let handle = scope.spawn(|| {
            let lab = Lab::create(3).map_err(|e| format!("building the lab: {e}"))?;
            netns::enter(&format!("/run/netns/{}", lab.client()))
                .map_err(|e| format!("entering the client namespace: {e}"))?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            runtime.block_on(async {
                let cluster = LocalCluster::start_in_lab(
                    // Short: PostgreSQL's socket path beside the data
                    // directory must stay under 108 bytes.
                    &test_dir("faults"),
                    lab,
                    3,
                    Path::new(env!("CARGO_BIN_EXE_mainstay")),
                    "default",
                    &format!("vip = \"{VIP}/24\"\nvip_interface = \"eth0\"\n"),
                )
                .map_err(|e| format!("starting the lab cluster: {e}"))?;
                let mut h = Harness::adopt(cluster);
                let outcome = scenario(&mut h).await;
                h.passed = true;
                Ok(outcome)
            })
        });
        match handle.join() {
            Ok(result) => result,
            Err(panic) => Err(panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panicked".into())),
        }
    })
}

fn main() {
    if let Some(why) = netns::unavailable() {
        println!("SKIPPED: the fault suite: {why}");
        return;
    }
    if !prerequisites() {
        return;
    }
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let scenarios: Vec<(&str, Box<ScenarioFn>)> = vec![
        ("primary_killed_async", Box::new(kill_primary(false))),
        ("primary_killed_sync", Box::new(kill_primary(true))),
        ("primary_agent_killed", Box::new(kill_primary_agent)),
        ("primary_link_down", Box::new(primary_link_down)),
        ("replica_isolated", Box::new(replica_isolated)),
        ("primary_postgres_crash", Box::new(primary_postgres_crash)),
        ("switchover_under_load", Box::new(switchover_under_load)),
        ("two_quick_failovers", Box::new(two_quick_failovers)),
    ];
    let mut rows = Vec::new();
    for (name, scenario) in &scenarios {
        if filter.as_deref().is_some_and(|f| !name.contains(f)) {
            continue;
        }
        let started = Instant::now();
        let result = run_scenario(scenario.as_ref());
        match &result {
            Ok(o) => println!(
                "{name}: ok in {:?}: unavailable {} ms, {} acknowledged, {} lost, {} unknown, {} duplicates",
                started.elapsed(),
                o.unavailable_ms,
                o.acked,
                o.lost,
                o.unknown,
                o.duplicates
            ),
            Err(e) => println!("{name}: FAILED after {:?}: {e}", started.elapsed()),
        }
        rows.push((name, result));
    }
    println!();
    println!("| scenario | result | unavailable ms | acknowledged | lost | unknown | duplicates |");
    println!("|---|---|---|---|---|---|---|");
    for (name, result) in &rows {
        match result {
            Ok(o) => println!(
                "| {name} | ok | {} | {} | {} | {} | {} |",
                o.unavailable_ms, o.acked, o.lost, o.unknown, o.duplicates
            ),
            Err(_) => println!("| {name} | FAILED | | | | | |"),
        }
    }
    let failed = rows.iter().filter(|(_, r)| r.is_err()).count();
    println!("{} passed, {failed} failed", rows.len() - failed);
    if failed > 0 {
        std::process::exit(1);
    }
}
