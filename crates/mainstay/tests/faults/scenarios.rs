//! The scenarios of the fault suite that kill, cut, fill or switch over;
//! the ones that freeze processes are in `freeze.rs`.

use crate::common::{self, Harness};
use crate::evidence::{Outcome, Writers, check, first_write, first_write_elsewhere};
use crate::{RELAYS, VIP};
use mainstay_testkit::netns::Lab;
use std::path::Path;
use std::time::{Duration, Instant};

pub(crate) async fn enable_sync(h: &Harness, leader: &str) {
    common::patch_config(h, leader, serde_json::json!({"synchronous_mode": true})).await;
    common::wait_sync_standby(h, Duration::from_secs(60)).await;
}

/// The leader and how long writes were unavailable after `fault` (from the
/// fault to the first write a node other than the old leader acknowledged).
pub(crate) async fn disrupt(
    h: &mut Harness,
    writers: &Writers,
    fault: impl FnOnce(&mut Harness, usize),
) -> u64 {
    let leader = h.healthy(Duration::from_secs(120)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let l = h.cluster.node_index(&leader).unwrap();
    let at = Instant::now();
    fault(h, l);
    first_write_elsewhere(writers, at, &leader).await
}

pub(crate) type Running<'a> = std::pin::Pin<Box<dyn Future<Output = Outcome> + 'a>>;
pub(crate) type ScenarioFn = dyn Fn(&mut Harness) -> Running<'_> + Sync;

pub(crate) fn kill_primary(sync: bool) -> impl Fn(&mut Harness) -> Running<'_> + Sync {
    move |h| {
        Box::pin(async move {
            let leader = h.healthy(Duration::from_secs(120)).await;
            if sync {
                enable_sync(h, &leader).await;
            }
            let writers = Writers::start(h).await;
            let unavailable = disrupt(h, &writers, |h, l| h.cluster.kill_node(l)).await;
            // The killed node comes back and rejoins.
            restart_stopped_agents(h);
            let evidence = writers.finish().await;
            check(h, &evidence, sync, unavailable).await
        })
    }
}

/// The primary's agent alone is killed: its PostgreSQL goes with it (the
/// fencing guard stops it the moment the agent's end of its socket
/// closes), and so does the VIP, before any other node is promoted.
pub(crate) fn kill_primary_agent(h: &mut Harness) -> Running<'_> {
    Box::pin(async move {
        h.healthy(Duration::from_secs(120)).await;
        let writers = Writers::start(h).await;
        let unavailable = disrupt(h, &writers, |h, l| {
            let pid = h.cluster.agent_pid(l).unwrap();
            let _ = mainstay_sys::process::kill(pid as i32, libc::SIGKILL);
        })
        .await;
        let old = stopped_agents(h)[0];
        // Its server stopped with it and nothing holds the VIP there.
        assert!(
            h.cluster.nodes[old].postmaster_pid().is_none(),
            "PostgreSQL outlived its agent"
        );
        let addresses = lab(h).addresses(old).unwrap();
        assert!(
            !addresses.iter().any(|a| a.starts_with(VIP)),
            "the VIP stayed on the killed agent's host: {addresses:?}"
        );
        restart_stopped_agents(h);
        let evidence = writers.finish().await;
        check(h, &evidence, false, unavailable).await
    })
}

/// The lease's lifetime the agents run with, from node1's configuration
/// (the lab's timing profile: 4 s by default).
pub(crate) fn ttl(h: &Harness) -> Duration {
    let config = &h.cluster.nodes[0].config;
    mainstay_agent::config::Config::load(config)
        .unwrap_or_else(|e| panic!("reading {}: {e}", config.display()))
        .timing
        .ttl
}

pub(crate) fn lab(h: &Harness) -> &Lab {
    h.cluster.lab.as_ref().expect("a lab cluster")
}

/// The healthy cluster's leader, with the writers running for 2 s.
pub(crate) async fn under_load(h: &Harness) -> (String, Writers) {
    let leader = h.healthy(Duration::from_secs(120)).await;
    let writers = Writers::start(h).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    (leader, writers)
}

pub(crate) fn stopped_agents(h: &mut Harness) -> Vec<usize> {
    (0..h.cluster.nodes.len())
        .filter(|&i| !h.cluster.agent_running(i))
        .collect()
}

/// Brings back every node whose agent was killed; they rejoin.
pub(crate) fn restart_stopped_agents(h: &mut Harness) {
    for i in stopped_agents(h) {
        h.cluster.start_agent(i).unwrap();
    }
}

/// The primary host's cable is pulled (its agent and PostgreSQL keep
/// running, cut off from etcd and from clients), then plugged back.
pub(crate) fn primary_link_down(h: &mut Harness) -> Running<'_> {
    Box::pin(async move {
        h.healthy(Duration::from_secs(120)).await;
        let writers = Writers::start(h).await;
        let mut cut = None;
        let unavailable = disrupt(h, &writers, |h, l| {
            lab(h).set_link(l, false).unwrap();
            cut = Some(l);
        })
        .await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        lab(h).set_link(cut.unwrap(), true).unwrap();
        let evidence = writers.finish().await;
        check(h, &evidence, false, unavailable).await
    })
}

/// A replica's cable is pulled for 8 s: no failover, writes go on.
pub(crate) fn replica_isolated(h: &mut Harness) -> Running<'_> {
    Box::pin(async move {
        let (leader, writers) = under_load(h).await;
        let replica = h.other_than(&leader);
        let r = h.cluster.node_index(&replica).unwrap();
        let at = Instant::now();
        lab(h).set_link(r, false).unwrap();
        tokio::time::sleep(Duration::from_secs(8)).await;
        lab(h).set_link(r, true).unwrap();
        let view = h.view().await;
        assert_eq!(
            view.leader_name(),
            Some(leader.as_str()),
            "a replica's isolation moved the leader"
        );
        let unavailable = writers.longest_gap_since(at);
        let evidence = writers.finish().await;
        let outcome = check(h, &evidence, false, unavailable).await;
        assert_eq!(h.healthy(Duration::from_secs(60)).await, leader);
        outcome
    })
}

/// PostgreSQL alone crashes on the primary (SIGKILL of the postmaster):
/// the agent brings it back; the cluster converges.
pub(crate) fn primary_postgres_crash(h: &mut Harness) -> Running<'_> {
    Box::pin(async move {
        let (leader, writers) = under_load(h).await;
        let l = h.cluster.node_index(&leader).unwrap();
        let pid = h.cluster.nodes[l].postmaster_pid().unwrap();
        let at = Instant::now();
        let _ = mainstay_sys::process::kill(pid, libc::SIGKILL);
        first_write(
            &writers,
            at + Duration::from_millis(500),
            None,
            Duration::from_secs(90),
        )
        .await;
        let unavailable = writers.longest_gap_since(at);
        let evidence = writers.finish().await;
        check(h, &evidence, false, unavailable).await
    })
}

/// A planned switchover while the writers run: nothing acknowledged is lost.
pub(crate) fn switchover_under_load(h: &mut Harness) -> Running<'_> {
    Box::pin(async move {
        let (leader, writers) = under_load(h).await;
        let candidate = h.other_than(&leader);
        let at = Instant::now();
        let (code, _, err) = common::run_ctl(
            h,
            &leader,
            &["switchover", "--candidate", &candidate, "--force"],
        )
        .await;
        assert_eq!(code, 0, "{err}");
        first_write_elsewhere(&writers, at, &leader).await;
        let unavailable = writers.longest_gap_since(at);
        let evidence = writers.finish().await;
        let outcome = check(h, &evidence, false, unavailable).await;
        assert_eq!(outcome.lost, 0, "a switchover lost acknowledged writes");
        outcome
    })
}

/// The primary is killed, and the new one as soon as it has written: the
/// last node standing takes over; both come back and rejoin.
pub(crate) fn two_quick_failovers(h: &mut Harness) -> Running<'_> {
    Box::pin(async move {
        h.healthy(Duration::from_secs(120)).await;
        let writers = Writers::start(h).await;
        let at = Instant::now();
        let first = disrupt(h, &writers, |h, l| h.cluster.kill_node(l)).await;
        let second = disrupt_now(h, &writers).await;
        restart_stopped_agents(h);
        let unavailable = writers.longest_gap_since(at).max(first).max(second);
        let evidence = writers.finish().await;
        check(h, &evidence, false, unavailable).await
    })
}

/// Kills the current primary (agent and PostgreSQL) at once, without waiting
/// for the cluster to be whole; returns the time to the next primary's write.
async fn disrupt_now(h: &mut Harness, writers: &Writers) -> u64 {
    let leader = h
        .wait_for("a primary", Duration::from_secs(60), async |v| {
            v.leader_status()
                .filter(|s| s.role == mainstay_core::PgRole::Primary)
                .map(|s| s.name.clone())
        })
        .await;
    let l = h.cluster.node_index(&leader).unwrap();
    let at = Instant::now();
    h.cluster.kill_node(l);
    first_write_elsewhere(writers, at, &leader).await
}

/// etcd's client and peer ports in the lab.
pub(crate) const ETCD_PORTS: [u16; 2] = [12379, 12380];

/// The etcd member on the primary's host is killed: the agents use the
/// others, nothing fails over, writes go on; it comes back.
pub(crate) fn etcd_member_lost(h: &mut Harness) -> Running<'_> {
    Box::pin(async move {
        let (leader, writers) = under_load(h).await;
        let l = h.cluster.node_index(&leader).unwrap();
        let at = Instant::now();
        h.cluster.etcd[l].kill().unwrap();
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(
            h.view().await.leader_name(),
            Some(leader.as_str()),
            "losing one etcd member moved the leader"
        );
        h.cluster.etcd[l].restart().unwrap();
        let unavailable = writers.longest_gap_since(at);
        let evidence = writers.finish().await;
        let outcome = check(h, &evidence, false, unavailable).await;
        assert_eq!(h.healthy(Duration::from_secs(60)).await, leader);
        outcome
    })
}

/// etcd loses its quorum (the members on both replicas' hosts die). With
/// failsafe off the primary must stop accepting writes before its lease
/// could have expired; with failsafe on, every member still confirms it
/// over the REST API and it keeps writing. Then etcd comes back.
pub(crate) fn etcd_quorum_lost(failsafe: bool) -> impl Fn(&mut Harness) -> Running<'_> + Sync {
    move |h| {
        Box::pin(async move {
            let leader = h.healthy(Duration::from_secs(120)).await;
            if failsafe {
                crate::failsafe::enable_failsafe(h, &leader).await;
            }
            let (leader, writers) = under_load(h).await;
            let l = h.cluster.node_index(&leader).unwrap();
            let at = Instant::now();
            for i in (0..h.cluster.etcd.len()).filter(|&i| i != l) {
                h.cluster.etcd[i].kill().unwrap();
            }
            tokio::time::sleep(Duration::from_secs(12)).await;
            let ttl = ttl(h);
            if failsafe {
                let gap = writers.longest_gap_since(at);
                assert!(
                    gap < 3000,
                    "failsafe mode: writes stopped for {gap} ms while every member was reachable"
                );
            } else {
                let last = writers.acked_since(at + ttl, None);
                assert!(
                    last.is_none(),
                    "a write was acknowledged {:?} after etcd lost its quorum, past the lease",
                    last.map(|l| l.duration_since(at))
                );
            }
            let outage = writers.longest_gap_since(at);
            for i in (0..h.cluster.etcd.len()).filter(|&i| i != l) {
                h.cluster.etcd[i].restart().unwrap();
            }
            first_write(&writers, Instant::now(), None, Duration::from_secs(60)).await;
            let evidence = writers.finish().await;
            let outcome = check(h, &evidence, false, outage).await;
            assert_eq!(outcome.lost, 0, "etcd's outage lost acknowledged writes");
            if failsafe {
                // The primary everyone confirmed keeps its role: a newly
                // elected etcd leader extends every lease, its own too.
                assert_eq!(h.healthy(Duration::from_secs(60)).await, leader);
            }
            outcome
        })
    }
}

/// The primary's host loses etcd (its own member in the minority) but not
/// its clients: it must stop accepting writes before anyone else is
/// promoted (the overlap check), and rejoin once etcd is back.
pub(crate) fn primary_isolated_from_etcd(h: &mut Harness) -> Running<'_> {
    Box::pin(async move {
        h.healthy(Duration::from_secs(120)).await;
        let writers = Writers::start(h).await;
        let mut cut = None;
        let unavailable = disrupt(h, &writers, |h, l| {
            lab(h).isolate_ports(l, &ETCD_PORTS).unwrap();
            cut = Some(l);
        })
        .await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        lab(h).heal(cut.unwrap());
        let evidence = writers.finish().await;
        check(h, &evidence, false, unavailable).await
    })
}

/// A lossy, slow, narrow link on the primary's host (3 % of packets
/// dropped each way, 4 Mbit/s out, and 150 ms more each way to etcd) for
/// 20 s: at default timing nothing fails over.
pub(crate) fn primary_link_degraded(h: &mut Harness) -> Running<'_> {
    Box::pin(async move {
        let (leader, writers) = under_load(h).await;
        let l = h.cluster.node_index(&leader).unwrap();
        let timeline = h.view().await.leader_status().unwrap().timeline;
        let lab = lab(h);
        let at = Instant::now();
        lab.impair(l, 3, Some(4000)).unwrap();
        for relay in &RELAYS.lock().unwrap()[l] {
            relay.set_delay(Duration::from_millis(150));
        }
        let deadline = at + Duration::from_secs(20);
        let mut slowest_renewal = 0f64;
        while Instant::now() < deadline {
            let view = h.view().await;
            assert_eq!(
                view.leader_name(),
                Some(leader.as_str()),
                "a degraded link caused a failover"
            );
            if let Ok(metrics) = common::api(h, &leader).get("/metrics").await {
                slowest_renewal = slowest_renewal.max(renewal_seconds(&metrics.text));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        // The impairment was real: a renewal is a round trip through the
        // relay, so at least two added delays.
        assert!(
            slowest_renewal >= 0.3,
            "renewals took at most {slowest_renewal} s: was the delay applied?"
        );
        println!("primary_link_degraded: slowest lease renewal {slowest_renewal:.3} s");
        let during = writers
            .evidence
            .lock()
            .unwrap()
            .acked
            .iter()
            .filter(|a| a.heard > at)
            .count();
        lab.heal(l);
        for relay in &RELAYS.lock().unwrap()[l] {
            relay.set_delay(Duration::ZERO);
        }
        assert!(
            during > 0,
            "no write was acknowledged over the degraded link"
        );
        let unavailable = writers.longest_gap_since(at);
        let evidence = writers.finish().await;
        let outcome = check(h, &evidence, false, unavailable).await;
        let view = h.view().await;
        assert_eq!(view.leader_name(), Some(leader.as_str()));
        assert_eq!(
            view.leader_status().unwrap().timeline,
            timeline,
            "a promotion happened"
        );
        outcome
    })
}

/// `mainstay_lease_renew_seconds` from a `/metrics` page (0 if absent).
fn renewal_seconds(metrics: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with("mainstay_lease_renew_seconds"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// The primary's data disk fills up. PostgreSQL refuses what needs new
/// space; nothing acknowledged is lost and no two nodes write; once space
/// is freed the cluster is whole again without anyone stepping in.
pub(crate) fn primary_disk_full(h: &mut Harness) -> Running<'_> {
    Box::pin(async move {
        let (leader, writers) = under_load(h).await;
        let l = h.cluster.node_index(&leader).unwrap();
        let filler = h.cluster.nodes[l].dir.join("disk").join("filler");
        let at = Instant::now();
        fill(&filler);
        tokio::time::sleep(Duration::from_secs(15)).await;
        let during = writers.longest_gap_since(at);
        std::fs::remove_file(&filler).unwrap();
        first_write(&writers, Instant::now(), None, Duration::from_secs(90)).await;
        let unavailable = during.max(writers.longest_gap_since(at));
        let evidence = writers.finish().await;
        check(h, &evidence, false, unavailable).await
    })
}

/// Writes `path` until its filesystem is full (at most 4 GiB).
fn fill(path: &Path) {
    use std::io::Write;
    let mut file = std::fs::File::create(path).unwrap();
    let chunk = vec![0xa5u8; 1 << 20];
    for _ in 0..4096 {
        if file.write_all(&chunk).is_err() {
            break;
        }
    }
    let _ = file.sync_all();
}

/// etcd's leader is put on the primary's host: the primary's agent moves
/// it away within seconds, so that when that host then dies only the
/// primary's lease runs out, not a new etcd leader's extension of it.
pub(crate) fn etcd_leader_with_primary(h: &mut Harness) -> Running<'_> {
    Box::pin(async move {
        let (leader, writers) = under_load(h).await;
        let l = h.cluster.node_index(&leader).unwrap();
        move_etcd_leader(h, l).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let now_at = etcd_leader(h).await;
            if now_at.is_some_and(|i| i != l) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "etcd's leader stayed on the primary's host (member {now_at:?}) for 10 s"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Power loss of that host.
        let at = Instant::now();
        lab(h).set_link(l, false).unwrap();
        let unavailable = first_write_elsewhere(&writers, at, &leader).await;
        lab(h).set_link(l, true).unwrap();
        let evidence = writers.finish().await;
        check(h, &evidence, false, unavailable).await
    })
}

/// The index of the etcd member that leads, if one answers.
async fn etcd_leader(h: &Harness) -> Option<usize> {
    for etcd in &h.cluster.etcd {
        let Ok(mut client) = etcd_client::Client::connect([etcd.endpoint()], None).await else {
            continue;
        };
        let Ok(Ok(status)) = tokio::time::timeout(Duration::from_secs(1), client.status()).await
        else {
            continue;
        };
        let leader = status.leader();
        let members = client.member_list().await.ok()?;
        let name = members
            .members()
            .iter()
            .find(|m| m.id() == leader)?
            .name()
            .to_string();
        return h.cluster.etcd.iter().position(|e| e.name() == name);
    }
    None
}

/// Asks etcd's current leader to hand its role to member `to`.
async fn move_etcd_leader(h: &Harness, to: usize) {
    let from = etcd_leader(h).await.expect("etcd has a leader");
    if from == to {
        return;
    }
    let mut client = etcd_client::Client::connect([h.cluster.etcd[from].endpoint()], None)
        .await
        .unwrap();
    let members = client.member_list().await.unwrap();
    let target = members
        .members()
        .iter()
        .find(|m| m.name() == h.cluster.etcd[to].name())
        .unwrap()
        .id();
    client.move_leader(target).await.unwrap();
}
