//! `Postgres`: one node's PostgreSQL, driven by the agent. Creating, cloning,
//! starting, stopping, fencing, promoting, re-pointing, rewinding and probing
//! it all go through here. No method ever deletes a data directory: a bad
//! one is moved aside, so an operator can always recover what it held.

use crate::account::Account;
use crate::conf::{self, INCLUDE_LINE, MAINSTAY_CONF};
use crate::controldata::{ClusterState, ControlData, DataDirState, parse_controldata};
use crate::error::{Error, Result};
use crate::pidfile;
use crate::postmaster::Postmaster;
use crate::settings::{ConnTarget, PgSettings, StartRole, StopMode};
use crate::sql::{self, Health, SlotChanges};
use crate::tool;
use mainstay_core::{Lsn, slot_name};
use mainstay_guard::protocol::ToGuard;
use mainstay_guard::{BootTime, GuardArgs};
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

/// The postmaster this process started, and what its guard must enforce.
struct Guarded {
    postmaster: Option<Postmaster>,
    /// PostgreSQL may accept writes (a primary, or about to become one).
    writable: bool,
    /// Past this instant a writable PostgreSQL must be stopped.
    deadline: BootTime,
}

impl Guarded {
    fn order(&self) -> ToGuard {
        if self.writable {
            ToGuard::Arm(self.deadline)
        } else {
            ToGuard::Disarm
        }
    }

    fn tell_guard(&self) {
        if let Some(pm) = self
            .postmaster
            .as_ref()
            .filter(|pm| pm.exit_status().is_none())
        {
            pm.tell(&self.order());
        }
    }
}

/// Fencing for one node's PostgreSQL, usable from any task or thread,
/// without async and without waiting. The postmaster's guard enforces what
/// this is told: while `writable`, the server is stopped at `deadline`
/// unless the deadline is extended, whether or not this process still runs.
#[derive(Clone)]
pub struct Fencer {
    data_dir: PathBuf,
    child: Arc<Mutex<Guarded>>,
}

impl Fencer {
    fn lock(&self) -> std::sync::MutexGuard<'_, Guarded> {
        self.child.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether PostgreSQL may accept writes (as last set).
    pub fn writable(&self) -> bool {
        self.lock().writable
    }

    /// Declares whether PostgreSQL may accept writes. Set it *before* a
    /// server becomes writable (start as primary, promotion), so that the
    /// guard enforces the deadline from the server's first moment.
    pub fn set_writable(&self, writable: bool) {
        let mut guarded = self.lock();
        if guarded.writable != writable {
            guarded.writable = writable;
            guarded.tell_guard();
        }
    }

    /// Moves the deadline, earlier or later: the latest one counts.
    pub fn set_deadline(&self, deadline: BootTime) {
        let mut guarded = self.lock();
        if guarded.deadline != deadline {
            guarded.deadline = deadline;
            if guarded.writable {
                guarded.tell_guard();
            }
        }
    }

    /// Stops PostgreSQL now: its guard kills every PostgreSQL process.
    /// Returns whether a postmaster was told to stop.
    pub fn fence_now(&self) -> bool {
        let ours = self.lock().postmaster.clone();
        if let Some(pm) = ours
            && pm.exit_status().is_none()
            && pm.tell(&ToGuard::Fence)
        {
            warn!(
                pid = pm.pid(),
                "fencing: told the guard to kill every postgres process"
            );
            return true;
        }
        // A postmaster this process did not start (left by an earlier agent).
        if let Some(pf) = pidfile::read(&self.data_dir)
            && pidfile::is_postmaster_of(pf.pid, &self.data_dir)
            && process::kill(pf.pid, libc::SIGQUIT).is_ok()
        {
            warn!(
                pid = pf.pid,
                "fencing: sent SIGQUIT (immediate shutdown) to a postgres not started by us"
            );
            return true;
        }
        false
    }
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
        self.child
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .postmaster
            .clone()
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

    // ----- creating a data directory -----

    fn refuse_unless_blank(&self, action: &str) -> Result<()> {
        match self.data_dir_state() {
            DataDirState::Missing | DataDirState::Empty => Ok(()),
            DataDirState::Initialized(c) => Err(Error::Refused(format!(
                "{action}: {} already holds cluster {} ({})",
                self.data_dir().display(),
                c.system_identifier,
                c.state_text
            ))),
            DataDirState::Unusable(why) => Err(Error::Refused(format!("{action}: {why}"))),
        }
    }

    /// Creates the (missing or empty) data directory owned by the account.
    fn make_data_dir(&self, account: &Account) -> Result<()> {
        if let Some(parent) = self.data_dir().parent() {
            fs::create_dir_all(parent)
                .map_err(|e| Error::io_path("create directory", parent, e))?;
        }
        account.ensure_dir(self.data_dir(), 0o700)
    }

    /// Creates a new cluster with data checksums. Refuses, doing nothing, if
    /// the data directory is anything but missing or empty.
    pub async fn initdb(&self) -> Result<()> {
        self.refuse_unless_blank("initdb")?;
        let account = self.account()?;
        if self.settings.superuser.password.is_empty() {
            return Err(Error::Config("the superuser needs a password".into()));
        }
        self.make_data_dir(&account)?;
        // The password reaches initdb through a private file, never argv.
        let socket_dir = self.settings.socket_path();
        account.ensure_dir(&socket_dir, 0o700)?;
        let pwfile = socket_dir.join(format!("initdb-pw.{}", std::process::id()));
        account.write_file(
            &pwfile,
            format!("{}\n", self.settings.superuser.password).as_bytes(),
            0o600,
        )?;
        let mut cmd = tool::command(&self.bin("initdb"), &account);
        cmd.arg("-D")
            .arg(self.data_dir())
            .arg("-U")
            .arg(&self.settings.superuser.user)
            .arg(format!("--pwfile={}", pwfile.display()))
            .args([
                "--auth-local=peer",
                "--auth-host=scram-sha-256",
                "--data-checksums",
            ])
            // What Synapse and most applications want; collation stays
            // independent of the host's locale settings.
            .args(["--encoding=UTF8", "--locale=C"]);
        if self
            .settings
            .parameters
            .get("fsync")
            .is_some_and(|v| v == "off")
        {
            // The operator already traded durability for speed (tests).
            cmd.arg("--no-sync");
        }
        info!(data_dir = %self.data_dir().display(), "initdb");
        let result = tool::run_async(
            cmd,
            Duration::from_secs(600),
            |line| debug!(target: "initdb", "{line}"),
        )
        .await;
        let _ = fs::remove_file(&pwfile);
        result?;
        self.append(
            &self.data_dir().join("pg_hba.conf"),
            &conf::hba_lines(&self.settings.replication.user)?,
        )?;
        self.ensure_include_line()?;
        info!(data_dir = %self.data_dir().display(), "initdb done");
        Ok(())
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

    /// Clones `from` into the (missing or empty) data directory. A failed
    /// clone is moved aside, never deleted.
    pub async fn basebackup(&self, from: &ConnTarget) -> Result<()> {
        self.refuse_unless_blank("pg_basebackup")?;
        let account = self.account()?;
        self.write_pgpass().await?;
        self.make_data_dir(&account)?;
        let passfile = self.settings.pgpass_file.display().to_string();
        let application_name = format!("{}_basebackup", self.settings.node_name);
        let source = conf::conninfo(&[
            ("host", &from.host),
            ("port", &from.port.to_string()),
            ("user", &self.settings.replication.user),
            ("passfile", &passfile),
            ("application_name", &application_name),
            ("connect_timeout", "5"),
        ]);
        let mut cmd = tool::command(&self.bin("pg_basebackup"), &account);
        cmd.arg("-D").arg(self.data_dir()).args([
            "-X",
            "stream",
            "-c",
            "fast",
            "--progress",
            "--verbose",
            "--no-password",
            "-d",
            &source,
        ]);
        info!(from = %from.name, host = %from.host, port = from.port, "pg_basebackup starting");
        let mut progress = Progress::default();
        let result = tool::run_async(cmd, self.settings.clone_timeout, |line| {
            progress.line("pg_basebackup", line)
        })
        .await;
        if let Err(e) = result {
            let partial = fs::read_dir(self.data_dir())
                .map(|mut d| d.next().is_some())
                .unwrap_or(false);
            if partial {
                match self.move_aside("failed basebackup") {
                    Ok(to) => warn!(to = %to.display(), "moved the partial clone aside"),
                    Err(e2) => warn!("could not move the partial clone aside: {e2}"),
                }
            }
            return Err(e);
        }
        info!(from = %from.name, "pg_basebackup done");
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
        *self
            .standby_minimums
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = control.standby_minimums.clone();
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
        let pm = Postmaster::spawn(cmd)
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
        let minimums = self
            .standby_minimums
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let text = conf::render_mainstay_conf(&self.settings, role, &minimums)?;
        account.write_file(&self.data_dir().join(MAINSTAY_CONF), text.as_bytes(), 0o600)?;
        *self.conf_role.lock().unwrap_or_else(|e| e.into_inner()) = Some(role.clone());
        Ok(())
    }

    /// Replaces the extra PostgreSQL parameters, rewrites `mainstay.conf`
    /// and reloads a running server. Returns the parameters the server says
    /// wait for a restart (`pending_restart`): never applied silently.
    pub async fn set_parameters(
        &mut self,
        parameters: std::collections::BTreeMap<String, String>,
    ) -> Result<Vec<String>> {
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
        let role = self
            .conf_role
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
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
    pub async fn pending_restart(&self) -> Result<Vec<String>> {
        if !self.is_running() {
            return Ok(Vec::new());
        }
        let client = self.local_client().await?;
        let rows = sql::bounded(
            "pg_settings.pending_restart",
            sql::QUERY_TIMEOUT,
            client.query(
                "SELECT name FROM pg_settings WHERE pending_restart ORDER BY name",
                &[],
            ),
        )
        .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
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

    // ----- repairing a stopped data directory -----

    /// After a crash (state in production / in recovery / shutting down),
    /// runs crash recovery in single-user mode so that the data directory is
    /// cleanly shut down, as pg_rewind requires. Returns whether it had to.
    ///
    /// Meant for the step before `rewind`. Single-user mode cannot run as a
    /// standby, so a crashed *replica* ends recovery here and writes a
    /// shutdown checkpoint on its timeline that the leader does not have;
    /// a crashed replica that only needs to rejoin should simply be started
    /// as a replica again instead.
    pub async fn ensure_clean_shutdown(&self) -> Result<bool> {
        if self.is_running() {
            return Err(Error::Refused("postgres is running; stop it first".into()));
        }
        let control = self.control_data()?;
        if control.state.is_clean_shutdown() {
            return Ok(false);
        }
        info!(state = %control.state_text, "data directory was not shut down cleanly; running crash recovery");
        // Single-user mode cannot run as a standby. The signal is written
        // again by the next start as a replica.
        remove_if_present(&self.data_dir().join("standby.signal"))?;
        remove_if_present(&self.data_dir().join("recovery.signal"))?;
        let account = self.account()?;
        let mut cmd = tool::command(&self.bin("postgres"), &account);
        cmd.arg("--single")
            .arg("-D")
            .arg(self.data_dir())
            // Nothing may leave this node while it is being repaired.
            .args(["-c", "archive_mode=off", "template1"]);
        tool::run_async(
            cmd,
            SINGLE_USER_TIMEOUT,
            |line| debug!(target: "postgres --single", "{line}"),
        )
        .await?;
        let after = self.control_data()?;
        if !after.state.is_clean_shutdown() {
            return Err(Error::Refused(format!(
                "crash recovery ran but the cluster state is still '{}'",
                after.state_text
            )));
        }
        info!(state = %after.state_text, timeline = after.timeline, checkpoint = %after.checkpoint_lsn, "crash recovery done");
        Ok(true)
    }

    /// Rewinds this (stopped, cleanly shut down) data directory to `from`'s
    /// history. On failure the directory may be unusable: move it aside and
    /// clone again.
    pub async fn rewind(&self, from: &ConnTarget) -> Result<RewindOutcome> {
        if self.is_running() {
            return Err(Error::Refused("postgres is running; stop it first".into()));
        }
        let control = self.control_data()?;
        if !control.state.is_clean_shutdown() {
            return Err(Error::Refused(format!(
                "pg_rewind needs a cleanly shut down target, state is '{}' (run ensure_clean_shutdown)",
                control.state_text
            )));
        }
        let account = self.account()?;
        self.write_pgpass().await?;
        match self.client_of(from).await {
            Ok(client) => match sql::checkpoint_if_timeline_stale(&client).await {
                Ok(true) => {
                    info!(source = %from.name, "checkpointed the source so pg_control shows its new timeline")
                }
                Ok(false) => {}
                Err(e) => {
                    warn!(source = %from.name, "could not check the source's checkpoint timeline: {e}")
                }
            },
            Err(e) => {
                warn!(source = %from.name, "could not check the source's checkpoint timeline: {e}")
            }
        }
        let passfile = self.settings.pgpass_file.display().to_string();
        let source = conf::conninfo(&[
            ("host", &from.host),
            ("port", &from.port.to_string()),
            ("user", &self.settings.rewind.user),
            ("dbname", "postgres"),
            ("passfile", &passfile),
            ("connect_timeout", "5"),
        ]);
        let mut cmd = tool::command(&self.bin("pg_rewind"), &account);
        cmd.arg(format!("--target-pgdata={}", self.data_dir().display()))
            .arg(format!("--source-server={source}"))
            .arg("--progress");
        info!(source = %from.name, host = %from.host, port = from.port, "pg_rewind starting");
        let mut progress = Progress::default();
        let mut not_needed = false;
        let mut diverged_at = None;
        tool::run_async(cmd, self.settings.clone_timeout, |line| {
            not_needed |= line.contains("no rewind required");
            // "servers diverged at WAL location 0/3000148 on timeline 1"
            if let Some(rest) = line.split("diverged at WAL location ").nth(1) {
                diverged_at = rest.split_whitespace().next().and_then(Lsn::parse);
            }
            progress.line("pg_rewind", line);
        })
        .await?;
        let outcome = if not_needed {
            RewindOutcome::NotNeeded
        } else {
            RewindOutcome::Rewound { diverged_at }
        };
        if !not_needed {
            let flushed = async { sql::flush_wal(&mut self.client_of(from).await?).await };
            if let Err(e) = flushed.await {
                warn!(source = %from.name, "could not make the source flush its WAL; the replica may take longer to become consistent: {e}");
            }
        }
        info!(source = %from.name, ?outcome, "pg_rewind done");
        Ok(outcome)
    }

    /// Renames the data directory to `<data_dir>.<reason>.<UTC time>` so that a
    /// new one can be created. Refuses while PostgreSQL runs on it.
    pub fn move_aside(&self, reason: &str) -> Result<PathBuf> {
        if self.is_running() {
            return Err(Error::Refused(
                "postgres is running on the data directory; stop it first".into(),
            ));
        }
        let dir = self.data_dir();
        if !dir.exists() {
            return Err(Error::Refused(format!("{} does not exist", dir.display())));
        }
        let label: String = reason
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .take(40)
            .collect();
        let base = format!("{}.{label}.{}", dir.display(), utc_stamp(SystemTime::now()));
        let mut target = PathBuf::from(&base);
        let mut n = 1;
        while target.exists() {
            target = PathBuf::from(format!("{base}.{n}"));
            n += 1;
        }
        fs::rename(dir, &target).map_err(|e| Error::io_path("move aside", dir, e))?;
        warn!(from = %dir.display(), to = %target.display(), reason, "data directory moved aside");
        Ok(target)
    }

    /// Records, inside the data directory, that this node (`node`) is about
    /// to create `timeline` by promotion. A clone copies the file but keeps
    /// the creator's name, so only the creator's own directory claims it.
    pub fn write_timeline_claim(&self, node: &str, timeline: u32) -> Result<()> {
        let path = self.data_dir().join(TIMELINE_CLAIM_FILE);
        self.account()?
            .write_file(&path, format!("{timeline} {node}\n").as_bytes(), 0o600)
    }

    /// The claim written by [`Postgres::write_timeline_claim`], if any and
    /// readable: `(timeline, node)`.
    pub fn timeline_claim(&self) -> Option<(u32, String)> {
        let text = std::fs::read_to_string(self.data_dir().join(TIMELINE_CLAIM_FILE)).ok()?;
        let (timeline, node) = text.trim().split_once(' ')?;
        Some((timeline.parse().ok()?, node.to_string()))
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

/// Which timeline this data directory created by promotion, and on which node.
const TIMELINE_CLAIM_FILE: &str = "mainstay.timeline";

/// Rate-limits progress lines of long-running tools; other lines pass.
#[derive(Default)]
struct Progress {
    last: Option<Instant>,
}

impl Progress {
    fn line(&mut self, tool: &str, line: &str) {
        let is_progress = line.contains(" kB (");
        if !is_progress {
            info!("{tool}: {line}");
            return;
        }
        let now = Instant::now();
        if self
            .last
            .is_none_or(|t| now.duration_since(t) >= PROGRESS_EVERY)
            || line.contains("(100%)")
        {
            self.last = Some(now);
            info!("{tool}: {line}");
        }
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
