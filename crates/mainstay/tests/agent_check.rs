//! A planned switchover behind two real HAProxies at once: one configured
//! as Patroni's documentation configures it (`option httpchk OPTIONS
//! /primary`, `inter 3s fall 3 rise 2`), one that also polls mainstay's
//! agent-check port (`agent-check agent-inter 500ms agent-send
//! "primary\n"`, docs/operations.md). Clients open new connections through
//! each frontend without pause; a connection that lands on a server in
//! recovery is a read-write connection sent to a read-only node. Behind the
//! agent check there must be none; behind the stock configuration the
//! count is printed (it is what an operator gets without the agent).

#![forbid(unsafe_code)]

mod common;

use common::*;
use mainstay_testkit::{HAPROXY, skip};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// What one frontend's clients saw.
#[derive(Debug, Default)]
struct Landings {
    /// Connections that reached a writable server.
    writable: usize,
    /// Connections that reached a server in recovery, by its port.
    read_only: Vec<u16>,
    failed: usize,
}

/// New connections through `port` until `stop`, each closed at once.
fn clients(port: u16, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<Landings> {
    tokio::spawn(async move {
        let mut seen = Landings::default();
        // Bounded by the test's own deadline (it sets `stop`), and by count.
        for _ in 0..200_000 {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            match through_port(port).await {
                Ok((_, false, _)) => seen.writable += 1,
                Ok((_, true, server)) => seen.read_only.push(server),
                Err(_) => seen.failed += 1,
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        seen
    })
}

fn haproxy_config(h: &Harness, socket: &Path, port: u16, agent_ports: Option<&[u16]>) -> String {
    let servers: String = h
        .cluster
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let agent = agent_ports.map_or(String::new(), |ports| {
                format!(
                    " agent-check agent-port {} agent-inter 500ms agent-send \"primary\\n\"",
                    ports[i]
                )
            });
            format!(
                "    server {} 127.0.0.1:{} maxconn 100 check port {}{agent}\n",
                n.name, n.pg_port, n.api_port
            )
        })
        .collect();
    format!(
        "{head}
listen primary
    bind 127.0.0.1:{port}
    option httpchk OPTIONS /primary
    http-check expect status 200
    default-server inter 3s fall 3 rise 2 on-marked-down shutdown-sessions
{servers}",
        head = mainstay_testkit::haproxy_config_head(200, Some(socket))
    )
}

/// Polls until a new connection through `port` reaches `node`'s server,
/// writable, three times in a row.
async fn wait_route(h: &Harness, port: u16, node: &str, timeout: Duration) {
    let want = h.cluster.nodes[h.cluster.node_index(node).unwrap()].pg_port;
    let deadline = Instant::now() + timeout;
    let mut in_a_row = 0;
    let mut last = String::new();
    while in_a_row < 3 {
        match through_port(port).await {
            Ok((_, false, server)) if server == want => in_a_row += 1,
            other => {
                in_a_row = 0;
                last = format!("{:?}", other.map(|(_, r, p)| (r, p)));
            }
        }
        if Instant::now() > deadline {
            h.dump_logs();
            panic!("port {port} did not lead to {node} within {timeout:?}: last {last}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn a_switchover_sends_no_read_write_connection_to_the_demoted_node_behind_the_agent_check() {
    if !Path::new(HAPROXY).exists() {
        skip("needs haproxy: run scripts/setup.sh");
        return;
    }
    cluster_test(async {
        let dir = test_dir("agent-check");
        let mut cluster = mainstay_lab::demo::LocalCluster::prepare(
            &dir,
            3,
            Path::new(env!("CARGO_BIN_EXE_mainstay")),
            "default",
        )
        .expect("preparing the cluster");
        let agent_ports: Vec<u16> = (0..3).map(|_| mainstay_testkit::free_port()).collect();
        for (node, port) in cluster.nodes.iter().zip(&agent_ports) {
            let text = std::fs::read_to_string(&node.config).unwrap();
            let text = text.replacen(
                "[api]\n",
                &format!(
                    "[api]\nagent_check_listen = \"127.0.0.1:{port}\"\nagent_check_wait = 0.75\n"
                ),
                1,
            );
            std::fs::write(&node.config, text).unwrap();
        }
        for i in 0..3 {
            cluster.start_agent(i).unwrap();
        }
        let mut h = Harness::adopt(cluster);
        let leader = h.healthy(Duration::from_secs(120)).await;
        let candidate = h.other_than(&leader);
        wait_code(&h, &leader, "/primary", 200, Duration::from_secs(10)).await;

        let stock_port = mainstay_testkit::free_port();
        let agent_port = mainstay_testkit::free_port();
        let stock_dir = h.dir.join("haproxy-stock");
        let agent_dir = h.dir.join("haproxy-agent");
        std::fs::create_dir_all(&stock_dir).unwrap();
        std::fs::create_dir_all(&agent_dir).unwrap();
        let stock = mainstay_testkit::Haproxy::start(
            &stock_dir,
            &haproxy_config(&h, &stock_dir.join("stats.sock"), stock_port, None),
        )
        .expect("starting the stock haproxy");
        let agent = mainstay_testkit::Haproxy::start(
            &agent_dir,
            &haproxy_config(
                &h,
                &agent_dir.join("stats.sock"),
                agent_port,
                Some(&agent_ports),
            ),
        )
        .expect("starting the agent-check haproxy");
        wait_route(&h, stock_port, &leader, Duration::from_secs(30)).await;
        wait_route(&h, agent_port, &leader, Duration::from_secs(30)).await;
        // The agent check answers as documented, for each role.
        let leader_agent = agent_ports[h.cluster.node_index(&leader).unwrap()];
        let candidate_agent = agent_ports[h.cluster.node_index(&candidate).unwrap()];
        for (port, send, want) in [
            (leader_agent, "primary\n", "up"),
            (candidate_agent, "primary\n", "down #not the primary"),
            (candidate_agent, "replica\n", "up"),
            (leader_agent, "", "up"),
            (leader_agent, "writer\n", "fail #unknown role"),
        ] {
            let reply = ask_agent(port, send).await;
            assert!(reply.starts_with(want), "{send:?} on {port}: {reply:?}");
        }

        let stop = Arc::new(AtomicBool::new(false));
        let stock_clients = clients(stock_port, stop.clone());
        let agent_clients = clients(agent_port, stop.clone());
        tokio::time::sleep(Duration::from_secs(2)).await;

        let started = Instant::now();
        let answer = api(&h, &leader)
            .with_basic_auth(
                mainstay_lab::demo::API_USER,
                mainstay_lab::demo::API_PASSWORD,
            )
            .with_timeout(Duration::from_secs(60))
            .request(
                hyper::Method::POST,
                "/switchover",
                Some(&serde_json::json!({"leader": leader, "candidate": candidate})),
            )
            .await
            .expect("the switchover request");
        assert!(answer.status.is_success(), "{}", answer.text);
        let switched_in = started.elapsed();
        // Both load balancers route to the new primary, and the demoted node
        // runs as a replica, before the count ends.
        wait_route(&h, stock_port, &candidate, Duration::from_secs(60)).await;
        wait_route(&h, agent_port, &candidate, Duration::from_secs(60)).await;
        wait_code(&h, &leader, "/replica", 200, Duration::from_secs(30)).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        stop.store(true, Ordering::SeqCst);
        let stock_seen = stock_clients.await.unwrap();
        let agent_seen = agent_clients.await.unwrap();
        eprintln!(
            "switchover {leader} -> {candidate} answered in {switched_in:?}; new read-write \
             connections sent to a read-only node: stock Patroni config {} (of {} writable, {} \
             failed), agent-check config {} (of {} writable, {} failed)",
            stock_seen.read_only.len(),
            stock_seen.writable,
            stock_seen.failed,
            agent_seen.read_only.len(),
            agent_seen.writable,
            agent_seen.failed
        );
        assert!(
            agent_seen.writable > 0 && stock_seen.writable > 0,
            "the clients ran: {agent_seen:?} {stock_seen:?}"
        );
        assert!(
            agent_seen.read_only.is_empty(),
            "behind the agent check, {} new read-write connections reached a read-only node \
             (ports {:?})\n{}",
            agent_seen.read_only.len(),
            agent_seen.read_only,
            agent.log()
        );
        drop(stock);
        drop(agent);
        h.passed = true;
    });
}

/// One agent-check exchange, as HAProxy makes it: send `send`, read the
/// line.
async fn ask_agent(port: u16, send: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        stream.write_all(send.as_bytes()).await?;
        let mut reply = String::new();
        stream.read_to_string(&mut reply).await?;
        Ok::<_, std::io::Error>(reply)
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .expect("the agent check answers within 5 s")
        .expect("the agent check answers")
}
