//! The single-process trainer: draw prompts, sample G completions each, score,
//! take a GRPO step with AdamW; optionally a supervised warm-up first; evaluate
//! on held-out prompts; checkpoint and resume exactly.
//!
//! The pieces are public so the distributed learner can reuse them:
//! [`Trainer::collect`] (rollouts), [`Trainer::train_on`] (loss, backward and
//! optimizer step on a set of groups) and [`Trainer::evaluate`].
//!
//! Data parallelism: a trainer holds a [`Collective`]. With more than one rank,
//! loss denominators and gradients are summed over ranks before each optimizer
//! step, so N ranks on N shards take the step one rank takes on the whole batch.
//!
//! Determinism: every random draw comes from a ChaCha stream keyed by
//! (seed, phase, step), and problems are a pure function of the data cursor, so
//! a resumed run repeats exactly what the uninterrupted run would have done.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use sluice_core::budget::{self, History};
use sluice_core::config::{Algorithm, JobConfig};
use sluice_core::diffusion::{elbo, McSample};
use sluice_core::generate::{generate, SamplingParams};
use sluice_core::hf::{load_policy, Policy};
use sluice_core::model::token_logprobs;
use sluice_core::rollout::{collect, Group};
use sluice_core::tasks::{self, Problem, Split, Task};
use sluice_core::tokenizer::Tokenizer;
use tch::{Device, Tensor};

use crate::algo::bgpo;
use crate::algo::grpo::{self, Denominators, LossInputs};
use crate::checkpoint::{self, TrainerState};
use crate::collective::{all_reduce_f64, Collective, Single};
use crate::error::{Error, Result};
use crate::optim::{AdamW, AdamWConfig, StepReport};

/// What happened in one GRPO step.
#[derive(Debug, Clone, Serialize)]
pub struct StepMetrics {
    pub step: u64,
    /// Mean reward the loss used (extrinsic plus intrinsic, before shaping) over all sampled rollouts.
    pub reward_mean: f64,
    /// Mean of the task's own reward (verifier or environment) over the same rollouts.
    pub extrinsic_mean: f64,
    /// Share of sampled rollouts in groups with a non-zero advantage.
    pub effective_gradient_ratio: f64,
    /// Rollouts sampled this step (refills included; 0 for the distributed learner, whose actors sample).
    pub rollouts_sampled: usize,
    pub groups_trained: usize,
    pub rollouts_trained: usize,
    pub pg_loss: f64,
    pub kl: f64,
    pub clip_fraction: f64,
    pub grad_norm: f64,
    /// Optimizer steps skipped because the loss or gradient was not finite.
    pub skipped_updates: usize,
    pub response_len_mean: f64,
    pub generation_tokens_per_s: f64,
    pub train_tokens_per_s: f64,
    pub step_seconds: f64,
    /// Mean policy-version lag of the trained groups (0 when rollouts are on-policy).
    pub staleness_mean: f64,
    /// Seconds the step waited for rollouts (distributed learner).
    pub wait_seconds: f64,
}

/// What happened in one supervised warm-up step.
#[derive(Debug, Clone, Serialize)]
pub struct SftMetrics {
    pub sft_step: u64,
    pub loss: f64,
    pub grad_norm: f64,
    pub skipped: bool,
}

/// Events the trainer reports while it runs (also appended to `metrics.jsonl`).
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    Sft(SftMetrics),
    Step(StepMetrics),
    Eval { step: u64, sft_step: u64, reward_mean: f64, prompts: usize },
    Checkpoint { step: u64, path: PathBuf },
}

/// One training sequence: prompt, response, behaviour log-probs and advantage.
struct Row<'a> {
    prompt: &'a [i64],
    response: &'a [i64],
    old_logp: Option<&'a [f32]>,
    /// Per response token: train on it? Empty = every token.
    loss_mask: &'a [bool],
    advantage: f64,
}

/// Right-padded tensors for a micro-batch of rows.
struct Batch {
    input: Tensor,
    target: Tensor,
    mask: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    tokens: f64,
}

impl Row<'_> {
    /// Response tokens the loss trains on.
    fn trained_tokens(&self) -> f64 {
        if self.loss_mask.is_empty() {
            self.response.len() as f64
        } else {
            self.loss_mask.iter().filter(|&&m| m).count() as f64
        }
    }
}

impl Batch {
    /// `input` = (prompt ++ response)[..-1], `target` = [1..]; the mask covers response tokens.
    fn new(rows: &[&Row], pad: i64, device: Device) -> Self {
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

pub struct Trainer {
    cfg: JobConfig,
    policy: Policy,
    reference: Option<Policy>,
    tokenizer: Tokenizer,
    task: Box<dyn Task>,
    /// Recent rewards per prompt, for knapsack budgets (saved in checkpoints).
    history: History,
    opt: AdamW,
    state: TrainerState,
    sampling: SamplingParams,
    out_dir: PathBuf,
    comm: Box<dyn Collective>,
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer").field("state", &self.state).field("policy", &self.policy).finish()
    }
}

fn rng_for(seed: u64, phase: u64, step: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream((phase << 48) | step);
    rng
}

impl Trainer {
    /// A fresh trainer, or one resumed from the newest checkpoint in `cfg.train.out_dir`
    /// when `resume` is set and one exists.
    pub fn new(cfg: JobConfig, resume: bool) -> Result<Self> {
        Self::with_collective(cfg, resume, Box::new(Single))
    }

    /// A trainer that is one rank of a data-parallel group. Rank 0 restores the
    /// checkpoint (when resuming) and then broadcasts parameters, optimizer state
    /// and counters, so every rank starts identical even without shared storage.
    pub fn with_collective(cfg: JobConfig, resume: bool, comm: Box<dyn Collective>) -> Result<Self> {
        cfg.validate()?;
        let (policy, tokenizer) = load_policy(&cfg.model)?;
        match (cfg.algorithm, policy.config().is_diffusion()) {
            (Algorithm::Bgpo, false) => {
                return Err(sluice_core::Error::config("algorithm", "`bgpo` needs a masked diffusion policy (config.json with mask_token_id)").into())
            }
            (Algorithm::Grpo, true) => {
                return Err(sluice_core::Error::config("algorithm", "a diffusion policy trains with algorithm = \"bgpo\"").into())
            }
            _ => {}
        }
        let reference = if cfg.grpo.kl_coef > 0.0 {
            let (mut r, _) = load_policy(&cfg.model)?;
            r.copy_from(&policy)?;
            r.var_store_mut().freeze();
            Some(r)
        } else {
            None
        };
        let task = tasks::build(&cfg.task)?;
        let t = &cfg.train;
        let opt_cfg =
            AdamWConfig { lr: t.lr, beta1: t.beta1, beta2: t.beta2, eps: t.adam_eps, weight_decay: t.weight_decay };
        let opt = AdamW::new(policy.named_parameters(), opt_cfg);
        let mut sampling = cfg.sampling.clone();
        if !sampling.stop_token_ids.contains(&tokenizer.eos_id()) {
            sampling.stop_token_ids.push(tokenizer.eos_id());
        }
        let state = TrainerState { step: 0, sft_step: 0, cursor: 0, seed: t.seed, optimizer_t: 0 };
        let out_dir = t.out_dir.clone();
        let history = History::new(cfg.budget.history);
        let mut trainer = Trainer { cfg, policy, reference, tokenizer, task, opt, state, sampling, out_dir, comm, history };
        if resume && trainer.comm.rank() == 0 {
            if let Some(dir) = checkpoint::latest(&trainer.out_dir)? {
                trainer.state = checkpoint::restore(&dir, &mut trainer.policy, &mut trainer.opt)?;
                trainer.history = checkpoint::read_history(&dir)?;
                tracing::info!(checkpoint = %dir.display(), step = trainer.state.step, "resumed");
            }
        }
        if trainer.comm.world_size() > 1 {
            trainer.sync_from_root()?;
        }
        Ok(trainer)
    }

    /// Copies rank 0's parameters, optimizer state and counters to every rank.
    fn sync_from_root(&mut self) -> Result<()> {
        let mut params: Vec<Tensor> = self.policy.named_parameters().into_iter().map(|(_, t)| t).collect();
        self.comm.broadcast_from_root(&mut params)?;
        let mut opt_state: Vec<Tensor> = self.opt.state_tensors().into_iter().map(|(_, t)| t).collect();
        self.comm.broadcast_from_root(&mut opt_state)?;
        let s = &self.state;
        let mut counters = [Tensor::from_slice(&[s.step as f64, s.sft_step as f64, s.cursor as f64, s.optimizer_t as f64])];
        self.comm.broadcast_from_root(&mut counters)?;
        let c = Vec::<f64>::try_from(&counters[0]).map_err(Error::from)?;
        (self.state.step, self.state.sft_step, self.state.cursor) = (c[0] as u64, c[1] as u64, c[2] as u64);
        self.state.optimizer_t = c[3] as i64;
        self.opt.t = self.state.optimizer_t;
        Ok(())
    }

    /// This trainer's rank and the world size.
    pub fn rank(&self) -> (usize, usize) {
        (self.comm.rank(), self.comm.world_size())
    }

    pub fn state(&self) -> &TrainerState {
        &self.state
    }
    pub fn policy(&self) -> &Policy {
        &self.policy
    }
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }
    pub fn config(&self) -> &JobConfig {
        &self.cfg
    }
    pub fn out_dir(&self) -> &Path {
        &self.out_dir
    }

    fn temperature(&self) -> f64 {
        if self.sampling.temperature > 0.0 {
            self.sampling.temperature
        } else {
            1.0
        }
    }

    fn next_problems(&mut self, n: usize) -> Vec<Problem> {
        let start = self.state.cursor;
        self.state.cursor += n as u64;
        (start..start + n as u64).map(|i| self.task.problem(Split::Train, i)).collect()
    }

    /// Rollouts per problem under the job's budget strategy (see `sluice_core::budget`).
    pub fn budget(&self, problems: &[Problem]) -> Vec<usize> {
        let ids: Vec<u64> = problems.iter().map(|p| p.id).collect();
        budget::sizes(&self.cfg.budget, self.cfg.grpo.group_size, &self.history, &ids)
    }

    /// Samples each problem's budget of completions (or episodes), scores them,
    /// and adds the rewards to the problems' outcome history.
    pub fn collect(&mut self, problems: &[Problem], rng: &mut ChaCha8Rng) -> Result<(Vec<Group>, f64)> {
        let sizes = self.budget(problems);
        let c = collect(
            self.policy.model(),
            &self.tokenizer,
            self.task.as_ref(),
            problems,
            &sizes,
            &self.sampling,
            self.state.step,
            rng,
        )?;
        for g in &c.groups {
            self.history.record(g.prompt_id, g.rewards());
        }
        Ok((c.groups, c.generate_s))
    }

    /// The sampling parameters actors use (the tokenizer's EOS is always a stop token).
    pub fn sampling(&self) -> &SamplingParams {
        &self.sampling
    }

    /// Log-probs of `batch.target` under `policy` (with gradient unless called under no_grad).
    fn logprobs(policy: &Policy, batch: &Batch, temperature: f64) -> Tensor {
        let logits = policy.model().forward(&batch.input);
        token_logprobs(&logits, &batch.target, temperature)
    }

    /// One GRPO step: collect, shape, filter, train.
    pub fn grpo_step(&mut self) -> Result<StepMetrics> {
        let t0 = Instant::now();
        let mut rng = rng_for(self.state.seed, 1, self.state.step);
        let want = self.cfg.train.prompts_per_step;
        let problems = self.next_problems(want);
        let (mut groups, mut gen_s) = self.collect(&problems, &mut rng)?;
        let mut sampled: Vec<f64> = groups.iter().flat_map(Group::rewards).collect();
        let mut gen_tokens: usize = groups.iter().flat_map(|g| &g.rollouts).map(|r| r.response_tokens.len()).sum();
        // DAPO dynamic sampling: keep informative groups, refill from new prompts.
        if self.cfg.grpo.filter_zero_variance {
            groups.retain(|g| grpo::has_reward_variance(&g.rewards()));
            for _ in 0..self.cfg.grpo.max_refill_rounds {
                if groups.len() >= want {
                    break;
                }
                let more = self.next_problems(want - groups.len());
                let (new, s) = self.collect(&more, &mut rng)?;
                gen_s += s;
                sampled.extend(new.iter().flat_map(Group::rewards));
                gen_tokens += new.iter().flat_map(|g| &g.rollouts).map(|r| r.response_tokens.len()).sum::<usize>();
                groups.extend(new.into_iter().filter(|g| grpo::has_reward_variance(&g.rewards())));
            }
            groups.truncate(want);
        }
        let reward_mean = sampled.iter().sum::<f64>() / sampled.len().max(1) as f64;
        let mut m = self.train_on(&groups)?;
        m.reward_mean = reward_mean;
        // In this process rewards come from the task alone.
        m.extrinsic_mean = reward_mean;
        m.rollouts_sampled = sampled.len();
        m.generation_tokens_per_s = gen_tokens as f64 / gen_s.max(1e-9);
        m.step_seconds = t0.elapsed().as_secs_f64();
        self.state.step += 1;
        m.step = self.state.step;
        Ok(m)
    }

    /// Shapes rewards, computes group advantages and runs `epochs x mini_batches`
    /// optimizer steps on `groups` (this rank's shard). Fills every metric except
    /// reward, generation speed, step and step time. Every rank of a
    /// data-parallel group must call it once per step (with any number of groups).
    pub fn train_on(&mut self, groups: &[Group]) -> Result<StepMetrics> {
        let c = self.cfg.grpo.clone();
        let max_len = self.sampling.max_new_tokens as usize;
        let mut advantages = Vec::new();
        let mut effective = 0usize;
        let mut total = 0usize;
        for g in groups {
            // DAPO eq. 13: overlong shaping is added to the reward before normalisation.
            let shaped: Vec<f64> = g
                .rollouts
                .iter()
                .map(|r| r.reward + grpo::overlong_penalty(r.response_tokens.len(), max_len, c.overlong_buffer))
                .collect();
            let adv = grpo::group_advantages(&shaped, c.norm_adv_by_std);
            total += adv.len();
            if adv.iter().any(|a| a.abs() > 1e-12) {
                effective += adv.len();
            }
            advantages.extend(adv);
        }
        let rows: Vec<Row> = groups
            .iter()
            .flat_map(|g| &g.rollouts)
            .zip(&advantages)
            .filter(|(r, _)| !r.response_tokens.is_empty())
            .map(|(r, &a)| Row {
                prompt: &r.prompt_tokens,
                response: &r.response_tokens,
                old_logp: Some(&r.logprobs),
                loss_mask: &r.loss_mask,
                advantage: a,
            })
            .collect();
        let mut counts = [
            effective as f64,
            total as f64,
            groups.len() as f64,
            rows.len() as f64,
            rows.iter().map(|r| r.response.len()).sum::<usize>() as f64,
        ];
        all_reduce_f64(self.comm.as_mut(), &mut counts)?;
        let [effective, total, n_groups, n_rows, response_tokens] = counts;
        let mut m = StepMetrics {
            step: self.state.step,
            reward_mean: 0.0,
            extrinsic_mean: 0.0,
            effective_gradient_ratio: effective / total.max(1.0),
            rollouts_sampled: 0,
            groups_trained: n_groups as usize,
            rollouts_trained: n_rows as usize,
            pg_loss: 0.0,
            kl: 0.0,
            clip_fraction: 0.0,
            grad_norm: 0.0,
            skipped_updates: 0,
            response_len_mean: response_tokens / n_rows.max(1.0),
            generation_tokens_per_s: 0.0,
            train_tokens_per_s: 0.0,
            step_seconds: 0.0,
            staleness_mean: 0.0,
            wait_seconds: 0.0,
        };
        if n_rows == 0.0 {
            return Ok(m);
        }
        if self.cfg.algorithm == Algorithm::Bgpo {
            return self.bgpo_update(groups, &advantages, n_groups, m);
        }
        let t0 = Instant::now();
        let (mut trained_tokens, mut clipped, mut updates) = (0.0, 0.0, 0usize);
        let budget = self.cfg.generation_budget() as f64;
        let device = self.policy.device();
        let temperature = self.temperature();
        self.opt.cfg.lr = self.cfg.train.lr;
        for _epoch in 0..c.epochs {
            // Exactly `mini_batches` parts on every rank (some may be empty), so
            // all ranks make the same collective calls.
            for mb in split_even(&rows, c.mini_batches) {
                let mut den = [mb.iter().map(|r| r.trained_tokens()).sum::<f64>(), mb.len() as f64];
                all_reduce_f64(self.comm.as_mut(), &mut den)?;
                if den[1] == 0.0 {
                    continue;
                }
                let d = Denominators { tokens: den[0].max(1.0), seqs: den[1], budget };
                let mut finite = true;
                let (mut pg, mut kl) = (0.0, 0.0);
                for micro in mb.chunks(self.cfg.train.micro_batch_size) {
                    let micro: Vec<&Row> = micro.iter().collect();
                    let batch = Batch::new(&micro, self.tokenizer.pad_id(), device);
                    let logp = Self::logprobs(&self.policy, &batch, temperature);
                    let ref_logp = self
                        .reference
                        .as_ref()
                        .map(|r| tch::no_grad(|| Self::logprobs(r, &batch, temperature)));
                    let x = LossInputs {
                        logp: &logp,
                        old_logp: &batch.old_logp,
                        ref_logp: ref_logp.as_ref(),
                        advantages: &batch.advantages,
                        mask: &batch.mask,
                    };
                    let out = grpo::grpo_loss(&x, &c, d);
                    let value = out.loss.double_value(&[]);
                    if !value.is_finite() {
                        finite = false;
                        break;
                    }
                    out.loss.backward();
                    pg += out.pg;
                    kl += out.kl;
                    clipped += out.clipped_tokens;
                    trained_tokens += batch.tokens;
                }
                let report = self.reduce_and_step(finite, self.cfg.train.max_grad_norm)?;
                let mut parts = [pg, kl];
                all_reduce_f64(self.comm.as_mut(), &mut parts)?;
                if report.skipped {
                    m.skipped_updates += 1;
                    tracing::warn!(step = self.state.step, "non-finite loss or gradient: optimizer step skipped");
                } else {
                    updates += 1;
                    m.pg_loss += parts[0];
                    m.kl += parts[1];
                    m.grad_norm += report.grad_norm;
                }
            }
        }
        let mut tokens = [clipped, trained_tokens];
        all_reduce_f64(self.comm.as_mut(), &mut tokens)?;
        let n = updates.max(1) as f64;
        m.pg_loss /= n;
        m.kl /= n;
        m.grad_norm /= n;
        m.clip_fraction = tokens[0] / tokens[1].max(1.0);
        m.train_tokens_per_s = tokens[1] / t0.elapsed().as_secs_f64().max(1e-9);
        self.state.optimizer_t = self.opt.t;
        Ok(m)
    }

    /// The supervised loss of a diffusion policy: the negative ELBO of the
    /// demonstrations (one Monte Carlo sample each, responses padded with EOS
    /// to the sampler's fixed length), per response token.
    fn diffusion_sft(&mut self, data: &[(Vec<i64>, Vec<i64>)], tokens: f64) -> Result<(f64, bool)> {
        let len = self.sampling.max_new_tokens as usize;
        let eos = self.tokenizer.eos_id();
        let (rank, _) = self.rank();
        let mut rng = rng_for(self.state.seed, (3 << 8) | rank as u64, self.state.sft_step);
        let mut loss_sum = 0.0;
        for chunk in data.chunks(self.cfg.train.micro_batch_size.max(1)) {
            let prompts: Vec<Vec<i64>> = chunk.iter().map(|(p, _)| p.clone()).collect();
            let responses: Vec<Vec<i64>> = chunk
                .iter()
                .map(|(_, r)| r.iter().copied().chain(std::iter::repeat(eos)).take(len).collect())
                .collect();
            let samples: Vec<McSample> = responses.iter().map(|r| McSample::draw(r.len(), &mut rng)).collect();
            let l = elbo(self.policy.model(), &prompts, &responses, &samples.iter().collect::<Vec<_>>(), self.tokenizer.pad_id())?;
            let loss = -l.sum(tch::Kind::Float) / tokens.max(1.0);
            let v = loss.double_value(&[]);
            if !v.is_finite() {
                return Ok((loss_sum, false));
            }
            loss.backward();
            loss_sum += v;
        }
        Ok((loss_sum, true))
    }

    /// One BGPO update (`algo::bgpo`): θ_old is the policy at the start of the
    /// step (as when old log-probs are recomputed on the learner); each
    /// micro-batch draws its Monte Carlo samples from the step's RNG stream,
    /// computes l_j(θ_old) without a graph, and runs one backward pass per
    /// sample. `clip_fraction` reports the share of clamped or skipped terms.
    fn bgpo_update(&mut self, groups: &[Group], advantages: &[f64], n_groups: f64, mut m: StepMetrics) -> Result<StepMetrics> {
        let n = self.cfg.bgpo.mc_samples;
        let mut adv = advantages.iter();
        let mut seqs = Vec::new();
        for g in groups {
            let weight = 1.0 / (g.rollouts.len() as f64 * n_groups.max(1.0));
            for r in &g.rollouts {
                let advantage = *adv.next().expect("one advantage per rollout");
                if !r.response_tokens.is_empty() {
                    seqs.push(bgpo::Sequence { prompt: r.prompt_tokens.clone(), response: r.response_tokens.clone(), advantage, weight });
                }
            }
        }
        let t0 = Instant::now();
        // Samples keyed by (seed, step, rollout): independent of how the batch
        // is split over ranks and micro-batches.
        let key = rng_for(self.state.seed, 2, self.state.step).next_u64();
        let pad = self.tokenizer.pad_id();
        self.opt.cfg.lr = self.cfg.train.lr;
        let (mut objective, mut odd, mut finite) = (0.0, 0usize, true);
        for chunk in seqs.chunks(self.cfg.train.micro_batch_size.max(1)) {
            let model = self.policy.model();
            let samples = bgpo::draw_keyed(chunk, n, key);
            let old = bgpo::old_elbos(model, chunk, &samples, pad)?;
            let r = bgpo::bgpo_backward(model, chunk, &samples, &old, pad)?;
            if !r.objective.is_finite() {
                finite = false;
                break;
            }
            objective += r.objective;
            odd += r.clamped + r.skipped;
        }
        let report = self.reduce_and_step(finite, self.cfg.train.max_grad_norm)?;
        let tokens: usize = seqs.iter().map(|s| s.response.len()).sum();
        let mut parts = [objective, odd as f64, (seqs.len() * n) as f64, (tokens * n) as f64];
        all_reduce_f64(self.comm.as_mut(), &mut parts)?;
        if report.skipped {
            m.skipped_updates = 1;
            tracing::warn!(step = self.state.step, "non-finite BGPO objective or gradient: optimizer step skipped");
        } else {
            m.pg_loss = -parts[0];
            m.grad_norm = report.grad_norm;
        }
        m.clip_fraction = parts[1] / parts[2].max(1.0);
        m.train_tokens_per_s = parts[3] / t0.elapsed().as_secs_f64().max(1e-9);
        self.state.optimizer_t = self.opt.t;
        Ok(m)
    }

    /// One GRPO step on groups that arrived from actors (the distributed
    /// learner's step): trains, then advances the step (= the policy version).
    pub fn step_on(&mut self, groups: &[Group]) -> Result<StepMetrics> {
        let t0 = Instant::now();
        let all = || groups.iter().flat_map(|g| &g.rollouts);
        let mut sums = [all().map(|r| r.reward).sum::<f64>(), all().map(|r| r.extrinsic).sum(), all().count() as f64];
        all_reduce_f64(self.comm.as_mut(), &mut sums)?;
        let mut m = self.train_on(groups)?;
        m.reward_mean = sums[0] / sums[2].max(1.0);
        m.extrinsic_mean = sums[1] / sums[2].max(1.0);
        self.state.step += 1;
        m.step = self.state.step;
        m.step_seconds = t0.elapsed().as_secs_f64();
        Ok(m)
    }

    /// Sums gradients over ranks (and whether any rank saw a non-finite loss),
    /// then takes the optimizer step every rank takes.
    fn reduce_and_step(&mut self, finite: bool, max_norm: f64) -> Result<StepReport> {
        let skipped = StepReport { grad_norm: f64::NAN, skipped: true };
        if self.comm.world_size() == 1 {
            if finite {
                return Ok(self.opt.step(max_norm));
            }
            self.opt.zero_grad();
            return Ok(skipped);
        }
        let mut bad = [if finite { 0.0 } else { 1.0 }];
        all_reduce_f64(self.comm.as_mut(), &mut bad)?;
        if bad[0] > 0.0 {
            self.opt.zero_grad();
            return Ok(skipped);
        }
        let mut grads = self.opt.grads();
        self.comm.all_reduce_sum(&mut grads)?;
        Ok(self.opt.step(max_norm))
    }

    /// One supervised step on task demonstrations (prompt → answer + EOS). With
    /// several ranks each takes every world-th demonstration of the same batch.
    pub fn sft_step(&mut self) -> Result<SftMetrics> {
        let problems = self.next_problems(self.cfg.train.sft_batch_size);
        let (rank, world) = self.rank();
        let eos = self.tokenizer.eos_id();
        let mut data = Vec::with_capacity(problems.len());
        for p in problems.iter().skip(rank).step_by(world) {
            let prompt = self.tokenizer.encode(&p.prompt)?;
            let mut response = self.tokenizer.encode(&self.task.demonstration(p))?;
            response.push(eos);
            data.push((prompt, response));
        }
        let rows: Vec<Row> = data
            .iter()
            .map(|(p, r)| Row { prompt: p, response: r, old_logp: None, loss_mask: &[], advantage: 0.0 })
            .collect();
        let mut tokens = [rows.iter().map(|r| r.response.len() as f64).sum::<f64>()];
        all_reduce_f64(self.comm.as_mut(), &mut tokens)?;
        self.opt.cfg.lr = self.cfg.train.sft_lr;
        let mut loss_sum = 0.0;
        let mut finite = true;
        if self.policy.config().is_diffusion() {
            (loss_sum, finite) = self.diffusion_sft(&data, tokens[0])?;
        } else {
            for micro in rows.chunks(self.cfg.train.micro_batch_size) {
                let micro: Vec<&Row> = micro.iter().collect();
                let batch = Batch::new(&micro, self.tokenizer.pad_id(), self.policy.device());
                let logp = Self::logprobs(&self.policy, &batch, 1.0);
                let loss = grpo::sft_loss(&logp, &batch.mask, tokens[0]);
                let v = loss.double_value(&[]);
                if !v.is_finite() {
                    finite = false;
                    break;
                }
                loss.backward();
                loss_sum += v;
            }
        }
        let report = self.reduce_and_step(finite, self.cfg.train.max_grad_norm)?;
        let mut loss = [loss_sum];
        all_reduce_f64(self.comm.as_mut(), &mut loss)?;
        self.state.sft_step += 1;
        self.state.optimizer_t = self.opt.t;
        Ok(SftMetrics { sft_step: self.state.sft_step, loss: loss[0], grad_norm: report.grad_norm, skipped: report.skipped })
    }

    /// Mean reward of greedy answers to the first `n` held-out problems (for a
    /// multi-turn task: of one greedy episode each, i.e. the success rate).
    pub fn evaluate(&self, n: usize) -> Result<f64> {
        let problems: Vec<Problem> = (0..n as u64).map(|i| self.task.problem(Split::Eval, i)).collect();
        // Episodes and diffusion policies go through `collect` (greedy); plain
        // autoregressive completions are batched here directly.
        let episodes = problems.first().is_some_and(|p| self.task.episode(p).is_some());
        if episodes || self.policy.config().is_diffusion() {
            let params = SamplingParams { temperature: 0.0, ..self.sampling.clone() };
            let mut rng = rng_for(0, 0, 0);
            let ones = vec![1; problems.len()];
            let c = collect(self.policy.model(), &self.tokenizer, self.task.as_ref(), &problems, &ones, &params, 0, &mut rng)?;
            let total: f64 = c.groups.iter().flat_map(Group::rewards).sum();
            return Ok(total / n.max(1) as f64);
        }
        let prompts = problems.iter().map(|p| self.tokenizer.encode(&p.prompt)).collect::<Result<Vec<_>, _>>()?;
        let params = SamplingParams { temperature: 0.0, ..self.sampling.clone() };
        let mut rng = rng_for(0, 0, 0);
        let mut total = 0.0;
        for (ps, chunk) in problems.chunks(256).zip(prompts.chunks(256)) {
            let out = generate(self.policy.model(), chunk, &params, self.tokenizer.pad_id(), &mut rng)?;
            for (p, c) in ps.iter().zip(out) {
                total += p.score(&self.tokenizer.decode(&c.tokens)?);
            }
        }
        Ok(total / n.max(1) as f64)
    }

    pub fn save_checkpoint(&self) -> Result<PathBuf> {
        let (s, keep) = (&self.state, self.cfg.train.keep_checkpoints);
        checkpoint::save(&self.out_dir, &self.policy, &self.tokenizer, &self.opt, s, &self.history, keep)
    }

    /// Runs the rest of the job: warm-up, GRPO steps, evaluations and checkpoints.
    /// Stops early (after checkpointing) when `stop` is set. Events also go to
    /// `<out_dir>/metrics.jsonl`.
    pub fn run(&mut self, stop: &AtomicBool, on_event: impl FnMut(&Event)) -> Result<()> {
        self.run_with(stop, on_event, |t| t.grpo_step().map(Some))
    }

    /// [`Trainer::run`] with the GRPO step supplied by `next_step` (the
    /// distributed learner trains on rollouts from actors); `next_step` returns
    /// `None` to stop early. Rank 0 alone evaluates, checkpoints and writes
    /// `metrics.jsonl`; every rank reports its events to `on_event`.
    pub fn run_with(
        &mut self,
        stop: &AtomicBool,
        mut on_event: impl FnMut(&Event),
        mut next_step: impl FnMut(&mut Self) -> Result<Option<StepMetrics>>,
    ) -> Result<()> {
        let lead = self.comm.rank() == 0;
        let mut log = if lead { Some(EventLog::open(&self.out_dir)?) } else { None };
        let mut emit = |e: Event, on_event: &mut dyn FnMut(&Event)| -> Result<()> {
            if let Some(log) = log.as_mut() {
                log.write(&e)?;
            }
            on_event(&e);
            Ok(())
        };
        let t = self.cfg.train.clone();
        let eval = |tr: &Self, emit: &mut dyn FnMut(Event) -> Result<()>| -> Result<()> {
            if lead {
                let reward_mean = tr.evaluate(t.eval_prompts)?;
                emit(Event::Eval { step: tr.state.step, sft_step: tr.state.sft_step, reward_mean, prompts: t.eval_prompts })?;
            }
            Ok(())
        };
        let mut emit_now = |e: Event| emit(e, &mut on_event);
        if self.state.step == 0 && self.state.sft_step == 0 {
            eval(self, &mut emit_now)?;
        }
        let mut last_ckpt = (self.state.sft_step, self.state.step);
        while self.state.sft_step < t.sft_steps && !stop.load(Ordering::SeqCst) {
            let m = self.sft_step()?;
            emit_now(Event::Sft(m))?;
            if self.state.sft_step == t.sft_steps {
                eval(self, &mut emit_now)?;
            }
        }
        while self.state.step < t.steps && !stop.load(Ordering::SeqCst) {
            let Some(m) = next_step(self)? else { break };
            emit_now(Event::Step(m))?;
            let s = self.state.step;
            if t.eval_every > 0 && s.is_multiple_of(t.eval_every) && s != t.steps {
                eval(self, &mut emit_now)?;
            }
            if lead && t.checkpoint_every > 0 && s.is_multiple_of(t.checkpoint_every) {
                let path = self.save_checkpoint()?;
                last_ckpt = (self.state.sft_step, s);
                emit_now(Event::Checkpoint { step: s, path })?;
            }
        }
        if self.state.step == t.steps && !stop.load(Ordering::SeqCst) {
            eval(self, &mut emit_now)?;
        }
        if lead && last_ckpt != (self.state.sft_step, self.state.step) {
            let path = self.save_checkpoint()?;
            emit_now(Event::Checkpoint { step: self.state.step, path })?;
        }
        Ok(())
    }
}

/// `<out_dir>/metrics.jsonl`: one JSON event per line, appended.
pub struct EventLog {
    path: PathBuf,
    file: std::fs::File,
}

impl EventLog {
    pub fn open(out_dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;
        let path = out_dir.join("metrics.jsonl");
        let file =
            std::fs::OpenOptions::new().create(true).append(true).open(&path).map_err(|e| Error::io(&path, e))?;
        Ok(EventLog { path, file })
    }

    pub fn write(&mut self, e: &Event) -> Result<()> {
        let line = serde_json::to_string(e).expect("events serialise");
        writeln!(self.file, "{line}").map_err(|err| Error::io(&self.path, err))
    }
}

/// Splits `rows` into exactly `n` (at least 1) contiguous parts whose sizes
/// differ by at most one (so some are empty when `rows` has fewer than `n`).
fn split_even<T>(rows: &[T], n: usize) -> Vec<&[T]> {
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
    use sluice_core::generate::FinishReason;
    use sluice_core::rollout::Rollout;

    fn trainer(dir: &Path) -> Trainer {
        let text = format!(
            "[model]\npreset = \"tiny\"\ndevice = \"cpu\"\n[task]\nkind = \"arithmetic\"\n[train]\nout_dir = \"{}\"\n",
            dir.display()
        );
        Trainer::new(JobConfig::from_toml(&text).unwrap(), false).unwrap()
    }

    fn params(t: &Trainer) -> Vec<Tensor> {
        t.policy().named_parameters().into_iter().map(|(_, p)| p.detach().copy()).collect()
    }

    /// A group of two rollouts of prompt [5, 6, 7] with rewards 1 and 0.
    fn pair(response: &[i64], logprobs: &[f32], loss_mask: &[bool]) -> Group {
        let r = |reward| Rollout {
            prompt_id: 0,
            prompt_tokens: vec![5, 6, 7],
            response_tokens: response.to_vec(),
            logprobs: logprobs.to_vec(),
            loss_mask: loss_mask.to_vec(),
            captions: vec![],
            reward,
            extrinsic: reward,
            intrinsic: 0.0,
            version: 0,
            finish: FinishReason::Stop,
        };
        Group { prompt_id: 0, rollouts: vec![r(1.0), r(0.0)] }
    }

    fn group(logprob: f32) -> Group {
        pair(&[8, 1], &[logprob, logprob], &[])
    }

    /// Diffusion-policy rollouts in groups of uneven (knapsack) sizes.
    fn diffusion_groups() -> Vec<Group> {
        [2usize, 6, 4, 4]
            .iter()
            .enumerate()
            .map(|(g, &n)| {
                let rollouts = (0..n)
                    .map(|i| {
                        let reward = ((g * 3 + i) % 4) as f64 / 3.0;
                        Rollout {
                            prompt_id: g as u64,
                            prompt_tokens: vec![5 + g as i64, 6],
                            response_tokens: vec![8 + (i % 3) as i64, 9, 10 + (i % 4) as i64, 1],
                            logprobs: vec![0.0; 4],
                            loss_mask: vec![],
                            captions: vec![],
                            reward,
                            extrinsic: reward,
                            intrinsic: 0.0,
                            version: 0,
                            finish: FinishReason::Length,
                        }
                    })
                    .collect();
                Group { prompt_id: g as u64, rollouts }
            })
            .collect()
    }

    #[test]
    fn bgpo_on_two_ranks_equals_one_rank_with_uneven_groups() {
        use crate::collective::TcpCollective;
        let dir = tempfile::tempdir().unwrap();
        // adam_eps = 1: the first update is ~lr·g, so equal gradients give equal weights.
        let cfg = |name: &str| {
            JobConfig::from_toml(&format!(
                "algorithm = \"bgpo\"\n[model]\npreset = \"tiny-diffusion\"\ndevice = \"cpu\"\n[task]\nkind = \"arithmetic\"\n\
                 [sampling]\nmax_new_tokens = 4\n[bgpo]\nmc_samples = 3\n\
                 [train]\nprompts_per_step = 4\nmicro_batch_size = 5\nlr = 0.01\nadam_eps = 1.0\nout_dir = \"{}\"\n",
                dir.path().join(name).display()
            ))
            .unwrap()
        };
        let groups = diffusion_groups();
        let mut one = Trainer::new(cfg("one"), false).unwrap();
        let start = sluice_core::weights::encode(&one.policy.named_parameters(), tch::Kind::Float).unwrap();
        let names: Vec<String> = one.policy.named_parameters().into_iter().map(|(n, _)| n).collect();
        let before = params(&one);
        let m1 = one.step_on(&groups).unwrap();
        assert!(m1.grad_norm > 0.0 && m1.skipped_updates == 0, "{m1:?}");
        let want = params(&one);

        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        drop(l);
        let handles: Vec<_> = (0..2)
            .map(|rank| {
                let (addr, start, cfg) = (addr.clone(), start.clone(), cfg(&format!("rank{rank}")));
                let mine: Vec<Group> = groups[rank * 2..rank * 2 + 2].to_vec();
                std::thread::spawn(move || {
                    let comm = TcpCollective::connect(rank, 2, &addr, std::time::Duration::from_secs(30)).unwrap();
                    let mut t = Trainer::with_collective(cfg, false, Box::new(comm)).unwrap();
                    let named = sluice_core::weights::decode(&start).unwrap().into_iter().collect();
                    t.policy.set_parameters(named, Path::new("test")).unwrap();
                    t.step_on(&mine).unwrap();
                    params(&t).into_iter().map(|p| Vec::<f32>::try_from(p.reshape([-1])).unwrap()).collect::<Vec<_>>()
                })
            })
            .collect();
        let ranks: Vec<Vec<Vec<f32>>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let mut moved = 0.0f32;
        for (k, w) in want.iter().enumerate() {
            let w = Vec::<f32>::try_from(w.reshape([-1])).unwrap();
            let b = Vec::<f32>::try_from(before[k].reshape([-1])).unwrap();
            for r in &ranks {
                for ((x, y), z) in r[k].iter().zip(&w).zip(&b) {
                    assert!((x - y).abs() < 1e-6, "{}: rank {x} vs one-rank {y}", names[k]);
                    moved = moved.max((y - z).abs());
                }
            }
        }
        assert!(moved > 1e-4, "the update changed the weights ({moved})");
    }

    #[test]
    fn non_finite_loss_skips_the_update_and_keeps_weights() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = trainer(dir.path());
        let before = params(&t);
        let m = t.train_on(&[group(f32::NAN)]).unwrap();
        assert_eq!(m.skipped_updates, 1);
        assert_eq!(t.state().optimizer_t, 0);
        for (a, b) in before.iter().zip(params(&t)) {
            assert!(a.equal(&b), "weights changed on a skipped step");
        }
        // A finite batch afterwards trains normally.
        let m = t.train_on(&[group(-3.0)]).unwrap();
        assert_eq!((m.skipped_updates, t.state().optimizer_t), (0, 1));
        assert!(before.iter().zip(params(&t)).any(|(a, b)| !a.equal(&b)));
    }

    /// An episode's response: action, two environment tokens, action.
    fn episode(env_logprob: f32, mask: bool) -> Group {
        let mask: &[bool] = if mask { &[true, false, false, true] } else { &[] };
        pair(&[8, 20, 21, 1], &[-1.0, env_logprob, env_logprob, -1.5], mask)
    }

    #[test]
    fn environment_tokens_are_masked_out_of_the_loss() {
        let dir = tempfile::tempdir().unwrap();
        // Every run starts from the same weights (random init reads libtorch's global
        // RNG, which tests running in parallel share).
        let base = trainer(dir.path());
        let updated = |g: Group| {
            let mut t = trainer(dir.path());
            t.policy.copy_from(&base.policy).unwrap();
            t.train_on(&[g]).unwrap();
            params(&t)
        };
        // Whatever the (meaningless) log-probs of environment tokens, the update is the same...
        let a = updated(episode(0.0, true));
        let b = updated(episode(-9.0, true));
        for (x, y) in a.iter().zip(&b) {
            assert!(x.equal(y), "masked tokens changed the update");
        }
        // ...while training on them too (no mask) gives another update.
        let c = updated(episode(-9.0, false));
        assert!(a.iter().zip(&c).any(|(x, y)| !x.equal(y)), "the mask made no difference");
    }

    #[test]
    fn knapsack_history_survives_a_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "[model]\npreset = \"tiny\"\ndevice = \"cpu\"\n[task]\nkind = \"arithmetic\"\ntrain_size = 4\n\
             [sampling]\nmax_new_tokens = 2\n[grpo]\ngroup_size = 4\n[train]\nprompts_per_step = 4\nout_dir = \"{}\"\n\
             [budget]\nstrategy = \"knapsack\"\nmin_outcomes = 4\nn_up = 8\n",
            dir.path().display()
        );
        let cfg = JobConfig::from_toml(&text).unwrap();
        let mut t = Trainer::new(cfg.clone(), false).unwrap();
        let problems: Vec<Problem> = (0..4).map(|i| t.task.problem(Split::Train, i)).collect();
        assert_eq!(t.budget(&problems), vec![4; 4], "no history yet: the default N");
        t.grpo_step().unwrap();
        let rates: Vec<Option<f64>> = problems.iter().map(|p| t.history.rate(p.id, 4)).collect();
        assert!(rates.iter().all(Option::is_some), "every prompt has 4 outcomes: {rates:?}");
        let budget = t.budget(&problems);
        assert_eq!(budget.iter().sum::<usize>(), 16);
        t.save_checkpoint().unwrap();
        let resumed = Trainer::new(cfg, true).unwrap();
        assert_eq!(resumed.history, t.history);
        assert_eq!(resumed.budget(&problems), budget);
    }

    #[test]
    fn equal_rewards_give_no_effective_gradient() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = trainer(dir.path());
        let mut g = group(-2.0);
        g.rollouts[1].reward = 1.0;
        let m = t.train_on(&[g, group(-2.0)]).unwrap();
        assert!((m.effective_gradient_ratio - 0.5).abs() < 1e-12);
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
