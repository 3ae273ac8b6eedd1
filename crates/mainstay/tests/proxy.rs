//! The built-in read-write proxy against real agents, etcd and PostgreSQL.

#![forbid(unsafe_code)]

mod common;

use common::*;
use mainstay_sys::process;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio_postgres::Client;

/// A connection string to `node`'s read-write proxy, or its read-only one.
fn listener_conninfo(h: &Harness, node: &str, read_only: bool) -> String {
    let n = &h.cluster.nodes[h.cluster.node_index(node).unwrap()];
    format!(
        "host=127.0.0.1 port={} user={} password={} dbname=postgres connect_timeout=5",
        if read_only {
            n.read_only_port
        } else {
            n.proxy_port
        },
        mainstay_lab::demo::SUPERUSER,
        mainstay_lab::demo::SUPERUSER_PASSWORD
    )
}

fn proxy_conninfo(h: &Harness, node: &str) -> String {
    listener_conninfo(h, node, false)
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
        let _ = process::kill(frozen, libc::SIGSTOP);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !idle.is_closed() {
            if Instant::now() > deadline {
                let _ = process::kill(frozen, libc::SIGCONT);
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
        let _ = process::kill(frozen, libc::SIGCONT);
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
            metrics.contains("mainstay_proxy_connections_total{listener=\"rw\",target="),
            "{metrics}"
        );
        h.passed = true;
    });
}

fn pg_port(h: &Harness, node: &str) -> i32 {
    i32::from(h.cluster.nodes[h.cluster.node_index(node).unwrap()].pg_port)
}

/// Opens `n` connections through `node`'s read-only proxy and keeps them:
/// (client, in recovery, server port) each.
async fn read_only_clients(h: &Harness, node: &str, n: usize) -> Vec<(Client, bool, i32)> {
    let mut clients = Vec::new();
    for _ in 0..n {
        let client = connect(&listener_conninfo(h, node, true)).await.unwrap();
        let row = client
            .query_one("SELECT pg_is_in_recovery(), inet_server_port()", &[])
            .await
            .unwrap();
        let (recovery, port) = (row.get(0), row.get(1));
        clients.push((client, recovery, port));
    }
    clients
}

async fn replicas_streaming(h: &Harness, leader: &str) {
    let expected = h.names().len() - 1;
    h.wait_for(
        "every replica streaming",
        Duration::from_secs(60),
        async |v| {
            let streaming = v
                .members
                .values()
                .filter(|m| m.status.streaming && m.status.following.as_deref() == Some(leader))
                .count();
            (streaming == expected).then_some(())
        },
    )
    .await;
}

#[test]
fn the_read_only_proxy_spreads_over_replicas_falls_back_to_the_leader_and_rw_follows_a_switchover()
{
    cluster_test(async {
        let mut h = Harness::start("proxy-ro", 3);
        let leader = h.healthy(Duration::from_secs(60)).await;
        replicas_streaming(&h, &leader).await;
        let replicas: Vec<String> = h.names().into_iter().filter(|n| *n != leader).collect();
        let replica_ports: Vec<i32> = replicas.iter().map(|r| pg_port(&h, r)).collect();

        // Least connections: four connections held open through the
        // leader's own proxy land two on each replica, none on the primary
        // (once the leader's agent has seen both replicas stream: member
        // keys refresh every loop_wait).
        let deadline = Instant::now() + Duration::from_secs(30);
        let clients = loop {
            let clients = read_only_clients(&h, &leader, 4).await;
            let split: Vec<Vec<bool>> = replica_ports
                .iter()
                .map(|port| {
                    clients
                        .iter()
                        .filter(|c| c.2 == *port)
                        .map(|c| c.1)
                        .collect()
                })
                .collect();
            if split == [[true, true], [true, true]] {
                break clients;
            }
            assert!(
                Instant::now() < deadline,
                "read-only connections by server port: {:?}, replicas at {replica_ports:?}",
                clients.iter().map(|c| c.2).collect::<Vec<_>>()
            );
            drop(clients);
            tokio::time::sleep(Duration::from_millis(300)).await;
        };
        let metrics = api(&h, &leader).get("/metrics").await.unwrap().text;
        for replica in &replicas {
            let line =
                format!("mainstay_proxy_connections{{listener=\"ro\",target=\"{replica}\"}} 2");
            assert!(metrics.contains(&line), "no {line:?} in\n{metrics}");
        }
        drop(clients);

        // No replica qualifies (paused, so their servers stay down): reads
        // go to the leader; once they are back, to the replicas again.
        let (code, _, err) = ctl(&h, &leader, true, &["pause"]).await;
        assert_eq!(code, 0, "{err}");
        h.wait_for(
            "the pause in the view",
            Duration::from_secs(30),
            async |v| {
                v.config
                    .as_ref()
                    .and_then(|c| c.get("pause"))
                    .and_then(|p| p.as_bool())
                    .filter(|p| *p)
                    .map(|_| ())
            },
        )
        .await;
        for replica in &replicas {
            let i = h.cluster.node_index(replica).unwrap();
            let pid = h.cluster.nodes[i].postmaster_pid().unwrap();
            let _ = process::kill(pid, libc::SIGKILL);
            // Gone or a zombie: its listening socket is closed.
            let deadline = Instant::now() + Duration::from_secs(10);
            while std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|stat| !stat.contains(") Z "))
            {
                assert!(
                    Instant::now() < deadline,
                    "postmaster {pid} survived SIGKILL"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        // A replica that just died is skipped even before its agent
        // reports it: every connection lands at once.
        for _ in 0..5 {
            let client = read_only_clients(&h, &replicas[0], 1).await;
            assert_eq!(
                (client[0].1, client[0].2),
                (false, pg_port(&h, &leader)),
                "reads did not fall back to the leader"
            );
        }
        let (code, _, err) = ctl(&h, &leader, true, &["resume"]).await;
        assert_eq!(code, 0, "{err}");
        replicas_streaming(&h, &leader).await;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let client = read_only_clients(&h, &leader, 1).await;
            if client[0].1 && replica_ports.contains(&client[0].2) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "reads never went back to the replicas"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }

        // A switchover: the idle read-write connection to the old primary
        // is closed, and new ones reach the new primary.
        let idle = connect(&proxy_conninfo(&h, &replicas[1])).await.unwrap();
        idle.query_one("SELECT 1", &[]).await.unwrap();
        let target = replicas[0].clone();
        let (code, _, err) = ctl(
            &h,
            &leader,
            true,
            &["switchover", "--candidate", &target, "--force"],
        )
        .await;
        assert_eq!(code, 0, "{err}");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if through_proxy(&h, &leader).await == Some((false, pg_port(&h, &target))) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the read-write proxy never reached the new primary {target}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while !idle.is_closed() {
            assert!(
                Instant::now() < deadline,
                "the idle connection to the old primary stayed open"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        h.passed = true;
    });
}
