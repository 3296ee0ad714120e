//! The one error type of `sluice-core`: configs, tasks, tokenizers, files.

use std::path::PathBuf;

/// Everything that can go wrong in the shared library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A config file or value is invalid; `path` names the field (`grpo.clip_low`).
    #[error("invalid config at `{path}`: {reason}")]
    Config { path: String, reason: String },

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// A chat template failed to compile or render; `origin` names the file it came from.
    #[error("chat template from {origin}: {reason}")]
    Template { origin: String, reason: String },

    /// A dataset file is unreadable or lacks what the job maps; `file` names it.
    #[error("dataset {file}: {reason}")]
    Dataset { file: PathBuf, reason: String },

    #[error("task: {0}")]
    Task(String),

    #[error("io error on {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
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
