//! Content hashes remembered between scans, by path, with the `stat`
//! stamp (size, mtime, ctime, inode) each was read under: a file whose
//! stamp has not moved is not read again. The cache is also kept on disk
//! beside the directory (`<dir>.mainstay-hashes`), so that a node back
//! from a crash compares its tree with the leader's at the cost of its
//! `stat`s, not of reading every byte again.
//!
//! The same file keeps what this node knows exists on another node:
//! each path's content (hash) that a receiver applied from this source, or
//! that this receiver holds from its source. A node that rejoins after a
//! crash and finds its version of a file differs from the new leader's
//! replaces it only if that version is known elsewhere; otherwise it was
//! written after the last replication, and it is moved aside first.
//!
//! Trusting a stamp has one trap: a file rewritten with the same size
//! within one tick of the filesystem's clock keeps its mtime and ctime.
//! So a hash read less than `RACY` after the file's last change is only
//! trusted until the file is that old, then read once more (git's "racy
//! clean" rule, in its own form).

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// What identifies a file's bytes without reading them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Stamp {
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub ino: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Known {
    pub stamp: Stamp,
    pub hash: String,
    /// When the bytes were read (Unix nanoseconds).
    pub hashed_at_ns: i64,
}

impl Known {
    /// Read so soon after the file's last change that the stamp alone
    /// cannot vouch for it: it will be read once more.
    pub(crate) fn racy(&self) -> bool {
        self.hashed_at_ns - self.stamp.ctime_ns < RACY_NS
    }
}

/// Two seconds: far coarser than any filesystem clock's tick.
const RACY_NS: i64 = 2_000_000_000;

/// The file's format; another one is ignored (the tree is hashed again).
const FORMAT: u32 = 1;

#[derive(Default)]
pub struct HashCache {
    known: HashMap<String, Known>,
    /// Path -> content hash known to be on another node.
    elsewhere: HashMap<String, String>,
    /// Something changed since the cache was last saved.
    dirty: bool,
    saved: Option<Instant>,
    /// A failed save was logged (once, until a save works again).
    warned: bool,
}

/// How often a changing cache is written: after a crash, what was hashed
/// since is read once more, nothing worse.
const SAVE_EVERY: Duration = Duration::from_secs(10);

#[derive(Serialize, Deserialize)]
struct OnDisk {
    format: u32,
    known: HashMap<String, Known>,
    #[serde(default)]
    elsewhere: HashMap<String, String>,
}

pub(crate) fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

/// Where the cache of directory `root` is kept: beside it, like the
/// moved-aside folder, so that it is never part of the replicated tree.
pub fn cache_file(root: &Path) -> PathBuf {
    let mut name = root.file_name().unwrap_or_default().to_os_string();
    name.push(".mainstay-hashes");
    root.with_file_name(name)
}

impl HashCache {
    /// The cache saved in `file`; empty when there is none or it cannot be
    /// read (the tree is then hashed again: slower, never wrong).
    pub fn load(file: &Path) -> HashCache {
        let (known, elsewhere) = std::fs::read(file)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<OnDisk>(&bytes).ok())
            .filter(|disk| disk.format == FORMAT)
            .map(|disk| (disk.known, disk.elsewhere))
            .unwrap_or_default();
        HashCache {
            known,
            elsewhere,
            dirty: false,
            saved: Some(Instant::now()),
            warned: false,
        }
    }

    /// Saves to `file` when due; a failure is logged once, and costs only
    /// a slower start after the next restart.
    pub fn persist(&mut self, file: &Path) {
        match self.save_if_due(file, SAVE_EVERY) {
            Ok(()) => self.warned = false,
            Err(e) if !self.warned => {
                self.warned = true;
                tracing::warn!(
                    "cannot save the hash cache {}: {e}; the tree will be read again after a restart",
                    file.display()
                );
            }
            Err(_) => {}
        }
    }

    /// The hash of `relative` if its stamp has not moved and the hash can
    /// be trusted at `now_ns`.
    pub(crate) fn lookup(&self, relative: &str, stamp: &Stamp, now_ns: i64) -> Option<&Known> {
        let known = self.known.get(relative)?;
        let still_young = now_ns - stamp.ctime_ns < RACY_NS;
        (known.stamp == *stamp && (!known.racy() || still_young)).then_some(known)
    }

    /// The hashes of the latest scan replace the cache's; `hashed` says
    /// whether any file was read.
    pub(crate) fn replace(&mut self, fresh: HashMap<String, Known>, hashed: bool) {
        self.dirty |= hashed || fresh.len() != self.known.len();
        // What is no longer here needs no word about elsewhere.
        let before = self.elsewhere.len();
        self.elsewhere.retain(|path, _| fresh.contains_key(path));
        self.dirty |= self.elsewhere.len() != before;
        self.known = fresh;
    }

    /// The hashes alone, for a scan made while the rest (what is known
    /// elsewhere, still being marked) stays here; `rejoin` takes them back.
    pub fn split_for_scan(&mut self) -> HashCache {
        HashCache {
            known: std::mem::take(&mut self.known),
            ..HashCache::default()
        }
    }

    pub fn rejoin(&mut self, scanned: HashCache) {
        self.dirty |= scanned.dirty;
        let before = self.elsewhere.len();
        self.elsewhere
            .retain(|path, _| scanned.known.contains_key(path));
        self.dirty |= self.elsewhere.len() != before;
        self.known = scanned.known;
    }

    /// What this node knows exists on another node, path -> hash.
    pub fn elsewhere(&self) -> &HashMap<String, String> {
        &self.elsewhere
    }

    /// `hash` of `path` is known to be on another node too.
    pub fn mark_elsewhere(&mut self, path: &str, hash: &str) {
        if self.elsewhere.get(path).map(String::as_str) != Some(hash) {
            self.elsewhere.insert(path.to_string(), hash.to_string());
            self.dirty = true;
        }
    }

    /// Saves to `file` now if anything changed (a role change: the next
    /// side loads the file).
    pub fn flush(&mut self, file: &Path) {
        let _ = self.save_if_due(file, Duration::ZERO);
    }

    /// Writes the cache to `file` (a temporary name, then a rename) when
    /// it changed and the last save is at least `every` old: a tree that
    /// keeps changing is not rewritten at every scan; after a crash the
    /// files hashed since the last save are only read again.
    pub fn save_if_due(&mut self, file: &Path, every: Duration) -> io::Result<()> {
        if !self.dirty || self.saved.is_some_and(|at| at.elapsed() < every) {
            return Ok(());
        }
        let mut temp_name = file.file_name().unwrap_or_default().to_os_string();
        temp_name.push(".new");
        let temp = file.with_file_name(temp_name);
        let disk = OnDisk {
            format: FORMAT,
            known: std::mem::take(&mut self.known),
            elsewhere: std::mem::take(&mut self.elsewhere),
        };
        let written = (|| {
            let mut out = io::BufWriter::new(std::fs::File::create(&temp)?);
            serde_json::to_writer(&mut out, &disk)?;
            out.flush()?;
            out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
            std::fs::rename(&temp, file)
        })();
        self.known = disk.known;
        self.elsewhere = disk.elsewhere;
        if written.is_err() {
            let _ = std::fs::remove_file(&temp);
        }
        written?;
        self.dirty = false;
        self.saved = Some(Instant::now());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(ctime_ns: i64) -> Stamp {
        Stamp {
            size: 1,
            mtime_ns: ctime_ns,
            ctime_ns,
            ino: 7,
        }
    }

    #[test]
    fn a_hash_read_right_after_a_change_is_read_again_once_the_file_is_older() {
        let mut cache = HashCache::default();
        let changed = 10 * RACY_NS;
        let known = Known {
            stamp: stamp(changed),
            hash: "h".into(),
            hashed_at_ns: changed + 1_000,
        };
        cache.replace([("f".to_string(), known.clone())].into(), true);
        // Trusted while the file is young (it will be read again later)...
        assert!(
            cache
                .lookup("f", &stamp(changed), changed + 5_000)
                .is_some()
        );
        // ...and no longer once it is older than the racy window.
        assert!(
            cache
                .lookup("f", &stamp(changed), changed + RACY_NS)
                .is_none()
        );
        // Read again then: trusted for good.
        let settled = Known {
            hashed_at_ns: changed + RACY_NS,
            ..known
        };
        cache.replace([("f".to_string(), settled)].into(), true);
        assert!(
            cache
                .lookup("f", &stamp(changed), changed + 100 * RACY_NS)
                .is_some()
        );
        assert!(
            cache
                .lookup("f", &stamp(changed + 1), changed + 100 * RACY_NS)
                .is_none()
        );
    }

    #[test]
    fn the_cache_survives_a_restart_and_a_bad_file_means_an_empty_one() {
        let dir = tempfile::tempdir().unwrap();
        let file = cache_file(&dir.path().join("media"));
        assert_eq!(file, dir.path().join("media.mainstay-hashes"));
        let mut cache = HashCache::default();
        let known = Known {
            stamp: stamp(1),
            hash: "h".into(),
            hashed_at_ns: 10 * RACY_NS,
        };
        cache.replace([("a/b".to_string(), known)].into(), true);
        cache.save_if_due(&file, Duration::ZERO).unwrap();
        let loaded = HashCache::load(&file);
        assert!(loaded.lookup("a/b", &stamp(1), 20 * RACY_NS).is_some());
        // Not saved again while nothing changed.
        std::fs::write(&file, b"garbage").unwrap();
        cache.save_if_due(&file, Duration::ZERO).unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), b"garbage");
        assert!(HashCache::load(&file).known.is_empty());
    }
}
