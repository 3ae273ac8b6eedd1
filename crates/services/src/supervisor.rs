//! The supervisor: one task per service that keeps it where the election
//! puts it. It follows what the agent publishes (is this node leading, is
//! its PostgreSQL a replica), starts a service once it belongs here and the
//! services it depends on run, checks its health, restarts it with backoff,
//! gives up past its limit, and stops it (signal, grace, kill) when it no
//! longer belongs here. For a `with-leader` service it also relays every
//! new fencing deadline to the service's guard, which kills the service at
//! that deadline if the agent is no longer there to stop it.

use crate::check;
use crate::process::Running;
use crate::rules::{AfterFailure, Backoff, belongs_here};
use crate::spec::{OnFailure, Placement, ServiceSpec};
use crate::status::{ServiceState, ServiceStatus};
use mainstay_core::Published;
use mainstay_guard::BootTime;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tracing::{Instrument, error, info, info_span, warn};

/// How often a running service's log is looked at for rotation.
const LOG_CHECK_EVERY: Duration = Duration::from_secs(5);

/// What every service task shares.
#[derive(Clone)]
pub struct Inputs {
    /// The agent's published view of the cluster and of this node.
    pub published: watch::Receiver<Published>,
    /// This node's fencing deadline: what a `with-leader` service's guard
    /// enforces.
    pub deadline: watch::Receiver<BootTime>,
    /// The program run as `guard` (the agent's own binary).
    pub guard_program: PathBuf,
}

/// The running supervisor.
pub struct Services {
    statuses: watch::Sender<Vec<ServiceStatus>>,
    tasks: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Turns to false to make every service stop (agent shutdown, or
    /// before the leader hands over); back to true to let them run.
    allowed: watch::Sender<Allowed>,
    restart: Vec<Arc<Notify>>,
    names: Vec<String>,
    /// Each service's placement, in start order (as `statuses`).
    placements: Vec<Placement>,
    stop_limit: Duration,
    /// Services whose give-up hands leadership over.
    moves_leadership: Vec<String>,
}

/// Which services may run at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Allowed {
    All,
    /// Everything but `with-leader` services (a leader about to hand over).
    NotWithLeader,
    /// Nothing (the agent stops).
    Nothing,
}

impl Services {
    /// Starts one task per service (`specs` in start order).
    pub fn start(specs: Vec<ServiceSpec>, inputs: Inputs, node: &str) -> Services {
        let statuses = watch::Sender::new(specs.iter().map(initial_status).collect());
        let allowed = watch::Sender::new(Allowed::All);
        let mut tasks = Vec::new();
        let mut restart = Vec::new();
        let names = specs.iter().map(|s| s.name.clone()).collect();
        let placements = specs.iter().map(|s| s.placement).collect();
        let moves_leadership = specs
            .iter()
            .filter(|s| s.placement == Placement::WithLeader && s.on_failure == OnFailure::Failover)
            .map(|s| s.name.clone())
            .collect();
        let stop_limit = specs.iter().map(|s| s.stop_grace).max().unwrap_or_default()
            + crate::process::KILL_WAIT;
        for (index, spec) in specs.into_iter().enumerate() {
            let notify = Arc::new(Notify::new());
            restart.push(notify.clone());
            let span = info_span!(parent: None, "service", node = %node, name = %spec.name);
            let task = Task {
                index,
                spec,
                inputs: inputs.clone(),
                statuses: statuses.clone(),
                allowed: allowed.subscribe(),
                restart: notify,
            };
            tasks.push(tokio::spawn(task.run().instrument(span)));
        }
        Services {
            statuses,
            tasks: std::sync::Mutex::new(tasks),
            allowed,
            restart,
            names,
            placements,
            stop_limit,
            moves_leadership,
        }
    }

    /// Long enough for every service to stop: the longest grace, and the
    /// time a kill takes to be reaped.
    pub fn stop_limit(&self) -> Duration {
        self.stop_limit
    }

    /// The `with-leader` services with `on_failure = "failover"` that gave up
    /// on this node, each with why: the HA loop then hands leadership to a
    /// replica, unless the service failed there too.
    pub fn failover_wanted(&self) -> Vec<(String, String)> {
        self.statuses
            .borrow()
            .iter()
            .filter(|s| s.state == ServiceState::Failed && self.moves_leadership.contains(&s.name))
            .map(|s| (s.name.clone(), s.reason.clone().unwrap_or_default()))
            .collect()
    }

    /// Every service's status, in start order.
    pub fn statuses(&self) -> watch::Receiver<Vec<ServiceStatus>> {
        self.statuses.subscribe()
    }

    /// Restarts a service now (an operator's request): its restart history
    /// is forgotten, a failed one gets another chance. False if unknown.
    pub fn restart(&self, name: &str) -> bool {
        match self.names.iter().position(|n| n == name) {
            Some(index) => {
                self.restart[index].notify_one();
                true
            }
            None => false,
        }
    }

    /// Lets `allowed` services run, without waiting.
    pub fn allow_now(&self, allowed: Allowed) {
        self.allowed.send_replace(allowed);
    }

    /// Lets `allowed` services run and waits (up to `limit`) until every
    /// other one has stopped.
    pub async fn allow(&self, allowed: Allowed, limit: Duration) {
        self.allowed.send_replace(allowed);
        let mut statuses = self.statuses.subscribe();
        let _ = tokio::time::timeout(
            limit,
            statuses.wait_for(|all| {
                all.iter()
                    .zip(&self.placements)
                    .all(|(s, placement)| may_run(allowed, *placement) || s.pid.is_none())
            }),
        )
        .await;
    }

    /// Stops every service, each with its signal and grace, and ends the
    /// tasks.
    pub async fn stop(&self, limit: Duration) {
        self.allow(Allowed::Nothing, limit).await;
        for task in mainstay_core::poison::lock(&self.tasks).drain(..) {
            task.abort();
        }
    }
}

fn may_run(allowed: Allowed, placement: Placement) -> bool {
    match allowed {
        Allowed::All => true,
        Allowed::NotWithLeader => placement != Placement::WithLeader,
        Allowed::Nothing => false,
    }
}

fn initial_status(spec: &ServiceSpec) -> ServiceStatus {
    ServiceStatus {
        name: spec.name.clone(),
        placement: spec.placement.label(),
        state: ServiceState::Stopped,
        pid: None,
        restarts: 0,
        check_failures: 0,
        last_check: None,
        since: unix_now(),
        reason: None,
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

struct Task {
    index: usize,
    spec: ServiceSpec,
    inputs: Inputs,
    statuses: watch::Sender<Vec<ServiceStatus>>,
    allowed: watch::Receiver<Allowed>,
    restart: Arc<Notify>,
}

/// A run in progress and what its checks have said.
struct Run {
    process: Running,
    started: Instant,
    healthy: bool,
    /// Consecutive failures per check, and when each check runs next.
    failures: Vec<u32>,
    next_check: Vec<Instant>,
}

impl Task {
    async fn run(mut self) {
        let mut backoff = Backoff::new(self.spec.restart);
        let mut run: Option<Run> = None;
        let mut retry_at: Option<Instant> = None;
        let mut failed = false;
        let mut statuses = self.statuses.subscribe();
        let mut next_log_check = Instant::now();
        loop {
            let now = Instant::now();
            let local = self.inputs.published.borrow_and_update().local.clone();
            let allowed = may_run(*self.allowed.borrow_and_update(), self.spec.placement);
            let placed = allowed && belongs_here(self.spec.placement, &local);
            if !placed {
                // A new placement is a new start: old failures are forgotten,
                // except a give-up that moved leadership away: it stays
                // `failed` (and published) so that the cluster never moves
                // back here for this service on its own, until an operator
                // restarts it.
                backoff.reset();
                retry_at = None;
                if self.spec.on_failure != OnFailure::Failover {
                    failed = false;
                }
                if run.is_none() && !failed {
                    self.set(ServiceState::Stopped, None, None);
                }
            }
            let deps_up = self.dependencies_up(&statuses.borrow_and_update());
            if let Some(current) = &mut run {
                if let Some(status) = current.process.exit_status() {
                    let why = format!("exited ({status})");
                    run = None;
                    self.failure(&mut backoff, &mut retry_at, &mut failed, why);
                    continue;
                }
                if !placed {
                    self.stop(current, "no longer placed on this node").await;
                    run = None;
                    self.set(ServiceState::Stopped, None, None);
                    continue;
                }
                if let Some(why) = self.check(current, now).await {
                    let current = run.take().expect("checked above");
                    self.stop(&current, &why).await;
                    self.failure(&mut backoff, &mut retry_at, &mut failed, why);
                    continue;
                }
                if now >= next_log_check {
                    next_log_check = now + LOG_CHECK_EVERY;
                    if let Err(err) = crate::log::rotate_if_full(&self.spec.log) {
                        warn!("cannot rotate {}: {err}", self.spec.log.path.display());
                    }
                }
            } else if placed && !failed && retry_at.is_none_or(|at| now >= at) {
                if !deps_up {
                    self.set(ServiceState::Waiting, None, None);
                } else {
                    retry_at = None;
                    match self.start().await {
                        Ok(started) => run = Some(started),
                        Err(why) => {
                            self.failure(&mut backoff, &mut retry_at, &mut failed, why);
                            continue;
                        }
                    }
                }
            }
            let wake_at = [
                retry_at,
                run.as_ref()
                    .and_then(|r| r.next_check.iter().min().copied()),
                run.as_ref()
                    .filter(|r| !r.healthy)
                    .map(|r| r.started + self.spec.start_timeout),
                run.as_ref().map(|_| next_log_check),
            ]
            .into_iter()
            .flatten()
            .min();
            let sleep = async {
                match wake_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let exited = async {
                match &run {
                    Some(current) => {
                        current.process.exited().await;
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                changed = self.inputs.published.changed() => if changed.is_err() { break },
                changed = self.allowed.changed() => if changed.is_err() { break },
                changed = statuses.changed() => if changed.is_err() { break },
                changed = self.inputs.deadline.changed() => {
                    if changed.is_err() { break }
                    if let Some(current) = &run {
                        current.process.extend(*self.inputs.deadline.borrow_and_update());
                    }
                }
                _ = self.restart.notified() => {
                    info!("restart requested by an operator");
                    backoff.reset();
                    retry_at = None;
                    failed = false;
                    if let Some(current) = run.take() {
                        self.stop(&current, "restart requested").await;
                        self.set(ServiceState::Stopped, None, Some("restarted by an operator".into()));
                    }
                }
                _ = exited => {}
                _ = sleep => {}
            }
        }
        if let Some(current) = run {
            self.stop(&current, "the supervisor ends").await;
        }
    }

    fn dependencies_up(&self, statuses: &[ServiceStatus]) -> bool {
        self.spec.depends_on.iter().all(|need| {
            statuses
                .iter()
                .find(|s| &s.name == need)
                .is_some_and(ServiceStatus::up)
        })
    }

    async fn start(&mut self) -> Result<Run, String> {
        let deadline = *self.inputs.deadline.borrow();
        let process = Running::start(&self.spec, &self.inputs.guard_program, deadline)
            .await
            .map_err(|err| format!("cannot start: {err}"))?;
        info!(
            pid = process.pid(),
            placement = self.spec.placement.label(),
            log = %self.spec.log.path.display(),
            "service started"
        );
        let now = Instant::now();
        let healthy = self.spec.checks.is_empty();
        self.update(|status| {
            status.state = if healthy {
                ServiceState::Running
            } else {
                ServiceState::Starting
            };
            status.pid = Some(process.pid());
            status.reason = None;
        });
        Ok(Run {
            process,
            started: now,
            healthy,
            failures: vec![0; self.spec.checks.len()],
            next_check: self.spec.checks.iter().map(|_| now).collect(),
        })
    }

    /// Runs the checks that are due; `Some(why)` when the service must be
    /// restarted (a check failed too often, or it never became healthy).
    async fn check(&mut self, run: &mut Run, now: Instant) -> Option<String> {
        for (i, check) in self.spec.checks.iter().enumerate() {
            if now < run.next_check[i] {
                continue;
            }
            run.next_check[i] = now + check.interval;
            let alive = run.process.exit_status().is_none();
            let verdict = check::probe(&check.probe, check.timeout, alive).await;
            match &verdict {
                Ok(()) => run.failures[i] = 0,
                Err(why) => {
                    run.failures[i] += 1;
                    if run.healthy {
                        warn!(failures = run.failures[i], "health check failed: {why}");
                    }
                }
            }
            let failures = run.failures[i];
            self.update(|status| {
                status.last_check = Some(match &verdict {
                    Ok(()) => "ok".into(),
                    Err(why) => why.clone(),
                });
                if verdict.is_err() {
                    status.check_failures += 1;
                }
            });
            if run.healthy && failures >= check.failures {
                return Some(format!(
                    "unhealthy: {failures} checks failed in a row ({})",
                    verdict.err().unwrap_or_default()
                ));
            }
        }
        if !run.healthy {
            if run.failures.iter().all(|f| *f == 0) {
                run.healthy = true;
                info!(after = ?run.started.elapsed(), "service healthy");
                self.set(ServiceState::Running, Some(run.process.pid()), None);
            } else if now >= run.started + self.spec.start_timeout {
                return Some(format!(
                    "not healthy within start_timeout ({:?})",
                    self.spec.start_timeout
                ));
            }
        }
        None
    }

    async fn stop(&self, run: &Run, why: &str) {
        self.set(
            ServiceState::Stopping,
            Some(run.process.pid()),
            Some(why.into()),
        );
        let status = run
            .process
            .stop(self.spec.stop_signal, self.spec.stop_grace)
            .await;
        match status {
            Some(status) => info!(?status, "service stopped: {why}"),
            None => error!("service did not stop after SIGKILL: {why}"),
        }
    }

    fn failure(
        &self,
        backoff: &mut Backoff,
        retry_at: &mut Option<Instant>,
        failed: &mut bool,
        why: String,
    ) {
        self.update(|status| status.restarts += 1);
        match backoff.after_failure(Instant::now().into_std()) {
            AfterFailure::RestartAt(at) => {
                let at = Instant::from_std(at);
                warn!(in_ = ?at.saturating_duration_since(Instant::now()), "service failed, restarting: {why}");
                *retry_at = Some(at);
                self.set(ServiceState::BackingOff, None, Some(why));
            }
            AfterFailure::GiveUp => {
                error!(
                    limit = self.spec.restart.limit,
                    window = ?self.spec.restart.window,
                    "service failed too often, giving up until its placement changes or an \
                     operator restarts it: {why}"
                );
                *failed = true;
                self.set(ServiceState::Failed, None, Some(why));
            }
        }
    }

    fn set(&self, state: ServiceState, pid: Option<i32>, reason: Option<String>) {
        self.update(|status| {
            status.state = state;
            status.pid = pid;
            if reason.is_some() || state == ServiceState::Running {
                status.reason = reason;
            }
        });
    }

    fn update(&self, change: impl FnOnce(&mut ServiceStatus)) {
        let index = self.index;
        self.statuses.send_if_modified(|all| {
            let before = all[index].clone();
            change(&mut all[index]);
            if all[index].state != before.state {
                all[index].since = unix_now();
            }
            all[index] != before
        });
    }
}
