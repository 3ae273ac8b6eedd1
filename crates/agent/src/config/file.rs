//! The node's TOML file as written: every key optional where the file may
//! leave it out, no defaults and no interpretation. `validate.rs` turns it
//! into the typed [`Config`](super::Config); nothing else reads these.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct File {
    pub cluster: String,
    pub name: String,
    pub vip: Option<String>,
    pub vip_interface: Option<String>,
    pub etcd: EtcdSection,
    pub postgresql: PgSection,
    #[serde(default)]
    pub api: ApiSection,
    #[serde(default)]
    pub proxy: ProxySection,
    #[serde(default)]
    pub timing: TimingSection,
    #[serde(default)]
    pub tags: toml::Table,
    #[serde(default)]
    pub watchdog: WatchdogSection,
    #[serde(default, rename = "service")]
    pub services: Vec<ServiceSection>,
    #[serde(default)]
    pub callbacks: CallbacksSection,
    #[serde(default)]
    pub alerts: AlertsSection,
    #[serde(default, rename = "replicate")]
    pub replicate: Vec<ReplicateSection>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct EtcdSection {
    pub endpoints: Vec<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// The node's own etcd member, run by the agent (`config/etcd_member.rs`).
    pub member: Option<bool>,
    pub data_dir: Option<PathBuf>,
    pub client_url: Option<String>,
    pub peer_url: Option<String>,
    pub initial_cluster: Option<BTreeMap<String, String>>,
    pub initial_cluster_state: Option<String>,
    pub heartbeat_interval: Option<f64>,
    pub election_timeout: Option<f64>,
    pub bin: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CredentialsSection {
    pub username: String,
    pub password: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PgSection {
    pub bin_dir: Option<PathBuf>,
    pub data_dir: PathBuf,
    pub listen: Option<String>,
    pub connect_address: Option<String>,
    pub port: Option<u16>,
    pub run_as: Option<String>,
    pub superuser: CredentialsSection,
    pub replication: CredentialsSection,
    pub rewind: Option<CredentialsSection>,
    #[serde(default)]
    pub parameters: BTreeMap<String, toml::Value>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ApiSection {
    pub listen: Option<String>,
    pub connect_url: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub token: Option<String>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    pub header_timeout: Option<f64>,
    pub max_connections: Option<usize>,
    pub agent_check_listen: Option<String>,
    pub agent_check_wait: Option<f64>,
}

/// A size in bytes, written as a number or with a unit ("16MB").
#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum ByteSize {
    Bytes(u64),
    Text(String),
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ProxySection {
    pub listen: Option<String>,
    pub read_only_listen: Option<String>,
    pub replica_max_lag: Option<ByteSize>,
    pub wait_for_leader: Option<f64>,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(super) enum Profile {
    #[default]
    Default,
    Fast,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TimingSection {
    #[serde(default)]
    pub profile: Profile,
    pub ttl: Option<u64>,
    pub loop_wait: Option<f64>,
    pub renew_interval: Option<f64>,
    pub dcs_timeout: Option<f64>,
    pub fencing_margin: Option<f64>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct WatchdogSection {
    pub mode: Option<String>,
    pub device: Option<PathBuf>,
    pub safety_margin: Option<f64>,
}

/// One `[[service]]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ServiceSection {
    pub name: String,
    #[serde(default)]
    pub command: Vec<String>,
    pub placement: Option<String>,
    pub user: Option<String>,
    pub group: Option<String>,
    pub working_directory: Option<PathBuf>,
    #[serde(default)]
    pub environment: BTreeMap<String, String>,
    pub log_file: Option<PathBuf>,
    pub log_max_size: Option<ByteSize>,
    pub log_keep: Option<u32>,
    pub stop_signal: Option<String>,
    pub stop_grace: Option<f64>,
    pub start_timeout: Option<f64>,
    #[serde(default)]
    pub depends_on: Vec<String>,
    #[serde(default, rename = "check")]
    pub checks: Vec<CheckSection>,
    #[serde(default)]
    pub restart: RestartSection,
    pub on_failure: Option<String>,
}

/// One `[[service.check]]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CheckSection {
    pub kind: String,
    pub address: Option<String>,
    pub url: Option<String>,
    pub status: Option<u16>,
    pub command: Option<Vec<String>>,
    pub interval: Option<f64>,
    pub timeout: Option<f64>,
    pub failures: Option<u32>,
}

/// `[service.restart]`.
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RestartSection {
    pub backoff: Option<f64>,
    pub max_backoff: Option<f64>,
    pub limit: Option<u32>,
    pub window: Option<f64>,
}

/// `[callbacks]`.
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CallbacksSection {
    pub on_start: Option<Vec<String>>,
    pub on_stop: Option<Vec<String>>,
    pub on_role_change: Option<Vec<String>>,
    pub timeout: Option<f64>,
}

/// `[alerts]`.
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AlertsSection {
    pub replication_lag: Option<f64>,
    pub replication_lag_bytes: Option<ByteSize>,
    pub data_disk_free: Option<ByteSize>,
    pub data_disk_free_percent: Option<f64>,
    pub replicated_files_lag: Option<f64>,
}

/// One `[[replicate]]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ReplicateSection {
    pub path: PathBuf,
    #[serde(default)]
    pub exclude: Vec<String>,
    pub settle: Option<f64>,
    pub scan_interval: Option<f64>,
    pub throttle: Option<ByteSize>,
}
