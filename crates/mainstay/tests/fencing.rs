//! Never two writers when the primary's agent freezes: a SIGSTOPped agent
//! renews nothing, and its PostgreSQL must stop taking writes at the fencing
//! deadline, before any other node can lead. The guard process enforces
//! that; this test watches from a client connected straight to the old
//! primary's port (no proxy, no VIP), as the libpq multi-host string the
//! demo prints would be.

#![forbid(unsafe_code)]

mod common;

use common::*;
use mainstay_dcs::Dcs;
use mainstay_sys::process;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Writes every 100 ms straight to one PostgreSQL, reconnecting (to the same
/// port) when the session breaks; returns when each write was acknowledged.
async fn direct_writer(conninfo: String, stop: Arc<AtomicBool>) -> Vec<Instant> {
    let mut acked = Vec::new();
    let mut client = None;
    let mut id = 0i32;
    // Bounded by `stop`, and by a count in case the test forgot it.
    for _ in 0..2_000 {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        if client.is_none() {
            client = connect(&format!("{conninfo} connect_timeout=1")).await.ok();
        }
        if let Some(c) = &client {
            id += 1;
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&id];
            let insert = c.execute("INSERT INTO frozen VALUES ($1)", &params);
            match tokio::time::timeout(Duration::from_secs(2), insert).await {
                Ok(Ok(_)) => acked.push(Instant::now()),
                _ => client = None,
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    acked
}

#[test]
fn a_frozen_primary_agent_cannot_keep_its_postgres_writable() {
    cluster_test(async {
        let mut h = Harness::start("frozen", 3);
        let old = h.healthy(Duration::from_secs(60)).await;
        let index = h.cluster.node_index(&old).unwrap();
        let conninfo = h.cluster.nodes[index].conninfo();
        h.client(&old)
            .await
            .batch_execute("CREATE TABLE frozen (id int primary key)")
            .await
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let writer = tokio::spawn(direct_writer(conninfo, stop.clone()));
        tokio::time::sleep(Duration::from_millis(500)).await;

        let agent = h.cluster.agent_pid(index).unwrap() as i32;
        let dcs = h.cluster.dcs().await.unwrap();
        let _ = process::kill(agent, libc::SIGSTOP);
        let frozen_at = Instant::now();
        // Three lease lengths frozen (ttl is 4 s in the default profile).
        let (mut fenced_at, mut takeover_at) = (None, None);
        while frozen_at.elapsed() < Duration::from_secs(12) {
            if fenced_at.is_none() && h.cluster.nodes[index].postmaster_pid().is_none() {
                fenced_at = Some(Instant::now());
            }
            if takeover_at.is_none()
                && let Ok(view) = dcs.read_cluster().await
                && view.leader.as_ref().is_some_and(|l| l.name != old)
            {
                takeover_at = Some(Instant::now());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = process::kill(agent, libc::SIGCONT);
        stop.store(true, Ordering::SeqCst);
        let acked = writer.await.unwrap();

        let fenced_at = fenced_at.expect("the frozen agent's PostgreSQL was never stopped");
        let takeover_at = takeover_at.expect("no other node took the lead");
        let late = acked.iter().filter(|at| **at >= takeover_at).count();
        eprintln!(
            "agent frozen: PostgreSQL fenced after {:?}, new leader seen after {:?}; {} writes \
             acknowledged by the old primary, {late} of them after the new leader took over",
            fenced_at - frozen_at,
            takeover_at - frozen_at,
            acked.len()
        );
        assert!(!acked.is_empty(), "the writer never reached the primary");
        assert!(
            fenced_at <= takeover_at,
            "the old primary still ran when another node led"
        );
        assert_eq!(
            late, 0,
            "writes acknowledged by the old primary after the takeover"
        );
        // Thawed, the old agent finds another leader and rejoins.
        let leader = h.healthy(Duration::from_secs(90)).await;
        assert_ne!(leader, old);
        h.passed = true;
    });
}

/// `watchdog.mode = "required"` on a machine without the device: `config
/// check` refuses it, and the agent runs but never takes the leader key (it
/// says why in `/patroni`), not even when the leader dies or is asked to.
#[test]
fn a_node_whose_required_watchdog_is_missing_never_leads() {
    cluster_test(async {
        let dir = test_dir("watchdog");
        let cluster = mainstay_lab::demo::LocalCluster::prepare(
            &dir,
            2,
            std::path::Path::new(env!("CARGO_BIN_EXE_mainstay")),
            "default",
        )
        .unwrap();
        let mut h = Harness::adopt(cluster);
        let config = h.cluster.nodes[0].config.clone();
        let text = std::fs::read_to_string(&config).unwrap();
        let missing = h.dir.join("no-such-watchdog");
        std::fs::write(
            &config,
            format!(
                "{text}\n[watchdog]\nmode = \"required\"\ndevice = \"{}\"\n",
                missing.display()
            ),
        )
        .unwrap();
        let check = std::process::Command::new(env!("CARGO_BIN_EXE_mainstay"))
            .args(["config", "check"])
            .arg(&config)
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&check.stderr);
        assert_eq!(check.status.code(), Some(2), "config check: {said}");
        assert!(
            said.contains("watchdog") && said.contains(&*missing.to_string_lossy()),
            "config check names the key and the device: {said}"
        );
        // node1 starts first, so it would claim the bootstrap.
        h.cluster.start_agent(0).unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        h.cluster.start_agent(1).unwrap();
        let leader = h.healthy(Duration::from_secs(60)).await;
        assert_eq!(leader, "node2");
        let status = api(&h, "node1").get("/patroni").await.unwrap().body;
        assert_eq!(status["watchdog_failed"], true, "{status}");
        assert!(
            status["watchdog_failed_reason"]
                .as_str()
                .is_some_and(|r| r.contains("no-such-watchdog")),
            "{status}"
        );
        // Asked to take over, it refuses; with the leader gone it stays a
        // replica.
        let (code, _, err) = run_ctl(
            &h,
            "node2",
            &["switchover", "--candidate", "node1", "--force"],
        )
        .await;
        assert_ne!(code, 0, "a switchover to node1 was accepted: {err}");
        h.cluster.kill_node(1);
        tokio::time::sleep(Duration::from_secs(10)).await;
        let view = h.view().await;
        assert!(
            view.leader_name() != Some("node1"),
            "node1 took the leader key without its required watchdog"
        );
        assert!(
            h.agent_log("node1").contains("never takes the leader key"),
            "the agent says why"
        );
        h.passed = true;
    });
}
