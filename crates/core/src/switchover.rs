//! Planned switchovers and manual failovers: which replica may take over on
//! request. The REST API checks a request with these functions before it
//! stores it (so a bad one is refused with the reason at once), and the
//! leader checks it again when it runs, against the state at that moment.

use crate::candidate::{self, Candidate};
use crate::dynamic::DynamicConfig;
use crate::sync::Standby;
use crate::types::{ClusterView, FailoverKind, FailoverRequest, Lsn, MemberStatus, PgRole};

/// How far behind the leader a candidate is.
#[derive(Clone, Copy, Debug)]
pub enum Lag<'a> {
    /// Not judged: positions published by different members are sampled at
    /// different times (a second apart under load), so only the leader's
    /// live view may refuse a candidate for lag. The REST API's pre-check.
    Unknown,
    /// The leader's live view: its WAL position and its standbys as
    /// `pg_stat_replication` shows them, from the same probe.
    Live {
        leader_lsn: Lsn,
        standbys: &'a [Standby],
    },
}

/// Why `name` cannot take over from `leader` now; `None` when it can.
pub fn unfit_candidate(
    view: &ClusterView,
    leader: &str,
    lag: Lag<'_>,
    name: &str,
    config: &DynamicConfig,
) -> Option<String> {
    if name == leader {
        return Some(format!("{name} is already the leader"));
    }
    let Some(member) = view.members.get(name) else {
        return Some(format!(
            "{name} is not a member of the cluster (members: {})",
            member_list(view)
        ));
    };
    let status = &member.status;
    if status.tags.nofailover {
        return Some(format!("{name} is tagged nofailover"));
    }
    if status.role != PgRole::Replica || !status.streaming {
        return Some(format!(
            "{name} is not a streaming replica (its PostgreSQL is {})",
            match status.role {
                PgRole::Replica => "a replica that is not streaming",
                PgRole::Primary => "a primary",
                PgRole::Stopped => "stopped",
            }
        ));
    }
    if status.following.as_deref() != Some(leader) {
        return Some(format!("{name} does not stream from the leader {leader}"));
    }
    let Lag::Live {
        leader_lsn,
        standbys,
    } = lag
    else {
        return None;
    };
    let Some(standby) = standbys.iter().find(|s| s.name == name && s.streaming) else {
        return Some(format!("{name} is not streaming from the leader {leader}"));
    };
    let lag = leader_lsn.0.saturating_sub(standby.flush.0);
    if lag > config.maximum_lag_on_failover {
        return Some(format!(
            "{name} is {lag} bytes behind the leader, more than maximum_lag_on_failover \
             ({} bytes): wait until it catches up",
            config.maximum_lag_on_failover
        ));
    }
    None
}

/// The best replica that may take over from `leader`, or why there is none.
pub fn best_candidate(
    view: &ClusterView,
    leader: &str,
    lag: Lag<'_>,
    config: &DynamicConfig,
) -> Result<String, String> {
    let fit: Vec<Candidate<'_>> = view
        .members
        .values()
        .map(|m| &m.status)
        .filter(|s| unfit_candidate(view, leader, lag, &s.name, config).is_none())
        .map(|s| Candidate {
            name: &s.name,
            timeline: s.timeline,
            lsn: position(s),
            tags: &s.tags,
        })
        .collect();
    fit.iter()
        .max_by(|a, b| candidate::compare(a, b))
        .map(|c| c.name.to_string())
        .ok_or_else(|| {
            "no replica can take over: none is streaming from the leader, caught up and \
             without the nofailover tag"
                .to_string()
        })
}

/// Where a `with-leader` service that keeps failing on the leader should
/// move leadership to (a planned switchover), or why it must not move:
/// never a failover loop, so a service already failed on another member
/// (two nodes in a row) stops the moving, and so does a cluster without a
/// replica fit to take over. `failed` is the state members publish for a
/// service that gave up.
pub fn service_move(
    view: &ClusterView,
    leader: &str,
    service: &str,
    config: &DynamicConfig,
) -> Result<String, String> {
    if config.pause {
        return Err("the cluster is paused (maintenance mode)".into());
    }
    let failed_elsewhere: Vec<&str> = view
        .members
        .values()
        .map(|m| &m.status)
        .filter(|s| {
            s.name != leader && s.services.get(service).map(String::as_str) == Some("failed")
        })
        .map(|s| s.name.as_str())
        .collect();
    if !failed_elsewhere.is_empty() {
        return Err(format!(
            "{service} failed on {} too: not moving leadership again ({service} failed on two \
             nodes in a row); fix it, then `mainstay ctl restart-service NODE {service}`",
            failed_elsewhere.join(", ")
        ));
    }
    best_candidate(view, leader, Lag::Unknown, config)
}

/// Seconds a scheduled time may lie in the past when the request arrives:
/// the client's clock and this node's differ a little, and "now" typed by
/// hand is already a few seconds old.
pub const SCHEDULE_CLOCK_TOLERANCE: u64 = 30;

/// Why a switchover cannot be scheduled at Unix time `at` when the request
/// arrives at `now`; `None` when it can. A time in the past would run at
/// once (surprising for something meant to be planned); one beyond the
/// horizon is a typo, and would block every other request while it waits.
pub fn unfit_schedule(at: u64, now: u64, config: &DynamicConfig) -> Option<String> {
    if at.saturating_add(SCHEDULE_CLOCK_TOLERANCE) < now {
        return Some(format!(
            "scheduled_at is {} seconds in the past; give a future time, or leave \
             scheduled_at out to switch over now",
            now - at
        ));
    }
    let horizon = config.scheduled_switchover_horizon;
    if at > now.saturating_add(horizon) {
        return Some(format!(
            "scheduled_at is more than scheduled_switchover_horizon ({horizon} seconds) \
             ahead; give a nearer time, or raise scheduled_switchover_horizon in the \
             dynamic configuration"
        ));
    }
    None
}

/// What the leader should do with a pending request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaderVerdict {
    /// Hand over to this member now.
    HandOver(String),
    /// Scheduled for later: look again at this Unix time.
    Wait { at: u64 },
    /// Drop the request; the reason goes to the log.
    Drop(String),
}

/// The leader's judgement of `request` at wall-clock `now_secs`.
pub fn judge(
    request: &FailoverRequest,
    view: &ClusterView,
    me: &str,
    lag: Lag<'_>,
    now_secs: u64,
    config: &DynamicConfig,
) -> LeaderVerdict {
    if let Some(expected) = &request.leader
        && expected != me
    {
        return LeaderVerdict::Drop(format!(
            "the request was for leader {expected}, but {me} leads now (done or overtaken)"
        ));
    }
    if request.candidate.as_deref() == Some(me) {
        return LeaderVerdict::Drop(format!("{me} leads: the request is done"));
    }
    if let Some(at) = request.scheduled_at
        && at > now_secs
    {
        // Written by someone else than the API, or the horizon shrank since.
        if at > now_secs.saturating_add(config.scheduled_switchover_horizon) {
            return LeaderVerdict::Drop(format!(
                "refused: scheduled at Unix time {at}, more than \
                 scheduled_switchover_horizon ({} seconds) ahead",
                config.scheduled_switchover_horizon
            ));
        }
        return LeaderVerdict::Wait { at };
    }
    match &request.candidate {
        Some(name) => match unfit_candidate(view, me, lag, name, config) {
            None => LeaderVerdict::HandOver(name.clone()),
            Some(reason) => LeaderVerdict::Drop(format!("refused: {reason}")),
        },
        None if config.pause => LeaderVerdict::Drop(
            "refused: the cluster is paused, and in maintenance mode only a named candidate \
             is switched to"
                .into(),
        ),
        None if request.kind == FailoverKind::Failover => {
            LeaderVerdict::Drop("refused: a failover names its candidate".into())
        }
        None => match best_candidate(view, me, lag, config) {
            Ok(name) => LeaderVerdict::HandOver(name),
            Err(reason) => LeaderVerdict::Drop(format!("refused: {reason}")),
        },
    }
}

fn position(status: &MemberStatus) -> Lsn {
    status.received_lsn.max(status.replayed_lsn)
}

fn member_list(view: &ClusterView) -> String {
    view.members.keys().cloned().collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{LeaderRecord, MemberRecord};

    fn member(name: &str, role: PgRole, lsn: u64, following: Option<&str>) -> MemberRecord {
        MemberRecord::example(name, role, lsn, following)
    }

    fn view() -> ClusterView {
        let mut view = ClusterView {
            leader: Some(LeaderRecord {
                name: "a".into(),
                lease_id: 1,
                mod_revision: 1,
            }),
            ..ClusterView::default()
        };
        for m in [
            member("a", PgRole::Primary, 5000, None),
            member("b", PgRole::Replica, 5000, Some("a")),
            member("c", PgRole::Replica, 4000, Some("a")),
            member("d", PgRole::Stopped, 0, None),
        ] {
            view.members.insert(m.status.name.clone(), m);
        }
        view
    }

    fn request(candidate: Option<&str>, scheduled_at: Option<u64>) -> FailoverRequest {
        FailoverRequest {
            kind: FailoverKind::Switchover,
            leader: Some("a".into()),
            candidate: candidate.map(Into::into),
            scheduled_at,
            requested_at: 0,
        }
    }

    fn standbys() -> Vec<Standby> {
        [("b", 5000), ("c", 4000)]
            .into_iter()
            .map(|(name, flush)| Standby {
                name: name.into(),
                flush: Lsn(flush),
                sync_state: "async".into(),
                streaming: true,
            })
            .collect()
    }

    #[test]
    fn a_failing_service_moves_leadership_once_then_stops_the_moving() {
        let mut v = view();
        let config = DynamicConfig::default();
        assert_eq!(service_move(&v, "a", "synapse", &config), Ok("b".into()));
        // It failed on b before (b still says so): a is the second node in
        // a row.
        v.members.get_mut("b").unwrap().status.services =
            [("synapse".to_string(), "failed".to_string())].into();
        let refused = service_move(&v, "a", "synapse", &config).unwrap_err();
        assert!(refused.contains("failed on b too"), "{refused}");
        assert!(refused.contains("two nodes in a row"), "{refused}");
        // Another service's failure there does not count.
        assert_eq!(service_move(&v, "a", "coturn", &config), Ok("b".into()));
        let paused = DynamicConfig {
            pause: true,
            ..DynamicConfig::default()
        };
        assert!(service_move(&v, "a", "coturn", &paused).is_err());
        let mut alone = view();
        alone.members.retain(|name, _| name == "a");
        assert!(
            service_move(&alone, "a", "synapse", &config)
                .unwrap_err()
                .contains("no replica can take over")
        );
    }

    #[test]
    fn candidates_must_stream_from_the_leader_and_be_caught_up() {
        let v = view();
        let config = DynamicConfig::default();
        let live = standbys();
        let lsn = Lag::Live {
            leader_lsn: Lsn(5000),
            standbys: &live,
        };
        assert_eq!(unfit_candidate(&v, "a", lsn, "b", &config), None);
        assert!(
            unfit_candidate(&v, "a", lsn, "a", &config)
                .unwrap()
                .contains("already")
        );
        assert!(
            unfit_candidate(&v, "a", lsn, "d", &config)
                .unwrap()
                .contains("stopped")
        );
        assert!(
            unfit_candidate(&v, "a", lsn, "zz", &config)
                .unwrap()
                .contains("not a member")
        );
        let strict = DynamicConfig {
            maximum_lag_on_failover: 100,
            ..DynamicConfig::default()
        };
        assert!(
            unfit_candidate(&v, "a", lsn, "c", &strict)
                .unwrap()
                .contains("behind")
        );
        let mut tagged = view();
        tagged.members.get_mut("b").unwrap().status.tags.nofailover = true;
        assert!(
            unfit_candidate(&tagged, "a", lsn, "b", &config)
                .unwrap()
                .contains("nofailover")
        );
        assert_eq!(best_candidate(&tagged, "a", lsn, &config), Ok("c".into()));
    }

    #[test]
    fn a_schedule_lies_between_now_and_the_horizon() {
        let config = DynamicConfig::default();
        let now = 1_800_000_000;
        let horizon = config.scheduled_switchover_horizon;
        for fine in [now, now - SCHEDULE_CLOCK_TOLERANCE, now + 1, now + horizon] {
            assert_eq!(unfit_schedule(fine, now, &config), None, "{fine}");
        }
        for bad in [
            0,
            now - SCHEDULE_CLOCK_TOLERANCE - 1,
            now + horizon + 1,
            u64::MAX,
        ] {
            assert!(unfit_schedule(bad, now, &config).is_some(), "{bad}");
        }
        assert!(unfit_schedule(0, 0, &config).is_none());
    }

    #[test]
    fn the_leader_hands_over_waits_or_drops() {
        let v = view();
        let config = DynamicConfig::default();
        let live = standbys();
        let judge_at = |r: &FailoverRequest, me: &str, now: u64| {
            let lag = Lag::Live {
                leader_lsn: Lsn(5000),
                standbys: &live,
            };
            judge(r, &v, me, lag, now, &config)
        };
        assert_eq!(
            judge_at(&request(None, None), "a", 10),
            LeaderVerdict::HandOver("b".into())
        );
        assert_eq!(
            judge_at(&request(Some("c"), None), "a", 10),
            LeaderVerdict::HandOver("c".into())
        );
        assert_eq!(
            judge_at(&request(Some("c"), Some(100)), "a", 10),
            LeaderVerdict::Wait { at: 100 }
        );
        // Written into the DCS by hand, far beyond the horizon (and beyond
        // what any clock can show): dropped, nothing overflows.
        for far in [10 + config.scheduled_switchover_horizon + 1, u64::MAX] {
            assert!(matches!(
                judge_at(&request(Some("c"), Some(far)), "a", 10),
                LeaderVerdict::Drop(reason) if reason.contains("horizon")
            ));
        }
        assert!(matches!(
            judge_at(&request(Some("d"), None), "a", 10),
            LeaderVerdict::Drop(_)
        ));
        // Run by someone else, or done.
        assert!(matches!(
            judge_at(&request(Some("b"), None), "b", 10),
            LeaderVerdict::Drop(_)
        ));
        let mut failover = request(None, None);
        failover.kind = FailoverKind::Failover;
        failover.leader = None;
        assert!(matches!(
            judge_at(&failover, "a", 10),
            LeaderVerdict::Drop(_)
        ));
    }
}
