//! The orchestrator's one error type, and its one mapping to `tonic::Status`.

use tonic::Status;

use crate::saga;

/// Everything the orchestrator can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Malformed input; nothing was recorded.
    #[error("{0}")]
    InvalidArgument(String),
    /// No saga with that id.
    #[error("{0}")]
    NotFound(String),
    /// The request makes no sense in the saga's current status.
    #[error("{0}")]
    FailedPrecondition(String),
    /// Too many sagas in flight; nothing was recorded.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The server is shutting down.
    #[error("{0}")]
    Unavailable(String),
    /// Missing or wrong admin token.
    #[error("{0}")]
    Unauthenticated(String),
    /// The state machine refused an event.
    #[error(transparent)]
    Saga(#[from] saga::Error),
    /// The database failed or could not be reached.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// The embedded migrations could not be applied.
    #[error("migrating the database failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A stored saga state could not be read back.
    #[error("corrupt saga state: {0}")]
    Corrupt(String),
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

impl From<common::Error> for Error {
    fn from(error: common::Error) -> Self {
        match error {
            common::Error::InvalidArgument(message) => Self::InvalidArgument(message),
            common::Error::NotFound(message) => Self::NotFound(message),
            common::Error::FailedPrecondition(message) => Self::FailedPrecondition(message),
            common::Error::Database(e) => Self::Database(e),
            common::Error::Migrate(e) => Self::Migrate(e),
            common::Error::Transport(e) => Self::Transport(e),
        }
    }
}

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        match error {
            Error::InvalidArgument(message) => Status::invalid_argument(message),
            Error::NotFound(message) => Status::not_found(message),
            Error::FailedPrecondition(message) => Status::failed_precondition(message),
            Error::ResourceExhausted(message) => Status::resource_exhausted(message),
            Error::Unavailable(message) => Status::unavailable(message),
            Error::Unauthenticated(message) => Status::unauthenticated(message),
            Error::Saga(e) => Status::failed_precondition(e.to_string()),
            // Unreachable, restarting or in crash recovery: the client may
            // retry (PlaceOrder with its idempotency key) once it is back.
            Error::Database(ref e) if common::error::is_transient(e) => {
                let message = common::error::transient(e)
                    .map_or("database unavailable, try again", |kind| kind.message());
                tracing::warn!(%error, "database unavailable");
                Status::unavailable(message)
            }
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
    fn an_unreachable_database_is_unavailable_and_a_bug_is_internal() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        for transient in [sqlx::Error::PoolTimedOut, sqlx::Error::Io(io)] {
            let status = Status::from(Error::Database(transient));
            assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        }
        let status = Status::from(Error::Database(sqlx::Error::RowNotFound));
        assert_eq!(status.code(), tonic::Code::Internal);
        assert_eq!(status.message(), "internal error", "no cause leaks out");
    }
}
