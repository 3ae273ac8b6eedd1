//! A service's log file: its stdout and stderr appended straight to the
//! file (the service never waits on the agent to write a line), rotated by
//! copy-and-truncate once it passes its size, keeping a few old files.
//! Lines written between the copy and the truncation are lost: the price of
//! a log that can never block the service, which logrotate's copytruncate
//! pays too.

use crate::spec::LogSpec;
use std::fs::{File, OpenOptions};
use std::io;
use std::path::PathBuf;

/// Opens the file for the service's stdout and stderr (append mode, so the
/// truncation below makes the next write land at the new end).
pub fn open(spec: &LogSpec) -> io::Result<(File, File)> {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&spec.path)?;
    let copy = file.try_clone()?;
    Ok((file, copy))
}

/// Rotates the log when it has grown past its limit: `.N-1` becomes `.N`
/// (the oldest goes), a copy of the file becomes `.1`, and the file is
/// truncated. Returns whether it rotated.
pub fn rotate_if_full(spec: &LogSpec) -> io::Result<bool> {
    let size = match std::fs::metadata(&spec.path) {
        Ok(meta) => meta.len(),
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(err) => return Err(err),
    };
    if size < spec.max_bytes {
        return Ok(false);
    }
    if spec.keep > 0 {
        for n in (1..spec.keep).rev() {
            let from = numbered(spec, n);
            if from.exists() {
                std::fs::rename(&from, numbered(spec, n + 1))?;
            }
        }
        std::fs::copy(&spec.path, numbered(spec, 1))?;
    }
    OpenOptions::new()
        .write(true)
        .open(&spec.path)?
        .set_len(0)?;
    Ok(true)
}

fn numbered(spec: &LogSpec, n: u32) -> PathBuf {
    let mut name = spec.path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_full_log_is_rotated_keeping_the_newest_copies() {
        let dir = tempfile::tempdir().unwrap();
        let spec = LogSpec {
            path: dir.path().join("web.log"),
            max_bytes: 10,
            keep: 2,
        };
        let (mut out, _) = open(&spec).unwrap();
        for round in 0..3 {
            out.write_all(format!("round {round} line\n").as_bytes())
                .unwrap();
            assert!(rotate_if_full(&spec).unwrap());
        }
        out.write_all(b"short\n").unwrap();
        assert!(!rotate_if_full(&spec).unwrap(), "below the limit");
        let read = |path: PathBuf| std::fs::read_to_string(path).unwrap();
        assert_eq!(read(spec.path.clone()), "short\n", "appends at the new end");
        assert_eq!(read(numbered(&spec, 1)), "round 2 line\n");
        assert_eq!(read(numbered(&spec, 2)), "round 1 line\n");
        assert!(!numbered(&spec, 3).exists(), "only `keep` old files");
    }
}
