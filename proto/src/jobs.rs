//! Jobs in their JSON form: what `sluice status --json` prints and the
//! dashboard serves.

use crate::v1::{self, JobState};

/// The state's name (`queued`, `running`, `succeeded`, `failed`, `cancelled`).
pub fn state_name(state: i32) -> &'static str {
    match JobState::try_from(state).unwrap_or(JobState::Unspecified) {
        JobState::Queued => "queued",
        JobState::Running => "running",
        JobState::Succeeded => "succeeded",
        JobState::Failed => "failed",
        JobState::Cancelled => "cancelled",
        JobState::Unspecified => "unknown",
    }
}

/// Succeeded, failed or cancelled: nothing more will happen to the job.
pub fn is_final(state: i32) -> bool {
    matches!(JobState::try_from(state), Ok(JobState::Succeeded | JobState::Failed | JobState::Cancelled))
}

/// The job as a JSON object (spec omitted unless asked for).
pub fn job_json(j: &v1::Job, with_spec: bool) -> serde_json::Value {
    let p = j.progress.unwrap_or_default();
    let mut v = serde_json::json!({
        "id": j.id, "name": j.name, "state": state_name(j.state), "message": j.message,
        "created_unix_ms": j.created_unix_ms, "updated_unix_ms": j.updated_unix_ms,
        "progress": {
            "step": p.step, "total_steps": p.total_steps, "epoch": p.epoch,
            "work_created": p.work_created, "work_dispatched": p.work_dispatched,
            "work_completed": p.work_completed, "work_redispatched": p.work_redispatched,
            "work_outstanding": p.work_outstanding,
            "duplicate_outcomes": p.duplicate_outcomes, "rollouts_completed": p.rollouts_completed,
            "live_workers": p.live_workers, "events_dropped": p.events_dropped, "work_hinted": p.work_hinted,
            "work_trained": p.work_trained, "work_dropped_stale": p.work_dropped_stale,
            "work_dropped_invalid": p.work_dropped_invalid, "work_filtered": p.work_filtered, "work_unused": p.work_unused,
        },
    });
    if with_spec {
        v["spec_toml"] = j.spec_toml.clone().into();
    }
    v
}

