//! Supervised services in a real cluster: a `with-leader` web server (the
//! stand-in for Synapse, slow to stop like it: every copy binds the same
//! loopback port, so a copy that started while another still ran would fail
//! and be counted as a restart) and an `everywhere` process (the stand-in for coturn), through
//! a switchover, a crash of the leader's whole node, and a service that
//! dies under its supervisor.

mod common;

use common::*;
use mainstay_dcs::Dcs;
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

[callbacks]
on_start = ["/bin/sh", "-c", "echo \"$@\" >> {dir}/hooks.log", "hook"]
on_role_change = ["/bin/sh", "-c", "echo \"$@\" >> {dir}/hooks.log", "hook"]
timeout = 5

# Every disk has less than this left: each node raises its disk alert.
[alerts]
data_disk_free_percent = 99.99

# A read-only worker: on replicas only.
[[service]]
name = "reader"
command = ["/bin/sleep", "100000"]
placement = "with-replica"

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

/// Three nodes on loopback, each with the two services.
fn start_with_services(name: &str) -> Harness {
    let port = free_port();
    start_with(name, |node_dir| services_config(port, node_dir))
}

/// Three nodes on loopback, `extra(node's directory)` appended to each
/// node's configuration.
fn start_with(name: &str, extra: impl Fn(&Path) -> String) -> Harness {
    let mut cluster = LocalCluster::prepare(
        &test_dir(name),
        3,
        Path::new(env!("CARGO_BIN_EXE_mainstay")),
        "default",
    )
    .expect("preparing the cluster");
    for node in &cluster.nodes {
        let mut text = std::fs::read_to_string(&node.config).unwrap();
        text.push_str(&extra(&node.dir));
        std::fs::write(&node.config, text).unwrap();
    }
    for i in 0..3 {
        cluster.start_agent(i).expect("starting an agent");
    }
    Harness::adopt(cluster)
}

#[test]
fn services_follow_the_leader_and_never_run_twice() {
    cluster_test(async {
        let mut h = start_with_services("services");
        let leader = h.healthy(Duration::from_secs(120)).await;
        let names = h.names();
        let web = wait_state(&h, &leader, "web", "running").await;
        assert_eq!(web["restarts"], 0, "{web}");
        assert_eq!(web["placement"], "with-leader");
        for other in names.iter().filter(|n| **n != leader) {
            let theirs = services(&h, other).await;
            assert_eq!(find(&theirs, "web").unwrap()["state"], "stopped", "{other}");
            wait_state(&h, other, "reader", "running").await;
        }
        assert_eq!(
            find(&services(&h, &leader).await, "reader").unwrap()["state"],
            "stopped"
        );
        let relays = relay_pids(&h, &names).await;
        // /patroni carries them too, beside Patroni's own keys.
        let patroni = api(&h, &leader).get("/patroni").await.unwrap().body;
        let listed = patroni["services"].as_array().cloned().unwrap_or_default();
        assert_eq!(
            find(&listed, "web").unwrap()["state"],
            "running",
            "{patroni}"
        );

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
        // The read-only worker follows the roles the other way.
        wait_state(&h, &leader, "reader", "running").await;
        wait_state(&h, &target, "reader", "stopped").await;
        // The hooks saw it: every node started, the candidate was promoted.
        let hooks_of = |node: &str| {
            let index = h.cluster.node_index(node).unwrap();
            std::fs::read_to_string(h.cluster.nodes[index].dir.join("hooks.log"))
                .unwrap_or_default()
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !hooks_of(&target).contains("on_role_change primary demo") {
            assert!(Instant::now() < deadline, "{target}: {}", hooks_of(&target));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            hooks_of(&target).starts_with("on_start replica demo\n"),
            "{}",
            hooks_of(&target)
        );
        assert!(
            hooks_of(&leader).starts_with("on_start primary demo\n"),
            "{}",
            hooks_of(&leader)
        );
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

        // What operators see: ctl, /cluster (through the member keys) and
        // the metrics; and an operator's restart.
        let (code, out, err) = ctl(&h, &next, false, &["services"]).await;
        assert_eq!(code, 0, "{err}");
        assert!(
            out.lines().any(|l| l.starts_with(next.as_str())
                && l.contains("web")
                && l.contains("running")),
            "{out}"
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (_, list, _) = ctl(&h, &next, false, &["list"]).await;
            if list.contains("reader=stopped,relay=running,web=running") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "ctl list never showed the services: {list}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let (_, list, _) = ctl(&h, &next, false, &["list"]).await;
        assert!(
            list.contains(&format!("ALERT {next}: {next}'s data disk has")),
            "{list}"
        );
        let metrics = api(&h, &next).get("/metrics").await.unwrap().text;
        assert!(
            metrics.contains(&format!(
                "mainstay_alert{{alert=\"data_disk\",subject=\"{next}\"}} 1"
            )),
            "{metrics}"
        );
        assert!(
            metrics.contains("mainstay_service_up{service=\"web\",placement=\"with-leader\"} 1"),
            "{metrics}"
        );
        assert!(
            metrics.contains(
                "mainstay_service_restarts_total{service=\"web\",placement=\"with-leader\"} 1"
            ),
            "{metrics}"
        );
        let before = wait_state(&h, &next, "web", "running").await;
        let (code, out, err) = ctl(
            &h,
            &next,
            true,
            &["restart-service", &next, "web", "--force"],
        )
        .await;
        assert_eq!(code, 0, "{out}{err}");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let now = services(&h, &next).await;
            let web = find(&now, "web").cloned().unwrap_or_default();
            if web["state"] == "running" && web["pid"] != before["pid"] {
                break;
            }
            assert!(Instant::now() < deadline, "never restarted: {web}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let (code, _, err) = ctl(
            &h,
            &next,
            true,
            &["restart-service", &next, "ghost", "--force"],
        )
        .await;
        assert_eq!(code, 1, "{err}");
        assert!(err.contains("no service \"ghost\""), "{err}");
        h.passed = true;
    });
}

/// The leader's agent freezes (its process group stopped, as Ctrl-Z or a
/// container freeze would): nobody is left to stop its with-leader service,
/// so the service's guard kills it at the node's fencing deadline, before
/// another node can have been promoted and started its own copy.
#[test]
fn a_frozen_leaders_service_dies_before_another_node_starts_its_copy() {
    cluster_test(async {
        let mut h = start_with_services("services-frozen");
        let old = h.healthy(Duration::from_secs(120)).await;
        let web = wait_state(&h, &old, "web", "running").await;
        let old_pid = web["pid"].as_i64().unwrap() as i32;
        let index = h.cluster.node_index(&old).unwrap();
        let agent = h.cluster.agent_pid(index).unwrap() as i32;
        let dcs = h.cluster.dcs().await.unwrap();
        // The agent leads a process group of its own; the guards have
        // sessions of their own and keep running.
        mainstay_sys::process::kill(-agent, libc::SIGSTOP).unwrap();
        let frozen_at = Instant::now();
        let (mut dead_at, mut takeover_at) = (None, None);
        while frozen_at.elapsed() < Duration::from_secs(15)
            && (dead_at.is_none() || takeover_at.is_none())
        {
            if dead_at.is_none() && !mainstay_sys::process::alive(old_pid) {
                dead_at = Some(Instant::now());
            }
            if takeover_at.is_none()
                && let Ok(view) = dcs.read_cluster().await
                && view.leader.as_ref().is_some_and(|l| l.name != old)
            {
                takeover_at = Some(Instant::now());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let next = h
            .wait_for(
                "a new leader",
                Duration::from_secs(30),
                async |view: &mainstay_core::ClusterView| {
                    view.leader_name().filter(|l| *l != old).map(str::to_string)
                },
            )
            .await;
        let web = wait_state(&h, &next, "web", "running").await;
        mainstay_sys::process::kill(-agent, libc::SIGCONT).unwrap();
        let dead_at = dead_at.expect("the frozen leader's service was never stopped");
        let takeover_at = takeover_at.expect("no other node took the lead");
        eprintln!(
            "agent frozen: its with-leader service killed after {:?}, new leader after {:?}",
            dead_at - frozen_at,
            takeover_at - frozen_at
        );
        assert!(
            dead_at <= takeover_at,
            "the frozen leader's service still ran when another node led"
        );
        assert_eq!(web["restarts"], 0, "the new copy started once: {web}");
        let log =
            std::fs::read_to_string(h.cluster.nodes[index].dir.join(format!("{old}.web.log")))
                .unwrap_or_default();
        assert!(
            log.contains("fenced service web"),
            "the guard's line is missing: {log}"
        );
        // Thawed, the old leader rejoins as a replica without its copy.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let theirs = services(&h, &old).await;
            if find(&theirs, "web").is_some_and(|w| w["state"] == "stopped") {
                break;
            }
            assert!(Instant::now() < deadline, "{old}: {theirs:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        h.passed = true;
    });
}

/// A with-leader service that cannot run anywhere, with `on_failure =
/// "failover"`: it gives up on the first leader, which hands leadership to
/// a replica; it gives up there too, and the cluster stops moving and says
/// so: one switchover, never a loop.
#[test]
fn a_service_that_keeps_failing_moves_leadership_once() {
    cluster_test(async {
        let mut h = start_with("services-doomed", |_| {
            r#"
[[service]]
name = "doomed"
command = ["/bin/sh", "-c", "echo cannot start; exit 3"]
placement = "with-leader"
on_failure = "failover"
[service.restart]
backoff = 0.2
limit = 1
window = 600
"#
            .to_string()
        });
        let first = h.healthy(Duration::from_secs(120)).await;
        wait_state(&h, &first, "doomed", "failed").await;
        let second = h
            .wait_for(
                "leadership handed over",
                Duration::from_secs(60),
                async |view: &mainstay_core::ClusterView| {
                    view.leader_name()
                        .filter(|l| *l != first)
                        .map(str::to_string)
                },
            )
            .await;
        let failed = wait_state(&h, &second, "doomed", "failed").await;
        assert_eq!(failed["restarts"], 2, "{failed}");
        // The first leader keeps it failed while it is not placed there.
        assert_eq!(
            find(&services(&h, &first).await, "doomed").unwrap()["state"],
            "failed"
        );
        // No second move: the leader stays for several loops.
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let view = h.view().await;
            assert_eq!(view.leader_name(), Some(second.as_str()), "moved again");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let view = h.view().await;
        let moves = view
            .history
            .iter()
            .filter(|e| e.reason == "switchover")
            .count();
        assert_eq!(moves, 1, "{:?}", view.history);
        let log = h.agent_log(&second);
        assert!(
            log.contains("two nodes in a row"),
            "the refusal is not logged"
        );
        let log = h.agent_log(&first);
        assert!(
            log.contains(&format!("handing leadership to {second}")),
            "the move is not logged"
        );
        h.passed = true;
    });
}
