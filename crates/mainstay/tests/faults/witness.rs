//! Two data nodes and a witness (the lab's third host runs `mainstay
//! witness`): what each of the four failures of a two-server site does.

use crate::common::{Harness, cluster_doc};
use crate::evidence::{check, first_write};
use crate::scenarios::{Running, disrupt, enable_sync, lab, ttl, under_load};
use std::time::{Duration, Instant};

/// The witness's host in the lab: after the two data nodes.
const WITNESS_HOST: usize = 2;

/// The leader's alerts as `/cluster` shows them.
async fn leader_alerts(h: &Harness, leader: &str) -> Vec<String> {
    let Some(doc) = cluster_doc(h, leader).await else {
        return Vec::new();
    };
    doc["members"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["name"] == leader)
        .and_then(|m| m["alerts"].as_array())
        .into_iter()
        .flatten()
        .filter_map(|a| a.as_str().map(str::to_string))
        .collect()
}

/// The witness's host dies: nothing moves, writes go on, and the leader
/// raises an `etcd_member` alert; the witness comes back and it clears.
pub(crate) fn witness_down(h: &mut Harness) -> Running<'_> {
    Box::pin(async move {
        let (leader, writers) = under_load(h).await;
        let at = Instant::now();
        h.cluster.crash_witness().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut alerts = Vec::new();
        while Instant::now() < deadline {
            alerts = leader_alerts(h, &leader).await;
            if alerts
                .iter()
                .any(|a| a.contains("etcd member witness does not answer"))
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let alerted_after = at.elapsed();
        assert!(
            alerts.iter().any(|a| a.contains("etcd member witness")),
            "no alert for the dead witness after 30 s: {alerts:?}"
        );
        assert_eq!(
            h.view().await.leader_name(),
            Some(leader.as_str()),
            "losing the witness moved the leader"
        );
        h.cluster.start_witness().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while leader_alerts(h, &leader)
            .await
            .iter()
            .any(|a| a.contains("etcd member"))
        {
            assert!(
                Instant::now() < deadline,
                "the witness's alert did not clear"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let unavailable = writers.longest_gap_since(at);
        let evidence = writers.finish().await;
        let mut outcome = check(h, &evidence, false, unavailable).await;
        assert_eq!(h.healthy(Duration::from_secs(60)).await, leader);
        outcome.note = Some(format!(
            "alert raised {} ms after the witness died, cleared once it was back",
            alerted_after.as_millis()
        ));
        outcome
    })
}

/// The link between the two data nodes is cut while the witness reaches
/// both: no failover, the primary keeps going (replication waits).
pub(crate) fn data_link_cut(h: &mut Harness) -> Running<'_> {
    Box::pin(async move {
        let (leader, writers) = under_load(h).await;
        let at = Instant::now();
        lab(h).cut_between(0, 1).unwrap();
        tokio::time::sleep(ttl(h) * 3).await;
        assert_eq!(
            h.view().await.leader_name(),
            Some(leader.as_str()),
            "a cut between the data nodes moved the leader"
        );
        let gap = writers.longest_gap_since(at);
        assert!(
            gap < 3000,
            "writes stopped for {gap} ms while the primary kept its quorum"
        );
        lab(h).heal(0);
        lab(h).heal(1);
        let evidence = writers.finish().await;
        let outcome = check(h, &evidence, false, gap).await;
        assert_eq!(h.healthy(Duration::from_secs(60)).await, leader);
        outcome
    })
}

/// The primary's host is cut off from the other data node and from the
/// witness (its clients still reach it): the replica and the witness are
/// the quorum, the replica takes over, and the old primary has stopped
/// writing before that (the checker's overlap rule). Asynchronous mode
/// loses what the old primary acknowledged after the cable went (it could
/// not send it anywhere); synchronous mode loses nothing.
pub(crate) fn primary_cut_off(sync: bool) -> impl Fn(&mut Harness) -> Running<'_> + Sync {
    move |h| {
        Box::pin(async move {
            let leader = h.healthy(Duration::from_secs(120)).await;
            if sync {
                enable_sync(h, &leader).await;
            }
            let writers = crate::evidence::Writers::start(h).await;
            let mut cut = None;
            let unavailable = disrupt(h, &writers, |h, l| {
                lab(h).cut_between(l, 1 - l).unwrap();
                lab(h).cut_between(l, WITNESS_HOST).unwrap();
                cut = Some(l);
            })
            .await;
            tokio::time::sleep(Duration::from_secs(2)).await;
            let l = cut.unwrap();
            for host in [l, 1 - l, WITNESS_HOST] {
                lab(h).heal(host);
            }
            let evidence = writers.finish().await;
            check(h, &evidence, sync, unavailable).await
        })
    }
}

/// The primary's host and the witness's die together: the replica alone
/// has no quorum, does not promote, says so in its status and log; once
/// both are back the cluster heals with nothing lost.
pub(crate) fn primary_and_witness_down(h: &mut Harness) -> Running<'_> {
    Box::pin(async move {
        let (leader, writers) = under_load(h).await;
        let l = h.cluster.node_index(&leader).unwrap();
        let replica = h.cluster.nodes[1 - l].name.clone();
        let log_before = h.agent_log(&replica).len();
        let at = Instant::now();
        h.cluster.crash_host(l).unwrap();
        h.cluster.crash_witness().unwrap();
        tokio::time::sleep(ttl(h) * 4).await;
        // Still a replica, and its status says why.
        let replica_pg = h.client(&replica).await;
        let in_recovery: bool = replica_pg
            .query_one("SELECT pg_is_in_recovery()", &[])
            .await
            .unwrap()
            .get(0);
        assert!(in_recovery, "{replica} promoted itself without a quorum");
        let i = h.cluster.node_index(&replica).unwrap();
        let status = h.cluster.nodes[i].api().get("/patroni").await.unwrap().body;
        let said = status.to_string();
        assert!(
            said.contains("no quorum"),
            "{replica}'s status does not say it: {said}"
        );
        let log = h.agent_log(&replica);
        let complaints = log[log_before..]
            .lines()
            .filter(|l| l.contains("cannot read the DCS"))
            .count();
        assert!(
            complaints >= 3,
            "{replica} logged its lost quorum {complaints} times in {:?}",
            at.elapsed()
        );
        let outage = writers.longest_gap_since(at);
        h.cluster.start_witness().unwrap();
        h.cluster.start_agent(l).unwrap();
        first_write(&writers, Instant::now(), None, Duration::from_secs(90)).await;
        let evidence = writers.finish().await;
        let mut outcome = check(h, &evidence, false, outage).await;
        assert_eq!(outcome.lost, 0, "the outage lost acknowledged writes");
        h.healthy(Duration::from_secs(120)).await;
        outcome.note = Some(format!(
            "{replica} stayed a replica for {} ms without a quorum and logged it {complaints} times",
            (ttl(h) * 4).as_millis()
        ));
        outcome
    })
}
