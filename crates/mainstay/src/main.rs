//! The `mainstay` command line: `init`, `check`, `agent`, `witness`, `config check`, `ctl`,
//! `demo`, `bench`.

#![forbid(unsafe_code)]

mod migrate;

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
    /// Run the agent that manages this node's PostgreSQL. SIGHUP
    /// (`systemctl reload`) re-executes it in place: PostgreSQL keeps
    /// running (how a package upgrade moves it to the new binary).
    Agent {
        #[arg(long, short)]
        config: PathBuf,
        /// What the agent this one was re-executed from handed over.
        #[arg(long = "handover-fd", hide = true)]
        handover_fd: Option<i32>,
    },
    /// Run a witness: this node's etcd member and a small API, no
    /// PostgreSQL (the third vote of a two-server cluster). SIGHUP
    /// re-executes it in place.
    Witness {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long = "handover-fd", hide = true)]
        handover_fd: Option<i32>,
    },
    /// Re-execute every running agent and witness of this binary in place
    /// (SIGHUP), and wait until each runs the binary now installed: what a
    /// package upgrade does where systemd does not run the agents.
    ReloadRunning,
    /// Prints the version of the re-exec handover this binary takes (an
    /// agent checks it before re-executing into it).
    #[command(name = "handover-version", hide = true)]
    HandoverVersion,
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
    /// Move to mainstay from another HA manager.
    Migrate {
        #[command(subcommand)]
        command: migrate::MigrateCommand,
    },
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
        Command::Agent {
            config,
            handover_fd,
        } => {
            let config_path = config;
            let config = match Config::load(&config_path) {
                Ok(config) => config,
                Err(err) => {
                    eprintln!("error: {err}");
                    return ExitCode::from(2);
                }
            };
            init_logging();
            let handover = match handover_fd.map(mainstay_agent::reexec::read_handover) {
                None => None,
                Some(Ok(handover)) => Some(handover),
                Some(Err(err)) => {
                    // The guards' sockets, if any, close with this process:
                    // PostgreSQL is fenced, nothing runs unguarded.
                    eprintln!("error: {err}");
                    return ExitCode::from(1);
                }
            };
            if let Some(handover) = handover {
                // The checks of a start do not apply: the ports are this
                // agent's own PostgreSQL's.
                tracing::info!("re-executed in place: taking over from the previous image");
                mainstay_agent::proxy::raise_open_files_limit();
                return runtime().block_on(run_agent(config, &config_path, Some(handover)));
            }
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
            runtime().block_on(run_agent(config, &config_path, None))
        }
        Command::Init(args) => mainstay_init::run(args),
        Command::Check { config, json } => runtime().block_on(check(&config, json)),
        Command::Witness {
            config,
            handover_fd,
        } => {
            let config_path = config;
            let config = match mainstay_agent::config::WitnessConfig::load(&config_path) {
                Ok(config) => config,
                Err(err) => {
                    eprintln!("error: {err}");
                    return ExitCode::from(2);
                }
            };
            init_logging();
            // A witness hands nothing over: its file only closes.
            if let Some(Err(err)) = handover_fd.map(mainstay_agent::reexec::read_handover) {
                tracing::warn!("{err}");
            }
            runtime().block_on(run_witness(config, &config_path))
        }
        Command::ReloadRunning => mainstay_agent::reload_running::reload_running(),
        Command::HandoverVersion => {
            println!("{}", mainstay_agent::reexec::HANDOVER_VERSION);
            ExitCode::SUCCESS
        }
        Command::Demo(args) => {
            init_logging();
            runtime().block_on(mainstay_lab::demo::run(args))
        }
        Command::Bench { command } => runtime().block_on(mainstay_lab::bench::run(command)),
        Command::Ctl(args) => runtime().block_on(mainstay_agent::ctl::run(args)),
        Command::Migrate { command } => migrate::run(command),
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
    // Colours only for a person at a terminal: journald and log files
    // would keep the escape codes.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

async fn run_agent(
    config: Config,
    config_path: &std::path::Path,
    handover: Option<mainstay_agent::reexec::Handover>,
) -> ExitCode {
    // Before anything else happens: a VIP the agent cannot manage would be
    // a silent hole in the failover.
    if config.vip.is_some()
        && let Err(err) = mainstay_agent::vip::check_capabilities()
    {
        eprintln!("error: {err}");
        return ExitCode::from(1);
    }
    // Before anything else: a SIGHUP must never find the default action
    // (which kills), the one held back during a re-exec included.
    let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
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
    if let Some(handover) = handover {
        agent = agent.with_handover(handover);
    }
    match (
        mainstay_agent::reexec::Program::current(config_path),
        hangup,
    ) {
        (Ok(program), Ok(signal)) => agent = agent.with_reexec(program, signal),
        (Err(err), _) | (_, Err(err)) => {
            tracing::warn!("SIGHUP will not re-execute this agent: {err}");
        }
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
    // The handlers first (the caller installed SIGHUP's): then what a
    // previous image held back during its re-exec may come.
    let shutdown = match shutdown_signal() {
        Ok(shutdown) => shutdown,
        Err(err) => {
            eprintln!("error: cannot install the SIGTERM/SIGINT handlers: {err}");
            return Err(ExitCode::from(1));
        }
    };
    if let Err(err) = mainstay_agent::reexec::release_held_signals() {
        eprintln!("error: cannot unblock SIGHUP/SIGTERM/SIGINT: {err}");
        return Err(ExitCode::from(1));
    }
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
    Ok((member, dcs, shutdown))
}

async fn run_witness(
    config: mainstay_agent::config::WitnessConfig,
    config_path: &std::path::Path,
) -> ExitCode {
    let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
    let (member, dcs, shutdown) = match start(Some(config.etcd_member.clone()), &config.etcd).await
    {
        Ok((Some(member), dcs, shutdown)) => (member, dcs, shutdown),
        Ok(_) => unreachable!("a witness always has its member"),
        Err(code) => return code,
    };
    // SIGHUP re-executes the witness once its successor checked out: it
    // holds nothing that must outlive the exec (its member key comes back
    // on a new lease).
    let program = mainstay_agent::reexec::Program::current(config_path);
    let reexec = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop = {
        let reexec = reexec.clone();
        let program = program.as_ref().ok().cloned();
        async move {
            let (Some(program), Ok(mut hangup)) = (program, hangup) else {
                return shutdown.await;
            };
            tokio::pin!(shutdown);
            loop {
                tokio::select! {
                    _ = &mut shutdown => return,
                    _ = hangup.recv() => {
                        let check = program.clone();
                        match tokio::task::spawn_blocking(move || check.check_successor(true)).await {
                            Ok(Ok(())) => {
                                reexec.store(true, std::sync::atomic::Ordering::SeqCst);
                                return;
                            }
                            Ok(Err(why)) => tracing::error!("re-exec refused, still running this binary: {why}"),
                            Err(err) => tracing::error!("re-exec refused: {err}"),
                        }
                    }
                }
            }
        }
    };
    let outcome = mainstay_agent::witness::run(&config, dcs, Some(member.handle()), stop).await;
    tokio::task::spawn_blocking(move || member.stop())
        .await
        .ok();
    if reexec.load(std::sync::atomic::Ordering::SeqCst)
        && let Ok(program) = &program
    {
        tracing::info!(exe = %program.exe.display(), "re-executing the witness in place");
        let err = program.exec(&mainstay_agent::reexec::Handover::default());
        eprintln!("error: cannot re-execute {}: {err}", program.exe.display());
        return ExitCode::from(1);
    }
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
