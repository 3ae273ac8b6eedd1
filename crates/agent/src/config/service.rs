//! `[[service]]`: the applications this node runs beside PostgreSQL,
//! turned into `mainstay_services::ServiceSpec`s in start order; and
//! `[callbacks]`, the hooks run when PostgreSQL starts, stops or changes
//! role. Every
//! refusal names the service and the key (`service.synapse.user`) and says
//! how to fix it; programs, accounts and directories are looked up here, so
//! a node never starts with a service it could not run.

use super::file::{ByteSize, CallbacksSection, CheckSection, RestartSection, ServiceSection};
use super::parse_size;
use mainstay_services::hooks::Hooks;
use mainstay_services::order::start_order;
use mainstay_services::spec::{Account, LogSpec};
use mainstay_services::{
    CheckProbe, HealthCheck, OnFailure, Placement, RestartPolicy, ServiceSpec,
};
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A refused value: its key (`service.NAME.KEY`), and what is wrong.
pub(super) type ServiceRefusal = (String, String);

const DEFAULT_LOG_MAX_BYTES: u64 = 64 << 20;
const DEFAULT_LOG_KEEP: u32 = 3;
const DEFAULT_STOP_GRACE_SECS: f64 = 10.0;
const DEFAULT_START_TIMEOUT_SECS: f64 = 60.0;
const DEFAULT_CHECK_INTERVAL_SECS: f64 = 5.0;
const DEFAULT_CHECK_TIMEOUT_SECS: f64 = 2.0;
const DEFAULT_CHECK_FAILURES: u32 = 3;
const DEFAULT_HTTP_STATUS: u16 = 200;
const DEFAULT_HOOK_TIMEOUT_SECS: f64 = 30.0;
const DEFAULT_RESTART: RestartPolicy = RestartPolicy {
    initial_backoff: Duration::from_secs(1),
    max_backoff: Duration::from_secs(60),
    limit: 5,
    window: Duration::from_secs(300),
};
/// Durations a service's keys take, in seconds: above zero, at most an hour.
const MAX_SECS: f64 = 3600.0;

/// The node's services in start order; `log_dir` and `node` name the
/// default log files (`<log_dir>/<node>.<service>.log`).
pub(super) fn services(
    sections: Vec<ServiceSection>,
    log_dir: &Path,
    node: &str,
) -> Result<Vec<ServiceSpec>, ServiceRefusal> {
    let mut specs = BTreeMap::new();
    for (index, section) in sections.into_iter().enumerate() {
        if !valid_name(&section.name) {
            return Err((
                format!("service[{index}].name"),
                format!(
                    "{:?} is not a valid service name: use 1-63 letters, digits, '-', '_' or '.'",
                    section.name
                ),
            ));
        }
        let name = section.name.clone();
        if specs.contains_key(&name) {
            return Err((
                format!("service.{name}.name"),
                "is used by two [[service]] sections: give each its own name".into(),
            ));
        }
        specs.insert(name, service(section, log_dir, node)?);
    }
    let depends_on = specs
        .iter()
        .map(|(name, spec)| (name.clone(), spec.depends_on.clone()))
        .collect();
    let order = start_order(&depends_on).map_err(|err| {
        let service = match &err {
            mainstay_services::order::OrderError::Unknown { service, .. } => service.clone(),
            mainstay_services::order::OrderError::Cycle(path) => path[0].clone(),
        };
        (format!("service.{service}.depends_on"), err.to_string())
    })?;
    for spec in specs.values() {
        for need in &spec.depends_on {
            let needed = specs[need].placement;
            if needed != Placement::Everywhere && needed != spec.placement {
                return Err((
                    format!("service.{}.depends_on", spec.name),
                    format!(
                        "{} runs {} but depends on {need}, which runs {}: it could not start \
                         everywhere it must; place {need} \"everywhere\" or the same way",
                        spec.name,
                        spec.placement.label(),
                        needed.label()
                    ),
                ));
            }
        }
    }
    Ok(order
        .into_iter()
        .map(|name| {
            specs
                .remove(&name)
                .expect("ordered names come from the map")
        })
        .collect())
}

fn service(
    section: ServiceSection,
    log_dir: &Path,
    node: &str,
) -> Result<ServiceSpec, ServiceRefusal> {
    let name = section.name;
    let key = |k: &str| format!("service.{name}.{k}");
    let (program, args) = argv_of(&section.command).map_err(|why| (key("command"), why))?;
    let placement = match section.placement.as_deref() {
        Some(text) => Placement::parse(text).ok_or_else(|| {
            (
                key("placement"),
                format!(
                    "{text:?} is not a placement: use \"with-leader\" (only beside the primary), \
                     \"everywhere\" or \"with-replica\""
                ),
            )
        })?,
        None => {
            return Err((
                key("placement"),
                "is missing: say where it runs, \"with-leader\", \"everywhere\" or \
                 \"with-replica\""
                    .into(),
            ));
        }
    };
    let account = account(section.user.as_deref(), section.group.as_deref())
        .map_err(|(k, why)| (key(k), why))?;
    if let Some(dir) = &section.working_directory
        && !(dir.is_absolute() && dir.is_dir())
    {
        return Err((
            key("working_directory"),
            format!(
                "{} is not an existing directory given by an absolute path",
                dir.display()
            ),
        ));
    }
    for (variable, value) in &section.environment {
        if variable.is_empty() || variable.contains(['=', '\0']) || value.contains('\0') {
            return Err((
                key("environment"),
                format!("{variable:?} cannot be set: names are non-empty, without '=' or NUL"),
            ));
        }
    }
    // The default sits beside the data directory, which the agent makes;
    // a file the operator names must be somewhere that exists.
    let log_path = match section.log_file {
        None => log_dir.join(format!("{node}.{name}.log")),
        Some(path) if path.is_absolute() && path.parent().is_some_and(Path::is_dir) => path,
        Some(path) => {
            return Err((
                key("log_file"),
                format!(
                    "{} must be an absolute path in an existing directory",
                    path.display()
                ),
            ));
        }
    };
    let max_bytes = match section.log_max_size {
        None => DEFAULT_LOG_MAX_BYTES,
        Some(ByteSize::Bytes(bytes)) => bytes,
        Some(ByteSize::Text(text)) => parse_size(&text).ok_or_else(|| {
            (
                key("log_max_size"),
                format!("{text:?} is not a size: give bytes or a number with kB, MB or GB"),
            )
        })?,
    };
    if max_bytes < 4096 {
        return Err((key("log_max_size"), "must be at least 4kB".into()));
    }
    let keep = section.log_keep.unwrap_or(DEFAULT_LOG_KEEP);
    if keep > 100 {
        return Err((
            key("log_keep"),
            format!("{keep} is more than 100 old files"),
        ));
    }
    let stop_signal = match section.stop_signal.as_deref() {
        None => libc::SIGTERM,
        Some(text) => signal(text).ok_or_else(|| {
            (
                key("stop_signal"),
                format!(
                    "{text:?} is not a stop signal: use SIGTERM, SIGINT, SIGQUIT, SIGHUP, \
                     SIGUSR1 or SIGUSR2 (SIGKILL follows after stop_grace anyway)"
                ),
            )
        })?,
    };
    let stop_grace = seconds(
        &key("stop_grace"),
        section.stop_grace,
        DEFAULT_STOP_GRACE_SECS,
    )?;
    let start_timeout = seconds(
        &key("start_timeout"),
        section.start_timeout,
        DEFAULT_START_TIMEOUT_SECS,
    )?;
    let checks = section
        .checks
        .into_iter()
        .enumerate()
        .map(|(i, check)| {
            health_check(check).map_err(|(k, why)| (key(&format!("check[{i}].{k}")), why))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let restart =
        restart(&section.restart).map_err(|(k, why)| (key(&format!("restart.{k}")), why))?;
    let on_failure = match section.on_failure.as_deref() {
        None | Some("report") => OnFailure::Report,
        Some("failover") if placement == Placement::WithLeader => OnFailure::Failover,
        Some("failover") => {
            return Err((
                key("on_failure"),
                "\"failover\" moves leadership, so only a with-leader service can ask for it: \
                 use \"report\""
                    .into(),
            ));
        }
        Some(other) => {
            return Err((
                key("on_failure"),
                format!("{other:?} is not a policy: use \"report\" or \"failover\""),
            ));
        }
    };
    Ok(ServiceSpec {
        depends_on: section
            .depends_on
            .into_iter()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect(),
        name,
        program,
        args,
        placement,
        account,
        working_directory: section.working_directory,
        environment: section.environment,
        log: LogSpec {
            path: log_path,
            max_bytes,
            keep,
        },
        stop_signal,
        stop_grace,
        start_timeout,
        checks,
        restart,
        on_failure,
    })
}

/// `[callbacks]`: each hook's program resolved like a service's.
pub(super) fn hooks(section: CallbacksSection) -> Result<Hooks, ServiceRefusal> {
    let command = |key: &str, argv: Option<Vec<String>>| -> Result<_, ServiceRefusal> {
        argv.map(|argv| {
            let (program, args) =
                argv_of(&argv).map_err(|why| (format!("callbacks.{key}"), why))?;
            let mut command = vec![program.to_string_lossy().into_owned()];
            command.extend(args);
            Ok(command)
        })
        .transpose()
    };
    Ok(Hooks {
        on_start: command("on_start", section.on_start)?,
        on_stop: command("on_stop", section.on_stop)?,
        on_role_change: command("on_role_change", section.on_role_change)?,
        timeout: seconds(
            "callbacks.timeout",
            section.timeout,
            DEFAULT_HOOK_TIMEOUT_SECS,
        )?,
    })
}

/// A command as an argv: the program resolved to an absolute, executable
/// file (through `PATH` when it has no '/'), and its arguments.
fn argv_of(command: &[String]) -> Result<(PathBuf, Vec<String>), String> {
    let Some((program, args)) = command.split_first() else {
        return Err(
            "is missing or empty: give the program and its arguments as a list, e.g. \
             [\"/usr/bin/turnserver\", \"-c\", \"/etc/turnserver.conf\"] (no shell)"
                .into(),
        );
    };
    let candidates: Vec<PathBuf> = if program.contains('/') {
        vec![PathBuf::from(program)]
    } else {
        std::env::var_os("PATH")
            .map(|path| {
                std::env::split_paths(&path)
                    .map(|dir| dir.join(program))
                    .collect()
            })
            .unwrap_or_default()
    };
    let found = candidates
        .into_iter()
        .find(|path| path.is_absolute() && is_executable(path));
    match found {
        Some(path) => Ok((path, args.to_vec())),
        None if program.contains('/') => Err(format!(
            "{program:?} is not an executable file given by an absolute path"
        )),
        None => Err(format!(
            "{program:?} is not an executable in PATH: give its absolute path"
        )),
    }
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The account from `user` and `group` (the user's own group by default).
fn account(
    user: Option<&str>,
    group: Option<&str>,
) -> Result<Option<Account>, (&'static str, String)> {
    let Some(user) = user else {
        return match group {
            None => Ok(None),
            Some(_) => Err(("group", "needs a user: set user too".into())),
        };
    };
    let unknown = |what: &'static str, name: &str| {
        (
            what,
            format!(
                "{name:?} is not a {what} of this host (see getent {}): create it or fix the name",
                if what == "user" { "passwd" } else { "group" }
            ),
        )
    };
    let c_name = CString::new(user).map_err(|_| unknown("user", user))?;
    let entry = mainstay_sys::user::by_name(&c_name)
        .map_err(|err| ("user", format!("cannot look up {user:?}: {err}")))?
        .ok_or_else(|| unknown("user", user))?;
    let gid = match group {
        None => entry.gid,
        Some(group) => {
            let c_group = CString::new(group).map_err(|_| unknown("group", group))?;
            mainstay_sys::user::group_id(&c_group)
                .map_err(|err| ("group", format!("cannot look up {group:?}: {err}")))?
                .ok_or_else(|| unknown("group", group))?
        }
    };
    Ok(Some(Account {
        name: entry.name,
        uid: entry.uid,
        gid,
    }))
}

fn health_check(check: CheckSection) -> Result<HealthCheck, (&'static str, String)> {
    let probe = match check.kind.as_str() {
        "process" => CheckProbe::Process,
        "tcp" => {
            let address = check.address.ok_or((
                "address",
                "a tcp check needs the address to connect to, e.g. address = \"127.0.0.1:3478\""
                    .to_string(),
            ))?;
            CheckProbe::Tcp(address.parse().map_err(|_| {
                (
                    "address",
                    format!("{address:?} is not an address: write it as IP:PORT"),
                )
            })?)
        }
        "http" => {
            let url = check.url.ok_or((
                "url",
                "an http check needs the URL to GET, e.g. url = \"http://127.0.0.1:8008/health\""
                    .to_string(),
            ))?;
            if !url.starts_with("http://") || url.len() <= "http://".len() {
                return Err((
                    "url",
                    format!("{url:?} is not a plain http:// URL (checks do not speak https)"),
                ));
            }
            let status = check.status.unwrap_or(DEFAULT_HTTP_STATUS);
            if !(100..=599).contains(&status) {
                return Err(("status", format!("{status} is not an HTTP status")));
            }
            CheckProbe::Http { url, status }
        }
        "command" => {
            let command = check.command.unwrap_or_default();
            let (program, args) = argv_of(&command).map_err(|why| ("command", why))?;
            let mut argv = vec![program.to_string_lossy().into_owned()];
            argv.extend(args);
            CheckProbe::Command(argv)
        }
        other => {
            return Err((
                "kind",
                format!(
                    "{other:?} is not a check: use \"process\", \"tcp\" (address), \"http\" (url) \
                     or \"command\""
                ),
            ));
        }
    };
    let interval = seconds_static("interval", check.interval, DEFAULT_CHECK_INTERVAL_SECS)?;
    let timeout = seconds_static("timeout", check.timeout, DEFAULT_CHECK_TIMEOUT_SECS)?;
    if timeout > interval {
        return Err((
            "timeout",
            "is longer than interval: a check must end before the next one".into(),
        ));
    }
    let failures = check.failures.unwrap_or(DEFAULT_CHECK_FAILURES);
    if !(1..=100).contains(&failures) {
        return Err(("failures", format!("{failures} is out of range: 1 to 100")));
    }
    Ok(HealthCheck {
        probe,
        interval,
        timeout,
        failures,
    })
}

fn restart(section: &RestartSection) -> Result<RestartPolicy, (&'static str, String)> {
    let d = DEFAULT_RESTART;
    let policy = RestartPolicy {
        initial_backoff: seconds_static(
            "backoff",
            section.backoff,
            d.initial_backoff.as_secs_f64(),
        )?,
        max_backoff: seconds_static(
            "max_backoff",
            section.max_backoff,
            d.max_backoff.as_secs_f64(),
        )?,
        limit: section.limit.unwrap_or(d.limit),
        window: seconds_static("window", section.window, d.window.as_secs_f64())?,
    };
    if policy.max_backoff < policy.initial_backoff {
        return Err(("max_backoff", "is shorter than backoff".into()));
    }
    if !(1..=1000).contains(&policy.limit) {
        return Err((
            "limit",
            format!("{} is out of range: 1 to 1000 restarts", policy.limit),
        ));
    }
    Ok(policy)
}

fn seconds(key: &str, value: Option<f64>, default: f64) -> Result<Duration, ServiceRefusal> {
    let value = value.unwrap_or(default);
    if value > 0.0 && value <= MAX_SECS {
        Ok(Duration::from_secs_f64(value))
    } else {
        Err((
            key.to_string(),
            format!("{value} is out of range: give seconds above 0, at most {MAX_SECS}"),
        ))
    }
}

fn seconds_static(
    key: &'static str,
    value: Option<f64>,
    default: f64,
) -> Result<Duration, (&'static str, String)> {
    seconds(key, value, default).map_err(|(_, why)| (key, why))
}

fn signal(name: &str) -> Option<i32> {
    let name = name.strip_prefix("SIG").unwrap_or(name);
    Some(match name {
        "TERM" => libc::SIGTERM,
        "INT" => libc::SIGINT,
        "QUIT" => libc::SIGQUIT,
        "HUP" => libc::SIGHUP,
        "USR1" => libc::SIGUSR1,
        "USR2" => libc::SIGUSR2,
        _ => return None,
    })
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
}
