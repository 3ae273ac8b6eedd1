//! The harness shared by the integration tests that run whole clusters
//! against real etcd and PostgreSQL 15 on loopback (`cluster.rs`,
//! `haproxy.rs`, `operations.rs`). Each test binary includes it with
//! `mod common;` and uses only part of it, hence `allow(dead_code)`.
//!
//! Each test has its own directory (on tmpfs when available), free ports, and
//! a `LocalCluster` whose Drop kills every process by PID, even on failure.
//! Tests of one binary run one at a time (`SERIAL`), and cargo runs test
//! binaries one after another: leases are timing, and two clusters on two
//! cores would measure the machine, not mainstay.

#![allow(dead_code)]

use mainstay_core::{ClusterView, PgRole};
use mainstay_dcs::Dcs;
use mainstay_lab::demo::LocalCluster;
use mainstay_testkit::skip;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio_postgres::{Client, NoTls};

static SERIAL: Mutex<()> = Mutex::new(());

/// Runs one cluster test: alone (see the module comment), on its own runtime,
/// and only when etcd and PostgreSQL are installed (without them the test
/// fails, unless `MAINSTAY_ALLOW_SKIP=1`: see [`prerequisites`]).
pub fn cluster_test(test: impl Future<Output = ()>) {
    if !prerequisites() {
        return;
    }
    let _serial = mainstay_core::poison::lock(&SERIAL);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(test);
}

/// A cluster test on namespaced hosts: a lab of `lab_hosts` hosts and a
/// client namespace, which this thread (and so the runtime's threads) enters
/// so that every connection goes over the lab's bridge, a cluster started
/// there with `options`, and `test` run with it. Without root or the
/// tools it fails, unless `MAINSTAY_ALLOW_SKIP=1` lets it say why.
#[allow(dead_code)]
pub fn lab_cluster_test<F: Future<Output = ()>>(
    name: &str,
    lab_hosts: usize,
    options: mainstay_lab::demo::LabOptions,
    test: impl FnOnce(Harness) -> F,
) {
    if let Some(why) = mainstay_testkit::netns::unavailable() {
        skip(&why);
        return;
    }
    if !prerequisites() {
        return;
    }
    let lab =
        mainstay_testkit::netns::Lab::create(lab_hosts).expect("building the network namespaces");
    mainstay_testkit::netns::enter(&format!("/run/netns/{}", lab.client())).unwrap();
    cluster_test(async move {
        let cluster = LocalCluster::start_in_lab_with(
            &test_dir(name),
            lab,
            Path::new(env!("CARGO_BIN_EXE_mainstay")),
            &options,
        )
        .expect("starting the lab cluster");
        test(Harness::adopt(cluster)).await;
    });
}

/// Holds the lock every cluster test runs under, for a test that builds
/// its cluster itself (not through [`cluster_test`]).
#[allow(dead_code)]
pub fn alone() -> std::sync::MutexGuard<'static, ()> {
    mainstay_core::poison::lock(&SERIAL)
}

/// Whether etcd and PostgreSQL 15 are installed. When they are not, the
/// test fails through [`skip`] (a skip is allowed with
/// `MAINSTAY_ALLOW_SKIP=1`, and then the caller returns).
pub fn prerequisites() -> bool {
    let ok = Path::new("/usr/lib/postgresql/15/bin/postgres").exists()
        && Path::new("/usr/bin/etcd").exists();
    if !ok {
        skip("needs PostgreSQL 15 and etcd: run the README's install step (scripts/setup.sh)");
    }
    ok
}

pub fn test_dir(name: &str) -> PathBuf {
    let base = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    base.join(format!(
        "mainstay-test-{name}-{}-{stamp}",
        std::process::id()
    ))
}

pub struct Harness {
    pub cluster: LocalCluster,
    pub dir: PathBuf,
    pub passed: bool,
}

impl Harness {
    pub fn start(name: &str, nodes: usize) -> Harness {
        let dir = test_dir(name);
        let cluster = LocalCluster::start(
            &dir,
            nodes,
            Path::new(env!("CARGO_BIN_EXE_mainstay")),
            "default",
        )
        .expect("starting the cluster");
        Harness {
            cluster,
            dir,
            passed: false,
        }
    }

    /// A harness around a cluster started otherwise (e.g. in a lab).
    pub fn adopt(cluster: LocalCluster) -> Harness {
        Harness {
            dir: cluster.dir.clone(),
            cluster,
            passed: false,
        }
    }

    /// Every node's name, in start order.
    pub fn names(&self) -> Vec<String> {
        self.cluster.nodes.iter().map(|n| n.name.clone()).collect()
    }

    /// The first node that is not `node`.
    pub fn other_than(&self, node: &str) -> String {
        self.names()
            .into_iter()
            .find(|n| n != node)
            .expect("another node")
    }

    /// The cluster as etcd has it; a member that does not answer (a fault
    /// on its host) is skipped for the next, for at most 10 s.
    pub async fn view(&self) -> ClusterView {
        let dcs = self.cluster.dcs().await.expect("etcd client");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match dcs.read_cluster().await {
                Ok(view) => return view,
                Err(e) if Instant::now() >= deadline => panic!("reading the cluster: {e:?}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// Polls until `check` holds, at most `timeout`.
    pub async fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut check: impl AsyncFnMut(&ClusterView) -> Option<T>,
    ) -> T {
        let dcs = self.cluster.dcs().await.expect("etcd client");
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        while Instant::now() < deadline {
            if let Ok(view) = dcs.read_cluster().await {
                if let Some(found) = check(&view).await {
                    return found;
                }
                last = mainstay_lab::demo::describe(&view);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.dump_logs();
        panic!("timed out after {timeout:?} waiting for {what}; last view: {last}");
    }

    /// The primary and every other node streaming from it.
    pub async fn healthy(&self, timeout: Duration) -> String {
        let total = self.cluster.nodes.len();
        self.wait_for(
            "a primary with every other node streaming",
            timeout,
            async |view: &ClusterView| {
                let leader = view.leader_status()?;
                if leader.role != PgRole::Primary {
                    return None;
                }
                let streaming = view
                    .members
                    .values()
                    .filter(|m| m.status.role == PgRole::Replica && m.status.streaming)
                    .filter(|m| m.status.following.as_deref() == Some(&leader.name))
                    .count();
                (streaming + 1 == total).then(|| leader.name.clone())
            },
        )
        .await
    }

    pub async fn client(&self, node: &str) -> Client {
        let i = self.cluster.node_index(node).unwrap();
        connect(&self.cluster.nodes[i].conninfo())
            .await
            .unwrap_or_else(|e| panic!("connecting to {node}: {e:?}"))
    }

    pub fn agent_log(&self, node: &str) -> String {
        let i = self.cluster.node_index(node).unwrap();
        std::fs::read_to_string(self.cluster.nodes[i].agent_log()).unwrap_or_default()
    }

    pub fn dump_logs(&self) {
        for node in &self.cluster.nodes {
            let log = std::fs::read_to_string(node.agent_log()).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("----- {} agent log (last 40 lines) -----", node.name);
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        let keep = std::env::var_os("MAINSTAY_KEEP_TEST_FILES").is_some();
        if self.passed && !keep {
            self.cluster.stop_all();
            self.cluster.unmount_disks();
            // Only our own throwaway test directory, never a real cluster.
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("test files kept in {}", self.dir.display());
        }
    }
}

pub async fn connect(conninfo: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(conninfo, NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

pub fn api(h: &Harness, node: &str) -> mainstay_agent::api_client::ApiClient {
    let i = h.cluster.node_index(node).unwrap();
    let node = &h.cluster.nodes[i];
    mainstay_agent::api_client::ApiClient::new(&format!("http://{}:{}", node.host, node.api_port))
        .with_timeout(Duration::from_secs(5))
}

/// The status code of `method path` on `node`.
pub async fn code(h: &Harness, node: &str, method: &str, path: &str) -> u16 {
    let method = hyper::Method::from_bytes(method.as_bytes()).unwrap();
    api(h, node)
        .request(method, path, None)
        .await
        .unwrap_or_else(|e| panic!("{node}: {e}"))
        .status
        .as_u16()
}

/// Sends `body` as is and checks the refusal: the status code and a JSON
/// reason, which it returns.
pub async fn expect_refusal(
    client: &mainstay_agent::api_client::ApiClient,
    method: &str,
    path: &str,
    body: &[u8],
    expected: u16,
) -> String {
    let method = hyper::Method::from_bytes(method.as_bytes()).unwrap();
    let answer = client
        .raw(
            method.clone(),
            path,
            Some(body.to_vec()),
            "application/json",
        )
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let shown = String::from_utf8_lossy(body);
    assert_eq!(
        answer.status.as_u16(),
        expected,
        "{method} {path} {shown:?}: {}",
        answer.text
    );
    let reason = answer.body["error"].as_str();
    reason
        .unwrap_or_else(|| panic!("{method} {path} {shown:?}: no JSON reason: {}", answer.text))
        .to_string()
}

/// Polls `path` on `node` until it answers `expected` (the API follows the
/// HA loop, which follows PostgreSQL and the DCS).
pub async fn wait_code(h: &Harness, node: &str, path: &str, expected: u16, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let mut last = 0;
    while Instant::now() < deadline {
        last = code(h, node, "GET", path).await;
        if last == expected {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    h.dump_logs();
    panic!("{node} {path}: {last}, expected {expected} within {timeout:?}");
}

// ---------------------------------------------------------------------------
// Synchronous replication (`sync.rs`): the REST API's view of the sync set,
// a writer that keeps the time and server of every acknowledgment, and the
// real `mainstay ctl`.
// ---------------------------------------------------------------------------

/// Runs `mainstay ctl ARGS` (the real binary) against `node`'s API with the
/// demo credentials; returns (exit code, stdout, stderr).
pub async fn run_ctl(h: &Harness, node: &str, args: &[&str]) -> (i32, String, String) {
    ctl(h, node, true, args).await
}

/// Runs `mainstay ctl ARGS` against `node`'s API, with the demo credentials
/// unless `auth` is false; returns (exit code, stdout, stderr).
pub async fn ctl(h: &Harness, node: &str, auth: bool, args: &[&str]) -> (i32, String, String) {
    let i = h.cluster.node_index(node).unwrap();
    let target = &h.cluster.nodes[i];
    let url = format!("http://{}:{}", target.host, target.api_port);
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_mainstay"));
    command.arg("ctl").arg("--url").arg(url);
    if auth {
        command.args([
            "--user",
            mainstay_lab::demo::API_USER,
            "--password",
            mainstay_lab::demo::API_PASSWORD,
        ]);
    }
    command
        .args(args)
        .env_remove("MAINSTAY_CONFIG")
        .stdin(std::process::Stdio::null());
    let output = tokio::time::timeout(Duration::from_secs(120), command.output())
        .await
        .expect("ctl finishes")
        .expect("ctl runs");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// `PATCH /config` with `patch` on `node`'s API, authenticated; retries the
/// transient refusals (409: changed meanwhile, 503: etcd slow) for 10 s.
/// Returns the stored configuration.
pub async fn patch_config(h: &Harness, node: &str, patch: serde_json::Value) -> serde_json::Value {
    let client = api(h, node).with_basic_auth(
        mainstay_lab::demo::API_USER,
        mainstay_lab::demo::API_PASSWORD,
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let last = match client
            .request(hyper::Method::PATCH, "/config", Some(&patch))
            .await
        {
            Ok(answer) if answer.status.is_success() => return answer.body,
            Ok(answer) if matches!(answer.status.as_u16(), 409 | 503) => {
                format!("{}: {}", answer.status, answer.text)
            }
            Ok(answer) => panic!(
                "PATCH /config {patch} on {node} was refused: {}: {}",
                answer.status, answer.text
            ),
            Err(err) => err.to_string(),
        };
        if Instant::now() > deadline {
            h.dump_logs();
            panic!("PATCH /config {patch} on {node} did not succeed within 10 s: {last}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `GET /cluster` on `node`; `None` if the agent does not answer 200.
pub async fn cluster_doc(h: &Harness, node: &str) -> Option<serde_json::Value> {
    let answer = api(h, node).get("/cluster").await.ok()?;
    answer.status.is_success().then_some(answer.body)
}

/// Members a `GET /cluster` document lists with `role` `sync_standby`.
pub fn sync_standbys_in(doc: &serde_json::Value) -> Vec<String> {
    doc["members"]
        .as_array()
        .map(|members| {
            members
                .iter()
                .filter(|m| m["role"] == "sync_standby")
                .filter_map(|m| m["name"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// `node1=leader/running node2=sync_standby/streaming ...` from a `GET
/// /cluster` document, for failure messages.
pub fn members_summary(doc: &serde_json::Value) -> String {
    let Some(members) = doc["members"].as_array() else {
        return format!("(not a /cluster document: {doc})");
    };
    members
        .iter()
        .map(|m| {
            format!(
                "{}={}/{} tl{} lag {}",
                m["name"].as_str().unwrap_or("?"),
                m["role"].as_str().unwrap_or("?"),
                m["state"].as_str().unwrap_or("?"),
                m["timeline"],
                m.get("lag").unwrap_or(&serde_json::Value::Null)
            )
        })
        .collect::<Vec<_>>()
        .join(" | ")
}

/// `SHOW synchronous_standby_names` on `node`, bounded to 5 s.
pub async fn synchronous_standby_names(h: &Harness, node: &str) -> Result<String, String> {
    let i = h.cluster.node_index(node).unwrap();
    let conninfo = h.cluster.nodes[i].conninfo();
    tokio::time::timeout(Duration::from_secs(5), async {
        let client = connect(&conninfo).await.map_err(|e| format!("{e:?}"))?;
        let row = client
            .query_one("SHOW synchronous_standby_names", &[])
            .await
            .map_err(|e| format!("{e:?}"))?;
        Ok(row.get::<_, String>(0))
    })
    .await
    .map_err(|_| "no answer within 5 s".to_string())?
}

/// The synchronous replication state as a client sees it.
#[derive(Debug, Clone)]
pub struct SyncState {
    /// The DCS leader, running as primary.
    pub leader: String,
    /// The one member the leader's `GET /cluster` lists as `sync_standby`.
    pub standby: String,
    /// `synchronous_standby_names` on the leader's PostgreSQL.
    pub standby_names: String,
    /// The leader's `GET /cluster` document.
    pub cluster: serde_json::Value,
}

/// Polls until the leader (from the DCS, running as primary) lists exactly
/// one member as `sync_standby` in `GET /cluster`, that member answers 200 on
/// `/sync` and says `"sync_standby": true` in `/patroni`, and the leader's
/// `synchronous_standby_names` is not empty. Panics after `timeout` with the
/// last state seen and the agents' log tails.
pub async fn wait_sync_standby(h: &Harness, timeout: Duration) -> SyncState {
    let dcs = h.cluster.dcs().await.expect("etcd client");
    let deadline = Instant::now() + timeout;
    let mut last = String::from("nothing read yet");
    while Instant::now() < deadline {
        last = match sync_state_now(h, &dcs).await {
            Ok(state) => return state,
            Err(why) => why,
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    h.dump_logs();
    panic!(
        "timed out after {timeout:?} waiting for synchronous replication: expected a primary \
         leader whose GET /cluster lists exactly one member with role sync_standby, that member \
         answering 200 on /sync with \"sync_standby\": true in /patroni, and a non-empty \
         synchronous_standby_names on the leader's PostgreSQL. Last seen: {last}"
    );
}

async fn sync_state_now(h: &Harness, dcs: &impl Dcs) -> Result<SyncState, String> {
    let view = dcs
        .read_cluster()
        .await
        .map_err(|e| format!("reading etcd: {e}"))?;
    let description = mainstay_lab::demo::describe(&view);
    let leader = view
        .leader_status()
        .filter(|s| s.role == PgRole::Primary)
        .map(|s| s.name.clone())
        .ok_or_else(|| format!("no primary leader in the DCS ({description})"))?;
    let doc = cluster_doc(h, &leader)
        .await
        .ok_or_else(|| format!("{leader} did not answer GET /cluster ({description})"))?;
    let standbys = sync_standbys_in(&doc);
    let [standby] = standbys.as_slice() else {
        return Err(format!(
            "{leader}'s GET /cluster lists {} sync_standby member(s) {standbys:?}: {} (raw: {doc})",
            standbys.len(),
            members_summary(&doc)
        ));
    };
    let sync_code = match api(h, standby).get("/sync").await {
        Ok(answer) => answer.status.as_u16().to_string(),
        Err(err) => err.to_string(),
    };
    if sync_code != "200" {
        return Err(format!(
            "{leader}'s GET /cluster names {standby} sync_standby ({}), but {standby}'s /sync \
             answers {sync_code}",
            members_summary(&doc)
        ));
    }
    let patroni = api(h, standby)
        .get("/patroni")
        .await
        .map(|a| a.body)
        .unwrap_or_default();
    if patroni["sync_standby"] != true {
        return Err(format!(
            "{standby} answers 200 on /sync but its /patroni lacks \"sync_standby\": true: {patroni}"
        ));
    }
    let standby_names = synchronous_standby_names(h, &leader)
        .await
        .map_err(|e| format!("SHOW synchronous_standby_names on {leader}: {e}"))?;
    if standby_names.trim().is_empty() {
        return Err(format!(
            "{leader} lists {standby} as sync_standby ({}) but its PostgreSQL has an empty \
             synchronous_standby_names",
            members_summary(&doc)
        ));
    }
    Ok(SyncState {
        leader,
        standby: standby.clone(),
        standby_names,
        cluster: doc,
    })
}

/// One acknowledged INSERT: its id, when the acknowledgment arrived and the
/// port of the server that sent it.
#[derive(Debug, Clone, Copy)]
pub struct Ack {
    pub id: i64,
    pub at: Instant,
    pub port: u16,
}

#[derive(Debug, Default)]
pub struct AckLog {
    pub acked: Vec<Ack>,
    /// Ids whose INSERT failed or timed out: unknown outcomes, neither
    /// acknowledged nor lost (the commit may be in the WAL already).
    pub unknown: Vec<i64>,
}

/// A writer committing one row at a time on one connection through the
/// read-write multi-host connection string, reconnecting on any error, and
/// recording every acknowledged id with its time and server. An INSERT that
/// errors or takes longer than `insert_timeout` is an unknown outcome: its id
/// is never reused and the connection is replaced.
pub struct AckWriter {
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<AckLog>>,
    task: tokio::task::JoinHandle<()>,
}

impl AckWriter {
    /// Creates `table (id bigint primary key)` and starts writing to it.
    pub async fn start(h: &Harness, table: &str, insert_timeout: Duration) -> AckWriter {
        let conninfo = h.cluster.multi_host_conninfo();
        let setup = tokio::time::timeout(Duration::from_secs(30), async {
            let client = connect(&conninfo).await?;
            client
                .batch_execute(&format!(
                    "CREATE TABLE IF NOT EXISTS {table} (id bigint primary key)"
                ))
                .await
        })
        .await;
        match setup {
            Ok(Ok(())) => {}
            Ok(Err(err)) => panic!("writer setup (CREATE TABLE {table}): {err:?}"),
            Err(_) => {
                h.dump_logs();
                panic!(
                    "writer setup: CREATE TABLE {table} through the read-write string did not \
                     finish within 30 s (a commit waiting for a synchronous standby?)"
                );
            }
        }
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(AckLog::default()));
        let insert = format!("INSERT INTO {table} VALUES ($1)");
        let task = tokio::spawn(ack_write_loop(
            conninfo,
            insert,
            insert_timeout,
            stop.clone(),
            log.clone(),
        ));
        AckWriter { stop, log, task }
    }

    pub fn acked_count(&self) -> usize {
        self.log.lock().unwrap().acked.len()
    }

    /// The first acknowledgment after `after` sent by a server other than
    /// the one on `port` (backends of a killed postmaster may answer for a
    /// few milliseconds).
    pub fn first_ack_after(&self, after: Instant, port: u16) -> Option<Instant> {
        self.log
            .lock()
            .unwrap()
            .acked
            .iter()
            .find(|a| a.at > after && a.port != port)
            .map(|a| a.at)
    }

    pub async fn finish(self) -> AckLog {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        std::mem::take(&mut *self.log.lock().unwrap())
    }
}

async fn ack_write_loop(
    conninfo: String,
    insert: String,
    insert_timeout: Duration,
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<AckLog>>,
) {
    let mut next = 1i64;
    let started = Instant::now();
    // Bounded in time whatever the cluster does.
    while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(600) {
        let session = tokio::time::timeout(Duration::from_secs(10), async {
            let client = connect(&conninfo).await.ok()?;
            let row = client
                .query_one("SELECT inet_server_port()", &[])
                .await
                .ok()?;
            let port = row.get::<_, Option<i32>>(0).unwrap_or(0) as u16;
            let statement = client.prepare(&insert).await.ok()?;
            Some((client, port, statement))
        })
        .await;
        let Ok(Some((client, port, statement))) = session else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        while !stop.load(Ordering::Relaxed) {
            let id = next;
            next += 1;
            match tokio::time::timeout(insert_timeout, client.execute(&statement, &[&id])).await {
                Ok(Ok(_)) => log.lock().unwrap().acked.push(Ack {
                    id,
                    at: Instant::now(),
                    port,
                }),
                // Unknown outcome; a new connection (dropping this one ends
                // the session and its wait, if any).
                Ok(Err(_)) | Err(_) => {
                    log.lock().unwrap().unknown.push(id);
                    break;
                }
            }
        }
    }
}

/// Acknowledged ids missing from `table` on `node`.
pub async fn missing_acked(h: &Harness, node: &str, table: &str, acked: &[i64]) -> Vec<i64> {
    let client = h.client(node).await;
    let rows = client
        .query(&format!("SELECT id FROM {table}"), &[])
        .await
        .unwrap_or_else(|e| panic!("reading {table} on {node}: {e:?}"));
    let present: std::collections::HashSet<i64> = rows.iter().map(|r| r.get(0)).collect();
    acked
        .iter()
        .copied()
        .filter(|id| !present.contains(id))
        .collect()
}

/// A new connection to 127.0.0.1:`port` (a load balancer's frontend) as
/// the demo superuser: the client, whether the server it landed on is in
/// recovery, and that server's port. Bounded to 3 s.
pub async fn through_port(port: u16) -> Result<(Client, bool, u16), String> {
    let conninfo = format!(
        "host=127.0.0.1 port={port} user={} password={} dbname=postgres connect_timeout=2",
        mainstay_lab::demo::SUPERUSER,
        mainstay_lab::demo::SUPERUSER_PASSWORD
    );
    let attempt = async {
        let client = connect(&conninfo)
            .await
            .map_err(|e| format!("connecting: {e}"))?;
        let row = client
            .query_one("SELECT pg_is_in_recovery(), inet_server_port()", &[])
            .await
            .map_err(|e| format!("querying: {e}"))?;
        let in_recovery: bool = row.get(0);
        let server_port: i32 = row.get(1);
        Ok((client, in_recovery, server_port as u16))
    };
    tokio::time::timeout(Duration::from_secs(3), attempt)
        .await
        .map_err(|_| "no answer within 3 s".to_string())?
}
