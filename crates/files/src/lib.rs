//! Directories replicated from the node that holds leadership to every
//! other node (`[[replicate]]`: Synapse's media store...), so that files
//! follow the database through a failover.
//!
//! The parts, from the pure to the ones that touch the disk:
//! - `spec`: a directory as the configuration describes it, typed, with its
//!   exclude globs compiled;
//! - `manifest`: a tree as data (path, kind, size, content hash, mode,
//!   owner, mtime), the unit both ends compare;
//! - `plan`: what a receiver must do to match its source: pure, so every
//!   rule (a file only on the receiver is moved aside, never deleted,
//!   unless the source saw it deleted) is tested without a disk;
//! - `scan`: a directory read into a manifest, hashing only files whose
//!   size, mtime, inode or ctime changed since the last scan (`hashes`:
//!   that cache, also kept on disk so that a restarted node does not read
//!   its whole tree again);
//! - `apply`: the receiver's writes: a temporary name in the same
//!   directory, fsync, rename, so that a reader never sees half a file;
//!   files moved aside into a dated folder beside the tree;
//! - `execute`: a plan run step by step on a receiver, a failed step
//!   reported and left for the next round;
//! - `source`: the leader's offer (the tree once each file has settled,
//!   a version, the paths it saw deleted); `follower`: a receiver's rounds
//!   against that offer;
//! - `watch`: change events on a source directory (when to scan, which
//!   files were closed after writing);
//! - `trouble`: when a directory needs a person (a receiver too far
//!   behind, files failing for too long);
//! - `runner`: the thread that makes each directory a source while the
//!   node leads and a follower of the leader otherwise, over the agent's
//!   API (`Transport`).

#![forbid(unsafe_code)]

pub mod apply;
pub mod execute;
pub mod follower;
pub mod hashes;
pub mod manifest;
pub mod plan;
pub mod runner;
pub mod scan;
pub mod source;
pub mod spec;
pub mod trouble;
pub mod watch;

pub use manifest::{Entry, Kind, Manifest};
pub use plan::{Plan, plan};
pub use runner::{Replication, Transport};
pub use spec::{Excludes, ReplicateSpec};
