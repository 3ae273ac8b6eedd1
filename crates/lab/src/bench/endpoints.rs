//! `mainstay bench endpoints`: how fast clients with one fixed address
//! reach the new primary after a failover, on real (namespaced) hosts.
//!
//! Each run builds a lab (three hosts on a bridge and a client, see
//! `mainstay_testkit::netns`) with an etcd member, an agent and PostgreSQL
//! per host and a VIP. Two writers in the client namespace commit
//! continuously, one through the VIP, one through the read-write proxy of a
//! node that survives; a probe watches every surviving PostgreSQL directly
//! to time the promotion. Then the primary's agent and PostgreSQL are
//! killed together. Reported per path: kill -> first acknowledged write,
//! and promotion -> first acknowledged write.
//!
//! For comparison, in the same lab, keepalived (VRRP, advert_int 1) moves
//! another VIP between two hosts: from the master's link going down to the
//! first answer through that VIP from the backup.

use super::distribution;
use crate::demo::{LAB_PG_PORT, LAB_PROXY_PORT, LocalCluster, SUPERUSER, SUPERUSER_PASSWORD};
use mainstay_core::poison;
use mainstay_testkit::netns::{self, Lab};
use std::path::{Path, PathBuf};
use std::process::{Child, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio_postgres::NoTls;

const VIP: &str = "10.213.0.50";
const KEEPALIVED_VIP: &str = "10.213.0.60";
const KEEPALIVED: &str = "/usr/sbin/keepalived";

#[derive(clap::Args, Debug)]
pub struct EndpointsArgs {
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=50))]
    pub runs: u32,
    /// Print one JSON object as the last line of standard output.
    #[arg(long)]
    pub json: bool,
    /// Where the clusters live (default: /dev/shm when it exists).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Keep each run's directory (agent, PostgreSQL, etcd and keepalived
    /// logs) instead of removing it.
    #[arg(long)]
    pub keep: bool,
}

struct RunResult {
    kill_to_write_ms: [u64; 2],
    promotion_to_write_ms: [u64; 2],
    keepalived: KeepalivedFigures,
}

/// keepalived's side of the comparison.
struct KeepalivedFigures {
    /// Master's cable pulled -> first answer from the backup through the VIP.
    move_ms: u64,
    /// keepalived SIGKILLed on the master: how long, within the watch
    /// window, both hosts held the VIP.
    sigkill_both_held_ms: u64,
    /// ... and whether the killed master's host still held it at the end.
    sigkill_left_behind: bool,
}

/// How long the hosts are watched after keepalived is SIGKILLed.
const SIGKILL_WATCH: Duration = Duration::from_secs(8);

pub async fn run(args: EndpointsArgs) -> ExitCode {
    if let Some(why) = netns::unavailable() {
        eprintln!("error: bench endpoints: {why}");
        return ExitCode::from(1);
    }
    if !Path::new(KEEPALIVED).exists() {
        eprintln!(
            "error: {KEEPALIVED} is missing: install it (apt-get install keepalived, or scripts/setup.sh)"
        );
        return ExitCode::from(1);
    }
    let exe = match crate::demo::own_binary() {
        Ok(exe) => exe,
        Err(code) => return code,
    };
    // The whole run happens on a thread inside the lab's client namespace,
    // with its own runtime: every connection it makes crosses the lab's
    // bridge like a real client's.
    let results = super::each_run(
        args.runs,
        "endpoints",
        args.dir.as_deref(),
        args.keep,
        move |dir| one_run_in_lab(dir, &exe),
        |result| {
            format!(
                "kill -> first write: VIP {} ms, proxy {} ms; promotion -> first write: VIP {} \
                 ms, proxy {} ms; keepalived VIP move {} ms; keepalived SIGKILLed: both hosts \
                 held its VIP {} of {} ms, left on the dead one: {}",
                result.kill_to_write_ms[0],
                result.kill_to_write_ms[1],
                result.promotion_to_write_ms[0],
                result.promotion_to_write_ms[1],
                result.keepalived.move_ms,
                result.keepalived.sigkill_both_held_ms,
                SIGKILL_WATCH.as_millis(),
                result.keepalived.sigkill_left_behind
            )
        },
    )
    .await;
    let results = match results {
        Ok(results) => results,
        Err(code) => return code,
    };
    let pick = |f: &dyn Fn(&RunResult) -> u64| -> serde_json::Value {
        distribution(&results.iter().map(f).collect::<Vec<_>>())
    };
    let report = serde_json::json!({
        "runs": results.len(),
        "kill_to_first_write_ms": {
            "vip": pick(&|r| r.kill_to_write_ms[0]),
            "proxy": pick(&|r| r.kill_to_write_ms[1]),
        },
        "promotion_to_first_write_ms": {
            "vip": pick(&|r| r.promotion_to_write_ms[0]),
            "proxy": pick(&|r| r.promotion_to_write_ms[1]),
        },
        "keepalived_vip_move_ms": pick(&|r| r.keepalived.move_ms),
        "keepalived_sigkill_both_held_ms": pick(&|r| r.keepalived.sigkill_both_held_ms),
        "keepalived_sigkill_left_behind_runs": results.iter().filter(|r| r.keepalived.sigkill_left_behind).count(),
        "settings": {
            "hosts": 3,
            "profile": "default",
            "kill": "the primary's node crashes: agent, guard and every PostgreSQL process stopped, then SIGKILLed, at one instant",
            "proxy": "read-write listener of a surviving node",
            "keepalived": "VRRP, advert_int 1, master's link down; then keepalived SIGKILLed on the master, hosts watched for 8 s",
            "mainstay": env!("CARGO_PKG_VERSION"),
        }
    });
    let median = |v: &serde_json::Value| v["median"].as_u64().unwrap_or(0);
    println!(
        "endpoints ({} runs), median ms: kill -> first write VIP {} / proxy {}; promotion -> \
         first write VIP {} / proxy {}; keepalived VIP move {}; keepalived SIGKILLed: both \
         hosts held its VIP {} ms of {}",
        results.len(),
        median(&report["kill_to_first_write_ms"]["vip"]),
        median(&report["kill_to_first_write_ms"]["proxy"]),
        median(&report["promotion_to_first_write_ms"]["vip"]),
        median(&report["promotion_to_first_write_ms"]["proxy"]),
        median(&report["keepalived_vip_move_ms"]),
        median(&report["keepalived_sigkill_both_held_ms"]),
        SIGKILL_WATCH.as_millis(),
    );
    if args.json {
        println!("{report}");
    }
    ExitCode::SUCCESS
}

fn one_run_in_lab(dir: &Path, exe: &Path) -> Result<RunResult, String> {
    let (lab, runtime) = super::client_of_new_lab(3)?;
    runtime.block_on(measure(dir, exe, lab))
}

async fn measure(dir: &Path, exe: &Path, lab: Lab) -> Result<RunResult, String> {
    let mut cluster = LocalCluster::start_in_lab(
        dir,
        lab,
        3,
        exe,
        "default",
        &format!("vip = \"{VIP}/24\"\nvip_interface = \"eth0\"\n"),
    )
    .map_err(|e| format!("starting the lab cluster: {e}"))?;
    let dcs = cluster.dcs().await?;
    let leader = super::healthy(&dcs, 3, Duration::from_secs(120)).await?;
    let l = cluster.node_index(&leader).ok_or("leader vanished")?;
    let survivors: Vec<usize> = (0..cluster.nodes.len()).filter(|&i| i != l).collect();
    // keepalived runs on the two replicas' hosts, so that pulling its
    // master's cable does not also move mainstay's leader.
    let keepalived = keepalived_move(
        &cluster,
        [survivors[0], survivors[1]],
        &dir.join("keepalived"),
    )
    .await?;
    if super::healthy(&dcs, 3, Duration::from_secs(120)).await? != leader {
        return Err("the leader moved during the keepalived measurement".into());
    }
    let proxy_host = cluster.nodes[survivors[0]].host.clone();
    let conninfo = |host: &str, port: u16| {
        format!(
            "host={host} port={port} user={SUPERUSER} password={SUPERUSER_PASSWORD} dbname=postgres"
        )
    };
    // The VIP and the proxy reach the (possibly new) primary: the table
    // exists and both paths write before the clock starts.
    let deadline = Instant::now() + Duration::from_secs(60);
    for (path, (host, port)) in [
        ("VIP", (VIP, LAB_PG_PORT)),
        ("proxy", (proxy_host.as_str(), LAB_PROXY_PORT)),
    ] {
        loop {
            let attempt = async {
                let client = connect(&conninfo(host, port), Duration::from_secs(2)).await?;
                client
                    .batch_execute("CREATE TABLE IF NOT EXISTS bench_endpoints (path text, at timestamptz DEFAULT now())")
                    .await
                    .map_err(|e| pg_error(&e))
            };
            match attempt.await {
                Ok(()) => break,
                Err(err) if Instant::now() > deadline => {
                    return Err(format!("writing through the {path}: {err}"));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    let stop = Arc::new(AtomicBool::new(false));
    let logs: [AckLog; 2] = [Arc::default(), Arc::default()];
    let paths = [
        conninfo(VIP, LAB_PG_PORT),
        conninfo(&proxy_host, LAB_PROXY_PORT),
    ];
    let writers: Vec<_> = paths
        .into_iter()
        .zip(&logs)
        .map(|(conninfo, log)| tokio::spawn(write_loop(conninfo, log.clone(), stop.clone())))
        .collect();
    let probes: Vec<_> = survivors
        .iter()
        .map(|&i| {
            tokio::spawn(promotion_probe(
                conninfo(&cluster.nodes[i].host, LAB_PG_PORT),
                stop.clone(),
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let killed_at = Instant::now();
    cluster.kill_node(l);
    // Bounded: a failover takes seconds; a run without writes on both
    // paths within a minute fails.
    let deadline = killed_at + Duration::from_secs(60);
    let firsts = loop {
        let firsts = logs
            .each_ref()
            .map(|log| first_after(log, killed_at, &leader));
        if firsts.iter().all(Option::is_some) || Instant::now() > deadline {
            break firsts;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    stop.store(true, Ordering::Relaxed);
    for writer in writers {
        let _ = writer.await;
    }
    let mut promoted_at = None;
    for probe in probes {
        if let Some(at) = probe.await.map_err(|e| e.to_string())?
            && at > killed_at
        {
            promoted_at = Some(promoted_at.map_or(at, |p: Instant| p.min(at)));
        }
    }
    let promoted_at = promoted_at.ok_or("no surviving PostgreSQL was seen promoted")?;
    let mut kill_to_write_ms = [0; 2];
    let mut promotion_to_write_ms = [0; 2];
    for (k, path) in ["VIP", "proxy"].iter().enumerate() {
        let first = firsts[k]
            .ok_or_else(|| format!("no write through the {path} within 60 s of the kill"))?;
        kill_to_write_ms[k] = first.duration_since(killed_at).as_millis() as u64;
        promotion_to_write_ms[k] = first.saturating_duration_since(promoted_at).as_millis() as u64;
    }
    cluster.stop_all();
    Ok(RunResult {
        kill_to_write_ms,
        promotion_to_write_ms,
        keepalived,
    })
}

/// The server's message too, not only "db error".
fn pg_error(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{e}: {}", db.message()),
        None => e.to_string(),
    }
}

/// When each write was acknowledged, and by which node's PostgreSQL.
type AckLog = Arc<std::sync::Mutex<Vec<(Instant, String)>>>;

/// The first write after `after` acknowledged by a node other than `old`:
/// a write the old primary acknowledged just after the kill signal was
/// sent, before it landed, does not count as the new primary's.
fn first_after(log: &AckLog, after: Instant, old: &str) -> Option<Instant> {
    poison::lock(log)
        .iter()
        .find(|(at, node)| *at > after && node != old)
        .map(|(at, _)| *at)
}

async fn connect(conninfo: &str, timeout: Duration) -> Result<tokio_postgres::Client, String> {
    let attempt = tokio_postgres::connect(conninfo, NoTls);
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok((client, connection))) => {
            tokio::spawn(connection);
            Ok(client)
        }
        Ok(Err(e)) => Err(pg_error(&e)),
        Err(_) => Err(format!("no connection within {timeout:?}")),
    }
}

/// Commits one row after another through `conninfo`, reconnecting at once
/// after any failure, and records when each commit was acknowledged.
async fn write_loop(conninfo: String, log: AckLog, stop: Arc<AtomicBool>) {
    let mut client: Option<(tokio_postgres::Client, String)> = None;
    while !stop.load(Ordering::Relaxed) {
        if client.is_none() {
            client = reconnect(&conninfo, &stop).await;
            continue;
        }
        let Some((c, node)) = &client else { continue };
        let insert = c.execute("INSERT INTO bench_endpoints (path) VALUES ('w')", &[]);
        match tokio::time::timeout(Duration::from_millis(500), insert).await {
            Ok(Ok(_)) => {
                let acked = (Instant::now(), node.clone());
                poison::lock(&log).push(acked);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            _ => client = None,
        }
    }
}

/// A new connection, as soon as the path works: an attempt starts every
/// 20 ms while earlier ones are pending (each may hang: SYNs to a VIP whose
/// holder is gone go unanswered, and the proxy holds a new client until a
/// primary leads), each gives up after 160 ms, and the first to succeed
/// wins. So the measured time is the path's, within 20 ms, not a client
/// timeout's; and at most 8 attempts pend, as a pool of a few connections
/// would, not a crowd that would all log in at once when the path opens.
async fn reconnect(conninfo: &str, stop: &AtomicBool) -> Option<(tokio_postgres::Client, String)> {
    let mut attempts = tokio::task::JoinSet::new();
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    while !stop.load(Ordering::Relaxed) {
        tokio::select! {
            _ = tick.tick() => {
                if attempts.len() < 8 {
                    let conninfo = conninfo.to_string();
                    attempts.spawn(async move {
                        let c = connect(&conninfo, Duration::from_millis(160)).await?;
                        let node = node_name(&c).await?;
                        Ok::<_, String>((c, node))
                    });
                }
            }
            Some(done) = attempts.join_next() => {
                if let Ok(Ok(connected)) = done {
                    return Some(connected);
                }
            }
        }
    }
    None
}

/// Which node a connection reached (lab data directories are
/// `<dir>/<node>/data`).
async fn node_name(client: &tokio_postgres::Client) -> Result<String, String> {
    let row = tokio::time::timeout(
        Duration::from_millis(500),
        client.query_one("SELECT current_setting('data_directory')", &[]),
    )
    .await
    .map_err(|_| "no answer".to_string())?
    .map_err(|e| pg_error(&e))?;
    let dir: String = row.get(0);
    Ok(dir.rsplit('/').nth(1).unwrap_or_default().to_string())
}

/// Watches one PostgreSQL directly; returns when it was first seen out of
/// recovery (promoted), polling every 5 ms.
async fn promotion_probe(conninfo: String, stop: Arc<AtomicBool>) -> Option<Instant> {
    let mut client = None;
    while !stop.load(Ordering::Relaxed) {
        if client.is_none() {
            client = connect(&conninfo, Duration::from_millis(300)).await.ok();
        }
        if let Some(c) = &client {
            match c.query_one("SELECT pg_is_in_recovery()", &[]).await {
                Ok(row) if !row.get::<_, bool>(0) => return Some(Instant::now()),
                Ok(_) => {}
                Err(_) => client = None,
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    None
}

/// keepalived on `hosts` (master, backup) with a VIP of its own; the
/// master's cable is pulled, and the time to the first answer from the
/// backup's PostgreSQL through that VIP is measured. The cable goes back in
/// and, once the master holds the VIP again, its keepalived is SIGKILLed:
/// the hosts' addresses are watched for what happens to the VIP.
async fn keepalived_move(
    cluster: &LocalCluster,
    hosts: [usize; 2],
    dir: &Path,
) -> Result<KeepalivedFigures, String> {
    let lab = cluster.lab.as_ref().ok_or("not a lab cluster")?;
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let mut daemons = Vec::new();
    for (i, (state, priority)) in [("MASTER", 150), ("BACKUP", 100)].into_iter().enumerate() {
        let host = hosts[i];
        let config = dir.join(format!("keepalived{i}.conf"));
        std::fs::write(
            &config,
            format!(
                "global_defs {{\n    router_id bench{i}\n}}\n\
                 vrrp_instance bench {{\n    state {state}\n    interface eth0\n    \
                 virtual_router_id 51\n    priority {priority}\n    advert_int 1\n    \
                 virtual_ipaddress {{\n        {KEEPALIVED_VIP}/24 dev eth0\n    }}\n}}\n"
            ),
        )
        .map_err(|e| e.to_string())?;
        let log = std::fs::File::create(dir.join(format!("keepalived{i}.log")))
            .map_err(|e| e.to_string())?;
        let mut command = Lab::command(lab.host(host), KEEPALIVED);
        command
            .args(["--dont-fork", "--log-console", "--vrrp", "--use-file"])
            .arg(&config)
            .arg("--pid")
            .arg(dir.join(format!("keepalived{i}.pid")))
            .arg("--vrrp_pid")
            .arg(dir.join(format!("vrrp{i}.pid")))
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log);
        daemons.push(Daemon(
            command
                .spawn()
                .map_err(|e| format!("starting keepalived: {e}"))?,
        ));
    }
    let answer = async |expect: &str| -> bool {
        let conninfo = format!(
            "host={KEEPALIVED_VIP} port={LAB_PG_PORT} user={SUPERUSER} password={SUPERUSER_PASSWORD} dbname=postgres"
        );
        let Ok(client) = connect(&conninfo, Duration::from_millis(300)).await else {
            return false;
        };
        let row = tokio::time::timeout(
            Duration::from_millis(500),
            client.query_one("SELECT current_setting('data_directory')", &[]),
        )
        .await;
        matches!(row, Ok(Ok(row)) if row.get::<_, String>(0).contains(expect))
    };
    let (master, backup) = (
        format!("/{}/", cluster.nodes[hosts[0]].name),
        format!("/{}/", cluster.nodes[hosts[1]].name),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !answer(&master).await {
        if Instant::now() > deadline {
            return Err("keepalived's VIP never answered from its master".into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let cut_at = Instant::now();
    lab.set_link(hosts[0], false).map_err(|e| e.to_string())?;
    let deadline = cut_at + Duration::from_secs(30);
    let moved = loop {
        if answer(&backup).await {
            break cut_at.elapsed();
        }
        if Instant::now() > deadline {
            let _ = lab.set_link(hosts[0], true);
            return Err("keepalived's VIP never answered from the backup".into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    lab.set_link(hosts[0], true).map_err(|e| e.to_string())?;
    // The master preempts on its return.
    let holds = |host: usize| {
        lab.addresses(host).is_ok_and(|a| {
            a.iter()
                .any(|a| a.starts_with(&format!("{KEEPALIVED_VIP}/")))
        })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !holds(hosts[0]) || holds(hosts[1]) {
        if Instant::now() > deadline {
            return Err("keepalived's master did not take its VIP back".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // SIGKILL of every keepalived process of the master (the parent and its
    // VRRP child): nothing runs that could remove the address.
    let vrrp_pid = std::fs::read_to_string(dir.join("vrrp0.pid"))
        .ok()
        .and_then(|t| t.trim().parse::<i32>().ok());
    let master = daemons.remove(0);
    if let Some(pid) = vrrp_pid {
        let _ = mainstay_sys::process::kill(pid, libc::SIGKILL);
    }
    drop(master);
    let killed_at = Instant::now();
    let mut both_held = Duration::ZERO;
    let mut last = killed_at;
    while killed_at.elapsed() < SIGKILL_WATCH {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = Instant::now();
        if holds(hosts[0]) && holds(hosts[1]) {
            both_held += now - last;
        }
        last = now;
    }
    let left_behind = holds(hosts[0]);
    drop(daemons);
    Ok(KeepalivedFigures {
        move_ms: moved.as_millis() as u64,
        sigkill_both_held_ms: both_held.as_millis() as u64,
        sigkill_left_behind: left_behind,
    })
}

/// A process killed (by PID) when dropped.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
