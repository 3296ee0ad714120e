//! `sluice-reward-server`: verifier and intrinsic rewards over gRPC (see `sluice_reward_server`).

use std::path::PathBuf;

use clap::Parser;
use sluice_core::config::JobConfig;

/// Scores rollouts: task verifiers (extrinsic) and ONI intrinsic rewards from
/// annotated captions. Prints a `listening` JSON line on stdout; logs go to
/// stderr (RUST_LOG). Every flag can also be set through the variable shown.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Job file (TOML); its [reward] section configures the server.
    #[arg(env = "SLUICE_JOB")]
    job: PathBuf,
    /// Override one option of the job file, e.g. `--set train.lr=1e-5` (repeatable;
    /// the value is read as TOML, or as a string).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    set: Vec<String>,
    /// gRPC listen address; port 0 picks a free port.
    /// Loopback by default; `0.0.0.0:PORT` serves other hosts (set a token, and TLS).
    #[arg(long, env = "SLUICE_LISTEN", default_value = "127.0.0.1:50061")]
    listen: String,
    /// Override reward.store (`memory` or a redis:// URL).
    #[arg(long, env = "SLUICE_REWARD_STORE")]
    store: Option<sluice_core::kinds::StoreUrl>,
    /// The job's id at the orchestrator (or any name unique to this run):
    /// labels are stored under it, so two jobs with the same `name` keep
    /// separate labels. Without it, the job's `name`.
    #[arg(long, env = "SLUICE_JOB_ID")]
    job_id: Option<String>,
    #[command(flatten)]
    security: sluice_proto::serve::ServerSecurity,
}

fn main() -> anyhow::Result<()> {
    let _telemetry = sluice_core::telemetry::init("sluice-reward-server", "info");
    sluice_core::signal::die_with_parent();
    let args = Args::parse();
    let (_, mut job) = JobConfig::load(&args.job, &args.set)?;
    if let Some(store) = args.store {
        job.reward.store = store;
    }
    let tls = args.security.tls().map_err(anyhow::Error::msg)?;
    sluice_reward_server::server::run(job, args.job_id.as_deref(), &args.listen, args.security.token.as_deref(), tls.as_ref(), |e| {
        println!("{}", serde_json::to_string(e).expect("events serialise"));
    })?;
    Ok(())
}
