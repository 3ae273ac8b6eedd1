//! What a receiver must do to match its source, from the two manifests:
//! pure, no disk.
//!
//! The rule that matters: an entry the receiver has and the source does
//! not is **moved aside** (into a dated folder beside the tree), never
//! deleted, unless the source saw that very path deleted while this
//! receiver was following it (`deleted_at_source`). A node that rejoins
//! after a crash may hold files written after the last replication;
//! whether they matter is for a person to decide, not for the sender.
//! For the same reason a receiver's file whose bytes differ from the
//! source's is moved aside before the source's version is written, unless
//! its bytes are known to exist on another node (`elsewhere`: a replica of
//! an earlier version, not something only this node has).

use crate::manifest::{Kind, Manifest};
use std::collections::{BTreeSet, HashMap};

/// The steps, in the order a receiver applies them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Files and links only on the receiver, kept in the dated folder.
    pub move_aside: Vec<String>,
    /// Files and links the source deleted while the receiver followed it.
    pub delete: Vec<String>,
    /// Directories to remove once emptied by the steps above (deepest
    /// first); one still holding something stays.
    pub remove_dirs: Vec<String>,
    /// Directories to create (parents first).
    pub make_dirs: Vec<String>,
    /// Files whose bytes differ or that are missing.
    pub send: Vec<String>,
    /// Symbolic links to create (or replace).
    pub links: Vec<String>,
    /// Same content, other mode, owner or mtime; directories last, since
    /// writing into a directory changes its mtime.
    pub fix_metadata: Vec<String>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        *self == Plan::default()
    }
}

/// `pending`: paths the source has but does not offer yet (being written):
/// whatever the receiver holds there stays as it is for now.
/// `elsewhere`: path -> content hash known to be on another node.
pub fn plan(
    source: &Manifest,
    receiver: &Manifest,
    deleted_at_source: &BTreeSet<String>,
    pending: &BTreeSet<String>,
    elsewhere: &HashMap<String, String>,
) -> Plan {
    let mut plan = Plan::default();
    // What the receiver has that must go: paths the source lacks, and
    // paths whose kind changed (a directory that became a file...).
    let mut leaving_dirs = Vec::new();
    for (path, mine) in receiver {
        if pending.contains(path) {
            continue;
        }
        let replaced = match source.get(path) {
            None => true,
            Some(theirs) => {
                std::mem::discriminant(&theirs.kind) != std::mem::discriminant(&mine.kind)
            }
        };
        // Everything under a directory that goes is visited on its own.
        if !replaced {
            continue;
        }
        match mine.kind {
            Kind::Dir => leaving_dirs.push(path.clone()),
            _ if source.get(path).is_none() && deleted_at_source.contains(path) => {
                plan.delete.push(path.clone())
            }
            _ => plan.move_aside.push(path.clone()),
        }
    }
    leaving_dirs.reverse();
    plan.remove_dirs = leaving_dirs;
    let mut dirs_to_fix = Vec::new();
    for (path, theirs) in source {
        let mine = receiver
            .get(path)
            .filter(|m| std::mem::discriminant(&m.kind) == std::mem::discriminant(&theirs.kind));
        match (&theirs.kind, mine) {
            (Kind::Dir, None) => {
                plan.make_dirs.push(path.clone());
                dirs_to_fix.push(path.clone());
            }
            (Kind::Dir, Some(mine)) if !mine.same_metadata(theirs) => {
                dirs_to_fix.push(path.clone())
            }
            (Kind::File { .. }, Some(mine)) | (Kind::Symlink { .. }, Some(mine))
                if mine.same_content(theirs) =>
            {
                if !mine.same_metadata(theirs) {
                    plan.fix_metadata.push(path.clone());
                }
            }
            (Kind::File { .. }, Some(mine)) => {
                let only_here = match &mine.kind {
                    Kind::File { hash, .. } => elsewhere.get(path) != Some(hash),
                    _ => false,
                };
                if only_here {
                    plan.move_aside.push(path.clone());
                }
                plan.send.push(path.clone())
            }
            (Kind::File { .. }, None) => plan.send.push(path.clone()),
            (Kind::Symlink { .. }, _) => plan.links.push(path.clone()),
            (Kind::Dir, Some(_)) => {}
        }
    }
    plan.fix_metadata.extend(dirs_to_fix);
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::Entry;

    fn file(content: &str) -> Entry {
        Entry {
            kind: Kind::File {
                size: content.len() as u64,
                hash: content.into(),
            },
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime_ns: 1,
        }
    }

    fn dir() -> Entry {
        Entry {
            kind: Kind::Dir,
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime_ns: 1,
        }
    }

    fn link(target: &str) -> Entry {
        Entry {
            kind: Kind::Symlink {
                target: target.into(),
            },
            ..file("")
        }
    }

    fn tree(entries: &[(&str, Entry)]) -> Manifest {
        entries
            .iter()
            .map(|(p, e)| (p.to_string(), e.clone()))
            .collect()
    }

    fn none() -> BTreeSet<String> {
        BTreeSet::new()
    }

    #[test]
    fn identical_trees_need_nothing() {
        let t = tree(&[("a", dir()), ("a/b", file("x")), ("l", link("a/b"))]);
        assert!(plan(&t, &t, &none(), &none(), &HashMap::new()).is_empty());
    }

    #[test]
    fn an_empty_receiver_gets_everything_parents_first() {
        let source = tree(&[
            ("a", dir()),
            ("a/b", dir()),
            ("a/b/c", file("xyz")),
            ("l", link("a/b/c")),
        ]);
        let p = plan(&source, &Manifest::new(), &none(), &none(), &HashMap::new());
        assert_eq!(p.make_dirs, ["a", "a/b"]);
        assert_eq!(p.send, ["a/b/c"]);
        assert_eq!(p.links, ["l"]);
        assert_eq!(p.fix_metadata, ["a", "a/b"]);
        assert!(p.move_aside.is_empty() && p.delete.is_empty());
    }

    #[test]
    fn only_changed_files_are_sent_and_metadata_alone_is_fixed_in_place() {
        let mut changed = file("new");
        changed.mtime_ns = 2;
        let mut chmodded = file("same");
        chmodded.mode = 0o600;
        let source = tree(&[("c", changed), ("m", chmodded), ("u", file("u"))]);
        let receiver = tree(&[("c", file("old")), ("m", file("same")), ("u", file("u"))]);
        // "old" is a replica of an earlier version: replaced in place.
        let elsewhere = [("c".to_string(), "old".to_string())].into();
        let p = plan(&source, &receiver, &none(), &none(), &elsewhere);
        assert_eq!(p.send, ["c"]);
        assert!(p.move_aside.is_empty());
        assert_eq!(p.fix_metadata, ["m"]);
    }

    #[test]
    fn a_version_only_the_receiver_has_is_moved_aside_before_it_is_replaced() {
        // Written on the old leader after the last replication, or on a
        // replica by hand: no other node has those bytes.
        let source = tree(&[("c", file("new"))]);
        let receiver = tree(&[("c", file("edited here"))]);
        let elsewhere = [("c".to_string(), "what was replicated".to_string())].into();
        let p = plan(&source, &receiver, &none(), &none(), &elsewhere);
        assert_eq!(p.move_aside, ["c"]);
        assert_eq!(p.send, ["c"]);
    }

    #[test]
    fn files_only_on_the_receiver_are_moved_aside_unless_the_source_deleted_them() {
        let source = tree(&[("keep", file("k"))]);
        let receiver = tree(&[
            ("keep", file("k")),
            ("written-after-the-crash", file("w")),
            ("deleted-on-the-leader", file("d")),
            ("old", dir()),
            ("old/inside", file("i")),
        ]);
        let deleted = ["deleted-on-the-leader".to_string()].into();
        let p = plan(&source, &receiver, &deleted, &none(), &HashMap::new());
        assert_eq!(p.move_aside, ["old/inside", "written-after-the-crash"]);
        assert_eq!(p.delete, ["deleted-on-the-leader"]);
        assert_eq!(p.remove_dirs, ["old"]);
        // Without the source's word, nothing is ever deleted.
        let p = plan(&source, &receiver, &none(), &none(), &HashMap::new());
        assert!(p.delete.is_empty());
        assert_eq!(p.move_aside.len(), 3);
    }

    #[test]
    fn a_changed_kind_replaces_the_entry() {
        // A directory became a file, a file became a directory.
        let source = tree(&[("x", file("now a file")), ("y", dir()), ("y/z", file("z"))]);
        let receiver = tree(&[
            ("x", dir()),
            ("x/old", file("o")),
            ("y", file("was a file")),
        ]);
        let p = plan(&source, &receiver, &none(), &none(), &HashMap::new());
        assert_eq!(p.move_aside, ["x/old", "y"]);
        assert_eq!(p.remove_dirs, ["x"]);
        assert_eq!(p.make_dirs, ["y"]);
        assert_eq!(p.send, ["x", "y/z"]);
    }

    #[test]
    fn deepest_directories_go_first() {
        let receiver = tree(&[("a", dir()), ("a/b", dir()), ("a/b/c", dir())]);
        let p = plan(
            &Manifest::new(),
            &receiver,
            &none(),
            &none(),
            &HashMap::new(),
        );
        assert_eq!(p.remove_dirs, ["a/b/c", "a/b", "a"]);
    }

    #[test]
    fn a_file_the_source_is_still_writing_is_left_alone() {
        // Right after a failover the new source offers nothing it has not
        // seen settle: the receiver's copy of such a path is not "only on
        // the receiver".
        let receiver = tree(&[("upload", file("old"))]);
        let pending: BTreeSet<String> = ["upload".to_string()].into();
        let p = plan(
            &Manifest::new(),
            &receiver,
            &none(),
            &pending,
            &HashMap::new(),
        );
        assert!(p.is_empty(), "{p:?}");
    }
}
