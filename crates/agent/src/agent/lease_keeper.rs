//! The lease keeper task: renews the node's lease, checks the leader key,
//! and hands every new fencing deadline to the postmaster's guard.

use super::*;

/// Renews the node's lease and tells the others when leadership may lapse.
pub(super) struct LeaseKeeper<D> {
    pub(super) dcs: Arc<D>,
    pub(super) name: String,
    pub(super) timing: mainstay_core::Timing,
    pub(super) tx: watch::Sender<Lease>,
    pub(super) fencer: mainstay_pg::Fencer,
    pub(super) wake: Arc<Notify>,
    pub(super) latency_us: Arc<std::sync::atomic::AtomicU64>,
    /// No keep-alive while set: the lease runs out as if the host died.
    pub(super) paused: Arc<AtomicBool>,
    pub(super) failsafe: Failsafe,
    /// The lease the image this agent re-executed from held.
    pub(super) resume: Option<Lease>,
}

pub(super) async fn keep_lease<D: Dcs>(keeper: LeaseKeeper<D>) {
    let LeaseKeeper {
        dcs,
        name,
        timing,
        tx,
        fencer,
        wake,
        latency_us,
        paused,
        failsafe,
        resume,
    } = keeper;
    let mut clock = match resume {
        Some(lease) => LeaseClock::resumed(timing.lease(), lease, boot_clock::now()),
        None => LeaseClock::new(timing.lease(), boot_clock::now()),
    };
    // The members whose confirmation the current failsafe deadline rests on.
    let mut confirmed_by = std::collections::BTreeSet::new();
    // The guard hears of every deadline before anyone acts on it.
    let publish = |clock: &LeaseClock| {
        let lease = clock.lease();
        fencer.set_deadline(boot_clock::boot_time(lease.valid_until));
        tx.send_replace(lease);
    };
    if resume.is_some() {
        publish(&clock);
    }
    let ttl_secs = timing.lease_ttl_secs();
    let mut ticker = tokio::time::interval(timing.renew_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        if paused.load(Ordering::SeqCst) {
            continue;
        }
        // The leader rewrote the failsafe list with a member it never asked:
        // the old list's promise no longer covers everyone who may lead.
        if clock.lease().members_confirmed
            && failsafe
                .current(clock.lease().id)
                .is_some_and(|now| !now.is_subset(&confirmed_by))
        {
            warn!("failsafe: the list of members changed since they confirmed this leader");
            clock.members_changed();
            publish(&clock);
        }
        let sent = boot_clock::now();
        let round_trip = Instant::now();
        let previous = clock.lease().id;
        let outcome = match previous {
            None => match tokio::time::timeout(timing.dcs_timeout, dcs.grant_lease(ttl_secs)).await
            {
                Ok(Ok(id)) => Renewal::Confirmed(id),
                Ok(Err(err)) => {
                    warn!("lease grant failed: {err}");
                    Renewal::NoAnswer
                }
                Err(_) => {
                    warn!(
                        "lease grant failed: no answer within {:?}",
                        timing.dcs_timeout
                    );
                    Renewal::NoAnswer
                }
            },
            Some(id) => match tokio::time::timeout(timing.dcs_timeout, dcs.keep_alive(id)).await {
                Ok(Ok(ttl)) if ttl > 0 => Renewal::Confirmed(id),
                Ok(Ok(_)) => Renewal::Expired,
                Ok(Err(err)) => {
                    warn!("lease renewal failed: {err}");
                    Renewal::NoAnswer
                }
                Err(_) => {
                    warn!(
                        "lease renewal failed: no answer within {:?}",
                        timing.dcs_timeout
                    );
                    Renewal::NoAnswer
                }
            },
        };
        let writable = fencer.writable();
        let key = match outcome {
            Renewal::Confirmed(id) => {
                let micros = round_trip.elapsed().as_micros().clamp(1, u64::MAX as u128) as u64;
                latency_us.store(micros, Ordering::Relaxed);
                if previous != Some(id) {
                    info!(lease = id, "lease granted");
                }
                if writable {
                    Some(check_leader_key(&*dcs, &name, id, &clock, timing.dcs_timeout).await)
                } else {
                    None
                }
            }
            _ => None,
        };
        let next = clock.on_renewal(sent, boot_clock::now(), outcome, key, writable);
        if let Some(why) = next.fenced {
            warn!("{why}: fencing");
        }
        if outcome == Renewal::Expired && !next.grant_for_take_back {
            warn!("the lease expired in etcd: requesting a new one");
        }
        if next.grant_for_take_back {
            warn!(
                "the lease expired in etcd while the members confirmed this primary \
                 (failsafe): requesting a new one to take the leader key back"
            );
            let granted = tokio::time::timeout(timing.dcs_timeout, dcs.grant_lease(ttl_secs))
                .await
                .ok()
                .and_then(Result::ok);
            clock.failsafe_lease_granted(granted);
        }
        publish(&clock);
        if next.wake_loop {
            wake.notify_one();
        }
        if next.ask_members {
            let asked = boot_clock::now();
            if let Some(by) = failsafe
                .confirmed(&name, clock.lease().id, timing.dcs_timeout)
                .await
            {
                debug!("failsafe: every member confirmed this leader");
                clock.members_confirmed(asked);
                confirmed_by = by;
                publish(&clock);
            }
        }
    }
}

/// Whether the leader key is still this node's (and, when only a failsafe
/// promise could use the answer, whether nobody holds it).
pub(super) async fn check_leader_key<D: Dcs>(
    dcs: &D,
    name: &str,
    lease: i64,
    clock: &LeaseClock,
    timeout: Duration,
) -> KeyCheck {
    match tokio::time::timeout(timeout, dcs.leader_held_by(name, lease)).await {
        Ok(Ok(true)) => KeyCheck::Ours,
        Ok(Ok(false)) => KeyCheck::NotOurs {
            absent: clock.wants_absence_check() && leader_key_absent(dcs, timeout).await,
        },
        _ => KeyCheck::Unknown,
    }
}

/// Whether etcd answers that nobody holds the leader key.
pub(super) async fn leader_key_absent<D: Dcs>(dcs: &D, timeout: Duration) -> bool {
    matches!(
        tokio::time::timeout(timeout, dcs.read_cluster()).await,
        Ok(Ok(view)) if view.leader.is_none()
    )
}
