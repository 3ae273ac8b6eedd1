//! Runs a plan on a receiver, step by step in the plan's order. A step
//! that fails (a file that changed while it was sent, an unreadable one, a
//! full disk) is reported with why and left for the next round; it never
//! stops the steps after it, and it never leaves a partial file under a
//! real name (see `apply`).

use crate::apply::Receiver;
use crate::manifest::{Entry, Manifest};
use crate::plan::Plan;
use std::io::{self, Read};

/// What one round did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    pub sent_files: u64,
    pub sent_bytes: u64,
    pub moved_aside_files: u64,
    pub moved_aside_bytes: u64,
    pub deleted: u64,
    /// Steps that failed: the path and why.
    pub failed: Vec<(String, String)>,
}

/// Applies `plan` (made against `source`) on `receiver`; `fetch` opens a
/// source file's bytes from an offset (past what a cut transfer left);
/// files moved aside go under the folder `stamp`.
pub fn execute<R: Read>(
    plan: &Plan,
    source: &Manifest,
    receiver: &Receiver,
    stamp: &str,
    mut fetch: impl FnMut(&str, &Entry, u64) -> io::Result<R>,
) -> Report {
    let mut report = Report::default();
    let fail = |report: &mut Report, path: &str, e: io::Error| {
        report.failed.push((path.to_string(), e.to_string()));
    };
    for path in &plan.move_aside {
        match receiver.move_aside(path, stamp) {
            Ok(bytes) => {
                report.moved_aside_files += 1;
                report.moved_aside_bytes += bytes;
            }
            Err(e) => fail(&mut report, path, e),
        }
    }
    for path in &plan.delete {
        match receiver.delete(path) {
            Ok(()) => report.deleted += 1,
            Err(e) => fail(&mut report, path, e),
        }
    }
    for path in &plan.remove_dirs {
        if let Err(e) = receiver.remove_dir_if_empty(path) {
            fail(&mut report, path, e);
        }
    }
    let entry = |path: &str| {
        source
            .get(path)
            .ok_or_else(|| io::Error::other("not in the source's manifest"))
    };
    for path in &plan.make_dirs {
        if let Err(e) = entry(path).and_then(|e| receiver.make_dir(path, e)) {
            fail(&mut report, path, e);
        }
    }
    for path in &plan.send {
        let sent = entry(path).and_then(|e| {
            let offset = receiver.partial(path, e);
            let body = fetch(path, e, offset)?;
            receiver.write_file(path, e, offset, body)
        });
        match sent {
            Ok(bytes) => {
                report.sent_files += 1;
                report.sent_bytes += bytes;
            }
            Err(e) => fail(&mut report, path, e),
        }
    }
    for path in &plan.links {
        if let Err(e) = entry(path).and_then(|e| receiver.make_link(path, e)) {
            fail(&mut report, path, e);
        }
    }
    for path in &plan.fix_metadata {
        if let Err(e) = entry(path).and_then(|e| receiver.set_metadata(path, e)) {
            fail(&mut report, path, e);
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::plan;
    use crate::scan::{HashCache, scan};
    use crate::spec::Excludes;
    use std::collections::{BTreeSet, HashMap};
    use std::path::Path;

    fn tree(root: &Path) -> Manifest {
        scan(root, &Excludes::none(), &mut HashCache::default())
            .unwrap()
            .manifest
    }

    /// Two trees hold the same things, by the manifest's own rules.
    fn same(a: &Manifest, b: &Manifest) -> bool {
        a.len() == b.len()
            && a.iter()
                .zip(b)
                .all(|((pa, ea), (pb, eb))| pa == pb && ea.same_content(eb) && ea.same_metadata(eb))
    }

    fn open_at(path: &Path, offset: u64) -> io::Result<std::fs::File> {
        use std::io::{Seek, SeekFrom};
        let mut file = std::fs::File::open(path)?;
        file.seek(SeekFrom::Start(offset))?;
        Ok(file)
    }

    /// Every file of `tree` as known elsewhere: a receiver whose copy is
    /// a replica of the source's earlier versions.
    fn replicated(tree: &Manifest) -> HashMap<String, String> {
        tree.iter()
            .filter_map(|(path, entry)| match &entry.kind {
                crate::Kind::File { hash, .. } => Some((path.clone(), hash.clone())),
                _ => None,
            })
            .collect()
    }

    /// One round from a local source directory.
    fn sync(source: &Path, receiver: &Receiver, deleted: &BTreeSet<String>) -> Report {
        let source_tree = tree(source);
        let receiver_tree = tree(receiver.root());
        let plan = plan(
            &source_tree,
            &receiver_tree,
            deleted,
            &BTreeSet::new(),
            &replicated(&receiver_tree),
        );
        execute(&plan, &source_tree, receiver, "stamp", |path, _, offset| {
            open_at(&source.join(path), offset)
        })
    }

    #[test]
    fn a_receiver_converges_and_a_second_round_sends_nothing() {
        let base = tempfile::tempdir().unwrap();
        let (source, copy) = (base.path().join("source"), base.path().join("copy"));
        std::fs::create_dir_all(source.join("local_content/ab")).unwrap();
        std::fs::create_dir_all(&copy).unwrap();
        std::fs::write(source.join("local_content/ab/cdef"), vec![1u8; 300_000]).unwrap();
        std::fs::write(source.join("top"), b"t").unwrap();
        std::os::unix::fs::symlink("top", source.join("alias")).unwrap();
        let receiver = Receiver::new(&copy);
        let first = sync(&source, &receiver, &BTreeSet::new());
        assert_eq!((first.sent_files, first.sent_bytes), (2, 300_001));
        assert!(first.failed.is_empty(), "{:?}", first.failed);
        assert!(same(&tree(&source), &tree(&copy)));
        let second = sync(&source, &receiver, &BTreeSet::new());
        assert_eq!(second, Report::default());
    }

    #[test]
    fn a_failback_keeps_what_only_the_old_leader_had_and_resends_only_changes() {
        let base = tempfile::tempdir().unwrap();
        let (leader, old) = (base.path().join("leader"), base.path().join("old"));
        for dir in [&leader, &old] {
            std::fs::create_dir_all(dir).unwrap();
            for i in 0..20 {
                std::fs::write(dir.join(format!("f{i}")), format!("file {i}")).unwrap();
            }
        }
        // Both had the same files; then the old leader wrote one more before
        // its crash, and the new leader changed one and wrote one.
        let receiver = Receiver::new(&old);
        sync(&leader, &receiver, &BTreeSet::new());
        std::fs::write(old.join("only-on-the-old-leader"), b"late upload").unwrap();
        std::fs::write(leader.join("f3"), b"changed on the new leader").unwrap();
        std::fs::write(leader.join("new"), b"new upload").unwrap();
        let report = sync(&leader, &receiver, &BTreeSet::new());
        assert_eq!(report.sent_files, 2);
        assert_eq!(report.moved_aside_files, 1);
        assert_eq!(report.moved_aside_bytes, 11);
        assert_eq!(report.deleted, 0);
        assert!(same(&tree(&leader), &tree(&old)));
        let kept = base
            .path()
            .join("old.moved-aside/stamp/only-on-the-old-leader");
        assert_eq!(std::fs::read(kept).unwrap(), b"late upload");
    }

    /// A receiver whose disk fills: the files that do not fit fail with
    /// why, no partial file is left under any name, and the next round
    /// after space returns completes. Needs root (a tmpfs of 1 MiB).
    #[test]
    fn a_full_disk_fails_files_cleanly_and_the_next_round_completes() {
        if mainstay_sys::process::geteuid() != 0 {
            mainstay_testkit::skip("mounting a small tmpfs needs root");
            return;
        }
        let base = tempfile::tempdir().unwrap();
        let (source, copy) = (base.path().join("source"), base.path().join("copy"));
        std::fs::create_dir_all(&source).unwrap();
        std::fs::create_dir_all(&copy).unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
            .arg(&copy)
            .status()
            .unwrap();
        assert!(mounted.success());
        struct Unmount(std::path::PathBuf);
        impl Drop for Unmount {
            fn drop(&mut self) {
                let _ = std::process::Command::new("umount").arg(&self.0).status();
            }
        }
        let _unmount = Unmount(copy.clone());
        for name in ["a", "b", "c"] {
            std::fs::write(source.join(name), vec![name.as_bytes()[0]; 300_000]).unwrap();
        }
        // Half the disk is taken by something else.
        std::fs::write(copy.join("filler"), vec![0u8; 500_000]).unwrap();
        let receiver = Receiver::new(&copy);
        let source_tree = tree(&source);
        let mut receiver_tree = tree(&copy);
        receiver_tree.remove("filler");
        let first = plan(
            &source_tree,
            &receiver_tree,
            &BTreeSet::new(),
            &BTreeSet::new(),
            &HashMap::new(),
        );
        let report = execute(
            &first,
            &source_tree,
            &receiver,
            "stamp",
            |path, _, offset| open_at(&source.join(path), offset),
        );
        assert!(report.sent_files < 3, "{report:?}");
        assert!(
            report.failed.iter().all(|(_, why)| why.contains("space")),
            "{report:?}"
        );
        let names: Vec<String> = std::fs::read_dir(&copy)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(
            names
                .iter()
                .all(|n| !n.starts_with(crate::apply::TEMP_PREFIX)),
            "{names:?}"
        );
        for name in &names {
            if name != "filler" {
                assert_eq!(std::fs::metadata(copy.join(name)).unwrap().len(), 300_000);
            }
        }
        // Space returns: the next round brings the rest.
        std::fs::remove_file(copy.join("filler")).unwrap();
        let second = plan(
            &source_tree,
            &tree(&copy),
            &BTreeSet::new(),
            &BTreeSet::new(),
            &HashMap::new(),
        );
        let report = execute(
            &second,
            &source_tree,
            &receiver,
            "stamp",
            |path, _, offset| open_at(&source.join(path), offset),
        );
        assert!(report.failed.is_empty(), "{report:?}");
        assert!(same(&source_tree, &tree(&copy)));
    }

    #[test]
    fn a_file_that_changes_while_sent_fails_alone() {
        let base = tempfile::tempdir().unwrap();
        let (source, copy) = (base.path().join("source"), base.path().join("copy"));
        std::fs::create_dir_all(&source).unwrap();
        std::fs::create_dir_all(&copy).unwrap();
        std::fs::write(source.join("a"), b"aaaa").unwrap();
        std::fs::write(source.join("b"), b"bbbb").unwrap();
        let source_tree = tree(&source);
        let receiver = Receiver::new(&copy);
        let second = plan(
            &source_tree,
            &tree(&copy),
            &BTreeSet::new(),
            &BTreeSet::new(),
            &HashMap::new(),
        );
        let report = execute(&second, &source_tree, &receiver, "stamp", |path, _, _| {
            if path == "a" {
                std::fs::write(source.join("a"), b"rewritten meanwhile")?;
            }
            std::fs::File::open(source.join(path))
        });
        assert_eq!(report.sent_files, 1);
        assert_eq!(report.failed.len(), 1, "{:?}", report.failed);
        assert_eq!(report.failed[0].0, "a");
        assert!(!copy.join("a").exists());
        assert_eq!(std::fs::read(copy.join("b")).unwrap(), b"bbbb");
    }
}
