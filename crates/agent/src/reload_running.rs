//! `mainstay reload-running`: what a package upgrade runs where systemd
//! does not run the agents (containers, the test lab): every running
//! `mainstay agent` and `mainstay witness` of this binary's path gets
//! SIGHUP (it re-executes in place, see `crate::reexec`), and the command
//! waits until each runs the file now at that path.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// How long one agent may take to check its successor and re-execute
/// (a lease renewal, an etcd member's stop).
const WAIT: Duration = Duration::from_secs(60);

/// A running agent or witness of the binary at `exe`.
#[derive(Debug)]
struct Running {
    pid: i32,
    what: String,
}

pub fn reload_running() -> ExitCode {
    let exe = match std::env::current_exe() {
        Ok(exe) => strip_deleted(&exe),
        Err(err) => {
            eprintln!("error: cannot tell which binary this is: {err}");
            return ExitCode::from(2);
        }
    };
    let Ok(installed) = std::fs::metadata(&exe) else {
        eprintln!("error: {} is gone", exe.display());
        return ExitCode::from(2);
    };
    let target = (installed.dev(), installed.ino());
    let running = find(&exe);
    if running.is_empty() {
        println!("no running agent or witness of {}", exe.display());
        return ExitCode::SUCCESS;
    }
    let mut failed = 0;
    let signalled: Vec<&Running> = running
        .iter()
        .filter(|r| match mainstay_sys::process::kill(r.pid, libc::SIGHUP) {
            Ok(()) => true,
            Err(err) => {
                eprintln!("pid {} ({}): cannot signal it: {err}", r.pid, r.what);
                failed += 1;
                false
            }
        })
        .collect();
    let deadline = Instant::now() + WAIT;
    for r in signalled {
        loop {
            match std::fs::metadata(format!("/proc/{}/exe", r.pid)) {
                Ok(now) if (now.dev(), now.ino()) == target => {
                    println!("pid {} ({}): runs {} now", r.pid, r.what, exe.display());
                    break;
                }
                Err(_) => {
                    eprintln!("pid {} ({}): exited instead of re-executing", r.pid, r.what);
                    failed += 1;
                    break;
                }
                Ok(_) if Instant::now() >= deadline => {
                    eprintln!(
                        "pid {} ({}): still runs the previous binary after {} s (its log says \
                         why; it goes on with it)",
                        r.pid,
                        r.what,
                        WAIT.as_secs()
                    );
                    failed += 1;
                    break;
                }
                Ok(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// The path a replaced executable had (`/proc/PID/exe` adds " (deleted)").
fn strip_deleted(path: &Path) -> PathBuf {
    match path.to_str().and_then(|s| s.strip_suffix(" (deleted)")) {
        Some(path) => PathBuf::from(path),
        None => path.to_path_buf(),
    }
}

/// Every `agent` and `witness` process whose executable was `exe`.
fn find(exe: &Path) -> Vec<Running> {
    let me = std::process::id() as i32;
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(link) = std::fs::read_link(entry.path().join("exe")) else {
            continue;
        };
        if strip_deleted(&link) != exe {
            continue;
        }
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if matches!(args.get(1).map(String::as_str), Some("agent" | "witness")) {
            found.push(Running {
                pid,
                what: args[1..]
                    .iter()
                    .filter(|a| !a.is_empty())
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(" "),
            });
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replaced_binary_is_known_by_its_path() {
        assert_eq!(
            strip_deleted(Path::new("/usr/bin/mainstay (deleted)")),
            PathBuf::from("/usr/bin/mainstay")
        );
        assert_eq!(
            strip_deleted(Path::new("/usr/bin/mainstay")),
            PathBuf::from("/usr/bin/mainstay")
        );
    }
}
