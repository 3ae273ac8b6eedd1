//! The agent's side of a process that runs under a fencing guard:
//! PostgreSQL's postmaster, and every service that must not outlive the
//! node's write permission.
//!
//! The agent starts the guard (`mainstay guard ...`, see the
//! `mainstay-guard` crate) with a socket as its standard input; the guard
//! starts the program as its own child and tells the agent its pid. From
//! then on the agent talks to the child only through the guard: signals
//! (the guard knows whether the pid is still its child, so a signal never
//! reaches a recycled pid) and the fencing deadline. When the child exits,
//! the guard reports the status and exits too.
//!
//! If the agent dies, its end of the socket closes and the guard stops the
//! child at once; if the guard dies, the kernel sends the child SIGQUIT
//! (parent-death signal); if the agent is frozen, the guard still stops the
//! child at the deadline it last received.

#![forbid(unsafe_code)]

use mainstay_core::poison;
use mainstay_guard::protocol::{FromGuard, ToGuard};
use std::io::{self, BufRead, BufReader};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{oneshot, watch};
use tracing::{error, warn};

/// How long the guard may take to report that the child was forked.
const GUARD_START_TIMEOUT: Duration = Duration::from_secs(10);

/// A child started under a guard by this process (or by the agent this
/// process re-executed from: [`Guarded::adopt`]).
#[derive(Clone)]
pub struct Guarded {
    pid: i32,
    guard_pid: i32,
    shared: Arc<Shared>,
}

/// What a re-executed agent needs to take a guarded child over: the
/// guard's socket (kept open across the exec) and both pids.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Handover {
    pub fd: i32,
    pub guard_pid: i32,
    pub pid: i32,
}

struct Shared {
    /// The agent's end of the guard's socket; `None` once the guard is gone.
    link: Mutex<Option<UnixStream>>,
    status: watch::Sender<Option<ExitStatus>>,
}

impl Guarded {
    /// Starts `guard` (a command whose standard input must be the socket)
    /// and waits until it reports its child's pid. `what` names the child
    /// in the log ("postgres", "service synapse").
    pub async fn spawn(mut guard: Command, what: &str) -> io::Result<Guarded> {
        let (ours, theirs) = UnixStream::pair()?;
        guard.stdin(Stdio::from(OwnedFd::from(theirs)));
        let child = guard.spawn()?;
        // The command holds our copy of the guard's end; a copy left open
        // here would hide the guard's exit from the reader below.
        drop(guard);
        let guard_pid = child.id() as i32;
        let mut child = Some(child);
        let reap = move || match child.take() {
            Some(mut child) => child.wait(),
            None => Err(io::Error::other("reaped already")),
        };
        let (started_tx, started) = oneshot::channel();
        let shared = listen(ours, guard_pid, what, reap, Some(started_tx))?;
        let answer = tokio::time::timeout(GUARD_START_TIMEOUT, started)
            .await
            .map_err(|_| {
                io::Error::other(format!("the fencing guard did not start {what} in time"))
            })?
            .map_err(|_| io::Error::other("the fencing guard's listener is gone"))?;
        match answer {
            Ok(pid) => Ok(Guarded {
                pid,
                guard_pid,
                shared,
            }),
            Err(why) => Err(io::Error::other(format!(
                "the fencing guard did not start {what}: {why}"
            ))),
        }
    }

    /// Takes over a guarded child that the agent this process re-executed
    /// from started: the guard is still this process's child (an exec
    /// keeps the pid) and its socket was kept open across the exec, so the
    /// guard never noticed. The guard's report of the child's exit, if it
    /// came during the exec, is lost: the exit is then the guard's own.
    pub fn adopt(handover: Handover, what: &str) -> io::Result<Guarded> {
        let Handover { fd, guard_pid, pid } = handover;
        let fd = adopted_fd(fd)?;
        let stream = UnixStream::from(fd);
        rustix::io::fcntl_setfd(&stream, rustix::io::FdFlags::CLOEXEC)?;
        let guard = rustix::process::Pid::from_raw(guard_pid)
            .ok_or_else(|| io::Error::other(format!("guard pid {guard_pid} is not a pid")))?;
        let reap = move || {
            rustix::process::waitpid(Some(guard), rustix::process::WaitOptions::empty())
                .map_err(io::Error::from)
                .map(|status| match status {
                    Some((_, status)) => ExitStatus::from_raw(status.as_raw()),
                    None => ExitStatus::from_raw(0),
                })
        };
        let shared = listen(stream, guard_pid, what, reap, None)?;
        Ok(Guarded {
            pid,
            guard_pid,
            shared,
        })
    }

    /// The guard's socket, made to survive an exec of this process, and
    /// the pids: for [`Guarded::adopt`] in the re-executed agent. `None`
    /// once the guard is gone.
    pub fn hand_over(&self) -> io::Result<Option<Handover>> {
        let link = poison::lock(&self.shared.link);
        let Some(stream) = link.as_ref() else {
            return Ok(None);
        };
        rustix::io::fcntl_setfd(stream, rustix::io::FdFlags::empty())?;
        Ok(Some(Handover {
            fd: std::os::fd::AsRawFd::as_raw_fd(stream),
            guard_pid: self.guard_pid,
            pid: self.pid,
        }))
    }

    /// Undoes [`Guarded::hand_over`] after a failed exec: a child started
    /// later must not inherit the guard's socket (it would keep the socket
    /// open after this process died, and the guard would not fence).
    pub fn keep_private(&self) {
        if let Some(stream) = poison::lock(&self.shared.link).as_ref() {
            let _ = rustix::io::fcntl_setfd(stream, rustix::io::FdFlags::CLOEXEC);
        }
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Passes `msg` to the guard without ever waiting on it: a frozen guard
    /// must not freeze the agent. False if the guard is gone or its socket
    /// is full.
    pub fn tell(&self, msg: &ToGuard) -> bool {
        let link = poison::lock(&self.shared.link);
        let Some(stream) = link.as_ref() else {
            return false;
        };
        let bytes = msg.encode();
        let flags = rustix::net::SendFlags::DONTWAIT | rustix::net::SendFlags::NOSIGNAL;
        match rustix::net::send(stream, bytes.as_bytes(), flags) {
            Ok(n) if n == bytes.len() => true,
            Ok(_) | Err(_) => {
                warn!(?msg, "could not pass a message to the fencing guard");
                false
            }
        }
    }

    /// Sends `signal` to the child; false if it has already exited.
    pub fn signal(&self, signal: libc::c_int) -> bool {
        self.exit_status().is_none() && self.tell(&ToGuard::Signal(signal))
    }

    /// `Some` once the child has exited and been reaped.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        *self.shared.status.borrow()
    }

    /// Waits up to `timeout` for the exit; returns the status if it exited.
    pub async fn wait_exit(&self, timeout: Duration) -> Option<ExitStatus> {
        tokio::time::timeout(timeout, self.exited())
            .await
            .ok()
            .flatten()
    }

    /// Resolves once the child has exited and been reaped.
    pub async fn exited(&self) -> Option<ExitStatus> {
        let mut rx = self.shared.status.subscribe();
        match rx.wait_for(|s| s.is_some()).await {
            Ok(status) => *status,
            Err(_) => self.exit_status(),
        }
    }
}

/// Starts the thread that reads the guard's reports until its socket
/// closes, then reaps the guard (`reap`) and publishes the child's exit.
fn listen(
    ours: UnixStream,
    guard_pid: i32,
    what: &str,
    mut reap: impl FnMut() -> io::Result<ExitStatus> + Send + 'static,
    started_tx: Option<oneshot::Sender<Result<i32, String>>>,
) -> io::Result<Arc<Shared>> {
    let what = what.to_string();
    let reader = ours.try_clone()?;
    let (status, _) = watch::channel(None);
    let shared = Arc::new(Shared {
        link: Mutex::new(Some(ours)),
        status,
    });
    let listener = shared.clone();
    std::thread::Builder::new()
        .name(format!("guard-{guard_pid}"))
        .spawn(move || {
            let mut started_tx = started_tx;
            let mut exited = None;
            for line in BufReader::new(reader).lines() {
                let Ok(line) = line else { break };
                match FromGuard::parse(&line) {
                    Some(FromGuard::Started(pid)) => {
                        if let Some(tx) = started_tx.take() {
                            let _ = tx.send(Ok(pid));
                        }
                    }
                    Some(FromGuard::Refused(why)) => {
                        if let Some(tx) = started_tx.take() {
                            let _ = tx.send(Err(why));
                        }
                    }
                    Some(FromGuard::Fenced(why)) => {
                        error!(guard = guard_pid, "fencing guard stopped {what}: {why}");
                    }
                    Some(FromGuard::Exited(raw)) => exited = Some(ExitStatus::from_raw(raw)),
                    None => warn!(
                        guard = guard_pid,
                        "unknown message from the guard: {line:?}"
                    ),
                }
            }
            let guard_status = reap();
            *poison::lock(&listener.link) = None;
            if let Some(tx) = started_tx.take() {
                let _ = tx.send(Err(format!("the guard exited ({guard_status:?})")));
            }
            let status = exited.or_else(|| {
                error!(
                    guard = guard_pid,
                    ?guard_status,
                    "the fencing guard of {what} died before it; the kernel sends {what} \
                     SIGQUIT (parent-death signal)"
                );
                guard_status.ok()
            });
            listener
                .status
                .send_replace(Some(status.unwrap_or(ExitStatus::from_raw(9))));
        })?;
    Ok(shared)
}

/// The handed-over socket as an owned fd, once it is known to be a socket
/// (a wrong number in a handover record must not take over a file).
fn adopted_fd(fd: i32) -> io::Result<OwnedFd> {
    let fd = mainstay_sys::process::claim_inherited_fd(fd)?;
    let kind = rustix::fs::fstat(&fd)?.st_mode & libc::S_IFMT;
    if kind != libc::S_IFSOCK {
        return Err(io::Error::other(format!(
            "fd {} is not the guard's socket",
            std::os::fd::AsRawFd::as_raw_fd(&fd)
        )));
    }
    Ok(fd)
}

/// Runs `program guard --self-test`: whether the guard can be started at all
/// and this kernel gives it what it needs. The reason, if not.
pub fn check_guard(program: &std::path::Path) -> Result<(), GuardCheckError> {
    let output = Command::new(program)
        .arg0("mainstay")
        .args([mainstay_guard::GUARD_ARG, mainstay_guard::SELF_TEST_ARG])
        .stdin(Stdio::null())
        .output()
        .map_err(|source| GuardCheckError::Spawn {
            program: program.to_path_buf(),
            source,
        })?;
    if output.status.success() {
        return Ok(());
    }
    Err(GuardCheckError::Refused {
        program: program.to_path_buf(),
        status: output.status,
        said: String::from_utf8_lossy(&output.stderr).trim().to_string(),
    })
}

/// Why the fencing guard cannot run on this machine: PostgreSQL then never
/// starts.
#[derive(Debug, thiserror::Error)]
pub enum GuardCheckError {
    #[error("cannot start the fencing guard ({}): {source}", program.display())]
    Spawn {
        program: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("the fencing guard ({}) cannot run here ({status}): {said}", program.display())]
    Refused {
        program: std::path::PathBuf,
        status: std::process::ExitStatus,
        said: String,
    },
}
