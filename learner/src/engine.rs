//! The step engine: what every objective's update shares. It owns the policy,
//! the frozen reference policy (when a KL term needs one), AdamW and the
//! collective, and it is the one place that
//!
//! * sums numbers and gradients over data-parallel ranks ([`Engine::all_reduce`]),
//! * skips an optimizer step when any rank saw a non-finite loss, else clips
//!   and steps ([`Engine::step`]),
//! * turns rows (prompt, response, behaviour log-probs, advantage) into padded
//!   tensors ([`Batch`]).
//!
//! Objectives (`crate::algo`) decide what the loss is and how the data is cut
//! into epochs, mini-batches and micro-batches; they call the engine for the rest.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use sluice_model::hf::Policy;
use sluice_model::model::{token_logprobs, LayerCheckpoints};
use tch::{Device, Tensor};

use crate::checkpoint::TrainerState;
use crate::collective::{all_reduce_f64, Collective};
use crate::error::{Error, Result};
use crate::optim::{AdamW, StepReport};

/// The policy, its optimizer and the ranks it trains with.
pub struct Engine {
    pub policy: Policy,
    /// Frozen copy of the initial policy, for the KL penalty (`grpo.kl_coef > 0`).
    pub reference: Option<Policy>,
    pub opt: AdamW,
    comm: Box<dyn Collective>,
    /// Token id of padding (never attended to, never trained on).
    pub pad: i64,
    /// Recompute each decoder layer in the backward pass instead of keeping
    /// its activations (`train.activation_checkpointing`).
    pub checkpoint_layers: bool,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("policy", &self.policy).field("rank", &self.comm.rank()).finish()
    }
}

impl Engine {
    pub fn new(policy: Policy, reference: Option<Policy>, opt: AdamW, comm: Box<dyn Collective>, pad: i64) -> Self {
        Engine { policy, reference, opt, comm, pad, checkpoint_layers: false }
    }

    /// This rank and the world size.
    pub fn rank(&self) -> (usize, usize) {
        (self.comm.rank(), self.comm.world_size())
    }

    /// Sums `values` element-wise over all ranks, in place (a no-op on one rank).
    /// The ranks' collective (for gathers that are not sums of numbers).
    pub fn comm(&mut self) -> &mut dyn Collective {
        self.comm.as_mut()
    }

    pub fn all_reduce(&mut self, values: &mut [f64]) -> Result<()> {
        Ok(all_reduce_f64(self.comm.as_mut(), values)?)
    }

    /// Sums gradients over ranks (and whether any rank saw a non-finite loss),
    /// then takes the optimizer step every rank takes: clipped to `max_norm`,
    /// or skipped (gradients zeroed) when any loss was not finite.
    /// The accumulated gradient of every parameter, summed over ranks, as one
    /// flat f32 vector; the gradients are then zeroed (nothing is stepped).
    pub fn take_gradient(&mut self) -> Result<Vec<f32>> {
        let mut grads = self.opt.grads();
        self.comm.all_reduce_sum(&mut grads)?;
        let flat = Tensor::cat(&grads.iter().map(|g| g.to_kind(tch::Kind::Float).flatten(0, -1)).collect::<Vec<_>>(), 0);
        let out = Vec::<f32>::try_from(flat.to_device(tch::Device::Cpu)).map_err(|e| Error::Training(format!("gradient: {e}")))?;
        self.opt.zero_grad();
        Ok(out)
    }

    pub fn step(&mut self, finite: bool, max_norm: f64) -> Result<StepReport> {
        let skipped = StepReport { grad_norm: f64::NAN, skipped: true };
        if self.comm.world_size() == 1 {
            if finite {
                return Ok(self.opt.step(max_norm));
            }
            self.opt.zero_grad();
            return Ok(skipped);
        }
        let mut bad = [if finite { 0.0 } else { 1.0 }];
        self.all_reduce(&mut bad)?;
        if bad[0] > 0.0 {
            self.opt.zero_grad();
            return Ok(skipped);
        }
        let mut grads = self.opt.grads();
        self.comm.all_reduce_sum(&mut grads)?;
        Ok(self.opt.step(max_norm))
    }

    /// Copies rank 0's parameters, optimizer state and counters to every rank.
    pub fn sync_from_root(&mut self, state: &mut TrainerState) -> Result<()> {
        let mut params: Vec<Tensor> = self.policy.named_parameters().into_iter().map(|(_, t)| t).collect();
        self.comm.broadcast_from_root(&mut params)?;
        let mut opt_state: Vec<Tensor> = self.opt.state_tensors().into_iter().map(|(_, t)| t).collect();
        self.comm.broadcast_from_root(&mut opt_state)?;
        let s = &*state;
        let mut counters = [Tensor::from_slice(&[s.step as f64, s.sft_step as f64, s.cursor as f64, s.optimizer_t as f64])];
        self.comm.broadcast_from_root(&mut counters)?;
        let c = Vec::<f64>::try_from(&counters[0]).map_err(Error::from)?;
        (state.step, state.sft_step, state.cursor) = (c[0] as u64, c[1] as u64, c[2] as u64);
        state.optimizer_t = c[3] as i64;
        self.opt.t = state.optimizer_t;
        Ok(())
    }

    /// Log-probs of `batch.target` under `policy`, the vocabulary projected
    /// [`HEAD_CHUNK_TOKENS`] positions at a time (see [`TokenLogprobs`]). With
    /// gradient unless called under no_grad; then finish with
    /// [`TokenLogprobs::backward`] instead of `loss.backward()`.
    pub fn logprobs(policy: &Policy, batch: &Batch, temperature: f64) -> TokenLogprobs {
        TokenLogprobs::new(policy, &batch.input, &batch.target, temperature, false)
    }

    /// [`Engine::logprobs`] of the trained policy, with activation
    /// checkpointing per decoder layer when the job asks for it.
    pub fn train_logprobs(&self, batch: &Batch, temperature: f64) -> TokenLogprobs {
        TokenLogprobs::new(&self.policy, &batch.input, &batch.target, temperature, self.checkpoint_layers)
    }
}

/// Positions whose vocabulary logits exist at once in the learner: 1,024 ×
/// 151,936 fp32 logits are 0.6 GB, where a whole micro-batch would hold
/// `[B, T, V]` (and autograd would keep it for the backward pass).
pub const HEAD_CHUNK_TOKENS: i64 = 1024;

/// Token log-probs whose `[B, T, V]` logits are never held at once, not even
/// for the backward pass. Forward: the decoder's hidden states `[B, T, D]`
/// (with their graph), then logits and log-probs chunk by chunk without a graph;
/// `logp` is a leaf the loss is built on. Backward ([`TokenLogprobs::backward`]):
/// the loss's gradient reaches `logp`; each chunk's logits are recomputed with a
/// graph and back-propagated with that gradient (into the head's weights and the
/// hidden states' gradient), then the hidden states' graph is back-propagated
/// once. The gradients are those of the unchunked computation; the cost is one
/// more vocabulary projection.
///
/// With `checkpoint_layers` the decoder itself runs without a graph too and
/// keeps only each layer's input ([`LayerCheckpoints`]); the backward pass
/// recomputes one layer at a time (the cost: one more decoder forward).
pub struct TokenLogprobs {
    /// `[B, T]` fp32; a leaf requiring grad when the policy is being trained.
    pub logp: Tensor,
    /// How the decoder's graph is reached, and a detached leaf copy of its
    /// output `[B·T, D]` that the head reads.
    hidden: Option<(DecoderGraph, Tensor)>,
    target: Tensor,
    temperature: f64,
}

/// The decoder's part of the backward pass.
enum DecoderGraph {
    /// The output with autograd's graph.
    Kept(Tensor),
    /// Layer inputs to recompute from.
    Checkpointed(LayerCheckpoints),
}

impl TokenLogprobs {
    pub fn new(policy: &Policy, input: &Tensor, target: &Tensor, temperature: f64, checkpoint_layers: bool) -> Self {
        let (b, t) = input.size2().expect("input is [B, T]");
        let positions = Tensor::arange(t, (tch::Kind::Int64, input.device())).unsqueeze(0).expand([b, t], false);
        let (hidden, decoder) = if checkpoint_layers && grad_mode() {
            let (h, ck) = policy.model().hidden_checkpointed(input, &positions);
            (h, DecoderGraph::Checkpointed(ck))
        } else {
            let h = policy.model().hidden(input, &positions, None, None);
            let kept = h.shallow_clone();
            (h, DecoderGraph::Kept(kept))
        };
        let graph = matches!(decoder, DecoderGraph::Checkpointed(_)) || hidden.requires_grad();
        let target = target.reshape([b * t]);
        let leaf = hidden.detach().reshape([b * t, -1]).set_requires_grad(graph);
        let logp = tch::no_grad(|| {
            let parts: Vec<Tensor> =
                chunks(b * t).map(|(s, len)| chunk_logp(policy, &leaf, &target, s, len, temperature)).collect();
            Tensor::cat(&parts, 0).reshape([b, t])
        });
        if !graph {
            return TokenLogprobs { logp, hidden: None, target, temperature };
        }
        TokenLogprobs { logp: logp.set_requires_grad(true), hidden: Some((decoder, leaf)), target, temperature }
    }

    /// Back-propagates `loss` (built on `logp`) into `policy`'s parameters
    /// (the policy these log-probs came from).
    pub fn backward(self, policy: &Policy, loss: &Tensor) {
        loss.backward();
        let Some((decoder, leaf)) = self.hidden else { return };
        let grad = self.logp.grad();
        if !grad.defined() {
            return;
        }
        let grad = grad.reshape([-1]);
        // Chunk by chunk: recompute the logits with a graph and send the loss's
        // gradient through them; each chunk's graph is freed before the next.
        for (s, len) in chunks(grad.size()[0]) {
            let lp = chunk_logp(policy, &leaf, &self.target, s, len, self.temperature);
            (lp * grad.narrow(0, s, len)).sum(tch::Kind::Float).backward();
        }
        let hidden_grad = leaf.grad();
        if hidden_grad.defined() {
            match decoder {
                DecoderGraph::Kept(hidden) => {
                    let shape = hidden.size();
                    (hidden * hidden_grad.reshape(shape.as_slice())).sum(tch::Kind::Float).backward();
                }
                DecoderGraph::Checkpointed(ck) => {
                    let shape = leaf.size();
                    let (b, t) = self.logp.size2().expect("logp is [B, T]");
                    ck.backward(policy.model(), &hidden_grad.reshape([b, t, shape[1]]));
                }
            }
        }
    }
}

/// Whether autograd records operations here (false inside `tch::no_grad`);
/// tch does not expose the flag, so a one-element probe asks.
fn grad_mode() -> bool {
    (Tensor::zeros([1], (tch::Kind::Float, Device::Cpu)).set_requires_grad(true) * 1.0).requires_grad()
}

/// `(start, len)` of each chunk of `n` flattened positions.
fn chunks(n: i64) -> impl Iterator<Item = (i64, i64)> {
    (0..n).step_by(HEAD_CHUNK_TOKENS as usize).map(move |s| (s, HEAD_CHUNK_TOKENS.min(n - s)))
}

/// Log-probs of `target[s..s+len]` from the flattened hidden states `[N, D]`.
fn chunk_logp(policy: &Policy, flat: &Tensor, target: &Tensor, s: i64, len: i64, temperature: f64) -> Tensor {
    let logits = policy.model().logits(&flat.narrow(0, s, len));
    token_logprobs(&logits, &target.narrow(0, s, len), temperature)
}

/// The ChaCha stream of one (seed, phase, step): every random draw of
/// training comes from one, so a resumed run repeats exactly what the
/// uninterrupted run would have done.
pub fn rng_for(seed: u64, phase: u64, step: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream((phase << 48) | step);
    rng
}

/// One training sequence: prompt, response, behaviour log-probs and advantage.
pub struct Row<'a> {
    pub prompt: &'a [i64],
    pub response: &'a [i64],
    pub old_logp: Option<&'a [f32]>,
    /// Per response token: train on it? Empty = every token.
    pub loss_mask: &'a [bool],
    pub advantage: f64,
}

impl Row<'_> {
    /// Response tokens the loss trains on.
    pub fn trained_tokens(&self) -> f64 {
        if self.loss_mask.is_empty() {
            self.response.len() as f64
        } else {
            self.loss_mask.iter().filter(|&&m| m).count() as f64
        }
    }
}

/// Right-padded tensors for a micro-batch of rows.
pub struct Batch {
    pub input: Tensor,
    pub target: Tensor,
    pub mask: Tensor,
    pub old_logp: Tensor,
    pub advantages: Tensor,
    pub tokens: f64,
}

impl Batch {
    /// `input` = (prompt ++ response)[..-1], `target` = [1..]; the mask covers response tokens.
    pub fn new(rows: &[&Row], pad: i64, device: Device) -> Self {
        let len = rows.iter().map(|r| r.prompt.len() + r.response.len() - 1).max().unwrap_or(1);
        let b = rows.len();
        let mut input = vec![pad; b * len];
        let mut target = vec![pad; b * len];
        let mut mask = vec![0f32; b * len];
        let mut old = vec![0f32; b * len];
        for (i, r) in rows.iter().enumerate() {
            let seq: Vec<i64> = r.prompt.iter().chain(r.response).copied().collect();
            let o = i * len;
            input[o..o + seq.len() - 1].copy_from_slice(&seq[..seq.len() - 1]);
            target[o..o + seq.len() - 1].copy_from_slice(&seq[1..]);
            let start = o + r.prompt.len() - 1;
            for (k, m) in mask[start..start + r.response.len()].iter_mut().enumerate() {
                *m = if r.loss_mask.get(k).copied().unwrap_or(true) { 1.0 } else { 0.0 };
            }
            if let Some(lp) = r.old_logp {
                old[start..start + r.response.len()].copy_from_slice(lp);
            }
        }
        let shape = [b as i64, len as i64];
        let adv: Vec<f32> = rows.iter().map(|r| r.advantage as f32).collect();
        Batch {
            input: Tensor::from_slice(&input).view(shape).to_device(device),
            target: Tensor::from_slice(&target).view(shape).to_device(device),
            tokens: mask.iter().map(|&m| m as f64).sum(),
            mask: Tensor::from_slice(&mask).view(shape).to_device(device),
            old_logp: Tensor::from_slice(&old).view(shape).to_device(device),
            advantages: Tensor::from_slice(&adv).to_device(device),
        }
    }
}

/// Splits `rows` into exactly `n` (at least 1) contiguous parts whose sizes
/// differ by at most one (so some are empty when `rows` has fewer than `n`).
pub fn split_even<T>(rows: &[T], n: usize) -> Vec<&[T]> {
    let n = n.max(1);
    let (q, r) = (rows.len() / n, rows.len() % n);
    let mut out = Vec::with_capacity(n);
    let mut start = 0;
    for i in 0..n {
        let len = q + usize::from(i < r);
        out.push(&rows[start..start + len]);
        start += len;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Chunked log-probs with the head recomputed in backward give the values
    /// and gradients of the plain `[B, T, V]` computation, over three chunks.
    #[test]
    fn chunked_head_matches_the_whole_vocabulary_at_once() {
        use sluice_model::model::ModelConfig;
        let mut cfg = ModelConfig::preset("tiny", 53).unwrap();
        cfg.tie_word_embeddings = false;
        let policy = Policy::random(&cfg, Device::Cpu, tch::Kind::Float, 11);
        let (b, t) = (3, 700);
        let ids: Vec<i64> = (0..b * t).map(|i| (i * 7 + i / 5) % 53).collect();
        let input = Tensor::from_slice(&ids).view([b, t]);
        let target = input.roll([-1], [1]);
        let weights = Tensor::from_slice(&(0..b * t).map(|i| ((i % 13) as f32 - 6.0) / 10.0).collect::<Vec<_>>()).view([b, t]);
        let grads = |p: &Policy| -> Vec<Tensor> {
            p.named_parameters().iter().map(|(_, v)| v.grad().copy()).collect()
        };
        let zero = |p: &Policy| p.named_parameters().into_iter().for_each(|(_, mut v)| v.zero_grad());
        // Plain: the whole vocabulary at once.
        let plain = token_logprobs(&policy.model().forward(&input), &target, 0.7);
        (&plain * &weights).sum(tch::Kind::Float).backward();
        let want = grads(&policy);
        zero(&policy);
        // Chunked, recomputed in backward.
        let lp = TokenLogprobs::new(&policy, &input, &target, 0.7, false);
        assert!(b * t > 2 * HEAD_CHUNK_TOKENS, "three chunks at least");
        let value_diff = (&lp.logp - &plain).abs().max().double_value(&[]);
        assert!(value_diff < 1e-5, "log-probs differ by {value_diff}");
        let loss = (&lp.logp * &weights).sum(tch::Kind::Float);
        lp.backward(&policy, &loss);
        for ((name, _), (g, w)) in policy.named_parameters().iter().zip(grads(&policy).iter().zip(&want)) {
            let scale = w.abs().max().double_value(&[]).max(1e-6);
            let diff = (g - w).abs().max().double_value(&[]);
            assert!(diff <= 1e-4 * scale, "{name}: gradient differs by {diff:e} (scale {scale:e})");
        }
        // Activation checkpointing per layer: the same values and gradients.
        zero(&policy);
        let lp = TokenLogprobs::new(&policy, &input, &target, 0.7, true);
        assert!(matches!(lp.hidden, Some((DecoderGraph::Checkpointed(_), _))));
        let value_diff = (&lp.logp - &plain).abs().max().double_value(&[]);
        assert!(value_diff < 1e-5, "checkpointed log-probs differ by {value_diff}");
        let loss = (&lp.logp * &weights).sum(tch::Kind::Float);
        lp.backward(&policy, &loss);
        for ((name, _), (g, w)) in policy.named_parameters().iter().zip(grads(&policy).iter().zip(&want)) {
            let scale = w.abs().max().double_value(&[]).max(1e-6);
            let diff = (g - w).abs().max().double_value(&[]);
            assert!(diff <= 1e-4 * scale, "{name}: checkpointed gradient differs by {diff:e} (scale {scale:e})");
        }
        // Under no_grad there is no graph: values only.
        for checkpoint in [false, true] {
            let frozen = tch::no_grad(|| TokenLogprobs::new(&policy, &input, &target, 0.7, checkpoint));
            assert!(!frozen.logp.requires_grad() && frozen.hidden.is_none());
        }
    }

    #[test]
    fn split_even_covers_all_rows() {
        let rows: Vec<u32> = (0..10).collect();
        let parts = split_even(&rows, 3);
        assert_eq!(parts.iter().map(|p| p.len()).collect::<Vec<_>>(), vec![4, 3, 3]);
        assert_eq!(parts.concat(), rows);
        // Data-parallel ranks need the same number of parts even with few rows.
        assert_eq!(split_even(&rows[..2], 3).iter().map(|p| p.len()).collect::<Vec<_>>(), vec![1, 1, 0]);
    }
}
