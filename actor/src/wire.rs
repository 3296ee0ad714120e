//! Core rollouts as `sluice.v1` messages.

use sluice_core::rollout::FinishReason;
use sluice_core::rollout::Rollout;
use sluice_proto::{packed, v1};

/// Where a rollout sits: its job, actor and group.
#[derive(Debug, Clone, Copy)]
pub struct Placement<'a> {
    pub job: &'a str,
    pub actor: &'a str,
    pub group_id: u64,
    pub group_size: usize,
    /// The orchestrator work item the group answers (0: none).
    pub work_id: u64,
}

/// The wire form of the `index`-th rollout of a group.
pub fn to_wire(r: &Rollout, at: Placement<'_>, index: usize, timings: Option<v1::Timings>) -> v1::Rollout {
    v1::Rollout {
        job_id: at.job.to_string(),
        actor_id: at.actor.to_string(),
        group_id: at.group_id,
        group_size: at.group_size as u32,
        index: index as u32,
        prompt_id: r.prompt_id,
        prompt_tokens: packed::tokens(&r.prompt_tokens),
        response_tokens: packed::tokens(&r.response_tokens),
        logprobs: packed::floats(&r.logprobs),
        loss_mask: packed::mask(&r.loss_mask),
        rewards: Some(v1::Rewards { extrinsic: r.extrinsic, intrinsic: r.intrinsic, total: r.reward }),
        policy_version: r.version,
        finish: match r.finish {
            FinishReason::Stop => v1::FinishReason::Stop,
            FinishReason::Length => v1::FinishReason::Length,
        } as i32,
        timings,
        work_id: at.work_id,
    }
}
