//! Role-change hooks, as Patroni's callbacks: a command of the operator's
//! run when this node's PostgreSQL starts (`on_start`), stops (`on_stop`)
//! or changes role (`on_role_change`), with three arguments: the action,
//! the new role (`primary` or `replica`, `stopped` for `on_stop`) and the
//! cluster's name. Each runs to its end or its timeout (then it is killed)
//! before the next one starts, its output goes to the agent's log, and its
//! exit status is logged: never fire-and-forget. They follow the agent's
//! published state like every other subsystem, so a slow hook never holds
//! up a failover.

use mainstay_core::{PgRole, Published};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::watch;
use tracing::{Instrument, error, info, info_span, warn};

/// `[callbacks]` of the node's configuration, typed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Hooks {
    pub on_start: Option<Vec<String>>,
    pub on_stop: Option<Vec<String>>,
    pub on_role_change: Option<Vec<String>>,
    pub timeout: Duration,
}

impl Hooks {
    pub fn is_empty(&self) -> bool {
        self.on_start.is_none() && self.on_stop.is_none() && self.on_role_change.is_none()
    }
}

/// The hook a change of PostgreSQL's role calls for, with its arguments.
pub fn hook_for(before: PgRole, after: PgRole) -> Option<(&'static str, &'static str)> {
    let role = |r: PgRole| match r {
        PgRole::Primary => "primary",
        PgRole::Replica => "replica",
        PgRole::Stopped => "stopped",
    };
    match (before, after) {
        (b, a) if b == a => None,
        (PgRole::Stopped, a) => Some(("on_start", role(a))),
        (_, PgRole::Stopped) => Some(("on_stop", "stopped")),
        (_, a) => Some(("on_role_change", role(a))),
    }
}

/// Runs the hooks as this node's PostgreSQL changes role, one at a time.
/// Once `closing` turns true (the agent stops), the last change is acted
/// on and the task ends.
pub fn spawn(
    hooks: Hooks,
    mut published: watch::Receiver<Published>,
    mut closing: watch::Receiver<bool>,
    cluster: String,
    node: &str,
) -> tokio::task::JoinHandle<()> {
    let span = info_span!(parent: None, "hooks", node = %node);
    // Read now, not when the task first runs: a change published in
    // between would otherwise be taken for the starting point.
    let mut role = published.borrow_and_update().local.pg_role;
    tokio::spawn(
        async move {
            loop {
                let last = tokio::select! {
                    changed = published.changed() => changed.is_err(),
                    _ = closing.wait_for(|c| *c) => true,
                };
                let now = published.borrow_and_update().local.pg_role;
                if let Some((action, new_role)) = hook_for(role, now) {
                    role = now;
                    let command = match action {
                        "on_start" => &hooks.on_start,
                        "on_stop" => &hooks.on_stop,
                        _ => &hooks.on_role_change,
                    };
                    if let Some(argv) = command {
                        run(argv, action, new_role, &cluster, hooks.timeout).await;
                    }
                }
                if last {
                    return;
                }
            }
        }
        .instrument(span),
    )
}

async fn run(argv: &[String], action: &str, role: &str, cluster: &str, timeout: Duration) {
    let mut child = match tokio::process::Command::new(&argv[0])
        .args(&argv[1..])
        .args([action, role, cluster])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        // Its own group, so that a timeout kills whatever it started too.
        .process_group(0)
        .spawn()
    {
        Ok(child) => child,
        Err(err) => {
            error!(action, "cannot run the {action} hook {}: {err}", argv[0]);
            return;
        }
    };
    let forward = |stream: Option<Box<dyn tokio::io::AsyncRead + Unpin + Send>>| async move {
        if let Some(stream) = stream {
            let mut lines = BufReader::new(stream).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                info!(action, "hook: {line}");
            }
        }
    };
    let group = child.id().map(|pid| -(pid as i32));
    let stdout = child.stdout.take().map(|s| Box::new(s) as Box<_>);
    let stderr = child.stderr.take().map(|s| Box::new(s) as Box<_>);
    let output = async { tokio::join!(forward(stdout), forward(stderr)) };
    let finished = async {
        output.await;
        child.wait().await
    };
    match tokio::time::timeout(timeout, finished).await {
        Ok(Ok(status)) if status.success() => info!(action, role, "hook done"),
        Ok(Ok(status)) => warn!(action, role, %status, "hook failed"),
        Ok(Err(err)) => error!(action, "waiting for the hook: {err}"),
        Err(_) => {
            if let Some(group) = group {
                let _ = mainstay_sys::process::kill(group, libc::SIGKILL);
            }
            error!(action, ?timeout, "hook did not finish in time: killed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mainstay_core::LocalState;

    #[test]
    fn role_changes_call_the_matching_hook() {
        use PgRole::*;
        assert_eq!(hook_for(Stopped, Replica), Some(("on_start", "replica")));
        assert_eq!(hook_for(Stopped, Primary), Some(("on_start", "primary")));
        assert_eq!(
            hook_for(Replica, Primary),
            Some(("on_role_change", "primary"))
        );
        assert_eq!(
            hook_for(Primary, Replica),
            Some(("on_role_change", "replica"))
        );
        assert_eq!(hook_for(Primary, Stopped), Some(("on_stop", "stopped")));
        assert_eq!(hook_for(Replica, Replica), None);
    }

    #[tokio::test]
    async fn hooks_run_in_order_with_their_arguments_and_a_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let record = dir.path().join("calls");
        let script = format!("echo \"$@\" >> {}", record.display());
        let argv = |extra: &str| {
            vec![
                "/bin/sh".into(),
                "-c".into(),
                format!("{script}{extra}"),
                "hook".into(),
            ]
        };
        let hooks = Hooks {
            on_start: Some(argv("")),
            on_stop: Some(argv("")),
            // Too slow: killed at the timeout, and the next hook still runs.
            on_role_change: Some(argv("; sleep 30")),
            timeout: Duration::from_millis(300),
        };
        let published = watch::Sender::new(Published::default());
        let closing = watch::Sender::new(false);
        let task = spawn(
            hooks,
            published.subscribe(),
            closing.subscribe(),
            "ship".into(),
            "node1",
        );
        for role in [PgRole::Replica, PgRole::Primary, PgRole::Stopped] {
            published.send_modify(|p| {
                p.local = LocalState {
                    leading: role == PgRole::Primary,
                    pg_role: role,
                }
            });
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        closing.send_replace(true);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
        let calls = std::fs::read_to_string(&record).unwrap();
        assert_eq!(
            calls,
            "on_start replica ship\non_role_change primary ship\non_stop stopped ship\n"
        );
    }
}
