//! SQL this crate sends: the health probe, promotion, roles, replication
//! slots, timeline history. Passwords go to the server only as SCRAM
//! verifiers computed here, so they cannot end up in a server log.

use crate::conf::{quote_ident, quote_literal};
use crate::error::{Error, Result};
use crate::settings::Credentials;
use mainstay_core::Lsn;
use std::future::Future;
use std::time::Duration;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};

/// Connection establishment bound; a peer that does not answer in this time
/// is treated as down.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Bound for ordinary queries (promotion has its own).
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens a TCP connection; the connection task ends when the client drops.
pub async fn connect(host: &str, port: u16, who: &Credentials, dbname: &str) -> Result<Client> {
    let mut config = tokio_postgres::Config::new();
    config
        .host(host)
        .port(port)
        .user(&who.user)
        .password(&who.password)
        .dbname(dbname)
        .application_name("mainstay")
        .connect_timeout(CONNECT_TIMEOUT);
    let context = || format!("connect to {host}:{port} as {}", who.user);
    let connecting = tokio::time::timeout(
        CONNECT_TIMEOUT + Duration::from_secs(1),
        config.connect(NoTls),
    );
    let (client, connection) = connecting
        .await
        .map_err(|_| Error::Timeout {
            what: context(),
            after: CONNECT_TIMEOUT,
        })?
        .map_err(|e| Error::sql(context(), e))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// Runs one query future with a time bound and an error context.
pub async fn bounded<T>(
    what: &str,
    limit: Duration,
    fut: impl Future<Output = std::result::Result<T, tokio_postgres::Error>>,
) -> Result<T> {
    match tokio::time::timeout(limit, fut).await {
        Ok(result) => result.map_err(|e| Error::sql(what, e)),
        Err(_) => Err(Error::Timeout {
            what: what.into(),
            after: limit,
        }),
    }
}

/// What a running PostgreSQL says about itself.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Health {
    pub in_recovery: bool,
    /// Primary: the timeline it writes (from the current WAL file name;
    /// pg_control's checkpoint timeline is stale right after a promotion).
    /// Replica: the timeline it last received, or replayed when not streaming.
    pub timeline: u32,
    pub system_identifier: u64,
    /// e.g. "15.5 (Debian 15.5-0+deb12u1)".
    pub server_version: String,
    pub server_version_num: u32,
    /// Primary only: `pg_current_wal_lsn()` (written).
    pub current_lsn: Option<Lsn>,
    /// Primary only: `pg_current_wal_flush_lsn()` (durable).
    pub flush_lsn: Option<Lsn>,
    /// Replica only: `pg_last_wal_receive_lsn()` (received and flushed).
    pub receive_lsn: Option<Lsn>,
    /// Replica only: `pg_last_wal_replay_lsn()`.
    pub replay_lsn: Option<Lsn>,
    /// Replica only: seconds since the last replayed transaction committed
    /// on the primary (grows on an idle primary too).
    pub replay_delay_secs: Option<f64>,
    /// Replica only, while a WAL receiver process exists.
    pub wal_receiver: Option<WalReceiver>,
    /// Primary only: `pg_stat_replication`.
    pub replicas: Vec<ReplicationPeer>,
    /// As the server reports it now.
    pub synchronous_standby_names: String,
    /// `pg_postmaster_start_time()`, Unix seconds.
    pub postmaster_start_time: Option<f64>,
    /// Replica only: `pg_last_xact_replay_timestamp()`, Unix seconds.
    pub replay_timestamp: Option<f64>,
    /// Replica only: `pg_is_wal_replay_paused()`.
    pub replay_paused: bool,
}

impl Health {
    /// The furthest WAL position this node holds: flushed on a primary,
    /// received (or replayed, whichever is further) on a replica.
    pub fn wal_position(&self) -> Lsn {
        if self.in_recovery {
            self.receive_lsn.max(self.replay_lsn).unwrap_or_default()
        } else {
            self.flush_lsn.or(self.current_lsn).unwrap_or_default()
        }
    }

    pub fn is_streaming(&self) -> bool {
        self.wal_receiver
            .as_ref()
            .is_some_and(|w| w.status == "streaming")
    }
}

/// A replica's `pg_stat_wal_receiver` row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WalReceiver {
    /// "streaming", "starting", "waiting", "catchup", "stopping", ...
    pub status: String,
    pub received_tli: u32,
    pub flushed_lsn: Option<Lsn>,
    pub sender_host: Option<String>,
    pub sender_port: Option<u16>,
    pub slot_name: Option<String>,
}

/// A primary's `pg_stat_replication` row.
#[derive(Clone, Debug, PartialEq)]
pub struct ReplicationPeer {
    /// The replica's node name (mainstay sets `application_name` to it).
    pub application_name: String,
    pub client_addr: Option<String>,
    pub state: Option<String>,
    pub sent_lsn: Option<Lsn>,
    pub write_lsn: Option<Lsn>,
    pub flush_lsn: Option<Lsn>,
    pub replay_lsn: Option<Lsn>,
    /// "async", "sync", "potential", "quorum".
    pub sync_state: Option<String>,
    /// Seconds between a commit on the primary and its replay there, as
    /// PostgreSQL measures it (`replay_lag`; none when idle).
    pub replay_lag_secs: Option<f64>,
    /// The role the replica connected as.
    pub usename: Option<String>,
    /// Its place in `synchronous_standby_names` (0: asynchronous).
    pub sync_priority: Option<i32>,
}

fn lsn(text: Option<String>) -> Option<Lsn> {
    text.as_deref().and_then(Lsn::parse)
}

/// The timeline of the WAL a primary is writing now.
const CURRENT_TLI: &str =
    "('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int";

pub async fn probe(client: &Client) -> Result<Health> {
    // One statement for the basics; CASE keeps primary-only functions from
    // running during recovery, where they raise errors.
    let query = format!(
        "SELECT pg_is_in_recovery(),
            CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_lsn()::text END,
            CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_flush_lsn()::text END,
            CASE WHEN pg_is_in_recovery() THEN NULL ELSE {CURRENT_TLI} END,
            pg_last_wal_receive_lsn()::text,
            pg_last_wal_replay_lsn()::text,
            (SELECT timeline_id FROM pg_control_checkpoint()),
            (SELECT min_recovery_end_timeline FROM pg_control_recovery()),
            (SELECT system_identifier FROM pg_control_system()),
            current_setting('server_version'),
            current_setting('server_version_num')::int,
            extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8,
            current_setting('synchronous_standby_names'),
            extract(epoch FROM pg_postmaster_start_time())::float8,
            extract(epoch FROM pg_last_xact_replay_timestamp())::float8,
            CASE WHEN pg_is_in_recovery() THEN pg_is_wal_replay_paused() ELSE false END"
    );
    let row = bounded("health query", QUERY_TIMEOUT, client.query_one(&query, &[])).await?;
    let in_recovery: bool = row.get(0);
    let primary_tli: Option<i32> = row.get(3);
    let checkpoint_tli: Option<i32> = row.get(6);
    let min_recovery_tli: Option<i32> = row.get(7);
    let system_identifier: i64 = row.get(8);
    let server_version_num: i32 = row.get(10);
    let mut health = Health {
        in_recovery,
        timeline: 0,
        // bigint in SQL, unsigned in pg_control: keep the bits.
        system_identifier: system_identifier as u64,
        server_version: row.get(9),
        server_version_num: server_version_num as u32,
        current_lsn: lsn(row.get(1)),
        flush_lsn: lsn(row.get(2)),
        receive_lsn: lsn(row.get(4)),
        replay_lsn: lsn(row.get(5)),
        replay_delay_secs: row.get(11),
        wal_receiver: None,
        replicas: Vec::new(),
        synchronous_standby_names: row.get(12),
        postmaster_start_time: row.get(13),
        replay_timestamp: row.get(14),
        replay_paused: row.get(15),
    };
    if in_recovery {
        health.wal_receiver = wal_receiver(client).await?;
        let received = health
            .wal_receiver
            .as_ref()
            .map(|w| w.received_tli)
            .unwrap_or(0);
        health.timeline = if received > 0 {
            received
        } else {
            checkpoint_tli
                .unwrap_or(0)
                .max(min_recovery_tli.unwrap_or(0)) as u32
        };
        health.replay_delay_secs = health.replay_delay_secs.map(|s| s.max(0.0));
    } else {
        health.timeline = primary_tli.unwrap_or(0) as u32;
        health.replay_delay_secs = None;
        health.replay_timestamp = None;
        health.replicas = replicas(client).await?;
    }
    Ok(health)
}

async fn wal_receiver(client: &Client) -> Result<Option<WalReceiver>> {
    let rows = bounded(
        "pg_stat_wal_receiver",
        QUERY_TIMEOUT,
        client.query(
            "SELECT status, received_tli, flushed_lsn::text, sender_host, sender_port, slot_name
             FROM pg_stat_wal_receiver",
            &[],
        ),
    )
    .await?;
    Ok(rows.first().map(|row| WalReceiver {
        status: row.get::<_, Option<String>>(0).unwrap_or_default(),
        received_tli: row.get::<_, Option<i32>>(1).unwrap_or(0) as u32,
        flushed_lsn: lsn(row.get(2)),
        sender_host: row.get(3),
        sender_port: row.get::<_, Option<i32>>(4).map(|p| p as u16),
        slot_name: row.get(5),
    }))
}

async fn replicas(client: &Client) -> Result<Vec<ReplicationPeer>> {
    let rows = bounded(
        "pg_stat_replication",
        QUERY_TIMEOUT,
        client.query(
            "SELECT application_name, client_addr::text, state, sent_lsn::text, write_lsn::text,
                    flush_lsn::text, replay_lsn::text, sync_state,
                    extract(epoch FROM replay_lag)::float8, usename::text, sync_priority
             FROM pg_stat_replication ORDER BY application_name",
            &[],
        ),
    )
    .await?;
    Ok(rows
        .iter()
        .map(|row| ReplicationPeer {
            application_name: row.get::<_, Option<String>>(0).unwrap_or_default(),
            client_addr: row.get(1),
            state: row.get(2),
            sent_lsn: lsn(row.get(3)),
            write_lsn: lsn(row.get(4)),
            flush_lsn: lsn(row.get(5)),
            replay_lsn: lsn(row.get(6)),
            sync_state: row.get(7),
            replay_lag_secs: row.get(8),
            usename: row.get(9),
            sync_priority: row.get(10),
        })
        .collect())
}

/// `pg_promote` and wait up to 30 s for it to take effect.
pub async fn promote(client: &Client) -> Result<()> {
    // pg_promote's own wait checks only every 100 ms: ask without waiting
    // and watch for the end of recovery every 5 ms, so that routes and the
    // VIP follow the new primary the moment it accepts writes.
    let row = bounded(
        "pg_promote",
        Duration::from_secs(10),
        client.query_one("SELECT pg_promote(false)", &[]),
    )
    .await?;
    if !row.get::<_, bool>(0) {
        return Err(Error::Refused(
            "pg_promote refused to signal the promotion (is this server a standby?)".into(),
        ));
    }
    let limit = Duration::from_secs(30);
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let row = bounded(
            "pg_is_in_recovery",
            Duration::from_secs(5),
            client.query_one("SELECT pg_is_in_recovery()", &[]),
        )
        .await?;
        if !row.get::<_, bool>(0) {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Error::Timeout {
                what: "promotion (still in recovery)".into(),
                after: limit,
            });
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Makes sure the source's pg_control shows its current timeline. Right after
/// a promotion it still shows the old one until a checkpoint, and pg_rewind,
/// which compares control files, would then wrongly say no rewind is needed.
pub async fn checkpoint_if_timeline_stale(client: &Client) -> Result<bool> {
    let query = format!(
        "SELECT pg_is_in_recovery(), (SELECT timeline_id FROM pg_control_checkpoint()),
                CASE WHEN pg_is_in_recovery() THEN NULL ELSE {CURRENT_TLI} END"
    );
    let row = bounded(
        "timeline check",
        QUERY_TIMEOUT,
        client.query_one(&query, &[]),
    )
    .await?;
    let in_recovery: bool = row.get(0);
    let checkpoint_tli: i32 = row.get(1);
    let current_tli: Option<i32> = row.get(2);
    if in_recovery || current_tli.is_none_or(|t| t <= checkpoint_tli) {
        return Ok(false);
    }
    bounded(
        "CHECKPOINT",
        Duration::from_secs(300),
        client.batch_execute("CHECKPOINT"),
    )
    .await?;
    Ok(true)
}

/// Makes a primary flush all the WAL it has inserted. pg_rewind sets the
/// rewound node's minimum recovery point to the source's *insert* position,
/// and its own catalog reads there log hint-bit page images (wal_log_hints)
/// that nothing flushes on an idle primary until the background writer's
/// next standby snapshot, up to 15 s later. Until then the rewound replica
/// cannot become consistent. A committed xid with local synchronous commit
/// flushes everything before it.
pub async fn flush_wal(client: &mut Client) -> Result<()> {
    let work = async {
        let tx = client.transaction().await?;
        tx.batch_execute("SET LOCAL synchronous_commit = local; SELECT txid_current()")
            .await?;
        tx.commit().await
    };
    bounded("flush WAL", QUERY_TIMEOUT, work).await
}

/// Reads a timeline history file from a server's pg_wal.
pub async fn read_history(client: &Client, timeline: u32) -> Result<String> {
    let path = format!("pg_wal/{timeline:08X}.history");
    let row = bounded(
        &format!("read {path}"),
        QUERY_TIMEOUT,
        client.query_one("SELECT pg_read_file($1)", &[&path]),
    )
    .await?;
    Ok(row.get(0))
}

/// Creates the role or updates its password and attributes.
pub async fn ensure_role(client: &mut Client, who: &Credentials, attributes: &str) -> Result<()> {
    if who.password.is_empty() {
        return Err(Error::Config(format!(
            "role {} needs a password (SCRAM authentication)",
            who.user
        )));
    }
    let verifier = postgres_protocol::password::scram_sha_256(who.password.as_bytes());
    let context = format!("create or alter role {}", who.user);
    let work = async {
        let tx = client.transaction().await?;
        // Keep even the verifier out of statement logging.
        tx.batch_execute(
            "SET LOCAL log_statement = 'none'; SET LOCAL log_min_error_statement = 'panic'",
        )
        .await?;
        let exists = tx
            .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&who.user])
            .await?
            .is_some();
        let verb = if exists { "ALTER" } else { "CREATE" };
        let statement = format!(
            "{verb} ROLE {} WITH {attributes} PASSWORD {}",
            quote_ident(&who.user),
            quote_literal(&verifier)
        );
        tx.batch_execute(&statement).await?;
        tx.commit().await
    };
    bounded(&context, QUERY_TIMEOUT, work).await
}

/// The functions pg_rewind calls, per the pg_rewind documentation for a
/// non-superuser source role.
pub async fn grant_rewind(client: &Client, user: &str) -> Result<()> {
    let who = quote_ident(user);
    let sql = format!(
        "GRANT EXECUTE ON FUNCTION pg_catalog.pg_ls_dir(text, boolean, boolean) TO {who};
         GRANT EXECUTE ON FUNCTION pg_catalog.pg_stat_file(text, boolean) TO {who};
         GRANT EXECUTE ON FUNCTION pg_catalog.pg_read_binary_file(text) TO {who};
         GRANT EXECUTE ON FUNCTION pg_catalog.pg_read_binary_file(text, bigint, bigint, boolean) TO {who};"
    );
    bounded(
        &format!("grant pg_rewind functions to {user}"),
        QUERY_TIMEOUT,
        client.batch_execute(&sql),
    )
    .await
}

/// What `sync_slots` changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SlotChanges {
    pub created: Vec<String>,
    pub dropped: Vec<String>,
}

/// Creates the `wanted` physical slots that are missing and drops inactive
/// ones named with `prefix` that are not wanted. Slots of others are left.
pub async fn sync_slots(client: &Client, wanted: &[String], prefix: &str) -> Result<SlotChanges> {
    let rows = bounded(
        "list replication slots",
        QUERY_TIMEOUT,
        client.query(
            "SELECT slot_name::text, active FROM pg_replication_slots WHERE slot_type = 'physical'",
            &[],
        ),
    )
    .await?;
    let existing: Vec<(String, bool)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let mut changes = SlotChanges::default();
    for slot in wanted {
        if existing.iter().any(|(name, _)| name == slot) {
            continue;
        }
        // Reserve WAL now, so the replica finds it from its first connection.
        let sql = "SELECT pg_create_physical_replication_slot($1, true)";
        match bounded(
            &format!("create slot {slot}"),
            QUERY_TIMEOUT,
            client.query_one(sql, &[slot]),
        )
        .await
        {
            Ok(_) => changes.created.push(slot.clone()),
            Err(Error::Sql { source, .. })
                if source.code() == Some(&SqlState::DUPLICATE_OBJECT) => {}
            Err(e) => return Err(e),
        }
    }
    for (slot, active) in &existing {
        if *active || !slot.starts_with(prefix) || wanted.contains(slot) {
            continue;
        }
        let sql = "SELECT pg_drop_replication_slot($1)";
        match bounded(
            &format!("drop slot {slot}"),
            QUERY_TIMEOUT,
            client.query_one(sql, &[slot]),
        )
        .await
        {
            Ok(_) => changes.dropped.push(slot.clone()),
            // Became active or vanished meanwhile: the next round decides again.
            Err(Error::Sql { source, .. })
                if source.code() == Some(&SqlState::OBJECT_IN_USE)
                    || source.code() == Some(&SqlState::UNDEFINED_OBJECT) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(changes)
}
