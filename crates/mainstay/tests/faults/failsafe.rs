//! Failsafe mode's membership: a member that rejoins during an etcd outage
//! must not win against a primary the other members still confirm.

use crate::common::{self, Harness};
use crate::evidence::{Outcome, check, first_write};
use crate::scenarios::{ETCD_PORTS, Running, lab, ttl, under_load};
use mainstay_core::ClusterView;
use std::time::{Duration, Instant};

/// Turns failsafe mode on and waits until every agent has it.
pub(crate) async fn enable_failsafe(h: &Harness, leader: &str) {
    common::patch_config(h, leader, serde_json::json!({"failsafe_mode": true})).await;
    for node in h.names() {
        let deadline = Instant::now() + Duration::from_secs(10);
        while common::api(h, &node).get("/config").await.unwrap().body["failsafe_mode"] != true {
            assert!(Instant::now() < deadline, "{node} never saw failsafe_mode");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn listed(view: &ClusterView, name: &str) -> bool {
    view.failsafe
        .as_ref()
        .and_then(|r| r.state.as_ref().ok())
        .is_some_and(|f| f.leader == name || f.members.contains_key(name))
}

/// Failsafe on; a replica's agent restarts, so its member key goes and the
/// leader writes a failsafe list without it; the leader's host is then cut
/// off etcd (it still reaches the members' APIs and its clients); the
/// replica's agent comes back and publishes a new key; the leader's key
/// expires. The leader goes on writing, confirmed by the member on its
/// list; the rejoined member, never asked, must not take the key, and
/// nobody else may write (the checker). Once etcd is back the same leader
/// keeps its role.
pub(crate) fn failsafe_member_rejoins(h: &mut Harness) -> Running<'_> {
    Box::pin(async move {
        let leader = h.healthy(Duration::from_secs(120)).await;
        enable_failsafe(h, &leader).await;
        let (leader, writers) = under_load(h).await;
        let l = h.cluster.node_index(&leader).unwrap();
        let rejoining = h.other_than(&leader);
        let r = h.cluster.node_index(&rejoining).unwrap();
        assert!(
            h.cluster.stop_agent(r, Duration::from_secs(30)),
            "{rejoining}'s agent did not stop cleanly"
        );
        h.wait_for(
            "the member key gone and the failsafe list rewritten without it",
            Duration::from_secs(30),
            async |v: &ClusterView| {
                (!v.members.contains_key(&rejoining)
                    && listed(v, &leader)
                    && !listed(v, &rejoining))
                .then_some(())
            },
        )
        .await;
        lab(h).isolate_ports(l, &ETCD_PORTS).unwrap();
        let at = Instant::now();
        h.cluster.start_agent(r).unwrap();
        h.wait_for(
            "the rejoined member's new key",
            Duration::from_secs(30),
            async |v: &ClusterView| v.members.contains_key(&rejoining).then_some(()),
        )
        .await;
        let ttl = ttl(h);
        let watch_until = at + 3 * ttl;
        let mut key_expired = false;
        // Bounded by `watch_until`, and by a count in case reads hang.
        for _ in 0..1000 {
            if Instant::now() >= watch_until {
                break;
            }
            let view = h.view().await;
            match view.leader_name() {
                Some(name) if name == rejoining => {
                    panic!("{rejoining}, never asked to confirm {leader}, took the leader key")
                }
                Some(name) if name != leader => {
                    panic!("{name} took the leader key while {leader} was still confirmed")
                }
                None => key_expired = true,
                Some(_) => {}
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(
            key_expired,
            "{leader}'s leader key never expired: the cut did not hold"
        );
        let gap = writers.longest_gap_since(at);
        assert!(
            gap < 3000,
            "the confirmed primary stopped writing for {gap} ms while its members confirmed it"
        );
        lab(h).heal(l);
        first_write(&writers, Instant::now(), None, Duration::from_secs(60)).await;
        let evidence = writers.finish().await;
        let mut outcome: Outcome = check(h, &evidence, false, gap).await;
        assert_eq!(outcome.lost, 0, "the outage lost acknowledged writes");
        assert_eq!(
            h.healthy(Duration::from_secs(60)).await,
            leader,
            "the failsafe primary lost its role when etcd came back"
        );
        outcome.note = Some(format!(
            "{rejoining} rejoined while {leader} was cut off etcd; {leader}'s key expired and \
             nobody else took it in {} ms; longest write gap {gap} ms",
            (3 * ttl).as_millis()
        ));
        outcome
    })
}
