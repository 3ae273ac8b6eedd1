//! mainstay as a library: the pieces the binary wires together, exposed so
//! that integration tests and benchmarks drive the same code.

#![forbid(unsafe_code)]

pub mod agent;
pub mod api;
pub mod bench;
pub mod boot_clock;
pub mod config;
pub mod ctl;
pub mod demo;
pub mod parameter_guard;
pub mod proxy;
pub mod tls;
pub mod vip;
pub mod watchdog_keeper;
