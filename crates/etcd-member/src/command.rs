//! The member's command line. Pure, so that every flag is pinned by a test.

use crate::spec::MemberSpec;
use std::ffi::OsString;

/// How often etcd compacts its history: every revision older than this
/// goes. Agents rewrite their member keys every loop, so an etcd that never
/// compacts grows until its space quota makes the whole cluster read-only.
const COMPACTION_RETENTION: &str = "1h";
/// Raft entries kept in memory between snapshots: etcd 3.5's default
/// (3.4 keeps 100,000), which bounds a small member's memory.
const SNAPSHOT_COUNT: &str = "10000";

/// `etcd`'s arguments for `spec`.
pub fn arguments(spec: &MemberSpec) -> Vec<OsString> {
    let initial_cluster = spec
        .initial_cluster
        .iter()
        .map(|(name, url)| format!("{name}={url}"))
        .collect::<Vec<_>>()
        .join(",");
    let mut args: Vec<OsString> = Vec::new();
    let mut flag = |name: &str, value: &str| {
        args.push(format!("--{name}").into());
        args.push(value.into());
    };
    flag("name", &spec.name);
    flag("data-dir", &spec.data_dir.to_string_lossy());
    flag("listen-client-urls", &spec.client_url);
    flag("advertise-client-urls", &spec.client_url);
    flag("listen-peer-urls", &spec.peer_url);
    flag("initial-advertise-peer-urls", &spec.peer_url);
    flag("initial-cluster", &initial_cluster);
    flag("initial-cluster-state", spec.state.as_str());
    flag("initial-cluster-token", &spec.token);
    flag(
        "heartbeat-interval",
        &spec.timing.heartbeat.as_millis().to_string(),
    );
    flag(
        "election-timeout",
        &spec.timing.election_timeout.as_millis().to_string(),
    );
    flag("auto-compaction-mode", "periodic");
    flag("auto-compaction-retention", COMPACTION_RETENTION);
    flag("snapshot-count", SNAPSHOT_COUNT);
    flag("logger", "zap");
    flag("log-outputs", "stderr");
    flag("log-level", "warn");
    if let Some(tls) = &spec.tls {
        let (ca, cert, key) = (
            tls.ca_file.to_string_lossy(),
            tls.cert_file.to_string_lossy(),
            tls.key_file.to_string_lossy(),
        );
        if spec.client_url.starts_with("https://") {
            flag("trusted-ca-file", &ca);
            flag("cert-file", &cert);
            flag("key-file", &key);
        }
        if spec.peer_url.starts_with("https://") {
            flag("peer-trusted-ca-file", &ca);
            flag("peer-cert-file", &cert);
            flag("peer-key-file", &key);
        }
    }
    // A member back from isolation must not depose a healthy leader with
    // the terms it ran up alone (etcd 3.5's default, not 3.4's).
    args.push("--pre-vote".into());
    if spec.tls.is_some() && spec.client_url.starts_with("https://") {
        args.push("--client-cert-auth".into());
    }
    if spec.tls.is_some() && spec.peer_url.starts_with("https://") {
        args.push("--peer-client-cert-auth".into());
    }
    args
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{ClusterState, MemberTls, RaftTiming};
    use std::time::Duration;

    fn spec(scheme: &str) -> MemberSpec {
        MemberSpec {
            name: "node1".into(),
            data_dir: "/var/lib/mainstay/etcd".into(),
            client_url: format!("{scheme}://10.0.0.1:2379"),
            peer_url: format!("{scheme}://10.0.0.1:2380"),
            initial_cluster: vec![
                ("node1".into(), format!("{scheme}://10.0.0.1:2380")),
                ("node2".into(), format!("{scheme}://10.0.0.2:2380")),
                ("witness".into(), format!("{scheme}://10.0.0.3:2380")),
            ],
            state: ClusterState::New,
            token: "ship".into(),
            timing: RaftTiming::for_ttl(Duration::from_secs(4)),
            tls: (scheme == "https").then(|| MemberTls {
                ca_file: "/etc/mainstay/ca.pem".into(),
                cert_file: "/etc/mainstay/node.pem".into(),
                key_file: "/etc/mainstay/node.key".into(),
            }),
            binary: "/usr/bin/etcd".into(),
        }
    }

    fn value(args: &[OsString], name: &str) -> Option<String> {
        let at = args.iter().position(|a| a == name)?;
        Some(args.get(at + 1)?.to_string_lossy().into_owned())
    }

    #[test]
    fn plain_member() {
        let args = arguments(&spec("http"));
        assert_eq!(
            value(&args, "--initial-cluster").unwrap(),
            "node1=http://10.0.0.1:2380,node2=http://10.0.0.2:2380,witness=http://10.0.0.3:2380"
        );
        assert_eq!(value(&args, "--initial-cluster-token").unwrap(), "ship");
        assert_eq!(value(&args, "--heartbeat-interval").unwrap(), "50");
        assert_eq!(value(&args, "--election-timeout").unwrap(), "500");
        assert_eq!(value(&args, "--initial-cluster-state").unwrap(), "new");
        assert_eq!(value(&args, "--auto-compaction-retention").unwrap(), "1h");
        assert!(args.iter().any(|a| a == "--pre-vote"));
        assert!(!args.iter().any(|a| a.to_string_lossy().contains("cert")));
    }

    #[test]
    fn tls_member_demands_certificates_of_clients_and_peers() {
        let args = arguments(&spec("https"));
        assert_eq!(
            value(&args, "--cert-file").unwrap(),
            "/etc/mainstay/node.pem"
        );
        assert_eq!(
            value(&args, "--peer-key-file").unwrap(),
            "/etc/mainstay/node.key"
        );
        assert_eq!(
            value(&args, "--peer-trusted-ca-file").unwrap(),
            "/etc/mainstay/ca.pem"
        );
        assert!(args.iter().any(|a| a == "--client-cert-auth"));
        assert!(args.iter().any(|a| a == "--peer-client-cert-auth"));
    }
}
