//! A PostgreSQL found running on the data directory at start-up that this
//! agent did not start (by hand, by Patroni before a takeover, or one an
//! earlier agent's guard could not stop): no guard of ours enforces its
//! deadline, so it must stop before the HA loop runs. How depends on who
//! else may be writing.

use super::*;

impl<D: Dcs> Agent<D> {
    /// In a cluster that ran under mainstay, or while etcd cannot say, it
    /// may be a second writable primary, or become one as an election
    /// runs: stopped at once (immediate). In a keyspace new to mainstay (no
    /// cluster record, or one registered from existing data that has had no
    /// leader yet: a takeover from Patroni, the cluster's keys lost) with
    /// no leader, no standby may be promoted meanwhile (see
    /// `decide::leaderless`): a checkpoint while it still serves, then a
    /// clean shutdown, so that it restarts without crash recovery (the
    /// takeover's whole write pause) and the standbys still connected to it
    /// receive all of its WAL.
    pub(super) async fn stop_stray_postgres(&mut self) -> Result<(), RunError> {
        let view = tokio::time::timeout(self.timing.dcs_timeout, self.dcs.read_cluster()).await;
        let stop_at_once = match &view {
            Ok(Ok(view)) => match view.leader_name() {
                Some(leader) if leader != self.name => {
                    Some(format!("{leader} holds the leader key"))
                }
                Some(_) => Some("the leader key names this node on an earlier lease".into()),
                None if view
                    .initialize
                    .as_ref()
                    .is_some_and(|init| !init.awaiting_first_leader) =>
                {
                    Some("the cluster ran under mainstay and may be electing a leader".into())
                }
                None => None,
            },
            Ok(Err(err)) => Some(format!("etcd cannot say who leads ({err})")),
            Err(_) => Some("etcd did not answer in time to say who leads".into()),
        };
        if let Some(why) = stop_at_once {
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
            "a PostgreSQL not started by this agent runs on the data directory, and the cluster \
             is new to mainstay with no leader: checkpointing it, then stopping it cleanly \
             (fast) so that it restarts under a fencing guard without crash recovery"
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
