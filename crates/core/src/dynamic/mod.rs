//! The cluster-wide dynamic configuration: the JSON document in the DCS
//! `config` key that an operator changes at runtime (`PATCH /config`) and
//! every agent applies without a restart of mainstay. It is checked here,
//! before it is written, so that a bad document is refused with the key at
//! fault instead of being discovered by every agent at once.
//!
//! Timing (`ttl`, `loop_wait`, ...) is deliberately not part of it, unlike in
//! Patroni: each node checks at startup that its own timing lets it fence
//! itself before its lease can expire, and a cluster-wide value changed behind
//! a running agent's back would bypass that check.
//!
//! Nothing here performs I/O: the shell reads and writes the key, this module
//! only parses, validates, merges and compares.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::fmt;

/// Patroni's default, so that a configuration carried over behaves the same.
pub const DEFAULT_MAXIMUM_LAG_ON_FAILOVER: u64 = 1_048_576;
/// Half an hour: long enough for a member to come back from a reboot or a
/// short maintenance and resume streaming from its slot, short enough that a
/// member that is gone for good does not pin WAL on the leader for long.
pub const DEFAULT_MEMBER_SLOTS_TTL: u64 = 1800;

/// More synchronous standbys than this is almost certainly a typo, and every
/// extra one adds a network round trip to each commit.
const MAX_SYNCHRONOUS_NODE_COUNT: u32 = 16;
/// 1 TiB: a larger limit means "promote whatever the lag", which is better
/// said by an operator's explicit failover than by a limit that never bites.
const MAX_MAXIMUM_LAG_ON_FAILOVER: u64 = 1 << 40;
/// A slot kept for a week pins a week of WAL; beyond that the disk fills
/// before the member comes back.
const MAX_MEMBER_SLOTS_TTL: u64 = 7 * 24 * 60 * 60;
/// A week: far enough for a maintenance window planned on a Monday for the
/// weekend, near enough that a forgotten request is noticed.
pub const DEFAULT_SCHEDULED_SWITCHOVER_HORIZON: u64 = 7 * 24 * 60 * 60;
/// A year: a request further ahead than that is a typo or a script's bug.
const MAX_SCHEDULED_SWITCHOVER_HORIZON: u64 = 366 * 24 * 60 * 60;

/// The settings that must be the same on every node, so they live in the DCS
/// rather than in each node's file. Field names are Patroni's wherever the
/// meaning is the same, so that an operator's habits and scripts carry over.
///
/// Every field has a default, so `{}` is a valid document: a fresh cluster
/// needs no `config` key at all.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DynamicConfig {
    /// Maintenance mode: agents keep observing and reporting but take no
    /// automatic action, so an operator can stop or upgrade PostgreSQL
    /// without a failover fighting them.
    pub pause: bool,
    /// Bytes. A replica further behind the leader's last known WAL position
    /// than this is not promoted automatically: losing that much acknowledged
    /// work is judged worse than staying unavailable until a human decides.
    pub maximum_lag_on_failover: u64,
    /// Commits wait for standbys listed in the `sync` key, so that a failover
    /// never loses an acknowledged commit.
    pub synchronous_mode: bool,
    /// With no synchronous standby available, block commits rather than fall
    /// back to asynchronous replication: durability over availability.
    pub synchronous_mode_strict: bool,
    /// How many standbys must confirm each commit in synchronous mode.
    pub synchronous_node_count: u32,
    /// Lets a leader that loses the DCS keep running while every member
    /// still confirms it is the leader, instead of fencing itself.
    pub failsafe_mode: bool,
    /// Seconds the leader keeps the replication slot of a member that has
    /// vanished from the DCS, so that it can resume streaming when it returns
    /// instead of being re-cloned.
    pub member_slots_ttl: u64,
    /// Seconds: how far ahead a switchover may be scheduled. A request
    /// further ahead is refused by the API and dropped by the leader.
    pub scheduled_switchover_horizon: u64,
    /// PostgreSQL settings applied on every node.
    pub postgresql: PgDynamic,
}

impl Default for DynamicConfig {
    fn default() -> Self {
        DynamicConfig {
            pause: false,
            maximum_lag_on_failover: DEFAULT_MAXIMUM_LAG_ON_FAILOVER,
            synchronous_mode: false,
            synchronous_mode_strict: false,
            synchronous_node_count: 1,
            failsafe_mode: false,
            member_slots_ttl: DEFAULT_MEMBER_SLOTS_TTL,
            scheduled_switchover_horizon: DEFAULT_SCHEDULED_SWITCHOVER_HORIZON,
            postgresql: PgDynamic::default(),
        }
    }
}

/// The `postgresql` section, a struct rather than a bare map so that more
/// sections (e.g. `pg_hba`) can be added later without changing the shape.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PgDynamic {
    /// Parameter name to value. JSON values rather than strings so that an
    /// operator may write `200` or `true` as naturally as `"1GB"`; only
    /// strings, numbers and booleans mean something to PostgreSQL.
    pub parameters: BTreeMap<String, Value>,
}

/// Why a dynamic configuration was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigProblem {
    /// Dotted path of the offending key, e.g.
    /// `postgresql.parameters.wal_level`; empty when the document as a whole
    /// is wrong (not a JSON object).
    pub key: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl ConfigProblem {
    fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigProblem {
            key: key.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.key, self.message)
        }
    }
}

impl std::error::Error for ConfigProblem {}

/// PostgreSQL parameters whose change is pending until the next restart,
/// split from those a reload applies at once, so that the agent can reload
/// right away and report the rest as "restart pending" (as Patroni does).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ParameterChanges {
    /// `(name, new value)` pairs a reload applies, sorted by name.
    pub reload: Vec<(String, String)>,
    /// `(name, new value)` pairs that need a server restart, sorted by name.
    pub restart: Vec<(String, String)>,
}

impl DynamicConfig {
    /// Parses and validates the `config` key's JSON. Type errors and unknown
    /// keys name the offending key: serde alone would only say "expected a
    /// boolean", which does not tell the operator where.
    pub fn from_json(value: &Value) -> Result<DynamicConfig, ConfigProblem> {
        let Value::Object(map) = value else {
            return Err(ConfigProblem::new(
                "",
                format!(
                    "the dynamic configuration must be a JSON object, found {}; \
                     write {{}} for the defaults",
                    json_kind(value)
                ),
            ));
        };
        // serde's derived structs also accept an array as positional fields;
        // for a configuration that is only ever a mistake.
        if let Some(pg) = map.get("postgresql")
            && !pg.is_object()
        {
            return Err(ConfigProblem::new(
                "postgresql",
                format!(
                    "expected an object such as {{\"parameters\": {{\"work_mem\": \"64MB\"}}}}, \
                     found {}",
                    json_kind(pg)
                ),
            ));
        }
        let config = match DynamicConfig::deserialize(value) {
            Ok(config) => config,
            Err(whole) => return Err(locate_serde_problem(map, whole)),
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks the rules serde cannot express. Called by `from_json`; call it
    /// again after changing a parsed configuration in code.
    pub fn validate(&self) -> Result<(), ConfigProblem> {
        if self.synchronous_node_count == 0
            || self.synchronous_node_count > MAX_SYNCHRONOUS_NODE_COUNT
        {
            return Err(ConfigProblem::new(
                "synchronous_node_count",
                format!(
                    "{} is out of range; set a number of standbys from 1 to \
                     {MAX_SYNCHRONOUS_NODE_COUNT}",
                    self.synchronous_node_count
                ),
            ));
        }
        if self.synchronous_mode_strict && !self.synchronous_mode {
            return Err(ConfigProblem::new(
                "synchronous_mode_strict",
                "only has a meaning in synchronous mode; set synchronous_mode to true \
                 as well, or synchronous_mode_strict to false",
            ));
        }
        if self.maximum_lag_on_failover > MAX_MAXIMUM_LAG_ON_FAILOVER {
            return Err(ConfigProblem::new(
                "maximum_lag_on_failover",
                format!(
                    "{} bytes is more than 1 TiB ({MAX_MAXIMUM_LAG_ON_FAILOVER}); set a \
                     smaller limit, and use a manual failover to promote a replica \
                     that is further behind",
                    self.maximum_lag_on_failover
                ),
            ));
        }
        if self.member_slots_ttl > MAX_MEMBER_SLOTS_TTL {
            return Err(ConfigProblem::new(
                "member_slots_ttl",
                format!(
                    "{} seconds is more than 7 days ({MAX_MEMBER_SLOTS_TTL}): the slot \
                     would pin that much WAL on the leader; set a shorter time",
                    self.member_slots_ttl
                ),
            ));
        }
        if !(60..=MAX_SCHEDULED_SWITCHOVER_HORIZON).contains(&self.scheduled_switchover_horizon) {
            return Err(ConfigProblem::new(
                "scheduled_switchover_horizon",
                format!(
                    "{} seconds is out of range; set from 60 (a minute) to \
                     {MAX_SCHEDULED_SWITCHOVER_HORIZON} (a year)",
                    self.scheduled_switchover_horizon
                ),
            ));
        }
        for (name, value) in &self.postgresql.parameters {
            check_parameter(name, value)?;
        }
        Ok(())
    }

    /// Which parameters differ from what the server currently runs with
    /// (`applied`: name to value as `SHOW` reports it). The comparison is on
    /// PostgreSQL's text form, with booleans compared by meaning (`on` and
    /// `true` are the same), so the caller should pass the values the server
    /// reports rather than its own normalised ones. A parameter missing from
    /// `applied` counts as changed. Parameters that are in `applied` but no
    /// longer in the configuration are not reported: resetting them is the
    /// caller's decision.
    /// The PostgreSQL parameters as configuration text (validated values
    /// always render).
    pub fn parameter_texts(&self) -> BTreeMap<String, String> {
        self.postgresql
            .parameters
            .iter()
            .filter_map(|(name, value)| Some((name.clone(), pg_text(value)?)))
            .collect()
    }

    pub fn changed_parameters(&self, applied: &BTreeMap<String, String>) -> ParameterChanges {
        let mut changes = ParameterChanges::default();
        for (name, value) in &self.postgresql.parameters {
            // `validate` refuses values PostgreSQL cannot take; skip them
            // rather than guess a text form for an unvalidated configuration.
            let Some(text) = pg_text(value) else {
                continue;
            };
            if applied
                .get(name)
                .is_some_and(|current| same_setting(current, &text))
            {
                continue;
            }
            let change = (name.clone(), text);
            if restart_required(name) {
                changes.restart.push(change);
            } else {
                changes.reload.push(change);
            }
        }
        changes
    }
}

/// RFC 7396 JSON merge patch, the semantics of `PATCH /config`: `null`
/// deletes a key, objects merge recursively, anything else replaces. It lets
/// an operator change one parameter without resending (and racing on) the
/// whole document.
pub fn merge_patch(base: &Value, patch: &Value) -> Value {
    let Value::Object(patch) = patch else {
        return patch.clone();
    };
    let mut merged = match base {
        Value::Object(base) => base.clone(),
        _ => Map::new(),
    };
    for (name, value) in patch {
        if value.is_null() {
            merged.remove(name);
        } else {
            let old = merged.get(name).unwrap_or(&Value::Null);
            let new = merge_patch(old, value);
            merged.insert(name.clone(), new);
        }
    }
    Value::Object(merged)
}

/// The postmaster-context parameters of PostgreSQL 15 (`SELECT name FROM
/// pg_settings WHERE context = 'postmaster'` on 15.18), sorted for binary
/// search. A list rather than a query because the decision is needed before
/// the server runs; other major versions differ slightly (a parameter that
/// moved context is at worst reported as needing a reload it cannot get, or a
/// restart it does not need).
const POSTMASTER_PARAMETERS: &[&str] = &[
    "archive_mode",
    "autovacuum_freeze_max_age",
    "autovacuum_max_workers",
    "autovacuum_multixact_freeze_max_age",
    "bonjour",
    "bonjour_name",
    "cluster_name",
    "config_file",
    "data_directory",
    "data_sync_retry",
    "dynamic_shared_memory_type",
    "event_source",
    "external_pid_file",
    "hba_file",
    "hot_standby",
    "huge_page_size",
    "huge_pages",
    "ident_file",
    "ignore_invalid_pages",
    "jit_provider",
    "listen_addresses",
    "logging_collector",
    "max_connections",
    "max_files_per_process",
    "max_locks_per_transaction",
    "max_logical_replication_workers",
    "max_pred_locks_per_transaction",
    "max_prepared_transactions",
    "max_replication_slots",
    "max_wal_senders",
    "max_worker_processes",
    "min_dynamic_shared_memory",
    "old_snapshot_threshold",
    "port",
    "recovery_target",
    "recovery_target_action",
    "recovery_target_inclusive",
    "recovery_target_lsn",
    "recovery_target_name",
    "recovery_target_time",
    "recovery_target_timeline",
    "recovery_target_xid",
    "shared_buffers",
    "shared_memory_type",
    "shared_preload_libraries",
    "superuser_reserved_connections",
    "track_activity_query_size",
    "track_commit_timestamp",
    "unix_socket_directories",
    "unix_socket_group",
    "unix_socket_permissions",
    "wal_buffers",
    "wal_decode_buffer_size",
    "wal_level",
    "wal_log_hints",
];

/// Whether changing a PostgreSQL parameter takes a server restart rather
/// than a reload, following PostgreSQL 15 (see `POSTMASTER_PARAMETERS`).
/// Names are matched case-insensitively, as PostgreSQL does.
pub fn restart_required(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    POSTMASTER_PARAMETERS.binary_search(&name.as_str()).is_ok()
}

/// Finds the entry that made the whole document fail to deserialize, by
/// deserializing each entry alone (every field has a default, so an entry
/// fails alone exactly when it is at fault). Descends into `postgresql` so
/// that `postgresql.params` is named rather than `postgresql`.
fn locate_serde_problem(map: &Map<String, Value>, whole: serde_json::Error) -> ConfigProblem {
    let Some((key, error)) = first_bad_entry::<DynamicConfig>(map) else {
        return ConfigProblem::new("", serde_message("", &whole));
    };
    if let Some(Value::Object(pg)) = map.get(&key)
        && key == "postgresql"
        && let Some((inner, inner_error)) = first_bad_entry::<PgDynamic>(pg)
    {
        let message = serde_message(&inner, &inner_error);
        return ConfigProblem::new(format!("postgresql.{inner}"), message);
    }
    let message = serde_message(&key, &error);
    ConfigProblem::new(key, message)
}

fn first_bad_entry<T: DeserializeOwned>(
    map: &Map<String, Value>,
) -> Option<(String, serde_json::Error)> {
    map.iter().find_map(|(key, value)| {
        let alone = Value::Object(Map::from_iter([(key.clone(), value.clone())]));
        T::deserialize(&alone)
            .err()
            .map(|error| (key.clone(), error))
    })
}

/// serde's own words say what it expected; add what to do about it.
fn serde_message(key: &str, error: &serde_json::Error) -> String {
    let text = error.to_string();
    if text.starts_with("unknown field") {
        if matches!(
            key,
            "ttl" | "loop_wait" | "retry_timeout" | "renew_interval" | "dcs_timeout"
        ) {
            return format!(
                "timing is not part of the dynamic configuration: set it under \
                 [timing] in each node's file, where mainstay checks at startup that \
                 the node can fence itself before its lease expires ({text})"
            );
        }
        return format!("{text}; remove it or correct its spelling");
    }
    format!("{text}; change the value to that type")
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn check_parameter(name: &str, value: &Value) -> Result<(), ConfigProblem> {
    let key = format!("postgresql.parameters.{name}");
    if !valid_parameter_name(name) {
        return Err(ConfigProblem::new(
            key,
            format!(
                "{name:?} is not a PostgreSQL parameter name; names are lowercase \
                 letters, digits, '_' and '.', and do not start with a digit"
            ),
        ));
    }
    let Some(text) = pg_text(value) else {
        return Err(ConfigProblem::new(
            key,
            format!(
                "PostgreSQL cannot take {} as a value; write a string, a number or \
                 a boolean, or remove the parameter",
                json_kind(value)
            ),
        ));
    };
    // A configuration file holds one setting per line: a line break would
    // end the value and start a setting nobody asked for, and PostgreSQL's
    // parser takes no other control character inside a value either.
    if let Some(bad) = text.chars().find(|c| c.is_control()) {
        return Err(ConfigProblem::new(
            key,
            format!(
                "the value holds the control character {bad:?}, which cannot be written \
                 into a configuration file; remove it (one value, on one line)"
            ),
        ));
    }
    if let Some(reason) = managed_reason(name) {
        return Err(ConfigProblem::new(
            key,
            format!("mainstay manages it: {reason}; remove it from the dynamic configuration"),
        ));
    }
    // These two are allowed, but only with values that keep replication
    // working: every node must be able to serve replicas and be rewound.
    let refusal = match name {
        "wal_level"
            if !value
                .as_str()
                .is_some_and(|level| ["replica", "logical"].contains(&level)) =>
        {
            "replicas and pg_rewind need WAL of at least the \"replica\" level; \
             set \"replica\" or \"logical\""
        }
        "max_wal_senders" if integer_value(value).is_none_or(|senders| senders < 2) => {
            "a replica streams through one WAL sender and a clone with pg_basebackup \
             needs another; set an integer of 2 or more, or remove it to keep \
             mainstay's default"
        }
        _ => return Ok(()),
    };
    Err(ConfigProblem::new(
        key,
        format!("{value} is refused because mainstay manages it: {refusal}"),
    ))
}

/// The parameters the agent sets from each node's file or from the cluster's
/// state, with why: a cluster-wide value would be overwritten or, worse,
/// break replication on every node at once.
fn managed_reason(name: &str) -> Option<&'static str> {
    let reason = match name {
        "listen_addresses" => "set `listen` under [postgresql] in each node's file",
        "port" => "set `port` under [postgresql] in each node's file",
        "unix_socket_directories" => {
            "the agent connects through a socket directory it chooses for each node"
        }
        "hba_file" | "ident_file" | "config_file" | "data_directory" => {
            "these follow `data_dir` under [postgresql] in each node's file"
        }
        "primary_conninfo" | "primary_slot_name" => {
            "each replica is pointed at the current leader and its own slot"
        }
        "synchronous_standby_names" => {
            "the leader sets it from the `sync` key; use synchronous_mode and \
             synchronous_node_count instead"
        }
        "hot_standby" => "replicas must accept connections so that the agent can probe them",
        "cluster_name" => "it is set for each node so that its processes can be told apart",
        _ => return None,
    };
    Some(reason)
}

fn valid_parameter_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|first| first.is_ascii_lowercase() || first == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '.')
}

/// A JSON value as PostgreSQL's configuration text, or `None` for values no
/// parameter can take.
fn pg_text(value: &Value) -> Option<String> {
    match value {
        Value::String(text) => Some(text.clone()),
        Value::Number(number) => Some(number.to_string()),
        Value::Bool(true) => Some("on".to_string()),
        Value::Bool(false) => Some("off".to_string()),
        Value::Null | Value::Array(_) | Value::Object(_) => None,
    }
}

fn integer_value(value: &Value) -> Option<i64> {
    match value {
        Value::Number(number) => number.as_i64(),
        Value::String(text) => text.trim().parse().ok(),
        _ => None,
    }
}

fn same_setting(current: &str, wanted: &str) -> bool {
    current == wanted || matches!((pg_bool(current), pg_bool(wanted)), (Some(a), Some(b)) if a == b)
}

/// PostgreSQL's spellings of a boolean (its unique-prefix forms aside).
fn pg_bool(text: &str) -> Option<bool> {
    match text.trim().to_ascii_lowercase().as_str() {
        "on" | "true" | "yes" | "1" => Some(true),
        "off" | "false" | "no" | "0" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
