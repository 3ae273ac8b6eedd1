//! A whole node crashing at one instant, as a host that loses power would:
//! the HA agent, the fencing guard (if any) and every process of the
//! postmaster's process group stop together, so that no backend or WAL
//! sender outlives its postmaster and keeps shipping or acknowledging WAL
//! (which would flatter the loss figures of asynchronous replication). The
//! same function crashes a Patroni node and a mainstay node, in the same
//! order.

/// SIGSTOPs every process of the node first (nobody reacts to another's
/// death: a guard would fence, a backend would notice its postmaster gone),
/// then SIGKILLs them: the agent, the postmaster's parent when it is not the
/// agent (mainstay's guard), and the postmaster's process group.
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
    for signal in [libc::SIGSTOP, libc::SIGKILL] {
        for pid in &pids {
            signal_pid(*pid, signal);
        }
        if let Some(pgid) = group {
            signal_pid(-pgid, signal);
        }
    }
}

fn signal_pid(pid: i32, signal: i32) {
    // SAFETY: kill(2) has no memory effects; a pid gone already is ESRCH.
    unsafe { libc::kill(pid, signal) };
}

/// The parent of `pid`, from `/proc/<pid>/stat`.
pub fn parent_of(pid: i32) -> Option<i32> {
    stat_field(pid, 1)
}

/// The process group of `pid`.
pub fn process_group_of(pid: i32) -> Option<i32> {
    stat_field(pid, 2)
}

/// Field `index` after the command name (0: state, 1: ppid, 2: pgrp).
fn stat_field(pid: i32, index: usize) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
    let after = stat.get(stat.rfind(')')? + 2..)?;
    after.split(' ').nth(index)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;
    use std::process::Command;

    #[test]
    fn reads_parent_and_group() {
        let me = std::process::id() as i32;
        assert_eq!(parent_of(me), Some(unsafe { libc::getppid() }));
        assert_eq!(process_group_of(me), Some(unsafe { libc::getpgrp() }));
        assert_eq!(parent_of(-5), None);
    }

    #[test]
    fn kills_the_agent_the_parent_and_the_whole_group() {
        // "agent": a sleep; "postmaster": a shell in a group of its own with
        // a child of its own (a "backend").
        let mut agent = Command::new("sleep").arg("60").spawn().unwrap();
        let mut postmaster = Command::new("sh")
            .args(["-c", "sleep 60 & echo $!; wait"])
            .stdout(std::process::Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(postmaster.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        let backend: i32 = line.trim().parse().unwrap();
        crash_node(Some(agent.id()), Some(postmaster.id() as i32));
        assert!(agent.wait().unwrap().code().is_none(), "agent not killed");
        assert!(
            postmaster.wait().unwrap().code().is_none(),
            "postmaster not killed"
        );
        // The backend was reparented; it must be gone too (bounded wait).
        for _ in 0..200 {
            // Gone, or a zombie that init has not reaped yet.
            let state = std::fs::read_to_string(format!("/proc/{backend}/stat"))
                .ok()
                .and_then(|s| s.get(s.rfind(')')? + 2..)?.chars().next());
            if matches!(state, None | Some('Z' | 'X')) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("a process of the postmaster's group survived");
    }
}
