//! The agent: everything one `mainstay agent` process runs (the HA loop,
//! the REST API, the proxy, the virtual IP, the watchdog keeper), its
//! configuration, and `mainstay ctl`. A library so that the binary, the
//! lab (demo and benchmarks) and the integration tests drive the same code;
//! nothing in it is test tooling.

#![forbid(unsafe_code)]
// serde_json's json! recurses once per entry; the OpenAPI document's
// components map is longer than the default limit allows.
#![recursion_limit = "256"]

pub mod agent;
pub mod agent_check;
pub mod alerts;
pub mod api;
pub mod api_client;
pub mod boot_clock;
pub mod check;
pub mod config;
pub mod ctl;
pub mod etcd_rejoin;
pub mod files_transport;
pub mod parameter_guard;
pub mod proxy;
pub mod reexec;
pub mod reload_running;
pub mod systemd;
pub mod tls;
pub mod vip;
pub mod watchdog_keeper;
pub mod witness;
