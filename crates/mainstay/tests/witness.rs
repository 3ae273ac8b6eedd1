//! Two data nodes and a witness on real (namespaced) hosts: the witness
//! runs its etcd member and a small API, shows as `witness` in `/cluster`
//! and `ctl list`, gets no replication slot, and gives the replica the
//! quorum it needs to take over when the primary's host dies; alone, it
//! says it has no quorum. Needs root (network namespaces); without it the
//! test fails, unless `MAINSTAY_ALLOW_SKIP=1` lets it say it was skipped.

#![forbid(unsafe_code)]

mod common;

use common::*;
use mainstay_lab::demo::LabOptions;
use mainstay_lab::replicated::proc_status_bytes;
use std::time::{Duration, Instant};

/// Waits until the witness's `/health` answers `code`.
async fn witness_health(h: &Harness, code: u16, timeout: Duration) -> serde_json::Value {
    let witness = h.cluster.witness.as_ref().unwrap();
    let deadline = Instant::now() + timeout;
    loop {
        let answer = witness.api().get("/health").await;
        if let Ok(answer) = &answer
            && answer.status.as_u16() == code
        {
            return answer.body.clone();
        }
        assert!(
            Instant::now() < deadline,
            "the witness's /health is not {code} after {timeout:?}: {:?}",
            answer.map(|a| a.text)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[test]
fn two_data_nodes_and_a_witness_fail_over_and_the_witness_gets_no_slot() {
    let mut options = LabOptions::new(2, "default", "");
    options.managed_etcd = true;
    options.witness = true;
    lab_cluster_test("witness", 3, options, async |mut h| {
        let first = h.healthy(Duration::from_secs(120)).await;
        witness_health(&h, 200, Duration::from_secs(10)).await;

        // The witness shows as such everywhere, and answers ctl itself.
        let doc = cluster_doc(&h, &first).await.unwrap();
        let witness = doc["members"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == "witness")
            .cloned()
            .unwrap_or_else(|| panic!("no witness in /cluster: {doc}"));
        assert_eq!(witness["role"], "witness", "{witness}");
        assert_eq!(witness["state"], "running", "{witness}");
        let (code, listing, err) = run_ctl(&h, &first, &["list"]).await;
        assert_eq!(code, 0, "{err}");
        let row = listing
            .lines()
            .find(|l| l.starts_with("witness"))
            .unwrap_or("");
        assert!(row.contains("witness"), "{listing}");
        let w = h.cluster.witness.as_ref().unwrap();
        let patroni = w.api().get("/patroni").await.unwrap().body;
        assert_eq!(patroni["role"], "witness", "{patroni}");
        let from_witness = w.api().get("/cluster").await.unwrap().body;
        assert_eq!(
            from_witness["members"].as_array().map(Vec::len),
            Some(3),
            "{from_witness}"
        );
        let etcd = w.api().get("/etcd/members").await.unwrap().body;
        assert_eq!(etcd["members"].as_array().map(Vec::len), Some(3), "{etcd}");
        let not_here = w.api().get("/primary").await.unwrap();
        assert_eq!(not_here.status.as_u16(), 404);

        // A parameter change is checked by every data node's server; the
        // witness, which has none, is not asked (it made every change fail).
        let stored = patch_config(
            &h,
            &first,
            serde_json::json!({"postgresql": {"parameters": {"work_mem": "8MB"}}}),
        )
        .await;
        assert_eq!(
            stored["postgresql"]["parameters"]["work_mem"], "8MB",
            "{stored}"
        );

        // No slot for the witness: it would keep WAL forever.
        let leader = h.client(&first).await;
        let slots: Vec<String> = leader
            .query("SELECT slot_name FROM pg_replication_slots", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(slots.len(), 1, "{slots:?}");
        assert!(!slots.iter().any(|s| s.contains("witness")), "{slots:?}");

        // Idle memory of the witness and its etcd member, for the record.
        let witness_pid = w.pid().unwrap();
        let etcd_pid = w.api().get("/etcd/members").await.unwrap().body["local"]["pid"]
            .as_u64()
            .unwrap() as u32;
        let rss = proc_status_bytes(witness_pid, "VmRSS:") + proc_status_bytes(etcd_pid, "VmRSS:");
        eprintln!("witness + its etcd member, idle: {} MB resident", rss >> 20);

        // The primary's host dies: the replica and the witness are a
        // quorum, and the replica takes over.
        let f = h.cluster.node_index(&first).unwrap();
        h.cluster.crash_host(f).unwrap();
        let second = h
            .wait_for(
                "the replica to take over",
                Duration::from_secs(60),
                async |v| {
                    v.leader_status()
                        .filter(|s| s.role == mainstay_core::PgRole::Primary && s.name != first)
                        .map(|s| s.name.clone())
                },
            )
            .await;
        h.cluster.start_agent(f).unwrap();
        assert_eq!(h.healthy(Duration::from_secs(120)).await, second);

        // Stopped cleanly, the witness takes its member key with it; back,
        // it shows again.
        h.cluster.stop_witness();
        h.wait_for(
            "the witness's key to go",
            Duration::from_secs(10),
            async |v| (!v.members.contains_key("witness")).then_some(()),
        )
        .await;
        h.cluster.start_witness().unwrap();
        h.wait_for(
            "the witness's key again",
            Duration::from_secs(30),
            async |v| {
                v.members
                    .get("witness")
                    .filter(|m| m.status.witness)
                    .map(|_| ())
            },
        )
        .await;
        witness_health(&h, 200, Duration::from_secs(30)).await;

        // Alone, the witness has no quorum and says so.
        for i in 0..2 {
            h.cluster.crash_host(i).unwrap();
        }
        let alone = witness_health(&h, 503, Duration::from_secs(30)).await;
        assert!(
            alone["reason"].as_str().unwrap_or("").contains("quorum"),
            "{alone}"
        );
        let log = std::fs::read_to_string(h.cluster.witness.as_ref().unwrap().log()).unwrap();
        assert!(
            log.contains("no quorum"),
            "the witness did not log its lost quorum"
        );
        h.passed = true;
    });
}
