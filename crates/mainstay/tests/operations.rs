//! Operating a running cluster the way an operator does: `mainstay ctl`
//! (the real binary) against real agents, etcd and PostgreSQL.

#![forbid(unsafe_code)]

mod common;

use common::*;
use mainstay_core::{ClusterView, PgRole};
use mainstay_lab::demo::{API_PASSWORD, API_USER};
use std::time::{Duration, Instant};

fn leader_of(view: &ClusterView) -> Option<String> {
    let status = view.leader_status()?;
    (status.role == PgRole::Primary).then(|| status.name.clone())
}

fn moved_aside(h: &Harness, node: &str) -> usize {
    let i = h.cluster.node_index(node).unwrap();
    let data = h.cluster.nodes[i].data_dir();
    let name = data.file_name().unwrap().to_string_lossy().into_owned();
    std::fs::read_dir(data.parent().unwrap())
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.starts_with(&name) && n != name
        })
        .count()
}

#[test]
fn switchover_and_failover_through_ctl_lose_nothing() {
    cluster_test(async {
        let mut h = Harness::start("switchover", 3);
        let first = h.healthy(Duration::from_secs(60)).await;
        let names: Vec<String> = h.names();
        let others: Vec<String> = names.iter().filter(|n| **n != first).cloned().collect();
        wait_code(&h, &others[0], "/replica", 200, Duration::from_secs(10)).await;
        wait_code(&h, &others[1], "/replica", 200, Duration::from_secs(10)).await;
        let writer = AckWriter::start(&h, "acked", Duration::from_secs(5)).await;
        tokio::time::sleep(Duration::from_millis(500)).await;

        // Refusals first: they must change nothing.
        let (code, _, err) = ctl(&h, &others[0], false, &["switchover", "--force"]).await;
        assert_eq!(code, 1, "unauthenticated switchover: {err}");
        assert!(err.contains("401"), "{err}");
        let (code, _, err) = ctl(
            &h,
            &others[0],
            true,
            &["switchover", "--candidate", "nobody", "--force"],
        )
        .await;
        assert_eq!(code, 1, "{err}");
        assert!(err.contains("not a member"), "{err}");
        let (code, _, err) = ctl(&h, &others[0], true, &["switchover"]).await;
        assert_eq!(code, 2, "no --force on a non-interactive input: {err}");
        assert!(err.contains("--force"), "{err}");
        let view = h.view().await;
        assert_eq!(leader_of(&view).as_deref(), Some(first.as_str()));
        assert!(view.failover.is_none(), "a refused request left a key");

        // A planned switchover to a named candidate, asked on a replica.
        let target = others[1].clone();
        let (code, out, err) = ctl(
            &h,
            &others[0],
            true,
            &["switchover", "--candidate", &target, "--force"],
        )
        .await;
        assert_eq!(code, 0, "switchover: {out} {err}");
        let view = h.view().await;
        assert_eq!(leader_of(&view).as_deref(), Some(target.as_str()), "{out}");
        // The old primary rejoins by streaming: no rewind, no clone.
        assert_eq!(h.healthy(Duration::from_secs(30)).await, target);
        assert_eq!(moved_aside(&h, &first), 0);
        assert!(!h.agent_log(&first).contains("running pg_rewind"));
        let view = h.view().await;
        assert!(view.failover.is_none(), "the request is cleared once done");
        assert_eq!(
            view.history.last().map(|e| e.reason.as_str()),
            Some("switchover")
        );

        // A manual failover back to the first node.
        let (code, out, err) = ctl(
            &h,
            &target,
            true,
            &["failover", "--candidate", &first, "--force"],
        )
        .await;
        assert_eq!(code, 0, "failover: {out} {err}");
        assert_eq!(h.healthy(Duration::from_secs(30)).await, first);

        let acked: Vec<i64> = writer.finish().await.acked.iter().map(|a| a.id).collect();
        assert!(
            acked.len() > 100,
            "the writer made progress: {}",
            acked.len()
        );
        let missing = missing_acked(&h, &first, "acked", &acked).await;
        assert!(
            missing.is_empty(),
            "planned moves lost acknowledged rows: {missing:?}"
        );

        // The list and history read well, in both formats.
        let (code, out, _) = ctl(&h, &first, false, &["list"]).await;
        assert_eq!(code, 0);
        assert!(out.contains(&format!("leader {first}")), "{out}");
        let (code, out, _) = ctl(&h, &first, false, &["--json", "history"]).await;
        assert_eq!(code, 0);
        let history: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(history.as_array().unwrap().len(), 2, "{out}");

        // Restart a replica; re-clone another; the leader refuses a re-clone.
        let (code, out, err) = ctl(&h, &first, true, &["restart", &others[0], "--force"]).await;
        assert_eq!(code, 0, "restart: {out} {err}");
        let (code, out, err) = ctl(&h, &first, true, &["reinit", &target, "--force"]).await;
        assert_eq!(code, 0, "reinit: {out} {err}");
        assert_eq!(
            moved_aside(&h, &target),
            1,
            "reinit moves the old data aside"
        );
        let (code, _, err) = ctl(&h, &target, true, &["reinit", &first, "--force"]).await;
        assert_eq!(code, 1, "{err}");
        assert!(err.contains("leader"), "{err}");
        assert_eq!(h.healthy(Duration::from_secs(30)).await, first);

        // Removing a member: refused while its agent runs; once it is gone,
        // the leader drops its slot at once instead of keeping it 30 min.
        let gone = others[0].clone();
        let (code, _, err) = ctl(&h, &first, true, &["remove", &gone, "--force"]).await;
        assert_eq!(code, 1, "{err}");
        assert!(err.contains("still running"), "{err}");
        let i = h.cluster.node_index(&gone).unwrap();
        h.cluster.kill_node(i);
        h.wait_for(
            "the member key to expire",
            Duration::from_secs(15),
            async |v| (!v.members.contains_key(&gone)).then_some(()),
        )
        .await;
        let leader_client = h.client(&first).await;
        let slot = mainstay_core::slot_name(&gone);
        let slots = async || -> i64 {
            leader_client
                .query_one(
                    "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
                    &[&slot],
                )
                .await
                .unwrap()
                .get(0)
        };
        assert_eq!(
            slots().await,
            1,
            "the slot is kept for a member that may return"
        );
        let (code, out, err) = ctl(&h, &target, true, &["remove", &gone, "--force"]).await;
        assert_eq!(code, 0, "{out} {err}");
        let deadline = Instant::now() + Duration::from_secs(10);
        while slots().await != 0 {
            assert!(
                Instant::now() < deadline,
                "the slot of a removed member stayed"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        h.passed = true;
    });
}

#[test]
fn pause_blocks_failover_and_bad_requests_change_nothing() {
    cluster_test(async {
        let mut h = Harness::start("pause", 3);
        let leader = h.healthy(Duration::from_secs(60)).await;
        let replica = h.other_than(&leader);

        // Malformed, unknown, mistyped and unauthorised requests.
        let anonymous = api(&h, &replica);
        let authed = api(&h, &replica).with_basic_auth(API_USER, API_PASSWORD);
        let wrong = api(&h, &replica).with_basic_auth(API_USER, "guess");
        let before = h.view().await;
        let cases: Vec<(
            &mainstay_agent::api_client::ApiClient,
            &str,
            &str,
            &[u8],
            u16,
        )> = vec![
            (&anonymous, "PATCH", "/config", br#"{"pause": true}"#, 401),
            (&wrong, "PATCH", "/config", br#"{"pause": true}"#, 401),
            (&anonymous, "POST", "/switchover", b"{}", 401),
            (&authed, "PATCH", "/config", br#"{"pause": tru"#, 400),
            (&authed, "PATCH", "/config", br#"{"paws": true}"#, 400),
            (&authed, "PATCH", "/config", br#"{"pause": "yes"}"#, 400),
            (&authed, "PUT", "/config", b"[]", 400),
            (
                &authed,
                "PATCH",
                "/config",
                br#"{"synchronous_node_count": 0}"#,
                400,
            ),
            (&authed, "POST", "/switchover", br#"{"candidate": 5}"#, 400),
            (
                &authed,
                "POST",
                "/switchover",
                br#"{"leader": "x", "extra": 1}"#,
                400,
            ),
            (
                &authed,
                "POST",
                "/switchover",
                br#"{"scheduled_at": "tomorrow"}"#,
                400,
            ),
            (
                &authed,
                "POST",
                "/switchover",
                br#"{"leader": "nobody"}"#,
                412,
            ),
            (&authed, "POST", "/failover", b"{}", 400),
            (&authed, "POST", "/restart", br#"{"now": true}"#, 400),
        ];
        for (client, method, path, body, expected) in cases {
            expect_refusal(client, method, path, body, expected).await;
        }
        let after = h.view().await;
        assert_eq!(
            after.config, before.config,
            "refused requests changed the config"
        );
        assert_eq!(after.config_revision, before.config_revision);
        assert!(after.failover.is_none());
        assert_eq!(leader_of(&after).as_deref(), Some(leader.as_str()));

        // Config changes reach every agent.
        let (code, out, err) = ctl(
            &h,
            &replica,
            true,
            &[
                "edit-config",
                "--set",
                "maximum_lag_on_failover=2097152",
                "--force",
            ],
        )
        .await;
        assert_eq!(code, 0, "{out} {err}");
        let (code, _, err) = ctl(
            &h,
            &replica,
            true,
            &[
                "edit-config",
                "--set",
                "synchronous_node_count=0",
                "--force",
            ],
        )
        .await;
        assert_eq!(code, 1, "an invalid value is refused: {err}");
        assert!(err.contains("synchronous_node_count"), "{err}");
        for node in h.names() {
            let config = api(&h, &node).get("/config").await.unwrap().body;
            assert_eq!(
                config["maximum_lag_on_failover"], 2097152,
                "{node}: {config}"
            );
        }

        // PostgreSQL parameters: a reloadable one applies everywhere, one
        // that needs a restart is reported as pending until a restart.
        let (code, out, err) = ctl(
            &h,
            &replica,
            true,
            &[
                "edit-config",
                "--set",
                "postgresql.parameters.work_mem=17MB",
                "--set",
                "postgresql.parameters.max_prepared_transactions=7",
                "--force",
            ],
        )
        .await;
        assert_eq!(code, 0, "{out} {err}");
        for node in h.names() {
            let client = h.client(&node).await;
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                let work_mem: String = client.query_one("SHOW work_mem", &[]).await.unwrap().get(0);
                let status = api(&h, &node).get("/patroni").await.unwrap().body;
                if work_mem == "17MB" && status["pending_restart"] == true {
                    assert!(
                        status["pending_restart_reason"]
                            .to_string()
                            .contains("max_prepared_transactions"),
                        "{status}"
                    );
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{node}: work_mem {work_mem}, status {status}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        let (code, out, err) = ctl(&h, &replica, true, &["restart", &replica, "--force"]).await;
        assert_eq!(code, 0, "{out} {err}");
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let status = api(&h, &replica).get("/patroni").await.unwrap().body;
            if status.get("pending_restart").is_none() && status["state"] == "running" {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "still pending after restart: {status}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let prepared: String = h
            .client(&replica)
            .await
            .query_one("SHOW max_prepared_transactions", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(prepared, "7");

        // Paused: killing the primary does not fail over.
        let (code, _, err) = ctl(&h, &replica, true, &["pause"]).await;
        assert_eq!(code, 0, "{err}");
        for node in h.names() {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let status = api(&h, &node).get("/patroni").await.unwrap().body;
                if status["pause"] == true {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{node} never reported pause: {status}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let (_, out, _) = ctl(&h, &replica, false, &["list"]).await;
        assert!(out.contains("Maintenance mode: on"), "{out}");
        let (code, _, err) = ctl(&h, &replica, true, &["switchover", "--force"]).await;
        assert_eq!(code, 1, "paused: no automatic choice of candidate: {err}");
        assert!(err.contains("paused"), "{err}");
        let i = h.cluster.node_index(&leader).unwrap();
        h.cluster.kill_node(i);
        // Three ttls (4 s each at default timing) without a new leader.
        let deadline = Instant::now() + Duration::from_secs(12);
        while Instant::now() < deadline {
            let view = h.view().await;
            assert!(
                view.leader.is_none() || view.leader_name() == Some(leader.as_str()),
                "a failover happened while paused: {}",
                mainstay_lab::demo::describe(&view)
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        assert_eq!(code_of_primary(&h, &replica).await, 503);

        // Resumed: the survivors elect a leader.
        let (code, _, err) = ctl(&h, &replica, true, &["resume"]).await;
        assert_eq!(code, 0, "{err}");
        let new_leader = h
            .wait_for(
                "a new leader after resume",
                Duration::from_secs(30),
                async |v| leader_of(v).filter(|l| *l != leader),
            )
            .await;
        assert_ne!(new_leader, leader);

        // A scheduled switchover waits for its time, then runs.
        let survivor = h
            .names()
            .into_iter()
            .find(|n| *n != leader && *n != new_leader)
            .unwrap();
        h.wait_for(
            "the survivor streaming",
            Duration::from_secs(30),
            async |v| {
                v.members
                    .get(&survivor)
                    .filter(|m| {
                        m.status.streaming && m.status.following.as_deref() == Some(&new_leader)
                    })
                    .map(|_| ())
            },
        )
        .await;
        let at = humantime::format_rfc3339_seconds(
            std::time::SystemTime::now() + Duration::from_secs(4),
        )
        .to_string();
        let (code, out, err) = ctl(
            &h,
            &survivor,
            true,
            &[
                "switchover",
                "--candidate",
                &survivor,
                "--scheduled",
                &at,
                "--force",
            ],
        )
        .await;
        assert_eq!(code, 0, "{out} {err}");
        let cluster = api(&h, &survivor).get("/cluster").await.unwrap().body;
        assert_eq!(
            cluster["scheduled_switchover"]["to"],
            survivor.as_str(),
            "{cluster}"
        );
        assert_eq!(
            leader_of(&h.view().await).as_deref(),
            Some(new_leader.as_str())
        );
        h.wait_for(
            "the scheduled switchover",
            Duration::from_secs(30),
            async |v| {
                (leader_of(v).as_deref() == Some(survivor.as_str()) && v.failover.is_none())
                    .then_some(())
            },
        )
        .await;
        h.passed = true;
    });
}

async fn code_of_primary(h: &Harness, node: &str) -> u16 {
    code(h, node, "GET", "/primary").await
}

/// A CA and a certificate it signed for 127.0.0.1 (openssl, installed by
/// setup): (CA certificate, certificate, key).
fn certificates(
    dir: &std::path::Path,
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let made = mainstay_lab::certificates::make(dir, &["127.0.0.1".to_string()])
        .expect("openssl makes the test's certificates");
    (made.ca, made.cert, made.key)
}

#[test]
fn the_rest_api_serves_https_when_a_certificate_is_configured() {
    cluster_test(async {
        let mut h = Harness::start("https", 1);
        let node = h.healthy(Duration::from_secs(60)).await;
        let (ca, cert, key) = certificates(&h.cluster.nodes[0].dir);
        assert!(h.cluster.stop_agent(0, Duration::from_secs(20)));
        let config_path = h.cluster.nodes[0].config.clone();
        let config = std::fs::read_to_string(&config_path).unwrap();
        let with_tls = config.replacen(
            "[api]\n",
            &format!(
                "[api]\ncert_file = \"{}\"\nkey_file = \"{}\"\nca_file = \"{}\"\n",
                cert.display(),
                key.display(),
                ca.display()
            ),
            1,
        );
        std::fs::write(&config_path, with_tls).unwrap();
        h.cluster.start_agent(0).unwrap();
        let port = h.cluster.nodes[0].api_port;
        let https = format!("https://127.0.0.1:{port}");
        let client = mainstay_agent::api_client::ApiClient::new(&https)
            .with_ca_file(&ca)
            .unwrap()
            .with_timeout(Duration::from_secs(5));
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(answer) = client.get("/primary").await
                && answer.status.as_u16() == 200
            {
                break;
            }
            assert!(Instant::now() < deadline, "no primary over https");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // ctl over https with the node's file (CA and credentials from it).
        let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_mainstay"))
            .args(["ctl", "--config"])
            .arg(&config_path)
            .arg("list")
            .output()
            .await
            .unwrap();
        let out = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{out} {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(out.contains(&format!("leader {node}")), "{out}");
        // Without the CA: a usage error, nothing sent.
        let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_mainstay"))
            .args(["ctl", "--url", &https, "list"])
            .env_remove("MAINSTAY_CONFIG")
            .env_remove("MAINSTAY_API_CA")
            .output()
            .await
            .unwrap();
        assert_eq!(output.status.code(), Some(2), "{output:?}");
        assert!(String::from_utf8_lossy(&output.stderr).contains("--ca-file"));
        // Plain http on the https port gets no answer.
        let plain = api(&h, &node).get("/primary").await;
        assert!(
            plain.is_err() || plain.as_ref().is_ok_and(|a| a.status.as_u16() != 200),
            "{plain:?}"
        );
        h.passed = true;
    });
}

/// `ctl drill` against a running cluster: refused while paused (and then
/// creates nothing), a switchover drill and a crash drill each report a new
/// leader, no lost write and the old leader back; the drill's table is gone.
#[test]
fn ctl_drill_reports_switchover_and_crash_failover() {
    cluster_test(async {
        let mut h = Harness::start("drill", 3);
        let first = h.healthy(Duration::from_secs(60)).await;
        let i = h.cluster.node_index(&first).unwrap();
        let node = &h.cluster.nodes[i];
        let dsn = format!(
            "host={} port={} user={} password={} dbname=postgres connect_timeout=2",
            node.host,
            node.proxy_port,
            mainstay_lab::demo::SUPERUSER,
            mainstay_lab::demo::SUPERUSER_PASSWORD
        );
        let tables = async |h: &Harness| -> i64 {
            let leader = h.healthy(Duration::from_secs(60)).await;
            h.client(&leader)
                .await
                .query_one(
                    "SELECT count(*) FROM pg_class WHERE relname LIKE 'mainstay_drill%'",
                    &[],
                )
                .await
                .unwrap()
                .get(0)
        };

        // Without --force and without a terminal, nothing happens.
        let (code, _, err) = run_ctl(&h, &first, &["drill", "--dsn", &dsn]).await;
        assert_eq!(code, 2, "{err}");
        assert!(err.contains("--force"), "{err}");

        let (code, _, err) = run_ctl(&h, &first, &["pause"]).await;
        assert_eq!(code, 0, "{err}");
        let (code, _, err) = run_ctl(&h, &first, &["drill", "--dsn", &dsn, "--force"]).await;
        assert_eq!(code, 1, "{err}");
        assert!(err.contains("paused"), "{err}");
        let (code, _, err) = run_ctl(&h, &first, &["resume"]).await;
        assert_eq!(code, 0, "{err}");
        assert_eq!(tables(&h).await, 0, "a refused drill created its table");
        // Every agent's status follows the resume within a turn.
        let deadline = Instant::now() + Duration::from_secs(10);
        for node in h.names() {
            while cluster_doc(&h, &node)
                .await
                .is_none_or(|d| d["pause"] == true)
            {
                assert!(Instant::now() < deadline, "{node} still reports a pause");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }

        for kind in ["switchover", "failover"] {
            let before = h.healthy(Duration::from_secs(60)).await;
            // Every replica streaming again (the last drill's old leader too).
            h.wait_for(
                "every replica streaming",
                Duration::from_secs(60),
                async |v| {
                    v.members
                        .values()
                        .all(|m| m.status.name == before || m.status.streaming)
                        .then_some(())
                },
            )
            .await;
            let (code, out, err) = run_ctl(
                &h,
                &before,
                &["drill", "--kind", kind, "--dsn", &dsn, "--force", "--json"],
            )
            .await;
            assert_eq!(
                code,
                0,
                "{kind} drill: {out} {err}\n{}",
                h.agent_log(&before)
            );
            let report: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
            eprintln!("{kind} drill: {report}");
            assert_eq!(report["old_leader"], before.as_str());
            assert_ne!(report["new_leader"], before.as_str());
            assert_eq!(report["lost_acknowledged_writes"], 0, "{report}");
            assert!(report["acknowledged_writes"].as_u64().unwrap() > 0);
            assert_eq!(report["old_leader_rejoined"], true, "{report}");
            assert_eq!(report["table_dropped"], true, "{report}");
        }
        assert_eq!(tables(&h).await, 0, "a drill left its table behind");
        h.passed = true;
    });
}

/// A patronictl runbook, each line as written for Patroni with
/// `patronictl` replaced by `mainstay ctl` (docs/operations.md has the
/// table): the cluster's name first, `--primary`, `-s`, `--pg`, `--wait`,
/// several members at once, `flush`. A runbook for another cluster is
/// refused before anything is done.
#[test]
fn patronictl_runbooks_run_word_for_word() {
    cluster_test(async {
        let mut h = Harness::start("patronictl", 3);
        let leader = h.healthy(Duration::from_secs(60)).await;
        let candidate = h.other_than(&leader);
        let third = h
            .names()
            .into_iter()
            .find(|n| *n != leader && *n != candidate)
            .unwrap();
        let run = async |args: &[&str]| {
            let (code, out, err) = ctl(&h, &leader, true, args).await;
            assert_eq!(code, 0, "{args:?}: {out} {err}");
            out
        };

        let out = run(&["list", "demo"]).await;
        assert!(out.contains(&format!("leader {leader}")), "{out}");
        let out = run(&["topology", "demo", "-e", "-t"]).await;
        assert!(out.contains("Pending restart"), "{out}");

        // Another cluster's runbook changes nothing here.
        for args in [
            &["switchover", "other", "--force"][..],
            &["pause", "other"],
            &["edit-config", "other", "-s", "pause=true", "--force"],
            &["restart", "other", &candidate, "--force"],
        ] {
            let (code, _, err) = ctl(&h, &leader, true, args).await;
            assert_ne!(code, 0, "{args:?} was accepted");
            assert!(
                err.contains("not \"other\"") || err.contains("neither a member"),
                "{args:?}: {err}"
            );
        }
        let (code, _, err) = ctl(&h, &leader, true, &["remove", "demo", "--force"]).await;
        assert_eq!(code, 2, "{err}");
        assert!(err.contains("cluster's name"), "{err}");
        assert_eq!(h.healthy(Duration::from_secs(10)).await, leader);

        run(&[
            "switchover",
            "demo",
            "--primary",
            &leader,
            "--candidate",
            &candidate,
            "--force",
        ])
        .await;
        assert_eq!(h.healthy(Duration::from_secs(60)).await, candidate);
        let (code, _, err) = ctl(&h, &leader, true, &["flush", "demo", "restart"]).await;
        assert_eq!(code, 1, "{err}");

        run(&["pause", "demo", "--wait"]).await;
        for node in h.names() {
            let status = api(&h, &node).get("/patroni").await.unwrap().body;
            assert_eq!(status["pause"], true, "{node} after pause --wait: {status}");
        }
        run(&["resume", "demo", "--wait"]).await;

        let out = run(&[
            "edit-config",
            "demo",
            "-s",
            "maximum_lag_on_failover=2097152",
            "--pg",
            "work_mem=17MB",
            "--force",
            "-q",
        ])
        .await;
        assert!(out.trim().is_empty(), "-q prints nothing: {out}");
        let shown = run(&["show-config", "demo"]).await;
        assert!(
            shown.contains("2097152") && shown.contains("17MB"),
            "{shown}"
        );
        let out = run(&["history", "demo"]).await;
        assert!(out.contains(&candidate), "{out}");

        run(&["restart", "demo", &leader, &third, "--force"]).await;
        run(&["reinit", "demo", &third, "--force", "--wait"]).await;
        assert_eq!(h.healthy(Duration::from_secs(60)).await, candidate);
        h.passed = true;
    });
}
