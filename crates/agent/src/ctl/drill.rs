//! `mainstay ctl drill`: a failover drill on the operator's own cluster.
//!
//! A writer commits into a table of the drill's own (never a user table)
//! through the read-write endpoint while the primary is switched over or
//! stopped hard; the report says what clients saw: how long writes were
//! unavailable, how many were acknowledged, whether any acknowledged write
//! is missing afterwards, who leads now and whether the old primary
//! rejoined. The table is dropped at the end, whatever happened.

use super::{Ctl, Failure, call, client_for, confirm};
use crate::config::Config;
use hyper::Method;
use mainstay_core::poison;
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_postgres::NoTls;

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DrillKind {
    /// A planned switchover to the best replica (or --candidate).
    Switchover,
    /// The primary's PostgreSQL is stopped hard and its agent lets the
    /// lease run out, as if the host died; a replica takes over.
    Failover,
}

#[derive(clap::Args, Debug)]
pub struct DrillArgs {
    #[arg(long, value_enum, default_value = "switchover")]
    kind: DrillKind,
    /// With --kind switchover: the replica to hand over to.
    #[arg(long)]
    candidate: Option<String>,
    /// The read-write endpoint the test writer goes through, as a libpq
    /// connection string or URL. Default, from --config: that node's
    /// read-write proxy, or else the VIP, with the superuser's credentials.
    #[arg(long)]
    dsn: Option<String>,
    /// Do not ask for confirmation.
    #[arg(long)]
    force: bool,
}

/// Why the drill's own SQL through the read-write endpoint failed.
#[derive(Debug, thiserror::Error)]
enum EndpointError {
    #[error("no answer within {} s", CONNECT_TIMEOUT.as_secs())]
    ConnectTimeout,
    #[error(transparent)]
    Postgres(#[from] tokio_postgres::Error),
}

/// A connection through the endpoint may wait this long for a server.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long each phase may take before the drill gives up on it.
const TAKEOVER_TIMEOUT: Duration = Duration::from_secs(90);
const REJOIN_TIMEOUT: Duration = Duration::from_secs(90);
/// Writes before the fault and after the new primary's first write.
const STEADY: Duration = Duration::from_secs(2);

#[derive(Clone, Debug)]
struct Ack {
    id: i64,
    heard: Instant,
    /// The server that acknowledged it, "address:port".
    server: String,
}

#[derive(Default)]
struct Evidence {
    acked: Vec<Ack>,
    /// Writes whose outcome the client cannot know (the connection broke
    /// during the commit): neither lost nor failed if absent.
    unknown: usize,
}

/// The read-write endpoint from the node's configuration: the proxy's
/// read-write listener (this node's PostgreSQL address when it listens on
/// every address), else the VIP on PostgreSQL's port.
fn default_dsn(config: &Config) -> Option<String> {
    let pg = &config.postgresql;
    let (host, port) = if let Some(listen) = config.proxy.listen {
        let host = if listen.ip().is_unspecified() {
            pg.connect_host.clone()
        } else {
            listen.ip().to_string()
        };
        (host, listen.port())
    } else {
        (config.vip.as_ref()?.address.to_string(), pg.port)
    };
    Some(format!(
        "host={host} port={port} user='{}' password='{}' dbname=postgres connect_timeout=2",
        escape(&pg.superuser.user),
        escape(&pg.superuser.password)
    ))
}

fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('\'', "\\'")
}

fn member(cluster: &Value, pick: impl Fn(&Value) -> bool) -> Option<&Value> {
    cluster["members"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| pick(m))
}

fn leader_of(cluster: &Value) -> Option<(String, Value)> {
    member(cluster, |m| m["role"] == "leader").map(|m| {
        (
            m["name"].as_str().unwrap_or_default().to_string(),
            m.clone(),
        )
    })
}

/// Why the cluster is not fit for a drill, if it is not.
fn unfit(cluster: &Value) -> Option<String> {
    if cluster["pause"] == true {
        return Some(
            "the cluster is paused (maintenance mode): nothing would take over; \
             `mainstay ctl resume` first"
                .into(),
        );
    }
    let Some((leader, status)) = leader_of(cluster) else {
        return Some("the cluster has no leader right now".into());
    };
    if status["state"] != "running" {
        return Some(format!(
            "the leader {leader} is {}, not running",
            status["state"]
        ));
    }
    let members = cluster["members"].as_array().cloned().unwrap_or_default();
    let replicas: Vec<&Value> = members.iter().filter(|m| m["name"] != leader).collect();
    if replicas.is_empty() {
        return Some("there is no replica to take over".into());
    }
    let unhealthy: Vec<String> = replicas
        .iter()
        .filter(|m| m["state"] != "streaming")
        .map(|m| format!("{} is {}", m["name"].as_str().unwrap_or("?"), m["state"]))
        .collect();
    if !unhealthy.is_empty() {
        return Some(format!(
            "every replica must be streaming before a drill: {}",
            unhealthy.join(", ")
        ));
    }
    None
}

impl Ctl {
    pub(super) async fn drill(
        &self,
        args: DrillArgs,
        config: Option<&Config>,
    ) -> Result<(), Failure> {
        let dsn = match args.dsn.clone().or_else(|| config.and_then(default_dsn)) {
            Some(dsn) => dsn,
            None => {
                return Err(Failure::Usage(
                    "the drill writes through the read-write endpoint: give --dsn \
                     'host=... port=... user=... password=... dbname=...' or --config of a node \
                     with [proxy] listen or a vip"
                        .into(),
                ));
            }
        };
        let pg_config: tokio_postgres::Config = dsn
            .parse()
            .map_err(|e| Failure::Usage(format!("--dsn: {e}")))?;
        if args.kind == DrillKind::Failover && args.candidate.is_some() {
            return Err(Failure::Usage(
                "--candidate goes with --kind switchover: in a failover drill the cluster \
                 elects the successor as it would after a crash"
                    .into(),
            ));
        }
        let cluster = self.call(Method::GET, "/cluster", None).await?.body;
        if let Some(why) = unfit(&cluster) {
            return Err(Failure::Refused(format!("no drill: {why}")));
        }
        let (old_leader, leader_status) = leader_of(&cluster).expect("checked by unfit");
        let what = match args.kind {
            DrillKind::Switchover => format!(
                "switch over from {old_leader} to {}",
                args.candidate.as_deref().unwrap_or("the best replica")
            ),
            DrillKind::Failover => format!(
                "stop PostgreSQL on {old_leader} hard and let a replica take over after its \
                 lease expires"
            ),
        };
        confirm(
            args.force,
            &format!(
                "Drill on cluster {}: {what}, while a test writer commits through the \
                 read-write endpoint. Clients see a short outage.",
                cluster["scope"].as_str().unwrap_or("?")
            ),
        )?;
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        let table = format!("mainstay_drill_{stamp}");
        let setup = async {
            let client = connect(&pg_config).await?;
            client
                .batch_execute(&format!(
                    "CREATE TABLE {table} (id bigint PRIMARY KEY, \
                     at timestamptz NOT NULL DEFAULT clock_timestamp()); \
                     COMMENT ON TABLE {table} IS 'mainstay ctl drill: dropped when the drill ends'"
                ))
                .await?;
            Ok::<_, EndpointError>(())
        };
        setup.await.map_err(|e| {
            Failure::Refused(format!(
                "no drill: cannot create the drill's table through {}: {e}",
                describe(&pg_config)
            ))
        })?;
        let report = self
            .drive(&args, &pg_config, &table, &old_leader, &leader_status)
            .await;
        let dropped = drop_table(&pg_config, &table).await;
        let mut report = report?;
        report["table_dropped"] = json!(dropped.is_ok());
        if self.json {
            println!("{report}");
        } else {
            print_report(&report);
        }
        if let Err(e) = dropped {
            eprintln!("warning: could not drop {table} ({e}): drop it by hand");
        }
        let lost = report["lost_acknowledged_writes"].as_u64().unwrap_or(0);
        if lost > 0 || report["new_leader"].is_null() {
            return Err(Failure::Refused(format!(
                "the drill found a problem: {lost} acknowledged writes lost, new leader {}",
                report["new_leader"]
            )));
        }
        Ok(())
    }

    async fn drive(
        &self,
        args: &DrillArgs,
        pg_config: &tokio_postgres::Config,
        table: &str,
        old_leader: &str,
        leader_status: &Value,
    ) -> Result<Value, Failure> {
        let stop = Arc::new(AtomicBool::new(false));
        let evidence = Arc::new(Mutex::new(Evidence::default()));
        let writer = tokio::spawn(write_loop(
            pg_config.clone(),
            format!(
                "INSERT INTO {table} (id) VALUES ($1) \
                 RETURNING host(inet_server_addr()) || ':' || inet_server_port()"
            ),
            evidence.clone(),
            stop.clone(),
        ));
        let result = self
            .fault_and_watch(args, old_leader, leader_status, &evidence)
            .await;
        stop.store(true, Ordering::Relaxed);
        let _ = tokio::time::timeout(Duration::from_secs(10), writer).await;
        let (fault_at, new_leader, rejoined) = result?;
        let urls = self.member_urls().await;
        let cluster = self.any_cluster(&urls).await.unwrap_or_default();
        let new_status = member(&cluster, |m| m["name"] == new_leader.as_str());
        let timeline = new_status.and_then(|m| m["timeline"].as_u64());
        let new_server =
            new_status.map(|m| format!("{}:{}", m["host"].as_str().unwrap_or_default(), m["port"]));
        let evidence = std::mem::take(&mut *poison::lock(&evidence));
        let present = read_ids(pg_config, table)
            .await
            .map_err(|e| Failure::Refused(format!("cannot read back the drill's writes: {e}")))?;
        let lost = evidence
            .acked
            .iter()
            .filter(|a| !present.contains(&a.id))
            .count();
        let mut heard: Vec<Instant> = evidence
            .acked
            .iter()
            .map(|a| a.heard)
            .filter(|h| *h >= fault_at)
            .collect();
        heard.sort();
        let first_on_new = evidence
            .acked
            .iter()
            .filter(|a| a.heard >= fault_at && Some(&a.server) == new_server.as_ref())
            .map(|a| a.heard.duration_since(fault_at))
            .min();
        let mut longest = Duration::ZERO;
        let mut previous = fault_at;
        for h in &heard {
            longest = longest.max(h.duration_since(previous));
            previous = *h;
        }
        Ok(json!({
            "kind": format!("{:?}", args.kind).to_lowercase(),
            "old_leader": old_leader,
            "new_leader": new_leader,
            "timeline": timeline,
            "unavailable_ms": longest.as_millis() as u64,
            "first_write_on_new_leader_ms": first_on_new.map(|d| d.as_millis() as u64),
            "acknowledged_writes": evidence.acked.len(),
            "lost_acknowledged_writes": lost,
            "unknown_outcome_writes": evidence.unknown,
            "old_leader_rejoined": rejoined.is_some(),
            "rejoin_ms": rejoined.map(|d| d.as_millis() as u64),
        }))
    }

    /// Injects the fault, waits for another leader and a write after it,
    /// then for the old leader to stream again. Returns when the fault was
    /// injected, the new leader and how long the rejoin took.
    async fn fault_and_watch(
        &self,
        args: &DrillArgs,
        old_leader: &str,
        leader_status: &Value,
        evidence: &Mutex<Evidence>,
    ) -> Result<(Instant, String, Option<Duration>), Failure> {
        tokio::time::sleep(STEADY).await;
        if poison::lock(evidence).acked.is_empty() {
            return Err(Failure::Refused(
                "no drill: the test writer could not commit anything through the endpoint in 2 s"
                    .into(),
            ));
        }
        let fault_at = Instant::now();
        match args.kind {
            DrillKind::Switchover => {
                let mut body = json!({ "leader": old_leader });
                if let Some(candidate) = &args.candidate {
                    body["candidate"] = json!(candidate);
                }
                self.call(Method::POST, "/switchover", Some(&body)).await?;
            }
            DrillKind::Failover => {
                let url = leader_status["api_url"].as_str().ok_or_else(|| {
                    Failure::Refused(format!("{old_leader} publishes no API address"))
                })?;
                let api = client_for(url, Duration::from_secs(60), &self.auth, &self.ca_file)?;
                call(&api, Method::POST, "/drill/crash", Some(&json!({}))).await?;
            }
        }
        // The API asked may be the old leader's, busy or down for a while:
        // every member is tried in turn.
        let urls: Vec<String> = self.member_urls().await;
        let deadline = fault_at + TAKEOVER_TIMEOUT;
        let new_leader = loop {
            if let Some(cluster) = self.any_cluster(&urls).await
                && let Some((name, status)) = leader_of(&cluster)
                && name != old_leader
                && status["state"] == "running"
                && poison::lock(evidence)
                    .acked
                    .iter()
                    .any(|a| a.heard > fault_at)
            {
                break name;
            }
            if Instant::now() >= deadline {
                return Err(Failure::Refused(format!(
                    "no other leader wrote within {TAKEOVER_TIMEOUT:?} of the fault: see the \
                     agents' logs"
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        tokio::time::sleep(STEADY).await;
        let deadline = Instant::now() + REJOIN_TIMEOUT;
        let rejoined = loop {
            if let Some(cluster) = self.any_cluster(&urls).await
                && member(&cluster, |m| m["name"] == old_leader)
                    .is_some_and(|m| m["state"] == "streaming")
            {
                break Some(fault_at.elapsed());
            }
            if Instant::now() >= deadline {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        Ok((fault_at, new_leader, rejoined))
    }

    async fn member_urls(&self) -> Vec<String> {
        let mut urls = Vec::new();
        if let Ok(answer) = self.call(Method::GET, "/cluster", None).await {
            for m in answer.body["members"].as_array().into_iter().flatten() {
                if let Some(url) = m["api_url"].as_str() {
                    urls.push(url.to_string());
                }
            }
        }
        urls
    }

    /// `/cluster` from the API asked, or else from any member.
    async fn any_cluster(&self, urls: &[String]) -> Option<Value> {
        if let Ok(answer) = self.call(Method::GET, "/cluster", None).await {
            return Some(answer.body);
        }
        for url in urls {
            let Ok(api) = client_for(url, Duration::from_secs(2), &self.auth, &self.ca_file) else {
                continue;
            };
            if let Ok(answer) = call(&api, Method::GET, "/cluster", None).await {
                return Some(answer.body);
            }
        }
        None
    }
}

fn describe(config: &tokio_postgres::Config) -> String {
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(h) => h.clone(),
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .collect();
    let ports: Vec<String> = config.get_ports().iter().map(u16::to_string).collect();
    format!("{} port {}", hosts.join(","), ports.join(","))
}

async fn connect(config: &tokio_postgres::Config) -> Result<tokio_postgres::Client, EndpointError> {
    let connecting = config.connect(NoTls);
    let (client, connection) = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
        .await
        .map_err(|_| EndpointError::ConnectTimeout)??;
    tokio::spawn(connection);
    Ok(client)
}

async fn write_loop(
    config: tokio_postgres::Config,
    insert: String,
    evidence: Arc<Mutex<Evidence>>,
    stop: Arc<AtomicBool>,
) {
    let mut client = None;
    let mut next_id: i64 = 1;
    while !stop.load(Ordering::Relaxed) {
        if client.is_none() {
            match connect(&config).await {
                Ok(c) => client = Some(c),
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            }
        }
        let Some(c) = &client else { continue };
        let id = next_id;
        next_id += 1;
        match tokio::time::timeout(Duration::from_secs(3), c.query_one(&insert, &[&id])).await {
            Ok(Ok(row)) => {
                let ack = Ack {
                    id,
                    heard: Instant::now(),
                    server: row.try_get(0).unwrap_or_default(),
                };
                poison::lock(&evidence).acked.push(ack);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            // Refused by the server (read-only, shutting down): nothing
            // was committed.
            Ok(Err(e)) if e.as_db_error().is_some() => client = None,
            _ => {
                poison::lock(&evidence).unknown += 1;
                client = None;
            }
        }
    }
}

/// Every id in the drill's table, read through the endpoint (retried while
/// the cluster settles).
async fn read_ids(
    config: &tokio_postgres::Config,
    table: &str,
) -> Result<BTreeSet<i64>, EndpointError> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let attempt = async {
            let client = connect(config).await?;
            let rows = client
                .query(&format!("SELECT id FROM {table}"), &[])
                .await?;
            Ok::<_, EndpointError>(rows.iter().map(|r| r.get::<_, i64>(0)).collect())
        };
        match attempt.await {
            Ok(ids) => return Ok(ids),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

async fn drop_table(config: &tokio_postgres::Config, table: &str) -> Result<(), EndpointError> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let attempt = async {
            let client = connect(config).await?;
            client
                .batch_execute(&format!("DROP TABLE IF EXISTS {table}"))
                .await?;
            Ok::<_, EndpointError>(())
        };
        match attempt.await {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

fn print_report(report: &Value) {
    let ms = |v: &Value| match v.as_u64() {
        Some(ms) => format!("{ms} ms"),
        None => "-".into(),
    };
    println!("Drill: {}", report["kind"].as_str().unwrap_or("?"));
    println!(
        "  leader:                    {} -> {} (timeline {})",
        report["old_leader"].as_str().unwrap_or("?"),
        report["new_leader"].as_str().unwrap_or("none"),
        report["timeline"]
    );
    println!(
        "  writes unavailable:        {}",
        ms(&report["unavailable_ms"])
    );
    println!(
        "  first write on new leader: {} after the fault",
        ms(&report["first_write_on_new_leader_ms"])
    );
    println!(
        "  acknowledged writes:       {}",
        report["acknowledged_writes"]
    );
    println!(
        "  lost acknowledged:         {}",
        report["lost_acknowledged_writes"]
    );
    println!(
        "  unknown outcome:           {} (the connection broke during the commit)",
        report["unknown_outcome_writes"]
    );
    let rejoined = if report["old_leader_rejoined"] == true {
        format!(
            "yes, streaming {} after the fault",
            ms(&report["rejoin_ms"])
        )
    } else {
        format!("no, not within {} s", REJOIN_TIMEOUT.as_secs())
    };
    println!("  old leader rejoined:       {rejoined}");
    println!(
        "  test table dropped:        {}",
        if report["table_dropped"] == true {
            "yes"
        } else {
            "no"
        }
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(pause: bool, states: &[(&str, &str, &str)]) -> Value {
        json!({
            "scope": "c",
            "pause": pause,
            "members": states.iter().map(|(n, r, s)| json!({"name": n, "role": r, "state": s})).collect::<Vec<_>>(),
        })
    }

    #[test]
    fn a_drill_needs_a_running_leader_and_streaming_replicas() {
        let healthy = [
            ("a", "leader", "running"),
            ("b", "replica", "streaming"),
            ("c", "sync_standby", "streaming"),
        ];
        assert_eq!(unfit(&cluster(false, &healthy)), None);
        assert!(unfit(&cluster(true, &healthy)).unwrap().contains("paused"));
        let lagging = [("a", "leader", "running"), ("b", "replica", "stopped")];
        assert!(unfit(&cluster(false, &lagging)).unwrap().contains("b is"));
        let alone = [("a", "leader", "running")];
        assert!(
            unfit(&cluster(false, &alone))
                .unwrap()
                .contains("no replica")
        );
        let leaderless = [("b", "replica", "streaming")];
        assert!(
            unfit(&cluster(false, &leaderless))
                .unwrap()
                .contains("no leader")
        );
    }
}
