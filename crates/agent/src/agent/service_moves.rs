//! A `with-leader` service with `on_failure = "failover"` that gave up on
//! this node moves leadership away, once: the leader asks for a planned
//! switchover to the best replica (the core's `service_move` says which,
//! or why not: a service that failed on another member too stops the
//! moving), and the switchover runs like any other, its with-leader
//! services stopped before PostgreSQL and the key.

use super::*;
use mainstay_core::{FailoverKind, FailoverRequest};

/// What this leader did about a service that gave up here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum ServiceMove {
    /// A switchover was asked for.
    Requested,
    /// It may not move (yet): asked again every turn, since a replica may
    /// come to stream or an operator clear another node's failure, but
    /// logged once per reason.
    Refused(String),
}

impl<D: Dcs> Agent<D> {
    pub(super) async fn move_for_failed_services(&mut self) {
        let Some(services) = &self.services else {
            return;
        };
        if !self.holds_leader() {
            self.service_moves.clear();
            return;
        }
        let wanted = services.failover_wanted();
        let Some(view) = self.last_view.as_ref() else {
            return;
        };
        for (service, why) in wanted {
            if self.service_moves.get(&service) == Some(&ServiceMove::Requested) {
                if view.failover.is_some() {
                    continue;
                }
                // The request is gone and this node still leads: the
                // switchover was refused or aborted; ask again.
                self.service_moves.remove(&service);
            }
            match mainstay_core::switchover::service_move(view, &self.name, &service, &self.dynamic)
            {
                Ok(candidate) => {
                    let request = FailoverRequest {
                        kind: FailoverKind::Switchover,
                        leader: Some(self.name.clone()),
                        candidate: Some(candidate.clone()),
                        scheduled_at: None,
                        requested_at: unix_now(),
                    };
                    match self.dcs.put_failover(&request, 0).await {
                        Ok(true) => {
                            warn!(
                                service,
                                candidate,
                                "service failed here ({why}): handing leadership to {candidate} (switchover)"
                            );
                            self.service_moves.insert(service, ServiceMove::Requested);
                        }
                        // Another request is pending: asked again next turn.
                        Ok(false) => {}
                        Err(err) => warn!(service, "cannot ask for a switchover: {err}"),
                    }
                }
                Err(reason) => {
                    let refused = ServiceMove::Refused(reason.clone());
                    if self.service_moves.get(&service) != Some(&refused) {
                        error!(
                            service,
                            "service failed here ({why}), and leadership stays: {reason}"
                        );
                        self.service_moves.insert(service, refused);
                    }
                }
            }
        }
    }
}
