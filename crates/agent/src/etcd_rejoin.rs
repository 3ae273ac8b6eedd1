//! A node's etcd member that `recover-alone` on the survivor removed from
//! its cluster while its server was away joins it again by itself. etcd stops such a member for good ("the
//! member has been permanently removed from the cluster") the moment it
//! reaches one that knows; the supervisor then asks [`Rejoin`], which looks
//! at what the other members say:
//!
//! - a member of this node's cluster (one of the configured members, at
//!   its configured peer URL) that has a leader and no longer lists this
//!   node, and whose cluster's `recoveries` record names this node as
//!   removed (one an operator removed with `ctl etcd-member remove` stays
//!   out): removed. The old data is moved aside (never deleted), the node
//!   is added back as a *learner* (outside the quorum, so that a survivor
//!   alone keeps its quorum whatever happens to the newcomer), etcd starts
//!   with `initial-cluster-state=existing`, and a task promotes the learner
//!   to a voting member once it has caught up;
//! - listed as a learner that never started (added by an earlier attempt
//!   that did not get further): start with the membership as it is;
//! - anything else (nobody answers, a member of another cluster answers,
//!   this node is listed as started): the member is started again as it
//!   was, with the supervisor's backoff.

use mainstay_dcs::{DcsMember, EndpointView, EtcdDcs};
use mainstay_etcd_member::{ClusterState, MemberSpec};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// How long the new member may take to catch up before it is promoted.
const PROMOTE_WITHIN: Duration = Duration::from_secs(600);
const PROMOTE_EVERY: Duration = Duration::from_secs(1);
/// Bound of the whole look at the other members.
const ASK_WITHIN: Duration = Duration::from_secs(5);

/// What the other members' answers mean for this node's member.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// Start it again as it is.
    Keep,
    /// No longer a member: add it back through `via`.
    Removed { via: String },
    /// Added back already (listed at its peer URL, not started): start it
    /// with this membership.
    Listed {
        via: String,
        id: u64,
        members: Vec<DcsMember>,
    },
}

/// Pure: `answers` are (client URL, what that member said).
pub fn verdict(spec: &MemberSpec, answers: &[(String, EndpointView)]) -> Verdict {
    for (url, view) in answers {
        let Some(speaker) = view
            .members
            .iter()
            .find(|m| m.id == format!("{:x}", view.member_id))
        else {
            continue;
        };
        // Only a member of this node's own cluster, as configured, speaks
        // for it: a stray endpoint of another cluster lists other members.
        let ours = spec.initial_cluster.iter().any(|(name, peer)| {
            *name == speaker.name && speaker.peer_urls.iter().any(|u| u == peer)
        });
        if !ours || view.leader == 0 {
            continue;
        }
        match view
            .members
            .iter()
            .find(|m| m.peer_urls.contains(&spec.peer_url))
        {
            None => return Verdict::Removed { via: url.clone() },
            Some(me) if me.name.is_empty() && me.learner => {
                let Ok(id) = u64::from_str_radix(&me.id, 16) else {
                    continue;
                };
                return Verdict::Listed {
                    via: url.clone(),
                    id,
                    members: view.members.clone(),
                };
            }
            Some(_) => return Verdict::Keep,
        }
    }
    Verdict::Keep
}

/// The spec to join `members` (this one listed, unstarted) with.
pub fn joining(spec: &MemberSpec, members: &[DcsMember]) -> MemberSpec {
    let mut joined = spec.clone();
    joined.state = ClusterState::Existing;
    joined.initial_cluster = initial_cluster(members, &spec.name, &spec.peer_url);
    joined
}

/// etcd's `initial-cluster` for a member joining `members`: (name, peer
/// URL) of each, the newcomer (listed unnamed until it starts) under its
/// name.
pub fn initial_cluster(
    members: &[DcsMember],
    newcomer: &str,
    newcomer_peer_url: &str,
) -> Vec<(String, String)> {
    members
        .iter()
        .filter_map(|m| {
            let peer = m.peer_urls.first()?.clone();
            let name = if m.peer_urls.iter().any(|u| u == newcomer_peer_url) {
                newcomer.to_string()
            } else {
                m.name.clone()
            };
            (!name.is_empty()).then_some((name, peer))
        })
        .collect()
}

/// The supervisor's hook (see the module's documentation).
pub struct Rejoin {
    runtime: tokio::runtime::Handle,
    /// Set once the agent's etcd client exists (it is made after the
    /// member starts, which may give it its quorum).
    dcs: Arc<OnceLock<EtcdDcs>>,
    /// The other members' client URLs.
    others: Vec<String>,
    /// Learners a promotion task runs for.
    promoting: std::collections::BTreeSet<u64>,
}

impl Rejoin {
    pub fn new(
        runtime: tokio::runtime::Handle,
        dcs: Arc<OnceLock<EtcdDcs>>,
        spec: &MemberSpec,
        endpoints: &[String],
    ) -> Rejoin {
        Rejoin {
            runtime,
            dcs,
            others: endpoints
                .iter()
                .filter(|url| **url != spec.client_url)
                .cloned()
                .collect(),
            promoting: Default::default(),
        }
    }

    pub fn into_hook(mut self) -> mainstay_etcd_member::AfterExit {
        Box::new(move |spec: &MemberSpec, how: &str| self.after_exit(spec, how))
    }

    fn after_exit(&mut self, spec: &MemberSpec, how: &str) -> Option<MemberSpec> {
        let dcs = self.dcs.get()?.clone();
        let others = self.others.clone();
        // Each bounded alone: one dead member must not hide the others.
        let answers = self
            .runtime
            .block_on(futures_util::future::join_all(others.iter().map(|url| {
                let dcs = dcs.clone();
                async move {
                    match tokio::time::timeout(ASK_WITHIN, dcs.view_at(url)).await {
                        Ok(Ok(view)) => Some((url.clone(), view)),
                        _ => None,
                    }
                }
            })));
        let answers: Vec<(String, EndpointView)> = answers.into_iter().flatten().collect();
        let (via, id, members) = match verdict(spec, &answers) {
            Verdict::Keep => return None,
            Verdict::Removed { via } => {
                let recoveries = self.runtime.block_on(async {
                    tokio::time::timeout(ASK_WITHIN, dcs.recoveries_at(&via)).await
                });
                let by_recovery = matches!(&recoveries, Ok(Ok(records))
                    if records.iter().any(|r| r.removed.contains(&spec.name)));
                if !by_recovery {
                    tracing::error!(
                        %via,
                        "this node's etcd member is no longer a member of its cluster, and no \
                         recover-alone removed it: it stays out (an operator's `ctl etcd-member \
                         remove`). To let it in again: `mainstay ctl etcd-member add`, then start \
                         it with an empty etcd.data_dir"
                    );
                    return None;
                }
                tracing::warn!(
                    %via, exit = how,
                    "this node's etcd member is no longer a member of its cluster (removed while \
                     its server was away, e.g. by recover-alone): adding it back as a learner"
                );
                let added = self
                    .runtime
                    .block_on(dcs.add_learner_at(&via, &spec.peer_url));
                match added {
                    Ok((id, members)) => (via, id, members),
                    Err(err) => {
                        tracing::error!(%via, "could not add this node's etcd member back: {err}");
                        return None;
                    }
                }
            }
            Verdict::Listed { via, id, members } => (via, id, members),
        };
        if let Err(err) = move_aside(&spec.data_dir) {
            tracing::error!(
                "cannot move the removed etcd member's data aside: {err}; it cannot join \
                 again until that works"
            );
            return None;
        }
        let joined = joining(spec, &members);
        tracing::warn!(initial_cluster = ?joined.initial_cluster, "etcd member joining its cluster again");
        if self.promoting.insert(id) {
            let mut endpoints = vec![via];
            endpoints.extend(self.others.iter().cloned());
            self.runtime.spawn(promote(dcs, endpoints, id));
        }
        Some(joined)
    }
}

/// Moves `data_dir` to `<data_dir>.removed-<time>`: the member's data of a
/// cluster it no longer belongs to. Kept, like every data directory.
fn move_aside(data_dir: &Path) -> std::io::Result<Option<PathBuf>> {
    if !data_dir.exists() {
        return Ok(None);
    }
    let stamp = humantime::format_rfc3339_seconds(std::time::SystemTime::now())
        .to_string()
        .replace(':', "");
    let mut aside = data_dir.as_os_str().to_owned();
    aside.push(format!(".removed-{stamp}"));
    let aside = PathBuf::from(aside);
    std::fs::rename(data_dir, &aside)?;
    tracing::warn!(
        from = %data_dir.display(), to = %aside.display(),
        "moved the removed etcd member's data aside (kept, not deleted): it joins as a new member"
    );
    Ok(Some(aside))
}

/// Promotes the learner once etcd agrees it has caught up.
async fn promote(dcs: EtcdDcs, endpoints: Vec<String>, id: u64) {
    let deadline = Instant::now() + PROMOTE_WITHIN;
    let mut last = String::new();
    while Instant::now() < deadline {
        for url in &endpoints {
            match dcs.promote_at(url, id).await {
                Ok(()) => {
                    tracing::info!(member = %format!("{id:x}"), "etcd learner promoted: this node's member votes again");
                    return;
                }
                Err(err) => last = err.to_string(),
            }
            // Promoted already (an answer lost), or added as a voter.
            if let Ok(view) = dcs.view_at(url).await
                && view
                    .members
                    .iter()
                    .any(|m| m.id == format!("{id:x}") && !m.learner)
            {
                return;
            }
        }
        tokio::time::sleep(PROMOTE_EVERY).await;
    }
    tracing::error!(
        member = %format!("{id:x}"),
        "this node's etcd member is still a learner after {} s ({last}): it does not vote; \
         promote it with etcdctl member promote",
        PROMOTE_WITHIN.as_secs()
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use mainstay_etcd_member::RaftTiming;

    fn spec() -> MemberSpec {
        MemberSpec {
            name: "b".into(),
            data_dir: "/var/lib/mainstay/etcd".into(),
            client_url: "http://10.0.0.2:2379".into(),
            peer_url: "http://10.0.0.2:2380".into(),
            initial_cluster: vec![
                ("a".into(), "http://10.0.0.1:2380".into()),
                ("b".into(), "http://10.0.0.2:2380".into()),
                ("w".into(), "http://10.0.0.3:2380".into()),
            ],
            state: ClusterState::New,
            token: "ship".into(),
            timing: RaftTiming::for_ttl(Duration::from_secs(10)),
            tls: None,
            binary: "/usr/bin/etcd".into(),
        }
    }

    fn member(id: u64, name: &str, host: u8) -> DcsMember {
        DcsMember {
            id: format!("{id:x}"),
            name: name.into(),
            peer_urls: vec![format!("http://10.0.0.{host}:2380")],
            client_urls: vec![format!("http://10.0.0.{host}:2379")],
            leader: false,
            learner: false,
            answers: None,
        }
    }

    fn view(speaker: u64, leader: u64, members: Vec<DcsMember>) -> EndpointView {
        EndpointView {
            cluster_id: 7,
            member_id: speaker,
            leader,
            members,
        }
    }

    const A: &str = "http://10.0.0.1:2379";

    #[test]
    fn a_survivor_alone_with_a_leader_that_no_longer_lists_us_means_removed() {
        let alone = view(1, 1, vec![member(1, "a", 1)]);
        assert_eq!(
            verdict(&spec(), &[(A.into(), alone)]),
            Verdict::Removed { via: A.into() }
        );
    }

    #[test]
    fn listed_as_started_or_a_member_without_leader_changes_nothing() {
        let whole = vec![member(1, "a", 1), member(2, "b", 2), member(3, "w", 3)];
        assert_eq!(
            verdict(&spec(), &[(A.into(), view(1, 1, whole))]),
            Verdict::Keep
        );
        // A member of the old cluster, itself without quorum, proves nothing.
        let stale = view(1, 0, vec![member(1, "a", 1)]);
        assert_eq!(verdict(&spec(), &[(A.into(), stale)]), Verdict::Keep);
        assert_eq!(verdict(&spec(), &[]), Verdict::Keep);
    }

    #[test]
    fn a_member_of_another_cluster_does_not_speak_for_ours() {
        // Same name, another peer URL: not the configured member a.
        let stranger = view(9, 9, vec![member(9, "a", 9)]);
        assert_eq!(verdict(&spec(), &[(A.into(), stranger)]), Verdict::Keep);
    }

    #[test]
    fn an_unstarted_learner_at_our_peer_url_joins_with_the_membership() {
        let mut me = member(0x2b, "", 2);
        me.client_urls.clear();
        me.learner = true;
        let members = vec![member(1, "a", 1), me];
        let answer = view(1, 1, members.clone());
        let got = verdict(&spec(), &[(A.into(), answer)]);
        assert_eq!(
            got,
            Verdict::Listed {
                via: A.into(),
                id: 0x2b,
                members: members.clone()
            }
        );
        let joined = joining(&spec(), &members);
        assert_eq!(joined.state, ClusterState::Existing);
        assert_eq!(
            joined.initial_cluster,
            vec![
                ("a".to_string(), "http://10.0.0.1:2380".to_string()),
                ("b".to_string(), "http://10.0.0.2:2380".to_string())
            ]
        );
    }

    #[test]
    fn data_is_moved_aside_never_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("etcd");
        std::fs::create_dir_all(data.join("member")).unwrap();
        std::fs::write(data.join("member/keep"), b"x").unwrap();
        let aside = move_aside(&data).unwrap().unwrap();
        assert!(!data.exists());
        assert_eq!(std::fs::read(aside.join("member/keep")).unwrap(), b"x");
        assert!(aside.to_string_lossy().contains(".removed-"), "{aside:?}");
        assert_eq!(move_aside(&data).unwrap(), None);
    }
}
