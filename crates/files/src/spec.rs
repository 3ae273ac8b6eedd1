//! A replicated directory as the node's configuration describes it, typed:
//! the path checked and normalized, the exclude globs compiled, every
//! default applied where the file is read.

use globset::{Glob, GlobSet, GlobSetBuilder};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct ReplicateSpec {
    /// Absolute, without `.`, `..` or a trailing `/`.
    pub path: PathBuf,
    pub exclude: Excludes,
    /// A file with no close event is sent once it has not changed for
    /// this long.
    pub settle: Duration,
    /// Full scans behind the change events: a lost or overflowed event
    /// queue costs at most this much delay, never a file.
    pub scan_interval: Duration,
    /// Bytes per second sent to each receiver; `None`: as fast as the
    /// network goes.
    pub throttle: Option<u64>,
}

/// Paths (relative to the replicated directory, `/`-separated) that are
/// not replicated.
#[derive(Clone, Debug)]
pub struct Excludes {
    patterns: Vec<String>,
    set: GlobSet,
}

impl Excludes {
    /// Compiles `patterns`; the error names the pattern that does not
    /// parse and why.
    pub fn new(patterns: &[String]) -> Result<Excludes, String> {
        let mut builder = GlobSetBuilder::new();
        for pattern in patterns {
            let glob = globset::GlobBuilder::new(pattern)
                .literal_separator(true)
                .build()
                .map_err(|e| format!("{pattern:?} is not a glob: {}", e.kind()))?;
            builder.add(glob);
            // `dir/**` and `dir` alike exclude the directory itself.
            if let Some(dir) = pattern.strip_suffix("/**") {
                builder.add(Glob::new(dir).map_err(|e| format!("{pattern:?}: {}", e.kind()))?);
            }
        }
        let set = builder
            .build()
            .map_err(|e| format!("the exclude globs: {e}"))?;
        Ok(Excludes {
            patterns: patterns.to_vec(),
            set,
        })
    }

    pub fn none() -> Excludes {
        Excludes::new(&[]).expect("no pattern")
    }

    /// Whether `relative` (e.g. `url_cache/ab/cd`) is excluded. A pattern
    /// without `/` matches a name at any depth (`*.tmp`), as in rsync.
    pub fn excludes(&self, relative: &str) -> bool {
        if self.set.is_match(relative) {
            return true;
        }
        let name = relative.rsplit('/').next().unwrap_or(relative);
        self.patterns
            .iter()
            .any(|p| !p.contains('/') && self.set.is_match(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn excludes(patterns: &[&str]) -> Excludes {
        Excludes::new(&patterns.iter().map(|p| p.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn names_match_at_any_depth_and_paths_from_the_root() {
        let ex = excludes(&["*.tmp", "url_cache/**", "thumbs/*.png"]);
        assert!(ex.excludes("a.tmp"));
        assert!(ex.excludes("deep/down/b.tmp"));
        assert!(ex.excludes("url_cache"));
        assert!(ex.excludes("url_cache/x/y"));
        assert!(ex.excludes("thumbs/a.png"));
        assert!(!ex.excludes("thumbs/deeper/a.png"));
        assert!(!ex.excludes("local_content/ab/cdef"));
        assert!(!ex.excludes("tmp"));
        assert!(!excludes(&[]).excludes("anything"));
    }

    #[test]
    fn a_bad_glob_is_named() {
        let err = Excludes::new(&["media/[abc".to_string()]).unwrap_err();
        assert!(err.contains("\"media/[abc\""), "{err}");
    }
}
