//! `mainstay bench platform`: what crew devices see when the server that
//! runs the database and Synapse dies.
//!
//! Each run builds the platform lab (`crate::platform`: three hosts, each
//! with an etcd member, an agent, PostgreSQL, coturn everywhere and Synapse
//! `with-leader`, a VIP). A Matrix client in the client namespace registers,
//! creates a room and sends about 20 messages a second through the VIP, a
//! failed send retried with the same transaction id. Then the leader's
//! whole host crashes (every process in its namespace SIGKILLed at one
//! instant). Reported: kill -> first acknowledged message, requests that
//! failed, the new Synapse's process start -> first `/health` 200,
//! acknowledged messages missing from the room afterwards, duplicates, and
//! whether the two Synapse copies ever overlapped.

use super::distribution;
use crate::platform::{self, Platform, matrix};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

#[derive(clap::Args, Debug)]
pub struct PlatformArgs {
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=50))]
    pub runs: u32,
    /// Print one JSON object as the last line of standard output.
    #[arg(long)]
    pub json: bool,
    /// Replication mode: async, or sync (`synchronous_mode` on before the
    /// client starts; then no acknowledged message may be lost).
    #[arg(long, default_value = "sync", value_parser = ["async", "sync"])]
    pub mode: String,
    /// Where the clusters live (default: /dev/shm when it exists).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Keep each run's directory (agent, PostgreSQL, etcd, Synapse and
    /// coturn logs) instead of removing it.
    #[arg(long)]
    pub keep: bool,
}

/// One run's figures.
pub struct PlatformRun {
    pub unavailability_ms: u64,
    pub failed_requests: u64,
    pub lost_acked_messages: u64,
    pub duplicates: u64,
    pub synapse_start_ms: u64,
    /// Old Synapse gone -> new one started (negative: both ran at once).
    pub gap_between_copies_ms: i64,
    pub acked: usize,
    /// The largest agent's resident memory (bytes) once its services ran,
    /// before the client started.
    pub agent_idle_rss: u64,
    pub old_leader: String,
    pub new_leader: String,
}

pub async fn run(args: PlatformArgs) -> ExitCode {
    if let Some(why) = platform::unavailable() {
        eprintln!("error: bench platform: {why}");
        return ExitCode::from(1);
    }
    let exe = match crate::demo::own_binary() {
        Ok(exe) => exe,
        Err(code) => return code,
    };
    let sync = args.mode == "sync";
    let results = super::each_run(
        args.runs,
        "platform",
        args.dir.as_deref(),
        args.keep,
        move |dir| one_run_in_lab(dir, &exe, sync),
        |result| {
            format!(
                "{} -> {}: first message {} ms after the crash; {} failed requests; Synapse \
                 started in {} ms; {} of {} acknowledged messages lost, {} duplicates; {} ms \
                 between the old copy's end and the new one's start",
                result.old_leader,
                result.new_leader,
                result.unavailability_ms,
                result.failed_requests,
                result.synapse_start_ms,
                result.lost_acked_messages,
                result.acked,
                result.duplicates,
                result.gap_between_copies_ms,
            )
        },
    )
    .await;
    let results = match results {
        Ok(results) => results,
        Err(code) => return code,
    };
    let report = report(&results, &args.mode);
    let median = |v: &serde_json::Value| v["median"].as_u64().unwrap_or(0);
    println!(
        "platform ({} runs, {}): median message unavailability {} ms, Synapse start {} ms; \
         {} failed requests, {} acknowledged messages lost, {} duplicates, {} runs with two \
         Synapse copies at once; idle agent with two services {:.1} MB",
        results.len(),
        args.mode,
        median(&report["message_unavailability_ms"]),
        median(&report["synapse_start_ms"]),
        report["failed_requests"],
        report["lost_acked_messages"],
        report["duplicates"],
        report["overlapping_copies"],
        median(&report["agent_idle_rss_bytes"]) as f64 / 1e6,
    );
    if args.json {
        println!("{report}");
    }
    // Two copies at once, or a lost acknowledged message in synchronous
    // mode, break a promise: the run says so by its exit status too.
    let broken = report["overlapping_copies"].as_u64() != Some(0)
        || (sync && report["lost_acked_messages"].as_u64() != Some(0));
    if broken {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

pub fn report(results: &[PlatformRun], mode: &str) -> serde_json::Value {
    let pick = |f: &dyn Fn(&PlatformRun) -> u64| -> serde_json::Value {
        distribution(&results.iter().map(f).collect::<Vec<_>>())
    };
    let sum = |f: &dyn Fn(&PlatformRun) -> u64| -> u64 { results.iter().map(f).sum() };
    serde_json::json!({
        "runs": results.len(),
        "message_unavailability_ms": pick(&|r| r.unavailability_ms),
        "failed_requests": sum(&|r| r.failed_requests),
        "lost_acked_messages": sum(&|r| r.lost_acked_messages),
        "duplicates": sum(&|r| r.duplicates),
        "synapse_start_ms": pick(&|r| r.synapse_start_ms),
        "overlapping_copies": results.iter().filter(|r| r.gap_between_copies_ms < 0).count(),
        "acked_messages": sum(&|r| r.acked as u64),
        "agent_idle_rss_bytes": pick(&|r| r.agent_idle_rss),
        "settings": {
            "mode": mode,
            "hosts": 3,
            "profile": "default",
            "client": "one Matrix account sending a message every 50 ms through the VIP; a failed send is retried with the same transaction id; 1 s request timeout",
            "kill": "every process of the leader's host (agent, guards, PostgreSQL, etcd member, Synapse, coturn) SIGSTOPped, then SIGKILLed",
            "synapse": platform::synapse::version(),
            "mainstay": env!("CARGO_PKG_VERSION"),
        }
    })
}

/// Every agent's resident memory once both its services run (Synapse on
/// the leader, coturn everywhere): the largest.
async fn idle_agent_rss(platform: &Platform) -> Result<u64, String> {
    let mut largest = 0;
    for i in 0..platform.cluster.nodes.len() {
        platform
            .running_pid(i, "coturn", Duration::from_secs(30))
            .await?;
        let pid = platform
            .cluster
            .agent_pid(i)
            .ok_or("an agent is not running")?;
        largest = largest.max(super::rss_bytes(pid));
    }
    Ok(largest)
}

/// One run on a thread that lives in the lab's client namespace, with its
/// own runtime: every request crosses the lab's bridge.
pub fn one_run_in_lab(dir: &Path, exe: &Path, sync: bool) -> Result<PlatformRun, String> {
    let (lab, runtime) = super::client_of_new_lab(3)?;
    runtime.block_on(async {
        let mut platform = Platform::start(dir, lab, exe, 3)?;
        let result = measure(&mut platform, sync).await;
        platform.cluster.stop_all();
        result
    })
}

async fn measure(platform: &mut Platform, sync: bool) -> Result<PlatformRun, String> {
    let leader = platform.healthy(Duration::from_secs(120)).await?;
    if sync {
        platform.synchronous(&leader).await?;
    }
    let matrix = platform.crew_client().await?;
    let agent_idle_rss = idle_agent_rss(platform).await?;
    let room = matrix.create_room("bridge").await?;
    let sender = matrix::Sender::start(&matrix, &room);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let figures = platform::crash_leader(platform, &sender).await?;
    // A little more traffic on the new leader, then read the room back.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let log = sender.finish().await;
    let check = matrix
        .with_timeout(Duration::from_secs(20))
        .check_room(&room, &log)
        .await?;
    Ok(PlatformRun {
        unavailability_ms: figures.unavailability.as_millis() as u64,
        failed_requests: log.failed_requests,
        lost_acked_messages: check.lost.len() as u64,
        duplicates: check.duplicates,
        synapse_start_ms: figures.synapse_start.as_millis() as u64,
        gap_between_copies_ms: figures.gap_between_copies_ms,
        acked: log.acked.len(),
        agent_idle_rss,
        old_leader: figures.old_leader,
        new_leader: figures.new_leader,
    })
}
