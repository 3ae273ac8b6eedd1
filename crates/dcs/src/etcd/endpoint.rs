//! Requests to one etcd member, chosen by its client URL, instead of
//! whichever member the agent's client uses: what that member itself
//! believes about its cluster (etcd serves its member list locally, so it
//! answers without a quorum), and the membership changes a member removed
//! from its cluster needs to join it again (`recover-alone`).

use super::EtcdDcs;
use super::errors::map_err;
use crate::{DcsError, DcsMember, EndpointView, Result};
use etcd_client::{Client, Member, MemberAddOptions};

impl EtcdDcs {
    /// A client of the member at `client_url` only, without the
    /// require-leader flag (a member without quorum still answers), and
    /// with the credentials only when `login` (etcd checks them through
    /// its quorum).
    async fn client_at(&self, client_url: &str, login: bool) -> Result<Client> {
        let options = if login {
            &self.inner.options
        } else {
            &self.inner.anonymous
        };
        let options = options.clone().with_require_leader(false);
        let connect = Client::connect([client_url], Some(options));
        match tokio::time::timeout(self.inner.request_timeout, connect).await {
            Err(_) => Err(DcsError::Timeout),
            Ok(result) => result.map_err(|e| map_err(e, client_url)),
        }
    }

    /// Runs one request on the member at `client_url`, bounded by the
    /// request timeout.
    async fn at<T, F, Fut>(&self, client_url: &str, login: bool, request: F) -> Result<T>
    where
        F: FnOnce(Client) -> Fut,
        Fut: Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        let client = self.client_at(client_url, login).await?;
        match tokio::time::timeout(self.inner.request_timeout, request(client)).await {
            Err(_) => Err(DcsError::Timeout),
            Ok(result) => result.map_err(|e| map_err(e, client_url)),
        }
    }

    /// What the member at `client_url` believes its cluster is.
    pub async fn view_at(&self, client_url: &str) -> Result<EndpointView> {
        let (answer, status) = self
            .at(client_url, false, |mut client| async move {
                let members = client.member_list().await?;
                // Answers without a leader too (the require-leader flag is off).
                let status = client.status().await?;
                Ok((members, status))
            })
            .await?;
        let header = answer
            .header()
            .ok_or_else(|| DcsError::Other(format!("{client_url} sent no response header")))?;
        Ok(EndpointView {
            cluster_id: header.cluster_id(),
            member_id: header.member_id(),
            leader: status.leader(),
            members: answer.members().iter().map(unprobed).collect(),
        })
    }

    /// Whether the member at `client_url` answers a status request.
    pub async fn answers_at(&self, client_url: &str) -> bool {
        self.at(client_url, false, |mut client| async move {
            client.status().await
        })
        .await
        .is_ok()
    }

    /// Adds a learner at `peer_url` through the member at `client_url`: a
    /// member that does not count in the quorum until it is promoted, so
    /// that a cluster of one keeps its quorum while the new member starts.
    /// Returns the new member's id and the membership with it.
    pub async fn add_learner_at(
        &self,
        client_url: &str,
        peer_url: &str,
    ) -> Result<(u64, Vec<DcsMember>)> {
        let url = peer_url.to_string();
        let answer = self
            .at(client_url, true, |mut client| async move {
                client
                    .member_add([url], Some(MemberAddOptions::new().with_is_learner()))
                    .await
            })
            .await?;
        let id = answer
            .member()
            .map(Member::id)
            .ok_or_else(|| DcsError::Other(format!("{client_url} did not name the new member")))?;
        Ok((id, answer.member_list().iter().map(unprobed).collect()))
    }

    /// Makes the learner `id` a voting member, through the member at
    /// `client_url`. etcd refuses while the learner is behind its leader.
    pub async fn promote_at(&self, client_url: &str, id: u64) -> Result<()> {
        self.at(client_url, true, |mut client| async move {
            client.member_promote(id).await
        })
        .await
        .map(|_| ())
    }
}

impl EtcdDcs {
    /// The `recoveries` key as the member at `client_url` reads it (with
    /// its quorum): the evidence that a node was removed by
    /// `recover-alone`, not retired by an operator.
    pub async fn recoveries_at(
        &self,
        client_url: &str,
    ) -> Result<Vec<mainstay_core::RecoveryRecord>> {
        let key = self.key(crate::keys::RECOVERIES);
        let answer = self
            .at(client_url, true, |mut client| async move {
                client.get(key, None).await
            })
            .await?;
        Ok(answer
            .kvs()
            .first()
            .and_then(|kv| serde_json::from_slice(kv.value()).ok())
            .unwrap_or_default())
    }
}

fn unprobed(member: &Member) -> DcsMember {
    DcsMember {
        id: format!("{:x}", member.id()),
        name: member.name().to_string(),
        peer_urls: member.peer_urls().to_vec(),
        client_urls: member.client_urls().to_vec(),
        leader: false,
        learner: member.is_learner(),
        answers: None,
    }
}
