//! Synchronous replication against real agents, etcd and PostgreSQL: the
//! zero-loss promise under repeated crashes of the primary, and strict mode
//! blocking commits rather than acknowledging them with no standby.
//!
//! Outcomes, as a client sees them: an INSERT that returned success is
//! *acknowledged* and must survive every failover; an INSERT that returned an
//! error or did not answer in time is an *unknown outcome*: its commit record
//! may already be in the old primary's WAL (PostgreSQL writes it locally
//! before waiting for the standby), so it may or may not survive, and it is
//! counted neither as acknowledged nor as lost.

#![forbid(unsafe_code)]

mod common;

use common::*;
use mainstay_core::{ClusterView, PgRole};
use std::time::{Duration, Instant};

fn primary_leader(view: &ClusterView) -> Option<String> {
    let status = view.leader_status()?;
    (status.role == PgRole::Primary).then(|| status.name.clone())
}

/// What happened in one kill of the primary.
struct Round {
    killed: String,
    /// The member the leader's `GET /cluster` listed as `sync_standby` just
    /// before the kill: the only one allowed to take over.
    sync_standby: String,
    standby_names: String,
    new_leader: String,
    killed_at: Instant,
    /// PostgreSQL port of the killed node: its late answers do not end the
    /// outage.
    killed_port: u16,
}

#[test]
fn synchronous_mode_loses_no_acknowledged_commit_across_repeated_primary_kills() {
    cluster_test(async {
        let mut h = Harness::start("sync", 3);
        let first = h.healthy(Duration::from_secs(60)).await;
        let stored = patch_config(&h, &first, serde_json::json!({"synchronous_mode": true})).await;
        assert_eq!(
            stored["synchronous_mode"], true,
            "PATCH /config answered with {stored}"
        );
        let mut state = wait_sync_standby(&h, Duration::from_secs(30)).await;
        eprintln!(
            "synchronous mode on: leader {}, sync standby {}, synchronous_standby_names = {:?}",
            state.leader, state.standby, state.standby_names
        );

        let writer = AckWriter::start(&h, "acked", Duration::from_secs(5)).await;
        let mut rounds: Vec<Round> = Vec::new();
        for round in 1..=3 {
            // Commits must flow in synchronous mode before each kill, or the
            // zero-loss check below would prove nothing.
            let before = writer.acked_count();
            let deadline = Instant::now() + Duration::from_secs(30);
            while writer.acked_count() < before + 50 {
                if Instant::now() > deadline {
                    h.dump_logs();
                    panic!(
                        "round {round}: only {} commits acknowledged in 30 s with {} leading \
                         and {} as sync standby (synchronous_standby_names = {:?}): commits are \
                         blocked; /cluster: {}",
                        writer.acked_count() - before,
                        state.leader,
                        state.standby,
                        state.standby_names,
                        members_summary(&state.cluster)
                    );
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            // The sync set just before the kill, from the leader's /cluster.
            state = wait_sync_standby(&h, Duration::from_secs(10)).await;
            let killed = state.leader.clone();
            let index = h.cluster.node_index(&killed).unwrap();
            let killed_port = h.cluster.nodes[index].pg_port;
            let killed_at = Instant::now();
            h.cluster.kill_node(index);

            let new_leader = h
                .wait_for(
                    &format!("round {round}: a new primary after killing {killed}"),
                    Duration::from_secs(30),
                    async |view: &ClusterView| primary_leader(view).filter(|l| *l != killed),
                )
                .await;
            if new_leader != state.standby {
                let view = h.view().await;
                let after = cluster_doc(&h, &new_leader).await.unwrap_or_default();
                h.dump_logs();
                panic!(
                    "round {round}: {new_leader} took over after {killed} was killed, but the sync \
                     standby just before the kill was {} (leader's /cluster then: {}; \
                     synchronous_standby_names = {:?}). Only a synchronous standby is \
                     guaranteed to hold every acknowledged commit. Now: DCS {} | /cluster {}",
                    state.standby,
                    members_summary(&state.cluster),
                    state.standby_names,
                    mainstay_lab::demo::describe(&view),
                    members_summary(&after)
                );
            }
            eprintln!("round {round}: killed {killed}; {new_leader} (the sync standby) took over");
            rounds.push(Round {
                killed: killed.clone(),
                sync_standby: state.standby.clone(),
                standby_names: state.standby_names.clone(),
                new_leader: new_leader.clone(),
                killed_at,
                killed_port,
            });

            h.cluster
                .start_agent(index)
                .unwrap_or_else(|e| panic!("restarting {killed}'s agent: {e}"));
            let leader = h.healthy(Duration::from_secs(90)).await;
            assert_eq!(
                leader, new_leader,
                "round {round}: leadership moved again while {killed} rejoined"
            );
            state = wait_sync_standby(&h, Duration::from_secs(30)).await;
        }

        let unavailability: Vec<Option<Duration>> = rounds
            .iter()
            .map(|r| {
                writer
                    .first_ack_after(r.killed_at, r.killed_port)
                    .map(|at| at.duration_since(r.killed_at))
            })
            .collect();
        let log = writer.finish().await;
        let final_leader = h.healthy(Duration::from_secs(30)).await;
        let acked: Vec<i64> = log.acked.iter().map(|a| a.id).collect();
        let missing = missing_acked(&h, &final_leader, "acked", &acked).await;
        let unknown_present = log.unknown.len()
            - missing_acked(&h, &final_leader, "acked", &log.unknown)
                .await
                .len();
        for (i, (round, outage)) in rounds.iter().zip(&unavailability).enumerate() {
            eprintln!(
                "round {}: killed {} (synchronous_standby_names {:?}, sync standby {}), {} took \
                 over; writes unavailable {}",
                i + 1,
                round.killed,
                round.standby_names,
                round.sync_standby,
                round.new_leader,
                outage.map_or("(no later acknowledgment)".to_string(), |d| format!(
                    "{} ms",
                    d.as_millis()
                ))
            );
        }
        eprintln!(
            "{} commits acknowledged, {} missing on the final leader {final_leader}; {} unknown \
             outcomes ({unknown_present} of them present)",
            acked.len(),
            missing.len(),
            log.unknown.len()
        );
        if !missing.is_empty() {
            h.dump_logs();
            let first: Vec<i64> = missing.iter().copied().take(20).collect();
            panic!(
                "synchronous mode lost {} acknowledged commit(s) across {} kills of the primary \
                 (first ids: {first:?}); every failover went to the sync standby named before \
                 the kill",
                missing.len(),
                rounds.len()
            );
        }
        h.passed = true;
    });
}

#[test]
fn synchronous_mode_strict_blocks_commits_without_a_standby() {
    cluster_test(async {
        let mut h = Harness::start("sync-strict", 2);
        let leader = h.healthy(Duration::from_secs(60)).await;
        // Both keys in one merge patch: strict alone is refused.
        let (code, out, err) = run_ctl(
            &h,
            &leader,
            &[
                "edit-config",
                "--set",
                "synchronous_mode=true",
                "--set",
                "synchronous_mode_strict=true",
                "--force",
            ],
        )
        .await;
        assert_eq!(code, 0, "ctl edit-config: {out} {err}");
        let state = wait_sync_standby(&h, Duration::from_secs(30)).await;
        assert_eq!(state.leader, leader, "leadership moved while enabling sync");
        let standby = state.standby.clone();
        let primary_conninfo = {
            let i = h.cluster.node_index(&leader).unwrap();
            h.cluster.nodes[i].conninfo()
        };
        let client = h.client(&leader).await;
        tokio::time::timeout(
            Duration::from_secs(10),
            client.batch_execute(
                "CREATE TABLE strict_rows (id bigint primary key); INSERT INTO strict_rows VALUES (1)",
            ),
        )
        .await
        .unwrap_or_else(|_| {
            h.dump_logs();
            panic!("with {standby} as sync standby, a commit on {leader} took over 10 s")
        })
        .expect("creating the table");

        // The standby crashes: agent and PostgreSQL together.
        let standby_index = h.cluster.node_index(&standby).unwrap();
        h.cluster.kill_node(standby_index);

        // A commit now must wait for a standby, not be acknowledged. The
        // INSERT runs in its own task so that it keeps waiting after the
        // client-side timeout.
        let waiting = connect(&primary_conninfo)
            .await
            .expect("connecting to the primary");
        let mut blocked = tokio::spawn(async move {
            let result = waiting
                .execute("INSERT INTO strict_rows VALUES (2)", &[])
                .await;
            (result, Instant::now())
        });
        match tokio::time::timeout(Duration::from_secs(3), &mut blocked).await {
            Err(_) => {} // still waiting: as it must
            Ok(outcome) => {
                let cluster = cluster_doc(&h, &leader).await.unwrap_or_default();
                h.dump_logs();
                panic!(
                    "strict synchronous mode with its only standby {standby} down: an INSERT on \
                     {leader} must block, but within 3 s it returned {:?}; /cluster: {}",
                    outcome.map(|(r, _)| r),
                    members_summary(&cluster)
                );
            }
        }
        // Still blocked once the dead standby's member key has expired and the
        // leader has had time to react (a non-strict leader would drop the
        // standby from synchronous_standby_names about then).
        h.wait_for(
            &format!("{standby}'s member key to expire"),
            Duration::from_secs(20),
            async |view: &ClusterView| (!view.members.contains_key(&standby)).then_some(()),
        )
        .await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let observer = h.client(&leader).await;
        let waiting_on_sync: i64 = observer
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep'",
                &[],
            )
            .await
            .map(|r| r.get(0))
            .unwrap_or(-1);
        if blocked.is_finished() {
            let outcome = (&mut blocked).await;
            let cluster = cluster_doc(&h, &leader).await.unwrap_or_default();
            h.dump_logs();
            panic!(
                "strict synchronous mode: after {standby}'s member key expired, the blocked \
                 INSERT on {leader} finished with {:?} instead of waiting for a standby; \
                 synchronous_standby_names = {:?}; /cluster: {}",
                outcome.map(|(r, _)| r),
                synchronous_standby_names(&h, &leader).await,
                members_summary(&cluster)
            );
        }
        let names = synchronous_standby_names(&h, &leader).await;
        eprintln!(
            "{standby} down: the INSERT on {leader} is still waiting; backends waiting on SyncRep: \
             {waiting_on_sync}; synchronous_standby_names = {names:?}"
        );

        // The standby comes back: the waiting commit (or a new one) completes.
        let restarted_at = Instant::now();
        h.cluster
            .start_agent(standby_index)
            .unwrap_or_else(|e| panic!("restarting {standby}'s agent: {e}"));
        let deadline = restarted_at + Duration::from_secs(60);
        match tokio::time::timeout(Duration::from_secs(60), &mut blocked).await {
            Ok(Ok((Ok(_), at))) => eprintln!(
                "the waiting INSERT was acknowledged {} ms after {standby}'s agent restarted",
                at.duration_since(restarted_at).as_millis()
            ),
            outcome => {
                // Its session ended without an answer (unknown outcome): a
                // new commit must still go through once the standby is back.
                eprintln!("the waiting INSERT ended without acknowledgment: {outcome:?}");
                let mut last = String::new();
                loop {
                    if Instant::now() > deadline {
                        h.dump_logs();
                        panic!(
                            "no commit was acknowledged within 60 s of restarting {standby}'s \
                             agent in strict synchronous mode; last error: {last}"
                        );
                    }
                    let attempt = tokio::time::timeout(Duration::from_secs(5), async {
                        let c = connect(&h.cluster.multi_host_conninfo()).await?;
                        c.execute("INSERT INTO strict_rows VALUES (3)", &[]).await
                    })
                    .await;
                    match attempt {
                        Ok(Ok(_)) => break,
                        Ok(Err(e)) => last = format!("{e:?}"),
                        Err(_) => last = "no answer within 5 s".into(),
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }

        // Row 2 was never acknowledged when the standby died, but its commit
        // record was already in the primary's WAL while it waited: an
        // unacknowledged row may survive (unknown outcome). Here the primary
        // kept running, so it reaches the standby once that one streams again.
        let standby_conninfo = h.cluster.nodes[standby_index].conninfo();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let seen = tokio::time::timeout(Duration::from_secs(5), async {
                let c = connect(&standby_conninfo)
                    .await
                    .map_err(|e| format!("{e:?}"))?;
                c.query_one("SELECT count(*) FROM strict_rows WHERE id = 2", &[])
                    .await
                    .map(|r| r.get::<_, i64>(0))
                    .map_err(|e| format!("{e:?}"))
            })
            .await
            .unwrap_or_else(|_| Err("no answer within 5 s".into()));
            let last = match seen {
                Ok(1) => break,
                Ok(n) => format!("{n} rows with id 2"),
                Err(e) => e,
            };
            if Instant::now() > deadline {
                h.dump_logs();
                panic!(
                    "the row committed on {leader} while {standby} was down is not visible on \
                     {standby} 30 s after it came back: {last}"
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert_eq!(h.healthy(Duration::from_secs(30)).await, leader);
        h.passed = true;
    });
}
