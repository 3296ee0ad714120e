//! `sluice-actor`: samples rollouts with the current policy and streams them to
//! a learner (see `sluice_actor::actor`).

use std::path::PathBuf;

use clap::Parser;
use sluice_actor::actor::{self, ActorOptions};
use sluice_worker::{load_job, Connection};
use sluice_proto::v1::RegisterWorkerRequest;

/// Pulls weights from a learner, generates and scores groups of rollouts, and
/// streams them to it until the learner finishes the job.
///
/// With `--orchestrator URL` the actor registers as a worker of a job (its
/// spec comes from there, no job file needed) and samples the work items the
/// orchestrator hands out; without it, the actor picks prompts itself.
///
/// Prints one JSON object per line on stdout (`connected`, `synced`, `sent`,
/// `disconnected`, `done`); logs go to stderr (RUST_LOG). Every flag can also
/// be set through the environment variable shown.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Job file (TOML); not needed with --orchestrator.
    #[arg(env = "SLUICE_JOB", required_unless_present = "orchestrator")]
    job: Option<PathBuf>,
    /// Override one option of the job file, e.g. `--set train.lr=1e-5` (repeatable;
    /// the value is read as TOML, or as a string).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE", conflicts_with = "orchestrator")]
    set: Vec<String>,
    /// Orchestrator endpoint (`http://host:port`): get the job and work items from it.
    #[arg(long, env = "SLUICE_ORCHESTRATOR")]
    orchestrator: Option<String>,
    /// The orchestrator's job to work for (default: the oldest queued or running job).
    #[arg(long, env = "SLUICE_JOB_ID", requires = "orchestrator")]
    job_id: Option<String>,
    /// Learner endpoint(s), comma-separated (`http://host:port`); actor i uses the (i mod n)-th.
    #[arg(long, env = "SLUICE_LEARNERS", value_delimiter = ',', required = true)]
    learner: Vec<String>,
    /// This actor's index: selects its learner (index mod the number of
    /// learners), its sampling stream and, without an orchestrator, its prompts.
    /// Default: 0, or with an orchestrator and --id (e.g. a pod name) a number
    /// derived from the id, so interchangeable replicas spread over the learners.
    #[arg(long, env = "SLUICE_ACTOR_INDEX")]
    index: Option<usize>,
    /// Number of actors in the job (default: the job's resources.actors); each
    /// samples train.prompts_per_step / actors prompts per batch unless
    /// rollout.prompts_per_batch says otherwise.
    #[arg(long, env = "SLUICE_ACTORS")]
    actors: Option<usize>,
    /// Name in logs and on the wire (default: actor-INDEX).
    #[arg(long, env = "SLUICE_ACTOR_ID")]
    id: Option<String>,
    /// Sampling seed.
    #[arg(long, env = "SLUICE_SEED", default_value_t = 0)]
    seed: u64,
    /// Reward server endpoint (`http://host:port`); without it the actor runs the task verifier itself.
    #[arg(long, env = "SLUICE_REWARD")]
    reward: Option<String>,
    /// Stop after sending this many groups.
    #[arg(long)]
    max_groups: Option<u64>,
    #[command(flatten)]
    roots: sluice_worker::RootArgs,
    #[command(flatten)]
    security: sluice_proto::serve::ClientSecurity,
}

fn main() -> anyhow::Result<()> {
    let _telemetry = sluice_core::telemetry::init("sluice-actor", "info");
    sluice_core::signal::die_with_parent();
    let args = Args::parse();
    let stop = sluice_core::signal::stop_flag(None).map_err(anyhow::Error::msg)?;
    let index = match (args.index, &args.id, &args.orchestrator) {
        (Some(i), _, _) => i,
        (None, Some(id), Some(_)) => stable_index(id),
        _ => 0,
    };
    let actor_id = args.id.unwrap_or_else(|| format!("actor-{index}"));
    let conn = args.orchestrator.clone().map(|endpoint| Connection {
        endpoint,
        token: args.security.token.clone(),
        tls_ca: args.security.tls_ca.clone(),
    });
    let request = RegisterWorkerRequest {
        job_id: args.job_id.clone().unwrap_or_default(),
        role: "actor".into(),
        name: actor_id.clone(),
        address: String::new(),
        rank: index as u32,
    };
    let (job, session) = load_job(args.job.as_deref(), &args.set, conn, &args.roots, request, stop.clone())?;
    let actors = args.actors.unwrap_or(job.resources.actors).max(1);
    let opts = ActorOptions {
        job,
        learners: args.learner,
        actor_id,
        index,
        actors,
        seed: args.seed,
        max_groups: args.max_groups,
        reward: args.reward,
        token: args.security.token,
        tls_ca: args.security.tls_ca,
    };
    let result = actor::run(opts, session.as_ref(), stop, |e| println!("{}", serde_json::to_string(e).expect("events serialise")));
    if let Some(s) = session {
        // An actor's failure does not fail the job (another actor can take its work).
        s.finish(false, None);
    }
    result?;
    Ok(())
}

/// A number in 0..65536 from an actor id (FNV-1a): the same id, the same index.
fn stable_index(id: &str) -> usize {
    (sluice_core::fnv1a(id.as_bytes()) % 65_536) as usize
}
