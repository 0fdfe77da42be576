//! What can go wrong while capturing, with the fault and the fix in each message.

use crate::decode::DecodeError;
use crate::lsn::Lsn;

/// A capture failure. Each message names what is at fault and, where there is one, the fix.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The password could not be read.
    #[error("cannot read the PostgreSQL password: {0}")]
    Password(String),
    /// The connection settings are unusable.
    #[error("invalid PostgreSQL connection settings: {0}")]
    Settings(String),
    /// The server could not be reached.
    #[error(
        "cannot connect to PostgreSQL at {target}: {reason}. Check that the server is running, \
         listens on that address (listen_addresses, port) and that no firewall is in the way"
    )]
    Unreachable {
        /// `host:port`.
        target: String,
        /// What the network said.
        reason: String,
    },
    /// The server refused the credentials.
    #[error(
        "PostgreSQL refused the login of user `{user}` at {target}: {reason}. Check the password \
         (source.password_env, source.password_file or PGPASSWORD) and pg_hba.conf"
    )]
    Authentication {
        /// The role.
        user: String,
        /// `host:port`.
        target: String,
        /// The server's message.
        reason: String,
    },
    /// Logical decoding is off on the server.
    #[error(
        "PostgreSQL has wal_level = {actual}, but capture needs wal_level = logical. Set \
         `wal_level = logical` in postgresql.conf (or ALTER SYSTEM SET wal_level = logical) \
         and restart the server"
    )]
    WalLevel {
        /// The current setting.
        actual: String,
    },
    /// The role lacks a privilege.
    #[error("role `{role}` cannot {action}: {fix}")]
    Privilege {
        /// The role.
        role: String,
        /// What it tried.
        action: String,
        /// How to grant it.
        fix: String,
    },
    /// A configured table does not exist.
    #[error(
        "table `{table}` (in source.tables) does not exist in database `{database}`. Check the \
         name and schema (write it as schema.table)"
    )]
    TableMissing {
        /// The name as configured.
        table: String,
        /// The database.
        database: String,
    },
    /// The slot is held by another session.
    #[error(
        "replication slot `{slot}` is in use by another connection (PID {pid}). Is another weir \
         running with this slot? Stop it, or give this one its own source.slot"
    )]
    SlotInUse {
        /// The slot.
        slot: String,
        /// The walsender holding it.
        pid: i32,
    },
    /// The slot exists but does not fit.
    #[error("replication slot `{slot}` cannot be used: {reason}")]
    SlotUnusable {
        /// The slot.
        slot: String,
        /// Why.
        reason: String,
    },
    /// The consumer has data up to a position but the slot is gone: changes were lost.
    #[error(
        "replication slot `{slot}` is missing, but the output already holds changes up to \
         {position}: changes made after that cannot be recovered from PostgreSQL. Start over \
         with a fresh output (delete it, and its checkpoint) to backfill again"
    )]
    SlotLost {
        /// The slot.
        slot: String,
        /// Where the consumer stands.
        position: Lsn,
    },
    /// A SQL statement failed.
    #[error("{context}: {}", db_message(.source))]
    Query {
        /// What we were doing.
        context: String,
        /// The driver's error.
        source: tokio_postgres::Error,
    },
    /// The replication connection failed.
    #[error("replication stream of slot `{slot}`: {source}")]
    Replication {
        /// The slot.
        slot: String,
        /// The transport's error.
        source: pgwire_replication::PgWireError,
    },
    /// A message could not be decoded.
    #[error("at WAL position {lsn}: {source}")]
    Decode {
        /// Where in the stream.
        lsn: Lsn,
        /// What was wrong.
        source: DecodeError,
    },
    /// The stream broke the protocol's rules.
    #[error("at WAL position {lsn}: {message}")]
    Protocol {
        /// Where in the stream.
        lsn: Lsn,
        /// What happened.
        message: String,
    },
    /// The consumer went away.
    #[error("the consumer of the change stream stopped")]
    ConsumerGone,
}

impl SourceError {
    /// Whether trying again later may succeed (network trouble, a restarting server).
    pub fn is_retryable(&self) -> bool {
        match self {
            SourceError::Unreachable { .. } | SourceError::SlotInUse { .. } => true,
            SourceError::Replication { source, .. } => source.is_transient() || source.is_io(),
            SourceError::Query { source, .. } => {
                source.is_closed() || source.as_db_error().is_none()
            }
            _ => false,
        }
    }
}

/// The server's message (with detail and hint) when there is one, else the driver's.
pub(crate) fn db_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut s = db.message().to_string();
            if let Some(detail) = db.detail() {
                s.push_str(&format!(" ({detail})"));
            }
            if let Some(hint) = db.hint() {
                s.push_str(&format!(". Hint: {hint}"));
            }
            s
        }
        None => {
            let mut s = e.to_string();
            let mut src = std::error::Error::source(e);
            while let Some(inner) = src {
                s.push_str(&format!(": {inner}"));
                src = inner.source();
            }
            s
        }
    }
}
