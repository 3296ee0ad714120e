//! `sluice-core`: what every sluice process shares, without libtorch (the
//! orchestrator links only this).
//!
//! * [`config`] — the typed job configuration; [`kinds`] — its parsed values
//!   (dtype, device, label store, labels).
//! * [`sampling`] — how completions are sampled (the `[sampling]` section).
//! * [`rollout`] — rollouts and groups, the unit of training data.
//! * [`tasks`] — environments with verifiers (arithmetic, Countdown, JSONL, adventure).
//! * [`budget`] — rollouts per prompt: uniform or knapsack allocation.
//! * [`staleness`] — the one rule on how old a rollout may be.
//! * [`limits`] — every bound a job file, a message or a client is held to.
//! * [`signal`] — Ctrl-C and SIGTERM, handled the same way by every process.
//! * [`tokenizer`] — `tokenizer.json` through the `tokenizers` crate.
//! * [`telemetry`] — logs, OpenTelemetry traces and metrics of every binary
//!   (the one networked piece: an OTLP/gRPC exporter when configured).
//!
//! Tensors live in `sluice-model`; losses, optimizers and the trainer in
//! `sluice-learner`.

pub mod budget;
pub mod chat;
pub mod config;
pub mod error;
pub mod ids;
pub mod kinds;
pub mod limits;
pub mod paths;
pub mod telemetry;
pub mod rollout;
pub mod sampling;
pub mod signal;
pub mod staleness;
pub mod tasks;
pub mod tokenizer;

pub use error::{Error, Result};

/// FNV-1a, 64-bit: a stable, seedless hash of bytes (caption keys, actor
/// indices, per-parameter init streams). Not for anything adversarial.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}
