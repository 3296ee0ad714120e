//! `sluice-orchestrator`: jobs, worker leases and work dispatch (see `sluice_orchestrator`).

use std::time::Duration;

use clap::Parser;
use sluice_orchestrator::server::{self, Options};

/// Owns jobs, workers and the dispatch of work. Users submit jobs with
/// `sluice submit`; learners and actors started with `--orchestrator URL`
/// register, fetch the job spec and (actors) pull work items.
///
/// Prints a `listening` JSON line on stdout; logs go to stderr (RUST_LOG).
/// Every flag can also be set through the environment variable shown.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// gRPC listen address; port 0 picks a free port.
    /// Loopback by default; `0.0.0.0:PORT` serves other hosts (set a token, and TLS).
    #[arg(long, env = "SLUICE_LISTEN", default_value = "127.0.0.1:50071")]
    listen: String,
    /// State store: `memory` (lost on exit) or a redis:// URL (survives restarts).
    #[arg(long, env = "SLUICE_STORE", default_value = "memory")]
    store: String,
    /// Prefix of every Redis key this orchestrator writes: give each
    /// orchestrator that shares a Redis its own.
    #[arg(long, env = "SLUICE_STORE_PREFIX", default_value = sluice_orchestrator::store::DEFAULT_PREFIX)]
    store_prefix: String,
    /// Seconds a worker's lease lasts after each heartbeat; its work is
    /// handed to another worker when it runs out.
    #[arg(long, env = "SLUICE_LEASE_S", default_value_t = 10.0)]
    lease_s: f64,
    /// Serve the web dashboard (live plots of every job) on this address,
    /// e.g. `127.0.0.1:8265`; port 0 picks a free one. Same token and TLS
    /// as the gRPC API. Off by default.
    #[arg(long, env = "SLUICE_DASHBOARD")]
    dashboard: Option<String>,
    #[command(flatten)]
    security: sluice_proto::serve::ServerSecurity,
}

fn main() -> anyhow::Result<()> {
    let _telemetry = sluice_core::telemetry::init("sluice-orchestrator", "info");
    sluice_core::signal::die_with_parent();
    let args = Args::parse();
    if !(args.lease_s > 0.0 && args.lease_s.is_finite()) {
        anyhow::bail!("--lease-s must be > 0, not {}", args.lease_s);
    }
    let opts = Options {
        listen: args.listen,
        store: args.store,
        store_prefix: args.store_prefix,
        lease: Duration::from_secs_f64(args.lease_s),
        tls: args.security.tls().map_err(anyhow::Error::msg)?,
        token: args.security.token,
        dashboard: args.dashboard,
    };
    server::run(opts, |e| println!("{}", serde_json::to_string(e).expect("events serialise")))?;
    Ok(())
}
