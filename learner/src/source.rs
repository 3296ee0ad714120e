//! Where a step's rollouts come from: a [`RolloutSource`]. `sluice train`
//! samples them with the trainer's own policy ([`LocalSampling`]); the
//! distributed learner takes them from the actors' buffer (`crate::node`).
//! Both apply DAPO dynamic sampling through [`informative`].

use rand_chacha::ChaCha8Rng;
use sluice_core::config::JobConfig;
use sluice_core::rollout::Group;
use sluice_core::tasks::Problem;

use crate::algo::grpo;
use crate::checkpoint::TrainerState;
use crate::engine::rng_for;
use crate::error::Result;

/// One step's worth of this rank's rollouts, and what it took to get them.
#[derive(Debug, Default)]
pub struct Drawn {
    /// The groups to train on.
    pub groups: Vec<Group>,
    /// Sum of the loss rewards (and of the task's rewards) over every rollout
    /// the step saw, filtered groups included, and how many there were.
    pub reward_sum: f64,
    pub extrinsic_sum: f64,
    pub rollouts_seen: usize,
    /// Rollouts this process sampled (0 when actors sampled them).
    pub rollouts_sampled: usize,
    /// Tokens generated and the seconds generation took (this process only).
    pub generated_tokens: usize,
    pub generate_s: f64,
    /// Seconds spent waiting for rollouts from elsewhere.
    pub wait_s: f64,
    /// Policy-version lag of each trained group.
    pub lags: Vec<u64>,
}

impl Drawn {
    /// A step of exactly `groups` (all of them seen, none sampled here).
    pub fn of(groups: Vec<Group>) -> Drawn {
        let mut d = Drawn::default();
        d.see(&groups);
        d.groups = groups;
        d
    }

    /// Counts the rewards of `groups` as seen.
    pub fn see(&mut self, groups: &[Group]) {
        for r in groups.iter().flat_map(|g| &g.rollouts) {
            self.reward_sum += r.reward;
            self.extrinsic_sum += r.extrinsic;
            self.rollouts_seen += 1;
        }
    }
}

/// What a source may ask of the trainer it feeds (`crate::trainer::Trainer`
/// implements it).
pub trait Feed {
    fn config(&self) -> &JobConfig;
    /// Step (= policy version), seed and data cursor.
    fn state(&self) -> &TrainerState;
    /// The next `n` training problems (advances the data cursor).
    fn next_problems(&mut self, n: usize) -> Vec<Problem>;
    /// Samples and scores each problem's budget of rollouts with the trainer's
    /// policy; returns the groups and the seconds generation took.
    fn collect(&mut self, problems: &[Problem], rng: &mut ChaCha8Rng) -> Result<(Vec<Group>, f64)>;
}

/// Supplies each step's groups.
pub trait RolloutSource {
    /// This rank's groups for the trainer's next step; `None` stops training.
    fn next(&mut self, trainer: &mut dyn Feed) -> Result<Option<Drawn>>;
}

/// DAPO dynamic sampling (eq. 11): with `grpo.filter_zero_variance`, only
/// groups whose rewards differ are trained on (the rest have zero advantage
/// and no gradient).
pub fn informative(filter: bool, g: &Group) -> bool {
    !filter || grpo::has_reward_variance(&g.rewards())
}

/// `sluice train`: samples `train.prompts_per_step` prompts' budgets with the
/// trainer's policy; with dynamic sampling, refills from new prompts (at most
/// `grpo.max_refill_rounds` times) until the step has enough informative groups.
#[derive(Debug, Default, Clone, Copy)]
pub struct LocalSampling;

impl RolloutSource for LocalSampling {
    fn next(&mut self, t: &mut dyn Feed) -> Result<Option<Drawn>> {
        let mut rng = rng_for(t.state().seed, 1, t.state().step);
        let (want, filter) = (t.config().train.prompts_per_step, t.config().grpo.filter_zero_variance);
        let mut d = Drawn::default();
        let mut sample = |t: &mut dyn Feed, n: usize, d: &mut Drawn| -> Result<Vec<Group>> {
            let problems = t.next_problems(n);
            let (groups, generate_s) = t.collect(&problems, &mut rng)?;
            d.generate_s += generate_s;
            d.see(&groups);
            d.rollouts_sampled += groups.iter().map(|g| g.rollouts.len()).sum::<usize>();
            d.generated_tokens += groups.iter().flat_map(|g| &g.rollouts).map(|r| r.response_tokens.len()).sum::<usize>();
            Ok(groups.into_iter().filter(|g| informative(filter, g)).collect())
        };
        d.groups = sample(t, want, &mut d)?;
        if filter {
            for _ in 0..t.config().grpo.max_refill_rounds {
                if d.groups.len() >= want {
                    break;
                }
                let more = sample(t, want - d.groups.len(), &mut d)?;
                d.groups.extend(more);
            }
            d.groups.truncate(want);
        }
        Ok(Some(d))
    }
}

/// Groups the caller already has (the distributed learner's tests, benchmarks):
/// one step's worth, then `None`.
#[derive(Debug)]
pub struct Given(Option<Vec<Group>>);

impl Given {
    pub fn new(groups: Vec<Group>) -> Self {
        Given(Some(groups))
    }
}

impl RolloutSource for Given {
    fn next(&mut self, _: &mut dyn Feed) -> Result<Option<Drawn>> {
        Ok(self.0.take().map(Drawn::of))
    }
}
