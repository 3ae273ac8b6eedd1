//! A real HAProxy, configured the way Patroni's documentation configures it
//! (https://github.com/patroni/patroni/blob/master/haproxy.cfg and the REST
//! API page: `option httpchk OPTIONS /primary`, `http-check expect status
//! 200`, `check port <api port>`), in front of a real mainstay cluster: a
//! load balancer set up for Patroni must route to mainstay's primary and
//! replicas, and follow a failover, without knowing it is not Patroni.
//!
//! HAProxy runs in the foreground as a child of the test, with a stats socket
//! in the test directory, and is killed by PID when the test ends, even on
//! failure.

#![forbid(unsafe_code)]

mod common;

use common::*;
use mainstay_core::{ClusterView, PgRole};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_postgres::Client;

use mainstay_testkit::{HAPROXY, skip};

/// An HAProxy process with a `listen primary` and a `listen replicas`
/// section over every node of the cluster. Drop kills it by PID.
struct Haproxy {
    process: mainstay_testkit::Haproxy,
    socket: PathBuf,
    primary_port: u16,
    replicas_port: u16,
}

impl Haproxy {
    /// Writes `haproxy.cfg` (Patroni's template, loopback ports, a quicker
    /// check interval) in `<test dir>/haproxy`, checks it, and starts it.
    fn start(h: &Harness) -> Haproxy {
        let dir = h.dir.join("haproxy");
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("stats.sock");
        let primary_port = mainstay_testkit::free_port();
        let replicas_port = mainstay_testkit::free_port();
        let servers = mainstay_testkit::health_checked_servers(
            h.cluster
                .nodes
                .iter()
                .map(|n| (n.name.as_str(), n.pg_port, n.api_port)),
        );
        let cfg = format!(
            "# Patroni's haproxy.cfg, on loopback ports, checked every second.
{head}
listen primary
    bind 127.0.0.1:{primary_port}
    option httpchk OPTIONS /primary
    http-check expect status 200
    default-server inter 1s fall 2 rise 1 on-marked-down shutdown-sessions
{servers}
listen replicas
    bind 127.0.0.1:{replicas_port}
    option httpchk OPTIONS /replica
    http-check expect status 200
    default-server inter 1s fall 2 rise 1 on-marked-down shutdown-sessions
{servers}",
            head = mainstay_testkit::haproxy_config_head(100, Some(&socket)),
        );
        let process = mainstay_testkit::Haproxy::start(&dir, &cfg).unwrap();
        let mut proxy = Haproxy {
            process,
            socket,
            primary_port,
            replicas_port,
        };
        // Up once its stats socket answers.
        let deadline = Instant::now() + Duration::from_secs(10);
        while proxy.stats().is_err() {
            if let Err(exited) = proxy.process.check_alive() {
                panic!("{exited}");
            }
            assert!(
                Instant::now() < deadline,
                "haproxy not up after 10 s:\n{}",
                proxy.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        proxy
    }

    fn log(&self) -> String {
        self.process.log()
    }

    /// `show stat` on the stats socket: the status (UP, DOWN...) of each
    /// server, by section and server name.
    fn stats(&self) -> std::io::Result<BTreeMap<(String, String), String>> {
        let mut stream = std::os::unix::net::UnixStream::connect(&self.socket)?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        stream.write_all(b"show stat\n")?;
        let mut text = String::new();
        stream.read_to_string(&mut text)?;
        let mut lines = text.lines();
        let header: Vec<&str> = lines
            .next()
            .and_then(|l| l.strip_prefix("# "))
            .ok_or_else(|| std::io::Error::other(format!("no CSV header in {text:?}")))?
            .split(',')
            .collect();
        let column = |name: &str| header.iter().position(|c| *c == name);
        let (Some(px), Some(sv), Some(st)) = (column("pxname"), column("svname"), column("status"))
        else {
            return Err(std::io::Error::other(format!(
                "unexpected header {header:?}"
            )));
        };
        let mut states = BTreeMap::new();
        for line in lines.filter(|l| !l.is_empty()) {
            let fields: Vec<&str> = line.split(',').collect();
            if fields.len() > st && !matches!(fields[sv], "FRONTEND" | "BACKEND") {
                states.insert(
                    (fields[px].to_string(), fields[sv].to_string()),
                    fields[st].to_string(),
                );
            }
        }
        Ok(states)
    }

    /// Polls the stats until HAProxy marks `up` UP and every other node DOWN
    /// in `section`, at most `timeout`.
    async fn wait_states(
        &self,
        h: &Harness,
        section: &str,
        up: &BTreeSet<String>,
        timeout: Duration,
    ) {
        let deadline = Instant::now() + timeout;
        let mut last = BTreeMap::new();
        while Instant::now() < deadline {
            if let Ok(stats) = self.stats() {
                let fits = h.cluster.nodes.iter().all(|n| {
                    let state = stats.get(&(section.to_string(), n.name.clone()));
                    let want = if up.contains(&n.name) { "UP" } else { "DOWN" };
                    state.is_some_and(|s| s.starts_with(want))
                });
                if fits {
                    return;
                }
                last = stats;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        h.dump_logs();
        panic!(
            "haproxy's {section} section: {last:?}, wanted only {up:?} UP within {timeout:?}\n{}",
            self.log()
        );
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("----- haproxy log (last 40 lines) -----");
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// A new connection through `port`: the client, whether the server it
/// landed on is in recovery, and that server's port.
async fn through(_proxy: &Haproxy, port: u16) -> Result<(Client, bool, u16), String> {
    through_port(port).await
}

fn pg_port(h: &Harness, node: &str) -> u16 {
    h.cluster.nodes[h.cluster.node_index(node).unwrap()].pg_port
}

#[test]
fn haproxy_configured_for_patroni_routes_to_the_primary_and_follows_a_failover() {
    if !Path::new(HAPROXY).exists() {
        skip("needs haproxy: run scripts/setup.sh");
        return;
    }
    cluster_test(async {
        let mut h = Harness::start("haproxy", 3);
        let leader = h.healthy(Duration::from_secs(60)).await;
        let names: Vec<String> = h.names();
        let replicas: BTreeSet<String> = names.iter().filter(|n| **n != leader).cloned().collect();
        // The API follows the HA loop: wait until it reflects the roles.
        wait_code(&h, &leader, "/primary", 200, Duration::from_secs(10)).await;
        for replica in &replicas {
            wait_code(&h, replica, "/replica", 200, Duration::from_secs(10)).await;
        }

        let proxy = Haproxy::start(&h);
        let only_leader = BTreeSet::from([leader.clone()]);
        proxy
            .wait_states(&h, "primary", &only_leader, Duration::from_secs(15))
            .await;
        proxy
            .wait_states(&h, "replicas", &replicas, Duration::from_secs(15))
            .await;

        // Every new connection through the primary port lands on the leader.
        for _ in 0..5 {
            let (_, in_recovery, port) = through(&proxy, proxy.primary_port).await.unwrap();
            assert!(!in_recovery, "the primary port led to a server in recovery");
            assert_eq!(port, pg_port(&h, &leader), "the primary port led elsewhere");
        }
        // The replicas port spreads over the replicas, never the primary.
        let replica_ports: BTreeSet<u16> = replicas.iter().map(|r| pg_port(&h, r)).collect();
        let mut reached = BTreeSet::new();
        for _ in 0..6 {
            let (_, in_recovery, port) = through(&proxy, proxy.replicas_port).await.unwrap();
            assert!(in_recovery, "the replicas port led to a writable server");
            assert!(replica_ports.contains(&port), "port {port} is no replica");
            reached.insert(port);
        }
        assert_eq!(reached, replica_ports, "round robin reaches both replicas");

        // A session through HAProxy opened before the crash.
        let (before, _, _) = through(&proxy, proxy.primary_port).await.unwrap();
        before
            .batch_execute("CREATE TABLE before_crash (id int)")
            .await
            .unwrap();

        // What the survivors answer to HAProxy's checks during the failover.
        let transitions = Arc::new(Mutex::new(Vec::<(Duration, String, String)>::new()));
        let killed_at = Instant::now();
        let watcher = {
            let transitions = transitions.clone();
            let survivors: Vec<(String, mainstay_agent::api_client::ApiClient)> = replicas
                .iter()
                .map(|r| (r.clone(), api(&h, r).with_timeout(Duration::from_secs(1))))
                .collect();
            tokio::spawn(async move {
                let mut last: BTreeMap<(String, &str), String> = BTreeMap::new();
                loop {
                    for (name, client) in &survivors {
                        for path in ["/primary", "/replica"] {
                            let answer =
                                match client.request(hyper::Method::OPTIONS, path, None).await {
                                    Ok(a) => a.status.as_u16().to_string(),
                                    Err(e) => format!("error: {e}"),
                                };
                            let key = (name.clone(), path);
                            if last.get(&key) != Some(&answer) {
                                transitions.lock().unwrap().push((
                                    killed_at.elapsed(),
                                    format!("OPTIONS {path} on {name}"),
                                    answer.clone(),
                                ));
                                last.insert(key, answer);
                            }
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
        };

        // Crash the leader's server: agent and PostgreSQL together.
        h.cluster.kill_node(h.cluster.node_index(&leader).unwrap());
        let new = h
            .wait_for(
                "a new primary",
                Duration::from_secs(30),
                async |view: &ClusterView| {
                    let status = view.leader_status()?;
                    (status.name != leader && status.role == PgRole::Primary)
                        .then(|| status.name.clone())
                },
            )
            .await;
        let elected_after = killed_at.elapsed();

        // New connections through HAProxy until one is writable.
        let deadline = killed_at + Duration::from_secs(30);
        let mut attempts = 0;
        let mut failures = BTreeMap::<String, usize>::new();
        let (after, writable_after, port) = loop {
            attempts += 1;
            match through(&proxy, proxy.primary_port).await {
                Ok((client, false, port)) => break (client, killed_at.elapsed(), port),
                Ok((_, true, port)) => {
                    panic!("the primary port led to {port}, a server in recovery")
                }
                Err(e) => *failures.entry(e).or_default() += 1,
            }
            assert!(
                Instant::now() < deadline,
                "no writable connection through haproxy 30 s after the kill \
                 ({attempts} attempts: {failures:?})\n{}",
                proxy.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        eprintln!(
            "haproxy failover: {new} elected (DCS) {elected_after:?} after the kill; \
             first writable connection through haproxy {writable_after:?} after the kill \
             ({attempts} attempts, failures: {failures:?})"
        );
        assert_eq!(
            port,
            pg_port(&h, &new),
            "writable through haproxy, but not {new}"
        );
        after
            .batch_execute("CREATE TABLE after_crash (id int)")
            .await
            .expect("the new primary accepts writes through haproxy");
        let only_new = BTreeSet::from([new.clone()]);
        proxy
            .wait_states(&h, "primary", &only_new, Duration::from_secs(10))
            .await;

        // The session opened before the crash is gone, not silently moved.
        let old =
            tokio::time::timeout(Duration::from_secs(5), before.query_one("SELECT 1", &[])).await;
        assert!(
            matches!(old, Ok(Err(_))),
            "the session opened before the crash still answers: {old:?}"
        );
        assert!(before.is_closed(), "the old session is closed");

        // The remaining replica follows the new primary and takes the reads.
        let remaining: BTreeSet<String> = replicas.iter().filter(|r| **r != new).cloned().collect();
        proxy
            .wait_states(&h, "replicas", &remaining, Duration::from_secs(30))
            .await;
        let remaining_port = pg_port(&h, remaining.first().unwrap());
        for _ in 0..3 {
            let (_, in_recovery, port) = through(&proxy, proxy.replicas_port).await.unwrap();
            assert!(
                in_recovery && port == remaining_port,
                "replicas port led to {port}"
            );
        }
        watcher.abort();
        eprintln!("health checks of the survivors, from the kill:");
        for (at, check, answer) in transitions.lock().unwrap().iter() {
            eprintln!("  {at:>12.3?}  {check}: {answer}");
        }
        h.passed = true;
    });
}
