//! The node's timing: the five durations an operator sets in `[timing]` (or
//! a profile gives), and every duration the shell derives from them, each
//! computed here once and named. The rules that make a timing safe (a leader
//! must always fence itself before etcd can expire its lease) are checked
//! where the file is read; this module only does arithmetic.

use crate::lease::LeaseTiming;
use crate::observation::Settings;
use std::time::Duration;

/// The timing in force on a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// Lifetime of the node's lease in etcd (whole seconds: etcd's unit).
    pub ttl: Duration,
    /// Period of the HA loop when nothing happens.
    pub loop_wait: Duration,
    /// Period of lease keep-alives.
    pub renew_interval: Duration,
    /// Upper bound of one etcd request.
    pub dcs_timeout: Duration,
    /// A leader that has not renewed stops writing this long before its
    /// lease can expire in etcd.
    pub fencing_margin: Duration,
}

/// A replica that cannot stream from a running leader for this long has
/// its WAL checked against the leader's history again.
const STUCK_REPLICA: Duration = Duration::from_secs(30);

impl Timing {
    /// The `default` profile, for a LAN: failover in about 4 s.
    pub const DEFAULT: Timing = Timing {
        ttl: Duration::from_secs(4),
        loop_wait: Duration::from_secs(1),
        renew_interval: Duration::from_secs(1),
        dcs_timeout: Duration::from_secs(1),
        fencing_margin: Duration::from_secs(1),
    };

    /// The `fast` profile: failover in about 2 s, for an etcd with a short
    /// election timeout.
    pub const FAST: Timing = Timing {
        ttl: Duration::from_secs(2),
        loop_wait: Duration::from_millis(500),
        renew_interval: Duration::from_millis(500),
        dcs_timeout: Duration::from_millis(400),
        fencing_margin: Duration::from_millis(500),
    };

    /// The lease to ask etcd for, in its unit.
    pub fn lease_ttl_secs(&self) -> i64 {
        self.ttl.as_secs() as i64
    }

    /// What the lease rules need.
    pub fn lease(&self) -> LeaseTiming {
        LeaseTiming {
            ttl_ms: millis(self.ttl),
            fencing_margin_ms: millis(self.fencing_margin),
        }
    }

    /// What `decide` needs. A candidate waits for the other members'
    /// statuses taken after the leader vanished for two loops (each member
    /// turns once per loop, plus one turn that began just before) and one
    /// request to publish.
    pub fn decide_settings(&self) -> Settings {
        Settings {
            ttl_ms: millis(self.ttl),
            loop_wait_ms: millis(self.loop_wait),
            election_wait_ms: 2 * millis(self.loop_wait) + millis(self.dcs_timeout),
            stuck_replica_ms: millis(STUCK_REPLICA),
        }
    }

    /// How long a view of the cluster read from etcd stays trustworthy: no
    /// leader it showed can have been replaced sooner, since that leader
    /// fences itself this long after its last renewal at the latest.
    pub fn view_trusted_for(&self) -> Duration {
        self.ttl.saturating_sub(self.fencing_margin)
    }

    /// The REST API's liveness: the HA loop must have finished a turn this
    /// recently, within a ttl on the leader (which must renew) and two
    /// elsewhere.
    pub fn loop_alive_within(&self, holds_leader: bool) -> Duration {
        if holds_leader { self.ttl } else { 2 * self.ttl }
    }

    /// How long a crash drill keeps a leader down at most when no other
    /// node takes over: three leases (expiry, election, promotion) and 20 s
    /// for a slow promotion.
    pub fn crash_drill_limit(&self) -> Duration {
        3 * self.ttl + Duration::from_secs(20)
    }

    /// How long the REST API waits for a switchover it started: the old
    /// leader waits up to a ttl for the candidate, then the candidate must
    /// promote; twice the ttl and 10 s of slack cover both.
    pub fn switchover_wait_limit(&self) -> Duration {
        2 * self.ttl + Duration::from_secs(10)
    }

    /// How long a leader handing over waits for the candidate to receive
    /// its last WAL: one lease, the time the cluster would otherwise take
    /// to notice a dead leader.
    pub fn handover_catch_up_limit(&self) -> Duration {
        self.ttl
    }
}

fn millis(duration: Duration) -> u64 {
    duration.as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_durations_follow_the_profile() {
        let t = Timing::DEFAULT;
        assert_eq!(t.lease_ttl_secs(), 4);
        assert_eq!(
            t.lease().deadline_after(crate::Millis(1_000)),
            crate::Millis(4_000)
        );
        assert_eq!(t.decide_settings().election_wait_ms, 3_000);
        assert_eq!(t.view_trusted_for(), Duration::from_secs(3));
        assert_eq!(t.loop_alive_within(false), Duration::from_secs(8));
        assert_eq!(t.crash_drill_limit(), Duration::from_secs(32));
        assert_eq!(t.switchover_wait_limit(), Duration::from_secs(18));
        let fast = Timing::FAST;
        assert_eq!(fast.decide_settings().election_wait_ms, 1_400);
        assert_eq!(fast.view_trusted_for(), Duration::from_millis(1_500));
    }
}
