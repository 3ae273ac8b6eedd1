//! Synchronous mode: which standbys hold every acknowledged commit, and how
//! the leader changes that set without ever claiming more than is true.
//!
//! The leader sets `synchronous_standby_names = 'ANY n ("a", "b")'` over
//! exactly n names, so PostgreSQL acknowledges a commit only once every
//! listed standby has flushed it. The DCS `sync` key lists the members that
//! are guaranteed to have every acknowledged commit. The safe order:
//! - to remove a standby: first from `sync`, then from the names;
//! - to add one: first to the names, then, once PostgreSQL lists it as
//!   synchronous and it has flushed past the primary's position taken after
//!   the names changed (a turn later, so every WAL sender uses the new list),
//!   to `sync`.
//!
//! So every member of `sync` is always in the names, and has every commit
//! acknowledged since it joined them as well as every one before.

use crate::action::Action;
pub use crate::observation::Standby;
use crate::observation::{LocalPg, Observation};
use crate::types::{ClusterView, Lsn};

/// The `synchronous_standby_names` value for `names`; `block` (strict mode
/// without any standby) makes every commit wait for a standby to appear.
pub fn render_standby_names(names: &[String], block: bool) -> String {
    if names.is_empty() {
        return if block { "*".into() } else { String::new() };
    }
    let quoted: Vec<String> = names
        .iter()
        .map(|n| format!("\"{}\"", n.replace('"', "\"\"")))
        .collect();
    format!("ANY {} ({})", names.len(), quoted.join(", "))
}

/// Whether `me` may take over in synchronous mode: it was the leader that
/// last wrote `sync` (it has all of its own commits) or a member of it. With
/// no `sync` key at all no leader has managed synchronous replication yet,
/// so no guarantee was ever given and the usual election applies; an
/// unreadable key allows nobody.
pub fn may_take_over(view: &ClusterView, me: &str) -> bool {
    match view.sync.as_ref().map(|r| &r.state) {
        None => true,
        Some(Ok(state)) => state.leader == me || state.members.iter().any(|m| m == me),
        Some(Err(_)) => false,
    }
}

/// The members that may take over in synchronous mode, for messages.
pub fn allowed(view: &ClusterView) -> Vec<String> {
    match view.sync.as_ref().map(|r| &r.state) {
        Some(Ok(state)) => {
            let mut all = state.members.clone();
            if !all.contains(&state.leader) {
                all.push(state.leader.clone());
            }
            all
        }
        _ => Vec::new(),
    }
}

/// The leader's next step in managing the synchronous set, if any.
/// `catchup` is the core's memory: the names in effect and the primary's
/// position recorded the first turn they were seen in effect.
pub fn manage(
    catchup: &mut Option<(Vec<String>, Lsn)>,
    obs: &Observation<'_>,
    view: &ClusterView,
) -> Option<Action> {
    let me = obs.name;
    let pg: &LocalPg = obs.pg;
    let config = obs.config;
    let record = view.sync.as_ref();
    let revision = record.map_or(0, |r| r.mod_revision);
    let ours = record.is_some_and(|r| matches!(&r.state, Ok(s) if s.leader == me));
    let current: Vec<String> = record
        .map(|r| r.members_for(me).to_vec())
        .unwrap_or_default();
    if !config.synchronous_mode {
        *catchup = None;
        if record.is_some() && (!ours || !current.is_empty()) {
            return Some(Action::WriteSync {
                members: Vec::new(),
                expected_revision: revision,
            });
        }
        if !pg.sync_standby_names.is_empty() {
            return Some(Action::SetSyncStandbys {
                names: Vec::new(),
                block: false,
            });
        }
        return None;
    }
    let healthy: Vec<&Standby> = pg
        .standbys
        .iter()
        .filter(|s| s.streaming && s.name != me)
        .filter(|s| {
            view.members
                .get(&s.name)
                .is_some_and(|m| !m.status.tags.nosync)
        })
        .collect();
    let wanted = config.synchronous_node_count.max(1) as usize;
    // Keep the standbys already guaranteed, then the most advanced others.
    let mut desired: Vec<String> = current
        .iter()
        .filter(|n| healthy.iter().any(|s| &s.name == *n))
        .take(wanted)
        .cloned()
        .collect();
    let mut others: Vec<&Standby> = healthy
        .iter()
        .filter(|s| !desired.contains(&s.name))
        .copied()
        .collect();
    others.sort_by(|a, b| b.flush.cmp(&a.flush).then_with(|| a.name.cmp(&b.name)));
    for standby in others {
        if desired.len() >= wanted {
            break;
        }
        desired.push(standby.name.clone());
    }
    desired.sort();

    // 1. Removals first, and the key must name this leader.
    let kept: Vec<String> = current
        .iter()
        .filter(|n| desired.contains(n))
        .cloned()
        .collect();
    if !ours || kept.len() != current.len() {
        return Some(Action::WriteSync {
            members: kept,
            expected_revision: revision,
        });
    }
    // 2. The names PostgreSQL waits for.
    let block = config.synchronous_mode_strict && desired.is_empty();
    if pg.sync_standby_names != render_standby_names(&desired, block) {
        *catchup = None;
        return Some(Action::SetSyncStandbys {
            names: desired,
            block,
        });
    }
    // 3. Additions, once caught up past a position taken with the names in
    // effect.
    let missing: Vec<&String> = desired.iter().filter(|n| !current.contains(n)).collect();
    if missing.is_empty() {
        return None;
    }
    let since = match catchup {
        Some((names, lsn)) if *names == desired => *lsn,
        _ => {
            *catchup = Some((desired.clone(), pg.lsn));
            return None;
        }
    };
    let ready: Vec<String> = missing
        .into_iter()
        .filter(|n| {
            healthy.iter().any(|s| {
                &s.name == *n
                    && s.flush >= since
                    && matches!(s.sync_state.as_str(), "sync" | "quorum")
            })
        })
        .cloned()
        .collect();
    if ready.is_empty() {
        return None;
    }
    let mut members = current;
    members.extend(ready);
    members.sort();
    Some(Action::WriteSync {
        members,
        expected_revision: revision,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_render_as_any_n_over_exactly_n() {
        assert_eq!(render_standby_names(&[], false), "");
        assert_eq!(render_standby_names(&[], true), "*");
        assert_eq!(
            render_standby_names(&["a".into(), "b\"c".into()], false),
            "ANY 2 (\"a\", \"b\"\"c\")"
        );
    }
}
