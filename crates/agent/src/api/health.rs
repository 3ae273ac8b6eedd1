//! Patroni's health checks, as pure functions of a node snapshot and the
//! query string, so that a load balancer configured for Patroni
//! (`option httpchk OPTIONS /primary`, `GET /replica?lag=10MB`) gets the same
//! answers from mainstay.

use super::NodeSnapshot;
use crate::config::parse_size;
use mainstay_core::Lsn;
use std::collections::BTreeMap;

/// The health endpoints; each answers 200 when the node fits, else 503.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    /// `/`, `/primary`, `/leader`, `/master`, `/read-write`.
    Primary,
    /// `/replica`: a running, streaming replica within `lag`.
    Replica,
    /// `/read-only`: the primary or a replica as `/replica` would accept.
    ReadOnly,
    /// `/sync`, `/synchronous`, `/quorum`: a replica listed as
    /// synchronous (mainstay's synchronous standbys are a quorum: the
    /// primary waits for `ANY k` of them).
    Sync,
    /// `/read-only-sync`, `/read-only-synchronous`, `/read-only-quorum`:
    /// the primary, or a replica as `/sync` would accept.
    ReadOnlySync,
    /// `/standby-leader`, `/standby_leader`: the leader of a standby
    /// cluster, which mainstay does not run: never.
    StandbyLeader,
    /// `/async`, `/asynchronous`: a replica that is not synchronous.
    Async,
    /// `/health`: PostgreSQL is up.
    Health,
    /// `/liveness`: the HA loop is turning.
    Liveness,
    /// `/readiness`: leader with a primary, or a replica that streams.
    Readiness,
}

/// A malformed query: the request is refused with 400, never answered 503
/// (a typo in a load balancer's check must not look like a dead node).
#[derive(Debug, PartialEq, Eq)]
pub struct BadQuery(pub String);

/// What the query string asks on top of the role.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Filters {
    /// Largest acceptable replication lag in bytes.
    pub max_lag: Option<u64>,
    /// `tag_<name>=<value>`: the node's tag must have this value.
    pub tags: BTreeMap<String, String>,
}

impl Filters {
    pub fn parse(query: &BTreeMap<String, String>) -> Result<Filters, BadQuery> {
        let mut filters = Filters::default();
        for (key, value) in query {
            if key == "lag" {
                filters.max_lag = Some(parse_size(value).ok_or_else(|| {
                    BadQuery(format!(
                        "lag={value:?} is not a size: give bytes (10485760) or a number \
                         with a unit B, kB, MB, GB or TB (10MB)"
                    ))
                })?);
            } else if let Some(tag) = key.strip_prefix("tag_") {
                filters.tags.insert(tag.to_string(), value.clone());
            }
            // Patroni ignores other parameters; so does mainstay, so that
            // checks written for newer Patroni versions keep working.
        }
        Ok(filters)
    }
}

/// Whether this node passes `check` with `filters`. As in Patroni, the
/// leader checks ignore tag filters (a load balancer's primary check must
/// not depend on them), and so do `/liveness` and `/readiness`.
pub fn passes(check: Check, node: &NodeSnapshot, filters: &Filters) -> bool {
    let tags_apply = !matches!(
        check,
        Check::Primary | Check::StandbyLeader | Check::Liveness | Check::Readiness
    );
    if tags_apply && !tags_match(node, &filters.tags) {
        return false;
    }
    match check {
        Check::Primary => node.is_primary_leader(),
        // Like Patroni: a noloadbalance replica is no read-only target.
        Check::Replica => replica_ok(node, filters) && !node.tags.noloadbalance,
        Check::ReadOnly => {
            node.is_primary_leader() || (replica_ok(node, filters) && !node.tags.noloadbalance)
        }
        Check::Sync => replica_ok(node, filters) && node.is_sync_standby(),
        Check::ReadOnlySync => {
            node.is_primary_leader() || (replica_ok(node, filters) && node.is_sync_standby())
        }
        Check::StandbyLeader => false,
        Check::Async => replica_ok(node, filters) && !node.is_sync_standby(),
        Check::Health => node.pg_running(),
        Check::Liveness => node.loop_is_alive(),
        Check::Readiness => node.is_primary_leader() || replica_ok(node, filters),
    }
}

fn replica_ok(node: &NodeSnapshot, filters: &Filters) -> bool {
    let Some(health) = node.health.as_ref().filter(|_| node.pg_running()) else {
        return false;
    };
    if !health.in_recovery || !health.is_streaming() {
        return false;
    }
    match filters.max_lag {
        None => true,
        Some(max) => node.lag_bytes().is_some_and(|lag| lag <= max),
    }
}

/// Each wanted tag must be one the node has, with that value, compared as
/// Patroni compares them (`Tags::filter_value`): `?tag_nofailover=false`
/// matches no node, `?tag_dc=one` the nodes tagged `dc = "one"`.
fn tags_match(node: &NodeSnapshot, wanted: &BTreeMap<String, String>) -> bool {
    wanted.iter().all(|(name, value)| {
        node.tags
            .filter_value(name)
            .is_some_and(|actual| actual == *value)
    })
}

/// Bytes between the leader's last published WAL position and `lsn`.
pub fn lag(leader: Lsn, lsn: Lsn) -> u64 {
    leader.0.saturating_sub(lsn.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mainstay_core::Tags;

    fn streaming_replica(tags: Tags) -> NodeSnapshot {
        let mut node = NodeSnapshot::new("r", "c", "", &tags, mainstay_core::Timing::DEFAULT);
        node.running = true;
        node.health = Some(mainstay_pg::Health {
            in_recovery: true,
            timeline: 1,
            system_identifier: 1,
            server_version: "15".into(),
            server_version_num: 150000,
            current_lsn: None,
            flush_lsn: None,
            receive_lsn: Some(Lsn(100)),
            replay_lsn: Some(Lsn(100)),
            replay_delay_secs: None,
            wal_receiver: Some(mainstay_pg::WalReceiver {
                status: "streaming".into(),
                received_tli: 1,
                flushed_lsn: Some(Lsn(100)),
                sender_host: None,
                sender_port: None,
                slot_name: None,
            }),
            replicas: Vec::new(),
            synchronous_standby_names: String::new(),
            ..mainstay_pg::Health::default()
        });
        node
    }

    #[test]
    fn a_noloadbalance_replica_is_healthy_but_no_read_only_target() {
        let filters = Filters::default();
        let plain = streaming_replica(Tags::default());
        assert!(passes(Check::Replica, &plain, &filters));
        assert!(passes(Check::ReadOnly, &plain, &filters));
        let kept_out = streaming_replica(Tags {
            noloadbalance: true,
            ..Tags::default()
        });
        assert!(!passes(Check::Replica, &kept_out, &filters));
        assert!(!passes(Check::ReadOnly, &kept_out, &filters));
        assert!(passes(Check::Health, &kept_out, &filters));
        let mut wanted = Filters::default();
        wanted.tags.insert("noloadbalance".into(), "true".into());
        assert!(passes(Check::Health, &kept_out, &wanted));
        assert!(!passes(Check::Health, &plain, &wanted));
    }

    #[test]
    fn tag_filters_follow_patroni() {
        let plain = streaming_replica(Tags::default());
        let filter = |name: &str, value: &str| {
            let mut f = Filters::default();
            f.tags.insert(name.into(), value.into());
            f
        };
        // A false boolean tag is no tag at all.
        assert!(!passes(
            Check::Replica,
            &plain,
            &filter("nofailover", "false")
        ));
        let marked = streaming_replica(Tags {
            nofailover: true,
            ..Tags::default()
        });
        assert!(passes(
            Check::Replica,
            &marked,
            &filter("nofailover", "true")
        ));
        assert!(!passes(
            Check::Replica,
            &marked,
            &filter("nofailover", "True")
        ));
        assert!(!passes(Check::Replica, &plain, &filter("dc", "one")));
        let mut in_one = Tags::default();
        in_one
            .custom
            .insert("dc".into(), mainstay_core::TagValue::Text("one".into()));
        in_one
            .custom
            .insert("ssd".into(), mainstay_core::TagValue::Bool(false));
        let in_one = streaming_replica(in_one);
        assert!(passes(Check::Replica, &in_one, &filter("dc", "one")));
        assert!(!passes(Check::Replica, &in_one, &filter("dc", "two")));
        // A custom boolean is a tag even when false, as in Patroni.
        assert!(passes(Check::Replica, &in_one, &filter("ssd", "false")));
        // Ignored where Patroni ignores them.
        let any = filter("dc", "one");
        assert!(passes(Check::Readiness, &plain, &any));
        assert!(!passes(Check::Replica, &plain, &any));
    }

    #[test]
    fn read_only_sync_takes_the_primary_and_synchronous_replicas_only() {
        let filters = Filters::default();
        let replica = streaming_replica(Tags::default());
        assert!(!passes(Check::ReadOnlySync, &replica, &filters));
        assert!(!passes(Check::StandbyLeader, &replica, &filters));
    }

    #[test]
    fn a_bad_lag_is_a_bad_query_and_unknown_parameters_are_ignored() {
        let query = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>()
        };
        assert!(Filters::parse(&query(&[("lag", "lots")])).is_err());
        let filters = Filters::parse(&query(&[
            ("lag", "1MB"),
            ("tag_nofailover", "false"),
            ("mode", "apply"),
        ]))
        .unwrap();
        assert_eq!(filters.max_lag, Some(1 << 20));
        assert_eq!(
            filters.tags.get("nofailover").map(String::as_str),
            Some("false")
        );
    }
}
