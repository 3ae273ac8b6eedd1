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
        self.targets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((access, name.to_string()))
            .or_default()
            .clone()
    }

    fn active(&self, access: Access, name: &str) -> u64 {
        self.targets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
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
        self.targets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
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

/// Binds a proxy listener; a failure is a startup error naming the key.
pub async fn bind(key: &str, listen: &str) -> Result<TcpListener, String> {
    TcpListener::bind(listen).await.map_err(|e| {
        format!(
            "cannot listen on {key} = {listen:?}: {e}; choose a free address and port \
             in the [proxy] section"
        )
    })
}

/// Accepts until the task is aborted.
pub async fn serve(
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
                debug!(%peer, listener = access.label(), reason, "proxy connection ended");
            }
        });
    }
}

async fn forward(
    client: TcpStream,
    access: Access,
    mut route: watch::Receiver<Route>,
    wait_for_target: Duration,
    stats: &ProxyStats,
    turn: usize,
) -> Result<(), String> {
    // Wait (bounded) for a trustworthy target that accepts the connection.
    // A replica that refuses is skipped for this client (its agent reports
    // it down a moment later); a primary that refuses is tried again while
    // time remains, as it may be restarting or about to be replaced.
    let deadline = Instant::now() + wait_for_target;
    let mut refused_by: Vec<String> = Vec::new();
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
            return Err(format!("no target within {wait_for_target:?}"));
        }
        let recheck = Instant::now() + Duration::from_millis(100);
        tokio::select! {
            _ = route.changed() => {}
            _ = tokio::time::sleep_until(recheck.min(deadline)) => {}
        }
    };
    counters.total.fetch_add(1, Ordering::Relaxed);
    let _active = Decrement(&counters.active);
    let _ = server.set_nodelay(true);
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
        result = both_ways => result.map(|_| ()).map_err(|e| format!("{name}: {e}")),
        _ = moved_away(&mut route, access, &name) => Err(format!("{name} no longer a target")),
    }
}

/// Copies `from` to `to` until `from` closes, then half-closes `to`.
async fn pump(from: &TcpStream, to: &TcpStream, bytes: &AtomicU64) -> io::Result<()> {
    loop {
        from.readable().await?;
        let mut buffer = PooledBuffer::take();
        let n = match from.try_read(&mut buffer) {
            Ok(0) => {
                // Passes the end of the stream on, as the peer sent it; the
                // other direction keeps flowing until it ends too.
                let fd = std::os::fd::AsRawFd::as_raw_fd(to);
                // SAFETY: `fd` is a live socket owned by `to`.
                unsafe { libc::shutdown(fd, libc::SHUT_WR) };
                return Ok(());
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        let mut sent = 0;
        while sent < n {
            to.writable().await?;
            match to.try_write(&buffer[sent..n]) {
                Ok(written) => sent += written,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        bytes.fetch_add(n as u64, Ordering::Relaxed);
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
        let reused = POOL.lock().unwrap_or_else(|e| e.into_inner()).pop();
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
            let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
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
