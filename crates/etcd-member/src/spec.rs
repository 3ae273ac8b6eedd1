//! The member as the agent's configuration gives it, already validated
//! there, and the raft timing a lease ttl needs.

use std::path::PathBuf;
use std::time::Duration;

/// Where Debian's `etcd-server` package puts the server.
pub const DEFAULT_BINARY: &str = "/usr/bin/etcd";

/// One node's etcd member.
#[derive(Clone, Debug, PartialEq)]
pub struct MemberSpec {
    /// The member's name in etcd: the node's name.
    pub name: String,
    /// etcd's data directory. Never deleted or re-created by mainstay.
    pub data_dir: PathBuf,
    /// Where clients reach this member (listened on and advertised).
    pub client_url: String,
    /// Where the other members reach this one.
    pub peer_url: String,
    /// Every member of the cluster as it is formed, this one included:
    /// (name, peer URL). Only read when the data directory is new.
    pub initial_cluster: Vec<(String, String)>,
    pub state: ClusterState,
    /// Keeps members of two clusters from ever joining each other: the
    /// mainstay cluster's name.
    pub token: String,
    pub timing: RaftTiming,
    /// Served on whichever of the two URLs is `https://`.
    pub tls: Option<MemberTls>,
    pub binary: PathBuf,
}

/// Whether the member forms a new cluster with the others or joins one
/// that runs (after `mainstay ctl etcd-member add`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClusterState {
    New,
    Existing,
}

impl ClusterState {
    pub fn as_str(self) -> &'static str {
        match self {
            ClusterState::New => "new",
            ClusterState::Existing => "existing",
        }
    }
}

/// The node's certificate (signed by the cluster's CA, valid as server and
/// client, naming the node's address), its key and that CA: the member
/// serves clients and peers with it and demands a certificate from that CA
/// of every client and peer.
#[derive(Clone, Debug, PartialEq)]
pub struct MemberTls {
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// etcd's raft heartbeat and election timeout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RaftTiming {
    pub heartbeat: Duration,
    pub election_timeout: Duration,
}

/// etcd refuses an election timeout below five heartbeats.
pub const MIN_TICKS_PER_ELECTION: u32 = 5;
/// etcd's own upper bound.
pub const MAX_ELECTION_TIMEOUT: Duration = Duration::from_secs(50);

impl RaftTiming {
    /// The timing for leases of `ttl`: an election timeout of an eighth
    /// of the ttl, between 100 ms and etcd's default of 1 s, and a
    /// heartbeat of a tenth of that.
    ///
    /// When etcd's leader dies, the agents' lease renewals fail until the
    /// others elect a new one (one to two election timeouts). The leader
    /// of the database fences itself `ttl - fencing_margin` after its last
    /// renewal, so that gap must stay well inside the ttl, or losing the
    /// etcd leader would cost the database its primary too.
    pub fn for_ttl(ttl: Duration) -> RaftTiming {
        let election_timeout = (ttl / 8).clamp(Duration::from_millis(100), Duration::from_secs(1));
        RaftTiming {
            heartbeat: election_timeout / 10,
            election_timeout,
        }
    }

    /// The shortest lease etcd grants with this timing: it silently
    /// lengthens shorter ones to 1.5 election timeouts (counted in whole
    /// heartbeats), rounded up to a second.
    pub fn min_lease_ttl(self) -> Duration {
        let heartbeat = self.heartbeat.as_millis().max(1);
        let ticks = self.election_timeout.as_millis() / heartbeat;
        let millis = (3 * ticks / 2) * heartbeat;
        Duration::from_secs(millis.div_ceil(1000) as u64)
    }

    /// What etcd would refuse or distort, as a sentence, if anything.
    pub fn problem(self, ttl: Duration) -> Option<String> {
        if self.heartbeat.is_zero() {
            return Some("the heartbeat must be at least 1 ms".into());
        }
        if self.election_timeout < self.heartbeat * MIN_TICKS_PER_ELECTION {
            return Some(format!(
                "etcd needs an election timeout of at least {MIN_TICKS_PER_ELECTION} heartbeats ({} ms here)",
                (self.heartbeat * MIN_TICKS_PER_ELECTION).as_millis()
            ));
        }
        if self.election_timeout > MAX_ELECTION_TIMEOUT {
            return Some("etcd accepts an election timeout of 50 s at most".into());
        }
        if self.min_lease_ttl() > ttl {
            return Some(format!(
                "etcd would lengthen the {} s leases to {} s (1.5 election timeouts): lower the election timeout or raise timing.ttl",
                ttl.as_secs(),
                self.min_lease_ttl().as_secs()
            ));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timing_follows_the_ttl() {
        let default = RaftTiming::for_ttl(Duration::from_secs(4));
        assert_eq!(default.election_timeout, Duration::from_millis(500));
        assert_eq!(default.heartbeat, Duration::from_millis(50));
        assert_eq!(default.min_lease_ttl(), Duration::from_secs(1));
        assert_eq!(default.problem(Duration::from_secs(4)), None);
        let fast = RaftTiming::for_ttl(Duration::from_secs(2));
        assert_eq!(fast.election_timeout, Duration::from_millis(250));
        assert_eq!(fast.problem(Duration::from_secs(2)), None);
        let slow = RaftTiming::for_ttl(Duration::from_secs(30));
        assert_eq!(slow.election_timeout, Duration::from_secs(1));
        assert_eq!(slow.heartbeat, Duration::from_millis(100));
        // etcd's defaults: leases of at least 2 s.
        assert_eq!(slow.min_lease_ttl(), Duration::from_secs(2));
    }

    #[test]
    fn what_etcd_would_refuse_is_named() {
        let ms = Duration::from_millis;
        let too_few_ticks = RaftTiming {
            heartbeat: ms(100),
            election_timeout: ms(400),
        };
        assert!(
            too_few_ticks
                .problem(Duration::from_secs(4))
                .unwrap()
                .contains("5 heartbeats")
        );
        let lengthened = RaftTiming {
            heartbeat: ms(100),
            election_timeout: ms(3000),
        };
        assert!(
            lengthened
                .problem(Duration::from_secs(4))
                .unwrap()
                .contains("5 s")
        );
        let zero = RaftTiming {
            heartbeat: ms(0),
            election_timeout: ms(500),
        };
        assert!(zero.problem(Duration::from_secs(4)).is_some());
    }
}
