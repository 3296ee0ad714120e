//! `sluice eval`: a checkpoint (or the job's model) on the job's held-out
//! problems: greedy accuracy, and pass@k for k = 1, 2, 4, … up to `samples`
//! from `samples` completions per problem at the job's temperature (the
//! unbiased estimator), with the prompts rendered as in training.

use std::path::PathBuf;

use anyhow::Result;
use rand::SeedableRng;
use serde_json::{json, Value};
use sluice_core::config::JobConfig;
use sluice_core::sampling::SamplingParams;
use sluice_core::tasks::{self, pass_at_k, Problem, Split};
use sluice_model::collect::collect;
use sluice_model::hf::load_policy;

/// Problems generated per batch.
const BATCH: usize = 32;

pub struct EvalOptions {
    pub checkpoint: Option<PathBuf>,
    pub problems: usize,
    pub samples: usize,
}

pub fn run(mut cfg: JobConfig, o: &EvalOptions) -> Result<Value> {
    if let Some(dir) = &o.checkpoint {
        cfg.model.path = Some(dir.clone());
        cfg.model.preset = None;
    }
    anyhow::ensure!(o.problems >= 1 && o.samples >= 1, "--problems and --samples must be >= 1");
    let (policy, mut tokenizer) = load_policy(&cfg.model)?;
    tokenizer.set_prompt(&cfg.prompt)?;
    let task = tasks::build(&cfg.task)?;
    let mut sampling = cfg.sampling.clone();
    sampling.stop_at(tokenizer.stop_ids());
    let problems: Vec<Problem> = (0..o.problems as u64).map(|i| task.problem(Split::Eval, i)).collect();
    // Correct samples per problem under `params`, `n` samples each.
    let correct = |params: &SamplingParams, n: usize, seed: u64| -> Result<Vec<usize>> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut out = Vec::with_capacity(problems.len());
        for chunk in problems.chunks(BATCH) {
            let sizes = vec![n; chunk.len()];
            let c = collect(policy.model(), &tokenizer, task.as_ref(), chunk, &sizes, params, 0, &mut rng, None)?;
            out.extend(c.groups.iter().map(|g| g.rollouts.iter().filter(|r| r.extrinsic >= 1.0).count()));
        }
        Ok(out)
    };
    let greedy = correct(&SamplingParams { temperature: 0.0, ..sampling.clone() }, 1, 0)?;
    let greedy_acc = greedy.iter().sum::<usize>() as f64 / problems.len() as f64;
    let mut pass = serde_json::Map::new();
    if sampling.temperature > 0.0 {
        let c = correct(&sampling, o.samples, cfg.train.seed)?;
        let mut k = 1;
        while k <= o.samples {
            let est = c.iter().map(|&ci| pass_at_k(o.samples, ci, k)).sum::<f64>() / c.len() as f64;
            pass.insert(format!("pass@{k}"), json!(est));
            k *= 2;
        }
    }
    Ok(json!({
        "model": cfg.model.path.as_ref().map_or_else(|| format!("preset {}", cfg.model.preset.as_deref().unwrap_or("?")), |p| p.display().to_string()),
        "problems": problems.len(),
        "greedy_accuracy": greedy_acc,
        "samples": o.samples,
        "temperature": sampling.temperature,
        "pass_at_k": pass,
        "first_prompt": tokenizer.render_problem(&problems[0])?,
    }))
}
