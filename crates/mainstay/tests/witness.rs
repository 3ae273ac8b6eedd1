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

        // The witness shows as such everywhere, apart from the database
        // members (tools written for Patroni count those), and answers ctl
        // itself.
        let doc = cluster_doc(&h, &first).await.unwrap();
        assert!(!doc["members"].to_string().contains("\"witness\""), "{doc}");
        let witness = doc["witnesses"]
            .as_array()
            .unwrap_or_else(|| panic!("no witnesses in /cluster: {doc}"))
            .iter()
            .find(|m| m["name"] == "witness")
            .cloned()
            .unwrap_or_else(|| panic!("no witness in /cluster: {doc}"));
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
            Some(2),
            "{from_witness}"
        );
        assert_eq!(
            from_witness["witnesses"].as_array().map(Vec::len),
            Some(1),
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

/// Every `*.removed-*` directory beside `dir/etcd`: a member's data moved
/// aside when it joined its cluster again.
fn moved_aside(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|name| name.starts_with("etcd.removed-"))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn recover_alone_brings_the_last_server_back_and_the_others_rejoin_it() {
    let mut options = LabOptions::new(2, "default", "");
    options.managed_etcd = true;
    options.witness = true;
    lab_cluster_test("recover_alone", 3, options, async |mut h| {
        let first = h.healthy(Duration::from_secs(120)).await;
        let l = h.cluster.node_index(&first).unwrap();
        let survivor = h.cluster.nodes[1 - l].name.clone();
        let scope = h.cluster.cluster.clone();
        let leader = h.client(&first).await;
        leader
            .batch_execute("CREATE TABLE log (id int primary key, at text)")
            .await
            .unwrap();
        leader
            .execute("INSERT INTO log VALUES (1, 'before')", &[])
            .await
            .unwrap();

        // Refused, each with its reason, while nothing is wrong.
        let (code, _, err) = run_ctl(&h, &survivor, &["recover-alone", "--confirm", "shipp"]).await;
        assert_eq!(code, 1, "{err}");
        assert!(err.contains("not this cluster's name"), "{err}");
        let (code, _, err) = run_ctl(&h, &survivor, &["recover-alone"]).await;
        assert_eq!(code, 2, "no terminal, no --confirm: {err}");
        let (code, _, err) = run_ctl(&h, &survivor, &["pause"]).await;
        assert_eq!(code, 0, "{err}");
        h.wait_for("the pause to show", Duration::from_secs(10), async |v| {
            v.config.as_ref().filter(|c| c["pause"] == true).map(|_| ())
        })
        .await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (code, _, err) = run_ctl(&h, &survivor, &["recover-alone", "--confirm", &scope]).await;
        assert_eq!(code, 1, "{err}");
        assert!(err.contains("paused"), "{err}");
        let (code, _, err) = run_ctl(&h, &survivor, &["resume"]).await;
        assert_eq!(code, 0, "{err}");
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (code, _, err) = run_ctl(&h, &survivor, &["recover-alone", "--confirm", &scope]).await;
        assert_eq!(code, 1, "{err}");
        assert!(err.contains("has its quorum"), "{err}");
        let etcd = h.cluster.nodes[1 - l]
            .api()
            .get("/etcd/members")
            .await
            .unwrap()
            .body;
        assert_eq!(
            etcd["members"].as_array().map(Vec::len),
            Some(3),
            "a refusal changed etcd: {etcd}"
        );

        // The primary's server and the witness die: no quorum, no leader.
        h.cluster.crash_host(l).unwrap();
        h.cluster.crash_witness().unwrap();
        let ttl = mainstay_agent::config::Config::load(&h.cluster.nodes[0].config)
            .unwrap()
            .timing
            .ttl;
        tokio::time::sleep(ttl * 3).await;
        let survivor_pg = h.client(&survivor).await;
        let in_recovery: bool = survivor_pg
            .query_one("SELECT pg_is_in_recovery()", &[])
            .await
            .unwrap()
            .get(0);
        assert!(in_recovery, "{survivor} promoted itself without a quorum");
        let (_, listing, _) = run_ctl(&h, &survivor, &["list"]).await;
        assert!(listing.contains("NO QUORUM"), "{listing}");

        // The crew's command.
        let at = Instant::now();
        let (code, out, err) =
            run_ctl(&h, &survivor, &["recover-alone", "--confirm", &scope]).await;
        assert_eq!(code, 0, "{out}{err}");
        assert!(out.contains("only etcd member"), "{out}");
        let second = h
            .wait_for("the survivor to lead", Duration::from_secs(60), async |v| {
                v.leader_status()
                    .filter(|s| s.role == mainstay_core::PgRole::Primary && s.name == survivor)
                    .map(|s| s.name.clone())
            })
            .await;
        let writable_after = at.elapsed();
        assert_eq!(second, survivor);
        let survivor_pg = h.client(&survivor).await;
        survivor_pg
            .execute("INSERT INTO log VALUES (2, 'alone')", &[])
            .await
            .unwrap();
        let view = h.view().await;
        let record = view
            .recoveries
            .last()
            .cloned()
            .expect("no recovery recorded");
        assert_eq!(record.node, survivor);
        assert!(record.by.contains('@'), "{record:?}");
        assert!(!record.from.is_empty(), "{record:?}");
        assert_eq!(record.removed.len(), 2, "{record:?}");
        let (code, history, err) = run_ctl(&h, &survivor, &["history"]).await;
        assert_eq!(code, 0, "{err}");
        assert!(
            history.contains("recover-alone") && history.contains(&survivor),
            "{history}"
        );

        // The others come back: their members were removed, they join
        // again (as learners, then voters), and the old primary follows.
        h.cluster.start_witness().unwrap();
        h.cluster.start_agent(l).unwrap();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let etcd = h.cluster.nodes[1 - l].api().get("/etcd/members").await;
            let voters = etcd
                .as_ref()
                .ok()
                .and_then(|a| a.body["members"].as_array().cloned())
                .unwrap_or_default()
                .iter()
                .filter(|m| m["learner"] == false && m["answers"] == true)
                .count();
            if voters == 3 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "etcd is not back to three voting members: {:?}",
                etcd.map(|a| a.body)
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        assert_eq!(h.healthy(Duration::from_secs(120)).await, survivor);
        let old_primary = h.client(&first).await;
        let rows: i64 = old_primary
            .query_one("SELECT count(*) FROM log", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            rows, 2,
            "the old primary does not have the survivor's write"
        );
        assert_eq!(moved_aside(&h.cluster.nodes[l].dir).len(), 1);
        assert_eq!(
            moved_aside(&h.cluster.witness.as_ref().unwrap().dir).len(),
            1
        );
        eprintln!(
            "recover-alone: {survivor} took writes {} ms after the command",
            writable_after.as_millis()
        );
        h.passed = true;
    });
}
