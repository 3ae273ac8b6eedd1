//! `[etcd] member = true`: the node's own etcd member, which the agent runs
//! (`mainstay_etcd_member`). Every refusal names the `[etcd]` key and the
//! fix, before anything starts.

use super::file::EtcdSection;
use mainstay_etcd_member::{ClusterState, MemberSpec, MemberTls, RaftTiming};
use std::path::{Path, PathBuf};
use std::time::Duration;

type Refusal = (&'static str, String);

/// The member the section describes, if `member = true`. `avoid` are the
/// directories etcd's data must stay out of (PostgreSQL's, the replicated
/// ones).
pub(super) fn member(
    section: &EtcdSection,
    node: &str,
    cluster: &str,
    ttl: Duration,
    avoid: &[&Path],
) -> Result<Option<MemberSpec>, Refusal> {
    if section.member != Some(true) {
        let stray = [
            ("etcd.data_dir", section.data_dir.is_some()),
            ("etcd.client_url", section.client_url.is_some()),
            ("etcd.peer_url", section.peer_url.is_some()),
            ("etcd.initial_cluster", section.initial_cluster.is_some()),
            (
                "etcd.initial_cluster_state",
                section.initial_cluster_state.is_some(),
            ),
            (
                "etcd.heartbeat_interval",
                section.heartbeat_interval.is_some(),
            ),
            ("etcd.election_timeout", section.election_timeout.is_some()),
            ("etcd.bin", section.bin.is_some()),
        ];
        if let Some((key, _)) = stray.iter().find(|(_, set)| *set) {
            return Err((
                key,
                "describes the node's own etcd member, but etcd.member is not true: \
                 set member = true to have the agent run it, or remove the key"
                    .into(),
            ));
        }
        return Ok(None);
    }
    let data_dir = data_dir(section.data_dir.as_deref(), avoid)?;
    let client_url = member_url("etcd.client_url", section.client_url.as_deref(), "2379")?;
    let peer_url = member_url("etcd.peer_url", section.peer_url.as_deref(), "2380")?;
    if client_url == peer_url {
        return Err((
            "etcd.peer_url",
            "is the same as etcd.client_url: give the peers a port of their own (etcd's \
             usual ones are 2379 for clients, 2380 for peers)"
                .into(),
        ));
    }
    let tls = tls(section, &client_url, &peer_url)?;
    let state = match section.initial_cluster_state.as_deref() {
        None | Some("new") => ClusterState::New,
        Some("existing") => ClusterState::Existing,
        Some(other) => {
            return Err((
                "etcd.initial_cluster_state",
                format!(
                    "{other:?} is not a state: \"new\" when the members form the cluster \
                     together, \"existing\" when this one joins a running cluster (after \
                     `mainstay ctl etcd-member add`)"
                ),
            ));
        }
    };
    let initial_cluster = initial_cluster(section, node, &peer_url)?;
    let timing = raft_timing(section, ttl)?;
    let binary = section
        .bin
        .clone()
        .unwrap_or_else(|| PathBuf::from(mainstay_etcd_member::spec::DEFAULT_BINARY));
    if !binary.is_file() {
        return Err((
            "etcd.bin",
            format!(
                "{} is not there: install Debian's etcd-server package (apt-get install \
                 etcd-server) or name etcd's server binary",
                binary.display()
            ),
        ));
    }
    Ok(Some(MemberSpec {
        name: node.to_string(),
        data_dir,
        client_url,
        peer_url,
        initial_cluster,
        state,
        token: cluster.to_string(),
        timing,
        tls,
        binary,
    }))
}

fn data_dir(dir: Option<&Path>, avoid: &[&Path]) -> Result<PathBuf, Refusal> {
    let key = "etcd.data_dir";
    let Some(dir) = dir else {
        return Err((
            key,
            "is missing: etcd.member = true needs a directory for etcd's data, e.g. \
             \"/var/lib/mainstay/etcd\""
                .into(),
        ));
    };
    if !dir.is_absolute()
        || dir
            .components()
            .any(|c| c == std::path::Component::ParentDir)
    {
        return Err((
            key,
            format!(
                "{} is not an absolute path without \"..\": give the full path",
                dir.display()
            ),
        ));
    }
    if let Some(other) = avoid
        .iter()
        .find(|other| dir.starts_with(other) || other.starts_with(dir))
    {
        return Err((
            key,
            format!(
                "{} overlaps {}, which mainstay manages for PostgreSQL or a replicated \
                 directory: give etcd a directory of its own",
                dir.display(),
                other.display()
            ),
        ));
    }
    Ok(dir.to_path_buf())
}

/// `http(s)://IP:PORT`: etcd listens on what it advertises, and listens
/// only on addresses, not names.
fn member_url(key: &'static str, value: Option<&str>, usual_port: &str) -> Result<String, Refusal> {
    let example = format!("e.g. \"http://10.0.0.1:{usual_port}\"");
    let Some(value) = value else {
        return Err((
            key,
            format!("is missing: etcd.member = true needs this member's URL, {example}"),
        ));
    };
    match super::member_address(value) {
        Some(_) => Ok(value.to_string()),
        None => Err((
            key,
            format!(
                "{value:?} is not http(s)://ADDRESS:PORT with this host's IP address (etcd \
                 listens where it is reached, and only on addresses): {example}"
            ),
        )),
    }
}

fn tls(
    section: &EtcdSection,
    client_url: &str,
    peer_url: &str,
) -> Result<Option<MemberTls>, Refusal> {
    let https = client_url.starts_with("https://") || peer_url.starts_with("https://");
    if !https {
        return Ok(None);
    }
    let files = (&section.ca_file, &section.cert_file, &section.key_file);
    let (Some(ca_file), Some(cert_file), Some(key_file)) = files else {
        return Err((
            "etcd.cert_file",
            "an https member serves and checks certificates with the node's own: set \
             etcd.ca_file, etcd.cert_file and etcd.key_file (a certificate of that CA for \
             this node's address, valid for server and client use)"
                .into(),
        ));
    };
    Ok(Some(MemberTls {
        ca_file: ca_file.clone(),
        cert_file: cert_file.clone(),
        key_file: key_file.clone(),
    }))
}

fn initial_cluster(
    section: &EtcdSection,
    node: &str,
    peer_url: &str,
) -> Result<Vec<(String, String)>, Refusal> {
    let key = "etcd.initial_cluster";
    let Some(members) = &section.initial_cluster else {
        return Err((
            key,
            format!(
                "is missing: list every member by name and peer URL, this one included, \
                 e.g. {{ {node} = \"{peer_url}\", node2 = \"http://10.0.0.2:2380\", witness = \
                 \"http://10.0.0.3:2380\" }}"
            ),
        ));
    };
    match members.get(node) {
        Some(url) if url == peer_url => {}
        Some(url) => {
            return Err((
                key,
                format!(
                    "gives this node ({node}) the peer URL {url:?}, but etcd.peer_url is \
                     {peer_url:?}: make them the same"
                ),
            ));
        }
        None => {
            return Err((
                key,
                format!(
                    "does not list this node: add {node} = \"{peer_url}\" (a member's name is \
                     its node's name)"
                ),
            ));
        }
    }
    let scheme = |url: &str| url.split("://").next().unwrap_or("").to_string();
    let mut seen: Vec<&str> = Vec::new();
    for (name, url) in members {
        super::validate::check_name(key, name)?;
        member_url("etcd.initial_cluster", Some(url), "2380")
            .map_err(|(_, why)| (key, format!("{name}: {why}")))?;
        if scheme(url) != scheme(peer_url) {
            return Err((
                key,
                format!(
                    "{name}'s URL {url:?} does not use {}:// like this node's peer URL: every \
                     member speaks the same to its peers",
                    scheme(peer_url)
                ),
            ));
        }
        if seen.contains(&url.as_str()) {
            return Err((
                key,
                format!("{url:?} is given to two members: each member has its own peer URL"),
            ));
        }
        seen.push(url);
    }
    Ok(members
        .iter()
        .map(|(name, url)| (name.clone(), url.clone()))
        .collect())
}

fn raft_timing(section: &EtcdSection, ttl: Duration) -> Result<RaftTiming, Refusal> {
    let derived = RaftTiming::for_ttl(ttl);
    let seconds = |key: &'static str, value: Option<f64>, default: Duration| match value {
        None => Ok(default),
        Some(s) if s.is_finite() && s > 0.0 && s <= 60.0 => Ok(Duration::from_secs_f64(s)),
        Some(s) => Err((
            key,
            format!("{s} is out of range: give seconds above 0, e.g. 0.05"),
        )),
    };
    let timing = RaftTiming {
        heartbeat: seconds(
            "etcd.heartbeat_interval",
            section.heartbeat_interval,
            derived.heartbeat,
        )?,
        election_timeout: seconds(
            "etcd.election_timeout",
            section.election_timeout,
            derived.election_timeout,
        )?,
    };
    match timing.problem(ttl) {
        None => Ok(timing),
        Some(why) => Err(("etcd.election_timeout", why)),
    }
}
