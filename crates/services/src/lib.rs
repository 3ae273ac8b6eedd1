//! Supervised services: the applications a node runs beside PostgreSQL
//! (Synapse, coturn, ...), each placed by the election: `with-leader` ones
//! run only where the leader's primary runs, `everywhere` ones on every
//! node, `with-replica` ones on replicas. The crate follows the agent's
//! published view (`mainstay_core::Published`) like every other subsystem.
//!
//! - `spec`: what a service is, as the node's configuration gives it
//!   (typed and validated by the agent's config module);
//! - `order`: the order `depends_on` imposes, and the cycles it refuses;
//! - `rules`: where a service should run and how restarts back off, pure.

#![forbid(unsafe_code)]

pub mod order;
pub mod rules;
pub mod spec;

pub use spec::{CheckProbe, HealthCheck, OnFailure, Placement, RestartPolicy, ServiceSpec};
