//! Starting the postmaster as a direct child that dies with the agent.
//!
//! `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits,
//! not the process. Tokio worker and blocking threads come and go, so every
//! postmaster is forked by one dedicated thread that lives as long as the
//! process. If the agent is SIGKILLed, the kernel sends the postmaster
//! SIGQUIT (immediate shutdown) and it stops writing at once, with no agent
//! left to renew the leader lease.
//!
//! A waiter thread per child reaps it. It first waits *without* reaping
//! (`WNOWAIT`) and marks the child dead under the same lock that senders of
//! signals take: a reaped pid can be reused by an unrelated process, and a
//! fencing signal must never reach that one.

use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::sync::{oneshot, watch};

struct Request {
    cmd: Command,
    reply: oneshot::Sender<io::Result<Child>>,
}

/// The long-lived forking thread, started on first use.
fn spawner() -> &'static mpsc::Sender<Request> {
    static SPAWNER: OnceLock<mpsc::Sender<Request>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("pg-spawner".into())
            .spawn(move || {
                // The sender lives in a static, so this loop never ends.
                for mut req in rx {
                    let _ = req.reply.send(req.cmd.spawn());
                }
            })
            .expect("cannot start the postmaster spawner thread");
        tx
    })
}

/// A postmaster started by this process.
#[derive(Clone)]
pub struct Postmaster {
    pid: i32,
    shared: Arc<Shared>,
}

struct Shared {
    /// True until the child is reaped; signals are sent only while holding it.
    alive: Mutex<bool>,
    status: watch::Sender<Option<ExitStatus>>,
}

impl Postmaster {
    /// Forks and execs `cmd` on the spawner thread, in its own process group,
    /// with SIGQUIT as its parent-death signal.
    pub async fn spawn(mut cmd: Command) -> io::Result<Postmaster> {
        let parent = std::process::id() as libc::pid_t;
        // Only async-signal-safe calls between fork and exec. std has already
        // switched uid/gid here, which matters: a credential change clears
        // the parent-death signal.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGQUIT as libc::c_ulong,
                    0,
                    0,
                    0,
                ) != 0
                {
                    return Err(io::Error::last_os_error());
                }
                // The parent may have died before prctl; then no signal comes.
                if libc::getppid() != parent {
                    return Err(io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
        // Its own group: a Ctrl-C at the agent's terminal must not reach it,
        // and `stop` can SIGKILL the whole group.
        cmd.process_group(0);
        let (reply, answer) = oneshot::channel();
        spawner()
            .send(Request { cmd, reply })
            .map_err(|_| io::Error::other("postmaster spawner thread is gone"))?;
        let mut child = answer
            .await
            .map_err(|_| io::Error::other("postmaster spawner thread is gone"))??;
        let pid = child.id() as i32;
        let (status, _) = watch::channel(None);
        let shared = Arc::new(Shared {
            alive: Mutex::new(true),
            status,
        });
        let waiter = shared.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("pg-wait-{pid}"))
            .spawn(move || {
                wait_without_reaping(pid);
                let mut alive = waiter.alive.lock().unwrap_or_else(|e| e.into_inner());
                *alive = false;
                let status = child.wait();
                drop(alive);
                if let Ok(status) = status {
                    waiter.status.send_replace(Some(status));
                }
            });
        if let Err(e) = spawned {
            // Without a waiter nobody would reap it; do not leave it running.
            unsafe { libc::kill(pid, libc::SIGQUIT) };
            return Err(e);
        }
        Ok(Postmaster { pid, shared })
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Sends `signal` to the postmaster; false if it has already exited.
    pub fn signal(&self, signal: libc::c_int) -> bool {
        let alive = self.shared.alive.lock().unwrap_or_else(|e| e.into_inner());
        *alive && unsafe { libc::kill(self.pid, signal) } == 0
    }

    /// Sends `signal` to the postmaster's process group.
    pub fn signal_group(&self, signal: libc::c_int) -> bool {
        let alive = self.shared.alive.lock().unwrap_or_else(|e| e.into_inner());
        *alive && unsafe { libc::kill(-self.pid, signal) } == 0
    }

    /// `Some` once the postmaster has exited and been reaped.
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

    /// Resolves once the postmaster has exited and been reaped.
    pub async fn exited(&self) -> Option<ExitStatus> {
        let mut rx = self.shared.status.subscribe();
        match rx.wait_for(|s| s.is_some()).await {
            Ok(status) => *status,
            Err(_) => self.exit_status(),
        }
    }
}

fn wait_without_reaping(pid: i32) {
    loop {
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let rc = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        if rc == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return;
        }
    }
}
