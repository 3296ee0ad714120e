//! The one error type of `sluice-collective`.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A collective call failed: a peer left or could not join, ranks called in
    /// a different order or with different shapes, or NCCL reported an error.
    #[error("collective: {0}")]
    Comm(String),

    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
