//! Training objectives, one file per algorithm.

pub mod bgpo;
pub mod grpo;
