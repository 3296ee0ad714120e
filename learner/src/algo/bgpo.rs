//! BGPO — Boundary-Guided Policy Optimization (arXiv 2510.11683), memory-constant
//! RL for masked diffusion LMs (DESIGN.md, "BGPO").
//!
//! A diffusion policy has no tractable sequence likelihood, so the importance
//! ratio uses the ELBO B̂ = (1/n) Σ_j l_j estimated with n Monte Carlo samples
//! (`sluice_model::diffusion::elbo`). The exact objective of a rollout with
//! advantage A is exp(B̂_θ − B̂_old)·A, whose gradient needs all n samples in one
//! graph. BGPO maximises a lower bound made of per-sample terms (paper eq. 8–9):
//!
//! ```text
//! d_j = l_j(θ) − l_j(θ_old)                      (same masked sample for both)
//! A ≥ 0:  g_j = (1 + d_j) · A / n                (1 + x ≤ eˣ, eq. 8)
//! A < 0:  g_j = exp(d_j) · A / n                 (Jensen, eq. 9)
//! loss = −(1/G) Σ_i Σ_j g_ij
//! ```
//!
//! Each g_j depends on one sample, so `backward` runs once per sample and the
//! gradients accumulate: peak memory is one sample's graph whatever n is. On
//! policy (d_j = 0) the bound's value and gradient equal the exact objective's.
//! [`exact_backward`] is the exact-ratio objective, kept only to compare against.

use std::time::Instant;

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sluice_core::config::JobConfig;
use sluice_model::diffusion::{elbo, McSample};
use sluice_model::model::Model;
use tch::{Kind, Tensor};

use super::{Objective, Scored};
use crate::engine::{rng_for, Engine};
use crate::error::Result;
use crate::metrics::StepMetrics;

/// Largest d_j used in exp(d_j): beyond it the sample's ratio is clamped (and counted).
pub const MAX_LOG_RATIO: f64 = 20.0;

/// One rollout in a BGPO update: its tokens, advantage and weight in the
/// loss (1/G of its group, divided by the number of groups).
#[derive(Debug, Clone)]
pub struct Sequence {
    pub prompt: Vec<i64>,
    pub response: Vec<i64>,
    pub advantage: f64,
    pub weight: f64,
}

/// What one update did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    /// Σ weight · Σ_j g_j: the bound's value (the exact objective's for [`exact_backward`]).
    pub objective: f64,
    /// Monte Carlo samples per rollout.
    pub samples: usize,
    /// (rollout, sample) terms whose d_j was clamped to [`MAX_LOG_RATIO`].
    pub clamped: usize,
    /// Terms left out because d_j was not finite.
    pub skipped: usize,
}

/// `n` samples per sequence, shared by θ and θ_old: `[n][B]`.
pub fn draw(seqs: &[Sequence], n: usize, rng: &mut ChaCha8Rng) -> Vec<Vec<McSample>> {
    (0..n).map(|_| seqs.iter().map(|s| McSample::draw(s.response.len(), rng)).collect()).collect()
}

/// [`draw`] with each sequence's samples from its own stream, keyed by `key`
/// and the sequence's tokens: the same rollout gets the same masks however the
/// batch is split across data-parallel ranks or micro-batches.
pub fn draw_keyed(seqs: &[Sequence], n: usize, key: u64) -> Vec<Vec<McSample>> {
    let per_seq: Vec<Vec<McSample>> = seqs
        .iter()
        .map(|s| {
            let h = s.prompt.iter().chain([&-1]).chain(&s.response).fold(key ^ 0xcbf2_9ce4_8422_2325, |h, &t| {
                (h ^ t as u64).wrapping_mul(0x0100_0000_01b3)
            });
            let mut rng = ChaCha8Rng::seed_from_u64(h);
            (0..n).map(|_| McSample::draw(s.response.len(), &mut rng)).collect()
        })
        .collect();
    (0..n).map(|j| per_seq.iter().map(|s| s[j].clone()).collect()).collect()
}

fn parts(seqs: &[Sequence]) -> (Vec<Vec<i64>>, Vec<Vec<i64>>) {
    (seqs.iter().map(|s| s.prompt.clone()).collect(), seqs.iter().map(|s| s.response.clone()).collect())
}

fn column(seqs: &[Sequence], f: impl Fn(&Sequence) -> f64, like: &Tensor) -> Tensor {
    let v: Vec<f32> = seqs.iter().map(|s| f(s) as f32).collect();
    Tensor::from_slice(&v).to(like.device())
}

/// l_j(θ_old) of every sample, without a graph (θ_old = `old`): `[n]` tensors `[B]`.
pub fn old_elbos(old: &Model, seqs: &[Sequence], samples: &[Vec<McSample>], pad: i64) -> Result<Vec<Tensor>> {
    let _g = tch::no_grad_guard();
    let (prompts, responses) = parts(seqs);
    samples
        .iter()
        .map(|s| Ok(elbo(old, &prompts, &responses, &s.iter().collect::<Vec<_>>(), pad)?.detach()))
        .collect()
}

/// The per-sample bound g_j (eq. 8–9) for log-ratios `d` `[B]` and advantages `[B]`.
pub fn bound_terms(d: &Tensor, advantage: &Tensor, n: usize) -> Tensor {
    let n = n as f64;
    let linear = (d + 1.0) * advantage / n;
    let exponential = d.exp() * advantage / n;
    linear.where_self(&advantage.ge(0.0), &exponential)
}

/// BGPO: accumulates the gradient of −Σ weight · Σ_j g_j into `model`'s
/// parameters, one backward pass per Monte Carlo sample.
pub fn bgpo_backward(model: &Model, seqs: &[Sequence], samples: &[Vec<McSample>], old: &[Tensor], pad: i64) -> Result<Report> {
    let (prompts, responses) = parts(seqs);
    let n = samples.len();
    let mut report = Report { samples: n, ..Report::default() };
    for (s, old_l) in samples.iter().zip(old) {
        let l = elbo(model, &prompts, &responses, &s.iter().collect::<Vec<_>>(), pad)?;
        let d = &l - old_l;
        let finite = d.isfinite();
        report.skipped += (seqs.len() as i64 - finite.sum(Kind::Int64).int64_value(&[])) as usize;
        let over = d.gt(MAX_LOG_RATIO).logical_and(&finite);
        report.clamped += over.sum(Kind::Int64).int64_value(&[]) as usize;
        // Non-finite terms get weight 0 (and d = 0, so no NaN reaches the graph).
        let d = d.where_self(&finite, &d.zeros_like()).clamp_max(MAX_LOG_RATIO);
        let weight = column(seqs, |q| q.weight, &l) * finite.to_kind(Kind::Float);
        let g = bound_terms(&d, &column(seqs, |q| q.advantage, &l), n) * weight;
        let objective = g.sum(Kind::Float);
        report.objective += objective.double_value(&[]);
        (-objective).backward();
    }
    Ok(report)
}

/// The exact-ratio objective exp(B̂_θ − B̂_old)·A with all n samples in one graph
/// (its memory grows with n). Only for comparison with [`bgpo_backward`].
pub fn exact_backward(model: &Model, seqs: &[Sequence], samples: &[Vec<McSample>], old: &[Tensor], pad: i64) -> Result<Report> {
    let (prompts, responses) = parts(seqs);
    let n = samples.len() as f64;
    let mut b_theta: Option<Tensor> = None;
    for s in samples {
        let l = elbo(model, &prompts, &responses, &s.iter().collect::<Vec<_>>(), pad)?;
        b_theta = Some(match b_theta {
            Some(acc) => acc + l,
            None => l,
        });
    }
    let b_theta = b_theta.expect("n >= 1") / n;
    let b_old = Tensor::stack(old, 0).sum_dim_intlist([0i64].as_slice(), false, Kind::Float) / n;
    let d = (&b_theta - b_old).clamp_max(MAX_LOG_RATIO);
    let value = d.exp() * column(seqs, |q| q.advantage, &b_theta) * column(seqs, |q| q.weight, &b_theta);
    let objective = value.sum(Kind::Float);
    let report = Report { objective: objective.double_value(&[]), samples: samples.len(), ..Report::default() };
    (-objective).backward();
    Ok(report)
}

/// The BGPO update: θ_old is the policy at the start of the step (as when old
/// log-probs are recomputed on the learner); each micro-batch draws its Monte
/// Carlo samples keyed by (seed, step, rollout), computes l_j(θ_old) without a
/// graph, and runs one backward pass per sample; then one engine step.
/// `clip_fraction` reports the share of clamped or skipped terms.
#[derive(Debug, Clone)]
pub struct Bgpo {
    mc_samples: usize,
    micro_batch_size: usize,
    max_grad_norm: f64,
}

impl Bgpo {
    pub fn new(job: &JobConfig) -> Self {
        Bgpo {
            mc_samples: job.bgpo.mc_samples,
            micro_batch_size: job.train.micro_batch_size.max(1),
            max_grad_norm: job.train.max_grad_norm,
        }
    }
}

impl Objective for Bgpo {
    fn update(&mut self, engine: &mut Engine, s: &Scored<'_>, m: &mut StepMetrics) -> Result<()> {
        let n = self.mc_samples;
        let mut adv = s.advantages.iter();
        let mut seqs = Vec::new();
        for g in s.groups {
            let weight = 1.0 / (g.rollouts.len() as f64 * s.n_groups.max(1.0));
            for r in &g.rollouts {
                let advantage = *adv.next().expect("one advantage per rollout");
                if !r.response_tokens.is_empty() {
                    seqs.push(Sequence { prompt: r.prompt_tokens.clone(), response: r.response_tokens.clone(), advantage, weight });
                }
            }
        }
        let t0 = Instant::now();
        // Samples keyed by (seed, step, rollout): independent of how the batch
        // is split over ranks and micro-batches.
        let key = rng_for(s.seed, 2, s.step).next_u64();
        engine.opt.cfg.lr = s.lr;
        let (mut objective, mut odd, mut finite) = (0.0, 0usize, true);
        for chunk in seqs.chunks(self.micro_batch_size) {
            let model = engine.policy.model();
            let samples = draw_keyed(chunk, n, key);
            let old = old_elbos(model, chunk, &samples, engine.pad)?;
            let r = bgpo_backward(model, chunk, &samples, &old, engine.pad)?;
            if !r.objective.is_finite() {
                finite = false;
                break;
            }
            objective += r.objective;
            odd += r.clamped + r.skipped;
        }
        let report = engine.step(finite, self.max_grad_norm)?;
        let tokens: usize = seqs.iter().map(|s| s.response.len()).sum();
        let mut parts = [objective, odd as f64, (seqs.len() * n) as f64, (tokens * n) as f64];
        engine.all_reduce(&mut parts)?;
        if report.skipped {
            m.skipped_updates = 1;
            tracing::warn!(step = s.step, "non-finite BGPO objective or gradient: optimizer step skipped");
        } else {
            m.pg_loss = -parts[0];
            m.grad_norm = report.grad_norm;
        }
        m.clip_fraction = parts[1] / parts[2].max(1.0);
        m.train_tokens_per_s = parts[3] / t0.elapsed().as_secs_f64().max(1e-9);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::algo::grpo::group_advantages;
    use crate::optim::{AdamW, AdamWConfig};
    use rand::Rng;
    use sluice_model::diffusion::{generate, DiffusionSampling};
    use sluice_model::model::ModelConfig;
    use tch::{nn, Device};

    const PAD: i64 = 0;

    fn policy(seed: i64) -> (nn::VarStore, Model) {
        let vs = nn::VarStore::new(Device::Cpu);
        let mut c = ModelConfig::preset("tiny-diffusion", 20).unwrap();
        c.pad_token_id = Some(PAD);
        let m = Model::new(&vs.root(), &c);
        sluice_model::model::init_parameters(&vs, seed as u64);
        (vs, m)
    }

    fn grads(vs: &nn::VarStore) -> Vec<Tensor> {
        let mut v: Vec<_> = vs.variables().into_iter().collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v.into_iter().map(|(_, t)| t.grad().copy()).collect()
    }

    fn zero(vs: &nn::VarStore) {
        for (_, t) in vs.variables() {
            let mut g = t.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
    }

    fn sequences(rng: &mut ChaCha8Rng) -> Vec<Sequence> {
        (0..6)
            .map(|i| Sequence {
                prompt: (0..2 + i % 3).map(|_| rng.gen_range(3..20)).collect(),
                response: (0..5).map(|_| rng.gen_range(3..20)).collect(),
                advantage: if i % 2 == 0 { 1.3 - i as f64 * 0.2 } else { -0.7 - i as f64 * 0.1 },
                weight: 1.0 / 6.0,
            })
            .collect()
    }

    #[test]
    fn on_policy_the_bound_and_its_gradient_equal_the_exact_objective() {
        let (vs, m) = policy(11);
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let seqs = sequences(&mut rng);
        let samples = draw(&seqs, 4, &mut rng);
        let old = old_elbos(&m, &seqs, &samples, PAD).unwrap();
        zero(&vs);
        let b = bgpo_backward(&m, &seqs, &samples, &old, PAD).unwrap();
        let gb = grads(&vs);
        zero(&vs);
        let e = exact_backward(&m, &seqs, &samples, &old, PAD).unwrap();
        let ge = grads(&vs);
        let want: f64 = seqs.iter().map(|s| s.weight * s.advantage).sum();
        assert!((b.objective - want).abs() < 1e-5 && (e.objective - want).abs() < 1e-5, "{b:?} {e:?} vs {want}");
        let mut norm = 0.0;
        for (x, y) in gb.iter().zip(&ge) {
            let diff = (x - y).abs().max().double_value(&[]);
            let scale = y.abs().max().double_value(&[]).max(1e-6);
            norm += scale;
            assert!(diff <= 1e-4 * scale + 1e-7, "gradients differ by {diff} (scale {scale})");
        }
        assert!(norm > 1e-3, "the gradient is not trivially zero");
    }

    #[test]
    fn off_policy_the_bound_never_exceeds_the_exact_objective() {
        let mut rng = ChaCha8Rng::seed_from_u64(8);
        for _ in 0..500 {
            let n = rng.gen_range(1..=16usize);
            let a = rng.gen_range(-3.0..3.0f64);
            let d: Vec<f32> = (0..n).map(|_| rng.gen_range(-4.0..4.0f32)).collect();
            let dt = Tensor::from_slice(&d);
            let bound = bound_terms(&dt, &Tensor::from_slice(&vec![a as f32; n]), n).sum(Kind::Float).double_value(&[]);
            let exact = (d.iter().map(|&x| x as f64).sum::<f64>() / n as f64).exp() * a;
            assert!(bound <= exact + 1e-4 * exact.abs().max(1.0), "n {n}, A {a}, d {d:?}: bound {bound} > exact {exact}");
        }
        // With real models: θ and θ_old differ.
        let (_v1, m) = policy(21);
        let (_v2, old_m) = policy(22);
        let seqs = sequences(&mut rng);
        let samples = draw(&seqs, 8, &mut rng);
        let old = old_elbos(&old_m, &seqs, &samples, PAD).unwrap();
        let b = bgpo_backward(&m, &seqs, &samples, &old, PAD).unwrap();
        let e = exact_backward(&m, &seqs, &samples, &old, PAD).unwrap();
        assert!(b.objective <= e.objective + 1e-6, "{b:?} vs {e:?}");
    }

    #[test]
    fn non_finite_log_ratios_are_skipped_and_counted() {
        let (vs, m) = policy(31);
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let seqs = sequences(&mut rng);
        let samples = draw(&seqs, 2, &mut rng);
        let old = old_elbos(&m, &seqs, &samples, PAD).unwrap();
        let _ = old[0].get(0).fill_(f64::NAN);
        let _ = old[1].get(1).fill_(-1e6); // d_j = +1e6: exp would overflow
        zero(&vs);
        let r = bgpo_backward(&m, &seqs, &samples, &old, PAD).unwrap();
        assert_eq!((r.skipped, r.clamped), (1, 1), "{r:?}");
        assert!(r.objective.is_finite());
        assert!(grads(&vs).iter().all(|g| g.isfinite().all().int64_value(&[]) == 1), "no NaN reaches the gradient");
    }

    #[test]
    fn a_tiny_diffusion_policy_learns_under_bgpo() {
        // Synthetic task: reward = share of response tokens equal to 7.
        let (vs, m) = policy(41);
        let mut opt = AdamW::new(vs.variables().into_iter().collect(), AdamWConfig { lr: 3e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 });
        let sampling = DiffusionSampling { gen_length: 4, steps: 4, block_length: 2, temperature: 1.0 };
        let mut rng = ChaCha8Rng::seed_from_u64(12);
        let mut curve = Vec::new();
        for _ in 0..40 {
            let prompts: Vec<Vec<i64>> = (0..4).map(|k| vec![3 + k, 4]).collect();
            let mut seqs = Vec::new();
            let mut mean = 0.0;
            for p in &prompts {
                let group = vec![p.clone(); 8];
                let ys = generate(&m, &group, &sampling, PAD, &mut rng).unwrap();
                let rewards: Vec<f64> = ys.iter().map(|y| y.iter().filter(|&&t| t == 7).count() as f64 / 4.0).collect();
                mean += rewards.iter().sum::<f64>() / 32.0;
                for (y, a) in ys.into_iter().zip(group_advantages(&rewards, true)) {
                    seqs.push(Sequence { prompt: p.clone(), response: y, advantage: a, weight: 1.0 / 32.0 });
                }
            }
            curve.push(mean);
            let samples = draw(&seqs, 4, &mut rng);
            let old = old_elbos(&m, &seqs, &samples, PAD).unwrap();
            opt.zero_grad();
            bgpo_backward(&m, &seqs, &samples, &old, PAD).unwrap();
            opt.step(1.0);
        }
        let first: f64 = curve[..5].iter().sum::<f64>() / 5.0;
        let last: f64 = curve[curve.len() - 5..].iter().sum::<f64>() / 5.0;
        assert!(last > first + 0.25, "reward {first:.3} → {last:.3}: {curve:?}");
    }
}
