//! A receiver's side of a replicated directory: each round compares its
//! tree with the source's offer and applies the difference.
//!
//! Deletions propagate only for paths this receiver holds from the same
//! source instance (it had them in sync, then the source deleted them).
//! After a failover the source is a new instance: everything only the
//! receiver has (the old leader's last uploads, local writes) is moved
//! aside, never deleted.

use crate::apply::{Receiver, aside_stamp};
use crate::execute::{Report, execute};
use crate::hashes::cache_file;
use crate::manifest::Entry;
use crate::plan::plan;
use crate::scan::{HashCache, scan};
use crate::source::Offer;
use crate::spec::ReplicateSpec;
use serde::Serialize;
use std::collections::BTreeSet;
use std::io::{self, Read};
use std::time::{SystemTime, UNIX_EPOCH};

pub struct Follower {
    spec: ReplicateSpec,
    receiver: Receiver,
    cache: HashCache,
    instance: Option<String>,
    version: u64,
    /// Paths in sync with the current instance after the last round.
    in_sync: BTreeSet<String>,
    status: FollowerStatus,
}

/// What a receiver tells about a directory (`GET /replication/files`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct FollowerStatus {
    pub path: String,
    pub source_instance: Option<String>,
    /// The source's version this receiver matches (all but `failed`).
    pub version: u64,
    /// Unix time of the last round that changed something.
    pub last_change: Option<u64>,
    /// How long that round took, from asking for the offer to the last
    /// write (after a failback: the whole resync).
    pub last_change_ms: Option<u64>,
    pub files_received: u64,
    pub bytes_received: u64,
    /// Files moved aside since the agent started, and their bytes.
    pub moved_aside_files: u64,
    pub moved_aside_bytes: u64,
    pub deleted: u64,
    /// Paths the last round could not apply, with why.
    pub failed: Vec<(String, String)>,
    /// Unix time since when rounds keep failing files (none: the last
    /// round applied everything).
    pub failing_since: Option<u64>,
}

impl Follower {
    pub fn new(spec: ReplicateSpec) -> Follower {
        Follower {
            receiver: Receiver::new(&spec.path),
            status: FollowerStatus {
                path: spec.path.display().to_string(),
                ..FollowerStatus::default()
            },
            cache: HashCache::load(&cache_file(&spec.path)),
            spec,
            instance: None,
            version: 0,
            in_sync: BTreeSet::new(),
        }
    }

    /// The (instance, version) this receiver last applied completely: the
    /// source may answer "unchanged" when it still offers the same.
    pub fn applied(&self) -> Option<(&str, u64)> {
        let complete = self.status.failed.is_empty();
        self.instance
            .as_deref()
            .filter(|_| complete)
            .map(|i| (i, self.version))
    }

    pub fn status(&self) -> &FollowerStatus {
        &self.status
    }

    /// Saves the hash cache when it is due (see `hashes`).
    pub fn persist_hashes(&mut self) {
        self.cache.persist(&cache_file(&self.spec.path));
    }

    /// Saves the hash cache now: this node becomes the source, which
    /// loads it.
    pub fn flush_hashes(&mut self) {
        self.cache.flush(&cache_file(&self.spec.path));
    }

    /// Notes how long a round that changed something took, asking for the
    /// offer included.
    pub fn round_took(&mut self, elapsed: std::time::Duration) {
        self.status.last_change_ms = Some(elapsed.as_millis() as u64);
    }

    /// One round: the local tree made to match `offer`, each file's bytes
    /// from `fetch`.
    pub fn round<R: Read>(
        &mut self,
        offer: &Offer,
        now: SystemTime,
        fetch: impl FnMut(&str, &Entry, u64) -> io::Result<R>,
    ) -> io::Result<Report> {
        // Nodes may keep a directory at different places, but the same
        // directory by name at the same position: a list in another order
        // would copy one directory over another.
        let name = |path: &str| {
            std::path::Path::new(path)
                .file_name()
                .map(|n| n.to_os_string())
        };
        if name(&offer.path) != name(&self.status.path) {
            return Err(io::Error::other(format!(
                "the leader replicates {} where this node has {}: give every node the same \
                 [[replicate]] sections, in the same order",
                offer.path, self.status.path
            )));
        }
        if self.instance.as_deref() != Some(offer.instance.as_str()) {
            // A new source: nothing is known to be in sync with it.
            self.in_sync.clear();
            self.instance = Some(offer.instance.clone());
            self.status.source_instance = Some(offer.instance.clone());
        }
        std::fs::create_dir_all(&self.spec.path)?;
        let scanned = scan(&self.spec.path, &self.spec.exclude, &mut self.cache)?;
        let (local, partials) = (scanned.manifest, scanned.temps);
        let deleted: BTreeSet<String> = offer
            .deleted
            .iter()
            .filter(|p| self.in_sync.contains(*p))
            .cloned()
            .collect();
        let plan = plan(
            &offer.entries,
            &local,
            &deleted,
            &offer.pending,
            self.cache.elsewhere(),
        );
        let report = execute(
            &plan,
            &offer.entries,
            &self.receiver,
            &aside_stamp(now),
            fetch,
        );
        let failed: BTreeSet<&str> = report.failed.iter().map(|(p, _)| p.as_str()).collect();
        // Partial files of transfers that will not resume (the source
        // changed or dropped the file) go; those of files still wanted stay.
        let wanted: BTreeSet<String> = failed
            .iter()
            .filter_map(|p| {
                let hash = match &offer.entries.get(*p)?.kind {
                    crate::Kind::File { hash, .. } => hash.get(..32).unwrap_or(hash),
                    _ => return None,
                };
                let name = format!("{}part-{hash}", crate::apply::TEMP_PREFIX);
                Some(match crate::manifest::parent(p) {
                    Some(dir) => format!("{dir}/{name}"),
                    None => name,
                })
            })
            .collect();
        for stale in partials.iter().filter(|t| !wanted.contains(*t)) {
            if let Ok(path) = crate::apply::inside(&self.spec.path, stale) {
                let _ = std::fs::remove_file(path);
            }
        }
        self.in_sync = offer
            .entries
            .keys()
            .filter(|p| !failed.contains(p.as_str()))
            .cloned()
            .collect();
        // What now matches the source exists on two nodes at least.
        for path in &self.in_sync {
            if let Some(crate::Kind::File { hash, .. }) = offer.entries.get(path).map(|e| &e.kind) {
                self.cache.mark_elsewhere(path, hash);
            }
        }
        self.version = offer.version;
        let status = &mut self.status;
        status.version = offer.version;
        status.files_received += report.sent_files;
        status.bytes_received += report.sent_bytes;
        status.moved_aside_files += report.moved_aside_files;
        status.moved_aside_bytes += report.moved_aside_bytes;
        status.deleted += report.deleted;
        status.failed = report.failed.clone();
        let unix = now.duration_since(UNIX_EPOCH).ok().map(|d| d.as_secs());
        status.failing_since = match (status.failed.is_empty(), status.failing_since) {
            (true, _) => None,
            (false, since @ Some(_)) => since,
            (false, None) => unix,
        };
        if !plan.is_empty() {
            status.last_change = now.duration_since(UNIX_EPOCH).ok().map(|d| d.as_secs());
        }
        Ok(report)
    }

    /// The local tree.
    #[cfg(test)]
    fn local(&mut self) -> io::Result<crate::Manifest> {
        Ok(scan(&self.spec.path, &self.spec.exclude, &mut self.cache)?.manifest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::Source;
    use crate::spec::Excludes;
    use std::path::Path;
    use std::time::Duration;

    fn spec(root: &Path) -> ReplicateSpec {
        ReplicateSpec {
            path: root.to_path_buf(),
            exclude: Excludes::none(),
            settle: Duration::from_millis(1),
            scan_interval: Duration::from_secs(60),
            throttle: None,
        }
    }

    /// The offer of `root` as a new source instance would make it (with
    /// the receiver's path, as every node names the same directory).
    fn offer(source: &mut Source, as_path: &Path) -> Offer {
        source
            .rescan(
                SystemTime::now() + Duration::from_secs(1),
                &std::collections::HashMap::new(),
            )
            .unwrap();
        let mut offer = Offer::clone(source.offer());
        offer.path = as_path.display().to_string();
        offer
    }

    fn round(follower: &mut Follower, offer: &Offer, source_root: &Path) -> Report {
        follower
            .round(offer, SystemTime::now(), |path, _, _| {
                std::fs::File::open(source_root.join(path))
            })
            .unwrap()
    }

    #[test]
    fn deletions_propagate_within_an_instance_and_a_new_instance_moves_aside() {
        let base = tempfile::tempdir().unwrap();
        let (a, b) = (base.path().join("a"), base.path().join("b"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::write(a.join("one"), b"1").unwrap();
        std::fs::write(a.join("two"), b"2").unwrap();
        let mut source = Source::new(spec(&a), "first".into());
        let mut follower = Follower::new(spec(&b));
        let report = round(&mut follower, &offer(&mut source, &b), &a);
        assert_eq!(report.sent_files, 2);
        assert_eq!(follower.applied(), Some(("first", 1)));
        // Deleted at the source while followed: deleted here too.
        std::fs::remove_file(a.join("one")).unwrap();
        let report = round(&mut follower, &offer(&mut source, &b), &a);
        assert_eq!((report.deleted, report.moved_aside_files), (1, 0));
        assert!(!b.join("one").exists());
        // A local write on the receiver is moved aside, not kept in place.
        std::fs::write(b.join("local"), b"written on a replica").unwrap();
        let report = round(&mut follower, &offer(&mut source, &b), &a);
        assert_eq!(report.moved_aside_files, 1);
        // A new source instance (a failover) that lacks "two": moved aside.
        std::fs::remove_file(a.join("two")).unwrap();
        let mut new_source = Source::new(spec(&a), "second".into());
        let report = round(&mut follower, &offer(&mut new_source, &b), &a);
        assert_eq!((report.deleted, report.moved_aside_files), (0, 1));
        assert_eq!(follower.status().moved_aside_files, 2);
        assert!(follower.local().unwrap().is_empty());
    }

    #[test]
    fn a_rejoining_leader_keeps_the_versions_only_it_had_and_replaces_the_rest() {
        let base = tempfile::tempdir().unwrap();
        let (a, b) = (base.path().join("a"), base.path().join("b"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::write(a.join("photo"), b"v1").unwrap();
        std::fs::write(a.join("note"), b"v1").unwrap();
        // a leads; b receives and says so.
        let mut source = Source::new(spec(&a), "first".into());
        let mut follower = Follower::new(spec(&b));
        let offered = offer(&mut source, &b);
        round(&mut follower, &offered, &a);
        source.heard_from("b", offered.version, SystemTime::now());
        // After the last replication a edits its note; then it crashes.
        std::fs::write(a.join("note"), b"v2, only on a").unwrap();
        source.flush_hashes();
        drop(source);
        // b leads and changes the photo; a comes back as a receiver.
        std::fs::write(b.join("photo"), b"v2 from the new leader").unwrap();
        let mut new_source = Source::new(spec(&b), "second".into());
        let mut rejoined = Follower::new(spec(&a));
        let report = round(&mut rejoined, &offer(&mut new_source, &a), &b);
        // The photo a had is on b's disk history too: replaced. The note's
        // version only a had: kept aside, then replaced.
        assert_eq!(
            (report.sent_files, report.moved_aside_files),
            (2, 1),
            "{report:?}"
        );
        assert_eq!(
            std::fs::read(a.join("photo")).unwrap(),
            b"v2 from the new leader"
        );
        assert_eq!(std::fs::read(a.join("note")).unwrap(), b"v1");
        let aside = crate::apply::aside_dir(&a);
        let kept: Vec<_> = std::fs::read_dir(&aside)
            .unwrap()
            .map(|stamp| std::fs::read(stamp.unwrap().path().join("note")).unwrap())
            .collect();
        assert_eq!(kept, [b"v2, only on a".to_vec()]);
    }

    #[test]
    fn a_receiver_refuses_an_offer_for_another_directory() {
        let base = tempfile::tempdir().unwrap();
        let mut follower = Follower::new(spec(&base.path().join("b")));
        let offer = Offer {
            path: "/elsewhere".into(),
            ..Offer::default()
        };
        let err = follower
            .round(&offer, SystemTime::now(), |_, _, _| {
                std::fs::File::open("/dev/null")
            })
            .unwrap_err();
        assert!(
            err.to_string().contains("same [[replicate]] sections"),
            "{err}"
        );
    }
}
