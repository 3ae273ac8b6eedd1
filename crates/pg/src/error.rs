//! Errors of the PostgreSQL layer. Messages name the file, tool or query that
//! failed and carry the tail of its output, never a password.

use std::io;
use std::path::Path;
use std::time::Duration;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },

    /// An external program (initdb, pg_basebackup, ...) failed.
    #[error("{tool} failed ({status}); last output:\n{tail}")]
    Tool {
        tool: String,
        status: String,
        tail: String,
    },

    #[error("{what} did not finish within {after:?}")]
    Timeout { what: String, after: Duration },

    #[error("{context}: {source}")]
    Sql {
        context: String,
        source: tokio_postgres::Error,
    },

    /// The operation would be unsafe in the current state; nothing was done.
    #[error("refused: {0}")]
    Refused(String),

    /// PostgreSQL started but exited before accepting connections.
    #[error("postgres exited during startup ({status}); end of {log}:\n{tail}")]
    StartFailed {
        status: String,
        log: String,
        tail: String,
    },

    #[error("unexpected output from {what}: {detail}")]
    Parse { what: String, detail: String },

    #[error("invalid setting: {0}")]
    Config(String),
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn io_path(action: &str, path: &Path, source: io::Error) -> Error {
        Error::Io {
            context: format!("{action} {}", path.display()),
            source,
        }
    }

    pub(crate) fn sql(context: impl Into<String>, source: tokio_postgres::Error) -> Error {
        Error::Sql {
            context: context.into(),
            source,
        }
    }
}
