//! The leader's side of a replicated directory: the manifest it serves,
//! rescanned on demand, with a version that moves when the tree does and
//! the paths it saw deleted.
//!
//! A file modified less than `settle` ago may still be being written: it
//! is served as it was before (or not at all if it is new) until it has
//! been left alone that long, so receivers never copy half an upload.

use crate::manifest::{Kind, Manifest};
use crate::scan::{HashCache, scan};
use crate::spec::ReplicateSpec;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::io;
use std::time::{SystemTime, UNIX_EPOCH};

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
}

pub struct Source {
    spec: ReplicateSpec,
    cache: HashCache,
    offer: Offer,
    /// Entries scanned but not yet settled, by path.
    unsettled: usize,
    skipped: Vec<(String, String)>,
}

impl Source {
    pub fn new(spec: ReplicateSpec, instance: String) -> Source {
        let path = spec.path.display().to_string();
        Source {
            spec,
            cache: HashCache::default(),
            offer: Offer {
                path,
                instance,
                ..Offer::default()
            },
            unsettled: 0,
            skipped: Vec::new(),
        }
    }

    pub fn offer(&self) -> &Offer {
        &self.offer
    }

    /// Files seen changing too recently to be served yet.
    pub fn unsettled(&self) -> usize {
        self.unsettled
    }

    /// Entries the last scan could not read, with why.
    pub fn skipped(&self) -> &[(String, String)] {
        &self.skipped
    }

    /// Reads the tree again (only changed files are hashed); returns
    /// whether the offer changed.
    pub fn rescan(&mut self, now: SystemTime) -> io::Result<bool> {
        if !self.spec.path.exists() {
            std::fs::create_dir_all(&self.spec.path)?;
        }
        let scan = scan(&self.spec.path, &self.spec.exclude, &mut self.cache)?;
        self.skipped = scan.skipped;
        let settled_before = now
            .checked_sub(self.spec.settle)
            .unwrap_or(UNIX_EPOCH)
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i64);
        let mut entries = Manifest::new();
        self.unsettled = 0;
        for (path, entry) in scan.manifest {
            let fresh = matches!(entry.kind, Kind::File { .. }) && entry.mtime_ns > settled_before;
            if fresh {
                self.unsettled += 1;
                if let Some(old) = self.offer.entries.get(&path) {
                    entries.insert(path, old.clone());
                }
            } else {
                entries.insert(path, entry);
            }
        }
        if entries == self.offer.entries {
            return Ok(false);
        }
        for gone in self.offer.entries.keys() {
            if !entries.contains_key(gone) {
                self.offer.deleted.insert(gone.clone());
            }
        }
        self.offer.deleted.retain(|p| !entries.contains_key(p));
        self.offer.entries = entries;
        self.offer.version += 1;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::Excludes;
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
    fn a_file_is_offered_once_settled_and_its_deletion_is_remembered() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = source(dir.path());
        std::fs::write(dir.path().join("upload"), b"half").unwrap();
        let now = SystemTime::now();
        // Just written: not offered yet.
        assert!(!s.rescan(now).unwrap());
        assert_eq!(s.unsettled(), 1);
        assert!(s.offer().entries.is_empty());
        // Two seconds later it has settled.
        assert!(s.rescan(now + Duration::from_secs(2)).unwrap());
        assert_eq!(s.offer().version, 1);
        assert!(s.offer().entries.contains_key("upload"));
        assert!(!s.rescan(now + Duration::from_secs(3)).unwrap());
        // Rewritten: the old version is offered until the new one settles.
        std::fs::write(dir.path().join("upload"), b"whole upload").unwrap();
        let later = SystemTime::now();
        assert!(!s.rescan(later).unwrap());
        assert_eq!(s.offer().entries["upload"].size(), 4);
        assert!(s.rescan(later + Duration::from_secs(2)).unwrap());
        assert_eq!(s.offer().entries["upload"].size(), 12);
        std::fs::remove_file(dir.path().join("upload")).unwrap();
        assert!(s.rescan(later + Duration::from_secs(3)).unwrap());
        assert_eq!(s.offer().version, 3);
        assert!(s.offer().deleted.contains("upload"));
        // Back again: no longer a deletion.
        std::fs::write(dir.path().join("upload"), b"again").unwrap();
        assert!(
            s.rescan(SystemTime::now() + Duration::from_secs(2))
                .unwrap()
        );
        assert!(s.offer().deleted.is_empty());
    }
}
