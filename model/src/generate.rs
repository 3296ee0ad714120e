//! Batched sampling with a KV cache.
//!
//! Prompts of different lengths are left-padded; positions come from the
//! padding mask, so every row sees the same rotary positions it would see
//! alone. Each step samples one token per row with temperature, top-k and top-p
//! from the row's own seeded ChaCha stream (stream `i` for the batch's row `i`,
//! keyed by one draw from the caller's generator; one uniform per row and
//! step), so results depend on the seed and the row, not on which rows share a
//! batch or on libtorch's global RNG.
//!
//! **Continuous batching** ([`generate_continuous`]): a fixed number of slots
//! decode at once; when a row ends (stop token, stop string, max tokens) its
//! slot takes the next prompt: the new prompt is prefilled into the slot's
//! own span of the KV cache (its earlier columns masked out) while the other
//! slots wait one forward; then every live slot decodes a token per step. When
//! the cache is full its valid columns are packed to the front of each row
//! (keys are cached after rotary, so moving them changes nothing). Stop tokens
//! and stop strings are checked on the host, so the sampled token of each
//! live slot (one i64 per slot) is copied each step; logits stay on the
//! device. With per-row streams the outputs equal static batching's.
//!
//! **Behaviour log-probs.** For each sampled token we return
//! `log softmax(logits / T)[token]` — the temperature-scaled policy *before*
//! top-k / top-p truncation, which is what the learner recomputes when it
//! evaluates the same token with the same temperature. Greedy decoding
//! (`temperature == 0`) reports `log softmax(logits)`.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{Kind, Tensor};

use sluice_core::rollout::FinishReason;
use sluice_core::sampling::SamplingParams;

use crate::error::{Error, Result};
use crate::model::{token_logprobs, KvCache, Model};

/// One sampled continuation.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub tokens: Vec<i64>,
    /// Behaviour log-prob of each token in `tokens` (see module docs).
    pub logprobs: Vec<f32>,
    pub finish: FinishReason,
    /// `(i, v)`: from token `i` on, the weights were version `v` (interruptible
    /// generation; `i = 0` when the row started after a switch).
    pub switches: Vec<(u32, u64)>,
}

/// Samples one completion per prompt. `pad_id` fills left padding (never attended to).
pub fn generate(
    model: &Model,
    prompts: &[Vec<i64>],
    params: &SamplingParams,
    pad_id: i64,
    rng: &mut ChaCha8Rng,
) -> Result<Vec<Completion>> {
    generate_until(model, prompts, params, pad_id, rng, &|_, _| false, None)
}

/// Checks the prompts against the model: non-empty, ids in the vocabulary,
/// and room for `max_new_tokens` after the longest.
fn check_prompts(model: &Model, prompts: &[Vec<i64>], params: &SamplingParams) -> Result<i64> {
    params.validate("sampling")?;
    let vocab = model.config().vocab_size;
    for (i, p) in prompts.iter().enumerate() {
        if p.is_empty() {
            return Err(Error::Generation(format!("prompt {i} is empty")));
        }
        if let Some(t) = p.iter().find(|&&t| t < 0 || t >= vocab) {
            return Err(Error::Generation(format!("prompt {i} has token id {t} outside the vocabulary 0..{vocab}")));
        }
    }
    let p = prompts.iter().map(Vec::len).max().unwrap_or(0) as i64;
    if p + params.max_new_tokens > model.config().max_position_embeddings {
        return Err(Error::Generation(format!(
            "prompt ({p}) + max_new_tokens ({}) exceeds max_position_embeddings {}",
            params.max_new_tokens,
            model.config().max_position_embeddings
        )));
    }
    Ok(p)
}

/// The sampling stream of row `row` of a batch whose streams are keyed by `key`.
fn row_stream(key: u64, row: usize) -> ChaCha8Rng {
    let mut r = ChaCha8Rng::seed_from_u64(key);
    r.set_stream(row as u64);
    r
}

/// What ends a row besides stop tokens and length: `until(row, tokens so far)`.
pub type Until<'a> = &'a dyn Fn(usize, &[i64]) -> bool;

/// Appends a sampled token to row `row`'s completion `c`; true when the row is finished.
fn push_token(c: &mut Completion, row: usize, tok: i64, lp: f32, params: &SamplingParams, until: Until) -> bool {
    c.tokens.push(tok);
    c.logprobs.push(lp);
    if params.stop_token_ids.contains(&tok) || until(row, &c.tokens) {
        c.finish = FinishReason::Stop;
        return true;
    }
    c.tokens.len() as i64 >= params.max_new_tokens
}

fn unfinished() -> Completion {
    Completion { tokens: vec![], logprobs: vec![], finish: FinishReason::Length, switches: vec![] }
}

/// Called at every token boundary; when it swaps the model's weights (in
/// place) for a newer version it returns that version, and the tokens sampled
/// after it are that version's. The KV cache is kept: recomputing it would
/// cost a prefill of every live row, and each token's behaviour log-prob is
/// still exactly the distribution it was sampled from (old keys and values,
/// new weights), which is what the importance weights need.
pub type Interrupt<'a> = &'a mut dyn FnMut() -> Option<u64>;

/// [`generate`], also ending row `i` (finish `Stop`) once `until(i, tokens so
/// far)` holds (stop strings: see `collect`). Every row at once (static).
pub fn generate_until(
    model: &Model,
    prompts: &[Vec<i64>],
    params: &SamplingParams,
    pad_id: i64,
    rng: &mut ChaCha8Rng,
    until: Until,
    mut interrupt: Option<Interrupt>,
) -> Result<Vec<Completion>> {
    if prompts.is_empty() {
        params.validate("sampling")?;
        return Ok(vec![]);
    }
    let p = check_prompts(model, prompts, params)?;
    let _no_grad = tch::no_grad_guard();
    let device = model.device();
    let b = prompts.len() as i64;
    let cap = p + params.max_new_tokens;

    // Left-pad prompts; positions count only real tokens.
    let mut ids = Vec::with_capacity((b * p) as usize);
    let mut pos = Vec::with_capacity((b * p) as usize);
    let mut valid = vec![true; (b * cap) as usize];
    for (r, prompt) in prompts.iter().enumerate() {
        let pad = p as usize - prompt.len();
        ids.extend(std::iter::repeat_n(pad_id, pad));
        ids.extend_from_slice(prompt);
        pos.extend(std::iter::repeat_n(0i64, pad));
        pos.extend(0..prompt.len() as i64);
        valid[r * cap as usize..r * cap as usize + pad].iter_mut().for_each(|v| *v = false);
    }
    let ids = Tensor::from_slice(&ids).view([b, p]).to_device(device);
    let positions = Tensor::from_slice(&pos).view([b, p]).to_device(device);
    let valid = Tensor::from_slice(&valid).view([b, cap]).to_device(device);

    let mut cache = KvCache::new(model.config(), b, cap, model.kind(), device);
    let mask = attention_mask(&valid, 0, p);
    let hidden = model.hidden(&ids, &positions, Some(&mask), Some(&mut cache));
    let mut logits = model.logits(&hidden.select(1, p - 1));

    let mut next_pos = Tensor::from_slice(&prompts.iter().map(|p| p.len() as i64).collect::<Vec<_>>()).to_device(device);
    let key: u64 = rng.gen();
    let mut rngs: Vec<ChaCha8Rng> = (0..prompts.len()).map(|r| row_stream(key, r)).collect();
    let mut out: Vec<Completion> = (0..b).map(|_| unfinished()).collect();
    let mut done = vec![false; b as usize];
    loop {
        let u: Vec<f32> = rngs.iter_mut().zip(&done).map(|(r, &d)| if d { 0.5 } else { r.gen() }).collect();
        let (tok, lp) = sample(&logits, params, &u);
        let tok_v = Vec::<i64>::try_from(&tok.to_device(tch::Device::Cpu))?;
        let lp_v = Vec::<f32>::try_from(&lp.to_device(tch::Device::Cpu))?;
        for r in 0..b as usize {
            if !done[r] {
                done[r] = push_token(&mut out[r], r, tok_v[r], lp_v[r], params, until);
            }
        }
        if done.iter().all(|&d| d) {
            break;
        }
        if let Some(v) = interrupt.as_mut().and_then(|f| f()) {
            for (c, _) in out.iter_mut().zip(&done).filter(|(_, &d)| !d) {
                c.switches.push((c.tokens.len() as u32, v));
            }
        }
        let mask = attention_mask(&valid, cache.len(), 1);
        let hidden = model.hidden(&tok.view([b, 1]), &next_pos.view([b, 1]), Some(&mask), Some(&mut cache));
        logits = model.logits(&hidden.squeeze_dim(1));
        next_pos += 1;
    }
    Ok(out)
}

/// [`generate_until`] with continuous batching over `params.slots` rows (see
/// the module docs); the same completions, in prompt order. Falls back to
/// static batching when `slots` is 0 or covers every prompt, and for a
/// sliding-window model (its window is laid over the mask by cache column,
/// which packing moves).
pub fn generate_continuous(
    model: &Model,
    prompts: &[Vec<i64>],
    params: &SamplingParams,
    pad_id: i64,
    rng: &mut ChaCha8Rng,
    until: Until,
    mut interrupt: Option<Interrupt>,
) -> Result<Vec<Completion>> {
    let slots = params.slots;
    if slots == 0 || slots >= prompts.len() || model.config().sliding_window.is_some() {
        return generate_until(model, prompts, params, pad_id, rng, until, interrupt);
    }
    let max_prompt = check_prompts(model, prompts, params)?;
    let _no_grad = tch::no_grad_guard();
    let device = model.device();
    let s = slots as i64;
    // Room for a live row (prompt + response) and a refill prompt, twice over:
    // packing then happens at most every few rows.
    let capacity = 2 * (2 * max_prompt + params.max_new_tokens);
    let mut cache = KvCache::new(model.config(), s, capacity, model.kind(), device);
    let mut valid = Tensor::zeros([s, capacity], (Kind::Bool, device));
    let mut logits = Tensor::zeros([s, model.config().vocab_size], (Kind::Float, device));
    let key: u64 = rng.gen();
    let mut row: Vec<Option<usize>> = vec![None; slots];
    let mut rngs: Vec<Option<ChaCha8Rng>> = (0..slots).map(|_| None).collect();
    let mut next_pos = vec![0i64; slots];
    let mut out: Vec<Completion> = prompts.iter().map(|_| unfinished()).collect();
    let mut queue = 0usize;
    // The version the weights were switched to last (None: the caller's).
    let mut current: Option<u64> = None;
    loop {
        // Empty slots take the next prompts: one prefill forward for all of them.
        let empty: Vec<usize> = (0..slots).filter(|&k| row[k].is_none()).collect();
        let take = empty.len().min(prompts.len() - queue);
        if take > 0 {
            let fill: Vec<(usize, usize)> = empty[..take].iter().copied().zip(queue..queue + take).collect();
            queue += take;
            let t = fill.iter().map(|&(_, i)| prompts[i].len()).max().expect("one at least") as i64;
            make_room(&mut cache, &mut valid, t)?;
            let (mut ids, mut pos, mut new_valid) = (vec![pad_id; (s * t) as usize], vec![0i64; (s * t) as usize], vec![false; (s * t) as usize]);
            for &(k, i) in &fill {
                let pad = t as usize - prompts[i].len();
                let at = k * t as usize + pad;
                ids[at..at + prompts[i].len()].copy_from_slice(&prompts[i]);
                for (j, p) in (at..at + prompts[i].len()).enumerate() {
                    pos[p] = j as i64;
                    new_valid[p] = true;
                }
                row[k] = Some(i);
                rngs[k] = Some(row_stream(key, i));
                out[i].switches.extend(current.map(|v| (0, v)));
                next_pos[k] = prompts[i].len() as i64;
            }
            let fill_idx = Tensor::from_slice(&fill.iter().map(|&(k, _)| k as i64).collect::<Vec<_>>()).to_device(device);
            // The refilled slots forget their previous rows' columns.
            let _ = valid.index_fill_(0, &fill_idx, 0);
            valid.narrow(1, cache.len(), t).copy_(&Tensor::from_slice(&new_valid).view([s, t]).to_device(device));
            let mask = attention_mask(&valid, cache.len(), t);
            let ids = Tensor::from_slice(&ids).view([s, t]).to_device(device);
            let pos = Tensor::from_slice(&pos).view([s, t]).to_device(device);
            let hidden = model.hidden(&ids, &pos, Some(&mask), Some(&mut cache));
            let fresh = model.logits(&hidden.select(1, t - 1)).to_kind(Kind::Float);
            logits = logits.index_copy(0, &fill_idx, &fresh.index_select(0, &fill_idx));
        }
        if row.iter().all(Option::is_none) {
            break;
        }
        // Every live slot samples a token.
        let u: Vec<f32> = rngs.iter_mut().zip(&row).map(|(r, i)| match (r, i) {
            (Some(r), Some(_)) => r.gen(),
            _ => 0.5,
        }).collect();
        let (tok, lp) = sample(&logits, params, &u);
        let tok_v = Vec::<i64>::try_from(&tok.to_device(tch::Device::Cpu))?;
        let lp_v = Vec::<f32>::try_from(&lp.to_device(tch::Device::Cpu))?;
        for k in 0..slots {
            if let Some(i) = row[k] {
                if push_token(&mut out[i], i, tok_v[k], lp_v[k], params, until) {
                    row[k] = None;
                    rngs[k] = None;
                }
            }
        }
        if row.iter().all(Option::is_none) {
            continue;
        }
        if let Some(v) = interrupt.as_mut().and_then(|f| f()) {
            current = Some(v);
            for &i in row.iter().flatten() {
                let at = out[i].tokens.len() as u32;
                out[i].switches.push((at, v));
            }
        }
        // The slots still live decode their token.
        make_room(&mut cache, &mut valid, 1)?;
        let live: Vec<bool> = row.iter().map(Option::is_some).collect();
        valid.narrow(1, cache.len(), 1).copy_(&Tensor::from_slice(&live).view([s, 1]).to_device(device));
        let mask = attention_mask(&valid, cache.len(), 1);
        let pos = Tensor::from_slice(&next_pos).view([s, 1]).to_device(device);
        let hidden = model.hidden(&tok.view([s, 1]), &pos, Some(&mask), Some(&mut cache));
        logits = model.logits(&hidden.squeeze_dim(1)).to_kind(Kind::Float);
        for k in 0..slots {
            if live[k] {
                next_pos[k] += 1;
            }
        }
    }
    Ok(out)
}

/// Makes room for `t` more cache columns, packing each row's valid columns
/// to the front when the cache is full.
fn make_room(cache: &mut KvCache, valid: &mut Tensor, t: i64) -> Result<()> {
    if cache.len() + t <= cache.capacity() {
        return Ok(());
    }
    let (s, cap) = valid.size2().expect("valid is [S, C]");
    // Valid columns first, in their order (a stable sort of the flags, descending).
    let order = valid.to_kind(Kind::Int8).argsort_stable(true, 1, true);
    let count = valid.sum_dim_intlist(1, false, Kind::Int64);
    let len = count.max().int64_value(&[]);
    if len + t > cap {
        return Err(Error::Generation(format!("continuous batching: {len} live + {t} new columns exceed the cache's {cap}")));
    }
    cache.pack(&order, len);
    #[cfg(test)]
    tests::PACKS.with(|n| n.set(n.get() + 1));
    *valid = Tensor::arange(cap, (Kind::Int64, valid.device())).unsqueeze(0).lt_tensor(&count.unsqueeze(1));
    debug_assert_eq!(valid.size(), [s, cap]);
    Ok(())
}

/// Boolean mask `[B, 1, t, offset + t]` for `t` queries at positions `offset..offset+t`:
/// causal, valid keys only, and always the query's own position (so a padded
/// query row is never empty).
fn attention_mask(valid: &Tensor, offset: i64, t: i64) -> Tensor {
    let device = valid.device();
    let k = offset + t;
    let q_idx = Tensor::arange_start(offset, k, (Kind::Int64, device)).unsqueeze(1);
    let k_idx = Tensor::arange(k, (Kind::Int64, device)).unsqueeze(0);
    let causal = k_idx.le_tensor(&q_idx);
    let diag = k_idx.eq_tensor(&q_idx);
    let m = causal.unsqueeze(0).logical_and(&valid.narrow(1, 0, k).unsqueeze(1));
    m.logical_or(&diag.unsqueeze(0)).unsqueeze(1)
}

/// Picks one token per row of `logits` `[B, V]` with the row's uniform draw
/// `u[row]`; returns (tokens `[B]`, behaviour log-probs `[B]`).
fn sample(logits: &Tensor, params: &SamplingParams, u: &[f32]) -> (Tensor, Tensor) {
    let logits = logits.to_kind(Kind::Float);
    if params.temperature == 0.0 {
        let tok = logits.argmax(-1, false);
        let lp = token_logprobs(&logits, &tok, 1.0);
        return (tok, lp);
    }
    let (b, v) = logits.size2().expect("logits are [B, V]");
    let scaled = logits / params.temperature;
    let mut filtered = scaled.shallow_clone();
    if params.top_k > 0 && params.top_k < v {
        let (top, _) = filtered.topk(params.top_k, -1, true, true);
        let kth = top.narrow(1, params.top_k - 1, 1);
        filtered = filtered.masked_fill(&filtered.lt_tensor(&kth), f64::NEG_INFINITY);
    }
    if params.top_p < 1.0 {
        let (sorted, idx) = filtered.sort(-1, true);
        let probs = sorted.softmax(-1, Kind::Float);
        // Drop a token when the mass of strictly more likely tokens already reaches top_p.
        let before = probs.cumsum(-1, Kind::Float) - &probs;
        let sorted = sorted.masked_fill(&before.gt(params.top_p), f64::NEG_INFINITY);
        filtered = Tensor::full([b, v], f64::NEG_INFINITY, (Kind::Float, scaled.device())).scatter(-1, &idx, &sorted);
    }
    let cdf = filtered.softmax(-1, Kind::Float).cumsum(-1, Kind::Float);
    debug_assert_eq!(u.len() as i64, b);
    let u = Tensor::from_slice(u).to_device(cdf.device()).unsqueeze(1) * cdf.narrow(1, v - 1, 1);
    let tok = cdf.lt_tensor(&u).sum_dim_intlist(-1, false, Kind::Int64).clamp_max(v - 1);
    let lp = scaled.log_softmax(-1, Kind::Float).gather(-1, &tok.unsqueeze(-1), false).squeeze_dim(-1);
    (tok, lp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hf::Policy;
    use crate::model::ModelConfig;
    use rand::SeedableRng;

    thread_local! {
        /// Times `make_room` packed a cache on this thread.
        pub(super) static PACKS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    fn policy() -> Policy {
        let mut cfg = ModelConfig::preset("tiny", 40).unwrap();
        cfg.num_key_value_heads = 2;
        Policy::random(&cfg, tch::Device::Cpu, Kind::Float, 3)
    }

    /// Greedy decoding without a cache: re-run the whole sequence every step.
    fn greedy_no_cache(model: &Model, prompt: &[i64], n: usize) -> Vec<i64> {
        let mut seq = prompt.to_vec();
        for _ in 0..n {
            let logits = model.forward(&Tensor::from_slice(&seq).unsqueeze(0));
            seq.push(logits.select(1, seq.len() as i64 - 1).argmax(-1, false).int64_value(&[0]));
        }
        seq[prompt.len()..].to_vec()
    }

    #[test]
    fn greedy_with_cache_equals_without_cache_on_a_padded_batch() {
        // Also with a sliding window shorter than the sequences (Mistral), per-head
        // q/k norms (Qwen3) and Llama 3 frequency scaling: the window must slide
        // the same way over the cache as over the whole sequence.
        let mut windowed = ModelConfig::preset("tiny", 40).unwrap();
        windowed.sliding_window = Some(4);
        windowed.qk_norm = true;
        windowed.rope_scaling = crate::model::RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 32.0,
        };
        for p in [policy(), Policy::random(&windowed, tch::Device::Cpu, Kind::Float, 4)] {
            let prompts = vec![vec![5, 6, 7, 8, 9], vec![11, 3], vec![20, 21, 22]];
            let params = SamplingParams { temperature: 0.0, max_new_tokens: 12, ..Default::default() };
            let mut rng = ChaCha8Rng::seed_from_u64(0);
            let got = tch::no_grad(|| generate(p.model(), &prompts, &params, 0, &mut rng)).unwrap();
            for (prompt, c) in prompts.iter().zip(&got) {
                let want = tch::no_grad(|| greedy_no_cache(p.model(), prompt, 12));
                assert_eq!(c.tokens, want, "prompt {prompt:?}, {:?}", p.config().sliding_window);
                assert_eq!(c.finish, FinishReason::Length);
            }
        }
    }

    #[test]
    fn sampled_logprobs_match_teacher_forcing() {
        let p = policy();
        let prompts = vec![vec![5, 6, 7, 8], vec![9], vec![12, 13]];
        for (temperature, top_k, top_p) in [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8)] {
            let params = SamplingParams { temperature, top_k, top_p, max_new_tokens: 10, ..Default::default() };
            let mut rng = ChaCha8Rng::seed_from_u64(7);
            let got = generate(p.model(), &prompts, &params, 0, &mut rng).unwrap();
            for (prompt, c) in prompts.iter().zip(&got) {
                let seq: Vec<i64> = prompt.iter().chain(&c.tokens).copied().collect();
                let input = Tensor::from_slice(&seq[..seq.len() - 1]).unsqueeze(0);
                let target = Tensor::from_slice(&seq[prompt.len()..]);
                let logits = tch::no_grad(|| p.model().forward(&input)).squeeze_dim(0).narrow(0, prompt.len() as i64 - 1, c.tokens.len() as i64);
                // The reference is plain f64 arithmetic on the teacher-forced
                // logits (not `token_logprobs`, which generate itself uses):
                // log softmax(z / T) of the sampled token, before truncation.
                let rows: Vec<Vec<f32>> = Vec::<Vec<f32>>::try_from(&logits).unwrap();
                let targets = Vec::<i64>::try_from(&target).unwrap();
                assert_eq!(c.logprobs.len(), targets.len());
                for ((row, &tok), &got) in rows.iter().zip(&targets).zip(&c.logprobs) {
                    let z: Vec<f64> = row.iter().map(|&x| x as f64 / temperature).collect();
                    let max = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let lse = max + z.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
                    let want = z[tok as usize] - lse;
                    assert!((got as f64 - want).abs() <= 1e-4, "T={temperature} k={top_k} p={top_p}: {got} vs {want}");
                }
            }
        }
    }

    #[test]
    fn same_seed_same_samples_and_stop_tokens_end_rows() {
        let p = policy();
        let prompts = vec![vec![5, 6]; 6];
        let params = SamplingParams { temperature: 1.0, max_new_tokens: 20, stop_token_ids: vec![1, 2, 3, 4], ..Default::default() };
        let a = generate(p.model(), &prompts, &params, 0, &mut ChaCha8Rng::seed_from_u64(1)).unwrap();
        let b = generate(p.model(), &prompts, &params, 0, &mut ChaCha8Rng::seed_from_u64(1)).unwrap();
        assert_eq!(a, b);
        let c = generate(p.model(), &prompts, &params, 0, &mut ChaCha8Rng::seed_from_u64(2)).unwrap();
        assert_ne!(a, c);
        for comp in &a {
            match comp.finish {
                FinishReason::Stop => {
                    let last = *comp.tokens.last().unwrap();
                    assert!(params.stop_token_ids.contains(&last));
                    assert!(comp.tokens[..comp.tokens.len() - 1].iter().all(|t| !params.stop_token_ids.contains(t)));
                }
                FinishReason::Length => assert_eq!(comp.tokens.len(), 20),
            }
        }
    }

    /// Continuous batching gives the completions static batching gives for
    /// the same seed: prompts of mixed lengths through 3 slots (refills, and
    /// packing the cache: 12 rows of up to 8 + 12 tokens pass through 56
    /// columns), with stop tokens and a stop predicate ending rows early, at
    /// temperature 1 and greedy. Log-probs agree to float rounding (the
    /// attention sums run over other key lengths).
    #[test]
    fn continuous_batching_matches_static_batching() {
        let p = policy();
        let prompts: Vec<Vec<i64>> = (0..12).map(|i| (0..1 + (i * 5) % 8).map(|j| 4 + ((i * 7 + j * 3) % 30) as i64).collect()).collect();
        // A stop "string": the row's tokens so far sum to a multiple of 37.
        let until = |_: usize, t: &[i64]| t.len() >= 3 && t.iter().sum::<i64>() % 37 == 0;
        for temperature in [1.0, 0.0] {
            let params = SamplingParams { temperature, max_new_tokens: 12, stop_token_ids: vec![5, 9], ..Default::default() };
            let want = generate_until(p.model(), &prompts, &params, 0, &mut ChaCha8Rng::seed_from_u64(4), &until, None).unwrap();
            for slots in [3, 5] {
                let packs = PACKS.with(|n| n.get());
                let params = SamplingParams { slots, ..params.clone() };
                let got = generate_continuous(p.model(), &prompts, &params, 0, &mut ChaCha8Rng::seed_from_u64(4), &until, None).unwrap();
                assert!(slots != 3 || PACKS.with(|n| n.get()) > packs, "the cache was packed");
                for (i, (w, g)) in want.iter().zip(&got).enumerate() {
                    assert_eq!((&w.tokens, w.finish), (&g.tokens, g.finish), "T={temperature} slots={slots} row {i}");
                    for (a, b) in w.logprobs.iter().zip(&g.logprobs) {
                        assert!((a - b).abs() < 1e-4, "T={temperature} slots={slots} row {i}: {a} vs {b}");
                    }
                }
            }
            let lens: Vec<usize> = want.iter().map(|c| c.tokens.len()).collect();
            assert!(temperature == 0.0 || lens.iter().any(|&l| l < 12) && lens.contains(&12), "rows end at different steps: {lens:?}");
        }
    }

    /// Interruptible generation: at the third token boundary the hook swaps
    /// the weights in place and names the version. Swapping in the same
    /// weights changes no token or log-prob (the KV cache is kept as it was)
    /// and records the switch at token 3 of every row still running; swapping
    /// in other weights keeps the first 3 tokens and changes later ones. With
    /// continuous batching, rows that start after the switch record it at 0.
    #[test]
    fn an_interrupt_switches_weights_at_a_token_boundary() {
        let a = policy();
        let b = Policy::random(a.config(), tch::Device::Cpu, Kind::Float, 77);
        let prompts: Vec<Vec<i64>> = (0..6).map(|i| vec![4 + i, 9, 12 + i]).collect();
        let params = SamplingParams { temperature: 1.0, max_new_tokens: 10, ..Default::default() };
        let never = |_: usize, _: &[i64]| false;
        let run = |model: &Model, params: &SamplingParams, switch_to: Option<&Policy>| {
            let mut calls = 0;
            let mut hook = || {
                calls += 1;
                let to = switch_to.filter(|_| calls == 3)?;
                let named: std::collections::HashMap<String, Tensor> = to.named_parameters().into_iter().collect();
                a.set_parameters(named, std::path::Path::new("<test>")).unwrap();
                Some(7)
            };
            generate_continuous(model, &prompts, params, 0, &mut ChaCha8Rng::seed_from_u64(2), &never, Some(&mut hook)).unwrap()
        };
        let copy = Policy::random(a.config(), tch::Device::Cpu, Kind::Float, 3);
        let plain = run(a.model(), &params, None);
        let same = run(a.model(), &params, Some(&copy));
        for (p, s) in plain.iter().zip(&same) {
            assert_eq!((&p.tokens, &p.logprobs), (&s.tokens, &s.logprobs));
            assert_eq!(s.switches, vec![(3, 7)]);
        }
        let other = run(a.model(), &params, Some(&b));
        assert!(plain.iter().zip(&other).all(|(p, o)| p.tokens[..3] == o.tokens[..3] && o.switches == vec![(3, 7)]));
        assert!(plain.iter().zip(&other).any(|(p, o)| p.tokens[3..] != o.tokens[3..]), "the new weights sampled the rest");
        // Continuous batching over 2 slots: rows 0 and 1 switch at token 3; the
        // rows that start later run wholly on version 7.
        a.set_parameters(copy.named_parameters().into_iter().collect(), std::path::Path::new("<test>")).unwrap();
        let slotted = run(a.model(), &SamplingParams { slots: 2, ..params.clone() }, Some(&b));
        assert_eq!(slotted[0].switches, vec![(3, 7)]);
        assert!(slotted[2..].iter().all(|c| c.switches == vec![(0, 7)]), "{:?}", slotted.iter().map(|c| &c.switches).collect::<Vec<_>>());
    }

    /// Draws `n` tokens from one row of fixed logits with `sample`.
    fn draws(logits: &[f32], params: &SamplingParams, n: usize) -> (Vec<usize>, Vec<f32>) {
        let row = Tensor::from_slice(logits).unsqueeze(0);
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let mut counts = vec![0usize; logits.len()];
        let mut lps = vec![f32::NAN; logits.len()];
        for _ in 0..n {
            let (tok, lp) = sample(&row, params, &[rng.gen::<f32>()]);
            let t = tok.int64_value(&[0]) as usize;
            counts[t] += 1;
            lps[t] = lp.double_value(&[0]) as f32;
        }
        (counts, lps)
    }

    /// Probabilities of softmax(z / T), in f64.
    fn softmax(z: &[f32], t: f64) -> Vec<f64> {
        let e: Vec<f64> = z.iter().map(|&x| (x as f64 / t).exp()).collect();
        let sum: f64 = e.iter().sum();
        e.iter().map(|x| x / sum).collect()
    }

    #[test]
    fn top_k_and_top_p_sample_only_the_kept_tokens_in_proportion() {
        let logits = [2.0f32, 0.5, 1.5, -1.0, 1.0, 0.0, 3.0, -2.0];
        let full = softmax(&logits, 1.0);
        let n = 20_000;
        // top-k = 3 keeps tokens 6, 0, 2 (logits 3.0, 2.0, 1.5), renormalised.
        let params = SamplingParams { temperature: 1.0, top_k: 3, ..Default::default() };
        let (counts, lps) = draws(&logits, &params, n);
        let kept = [6usize, 0, 2];
        let mass: f64 = kept.iter().map(|&i| full[i]).sum();
        for (i, &c) in counts.iter().enumerate() {
            if kept.contains(&i) {
                let freq = c as f64 / n as f64;
                assert!((freq - full[i] / mass).abs() < 0.02, "top-k token {i}: {freq} vs {}", full[i] / mass);
                // The behaviour log-prob is the untruncated one.
                assert!((lps[i] as f64 - full[i].ln()).abs() < 1e-5, "token {i}: {} vs {}", lps[i], full[i].ln());
            } else {
                assert_eq!(c, 0, "top-k sampled token {i} outside the top 3");
            }
        }
        // top-p = 0.8 at T = 1.5: sorted by probability, a token stays while the
        // mass of the tokens before it is at most 0.8 (here 4 of 8 tokens stay).
        let t = 1.5;
        let probs = softmax(&logits, t);
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
        let mut before = 0.0;
        let mut nucleus = Vec::new();
        for &i in &order {
            if before <= 0.8 {
                nucleus.push(i);
            }
            before += probs[i];
        }
        assert!(nucleus.len() >= 2 && nucleus.len() < logits.len(), "the test needs a real cut: {nucleus:?}");
        let params = SamplingParams { temperature: t, top_p: 0.8, ..Default::default() };
        let (counts, _) = draws(&logits, &params, n);
        let mass: f64 = nucleus.iter().map(|&i| probs[i]).sum();
        for (i, &c) in counts.iter().enumerate() {
            if nucleus.contains(&i) {
                let freq = c as f64 / n as f64;
                assert!((freq - probs[i] / mass).abs() < 0.02, "top-p token {i}: {freq} vs {}", probs[i] / mass);
            } else {
                assert_eq!(c, 0, "top-p sampled token {i} outside the nucleus {nucleus:?}");
            }
        }
    }

    #[test]
    fn top_k_one_is_greedy() {
        let p = policy();
        let prompts = vec![vec![5, 6, 7]];
        let greedy = SamplingParams { temperature: 0.0, max_new_tokens: 8, ..Default::default() };
        let k1 = SamplingParams { temperature: 1.0, top_k: 1, max_new_tokens: 8, ..Default::default() };
        let a = generate(p.model(), &prompts, &greedy, 0, &mut ChaCha8Rng::seed_from_u64(0)).unwrap();
        let b = generate(p.model(), &prompts, &k1, 0, &mut ChaCha8Rng::seed_from_u64(9)).unwrap();
        assert_eq!(a[0].tokens, b[0].tokens);
    }

    #[test]
    fn bad_prompts_are_errors() {
        let p = policy();
        let params = SamplingParams::default();
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        assert!(generate(p.model(), &[vec![]], &params, 0, &mut rng).is_err());
        assert!(generate(p.model(), &[vec![1, 400]], &params, 0, &mut rng).is_err());
    }
}
