//! The HA loop's side of re-executing in place (see `crate::reexec`):
//! checking the successor on SIGHUP, handing the postmaster and the lease
//! over, and taking them over in the new image.

use super::*;
use crate::reexec::{Handover, LeaseState, PostmasterState, Program};

/// How the HA loop ended.
pub(super) enum Exit {
    /// SIGTERM/SIGINT: hand the leadership over and stop PostgreSQL.
    Stop,
    /// SIGHUP, successor checked: re-execute with PostgreSQL running.
    Reexec,
}

/// Resolves on the next SIGHUP; never without a re-exec configured.
pub(super) async fn reexec_signal(reexec: &mut Option<(Program, tokio::signal::unix::Signal)>) {
    match reexec {
        Some((_, signal)) => {
            signal.recv().await;
        }
        None => std::future::pending().await,
    }
}

impl<D: Dcs> Agent<D> {
    /// Takes over the postmaster the previous image handed over. False
    /// when there was none or it cannot be taken over: a postmaster then
    /// found running is stopped as one this agent did not start.
    pub(super) fn adopt_postmaster(&mut self) -> bool {
        let Some(pm) = self.handover.as_ref().and_then(|h| h.postmaster.clone()) else {
            return false;
        };
        let following = pm.following.clone();
        match self.pg.adopt(pm.into_pg()) {
            Ok(()) => {
                self.following = following;
                true
            }
            Err(err) => {
                error!("cannot take over the postmaster of the previous agent: {err}");
                false
            }
        }
    }

    /// On SIGHUP: whether to re-execute now. Refused (the agent goes on
    /// with its binary) when the new binary would not take over.
    pub(super) async fn successor_ready(&mut self) -> bool {
        let Some((program, _)) = &self.reexec else {
            return false;
        };
        info!(exe = %program.exe.display(), "SIGHUP: checking the binary to re-execute");
        let program = program.clone();
        let checked = tokio::task::spawn_blocking(move || program.check_successor(false)).await;
        match checked {
            Ok(Ok(())) => {}
            Ok(Err(why)) => {
                error!("re-exec refused, still running this binary: {why}");
                return false;
            }
            Err(err) => {
                error!("re-exec refused, still running this binary: {err}");
                return false;
            }
        }
        if self.lease.borrow().members_confirmed {
            warn!(
                "re-exec postponed: this leader's deadline rests on its members' confirmations \
                 (failsafe mode), which do not carry over; send SIGHUP again once etcd answers"
            );
            return false;
        }
        true
    }

    /// Stops what does not survive an exec, waits for a confirmed renewal
    /// (the new image then has the longest time to renew in turn), and
    /// execs. Returns only if the exec failed, with why.
    pub(super) async fn reexec_now(
        &mut self,
        keeper: &tokio::task::JoinHandle<()>,
        watchdog: Option<&tokio::task::JoinHandle<()>>,
        shutdown: std::pin::Pin<&mut impl Future<Output = ()>>,
    ) -> String {
        let Some((program, _)) = self.reexec.take() else {
            return "no program to re-execute".into();
        };
        // A SIGTERM now is a stop: the steps before the exec give way to it.
        tokio::select! {
            _ = shutdown => "SIGTERM during the re-exec".into(),
            why = self.prepare_and_exec(program, keeper, watchdog) => why,
        }
    }

    async fn prepare_and_exec(
        &mut self,
        program: Program,
        keeper: &tokio::task::JoinHandle<()>,
        watchdog: Option<&tokio::task::JoinHandle<()>>,
    ) -> String {
        info!(
            exe = %program.exe.display(),
            "re-executing in place: PostgreSQL and its fencing guard keep running"
        );
        if let Some(services) = self.services.take() {
            // Services are started again by the new image, not handed
            // over: a with-leader one stops before anything can move.
            services.stop(services.stop_limit()).await;
        }
        if let Some(member) = self.etcd_member.clone() {
            let stopped = tokio::task::spawn_blocking(move || member.stop()).await;
            if !matches!(stopped, Ok(true)) {
                warn!("the etcd member did not stop in time; the new image starts it again");
            }
        }
        let before = self.lease.borrow().valid_until;
        let mut lease = self.lease.clone();
        let renewed = tokio::time::timeout(self.timing.renew_interval * 3, async {
            while lease.changed().await.is_ok() {
                if lease.borrow_and_update().valid_until > before {
                    return;
                }
            }
        })
        .await;
        if renewed.is_err() && self.lease.borrow().id.is_some() {
            warn!("no lease renewal before the re-exec: the new image has less time to renew");
        }
        keeper.abort();
        if let Some(task) = watchdog {
            // The lease channel closed with the keeper: the watchdog keeper
            // closes the device cleanly (an unclean close would reset the
            // host when its timer runs out).
            let until = Instant::now() + Duration::from_secs(3);
            while !task.is_finished() && Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        let lease = *self.lease.borrow();
        let postmaster = match self.pg.hand_over() {
            Ok(pm) => pm.map(|pm| PostmasterState::of(pm, self.following.clone())),
            Err(err) => return format!("cannot hand the postmaster over: {err}"),
        };
        let handover = Handover {
            postmaster,
            lease: lease.id.map(|id| LeaseState {
                id,
                valid_until_ms: lease.valid_until.0,
                members_confirmed: lease.members_confirmed,
            }),
        };
        let err = program.exec(&handover);
        self.pg.cancel_hand_over();
        format!("cannot re-execute {}: {err}", program.exe.display())
    }
}
