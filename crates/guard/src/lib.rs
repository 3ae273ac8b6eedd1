//! The fencing guard: a tiny process that sits between the agent and the
//! postmaster and stops PostgreSQL the moment its write permission expires,
//! whether or not the agent still runs.
//!
//! Why a process: the agent's own fencing thread stops with the agent. A
//! SIGSTOP, a debugger, Ctrl-Z or a container freeze would leave a primary
//! writable after another node was promoted. The guard lives in its own
//! session, is the postmaster's parent, and needs nothing from the agent but
//! a deadline; the agent extends it over a socket after every confirmed lease
//! renewal. See docs/fencing.md for why this is safe.
//!
//! - `protocol`: the few lines the agent and the guard exchange;
//! - `clock`: deadlines on `CLOCK_BOOTTIME` (a host suspend counts);
//! - `rules`: what the guard does on each event, pure and unit-tested;
//! - `process`: the guard's main loop (poll on the socket, a timer and the
//!   postmaster's pidfd), which only carries the rules out.
//!
//! The system calls std has no safe form of come from `mainstay-sys`; this
//! crate has no `unsafe` of its own.

#![forbid(unsafe_code)]

pub mod clock;
mod process;
pub mod protocol;
pub mod rules;

pub use clock::BootTime;
pub use process::{GUARD_ARG, GuardArgs, SELF_TEST_ARG, main, run_if_asked, self_test};
