//! The built-in proxy: clients connect to one address on any node and reach
//! the current primary (read-write listener) or a replica (read-only
//! listener). Byte-for-byte TCP forwarding: TLS from the client passes
//! through untouched.
//!
//! The route comes from the HA loop, which follows the DCS watch: when the
//! leader changes the route changes at once, and connections still open to
//! the old primary are closed so that clients reconnect to the new one. A
//! new connection during the gap waits (bounded) for a target instead of
//! failing at once. A route whose DCS view may be older than the leader's
//! lease is not trusted: routing stops until the view is fresh again.
//!
//! An idle connection costs its two sockets and one small task: buffers
//! are borrowed from a shared pool only while bytes are in flight, so many
//! thousands of idle clients hold no buffer memory, and a busy connection
//! reuses pooled buffers instead of allocating per read.

use mainstay_core::poison;
use mainstay_core::{ClusterView, PgRole};
use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, warn};

/// Which listener a connection came through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Access {
    ReadWrite,
    ReadOnly,
}

impl Access {
    pub fn label(self) -> &'static str {
        match self {
            Access::ReadWrite => "rw",
            Access::ReadOnly => "ro",
        }
    }
}

/// A member's PostgreSQL, as the proxy reaches it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub name: String,
    pub address: String,
}

/// A replica the read-only listener knows about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaTarget {
    pub target: Target,
    /// New read-only connections go only to replicas within the lag limit;
    /// connections already open stay while the replica stays listed.
    pub within_lag: bool,
}

/// Where connections go now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// The leader, once it runs as primary; `None`: no read-write target.
    pub primary: Option<Target>,
    /// Running replicas other than the leader.
    pub replicas: Vec<ReplicaTarget>,
    /// The route is trustworthy until then (last DCS view + ttl - margin).
    pub valid_until: Instant,
}

impl Route {
    pub fn nowhere() -> Route {
        Route {
            primary: None,
            replicas: Vec::new(),
            valid_until: Instant::now(),
        }
    }

    /// The route a DCS view implies. A replica qualifies for new read-only
    /// connections when it streams from the leader within `max_lag` bytes of
    /// the leader's last published position; while no primary leads (a
    /// failover in progress) running replicas keep serving reads, as they
    /// did a moment before.
    pub fn from_view(view: &ClusterView, max_lag: u64, valid_until: Instant) -> Route {
        let leader = view.leader_status();
        let primary_status = leader.filter(|s| s.role == PgRole::Primary);
        let target = |s: &mainstay_core::MemberStatus| Target {
            name: s.name.clone(),
            address: address(&s.pg_host, s.pg_port),
        };
        let replicas = view
            .members
            .values()
            .map(|m| &m.status)
            .filter(|s| Some(s.name.as_str()) != view.leader_name())
            .filter(|s| s.role == PgRole::Replica && s.state == "running")
            .filter(|s| !s.tags.noloadbalance)
            .map(|s| ReplicaTarget {
                target: target(s),
                within_lag: match primary_status {
                    Some(p) => {
                        s.streaming
                            && s.following.as_deref() == Some(p.name.as_str())
                            && p.received_lsn.0.saturating_sub(s.received_lsn.0) <= max_lag
                    }
                    None => true,
                },
            })
            .collect();
        Route {
            primary: primary_status.map(target),
            replicas,
            valid_until,
        }
    }

    fn trusted(&self) -> bool {
        Instant::now() < self.valid_until
    }

    /// Where a new connection through `access` goes; read-only connections
    /// go to the qualifying replica with the fewest open connections (ties
    /// rotate with `turn`), else to the primary.
    fn pick(
        &self,
        access: Access,
        stats: &ProxyStats,
        turn: usize,
        skip: &[String],
    ) -> Option<Target> {
        if !self.trusted() {
            return None;
        }
        if access == Access::ReadOnly {
            let candidates: Vec<&Target> = self
                .replicas
                .iter()
                .filter(|r| r.within_lag && !skip.contains(&r.target.name))
                .map(|r| &r.target)
                .collect();
            let n = candidates.len();
            let least = (0..n)
                .map(|k| candidates[(turn + k) % n])
                .min_by_key(|t| stats.active(access, &t.name));
            if let Some(target) = least {
                return Some(target.clone());
            }
        }
        self.primary.clone()
    }

    /// Whether a connection already open to `name` may stay open.
    fn keeps(&self, access: Access, name: &str) -> bool {
        if !self.trusted() {
            return false;
        }
        let is_primary = self.primary.as_ref().is_some_and(|p| p.name == name);
        match access {
            Access::ReadWrite => is_primary,
            Access::ReadOnly => is_primary || self.replicas.iter().any(|r| r.target.name == name),
        }
    }
}

/// Connection and byte counters per listener and target, for `/metrics`.
#[derive(Default)]
pub struct ProxyStats {
    targets: std::sync::Mutex<BTreeMap<(Access, String), Arc<TargetStats>>>,
    refused: [AtomicU64; 2],
}

#[derive(Default)]
pub struct TargetStats {
    pub active: AtomicU64,
    pub total: AtomicU64,
    pub bytes_to_server: AtomicU64,
    pub bytes_to_client: AtomicU64,
}

/// One row of [`ProxyStats::snapshot`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetCounters {
    pub listener: &'static str,
    pub target: String,
    pub active: u64,
    pub total: u64,
    pub bytes_to_server: u64,
    pub bytes_to_client: u64,
}

impl ProxyStats {
    fn target(&self, access: Access, name: &str) -> Arc<TargetStats> {
        poison::lock(&self.targets)
            .entry((access, name.to_string()))
            .or_default()
            .clone()
    }

    fn active(&self, access: Access, name: &str) -> u64 {
        poison::lock(&self.targets)
            .get(&(access, name.to_string()))
            .map_or(0, |s| s.active.load(Ordering::Relaxed))
    }

    fn refused_counter(&self, access: Access) -> &AtomicU64 {
        &self.refused[access as usize]
    }

    /// Connections closed because no target was available in time.
    pub fn refused(&self) -> [(&'static str, u64); 2] {
        [Access::ReadWrite, Access::ReadOnly]
            .map(|a| (a.label(), self.refused_counter(a).load(Ordering::Relaxed)))
    }

    pub fn snapshot(&self) -> Vec<TargetCounters> {
        poison::lock(&self.targets)
            .iter()
            .map(|((access, name), s)| TargetCounters {
                listener: access.label(),
                target: name.clone(),
                active: s.active.load(Ordering::Relaxed),
                total: s.total.load(Ordering::Relaxed),
                bytes_to_server: s.bytes_to_server.load(Ordering::Relaxed),
                bytes_to_client: s.bytes_to_client.load(Ordering::Relaxed),
            })
            .collect()
    }
}

/// Why the proxy cannot start: a startup error for the agent.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(
        "cannot listen on {key} = \"{listen}\": {source}; choose a free address and port \
         in the [proxy] section"
    )]
    Bind {
        /// The configuration key, e.g. `proxy.read_only_listen`.
        key: String,
        listen: std::net::SocketAddr,
        source: io::Error,
    },
    #[error("cannot start the proxy's runtime: {source}")]
    Runtime { source: io::Error },
    #[error("cannot start the proxy thread: {source}")]
    Thread { source: io::Error },
}

/// Binds a proxy listener; a failure is a startup error naming the key.
pub fn bind(key: &str, listen: std::net::SocketAddr) -> Result<std::net::TcpListener, ProxyError> {
    let listener = std::net::TcpListener::bind(listen).and_then(|l| {
        l.set_nonblocking(true)?;
        Ok(l)
    });
    listener.map_err(|source| ProxyError::Bind {
        key: key.into(),
        listen,
        source,
    })
}

/// The proxy's own thread; dropping this stops it.
pub struct ProxyThread {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for ProxyThread {
    fn drop(&mut self) {
        self.stop.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Serves `listeners` on a thread of their own with a single-threaded
/// runtime: a forwarded packet is read, written and waited for on one
/// thread, with no hand-over between worker threads (which costs a wake-up
/// per packet), and the HA loop's work never queues behind client traffic.
/// The thread logs in the caller's current span.
pub fn spawn(
    listeners: Vec<(Access, std::net::TcpListener)>,
    route: watch::Receiver<Route>,
    wait_for_target: Duration,
    stats: Arc<ProxyStats>,
) -> Result<ProxyThread, ProxyError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| ProxyError::Runtime { source })?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let span = tracing::Span::current();
    let thread = std::thread::Builder::new()
        .name("mainstay-proxy".into())
        .spawn(move || {
            // Entered once for the thread's life: every task of this
            // runtime runs on this thread, so each line carries the span
            // without an enter and exit per poll of a connection.
            let _in_span = span.enter();
            runtime.block_on(async move {
                for (access, listener) in listeners {
                    match TcpListener::from_std(listener) {
                        Ok(listener) => {
                            tokio::spawn(serve(
                                listener,
                                access,
                                route.clone(),
                                wait_for_target,
                                stats.clone(),
                            ));
                        }
                        Err(err) => warn!(listener = access.label(), "proxy listener lost: {err}"),
                    }
                }
                let _ = stopped.await;
            });
        })
        .map_err(|source| ProxyError::Thread { source })?;
    Ok(ProxyThread {
        stop: Some(stop),
        thread: Some(thread),
    })
}

/// Accepts until the runtime stops.
async fn serve(
    listener: TcpListener,
    access: Access,
    route: watch::Receiver<Route>,
    wait_for_target: Duration,
    stats: Arc<ProxyStats>,
) {
    let mut turn = 0usize;
    loop {
        let (client, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                // Out of file descriptors and the like: back off, go on.
                warn!("proxy accept failed: {err}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        turn = turn.wrapping_add(1);
        let _ = client.set_nodelay(true);
        let (route, stats) = (route.clone(), stats.clone());
        tokio::spawn(async move {
            if let Err(reason) = forward(client, access, route, wait_for_target, &stats, turn).await
            {
                debug!(%peer, listener = access.label(), %reason, "proxy connection ended");
            }
        });
    }
}

/// Why a proxied connection ended before both sides closed, for the debug
/// log: a client that gives up or a reroute is routine, not a fault.
#[derive(Debug, thiserror::Error)]
enum Ended {
    #[error("no target within {0:?}")]
    NoTarget(Duration),
    #[error("the client left while waiting for a target")]
    ClientLeft,
    #[error("client: {0}")]
    Client(#[source] io::Error),
    #[error("{target}: {source}")]
    Forwarding { target: String, source: io::Error },
    #[error("{0} no longer a target")]
    Rerouted(String),
}

async fn forward(
    client: TcpStream,
    access: Access,
    mut route: watch::Receiver<Route>,
    wait_for_target: Duration,
    stats: &ProxyStats,
    turn: usize,
) -> Result<(), Ended> {
    // Wait (bounded) for a trustworthy target that accepts the connection.
    // A replica that refuses is skipped for this client (its agent reports
    // it down a moment later); a primary that refuses is tried again while
    // time remains, as it may be restarting or about to be replaced.
    let deadline = Instant::now() + wait_for_target;
    let mut refused_by: Vec<String> = Vec::new();
    // What the client sends while it waits (its startup packet), passed on
    // first once a server is reached. Reading it is also how a client that
    // gives up is noticed: its connection is dropped then, instead of being
    // carried to the new primary with all the others that gave up, a crowd
    // that would log in at once the moment a primary appears.
    let mut early: Vec<u8> = Vec::new();
    let (name, counters, server) = loop {
        let picked = route
            .borrow_and_update()
            .pick(access, stats, turn, &refused_by);
        if let Some(Target { name, address }) = picked {
            let counters = stats.target(access, &name);
            // Counted before connecting, so that connections opened at the
            // same moment spread over the replicas.
            counters.active.fetch_add(1, Ordering::Relaxed);
            let patience = deadline
                .saturating_duration_since(Instant::now())
                .clamp(Duration::from_millis(500), Duration::from_secs(5));
            match tokio::time::timeout(patience, TcpStream::connect(address.as_str())).await {
                Ok(Ok(server)) => break (name, counters, server),
                Ok(Err(err)) => debug!(target = %name, %address, "connect failed: {err}"),
                Err(_) => debug!(target = %name, %address, "connect timed out"),
            }
            counters.active.fetch_sub(1, Ordering::Relaxed);
            if route
                .borrow()
                .primary
                .as_ref()
                .is_none_or(|p| p.name != name)
            {
                refused_by.push(name);
                continue;
            }
        }
        if Instant::now() >= deadline {
            stats
                .refused_counter(access)
                .fetch_add(1, Ordering::Relaxed);
            return Err(Ended::NoTarget(wait_for_target));
        }
        let recheck = Instant::now() + Duration::from_millis(100);
        tokio::select! {
            _ = route.changed() => {}
            _ = tokio::time::sleep_until(recheck.min(deadline)) => {}
            readable = client.readable(), if early.len() < EARLY_LIMIT => {
                readable.map_err(Ended::Client)?;
                let mut chunk = [0u8; 1024];
                match client.try_read(&mut chunk) {
                    Ok(0) => return Err(Ended::ClientLeft),
                    Ok(n) => early.extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(Ended::Client(e)),
                }
            }
        }
    };
    counters.total.fetch_add(1, Ordering::Relaxed);
    let _active = Decrement(&counters.active);
    let _ = server.set_nodelay(true);
    let forwarding = |source| Ended::Forwarding {
        target: name.clone(),
        source,
    };
    write_all(&server, &early).await.map_err(forwarding)?;
    counters
        .bytes_to_server
        .fetch_add(early.len() as u64, Ordering::Relaxed);
    drop(early);
    // Runs until both sides have closed, either fails, or the route stops
    // listing this target: then both sockets close and the client
    // reconnects.
    let both_ways = async {
        tokio::try_join!(
            pump(&client, &server, &counters.bytes_to_server),
            pump(&server, &client, &counters.bytes_to_client),
        )
    };
    tokio::select! {
        result = both_ways => result.map(|_| ()).map_err(forwarding),
        _ = moved_away(&mut route, access, &name) => Err(Ended::Rerouted(name.clone())),
    }
}

/// Copies `from` to `to` until `from` closes, then half-closes `to`.
async fn pump(from: &TcpStream, to: &TcpStream, bytes: &AtomicU64) -> io::Result<()> {
    loop {
        from.readable().await?;
        let mut buffer = PooledBuffer::take();
        let n = match read_draining(from, &mut buffer) {
            Ok(0) => {
                // Passes the end of the stream on, as the peer sent it; the
                // other direction keeps flowing until it ends too.
                let _ = mainstay_sys::net::shutdown_write(to);
                return Ok(());
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        write_all(to, &buffer[..n]).await?;
        bytes.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// Bytes a waiting client may send before it is no longer read (a startup
/// packet is a few hundred bytes; TLS negotiation, 8).
const EARLY_LIMIT: usize = 16 * 1024;

async fn write_all(to: &TcpStream, bytes: &[u8]) -> io::Result<()> {
    let mut sent = 0;
    while sent < bytes.len() {
        to.writable().await?;
        match to.try_write(&bytes[sent..]) {
            Ok(written) => sent += written,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads once; a read shorter than the buffer drained the socket, so the
/// readiness is cleared with it and the next wait goes straight to the
/// event loop, instead of first paying a read that fails with EAGAIN (one
/// syscall saved per message in a request-response protocol). Clearing in
/// the same `try_io` as the read is race-free: tokio clears only the
/// readiness event this read observed, not one that arrives after it.
fn read_draining(stream: &TcpStream, buffer: &mut [u8]) -> io::Result<usize> {
    let mut got = None;
    let result = stream.try_io(tokio::io::Interest::READABLE, || {
        let n = mainstay_sys::net::read(stream, buffer)?;
        got = Some(n);
        if n > 0 && n < buffer.len() {
            Err(io::ErrorKind::WouldBlock.into())
        } else {
            Ok(n)
        }
    });
    match (result, got) {
        (Ok(n), _) => Ok(n),
        (Err(e), Some(n)) if e.kind() == io::ErrorKind::WouldBlock => Ok(n),
        (Err(e), _) => Err(e),
    }
}

const BUFFER_SIZE: usize = 16 * 1024;
/// Buffers kept for reuse; beyond this a burst's buffers are freed.
const POOL_LIMIT: usize = 1024;
static POOL: std::sync::Mutex<Vec<Box<[u8]>>> = std::sync::Mutex::new(Vec::new());

/// A buffer borrowed from the pool, returned when dropped.
struct PooledBuffer(Option<Box<[u8]>>);

impl PooledBuffer {
    fn take() -> PooledBuffer {
        let reused = poison::lock(&POOL).pop();
        PooledBuffer(Some(
            reused.unwrap_or_else(|| vec![0; BUFFER_SIZE].into_boxed_slice()),
        ))
    }
}

impl std::ops::Deref for PooledBuffer {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.0.as_deref().unwrap_or_default()
    }
}

impl std::ops::DerefMut for PooledBuffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.0.as_deref_mut().unwrap_or_default()
    }
}

impl Drop for PooledBuffer {
    fn drop(&mut self) {
        if let Some(buffer) = self.0.take() {
            let mut pool = poison::lock(&POOL);
            if pool.len() < POOL_LIMIT {
                pool.push(buffer);
            }
        }
    }
}

/// Resolves when the route no longer keeps `name`, or stops being trusted.
async fn moved_away(route: &mut watch::Receiver<Route>, access: Access, name: &str) {
    loop {
        let valid_until = {
            let current = route.borrow_and_update();
            if !current.keeps(access, name) {
                return;
            }
            current.valid_until
        };
        tokio::select! {
            changed = route.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            _ = tokio::time::sleep_until(valid_until) => {}
        }
    }
}

struct Decrement<'a>(&'a AtomicU64);

impl Drop for Decrement<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Every proxied client holds two descriptors: the soft limit (often 1024)
/// goes up to the hard limit the service manager allows (`LimitNOFILE=`).
pub fn raise_open_files_limit() {
    if let Ok((soft, hard)) = mainstay_sys::process::open_files_limit()
        && soft < hard
        && mainstay_sys::process::set_open_files_limit(hard, hard).is_err()
    {
        warn!("cannot raise the open files limit from {soft}: the proxy takes fewer clients");
    }
}

/// The address clients use for a member's PostgreSQL.
pub fn address(host: &str, port: u16) -> String {
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) => SocketAddr::new(ip, port).to_string(),
        Err(_) => format!("{host}:{port}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mainstay_core::{LeaderRecord, MemberRecord};

    fn member(name: &str, role: PgRole, lsn: u64, following: Option<&str>) -> MemberRecord {
        MemberRecord::example(name, role, lsn, following)
    }

    fn view(leader: Option<&str>, members: Vec<MemberRecord>) -> ClusterView {
        ClusterView {
            leader: leader.map(|name| LeaderRecord {
                name: name.into(),
                lease_id: 1,
                mod_revision: 1,
            }),
            members: members
                .into_iter()
                .map(|m| (m.status.name.clone(), m))
                .collect(),
            ..ClusterView::default()
        }
    }

    fn names(route: &Route, access: Access, stats: &ProxyStats, turns: usize) -> Vec<String> {
        (0..turns)
            .filter_map(|t| route.pick(access, stats, t, &[]).map(|t| t.name))
            .collect()
    }

    #[test]
    fn read_only_goes_to_streaming_replicas_within_lag_and_falls_back_to_the_primary() {
        let later = Instant::now() + Duration::from_secs(60);
        let v = view(
            Some("a"),
            vec![
                member("a", PgRole::Primary, 10_000, None),
                member("bb", PgRole::Replica, 9_000, Some("a")),
                member("ccc", PgRole::Replica, 1_000, Some("a")),
                member("dddd", PgRole::Replica, 10_000, None),
            ],
        );
        let stats = ProxyStats::default();
        let route = Route::from_view(&v, 2_000, later);
        assert_eq!(route.primary.as_ref().unwrap().name, "a");
        // ccc lags 9000 bytes, dddd does not stream: only bb qualifies.
        assert_eq!(names(&route, Access::ReadOnly, &stats, 3), ["bb"; 3]);
        assert_eq!(names(&route, Access::ReadWrite, &stats, 2), ["a"; 2]);
        // Open connections to a lagging replica stay; a vanished one goes.
        assert!(route.keeps(Access::ReadOnly, "ccc"));
        assert!(!route.keeps(Access::ReadOnly, "zz"));
        assert!(!route.keeps(Access::ReadWrite, "bb"));

        let route = Route::from_view(&v, 10_000, later);
        let spread = names(&route, Access::ReadOnly, &stats, 4);
        assert!(spread.contains(&"bb".to_string()) && spread.contains(&"ccc".to_string()));
        // Least connections: with two open to bb, ccc gets the next ones.
        stats
            .target(Access::ReadOnly, "bb")
            .active
            .store(2, Ordering::Relaxed);
        assert_eq!(names(&route, Access::ReadOnly, &stats, 3), ["ccc"; 3]);

        let route = Route::from_view(&v, 0, later);
        assert_eq!(names(&route, Access::ReadOnly, &stats, 2), ["a"; 2]);

        // A noloadbalance replica gets no read-only connection at all.
        let mut v = v;
        v.members.get_mut("bb").unwrap().status.tags.noloadbalance = true;
        let route = Route::from_view(&v, 2_000, later);
        assert_eq!(names(&route, Access::ReadOnly, &stats, 3), ["a"; 3]);
    }

    /// A read-write route to `address` (target "pg") for ten minutes.
    fn route_to(address: String) -> Route {
        Route {
            primary: Some(Target {
                name: "pg".into(),
                address,
            }),
            replicas: Vec::new(),
            valid_until: Instant::now() + Duration::from_secs(600),
        }
    }

    /// A read-write listener on a free port, waiting up to 10 s for a target.
    fn start_proxy(route: watch::Receiver<Route>) -> (SocketAddr, Arc<ProxyStats>, ProxyThread) {
        let listener = bind("proxy.listen", "127.0.0.1:0".parse().unwrap()).unwrap();
        let address = listener.local_addr().unwrap();
        let stats = Arc::new(ProxyStats::default());
        let thread = spawn(
            vec![(Access::ReadWrite, listener)],
            route,
            Duration::from_secs(10),
            stats.clone(),
        )
        .unwrap();
        (address, stats, thread)
    }

    fn rss_bytes() -> u64 {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                let line = s.lines().find(|l| l.starts_with("VmRSS:"))?.to_string();
                line.split_whitespace().nth(1)?.parse::<u64>().ok()
            })
            .map_or(0, |kb| kb * 1024)
    }

    /// Against a plain TCP server (the forwarding layer does not read the
    /// protocol): bytes pass both ways and half-closes pass on; thousands of
    /// idle clients cost no buffers; every connection closes when the route
    /// no longer names its server.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn forwarding_is_transparent_and_idle_connections_are_cheap() {
        raise_open_files_limit();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server_address = server.local_addr().unwrap().to_string();
        // Echoes each connection's bytes back, reversed once it ends.
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = server.accept().await {
                tokio::spawn(async move {
                    let mut received = Vec::new();
                    if socket.read_to_end(&mut received).await.is_ok() {
                        received.reverse();
                        let _ = socket.write_all(&received).await;
                    }
                });
            }
        });
        let (route_tx, route) = watch::channel(route_to(server_address));
        let (proxy_address, stats, _proxy) = start_proxy(route);

        // 1 MiB each way, then the client's half-close reaches the
        // server, whose answer still comes back in full.
        let payload: Vec<u8> = (0..1 << 20).map(|i| (i * 7 % 251) as u8).collect();
        let mut client = TcpStream::connect(proxy_address).await.unwrap();
        client.write_all(&payload).await.unwrap();
        client.shutdown().await.unwrap();
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        let mut expected = payload.clone();
        expected.reverse();
        assert!(answer == expected, "{} bytes came back", answer.len());

        let active = || {
            stats
                .target(Access::ReadWrite, "pg")
                .active
                .load(Ordering::Relaxed)
        };
        let wait_active = async |n: u64| {
            let deadline = Instant::now() + Duration::from_secs(30);
            while active() != n {
                assert!(
                    Instant::now() < deadline,
                    "{} active, waiting for {n}",
                    active()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        wait_active(0).await;
        let idle = 3000u64;
        let before = rss_bytes();
        let mut clients = Vec::new();
        for _ in 0..idle {
            clients.push(TcpStream::connect(proxy_address).await.unwrap());
        }
        wait_active(idle).await;
        let per_connection = rss_bytes().saturating_sub(before) / idle;
        // Held buffers would cost 16 KiB or more per connection; the
        // client sockets counted here are in the same process.
        assert!(
            per_connection < 10 * 1024,
            "{per_connection} bytes of memory per idle connection"
        );
        route_tx.send_replace(Route::nowhere());
        wait_active(0).await;
        let mut buffer = [0u8; 1];
        for client in &mut clients[..10] {
            assert_eq!(
                client.read(&mut buffer).await.unwrap(),
                0,
                "closed by the proxy"
            );
        }
        eprintln!("{per_connection} bytes per idle proxied connection");
    }

    /// A client that waits for a primary keeps its first bytes (they reach
    /// the server first, in order); one that leaves while waiting is never
    /// carried to the server.
    #[tokio::test]
    async fn waiting_clients_keep_their_bytes_and_leavers_are_dropped() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server_address = server.local_addr().unwrap().to_string();
        let (route_tx, route) = watch::channel(Route::nowhere());
        let (proxy_address, stats, _proxy) = start_proxy(route);
        let leaver = TcpStream::connect(proxy_address).await.unwrap();
        let mut waiter = TcpStream::connect(proxy_address).await.unwrap();
        waiter.write_all(b"startup packet;").await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        drop(leaver);
        tokio::time::sleep(Duration::from_millis(200)).await;
        route_tx.send_replace(route_to(server_address));
        let (mut accepted, _) = server.accept().await.unwrap();
        waiter.write_all(b" then more").await.unwrap();
        waiter.shutdown().await.unwrap();
        let mut received = Vec::new();
        accepted.read_to_end(&mut received).await.unwrap();
        assert_eq!(received, b"startup packet; then more");
        // The leaver never reached the server.
        let second = tokio::time::timeout(Duration::from_millis(300), server.accept()).await;
        assert!(
            second.is_err(),
            "a client that left was carried to the server"
        );
        assert_eq!(
            stats
                .target(Access::ReadWrite, "pg")
                .total
                .load(Ordering::Relaxed),
            1
        );
    }

    #[test]
    fn no_primary_no_read_write_but_replicas_keep_serving_reads() {
        let later = Instant::now() + Duration::from_secs(60);
        let v = view(
            None,
            vec![
                member("a", PgRole::Stopped, 10_000, None),
                member("bb", PgRole::Replica, 9_000, None),
            ],
        );
        let stats = ProxyStats::default();
        let route = Route::from_view(&v, 0, later);
        assert!(names(&route, Access::ReadWrite, &stats, 1).is_empty());
        assert_eq!(names(&route, Access::ReadOnly, &stats, 1), ["bb"]);

        // A stale view routes nothing and keeps nothing open.
        let route = Route::from_view(&v, 0, Instant::now() - Duration::from_millis(1));
        assert!(names(&route, Access::ReadOnly, &stats, 1).is_empty());
        assert!(!route.keeps(Access::ReadOnly, "bb"));
    }
}
