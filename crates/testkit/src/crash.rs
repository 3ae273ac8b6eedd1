//! A whole node crashing at one instant, as a host that loses power would:
//! the HA agent, the fencing guard (if any), the postmaster's process group
//! and every child of the postmaster stop together, so that no backend or
//! WAL sender outlives its postmaster and keeps shipping or acknowledging
//! WAL (which would flatter the loss figures of asynchronous replication).
//! The same function crashes a Patroni node and a mainstay node, in the
//! same order.
//!
//! PostgreSQL's children are not in the postmaster's process group: each
//! one calls `setsid()` when it starts (`InitPostmasterChild`, so that the
//! postmaster can signal a child's own children), and so leads a session
//! and a group of its own. A signal to the postmaster's group reaches the
//! postmaster alone; the children are found by their parent instead.

/// SIGSTOPs every process of the node first (nobody reacts to another's
/// death: a guard would fence, a backend would notice its postmaster gone),
/// then SIGKILLs them: the agent, the postmaster's parent when it is not the
/// agent (mainstay's guard), the postmaster's process group, and the
/// postmaster's children (listed once the postmaster is stopped, when it
/// can fork no more).
pub fn crash_node(agent: Option<u32>, postmaster: Option<i32>) {
    let me = std::process::id() as i32;
    let mut pids: Vec<i32> = agent.map(|p| p as i32).into_iter().collect();
    let mut group = None;
    if let Some(pm) = postmaster {
        if let Some(parent) = parent_of(pm)
            && parent > 1
            && parent != me
            && !pids.contains(&parent)
        {
            pids.push(parent);
        }
        pids.push(pm);
        // The group a test harness's own processes are in is never killed.
        group = process_group_of(pm).filter(|g| *g > 1 && Some(*g) != process_group_of(me));
    }
    let stop_all = |pids: &[i32], signal| {
        for pid in pids {
            signal_pid(*pid, signal);
        }
        if let Some(pgid) = group {
            signal_pid(-pgid, signal);
        }
    };
    stop_all(&pids, libc::SIGSTOP);
    // Stopped, the postmaster forks no more: its children are all there,
    // and still its children (a SIGKILLed parent's would be reparented).
    let children: Vec<i32> = postmaster
        .map(children_of)
        .unwrap_or_default()
        .into_iter()
        .filter(|c| *c > 1 && *c != me && !pids.contains(c))
        .collect();
    for child in &children {
        signal_pid(*child, libc::SIGSTOP);
    }
    pids.extend(children);
    stop_all(&pids, libc::SIGKILL);
}

/// A lab host loses power: every process in network namespace `ns` (a
/// name under `/run/netns`), whatever started it (agent, guards,
/// PostgreSQL, etcd member, supervised services), is SIGSTOPped, the
/// namespace is listed again until no new process shows up (a stopped
/// process forks no more), then all are SIGKILLed. Returns how many were
/// killed. The caller's own process is never among them.
pub fn crash_namespace(ns: &str) -> std::io::Result<usize> {
    use std::os::unix::fs::MetadataExt;
    let inode = std::fs::metadata(format!("/run/netns/{ns}"))?.ino();
    let me = std::process::id() as i32;
    let in_namespace = || -> Vec<i32> {
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| *pid != me)
            .filter(|pid| {
                std::fs::metadata(format!("/proc/{pid}/ns/net")).is_ok_and(|m| m.ino() == inode)
            })
            .collect()
    };
    let mut stopped: Vec<i32> = Vec::new();
    // Bounded: each round stops every process seen; one that forked in
    // between is caught by the next round.
    for _ in 0..20 {
        let fresh: Vec<i32> = in_namespace()
            .into_iter()
            .filter(|pid| !stopped.contains(pid))
            .collect();
        if fresh.is_empty() {
            break;
        }
        for pid in &fresh {
            signal_pid(*pid, libc::SIGSTOP);
        }
        stopped.extend(fresh);
    }
    for pid in &stopped {
        signal_pid(*pid, libc::SIGKILL);
    }
    Ok(stopped.len())
}

/// When process `pid` started, as time since boot (`/proc/<pid>/stat`'s
/// start time, in clock ticks: 10 ms on Linux).
pub fn started_since_boot(pid: i32) -> Option<std::time::Duration> {
    let ticks: u64 = stat_text_field(pid, 19)?.parse().ok()?;
    let per_second = mainstay_sys::process::clock_ticks_per_second();
    (per_second > 0).then(|| std::time::Duration::from_millis(ticks * 1000 / per_second as u64))
}

/// Whether `pid` is gone: no such process, or a zombie nobody reaped yet
/// (it runs no more).
pub fn gone(pid: i32) -> bool {
    matches!(
        stat_text_field(pid, 0).as_deref(),
        None | Some("Z") | Some("X")
    )
}

fn signal_pid(pid: i32, signal: i32) {
    // A pid gone already is ESRCH.
    let _ = mainstay_sys::process::kill(pid, signal);
}

/// The parent of `pid`, from `/proc/<pid>/stat`.
pub fn parent_of(pid: i32) -> Option<i32> {
    stat_field(pid, 1)
}

/// The process group of `pid`.
pub fn process_group_of(pid: i32) -> Option<i32> {
    stat_field(pid, 2)
}

/// The processes whose parent is `pid` (from `/proc`), in no particular
/// order. A process may start or end while the list is made: call it on a
/// stopped parent for a list that holds.
pub fn children_of(pid: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|p| parent_of(*p) == Some(pid))
        .collect()
}

/// Field `index` after the command name (0: state, 1: ppid, 2: pgrp).
fn stat_field(pid: i32, index: usize) -> Option<i32> {
    stat_text_field(pid, index)?.parse().ok()
}

fn stat_text_field(pid: i32, index: usize) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
    let after = stat.get(stat.rfind(')')? + 2..)?;
    after.split(' ').nth(index).map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;
    use std::process::Command;

    #[test]
    fn reads_parent_and_group() {
        let me = std::process::id() as i32;
        assert_eq!(parent_of(me), Some(mainstay_sys::process::getppid()));
        assert_eq!(process_group_of(me), Some(mainstay_sys::process::getpgrp()));
        assert_eq!(parent_of(-5), None);
    }

    #[test]
    fn kills_the_agent_the_parent_the_whole_group_and_every_child() {
        // "agent": a sleep; "postmaster": a shell in a group of its own with
        // two children: one in its group, one that made a session of its
        // own as every PostgreSQL child does.
        let mut agent = Command::new("sleep").arg("60").spawn().unwrap();
        let mut postmaster = Command::new("sh")
            .args(["-c", "sleep 60 & echo $!; setsid sleep 60 & echo $!; wait"])
            .stdout(std::process::Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap();
        let mut out = std::io::BufReader::new(postmaster.stdout.take().unwrap());
        let mut children = Vec::new();
        for _ in 0..2 {
            let mut line = String::new();
            std::io::BufRead::read_line(&mut out, &mut line).unwrap();
            children.push(line.trim().parse::<i32>().unwrap());
        }
        // Wait (bounded) until the second one leads its own session.
        let own_session = children[1];
        for _ in 0..200 {
            if stat_field(own_session, 3) == Some(own_session) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(stat_field(own_session, 3), Some(own_session));
        assert_ne!(process_group_of(own_session), Some(postmaster.id() as i32));
        crash_node(Some(agent.id()), Some(postmaster.id() as i32));
        assert!(agent.wait().unwrap().code().is_none(), "agent not killed");
        assert!(
            postmaster.wait().unwrap().code().is_none(),
            "postmaster not killed"
        );
        // The children were reparented; they must be gone too (bounded wait).
        for child in children {
            let gone = (0..200).any(|_| {
                // Gone, or a zombie that init has not reaped yet.
                let state = std::fs::read_to_string(format!("/proc/{child}/stat"))
                    .ok()
                    .and_then(|s| s.get(s.rfind(')')? + 2..)?.chars().next());
                let gone = matches!(state, None | Some('Z' | 'X'));
                if !gone {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                gone
            });
            assert!(gone, "child {child} of the postmaster survived");
        }
    }

    #[test]
    fn lists_children() {
        let mut child = Command::new("sleep").arg("60").spawn().unwrap();
        let me = std::process::id() as i32;
        assert!(children_of(me).contains(&(child.id() as i32)));
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(!children_of(me).contains(&(child.id() as i32)));
    }
}
