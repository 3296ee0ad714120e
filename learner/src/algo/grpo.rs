//! GRPO, read top to bottom: rewards → shaping → group advantages → clipped
//! surrogate → KL penalty → aggregation.
//!
//! References
//! * GRPO: Shao et al., DeepSeekMath (arXiv 2402.03300), eq. 3 (objective) and §4.1.2
//!   (outcome supervision: A_i = (r_i - mean(r)) / std(r)); k3 KL estimator, eq. 4.
//! * PPO clipped surrogate: Schulman et al. (arXiv 1707.06347), eq. 7.
//! * Dual clip: Ye et al., "Mastering Complex Control in MOBA Games" (arXiv 1912.09729), eq. 5.
//! * DAPO: Yu et al. (arXiv 2503.14476): clip-higher (eq. 10), dynamic sampling (eq. 11),
//!   token-level loss (eq. 12), overlong reward shaping (eq. 13).
//! * Dr. GRPO: Liu et al., "Understanding R1-Zero-Like Training" (arXiv 2503.20783), eq. 3:
//!   no std division, token sum normalised by a constant budget.
//! * Decoupled PPO: Fu et al., AReaL (arXiv 2505.24298), eq. 5 (after Hilton et al.,
//!   "Batch size-invariance for policy optimization", arXiv 2110.00641): the clip is
//!   taken on pi_theta / pi_prox, and the behaviour policy enters only through the
//!   importance weight pi_prox / pi_behav, here truncated or masked at a cap
//!   (truncated importance sampling, Ionides 2008; Yao et al., "Your efficient RL
//!   framework secretly brings you off-policy RL training", 2025).
//! * Advantage clip: A <- clamp(A, -c, c) after normalisation (Knapsack RL reference, c = 5).
//!
//! Every option lives in [`sluice_core::config::GrpoConfig`]. [`Grpo`] is the
//! update: advantages → epochs × mini-batches × micro-batches → engine step.

use std::time::Instant;

use sluice_core::config::{GrpoConfig, JobConfig, LossAgg, TisMode};
use sluice_core::rollout::Group;
use tch::{Kind, Tensor};

use super::{Objective, Scored};
use crate::engine::{split_even, Batch, Engine, Row};
use crate::error::{Error, Result};
use crate::metrics::StepMetrics;

/// DAPO overlong reward shaping (eq. 13) for a response of `len` tokens with
/// maximum length `max_len` (L) and buffer `buffer` (L_c):
/// 0 if len <= L - L_c; ((L - L_c) - len) / L_c inside the buffer; -1 beyond L.
pub fn overlong_penalty(len: usize, max_len: usize, buffer: usize) -> f64 {
    if buffer == 0 {
        return 0.0;
    }
    let free = max_len.saturating_sub(buffer);
    if len <= free {
        0.0
    } else if len <= max_len {
        (free as f64 - len as f64) / buffer as f64
    } else {
        -1.0
    }
}

/// Group-relative advantages (DeepSeekMath §4.1.2):
/// A_i = (r_i - mean(r)) / (std(r) + 1e-6), std unbiased (N - 1).
/// A group of one has mean 0 and std 1. Without `norm_by_std` (Dr. GRPO) A_i = r_i - mean(r).
pub fn group_advantages(rewards: &[f64], norm_by_std: bool) -> Vec<f64> {
    let n = rewards.len();
    let (mean, std) = if n < 2 {
        (0.0, 1.0)
    } else {
        let mean = rewards.iter().sum::<f64>() / n as f64;
        let var = rewards.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
        (mean, var.sqrt())
    };
    rewards
        .iter()
        .map(|r| if norm_by_std { (r - mean) / (std + 1e-6) } else { r - mean })
        .collect()
}

/// DAPO dynamic sampling (eq. 11) keeps a group only if its rewards are not all equal:
/// such a group has zero advantage everywhere and contributes no gradient.
pub fn has_reward_variance(rewards: &[f64]) -> bool {
    rewards.iter().any(|r| (r - rewards[0]).abs() > 1e-12)
}

/// Denominators of the aggregation, computed once for the whole mini-batch (or
/// the whole global batch across data-parallel ranks), so that the sum of the
/// per-micro-batch losses equals the loss of the mini-batch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Denominators {
    /// Response tokens in the mini-batch (`token-mean`).
    pub tokens: f64,
    /// Sequences in the mini-batch (`seq-mean-*`).
    pub seqs: f64,
    /// Constant generation budget (`seq-mean-token-sum-norm`).
    pub budget: f64,
}

/// Reduces per-token values `[B, T]` under `mask` `[B, T]` (1 = response token).
pub fn aggregate(values: &Tensor, mask: &Tensor, agg: LossAgg, d: Denominators) -> Tensor {
    let masked = values * mask;
    match agg {
        // DAPO eq. 12: every token of the batch weighs the same.
        LossAgg::TokenMean => masked.sum(Kind::Float) / d.tokens.max(1.0),
        // GRPO eq. 3: 1/G sum_i 1/|o_i| sum_t.
        LossAgg::SeqMeanTokenMean => {
            let per_seq = masked.sum_dim_intlist(1, false, Kind::Float) / mask.sum_dim_intlist(1, false, Kind::Float).clamp_min(1.0);
            per_seq.sum(Kind::Float) / d.seqs.max(1.0)
        }
        // Dr. GRPO eq. 3: token sums over a constant budget, averaged over sequences.
        LossAgg::SeqMeanTokenSumNorm => masked.sum(Kind::Float) / (d.seqs.max(1.0) * d.budget.max(1.0)),
    }
}

/// Per-token inputs of the policy loss, all `[B, T]` except `advantages` `[B]`.
#[derive(Debug)]
pub struct LossInputs<'a> {
    /// log pi_theta(o_t | q, o_<t), with gradient.
    pub logp: &'a Tensor,
    /// Behaviour log-probs (pi_theta_old: the actor's).
    pub old_logp: &'a Tensor,
    /// Proximal log-probs (decoupled PPO): the learner's weights at the start
    /// of the step, no gradient. `None`: plain PPO around the behaviour policy.
    pub prox_logp: Option<&'a Tensor>,
    /// Reference-policy log-probs; needed when `kl_coef > 0`.
    pub ref_logp: Option<&'a Tensor>,
    pub advantages: &'a Tensor,
    /// 1.0 on response tokens, 0.0 on prompt, environment and padding tokens.
    pub mask: &'a Tensor,
}

/// The loss of one micro-batch and detached statistics for logging.
#[derive(Debug)]
pub struct LossOutput {
    /// Scalar to call `backward` on.
    pub loss: Tensor,
    /// Aggregated policy-gradient term.
    pub pg: f64,
    /// Aggregated k3 KL (0 without a reference).
    pub kl: f64,
    /// Response tokens where clipping changed the objective.
    pub clipped_tokens: f64,
    /// Decoupled PPO's behaviour weights w = pi_prox / pi_behav over response
    /// tokens (zeros without `prox_logp`).
    pub weights: WeightStats,
}

/// Behaviour importance weights of one micro-batch, before the cap.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct WeightStats {
    /// Sum and maximum of the finite weights.
    pub sum: f64,
    pub max: f64,
    /// Tokens with a finite weight, and those above the cap (truncated or masked).
    pub tokens: f64,
    pub over_cap: f64,
    /// Tokens whose weight was not finite (masked: they never train).
    pub non_finite: f64,
}

impl WeightStats {
    pub fn add(&mut self, o: &WeightStats) {
        self.sum += o.sum;
        self.max = self.max.max(o.max);
        self.tokens += o.tokens;
        self.over_cap += o.over_cap;
        self.non_finite += o.non_finite;
    }
}

/// The behaviour weight w = exp(prox - behav) per token (AReaL eq. 5), capped
/// at `cap` by `mode`, with non-finite weights set to 0; and its statistics
/// over `mask`.
pub fn behaviour_weights(prox: &Tensor, behav: &Tensor, mask: &Tensor, cap: f64, mode: TisMode) -> (Tensor, WeightStats) {
    let w = (prox - behav).exp();
    let finite = w.isfinite().logical_and(&mask.gt(0.0));
    let w = w.where_self(&finite, &w.zeros_like());
    let over = w.gt(cap);
    let capped = match mode {
        TisMode::Truncate => w.clamp_max(cap),
        TisMode::Mask => w.where_self(&over.logical_not(), &w.zeros_like()),
    };
    let f = finite.to_kind(Kind::Float);
    let stats = WeightStats {
        sum: (&w * &f).sum(Kind::Float).double_value(&[]),
        max: (&w * &f).max().double_value(&[]),
        tokens: f.sum(Kind::Float).double_value(&[]),
        over_cap: (over.to_kind(Kind::Float) * &f).sum(Kind::Float).double_value(&[]),
        non_finite: (mask.gt(0.0).to_kind(Kind::Float) - &f).sum(Kind::Float).double_value(&[]),
    };
    (capped.detach(), stats)
}

/// The GRPO objective for one micro-batch.
pub fn grpo_loss(x: &LossInputs, cfg: &GrpoConfig, d: Denominators) -> LossOutput {
    let adv = x.advantages.to_kind(Kind::Float).unsqueeze(1);
    // Decoupled PPO (AReaL eq. 5): the trust region is around pi_prox and the
    // behaviour policy only weighs tokens: w = pi_prox / pi_behav, capped.
    let (anchor, weight, weights) = match x.prox_logp {
        None => (x.old_logp.shallow_clone(), None, WeightStats::default()),
        Some(prox) => {
            let (w, stats) = behaviour_weights(prox, x.old_logp, x.mask, cfg.tis_cap, cfg.tis_mode);
            // Where the weight is not finite the token is not trained; its ratio
            // is taken to itself so that no NaN reaches the backward pass.
            let usable = (prox - x.old_logp).exp().isfinite();
            (prox.where_self(&usable, &x.logp.detach()), Some(w), stats)
        }
    };
    // Importance ratio rho = exp(logp - logp_anchor); the log ratio is clamped to
    // [-20, 20] so a stale or corrupted behaviour log-prob cannot overflow exp.
    let ratio = (x.logp - &anchor).clamp(-20.0, 20.0).exp();
    // PPO eq. 7 written as a loss, with asymmetric clip range (DAPO eq. 10):
    // pg = max(-A * rho, -A * clip(rho, 1 - eps_low, 1 + eps_high)).
    let unclipped = -&adv * &ratio;
    let clipped = -&adv * ratio.clamp(1.0 - cfg.clip_low, 1.0 + cfg.clip_high);
    let mut pg = unclipped.maximum(&clipped);
    let mut clip_active = clipped.gt_tensor(&unclipped);
    // Dual clip (Ye et al. eq. 5): for A < 0 bound the loss by -A * c.
    if cfg.dual_clip > 0.0 {
        let bound = -&adv * cfg.dual_clip;
        let neg = adv.lt(0.0).expand_as(&pg);
        let dual_active = neg.logical_and(&pg.gt_tensor(&bound));
        clip_active = clip_active.logical_or(&dual_active);
        pg = pg.where_self(&dual_active.logical_not(), &bound.expand_as(&pg));
    }
    if let Some(w) = &weight {
        // A new tensor: in-place ops on autograd intermediates are what broke pg_loss.
        pg = &pg * w;
    }
    let pg_loss = aggregate(&pg, x.mask, cfg.loss_agg, d);
    // A new tensor, not `+=` on a shallow clone: that would add the KL term into
    // `pg_loss`'s own storage (and the logged pg would include it).
    let mut loss = pg_loss.shallow_clone();
    let mut kl_value = 0.0;
    if cfg.kl_coef > 0.0 {
        let ref_logp = x.ref_logp.expect("kl_coef > 0 needs reference log-probs");
        // k3 estimator (DeepSeekMath eq. 4): exp(ref - logp) - (ref - logp) - 1,
        // log ratio clamped to [-20, 20], result to [-10, 10].
        let log_r = (ref_logp - x.logp).clamp(-20.0, 20.0);
        let kl = (log_r.exp() - &log_r - 1.0).clamp(-10.0, 10.0);
        let kl_loss = aggregate(&kl, x.mask, cfg.loss_agg, d);
        kl_value = kl_loss.double_value(&[]);
        loss = &pg_loss + kl_loss * cfg.kl_coef;
    }
    let clipped_tokens = (clip_active.to_kind(Kind::Float) * x.mask).sum(Kind::Float).double_value(&[]);
    LossOutput { pg: pg_loss.double_value(&[]), loss, kl: kl_value, clipped_tokens, weights }
}

/// Shapes each rollout's reward and normalises it within its group: returns
/// one advantage per rollout (in group order) and how many rollouts are in
/// groups with a non-zero advantage.
/// `clip` > 0 clamps every advantage to [-clip, clip] after normalisation.
pub fn advantages(groups: &[Group], cfg: &GrpoConfig, max_len: usize, clip: f64) -> (Vec<f64>, usize) {
    let mut advantages = Vec::new();
    let mut effective = 0usize;
    for g in groups {
        // DAPO eq. 13: overlong shaping is added to the reward before normalisation.
        let shaped: Vec<f64> =
            g.rollouts.iter().map(|r| r.reward + overlong_penalty(r.response_tokens.len(), max_len, cfg.overlong_buffer)).collect();
        let mut adv = group_advantages(&shaped, cfg.norm_adv_by_std);
        if clip > 0.0 {
            adv.iter_mut().for_each(|a| *a = a.clamp(-clip, clip));
        }
        if adv.iter().any(|a| a.abs() > 1e-12) {
            effective += adv.len();
        }
        advantages.extend(adv);
    }
    (advantages, effective)
}

/// One training row per rollout with a response, carrying its advantage.
pub fn rows<'a>(groups: &'a [Group], advantages: &[f64]) -> Vec<Row<'a>> {
    groups
        .iter()
        .flat_map(|g| &g.rollouts)
        .zip(advantages)
        .filter(|(r, _)| !r.response_tokens.is_empty())
        .map(|(r, &a)| Row {
            prompt: &r.prompt_tokens,
            response: &r.response_tokens,
            old_logp: r.logprobs.as_deref(),
            loss_mask: &r.loss_mask,
            advantage: a,
        })
        .collect()
}

/// The GRPO update (eq. 3 with the options above): `epochs × mini_batches`
/// optimizer steps over this rank's rollouts, each mini-batch accumulated over
/// micro-batches whose losses share the mini-batch's global denominators.
#[derive(Debug, Clone)]
pub struct Grpo {
    cfg: GrpoConfig,
    /// Dr. GRPO's constant token budget.
    budget: f64,
    micro_batch_size: usize,
    max_grad_norm: f64,
    temperature: f64,
}

impl Grpo {
    pub fn new(job: &JobConfig, temperature: f64) -> Self {
        Grpo {
            cfg: job.grpo.clone(),
            budget: job.generation_budget() as f64,
            micro_batch_size: job.train.micro_batch_size,
            max_grad_norm: job.train.max_grad_norm,
            temperature,
        }
    }
}

impl Objective for Grpo {
    fn update(&mut self, engine: &mut Engine, s: &Scored<'_>, m: &mut StepMetrics) -> Result<()> {
        let c = &self.cfg;
        let rows = rows(s.groups, s.advantages);
        if let Some(r) = rows.iter().find(|r| r.old_logp.is_none()) {
            return Err(Error::Training(format!(
                "GRPO needs behaviour log-probs; a rollout ({} prompt tokens) has none",
                r.prompt.len()
            )));
        }
        let t0 = Instant::now();
        let (mut trained_tokens, mut clipped, mut updates) = (0.0, 0.0, 0usize);
        let device = engine.policy.device();
        engine.opt.cfg.lr = s.lr;
        // Exactly `mini_batches` parts on every rank (some may be empty), so
        // all ranks make the same collective calls; the same parts every epoch.
        let parts = split_even(&rows, c.mini_batches);
        // Decoupled PPO: pi_prox is the policy before this step's first update,
        // so its log-probs are taken now, for every micro-batch of every part.
        let prox: Vec<Vec<Tensor>> = if c.decoupled {
            parts
                .iter()
                .map(|mb| {
                    mb.chunks(self.micro_batch_size)
                        .map(|micro| {
                            let micro: Vec<&Row> = micro.iter().collect();
                            let batch = Batch::new(&micro, engine.pad, device);
                            tch::no_grad(|| Engine::logprobs(&engine.policy, &batch, self.temperature).logp)
                        })
                        .collect()
                })
                .collect()
        } else {
            Vec::new()
        };
        let mut weights = WeightStats::default();
        for _epoch in 0..c.epochs {
            for (part, mb) in parts.iter().enumerate() {
                let mut den = [mb.iter().map(|r| r.trained_tokens()).sum::<f64>(), mb.len() as f64];
                engine.all_reduce(&mut den)?;
                if den[1] == 0.0 {
                    continue;
                }
                let d = Denominators { tokens: den[0].max(1.0), seqs: den[1], budget: self.budget };
                let mut finite = true;
                let (mut pg, mut kl) = (0.0, 0.0);
                for (k, micro) in mb.chunks(self.micro_batch_size).enumerate() {
                    let micro: Vec<&Row> = micro.iter().collect();
                    let batch = Batch::new(&micro, engine.pad, device);
                    let logp = engine.train_logprobs(&batch, self.temperature);
                    let ref_logp = engine
                        .reference
                        .as_ref()
                        .map(|r| tch::no_grad(|| Engine::logprobs(r, &batch, self.temperature).logp));
                    let x = LossInputs {
                        logp: &logp.logp,
                        old_logp: &batch.old_logp,
                        prox_logp: prox.get(part).map(|p| &p[k]),
                        ref_logp: ref_logp.as_ref(),
                        advantages: &batch.advantages,
                        mask: &batch.mask,
                    };
                    let out = grpo_loss(&x, c, d);
                    let value = out.loss.double_value(&[]);
                    if !value.is_finite() {
                        finite = false;
                        break;
                    }
                    logp.backward(&engine.policy, &out.loss);
                    pg += out.pg;
                    kl += out.kl;
                    weights.add(&out.weights);
                    clipped += out.clipped_tokens;
                    trained_tokens += batch.tokens;
                }
                let report = engine.step(finite, self.max_grad_norm)?;
                let mut parts = [pg, kl];
                engine.all_reduce(&mut parts)?;
                if report.skipped {
                    m.skipped_updates += 1;
                    tracing::warn!(step = s.step, "non-finite loss or gradient: optimizer step skipped");
                } else {
                    updates += 1;
                    m.pg_loss += parts[0];
                    m.kl += parts[1];
                    m.grad_norm += report.grad_norm;
                }
            }
        }
        let mut tokens = [clipped, trained_tokens, weights.sum, weights.tokens, weights.over_cap, weights.non_finite];
        engine.all_reduce(&mut tokens)?;
        if c.decoupled {
            // The maximum over ranks, by summing one slot per rank.
            let (rank, world) = engine.rank();
            let mut maxes = vec![0.0; world];
            maxes[rank] = weights.max;
            engine.all_reduce(&mut maxes)?;
            m.behaviour_weight_mean = tokens[2] / tokens[3].max(1.0);
            m.behaviour_weight_max = maxes.iter().copied().fold(0.0, f64::max);
            m.behaviour_over_cap_fraction = tokens[4] / tokens[3].max(1.0);
            m.behaviour_non_finite = tokens[5] as u64;
        }
        let n = updates.max(1) as f64;
        m.pg_loss /= n;
        m.kl /= n;
        m.grad_norm /= n;
        m.clip_fraction = tokens[0] / tokens[1].max(1.0);
        m.train_tokens_per_s = tokens[1] / t0.elapsed().as_secs_f64().max(1e-9);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t2(rows: &[&[f64]]) -> Tensor {
        let flat: Vec<f32> = rows.iter().flat_map(|r| r.iter().map(|&x| x as f32)).collect();
        Tensor::from_slice(&flat).view([rows.len() as i64, rows[0].len() as i64])
    }

    #[test]
    fn advantages_by_hand() {
        // mean 0.5, unbiased std sqrt(1/3)
        let a = group_advantages(&[1.0, 0.0, 1.0, 0.0], true);
        let s = (1.0f64 / 3.0).sqrt();
        for (x, want) in a.iter().zip([0.5 / (s + 1e-6), -0.5 / (s + 1e-6), 0.5 / (s + 1e-6), -0.5 / (s + 1e-6)]) {
            assert!((x - want).abs() < 1e-12);
        }
        assert_eq!(group_advantages(&[1.0, 0.0], false), vec![0.5, -0.5]);
        assert_eq!(group_advantages(&[0.7], true), vec![0.7 / (1.0 + 1e-6)]);
        assert_eq!(group_advantages(&[1.0, 1.0, 1.0], true), vec![0.0; 3]);
        assert!(!has_reward_variance(&[1.0, 1.0]) && has_reward_variance(&[1.0, 0.0]));
    }

    #[test]
    fn overlong_shaping_by_hand() {
        // L = 20, L_c = 4: free up to 16.
        assert_eq!(overlong_penalty(10, 20, 4), 0.0);
        assert_eq!(overlong_penalty(16, 20, 4), 0.0);
        assert_eq!(overlong_penalty(18, 20, 4), -0.5);
        assert_eq!(overlong_penalty(20, 20, 4), -1.0);
        assert_eq!(overlong_penalty(21, 20, 4), -1.0);
        assert_eq!(overlong_penalty(21, 20, 0), 0.0);
    }

    fn cfg(agg: LossAgg) -> GrpoConfig {
        GrpoConfig { clip_low: 0.2, clip_high: 0.28, dual_clip: 3.0, loss_agg: agg, ..GrpoConfig::default() }
    }

    #[test]
    fn clipping_by_hand() {
        // One token per sequence; token-mean over 4 tokens.
        // A=+1, rho=1.5: max(-1.5, -1.28) = -1.28 (clipped)
        // A=+1, rho=0.5: max(-0.5, -0.8) = -0.5
        // A=-1, rho=5:   max(5, 1.28) = 5, dual clip min(5, 3) = 3 (clipped)
        // A=-1, rho=0.5: max(0.5, 0.8) = 0.8 (clipped)
        let old = t2(&[&[0.0], &[0.0], &[0.0], &[0.0]]);
        let logp = t2(&[&[1.5f64.ln()], &[0.5f64.ln()], &[5f64.ln()], &[0.5f64.ln()]]);
        let adv = Tensor::from_slice(&[1.0f32, 1.0, -1.0, -1.0]);
        let mask = Tensor::ones([4, 1], (Kind::Float, tch::Device::Cpu));
        let x = LossInputs { logp: &logp, old_logp: &old, prox_logp: None, ref_logp: None, advantages: &adv, mask: &mask };
        let d = Denominators { tokens: 4.0, seqs: 4.0, budget: 1.0 };
        let out = grpo_loss(&x, &cfg(LossAgg::TokenMean), d);
        let want = (-1.28 - 0.5 + 3.0 + 0.8) / 4.0;
        assert!((out.loss.double_value(&[]) - want).abs() < 1e-5, "{}", out.loss.double_value(&[]));
        assert_eq!(out.clipped_tokens, 3.0);
    }

    /// Independent scalar implementation of the whole objective, written from DESIGN.md.
    #[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
    /// With `prox`, decoupled PPO (DESIGN.md): the ratio is taken to pi_prox and
    /// each token weighs w = pi_prox / pi_behav, truncated or masked at the cap.
    /// Returns (pg, kl) aggregated.
    fn reference_loss(
        logp: &[Vec<f64>],
        old: &[Vec<f64>],
        prox: Option<&[Vec<f64>]>,
        refp: &[Vec<f64>],
        adv: &[f64],
        mask: &[Vec<f64>],
        c: &GrpoConfig,
        budget: f64,
    ) -> (f64, f64) {
        let per_token = |i: usize, t: usize| -> (f64, f64) {
            let anchor = prox.map_or(old[i][t], |p| p[i][t]);
            let rho = (logp[i][t] - anchor).clamp(-20.0, 20.0).exp();
            let a = adv[i];
            let mut pg = f64::max(-a * rho, -a * rho.clamp(1.0 - c.clip_low, 1.0 + c.clip_high));
            if a < 0.0 && c.dual_clip > 0.0 {
                pg = pg.min(-a * c.dual_clip);
            }
            if let Some(p) = prox {
                let w = (p[i][t] - old[i][t]).exp();
                let w = match c.tis_mode {
                    TisMode::Truncate => w.min(c.tis_cap),
                    TisMode::Mask if w > c.tis_cap => 0.0,
                    TisMode::Mask => w,
                };
                pg *= w;
            }
            let lr = (refp[i][t] - logp[i][t]).clamp(-20.0, 20.0);
            (pg, (lr.exp() - lr - 1.0).clamp(-10.0, 10.0))
        };
        let b = logp.len();
        let mut parts = [0.0; 2];
        for which in 0..2 {
            let pick = |i, t| if which == 0 { per_token(i, t).0 } else { per_token(i, t).1 };
            let value = match c.loss_agg {
                LossAgg::TokenMean => {
                    let (mut s, mut n) = (0.0, 0.0);
                    for i in 0..b {
                        for t in 0..logp[i].len() {
                            s += pick(i, t) * mask[i][t];
                            n += mask[i][t];
                        }
                    }
                    s / n
                }
                LossAgg::SeqMeanTokenMean => {
                    (0..b)
                        .map(|i| {
                            let s: f64 = (0..logp[i].len()).map(|t| pick(i, t) * mask[i][t]).sum();
                            s / mask[i].iter().sum::<f64>().max(1.0)
                        })
                        .sum::<f64>()
                        / b as f64
                }
                LossAgg::SeqMeanTokenSumNorm => {
                    (0..b).map(|i| (0..logp[i].len()).map(|t| pick(i, t) * mask[i][t]).sum::<f64>() / budget).sum::<f64>()
                        / b as f64
                }
            };
            parts[which] = value;
        }
        (parts[0], parts[1])
    }

    #[test]
    fn matches_independent_implementation_in_every_mode_and_split_into_micro_batches() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(42);
        let (b, t) = (6usize, 7usize);
        let mut gen = |scale: f64| -> Vec<Vec<f64>> {
            (0..b).map(|_| (0..t).map(|_| rng.gen_range(-scale..scale) - 1.0).collect()).collect()
        };
        let old = gen(1.0);
        let logp: Vec<Vec<f64>> = old.iter().map(|r| r.iter().map(|x| x + 0.0).collect()).collect();
        let logp: Vec<Vec<f64>> = logp.iter().zip(gen(0.6)).map(|(r, n)| r.iter().zip(n).map(|(x, y)| x + y + 1.0).collect()).collect();
        let refp = gen(1.0);
        let adv = [1.2, -0.7, 0.0, -2.0, 0.4, 1.0];
        let lens = [7usize, 3, 5, 1, 6, 4];
        let mask: Vec<Vec<f64>> = lens.iter().map(|&l| (0..t).map(|j| if j < l { 1.0 } else { 0.0 }).collect()).collect();
        let to_t = |v: &[Vec<f64>]| t2(&v.iter().map(|r| r.as_slice()).collect::<Vec<_>>());
        let budget = 9.0;
        for agg in [LossAgg::TokenMean, LossAgg::SeqMeanTokenMean, LossAgg::SeqMeanTokenSumNorm] {
            for kl_coef in [0.0, 0.1] {
                for dual_clip in [0.0, 3.0] {
                    let c = GrpoConfig { kl_coef, dual_clip, ..cfg(agg) };
                    let (want_pg, want_kl) = reference_loss(&logp, &old, None, &refp, &adv, &mask, &c, budget);
                    let want = want_pg + kl_coef * want_kl;
                    let d = Denominators { tokens: lens.iter().sum::<usize>() as f64, seqs: b as f64, budget };
                    // Whole batch, then two micro-batches of 4 + 2 rows: the sum must be the same.
                    let mut got = 0.0;
                    for (start, len) in [(0usize, 6usize), (0, 4), (4, 2)] {
                        let s = |v: &[Vec<f64>]| to_t(&v[start..start + len]);
                        let (lp, ol, rp, m) = (s(&logp), s(&old), s(&refp), s(&mask));
                        let a = Tensor::from_slice(&adv[start..start + len]).to_kind(Kind::Float);
                        let x = LossInputs { logp: &lp, old_logp: &ol, prox_logp: None, ref_logp: Some(&rp), advantages: &a, mask: &m };
                        let out = grpo_loss(&x, &c, d);
                        let v = out.loss.double_value(&[]);
                        if len == 6 {
                            assert!((v - want).abs() < 1e-5, "{agg:?} kl={kl_coef} dual={dual_clip}: {v} vs {want}");
                            // The logged parts are the parts: pg without the KL term.
                            assert!((out.pg - want_pg).abs() < 1e-5, "pg {} vs {want_pg} (kl_coef {kl_coef})", out.pg);
                            assert!((out.kl - if kl_coef > 0.0 { want_kl } else { 0.0 }).abs() < 1e-5);
                        } else {
                            got += v;
                        }
                    }
                    assert!((got - want).abs() < 1e-5, "micro-batches {agg:?}: {got} vs {want}");
                }
            }
        }
    }

    #[test]
    fn on_policy_gradient_is_advantage_weighted_score() {
        // At rho = 1 the surrogate's gradient w.r.t. logp is -A / denom per token.
        let logp = Tensor::from_slice(&[-1.0f32, -2.0, -0.5]).view([1, 3]).set_requires_grad(true);
        let old = logp.detach();
        let adv = Tensor::from_slice(&[2.0f32]);
        let mask = Tensor::from_slice(&[1.0f32, 1.0, 0.0]).view([1, 3]);
        let x = LossInputs { logp: &logp, old_logp: &old, prox_logp: None, ref_logp: None, advantages: &adv, mask: &mask };
        let out = grpo_loss(&x, &cfg(LossAgg::TokenMean), Denominators { tokens: 2.0, seqs: 1.0, budget: 1.0 });
        out.loss.backward();
        let g = Vec::<f32>::try_from(&logp.grad().view([-1])).unwrap();
        assert_eq!(g, vec![-1.0, -1.0, 0.0]);
    }

    /// Decoupled PPO against the scalar reference in every aggregation mode,
    /// truncated and masked at the cap; and with pi_prox = pi_behav it is
    /// plain GRPO, in value and in gradient.
    #[test]
    fn decoupled_ppo_matches_the_reference_and_is_grpo_when_behaviour_is_proximal() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let (b, t) = (5usize, 6usize);
        let mut gen = |scale: f64| -> Vec<Vec<f64>> { (0..b).map(|_| (0..t).map(|_| rng.gen_range(-scale..scale)).collect()).collect() };
        let old: Vec<Vec<f64>> = gen(1.0).iter().map(|r| r.iter().map(|x| x - 1.5).collect()).collect();
        let shift = |base: &[Vec<f64>], noise: Vec<Vec<f64>>| -> Vec<Vec<f64>> {
            base.iter().zip(noise).map(|(r, n)| r.iter().zip(n).map(|(x, y)| x + y).collect()).collect()
        };
        let prox = shift(&old, gen(0.9));
        let logp = shift(&prox, gen(0.4));
        let adv = [1.1, -0.6, 0.3, -1.7, 0.9];
        let lens = [6usize, 2, 4, 5, 3];
        let mask: Vec<Vec<f64>> = lens.iter().map(|&l| (0..t).map(|j| if j < l { 1.0 } else { 0.0 }).collect()).collect();
        let to_t = |v: &[Vec<f64>]| t2(&v.iter().map(|r| r.as_slice()).collect::<Vec<_>>());
        let (lp, ol, px, m) = (to_t(&logp), to_t(&old), to_t(&prox), to_t(&mask));
        let a = Tensor::from_slice(&adv).to_kind(Kind::Float);
        let d = Denominators { tokens: lens.iter().sum::<usize>() as f64, seqs: b as f64, budget: 8.0 };
        let cap = 1.5;
        let mut over = 0.0;
        for i in 0..b {
            for j in 0..lens[i] {
                over += f64::from((prox[i][j] - old[i][j]).exp() > cap);
            }
        }
        assert!(over > 0.0, "the test data must cross the cap");
        for mode in [TisMode::Truncate, TisMode::Mask] {
            for agg in [LossAgg::TokenMean, LossAgg::SeqMeanTokenMean, LossAgg::SeqMeanTokenSumNorm] {
                let c = GrpoConfig { decoupled: true, tis_cap: cap, tis_mode: mode, ..cfg(agg) };
                let (want, _) = reference_loss(&logp, &old, Some(&prox), &old, &adv, &mask, &c, 8.0);
                let x = LossInputs { logp: &lp, old_logp: &ol, prox_logp: Some(&px), ref_logp: None, advantages: &a, mask: &m };
                let out = grpo_loss(&x, &c, d);
                assert!((out.pg - want).abs() < 1e-5, "{mode:?} {agg:?}: {} vs {want}", out.pg);
                assert_eq!(out.weights.over_cap, over);
                assert_eq!(out.weights.tokens, d.tokens);
                assert_eq!(out.weights.non_finite, 0.0);
            }
        }
        // pi_prox = pi_behav: every weight is 1 and the loss is GRPO's.
        for agg in [LossAgg::TokenMean, LossAgg::SeqMeanTokenMean] {
            let grad_of = |prox: Option<&Tensor>| {
                let lp = to_t(&logp).set_requires_grad(true);
                let c = GrpoConfig { decoupled: prox.is_some(), ..cfg(agg) };
                let x = LossInputs { logp: &lp, old_logp: &ol, prox_logp: prox, ref_logp: None, advantages: &a, mask: &m };
                let out = grpo_loss(&x, &c, d);
                out.loss.backward();
                (out.loss.double_value(&[]), lp.grad())
            };
            let (plain, g_plain) = grad_of(None);
            let (decoupled, g_dec) = grad_of(Some(&ol));
            assert!((plain - decoupled).abs() < 1e-6, "{plain} vs {decoupled}");
            assert!(g_plain.allclose(&g_dec, 1e-6, 1e-7, false), "gradients differ");
        }
    }

    /// A weight that is not finite (a NaN or infinite log-prob) is counted and
    /// its token gets no gradient.
    #[test]
    fn non_finite_behaviour_weights_are_counted_and_never_trained() {
        let logp = Tensor::from_slice(&[-1.0f32, -1.2, -0.7]).view([1, 3]).set_requires_grad(true);
        let old = Tensor::from_slice(&[-1.0f32, f32::NEG_INFINITY, -0.9]).view([1, 3]);
        let prox = Tensor::from_slice(&[-1.1f32, -1.0, f32::NAN]).view([1, 3]);
        let adv = Tensor::from_slice(&[1.0f32]);
        let mask = Tensor::ones([1, 3], (Kind::Float, tch::Device::Cpu));
        let c = GrpoConfig { decoupled: true, ..cfg(LossAgg::TokenMean) };
        let x = LossInputs { logp: &logp, old_logp: &old, prox_logp: Some(&prox), ref_logp: None, advantages: &adv, mask: &mask };
        let out = grpo_loss(&x, &c, Denominators { tokens: 3.0, seqs: 1.0, budget: 1.0 });
        assert_eq!((out.weights.non_finite, out.weights.tokens), (2.0, 1.0));
        assert!(out.loss.double_value(&[]).is_finite());
        out.loss.backward();
        let g: Vec<f32> = Vec::try_from(logp.grad().view([-1])).unwrap();
        assert!(g[0] != 0.0 && g[1] == 0.0 && g[2] == 0.0, "{g:?}");
    }

    /// One success in a group of 93 has advantage ~9.5 unclipped; clipped at 5.
    #[test]
    fn advantage_clip_bounds_knapsack_sized_groups() {
        let rollout = super::super::scored_rollout;
        let group = Group { prompt_id: 0, work_id: 0, rollouts: (0..93).map(|i| rollout(f64::from(i == 0))).collect(), trace: None, generate_s: 0.0 };
        let c = GrpoConfig::default();
        let (raw, _) = advantages(std::slice::from_ref(&group), &c, 16, 0.0);
        assert!((raw[0] - 92.0 / 93f64.sqrt()).abs() < 1e-3, "{}", raw[0]);
        let (clipped, effective) = advantages(std::slice::from_ref(&group), &c, 16, 5.0);
        assert_eq!(clipped[0], 5.0);
        assert_eq!(clipped[1..], raw[1..], "the failures' advantages are inside the clip");
        assert_eq!(effective, 93);
        // Default: on with knapsack budgets, off otherwise; an explicit value wins.
        let job = |extra: &str| JobConfig::from_toml(&format!("[model]\npreset = \"tiny\"\n[task]\nkind = \"arithmetic\"\n{extra}")).unwrap();
        assert_eq!(job("").advantage_clip(), 0.0);
        assert_eq!(job("[budget]\nstrategy = \"knapsack\"").advantage_clip(), 5.0);
        assert_eq!(job("[budget]\nstrategy = \"knapsack\"\n[grpo]\nadvantage_clip = 0.0").advantage_clip(), 0.0);
        assert_eq!(job("[grpo]\nadvantage_clip = 3.0").advantage_clip(), 3.0);
    }
}
