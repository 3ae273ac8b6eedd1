//! The agent's lease clock: milliseconds on `CLOCK_BOOTTIME`.
//!
//! The lease in etcd expires in real time. tokio's clock (`CLOCK_MONOTONIC`)
//! stands still while the host is suspended, so a deadline kept on it would
//! be late by the length of the suspend; `CLOCK_BOOTTIME` keeps counting,
//! and the fencing guard enforces deadlines on it. The lease keeper and the
//! core's lease rules (`mainstay_core::lease`) therefore count in boot-time
//! milliseconds; timers (tokio) and the HA loop's own clock convert at the
//! moment of use, so a suspend is accounted for wherever it happened.

use mainstay_core::Millis;
use mainstay_pg::BootTime;
use tokio::time::Instant;

/// Now, in milliseconds since boot (suspends included).
pub fn now() -> Millis {
    Millis(BootTime::now().0 / 1_000_000)
}

/// The boot-time instant a deadline in boot-time milliseconds stands for.
pub fn boot_time(at: Millis) -> BootTime {
    BootTime(at.0.saturating_mul(1_000_000))
}

/// A tokio instant that is due when the boot clock reaches `at` (now, if it
/// has): never later than `at`, whatever was suspended before the call.
pub fn instant_at(at: Millis) -> Instant {
    Instant::now() + std::time::Duration::from_millis(at.since(now()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn conversions_agree() {
        let start = now();
        let later = start.plus(5000);
        let due = instant_at(later);
        let remaining = due.saturating_duration_since(Instant::now());
        assert!(remaining <= Duration::from_secs(5) && remaining > Duration::from_secs(4));
        assert!(instant_at(Millis(0)) <= Instant::now());
        assert_eq!(boot_time(Millis(3)), BootTime(3_000_000));
        assert!(boot_time(start) <= BootTime::now());
    }
}
