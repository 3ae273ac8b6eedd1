//! `mainstay migrate from-patroni`: a Patroni node's YAML configuration
//! turned into the equivalent mainstay node file (`mainstay.toml`) and
//! dynamic configuration (the JSON document `PUT /config` takes), with
//! every setting that has no mainstay equivalent listed. Pure: text in,
//! text out; the command line reads and writes the files.
//!
//! Every key of the Patroni file is accounted for by one rule of
//! [`rules::RULES`]: mapped, dropped with the reason (mainstay does it
//! another way and nothing is lost), or unmapped (its behaviour would be
//! lost: the migration is refused unless the operator accepts each one).

mod rules;
mod values;

use serde_json::Value as Json;
use std::collections::BTreeMap;

pub use rules::Disposition;

/// What became of one Patroni setting that was not mapped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    /// The dotted key in the Patroni file (`bootstrap.dcs.ttl`).
    pub key: String,
    pub disposition: Disposition,
    /// Why, and what to do instead.
    pub reason: String,
}

/// The result of a migration.
#[derive(Debug)]
pub struct Migration {
    /// The node file, as TOML.
    pub node_file: String,
    /// The dynamic configuration (from `bootstrap.dcs`), for `PUT /config`.
    pub dynamic: Json,
    /// Settings dropped (no loss) or not mapped (a loss), by key.
    pub notes: Vec<Note>,
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

/// The mainstay files for the Patroni node configured by `yaml`.
pub fn from_patroni(yaml: &str) -> Result<Migration, MigrateError> {
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
    let mut flat = Vec::new();
    values::flatten("", &json, &mut flat);
    let mut out = rules::Output::default();
    let mut notes = Vec::new();
    for (key, value) in &flat {
        match rules::apply(key, value, &json, &mut out)? {
            rules::Outcome::Mapped => {}
            rules::Outcome::Note(disposition, reason) => notes.push(Note {
                key: key.clone(),
                disposition,
                reason,
            }),
        }
    }
    let node_file = out.node_file(top)?;
    Ok(Migration {
        node_file,
        dynamic: Json::Object(out.dynamic),
        notes,
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
