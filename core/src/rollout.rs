//! Rollouts: what an actor produces and a learner trains on. How they are
//! sampled is `sluice_model::collect`.

use serde::{Deserialize, Serialize};


/// One completion of one prompt, with everything the loss needs.
#[derive(Debug, Clone, PartialEq)]
pub struct Rollout {
    /// Prompt identity within the job (the task index).
    pub prompt_id: u64,
    pub prompt_tokens: Vec<i64>,
    /// Generated tokens, including a final stop token if one was sampled.
    pub response_tokens: Vec<i64>,
    /// Behaviour log-prob of each response token under the policy that sampled
    /// it; `None` for a policy that has none (masked diffusion: BGPO recomputes
    /// the sampling policy's ELBO instead). Where `loss_mask` is false
    /// (environment tokens) the value is 0 and means nothing: the loss never
    /// reads it.
    pub logprobs: Option<Vec<f32>>,
    /// Per response token: true where the loss trains (action tokens), false for
    /// environment tokens. Empty means every response token is an action.
    pub loss_mask: Vec<bool>,
    /// The environment's messages during the episode (ONI captions); empty for
    /// single-turn tasks. Not sent to learners.
    pub captions: Vec<String>,
    /// Reward the loss uses (verifier reward, plus any intrinsic reward), before shaping.
    pub reward: f64,
    /// The task's own reward (verifier, or the environment's for an episode).
    pub extrinsic: f64,
    /// Intrinsic (ONI) reward from the reward server; 0 without one.
    pub intrinsic: f64,
    /// Policy version that sampled the first response token: the oldest (the
    /// staleness rule reads it).
    pub version: u64,
    /// Interruptible generation: `(i, v)` — from response token `i` on, version
    /// `v` sampled (ascending in both). Behaviour log-probs are each token's own.
    pub switches: Vec<(u32, u64)>,
    pub finish: FinishReason,
}

/// All rollouts of one prompt: the unit GRPO normalises over. Sizes may differ
/// between groups (knapsack allocation), never within a group.
#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    pub prompt_id: u64,
    /// The orchestrator work item it answers (0: none, e.g. sampled in process);
    /// a learner trains at most one group per work item, across restarts.
    pub work_id: u64,
    pub rollouts: Vec<Rollout>,
    /// W3C traceparent of the work item (or actor batch) that sampled it (tracing only).
    pub trace: Option<String>,
    /// Seconds an actor spent generating it: its share of its sampling batch's
    /// time, by response tokens (0: not known, e.g. sampled in process).
    pub generate_s: f64,
}

impl Group {
    /// The oldest policy version that sampled any of its tokens (what the
    /// staleness rule judges; rollouts of one group may start at different
    /// versions under interruptible generation).
    pub fn oldest_version(&self) -> u64 {
        self.rollouts.iter().map(|r| r.version).min().unwrap_or(0)
    }

    pub fn rewards(&self) -> Vec<f64> {
        self.rollouts.iter().map(|r| r.reward).collect()
    }
}

/// Why a completion ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// Sampled a stop token (included in `tokens`).
    Stop,
    /// Reached `max_new_tokens`.
    Length,
}

