//! `sluice-model`: the policy in tch (libtorch). Everything that touches a
//! tensor and is shared by the learner, the actor and the CLI lives here; the
//! orchestrator never links it.
//!
//! * [`model`] — the Qwen2/Llama decoder, with a KV cache.
//! * [`hf`] — [`hf::Policy`]: a model with its parameters, loaded from / saved to
//!   Hugging Face directories.
//! * [`generate`] — batched sampling returning behaviour log-probs.
//! * [`diffusion`] — masked diffusion LMs: bidirectional forward, block-wise
//!   low-confidence-remasking sampler, Monte Carlo ELBO.
//! * [`collect`] — how rollouts are sampled and scored (trainer and actor alike).
//! * [`weights`] — parameters as an in-memory safetensors blob (weight sync).
//! * [`device`] — the job file's dtype and device as libtorch's.
//!
//! No networking and no training: losses, optimizers and the trainer live in
//! `sluice-learner`.

pub mod collect;
pub mod device;
pub mod diffusion;
pub mod error;
pub mod generate;
pub mod hf;
pub mod model;
pub mod weights;

pub use error::{Error, Result};
