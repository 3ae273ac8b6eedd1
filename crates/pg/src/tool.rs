//! Running PostgreSQL's command-line tools (initdb, pg_basebackup, pg_rewind,
//! pg_controldata, postgres --single): as the PostgreSQL account, with a clean
//! C-locale environment, bounded in time, with their output forwarded line by
//! line and its tail kept for error messages.

use crate::account::Account;
use crate::error::{Error, Result};
use std::collections::VecDeque;
use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};

const TAIL_LINES: usize = 30;

/// A command for `program`, run as `account`, with only the environment the
/// tools need: inherited PG* variables (PGHOST, PGPASSWORD, ...) would
/// silently change what they connect to, and messages must be parseable.
pub fn command(program: &Path, account: &Account) -> Command {
    let mut cmd = Command::new(program);
    cmd.env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("LC_ALL", "C")
        .env("LANG", "C")
        .env("HOME", &account.home)
        .env("USER", &account.name)
        .env("LOGNAME", &account.name)
        // The account may not be allowed into the agent's working directory.
        .current_dir("/")
        .stdin(Stdio::null());
    if account.switch {
        // std drops supplementary groups (setgroups(0)) before setuid.
        cmd.uid(account.uid).gid(account.gid);
    }
    cmd
}

/// Makes the tool die (SIGKILL) if the thread that started it exits, i.e.
/// with the agent: an orphaned pg_rewind or pg_basebackup would keep writing
/// into a data directory that the next agent may already be using. The
/// forking thread is the one awaiting the tool (a runtime worker or a thread
/// blocked in this call), so it outlives the tool in normal operation.
fn die_with_parent(cmd: &mut Command) {
    mainstay_sys::process::die_with_parent(cmd, libc::SIGKILL);
}

fn describe(cmd: &Command) -> String {
    Path::new(cmd.get_program())
        .file_name()
        .unwrap_or(OsStr::new("?"))
        .to_string_lossy()
        .into_owned()
}

/// Runs a short command synchronously and returns its stdout. For quick
/// read-only tools (pg_controldata, postgres -V) whose output is small.
pub fn run_sync(mut cmd: Command, timeout: Duration) -> Result<String> {
    let name = describe(&cmd);
    die_with_parent(&mut cmd);
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::io(format!("run {name}"), e))?;
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child
            .try_wait()
            .map_err(|e| Error::io(format!("wait for {name}"), e))?
        {
            Some(status) => break status,
            None if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::Timeout {
                    what: name,
                    after: timeout,
                });
            }
            None => std::thread::sleep(Duration::from_millis(5)),
        }
    };
    let mut stdout = String::new();
    let mut stderr = String::new();
    if let Some(mut out) = child.stdout.take() {
        let _ = out.read_to_string(&mut stdout);
    }
    if let Some(mut err) = child.stderr.take() {
        let _ = err.read_to_string(&mut stderr);
    }
    if !status.success() {
        return Err(Error::Tool {
            tool: name,
            status: status.to_string(),
            tail: tail_of(&stderr),
        });
    }
    Ok(stdout)
}

/// Runs a command to completion, calling `on_line` for every line of stdout
/// and stderr. Killed at `timeout` (and if the future is dropped). On failure
/// the error carries the last lines of output.
pub async fn run_async(
    mut cmd: Command,
    timeout: Duration,
    mut on_line: impl FnMut(&str),
) -> Result<Vec<String>> {
    let name = describe(&cmd);
    die_with_parent(&mut cmd);
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .map_err(|e| Error::io(format!("run {name}"), e))?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    if let Some(out) = child.stdout.take() {
        tokio::spawn(forward_lines(out, tx.clone()));
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(forward_lines(err, tx));
    }
    let mut tail = VecDeque::new();
    let work = async {
        while let Some(line) = rx.recv().await {
            on_line(&line);
            if tail.len() == TAIL_LINES {
                tail.pop_front();
            }
            tail.push_back(line);
        }
        child.wait().await
    };
    let status = match tokio::time::timeout(timeout, work).await {
        Ok(status) => status.map_err(|e| Error::io(format!("wait for {name}"), e))?,
        Err(_) => {
            let _ = child.start_kill();
            let _ = child.wait().await;
            return Err(Error::Timeout {
                what: name,
                after: timeout,
            });
        }
    };
    let tail: Vec<String> = tail.into_iter().collect();
    if !status.success() {
        return Err(Error::Tool {
            tool: name,
            status: status.to_string(),
            tail: tail.join("\n"),
        });
    }
    Ok(tail)
}

async fn forward_lines(
    stream: impl AsyncRead + Unpin,
    tx: tokio::sync::mpsc::UnboundedSender<String>,
) {
    let mut reader = BufReader::new(stream);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                // Progress reports on a non-terminal end in '\n'; on some
                // versions they use '\r' between updates.
                for piece in String::from_utf8_lossy(&buf).split('\r') {
                    let line = piece.trim_end();
                    if !line.is_empty() && tx.send(line.to_string()).is_err() {
                        return;
                    }
                }
            }
        }
    }
}

/// The last lines of some output, for error messages.
pub fn tail_of(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n")
}
