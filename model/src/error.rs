//! The one error type of `sluice-model`.

use std::path::PathBuf;

/// Everything that can go wrong with a model, its checkpoints and sampling.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A config, task or tokenizer error from `sluice-core`.
    #[error(transparent)]
    Core(#[from] sluice_core::Error),

    /// The checkpoint directory or a tensor in it does not fit the model.
    #[error("checkpoint {file}: {reason}")]
    Checkpoint { file: PathBuf, reason: String },

    /// A tensor the model needs is missing from the checkpoint.
    #[error("checkpoint {file}: tensor `{name}` is missing (expected shape {expected:?})")]
    MissingTensor { file: PathBuf, name: String, expected: Vec<i64> },

    /// A tensor in the checkpoint has the wrong shape.
    #[error("checkpoint {file}: tensor `{name}` has shape {found:?}, the model expects {expected:?}")]
    ShapeMismatch { file: PathBuf, name: String, expected: Vec<i64>, found: Vec<i64> },

    #[error("generation: {0}")]
    Generation(String),

    #[error("io error on {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },

    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

impl Error {
    /// An invalid config value; `path` names the field.
    pub fn config(path: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Core(sluice_core::Error::config(path, reason))
    }
    pub fn task(reason: impl Into<String>) -> Self {
        Error::Core(sluice_core::Error::Task(reason.into()))
    }
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
    /// The config error inside, if this is one (for exit codes).
    pub fn as_config(&self) -> Option<&sluice_core::Error> {
        match self {
            Error::Core(e @ sluice_core::Error::Config { .. }) => Some(e),
            _ => None,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
