//! What training reports: per-step metrics, warm-up metrics, evaluations and
//! checkpoints as [`Event`]s, and [`EventLog`], the `metrics.jsonl` they are
//! appended to.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;
use sluice_proto::v1::{self, event::Body};

use crate::error::{Error, Result};

/// What happened in one GRPO step.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StepMetrics {
    pub step: u64,
    /// When the step ended (seconds since the Unix epoch).
    pub unix_time: f64,
    /// Learning rate the step used (after warm-up and schedule).
    pub lr: f64,
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
    /// Trained groups by staleness: entry k counts groups k versions behind
    /// (the last entry, at most the 33rd, all 32 or more behind).
    pub staleness_counts: Vec<u64>,
    /// Seconds the step waited for rollouts (distributed learner).
    pub wait_seconds: f64,
    /// Decoupled PPO: mean and maximum behaviour weight pi_prox / pi_behav over
    /// trained tokens (before the cap), the share above `tis_cap`, and tokens
    /// whose weight was not finite (never trained). 0 without decoupling.
    pub behaviour_weight_mean: f64,
    pub behaviour_weight_max: f64,
    pub behaviour_over_cap_fraction: f64,
    pub behaviour_non_finite: u64,
    /// Several rewards: each named component's mean over the trained rollouts,
    /// and the weight it had this step (fixed weight plus multiplier).
    pub reward_components: std::collections::BTreeMap<String, f64>,
    pub reward_weights: std::collections::BTreeMap<String, f64>,
    /// NuRL hints: groups sampled with a hint this step (their prompts had
    /// failed every recent rollout), and their mean reward.
    pub hinted_groups: usize,
    pub hinted_reward_mean: f64,
    /// Interruptible generation: trained rollouts whose tokens came from more
    /// than one policy version (summed over ranks).
    pub interrupted_rollouts: usize,
}

/// Seconds since the Unix epoch, for metrics lines.
pub fn unix_time() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// What happened in one supervised warm-up step.
#[derive(Debug, Clone, Serialize)]
pub struct SftMetrics {
    pub sft_step: u64,
    pub loss: f64,
    pub grad_norm: f64,
    pub skipped: bool,
}

/// A held-out prompt with its greedy completion, shown with an evaluation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EvalSample {
    /// As the policy saw it (chat template applied).
    pub prompt: String,
    /// The response text the verifier scored.
    pub completion: String,
    pub reward: f64,
}

/// Events the trainer reports while it runs (also appended to `metrics.jsonl`).
/// One is made per step or less, so the size of `Step` costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    Sft(SftMetrics),
    Step(StepMetrics),
    Eval { step: u64, sft_step: u64, reward_mean: f64, prompts: usize, samples: Vec<EvalSample> },
    Checkpoint { step: u64, path: PathBuf },
}

impl From<&Event> for v1::Event {
    /// The typed form an orchestrator keeps (`sluice logs`).
    fn from(e: &Event) -> v1::Event {
        let body = match e {
            Event::Sft(m) => Body::Sft(v1::WarmupStep { sft_step: m.sft_step, loss: m.loss, grad_norm: m.grad_norm, skipped: m.skipped }),
            Event::Step(m) => Body::Step(v1::TrainStep {
                step: m.step,
                reward_mean: m.reward_mean,
                extrinsic_mean: m.extrinsic_mean,
                effective_gradient_ratio: m.effective_gradient_ratio,
                rollouts_sampled: m.rollouts_sampled as u64,
                groups_trained: m.groups_trained as u64,
                rollouts_trained: m.rollouts_trained as u64,
                pg_loss: m.pg_loss,
                kl: m.kl,
                clip_fraction: m.clip_fraction,
                grad_norm: m.grad_norm,
                skipped_updates: m.skipped_updates as u64,
                response_len_mean: m.response_len_mean,
                generation_tokens_per_s: m.generation_tokens_per_s,
                train_tokens_per_s: m.train_tokens_per_s,
                step_seconds: m.step_seconds,
                staleness_mean: m.staleness_mean,
                staleness_counts: m.staleness_counts.clone(),
                wait_seconds: m.wait_seconds,
                unix_time: m.unix_time,
                lr: m.lr,
                behaviour_weight_mean: m.behaviour_weight_mean,
                behaviour_weight_max: m.behaviour_weight_max,
                behaviour_over_cap_fraction: m.behaviour_over_cap_fraction,
                behaviour_non_finite: m.behaviour_non_finite,
                reward_components: m.reward_components.clone().into_iter().collect(),
                reward_weights: m.reward_weights.clone().into_iter().collect(),
                hinted_groups: m.hinted_groups as u64,
                hinted_reward_mean: m.hinted_reward_mean,
                interrupted_rollouts: m.interrupted_rollouts as u64,
            }),
            Event::Eval { step, sft_step, reward_mean, prompts, samples } => Body::Eval(v1::Evaluation {
                step: *step,
                sft_step: *sft_step,
                reward_mean: *reward_mean,
                prompts: *prompts as u64,
                samples: samples
                    .iter()
                    .map(|s| v1::EvalSample { prompt: s.prompt.clone(), completion: s.completion.clone(), reward: s.reward })
                    .collect(),
            }),
            Event::Checkpoint { step, path } => {
                Body::Checkpoint(v1::CheckpointSaved { step: *step, path: path.display().to_string() })
            }
        };
        v1::Event { body: Some(body) }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_jsonl_and_the_orchestrator_log_say_the_same() {
        let step = StepMetrics { step: 4, reward_mean: 0.5, grad_norm: f64::NAN, rollouts_trained: 64, ..StepMetrics::default() };
        let events = [
            Event::Step(step),
            Event::Sft(SftMetrics { sft_step: 2, loss: 1.25, grad_norm: 3.0, skipped: false }),
            Event::Eval {
                step: 4,
                sft_step: 2,
                reward_mean: 0.75,
                prompts: 128,
                samples: vec![EvalSample { prompt: "2+2=".into(), completion: "4".into(), reward: 1.0 }],
            },
            Event::Checkpoint { step: 4, path: PathBuf::from("runs/x/checkpoints/step-4") },
        ];
        for e in &events {
            let local: serde_json::Value = serde_json::to_value(e).unwrap();
            let line = sluice_proto::events::to_json(&v1::Event::from(e), None).unwrap();
            let wire: serde_json::Value = serde_json::from_str(&line).unwrap();
            assert_eq!(local, wire);
        }
    }
}
