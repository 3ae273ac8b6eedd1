//! Timelines and rejoining: claiming a timeline before a promotion, checking
//! a local history against the leader's, pg_rewind or a fresh clone.

use super::*;

impl<D: Dcs> Agent<D> {
    /// Before promoting: claim the next timeline in the data directory and,
    /// while this node holds the leader key, in the DCS history, so that a
    /// node that creates the same number unseen can later tell the WAL apart
    /// (see `timeline::foreign_timeline`). No promotion without both.
    pub(super) async fn claim_timeline(
        &self,
        timeline: u32,
        switch_lsn: Lsn,
        reason: &str,
        lease: i64,
    ) -> Result<(), TurnError> {
        self.pg
            .write_timeline_claim(&self.name, timeline)
            .map_err(|e| TurnError::Failed(format!("recording the timeline claim: {e}")))?;
        let entry = HistoryEntry {
            timeline,
            switch_lsn,
            reason: reason.into(),
            new_leader: self.name.clone(),
            at: now_rfc3339(),
        };
        match tokio::time::timeout(
            self.timing.dcs_timeout,
            self.dcs.append_history(&entry, Some((&self.name, lease))),
        )
        .await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(err)) => Err(TurnError::Failed(format!(
                "recording timeline {timeline} in the DCS history: {err}"
            ))),
            Err(_) => Err(TurnError::Failed(format!(
                "recording timeline {timeline} in the DCS history: no answer within {:?}",
                self.timing.dcs_timeout
            ))),
        }
    }

    /// After a promotion or a restart as primary: if PostgreSQL ended on
    /// another timeline than claimed, claim the real one.
    pub(super) async fn confirm_timeline(
        &self,
        probed: Option<mainstay_pg::Health>,
        claimed: Option<u32>,
        switch_lsn: Lsn,
        reason: &str,
        lease: i64,
    ) {
        let health = match probed {
            Some(health) => health,
            None => match self.pg.probe().await {
                Ok(health) => health,
                Err(_) => return,
            },
        };
        if claimed == Some(health.timeline) {
            info!(timeline = health.timeline, %switch_lsn, reason, "primary on the claimed timeline");
            return;
        }
        if self.pg.timeline_claim().map(|(t, _)| t) == Some(health.timeline) {
            return;
        }
        if let Err(TurnError::Failed(err) | TurnError::Fatal(err)) = self
            .claim_timeline(health.timeline, switch_lsn, reason, lease)
            .await
        {
            warn!("{err}");
        }
    }

    pub(super) async fn leader_wal(
        &self,
        target: &ConnTarget,
        status: &MemberStatus,
    ) -> Result<LeaderWal, TurnError> {
        let text = self
            .pg
            .timeline_history(target, status.timeline)
            .await
            .map_err(|e| {
                TurnError::Failed(format!("reading the leader's timeline history: {e}"))
            })?;
        let history = parse_history(&text)
            .map_err(|e| TurnError::Failed(format!("the leader's history file: {e}")))?;
        Ok(LeaderWal {
            timeline: status.timeline,
            flush_lsn: status.flush_lsn.max(status.received_lsn),
            history,
        })
    }

    pub(super) fn local_history(
        &self,
        timeline: u32,
    ) -> Result<Vec<mainstay_core::timeline::TimelineSwitch>, TurnError> {
        let text = self
            .pg
            .local_timeline_history(timeline)
            .map_err(|e| TurnError::Failed(format!("reading the local timeline history: {e}")))?;
        parse_history(&text).map_err(|e| TurnError::Failed(format!("the local history file: {e}")))
    }

    pub(super) async fn running_divergence(
        &self,
        target: &ConnTarget,
        status: &MemberStatus,
        history: &[HistoryEntry],
    ) -> Result<Divergence, TurnError> {
        let Some(health) = &self.last_health else {
            return Ok(Divergence::None);
        };
        let local = LocalWal {
            timeline: health.timeline,
            end_lsn: health.wal_position(),
            history: self.local_history(health.timeline)?,
        };
        let leader = self.leader_wal(target, status).await?;
        if let Some(reason) = self.foreign_timeline(local.timeline, &leader, history) {
            return Ok(Divergence::Diverged { reason });
        }
        Ok(divergence(&local, &leader))
    }

    pub(super) fn foreign_timeline(
        &self,
        timeline: u32,
        leader: &LeaderWal,
        history: &[HistoryEntry],
    ) -> Option<String> {
        let claim = self.pg.timeline_claim();
        let claim = claim.as_ref().map(|(t, node)| (*t, node.as_str()));
        foreign_timeline(&self.name, claim, timeline, leader, history)
    }

    /// Makes a stopped node a replica of `target`, rewinding it first if its
    /// WAL is not a prefix of the leader's.
    pub(super) async fn rejoin(
        &mut self,
        target: &ConnTarget,
        status: &MemberStatus,
        history: &[HistoryEntry],
    ) -> Result<(), TurnError> {
        let failed =
            |what: &str, err: &dyn std::fmt::Display| TurnError::Failed(format!("{what}: {err}"));
        let state = self
            .pg
            .control_data()
            .map_err(|e| failed("pg_controldata", &e))?
            .state;
        // Only a crashed primary needs crash recovery before its WAL end can
        // be read; single-user mode on a standby would end its recovery.
        if matches!(
            state,
            ClusterState::InProduction | ClusterState::InCrashRecovery | ClusterState::ShuttingDown
        ) && self
            .pg
            .ensure_clean_shutdown()
            .await
            .map_err(|e| failed("crash recovery", &e))?
        {
            info!("finished crash recovery in single-user mode before comparing histories");
        }
        let control = self
            .pg
            .control_data()
            .map_err(|e| failed("pg_controldata", &e))?;
        let standby = matches!(
            control.state,
            ClusterState::ShutDownInRecovery | ClusterState::InArchiveRecovery
        );
        let (timeline, end_lsn) = if standby {
            let timeline = if control.min_recovery_end_timeline > 0 {
                control.min_recovery_end_timeline
            } else {
                control.timeline
            };
            (
                timeline,
                control.min_recovery_end_lsn.max(control.checkpoint_lsn),
            )
        } else {
            // The shutdown checkpoint record that starts at checkpoint_lsn is
            // local WAL too: a leader that switched timelines exactly there
            // never had it, so the exclusive end lies past its first byte.
            (control.timeline, Lsn(control.checkpoint_lsn.0 + 1))
        };
        let local = LocalWal {
            timeline,
            end_lsn,
            history: self.local_history(timeline)?,
        };
        let leader = self.leader_wal(target, status).await?;
        if let Some(reason) = self.foreign_timeline(local.timeline, &leader, history) {
            // Identical history files: pg_rewind would find nothing to do.
            warn!(
                leader = target.name,
                reason, "local WAL is not the leader's: moving the data directory aside to clone"
            );
            self.reclone(target, "timeline created twice").await?;
        } else {
            self.rewind_if_diverged(target, &local, &leader).await?;
        }
        self.start_pg(StartRole::Replica {
            leader: Some(target.clone()),
        })
        .await
        .map_err(|e| failed("starting as replica", &e))?;
        self.following = Some(target.name.clone());
        Ok(())
    }

    pub(super) async fn rewind_if_diverged(
        &mut self,
        target: &ConnTarget,
        local: &LocalWal,
        leader: &LeaderWal,
    ) -> Result<(), TurnError> {
        match divergence(local, leader) {
            Divergence::None => info!(
                leader = target.name,
                "local WAL is a prefix of the leader's: no rewind needed"
            ),
            Divergence::Diverged { reason } => {
                warn!(
                    leader = target.name,
                    reason, "diverged from the leader: running pg_rewind"
                );
                if let Err(err) = self.pg.rewind(target).await {
                    warn!(
                        "pg_rewind failed ({err}): moving the data directory aside and cloning afresh"
                    );
                    self.reclone(target, "rewind failed").await?;
                }
            }
        }
        Ok(())
    }

    /// Moves the data directory aside (never deletes it) and clones afresh.
    pub(super) async fn reclone(
        &mut self,
        target: &ConnTarget,
        reason: &str,
    ) -> Result<(), TurnError> {
        let failed =
            |what: &str, err: &dyn std::fmt::Display| TurnError::Failed(format!("{what}: {err}"));
        let moved = self
            .pg
            .move_aside(reason)
            .map_err(|e| failed("moving aside", &e))?;
        warn!(to = %moved.display(), reason, "moved the old data directory aside");
        self.pg
            .basebackup(target)
            .await
            .map_err(|e| failed("pg_basebackup", &e))
            .map(|_| ())
    }
}
