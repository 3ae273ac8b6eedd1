//! Feeding a device by the rule of [`crate::schedule`], and disarming it.
//! Written against the small [`Device`] trait so that the whole schedule is
//! tested against a fake; [`crate::Watchdog`] is the real device.

use crate::schedule;
use std::io;
use std::time::Duration;

/// The three things done to a watchdog device once it is open.
pub trait Device {
    /// Restarts the countdown (`WDIOC_KEEPALIVE`).
    fn keepalive(&mut self) -> io::Result<()>;
    /// Writes `bytes` to the device. Any write restarts the countdown; a
    /// `V` among the bytes allows the next close to disarm it.
    fn write_bytes(&mut self, bytes: &[u8]) -> io::Result<()>;
    /// Closes the device and nothing else: on its own this does not disarm
    /// a driver that supports the magic close; [`close_cleanly`] writes the
    /// `V` first.
    fn close(self);
}

/// Feeds `device`: `WDIOC_KEEPALIVE`, or, for a driver without that ioctl,
/// a write of one byte (NUL, never the magic `V`).
pub fn feed<D: Device>(device: &mut D) -> io::Result<()> {
    match device.keepalive() {
        Err(err) if unsupported(&err) => device.write_bytes(b"\0"),
        other => other,
    }
}

/// Whether an ioctl failed because the driver does not have it.
fn unsupported(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::ENOTTY | libc::EOPNOTSUPP | libc::EINVAL)
    )
}

/// The magic close: writes `V`, then closes, so that the kernel disarms the
/// watchdog. A driver loaded with `nowayout` ignores it and keeps counting
/// down: the machine is then reset one timeout after this call (the write
/// itself was a last feed). The device is closed even if the write fails.
pub fn close_cleanly<D: Device>(mut device: D) -> io::Result<()> {
    let written = device.write_bytes(b"V");
    device.close();
    written
}

/// A device and the rule: fed only while a feed cannot outlive the fencing
/// deadline. The agent calls [`Feeder::offer`] with the current deadline
/// after every confirmed renewal and at [`Feeder::next_feed_at`]; it passes
/// `None` while it has no valid lease, and closes cleanly once it stops
/// leading and PostgreSQL is no longer writable.
#[derive(Debug)]
pub struct Feeder<D: Device> {
    device: D,
    horizon: Duration,
    fed_until: Option<Duration>,
}

impl<D: Device> Feeder<D> {
    /// `horizon`: how long one feed keeps the machine alive, the device's
    /// effective timeout plus any safety margin ([`crate::Watchdog::horizon`]).
    pub fn new(device: D, horizon: Duration) -> Feeder<D> {
        Feeder {
            device,
            horizon,
            fed_until: None,
        }
    }

    pub fn horizon(&self) -> Duration {
        self.horizon
    }

    /// Feeds the device if the rule allows it at `now`: `deadline` is the
    /// fencing deadline of the lease (`None`: no valid lease, never fed).
    /// Returns whether it fed; an error is the device's, and leaves the
    /// machine to be reset when the previous feed runs out.
    pub fn offer(&mut self, now: Duration, deadline: Option<Duration>) -> io::Result<bool> {
        if !deadline.is_some_and(|deadline| schedule::may_feed(now, deadline, self.horizon)) {
            return Ok(false);
        }
        feed(&mut self.device)?;
        self.fed_until = Some(now.saturating_add(self.horizon));
        Ok(true)
    }

    /// When the machine will be reset unless fed again: the last successful
    /// feed through this feeder + the horizon (`None` before the first one;
    /// opening the device already started a countdown of one timeout).
    ///
    /// Never later than the fencing deadline, and exactly the deadline when
    /// the last allowed feed was made. A leader that is alive but cannot
    /// renew (etcd unreachable) must therefore have PostgreSQL stopped and
    /// the device closed cleanly *before* this moment, that is before its
    /// fencing deadline, or its host is reset; one that cannot (frozen,
    /// starved) is reset, which is the point.
    pub fn fed_until(&self) -> Option<Duration> {
        self.fed_until
    }

    /// When to call [`Feeder::offer`] next ([`schedule::next_feed_at`]);
    /// `None` when no feed is allowed any more for this deadline.
    pub fn next_feed_at(
        &self,
        now: Duration,
        deadline: Option<Duration>,
        period: Duration,
    ) -> Option<Duration> {
        schedule::next_feed_at(now, deadline?, self.horizon, period)
    }

    pub fn device(&self) -> &D {
        &self.device
    }

    /// Disarms the watchdog ([`close_cleanly`]).
    pub fn close_cleanly(self) -> io::Result<()> {
        close_cleanly(self.device)
    }

    /// The device, still armed.
    pub fn into_device(self) -> D {
        self.device
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::rc::Rc;

    /// What happened to the fake device.
    #[derive(Debug, Default)]
    struct Log {
        keepalives: usize,
        written: Vec<u8>,
        closed: bool,
    }

    #[derive(Debug)]
    struct Fake {
        log: Rc<RefCell<Log>>,
        keepalive_ioctl: bool,
        broken: bool,
    }

    impl Fake {
        fn new() -> (Fake, Rc<RefCell<Log>>) {
            let log = Rc::new(RefCell::new(Log::default()));
            let fake = Fake {
                log: log.clone(),
                keepalive_ioctl: true,
                broken: false,
            };
            (fake, log)
        }
    }

    impl Device for Fake {
        fn keepalive(&mut self) -> io::Result<()> {
            if self.broken {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            if !self.keepalive_ioctl {
                return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
            }
            self.log.borrow_mut().keepalives += 1;
            Ok(())
        }
        fn write_bytes(&mut self, bytes: &[u8]) -> io::Result<()> {
            if self.broken {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            self.log.borrow_mut().written.extend_from_slice(bytes);
            Ok(())
        }
        fn close(self) {
            self.log.borrow_mut().closed = true;
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// What happened in one [`run`].
    struct Run {
        feeds: Vec<Duration>,
        /// The deadline of the last confirmed renewal.
        deadline: Duration,
        /// When the machine resets (the last feed + the timeout).
        reset_at: Duration,
        /// The machine reset while renewals were still being confirmed.
        early_reset: Option<Duration>,
    }

    /// A leader with the default profile (ttl 4 s, fencing margin 1 s,
    /// renewals every 1 s, dcs_timeout 1 s: a 2 s watchdog), renewals sent
    /// every second before `renewals_stop` and confirmed `rtt` later, the
    /// key lost at `lost_key_at` (its deadline moved to that moment), the
    /// agent offering a feed at every confirmation and at `next_feed_at`
    /// with a period of half a renewal; steps of 10 ms, until the machine
    /// resets or 15 s pass.
    fn run(rtt: Duration, renewals_stop: Duration, lost_key_at: Option<Duration>) -> Run {
        let (ttl, margin, renew) = (ms(4000), ms(1000), ms(1000));
        let timeout = ms(2000);
        let period = renew / 2;
        let (fake, log) = Fake::new();
        let mut feeder = Feeder::new(fake, timeout);
        // Opening the device started a countdown of one timeout.
        let mut reset_at = timeout;
        let mut feeds = Vec::new();
        let mut deadline: Option<Duration> = None;
        let mut last_deadline = Duration::ZERO;
        let mut wake: Option<Duration> = None;
        let mut next_sent = Duration::ZERO;
        let mut early_reset = None;
        let mut now = Duration::ZERO;
        while now <= ms(15_000) {
            if now >= reset_at {
                break;
            }
            let mut confirmed = false;
            // A renewal sent every `renew` from 0 is confirmed `rtt` later.
            if now == next_sent + rtt && next_sent < renewals_stop {
                deadline = Some(next_sent + ttl - margin);
                next_sent += renew;
                confirmed = true;
            }
            if let Some(lost) = lost_key_at
                && now >= lost
            {
                // The leader key is no longer this node's: deadline now.
                deadline = deadline.map(|d| d.min(lost));
            }
            if let Some(d) = deadline {
                last_deadline = d;
            }
            if confirmed || wake.is_some_and(|w| now >= w) {
                if feeder.offer(now, deadline).unwrap() {
                    feeds.push(now);
                    reset_at = feeder.fed_until().unwrap();
                    // The rule held: this feed ends by the deadline.
                    assert!(
                        reset_at <= deadline.unwrap(),
                        "fed past the deadline at {now:?}"
                    );
                }
                wake = feeder.next_feed_at(now, deadline, period);
            }
            now += ms(10);
            if now < renewals_stop && now >= reset_at && early_reset.is_none() {
                early_reset = Some(now);
            }
        }
        assert_eq!(log.borrow().keepalives, feeds.len());
        Run {
            feeds,
            deadline: last_deadline,
            reset_at,
            early_reset,
        }
    }

    #[test]
    fn a_healthy_leader_is_never_reset() {
        for rtt in [ms(0), ms(10), ms(300), ms(990)] {
            let run = run(rtt, ms(60_000), None);
            assert_eq!(run.early_reset, None, "rtt {rtt:?}");
            assert!(
                run.reset_at > ms(15_000),
                "rtt {rtt:?}: reset at {:?}",
                run.reset_at
            );
        }
    }

    #[test]
    fn feeding_stops_in_time_when_renewals_stop() {
        for rtt in [ms(0), ms(300), ms(990)] {
            // The last renewal confirmed was sent at 5 s: deadline 8 s.
            let run = run(rtt, ms(5001), None);
            assert_eq!(run.early_reset, None);
            assert_eq!(run.deadline, ms(8000), "rtt {rtt:?}");
            let last = *run.feeds.last().unwrap();
            // Fed up to the last allowed moment, deadline - timeout, and not after.
            assert_eq!(last, ms(6000), "rtt {rtt:?}: {:?}", run.feeds);
            // So the host is reset at the deadline, not before and not later.
            assert_eq!(run.reset_at, run.deadline);
        }
    }

    #[test]
    fn a_deadline_moved_earlier_stops_feeding_at_once() {
        // Renewals keep coming, but at 5.5 s the leader learns the key is
        // no longer its own and moves its deadline to that moment.
        let run = run(ms(100), ms(60_000), Some(ms(5500)));
        assert!(run.feeds.iter().all(|&t| t < ms(5500)), "{:?}", run.feeds);
        assert_eq!(run.deadline, ms(5500));
        // The last feed before it was itself within the rule for the old
        // deadline; from the moment the deadline moved nothing was fed.
        let (fake, log) = Fake::new();
        let mut feeder = Feeder::new(fake, ms(2000));
        assert!(feeder.offer(ms(1000), Some(ms(4000))).unwrap());
        assert!(!feeder.offer(ms(1500), Some(ms(1500))).unwrap());
        assert_eq!(feeder.next_feed_at(ms(1500), Some(ms(1500)), ms(500)), None);
        assert!(!feeder.offer(ms(1600), None).unwrap(), "no lease, no feed");
        assert_eq!(feeder.next_feed_at(ms(1600), None, ms(500)), None);
        assert_eq!(log.borrow().keepalives, 1);
        assert_eq!(feeder.fed_until(), Some(ms(3000)));
    }

    #[test]
    fn a_clean_close_writes_v_then_closes() {
        let (fake, log) = Fake::new();
        let mut feeder = Feeder::new(fake, ms(2000));
        assert!(feeder.offer(ms(0), Some(ms(3000))).unwrap());
        feeder.close_cleanly().unwrap();
        let log = log.borrow();
        assert_eq!(log.written, b"V");
        assert!(log.closed);
        assert_eq!(log.keepalives, 1);
    }

    #[test]
    fn a_close_is_done_even_if_the_magic_character_cannot_be_written() {
        let (mut fake, log) = Fake::new();
        fake.broken = true;
        assert!(close_cleanly(fake).is_err());
        assert!(log.borrow().closed);
    }

    #[test]
    fn dropping_the_feeder_neither_writes_nor_closes() {
        let (fake, log) = Fake::new();
        let feeder = Feeder::new(fake, ms(2000));
        let device = feeder.into_device();
        drop(device);
        let log = log.borrow();
        assert!(log.written.is_empty());
        assert!(!log.closed);
    }

    #[test]
    fn a_driver_without_the_keepalive_ioctl_is_fed_by_a_write() {
        let (mut fake, log) = Fake::new();
        fake.keepalive_ioctl = false;
        let mut feeder = Feeder::new(fake, ms(2000));
        assert!(feeder.offer(ms(0), Some(ms(3000))).unwrap());
        assert_eq!(log.borrow().written, b"\0", "one byte, never 'V'");
        assert_eq!(log.borrow().keepalives, 0);
    }

    #[test]
    fn a_failed_feed_is_reported_and_not_counted() {
        let (mut fake, _log) = Fake::new();
        fake.broken = true;
        let mut feeder = Feeder::new(fake, ms(2000));
        assert!(feeder.offer(ms(0), Some(ms(3000))).is_err());
        assert_eq!(feeder.fed_until(), None);
    }
}
