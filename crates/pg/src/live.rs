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

/// PostgreSQL as a probe just found it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Live {
    /// It refused the connection or the query: nothing listens, it is
    /// shutting down or starting up.
    Down,
    /// No answer within [`LiveProbe::ANSWER_WITHIN`], or "too many
    /// connections": a busy server is no dead one, so the HA loop's last
    /// probe stands (a load balancer must not drop a loaded primary).
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
        let asking = async {
            let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
            tokio::spawn(connection);
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
        match tokio::time::timeout(Self::ANSWER_WITHIN, asking).await {
            Ok(Ok(live)) => live,
            Ok(Err(err)) if err.code() == Some(&SqlState::TOO_MANY_CONNECTIONS) => Live::Unanswered,
            Ok(Err(_)) => Live::Down,
            Err(_) => Live::Unanswered,
        }
    }
}
