//! The PostgreSQL parameters Patroni takes only from the cluster-wide
//! (DCS) configuration, as Patroni 4.1.5 does it
//! (`patroni/postgresql/config.py`, `ConfigHandler.CMDLINE_OPTIONS`): it
//! passes them on the postmaster's command line, ignores a node's own
//! `postgresql.parameters` value for them, replaces a cluster-wide value
//! its validator refuses by its default, and runs its default where none
//! is set. mainstay reads them from wherever they are set, so the
//! migration writes the value Patroni ran into the dynamic configuration
//! and drops the node's value: what runs stays the same.

use serde_json::{Map, Value as Json, json};

/// How Patroni checks a cluster-wide value before it uses it.
#[derive(Clone, Copy)]
enum Check {
    /// An integer (PostgreSQL's forms: `0x..`, `0..` octal, a fraction
    /// rounded) of at least this.
    Int(i64),
    /// One of `hot_standby`, `replica`, `logical`, in any case.
    Level,
    Bool,
}

/// Name, Patroni's default (as PostgreSQL 15 gets it: Patroni's
/// `hot_standby` level is `replica` there), and check. `wal_keep_size`
/// comes apart: Patroni derives it from `wal_keep_segments` when unset.
const CLUSTER_WIDE: [(&str, Preset, Check); 9] = [
    ("wal_level", Preset::Text("replica"), Check::Level),
    ("max_connections", Preset::Int(100), Check::Int(25)),
    ("max_wal_senders", Preset::Int(10), Check::Int(3)),
    ("max_prepared_transactions", Preset::Int(0), Check::Int(0)),
    ("max_locks_per_transaction", Preset::Int(64), Check::Int(32)),
    ("track_commit_timestamp", Preset::Text("off"), Check::Bool),
    ("max_replication_slots", Preset::Int(10), Check::Int(4)),
    ("max_worker_processes", Preset::Int(8), Check::Int(2)),
    ("wal_log_hints", Preset::Text("on"), Check::Bool),
];

#[derive(Clone, Copy)]
enum Preset {
    Int(i64),
    Text(&'static str),
}

impl Preset {
    fn json(self) -> Json {
        match self {
            Preset::Int(n) => json!(n),
            Preset::Text(t) => json!(t),
        }
    }
}

/// Patroni's `wal_keep_segments` default: 8 segments of 16 MB.
const WAL_KEEP_SEGMENTS_DEFAULT: i64 = 8;
const WAL_KEEP_SEGMENTS_MIN: i64 = 1;
const WAL_KEEP_SIZE_MIN_MB: i64 = 16;

/// Where the value Patroni ran came from.
#[derive(Clone, Debug, PartialEq)]
pub enum Origin {
    /// The cluster-wide configuration set it.
    Configured,
    /// The cluster-wide configuration set this value, which Patroni's
    /// check refused: it ran its default.
    Refused(Json),
    /// Nothing set it: Patroni's default.
    Default,
    /// `wal_keep_size` from `wal_keep_segments` (16 MB segments).
    FromSegments(Json),
}

/// One parameter as Patroni ran it.
#[derive(Clone, Debug, PartialEq)]
pub struct ClusterParameter {
    pub name: &'static str,
    pub value: Json,
    pub origin: Origin,
}

impl ClusterParameter {
    /// `name = value (where from)`, `source` naming the cluster-wide
    /// configuration read.
    pub fn describe(&self, source: &str) -> String {
        let value = text(&self.value);
        let from = match &self.origin {
            Origin::Configured => source.to_string(),
            Origin::Refused(v) => format!("Patroni's default: it refused {v} from {source}"),
            Origin::Default => "Patroni's default".to_string(),
            Origin::FromSegments(v) => format!("wal_keep_segments {v} x 16MB from {source}"),
        };
        format!("{} = {value} ({from})", self.name)
    }
}

fn text(value: &Json) -> String {
    match value {
        Json::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The value of `name` in Patroni's case-insensitive parameter map.
fn lookup<'a>(parameters: &'a Map<String, Json>, name: &str) -> Option<&'a Json> {
    parameters
        .iter()
        .find(|(k, v)| k.eq_ignore_ascii_case(name) && !v.is_null())
        .map(|(_, v)| v)
}

/// What Patroni ran for each cluster-wide parameter, given the cluster-wide
/// configuration's `postgresql.parameters`.
pub fn resolve(parameters: &Map<String, Json>) -> Vec<ClusterParameter> {
    let mut out = Vec::new();
    for (name, default, check) in CLUSTER_WIDE {
        let (value, origin) = match lookup(parameters, name) {
            None => (default.json(), Origin::Default),
            Some(given) => match accepted(check, given) {
                Some(value) => (value, Origin::Configured),
                None => (default.json(), Origin::Refused(given.clone())),
            },
        };
        out.push(ClusterParameter {
            name,
            value,
            origin,
        });
    }
    out.push(wal_keep_size(parameters));
    out
}

/// PostgreSQL 13 replaced `wal_keep_segments` by `wal_keep_size`; Patroni
/// keeps a valid `wal_keep_size`, else sets it to the segments (its own
/// default 8) times 16 MB.
fn wal_keep_size(parameters: &Map<String, Json>) -> ClusterParameter {
    let name = "wal_keep_size";
    let size = lookup(parameters, name);
    if let Some(given) = size
        && patroni_int(given, true).is_some_and(|mb| mb >= WAL_KEEP_SIZE_MIN_MB)
    {
        let value = patroni_int(given, false).map_or_else(|| given.clone(), |n| json!(n));
        return ClusterParameter {
            name,
            value,
            origin: Origin::Configured,
        };
    }
    let segments = lookup(parameters, "wal_keep_segments")
        .filter(|v| patroni_int(v, false).is_some_and(|n| n >= WAL_KEEP_SEGMENTS_MIN));
    let count = segments
        .and_then(|v| patroni_int(v, false))
        .unwrap_or(WAL_KEEP_SEGMENTS_DEFAULT);
    let value = json!(format!("{}MB", count * 16));
    let origin = match (segments, size) {
        (Some(given), _) => Origin::FromSegments(given.clone()),
        (None, Some(refused)) => Origin::Refused(refused.clone()),
        (None, None) => Origin::Default,
    };
    ClusterParameter {
        name,
        value,
        origin,
    }
}

/// The value Patroni uses when its check accepts `given`: integers as
/// numbers, `hot_standby` as PostgreSQL 15 spells it.
fn accepted(check: Check, given: &Json) -> Option<Json> {
    match check {
        Check::Int(min) => {
            let n = patroni_int(given, false)?;
            (n >= min).then(|| json!(n))
        }
        Check::Level => {
            let level = given.as_str()?.to_ascii_lowercase();
            match level.as_str() {
                "hot_standby" | "replica" => Some(json!("replica")),
                "logical" => Some(json!("logical")),
                _ => None,
            }
        }
        Check::Bool => patroni_bool(given).map(|_| given.clone()),
    }
}

/// Patroni's `parse_bool(str(value))`.
fn patroni_bool(value: &Json) -> Option<bool> {
    let text = match value {
        Json::Bool(b) => b.to_string(),
        Json::Number(n) => n.to_string(),
        Json::String(s) => s.to_ascii_lowercase(),
        _ => return None,
    };
    match text.as_str() {
        "on" | "true" | "yes" | "1" => Some(true),
        "off" | "false" | "no" | "0" => Some(false),
        _ => None,
    }
}

/// Patroni's `parse_int(value, base_unit)`: PostgreSQL's integer forms,
/// a fraction rounded half to even (Python's `round`), and with
/// `megabytes` a memory unit converted to MB. `None` where Patroni's
/// validator would refuse the value.
fn patroni_int(value: &Json, megabytes: bool) -> Option<i64> {
    let text = match value {
        Json::Number(n) => n.to_string(),
        Json::String(s) => s.clone(),
        _ => return None,
    };
    let text = text.trim();
    let (mut number, mut rest) = match strtol(text) {
        Some((n, rest)) => (n as f64, rest),
        None => (f64::NAN, text),
    };
    if number.is_nan() && rest.starts_with('.') || rest.starts_with(['.', 'e', 'E']) {
        (number, rest) = strtod(text)?;
    }
    if number.is_nan() {
        return None;
    }
    let unit = rest.trim();
    if unit.is_empty() {
        return Some(number.round_ties_even() as i64);
    }
    if !megabytes {
        return None;
    }
    let factor = match unit {
        "TB" => 1024.0 * 1024.0,
        "GB" => 1024.0,
        "MB" => 1.0,
        "kB" => 1.0 / 1024.0,
        "B" => 1.0 / (1024.0 * 1024.0),
        _ => return None,
    };
    Some((number * factor).round_ties_even() as i64)
}

/// C's `strtol` with base 0, as Patroni's `strtol`: hexadecimal, octal,
/// then decimal; the number and what follows it.
fn strtol(text: &str) -> Option<(i64, &str)> {
    let (negative, body) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    let digits_end = |s: &str, radix: u32| s.find(|c: char| !c.is_digit(radix)).unwrap_or(s.len());
    let (radix, start) = if (body.starts_with("0x") || body.starts_with("0X"))
        && body[2..].starts_with(|c: char| c.is_ascii_hexdigit())
    {
        (16, 2)
    } else if body.starts_with('0') {
        (8, 1)
    } else {
        (10, 0)
    };
    let end = start + digits_end(&body[start..], radix);
    if end == 0 {
        return None;
    }
    let digits = &body[start..end];
    let magnitude = if digits.is_empty() {
        0
    } else {
        i64::from_str_radix(digits, radix).ok()?
    };
    Some((if negative { -magnitude } else { magnitude }, &body[end..]))
}

/// C's `strtod` for the decimal forms PostgreSQL takes.
fn strtod(text: &str) -> Option<(f64, &str)> {
    let bytes = text.as_bytes();
    let mut end = usize::from(matches!(bytes.first(), Some(b'-' | b'+')));
    let digits = |from: usize| {
        from + bytes[from..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count()
    };
    end = digits(end);
    if bytes.get(end) == Some(&b'.') {
        end = digits(end + 1);
    }
    if matches!(bytes.get(end), Some(b'e' | b'E')) {
        let mut exponent = end + 1;
        if matches!(bytes.get(exponent), Some(b'-' | b'+')) {
            exponent += 1;
        }
        let after = digits(exponent);
        if after > exponent {
            end = after;
        }
    }
    let number = text[..end].parse::<f64>().ok()?;
    Some((number, &text[end..]))
}

/// A node's own value of a parameter Patroni passes on its command line,
/// which Patroni ignored.
pub enum Local<'a> {
    /// What ran instead (for `wal_keep_segments`, PostgreSQL 15's
    /// `wal_keep_size`).
    Ran(&'a ClusterParameter),
    /// Patroni derives it itself, from no configured value: why.
    Derived(&'static str),
}

/// Why Patroni ignores a configured value of `name` and what it does
/// instead; `None` for a parameter Patroni takes from anywhere.
pub fn derived(name: &str) -> Option<&'static str> {
    match name.to_ascii_lowercase().as_str() {
        "listen_addresses" | "port" => Some(
            "Patroni ignored it: the address and port come from postgresql.listen, as mainstay's \
             [postgresql] listen and port",
        ),
        "cluster_name" => {
            Some("Patroni ignored it and set the scope, which the node file's parameters carry")
        }
        "hot_standby" => Some("Patroni ignored it: hot_standby is always on, under mainstay too"),
        _ => None,
    }
}

/// The rule for `name` in a node's own parameters, given what ran.
pub fn local<'a>(name: &str, ran: &'a [ClusterParameter]) -> Option<Local<'a>> {
    if let Some(why) = derived(name) {
        return Some(Local::Derived(why));
    }
    let lower = name.to_ascii_lowercase();
    if lower == "wal_keep_segments" {
        return ran
            .iter()
            .find(|p| p.name == "wal_keep_size")
            .map(Local::Ran);
    }
    ran.iter().find(|p| p.name == lower).map(Local::Ran)
}

/// Whether `name` is one Patroni takes only from the cluster-wide
/// configuration (or from nowhere).
pub fn is_command_line(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    derived(&lower).is_some()
        || lower == "wal_keep_segments"
        || lower == "wal_keep_size"
        || CLUSTER_WIDE.iter().any(|(n, _, _)| *n == lower)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolved(parameters: Json) -> Vec<ClusterParameter> {
        resolve(parameters.as_object().unwrap())
    }

    fn value<'a>(ran: &'a [ClusterParameter], name: &str) -> &'a ClusterParameter {
        ran.iter().find(|p| p.name == name).unwrap()
    }

    #[test]
    fn patroni_runs_the_cluster_wide_value_or_its_default() {
        // GET /config of a Patroni 4.1.5 cluster after `patronictl
        // edit-config`; the postmaster ran with --max_connections=150.
        let config: Json = serde_json::from_str(include_str!(
            "../testdata/patroni-4.1.5/config_edited_paused.json"
        ))
        .unwrap();
        let ran = resolved(config["postgresql"]["parameters"].clone());
        assert_eq!(value(&ran, "max_connections").value, 150);
        assert_eq!(value(&ran, "max_connections").origin, Origin::Configured);
        assert_eq!(value(&ran, "max_wal_senders").value, 12);
        assert_eq!(value(&ran, "wal_log_hints").value, "on");
        // Unset: Patroni's defaults, as its postmaster command line showed.
        for (name, default) in [
            ("wal_level", json!("replica")),
            ("max_prepared_transactions", json!(0)),
            ("max_locks_per_transaction", json!(64)),
            ("track_commit_timestamp", json!("off")),
            ("max_replication_slots", json!(10)),
            ("max_worker_processes", json!(8)),
            ("wal_keep_size", json!("128MB")),
        ] {
            assert_eq!(value(&ran, name).value, default, "{name}");
            assert_eq!(value(&ran, name).origin, Origin::Default, "{name}");
        }
        assert_eq!(ran.len(), 10);
    }

    #[test]
    fn a_value_patroni_refuses_runs_its_default() {
        let ran = resolved(json!({
            "max_connections": 20,
            "Max_Locks_Per_Transaction": "128",
            "wal_level": "minimal",
            "track_commit_timestamp": "maybe",
            "max_worker_processes": "0x10",
            "max_replication_slots": "014",
            "max_wal_senders": 7.5,
        }));
        assert_eq!(value(&ran, "max_connections").value, 100);
        assert_eq!(
            value(&ran, "max_connections").origin,
            Origin::Refused(json!(20))
        );
        assert_eq!(value(&ran, "max_locks_per_transaction").value, 128);
        assert_eq!(value(&ran, "wal_level").value, "replica");
        assert!(matches!(
            value(&ran, "wal_level").origin,
            Origin::Refused(_)
        ));
        assert_eq!(value(&ran, "track_commit_timestamp").value, "off");
        assert_eq!(value(&ran, "max_worker_processes").value, 16);
        assert_eq!(value(&ran, "max_replication_slots").value, 12);
        assert_eq!(value(&ran, "max_wal_senders").value, 8);
        let level = resolved(json!({"wal_level": "HOT_STANDBY"}));
        assert_eq!(value(&level, "wal_level").value, "replica");
    }

    #[test]
    fn wal_keep_size_follows_wal_keep_segments_as_patroni_computes_it() {
        let size = |p: Json| value(&resolved(p), "wal_keep_size").clone();
        assert_eq!(size(json!({"wal_keep_size": "1GB"})).value, "1GB");
        assert_eq!(size(json!({"wal_keep_size": 512})).value, 512);
        let from_segments = size(json!({"wal_keep_segments": 32}));
        assert_eq!(from_segments.value, "512MB");
        assert_eq!(from_segments.origin, Origin::FromSegments(json!(32)));
        // Below Patroni's 16 MB minimum: refused, the segments decide.
        let refused = size(json!({"wal_keep_size": "8MB", "wal_keep_segments": 2}));
        assert_eq!(refused.value, "32MB");
        assert_eq!(refused.origin, Origin::FromSegments(json!(2)));
        let refused = size(json!({"wal_keep_size": "8MB"}));
        assert_eq!(refused.value, "128MB");
        assert_eq!(refused.origin, Origin::Refused(json!("8MB")));
        assert_eq!(size(json!({})).value, "128MB");
    }

    #[test]
    fn a_node_value_of_a_command_line_parameter_points_at_what_ran() {
        let ran = resolved(json!({"max_connections": 120}));
        assert!(matches!(
            local("max_connections", &ran),
            Some(Local::Ran(p)) if p.name == "max_connections" && p.value == 120
        ));
        assert!(matches!(
            local("wal_keep_segments", &ran),
            Some(Local::Ran(p)) if p.name == "wal_keep_size" && p.value == "128MB"
        ));
        assert!(matches!(local("port", &ran), Some(Local::Derived(_))));
        assert!(local("shared_buffers", &ran).is_none());
        assert!(is_command_line("HOT_STANDBY") && !is_command_line("work_mem"));
    }
}
