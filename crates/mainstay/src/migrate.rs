//! `mainstay migrate from-patroni`: writes the mainstay node file and the
//! dynamic configuration equivalent to a Patroni node's configuration,
//! after asking the node's running Patroni whether its cluster is fit to be
//! taken over and what configuration it runs now. It says what it dropped
//! and refuses what it could not map (unless accepted). Nothing is written
//! on a refusal, and nothing is overwritten.

use mainstay_agent::api_client::{ApiClient, ClientError};
use mainstay_agent::config::Config;
use mainstay_migrate::{
    Answers, Disposition, Dynamic, Healthy, PatroniNode, from_patroni, judge, patroni_node,
};
use serde_json::Value as Json;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

/// Each of the three requests to Patroni; they run at once, so the
/// command waits about this long for a Patroni that does not answer.
const PATRONI_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(clap::Subcommand)]
pub enum MigrateCommand {
    /// Read a Patroni node's YAML configuration and its running Patroni;
    /// write the equivalent mainstay.toml and dynamic configuration
    /// (docs/migrating-from-patroni.md).
    #[command(after_help = FROM_PATRONI_HELP)]
    FromPatroni(FromPatroniArgs),
}

const FROM_PATRONI_HELP: &str = "\
By default the node's running Patroni is asked (GET /patroni, /cluster and
/config at restapi.connect_address, or --patroni-url) and the command
refuses a cluster that is not healthy: a running leader, every other member
streaming, no standby cluster, no scheduled
switchover, this node a member and the file's scope the one Patroni serves.
The dynamic configuration then comes from GET /config, what the cluster runs
now; with --offline, from the file's bootstrap.dcs.

On success, standard output has these lines (all but the first only after
the cluster was checked):
  wrote FILE (the node file) and FILE (the dynamic configuration ...)
  leader: NAME          Patroni's leader: the node whose agent starts first
  paused: yes|no        Patroni's maintenance mode
  drop slot: NAME       one per slot Patroni made on the leader, to drop there
                        after the takeover (mainstay streams through its own)
followed by lines starting with `next:`, each with its indented lines (SQL,
settings to add).

Exit status: 0 written; 1 refused (the cluster is not healthy, Patroni cannot
be reached, a setting cannot be mapped, or mainstay would refuse the result),
nothing written; 2 the file cannot be read or is not a Patroni node's, an
output file exists, or a flag is wrong, nothing written.";

#[derive(clap::Args)]
pub struct FromPatroniArgs {
    /// The Patroni node's configuration (patroni.yml).
    #[arg(long, value_name = "FILE")]
    patroni_config: PathBuf,
    /// Where to write the node file (never overwritten).
    #[arg(long, value_name = "FILE", default_value = "mainstay.toml")]
    output: PathBuf,
    /// Where to write the dynamic configuration, for `PUT /config` (never
    /// overwritten).
    #[arg(long, value_name = "FILE", default_value = "mainstay-dynamic.json")]
    dynamic_output: PathBuf,
    /// Write the files even though some settings cannot be mapped (each
    /// is listed; their behaviour is lost).
    #[arg(long)]
    accept_unmapped: bool,
    /// The running Patroni's REST API, e.g. http://10.0.0.1:8008 (default:
    /// http(s):// and the file's restapi.connect_address).
    #[arg(long, value_name = "URL", conflicts_with = "offline")]
    patroni_url: Option<String>,
    /// The CA that signed Patroni's API certificate, for https (default:
    /// the file's ctl.cacert, else restapi.cafile). A certificate that
    /// cannot be verified is never accepted.
    #[arg(long, value_name = "FILE", conflicts_with = "offline")]
    patroni_ca_file: Option<PathBuf>,
    /// Do not ask the running Patroni: the cluster's health is not checked
    /// and the dynamic configuration comes from bootstrap.dcs, which may be
    /// stale.
    #[arg(long)]
    offline: bool,
}

pub fn run(command: MigrateCommand) -> ExitCode {
    let MigrateCommand::FromPatroni(args) = command;
    match from_patroni_files(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err((code, message)) => {
            eprintln!("error: {message}");
            ExitCode::from(code)
        }
    }
}

/// What the running Patroni answered, and where.
struct Live {
    url: String,
    patroni: Json,
    cluster: Json,
    config: Json,
}

fn from_patroni_files(args: &FromPatroniArgs) -> Result<(), (u8, String)> {
    let source = args.patroni_config.display();
    let text = std::fs::read_to_string(&args.patroni_config)
        .map_err(|e| (2, format!("{source}: cannot read it: {e}")))?;
    let node = patroni_node(&text).map_err(|e| (2, format!("{source}: {e}")))?;
    for path in [&args.output, &args.dynamic_output] {
        if path.exists() {
            return Err((
                2,
                format!(
                    "{} exists: nothing was written (move it aside or give another path)",
                    path.display()
                ),
            ));
        }
    }
    let live = if args.offline {
        eprintln!(
            "warning: --offline: the cluster's health was not checked, and the dynamic \
             configuration comes from {source}'s bootstrap.dcs, which Patroni applied only when \
             it created the cluster and may be stale (`patronictl show-config` shows what runs \
             now)"
        );
        None
    } else {
        Some(ask_patroni(&node, args, &source.to_string())?)
    };
    let healthy = match &live {
        Some(live) => Some(judged(&node, live)?),
        None => None,
    };
    let dynamic = match &live {
        Some(live) => Dynamic::Running(&live.config),
        None => Dynamic::Bootstrap,
    };
    let from = match &live {
        Some(live) => format!("GET {}/config", live.url),
        None => format!("{source}'s bootstrap.dcs"),
    };
    let migration = from_patroni(&text, dynamic).map_err(|e| (2, format!("{source}: {e}")))?;
    for note in &migration.notes {
        let tag = match note.disposition {
            Disposition::Dropped => "dropped",
            Disposition::Unmapped => "NOT MAPPED",
        };
        eprintln!("{tag}: {}: {}", note.key, note.reason);
    }
    let parameters: Vec<String> = migration
        .cluster_parameters
        .iter()
        .map(|p| p.describe(dynamic.label()))
        .collect();
    eprintln!(
        "cluster-wide: the parameters Patroni takes only from the cluster-wide configuration \
         ({from}), as it ran them, which the dynamic configuration carries: {}",
        parameters.join(", ")
    );
    let unmapped: Vec<&str> = migration.unmapped().map(|n| n.key.as_str()).collect();
    if !unmapped.is_empty() && !args.accept_unmapped {
        return Err((
            1,
            format!(
                "{source}: {} setting(s) cannot be mapped: {}. Nothing was written. Change them \
                 in Patroni first, or rerun with --accept-unmapped to migrate without them",
                unmapped.len(),
                unmapped.join(", ")
            ),
        ));
    }
    // The node file must be one mainstay accepts as it is.
    let header = format!(
        "# Written by `mainstay migrate from-patroni` from {source}.\n\
         # See docs/configuration.md for every key.\n"
    );
    let node_file = format!("{header}{}", migration.node_file);
    Config::parse(&args.output, &node_file).map_err(|e| {
        (
            1,
            format!(
                "the mainstay file made from {source} is refused: {e}. Nothing was written; fix \
                 the Patroni setting behind it"
            ),
        )
    })?;
    let dynamic_text = serde_json::to_string_pretty(&migration.dynamic).unwrap_or_default();
    check_dynamic(&migration.dynamic).map_err(|e| {
        (
            1,
            format!(
                "the dynamic configuration made from {from} is refused: {e}. Nothing was written"
            ),
        )
    })?;
    write_new(&args.output, &node_file)?;
    write_new(&args.dynamic_output, &format!("{dynamic_text}\n"))?;
    println!(
        "wrote {} (the node file) and {} (the dynamic configuration, from {from}: `PUT /config` \
         once the cluster runs under mainstay); see docs/migrating-from-patroni.md",
        args.output.display(),
        args.dynamic_output.display()
    );
    if let Some(healthy) = &healthy {
        print_takeover(healthy, migration.dynamic["pause"] == true);
    }
    if !node.api_credentials {
        println!(
            "next: Patroni's REST API had no restapi.authentication, so mainstay's has no \
             credentials and refuses every change with 403 (PUT /config, `mainstay ctl` \
             switchover, pause, restart, edit-config..., and the agents' failsafe \
             confirmations). Add to the [api] section of every node's file, the same on each:"
        );
        println!("  username = \"mainstay\"");
        println!("  password = \"<one secret, the same on every node>\"");
    }
    Ok(())
}

/// GET /patroni, /cluster and /config at once, each bounded.
fn ask_patroni(
    node: &PatroniNode,
    args: &FromPatroniArgs,
    source: &str,
) -> Result<Live, (u8, String)> {
    let offline_hint = "or --offline to migrate without checking the cluster (the dynamic \
                        configuration then comes from bootstrap.dcs, which may be stale)";
    let url = match (&args.patroni_url, &node.api_url) {
        (Some(url), _) => url.trim_end_matches('/').to_string(),
        (None, Some(url)) => url.clone(),
        (None, None) => {
            return Err((
                1,
                format!(
                    "{source} has no restapi.connect_address: give Patroni's REST API with \
                     --patroni-url URL, {offline_hint}. Nothing was written"
                ),
            ));
        }
    };
    let mut client = ApiClient::new(&url).with_timeout(PATRONI_TIMEOUT);
    if url.starts_with("https://") {
        let ca = args
            .patroni_ca_file
            .clone()
            .or_else(|| node.api_ca_file.as_ref().map(PathBuf::from));
        let Some(ca) = ca else {
            return Err((
                1,
                format!(
                    "{url} uses https, and neither --patroni-ca-file nor the file's ctl.cacert \
                     or restapi.cafile names the CA that signed Patroni's certificate: give it \
                     with --patroni-ca-file FILE (a certificate that cannot be verified is not \
                     accepted), {offline_hint}. Nothing was written"
                ),
            ));
        };
        client = client
            .with_ca_file(&ca)
            .map_err(|e| (2, format!("the CA for {url}: {e}")))?;
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| (1, format!("cannot start the runtime: {e}")))?;
    let answers = runtime.block_on(async {
        tokio::join!(
            client.get("/patroni"),
            client.get("/cluster"),
            client.get("/config")
        )
    });
    let unreachable = |err: ClientError| {
        if err.before_connecting() {
            return (
                2,
                format!("{err}: give Patroni's REST API as http(s)://HOST:PORT (--patroni-url)"),
            );
        }
        let certificate = if node.api_client_certificate && url.starts_with("https://") {
            " Patroni asks for a client certificate (restapi.verify_client: required), which \
             this command does not present."
        } else {
            ""
        };
        (
            1,
            format!(
                "cannot reach Patroni at {url}: {err}. Nothing was written.{certificate} Is \
                 Patroni running there? Give its REST API with --patroni-url URL, {offline_hint}"
            ),
        )
    };
    let body = |path: &str, answer: Result<_, ClientError>| {
        let answer: mainstay_agent::api_client::Answer = answer.map_err(unreachable)?;
        if !answer.status.is_success() {
            let why = if path == "/config" {
                " (Patroni has no configuration in its DCS: the cluster is still being \
                 created, or Patroni cannot reach its DCS)"
            } else {
                ""
            };
            return Err((
                1,
                format!(
                    "GET {url}{path} answered {}{why}: mainstay takes over a running Patroni \
                     cluster only. Nothing was written; check the address (--patroni-url), \
                     {offline_hint}",
                    answer.status
                ),
            ));
        }
        if !answer.body.is_object() {
            return Err((
                1,
                format!(
                    "GET {url}{path} did not answer a JSON object, as Patroni's REST API does: \
                     check the address (--patroni-url), {offline_hint}. Nothing was written"
                ),
            ));
        }
        Ok(answer.body)
    };
    let (patroni, cluster, config) = answers;
    Ok(Live {
        patroni: body("/patroni", patroni)?,
        cluster: body("/cluster", cluster)?,
        config: body("/config", config)?,
        url,
    })
}

/// The cluster judged: healthy, or the refusal with every problem.
fn judged(node: &PatroniNode, live: &Live) -> Result<Healthy, (u8, String)> {
    let answers = Answers {
        patroni: &live.patroni,
        cluster: &live.cluster,
        config: &live.config,
    };
    let healthy = judge(&node.scope, &node.name, &answers).map_err(|problems| {
        (
            1,
            format!(
                "Patroni at {} says cluster `{}` cannot be taken over now. Nothing was \
                 written. Fix under Patroni, then run the command again:\n  - {}",
                live.url,
                node.scope,
                problems.join("\n  - ")
            ),
        )
    })?;
    if healthy.answered_by != node.name {
        eprintln!(
            "note: {} is member `{}`'s Patroni, not `{}`'s (the file's name)",
            live.url, healthy.answered_by, node.name
        );
    }
    eprintln!(
        "checked: {} (Patroni {}): cluster `{}` is healthy: leader `{}` running, {} other \
         member(s) streaming",
        live.url,
        healthy.version,
        node.scope,
        healthy.leader,
        healthy.members.len() - 1,
    );
    if !healthy.lagging.is_empty() {
        eprintln!(
            "note: Patroni shows {} behind by more than maximum_lag_on_failover ({} bytes); \
             Patroni's lag comes from positions its members publish once a loop, and the \
             takeover keeps the same primary: they catch up",
            healthy.lagging.join(", "),
            healthy.maximum_lag
        );
    }
    if !healthy.pending_restart.is_empty() {
        eprintln!(
            "note: pending restart: {}; the dynamic configuration carries the new values, \
             which PostgreSQL takes at its next restart (under mainstay as under Patroni)",
            healthy.pending_restart.join("; ")
        );
    }
    Ok(healthy)
}

/// The lines a takeover needs from the live cluster; `leader:` and `drop
/// slot:` keep their form for scripts.
fn print_takeover(healthy: &Healthy, paused: bool) {
    println!("leader: {}", healthy.leader);
    println!("paused: {}", if healthy.paused { "yes" } else { "no" });
    for slot in &healthy.slots {
        println!("drop slot: {slot}");
    }
    if healthy.paused && paused {
        println!(
            "next: the dynamic configuration carries Patroni's pause = true: once it is loaded \
             (`PUT /config`), mainstay is paused too (`mainstay ctl resume` ends it)"
        );
    }
    println!(
        "next: once Patroni is paused, stop it and start mainstay on {}, Patroni's leader, \
         first (its agent restarts the primary under a fencing guard: the one pause in \
         writes), then on each other node",
        healthy.leader
    );
    if healthy.slots.is_empty() {
        return;
    }
    println!(
        "next: once the takeover is done, drop the slots Patroni made (mainstay streams \
         through its own, mainstay_*), as a superuser on each node:"
    );
    let leader = std::iter::once((&healthy.leader, &healthy.slots));
    let replicas = healthy
        .replica_slots
        .iter()
        .map(|(member, slots)| (member, slots));
    for (member, slots) in leader.chain(replicas) {
        let statements: Vec<String> = slots
            .iter()
            .map(|slot| format!("SELECT pg_drop_replication_slot('{slot}');"))
            .collect();
        println!("  {member}: {}", statements.join(" "));
    }
}

/// The dynamic configuration must be one the agents accept.
fn check_dynamic(dynamic: &serde_json::Value) -> Result<(), String> {
    mainstay_core::DynamicConfig::from_json(dynamic)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Creates `path` (0600: it holds passwords); fails if it exists.
fn write_new(path: &Path, contents: &str) -> Result<(), (u8, String)> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| (2, format!("{}: cannot create it: {e}", path.display())))?;
    file.write_all(contents.as_bytes())
        .map_err(|e| (2, format!("{}: cannot write it: {e}", path.display())))
}
