//! Masked diffusion language models (LLaDA style) on the decoder's blocks.
//!
//! A diffusion policy is a [`Model`] whose config names a mask token
//! (`mask_token_id`); it attends bidirectionally over prompt + response and
//! predicts the original token at every masked position. This module holds what
//! is specific to it:
//!
//! * [`logits`]: the bidirectional forward pass over a left-padded batch;
//! * [`generate`]: the sampler — a fixed response length starts fully masked and
//!   is revealed block by block (semi-autoregressive), each step unmasking the
//!   sampled tokens the model is most confident about (low-confidence remasking);
//! * [`McSample`] / [`elbo`]: the Monte Carlo ELBO estimator BGPO uses
//!   (DESIGN.md, BGPO): per sample j, t_j ~ U(0, 1], every response token masked
//!   with probability t_j (the prompt never), and
//!   l_j(θ) = (1/t_j) Σ_{masked i} log p_θ(y^i | y_t, x).
//!
//! All randomness comes from a caller-owned `ChaCha8Rng`, never libtorch's RNG.

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use tch::{Device, Kind, Tensor};

pub use sluice_core::sampling::DiffusionSampling;

use crate::error::{Error, Result};
use crate::model::Model;

/// The mask token of a diffusion policy.
pub fn mask_id(model: &Model) -> Result<i64> {
    model
        .config()
        .mask_token_id
        .ok_or_else(|| Error::config("model", "not a diffusion policy (its config has no mask_token_id)"))
}

/// Left-pads `seqs` with `pad` into `[B, T]` ids and a `[B, T]` validity mask.
fn left_pad(seqs: &[Vec<i64>], pad: i64, device: Device) -> (Tensor, Tensor) {
    let t = seqs.iter().map(Vec::len).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(seqs.len() * t);
    let mut valid = Vec::with_capacity(seqs.len() * t);
    for s in seqs {
        ids.extend(std::iter::repeat_n(pad, t - s.len()).chain(s.iter().copied()));
        valid.extend(std::iter::repeat_n(false, t - s.len()).chain(std::iter::repeat_n(true, s.len())));
    }
    let b = seqs.len() as i64;
    (
        Tensor::from_slice(&ids).view([b, t as i64]).to(device),
        Tensor::from_slice(&valid).view([b, t as i64]).to(device),
    )
}

/// Bidirectional logits `[B, T, V]` of `ids` `[B, T]`; `valid` `[B, T]` marks
/// real tokens (left padding is false and is never attended to).
pub fn logits(model: &Model, ids: &Tensor, valid: &Tensor) -> Tensor {
    let (b, t) = ids.size2().expect("ids is [B, T]");
    let positions = (valid.to_kind(Kind::Int64).cumsum(1, Kind::Int64) - 1).clamp_min(0);
    let attend = valid.view([b, 1, 1, t]).expand([b, 1, t, t], false);
    model.logits(&model.hidden(ids, &positions, Some(&attend), None))
}

/// Samples one response per prompt (each `gen_length` tokens, no mask left).
pub fn generate(model: &Model, prompts: &[Vec<i64>], p: &DiffusionSampling, pad: i64, rng: &mut ChaCha8Rng) -> Result<Vec<Vec<i64>>> {
    p.validate("diffusion")?;
    let mask = mask_id(model)?;
    let device = model.device();
    let l = p.gen_length as i64;
    let full: Vec<Vec<i64>> = prompts.iter().map(|q| q.iter().copied().chain(std::iter::repeat_n(mask, p.gen_length)).collect()).collect();
    let (mut x, valid) = left_pad(&full, pad, device);
    let (b, t) = x.size2().expect("[B, T]");
    let start = t - l;
    let blocks = p.gen_length / p.block_length;
    let per_block = (p.steps / blocks) as i64;
    let _guard = tch::no_grad_guard();
    for blk in 0..blocks as i64 {
        let (lo, hi) = (start + blk * p.block_length as i64, start + (blk + 1) * p.block_length as i64);
        for step in 0..per_block {
            let still = x.narrow(1, lo, hi - lo).eq(mask); // [B, Lb]
            // Reveal the block's masked tokens evenly over its remaining steps.
            let left = still.sum_dim_intlist([1i64].as_slice(), false, Kind::Int64);
            let k = (left + (per_block - step - 1)) / (per_block - step); // ceil
            let logits = logits(model, &x, &valid).narrow(1, lo, hi - lo).to_kind(Kind::Float);
            let (tokens, conf) = sample(&logits, p.temperature, rng);
            let conf = conf.masked_fill(&still.logical_not(), f64::NEG_INFINITY);
            // The k most confident masked positions of each row take their samples.
            let order = conf.argsort(-1, true);
            let rank = order.argsort(-1, false);
            let chosen = rank.lt_tensor(&k.unsqueeze(1)).logical_and(&still);
            let block = x.narrow(1, lo, hi - lo);
            let updated = block.where_self(&chosen.logical_not(), &tokens);
            x = Tensor::cat(&[x.narrow(1, 0, lo), updated, x.narrow(1, hi, t - hi)], 1);
        }
    }
    let out = x.narrow(1, start, l).to_device(Device::Cpu).contiguous();
    let flat: Vec<i64> = Vec::<i64>::try_from(out.view([-1])).map_err(|e| Error::config("diffusion", e.to_string()))?;
    Ok(flat.chunks(p.gen_length).take(b as usize).map(<[i64]>::to_vec).collect())
}

/// Per position: a token sampled from `softmax(logits / T)` (argmax at T = 0)
/// with uniforms from `rng`, and its probability (the confidence).
fn sample(logits: &Tensor, temperature: f64, rng: &mut ChaCha8Rng) -> (Tensor, Tensor) {
    let (b, n, _) = logits.size3().expect("[B, L, V]");
    if temperature <= 0.0 {
        let probs = logits.softmax(-1, Kind::Float);
        let (conf, tokens) = probs.max_dim(-1, false);
        return (tokens, conf);
    }
    let probs = (logits / temperature).softmax(-1, Kind::Float);
    let u: Vec<f32> = (0..b * n).map(|_| rng.gen::<f32>()).collect();
    let u = Tensor::from_slice(&u).view([b, n, 1]).to(logits.device());
    let cdf = probs.cumsum(-1, Kind::Float);
    let v = probs.size()[2];
    let tokens = cdf.lt_tensor(&u).sum_dim_intlist([-1i64].as_slice(), false, Kind::Int64).clamp_max(v - 1);
    let conf = probs.gather(-1, &tokens.unsqueeze(-1), false).squeeze_dim(-1);
    (tokens, conf)
}

/// One Monte Carlo sample of the ELBO for one response: the time t ∈ (0, 1]
/// and which response tokens are masked.
#[derive(Debug, Clone, PartialEq)]
pub struct McSample {
    pub t: f64,
    pub masked: Vec<bool>,
}

impl McSample {
    /// t ~ U(0, 1]; each of `len` response tokens masked with probability t.
    pub fn draw(len: usize, rng: &mut ChaCha8Rng) -> McSample {
        let t = 1.0 - rng.gen::<f64>(); // (0, 1]
        McSample { t, masked: (0..len).map(|_| rng.gen::<f64>() < t).collect() }
    }
}

/// l_j for a batch of (prompt, response) pairs and one sample each:
/// `[B]` = (1/t) Σ_{masked i} log p(y^i | y_t, x), differentiable in the model.
pub fn elbo(model: &Model, prompts: &[Vec<i64>], responses: &[Vec<i64>], samples: &[&McSample], pad: i64) -> Result<Tensor> {
    let mask = mask_id(model)?;
    let device = model.device();
    let mut noisy = Vec::with_capacity(prompts.len());
    let mut target = Vec::with_capacity(prompts.len());
    for ((q, y), s) in prompts.iter().zip(responses).zip(samples) {
        if s.masked.len() != y.len() {
            return Err(Error::config("diffusion", format!("mask of {} tokens for a response of {}", s.masked.len(), y.len())));
        }
        let yt: Vec<i64> = y.iter().zip(&s.masked).map(|(&tok, &m)| if m { mask } else { tok }).collect();
        noisy.push(q.iter().copied().chain(yt).collect::<Vec<_>>());
        // Targets only where masked; -1 elsewhere (and on the prompt).
        let tgt: Vec<i64> = std::iter::repeat_n(-1, q.len())
            .chain(y.iter().zip(&s.masked).map(|(&tok, &m)| if m { tok } else { -1 }))
            .collect();
        target.push(tgt);
    }
    let (ids, valid) = left_pad(&noisy, pad, device);
    let (tgt, _) = left_pad(&target, -1, device);
    let lp = logits(model, &ids, &valid).log_softmax(-1, Kind::Float);
    let keep = tgt.ge(0);
    let picked = lp.gather(-1, &tgt.clamp_min(0).unsqueeze(-1), false).squeeze_dim(-1) * keep.to_kind(Kind::Float);
    let inv_t: Vec<f32> = samples.iter().map(|s| (1.0 / s.t) as f32).collect();
    let inv_t = Tensor::from_slice(&inv_t).to(device);
    Ok(picked.sum_dim_intlist([1i64].as_slice(), false, Kind::Float) * inv_t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelConfig;
    use rand::SeedableRng;
    use tch::nn;

    fn policy(seed: i64) -> (nn::VarStore, Model) {
        let vs = nn::VarStore::new(Device::Cpu);
        let mut c = ModelConfig::preset("tiny-diffusion", 20).unwrap();
        c.pad_token_id = Some(0);
        let m = Model::new(&vs.root(), &c);
        crate::model::init_parameters(&vs, seed as u64);
        (vs, m)
    }

    #[test]
    fn the_sampler_fills_every_position_deterministically() {
        let (_vs, m) = policy(1);
        let p = DiffusionSampling { gen_length: 6, steps: 6, block_length: 3, temperature: 1.0 };
        let prompts = vec![vec![3, 4, 5], vec![6]];
        let a = generate(&m, &prompts, &p, 0, &mut ChaCha8Rng::seed_from_u64(9)).unwrap();
        let b = generate(&m, &prompts, &p, 0, &mut ChaCha8Rng::seed_from_u64(9)).unwrap();
        assert_eq!(a, b, "same seed, same responses");
        assert!(a.iter().all(|r| r.len() == 6 && r.iter().all(|&t| t != 20 && (0..20).contains(&t))), "{a:?}");
        let greedy = DiffusionSampling { temperature: 0.0, ..p.clone() };
        let g1 = generate(&m, &prompts, &greedy, 0, &mut ChaCha8Rng::seed_from_u64(1)).unwrap();
        let g2 = generate(&m, &prompts, &greedy, 0, &mut ChaCha8Rng::seed_from_u64(2)).unwrap();
        assert_eq!(g1, g2, "greedy ignores the seed");
        for bad in [DiffusionSampling { block_length: 4, ..p.clone() }, DiffusionSampling { steps: 3, ..p.clone() }] {
            assert!(generate(&m, &prompts, &bad, 0, &mut ChaCha8Rng::seed_from_u64(0)).is_err());
        }
    }

    #[test]
    fn the_elbo_matches_a_direct_sum_and_ignores_padding() {
        let (_vs, m) = policy(2);
        let prompts = vec![vec![3, 4, 5], vec![6]];
        let responses = vec![vec![7, 8, 9, 10], vec![11, 12, 13, 14]];
        let s = [
            McSample { t: 0.5, masked: vec![true, false, true, false] },
            McSample { t: 0.25, masked: vec![false, false, false, true] },
        ];
        let batch = elbo(&m, &prompts, &responses, &[&s[0], &s[1]], 0).unwrap();
        // Each row alone (no padding), summed by hand.
        for i in 0..2 {
            let mut ids: Vec<i64> = prompts[i].clone();
            ids.extend(responses[i].iter().zip(&s[i].masked).map(|(&t, &mk)| if mk { 20 } else { t }));
            let n = ids.len() as i64;
            let x = Tensor::from_slice(&ids).view([1, n]);
            let valid = Tensor::ones([1, n], (Kind::Bool, Device::Cpu));
            let lp = logits(&m, &x, &valid).log_softmax(-1, Kind::Float);
            let mut want = 0.0;
            for (k, (&tok, &mk)) in responses[i].iter().zip(&s[i].masked).enumerate() {
                if mk {
                    want += lp.double_value(&[0, (prompts[i].len() + k) as i64, tok]);
                }
            }
            want /= s[i].t;
            let got = batch.double_value(&[i as i64]);
            assert!((got - want).abs() < 1e-4, "row {i}: {got} vs {want}");
        }
        // t ~ U(0, 1] and a masking rate near t on average.
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let draws: Vec<McSample> = (0..2000).map(|_| McSample::draw(50, &mut rng)).collect();
        assert!(draws.iter().all(|d| d.t > 0.0 && d.t <= 1.0));
        let rate = draws.iter().map(|d| d.masked.iter().filter(|&&m| m).count() as f64 / 50.0 - d.t).sum::<f64>() / 2000.0;
        assert!(rate.abs() < 0.01, "masking rate − t averages {rate}");
    }
}
