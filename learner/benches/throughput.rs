//! Throughput of the learning core against PyTorch / transformers, measured in one run.
//!
//! For a named preset (random init, saved as a Hugging Face directory so both
//! sides load the same weights) this measures
//! * generation tokens/s: batched sampling with the KV cache, every row
//!   generating exactly `new` tokens, vs `transformers` `generate` (sampling, cache on);
//! * train tokens/s: the learner's path (`engine::TokenLogprobs`: the chunked
//!   vocabulary head recomputed in backward; with `--checkpoint-layers` also
//!   each decoder layer) + backward + AdamW on `[batch, prompt + new]`, vs the
//!   plain loop in PyTorch (whole-vocabulary log-softmax, nothing recomputed);
//!
//! and prints each pair with the ratio sluice / baseline.
//!
//! usage: cargo bench -p sluice-learner --bench throughput -- [--preset small]
//!        [--batch 16] [--prompt-len 32] [--new 32] [--iters 3] [--threads N] [--device cpu|cuda]
//!        [--vocab N (default: the character-level tokenizer's)] [--checkpoint-layers]
//!        [--dtype f32|bf16] [--json (one JSON object instead of the table)]
//! The baseline runs with `SLUICE_PYTHON` (the project venv; scripts/env.sh sets it).

use std::process::Command;
use std::time::Instant;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use sluice_model::generate::generate;
use sluice_core::sampling::SamplingParams;
use sluice_model::hf::Policy;
use sluice_model::model::ModelConfig;
use sluice_learner::engine::TokenLogprobs;
use sluice_core::tokenizer::{Tokenizer, DEFAULT_ALPHABET};
use sluice_learner::optim::{AdamW, AdamWConfig};
use tch::{Device, Kind, Tensor};

fn arg(args: &[String], name: &str, default: &str) -> String {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned().unwrap_or_else(|| default.to_string())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let preset = arg(&args, "--preset", "small");
    let batch: i64 = arg(&args, "--batch", "16").parse().unwrap();
    let plen: i64 = arg(&args, "--prompt-len", "32").parse().unwrap();
    let new: i64 = arg(&args, "--new", "32").parse().unwrap();
    let iters: usize = arg(&args, "--iters", "3").parse().unwrap();
    let threads: i32 = arg(&args, "--threads", &std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).to_string()).parse().unwrap();
    let device_name = arg(&args, "--device", if tch::Cuda::is_available() { "cuda" } else { "cpu" });
    let device = if device_name == "cuda" { Device::Cuda(0) } else { Device::Cpu };
    let checkpoint_layers = args.iter().any(|a| a == "--checkpoint-layers");
    let dtype = arg(&args, "--dtype", "f32");
    let kind = if dtype == "bf16" { Kind::BFloat16 } else { Kind::Float };
    tch::set_num_threads(threads);

    let tok = Tokenizer::char_level(DEFAULT_ALPHABET).unwrap();
    let vocab: i64 = arg(&args, "--vocab", &tok.vocab_size().to_string()).parse().unwrap();
    let mut cfg = ModelConfig::preset(&preset, vocab).unwrap();
    cfg.eos_token_ids = vec![tok.eos_id()];
    let policy = Policy::random(&cfg, device, kind, 0);
    let dir = tempfile::tempdir().unwrap();
    policy.save(dir.path()).unwrap();
    let sync = || {
        if let Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
    };

    // Generation: no stop tokens, so every row produces exactly `new` tokens.
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let prompts: Vec<Vec<i64>> = (0..batch).map(|b| (0..plen).map(|i| 3 + (b * 7 + i * 13) % (cfg.vocab_size - 3)).collect()).collect();
    let params = SamplingParams { temperature: 1.0, max_new_tokens: new, ..Default::default() };
    generate(policy.model(), &prompts, &params, 0, &mut rng).unwrap();
    sync();
    let t = Instant::now();
    for _ in 0..iters {
        let out = generate(policy.model(), &prompts, &params, 0, &mut rng).unwrap();
        assert!(out.iter().all(|c| c.tokens.len() == new as usize));
    }
    sync();
    let gen_tps = (batch * new) as f64 * iters as f64 / t.elapsed().as_secs_f64();

    // Training step.
    let seq = Tensor::randint_low(3, cfg.vocab_size, [batch, plen + new], (Kind::Int64, device));
    let input = seq.narrow(1, 0, plen + new - 1);
    let target = seq.narrow(1, 1, plen + new - 1);
    let mut opt = AdamW::new(
        policy.named_parameters(),
        AdamWConfig { lr: 1e-5, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 },
    );
    let mut step = || {
        let lp = TokenLogprobs::new(&policy, &input, &target, 1.0, checkpoint_layers);
        let loss = -lp.logp.mean(Kind::Float);
        lp.backward(&policy, &loss);
        opt.step(1.0);
    };
    step();
    sync();
    let t = Instant::now();
    for _ in 0..iters {
        step();
    }
    sync();
    let train_tps = (batch * (plen + new - 1)) as f64 * iters as f64 / t.elapsed().as_secs_f64();

    let python = std::env::var("SLUICE_PYTHON").unwrap_or_else(|_| "python3".into());
    // Where it was built, else relative to the working directory (a binary
    // carried to another machine runs from a copy of the repository).
    let built = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/hf_baseline.py");
    let script = if std::path::Path::new(built).exists() { built } else { "learner/benches/hf_baseline.py" };
    let out = Command::new(&python)
        .arg(script)
        .arg(dir.path())
        .args([batch.to_string(), plen.to_string(), new.to_string(), iters.to_string(), threads.to_string(), device_name.clone(), dtype.clone()])
        .env("HF_HUB_OFFLINE", "1")
        .env("TRANSFORMERS_VERBOSITY", "error")
        .output()
        .expect("run the PyTorch baseline");
    assert!(out.status.success(), "baseline failed: {}", String::from_utf8_lossy(&out.stderr));
    let base: serde_json::Value = serde_json::from_slice(out.stdout.trim_ascii()).expect("baseline prints JSON");
    // A baseline figure is null when PyTorch ran out of device memory.
    let b_gen = base["generation_tokens_per_s"].as_f64();
    let b_train = base["train_tokens_per_s"].as_f64();
    let row = |what: &str, ours: f64, theirs: Option<f64>| match theirs {
        Some(b) => println!("| {what} | {ours:.0} | {b:.0} | {:.2} |", ours / b),
        None => println!("| {what} | {ours:.0} | out of memory | - |"),
    };

    if args.iter().any(|a| a == "--json") {
        let report = serde_json::json!({
            "preset": preset, "params": cfg.num_params(), "vocab": vocab, "dtype": dtype,
            "device": device_name, "threads": threads, "batch": batch, "prompt_len": plen, "new": new,
            "iters": iters, "checkpoint_layers": checkpoint_layers,
            "sluice": {"generation_tokens_per_s": gen_tps, "train_tokens_per_s": train_tps},
            "baseline": {"generation_tokens_per_s": b_gen, "train_tokens_per_s": b_train},
        });
        println!("{report}");
        return;
    }
    println!(
        "preset {preset} ({} params, vocab {vocab}, {dtype}), device {device_name}, threads {threads}, batch {batch}, prompt {plen}, new {new}, iters {iters}, train path: chunked head{}",
        cfg.num_params(),
        if checkpoint_layers { " + layer checkpointing" } else { "" }
    );
    println!("| metric | sluice | PyTorch/transformers | ratio |");
    println!("|---|---|---|---|");
    row("generation tokens/s", gen_tps, b_gen);
    row("train tokens/s", train_tps, b_train);
}
