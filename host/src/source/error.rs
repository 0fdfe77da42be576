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
         name and schema (write it as schema.table; unquoted names fold to lower case, write \
         \"Name\" for a mixed-case one). If it was renamed, write its new name"
    )]
    TableMissing {
        /// The name as configured.
        table: String,
        /// The database.
        database: String,
    },
    /// A configured table is in none of weir's publications although the output holds it:
    /// its changes since it left are not in the stream.
    #[error(
        "table `{table}` is in source.tables and the lake holds it, but it is in no publication \
         weir reads (`{publication}`): it was removed from the publication, or dropped and \
         re-created, while weir was stopped, and its changes since then are not in the stream. \
         weir stops rather than go on without them. To capture it again from a fresh copy, \
         delete its Delta tables (the replica and its change log) from the lake and start weir: \
         it backfills again"
    )]
    NotPublished {
        /// `schema.table`.
        table: String,
        /// The configured publication.
        publication: String,
    },
    /// A captured table changed identity while streaming.
    #[error("table `{table}` {what} while weir was capturing it: {fix}")]
    TableGone {
        /// `schema.table`, as last seen.
        table: String,
        /// What happened to it.
        what: String,
        /// What the user must do.
        fix: String,
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
    /// The slot was advanced past what the consumer holds by someone else (another
    /// program reading the slot, `pg_replication_slot_advance`): the changes between were
    /// consumed there, and PostgreSQL cannot send them again.
    #[error(
        "replication slot `{slot}` has been advanced to {confirmed} by another consumer, but \
         the output holds changes only up to {held}: the changes committed in between were \
         read elsewhere and PostgreSQL cannot send them again. Fix: start over with `weir run \
         --start-over` (drops the slot, backfills every table again; change logs keep their \
         history with a gap), and give every other consumer a slot of its own"
    )]
    SlotAhead {
        /// The slot.
        slot: String,
        /// Where the slot stands.
        confirmed: Lsn,
        /// The highest position the consumer holds.
        held: Lsn,
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
    /// The replication connection went silent, and the server no longer hears it either
    /// (a network cut, a proxy or firewall that dropped the connection without a word).
    #[error(
        "the replication connection of slot `{slot}` was silent for {silent_s} s and {why}: \
         treating it as lost (source.receive_timeout_s sets how long a silence is allowed \
         before this check)"
    )]
    ConnectionLost {
        /// The slot.
        slot: String,
        /// How long nothing came.
        silent_s: u64,
        /// What the check found.
        why: String,
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
            SourceError::Unreachable { .. }
            | SourceError::SlotInUse { .. }
            | SourceError::ConnectionLost { .. } => true,
            SourceError::Replication { source, .. } => {
                source.is_transient()
                    || source.is_io()
                    || replication_sqlstate(source).is_some_and(transient_sqlstate)
            }
            SourceError::Query { source, .. } => match source.as_db_error() {
                Some(db) => transient_sqlstate(db.code().code()),
                None => true,
            },
            _ => false,
        }
    }
}

/// Server errors that pass: the backend was terminated (`pg_terminate_backend`, 57P01),
/// the server is crashing, recovering or starting (57P02, 57P03), out of connections or
/// other resources (class 53), a connection failure (class 08), and a slot still held by
/// the walsender of a connection that just died (55006).
pub fn transient_sqlstate(code: &str) -> bool {
    matches!(code, "57P01" | "57P02" | "57P03" | "55006")
        || code.starts_with("53")
        || code.starts_with("08")
}

/// The SQLSTATE of a server error on the replication connection, which the transport
/// hands over as text ending in `(SQLSTATE xxxxx)`.
fn replication_sqlstate(e: &pgwire_replication::PgWireError) -> Option<&str> {
    let pgwire_replication::PgWireError::Server(text) = e else {
        return None;
    };
    let code = text.strip_suffix(')')?.rsplit_once("(SQLSTATE ")?.1;
    (code.len() == 5).then_some(code)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_errors_that_pass_are_retried() {
        let server = |t: &str| SourceError::Replication {
            slot: "weir".into(),
            source: pgwire_replication::PgWireError::Server(t.into()),
        };
        for code in ["57P01", "57P02", "57P03", "53300", "55006", "08006"] {
            let e = server(&format!("terminating connection (SQLSTATE {code})"));
            assert!(e.is_retryable(), "{code}");
        }
        assert!(!server("permission denied (SQLSTATE 42501)").is_retryable());
        assert!(!server("no code at all").is_retryable());
    }
}
