//! Checks PostgreSQL parameters with this node's own server before they are
//! stored or applied: `postgres -C` parses a scratch configuration file with
//! exactly the rules a start would apply (names, types, units, ranges, enum
//! values, parameters that cannot be set), the libraries named in
//! `*_preload_libraries` must exist here, and `shared_buffers` must fit in
//! this machine's memory. A value PostgreSQL refuses in its configuration
//! file stops the server at its next start, typically long after the change,
//! on every node at once: refusing it up front is the only safe moment.

use crate::account::Account;
use crate::conf::quote_conf;
use crate::error::{Error, Result};
use crate::tool;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// One parameter PostgreSQL would refuse, and why (its own words).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamProblem {
    /// The parameter at fault; empty when PostgreSQL did not name one.
    pub parameter: String,
    pub message: String,
}

/// The parameters whose libraries are loaded at start or connection time.
const LIBRARY_LISTS: [&str; 3] = [
    "shared_preload_libraries",
    "session_preload_libraries",
    "local_preload_libraries",
];

const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything wrong with `parameters` (the complete set this node would
/// write: the cluster's, overridden by its own file) for the server in
/// `bin_dir`, run as `run_as` (the account PostgreSQL runs as; `None`: this
/// process's). An empty list means a start would accept them.
pub async fn check_parameters(
    bin_dir: &Path,
    run_as: Option<&str>,
    parameters: &BTreeMap<String, String>,
) -> Result<Vec<ParamProblem>> {
    let account = Account::resolve(run_as)?;
    let bin_dir = bin_dir.to_path_buf();
    let parameters = parameters.clone();
    tokio::task::spawn_blocking(move || check_blocking(&bin_dir, &account, &parameters))
        .await
        .map_err(|e| Error::Config(format!("the parameter check did not finish: {e}")))?
}

fn check_blocking(
    bin_dir: &Path,
    account: &Account,
    parameters: &BTreeMap<String, String>,
) -> Result<Vec<ParamProblem>> {
    let scratch = tempfile::Builder::new()
        .prefix("mainstay-param-check")
        .tempdir()
        .map_err(|e| Error::io("create a scratch directory for the parameter check", e))?;
    account.chown(scratch.path())?;
    let conf = scratch.path().join("check.conf");
    account.write_file(&conf, render(parameters).as_bytes(), 0o600)?;
    let run = |name: &str| postgres_c(bin_dir, account, scratch.path(), &conf, name);
    let shared_buffers = match run("shared_buffers")? {
        Ok(blocks) => blocks,
        Err(stderr) => {
            // The scratch file's name means nothing to the reader, and would
            // make the same problem look different on each check.
            let scratch_file = format!(" in file \"{}\"", conf.display());
            return Ok(problems_from(&stderr)
                .into_iter()
                .map(|mut problem| {
                    if let Some(at) = problem.message.find(&scratch_file) {
                        problem.message.truncate(at);
                    }
                    problem
                })
                .collect());
        }
    };
    let mut problems = missing_libraries(bin_dir, account, parameters);
    if parameters.contains_key("shared_buffers") {
        let block_size = match run("block_size")? {
            Ok(size) => size.parse::<u64>().unwrap_or(8192),
            Err(_) => 8192,
        };
        if let (Ok(blocks), Some(memory)) = (shared_buffers.parse::<u64>(), memory_total())
            && let Some(problem) = too_big(blocks.saturating_mul(block_size), memory)
        {
            problems.push(problem);
        }
    }
    Ok(problems)
}

/// What PostgreSQL would refuse in the configuration files of `data_dir`
/// as they are now (`postgresql.conf`, what it includes, ALTER SYSTEM's
/// `postgresql.auto.conf`): checked before a restart, which would otherwise
/// stop a working server and fail to start it again.
pub async fn check_data_dir(
    bin_dir: &Path,
    run_as: Option<&str>,
    data_dir: &Path,
) -> Result<Vec<ParamProblem>> {
    let account = Account::resolve(run_as)?;
    let mut cmd = tool::command(&bin_dir.join("postgres"), &account);
    cmd.arg("-C").arg("port").arg("-D").arg(data_dir);
    let outcome = tokio::task::spawn_blocking(move || tool::run_sync(cmd, CHECK_TIMEOUT))
        .await
        .map_err(|e| Error::Config(format!("the configuration check did not finish: {e}")))?;
    match outcome {
        Ok(_) => Ok(Vec::new()),
        Err(Error::Tool { tail, .. }) => Ok(problems_from(&tail)),
        Err(other) => Err(other),
    }
}

/// The scratch file: only the parameters under test, one per line, written
/// as `mainstay.conf` writes them.
fn render(parameters: &BTreeMap<String, String>) -> String {
    parameters
        .iter()
        .map(|(name, value)| format!("{name} = {}\n", quote_conf(value)))
        .collect()
}

/// `postgres -C name` on the scratch file: `Ok(Ok(value))` when the file is
/// accepted, `Ok(Err(stderr))` when PostgreSQL refuses it.
fn postgres_c(
    bin_dir: &Path,
    account: &Account,
    scratch: &Path,
    conf: &Path,
    name: &str,
) -> Result<std::result::Result<String, String>> {
    // It neither starts a server nor touches a data directory (the scratch
    // one is empty).
    let mut cmd = tool::command(&bin_dir.join("postgres"), account);
    cmd.arg("-C")
        .arg(name)
        .arg(format!("--config-file={}", conf.display()))
        .arg("-D")
        .arg(scratch);
    match tool::run_sync(cmd, CHECK_TIMEOUT) {
        Ok(stdout) => Ok(Ok(stdout.trim().to_string())),
        Err(Error::Tool { tail, .. }) => Ok(Err(tail)),
        Err(other) => Err(other),
    }
}

/// PostgreSQL's complaints about a configuration file, one per parameter,
/// with its hint (e.g. the allowed values) appended.
pub fn problems_from(stderr: &str) -> Vec<ParamProblem> {
    let mut problems: Vec<ParamProblem> = Vec::new();
    for line in stderr.lines() {
        let Some((level, message)) = ["LOG:", "FATAL:", "ERROR:", "HINT:", "DETAIL:"]
            .iter()
            .find_map(|level| line.split_once(level).map(|(_, m)| (*level, m.trim())))
        else {
            continue;
        };
        if message.starts_with("skipping missing configuration file") {
            continue;
        }
        if matches!(level, "HINT:" | "DETAIL:") {
            if let Some(last) = problems.last_mut() {
                last.message = format!("{} ({message})", last.message);
            }
            continue;
        }
        if level == "FATAL:" && message.contains("contains errors") && !problems.is_empty() {
            continue;
        }
        problems.push(ParamProblem {
            parameter: named_parameter(message).unwrap_or_default(),
            message: message.to_string(),
        });
    }
    if problems.is_empty() {
        problems.push(ParamProblem {
            parameter: String::new(),
            message: format!("PostgreSQL refused the parameters: {}", stderr.trim()),
        });
    }
    problems
}

/// The name in `... parameter "name" ...`, PostgreSQL's wording for every
/// per-parameter complaint.
fn named_parameter(message: &str) -> Option<String> {
    let (_, rest) = message.split_once("parameter \"")?;
    let (name, _) = rest.split_once('"')?;
    Some(name.to_string())
}

/// Libraries named in the preload lists that this node does not have: the
/// server would refuse to start (shared) or every new session would fail
/// (session, local).
fn missing_libraries(
    bin_dir: &Path,
    account: &Account,
    parameters: &BTreeMap<String, String>,
) -> Vec<ParamProblem> {
    let libdir = package_library_dir(bin_dir, account);
    let search: Vec<PathBuf> = parameters
        .get("dynamic_library_path")
        .map_or("$libdir", String::as_str)
        .split(':')
        .map(|dir| expand_libdir(dir.trim(), &libdir))
        .collect();
    let mut problems = Vec::new();
    for list in LIBRARY_LISTS {
        let Some(value) = parameters.get(list) else {
            continue;
        };
        for library in library_names(value) {
            // local_preload_libraries may only load from $libdir/plugins.
            let places = if list == "local_preload_libraries" && !library.contains('/') {
                vec![libdir.join("plugins")]
            } else {
                search.clone()
            };
            if !library_exists(&library, &places, &libdir) {
                problems.push(ParamProblem {
                    parameter: list.to_string(),
                    message: format!(
                        "library {library:?} is not installed on this node (looked in {}); \
                         install its package here first",
                        places
                            .iter()
                            .map(|p| p.display().to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                });
            }
        }
    }
    problems
}

/// The names in a comma-separated list, without quotes and blanks.
pub fn library_names(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(|name| name.trim().trim_matches('"').trim().to_string())
        .filter(|name| !name.is_empty())
        .collect()
}

fn library_exists(library: &str, places: &[PathBuf], libdir: &Path) -> bool {
    let candidates: Vec<PathBuf> = if library.contains('/') {
        vec![expand_libdir(library, libdir)]
    } else {
        places.iter().map(|dir| dir.join(library)).collect()
    };
    candidates.iter().any(|path| {
        path.is_file() || {
            let mut with_suffix = path.clone().into_os_string();
            with_suffix.push(".so");
            Path::new(&with_suffix).is_file()
        }
    })
}

fn expand_libdir(path: &str, libdir: &Path) -> PathBuf {
    match path.strip_prefix("$libdir") {
        Some(rest) => PathBuf::from(format!("{}{rest}", libdir.display())),
        None => PathBuf::from(path),
    }
}

/// Where this server's extension libraries live: `pg_config --pkglibdir`,
/// or the Debian layout beside `bin_dir` when pg_config is absent.
fn package_library_dir(bin_dir: &Path, account: &Account) -> PathBuf {
    let pg_config = bin_dir.join("pg_config");
    if pg_config.is_file() {
        let mut cmd = tool::command(&pg_config, account);
        cmd.arg("--pkglibdir");
        if let Ok(dir) = tool::run_sync(cmd, CHECK_TIMEOUT) {
            let dir = PathBuf::from(dir.trim());
            if dir.is_dir() {
                return dir;
            }
        }
    }
    bin_dir.parent().unwrap_or(bin_dir).join("lib")
}

/// `shared_buffers` at or above this machine's memory: the server could
/// not allocate it at its next start.
pub fn too_big(shared_buffers: u64, memory: u64) -> Option<ParamProblem> {
    (shared_buffers >= memory).then(|| ParamProblem {
        parameter: "shared_buffers".into(),
        message: format!(
            "{} MiB is not less than this node's memory ({} MiB): PostgreSQL could not \
             allocate it and would not start; a quarter of the memory is usual",
            shared_buffers >> 20,
            memory >> 20
        ),
    })
}

/// Physical memory in bytes, from /proc/meminfo.
fn memory_total() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgresql_complaints_become_one_problem_per_parameter() {
        let stderr = "\
2026-12-06 21:20:02.771 GMT [1] LOG:  skipping missing configuration file \"/x/postgresql.auto.conf\"
2026-12-06 21:20:02.771 GMT [1] LOG:  0 is outside the valid range for parameter \"max_connections\" (1 .. 262143)
2026-12-06 21:20:02.791 GMT [1] LOG:  invalid value for parameter \"wal_level\": \"bogus\"
2026-12-06 21:20:02.791 GMT [1] HINT:  Available values: minimal, replica, logical.
2026-12-06 21:20:02.781 GMT [1] LOG:  unrecognized configuration parameter \"foo_bar\" in file \"/x/check.conf\" line 2
2026-12-06 21:20:02.771 GMT [1] FATAL:  configuration file \"/x/check.conf\" contains errors";
        let problems = problems_from(stderr);
        let named: Vec<&str> = problems.iter().map(|p| p.parameter.as_str()).collect();
        assert_eq!(named, ["max_connections", "wal_level", "foo_bar"]);
        assert!(problems[1].message.contains("Available values: minimal"));
        // Nothing recognisable: the whole output, never an empty list.
        let odd = problems_from("something else went wrong");
        assert_eq!(odd.len(), 1);
        assert!(odd[0].message.contains("something else"));
    }

    #[test]
    fn library_lists_are_split_like_postgresql_does() {
        assert_eq!(
            library_names(" pg_stat_statements, \"auto_explain\" ,,$libdir/x"),
            ["pg_stat_statements", "auto_explain", "$libdir/x"]
        );
        assert!(library_names("").is_empty());
    }

    #[test]
    fn libraries_are_found_with_or_without_their_suffix() {
        let dir = tempfile::tempdir().unwrap();
        let libdir = dir.path().join("lib");
        std::fs::create_dir_all(libdir.join("plugins")).unwrap();
        std::fs::write(libdir.join("present.so"), b"").unwrap();
        std::fs::write(libdir.join("plugins/plug.so"), b"").unwrap();
        let places = [libdir.clone()];
        assert!(library_exists("present", &places, &libdir));
        assert!(library_exists("present.so", &places, &libdir));
        assert!(library_exists("$libdir/present", &places, &libdir));
        assert!(!library_exists("absent", &places, &libdir));
        assert!(!library_exists("/nowhere/present", &places, &libdir));
        assert!(library_exists("plug", &[libdir.join("plugins")], &libdir));
    }

    #[test]
    fn shared_buffers_must_fit_in_memory() {
        assert!(too_big(1 << 40, 24 << 30).is_some());
        assert!(too_big(24 << 30, 24 << 30).is_some());
        assert!(too_big(6 << 30, 24 << 30).is_none());
    }
}
