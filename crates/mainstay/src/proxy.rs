//! The built-in read-write proxy: clients connect to one address on any node
//! and reach the current primary. Byte-for-byte TCP forwarding (TLS from the
//! client passes through untouched).
//!
//! The route comes from the HA loop, which follows the DCS watch: when the
//! leader changes the route changes at once, and connections still open to
//! the old primary are closed so that clients reconnect to the new one. A
//! new connection during the gap waits (bounded) for a leader instead of
//! failing at once. A route whose DCS view may be older than the leader's
//! lease is not trusted: routing stops until the view is fresh again.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, warn};

/// Where read-write connections go now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// The leader's name and PostgreSQL address; `None`: nowhere.
    pub primary: Option<(String, String)>,
    /// The route is trustworthy until then (last DCS view + ttl - margin).
    pub valid_until: Instant,
}

impl Route {
    pub fn nowhere() -> Route {
        Route {
            primary: None,
            valid_until: Instant::now(),
        }
    }

    fn target(&self) -> Option<&(String, String)> {
        self.primary
            .as_ref()
            .filter(|_| Instant::now() < self.valid_until)
    }
}

/// Connection and byte counters per target, for `/metrics`.
#[derive(Default)]
pub struct ProxyStats {
    targets: std::sync::Mutex<BTreeMap<String, Arc<TargetStats>>>,
    pub refused: AtomicU64,
}

#[derive(Default)]
pub struct TargetStats {
    pub active: AtomicU64,
    pub total: AtomicU64,
    pub bytes_to_server: AtomicU64,
    pub bytes_to_client: AtomicU64,
}

impl ProxyStats {
    fn target(&self, name: &str) -> Arc<TargetStats> {
        self.targets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(name.to_string())
            .or_default()
            .clone()
    }

    /// (target, active, total, bytes to server, bytes to client)
    pub fn snapshot(&self) -> Vec<(String, u64, u64, u64, u64)> {
        self.targets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(name, s)| {
                (
                    name.clone(),
                    s.active.load(Ordering::Relaxed),
                    s.total.load(Ordering::Relaxed),
                    s.bytes_to_server.load(Ordering::Relaxed),
                    s.bytes_to_client.load(Ordering::Relaxed),
                )
            })
            .collect()
    }
}

/// Binds the read-write listener; a failure is a startup error.
pub async fn bind(listen: &str) -> Result<TcpListener, String> {
    TcpListener::bind(listen).await.map_err(|e| {
        format!(
            "cannot listen on proxy.listen = {listen:?}: {e}; choose a free address and port \
             in the [proxy] section"
        )
    })
}

/// Accepts until the task is aborted.
pub async fn serve(
    listener: TcpListener,
    route: watch::Receiver<Route>,
    wait_for_leader: Duration,
    stats: Arc<ProxyStats>,
) {
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
        let _ = client.set_nodelay(true);
        let (route, stats) = (route.clone(), stats.clone());
        tokio::spawn(async move {
            if let Err(reason) = forward(client, route, wait_for_leader, &stats).await {
                debug!(%peer, reason, "proxy connection ended");
            }
        });
    }
}

async fn forward(
    mut client: TcpStream,
    mut route: watch::Receiver<Route>,
    wait_for_leader: Duration,
    stats: &ProxyStats,
) -> Result<(), String> {
    // Wait (bounded) for a trustworthy primary.
    let deadline = Instant::now() + wait_for_leader;
    let (name, address) = loop {
        if let Some(target) = route.borrow_and_update().target() {
            break target.clone();
        }
        let recheck = Instant::now() + Duration::from_millis(100);
        if Instant::now() >= deadline {
            stats.refused.fetch_add(1, Ordering::Relaxed);
            return Err(format!("no primary within {wait_for_leader:?}"));
        }
        tokio::select! {
            _ = route.changed() => {}
            _ = tokio::time::sleep_until(recheck.min(deadline)) => {}
        }
    };
    let mut server =
        tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(address.as_str()))
            .await
            .map_err(|_| format!("connecting to {name} ({address}) timed out"))?
            .map_err(|e| format!("connecting to {name} ({address}): {e}"))?;
    let _ = server.set_nodelay(true);
    let target = stats.target(&name);
    target.total.fetch_add(1, Ordering::Relaxed);
    target.active.fetch_add(1, Ordering::Relaxed);
    let _active = Decrement(&target.active);
    // Runs until either side closes, or the route stops naming this
    // primary: then both sockets close and the client reconnects.
    let copied = tokio::select! {
        copied = tokio::io::copy_bidirectional(&mut client, &mut server) => copied.ok(),
        _ = moved_away(&mut route, &name) => None,
    };
    if let Some((to_server, to_client)) = copied {
        target
            .bytes_to_server
            .fetch_add(to_server, Ordering::Relaxed);
        target
            .bytes_to_client
            .fetch_add(to_client, Ordering::Relaxed);
    }
    Ok(())
}

/// Resolves when the route no longer names `name`, or stops being trusted.
async fn moved_away(route: &mut watch::Receiver<Route>, name: &str) {
    loop {
        let valid_until = {
            let current = route.borrow_and_update();
            match current.target() {
                Some((leader, _)) if leader == name => current.valid_until,
                _ => return,
            }
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
