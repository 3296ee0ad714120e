//! `sluice-learner`: turning rollouts into parameter updates.
//!
//! * [`algo`] — objectives, one file per algorithm ([`algo::grpo`]).
//! * [`optim`] — AdamW with checkpointable state and gradient clipping.
//! * [`checkpoint`] — atomic training checkpoints.
//! * [`trainer`] — the single-process loop (collect → score → GRPO step), reused
//!   by the distributed learner.

pub mod algo;
pub mod checkpoint;
pub mod error;
pub mod optim;
pub mod trainer;

pub use error::{Error, Result};
