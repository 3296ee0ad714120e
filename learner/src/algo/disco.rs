//! DisCO, read top to bottom: split each group into positives and negatives →
//! score every response → discriminative objective (basic or DRO) → trust
//! region as a squared-hinge penalty → one gradient step per mini-batch.
//!
//! Reference: Li, Lin, Galanti, Tu, Yang, "DisCO: Reinforcing Large Reasoning
//! Models with Discriminative Constrained Optimization" (arXiv 2505.12366,
//! NeurIPS 2025); definitions as in `DESIGN.md`, "Objectives, phase 2":
//! * score (the paper's scoring functions): log-L `s(o) = (1/|o|) Σ_t log π_θ(o_t)`,
//!   or L-ratio `s(o) = π_θ(o) / π_old(o)` (the log ratio clamped to ±20);
//! * basic objective: `J_g = mean_{O+} s − mean_{O−} s` per group;
//! * DRO form for imbalance: the negatives' mean replaced by `τ · log mean_{O−} exp(s/τ)`;
//! * trust region as a constraint: `J = mean_g J_g − β · max(0, KL(π_old‖π_θ) − δ)²`,
//!   the KL estimated on the sampled tokens, `mean_t (log π_old − log π_θ)`.
//!
//! No clipping. A response is positive when its reward is above its group's
//! mean and negative when below (with 0/1 rewards: the 1s and the 0s); groups
//! with no positive or no negative carry no discriminative signal and are
//! counted, not trained on.
//!
//! How the gradient is taken without holding a group in one forward pass: the
//! DRO term and the hinge couple rows only through numbers known before the
//! update (softmax weights of the negatives' scores, the mini-batch's KL), so a
//! no-gradient pass first computes every row's score and the KL, and the
//! gradient pass then minimises `−Σ_i c_i s_i + f · mean_t(log π_old − log π_θ)`,
//! whose gradient equals `−∇J` at the current weights ([`weights`] gives `c` and
//! `f`; tested against autograd of `J` as written).

use std::time::Instant;

use sluice_core::config::{DiscoConfig, DiscoScore, JobConfig};
use sluice_core::rollout::Group;
use tch::{Kind, Tensor};

use super::{Objective, Scored};
use crate::engine::{split_even, Batch, Engine, Row};
use crate::error::{Error, Result};
use crate::metrics::StepMetrics;

/// Per-row scores `[B]` from per-token log-probs `[B, T]` (with or without
/// gradient), behaviour log-probs and the response mask.
pub fn scores(logp: &Tensor, old_logp: &Tensor, mask: &Tensor, score: DiscoScore) -> Tensor {
    match score {
        DiscoScore::LogL => {
            (logp * mask).sum_dim_intlist(1, false, Kind::Float) / mask.sum_dim_intlist(1, false, Kind::Float).clamp_min(1.0)
        }
        DiscoScore::LRatio => ((logp - old_logp) * mask).sum_dim_intlist(1, false, Kind::Float).clamp(-20.0, 20.0).exp(),
    }
}

/// Which side of its group a response is on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Side {
    Positive,
    Negative,
    /// Reward equal to the group mean, or a one-sided group: not trained.
    Neither,
}

/// Each rollout's side, and how many groups had both sides.
pub fn sides(groups: &[Group]) -> (Vec<Side>, usize) {
    let mut out = Vec::new();
    let mut two_sided = 0;
    for g in groups {
        let rewards: Vec<f64> = g.rollouts.iter().map(|r| r.reward).collect();
        let mean = rewards.iter().sum::<f64>() / rewards.len().max(1) as f64;
        let side = |r: f64| {
            if r > mean + 1e-12 {
                Side::Positive
            } else if r < mean - 1e-12 {
                Side::Negative
            } else {
                Side::Neither
            }
        };
        let s: Vec<Side> = rewards.iter().map(|&r| side(r)).collect();
        if s.contains(&Side::Positive) && s.contains(&Side::Negative) {
            two_sided += 1;
            out.extend(s);
        } else {
            out.extend(std::iter::repeat_n(Side::Neither, s.len()));
        }
    }
    (out, two_sided)
}

/// What the gradient pass needs, from the no-gradient pass.
#[derive(Debug, Clone, PartialEq)]
pub struct Weights {
    /// `c_i`: dJ/ds_i, one per row (0 for rows that do not train).
    pub coef: Vec<f64>,
    /// `f`: the hinge's factor on the KL estimate, `2β · max(0, KL − δ)`.
    pub kl_factor: f64,
    /// These rows' share of the discriminative term of J (sums over ranks to it).
    pub discriminative: f64,
    /// The hinge penalty `β · max(0, KL − δ)²` (the whole batch's).
    pub penalty: f64,
}

/// `c` and `f` for rows `rows` (index ranges of each group in `scores`) with
/// `sides`, over `n_groups` two-sided groups in the whole (all-rank) batch, with
/// the batch's KL estimate `kl`.
pub fn weights(groups: &[std::ops::Range<usize>], sides: &[Side], scores: &[f64], n_groups: f64, kl: f64, cfg: &DiscoConfig) -> Weights {
    let mut coef = vec![0.0; scores.len()];
    let mut objective = 0.0; // the discriminative part
    let g = n_groups.max(1.0);
    for range in groups {
        let pos: Vec<usize> = range.clone().filter(|&i| sides[i] == Side::Positive).collect();
        let neg: Vec<usize> = range.clone().filter(|&i| sides[i] == Side::Negative).collect();
        if pos.is_empty() || neg.is_empty() {
            continue;
        }
        let np = pos.len() as f64;
        objective += pos.iter().map(|&i| scores[i]).sum::<f64>() / np / g;
        for &i in &pos {
            coef[i] = 1.0 / np / g;
        }
        if cfg.tau > 0.0 {
            // τ log mean exp(s/τ); its gradient puts softmax(s/τ) on each negative.
            let top = neg.iter().map(|&j| scores[j] / cfg.tau).fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = neg.iter().map(|&j| (scores[j] / cfg.tau - top).exp()).collect();
            let sum: f64 = e.iter().sum();
            objective -= cfg.tau * (top + (sum / neg.len() as f64).ln()) / g;
            for (k, &j) in neg.iter().enumerate() {
                coef[j] = -(e[k] / sum) / g;
            }
        } else {
            let nn = neg.len() as f64;
            objective -= neg.iter().map(|&j| scores[j]).sum::<f64>() / nn / g;
            for &j in &neg {
                coef[j] = -1.0 / nn / g;
            }
        }
    }
    let excess = (kl - cfg.delta).max(0.0);
    Weights { coef, kl_factor: 2.0 * cfg.beta * excess, discriminative: objective, penalty: cfg.beta * excess * excess }
}

/// The gradient pass's loss for one micro-batch: `−Σ c_i s_i + f · Σ_t (old − logp) / tokens`.
pub fn surrogate(logp: &Tensor, old_logp: &Tensor, mask: &Tensor, coef: &Tensor, kl_factor: f64, tokens: f64, score: DiscoScore) -> Tensor {
    let s = scores(logp, old_logp, mask, score);
    let disc = -(s * coef).sum(Kind::Float);
    if kl_factor > 0.0 {
        disc + ((old_logp - logp) * mask).sum(Kind::Float) * (kl_factor / tokens.max(1.0))
    } else {
        disc
    }
}

/// DisCO as a training objective (one pass over each batch, `mini_batches`
/// optimizer steps over whole groups).
#[derive(Debug, Clone)]
pub struct Disco {
    cfg: DiscoConfig,
    mini_batches: usize,
    micro_batch_size: usize,
    max_grad_norm: f64,
    temperature: f64,
}

impl Disco {
    pub fn new(job: &JobConfig, temperature: f64) -> Self {
        Disco {
            cfg: job.disco.clone(),
            mini_batches: job.grpo.mini_batches,
            micro_batch_size: job.train.micro_batch_size,
            max_grad_norm: job.train.max_grad_norm,
            temperature,
        }
    }
}

impl Objective for Disco {
    fn update(&mut self, engine: &mut Engine, s: &Scored<'_>, m: &mut StepMetrics) -> Result<()> {
        let t0 = Instant::now();
        let device = engine.policy.device();
        engine.opt.cfg.lr = s.lr;
        let (all_sides, _) = sides(s.groups);
        // Whole groups per mini-batch (the DRO term couples a group's rows).
        let group_parts = split_even(s.groups, self.mini_batches);
        let (mut offset, mut updates, mut trained_tokens) = (0usize, 0usize, 0.0);
        let (mut objective_sum, mut kl_sum) = (0.0, 0.0);
        for part in group_parts {
            let mut rows: Vec<Row> = Vec::new();
            let mut ranges = Vec::new();
            let mut part_sides = Vec::new();
            let mut two_sided = 0.0;
            for g in part {
                let start = rows.len();
                let g_sides = &all_sides[offset..offset + g.rollouts.len()];
                offset += g.rollouts.len();
                if g_sides.contains(&Side::Positive) {
                    two_sided += 1.0;
                }
                for (r, &side) in g.rollouts.iter().zip(g_sides) {
                    if side == Side::Neither || r.response_tokens.is_empty() {
                        continue;
                    }
                    let old = r.logprobs.as_deref().ok_or_else(|| {
                        Error::Training(format!("DisCO needs behaviour log-probs; a rollout ({} prompt tokens) has none", r.prompt_tokens.len()))
                    })?;
                    rows.push(Row { prompt: &r.prompt_tokens, response: &r.response_tokens, old_logp: Some(old), loss_mask: &r.loss_mask, advantage: 0.0 });
                    part_sides.push(side);
                }
                ranges.push(start..rows.len());
            }
            // No-gradient pass: every row's score and the KL estimate, then the
            // coefficients; the group count and KL are over all ranks.
            let mut scores_v = Vec::with_capacity(rows.len());
            let (mut kl_num, mut tokens) = (0.0, 0.0);
            for micro in rows.chunks(self.micro_batch_size) {
                let micro: Vec<&Row> = micro.iter().collect();
                let batch = Batch::new(&micro, engine.pad, device);
                let logp = tch::no_grad(|| Engine::logprobs(&engine.policy, &batch, self.temperature).logp);
                let sc: Vec<f64> = Vec::try_from(scores(&logp, &batch.old_logp, &batch.mask, self.cfg.score).to_kind(Kind::Double))
                    .map_err(|e| Error::Training(format!("scores: {e}")))?;
                scores_v.extend(sc);
                kl_num += ((&batch.old_logp - &logp) * &batch.mask).sum(Kind::Float).double_value(&[]);
                tokens += batch.tokens;
            }
            let mut totals = [two_sided, kl_num, tokens];
            engine.all_reduce(&mut totals)?;
            let [groups_all, kl_all, tokens_all] = totals;
            if groups_all == 0.0 {
                continue;
            }
            let kl = kl_all / tokens_all.max(1.0);
            let w = weights(&ranges, &part_sides, &scores_v, groups_all, kl, &self.cfg);
            // Gradient pass.
            let mut finite = true;
            for (k, micro) in rows.chunks(self.micro_batch_size).enumerate() {
                let start = k * self.micro_batch_size;
                let micro: Vec<&Row> = micro.iter().collect();
                let batch = Batch::new(&micro, engine.pad, device);
                let coef = Tensor::from_slice(&w.coef[start..start + micro.len()]).to_kind(Kind::Float).to_device(device);
                let logp = engine.train_logprobs(&batch, self.temperature);
                let loss = surrogate(&logp.logp, &batch.old_logp, &batch.mask, &coef, w.kl_factor, tokens_all, self.cfg.score);
                if !loss.double_value(&[]).is_finite() {
                    finite = false;
                    break;
                }
                logp.backward(&engine.policy, &loss);
                trained_tokens += batch.tokens;
            }
            let report = engine.step(finite, self.max_grad_norm)?;
            if report.skipped {
                m.skipped_updates += 1;
                tracing::warn!(step = s.step, "non-finite DisCO loss or gradient: optimizer step skipped");
            } else {
                updates += 1;
                m.grad_norm += report.grad_norm;
            }
            // J = (sum over ranks of each one's discriminative share) − penalty.
            let mut disc = [w.discriminative];
            engine.all_reduce(&mut disc)?;
            objective_sum += disc[0] - w.penalty;
            kl_sum += kl;
        }
        let mut tokens = [trained_tokens];
        engine.all_reduce(&mut tokens)?;
        let n = updates.max(1) as f64;
        // Reported as a loss (lower is better), like GRPO's pg_loss.
        m.pg_loss = -objective_sum / n;
        m.kl = kl_sum / n;
        m.grad_norm /= n;
        m.train_tokens_per_s = tokens[0] / t0.elapsed().as_secs_f64().max(1e-9);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::scored_rollout as rollout;
    use super::*;

    #[test]
    fn sides_split_groups_and_drop_one_sided_ones() {
        let g = |r: &[f64]| Group { prompt_id: 0, work_id: 0, rollouts: r.iter().map(|&x| rollout(x)).collect(), trace: None, generate_s: 0.0 };
        let (s, two) = sides(&[g(&[1.0, 0.0, 0.0]), g(&[1.0, 1.0]), g(&[0.0, 0.0]), g(&[0.2, 0.5, 0.8])]);
        use Side::*;
        assert_eq!(s, vec![Positive, Negative, Negative, Neither, Neither, Neither, Neither, Negative, Neither, Positive]);
        assert_eq!(two, 2);
    }

    /// Two groups (positives 1 of 3 and 2 of 3), tokens of different lengths:
    /// the surrogate's gradient equals autograd of J written out as in
    /// DESIGN.md (log-sum-exp over negatives, squared hinge on the KL), for
    /// both scores, the basic and the DRO form, with the hinge active.
    #[test]
    fn the_gradient_equals_autograd_of_the_written_objective() {
        let t2 = |v: &[[f64; 3]]| Tensor::from_slice(&v.iter().flatten().map(|&x| x as f32).collect::<Vec<_>>()).view([v.len() as i64, 3]);
        let logp0 = [[-0.3, -1.2, -0.8], [-2.0, -0.1, -0.4], [-0.9, -0.7, -1.5], [-0.2, -0.6, -0.3], [-1.1, -0.5, -0.9], [-0.4, -1.6, -0.2]];
        // The behaviour policy put more mass on these tokens: KL(old || theta) > 0 beyond delta.
        let old = t2(&logp0.map(|r| r.map(|x| x + 0.15)));
        let mask = t2(&[[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]);
        use Side::*;
        let sides = [Positive, Negative, Negative, Positive, Positive, Negative];
        let ranges = [0..3usize, 3..6];
        let tokens = mask.sum(Kind::Float).double_value(&[]);
        for score in [DiscoScore::LogL, DiscoScore::LRatio] {
            for tau in [0.0, 0.5] {
                let cfg = DiscoConfig { score, tau, beta: 50.0, delta: 0.01 };
                // J as written, by autograd.
                let lp = t2(&logp0).set_requires_grad(true);
                let s = scores(&lp, &old, &mask, score);
                let mut j = Tensor::zeros([], (Kind::Float, tch::Device::Cpu));
                for r in &ranges {
                    let pos: Vec<i64> = r.clone().filter(|&i| sides[i] == Positive).map(|i| i as i64).collect();
                    let neg: Vec<i64> = r.clone().filter(|&i| sides[i] == Negative).map(|i| i as i64).collect();
                    let sp = s.index_select(0, &Tensor::from_slice(&pos)).mean(Kind::Float);
                    let sn = s.index_select(0, &Tensor::from_slice(&neg));
                    let neg_term = if tau > 0.0 {
                        (sn / tau).logsumexp([0], false) * tau - tau * (neg.len() as f64).ln()
                    } else {
                        sn.mean(Kind::Float)
                    };
                    j = &j + (sp - neg_term) / 2.0;
                }
                let kl = ((&old - &lp) * &mask).sum(Kind::Float) / tokens;
                let hinge = (&kl - cfg.delta).clamp_min(0.0);
                let j = j - &hinge * &hinge * cfg.beta;
                (-&j).backward();
                let want = lp.grad();
                // The objective's pipeline: no-gradient scores and KL, then the surrogate.
                let values: Vec<f64> = Vec::try_from(s.detach().to_kind(Kind::Double)).unwrap();
                let w = weights(&ranges, &sides, &values, 2.0, kl.double_value(&[]), &cfg);
                assert!(w.kl_factor > 0.0, "the hinge must be active in this test");
                assert!((w.discriminative - w.penalty - j.double_value(&[])).abs() < 1e-5, "J {} vs {}", w.discriminative - w.penalty, j.double_value(&[]));
                let lp2 = t2(&logp0).set_requires_grad(true);
                let coef = Tensor::from_slice(&w.coef).to_kind(Kind::Float);
                surrogate(&lp2, &old, &mask, &coef, w.kl_factor, tokens, score).backward();
                let got = lp2.grad();
                assert!(got.allclose(&want, 1e-5, 1e-6, false), "{score:?} tau {tau}: {got} vs {want}");
            }
        }
    }
}
