//! The postmaster across an exec of the agent (`systemctl reload`, a
//! package upgrade): the agent hands its guard's socket and pids to the
//! binary it re-executes, which takes the postmaster over as its own. The
//! server keeps running and keeps its fencing deadline throughout: the
//! guard never sees its socket close.

use super::*;

/// What the re-executed agent needs to take the postmaster over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PostmasterHandover {
    pub guard: mainstay_guarded::Handover,
    /// Whether it may accept writes, and until when (the guard holds the
    /// same deadline).
    pub writable: bool,
    pub deadline: BootTime,
}

impl Postgres {
    /// The running postmaster's guard socket, kept open across an exec,
    /// with the fencing state; `None` when no postmaster of ours runs.
    pub fn hand_over(&self) -> Result<Option<PostmasterHandover>> {
        let guarded = poison::lock(&self.child);
        let Some(pm) = guarded
            .postmaster
            .as_ref()
            .filter(|pm| pm.exit_status().is_none())
        else {
            return Ok(None);
        };
        let guard = pm
            .hand_over()
            .map_err(|e| Error::io("keep the fencing guard's socket across the exec", e))?;
        Ok(guard.map(|guard| PostmasterHandover {
            guard,
            writable: guarded.writable,
            deadline: guarded.deadline,
        }))
    }

    /// After a failed exec: the guard's socket is private again.
    pub fn cancel_hand_over(&self) {
        if let Some(pm) = poison::lock(&self.child).postmaster.as_ref() {
            pm.keep_private();
        }
    }

    /// Takes over the postmaster the previous image of this process ran:
    /// from now on it is this agent's, as if started here.
    pub fn adopt(&self, handover: PostmasterHandover) -> Result<()> {
        let pm = Postmaster::adopt(handover.guard, "postgres")
            .map_err(|e| Error::io("take over the fencing guard", e))?;
        info!(
            pid = pm.pid(),
            guard = handover.guard.guard_pid,
            writable = handover.writable,
            "postgres taken over from the agent this one re-executed"
        );
        let mut guarded = poison::lock(&self.child);
        guarded.postmaster = Some(pm);
        guarded.writable = handover.writable;
        guarded.deadline = handover.deadline;
        Ok(())
    }
}
