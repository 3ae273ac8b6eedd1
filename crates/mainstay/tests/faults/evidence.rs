//! The evidence: writers in the client namespace whose acknowledgements are
//! what the checker reads, and the checker itself.
//!
//! Three kinds of writers share one table and one sequence of ids: one
//! through the VIP, one through every node's read-write proxy (a libpq
//! multi-host string), and one per node straight to that node's PostgreSQL
//! port, as a libpq multi-host client or an already-open session would be.
//! A direct writer keeps its session while the server refuses writes (a
//! replica) and reconnects to the same node when the session breaks, so it
//! is the one that sees an old primary that is still writable.

use crate::VIP;
use crate::common::{Harness, connect};
use mainstay_lab::demo::{LAB_PG_PORT, LAB_PROXY_PORT, SUPERUSER, SUPERUSER_PASSWORD};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// No writer runs longer than this, nor more rounds than
/// [`WRITER_MAX_ROUNDS`], whatever a scenario forgets.
const WRITER_MAX_RUN: Duration = Duration::from_secs(300);
const WRITER_MAX_ROUNDS: u32 = 200_000;
/// The pause of a direct writer between two attempts (it commits every
/// 50-100 ms, as a steady client would).
const DIRECT_PACE: Duration = Duration::from_millis(75);
/// How long a shared writer waits for a commit's answer before calling the
/// outcome unknown and reconnecting (it wants the primary back soon).
const SHARED_STATEMENT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a writer may still run once told to stop (one statement in
/// flight) before it is dropped.
const FINISH_GRACE: Duration = Duration::from_secs(5);

/// One acknowledged write: who acknowledged it, on which timeline, when
/// (server clock, microseconds since the epoch) and when the client heard.
#[derive(Clone, Debug)]
pub struct Ack {
    pub id: i64,
    pub node: String,
    pub timeline: u32,
    /// The server's WAL position right after the insert.
    pub lsn: u64,
    pub committed_us: i64,
    pub heard: Instant,
    /// Written on a session straight to the node's PostgreSQL port (not
    /// through the VIP or a proxy).
    pub direct: bool,
}

#[derive(Default)]
pub struct Evidence {
    pub acked: Vec<Ack>,
    /// Writes whose outcome the client cannot know (the connection broke
    /// during the commit): neither loss nor error if absent.
    pub unknown: Vec<i64>,
    /// The direct writers' unknown outcomes: the node's address, when the
    /// write was sent and when the writer gave up on it.
    pub unknown_direct: Vec<(String, Instant, Instant)>,
}

/// The figures a scenario prints.
pub struct Outcome {
    pub unavailable_ms: u64,
    pub acked: usize,
    pub lost: usize,
    /// WAL the lost writes occupied on their timeline past the point where
    /// the next timeline forked off.
    pub lost_wal_bytes: u64,
    pub unknown: usize,
    pub duplicates: i64,
    /// Writes acknowledged on direct sessions, per node.
    pub direct: BTreeMap<String, usize>,
    /// Direct writes a node acknowledged after a node on a newer timeline
    /// had acknowledged its first (the checker fails the scenario on any
    /// late write, direct or not).
    pub after_takeover: usize,
    /// What the scenario measured beyond the common figures.
    pub note: Option<String>,
}

impl Outcome {
    pub fn direct_total(&self) -> usize {
        self.direct.values().sum()
    }

    /// `12 acked (node1 12), 0 after takeover`.
    pub fn direct_summary(&self) -> String {
        let per_node: Vec<String> = self
            .direct
            .iter()
            .map(|(node, n)| format!("{node} {n}"))
            .collect();
        format!(
            "{} acked ({}), {} after takeover",
            self.direct_total(),
            per_node.join(", "),
            self.after_takeover
        )
    }
}

pub struct Writers {
    stop: Arc<AtomicBool>,
    pub evidence: Arc<Mutex<Evidence>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

fn conninfo(hosts: &str, port: &str) -> String {
    format!(
        "host={hosts} port={port} user={SUPERUSER} password={SUPERUSER_PASSWORD} dbname=postgres connect_timeout=1"
    )
}

/// Microseconds since the epoch on this machine's clock, which every
/// namespace (and so every server's commit timestamp) shares.
pub fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

impl Writers {
    /// One writer through the VIP, one through the proxies of every node,
    /// and one straight to every node's PostgreSQL.
    pub async fn start(h: &Harness) -> Writers {
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
        // A direct writer waits for its answer longer than any freeze in the
        // suite lasts (3 × ttl), as an open session without a statement
        // timeout would: a write sent to a frozen primary is still waiting
        // when that primary thaws, which is the moment to watch.
        let direct_timeout = 3 * crate::scenarios::ttl(h) + Duration::from_secs(3);
        let shared = paths.into_iter().map(|c| (c, None));
        // Writers 10, 11, ...: node1's port, node2's...
        let direct = hosts.iter().map(|host| {
            (
                conninfo(host, &LAB_PG_PORT.to_string()),
                Some(host.to_string()),
            )
        });
        let tasks = shared
            .chain(direct)
            .enumerate()
            .map(|(i, (conninfo, direct))| {
                let writer = if direct.is_some() {
                    10 + i as i32 - 2
                } else {
                    i as i32
                };
                let timeout = if direct.is_some() {
                    direct_timeout
                } else {
                    SHARED_STATEMENT_TIMEOUT
                };
                tokio::spawn(write_loop(
                    writer,
                    conninfo,
                    direct,
                    timeout,
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

    pub fn acked_since(&self, after: Instant, not_node: Option<&str>) -> Option<Instant> {
        let evidence = self.evidence.lock().unwrap();
        evidence
            .acked
            .iter()
            .filter(|a| a.heard > after && Some(a.node.as_str()) != not_node)
            .map(|a| a.heard)
            .min()
    }

    /// The longest time without an acknowledged write from `at` until now.
    pub fn longest_gap_since(&self, at: Instant) -> u64 {
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

    /// Stops the writers; one still waiting on a statement after
    /// [`FINISH_GRACE`] is dropped (its write was never acknowledged).
    pub async fn finish(self) -> Evidence {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            let abort = task.abort_handle();
            if tokio::time::timeout(FINISH_GRACE, task).await.is_err() {
                abort.abort();
            }
        }
        // An aborted writer may not have dropped its handle on the evidence
        // yet (abort takes effect later): take it out, do not unwrap it.
        std::mem::take(&mut *mainstay_core::poison::lock(&self.evidence))
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

/// Commits continuously on `conninfo` until `stop` (bounded in time and
/// rounds), waiting at most `timeout` for each answer. A shared writer
/// (VIP, proxies) commits as fast as it can and reconnects after any
/// failure, landing wherever the path leads now; a `direct` one commits
/// every [`DIRECT_PACE`] and keeps its session while the server merely
/// refuses (read-only), reconnecting to the same node only when the
/// session breaks.
async fn write_loop(
    writer: i32,
    conninfo: String,
    direct: Option<String>,
    timeout: Duration,
    next_id: Arc<AtomicI64>,
    evidence: Arc<Mutex<Evidence>>,
    stop: Arc<AtomicBool>,
) {
    let started = Instant::now();
    let mut client: Option<tokio_postgres::Client> = None;
    for _ in 0..WRITER_MAX_ROUNDS {
        if stop.load(Ordering::Relaxed) || started.elapsed() > WRITER_MAX_RUN {
            break;
        }
        if client.as_ref().is_some_and(|c| c.is_closed()) {
            client = None;
        }
        if client.is_none() {
            match tokio::time::timeout(Duration::from_secs(2), connect(&conninfo)).await {
                Ok(Ok(c)) => client = Some(c),
                _ => {
                    tokio::time::sleep(Duration::from_millis(if direct.is_some() {
                        50
                    } else {
                        20
                    }))
                    .await;
                    continue;
                }
            }
        }
        let Some(c) = &client else { continue };
        let id = next_id.fetch_add(1, Ordering::Relaxed);
        let sent = Instant::now();
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
        match tokio::time::timeout(timeout, both)
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
                    direct: direct.is_some(),
                };
                evidence.lock().unwrap().acked.push(ack);
            }
            Ok(Err(e)) if e.as_db_error().is_some_and(|d| d.severity() == "ERROR") => {
                // The server refused the statement (read-only, out of
                // space): nothing was committed. A direct writer stays on
                // its session, as an application's open connection would;
                // a shared one looks for the primary again.
                if direct.is_none() {
                    client = None;
                }
            }
            _ => {
                // Broken, timed out, or ended by a FATAL (a shutdown) in
                // the middle of the commit: the outcome is unknown.
                let mut evidence = evidence.lock().unwrap();
                evidence.unknown.push(id);
                if let Some(host) = &direct {
                    evidence
                        .unknown_direct
                        .push((host.clone(), sent, Instant::now()));
                }
                client = None;
            }
        }
        let pause = if direct.is_some() {
            DIRECT_PACE
        } else {
            Duration::from_millis(5)
        };
        tokio::time::sleep(pause).await;
    }
}

/// A node that went on acknowledging writes after a node on a newer
/// timeline had acknowledged its first.
#[derive(Debug)]
pub struct LateWrites {
    pub node: String,
    pub timeline: u32,
    /// The node, timeline and server time of the newer leader's first write.
    pub newer: (String, u32, i64),
    pub count: usize,
    pub direct: usize,
    /// The latest of them, in µs after the newer leader's first write.
    pub latest_us: i64,
}

/// Per node and timeline, the writes acknowledged after another node's
/// first write on a newer timeline (server commit timestamps).
pub fn late_writes(acked: &[Ack]) -> Vec<LateWrites> {
    let mut first: BTreeMap<(String, u32), i64> = BTreeMap::new();
    for a in acked {
        let f = first
            .entry((a.node.clone(), a.timeline))
            .or_insert(a.committed_us);
        *f = (*f).min(a.committed_us);
    }
    let mut late = Vec::new();
    for (node, timeline) in first.keys() {
        // The earliest write of any other node on a newer timeline.
        let Some(((newer_node, newer_timeline), newer_at)) = first
            .iter()
            .filter(|((n, t), _)| n != node && t > timeline)
            .min_by_key(|(_, at)| **at)
        else {
            continue;
        };
        let after: Vec<&Ack> = acked
            .iter()
            .filter(|a| &a.node == node && a.timeline == *timeline)
            .filter(|a| a.committed_us > *newer_at)
            .collect();
        if let Some(latest) = after.iter().map(|a| a.committed_us).max() {
            late.push(LateWrites {
                node: node.clone(),
                timeline: *timeline,
                newer: (newer_node.clone(), *newer_timeline, *newer_at),
                count: after.len(),
                direct: after.iter().filter(|a| a.direct).count(),
                latest_us: latest - newer_at,
            });
        }
    }
    late
}

impl std::fmt::Display for LateWrites {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (newer, newer_timeline, _) = &self.newer;
        write!(
            f,
            "{} (timeline {}) acknowledged {} writes ({} of them on direct sessions) after {newer} \
             had acknowledged its first on timeline {newer_timeline}, the last {:.1} ms after it \
             (server commit timestamps)",
            self.node,
            self.timeline,
            self.count,
            self.direct,
            self.latest_us as f64 / 1000.0
        )
    }
}

/// The checks every scenario ends with; `sync`: no acknowledged write may
/// be missing.
pub async fn check(h: &Harness, evidence: &Evidence, sync: bool, unavailable_ms: u64) -> Outcome {
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
    // No old leader writing once a new one has: every writer, the direct
    // ones included (they are the ones that would see it).
    let late = late_writes(&evidence.acked);
    if !late.is_empty() {
        let all: Vec<String> = late.iter().map(ToString::to_string).collect();
        panic!(
            "an old leader acknowledged writes after a new one: {}",
            all.join("; ")
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
    let mut direct = BTreeMap::new();
    for a in evidence.acked.iter().filter(|a| a.direct) {
        *direct.entry(a.node.clone()).or_insert(0) += 1;
    }
    assert!(
        !direct.is_empty(),
        "no direct writer was ever acknowledged: is the primary's port reachable?"
    );
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
        direct,
        after_takeover: late.iter().map(|l| l.direct).sum(),
        note: None,
    }
}

/// Milliseconds from `at` to the first write a node other than `old`
/// acknowledged (at most 90 s).
pub async fn first_write_elsewhere(writers: &Writers, at: Instant, old: &str) -> u64 {
    let first = first_write(writers, at, Some(old), Duration::from_secs(90)).await;
    first.duration_since(at).as_millis() as u64
}

/// The first write acknowledged after `after` (by a node other than
/// `not_on`, if given); fails the scenario if none comes within `within`.
pub async fn first_write(
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

/// The checker must see what it is there to see: a synthetic old leader
/// writing after a new one (run before the scenarios; the binary has no
/// test harness of its own).
pub fn self_check() {
    let at = Instant::now();
    let ack = |id, node: &str, timeline, committed_us, direct| Ack {
        id,
        node: node.into(),
        timeline,
        lsn: 0,
        committed_us,
        heard: at,
        direct,
    };
    let clean = [
        ack(1, "node1", 1, 100, false),
        ack(2, "node1", 1, 200, true),
        ack(3, "node2", 2, 300, false),
        // node1 again, later, on a newer timeline still: not late.
        ack(4, "node1", 3, 400, true),
    ];
    assert!(late_writes(&clean).is_empty(), "{:?}", late_writes(&clean));
    let mut late = clean.to_vec();
    late.push(ack(5, "node2", 2, 450, true));
    late.push(ack(6, "node2", 2, 700, true));
    let found = late_writes(&late);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!((found[0].node.as_str(), found[0].count), ("node2", 2));
    assert_eq!((found[0].direct, found[0].latest_us), (2, 300));
}
