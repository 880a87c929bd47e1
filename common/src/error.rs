//! The error type of the shared plumbing and of the participants, its one
//! mapping to `tonic::Status`, and the classes of database errors worth
//! retrying (which the orchestrator maps the same way).

use tonic::{Code, Status};

/// Everything a participant call, a parse at the edge or a service's
/// start-up can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed; nothing was written.
    #[error("{0}")]
    InvalidArgument(String),
    /// The request names something that does not exist.
    #[error("{0}")]
    NotFound(String),
    /// A business rule refuses the request (out of stock, insufficient funds,
    /// already compensated); nothing was written.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The database failed or could not be reached.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// The embedded migrations could not be applied.
    #[error("migrating the database failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The gRPC server failed.
    #[error("gRPC server error: {0}")]
    Transport(#[from] tonic::transport::Error),
}

impl Error {
    /// Shorthand for [`Error::InvalidArgument`].
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::InvalidArgument(message.into())
    }
}

/// Why a database error is worth retrying as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transient {
    /// The server could not be reached, or no pooled connection came free
    /// in time (`PoolTimedOut`, I/O errors).
    Unavailable,
    /// The connection was cut by the server: shut down, restarted,
    /// terminated by an administrator, crash recovery, or a connection-level
    /// failure (SQLSTATE 57P01-57P03 and the 08 class).
    ConnectionLost,
    /// The server refused a new connection: `max_connections` reached
    /// (SQLSTATE 53300). Connections come free again; not a fatal error.
    TooManyClients,
    /// A serialization failure, a deadlock or a lock not available
    /// (40001, 40P01, 55P03; SQLite BUSY and LOCKED): run the request again.
    Conflict,
}

impl Transient {
    /// What the client is told.
    pub fn message(self) -> &'static str {
        match self {
            Self::Unavailable => "database unavailable, try again",
            Self::ConnectionLost => "database connection lost (restarted?), try again",
            Self::TooManyClients => "database has too many clients, try again",
            Self::Conflict => "transient database conflict, try again",
        }
    }
}

/// The transient kind of a PostgreSQL SQLSTATE, if it is one.
fn transient_sqlstate(code: &str) -> Option<Transient> {
    match code {
        "40001" | "40P01" | "55P03" => Some(Transient::Conflict),
        "57P01" | "57P02" | "57P03" => Some(Transient::ConnectionLost),
        "53300" => Some(Transient::TooManyClients),
        _ if code.starts_with("08") => Some(Transient::ConnectionLost),
        _ => None,
    }
}

/// SQLite result codes that mean "try again": SQLITE_BUSY (another process
/// holds the write lock past the busy timeout) and SQLITE_LOCKED, with their
/// extended codes (the low byte is the primary code).
fn is_transient_sqlite(db: &dyn sqlx::error::DatabaseError) -> bool {
    db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some()
        && db
            .code()
            .and_then(|code| code.parse::<i32>().ok())
            .is_some_and(|code| matches!(code & 0xff, 5 | 6))
}

/// Whether a database error is worth retrying as it is, and why: the
/// server could not be reached or is restarting (connection classes,
/// shutdown, crash recovery), it has too many clients, a pool with no free
/// connection, or a transient conflict.
pub fn transient(error: &sqlx::Error) -> Option<Transient> {
    match error {
        sqlx::Error::PoolTimedOut | sqlx::Error::WorkerCrashed => Some(Transient::Unavailable),
        sqlx::Error::Io(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            Some(Transient::Unavailable)
        }
        sqlx::Error::Io(_) => Some(Transient::ConnectionLost),
        sqlx::Error::Database(db) => db
            .code()
            .and_then(|code| transient_sqlstate(&code))
            .or_else(|| is_transient_sqlite(db.as_ref()).then_some(Transient::Conflict)),
        _ => None,
    }
}

/// Whether a database error is worth retrying as it is (see [`transient`]).
pub fn is_transient(error: &sqlx::Error) -> bool {
    transient(error).is_some()
}

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        match error {
            Error::InvalidArgument(message) => Status::invalid_argument(message),
            Error::NotFound(message) => Status::not_found(message),
            Error::FailedPrecondition(message) => Status::failed_precondition(message),
            Error::Database(ref e) => match transient(e) {
                // A conflict: the same request, run again, may well succeed.
                Some(Transient::Conflict) => {
                    tracing::warn!(%error, "transient database conflict");
                    Status::new(Code::Aborted, Transient::Conflict.message())
                }
                // The database is away or full: the caller retries later.
                Some(kind) => {
                    tracing::warn!(%error, "database unavailable");
                    Status::unavailable(kind.message())
                }
                None => {
                    tracing::error!(%error, "internal error");
                    Status::internal("internal error")
                }
            },
            other => {
                // The cause goes to the log, never to the client.
                tracing::error!(error = %other, "internal error");
                Status::internal("internal error")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_classes_are_unavailable_and_conflicts_aborted() {
        for (code, expected) in [
            ("57P01", Some(Transient::ConnectionLost)),
            ("57P02", Some(Transient::ConnectionLost)),
            ("57P03", Some(Transient::ConnectionLost)),
            ("08006", Some(Transient::ConnectionLost)),
            ("53300", Some(Transient::TooManyClients)),
            ("40001", Some(Transient::Conflict)),
            ("40P01", Some(Transient::Conflict)),
            ("55P03", Some(Transient::Conflict)),
            ("23505", None),
            ("42P01", None),
        ] {
            assert_eq!(transient_sqlstate(code), expected, "{code}");
        }
        let io = |kind| sqlx::Error::Io(std::io::Error::new(kind, "x"));
        assert_eq!(
            transient(&io(std::io::ErrorKind::ConnectionRefused)),
            Some(Transient::Unavailable)
        );
        assert_eq!(
            transient(&io(std::io::ErrorKind::BrokenPipe)),
            Some(Transient::ConnectionLost)
        );
        let status = Status::from(Error::Database(io(std::io::ErrorKind::UnexpectedEof)));
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(
            status.message(),
            "database connection lost (restarted?), try again"
        );
        let status = Status::from(Error::Database(sqlx::Error::RowNotFound));
        assert_eq!(status.code(), Code::Internal);
    }
}
