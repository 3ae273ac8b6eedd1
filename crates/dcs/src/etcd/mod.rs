//! [`Dcs`] over etcd v3: the only code in mainstay that talks to etcd.
//!
//! Three rules keep a sick etcd from stalling the agent:
//! - every request carries etcd's require-leader flag, so a member cut off
//!   from its quorum answers "no leader" (and cancels open watch and
//!   keep-alive streams) instead of serving stale reads or going silent;
//! - every call is bounded by the request timeout;
//! - requests go to one member at a time and move to the next when that
//!   member fails, so a hung member costs one timeout, not one in two.
//!
//! HTTP/2 pings are not used to detect a dead connection: etcd answers
//! pings more frequent than its `--grpc-keepalive-min-time` (5 s) with
//! GOAWAY. Watches probe liveness with progress requests instead.

use crate::{
    ConfigValue, Dcs, DcsError, HISTORY_ATTEMPTS, KeyKind, RawKey, Result, WATCH_CHANNEL,
    WatchEvent, build_view, check_name, corrupt, keys, parse_history, to_json,
};
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    LeaseKeepAliveStream, LeaseKeeper, PutOptions, TlsOptions, Txn, TxnOp, WatchOptions,
    WatchStream, Watcher,
};
use mainstay_core::poison::lock;
use mainstay_core::{ClusterView, HistoryEntry, InitializeRecord, MemberStatus};
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;
use tokio::sync::mpsc;

mod endpoint;
mod errors;
mod membership;
mod watch;

use errors::*;
use watch::forward_watch;

/// How to reach etcd.
#[derive(Clone)]
pub struct EtcdSettings {
    /// Client URLs, e.g. `http://10.0.0.1:2379`; `https://` with `tls`.
    pub endpoints: Vec<String>,
    /// The cluster name: keys live under `/mainstay/<cluster>/`.
    pub cluster: String,
    /// Upper bound of every call, including the wait for a connection.
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
    pub tls: Option<EtcdTls>,
    pub username: Option<String>,
    pub password: Option<String>,
}

impl EtcdSettings {
    /// Settings for plain-text etcd without authentication and with
    /// timeouts suited to a LAN.
    pub fn new(endpoints: Vec<String>, cluster: impl Into<String>) -> EtcdSettings {
        EtcdSettings {
            endpoints,
            cluster: cluster.into(),
            request_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(2),
            tls: None,
            username: None,
            password: None,
        }
    }
}

/// Hand-written so that the password never reaches a log.
impl fmt::Debug for EtcdSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdSettings")
            .field("endpoints", &self.endpoints)
            .field("cluster", &self.cluster)
            .field("request_timeout", &self.request_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("tls", &self.tls)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .finish()
    }
}

/// TLS for the etcd connection, PEM files.
#[derive(Clone, Debug, Default)]
pub struct EtcdTls {
    /// The CA that signed etcd's server certificate. Required: this build
    /// carries no system root certificates.
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key, when etcd asks for client certificates.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

/// A connection to etcd for one cluster. Cheap to clone; clones share the
/// connections.
///
/// It keeps one client per endpoint and sends every request to one member
/// at a time, moving to the next member when a call fails or times out
/// (like Patroni). etcd-client's own balancing over several endpoints keeps
/// picking a member that hangs (a crashed host whose TCP connections never
/// close), so that roughly every other request timed out for as long as the
/// member stayed frozen.
#[derive(Clone)]
pub struct EtcdDcs {
    inner: Arc<Inner>,
}

struct Inner {
    members: Vec<Member>,
    /// Index of the member requests go to.
    current: AtomicUsize,
    /// With the credentials, for connects made after construction.
    options: ConnectOptions,
    /// Without them: etcd's authentication needs a quorum, and a member's
    /// own view of its cluster must be readable without one.
    anonymous: ConnectOptions,
    prefix: String,
    request_timeout: Duration,
    /// Open keep-alive streams by lease. An entry is taken out while in use,
    /// so the lock is never held across an await.
    keepers: Mutex<HashMap<i64, Keeper>>,
}

struct Member {
    endpoint: String,
    /// `None` until first used with authentication, and again after etcd
    /// forgot the auth token (tokens live in the memory of one member and
    /// etcd-client never renews them).
    client: Mutex<Option<Client>>,
}

struct Keeper {
    /// The member whose stream this is; a keeper is not reused after a
    /// move to another member.
    member: usize,
    sender: LeaseKeeper,
    stream: LeaseKeepAliveStream,
}

impl fmt::Debug for EtcdDcs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdDcs")
            .field("prefix", &self.inner.prefix)
            .field("current", &self.current_endpoint())
            .field("request_timeout", &self.inner.request_timeout)
            .finish_non_exhaustive()
    }
}

impl EtcdDcs {
    /// Prepares the connections. They are made lazily, so this succeeds
    /// while etcd is down; calls then fail with [`DcsError::Unreachable`] or
    /// [`DcsError::Timeout`] until it is back. Bad URLs or TLS files are
    /// reported here.
    pub async fn connect(settings: EtcdSettings) -> Result<EtcdDcs> {
        check_name("cluster", &settings.cluster)?;
        if settings.endpoints.is_empty() {
            return Err(DcsError::Other("no etcd endpoint configured".into()));
        }
        let mut options = ConnectOptions::new()
            .with_require_leader(true)
            .with_connect_timeout(settings.connect_timeout);
        if let Some(tls) = &settings.tls {
            options = options.with_tls(tls_options(tls)?);
        }
        // Without credentials, connecting does no I/O: it only checks the
        // URL and TLS settings, which is worth doing now.
        let without_user = options.clone();
        match (&settings.username, &settings.password) {
            (Some(user), Some(password)) => options = options.with_user(user, password),
            (Some(_), None) | (None, Some(_)) => {
                return Err(DcsError::Other(
                    "etcd username and password must be given together".into(),
                ));
            }
            (None, None) => {}
        }
        let mut members = Vec::with_capacity(settings.endpoints.len());
        for endpoint in &settings.endpoints {
            let client = Client::connect([endpoint], Some(without_user.clone()))
                .await
                .map_err(|e| {
                    DcsError::Other(format!(
                        "invalid etcd endpoint {endpoint}: {}",
                        describe(&e)
                    ))
                })?;
            members.push(Member {
                endpoint: endpoint.clone(),
                client: Mutex::new(settings.username.is_none().then_some(client)),
            });
        }
        Ok(EtcdDcs {
            inner: Arc::new(Inner {
                members,
                current: AtomicUsize::new(0),
                anonymous: without_user,
                options,
                prefix: format!("/mainstay/{}/", settings.cluster),
                request_timeout: settings.request_timeout,
                keepers: Mutex::default(),
            }),
        })
    }

    /// The key prefix, `/mainstay/<cluster>/`.
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// The endpoint requests currently go to.
    pub fn current_endpoint(&self) -> &str {
        let inner = &self.inner;
        &inner.members[inner.current.load(Ordering::Relaxed)].endpoint
    }

    /// The client of the member in use, for tools and tests that need raw
    /// access. It has the require-leader flag but no request timeout.
    pub async fn client(&self) -> Result<Client> {
        let member = self.inner.current.load(Ordering::Relaxed);
        match tokio::time::timeout(self.inner.request_timeout, self.inner.client_of(member)).await {
            Err(_) => Err(DcsError::Timeout),
            Ok(result) => result.map_err(|e| map_err(e, &self.inner.members[member].endpoint)),
        }
    }

    fn key(&self, relative: &str) -> String {
        format!("{}{}", self.inner.prefix, relative)
    }

    /// Runs one request, bounded by the request timeout, on the member in
    /// use. Any failure to reach a member moves later requests to the next
    /// one. Within the time left, the request is sent again (to the member
    /// now in use) when that cannot apply it twice: it certainly never
    /// reached etcd (connection refused, member without leader), or it is
    /// `Idempotent`, which also covers the one failure tonic reports on a
    /// connection that died since the last request (e.g. etcd restarted).
    async fn call<T, F, Fut>(&self, kind: Request, mut request: F) -> Result<T>
    where
        F: FnMut(Client, usize) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let inner = &*self.inner;
        let in_use = AtomicUsize::new(inner.current.load(Ordering::Relaxed));
        let attempts = async {
            let members = inner.members.len();
            let mut tried = 0;
            let mut reauthenticated = false;
            loop {
                let member = in_use.load(Ordering::Relaxed);
                let outcome = match inner.client_of(member).await {
                    Ok(client) => request(client, member).await,
                    Err(e) => Err(e),
                };
                let error = match outcome {
                    Ok(value) => return Ok(value),
                    Err(error) => error,
                };
                if is_invalid_token(&error) && !reauthenticated {
                    reauthenticated = true;
                    inner.forget_client(member);
                    continue;
                }
                let unsent = is_unsent(&error);
                let error = map_err(error, &inner.members[member].endpoint);
                tried += 1;
                if matches!(error, DcsError::Unreachable(_) | DcsError::Timeout) {
                    let next = inner.fail_over(member, &error);
                    let again = match kind {
                        Request::Idempotent => tried < members.max(2),
                        Request::Once => unsent && tried < members,
                    };
                    if again {
                        tracing::debug!(%error, "sending the etcd request again");
                        in_use.store(next, Ordering::Relaxed);
                        continue;
                    }
                }
                return Err(error);
            }
        };
        match tokio::time::timeout(inner.request_timeout, attempts).await {
            Ok(result) => result,
            Err(_) => {
                inner.fail_over(in_use.load(Ordering::Relaxed), &DcsError::Timeout);
                Err(DcsError::Timeout)
            }
        }
    }

    async fn txn(&self, compares: Vec<Compare>, ops: Vec<TxnOp>) -> Result<bool> {
        let txn = Txn::new().when(compares).and_then(ops);
        let response = self
            .call(Request::Once, |mut client, _| {
                let txn = txn.clone();
                async move { client.txn(txn).await }
            })
            .await?;
        Ok(response.succeeded())
    }

    /// Puts `value` (or deletes, with `None`) at `relative` if its mod
    /// revision is still `expected` (0: only if absent) and every `extra`
    /// condition holds.
    async fn cas(
        &self,
        relative: &str,
        value: Option<Vec<u8>>,
        expected: i64,
        extra: Vec<Compare>,
    ) -> Result<bool> {
        let key = self.key(relative);
        let mut conditions = vec![Compare::mod_revision(
            key.clone(),
            CompareOp::Equal,
            expected,
        )];
        conditions.extend(extra);
        let op = match value {
            Some(value) => TxnOp::put(key, value, None),
            None => TxnOp::delete(key, None),
        };
        self.txn(conditions, vec![op]).await
    }

    /// The value, mod revision and lease of one key.
    /// A key only the leader writes: `value` if its revision is still the
    /// expected one and the leader key holds `holder` (name, lease).
    async fn put_as_leader(
        &self,
        relative: &str,
        value: Vec<u8>,
        expected: i64,
        holder: (&str, i64),
    ) -> Result<bool> {
        let holds = held_by(&self.key(keys::LEADER), holder.0, holder.1);
        self.cas(relative, Some(value), expected, holds).await
    }

    async fn get_one(&self, relative: &str) -> Result<Option<(Vec<u8>, i64, i64)>> {
        let key = self.key(relative);
        let mut response = self
            .call(Request::Idempotent, |mut client, _| {
                let key = key.clone();
                async move { client.get(key, None).await }
            })
            .await?;
        Ok(response.take_kvs().into_iter().next().map(|kv| {
            let (mod_revision, lease) = (kv.mod_revision(), kv.lease());
            (kv.into_key_value().1, mod_revision, lease)
        }))
    }

    async fn renew(
        &self,
        mut client: Client,
        member: usize,
        lease: i64,
    ) -> Result<i64, etcd_client::Error> {
        let reused = self.inner.keepers().remove(&lease);
        if let Some(mut keeper) = reused.filter(|k| k.member == member) {
            match keeper.renew().await {
                Ok(ttl) => {
                    self.keep(lease, keeper, ttl);
                    return Ok(ttl);
                }
                // Typically the member lost its leader and cancelled the
                // stream, or the connection was replaced; a new stream
                // tells which.
                Err(e) => tracing::debug!(lease, error = %e, "reopening keep-alive stream"),
            }
        }
        // Opening the stream already renews once, but etcd-client keeps that
        // answer's TTL to itself; a second renewal on the new stream reports it.
        let (sender, stream) = match client.lease_keep_alive(lease).await {
            Ok(opened) => opened,
            Err(etcd_client::Error::LeaseKeepAliveError(m)) if m.contains("not found") => {
                return Ok(0);
            }
            Err(e) => return Err(e),
        };
        let mut keeper = Keeper {
            member,
            sender,
            stream,
        };
        let ttl = keeper.renew().await?;
        self.keep(lease, keeper, ttl);
        Ok(ttl)
    }

    fn keep(&self, lease: i64, keeper: Keeper, ttl: i64) {
        if ttl > 0 {
            self.inner.keepers().insert(lease, keeper);
        }
    }
}

/// Whether a request may be sent twice without changing the outcome.
#[derive(Clone, Copy)]
enum Request {
    /// Reads, renewals, revocations, opening a watch.
    Idempotent,
    /// Writes and grants: sent again only if certainly not received.
    Once,
}

impl Inner {
    async fn client_of(&self, member: usize) -> Result<Client, etcd_client::Error> {
        let slot = &self.members[member].client;
        if let Some(client) = lock(slot).clone() {
            return Ok(client);
        }
        // Two callers may both connect here; the loser's client is dropped.
        let client =
            Client::connect([&self.members[member].endpoint], Some(self.options.clone())).await?;
        Ok(lock(slot).get_or_insert(client).clone())
    }

    fn forget_client(&self, member: usize) {
        lock(&self.members[member].client).take();
    }

    /// Moves requests from `failed` to the next member (unless another
    /// request already did) and returns the member now in use.
    fn fail_over(&self, failed: usize, error: &DcsError) -> usize {
        let count = self.members.len();
        if count == 1 {
            return 0;
        }
        let next = (failed + 1) % count;
        match self
            .current
            .compare_exchange(failed, next, Ordering::Relaxed, Ordering::Relaxed)
        {
            Ok(_) => {
                tracing::warn!(
                    failed = %self.members[failed].endpoint,
                    next = %self.members[next].endpoint,
                    %error,
                    "etcd member failed, moving to the next one"
                );
                next
            }
            Err(now) => now,
        }
    }

    fn keepers(&self) -> MutexGuard<'_, HashMap<i64, Keeper>> {
        lock(&self.keepers)
    }
}

impl Keeper {
    /// One renewal on this stream. If it is cancelled half-way (timeout),
    /// the keeper is dropped with it, so a late answer can never be taken
    /// for the answer to a later renewal.
    async fn renew(&mut self) -> Result<i64, etcd_client::Error> {
        self.sender.keep_alive().await?;
        match self.stream.message().await? {
            Some(response) => Ok(response.ttl().max(0)),
            None => Err(etcd_client::Error::LeaseKeepAliveError(
                "etcd closed the keep-alive stream".into(),
            )),
        }
    }
}

impl Dcs for EtcdDcs {
    async fn grant_lease(&self, ttl_secs: i64) -> Result<i64> {
        let response = self
            .call(Request::Once, |mut client, _| async move {
                client.lease_grant(ttl_secs, None).await
            })
            .await?;
        if !response.error().is_empty() {
            return Err(DcsError::Other(format!(
                "etcd refused a lease: {}",
                response.error()
            )));
        }
        if response.ttl() != ttl_secs {
            tracing::warn!(
                requested = ttl_secs,
                granted = response.ttl(),
                "etcd changed the lease TTL (its minimum is 1.5 x election timeout)"
            );
        }
        Ok(response.id())
    }

    async fn keep_alive(&self, lease: i64) -> Result<i64> {
        self.call(Request::Idempotent, |client, member| {
            self.renew(client, member, lease)
        })
        .await
    }

    async fn revoke_lease(&self, lease: i64) -> Result<()> {
        self.inner.keepers().remove(&lease);
        let revoked = self
            .call(Request::Idempotent, |mut client, _| async move {
                client.lease_revoke(lease).await
            })
            .await;
        match revoked {
            Ok(_) | Err(DcsError::Conflict(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn read_cluster(&self) -> Result<ClusterView> {
        let prefix = &self.inner.prefix;
        let mut response = self
            .call(Request::Idempotent, |mut client, _| async move {
                client
                    .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
                    .await
            })
            .await?;
        let revision = response.header().map_or(0, |h| h.revision());
        let kvs = response.take_kvs();
        let raw = kvs.iter().filter_map(|kv| {
            let key = std::str::from_utf8(kv.key()).ok()?;
            Some(RawKey {
                key: key.strip_prefix(prefix.as_str())?,
                value: kv.value(),
                mod_revision: kv.mod_revision(),
                lease: kv.lease(),
            })
        });
        build_view(prefix, revision, raw)
    }

    async fn put_member(&self, status: &MemberStatus, lease: i64) -> Result<()> {
        check_name("member", &status.name)?;
        let value = to_json(status)?;
        let key = self.key(&keys::member(&status.name));
        // Writing the same status twice only bumps its revision.
        self.call(Request::Idempotent, |mut client, _| {
            let (key, value) = (key.clone(), value.clone());
            async move {
                client
                    .put(key, value, Some(PutOptions::new().with_lease(lease)))
                    .await
            }
        })
        .await?;
        Ok(())
    }

    async fn acquire_leader(&self, name: &str, lease: i64) -> Result<bool> {
        check_name("member", name)?;
        let key = self.key(keys::LEADER);
        self.txn(
            vec![Compare::create_revision(key.clone(), CompareOp::Equal, 0)],
            vec![TxnOp::put(
                key,
                name,
                Some(PutOptions::new().with_lease(lease)),
            )],
        )
        .await
    }

    async fn release_leader(&self, name: &str, lease: i64) -> Result<bool> {
        let key = self.key(keys::LEADER);
        self.txn(
            held_by(&key, name, lease),
            vec![TxnOp::delete(key.clone(), None)],
        )
        .await
    }

    async fn leader_held_by(&self, name: &str, lease: i64) -> Result<bool> {
        Ok(match self.get_one(keys::LEADER).await? {
            Some((value, _, key_lease)) => value == name.as_bytes() && key_lease == lease,
            None => false,
        })
    }

    async fn hand_over_leader(
        &self,
        from: &str,
        lease_from: i64,
        to: &str,
        lease_to: i64,
    ) -> Result<bool> {
        check_name("member", to)?;
        let key = self.key(keys::LEADER);
        self.txn(
            held_by(&key, from, lease_from),
            vec![TxnOp::put(
                key.clone(),
                to,
                Some(PutOptions::new().with_lease(lease_to)),
            )],
        )
        .await
    }

    async fn create_initialize(&self, record: &InitializeRecord) -> Result<bool> {
        let key = self.key(keys::INITIALIZE);
        self.txn(
            vec![Compare::create_revision(key.clone(), CompareOp::Equal, 0)],
            vec![TxnOp::put(key, to_json(record)?, None)],
        )
        .await
    }

    async fn update_initialize(
        &self,
        record: &InitializeRecord,
        expected_mod_revision: i64,
    ) -> Result<bool> {
        self.cas(
            keys::INITIALIZE,
            Some(to_json(record)?),
            expected_mod_revision,
            Vec::new(),
        )
        .await
    }

    async fn delete_initialize(&self, expected_mod_revision: i64) -> Result<bool> {
        self.cas(keys::INITIALIZE, None, expected_mod_revision, Vec::new())
            .await
    }

    async fn append_history(
        &self,
        entry: &HistoryEntry,
        holder: Option<(&str, i64)>,
    ) -> Result<()> {
        let key = self.key(keys::HISTORY);
        for _ in 0..HISTORY_ATTEMPTS {
            let (mut history, mod_revision) = match self.get_one(keys::HISTORY).await? {
                Some((value, mod_revision, _)) => (parse_history(&key, &value)?, mod_revision),
                None => (Vec::new(), 0),
            };
            history.push(entry.clone());
            let holds = holder.map_or_else(Vec::new, |(name, lease)| {
                held_by(&self.key(keys::LEADER), name, lease)
            });
            let written = self
                .cas(keys::HISTORY, Some(to_json(&history)?), mod_revision, holds)
                .await?;
            if written {
                return Ok(());
            }
            if let Some((name, lease)) = holder
                && !self.leader_held_by(name, lease).await?
            {
                return Err(crate::not_leader(name));
            }
        }
        Err(DcsError::Conflict(format!(
            "{key} changed under every one of {HISTORY_ATTEMPTS} attempts to append to it"
        )))
    }

    async fn append_recovery(&self, record: &mainstay_core::RecoveryRecord) -> Result<()> {
        let key = self.key(keys::RECOVERIES);
        for _ in 0..HISTORY_ATTEMPTS {
            let (mut records, mod_revision): (Vec<serde_json::Value>, i64) =
                match self.get_one(keys::RECOVERIES).await? {
                    // Whatever is there stays, readable or not.
                    Some((value, mod_revision, _)) => (
                        serde_json::from_slice(&value).unwrap_or_else(|_| {
                            vec![serde_json::Value::String(
                                String::from_utf8_lossy(&value).into_owned(),
                            )]
                        }),
                        mod_revision,
                    ),
                    None => (Vec::new(), 0),
                };
            records.push(serde_json::to_value(record).map_err(|e| corrupt(&key, e))?);
            let value = to_json(&records)?;
            if self
                .cas(keys::RECOVERIES, Some(value), mod_revision, Vec::new())
                .await?
            {
                return Ok(());
            }
        }
        Err(DcsError::Conflict(format!(
            "{key} changed under every one of {HISTORY_ATTEMPTS} attempts to append to it"
        )))
    }

    async fn read_config(&self) -> Result<Option<ConfigValue>> {
        let Some((value, mod_revision, _)) = self.get_one(keys::CONFIG).await? else {
            return Ok(None);
        };
        let value =
            serde_json::from_slice(&value).map_err(|e| corrupt(&self.key(keys::CONFIG), e))?;
        Ok(Some(ConfigValue {
            value,
            mod_revision,
        }))
    }

    async fn put_failover(
        &self,
        request: &mainstay_core::FailoverRequest,
        expected_mod_revision: i64,
    ) -> Result<bool> {
        self.cas(
            keys::FAILOVER,
            Some(to_json(request)?),
            expected_mod_revision,
            Vec::new(),
        )
        .await
    }

    async fn delete_failover(&self, expected_mod_revision: i64) -> Result<bool> {
        self.cas(keys::FAILOVER, None, expected_mod_revision, Vec::new())
            .await
    }

    async fn write_sync(
        &self,
        state: &mainstay_core::SyncState,
        expected_mod_revision: i64,
        holder: (&str, i64),
    ) -> Result<bool> {
        self.put_as_leader(keys::SYNC, to_json(state)?, expected_mod_revision, holder)
            .await
    }

    async fn write_failsafe(
        &self,
        state: &mainstay_core::FailsafeState,
        expected_mod_revision: i64,
        holder: (&str, i64),
    ) -> Result<bool> {
        self.put_as_leader(
            keys::FAILSAFE,
            to_json(state)?,
            expected_mod_revision,
            holder,
        )
        .await
    }

    async fn delete_member(&self, name: &str) -> Result<()> {
        check_name("member", name)?;
        let key = self.key(&keys::member(name));
        self.txn(Vec::new(), vec![TxnOp::delete(key, None)])
            .await
            .map(|_| ())
    }

    async fn write_config(
        &self,
        value: &serde_json::Value,
        expected_mod_revision: i64,
    ) -> Result<bool> {
        self.cas(
            keys::CONFIG,
            Some(to_json(value)?),
            expected_mod_revision,
            Vec::new(),
        )
        .await
    }

    async fn dcs_members(&self) -> Result<Vec<crate::DcsMember>> {
        self.members_with_health().await
    }

    async fn add_dcs_member(&self, peer_url: &str) -> Result<Vec<crate::DcsMember>> {
        self.add(peer_url).await
    }

    async fn remove_dcs_member(&self, name: &str) -> Result<()> {
        self.remove(name).await
    }

    async fn dcs_view_at(&self, client_url: &str) -> Result<crate::EndpointView> {
        self.view_at(client_url).await
    }

    async fn dcs_answers_at(&self, client_url: &str) -> bool {
        self.answers_at(client_url).await
    }

    async fn keep_leader_away(&self, local: &[std::net::IpAddr]) -> Result<Option<String>> {
        let (members, leader) = self
            .call(Request::Idempotent, |mut client, _| async move {
                let members = client.member_list().await?.members().to_vec();
                let leader = client.status().await?.leader();
                Ok((members, leader))
            })
            .await?;
        let Some(current) = members.iter().find(|m| m.id() == leader) else {
            return Ok(None);
        };
        // The usual answer, every 2 s: etcd's leader is elsewhere.
        if !runs_on(current.client_urls(), local).await {
            return Ok(None);
        }
        let Some(url) = current.client_urls().first() else {
            return Ok(None);
        };
        // MoveLeader is only served by the leader itself.
        let mut client = Client::connect([url], Some(self.inner.options.clone()))
            .await
            .map_err(|e| map_err(e, url))?;
        let mut last_error = None;
        for target in &members {
            // A member that does not answer (a dead host's) would take the
            // role and lose it again after an election timeout, during
            // which etcd drops every write: the leases' renewals too.
            if target.is_learner()
                || target.client_urls().is_empty()
                || runs_on(target.client_urls(), local).await
                || self.answers(target).await != Some(true)
            {
                continue;
            }
            match client.move_leader(target.id()).await {
                Ok(_) => return Ok(Some(target.name().to_string())),
                // That member may be down or behind: try the next one.
                Err(e) => last_error = Some(map_err(e, url)),
            }
        }
        match last_error {
            Some(error) => Err(error),
            None => Ok(None),
        }
    }

    async fn watch(&self) -> Result<mpsc::Receiver<WatchEvent>> {
        let prefix = &self.inner.prefix;
        let (watcher, stream, member) = self
            .call(Request::Idempotent, |mut client, member| async move {
                let options = WatchOptions::new().with_prefix();
                let (watcher, stream) = client.watch(prefix.as_str(), Some(options)).await?;
                Ok((watcher, stream, member))
            })
            .await?;
        let (tx, rx) = mpsc::channel(WATCH_CHANNEL);
        tokio::spawn(forward_watch(
            watcher,
            stream,
            tx,
            Arc::downgrade(&self.inner),
            member,
        ));
        Ok(rx)
    }
}

fn held_by(key: &str, name: &str, lease: i64) -> Vec<Compare> {
    vec![
        Compare::value(key, CompareOp::Equal, name),
        Compare::lease(key, CompareOp::Equal, lease),
    ]
}

fn tls_options(tls: &EtcdTls) -> Result<TlsOptions> {
    let read = |what: &str, path: &PathBuf| {
        std::fs::read(path).map_err(|e| {
            DcsError::Other(format!(
                "cannot read etcd TLS {what} {}: {e}",
                path.display()
            ))
        })
    };
    let Some(ca_file) = &tls.ca_file else {
        return Err(DcsError::Other(
            "etcd TLS needs ca_file: mainstay carries no system root certificates".into(),
        ));
    };
    let mut options = TlsOptions::new().ca_certificate(Certificate::from_pem(read("CA", ca_file)?));
    match (&tls.cert_file, &tls.key_file) {
        (Some(cert), Some(key)) => {
            options = options.identity(Identity::from_pem(
                read("certificate", cert)?,
                read("key", key)?,
            ));
        }
        (None, None) => {}
        _ => {
            return Err(DcsError::Other(
                "etcd TLS cert_file and key_file must be given together".into(),
            ));
        }
    }
    Ok(options)
}

/// Whether a member advertising `urls` runs on a host with the addresses
/// `local` (a name is resolved; one that does not resolve is elsewhere).
async fn runs_on(urls: &[String], local: &[std::net::IpAddr]) -> bool {
    for url in urls {
        let Some(host) = url_host(url) else { continue };
        if let Ok(address) = host.parse::<std::net::IpAddr>() {
            if local.contains(&address) {
                return true;
            }
            continue;
        }
        if let Ok(Ok(mut addresses)) =
            tokio::time::timeout(Duration::from_secs(1), tokio::net::lookup_host((host, 0))).await
            && addresses.any(|a| local.contains(&a.ip()))
        {
            return true;
        }
    }
    false
}

/// The host of `scheme://host:port/...`, without IPv6 brackets.
fn url_host(url: &str) -> Option<&str> {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split('/').next()?;
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next()?,
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    (!host.is_empty()).then_some(host)
}

#[cfg(test)]
mod tests {
    #[test]
    fn url_hosts() {
        assert_eq!(url_host("http://10.0.0.1:2379"), Some("10.0.0.1"));
        assert_eq!(
            url_host("https://etcd-a.example:2379/"),
            Some("etcd-a.example")
        );
        assert_eq!(url_host("http://[fd00::1]:2379"), Some("fd00::1"));
        assert_eq!(url_host("10.0.0.2:2379"), Some("10.0.0.2"));
        assert_eq!(url_host("http://:2379"), None);
    }

    use super::*;

    #[test]
    fn debug_hides_the_password() {
        let mut settings = EtcdSettings::new(vec!["http://127.0.0.1:2379".into()], "c");
        settings.username = Some("root".into());
        settings.password = Some("hunter2".into());
        let text = format!("{settings:?}");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("***"), "{text}");
    }

    #[test]
    fn statuses_map_to_actionable_errors() {
        let no_leader = tonic::Status::unavailable("etcdserver: no leader");
        assert!(
            matches!(status_error(&no_leader), DcsError::Unreachable(m) if m.contains("quorum"))
        );
        let gone = tonic::Status::not_found("etcdserver: requested lease not found");
        assert!(matches!(status_error(&gone), DcsError::Conflict(_)));
        let late = tonic::Status::deadline_exceeded("context deadline exceeded");
        assert_eq!(status_error(&late), DcsError::Timeout);
    }
}
