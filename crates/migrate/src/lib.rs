//! `mainstay migrate from-patroni`: a Patroni node's YAML configuration
//! turned into the equivalent mainstay node file (`mainstay.toml`) and
//! dynamic configuration (the JSON document `PUT /config` takes), with
//! every setting that has no mainstay equivalent listed. Pure: text in,
//! text out; the command line reads and writes the files and asks the
//! running Patroni.
//!
//! Every key of the Patroni file, and of Patroni's running configuration
//! when it answered, is accounted for by one rule of `rules::apply`:
//! mapped, dropped with the reason (mainstay does it another way and
//! nothing is lost), or unmapped (its behaviour would be lost: the
//! migration is refused unless the operator accepts each one). The
//! parameters Patroni takes only cluster-wide are carried as Patroni ran
//! them (`params`), and [`judge`] says whether the running cluster is fit
//! to be taken over.

mod health;
mod params;
mod rules;
mod values;

use serde_json::{Map, Value as Json, json};
use std::collections::BTreeMap;

pub use health::{Answers, Healthy, judge, slot_name_from_member_name};
pub use params::{ClusterParameter, Origin};
pub use rules::Disposition;

/// What became of one Patroni setting that was not mapped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    /// The dotted key in the Patroni file (`bootstrap.dcs.ttl`), or in
    /// Patroni's running configuration (`config.ttl`, from `GET /config`).
    pub key: String,
    pub disposition: Disposition,
    /// Why, and what to do instead.
    pub reason: String,
}

/// Where the dynamic configuration comes from.
#[derive(Clone, Copy, Debug)]
pub enum Dynamic<'a> {
    /// The file's `bootstrap.dcs`: what Patroni stored when it created the
    /// cluster, stale if the configuration was changed since.
    Bootstrap,
    /// What Patroni runs with now, `GET /config` (its DCS `config` key).
    Running(&'a Json),
}

impl Dynamic<'_> {
    /// How the notes and messages name it.
    pub fn label(&self) -> &'static str {
        match self {
            Dynamic::Bootstrap => "bootstrap.dcs",
            Dynamic::Running(_) => "GET /config",
        }
    }
}

/// The result of a migration.
#[derive(Debug)]
pub struct Migration {
    /// The node file, as TOML.
    pub node_file: String,
    /// The dynamic configuration, for `PUT /config`.
    pub dynamic: Json,
    /// Settings dropped (no loss) or not mapped (a loss), by key.
    pub notes: Vec<Note>,
    /// The parameters Patroni takes only from the cluster-wide
    /// configuration, as it ran them; all are in `dynamic`.
    pub cluster_parameters: Vec<ClusterParameter>,
}

impl Migration {
    pub fn unmapped(&self) -> impl Iterator<Item = &Note> {
        self.notes
            .iter()
            .filter(|n| n.disposition == Disposition::Unmapped)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MigrateError {
    #[error("not YAML: {0}")]
    NotYaml(String),
    #[error(
        "not a Patroni configuration: {0} (a Patroni node's file has `scope`, `name`, \
         `restapi`, an `etcd3` or `etcd` section and `postgresql.data_dir`)"
    )]
    NotPatroni(String),
    #[error("{key}: {reason}")]
    Bad { key: String, reason: String },
}

/// What the command needs to ask a node's running Patroni.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PatroniNode {
    pub scope: String,
    pub name: String,
    /// `http(s)://` and `restapi.connect_address` (https when
    /// `restapi.certfile` is set), if the file has one.
    pub api_url: Option<String>,
    /// The CA patronictl trusts for the API: `ctl.cacert`, else
    /// `restapi.cafile`.
    pub api_ca_file: Option<String>,
    /// `restapi.verify_client: required`: Patroni wants a client
    /// certificate on every request.
    pub api_client_certificate: bool,
    /// `restapi.authentication` is set.
    pub api_credentials: bool,
}

/// The Patroni file as JSON values, checked to be one.
fn parse(yaml: &str) -> Result<Json, MigrateError> {
    let document: yaml_serde::Value =
        yaml_serde::from_str(yaml).map_err(|e| MigrateError::NotYaml(e.to_string()))?;
    let json = values::to_json(&document).map_err(MigrateError::NotYaml)?;
    let Json::Object(top) = &json else {
        return Err(MigrateError::NotPatroni(
            "the document is not a mapping of settings".into(),
        ));
    };
    for required in ["scope", "name"] {
        if !top.get(required).is_some_and(Json::is_string) {
            return Err(MigrateError::NotPatroni(format!("no `{required}`")));
        }
    }
    if json.pointer("/postgresql/data_dir").is_none() {
        return Err(MigrateError::NotPatroni("no `postgresql.data_dir`".into()));
    }
    Ok(json)
}

/// Who the Patroni file's node is and where its REST API answers.
pub fn patroni_node(yaml: &str) -> Result<PatroniNode, MigrateError> {
    let json = parse(yaml)?;
    let text = |pointer: &str| {
        json.pointer(pointer)
            .and_then(Json::as_str)
            .map(String::from)
    };
    let https = json.pointer("/restapi/certfile").is_some();
    Ok(PatroniNode {
        scope: text("/scope").unwrap_or_default(),
        name: text("/name").unwrap_or_default(),
        api_url: text("/restapi/connect_address")
            .map(|address| format!("{}://{address}", if https { "https" } else { "http" })),
        api_ca_file: text("/ctl/cacert").or_else(|| text("/restapi/cafile")),
        api_client_certificate: text("/restapi/verify_client").as_deref() == Some("required"),
        api_credentials: json.pointer("/restapi/authentication").is_some(),
    })
}

/// The mainstay files for the Patroni node configured by `yaml`, with the
/// dynamic configuration from `dynamic`.
pub fn from_patroni(yaml: &str, dynamic: Dynamic) -> Result<Migration, MigrateError> {
    let json = parse(yaml)?;
    let Json::Object(top) = &json else {
        unreachable!("parse checks for a mapping");
    };
    let dcs = match dynamic {
        Dynamic::Bootstrap => json.pointer("/bootstrap/dcs").cloned().unwrap_or(json!({})),
        Dynamic::Running(config) => config.clone(),
    };
    let no_parameters = Map::new();
    let parameters = dcs
        .pointer("/postgresql/parameters")
        .and_then(Json::as_object)
        .unwrap_or(&no_parameters);
    let mut out = rules::Output::new(params::resolve(parameters), dynamic.label());
    let mut notes = Vec::new();
    let mut note = |key: &str, outcome| {
        if let rules::Outcome::Note(disposition, reason) = outcome {
            notes.push(Note {
                key: key.to_string(),
                disposition,
                reason,
            });
        }
    };
    let mut flat = Vec::new();
    values::flatten("", &json, &mut flat);
    let mut bootstrap_dcs = false;
    for (key, value) in &flat {
        if matches!(dynamic, Dynamic::Running(_))
            && (key == "bootstrap.dcs" || key.starts_with("bootstrap.dcs."))
        {
            bootstrap_dcs = true;
            continue;
        }
        note(key, rules::apply(key, value, &json, &mut out)?);
    }
    if let Dynamic::Running(config) = dynamic {
        if bootstrap_dcs {
            note(
                "bootstrap.dcs",
                rules::Outcome::Note(
                    Disposition::Dropped,
                    "Patroni applied it only when it created the cluster; the dynamic \
                     configuration comes from GET /config, what the cluster runs now"
                        .into(),
                ),
            );
        }
        let mut running = Vec::new();
        values::flatten("config", config, &mut running);
        for (key, value) in &running {
            let rest: Vec<&str> = key.split('.').skip(1).collect();
            note(key, rules::dcs_setting(key, &rest, value, &mut out)?);
        }
    }
    let node_file = out.node_file(top)?;
    let cluster_parameters = out.cluster.clone();
    Ok(Migration {
        node_file,
        dynamic: Json::Object(out.into_dynamic()),
        notes,
        cluster_parameters,
    })
}

/// Shell words: Patroni runs a callback through a shell-free `split`.
pub(crate) fn words(command: &str) -> Vec<String> {
    command.split_whitespace().map(String::from).collect()
}

/// A map of TOML values, in key order.
pub(crate) type Table = BTreeMap<String, toml::Value>;

#[cfg(test)]
mod tests;
