//! `mainstay migrate from-patroni`: writes the mainstay node file and the
//! dynamic configuration equivalent to a Patroni node's configuration,
//! after saying what it dropped and refusing what it could not map (unless
//! accepted). Nothing is written on a refusal, and nothing is overwritten.

use mainstay_agent::config::Config;
use mainstay_migrate::{Disposition, from_patroni};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(clap::Subcommand)]
pub enum MigrateCommand {
    /// Read a Patroni node's YAML configuration; write the equivalent
    /// mainstay.toml and dynamic configuration (docs/migrating-from-patroni.md).
    FromPatroni(FromPatroniArgs),
}

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

fn from_patroni_files(args: &FromPatroniArgs) -> Result<(), (u8, String)> {
    let source = args.patroni_config.display();
    let text = std::fs::read_to_string(&args.patroni_config)
        .map_err(|e| (2, format!("{source}: cannot read it: {e}")))?;
    let migration = from_patroni(&text).map_err(|e| (2, format!("{source}: {e}")))?;
    for note in &migration.notes {
        let tag = match note.disposition {
            Disposition::Dropped => "dropped",
            Disposition::Unmapped => "NOT MAPPED",
        };
        eprintln!("{tag}: {}: {}", note.key, note.reason);
    }
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
    let dynamic = serde_json::to_string_pretty(&migration.dynamic).unwrap_or_default();
    check_dynamic(&migration.dynamic).map_err(|e| (1, format!("{source}: bootstrap.dcs: {e}")))?;
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
    write_new(&args.output, &node_file)?;
    write_new(&args.dynamic_output, &format!("{dynamic}\n"))?;
    println!(
        "wrote {} (the node file) and {} (the dynamic configuration: `PUT /config` once the \
         cluster runs under mainstay); see docs/migrating-from-patroni.md",
        args.output.display(),
        args.dynamic_output.display()
    );
    Ok(())
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
