//! Who should take over when the leader key is gone. Every agent computes the
//! same order from the same statuses, so only the best one tries to take the
//! key: highest timeline, then most WAL received, then priority, then name.

use crate::types::{Lsn, Tags};
use std::cmp::Ordering;

/// What the election compares about one member.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate<'a> {
    pub name: &'a str,
    pub timeline: u32,
    pub lsn: Lsn,
    pub tags: &'a Tags,
}

/// `Greater` means `a` is the better candidate. Names break ties so that the
/// order is total: the alphabetically first name wins.
pub fn compare(a: &Candidate<'_>, b: &Candidate<'_>) -> Ordering {
    a.timeline
        .cmp(&b.timeline)
        .then(a.lsn.cmp(&b.lsn))
        .then(a.tags.priority.cmp(&b.tags.priority))
        .then_with(|| b.name.cmp(a.name))
}

/// The best candidate other than `me` that beats `me`, if any.
pub fn better_than<'a>(
    me: &Candidate<'_>,
    others: &'a [Candidate<'a>],
) -> Option<&'a Candidate<'a>> {
    others
        .iter()
        .filter(|other| other.name != me.name && !other.tags.nofailover)
        .filter(|other| compare(other, me) == Ordering::Greater)
        .max_by(|a, b| compare(a, b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand<'a>(name: &'a str, timeline: u32, lsn: u64, tags: &'a Tags) -> Candidate<'a> {
        Candidate {
            name,
            timeline,
            lsn: Lsn(lsn),
            tags,
        }
    }

    #[test]
    fn order_is_timeline_then_lsn_then_priority_then_name() {
        let plain = Tags::default();
        let high = Tags {
            priority: 5,
            ..Tags::default()
        };
        assert_eq!(
            compare(&cand("a", 2, 1, &plain), &cand("b", 1, 9, &plain)),
            Ordering::Greater
        );
        assert_eq!(
            compare(&cand("a", 1, 9, &plain), &cand("b", 1, 8, &high)),
            Ordering::Greater
        );
        assert_eq!(
            compare(&cand("b", 1, 9, &high), &cand("a", 1, 9, &plain)),
            Ordering::Greater
        );
        assert_eq!(
            compare(&cand("a", 1, 9, &plain), &cand("b", 1, 9, &plain)),
            Ordering::Greater
        );
    }

    #[test]
    fn nofailover_members_never_win() {
        let plain = Tags::default();
        let never = Tags {
            nofailover: true,
            ..Tags::default()
        };
        let others = [cand("b", 1, 100, &never), cand("c", 1, 50, &plain)];
        let me = cand("a", 1, 60, &plain);
        assert_eq!(better_than(&me, &others), None);
        let me = cand("a", 1, 40, &plain);
        assert_eq!(better_than(&me, &others).map(|c| c.name), Some("c"));
    }
}
