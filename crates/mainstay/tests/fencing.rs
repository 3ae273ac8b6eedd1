//! Never two writers when the primary's agent freezes: a SIGSTOPped agent
//! renews nothing, and its PostgreSQL must stop taking writes at the fencing
//! deadline, before any other node can lead. The guard process enforces
//! that; this test watches from a client connected straight to the old
//! primary's port (no proxy, no VIP), as the libpq multi-host string the
//! demo prints would be.

mod common;

use common::*;
use mainstay_dcs::Dcs;
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
        unsafe { libc::kill(agent, libc::SIGSTOP) };
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
        unsafe { libc::kill(agent, libc::SIGCONT) };
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
