//! What training reports: per-step metrics, warm-up metrics, evaluations and
//! checkpoints as [`Event`]s, and [`EventLog`], the `metrics.jsonl` they are
//! appended to.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::{Error, Result};

/// What happened in one GRPO step.
#[derive(Debug, Clone, Default, Serialize)]
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
