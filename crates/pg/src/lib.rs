//! The only code in mainstay that touches PostgreSQL: creating and cloning
//! data directories (initdb, pg_basebackup), running the postmaster under its
//! fencing guard, fencing, promotion, re-pointing replicas,
//! pg_rewind, replication slots and roles, and the SQL health probe.
//!
//! **Invariant:** nothing here deletes a data directory; unusable ones are
//! moved aside (`Postgres::move_aside`).
//! **Invariant:** passwords never appear in command lines, logs or errors:
//! tools get them from a password file, the server gets SCRAM verifiers.

#![forbid(unsafe_code)]

mod account;
mod conf;
mod controldata;
mod error;
mod live;
mod param_check;
mod pidfile;
mod postgres;
mod settings;
mod sql;
mod tool;

pub use controldata::{ClusterState, ControlData, DataDirState, parse_controldata};
pub use error::{Error, Result};
pub use live::{Live, LiveProbe};
pub use mainstay_guard::BootTime;
pub use mainstay_guarded::Handover as GuardHandover;
pub use mainstay_guarded::{GuardCheckError, check_guard};
pub use param_check::{ParamProblem, check_data_dir, check_parameters, library_names};
pub use postgres::{Fencer, Postgres, PostmasterHandover, RewindOutcome};
pub use settings::{ConnTarget, Credentials, PgSettings, StartRole, StopMode};
pub use sql::{Health, ReplicationPeer, SlotChanges, WalReceiver};
