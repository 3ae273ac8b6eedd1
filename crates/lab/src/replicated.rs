//! A lab cluster whose nodes replicate one directory (`[[replicate]]`):
//! three namespaced hosts, each with an etcd member, an agent and
//! PostgreSQL, the REST API (and so the files) over HTTPS with a lab CA.
//! Used by `mainstay bench files` and the replicated-directory lab tests.
//!
//! The bench and tests write into a node's directory straight from the
//! filesystem (namespaces only separate the network), as the application
//! on that node would, and look at the others' copies the same way.

use crate::demo::{LabOptions, LocalCluster};
use mainstay_core::PgRole;
use mainstay_dcs::Dcs;
use mainstay_testkit::netns::Lab;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub struct FilesLab {
    pub cluster: LocalCluster,
    roots: Vec<PathBuf>,
}

/// How each node's `[[replicate]]` section reads.
pub struct FilesOptions {
    /// Where the nodes' directories live (`<base>/nodeN/media`); default:
    /// beside each node's other files. A test with big files puts them on
    /// a disk rather than in memory.
    pub base: Option<PathBuf>,
    /// Seconds.
    pub settle: f64,
    /// Seconds.
    pub scan_interval: f64,
}

impl Default for FilesOptions {
    fn default() -> FilesOptions {
        FilesOptions {
            base: None,
            settle: 1.0,
            scan_interval: 30.0,
        }
    }
}

impl FilesLab {
    /// Starts etcd and the agents on `lab`'s hosts, each with its
    /// replicated directory. Call it on a thread in the lab's client
    /// namespace.
    pub fn start(
        dir: &Path,
        lab: Lab,
        exe: &Path,
        hosts: usize,
        files: &FilesOptions,
    ) -> Result<FilesLab, String> {
        let roots: Vec<PathBuf> = (1..=hosts)
            .map(|i| {
                let node = format!("node{i}");
                match &files.base {
                    Some(base) => base.join(node).join("media"),
                    None => dir.join(node).join("media"),
                }
            })
            .collect();
        let mut options = LabOptions::new(hosts, "default", "");
        options.api_tls = true;
        options.node_config = roots
            .iter()
            .map(|root| {
                format!(
                    "\n[[replicate]]\npath = \"{}\"\nsettle = {}\nscan_interval = {}\n",
                    root.display(),
                    files.settle,
                    files.scan_interval
                )
            })
            .collect();
        let cluster = LocalCluster::start_in_lab_with(dir, lab, exe, &options)
            .map_err(|e| format!("starting the lab cluster: {e}"))?;
        Ok(FilesLab { cluster, roots })
    }

    /// Node `i`'s replicated directory.
    pub fn root(&self, i: usize) -> &Path {
        &self.roots[i]
    }

    pub fn index(&self, node: &str) -> Result<usize, String> {
        self.cluster
            .node_index(node)
            .ok_or_else(|| format!("no node named {node}"))
    }

    /// The leader, once it runs as primary with every other member
    /// streaming from it.
    pub async fn healthy(&self, timeout: Duration) -> Result<String, String> {
        let dcs = self.cluster.dcs().await?;
        crate::bench::healthy(&dcs, self.cluster.nodes.len(), timeout).await
    }

    /// A primary other than `old`: the leader after `old` crashed.
    pub async fn new_leader(&self, old: &str, timeout: Duration) -> Result<String, String> {
        let dcs = self.cluster.dcs().await?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(view) = dcs.read_cluster().await
                && let Some(leader) = view.leader_status()
                && leader.name != old
                && leader.role == PgRole::Primary
            {
                return Ok(leader.name.clone());
            }
            if Instant::now() > deadline {
                return Err(format!("no new leader within {timeout:?} of {old}'s crash"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Node `i`'s state of its replicated directory
    /// (`GET /replication/files`).
    pub async fn status(&self, i: usize) -> Result<Value, String> {
        let answer = self.cluster.nodes[i]
            .api()
            .get("/replication/files")
            .await
            .map_err(|e| e.to_string())?;
        Ok(answer.body["directories"][0].clone())
    }

    /// Waits until source `source` offers everything it holds and each of
    /// `receivers` has applied that offer completely; with `after_writes`,
    /// also until the source has scanned its tree since this call (so that
    /// everything written before the call is seen). The source's status.
    pub async fn caught_up(
        &self,
        source: usize,
        receivers: &[usize],
        after_writes: bool,
        timeout: Duration,
    ) -> Result<Value, String> {
        let deadline = Instant::now() + timeout;
        let since = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let mut last = Value::Null;
        loop {
            if let Ok(status) = self.status(source).await {
                let all_there = status["role"] == "source"
                    && (!after_writes
                        || status["last_full_scan"]
                            .as_f64()
                            .is_some_and(|at| at >= since))
                    && status["unsettled"] == 0
                    && receivers.iter().all(|&r| {
                        let name = &self.cluster.nodes[r].name;
                        status["receivers"].as_array().is_some_and(|list| {
                            list.iter().any(|lag| {
                                lag["receiver"] == name.as_str()
                                    && lag["version"] == status["version"]
                                    && lag["files_behind"] == 0
                            })
                        })
                    });
                if all_there {
                    return Ok(status);
                }
                last = status;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "receivers {receivers:?} did not catch up with node {} within {timeout:?}: {last}",
                    source + 1
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Node `i`'s host comes back after a crash: its etcd member first
    /// (the cluster needs its vote again), then its agent.
    pub fn revive(&mut self, i: usize) -> Result<(), String> {
        let etcd = &mut self.cluster.etcd[i];
        // The crash killed the process; reap it before starting anew.
        let _ = etcd.kill();
        etcd.restart()
            .map_err(|e| format!("restarting node{}'s etcd member: {e}", i + 1))?;
        self.cluster
            .start_agent(i)
            .map_err(|e| format!("restarting node{}'s agent: {e}", i + 1))
    }

    /// The most memory node `i`'s agent has held (its peak resident set,
    /// `VmHWM`), in bytes; 0 when it does not run.
    pub fn agent_peak_rss(&self, i: usize) -> u64 {
        self.cluster
            .agent_pid(i)
            .map_or(0, |pid| proc_status_bytes(pid, "VmHWM:"))
    }
}

/// Every file moved aside beside `root` (`<root>.moved-aside/<stamp>/...`).
pub fn moved_aside(root: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    // Bounded by the folder's tree: each directory is visited once.
    let mut pending = vec![mainstay_files::apply::aside_dir(root)];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            match entry.file_type() {
                Ok(kind) if kind.is_dir() => pending.push(path),
                Ok(_) => found.push(path),
                Err(_) => {}
            }
        }
    }
    found
}

/// A `/proc/<pid>/status` size field (kB there), in bytes.
pub fn proc_status_bytes(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Deterministic bytes for test file `seed` (so a copy can be checked
/// without the original): a xorshift stream, incompressible enough that
/// no layer below can shortcut the transfer.
pub fn content(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut bytes = Vec::with_capacity(len + 8);
    while bytes.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        bytes.extend_from_slice(&state.to_le_bytes());
    }
    bytes.truncate(len);
    bytes
}
