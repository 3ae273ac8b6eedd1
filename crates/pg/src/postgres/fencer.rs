//! Whether this node's PostgreSQL may be writable and until when, relayed
//! to the postmaster's fencing guard; fencing at once without async.

use super::*;

/// The postmaster this process started, and what its guard must enforce.
pub(super) struct Guarded {
    pub(super) postmaster: Option<Postmaster>,
    /// PostgreSQL may accept writes (a primary, or about to become one).
    pub(super) writable: bool,
    /// Past this instant a writable PostgreSQL must be stopped.
    pub(super) deadline: BootTime,
}

impl Guarded {
    pub(super) fn order(&self) -> ToGuard {
        if self.writable {
            ToGuard::Arm(self.deadline)
        } else {
            ToGuard::Disarm
        }
    }

    pub(super) fn tell_guard(&self) {
        if let Some(pm) = self
            .postmaster
            .as_ref()
            .filter(|pm| pm.exit_status().is_none())
        {
            pm.tell(&self.order());
        }
    }
}

/// Fencing for one node's PostgreSQL, usable from any task or thread,
/// without async and without waiting. The postmaster's guard enforces what
/// this is told: while `writable`, the server is stopped at `deadline`
/// unless the deadline is extended, whether or not this process still runs.
#[derive(Clone)]
pub struct Fencer {
    pub(super) data_dir: PathBuf,
    pub(super) child: Arc<Mutex<Guarded>>,
}

impl Fencer {
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, Guarded> {
        poison::lock(&self.child)
    }

    /// Whether PostgreSQL may accept writes (as last set).
    pub fn writable(&self) -> bool {
        self.lock().writable
    }

    /// Declares whether PostgreSQL may accept writes. Set it *before* a
    /// server becomes writable (start as primary, promotion), so that the
    /// guard enforces the deadline from the server's first moment.
    pub fn set_writable(&self, writable: bool) {
        let mut guarded = self.lock();
        if guarded.writable != writable {
            guarded.writable = writable;
            guarded.tell_guard();
        }
    }

    /// Moves the deadline, earlier or later: the latest one counts.
    pub fn set_deadline(&self, deadline: BootTime) {
        let mut guarded = self.lock();
        if guarded.deadline != deadline {
            guarded.deadline = deadline;
            if guarded.writable {
                guarded.tell_guard();
            }
        }
    }

    /// Stops PostgreSQL now: its guard kills every PostgreSQL process.
    /// Returns whether a postmaster was told to stop.
    pub fn fence_now(&self) -> bool {
        let ours = self.lock().postmaster.clone();
        if let Some(pm) = ours
            && pm.exit_status().is_none()
            && pm.tell(&ToGuard::Fence)
        {
            warn!(
                pid = pm.pid(),
                "fencing: told the guard to kill every postgres process"
            );
            return true;
        }
        // A postmaster this process did not start (left by an earlier agent).
        if let Some(pf) = pidfile::read(&self.data_dir)
            && pidfile::is_postmaster_of(pf.pid, &self.data_dir)
            && process::kill(pf.pid, libc::SIGQUIT).is_ok()
        {
            warn!(
                pid = pf.pid,
                "fencing: sent SIGQUIT (immediate shutdown) to a postgres not started by us"
            );
            return true;
        }
        false
    }
}
