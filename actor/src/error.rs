//! The one error type of `sluice-actor`.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Core(#[from] sluice_core::Error),

    #[error(transparent)]
    Model(#[from] sluice_model::Error),

    #[error(transparent)]
    Torch(#[from] tch::TchError),

    /// The learner could not be reached or the connection broke.
    #[error("transport to {endpoint}: {reason}")]
    Transport { endpoint: String, reason: String },

    /// The learner answered with an error status.
    #[error("learner refused: {0}")]
    Status(#[from] tonic::Status),

    /// The reward server's answer did not fit the request.
    #[error("reward server: {0}")]
    Reward(String),

    /// The orchestrator refused this actor (e.g. a wrong bearer token).
    #[error("orchestrator: {0}")]
    Orchestrator(String),

    /// A weight download did not add up (wrong offsets, sizes or versions).
    #[error("weight sync: {0}")]
    Sync(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
