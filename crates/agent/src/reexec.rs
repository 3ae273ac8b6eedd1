//! Re-executing the agent in place: `systemctl reload mainstay` (SIGHUP),
//! which a package upgrade sends to move a running agent to the new
//! binary. The process keeps its pid, so PostgreSQL's fencing guard stays
//! its child and never sees its socket close: PostgreSQL keeps running,
//! the lease keeps being renewed, and nobody fails over.
//!
//! The old image checks its successor first (the same configuration file
//! passes the new binary's `config check`, the new guard passes its
//! self-test), stops what does not survive an exec cleanly (services, the
//! etcd member, the watchdog), waits for one more confirmed lease renewal
//! so that the new image starts with the longest deadline, and then execs
//! with a [`Handover`] in a memfd named by `--handover-fd`. The new image
//! takes the postmaster and the lease over and starts everything else as
//! at any start.

use serde::{Deserialize, Serialize};
use std::ffi::OsString;
use std::io::{self, Read, Seek, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The hidden argument naming the handover's descriptor.
pub const HANDOVER_ARG: &str = "--handover-fd";
/// The hidden subcommand that prints [`HANDOVER_VERSION`]: a successor
/// that does not print ours (an older binary, a changed handover) is not
/// re-executed into.
pub const HANDOVER_VERSION_COMMAND: &str = "handover-version";
pub const HANDOVER_VERSION: &str = "1";
/// Each check of the successor is a program run: bounded, so that a hung
/// binary cannot freeze the HA loop.
const CHECK_WITHIN: std::time::Duration = std::time::Duration::from_secs(20);
/// Delivered to the new image, not lost in the exec (blocked meanwhile).
const HELD_SIGNALS: [i32; 3] = [libc::SIGHUP, libc::SIGTERM, libc::SIGINT];

/// What the agent hands the image it re-executes.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Handover {
    pub postmaster: Option<PostmasterState>,
    pub lease: Option<LeaseState>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostmasterState {
    /// The guard's socket, open across the exec.
    pub fd: i32,
    pub guard_pid: i32,
    pub pid: i32,
    pub writable: bool,
    /// The deadline the guard holds, CLOCK_BOOTTIME nanoseconds.
    pub deadline_ns: u64,
    /// The leader a replica streams from: without it the new image would
    /// take its own replica for one about to follow a new leader (and
    /// compare its WAL with the leader's last published position, which
    /// a streaming replica is always past).
    #[serde(default)]
    pub following: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseState {
    pub id: i64,
    /// Boot-clock milliseconds: the deadline.
    pub valid_until_ms: u64,
    /// The deadline rests on the members' confirmations (failsafe), not on
    /// etcd's: the new image trusts no deadline from etcd then.
    #[serde(default)]
    pub members_confirmed: bool,
}

impl PostmasterState {
    pub fn of(
        handover: mainstay_pg::PostmasterHandover,
        following: Option<String>,
    ) -> PostmasterState {
        PostmasterState {
            fd: handover.guard.fd,
            guard_pid: handover.guard.guard_pid,
            pid: handover.guard.pid,
            writable: handover.writable,
            deadline_ns: handover.deadline.0,
            following,
        }
    }

    pub fn into_pg(self) -> mainstay_pg::PostmasterHandover {
        mainstay_pg::PostmasterHandover {
            guard: mainstay_pg::GuardHandover {
                fd: self.fd,
                guard_pid: self.guard_pid,
                pid: self.pid,
            },
            writable: self.writable,
            deadline: mainstay_pg::BootTime(self.deadline_ns),
        }
    }
}

/// The program this process runs and its arguments, recorded at start:
/// a package upgrade replaces the file at that path, and the re-exec runs
/// what is there then.
#[derive(Clone, Debug)]
pub struct Program {
    pub exe: PathBuf,
    /// The arguments after the program's name, without a previous
    /// handover's.
    pub args: Vec<OsString>,
    /// The configuration file, for the successor's check.
    pub config: PathBuf,
}

impl Program {
    pub fn current(config: &Path) -> io::Result<Program> {
        let exe = std::env::current_exe()?;
        // A path the kernel marks as replaced names nothing to run.
        let exe = match exe.to_str().and_then(|s| s.strip_suffix(" (deleted)")) {
            Some(path) => PathBuf::from(path),
            None => exe,
        };
        Ok(Program {
            exe,
            args: without_handover(std::env::args_os().skip(1)),
            config: std::path::absolute(config)?,
        })
    }

    /// Whether the binary now at `exe` can take over: it loads the same
    /// configuration and its fencing guard runs here. The reason if not.
    pub fn check_successor(&self, witness: bool) -> Result<(), String> {
        let version = run_bounded(Command::new(&self.exe).arg(HANDOVER_VERSION_COMMAND))?;
        let said = String::from_utf8_lossy(&version.stdout).trim().to_string();
        if !version.status.success() || said != HANDOVER_VERSION {
            return Err(format!(
                "{} does not take this agent's handover (version {HANDOVER_VERSION}; it says \
                 {said:?}): restart the agent instead (a switchover on the primary)",
                self.exe.display()
            ));
        }
        let config = run_bounded(
            Command::new(&self.exe)
                .arg("config")
                .arg("check")
                .arg(&self.config),
        )?;
        if !config.status.success() {
            return Err(format!(
                "{} refuses {}: {}",
                self.exe.display(),
                self.config.display(),
                String::from_utf8_lossy(&config.stderr).trim()
            ));
        }
        if witness {
            return Ok(());
        }
        let guard = run_bounded(
            Command::new(&self.exe)
                .arg0("mainstay")
                .args([mainstay_guard::GUARD_ARG, mainstay_guard::SELF_TEST_ARG]),
        )?;
        if !guard.status.success() {
            return Err(format!(
                "the fencing guard of {} cannot run here: {}",
                self.exe.display(),
                String::from_utf8_lossy(&guard.stderr).trim()
            ));
        }
        Ok(())
    }

    /// Replaces this process with the program at `exe`, handing `handover`
    /// over. Returns only when the exec failed (this process then goes on).
    pub fn exec(&self, handover: &Handover) -> io::Error {
        let fd = match write_handover(handover) {
            Ok(fd) => fd,
            Err(err) => return err,
        };
        let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
        if let Err(err) = mainstay_sys::process::mask_signals(&HELD_SIGNALS, true) {
            return err;
        }
        let err = Command::new(&self.exe)
            .args(&self.args)
            .arg(HANDOVER_ARG)
            .arg(raw.to_string())
            .exec();
        let _ = mainstay_sys::process::mask_signals(&HELD_SIGNALS, false);
        drop(fd);
        err
    }
}

/// After the new image installed its handlers: what the old one held back
/// during the exec is delivered now.
pub fn release_held_signals() -> io::Result<()> {
    mainstay_sys::process::mask_signals(&HELD_SIGNALS, false)
}

/// Runs a check of the successor, killed if it does not end within
/// [`CHECK_WITHIN`].
fn run_bounded(command: &mut Command) -> Result<std::process::Output, String> {
    use std::process::Stdio;
    let what = format!("{command:?}");
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {what}: {e}"))?;
    let deadline = std::time::Instant::now() + CHECK_WITHIN;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if std::time::Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{what} did not end within {} s",
                    CHECK_WITHIN.as_secs()
                ));
            }
            Ok(None) => std::thread::sleep(std::time::Duration::from_millis(20)),
            Err(err) => return Err(format!("{what}: {err}")),
        }
    }
    child.wait_with_output().map_err(|e| format!("{what}: {e}"))
}

/// `args` without a `--handover-fd N` of an earlier re-exec.
fn without_handover(args: impl Iterator<Item = OsString>) -> Vec<OsString> {
    let mut out = Vec::new();
    let mut skip_next = false;
    for arg in args {
        if skip_next {
            skip_next = false;
        } else if arg == HANDOVER_ARG {
            skip_next = true;
        } else if !arg
            .to_string_lossy()
            .starts_with(&format!("{HANDOVER_ARG}="))
        {
            out.push(arg);
        }
    }
    out
}

/// The handover in an anonymous file the exec keeps open.
fn write_handover(handover: &Handover) -> io::Result<std::os::fd::OwnedFd> {
    let fd = rustix::fs::memfd_create("mainstay-handover", rustix::fs::MemfdFlags::empty())?;
    let mut file = std::fs::File::from(fd);
    let json = serde_json::to_vec(handover).map_err(io::Error::other)?;
    file.write_all(&json)?;
    file.rewind()?;
    let fd = std::os::fd::OwnedFd::from(file);
    rustix::io::fcntl_setfd(&fd, rustix::io::FdFlags::empty())?;
    Ok(fd)
}

/// Reads the handover the previous image wrote, and closes its file.
/// The guard's socket is made private again at once, before the new
/// image starts any child (its etcd member).
pub fn read_handover(fd: i32) -> io::Result<Handover> {
    let fd = mainstay_sys::process::claim_inherited_fd(fd)?;
    let mut file = std::fs::File::from(fd);
    let mut text = String::new();
    file.read_to_string(&mut text)?;
    let handover: Handover = serde_json::from_str(&text).map_err(|e| {
        io::Error::other(format!(
            "the handover from the previous agent is unreadable: {e}"
        ))
    })?;
    if let Some(pm) = &handover.postmaster {
        mainstay_sys::process::close_on_exec(pm.fd)?;
    }
    Ok(handover)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_earlier_handover_argument_is_not_passed_on() {
        let args = ["agent", "--config", "/etc/m.toml", HANDOVER_ARG, "7"]
            .map(OsString::from)
            .into_iter();
        assert_eq!(
            without_handover(args),
            ["agent", "--config", "/etc/m.toml"].map(OsString::from)
        );
        let args = ["agent", "--handover-fd=9", "-c", "x"]
            .map(OsString::from)
            .into_iter();
        assert_eq!(
            without_handover(args),
            ["agent", "-c", "x"].map(OsString::from)
        );
    }

    #[test]
    fn the_handover_round_trips_through_its_file() {
        let handover = Handover {
            postmaster: Some(PostmasterState {
                fd: 12,
                guard_pid: 100,
                pid: 101,
                writable: true,
                deadline_ns: 5_000_000_000,
                following: None,
            }),
            lease: Some(LeaseState {
                id: 0x7a00_0000_0001,
                valid_until_ms: 5000,
                members_confirmed: false,
            }),
        };
        // Stands for the guard's socket the record names.
        let (socket, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
        let socket = std::os::fd::OwnedFd::from(socket);
        rustix::io::fcntl_setfd(&socket, rustix::io::FdFlags::empty()).unwrap();
        let mut handover = handover;
        handover.postmaster.as_mut().unwrap().fd = std::os::fd::AsRawFd::as_raw_fd(&socket);
        let fd = write_handover(&handover).unwrap();
        // What the next image does with the number it is given.
        let raw = std::os::fd::IntoRawFd::into_raw_fd(fd);
        assert_eq!(read_handover(raw).unwrap(), handover);
        assert!(read_handover(raw).is_err(), "read once, then closed");
        let flags = rustix::io::fcntl_getfd(&socket).unwrap();
        assert!(
            flags.contains(rustix::io::FdFlags::CLOEXEC),
            "the guard's socket stayed inheritable"
        );
    }
}
