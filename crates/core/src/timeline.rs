//! Timeline history and divergence. A former primary may rejoin a new leader
//! by plain streaming only if everything it wrote is also in the leader's
//! history; otherwise it needs pg_rewind. Deciding that from timeline numbers
//! alone is wrong (two nodes can promote to the same number), so this compares
//! the history files and WAL positions.

use crate::types::{HistoryEntry, Lsn};

/// One line of a PostgreSQL `.history` file: `parent_tli  switch_lsn  reason`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TimelineSwitch {
    /// The timeline that ended.
    pub timeline: u32,
    /// First position that is not part of `timeline` on this branch.
    pub switch_lsn: Lsn,
}

/// Parses a `.history` file. Comments and blank lines are skipped; a line
/// that does not parse makes the whole file unusable, because guessing here
/// could hide a divergence.
pub fn parse_history(content: &str) -> Result<Vec<TimelineSwitch>, String> {
    let mut switches = Vec::new();
    for (index, line) in content.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.split_whitespace();
        let timeline = fields.next().and_then(|f| f.parse::<u32>().ok());
        let lsn = fields.next().and_then(Lsn::parse);
        match (timeline, lsn) {
            (Some(timeline), Some(switch_lsn)) => switches.push(TimelineSwitch {
                timeline,
                switch_lsn,
            }),
            _ => {
                return Err(format!(
                    "line {}: expected `<timeline> <X/Y> <reason>`, got {line:?}",
                    index + 1
                ));
            }
        }
    }
    Ok(switches)
}

/// Where the local data directory stands, read from `pg_controldata` after a
/// clean shutdown (crash recovery completed first).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalWal {
    pub timeline: u32,
    /// The exclusive end of this node's WAL on `timeline`: for a running
    /// replica the received or replayed end, for a stopped standby its
    /// minimum recovery end, for a former primary one past the start of its
    /// shutdown checkpoint record (the record is local WAL too).
    pub end_lsn: Lsn,
    /// The node's own history (switches before `timeline`).
    pub history: Vec<TimelineSwitch>,
}

/// What the leader reports about its WAL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaderWal {
    pub timeline: u32,
    pub flush_lsn: Lsn,
    pub history: Vec<TimelineSwitch>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Divergence {
    /// The local WAL is a prefix of the leader's: streaming is enough.
    None,
    /// The local node wrote WAL the leader does not have.
    Diverged { reason: String },
}

/// Decides whether a node must be rewound before it can follow `leader`.
pub fn divergence(local: &LocalWal, leader: &LeaderWal) -> Divergence {
    let diverged = |reason: String| Divergence::Diverged { reason };
    // The two histories must agree on every timeline before the local one.
    for own in &local.history {
        match leader.history.iter().find(|s| s.timeline == own.timeline) {
            Some(theirs) if theirs.switch_lsn == own.switch_lsn => {}
            Some(theirs) => {
                return diverged(format!(
                    "timeline {} ended at {} locally but at {} on the leader",
                    own.timeline, own.switch_lsn, theirs.switch_lsn
                ));
            }
            None => {
                return diverged(format!(
                    "local timeline {} is not in the leader's history",
                    own.timeline
                ));
            }
        }
    }
    if local.timeline == leader.timeline {
        if local.end_lsn > leader.flush_lsn {
            return diverged(format!(
                "same timeline {} but local WAL ends at {}, past the leader's {}",
                local.timeline, local.end_lsn, leader.flush_lsn
            ));
        }
        return Divergence::None;
    }
    if local.timeline > leader.timeline {
        return diverged(format!(
            "local timeline {} is newer than the leader's {}",
            local.timeline, leader.timeline
        ));
    }
    match leader.history.iter().find(|s| s.timeline == local.timeline) {
        None => diverged(format!(
            "local timeline {} is not an ancestor of the leader's timeline {}",
            local.timeline, leader.timeline
        )),
        Some(switch) if local.end_lsn > switch.switch_lsn => diverged(format!(
            "local WAL ends at {} on timeline {}, past the leader's switch point {}",
            local.end_lsn, local.timeline, switch.switch_lsn
        )),
        Some(_) => Divergence::None,
    }
}

/// Two nodes can create the same timeline number from the same switch point
/// when the second never saw the first's history file (two failovers in
/// quick succession). Their history files are then identical, so neither
/// [`divergence`] nor pg_rewind can see that their WAL on that timeline
/// differs. Each promoter records its claim twice before promoting: in its
/// data directory (`claim`: timeline, node) and, while it holds the leader
/// key, in the DCS history. If this data directory created `local_timeline`
/// but the cluster's history gives that timeline to another node, the local
/// WAL on it is not the leader's: the node needs a fresh clone.
pub fn foreign_timeline(
    me: &str,
    claim: Option<(u32, &str)>,
    local_timeline: u32,
    leader: &LeaderWal,
    history: &[HistoryEntry],
) -> Option<String> {
    let (claimed, by) = claim?;
    if claimed != local_timeline || by != me {
        return None;
    }
    let leader_has_it = leader.timeline == local_timeline
        || leader.history.iter().any(|s| s.timeline == local_timeline);
    if !leader_has_it {
        return None;
    }
    let owner = history
        .iter()
        .rev()
        .find(|e| e.timeline == local_timeline)?;
    (owner.new_leader != me).then(|| {
        format!(
            "this node created timeline {local_timeline}, but the cluster's timeline \
             {local_timeline} was created by {}: same number, different WAL",
            owner.new_leader
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lsn(text: &str) -> Lsn {
        Lsn::parse(text).unwrap()
    }
    fn switch(timeline: u32, at: &str) -> TimelineSwitch {
        TimelineSwitch {
            timeline,
            switch_lsn: lsn(at),
        }
    }
    fn check(
        local: (u32, &str, Vec<TimelineSwitch>),
        leader: (u32, &str, Vec<TimelineSwitch>),
        expect_diverged: bool,
    ) {
        let local = LocalWal {
            timeline: local.0,
            end_lsn: lsn(local.1),
            history: local.2,
        };
        let leader = LeaderWal {
            timeline: leader.0,
            flush_lsn: lsn(leader.1),
            history: leader.2,
        };
        let result = divergence(&local, &leader);
        assert_eq!(
            matches!(result, Divergence::Diverged { .. }),
            expect_diverged,
            "{result:?}"
        );
    }

    #[test]
    fn parses_postgres_history_files() {
        let content = "1\t0/3000148\tno recovery target specified\n\n2\t0/5000000\tno recovery target specified\n";
        assert_eq!(
            parse_history(content).unwrap(),
            vec![switch(1, "0/3000148"), switch(2, "0/5000000")]
        );
        assert!(parse_history("1 nonsense").is_err());
        assert_eq!(parse_history("").unwrap(), vec![]);
    }

    #[test]
    fn former_primary_that_stopped_at_the_switch_point_just_follows() {
        check(
            (1, "0/3000148", vec![]),
            (2, "0/4000000", vec![switch(1, "0/3000148")]),
            false,
        );
        // Its shutdown checkpoint starts at the switch point: the leader
        // never received that record.
        check(
            (1, "0/3000149", vec![]),
            (2, "0/4000000", vec![switch(1, "0/3000148")]),
            true,
        );
        check(
            (1, "0/3000000", vec![]),
            (2, "0/4000000", vec![switch(1, "0/3000148")]),
            false,
        );
    }

    #[test]
    fn former_primary_with_writes_past_the_switch_point_needs_rewind() {
        check(
            (1, "0/3000200", vec![]),
            (2, "0/4000000", vec![switch(1, "0/3000148")]),
            true,
        );
    }

    #[test]
    fn same_timeline_number_on_another_branch_is_divergence() {
        // Both nodes promoted to timeline 2 from different points.
        check(
            (2, "0/3500000", vec![switch(1, "0/3000100")]),
            (2, "0/4000000", vec![switch(1, "0/3000148")]),
            true,
        );
        // Same branch, behind: fine.
        check(
            (2, "0/3500000", vec![switch(1, "0/3000148")]),
            (2, "0/4000000", vec![switch(1, "0/3000148")]),
            false,
        );
        // Same branch, ahead of the leader: diverged.
        check(
            (2, "0/4500000", vec![switch(1, "0/3000148")]),
            (2, "0/4000000", vec![switch(1, "0/3000148")]),
            true,
        );
    }

    #[test]
    fn a_timeline_number_created_twice_is_foreign_to_the_node_that_lost() {
        let entry = |timeline: u32, by: &str| HistoryEntry {
            timeline,
            switch_lsn: lsn("0/3000148"),
            reason: String::new(),
            new_leader: by.into(),
            at: String::new(),
        };
        let leader = LeaderWal {
            timeline: 2,
            flush_lsn: lsn("0/4000000"),
            history: vec![switch(1, "0/3000148")],
        };
        let history = [entry(2, "a"), entry(2, "b")];
        assert!(foreign_timeline("a", Some((2, "a")), 2, &leader, &history).is_some());
        // The winner, a clone of the winner, a node without a claim.
        assert!(foreign_timeline("b", Some((2, "b")), 2, &leader, &history).is_none());
        assert!(foreign_timeline("a", Some((2, "b")), 2, &leader, &history).is_none());
        assert!(foreign_timeline("a", None, 2, &leader, &history).is_none());
        // a created timeline 2 and b followed it, then promoted to 3.
        let later = LeaderWal {
            timeline: 3,
            flush_lsn: lsn("0/5000000"),
            history: vec![switch(1, "0/3000148"), switch(2, "0/4000000")],
        };
        let history = [entry(2, "a"), entry(3, "b")];
        assert!(foreign_timeline("a", Some((2, "a")), 2, &later, &history).is_none());
        // a's claim without a DCS record of its own still loses to b's.
        assert!(foreign_timeline("a", Some((2, "a")), 2, &leader, &[entry(2, "b")]).is_some());
    }

    #[test]
    fn timeline_missing_from_leader_history_or_newer_is_divergence() {
        check(
            (3, "0/3000000", vec![switch(1, "0/1"), switch(2, "0/2")]),
            (2, "0/9000000", vec![switch(1, "0/1")]),
            true,
        );
        check(
            (2, "0/3000000", vec![switch(1, "0/1")]),
            (4, "0/9000000", vec![switch(1, "0/1"), switch(3, "0/5")]),
            true,
        );
    }
}
