//! `mainstay bench compare`: the same 3-node loopback topology, the same
//! PostgreSQL 15, the same etcd and the same writer, driven by Patroni +
//! HAProxy and by mainstay, runs alternating on one machine.
//!
//! - Patroni (from PyPI, in a virtualenv `bench/patroni/install.sh` makes)
//!   at its defaults (ttl 30, loop_wait 10, retry_timeout 10) and at its
//!   smallest legal timing (ttl 20, loop_wait 1, retry_timeout 3), reached
//!   through HAProxy configured as Patroni documents it (`option httpchk
//!   OPTIONS /primary`, `inter 1s fall 2 rise 1 on-marked-down
//!   shutdown-sessions`);
//! - mainstay at its default and fast profiles, reached through its own
//!   read-write proxies (a multi-host connection string over the three).
//!
//! Per run: a crash failover for each of the four (agent and postmaster
//! SIGKILLed together: the host dies), a planned switchover for each system,
//! and a crash in synchronous mode for each system. Unavailability is from
//! the kill to the first write a different server acknowledges (switchover:
//! from the last write on the old primary). Lost: acknowledged ids missing
//! afterwards. Once, on idle healthy clusters: one replica agent's RSS
//! (median of samples each second) and CPU over `--idle-seconds`.

use super::{
    WriterLog, connect_rw, distribution, enable_synchronous_mode, rss_bytes, scratch_dir,
    write_loop,
};
use crate::demo::{LocalCluster, SUPERUSER, SUPERUSER_PASSWORD};
use crate::patroni::{PatroniCluster, PatroniNode, PatroniTiming, install_patroni};
use mainstay_core::poison;
use mainstay_sys::process;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug)]
pub struct CompareArgs {
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    runs: u32,
    /// Print one JSON object as the last line of standard output.
    #[arg(long)]
    json: bool,
    /// Seconds of idle sampling for agent RSS and CPU (once per system).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(5..=600))]
    idle_seconds: u64,
    /// Where the clusters live (default: /dev/shm when it exists).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Patroni's virtualenv (made by bench/patroni/install.sh when missing).
    #[arg(long, default_value = "/var/tmp/mainstay-bench/patroni-venv")]
    venv: PathBuf,
}

const PATRONI_DEFAULT: PatroniTiming = PatroniTiming {
    ttl: 30,
    loop_wait: 10,
    retry_timeout: 10,
};
/// Patroni refuses a ttl below 20 and wants loop_wait + 2 × retry_timeout
/// within it.
const PATRONI_FASTEST: PatroniTiming = PatroniTiming {
    ttl: 20,
    loop_wait: 1,
    retry_timeout: 3,
};

#[derive(Clone, Copy, Debug)]
enum Contender {
    Patroni(PatroniTiming),
    Mainstay(&'static str),
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Fault {
    Crash,
    Switchover,
}

/// A measurement slot: who, what, and in which replication mode.
struct Case {
    key: &'static str,
    contender: Contender,
    fault: Fault,
    sync: bool,
}

const CASES: [Case; 8] = [
    Case {
        key: "patroni_default",
        contender: Contender::Patroni(PATRONI_DEFAULT),
        fault: Fault::Crash,
        sync: false,
    },
    Case {
        key: "mainstay_default",
        contender: Contender::Mainstay("default"),
        fault: Fault::Crash,
        sync: false,
    },
    Case {
        key: "patroni_fastest",
        contender: Contender::Patroni(PATRONI_FASTEST),
        fault: Fault::Crash,
        sync: false,
    },
    Case {
        key: "mainstay_fast",
        contender: Contender::Mainstay("fast"),
        fault: Fault::Crash,
        sync: false,
    },
    Case {
        key: "patroni_switchover",
        contender: Contender::Patroni(PATRONI_DEFAULT),
        fault: Fault::Switchover,
        sync: false,
    },
    Case {
        key: "mainstay_switchover",
        contender: Contender::Mainstay("default"),
        fault: Fault::Switchover,
        sync: false,
    },
    Case {
        key: "patroni_sync",
        contender: Contender::Patroni(PATRONI_FASTEST),
        fault: Fault::Crash,
        sync: true,
    },
    Case {
        key: "mainstay_sync",
        contender: Contender::Mainstay("default"),
        fault: Fault::Crash,
        sync: true,
    },
];

/// What one case measured.
struct Measured {
    unavailable_ms: u64,
    acked: usize,
    lost: usize,
}

/// An idle agent's footprint.
struct Idle {
    rss_bytes: u64,
    cpu_percent: f64,
}

pub async fn run(args: CompareArgs) -> ExitCode {
    let exe = match crate::demo::own_binary() {
        Ok(exe) => exe,
        Err(code) => return code,
    };
    let patroni = match install_patroni(&args.venv) {
        Ok(path) => path,
        Err(e) => {
            eprintln!("error: installing Patroni: {e}");
            return ExitCode::from(1);
        }
    };
    let version = Command::new(&patroni)
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    eprintln!("comparing with {version} ({})", patroni.display());
    let mut results: Vec<(usize, Measured)> = Vec::new();
    let mut idle: [Option<Idle>; 2] = [None, None];
    for run in 1..=args.runs {
        for (c, case) in CASES.iter().enumerate() {
            let dir = scratch_dir(args.dir.as_deref(), case.key);
            // Idle footprint once per system, on its default cluster.
            let sample = match (run, c) {
                (1, 0) => Some(0),
                (1, 1) => Some(1),
                _ => None,
            };
            let outcome = one_case(
                &dir,
                &exe,
                &patroni,
                case,
                sample.map(|_| Duration::from_secs(args.idle_seconds)),
            )
            .await;
            match outcome {
                Ok((measured, footprint)) => {
                    eprintln!(
                        "run {run}/{} {}: unavailable {} ms, {} acknowledged, {} lost",
                        args.runs, case.key, measured.unavailable_ms, measured.acked, measured.lost
                    );
                    if let (Some(i), Some(f)) = (sample, footprint) {
                        eprintln!(
                            "  idle agent: {:.1} MB RSS, {:.2} % of a core",
                            f.rss_bytes as f64 / 1e6,
                            f.cpu_percent
                        );
                        idle[i] = Some(f);
                    }
                    results.push((c, measured));
                    let _ = std::fs::remove_dir_all(&dir);
                }
                Err(e) => {
                    eprintln!(
                        "error: run {run} {}: {e} (files kept in {})",
                        case.key,
                        dir.display()
                    );
                    return ExitCode::from(1);
                }
            }
        }
    }
    let of = |key: &str| -> Vec<&Measured> {
        results
            .iter()
            .filter(|(c, _)| CASES[*c].key == key)
            .map(|(_, m)| m)
            .collect()
    };
    let unavailable =
        |key: &str| distribution(&of(key).iter().map(|m| m.unavailable_ms).collect::<Vec<_>>());
    let lost = |keys: &[&str]| -> usize { keys.iter().flat_map(|k| of(k)).map(|m| m.lost).sum() };
    let idle_of = |i: usize| idle[i].as_ref();
    let summary = json!({
        "runs": args.runs,
        "crash_unavailability_ms": {
            "patroni_default": unavailable("patroni_default"),
            "patroni_fastest": unavailable("patroni_fastest"),
            "mainstay_default": unavailable("mainstay_default"),
            "mainstay_fast": unavailable("mainstay_fast"),
        },
        "switchover_unavailability_ms": {
            "patroni": unavailable("patroni_switchover"),
            "mainstay": unavailable("mainstay_switchover"),
        },
        "lost_acked_writes": {
            "patroni_async": lost(&["patroni_default", "patroni_fastest"]),
            "patroni_sync": lost(&["patroni_sync"]),
            "mainstay_async": lost(&["mainstay_default", "mainstay_fast"]),
            "mainstay_sync": lost(&["mainstay_sync"]),
        },
        "agent_rss_bytes": {
            "patroni": idle_of(0).map_or(0, |i| i.rss_bytes),
            "mainstay": idle_of(1).map_or(0, |i| i.rss_bytes),
        },
        "agent_idle_cpu_percent": {
            "patroni": idle_of(0).map_or(0.0, |i| round2(i.cpu_percent)),
            "mainstay": idle_of(1).map_or(0.0, |i| round2(i.cpu_percent)),
        },
    });
    print_table(&summary, &version);
    if args.json {
        println!("{summary}");
    }
    ExitCode::SUCCESS
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn print_table(s: &Value, version: &str) {
    let d = |v: &Value| format!("{} / {} / {}", v["min"], v["median"], v["max"]);
    println!(
        "Runs: {}; {version} vs mainstay {}; min / median / max in ms",
        s["runs"],
        env!("CARGO_PKG_VERSION")
    );
    println!("| measure | Patroni | mainstay |");
    println!("|---|---|---|");
    let crash = &s["crash_unavailability_ms"];
    println!(
        "| crash failover, defaults (Patroni ttl 30, loop_wait 10, retry_timeout 10; mainstay default) | {} | {} |",
        d(&crash["patroni_default"]),
        d(&crash["mainstay_default"])
    );
    println!(
        "| crash failover, fastest (Patroni ttl 20, loop_wait 1, retry_timeout 3; mainstay fast) | {} | {} |",
        d(&crash["patroni_fastest"]),
        d(&crash["mainstay_fast"])
    );
    let switchover = &s["switchover_unavailability_ms"];
    println!(
        "| planned switchover | {} | {} |",
        d(&switchover["patroni"]),
        d(&switchover["mainstay"])
    );
    let lost = &s["lost_acked_writes"];
    println!(
        "| lost acknowledged writes, async crashes | {} | {} |",
        lost["patroni_async"], lost["mainstay_async"]
    );
    println!(
        "| lost acknowledged writes, synchronous mode crash | {} | {} |",
        lost["patroni_sync"], lost["mainstay_sync"]
    );
    let rss = &s["agent_rss_bytes"];
    println!(
        "| idle agent RSS (MB) | {:.1} | {:.1} |",
        rss["patroni"].as_f64().unwrap_or(0.0) / 1e6,
        rss["mainstay"].as_f64().unwrap_or(0.0) / 1e6
    );
    let cpu = &s["agent_idle_cpu_percent"];
    println!(
        "| idle agent CPU (% of one core) | {} | {} |",
        cpu["patroni"], cpu["mainstay"]
    );
}

/// One cluster from start to stop: settle, optionally sample the idle
/// agent, write, inject the fault, measure.
async fn one_case(
    dir: &Path,
    exe: &Path,
    patroni: &Path,
    case: &Case,
    idle_window: Option<Duration>,
) -> Result<(Measured, Option<Idle>), String> {
    let mut cluster = match case.contender {
        Contender::Mainstay(profile) => Cluster::Mainstay(
            LocalCluster::start(dir, 3, exe, profile)
                .map_err(|e| format!("starting mainstay: {e}"))?,
        ),
        Contender::Patroni(timing) => {
            Cluster::Patroni(PatroniCluster::start(dir, patroni, timing)?)
        }
    };
    let leader = cluster.healthy(Duration::from_secs(120)).await?;
    if case.sync {
        cluster.enable_sync(&leader.0).await?;
    }
    let footprint = match idle_window {
        Some(window) => Some(cluster.idle_footprint(&leader.0, window).await?),
        None => None,
    };
    let conninfo = cluster.conninfo();
    let (client, connection) = connect_rw(&conninfo)
        .await
        .map_err(|e| format!("connecting through the endpoint: {e}"))?;
    tokio::spawn(connection);
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS bench_writes (id bigint PRIMARY KEY, at timestamptz DEFAULT now())",
        )
        .await
        .map_err(|e| e.to_string())?;
    drop(client);
    let log = Arc::new(Mutex::new(WriterLog::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(write_loop(conninfo.clone(), log.clone(), stop.clone()));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (old, old_port) = leader;
    let at = Instant::now();
    match case.fault {
        Fault::Crash => cluster.kill(&old),
        Fault::Switchover => cluster.switchover(&old).await?,
    }
    let deadline = at + Duration::from_secs(100);
    let recovered_at = loop {
        let first = poison::lock(&log)
            .acked
            .iter()
            .find(|(_, heard, port)| *heard > at && *port != old_port)
            .map(|(_, heard, _)| *heard);
        if let Some(heard) = first {
            break heard;
        }
        if Instant::now() > deadline {
            stop.store(true, Ordering::SeqCst);
            return Err("no other server acknowledged a write within 100 s".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let outage_start = match case.fault {
        Fault::Crash => at,
        Fault::Switchover => poison::lock(&log)
            .acked
            .iter()
            .filter(|(_, heard, port)| *port == old_port && *heard < recovered_at)
            .map(|(_, heard, _)| *heard)
            .max()
            .unwrap_or(at),
    };
    let (acked, lost) = super::settle_and_count(&conninfo, &log, &stop, writer).await?;
    cluster.stop();
    Ok((
        Measured {
            unavailable_ms: recovered_at.duration_since(outage_start).as_millis() as u64,
            acked,
            lost,
        },
        footprint,
    ))
}

enum Cluster {
    Mainstay(LocalCluster),
    Patroni(PatroniCluster),
}

impl Cluster {
    /// The read-write endpoint: mainstay's proxies, or HAProxy.
    fn conninfo(&self) -> String {
        let (hosts, ports) = match self {
            Cluster::Mainstay(c) => (
                vec!["127.0.0.1"; c.nodes.len()].join(","),
                c.nodes
                    .iter()
                    .map(|n| n.proxy_port.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            Cluster::Patroni(c) => ("127.0.0.1".into(), c.haproxy_port().to_string()),
        };
        format!(
            "host={hosts} port={ports} user={SUPERUSER} password={SUPERUSER_PASSWORD} dbname=postgres connect_timeout=2"
        )
    }

    /// The leader and its PostgreSQL port, once every member streams.
    async fn healthy(&self, timeout: Duration) -> Result<(String, u16), String> {
        match self {
            Cluster::Mainstay(c) => {
                let dcs = c.dcs().await?;
                let leader = super::healthy(&dcs, 3, timeout).await?;
                let i = c.node_index(&leader).ok_or("the leader vanished")?;
                Ok((leader, c.nodes[i].pg_port))
            }
            Cluster::Patroni(c) => c.healthy(timeout).await,
        }
    }

    async fn enable_sync(&self, leader: &str) -> Result<(), String> {
        match self {
            Cluster::Mainstay(c) => enable_synchronous_mode(c, leader).await,
            Cluster::Patroni(c) => c.enable_sync().await,
        }
    }

    /// The host dies: agent, guard and the postmaster's process group
    /// SIGKILLed together (`crash_node`).
    fn kill(&mut self, leader: &str) {
        match self {
            Cluster::Mainstay(c) => {
                if let Some(i) = c.node_index(leader) {
                    c.kill_node(i);
                }
            }
            Cluster::Patroni(c) => c.kill(leader),
        }
    }

    async fn switchover(&self, leader: &str) -> Result<(), String> {
        let (url, body, auth) = match self {
            Cluster::Mainstay(c) => {
                let i = c.node_index(leader).ok_or("the leader vanished")?;
                (
                    format!("http://127.0.0.1:{}", c.nodes[i].api_port),
                    json!({ "leader": leader }),
                    true,
                )
            }
            Cluster::Patroni(c) => {
                let candidate = c
                    .nodes
                    .iter()
                    .find(|n| n.name != leader)
                    .ok_or("no replica")?;
                (
                    c.api_url(leader).ok_or("the leader vanished")?,
                    json!({ "leader": leader, "candidate": candidate.name }),
                    false,
                )
            }
        };
        let mut api =
            mainstay_agent::api_client::ApiClient::new(&url).with_timeout(Duration::from_secs(60));
        if auth {
            api = api.with_basic_auth(crate::demo::API_USER, crate::demo::API_PASSWORD);
        }
        // Answered when the switchover is done; the writer measures it
        // meanwhile, so the request runs on its own.
        tokio::spawn(async move {
            match api
                .request(hyper::Method::POST, "/switchover", Some(&body))
                .await
            {
                Ok(answer) if answer.status.is_success() => {}
                Ok(answer) => eprintln!("switchover refused: {} {}", answer.status, answer.text),
                Err(e) => eprintln!("switchover request failed: {e}"),
            }
        });
        Ok(())
    }

    /// A replica's agent: RSS sampled each second (median) and CPU over
    /// `window`.
    /// mainstay's includes the fencing guard beside PostgreSQL.
    async fn idle_footprint(&self, leader: &str, window: Duration) -> Result<Idle, String> {
        let pids: Vec<u32> = match self {
            Cluster::Mainstay(c) => c
                .nodes
                .iter()
                .position(|n| n.name != leader)
                .map(|i| c.agent_pid(i).into_iter().chain(c.guard_pid(i)).collect())
                .unwrap_or_default(),
            Cluster::Patroni(c) => c
                .nodes
                .iter()
                .find(|n| n.name != leader)
                .and_then(PatroniNode::agent_pid)
                .into_iter()
                .collect(),
        };
        if pids.is_empty() {
            return Err("no replica agent to sample".into());
        }
        let cpu = || pids.iter().map(|p| cpu_ticks(*p)).sum::<Option<u64>>();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let cpu_before = cpu().ok_or("cannot read the agent's CPU time")?;
        let started = Instant::now();
        let mut samples = Vec::new();
        while started.elapsed() < window {
            tokio::time::sleep(Duration::from_secs(1)).await;
            samples.push(pids.iter().map(|p| rss_bytes(*p)).sum());
        }
        let cpu_after = cpu().ok_or("the agent died while idle")?;
        let ticks_per_second = process::clock_ticks_per_second().max(1) as f64;
        let busy = (cpu_after - cpu_before) as f64 / ticks_per_second;
        samples.sort_unstable();
        Ok(Idle {
            rss_bytes: samples.get(samples.len() / 2).copied().unwrap_or(0),
            cpu_percent: busy / started.elapsed().as_secs_f64() * 100.0,
        })
    }

    fn stop(&mut self) {
        match self {
            Cluster::Mainstay(c) => c.stop_all(),
            Cluster::Patroni(c) => c.stop(),
        }
    }
}

/// User + system CPU time of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces: fields count from after its ')'.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line.
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}
