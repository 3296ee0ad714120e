//! Training objectives, one file per algorithm, each read top to bottom with
//! its paper's equation numbers: [`grpo`] (GRPO with the DAPO and Dr. GRPO
//! options, decoupled PPO), [`disco`] (discriminative constrained
//! optimisation), [`bgpo`] (masked diffusion policies), [`sft`] (the
//! supervised warm-up).
//!
//! An RL objective implements [`Objective`]: given this rank's groups with
//! their advantages, it builds its own batches, runs its own epochs and
//! mini-batches, computes its loss and calls the step engine
//! (`crate::engine`) to reduce over ranks, skip non-finite updates, clip and
//! step. The trainer picks one with [`build`] and never looks inside.

pub mod bgpo;
pub mod disco;
pub mod grpo;
pub mod sft;

use sluice_core::config::{Algorithm, JobConfig};
use sluice_core::rollout::Group;

use crate::engine::Engine;
use crate::error::Result;
use crate::metrics::StepMetrics;

/// This rank's share of one step, scored.
#[derive(Debug)]
pub struct Scored<'a> {
    pub groups: &'a [Group],
    /// One advantage per rollout, in group order ([`grpo::advantages`]).
    pub advantages: &'a [f64],
    /// Groups in the step over all ranks.
    pub n_groups: f64,
    /// The step being taken (the policy version it starts from).
    pub step: u64,
    /// The job's seed (objectives that draw samples key them by seed and step).
    pub seed: u64,
    /// The learning rate of this step (`train.lr` through warm-up and schedule).
    pub lr: f64,
}

/// A policy-gradient objective.
pub trait Objective: Send {
    /// Trains on `scored` (every rank calls it once per step, with any number of
    /// groups). Fills `pg_loss`, `kl`, `clip_fraction`, `grad_norm`,
    /// `skipped_updates` and `train_tokens_per_s` of `m`.
    fn update(&mut self, engine: &mut Engine, scored: &Scored<'_>, m: &mut StepMetrics) -> Result<()>;
}

/// A one-token rollout with `reward` (extrinsic too), for the objectives' tests.
#[cfg(test)]
pub(crate) fn scored_rollout(reward: f64) -> sluice_core::rollout::Rollout {
    sluice_core::rollout::Rollout {
        prompt_id: 0,
        prompt_tokens: vec![1],
        response_tokens: vec![2],
        logprobs: Some(vec![-0.5]),
        loss_mask: vec![],
        captions: vec![],
        switches: Vec::new(),
        reward,
        extrinsic: reward,
        intrinsic: 0.0,
        version: 0,
        finish: sluice_core::rollout::FinishReason::Stop,
    }
}

/// The job's objective. `temperature` is the sampling temperature the
/// behaviour log-probs were computed at (1 for greedy sampling).
pub fn build(cfg: &JobConfig, temperature: f64) -> Box<dyn Objective> {
    match cfg.algorithm {
        Algorithm::Grpo => Box::new(grpo::Grpo::new(cfg, temperature)),
        Algorithm::Bgpo => Box::new(bgpo::Bgpo::new(cfg)),
        Algorithm::Disco => Box::new(disco::Disco::new(cfg, temperature)),
    }
}
