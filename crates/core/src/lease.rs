//! The lease rules: how renewal outcomes, leader-key checks and failsafe
//! confirmations become the deadline past which this node's PostgreSQL must
//! not accept a write. Pure: the agent's lease keeper does the talking to
//! etcd and to the members and feeds the results in; the simulator feeds the
//! same type, so the rules it checks are the ones that run.
//!
//! The one formula: a renewal sent at `sent` and confirmed by etcd keeps the
//! lease alive at least until `sent + ttl` (etcd counts from when it received
//! the renewal, which is later), so the node may write until
//! `sent + ttl - fencing_margin`. Times are `Millis` on a clock that keeps
//! counting while the host is suspended (the agent uses `CLOCK_BOOTTIME`).

use crate::types::Millis;

/// What the HA loop and the fencing guard are told about the lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lease {
    pub id: Option<i64>,
    /// The moment (send time of the last successful keep-alive + ttl - fencing
    /// margin) before which etcd cannot have expired the lease.
    pub valid_until: Millis,
    /// Failsafe mode: `valid_until` rests on every member's confirmation
    /// (each promised not to take over until then), not on etcd.
    pub members_confirmed: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseTiming {
    pub ttl_ms: u64,
    pub fencing_margin_ms: u64,
}

impl LeaseTiming {
    /// The deadline a confirmation of something sent at `sent` gives.
    pub fn deadline_after(&self, sent: Millis) -> Millis {
        sent.plus(self.ttl_ms.saturating_sub(self.fencing_margin_ms))
    }
}

/// What a keep-alive (or a lease grant) came back with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Renewal {
    /// etcd confirmed lease `id` (granted or kept alive).
    Confirmed(i64),
    /// etcd answered that the lease no longer exists.
    Expired,
    /// No answer, or an error: nothing is known.
    NoAnswer,
}

/// Whether the leader key is still this node's, asked right after a
/// confirmed renewal while PostgreSQL may be writable (a keep-alive cannot
/// be part of a transaction).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyCheck {
    Ours,
    /// Not ours; `absent` if etcd also said nobody holds it.
    NotOurs {
        absent: bool,
    },
    Unknown,
}

/// What the keeper must do after a renewal round.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Next {
    /// Something the HA loop must act on changed (new lease, fence, key to
    /// take back): wake it now.
    pub wake_loop: bool,
    /// Failsafe: the lease expired in etcd while the members confirmed this
    /// primary; grant a new lease (`failsafe_lease_granted`) so that the HA
    /// loop can take the key back before the confirmed deadline.
    pub grant_for_take_back: bool,
    /// Ask every member on the failsafe list to confirm this primary
    /// (`members_confirmed` if all did); only when PostgreSQL may be
    /// writable and the deadline was not extended by etcd.
    pub ask_members: bool,
    /// Why the deadline was cut to now, if it was.
    pub fenced: Option<&'static str>,
}

/// The lease as the keeper tracks it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseClock {
    timing: LeaseTiming,
    lease: Lease,
    /// The deadline the last renewal etcd confirmed gave (this node's key
    /// still its own), never one resting on members' confirmations.
    etcd_valid_until: Millis,
}

impl LeaseClock {
    /// No lease yet: nothing may be written.
    pub fn new(timing: LeaseTiming, now: Millis) -> LeaseClock {
        LeaseClock {
            timing,
            lease: Lease {
                id: None,
                valid_until: now,
                members_confirmed: false,
            },
            etcd_valid_until: now,
        }
    }

    /// The lease the agent this one re-executed from held. It stays the
    /// deadline until the next renewal moves it. `etcd_valid_until` is what
    /// etcd itself last confirmed: the caller passes "now" when the deadline
    /// rested on the members' confirmations (failsafe), so that a change
    /// of the member list cuts it back at once, as before the exec.
    pub fn resumed(timing: LeaseTiming, lease: Lease, etcd_valid_until: Millis) -> LeaseClock {
        LeaseClock {
            timing,
            lease,
            etcd_valid_until: if lease.members_confirmed {
                etcd_valid_until.min(lease.valid_until)
            } else {
                lease.valid_until
            },
        }
    }

    pub fn lease(&self) -> Lease {
        self.lease
    }

    pub fn timing(&self) -> LeaseTiming {
        self.timing
    }

    /// Whether the keeper, having heard the key is not ours, must also ask
    /// whether it is absent: only a failsafe promise could use that answer.
    pub fn wants_absence_check(&self) -> bool {
        self.lease.members_confirmed
    }

    /// One renewal round: sent at `sent`, answered with `outcome`, checked
    /// at `now` (`key` only when `writable` and the renewal was confirmed).
    pub fn on_renewal(
        &mut self,
        sent: Millis,
        now: Millis,
        outcome: Renewal,
        key: Option<KeyCheck>,
        writable: bool,
    ) -> Next {
        let previous = self.lease;
        let mut next = Next::default();
        match outcome {
            Renewal::Confirmed(id) => {
                next.wake_loop = previous.id != Some(id);
                self.lease = Lease {
                    id: Some(id),
                    valid_until: self.timing.deadline_after(sent),
                    members_confirmed: false,
                };
                if !writable || key == Some(KeyCheck::Ours) {
                    self.etcd_valid_until = self.lease.valid_until;
                }
                if writable {
                    match key.unwrap_or(KeyCheck::Unknown) {
                        KeyCheck::Ours => {}
                        KeyCheck::NotOurs { absent: true } if previous.members_confirmed => {
                            // etcd expired the key while every member
                            // confirmed this primary: the HA loop takes it
                            // back before the confirmed deadline, which is
                            // not extended meanwhile.
                            self.lease.valid_until = previous.valid_until;
                            self.lease.members_confirmed = true;
                            next.wake_loop = true;
                        }
                        KeyCheck::NotOurs { .. } => {
                            self.lease.valid_until = now;
                            next.wake_loop = true;
                            next.fenced = Some("the leader key is no longer this node's");
                        }
                        KeyCheck::Unknown => {
                            // Renewed, but whether the key is still ours is
                            // unknown: no extension, and the members are
                            // asked as after a failed renewal (the deadline
                            // could pass before the next round asks them).
                            self.lease.valid_until = previous.valid_until;
                            self.lease.members_confirmed = previous.members_confirmed;
                            next.ask_members = true;
                        }
                    }
                }
            }
            Renewal::Expired
                if previous.members_confirmed && writable && now < previous.valid_until =>
            {
                // Failsafe: the lease ran out while etcd was unreachable,
                // but every member confirmed this primary until
                // `valid_until`; a new lease lets the HA loop take the key
                // back within that deadline instead of stopping.
                next.grant_for_take_back = true;
                next.wake_loop = true;
                next.ask_members = true;
            }
            Renewal::Expired => {
                self.lease = Lease {
                    id: None,
                    valid_until: now,
                    members_confirmed: false,
                };
                next.wake_loop = true;
                if writable {
                    next.fenced = Some("the lease expired in etcd");
                }
            }
            Renewal::NoAnswer => next.ask_members = writable,
        }
        next.ask_members &= writable;
        next
    }

    /// The new lease asked for by `grant_for_take_back` (`None`: refused);
    /// the confirmed deadline stays as it was.
    pub fn failsafe_lease_granted(&mut self, granted: Option<i64>) {
        self.lease.id = granted;
        self.lease.members_confirmed = true;
    }

    /// Every member confirmed this primary when asked at `asked`: the
    /// deadline moves as a renewal sent then would have moved it.
    pub fn members_confirmed(&mut self, asked: Millis) {
        let confirmed = self.timing.deadline_after(asked);
        self.lease.valid_until = self.lease.valid_until.max(confirmed);
        self.lease.members_confirmed = true;
    }

    /// The members a failsafe promise must come from changed: the list now
    /// names one that was not asked (the leader rewrote it), who never
    /// promised anything and may run for leader. The deadline falls back to
    /// what etcd confirmed until the new list confirms.
    pub fn members_changed(&mut self) {
        if self.lease.members_confirmed {
            self.lease.valid_until = self.lease.valid_until.min(self.etcd_valid_until);
            self.lease.members_confirmed = false;
        }
    }

    /// The keeper learnt the key is not ours in some other way (a crash
    /// drill, a released key): no writes from now on.
    pub fn revoke(&mut self, now: Millis) {
        self.lease.valid_until = self.lease.valid_until.min(now);
        self.lease.members_confirmed = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMING: LeaseTiming = LeaseTiming {
        ttl_ms: 4000,
        fencing_margin_ms: 1000,
    };

    fn clock() -> LeaseClock {
        LeaseClock::new(TIMING, Millis(0))
    }

    /// A primary whose renewal sent at 0 was confirmed with its key: 3 s.
    fn leading() -> LeaseClock {
        let mut c = clock();
        c.on_renewal(
            Millis(0),
            Millis(10),
            Renewal::Confirmed(7),
            Some(KeyCheck::Ours),
            true,
        );
        c
    }

    #[test]
    fn the_deadline_counts_from_the_send_time() {
        let mut c = clock();
        assert_eq!(c.lease().valid_until, Millis(0), "nothing before a lease");
        let next = c.on_renewal(Millis(100), Millis(900), Renewal::Confirmed(7), None, false);
        assert!(next.wake_loop, "a new lease wakes the loop");
        assert_eq!(c.lease().valid_until, Millis(3100));
        assert_eq!(c.lease().id, Some(7));
        let next = c.on_renewal(
            Millis(1100),
            Millis(1200),
            Renewal::Confirmed(7),
            None,
            false,
        );
        assert_eq!(
            next,
            Next::default(),
            "a routine renewal changes nothing else"
        );
        assert_eq!(c.lease().valid_until, Millis(4100));
    }

    #[test]
    fn a_resumed_lease_keeps_its_deadline_until_the_next_renewal_moves_it() {
        let before = leading().lease();
        let mut c = LeaseClock::resumed(TIMING, before, Millis(0));
        assert_eq!(c.lease(), before, "the exec changes nothing");
        c.on_renewal(
            Millis(1000),
            Millis(1010),
            Renewal::Confirmed(7),
            Some(KeyCheck::Ours),
            true,
        );
        assert_eq!(c.lease().valid_until, Millis(4000));
        // Lost in the exec: the key went to another node meanwhile.
        let mut c = LeaseClock::resumed(TIMING, before, Millis(0));
        let next = c.on_renewal(
            Millis(1000),
            Millis(1010),
            Renewal::Confirmed(7),
            Some(KeyCheck::NotOurs { absent: false }),
            true,
        );
        assert!(next.fenced.is_some(), "{next:?}");
        // A deadline the members confirmed carries no etcd confirmation
        // over: a change of the member list cuts it back to what etcd gave.
        let confirmed = Lease {
            members_confirmed: true,
            ..before
        };
        let mut c = LeaseClock::resumed(TIMING, confirmed, Millis(1500));
        assert_eq!(c.lease(), confirmed);
        c.members_changed();
        assert_eq!(c.lease().valid_until, Millis(1500));
        assert!(!c.lease().members_confirmed);
    }

    #[test]
    fn a_writable_node_extends_only_when_the_key_is_still_its_own() {
        let mut c = leading();
        assert_eq!(c.lease().valid_until, Millis(3000));
        let next = c.on_renewal(
            Millis(1000),
            Millis(1010),
            Renewal::Confirmed(7),
            Some(KeyCheck::NotOurs { absent: false }),
            true,
        );
        assert_eq!(c.lease().valid_until, Millis(1010), "fenced at once");
        assert!(next.fenced.is_some() && next.wake_loop);
        // Key state unknown: keep the old deadline and ask the members.
        let mut c = leading();
        let next = c.on_renewal(
            Millis(1000),
            Millis(1010),
            Renewal::Confirmed(7),
            Some(KeyCheck::Unknown),
            true,
        );
        assert_eq!(c.lease().valid_until, Millis(3000));
        assert!(next.ask_members);
    }

    #[test]
    fn a_failed_renewal_keeps_the_deadline_and_asks_the_members_of_a_primary_only() {
        let mut c = leading();
        let next = c.on_renewal(Millis(1000), Millis(2000), Renewal::NoAnswer, None, true);
        assert_eq!(c.lease().valid_until, Millis(3000));
        assert!(next.ask_members);
        let next = c.on_renewal(Millis(1000), Millis(2000), Renewal::NoAnswer, None, false);
        assert!(!next.ask_members, "a replica has no promise to ask for");
    }

    #[test]
    fn member_confirmations_extend_from_the_time_they_were_asked() {
        let mut c = leading();
        c.members_confirmed(Millis(2000));
        assert_eq!(c.lease().valid_until, Millis(5000));
        assert!(c.lease().members_confirmed);
        // An older confirmation never moves the deadline back.
        c.members_confirmed(Millis(500));
        assert_eq!(c.lease().valid_until, Millis(5000));
    }

    #[test]
    fn an_expired_lease_fences_unless_the_members_confirmed_this_primary() {
        let mut c = leading();
        let next = c.on_renewal(Millis(1000), Millis(1100), Renewal::Expired, None, true);
        assert_eq!(
            c.lease(),
            Lease {
                id: None,
                valid_until: Millis(1100),
                members_confirmed: false
            }
        );
        assert!(next.fenced.is_some());

        let mut c = leading();
        c.members_confirmed(Millis(2000));
        let next = c.on_renewal(Millis(4000), Millis(4100), Renewal::Expired, None, true);
        assert!(next.grant_for_take_back && next.wake_loop && next.fenced.is_none());
        c.failsafe_lease_granted(Some(9));
        assert_eq!(
            c.lease(),
            Lease {
                id: Some(9),
                valid_until: Millis(5000),
                members_confirmed: true
            },
            "the new lease, under the deadline the members confirmed"
        );
        // Past the confirmed deadline, an expired lease fences.
        let next = c.on_renewal(Millis(5000), Millis(5000), Renewal::Expired, None, true);
        assert!(next.fenced.is_some());
    }

    #[test]
    fn a_confirmed_primary_takes_the_absent_key_back_under_the_old_deadline() {
        let mut c = leading();
        c.members_confirmed(Millis(2000));
        assert!(c.wants_absence_check());
        let next = c.on_renewal(
            Millis(4000),
            Millis(4010),
            Renewal::Confirmed(9),
            Some(KeyCheck::NotOurs { absent: true }),
            true,
        );
        assert_eq!(
            c.lease().valid_until,
            Millis(5000),
            "not extended by the new lease"
        );
        assert!(c.lease().members_confirmed && next.wake_loop && next.fenced.is_none());
        // Without that promise, an absent key fences.
        let mut c = leading();
        c.on_renewal(
            Millis(1000),
            Millis(1010),
            Renewal::Confirmed(7),
            Some(KeyCheck::NotOurs { absent: true }),
            true,
        );
        assert_eq!(c.lease().valid_until, Millis(1010));
    }

    #[test]
    fn a_new_member_on_the_list_ends_the_promise_of_the_old_list() {
        let mut c = leading();
        c.on_renewal(Millis(1000), Millis(2000), Renewal::NoAnswer, None, true);
        c.members_confirmed(Millis(2000));
        assert_eq!(c.lease().valid_until, Millis(5000));
        c.members_changed();
        assert_eq!(
            c.lease(),
            Lease {
                id: Some(7),
                valid_until: Millis(3000),
                members_confirmed: false
            },
            "back to what etcd confirmed"
        );
        // Without a members' promise nothing changes.
        let before = c.lease();
        c.members_changed();
        assert_eq!(c.lease(), before);
    }

    #[test]
    fn revoking_never_extends() {
        let mut c = clock();
        c.on_renewal(Millis(0), Millis(10), Renewal::Confirmed(7), None, false);
        c.revoke(Millis(500));
        assert_eq!(c.lease().valid_until, Millis(500));
        c.revoke(Millis(2000));
        assert_eq!(c.lease().valid_until, Millis(500));
    }
}
