//! When the leader may feed the watchdog, as pure functions of time values:
//! no clock reads, no device, so that every rule has a unit test.
//!
//! Times are plain [`Duration`]s since an arbitrary origin (the agent uses
//! `CLOCK_BOOTTIME` nanoseconds, the clock of its fencing deadlines); only
//! differences between them matter, and every argument of one call must come
//! from the same clock.
//!
//! The rule: a feed at `now` keeps the machine alive until `now + timeout`
//! (the device's timeout, plus any safety margin). The leader may run a
//! writable PostgreSQL only until its fencing deadline (send time of the last
//! confirmed lease renewal + `ttl` - `fencing_margin`), so it may feed only if
//! `now + timeout <= deadline`: should the whole host freeze right after the
//! feed, the watchdog resets it no later than the deadline, before etcd can
//! expire the lease and let another node lead. When renewals stop, feeding
//! stops by itself `timeout` before the deadline; a deadline moved earlier
//! (the leader key is no longer this node's) stops it at once.

use std::time::Duration;

/// Whether a feed at `now` is allowed: it keeps the machine alive until
/// `now + timeout`, which must not be later than the fencing `deadline`.
///
/// `timeout` is how long one feed keeps the machine alive: the device's
/// effective timeout plus any safety margin ([`crate::Watchdog::horizon`]).
pub fn may_feed(now: Duration, deadline: Duration, timeout: Duration) -> bool {
    now.checked_add(timeout).is_some_and(|end| end <= deadline)
}

/// The last moment a feed is allowed for `deadline`: `deadline - timeout`,
/// or `None` if `timeout` is longer than the whole span up to `deadline`.
pub fn last_feed_at(deadline: Duration, timeout: Duration) -> Option<Duration> {
    deadline.checked_sub(timeout)
}

/// When to feed next, having just fed (or tried to) at `now`: after
/// `period` (how often the agent feeds while it may, e.g. `renew_interval / 2`),
/// but no later than the last allowed moment for `deadline`, so that the last
/// feed before a deadline that stops moving lands as late as the lease allows
/// and the machine survives until the next renewal can move it.
///
/// `None` when no later feed is allowed for this deadline: unless a confirmed
/// renewal moves the deadline later, the watchdog expires at the last feed +
/// `timeout`, no later than the deadline; the node must stop leading (and
/// disarm it with a magic close once PostgreSQL is no longer writable)
/// before then, or be reset.
///
/// A zero `period` is treated as 1 ms, so that a caller cannot spin.
pub fn next_feed_at(
    now: Duration,
    deadline: Duration,
    timeout: Duration,
    period: Duration,
) -> Option<Duration> {
    let last = last_feed_at(deadline, timeout)?;
    if last <= now {
        return None;
    }
    let period = period.max(Duration::from_millis(1));
    Some(now.saturating_add(period).min(last))
}

/// The device timeout for this timing: the longest whole number of seconds
/// (drivers take nothing finer) for which a feed made right after a
/// confirmed renewal still ends by the fencing deadline.
///
/// A renewal is sent at `s`; its confirmation comes back by `s + dcs_timeout`
/// (every etcd request is cut off after `dcs_timeout`), when the leader feeds;
/// the deadline is `s + ttl - fencing_margin`. So the feed satisfies
/// `now + timeout + safety_margin <= deadline` whenever
///
/// ```text
/// timeout = floor(ttl - fencing_margin - dcs_timeout - safety_margin) seconds
/// ```
///
/// `None` when that is below 1 s (no watchdog can be that short).
pub fn timeout_for(
    ttl: Duration,
    fencing_margin: Duration,
    dcs_timeout: Duration,
    safety_margin: Duration,
) -> Option<Duration> {
    let window = ttl
        .checked_sub(fencing_margin)?
        .checked_sub(dcs_timeout)?
        .checked_sub(safety_margin)?;
    let secs = window.as_secs();
    (secs >= 1).then(|| Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(secs: f64) -> Duration {
        Duration::from_secs_f64(secs)
    }

    #[test]
    fn a_feed_must_end_by_the_deadline() {
        let timeout = s(2.0);
        assert!(may_feed(s(0.0), s(3.0), timeout));
        assert!(may_feed(s(1.0), s(3.0), timeout), "ending exactly at it");
        assert!(!may_feed(s(1.001), s(3.0), timeout));
        assert!(!may_feed(s(5.0), s(3.0), timeout), "deadline passed");
        assert!(!may_feed(s(0.0), s(1.0), timeout), "deadline too close");
        assert!(!may_feed(Duration::MAX, Duration::MAX, timeout), "overflow");
        assert_eq!(last_feed_at(s(3.0), timeout), Some(s(1.0)));
        assert_eq!(last_feed_at(s(1.0), timeout), None);
    }

    #[test]
    fn the_next_feed_is_periodic_and_the_last_one_is_as_late_as_allowed() {
        let (timeout, period) = (s(2.0), s(0.5));
        // Deadline 3 s away: every 0.5 s, then exactly at deadline - timeout.
        assert_eq!(next_feed_at(s(0.0), s(3.0), timeout, period), Some(s(0.5)));
        assert_eq!(next_feed_at(s(0.8), s(3.0), timeout, period), Some(s(1.0)));
        // The feed at the last allowed moment was the last one.
        assert_eq!(next_feed_at(s(1.0), s(3.0), timeout, period), None);
        assert_eq!(next_feed_at(s(2.5), s(3.0), timeout, period), None);
        // A zero period cannot make the caller spin.
        assert_eq!(
            next_feed_at(s(0.0), s(3.0), timeout, Duration::ZERO),
            Some(s(0.001))
        );
    }

    #[test]
    fn the_timeout_follows_the_fencing_window() {
        let t = |ttl: f64, margin: f64, dcs: f64, safety: f64| {
            timeout_for(s(ttl), s(margin), s(dcs), s(safety))
        };
        // The two profiles: default 4 - 1 - 1 = 2 s; fast 2 - 0.5 - 0.4 = 1.1 -> 1 s.
        assert_eq!(t(4.0, 1.0, 1.0, 0.0), Some(s(2.0)));
        assert_eq!(t(2.0, 0.5, 0.4, 0.0), Some(s(1.0)));
        // Rounded down, never up.
        assert_eq!(t(30.0, 1.0, 1.5, 0.0), Some(s(27.0)));
        assert_eq!(t(30.0, 1.0, 1.5, 5.0), Some(s(22.0)));
        // Too short for a 1 s watchdog.
        assert_eq!(t(2.0, 0.5, 0.6, 0.0), None);
        assert_eq!(t(4.0, 1.0, 1.0, 2.5), None);
        assert_eq!(t(2.0, 3.0, 0.0, 0.0), None);
    }

    /// For every timing the configuration check accepts, a feed right after a
    /// renewal confirmed within `dcs_timeout` is allowed, and the machine it
    /// keeps alive is reset no later than the deadline.
    #[test]
    fn a_feed_after_any_confirmed_renewal_is_allowed() {
        let steps = [0.05, 0.1, 0.25, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0];
        let mut checked = 0;
        for ttl in [2u64, 3, 4, 5, 10, 30] {
            let ttl = Duration::from_secs(ttl);
            for &renew in &steps {
                for &dcs in &steps {
                    for &margin in &steps {
                        let (renew, dcs, margin) = (s(renew), s(dcs), s(margin));
                        // The configuration check's own rules.
                        if renew > ttl / 3 || margin >= ttl || renew + dcs >= ttl - margin {
                            continue;
                        }
                        let Some(timeout) = timeout_for(ttl, margin, dcs, Duration::ZERO) else {
                            assert!(ttl - margin - dcs < s(1.0));
                            continue;
                        };
                        checked += 1;
                        let sent = s(1000.0);
                        let deadline = sent + ttl - margin;
                        for rtt in [Duration::ZERO, dcs / 2, dcs] {
                            assert!(
                                may_feed(sent + rtt, deadline, timeout),
                                "ttl {ttl:?} margin {margin:?} dcs {dcs:?} rtt {rtt:?}"
                            );
                        }
                    }
                }
            }
        }
        assert!(checked > 100, "only {checked} timings checked");
    }
}
