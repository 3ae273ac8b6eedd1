//! The first leader on data registered after mainstay's keys were lost, or
//! taken over from another manager (Patroni): see
//! [`crate::InitializeRecord::awaiting_first_leader`]. Until a leader ran
//! on that data, nothing in the DCS says which standby holds every commit
//! (the `sync` key went with the others), so an operator's failover must
//! at least name a member no other member is ahead of.

use crate::types::ClusterView;

/// Why `candidate` must not be named first leader of a registered cluster;
/// `None` once a leader ran, or when no member reports a later position.
pub fn candidate_behind(view: &ClusterView, candidate: &str) -> Option<String> {
    if !view
        .initialize
        .as_ref()
        .is_some_and(|init| init.awaiting_first_leader)
    {
        return None;
    }
    let position = |name: &str| {
        let status = &view.members.get(name)?.status;
        Some((
            status.timeline.max(status.data_timeline),
            status.received_lsn.max(status.replayed_lsn),
        ))
    };
    let mine = position(candidate)?;
    let (name, (timeline, lsn)) = view
        .members
        .keys()
        .filter(|name| name.as_str() != candidate)
        .filter_map(|name| Some((name, position(name)?)))
        .filter(|(_, other)| *other > mine)
        .max_by_key(|(_, other)| *other)?;
    Some(format!(
        "the cluster was registered from existing data and has not had a leader since: \
         {candidate} (timeline {}, {}) is behind {name} (timeline {timeline}, {lsn}), which \
         may hold commits {candidate} lacks; name {name} instead",
        mine.0, mine.1
    ))
}
