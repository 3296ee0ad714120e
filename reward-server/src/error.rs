//! The one error type of `sluice-reward-server`.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Core(#[from] sluice_core::Error),

    /// The label store (Redis) failed.
    #[error("label store: {0}")]
    Store(String),

    /// An annotator batch failed (it is retried later).
    #[error("annotator: {0}")]
    Annotator(String),

    /// The gRPC server could not be set up (TLS files).
    #[error("server: {0}")]
    Server(String),

    #[error("io error on {what}: {source}")]
    Io { what: String, source: std::io::Error },
}

impl From<redis::RedisError> for Error {
    fn from(e: redis::RedisError) -> Self {
        Error::Store(e.to_string())
    }
}

/// How an error reaches a gRPC client: a bad job spec is the caller's
/// (`INVALID_ARGUMENT`), everything else a server-side condition that may pass
/// (`UNAVAILABLE`).
impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        match e {
            Error::Core(e) => tonic::Status::invalid_argument(e.to_string()),
            other => tonic::Status::unavailable(other.to_string()),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
