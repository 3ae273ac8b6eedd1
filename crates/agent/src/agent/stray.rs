//! A PostgreSQL found running on the data directory at start-up that this
//! agent did not start (by hand, by Patroni before a takeover, or one an
//! earlier agent's guard could not stop): no guard of ours enforces its
//! deadline, so it must stop before the HA loop runs. How depends on who
//! else may be writing.

use super::*;

impl<D: Dcs> Agent<D> {
    /// While another node holds the leader key (or etcd cannot say), it
    /// may be a second writable primary: stopped at once (immediate). With
    /// no leader (a takeover from Patroni, or the cluster's keys lost),
    /// nobody else writes: a checkpoint while it still serves, then a
    /// clean shutdown, so that it restarts without crash recovery (the
    /// takeover's whole write pause) and its standbys receive all its WAL.
    pub(super) async fn stop_stray_postgres(&mut self) -> Result<(), RunError> {
        let view = tokio::time::timeout(self.timing.dcs_timeout, self.dcs.read_cluster()).await;
        let other_leader = match &view {
            Ok(Ok(view)) => view
                .leader_name()
                .filter(|leader| *leader != self.name)
                .map(|leader| format!("{leader} holds the leader key")),
            Ok(Err(err)) => Some(format!("etcd cannot say who leads ({err})")),
            Err(_) => Some("etcd did not answer in time to say who leads".into()),
        };
        if let Some(why) = other_leader {
            warn!(
                "a PostgreSQL not started by this agent runs on the data directory and {why}: \
                 stopping it at once (immediate) so that it runs under a fencing guard"
            );
            return self
                .pg
                .stop(StopMode::Immediate)
                .await
                .map_err(|source| RunError::StrayPostgres { source });
        }
        warn!(
            "a PostgreSQL not started by this agent runs on the data directory and no node \
             leads: checkpointing it, then stopping it cleanly (fast) so that it restarts under \
             a fencing guard without crash recovery"
        );
        if let Err(err) = self.pg.checkpoint().await {
            warn!("the checkpoint before stopping it failed ({err}); stopping it anyway");
        }
        if let Err(err) = self.pg.stop(StopMode::Fast).await {
            warn!("the clean stop failed ({err}): stopping it at once (immediate)");
            return self
                .pg
                .stop(StopMode::Immediate)
                .await
                .map_err(|source| RunError::StrayPostgres { source });
        }
        Ok(())
    }
}
