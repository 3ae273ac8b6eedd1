//! The fault suite: three hosts as network namespaces on a bridge, each with
//! an etcd member, an agent and PostgreSQL, and a client namespace whose
//! writers commit continuously through the VIP, through the nodes'
//! read-write proxies, and straight to every node's PostgreSQL port (as a
//! libpq multi-host client or an open session would). Each scenario injects
//! one fault, lets the cluster settle, and checks the writers' evidence
//! (`evidence.rs`):
//! (a) in synchronous mode no acknowledged id is missing; in asynchronous
//!     mode the loss is counted (an unacknowledged row is an unknown
//!     outcome, never loss nor error);
//! (b) no two nodes accepted writes at overlapping times, and no node
//!     acknowledged a write after another node had acknowledged its first
//!     on a newer timeline (server commit timestamps per node and timeline:
//!     every namespace shares the machine's clock);
//! (c) the cluster converged: one primary, every other node streaming, every
//!     data directory still there.
//!
//! The scenarios are in `scenarios.rs` (kills, cuts, a full disk, etcd's
//! faults, a switchover) and `freeze.rs` (processes stopped with SIGSTOP:
//! the primary's agent, its process group, the whole node).
//!
//! A plain binary (`harness = false`): scenarios run one after another and
//! the suite ends with a table and `N passed, N failed`. Needs root; without
//! it the suite fails, unless `MAINSTAY_ALLOW_SKIP=1` lets it say it was
//! skipped.

#![forbid(unsafe_code)]

#[path = "../common/mod.rs"]
mod common;
mod evidence;
mod failsafe;
mod freeze;
mod scenarios;
mod witness;

use common::{Harness, prerequisites, test_dir};
use evidence::Outcome;
use mainstay_lab::demo::{LabOptions, LocalCluster};
use mainstay_testkit::netns;
use mainstay_testkit::{Relay, skip};
use scenarios::{ETCD_PORTS, ScenarioFn};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

const VIP: &str = "10.213.0.50";

/// Relays between each node's agent and each etcd member (node, member),
/// for scenarios that slow one host's etcd traffic down.
static RELAYS: Mutex<Vec<Vec<Relay>>> = Mutex::new(Vec::new());

/// What a scenario needs from the lab beyond the default.
#[derive(Clone, Copy, Default)]
struct Needs {
    /// Each node's data on a tmpfs of this many MiB.
    disk_mib: Option<u64>,
    /// The agents reach etcd through [`RELAYS`].
    relays: bool,
    /// Two data nodes whose agents run their etcd members, and a witness
    /// on the third host.
    witness: bool,
}

fn run_scenario(scenario: &ScenarioFn, needs: Needs) -> Result<Outcome, String> {
    std::thread::scope(|scope| {
        let handle = scope.spawn(|| {
            let (lab, runtime) = mainstay_lab::bench::client_of_new_lab(3)?;
            runtime.block_on(async {
                let mut options = LabOptions::new(
                    if needs.witness { 2 } else { 3 },
                    "default",
                    &format!("vip = \"{VIP}/24\"\nvip_interface = \"eth0\"\n"),
                );
                options.disk_mib = needs.disk_mib;
                options.managed_etcd = needs.witness;
                options.witness = needs.witness;
                if needs.relays {
                    let mut relays = RELAYS.lock().unwrap();
                    let mut endpoints = Vec::new();
                    for node in 0..3 {
                        let mut own = Vec::new();
                        let mut urls = Vec::new();
                        for member in 0..3 {
                            let listen = SocketAddr::from((
                                lab.client_ip(),
                                22000 + 10 * node as u16 + member as u16,
                            ));
                            let target = SocketAddr::from((lab.host_ip(member), ETCD_PORTS[0]));
                            own.push(
                                Relay::start(listen, target)
                                    .map_err(|e| format!("starting a relay on {listen}: {e}"))?,
                            );
                            urls.push(format!("http://{listen}"));
                        }
                        relays.push(own);
                        endpoints.push(urls);
                    }
                    options.etcd_endpoints = Some(endpoints);
                }
                let cluster = LocalCluster::start_in_lab_with(
                    // Short: PostgreSQL's socket path beside the data
                    // directory must stay under 108 bytes.
                    &test_dir("faults"),
                    lab,
                    Path::new(env!("CARGO_BIN_EXE_mainstay")),
                    &options,
                )
                .map_err(|e| format!("starting the lab cluster: {e}"))?;
                let mut h = Harness::adopt(cluster);
                let outcome = scenario(&mut h).await;
                h.passed = true;
                Ok(outcome)
            })
        });
        let joined = handle.join();
        mainstay_core::poison::lock(&RELAYS).clear();
        match joined {
            Ok(result) => result,
            Err(panic) => Err(panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panicked".into())),
        }
    })
}

fn main() {
    if let Some(why) = netns::unavailable() {
        skip(&format!("the fault suite: {why}"));
        return;
    }
    if !prerequisites() {
        return;
    }
    evidence::self_check();
    // As libtest: scenarios whose name contains the filter, or (with
    // `--exact`) the one it names.
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let exact = std::env::args().any(|a| a == "--exact");
    let plain = Needs::default();
    let two_and_witness = Needs {
        witness: true,
        ..plain
    };
    use scenarios::*;
    let scenarios: Vec<(&str, Box<ScenarioFn>, Needs)> = vec![
        ("primary_killed_async", Box::new(kill_primary(false)), plain),
        ("primary_killed_sync", Box::new(kill_primary(true)), plain),
        ("primary_agent_killed", Box::new(kill_primary_agent), plain),
        (
            "primary_agent_frozen",
            Box::new(freeze::primary_agent_frozen),
            plain,
        ),
        (
            "primary_agent_group_stopped",
            Box::new(freeze::primary_agent_group_stopped),
            plain,
        ),
        (
            "primary_host_suspended",
            Box::new(freeze::primary_host_suspended(false)),
            plain,
        ),
        (
            "primary_host_suspended_sync",
            Box::new(freeze::primary_host_suspended(true)),
            plain,
        ),
        ("primary_link_down", Box::new(primary_link_down), plain),
        (
            "primary_isolated_from_etcd",
            Box::new(primary_isolated_from_etcd),
            plain,
        ),
        ("replica_isolated", Box::new(replica_isolated), plain),
        ("etcd_member_lost", Box::new(etcd_member_lost), plain),
        ("etcd_quorum_lost", Box::new(etcd_quorum_lost(false)), plain),
        (
            "etcd_quorum_lost_failsafe",
            Box::new(etcd_quorum_lost(true)),
            plain,
        ),
        (
            "failsafe_member_rejoins",
            Box::new(failsafe::failsafe_member_rejoins),
            plain,
        ),
        (
            "primary_postgres_crash",
            Box::new(primary_postgres_crash),
            plain,
        ),
        (
            "primary_disk_full",
            Box::new(primary_disk_full),
            Needs {
                disk_mib: Some(256),
                ..plain
            },
        ),
        (
            "primary_link_degraded",
            Box::new(primary_link_degraded),
            Needs {
                relays: true,
                ..plain
            },
        ),
        (
            "etcd_leader_with_primary",
            Box::new(etcd_leader_with_primary),
            plain,
        ),
        (
            "switchover_under_load",
            Box::new(switchover_under_load),
            plain,
        ),
        ("two_quick_failovers", Box::new(two_quick_failovers), plain),
        (
            "witness_down",
            Box::new(witness::witness_down),
            two_and_witness,
        ),
        (
            "data_link_cut",
            Box::new(witness::data_link_cut),
            two_and_witness,
        ),
        (
            "primary_cut_off_async",
            Box::new(witness::primary_cut_off(false)),
            two_and_witness,
        ),
        (
            "primary_cut_off_sync",
            Box::new(witness::primary_cut_off(true)),
            two_and_witness,
        ),
        (
            "primary_and_witness_down",
            Box::new(witness::primary_and_witness_down),
            two_and_witness,
        ),
    ];
    let mut rows = Vec::new();
    for (name, scenario, needs) in &scenarios {
        if filter
            .as_deref()
            .is_some_and(|f| if exact { f != *name } else { !name.contains(f) })
        {
            continue;
        }
        let started = Instant::now();
        let result = run_scenario(scenario.as_ref(), *needs);
        match &result {
            Ok(o) => println!(
                "{name}: ok in {:?}: unavailable {} ms, {} acknowledged, {} lost ({} WAL bytes), {} unknown, {} duplicates; direct: {}{}",
                started.elapsed(),
                o.unavailable_ms,
                o.acked,
                o.lost,
                o.lost_wal_bytes,
                o.unknown,
                o.duplicates,
                o.direct_summary(),
                o.note
                    .as_ref()
                    .map(|n| format!("; {n}"))
                    .unwrap_or_default()
            ),
            Err(e) => println!("{name}: FAILED after {:?}: {e}", started.elapsed()),
        }
        rows.push((name, result));
    }
    println!();
    println!(
        "| scenario | result | unavailable ms | acknowledged | lost | lost WAL bytes | unknown | duplicates | direct acked | direct after takeover |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (name, result) in &rows {
        match result {
            Ok(o) => println!(
                "| {name} | ok | {} | {} | {} | {} | {} | {} | {} | {} |",
                o.unavailable_ms,
                o.acked,
                o.lost,
                o.lost_wal_bytes,
                o.unknown,
                o.duplicates,
                o.direct_total(),
                o.after_takeover
            ),
            Err(_) => println!("| {name} | FAILED | | | | | | | | |"),
        }
    }
    let failed = rows.iter().filter(|(_, r)| r.is_err()).count();
    println!("{} passed, {failed} failed", rows.len() - failed);
    if failed > 0 {
        std::process::exit(1);
    }
}
