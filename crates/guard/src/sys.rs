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
