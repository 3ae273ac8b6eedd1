//! `mainstay bench failover|switchover` (and `proxy`, in its own module): a 3-node cluster on loopback, a
//! steady single-row INSERT load through a read-write multi-host connection,
//! and either a crash of the primary's whole node (agent, guard and every PostgreSQL process at one instant), or a
//! planned switchover through the REST API. Reports write unavailability and
//! acknowledged writes missing afterwards, over several runs:
//! - failover: kill -> first acknowledged write on the new primary;
//! - switchover: last acknowledged write on the old primary -> first on the
//!   new one, plus writes refused by a read-only node (target 0).
//!
//! `--mode sync` turns `synchronous_mode` on through the first node's REST
//! API once the cluster is healthy, and starts the load only when a member is
//! listed as synchronous standby: the `lost` count then measures the
//! zero-loss promise instead of asynchronous replication's window.

use crate::demo::LocalCluster;
use mainstay_core::PgRole;
use mainstay_core::poison;
use mainstay_dcs::Dcs;
use mainstay_testkit::netns::Lab;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_postgres::NoTls;

mod compare;
mod endpoints;
pub mod files;
mod install;
pub mod platform;
mod proxy;

#[derive(clap::Subcommand, Debug)]
pub enum BenchCommand {
    /// Crash the primary under load and measure the failover.
    Failover(FailoverArgs),
    /// Planned switchover under load: measure the pause in writes.
    Switchover(FailoverArgs),
    /// pgbench TPS direct, through mainstay's proxy and through HAProxy.
    Proxy(proxy::ProxyArgs),
    /// Failover as clients with one address see it: VIP and proxy (root).
    Endpoints(endpoints::EndpointsArgs),
    /// Side by side with Patroni + HAProxy: failover, switchover, losses,
    /// agent footprint.
    Compare(compare::CompareArgs),
    /// The platform (Synapse, coturn, the VIP) through a crash of the
    /// leader's host, as a Matrix client sees it (root).
    Platform(platform::PlatformArgs),
    /// Replicated directories in the lab: lag, resync after a failback
    /// beside rsync, uploads lost in a crash, agent memory (root).
    Files(files::FilesArgs),
    /// Two servers and a witness from `mainstay init` to a write through
    /// the VIP, then their four failures (root).
    Install(install::InstallArgs),
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Disruption {
    Kill,
    Switchover,
}

#[derive(clap::Args, Debug)]
pub struct FailoverArgs {
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub runs: u32,
    /// Print one JSON object as the last line of standard output.
    #[arg(long)]
    pub json: bool,
    /// Replication mode: async, or sync (`synchronous_mode` turned on
    /// through the REST API before the load starts).
    #[arg(long, default_value = "async")]
    pub mode: String,
    /// Agent timing profile: default or fast.
    #[arg(long, default_value = "default")]
    pub profile: String,
    /// Where the clusters live (default: /dev/shm when it exists).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

pub async fn run(command: BenchCommand) -> ExitCode {
    match command {
        BenchCommand::Failover(args) => failover(args, Disruption::Kill).await,
        BenchCommand::Switchover(args) => failover(args, Disruption::Switchover).await,
        BenchCommand::Proxy(args) => proxy::run(args).await,
        BenchCommand::Endpoints(args) => endpoints::run(args).await,
        BenchCommand::Compare(args) => compare::run(args).await,
        BenchCommand::Platform(args) => platform::run(args).await,
        BenchCommand::Files(args) => files::run(args).await,
        BenchCommand::Install(args) => install::run(args).await,
    }
}

struct RunResult {
    unavailability_ms: u64,
    acked: usize,
    lost: usize,
    idle_rss_bytes: u64,
    writes_to_read_only: usize,
}

/// min/median/max; the median of an even count is the rounded mean of the two
/// middle values (docs/rules.md section 9).
pub fn distribution(values: &[u64]) -> serde_json::Value {
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    let n = sorted.len();
    let median = if n == 0 {
        0
    } else if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]).div_ceil(2)
    };
    serde_json::json!({"min": sorted.first().copied().unwrap_or(0), "median": median, "max": sorted.last().copied().unwrap_or(0)})
}

async fn failover(args: FailoverArgs, disruption: Disruption) -> ExitCode {
    let what = match disruption {
        Disruption::Kill => "failover",
        Disruption::Switchover => "switchover",
    };
    let sync = match args.mode.as_str() {
        "async" => false,
        "sync" => true,
        _ => {
            eprintln!(
                "error: --mode {:?}: use `async` (asynchronous replication) or `sync` (synchronous_mode on)",
                args.mode
            );
            return ExitCode::from(2);
        }
    };
    if args.profile != "default" && args.profile != "fast" {
        eprintln!(
            "error: --profile {:?}: use `default` or `fast`",
            args.profile
        );
        return ExitCode::from(2);
    }
    let exe = match crate::demo::own_binary() {
        Ok(exe) => exe,
        Err(code) => return code,
    };
    let mut results = Vec::new();
    for run in 1..=args.runs {
        let dir = scratch_dir(args.dir.as_deref(), what);
        match one_run(&dir, &exe, &args.profile, disruption, sync).await {
            Ok(result) => {
                eprintln!(
                    "run {run}/{}: unavailable {} ms, {} writes acknowledged, {} lost, {} refused by a read-only node, idle agent + guard RSS {:.1} MB",
                    args.runs,
                    result.unavailability_ms,
                    result.acked,
                    result.lost,
                    result.writes_to_read_only,
                    result.idle_rss_bytes as f64 / 1e6
                );
                results.push(result);
                // The benchmark's own throwaway directory.
                let _ = std::fs::remove_dir_all(&dir);
            }
            Err(err) => {
                eprintln!(
                    "error: run {run} failed: {err} (files kept in {})",
                    dir.display()
                );
                return ExitCode::from(1);
            }
        }
    }
    let unavailability: Vec<u64> = results.iter().map(|r| r.unavailability_ms).collect();
    let rss: Vec<u64> = results.iter().map(|r| r.idle_rss_bytes).collect();
    let lost: usize = results.iter().map(|r| r.lost).sum();
    let acked: usize = results.iter().map(|r| r.acked).sum();
    let read_only: usize = results.iter().map(|r| r.writes_to_read_only).sum();
    let report = serde_json::json!({
        "runs": results.len(),
        "unavailability_ms": distribution(&unavailability),
        "lost_acked_writes": lost,
        "acked_writes": acked,
        "writes_to_read_only": read_only,
        "agent_and_guard_idle_rss_bytes": distribution(&rss),
        "settings": {
            "mode": args.mode,
            "profile": args.profile,
            "nodes": 3,
            "ttl_s": if args.profile == "fast" { 2 } else { 4 },
            "mainstay": env!("CARGO_PKG_VERSION"),
            "postgresql": "15",
            "etcd": etcd_version(),
            "disruption": match disruption {
                Disruption::Kill => "the primary's node crashes: agent, guard and every PostgreSQL process stopped, then SIGKILLed, at one instant",
                Disruption::Switchover => "POST /switchover to the leader's REST API",
            },
        }
    });
    let u = distribution(&unavailability);
    println!(
        "{what} ({} profile, {} mode, {} runs): unavailability min {} / median {} / max {} ms; {lost} of {acked} acknowledged writes lost; {read_only} writes refused by a read-only node",
        args.profile,
        args.mode,
        results.len(),
        u["min"],
        u["median"],
        u["max"]
    );
    if args.json {
        println!("{report}");
    }
    ExitCode::SUCCESS
}

/// A lab of `hosts` hosts, with the calling thread moved into its client
/// namespace and a runtime whose threads start there too: every
/// connection made on it crosses the lab's bridge like a real client's.
pub fn client_of_new_lab(hosts: usize) -> Result<(Lab, tokio::runtime::Runtime), String> {
    let lab = Lab::create(hosts).map_err(|e| format!("building the lab: {e}"))?;
    mainstay_testkit::netns::enter(&format!("/run/netns/{}", lab.client()))
        .map_err(|e| format!("entering the client namespace: {e}"))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    Ok((lab, runtime))
}

/// Runs `one_run` `runs` times, each in a fresh scratch directory on a
/// blocking thread of its own (it may enter a namespace), printing each
/// run's line (`describe`). A run's directory is removed after it unless
/// `keep`, and kept when it fails; the first failure ends the benchmark
/// with exit status 1.
async fn each_run<R: Send + 'static>(
    runs: u32,
    what: &str,
    base: Option<&Path>,
    keep: bool,
    one_run: impl Fn(&Path) -> Result<R, String> + Send + Sync + Clone + 'static,
    describe: impl Fn(&R) -> String,
) -> Result<Vec<R>, ExitCode> {
    let mut results = Vec::new();
    for run in 1..=runs {
        let dir = scratch_dir(base, what);
        let (one_run, run_dir) = (one_run.clone(), dir.clone());
        match tokio::task::spawn_blocking(move || one_run(&run_dir)).await {
            Ok(Ok(result)) => {
                eprintln!("run {run}/{runs}: {}", describe(&result));
                results.push(result);
                if keep {
                    eprintln!("files kept in {}", dir.display());
                } else {
                    let _ = std::fs::remove_dir_all(&dir);
                }
            }
            Ok(Err(err)) => {
                eprintln!("error: run {run}: {err} (files kept in {})", dir.display());
                return Err(ExitCode::from(1));
            }
            Err(err) => {
                eprintln!(
                    "error: run {run} panicked: {err} (files kept in {})",
                    dir.display()
                );
                return Err(ExitCode::from(1));
            }
        }
    }
    Ok(results)
}

/// A fresh directory name for one benchmark cluster, under `base` or
/// /dev/shm (tmpfs: fsync costs nothing, so the figures measure mainstay).
fn scratch_dir(base: Option<&Path>, what: &str) -> PathBuf {
    let base = base.map(Path::to_path_buf).unwrap_or_else(|| {
        if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        }
    });
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    base.join(format!(
        "mainstay-bench-{what}-{}-{stamp}",
        std::process::id()
    ))
}

/// The leader once it runs as primary with every other member of a
/// `members`-node cluster streaming from it.
pub(crate) async fn healthy(
    dcs: &mainstay_dcs::EtcdDcs,
    members: usize,
    timeout: Duration,
) -> Result<String, String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(view) = dcs.read_cluster().await
            && let Some(leader) = view.leader_status()
            && leader.role == PgRole::Primary
            && view.members.len() == members
            && view
                .members
                .values()
                .filter(|m| {
                    m.status.streaming && m.status.following.as_deref() == Some(&leader.name)
                })
                .count()
                == members - 1
        {
            return Ok(leader.name.clone());
        }
        if Instant::now() > deadline {
            return Err(format!("the cluster was not healthy within {timeout:?}"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn etcd_version() -> String {
    std::process::Command::new("/usr/bin/etcd")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| {
            s.lines()
                .next()
                .map(|l| l.trim_start_matches("etcd Version: ").to_string())
        })
        .unwrap_or_default()
}

fn rss_bytes(pid: u32) -> u64 {
    crate::replicated::proc_status_bytes(pid, "VmRSS:")
}

#[derive(Default)]
pub struct WriterLog {
    /// (id, acknowledged at, port of the server that acknowledged it)
    pub acked: Vec<(i64, Instant, u16)>,
    /// INSERTs refused because the server was read-only (SQLSTATE 25006):
    /// a write routed to a node that is not the primary.
    pub read_only: usize,
}

async fn one_run(
    dir: &Path,
    exe: &Path,
    profile: &str,
    disruption: Disruption,
    sync: bool,
) -> Result<RunResult, String> {
    let mut cluster = LocalCluster::start(dir, 3, exe, profile)
        .map_err(|e| format!("starting the cluster: {e}"))?;
    let dcs = cluster.dcs().await?;
    let leader = healthy(&dcs, 3, Duration::from_secs(90)).await?;
    if sync {
        enable_synchronous_mode(&cluster, &leader).await?;
    }
    let conninfo = cluster.multi_host_conninfo();
    let (client, connection) = connect_rw(&conninfo)
        .await
        .map_err(|e| format!("connecting before the test: {e}"))?;
    tokio::spawn(connection);
    client
        .batch_execute("CREATE TABLE IF NOT EXISTS bench_writes (id bigint PRIMARY KEY, at timestamptz DEFAULT now())")
        .await
        .map_err(|e| e.to_string())?;
    drop(client);
    // Idle RSS of a replica's agent, after the cluster settled.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let replica = cluster
        .nodes
        .iter()
        .position(|n| n.name != leader)
        .unwrap_or(0);
    // The agent and its PostgreSQL's fencing guard: what mainstay adds.
    let idle_rss_bytes = cluster.agent_pid(replica).map_or(0, rss_bytes)
        + cluster.guard_pid(replica).map_or(0, rss_bytes);

    let log = Arc::new(Mutex::new(WriterLog::default()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = tokio::spawn(write_loop(conninfo.clone(), log.clone(), stop.clone()));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let index = cluster.node_index(&leader).ok_or("leader vanished")?;
    let old_port = cluster.nodes[index].pg_port;
    let killed_at = Instant::now();
    let switchover = match disruption {
        Disruption::Kill => {
            cluster.kill_node(index);
            None
        }
        Disruption::Switchover => {
            let api = cluster.nodes[index]
                .api()
                .with_timeout(Duration::from_secs(60));
            let body = serde_json::json!({ "leader": leader });
            Some(tokio::spawn(async move {
                api.request(hyper::Method::POST, "/switchover", Some(&body))
                    .await
            }))
        }
    };
    // Wait for the first acknowledged write after the kill.
    let deadline = killed_at + Duration::from_secs(60);
    let recovered_at = loop {
        if Instant::now() > deadline {
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
            return Err("no write was acknowledged within 60 s of the kill".into());
        }
        // Backends of the killed postmaster may still answer for a few
        // milliseconds; only the new primary's answers end the outage.
        let first = log
            .lock()
            .unwrap()
            .acked
            .iter()
            .find(|(_, at, port)| *at > killed_at && *port != old_port)
            .map(|(_, at, _)| *at);
        if let Some(at) = first {
            break at;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    if let Some(request) = switchover {
        let answer = request
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("the switchover request failed: {e}"))?;
        if !answer.status.is_success() {
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
            return Err(format!("the switchover was refused: {}", answer.text));
        }
    }
    // A planned switchover's outage starts with the last write the old
    // primary acknowledged, not with the request.
    let outage_start = match disruption {
        Disruption::Kill => killed_at,
        Disruption::Switchover => log
            .lock()
            .unwrap()
            .acked
            .iter()
            .filter(|(_, at, port)| *port == old_port && *at < recovered_at)
            .map(|(_, at, _)| *at)
            .max()
            .unwrap_or(killed_at),
    };
    let (acked, lost) = settle_and_count(&conninfo, &log, &stop, writer).await?;
    let writes_to_read_only = log.lock().unwrap().read_only;
    cluster.stop_all();
    Ok(RunResult {
        unavailability_ms: recovered_at.duration_since(outage_start).as_millis() as u64,
        acked,
        lost,
        idle_rss_bytes,
        writes_to_read_only,
    })
}

/// Lets the writer run one more second, stops it, and counts the writes
/// it had acknowledged and those of them missing from `bench_writes` now.
async fn settle_and_count(
    conninfo: &str,
    log: &Mutex<WriterLog>,
    stop: &std::sync::atomic::AtomicBool,
    writer: tokio::task::JoinHandle<()>,
) -> Result<(usize, usize), String> {
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let _ = writer.await;
    let acked: Vec<i64> = poison::lock(log)
        .acked
        .iter()
        .map(|(id, _, _)| *id)
        .collect();
    let (client, connection) = connect_rw(conninfo)
        .await
        .map_err(|e| format!("connecting after the fault: {e}"))?;
    tokio::spawn(connection);
    let present: BTreeSet<i64> = client
        .query("SELECT id FROM bench_writes", &[])
        .await
        .map_err(|e| e.to_string())?
        .iter()
        .map(|row| row.get(0))
        .collect();
    let lost = acked.iter().filter(|id| !present.contains(id)).count();
    Ok((acked.len(), lost))
}

/// Turns `synchronous_mode` on through the first node's REST API (a JSON
/// merge patch of the dynamic configuration, with the demo's credentials),
/// then waits until the leader's `GET /cluster` lists a member as
/// `sync_standby`: only then do acknowledged commits wait for a standby. At
/// most 30 s in all.
pub(crate) async fn enable_synchronous_mode(
    cluster: &LocalCluster,
    leader: &str,
) -> Result<(), String> {
    let api_of = |name: &str| Some(cluster.nodes.iter().find(|n| n.name == name)?.api());
    let node = cluster.nodes.first().ok_or("the cluster has no node")?;
    let api = api_of(&node.name).ok_or("the cluster has no node")?;
    let leader_api = api_of(leader).ok_or("the leader vanished")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let patch = serde_json::json!({ "synchronous_mode": true });
    loop {
        let refusal = match api
            .request(hyper::Method::PATCH, "/config", Some(&patch))
            .await
        {
            Ok(answer) if answer.status.is_success() => break,
            // 409: the configuration changed meanwhile; 503: etcd did not
            // answer. Both are worth another try; anything else is final.
            Ok(answer)
                if answer.status == hyper::StatusCode::CONFLICT
                    || answer.status == hyper::StatusCode::SERVICE_UNAVAILABLE =>
            {
                format!("{}: {}", answer.status, answer.text)
            }
            Ok(answer) => {
                return Err(format!(
                    "PATCH /config {patch} on {} was refused: {}: {}",
                    node.name, answer.status, answer.text
                ));
            }
            Err(err) => err.to_string(),
        };
        if Instant::now() > deadline {
            return Err(format!(
                "could not turn synchronous_mode on through {}'s API within 30 s: {refusal}",
                node.name
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut last = String::new();
    while Instant::now() < deadline {
        match leader_api.get("/cluster").await {
            Ok(answer) if answer.status.is_success() => {
                let listed = answer.body["members"]
                    .as_array()
                    .is_some_and(|m| m.iter().any(|m| m["role"] == "sync_standby"));
                if listed {
                    return Ok(());
                }
                last = answer.text;
            }
            Ok(answer) => last = format!("{}: {}", answer.status, answer.text),
            Err(err) => last = err.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!(
        "synchronous_mode is on but no member was listed as sync_standby within 30 s; last GET /cluster on the leader {leader}: {last}"
    ))
}

/// Connects to the writable node, retrying for a few seconds: right after an
/// election the new primary may still be finishing its promotion.
async fn connect_rw(
    conninfo: &str,
) -> Result<
    (
        tokio_postgres::Client,
        tokio_postgres::Connection<tokio_postgres::Socket, tokio_postgres::tls::NoTlsStream>,
    ),
    String,
> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match tokio_postgres::connect(conninfo, NoTls).await {
            Ok(pair) => return Ok(pair),
            Err(err) if Instant::now() > deadline => return Err(format!("{err:?}")),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// One connection, one INSERT at a time; reconnects through the multi-host
/// string on any error. A write whose commit was in flight when the server
/// died is an unknown outcome: it is neither acknowledged nor counted.
pub async fn write_loop(
    conninfo: String,
    log: Arc<Mutex<WriterLog>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    let mut next_id: i64 = 1;
    let started = Instant::now();
    while !stop.load(std::sync::atomic::Ordering::SeqCst)
        && started.elapsed() < Duration::from_secs(120)
    {
        let client = match tokio_postgres::connect(&conninfo, NoTls).await {
            Ok((client, connection)) => {
                tokio::spawn(connection);
                client
            }
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let Ok(statement) = client
            .prepare("INSERT INTO bench_writes (id) VALUES ($1)")
            .await
        else {
            continue;
        };
        let Ok(row) = client.query_one("SELECT inet_server_port()", &[]).await else {
            continue;
        };
        let port = row.get::<_, Option<i32>>(0).unwrap_or(0) as u16;
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            let id = next_id;
            next_id += 1;
            match tokio::time::timeout(Duration::from_secs(2), client.execute(&statement, &[&id]))
                .await
            {
                Ok(Ok(_)) => log.lock().unwrap().acked.push((id, Instant::now(), port)),
                Ok(Err(err)) => {
                    if err.code()
                        == Some(&tokio_postgres::error::SqlState::READ_ONLY_SQL_TRANSACTION)
                    {
                        log.lock().unwrap().read_only += 1;
                    }
                    break;
                }
                Err(_) => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_follow_the_convention() {
        assert_eq!(
            distribution(&[3, 1, 2]),
            serde_json::json!({"min":1,"median":2,"max":3})
        );
        assert_eq!(
            distribution(&[4, 1, 2, 3]),
            serde_json::json!({"min":1,"median":3,"max":4})
        );
    }
}
