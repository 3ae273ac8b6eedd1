//! The whole platform on real (namespaced) hosts: three nodes, each with
//! an etcd member, an agent, PostgreSQL, coturn (`everywhere`) and a
//! `with-leader` Synapse, a VIP that follows the leader, and a Matrix
//! client in the lab's client namespace that only knows the VIP. Used by
//! `mainstay bench platform` and by the platform test.
//!
//! Everything here must run on a thread inside the lab's client namespace
//! (see `mainstay_testkit::netns::enter`), so that the client's traffic
//! crosses the lab's bridge like a crew device's.

pub mod coturn;
pub mod demo;
pub mod matrix;
pub mod synapse;

use crate::demo::{LabOptions, LocalCluster};
use mainstay_testkit::netns::Lab;
use serde_json::Value;
use std::path::Path;
use std::time::{Duration, Instant};

/// The platform's one address for clients.
pub const VIP: &str = "10.213.0.50";

pub struct Platform {
    pub cluster: LocalCluster,
}

/// Why the platform lab cannot run here, if it cannot.
pub fn unavailable() -> Option<String> {
    mainstay_testkit::netns::unavailable()
        .or_else(coturn::unavailable)
        .or_else(|| synapse::venv().err())
}

impl Platform {
    /// Builds the nodes' configurations (Synapse and coturn sections) and
    /// starts etcd and the agents on `lab`'s hosts.
    pub fn start(dir: &Path, lab: Lab, exe: &Path, hosts: usize) -> Result<Platform, String> {
        let venv = synapse::venv()?;
        let shared = synapse::Shared::create(&dir.join("synapse"), &venv)
            .map_err(|e| format!("preparing Synapse: {e}"))?;
        let addresses: Vec<String> = (0..hosts).map(|i| lab.host_ip(i).to_string()).collect();
        // TURN clients get every node's relay, UDP and TCP.
        let turn_uris: Vec<String> = addresses
            .iter()
            .flat_map(|a| {
                ["udp", "tcp"].map(|t| format!("turn:{a}:{}?transport={t}", coturn::PORT))
            })
            .collect();
        let mut node_config = Vec::new();
        for (i, address) in addresses.iter().enumerate() {
            let node_dir = dir.join(format!("node{}", i + 1));
            let sections = shared
                .node_service(
                    &node_dir,
                    crate::demo::LAB_PG_PORT,
                    "0.0.0.0",
                    synapse::PORT,
                    &turn_uris,
                )
                .and_then(|s| {
                    Ok(s + &coturn::node_service(&node_dir, address, synapse::TURN_SECRET)?)
                })
                .map_err(|e| format!("writing node{}'s services: {e}", i + 1))?;
            node_config.push(sections);
        }
        let mut options = LabOptions::new(
            hosts,
            "default",
            &format!("vip = \"{VIP}/24\"\nvip_interface = \"eth0\"\n"),
        );
        options.node_config = node_config;
        let cluster = LocalCluster::start_in_lab_with(dir, lab, exe, &options)
            .map_err(|e| format!("starting the lab cluster: {e}"))?;
        Ok(Platform { cluster })
    }

    /// Synapse through the VIP, as clients reach it.
    pub fn vip_url() -> String {
        format!("http://{VIP}:{}", synapse::PORT)
    }

    /// Synapse on node `i`'s own address.
    pub fn node_url(&self, i: usize) -> String {
        format!("http://{}:{}", self.cluster.nodes[i].host, synapse::PORT)
    }

    /// The leader, once it runs as primary with every other member
    /// streaming from it.
    pub async fn healthy(&self, timeout: Duration) -> Result<String, String> {
        let dcs = self.cluster.dcs().await?;
        crate::bench::healthy(&dcs, self.cluster.nodes.len(), timeout).await
    }

    pub fn index(&self, node: &str) -> Result<usize, String> {
        self.cluster
            .node_index(node)
            .ok_or_else(|| format!("no node named {node}"))
    }

    /// Node `i`'s service `name` as its REST API reports it.
    pub async fn service(&self, i: usize, name: &str) -> Option<Value> {
        let answer = self.cluster.nodes[i].api().get("/services").await.ok()?;
        answer.body["services"]
            .as_array()?
            .iter()
            .find(|s| s["name"] == name)
            .cloned()
    }

    /// Waits until node `i` reports service `name` running; its pid.
    pub async fn running_pid(
        &self,
        i: usize,
        name: &str,
        timeout: Duration,
    ) -> Result<i32, String> {
        let deadline = Instant::now() + timeout;
        let mut last = None;
        loop {
            last = self.service(i, name).await.or(last);
            if let Some(status) = &last
                && status["state"] == "running"
                && let Some(pid) = status["pid"].as_i64()
            {
                return Ok(pid as i32);
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{name} does not run on {} after {timeout:?}: {}",
                    self.cluster.nodes[i].name,
                    last.map_or("no status".into(), |s| s.to_string())
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Turns `synchronous_mode` on and waits until a standby is listed as
    /// synchronous: from then on no acknowledged message may be lost.
    pub async fn synchronous(&self, leader: &str) -> Result<(), String> {
        crate::bench::enable_synchronous_mode(&self.cluster, leader).await
    }

    /// Waits (at most 90 s) until Synapse answers through the VIP, then
    /// registers the crew's account.
    pub async fn crew_client(&self) -> Result<matrix::Matrix, String> {
        let url = Platform::vip_url();
        let deadline = Instant::now() + Duration::from_secs(90);
        while !Platform::synapse_answers(&url).await {
            if Instant::now() > deadline {
                return Err(format!(
                    "Synapse did not answer through the VIP ({url}) within 90 s; see {}",
                    self.cluster.dir.display()
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        matrix::Matrix::register(&url, "crew", "crew-password-lab").await
    }

    /// Whether Synapse at `url` answers `/health` with 200 within 300 ms.
    pub async fn synapse_answers(url: &str) -> bool {
        let client = mainstay_agent::api_client::ApiClient::new(url)
            .with_timeout(Duration::from_millis(300));
        matches!(client.get("/health").await, Ok(a) if a.status.is_success())
    }
}

/// When a process started and stopped, on this process's clock.
#[derive(Debug, Clone, Copy)]
pub struct Lifetime {
    pub started: Instant,
    /// When it was seen gone (polled every 10 ms by [`watch_until_gone`]).
    pub gone: Option<Instant>,
}

/// When `pid` started, converted from `/proc` (boot-time clock ticks, 10
/// ms apart) to an `Instant`.
pub fn started_at(pid: i32) -> Option<Instant> {
    let since_boot = mainstay_testkit::crash::started_since_boot(pid)?;
    let (now, boot_now) = (Instant::now(), mainstay_agent::boot_clock::now());
    let age = Duration::from_millis(boot_now.0).checked_sub(since_boot)?;
    now.checked_sub(age)
}

/// Polls `pid` every 10 ms until it is gone (at most `timeout`); when it
/// was first seen gone.
pub async fn watch_until_gone(pid: i32, timeout: Duration) -> Option<Instant> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if mainstay_testkit::crash::gone(pid) {
            return Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

/// What a crash of the leader's node showed.
pub struct CrashFigures {
    pub old_leader: String,
    pub new_leader: String,
    /// Kill -> first message acknowledged through the VIP.
    pub unavailability: Duration,
    /// The new Synapse's process start -> its first `/health` 200.
    pub synapse_start: Duration,
    /// The old Synapse seen gone -> the new one's process start (negative
    /// would be two copies at once).
    pub gap_between_copies_ms: i64,
}

/// Crashes the leader's whole host while `sender` sends through the VIP;
/// returns once a message was acknowledged after the crash and the new
/// leader's Synapse is known. Bounded: 90 s.
pub async fn crash_leader(
    platform: &mut Platform,
    sender: &matrix::Sender,
) -> Result<CrashFigures, String> {
    let old_leader = platform.healthy(Duration::from_secs(60)).await?;
    let l = platform.index(&old_leader)?;
    let old_pid = platform
        .running_pid(l, "synapse", Duration::from_secs(30))
        .await?;
    let survivors: Vec<(usize, String)> = (0..platform.cluster.nodes.len())
        .filter(|&i| i != l)
        .map(|i| (i, platform.node_url(i)))
        .collect();
    // Each survivor's Synapse is watched from the moment of the crash, to
    // time its start to its first answer.
    let mut watchers = tokio::task::JoinSet::new();
    for (i, url) in survivors {
        watchers.spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(90);
            while Instant::now() < deadline {
                if Platform::synapse_answers(&url).await {
                    return Some((i, Instant::now()));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            None
        });
    }
    let killed_at = Instant::now();
    platform
        .cluster
        .crash_host(l)
        .map_err(|e| format!("crashing {old_leader}'s host: {e}"))?;
    let old_gone = watch_until_gone(old_pid, Duration::from_secs(5))
        .await
        .ok_or_else(|| {
            format!("{old_leader}'s Synapse (pid {old_pid}) survived its host's crash")
        })?;
    let deadline = killed_at + Duration::from_secs(90);
    let first_ack = loop {
        if let Some(at) = sender.first_ack_after(killed_at) {
            break at;
        }
        if Instant::now() > deadline {
            return Err(
                "no message was acknowledged through the VIP within 90 s of the crash".into(),
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // The first survivor to answer runs the new copy; the others never
    // will, and their watchers stop here.
    let mut answered = None;
    while let Some(done) = watchers.join_next().await {
        if let Ok(Some(first)) = done {
            answered = Some(first);
            break;
        }
    }
    watchers.abort_all();
    let (n, answered_at) = answered.ok_or("no surviving node's Synapse answered within 90 s")?;
    let new_leader = platform.cluster.nodes[n].name.clone();
    let new_pid = platform
        .running_pid(n, "synapse", Duration::from_secs(30))
        .await?;
    let new_start = started_at(new_pid)
        .ok_or_else(|| format!("no start time for {new_leader}'s Synapse (pid {new_pid})"))?;
    let gap_between_copies_ms = if new_start >= old_gone {
        new_start.duration_since(old_gone).as_millis() as i64
    } else {
        -(old_gone.duration_since(new_start).as_millis() as i64)
    };
    Ok(CrashFigures {
        old_leader,
        new_leader,
        unavailability: first_ack.duration_since(killed_at),
        synapse_start: answered_at.saturating_duration_since(new_start),
        gap_between_copies_ms,
    })
}
