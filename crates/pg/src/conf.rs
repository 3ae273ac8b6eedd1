//! Text that mainstay writes for PostgreSQL and libpq: `mainstay.conf`,
//! `primary_conninfo`, pg_hba lines and the password file, with the quoting
//! each format needs. Pure functions, so every escape rule is unit-tested.

use crate::error::{Error, Result};
use crate::settings::{ConnTarget, PgSettings, StartRole};
use mainstay_core::slot_name;
use std::collections::BTreeMap;

/// Name of the file mainstay owns inside the data directory; postgresql.conf
/// includes it, so everything mainstay manages lives in one rewritable place.
pub const MAINSTAY_CONF: &str = "mainstay.conf";
pub const INCLUDE_LINE: &str = "include_if_exists = 'mainstay.conf'";

/// Defaults for every node. Replication-critical values (wal_level, slots,
/// hints for pg_rewind) are here so that any node can become primary.
fn defaults(settings: &PgSettings) -> BTreeMap<String, String> {
    let socket_dir = settings.socket_path().display().to_string();
    [
        ("listen_addresses", settings.listen_host.as_str()),
        ("port", &settings.port.to_string()),
        ("unix_socket_directories", &socket_dir),
        ("wal_level", "replica"),
        ("hot_standby", "on"),
        ("max_wal_senders", "10"),
        ("max_replication_slots", "10"),
        ("wal_keep_size", "128MB"),
        // Bounds the disk a dead replica's slot may pin on the primary.
        ("max_slot_wal_keep_size", "1GB"),
        ("wal_log_hints", "on"),
        ("hot_standby_feedback", "on"),
        ("recovery_target_timeline", "latest"),
        // Short timeouts make a dead peer visible within seconds, not a minute.
        ("wal_receiver_timeout", "5s"),
        ("wal_sender_timeout", "5s"),
        ("wal_retrieve_retry_interval", "1s"),
        ("logging_collector", "off"),
        ("log_destination", "stderr"),
        ("log_line_prefix", "%m [%p] "),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// PostgreSQL's own defaults of the settings a standby needs at least as
/// high as its primary's (15).
const STANDBY_MINIMUM_DEFAULTS: [(&str, u64); 5] = [
    ("max_connections", 100),
    ("max_worker_processes", 8),
    ("max_wal_senders", 10),
    ("max_prepared_transactions", 0),
    ("max_locks_per_transaction", 64),
];

/// The whole of `mainstay.conf` for a role. A replica runs the settings in
/// `standby_minimums` (from its control file: the primary's, as last
/// logged) at least that high, whatever is configured: lower, PostgreSQL
/// refuses to start or to promote, and the cluster lowers such a setting
/// safely only by restarting the primary first.
pub fn render_mainstay_conf(
    settings: &PgSettings,
    role: &StartRole,
    standby_minimums: &BTreeMap<String, u64>,
) -> Result<String> {
    let mut values = defaults(settings);
    for (key, value) in &settings.parameters {
        check_parameter_name(key)?;
        values.insert(key.clone(), value.clone());
    }
    if matches!(role, StartRole::Replica { .. }) {
        for (name, default) in STANDBY_MINIMUM_DEFAULTS {
            let Some(&minimum) = standby_minimums.get(name) else {
                continue;
            };
            let configured = match values.get(name) {
                Some(text) => text.trim().parse::<u64>().ok(),
                None => Some(default),
            };
            if configured.is_some_and(|c| c < minimum) {
                values.insert(name.to_string(), minimum.to_string());
            }
        }
    }
    let (conninfo, slot) = match role {
        StartRole::Replica {
            leader: Some(leader),
        } => (
            primary_conninfo(settings, leader),
            slot_name(&settings.node_name),
        ),
        _ => (String::new(), String::new()),
    };
    // Addresses and replication wiring always follow the settings and the
    // role, whatever `parameters` say: the agent relies on them.
    let forced = defaults(settings);
    for key in ["listen_addresses", "port", "unix_socket_directories"] {
        values.insert(key.into(), forced[key].clone());
    }
    values.insert(
        "synchronous_standby_names".into(),
        settings.synchronous_standby_names.clone(),
    );
    values.insert("primary_conninfo".into(), conninfo);
    values.insert("primary_slot_name".into(), slot);

    let mut out = String::from(
        "# Written by mainstay on every start and re-point; edits here are lost.\n\
         # Put settings in mainstay's configuration instead.\n",
    );
    for (key, value) in &values {
        out.push_str(&format!("{key} = {}\n", quote_conf(value)));
    }
    Ok(out)
}

fn check_parameter_name(key: &str) -> Result<()> {
    let ok = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
    if ok {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "PostgreSQL parameter name {key:?} is not valid"
        )))
    }
}

/// A postgresql.conf string literal: backslashes are escapes there too.
pub fn quote_conf(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "''"))
}

/// A libpq conninfo value, quoted only when it has to be.
pub fn quote_conninfo(value: &str) -> String {
    let plain = !value.is_empty()
        && !value
            .chars()
            .any(|c| c.is_whitespace() || c == '\'' || c == '\\');
    if plain {
        value.to_string()
    } else {
        format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
    }
}

/// Builds a conninfo string from pairs.
pub fn conninfo(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={}", quote_conninfo(v)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `primary_conninfo` for streaming from `leader`; the password comes from the
/// passfile so that it never sits in a config file or `pg_stat_wal_receiver`.
pub fn primary_conninfo(settings: &PgSettings, leader: &ConnTarget) -> String {
    let passfile = settings.pgpass_file.display().to_string();
    conninfo(&[
        ("host", &leader.host),
        ("port", &leader.port.to_string()),
        ("user", &settings.replication.user),
        ("passfile", &passfile),
        ("application_name", &settings.node_name),
        ("connect_timeout", "2"),
        ("keepalives", "1"),
        ("keepalives_idle", "5"),
        ("keepalives_interval", "2"),
        ("keepalives_count", "3"),
    ])
}

/// One `.pgpass` field.
fn escape_pgpass(field: &str) -> String {
    field.replace('\\', "\\\\").replace(':', "\\:")
}

/// Password file lines matching any host, port and database.
pub fn render_pgpass(entries: &[(&str, &str)]) -> Result<String> {
    let mut out = String::new();
    for (user, password) in entries {
        if user.contains('\n') || password.contains('\n') {
            return Err(Error::Config(format!(
                "user {user:?} or its password contains a newline"
            )));
        }
        out.push_str(&format!(
            "*:*:*:{}:{}\n",
            escape_pgpass(user),
            escape_pgpass(password)
        ));
    }
    Ok(out)
}

/// A role name as a pg_hba.conf field (quoted, so `all` or `+x` stay literal).
pub fn hba_user(user: &str) -> Result<String> {
    if user.is_empty() || user.contains('"') || user.contains(char::is_whitespace) {
        return Err(Error::Config(format!(
            "user name {user:?} cannot be written to pg_hba.conf"
        )));
    }
    Ok(format!("\"{user}\""))
}

/// Lines appended to pg_hba.conf after initdb: password (SCRAM) access over
/// TCP for replication and for everything else; initdb's own lines keep
/// local peer access for the OS user.
pub fn hba_lines(replication_user: &str) -> Result<String> {
    Ok(format!(
        "\n# Added by mainstay.\nhost replication {} all scram-sha-256\nhost all all all scram-sha-256\n",
        hba_user(replication_user)?
    ))
}

/// An SQL identifier.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// An SQL string literal (standard_conforming_strings is on since 9.1).
pub fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn settings() -> PgSettings {
        let mut s = PgSettings::new(
            "/usr/lib/postgresql/15/bin",
            "/var/lib/mainstay/data",
            "node-1",
        );
        s.port = 5433;
        s.pgpass_file = PathBuf::from("/var/lib/mainstay/pg pass");
        s
    }

    fn leader() -> ConnTarget {
        ConnTarget {
            host: "10.0.0.2".into(),
            port: 5432,
            name: "node-2".into(),
        }
    }

    #[test]
    fn replica_conf_points_at_the_leader_with_our_slot() {
        let conf = render_mainstay_conf(
            &settings(),
            &StartRole::Replica {
                leader: Some(leader()),
            },
            &BTreeMap::new(),
        )
        .unwrap();
        assert!(conf.contains("port = '5433'\n"));
        assert!(conf.contains("primary_slot_name = 'mainstay_node_1'\n"));
        assert!(conf.contains(
            "primary_conninfo = 'host=10.0.0.2 port=5432 user=replicator passfile=''/var/lib/mainstay/pg pass'' \
             application_name=node-1 connect_timeout=2"
        ));
        assert!(conf.contains("unix_socket_directories = '/var/lib/mainstay/node-1.sock'\n"));
    }

    #[test]
    fn a_replica_never_runs_below_its_primarys_minimums() {
        let mut s = settings();
        s.parameters.insert("max_wal_senders".into(), "2".into());
        s.parameters.insert("max_connections".into(), "500".into());
        let minimums: BTreeMap<String, u64> = [
            ("max_wal_senders", 10),
            ("max_connections", 50),
            ("max_prepared_transactions", 7),
            ("max_locks_per_transaction", 64),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let replica = StartRole::Replica {
            leader: Some(leader()),
        };
        let conf = render_mainstay_conf(&s, &replica, &minimums).unwrap();
        // Lowered cluster-wide: the primary's value until it restarted.
        assert!(conf.contains("max_wal_senders = '10'\n"), "{conf}");
        // Higher is fine as configured.
        assert!(conf.contains("max_connections = '500'\n"), "{conf}");
        // Not configured, PostgreSQL's default (0) too low.
        assert!(conf.contains("max_prepared_transactions = '7'\n"), "{conf}");
        // Not configured, the default is enough: left alone.
        assert!(!conf.contains("max_locks_per_transaction"), "{conf}");
        // A primary runs what is configured.
        let conf = render_mainstay_conf(&s, &StartRole::Primary, &minimums).unwrap();
        assert!(conf.contains("max_wal_senders = '2'\n"), "{conf}");
    }

    #[test]
    fn primary_conf_clears_replication_and_parameters_override_defaults() {
        let mut s = settings();
        s.parameters
            .insert("max_slot_wal_keep_size".into(), "4GB".into());
        s.parameters
            .insert("primary_conninfo".into(), "host=evil".into());
        s.parameters.insert("port".into(), "1".into());
        let conf = render_mainstay_conf(&s, &StartRole::Primary, &BTreeMap::new()).unwrap();
        assert!(conf.contains("max_slot_wal_keep_size = '4GB'\n"));
        assert!(!conf.contains("1GB"));
        assert!(conf.contains("primary_conninfo = ''\n"));
        assert!(conf.contains("port = '5433'\n"));
        assert!(conf.contains("primary_slot_name = ''\n"));
        s.parameters.insert("bad name".into(), "x".into());
        assert!(render_mainstay_conf(&s, &StartRole::Primary, &BTreeMap::new()).is_err());
    }

    #[test]
    fn quoting() {
        assert_eq!(quote_conf(r"it's a\b"), r"'it''s a\\b'");
        assert_eq!(quote_conninfo("plain"), "plain");
        assert_eq!(quote_conninfo(""), "''");
        assert_eq!(quote_conninfo(r"a b'c\d"), r"'a b\'c\\d'");
        assert_eq!(quote_ident(r#"we"ird"#), r#""we""ird""#);
        assert_eq!(quote_literal("o'k"), "'o''k'");
    }

    #[test]
    fn pgpass_escapes_colons_and_backslashes() {
        let text = render_pgpass(&[("repl", r"p:a\ss"), ("rewind", "x")]).unwrap();
        assert_eq!(text, "*:*:*:repl:p\\:a\\\\ss\n*:*:*:rewind:x\n");
        assert!(render_pgpass(&[("repl", "two\nlines")]).is_err());
    }

    #[test]
    fn hba_quotes_user_names() {
        assert!(
            hba_lines("replicator")
                .unwrap()
                .contains("host replication \"replicator\" all scram-sha-256")
        );
        assert!(hba_lines("has space").is_err());
    }
}
