//! The kernel watchdog (`/dev/watchdog`), like Patroni's `watchdog:` setting.
//!
//! Why: the leader stops PostgreSQL at its fencing deadline (send time of the
//! last confirmed lease renewal + `ttl` - `fencing_margin`) through the
//! fencing guard, a process of its own. If the whole host's user space
//! freezes, guard included, nothing in user space can fence. A hardware or
//! kernel watchdog resets the machine when it is not fed in time: the leader
//! feeds it only while a feed cannot outlive its deadline, so a frozen host
//! is reset before its lease can expire in etcd and another node lead.
//!
//! - `schedule`: the feeding rule ([`may_feed`], [`next_feed_at`]) and the
//!   device timeout a timing allows ([`timeout_for`]), pure and unit-tested;
//! - `feeder`: a [`Device`] fed by that rule ([`Feeder`]) and the magic
//!   close ([`close_cleanly`]), tested against a fake device;
//! - `device`: the real device ([`Watchdog`]): open, set and check the
//!   timeout, identity, feed, magic close;
//! - the four ioctls come from `mainstay_sys::watchdog`: this crate has no
//!   `unsafe` of its own.
//!
//! The development and CI machines have no watchdog device and cannot load
//! softdog: the tests cover the refusals (a missing path, a regular file, a
//! character device that is not a watchdog) and the feeding schedule against
//! a fake device, never a real watchdog.
//!
//! How the agent uses it, as the leader:
//!
//! 1. right after a confirmed renewal, if [`may_feed`] holds for the new
//!    deadline (opening arms the device, so it counts as a feed):
//!    `Watchdog::open(&settings)?.into_feeder()`;
//! 2. after every confirmed renewal and at [`Feeder::next_feed_at`]:
//!    [`Feeder::offer`] with the current deadline (`None` without a valid
//!    lease); the feeder refuses any feed that would outlive the deadline;
//! 3. when it stops leading, once PostgreSQL is no longer writable:
//!    [`Feeder::close_cleanly`] (magic close: the kernel disarms it).
//!
//! The agent offers feeds against the lease's expiry in etcd (the fencing
//! deadline + `fencing_margin`, the instant another node may lead): a host
//! that stops feeding is reset by then. A leader that is alive but cannot
//! renew closes the device cleanly as soon as its fencing deadline passes
//! (its guard has stopped PostgreSQL at that instant), within the
//! `fencing_margin` left before [`Feeder::fed_until`]; a frozen one cannot,
//! and is reset.
//!
//! A node that never leads never opens the device.

#![forbid(unsafe_code)]

mod device;
mod feeder;
mod schedule;

pub use device::{
    Identity, Probe, Settings, WDIOF_KEEPALIVEPING, WDIOF_MAGICCLOSE, WDIOF_SETTIMEOUT, Watchdog,
    WatchdogError,
};
pub use feeder::{Device, Feeder, close_cleanly, feed};
pub use schedule::{last_feed_at, may_feed, next_feed_at, timeout_for};

use std::fmt;

/// `watchdog.mode` in the configuration.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// Never opened (the default).
    #[default]
    Off,
    /// Used when it can be opened and configured; otherwise the node warns
    /// and leads without it.
    Automatic,
    /// A node that cannot open and configure the device never takes the
    /// leader key.
    Required,
}

impl Mode {
    /// The configuration's spelling: "off", "automatic", "required".
    pub fn parse(text: &str) -> Option<Mode> {
        match text {
            "off" => Some(Mode::Off),
            "automatic" => Some(Mode::Automatic),
            "required" => Some(Mode::Required),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Off => "off",
            Mode::Automatic => "automatic",
            Mode::Required => "required",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_round_trip() {
        for mode in [Mode::Off, Mode::Automatic, Mode::Required] {
            assert_eq!(Mode::parse(mode.as_str()), Some(mode));
        }
        assert_eq!(Mode::parse("Required"), None);
        assert_eq!(Mode::parse("on"), None);
        assert_eq!(Mode::default(), Mode::Off);
    }
}
