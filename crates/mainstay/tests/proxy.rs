//! The built-in read-write proxy against real agents, etcd and PostgreSQL.

mod common;

use common::*;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

fn proxy_conninfo(h: &Harness, node: &str) -> String {
    let i = h.cluster.node_index(node).unwrap();
    format!(
        "host=127.0.0.1 port={} user={} password={} dbname=postgres connect_timeout=5",
        h.cluster.nodes[i].proxy_port,
        mainstay::demo::SUPERUSER,
        mainstay::demo::SUPERUSER_PASSWORD
    )
}

/// (in recovery, server port) of the server a new connection through
/// `node`'s proxy reaches.
async fn through_proxy(h: &Harness, node: &str) -> Option<(bool, i32)> {
    let client = connect(&proxy_conninfo(h, node)).await.ok()?;
    let row = client
        .query_one("SELECT pg_is_in_recovery(), inet_server_port()", &[])
        .await
        .ok()?;
    Some((row.get(0), row.get(1)))
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

#[test]
fn the_read_write_proxy_reaches_the_primary_and_follows_a_failover() {
    cluster_test(async {
        let mut h = Harness::start("proxy", 3);
        let leader = h.healthy(Duration::from_secs(60)).await;
        let leader_port = {
            let i = h.cluster.node_index(&leader).unwrap();
            i32::from(h.cluster.nodes[i].pg_port)
        };
        // Through every node's proxy, replicas included: the primary.
        for node in h.names() {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if through_proxy(&h, &node).await == Some((false, leader_port)) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{node}'s proxy does not reach the primary"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }

        // Clients that misbehave: disconnect at once, send garbage, drop
        // mid-handshake; the proxy keeps serving and leaks no descriptors.
        let replica = h.other_than(&leader);
        let i = h.cluster.node_index(&replica).unwrap();
        let agent = h.cluster.agent_pid(i).unwrap();
        let port = h.cluster.nodes[i].proxy_port;
        let before = open_fds(agent);
        for round in 0..1000u32 {
            let Ok(mut socket) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
                continue;
            };
            match round % 3 {
                0 => {}
                1 => {
                    let _ = socket.write_all(b"\x00\x00\x00\x08garbage!\xff\xfe").await;
                }
                _ => {
                    // The first bytes of a startup packet, then gone.
                    let _ = socket.write_all(&[0, 0, 0, 84, 0, 3]).await;
                }
            }
            drop(socket);
        }
        assert_eq!(
            through_proxy(&h, &replica).await,
            Some((false, leader_port))
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let after = open_fds(agent);
            if after <= before + 5 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the agent holds {after} descriptors, {before} before 1000 bad clients"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        // The leader's agent freezes (SIGSTOP) while its PostgreSQL keeps
        // running: once another node leads, the proxy closes connections it
        // still holds to the old primary, which would otherwise go on
        // serving them; new connections reach the new primary.
        let idle = connect(&proxy_conninfo(&h, &replica)).await.unwrap();
        idle.query_one("SELECT 1", &[]).await.unwrap();
        let l = h.cluster.node_index(&leader).unwrap();
        let frozen = h.cluster.agent_pid(l).unwrap() as i32;
        let killed_at = Instant::now();
        unsafe { libc::kill(frozen, libc::SIGSTOP) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !idle.is_closed() {
            if Instant::now() > deadline {
                unsafe { libc::kill(frozen, libc::SIGCONT) };
                panic!("the idle connection to the old primary stayed open");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let closed_after = killed_at.elapsed();
        let old_primary_runs = h.cluster.nodes[l].postmaster_pid().is_some();
        let new_leader = h
            .wait_for("a new primary", Duration::from_secs(30), async |v| {
                v.leader_status()
                    .filter(|s| s.role == mainstay_core::PgRole::Primary && s.name != leader)
                    .map(|s| (s.name.clone(), i32::from(s.pg_port)))
            })
            .await;
        unsafe { libc::kill(frozen, libc::SIGCONT) };
        let deadline = Instant::now() + Duration::from_secs(30);
        let writable_after = loop {
            if through_proxy(&h, &replica).await == Some((false, new_leader.1)) {
                break killed_at.elapsed();
            }
            assert!(
                Instant::now() < deadline,
                "the proxy never reached the new primary"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        eprintln!(
            "idle connection closed {closed_after:?} after the freeze (old primary still \
             running then: {old_primary_runs}); new primary {} reached through the proxy \
             {writable_after:?} after it",
            new_leader.0
        );
        // The thawed agent fences its primary and rejoins.
        assert_eq!(h.healthy(Duration::from_secs(60)).await, new_leader.0);
        let metrics = api(&h, &replica).get("/metrics").await.unwrap().text;
        assert!(
            metrics.contains("mainstay_proxy_connections_total{target="),
            "{metrics}"
        );
        h.passed = true;
    });
}
