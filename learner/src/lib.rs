//! `sluice-learner`: turning rollouts into parameter updates.
//!
//! * [`trainer`] — the one training loop (`sluice train` and the distributed
//!   learner), with three seams: a [`source::RolloutSource`] supplies each
//!   step's groups, an [`algo::Objective`] (GRPO, DisCO, BGPO; [`algo::sft`] for the
//!   warm-up) turns them into updates, and the [`engine`] reduces over ranks,
//!   skips non-finite updates, clips and steps AdamW.
//! * [`algo`] — objectives, one file per algorithm.
//! * [`rewards`] — several named reward components: fixed weights, constraints with Lagrange multipliers.
//! * [`metrics`] — step metrics and events, `metrics.jsonl`.
//! * [`optim`] — AdamW with checkpointable state and gradient clipping.
//! * [`checkpoint`] — atomic training checkpoints.
//! * [`collective`] — `sluice-collective` re-exported: all-reduce/broadcast between
//!   data-parallel ranks (TCP on CPU, [`nccl`] for CUDA tensors).
//! * [`ingest`] — checks wire rollouts and assembles complete groups.
//! * [`publish`] — `WeightPublisher`: how each new version reaches actors (gRPC backend).
//! * [`service`] — the `sluice.v1.Learner` gRPC service (ingest, weights, status).
//! * [`node`] — a learner process: the service plus the training loop of one rank.

pub mod algo;
pub mod checkpoint;
pub mod engine;
pub mod error;
pub mod ingest;
pub mod metrics;
pub mod node;
pub mod optim;
pub mod publish;
pub mod rewards;
pub mod service;
pub mod source;
pub mod trainer;

pub use error::{Error, Result};
pub use sluice_collective as collective;
pub use sluice_collective::nccl;
