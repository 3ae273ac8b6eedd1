//! What the REST API's health checks ask PostgreSQL when a request comes:
//! does a new connection get in, and is the server in recovery and
//! streaming. The HA loop's snapshot is up to a turn old; a load balancer
//! must hear "down" the moment the server stops, not a second later. Each
//! probe opens a new connection (a kept one would still answer while the
//! postmaster refuses new ones, and would hold up a smart shutdown) and is
//! shared by every request within [`LiveProbe::MAX_AGE`], so a burst of
//! checks costs one connection.

use crate::settings::Credentials;
use std::time::{Duration, Instant};
use tokio_postgres::error::SqlState;
use tracing::debug;

/// PostgreSQL as a probe just found it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Live {
    /// Nothing listens, or it is starting up or shutting down.
    Down,
    /// No answer within [`LiveProbe::ANSWER_WITHIN`], or an error that
    /// says nothing about the server (too many connections, a password,
    /// pg_hba): a busy or misconfigured check is no dead server, so the HA
    /// loop's last probe stands (a load balancer must not drop a primary
    /// for it).
    Unanswered,
    Up {
        in_recovery: bool,
        /// `pg_stat_wal_receiver.status` ("streaming"...), when a WAL
        /// receiver runs.
        receiver: Option<String>,
    },
}

pub struct LiveProbe {
    host: String,
    port: u16,
    who: Credentials,
    last: tokio::sync::Mutex<Option<(Instant, Live)>>,
}

impl LiveProbe {
    /// The oldest probe a health answer may rest on.
    pub const MAX_AGE: Duration = Duration::from_millis(100);
    /// A server that takes longer to let a connection in and answer one
    /// query is down for a load balancer (whose own check timeout is
    /// commonly a second or two).
    pub const ANSWER_WITHIN: Duration = Duration::from_millis(800);

    pub fn new(host: &str, port: u16, who: Credentials) -> LiveProbe {
        LiveProbe {
            host: host.into(),
            port,
            who,
            last: tokio::sync::Mutex::new(None),
        }
    }

    /// PostgreSQL now: from a probe at most [`Self::MAX_AGE`] old, else
    /// from one made now (callers that arrive meanwhile wait for it).
    pub async fn now(&self) -> Live {
        let mut last = self.last.lock().await;
        if let Some((at, live)) = last.as_ref()
            && at.elapsed() <= Self::MAX_AGE
        {
            return live.clone();
        }
        let live = self.ask().await;
        *last = Some((Instant::now(), live.clone()));
        live
    }

    async fn ask(&self) -> Live {
        let mut config = tokio_postgres::Config::new();
        config
            .host(&self.host)
            .port(self.port)
            .user(&self.who.user)
            .password(&self.who.password)
            .dbname("postgres")
            .application_name("mainstay api");
        // The server gives up on the query too, so an abandoned probe
        // leaves no backend behind.
        config.options(format!(
            "-c statement_timeout={}",
            Self::ANSWER_WITHIN.as_millis()
        ));
        let mut connection_task = None;
        let asking = async {
            let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
            connection_task = Some(tokio::spawn(connection));
            let row = client
                .query_one(
                    "SELECT pg_is_in_recovery(), (SELECT status FROM pg_stat_wal_receiver)",
                    &[],
                )
                .await?;
            Ok::<_, tokio_postgres::Error>(Live::Up {
                in_recovery: row.get(0),
                receiver: row.get(1),
            })
        };
        let found = match tokio::time::timeout(Self::ANSWER_WITHIN, asking).await {
            Ok(Ok(live)) => live,
            Ok(Err(err)) if says_down(&err) => Live::Down,
            Ok(Err(err)) => {
                debug!("health probe: {err}; keeping the last turn's answer");
                Live::Unanswered
            }
            Err(_) => Live::Unanswered,
        };
        // A connection left waiting for a server that does not answer would
        // hold a backend and a socket: it goes with the probe.
        if let Some(task) = connection_task {
            task.abort();
        }
        found
    }
}

/// Whether `err` says PostgreSQL is not there for clients: nothing
/// listens, or it is starting up or shutting down. Anything else (a
/// password, pg_hba, this process out of file descriptors) says nothing
/// about the server, and must not take a healthy primary out of every load
/// balancer.
fn says_down(err: &tokio_postgres::Error) -> bool {
    if let Some(code) = err.code() {
        return [
            SqlState::ADMIN_SHUTDOWN,
            SqlState::CRASH_SHUTDOWN,
            SqlState::CANNOT_CONNECT_NOW,
        ]
        .contains(code);
    }
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::ConnectionReset
            );
        }
        source = cause.source();
    }
    // The server closed the connection before answering (it stopped).
    err.is_closed()
}
