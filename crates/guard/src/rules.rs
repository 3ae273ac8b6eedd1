//! What the guard does, as a pure function of what happened: no clock reads,
//! no system calls, so that every rule has a unit test.
//!
//! The rules, in full:
//! 1. Armed with a deadline, the guard fences when the deadline is reached.
//!    The latest `arm` wins, earlier or later: only the agent knows whether
//!    leadership was lost (earlier) or renewed (later).
//! 2. When the agent's end of the socket closes (agent dead), it fences at
//!    once, armed or not: nobody is left to keep the server's role in line.
//! 3. Fencing kills every PostgreSQL process at once (`Effect::Fence`): the
//!    postmaster is stopped (SIGSTOP) so that it can neither fork nor reap,
//!    each of its children gets SIGKILL straight from the guard, then the
//!    postmaster does. Relaying through the postmaster's own immediate
//!    shutdown would leave its backends running until the postmaster is
//!    scheduled: a backend thawed first after a host suspend acknowledged
//!    commits for up to 15 ms that way. PostgreSQL recovers from this as
//!    from any crash. Whatever the postmaster leaves behind is the guard's
//!    (it is their subreaper) and is killed when it exits. A fence is never
//!    undone, whatever arrives afterwards.
//! 4. A deadline that has already passed when the guard starts means the
//!    postmaster is never started (`refuses_start`).

use crate::clock::BootTime;
use crate::protocol::{FromGuard, ToGuard};

/// Something the guard must do now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// A signal to the postmaster.
    Signal(i32),
    /// Stop every PostgreSQL process now (rule 3).
    Fence,
    /// A line for the agent (and the log).
    Report(FromGuard),
}

#[derive(Clone, Debug)]
pub struct Rules {
    deadline: Option<BootTime>,
    fenced: bool,
}

impl Rules {
    pub fn new(deadline: Option<BootTime>) -> Rules {
        Rules {
            deadline,
            fenced: false,
        }
    }

    /// Why the postmaster must not be started at `now`, if it must not.
    pub fn refuses_start(&self, now: BootTime) -> Option<String> {
        self.deadline
            .filter(|d| now >= *d)
            .map(|d| format!("write permission expired {:?} ago", now.since(d)))
    }

    pub fn is_fenced(&self) -> bool {
        self.fenced
    }

    pub fn on_message(&mut self, msg: ToGuard, now: BootTime) -> Vec<Effect> {
        match msg {
            ToGuard::Arm(deadline) => {
                self.deadline = Some(deadline);
                self.on_time(now)
            }
            ToGuard::Disarm => {
                self.deadline = None;
                Vec::new()
            }
            ToGuard::Signal(n) => vec![Effect::Signal(n)],
            ToGuard::Fence => self.fence("the agent asked for it".into()),
        }
    }

    pub fn on_agent_gone(&mut self) -> Vec<Effect> {
        self.fence("the agent's channel closed (agent dead)".into())
    }

    /// Call on every wake-up (and after every message): fences at the
    /// deadline.
    pub fn on_time(&mut self, now: BootTime) -> Vec<Effect> {
        match self.deadline {
            Some(deadline) if now >= deadline => {
                let late = now.since(deadline);
                self.fence(format!(
                    "write permission expired (deadline passed {late:?} ago) without an extension"
                ))
            }
            _ => Vec::new(),
        }
    }

    /// When `on_time` must run next, if ever.
    pub fn next_wake(&self) -> Option<BootTime> {
        if self.fenced { None } else { self.deadline }
    }

    fn fence(&mut self, why: String) -> Vec<Effect> {
        if self.fenced {
            return Vec::new();
        }
        self.fenced = true;
        vec![Effect::Fence, Effect::Report(FromGuard::Fenced(why))]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64) -> BootTime {
        BootTime(ms * 1_000_000)
    }

    fn fenced(effects: &[Effect]) -> bool {
        effects.first() == Some(&Effect::Fence)
            && matches!(effects.get(1), Some(Effect::Report(FromGuard::Fenced(_))))
    }

    #[test]
    fn fences_exactly_at_the_deadline_not_a_nanosecond_before() {
        let mut rules = Rules::new(Some(at(1000)));
        assert_eq!(rules.next_wake(), Some(at(1000)));
        assert!(rules.on_time(BootTime(at(1000).0 - 1)).is_empty());
        assert!(fenced(&rules.on_time(at(1000))));
        assert!(rules.is_fenced());
    }

    #[test]
    fn the_latest_arm_wins_earlier_or_later() {
        let mut rules = Rules::new(Some(at(1000)));
        assert!(rules.on_message(ToGuard::Arm(at(5000)), at(900)).is_empty());
        assert!(rules.on_time(at(4999)).is_empty());
        // Leadership lost: the agent moves the deadline to now.
        assert!(fenced(&rules.on_message(ToGuard::Arm(at(3000)), at(3000))));
    }

    #[test]
    fn an_extension_that_arrives_after_the_deadline_is_too_late() {
        let mut rules = Rules::new(Some(at(1000)));
        assert!(fenced(&rules.on_time(at(1200))));
        assert!(
            rules
                .on_message(ToGuard::Arm(at(9000)), at(1201))
                .is_empty()
        );
        assert!(rules.is_fenced(), "an extension must not undo a fence");
        assert_eq!(rules.on_message(ToGuard::Disarm, at(1202)), vec![]);
        assert!(rules.is_fenced(), "disarming must not undo a fence");
    }

    #[test]
    fn disarmed_means_no_deadline_until_armed_again() {
        let mut rules = Rules::new(None);
        assert_eq!(rules.next_wake(), None);
        assert!(rules.on_time(at(1_000_000)).is_empty());
        assert!(
            rules
                .on_message(ToGuard::Arm(at(2_000_000)), at(1_000_000))
                .is_empty()
        );
        assert!(rules.on_message(ToGuard::Disarm, at(1_500_000)).is_empty());
        assert!(rules.on_time(at(3_000_000)).is_empty());
    }

    #[test]
    fn a_closed_channel_fences_even_a_replica() {
        let mut rules = Rules::new(None);
        assert!(fenced(&rules.on_agent_gone()));
    }

    #[test]
    fn a_fence_happens_once() {
        let mut rules = Rules::new(Some(at(1000)));
        assert!(fenced(&rules.on_time(at(1000))));
        assert_eq!(rules.next_wake(), None);
        assert!(rules.on_time(at(9000)).is_empty());
        // A second reason to fence changes nothing.
        assert!(rules.on_agent_gone().is_empty());
        assert!(rules.on_message(ToGuard::Fence, at(9002)).is_empty());
    }

    #[test]
    fn a_suspended_host_fences_on_its_first_wake_up() {
        // Armed until 1 s; the host sleeps from 0.5 s to 60 s. The timer on
        // CLOCK_BOOTTIME fires on resume with `now` far past the deadline.
        let mut rules = Rules::new(Some(at(1000)));
        assert!(rules.on_time(at(500)).is_empty());
        let effects = rules.on_time(at(60_000));
        assert!(fenced(&effects));
    }

    #[test]
    fn refuses_to_start_past_the_deadline_only() {
        assert!(Rules::new(Some(at(1000))).refuses_start(at(999)).is_none());
        assert!(Rules::new(Some(at(1000))).refuses_start(at(1000)).is_some());
        assert!(Rules::new(None).refuses_start(at(1_000_000)).is_none());
    }

    #[test]
    fn signals_are_passed_on() {
        let mut rules = Rules::new(None);
        assert_eq!(
            rules.on_message(ToGuard::Signal(2), at(0)),
            vec![Effect::Signal(2)]
        );
        assert!(fenced(&rules.on_message(ToGuard::Fence, at(0))));
    }
}
