//! Agents that run their host's etcd member themselves (`[etcd] member =
//! true`), on real (namespaced) hosts: the three members form etcd, the
//! cluster bootstraps on it, a crashed host's member goes with it and the
//! others keep a quorum, and the dead member is replaced through
//! `mainstay ctl etcd-member` by the same node coming back with a new etcd
//! data directory. Needs root (network namespaces); without it the test
//! fails, unless `MAINSTAY_ALLOW_SKIP=1` lets it say it was skipped.

#![forbid(unsafe_code)]

mod common;

use common::*;
use mainstay_lab::demo::{LAB_ETCD_PEER_PORT, LabOptions};
use serde_json::Value;
use std::time::{Duration, Instant};

async fn members(h: &Harness, node: &str) -> Value {
    let answer = api(h, node).get("/etcd/members").await.unwrap();
    assert_eq!(answer.status, 200, "{}", answer.text);
    answer.body
}

/// Waits until `node`'s API lists exactly `names` as etcd members, each
/// answering.
async fn wait_members(h: &Harness, node: &str, names: &[&str], timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let doc = api(h, node).get("/etcd/members").await;
        if let Ok(answer) = &doc {
            let doc = &answer.body;
            let mut listed: Vec<&str> = doc["members"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|m| m["answers"] == true)
                .filter_map(|m| m["name"].as_str())
                .collect();
            listed.sort();
            let total = doc["members"].as_array().map_or(0, Vec::len);
            if listed == names && total == names.len() {
                return doc.clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "etcd members are not {names:?} (each answering) after {timeout:?}: {:?}",
            doc.map(|a| a.text)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every node streams from `leader` again, and etcd has its three members.
async fn whole_again(h: &Harness, leader: &str) {
    assert_eq!(h.healthy(Duration::from_secs(120)).await, leader);
    let all = ["node1", "node2", "node3"];
    wait_members(h, leader, &all, Duration::from_secs(30)).await;
}

#[test]
fn agents_run_their_own_etcd_members_and_a_dead_nodes_member_is_replaced() {
    let mut options = LabOptions::new(3, "default", "");
    options.managed_etcd = true;
    lab_cluster_test("etcd-member", 3, options, async |mut h| {
        let first = h.healthy(Duration::from_secs(120)).await;

        // Each agent runs its member as its own child.
        let doc = wait_members(
            &h,
            "node1",
            &["node1", "node2", "node3"],
            Duration::from_secs(10),
        )
        .await;
        for i in 0..3 {
            let name = h.cluster.nodes[i].name.clone();
            let local = members(&h, &name).await["local"].clone();
            let pid = local["pid"]
                .as_i64()
                .unwrap_or_else(|| panic!("{name}: {local}")) as i32;
            assert_eq!(
                mainstay_testkit::crash::parent_of(pid),
                h.cluster.agent_pid(i).map(|p| p as i32),
                "{name}'s etcd is not its agent's child"
            );
            assert_eq!(local["starts"], 1, "{name}: {local}");
        }
        assert_eq!(
            doc["members"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|m| m["leader"] == true)
                .count(),
            1,
            "{doc}"
        );
        let (code, listing, err) = run_ctl(&h, "node2", &["etcd-member", "list"]).await;
        assert_eq!(code, 0, "{err}");
        for name in ["node1", "node2", "node3"] {
            assert!(listing.contains(name), "{listing}");
        }
        // A member that answers is not removed by mistake, and a second
        // member on a taken peer URL is refused; nothing changes.
        let other = h.other_than(&first);
        let (code, _, err) =
            run_ctl(&h, &first, &["etcd-member", "remove", &other, "--force"]).await;
        assert_eq!(code, 1, "{err}");
        assert!(err.contains("agent runs"), "{err}");
        let taken = format!("http://{}:{LAB_ETCD_PEER_PORT}", h.cluster.nodes[0].host);
        let (code, _, err) = run_ctl(
            &h,
            &first,
            &["etcd-member", "add", "node9", &taken, "--force"],
        )
        .await;
        assert_eq!(code, 1, "{err}");
        assert!(err.contains("already"), "{err}");
        let (code, _, err) = run_ctl(
            &h,
            &first,
            &[
                "etcd-member",
                "add",
                "node9",
                "http://node9:2380",
                "--force",
            ],
        )
        .await;
        assert_eq!(code, 1, "{err}");
        assert!(err.contains("ADDRESS:PORT"), "{err}");
        wait_members(
            &h,
            &first,
            &["node1", "node2", "node3"],
            Duration::from_secs(5),
        )
        .await;

        // The leader's host loses power, its etcd member with it: the two
        // others keep etcd's quorum and elect a new primary.
        let f = h.cluster.node_index(&first).unwrap();
        h.cluster.crash_host(f).unwrap();
        let second = h
            .wait_for("a new primary", Duration::from_secs(60), async |v| {
                v.leader_status()
                    .filter(|s| s.role == mainstay_core::PgRole::Primary && s.name != first)
                    .map(|s| s.name.clone())
            })
            .await;
        let doc = members(&h, &second).await;
        let dead = doc["members"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == first.as_str())
            .cloned()
            .unwrap();
        assert_eq!(dead["answers"], false, "{doc}");

        // Replacing the dead member: remove it, let the node's new member
        // in, and start the node with a fresh etcd directory (the old one
        // moved aside, never deleted) joining the running cluster.
        let (code, out, err) =
            run_ctl(&h, &second, &["etcd-member", "remove", &first, "--force"]).await;
        assert_eq!(code, 0, "{out}{err}");
        let survivors: Vec<String> = h.names().into_iter().filter(|n| n != &first).collect();
        let mut expected: Vec<&str> = survivors.iter().map(String::as_str).collect();
        expected.sort();
        wait_members(&h, &second, &expected, Duration::from_secs(10)).await;
        let peer_url = format!("http://{}:{LAB_ETCD_PEER_PORT}", h.cluster.nodes[f].host);
        let (code, out, err) = run_ctl(
            &h,
            &second,
            &["etcd-member", "add", &first, &peer_url, "--force"],
        )
        .await;
        assert_eq!(code, 0, "{out}{err}");
        assert!(
            out.contains("initial_cluster_state = \"existing\""),
            "{out}"
        );
        assert!(out.contains(&format!("{first} = \"{peer_url}\"")), "{out}");
        let node_dir = h.cluster.nodes[f].dir.clone();
        std::fs::rename(node_dir.join("etcd"), node_dir.join("etcd.replaced")).unwrap();
        let config_path = h.cluster.nodes[f].config.clone();
        let config = std::fs::read_to_string(&config_path).unwrap();
        std::fs::write(
            &config_path,
            config.replace(
                "member = true\n",
                "member = true\ninitial_cluster_state = \"existing\"\n",
            ),
        )
        .unwrap();
        h.cluster.start_agent(f).unwrap();
        whole_again(&h, &second).await;
        assert!(node_dir.join("etcd.replaced/member").is_dir());

        // An agent killed outright takes its member with it (no orphan
        // etcd holding the ports when the node's service restarts).
        let r = h.cluster.node_index(&h.other_than(&second)).unwrap();
        let replica = h.cluster.nodes[r].name.clone();
        let etcd_pid = members(&h, &replica).await["local"]["pid"]
            .as_i64()
            .unwrap() as i32;
        h.cluster.kill_node(r);
        let deadline = Instant::now() + Duration::from_secs(15);
        while !mainstay_testkit::crash::gone(etcd_pid) {
            assert!(
                Instant::now() < deadline,
                "etcd {etcd_pid} outlived its killed agent"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        h.cluster.start_agent(r).unwrap();
        whole_again(&h, &second).await;
        h.passed = true;
    });
}
