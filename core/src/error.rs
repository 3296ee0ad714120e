//! The one error type of `sluice-core`.

use std::path::PathBuf;

/// Everything that can go wrong in the shared library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A config file or value is invalid; `path` names the field (`grpo.clip_low`).
    #[error("invalid config at `{path}`: {reason}")]
    Config { path: String, reason: String },

    /// The checkpoint directory or a tensor in it does not fit the model.
    #[error("checkpoint {file}: {reason}")]
    Checkpoint { file: PathBuf, reason: String },

    /// A tensor the model needs is missing from the checkpoint.
    #[error("checkpoint {file}: tensor `{name}` is missing (expected shape {expected:?})")]
    MissingTensor { file: PathBuf, name: String, expected: Vec<i64> },

    /// A tensor in the checkpoint has the wrong shape.
    #[error("checkpoint {file}: tensor `{name}` has shape {found:?}, the model expects {expected:?}")]
    ShapeMismatch { file: PathBuf, name: String, expected: Vec<i64>, found: Vec<i64> },

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error("task: {0}")]
    Task(String),

    #[error("generation: {0}")]
    Generation(String),

    #[error("io error on {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },

    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

impl Error {
    pub fn config(path: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Config { path: path.into(), reason: reason.into() }
    }
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
