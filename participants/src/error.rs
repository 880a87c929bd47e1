//! The participants' one error type, and its one mapping to `tonic::Status`.

use tonic::{Code, Status};

/// Everything a participant call or start-up can fail with.
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

/// PostgreSQL SQLSTATEs that mean "try again": serialization failure,
/// deadlock detected, and the connection-level classes.
fn is_transient_sqlstate(code: &str) -> bool {
    matches!(
        code,
        "40001" | "40P01" | "55P03" | "57P01" | "57P02" | "57P03"
    ) || code.starts_with("08")
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

/// Whether a database error is worth retrying as it is: the server could
/// not be reached or is restarting (connection classes, shutdown, crash
/// recovery), a pool with no free connection, or a transient conflict.
pub fn is_transient(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => {
            db.code().is_some_and(|code| is_transient_sqlstate(&code))
                || is_transient_sqlite(db.as_ref())
        }
        _ => false,
    }
}

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        match error {
            Error::InvalidArgument(message) => Status::invalid_argument(message),
            Error::NotFound(message) => Status::not_found(message),
            Error::FailedPrecondition(message) => Status::failed_precondition(message),
            Error::Database(sqlx::Error::PoolTimedOut | sqlx::Error::Io(_)) => {
                tracing::warn!(%error, "database unavailable");
                Status::unavailable("database unavailable, try again")
            }
            Error::Database(sqlx::Error::Database(ref db))
                if db.code().is_some_and(|code| is_transient_sqlstate(&code))
                    || is_transient_sqlite(db.as_ref()) =>
            {
                tracing::warn!(%error, "transient database conflict");
                Status::new(Code::Aborted, "transient database conflict, try again")
            }
            other => {
                // The cause goes to the log, never to the client.
                tracing::error!(error = %other, "internal error");
                Status::internal("internal error")
            }
        }
    }
}
