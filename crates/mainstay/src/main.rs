//! The `mainstay` command line: `agent`, `config check`, `ctl`, `demo`, `bench`.

#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};
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
            let config = match Config::load(&config) {
                Ok(config) => config,
                Err(err) => {
                    eprintln!("error: {err}");
                    return ExitCode::from(2);
                }
            };
            init_logging();
            mainstay_agent::proxy::raise_open_files_limit();
            runtime().block_on(run_agent(config))
        }
        Command::Demo(args) => {
            init_logging();
            runtime().block_on(mainstay_lab::demo::run(args))
        }
        Command::Bench { command } => runtime().block_on(mainstay_lab::bench::run(command)),
        Command::Ctl(args) => runtime().block_on(mainstay_agent::ctl::run(args)),
    }
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
    // The node's own etcd member first: the agent's first request may need
    // it for a quorum. It stops after the agent has handed leadership over.
    let etcd_member = match config
        .etcd_member
        .clone()
        .map(mainstay_etcd_member::Member::start)
    {
        None => None,
        Some(Ok(member)) => Some(member),
        Some(Err(err)) => {
            eprintln!(
                "error: cannot run this node's etcd member: {err}; see etcd.bin and etcd.data_dir"
            );
            return ExitCode::from(1);
        }
    };
    let dcs = match mainstay_dcs::EtcdDcs::connect(config.etcd.clone()).await {
        Ok(dcs) => dcs,
        Err(err) => {
            eprintln!("error: cannot set up the etcd client: {err}");
            return ExitCode::from(1);
        }
    };
    let shutdown = match shutdown_signal() {
        Ok(shutdown) => shutdown,
        Err(err) => {
            eprintln!("error: cannot install the SIGTERM/SIGINT handlers: {err}");
            return ExitCode::from(1);
        }
    };
    let mut agent = mainstay_agent::agent::Agent::new(&config, dcs);
    if let Some(member) = &etcd_member {
        agent = agent.with_etcd_member(member.reader());
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
