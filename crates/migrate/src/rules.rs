//! One rule per Patroni setting: where it goes in mainstay, or why it
//! goes nowhere. A key no rule knows is unmapped.

use crate::params::{self, ClusterParameter, Local, Origin};
use crate::values::{boolean, host_and_port, seconds, toml_scalar};
use crate::{MigrateError, Table, words};
use serde_json::{Map, Value as Json, json};

/// What became of a setting that was not mapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Disposition {
    /// mainstay does it another way, or it only matters when Patroni
    /// creates a cluster: nothing is lost.
    Dropped,
    /// Its behaviour would be lost: refused unless `--accept-unmapped`.
    Unmapped,
}

pub enum Outcome {
    Mapped,
    Note(Disposition, String),
}

fn dropped(reason: &str) -> Result<Outcome, MigrateError> {
    Ok(Outcome::Note(Disposition::Dropped, reason.into()))
}

fn unmapped(reason: &str) -> Result<Outcome, MigrateError> {
    Ok(Outcome::Note(Disposition::Unmapped, reason.into()))
}

/// What the mapped settings build up.
#[derive(Default)]
pub struct Output {
    etcd: Table,
    postgresql: Table,
    parameters: Table,
    api: Table,
    watchdog: Table,
    tags: Table,
    callbacks: Table,
    dynamic: Map<String, Json>,
    /// What Patroni ran for the parameters it takes only cluster-wide.
    pub cluster: Vec<ClusterParameter>,
    /// Where the dynamic configuration comes from, as notes name it.
    source: &'static str,
}

fn bad(key: &str, reason: impl Into<String>) -> MigrateError {
    MigrateError::Bad {
        key: key.into(),
        reason: reason.into(),
    }
}

fn text<'a>(key: &str, value: &'a Json) -> Result<&'a str, MigrateError> {
    value
        .as_str()
        .ok_or_else(|| bad(key, format!("{value} is not text")))
}

fn toml_text(value: &str) -> toml::Value {
    toml::Value::String(value.into())
}

/// `hosts` as Patroni takes it: a list, or one comma-separated string.
fn endpoints(
    key: &str,
    value: &Json,
    whole: &Json,
    section: &str,
) -> Result<Vec<String>, MigrateError> {
    let scheme = whole
        .pointer(&format!("/{section}/protocol"))
        .and_then(Json::as_str)
        .unwrap_or("http");
    let hosts: Vec<String> = match value {
        Json::Array(items) => items
            .iter()
            .map(|h| text(key, h).map(String::from))
            .collect::<Result<_, _>>()?,
        Json::String(s) => s.split(',').map(|h| h.trim().to_string()).collect(),
        other => return Err(bad(key, format!("{other} is neither a list nor text"))),
    };
    hosts
        .iter()
        .filter(|h| !h.is_empty())
        .map(|h| {
            if h.contains("://") {
                Ok(h.clone())
            } else {
                let (host, port) = host_and_port(h).map_err(|why| bad(key, why))?;
                let host = if host.contains(':') {
                    format!("[{host}]")
                } else {
                    host
                };
                Ok(format!("{scheme}://{host}:{}", port.unwrap_or(2379)))
            }
        })
        .collect()
}

/// Applies the rule for `key`.
pub fn apply(
    key: &str,
    value: &Json,
    whole: &Json,
    out: &mut Output,
) -> Result<Outcome, MigrateError> {
    let parts: Vec<&str> = key.split('.').collect();
    match parts.as_slice() {
        ["scope"] | ["name"] => Ok(Outcome::Mapped),
        ["namespace"] => dropped(
            "mainstay keeps its keys under /mainstay/<cluster>; Patroni's stay where they are \
             until you delete them",
        ),
        ["log", ..] => dropped("mainstay logs to standard error (the journal under systemd)"),
        ["ctl", ..] => dropped("`mainstay ctl` reads --config or --url"),

        ["restapi", "listen"] => {
            out.api
                .insert("listen".into(), toml_text(text(key, value)?));
            Ok(Outcome::Mapped)
        }
        ["restapi", "connect_address"] => {
            let https = whole.pointer("/restapi/certfile").is_some();
            let scheme = if https { "https" } else { "http" };
            let url = format!("{scheme}://{}", text(key, value)?);
            out.api.insert("connect_url".into(), toml_text(&url));
            Ok(Outcome::Mapped)
        }
        [
            "restapi",
            "authentication",
            field @ ("username" | "password"),
        ] => {
            out.api
                .insert((*field).into(), toml_text(text(key, value)?));
            Ok(Outcome::Mapped)
        }
        ["restapi", file @ ("certfile" | "keyfile" | "cafile")] => {
            let name = match *file {
                "certfile" => "cert_file",
                "keyfile" => "key_file",
                _ => "ca_file",
            };
            out.api.insert(name.into(), toml_text(text(key, value)?));
            Ok(Outcome::Mapped)
        }
        ["restapi", ..] => unmapped(
            "mainstay's API has listen, connect_url, basic credentials or a token, and a \
             certificate, key and CA; nothing else",
        ),

        [section @ ("etcd3" | "etcd"), field] => {
            let v2 = *section == "etcd";
            match *field {
                "hosts" | "host" => {
                    let mut list = endpoints(key, value, whole, section)?;
                    if let Some(toml::Value::Array(existing)) = out.etcd.get("endpoints") {
                        let mut all: Vec<String> = existing
                            .iter()
                            .filter_map(|v| v.as_str().map(String::from))
                            .collect();
                        all.append(&mut list);
                        list = all;
                    }
                    out.etcd.insert(
                        "endpoints".into(),
                        toml::Value::Array(list.iter().map(|e| toml_text(e)).collect()),
                    );
                    if v2 {
                        return dropped(
                            "mapped to [etcd] endpoints: mainstay speaks etcd's v3 API, which \
                             every etcd 3 server also serves",
                        );
                    }
                    Ok(Outcome::Mapped)
                }
                "protocol" => Ok(Outcome::Mapped),
                "cacert" | "cert" | "key" | "username" | "password" => {
                    let name = match *field {
                        "cacert" => "ca_file",
                        "cert" => "cert_file",
                        "key" => "key_file",
                        other => other,
                    };
                    out.etcd.insert(name.into(), toml_text(text(key, value)?));
                    Ok(Outcome::Mapped)
                }
                "retry_timeout" => {
                    dropped("mainstay bounds each etcd request by [timing] dcs_timeout")
                }
                _ => unmapped(
                    "mainstay reaches etcd by a list of endpoints only (no SRV records, proxy or discovery)",
                ),
            }
        }
        [
            "consul" | "zookeeper" | "kubernetes" | "exhibitor" | "raft",
            ..,
        ] => {
            unmapped("mainstay keeps its state in etcd only: run etcd (or `[etcd] member = true`)")
        }

        ["bootstrap", "dcs", rest @ ..] => dcs_setting(key, rest, value, out),
        ["bootstrap", ..] => dropped(
            "used only when Patroni creates a cluster; the migration takes over the existing \
             data and never creates one",
        ),

        ["postgresql", rest @ ..] => postgresql_setting(key, rest, value, whole, out),

        ["watchdog", field @ ("mode" | "device")] => {
            let mut v = text(key, value)?.to_string();
            if *field == "mode" && v == "disabled" {
                v = "off".into();
            }
            out.watchdog.insert((*field).into(), toml_text(&v));
            Ok(Outcome::Mapped)
        }
        ["watchdog", "safety_margin"] => dropped(
            "Patroni's margin is counted against its own ttl (30 s by default); mainstay arms \
             the watchdog from its fencing deadline (set [watchdog] safety_margin, below the \
             ttl, if the device needs one)",
        ),
        ["watchdog", ..] => unmapped("mainstay's watchdog takes mode, device and safety_margin"),

        ["tags", name] => tag(key, name, value, out),
        ["citus", ..] => unmapped("mainstay does not manage Citus clusters"),
        _ => unmapped("not a setting mainstay knows"),
    }
}

/// A setting of the cluster-wide configuration: `bootstrap.dcs` in the
/// file, or Patroni's running one (`GET /config`).
pub fn dcs_setting(
    key: &str,
    rest: &[&str],
    value: &Json,
    out: &mut Output,
) -> Result<Outcome, MigrateError> {
    // Unset (a merge patch's null) or empty: nothing to carry.
    let empty = value.is_null() || value.as_object().is_some_and(Map::is_empty);
    if empty && matches!(rest, [] | ["postgresql"] | ["postgresql", "parameters"]) {
        return Ok(Outcome::Mapped);
    }
    match rest {
        ["ttl" | "loop_wait" | "retry_timeout"] => dropped(
            "timing is set per node in [timing] (mainstay's default profile: ttl 4 s, \
             loop_wait 1 s), where each node checks it can fence itself in time",
        ),
        [name @ ("maximum_lag_on_failover" | "synchronous_node_count")] => {
            let n = value
                .as_u64()
                .ok_or_else(|| bad(key, format!("{value} is not a whole number")))?;
            out.dynamic.insert((*name).into(), json!(n));
            Ok(Outcome::Mapped)
        }
        ["member_slots_ttl"] => {
            let secs =
                seconds(value).ok_or_else(|| bad(key, format!("{value} is not a duration")))?;
            out.dynamic.insert("member_slots_ttl".into(), json!(secs));
            Ok(Outcome::Mapped)
        }
        [name @ ("synchronous_mode_strict" | "failsafe_mode" | "pause")] => {
            let on = boolean(value).ok_or_else(|| bad(key, format!("{value} is not a boolean")))?;
            out.dynamic.insert((*name).into(), json!(on));
            Ok(Outcome::Mapped)
        }
        ["synchronous_mode"] => {
            if value
                .as_str()
                .is_some_and(|s| s.eq_ignore_ascii_case("quorum"))
            {
                out.dynamic.insert("synchronous_mode".into(), json!(true));
                return unmapped(
                    "quorum mode: mainstay's synchronous mode waits for exactly \
                     synchronous_node_count standbys (Patroni's `on`); mapped to true",
                );
            }
            let on = boolean(value).ok_or_else(|| bad(key, format!("{value} is not a boolean")))?;
            out.dynamic.insert("synchronous_mode".into(), json!(on));
            Ok(Outcome::Mapped)
        }
        ["postgresql", "parameters", name] if params::is_command_line(name) => {
            Ok(cluster_wide(name, value, out))
        }
        ["postgresql", "parameters", name] => {
            let params = out
                .dynamic
                .entry("postgresql")
                .or_insert_with(|| json!({"parameters": {}}));
            params["parameters"][*name] = value.clone();
            Ok(Outcome::Mapped)
        }
        ["postgresql", "use_pg_rewind"] => dropped(
            "mainstay rewinds a diverged former primary itself (it needs wal_log_hints or \
             data checksums, as pg_rewind does)",
        ),
        ["postgresql", "use_slots"] => {
            if boolean(value) == Some(false) {
                unmapped("mainstay always streams through replication slots")
            } else {
                dropped("mainstay always streams through replication slots")
            }
        }
        ["postgresql", "pg_hba"] => dropped(
            "pg_hba.conf stays in the data directory as Patroni last wrote it; mainstay does \
             not rewrite it (edit it there)",
        ),
        ["check_timeline" | "max_timelines_history"] => {
            dropped("mainstay checks timelines itself and keeps its own history")
        }
        [
            "master_start_timeout"
            | "primary_start_timeout"
            | "master_stop_timeout"
            | "primary_stop_timeout",
        ] => dropped("mainstay's start and stop bounds follow its ttl"),
        _ => unmapped(
            "no mainstay dynamic setting does this (slots, standby clusters, recovery settings)",
        ),
    }
}

fn postgresql_setting(
    key: &str,
    rest: &[&str],
    value: &Json,
    whole: &Json,
    out: &mut Output,
) -> Result<Outcome, MigrateError> {
    match rest {
        ["listen"] => {
            let listen = text(key, value)?;
            // "host1,host2:port": PostgreSQL's listen_addresses and the port.
            let (hosts, port) = match listen.rsplit_once(':') {
                Some((hosts, port)) if !hosts.ends_with(':') && !port.contains(']') => {
                    let port = port
                        .parse::<u16>()
                        .map_err(|_| bad(key, format!("{port:?} is not a port")))?;
                    (hosts, Some(port))
                }
                _ => (listen, None),
            };
            let hosts = hosts.trim_start_matches('[').trim_end_matches(']');
            let hosts = if hosts == "*" { "0.0.0.0" } else { hosts };
            out.postgresql.insert("listen".into(), toml_text(hosts));
            if let Some(port) = port {
                out.postgresql
                    .insert("port".into(), toml::Value::Integer(port.into()));
            }
            Ok(Outcome::Mapped)
        }
        ["connect_address"] => {
            let (host, _) = host_and_port(text(key, value)?).map_err(|why| bad(key, why))?;
            out.postgresql
                .insert("connect_address".into(), toml_text(&host));
            Ok(Outcome::Mapped)
        }
        [field @ ("data_dir" | "bin_dir")] => {
            out.postgresql
                .insert((*field).into(), toml_text(text(key, value)?));
            Ok(Outcome::Mapped)
        }
        ["config_dir"] => {
            let same = whole.pointer("/postgresql/data_dir") == Some(value);
            if same {
                dropped("the data directory, as mainstay has it")
            } else {
                unmapped("mainstay keeps postgresql.conf in the data directory")
            }
        }
        [
            "authentication",
            role @ ("superuser" | "replication" | "rewind"),
            field @ ("username" | "password"),
        ] => {
            let entry = out
                .postgresql
                .entry((*role).to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if let toml::Value::Table(t) = entry {
                t.insert((*field).into(), toml_text(text(key, value)?));
            }
            Ok(Outcome::Mapped)
        }
        ["authentication", ..] => unmapped(
            "mainstay connects with a user name and password only (no client certificates or \
             sslmode)",
        ),
        ["parameters", name] if params::is_command_line(name) => {
            let ignored = match params::local(name, &out.cluster) {
                Some(Local::Ran(ran)) => format!(
                    "Patroni takes it only from the cluster-wide configuration and ignored this \
                     node's {value}: it ran {}, which the dynamic configuration carries",
                    ran.describe(out.source)
                ),
                Some(Local::Derived(why)) => why.to_string(),
                None => "Patroni ignored it".to_string(),
            };
            Ok(Outcome::Note(Disposition::Dropped, ignored))
        }
        ["parameters", name] => {
            let scalar = toml_scalar(value)
                .ok_or_else(|| bad(key, format!("{value} is not a parameter value")))?;
            out.parameters.insert((*name).into(), scalar);
            Ok(Outcome::Mapped)
        }
        [
            "callbacks",
            hook @ ("on_start" | "on_stop" | "on_role_change"),
        ] => {
            let argv: Vec<toml::Value> = words(text(key, value)?)
                .iter()
                .map(|w| toml_text(w))
                .collect();
            out.callbacks
                .insert((*hook).into(), toml::Value::Array(argv));
            Ok(Outcome::Mapped)
        }
        ["callbacks", ..] => unmapped("mainstay calls on_start, on_stop and on_role_change only"),
        ["pgpass"] => dropped("mainstay writes its own password file"),
        ["use_unix_socket" | "use_unix_socket_repl"] => {
            dropped("mainstay connects over TCP (127.0.0.1 on its own node)")
        }
        ["pg_hba"] | ["pg_ident"] => dropped(
            "the file stays in the data directory as Patroni last wrote it; mainstay does not \
             rewrite it (edit it there)",
        ),
        ["use_pg_rewind"] => dropped("mainstay rewinds a diverged former primary itself"),
        ["pg_ctl_timeout"] => dropped("mainstay's start and stop bounds follow its ttl"),
        ["create_replica_methods"] => {
            let basebackup_only = value
                .as_array()
                .is_some_and(|m| m.len() == 1 && m[0] == "basebackup");
            if basebackup_only {
                dropped("mainstay clones a replica with pg_basebackup from the leader")
            } else {
                unmapped("mainstay clones a replica with pg_basebackup from the leader only")
            }
        }
        [
            "remove_data_directory_on_rewind_failure"
            | "remove_data_directory_on_diverged_timelines",
        ] => {
            dropped("mainstay never deletes a data directory: it moves it aside and clones afresh")
        }
        _ => unmapped("no mainstay [postgresql] setting does this"),
    }
}

/// A cluster-wide value of a parameter Patroni passes on the postmaster's
/// command line: what ran is in `out.cluster`, written out at the end.
fn cluster_wide(name: &str, value: &Json, out: &Output) -> Outcome {
    let ran = |wanted: &str| out.cluster.iter().find(|p| p.name == wanted);
    let lower = name.to_ascii_lowercase();
    let reason = if let Some(why) = params::derived(&lower) {
        why.to_string()
    } else if lower == "wal_keep_segments" {
        let size = ran("wal_keep_size").map(|p| p.describe(out.source));
        format!(
            "PostgreSQL 15 has no wal_keep_segments: Patroni ran {}, which the dynamic \
             configuration carries",
            size.unwrap_or_default()
        )
    } else {
        match ran(&lower) {
            Some(p) if p.origin == Origin::Configured => return Outcome::Mapped,
            Some(p) => format!(
                "Patroni refused {value}: it ran {}, which the dynamic configuration carries",
                p.describe(out.source)
            ),
            None => "Patroni ignored it".to_string(),
        }
    };
    Outcome::Note(Disposition::Dropped, reason)
}

/// Patroni's tags: the ones mainstay shares, its `failover_priority`, and
/// the operator's own.
fn tag(key: &str, name: &str, value: &Json, out: &mut Output) -> Result<Outcome, MigrateError> {
    match name {
        "nofailover" | "noloadbalance" | "nosync" => {
            let on = boolean(value).ok_or_else(|| bad(key, format!("{value} is not a boolean")))?;
            out.tags.insert(name.into(), toml::Value::Boolean(on));
            Ok(Outcome::Mapped)
        }
        "failover_priority" => {
            let priority = value
                .as_i64()
                .ok_or_else(|| bad(key, format!("{value} is not a whole number")))?;
            if priority <= 0 {
                out.tags
                    .insert("nofailover".into(), toml::Value::Boolean(true));
            } else {
                let priority = i32::try_from(priority).map_err(|_| bad(key, "too large"))?;
                out.tags
                    .insert("priority".into(), toml::Value::Integer(priority.into()));
            }
            Ok(Outcome::Mapped)
        }
        "clonefrom" | "nostream" if boolean(value) == Some(false) => {
            dropped("false is mainstay's behaviour")
        }
        "replicatefrom" | "clonefrom" | "nostream" | "sync_priority" => unmapped(
            "mainstay replicas stream from the leader and are cloned from it; synchronous \
             standbys are chosen by WAL position (use nosync to keep one out)",
        ),
        _ => match toml_scalar(value) {
            Some(scalar) => {
                out.tags.insert(name.into(), scalar);
                Ok(Outcome::Mapped)
            }
            None => unmapped("a tag is a string, a number or a boolean"),
        },
    }
}

impl Output {
    pub fn new(cluster: Vec<ClusterParameter>, source: &'static str) -> Output {
        Output {
            cluster,
            source,
            ..Output::default()
        }
    }

    /// The dynamic configuration, with every parameter Patroni takes only
    /// cluster-wide set to what it ran: mainstay's own defaults may differ
    /// one day, and an explicit value keeps what runs.
    pub fn into_dynamic(mut self) -> Map<String, Json> {
        let section = self
            .dynamic
            .entry("postgresql")
            .or_insert_with(|| json!({"parameters": {}}));
        for ran in &self.cluster {
            section["parameters"][ran.name] = ran.value.clone();
        }
        self.dynamic
    }

    /// The node file, in the order an operator reads it.
    pub fn node_file(&self, top: &Map<String, Json>) -> Result<String, MigrateError> {
        for role in ["superuser", "replication"] {
            let complete = matches!(
                self.postgresql.get(role),
                Some(toml::Value::Table(t)) if t.contains_key("username") && t.contains_key("password")
            );
            if !complete {
                return Err(bad(
                    &format!("postgresql.authentication.{role}"),
                    "mainstay needs its user name and password: add them to the Patroni file",
                ));
            }
        }
        if !self.etcd.contains_key("endpoints") {
            return Err(bad(
                "etcd3.hosts",
                "no etcd endpoint: mainstay keeps its state in etcd (give etcd3.hosts)",
            ));
        }
        let mut text = String::new();
        for name in ["scope", "name"] {
            let value = top[name].as_str().unwrap_or_default();
            let key = if name == "scope" { "cluster" } else { "name" };
            text.push_str(&format!("{key} = {}\n", toml_text(value)));
        }
        let mut postgresql = self.postgresql.clone();
        // Patroni ran every node with the scope as cluster_name (process
        // titles, the default application_name); mainstay sets none.
        let mut parameters = self.parameters.clone();
        parameters.insert(
            "cluster_name".into(),
            toml_text(top["scope"].as_str().unwrap_or_default()),
        );
        postgresql.insert(
            "parameters".into(),
            toml::Value::Table(parameters.into_iter().collect()),
        );
        for (section, table) in [
            ("etcd", &self.etcd),
            ("postgresql", &postgresql),
            ("api", &self.api),
            ("watchdog", &self.watchdog),
            ("tags", &self.tags),
            ("callbacks", &self.callbacks),
        ] {
            if table.is_empty() {
                continue;
            }
            let mut wrapper = toml::Table::new();
            wrapper.insert(
                section.into(),
                toml::Value::Table(table.clone().into_iter().collect()),
            );
            let rendered = toml::to_string(&wrapper)
                .map_err(|e| bad(section, format!("cannot be written as TOML: {e}")))?;
            text.push('\n');
            text.push_str(&rendered);
        }
        Ok(text)
    }
}
