//! One thread that keeps the member running: it starts etcd, restarts it
//! with a growing delay when it exits, and stops it (SIGTERM, then SIGKILL)
//! when the agent stops. The thread, not an async task, is etcd's parent:
//! etcd gets SIGTERM the moment that thread ends, the agent's process
//! killed included (`PR_SET_PDEATHSIG` follows the forking thread, and a
//! runtime's pooled threads come and go).

use crate::command::arguments;
use crate::spec::MemberSpec;
use std::io;
use std::process::{Child, Command, Stdio};
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

struct Shared {
    stop: Mutex<bool>,
    wake: Condvar,
    status: Mutex<MemberStatus>,
}

impl Shared {
    fn status(&self) -> MutexGuard<'_, MemberStatus> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn stopping(&self) -> bool {
        *self.stop.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sleeps up to `delay`; true if a stop was asked meanwhile.
    fn sleep(&self, delay: Duration) -> bool {
        let stop = self.stop.lock().unwrap_or_else(|p| p.into_inner());
        let (stop, _) = self
            .wake
            .wait_timeout_while(stop, delay, |stop| !*stop)
            .unwrap_or_else(|p| p.into_inner());
        *stop
    }
}

impl Member {
    /// Starts the member and the thread that keeps it running. Fails only
    /// when etcd cannot be started at all (the binary missing, the data
    /// directory's parent not creatable): later exits are restarted.
    pub fn start(spec: MemberSpec) -> io::Result<Member> {
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
            stop: Mutex::new(false),
            wake: Condvar::new(),
            status: Mutex::new(MemberStatus::default()),
        });
        let (first, first_error) = std::sync::mpsc::channel();
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("etcd-member".into())
                .spawn(move || supervise(&spec, &shared, first))?
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

    /// A handle that reads the status while the member runs (the REST API's).
    pub fn reader(&self) -> StatusReader {
        StatusReader(self.shared.clone())
    }

    /// Stops etcd (SIGTERM, SIGKILL after 10 s) and waits for the thread.
    pub fn stop(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        *self.shared.stop.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.shared.wake.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Reads a running member's status; reads the last one once it stopped.
#[derive(Clone)]
pub struct StatusReader(Arc<Shared>);

impl StatusReader {
    pub fn status(&self) -> MemberStatus {
        self.0.status().clone()
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.stop_now();
    }
}

fn supervise(spec: &MemberSpec, shared: &Shared, first: std::sync::mpsc::Sender<io::Result<()>>) {
    let mut first = Some(first);
    let mut backoff = FIRST_BACKOFF;
    loop {
        let started = Instant::now();
        let outcome = match spawn(spec) {
            Ok(child) => {
                if let Some(first) = first.take() {
                    let _ = first.send(Ok(()));
                }
                {
                    let mut status = shared.status();
                    status.pid = Some(child.id());
                    status.running_since = Some(SystemTime::now());
                    status.starts += 1;
                }
                tracing::info!(pid = child.id(), data_dir = %spec.data_dir.display(), "etcd member started");
                let outcome = run(child, shared);
                let mut status = shared.status();
                status.pid = None;
                status.running_since = None;
                status.last_exit = Some(outcome.clone());
                outcome
            }
            Err(err) => {
                let why = format!("cannot start {}: {err}", spec.binary.display());
                if let Some(first) = first.take() {
                    let _ = first.send(Err(io::Error::new(err.kind(), why)));
                    return;
                }
                shared.status().last_exit = Some(why.clone());
                why
            }
        };
        if shared.stopping() {
            tracing::info!("etcd member stopped: {outcome}");
            return;
        }
        if started.elapsed() >= STABLE_RUN {
            backoff = FIRST_BACKOFF;
        }
        tracing::warn!(
            "etcd member {outcome}; starting it again in {} s",
            backoff.as_secs()
        );
        if shared.sleep(backoff) {
            return;
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

fn spawn(spec: &MemberSpec) -> io::Result<Child> {
    let mut command = Command::new(&spec.binary);
    command
        .args(arguments(spec))
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

/// Waits for the process to exit or for a stop; says how it ended.
fn run(mut child: Child, shared: &Shared) -> String {
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return format!("exited ({status})"),
            Ok(None) => {}
            Err(err) => return format!("could not be waited for: {err}"),
        }
        if shared.sleep(POLL) {
            return stop(&mut child);
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
    fn a_missing_binary_is_refused_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let mut spec = spec(dir.path());
        spec.binary = dir.path().join("no-etcd-here");
        let err = Member::start(spec).err().unwrap();
        assert!(err.to_string().contains("no-etcd-here"), "{err}");
    }
}
