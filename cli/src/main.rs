//! `sluice`: the command-line front end. Parses arguments and calls the
//! libraries; `client` holds the job commands, `dev` the one-machine supervisor.

mod check;
mod client;
mod dev;
mod eval;
mod generate;

use std::path::PathBuf;
use std::sync::atomic::Ordering;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use client::{exit, Failure, Remote};
use indicatif::{ProgressBar, ProgressStyle};
use sluice_core::config::JobConfig;
use sluice_model::hf::Policy;
use sluice_model::model::{ModelConfig, PRESETS};
use sluice_core::tokenizer::{Tokenizer, DEFAULT_ALPHABET};
use sluice_learner::metrics::Event;
use sluice_learner::trainer::Trainer;

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "Distributed RL post-training for language-model policies",
    after_help = "Exit codes: 0 ok, 1 error, 2 bad usage or invalid job file, 3 unknown job, \
4 not allowed in the job's state, 5 orchestrator unreachable, 6 the job failed or was cancelled, \
7 wrong or missing token, 130 interrupted."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Changes to a job file given on the command line.
#[derive(Args, Debug, Clone, Default)]
struct Overrides {
    /// Override one option of the job file, e.g. `--set train.lr=1e-5` or
    /// `--set model.dtype=bf16` (repeatable; later ones win). The value is read
    /// as TOML, or as a string when it is not valid TOML.
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    set: Vec<String>,
}

/// How to reach an orchestrator.
#[derive(Args, Debug, Clone)]
struct RemoteArgs {
    /// Orchestrator endpoint.
    #[arg(long, env = "SLUICE_ENDPOINT", default_value = "http://127.0.0.1:50071")]
    endpoint: String,
    #[command(flatten)]
    security: sluice_proto::serve::ClientSecurity,
    /// Print JSON for scripts instead of text.
    #[arg(long)]
    json: bool,
}

impl RemoteArgs {
    fn remote(&self) -> Remote {
        Remote { endpoint: self.endpoint.clone(), token: self.security.token.clone(), tls_ca: self.security.tls_ca.clone() }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Train a policy in this process: optional supervised warm-up, then GRPO.
    ///
    /// Resumes from the newest checkpoint in the run directory if there is one.
    /// Ctrl-C finishes the current step, writes a checkpoint and exits.
    Train {
        /// Job file (TOML); see examples/.
        job: PathBuf,
        #[command(flatten)]
        overrides: Overrides,
        /// Run directory (overrides train.out_dir).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Override train.steps.
        #[arg(long)]
        steps: Option<u64>,
        /// Start from scratch; refuses if the run directory already has checkpoints.
        #[arg(long)]
        fresh: bool,
        /// Print one JSON object per event on stdout instead of a progress bar.
        #[arg(long)]
        json: bool,
    },
    /// Write a random-init preset as a Hugging Face directory (config.json, model.safetensors, tokenizer.json).
    InitModel {
        /// Shapes: tiny, small, qwen2-0.5b, tiny-diffusion, small-diffusion.
        #[arg(long, default_value = "tiny")]
        preset: String,
        /// Output directory (created; an existing non-empty one is refused unless --force).
        #[arg(long)]
        out: PathBuf,
        /// Take the tokenizer (tokenizer.json, tokenizer_config.json with its chat
        /// template, generation_config.json) from this checkpoint directory instead
        /// of the character-level one; the vocabulary follows it.
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// Architecture written to config.json: qwen2, qwen3, llama or mistral.
        #[arg(long, default_value = "qwen2")]
        arch: String,
        /// Write into a non-empty --out.
        #[arg(long)]
        force: bool,
        /// f32 or bf16.
        #[arg(long, default_value = "f32")]
        dtype: String,
        #[arg(long, default_value_t = 0)]
        seed: i64,
    },
    /// Run a job on this machine: orchestrator, reward server, learners and
    /// actors as real processes on loopback ports, with a live progress bar.
    ///
    /// Children that crash are restarted (a learner resumes from its newest
    /// checkpoint). Ctrl-C stops the learners and actors after their current
    /// step (the learner checkpoints), then the servers. Logs of every process
    /// go to <train.out_dir>/logs/. Running it again resumes the run.
    Dev {
        /// Job file (TOML); see examples/.
        job: PathBuf,
        #[command(flatten)]
        overrides: Overrides,
        /// Keep the orchestrator's state in Redis (e.g. redis://127.0.0.1:6379) instead of memory.
        #[arg(long, env = "SLUICE_REDIS")]
        redis: Option<String>,
        /// Directory of the sluice-* binaries (default: next to this one).
        #[arg(long)]
        bin_dir: Option<PathBuf>,
        /// Seconds a worker's lease lasts (a dead actor's work is handed out again after it).
        #[arg(long, default_value_t = 5.0)]
        lease_s: f64,
        /// Restarts allowed per process before the job is given up.
        #[arg(long, default_value_t = 5)]
        max_restarts: u32,
        /// Address of the web dashboard (live plots; the URL with its token is
        /// printed at start). Port 0: a free port, kept across orchestrator restarts.
        #[arg(long, default_value = "127.0.0.1:0", conflicts_with = "no_dashboard")]
        dashboard: String,
        /// Do not serve the dashboard.
        #[arg(long)]
        no_dashboard: bool,
        /// Print one JSON object per event on stdout instead of a progress bar.
        #[arg(long)]
        json: bool,
    },
    /// Submit a job file to an orchestrator; prints the job id.
    Submit {
        job: PathBuf,
        #[command(flatten)]
        overrides: Overrides,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// List the orchestrator's jobs, newest first (fetched a page at a time).
    List {
        /// Show at most this many (the newest).
        #[arg(long)]
        limit: Option<usize>,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Show a job's state, step and work accounting.
    Status {
        job_id: String,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Print a job's events (training steps, evaluations, checkpoints, workers).
    ///
    /// With --follow, keeps printing until the job ends; exits 6 when it failed
    /// or was cancelled.
    Logs {
        job_id: String,
        #[arg(long, short)]
        follow: bool,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Cancel a job: its workers stop after their current step.
    Cancel {
        job_id: String,
        /// Why (shown in status).
        #[arg(long, default_value = "")]
        reason: String,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Delete ended jobs: their records, work items, outcome history and
    /// events (not their run directories on the workers). A queued or running
    /// job is refused (exit 4): cancel it first.
    Delete {
        #[arg(required = true)]
        job_ids: Vec<String>,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Evaluate a checkpoint (default: the job's model) on the job's held-out
    /// problems: greedy accuracy and pass@k (k = 1, 2, 4, … ≤ --samples, the
    /// unbiased estimator) at the job's sampling temperature.
    Eval {
        job: PathBuf,
        /// A Hugging Face directory (e.g. runs/x/checkpoints/step-00000100).
        #[arg(long)]
        checkpoint: Option<PathBuf>,
        /// Held-out problems to evaluate.
        #[arg(long, default_value_t = 64)]
        problems: usize,
        /// Samples per problem for pass@k.
        #[arg(long, default_value_t = 8)]
        samples: usize,
        #[command(flatten)]
        overrides: Overrides,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Sample completions from a checkpoint, prompts rendered with its chat
    /// template as in training: given prompts, a prompt file, standard input,
    /// or an interactive chat on a terminal.
    Generate(generate::GenerateOptions),
    /// Check a job file: print it with all defaults filled in, then open its
    /// model config, tokenizer and data files and show the first prompt as the
    /// policy will see it (stderr; with --json: {"job": …, "opens": …}).
    Check {
        job: PathBuf,
        #[command(flatten)]
        overrides: Overrides,
        /// Print JSON instead of TOML.
        #[arg(long)]
        json: bool,
    },
    /// Serve the web dashboard for local runs: each RUN_DIR's metrics.jsonl
    /// (what `sluice train` and learners write) is plotted and followed as it
    /// grows. For a cluster's jobs, use the orchestrator's --dashboard.
    Dashboard {
        /// Run directories (train.out_dir of the job files).
        #[arg(required = true)]
        run_dirs: Vec<PathBuf>,
        /// Address to serve on; port 0 picks a free one.
        #[arg(long, default_value = "127.0.0.1:8265")]
        listen: String,
        /// Require this token (as the orchestrator's dashboard does).
        #[arg(long, env = "SLUICE_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Print the URL as a JSON object.
        #[arg(long)]
        json: bool,
    },
}

fn main() {
    let telemetry = sluice_core::telemetry::init("sluice", "warn");
    let code = match dispatch(Cli::parse().command) {
        Ok(code) => code,
        Err(f) => {
            eprintln!("error: {}", f.message);
            f.code
        }
    };
    drop(telemetry); // flush before exit() skips destructors
    std::process::exit(code);
}

fn on_runtime<T>(f: impl std::future::Future<Output = client::Outcome<T>>) -> client::Outcome<T> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::new(exit::ERROR, format!("async runtime: {e}")))?;
    rt.block_on(f)
}

/// Runs a command; the process exit code, or a failure with its own.
fn dispatch(command: Command) -> client::Outcome<i32> {
    let ok = |()| 0;
    match command {
        Command::Dev { job, overrides, redis, bin_dir, lease_s, max_restarts, dashboard, no_dashboard, json } => {
            if !(lease_s > 0.0 && lease_s.is_finite()) {
                return Err(Failure::new(exit::USAGE, format!("--lease-s must be > 0, not {lease_s}")));
            }
            let stop = sluice_core::signal::stop_flag(Some("stopping: learners and actors finish their step (Ctrl-C again to quit now)"))
                .map_err(|e| Failure::new(exit::ERROR, e))?;
            let dashboard = (!no_dashboard).then_some(dashboard);
            dev::run(dev::DevOptions { job, overrides: overrides.set, redis, bin_dir, json, lease_s, max_restarts, dashboard }, stop)
        }
        Command::Submit { job, overrides, remote } => {
            on_runtime(client::submit(&remote.remote(), &job, &overrides.set, remote.json)).map(ok)
        }
        Command::List { limit, remote } => on_runtime(client::list(&remote.remote(), limit, remote.json)).map(ok),
        Command::Delete { job_ids, remote } => on_runtime(client::delete(&remote.remote(), &job_ids, remote.json)).map(ok),
        Command::Status { job_id, remote } => on_runtime(client::status(&remote.remote(), &job_id, remote.json)).map(ok),
        Command::Logs { job_id, follow, remote } => {
            on_runtime(client::logs(&remote.remote(), &job_id, follow, remote.json)).map(ok)
        }
        Command::Cancel { job_id, reason, remote } => {
            on_runtime(client::cancel(&remote.remote(), &job_id, &reason, remote.json)).map(ok)
        }
        local => local_command(local).map_err(|e| {
            // Job-file problems are usage errors; the rest are plain errors.
            let code = if is_config_error(&e) { exit::USAGE } else { exit::ERROR };
            Failure::new(code, format!("{e:#}"))
        }),
    }
}

/// `sluice dashboard`: serves the run directories until Ctrl-C.
fn dashboard(run_dirs: &[PathBuf], listen: &str, token: Option<String>, json: bool) -> Result<i32> {
    let source = sluice_dashboard::RunDirs::open(run_dirs)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("--listen {listen}"))?;
        let url = format!("http://{}/", listener.local_addr()?);
        let opts = sluice_dashboard::Options { token: token.filter(|t| !t.is_empty()), ..Default::default() };
        if json {
            println!("{}", serde_json::json!({"event": "listening", "url": url}));
        } else {
            println!("dashboard: {url} (Ctrl-C to stop)");
        }
        let router = sluice_dashboard::router(source, &opts);
        sluice_dashboard::serve(listener, router, None, sluice_core::signal::shutdown()).await?;
        anyhow::Ok(0)
    })
}

/// Whether a job-file value caused `e` (whichever library reported it).
fn is_config_error(e: &anyhow::Error) -> bool {
    if let Some(sluice_core::Error::Config { .. }) = e.downcast_ref::<sluice_core::Error>() {
        return true;
    }
    if let Some(m) = e.downcast_ref::<sluice_model::Error>() {
        return m.as_config().is_some();
    }
    e.downcast_ref::<sluice_learner::Error>().is_some_and(sluice_learner::Error::is_config)
}

/// Runs a command that needs no orchestrator; its exit code.
fn local_command(command: Command) -> Result<i32> {
    match command {
        Command::Train { job, overrides, out, steps, fresh, json } => train(job, &overrides.set, out, steps, fresh, json),
        Command::InitModel { preset, out, tokenizer, arch, force, dtype, seed } => {
            init_model(&preset, &out, tokenizer.as_deref(), &arch, force, &dtype, seed).map(|()| 0)
        }
        Command::Eval { job, checkpoint, problems, samples, overrides, json } => {
            let (_, cfg) = JobConfig::load(&job, &overrides.set)?;
            let r = eval::run(cfg, &eval::EvalOptions { checkpoint, problems, samples })?;
            if json {
                println!("{r}");
            } else {
                println!("{}: greedy accuracy {:.3} on {} problems", r["model"].as_str().unwrap_or("?"), r["greedy_accuracy"].as_f64().unwrap_or(0.0), r["problems"]);
                for (k, v) in r["pass_at_k"].as_object().into_iter().flatten() {
                    println!("{k} = {:.3} ({} samples at temperature {})", v.as_f64().unwrap_or(0.0), r["samples"], r["temperature"]);
                }
            }
            Ok(0)
        }
        Command::Generate(o) => generate::run(&o),
        Command::Dashboard { run_dirs, listen, token, json } => dashboard(&run_dirs, &listen, token, json),
        Command::Check { job, overrides, json } => {
            let (_, cfg) = JobConfig::load(&job, &overrides.set)?;
            let report = check::report(&cfg)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&serde_json::json!({"job": cfg, "opens": report}))?);
            } else {
                for o in &overrides.set {
                    println!("# --set {o}");
                }
                println!("{}", toml::to_string_pretty(&cfg)?);
                check::print_text(&report);
            }
            Ok(0)
        }
        _ => unreachable!("remote commands are dispatched above"),
    }
}

/// `sluice train`: exit 0 when the run reached its last step, 130 when Ctrl-C
/// stopped it (after the step in progress, with a checkpoint).
fn train(job: PathBuf, overrides: &[String], out: Option<PathBuf>, steps: Option<u64>, fresh: bool, json: bool) -> Result<i32> {
    let (_, mut cfg) = JobConfig::load(&job, overrides)?;
    if let Some(out) = out {
        cfg.train.out_dir = out;
    }
    if let Some(s) = steps {
        cfg.train.steps = s;
    }
    if fresh && sluice_learner::checkpoint::latest(&cfg.train.out_dir)?.is_some() {
        bail!("{} already has checkpoints; pick another --out or drop --fresh to resume", cfg.train.out_dir.display());
    }
    let stop = sluice_core::signal::stop_flag(Some("stopping after this step (Ctrl-C again to abort without a checkpoint)"))
        .map_err(anyhow::Error::msg)?;
    let mut trainer = Trainer::new(cfg.clone(), !fresh)?;
    let t = &cfg.train;
    let total = t.sft_steps + t.steps;
    let done = trainer.state().sft_step + trainer.state().step;
    let bar = if json { ProgressBar::hidden() } else { ProgressBar::new(total) };
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}")
            .expect("valid template"),
    );
    bar.set_position(done);
    // indicatif draws nothing when stderr is not a terminal; keep the log lines then.
    let say = |msg: String| if bar.is_hidden() { eprintln!("{msg}") } else { bar.println(msg) };
    let p = trainer.policy();
    say(format!("policy: {} parameters, {:?} on {:?}", p.config().num_params(), p.kind(), p.device()));
    if done > 0 {
        say(format!("resumed at sft step {} / grpo step {}", trainer.state().sft_step, trainer.state().step));
    }
    trainer.run(&stop, |e| {
        if json {
            println!("{}", serde_json::to_string(e).expect("events serialise"));
            return;
        }
        match e {
            Event::Sft(m) => {
                bar.inc(1);
                bar.set_message(format!("sft loss {:.3}", m.loss));
            }
            Event::Step(m) => {
                bar.inc(1);
                bar.set_message(format!(
                    "reward {:.3}  eff-grad {:.2}  {:.0} gen tok/s",
                    m.reward_mean, m.effective_gradient_ratio, m.generation_tokens_per_s
                ));
            }
            Event::Eval { step, sft_step, reward_mean, prompts, .. } => {
                say(format!("eval (sft {sft_step}, step {step}): mean reward {reward_mean:.3} on {prompts} held-out prompts"))
            }
            Event::Checkpoint { path, .. } => say(format!("checkpoint {}", path.display())),
        }
    })?;
    bar.finish_and_clear();
    if !json {
        eprintln!("run directory: {}", trainer.out_dir().display());
    }
    Ok(if stop.load(Ordering::SeqCst) { exit::INTERRUPTED } else { 0 })
}

fn init_model(
    preset: &str,
    out: &std::path::Path,
    tokenizer: Option<&std::path::Path>,
    arch: &str,
    force: bool,
    dtype: &str,
    seed: i64,
) -> Result<()> {
    let kind = sluice_model::device::kind(dtype.parse::<sluice_core::kinds::Dtype>().map_err(|e| anyhow::anyhow!("--dtype: {e}"))?);
    if !PRESETS.contains(&preset) {
        bail!("--preset `{preset}` is not one of {}", PRESETS.join(", "));
    }
    if !force && std::fs::read_dir(out).is_ok_and(|mut d| d.next().is_some()) {
        bail!("{} exists and is not empty; pick another --out or pass --force", out.display());
    }
    let tok = match tokenizer {
        Some(dir) => Tokenizer::from_dir(dir, &[])?,
        None => Tokenizer::char_level(DEFAULT_ALPHABET)?,
    };
    let mut cfg = ModelConfig::preset(preset, tok.vocab_size())?;
    cfg.set_arch(arch)?;
    cfg.eos_token_ids = tok.stop_ids().to_vec();
    cfg.bos_token_id = tok.bos_id();
    cfg.pad_token_id = Some(tok.pad_id());
    let policy = Policy::random(&cfg, tch::Device::Cpu, kind, seed);
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    policy.save(out)?;
    tok.save_dir(out)?;
    println!("wrote {} ({} parameters) to {}", preset, cfg.num_params(), out.display());
    Ok(())
}
