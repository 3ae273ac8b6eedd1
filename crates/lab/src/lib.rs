//! The lab: whole clusters on one machine for people and benchmarks.
//! `demo.rs` starts etcd and N agents (on loopback or one network namespace
//! per host); `bench/` measures failover, switchover, the proxy, the
//! endpoints and Patroni side by side. The `mainstay` binary's `demo` and
//! `bench` subcommands call in here; the agent never does.

#![forbid(unsafe_code)]

pub mod bench;
pub mod certificates;
pub mod demo;
pub mod patroni;
pub mod platform;
pub mod replicated;
pub mod witness;
