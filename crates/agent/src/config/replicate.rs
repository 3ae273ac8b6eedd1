//! `[[replicate]]`: the directories copied from the leader's node to the
//! others, as `mainstay_files::ReplicateSpec`s. Every refusal names the
//! directory's entry and key (`replicate[0].path`) and says how to fix it,
//! before anything is copied.

use super::file::{ByteSize, ReplicateSection};
use super::parse_size;
use mainstay_files::{Excludes, ReplicateSpec};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

/// A refused value: its key and what is wrong.
type Refusal = (String, String);

const DEFAULT_SETTLE_SECS: f64 = 1.0;
const DEFAULT_SCAN_INTERVAL_SECS: f64 = 60.0;

pub(super) fn directories(
    sections: Vec<ReplicateSection>,
    data_dir: &Path,
) -> Result<Vec<ReplicateSpec>, Refusal> {
    let mut specs: Vec<ReplicateSpec> = Vec::new();
    for (index, section) in sections.into_iter().enumerate() {
        let key = |name: &str| format!("replicate[{index}].{name}");
        let path = normalized(&section.path).ok_or_else(|| {
            (
                key("path"),
                format!(
                    "{} is not an absolute path: give the directory's full path, e.g. \
                     /var/lib/matrix-synapse/media",
                    section.path.display()
                ),
            )
        })?;
        if path == Path::new("/") {
            return Err((
                key("path"),
                "/ is the whole machine: name the directory to copy".into(),
            ));
        }
        if path.starts_with(data_dir) || data_dir.starts_with(&path) {
            return Err((
                key("path"),
                format!(
                    "{} overlaps PostgreSQL's data directory {}: PostgreSQL replicates its \
                     own files; name a directory outside it",
                    path.display(),
                    data_dir.display()
                ),
            ));
        }
        if let Some(other) = specs
            .iter()
            .find(|s| s.path.starts_with(&path) || path.starts_with(&s.path))
        {
            return Err((
                key("path"),
                format!(
                    "{} overlaps {}, replicated already: a file must belong to one \
                     [[replicate]] entry; name disjoint directories",
                    path.display(),
                    other.path.display()
                ),
            ));
        }
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if !meta.is_dir() => {
                return Err((
                    key("path"),
                    format!(
                        "{} exists and is not a directory (a file or a link): name a \
                         directory, or move it aside",
                        path.display()
                    ),
                ));
            }
            // A missing directory is made when this node first receives it.
            _ => {}
        }
        let exclude = Excludes::new(&section.exclude).map_err(|why| {
            (
                key("exclude"),
                format!("{why}; use globs such as \"*.tmp\" or \"url_cache/**\""),
            )
        })?;
        let seconds = |name: &str, value: Option<f64>, default: f64, max: f64| {
            let value = value.unwrap_or(default);
            if value > 0.0 && value <= max {
                Ok(Duration::from_secs_f64(value))
            } else {
                Err((
                    key(name),
                    format!("{value} is out of range: give seconds above 0, at most {max}"),
                ))
            }
        };
        let throttle = match section.throttle {
            None => None,
            Some(ByteSize::Bytes(0)) => {
                return Err((
                    key("throttle"),
                    "0 would send nothing: leave it out for no limit".into(),
                ));
            }
            Some(ByteSize::Bytes(bytes)) => Some(bytes),
            Some(ByteSize::Text(text)) => match parse_size(&text) {
                Some(0) | None => {
                    return Err((
                        key("throttle"),
                        format!(
                            "{text:?} is not a rate: give bytes per second, or a number with \
                             kB, MB or GB (per second), above 0"
                        ),
                    ));
                }
                Some(bytes) => Some(bytes),
            },
        };
        specs.push(ReplicateSpec {
            settle: seconds("settle", section.settle, DEFAULT_SETTLE_SECS, 3600.0)?,
            scan_interval: seconds(
                "scan_interval",
                section.scan_interval,
                DEFAULT_SCAN_INTERVAL_SECS,
                86_400.0,
            )?,
            throttle,
            exclude,
            path,
        });
    }
    Ok(specs)
}

/// `path` without `.` components or a trailing `/`, if it is absolute and
/// has no `..` (which could climb out of what the operator named).
fn normalized(path: &Path) -> Option<PathBuf> {
    if !path.is_absolute() {
        return None;
    }
    let mut clean = PathBuf::from("/");
    for part in path.components() {
        match part {
            Component::Normal(name) => clean.push(name),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    Some(clean)
}
