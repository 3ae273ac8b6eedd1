//! Real etcd servers for tests: one member or a small cluster on loopback,
//! tuned so that 1 s leases are legal, and killed when the handle is dropped
//! so that a failing test never leaves etcd behind.

use crate::free_port;
use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant};

/// How long a start may take before it is declared failed. etcd usually
/// answers within half a second; the margin is for loaded CI machines.
const START_TIMEOUT: Duration = Duration::from_secs(20);
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Grace period between SIGTERM and SIGKILL in [`Etcd::stop`].
const STOP_GRACE: Duration = Duration::from_secs(5);
/// A port taken by another process between [`free_port`] and etcd's bind
/// makes etcd exit; starting again with new ports is then the fix.
const START_ATTEMPTS: usize = 3;

/// Distinguishes clusters started by this process so that members of two
/// clusters can never join each other.
static CLUSTER_COUNTER: AtomicU64 = AtomicU64::new(0);

/// One etcd member running as a child process.
#[derive(Debug)]
pub struct Etcd {
    name: String,
    /// Where it listens: 127.0.0.1, or a lab host's address.
    host: std::net::Ipv4Addr,
    /// The network namespace it runs in, if not the caller's.
    netns: Option<String>,
    client_port: u16,
    args: Vec<OsString>,
    log_path: PathBuf,
    child: Option<Child>,
    last_pid: u32,
}

impl Etcd {
    /// Starts a single-member etcd with its data and log under `dir`, and
    /// returns once it answers a key-value request.
    ///
    /// The binary is `/usr/bin/etcd` unless `MAINSTAY_ETCD_BIN` names
    /// another. Heartbeat 50 ms and election timeout 500 ms make etcd's
    /// minimum lease TTL 1 s instead of the default 2 s.
    pub fn start(dir: &Path) -> io::Result<Etcd> {
        let mut members = Etcd::start_cluster(dir, 1)?;
        Ok(members.remove(0))
    }

    /// Starts a cluster of `size` members (named `etcd0`, `etcd1`, ...) and
    /// returns once every member answers a key-value request, which needs an
    /// elected leader. Useful to cut members off from the quorum.
    pub fn start_cluster(dir: &Path, size: usize) -> io::Result<Vec<Etcd>> {
        if size == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "an etcd cluster needs at least one member",
            ));
        }
        fs::create_dir_all(dir)?;
        let mut last_error = None;
        for _ in 0..START_ATTEMPTS {
            match try_start_cluster(dir, size) {
                Ok(members) => return Ok(members),
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.expect("at least one attempt was made"))
    }

    /// The client URL, e.g. `http://127.0.0.1:40123`.
    pub fn endpoint(&self) -> String {
        format!("http://{}:{}", self.host, self.client_port)
    }

    /// The member name given with `--name`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// PID of the running process, or of the last one if it was stopped.
    pub fn pid(&self) -> u32 {
        self.last_pid
    }

    /// Whether this handle still has a process (running or paused).
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// etcd's own log (stdout and stderr), appended to across restarts.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The last `lines` lines of the log, for assertion messages.
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log_path, lines)
    }

    /// Stops etcd the polite way: SIGTERM, then SIGKILL if it has not exited
    /// after 5 s. Data stays, so [`Etcd::restart`] brings the member back.
    pub fn stop(&mut self) -> io::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        // A stopped process does not act on SIGTERM until it is continued.
        signal(&child, libc::SIGCONT)?;
        signal(&child, libc::SIGTERM)?;
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if child.try_wait()?.is_some() {
                return Ok(());
            }
            sleep(POLL_INTERVAL);
        }
        signal(&child, libc::SIGKILL)?;
        child.wait()?;
        Ok(())
    }

    /// Kills etcd at once with SIGKILL, like a crash of its host.
    pub fn kill(&mut self) -> io::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        signal(&child, libc::SIGKILL)?;
        child.wait()?;
        Ok(())
    }

    /// Starts the member again on the same ports and data after
    /// [`Etcd::stop`] or [`Etcd::kill`]. For a member of a cluster this
    /// returns once the member answers, which needs a quorum.
    pub fn restart(&mut self) -> io::Result<()> {
        if self.child.is_some() {
            return Ok(());
        }
        self.spawn()?;
        self.wait_ready(Instant::now() + START_TIMEOUT)
    }

    /// Freezes etcd with SIGSTOP: its sockets stay open and accept
    /// connections, but nothing answers, like a host that hangs or a
    /// network that silently drops packets.
    ///
    /// Returns once every thread of etcd is stopped: SIGSTOP is delivered
    /// asynchronously, and a thread running on another core could otherwise
    /// still answer a request sent just after this returns.
    pub fn pause(&mut self) -> io::Result<()> {
        let Some(child) = &self.child else {
            return Err(not_running());
        };
        signal(child, libc::SIGSTOP)?;
        let deadline = Instant::now() + Duration::from_secs(2);
        while !all_threads_stopped(child.id())? {
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "etcd did not stop within 2 s of SIGSTOP",
                ));
            }
            sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    /// Undoes [`Etcd::pause`].
    pub fn resume(&mut self) -> io::Result<()> {
        match &self.child {
            Some(child) => signal(child, libc::SIGCONT),
            None => Err(not_running()),
        }
    }

    fn spawn(&mut self) -> io::Result<()> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)?;
        let mut command = match &self.netns {
            Some(ns) => crate::netns::Lab::command(ns, etcd_binary()),
            None => Command::new(etcd_binary()),
        };
        command
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // etcd reads any ETCD_* variable as a flag; one left in the test
        // environment would silently change the member under test.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("ETCD_") {
                command.env_remove(key);
            }
        }
        let child = command.spawn().map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "cannot run {}: {e} (set MAINSTAY_ETCD_BIN to etcd's path)",
                    etcd_binary().display()
                ),
            )
        })?;
        self.last_pid = child.id();
        self.child = Some(child);
        Ok(())
    }

    fn wait_ready(&mut self, deadline: Instant) -> io::Result<()> {
        loop {
            let exited = match &mut self.child {
                Some(child) => child.try_wait()?,
                None => None,
            };
            if let Some(status) = exited {
                self.child = None;
                return Err(io::Error::other(format!(
                    "etcd member {} exited during start ({status}); log {}:\n{}",
                    self.name,
                    self.log_path.display(),
                    self.log_tail(20)
                )));
            }
            if answers_range_request(self.host, self.client_port) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "etcd member {} did not answer on {} within {:?}; log {}:\n{}",
                        self.name,
                        self.endpoint(),
                        START_TIMEOUT,
                        self.log_path.display(),
                        self.log_tail(20)
                    ),
                ));
            }
            sleep(POLL_INTERVAL);
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGKILL also ends a paused (SIGSTOPped) process.
            let _ = signal(&child, libc::SIGKILL);
            let _ = child.wait();
        }
    }
}

/// Where one member runs: namespace, address, client and peer ports.
type Placement = (Option<String>, std::net::Ipv4Addr, u16, u16);

fn try_start_cluster(dir: &Path, size: usize) -> io::Result<Vec<Etcd>> {
    let localhost = std::net::Ipv4Addr::LOCALHOST;
    let placements: Vec<Placement> = (0..size)
        .map(|_| (None, localhost, free_port(), free_port()))
        .collect();
    start_members(dir, placements)
}

impl Etcd {
    /// Starts one member in each of `hosts` (namespace, address), on ports
    /// 12379 (clients) and 12380 (peers), not etcd's defaults; returns once
    /// each answers. Call it from a thread whose namespace reaches these
    /// addresses (e.g. the lab's client).
    pub fn start_in_namespaces(
        dir: &Path,
        hosts: &[(String, std::net::Ipv4Addr)],
    ) -> io::Result<Vec<Etcd>> {
        fs::create_dir_all(dir)?;
        let placements = hosts
            .iter()
            .map(|(ns, address)| (Some(ns.clone()), *address, 12379, 12380))
            .collect();
        start_members(dir, placements)
    }
}

fn start_members(dir: &Path, placements: Vec<Placement>) -> io::Result<Vec<Etcd>> {
    let token = format!(
        "testkit-{}-{}",
        std::process::id(),
        CLUSTER_COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    let initial_cluster = placements
        .iter()
        .enumerate()
        .map(|(i, (_, host, _, peer))| format!("etcd{i}=http://{host}:{peer}"))
        .collect::<Vec<_>>()
        .join(",");
    let mut members = Vec::with_capacity(placements.len());
    for (i, (netns, host, client_port, peer_port)) in placements.into_iter().enumerate() {
        let name = format!("etcd{i}");
        // A fresh data dir per attempt: a half-started member from a failed
        // attempt must not make this one rejoin an older cluster.
        let data_dir = dir.join(format!("{name}-{token}.data"));
        let client_url = format!("http://{host}:{client_port}");
        let peer_url = format!("http://{host}:{peer_port}");
        let args: Vec<OsString> = [
            "--name",
            &name,
            "--listen-client-urls",
            &client_url,
            "--advertise-client-urls",
            &client_url,
            "--listen-peer-urls",
            &peer_url,
            "--initial-advertise-peer-urls",
            &peer_url,
            "--initial-cluster",
            &initial_cluster,
            "--initial-cluster-state",
            "new",
            "--initial-cluster-token",
            &token,
            "--heartbeat-interval",
            "50",
            "--election-timeout",
            "500",
            // As etcd 3.5 defaults to: a member back from isolation does not
            // depose a healthy leader with the terms it ran up alone.
            "--pre-vote",
            "--logger",
            "zap",
            "--log-outputs",
            "stderr",
        ]
        .iter()
        .map(OsString::from)
        .chain([OsString::from("--data-dir"), data_dir.into_os_string()])
        .collect();
        let mut member = Etcd {
            log_path: dir.join(format!("{name}.log")),
            name,
            host,
            netns,
            client_port,
            args,
            child: None,
            last_pid: 0,
        };
        member.spawn()?;
        members.push(member);
    }
    let deadline = Instant::now() + START_TIMEOUT;
    for member in &mut members {
        member.wait_ready(deadline)?;
    }
    Ok(members)
}

fn etcd_binary() -> PathBuf {
    std::env::var_os("MAINSTAY_ETCD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/etcd"))
}

fn signal(child: &Child, sig: libc::c_int) -> io::Result<()> {
    let pid = libc::pid_t::try_from(child.id()).map_err(io::Error::other)?;
    // The pid cannot have been reused because the child is not reaped
    // until we wait for it.
    mainstay_sys::process::kill(pid, sig)
}

/// Whether every thread of `pid` is in state `T` (stopped), per
/// `/proc/<pid>/task/<tid>/stat`.
fn all_threads_stopped(pid: u32) -> io::Result<bool> {
    for task in fs::read_dir(format!("/proc/{pid}/task"))? {
        let stat = match fs::read_to_string(task?.path().join("stat")) {
            Ok(stat) => stat,
            // The thread exited meanwhile.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        // "tid (comm) S ...": comm may hold spaces and parentheses.
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next());
        if !matches!(state, Some('T' | 't')) {
            return Ok(false);
        }
    }
    Ok(true)
}

fn not_running() -> io::Error {
    io::Error::other("etcd is not running")
}

/// Sends a linearizable range request through etcd's HTTP gateway on the
/// client port. It is answered only once the member serves requests and the
/// cluster has a leader, which is what a test needs before it begins. Plain
/// HTTP/1.1 keeps this free of any async runtime.
fn answers_range_request(host: std::net::Ipv4Addr, port: u16) -> bool {
    let addr = SocketAddr::from((host, port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let timeout = Some(Duration::from_millis(500));
    if stream.set_read_timeout(timeout).is_err() || stream.set_write_timeout(timeout).is_err() {
        return false;
    }
    // Key "/" in base64.
    let body = r#"{"key":"Lw=="}"#;
    let request = format!(
        "POST /v3/kv/range HTTP/1.1\r\nHost: {host}:{port}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut response = Vec::new();
    // The response is small; `take` bounds it anyway.
    if (&mut stream)
        .take(64 * 1024)
        .read_to_end(&mut response)
        .is_err()
    {
        return false;
    }
    let response = String::from_utf8_lossy(&response);
    // With authentication enabled (tests may enable it) the answer is a
    // refusal; etcd 3.4 checks permissions only after the linearizable read
    // barrier, so that refusal also proves a leader.
    (response.starts_with("HTTP/1.1 200") && response.contains("\"header\""))
        || response.contains("user name is empty")
}

fn log_tail(path: &Path, lines: usize) -> String {
    let mut text = String::new();
    if let Ok(mut file) = File::open(path) {
        let _ = file.read_to_string(&mut text);
    }
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_pauses_and_stops() {
        let dir = tempfile::tempdir().unwrap();
        let mut etcd = Etcd::start(dir.path()).unwrap();
        let port: u16 = etcd.endpoint().rsplit(':').next().unwrap().parse().unwrap();
        assert!(answers_range_request(std::net::Ipv4Addr::LOCALHOST, port));

        etcd.pause().unwrap();
        assert!(
            !answers_range_request(std::net::Ipv4Addr::LOCALHOST, port),
            "a paused etcd must not answer"
        );
        etcd.resume().unwrap();
        assert!(answers_range_request(std::net::Ipv4Addr::LOCALHOST, port));

        etcd.stop().unwrap();
        assert!(!etcd.is_running());
        etcd.restart().unwrap();
        assert!(answers_range_request(std::net::Ipv4Addr::LOCALHOST, port));
    }

    #[test]
    fn drop_kills_even_a_paused_etcd() {
        let dir = tempfile::tempdir().unwrap();
        let mut etcd = Etcd::start(dir.path()).unwrap();
        let pid = etcd.pid() as libc::pid_t;
        etcd.pause().unwrap();
        drop(etcd);
        // Signal 0 only checks whether the pid exists.
        let alive = mainstay_sys::process::alive(pid);
        assert!(!alive, "etcd {pid} survived its handle");
    }
}
