//! The other hosts: etcd's client URLs, the other members' peer URLs, and
//! whether etcd answers with a quorum; the peers' clocks against this one.

use super::{Finding, Severity};
use mainstay_dcs::{Dcs, EtcdDcs, EtcdSettings};
use std::time::{Duration, SystemTime};

/// Per connection attempt: a LAN answers in milliseconds.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Clocks further apart than this make logs and history hard to read.
const CLOCK_OFFSET_WARNING: Duration = Duration::from_secs(2);

fn host_port(url: &str) -> Option<String> {
    let rest = url.split("://").nth(1)?;
    Some(rest.trim_end_matches('/').to_string())
}

async fn reachable(address: &str) -> Result<(), String> {
    match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(address)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(err)) => Err(err.to_string()),
        Err(_) => Err(format!("no answer within {} s", CONNECT_TIMEOUT.as_secs())),
    }
}

pub(super) async fn etcd(
    settings: &EtcdSettings,
    member: Option<&mainstay_etcd_member::MemberSpec>,
    name: &str,
) -> Vec<Finding> {
    let mut findings = Vec::new();
    let mut answering = 0;
    for endpoint in &settings.endpoints {
        let own = member.is_some_and(|m| &m.client_url == endpoint);
        let Some(address) = host_port(endpoint) else {
            continue;
        };
        match reachable(&address).await {
            Ok(()) => {
                answering += 1;
                findings.push(Finding::ok("peers", format!("etcd at {endpoint} answers")));
            }
            // The node's own member only runs once its agent does.
            Err(_) if own => findings.push(Finding::ok(
                "peers",
                format!("{endpoint} is this node's own member (started by the agent)"),
            )),
            Err(err) => findings.push(Finding::new(
                Severity::Warning,
                "peers",
                format!("etcd at {endpoint} is not reachable: {err}"),
                "the node needs a quorum of etcd's members to lead or follow",
                "start that node (or its etcd), or open the port in its firewall".into(),
            )),
        }
    }
    if let Some(member) = member {
        for (peer, url) in &member.initial_cluster {
            if peer == name {
                continue;
            }
            let Some(address) = host_port(url) else {
                continue;
            };
            match reachable(&address).await {
                Ok(()) => findings.push(Finding::ok(
                    "peers",
                    format!("{peer}'s etcd member at {url} answers"),
                )),
                Err(err) => findings.push(Finding::new(
                    Severity::Warning,
                    "peers",
                    format!("{peer}'s etcd member at {url} is not reachable: {err}"),
                    "members talk to each other on their peer URLs; without a majority \
                     etcd has no quorum",
                    format!("start {peer}, or open that port in its firewall"),
                )),
            }
        }
    }
    if answering == 0 {
        return findings;
    }
    let mut settings = settings.clone();
    settings.request_timeout = CONNECT_TIMEOUT;
    settings.connect_timeout = CONNECT_TIMEOUT;
    let view = match EtcdDcs::connect(settings).await {
        Ok(dcs) => dcs.read_cluster().await.map_err(|e| e.to_string()),
        Err(err) => Err(err.to_string()),
    };
    match view {
        Ok(view) => {
            findings.push(Finding::ok(
                "quorum",
                format!(
                    "etcd answers with a quorum; the cluster has {} member(s){}",
                    view.members.len(),
                    view.leader_name()
                        .map_or(String::new(), |l| format!(", led by {l}"))
                ),
            ));
            for record in view.members.values() {
                if record.status.name != name {
                    findings.push(clock_against(&record.status.name, &record.status.api_url).await);
                }
            }
        }
        Err(err) => findings.push(Finding::new(
            Severity::Warning,
            "quorum",
            format!("etcd does not answer with a quorum: {err}"),
            "without a quorum no node leads, and a leader fences itself",
            "start enough members (a majority), then check again".into(),
        )),
    }
    findings
}

/// The offset of a peer's clock, from its API's `Date` header.
async fn clock_against(peer: &str, api_url: &str) -> Finding {
    let client = crate::api_client::ApiClient::new(api_url).with_timeout(CONNECT_TIMEOUT);
    let before = SystemTime::now();
    let answer = client.get("/liveness").await;
    let after = SystemTime::now();
    let date = answer
        .ok()
        .and_then(|a| a.date)
        .and_then(|d| httpdate::parse_http_date(&d).ok());
    let Some(theirs) = date else {
        return Finding::new(
            Severity::Warning,
            "clock",
            format!("cannot read {peer}'s clock from {api_url}"),
            "",
            String::new(),
        );
    };
    let ours = before + after.duration_since(before).unwrap_or_default() / 2;
    let offset = match theirs.duration_since(ours) {
        Ok(ahead) => ahead,
        Err(behind) => behind.duration(),
    };
    // The header has a resolution of one second.
    if offset > CLOCK_OFFSET_WARNING {
        Finding::new(
            Severity::Warning,
            "clock",
            format!("{peer}'s clock is {} s off this one", offset.as_secs()),
            "logs, history and scheduled switchovers compare times across nodes",
            "synchronise every node's clock to the same source (chrony or timesyncd)".into(),
        )
    } else {
        Finding::ok(
            "clock",
            format!("{peer}'s clock agrees with this one (within 2 s)"),
        )
    }
}
