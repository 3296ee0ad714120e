//! Peak memory of the learner's log-prob + backward on a real vocabulary: the
//! whole `[B, T, V]` at once (the baseline, as before), the chunked head that
//! recomputes its logits in backward (`engine::TokenLogprobs`), and the chunked
//! head with activation checkpointing per decoder layer, each in its own
//! process so each peak (VmHWM) is its own. Prints each, with the ratios to
//! the baseline.
//!
//! usage: cargo bench -p sluice-learner --bench head_memory -- [--vocab 151936]
//!        [--hidden 896] [--layers 4] [--batch 4] [--len 1024]
//! Defaults: Qwen2.5-0.5B's hidden size, heads and vocabulary (fp32, untied
//! head), with 4 of its 24 layers so a CPU run takes about a minute.

use std::process::Command;
use std::time::Instant;

use sluice_learner::engine::TokenLogprobs;
use sluice_model::hf::Policy;
use sluice_model::model::{token_logprobs, ModelConfig};
use tch::{Device, Kind, Tensor};

fn arg(args: &[String], name: &str, default: &str) -> String {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned().unwrap_or_else(|| default.to_string())
}

/// Peak resident set of this process (kB), from /proc.
fn peak_kb() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("VmHWM:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok()).unwrap_or(0)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let get = |k: &str, d: &str| -> i64 { arg(&args, k, d).parse().unwrap() };
    let (vocab, hidden, layers, batch, len) =
        (get("--vocab", "151936"), get("--hidden", "896"), get("--layers", "4"), get("--batch", "4"), get("--len", "1024"));
    tch::set_num_threads(std::thread::available_parallelism().map_or(1, |n| n.get() as i32));
    if let Some(mode) = args.iter().position(|a| a == "--mode").map(|i| args[i + 1].clone()) {
        let mut cfg = ModelConfig::preset("qwen2-0.5b", vocab).unwrap();
        (cfg.hidden_size, cfg.num_hidden_layers, cfg.tie_word_embeddings) = (hidden, layers, false);
        cfg.head_dim = hidden / cfg.num_attention_heads;
        let policy = Policy::random(&cfg, Device::Cpu, Kind::Float, 0);
        let ids = Tensor::randint(vocab, [batch, len], (Kind::Int64, Device::Cpu));
        let target = ids.roll([-1], [1]);
        let before = peak_kb();
        let t0 = Instant::now();
        if mode == "plain" {
            let lp = token_logprobs(&policy.model().forward(&ids), &target, 1.0);
            lp.mean(Kind::Float).backward();
        } else {
            let lp = TokenLogprobs::new(&policy, &ids, &target, 1.0, mode == "checkpointed");
            let loss = lp.logp.mean(Kind::Float);
            lp.backward(&policy, &loss);
        }
        println!("{mode} {} {} {:.3}", before, peak_kb(), t0.elapsed().as_secs_f64());
        return;
    }
    let me = std::env::current_exe().unwrap();
    let run = |mode: &str| -> (f64, f64, f64) {
        let out = Command::new(&me).args(&args[1..]).args(["--mode", mode]).output().unwrap();
        assert!(out.status.success(), "{mode}: {}", String::from_utf8_lossy(&out.stderr));
        let line = String::from_utf8_lossy(&out.stdout);
        let f: Vec<f64> = line.split_whitespace().skip(1).map(|x| x.parse().unwrap()).collect();
        (f[0] / 1048576.0, f[1] / 1048576.0, f[2])
    };
    println!("head memory: vocab {vocab}, hidden {hidden}, {layers} layers, batch {batch} x {len} tokens, fp32, CPU");
    let (pb, pp, pt) = run("plain");
    println!("plain        (whole [B,T,V]):            peak {pp:.2} GiB (after building the model: {pb:.2} GiB), step {pt:.2} s");
    for (mode, label) in [("chunked", "chunked      (recompute head):         "), ("checkpointed", "checkpointed (+ recompute each layer): ")] {
        let (b, p, t) = run(mode);
        println!("{label} peak {p:.2} GiB (after building the model: {b:.2} GiB), step {t:.2} s");
        println!(
            "  ratio {mode}/plain: peak {:.2}x, step memory above the model {:.2}x, time {:.2}x",
            p / pp,
            (p - b) / (pp - pb).max(1e-9),
            t / pt
        );
    }
}
