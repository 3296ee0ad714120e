//! The one error type of `sluice-orchestrator`.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A job spec failed to parse or validate (names the field).
    #[error(transparent)]
    Core(#[from] sluice_core::Error),

    /// A request named a job, worker or work item that does not exist.
    #[error("not found: {0}")]
    NotFound(String),

    /// A request that can never succeed as sent.
    #[error("invalid request: {0}")]
    Invalid(String),

    /// The request is valid but the job's state forbids it (e.g. cancelling a finished job).
    #[error("{0}")]
    Precondition(String),

    /// The state store (Redis) failed or is unreachable.
    #[error("store: {0}")]
    Store(String),

    #[error("io error on {what}: {source}")]
    Io { what: String, source: std::io::Error },
}

impl From<redis::RedisError> for Error {
    fn from(e: redis::RedisError) -> Self {
        Error::Store(e.to_string())
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        match e {
            Error::Core(e) => tonic::Status::invalid_argument(e.to_string()),
            Error::NotFound(m) => tonic::Status::not_found(m),
            Error::Invalid(m) => tonic::Status::invalid_argument(m),
            Error::Precondition(m) => tonic::Status::failed_precondition(m),
            other => tonic::Status::unavailable(other.to_string()),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
