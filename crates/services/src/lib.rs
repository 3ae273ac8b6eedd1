//! Supervised services: the applications a node runs beside PostgreSQL
//! (Synapse, coturn, ...), each placed by the election: `with-leader` ones
//! run only where the leader's primary runs, `everywhere` ones on every
//! node, `with-replica` ones on replicas. The crate follows the agent's
//! published view (`mainstay_core::Published`) like every other subsystem.
//!
//! - `spec`: what a service is, as the node's configuration gives it
//!   (typed and validated by the agent's config module);
//! - `order`: the order `depends_on` imposes, and the cycles it refuses;
//! - `rules`: where a service should run and how restarts back off, pure;
//! - `supervisor`: one task per service that carries the rules out,
//!   `process` one run of it under a fencing guard, `check` its health
//!   probes, `log` its rotated log file, `status` what it reports;
//! - `hooks`: Patroni-style callbacks when PostgreSQL starts, stops or
//!   changes role.

#![forbid(unsafe_code)]

pub mod check;
pub mod hooks;
pub mod log;
pub mod order;
mod process;
pub mod rules;
pub mod spec;
pub mod status;
pub mod supervisor;

pub use spec::{CheckProbe, HealthCheck, OnFailure, Placement, RestartPolicy, ServiceSpec};
pub use status::{ServiceState, ServiceStatus};
pub use supervisor::{Allowed, Inputs, Services};
