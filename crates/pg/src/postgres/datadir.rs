//! Making, cloning, rewinding and moving aside data directories (never
//! deleting one), and the timeline claim kept beside them.

use super::*;

impl Postgres {
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

    // ----- creating a data directory -----
    pub(super) fn refuse_unless_blank(&self, action: &str) -> Result<()> {
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
    pub(super) fn make_data_dir(&self, account: &Account) -> Result<()> {
        if let Some(parent) = self.data_dir().parent() {
            fs::create_dir_all(parent)
                .map_err(|e| Error::io_path("create directory", parent, e))?;
        }
        account.ensure_dir(self.data_dir(), 0o700)
    }
}

/// Which timeline this data directory created by promotion, and on which node.
const TIMELINE_CLAIM_FILE: &str = "mainstay.timeline";

/// Rate-limits progress lines of long-running tools; other lines pass.
#[derive(Default)]
struct Progress {
    pub(super) last: Option<Instant>,
}

impl Progress {
    pub(super) fn line(&mut self, tool: &str, line: &str) {
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
