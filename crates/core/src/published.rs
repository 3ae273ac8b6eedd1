//! What an agent publishes for the subsystems that follow it: the cluster
//! as it last read it and this node's place in it. The proxy, the virtual
//! IP and etcd's leader placement follow it today; services that run beside
//! the primary, file replication and the console join the same way, as
//! crates that take a `tokio::sync::watch::Receiver<Published>` (from
//! `Agent::follow`) instead of branches in the HA loop. Plain data: the
//! agent decides, followers only act on what it published.

use crate::{ClusterView, PgRole};
use std::sync::Arc;

/// Republished after every turn, and only when something in it changed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Published {
    /// The cluster at the etcd revision the agent last read; kept while
    /// etcd is unreachable (then `local.leading` turns false once the lease
    /// cannot be confirmed). `None` before the first read.
    pub view: Option<Arc<ClusterView>>,
    pub local: LocalState,
}

/// This node as its agent sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalState {
    /// It holds the leader key on a lease that cannot have expired, and its
    /// PostgreSQL runs as a writable primary: what everything that must
    /// run on the primary's node follows. The fencing guard, not this
    /// flag, bounds how long a frozen agent's node keeps writing.
    pub leading: bool,
    /// Its PostgreSQL as last probed (`Stopped` also when it runs but does
    /// not answer).
    pub pg_role: PgRole,
}

impl Default for LocalState {
    fn default() -> Self {
        LocalState {
            leading: false,
            pg_role: PgRole::Stopped,
        }
    }
}
