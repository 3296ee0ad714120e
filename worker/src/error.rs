//! The one error type of `sluice-worker`.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The job file (or its overrides) failed to parse or validate (names the field).
    #[error(transparent)]
    Core(#[from] sluice_core::Error),

    /// A request or an answer that can never succeed as sent.
    #[error("invalid: {0}")]
    Invalid(String),

    /// Talking to the orchestrator failed.
    #[error("orchestrator {endpoint}: {reason}")]
    Transport { endpoint: String, reason: String },

    /// The orchestrator answered with an error status.
    #[error("orchestrator: {0}")]
    Status(#[from] tonic::Status),

    #[error("io error on {what}: {source}")]
    Io { what: String, source: std::io::Error },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
