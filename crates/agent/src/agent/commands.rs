//! Operator commands handed over by the REST API (`restart`, `reinitialize`,
//! `drill/crash`, `remove`): run between two turns, by the only code that
//! touches PostgreSQL.

use super::*;

impl<D: Dcs> Agent<D> {
    /// `POST /restart` and `POST /reinitialize`, between two turns.
    pub(super) async fn run_command(
        &mut self,
        command: Command,
    ) -> Result<String, (CommandRefusal, String)> {
        let refuse = |code: CommandRefusal, reason: &str| Err((code, reason.to_string()));
        let view = self.last_view.clone();
        let lease = *self.lease.borrow();
        let leading = view.as_ref().is_some_and(|v| {
            v.leader
                .as_ref()
                .is_some_and(|l| l.name == self.name && Some(l.lease_id) == lease.id)
        });
        let leader_target = match view.as_ref().and_then(|v| v.leader_name()) {
            Some(leader) if leader != self.name => self.target(view.as_ref(), leader).ok(),
            _ => None,
        };
        let internal = |e: TurnError| match e {
            TurnError::Failed(r) | TurnError::Fatal(r) => (CommandRefusal::Failed, r),
        };
        let leader_only = |what: &str| {
            let leader = view
                .as_ref()
                .and_then(|v| v.leader_name())
                .unwrap_or("nobody");
            Err((
                CommandRefusal::Conflict,
                format!("{what}: send this to {leader}"),
            ))
        };
        match command {
            Command::RestartService(name) => match &self.services {
                Some(services) if services.restart(&name) => {
                    info!(
                        service = name,
                        "restart of a service requested through the REST API"
                    );
                    Ok(format!("restarting service {name}"))
                }
                _ => refuse(
                    CommandRefusal::NotFound,
                    &format!("this node has no service {name:?} (see GET /services)"),
                ),
            },
            Command::Remove(name) => {
                if !leading {
                    return leader_only("only the leader removes members");
                }
                if name == self.name {
                    return refuse(CommandRefusal::Conflict, "the leader cannot remove itself");
                }
                // The loop's view may predate the key's expiry: ask etcd now.
                let fresh =
                    tokio::time::timeout(self.timing.dcs_timeout, self.dcs.read_cluster()).await;
                let Ok(Ok(fresh)) = fresh else {
                    return refuse(CommandRefusal::Unavailable, "cannot read the DCS now");
                };
                if fresh.members.contains_key(&name) {
                    return refuse(
                        CommandRefusal::Conflict,
                        &format!(
                            "{name}'s agent is still running (its member key is live): stop it \
                             first, then remove it"
                        ),
                    );
                }
                let known = self.core.forget_member(&name);
                if !known {
                    return refuse(
                        CommandRefusal::NotFound,
                        &format!("{name} is not a member this leader keeps anything for"),
                    );
                }
                warn!(
                    member = name,
                    "member removed: its replication slot goes now"
                );
                self.wake.notify_one();
                Ok(format!("{name} removed: its replication slot is dropped"))
            }
            Command::CrashDrill => {
                if let Some(until) = self.stand_down_until.filter(|u| Instant::now() < *u) {
                    return refuse(
                        CommandRefusal::Conflict,
                        &format!(
                            "a crash drill is already running here: PostgreSQL is stopped and \
                             the lease left to expire; this node stands down for {} s more",
                            until.saturating_duration_since(Instant::now()).as_secs()
                        ),
                    );
                }
                if !leading {
                    return leader_only("a crash drill runs on the leader");
                }
                if self.dynamic.pause {
                    return refuse(
                        CommandRefusal::Conflict,
                        "the cluster is paused: nothing would take over; resume it first",
                    );
                }
                let Some(view) = view else {
                    return refuse(CommandRefusal::Unavailable, "no view of the cluster yet");
                };
                let successors: Vec<&str> = view
                    .members
                    .values()
                    .map(|m| &m.status)
                    .filter(|s| {
                        s.name != self.name
                            && s.role == PgRole::Replica
                            && s.streaming
                            && !s.tags.nofailover
                            && (!self.dynamic.synchronous_mode
                                || mainstay_core::sync::may_take_over(&view, &s.name))
                    })
                    .map(|s| s.name.as_str())
                    .collect();
                if successors.is_empty() {
                    return refuse(
                        CommandRefusal::Conflict,
                        "no streaming replica could take over (nofailover tags, not \
                         streaming, or not synchronous): the drill would only cause an outage",
                    );
                }
                let until = Instant::now() + self.timing.crash_drill_limit();
                warn!(
                    ?successors,
                    "crash drill requested through the REST API: stopping PostgreSQL hard \
                     (immediate) and letting the lease expire, as if this host died"
                );
                // Stopped first: should that fail, nothing else changed and
                // the node keeps its role (renewals go on).
                self.stop(StopMode::Immediate).await.map_err(internal)?;
                self.renewals_paused.store(true, Ordering::SeqCst);
                self.stand_down_until = Some(until);
                self.wake.notify_one();
                Ok(format!(
                    "PostgreSQL stopped hard on {}; its lease expires without renewal and one \
                     of {} takes over",
                    self.name,
                    successors.join(", ")
                ))
            }
            Command::Restart => {
                if !self.pg.is_running() {
                    return refuse(
                        CommandRefusal::Conflict,
                        "PostgreSQL is not running here: nothing to restart",
                    );
                }
                let primary = self.fencer.writable();
                if primary && !leading {
                    return refuse(
                        CommandRefusal::Conflict,
                        "this primary does not hold the leader key: it is being fenced",
                    );
                }
                let settings = self.pg.settings();
                let problems = mainstay_pg::check_data_dir(
                    &settings.bin_dir,
                    settings.run_as.as_deref(),
                    &settings.data_dir,
                )
                .await
                .map_err(|e| (CommandRefusal::Failed, e.to_string()))?;
                if !problems.is_empty() {
                    let problems: Vec<String> = problems.into_iter().map(|p| p.message).collect();
                    return refuse(
                        CommandRefusal::Conflict,
                        &format!(
                            "not restarting: PostgreSQL would not start with its configuration \
                             files as they are ({}); fix them first, the server keeps running",
                            problems.join("; ")
                        ),
                    );
                }
                // A restart right after `edit-config` starts with the change:
                // the stored configuration is read now, not at the next turn.
                if let Ok(Ok(view)) =
                    tokio::time::timeout(self.timing.dcs_timeout, self.dcs.read_cluster()).await
                {
                    self.absorb_dynamic_config(&view);
                }
                if std::mem::take(&mut self.parameters_dirty) {
                    self.apply_parameters().await;
                }
                warn!(primary, "restart requested through the REST API");
                self.stop(StopMode::Fast).await.map_err(internal)?;
                let role = if primary {
                    self.fencer.set_writable(true);
                    StartRole::Primary
                } else {
                    StartRole::Replica {
                        leader: leader_target.as_ref().map(|(t, _)| t.clone()),
                    }
                };
                let started = self.start_pg(role).await;
                self.forget_writable_if_stopped();
                started.map_err(|e| (CommandRefusal::Failed, format!("start: {e}")))?;
                if !primary {
                    self.following = leader_target.map(|(t, _)| t.name);
                }
                self.wake.notify_one();
                if let Some(reason) = self.parameters.fallback() {
                    return refuse(
                        CommandRefusal::Conflict,
                        &format!(
                            "PostgreSQL restarted, but on the last parameters it started with: \
                             {reason}; fix the configuration (`mainstay ctl edit-config`) and \
                             restart again"
                        ),
                    );
                }
                Ok("PostgreSQL restarted".into())
            }
            Command::Reinitialize => {
                if leading || self.fencer.writable() {
                    return refuse(
                        CommandRefusal::Conflict,
                        "the leader cannot be reinitialized: switch over first",
                    );
                }
                let Some((target, status)) = leader_target else {
                    return refuse(
                        CommandRefusal::Unavailable,
                        "there is no leader to clone from",
                    );
                };
                if status.role != PgRole::Primary {
                    return refuse(
                        CommandRefusal::Unavailable,
                        "the leader's PostgreSQL is not running as primary yet",
                    );
                }
                warn!(
                    from = target.name,
                    "reinitialize requested through the REST API"
                );
                if self.pg.is_running() {
                    self.stop(StopMode::Fast).await.map_err(internal)?;
                }
                if !matches!(
                    self.pg.data_dir_state(),
                    DataDirState::Missing | DataDirState::Empty
                ) {
                    self.reclone(&target, "reinitialize requested")
                        .await
                        .map_err(internal)?;
                } else {
                    self.pg
                        .basebackup(&target)
                        .await
                        .map_err(|e| (CommandRefusal::Failed, format!("pg_basebackup: {e}")))?;
                }
                self.start_pg(StartRole::Replica {
                    leader: Some(target.clone()),
                })
                .await
                .map_err(|e| (CommandRefusal::Failed, format!("start: {e}")))?;
                self.following = Some(target.name.clone());
                self.wake.notify_one();
                Ok(format!(
                    "reinitialized from {}; the old data directory was moved aside",
                    target.name
                ))
            }
        }
    }
}
