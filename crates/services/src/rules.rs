//! Where a service should run, and when a failed one may start again: pure
//! functions of what the agent published and of the service's history, so
//! every rule has a unit test.

use crate::spec::{Placement, RestartPolicy};
use mainstay_core::{LocalState, PgRole};
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Whether a service with `placement` belongs on this node now.
pub fn belongs_here(placement: Placement, local: &LocalState) -> bool {
    match placement {
        Placement::WithLeader => local.leading,
        Placement::Everywhere => true,
        Placement::WithReplica => !local.leading && local.pg_role == PgRole::Replica,
    }
}

/// A service's restarts: exponential backoff, and a limit per window past
/// which it is failed.
#[derive(Clone, Debug)]
pub struct Backoff {
    policy: RestartPolicy,
    /// When each restart within the window was decided.
    restarts: VecDeque<Instant>,
    next_wait: Duration,
}

/// What to do after a service exited or failed its checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AfterFailure {
    /// Start it again at this moment.
    RestartAt(Instant),
    /// The limit is spent: `limit` restarts within `window` already.
    GiveUp,
}

impl Backoff {
    pub fn new(policy: RestartPolicy) -> Backoff {
        Backoff {
            policy,
            restarts: VecDeque::new(),
            next_wait: policy.initial_backoff,
        }
    }

    /// The service failed at `now`.
    pub fn after_failure(&mut self, now: Instant) -> AfterFailure {
        while self
            .restarts
            .front()
            .is_some_and(|at| now.saturating_duration_since(*at) >= self.policy.window)
        {
            self.restarts.pop_front();
        }
        if self.restarts.is_empty() {
            // A whole window without a failure: it starts over gently.
            self.next_wait = self.policy.initial_backoff;
        }
        if self.restarts.len() >= self.policy.limit as usize {
            return AfterFailure::GiveUp;
        }
        let at = now + self.next_wait;
        self.next_wait = (self.next_wait * 2).min(self.policy.max_backoff);
        self.restarts.push_back(now);
        AfterFailure::RestartAt(at)
    }

    /// Restarts counted within the window at `now`.
    pub fn recent(&self, now: Instant) -> usize {
        self.restarts
            .iter()
            .filter(|at| now.saturating_duration_since(**at) < self.policy.window)
            .count()
    }

    /// An operator's restart or a new placement: the history is forgotten.
    pub fn reset(&mut self) {
        self.restarts.clear();
        self.next_wait = self.policy.initial_backoff;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: RestartPolicy = RestartPolicy {
        initial_backoff: Duration::from_secs(1),
        max_backoff: Duration::from_secs(4),
        limit: 4,
        window: Duration::from_secs(60),
    };

    #[test]
    fn placement_follows_the_published_role() {
        let leader = LocalState {
            leading: true,
            pg_role: PgRole::Primary,
        };
        let replica = LocalState {
            leading: false,
            pg_role: PgRole::Replica,
        };
        // A primary without the key (about to be demoted) is not a leader.
        let orphan = LocalState {
            leading: false,
            pg_role: PgRole::Primary,
        };
        let stopped = LocalState::default();
        for (local, with_leader, with_replica) in [
            (&leader, true, false),
            (&replica, false, true),
            (&orphan, false, false),
            (&stopped, false, false),
        ] {
            assert_eq!(belongs_here(Placement::WithLeader, local), with_leader);
            assert_eq!(belongs_here(Placement::WithReplica, local), with_replica);
            assert!(belongs_here(Placement::Everywhere, local));
        }
    }

    #[test]
    fn restarts_back_off_up_to_the_limit_then_give_up() {
        let t0 = Instant::now();
        let mut backoff = Backoff::new(POLICY);
        let secs = Duration::from_secs;
        assert_eq!(
            backoff.after_failure(t0),
            AfterFailure::RestartAt(t0 + secs(1))
        );
        assert_eq!(
            backoff.after_failure(t0 + secs(2)),
            AfterFailure::RestartAt(t0 + secs(4))
        );
        assert_eq!(
            backoff.after_failure(t0 + secs(5)),
            AfterFailure::RestartAt(t0 + secs(9)),
            "4 s: the ceiling"
        );
        assert_eq!(
            backoff.after_failure(t0 + secs(10)),
            AfterFailure::RestartAt(t0 + secs(14))
        );
        assert_eq!(backoff.recent(t0 + secs(10)), 4);
        assert_eq!(backoff.after_failure(t0 + secs(15)), AfterFailure::GiveUp);
        // Once the first restarts leave the window, one more is allowed.
        assert_eq!(
            backoff.after_failure(t0 + secs(61)),
            AfterFailure::RestartAt(t0 + secs(65))
        );
    }

    #[test]
    fn a_quiet_window_starts_the_backoff_over() {
        let t0 = Instant::now();
        let secs = Duration::from_secs;
        let mut backoff = Backoff::new(POLICY);
        backoff.after_failure(t0);
        backoff.after_failure(t0 + secs(2));
        assert_eq!(
            backoff.after_failure(t0 + secs(200)),
            AfterFailure::RestartAt(t0 + secs(201))
        );
        backoff.reset();
        assert_eq!(backoff.recent(t0 + secs(200)), 0);
    }
}
