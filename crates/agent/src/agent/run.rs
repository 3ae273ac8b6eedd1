//! Wiring: the tasks the agent starts (REST API, proxy, VIP, lease keeper,
//! watch forwarding, etcd leader placement, watchdog), the HA loop that
//! drives turns, and the clean shutdown.

use super::reexec::{Exit, reexec_signal};
use super::*;

/// Why the agent did not start, or stopped on its own; `mainstay agent`
/// prints it and exits 1.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The fencing guard cannot run on this machine.
    #[error(transparent)]
    Guard(#[from] mainstay_pg::GuardCheckError),
    /// The virtual IP cannot be managed (capabilities, interface).
    #[error(transparent)]
    Vip(#[from] crate::vip::VipError),
    #[error("cannot write the password file: {source}")]
    PasswordFile { source: mainstay_pg::Error },
    #[error("cannot stop the PostgreSQL found running: {source}")]
    StrayPostgres { source: mainstay_pg::Error },
    #[error("the agent runs only once")]
    AlreadyRan,
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error(transparent)]
    Api(#[from] crate::api::ServeError),
    #[error(transparent)]
    Proxy(#[from] crate::proxy::ProxyError),
    #[error("cannot start replicating the [[replicate]] directories: {source}")]
    Replication { source: std::io::Error },
    #[error(
        "cannot listen on api.agent_check_listen = \"{listen}\": {source}; choose a free \
         address and port in the [api] section"
    )]
    AgentCheck {
        listen: std::net::SocketAddr,
        source: std::io::Error,
    },
    /// Continuing could damage data (a fatal turn, the lease keeper gone).
    #[error("{0}")]
    Fatal(String),
}

impl<D: Dcs> Agent<D> {
    /// Checks the capabilities and the interface (a startup error when
    /// either is missing), then runs the VIP task: it holds the address
    /// while this node leads with a running primary, for no longer than
    /// the lease's fencing deadline, which each renewal extends.
    pub(super) async fn start_vip(
        &self,
        spec: crate::vip::VipSpec,
    ) -> Result<
        (
            tokio::sync::oneshot::Sender<()>,
            tokio::task::JoinHandle<()>,
        ),
        RunError,
    > {
        crate::vip::check_capabilities()?;
        let cidr = spec.cidr();
        let span = info_span!(parent: None, "vip", node = %self.name);
        let vip = crate::vip::Vip::open(spec).instrument(span.clone()).await?;
        info!(vip = %cidr, "virtual IP managed");
        let (hold_tx, hold_rx) = watch::channel(None);
        let (mut lease, mut published) = (self.lease.clone(), self.follow());
        let hold = async move {
            loop {
                let hold_until = if published.borrow_and_update().local.leading {
                    let lease = *lease.borrow_and_update();
                    lease.id.map(|_| boot_clock::instant_at(lease.valid_until))
                } else {
                    None
                };
                hold_tx.send_if_modified(|current| {
                    let changed = *current != hold_until;
                    *current = hold_until;
                    changed
                });
                tokio::select! {
                    changed = lease.changed() => if changed.is_err() { break },
                    changed = published.changed() => if changed.is_err() { break },
                }
            }
        };
        tokio::spawn(hold.instrument(span.clone()));
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let vip = crate::vip::run(
            vip,
            hold_rx,
            self.vip_held.clone(),
            self.timing.loop_wait.min(Duration::from_secs(1)),
            stopped,
        );
        let task = tokio::spawn(vip.instrument(span));
        Ok((stop, task))
    }

    /// Runs until `shutdown` resolves (SIGTERM/SIGINT) or a fatal error.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
        // Every line says which node wrote it and which task: the HA loop
        // here, and each task it starts in a root span of its own (not
        // below this one, which would print both).
        let span = info_span!("ha_loop", node = %self.name);
        self.run_in_span(shutdown).instrument(span).await
    }

    async fn run_in_span(mut self, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
        info!(ttl = ?self.timing.ttl, loop_wait = ?self.timing.loop_wait, "agent starting");
        // PostgreSQL never runs unguarded: a machine where the guard cannot
        // run is refused before anything is touched.
        mainstay_pg::check_guard(&self.pg.settings().guard_program)?;
        // The interface is checked before anything is written.
        let vip = match &self.vip {
            Some(spec) => Some(self.start_vip(spec.clone()).await?),
            None => None,
        };
        self.pg
            .write_pgpass()
            .await
            .map_err(|source| RunError::PasswordFile { source })?;
        let adopted = self.adopt_postmaster();
        let lease_tx = self.lease_tx.take().ok_or(RunError::AlreadyRan)?;
        let tls = match &self.api_tls_files {
            Some(files) => Some(crate::tls::acceptor(&files.cert_file, &files.key_file)?),
            None => None,
        };
        let listener = crate::api::bind(self.api_listen).await?;
        let agent_check_listener = match &self.agent_check {
            Some((config, _)) => Some(tokio::net::TcpListener::bind(config.listen).await.map_err(
                |source| RunError::AgentCheck {
                    listen: config.listen,
                    source,
                },
            )?),
            None => None,
        };
        let mut listeners = Vec::new();
        for (access, key, listen) in &self.proxy_listens {
            listeners.push((*access, crate::proxy::bind(key, *listen)?));
            info!(%listen, listener = access.label(), "proxy listening");
        }
        let proxy = if listeners.is_empty() {
            None
        } else {
            let span = info_span!(parent: None, "proxy", node = %self.name);
            Some(span.in_scope(|| {
                crate::proxy::spawn(
                    listeners,
                    self.route.subscribe(),
                    self.proxy_wait,
                    self.proxy_stats.clone(),
                )
            })?)
        };
        self.start_replication()
            .map_err(|source| RunError::Replication { source })?;
        // One command at a time: a second caller waits its turn.
        let (command_tx, mut commands) = tokio::sync::mpsc::channel(1);
        info!(listen = %self.api_listen, "REST API listening");
        let live = Arc::new(mainstay_pg::LiveProbe::new(
            &self.pg.settings().local_tcp_host(),
            self.pg.settings().port,
            self.pg.settings().superuser.clone(),
        ));
        let agent_check = match (&self.agent_check, agent_check_listener) {
            (Some((config, check)), Some(listener)) => {
                info!(listen = %config.listen, "HAProxy agent check listening");
                Some(
                    check
                        .clone()
                        .serve(listener, self.snapshot.subscribe(), live.clone()),
                )
            }
            _ => None,
        };
        let api = crate::api::serve(
            listener,
            crate::api::router(Arc::new(ApiState {
                proxy: (!self.proxy_listens.is_empty()).then(|| {
                    (
                        self.proxy_stats.clone(),
                        self.proxy_listens.iter().map(|l| l.0.label()).collect(),
                    )
                }),
                snapshot: self.snapshot.subscribe(),
                dcs: self.dcs.clone(),
                timing: self.timing,
                auth: self.api_auth.clone(),
                commands: command_tx,
                failsafe_contact: self.failsafe_contact.clone(),
                running_command: Default::default(),
                params: crate::api::ParamCheck {
                    bin_dir: self.pg.settings().bin_dir.clone(),
                    run_as: self.pg.settings().run_as.clone(),
                    file_parameters: self.file_parameters.clone(),
                },
                ca_file: self.api_ca_file.clone(),
                replication: self.replication.clone(),
                etcd_member: self.etcd_member.clone(),
                live,
            })),
            tls,
            self.api_limits,
        );
        // One task: what stops the API stops the agent check.
        let api = async move {
            match agent_check {
                Some(agent_check) => {
                    tokio::join!(api, agent_check);
                }
                None => api.await,
            }
        };
        let api = tokio::spawn(api.instrument(info_span!(parent: None, "api", node = %self.name)));
        let keeper = keep_lease(LeaseKeeper {
            dcs: self.dcs.clone(),
            name: self.name.clone(),
            timing: self.timing,
            tx: lease_tx,
            fencer: self.fencer.clone(),
            wake: self.wake.clone(),
            latency_us: self.renew_latency_us.clone(),
            paused: self.renewals_paused.clone(),
            failsafe: Failsafe {
                peers: self.failsafe_peers.clone(),
                auth: self.api_auth.clone(),
                ca_file: self.api_ca_file.clone(),
            },
            resume: self.handover.as_ref().and_then(|h| h.lease).map(|l| Lease {
                id: Some(l.id),
                valid_until: Millis(l.valid_until_ms),
                members_confirmed: l.members_confirmed,
            }),
        });
        let span = info_span!(parent: None, "lease_keeper", node = %self.name);
        let keeper = tokio::spawn(keeper.instrument(span));
        // Before the first turn, but after the listeners and the lease
        // keeper started: a takeover's write pause then holds no start-up
        // work, as the lease is granted while PostgreSQL stops.
        if self.pg.is_running() && !adopted {
            self.stop_stray_postgres().await?;
        }
        let watcher = forward_watch(
            self.dcs.clone(),
            self.member_interest.clone(),
            self.wake.clone(),
        );
        let span = info_span!(parent: None, "watch_forward", node = %self.name);
        let watcher = tokio::spawn(watcher.instrument(span));
        let dcs_leader_mover =
            keep_dcs_leader_away(self.dcs.clone(), self.follow(), self.etcd_members.clone());
        let span = info_span!(parent: None, "etcd_leader_mover", node = %self.name);
        let dcs_leader_mover = tokio::spawn(dcs_leader_mover.instrument(span));
        self.start_services();
        let hooks_closing = watch::Sender::new(false);
        let hooks = (!self.hooks.is_empty()).then(|| {
            mainstay_services::hooks::spawn(
                self.hooks.clone(),
                self.follow(),
                hooks_closing.subscribe(),
                self.cluster.clone(),
                &self.name,
            )
        });
        let watchdog = (self.watchdog == Availability::Ready).then(|| {
            let fencer = self.fencer.clone();
            let keeper = crate::watchdog_keeper::keep(
                self.watchdog_config.clone(),
                self.lease.clone(),
                move || fencer.writable(),
                self.timing.fencing_margin,
            );
            let span = info_span!(parent: None, "watchdog_keeper", node = %self.name);
            tokio::spawn(keeper.instrument(span))
        });
        tokio::pin!(shutdown);
        // Numbered so that one turn's lines read together in the log.
        let mut turns: u64 = 0;
        // READY as soon as the agent serves, before the first turn: a first
        // turn may clone a large database for an hour, and systemd would
        // kill a start that takes longer than TimeoutStartSec (then start
        // the clone over, again and again).
        let mut systemd = crate::systemd::Notifier::from_env();
        systemd.ready("serving; PostgreSQL follows the cluster");
        let systemd_pinger = systemd
            .ping_every()
            .map(|every| tokio::spawn(keep_systemd_watchdog_fed(systemd, every)));
        let result = loop {
            let turn_started = Instant::now();
            let mut next = turn_started + self.timing.loop_wait;
            let mut fatal = None;
            // A turn that changed something is followed at once by another,
            // so that e.g. taking the leader key and promoting happen together.
            for _ in 0..6 {
                turns += 1;
                let span = info_span!("turn", n = turns, role = %self.role_going_in());
                match self.turn().instrument(span.clone()).await {
                    Ok((changed, wake_at)) => {
                        if let Some(at) = wake_at {
                            next = next.min(self.origin + Duration::from_millis(at.0));
                        }
                        if !changed {
                            break;
                        }
                    }
                    Err(TurnError::Fatal(reason)) => {
                        fatal = Some(reason);
                        break;
                    }
                    Err(TurnError::Failed(reason)) => {
                        span.in_scope(|| warn!("{reason}"));
                        break;
                    }
                }
            }
            self.publish_snapshot(turn_started);
            self.publish_route();
            self.move_for_failed_services().await;
            if keeper.is_finished() {
                // Without it no deadline is ever extended: the guard would
                // fence a healthy primary.
                fatal = Some("the lease keeper stopped".into());
            }
            if let Some(reason) = fatal {
                error!("stopping the agent: {reason}");
                break Err(RunError::Fatal(reason));
            }
            tokio::select! {
                _ = &mut shutdown => break Ok(Exit::Stop),
                _ = reexec_signal(&mut self.reexec) => {
                    if self.successor_ready().await {
                        break Ok(Exit::Reexec);
                    }
                }
                Some((command, reply)) = commands.recv() => {
                    let answer = self.run_command(command).await;
                    let _ = reply.send(answer);
                }
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep_until(next.max(Instant::now() + Duration::from_millis(5))) => {}
            }
        };
        let result = match result {
            Ok(Exit::Reexec) => {
                // Nothing but the exec may start a process from here on
                // (the guard's socket is about to become inheritable).
                api.abort();
                watcher.abort();
                dcs_leader_mover.abort();
                if let Some(hooks) = &hooks {
                    hooks.abort();
                }
                // Returns only when the exec failed or a SIGTERM came
                // first: then a clean stop.
                let why = self
                    .reexec_now(&keeper, watchdog.as_ref(), shutdown.as_mut())
                    .await;
                error!("{why}: stopping instead");
                Err(RunError::Fatal(why))
            }
            Ok(Exit::Stop) => Ok(()),
            Err(err) => Err(err),
        };
        if let Some(pinger) = systemd_pinger {
            pinger.abort();
        }
        crate::systemd::Notifier::from_env().stopping();
        if let Some((stop, task)) = vip {
            // The address goes before PostgreSQL stops: clients get a quick
            // refusal from the next holder instead of a timeout here.
            let _ = stop.send(());
            let _ = tokio::time::timeout(Duration::from_secs(3), task).await;
        }
        if let Some(services) = self.services.take() {
            // Before PostgreSQL stops and the leader key goes: a with-leader
            // service must be gone before another node can start its copy.
            services.stop(services.stop_limit()).await;
        }
        self.shut_down().await;
        keeper.abort();
        if let Some(task) = watchdog {
            // PostgreSQL is stopped: the keeper's lease channel closes with
            // the lease keeper and the watchdog is closed cleanly, never
            // dropped (that would reset the host).
            let _ = tokio::time::timeout(Duration::from_secs(3), task).await;
        }
        api.abort();
        drop(proxy);
        watcher.abort();
        dcs_leader_mover.abort();
        if let Some(hooks) = hooks {
            // PostgreSQL has stopped: on_stop runs, within its timeout.
            self.publish_state();
            hooks_closing.send_replace(true);
            let _ = tokio::time::timeout(self.hooks.timeout + Duration::from_secs(1), hooks).await;
        }
        result
    }

    /// Starts the supervisor of `[[service]]`, if any: it follows what this
    /// agent publishes, and a with-leader service's guard gets every new
    /// fencing deadline.
    fn start_services(&mut self) {
        if self.service_specs.is_empty() {
            return;
        }
        let mut lease = self.lease.clone();
        let deadline =
            watch::Sender::new(boot_clock::boot_time(lease.borrow_and_update().valid_until));
        let relay = deadline.clone();
        tokio::spawn(async move {
            while lease.changed().await.is_ok() {
                let at = boot_clock::boot_time(lease.borrow_and_update().valid_until);
                relay.send_if_modified(|current| std::mem::replace(current, at) != at);
            }
        });
        let inputs = mainstay_services::Inputs {
            published: self.follow(),
            deadline: deadline.subscribe(),
            guard_program: self.pg.settings().guard_program.clone(),
        };
        let specs = std::mem::take(&mut self.service_specs);
        self.services = Some(Arc::new(mainstay_services::Services::start(
            specs, inputs, &self.name,
        )));
    }

    /// Starts copying the `[[replicate]]` directories: from this node while
    /// it leads, from the leader otherwise (see `mainstay_files::runner`).
    fn start_replication(&mut self) -> std::io::Result<()> {
        if self.replicate_specs.is_empty() {
            return Ok(());
        }
        let (auth, ca_file) = (self.api_auth.clone(), self.api_ca_file.clone());
        let transport =
            move || crate::files_transport::ApiTransport::new(auth.clone(), ca_file.clone());
        let span = info_span!(parent: None, "replicate", node = %self.name);
        let specs = std::mem::take(&mut self.replicate_specs);
        let replication = span.in_scope(|| {
            mainstay_files::Replication::start(specs, self.follow(), self.name.clone(), transport)
        })?;
        self.replication = Some(Arc::new(replication));
        Ok(())
    }

    /// Stops this node's with-leader services and waits for them, before it
    /// gives leadership away on purpose (a switchover, a release): the next
    /// leader starts its copies right after its promotion.
    pub(super) async fn stop_with_leader_services(&self) {
        if let Some(services) = &self.services {
            services
                .allow(
                    mainstay_services::Allowed::NotWithLeader,
                    services.stop_limit(),
                )
                .await;
        }
    }

    /// Lets with-leader services run again, once they can see that this
    /// node no longer leads: the state published before the hand-over
    /// still says it does, and a service let go on that would start a copy
    /// beside the new leader's.
    pub(super) fn allow_with_leader_services(&self) {
        if let Some(services) = &self.services {
            self.publish_state();
            services.allow_now(mainstay_services::Allowed::All);
        }
    }

    /// SIGTERM: a primary stops cleanly (replicas receive everything) and
    /// gives the leader key up so the best replica takes over at once.
    pub(super) async fn shut_down(&mut self) {
        let lease = self.lease.borrow().id;
        let leading = match (self.dcs.read_cluster().await, lease) {
            (Ok(view), Some(lease)) => view
                .leader
                .is_some_and(|l| l.name == self.name && l.lease_id == lease),
            _ => false,
        };
        info!(leading, "shutting down: stopping PostgreSQL");
        if self.pg.is_running()
            && let Err(err) = self.pg.stop(StopMode::Fast).await
        {
            warn!("fast shutdown failed ({err}): immediate shutdown");
            self.pg.fencer().fence_now();
            let _ = self.pg.stop(StopMode::Immediate).await;
        }
        let stopped = !self.pg.is_running();
        if stopped {
            self.fencer.set_writable(false);
        }
        if let Some(lease) = lease {
            // A primary that may still accept writes keeps the key: the
            // others take over only once the lease (and the watchdog's
            // deadline before it) has run out.
            if leading && !stopped {
                error!("PostgreSQL did not stop: keeping the leader key until the lease expires");
                return;
            }
            if leading {
                match self.dcs.release_leader(&self.name, lease).await {
                    Ok(_) => info!("released the leader key: the best replica takes over"),
                    Err(err) => warn!("cannot release the leader key: {err}"),
                }
            }
            let _ = self.dcs.revoke_lease(lease).await;
        }
        info!("agent stopped");
    }
}

/// Pings systemd's watchdog from the runtime, not from the HA loop: a
/// turn may wait for minutes on a legitimate child (a clone of a large
/// database), and a watchdog fed by the loop would kill the agent in the
/// middle of it, again at each restart. What this catches is a frozen
/// process or runtime (systemd then kills the agent, and its guard stops
/// PostgreSQL); a loop that stops turning while the runtime runs shows as
/// 503 on `/liveness`, which is what a monitoring check watches.
async fn keep_systemd_watchdog_fed(mut notifier: crate::systemd::Notifier, every: Duration) {
    let mut ticks = tokio::time::interval(every);
    loop {
        ticks.tick().await;
        notifier.alive();
    }
}

/// While this node leads, keeps etcd's leader on another host: if this
/// host died holding both, etcd's new leader would extend every lease,
/// ours included, by a full TTL and the failover would take twice as long.
///
/// Every fifth round it also asks which members answer, for the
/// `etcd_member` alerts (a dead witness or member changes nothing until
/// the next loss, which would then stop every write).
async fn keep_dcs_leader_away<D: Dcs>(
    dcs: Arc<D>,
    mut published: watch::Receiver<Published>,
    etcd_members: Arc<std::sync::Mutex<crate::alerts::EtcdMembers>>,
) {
    const EVERY: Duration = Duration::from_secs(2);
    const MOVE_TIMEOUT: Duration = Duration::from_secs(5);
    const MEMBERS_EVERY_ROUNDS: u32 = 5;
    let mut round = 0u32;
    loop {
        if !published.borrow_and_update().local.leading {
            *mainstay_core::poison::lock(&etcd_members) = Default::default();
            if published.changed().await.is_err() {
                return;
            }
            continue;
        }
        if round.is_multiple_of(MEMBERS_EVERY_ROUNDS)
            && let Ok(Ok(members)) = tokio::time::timeout(MOVE_TIMEOUT, dcs.dcs_members()).await
        {
            let silent: Vec<String> = members
                .iter()
                .filter(|m| m.answers != Some(true))
                .map(|m| {
                    if m.name.is_empty() {
                        m.id.clone()
                    } else {
                        m.name.clone()
                    }
                })
                .collect();
            *mainstay_core::poison::lock(&etcd_members) = crate::alerts::EtcdMembers {
                total: members.len(),
                silent,
            };
        }
        round = round.wrapping_add(1);
        let local = local_addresses();
        match tokio::time::timeout(MOVE_TIMEOUT, dcs.keep_leader_away(&local)).await {
            Ok(Ok(Some(member))) => info!(
                to = %member,
                "moved etcd's leadership off this host: a host holding both the etcd leader \
                 and the primary would double the failover time if it died"
            ),
            Ok(Ok(None)) => {}
            Ok(Err(err)) => debug!("cannot check where etcd's leader runs: {err}"),
            Err(_) => debug!("cannot check where etcd's leader runs: no answer"),
        }
        // Every EVERY while leading; a new view alone does not make it ask
        // etcd again.
        let next = Instant::now() + EVERY;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(next) => break,
                changed = published.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    if !published.borrow().local.leading {
                        break;
                    }
                }
            }
        }
    }
}

/// Every address on this host's interfaces.
fn local_addresses() -> Vec<std::net::IpAddr> {
    mainstay_sys::net::local_ip_addresses().unwrap_or_default()
}
