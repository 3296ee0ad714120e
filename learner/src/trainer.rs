//! The trainer: one training loop for `sluice train` and the distributed
//! learner. Each step takes this rank's groups from a [`RolloutSource`]
//! (local sampling or the actors' buffer), scores them (group advantages),
//! and hands them to the job's [`Objective`] (GRPO or BGPO), which trains
//! through the step engine; before RL, an optional supervised warm-up
//! ([`Sft`]). Between steps: evaluation on held-out prompts, checkpoints, exact
//! resume.
//!
//! Data parallelism: the engine holds a collective. With more than one rank,
//! loss denominators and gradients are summed over ranks before each optimizer
//! step, so N ranks on N shards take the step one rank takes on the whole batch.
//!
//! Determinism: every random draw comes from a ChaCha stream keyed by
//! (seed, phase, step) ([`rng_for`]), and problems are a pure function of the
//! data cursor, so a resumed run repeats exactly what the uninterrupted run
//! would have done.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use rand_chacha::ChaCha8Rng;
use sluice_core::budget::{self, History};
use sluice_core::config::{Algorithm, JobConfig};
use sluice_core::rollout::Group;
use sluice_core::sampling::SamplingParams;
use sluice_core::tasks::{self, Problem, Split, Task};
use sluice_core::tokenizer::Tokenizer;
use sluice_model::collect::{collect, complete};
use sluice_model::hf::{load_policy, Policy};

use crate::algo::sft::Sft;
use crate::algo::{self, grpo, Objective, Scored};
use crate::checkpoint::{self, TrainerState};
use crate::collective::{all_gather_u64, Collective, Single};
use crate::engine::{rng_for, Batch, Engine, Row};
use crate::error::Result;
use crate::ingest::WorkIds;
use crate::metrics::{EvalSample, Event, EventLog, SftMetrics, StepMetrics};
use crate::optim::{AdamW, AdamWConfig};
use crate::rewards::RewardMix;
use crate::source::{Feed, Given, LocalSampling, RolloutSource};

/// Held-out prompts shown, with their greedy completions, in each evaluation event.
pub const EVAL_SAMPLES: usize = 3;

pub struct Trainer {
    cfg: JobConfig,
    engine: Engine,
    objective: Box<dyn Objective>,
    sft: Sft,
    tokenizer: Tokenizer,
    task: Box<dyn Task>,
    /// Recent rewards per prompt, for knapsack budgets (saved in checkpoints).
    history: History,
    /// Orchestrator work items trained on by any rank (saved in checkpoints).
    work_ids: WorkIds,
    /// Named reward components and their weights and multipliers, when the job sets any.
    mix: Option<RewardMix>,
    /// NuRL hints: outcomes of hinted groups (kept apart from `history`), the
    /// prompts ever seen failing every recent rollout, and this step's hinted
    /// groups (groups, rollouts, reward sum).
    hint_history: History,
    all_fail_ever: BTreeSet<u64>,
    /// Prompts whose latest group was hinted: the next one is not (hints
    /// alternate with plain tries, so a prompt can show it is solved).
    hinted_last: BTreeSet<u64>,
    hinted_now: [f64; 3],
    state: TrainerState,
    sampling: SamplingParams,
    out_dir: PathBuf,
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer").field("state", &self.state).field("engine", &self.engine).finish()
    }
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
        let (policy, mut tokenizer) = load_policy(&cfg.model)?;
        tokenizer.set_prompt(&cfg.prompt)?;
        match (cfg.algorithm, policy.config().is_diffusion()) {
            (Algorithm::Bgpo, false) => {
                return Err(sluice_core::Error::config("algorithm", "`bgpo` needs a masked diffusion policy (config.json with mask_token_id)").into())
            }
            (Algorithm::Grpo | Algorithm::Disco, true) => {
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
        sampling.stop_at(tokenizer.stop_ids());
        // Behaviour log-probs of greedy sampling are taken at temperature 1.
        let temperature = if sampling.temperature > 0.0 { sampling.temperature } else { 1.0 };
        let objective = algo::build(&cfg, temperature);
        let sft = Sft::new(&cfg, policy.config().is_diffusion(), tokenizer.eos_id());
        let state = TrainerState { step: 0, sft_step: 0, cursor: 0, seed: t.seed, optimizer_t: 0 };
        let out_dir = t.out_dir.clone();
        let history = History::new(cfg.budget.history);
        let mut engine = Engine::new(policy, reference, opt, comm, tokenizer.pad_id());
        engine.checkpoint_layers = t.activation_checkpointing;
        let work_ids = WorkIds::default();
        let mix = RewardMix::from_config(&cfg.reward, cfg.sampling.max_new_tokens as usize);
        let hint_history = History::new(cfg.budget.history);
        let mut trainer = Trainer {
            cfg,
            engine,
            objective,
            sft,
            tokenizer,
            task,
            state,
            sampling,
            out_dir,
            history,
            work_ids,
            mix,
            hint_history,
            all_fail_ever: BTreeSet::new(),
            hinted_last: BTreeSet::new(),
            hinted_now: [0.0; 3],
        };
        let (rank, world) = trainer.rank();
        if resume && rank == 0 {
            if let Some(dir) = checkpoint::latest(&trainer.out_dir)? {
                trainer.state = checkpoint::restore(&dir, &mut trainer.engine.policy, &mut trainer.engine.opt)?;
                trainer.history = checkpoint::read_history(&dir)?;
                trainer.work_ids = checkpoint::read_work_ids(&dir)?;
                if let Some(mix) = &mut trainer.mix {
                    mix.restore(&checkpoint::read_multipliers(&dir)?);
                    mix.restore_weights(&checkpoint::read_reward_weights(&dir)?);
                }
                tracing::info!(checkpoint = %dir.display(), step = trainer.state.step, "resumed");
            }
        }
        if world > 1 {
            trainer.engine.sync_from_root(&mut trainer.state)?;
            // Rank 0's restored set, on every rank (the others add nothing).
            let mine: Vec<u64> = trainer.work_ids.ids().collect();
            for id in all_gather_u64(trainer.engine.comm(), &mine)? {
                trainer.work_ids.insert(id);
            }
            // Rank 0's multipliers and weights on every rank (the others add zeros).
            if let Some(mix) = &mut trainer.mix {
                let mine = |m: &BTreeMap<String, f64>| -> (Vec<String>, Vec<f64>) {
                    (m.keys().cloned().collect(), m.values().map(|&v| if rank == 0 { v } else { 0.0 }).collect())
                };
                let (names, mut values) = mine(mix.multipliers());
                trainer.engine.all_reduce(&mut values)?;
                mix.restore(&names.into_iter().zip(values).collect());
                let (names, mut values) = mine(mix.weights());
                trainer.engine.all_reduce(&mut values)?;
                mix.restore_weights(&names.into_iter().zip(values).collect());
            }
        }
        Ok(trainer)
    }

    /// This trainer's rank and the world size.
    pub fn rank(&self) -> (usize, usize) {
        self.engine.rank()
    }

    /// The orchestrator work items trained on so far (restored from the checkpoint).
    pub fn work_ids(&self) -> &WorkIds {
        &self.work_ids
    }

    pub fn state(&self) -> &TrainerState {
        &self.state
    }
    pub fn policy(&self) -> &Policy {
        &self.engine.policy
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

    /// The next `n` training problems (advances the data cursor).
    pub fn next_problems(&mut self, n: usize) -> Vec<Problem> {
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
    /// and adds the rewards to the problems' outcome history. Returns the groups
    /// and the seconds generation took.
    ///
    /// NuRL hints: a problem whose recent outcomes are all failures (at least
    /// `hints.min_outcomes`) is shown with its hint; its group's outcomes go
    /// to a history of their own, so the prompt stays "unsolved" for budgets
    /// and hints until it is solved without one.
    pub fn collect(&mut self, problems: &[Problem], rng: &mut ChaCha8Rng) -> Result<(Vec<Group>, f64)> {
        let sizes = self.budget(problems);
        let hints = &self.cfg.hints;
        let mut hinted = BTreeSet::new();
        for p in problems {
            if self.history.rate(p.id, hints.min_outcomes) == Some(0.0) {
                self.all_fail_ever.insert(p.id);
                if hints.enabled && !self.hinted_last.contains(&p.id) {
                    hinted.insert(p.id);
                }
            }
        }
        for p in problems {
            if hinted.contains(&p.id) {
                self.hinted_last.insert(p.id);
            } else {
                self.hinted_last.remove(&p.id);
            }
        }
        // Copies of the problems only when some are shown with a hint.
        let shown: Option<Vec<Problem>> = (!hinted.is_empty()).then(|| {
            problems.iter().map(|p| if hinted.contains(&p.id) { p.with_hint(&hints.template) } else { p.clone() }).collect()
        });
        let c = collect(
            self.engine.policy.model(),
            &self.tokenizer,
            self.task.as_ref(),
            shown.as_deref().unwrap_or(problems),
            &sizes,
            &self.sampling,
            self.state.step,
            rng,
            None,
        )?;
        for g in &c.groups {
            if hinted.contains(&g.prompt_id) {
                self.hint_history.record(g.prompt_id, g.rewards());
                self.hinted_now[0] += 1.0;
                self.hinted_now[1] += g.rollouts.len() as f64;
                self.hinted_now[2] += g.rewards().iter().sum::<f64>();
            } else {
                self.history.record(g.prompt_id, g.rewards());
            }
        }
        Ok((c.groups, c.generate_s))
    }

    /// Recent outcomes per prompt without hints (what budgets and hints read).
    pub fn history(&self) -> &History {
        &self.history
    }

    /// Prompts that at some point had failed every recent rollout.
    pub fn all_fail_ever(&self) -> &BTreeSet<u64> {
        &self.all_fail_ever
    }

    /// The sampling parameters actors use (the tokenizer's EOS is always a stop token).
    pub fn sampling(&self) -> &SamplingParams {
        &self.sampling
    }

    /// One step with rollouts sampled by this process.
    pub fn grpo_step(&mut self) -> Result<StepMetrics> {
        Ok(self.step(&mut LocalSampling)?.expect("local sampling always yields a step"))
    }

    /// One step on groups the caller already has (see [`Given`]).
    pub fn step_on(&mut self, groups: &[Group]) -> Result<StepMetrics> {
        Ok(self.step(&mut Given::new(groups.to_vec()))?.expect("a given batch yields a step"))
    }

    /// One step: draws this rank's groups from `source`, trains on them, and
    /// advances the step (= the policy version). `None` when the source stopped.
    pub fn step(&mut self, source: &mut dyn RolloutSource) -> Result<Option<StepMetrics>> {
        let t0 = Instant::now();
        let Some(d) = source.next(self)? else { return Ok(None) };
        // Every rank records every rank's work items, so rank 0's checkpoint has them all.
        let mine: Vec<u64> = d.groups.iter().map(|g| g.work_id).filter(|&id| id != 0).collect();
        for id in all_gather_u64(self.engine.comm(), &mine)? {
            self.work_ids.insert(id);
        }
        let hinted = std::mem::take(&mut self.hinted_now);
        let interrupted = d.groups.iter().flat_map(|g| &g.rollouts).filter(|r| !r.switches.is_empty()).count();
        let mut sums = [d.reward_sum, d.extrinsic_sum, d.rollouts_seen as f64, hinted[0], hinted[1], hinted[2], interrupted as f64];
        self.engine.all_reduce(&mut sums)?;
        let mut m = self.train_on(&d.groups)?;
        m.hinted_groups = sums[3] as usize;
        m.interrupted_rollouts = sums[6] as usize;
        m.hinted_reward_mean = sums[5] / sums[4].max(1.0);
        m.reward_mean = sums[0] / sums[2].max(1.0);
        m.extrinsic_mean = sums[1] / sums[2].max(1.0);
        m.rollouts_sampled = d.rollouts_sampled;
        m.generation_tokens_per_s = if d.generate_s > 0.0 { d.generated_tokens as f64 / d.generate_s } else { 0.0 };
        m.wait_seconds = d.wait_s;
        m.staleness_mean = d.lags.iter().sum::<u64>() as f64 / d.lags.len().max(1) as f64;
        for &lag in &d.lags {
            // The last bucket holds every lag of 32 or more.
            let k = lag.min(32) as usize;
            if m.staleness_counts.len() <= k {
                m.staleness_counts.resize(k + 1, 0);
            }
            m.staleness_counts[k] += 1;
        }
        m.step_seconds = (t0.elapsed().as_secs_f64() - d.wait_s).max(0.0);
        self.state.step += 1;
        m.step = self.state.step;
        m.unix_time = crate::metrics::unix_time();
        Ok(Some(m))
    }

    /// Scores `groups` (this rank's shard: shaped rewards, group advantages)
    /// and trains on them with the job's objective. Fills every metric except
    /// reward, generation speed, step and step time. Every rank of a
    /// data-parallel group must call it once per step (with any number of groups).
    pub fn train_on(&mut self, groups: &[Group]) -> Result<StepMetrics> {
        // Dynamic weights: a mirror step from the components' gradient influences first.
        if let Some(mix) = self.mix.as_ref().filter(|_| self.cfg.reward.dynamic) {
            let per_component: Vec<Vec<Group>> = mix.weighted().iter().map(|k| mix.only(groups, k)).collect();
            let gram = self.component_gram(&per_component)?;
            let step = self.cfg.train.lr_at(self.state.step) / self.cfg.reward.dynamic_scale;
            if let Some(mix) = &mut self.mix {
                mix.mirror_step(&gram, step);
            }
        }
        // Several rewards: each rollout's reward becomes the weighted sum of its components.
        let mixed;
        let (groups, components) = match &self.mix {
            Some(mix) => {
                mixed = mix.apply(groups);
                let (sums, n) = mix.sums(groups);
                let mut values: Vec<f64> = sums.values().copied().chain([n]).collect();
                self.engine.all_reduce(&mut values)?;
                let n = values.pop().unwrap_or(0.0).max(1.0);
                let means: BTreeMap<String, f64> = sums.keys().cloned().zip(values.into_iter().map(|v| v / n)).collect();
                (&mixed[..], Some((means, mix.effective_weights())))
            }
            None => (groups, None),
        };
        let mut m = self.train_groups(groups)?;
        if let (Some(mix), Some((means, weights))) = (&mut self.mix, components) {
            // Dual ascent after the step, from the means of the rollouts it trained on.
            mix.update(&means);
            m.reward_components = means;
            m.reward_weights = weights;
        }
        Ok(m)
    }

    /// Gram matrix `<g_i, g_j>` of the policy gradients each component's groups
    /// give alone (the GRPO surrogate at the current weights, summed over
    /// ranks); nothing is stepped.
    fn component_gram(&mut self, per_component: &[Vec<Group>]) -> Result<Vec<Vec<f64>>> {
        let max_len = self.sampling.max_new_tokens as usize;
        let temperature = if self.sampling.temperature > 0.0 { self.sampling.temperature } else { 1.0 };
        let device = self.engine.policy.device();
        let mut grads: Vec<Vec<f32>> = Vec::with_capacity(per_component.len());
        for groups in per_component {
            let (adv, _) = grpo::advantages(groups, &self.cfg.grpo, max_len, self.cfg.advantage_clip());
            let mut rows = grpo::rows(groups, &adv);
            rows.retain(|r| r.old_logp.is_some());
            let mut den = [rows.iter().map(|r| r.trained_tokens()).sum::<f64>(), rows.len() as f64];
            self.engine.all_reduce(&mut den)?;
            let d = grpo::Denominators { tokens: den[0].max(1.0), seqs: den[1], budget: self.cfg.generation_budget() as f64 };
            for micro in rows.chunks(self.cfg.train.micro_batch_size) {
                let micro: Vec<&Row> = micro.iter().collect();
                let batch = Batch::new(&micro, self.engine.pad, device);
                let logp = self.engine.train_logprobs(&batch, temperature);
                let x = grpo::LossInputs {
                    logp: &logp.logp,
                    old_logp: &batch.old_logp,
                    prox_logp: None,
                    ref_logp: None,
                    advantages: &batch.advantages,
                    mask: &batch.mask,
                };
                let out = grpo::grpo_loss(&x, &self.cfg.grpo, d);
                logp.backward(&self.engine.policy, &out.loss);
            }
            grads.push(self.engine.take_gradient()?);
        }
        let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum::<f64>();
        Ok(grads.iter().map(|gi| grads.iter().map(|gj| dot(gi, gj)).collect()).collect())
    }

    fn train_groups(&mut self, groups: &[Group]) -> Result<StepMetrics> {
        let clip = self.cfg.advantage_clip();
        let (advantages, effective) = grpo::advantages(groups, &self.cfg.grpo, self.sampling.max_new_tokens as usize, clip);
        let trained = || groups.iter().flat_map(|g| &g.rollouts).filter(|r| !r.response_tokens.is_empty());
        let mut counts = [
            effective as f64,
            advantages.len() as f64,
            groups.len() as f64,
            trained().count() as f64,
            trained().map(|r| r.response_tokens.len()).sum::<usize>() as f64,
        ];
        self.engine.all_reduce(&mut counts)?;
        let [effective, total, n_groups, n_rows, response_tokens] = counts;
        let mut m = StepMetrics {
            step: self.state.step,
            effective_gradient_ratio: effective / total.max(1.0),
            groups_trained: n_groups as usize,
            rollouts_trained: n_rows as usize,
            response_len_mean: response_tokens / n_rows.max(1.0),
            ..StepMetrics::default()
        };
        if n_rows == 0.0 {
            return Ok(m);
        }
        let lr = self.cfg.train.lr_at(self.state.step);
        m.lr = lr;
        let scored = Scored { groups, advantages: &advantages, n_groups, step: self.state.step, seed: self.state.seed, lr };
        self.objective.update(&mut self.engine, &scored, &mut m)?;
        self.state.optimizer_t = self.engine.opt.t;
        Ok(m)
    }

    /// One supervised step on task demonstrations (prompt → answer + EOS). With
    /// several ranks each takes every world-th demonstration of the same batch.
    pub fn sft_step(&mut self) -> Result<SftMetrics> {
        let problems = self.next_problems(self.cfg.train.sft_batch_size);
        let (rank, world) = self.rank();
        let eos = self.tokenizer.eos_id();
        let mut data = Vec::with_capacity(problems.len());
        for p in problems.iter().skip(rank).step_by(world) {
            let prompt = self.tokenizer.encode_problem(p)?;
            let mut response = self.tokenizer.encode(&self.task.demonstration(p))?;
            response.push(eos);
            data.push((prompt, response));
        }
        let (loss, report) = self.sft.step(&mut self.engine, &data, self.state.seed, self.state.sft_step)?;
        self.state.sft_step += 1;
        self.state.optimizer_t = self.engine.opt.t;
        Ok(SftMetrics { sft_step: self.state.sft_step, loss, grad_norm: report.grad_norm, skipped: report.skipped })
    }

    /// Mean reward of greedy answers to the first `n` held-out problems (for a
    /// multi-turn task: of one greedy episode each, i.e. the success rate),
    /// with the first [`EVAL_SAMPLES`] prompts and their completions.
    pub fn evaluate(&self, n: usize) -> Result<(f64, Vec<EvalSample>)> {
        let problems: Vec<Problem> = (0..n as u64).map(|i| self.task.problem(Split::Eval, i)).collect();
        let params = SamplingParams { temperature: 0.0, ..self.sampling.clone() };
        let mut rng = rng_for(0, 0, 0);
        let model = self.engine.policy.model();
        let mut samples = Vec::new();
        let mut total = 0.0;
        if problems.first().is_some_and(|p| self.task.episode(p).is_some()) {
            // Episodes: one greedy episode per problem; the sample shows the
            // whole exchange (actions and observations).
            let ones = vec![1; problems.len()];
            let c = collect(model, &self.tokenizer, self.task.as_ref(), &problems, &ones, &params, 0, &mut rng, None)?;
            for (p, r) in problems.iter().zip(c.groups.iter().flat_map(|g| &g.rollouts)) {
                total += r.reward;
                if samples.len() < EVAL_SAMPLES {
                    let completion = self.tokenizer.decode(&r.response_tokens)?;
                    samples.push(EvalSample { prompt: self.tokenizer.render_problem(p)?, completion, reward: r.reward });
                }
            }
        } else {
            for chunk in problems.chunks(256) {
                for (p, s) in chunk.iter().zip(complete(model, &self.tokenizer, chunk, &params, &mut rng)?) {
                    let reward = p.score(&s.text);
                    total += reward;
                    if samples.len() < EVAL_SAMPLES {
                        samples.push(EvalSample { prompt: s.prompt, completion: s.text, reward });
                    }
                }
            }
        }
        Ok((total / n.max(1) as f64, samples))
    }

    pub fn save_checkpoint(&self) -> Result<PathBuf> {
        let (s, keep) = (&self.state, self.cfg.train.keep_checkpoints);
        let none = BTreeMap::new();
        let multipliers = self.mix.as_ref().map_or(&none, |m| m.multipliers());
        let reward_weights = self.mix.as_ref().map_or(&none, |m| m.weights());
        let records = checkpoint::Records { history: &self.history, work_ids: &self.work_ids, multipliers, reward_weights };
        checkpoint::save(&self.out_dir, &self.engine.policy, &self.tokenizer, &self.engine.opt, s, records, keep)
    }

    /// Runs the rest of the job with rollouts sampled by this process:
    /// warm-up, GRPO steps, evaluations and checkpoints. Stops early (after
    /// checkpointing) when `stop` is set. Events also go to `<out_dir>/metrics.jsonl`.
    pub fn run(&mut self, stop: &AtomicBool, on_event: impl FnMut(&Event)) -> Result<()> {
        self.run_with(stop, on_event, |t| t.step(&mut LocalSampling))
    }

    /// [`Trainer::run`] with the step supplied by `next_step` (the distributed
    /// learner calls [`Trainer::step`] on the actors' buffer and publishes
    /// weights around it); `next_step` returns `None` to stop early. Rank 0
    /// alone evaluates, checkpoints and writes `metrics.jsonl`; every rank
    /// reports its events to `on_event`.
    pub fn run_with(
        &mut self,
        stop: &AtomicBool,
        mut on_event: impl FnMut(&Event),
        mut next_step: impl FnMut(&mut Self) -> Result<Option<StepMetrics>>,
    ) -> Result<()> {
        let lead = self.rank().0 == 0;
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
                let (reward_mean, samples) = tr.evaluate(t.eval_prompts)?;
                let (step, sft_step, prompts) = (tr.state.step, tr.state.sft_step, t.eval_prompts);
                emit(Event::Eval { step, sft_step, reward_mean, prompts, samples })?;
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

impl Feed for Trainer {
    fn config(&self) -> &JobConfig {
        &self.cfg
    }
    fn state(&self) -> &TrainerState {
        &self.state
    }
    fn next_problems(&mut self, n: usize) -> Vec<Problem> {
        Trainer::next_problems(self, n)
    }
    fn collect(&mut self, problems: &[Problem], rng: &mut ChaCha8Rng) -> Result<(Vec<Group>, f64)> {
        Trainer::collect(self, problems, rng)
    }
}

#[cfg(test)]
mod tests;
