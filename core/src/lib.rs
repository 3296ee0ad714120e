//! `sluice-core`: what every sluice process shares.
//!
//! * [`model`] — the Qwen2/Llama decoder in tch, with a KV cache.
//! * [`hf`] — [`hf::Policy`]: a model with its parameters, loaded from / saved to
//!   Hugging Face directories.
//! * [`tokenizer`] — `tokenizer.json` through the `tokenizers` crate.
//! * [`generate`] — batched sampling returning behaviour log-probs.
//! * [`diffusion`] — masked diffusion LMs: bidirectional forward, block-wise
//!   low-confidence-remasking sampler, Monte Carlo ELBO.
//! * [`rollout`] — rollouts and groups, the unit of training data, and how they are sampled.
//! * [`tasks`] — environments with verifiers (arithmetic, Countdown, JSONL).
//! * [`budget`] — rollouts per prompt: uniform or knapsack allocation.
//! * [`config`] — the typed job configuration.
//! * [`telemetry`] — logs, OpenTelemetry traces and metrics of every binary.
//! * [`weights`] — parameters as an in-memory safetensors blob (weight sync).
//!
//! No networking and no training here: losses, optimizers and the trainer live
//! in `sluice-learner`.

pub mod budget;
pub mod config;
pub mod diffusion;
pub mod device;
pub mod error;
pub mod generate;
pub mod hf;
pub mod telemetry;
pub mod model;
pub mod rollout;
pub mod staleness;
pub mod tasks;
pub mod tokenizer;
pub mod weights;

pub use error::{Error, Result};

/// FNV-1a, 64-bit: a stable, seedless hash of bytes (caption keys, actor
/// indices, per-parameter init streams). Not for anything adversarial.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}
