//! The `mainstay` command line: `init`, `check`, `agent`, `witness`, `config check`, `ctl`,
//! `demo`, `bench`.

#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};
use mainstay_agent::check::Severity;
use mainstay_agent::config::Config;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "mainstay",
    version,
    about = "High availability for PostgreSQL and the services beside it"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent that manages this node's PostgreSQL.
    Agent {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run a witness: this node's etcd member and a small API, no
    /// PostgreSQL (the third vote of a two-server cluster).
    Witness {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Set this server up: its configuration, certificate and systemd unit
    /// (the first node: --cluster; the others: --join TOKEN).
    Init(mainstay_init::InitArgs),
    /// Preflight: can this node (or witness) start? Each finding says what,
    /// why and the fix. Exit 0 (ok), 1 (warnings) or 2 (something blocks).
    Check {
        #[arg(long, short, default_value = "/etc/mainstay/mainstay.toml")]
        config: PathBuf,
        /// One JSON document: the findings and the exit code.
        #[arg(long)]
        json: bool,
    },
    /// Configuration files.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Operate a running cluster through any agent's REST API.
    Ctl(mainstay_agent::ctl::CtlArgs),
    /// Start etcd and N agents with PostgreSQL on this machine (loopback).
    Demo(mainstay_lab::demo::DemoArgs),
    /// Benchmarks on a local cluster (see README for the figures).
    Bench {
        #[command(subcommand)]
        command: mainstay_lab::bench::BenchCommand,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a configuration file; exit 2 with the reason if it is bad.
    Check { file: PathBuf },
}

fn main() -> ExitCode {
    // `mainstay guard ...` is the postmaster's fencing guard, started by the
    // agent; it must not start a runtime, threads or logging first.
    mainstay_guard::run_if_asked();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            let _ = err.print();
            return if err.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match cli.command {
        Command::Config {
            command: ConfigCommand::Check { file },
        } if is_witness_file(&file) => match mainstay_agent::config::WitnessConfig::load(&file) {
            Ok(config) => {
                println!(
                    "{}: ok (witness {} of cluster {}, etcd member at {}, election timeout {:?})",
                    file.display(),
                    config.name,
                    config.cluster,
                    config.etcd_member.peer_url,
                    config.etcd_member.timing.election_timeout
                );
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("error: {err}");
                ExitCode::from(2)
            }
        },
        Command::Config {
            command: ConfigCommand::Check { file },
        } => match Config::load(&file) {
            Ok(config) => {
                // PostgreSQL runs only under its fencing guard: this
                // machine must be able to run it.
                if let Err(why) = mainstay_pg::check_guard(std::path::Path::new("/proc/self/exe")) {
                    eprintln!(
                        "error: {}: {why}; mainstay needs Linux 5.3 or later with /proc mounted",
                        file.display()
                    );
                    return ExitCode::from(2);
                }
                // Opens the watchdog device (and closes it cleanly) only
                // when watchdog.mode asks for one.
                let watchdog = config.check_watchdog(&file);
                match &watchdog {
                    mainstay_agent::config::WatchdogCheck::Error(err) => {
                        eprintln!("error: {err}");
                        return ExitCode::from(2);
                    }
                    mainstay_agent::config::WatchdogCheck::Warning(err) => {
                        eprintln!("warning: {err}")
                    }
                    _ => {}
                }
                let t = config.timing;
                println!(
                    "{}: ok (cluster {}, node {}, ttl {:?}, loop_wait {:?}, renew every {:?}, fencing margin {:?})",
                    file.display(),
                    config.cluster,
                    config.name,
                    t.ttl,
                    t.loop_wait,
                    t.renew_interval,
                    t.fencing_margin
                );
                if let mainstay_agent::config::WatchdogCheck::Ready(line) = watchdog {
                    println!("{line}");
                }
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("error: {err}");
                ExitCode::from(2)
            }
        },
        Command::Agent { config } => {
            let config_path = config;
            let config = match Config::load(&config_path) {
                Ok(config) => config,
                Err(err) => {
                    eprintln!("error: {err}");
                    return ExitCode::from(2);
                }
            };
            init_logging();
            // What would make every start fail is said once, here, rather
            // than as an error deep in each attempt's log.
            let findings = mainstay_agent::check::at_start(&config);
            for finding in findings.iter().filter(|f| f.severity == Severity::Warning) {
                tracing::warn!("preflight: {}", finding.to_string().replace('\n', " "));
            }
            if mainstay_agent::check::exit_code(&findings) == 2 {
                eprintln!(
                    "error: this node cannot start (see `mainstay check --config {}`):",
                    config_path.display()
                );
                for finding in findings.iter().filter(|f| f.severity == Severity::Blocking) {
                    eprintln!("{finding}");
                }
                return ExitCode::from(2);
            }
            mainstay_agent::proxy::raise_open_files_limit();
            runtime().block_on(run_agent(config))
        }
        Command::Init(args) => mainstay_init::run(args),
        Command::Check { config, json } => runtime().block_on(check(&config, json)),
        Command::Witness { config } => {
            let config = match mainstay_agent::config::WitnessConfig::load(&config) {
                Ok(config) => config,
                Err(err) => {
                    eprintln!("error: {err}");
                    return ExitCode::from(2);
                }
            };
            init_logging();
            runtime().block_on(run_witness(config))
        }
        Command::Demo(args) => {
            init_logging();
            runtime().block_on(mainstay_lab::demo::run(args))
        }
        Command::Bench { command } => runtime().block_on(mainstay_lab::bench::run(command)),
        Command::Ctl(args) => runtime().block_on(mainstay_agent::ctl::run(args)),
    }
}

async fn check(path: &std::path::Path, json: bool) -> ExitCode {
    let findings = if is_witness_file(path) {
        match mainstay_agent::config::WitnessConfig::load(path) {
            Ok(config) => mainstay_agent::check::witness(&config).await,
            Err(err) => vec![config_refused(err)],
        }
    } else {
        match Config::load(path) {
            Ok(config) => mainstay_agent::check::node(&config).await,
            Err(err) => vec![config_refused(err)],
        }
    };
    let code = mainstay_agent::check::exit_code(&findings);
    if json {
        println!(
            "{}",
            serde_json::json!({ "findings": findings, "exit_code": code })
        );
    } else {
        for finding in &findings {
            println!("{finding}");
        }
        let summary = match code {
            0 => "everything checked is ready",
            1 => "warnings: the node can start, but read them",
            _ => "something blocks: fix it before starting",
        };
        println!("{summary}");
    }
    ExitCode::from(code)
}

fn config_refused(err: mainstay_agent::config::ConfigError) -> mainstay_agent::check::Finding {
    mainstay_agent::check::Finding::new(
        Severity::Blocking,
        "config",
        err.to_string(),
        "nothing starts with a configuration that does not parse",
        "see docs/configuration.md".into(),
    )
}

/// A file with no `[postgresql]` section is a witness's: checked as one.
fn is_witness_file(path: &std::path::Path) -> bool {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|text| text.parse::<toml::Table>().ok())
        .is_some_and(|table| !table.contains_key("postgresql"))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("cannot start the async runtime")
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MAINSTAY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .init();
}

async fn run_agent(config: Config) -> ExitCode {
    // Before anything else happens: a VIP the agent cannot manage would be
    // a silent hole in the failover.
    if config.vip.is_some()
        && let Err(err) = mainstay_agent::vip::check_capabilities()
    {
        eprintln!("error: {err}");
        return ExitCode::from(1);
    }
    // The node's etcd member stops only after the agent has handed its
    // leadership over.
    let (etcd_member, dcs, shutdown) = match start(config.etcd_member.clone(), &config.etcd).await {
        Ok(started) => started,
        Err(code) => return code,
    };
    let mut agent = mainstay_agent::agent::Agent::new(&config, dcs);
    if let Some(member) = &etcd_member {
        agent = agent.with_etcd_member(member.handle());
    }
    let outcome = agent.run(shutdown).await;
    if let Some(member) = etcd_member {
        tokio::task::spawn_blocking(move || member.stop())
            .await
            .ok();
    }
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(reason) => {
            eprintln!("error: {reason}");
            ExitCode::from(1)
        }
    }
}

/// What an agent and a witness start alike: the node's etcd member first
/// (the first request may need it for a quorum), the etcd client, and the
/// signal handlers.
async fn start(
    member: Option<mainstay_etcd_member::MemberSpec>,
    etcd: &mainstay_dcs::EtcdSettings,
) -> Result<
    (
        Option<mainstay_etcd_member::Member>,
        mainstay_dcs::EtcdDcs,
        impl Future<Output = ()> + use<>,
    ),
    ExitCode,
> {
    // A member removed from its cluster while away joins it again by
    // itself; its hook needs the etcd client, made once the member runs.
    let client = std::sync::Arc::new(std::sync::OnceLock::new());
    let member = member.map(|spec| {
        let rejoin = mainstay_agent::etcd_rejoin::Rejoin::new(
            tokio::runtime::Handle::current(),
            client.clone(),
            &spec,
            &etcd.endpoints,
        );
        mainstay_etcd_member::Member::start_with(spec, Some(rejoin.into_hook()))
    });
    let member = match member {
        None => None,
        Some(Ok(member)) => Some(member),
        Some(Err(err)) => {
            eprintln!(
                "error: cannot run this node's etcd member: {err}; see etcd.bin and etcd.data_dir"
            );
            return Err(ExitCode::from(1));
        }
    };
    let dcs = match mainstay_dcs::EtcdDcs::connect(etcd.clone()).await {
        Ok(dcs) => {
            let _ = client.set(dcs.clone());
            dcs
        }
        Err(err) => {
            eprintln!("error: cannot set up the etcd client: {err}");
            return Err(ExitCode::from(1));
        }
    };
    match shutdown_signal() {
        Ok(shutdown) => Ok((member, dcs, shutdown)),
        Err(err) => {
            eprintln!("error: cannot install the SIGTERM/SIGINT handlers: {err}");
            Err(ExitCode::from(1))
        }
    }
}

async fn run_witness(config: mainstay_agent::config::WitnessConfig) -> ExitCode {
    let (member, dcs, shutdown) = match start(Some(config.etcd_member.clone()), &config.etcd).await
    {
        Ok((Some(member), dcs, shutdown)) => (member, dcs, shutdown),
        Ok(_) => unreachable!("a witness always has its member"),
        Err(code) => return code,
    };
    let outcome = mainstay_agent::witness::run(&config, dcs, Some(member.handle()), shutdown).await;
    tokio::task::spawn_blocking(move || member.stop())
        .await
        .ok();
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::from(1)
        }
    }
}

/// The handlers are installed here, before the agent starts, not on the
/// future's first poll: the agent's loop may not poll it for several turns
/// (select! stops at the first ready branch), and a SIGTERM arriving before
/// that would kill the process with the default action, leaving the leader
/// key to expire instead of being handed over.
fn shutdown_signal() -> std::io::Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}
