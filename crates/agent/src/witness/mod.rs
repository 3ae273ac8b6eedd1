//! `mainstay witness`: the third vote of a two-server cluster. It runs
//! the node's etcd member (started by `main` before this), keeps a member
//! key on a lease so the cluster shows it as `witness`, and serves a small
//! REST API (`api.rs`): health, `/cluster`, `/etcd/members`, `/metrics`.
//! It runs no PostgreSQL, never leads, and holds no slot: the data nodes'
//! core skips it (`MemberStatus::witness`, tagged `nofailover`).

mod api;

use crate::config::WitnessConfig;
use mainstay_core::{ClusterView, Lsn, MemberStatus, PgRole, Tags};
use mainstay_dcs::{Dcs, DcsError};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::watch;
use tracing::{Instrument, info, info_span, warn};

/// How often a witness that cannot reach etcd says so in its log.
const UNREACHABLE_LOG_EVERY: Duration = Duration::from_secs(5);

/// What the witness's API serves; replaced after every round.
#[derive(Clone, Debug, Default)]
pub struct WitnessSnapshot {
    pub view: Option<ClusterView>,
    pub dcs_reachable: bool,
    pub dcs_last_seen: Option<SystemTime>,
    /// Why etcd could not be read, while it cannot.
    pub dcs_error: Option<String>,
    pub lease: Option<i64>,
}

#[derive(Debug, thiserror::Error)]
pub enum WitnessError {
    #[error(transparent)]
    Serve(#[from] crate::api::ServeError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

/// Runs the witness until `shutdown` resolves; its member key goes with
/// its lease on the way out.
pub async fn run<D: Dcs>(
    config: &WitnessConfig,
    dcs: D,
    member: Option<mainstay_etcd_member::MemberHandle>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), WitnessError> {
    let span = info_span!("witness", node = %config.name);
    run_in_span(config, dcs, member, shutdown)
        .instrument(span)
        .await
}

async fn run_in_span<D: Dcs>(
    config: &WitnessConfig,
    dcs: D,
    member: Option<mainstay_etcd_member::MemberHandle>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), WitnessError> {
    let dcs = Arc::new(dcs);
    let tls = match &config.api.tls {
        Some(files) => Some(crate::tls::acceptor(&files.cert_file, &files.key_file)?),
        None => None,
    };
    let listener = crate::api::bind(config.api.listen).await?;
    let (snapshot_tx, snapshot) = watch::channel(WitnessSnapshot::default());
    let state = Arc::new(api::WitnessState {
        name: config.name.clone(),
        scope: config.cluster.clone(),
        timing: config.timing,
        dcs: dcs.clone(),
        auth: crate::api::ApiAuth {
            basic: config.api.basic.clone(),
            token: config.api.token.clone(),
        },
        member,
        snapshot,
    });
    let limits = crate::api::Limits {
        header_timeout: config.api.header_timeout,
        max_connections: config.api.max_connections,
    };
    info!(listen = %config.api.listen, "witness: REST API listening");
    let api = tokio::spawn(
        crate::api::serve(listener, api::router(state), tls, limits)
            .instrument(info_span!(parent: None, "api", node = %config.name)),
    );
    let mut systemd = crate::systemd::Notifier::from_env();
    systemd.ready("witness");
    let pinger = systemd.ping_every().map(|every| {
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every);
            loop {
                ticks.tick().await;
                systemd.alive();
            }
        })
    });
    let mut keeper = Keeper {
        dcs: &*dcs,
        config,
        lease: None,
        written: None,
        last_unreachable_log: None,
    };
    tokio::pin!(shutdown);
    loop {
        let snapshot = keeper.round().await;
        snapshot_tx.send_replace(snapshot);
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tokio::time::sleep(config.timing.renew_interval) => {}
        }
    }
    info!("witness stopping: its member key goes with its lease");
    if let Some(pinger) = pinger {
        pinger.abort();
    }
    crate::systemd::Notifier::from_env().stopping();
    if let Some(lease) = keeper.lease {
        let _ = tokio::time::timeout(config.timing.dcs_timeout, dcs.revoke_lease(lease)).await;
    }
    api.abort();
    Ok(())
}

struct Keeper<'a, D> {
    dcs: &'a D,
    config: &'a WitnessConfig,
    lease: Option<i64>,
    /// The status last written on the current lease.
    written: Option<MemberStatus>,
    last_unreachable_log: Option<Instant>,
}

impl<D: Dcs> Keeper<'_, D> {
    /// Keeps the lease, writes the member key when it is missing or
    /// changed, reads the cluster.
    async fn round(&mut self) -> WitnessSnapshot {
        let timeout = self.config.timing.dcs_timeout;
        let outcome = async {
            let lease = self.lease().await?;
            let status = self.status();
            if self.written.as_ref() != Some(&status) {
                bounded(timeout, self.dcs.put_member(&status, lease)).await?;
                self.written = Some(status);
            }
            bounded(timeout, self.dcs.read_cluster()).await
        }
        .await;
        match outcome {
            Ok(view) => {
                if self.last_unreachable_log.take().is_some() {
                    info!("etcd answers again");
                }
                WitnessSnapshot {
                    view: Some(view),
                    dcs_reachable: true,
                    dcs_last_seen: Some(SystemTime::now()),
                    dcs_error: None,
                    lease: self.lease,
                }
            }
            Err(err) => {
                if matches!(err, DcsError::Conflict(_)) {
                    // The lease expired: a new one, and the key again.
                    self.lease = None;
                    self.written = None;
                }
                let due = self
                    .last_unreachable_log
                    .is_none_or(|at| at.elapsed() >= UNREACHABLE_LOG_EVERY);
                if due {
                    warn!(
                        %err,
                        "witness: etcd has no quorum or does not answer here; this node votes \
                         for nothing until it does"
                    );
                    self.last_unreachable_log = Some(Instant::now());
                }
                WitnessSnapshot {
                    view: None,
                    dcs_reachable: false,
                    dcs_last_seen: None,
                    dcs_error: Some(err.to_string()),
                    lease: self.lease,
                }
            }
        }
    }

    async fn lease(&mut self) -> Result<i64, DcsError> {
        let timeout = self.config.timing.dcs_timeout;
        if let Some(lease) = self.lease {
            let ttl = bounded(timeout, self.dcs.keep_alive(lease)).await?;
            if ttl > 0 {
                return Ok(lease);
            }
            self.lease = None;
            self.written = None;
        }
        let lease = bounded(
            timeout,
            self.dcs.grant_lease(self.config.timing.lease_ttl_secs()),
        )
        .await?;
        self.lease = Some(lease);
        Ok(lease)
    }

    fn status(&self) -> MemberStatus {
        MemberStatus {
            name: self.config.name.clone(),
            role: PgRole::Stopped,
            state: "witness".into(),
            api_url: self.config.api.url.clone(),
            pg_host: String::new(),
            pg_port: 0,
            timeline: 0,
            received_lsn: Lsn(0),
            replayed_lsn: Lsn(0),
            flush_lsn: Lsn(0),
            following: None,
            streaming: false,
            tags: Tags {
                nofailover: true,
                nosync: true,
                noloadbalance: true,
                ..Tags::default()
            },
            version: env!("CARGO_PKG_VERSION").into(),
            view_revision: 0,
            view_had_leader: false,
            vip: None,
            warning: None,
            services: Default::default(),
            files: Default::default(),
            alerts: Vec::new(),
            witness: true,
            pending_restart: Vec::new(),
            data_timeline: 0,
            custom_tags: Default::default(),
        }
    }
}

async fn bounded<T>(
    timeout: Duration,
    call: impl Future<Output = Result<T, DcsError>>,
) -> Result<T, DcsError> {
    tokio::time::timeout(timeout, call)
        .await
        .unwrap_or(Err(DcsError::Timeout))
}
