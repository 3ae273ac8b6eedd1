//! A witness's file (`mainstay witness --config FILE`): the cluster, the
//! node's name, its etcd member, its REST API and the timing; no
//! PostgreSQL. Parsed once into [`WitnessConfig`] with the agent's own
//! validators, so a key means the same in both files.

use super::file::{ApiSection, EtcdSection, TimingSection};
use super::validate::{api, check_name, etcd, timing};
use super::{ApiConfig, ConfigError};
use mainstay_core::Timing;
use mainstay_dcs::EtcdSettings;
use mainstay_etcd_member::MemberSpec;
use serde::Deserialize;
use std::path::Path;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WitnessFile {
    cluster: String,
    name: String,
    etcd: EtcdSection,
    #[serde(default)]
    api: ApiSection,
    #[serde(default)]
    timing: TimingSection,
}

/// A witness's configuration, validated.
#[derive(Debug)]
pub struct WitnessConfig {
    pub cluster: String,
    pub name: String,
    /// The lease its member key lives on, and how often it looks.
    pub timing: Timing,
    pub etcd: EtcdSettings,
    /// A witness is its etcd member: always present.
    pub etcd_member: MemberSpec,
    pub api: ApiConfig,
}

impl WitnessConfig {
    pub fn load(path: &Path) -> Result<WitnessConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|err| ConfigError {
            path: path.to_path_buf(),
            key: None,
            message: format!("cannot read the file: {err}; check the path and its permissions"),
        })?;
        WitnessConfig::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<WitnessConfig, ConfigError> {
        let file: WitnessFile = toml::from_str(text).map_err(|err| ConfigError {
            path: path.to_path_buf(),
            key: None,
            message: format!(
                "{}\nfix: a witness's file has cluster, name, [etcd] (with member = true), \
                 [api] and [timing]; see docs/configuration.md#witness",
                err.to_string().trim_end()
            ),
        })?;
        WitnessConfig::from_file(file).map_err(|(key, message)| ConfigError {
            path: path.to_path_buf(),
            key: Some(key.to_string()),
            message,
        })
    }

    fn from_file(file: WitnessFile) -> Result<WitnessConfig, (&'static str, String)> {
        check_name("cluster", &file.cluster)?;
        check_name("name", &file.name)?;
        let timing = timing(&file.timing)?;
        if file.etcd.member != Some(true) {
            return Err((
                "etcd.member",
                "a witness is its node's etcd member: set member = true with data_dir, \
                 client_url, peer_url and initial_cluster (docs/configuration.md#etcd-member)"
                    .into(),
            ));
        }
        if file.api.agent_check_listen.is_some() {
            return Err((
                "api.agent_check_listen",
                "a witness runs no PostgreSQL, so no load balancer routes to it: remove the key"
                    .into(),
            ));
        }
        let etcd_member =
            super::etcd_member::member(&file.etcd, &file.name, &file.cluster, timing.ttl, &[])?
                .expect("member = true was checked");
        Ok(WitnessConfig {
            etcd: etcd(file.etcd, &file.cluster, &timing)?,
            etcd_member,
            api: api(file.api)?,
            timing,
            cluster: file.cluster,
            name: file.name,
        })
    }
}
