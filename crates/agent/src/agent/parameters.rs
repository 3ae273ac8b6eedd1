//! The cluster's dynamic configuration on this node: taken from the view,
//! PostgreSQL parameters applied only if this node's server accepts them,
//! and a start that falls back to the last parameters that worked.

use super::*;

impl<D: Dcs> Agent<D> {
    /// Takes the view's dynamic configuration if it is valid; a bad one
    /// (written by hand) is reported once and changes nothing.
    pub(super) fn absorb_dynamic_config(&mut self, view: &ClusterView) {
        if self.dynamic_revision == Some(view.config_revision) {
            return;
        }
        self.dynamic_revision = Some(view.config_revision);
        let parsed = match &view.config {
            // Gone with the cluster record: the cluster's keys were lost,
            // not reset. The last valid configuration stays (synchronous
            // mode above all) until the first leader on the registered
            // data ran; registering the data, and that leader, write it
            // back.
            None if view
                .initialize
                .as_ref()
                .is_none_or(|init| init.awaiting_first_leader)
                && self.dynamic != DynamicConfig::default() =>
            {
                warn!(
                    "the dynamic configuration vanished from the DCS with the cluster record: \
                     keeping the last valid one, to be written back"
                );
                return;
            }
            None => Ok(DynamicConfig::default()),
            Some(value) => DynamicConfig::from_json(value),
        };
        match parsed {
            Ok(config) if config != self.dynamic => {
                info!(
                    revision = view.config_revision,
                    pause = config.pause,
                    maximum_lag_on_failover = config.maximum_lag_on_failover,
                    synchronous_mode = config.synchronous_mode,
                    "dynamic configuration changed"
                );
                self.parameters_dirty |=
                    config.postgresql.parameters != self.dynamic.postgresql.parameters;
                self.dynamic = config;
            }
            Ok(_) => {}
            Err(problem) => error!(
                revision = view.config_revision,
                "the dynamic configuration in the DCS is invalid ({problem}); keeping the last \
                 valid one: fix it with `mainstay ctl edit-config`"
            ),
        }
    }

    /// Cluster-wide parameters, overridden by this node's own file, into
    /// `mainstay.conf`; a running server reloads, and what only a restart
    /// applies is reported as pending, never applied behind the operator's
    /// back.
    pub(super) async fn apply_parameters(&mut self) {
        let mut parameters = self.dynamic.parameter_texts();
        parameters.extend(self.file_parameters.clone());
        let settings = self.pg.settings();
        let admission = self
            .parameters
            .admit(
                &parameters,
                &settings.parameters,
                &settings.bin_dir,
                settings.run_as.as_deref(),
            )
            .await;
        match admission {
            crate::parameter_guard::Admission::Apply => {}
            crate::parameter_guard::Admission::Keep => return,
            crate::parameter_guard::Admission::Retry => {
                self.parameters_dirty = true;
                return;
            }
        }
        match self.pg.set_parameters(parameters).await {
            Ok(pending) => {
                if !pending.is_empty() && pending != self.pending_restart {
                    warn!(
                        ?pending,
                        "PostgreSQL parameters changed that need a restart: `mainstay ctl restart` \
                         applies them"
                    );
                }
                self.pending_restart = pending;
            }
            Err(err) => {
                warn!("applying PostgreSQL parameters failed ({err}); retrying next turn");
                self.parameters_dirty = true;
            }
        }
    }

    /// Starts PostgreSQL. When it does not start with parameters it never
    /// started with here, it starts again with the last ones that did: a
    /// server down for a typo in the cluster's configuration is worse than
    /// one running on yesterday's settings, said loudly.
    pub(super) async fn start_pg(&mut self, role: StartRole) -> mainstay_pg::Result<()> {
        let trying = self.pg.settings().parameters.clone();
        let failure = match self.pg.start(role.clone()).await {
            Ok(()) => {
                self.parameters.started_with(&trying);
                return Ok(());
            }
            Err(failure) => failure,
        };
        // Only the server itself failing to come up can be its parameters;
        // mainstay's own refusals (a standby's directory started as a
        // primary, say) say nothing about them.
        let server_failed = matches!(failure, mainstay_pg::Error::StartFailed { .. });
        let Some(good) = self
            .parameters
            .fallback_for(&trying)
            .filter(|_| server_failed)
        else {
            return Err(failure);
        };
        error!(
            %failure,
            "PostgreSQL did not start with the current parameters: starting it with the last \
             parameters it started with; this node will not take the leader key until the \
             configuration is fixed (`mainstay ctl edit-config`) and PostgreSQL restarted"
        );
        self.pg.set_parameters(good.clone()).await?;
        match self.pg.start(role).await {
            Ok(()) => {
                self.parameters
                    .fell_back(&trying, &good, &failure.to_string());
                // What runs is what is written: nothing waits for a restart.
                self.pending_restart.clear();
                Ok(())
            }
            Err(again) => {
                // Not the parameters after all (or not only them): the
                // cluster's stay written, as a replica must not be left
                // with settings lower than its primary's.
                error!(%again, "PostgreSQL did not start with the last good parameters either");
                if let Err(err) = self.pg.set_parameters(trying).await {
                    error!(%err, "writing the cluster's parameters back failed");
                }
                Err(failure)
            }
        }
    }

    /// This node's tags as published: a node that must not lead says so,
    /// so that elections neither choose it nor wait for it.
    pub(super) fn published_tags(&self) -> mainstay_core::Tags {
        let mut tags = self.tags.clone();
        tags.nofailover |= self.parameters.fallback().is_some();
        tags
    }
}
