//! Rollouts on the wire: the one codec between `sluice_core::rollout::Rollout`
//! and `v1::Rollout`. Actors encode with [`encode`]; learners decode with
//! `Rollout::try_from(&wire)`, which checks everything a rollout must satisfy
//! on its own (packed fields whole, one log-prob per response token, finite and
//! non-positive log-probs, rewards present and finite, a known finish reason).
//! What depends on the receiving learner (job, size and token limits,
//! vocabulary) is the learner's to check.

use sluice_core::rollout::{FinishReason, Rollout};

use crate::{packed, v1};

/// Where a rollout sits: its job, actor and group.
#[derive(Debug, Clone, Copy)]
pub struct Placement<'a> {
    pub job: &'a str,
    pub actor: &'a str,
    pub group_id: u64,
    pub group_size: usize,
    /// The orchestrator work item the group answers (0: none).
    pub work_id: u64,
    /// W3C traceparent of the sampling batch ("" when not tracing).
    pub trace: &'a str,
}

/// The wire form of the `index`-th rollout of a group.
pub fn encode(r: &Rollout, at: Placement<'_>, index: usize, timings: Option<v1::Timings>) -> v1::Rollout {
    v1::Rollout {
        job_id: at.job.to_string(),
        actor_id: at.actor.to_string(),
        group_id: at.group_id,
        group_size: at.group_size as u32,
        index: index as u32,
        prompt_id: r.prompt_id,
        prompt_tokens: packed::tokens(&r.prompt_tokens),
        response_tokens: packed::tokens(&r.response_tokens),
        logprobs: r.logprobs.as_deref().map(packed::floats).unwrap_or_default(),
        loss_mask: packed::mask(&r.loss_mask),
        rewards: Some(v1::Rewards { extrinsic: r.extrinsic, intrinsic: r.intrinsic, total: r.reward }),
        policy_version: r.version,
        finish: v1::FinishReason::from(r.finish) as i32,
        timings,
        work_id: at.work_id,
        traceparent: at.trace.to_string(),
        switch_at: r.switches.iter().map(|s| s.0).collect(),
        switch_version: r.switches.iter().map(|s| s.1).collect(),
    }
}

impl From<FinishReason> for v1::FinishReason {
    fn from(f: FinishReason) -> Self {
        match f {
            FinishReason::Stop => v1::FinishReason::Stop,
            FinishReason::Length => v1::FinishReason::Length,
        }
    }
}

/// Why a wire rollout is not a rollout: a short kind (counted by learners) and
/// a reason for the sender.
#[derive(Debug, Clone, PartialEq)]
pub struct Malformed {
    pub kind: &'static str,
    pub reason: String,
}

fn malformed(kind: &'static str, reason: impl Into<String>) -> Malformed {
    Malformed { kind, reason: reason.into() }
}

fn ragged(field: &str) -> Malformed {
    malformed("shape", format!("{field} is not a whole number of 4-byte little-endian values"))
}

impl TryFrom<&v1::Rollout> for Rollout {
    type Error = Malformed;

    fn try_from(r: &v1::Rollout) -> Result<Self, Malformed> {
        let prompt = packed::tokens_from(&r.prompt_tokens).ok_or_else(|| ragged("prompt_tokens"))?;
        let response = packed::tokens_from(&r.response_tokens).ok_or_else(|| ragged("response_tokens"))?;
        let logprobs = packed::floats_from(&r.logprobs).ok_or_else(|| ragged("logprobs"))?;
        let loss_mask = packed::mask_from(&r.loss_mask).ok_or_else(|| malformed("shape", "loss_mask bytes must be 0 or 1"))?;
        if prompt.is_empty() {
            return Err(malformed("empty_prompt", "prompt_tokens is empty"));
        }
        // No bytes for a non-empty response: the policy has no behaviour log-probs.
        let logprobs = (!logprobs.is_empty() || response.is_empty()).then_some(logprobs);
        let lp = logprobs.as_deref().unwrap_or_default();
        if logprobs.is_some() && lp.len() != response.len() {
            return Err(malformed("shape", format!("{} logprobs for {} response tokens", lp.len(), response.len())));
        }
        if !loss_mask.is_empty() && loss_mask.len() != response.len() {
            return Err(malformed(
                "shape",
                format!("loss_mask has {} entries for {} response tokens", loss_mask.len(), response.len()),
            ));
        }
        if let Some(i) = lp.iter().position(|l| !l.is_finite()) {
            return Err(malformed("non_finite", format!("logprob {} at position {i} is not finite", lp[i])));
        }
        if let Some(i) = lp.iter().position(|&l| l > 1e-3) {
            return Err(malformed("bad_logprob", format!("logprob {} at position {i} is positive", lp[i])));
        }
        let Some(rewards) = r.rewards.as_ref() else {
            return Err(malformed("bad_reward", "rewards are missing"));
        };
        for (what, x) in [("reward", rewards.total), ("extrinsic reward", rewards.extrinsic), ("intrinsic reward", rewards.intrinsic)] {
            if !x.is_finite() {
                return Err(malformed("non_finite", format!("{what} {x} is not finite")));
            }
        }
        if r.switch_at.len() != r.switch_version.len() {
            return Err(malformed("shape", format!("{} switch_at for {} switch_version", r.switch_at.len(), r.switch_version.len())));
        }
        let switches: Vec<(u32, u64)> = r.switch_at.iter().copied().zip(r.switch_version.iter().copied()).collect();
        let mut last = (0u32, r.policy_version);
        for &(at, v) in &switches {
            if at <= last.0 || at as usize >= response.len().max(1) || v <= last.1 {
                return Err(malformed(
                    "switches",
                    format!("version switch ({at}, {v}) after ({}, {}) is not strictly later in both, inside the response", last.0, last.1),
                ));
            }
            last = (at, v);
        }
        let finish = match v1::FinishReason::try_from(r.finish) {
            Ok(v1::FinishReason::Stop) => FinishReason::Stop,
            Ok(v1::FinishReason::Length) => FinishReason::Length,
            _ => return Err(malformed("finish", format!("finish reason {} is not STOP or LENGTH", r.finish))),
        };
        Ok(Rollout {
            prompt_id: r.prompt_id,
            prompt_tokens: prompt,
            response_tokens: response,
            logprobs,
            loss_mask,
            captions: Vec::new(),
            reward: rewards.total,
            extrinsic: rewards.extrinsic,
            intrinsic: rewards.intrinsic,
            version: r.policy_version,
            switches,
            finish,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rollout() -> Rollout {
        Rollout {
            prompt_id: 7,
            prompt_tokens: vec![1, 2, 3],
            response_tokens: vec![4, 5],
            logprobs: Some(vec![-0.25, -1.5]),
            loss_mask: vec![true, false],
            captions: Vec::new(),
            switches: Vec::new(),
            reward: 1.5,
            extrinsic: 1.0,
            intrinsic: 0.5,
            version: 3,
            finish: FinishReason::Stop,
        }
    }

    #[test]
    fn a_rollout_survives_the_wire_and_defects_are_named() {
        let at = Placement { job: "j", actor: "a", group_id: 9, group_size: 2, work_id: 4, trace: "" };
        let wire = encode(&rollout(), at, 1, None);
        assert_eq!((wire.group_id, wire.group_size, wire.index, wire.work_id), (9, 2, 1, 4));
        assert_eq!(Rollout::try_from(&wire).unwrap(), rollout());
        // A policy without behaviour log-probs says so, and it survives the wire.
        let none = Rollout { logprobs: None, ..rollout() };
        assert_eq!(Rollout::try_from(&encode(&none, at, 0, None)).unwrap(), none);
        let broken = |f: &dyn Fn(&mut v1::Rollout)| {
            let mut w = wire.clone();
            f(&mut w);
            Rollout::try_from(&w).unwrap_err().kind
        };
        assert_eq!(broken(&|w| w.logprobs = packed::floats(&[-0.1])), "shape");
        assert_eq!(broken(&|w| w.prompt_tokens = vec![1u8, 2, 3].into()), "shape");
        assert_eq!(broken(&|w| w.logprobs = packed::floats(&[-0.1, f32::NAN])), "non_finite");
        assert_eq!(broken(&|w| w.logprobs = packed::floats(&[-0.1, 0.5])), "bad_logprob");
        assert_eq!(broken(&|w| w.rewards = None), "bad_reward");
        assert_eq!(broken(&|w| w.rewards.as_mut().unwrap().extrinsic = f64::NAN), "non_finite");
        assert_eq!(broken(&|w| w.finish = 99), "finish");
        assert_eq!(broken(&|w| w.prompt_tokens = Default::default()), "empty_prompt");
    }
}
