//! What a data directory holds, read from `pg_controldata` (the control file is
//! the only state PostgreSQL keeps that is trustworthy while it is stopped).

use crate::error::{Error, Result};
use mainstay_core::types::Lsn;
use std::collections::HashMap;

/// What `data_dir` is, before anything runs in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DataDirState {
    Missing,
    /// Exists and holds nothing: ready for initdb or pg_basebackup.
    Empty,
    Initialized(ControlData),
    /// Exists but cannot be used as is; a human or `move_aside` must act.
    Unusable(String),
}

/// `Database cluster state` from pg_control.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClusterState {
    InProduction,
    ShutDown,
    ShutDownInRecovery,
    InArchiveRecovery,
    InCrashRecovery,
    ShuttingDown,
    /// "starting up" or anything this code does not know.
    Other,
}

impl ClusterState {
    fn from_text(text: &str) -> ClusterState {
        match text {
            "in production" => ClusterState::InProduction,
            "shut down" => ClusterState::ShutDown,
            "shut down in recovery" => ClusterState::ShutDownInRecovery,
            "in archive recovery" => ClusterState::InArchiveRecovery,
            "in crash recovery" => ClusterState::InCrashRecovery,
            "shutting down" => ClusterState::ShuttingDown,
            _ => ClusterState::Other,
        }
    }

    /// Stopped cleanly: pg_rewind accepts it and no WAL is waiting to be replayed.
    pub fn is_clean_shutdown(self) -> bool {
        matches!(
            self,
            ClusterState::ShutDown | ClusterState::ShutDownInRecovery
        )
    }
}

/// The fields of `pg_controldata` that the agent decides on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControlData {
    pub system_identifier: u64,
    pub state: ClusterState,
    pub state_text: String,
    /// `Latest checkpoint's TimeLineID`. Lags behind after a promotion until
    /// the first checkpoint on the new timeline.
    pub timeline: u32,
    pub checkpoint_lsn: Lsn,
    pub redo_lsn: Lsn,
    /// A replica must replay at least this far to be consistent (0/0 if none).
    pub min_recovery_end_lsn: Lsn,
    pub min_recovery_end_timeline: u32,
    pub data_checksums: bool,
    pub wal_log_hints: bool,
    /// The settings a standby may not run lower than its primary (as the
    /// primary last logged them, or this server's own): parameter name to
    /// value. Missing fields (other versions) are left out.
    pub standby_minimums: std::collections::BTreeMap<String, u64>,
}

/// `pg_controldata` field of each setting a standby needs at least as high
/// as its primary's.
const STANDBY_MINIMUMS: [(&str, &str); 5] = [
    ("max_connections", "max_connections setting"),
    ("max_worker_processes", "max_worker_processes setting"),
    ("max_wal_senders", "max_wal_senders setting"),
    ("max_prepared_transactions", "max_prepared_xacts setting"),
    ("max_locks_per_transaction", "max_locks_per_xact setting"),
];

/// Parses `LC_ALL=C pg_controldata` output.
pub fn parse_controldata(text: &str) -> Result<ControlData> {
    let fields: HashMap<&str, &str> = text
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim(), v.trim()))
        .collect();
    let get = |key: &str| {
        fields.get(key).copied().ok_or_else(|| Error::Parse {
            what: "pg_controldata".into(),
            detail: format!("no '{key}' line"),
        })
    };
    let bad = |key: &str, value: &str| Error::Parse {
        what: "pg_controldata".into(),
        detail: format!("'{key}' has unexpected value '{value}'"),
    };
    let number = |key: &str| -> Result<u64> {
        let v = get(key)?;
        v.parse::<u64>().map_err(|_| bad(key, v))
    };
    let lsn = |key: &str| -> Result<Lsn> {
        let v = get(key)?;
        Lsn::parse(v).ok_or_else(|| bad(key, v))
    };
    let state_text = get("Database cluster state")?.to_string();
    Ok(ControlData {
        system_identifier: number("Database system identifier")?,
        state: ClusterState::from_text(&state_text),
        state_text,
        timeline: number("Latest checkpoint's TimeLineID")? as u32,
        checkpoint_lsn: lsn("Latest checkpoint location")?,
        redo_lsn: lsn("Latest checkpoint's REDO location")?,
        min_recovery_end_lsn: lsn("Minimum recovery ending location")?,
        min_recovery_end_timeline: number("Min recovery ending loc's timeline")? as u32,
        data_checksums: number("Data page checksum version")? != 0,
        wal_log_hints: get("wal_log_hints setting")? == "on",
        standby_minimums: STANDBY_MINIMUMS
            .iter()
            .filter_map(|(name, field)| {
                let value = fields.get(field)?.parse::<u64>().ok()?;
                Some((name.to_string(), value))
            })
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
pg_control version number:            1300
Catalog version number:               202209061
Database system identifier:           7301234567890123456
Database cluster state:               shut down in recovery
pg_control last modified:             Mon Jan  1 00:00:00 2024
Latest checkpoint location:           0/3000148
Latest checkpoint's REDO location:    0/3000110
Latest checkpoint's REDO WAL file:    000000020000000000000003
Latest checkpoint's TimeLineID:       2
Latest checkpoint's PrevTimeLineID:   2
Minimum recovery ending location:     0/30001F8
Min recovery ending loc's timeline:   2
wal_log_hints setting:                on
max_connections setting:              50
max_worker_processes setting:         8
max_wal_senders setting:              10
max_prepared_xacts setting:           7
max_locks_per_xact setting:           64
Data page checksum version:           1
Mock authentication nonce:            abc
";

    #[test]
    fn parses_the_fields_the_agent_uses() {
        let c = parse_controldata(SAMPLE).unwrap();
        assert_eq!(c.system_identifier, 7301234567890123456);
        assert_eq!(c.state, ClusterState::ShutDownInRecovery);
        assert!(c.state.is_clean_shutdown());
        assert_eq!(c.timeline, 2);
        assert_eq!(c.checkpoint_lsn, Lsn(0x3000148));
        assert_eq!(c.redo_lsn, Lsn(0x3000110));
        assert_eq!(c.min_recovery_end_lsn, Lsn(0x30001F8));
        assert_eq!(c.min_recovery_end_timeline, 2);
        assert!(c.data_checksums);
        assert!(c.wal_log_hints);
        assert_eq!(c.standby_minimums["max_prepared_transactions"], 7);
        assert_eq!(c.standby_minimums["max_connections"], 50);
        assert_eq!(c.standby_minimums.len(), 5);
    }

    #[test]
    fn system_identifiers_above_i64_max_survive() {
        let text = SAMPLE.replace("7301234567890123456", "18000000000000000000");
        assert_eq!(
            parse_controldata(&text).unwrap().system_identifier,
            18_000_000_000_000_000_000
        );
    }

    #[test]
    fn states_map_and_missing_fields_are_errors() {
        for (text, state) in [
            ("in production", ClusterState::InProduction),
            ("in crash recovery", ClusterState::InCrashRecovery),
            ("starting up", ClusterState::Other),
        ] {
            assert_eq!(ClusterState::from_text(text), state);
        }
        let truncated: String = SAMPLE.lines().take(4).collect::<Vec<_>>().join("\n");
        assert!(parse_controldata(&truncated).is_err());
    }
}
