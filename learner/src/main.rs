//! `sluice-learner`: one rank of a job's learner group (see `sluice_learner::node`).

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use sluice_learner::node::{self, CollectiveKind, NodeOptions};
use sluice_worker::{load_job, Connection};
use sluice_proto::v1::RegisterWorkerRequest;

/// Serves the Learner gRPC service and trains on the rollouts actors stream in.
///
/// The job comes from a file, or from an orchestrator (`--orchestrator URL`):
/// the learner registers as a worker of the job (`--job-id`, or the oldest
/// queued or running one), trains on its spec, and reports its progress there.
///
/// Prints one JSON object per line on stdout (`listening`, `published`,
/// `train`, `finished`); logs go to stderr (RUST_LOG). Every flag can also be
/// set through the environment variable shown.
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
    /// Orchestrator endpoint (`http://host:port`): get the job from it and report progress to it.
    #[arg(long, env = "SLUICE_ORCHESTRATOR")]
    orchestrator: Option<String>,
    /// The orchestrator's job to work for (default: the oldest queued or running job).
    #[arg(long, env = "SLUICE_JOB_ID", requires = "orchestrator")]
    job_id: Option<String>,
    /// CA certificate (PEM) for an https:// orchestrator.
    #[arg(long, env = "SLUICE_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// gRPC listen address; port 0 picks a free port (printed in the `listening` line).
    /// Loopback by default; `0.0.0.0:PORT` serves other hosts (set a token, and TLS).
    #[arg(long, env = "SLUICE_LISTEN", default_value = "127.0.0.1:50051")]
    listen: String,
    /// This learner's rank, 0-based.
    #[arg(long, env = "SLUICE_RANK", default_value_t = 0)]
    rank: usize,
    /// Number of learner ranks.
    #[arg(long, env = "SLUICE_WORLD_SIZE", default_value_t = 1)]
    world_size: usize,
    /// Rank 0's collective address, host:port (rank 0 listens there).
    #[arg(long, env = "SLUICE_RENDEZVOUS")]
    rendezvous: Option<String>,
    /// With rollout.weight_transport = "broadcast": rank 0's weights broadcast
    /// group, host:port. Rank 0 listens there (default: the --listen host, a
    /// free port); other ranks tell their actors this address, so give them
    /// rank 0's, as actors reach it.
    #[arg(long, env = "SLUICE_WEIGHTS_BROADCAST")]
    weights_broadcast: Option<String>,
    /// Gradient collective between ranks: auto (NCCL for CUDA policies, else TCP), tcp, nccl.
    #[arg(long, env = "SLUICE_COLLECTIVE", default_value = "auto")]
    collective: CollectiveKind,
    /// The run directory (checkpoints, metrics): instead of the job file's
    /// train.out_dir, or of <runs-root>/<job id> for a job from an orchestrator.
    #[arg(long, env = "SLUICE_OUT")]
    out: Option<PathBuf>,
    /// Start from scratch instead of resuming from the newest checkpoint.
    #[arg(long)]
    fresh: bool,
    /// Seconds to keep answering after the last step, so actors see the job end.
    #[arg(long, default_value_t = 3.0)]
    linger_s: f64,
    #[command(flatten)]
    roots: sluice_worker::RootArgs,
    #[command(flatten)]
    security: sluice_proto::serve::ServerSecurity,
}

fn main() -> anyhow::Result<()> {
    let _telemetry = sluice_core::telemetry::init("sluice-learner", "info");
    sluice_core::signal::die_with_parent();
    let args = Args::parse();
    let stop = sluice_core::signal::stop_flag(Some("stopping after the current step (press Ctrl-C again to quit now)"))
        .map_err(anyhow::Error::msg)?;
    let conn = args.orchestrator.clone().map(|endpoint| Connection {
        endpoint,
        token: args.security.token.clone(),
        tls_ca: args.tls_ca.clone(),
    });
    let request = RegisterWorkerRequest {
        job_id: args.job_id.clone().unwrap_or_default(),
        role: "learner".into(),
        name: format!("learner-{}", args.rank),
        address: args.listen.clone(),
        rank: args.rank as u32,
    };
    let (mut job, session) = load_job(args.job.as_deref(), &args.set, conn, &args.roots, request, stop.clone())?;
    if let Some(out) = args.out {
        job.train.out_dir = out;
    }
    let opts = NodeOptions {
        job,
        listen: args.listen,
        rank: args.rank,
        world_size: args.world_size,
        rendezvous: args.rendezvous,
        weights_broadcast: args.weights_broadcast,
        resume: !args.fresh,
        collective: args.collective,
        linger: Duration::from_secs_f64(args.linger_s.max(0.0)),
        tls: args.security.tls().map_err(anyhow::Error::msg)?,
        token: args.security.token,
        session,
    };
    node::run(opts, stop, |e| {
        println!("{}", serde_json::to_string(e).expect("events serialise"));
    })?;
    Ok(())
}
