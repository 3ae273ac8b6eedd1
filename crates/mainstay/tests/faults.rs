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
//! it the suite fails, unless `MAINSTAY_ALLOW_SKIP=1` lets it say it was
//! skipped.

mod common;

use common::{Harness, connect, prerequisites, test_dir};
use mainstay::demo::{
    LAB_PG_PORT, LAB_PROXY_PORT, LabOptions, LocalCluster, SUPERUSER, SUPERUSER_PASSWORD,
};
use mainstay_testkit::netns::{self, Lab};
use mainstay_testkit::{Relay, skip};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
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
    /// The server's WAL position right after the insert.
    lsn: u64,
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
    /// WAL the lost writes occupied on their timeline past the point where
    /// the next timeline forked off.
    lost_wal_bytes: u64,
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

/// The node a data directory belongs to: `.../node2/data` or, on a disk
/// of its own, `.../node2/disk/data`.
fn node_of(data_dir: &str) -> String {
    data_dir
        .split('/')
        .rfind(|part| part.starts_with("node"))
        .unwrap_or_default()
        .to_string()
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
             (extract(epoch FROM at) * 1000000)::bigint, \
             (pg_current_wal_insert_lsn() - '0/0')::bigint",
            &params,
        );
        // Pipelined behind the insert, so it runs once the insert has
        // committed: a WAL position past this write's commit record.
        let after = c.query_one("SELECT (pg_current_wal_insert_lsn() - '0/0')::bigint", &[]);
        let both = async { tokio::join!(insert, after) };
        match tokio::time::timeout(Duration::from_secs(3), both)
            .await
            .map(|(insert, after)| insert.map(|row| (row, after.ok())))
        {
            Ok(Ok((row, after))) => {
                let dir: String = row.get(0);
                let walfile: String = row.get(1);
                let lsn = after.map_or(row.get::<_, i64>(3), |a| a.get(0));
                let ack = Ack {
                    id,
                    node: node_of(&dir),
                    timeline: u32::from_str_radix(&walfile[..8], 16).unwrap_or(0),
                    committed_us: row.get(2),
                    lsn: lsn as u64,
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
    let history = h.view().await.history;
    let lost: BTreeSet<i64> = lost.into_iter().collect();
    // Per node and timeline, the lost write furthest into the WAL, and
    // where the surviving lineage left that node's: the last switch another
    // node made at or before it (two nodes may both create "timeline 2"
    // from timeline 1 when failovers follow each other quickly).
    let mut furthest: BTreeMap<(String, u32), u64> = BTreeMap::new();
    for a in evidence.acked.iter().filter(|a| lost.contains(&a.id)) {
        let lsn = furthest.entry((a.node.clone(), a.timeline)).or_default();
        *lsn = (*lsn).max(a.lsn);
    }
    let mut lost_wal_bytes = 0;
    for ((node, timeline), lsn) in furthest {
        let fork = history
            .iter()
            .filter(|e| e.new_leader != node && e.timeline >= timeline && e.switch_lsn.0 <= lsn)
            .map(|e| e.switch_lsn.0)
            .max();
        if let Some(fork) = fork {
            lost_wal_bytes += lsn - fork;
        }
    }
    Outcome {
        unavailable_ms,
        acked: evidence.acked.len(),
        lost: lost.len(),
        lost_wal_bytes,
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
    let first = first_write(writers, at, Some(old), Duration::from_secs(90)).await;
    first.duration_since(at).as_millis() as u64
}

/// The first write acknowledged after `after` (by a node other than
/// `not_on`, if given); fails the scenario if none comes within `within`.
async fn first_write(
    writers: &Writers,
    after: Instant,
    not_on: Option<&str>,
    within: Duration,
) -> Instant {
    let deadline = Instant::now() + within;
    loop {
        if let Some(first) = writers.acked_since(after, not_on) {
            return first;
        }
        assert!(
            Instant::now() < deadline,
            "no write (on a node other than {not_on:?}) within {within:?}"
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
        let addresses = lab(h).addresses(old).unwrap();
        assert!(
            !addresses.iter().any(|a| a.starts_with(VIP)),
            "the VIP stayed on the killed agent's host: {addresses:?}"
        );
        restart_stopped_agents(h);
        let evidence = writers.finish().await;
        check(h, &evidence, false, unavailable).await
    })
}

fn lab(h: &Harness) -> &Lab {
    h.cluster.lab.as_ref().expect("a lab cluster")
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
            lab(h).set_link(l, false).unwrap();
            cut = Some(l);
        })
        .await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        lab(h).set_link(cut.unwrap(), true).unwrap();
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
        lab(h).set_link(r, false).unwrap();
        tokio::time::sleep(Duration::from_secs(8)).await;
        lab(h).set_link(r, true).unwrap();
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
        first_write(
            &writers,
            at + Duration::from_millis(500),
            None,
            Duration::from_secs(90),
        )
        .await;
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

/// etcd's client and peer ports in the lab.
const ETCD_PORTS: [u16; 2] = [12379, 12380];

/// The etcd member on the primary's host is killed: the agents use the
/// others, nothing fails over, writes go on; it comes back.
fn etcd_member_lost(h: &mut Harness) -> Running<'_> {
    Box::pin(async move {
        let (leader, writers) = under_load(h).await;
        let l = h.cluster.node_index(&leader).unwrap();
        let at = Instant::now();
        h.cluster.etcd[l].kill().unwrap();
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(
            h.view().await.leader_name(),
            Some(leader.as_str()),
            "losing one etcd member moved the leader"
        );
        h.cluster.etcd[l].restart().unwrap();
        let unavailable = writers.longest_gap_since(at);
        let evidence = writers.finish().await;
        let outcome = check(h, &evidence, false, unavailable).await;
        assert_eq!(h.healthy(Duration::from_secs(60)).await, leader);
        outcome
    })
}

/// etcd loses its quorum (the members on both replicas' hosts die). With
/// failsafe off the primary must stop accepting writes before its lease
/// could have expired; with failsafe on, every member still confirms it
/// over the REST API and it keeps writing. Then etcd comes back.
fn etcd_quorum_lost(failsafe: bool) -> impl Fn(&mut Harness) -> Running<'_> + Sync {
    move |h| {
        Box::pin(async move {
            let leader = h.healthy(Duration::from_secs(120)).await;
            if failsafe {
                common::patch_config(h, &leader, serde_json::json!({"failsafe_mode": true})).await;
                for node in h.names() {
                    let deadline = Instant::now() + Duration::from_secs(10);
                    while common::api(h, &node).get("/config").await.unwrap().body["failsafe_mode"]
                        != true
                    {
                        assert!(Instant::now() < deadline, "{node} never saw failsafe_mode");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
            let (leader, writers) = under_load(h).await;
            let l = h.cluster.node_index(&leader).unwrap();
            let at = Instant::now();
            for i in (0..h.cluster.etcd.len()).filter(|&i| i != l) {
                h.cluster.etcd[i].kill().unwrap();
            }
            tokio::time::sleep(Duration::from_secs(12)).await;
            let ttl = Duration::from_secs(4);
            if failsafe {
                let gap = writers.longest_gap_since(at);
                assert!(
                    gap < 3000,
                    "failsafe mode: writes stopped for {gap} ms while every member was reachable"
                );
            } else {
                let last = writers.acked_since(at + ttl, None);
                assert!(
                    last.is_none(),
                    "a write was acknowledged {:?} after etcd lost its quorum, past the lease",
                    last.map(|l| l.duration_since(at))
                );
            }
            let outage = writers.longest_gap_since(at);
            for i in (0..h.cluster.etcd.len()).filter(|&i| i != l) {
                h.cluster.etcd[i].restart().unwrap();
            }
            first_write(&writers, Instant::now(), None, Duration::from_secs(60)).await;
            let evidence = writers.finish().await;
            let outcome = check(h, &evidence, false, outage).await;
            assert_eq!(outcome.lost, 0, "etcd's outage lost acknowledged writes");
            if failsafe {
                // The primary everyone confirmed keeps its role: a newly
                // elected etcd leader extends every lease, its own too.
                assert_eq!(h.healthy(Duration::from_secs(60)).await, leader);
            }
            outcome
        })
    }
}

/// The primary's host loses etcd (its own member in the minority) but not
/// its clients: it must stop accepting writes before anyone else is
/// promoted (the overlap check), and rejoin once etcd is back.
fn primary_isolated_from_etcd(h: &mut Harness) -> Running<'_> {
    Box::pin(async move {
        h.healthy(Duration::from_secs(120)).await;
        let writers = Writers::start(h).await;
        let mut cut = None;
        let unavailable = disrupt(h, &writers, |h, l| {
            lab(h).isolate_ports(l, &ETCD_PORTS).unwrap();
            cut = Some(l);
        })
        .await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        lab(h).heal(cut.unwrap());
        let evidence = writers.finish().await;
        check(h, &evidence, false, unavailable).await
    })
}

/// A lossy, slow, narrow link on the primary's host (3 % of packets
/// dropped each way, 4 Mbit/s out, and 150 ms more each way to etcd) for
/// 20 s: at default timing nothing fails over.
fn primary_link_degraded(h: &mut Harness) -> Running<'_> {
    Box::pin(async move {
        let (leader, writers) = under_load(h).await;
        let l = h.cluster.node_index(&leader).unwrap();
        let timeline = h.view().await.leader_status().unwrap().timeline;
        let lab = lab(h);
        let at = Instant::now();
        lab.impair(l, 3, Some(4000)).unwrap();
        for relay in &RELAYS.lock().unwrap()[l] {
            relay.set_delay(Duration::from_millis(150));
        }
        let deadline = at + Duration::from_secs(20);
        let mut slowest_renewal = 0f64;
        while Instant::now() < deadline {
            let view = h.view().await;
            assert_eq!(
                view.leader_name(),
                Some(leader.as_str()),
                "a degraded link caused a failover"
            );
            if let Ok(metrics) = common::api(h, &leader).get("/metrics").await {
                slowest_renewal = slowest_renewal.max(renewal_seconds(&metrics.text));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        // The impairment was real: a renewal is a round trip through the
        // relay, so at least two added delays.
        assert!(
            slowest_renewal >= 0.3,
            "renewals took at most {slowest_renewal} s: was the delay applied?"
        );
        println!("primary_link_degraded: slowest lease renewal {slowest_renewal:.3} s");
        let during = writers
            .evidence
            .lock()
            .unwrap()
            .acked
            .iter()
            .filter(|a| a.heard > at)
            .count();
        lab.heal(l);
        for relay in &RELAYS.lock().unwrap()[l] {
            relay.set_delay(Duration::ZERO);
        }
        assert!(
            during > 0,
            "no write was acknowledged over the degraded link"
        );
        let unavailable = writers.longest_gap_since(at);
        let evidence = writers.finish().await;
        let outcome = check(h, &evidence, false, unavailable).await;
        let view = h.view().await;
        assert_eq!(view.leader_name(), Some(leader.as_str()));
        assert_eq!(
            view.leader_status().unwrap().timeline,
            timeline,
            "a promotion happened"
        );
        outcome
    })
}

/// `mainstay_lease_renew_seconds` from a `/metrics` page (0 if absent).
fn renewal_seconds(metrics: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with("mainstay_lease_renew_seconds"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// The primary's data disk fills up. PostgreSQL refuses what needs new
/// space; nothing acknowledged is lost and no two nodes write; once space
/// is freed the cluster is whole again without anyone stepping in.
fn primary_disk_full(h: &mut Harness) -> Running<'_> {
    Box::pin(async move {
        let (leader, writers) = under_load(h).await;
        let l = h.cluster.node_index(&leader).unwrap();
        let filler = h.cluster.nodes[l].dir.join("disk").join("filler");
        let at = Instant::now();
        fill(&filler);
        tokio::time::sleep(Duration::from_secs(15)).await;
        let during = writers.longest_gap_since(at);
        std::fs::remove_file(&filler).unwrap();
        first_write(&writers, Instant::now(), None, Duration::from_secs(90)).await;
        let unavailable = during.max(writers.longest_gap_since(at));
        let evidence = writers.finish().await;
        check(h, &evidence, false, unavailable).await
    })
}

/// Writes `path` until its filesystem is full (at most 4 GiB).
fn fill(path: &Path) {
    use std::io::Write;
    let mut file = std::fs::File::create(path).unwrap();
    let chunk = vec![0xa5u8; 1 << 20];
    for _ in 0..4096 {
        if file.write_all(&chunk).is_err() {
            break;
        }
    }
    let _ = file.sync_all();
}

/// etcd's leader is put on the primary's host: the primary's agent moves
/// it away within seconds, so that when that host then dies only the
/// primary's lease runs out, not a new etcd leader's extension of it.
fn etcd_leader_with_primary(h: &mut Harness) -> Running<'_> {
    Box::pin(async move {
        let (leader, writers) = under_load(h).await;
        let l = h.cluster.node_index(&leader).unwrap();
        move_etcd_leader(h, l).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let now_at = etcd_leader(h).await;
            if now_at.is_some_and(|i| i != l) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "etcd's leader stayed on the primary's host (member {now_at:?}) for 10 s"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Power loss of that host.
        let at = Instant::now();
        lab(h).set_link(l, false).unwrap();
        let unavailable = first_write_elsewhere(&writers, at, &leader).await;
        lab(h).set_link(l, true).unwrap();
        let evidence = writers.finish().await;
        check(h, &evidence, false, unavailable).await
    })
}

/// The index of the etcd member that leads, if one answers.
async fn etcd_leader(h: &Harness) -> Option<usize> {
    for etcd in &h.cluster.etcd {
        let Ok(mut client) = etcd_client::Client::connect([etcd.endpoint()], None).await else {
            continue;
        };
        let Ok(Ok(status)) = tokio::time::timeout(Duration::from_secs(1), client.status()).await
        else {
            continue;
        };
        let leader = status.leader();
        let members = client.member_list().await.ok()?;
        let name = members
            .members()
            .iter()
            .find(|m| m.id() == leader)?
            .name()
            .to_string();
        return h.cluster.etcd.iter().position(|e| e.name() == name);
    }
    None
}

/// Asks etcd's current leader to hand its role to member `to`.
async fn move_etcd_leader(h: &Harness, to: usize) {
    let from = etcd_leader(h).await.expect("etcd has a leader");
    if from == to {
        return;
    }
    let mut client = etcd_client::Client::connect([h.cluster.etcd[from].endpoint()], None)
        .await
        .unwrap();
    let members = client.member_list().await.unwrap();
    let target = members
        .members()
        .iter()
        .find(|m| m.name() == h.cluster.etcd[to].name())
        .unwrap()
        .id();
    client.move_leader(target).await.unwrap();
}

/// Relays between each node's agent and each etcd member (node, member),
/// for scenarios that slow one host's etcd traffic down.
static RELAYS: Mutex<Vec<Vec<Relay>>> = Mutex::new(Vec::new());

/// What a scenario needs from the lab beyond the default.
#[derive(Clone, Copy, Default)]
struct Needs {
    /// Each node's data on a tmpfs of this many MiB.
    disk_mib: Option<u64>,
    /// The agents reach etcd through [`RELAYS`].
    relays: bool,
}

fn run_scenario(scenario: &ScenarioFn, needs: Needs) -> Result<Outcome, String> {
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
                let mut options = LabOptions::new(
                    3,
                    "default",
                    &format!("vip = \"{VIP}/24\"\nvip_interface = \"eth0\"\n"),
                );
                options.disk_mib = needs.disk_mib;
                if needs.relays {
                    let mut relays = RELAYS.lock().unwrap();
                    let mut endpoints = Vec::new();
                    for node in 0..3 {
                        let mut own = Vec::new();
                        let mut urls = Vec::new();
                        for member in 0..3 {
                            let listen = SocketAddr::from((
                                lab.client_ip(),
                                22000 + 10 * node as u16 + member as u16,
                            ));
                            let target = SocketAddr::from((lab.host_ip(member), ETCD_PORTS[0]));
                            own.push(
                                Relay::start(listen, target)
                                    .map_err(|e| format!("starting a relay on {listen}: {e}"))?,
                            );
                            urls.push(format!("http://{listen}"));
                        }
                        relays.push(own);
                        endpoints.push(urls);
                    }
                    options.etcd_endpoints = Some(endpoints);
                }
                let cluster = LocalCluster::start_in_lab_with(
                    // Short: PostgreSQL's socket path beside the data
                    // directory must stay under 108 bytes.
                    &test_dir("faults"),
                    lab,
                    Path::new(env!("CARGO_BIN_EXE_mainstay")),
                    &options,
                )
                .map_err(|e| format!("starting the lab cluster: {e}"))?;
                let mut h = Harness::adopt(cluster);
                let outcome = scenario(&mut h).await;
                h.passed = true;
                Ok(outcome)
            })
        });
        let joined = handle.join();
        RELAYS.lock().unwrap_or_else(|e| e.into_inner()).clear();
        match joined {
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
        skip(&format!("the fault suite: {why}"));
        return;
    }
    if !prerequisites() {
        return;
    }
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let plain = Needs::default();
    let scenarios: Vec<(&str, Box<ScenarioFn>, Needs)> = vec![
        ("primary_killed_async", Box::new(kill_primary(false)), plain),
        ("primary_killed_sync", Box::new(kill_primary(true)), plain),
        ("primary_agent_killed", Box::new(kill_primary_agent), plain),
        ("primary_link_down", Box::new(primary_link_down), plain),
        (
            "primary_isolated_from_etcd",
            Box::new(primary_isolated_from_etcd),
            plain,
        ),
        ("replica_isolated", Box::new(replica_isolated), plain),
        ("etcd_member_lost", Box::new(etcd_member_lost), plain),
        ("etcd_quorum_lost", Box::new(etcd_quorum_lost(false)), plain),
        (
            "etcd_quorum_lost_failsafe",
            Box::new(etcd_quorum_lost(true)),
            plain,
        ),
        (
            "primary_postgres_crash",
            Box::new(primary_postgres_crash),
            plain,
        ),
        (
            "primary_disk_full",
            Box::new(primary_disk_full),
            Needs {
                disk_mib: Some(256),
                ..plain
            },
        ),
        (
            "primary_link_degraded",
            Box::new(primary_link_degraded),
            Needs {
                relays: true,
                ..plain
            },
        ),
        (
            "etcd_leader_with_primary",
            Box::new(etcd_leader_with_primary),
            plain,
        ),
        (
            "switchover_under_load",
            Box::new(switchover_under_load),
            plain,
        ),
        ("two_quick_failovers", Box::new(two_quick_failovers), plain),
    ];
    let mut rows = Vec::new();
    for (name, scenario, needs) in &scenarios {
        if filter.as_deref().is_some_and(|f| !name.contains(f)) {
            continue;
        }
        let started = Instant::now();
        let result = run_scenario(scenario.as_ref(), *needs);
        match &result {
            Ok(o) => println!(
                "{name}: ok in {:?}: unavailable {} ms, {} acknowledged, {} lost ({} WAL bytes), {} unknown, {} duplicates",
                started.elapsed(),
                o.unavailable_ms,
                o.acked,
                o.lost,
                o.lost_wal_bytes,
                o.unknown,
                o.duplicates
            ),
            Err(e) => println!("{name}: FAILED after {:?}: {e}", started.elapsed()),
        }
        rows.push((name, result));
    }
    println!();
    println!(
        "| scenario | result | unavailable ms | acknowledged | lost | lost WAL bytes | unknown | duplicates |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (name, result) in &rows {
        match result {
            Ok(o) => println!(
                "| {name} | ok | {} | {} | {} | {} | {} | {} |",
                o.unavailable_ms, o.acked, o.lost, o.lost_wal_bytes, o.unknown, o.duplicates
            ),
            Err(_) => println!("| {name} | FAILED | | | | | | |"),
        }
    }
    let failed = rows.iter().filter(|(_, r)| r.is_err()).count();
    println!("{} passed, {failed} failed", rows.len() - failed);
    if failed > 0 {
        std::process::exit(1);
    }
}
