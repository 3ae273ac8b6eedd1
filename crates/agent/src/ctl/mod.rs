//! `mainstay ctl`: the operator's command line, a client of any agent's REST
//! API. Human tables by default, `--json` for scripts.
//!
//! Exit codes scripts can rely on:
//! - 0: done;
//! - 1: the cluster refused or the operation failed (the reason is printed);
//! - 2: bad usage or configuration (nothing was sent);
//! - 3: no agent could be reached.

mod drill;
mod etcd_member;
mod patroni;
mod recover_alone;
mod services;

use crate::api_client::{self, Answer, ApiClient};
use crate::config::Config;
use hyper::Method;
use serde_json::{Value, json};
use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(clap::Args, Debug)]
pub struct CtlArgs {
    /// A node's configuration file: its API address and credentials.
    #[arg(
        long,
        short,
        global = true,
        env = "MAINSTAY_CONFIG",
        visible_alias = "config-file"
    )]
    config: Option<PathBuf>,
    /// An agent's REST API, e.g. http://10.0.0.1:8008 (overrides --config).
    #[arg(long, global = true, env = "MAINSTAY_URL")]
    url: Option<String>,
    /// HTTP basic user for unsafe methods (default: from --config).
    #[arg(long, global = true, env = "MAINSTAY_API_USER")]
    user: Option<String>,
    /// HTTP basic password (default: from --config).
    #[arg(
        long,
        global = true,
        env = "MAINSTAY_API_PASSWORD",
        hide_env_values = true
    )]
    password: Option<String>,
    /// Bearer token (default: from --config).
    #[arg(
        long,
        global = true,
        env = "MAINSTAY_API_TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,
    /// CA certificate (PEM) to trust for https:// APIs (default: from --config).
    #[arg(long, global = true, env = "MAINSTAY_API_CA")]
    ca_file: Option<PathBuf>,
    /// Machine-readable output: one JSON document on stdout.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(clap::Subcommand, Debug)]
enum CtlCommand {
    /// Members, roles, timelines and lag; who leads; pause.
    #[command(visible_alias = "topology")]
    List {
        /// The cluster's name, as patronictl takes it (checked).
        cluster: Option<String>,
        /// Also show each member's pending restart.
        #[arg(long, short)]
        extended: bool,
        /// Print the time first.
        #[arg(long, short)]
        timestamp: bool,
    },
    /// Planned switchover to the best replica or to --candidate.
    Switchover {
        /// The cluster's name, as patronictl takes it (checked).
        cluster: Option<String>,
        /// The current leader (checked; default: whoever leads).
        #[arg(long, visible_alias = "primary")]
        leader: Option<String>,
        #[arg(long)]
        candidate: Option<String>,
        /// When: RFC 3339 time (2026-12-24T03:00:00Z); default now.
        #[arg(long)]
        scheduled: Option<String>,
        /// Do not ask for confirmation.
        #[arg(long)]
        force: bool,
    },
    /// Manual failover: promote --candidate, with or without a leader.
    Failover {
        /// The cluster's name, as patronictl takes it (checked).
        cluster: Option<String>,
        #[arg(long)]
        candidate: String,
        #[arg(long)]
        force: bool,
    },
    /// Restart PostgreSQL on each NODE in its current role, one after the
    /// other (patronictl's `restart CLUSTER [MEMBER...]`: the cluster's
    /// name alone restarts every member, the leader last).
    Restart {
        #[arg(required = true, value_name = "[CLUSTER] NODE")]
        nodes: Vec<String>,
        #[arg(long)]
        force: bool,
    },
    /// Re-clone each NODE (a replica) from the leader; its data is moved
    /// aside (patronictl's `reinit CLUSTER MEMBER...`).
    Reinit {
        #[arg(required = true, value_name = "[CLUSTER] NODE")]
        nodes: Vec<String>,
        #[arg(long)]
        force: bool,
        /// Accepted for patronictl's runbooks: ctl always waits until the
        /// re-clone is done.
        #[arg(long)]
        wait: bool,
    },
    /// Maintenance mode: no automatic failover or restart.
    Pause {
        /// The cluster's name, as patronictl takes it (checked).
        cluster: Option<String>,
        /// Wait until every member reports it.
        #[arg(long)]
        wait: bool,
    },
    /// Leave maintenance mode.
    Resume {
        /// The cluster's name, as patronictl takes it (checked).
        cluster: Option<String>,
        /// Wait until every member reports it.
        #[arg(long)]
        wait: bool,
    },
    /// Timeline switches: when, where, why, who.
    History {
        /// The cluster's name, as patronictl takes it (checked).
        cluster: Option<String>,
    },
    /// The cluster-wide dynamic configuration.
    ShowConfig {
        /// The cluster's name, as patronictl takes it (checked).
        cluster: Option<String>,
    },
    /// Change the dynamic configuration: --set key=value (dotted keys for
    /// nesting, e.g. postgresql.parameters.work_mem=16MB; value null deletes)
    /// or --pg name=value for a PostgreSQL parameter.
    EditConfig {
        /// The cluster's name, as patronictl takes it (checked).
        cluster: Option<String>,
        #[arg(
            long = "set",
            short = 's',
            value_name = "KEY=VALUE",
            required_unless_present = "pg"
        )]
        set: Vec<String>,
        #[arg(long = "pg", short = 'p', value_name = "NAME=VALUE")]
        pg: Vec<String>,
        #[arg(long)]
        force: bool,
        /// Print nothing on success.
        #[arg(long, short)]
        quiet: bool,
    },
    /// Forget a member whose agent is gone for good: the leader drops its
    /// replication slot now instead of after member_slots_ttl.
    Remove {
        node: String,
        #[arg(long)]
        force: bool,
    },
    /// patronictl's `flush CLUSTER switchover`: cancel a scheduled
    /// switchover.
    Flush {
        cluster: String,
        #[arg(value_enum)]
        target: FlushTarget,
        #[arg(long)]
        force: bool,
    },
    /// Failover drill: a switchover or a simulated crash of the primary
    /// while a test writer commits through the read-write endpoint; prints
    /// the outage, acknowledged and lost writes, the new leader and whether
    /// the old one rejoined. Refused on a paused or unhealthy cluster.
    Drill(drill::DrillArgs),
    /// Every member's supervised services: state, pid, restarts, last check.
    Services,
    /// Restart SERVICE on NODE now; a failed service gets another chance.
    RestartService {
        node: String,
        service: String,
        #[arg(long)]
        force: bool,
    },
    /// etcd's own members: list them, let a new node's in, remove a dead one.
    #[command(subcommand)]
    EtcdMember(etcd_member::EtcdMemberCommand),
    /// The way back when this node is the only server left: re-form its
    /// etcd member alone so that it can lead (docs/ship-guide.md). Only
    /// when every other server is gone for good; asks for the cluster's
    /// name.
    RecoverAlone {
        /// The cluster's name, instead of typing it when asked.
        #[arg(long, value_name = "CLUSTER")]
        confirm: Option<String>,
    },
    /// Cancel a scheduled switchover.
    CancelSwitchover {
        #[arg(long)]
        force: bool,
    },
}

enum Failure {
    Refused(String),
    Usage(String),
    Unreachable(String),
}

impl From<api_client::ClientError> for Failure {
    fn from(err: api_client::ClientError) -> Failure {
        if err.before_connecting() {
            Failure::Usage(err.to_string())
        } else {
            Failure::Unreachable(err.to_string())
        }
    }
}

impl Failure {
    fn exit(self, json: bool) -> ExitCode {
        let (code, reason) = match self {
            Failure::Refused(r) => (1, r),
            Failure::Usage(r) => (2, r),
            Failure::Unreachable(r) => (3, r),
        };
        if json {
            println!("{}", json!({ "error": reason, "exit_code": code }));
        } else {
            eprintln!("error: {reason}");
        }
        ExitCode::from(code)
    }
}

pub async fn run(args: CtlArgs) -> ExitCode {
    let json_out = args.json;
    match execute(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => failure.exit(json_out),
    }
}

struct Ctl {
    api: ApiClient,
    json: bool,
    /// Credentials and trust, to talk to other nodes' APIs too (restart,
    /// reinit, remove).
    auth: Option<Auth>,
    ca_file: Option<PathBuf>,
}

/// What `flush` discards.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum FlushTarget {
    Switchover,
    Restart,
}

#[derive(Clone)]
enum Auth {
    Basic(String, String),
    Token(String),
}

fn client_for(
    url: &str,
    timeout: Duration,
    auth: &Option<Auth>,
    ca_file: &Option<PathBuf>,
) -> Result<ApiClient, Failure> {
    let mut client = authorize(ApiClient::new(url).with_timeout(timeout), auth);
    if let Some(ca) = ca_file {
        client = client
            .with_ca_file(ca)
            .map_err(|e| Failure::Usage(e.to_string()))?;
    }
    Ok(client)
}

fn authorize(client: ApiClient, auth: &Option<Auth>) -> ApiClient {
    match auth {
        Some(Auth::Basic(user, password)) => client.with_basic_auth(user, password),
        Some(Auth::Token(token)) => client.with_token(token),
        None => client,
    }
}

async fn execute(args: CtlArgs) -> Result<(), Failure> {
    let config = match &args.config {
        Some(path) => Some(Config::load(path).map_err(|e| Failure::Usage(e.to_string()))?),
        None => None,
    };
    let url = args
        .url
        .clone()
        .or_else(|| config.as_ref().map(|c| c.api.url.clone()))
        .ok_or_else(|| {
            Failure::Usage(
                "which cluster? give --url http://HOST:PORT of any agent, or --config FILE of a \
                 node (or set MAINSTAY_URL / MAINSTAY_CONFIG)"
                    .into(),
            )
        })?;
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(Failure::Usage(format!(
            "--url {url:?} is not a URL: write http://HOST:PORT"
        )));
    }
    let api_config = config.as_ref().map(|c| &c.api);
    let auth = if let Some(token) = args
        .token
        .clone()
        .or_else(|| api_config.and_then(|a| a.token.clone()))
    {
        Some(Auth::Token(token))
    } else {
        let user = args
            .user
            .clone()
            .or_else(|| api_config.and_then(|a| Some(a.basic.as_ref()?.0.clone())));
        let password = args
            .password
            .clone()
            .or_else(|| api_config.and_then(|a| Some(a.basic.as_ref()?.1.clone())));
        match (user, password) {
            (Some(u), Some(p)) => Some(Auth::Basic(u, p)),
            (None, None) => None,
            _ => {
                return Err(Failure::Usage("--user and --password go together".into()));
            }
        }
    };
    let ca_file = args
        .ca_file
        .clone()
        .or_else(|| api_config.and_then(|a| a.ca_file.clone()));
    if url.starts_with("https://") && ca_file.is_none() {
        return Err(Failure::Usage(format!(
            "{url} uses https: give the CA certificate that signed the API's certificate \
             with --ca-file (or api.ca_file in --config)"
        )));
    }
    let ctl = Ctl {
        api: client_for(&url, Duration::from_secs(60), &auth, &ca_file)?,
        json: args.json,
        auth,
        ca_file,
    };
    let pause = matches!(args.command, CtlCommand::Pause { .. });
    match args.command {
        CtlCommand::List {
            cluster,
            extended,
            timestamp,
        } => {
            ctl.check_cluster(cluster.as_deref()).await?;
            ctl.list(extended, timestamp).await
        }
        CtlCommand::Drill(drill) => ctl.drill(drill, config.as_ref()).await,
        CtlCommand::History { cluster } => {
            ctl.check_cluster(cluster.as_deref()).await?;
            ctl.history().await
        }
        CtlCommand::Services => ctl.services().await,
        CtlCommand::EtcdMember(command) => ctl.etcd_member(command).await,
        CtlCommand::RecoverAlone { confirm } => ctl.recover_alone(confirm).await,
        CtlCommand::RestartService {
            node,
            service,
            force,
        } => {
            confirm(force, &format!("Restart service {service} on {node}?"))?;
            ctl.restart_service(&node, &service).await
        }
        CtlCommand::ShowConfig { cluster } => {
            ctl.check_cluster(cluster.as_deref()).await?;
            let answer = ctl.call(Method::GET, "/config", None).await?;
            println!(
                "{}",
                serde_json::to_string_pretty(&answer.body).unwrap_or_default()
            );
            Ok(())
        }
        CtlCommand::Pause { cluster, wait } | CtlCommand::Resume { cluster, wait } => {
            ctl.check_cluster(cluster.as_deref()).await?;
            ctl.set_pause(pause).await?;
            if wait {
                ctl.wait_for_pause(pause).await?;
            }
            Ok(())
        }
        CtlCommand::EditConfig {
            cluster,
            mut set,
            pg,
            force,
            quiet,
        } => {
            ctl.check_cluster(cluster.as_deref()).await?;
            set.extend(patroni::pg_settings(&pg));
            let patch = settings_patch(&set)?;
            confirm(
                force,
                &format!(
                    "Change the cluster configuration with {}?",
                    serde_json::to_string(&patch).unwrap_or_default()
                ),
            )?;
            let answer = ctl.call(Method::PATCH, "/config", Some(&patch)).await?;
            if !quiet {
                ctl.report(&answer.body, "configuration changed");
            }
            Ok(())
        }
        CtlCommand::Switchover {
            cluster,
            leader,
            candidate,
            scheduled,
            force,
        } => {
            ctl.check_cluster(cluster.as_deref()).await?;
            let mut body = json!({});
            if let Some(leader) = &leader {
                body["leader"] = json!(leader);
            }
            if let Some(candidate) = &candidate {
                body["candidate"] = json!(candidate);
            }
            if let Some(at) = &scheduled {
                body["scheduled_at"] = json!(at);
            }
            let target = candidate.as_deref().unwrap_or("the best replica");
            let when = scheduled.as_deref().unwrap_or("now");
            confirm(force, &format!("Switch over to {target} ({when})?"))?;
            let answer = ctl.call(Method::POST, "/switchover", Some(&body)).await?;
            ctl.report(&answer.body, "switchover requested");
            Ok(())
        }
        CtlCommand::Failover {
            cluster,
            candidate,
            force,
        } => {
            ctl.check_cluster(cluster.as_deref()).await?;
            confirm(
                force,
                &format!(
                    "Fail over to {candidate}? Acknowledged writes it has not received are lost."
                ),
            )?;
            let body = json!({ "candidate": candidate });
            let answer = ctl.call(Method::POST, "/failover", Some(&body)).await?;
            ctl.report(&answer.body, "failover requested");
            Ok(())
        }
        CtlCommand::CancelSwitchover { force } => {
            confirm(force, "Cancel the pending switchover?")?;
            let answer = ctl.call(Method::DELETE, "/switchover", None).await?;
            ctl.report(&answer.body, "cancelled");
            Ok(())
        }
        CtlCommand::Flush {
            cluster,
            target,
            force,
        } => {
            ctl.check_cluster(Some(&cluster)).await?;
            match target {
                FlushTarget::Switchover => {
                    confirm(force, "Cancel the pending switchover?")?;
                    let answer = ctl.call(Method::DELETE, "/switchover", None).await?;
                    ctl.report(&answer.body, "cancelled");
                    Ok(())
                }
                FlushTarget::Restart => Err(Failure::Refused(
                    "mainstay schedules no restarts: there is nothing to flush".into(),
                )),
            }
        }
        CtlCommand::Remove { node, force } => {
            let (scope, _) = ctl.scope_and_members().await?;
            if node == scope {
                return Err(Failure::Usage(format!(
                    "{node} is the cluster's name: patronictl's `remove CLUSTER` wipes a \
                     cluster from the DCS, mainstay's `remove NODE` forgets one member gone \
                     for good. To retire the whole cluster, stop every agent; nothing was done"
                )));
            }
            confirm(
                force,
                &format!("Remove {node} from the cluster (its replication slot is dropped)?"),
            )?;
            ctl.on_leader(&format!("/members/{node}")).await
        }
        CtlCommand::Restart { nodes, force } => {
            let (scope, members) = ctl.scope_and_members().await?;
            let nodes =
                patroni::members_meant(&nodes, &scope, &members, true).map_err(Failure::Usage)?;
            confirm(
                force,
                &format!("Restart PostgreSQL on {}?", nodes.join(", ")),
            )?;
            for node in &nodes {
                ctl.on_node(node, "/restart").await?;
            }
            Ok(())
        }
        CtlCommand::Reinit {
            nodes,
            force,
            wait: _,
        } => {
            let (scope, members) = ctl.scope_and_members().await?;
            let nodes =
                patroni::members_meant(&nodes, &scope, &members, false).map_err(Failure::Usage)?;
            confirm(
                force,
                &format!(
                    "Re-clone {} from the leader (the data directory is moved aside)?",
                    nodes.join(", ")
                ),
            )?;
            for node in &nodes {
                ctl.on_node(node, "/reinitialize").await?;
            }
            Ok(())
        }
    }
}

/// `--set a.b=c` pairs as one JSON merge patch; values parse as JSON when
/// they can (numbers, booleans, null), else they are strings.
fn settings_patch(pairs: &[String]) -> Result<Value, Failure> {
    let mut patch = json!({});
    for pair in pairs {
        let Some((key, raw)) = pair.split_once('=') else {
            return Err(Failure::Usage(format!(
                "--set {pair:?}: write KEY=VALUE, e.g. --set maximum_lag_on_failover=1048576"
            )));
        };
        let key = key.trim();
        if key.is_empty() || key.split('.').any(str::is_empty) {
            return Err(Failure::Usage(format!("--set {pair:?}: the key is empty")));
        }
        let value = serde_json::from_str::<Value>(raw.trim())
            .ok()
            .filter(|v| !v.is_object() && !v.is_array())
            .unwrap_or_else(|| Value::String(raw.trim().to_string()));
        let mut cursor = &mut patch;
        let parts: Vec<&str> = key.split('.').collect();
        for part in &parts[..parts.len() - 1] {
            cursor = cursor
                .as_object_mut()
                .expect("built as objects")
                .entry(part.to_string())
                .or_insert_with(|| json!({}));
            if !cursor.is_object() {
                return Err(Failure::Usage(format!(
                    "--set {pair:?}: {part} is set as a value and as an object"
                )));
            }
        }
        cursor
            .as_object_mut()
            .expect("built as objects")
            .insert(parts[parts.len() - 1].to_string(), value);
    }
    Ok(patch)
}

fn confirm(force: bool, question: &str) -> Result<(), Failure> {
    if force {
        return Ok(());
    }
    if !std::io::stdin().is_terminal() {
        return Err(Failure::Usage(format!(
            "{question} Not asking on a non-interactive input: add --force"
        )));
    }
    print!("{question} [y/N] ");
    let _ = std::io::stdout().flush();
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
    if matches!(line.trim(), "y" | "Y" | "yes") {
        Ok(())
    } else {
        Err(Failure::Refused(
            "not confirmed: nothing was changed".into(),
        ))
    }
}

impl Ctl {
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Answer, Failure> {
        call(&self.api, method, path, body).await
    }

    fn report(&self, body: &Value, fallback: &str) {
        if self.json {
            println!("{body}");
        } else {
            println!("{}", body["message"].as_str().unwrap_or(fallback));
        }
    }

    async fn set_pause(&self, pause: bool) -> Result<(), Failure> {
        let answer = self
            .call(Method::PATCH, "/config", Some(&json!({ "pause": pause })))
            .await?;
        let what = if pause {
            "paused: no automatic failover or restart until `mainstay ctl resume`"
        } else {
            "resumed: automatic failover is on"
        };
        self.report(&json!({ "message": what, "config": answer.body }), what);
        Ok(())
    }

    /// Sends DELETE `path` to the leader's API, found in `/cluster`.
    async fn on_leader(&self, path: &str) -> Result<(), Failure> {
        let cluster = self.call(Method::GET, "/cluster", None).await?.body;
        let url = cluster["members"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| m["role"] == "leader")
            .and_then(|m| m["api_url"].as_str())
            .ok_or_else(|| Failure::Refused("the cluster has no leader right now".into()))?;
        let api = client_for(url, Duration::from_secs(60), &self.auth, &self.ca_file)?;
        let answer = call(&api, Method::DELETE, path, None).await?;
        self.report(&answer.body, "done");
        Ok(())
    }

    /// Sends an unsafe POST to NODE's own API, found in `/cluster`.
    async fn on_node(&self, node: &str, path: &str) -> Result<(), Failure> {
        let cluster = self.call(Method::GET, "/cluster", None).await?.body;
        let url = cluster["members"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| m["name"] == node)
            .and_then(|m| m["api_url"].as_str())
            .ok_or_else(|| {
                Failure::Refused(format!(
                    "{node} is not a member of the cluster (see `ctl list`)"
                ))
            })?;
        let api = client_for(url, Duration::from_secs(600), &self.auth, &self.ca_file)?;
        let answer = call(&api, Method::POST, path, Some(&json!({}))).await?;
        self.report(&answer.body, "done");
        Ok(())
    }

    async fn list(&self, extended: bool, timestamp: bool) -> Result<(), Failure> {
        let cluster = self.call(Method::GET, "/cluster", None).await?.body;
        if timestamp && !self.json {
            println!(
                "{}",
                humantime::format_rfc3339_seconds(std::time::SystemTime::now())
            );
        }
        if self.json {
            println!("{cluster}");
            return Ok(());
        }
        let mut rows: Vec<Vec<String>> = vec![vec![
            "Member".to_string(),
            "Host".into(),
            "Role".into(),
            "State".into(),
            "TL".into(),
            "Lag (bytes)".into(),
            "Tags".into(),
            "VIP".into(),
            "Services".into(),
        ]];
        for m in cluster["members"].as_array().into_iter().flatten() {
            let text = |v: &Value| match v {
                Value::String(s) => s.clone(),
                Value::Null => String::new(),
                other => other.to_string(),
            };
            let tags = m["tags"]
                .as_object()
                .map(|t| {
                    t.iter()
                        .map(|(k, v)| format!("{k}={}", text(v)))
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default();
            rows.push(vec![
                text(&m["name"]),
                format!("{}:{}", text(&m["host"]), text(&m["port"])),
                text(&m["role"]),
                text(&m["state"]),
                text(&m["timeline"]),
                text(&m["lag"]),
                tags,
                text(&m["vip"]),
                m["services"]
                    .as_object()
                    .map(|s| {
                        s.iter()
                            .map(|(name, state)| format!("{name}={}", text(state)))
                            .collect::<Vec<_>>()
                            .join(",")
                    })
                    .unwrap_or_default(),
            ]);
            if extended {
                let pending = if m["pending_restart"] == true {
                    "*"
                } else {
                    ""
                };
                rows.last_mut().expect("just pushed").push(pending.into());
            }
        }
        if extended {
            rows[0].push("Pending restart".into());
        }
        for w in cluster["witnesses"].as_array().into_iter().flatten() {
            let name = w["name"].as_str().unwrap_or("?").to_string();
            rows.push(vec![
                name,
                String::new(),
                "witness".into(),
                w["state"].as_str().unwrap_or("?").to_string(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
            ]);
        }
        print_table(&rows);
        let scope = cluster["scope"].as_str().unwrap_or("?");
        let leader = cluster["members"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| m["role"] == "leader")
            .and_then(|m| m["name"].as_str())
            .unwrap_or("none");
        println!("Cluster {scope}: leader {leader}");
        if cluster["dcs_reachable"] == false {
            let ago = cluster["dcs_last_seen"]
                .as_u64()
                .map(|t| crate::api::unix_now().saturating_sub(t))
                .map_or_else(String::new, |s| format!(", last read {s} s ago"));
            println!(
                "NO QUORUM: this node cannot read etcd{ago}; the list above is as it was then. \
                 Nothing takes over until two of the three machines run again (docs/ship-guide.md)"
            );
        }
        if cluster["pause"] == true {
            println!("Maintenance mode: on (no automatic failover; `mainstay ctl resume` to end)");
        }
        if let Some(s) = cluster.get("scheduled_switchover") {
            println!("Switchover pending: {s}");
        }
        for m in cluster["members"].as_array().into_iter().flatten() {
            if let Some(files) = m["files"].as_object() {
                let words: Vec<String> = files
                    .iter()
                    .map(|(path, word)| format!("{path} {}", word.as_str().unwrap_or("?")))
                    .collect();
                println!(
                    "Files {}: {}",
                    m["name"].as_str().unwrap_or("?"),
                    words.join(", ")
                );
            }
            if let Some(warning) = m["warning"].as_str() {
                println!("WARNING {}: {warning}", m["name"].as_str().unwrap_or("?"));
            }
            for alert in m["alerts"].as_array().into_iter().flatten() {
                println!(
                    "ALERT {}: {}",
                    m["name"].as_str().unwrap_or("?"),
                    alert.as_str().unwrap_or_default()
                );
            }
        }
        Ok(())
    }

    async fn history(&self) -> Result<(), Failure> {
        let history = self.call(Method::GET, "/history", None).await?.body;
        if self.json {
            println!("{history}");
            return Ok(());
        }
        let mut rows = vec![[
            "TL".to_string(),
            "LSN".into(),
            "Reason".into(),
            "Time".into(),
            "New leader".into(),
        ]];
        for entry in history.as_array().into_iter().flatten() {
            let field = |i: usize| match &entry[i] {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            let lsn = entry[1]
                .as_u64()
                .map(|l| mainstay_core::Lsn(l).to_string())
                .unwrap_or_default();
            rows.push([field(0), lsn, field(2), field(3), field(4)]);
        }
        print_table(&rows);
        recover_alone::print_recoveries(&self.call(Method::GET, "/cluster", None).await?.body);
        Ok(())
    }
}

async fn call(
    api: &ApiClient,
    method: Method,
    path: &str,
    body: Option<&Value>,
) -> Result<Answer, Failure> {
    let answer = api.request(method, path, body).await?;
    if answer.status.is_success() {
        return Ok(answer);
    }
    let reason = answer.body["error"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| answer.text.clone());
    Err(Failure::Refused(format!("{} ({})", reason, answer.status)))
}

fn print_table<R: AsRef<[String]>>(rows: &[R]) {
    let mut widths: Vec<usize> = Vec::new();
    for row in rows {
        for (i, cell) in row.as_ref().iter().enumerate() {
            if widths.len() <= i {
                widths.push(0);
            }
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    for (r, row) in rows.iter().enumerate() {
        let line: Vec<String> = row
            .as_ref()
            .iter()
            .enumerate()
            .map(|(i, cell)| format!("{cell:<width$}", width = widths[i]))
            .collect();
        println!("{}", line.join("  ").trim_end());
        if r == 0 {
            let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
            println!("{}", rule.join("  "));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_pairs_become_one_merge_patch() {
        let patch = settings_patch(&[
            "pause=true".into(),
            "maximum_lag_on_failover=1048576".into(),
            "postgresql.parameters.work_mem=16MB".into(),
            "postgresql.parameters.jit=null".into(),
        ])
        .ok()
        .unwrap();
        assert_eq!(
            patch,
            json!({
                "pause": true,
                "maximum_lag_on_failover": 1048576,
                "postgresql": {"parameters": {"work_mem": "16MB", "jit": null}}
            })
        );
        assert!(settings_patch(&["novalue".into()]).is_err());
        assert!(settings_patch(&["a..b=1".into()]).is_err());
        assert!(settings_patch(&["a=1".into(), "a.b=2".into()]).is_err());
    }

    #[tokio::test]
    async fn a_request_that_never_left_is_a_usage_error() {
        let err = ApiClient::new("https://x:1").get("/").await.unwrap_err();
        assert!(matches!(Failure::from(err), Failure::Usage(_)));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        drop(listener);
        let err = ApiClient::new(&url).get("/").await.unwrap_err();
        assert!(matches!(Failure::from(err), Failure::Unreachable(_)));
    }
}
