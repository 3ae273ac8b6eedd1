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

/// What the agent hands the image it re-executes.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Handover {
    pub postmaster: Option<PostmasterState>,
    pub lease: Option<LeaseState>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostmasterState {
    /// The guard's socket, open across the exec.
    pub fd: i32,
    pub guard_pid: i32,
    pub pid: i32,
    pub writable: bool,
    /// The deadline the guard holds, CLOCK_BOOTTIME nanoseconds.
    pub deadline_ns: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseState {
    pub id: i64,
    /// Boot-clock milliseconds: the deadline etcd's last confirmation gave.
    pub valid_until_ms: u64,
}

impl PostmasterState {
    pub fn of(handover: mainstay_pg::PostmasterHandover) -> PostmasterState {
        PostmasterState {
            fd: handover.guard.fd,
            guard_pid: handover.guard.guard_pid,
            pid: handover.guard.pid,
            writable: handover.writable,
            deadline_ns: handover.deadline.0,
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
        let config = Command::new(&self.exe)
            .arg("config")
            .arg("check")
            .arg(&self.config)
            .output()
            .map_err(|e| format!("cannot run {}: {e}", self.exe.display()))?;
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
        mainstay_pg::check_guard(&self.exe).map_err(|e| e.to_string())
    }

    /// Replaces this process with the program at `exe`, handing `handover`
    /// over. Returns only when the exec failed (this process then goes on).
    pub fn exec(&self, handover: &Handover) -> io::Error {
        let fd = match write_handover(handover) {
            Ok(fd) => fd,
            Err(err) => return err,
        };
        let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
        let err = Command::new(&self.exe)
            .args(&self.args)
            .arg(HANDOVER_ARG)
            .arg(raw.to_string())
            .exec();
        drop(fd);
        err
    }
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
pub fn read_handover(fd: i32) -> io::Result<Handover> {
    let fd = mainstay_sys::process::claim_inherited_fd(fd)?;
    let mut file = std::fs::File::from(fd);
    let mut text = String::new();
    file.read_to_string(&mut text)?;
    serde_json::from_str(&text).map_err(|e| {
        io::Error::other(format!(
            "the handover from the previous agent is unreadable: {e}"
        ))
    })
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
            }),
            lease: Some(LeaseState {
                id: 0x7a00_0000_0001,
                valid_until_ms: 5000,
            }),
        };
        let fd = write_handover(&handover).unwrap();
        // What the next image does with the number it is given.
        let raw = std::os::fd::IntoRawFd::into_raw_fd(fd);
        assert_eq!(read_handover(raw).unwrap(), handover);
        assert!(read_handover(raw).is_err(), "read once, then closed");
    }
}
