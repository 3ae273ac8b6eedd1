//! Whole clusters against real etcd and PostgreSQL 15 on loopback: the
//! `mainstay` binary runs as separate agent processes, exactly as deployed.
//! Each test has its own directory (on tmpfs when available), free ports, and
//! a `LocalCluster` whose Drop kills every process by PID, even on failure.
//! Tests run one at a time: leases are timing, and two clusters on two cores
//! would measure the machine, not mainstay.

#![forbid(unsafe_code)]

mod common;

use common::*;
use mainstay_core::{ClusterView, Lsn, PgRole};
use mainstay_sys::process;
use std::time::{Duration, Instant};
use tokio_postgres::Client;

async fn count_rows(client: &Client, table: &str) -> i64 {
    client
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .unwrap()
        .get(0)
}

async fn wait_rows(h: &Harness, node: &str, table: &str, expected: i64) {
    let client = h.client(node).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let n = client
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .map(|r| r.get::<_, i64>(0));
        if n.as_ref().is_ok_and(|n| *n == expected) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{node} has {n:?} rows in {table}, expected {expected}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn three_nodes_bootstrap_and_replicate() {
    cluster_test(async {
        let mut h = Harness::start("bootstrap", 3);
        let leader = h.healthy(Duration::from_secs(60)).await;
        let view = h.view().await;
        let init = view.initialize.expect("initialize key");
        assert!(init.system_id.is_some(), "system identifier recorded");
        let primary = h.client(&leader).await;
        let checksums: String = primary
            .query_one("SHOW data_checksums", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(checksums, "on");
        primary
            .batch_execute(
                "CREATE TABLE t (id int primary key); INSERT INTO t SELECT generate_series(1, 100)",
            )
            .await
            .unwrap();
        for node in h.names() {
            wait_rows(&h, &node, "t", 100).await;
            if node != leader {
                let c = h.client(&node).await;
                let in_recovery: bool = c
                    .query_one("SELECT pg_is_in_recovery()", &[])
                    .await
                    .unwrap()
                    .get(0);
                assert!(in_recovery, "{node} is a replica");
            }
        }
        // One slot per replica on the primary.
        let slots: i64 = primary
        .query_one("SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'mainstay_%' AND active", &[])
        .await
        .unwrap()
        .get(0);
        assert_eq!(slots, 2);
        // The password file the agent writes is private.
        use std::os::unix::fs::PermissionsExt;
        for node in &h.cluster.nodes {
            let pgpass = node.dir.join(format!("{}.pgpass", node.name));
            let mode = std::fs::metadata(&pgpass)
                .expect("pgpass written")
                .permissions()
                .mode()
                & 0o777;
            assert_eq!(mode, 0o600, "{}", pgpass.display());
            let log = std::fs::read_to_string(node.agent_log()).unwrap();
            assert!(
                !log.contains(mainstay_lab::demo::SUPERUSER_PASSWORD)
                    && !log.contains("demo-replication-secret")
            );
        }
        let raw = serde_json::to_string(
            &h.view()
                .await
                .members
                .values()
                .map(|m| &m.status)
                .collect::<Vec<_>>(),
        )
        .unwrap();
        assert!(!raw.contains("secret"), "no secret in the DCS");
        h.passed = true;
    });
}

#[test]
fn kill9_of_the_primary_fails_over_and_the_old_primary_rejoins() {
    cluster_test(async {
        let mut h = Harness::start("failover", 3);
        let old = h.healthy(Duration::from_secs(60)).await;
        let primary = h.client(&old).await;
        primary
            .batch_execute("CREATE TABLE w (id int primary key, lsn pg_lsn)")
            .await
            .unwrap();
        // Each row remembers a WAL position at or after its commit.
        let mut acknowledged = Vec::new();
        for id in 0..300 {
            primary
                .execute("INSERT INTO w VALUES ($1, NULL)", &[&id])
                .await
                .unwrap();
            let lsn: String = primary
                .query_one("SELECT pg_current_wal_lsn()::text", &[])
                .await
                .unwrap()
                .get(0);
            acknowledged.push((id, Lsn::parse(&lsn).unwrap()));
        }
        // Sample what each replica holds, then crash the primary's server.
        let mut received = std::collections::BTreeMap::new();
        for node in h
            .cluster
            .nodes
            .iter()
            .map(|n| n.name.clone())
            .filter(|n| *n != old)
            .collect::<Vec<_>>()
        {
            let c = h.client(&node).await;
            let lsn: String = c
                .query_one("SELECT pg_last_wal_receive_lsn()::text", &[])
                .await
                .unwrap()
                .get(0);
            received.insert(node, Lsn::parse(&lsn).unwrap());
        }
        let old_index = h.cluster.node_index(&old).unwrap();
        let killed_at = Instant::now();
        h.cluster.kill_node(old_index);
        let new = h
            .wait_for(
                "a new primary",
                Duration::from_secs(30),
                async |view: &ClusterView| {
                    let leader = view.leader_status()?;
                    (leader.name != old && leader.role == PgRole::Primary)
                        .then(|| leader.name.clone())
                },
            )
            .await;
        let client = h.client(&new).await;
        client
            .execute("INSERT INTO w VALUES (1000, NULL)", &[])
            .await
            .expect("the new primary accepts writes");
        let took = killed_at.elapsed();
        eprintln!("failover: {new} accepted a write {took:?} after the kill");
        assert!(took < Duration::from_secs(15), "failover took {took:?}");
        let sampled = received[&new];
        for (id, lsn) in acknowledged.iter().filter(|(_, lsn)| *lsn <= sampled) {
            let found: i64 = client
                .query_one("SELECT count(*) FROM w WHERE id = $1", &[id])
                .await
                .unwrap()
                .get(0);
            assert_eq!(
                found, 1,
                "row {id} (committed by {lsn}, replica had {sampled}) is missing"
            );
        }
        // The old primary comes back as a replica of the new one, without a clone.
        h.cluster.start_agent(old_index).unwrap();
        h.healthy(Duration::from_secs(60)).await;
        let rows = count_rows(&client, "w").await;
        wait_rows(&h, &old, "w", rows).await;
        let log = h.agent_log(&old);
        let second_run = log.rsplit("agent starting").next().unwrap();
        assert!(
            !second_run.contains("pg_basebackup starting"),
            "the old primary was re-cloned"
        );
        h.passed = true;
    });
}

#[test]
fn a_diverged_former_primary_is_rewound() {
    cluster_test(async {
        let mut h = Harness::start("rewind", 3);
        let old = h.healthy(Duration::from_secs(60)).await;
        let primary = h.client(&old).await;
        primary
            .batch_execute("CREATE TABLE r (id int primary key, origin text)")
            .await
            .unwrap();
        primary
            .execute(
                "INSERT INTO r SELECT g, 'shared' FROM generate_series(1, 50) g",
                &[],
            )
            .await
            .unwrap();
        let replicas: Vec<String> = h
            .cluster
            .nodes
            .iter()
            .map(|n| n.name.clone())
            .filter(|n| *n != old)
            .collect();
        for node in &replicas {
            wait_rows(&h, node, "r", 50).await;
        }
        // Freeze the primary's WAL senders: what it writes now, no replica
        // receives. That is the divergence pg_rewind must undo.
        let senders: Vec<i32> = primary
            .query("SELECT pid FROM pg_stat_replication", &[])
            .await
            .unwrap()
            .iter()
            .map(|row| row.get(0))
            .collect();
        assert_eq!(senders.len(), 2);
        for pid in &senders {
            let _ = process::kill(*pid, libc::SIGSTOP);
        }
        primary
            .execute(
                "INSERT INTO r SELECT g, 'lost' FROM generate_series(1000, 1100) g",
                &[],
            )
            .await
            .unwrap();
        primary.batch_execute("CHECKPOINT").await.unwrap();
        let old_index = h.cluster.node_index(&old).unwrap();
        h.cluster.kill_node(old_index);
        for pid in &senders {
            let _ = process::kill(*pid, libc::SIGKILL);
        }
        let new = h
            .wait_for(
                "a new primary",
                Duration::from_secs(30),
                async |view: &ClusterView| {
                    let leader = view.leader_status()?;
                    (leader.name != old && leader.role == PgRole::Primary)
                        .then(|| leader.name.clone())
                },
            )
            .await;
        let client = h.client(&new).await;
        client
            .execute("INSERT INTO r VALUES (5000, 'new primary')", &[])
            .await
            .unwrap();
        assert_eq!(count_rows(&client, "r").await, 51);
        h.cluster.start_agent(old_index).unwrap();
        h.healthy(Duration::from_secs(90)).await;
        wait_rows(&h, &old, "r", 51).await;
        let log = h.agent_log(&old);
        assert!(
            log.contains("running pg_rewind"),
            "pg_rewind did not run:\n{log}"
        );
        let moved: Vec<_> = std::fs::read_dir(&h.cluster.nodes[old_index].dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with("data."))
            .collect();
        assert!(moved.is_empty(), "rewind should not need a re-clone");
        h.passed = true;
    });
}

#[test]
fn a_restarted_replica_rejoins_without_a_basebackup() {
    cluster_test(async {
        let mut h = Harness::start("replica-restart", 2);
        let leader = h.healthy(Duration::from_secs(60)).await;
        let replica = h.other_than(&leader);
        let index = h.cluster.node_index(&replica).unwrap();
        assert!(
            h.cluster.stop_agent(index, Duration::from_secs(30)),
            "clean stop"
        );
        assert!(
            h.cluster.nodes[index].postmaster_pid().is_none(),
            "PostgreSQL stops with its agent"
        );
        let primary = h.client(&leader).await;
        primary
            .batch_execute("CREATE TABLE later (id int); INSERT INTO later VALUES (1), (2)")
            .await
            .unwrap();
        h.cluster.start_agent(index).unwrap();
        h.healthy(Duration::from_secs(60)).await;
        wait_rows(&h, &replica, "later", 2).await;
        let log = h.agent_log(&replica);
        assert_eq!(
            log.matches("pg_basebackup starting").count(),
            1,
            "cloned only once"
        );
        h.passed = true;
    });
}

#[test]
fn sigterm_of_the_primary_agent_hands_leadership_over() {
    cluster_test(async {
        let mut h = Harness::start("handover", 3);
        let old = h.healthy(Duration::from_secs(60)).await;
        let index = h.cluster.node_index(&old).unwrap();
        let stopped_at = Instant::now();
        assert!(
            h.cluster.stop_agent(index, Duration::from_secs(30)),
            "clean stop"
        );
        let new = h
            .wait_for(
                "a new primary",
                Duration::from_secs(20),
                async |view: &ClusterView| {
                    let leader = view.leader_status()?;
                    (leader.name != old && leader.role == PgRole::Primary)
                        .then(|| leader.name.clone())
                },
            )
            .await;
        let took = stopped_at.elapsed();
        eprintln!("handover to {new} took {took:?}");
        // No waiting for the lease to run out.
        assert!(took < Duration::from_secs(4), "handover took {took:?}");
        let log = h.agent_log(&old);
        assert!(
            log.contains("released the leader key"),
            "the old leader did not hand the key over:\n{log}"
        );
        // A SIGTERM that arrives while the agent is still starting up is
        // handled too, not left to the default action that kills it.
        h.cluster.start_agent(index).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            h.cluster.stop_agent(index, Duration::from_secs(30)),
            "an agent stopped right after its start exits cleanly"
        );
        h.passed = true;
    });
}

#[test]
fn bad_configuration_files_are_refused_and_change_nothing() {
    let dir = test_dir("badconfig");
    std::fs::create_dir_all(&dir).unwrap();
    let data = dir.join("node").join("data");
    let base = format!(
        "cluster = \"c\"\nname = \"n1\"\n[etcd]\nendpoints = [\"http://127.0.0.1:1\"]\n[postgresql]\ndata_dir = \"{}\"\n\
         superuser = {{ username = \"postgres\", password = \"x\" }}\nreplication = {{ username = \"rep\", password = \"y\" }}\n",
        data.display()
    );
    let cases: &[(&str, &str)] = &[
        ("this is not toml", "expected"),
        ("cluster = \"c\"\n", "missing field"),
        ("[timing]\nttl = 1\n", "timing.ttl"),
        (
            "[timing]\nttl = 6\nrenew_interval = 1.5\ndcs_timeout = 2.5\nfencing_margin = 2\n",
            "`timing`",
        ),
        ("[timing]\nloop_wait = \"fast\"\n", "invalid type"),
        ("surprise = true\n", "unknown field"),
    ];
    let exe = env!("CARGO_BIN_EXE_mainstay");
    for (i, (extra, needle)) in cases.iter().enumerate() {
        // The first two cases are whole files of their own.
        let text = if i < 2 {
            extra.to_string()
        } else {
            format!("{base}{extra}")
        };
        let file = dir.join(format!("bad{i}.toml"));
        std::fs::write(&file, &text).unwrap();
        for args in [vec!["config", "check"], vec!["agent", "--config"]] {
            let out = std::process::Command::new(exe)
                .args(&args)
                .arg(&file)
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{args:?} {text:?}: {stderr}");
            assert!(
                stderr.contains(needle),
                "{args:?} {text:?}: {stderr} lacks {needle}"
            );
            assert_eq!(
                stderr
                    .trim()
                    .lines()
                    .filter(|l| l.starts_with("error"))
                    .count(),
                1,
                "{stderr}"
            );
        }
    }
    let missing = std::process::Command::new(exe)
        .args(["config", "check", "/nonexistent/mainstay.toml"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("cannot read"));
    assert!(
        !data.exists() && !dir.join("node").exists(),
        "nothing created on disk"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Whether a fresh connection to `node` can write right now.
async fn writable(h: &Harness, node: &str) -> bool {
    let i = h.cluster.node_index(node).unwrap();
    let conninfo = format!("{} connect_timeout=1", h.cluster.nodes[i].conninfo());
    let attempt = async {
        let client = connect(&conninfo).await.ok()?;
        let row = client
            .query_one("SELECT pg_is_in_recovery()", &[])
            .await
            .ok()?;
        Some(!row.get::<_, bool>(0))
    };
    tokio::time::timeout(Duration::from_secs(2), attempt)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

/// The leader, once its PostgreSQL really accepts writes.
async fn writable_primary(h: &Harness, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        assert!(
            Instant::now() < deadline,
            "no writable primary within {timeout:?}"
        );
        let view = h.view().await;
        if let Some(leader) = view.leader_name()
            && writable(h, leader).await
        {
            return leader.to_string();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn a_primary_cut_off_from_etcd_stops_writing_before_its_lease_can_expire() {
    cluster_test(async {
        let mut h = Harness::start("fence", 3);
        let leader = h.healthy(Duration::from_secs(60)).await;
        assert!(writable(&h, &leader).await);
        let index = h.cluster.node_index(&leader).unwrap();
        let postmaster = h.cluster.nodes[index]
            .postmaster_pid()
            .expect("postmaster running");
        // Freeze etcd: no renewal can succeed from now on.
        h.cluster.etcd[0].pause().unwrap();
        let frozen_at = Instant::now();
        let deadline = frozen_at + Duration::from_secs(10);
        while h.cluster.nodes[index].postmaster_pid() == Some(postmaster) {
            assert!(
                Instant::now() < deadline,
                "the primary still runs 10 s after etcd froze"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let fenced_after = frozen_at.elapsed();
        eprintln!("fenced {fenced_after:?} after etcd froze");
        // The lease (4 s) was renewed at most 1 s before the freeze: the
        // fencing deadline (sent + ttl - margin) falls before any expiry.
        assert!(
            fenced_after < Duration::from_secs(4),
            "fenced only after {fenced_after:?}"
        );
        // While etcd stays frozen nobody may write: the agent must not
        // restart its primary without a confirmed lease.
        tokio::time::sleep(Duration::from_secs(2)).await;
        for node in h.names() {
            assert!(
                !writable(&h, &node).await,
                "{node} accepts writes while etcd is frozen"
            );
        }
        h.cluster.etcd[0].resume().unwrap();
        // Statuses published before the freeze are still in etcd: write for
        // real to find the primary.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            assert!(
                Instant::now() < deadline,
                "no writable primary 60 s after etcd came back"
            );
            let leader = writable_primary(&h, Duration::from_secs(60)).await;
            let i = h.cluster.node_index(&leader).unwrap();
            if let Ok(client) = connect(&h.cluster.nodes[i].conninfo()).await
                && client
                    .batch_execute("CREATE TABLE IF NOT EXISTS after_freeze (id int)")
                    .await
                    .is_ok()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        h.healthy(Duration::from_secs(60)).await;
        h.passed = true;
    });
}

/// The failed attempts moved aside next to every node's data directory.
fn failed_bootstraps(h: &Harness) -> usize {
    h.cluster
        .nodes
        .iter()
        .flat_map(|node| std::fs::read_dir(&node.dir).unwrap())
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("data.failed_bootstrap.")
        })
        .count()
}

#[test]
fn a_failed_bootstrap_is_moved_aside_and_retried_with_a_growing_wait() {
    cluster_test(async {
        let dir = test_dir("bootstrap-retry");
        let cluster = mainstay_lab::demo::LocalCluster::prepare(
            &dir,
            2,
            std::path::Path::new(env!("CARGO_BIN_EXE_mainstay")),
            "default",
        )
        .unwrap();
        let mut h = Harness::adopt(cluster);
        // An operator's typo on both nodes: initdb works, the first start
        // does not.
        let config = h.cluster.nodes[0].config.clone();
        let good = std::fs::read_to_string(&config).unwrap();
        for node in &h.cluster.nodes {
            let text = std::fs::read_to_string(&node.config).unwrap();
            let bad = text.replace(
                "max_connections = \"50\"",
                "max_connections = \"50\", shared_preload_libraries = \"no_such_library\"",
            );
            assert_ne!(text, bad);
            std::fs::write(&node.config, bad).unwrap();
        }
        h.cluster.start_agent(0).unwrap();
        h.cluster.start_agent(1).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while failed_bootstraps(&h) == 0 {
            assert!(Instant::now() < deadline, "no failed bootstrap moved aside");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let first = Instant::now();
        let revision = h.view().await.revision;
        // Each node claims again after 5 s, then 10 s: not a data directory
        // a turn. The other node may try once meanwhile.
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(failed_bootstraps(&h) <= 2, "retried without waiting");
        // Nobody can lead, yet the members do not keep waking each other
        // with writes (a few a second, not hundreds).
        let writes = h.view().await.revision - revision;
        assert!(writes < 40, "{writes} etcd writes in 3 s while leaderless");
        while failed_bootstraps(&h) < 4 {
            assert!(
                first.elapsed() < Duration::from_secs(30),
                "the bootstrap was not retried"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let logs = h.agent_log("node1") + &h.agent_log("node2");
        assert!(logs.contains("claims it again in 5 s"), "{logs}");
        assert!(logs.contains("claims it again in 10 s"), "{logs}");
        // Fixed and restarted, a node bootstraps into a fresh directory;
        // the failed attempts stay where they are.
        assert!(h.cluster.stop_agent(0, Duration::from_secs(30)));
        assert!(h.cluster.stop_agent(1, Duration::from_secs(30)));
        let moved = failed_bootstraps(&h);
        std::fs::write(&config, good).unwrap();
        h.cluster.start_agent(0).unwrap();
        h.wait_for(
            "node1 to bootstrap and lead",
            Duration::from_secs(60),
            async |view: &ClusterView| {
                let leader = view.leader_status()?;
                (leader.name == "node1"
                    && leader.role == PgRole::Primary
                    && view.initialize.as_ref()?.system_id.is_some())
                .then_some(())
            },
        )
        .await;
        assert_eq!(failed_bootstraps(&h), moved);
        h.passed = true;
    });
}

#[test]
fn a_wiped_dcs_is_rebuilt_from_the_data_never_reinitialized() {
    cluster_test(async {
        let mut h = Harness::start("wiped", 2);
        let leader = h.healthy(Duration::from_secs(60)).await;
        let system_id = h.view().await.initialize.unwrap().system_id.unwrap();
        let client = h.client(&leader).await;
        client
            .batch_execute("CREATE TABLE keep (id int); INSERT INTO keep VALUES (1), (2), (3)")
            .await
            .unwrap();
        drop(client);
        // The dynamic configuration goes with the keys; the agents keep
        // what they ran with and write it back.
        common::patch_config(&h, &leader, serde_json::json!({ "synchronous_mode": true })).await;
        common::wait_sync_standby(&h, Duration::from_secs(30)).await;
        let dcs = h.cluster.dcs().await.unwrap();
        let mut raw = dcs.client().await.unwrap();
        raw.delete(
            "/mainstay/demo/",
            Some(etcd_client::DeleteOptions::new().with_prefix()),
        )
        .await
        .unwrap();
        let registered = h
            .wait_for(
                "the cluster record to come back",
                Duration::from_secs(30),
                async |view: &ClusterView| {
                    view.initialize.as_ref().and_then(|i| i.system_id.clone())
                },
            )
            .await;
        assert_eq!(
            registered, system_id,
            "re-registered from the data, same system"
        );
        let old_primary = leader;
        let leader = h.healthy(Duration::from_secs(60)).await;
        // Only the old primary's data may lead first: a replica cannot
        // know what it acknowledged. Once it leads, the mark is cleared.
        assert_eq!(
            leader, old_primary,
            "a replica led first on registered data"
        );
        let record = h
            .wait_for(
                "the first leader to clear the mark",
                Duration::from_secs(10),
                async |view: &ClusterView| {
                    view.initialize
                        .clone()
                        .filter(|init| !init.awaiting_first_leader)
                },
            )
            .await;
        assert_eq!(record.system_id.as_deref(), Some(system_id.as_str()));
        let config = h.view().await.config;
        assert_eq!(
            config.as_ref().map(|c| c["synchronous_mode"].clone()),
            Some(serde_json::json!(true)),
            "the dynamic configuration written back: {config:?}"
        );
        let client = h.client(&leader).await;
        assert_eq!(count_rows(&client, "keep").await, 3);
        let initdbs: usize = h
            .cluster
            .nodes
            .iter()
            .map(|n| {
                h.agent_log(&n.name)
                    .matches("initializing a new cluster")
                    .count()
            })
            .sum();
        assert_eq!(initdbs, 1, "only the original bootstrap ran initdb");
        h.passed = true;
    });
}

#[test]
fn a_crashed_primary_postgres_is_recovered_without_waiting_for_the_lease() {
    cluster_test(async {
        let mut h = Harness::start("pgcrash", 2);
        let leader = h.healthy(Duration::from_secs(60)).await;
        let index = h.cluster.node_index(&leader).unwrap();
        let pid = h.cluster.nodes[index]
            .postmaster_pid()
            .expect("postmaster running");
        let crashed_at = Instant::now();
        let _ = process::kill(pid, libc::SIGKILL);
        let recovered = writable_primary(&h, Duration::from_secs(30)).await;
        let took = crashed_at.elapsed();
        eprintln!("PostgreSQL crash on {leader}: {recovered} writable again after {took:?}");
        // The agent restarts it (crash recovery) or hands over at once;
        // waiting for the lease would leave the agent's node holding a
        // useless key for the whole ttl on top of a restart attempt.
        assert!(took < Duration::from_secs(8), "recovery took {took:?}");
        h.healthy(Duration::from_secs(60)).await;
        h.passed = true;
    });
}

#[test]
fn rest_api_health_checks_answer_like_patroni() {
    cluster_test(async {
        let mut h = Harness::start("api", 3);
        let leader = h.healthy(Duration::from_secs(60)).await;
        let names: Vec<String> = h.names();
        let replicas: Vec<&String> = names.iter().filter(|n| **n != leader).collect();
        let replica = replicas[0].as_str();
        // The API follows the loop: wait until both sides have seen it.
        wait_code(&h, &leader, "/primary", 200, Duration::from_secs(10)).await;
        wait_code(&h, replica, "/replica", 200, Duration::from_secs(10)).await;

        let expectations = [
            ("/", 200, 503),
            ("/primary", 200, 503),
            ("/leader", 200, 503),
            ("/master", 200, 503),
            ("/read-write", 200, 503),
            ("/replica", 503, 200),
            ("/replica?lag=1GB", 503, 200),
            // Patroni's tag rules: a false boolean tag is no tag; the
            // primary checks ignore tags.
            ("/replica?tag_nofailover=false", 503, 503),
            ("/replica?tag_nofailover=true", 503, 503),
            ("/replica?tag_priority=0", 503, 200),
            ("/primary?tag_nofailover=true", 200, 503),
            ("/read-only", 200, 200),
            ("/async", 503, 200),
            ("/sync", 503, 503),
            ("/quorum", 503, 503),
            ("/read-only-sync", 200, 503),
            ("/read-only-synchronous", 200, 503),
            ("/read-only-quorum", 200, 503),
            ("/standby-leader", 503, 503),
            ("/standby_leader", 503, 503),
            ("/health", 200, 200),
            ("/liveness", 200, 200),
            ("/readiness", 200, 200),
            ("/patroni", 200, 200),
            ("/cluster", 200, 200),
            ("/history", 200, 200),
            ("/config", 200, 200),
            ("/metrics", 200, 200),
            ("/openapi.json", 200, 200),
        ];
        for (path, on_primary, on_replica) in expectations {
            for method in ["GET", "HEAD"] {
                assert_eq!(
                    code(&h, &leader, method, path).await,
                    on_primary,
                    "{method} {path} on the primary"
                );
                assert_eq!(
                    code(&h, replica, method, path).await,
                    on_replica,
                    "{method} {path} on a replica"
                );
            }
        }
        // HAProxy's `option httpchk OPTIONS /primary`.
        assert_eq!(code(&h, &leader, "OPTIONS", "/primary").await, 200);
        assert_eq!(code(&h, replica, "OPTIONS", "/primary").await, 503);
        assert_eq!(code(&h, replica, "OPTIONS", "/replica").await, 200);

        // Bad queries are refused with a reason, unknown paths too.
        let bad = api(&h, replica).get("/replica?lag=lots").await.unwrap();
        assert_eq!(bad.status.as_u16(), 400);
        assert!(
            bad.body["error"].as_str().unwrap().contains("lag"),
            "{}",
            bad.text
        );
        let missing = api(&h, replica).get("/no-such-thing").await.unwrap();
        assert_eq!(missing.status.as_u16(), 404);
        assert!(missing.body["error"].is_string(), "{}", missing.text);

        // Status documents with Patroni's field names. The leader's view of
        // pg_stat_replication is as fresh as its last turn: wait for it.
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            let status = api(&h, &leader).get("/patroni").await.unwrap().body;
            if status["replication"]
                .as_array()
                .is_some_and(|r| r.len() == 2)
                || Instant::now() > deadline
            {
                break status;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(status["state"], "running");
        assert_eq!(status["role"], "primary");
        assert!(status["server_version"].as_u64().unwrap() >= 150000);
        assert!(status["xlog"]["location"].as_u64().unwrap() > 0);
        assert_eq!(status["patroni"]["name"], leader.as_str());
        assert_eq!(
            status["replication"].as_array().unwrap().len(),
            2,
            "{status}"
        );
        let status = api(&h, replica).get("/patroni").await.unwrap().body;
        assert_eq!(status["role"], "replica");
        assert_eq!(status["replication_state"], "streaming");
        assert!(status["xlog"]["received_location"].as_u64().unwrap() > 0);
        let cluster = api(&h, replica).get("/cluster").await.unwrap().body;
        let members = cluster["members"].as_array().unwrap();
        assert_eq!(members.len(), 3, "{cluster}");
        for member in members {
            if member["name"] == leader.as_str() {
                assert_eq!(member["role"], "leader");
                assert_eq!(member["state"], "running");
            } else {
                assert_eq!(member["role"], "replica");
                assert_eq!(member["state"], "streaming");
                assert!(member["lag"].is_u64(), "{member}");
            }
        }
        // Metrics follow the leader's last turn: wait for the replicas in it.
        let deadline = Instant::now() + Duration::from_secs(10);
        let metrics = loop {
            let metrics = api(&h, &leader).get("/metrics").await.unwrap().text;
            if metrics.contains("mainstay_replication_lag_bytes{member=")
                || Instant::now() > deadline
            {
                break metrics;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert!(metrics.contains("mainstay_is_leader 1"), "{metrics}");
        assert!(
            metrics.contains("mainstay_replication_lag_seconds{member="),
            "{metrics}"
        );
        assert!(metrics.contains("mainstay_primary 1"), "{metrics}");
        assert!(
            metrics.contains("mainstay_replication_lag_bytes{member="),
            "{metrics}"
        );
        assert!(
            metrics.contains("mainstay_data_dir_free_bytes "),
            "{metrics}"
        );
        let metrics = api(&h, replica).get("/metrics").await.unwrap().text;
        assert!(metrics.contains("mainstay_is_leader 0"), "{metrics}");
        assert!(metrics.contains("mainstay_replica 1"), "{metrics}");

        // A replica whose PostgreSQL stops answering (SIGSTOP: running but
        // hung) fails every check but liveness, and recovers.
        let i = h.cluster.node_index(replica).unwrap();
        let pid = h.cluster.nodes[i]
            .postmaster_pid()
            .expect("replica postmaster");
        let _ = process::kill(pid, libc::SIGSTOP);
        wait_code(&h, replica, "/health", 503, Duration::from_secs(20)).await;
        assert_eq!(code(&h, replica, "GET", "/replica").await, 503);
        assert_eq!(code(&h, replica, "GET", "/read-only").await, 503);
        assert_eq!(code(&h, replica, "GET", "/liveness").await, 200);
        let _ = process::kill(pid, libc::SIGCONT);
        wait_code(&h, replica, "/replica", 200, Duration::from_secs(20)).await;

        // A dead node does not answer at all, and the others stop listing
        // it as running once its key expires.
        h.cluster.kill_node(i);
        assert!(api(&h, replica).get("/health").await.is_err());
        wait_code(&h, &leader, "/primary", 200, Duration::from_secs(5)).await;
        h.passed = true;
    });
}

#[test]
fn failsafe_mode_keeps_the_primary_writing_while_every_member_confirms_it() {
    cluster_test(async {
        let mut h = Harness::start("failsafe", 3);
        let leader = h.healthy(Duration::from_secs(60)).await;
        patch_config(&h, &leader, serde_json::json!({"failsafe_mode": true})).await;
        // Every agent must have taken the setting before etcd goes away.
        for node in h.names() {
            let deadline = Instant::now() + Duration::from_secs(10);
            while api(&h, &node).get("/config").await.unwrap().body["failsafe_mode"] != true {
                assert!(Instant::now() < deadline, "{node} never saw failsafe_mode");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let index = h.cluster.node_index(&leader).unwrap();
        let client = connect(&h.cluster.nodes[index].conninfo()).await.unwrap();
        client
            .batch_execute("CREATE TABLE failsafe (at timestamptz default now())")
            .await
            .unwrap();
        // etcd loses its quorum (frozen): three ttls later the same primary
        // still commits, and nobody else accepts writes.
        h.cluster.etcd[0].pause().unwrap();
        let frozen_at = Instant::now();
        let mut commits = 0;
        while frozen_at.elapsed() < Duration::from_secs(12) {
            let insert = tokio::time::timeout(
                Duration::from_secs(2),
                client.execute("INSERT INTO failsafe DEFAULT VALUES", &[]),
            )
            .await;
            assert!(
                matches!(insert, Ok(Ok(1))),
                "the primary stopped committing {:?} after etcd froze: {insert:?}",
                frozen_at.elapsed()
            );
            commits += 1;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        for node in h.names().into_iter().filter(|n| *n != leader) {
            assert!(!writable(&h, &node).await, "{node} accepts writes too");
        }
        eprintln!("{commits} commits while etcd was frozen");
        // Back to normal: the same leader, everyone streaming, and every
        // commit acknowledged during the freeze is there. etcd revokes the
        // leader's lease (expired during the freeze) as it resumes: the
        // primary takes a new lease and the key back within the deadline
        // its members confirmed, instead of stopping.
        h.cluster.etcd[0].resume().unwrap();
        assert_eq!(
            h.healthy(Duration::from_secs(60)).await,
            leader,
            "the failsafe primary lost its role when etcd came back"
        );
        let index = h.cluster.node_index(&leader).unwrap();
        let kept: i64 = h
            .client(&leader)
            .await
            .query_one("SELECT count(*) FROM failsafe", &[])
            .await
            .unwrap()
            .get(0);
        assert!(
            kept >= commits as i64,
            "{kept} rows, {commits} commits acknowledged during the freeze"
        );

        // A member the leader cannot reach: it must fence at its deadline.
        let other = h.other_than(&leader);
        let i = h.cluster.node_index(&other).unwrap();
        h.cluster.kill_node(i);
        h.wait_for(
            "the member key to expire",
            Duration::from_secs(15),
            async |v| (!v.members.contains_key(&other)).then_some(()),
        )
        .await;
        // Killed after its key went: the leader still counts on the last
        // member, so a second kill makes confirmation impossible.
        let last = h
            .names()
            .into_iter()
            .find(|n| *n != leader && *n != other)
            .unwrap();
        let postmaster = h.cluster.nodes[index].postmaster_pid().unwrap();
        h.cluster.etcd[0].pause().unwrap();
        let j = h.cluster.node_index(&last).unwrap();
        h.cluster.kill_node(j);
        let frozen_at = Instant::now();
        while h.cluster.nodes[index].postmaster_pid() == Some(postmaster) {
            assert!(
                frozen_at.elapsed() < Duration::from_secs(10),
                "the primary kept running without every member's confirmation"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        eprintln!(
            "fenced {:?} after etcd froze with a member gone",
            frozen_at.elapsed()
        );
        h.cluster.etcd[0].resume().unwrap();
        h.passed = true;
    });
}
