//! The action interpreter: what the core decided, done with PostgreSQL and
//! the DCS, stopping at the first failure.

use super::*;

impl<D: Dcs> Agent<D> {
    pub(super) async fn execute(
        &mut self,
        action: &Action,
        view: Option<&ClusterView>,
        local: &LocalPg,
        lease: Option<i64>,
    ) -> Result<(), TurnError> {
        let failed =
            |what: &str, err: &dyn std::fmt::Display| TurnError::Failed(format!("{what}: {err}"));
        let dcs_failed = |err: mainstay_dcs::DcsError| TurnError::Failed(format!("DCS: {err}"));
        let lease_id = || lease.ok_or_else(|| TurnError::Failed("no lease yet".into()));
        let now_text = || now_rfc3339();
        match action {
            Action::RegisterExistingData { system_id } => {
                warn!(
                    system_id,
                    "the DCS holds no cluster record: registering the existing data, never \
                     re-initializing; until a leader runs on it, only a node whose data last ran \
                     as the primary may lead"
                );
                let record = InitializeRecord {
                    system_id: Some(system_id.clone()),
                    by: self.name.clone(),
                    at: now_text(),
                    awaiting_first_leader: true,
                };
                let created = self
                    .dcs
                    .create_initialize(&record)
                    .await
                    .map_err(dcs_failed)?;
                if created && view.is_some_and(|v| v.config.is_none()) {
                    self.write_back_dynamic_config().await;
                }
            }
            Action::ClaimInitialize | Action::AcquireLeader
                if let Some(reason) = self.parameters.fallback() =>
            {
                return Err(TurnError::Failed(format!(
                    "not taking the leader key: PostgreSQL runs on fallback parameters ({reason})"
                )));
            }
            Action::ClaimInitialize | Action::AcquireLeader
                if let Some(reason) = self.watchdog.blocks_leadership() =>
            {
                return Err(TurnError::Failed(format!(
                    "not taking the leader key: watchdog.mode = \"required\" and the watchdog \
                     is unusable: {reason}"
                )));
            }
            Action::ClaimInitialize => {
                let record = InitializeRecord {
                    system_id: None,
                    by: self.name.clone(),
                    at: now_text(),
                    awaiting_first_leader: false,
                };
                if !self
                    .dcs
                    .create_initialize(&record)
                    .await
                    .map_err(dcs_failed)?
                {
                    return Err(TurnError::Failed(
                        "another node claimed the bootstrap first".into(),
                    ));
                }
            }
            Action::AbandonBootstrap {
                initialize_revision,
            } => {
                self.dcs
                    .delete_initialize(*initialize_revision)
                    .await
                    .map_err(dcs_failed)?;
            }
            Action::Bootstrap => self.bootstrap(view).await?,
            Action::RecordSystemId {
                system_id,
                initialize_revision,
            } => {
                let record = InitializeRecord {
                    system_id: Some(system_id.clone()),
                    by: self.name.clone(),
                    at: now_text(),
                    awaiting_first_leader: false,
                };
                self.rewrite_initialize(&record, *initialize_revision)
                    .await?;
                info!(system_id, "cluster bootstrapped");
            }
            Action::RecordFirstLeader {
                initialize_revision,
            } => {
                let Some(record) = view.and_then(|v| v.initialize.clone()) else {
                    return Err(TurnError::Failed("no cluster record to update".into()));
                };
                let record = InitializeRecord {
                    awaiting_first_leader: false,
                    ..record
                };
                // Whoever registered the data may have had no
                // configuration to write back (an agent just restarted).
                if view.is_some_and(|v| v.config.is_none()) {
                    self.write_back_dynamic_config().await;
                }
                self.rewrite_initialize(&record, *initialize_revision)
                    .await?;
                info!(
                    "first leader on the registered data: any eligible member may take over from now on"
                );
            }
            Action::MoveAside { reason } => {
                let moved = self
                    .pg
                    .move_aside(reason)
                    .map_err(|e| failed("moving the data directory aside", &e))?;
                warn!(to = %moved.display(), reason, "moved the data directory aside");
            }
            Action::AcquireLeader => {
                if !self
                    .dcs
                    .acquire_leader(&self.name, lease_id()?)
                    .await
                    .map_err(dcs_failed)?
                {
                    return Err(TurnError::Failed(
                        "another node took the leader key first".into(),
                    ));
                }
                info!("took the leader key");
            }
            Action::ReleaseLeader { reason } => {
                // Services beside the primary, then writes, stop before the
                // key goes, or two nodes could run them.
                self.stop_with_leader_services().await;
                let released = self.release_leader(reason, lease_id()?).await;
                self.allow_with_leader_services();
                released?
            }
            Action::ReleaseStaleLeader { lease_id } => {
                self.dcs
                    .release_leader(&self.name, *lease_id)
                    .await
                    .map_err(dcs_failed)?;
                info!(
                    lease_id,
                    "released a leader key that names this node on an earlier lease"
                );
            }
            Action::StartPrimary => {
                let before = local.timeline;
                // The watchdog must guard the server from its first moment.
                self.fencer.set_writable(true);
                let started = self.start_pg(StartRole::Primary).await;
                self.forget_writable_if_stopped();
                started.map_err(|e| failed("starting as primary", &e))?;
                self.following = None;
                if before != 0 {
                    self.confirm_timeline(
                        None,
                        Some(before),
                        local.lsn,
                        "restarted as primary",
                        lease_id()?,
                    )
                    .await;
                }
            }
            Action::StartReplica { leader } => {
                let target = match leader {
                    Some(name) => Some(self.target(view, name)?.0),
                    None => None,
                };
                self.start_pg(StartRole::Replica { leader: target })
                    .await
                    .map_err(|e| failed("starting as replica", &e))?;
                self.following = leader.clone();
            }
            Action::Rejoin { leader } => {
                let (target, status) = self.target(view, leader)?;
                self.rejoin(&target, &status, history(view)).await?;
            }
            Action::BaseBackup { leader } => {
                let (target, _) = self.target(view, leader)?;
                info!(from = leader, "cloning with pg_basebackup");
                self.pg
                    .basebackup(&target)
                    .await
                    .map_err(|e| failed("pg_basebackup", &e))?;
                self.start_pg(StartRole::Replica {
                    leader: Some(target),
                })
                .await
                .map_err(|e| failed("starting the clone", &e))?;
                self.following = Some(leader.clone());
            }
            Action::Promote { reason } => {
                // PostgreSQL takes the number after the newest history file.
                let claimed = local.timeline.max(self.pg.newest_history_timeline()) + 1;
                self.claim_timeline(claimed, local.lsn, reason, lease_id()?)
                    .await?;
                // A promotion that times out may still complete: guard first.
                self.fencer.set_writable(true);
                self.pg
                    .promote()
                    .await
                    .map_err(|e| failed("promoting", &e))?;
                self.following = None;
                // Proxies and replicas act on the member key saying primary:
                // say it now, not after the bookkeeping at the turn's end.
                let promoted = self.pg.probe().await.ok();
                if let (Some(health), Some(view)) = (&promoted, view) {
                    self.last_health = Some(health.clone());
                    self.publish(view, lease_id()?).await;
                }
                self.confirm_timeline(promoted, Some(claimed), local.lsn, reason, lease_id()?)
                    .await;
            }
            Action::Follow { leader } => {
                let (target, status) = self.target(view, leader)?;
                if let Divergence::Diverged { reason } = self
                    .running_divergence(&target, &status, history(view))
                    .await?
                {
                    warn!(
                        reason,
                        "this replica diverged from the new leader: stopping it to rewind"
                    );
                    self.stop(StopMode::Fast).await?;
                    return self.rejoin(&target, &status, history(view)).await;
                }
                self.pg
                    .follow(Some(&target))
                    .await
                    .map_err(|e| failed("re-pointing replication", &e))?;
                self.following = Some(leader.clone());
                info!(leader, "now following the new leader (reload, no restart)");
            }
            Action::Fence { reason } => {
                warn!(reason, "fencing: immediate shutdown of PostgreSQL");
                self.stop(StopMode::Immediate).await?;
            }
            Action::SyncSlots { members } => {
                let changes = self
                    .pg
                    .sync_slots(members)
                    .await
                    .map_err(|e| failed("replication slots", &e))?;
                if !changes.created.is_empty() || !changes.dropped.is_empty() {
                    info!(created = ?changes.created, dropped = ?changes.dropped, "replication slots changed");
                }
            }
            Action::Switchover {
                candidate,
                failover_revision,
            } => {
                let lease = lease_id()?;
                // Load balancers polling the agent check hear "down" before
                // this server stops, so none sends a client to it once it
                // runs again as a read-only replica. Writes go on meanwhile;
                // the services' stop counts towards the wait.
                let stepping_down = self
                    .agent_check
                    .as_ref()
                    .map(|(config, check)| (config.step_down_wait, check.step_down()));
                // The candidate starts its with-leader services right after
                // its promotion: ours stop first. Whatever happens next, they
                // may run again once this node leads (an aborted switchover).
                self.stop_with_leader_services().await;
                if let Some((wait, stepping)) = &stepping_down {
                    stepping.heard(*wait).await;
                }
                let handed_over = self
                    .switchover(view, candidate, *failover_revision, lease)
                    .await;
                self.allow_with_leader_services();
                drop(stepping_down);
                handed_over?
            }
            Action::WriteSync {
                members,
                expected_revision,
            } => {
                let state = SyncState {
                    leader: self.name.clone(),
                    members: members.clone(),
                };
                let written = tokio::time::timeout(
                    self.timing.dcs_timeout,
                    self.dcs
                        .write_sync(&state, *expected_revision, (&self.name, lease_id()?)),
                )
                .await
                .map_err(|_| TurnError::Failed("writing the sync key: DCS timeout".into()))?
                .map_err(dcs_failed)?;
                if !written {
                    return Err(TurnError::Failed(
                        "the sync key or the leader key changed meanwhile".into(),
                    ));
                }
                info!(?members, "synchronous standbys guaranteed (sync key)");
            }
            Action::WriteFailsafe {
                state,
                expected_revision,
            } => {
                self.widen_failsafe_peers(state);
                let written = tokio::time::timeout(
                    self.timing.dcs_timeout,
                    self.dcs
                        .write_failsafe(state, *expected_revision, (&self.name, lease_id()?)),
                )
                .await
                .map_err(|_| TurnError::Failed("writing the failsafe key: DCS timeout".into()))?
                .map_err(dcs_failed)?;
                if !written {
                    return Err(TurnError::Failed(
                        "the failsafe key or the leader key changed meanwhile".into(),
                    ));
                }
                let members: Vec<&String> = state.members.keys().collect();
                info!(
                    ?members,
                    "failsafe: the members this leader relies on (failsafe key)"
                );
            }
            Action::SetSyncStandbys { names, block } => {
                let value = render_standby_names(names, *block);
                self.pg
                    .set_synchronous_standby_names(&value)
                    .await
                    .map_err(|e| failed("setting synchronous_standby_names", &e))?;
                info!(
                    synchronous_standby_names = value,
                    "commits now wait for these standbys"
                );
            }
            Action::ClearFailover {
                failover_revision,
                reason,
            } => {
                if self
                    .dcs
                    .delete_failover(*failover_revision)
                    .await
                    .map_err(dcs_failed)?
                {
                    info!(reason, "failover request cleared");
                }
            }
            Action::Fatal { reason } => return Err(TurnError::Fatal(reason.clone())),
        }
        Ok(())
    }

    /// A planned handover (docs/rules.md section 5, "Switchover"): checkpoint
    /// while still writable, stop cleanly so the walsenders ship everything
    /// including the shutdown checkpoint, check that the candidate received
    /// it, then move the leader key to the candidate's lease in one
    /// transaction. On any failure the key is still ours and the next turn
    /// restarts the primary.
    pub(super) async fn switchover(
        &mut self,
        view: Option<&ClusterView>,
        candidate: &str,
        failover_revision: i64,
        lease: i64,
    ) -> Result<(), TurnError> {
        let (target, _) = self.target(view, candidate)?;
        let candidate_lease = view
            .and_then(|v| v.members.get(candidate))
            .map(|m| m.lease_id)
            .ok_or_else(|| TurnError::Failed(format!("{candidate} has no member key")))?;
        let started = Instant::now();
        info!(candidate, "switchover: checkpoint, then a clean shutdown");
        if let Err(err) = self.pg.checkpoint().await {
            warn!("switchover: the checkpoint before shutdown failed ({err}); going on");
        }
        self.stop(StopMode::Fast).await?;
        let end = self
            .pg
            .control_data()
            .map_err(|e| TurnError::Failed(format!("pg_controldata after shutdown: {e}")))?
            .checkpoint_lsn;
        let limit = self.timing.handover_catch_up_limit();
        let caught_up = self.pg.wait_until_received(&target, end, limit).await;
        let refusal = match caught_up {
            Err(err) => Some(format!("the candidate did not catch up: {err}")),
            Ok(_) => match self
                .dcs
                .hand_over_leader(&self.name, lease, candidate, candidate_lease)
                .await
            {
                Ok(true) => None,
                Ok(false) => Some("the leader or the candidate's lease changed".into()),
                Err(err) => Some(format!("handing the leader key over: {err}")),
            },
        };
        if let Some(reason) = refusal {
            error!(
                candidate,
                reason, "switchover aborted: this node stays leader and restarts its primary"
            );
            let _ = self.dcs.delete_failover(failover_revision).await;
            return Err(TurnError::Failed(format!("switchover aborted: {reason}")));
        }
        info!(
            candidate,
            elapsed = ?started.elapsed(),
            shutdown_checkpoint = %end,
            "switchover: leadership handed over; following the new leader"
        );
        Ok(())
    }

    async fn release_leader(&mut self, reason: &str, lease: i64) -> Result<(), TurnError> {
        // Writes stop before the key goes, or two nodes could write.
        if self.pg.is_running() {
            warn!(
                reason,
                "stopping PostgreSQL (immediate) before releasing leadership"
            );
            self.stop(StopMode::Immediate).await?;
        }
        self.dcs
            .release_leader(&self.name, lease)
            .await
            .map_err(|e| TurnError::Failed(format!("DCS: {e}")))?;
        warn!(reason, "released the leader key");
        Ok(())
    }

    pub(super) fn forget_writable_if_stopped(&self) {
        if !self.pg.is_running() {
            self.fencer.set_writable(false);
        }
    }

    pub(super) async fn stop(&mut self, mode: StopMode) -> Result<(), TurnError> {
        if mode == StopMode::Immediate {
            // The watchdog's path is synchronous and cannot wait on anything.
            self.pg.fencer().fence_now();
        }
        let result = self.pg.stop(mode).await;
        if !self.pg.is_running() {
            self.fencer.set_writable(false);
            self.following = None;
        }
        result.map_err(|e| TurnError::Failed(format!("stopping PostgreSQL: {e}")))
    }

    pub(super) async fn bootstrap(&mut self, view: Option<&ClusterView>) -> Result<(), TurnError> {
        info!("initializing a new cluster (initdb with data checksums)");
        let result = async {
            self.pg.initdb().await.map_err(|e| format!("initdb: {e}"))?;
            self.fencer.set_writable(true);
            let started = self.start_pg(StartRole::Primary).await;
            self.forget_writable_if_stopped();
            started.map_err(|e| format!("first start: {e}"))?;
            self.pg
                .create_roles()
                .await
                .map_err(|e| format!("creating roles: {e}"))
        }
        .await;
        let Err(reason) = result else { return Ok(()) };
        error!(
            reason,
            "bootstrap failed: moving the attempt aside and giving the claim back"
        );
        if self.pg.is_running() {
            let _ = self.stop(StopMode::Immediate).await;
        }
        if !matches!(
            self.pg.data_dir_state(),
            DataDirState::Missing | DataDirState::Empty
        ) {
            match self.pg.move_aside("failed bootstrap") {
                Ok(path) => warn!(to = %path.display(), "moved the failed bootstrap aside"),
                Err(err) => error!("cannot move the failed bootstrap aside: {err}"),
            }
        }
        if let Some(lease) = self.lease.borrow().id {
            let _ = self.dcs.release_leader(&self.name, lease).await;
        }
        if let Some(view) = view {
            let _ = self.dcs.delete_initialize(view.initialize_revision).await;
        }
        let retry_in = self.core.bootstrap_failed(self.millis(Instant::now()));
        Err(TurnError::Failed(format!(
            "bootstrap failed: {reason}; this node claims it again in {} s at the earliest",
            retry_in.as_secs()
        )))
    }
}

impl<D: Dcs> Agent<D> {
    /// Replaces the `initialize` record if it is still at `revision`.
    async fn rewrite_initialize(
        &self,
        record: &InitializeRecord,
        revision: i64,
    ) -> Result<(), TurnError> {
        let updated = self
            .dcs
            .update_initialize(record, revision)
            .await
            .map_err(|err| TurnError::Failed(format!("DCS: {err}")))?;
        if !updated {
            return Err(TurnError::Failed(
                "the cluster record changed under us".into(),
            ));
        }
        Ok(())
    }
}

impl<D: Dcs> Agent<D> {
    /// After the cluster's keys were lost, the dynamic configuration this
    /// agent last ran with goes back into the DCS (only if still absent),
    /// so that no node falls back to the defaults: asynchronous
    /// replication where the operator chose synchronous, say.
    async fn write_back_dynamic_config(&self) {
        if self.dynamic == DynamicConfig::default() {
            return;
        }
        let value = match serde_json::to_value(&self.dynamic) {
            Ok(value) => value,
            Err(err) => {
                warn!("cannot write the dynamic configuration back: {err}");
                return;
            }
        };
        match self.dcs.write_config(&value, 0).await {
            Ok(true) => warn!(
                synchronous_mode = self.dynamic.synchronous_mode,
                "wrote the last dynamic configuration back into the DCS"
            ),
            Ok(false) => {}
            Err(err) => warn!("cannot write the dynamic configuration back: {err}"),
        }
    }
}
