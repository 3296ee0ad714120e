//! Objectives at the same task and budget, in-process `Trainer` runs: GRPO
//! against DisCO (log-L score; basic and DRO forms), three seeds each; then a
//! two-reward job (correctness and brevity) with fixed weights against a
//! Lagrange constraint on brevity; then NuRL hints on and off, with uniform and
//! knapsack budgets: the share of all-fail prompts that become solvable.
//!
//! Task: one-digit sums and products (`a+b=`, `a*b=`), 64 training prompts,
//! a supervised warm-up, then 16 prompts × 8 rollouts per step for every
//! objective (the same rollout budget). Reports the held-out reward (greedy,
//! 256 new problems) after the warm-up and at the end, mean ± sd over seeds.
//!
//! `cargo bench -p sluice-learner --bench objectives -- [--seeds 3] [--steps 150] [--sft-steps 100]`

use std::sync::atomic::AtomicBool;

use sluice_core::config::JobConfig;
use sluice_learner::metrics::Event;
use sluice_learner::trainer::Trainer;

fn flag(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).map(|i| args[i + 1].clone())
}

/// (held-out reward after the warm-up, at the end, seconds).
fn run(objective: &str, seed: u64, steps: u64, sft_steps: u64, out: &std::path::Path) -> (f64, f64, f64) {
    let text = format!(
        "name = \"objectives-bench\"\n{objective}\n[model]\npreset = \"tiny\"\ndevice = \"cpu\"\ninit_seed = {seed}\n\
         [task]\nkind = \"arithmetic\"\ndigits = 1\noperands = 2\noperators = [\"+\", \"*\"]\ntrain_size = 64\nseed = {seed}\n\
         [sampling]\ntemperature = 1.0\nmax_new_tokens = 4\n\
         [train]\nsteps = {steps}\nprompts_per_step = 16\nlr = 1e-3\nseed = {seed}\nsft_steps = {sft_steps}\nsft_batch_size = 32\nsft_lr = 3e-3\n\
         eval_every = {steps}\neval_prompts = 256\ncheckpoint_every = 0\nout_dir = \"{}\"\n",
        out.display()
    );
    let cfg = JobConfig::from_toml(&text).unwrap();
    let mut t = Trainer::new(cfg, false).unwrap();
    let mut evals = Vec::new();
    let t0 = std::time::Instant::now();
    t.run(&AtomicBool::new(false), |e| {
        if let Event::Eval { step, reward_mean, sft_step, .. } = e {
            if *sft_step > 0 || *step > 0 {
                evals.push(*reward_mean);
            }
        }
    })
    .unwrap();
    (evals.first().copied().unwrap_or(f64::NAN), evals.last().copied().unwrap_or(f64::NAN), t0.elapsed().as_secs_f64())
}

/// Named values, in name order.
type Named = Vec<(String, f64)>;

/// Mean over the last 20 steps of each reward component, the final weights, and the final held-out reward.
fn run_mix(rewards: &str, seed: u64, steps: u64, sft_steps: u64, out: &std::path::Path) -> (Named, Named, f64) {
    let text = format!(
        "name = \"rewards-bench\"\n[model]\npreset = \"tiny\"\ndevice = \"cpu\"\ninit_seed = {seed}\n\
         [task]\nkind = \"arithmetic\"\ndigits = 1\noperands = 2\noperators = [\"+\"]\nseed = {seed}\n\
         [sampling]\ntemperature = 1.0\nmax_new_tokens = 8\n[grpo]\ngroup_size = 8\nclip_high = 0.28\n\
         [train]\nsteps = {steps}\nprompts_per_step = 16\nlr = 1e-3\nseed = {seed}\nsft_steps = {sft_steps}\nsft_batch_size = 32\nsft_lr = 3e-3\n\
         eval_every = {steps}\neval_prompts = 256\ncheckpoint_every = 0\nout_dir = \"{}\"\n[reward]\n{rewards}\n",
        out.display()
    );
    let cfg = JobConfig::from_toml(&text).unwrap();
    let mut t = Trainer::new(cfg, false).unwrap();
    let (mut comps, mut weights, mut eval) = (Vec::new(), Vec::new(), f64::NAN);
    t.run(&AtomicBool::new(false), |e| match e {
        Event::Step(m) => {
            comps.push(m.reward_components.clone());
            weights = m.reward_weights.iter().map(|(k, v)| (k.clone(), *v)).collect();
        }
        Event::Eval { reward_mean, step, .. } if *step > 0 => eval = *reward_mean,
        _ => {}
    })
    .unwrap();
    let tail = &comps[comps.len().saturating_sub(20)..];
    let names: Vec<String> = tail.last().map(|c| c.keys().cloned().collect()).unwrap_or_default();
    let means = names.iter().map(|k| (k.clone(), tail.iter().map(|c| c[k]).sum::<f64>() / tail.len() as f64)).collect();
    (means, weights, eval)
}

/// (all-fail prompts seen, of those solved without a hint at the end, held-out reward).
fn run_hints(hints: bool, strategy: &str, seed: u64, steps: u64, sft_steps: u64, out: &std::path::Path) -> (usize, usize, f64) {
    let text = format!(
        "name = \"hints-bench\"\n[model]\npreset = \"tiny\"\ndevice = \"cpu\"\ninit_seed = {seed}\n\
         [task]\nkind = \"arithmetic\"\ndigits = 1\noperands = 2\noperators = [\"+\", \"*\"]\ntrain_size = 64\nseed = {seed}\n\
         [sampling]\ntemperature = 1.0\nmax_new_tokens = 4\n[grpo]\ngroup_size = 8\nclip_high = 0.28\n\
         [train]\nsteps = {steps}\nprompts_per_step = 16\nlr = 1e-3\nseed = {seed}\nsft_steps = {sft_steps}\nsft_batch_size = 32\nsft_lr = 3e-3\n\
         eval_every = {steps}\neval_prompts = 256\ncheckpoint_every = 0\nout_dir = \"{}\"\n\
         [budget]\nstrategy = \"{strategy}\"\nn_low = 2\nn_up = 64\n[hints]\nenabled = {hints}\nmin_outcomes = 8\n",
        out.display()
    );
    let cfg = JobConfig::from_toml(&text).unwrap();
    let mut t = Trainer::new(cfg, false).unwrap();
    let mut eval = f64::NAN;
    t.run(&AtomicBool::new(false), |e| {
        if let Event::Eval { reward_mean, step, .. } = e {
            if *step > 0 {
                eval = *reward_mean;
            }
        }
    })
    .unwrap();
    let fails = t.all_fail_ever();
    let solved = fails.iter().filter(|&&p| t.history().rate(p, 1).is_some_and(|r| r > 0.0)).count();
    (fails.len(), solved, eval)
}

fn mean_sd(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let m = v.iter().sum::<f64>() / n;
    let var = if v.len() > 1 { v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0) } else { 0.0 };
    (m, var.sqrt())
}

fn main() {
    let seeds: u64 = flag("--seeds").map_or(3, |s| s.parse().unwrap());
    let steps: u64 = flag("--steps").map_or(150, |s| s.parse().unwrap());
    let sft_steps: u64 = flag("--sft-steps").map_or(100, |s| s.parse().unwrap());
    let dir = tempfile::tempdir().unwrap();
    println!(
        "## Objectives: one-digit a+b and a*b, 64 training prompts, {sft_steps} warm-up steps, 16 prompts x 8 rollouts per step, {steps} steps, {seeds} seeds"
    );
    println!("| objective | held-out reward after warm-up | at the end, mean ± sd | per seed | s per run |");
    println!("|---|---|---|---|---|");
    let objectives = [
        ("GRPO (clip_high 0.28, token-mean)", "algorithm = \"grpo\"\n[grpo]\ngroup_size = 8\nclip_high = 0.28"),
        ("DisCO, log-L, DRO tau 10", "algorithm = \"disco\"\n[grpo]\ngroup_size = 8\n[disco]\ntau = 10.0"),
        ("DisCO, log-L, basic", "algorithm = \"disco\"\n[grpo]\ngroup_size = 8\n[disco]\ntau = 0.0"),
    ];
    for (name, body) in objectives {
        let (mut start, mut end, mut secs) = (Vec::new(), Vec::new(), Vec::new());
        for seed in 0..seeds {
            let (a, b, s) = run(body, seed, steps, sft_steps, &dir.path().join(format!("{}-{seed}", start.len() + end.len())));
            start.push(a);
            end.push(b);
            secs.push(s);
        }
        let (e, esd) = mean_sd(&end);
        let per: Vec<String> = end.iter().map(|v| format!("{v:.3}")).collect();
        println!("| {name} | {:.3} | {e:.3} ± {esd:.3} | {} | {:.0} |", mean_sd(&start).0, per.join(", "), mean_sd(&secs).0);
    }

    println!();
    println!(
        "## Two rewards: one-digit a+b, max_new_tokens 8, {sft_steps} warm-up steps, {steps} steps, {seeds} seeds; components averaged over the last 20 steps"
    );
    println!("| rewards | correct | short (1 - len/8) | final weights (seed 0) | held-out reward |");
    println!("|---|---|---|---|---|");
    let mixes = [
        ("correct only (weight 1)", "weights = { correct = 1.0, short = 0.0 }"),
        ("fixed: correct 1 + short 0.5", "weights = { correct = 1.0, short = 0.5 }"),
        ("constraint: correct 1, E[short] >= 0.8", "weights = { correct = 1.0 }\nconstraints = { short = 0.8 }\nmultiplier_lr = 0.05"),
        ("dynamic (gradient-based), from correct 2/3 + short 1/3", "weights = { correct = 2.0, short = 1.0 }\ndynamic = true\ndynamic_scale = 0.01"),
    ];
    for (name, body) in mixes {
        let (mut correct, mut short, mut evals, mut first_weights) = (Vec::new(), Vec::new(), Vec::new(), String::new());
        for seed in 0..seeds {
            let (means, weights, eval) = run_mix(body, seed, steps, sft_steps, &dir.path().join(format!("mix-{seed}-{}", correct.len())));
            let get = |k: &str| means.iter().find(|(n, _)| n == k).map_or(f64::NAN, |(_, v)| *v);
            correct.push(get("correct"));
            short.push(get("short"));
            evals.push(eval);
            if seed == 0 {
                first_weights = weights.iter().map(|(k, v)| format!("{k} {v:.2}")).collect::<Vec<_>>().join(", ");
            }
        }
        let f = |v: &[f64]| {
            let (m, sd) = mean_sd(v);
            format!("{m:.3} ± {sd:.3}")
        };
        println!("| {name} | {} | {} | {first_weights} | {} |", f(&correct), f(&short), f(&evals));
    }

    println!();
    println!(
        "## Hints: one-digit a+b and a*b, 64 training prompts, {sft_steps} warm-up steps, {steps} steps, {seeds} seeds; a prompt is all-fail after 8 failures in a row"
    );
    println!("| budgets | hints | all-fail prompts (per seed) | solved without a hint at the end | share solved, mean ± sd | held-out reward |");
    println!("|---|---|---|---|---|---|");
    for strategy in ["uniform", "knapsack"] {
        for hints in [false, true] {
            let (mut fails, mut solved, mut share, mut evals) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for seed in 0..seeds {
                let (f, s, e) = run_hints(hints, strategy, seed, steps, sft_steps, &dir.path().join(format!("hints-{strategy}-{hints}-{seed}")));
                fails.push(f.to_string());
                solved.push(s.to_string());
                share.push(s as f64 / f.max(1) as f64);
                evals.push(e);
            }
            let (m, sd) = mean_sd(&share);
            let (e, esd) = mean_sd(&evals);
            println!("| {strategy} | {} | {} | {} | {m:.3} ± {sd:.3} | {e:.3} ± {esd:.3} |", if hints { "on" } else { "off" }, fails.join(", "), solved.join(", "));
        }
    }
}
