//! A real Patroni cluster on loopback, for `mainstay bench compare` and for
//! the test that takes one over: three Patroni agents (from PyPI, in the
//! virtualenv `bench/patroni/install.sh` makes; as the `postgres` user when
//! run as root), one etcd member of their own, and HAProxy in front,
//! configured as Patroni's documentation advises.

use crate::demo::{SUPERUSER, SUPERUSER_PASSWORD};
use mainstay_sys::process;
use mainstay_testkit::{Etcd, Haproxy, free_port};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Patroni's `ttl`, `loop_wait` and `retry_timeout`, in seconds.
#[derive(Clone, Copy, Debug)]
pub struct PatroniTiming {
    pub ttl: u32,
    pub loop_wait: u32,
    pub retry_timeout: u32,
}

/// Runs bench/patroni/install.sh (quick when the venv is in place);
/// returns the `patroni` executable.
pub fn install_patroni(venv: &Path) -> Result<PathBuf, String> {
    let patroni = venv.join("bin/patroni");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bench/patroni/install.sh");
    eprintln!("checking Patroni in {} ...", venv.display());
    let status = Command::new("bash")
        .arg(&script)
        .arg(venv)
        .stdout(Stdio::null())
        .status()
        .map_err(|e| format!("{}: {e}", script.display()))?;
    if !status.success() || !patroni.exists() {
        return Err(format!("{} failed ({status})", script.display()));
    }
    Ok(patroni)
}

pub struct PatroniNode {
    pub name: String,
    pub dir: PathBuf,
    pub pg_port: u16,
    pub api_port: u16,
    child: Option<Child>,
}

impl PatroniNode {
    /// The Patroni agent's PID, while it runs.
    pub fn agent_pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    pub fn postmaster_pid(&self) -> Option<i32> {
        let text = std::fs::read_to_string(self.data_dir().join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }
}

/// Three Patroni agents (as the `postgres` user when run as root), one etcd
/// member, and HAProxy in front, configured as Patroni's docs advise.
pub struct PatroniCluster {
    pub etcd: Etcd,
    pub nodes: Vec<PatroniNode>,
    haproxy: Option<Haproxy>,
    haproxy_port: u16,
}

impl PatroniCluster {
    /// HAProxy's read-write port (`OPTIONS /primary` checks).
    pub fn haproxy_port(&self) -> u16 {
        self.haproxy_port
    }

    /// Ends one Patroni agent with SIGTERM, as `systemctl stop patroni`
    /// would, and waits for it (bounded). Paused, Patroni leaves its
    /// PostgreSQL running.
    pub fn stop_agent(&mut self, name: &str, timeout: Duration) -> Result<(), String> {
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.name == name)
            .ok_or_else(|| format!("no Patroni node {name}"))?;
        let Some(mut child) = node.child.take() else {
            return Ok(());
        };
        let _ = process::kill(child.id() as i32, libc::SIGTERM);
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if child.try_wait().map_err(|e| e.to_string())?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        Err(format!(
            "Patroni on {name} did not exit within {timeout:?} of SIGTERM"
        ))
    }

    pub fn start(
        dir: &Path,
        patroni: &Path,
        timing: PatroniTiming,
    ) -> Result<PatroniCluster, String> {
        let io = |what: &str| {
            let what = what.to_string();
            move |e: std::io::Error| format!("{what}: {e}")
        };
        std::fs::create_dir_all(dir).map_err(io("creating the directory"))?;
        let etcd = Etcd::start(&dir.join("etcd")).map_err(io("starting etcd"))?;
        let mut cluster = PatroniCluster {
            etcd,
            nodes: Vec::new(),
            haproxy: None,
            haproxy_port: free_port(),
        };
        let endpoint = cluster.etcd.endpoint();
        let etcd_host = endpoint.trim_start_matches("http://").to_string();
        for i in 1..=3 {
            let node_dir = dir.join(format!("p{i}"));
            std::fs::create_dir_all(&node_dir).map_err(io("creating a node directory"))?;
            own_by_postgres(&node_dir).map_err(io("chown"))?;
            let node = PatroniNode {
                name: format!("p{i}"),
                dir: node_dir,
                pg_port: free_port(),
                api_port: free_port(),
                child: None,
            };
            let config = patroni_config(&node, &etcd_host, timing);
            let path = node.dir.join("patroni.yml");
            std::fs::write(&path, config).map_err(io("writing patroni.yml"))?;
            own_by_postgres(&path).map_err(io("chown"))?;
            cluster.nodes.push(node);
        }
        for i in 0..cluster.nodes.len() {
            cluster.spawn(i, patroni)?;
        }
        let servers = mainstay_testkit::health_checked_servers(
            cluster
                .nodes
                .iter()
                .map(|n| (n.name.as_str(), n.pg_port, n.api_port)),
        );
        let haproxy = Haproxy::start(
            &dir.join("haproxy"),
            &format!(
                "{}
listen primary
    bind 127.0.0.1:{}
    option httpchk OPTIONS /primary
    http-check expect status 200
    default-server inter 1s fall 2 rise 1 on-marked-down shutdown-sessions
{servers}",
                mainstay_testkit::haproxy_config_head(1000, None),
                cluster.haproxy_port
            ),
        )
        .map_err(io("starting HAProxy"))?;
        cluster.haproxy = Some(haproxy);
        Ok(cluster)
    }

    pub fn spawn(&mut self, i: usize, patroni: &Path) -> Result<(), String> {
        let node = &mut self.nodes[i];
        let log = std::fs::File::create(node.dir.join("patroni.log"))
            .map_err(|e| format!("patroni.log: {e}"))?;
        let root = process::geteuid() == 0;
        let mut command = if root {
            let mut c = Command::new("setpriv");
            c.args([
                "--reuid=postgres",
                "--regid=postgres",
                "--init-groups",
                "--",
            ])
            .arg(patroni);
            c
        } else {
            Command::new(patroni)
        };
        // Should the benchmark die, its agents go with it.
        process::signal_on_parent_death(&mut command, libc::SIGKILL);
        let child = command
            .arg(node.dir.join("patroni.yml"))
            .env("HOME", &node.dir)
            .current_dir(&node.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("starting Patroni: {e}"))?;
        node.child = Some(child);
        Ok(())
    }

    pub fn api_url(&self, name: &str) -> Option<String> {
        let node = self.nodes.iter().find(|n| n.name == name)?;
        Some(format!("http://127.0.0.1:{}", node.api_port))
    }

    /// `GET /cluster` from the first agent that answers.
    pub async fn cluster_doc(&self) -> Option<Value> {
        for node in &self.nodes {
            let api = mainstay_agent::api_client::ApiClient::new(&format!(
                "http://127.0.0.1:{}",
                node.api_port
            ))
            .with_timeout(Duration::from_secs(2));
            if let Ok(answer) = api.get("/cluster").await
                && answer.status.is_success()
            {
                return Some(answer.body);
            }
        }
        None
    }

    pub async fn healthy(&self, timeout: Duration) -> Result<(String, u16), String> {
        let deadline = Instant::now() + timeout;
        let mut last = Value::Null;
        while Instant::now() < deadline {
            if let Some(doc) = self.cluster_doc().await {
                let members = doc["members"].as_array().cloned().unwrap_or_default();
                let leader = members
                    .iter()
                    .find(|m| m["role"] == "leader" && m["state"] == "running");
                let streaming = members
                    .iter()
                    .filter(|m| m["role"] != "leader" && m["state"] == "streaming")
                    .count();
                if let Some(leader) = leader
                    && streaming == 2
                {
                    let name = leader["name"].as_str().unwrap_or_default().to_string();
                    let port = leader["port"].as_u64().unwrap_or(0) as u16;
                    return Ok((name, port));
                }
                last = doc;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Err(format!(
            "Patroni's cluster was not healthy within {timeout:?}; last /cluster: {last}"
        ))
    }

    pub async fn enable_sync(&self) -> Result<(), String> {
        let url = format!("http://127.0.0.1:{}", self.nodes[0].api_port);
        let api =
            mainstay_agent::api_client::ApiClient::new(&url).with_timeout(Duration::from_secs(10));
        let answer = api
            .request(
                hyper::Method::PATCH,
                "/config",
                Some(&json!({ "synchronous_mode": true })),
            )
            .await
            .map_err(|e| e.to_string())?;
        if !answer.status.is_success() {
            return Err(format!("PATCH /config: {} {}", answer.status, answer.text));
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Some(doc) = self.cluster_doc().await
                && doc["members"]
                    .as_array()
                    .is_some_and(|m| m.iter().any(|m| m["role"] == "sync_standby"))
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Err("Patroni listed no sync_standby within 60 s".into())
    }

    pub fn kill(&mut self, name: &str) {
        let Some(node) = self.nodes.iter_mut().find(|n| n.name == name) else {
            return;
        };
        // The same crash as a mainstay node's: the agent and the
        // postmaster's whole process group at one instant.
        mainstay_testkit::crash::crash_node(
            node.child.as_ref().map(Child::id),
            node.postmaster_pid(),
        );
        if let Some(mut child) = node.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Patroni starts PostgreSQL detached, not as its child: one it was
        // just (re)starting shows up in postmaster.pid only now. Bounded.
        let deadline = Instant::now() + Duration::from_secs(5);
        while let Some(pid) = node.postmaster_pid()
            && process::alive(pid)
            && Instant::now() < deadline
        {
            let _ = process::kill(pid, libc::SIGKILL);
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn stop(&mut self) {
        let names: Vec<String> = self.nodes.iter().map(|n| n.name.clone()).collect();
        for name in names {
            self.kill(&name);
        }
        self.haproxy = None;
    }
}

impl Drop for PatroniCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

pub fn own_by_postgres(path: &Path) -> std::io::Result<()> {
    if process::geteuid() != 0 {
        return Ok(());
    }
    let Ok(Some(pw)) = mainstay_sys::user::by_name(c"postgres") else {
        return Err(std::io::Error::other("no `postgres` user"));
    };
    std::os::unix::fs::chown(path, Some(pw.uid), Some(pw.gid))
}

/// A Patroni configuration as its documentation shows, with the same
/// PostgreSQL settings the mainstay demo uses.
fn patroni_config(node: &PatroniNode, etcd_host: &str, timing: PatroniTiming) -> String {
    let PatroniTiming {
        ttl,
        loop_wait,
        retry_timeout,
    } = timing;
    format!(
        r#"scope: bench
name: {name}
restapi:
  listen: 127.0.0.1:{api}
  connect_address: 127.0.0.1:{api}
etcd3:
  host: {etcd_host}
bootstrap:
  dcs:
    ttl: {ttl}
    loop_wait: {loop_wait}
    retry_timeout: {retry_timeout}
    maximum_lag_on_failover: 1048576
    postgresql:
      use_pg_rewind: true
      parameters:
        wal_log_hints: "on"
  initdb:
    - encoding: UTF8
    - data-checksums
postgresql:
  listen: 127.0.0.1:{pg}
  connect_address: 127.0.0.1:{pg}
  data_dir: {data}
  bin_dir: /usr/lib/postgresql/15/bin
  pgpass: {dir}/pgpass
  authentication:
    superuser:
      username: {SUPERUSER}
      password: {SUPERUSER_PASSWORD}
    replication:
      username: replicator
      password: bench-replication-secret
    rewind:
      username: {SUPERUSER}
      password: {SUPERUSER_PASSWORD}
  parameters:
    shared_buffers: 32MB
    max_connections: 50
    # As in the demo: a killed server leaves nothing behind in /dev/shm.
    dynamic_shared_memory_type: mmap
    unix_socket_directories: {dir}
  pg_hba:
    - local all all trust
    - host all all 127.0.0.1/32 md5
    - host replication replicator 127.0.0.1/32 md5
"#,
        name = node.name,
        api = node.api_port,
        pg = node.pg_port,
        data = node.data_dir().display(),
        dir = node.dir.display(),
    )
}
