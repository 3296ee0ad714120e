//! Several rewards per rollout (DESIGN.md, "Objectives, phase 2"): named
//! components, combined by fixed weights and held to constraints with Lagrange
//! multipliers.
//!
//! Components are read from what every rollout already carries to the
//! learner, so they need nothing new on the wire:
//! * `correct` — the verifier's (or environment's) reward, `extrinsic`;
//! * `intrinsic` — the reward server's ONI reward;
//! * `finished` — 1 when the response ended on a stop token, 0 when cut at
//!   `max_new_tokens`;
//! * `short` — `1 − |o| / max_new_tokens` (higher for shorter responses).
//!
//! Total reward (what group advantages are computed from):
//! `r = Σ_k w_k r_k + Σ_k λ_k r_k`, fixed weights `w_k` (`[reward.weights]`)
//! and one multiplier per constraint `E[r_k] ≥ c_k` (`[reward.constraints]`),
//! updated after every step by projected dual ascent:
//! `λ_k ← max(0, λ_k + η (c_k − mean r_k))` (η = `reward.multiplier_lr`), so a
//! violated constraint weighs more each step until it holds. Multipliers are
//! kept in checkpoints (`multipliers.json`).

use std::collections::BTreeMap;

use sluice_core::config::RewardConfig;
use sluice_core::rollout::{FinishReason, Group, Rollout};

/// Every component name, as `[reward.weights]` and `[reward.constraints]` spell them.
pub use sluice_core::config::REWARD_COMPONENTS as COMPONENTS;

/// Component `name` of `r` (names are checked when the job is parsed).
pub fn component(r: &Rollout, name: &str, max_new_tokens: usize) -> f64 {
    match name {
        "correct" => r.extrinsic,
        "intrinsic" => r.intrinsic,
        "finished" => f64::from(r.finish == FinishReason::Stop),
        "short" => 1.0 - (r.response_tokens.len() as f64 / max_new_tokens.max(1) as f64).min(1.0),
        _ => 0.0,
    }
}

/// The job's combination of components (`None` from [`RewardMix::from_config`]
/// when the job names none: the rollout's own reward is used as it came).
#[derive(Debug, Clone, PartialEq)]
pub struct RewardMix {
    weights: BTreeMap<String, f64>,
    thresholds: BTreeMap<String, f64>,
    multipliers: BTreeMap<String, f64>,
    lr: f64,
    max_new_tokens: usize,
}

impl RewardMix {
    pub fn from_config(cfg: &RewardConfig, max_new_tokens: usize) -> Option<RewardMix> {
        if cfg.weights.is_empty() && cfg.constraints.is_empty() {
            return None;
        }
        Some(RewardMix {
            weights: cfg.weights.clone(),
            thresholds: cfg.constraints.clone(),
            multipliers: cfg.constraints.keys().map(|k| (k.clone(), 0.0)).collect(),
            lr: cfg.multiplier_lr,
            max_new_tokens,
        })
    }

    /// The weight each component has now: `w_k + λ_k`.
    pub fn effective_weights(&self) -> BTreeMap<String, f64> {
        let mut out = self.weights.clone();
        for (k, l) in &self.multipliers {
            *out.entry(k.clone()).or_default() += l;
        }
        out
    }

    /// `groups` with each rollout's reward replaced by the weighted sum of its components.
    pub fn apply(&self, groups: &[Group]) -> Vec<Group> {
        let w = self.effective_weights();
        groups
            .iter()
            .map(|g| {
                let mut g = g.clone();
                for r in &mut g.rollouts {
                    r.reward = w.iter().map(|(k, wk)| wk * component(r, k, self.max_new_tokens)).sum();
                }
                g
            })
            .collect()
    }

    /// Sum of every named component (weighted or constrained) over `groups`,
    /// and the number of rollouts: what the caller sums over ranks.
    pub fn sums(&self, groups: &[Group]) -> (BTreeMap<String, f64>, f64) {
        let names = self.weights.keys().chain(self.thresholds.keys());
        let rollouts: Vec<&Rollout> = groups.iter().flat_map(|g| &g.rollouts).collect();
        let sums = names.map(|k| (k.clone(), rollouts.iter().map(|r| component(r, k, self.max_new_tokens)).sum())).collect();
        (sums, rollouts.len() as f64)
    }

    /// Dual ascent on every multiplier from this step's component means:
    /// `λ_k ← max(0, λ_k + η (c_k − mean r_k))`.
    pub fn update(&mut self, means: &BTreeMap<String, f64>) {
        for (k, c) in &self.thresholds {
            let mean = means.get(k).copied().unwrap_or(0.0);
            let l = self.multipliers.entry(k.clone()).or_default();
            *l = (*l + self.lr * (c - mean)).max(0.0);
        }
    }

    pub fn multipliers(&self) -> &BTreeMap<String, f64> {
        &self.multipliers
    }

    /// Restores multipliers from a checkpoint (names the job no longer constrains are dropped).
    pub fn restore(&mut self, saved: &BTreeMap<String, f64>) {
        for (k, l) in &mut self.multipliers {
            if let Some(v) = saved.get(k) {
                *l = v.max(0.0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rollout(extrinsic: f64, len: usize, finish: FinishReason) -> Rollout {
        Rollout {
            prompt_id: 0,
            prompt_tokens: vec![1],
            response_tokens: vec![2; len],
            logprobs: None,
            loss_mask: vec![],
            captions: vec![],
            reward: -9.0,
            extrinsic,
            intrinsic: 0.25,
            version: 0,
            finish,
        }
    }

    fn mix(body: &str) -> RewardMix {
        let job = sluice_core::config::JobConfig::from_toml(&format!(
            "[model]\npreset = \"tiny\"\n[task]\nkind = \"arithmetic\"\n[sampling]\nmax_new_tokens = 8\n[reward]\n{body}"
        ))
        .unwrap();
        RewardMix::from_config(&job.reward, 8).unwrap()
    }

    #[test]
    fn fixed_weights_sum_the_components() {
        let m = mix("weights = { correct = 1.0, short = 0.5, finished = 0.25 }");
        let g = Group { prompt_id: 0, work_id: 0, rollouts: vec![rollout(1.0, 2, FinishReason::Stop), rollout(0.0, 8, FinishReason::Length)] };
        let out = m.apply(std::slice::from_ref(&g));
        // 1 + 0.5 * (1 - 2/8) + 0.25 = 1.625; 0 + 0.5 * 0 + 0 = 0.
        assert_eq!(out[0].rollouts.iter().map(|r| r.reward).collect::<Vec<_>>(), vec![1.625, 0.0]);
        let (sums, n) = m.sums(std::slice::from_ref(&g));
        assert_eq!((sums["correct"], sums["short"], sums["finished"], n), (1.0, 0.75, 1.0, 2.0));
    }

    /// A violated constraint's multiplier rises every step it stays violated,
    /// then falls back (never below 0) once it holds; the total follows it.
    #[test]
    fn multipliers_rise_while_a_constraint_is_violated() {
        let mut m = mix("weights = { correct = 1.0 }\nconstraints = { finished = 0.9 }\nmultiplier_lr = 0.5");
        let means = |finished: f64| BTreeMap::from([("correct".to_string(), 0.5), ("finished".to_string(), finished)]);
        let mut seen = vec![];
        for _ in 0..3 {
            m.update(&means(0.3));
            seen.push(m.multipliers()["finished"]);
        }
        assert!(seen.windows(2).all(|w| w[1] > w[0]), "{seen:?}");
        assert!((seen[2] - 3.0 * 0.5 * 0.6).abs() < 1e-12);
        let g = Group { prompt_id: 0, work_id: 0, rollouts: vec![rollout(0.0, 3, FinishReason::Stop)] };
        assert!((m.apply(std::slice::from_ref(&g))[0].rollouts[0].reward - seen[2]).abs() < 1e-12, "finished now pays lambda");
        // Each step that holds lowers it by 0.5 * (1.0 - 0.9) = 0.05: 0.9 is gone after 18.
        for _ in 0..20 {
            m.update(&means(1.0));
        }
        assert_eq!(m.multipliers()["finished"], 0.0, "a constraint that holds lets its multiplier fall to 0");
        assert_eq!(m.effective_weights(), BTreeMap::from([("correct".to_string(), 1.0), ("finished".to_string(), 0.0)]));
    }
}
