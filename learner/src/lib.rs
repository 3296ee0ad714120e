//! `sluice-learner`: turning rollouts into parameter updates.
//!
//! * [`algo`] — objectives, one file per algorithm ([`algo::grpo`]).
//! * [`optim`] — AdamW with checkpointable state and gradient clipping.
//! * [`checkpoint`] — atomic training checkpoints.
//! * [`collective`] — all-reduce/broadcast between data-parallel ranks (TCP on CPU);
//!   [`nccl`] — the NCCL backend for CUDA tensors.
//! * [`trainer`] — the single-process loop (collect → score → GRPO step), reused
//!   by the distributed learner.
//! * [`ingest`] — checks wire rollouts and assembles complete groups.
//! * [`service`] — the `sluice.v1.Learner` gRPC service (ingest, weights, status).
//! * [`node`] — a learner process: the service plus the training loop of one rank.

pub mod algo;
pub mod checkpoint;
pub mod collective;
pub mod error;
pub mod ingest;
pub mod nccl;
pub mod node;
pub mod optim;
pub mod service;
pub mod trainer;

pub use error::{Error, Result};
