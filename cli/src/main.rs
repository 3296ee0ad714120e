//! `sluice`: the command-line front end. Parses arguments and calls the libraries.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use sluice_core::config::JobConfig;
use sluice_core::hf::{parse_kind, Policy};
use sluice_core::model::{ModelConfig, PRESETS};
use sluice_core::tokenizer::{Tokenizer, DEFAULT_ALPHABET};
use sluice_learner::trainer::{Event, Trainer};

#[derive(Parser)]
#[command(name = "sluice", version, about = "Distributed RL post-training for language-model policies")]
struct Cli {
    #[command(subcommand)]
    command: Command,
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
        /// One of: tiny, small, qwen2-0.5b.
        #[arg(long, default_value = "tiny")]
        preset: String,
        /// Output directory (created).
        #[arg(long)]
        out: PathBuf,
        /// f32 or bf16.
        #[arg(long, default_value = "f32")]
        dtype: String,
        #[arg(long, default_value_t = 0)]
        seed: i64,
    },
    /// Check a job file and print it with all defaults filled in.
    Check {
        job: PathBuf,
        /// Print JSON instead of TOML.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> Result<()> {
    sluice_core::logging::init("warn");
    match Cli::parse().command {
        Command::Train { job, out, steps, fresh, json } => train(job, out, steps, fresh, json),
        Command::InitModel { preset, out, dtype, seed } => init_model(&preset, &out, &dtype, seed),
        Command::Check { job, json } => {
            let cfg = JobConfig::from_file(&job)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&cfg)?);
            } else {
                println!("{}", toml::to_string_pretty(&cfg)?);
            }
            Ok(())
        }
    }
}

fn train(job: PathBuf, out: Option<PathBuf>, steps: Option<u64>, fresh: bool, json: bool) -> Result<()> {
    let mut cfg = JobConfig::from_file(&job)?;
    if let Some(out) = out {
        cfg.train.out_dir = out;
    }
    if let Some(s) = steps {
        cfg.train.steps = s;
    }
    if fresh && sluice_learner::checkpoint::latest(&cfg.train.out_dir)?.is_some() {
        bail!("{} already has checkpoints; pick another --out or drop --fresh to resume", cfg.train.out_dir.display());
    }
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc::set_handler(move || {
            if stop.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
            eprintln!("\nstopping after this step (Ctrl-C again to abort without a checkpoint)");
        })
        .context("installing the Ctrl-C handler")?;
    }
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
            Event::Eval { step, sft_step, reward_mean, prompts } => {
                say(format!("eval (sft {sft_step}, step {step}): mean reward {reward_mean:.3} on {prompts} held-out prompts"))
            }
            Event::Checkpoint { path, .. } => say(format!("checkpoint {}", path.display())),
        }
    })?;
    bar.finish_and_clear();
    if !json {
        eprintln!("run directory: {}", trainer.out_dir().display());
    }
    Ok(())
}

fn init_model(preset: &str, out: &std::path::Path, dtype: &str, seed: i64) -> Result<()> {
    let kind = parse_kind(dtype).with_context(|| format!("--dtype `{dtype}` is not f32 or bf16"))?;
    if !PRESETS.contains(&preset) {
        bail!("--preset `{preset}` is not one of {}", PRESETS.join(", "));
    }
    let tok = Tokenizer::char_level(DEFAULT_ALPHABET)?;
    let mut cfg = ModelConfig::preset(preset, tok.vocab_size())?;
    cfg.eos_token_id = Some(tok.eos_id());
    cfg.pad_token_id = Some(tok.pad_id());
    let policy = Policy::random(&cfg, tch::Device::Cpu, kind, seed);
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    policy.save(out)?;
    tok.save(&out.join("tokenizer.json"))?;
    println!("wrote {} ({} parameters) to {}", preset, cfg.num_params(), out.display());
    Ok(())
}
