//! A replicated tree as data: every entry by its path relative to the
//! replicated directory (`/`-separated, no `.` or `..`), with what both
//! ends compare. Sorted, so a parent comes before what it holds.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Kind {
    /// A regular file: its length and BLAKE3 hash (hex).
    File {
        size: u64,
        hash: String,
    },
    Dir,
    /// A symbolic link, copied as a link (never followed).
    Symlink {
        target: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    #[serde(flatten)]
    pub kind: Kind,
    /// Permission bits (`0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Last modification, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
}

impl Entry {
    /// Same bytes (or same link, or both directories).
    pub fn same_content(&self, other: &Entry) -> bool {
        self.kind == other.kind
    }

    /// Same mode, owner and, for files, mtime (a directory's changes with
    /// what it holds; a link's is not kept).
    pub fn same_metadata(&self, other: &Entry) -> bool {
        let mtime = !matches!(self.kind, Kind::File { .. }) || self.mtime_ns == other.mtime_ns;
        self.mode == other.mode && self.uid == other.uid && self.gid == other.gid && mtime
    }

    pub fn size(&self) -> u64 {
        match self.kind {
            Kind::File { size, .. } => size,
            _ => 0,
        }
    }
}

/// Path (relative) -> entry; the root itself is not in it.
pub type Manifest = BTreeMap<String, Entry>;

/// Whether `path` is a relative path a peer may name: not empty, no
/// leading `/`, no empty, `.` or `..` component, no NUL. Everything a
/// receiver is told to touch passes this first, so nothing outside the
/// replicated directory can be named.
pub fn valid_relative(path: &str) -> bool {
    !path.is_empty()
        && !path.contains('\0')
        && path
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..")
}

/// The parent directory of `path` (`None` at the top).
pub fn parent(path: &str) -> Option<&str> {
    path.rsplit_once('/').map(|(parent, _)| parent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_relative_paths_are_valid() {
        for good in ["a", "a/b", "local_content/ab/cd/efgh", ".hidden", "a..b"] {
            assert!(valid_relative(good), "{good}");
        }
        for bad in [
            "",
            "/etc/passwd",
            "a/../b",
            "..",
            ".",
            "a//b",
            "a/",
            "a/./b",
            "a\0b",
        ] {
            assert!(!valid_relative(bad), "{bad:?}");
        }
    }

    #[test]
    fn entries_travel_as_flat_json() {
        let entry = Entry {
            kind: Kind::File {
                size: 3,
                hash: "ab".into(),
            },
            mode: 0o644,
            uid: 1,
            gid: 2,
            mtime_ns: 5,
        };
        let json = serde_json::to_string(&entry).unwrap();
        assert_eq!(
            json,
            r#"{"kind":"file","size":3,"hash":"ab","mode":420,"uid":1,"gid":2,"mtime_ns":5}"#
        );
        assert_eq!(serde_json::from_str::<Entry>(&json).unwrap(), entry);
        assert_eq!(parent("a/b/c"), Some("a/b"));
        assert_eq!(parent("a"), None);
    }
}
