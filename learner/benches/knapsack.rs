//! Knapsack vs uniform rollout budgets at equal total rollouts (DESIGN.md,
//! "Knapsack budget allocation"), in-process `Trainer` runs.
//!
//! Task: one-digit sums and products (`a+b=`, `a*b=`; products are harder for a
//! tiny model) with a finite training set (64 prompts, so prompts
//! come round every 4 steps and build a success history), after a
//! supervised warm-up that leaves a mix of solved, unsolved and in-between
//! prompts. Each step samples 16 prompts × 8 rollouts = 128 rollouts under both
//! strategies. Reports per seed the effective-gradient ratio (share of
//! rollouts in groups with non-zero advantage) averaged over all steps and
//! over the steps after the first epoch (when knapsack has history), the
//! rollouts sampled (must be equal), and the held-out reward (greedy, 256 new
//! problems) at the start and the end.
//!
//! `cargo bench -p sluice-learner --bench knapsack -- [--seeds 3] [--steps 150] [--sft-steps 100]`

use std::sync::atomic::AtomicBool;

use sluice_core::config::JobConfig;
use sluice_learner::metrics::Event;
use sluice_learner::trainer::Trainer;

fn flag(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).map(|i| args[i + 1].clone())
}

struct Run {
    ratios: Vec<f64>,
    sampled: usize,
    evals: Vec<(u64, f64)>,
    seconds: f64,
}

fn run(strategy: &str, seed: u64, steps: u64, sft_steps: u64, out: &std::path::Path) -> Run {
    let text = format!(
        "name = \"knapsack-bench\"\n[model]\npreset = \"tiny\"\ndevice = \"cpu\"\ninit_seed = {seed}\n\
         [task]\nkind = \"arithmetic\"\ndigits = 1\noperands = 2\noperators = [\"+\", \"*\"]\ntrain_size = 64\nseed = {seed}\n\
         [sampling]\ntemperature = 1.0\nmax_new_tokens = 4\n\
         [grpo]\ngroup_size = 8\nclip_high = 0.28\nloss_agg = \"token-mean\"\n\
         [train]\nsteps = {steps}\nprompts_per_step = 16\nlr = 1e-3\nseed = {seed}\nsft_steps = {sft_steps}\nsft_batch_size = 32\nsft_lr = 3e-3\n\
         eval_every = 50\neval_prompts = 256\ncheckpoint_every = 0\nout_dir = \"{}\"\n\
         [budget]\nstrategy = \"{strategy}\"\nn_low = 2\nn_up = 64\n",
        out.display()
    );
    let cfg = JobConfig::from_toml(&text).unwrap();
    let mut t = Trainer::new(cfg, false).unwrap();
    let (mut ratios, mut sampled, mut evals) = (Vec::new(), 0, Vec::new());
    let t0 = std::time::Instant::now();
    t.run(&AtomicBool::new(false), |e| match e {
        Event::Step(m) => {
            ratios.push(m.effective_gradient_ratio);
            sampled += m.rollouts_sampled;
        }
        Event::Eval { step, reward_mean, sft_step, .. } if *sft_step > 0 || *step > 0 => evals.push((*step, *reward_mean)),
        _ => {}
    })
    .unwrap();
    Run { ratios, sampled, evals, seconds: t0.elapsed().as_secs_f64() }
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len().max(1) as f64
}

fn main() {
    let seeds: u64 = flag("--seeds").map_or(3, |s| s.parse().unwrap());
    let steps: u64 = flag("--steps").map_or(150, |s| s.parse().unwrap());
    let sft_steps: u64 = flag("--sft-steps").map_or(100, |s| s.parse().unwrap());
    let dir = tempfile::tempdir().unwrap();
    println!(
        "## Knapsack vs uniform: one-digit a+b and a*b, 64 training prompts, {sft_steps} warm-up steps, \
         16 prompts x 8 rollouts per step, {steps} steps"
    );
    println!("| seed | strategy | eff. gradient ratio, all steps | after step 4 | rollouts sampled | held-out reward (step: reward) | s |");
    println!("|---|---|---|---|---|---|---|");
    let mut summary: Vec<(f64, f64, f64, f64)> = Vec::new();
    for seed in 0..seeds {
        let mut row = Vec::new();
        for strategy in ["uniform", "knapsack"] {
            let r = run(strategy, seed, steps, sft_steps, &dir.path().join(format!("{strategy}-{seed}")));
            let evals: Vec<String> = r.evals.iter().map(|(s, v)| format!("{s}: {v:.3}")).collect();
            println!(
                "| {seed} | {strategy} | {:.3} | {:.3} | {} | {} | {:.0} |",
                mean(&r.ratios),
                mean(&r.ratios[4.min(r.ratios.len())..]),
                r.sampled,
                evals.join(", "),
                r.seconds
            );
            row.push((mean(&r.ratios[4.min(r.ratios.len())..]), r.evals.last().map_or(0.0, |e| e.1)));
        }
        summary.push((row[0].0, row[1].0, row[0].1, row[1].1));
    }
    let (u, k): (Vec<f64>, Vec<f64>) = summary.iter().map(|s| (s.0, s.1)).unzip();
    let (ue, ke): (Vec<f64>, Vec<f64>) = summary.iter().map(|s| (s.2, s.3)).unzip();
    println!(
        "\nmean over seeds: effective-gradient ratio after step 4 uniform {:.3}, knapsack {:.3} (knapsack / uniform {:.2}); \
         final held-out reward uniform {:.3}, knapsack {:.3}",
        mean(&u),
        mean(&k),
        mean(&k) / mean(&u),
        mean(&ue),
        mean(&ke)
    );
}
