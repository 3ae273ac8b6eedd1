//! One turn of the HA loop: read the DCS, probe PostgreSQL, ask the core.

use super::*;

impl<D: Dcs> Agent<D> {
    /// One observe/decide/act round. Returns whether state changed and when
    /// the core wants to look again.
    pub(super) async fn turn(&mut self) -> Result<(bool, Option<Millis>), TurnError> {
        // The DCS first, PostgreSQL second: a status probed after a view
        // without a leader is final for the election (see core::decide).
        let view =
            match tokio::time::timeout(self.timing.dcs_timeout, self.dcs.read_cluster()).await {
                Ok(Ok(view)) => Some(view),
                Ok(Err(err)) => {
                    warn!("cannot read the DCS: {err}");
                    None
                }
                Err(_) => {
                    warn!(
                        "cannot read the DCS: no answer within {:?}",
                        self.timing.dcs_timeout
                    );
                    None
                }
            };
        self.dcs_reachable = view.is_some();
        if let Some(view) = &view {
            let interest = match view.leader_name() {
                None => MemberInterest::All,
                // Replicas join or re-point as soon as a new leader says it
                // runs as primary, not a loop later.
                Some(leader)
                    if leader != self.name
                        && view
                            .leader_status()
                            .is_none_or(|s| s.role != PgRole::Primary) =>
                {
                    MemberInterest::One(leader.to_string())
                }
                Some(_) => MemberInterest::None,
            };
            *poison::lock(&self.member_interest) = interest;
            self.last_view = Some(view.clone());
            self.view_read_at = Some(Instant::now());
            self.dcs_last_seen = Some(std::time::SystemTime::now());
            self.absorb_dynamic_config(view);
            // Routes follow a new view at once, before this turn acts.
            self.publish_route();
        }
        if let Some(until) = self.stand_down_until {
            let successor = view
                .as_ref()
                .and_then(|v| v.leader_name())
                .filter(|l| *l != self.name);
            if successor.is_none() && Instant::now() < until {
                // `/patroni` and `ctl list` show why this node does nothing.
                let note = "crash drill: standing down until another node leads";
                if self.last_note != note {
                    info!("{note}");
                    self.last_note = note.into();
                }
                return Ok((false, None));
            }
            info!(
                successor = successor.unwrap_or("none yet"),
                "crash drill over: this node takes part again"
            );
            self.stand_down_until = None;
            self.renewals_paused.store(false, Ordering::SeqCst);
        }
        // While something waits for a restart, look again each turn: any
        // start of PostgreSQL (ctl restart, failover) may have applied it.
        if std::mem::take(&mut self.parameters_dirty) || !self.pending_restart.is_empty() {
            self.apply_parameters().await;
        }
        let local = self.observe_pg().await?;
        // A primary just promoted takes the VIP now, not after this turn.
        self.publish_state();
        if let Some(view) = &view {
            self.update_failsafe_peers(view, &local);
        }
        let lease = *self.lease.borrow();
        let contact = poison::lock(&self.failsafe_contact).clone();
        let contact = contact.map(|(leader, at)| (leader, self.millis(Instant::from_std(at))));
        let tags = self.published_tags();
        let obs = Observation {
            now: self.millis(Instant::now()),
            name: &self.name,
            tags: &tags,
            settings: &self.settings,
            pg: &local,
            cluster: view.as_ref(),
            lease: Lease {
                id: lease.id,
                valid_until: self.millis(boot_clock::instant_at(lease.valid_until)),
                members_confirmed: lease.members_confirmed,
            },
            config: &self.dynamic,
            wall_secs: unix_now(),
            failsafe_contact: contact.as_ref().map(|(l, at)| (l.as_str(), *at)),
        };
        let decision = decide(&mut self.core, &obs);
        if decision.note != self.last_note {
            info!("{}", decision.note);
            self.last_note = decision.note.clone();
        }
        let mut changed = false;
        let mut failure = None;
        for action in &decision.actions {
            if action.changes_state() {
                info!(?action, "acting");
            }
            match self.execute(action, view.as_ref(), &local, lease.id).await {
                Ok(()) => changed |= action.changes_state(),
                Err(TurnError::Failed(reason)) => {
                    failure = Some(format!("{action:?} failed: {reason}"));
                    changed = false;
                    break;
                }
                Err(fatal) => return Err(fatal),
            }
        }
        if let (Some(view), Some(lease_id)) = (&view, lease.id) {
            self.publish(view, lease_id).await;
        }
        match failure {
            Some(reason) => Err(TurnError::Failed(reason)),
            None => Ok((changed, decision.wake_at)),
        }
    }

    /// The role this node goes into a turn with, for the turn's log span:
    /// the leader key as last read, else PostgreSQL as last probed.
    pub(super) fn role_going_in(&self) -> &'static str {
        if self.holds_leader() {
            return "leader";
        }
        match self.last_health.as_ref().filter(|_| self.pg_answering) {
            Some(health) if health.in_recovery => "replica",
            // A primary without the key: one that lost it, or a stray.
            Some(_) => "primary",
            None => "stopped",
        }
    }

    pub(super) async fn observe_pg(&mut self) -> Result<LocalPg, TurnError> {
        let data = match self.pg.data_dir_state() {
            DataDirState::Missing | DataDirState::Empty => DataDir::Empty,
            DataDirState::Initialized(control) => DataDir::Initialized {
                system_id: control.system_identifier.to_string(),
                // A clone whose first start failed keeps the source's
                // "in production" beside its backup_label: a standby's
                // data, which PostgreSQL may not start as a primary.
                was_primary: matches!(
                    control.state,
                    ClusterState::InProduction
                        | ClusterState::ShutDown
                        | ClusterState::ShuttingDown
                        | ClusterState::InCrashRecovery
                ) && !self.pg.settings().data_dir.join("backup_label").exists(),
                timeline: control.timeline.max(self.pg.newest_history_timeline()),
            },
            DataDirState::Unusable(reason) => {
                return Err(TurnError::Fatal(format!(
                    "the data directory {} is unusable ({reason}); mainstay will not touch it: \
                     move it away by hand to let this node clone",
                    self.pg.settings().data_dir.display()
                )));
            }
        };
        self.data_timeline = match &data {
            DataDir::Initialized { timeline, .. } => *timeline,
            DataDir::Empty => 0,
        };
        let mut local = LocalPg {
            data,
            role: PgRole::Stopped,
            timeline: 0,
            lsn: Lsn(0),
            following: None,
            streaming: false,
            sync_standby_names: String::new(),
            standbys: Vec::new(),
        };
        self.pg_answering = false;
        if !self.pg.is_running() {
            self.fencer.set_writable(false);
            self.last_health = None;
            return Ok(local);
        }
        match self.pg.probe().await {
            Ok(health) => {
                self.pg_answering = true;
                local.role = if health.in_recovery {
                    PgRole::Replica
                } else {
                    PgRole::Primary
                };
                local.timeline = health.timeline;
                local.lsn = health.wal_position();
                local.streaming = health.is_streaming();
                local.sync_standby_names = health.synchronous_standby_names.clone();
                local.standbys = health
                    .replicas
                    .iter()
                    .map(|r| Standby {
                        name: r.application_name.clone(),
                        flush: r.flush_lsn.unwrap_or_default(),
                        sync_state: r.sync_state.clone().unwrap_or_default(),
                        streaming: r.state.as_deref() == Some("streaming"),
                    })
                    .collect();
                self.fencer.set_writable(!health.in_recovery);
                self.last_health = Some(health);
            }
            // Running but not answering (busy, starting, shutting down after
            // a fence). A possibly writable server counts as a primary, so
            // that the core can fence it; anything else waits for an answer.
            Err(err) if self.fencer.writable() => {
                warn!("PostgreSQL (writable) runs but does not answer: {err}");
                local.role = PgRole::Primary;
                if let Some(health) = &self.last_health {
                    local.timeline = health.timeline;
                    local.lsn = health.wal_position();
                }
            }
            Err(err) => {
                return Err(TurnError::Failed(format!(
                    "PostgreSQL runs but does not answer yet: {err}"
                )));
            }
        }
        if local.role == PgRole::Replica {
            local.following = self.following.clone();
        }
        Ok(local)
    }

    pub(super) fn target(
        &self,
        view: Option<&ClusterView>,
        leader: &str,
    ) -> Result<(ConnTarget, MemberStatus), TurnError> {
        let status = view
            .and_then(|v| v.members.get(leader))
            .map(|m| m.status.clone())
            .ok_or_else(|| {
                TurnError::Failed(format!("no member status for the leader {leader}"))
            })?;
        Ok((
            ConnTarget {
                host: status.pg_host.clone(),
                port: status.pg_port,
                name: leader.to_string(),
            },
            status,
        ))
    }
}
