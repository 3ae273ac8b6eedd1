//! `Postgres`: one node's PostgreSQL, driven by the agent. Creating, cloning,
//! starting, stopping, fencing, promoting, re-pointing, rewinding and probing
//! it all go through here. No method ever deletes a data directory: a bad
//! one is moved aside, so an operator can always recover what it held.

use crate::account::Account;
use crate::conf::{self, INCLUDE_LINE, MAINSTAY_CONF};
use crate::controldata::{ClusterState, ControlData, DataDirState, parse_controldata};
use crate::error::{Error, Result};
use crate::pidfile;
// The postmaster is the child of its fencing guard.
use crate::settings::{ConnTarget, PgSettings, StartRole, StopMode};
use crate::sql::{self, Health, SlotChanges};
use crate::tool;
use mainstay_core::poison;
use mainstay_core::{Lsn, slot_name};
use mainstay_guard::protocol::ToGuard;
use mainstay_guard::{BootTime, GuardArgs};
use mainstay_guarded::Guarded as Postmaster;
use mainstay_sys::process;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};
use tokio::time::Instant;
use tracing::{debug, info, warn};

mod datadir;
mod fencer;
mod handover;

pub use fencer::Fencer;
use fencer::Guarded;
pub use handover::PostmasterHandover;

/// Prefix of every replication slot mainstay manages (see `slot_name`).
const SLOT_PREFIX: &str = "mainstay_";
/// Progress lines of pg_basebackup / pg_rewind are logged at most this often.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// Immediate shutdown waits for backends at most 5 s before killing them.
const IMMEDIATE_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Crash recovery in single-user mode (replays everything since the last checkpoint).
const SINGLE_USER_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// What `rewind` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RewindOutcome {
    /// pg_rewind found the target already on the source's history.
    NotNeeded,
    /// The data directory was rewound; it must now start as a replica.
    Rewound { diverged_at: Option<Lsn> },
}

/// How long the health probe reuses one session before it connects anew.
const PROBE_SESSION_REUSE: Duration = Duration::from_secs(5);

/// One node's PostgreSQL.
pub struct Postgres {
    settings: PgSettings,
    /// The postmaster this process started and its fencing state, shared
    /// with `Fencer`s.
    child: Arc<Mutex<Guarded>>,
    /// Major version of the binaries in `bin_dir`, e.g. "15".
    binary_major: OnceLock<std::result::Result<String, String>>,
    /// The role `mainstay.conf` was last written for, so that a settings
    /// change (synchronous_standby_names) keeps the replication wiring.
    conf_role: Mutex<Option<StartRole>>,
    /// The settings a replica must run at least this high, read from the
    /// control file at the last start.
    standby_minimums: Mutex<std::collections::BTreeMap<String, u64>>,
    /// The health probe's session and when it was opened, kept between
    /// turns: a new authenticated connection every turn cost the agent and
    /// the server more CPU than the probe itself. Only the probe uses it (no
    /// session state).
    probe_session: tokio::sync::Mutex<Option<(tokio_postgres::Client, std::time::Instant)>>,
}

impl Postgres {
    pub fn new(mut settings: PgSettings) -> Postgres {
        // Relative paths would break once tools run with "/" as working directory.
        for path in [
            &mut settings.data_dir,
            &mut settings.bin_dir,
            &mut settings.pgpass_file,
        ] {
            if let Ok(abs) = std::path::absolute(&*path) {
                *path = abs;
            }
        }
        Postgres {
            settings,
            child: Arc::new(Mutex::new(Guarded {
                postmaster: None,
                writable: false,
                deadline: BootTime(0),
            })),
            binary_major: OnceLock::new(),
            conf_role: Mutex::new(None),
            standby_minimums: Mutex::default(),
            probe_session: tokio::sync::Mutex::new(None),
        }
    }

    pub fn settings(&self) -> &PgSettings {
        &self.settings
    }

    fn data_dir(&self) -> &Path {
        &self.settings.data_dir
    }

    fn bin(&self, name: &str) -> PathBuf {
        self.settings.bin_dir.join(name)
    }

    fn account(&self) -> Result<Account> {
        Account::resolve(self.settings.run_as.as_deref())
    }

    fn our_postmaster(&self) -> Option<Postmaster> {
        poison::lock(&self.child).postmaster.clone()
    }

    /// A handle for fencing from another thread (see `Fencer`).
    pub fn fencer(&self) -> Fencer {
        Fencer {
            data_dir: self.settings.data_dir.clone(),
            child: self.child.clone(),
        }
    }

    // ----- inspecting the data directory -----

    pub fn data_dir_state(&self) -> DataDirState {
        let dir = self.data_dir();
        match fs::metadata(dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return DataDirState::Missing,
            Err(e) => {
                return DataDirState::Unusable(format!("cannot inspect {}: {e}", dir.display()));
            }
            Ok(m) if !m.is_dir() => {
                return DataDirState::Unusable(format!("{} is not a directory", dir.display()));
            }
            Ok(_) => {}
        }
        let names: Vec<String> = match fs::read_dir(dir) {
            Ok(entries) => entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into())
                .collect(),
            Err(e) => return DataDirState::Unusable(format!("cannot list {}: {e}", dir.display())),
        };
        if names.is_empty() {
            return DataDirState::Empty;
        }
        let Ok(version) = fs::read_to_string(dir.join("PG_VERSION")) else {
            let hint = if names == ["lost+found"] {
                " (a mount point? use a subdirectory of it)"
            } else {
                ""
            };
            return DataDirState::Unusable(format!(
                "{} is not empty and has no PG_VERSION: not a PostgreSQL data directory{hint}",
                dir.display()
            ));
        };
        match self.binary_major() {
            Ok(major) if major != version.trim() => {
                return DataDirState::Unusable(format!(
                    "{} holds PostgreSQL {} data but {} has PostgreSQL {major}",
                    dir.display(),
                    version.trim(),
                    self.settings.bin_dir.display()
                ));
            }
            Ok(_) => {}
            Err(e) => return DataDirState::Unusable(e),
        }
        match self.control_data() {
            Ok(control) => DataDirState::Initialized(control),
            Err(e) => {
                DataDirState::Unusable(format!("pg_controldata failed on {}: {e}", dir.display()))
            }
        }
    }

    fn binary_major(&self) -> std::result::Result<String, String> {
        self.binary_major
            .get_or_init(|| {
                let account = self.account().map_err(|e| e.to_string())?;
                let mut cmd = tool::command(&self.bin("postgres"), &account);
                cmd.arg("-V");
                let out =
                    tool::run_sync(cmd, Duration::from_secs(10)).map_err(|e| e.to_string())?;
                // "postgres (PostgreSQL) 15.5 (Debian 15.5-0+deb12u1)"
                out.split_whitespace()
                    .nth(2)
                    .and_then(|v| v.split('.').next())
                    .map(String::from)
                    .ok_or_else(|| format!("unexpected `postgres -V` output: {out:?}"))
            })
            .clone()
    }

    pub fn control_data(&self) -> Result<ControlData> {
        let mut cmd = tool::command(&self.bin("pg_controldata"), &self.account()?);
        cmd.arg("-D").arg(self.data_dir());
        parse_controldata(&tool::run_sync(cmd, Duration::from_secs(10))?)
    }

    /// This node's own copy of a timeline history file (empty for timeline 1),
    /// read from disk, so it works while PostgreSQL is stopped.
    pub fn local_timeline_history(&self, timeline: u32) -> Result<String> {
        if timeline <= 1 {
            return Ok(String::new());
        }
        let path = self
            .data_dir()
            .join(format!("pg_wal/{timeline:08X}.history"));
        fs::read_to_string(&path).map_err(|e| Error::io_path("read", &path, e))
    }

    fn append(&self, path: &Path, text: &str) -> Result<()> {
        let mut file = fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|e| Error::io_path("open", path, e))?;
        file.write_all(text.as_bytes())
            .map_err(|e| Error::io_path("append to", path, e))
    }

    /// postgresql.conf must include mainstay.conf; clusters not created by
    /// mainstay (or restored from elsewhere) get the line added.
    fn ensure_include_line(&self) -> Result<()> {
        let path = self.data_dir().join("postgresql.conf");
        let text = fs::read_to_string(&path).map_err(|e| Error::io_path("read", &path, e))?;
        if !text.lines().any(|l| l.trim() == INCLUDE_LINE) {
            self.append(
                &path,
                &format!("\n# Settings managed by mainstay.\n{INCLUDE_LINE}\n"),
            )?;
        }
        Ok(())
    }

    // ----- running -----

    /// Writes mainstay.conf and the standby signal for `role`, starts the
    /// postmaster as a child of this process and waits until it accepts
    /// connections. On a timeout the server is left running (still starting).
    pub async fn start(&mut self, role: StartRole) -> Result<()> {
        if let Some(pm) = self
            .our_postmaster()
            .filter(|pm| pm.exit_status().is_none())
        {
            return Err(Error::Refused(format!(
                "postgres is already running (pid {})",
                pm.pid()
            )));
        }
        let control = match self.data_dir_state() {
            DataDirState::Initialized(c) => c,
            other => {
                return Err(Error::Refused(format!(
                    "cannot start postgres: data directory is {other:?}"
                )));
            }
        };
        if role == StartRole::Primary {
            self.refuse_primary_start_of_standby(&control)?;
        }
        let account = self.account()?;
        self.stop_foreign_postmaster().await?;
        account.ensure_dir(&self.settings.socket_path(), 0o700)?;
        self.write_pgpass().await?;
        self.ensure_include_line()?;
        *poison::lock(&self.standby_minimums) = control.standby_minimums.clone();
        self.write_conf(&account, &role)?;
        let standby_signal = self.data_dir().join("standby.signal");
        match &role {
            StartRole::Primary => remove_if_present(&standby_signal)?,
            StartRole::Replica { .. } => account.write_file(&standby_signal, b"", 0o600)?,
        }
        // We never use targeted recovery; a stray recovery.signal would make
        // the server promote itself at the end of its WAL.
        remove_if_present(&self.data_dir().join("recovery.signal"))?;

        let log_path = self.settings.log_path();
        let mut log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .open(&log_path)
            .map_err(|e| Error::io_path("open", &log_path, e))?;
        account.chown(&log_path)?;
        let log_start = log.seek(SeekFrom::End(0)).unwrap_or(0);
        let _ = writeln!(
            log,
            "--- mainstay: starting postgres as {role:?} at {}",
            utc_stamp(SystemTime::now())
        );
        let log_err = log
            .try_clone()
            .map_err(|e| Error::io_path("open", &log_path, e))?;

        let fencer = self.fencer();
        let guard_args = GuardArgs {
            deadline: {
                let guarded = fencer.lock();
                guarded.writable.then_some(guarded.deadline)
            },
            uid: account.switch.then_some(account.uid),
            gid: account.switch.then_some(account.gid),
            what: None,
            program: self.bin("postgres").into(),
            args: vec!["-D".into(), self.data_dir().into()],
        };
        // The guard runs as this process's user (it must be able to signal
        // the postmaster); it switches to the account for the postmaster.
        let mut cmd = tool::command(&self.settings.guard_program, &account.unswitched());
        // `ps` and `pgrep -f` show `mainstay guard ... -D <data dir>`, not
        // the /proc/self/exe it was started through.
        std::os::unix::process::CommandExt::arg0(&mut cmd, "mainstay");
        cmd.args(guard_args.to_args())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err));
        let pm = Postmaster::spawn(cmd, "postgres")
            .await
            .map_err(|e| Error::io("start postgres", e))?;
        info!(pid = pm.pid(), ?role, log = %log_path.display(), "postgres started under its fencing guard");
        {
            let mut guarded = fencer.lock();
            guarded.postmaster = Some(pm.clone());
            // The state may have moved while the guard started.
            guarded.tell_guard();
        }
        self.wait_ready(&pm, log_start).await
    }

    /// A data directory that was last a standby (or a fresh clone or a rewound
    /// one) must not start as primary: without recovery ending through a
    /// promotion it would keep its timeline, and writes on a timeline another
    /// node also writes on are an undetectable divergence.
    fn refuse_primary_start_of_standby(&self, control: &ControlData) -> Result<()> {
        let was_standby = matches!(
            control.state,
            ClusterState::ShutDownInRecovery | ClusterState::InArchiveRecovery
        ) || self.data_dir().join("backup_label").exists();
        if was_standby {
            return Err(Error::Refused(format!(
                "the data directory is a standby's ({}); start it as a replica and promote it to get a new timeline",
                control.state_text
            )));
        }
        Ok(())
    }

    fn write_conf(&self, account: &Account, role: &StartRole) -> Result<()> {
        let minimums = poison::lock(&self.standby_minimums).clone();
        let text = conf::render_mainstay_conf(&self.settings, role, &minimums)?;
        account.write_file(&self.data_dir().join(MAINSTAY_CONF), text.as_bytes(), 0o600)?;
        *poison::lock(&self.conf_role) = Some(role.clone());
        Ok(())
    }

    /// Replaces the extra PostgreSQL parameters, rewrites `mainstay.conf`
    /// and reloads a running server. Returns the parameters the server says
    /// wait for a restart (`pending_restart`): never applied silently.
    pub async fn set_parameters(
        &mut self,
        parameters: std::collections::BTreeMap<String, String>,
    ) -> Result<Vec<mainstay_core::PendingRestart>> {
        if parameters == self.settings.parameters {
            return self.pending_restart().await;
        }
        self.settings.parameters = parameters;
        if !self.rewrite_conf_and_reload().await? {
            return Ok(Vec::new());
        }
        // The postmaster rereads the file asynchronously.
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        self.pending_restart().await
    }

    /// Rewrites `mainstay.conf` for the role it was last written for (the
    /// replication wiring stays) and reloads a running server. False when
    /// there was nothing to reload: never written yet, or not running.
    async fn rewrite_conf_and_reload(&self) -> Result<bool> {
        let role = poison::lock(&self.conf_role).clone();
        let Some(role) = role else {
            return Ok(false);
        };
        self.write_conf(&self.account()?, &role)?;
        if !self.is_running() {
            return Ok(false);
        }
        self.reload().await?;
        Ok(true)
    }

    async fn reload(&self) -> Result<()> {
        let client = self.local_client().await?;
        sql::bounded(
            "pg_reload_conf",
            sql::QUERY_TIMEOUT,
            client.query_one("SELECT pg_reload_conf()", &[]),
        )
        .await
        .map(|_| ())
    }

    /// Parameters changed in the files that only a restart applies.
    pub async fn pending_restart(&self) -> Result<Vec<mainstay_core::PendingRestart>> {
        if !self.is_running() {
            return Ok(Vec::new());
        }
        let client = self.local_client().await?;
        let rows = sql::bounded(
            "pg_settings.pending_restart",
            sql::QUERY_TIMEOUT,
            client.query(
                "SELECT name, current_setting(name) FROM pg_settings WHERE pending_restart ORDER BY name",
                &[],
            ),
        )
        .await?;
        Ok(rows
            .iter()
            .map(|r| {
                let name: String = r.get(0);
                mainstay_core::PendingRestart {
                    new_value: self.settings.parameters.get(&name).cloned(),
                    old_value: r.get(1),
                    name,
                }
            })
            .collect())
    }

    /// Sets `synchronous_standby_names` in `mainstay.conf` and reloads; returns
    /// once this server reports the new value (at most 5 s), so the caller
    /// knows commits from now on wait for the new list.
    pub async fn set_synchronous_standby_names(&mut self, value: &str) -> Result<()> {
        self.settings.synchronous_standby_names = value.to_string();
        // Not running: the next start writes the file with this value.
        if !self.rewrite_conf_and_reload().await? {
            return Ok(());
        }
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        loop {
            // A fresh session reads the reloaded file for sure.
            let fresh = self.local_client().await?;
            let row = sql::bounded(
                "SHOW synchronous_standby_names",
                sql::QUERY_TIMEOUT,
                fresh.query_one("SHOW synchronous_standby_names", &[]),
            )
            .await?;
            let now: String = row.get(0);
            if now == value {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(Error::Timeout {
                    what: format!("synchronous_standby_names to become {value:?} (still {now:?})"),
                    after: std::time::Duration::from_secs(5),
                });
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    async fn wait_ready(&self, pm: &Postmaster, log_start: u64) -> Result<()> {
        let deadline = Instant::now() + self.settings.start_timeout;
        loop {
            if let Some(status) = pm.exit_status() {
                let log = self.settings.log_path();
                return Err(Error::StartFailed {
                    status: status.to_string(),
                    log: log.display().to_string(),
                    tail: log_tail(&log, log_start),
                });
            }
            if let Some(pf) = pidfile::read(self.data_dir())
                && pf.pid == pm.pid()
                && let Some(status @ ("ready" | "standby")) = pf.status.as_deref()
            {
                info!(pid = pm.pid(), status, "postgres accepts connections");
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(Error::Timeout {
                    what: "postgres startup (still running, not accepting connections yet)".into(),
                    after: self.settings.start_timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A postmaster on our data directory that this process did not start
    /// (a previous agent's) is stopped, so that PostgreSQL is always our
    /// child and dies with us.
    async fn stop_foreign_postmaster(&self) -> Result<()> {
        let Some(pf) = pidfile::read(self.data_dir()) else {
            return Ok(());
        };
        if pidfile::is_postmaster_of(pf.pid, self.data_dir()) {
            warn!(
                pid = pf.pid,
                "a postgres not started by this agent runs on the data directory; stopping it (immediate) so \
                 that it runs under this agent's fencing guard"
            );
            return stop_pid(pf.pid, libc::SIGQUIT, IMMEDIATE_STOP_TIMEOUT).await;
        }
        if pidfile::is_alive(pf.pid) {
            // The pid was reused by an unrelated process; PostgreSQL would
            // take it for a running postmaster and refuse to start.
            warn!(
                pid = pf.pid,
                "removing stale postmaster.pid (its pid now belongs to another program)"
            );
            remove_if_present(&self.data_dir().join("postmaster.pid"))?;
        }
        Ok(())
    }

    /// Stops the postmaster (ours, or one an earlier agent left) and waits;
    /// if it does not exit in time its process group gets SIGKILL.
    pub async fn stop(&mut self, mode: StopMode) -> Result<()> {
        let (signal, limit) = match mode {
            StopMode::Fast => (libc::SIGINT, self.settings.stop_timeout),
            StopMode::Immediate => (
                libc::SIGQUIT,
                IMMEDIATE_STOP_TIMEOUT.min(self.settings.stop_timeout),
            ),
        };
        if let Some(pm) = self
            .our_postmaster()
            .filter(|pm| pm.exit_status().is_none())
        {
            info!(pid = pm.pid(), ?mode, "stopping postgres");
            pm.signal(signal);
            let status = match pm.wait_exit(limit).await {
                Some(status) => status,
                None => {
                    warn!(
                        pid = pm.pid(),
                        ?mode,
                        "postgres did not stop in {limit:?}; its guard kills every postgres process"
                    );
                    pm.tell(&ToGuard::Fence);
                    pm.wait_exit(Duration::from_secs(10))
                        .await
                        .ok_or_else(|| Error::Timeout {
                            what: format!("postgres (pid {}) to exit after SIGKILL", pm.pid()),
                            after: Duration::from_secs(10),
                        })?
                }
            };
            info!(pid = pm.pid(), %status, "postgres stopped");
            return Ok(());
        }
        if let Some(pf) = pidfile::read(self.data_dir())
            && pidfile::is_postmaster_of(pf.pid, self.data_dir())
        {
            info!(
                pid = pf.pid,
                ?mode,
                "stopping a postgres not started by this agent"
            );
            return stop_pid(pf.pid, signal, limit).await;
        }
        Ok(())
    }

    /// SIGQUIT to the postmaster right now; no waiting. Safe to call from any
    /// context (see `fencer` for use from another thread).
    pub fn fence_now(&self) -> bool {
        self.fencer().fence_now()
    }

    /// Whether a postmaster runs on the data directory (ours or not).
    pub fn is_running(&self) -> bool {
        self.pid().is_some()
    }

    /// The running postmaster's pid.
    pub fn pid(&self) -> Option<i32> {
        if let Some(pm) = self
            .our_postmaster()
            .filter(|pm| pm.exit_status().is_none())
        {
            return Some(pm.pid());
        }
        pidfile::read(self.data_dir())
            .map(|pf| pf.pid)
            .filter(|pid| pidfile::is_postmaster_of(*pid, self.data_dir()))
    }

    /// How the postmaster this process started last exited (None while it
    /// runs, or if none was started).
    pub fn exit_status(&self) -> Option<ExitStatus> {
        self.our_postmaster().and_then(|pm| pm.exit_status())
    }

    /// Resolves when the postmaster this process started exits (at once if
    /// it already has, or `None` if none was started): lets the agent react
    /// to a crash immediately instead of on its next probe.
    pub async fn wait_for_exit(&self) -> Option<ExitStatus> {
        self.our_postmaster()?.exited().await
    }

    // ----- SQL on the local server -----

    async fn local_client(&self) -> Result<tokio_postgres::Client> {
        sql::connect(
            &self.settings.local_tcp_host(),
            self.settings.port,
            &self.settings.superuser,
            "postgres",
        )
        .await
    }

    async fn client_of(&self, target: &ConnTarget) -> Result<tokio_postgres::Client> {
        sql::connect(
            &target.host,
            target.port,
            &self.settings.superuser,
            "postgres",
        )
        .await
    }

    pub async fn probe(&self) -> Result<Health> {
        let mut session = self.probe_session.lock().await;
        // A kept session answers even when the postmaster takes no new
        // connection (hung, stopped): a fresh one now and then finds that.
        let kept = session
            .take()
            .filter(|(c, opened)| !c.is_closed() && opened.elapsed() < PROBE_SESSION_REUSE);
        let reused = kept.is_some();
        let (client, opened) = match kept {
            Some(kept) => kept,
            None => (self.local_client().await?, std::time::Instant::now()),
        };
        let mut health = match sql::probe(&client).await {
            Ok(health) => {
                *session = Some((client, opened));
                health
            }
            // A kept session may have died with a server restart that its
            // connection task has not noticed yet: one fresh try. A timeout
            // is the server's slowness, not the session's: no second wait.
            Err(err) if reused && !matches!(err, Error::Timeout { .. }) => {
                debug!("the kept probe session failed ({err}): reconnecting");
                let client = self.local_client().await?;
                let health = sql::probe(&client).await?;
                *session = Some((client, std::time::Instant::now()));
                health
            }
            Err(err) => return Err(err),
        };
        if health.in_recovery {
            // The WAL receiver reports the timeline it started on until it
            // writes WAL of the next one; a history file streamed from the
            // leader already says which timeline this replica is on.
            health.timeline = health.timeline.max(self.newest_history_timeline());
        }
        Ok(health)
    }

    /// The highest timeline with a history file in `pg_wal`: the one a
    /// promotion here branches from (PostgreSQL picks the next number).
    pub fn newest_history_timeline(&self) -> u32 {
        let Ok(entries) = std::fs::read_dir(self.data_dir().join("pg_wal")) else {
            return 0;
        };
        entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name();
                let name = name.to_str()?;
                let tli = name.strip_suffix(".history")?;
                (tli.len() == 8).then(|| u32::from_str_radix(tli, 16).ok())?
            })
            .max()
            .unwrap_or(0)
    }

    /// Promotes this replica and waits (up to 30 s) until it accepts writes.
    pub async fn promote(&self) -> Result<()> {
        info!("promoting");
        sql::promote(&self.local_client().await?).await?;
        info!("promoted");
        Ok(())
    }

    /// Re-points this replica to `leader` (or to nothing) with a reload; the
    /// server keeps running (PostgreSQL 13+ restarts only its WAL receiver).
    pub async fn follow(&mut self, leader: Option<&ConnTarget>) -> Result<()> {
        if !self.data_dir().join("standby.signal").exists() {
            return Err(Error::Refused(
                "not a replica (no standby.signal): stop it and start it as a replica to follow a leader".into(),
            ));
        }
        let account = self.account()?;
        self.write_pgpass().await?;
        self.write_conf(
            &account,
            &StartRole::Replica {
                leader: leader.cloned(),
            },
        )?;
        if self.is_running() {
            self.reload().await?;
        }
        info!(
            leader = leader.map(|l| l.name.as_str()).unwrap_or("none"),
            "following"
        );
        Ok(())
    }

    /// Creates or updates the replication and rewind roles (on a primary).
    pub async fn create_roles(&self) -> Result<()> {
        let mut client = self.local_client().await?;
        let s = &self.settings;
        if s.replication.user != s.superuser.user {
            sql::ensure_role(&mut client, &s.replication, "LOGIN REPLICATION").await?;
        }
        if s.rewind.user != s.superuser.user {
            if s.rewind.user != s.replication.user {
                sql::ensure_role(&mut client, &s.rewind, "LOGIN").await?;
            }
            sql::grant_rewind(&client, &s.rewind.user).await?;
        }
        info!(replication = %s.replication.user, rewind = %s.rewind.user, "roles in place");
        Ok(())
    }

    /// On a primary: creates a physical slot for each wanted member but this
    /// node, and drops inactive mainstay slots of members no longer wanted.
    pub async fn sync_slots(&self, wanted_members: &[String]) -> Result<SlotChanges> {
        let own = slot_name(&self.settings.node_name);
        let mut wanted: Vec<String> = wanted_members
            .iter()
            .map(|m| slot_name(m))
            .filter(|s| *s != own)
            .collect();
        wanted.sort();
        wanted.dedup();
        let changes = sql::sync_slots(&self.local_client().await?, &wanted, SLOT_PREFIX).await?;
        if !changes.created.is_empty() || !changes.dropped.is_empty() {
            info!(created = ?changes.created, dropped = ?changes.dropped, "replication slots changed");
        }
        Ok(changes)
    }

    /// A CHECKPOINT on the running server, so that the shutdown checkpoint
    /// that follows (switchover) has little left to write.
    pub async fn checkpoint(&self) -> Result<()> {
        let client = self.local_client().await?;
        sql::bounded(
            "CHECKPOINT",
            sql::QUERY_TIMEOUT,
            client.batch_execute("CHECKPOINT"),
        )
        .await
    }

    /// Polls `target` (a replica) until it has received and flushed WAL
    /// past `lsn`, at most `limit`. Returns the last position seen.
    pub async fn wait_until_received(
        &self,
        target: &ConnTarget,
        lsn: Lsn,
        limit: std::time::Duration,
    ) -> Result<Lsn> {
        let deadline = tokio::time::Instant::now() + limit;
        let client = self.client_of(target).await?;
        let mut seen = Lsn(0);
        // Bounded by the deadline; 10 ms keeps a switchover's pause short.
        while tokio::time::Instant::now() < deadline {
            let row = sql::bounded(
                "pg_last_wal_receive_lsn()",
                limit,
                client.query_one("SELECT pg_last_wal_receive_lsn()::text", &[]),
            )
            .await?;
            let text: Option<String> = row.get(0);
            seen = text.as_deref().and_then(Lsn::parse).unwrap_or_default();
            if seen > lsn {
                return Ok(seen);
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        Err(Error::Timeout {
            what: format!("{} to receive WAL past {lsn} (it has {seen})", target.name),
            after: limit,
        })
    }

    /// The content of `from`'s history file for `timeline` (empty for 1).
    pub async fn timeline_history(&self, from: &ConnTarget, timeline: u32) -> Result<String> {
        if timeline <= 1 {
            return Ok(String::new());
        }
        sql::read_history(&self.client_of(from).await?, timeline).await
    }

    /// Writes the libpq password file for the replication and rewind users.
    pub async fn write_pgpass(&self) -> Result<()> {
        let s = &self.settings;
        let mut entries = vec![(s.replication.user.as_str(), s.replication.password.as_str())];
        if s.rewind.user != s.replication.user {
            entries.push((s.rewind.user.as_str(), s.rewind.password.as_str()));
        }
        let text = conf::render_pgpass(&entries)?;
        self.account()?
            .write_file(&s.pgpass_file, text.as_bytes(), 0o600)
    }
}

fn remove_if_present(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io_path("remove", path, e)),
    }
}

/// Signals a process that is not our child and polls until it is gone,
/// escalating to SIGKILL.
async fn stop_pid(pid: i32, signal: libc::c_int, limit: Duration) -> Result<()> {
    let _ = process::kill(pid, signal);
    for (wait, escalate) in [(limit, true), (Duration::from_secs(10), false)] {
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            if !pidfile::is_alive(pid) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if escalate {
            warn!(pid, "postgres did not stop in {wait:?}; sending SIGKILL");
            let _ = process::kill(pid, libc::SIGKILL);
        }
    }
    Err(Error::Timeout {
        what: format!("postgres (pid {pid}) to exit"),
        after: limit,
    })
}

/// The last lines written to the log since `from`.
fn log_tail(path: &Path, from: u64) -> String {
    let mut text = String::new();
    if let Ok(mut file) = fs::File::open(path) {
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        let start = from.max(len.saturating_sub(16 * 1024));
        if file.seek(SeekFrom::Start(start)).is_ok() {
            let mut bytes = Vec::new();
            let _ = file.read_to_end(&mut bytes);
            text = String::from_utf8_lossy(&bytes).into_owned();
        }
    }
    tool::tail_of(&text)
}

/// `YYYYMMDDTHHMMSSZ`, for names that sort by time.
fn utc_stamp(time: SystemTime) -> String {
    let secs = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_are_utc_and_sortable() {
        let at = |secs| utc_stamp(SystemTime::UNIX_EPOCH + Duration::from_secs(secs));
        assert_eq!(at(0), "19700101T000000Z");
        assert_eq!(at(951_782_400), "20000229T000000Z");
        assert_eq!(at(1_709_210_096), "20240229T123456Z");
    }
}
