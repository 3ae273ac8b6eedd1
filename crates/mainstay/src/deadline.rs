//! A point in time on two clocks at once: tokio's (monotonic, for timers
//! and the decision core) and `CLOCK_BOOTTIME` (what the fencing guard
//! enforces). Both are read together when the deadline is made, so the
//! boot-time value is exact; the monotonic one stands still while the host
//! is suspended, which is why every safety check reads the boot-time one.

use mainstay_pg::BootTime;
use std::time::Duration;
use tokio::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deadline {
    pub mono: Instant,
    pub boot: BootTime,
}

impl Deadline {
    pub fn now() -> Deadline {
        Deadline {
            mono: Instant::now(),
            boot: BootTime::now(),
        }
    }

    pub fn after(self, d: Duration) -> Deadline {
        Deadline {
            mono: self.mono + d,
            boot: self.boot.saturating_add(d),
        }
    }

    pub fn saturating_sub(self, d: Duration) -> Deadline {
        Deadline {
            mono: self.mono.checked_sub(d).unwrap_or(self.mono),
            boot: self.boot.saturating_sub(d),
        }
    }

    /// How long until the deadline, suspends included (zero once passed).
    pub fn remaining(&self) -> Duration {
        self.boot.since(BootTime::now())
    }

    pub fn passed(&self) -> bool {
        self.remaining().is_zero()
    }

    /// The deadline as a tokio instant that accounts for any suspend since it
    /// was made: never later than the boot-time deadline.
    pub fn as_instant(&self) -> Instant {
        Instant::now() + self.remaining()
    }

    /// The later of the two (by boot time).
    pub fn max(self, other: Deadline) -> Deadline {
        if other.boot > self.boot { other } else { self }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_clocks_move_together() {
        let start = Deadline::now();
        let later = start.after(Duration::from_secs(5));
        assert!(!later.passed());
        assert!(later.remaining() <= Duration::from_secs(5));
        assert!(later.remaining() > Duration::from_secs(4));
        assert!(start.passed());
        assert_eq!(start.max(later), later);
        assert_eq!(later.max(start), later);
        assert!(later.as_instant() <= Instant::now() + Duration::from_secs(5));
        assert_eq!(
            later.saturating_sub(Duration::from_secs(5)).boot,
            start.boot
        );
    }
}
