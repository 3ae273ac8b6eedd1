//! A running Patroni 4.1.5 cluster (three nodes, from PyPI, with its own
//! etcd and HAProxy) taken over by mainstay as docs/migrating-from-patroni.md
//! tells an operator to, while a client writes every few milliseconds:
//! `migrate from-patroni` on each node against the live cluster, Patroni
//! paused, then on each node Patroni stopped (PostgreSQL keeps running)
//! and mainstay started: a replica's first, the wrong order (it must not
//! take over while Patroni's primary still writes), then the old
//! primary's, then the last replica's. The same data
//! directories carry on: no initdb, no base backup, no rewind, no promotion,
//! no acknowledged write lost. The longest gap between acknowledged writes
//! is the takeover's write unavailability (the README quotes it), printed
//! beside a switchover's on the cluster that results.

#![forbid(unsafe_code)]

mod common;

use mainstay_lab::bench::{WriterLog, write_loop};
use mainstay_lab::demo::{SUPERUSER, SUPERUSER_PASSWORD, spawn_mainstay, stop_child};
use mainstay_lab::patroni::{PatroniCluster, PatroniTiming, install_patroni};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const VENV: &str = "/var/tmp/mainstay-bench/patroni-venv";
const API_USER: &str = "takeover";
const API_PASSWORD: &str = "takeover-api-secret";

/// mainstay agents started during the test, stopped (SIGTERM, then
/// SIGKILL) whatever happens.
#[derive(Default)]
struct Agents(Vec<Child>);

impl Drop for Agents {
    fn drop(&mut self) {
        for child in self.0.drain(..) {
            stop_child(child, Duration::from_secs(20));
        }
    }
}

fn exe() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_mainstay"))
}

fn conninfo(port: u16, extra: &str) -> String {
    format!(
        "host=127.0.0.1 port={port} user={SUPERUSER} password={SUPERUSER_PASSWORD} \
         dbname=postgres connect_timeout=2 {extra}"
    )
}

async fn query_one(port: u16, sql: &str) -> Result<tokio_postgres::Row, String> {
    let client = common::connect(&conninfo(port, ""))
        .await
        .map_err(|e| format!("port {port}: {e}"))?;
    client
        .query_one(sql, &[])
        .await
        .map_err(|e| format!("port {port}: {sql}: {e}"))
}

/// What must not change across the takeover: the directory itself (a
/// clone would have moved it aside) and the PostgreSQL system it holds.
async fn identity(data_dir: &Path, port: u16) -> (u64, i64) {
    let inode = std::fs::metadata(data_dir).unwrap().ino();
    let row = query_one(port, "SELECT system_identifier FROM pg_control_system()")
        .await
        .unwrap();
    (inode, row.get(0))
}

/// `mainstay migrate from-patroni` for the node in `node_dir`, against the
/// live cluster, writing the node file and the dynamic configuration to
/// `outputs`.
fn run_migrate(node_dir: &Path, outputs: [&Path; 2]) -> std::process::Output {
    Command::new(exe())
        .args(["migrate", "from-patroni", "--patroni-config"])
        .arg(node_dir.join("patroni.yml"))
        .arg("--output")
        .arg(outputs[0])
        .arg("--dynamic-output")
        .arg(outputs[1])
        .output()
        .unwrap()
}

/// Migrates one node against the live cluster (`mainstay.toml`,
/// `mainstay-dynamic.json` beside its patroni.yml); returns its standard
/// output.
fn migrate(node_dir: &Path) -> String {
    let out = run_migrate(
        node_dir,
        [
            &node_dir.join("mainstay.toml"),
            &node_dir.join("mainstay-dynamic.json"),
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "migrate from-patroni for {}: {}\n{stdout}{}",
        node_dir.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The credentials docs/migrating-from-patroni.md asks for when Patroni's
/// API had none (mainstay refuses changes through an API without them).
fn add_api_credentials(config: &Path) {
    let text = std::fs::read_to_string(config).unwrap();
    let mut doc: toml::Table = text.parse().unwrap();
    let api = doc
        .entry("api")
        .or_insert_with(|| toml::Value::Table(Default::default()))
        .as_table_mut()
        .unwrap();
    api.insert("username".into(), API_USER.into());
    api.insert("password".into(), API_PASSWORD.into());
    std::fs::write(config, toml::to_string(&doc).unwrap()).unwrap();
}

fn api(port: u16) -> mainstay_agent::api_client::ApiClient {
    mainstay_agent::api_client::ApiClient::new(&format!("http://127.0.0.1:{port}"))
        .with_basic_auth(API_USER, API_PASSWORD)
        .with_timeout(Duration::from_secs(5))
}

/// Polls `what` every 200 ms until it returns `Some`, for at most `limit`.
async fn wait_for<T, F: Future<Output = Option<T>>>(
    what: &str,
    limit: Duration,
    mut probe: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The longest pause between two acknowledged writes in `[from, to]`.
fn longest_gap(acked: &[(i64, Instant, u16)], from: Instant, to: Instant) -> Duration {
    let times: Vec<Instant> = acked
        .iter()
        .map(|a| a.1)
        .filter(|t| *t >= from && *t <= to)
        .collect();
    times
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default()
}

#[test]
fn a_running_patroni_cluster_is_taken_over_without_losing_a_write() {
    if !common::prerequisites() {
        return;
    }
    let _alone = common::alone();
    let patroni = match install_patroni(Path::new(VENV)) {
        Ok(patroni) => patroni,
        Err(why) => {
            mainstay_testkit::skip(&format!(
                "needs Patroni 4.1.5 (scripts/setup.sh installs it in {VENV}): {why}"
            ));
            return;
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(take_over(patroni));
}

async fn take_over(patroni: PathBuf) {
    let dir = common::test_dir("takeover");
    let mut cluster = PatroniCluster::start(
        &dir,
        &patroni,
        PatroniTiming {
            ttl: 30,
            loop_wait: 10,
            retry_timeout: 10,
        },
    )
    .expect("starting Patroni");
    let (leader, _) = cluster
        .healthy(Duration::from_secs(120))
        .await
        .expect("a healthy Patroni cluster");
    let index = |name: &str| cluster.nodes.iter().position(|n| n.name == name).unwrap();
    let leader_i = index(&leader);
    let replicas: Vec<usize> = (0..cluster.nodes.len())
        .filter(|i| *i != leader_i)
        .collect();
    let pg_ports: Vec<u16> = cluster.nodes.iter().map(|n| n.pg_port).collect();
    let api_ports: Vec<u16> = cluster.nodes.iter().map(|n| n.api_port).collect();
    let pg_port = |i: usize| pg_ports[i];
    let api_port = |i: usize| api_ports[i];

    // The client: one INSERT at a time through a multi-host connection
    // string that finds whichever server accepts writes.
    let ports: Vec<String> = cluster
        .nodes
        .iter()
        .map(|n| n.pg_port.to_string())
        .collect();
    let writer_conninfo = format!(
        "host={} port={} user={SUPERUSER} password={SUPERUSER_PASSWORD} dbname=postgres \
         target_session_attrs=read-write connect_timeout=2",
        vec!["127.0.0.1"; ports.len()].join(","),
        ports.join(",")
    );
    common::connect(&conninfo(pg_port(leader_i), ""))
        .await
        .unwrap()
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS bench_writes (id bigint PRIMARY KEY, at timestamptz DEFAULT now())",
        )
        .await
        .unwrap();
    let log = Arc::new(Mutex::new(WriterLog::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(write_loop(writer_conninfo, log.clone(), stop.clone()));
    let acked = || log.lock().unwrap().acked.len();
    wait_for("the first writes", Duration::from_secs(20), || async {
        (acked() > 50).then_some(())
    })
    .await;

    let mut before = Vec::new();
    for (i, node) in cluster.nodes.iter().enumerate() {
        before.push(identity(&node.data_dir(), pg_port(i)).await);
    }

    // A cluster that is not ready to be taken over (here: a switchover
    // scheduled in Patroni) is refused, and nothing is written.
    let patroni_api =
        mainstay_agent::api_client::ApiClient::new(&cluster.api_url(&leader).unwrap())
            .with_timeout(Duration::from_secs(10));
    let at =
        humantime::format_rfc3339_seconds(std::time::SystemTime::now() + Duration::from_secs(3600))
            .to_string();
    let answer = patroni_api
        .request(
            hyper::Method::POST,
            "/switchover",
            Some(&serde_json::json!({ "leader": leader, "scheduled_at": at })),
        )
        .await
        .unwrap();
    assert!(
        answer.status.is_success(),
        "scheduling a switchover in Patroni: {}",
        answer.text
    );
    let refused = run_migrate(
        &cluster.nodes[leader_i].dir,
        [&dir.join("refused.toml"), &dir.join("refused.json")],
    );
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("scheduled"), "{stderr}");
    assert!(!dir.join("refused.toml").exists() && !dir.join("refused.json").exists());
    let answer = patroni_api
        .request(hyper::Method::DELETE, "/switchover", None)
        .await
        .unwrap();
    assert!(answer.status.is_success(), "cancelling it: {}", answer.text);

    // 1. The configuration, from each node's file and the live cluster.
    let mut patroni_slots = Vec::new();
    for node in &cluster.nodes {
        let out = migrate(&node.dir);
        let named: Vec<&str> = out
            .lines()
            .filter_map(|l| l.strip_prefix("leader: "))
            .collect();
        assert_eq!(named, [leader.as_str()], "{out}");
        patroni_slots = out
            .lines()
            .filter_map(|l| l.strip_prefix("drop slot: "))
            .map(str::to_string)
            .collect();
        add_api_credentials(&node.dir.join("mainstay.toml"));
    }
    assert_eq!(
        patroni_slots.len(),
        2,
        "the slots Patroni made for its replicas"
    );

    // 2. Patroni paused. Then, node by node, Patroni stopped (paused, it
    //    leaves PostgreSQL running) and mainstay started in its place.
    let patronictl = patroni.with_file_name("patronictl");
    let status = Command::new(&patronictl)
        .arg("-c")
        .arg(cluster.nodes[leader_i].dir.join("patroni.yml"))
        .args(["pause", "--wait"])
        .env("HOME", &dir)
        .status()
        .unwrap();
    assert!(status.success(), "patronictl pause --wait: {status}");
    let names: Vec<String> = cluster.nodes.iter().map(|n| n.name.clone()).collect();

    let mut agents = Agents::default();
    let node_dirs: Vec<PathBuf> = cluster.nodes.iter().map(|n| n.dir.clone()).collect();
    let start_agent = |i: usize| {
        spawn_mainstay(
            exe(),
            None,
            "agent",
            &node_dirs[i].join("mainstay.toml"),
            &node_dirs[i].join("agent.log"),
        )
        .unwrap()
    };

    // 3. A replica's agent first, the wrong order: it restarts its standby
    //    under its guard but must not take over while Patroni's primary is
    //    writable.
    let early = replicas[0];
    cluster
        .stop_agent(&names[early], Duration::from_secs(30))
        .unwrap();
    agents.0.push(start_agent(early));
    let early_port = pg_port(early);
    wait_for(
        "the early replica read-only under mainstay",
        Duration::from_secs(60),
        || async {
            let row = query_one(early_port, "SELECT pg_is_in_recovery()")
                .await
                .ok()?;
            row.get::<_, bool>(0).then_some(())
        },
    )
    .await;
    let writes_before = acked();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let row = query_one(early_port, "SELECT pg_is_in_recovery()")
        .await
        .unwrap();
    assert!(
        row.get::<_, bool>(0),
        "the replica's agent, started first, promoted its standby while Patroni's primary ran"
    );
    assert!(
        acked() > writes_before + 50,
        "writes stopped on Patroni's primary while only a replica's agent ran"
    );

    // 4. The old primary's agent: stops the unguarded postmaster, takes
    //    the leader key and starts the same data as primary under its guard.
    cluster
        .stop_agent(&names[leader_i], Duration::from_secs(30))
        .unwrap();
    let takeover_started = Instant::now();
    agents.0.push(start_agent(leader_i));
    let leader_api = api(api_port(leader_i));
    wait_for(
        "/primary on the old primary's node",
        Duration::from_secs(60),
        || {
            let leader_api = leader_api.clone();
            async move {
                let answer = leader_api.get("/primary").await.ok()?;
                (answer.status.as_u16() == 200).then_some(())
            }
        },
    )
    .await;
    let primary_after = takeover_started.elapsed();
    cluster
        .stop_agent(&names[replicas[1]], Duration::from_secs(30))
        .unwrap();
    agents.0.push(start_agent(replicas[1]));
    wait_for(
        "both replicas streaming from the leader under mainstay",
        Duration::from_secs(90),
        || {
            let leader_api = leader_api.clone();
            async move {
                let doc = leader_api.get("/cluster").await.ok()?.body;
                let streaming = doc["members"]
                    .as_array()?
                    .iter()
                    .filter(|m| m["state"] == "streaming")
                    .count();
                (streaming == 2).then_some(())
            }
        },
    )
    .await;
    let takeover_done = Instant::now();

    // 5. The same data everywhere: same directories, same system, still
    //    timeline 1 (no promotion), and nothing moved aside.
    for (i, node) in cluster.nodes.iter().enumerate() {
        let now = identity(&node.data_dir(), pg_port(i)).await;
        assert_eq!(now, before[i], "{}: the data directory changed", node.name);
        let aside: Vec<String> = std::fs::read_dir(&node.dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n != "data" && n.starts_with("data"))
            .collect();
        assert!(aside.is_empty(), "{}: moved aside: {aside:?}", node.name);
    }
    let timeline = query_one(
        pg_port(leader_i),
        "SELECT timeline_id FROM pg_control_checkpoint()",
    )
    .await
    .unwrap()
    .get::<_, i32>(0);
    assert_eq!(timeline, 1, "the takeover promoted (a new timeline)");

    // 6. Patroni's slots for its members are dropped on the new leader
    //    (mainstay keeps its own), and the dynamic configuration stored.
    let leader_client = common::connect(&conninfo(pg_port(leader_i), ""))
        .await
        .unwrap();
    for slot in &patroni_slots {
        leader_client
            .execute("SELECT pg_drop_replication_slot($1)", &[slot])
            .await
            .unwrap_or_else(|e| panic!("dropping Patroni's slot {slot}: {e}"));
    }
    let dynamic: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(cluster.nodes[leader_i].dir.join("mainstay-dynamic.json"))
            .unwrap(),
    )
    .unwrap();
    let answer = leader_api
        .request(hyper::Method::PUT, "/config", Some(&dynamic))
        .await
        .unwrap();
    assert!(answer.status.is_success(), "PUT /config: {}", answer.text);

    // 7. A switchover on the cluster that results, for comparison.
    let switchover_started = Instant::now();
    let answer = leader_api
        .request(
            hyper::Method::POST,
            "/switchover",
            Some(&serde_json::json!({ "leader": leader })),
        )
        .await
        .unwrap();
    assert!(answer.status.is_success(), "switchover: {}", answer.text);
    let old_port = pg_port(leader_i);
    wait_for(
        "a write on another server",
        Duration::from_secs(60),
        || async {
            let log = log.lock().unwrap();
            log.acked
                .iter()
                .any(|a| a.1 > switchover_started && a.2 != old_port)
                .then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let switchover_done = Instant::now();

    stop.store(true, Ordering::SeqCst);
    let _ = tokio::time::timeout(Duration::from_secs(10), writer).await;
    let log = std::mem::take(&mut *log.lock().unwrap());
    let ids: Vec<i64> = log.acked.iter().map(|a| a.0).collect();
    let new_leader_port = log.acked.last().unwrap().2;
    let present = common::connect(&conninfo(new_leader_port, ""))
        .await
        .unwrap()
        .query_one(
            "SELECT count(*) FROM bench_writes WHERE id = ANY($1)",
            &[&ids],
        )
        .await
        .unwrap()
        .get::<_, i64>(0);
    let lost = ids.len() as i64 - present;
    let takeover_gap = longest_gap(&log.acked, takeover_started, takeover_done);
    let switchover_gap = longest_gap(&log.acked, switchover_started, switchover_done);
    eprintln!(
        "takeover: writes unavailable at most {} ms (old primary's /primary answered 200 after \
         {} ms); switchover afterwards: {} ms; {} writes acknowledged, {lost} lost, {} refused \
         as read-only",
        takeover_gap.as_millis(),
        primary_after.as_millis(),
        switchover_gap.as_millis(),
        ids.len(),
        log.read_only
    );
    assert_eq!(lost, 0, "acknowledged writes lost");
    // Not a benchmark: a bound that only a broken takeover misses.
    assert!(
        takeover_gap < Duration::from_secs(10),
        "writes were unavailable for {takeover_gap:?} during the takeover"
    );

    drop(agents);
    cluster.stop();
    let _ = std::fs::remove_dir_all(&dir);
}
