//! Supervised services in a real cluster: a `with-leader` web server (the
//! stand-in for Synapse, slow to stop like it: every copy binds the same
//! loopback port, so a copy that started while another still ran would fail
//! and be counted as a restart) and an `everywhere` process (the stand-in for coturn), through
//! a switchover, a crash of the leader's whole node, and a service that
//! dies under its supervisor.

mod common;

use common::*;
use mainstay_lab::demo::LocalCluster;
use mainstay_testkit::free_port;
use serde_json::Value;
use std::path::Path;
use std::time::{Duration, Instant};

fn services_config(port: u16, dir: &Path) -> String {
    format!(
        r#"
[[service]]
name = "web"
# Like Synapse, it takes a while to shut down: the port stays bound for
# 1.5 s after the stop signal.
command = ["/bin/sh", "-c", "trap 'sleep 1.5; kill $web; wait $web; exit 0' TERM; /usr/bin/python3 -m http.server {port} --bind 127.0.0.1 --directory {dir} & web=$!; wait $web"]
placement = "with-leader"
stop_grace = 4
[service.restart]
backoff = 0.5
[[service.check]]
kind = "http"
url = "http://127.0.0.1:{port}/"
interval = 0.5
timeout = 0.4
failures = 2

[[service]]
name = "relay"
command = ["/bin/sleep", "100000"]
placement = "everywhere"
[[service.check]]
kind = "process"
interval = 1
timeout = 0.5
"#,
        dir = dir.display()
    )
}

/// A node's services as its REST API reports them.
async fn services(h: &Harness, node: &str) -> Vec<Value> {
    match api(h, node).get("/services").await {
        Ok(answer) if answer.status.is_success() => answer.body["services"]
            .as_array()
            .cloned()
            .unwrap_or_default(),
        _ => Vec::new(),
    }
}

fn find<'a>(services: &'a [Value], name: &str) -> Option<&'a Value> {
    services.iter().find(|s| s["name"] == name)
}

/// Waits until `node` reports `service` in `state`; returns its status.
async fn wait_state(h: &Harness, node: &str, service: &str, state: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut last = Vec::new();
    while Instant::now() < deadline {
        last = services(h, node).await;
        if let Some(status) = find(&last, service)
            && status["state"] == state
        {
            return status.clone();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    h.dump_logs();
    panic!("{node}: {service} never {state}; last seen {last:?}");
}

/// The relay's pid on every node.
async fn relay_pids(h: &Harness, nodes: &[String]) -> Vec<i64> {
    let mut pids = Vec::new();
    for node in nodes {
        let status = wait_state(h, node, "relay", "running").await;
        pids.push(status["pid"].as_i64().expect("a running service has a pid"));
    }
    pids
}

#[test]
fn services_follow_the_leader_and_never_run_twice() {
    cluster_test(async {
        let dir = test_dir("services");
        let port = free_port();
        let mut cluster = LocalCluster::prepare(
            &dir,
            3,
            Path::new(env!("CARGO_BIN_EXE_mainstay")),
            "default",
        )
        .expect("preparing the cluster");
        for node in &cluster.nodes {
            let mut text = std::fs::read_to_string(&node.config).unwrap();
            text.push_str(&services_config(port, &node.dir));
            std::fs::write(&node.config, text).unwrap();
        }
        for i in 0..3 {
            cluster.start_agent(i).expect("starting an agent");
        }
        let mut h = Harness::adopt(cluster);
        let leader = h.healthy(Duration::from_secs(120)).await;
        let names = h.names();
        let web = wait_state(&h, &leader, "web", "running").await;
        assert_eq!(web["restarts"], 0, "{web}");
        assert_eq!(web["placement"], "with-leader");
        for other in names.iter().filter(|n| **n != leader) {
            let theirs = services(&h, other).await;
            assert_eq!(find(&theirs, "web").unwrap()["state"], "stopped", "{other}");
        }
        let relays = relay_pids(&h, &names).await;
        // /patroni carries them too, beside Patroni's own keys.
        let patroni = api(&h, &leader).get("/patroni").await.unwrap().body;
        assert_eq!(patroni["services"][1]["name"], "web", "{patroni}");

        // A planned switchover: the old copy stops before the new one
        // starts (the new one would fail to bind the port otherwise).
        let target = h.other_than(&leader);
        let (code, out, err) = ctl(
            &h,
            &leader,
            true,
            &["switchover", "--candidate", &target, "--force"],
        )
        .await;
        assert_eq!(code, 0, "{out}{err}");
        let web = wait_state(&h, &target, "web", "running").await;
        assert_eq!(
            web["restarts"], 0,
            "the new leader's copy started once: {web}"
        );
        wait_state(&h, &leader, "web", "stopped").await;
        assert_eq!(
            relay_pids(&h, &names).await,
            relays,
            "everywhere services run on through a switchover"
        );

        // The leader's whole node dies: its agent's death makes the guard
        // kill the copy there at once; the next leader starts its own.
        let dead = h.cluster.node_index(&target).unwrap();
        h.cluster.kill_node(dead);
        let survivors: Vec<String> = names.iter().filter(|n| **n != target).cloned().collect();
        let crashed_at = Instant::now();
        let next = h
            .wait_for(
                "a new leader",
                Duration::from_secs(60),
                async |view: &mainstay_core::ClusterView| {
                    view.leader_name()
                        .filter(|l| *l != target)
                        .map(str::to_string)
                },
            )
            .await;
        let web = wait_state(&h, &next, "web", "running").await;
        assert_eq!(web["restarts"], 0, "{web}");
        eprintln!(
            "web answers on {next} {:?} after the crash of {target}",
            crashed_at.elapsed()
        );

        // The service dies under its supervisor: restarted after backoff.
        let pid = web["pid"].as_i64().unwrap() as i32;
        mainstay_sys::process::kill(pid, libc::SIGKILL).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let now = services(&h, &next).await;
            let web = find(&now, "web").cloned().unwrap_or_default();
            if web["state"] == "running" && web["restarts"] == 1 && web["pid"] != pid {
                break;
            }
            assert!(Instant::now() < deadline, "never restarted: {web}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        for node in &survivors {
            let theirs = services(&h, node).await;
            let running = find(&theirs, "web").unwrap()["state"] == "running";
            assert_eq!(running, *node == next, "{node}: {theirs:?}");
        }
        h.passed = true;
    });
}
