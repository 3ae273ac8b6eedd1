//! The leader's side of a replicated directory: the manifest it serves,
//! rescanned on demand, with a version that moves when the tree does and
//! the paths it saw deleted.
//!
//! A file modified less than `settle` ago may still be being written: it
//! is served as it was before (or not at all if it is new) until it has
//! been left alone that long, so receivers never copy half an upload.

use crate::hashes::cache_file;
use crate::manifest::{Kind, Manifest};
use crate::scan::{HashCache, Scan, scan};
use crate::spec::ReplicateSpec;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// What a receiver is sent: the tree as of `version` of this `instance`
/// (a new one each time a node becomes the source).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Offer {
    pub path: String,
    pub instance: String,
    pub version: u64,
    pub entries: Manifest,
    /// Paths that were in an earlier version of this instance and are no
    /// longer: deleted at the source.
    pub deleted: BTreeSet<String>,
    /// Files the source has but does not offer yet (still being written,
    /// never offered before): a receiver leaves its own copy of those
    /// paths alone, since absent from `entries` does not mean absent.
    #[serde(default)]
    pub pending: BTreeSet<String>,
}

/// Each path changed (or deleted) in this instance, under the version
/// that changed it last: a receiver's lag is the versions after its own,
/// summed without visiting a file.
#[derive(Default)]
struct ChangeLog {
    version_of: BTreeMap<String, u64>,
    by_version: BTreeMap<u64, Change>,
}

/// One version's changes still current.
struct Change {
    at: SystemTime,
    /// Each path it changed last, with its size then (0: deleted).
    paths: BTreeMap<String, u64>,
    bytes: u64,
}

impl ChangeLog {
    fn record(&mut self, path: &str, version: u64, at: SystemTime, size: u64) {
        if let Some(before) = self.version_of.insert(path.to_string(), version)
            && let Some(change) = self.by_version.get_mut(&before)
        {
            change.bytes -= change.paths.remove(path).unwrap_or(0);
            if change.paths.is_empty() {
                self.by_version.remove(&before);
            }
        }
        let change = self.by_version.entry(version).or_insert_with(|| Change {
            at,
            paths: BTreeMap::new(),
            bytes: 0,
        });
        change.bytes += size;
        change.paths.insert(path.to_string(), size);
    }

    /// (files, bytes, when the oldest was made) after `version`.
    fn after(&self, version: u64) -> (u64, u64, Option<SystemTime>) {
        self.by_version.range(version.saturating_add(1)..).fold(
            (0, 0, None),
            |(files, bytes, oldest), (_, change)| {
                (
                    files + change.paths.len() as u64,
                    bytes + change.bytes,
                    Some(oldest.map_or(change.at, |o: SystemTime| o.min(change.at))),
                )
            },
        )
    }

    /// The paths whose last change came after version `from`, up to `to`.
    fn paths_between(&self, from: u64, to: u64) -> impl Iterator<Item = &String> {
        self.by_version
            .range(from.saturating_add(1)..=to)
            .flat_map(|(_, change)| change.paths.keys())
    }

    /// Forgets the versions up to `version`; the paths they held.
    fn forget_up_to(&mut self, version: u64) -> Vec<String> {
        let kept = self.by_version.split_off(&version.saturating_add(1));
        let forgotten: Vec<String> = std::mem::replace(&mut self.by_version, kept)
            .into_values()
            .flat_map(|change| change.paths.into_keys())
            .collect();
        for path in &forgotten {
            self.version_of.remove(path);
        }
        forgotten
    }
}

/// Reads `spec`'s tree (made first if missing) with `cache`.
pub fn scan_tree(spec: &ReplicateSpec, cache: &mut HashCache) -> io::Result<Scan> {
    if !spec.path.exists() {
        std::fs::create_dir_all(&spec.path)?;
    }
    scan(&spec.path, &spec.exclude, cache)
}

const GONE_AFTER: Duration = Duration::from_secs(3600);

/// One receiver as its source sees it.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct ReceiverLag {
    pub receiver: String,
    /// The version it applied last.
    pub version: u64,
    /// Entries changed or deleted since, and the bytes of those still here.
    pub files_behind: u64,
    pub bytes_behind: u64,
    /// Age of the oldest change it has not applied (0 when none).
    pub seconds_behind: f64,
    pub last_heard_seconds: f64,
}

pub struct Source {
    spec: ReplicateSpec,
    cache: HashCache,
    /// Shared with the API's answers being written: a new version is a
    /// new offer, never a change under a reader.
    offer: Arc<Offer>,
    /// What changed in which version, for the receivers' lag.
    changes: ChangeLog,
    /// The version up to which the offered files are marked as known
    /// elsewhere (a receiver applied it).
    marked_elsewhere: u64,
    /// Each receiver's last word: the version it applied, and when.
    receivers: BTreeMap<String, (u64, SystemTime)>,
    /// Entries scanned but not yet settled, by path.
    unsettled: usize,
    /// Files whose hash must be read once more (see `hashes`).
    racy: usize,
    skipped: Vec<(String, String)>,
}

impl Source {
    pub fn new(spec: ReplicateSpec, instance: String) -> Source {
        let path = spec.path.display().to_string();
        Source {
            cache: HashCache::load(&cache_file(&spec.path)),
            spec,
            offer: Arc::new(Offer {
                path,
                instance,
                ..Offer::default()
            }),
            changes: ChangeLog::default(),
            marked_elsewhere: 0,
            receivers: BTreeMap::new(),
            unsettled: 0,
            racy: 0,
            skipped: Vec::new(),
        }
    }

    pub fn offer(&self) -> &Arc<Offer> {
        &self.offer
    }

    /// The hash cache, for a scan made without the source's lock held
    /// (the API keeps serving the current offer meanwhile); give it back
    /// with `absorb`.
    pub fn take_cache(&mut self) -> HashCache {
        self.cache.split_for_scan()
    }

    /// Files seen changing too recently to be served yet.
    pub fn unsettled(&self) -> usize {
        self.unsettled
    }

    /// Saves the hash cache when it is due (see `hashes`).
    pub fn persist_hashes(&mut self) {
        self.cache.persist(&cache_file(&self.spec.path));
    }

    /// Saves the hash cache now: this node becomes a receiver, which
    /// loads it.
    pub fn flush_hashes(&mut self) {
        self.cache.flush(&cache_file(&self.spec.path));
    }

    /// Whether a scan is due soon whatever the change events say: files
    /// still settling, or hashes to read once more.
    pub fn restless(&self) -> bool {
        self.unsettled > 0 || self.racy > 0
    }

    /// Entries the last scan could not read, with why.
    pub fn skipped(&self) -> &[(String, String)] {
        &self.skipped
    }

    /// Reads the tree again (only changed files are hashed); returns
    /// whether the offer changed. A file in `closed` (closed after writing
    /// since its last change) is complete: it needs no settle time.
    pub fn rescan(
        &mut self,
        now: SystemTime,
        closed: &std::collections::HashMap<String, SystemTime>,
    ) -> io::Result<bool> {
        let mut cache = self.take_cache();
        let scanned = scan_tree(&self.spec, &mut cache);
        self.absorb(cache, scanned, now, closed)
    }

    /// Takes back the cache and the result of a scan made with it.
    pub fn absorb(
        &mut self,
        cache: HashCache,
        scanned: io::Result<Scan>,
        now: SystemTime,
        closed: &std::collections::HashMap<String, SystemTime>,
    ) -> io::Result<bool> {
        self.cache.rejoin(cache);
        let scan = scanned?;
        // Said once per file (and again if it fails anew after a success):
        // it is retried at every scan, the others are not held up.
        for (path, why) in &scan.skipped {
            if !self.skipped.iter().any(|(p, w)| p == path && w == why) {
                tracing::warn!(
                    directory = %self.spec.path.display(),
                    file = %path,
                    "not offered: {why}; retried at the next scan"
                );
            }
        }
        self.skipped = scan.skipped;
        self.racy = scan.racy;
        let settled_before = now
            .checked_sub(self.spec.settle)
            .unwrap_or(UNIX_EPOCH)
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i64);
        let mut entries = Manifest::new();
        let mut pending = BTreeSet::new();
        self.unsettled = 0;
        for (path, entry) in scan.manifest {
            let closed_since = closed.get(&path).is_some_and(|at| {
                at.duration_since(UNIX_EPOCH)
                    .is_ok_and(|d| d.as_nanos() as i64 >= entry.mtime_ns)
            });
            let fresh = matches!(entry.kind, Kind::File { .. })
                && entry.mtime_ns > settled_before
                && !closed_since;
            if fresh {
                self.unsettled += 1;
                match self.offer.entries.get(&path) {
                    Some(old) => {
                        entries.insert(path, old.clone());
                    }
                    None => {
                        pending.insert(path);
                    }
                }
            } else {
                entries.insert(path, entry);
            }
        }
        // Pending paths only hold a receiver back: served with whatever
        // version is current, they move no version themselves.
        if entries == self.offer.entries {
            if pending != self.offer.pending {
                Arc::make_mut(&mut self.offer).pending = pending;
            }
            return Ok(false);
        }
        let version = self.offer.version + 1;
        let mut deleted = self.offer.deleted.clone();
        for gone in self.offer.entries.keys() {
            if !entries.contains_key(gone) {
                deleted.insert(gone.clone());
                self.changes.record(gone, version, now, 0);
            }
        }
        for (path, entry) in &entries {
            if self.offer.entries.get(path) != Some(entry) {
                self.changes.record(path, version, now, entry.size());
            }
        }
        deleted.retain(|p| !entries.contains_key(p));
        self.offer = Arc::new(Offer {
            path: self.offer.path.clone(),
            instance: self.offer.instance.clone(),
            version,
            entries,
            deleted,
            pending,
        });
        Ok(true)
    }

    /// Records that `receiver` has applied `version` of this instance.
    /// What every receiver has applied is forgotten: its deletions too (a
    /// receiver that comes back from further behind moves such a file
    /// aside instead of deleting it: never worse than a kept file).
    pub fn heard_from(&mut self, receiver: &str, version: u64, now: SystemTime) {
        self.receivers.insert(receiver.to_string(), (version, now));
        // A receiver silent for an hour is gone (a node removed, renamed):
        // it no longer holds back what is forgotten, nor raises alerts.
        self.receivers
            .retain(|_, (_, heard)| now.duration_since(*heard).unwrap_or_default() < GONE_AFTER);
        // The files it now holds as this node does exist on two nodes:
        // those changed since the last version marked, up to its own (the
        // change log keeps them: nothing after any receiver's version is
        // forgotten).
        if version > self.marked_elsewhere && version <= self.offer.version {
            for path in self.changes.paths_between(self.marked_elsewhere, version) {
                if let Some(Kind::File { hash, .. }) = self.offer.entries.get(path).map(|e| &e.kind)
                {
                    self.cache.mark_elsewhere(path, hash);
                }
            }
            self.marked_elsewhere = version;
        }
        let everyone = self.receivers.values().map(|(v, _)| *v).min().unwrap_or(0);
        let forgotten = self.changes.forget_up_to(everyone);
        if !forgotten.is_empty() {
            let offer = Arc::make_mut(&mut self.offer);
            for path in &forgotten {
                offer.deleted.remove(path);
            }
        }
    }

    /// How far behind each receiver that spoke to this source is.
    pub fn lag(&self, now: SystemTime) -> Vec<ReceiverLag> {
        self.receivers
            .iter()
            .map(|(name, (applied, heard))| {
                let mut lag = ReceiverLag {
                    receiver: name.clone(),
                    version: *applied,
                    last_heard_seconds: now
                        .duration_since(*heard)
                        .unwrap_or_default()
                        .as_secs_f64(),
                    ..ReceiverLag::default()
                };
                let (files, bytes, oldest) = self.changes.after(*applied);
                lag.files_behind = files;
                lag.bytes_behind = bytes;
                lag.seconds_behind = oldest
                    .map(|o| {
                        now.duration_since(o)
                            .unwrap_or(Duration::ZERO)
                            .as_secs_f64()
                    })
                    .unwrap_or(0.0);
                lag
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::Excludes;
    use std::collections::HashMap;
    use std::time::Duration;

    fn source(root: &std::path::Path) -> Source {
        Source::new(
            ReplicateSpec {
                path: root.to_path_buf(),
                exclude: Excludes::none(),
                settle: Duration::from_secs(1),
                scan_interval: Duration::from_secs(60),
                throttle: None,
            },
            "i1".into(),
        )
    }

    #[test]
    fn a_file_closed_after_writing_needs_no_settle_time() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = source(dir.path());
        std::fs::write(dir.path().join("voice-note"), b"ogg").unwrap();
        let closed: HashMap<String, SystemTime> =
            [("voice-note".to_string(), SystemTime::now())].into();
        assert!(s.rescan(SystemTime::now(), &closed).unwrap());
        assert!(s.offer().entries.contains_key("voice-note"));
        // Written again after that close: it waits again.
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(dir.path().join("voice-note"), b"ogg, longer").unwrap();
        assert!(!s.rescan(SystemTime::now(), &closed).unwrap());
        assert_eq!(s.offer().entries["voice-note"].size(), 3);
    }

    #[test]
    fn a_file_is_offered_once_settled_and_its_deletion_is_remembered() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = source(dir.path());
        std::fs::write(dir.path().join("upload"), b"half").unwrap();
        let now = SystemTime::now();
        // Just written: not offered yet.
        assert!(!s.rescan(now, &HashMap::new()).unwrap());
        assert_eq!(s.unsettled(), 1);
        assert!(s.offer().entries.is_empty());
        assert!(s.offer().pending.contains("upload"));
        // Two seconds later it has settled.
        assert!(
            s.rescan(now + Duration::from_secs(2), &HashMap::new())
                .unwrap()
        );
        assert_eq!(s.offer().version, 1);
        assert!(s.offer().entries.contains_key("upload"));
        assert!(
            !s.rescan(now + Duration::from_secs(3), &HashMap::new())
                .unwrap()
        );
        // Rewritten: the old version is offered until the new one settles.
        std::fs::write(dir.path().join("upload"), b"whole upload").unwrap();
        let later = SystemTime::now();
        assert!(!s.rescan(later, &HashMap::new()).unwrap());
        assert_eq!(s.offer().entries["upload"].size(), 4);
        assert!(
            s.rescan(later + Duration::from_secs(2), &HashMap::new())
                .unwrap()
        );
        assert_eq!(s.offer().entries["upload"].size(), 12);
        std::fs::remove_file(dir.path().join("upload")).unwrap();
        assert!(
            s.rescan(later + Duration::from_secs(3), &HashMap::new())
                .unwrap()
        );
        assert_eq!(s.offer().version, 3);
        assert!(s.offer().deleted.contains("upload"));
        // A receiver that applied version 2 is one change (the deletion)
        // behind; one that applied version 3 is not.
        s.heard_from("node2", 2, later + Duration::from_secs(3));
        s.heard_from("node3", 3, later + Duration::from_secs(3));
        let lag = s.lag(later + Duration::from_secs(5));
        assert_eq!(
            (lag[0].receiver.as_str(), lag[0].files_behind),
            ("node2", 1)
        );
        assert!((lag[0].seconds_behind - 2.0).abs() < 0.01, "{lag:?}");
        assert_eq!((lag[1].files_behind, lag[1].seconds_behind), (0, 0.0));
        // Once every receiver has applied it, the deletion is forgotten
        // (the offer stays small however much is deleted over months).
        s.heard_from("node2", 3, later + Duration::from_secs(6));
        assert!(s.offer().deleted.is_empty());
        assert!(
            s.lag(later + Duration::from_secs(6))
                .iter()
                .all(|l| l.files_behind == 0)
        );
        // Back again: no longer a deletion.
        std::fs::write(dir.path().join("upload"), b"again").unwrap();
        assert!(
            s.rescan(SystemTime::now() + Duration::from_secs(2), &HashMap::new())
                .unwrap()
        );
        assert!(s.offer().deleted.is_empty());
    }
}
