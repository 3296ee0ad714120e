//! `sluice submit / list / status / logs / cancel`: the job commands against a
//! running orchestrator, with human output by default and `--json` for scripts.

use std::path::PathBuf;

use sluice_core::config::JobConfig;
use sluice_worker::connect;
use sluice_proto::auth;
pub use sluice_proto::jobs::{is_final, job_json, state_name};
use sluice_proto::v1::orchestrator_client::OrchestratorClient;
use sluice_proto::v1::{self, event::Body, JobState};
use sluice_proto::Channel;
use tonic::Code;

/// Exit codes scripts can rely on (also in the README).
pub mod exit {
    /// Anything else that went wrong.
    pub const ERROR: i32 = 1;
    /// Bad usage or an invalid job file.
    pub const USAGE: i32 = 2;
    /// No such job.
    pub const NOT_FOUND: i32 = 3;
    /// Not allowed in the job's state (e.g. cancelling a finished job).
    pub const STATE: i32 = 4;
    /// The orchestrator (or its store) cannot be reached.
    pub const UNREACHABLE: i32 = 5;
    /// `logs --follow` / `dev`: the job ended failed or cancelled.
    pub const JOB_FAILED: i32 = 6;
    /// Refused: wrong or missing bearer token.
    pub const AUTH: i32 = 7;
    /// Stopped by Ctrl-C / SIGINT (after a clean stop: the step finished, checkpointed).
    pub const INTERRUPTED: i32 = sluice_core::signal::INTERRUPTED;
}

/// An error with the exit code it maps to.
#[derive(Debug)]
pub struct Failure {
    pub code: i32,
    pub message: String,
}

impl Failure {
    pub fn new(code: i32, message: impl Into<String>) -> Self {
        Failure { code, message: message.into() }
    }
}

impl From<sluice_worker::Error> for Failure {
    fn from(e: sluice_worker::Error) -> Self {
        match e {
            sluice_worker::Error::Status(s) => s.into(),
            sluice_worker::Error::Transport { .. } => Failure::new(exit::UNREACHABLE, e.to_string()),
            other => Failure::new(exit::ERROR, other.to_string()),
        }
    }
}

impl From<tonic::Status> for Failure {
    fn from(s: tonic::Status) -> Self {
        let code = match s.code() {
            Code::NotFound => exit::NOT_FOUND,
            Code::FailedPrecondition => exit::STATE,
            Code::InvalidArgument => exit::USAGE,
            Code::Unavailable => exit::UNREACHABLE,
            Code::Unauthenticated => exit::AUTH,
            _ => exit::ERROR,
        };
        Failure::new(code, s.message().to_string())
    }
}

pub type Outcome<T = ()> = Result<T, Failure>;

/// How to reach the orchestrator.
#[derive(Debug, Clone)]
pub struct Remote {
    pub endpoint: String,
    pub token: Option<String>,
    pub tls_ca: Option<PathBuf>,
}

impl Remote {
    pub async fn client(&self) -> Outcome<OrchestratorClient<Channel>> {
        let tls = self
            .tls_ca
            .as_deref()
            .map(sluice_proto::tls::client_config)
            .transpose()
            .map_err(|e| Failure::new(exit::USAGE, e))?;
        Ok(connect(&self.endpoint, tls.as_ref()).await?)
    }

    pub fn req<T>(&self, msg: T) -> tonic::Request<T> {
        auth::request(msg, self.token.as_deref())
    }
}

fn print_job(j: &v1::Job) {
    let p = j.progress.unwrap_or_default();
    println!("job        {}", j.id);
    println!("state      {}{}", state_name(j.state), if j.message.is_empty() { String::new() } else { format!(" ({})", j.message) });
    println!("step       {} / {}   (epoch {})", p.step, p.total_steps, p.epoch);
    println!(
        "work       {} created, {} completed, {} outstanding; {} dispatched, {} re-dispatched, {} duplicate outcomes",
        p.work_created, p.work_completed, p.work_outstanding, p.work_dispatched, p.work_redispatched, p.duplicate_outcomes
    );
    let accounted = p.work_trained + p.work_dropped_stale + p.work_dropped_invalid + p.work_filtered + p.work_unused;
    println!(
        "groups     {} trained, {} dropped stale, {} dropped invalid, {} filtered, {} unused; {} in flight or buffered",
        p.work_trained,
        p.work_dropped_stale,
        p.work_dropped_invalid,
        p.work_filtered,
        p.work_unused,
        p.work_completed.saturating_sub(accounted)
    );
    println!("rollouts   {} completed", p.rollouts_completed);
    println!("workers    {} live", p.live_workers);
}

pub async fn submit(remote: &Remote, path: &std::path::Path, overrides: &[String], json: bool) -> Outcome {
    // Check here first: the same message the orchestrator would give, without a
    // round trip. The job submitted is the file with the overrides applied.
    let (text, _) = JobConfig::load(path, overrides).map_err(|e| Failure::new(exit::USAGE, e.to_string()))?;
    let mut c = remote.client().await?;
    let job = c.submit_job(remote.req(v1::SubmitJobRequest { spec_toml: text })).await?.into_inner();
    if json {
        println!("{}", job_json(&job, false));
    } else {
        println!("submitted {}", job.id);
        eprintln!("follow it with: sluice logs {} --follow --endpoint {}", job.id, remote.endpoint);
    }
    Ok(())
}

pub async fn list(remote: &Remote, limit: Option<usize>, json: bool) -> Outcome {
    let mut c = remote.client().await?;
    let limit = limit.unwrap_or(usize::MAX);
    let (mut jobs, mut page_token) = (Vec::new(), String::new());
    while jobs.len() < limit {
        let page_size = (limit - jobs.len()).min(sluice_core::limits::MAX_LIST_PAGE) as u32;
        let r = c.list_jobs(remote.req(v1::ListJobsRequest { page_size, page_token })).await?.into_inner();
        jobs.extend(r.jobs);
        if r.next_page_token.is_empty() {
            break;
        }
        page_token = r.next_page_token;
    }
    jobs.truncate(limit);
    if json {
        println!("{}", serde_json::Value::Array(jobs.iter().map(|j| job_json(j, false)).collect()));
        return Ok(());
    }
    if jobs.is_empty() {
        eprintln!("no jobs");
        return Ok(());
    }
    println!("{:<28} {:<10} {:>13} {:>8}", "JOB", "STATE", "STEP", "WORKERS");
    for j in &jobs {
        let p = j.progress.unwrap_or_default();
        println!("{:<28} {:<10} {:>13} {:>8}", j.id, state_name(j.state), format!("{}/{}", p.step, p.total_steps), p.live_workers);
    }
    Ok(())
}

pub async fn status(remote: &Remote, id: &str, json: bool) -> Outcome {
    let mut c = remote.client().await?;
    let job = c.get_job(remote.req(v1::GetJobRequest { job_id: id.into() })).await?.into_inner();
    if json {
        println!("{}", job_json(&job, true));
    } else {
        print_job(&job);
    }
    Ok(())
}

/// Deletes each job in turn; stops at the first refusal (its exit code).
pub async fn delete(remote: &Remote, ids: &[String], json: bool) -> Outcome {
    let mut c = remote.client().await?;
    for id in ids {
        c.delete_job(remote.req(v1::DeleteJobRequest { job_id: id.clone() })).await?;
        if json {
            println!("{}", serde_json::json!({ "deleted": id }));
        } else {
            println!("deleted {id}");
        }
    }
    Ok(())
}

pub async fn cancel(remote: &Remote, id: &str, reason: &str, json: bool) -> Outcome {
    let mut c = remote.client().await?;
    let job = c.cancel_job(remote.req(v1::CancelJobRequest { job_id: id.into(), reason: reason.into() })).await?.into_inner();
    if json {
        println!("{}", job_json(&job, false));
    } else {
        println!("cancelled {}", job.id);
    }
    Ok(())
}

/// One line for a job event in human output (None: not worth a line).
pub fn describe(event: &v1::Event) -> Option<String> {
    Some(match event.body.as_ref()? {
        Body::Step(m) => format!(
            "step {:>5}  reward {:.3}  extrinsic {:.3}  eff-grad {:.2}  staleness {:.2}  {:.0} train tok/s",
            m.step, m.reward_mean, m.extrinsic_mean, m.effective_gradient_ratio, m.staleness_mean, m.train_tokens_per_s
        ),
        Body::Sft(m) => format!("sft {:>5}  loss {:.4}", m.sft_step, m.loss),
        Body::Eval(e) => format!("eval at step {}: held-out reward {:.3} on {} prompts", e.step, e.reward_mean, e.prompts),
        Body::Checkpoint(c) => format!("checkpoint {} at step {}", c.path, c.step),
        Body::State(s) => format!("job {}{}", s.state, if s.message.is_empty() { String::new() } else { format!(": {}", s.message) }),
        Body::Worker(w) => format!("worker {} ({} rank {}) joined", w.worker, w.role, w.rank),
        Body::WorkerLost(w) => format!("worker {} lost its lease", w.worker),
        Body::Redispatched(r) => format!("{} work item(s) of {} handed out again", r.items.len(), r.worker),
        Body::Submitted(s) => format!("submitted {}", s.job),
        // One per learner step: `sluice status` has the totals.
        Body::Round(_) | Body::Work(_) => return None,
        Body::Annotation(a) => format!(
            "annotation: {} labelled, {} queued, {} dropped, {} failed batches, {:.2} s per batch",
            a.labelled, a.queued, a.dropped, a.failures, a.annotate_seconds_mean
        ),
    })
}

/// Prints the job's events (and follows them until the job ends with `follow`);
/// following a job that failed or was cancelled is `exit::JOB_FAILED`.
pub async fn logs(remote: &Remote, id: &str, follow: bool, json: bool) -> Outcome {
    let mut c = remote.client().await?;
    let req = v1::WatchJobRequest { job_id: id.into(), from_seq: 0, no_follow: !follow };
    let mut stream = c.watch_job(remote.req(req)).await?.into_inner();
    let mut state = JobState::Unspecified as i32;
    while let Some(e) = stream.message().await? {
        state = e.state;
        if json {
            println!("{}", e.json);
        } else if let Some(line) = e.event.as_ref().and_then(describe) {
            println!("{line}");
        }
    }
    if follow && is_final(state) && state != JobState::Succeeded as i32 {
        return Err(Failure::new(exit::JOB_FAILED, format!("job {id} {}", state_name(state))));
    }
    Ok(())
}
