//! Peak memory of one BGPO update against the number of Monte Carlo samples n,
//! next to the exact-ratio objective (DESIGN.md, "BGPO"; the claim: BGPO's peak
//! stays flat in n, the exact objective's grows).
//!
//! Each (method, n) runs in a fresh child process (glibc told to return freed
//! blocks over 128 KiB to the OS, so RSS follows live memory): build a
//! `small-diffusion` policy, draw the samples, compute l_j(θ_old) (no graph),
//! give every parameter its gradient buffer (as after a first step), then reset
//! the kernel's peak-RSS mark (`/proc/self/clear_refs` ← 5) and run one update's
//! backward passes. Reported: peak RSS during the update minus RSS just
//! before it (CPU), and with a CUDA device the allocator's peak (not measured
//! here: no GPU on the machine that produced docs/BENCHMARKS.md).
//!
//! `cargo bench -p sluice-learner --bench bgpo_memory -- [--ns 1,4,16,32] [--batch 8] [--prompt 32] [--response 128]`

use std::process::Command;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sluice_model::model::{Model, ModelConfig};
use sluice_learner::algo::bgpo::{bgpo_backward, draw, exact_backward, old_elbos, Sequence};
use tch::{nn, Device};

fn flag(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).map(|i| args[i + 1].clone())
}

fn num(name: &str, default: usize) -> usize {
    flag(name).map_or(default, |v| v.parse().expect("a number"))
}

/// (VmRSS, VmHWM) in KiB.
fn rss() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let get = |k: &str| {
        s.lines().find(|l| l.starts_with(k)).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok()).unwrap_or(0)
    };
    (get("VmRSS:"), get("VmHWM:"))
}

fn child(method: &str, n: usize) {
    let (batch, prompt, response) = (num("--batch", 8), num("--prompt", 32), num("--response", 128));
    let vs = nn::VarStore::new(Device::Cpu);
    let mut c = ModelConfig::preset("small-diffusion", 100).unwrap();
    c.pad_token_id = Some(0);
    let m = Model::new(&vs.root(), &c);
    sluice_model::model::init_parameters(&vs, 0);
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let seqs: Vec<Sequence> = (0..batch)
        .map(|i| Sequence {
            prompt: (0..prompt).map(|_| rng.gen_range(3..100)).collect(),
            response: (0..response).map(|_| rng.gen_range(3..100)).collect(),
            advantage: if i % 2 == 0 { 1.0 } else { -1.0 },
            weight: 1.0 / batch as f64,
        })
        .collect();
    let samples = draw(&seqs, n, &mut rng);
    let old = old_elbos(&m, &seqs, &samples, 0).unwrap();
    // Steady state of a training loop: every parameter already has a gradient
    // buffer (from the previous step), so accumulation is measured, not first use.
    let params: Vec<tch::Tensor> = vs.trainable_variables();
    params.iter().map(|p| p.sum(tch::Kind::Float) * 0.0).fold(tch::Tensor::from(0.0f32), |a, b| a + b).backward();
    std::fs::write("/proc/self/clear_refs", "5").expect("resetting the peak RSS mark needs Linux >= 4.0");
    let (before, _) = rss();
    let t0 = std::time::Instant::now();
    let report = match method {
        "bgpo" => bgpo_backward(&m, &seqs, &samples, &old, 0).unwrap(),
        _ => exact_backward(&m, &seqs, &samples, &old, 0).unwrap(),
    };
    let (_, peak) = rss();
    println!(
        "{}",
        serde_json::json!({"method": method, "n": n, "peak_mib": (peak.saturating_sub(before)) as f64 / 1024.0,
                           "seconds": t0.elapsed().as_secs_f64(), "objective": report.objective})
    );
}

fn main() {
    if let Some(method) = flag("--child") {
        child(&method, num("--n", 1));
        return;
    }
    let ns: Vec<usize> = flag("--ns").unwrap_or_else(|| "1,4,16,32".into()).split(',').map(|v| v.parse().unwrap()).collect();
    let exe = std::env::current_exe().unwrap();
    let extra: Vec<String> = ["--batch", "--prompt", "--response"]
        .iter()
        .filter_map(|k| flag(k).map(|v| vec![k.to_string(), v]))
        .flatten()
        .collect();
    println!("| n | BGPO peak MiB | exact-ratio peak MiB | BGPO s | exact s |");
    println!("|---|---|---|---|---|");
    let mut first = None;
    let mut rows = Vec::new();
    for &n in &ns {
        let mut row = Vec::new();
        for method in ["bgpo", "exact"] {
            // Freed graph memory goes back to the OS at once (mmap for blocks over
            // 128 KiB), so RSS tracks live tensors rather than glibc's free lists;
            // the same for both methods.
            let out = Command::new(&exe)
                .args(["--child", method, "--n", &n.to_string()])
                .args(&extra)
                .env("MALLOC_MMAP_THRESHOLD_", "131072")
                .output()
                .unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            row.push(v);
        }
        println!(
            "| {n} | {:.1} | {:.1} | {:.2} | {:.2} |",
            row[0]["peak_mib"].as_f64().unwrap(),
            row[1]["peak_mib"].as_f64().unwrap(),
            row[0]["seconds"].as_f64().unwrap(),
            row[1]["seconds"].as_f64().unwrap()
        );
        first.get_or_insert((row[0]["peak_mib"].as_f64().unwrap(), row[1]["peak_mib"].as_f64().unwrap()));
        rows.push((n, row[0]["peak_mib"].as_f64().unwrap(), row[1]["peak_mib"].as_f64().unwrap()));
    }
    let (b1, e1) = first.unwrap();
    let (n_last, b_last, e_last) = *rows.last().unwrap();
    println!(
        "\npeak at n={n_last} / peak at n={}: BGPO {:.2}x, exact-ratio {:.2}x; exact / BGPO at n={n_last}: {:.2}x",
        ns[0],
        b_last / b1,
        e_last / e1,
        e_last / b_last
    );
}
