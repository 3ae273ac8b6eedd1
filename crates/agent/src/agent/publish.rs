//! What this node tells others: the REST API's snapshot, the proxy's route,
//! the VIP's "leading" flag, and its member status in the DCS.

use super::*;

impl<D: Dcs> Agent<D> {
    /// The proxy's route from the last view, trusted until that view could
    /// be older than the leader's lease.
    pub(super) fn publish_route(&self) {
        let valid_until = self
            .view_read_at
            .map_or_else(Instant::now, |at| at + self.timing.view_trusted_for());
        let route = match &self.last_view {
            Some(view) => Route::from_view(view, self.replica_max_lag, valid_until),
            None => Route::nowhere(),
        };
        self.route.send_if_modified(|current| {
            let changed = *current != route;
            *current = route;
            changed
        });
    }

    /// This node holds the leader key on a lease that cannot have expired.
    pub(super) fn holds_leader(&self) -> bool {
        let lease = *self.lease.borrow();
        match (&self.last_view, lease.id) {
            (Some(view), Some(id)) if boot_clock::now() < lease.valid_until => view
                .leader
                .as_ref()
                .is_some_and(|l| l.name == self.name && l.lease_id == id),
            _ => false,
        }
    }

    /// What the followers see: the last view, and this node's place, where
    /// leading means the leader key with PostgreSQL running as a writable
    /// primary (as last observed). Sent only when something changed.
    pub(super) fn publish_state(&self) {
        let pg_role = match &self.last_health {
            Some(health) if self.pg_answering && self.pg.is_running() => {
                if health.in_recovery {
                    PgRole::Replica
                } else {
                    PgRole::Primary
                }
            }
            _ => PgRole::Stopped,
        };
        let local = LocalState {
            leading: self.holds_leader() && pg_role == PgRole::Primary,
            pg_role,
        };
        let view = self.last_view.as_ref();
        self.published.send_if_modified(|current| {
            let view_changed = current.view.as_deref() != view;
            if !view_changed && current.local == local {
                return false;
            }
            if view_changed {
                current.view = view.cloned().map(Arc::new);
            }
            current.local = local;
            true
        });
    }

    pub(super) fn publish_snapshot(&self, turn_started: Instant) {
        let holds_leader = self.holds_leader();
        let latency = self.renew_latency_us.load(Ordering::Relaxed);
        let previous = self.snapshot.borrow().clone();
        let answering = self.last_health.as_ref().filter(|_| self.pg_answering);
        let snapshot = NodeSnapshot {
            tags: self.published_tags(),
            system_identifier: answering
                .map(|h| h.system_identifier)
                .or(previous.system_identifier),
            last_timeline: answering
                .map(|h| h.timeline)
                .filter(|t| *t > 0)
                .or(previous.last_timeline),
            postmaster_pid: self.pg.pid(),
            failsafe_enabled: self.dynamic.failsafe_mode,
            failsafe_active: holds_leader && self.lease.borrow().members_confirmed,
            data_dir: self.pg.settings().data_dir.clone(),
            running: self.pg.is_running(),
            health: self.last_health.clone().filter(|_| self.pg_answering),
            holds_leader,
            view: self.last_view.clone(),
            dcs_reachable: self.dcs_reachable,
            dcs_last_seen: self.dcs_last_seen,
            turn_finished_at: Some(std::time::Instant::now()),
            turn_duration: turn_started.elapsed(),
            note: self.last_note.clone(),
            lease_renew_latency: (latency > 0).then(|| Duration::from_micros(latency)),
            paused: self.dynamic.pause,
            pending_restart: self.pending_restart.clone(),
            config_warning: self.parameters.warning(),
            vip: self
                .vip
                .as_ref()
                .map(|v| (v.cidr(), *self.vip_held.borrow())),
            sync_standbys: self
                .last_view
                .as_ref()
                .and_then(|v| v.sync.as_ref())
                .and_then(|r| r.state.as_ref().ok())
                .filter(|s| {
                    self.last_view
                        .as_ref()
                        .and_then(|v| v.leader_name())
                        .is_some_and(|l| l == s.leader)
                })
                .map(|s| s.members.clone())
                .unwrap_or_default(),
            services: self
                .services
                .as_ref()
                .map(|s| s.statuses().borrow().clone())
                .unwrap_or_default(),
            alerts: crate::alerts::evaluate(
                &self.alert_thresholds,
                &self.name,
                self.last_health.as_ref().filter(|_| self.pg_answering),
                crate::alerts::disk_space(&self.pg.settings().data_dir),
                self.replication
                    .as_ref()
                    .map(|r| r.troubles(&self.name, self.alert_thresholds.replicated_files_lag))
                    .unwrap_or_default(),
                &mainstay_core::poison::lock(&self.etcd_members).clone(),
            ),
            ..(*previous).clone()
        };
        self.publish_state();
        self.snapshot.send_replace(Arc::new(snapshot));
    }

    pub(super) async fn publish(&mut self, view: &ClusterView, lease: i64) {
        let health = self.last_health.as_ref();
        let role = match health {
            Some(h) if self.pg.is_running() => {
                if h.in_recovery {
                    PgRole::Replica
                } else {
                    PgRole::Primary
                }
            }
            _ => PgRole::Stopped,
        };
        let status = MemberStatus {
            name: self.name.clone(),
            role,
            state: if role == PgRole::Stopped {
                "stopped".into()
            } else {
                "running".into()
            },
            api_url: self.api_url.clone(),
            pg_host: self.pg.settings().connect_host.clone(),
            pg_port: self.pg.settings().port,
            timeline: health.map_or(0, |h| h.timeline),
            received_lsn: health.map_or(Lsn(0), |h| h.wal_position()),
            replayed_lsn: health.and_then(|h| h.replay_lsn).unwrap_or_default(),
            flush_lsn: health.and_then(|h| h.flush_lsn).unwrap_or_default(),
            following: if role == PgRole::Replica {
                self.following.clone()
            } else {
                None
            },
            streaming: health.is_some_and(|h| h.is_streaming()),
            tags: self.published_tags(),
            version: env!("CARGO_PKG_VERSION").into(),
            view_revision: view.revision,
            view_had_leader: view.leader.is_some(),
            vip: self
                .vip
                .as_ref()
                .filter(|_| *self.vip_held.borrow())
                .map(|v| v.cidr()),
            alerts: self
                .snapshot
                .borrow()
                .alerts
                .iter()
                .map(|a| a.message.clone())
                .collect(),
            warning: self.parameters.warning(),
            witness: false,
            pending_restart: self.pending_restart.clone(),
            data_timeline: self.data_timeline,
            custom_tags: self.tags.custom.clone(),
            services: self
                .services
                .as_ref()
                .map(|services| {
                    services
                        .statuses()
                        .borrow()
                        .iter()
                        .map(|s| (s.name.clone(), s.state.label().to_string()))
                        .collect()
                })
                .unwrap_or_default(),
            files: self
                .replication
                .as_ref()
                .map(|r| r.summary())
                .unwrap_or_default(),
        };
        // The key lives on the lease, so an unchanged status needs no write:
        // an idle cluster then costs etcd no fsync a second per member (flash
        // wear on small hosts). A key someone deleted, or one on an older
        // lease, is written again because the view shows it gone or
        // different. Without a leader an unchanged status is still written
        // once a loop, as the election waits for statuses newer than the
        // last leader's revision; but not at every turn: each write wakes
        // every other member (they watch all members while leaderless), whose
        // writes woke this one again, a storm that lasted as long as no node
        // could lead (a failing bootstrap, every member nofailover).
        let published = view.members.get(&self.name).is_some_and(|record| {
            record.lease_id == lease
                && MemberStatus {
                    view_revision: status.view_revision,
                    ..record.status.clone()
                } == status
        });
        let wrote_lately = self
            .last_member_write
            .is_some_and(|at| at.elapsed() < self.timing.loop_wait);
        if published && (view.leader.is_some() || wrote_lately) {
            return;
        }
        match tokio::time::timeout(self.timing.dcs_timeout, self.dcs.put_member(&status, lease))
            .await
        {
            Ok(Ok(())) => self.last_member_write = Some(Instant::now()),
            Ok(Err(err)) => warn!("cannot publish the member status: {err}"),
            Err(_) => warn!("cannot publish the member status: DCS timeout"),
        }
    }
}
