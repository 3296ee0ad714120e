//! `sluice-actor`: samples rollouts with the current policy and streams them to
//! a learner (see `sluice_actor::actor`).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use sluice_actor::actor::{self, ActorOptions};
use sluice_core::config::JobConfig;

/// Pulls weights from a learner, generates and scores groups of rollouts, and
/// streams them to it until the learner finishes the job.
///
/// Prints one JSON object per line on stdout (`connected`, `synced`, `sent`,
/// `disconnected`, `done`); logs go to stderr (RUST_LOG). Every flag can also
/// be set through the environment variable shown.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Job file (TOML).
    #[arg(env = "SLUICE_JOB")]
    job: PathBuf,
    /// Learner endpoint(s), comma-separated (`http://host:port`); actor i uses the (i mod n)-th.
    #[arg(long, env = "SLUICE_LEARNERS", value_delimiter = ',', required = true)]
    learner: Vec<String>,
    /// This actor's index (selects its prompts and its learner).
    #[arg(long, env = "SLUICE_ACTOR_INDEX", default_value_t = 0)]
    index: usize,
    /// Number of actors in the job.
    #[arg(long, env = "SLUICE_ACTORS", default_value_t = 1)]
    actors: usize,
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
    /// Bearer token for the learner and the reward server, when they require one.
    #[arg(long, env = "SLUICE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// CA certificate (PEM) that signed the servers' TLS certificates; use https:// endpoints.
    #[arg(long, env = "SLUICE_TLS_CA")]
    tls_ca: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    sluice_core::logging::init("info");
    let args = Args::parse();
    let job = JobConfig::from_file(&args.job)?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
    })
    .context("installing the Ctrl-C handler")?;
    let opts = ActorOptions {
        job,
        learners: args.learner,
        actor_id: args.id.unwrap_or_else(|| format!("actor-{}", args.index)),
        index: args.index,
        actors: args.actors.max(1),
        seed: args.seed,
        max_groups: args.max_groups,
        reward: args.reward,
        token: args.token,
        tls_ca: args.tls_ca,
    };
    actor::run(opts, stop, |e| println!("{}", serde_json::to_string(e).expect("events serialise")))?;
    Ok(())
}
