//! Points in time on `CLOCK_BOOTTIME`.
//!
//! The lease in etcd expires in real time. `CLOCK_MONOTONIC` stops while the
//! host is suspended, so a deadline measured on it would be late by the
//! length of the suspend; `CLOCK_BOOTTIME` keeps counting. The agent and the
//! guard run on the same host and read the same clock, so a deadline can be
//! handed over as a plain number of nanoseconds.

use rustix::time::{ClockId, clock_gettime};
use std::time::Duration;

/// Nanoseconds since boot, suspends included.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BootTime(pub u64);

impl BootTime {
    pub fn now() -> BootTime {
        let ts = clock_gettime(ClockId::Boottime);
        BootTime(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
    }

    pub fn saturating_add(self, d: Duration) -> BootTime {
        BootTime(
            self.0
                .saturating_add(d.as_nanos().min(u64::MAX as u128) as u64),
        )
    }

    pub fn saturating_sub(self, d: Duration) -> BootTime {
        BootTime(
            self.0
                .saturating_sub(d.as_nanos().min(u64::MAX as u128) as u64),
        )
    }

    /// How long from `earlier` to `self` (zero if `earlier` is later).
    pub fn since(self, earlier: BootTime) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_time_moves_forward_and_does_arithmetic() {
        let a = BootTime::now();
        std::thread::sleep(Duration::from_millis(2));
        let b = BootTime::now();
        assert!(b.since(a) >= Duration::from_millis(2));
        assert_eq!(a.since(b), Duration::ZERO);
        assert_eq!(
            a.saturating_add(Duration::from_secs(1)).since(a),
            Duration::from_secs(1)
        );
        assert_eq!(
            BootTime(5).saturating_sub(Duration::from_secs(1)),
            BootTime(0)
        );
    }
}
