//! systemd's notification protocol (`Type=notify`, `WatchdogSec=`): one
//! datagram per message to the socket in `$NOTIFY_SOCKET`. `READY=1` once
//! the agent serves, `WATCHDOG=1` from the agent's runtime every half
//! `WatchdogSec` (a frozen agent stops the pings and systemd restarts it;
//! its fencing guard then stops PostgreSQL), `STOPPING=1` on the way out.
//! Without `$NOTIFY_SOCKET` (not under systemd) every call does nothing.
//!
//! Written here rather than taken from a crate so that the socket and the
//! watchdog period are values (tests pass their own) and the process's
//! environment is read once, at start.

use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::PathBuf;
use std::time::{Duration, Instant};

pub struct Notifier {
    target: Option<Target>,
    /// Half systemd's watchdog period: how often the loop must ping.
    ping_every: Option<Duration>,
    last_ping: Option<Instant>,
}

enum Target {
    Path(PathBuf),
    /// `@name`: a socket in the abstract namespace.
    Abstract(Vec<u8>),
}

impl Notifier {
    /// From `$NOTIFY_SOCKET` and `$WATCHDOG_USEC` (only if `$WATCHDOG_PID`
    /// is unset or this process's).
    pub fn from_env() -> Notifier {
        let socket = std::env::var_os("NOTIFY_SOCKET").map(PathBuf::from);
        let pid_matches = std::env::var("WATCHDOG_PID")
            .ok()
            .is_none_or(|pid| pid.trim() == std::process::id().to_string());
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|usec| usec.trim().parse::<u64>().ok())
            .filter(|usec| *usec > 0 && pid_matches)
            .map(Duration::from_micros);
        Notifier::new(socket, watchdog)
    }

    pub fn new(socket: Option<PathBuf>, watchdog: Option<Duration>) -> Notifier {
        let target = socket.map(|path| {
            let text = path.to_string_lossy();
            match text.strip_prefix('@') {
                Some(name) => Target::Abstract(name.as_bytes().to_vec()),
                None => Target::Path(path),
            }
        });
        Notifier {
            ping_every: watchdog.filter(|_| target.is_some()).map(|w| w / 2),
            target,
            last_ping: None,
        }
    }

    /// The watchdog period systemd set, halved; `None` without one.
    pub fn ping_every(&self) -> Option<Duration> {
        self.ping_every
    }

    pub fn ready(&mut self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={status}"));
        self.last_ping = Some(Instant::now());
    }

    /// The HA loop is alive: pings the watchdog if half its period passed.
    pub fn alive(&mut self) {
        let Some(every) = self.ping_every else {
            return;
        };
        if self.last_ping.is_some_and(|at| at.elapsed() < every) {
            return;
        }
        self.send("WATCHDOG=1");
        self.last_ping = Some(Instant::now());
    }

    pub fn stopping(&mut self) {
        self.send("STOPPING=1");
    }

    fn send(&self, message: &str) {
        let Some(target) = &self.target else {
            return;
        };
        let sent = UnixDatagram::unbound().and_then(|socket| match target {
            Target::Path(path) => socket.send_to(message.as_bytes(), path),
            Target::Abstract(name) => {
                use std::os::linux::net::SocketAddrExt;
                let address = SocketAddr::from_abstract_name(name)?;
                socket.send_to_addr(message.as_bytes(), &address)
            }
        });
        if let Err(err) = sent {
            tracing::warn!("cannot notify systemd ({message:?}): {err}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn received(socket: &UnixDatagram) -> Vec<String> {
        socket.set_nonblocking(true).unwrap();
        let mut messages = Vec::new();
        let mut buffer = [0u8; 256];
        while let Ok(n) = socket.recv(&mut buffer) {
            messages.push(String::from_utf8_lossy(&buffer[..n]).into_owned());
        }
        messages
    }

    #[test]
    fn ready_pings_at_half_the_period_and_stopping() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let socket = UnixDatagram::bind(&path).unwrap();
        let mut notifier = Notifier::new(Some(path), Some(Duration::from_millis(200)));
        assert_eq!(notifier.ping_every(), Some(Duration::from_millis(100)));
        notifier.ready("leader");
        notifier.alive(); // too soon after READY: no ping
        std::thread::sleep(Duration::from_millis(120));
        notifier.alive();
        notifier.alive(); // again too soon
        notifier.stopping();
        assert_eq!(
            received(&socket),
            ["READY=1\nSTATUS=leader", "WATCHDOG=1", "STOPPING=1"]
        );
    }

    #[test]
    fn without_a_socket_nothing_happens_and_there_is_no_watchdog() {
        let mut notifier = Notifier::new(None, Some(Duration::from_secs(10)));
        assert_eq!(notifier.ping_every(), None);
        notifier.ready("x");
        notifier.alive();
    }

    #[test]
    fn an_abstract_socket_is_reached() {
        let name = format!("mainstay-notify-test-{}", std::process::id());
        use std::os::linux::net::SocketAddrExt;
        let address = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let socket = UnixDatagram::bind_addr(&address).unwrap();
        let mut notifier = Notifier::new(Some(PathBuf::from(format!("@{name}"))), None);
        notifier.ready("replica");
        assert_eq!(received(&socket), ["READY=1\nSTATUS=replica"]);
    }
}
