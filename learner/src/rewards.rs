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
//!
//! Dynamic weights (`reward.dynamic`; Lu et al., "Learning to Optimize
//! Multi-Objective Alignment Through Dynamic Reward Weighting", arXiv
//! 2509.11452, the gradient-based weight optimisation, as the authors'
//! reference code computes it — the paper's equation numbers were not
//! available to us): each step, each component k's policy gradient g_k is
//! taken alone (GRPO surrogate, advantages from r_k only); its influence is
//! `I_k = Σ_j <g_k, g_j>`; the weights on the simplex take a mirror-descent
//! step `w ← softmax(log w + (lr / ρ) · I)` (ρ = `reward.dynamic_scale`, lr the
//! step's learning rate) before the step's rewards are combined. A component
//! the policy has saturated (equal rewards in every group) has no gradient and
//! loses weight to the ones still moving.

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
        let mut weights = cfg.weights.clone();
        if cfg.dynamic {
            let total: f64 = weights.values().sum();
            weights.values_mut().for_each(|w| *w /= total);
        }
        Some(RewardMix {
            weights,
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

    /// The weighted components, in name order (what dynamic weights move).
    pub fn weighted(&self) -> Vec<String> {
        self.weights.keys().cloned().collect()
    }

    /// A copy of `groups` whose rewards are component `name` alone.
    pub fn only(&self, groups: &[Group], name: &str) -> Vec<Group> {
        let mut out = groups.to_vec();
        for r in out.iter_mut().flat_map(|g| &mut g.rollouts) {
            r.reward = component(r, name, self.max_new_tokens);
        }
        out
    }

    /// One mirror-descent step of the weights on the simplex from the
    /// components' influences `I_k = Σ_j <g_k, g_j>` (`gram` row sums):
    /// `w ← softmax(log w + step · I)`.
    pub fn mirror_step(&mut self, gram: &[Vec<f64>], step: f64) {
        let names = self.weighted();
        let logits: Vec<f64> =
            names.iter().enumerate().map(|(k, n)| self.weights[n].max(1e-12).ln() + step * gram[k].iter().sum::<f64>()).collect();
        let top = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = logits.iter().map(|l| (l - top).exp()).collect();
        let sum: f64 = e.iter().sum();
        for (n, v) in names.iter().zip(e) {
            self.weights.insert(n.clone(), v / sum);
        }
    }

    pub fn multipliers(&self) -> &BTreeMap<String, f64> {
        &self.multipliers
    }

    /// The weights (dynamic ones change every step; saved in checkpoints).
    pub fn weights(&self) -> &BTreeMap<String, f64> {
        &self.weights
    }

    /// Restores weights from a checkpoint (only the job's own components).
    pub fn restore_weights(&mut self, saved: &BTreeMap<String, f64>) {
        for (k, w) in &mut self.weights {
            if let Some(v) = saved.get(k).filter(|v| v.is_finite()) {
                *w = *v;
            }
        }
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
            switches: Vec::new(),
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
        let g = Group { prompt_id: 0, work_id: 0, rollouts: vec![rollout(1.0, 2, FinishReason::Stop), rollout(0.0, 8, FinishReason::Length)], trace: None, generate_s: 0.0 };
        let out = m.apply(std::slice::from_ref(&g));
        // 1 + 0.5 * (1 - 2/8) + 0.25 = 1.625; 0 + 0.5 * 0 + 0 = 0.
        assert_eq!(out[0].rollouts.iter().map(|r| r.reward).collect::<Vec<_>>(), vec![1.625, 0.0]);
        let (sums, n) = m.sums(std::slice::from_ref(&g));
        assert_eq!((sums["correct"], sums["short"], sums["finished"], n), (1.0, 0.75, 1.0, 2.0));
    }

    /// The component whose gradient still has influence gains weight; one the
    /// policy saturated (no gradient) loses it; weights stay on the simplex.
    #[test]
    fn dynamic_weights_move_toward_the_lagging_component() {
        let mut m = mix("weights = { correct = 1.0, short = 1.0 }\ndynamic = true");
        assert_eq!(m.weights().values().copied().collect::<Vec<_>>(), vec![0.5, 0.5], "normalised to the simplex");
        // correct is saturated (zero gradient); short's gradient has norm^2 4.
        let gram = vec![vec![0.0, 0.0], vec![0.0, 4.0]];
        m.mirror_step(&gram, 0.1);
        let (c, s) = (m.weights()["correct"], m.weights()["short"]);
        assert!(s > 0.5 && c < 0.5 && (c + s - 1.0).abs() < 1e-12, "{c} {s}");
        // softmax(log 0.5 + [0, 0.4]) by hand.
        assert!((s - 0.4f64.exp() / (1.0 + 0.4f64.exp())).abs() < 1e-12);
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
        let g = Group { prompt_id: 0, work_id: 0, rollouts: vec![rollout(0.0, 3, FinishReason::Stop)], trace: None, generate_s: 0.0 };
        assert!((m.apply(std::slice::from_ref(&g))[0].rollouts[0].reward - seen[2]).abs() < 1e-12, "finished now pays lambda");
        // Each step that holds lowers it by 0.5 * (1.0 - 0.9) = 0.05: 0.9 is gone after 18.
        for _ in 0..20 {
            m.update(&means(1.0));
        }
        assert_eq!(m.multipliers()["finished"], 0.0, "a constraint that holds lets its multiplier fall to 0");
        assert_eq!(m.effective_weights(), BTreeMap::from([("correct".to_string(), 1.0), ("finished".to_string(), 0.0)]));
    }
}
