//! Bad input on the REST API changes nothing: requests that would store
//! something harmful later are refused with a reason, actions already in
//! progress are not started twice, slow clients are cut off, and `GET
//! /cluster` answers on every node throughout. Real agents, etcd and
//! PostgreSQL.

#![forbid(unsafe_code)]

mod common;

use common::*;
use mainstay_core::{FailoverKind, FailoverRequest};
use mainstay_dcs::Dcs;
use mainstay_lab::demo::{API_PASSWORD, API_USER};
use serde_json::json;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn now() -> u64 {
    mainstay_agent::api::unix_now()
}

async fn every_node_answers_cluster(h: &Harness) {
    for node in h.names() {
        let answer = api(h, &node).get("/cluster").await;
        let answer = answer.unwrap_or_else(|e| panic!("GET /cluster on {node}: {e}"));
        assert_eq!(
            answer.status, 200,
            "GET /cluster on {node}: {}",
            answer.text
        );
    }
}

#[test]
fn harmful_requests_are_refused_and_change_nothing() {
    cluster_test(async {
        let mut h = Harness::start("api-input", 3);
        let leader = h.healthy(Duration::from_secs(60)).await;
        let replica = h.other_than(&leader);
        let authed = api(&h, &replica).with_basic_auth(API_USER, API_PASSWORD);
        let before = h.view().await;

        let in_an_hour = now() + 3600;
        let cases: Vec<(&str, &str, String, u16, &str)> = vec![
            // Beyond the horizon, and beyond what a clock can show.
            (
                "POST",
                "/switchover",
                json!({"scheduled_at": now() + 8 * 86400}).to_string(),
                400,
                "scheduled_switchover_horizon",
            ),
            (
                "POST",
                "/switchover",
                json!({"scheduled_at": 253_402_300_800u64}).to_string(),
                400,
                "scheduled_switchover_horizon",
            ),
            (
                "POST",
                "/switchover",
                json!({"scheduled_at": u64::MAX}).to_string(),
                400,
                "scheduled_switchover_horizon",
            ),
            (
                "POST",
                "/switchover",
                json!({"scheduled_at": "10000-01-01T00:00:00Z"}).to_string(),
                400,
                "scheduled_at",
            ),
            (
                "POST",
                "/switchover",
                json!({"scheduled_at": now() - 3600}).to_string(),
                400,
                "in the past",
            ),
            (
                "POST",
                "/switchover",
                json!({"scheduled_at": in_an_hour, "candidate": "ghost"}).to_string(),
                412,
                "not a member",
            ),
            (
                "POST",
                "/switchover",
                json!({"scheduled_at": in_an_hour, "candidate": leader}).to_string(),
                412,
                "already the leader",
            ),
            // Positional arrays are not bodies.
            ("POST", "/restart", "[]".into(), 400, "JSON object"),
            ("POST", "/drill/crash", "[]".into(), 400, "JSON object"),
            (
                "POST",
                "/switchover",
                "[null, null, null]".into(),
                400,
                "JSON object",
            ),
            (
                "POST",
                "/failover",
                "[\"ghost\", null]".into(),
                400,
                "JSON object",
            ),
            (
                "POST",
                "/failsafe",
                "[\"node1\"]".into(),
                400,
                "JSON object",
            ),
            ("DELETE", "/members/%FF", String::new(), 400, "member name"),
            // Not in failsafe mode: no list names the leader.
            (
                "POST",
                "/failsafe",
                json!({"leader": leader}).to_string(),
                409,
                "failsafe list",
            ),
            ("PUT", "/config", String::new(), 400, "empty"),
            ("PUT", "/config", " \n\t".into(), 400, "empty"),
            ("PATCH", "/config", String::new(), 400, "empty"),
            (
                "PATCH",
                "/config",
                json!({"postgresql": {"parameters": {"work_mem": "4MB\nwork_mem = 'x'"}}})
                    .to_string(),
                400,
                "control character",
            ),
            (
                "PATCH",
                "/config",
                json!({"scheduled_switchover_horizon": 5}).to_string(),
                400,
                "scheduled_switchover_horizon",
            ),
        ];
        for (method, path, body, expected, reason) in cases {
            let error = expect_refusal(&authed, method, path, body.as_bytes(), expected).await;
            assert!(
                error.contains(reason),
                "{method} {path} {body:?}: the reason should say {reason:?}: {error}"
            );
            every_node_answers_cluster(&h).await;
        }
        let after = h.view().await;
        assert_eq!(after.config, before.config, "a refusal changed the config");
        assert_eq!(after.config_revision, before.config_revision);
        assert!(after.failover.is_none(), "a refusal stored a request");

        // A good scheduled switchover is stored once; a second one waits
        // for it to be cancelled.
        let scheduled = json!({"scheduled_at": in_an_hour});
        let answer = authed
            .request(hyper::Method::POST, "/switchover", Some(&scheduled))
            .await
            .unwrap();
        assert_eq!(answer.status, 202, "{}", answer.text);
        let again = authed
            .request(hyper::Method::POST, "/switchover", Some(&scheduled))
            .await
            .unwrap();
        assert_eq!(again.status, 409, "{}", again.text);
        assert!(
            again
                .text
                .contains(&format!("a switchover from {leader} scheduled at")),
            "says what is pending: {}",
            again.text
        );
        let doc = cluster_doc(&h, &replica).await.expect("GET /cluster");
        assert!(
            doc["scheduled_switchover"]["at"].is_string(),
            "an RFC 3339 time: {doc}"
        );
        let cancelled = authed
            .request(hyper::Method::DELETE, "/switchover", None)
            .await
            .unwrap();
        assert_eq!(cancelled.status, 200, "{}", cancelled.text);

        // Someone writes a request straight into etcd, at a time no clock
        // shows: every node still answers, and the leader drops it.
        let dcs = h.cluster.dcs().await.expect("etcd client");
        let stored = dcs
            .put_failover(
                &FailoverRequest {
                    kind: FailoverKind::Switchover,
                    leader: Some(leader.clone()),
                    candidate: None,
                    scheduled_at: Some(u64::MAX),
                    requested_at: now(),
                },
                0,
            )
            .await
            .expect("writing to etcd");
        assert!(stored);
        every_node_answers_cluster(&h).await;
        let doc = cluster_doc(&h, &leader).await.expect("GET /cluster");
        assert_eq!(doc["scheduled_switchover"]["at"], json!(u64::MAX), "{doc}");
        h.wait_for(
            "the leader to drop a request beyond the horizon",
            Duration::from_secs(15),
            async |view| view.failover.is_none().then_some(()),
        )
        .await;
        assert!(
            h.agent_log(&leader)
                .contains("scheduled_switchover_horizon"),
            "the leader says why it dropped the request"
        );
        assert_eq!(h.view().await.leader_name(), Some(leader.as_str()));

        // Two restarts at once on one node: one runs, the other is told.
        let (first, second) = tokio::join!(
            authed.request(hyper::Method::POST, "/restart", None),
            authed.request(hyper::Method::POST, "/restart", None)
        );
        let mut answers = [first.unwrap(), second.unwrap()];
        answers.sort_by_key(|a| a.status);
        assert_eq!(answers[0].status, 200, "{}", answers[0].text);
        assert_eq!(answers[1].status, 409, "{}", answers[1].text);
        assert!(
            answers[1].text.contains("restart is in progress"),
            "{}",
            answers[1].text
        );
        h.healthy(Duration::from_secs(60)).await;

        // A crash drill while one runs is refused with what is going on.
        let on_leader = api(&h, &leader).with_basic_auth(API_USER, API_PASSWORD);
        let drill = on_leader
            .request(hyper::Method::POST, "/drill/crash", None)
            .await
            .unwrap();
        assert_eq!(drill.status, 200, "{}", drill.text);
        let again = on_leader
            .request(hyper::Method::POST, "/drill/crash", None)
            .await
            .unwrap();
        assert_eq!(again.status, 409, "{}", again.text);
        assert!(again.text.contains("already running"), "{}", again.text);
        h.wait_for(
            "another node to lead after the drill",
            Duration::from_secs(60),
            async |view| {
                let status = view.leader_status()?;
                (status.name != leader && status.role == mainstay_core::PgRole::Primary)
                    .then_some(())
            },
        )
        .await;
        every_node_answers_cluster(&h).await;
        h.passed = true;
    });
}

#[test]
fn slow_and_idle_clients_are_cut_off() {
    cluster_test(async {
        let mut h = Harness::start("api-slow", 1);
        let node = h.healthy(Duration::from_secs(60)).await;
        let i = h.cluster.node_index(&node).unwrap();
        let address = format!(
            "{}:{}",
            h.cluster.nodes[i].host, h.cluster.nodes[i].api_port
        );

        // More half-sent requests than the agent keeps connections (256 by
        // default): the ones over the cap are closed at once.
        let mut slow = Vec::new();
        for _ in 0..300 {
            let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
            let _ = stream
                .write_all(b"GET /cluster HTTP/1.1\r\nHost: x\r\n")
                .await;
            slow.push(stream);
        }
        let mut closed_at_once = 0;
        for stream in slow.iter_mut().skip(260) {
            let mut buf = [0u8; 64];
            let read = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf)).await;
            if matches!(read, Ok(Ok(0)) | Ok(Err(_))) {
                closed_at_once += 1;
            }
        }
        assert_eq!(
            closed_at_once, 40,
            "connections over the cap are closed at once"
        );

        // Within the header timeout (10 s by default) every slow one is
        // closed, and the API answers again.
        let started = Instant::now();
        let mut open = slow.len();
        while open > 0 && started.elapsed() < Duration::from_secs(20) {
            open = 0;
            for stream in &mut slow {
                let mut buf = [0u8; 64];
                match tokio::time::timeout(Duration::from_millis(10), stream.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => {}
                    _ => open += 1,
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert_eq!(
            open,
            0,
            "slow connections still open after {:?}",
            started.elapsed()
        );
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "closed after {:?}",
            started.elapsed()
        );
        every_node_answers_cluster(&h).await;

        // An idle keep-alive connection is closed too.
        let mut idle = tokio::net::TcpStream::connect(&address).await.unwrap();
        idle.write_all(b"GET /liveness HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut answer = vec![0u8; 4096];
        let n = idle.read(&mut answer).await.unwrap();
        assert!(String::from_utf8_lossy(&answer[..n]).starts_with("HTTP/1.1 200"));
        let waited = Instant::now();
        let closed = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                match idle.read(&mut answer).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "an idle connection stayed open for 20 s");
        assert!(
            waited.elapsed() >= Duration::from_secs(5),
            "{:?}",
            waited.elapsed()
        );
        h.passed = true;
    });
}

async fn show(h: &Harness, node: &str, parameter: &str) -> String {
    let client = h.client(node).await;
    let row = client
        .query_one(&format!("SHOW {parameter}"), &[])
        .await
        .unwrap_or_else(|e| panic!("SHOW {parameter} on {node}: {e}"));
    row.get(0)
}

async fn post_restart(h: &Harness, node: &str) -> mainstay_agent::api_client::Answer {
    api(h, node)
        .with_basic_auth(API_USER, API_PASSWORD)
        .request(hyper::Method::POST, "/restart", None)
        .await
        .unwrap_or_else(|e| panic!("POST /restart on {node}: {e}"))
}

async fn patroni_doc(h: &Harness, node: &str) -> serde_json::Value {
    api(h, node).get("/patroni").await.unwrap().body
}

#[test]
fn postgresql_parameters_are_checked_by_every_member_and_a_failed_start_falls_back() {
    cluster_test(async {
        let mut h = Harness::start("api-params", 3);
        let leader = h.healthy(Duration::from_secs(60)).await;
        let replica = h.other_than(&leader);
        let authed = api(&h, &replica).with_basic_auth(API_USER, API_PASSWORD);
        let before = h.view().await;

        // What PostgreSQL itself would refuse at its next start: refused
        // now, naming the parameter and the member, and nothing stored.
        for (parameter, value, words) in [
            (
                "shared_preload_libraries",
                json!("no_such_library"),
                "not installed",
            ),
            ("no_such_parameter", json!(1), "unrecognized"),
            ("max_connections", json!(0), "outside the valid range"),
            ("shared_buffers", json!("1TB"), "memory"),
            ("client_min_messages", json!("bogus"), "Available values"),
            ("work_mem", json!("4 parsecs"), "invalid value"),
        ] {
            let patch = json!({"postgresql": {"parameters": {parameter: value}}});
            let error = expect_refusal(
                &authed,
                "PATCH",
                "/config",
                patch.to_string().as_bytes(),
                400,
            )
            .await;
            assert!(
                error.contains(&format!("postgresql.parameters.{parameter} on {leader}"))
                    && error.contains(words),
                "{parameter}: {error}"
            );
        }
        let after = h.view().await;
        assert_eq!(
            after.config_revision, before.config_revision,
            "nothing stored"
        );

        // A library every member has is accepted.
        patch_config(
            &h,
            &replica,
            json!({"postgresql": {"parameters": {"shared_preload_libraries": "pg_stat_statements"}}}),
        )
        .await;

        // Written straight into etcd, around the API: each agent checks
        // what it would apply, refuses it and says so; the server keeps its
        // value.
        let dcs = h.cluster.dcs().await.expect("etcd client");
        let current = h.view().await;
        let mut document = current.config.clone().unwrap_or(json!({}));
        document["postgresql"]["parameters"]["work_mem"] = json!("4 parsecs");
        assert!(
            dcs.write_config(&document, current.config_revision)
                .await
                .unwrap()
        );
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let warning = patroni_doc(&h, &replica).await["config_warning"].clone();
            if warning.as_str().is_some_and(|w| w.contains("work_mem")) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no warning on {replica}: {warning}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert_eq!(show(&h, &replica, "work_mem").await, "4MB");
        patch_config(
            &h,
            &replica,
            json!({"postgresql": {"parameters": {"work_mem": "8MB"}}}),
        )
        .await;
        h.wait_for("work_mem applied", Duration::from_secs(15), async |_| {
            (show(&h, &replica, "work_mem").await == "8MB").then_some(())
        })
        .await;
        h.wait_for("the warning to go", Duration::from_secs(5), async |_| {
            patroni_doc(&h, &replica).await["config_warning"]
                .is_null()
                .then_some(())
        })
        .await;

        // Something only a start finds out (ssl without a certificate): the
        // restart falls back to the last parameters that started, says so
        // everywhere, and the node stays out of elections.
        patch_config(
            &h,
            &replica,
            json!({"postgresql": {"parameters": {"ssl": "on"}}}),
        )
        .await;
        let i = h.cluster.node_index(&replica).unwrap();
        let conf = h.cluster.nodes[i].data_dir().join("mainstay.conf");
        h.wait_for(
            "ssl written for the restart",
            Duration::from_secs(10),
            async |_| {
                let text = std::fs::read_to_string(&conf).unwrap_or_default();
                text.contains("ssl = 'on'").then_some(())
            },
        )
        .await;
        let restart = post_restart(&h, &replica).await;
        assert_eq!(restart.status, 409, "{}", restart.text);
        assert!(
            restart.text.contains("last parameters it started with"),
            "{}",
            restart.text
        );
        assert_eq!(show(&h, &replica, "ssl").await, "off");
        h.wait_for(
            "the fallback in /patroni",
            Duration::from_secs(5),
            async |_| {
                let patroni = patroni_doc(&h, &replica).await;
                patroni["config_warning"]
                    .as_str()
                    .is_some_and(|w| w.contains("fallback") && w.contains("ssl"))
                    .then_some(())
            },
        )
        .await;
        h.wait_for(
            "the fallback in the member's status",
            Duration::from_secs(15),
            async |view| {
                let status = &view.members.get(&replica)?.status;
                (status.tags.nofailover && status.warning.is_some()).then_some(())
            },
        )
        .await;
        let (code, out, err) = run_ctl(&h, &leader, &["list"]).await;
        assert_eq!(code, 0, "{err}");
        assert!(
            out.contains(&format!("WARNING {replica}: running on fallback")),
            "{out}"
        );
        // The operator takes the change back and restarts: the fallback is
        // over.
        patch_config(
            &h,
            &replica,
            json!({"postgresql": {"parameters": {"ssl": null}}}),
        )
        .await;
        let restart = post_restart(&h, &replica).await;
        assert_eq!(restart.status, 200, "{}", restart.text);
        assert_eq!(
            show(&h, &replica, "shared_preload_libraries").await,
            "pg_stat_statements"
        );
        h.wait_for(
            "the fallback to end",
            Duration::from_secs(15),
            async |view| {
                let status = &view.members.get(&replica)?.status;
                (!status.tags.nofailover && status.warning.is_none()).then_some(())
            },
        )
        .await;
        h.healthy(Duration::from_secs(30)).await;

        // Lowered cluster-wide, a setting a standby needs at least as high
        // as its primary's: a replica restarted before the primary keeps the
        // primary's value, and starts.
        patch_config(
            &h,
            &replica,
            json!({"postgresql": {"parameters": {"max_wal_senders": 2}}}),
        )
        .await;
        // The primary waits for a restart to lower it; the replica has
        // nothing to show (its file keeps the primary's value), so give its
        // agent the same turn to take the change.
        h.wait_for(
            "max_wal_senders pending on the leader",
            Duration::from_secs(10),
            async |_| {
                let patroni = patroni_doc(&h, &leader).await;
                patroni["pending_restart_reason"]
                    .to_string()
                    .contains("max_wal_senders")
                    .then_some(())
            },
        )
        .await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(
            std::fs::read_to_string(&conf)
                .unwrap()
                .contains("max_wal_senders = '10'")
        );
        let restart = post_restart(&h, &replica).await;
        assert_eq!(restart.status, 200, "{}", restart.text);
        assert_eq!(show(&h, &replica, "max_wal_senders").await, "10");
        h.passed = true;
    });
}
