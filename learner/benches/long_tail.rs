//! Generation on long-tailed response lengths: continuous batching against
//! static batching, measured in one run on the same rows.
//!
//! `rows` prompts (random tokens, `--prompt-len` each) of the chosen preset
//! (random init); each row's response length is fixed in advance so that 90% of
//! rows stop at the median `--median` tokens and 10% (a seeded choice) at
//! `--tail` × that. Three ways to generate every row, each run `--iters` times
//! (best time kept):
//! * `static, S rows at a time`: batches of `--slots` rows, each batch decoding
//!   until its longest row ends (the baseline: the same memory as continuous);
//! * `static, all rows at once`: `sampling.slots = 0`, what an actor did before;
//! * `continuous, S slots`: `generate_continuous`.
//!
//! All three produce the same tokens (asserted); tokens/s counts generated tokens.
//!
//! usage: cargo bench -p sluice-learner --bench long_tail -- [--preset small]
//!        [--rows 128] [--slots 32] [--prompt-len 16] [--median 16] [--tail 8]
//!        [--iters 2] [--threads N] [--json]

use std::time::Instant;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sluice_core::sampling::SamplingParams;
use sluice_model::generate::{generate_continuous, generate_until, Completion};
use sluice_model::hf::Policy;
use sluice_model::model::ModelConfig;

fn arg(args: &[String], name: &str, default: &str) -> String {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned().unwrap_or_else(|| default.to_string())
}

/// Best wall time of `iters` runs of `f`, and its last output.
fn best(iters: usize, mut f: impl FnMut() -> Vec<Completion>) -> (f64, Vec<Completion>) {
    let mut out = Vec::new();
    let mut t = f64::INFINITY;
    for _ in 0..iters {
        let t0 = Instant::now();
        out = f();
        t = t.min(t0.elapsed().as_secs_f64());
    }
    (t, out)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let preset = arg(&args, "--preset", "small");
    let rows: usize = arg(&args, "--rows", "128").parse().unwrap();
    let slots: usize = arg(&args, "--slots", "32").parse().unwrap();
    let plen: usize = arg(&args, "--prompt-len", "16").parse().unwrap();
    let median: usize = arg(&args, "--median", "16").parse().unwrap();
    let tail: usize = arg(&args, "--tail", "8").parse().unwrap();
    let iters: usize = arg(&args, "--iters", "2").parse().unwrap();
    let threads: i32 = arg(&args, "--threads", &std::thread::available_parallelism().map_or(1, |n| n.get()).to_string()).parse().unwrap();
    tch::set_num_threads(threads);

    let cfg = ModelConfig::preset(&preset, 64).unwrap();
    let policy = Policy::random(&cfg, tch::Device::Cpu, tch::Kind::Float, 0);
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let prompts: Vec<Vec<i64>> = (0..rows).map(|_| (0..plen).map(|_| rng.gen_range(1..64)).collect()).collect();
    let mut lengths = vec![median; rows];
    let long = (rows / 10).max(1);
    let mut order: Vec<usize> = (0..rows).collect();
    order.shuffle(&mut rng);
    for &i in &order[..long] {
        lengths[i] = median * tail;
    }
    let params = SamplingParams { temperature: 1.0, max_new_tokens: (median * tail) as i64, ..Default::default() };
    let tokens: usize = lengths.iter().sum();
    let seed = 7;

    // Static, S rows at a time: each batch's rows keep their own sampling
    // streams only within the batch, so tokens differ from the other two;
    // lengths (and so the work) are the same.
    let (static_s, _) = best(iters, || {
        let mut out = Vec::new();
        for (b, chunk) in prompts.chunks(slots).enumerate() {
            let until = |r: usize, t: &[i64]| t.len() >= lengths[b * slots + r];
            out.extend(generate_until(policy.model(), chunk, &params, 0, &mut ChaCha8Rng::seed_from_u64(seed + b as u64), &until, None).unwrap());
        }
        out
    });
    let until = |r: usize, t: &[i64]| t.len() >= lengths[r];
    let (static_all, want) =
        best(iters, || generate_until(policy.model(), &prompts, &params, 0, &mut ChaCha8Rng::seed_from_u64(seed), &until, None).unwrap());
    let continuous = SamplingParams { slots, ..params.clone() };
    let (cont, got) = best(iters, || {
        generate_continuous(policy.model(), &prompts, &continuous, 0, &mut ChaCha8Rng::seed_from_u64(seed), &until, None).unwrap()
    });
    assert!(want.iter().zip(&got).all(|(a, b)| a.tokens == b.tokens), "continuous and static batching disagree");
    assert_eq!(got.iter().map(|c| c.tokens.len()).sum::<usize>(), tokens);

    let tps = |s: f64| tokens as f64 / s;
    if args.iter().any(|a| a == "--json") {
        println!(
            "{}",
            serde_json::json!({
                "preset": preset, "rows": rows, "slots": slots, "median": median, "tail": tail, "tokens": tokens,
                "static_slots_s": static_s, "static_all_s": static_all, "continuous_s": cont,
                "continuous_vs_static_slots": static_s / cont, "continuous_vs_static_all": static_all / cont,
            })
        );
        return;
    }
    println!("## long-tailed generation: preset {preset}, {rows} rows ({long} at {}x the median {median} tokens), {slots} slots, {threads} threads", tail);
    println!("| method | seconds | generated tokens/s | continuous / this |");
    println!("|---|---|---|---|");
    println!("| static, {slots} rows at a time | {static_s:.2} | {:.0} | {:.2} |", tps(static_s), static_s / cont);
    println!("| static, all {rows} rows at once | {static_all:.2} | {:.0} | {:.2} |", tps(static_all), static_all / cont);
    println!("| continuous, {slots} slots | {cont:.2} | {:.0} | 1.00 |", tps(cont));
}
