//! `postmaster.pid`: whether a postmaster (ours or one left by an earlier
//! agent) is running on a data directory, and whether it is ready.

use std::fs;
use std::path::{Path, PathBuf};

/// The lines of `postmaster.pid` that matter here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PidFile {
    pub pid: i32,
    pub data_dir: PathBuf,
    /// Line 8 (PostgreSQL 10+): `starting`, `ready`, `standby` or `stopping`.
    pub status: Option<String>,
}

pub fn read(data_dir: &Path) -> Option<PidFile> {
    let text = fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
    parse(&text)
}

pub fn parse(text: &str) -> Option<PidFile> {
    let lines: Vec<&str> = text.lines().collect();
    let pid = lines
        .first()?
        .trim()
        .parse::<i32>()
        .ok()
        .filter(|p| *p > 0)?;
    Some(PidFile {
        pid,
        data_dir: PathBuf::from(lines.get(1).copied().unwrap_or("").trim()),
        status: lines
            .get(7)
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty()),
    })
}

/// Whether `pid` is a living (not zombie) process.
pub fn is_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    let exists = match mainstay_sys::process::kill(pid, 0) {
        Ok(()) => true,
        Err(e) => e.raw_os_error() == Some(libc::EPERM),
    };
    if !exists {
        return false;
    }
    // A zombie has exited already; state is the field after the ')'.
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !matches!(
            stat.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().chars().next()),
            Some(Some('Z' | 'X'))
        ),
        Err(_) => false,
    }
}

/// Whether `pid` is alive and is a postmaster running on `data_dir`. The
/// postmaster chdirs into its data directory, which tells it apart from an
/// unrelated process that reused a stale pid.
pub fn is_postmaster_of(pid: i32, data_dir: &Path) -> bool {
    if !is_alive(pid) {
        return false;
    }
    let wanted = fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
    match fs::read_link(format!("/proc/{pid}/cwd")) {
        Ok(cwd) => cwd == wanted,
        // Not allowed to look (not root): fall back to the program name.
        Err(_) => fs::read_to_string(format!("/proc/{pid}/comm"))
            .map(|c| c.trim() == "postgres" || c.trim() == "postmaster")
            .unwrap_or(false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_pg15_pid_file() {
        let text = "4242\n/var/lib/pg/data\n1700000000\n5432\n/run/pg\n127.0.0.1\n  1234   5678\nready   \n";
        let p = parse(text).unwrap();
        assert_eq!(p.pid, 4242);
        assert_eq!(p.data_dir, PathBuf::from("/var/lib/pg/data"));
        assert_eq!(p.status.as_deref(), Some("ready"));
        assert_eq!(parse("4242\n/d\n").unwrap().status, None);
        assert!(parse("").is_none());
        assert!(parse("-1\n").is_none());
    }

    #[test]
    fn we_are_alive_and_not_a_postmaster() {
        let me = std::process::id() as i32;
        assert!(is_alive(me));
        assert!(!is_postmaster_of(me, Path::new("/nonexistent-dir")));
    }
}
