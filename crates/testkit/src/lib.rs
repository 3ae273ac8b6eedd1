//! Test harness shared by mainstay's integration tests: free loopback ports,
//! real etcd servers that start fast, answer quickly and never outlive the
//! test that started them, and [`skip`] for a test that cannot run here.
//!
//! Everything here is synchronous on purpose: it is called from `#[test]` and
//! `#[tokio::test]` functions alike, and must not need (or nest) a runtime.

#![forbid(unsafe_code)]

pub mod crash;
mod etcd;
mod haproxy;
pub mod netns;
mod relay;
mod skip;

pub use etcd::Etcd;
pub use haproxy::{HAPROXY, Haproxy, config_head as haproxy_config_head, health_checked_servers};
pub use relay::Relay;
pub use skip::{ALLOW_SKIP_ENV, SKIP_LOG_ENV, skip, skipping_allowed};

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, TcpListener};
use std::sync::Mutex;

/// Ports handed out by [`free_port`] in this process. The kernel may give the
/// same ephemeral port twice once the probing socket is closed, and two
/// servers started by one test must not collide.
static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

/// Returns a 127.0.0.1 TCP port that was free a moment ago and that this
/// process has not handed out before.
///
/// Another process can still take it before the caller binds it; harness
/// code that starts servers retries with new ports when that happens.
pub fn free_port() -> u16 {
    for _ in 0..1000 {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .expect("cannot bind a TCP socket on 127.0.0.1: is the loopback interface up?");
        let port = listener
            .local_addr()
            .expect("a bound socket has a local address")
            .port();
        drop(listener);
        let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
        if handed_out.insert(port) {
            return port;
        }
    }
    panic!("no new free port on 127.0.0.1 after 1000 tries");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_distinct_and_bindable() {
        let ports: Vec<u16> = (0..50).map(|_| free_port()).collect();
        let distinct: BTreeSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), ports.len());
        for port in ports.iter().take(5) {
            TcpListener::bind((Ipv4Addr::LOCALHOST, *port)).unwrap();
        }
    }
}
