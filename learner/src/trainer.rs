//! The single-process trainer: draw prompts, sample G completions each, score,
//! take a GRPO step with AdamW; optionally a supervised warm-up first; evaluate
//! on held-out prompts; checkpoint and resume exactly.
//!
//! The pieces are public so the distributed learner can reuse them:
//! [`Trainer::collect`] (rollouts), [`Trainer::train_on`] (loss, backward and
//! optimizer step on a set of groups) and [`Trainer::evaluate`].
//!
//! Determinism: every random draw comes from a ChaCha stream keyed by
//! (seed, phase, step), and problems are a pure function of the data cursor, so
//! a resumed run repeats exactly what the uninterrupted run would have done.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use sluice_core::config::JobConfig;
use sluice_core::device::parse_device;
use sluice_core::generate::{generate, SamplingParams};
use sluice_core::hf::{parse_kind, Policy};
use sluice_core::model::{token_logprobs, ModelConfig};
use sluice_core::rollout::{Group, Rollout};
use sluice_core::tasks::{self, Problem, Split, Task};
use sluice_core::tokenizer::{Tokenizer, DEFAULT_ALPHABET};
use tch::{Device, Tensor};

use crate::algo::grpo::{self, Denominators, LossInputs};
use crate::checkpoint::{self, TrainerState};
use crate::error::{Error, Result};
use crate::optim::{AdamW, AdamWConfig};

/// What happened in one GRPO step.
#[derive(Debug, Clone, Serialize)]
pub struct StepMetrics {
    pub step: u64,
    /// Mean verifier reward of all sampled rollouts (before shaping).
    pub reward_mean: f64,
    /// Share of sampled rollouts in groups with a non-zero advantage.
    pub effective_gradient_ratio: f64,
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
            mask[start..start + r.response.len()].iter_mut().for_each(|m| *m = 1.0);
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
    opt: AdamW,
    state: TrainerState,
    sampling: SamplingParams,
    out_dir: PathBuf,
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer").field("state", &self.state).field("policy", &self.policy).finish()
    }
}

/// Builds the policy and tokenizer a config names.
pub fn load_policy(cfg: &JobConfig) -> Result<(Policy, Tokenizer)> {
    let m = &cfg.model;
    let device = parse_device(&m.device).map_err(|r| sluice_core::Error::config("model.device", r))?;
    let kind = parse_kind(&m.dtype).expect("validated dtype");
    if let Some(preset) = &m.preset {
        let tokenizer = Tokenizer::char_level(DEFAULT_ALPHABET)?;
        let mut mc = ModelConfig::preset(preset, tokenizer.vocab_size())?;
        mc.eos_token_id = Some(tokenizer.eos_id());
        mc.pad_token_id = Some(tokenizer.pad_id());
        Ok((Policy::random(&mc, device, kind, m.init_seed), tokenizer))
    } else {
        let dir = m.path.as_ref().expect("validated: preset or path");
        let policy = Policy::load(dir, device, kind)?;
        let tokenizer = Tokenizer::from_file(&dir.join("tokenizer.json"), policy.config().eos_token_id)?;
        Ok((policy, tokenizer))
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
        cfg.validate()?;
        let (policy, tokenizer) = load_policy(&cfg)?;
        let reference = if cfg.grpo.kl_coef > 0.0 {
            let (mut r, _) = load_policy(&cfg)?;
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
        let mut trainer = Trainer { cfg, policy, reference, tokenizer, task, opt, state, sampling, out_dir };
        if resume {
            if let Some(dir) = checkpoint::latest(&trainer.out_dir)? {
                trainer.state = checkpoint::restore(&dir, &mut trainer.policy, &mut trainer.opt)?;
                tracing::info!(checkpoint = %dir.display(), step = trainer.state.step, "resumed");
            }
        }
        Ok(trainer)
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

    /// Samples `group_size` completions for each problem and scores them.
    pub fn collect(&self, problems: &[Problem], rng: &mut ChaCha8Rng) -> Result<(Vec<Group>, f64)> {
        let g = self.cfg.grpo.group_size;
        let encoded = problems.iter().map(|p| self.tokenizer.encode(&p.prompt)).collect::<Result<Vec<_>, _>>()?;
        let prompts: Vec<Vec<i64>> = encoded.iter().flat_map(|p| std::iter::repeat_n(p.clone(), g)).collect();
        let t0 = Instant::now();
        let completions = generate(self.policy.model(), &prompts, &self.sampling, self.tokenizer.pad_id(), rng)?;
        let gen_s = t0.elapsed().as_secs_f64();
        let mut groups = Vec::with_capacity(problems.len());
        let mut it = completions.into_iter();
        for (p, prompt) in problems.iter().zip(encoded) {
            let mut rollouts = Vec::with_capacity(g);
            for c in it.by_ref().take(g) {
                let text = self.tokenizer.decode(&c.tokens)?;
                rollouts.push(Rollout {
                    prompt_id: p.id,
                    prompt_tokens: prompt.clone(),
                    reward: p.score(&text),
                    response_tokens: c.tokens,
                    logprobs: c.logprobs,
                    version: self.state.optimizer_t as u64,
                    finish: c.finish,
                });
            }
            groups.push(Group { prompt_id: p.id, rollouts });
        }
        Ok((groups, gen_s))
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
        m.generation_tokens_per_s = gen_tokens as f64 / gen_s.max(1e-9);
        m.step_seconds = t0.elapsed().as_secs_f64();
        self.state.step += 1;
        m.step = self.state.step;
        Ok(m)
    }

    /// Shapes rewards, computes group advantages and runs `epochs x mini_batches`
    /// optimizer steps on `groups`. Fills every metric except reward, generation
    /// speed, step and step time.
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
            .map(|(r, &a)| Row { prompt: &r.prompt_tokens, response: &r.response_tokens, old_logp: Some(&r.logprobs), advantage: a })
            .collect();
        let mut m = StepMetrics {
            step: self.state.step,
            reward_mean: 0.0,
            effective_gradient_ratio: effective as f64 / total.max(1) as f64,
            groups_trained: groups.len(),
            rollouts_trained: rows.len(),
            pg_loss: 0.0,
            kl: 0.0,
            clip_fraction: 0.0,
            grad_norm: 0.0,
            skipped_updates: 0,
            response_len_mean: rows.iter().map(|r| r.response.len()).sum::<usize>() as f64 / rows.len().max(1) as f64,
            generation_tokens_per_s: 0.0,
            train_tokens_per_s: 0.0,
            step_seconds: 0.0,
        };
        if rows.is_empty() {
            return Ok(m);
        }
        let t0 = Instant::now();
        let (mut trained_tokens, mut clipped, mut updates) = (0.0, 0.0, 0usize);
        let budget = self.cfg.generation_budget() as f64;
        let device = self.policy.device();
        let temperature = self.temperature();
        self.opt.cfg.lr = self.cfg.train.lr;
        for _epoch in 0..c.epochs {
            for mb in split_even(&rows, c.mini_batches) {
                let tokens: f64 = mb.iter().map(|r| r.response.len() as f64).sum();
                let d = Denominators { tokens, seqs: mb.len() as f64, budget };
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
                let report = if finite {
                    self.opt.step(self.cfg.train.max_grad_norm)
                } else {
                    self.opt.zero_grad();
                    crate::optim::StepReport { grad_norm: f64::NAN, skipped: true }
                };
                if report.skipped {
                    m.skipped_updates += 1;
                    tracing::warn!(step = self.state.step, "non-finite loss or gradient: optimizer step skipped");
                } else {
                    updates += 1;
                    m.pg_loss += pg;
                    m.kl += kl;
                    m.grad_norm += report.grad_norm;
                }
            }
        }
        let n = updates.max(1) as f64;
        m.pg_loss /= n;
        m.kl /= n;
        m.grad_norm /= n;
        m.clip_fraction = clipped / trained_tokens.max(1.0);
        m.train_tokens_per_s = trained_tokens / t0.elapsed().as_secs_f64().max(1e-9);
        self.state.optimizer_t = self.opt.t;
        Ok(m)
    }

    /// One supervised step on task demonstrations (prompt → answer + EOS).
    pub fn sft_step(&mut self) -> Result<SftMetrics> {
        let problems = self.next_problems(self.cfg.train.sft_batch_size);
        let eos = self.tokenizer.eos_id();
        let mut data = Vec::with_capacity(problems.len());
        for p in &problems {
            let prompt = self.tokenizer.encode(&p.prompt)?;
            let mut response = self.tokenizer.encode(&self.task.demonstration(p))?;
            response.push(eos);
            data.push((prompt, response));
        }
        let rows: Vec<Row> =
            data.iter().map(|(p, r)| Row { prompt: p, response: r, old_logp: None, advantage: 0.0 }).collect();
        let tokens: f64 = rows.iter().map(|r| r.response.len() as f64).sum();
        self.opt.cfg.lr = self.cfg.train.sft_lr;
        let mut loss_sum = 0.0;
        let mut finite = true;
        for micro in rows.chunks(self.cfg.train.micro_batch_size) {
            let micro: Vec<&Row> = micro.iter().collect();
            let batch = Batch::new(&micro, self.tokenizer.pad_id(), self.policy.device());
            let logp = Self::logprobs(&self.policy, &batch, 1.0);
            let loss = grpo::sft_loss(&logp, &batch.mask, tokens);
            let v = loss.double_value(&[]);
            if !v.is_finite() {
                finite = false;
                break;
            }
            loss.backward();
            loss_sum += v;
        }
        let report = if finite {
            self.opt.step(self.cfg.train.max_grad_norm)
        } else {
            self.opt.zero_grad();
            crate::optim::StepReport { grad_norm: f64::NAN, skipped: true }
        };
        self.state.sft_step += 1;
        self.state.optimizer_t = self.opt.t;
        Ok(SftMetrics { sft_step: self.state.sft_step, loss: loss_sum, grad_norm: report.grad_norm, skipped: report.skipped })
    }

    /// Mean reward of greedy answers to the first `n` held-out problems.
    pub fn evaluate(&self, n: usize) -> Result<f64> {
        let problems: Vec<Problem> = (0..n as u64).map(|i| self.task.problem(Split::Eval, i)).collect();
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
        checkpoint::save(&self.out_dir, &self.policy, &self.tokenizer, &self.opt, &self.state, self.cfg.train.keep_checkpoints)
    }

    /// Runs the rest of the job: warm-up, GRPO steps, evaluations and checkpoints.
    /// Stops early (after checkpointing) when `stop` is set. Events also go to
    /// `<out_dir>/metrics.jsonl`.
    pub fn run(&mut self, stop: &AtomicBool, mut on_event: impl FnMut(&Event)) -> Result<()> {
        std::fs::create_dir_all(&self.out_dir).map_err(|e| Error::io(&self.out_dir, e))?;
        let log_path = self.out_dir.join("metrics.jsonl");
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| Error::io(&log_path, e))?;
        let mut emit = |e: Event, on_event: &mut dyn FnMut(&Event)| -> Result<()> {
            let line = serde_json::to_string(&e).expect("events serialise");
            writeln!(log, "{line}").map_err(|err| Error::io(&log_path, err))?;
            on_event(&e);
            Ok(())
        };
        let t = self.cfg.train.clone();
        let eval = |tr: &Self| -> Result<Event> {
            Ok(Event::Eval {
                step: tr.state.step,
                sft_step: tr.state.sft_step,
                reward_mean: tr.evaluate(t.eval_prompts)?,
                prompts: t.eval_prompts,
            })
        };
        if self.state.step == 0 && self.state.sft_step == 0 {
            emit(eval(self)?, &mut on_event)?;
        }
        let mut last_ckpt = (self.state.sft_step, self.state.step);
        while self.state.sft_step < t.sft_steps && !stop.load(Ordering::SeqCst) {
            let m = self.sft_step()?;
            emit(Event::Sft(m), &mut on_event)?;
            if self.state.sft_step == t.sft_steps {
                emit(eval(self)?, &mut on_event)?;
            }
        }
        while self.state.step < t.steps && !stop.load(Ordering::SeqCst) {
            let m = self.grpo_step()?;
            emit(Event::Step(m), &mut on_event)?;
            let s = self.state.step;
            if t.eval_every > 0 && s.is_multiple_of(t.eval_every) && s != t.steps {
                emit(eval(self)?, &mut on_event)?;
            }
            if t.checkpoint_every > 0 && s.is_multiple_of(t.checkpoint_every) {
                let path = self.save_checkpoint()?;
                last_ckpt = (self.state.sft_step, s);
                emit(Event::Checkpoint { step: s, path }, &mut on_event)?;
            }
        }
        if self.state.step == t.steps && !stop.load(Ordering::SeqCst) {
            emit(eval(self)?, &mut on_event)?;
        }
        if last_ckpt != (self.state.sft_step, self.state.step) {
            let path = self.save_checkpoint()?;
            emit(Event::Checkpoint { step: self.state.step, path }, &mut on_event)?;
        }
        Ok(())
    }
}

/// Splits `rows` into `n` contiguous parts whose sizes differ by at most one.
fn split_even<T>(rows: &[T], n: usize) -> Vec<&[T]> {
    let n = n.clamp(1, rows.len().max(1));
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

    fn group(logprob: f32) -> Group {
        let r = |reward| Rollout {
            prompt_id: 0,
            prompt_tokens: vec![5, 6, 7],
            response_tokens: vec![8, 1],
            logprobs: vec![logprob, logprob],
            reward,
            version: 0,
            finish: FinishReason::Stop,
        };
        Group { prompt_id: 0, rollouts: vec![r(1.0), r(0.0)] }
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
    }
}
