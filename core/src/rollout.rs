//! Rollouts: what an actor produces and a learner trains on, and
//! [`collect_groups`], the one way both the single-process trainer and the actor
//! sample them.

use std::time::Instant;

use rand_chacha::ChaCha8Rng;

use crate::error::Result;
use crate::generate::{generate, FinishReason, SamplingParams};
use crate::model::Model;
use crate::tasks::Problem;
use crate::tokenizer::Tokenizer;

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
    /// Per response token: true where the loss trains (action tokens), false for
    /// environment tokens. Empty means every response token is an action.
    pub loss_mask: Vec<bool>,
    /// Reward the loss uses (verifier reward, plus any intrinsic reward), before shaping.
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

/// Groups sampled in one batch, with the seconds generation took.
#[derive(Debug)]
pub struct Collected {
    pub groups: Vec<Group>,
    pub generate_s: f64,
}

/// Samples `group_size` completions for each problem in one batch and scores
/// each with the problem's verifier. Every rollout is stamped with `version`.
pub fn collect_groups(
    model: &Model,
    tokenizer: &Tokenizer,
    problems: &[Problem],
    group_size: usize,
    sampling: &SamplingParams,
    version: u64,
    rng: &mut ChaCha8Rng,
) -> Result<Collected> {
    let encoded = problems.iter().map(|p| tokenizer.encode(&p.prompt)).collect::<Result<Vec<_>, _>>()?;
    let prompts: Vec<Vec<i64>> = encoded.iter().flat_map(|p| std::iter::repeat_n(p.clone(), group_size)).collect();
    let t0 = Instant::now();
    let completions = generate(model, &prompts, sampling, tokenizer.pad_id(), rng)?;
    let generate_s = t0.elapsed().as_secs_f64();
    let mut groups = Vec::with_capacity(problems.len());
    let mut it = completions.into_iter();
    for (p, prompt) in problems.iter().zip(encoded) {
        let mut rollouts = Vec::with_capacity(group_size);
        for c in it.by_ref().take(group_size) {
            let text = tokenizer.decode(&c.tokens)?;
            rollouts.push(Rollout {
                prompt_id: p.id,
                prompt_tokens: prompt.clone(),
                reward: p.score(&text),
                response_tokens: c.tokens,
                logprobs: c.logprobs,
                loss_mask: Vec::new(),
                version,
                finish: c.finish,
            });
        }
        groups.push(Group { prompt_id: p.id, rollouts });
    }
    Ok(Collected { groups, generate_s })
}
