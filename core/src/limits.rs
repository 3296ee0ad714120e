//! Every limit that one job file, one message or one client is held to, in
//! one place. A job file is checked against these by
//! [`JobConfig::from_toml`](crate::config::JobConfig::from_toml) — the same
//! call in `sluice check`, `sluice submit`, the orchestrator and every worker —
//! and each refusal names the field; servers check messages against them and
//! answer `INVALID_ARGUMENT` or `RESOURCE_EXHAUSTED` with the limit in the
//! reason. `docs/RELIABILITY.md` lists them with what each one protects.
//!
//! The bounds are far above what a real job needs (a 7B GRPO job uses 512
//! prompts per step, groups of 16, 8k new tokens); they exist so that no
//! number in a file can ask a process for terabytes or overflow a product.

// ---- Job files (checked by `JobConfig::from_toml`) ----

/// Largest job file, in bytes.
pub const MAX_JOB_FILE_BYTES: usize = 1 << 20;
/// Longest job `name`, in characters (no control characters either).
pub const MAX_JOB_NAME_CHARS: usize = 128;
/// Largest `train.prompts_per_step`.
pub const MAX_PROMPTS_PER_STEP: usize = 65_536;
/// Largest `grpo.group_size` (and `rollout.max_group_size`, `budget.n_up`).
pub const MAX_GROUP_SIZE: usize = 4096;
/// Largest `train.micro_batch_size` and `train.sft_batch_size`.
pub const MAX_BATCH_SIZE: usize = 65_536;
/// Largest `sampling.slots` (rows decoded at once).
pub const MAX_SLOTS: usize = 65_536;
/// Largest `train.eval_prompts`.
pub const MAX_EVAL_PROMPTS: usize = 1 << 20;
/// Largest `sampling.max_new_tokens` (tokens per response).
pub const MAX_NEW_TOKENS: i64 = 1 << 17;
/// Most stop strings, and the longest one in bytes.
pub const MAX_STOP_STRINGS: usize = 64;
pub const MAX_STOP_BYTES: usize = 256;
/// Largest `rollout.max_staleness` (per-lag counters and open rounds are sized by it).
pub const MAX_STALENESS: u64 = 1024;
/// Largest `rollout.buffer_groups`.
pub const MAX_BUFFER_GROUPS: usize = 1 << 20;
/// Largest `rollout.weight_chunk_bytes` and `rollout.max_rollout_bytes`.
pub const MAX_CHUNK_BYTES: usize = 32 << 20;
/// Largest `reward.queue_capacity` (captions waiting for the annotator).
pub const MAX_QUEUE_CAPACITY: usize = 1 << 24;
/// Largest `reward.batch_size`.
pub const MAX_REWARD_BATCH: usize = 4096;

// ---- Messages and clients (checked by the servers) ----

/// Largest gRPC message any sluice server decodes or encodes.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;
/// Longest worker name, address or job id in an orchestrator request, in bytes.
pub const MAX_ID_BYTES: usize = 256;
/// Characters of a client's id echoed back in an error.
pub const ECHOED_ID_CHARS: usize = 64;
/// Most work items one `NextWork` hands out.
pub const MAX_WORK_ITEMS_PER_CALL: usize = 4096;
/// Events the orchestrator keeps per job; later ones are dropped (the step
/// counter still moves). A 100,000-step job with evaluations stays below it.
pub const MAX_EVENTS_PER_JOB: usize = 200_000;
/// Most jobs one `ListJobs` page returns (the default page is 100).
pub const MAX_LIST_PAGE: usize = 1000;
/// Incomplete groups one rollout stream may hold at a learner.
pub const MAX_PARTIAL_GROUPS_PER_STREAM: usize = 64;
/// Incomplete groups all streams together may hold at a learner.
pub const MAX_PARTIAL_GROUPS: usize = 1024;
/// Most items one `Score` call may carry.
pub const MAX_SCORE_ITEMS: usize = 4096;
/// Longest response text the reward server scores, in bytes.
pub const MAX_RESPONSE_BYTES: usize = 1 << 20;
/// Longest caption label, in bytes (after normalisation).
pub const MAX_CAPTION_BYTES: usize = 4096;
