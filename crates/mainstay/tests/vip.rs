//! The virtual IP on real hosts: three network namespaces on a private
//! bridge, each with an etcd member, an agent and PostgreSQL, and a client
//! namespace that only ever connects to the VIP. Needs root (CI runs it as
//! root); elsewhere it fails, unless `MAINSTAY_ALLOW_SKIP=1` lets it say it
//! was skipped.

#![forbid(unsafe_code)]

mod common;

use common::*;
use mainstay_lab::demo::{
    LAB_PG_PORT, LAB_PROXY_PORT, LocalCluster, SUPERUSER, SUPERUSER_PASSWORD,
};
use mainstay_testkit::netns::{self, Lab};
use mainstay_testkit::skip;
use std::path::Path;
use std::time::{Duration, Instant};

const VIP: &str = "10.213.0.50";

/// (in recovery, node name from the data directory) of the server a new
/// connection to the VIP on `port` reaches.
async fn through_vip(port: u16) -> Result<(bool, String), String> {
    let conninfo = format!(
        "host={VIP} port={port} user={SUPERUSER} password={SUPERUSER_PASSWORD} dbname=postgres connect_timeout=2"
    );
    let client = connect(&conninfo).await.map_err(|e| e.to_string())?;
    let row = client
        .query_one(
            "SELECT pg_is_in_recovery(), current_setting('data_directory')",
            &[],
        )
        .await
        .map_err(|e| e.to_string())?;
    let data_dir: String = row.get(1);
    let node = data_dir
        .split('/')
        .find(|part| part.starts_with("node"))
        .unwrap_or_default()
        .to_string();
    Ok((row.get(0), node))
}

/// Waits until new connections to the VIP (direct and through the proxy
/// port) reach `leader` as a writable primary; returns the time taken.
async fn vip_reaches(leader: &str, timeout: Duration) -> Duration {
    let started = Instant::now();
    for port in [LAB_PG_PORT, LAB_PROXY_PORT] {
        loop {
            let last = match through_vip(port).await {
                Ok((false, node)) if node == leader => break,
                other => other,
            };
            assert!(
                started.elapsed() < timeout,
                "the VIP (port {port}) does not reach {leader} as primary after {timeout:?}: \
                 last {last:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    started.elapsed()
}

fn vip_holders(h: &Harness) -> Vec<String> {
    let lab = h.cluster.lab.as_ref().unwrap();
    (0..h.cluster.nodes.len())
        .filter(|&i| {
            lab.addresses(i)
                .unwrap_or_default()
                .iter()
                .any(|a| a.starts_with(&format!("{VIP}/")))
        })
        .map(|i| h.cluster.nodes[i].name.clone())
        .collect()
}

/// Waits until exactly `holder` has the VIP on its interface.
async fn only_holder(h: &Harness, holder: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let holders = vip_holders(h);
        if holders == [holder] {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "VIP on {holders:?}, wanted only on {holder} within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn the_vip_follows_the_leader_through_a_crash_and_a_link_loss() {
    if let Some(why) = netns::unavailable() {
        skip(&why);
        return;
    }
    if !prerequisites() {
        return;
    }
    let lab = Lab::create(3).expect("building the network namespaces");
    // This thread, and the runtime's threads it starts, live in the client
    // namespace: every connection the test makes goes over the bridge.
    netns::enter(&format!("/run/netns/{}", lab.client())).unwrap();
    cluster_test(async move {
        let dir = test_dir("vip");
        let cluster = LocalCluster::start_in_lab(
            &dir,
            lab,
            3,
            Path::new(env!("CARGO_BIN_EXE_mainstay")),
            "default",
            &format!("vip = \"{VIP}/24\"\nvip_interface = \"eth0\"\n"),
        )
        .expect("starting the lab cluster");
        let mut h = Harness::adopt(cluster);
        let first = h.healthy(Duration::from_secs(90)).await;
        vip_reaches(&first, Duration::from_secs(30)).await;
        only_holder(&h, &first, Duration::from_secs(10)).await;
        // The holder shows in /cluster and /metrics.
        let cluster_doc = api(&h, &first).get("/cluster").await.unwrap().text;
        assert!(
            cluster_doc.contains(&format!("\"vip\":\"{VIP}/24\"")),
            "{cluster_doc}"
        );
        let metrics = api(&h, &first).get("/metrics").await.unwrap().text;
        assert!(metrics.contains("mainstay_vip_held{"), "{metrics}");

        // The primary host's agent and PostgreSQL die together: the kernel
        // drops the VIP there when the lease runs out, the new leader takes
        // it and announces it, and the client's next connection is there.
        let f = h.cluster.node_index(&first).unwrap();
        let killed_at = Instant::now();
        h.cluster.kill_node(f);
        let second = h
            .wait_for("a new primary", Duration::from_secs(60), async |v| {
                v.leader_status()
                    .filter(|s| s.role == mainstay_core::PgRole::Primary && s.name != first)
                    .map(|s| s.name.clone())
            })
            .await;
        vip_reaches(&second, Duration::from_secs(30)).await;
        let moved_after = killed_at.elapsed();
        only_holder(&h, &second, Duration::from_secs(10)).await;
        h.cluster.start_agent(f).unwrap();
        assert_eq!(h.healthy(Duration::from_secs(90)).await, second);
        only_holder(&h, &second, Duration::from_secs(10)).await;

        // The new primary's cable is pulled: it loses etcd, fences itself
        // and loses the VIP; another node leads and holds it. Once the
        // cable is back, the old leader rejoins without the VIP.
        let s = h.cluster.node_index(&second).unwrap();
        let cut_at = Instant::now();
        h.cluster.lab.as_ref().unwrap().set_link(s, false).unwrap();
        let third = h
            .wait_for(
                "a primary after the link loss",
                Duration::from_secs(60),
                async |v| {
                    v.leader_status()
                        .filter(|st| st.role == mainstay_core::PgRole::Primary && st.name != second)
                        .map(|st| st.name.clone())
                },
            )
            .await;
        vip_reaches(&third, Duration::from_secs(30)).await;
        let moved_after_cut = cut_at.elapsed();
        // The isolated host dropped it by itself (it cannot be asked).
        only_holder(&h, &third, Duration::from_secs(10)).await;
        h.cluster.lab.as_ref().unwrap().set_link(s, true).unwrap();
        assert_eq!(h.healthy(Duration::from_secs(90)).await, third);
        only_holder(&h, &third, Duration::from_secs(10)).await;
        let log = h.agent_log(&second);
        // Removed by the agent, or by the kernel when the lifetime it was
        // given ran out with the lease, whichever came first.
        assert!(
            log.contains("VIP removed") || log.contains("VIP gone"),
            "no removal logged by {second}"
        );
        let (code, listing, err) = run_ctl(&h, &second, &["list"]).await;
        assert_eq!(code, 0, "{err}");
        let holder_row = listing
            .lines()
            .find(|l| l.starts_with(&third))
            .unwrap_or("");
        assert!(holder_row.contains(&format!("{VIP}/24")), "{listing}");

        // A planned switchover: the VIP goes with the leadership.
        let fourth = h.other_than(&third);
        let (code, _, err) = run_ctl(
            &h,
            &third,
            &["switchover", "--candidate", &fourth, "--force"],
        )
        .await;
        assert_eq!(code, 0, "{err}");
        vip_reaches(&fourth, Duration::from_secs(30)).await;
        only_holder(&h, &fourth, Duration::from_secs(10)).await;
        eprintln!(
            "VIP: writable on the new primary {moved_after:?} after the crash of {first}, \
             {moved_after_cut:?} after {second}'s link went down"
        );
        h.passed = true;
    });
}

/// Without CAP_NET_ADMIN and CAP_NET_RAW an agent configured with a VIP
/// refuses to start, says what is missing and how to grant it, and writes
/// nothing.
#[test]
fn an_agent_without_the_capabilities_refuses_to_start() {
    if let Some(why) = netns::unavailable() {
        skip(&why);
        return;
    }
    let dir = test_dir("vip-caps");
    std::fs::create_dir_all(&dir).unwrap();
    let data = dir.join("data");
    let config = dir.join("mainstay.toml");
    std::fs::write(
        &config,
        format!(
            "cluster = \"c\"\nname = \"n1\"\nvip = \"{VIP}/24\"\nvip_interface = \"eth0\"\n\
             [etcd]\nendpoints = [\"http://127.0.0.1:1\"]\n[postgresql]\ndata_dir = \"{}\"\n\
             port = 15432\nsuperuser = {{ username = \"postgres\", password = \"x\" }}\n\
             replication = {{ username = \"r\", password = \"y\" }}\n",
            data.display()
        ),
    )
    .unwrap();
    // Root, minus the two capabilities (dropped from the bounding set).
    let output = std::process::Command::new("setpriv")
        .args([
            "--bounding-set",
            "-net_admin,-net_raw",
            "--inh-caps",
            "-all",
        ])
        .arg(env!("CARGO_BIN_EXE_mainstay"))
        .args(["agent", "--config"])
        .arg(&config)
        .output()
        .expect("setpriv (util-linux)");
    let stderr = String::from_utf8_lossy(&output.stderr);
    // The agent's preflight refuses it (exit 2) before anything is made.
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("CAP_NET_ADMIN and CAP_NET_RAW") && stderr.contains("AmbientCapabilities"),
        "{stderr}"
    );
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        left,
        [std::ffi::OsString::from("mainstay.toml")],
        "files appeared"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
