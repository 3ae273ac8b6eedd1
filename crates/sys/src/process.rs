//! Processes: signals, ids, what a child does when its parent dies,
//! scheduling, resource limits.
//!
//! Signals and scheduling policies are the plain `libc` constants
//! (`libc::SIGKILL`, `libc::SCHED_FIFO`, ...): the kernel checks them and
//! answers `EINVAL` for one it does not know, so no value is unsound.

use crate::check;
use std::ffi::{c_int, c_long};
use std::io;
use std::os::unix::process::CommandExt;
use std::process::Command;

/// A process id (negative: a process group, for [`kill`]).
pub type Pid = libc::pid_t;

/// `kill(2)`: sends `signal` to `pid` (a negative pid: the process group
/// `-pid`; 0 and -1 mean the caller's group and every process, as for
/// kill(2) itself). Signal 0 sends nothing and only checks that the target
/// exists and may be signalled: see [`alive`].
pub fn kill(pid: Pid, signal: c_int) -> io::Result<()> {
    // SAFETY: kill(2) takes no pointers and changes no memory of this
    // process; a pid that is gone (or was never there) is ESRCH.
    check(unsafe { libc::kill(pid, signal) })
}

/// Whether signal 0 reaches `pid`, i.e. `kill(pid, 0) == 0`: it exists
/// (zombies included) and this process may signal it. A negative pid asks
/// about the process group `-pid`.
pub fn alive(pid: Pid) -> bool {
    kill(pid, 0).is_ok()
}

/// `getpid(2)`: this process's id.
pub fn getpid() -> Pid {
    // SAFETY: no arguments, no memory effects, cannot fail.
    unsafe { libc::getpid() }
}

/// `getppid(2)`: the parent's id.
pub fn getppid() -> Pid {
    // SAFETY: no arguments, no memory effects, cannot fail.
    unsafe { libc::getppid() }
}

/// `getpgrp(2)`: this process's process group.
pub fn getpgrp() -> Pid {
    // SAFETY: no arguments, no memory effects, cannot fail.
    unsafe { libc::getpgrp() }
}

/// `geteuid(2)`: the effective user id (0: root).
pub fn geteuid() -> u32 {
    // SAFETY: no arguments, no memory effects, cannot fail.
    unsafe { libc::geteuid() }
}

/// The child started by `cmd` gets `signal` when the thread that forked it
/// exits (`PR_SET_PDEATHSIG`, set between fork and exec), and fails to start
/// (`ESRCH`) if its parent, this process, died before the signal was set:
/// then no signal would ever come. A failing prctl fails the spawn too.
///
/// std applies uid/gid changes before the hook, which matters: a credential
/// change would clear the parent-death signal.
pub fn die_with_parent(cmd: &mut Command, signal: c_int) {
    let parent = getpid();
    let hook = move || {
        // SAFETY: prctl(PR_SET_PDEATHSIG) takes an integer, no pointer.
        let rc = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong, 0, 0, 0) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // The parent may have died before prctl; then no signal comes.
        if getppid() != parent {
            return Err(io::Error::from_raw_os_error(libc::ESRCH));
        }
        Ok(())
    };
    // SAFETY: the hook runs in the child between fork and exec, where only
    // async-signal-safe calls are allowed: it makes two system calls
    // (prctl, getppid), reads errno and builds an `io::Error` from a raw
    // code, which allocates nothing. It captures a copied integer only.
    unsafe {
        cmd.pre_exec(hook);
    }
}

/// Blocks (`block`) or unblocks `signals` for the calling thread
/// (`pthread_sigmask`). Blocked signals stay pending, also across an exec:
/// the agent blocks SIGHUP/SIGTERM/SIGINT before it re-executes itself so
/// that one arriving meanwhile is handled by the new image, which unblocks
/// them once its handlers are installed.
pub fn mask_signals(signals: &[c_int], block: bool) -> io::Result<()> {
    // SAFETY: `set` is a local sigset_t, initialized by sigemptyset before
    // any other use; sigaddset and pthread_sigmask only read or write it
    // through the pointers given, and the old mask is not asked for.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in signals {
            libc::sigaddset(&mut set, *signal);
        }
        let how = if block {
            libc::SIG_BLOCK
        } else {
            libc::SIG_UNBLOCK
        };
        let rc = libc::pthread_sigmask(how, &set, std::ptr::null_mut());
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
    }
    Ok(())
}

/// Sets close-on-exec on descriptor `fd`, inherited across an exec: a
/// guard's socket must not reach a child the new image starts before it
/// takes the socket over.
pub fn close_on_exec(fd: std::os::fd::RawFd) -> io::Result<()> {
    // SAFETY: fcntl(F_GETFD/F_SETFD) takes integers; on a descriptor that
    // is not open it fails with EBADF and changes nothing.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags == -1 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    check(unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) })
}

/// Takes ownership of descriptor `fd`, inherited across an exec of this
/// process and named in a handover record (the guards' sockets when the
/// agent re-executes itself). Fails when no such descriptor is open, or
/// for 0-2.
pub fn claim_inherited_fd(fd: std::os::fd::RawFd) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    if fd < 3 {
        return Err(io::Error::other(format!(
            "{fd} is not a handed-over descriptor"
        )));
    }
    // SAFETY: fcntl(F_GETFD) takes integers and only reads the flags.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the descriptor is open (checked above) and nothing else in
    // this process owns it: the previous image of this process opened it
    // and named it only in the handover record, which is read once.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// The child started by `cmd` runs without ambient capabilities: an agent
/// given some by systemd (the VIP's CAP_NET_ADMIN to a non-root agent)
/// must not hand them to PostgreSQL or a service, which keep them across
/// their own exec.
pub fn without_ambient_capabilities(cmd: &mut Command) {
    let hook = || {
        // SAFETY: prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL) takes
        // integers, no pointer.
        let rc = unsafe {
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
                0,
                0,
                0,
            )
        };
        // Kernels before 4.3 have no ambient set, hence nothing to clear.
        if rc != 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    };
    // SAFETY: the hook runs in the child between fork and exec and makes
    // one async-signal-safe system call (prctl), reads errno and builds an
    // `io::Error` from a raw code, which allocates nothing; it captures
    // nothing.
    unsafe {
        cmd.pre_exec(hook);
    }
}

/// Best effort: the child started by `cmd` gets `signal` when the thread
/// that forked it exits (`PR_SET_PDEATHSIG`). Unlike [`die_with_parent`],
/// a failing prctl is ignored and the child starts anyway.
pub fn signal_on_parent_death(cmd: &mut Command, signal: c_int) {
    let hook = move || {
        // SAFETY: prctl(PR_SET_PDEATHSIG) takes an integer, no pointer.
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong, 0, 0, 0) };
        Ok(())
    };
    // SAFETY: the hook runs in the child between fork and exec and makes one
    // async-signal-safe system call (prctl); it allocates nothing and
    // captures a copied integer only.
    unsafe {
        cmd.pre_exec(hook);
    }
}

/// Ignores `signal` (`signal(signal, SIG_IGN)`). Children started later
/// inherit the ignored disposition.
pub fn ignore_signal(signal: c_int) -> io::Result<()> {
    // SAFETY: SIG_IGN installs no handler, so no code of ours ever runs in
    // a signal context; signal(2) takes no pointer.
    let previous = unsafe { libc::signal(signal, libc::SIG_IGN) };
    if previous == libc::SIG_ERR {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `sched_setscheduler(0, policy, {priority})`: the scheduling policy of
/// the calling thread. `policy` is a `libc::SCHED_*` value, optionally or'ed
/// with `libc::SCHED_RESET_ON_FORK`; real-time policies need CAP_SYS_NICE.
pub fn set_scheduler(policy: c_int, priority: c_int) -> io::Result<()> {
    let param = libc::sched_param {
        sched_priority: priority,
    };
    // SAFETY: `param` is an initialized sched_param that outlives the call;
    // the kernel only reads it and keeps no pointer.
    check(unsafe { libc::sched_setscheduler(0, policy, &param) })
}

/// `setpriority(PRIO_PROCESS, 0, nice)`: the nice value of the caller
/// (-20 runs first; below the current value needs CAP_SYS_NICE).
pub fn set_nice(nice: c_int) -> io::Result<()> {
    // SAFETY: integers only, no pointer, no memory effect.
    check(unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) })
}

/// `sysconf(_SC_CLK_TCK)`: the unit of the CPU times in `/proc/<pid>/stat`
/// (-1 if the system does not say).
pub fn clock_ticks_per_second() -> c_long {
    // SAFETY: sysconf takes an integer and reads a constant.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) }
}

/// `getrlimit(RLIMIT_NOFILE)`: the (soft, hard) limits on open descriptors.
pub fn open_files_limit() -> io::Result<(libc::rlim_t, libc::rlim_t)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is an initialized rlimit, exclusively borrowed for
    // the call; the kernel writes exactly one rlimit into it.
    check(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) })?;
    Ok((limit.rlim_cur, limit.rlim_max))
}

/// `setrlimit(RLIMIT_NOFILE, {soft, hard})`.
pub fn set_open_files_limit(soft: libc::rlim_t, hard: libc::rlim_t) -> io::Result<()> {
    let limit = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: `limit` is an initialized rlimit that outlives the call; the
    // kernel only reads it.
    check(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Stdio;

    #[test]
    fn ids_match_std_and_proc() {
        assert_eq!(getpid() as u32, std::process::id());
        assert_eq!(getppid() as u32, std::os::unix::process::parent_id());
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        let pgrp: Pid = after.split(' ').nth(2).unwrap().parse().unwrap();
        assert_eq!(getpgrp(), pgrp);
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let euid: u32 = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(geteuid(), euid);
    }

    #[test]
    fn kill_reports_errno() {
        assert!(alive(getpid()));
        assert!(kill(getpid(), 0).is_ok());
        // No pid is that large (pid_max is at most 2^22).
        let gone = kill(Pid::MAX, 0).unwrap_err();
        assert_eq!(gone.raw_os_error(), Some(libc::ESRCH));
        assert!(!alive(Pid::MAX));
        let bad = kill(getpid(), 12345).unwrap_err();
        assert_eq!(bad.raw_os_error(), Some(libc::EINVAL));
    }

    #[test]
    fn a_child_with_a_parent_death_signal_runs() {
        for hook in [die_with_parent, signal_on_parent_death] {
            let mut cmd = Command::new("true");
            cmd.stdin(Stdio::null());
            hook(&mut cmd, libc::SIGKILL);
            assert!(cmd.status().unwrap().success());
        }
        // A signal prctl refuses fails the spawn only when checked.
        let mut cmd = Command::new("true");
        die_with_parent(&mut cmd, 12345);
        assert_eq!(cmd.status().unwrap_err().raw_os_error(), Some(libc::EINVAL));
        let mut cmd = Command::new("true");
        signal_on_parent_death(&mut cmd, 12345);
        assert!(cmd.status().unwrap().success());
    }

    #[test]
    fn ignoring_sigkill_is_refused() {
        let err = ignore_signal(libc::SIGKILL).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
    }

    #[test]
    fn limits_and_ticks() {
        assert!(clock_ticks_per_second() > 0);
        let (soft, hard) = open_files_limit().unwrap();
        assert!(soft <= hard);
        // Setting what is already there always succeeds.
        set_open_files_limit(soft, hard).unwrap();
        // A soft limit above the hard one is invalid.
        if hard != libc::RLIM_INFINITY {
            let err = set_open_files_limit(hard + 1, hard).unwrap_err();
            assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
        }
    }

    #[test]
    fn scheduling_errors_come_back() {
        // An unknown policy is refused whatever our privileges.
        let err = set_scheduler(12345, 0).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
    }
}
