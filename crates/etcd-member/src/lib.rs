//! The node's own etcd member (`[etcd] member = true`): the agent runs
//! Debian's `etcd` as a supervised child, with flags derived from the
//! node's timing, so that a node (or a witness) is one service to install
//! and start, not two.
//!
//! - `spec`: what the member is, as the agent's configuration gives it
//!   (typed and validated there), and the raft timing a lease ttl needs;
//! - `command`: the spec as etcd's command line, pure;
//! - `supervisor`: one thread that keeps the member running (restarts
//!   with backoff, stops it when the agent stops, dies with the agent).
//!
//! Talking to the member (health, membership changes) is the DCS crate's
//! job, like every other etcd request.

#![forbid(unsafe_code)]

pub mod command;
pub mod spec;
pub mod supervisor;

pub use spec::{ClusterState, MemberSpec, MemberTls, RaftTiming};
pub use supervisor::{AfterExit, Member, MemberHandle, MemberStatus};
