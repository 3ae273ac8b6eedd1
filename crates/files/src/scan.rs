//! A replicated directory read into a manifest. Symbolic links are read as
//! links, never followed; excluded paths and the receiver's temporary
//! files are left out. Hashing reads a file in 64 KiB pieces (memory does
//! not grow with its size) and only when its size, mtime, inode or ctime
//! changed since the scan before: rescanning 100,000 unchanged files
//! costs their `stat`s, not their bytes.

use crate::apply::TEMP_PREFIX;
pub use crate::hashes::HashCache;
use crate::hashes::{Known, Stamp, now_ns};
use crate::manifest::{Entry, Kind, Manifest};
use crate::spec::Excludes;
use std::collections::HashMap;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// A scan's result.
#[derive(Default)]
pub struct Scan {
    pub manifest: Manifest,
    /// Entries that could not be read, with why (each is retried at the
    /// next scan; the others are not held up).
    pub skipped: Vec<(String, String)>,
    /// Bytes read to hash changed files.
    pub hashed_bytes: u64,
    /// A receiver's temporary files (partial transfers), by path.
    pub temps: Vec<String>,
    /// Files hashed too soon after their last change for the stamp to
    /// vouch for the hash: a scan after they are two seconds old reads
    /// them once more (see `hashes`).
    pub racy: usize,
}

/// Reads the tree under `root` (which must be a directory).
pub fn scan(root: &Path, excludes: &Excludes, cache: &mut HashCache) -> io::Result<Scan> {
    let mut result = Scan::default();
    let mut fresh = HashMap::new();
    let now = now_ns();
    // Bounded by the tree: every directory is pushed once.
    let mut pending = vec![String::new()];
    while let Some(dir) = pending.pop() {
        let full = if dir.is_empty() {
            root.to_path_buf()
        } else {
            root.join(&dir)
        };
        let entries = match std::fs::read_dir(&full) {
            Ok(entries) => entries,
            Err(e) if dir.is_empty() => return Err(e),
            Err(e) => {
                result.skipped.push((dir, e.to_string()));
                continue;
            }
        };
        for entry in entries {
            let entry = match entry {
                Ok(entry) => entry,
                Err(e) => {
                    result.skipped.push((dir.clone(), e.to_string()));
                    continue;
                }
            };
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                let shown = entry.file_name().to_string_lossy().into_owned();
                result
                    .skipped
                    .push((shown, "the name is not UTF-8: not replicated".into()));
                continue;
            };
            let temp = name.starts_with(TEMP_PREFIX);
            let relative = if dir.is_empty() {
                name
            } else {
                format!("{dir}/{name}")
            };
            if temp {
                result.temps.push(relative);
                continue;
            }
            if excludes.excludes(&relative) {
                continue;
            }
            match read_entry(
                &entry.path(),
                &relative,
                cache,
                &mut fresh,
                &mut result.hashed_bytes,
                &mut result.racy,
                now,
            ) {
                Ok(Some(read)) => {
                    if read.kind == Kind::Dir {
                        pending.push(relative.clone());
                    }
                    result.manifest.insert(relative, read);
                }
                // Sockets, fifos, devices: not replicated.
                Ok(None) => {}
                Err(e) => result.skipped.push((relative, e.to_string())),
            }
        }
    }
    cache.replace(fresh, result.hashed_bytes > 0);
    Ok(result)
}

fn read_entry(
    path: &Path,
    relative: &str,
    cache: &HashCache,
    fresh: &mut HashMap<String, Known>,
    hashed_bytes: &mut u64,
    racy: &mut usize,
    now: i64,
) -> io::Result<Option<Entry>> {
    let meta = std::fs::symlink_metadata(path)?;
    let file_type = meta.file_type();
    let kind = if file_type.is_dir() {
        Kind::Dir
    } else if file_type.is_symlink() {
        let target = std::fs::read_link(path)?;
        let target = target
            .to_str()
            .ok_or_else(|| io::Error::other("the link's target is not UTF-8"))?;
        Kind::Symlink {
            target: target.to_string(),
        }
    } else if file_type.is_file() {
        let stamp = Stamp {
            size: meta.size(),
            mtime_ns: nanos(meta.mtime(), meta.mtime_nsec()),
            ctime_ns: nanos(meta.ctime(), meta.ctime_nsec()),
            ino: meta.ino(),
        };
        let known = match cache.lookup(relative, &stamp, now) {
            Some(known) => known.clone(),
            None => {
                let (hash, read) = hash_file(path)?;
                *hashed_bytes += read;
                Known {
                    stamp,
                    hash,
                    hashed_at_ns: now,
                }
            }
        };
        let hash = known.hash.clone();
        *racy += usize::from(known.racy());
        fresh.insert(relative.to_string(), known);
        Kind::File {
            size: stamp.size,
            hash,
        }
    } else {
        return Ok(None);
    };
    Ok(Some(Entry {
        kind,
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
        mtime_ns: nanos(meta.mtime(), meta.mtime_nsec()),
    }))
}

fn nanos(seconds: i64, nanoseconds: i64) -> i64 {
    seconds
        .saturating_mul(1_000_000_000)
        .saturating_add(nanoseconds)
}

/// BLAKE3 of the file's bytes (hex) and how many were read.
pub fn hash_file(path: &Path) -> io::Result<(String, u64)> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = blake3::Hasher::new();
    let mut buffer = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
        total += n as u64;
    }
    Ok((hasher.finalize().to_hex().to_string(), total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_files_dirs_and_links_without_following_them() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::write(root.join("a/b/file"), b"hello").unwrap();
        std::fs::write(root.join("skip.tmp"), b"x").unwrap();
        std::fs::write(root.join(format!("{TEMP_PREFIX}half")), b"x").unwrap();
        // A link out of the tree is kept as a link, its target not read.
        std::os::unix::fs::symlink("/etc", root.join("out")).unwrap();
        let excludes = Excludes::new(&["*.tmp".to_string()]).unwrap();
        let mut cache = HashCache::default();
        let scan = scan(root, &excludes, &mut cache).unwrap();
        let names: Vec<&str> = scan.manifest.keys().map(String::as_str).collect();
        assert_eq!(names, ["a", "a/b", "a/b/file", "out"]);
        assert_eq!(
            scan.manifest["a/b/file"].kind,
            Kind::File {
                size: 5,
                hash: blake3::hash(b"hello").to_hex().to_string()
            }
        );
        assert_eq!(
            scan.manifest["out"].kind,
            Kind::Symlink {
                target: "/etc".into()
            }
        );
        assert_eq!(scan.hashed_bytes, 5);
        assert!(scan.skipped.is_empty());
    }

    #[test]
    fn unchanged_files_are_not_read_again() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), vec![7u8; 100_000]).unwrap();
        let mut cache = HashCache::default();
        let first = scan(dir.path(), &Excludes::none(), &mut cache).unwrap();
        assert_eq!(first.hashed_bytes, 100_000);
        let second = scan(dir.path(), &Excludes::none(), &mut cache).unwrap();
        assert_eq!(second.hashed_bytes, 0);
        assert_eq!(first.manifest, second.manifest);
        // Rewritten with the same size: the ctime (and mtime) moved.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(dir.path().join("f"), vec![8u8; 100_000]).unwrap();
        let third = scan(dir.path(), &Excludes::none(), &mut cache).unwrap();
        assert_eq!(third.hashed_bytes, 100_000);
        assert_ne!(third.manifest["f"].kind, first.manifest["f"].kind);
    }

    #[test]
    fn a_missing_root_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert!(
            scan(
                &dir.path().join("nope"),
                &Excludes::none(),
                &mut HashCache::default()
            )
            .is_err()
        );
    }
}
