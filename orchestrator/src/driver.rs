//! The per-job driver: turns a job's dataset into work items and keeps the
//! accounting exact.
//!
//! Work is cut into rounds of `train.prompts_per_step` prompts taken in order
//! from the training split (epochs wrap around `train_size`). Each prompt's
//! rollout budget `n` comes from the job's budget strategy: `grpo.group_size`
//! (uniform) or `Knapsack::allocate` over the success rates in the prompts'
//! outcome history (DESIGN.md, "Knapsack budget allocation"). At most
//! `rollout.max_staleness + 1` rounds are open at once, so the budget of a new
//! round sees the outcomes of the rounds before it (with staleness 0, all of them).
//!
//! Accounting invariants (what the fault tests check):
//! * an item is *outstanding* (pending or leased to one worker) until its first
//!   outcome arrives; then it is *complete* and removed — `work_created =
//!   work_completed + outstanding` at all times;
//! * a second outcome for a complete item is counted in `duplicate_outcomes`
//!   and changes nothing else;
//! * when a worker's lease expires, its items go back to the queue
//!   (`work_redispatched`), keeping their id, so the learner (which accepts one
//!   group per work id) never trains on an item twice.
//!
//! Everything here is plain data and a clock passed in (`now_ms`): no I/O.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};
use sluice_core::budget::{self, History};
use sluice_core::config::{BudgetStrategy, JobConfig, TaskConfig};
use sluice_core::ids::WorkIds;
use sluice_core::limits::MAX_EVENTS_PER_JOB;
use sluice_core::tasks::{self, Split, Task};
use sluice_proto::events;
use sluice_proto::v1::{self, event::Body};

use crate::error::{Error, Result};

/// Where a job is in its life. Final states never change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn is_final(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Failed | JobState::Cancelled)
    }

    pub fn name(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }
}

/// Counters of a job (see the module invariants).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    pub step: u64,
    pub total_steps: u64,
    pub work_created: u64,
    pub work_dispatched: u64,
    pub work_completed: u64,
    pub work_redispatched: u64,
    pub duplicate_outcomes: u64,
    pub rollouts_completed: u64,
    pub epoch: u64,
    #[serde(default)]
    pub events_dropped: u64,
    /// Items created with a NuRL hint.
    #[serde(default)]
    pub work_hinted: u64,
    /// What learners did with completed items (each id counted once; see
    /// [`Job::fates`]).
    #[serde(default)]
    pub work_trained: u64,
    #[serde(default)]
    pub work_dropped_stale: u64,
    #[serde(default)]
    pub work_dropped_invalid: u64,
    #[serde(default)]
    pub work_filtered: u64,
    #[serde(default)]
    pub work_unused: u64,
}

/// What the store keeps of a job besides its items, history and events.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: String,
    pub name: String,
    pub spec_toml: String,
    pub state: JobState,
    pub created_ms: u64,
    pub updated_ms: u64,
    pub message: String,
    pub progress: Progress,
    /// Next prompt position in the training stream.
    pub cursor: u64,
    pub next_item: u64,
    pub next_round: u64,
    /// Open rounds → their items not yet complete.
    pub open_rounds: BTreeMap<u64, u64>,
    /// Prompts whose latest item was hinted: their next one is not, so a
    /// prompt keeps being tried on its own (hints alternate with plain tries).
    #[serde(default)]
    pub hinted_last: std::collections::BTreeSet<u64>,
    /// Rounds opened for a starving learner: each stands for a round's worth
    /// of groups the learner dropped, so round r may open once the learner
    /// reached step `r - max_staleness - round_credit`.
    #[serde(default)]
    pub round_credit: u64,
    /// Items whose fate a learner reported (so a repeated report counts nothing).
    #[serde(default)]
    pub fated: WorkIds,
}

/// One prompt with its rollout budget, outstanding until its outcome arrives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Item {
    pub id: u64,
    pub round: u64,
    pub prompt_index: u64,
    /// The problem's id (the key of its outcome history).
    pub prompt_id: u64,
    pub n: usize,
    /// Times handed out before.
    pub attempt: u32,
    /// The worker holding it, when leased.
    pub worker: Option<String>,
    /// NuRL hint: the prompt had failed every recent rollout, so the actor
    /// shows it with its hint; the outcome stays out of the prompt's history.
    #[serde(default)]
    pub hint: bool,
}

/// What a mutation changed, for the store to persist.
#[derive(Debug, Default)]
pub struct Changes {
    pub record: bool,
    pub items: Vec<Item>,
    pub removed_items: Vec<u64>,
    pub history: Vec<u64>,
    pub events: Vec<String>,
}

/// One job: its record, outstanding items, outcome history and events.
pub struct Job {
    pub rec: JobRecord,
    pub cfg: JobConfig,
    /// The task when it is generated from the spec alone; `None` for datasets,
    /// whose files the orchestrator never opens (they live on the workers, under
    /// their data root).
    task: Option<Box<dyn Task>>,
    pub items: BTreeMap<u64, Item>,
    pending: VecDeque<u64>,
    pub history: History,
    /// Every event so far, oldest first (event `seq` = index).
    pub events: Vec<String>,
    /// When the learner's step last moved (memory only; 0 after a restart).
    step_moved_ms: u64,
    /// Moving average of the time between the learner's steps (memory only).
    step_interval_ms: f64,
}

/// A learner whose step has not moved for `STARVING_STEPS` of its usual step
/// intervals (at least `STARVING_MIN_MS`, at most `STARVING_MAX_MS`) while no
/// work is outstanding is starving — groups of its round were dropped — and
/// one more round opens (and stays credited) though the staleness rule would
/// hold it back.
pub const STARVING_STEPS: f64 = 3.0;
pub const STARVING_MIN_MS: u64 = 50;
pub const STARVING_MAX_MS: u64 = 3_000;

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job").field("rec", &self.rec).field("items", &self.items.len()).finish()
    }
}

/// The training split's size when the task has one (epochs wrap around it).
fn train_size(cfg: &TaskConfig) -> u64 {
    match cfg {
        TaskConfig::Arithmetic(a) => a.train_size,
        _ => 0,
    }
}

impl Job {
    /// A new queued job from a spec (validated; errors name the field).
    pub fn submit(id: String, spec_toml: String, now_ms: u64) -> Result<(Job, Changes)> {
        let cfg = JobConfig::from_toml(&spec_toml)?;
        let rec = JobRecord {
            id,
            name: cfg.name.clone(),
            spec_toml,
            state: JobState::Queued,
            created_ms: now_ms,
            updated_ms: now_ms,
            message: String::new(),
            progress: Progress { total_steps: cfg.train.steps, epoch: 1, ..Progress::default() },
            cursor: 0,
            next_item: 1,
            next_round: 0,
            open_rounds: BTreeMap::new(),
            hinted_last: Default::default(),
            round_credit: 0,
            fated: WorkIds::default(),
        };
        let mut job = Job::restore(rec, Vec::new(), History::new(cfg.budget.history), Vec::new())?;
        let mut ch = Changes { record: true, ..Changes::default() };
        let submitted = Body::Submitted(v1::JobSubmitted { job: job.rec.id.clone(), name: job.rec.name.clone() });
        job.event(&mut ch, now_ms, submitted);
        Ok((job, ch))
    }

    /// A job as the store kept it. Leases do not survive: every outstanding item
    /// is pending again (a worker that still holds one reports it or loses it).
    pub fn restore(rec: JobRecord, items: Vec<Item>, history: History, events: Vec<String>) -> Result<Job> {
        let cfg = JobConfig::from_toml(&rec.spec_toml)?;
        let task = match cfg.task {
            TaskConfig::Dataset(_) => None,
            _ => Some(tasks::build(&cfg.task)?),
        };
        let items: BTreeMap<u64, Item> = items.into_iter().map(|i| (i.id, i)).collect();
        let pending = items.keys().copied().collect();
        let mut job = Job { rec, cfg, task, items, pending, history, events, step_moved_ms: 0, step_interval_ms: 0.0 };
        for item in job.items.values_mut() {
            item.worker = None;
        }
        Ok(job)
    }

    /// Appends an event to the job's log (kept as its JSON line, `sluice_proto::events`).
    /// A log at [`MAX_EVENTS_PER_JOB`] keeps only state changes; the rest are counted.
    pub fn event(&mut self, ch: &mut Changes, now_ms: u64, body: Body) {
        if self.events.len() >= MAX_EVENTS_PER_JOB && !matches!(body, Body::State(_)) {
            self.rec.progress.events_dropped += 1;
            ch.record = true;
            return;
        }
        let line = events::to_json(&events::event(body), Some(now_ms)).expect("an event with a body");
        self.events.push(line.clone());
        ch.events.push(line);
    }

    /// The learner reached `step` (from a step event or a heartbeat); true when it moved.
    pub fn learner_step(&mut self, step: u64, now_ms: u64) -> bool {
        if step <= self.rec.progress.step {
            return false;
        }
        if self.step_moved_ms > 0 {
            let dt = now_ms.saturating_sub(self.step_moved_ms) as f64 / (step - self.rec.progress.step) as f64;
            self.step_interval_ms = if self.step_interval_ms == 0.0 { dt } else { 0.8 * self.step_interval_ms + 0.2 * dt };
        }
        self.rec.progress.step = step;
        self.step_moved_ms = now_ms;
        true
    }

    /// Appends workers' training events (step, sft, eval, checkpoint) to the
    /// job's log; step events move the job's step counter. Anything else is
    /// the orchestrator's to say and is refused.
    pub fn add_events(&mut self, reported: &[v1::Event], now_ms: u64) -> Result<Changes> {
        self.report("", reported, None, now_ms)
    }

    /// A worker's report: training events, and (learners) the fates of work
    /// items. Everything is checked before anything changes.
    ///
    /// Fates: each id of this job is counted once, under the first fate
    /// reported for it (a report retried after a lost answer, or a duplicate
    /// group, changes nothing); ids the job never created are refused.
    pub fn report(&mut self, worker: &str, reported: &[v1::Event], fates: Option<&v1::WorkFates>, now_ms: u64) -> Result<Changes> {
        for e in reported {
            match &e.body {
                Some(Body::Step(_) | Body::Sft(_) | Body::Eval(_) | Body::Checkpoint(_) | Body::Annotation(_)) => {}
                Some(other) => return Err(Error::Invalid(format!("workers report training and annotation events, not {other:?}"))),
                None => return Err(Error::Invalid("an event without a body".into())),
            }
        }
        let empty = v1::WorkFates::default();
        let f = fates.unwrap_or(&empty);
        let all = [&f.trained, &f.stale, &f.invalid, &f.filtered, &f.unused];
        if let Some(bad) = all.iter().flat_map(|ids| ids.iter()).find(|&&id| id == 0 || id >= self.rec.next_item) {
            return Err(Error::Invalid(format!("work item {bad} was never created for job {}", self.rec.id)));
        }
        let mut ch = Changes::default();
        for e in reported {
            if let Some(Body::Step(s)) = &e.body {
                self.learner_step(s.step, now_ms);
                ch.record = true;
            }
            self.event(&mut ch, now_ms, e.body.clone().expect("checked above"));
        }
        let mut new = [0u64; 5];
        for (k, ids) in all.iter().enumerate() {
            new[k] = ids.iter().filter(|&&id| self.rec.fated.insert(id)).count() as u64;
        }
        if new.iter().any(|&n| n > 0) {
            let p = &mut self.rec.progress;
            p.work_trained += new[0];
            p.work_dropped_stale += new[1];
            p.work_dropped_invalid += new[2];
            p.work_filtered += new[3];
            p.work_unused += new[4];
            ch.record = true;
            let [trained, dropped_stale, dropped_invalid, filtered, unused] = new;
            let body = v1::WorkAccounted { worker: worker.into(), trained, dropped_stale, dropped_invalid, filtered, unused };
            self.event(&mut ch, now_ms, Body::Work(body));
        }
        Ok(ch)
    }

    /// Moves the job to `state` (final states stay), with a reason.
    pub fn set_state(&mut self, state: JobState, message: &str, now_ms: u64) -> Changes {
        let mut ch = Changes::default();
        if self.rec.state == state || self.rec.state.is_final() {
            return ch;
        }
        self.rec.state = state;
        self.rec.message = message.to_string();
        self.rec.updated_ms = now_ms;
        ch.record = true;
        if state.is_final() {
            // Nothing more will be handed out.
            self.pending.clear();
        }
        self.event(&mut ch, now_ms, Body::State(v1::StateChanged { state: state.name().into(), message: message.into() }));
        ch
    }

    /// Rollouts per prompt under the job's budget strategy.
    fn budgets(&self, prompt_ids: &[u64]) -> Vec<usize> {
        budget::sizes(&self.cfg.budget, self.cfg.grpo.group_size, &self.history, prompt_ids)
    }

    fn open_round(&mut self, ch: &mut Changes, now_ms: u64) {
        let k = self.cfg.train.prompts_per_step as u64;
        let start = self.rec.cursor;
        self.rec.cursor += k;
        if let Some(pass) = self.rec.cursor.saturating_sub(1).checked_div(train_size(&self.cfg.task)) {
            self.rec.progress.epoch = pass + 1;
        }
        let indices: Vec<u64> = (start..start + k).collect();
        // A dataset's problems are identified by their index in the training
        // order (the knapsack history then spans one pass over the data).
        let ids: Vec<u64> = match &self.task {
            Some(task) => indices.iter().map(|&i| task.problem(Split::Train, i).id).collect(),
            None => indices.clone(),
        };
        let sizes = self.budgets(&ids);
        let round = self.rec.next_round;
        self.rec.next_round += 1;
        let strategy = match self.cfg.budget.strategy {
            BudgetStrategy::Uniform => "uniform",
            BudgetStrategy::Knapsack => "knapsack",
        };
        let sizes_wire = sizes.iter().map(|&n| n as u64).collect();
        self.event(ch, now_ms, Body::Round(v1::RoundOpened { round, first_prompt: start, strategy: strategy.into(), sizes: sizes_wire }));
        self.rec.open_rounds.insert(round, k);
        for ((&prompt_index, &prompt_id), &n) in indices.iter().zip(&ids).zip(&sizes) {
            let hints = &self.cfg.hints;
            let all_fail = self.history.rate(prompt_id, hints.min_outcomes) == Some(0.0);
            let hint = hints.enabled && all_fail && !self.rec.hinted_last.contains(&prompt_id);
            if hint {
                self.rec.hinted_last.insert(prompt_id);
            } else {
                self.rec.hinted_last.remove(&prompt_id);
            }
            let item = Item { id: self.rec.next_item, round, prompt_index, prompt_id, n, attempt: 0, worker: None, hint };
            if hint {
                self.rec.progress.work_hinted += 1;
            }
            self.rec.next_item += 1;
            self.rec.progress.work_created += 1;
            self.pending.push_back(item.id);
            ch.items.push(item.clone());
            self.items.insert(item.id, item);
        }
        ch.record = true;
    }

    /// Hands up to `max` items to `worker`, opening rounds as the staleness
    /// window allows. Empty when the job is over or the window is full.
    pub fn next_work(&mut self, worker: &str, max: usize, now_ms: u64) -> (Vec<Item>, Changes) {
        let mut ch = Changes::default();
        if self.rec.state.is_final() {
            return (Vec::new(), ch);
        }
        if self.rec.state == JobState::Queued {
            ch = self.set_state(JobState::Running, "", now_ms);
        }
        let staleness = self.cfg.rollout.staleness();
        let window = staleness.open_rounds();
        loop {
            if self.pending.len() >= max || self.rec.open_rounds.len() >= window {
                break;
            }
            // Ahead of the learner by more than the staleness bound: the round
            // would be sampled only to be dropped. Unless the learner starves.
            // Before the learner's first step (warm-up) only a long silence counts.
            let patience = if self.step_moved_ms == 0 && self.rec.progress.step == 0 {
                STARVING_MAX_MS * 10
            } else {
                ((self.step_interval_ms * STARVING_STEPS) as u64).clamp(STARVING_MIN_MS, STARVING_MAX_MS)
            };
            let starving = self.items.is_empty() && now_ms.saturating_sub(self.step_moved_ms) > patience;
            let round = self.rec.next_round.saturating_sub(self.rec.round_credit);
            // The job trains `steps` rounds: more would never be trained.
            let needed = round < self.rec.progress.total_steps;
            if needed && staleness.may_open(round, self.rec.progress.step) {
                self.open_round(&mut ch, now_ms);
            } else if starving {
                self.rec.round_credit += 1;
                self.step_moved_ms = now_ms;
                self.open_round(&mut ch, now_ms);
            } else {
                break;
            }
        }
        let mut out = Vec::new();
        while out.len() < max {
            let Some(id) = self.pending.pop_front() else { break };
            let item = self.items.get_mut(&id).expect("pending items are outstanding");
            item.worker = Some(worker.to_string());
            self.rec.progress.work_dispatched += 1;
            ch.items.push(item.clone());
            out.push(item.clone());
        }
        if !out.is_empty() {
            ch.record = true;
        }
        (out, ch)
    }

    /// Records the outcome of item `id`: true when counted, false for a
    /// duplicate of a complete item.
    pub fn outcome(&mut self, id: u64, rewards: &[f64], now_ms: u64) -> Result<(bool, Changes)> {
        let mut ch = Changes::default();
        let Some(item) = self.items.get(&id) else {
            if id >= 1 && id < self.rec.next_item {
                self.rec.progress.duplicate_outcomes += 1;
                ch.record = true;
                return Ok((false, ch));
            }
            return Err(Error::NotFound(format!("work item {id} of job {}", self.rec.id)));
        };
        if rewards.len() != item.n {
            return Err(Error::Invalid(format!(
                "work item {id} asked for {} rollouts but the outcome has {} rewards",
                item.n,
                rewards.len()
            )));
        }
        if let Some(bad) = rewards.iter().find(|r| !r.is_finite()) {
            return Err(Error::Invalid(format!("work item {id}: reward {bad} is not finite")));
        }
        let item = self.items.remove(&id).expect("present");
        self.pending.retain(|&p| p != id);
        let p = &mut self.rec.progress;
        p.work_completed += 1;
        p.rollouts_completed += item.n as u64;
        if let Some(left) = self.rec.open_rounds.get_mut(&item.round) {
            *left -= 1;
            if *left == 0 {
                self.rec.open_rounds.remove(&item.round);
            }
        }
        self.rec.updated_ms = now_ms;
        ch.record = true;
        ch.removed_items.push(id);
        // A hinted group's outcomes are kept apart: the prompt stays unsolved
        // for budgets and hints until it is solved without one.
        if !item.hint {
            self.history.record(item.prompt_id, rewards.iter().copied());
            ch.history.push(item.prompt_id);
        }
        Ok((true, ch))
    }

    /// Puts the items `worker` held back in the queue (its lease expired).
    pub fn release(&mut self, worker: &str, now_ms: u64) -> Changes {
        let mut ch = Changes::default();
        let mut ids = Vec::new();
        for item in self.items.values_mut() {
            if item.worker.as_deref() == Some(worker) {
                item.worker = None;
                item.attempt += 1;
                ids.push(item.id);
                ch.items.push(item.clone());
            }
        }
        if ids.is_empty() {
            return ch;
        }
        self.rec.progress.work_redispatched += ids.len() as u64;
        ch.record = true;
        if !self.rec.state.is_final() {
            // Oldest first: they go to the front of the queue.
            for &id in ids.iter().rev() {
                self.pending.push_front(id);
            }
        }
        self.event(&mut ch, now_ms, Body::Redispatched(v1::WorkRedispatched { worker: worker.into(), items: ids }));
        ch
    }

    /// Items waiting for a worker.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(extra: &str) -> String {
        format!(
            "name = \"t\"\n[model]\npreset = \"tiny\"\n[task]\nkind = \"arithmetic\"\ntrain_size = 6\n\
             [grpo]\ngroup_size = 4\n[train]\nprompts_per_step = 3\nsteps = 50\n{extra}"
        )
    }

    fn job(extra: &str) -> Job {
        Job::submit("t-1".into(), spec(extra), 0).unwrap().0
    }

    fn check_accounting(j: &Job) {
        let p = &j.rec.progress;
        assert_eq!(p.work_created, p.work_completed + j.items.len() as u64, "{p:?}");
    }

    #[test]
    fn rounds_follow_the_staleness_window_and_epochs_wrap() {
        let mut j = job("[rollout]\nmax_staleness = 0\n");
        let (a, _) = j.next_work("w", 10, 1);
        assert_eq!(a.iter().map(|i| i.prompt_index).collect::<Vec<_>>(), vec![0, 1, 2], "one round at staleness 0");
        assert!(a.iter().all(|i| i.n == 4));
        assert_eq!(j.rec.state, JobState::Running);
        assert!(j.next_work("w", 10, 2).0.is_empty(), "the window is full until the round completes");
        for i in &a[..2] {
            assert!(j.outcome(i.id, &[0.0; 4], 3).unwrap().0);
        }
        assert!(j.next_work("w", 10, 4).0.is_empty());
        j.outcome(a[2].id, &[1.0; 4], 5).unwrap();
        // Round 1 waits for the learner to train round 0 (else it would be stale) ...
        assert!(j.next_work("w", 10, 5).0.is_empty(), "round 1 waits for the learner's step 1");
        j.learner_step(1, 5);
        let b = j.next_work("w", 10, 6).0;
        assert_eq!(b.iter().map(|i| i.prompt_index).collect::<Vec<_>>(), vec![3, 4, 5]);
        assert_eq!(j.rec.progress.epoch, 1);
        for i in &b {
            j.outcome(i.id, &[0.0; 4], 7).unwrap();
        }
        // ... unless the learner starves (groups of its round were dropped):
        // with nothing outstanding and no step for STARVING_MS, one round opens.
        assert!(j.next_work("w", 10, 8).0.is_empty());
        let c = j.next_work("w", 10, 8 + STARVING_MAX_MS + 1).0;
        assert_eq!(c.len(), 3);
        assert!(j.next_work("w", 10, 8 + STARVING_MAX_MS + 2).0.is_empty(), "only one");
        assert_eq!(j.rec.round_credit, 1, "and it stays credited: the learner is a round short for good");
        assert_eq!(j.rec.progress.epoch, 2, "prompt 6 starts the second pass over 6 prompts");
        check_accounting(&j);
    }

    #[test]
    fn expired_leases_are_redispatched_and_counted_once() {
        let mut j = job("[rollout]\nmax_staleness = 1\n");
        let held = j.next_work("a", 2, 1).0;
        let other = j.next_work("b", 1, 1).0;
        assert_eq!(held.len() + other.len(), 3);
        j.release("a", 2);
        assert_eq!(j.rec.progress.work_redispatched, 2);
        let again = j.next_work("c", 2, 3).0;
        assert_eq!(again.iter().map(|i| i.id).collect::<Vec<_>>(), held.iter().map(|i| i.id).collect::<Vec<_>>());
        assert!(again.iter().all(|i| i.attempt == 1));
        // The first outcome counts; the slow original holder's late report is a duplicate.
        assert!(j.outcome(again[0].id, &[1.0; 4], 4).unwrap().0);
        assert!(!j.outcome(held[0].id, &[0.0; 4], 5).unwrap().0);
        assert_eq!(j.rec.progress.duplicate_outcomes, 1);
        assert_eq!(j.rec.progress.work_completed, 1);
        assert!(matches!(j.outcome(999, &[0.0; 4], 6), Err(Error::NotFound(_))));
        assert!(matches!(j.outcome(again[1].id, &[0.0; 3], 6), Err(Error::Invalid(_))));
        assert_eq!(j.rec.progress.work_dispatched, 5);
        check_accounting(&j);
    }

    #[test]
    fn knapsack_budgets_use_the_outcome_history_and_keep_the_total() {
        let mut j = job("[budget]\nstrategy = \"knapsack\"\nmin_outcomes = 4\n[rollout]\nmax_staleness = 0\n");
        // Round 0: no history, the default N.
        let r0 = j.next_work("w", 3, 1).0;
        assert_eq!(r0.iter().map(|i| i.n).collect::<Vec<_>>(), vec![4, 4, 4]);
        // Prompt 0 always solved, prompt 1 never, prompt 2 half the time.
        let outcomes = [[1.0; 4], [0.0; 4], [1.0, 0.0, 1.0, 0.0]];
        for (i, o) in r0.iter().zip(outcomes) {
            j.outcome(i.id, &o, 2).unwrap();
        }
        j.learner_step(1, 2);
        for i in j.next_work("w", 3, 3).0 {
            j.outcome(i.id, &vec![0.0; i.n], 4).unwrap();
        }
        j.learner_step(2, 4);
        // Round 2 is prompts 6, 7, 8 = problems 0, 1, 2 again (train_size 6).
        let r2 = j.next_work("w", 3, 5).0;
        let sizes: Vec<usize> = r2.iter().map(|i| i.n).collect();
        assert_eq!(sizes.iter().sum::<usize>(), 12, "the total budget is conserved");
        // p=1 keeps N_low; the p=0.5 prompt gets N_low + its cost estimate
        // (ln 0.1 / ln 0.5 = 3.3 → 3); the surplus goes to the p=0 prompt.
        assert_eq!(sizes, vec![2, 5, 5]);
        check_accounting(&j);
    }

    #[test]
    fn final_states_stick_and_hand_out_nothing() {
        let mut j = job("");
        j.next_work("w", 1, 1);
        j.set_state(JobState::Cancelled, "by user", 2);
        assert!(j.next_work("w", 5, 3).0.is_empty());
        assert!(j.set_state(JobState::Running, "", 4).events.is_empty());
        assert_eq!(j.rec.state, JobState::Cancelled);
        assert_eq!(j.rec.message, "by user");
        assert!(j.events.iter().any(|e| e.contains("\"cancelled\"")));
    }

    #[test]
    fn restore_requeues_leased_items() {
        let mut j = job("");
        let held = j.next_work("w", 2, 1).0;
        let items: Vec<Item> = j.items.values().cloned().collect();
        let r = Job::restore(j.rec.clone(), items, j.history.clone(), j.events.clone()).unwrap();
        assert_eq!(r.pending(), j.items.len());
        assert!(r.items.values().all(|i| i.worker.is_none()));
        assert!(r.items.contains_key(&held[0].id));
    }

    #[test]
    fn bad_specs_and_events_are_refused_with_the_field() {
        match Job::submit("x".into(), "[model]\npreset = \"tiny\"\n[task]\nkind = \"arithmetic\"\n[grpo]\nclip_low = 2.0\n".into(), 0) {
            Err(Error::Core(sluice_core::Error::Config { path, .. })) => assert_eq!(path, "grpo.clip_low"),
            other => panic!("{other:?}"),
        }
        let mut j = job("");
        assert!(j.add_events(&[v1::Event { body: None }], 1).is_err());
        // A worker cannot speak for the orchestrator.
        let lost = events::event(Body::WorkerLost(v1::WorkerLost { worker: "w".into() }));
        assert!(j.add_events(&[lost], 1).is_err());
        let n = j.events.len();
        let step = events::event(Body::Step(v1::TrainStep { step: 3, reward_mean: 0.25, ..Default::default() }));
        let ch = j.add_events(&[step], 1).unwrap();
        assert_eq!(j.rec.progress.step, 3);
        assert_eq!((j.events.len(), ch.events.len()), (n + 1, 1));
        let stored: serde_json::Value = serde_json::from_str(&j.events[n]).unwrap();
        assert_eq!((stored["event"].as_str(), stored["reward_mean"].as_f64()), (Some("step"), Some(0.25)));
        // Actor 0's annotation counters join the log as they are (NaN as null).
        let oni = events::event(Body::Annotation(v1::AnnotationProgress { labelled: 7, annotate_seconds_mean: f64::NAN, ..Default::default() }));
        j.add_events(&[oni], 2).unwrap();
        let stored: serde_json::Value = serde_json::from_str(j.events.last().unwrap()).unwrap();
        assert_eq!((stored["event"].as_str(), stored["labelled"].as_u64()), (Some("annotation"), Some(7)));
        assert!(stored["annotate_seconds_mean"].is_null());
        assert_eq!(j.rec.progress.step, 3);
    }

    /// Learners' fate reports: each item counted once under its first fate
    /// (a retried report changes nothing), one `work` event per report that
    /// counted something, and an id the job never created refuses the whole
    /// report (events included) before anything changes.
    #[test]
    fn work_fates_are_counted_once_each() {
        let mut j = job("[rollout]\nmax_staleness = 1\n");
        let items = j.next_work("w", 10, 1).0;
        let ids: Vec<u64> = items.iter().map(|i| i.id).collect();
        let f = v1::WorkFates { trained: vec![ids[0], ids[1]], stale: vec![ids[2]], ..Default::default() };
        let ch = j.report("learner-0", &[], Some(&f), 2).unwrap();
        assert!(ch.record && ch.events.len() == 1, "{ch:?}");
        let ev: serde_json::Value = serde_json::from_str(&ch.events[0]).unwrap();
        assert_eq!((ev["event"].as_str(), ev["trained"].as_u64(), ev["dropped_stale"].as_u64()), (Some("work"), Some(2), Some(1)));
        // The same report again (its answer was lost), and a later different fate for a counted item.
        assert!(j.report("learner-0", &[], Some(&f), 3).unwrap().events.is_empty());
        let late = v1::WorkFates { unused: vec![ids[0]], invalid: vec![ids[3]], ..Default::default() };
        j.report("learner-0", &[], Some(&late), 4).unwrap();
        let p = &j.rec.progress;
        assert_eq!((p.work_trained, p.work_dropped_stale, p.work_dropped_invalid, p.work_unused), (2, 1, 1, 0));
        let n = j.events.len();
        let step = events::event(Body::Step(v1::TrainStep { step: 1, ..Default::default() }));
        for bad in [0, j.rec.next_item] {
            let f = v1::WorkFates { trained: vec![ids[4], bad], ..Default::default() };
            assert!(matches!(j.report("learner-0", std::slice::from_ref(&step), Some(&f), 5), Err(Error::Invalid(_))));
        }
        assert_eq!((j.events.len(), j.rec.progress.step, j.rec.progress.work_trained), (n, 0, 2), "nothing changed");
        // The set survives the store (serde) and a restore.
        let rec: JobRecord = serde_json::from_str(&serde_json::to_string(&j.rec).unwrap()).unwrap();
        assert!(rec.fated.contains(ids[3]) && !rec.fated.contains(ids[4]));
    }

    /// A job's log stops growing at the limit: later training events are
    /// counted, not kept, the step counter still moves, and state changes are
    /// always kept.
    #[test]
    fn the_event_log_is_bounded() {
        let mut j = job("");
        let filler = vec![j.events.last().cloned().unwrap_or_else(|| "{}".into()); MAX_EVENTS_PER_JOB];
        j.events = filler;
        let step = events::event(Body::Step(v1::TrainStep { step: 9, ..Default::default() }));
        let ch = j.add_events(&[step.clone(), step], 1).unwrap();
        assert!(ch.events.is_empty() && ch.record);
        assert_eq!((j.events.len(), j.rec.progress.events_dropped, j.rec.progress.step), (MAX_EVENTS_PER_JOB, 2, 9));
        let ch = j.set_state(JobState::Cancelled, "by user", 2);
        assert_eq!(ch.events.len(), 1, "a state change is kept past the limit");
        assert_eq!(j.events.len(), MAX_EVENTS_PER_JOB + 1);
    }

    /// NuRL hints: once a prompt's recent outcomes are all failures its next
    /// item carries `hint`, the hinted outcome does not enter its history
    /// (so it stays hinted until solved without one), and the count shows.
    #[test]
    fn all_fail_prompts_get_hinted_items_whose_outcomes_stay_apart() {
        let mut j = job("[rollout]\nmax_staleness = 0\n[hints]\nenabled = true\nmin_outcomes = 4\n");
        let report = |j: &mut Job, items: &[Item], reward: f64| {
            for it in items {
                j.outcome(it.id, &vec![reward; it.n], 2).unwrap();
            }
            // The learner trains every round it is given.
            let r = j.rec.next_round;
            j.learner_step(r, 2);
        };
        // Pass 1 over the 6 prompts: prompt 0 fails all 4, the others succeed once.
        for _ in 0..2 {
            let items = j.next_work("w", 10, 1).0;
            assert!(items.iter().all(|i| !i.hint), "no history yet");
            for it in &items {
                let r: Vec<f64> = (0..it.n).map(|k| f64::from(it.prompt_id != 0 && k == 0)).collect();
                j.outcome(it.id, &r, 2).unwrap();
            }
            let r = j.rec.next_round;
            j.learner_step(r, 2);
        }
        // Pass 2: only prompt 0 is hinted.
        let items = j.next_work("w", 10, 1).0;
        let hinted: Vec<u64> = items.iter().filter(|i| i.hint).map(|i| i.prompt_id).collect();
        assert_eq!(hinted, vec![0]);
        assert_eq!(j.rec.progress.work_hinted, 1);
        let before = j.history.outcomes(0);
        report(&mut j, &items, 1.0);
        assert_eq!(j.history.outcomes(0), before, "a hinted success is not the prompt's own");
        let items = j.next_work("w", 10, 1).0;
        report(&mut j, &items, 0.0);
        // Pass 3: tried without the hint (hints alternate with plain tries) ...
        let items = j.next_work("w", 10, 1).0;
        assert!(items.iter().any(|i| i.prompt_id == 0 && !i.hint));
        report(&mut j, &items, 0.0);
        let items = j.next_work("w", 10, 1).0;
        report(&mut j, &items, 0.0);
        // ... and, failed again, hinted in pass 4.
        let items = j.next_work("w", 10, 1).0;
        assert!(items.iter().any(|i| i.prompt_id == 0 && i.hint));
        assert_eq!(j.rec.progress.work_hinted, 2);
        check_accounting(&j);
    }

    /// A job of `steps` steps never opens more than `steps` rounds (plus one
    /// per round credited to a starving learner): extra rounds would never train.
    #[test]
    fn no_round_opens_beyond_the_last_step() {
        let mut j = Job::submit("t-1".into(), spec("[rollout]\nmax_staleness = 0\n").replace("steps = 50", "steps = 2"), 0).unwrap().0;
        for step in 0..2u64 {
            let items = j.next_work("w", 10, 10 * step + 1).0;
            assert_eq!(items.len(), 3, "round {step}");
            for it in &items {
                j.outcome(it.id, &vec![0.0; it.n], 10 * step + 2).unwrap();
            }
            j.learner_step(step + 1, 10 * step + 3);
        }
        assert!(j.next_work("w", 10, 30).0.is_empty(), "the job's two rounds are all it needs");
        assert_eq!(j.rec.next_round, 2);
    }
}
