//! Health answers from PostgreSQL as it is now, not as the HA loop's last
//! turn saw it: a load balancer must stop sending clients to a server the
//! moment it stops or is demoted. The snapshot keeps everything a probe
//! cannot tell cheaply (leadership, lag, tags); this overlays what
//! [`mainstay_pg::LiveProbe`] found at most 100 ms ago.

use super::NodeSnapshot;
use mainstay_pg::{Live, WalReceiver};

/// `node` with what `live` found. `postmaster_alive`: whether the
/// postmaster the snapshot knew of still exists.
pub fn overlay(node: &NodeSnapshot, live: &Live, postmaster_alive: bool) -> NodeSnapshot {
    let mut now = node.clone();
    match live {
        // A busy server is not a dead one: the last turn's view stands.
        Live::Unanswered => {}
        Live::Down => {
            now.health = None;
            now.running = node.running && postmaster_alive;
        }
        Live::Up {
            in_recovery,
            receiver,
        } => {
            // Without a whole probe (the loop has not seen this server
            // answer yet) nothing is invented: the next turn fills it in.
            if let Some(health) = now.health.as_mut() {
                health.in_recovery = *in_recovery;
                health.wal_receiver = match (receiver, health.wal_receiver.take()) {
                    (None, _) => None,
                    (Some(status), Some(known)) => Some(WalReceiver {
                        status: status.clone(),
                        ..known
                    }),
                    (Some(status), None) => Some(WalReceiver {
                        status: status.clone(),
                        received_tli: 0,
                        flushed_lsn: None,
                        sender_host: None,
                        sender_port: None,
                        slot_name: None,
                    }),
                };
            }
        }
    }
    now
}

#[cfg(test)]
mod tests {
    use super::super::health::{Check, Filters, passes};
    use super::*;
    use crate::api::running_node as running;

    #[test]
    fn a_server_that_stopped_fails_every_check_at_once() {
        let any = Filters::default();
        let replica = running(true, false);
        assert!(passes(Check::Replica, &replica, &any));
        let gone = overlay(&replica, &Live::Down, false);
        assert!(!gone.running);
        for check in [
            Check::Replica,
            Check::ReadOnly,
            Check::Health,
            Check::Readiness,
        ] {
            assert!(!passes(check, &gone, &any), "{check:?}");
        }
        // A postmaster that lives but lets nobody in is starting (or
        // stopping): not running as far as clients care.
        let refusing = overlay(&replica, &Live::Down, true);
        assert!(refusing.running && !passes(Check::Health, &refusing, &any));
    }

    #[test]
    fn a_demoted_primary_fails_the_primary_check_before_the_next_turn() {
        let any = Filters::default();
        let leader = running(false, true);
        assert!(passes(Check::Primary, &leader, &any));
        let demoted = Live::Up {
            in_recovery: true,
            receiver: None,
        };
        let now = overlay(&leader, &demoted, true);
        assert!(!passes(Check::Primary, &now, &any));
        assert!(!passes(Check::Replica, &now, &any), "not streaming yet");
    }

    #[test]
    fn a_replica_that_lost_its_stream_leaves_the_read_only_pool() {
        let any = Filters::default();
        let replica = running(true, false);
        let lost = Live::Up {
            in_recovery: true,
            receiver: Some("waiting".into()),
        };
        assert!(!passes(
            Check::Replica,
            &overlay(&replica, &lost, true),
            &any
        ));
        let still = Live::Up {
            in_recovery: true,
            receiver: Some("streaming".into()),
        };
        assert!(passes(
            Check::Replica,
            &overlay(&replica, &still, true),
            &any
        ));
    }

    #[test]
    fn a_busy_server_keeps_the_last_turns_answer() {
        let leader = running(false, true);
        let now = overlay(&leader, &Live::Unanswered, true);
        assert!(passes(Check::Primary, &now, &Filters::default()));
    }
}
