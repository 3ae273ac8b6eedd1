//! One run of a service: its process started under a fencing guard (the
//! agent's binary re-executed as `mainstay guard`, the same guard that
//! holds PostgreSQL), in a clean environment, as its account, with its
//! output in its log file; and stopped with its signal, a grace period,
//! then a kill of everything it started.

use crate::spec::{Placement, ServiceSpec};
use mainstay_guard::protocol::ToGuard;
use mainstay_guard::{BootTime, GuardArgs};
use mainstay_guarded::Guarded;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

/// The search path a service gets unless its environment sets one.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// How long a killed service may take to be reaped.
pub(crate) const KILL_WAIT: Duration = Duration::from_secs(5);

pub struct Running {
    guarded: Guarded,
    placement: Placement,
}

impl Running {
    /// Starts the service. A `with-leader` service is armed with `deadline`
    /// (its guard refuses to start it past it, and kills it there unless
    /// the deadline moves); the others run disarmed. Either way the guard
    /// kills it at once should this agent die.
    pub async fn start(
        spec: &ServiceSpec,
        guard_program: &Path,
        deadline: BootTime,
    ) -> io::Result<Running> {
        let (stdout, stderr) = crate::log::open(&spec.log)?;
        let args = GuardArgs {
            deadline: (spec.placement == Placement::WithLeader).then_some(deadline),
            uid: spec.account.as_ref().map(|a| a.uid),
            gid: spec.account.as_ref().map(|a| a.gid),
            what: Some(format!("service {}", spec.name)),
            program: spec.program.clone().into(),
            args: spec.args.iter().map(Into::into).collect(),
        };
        let mut command = Command::new(guard_program);
        // `ps` shows `mainstay guard ... -- <program>`.
        command.arg0("mainstay").args(args.to_args());
        command.env_clear().env("PATH", DEFAULT_PATH);
        if let Some(account) = &spec.account {
            let home = mainstay_sys::user::by_uid(account.uid)
                .ok()
                .flatten()
                .map(|user| user.home);
            command
                .env("USER", &account.name)
                .env("LOGNAME", &account.name);
            if let Some(home) = home {
                command.env("HOME", home);
            }
        } else if let Some(home) = std::env::var_os("HOME") {
            command.env("HOME", home);
        }
        command.envs(&spec.environment);
        if let Some(dir) = &spec.working_directory {
            command.current_dir(dir);
        }
        command
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::from(stderr));
        let guarded = Guarded::spawn(command, &format!("service {}", spec.name)).await?;
        Ok(Running {
            guarded,
            placement: spec.placement,
        })
    }

    pub fn pid(&self) -> i32 {
        self.guarded.pid()
    }

    pub fn exit_status(&self) -> Option<ExitStatus> {
        self.guarded.exit_status()
    }

    pub async fn exited(&self) -> Option<ExitStatus> {
        self.guarded.exited().await
    }

    /// A new fencing deadline for a `with-leader` service's guard.
    pub fn extend(&self, deadline: BootTime) {
        if self.placement == Placement::WithLeader {
            self.guarded.tell(&ToGuard::Arm(deadline));
        }
    }

    /// Stops it: `signal`, up to `grace` to exit, then the guard kills its
    /// whole process tree. Returns how it ended.
    pub async fn stop(&self, signal: i32, grace: Duration) -> Option<ExitStatus> {
        if self.guarded.signal(signal)
            && let Some(status) = self.guarded.wait_exit(grace).await
        {
            return Some(status);
        }
        self.kill().await
    }

    /// The guard kills every process of the service now.
    pub async fn kill(&self) -> Option<ExitStatus> {
        if self.exit_status().is_none() {
            self.guarded.tell(&ToGuard::Fence);
        }
        self.guarded.wait_exit(KILL_WAIT).await
    }
}
