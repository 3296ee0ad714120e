//! Training objectives, one file per algorithm.

pub mod grpo;
