//! Rollouts: what an actor produces and a learner trains on.

use crate::generate::FinishReason;

/// One completion of one prompt, with everything the loss needs.
#[derive(Debug, Clone, PartialEq)]
pub struct Rollout {
    /// Prompt identity within the job (the task index).
    pub prompt_id: u64,
    pub prompt_tokens: Vec<i64>,
    /// Generated tokens, including a final stop token if one was sampled.
    pub response_tokens: Vec<i64>,
    /// Behaviour log-prob of each response token under the policy that sampled it.
    pub logprobs: Vec<f32>,
    /// Verifier reward before shaping.
    pub reward: f64,
    /// Policy version that produced it.
    pub version: u64,
    pub finish: FinishReason,
}

/// All rollouts of one prompt: the unit GRPO normalises over. Sizes may differ
/// between groups (knapsack allocation), never within a group.
#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    pub prompt_id: u64,
    pub rollouts: Vec<Rollout>,
}

impl Group {
    pub fn rewards(&self) -> Vec<f64> {
        self.rollouts.iter().map(|r| r.reward).collect()
    }
}
