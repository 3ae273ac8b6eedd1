//! The guard's main loop: start the postmaster, then wait on three things at
//! once (the agent's socket, a timer on `CLOCK_BOOTTIME` set to the next
//! deadline, the postmaster's pidfd) and carry out what `Rules` says. It
//! never waits on the agent: reports that do not fit the socket are dropped.

use crate::clock::BootTime;
use crate::protocol::{FromGuard, ToGuard};
use crate::rules::{Effect, Rules};
use mainstay_sys::process as sys;
use rustix::event::{PollFd, PollFlags, poll};
use rustix::process::{Pid, PidfdFlags, Signal, pidfd_open};
use rustix::time::{
    Itimerspec, TimerfdClockId, TimerfdFlags, TimerfdTimerFlags, Timespec, timerfd_create,
    timerfd_settime,
};
use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Stdio};
use std::time::Duration;

/// The first argument that makes a binary embedding this crate act as the
/// guard (`mainstay guard ...`).
pub const GUARD_ARG: &str = "guard";

/// What the guard is started with (everything after `guard`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuardArgs {
    /// `None`: disarmed (a replica).
    pub deadline: Option<BootTime>,
    /// The account the postmaster runs as (PostgreSQL refuses root).
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// What the child is, for the guard's log lines ("postgres" unless
    /// said otherwise: "service synapse").
    pub what: Option<String>,
    pub program: OsString,
    pub args: Vec<OsString>,
}

impl GuardArgs {
    pub fn to_args(&self) -> Vec<OsString> {
        let mut out: Vec<OsString> = vec![GUARD_ARG.into()];
        if let Some(deadline) = self.deadline {
            out.extend(["--deadline-ns".into(), deadline.0.to_string().into()]);
        }
        if let Some(uid) = self.uid {
            out.extend(["--uid".into(), uid.to_string().into()]);
        }
        if let Some(gid) = self.gid {
            out.extend(["--gid".into(), gid.to_string().into()]);
        }
        if let Some(what) = &self.what {
            out.extend(["--what".into(), what.into()]);
        }
        out.push("--".into());
        out.push(self.program.clone());
        out.extend(self.args.iter().cloned());
        out
    }

    /// Parses what follows `guard`.
    pub fn parse(args: &[OsString]) -> Result<GuardArgs, String> {
        let mut parsed = GuardArgs {
            deadline: None,
            uid: None,
            gid: None,
            what: None,
            program: OsString::new(),
            args: Vec::new(),
        };
        let mut rest = args.iter();
        while let Some(flag) = rest.next() {
            if flag == "--" {
                parsed.program = rest.next().cloned().ok_or("no program after --")?;
                parsed.args = rest.cloned().collect();
                return Ok(parsed);
            }
            let value = rest
                .next()
                .and_then(|v| v.to_str())
                .ok_or_else(|| format!("{flag:?} needs a value"))?;
            let number = |v: &str| {
                v.parse::<u64>()
                    .map_err(|_| format!("{flag:?}: {v:?} is not a number"))
            };
            match flag.to_str() {
                Some("--deadline-ns") => parsed.deadline = Some(BootTime(number(value)?)),
                Some("--uid") => parsed.uid = Some(number(value)? as u32),
                Some("--gid") => parsed.gid = Some(number(value)? as u32),
                Some("--what") => parsed.what = Some(value.to_string()),
                _ => return Err(format!("unknown guard argument {flag:?}")),
            }
        }
        Err("missing -- and the program to guard".into())
    }
}

/// Acts as the guard and exits if the process was started as one; returns
/// otherwise. Call it first thing in `main`.
pub fn run_if_asked() {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    if args.first().is_some_and(|a| a == GUARD_ARG) {
        std::process::exit(main(&args[1..]));
    }
}

/// The guard's entry point; returns the process's exit code.
pub fn main(args: &[OsString]) -> i32 {
    if args.first().is_some_and(|a| a == SELF_TEST_ARG) {
        return match self_test() {
            Ok(()) => 0,
            Err(why) => {
                eprintln!("{why}");
                1
            }
        };
    }
    let args = match GuardArgs::parse(args) {
        Ok(args) => args,
        Err(why) => {
            log(&format!("bad arguments: {why}"));
            return 2;
        }
    };
    // The socket to the agent is standard input.
    let channel = match std::io::stdin().as_fd().try_clone_to_owned() {
        Ok(fd) => UnixStream::from(fd),
        Err(e) => {
            log(&format!("no channel to the agent on standard input: {e}"));
            return 2;
        }
    };
    match run(args, channel) {
        Ok(()) => 0,
        Err(why) => {
            log(&why);
            1
        }
    }
}

fn run(args: GuardArgs, channel: UnixStream) -> Result<(), String> {
    // Its own session: a SIGSTOP or Ctrl-Z aimed at the agent's process
    // group, or a hang-up of its terminal, does not reach the guard.
    rustix::process::setsid().map_err(|e| format!("cannot start a session of its own: {e}"))?;
    // PostgreSQL's children each lead a session of their own; should the
    // postmaster die first, they become the guard's children instead of
    // init's, so that it can stop every one of them.
    let me = rustix::process::getpid();
    rustix::process::set_child_subreaper(Some(me))
        .map_err(|e| format!("cannot become a child subreaper: {e}"))?;
    let _ = rustix::thread::set_name(c"mainstay-guard");
    channel
        .set_nonblocking(true)
        .map_err(|e| format!("channel: {e}"))?;
    let mut link = Link {
        channel,
        open: true,
        pending: Vec::new(),
    };
    let what = args.what.clone().unwrap_or_else(|| "postgres".into());
    let mut rules = Rules::new(args.deadline);
    if let Some(why) = rules.refuses_start(BootTime::now()) {
        link.report(&FromGuard::Refused(why.clone()));
        return Err(format!("{what} not started: {why}"));
    }

    let mut cmd = Command::new(&args.program);
    cmd.args(&args.args).stdin(Stdio::null()).process_group(0);
    if let Some(gid) = args.gid {
        cmd.gid(gid);
    }
    if let Some(uid) = args.uid {
        cmd.uid(uid);
    }
    sys::die_with_parent(&mut cmd, libc::SIGQUIT);
    sys::without_ambient_capabilities(&mut cmd);
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => {
            let why = format!("cannot start {:?}: {e}", args.program);
            link.report(&FromGuard::Refused(why.clone()));
            return Err(why);
        }
    };
    let pid = Pid::from_raw(child.id() as i32).ok_or("the postmaster has no pid")?;
    ignore_stray_signals();
    match prefer_in_scheduler() {
        Priority::RealTime => {}
        Priority::Nice => log("no real-time scheduling allowed: running at nice -20"),
        Priority::Ordinary(e) => log(&format!(
            "cannot raise its scheduling priority ({e}): after a host resumes, a thawed backend \
             may run before the fence"
        )),
    }
    let exited = pidfd_open(pid, PidfdFlags::empty()).map_err(|e| format!("pidfd_open: {e}"));
    let timer = timerfd_create(TimerfdClockId::Boottime, TimerfdFlags::CLOEXEC)
        .map_err(|e| format!("timerfd_create: {e}"));
    let (exited, timer) = match (exited, timer) {
        (Ok(exited), Ok(timer)) => (exited, timer),
        (Err(why), _) | (_, Err(why)) => {
            // Unguarded, PostgreSQL must not run.
            let _ = rustix::process::kill_process(pid, Signal::KILL);
            let _ = child.wait();
            kill_orphans(me, pid);
            return Err(why);
        }
    };
    link.report(&FromGuard::Started(pid.as_raw_nonzero().get()));
    log(&format!(
        "guarding {what} {} ({})",
        pid.as_raw_nonzero(),
        match args.deadline {
            Some(d) => format!("writable until boot time {:?}", Duration::from_nanos(d.0)),
            None => "not writable".into(),
        }
    ));

    loop {
        set_timer(&timer, rules.next_wake())?;
        let (agent_ready, postmaster_gone) = {
            let mut fds = vec![
                PollFd::new(&exited, PollFlags::IN),
                PollFd::new(&timer, PollFlags::IN),
            ];
            if link.open {
                fds.push(PollFd::new(&link.channel, PollFlags::IN));
            }
            // A periodic wake-up reaps orphans that exited meanwhile.
            match poll(&mut fds, Some(&ORPHAN_REAP_INTERVAL)) {
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(format!("poll: {e}")),
            }
            let agent_ready = fds.get(2).is_some_and(|fd| !fd.revents().is_empty());
            (agent_ready, !fds[0].revents().is_empty())
        };
        reap_exited_orphans(me, pid);
        let now = BootTime::now();
        let mut effects = Vec::new();
        if agent_ready {
            match link.receive() {
                Some(messages) => {
                    for msg in messages {
                        effects.extend(rules.on_message(msg, now));
                    }
                }
                None => effects.extend(rules.on_agent_gone()),
            }
        }
        effects.extend(rules.on_time(now));
        for effect in effects {
            // The postmaster is not reaped before the loop ends, so its pid
            // (and group id) cannot belong to anybody else here.
            match effect {
                Effect::Signal(n) => send(pid, n),
                Effect::Fence => fence(pid),
                Effect::Report(report) => {
                    if let FromGuard::Fenced(why) = &report {
                        log(&format!("fenced {what} (every process SIGKILLed): {why}"));
                    }
                    link.report(&report);
                }
            }
        }
        if postmaster_gone {
            // Its children were reparented to the guard when it exited: no
            // backend may outlive the postmaster.
            let killed = kill_orphans(me, pid);
            if killed > 0 {
                log(&format!("killed {killed} process(es) {what} left behind"));
            }
            let status = child.wait().map_err(|e| format!("wait: {e}"))?;
            log(&format!("{what} exited ({status})"));
            link.report(&FromGuard::Exited(status.into_raw()));
            return Ok(());
        }
    }
}

/// `guard --self-test`: whether this kernel gives the guard what it needs.
pub const SELF_TEST_ARG: &str = "--self-test";

/// Checks, without starting anything, every facility the guard relies on,
/// so that `mainstay config check` can refuse a machine where PostgreSQL
/// could not run guarded, naming what is missing.
pub fn self_test() -> Result<(), String> {
    let me = rustix::process::getpid();
    timerfd_create(TimerfdClockId::Boottime, TimerfdFlags::CLOEXEC).map_err(|e| {
        format!("the guard needs timers on CLOCK_BOOTTIME (timerfd, Linux 3.15+): {e}")
    })?;
    pidfd_open(me, PidfdFlags::empty())
        .map_err(|e| format!("the guard needs pidfd_open (Linux 5.3+): {e}"))?;
    rustix::process::set_child_subreaper(Some(me))
        .map_err(|e| format!("the guard needs PR_SET_CHILD_SUBREAPER: {e}"))?;
    let children = format!("/proc/{0}/task/{0}/children", me.as_raw_nonzero());
    std::fs::read_to_string(&children).map_err(|e| {
        format!("the guard needs {children} (a kernel with CONFIG_PROC_CHILDREN): {e}")
    })?;
    Ok(())
}

/// How often the guard wakes up on its own to reap orphans.
const ORPHAN_REAP_INTERVAL: Timespec = Timespec {
    tv_sec: 10,
    tv_nsec: 0,
};

/// The guard's children other than the postmaster: processes the postmaster
/// (or one of its children) left behind when it died. They are the guard's
/// own until it reaps them, so signalling them cannot hit a recycled pid.
fn orphans(me: Pid, postmaster: Pid) -> Vec<Pid> {
    let mut children = children_of(me);
    children.retain(|p| *p != postmaster);
    children
}

/// The children of single-threaded `pid` (the guard, the postmaster).
fn children_of(pid: Pid) -> Vec<Pid> {
    let path = format!("/proc/{0}/task/{0}/children", pid.as_raw_nonzero());
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok().and_then(Pid::from_raw))
        .collect()
}

/// SIGKILLs and reaps every orphan; returns how many there were.
fn kill_orphans(me: Pid, postmaster: Pid) -> usize {
    let mut killed = 0;
    // Bounded: a killed orphan's own orphans arrive on the next pass.
    for _ in 0..10 {
        let found = orphans(me, postmaster);
        if found.is_empty() {
            break;
        }
        for orphan in found {
            let _ = rustix::process::kill_process(orphan, Signal::KILL);
            let _ = rustix::process::waitpid(Some(orphan), rustix::process::WaitOptions::empty());
            killed += 1;
        }
    }
    killed
}

/// Reaps orphans that have exited, without waiting.
fn reap_exited_orphans(me: Pid, postmaster: Pid) {
    for orphan in orphans(me, postmaster) {
        let _ = rustix::process::waitpid(Some(orphan), rustix::process::WaitOptions::NOHANG);
    }
}

fn set_timer(timer: &impl AsFd, at: Option<BootTime>) -> Result<(), String> {
    let zero = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    let value = match at {
        // An absolute time of zero would disarm the timer instead of firing.
        Some(at) => Timespec {
            tv_sec: (at.0 / 1_000_000_000) as i64,
            tv_nsec: (at.0 % 1_000_000_000).max(1) as i64,
        },
        None => zero,
    };
    let spec = Itimerspec {
        it_interval: zero,
        it_value: value,
    };
    timerfd_settime(timer, TimerfdTimerFlags::ABSTIME, &spec)
        .map(|_| ())
        .map_err(|e| format!("timerfd_settime: {e}"))
}

/// Rule 3 of `rules`: every PostgreSQL process dies now. The postmaster is
/// stopped first, so its list of children cannot change (no fork, no reap:
/// a listed pid is still that child) while each gets SIGKILL from here.
fn fence(postmaster: Pid) {
    let _ = rustix::process::kill_process(postmaster, Signal::STOP);
    for child in children_of(postmaster) {
        let _ = rustix::process::kill_process(child, Signal::KILL);
    }
    let _ = rustix::process::kill_process(postmaster, Signal::KILL);
}

fn send(pid: Pid, signal: i32) {
    let Some(sig) = Signal::from_named_raw(signal) else {
        log(&format!("ignored unknown signal {signal}"));
        return;
    };
    if let Err(e) = rustix::process::kill_process(pid, sig)
        && e != rustix::io::Errno::SRCH
    {
        log(&format!("signal {signal} to {pid:?}: {e}"));
    }
}

/// The agent's end of the conversation, never blocking.
struct Link {
    channel: UnixStream,
    open: bool,
    pending: Vec<u8>,
}

impl Link {
    /// The complete messages that arrived; `None` once the agent is gone.
    fn receive(&mut self) -> Option<Vec<ToGuard>> {
        let mut buf = [0u8; 4096];
        loop {
            match self.channel.read(&mut buf) {
                Ok(0) => {
                    self.open = false;
                    return None;
                }
                Ok(n) => self.pending.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.open = false;
                    return None;
                }
            }
            // A peer that never sends a newline must not grow this forever.
            if self.pending.len() > 1 << 20 {
                self.open = false;
                return None;
            }
        }
        let mut messages = Vec::new();
        while let Some(end) = self.pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=end).collect();
            let text = String::from_utf8_lossy(&line[..end]);
            match ToGuard::parse(&text) {
                Some(msg) => messages.push(msg),
                None => log(&format!("ignored an unknown message {text:?}")),
            }
        }
        Some(messages)
    }

    fn report(&mut self, report: &FromGuard) {
        if !self.open {
            return;
        }
        if let Err(e) = self.channel.write_all(report.encode().as_bytes())
            && e.kind() != std::io::ErrorKind::BrokenPipe
        {
            log(&format!("could not tell the agent {report:?}: {e}"));
        }
    }
}

/// Signals that would end the guard by default but must not: the guard dies
/// only when PostgreSQL is gone, or by SIGKILL (and then PostgreSQL gets its
/// parent-death signal). Called after the postmaster is started, so that
/// the postmaster does not inherit the ignored dispositions.
fn ignore_stray_signals() {
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
        let _ = sys::ignore_signal(signal);
    }
}

/// How the guard asked the scheduler to run it first.
enum Priority {
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
fn prefer_in_scheduler() -> Priority {
    let realtime = match sys::set_scheduler(libc::SCHED_FIFO | libc::SCHED_RESET_ON_FORK, 10) {
        Ok(()) => return Priority::RealTime,
        Err(e) => e,
    };
    if sys::set_nice(-20).is_ok() {
        return Priority::Nice;
    }
    Priority::Ordinary(realtime)
}

/// One line on standard error, which is PostgreSQL's log file: the guard's
/// actions appear right before the server's own shutdown messages.
fn log(message: &str) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    eprintln!(
        "mainstay-guard[{}] at unix time {}.{:03}: {message}",
        std::process::id(),
        now.as_secs(),
        now.subsec_millis()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_survive_a_round_trip() {
        let args = GuardArgs {
            deadline: Some(BootTime(42)),
            uid: Some(105),
            gid: Some(110),
            what: Some("service synapse".into()),
            program: "/usr/lib/postgresql/15/bin/postgres".into(),
            args: vec!["-D".into(), "/data dir".into()],
        };
        let encoded = args.to_args();
        assert_eq!(encoded[0], GUARD_ARG);
        assert_eq!(GuardArgs::parse(&encoded[1..]), Ok(args));
    }

    #[test]
    fn this_kernel_has_what_the_guard_needs() {
        self_test().unwrap();
    }

    #[test]
    fn bad_arguments_are_refused_with_a_reason() {
        let parse = |a: &[&str]| {
            GuardArgs::parse(&a.iter().map(OsString::from).collect::<Vec<_>>()).unwrap_err()
        };
        assert!(parse(&["--uid", "x", "--", "p"]).contains("not a number"));
        assert!(parse(&["--colour", "1", "--", "p"]).contains("unknown"));
        assert!(parse(&["--what"]).contains("needs a value"));
        assert!(parse(&["--uid", "1"]).contains("missing --"));
        assert!(parse(&["--"]).contains("no program"));
    }
}
