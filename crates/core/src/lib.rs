//! The pure decision logic of mainstay: what one agent should do next, given
//! what it observes. Nothing here performs I/O, reads a clock or sleeps; time
//! arrives as a value inside the observation. That is what lets the
//! simulation tests drive thousands of clusters through faults in seconds.

#![forbid(unsafe_code)]

pub mod action;
pub mod candidate;
pub mod decide;
pub mod dynamic;
pub mod failsafe;
pub mod first_leader;
pub mod lease;
pub mod observation;
pub mod poison;
pub mod published;
pub mod switchover;
pub mod sync;
pub mod tags;
pub mod timeline;
pub mod timing;
pub mod types;

pub use decide::{Action, CoreState, Decision, Observation, decide};
pub use dynamic::DynamicConfig;
pub use published::{LocalState, Published};
pub use timing::Timing;
pub use types::*;
