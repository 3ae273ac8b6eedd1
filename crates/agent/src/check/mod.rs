//! `mainstay check`: the preflight a person runs before starting a node
//! (and the agent at start-up, for what can stop it): each finding says
//! what was found, why it matters and the fix. Exit code 0 (all ok), 1
//! (warnings) or 2 (something blocks).
//!
//! `access.rs` is the pure rule for the data directory's permissions,
//! `local.rs` looks at this host (programs and versions, ports, disk,
//! clock, the VIP's capabilities), `remote.rs` at the others (etcd, the
//! peers' members, their clocks).

pub mod access;
mod local;
mod remote;

use crate::config::{Config, WitnessConfig};
use serde::Serialize;
use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Ok,
    Warning,
    Blocking,
}

/// One thing `check` looked at.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub severity: Severity,
    /// Which check: `data_dir`, `ports`, `clock`...
    pub check: &'static str,
    pub what: String,
    /// Why it matters (empty when all is well).
    pub why: String,
    pub fix: String,
}

impl Finding {
    pub fn new(
        severity: Severity,
        check: &'static str,
        what: String,
        why: &str,
        fix: String,
    ) -> Finding {
        Finding {
            severity,
            check,
            what,
            why: why.to_string(),
            fix,
        }
    }

    pub fn ok(check: &'static str, what: String) -> Finding {
        Finding::new(Severity::Ok, check, what, "", String::new())
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let label = match self.severity {
            Severity::Ok => "ok",
            Severity::Warning => "WARNING",
            Severity::Blocking => "BLOCKING",
        };
        write!(f, "{label:<9}{:<10} {}", self.check, self.what)?;
        if !self.why.is_empty() {
            write!(f, "\n{:19} why: {}", "", self.why)?;
        }
        if !self.fix.is_empty() {
            write!(f, "\n{:19} fix: {}", "", self.fix)?;
        }
        Ok(())
    }
}

/// 0 when all is well, 1 with warnings, 2 when something blocks.
pub fn exit_code(findings: &[Finding]) -> u8 {
    match findings.iter().map(|f| f.severity).max() {
        Some(Severity::Blocking) => 2,
        Some(Severity::Warning) => 1,
        _ => 0,
    }
}

/// Everything about a data node: this host, then etcd and the peers.
pub async fn node(config: &Config) -> Vec<Finding> {
    let mut findings = at_start(config);
    findings.extend(local::ports(&local::node_ports(config)));
    if let Some(member) = &config.etcd_member {
        findings.push(local::etcd_binary(&member.binary));
    }
    findings.extend(remote::etcd(&config.etcd, config.etcd_member.as_ref(), &config.name).await);
    findings
}

/// What the agent itself checks before it starts: what would make every
/// bootstrap or start fail, and what an operator should hear about at
/// once. Ports are left out: the agent's own bind reports those, and a
/// PostgreSQL on its port may be a stray one it stops itself.
pub fn at_start(config: &Config) -> Vec<Finding> {
    let mut findings = vec![local::postgres_binary(&config.postgresql.bin_dir)];
    findings.extend(local::data_dir_access(&config.postgresql));
    findings.push(local::disk(&config.postgresql.data_dir));
    findings.push(local::clock());
    if let Some(vip) = &config.vip {
        findings.extend(local::vip(vip));
    }
    findings
}

/// Everything about a witness.
pub async fn witness(config: &WitnessConfig) -> Vec<Finding> {
    let member = &config.etcd_member;
    let mut findings = vec![local::etcd_binary(&member.binary)];
    findings.push(local::disk(&member.data_dir));
    findings.push(local::clock());
    findings.extend(local::ports(&local::witness_ports(config)));
    findings.extend(remote::etcd(&config.etcd, Some(member), &config.name).await);
    findings
}
