//! HAProxy's `agent-check`: a TCP port where each node tells a load
//! balancer "up" or "down" for the role a backend asks (`agent-send
//! "primary\n"`, `"replica\n"`, `"read-only\n"`). HTTP health checks are
//! polled and need `fall` failures before a server is taken out; an agent's
//! "down" takes it out at the next poll. A leader handing over first says
//! "down" and waits `agent_check_wait` (at least HAProxy's `agent-inter`)
//! before it stops PostgreSQL, so no new read-write connection reaches it
//! once it is a read-only replica.

use crate::api::NodeSnapshot;
use crate::api::health::{Check, Filters, passes};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tracing::{debug, info, warn};

/// The longest role line an `agent-send` carries here.
const MAX_REQUEST: usize = 64;
/// How long to wait for an `agent-send` line before answering for the
/// primary: HAProxy sends it at once when it is configured, and a
/// retransmitted segment must not turn a replica backend's question into
/// the primary's.
const REQUEST_WAIT: Duration = Duration::from_millis(300);
/// A connection that lasts longer is dropped (a scanner, a stuck peer).
const CONNECTION_LIMIT: Duration = Duration::from_secs(2);
/// Connections handled at once; more wait their turn.
const MAX_CONCURRENT: usize = 64;
/// A load balancer that polled within this long is taken to poll still,
/// and a stepping-down leader waits for it.
const POLLER_MEMORY: Duration = Duration::from_secs(30);

/// The role a backend asks about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Primary,
    Replica,
    ReadOnly,
}

impl Role {
    /// The `agent-send` text; nothing sent means the primary.
    pub fn parse(request: &str) -> Result<Role, String> {
        match request.trim().to_ascii_lowercase().as_str() {
            "" | "primary" | "read-write" | "master" | "leader" => Ok(Role::Primary),
            "replica" => Ok(Role::Replica),
            "read-only" => Ok(Role::ReadOnly),
            other => Err(format!(
                "unknown role {other:?}: use agent-send \"primary\\n\", \"replica\\n\" or \
                 \"read-only\\n\""
            )),
        }
    }
}

/// What the agent answers: "up", or "down" with why (HAProxy shows the
/// text after `#` on its stats page). An unknown role is "fail": a
/// misconfigured backend must show at once, not route by guess.
pub fn answer(request: &str, node: &NodeSnapshot, stepping_down: bool) -> String {
    let role = match Role::parse(request) {
        Ok(role) => role,
        Err(why) => return format!("fail #{why}\n"),
    };
    let none = Filters::default();
    let (fits, why) = match role {
        Role::Primary if stepping_down => (false, "handing over the primary"),
        Role::Primary => (passes(Check::Primary, node, &none), "not the primary"),
        Role::Replica => (
            passes(Check::Replica, node, &none),
            "not a streaming replica",
        ),
        Role::ReadOnly if stepping_down => (
            passes(Check::Replica, node, &none),
            "handing over the primary",
        ),
        Role::ReadOnly => (
            passes(Check::ReadOnly, node, &none),
            "neither primary nor streaming replica",
        ),
    };
    if fits {
        "up\n".into()
    } else {
        format!("down #{why}\n")
    }
}

/// The agent-check port's shared state: whether this node is handing the
/// primary over, and when a load balancer last asked.
#[derive(Default)]
pub struct AgentCheck {
    stepping_down: AtomicBool,
    last_poll: std::sync::Mutex<Option<Instant>>,
}

/// A leader handing over: the primary role answers "down" from its
/// creation until it is dropped (an aborted switchover leaves this node
/// the primary, and "up" again).
pub struct SteppingDown {
    check: Arc<AgentCheck>,
    since: Instant,
    /// A load balancer polls this port: it must hear "down" before
    /// PostgreSQL stops.
    polled: bool,
}

impl SteppingDown {
    /// Returns once `wait` has passed since the step-down began, when a
    /// load balancer polls (at once otherwise): whatever ran meanwhile
    /// (stopping services) counts.
    pub async fn heard(&self, wait: Duration) {
        if self.polled {
            let left = wait.saturating_sub(self.since.elapsed());
            if !left.is_zero() {
                info!(
                    ?left,
                    "switchover: letting the load balancers' agent checks hear \"down\" first"
                );
                tokio::time::sleep(left).await;
            }
        }
    }
}

impl Drop for SteppingDown {
    fn drop(&mut self) {
        self.check.stepping_down.store(false, Ordering::SeqCst);
    }
}

impl AgentCheck {
    /// From now on the primary role answers "down".
    pub fn step_down(self: &Arc<Self>) -> SteppingDown {
        self.stepping_down.store(true, Ordering::SeqCst);
        let polled = mainstay_core::poison::lock(&self.last_poll)
            .is_some_and(|at| at.elapsed() < POLLER_MEMORY);
        SteppingDown {
            check: self.clone(),
            since: Instant::now(),
            polled,
        }
    }

    /// Serves the port until the task is aborted.
    pub async fn serve(
        self: Arc<Self>,
        listener: tokio::net::TcpListener,
        snapshot: watch::Receiver<Arc<NodeSnapshot>>,
        live: Arc<mainstay_pg::LiveProbe>,
    ) {
        let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT));
        loop {
            let Ok(permit) = permits.clone().acquire_owned().await else {
                return;
            };
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(err) => {
                    warn!("agent check: accepting a connection failed: {err}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let me = self.clone();
            let snapshot = snapshot.clone();
            let live = live.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let talk = me.talk(stream, &snapshot, &live);
                if tokio::time::timeout(CONNECTION_LIMIT, talk).await.is_err() {
                    debug!(%peer, "agent check: connection dropped after {CONNECTION_LIMIT:?}");
                }
            });
        }
    }

    async fn talk(
        &self,
        mut stream: tokio::net::TcpStream,
        snapshot: &watch::Receiver<Arc<NodeSnapshot>>,
        live: &mainstay_pg::LiveProbe,
    ) {
        let mut request = Vec::with_capacity(MAX_REQUEST);
        let mut buffer = [0u8; MAX_REQUEST];
        let reading = async {
            while request.len() < MAX_REQUEST && !request.contains(&b'\n') {
                match stream.read(&mut buffer).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        request.extend_from_slice(&buffer[..n.min(MAX_REQUEST - request.len())])
                    }
                }
            }
        };
        let _ = tokio::time::timeout(REQUEST_WAIT, reading).await;
        let line = String::from_utf8_lossy(&request);
        let line = line.split('\n').next().unwrap_or("").trim_end_matches('\r');
        *mainstay_core::poison::lock(&self.last_poll) = Some(Instant::now());
        let node = snapshot.borrow().clone();
        // A leader handing over answers "down" for the primary at once: a
        // probe of a busy server could take longer than the step-down wait.
        let stepping_down = self.stepping_down.load(Ordering::SeqCst);
        let node = if stepping_down && node.holds_leader {
            node
        } else {
            crate::api::live_node(node, live).await
        };
        let reply = answer(line, &node, stepping_down);
        let _ = stream.write_all(reply.as_bytes()).await;
        let _ = stream.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::running_node as node;

    #[test]
    fn each_role_is_up_only_where_it_fits() {
        let primary = node(false, true);
        let replica = node(true, false);
        assert_eq!(answer("primary", &primary, false), "up\n");
        assert_eq!(answer("", &primary, false), "up\n");
        assert!(answer("primary", &replica, false).starts_with("down #"));
        assert_eq!(answer("replica", &replica, false), "up\n");
        assert!(answer("replica", &primary, false).starts_with("down #"));
        assert_eq!(answer("read-only", &primary, false), "up\n");
        assert_eq!(answer("READ-ONLY", &replica, false), "up\n");
    }

    #[test]
    fn a_leader_handing_over_is_down_for_writes_before_it_stops() {
        let primary = node(false, true);
        assert_eq!(
            answer("primary", &primary, true),
            "down #handing over the primary\n"
        );
        assert!(answer("read-only", &primary, true).starts_with("down #"));
        // A replica's read-only answer does not depend on it.
        assert_eq!(answer("read-only", &node(true, false), true), "up\n");
    }

    #[test]
    fn an_unknown_role_fails_loudly() {
        let reply = answer("writer", &node(false, true), false);
        assert!(
            reply.starts_with("fail #unknown role \"writer\""),
            "{reply}"
        );
    }

    #[tokio::test]
    async fn a_step_down_waits_only_when_a_load_balancer_polls() {
        let check = Arc::new(AgentCheck::default());
        let started = Instant::now();
        let guard = check.step_down();
        guard.heard(Duration::from_secs(5)).await;
        assert!(started.elapsed() < Duration::from_secs(1), "nobody polls");
        assert!(check.stepping_down.load(Ordering::SeqCst));
        drop(guard);
        assert!(!check.stepping_down.load(Ordering::SeqCst));
        *mainstay_core::poison::lock(&check.last_poll) = Some(Instant::now());
        let started = Instant::now();
        let guard = check.step_down();
        guard.heard(Duration::from_millis(200)).await;
        assert!(started.elapsed() >= Duration::from_millis(200));
        // Time already spent counts.
        let again = Instant::now();
        guard.heard(Duration::from_millis(200)).await;
        assert!(again.elapsed() < Duration::from_millis(100));
    }
}
