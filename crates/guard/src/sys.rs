//! The crate's only `unsafe`: two things std and rustix have no safe form of.

use std::io;
use std::os::unix::process::CommandExt;
use std::process::Command;

/// The child gets `signal` when the guard dies: a guard killed by anyone
/// takes PostgreSQL's write permission with it. The guard is single-threaded,
/// so "the thread that forked it exits" is "the guard exits".
pub fn die_with_parent(cmd: &mut Command, signal: rustix::process::Signal) {
    let parent = rustix::process::getpid();
    // SAFETY: the closure runs between fork and exec and only makes two
    // system calls (prctl, getppid), both async-signal-safe. std applies
    // uid/gid before it, which matters: a credential change would clear the
    // parent-death signal.
    unsafe {
        cmd.pre_exec(move || {
            rustix::process::set_parent_process_death_signal(Some(signal))?;
            // The guard may have died before prctl; then no signal comes.
            if rustix::process::getppid() != Some(parent) {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// Signals that would end the guard by default but must not: the guard dies
/// only when PostgreSQL is gone, or by SIGKILL (and then PostgreSQL gets its
/// parent-death signal). Called after the postmaster is started, so that
/// the postmaster does not inherit the ignored dispositions.
pub fn ignore_stray_signals() {
    for signal in [
        libc::SIGHUP,
        libc::SIGINT,
        libc::SIGTERM,
        libc::SIGPIPE,
        libc::SIGUSR1,
        libc::SIGUSR2,
        libc::SIGTSTP,
        libc::SIGTTIN,
        libc::SIGTTOU,
    ] {
        // SAFETY: SIG_IGN installs no handler code; the guard has one thread.
        unsafe { libc::signal(signal, libc::SIG_IGN) };
    }
}

/// How the guard asked the scheduler to run it first.
pub enum Priority {
    /// SCHED_FIFO: it preempts every ordinary process the moment it wakes.
    RealTime,
    /// Highest nice value: no real-time allowed here (no CAP_SYS_NICE).
    Nice,
    Ordinary(std::io::Error),
}

/// Makes the guard the first process to run when it wakes up: when a host
/// resumes from a suspend, every process thaws at once, and each
/// millisecond the guard waits for a CPU is a millisecond in which a thawed
/// backend may acknowledge a commit past the deadline. Cluster fencing
/// daemons (corosync, sbd) run real-time for the same reason. The guard
/// sleeps in poll() all the time but for a few microseconds per event, so
/// it cannot starve the host (and the kernel's real-time throttling bounds
/// it anyway). SCHED_RESET_ON_FORK keeps anything it would start ordinary;
/// the postmaster is started before this is called.
pub fn prefer_in_scheduler() -> Priority {
    let param = libc::sched_param { sched_priority: 10 };
    // SAFETY: a plain system call on this process with a valid pointer.
    let rc = unsafe {
        libc::sched_setscheduler(0, libc::SCHED_FIFO | libc::SCHED_RESET_ON_FORK, &param)
    };
    if rc == 0 {
        return Priority::RealTime;
    }
    let realtime = std::io::Error::last_os_error();
    // SAFETY: as above, no pointers.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, -20) } == 0 {
        return Priority::Nice;
    }
    Priority::Ordinary(realtime)
}
