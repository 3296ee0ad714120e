//! The one error type of `sluice-learner`.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Core(#[from] sluice_core::Error),

    #[error(transparent)]
    Model(#[from] sluice_model::Error),

    #[error(transparent)]
    Torch(#[from] tch::TchError),

    /// A training checkpoint is incomplete or does not fit the job.
    #[error("checkpoint: {0}")]
    Checkpoint(String),

    #[error("io error on {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },

    /// A collective call failed (a rank left, or ranks called in a different order).
    #[error("collective: {0}")]
    Collective(String),

    /// The trainer cannot make progress (e.g. the task produced no usable groups).
    #[error("training: {0}")]
    Training(String),

    /// The gRPC server could not be set up (TLS files, listen address).
    #[error("server: {0}")]
    Server(String),
}

impl Error {
    /// Whether a job-file value is to blame (a usage error, not a failure).
    pub fn is_config(&self) -> bool {
        match self {
            Error::Core(sluice_core::Error::Config { .. }) => true,
            Error::Model(m) => m.as_config().is_some(),
            _ => false,
        }
    }
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
}

impl From<sluice_collective::Error> for Error {
    fn from(e: sluice_collective::Error) -> Self {
        match e {
            sluice_collective::Error::Comm(what) => Error::Collective(what),
            sluice_collective::Error::Torch(t) => Error::Torch(t),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
