//! Patroni's monitoring plugin, check_patroni (PyPI, pinned in
//! `scripts/setup.sh`), pointed at a real mainstay cluster in four states:
//! healthy, paused, a replica stopped (while paused, the one way a stopped
//! PostgreSQL stays stopped), and synchronous mode. Each row of
//! [`EXPECTED`] is what check_patroni says of a Patroni 4.1.5 cluster in
//! the same state, as measured on one (three nodes, the same plugin
//! version); mainstay must give the same OK/WARNING/CRITICAL/UNKNOWN.
//!
//! The same cluster also proves custom tags end to end (`[tags] dc =
//! "..."` in each node's file, filtered on by `?tag_dc=`) and Patroni's
//! metric families in `/metrics`.
//!
//! `MAINSTAY_CHECK_PATRONI` names another check_patroni executable.

#![forbid(unsafe_code)]

mod common;

use common::*;
use std::path::Path;
use std::time::{Duration, Instant};

const DEFAULT_CHECK_PATRONI: &str = "/opt/mainstay-check-patroni/bin/check_patroni";
const CHECK_PATRONI_ENV: &str = "MAINSTAY_CHECK_PATRONI";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Healthy,
    Paused,
    /// Paused, and one replica's PostgreSQL stopped.
    StoppedReplica,
    /// `synchronous_mode: true`: one synchronous standby, one asynchronous.
    Synchronous,
}

/// Whose API a check asks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ask {
    /// Every node's (`-e a,b,c`): the cluster services.
    Cluster,
    Leader,
    /// A streaming replica; in synchronous mode, the synchronous standby.
    Replica,
    /// In synchronous mode, the replica that is not synchronous.
    AsyncReplica,
    /// The replica whose PostgreSQL is stopped.
    Stopped,
}

/// One row per line: state | whom it asks | what check_patroni says of
/// Patroni 4.1.5 in that state | the service and its arguments. mainstay
/// must get the same answer. `{state}` is the test's state-file directory.
///
/// In the stopped-replica state, a member with no known timeline (as
/// Patroni's and mainstay's stopped members are) makes check_patroni
/// 2.2.0's cluster_has_replica and node_tl_has_changed fail with
/// `KeyError: 'timeline'`: UNKNOWN against both.
const EXPECTED: &str = "\
Healthy        | Cluster      | OK       | cluster_has_leader
Healthy        | Cluster      | OK       | cluster_has_replica
Healthy        | Cluster      | OK       | cluster_has_replica --warning 2: --critical 1:
Healthy        | Cluster      | WARNING  | cluster_has_replica --sync-warning 1:
Healthy        | Cluster      | CRITICAL | cluster_has_replica --sync-warning 1: --sync-critical 1:
Healthy        | Cluster      | OK       | cluster_has_replica --max-lag 1MB
Healthy        | Cluster      | OK       | cluster_has_scheduled_action
Healthy        | Cluster      | OK       | cluster_is_in_maintenance
Healthy        | Cluster      | OK       | cluster_node_count --warning 3: --critical 2: --healthy-warning 3: --healthy-critical 2:
Healthy        | Cluster      | CRITICAL | cluster_config_has_changed --state-file {state}/config.state --save
Healthy        | Cluster      | OK       | cluster_config_has_changed --state-file {state}/config.state
Healthy        | Leader       | OK       | node_is_alive
Healthy        | Leader       | OK       | node_is_leader
Healthy        | Leader       | CRITICAL | node_is_leader --is-standby-leader
Healthy        | Leader       | OK       | node_is_primary
Healthy        | Leader       | CRITICAL | node_is_replica
Healthy        | Leader       | OK       | node_is_pending_restart
Healthy        | Leader       | OK       | node_patroni_version --patroni-version 4.1.5
Healthy        | Leader       | CRITICAL | node_patroni_version --patroni-version 4.1.4
Healthy        | Leader       | OK       | node_tl_has_changed --timeline 1
Healthy        | Leader       | CRITICAL | node_tl_has_changed --timeline 2
Healthy        | Replica      | OK       | node_is_alive
Healthy        | Replica      | CRITICAL | node_is_leader
Healthy        | Replica      | CRITICAL | node_is_primary
Healthy        | Replica      | OK       | node_is_replica
Healthy        | Replica      | CRITICAL | node_is_replica --is-sync
Healthy        | Replica      | OK       | node_is_replica --is-async
Healthy        | Replica      | OK       | node_is_replica --max-lag 1MB
Healthy        | Replica      | OK       | node_is_pending_restart
Healthy        | Replica      | OK       | node_patroni_version --patroni-version 4.1.5
Healthy        | Replica      | OK       | node_tl_has_changed --timeline 1
Paused         | Cluster      | CRITICAL | cluster_is_in_maintenance
Paused         | Cluster      | OK       | cluster_has_leader
Paused         | Cluster      | OK       | cluster_has_replica --warning 2: --critical 1:
Paused         | Cluster      | OK       | cluster_node_count --warning 3: --critical 2: --healthy-warning 3: --healthy-critical 2:
Paused         | Leader       | OK       | node_is_primary
Paused         | Replica      | OK       | node_is_replica
StoppedReplica | Cluster      | OK       | cluster_has_leader
StoppedReplica | Cluster      | UNKNOWN  | cluster_has_replica
StoppedReplica | Cluster      | UNKNOWN  | cluster_has_replica --warning 2: --critical 1:
StoppedReplica | Cluster      | CRITICAL | cluster_is_in_maintenance
StoppedReplica | Cluster      | WARNING  | cluster_node_count --healthy-warning 3: --healthy-critical 2:
StoppedReplica | Cluster      | OK       | cluster_node_count --warning 3: --critical 2:
StoppedReplica | Leader       | OK       | node_is_primary
StoppedReplica | Replica      | OK       | node_is_replica
StoppedReplica | Stopped      | OK       | node_is_alive
StoppedReplica | Stopped      | CRITICAL | node_is_leader
StoppedReplica | Stopped      | CRITICAL | node_is_primary
StoppedReplica | Stopped      | CRITICAL | node_is_replica
StoppedReplica | Stopped      | CRITICAL | node_is_replica --is-async
StoppedReplica | Stopped      | OK       | node_is_pending_restart
StoppedReplica | Stopped      | OK       | node_patroni_version --patroni-version 4.1.5
StoppedReplica | Stopped      | UNKNOWN  | node_tl_has_changed --timeline 1
Synchronous    | Cluster      | OK       | cluster_has_replica
Synchronous    | Cluster      | OK       | cluster_has_replica --sync-warning 1: --sync-critical 1:
Synchronous    | Cluster      | OK       | cluster_has_replica --warning 2: --critical 1: --sync-warning 1: --sync-type sync
Synchronous    | Cluster      | WARNING  | cluster_has_replica --sync-warning 1: --sync-type quorum
Synchronous    | Cluster      | OK       | cluster_node_count --warning 3: --critical 2: --healthy-warning 3: --healthy-critical 2:
Synchronous    | Leader       | CRITICAL | node_is_replica --is-sync
Synchronous    | Replica      | OK       | node_is_replica --is-sync
Synchronous    | Replica      | OK       | node_is_replica --is-sync --sync-type sync
Synchronous    | Replica      | CRITICAL | node_is_replica --is-sync --sync-type quorum
Synchronous    | Replica      | CRITICAL | node_is_replica --is-async
Synchronous    | AsyncReplica | CRITICAL | node_is_replica --is-sync
Synchronous    | AsyncReplica | OK       | node_is_replica --is-async
";

struct Expect {
    state: State,
    ask: Ask,
    result: String,
    args: String,
}

fn expectations() -> Vec<Expect> {
    EXPECTED
        .lines()
        .map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let [state, ask, result, args] = cells[..] else {
                panic!("a row has 4 cells: {line}");
            };
            let state = match state {
                "Healthy" => Healthy,
                "Paused" => Paused,
                "StoppedReplica" => StoppedReplica,
                "Synchronous" => Synchronous,
                other => panic!("unknown state {other} in {line}"),
            };
            let ask = match ask {
                "Cluster" => Cluster,
                "Leader" => Leader,
                "Replica" => Replica,
                "AsyncReplica" => AsyncReplica,
                "Stopped" => Stopped,
                other => panic!("unknown member {other} in {line}"),
            };
            assert!(
                ["OK", "WARNING", "CRITICAL", "UNKNOWN"].contains(&result),
                "{line}"
            );
            Expect {
                state,
                ask,
                result: result.into(),
                args: args.into(),
            }
        })
        .collect()
}

use Ask::*;
use State::*;

/// Patroni 4.1.5's metric families; a stopped server leaves out the two
/// marked `true`.
const PATRONI_FAMILIES: &[(&str, bool)] = &[
    ("patroni_version", false),
    ("patroni_postgres_running", false),
    ("patroni_postmaster_start_time", false),
    ("patroni_primary", false),
    ("patroni_xlog_location", false),
    ("patroni_standby_leader", false),
    ("patroni_replica", false),
    ("patroni_sync_standby", false),
    ("patroni_quorum_standby", false),
    ("patroni_xlog_received_location", false),
    ("patroni_xlog_replayed_location", false),
    ("patroni_xlog_replayed_timestamp", false),
    ("patroni_xlog_paused", false),
    ("patroni_postgres_streaming", true),
    ("patroni_postgres_in_archive_recovery", true),
    ("patroni_postgres_server_version", false),
    ("patroni_cluster_unlocked", false),
    ("patroni_failsafe_mode_is_active", false),
    ("patroni_postgres_timeline", false),
    ("patroni_dcs_last_seen", false),
    ("patroni_pending_restart", false),
    ("patroni_is_paused", false),
    ("patroni_postgres_state", false),
];

fn check_patroni() -> Option<String> {
    let exe = std::env::var(CHECK_PATRONI_ENV).unwrap_or_else(|_| DEFAULT_CHECK_PATRONI.into());
    if Path::new(&exe).is_file() {
        Some(exe)
    } else {
        mainstay_testkit::skip(&format!(
            "needs check_patroni at {exe} (scripts/setup.sh installs it; {CHECK_PATRONI_ENV} \
             names another)"
        ));
        None
    }
}

fn url(h: &Harness, node: &str) -> String {
    let n = &h.cluster.nodes[h.cluster.node_index(node).unwrap()];
    format!("http://{}:{}", n.host, n.api_port)
}

/// Runs check_patroni (bounded: it would hang only on an agent that
/// accepts and never answers) and returns its status word and full output.
async fn run(exe: &str, endpoints: &str, args: &[String]) -> (String, String) {
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(exe)
            .args(["--timeout", "10", "-e", endpoints])
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("check_patroni finishes within 60 s")
    .expect("check_patroni runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let word = match output.status.code() {
        Some(0) => "OK",
        Some(1) => "WARNING",
        Some(2) => "CRITICAL",
        Some(3) => "UNKNOWN",
        _ => "?",
    };
    (word.to_string(), text.trim().to_string())
}

/// The members the state's rows ask, by role.
struct Cast {
    leader: String,
    replica: String,
    other: String,
}

/// Runs `state`'s rows; returns the rows that differ, described.
async fn check_state(h: &Harness, exe: &str, state: State, cast: &Cast) -> Vec<String> {
    let state_dir = h.dir.join("check-patroni-state");
    std::fs::create_dir_all(&state_dir).unwrap();
    let all = h
        .names()
        .iter()
        .map(|n| url(h, n))
        .collect::<Vec<_>>()
        .join(",");
    let mut wrong = Vec::new();
    for expect in expectations().iter().filter(|e| e.state == state) {
        let endpoints = match expect.ask {
            Cluster => all.clone(),
            Leader => url(h, &cast.leader),
            Replica => url(h, &cast.replica),
            AsyncReplica | Stopped => url(h, &cast.other),
        };
        let args: Vec<String> = expect
            .args
            .replace("{state}", &state_dir.display().to_string())
            .split_whitespace()
            .map(String::from)
            .collect();
        let (got, text) = run(exe, &endpoints, &args).await;
        eprintln!(
            "| {state:?} | {:?} | `{}` | {} | {got} |",
            expect.ask, expect.args, expect.result
        );
        // Patroni's UNKNOWNs here all come from the absent timeline.
        let same_reason = got != "UNKNOWN" || text.contains("KeyError: 'timeline'");
        if got != expect.result || !same_reason {
            wrong.push(format!(
                "{state:?}, {:?}: `check_patroni {}` said {got}, Patroni gives {}: {text}",
                expect.ask, expect.args, expect.result
            ));
        }
    }
    wrong
}

/// Waits until `node`'s own `/patroni` says `state`.
async fn wait_node_state(h: &Harness, node: &str, state: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let doc = api(h, node).get("/patroni").await.map(|a| a.body);
        if doc.as_ref().is_ok_and(|d| d["state"] == state) {
            return;
        }
        if Instant::now() > deadline {
            h.dump_logs();
            panic!("{node} did not say state {state} within 30 s: {doc:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn status(h: &Harness, node: &str, path: &str) -> u16 {
    code(h, node, "GET", path).await
}

#[test]
fn check_patroni_says_of_mainstay_what_it_says_of_patroni() {
    let Some(exe) = check_patroni() else {
        return;
    };
    cluster_test(async {
        let dir = test_dir("check-patroni");
        let mut cluster = mainstay_lab::demo::LocalCluster::prepare(
            &dir,
            3,
            Path::new(env!("CARGO_BIN_EXE_mainstay")),
            "fast",
        )
        .expect("preparing the cluster");
        // Each node in a "site" of its own, one of them numeric.
        for (i, node) in cluster.nodes.iter().enumerate() {
            let mut text = std::fs::read_to_string(&node.config).unwrap();
            text.push_str(&format!(
                "\n[tags]\ndc = \"site{}\"\nrack = {}\n",
                i + 1,
                i + 1
            ));
            std::fs::write(&node.config, text).unwrap();
        }
        for i in 0..3 {
            cluster.start_agent(i).unwrap();
        }
        let mut h = Harness::adopt(cluster);
        let leader = h.healthy(Duration::from_secs(120)).await;
        let replicas: Vec<String> = h.names().into_iter().filter(|n| *n != leader).collect();
        let mut cast = Cast {
            leader: leader.clone(),
            replica: replicas[0].clone(),
            other: replicas[1].clone(),
        };
        // Give every agent a turn after the last member joined.
        tokio::time::sleep(Duration::from_secs(2)).await;

        // Custom tags: shown, and filtered on as Patroni does.
        let site = |node: &str| format!("site{}", &node["node".len()..]);
        let replica = cast.replica.clone();
        let doc = api(&h, &replica).get("/patroni").await.unwrap().body;
        assert_eq!(doc["tags"]["dc"], site(&replica), "{doc}");
        assert!(doc["tags"]["rack"].is_u64(), "{doc}");
        let listed = cluster_doc(&h, &leader).await.unwrap();
        assert!(
            listed["members"]
                .as_array()
                .unwrap()
                .iter()
                .all(|m| m["tags"]["dc"]
                    .as_str()
                    .is_some_and(|d| d.starts_with("site"))),
            "{listed}"
        );
        let rack = &replica["node".len()..];
        for (path, expected) in [
            (format!("/replica?tag_dc={}", site(&replica)), 200),
            (
                format!("/replica?tag_dc={}&tag_rack={rack}", site(&replica)),
                200,
            ),
            (format!("/replica?tag_rack=0{rack}"), 503),
            ("/replica?tag_dc=elsewhere".to_string(), 503),
            ("/read-only?tag_dc=elsewhere".to_string(), 503),
            ("/replica?tag_nofailover=false".to_string(), 503),
        ] {
            assert_eq!(status(&h, &replica, &path).await, expected, "{path}");
        }
        // Tags are ignored on the leader's checks.
        assert_eq!(status(&h, &leader, "/primary?tag_dc=elsewhere").await, 200);

        // Patroni's metric families, with Patroni's labels.
        let metrics = api(&h, &leader).get("/metrics").await.unwrap().text;
        for (family, _) in PATRONI_FAMILIES {
            assert!(
                metrics.contains(&format!("{family}{{scope=\"demo\",name=\"{leader}\"}} ")),
                "{family} missing:\n{metrics}"
            );
        }
        assert!(metrics.contains(&format!(
            "patroni_primary{{scope=\"demo\",name=\"{leader}\"}} 1"
        )));
        assert!(metrics.contains("patroni_version{scope=\"demo\"") && metrics.contains("} 040105"));

        let mut wrong = check_state(&h, &exe, Healthy, &cast).await;

        patch_config(&h, &leader, serde_json::json!({"pause": true})).await;
        for node in h.names() {
            wait_code_paused(&h, &node).await;
        }
        wrong.extend(check_state(&h, &exe, Paused, &cast).await);

        // Stop one replica's PostgreSQL: paused, the agent leaves it so.
        let stopped = cast.other.clone();
        let index = h.cluster.node_index(&stopped).unwrap();
        let pid = h.cluster.nodes[index]
            .postmaster_pid()
            .expect("a postmaster");
        // Fast shutdown, as `pg_ctl stop -m fast` would.
        let _ = mainstay_sys::process::kill(pid, libc::SIGINT);
        let deadline = Instant::now() + Duration::from_secs(30);
        while mainstay_sys::process::alive(pid) {
            assert!(Instant::now() < deadline, "the postmaster outlived 30 s");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // The health checks know at once, whatever the HA loop's turn.
        for path in ["/health", "/replica", "/readiness", "/read-only"] {
            assert_eq!(
                status(&h, &stopped, path).await,
                503,
                "{path} just after the stop"
            );
        }
        let doc = api(&h, &stopped).get("/patroni").await.unwrap().body;
        assert_ne!(doc["state"], "running", "{doc}");
        wait_node_state(&h, &stopped, "stopped").await;
        h.wait_for(
            "the stopped member's key",
            Duration::from_secs(30),
            async |v| {
                v.members
                    .get(&stopped)
                    .filter(|m| m.status.role == mainstay_core::PgRole::Stopped)
                    .map(|_| ())
            },
        )
        .await;
        let doc = api(&h, &stopped).get("/patroni").await.unwrap().body;
        assert_eq!(doc["role"], "replica", "{doc}");
        assert!(doc["database_system_identifier"].is_string(), "{doc}");
        assert!(doc.get("timeline").is_none(), "{doc}");
        let listed = cluster_doc(&h, &leader).await.unwrap();
        let entry = listed["members"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == stopped.as_str())
            .cloned()
            .unwrap();
        for key in [
            "lag",
            "lsn",
            "receive_lag",
            "receive_lsn",
            "replay_lag",
            "replay_lsn",
        ] {
            assert_eq!(entry[key], "unknown", "{key}: {entry}");
        }
        let metrics = api(&h, &stopped).get("/metrics").await.unwrap().text;
        for (family, only_running) in PATRONI_FAMILIES {
            assert_eq!(
                metrics.contains(&format!("{family}{{")),
                !only_running,
                "{family} on a stopped server:\n{metrics}"
            );
        }
        wrong.extend(check_state(&h, &exe, StoppedReplica, &cast).await);

        patch_config(&h, &leader, serde_json::json!({"pause": false})).await;
        h.healthy(Duration::from_secs(60)).await;
        patch_config(&h, &leader, serde_json::json!({"synchronous_mode": true})).await;
        let sync = wait_sync_standby(&h, Duration::from_secs(60)).await;
        cast.replica = sync.standby.clone();
        cast.other = h
            .names()
            .into_iter()
            .find(|n| *n != leader && *n != sync.standby)
            .unwrap();
        wrong.extend(check_state(&h, &exe, Synchronous, &cast).await);

        assert!(
            wrong.is_empty(),
            "check_patroni disagrees with Patroni's results:\n{}",
            wrong.join("\n")
        );
        h.passed = true;
    });
}

/// Waits until `node` reports the cluster paused.
async fn wait_code_paused(h: &Harness, node: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(answer) = api(h, node).get("/patroni").await
            && answer.body["pause"] == true
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{node} did not report the pause within 30 s");
}
