//! The agent's side of the kernel watchdog (`[watchdog]`): probed once at
//! start-up, opened when this node may write, fed while its lease holds,
//! closed cleanly (magic close) when it no longer may.
//!
//! Division of labour with the fencing guard: the guard stops PostgreSQL at
//! the fencing deadline when the agent is frozen; the watchdog resets the
//! host when everything is frozen, guard included. Feeds are offered against
//! the lease's expiry in etcd (`deadline + fencing_margin`, the instant
//! another node may lead), never later: a host that stops feeding is reset
//! by then. Once the fencing deadline passes the guard has stopped
//! PostgreSQL, so the device is closed cleanly right away: a live agent that
//! lost etcd must not reset its host, a frozen one cannot close it.

use crate::boot_clock;
use crate::config::{WatchdogConfig, WatchdogMode};
use mainstay_core::lease::Lease;
use mainstay_watchdog::{Feeder, Watchdog};
use std::time::Duration;
use tokio::sync::watch;
use tracing::{error, info, warn};

/// What the start-up probe found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Availability {
    /// `watchdog.mode = "off"`.
    Off,
    /// The device opened and took its timeout (and was closed cleanly).
    Ready,
    /// It could not be used; `required` means the node must never lead.
    Unavailable { reason: String, required: bool },
}

impl Availability {
    /// Opens the device once and closes it cleanly, so that a missing or
    /// unusable one is known before this node could lead.
    pub fn probe(config: &WatchdogConfig) -> Availability {
        if config.mode == WatchdogMode::Off {
            return Availability::Off;
        }
        match Watchdog::probe(&config.settings()) {
            Ok(probe) => {
                info!(device = %config.device.display(), "watchdog ready: {probe}");
                Availability::Ready
            }
            Err(err) => {
                let required = config.mode == WatchdogMode::Required;
                if required {
                    error!(
                        "watchdog.mode = \"required\": {err}; this node never takes the leader key"
                    );
                } else {
                    warn!("watchdog.mode = \"automatic\": {err}; running without a watchdog");
                }
                Availability::Unavailable {
                    reason: err.to_string(),
                    required,
                }
            }
        }
    }

    /// Why this node must never lead, if it must not.
    pub fn blocks_leadership(&self) -> Option<&str> {
        match self {
            Availability::Unavailable {
                reason,
                required: true,
            } => Some(reason),
            _ => None,
        }
    }
}

/// Runs while the agent runs: feeds the device while `writable()` and the
/// lease's fencing deadline has not passed, closes it cleanly otherwise.
pub async fn keep(
    config: WatchdogConfig,
    mut lease: watch::Receiver<Lease>,
    writable: impl Fn() -> bool,
    fencing_margin: Duration,
) {
    // Several chances per device timeout to feed between renewals.
    let tick = (config.timeout / 4).clamp(Duration::from_millis(100), Duration::from_millis(500));
    let mut feeder: Option<Feeder<Watchdog>> = None;
    loop {
        let current = *lease.borrow_and_update();
        let now = boot_clock::now();
        let may_write = writable() && current.id.is_some() && now < current.valid_until;
        if may_write {
            let expiry = Duration::from_millis(current.valid_until.plus(millis(fencing_margin)).0);
            let now = Duration::from_millis(now.0);
            if feeder.is_none() && mainstay_watchdog::may_feed(now, expiry, config.timeout) {
                match Watchdog::open(&config.settings()) {
                    Ok(device) => {
                        info!(device = %config.device.display(), "watchdog armed: this node may write");
                        feeder = Some(device.into_feeder());
                    }
                    Err(err) => error!("cannot arm the watchdog: {err}"),
                }
            }
            if let Some(f) = feeder.as_mut()
                && let Err(err) = f.offer(now, Some(expiry))
            {
                error!("feeding the watchdog failed: {err}");
            }
        } else if let Some(f) = feeder.take() {
            match f.close_cleanly() {
                Ok(()) => info!("watchdog disarmed (magic close): this node may no longer write"),
                Err(err) => {
                    error!("closing the watchdog cleanly failed (the host may reset): {err}")
                }
            }
        }
        tokio::select! {
            changed = lease.changed() => if changed.is_err() { break },
            _ = tokio::time::sleep(tick) => {}
        }
    }
    if let Some(f) = feeder {
        // The agent is stopping cleanly: PostgreSQL was stopped first.
        let _ = f.close_cleanly();
    }
}

fn millis(d: Duration) -> u64 {
    d.as_millis().min(u64::MAX as u128) as u64
}
