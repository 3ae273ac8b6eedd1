//! etcd's own membership (`mainstay ctl etcd-member`): the members with
//! whether each answers, and adding or removing one. Adding is how a
//! replaced node's new member is let in; etcd itself refuses a change
//! that would leave the cluster without a quorum of started members.

use super::EtcdDcs;
use crate::{DcsError, DcsMember, Result};
use etcd_client::{Client, Member};

impl EtcdDcs {
    pub(super) async fn members_with_health(&self) -> Result<Vec<DcsMember>> {
        let (members, leader) = self
            .call(super::Request::Idempotent, |mut client, _| async move {
                let members = client.member_list().await?.members().to_vec();
                let leader = client.status().await?.leader();
                Ok((members, leader))
            })
            .await?;
        // Polled together: one dead member costs one timeout, not one each.
        let answers =
            futures_util::future::join_all(members.iter().map(|member| self.answers(member))).await;
        Ok(members
            .iter()
            .zip(answers)
            .map(|(member, answers)| DcsMember {
                id: format!("{:x}", member.id()),
                name: member.name().to_string(),
                peer_urls: member.peer_urls().to_vec(),
                client_urls: member.client_urls().to_vec(),
                leader: member.id() == leader,
                learner: member.is_learner(),
                answers,
            })
            .collect())
    }

    /// Whether the member answers a status request within the request
    /// timeout (`None`: it has not started yet, no client URL).
    pub(super) async fn answers(&self, member: &Member) -> Option<bool> {
        let url = member.client_urls().first()?.clone();
        let options = self.inner.options.clone();
        let attempt = async move {
            let mut client = Client::connect([url], Some(options)).await.ok()?;
            client.status().await.ok()
        };
        Some(matches!(
            tokio::time::timeout(self.inner.request_timeout, attempt).await,
            Ok(Some(_))
        ))
    }

    pub(super) async fn add(&self, peer_url: &str) -> Result<Vec<DcsMember>> {
        let url = peer_url.to_string();
        self.call(super::Request::Once, |mut client, _| {
            let url = url.clone();
            async move { client.member_add([url], None).await }
        })
        .await?;
        self.members_with_health().await
    }

    pub(super) async fn remove(&self, name: &str) -> Result<()> {
        let members = self
            .call(super::Request::Idempotent, |mut client, _| async move {
                Ok(client.member_list().await?.members().to_vec())
            })
            .await?;
        let Some(member) = members.iter().find(|m| {
            m.name() == name
                || format!("{:x}", m.id()) == name
                || (m.name().is_empty() && m.peer_urls().iter().any(|u| u == name))
        }) else {
            return Err(DcsError::Other(format!(
                "etcd has no member named {name:?}: see `mainstay ctl etcd-member list`"
            )));
        };
        let id = member.id();
        self.call(super::Request::Once, |mut client, _| async move {
            client.member_remove(id).await
        })
        .await
        .map(|_| ())
        .map_err(|e| match e {
            DcsError::Conflict(why) | DcsError::Other(why) => DcsError::Other(why),
            other => other,
        })
    }
}
