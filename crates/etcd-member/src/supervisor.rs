//! One thread that keeps the member running: it starts etcd, restarts it
//! with a growing delay when it exits, and stops it (SIGTERM, then SIGKILL)
//! when the agent stops. Before a restart it asks the agent's hook whether
//! the member must start differently (it was removed from its cluster and
//! joins again); on request it re-forms the member as a cluster of its own
//! (`--force-new-cluster`, `mainstay ctl recover-alone`). The thread, not an async task, is etcd's parent:
//! etcd gets SIGTERM the moment that thread ends, the agent's process
//! killed included (`PR_SET_PDEATHSIG` follows the forking thread, and a
//! runtime's pooled threads come and go).

use crate::command::arguments;
use crate::spec::MemberSpec;
use std::io;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

/// First delay before a restart, doubled after each quick exit.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A run this long was not a crash loop: the next delay starts over.
const STABLE_RUN: Duration = Duration::from_secs(60);
/// etcd flushes and leaves within a second or two of SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// Go's garbage collector target (its default: 100).
const GOGC: &str = "50";
/// How often the thread looks whether etcd exited.
const POLL: Duration = Duration::from_millis(200);

/// What `/etcd/members` and the log say about the local member's process.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MemberStatus {
    /// The running process, if any.
    pub pid: Option<u32>,
    pub running_since: Option<SystemTime>,
    /// Processes started so far (1 once it runs without a restart).
    pub starts: u32,
    /// How the last process ended, or why it could not start.
    pub last_exit: Option<String>,
}

/// The running member; stops it when dropped.
pub struct Member {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// Asked after etcd exited by itself with status 0, which is how it stops
/// once it learns it was removed from its cluster, before it starts
/// again: the spec to start it with from now on, if it must change (it
/// joins its cluster again as a new member). Runs on the supervising
/// thread: it may block, for a few seconds at most.
pub type AfterExit = Box<dyn FnMut(&MemberSpec, &str) -> Option<MemberSpec> + Send>;

struct Shared {
    /// What the member runs as now (the hook may have changed it).
    spec: Mutex<MemberSpec>,
    control: Mutex<Control>,
    wake: Condvar,
    status: Mutex<MemberStatus>,
}

#[derive(Default)]
struct Control {
    stop: bool,
    /// Re-form the member alone; the new process's pid goes back.
    force_new_cluster: Option<mpsc::Sender<io::Result<u32>>>,
}

/// Why the supervising thread woke up.
enum Wake {
    Stop,
    ForceNewCluster,
    Timeout,
}

impl Shared {
    fn status(&self) -> MutexGuard<'_, MemberStatus> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn control(&self) -> MutexGuard<'_, Control> {
        self.control.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn stopping(&self) -> bool {
        self.control().stop
    }

    /// Sleeps up to `delay` or until a stop or a request.
    fn sleep(&self, delay: Duration) -> Wake {
        let control = self.control();
        let (control, _) = self
            .wake
            .wait_timeout_while(control, delay, |c| !c.stop && c.force_new_cluster.is_none())
            .unwrap_or_else(|p| p.into_inner());
        if control.stop {
            Wake::Stop
        } else if control.force_new_cluster.is_some() {
            Wake::ForceNewCluster
        } else {
            Wake::Timeout
        }
    }
}

impl Member {
    /// Starts the member and the thread that keeps it running. Fails only
    /// when etcd cannot be started at all (the binary missing, the data
    /// directory's parent not creatable): later exits are restarted.
    pub fn start(spec: MemberSpec) -> io::Result<Member> {
        Member::start_with(spec, None)
    }

    /// [`Member::start`], with a hook asked after every exit etcd made by
    /// itself.
    pub fn start_with(spec: MemberSpec, after_exit: Option<AfterExit>) -> io::Result<Member> {
        if let Some(parent) = spec.data_dir.parent() {
            std::fs::create_dir_all(parent).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "cannot create {} for etcd's data directory: {e}",
                        parent.display()
                    ),
                )
            })?;
        }
        let shared = Arc::new(Shared {
            spec: Mutex::new(spec.clone()),
            control: Mutex::new(Control::default()),
            wake: Condvar::new(),
            status: Mutex::new(MemberStatus::default()),
        });
        let (first, first_error) = std::sync::mpsc::channel();
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("etcd-member".into())
                .spawn(move || supervise(spec, after_exit, &shared, first))?
        };
        match first_error.recv() {
            Ok(Ok(())) => Ok(Member {
                shared,
                thread: Some(thread),
            }),
            Ok(Err(err)) => {
                let _ = thread.join();
                Err(err)
            }
            Err(_) => Err(io::Error::other("the etcd member's thread ended at start")),
        }
    }

    pub fn status(&self) -> MemberStatus {
        self.shared.status().clone()
    }

    /// A handle on the running member (the REST API's).
    pub fn handle(&self) -> MemberHandle {
        MemberHandle(self.shared.clone())
    }

    /// Stops etcd (SIGTERM, SIGKILL after 10 s) and waits for the thread.
    pub fn stop(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        self.shared.control().stop = true;
        self.shared.wake.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Reads a running member's status (the last one once it stopped), and
/// re-forms it alone on request.
#[derive(Clone)]
pub struct MemberHandle(Arc<Shared>);

/// How long etcd may take to stop and start again with the new flag.
const FORCE_NEW_CLUSTER_TIMEOUT: Duration = Duration::from_secs(30);

impl MemberHandle {
    pub fn status(&self) -> MemberStatus {
        self.0.status().clone()
    }

    /// Stops etcd (SIGTERM, SIGKILL after 10 s) from a handle and waits
    /// until it is gone: before the agent re-executes itself, whose new
    /// image starts the member again on the same ports. True if it is.
    pub fn stop(&self) -> bool {
        self.0.control().stop = true;
        self.0.wake.notify_all();
        let deadline = Instant::now() + STOP_GRACE + Duration::from_secs(2);
        while Instant::now() < deadline {
            if self.0.status().pid.is_none() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// The member as it runs now.
    pub fn spec(&self) -> MemberSpec {
        self.0
            .spec
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Stops etcd and starts it again with `--force-new-cluster`: the
    /// member keeps its data and becomes the only member of its cluster
    /// (etcd rewrites the membership). Returns the new process's pid once
    /// it runs; etcd's own answer is the caller's to wait for. Later
    /// restarts go without the flag. Blocks: call it off the runtime.
    pub fn force_new_cluster(&self) -> io::Result<u32> {
        let (tx, rx) = mpsc::channel();
        {
            let mut control = self.0.control();
            if control.stop {
                return Err(io::Error::other("the etcd member is stopping"));
            }
            if control.force_new_cluster.is_some() {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "the etcd member is being re-formed already",
                ));
            }
            control.force_new_cluster = Some(tx);
        }
        self.0.wake.notify_all();
        match rx.recv_timeout(FORCE_NEW_CLUSTER_TIMEOUT) {
            Ok(answer) => answer,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                Err(io::Error::other("the etcd member stopped meanwhile"))
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                // Not picked up (etcd did not stop): withdraw it, so that it
                // does not happen later on a check made now.
                let withdrawn = self.0.control().force_new_cluster.take().is_some();
                Err(io::Error::other(if withdrawn {
                    format!(
                        "etcd did not stop within {} s: nothing was changed",
                        FORCE_NEW_CLUSTER_TIMEOUT.as_secs()
                    )
                } else {
                    format!(
                        "etcd did not start again alone within {} s; see the log",
                        FORCE_NEW_CLUSTER_TIMEOUT.as_secs()
                    )
                }))
            }
        }
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.stop_now();
    }
}

fn supervise(
    mut spec: MemberSpec,
    mut after_exit: Option<AfterExit>,
    shared: &Shared,
    first: mpsc::Sender<io::Result<()>>,
) {
    let mut first = Some(first);
    let mut backoff = FIRST_BACKOFF;
    let mut reply: Option<mpsc::Sender<io::Result<u32>>> = None;
    loop {
        let started = Instant::now();
        let alone = reply.is_some();
        let outcome = match spawn(&spec, alone) {
            Ok(child) => {
                if let Some(first) = first.take() {
                    let _ = first.send(Ok(()));
                }
                if let Some(reply) = reply.take() {
                    let _ = reply.send(Ok(child.id()));
                }
                {
                    let mut status = shared.status();
                    status.pid = Some(child.id());
                    status.running_since = Some(SystemTime::now());
                    status.starts += 1;
                }
                if alone {
                    tracing::warn!(pid = child.id(), data_dir = %spec.data_dir.display(), "etcd member started with --force-new-cluster: it is now the only member of its cluster");
                } else {
                    tracing::info!(pid = child.id(), data_dir = %spec.data_dir.display(), "etcd member started");
                }
                let outcome = run(child, shared);
                let mut status = shared.status();
                status.pid = None;
                status.running_since = None;
                status.last_exit = Some(outcome.to_string());
                outcome
            }
            Err(err) => {
                let why = format!("cannot start {}: {err}", spec.binary.display());
                if let Some(first) = first.take() {
                    let _ = first.send(Err(io::Error::new(err.kind(), why)));
                    return;
                }
                if let Some(reply) = reply.take() {
                    let _ = reply.send(Err(io::Error::new(err.kind(), why.clone())));
                }
                shared.status().last_exit = Some(why.clone());
                Outcome::Exited(why)
            }
        };
        if shared.stopping() {
            // A pending request's caller hears "stopped" at once.
            shared.control().force_new_cluster.take();
            tracing::info!("etcd member stopped: {outcome}");
            return;
        }
        if let Outcome::ForNewCluster = outcome {
            reply = shared.control().force_new_cluster.take();
            continue;
        }
        let mut delay = backoff;
        if let Outcome::ExitedClean(how) = &outcome
            && let Some(hook) = after_exit.as_mut()
            && let Some(changed) = hook(&spec, how)
        {
            *shared.spec.lock().unwrap_or_else(|p| p.into_inner()) = changed.clone();
            spec = changed;
            // A member let in again starts at once (the cluster waits for
            // it), unless the last one did not stay up either.
            if backoff == FIRST_BACKOFF || started.elapsed() >= STABLE_RUN {
                delay = Duration::ZERO;
            }
        }
        if started.elapsed() >= STABLE_RUN {
            backoff = FIRST_BACKOFF;
            delay = delay.min(backoff);
        }
        tracing::warn!(
            "etcd member {outcome}; starting it again in {} s",
            delay.as_secs()
        );
        match shared.sleep(delay) {
            Wake::Stop => {
                shared.control().force_new_cluster.take();
                return;
            }
            Wake::ForceNewCluster => reply = shared.control().force_new_cluster.take(),
            Wake::Timeout => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// How a run of etcd ended.
enum Outcome {
    /// By itself or by the agent's stop: how.
    Exited(String),
    /// By itself, with status 0 (e.g. removed from its cluster).
    ExitedClean(String),
    /// Stopped to be started again with `--force-new-cluster`.
    ForNewCluster,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Exited(how) | Outcome::ExitedClean(how) => f.write_str(how),
            Outcome::ForNewCluster => f.write_str("stopped to be re-formed alone"),
        }
    }
}

fn spawn(spec: &MemberSpec, force_new_cluster: bool) -> io::Result<Child> {
    let mut command = Command::new(&spec.binary);
    command.args(arguments(spec));
    if force_new_cluster {
        command.arg("--force-new-cluster");
    }
    command
        // etcd reads any ETCD_* variable as a flag: only the flags count.
        .env_clear()
        // A member of a handful of agents holds little: collecting at half
        // the default heap growth keeps it small on a witness (a Raspberry
        // Pi) for a little more CPU.
        .env("GOGC", GOGC)
        .stdin(Stdio::null());
    mainstay_sys::process::die_with_parent(&mut command, libc::SIGTERM);
    command.spawn()
}

/// Waits for the process to exit, a stop or a request; says how it ended.
fn run(mut child: Child, shared: &Shared) -> Outcome {
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => {
                return Outcome::ExitedClean(format!("exited ({status})"));
            }
            Ok(Some(status)) => return Outcome::Exited(format!("exited ({status})")),
            Ok(None) => {}
            Err(err) => return Outcome::Exited(format!("could not be waited for: {err}")),
        }
        match shared.sleep(POLL) {
            Wake::Stop => return Outcome::Exited(stop(&mut child)),
            Wake::ForceNewCluster => {
                let how = stop(&mut child);
                tracing::warn!("etcd member {how}, to be started alone with --force-new-cluster");
                return Outcome::ForNewCluster;
            }
            Wake::Timeout => {}
        }
    }
}

fn stop(child: &mut Child) -> String {
    let pid = child.id() as mainstay_sys::process::Pid;
    let _ = mainstay_sys::process::kill(pid, libc::SIGTERM);
    let deadline = Instant::now() + STOP_GRACE;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return format!("exited on SIGTERM ({status})");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    format!(
        "killed after {} s without exiting on SIGTERM",
        STOP_GRACE.as_secs()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{ClusterState, RaftTiming};
    use std::io::{Read, Write};
    use std::net::TcpStream;

    fn spec(dir: &std::path::Path) -> MemberSpec {
        let (client, peer) = (mainstay_testkit::free_port(), mainstay_testkit::free_port());
        let peer_url = format!("http://127.0.0.1:{peer}");
        MemberSpec {
            name: "solo".into(),
            data_dir: dir.join("etcd/data"),
            client_url: format!("http://127.0.0.1:{client}"),
            peer_url: peer_url.clone(),
            initial_cluster: vec![("solo".into(), peer_url)],
            state: ClusterState::New,
            token: format!("supervisor-test-{}", std::process::id()),
            timing: RaftTiming::for_ttl(Duration::from_secs(4)),
            tls: None,
            binary: std::env::var_os("MAINSTAY_ETCD_BIN")
                .map_or_else(|| crate::spec::DEFAULT_BINARY.into(), Into::into),
        }
    }

    /// etcd's `/health`, over plain HTTP/1.1.
    fn healthy(client_url: &str) -> bool {
        let address = client_url.trim_start_matches("http://");
        let Ok(mut stream) = TcpStream::connect(address) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        let request =
            format!("GET /health HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
        if stream.write_all(request.as_bytes()).is_err() {
            return false;
        }
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer);
        answer.contains("\"health\":\"true\"")
    }

    fn wait_until(what: &str, mut ready: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ready() {
            assert!(Instant::now() < deadline, "timed out waiting: {what}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    #[test]
    fn a_killed_member_is_started_again_and_stopped_with_the_handle() {
        let dir = tempfile::tempdir().unwrap();
        let spec = spec(dir.path());
        let url = spec.client_url.clone();
        let member = Member::start(spec).unwrap();
        wait_until("etcd answers", || healthy(&url));
        let first = member.status().pid.unwrap();
        mainstay_sys::process::kill(first as i32, libc::SIGKILL).unwrap();
        wait_until("a second etcd runs", || {
            member.status().pid.is_some_and(|pid| pid != first)
        });
        wait_until("etcd answers again", || healthy(&url));
        let status = member.status();
        assert_eq!(status.starts, 2);
        assert!(status.last_exit.unwrap().contains("signal: 9"));
        let second = status.pid.unwrap() as i32;
        member.stop();
        assert!(
            !mainstay_sys::process::alive(second),
            "etcd outlived its member handle"
        );
        // Its data stays, for the next start.
        assert!(dir.path().join("etcd/data/member").is_dir());
    }

    #[test]
    fn a_member_without_quorum_is_re_formed_alone_on_request() {
        let dir = tempfile::tempdir().unwrap();
        let mut spec = spec(dir.path());
        // A second member that never runs: no quorum, /health says false.
        let gone = format!("http://127.0.0.1:{}", mainstay_testkit::free_port());
        spec.initial_cluster.push(("gone".into(), gone));
        let url = spec.client_url.clone();
        let member = Member::start(spec).unwrap();
        wait_until("etcd runs", || member.status().pid.is_some());
        std::thread::sleep(Duration::from_secs(2));
        assert!(!healthy(&url), "a member of two answered alone");
        let first = member.status().pid.unwrap();
        let second = member.handle().force_new_cluster().unwrap();
        assert_ne!(first, second);
        wait_until("the member answers alone", || healthy(&url));
        assert_eq!(member.status().starts, 2);
        // The next restart goes without the flag and keeps the new cluster.
        mainstay_sys::process::kill(second as i32, libc::SIGKILL).unwrap();
        wait_until("a third etcd runs", || {
            member.status().pid.is_some_and(|pid| pid != second)
        });
        wait_until("it answers again, alone", || healthy(&url));
        let third = member.status().pid.unwrap();
        let cmdline = std::fs::read(format!("/proc/{third}/cmdline")).unwrap();
        assert!(
            !String::from_utf8_lossy(&cmdline).contains("force-new-cluster"),
            "the flag stayed"
        );
        member.stop();
    }

    #[test]
    fn only_a_clean_exit_asks_the_hook_which_may_change_how_etcd_starts() {
        let dir = tempfile::tempdir().unwrap();
        let etcd = spec(dir.path());
        let url = etcd.client_url.clone();
        // A first "member" that exits with status 0 at once, as etcd does
        // when it learns it was removed; the hook starts the real one.
        let mut first = etcd.clone();
        first.binary = "/bin/true".into();
        let asked = Arc::new(Mutex::new(Vec::new()));
        let hook: AfterExit = {
            let asked = asked.clone();
            Box::new(move |_: &MemberSpec, how: &str| {
                asked.lock().unwrap().push(how.to_string());
                Some(etcd.clone())
            })
        };
        let member = Member::start_with(first, Some(hook)).unwrap();
        wait_until("etcd answers as the hook said", || healthy(&url));
        assert_eq!(member.handle().spec().binary, spec(dir.path()).binary);
        // Killed by a signal: restarted as it is, the hook not asked.
        let pid = member.status().pid.unwrap();
        mainstay_sys::process::kill(pid as i32, libc::SIGKILL).unwrap();
        wait_until("etcd runs again", || {
            member.status().pid.is_some_and(|p| p != pid)
        });
        wait_until("etcd answers again", || healthy(&url));
        let asked = asked.lock().unwrap().clone();
        assert_eq!(asked.len(), 1, "{asked:?}");
        assert!(asked[0].contains("exit status: 0"), "{asked:?}");
        member.stop();
    }

    #[test]
    fn a_missing_binary_is_refused_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let mut spec = spec(dir.path());
        spec.binary = dir.path().join("no-etcd-here");
        let err = Member::start(spec).err().unwrap();
        assert!(err.to_string().contains("no-etcd-here"), "{err}");
    }
}
