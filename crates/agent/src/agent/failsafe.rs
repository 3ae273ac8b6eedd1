//! Failsafe mode from the leader's side: whom to ask for confirmation when
//! etcd does not answer, and the asking.

use super::*;

impl<D: Dcs> Agent<D> {
    /// Failsafe mode (Patroni's idea): while this node leads, tell the lease
    /// keeper which members to ask for confirmation if renewals start to
    /// fail. Only a view from the DCS changes this; without one the last
    /// list stands.
    pub(super) fn update_failsafe_peers(&self, view: &ClusterView, local: &LocalPg) {
        let lease = self.lease.borrow().id;
        let leading = view
            .leader
            .as_ref()
            .is_some_and(|l| l.name == self.name && Some(l.lease_id) == lease);
        // Exactly the members recorded in the failsafe key: a member outside
        // it cannot run for leader, and one on it is asked. Without a key
        // naming this leader there is no promise to ask for.
        let recorded = view
            .failsafe
            .as_ref()
            .and_then(|r| r.state.as_ref().ok())
            .filter(|f| f.leader == self.name);
        let peers = (self.dynamic.failsafe_mode && leading && local.accepts_writes())
            .then_some(recorded)
            .flatten()
            .map(|recorded| FailsafePeers {
                lease: lease.unwrap_or_default(),
                members: recorded
                    .members
                    .iter()
                    .filter(|(name, _)| **name != self.name)
                    .map(|(name, url)| (name.clone(), url.clone()))
                    .collect(),
            });
        *poison::lock(&self.failsafe_peers) = peers;
    }

    /// Before the failsafe list is written: from now on the lease keeper asks
    /// its new members too, whether or not the write lands (an answer that
    /// never came could still have been applied). A member is dropped from
    /// the keeper's list only once a view shows it off the key.
    pub(super) fn widen_failsafe_peers(&self, written: &mainstay_core::FailsafeState) {
        let lease = self.lease.borrow().id.unwrap_or_default();
        let mut peers = poison::lock(&self.failsafe_peers);
        let current = peers.get_or_insert_with(|| FailsafePeers {
            lease,
            members: Vec::new(),
        });
        for (name, url) in &written.members {
            if *name != self.name && !current.members.iter().any(|(n, _)| n == name) {
                current.members.push((name.clone(), url.clone()));
            }
        }
    }
}

/// Whom a leader in failsafe mode asks, and how.
#[derive(Clone, Debug)]
pub(super) struct FailsafePeers {
    /// The lease the leader key was on when the list was made.
    pub(super) lease: i64,
    /// (name, API URL) of every other member.
    pub(super) members: Vec<(String, String)>,
}

pub(super) struct Failsafe {
    pub(super) peers: Arc<std::sync::Mutex<Option<FailsafePeers>>>,
    pub(super) auth: ApiAuth,
    pub(super) ca_file: Option<std::path::PathBuf>,
}

impl Failsafe {
    /// The members on the list now, if there is one for this lease.
    pub(super) fn current(&self, lease: Option<i64>) -> Option<std::collections::BTreeSet<String>> {
        let peers = poison::lock(&self.peers);
        peers
            .as_ref()
            .filter(|p| Some(p.lease) == lease)
            .map(|p| p.members.iter().map(|(name, _)| name.clone()).collect())
    }

    /// Asks every member to confirm this leader (concurrently, each within
    /// `timeout`); the members asked, only if all of them confirmed. A list
    /// with nobody else on it confirms nothing: a member that joins later
    /// was never asked.
    pub(super) async fn confirmed(
        &self,
        name: &str,
        lease: Option<i64>,
        timeout: Duration,
    ) -> Option<std::collections::BTreeSet<String>> {
        let peers = poison::lock(&self.peers).clone();
        let peers = peers.filter(|p| Some(p.lease) == lease && !p.members.is_empty())?;
        let body = serde_json::json!({ "leader": name });
        let handles: Vec<_> = peers
            .members
            .iter()
            .map(|(member, url)| {
                let client = self.auth.peer_client(url, timeout, &self.ca_file);
                let (body, member) = (body.clone(), member.clone());
                tokio::spawn(async move {
                    let answer = client
                        .request(hyper::Method::POST, "/failsafe", Some(&body))
                        .await;
                    (member, answer.is_ok_and(|a| a.status.is_success()))
                })
            })
            .collect();
        let mut refused = Vec::new();
        for handle in handles {
            match handle.await {
                Ok((_, true)) => {}
                Ok((member, false)) => refused.push(member),
                Err(_) => refused.push("?".into()),
            }
        }
        if !refused.is_empty() {
            warn!(
                ?refused,
                "failsafe: not every member confirmed this leader: it stops at its lease deadline"
            );
        }
        refused
            .is_empty()
            .then(|| peers.members.into_iter().map(|(name, _)| name).collect())
    }
}
