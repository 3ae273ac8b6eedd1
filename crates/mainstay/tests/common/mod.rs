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

use mainstay::demo::LocalCluster;
use mainstay_core::{ClusterView, PgRole};
use mainstay_dcs::Dcs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio_postgres::{Client, NoTls};

static SERIAL: Mutex<()> = Mutex::new(());

/// Runs one cluster test: alone (see the module comment), on its own runtime,
/// and only when etcd and PostgreSQL are installed.
pub fn cluster_test(test: impl Future<Output = ()>) {
    if !prerequisites() {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(test);
}

pub fn prerequisites() -> bool {
    let ok = Path::new("/usr/lib/postgresql/15/bin/postgres").exists()
        && Path::new("/usr/bin/etcd").exists();
    if !ok {
        eprintln!(
            "SKIPPED: needs PostgreSQL 15 and etcd: run the README's install step (scripts/setup.sh)"
        );
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

    pub async fn view(&self) -> ClusterView {
        let dcs = self.cluster.dcs().await.expect("etcd client");
        dcs.read_cluster().await.expect("reading the cluster")
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
                last = mainstay::demo::describe(&view);
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
        if self.passed {
            self.cluster.stop_all();
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

pub fn api(h: &Harness, node: &str) -> mainstay::ctl::client::ApiClient {
    let i = h.cluster.node_index(node).unwrap();
    mainstay::ctl::client::ApiClient::new(&format!(
        "http://127.0.0.1:{}",
        h.cluster.nodes[i].api_port
    ))
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
