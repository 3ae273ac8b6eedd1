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
use mainstay_core::poison;
use mainstay_sys::process;
use mainstay_testkit::{Etcd, Haproxy, free_port};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
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

#[derive(Clone, Copy, Debug)]
struct PatroniTiming {
    ttl: u32,
    loop_wait: u32,
    retry_timeout: u32,
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

/// Runs bench/patroni/install.sh (quick when the venv is in place);
/// returns the `patroni` executable.
fn install_patroni(venv: &Path) -> Result<PathBuf, String> {
    let patroni = venv.join("bin/patroni");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bench/patroni/install.sh");
    eprintln!("checking Patroni in {} ...", venv.display());
    let status = Command::new("bash")
        .arg(&script)
        .arg(venv)
        .stdout(Stdio::null())
        .status()
        .map_err(|e| format!("{}: {e}", script.display()))?;
    if !status.success() || !patroni.exists() {
        return Err(format!("{} failed ({status})", script.display()));
    }
    Ok(patroni)
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
            Cluster::Patroni(c) => ("127.0.0.1".into(), c.haproxy_port.to_string()),
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
                .and_then(|n| n.child.as_ref().map(Child::id))
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

struct PatroniNode {
    name: String,
    dir: PathBuf,
    pg_port: u16,
    api_port: u16,
    child: Option<Child>,
}

impl PatroniNode {
    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn postmaster_pid(&self) -> Option<i32> {
        let text = std::fs::read_to_string(self.data_dir().join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }
}

/// Three Patroni agents (as the `postgres` user when run as root), one etcd
/// member, and HAProxy in front, configured as Patroni's docs advise.
struct PatroniCluster {
    etcd: Etcd,
    nodes: Vec<PatroniNode>,
    haproxy: Option<Haproxy>,
    haproxy_port: u16,
}

impl PatroniCluster {
    fn start(dir: &Path, patroni: &Path, timing: PatroniTiming) -> Result<PatroniCluster, String> {
        let io = |what: &str| {
            let what = what.to_string();
            move |e: std::io::Error| format!("{what}: {e}")
        };
        std::fs::create_dir_all(dir).map_err(io("creating the directory"))?;
        let etcd = Etcd::start(&dir.join("etcd")).map_err(io("starting etcd"))?;
        let mut cluster = PatroniCluster {
            etcd,
            nodes: Vec::new(),
            haproxy: None,
            haproxy_port: free_port(),
        };
        let endpoint = cluster.etcd.endpoint();
        let etcd_host = endpoint.trim_start_matches("http://").to_string();
        for i in 1..=3 {
            let node_dir = dir.join(format!("p{i}"));
            std::fs::create_dir_all(&node_dir).map_err(io("creating a node directory"))?;
            own_by_postgres(&node_dir).map_err(io("chown"))?;
            let node = PatroniNode {
                name: format!("p{i}"),
                dir: node_dir,
                pg_port: free_port(),
                api_port: free_port(),
                child: None,
            };
            let config = patroni_config(&node, &etcd_host, timing);
            let path = node.dir.join("patroni.yml");
            std::fs::write(&path, config).map_err(io("writing patroni.yml"))?;
            own_by_postgres(&path).map_err(io("chown"))?;
            cluster.nodes.push(node);
        }
        for i in 0..cluster.nodes.len() {
            cluster.spawn(i, patroni)?;
        }
        let servers = mainstay_testkit::health_checked_servers(
            cluster
                .nodes
                .iter()
                .map(|n| (n.name.as_str(), n.pg_port, n.api_port)),
        );
        let haproxy = Haproxy::start(
            &dir.join("haproxy"),
            &format!(
                "{}
listen primary
    bind 127.0.0.1:{}
    option httpchk OPTIONS /primary
    http-check expect status 200
    default-server inter 1s fall 2 rise 1 on-marked-down shutdown-sessions
{servers}",
                mainstay_testkit::haproxy_config_head(1000, None),
                cluster.haproxy_port
            ),
        )
        .map_err(io("starting HAProxy"))?;
        cluster.haproxy = Some(haproxy);
        Ok(cluster)
    }

    fn spawn(&mut self, i: usize, patroni: &Path) -> Result<(), String> {
        let node = &mut self.nodes[i];
        let log = std::fs::File::create(node.dir.join("patroni.log"))
            .map_err(|e| format!("patroni.log: {e}"))?;
        let root = process::geteuid() == 0;
        let mut command = if root {
            let mut c = Command::new("setpriv");
            c.args([
                "--reuid=postgres",
                "--regid=postgres",
                "--init-groups",
                "--",
            ])
            .arg(patroni);
            c
        } else {
            Command::new(patroni)
        };
        // Should the benchmark die, its agents go with it.
        process::signal_on_parent_death(&mut command, libc::SIGKILL);
        let child = command
            .arg(node.dir.join("patroni.yml"))
            .env("HOME", &node.dir)
            .current_dir(&node.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("starting Patroni: {e}"))?;
        node.child = Some(child);
        Ok(())
    }

    fn api_url(&self, name: &str) -> Option<String> {
        let node = self.nodes.iter().find(|n| n.name == name)?;
        Some(format!("http://127.0.0.1:{}", node.api_port))
    }

    /// `GET /cluster` from the first agent that answers.
    async fn cluster_doc(&self) -> Option<Value> {
        for node in &self.nodes {
            let api = mainstay_agent::api_client::ApiClient::new(&format!(
                "http://127.0.0.1:{}",
                node.api_port
            ))
            .with_timeout(Duration::from_secs(2));
            if let Ok(answer) = api.get("/cluster").await
                && answer.status.is_success()
            {
                return Some(answer.body);
            }
        }
        None
    }

    async fn healthy(&self, timeout: Duration) -> Result<(String, u16), String> {
        let deadline = Instant::now() + timeout;
        let mut last = Value::Null;
        while Instant::now() < deadline {
            if let Some(doc) = self.cluster_doc().await {
                let members = doc["members"].as_array().cloned().unwrap_or_default();
                let leader = members
                    .iter()
                    .find(|m| m["role"] == "leader" && m["state"] == "running");
                let streaming = members
                    .iter()
                    .filter(|m| m["role"] != "leader" && m["state"] == "streaming")
                    .count();
                if let Some(leader) = leader
                    && streaming == 2
                {
                    let name = leader["name"].as_str().unwrap_or_default().to_string();
                    let port = leader["port"].as_u64().unwrap_or(0) as u16;
                    return Ok((name, port));
                }
                last = doc;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Err(format!(
            "Patroni's cluster was not healthy within {timeout:?}; last /cluster: {last}"
        ))
    }

    async fn enable_sync(&self) -> Result<(), String> {
        let url = format!("http://127.0.0.1:{}", self.nodes[0].api_port);
        let api =
            mainstay_agent::api_client::ApiClient::new(&url).with_timeout(Duration::from_secs(10));
        let answer = api
            .request(
                hyper::Method::PATCH,
                "/config",
                Some(&json!({ "synchronous_mode": true })),
            )
            .await
            .map_err(|e| e.to_string())?;
        if !answer.status.is_success() {
            return Err(format!("PATCH /config: {} {}", answer.status, answer.text));
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Some(doc) = self.cluster_doc().await
                && doc["members"]
                    .as_array()
                    .is_some_and(|m| m.iter().any(|m| m["role"] == "sync_standby"))
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Err("Patroni listed no sync_standby within 60 s".into())
    }

    fn kill(&mut self, name: &str) {
        let Some(node) = self.nodes.iter_mut().find(|n| n.name == name) else {
            return;
        };
        // The same crash as a mainstay node's: the agent and the
        // postmaster's whole process group at one instant.
        mainstay_testkit::crash::crash_node(
            node.child.as_ref().map(Child::id),
            node.postmaster_pid(),
        );
        if let Some(mut child) = node.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Patroni starts PostgreSQL detached, not as its child: one it was
        // just (re)starting shows up in postmaster.pid only now. Bounded.
        let deadline = Instant::now() + Duration::from_secs(5);
        while let Some(pid) = node.postmaster_pid()
            && process::alive(pid)
            && Instant::now() < deadline
        {
            let _ = process::kill(pid, libc::SIGKILL);
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stop(&mut self) {
        let names: Vec<String> = self.nodes.iter().map(|n| n.name.clone()).collect();
        for name in names {
            self.kill(&name);
        }
        self.haproxy = None;
    }
}

impl Drop for PatroniCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

fn own_by_postgres(path: &Path) -> std::io::Result<()> {
    if process::geteuid() != 0 {
        return Ok(());
    }
    let Ok(Some(pw)) = mainstay_sys::user::by_name(c"postgres") else {
        return Err(std::io::Error::other("no `postgres` user"));
    };
    std::os::unix::fs::chown(path, Some(pw.uid), Some(pw.gid))
}

/// A Patroni configuration as its documentation shows, with the same
/// PostgreSQL settings the mainstay demo uses.
fn patroni_config(node: &PatroniNode, etcd_host: &str, timing: PatroniTiming) -> String {
    let PatroniTiming {
        ttl,
        loop_wait,
        retry_timeout,
    } = timing;
    format!(
        r#"scope: bench
name: {name}
restapi:
  listen: 127.0.0.1:{api}
  connect_address: 127.0.0.1:{api}
etcd3:
  host: {etcd_host}
bootstrap:
  dcs:
    ttl: {ttl}
    loop_wait: {loop_wait}
    retry_timeout: {retry_timeout}
    maximum_lag_on_failover: 1048576
    postgresql:
      use_pg_rewind: true
      parameters:
        wal_log_hints: "on"
  initdb:
    - encoding: UTF8
    - data-checksums
postgresql:
  listen: 127.0.0.1:{pg}
  connect_address: 127.0.0.1:{pg}
  data_dir: {data}
  bin_dir: /usr/lib/postgresql/15/bin
  pgpass: {dir}/pgpass
  authentication:
    superuser:
      username: {SUPERUSER}
      password: {SUPERUSER_PASSWORD}
    replication:
      username: replicator
      password: bench-replication-secret
    rewind:
      username: {SUPERUSER}
      password: {SUPERUSER_PASSWORD}
  parameters:
    shared_buffers: 32MB
    max_connections: 50
    # As in the demo: a killed server leaves nothing behind in /dev/shm.
    dynamic_shared_memory_type: mmap
    unix_socket_directories: {dir}
  pg_hba:
    - local all all trust
    - host all all 127.0.0.1/32 md5
    - host replication replicator 127.0.0.1/32 md5
"#,
        name = node.name,
        api = node.api_port,
        pg = node.pg_port,
        data = node.data_dir().display(),
        dir = node.dir.display(),
    )
}
