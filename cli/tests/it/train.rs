use std::time::Duration;

use crate::{events, job, sluice};

fn evals(ev: &[serde_json::Value]) -> Vec<(u64, u64, f64)> {
    ev.iter()
        .filter(|e| e["event"] == "eval")
        .map(|e| (e["sft_step"].as_u64().unwrap(), e["step"].as_u64().unwrap(), e["reward_mean"].as_f64().unwrap()))
        .collect()
}

/// A random-init policy learns single-digit addition: a short supervised warm-up
/// leaves it mostly wrong, GRPO then raises held-out greedy accuracy by >= 0.3.
#[test]
fn grpo_raises_held_out_reward() {
    let dir = tempfile::tempdir().unwrap();
    let out = sluice().args(["train", "--json"]).arg(job(dir.path(), 300, 40, "eval_every = 50")).output().unwrap();
    let ev = evals(&events(&out));
    eprintln!("evaluations (sft_step, step, reward): {ev:?}");
    let after_sft = ev.iter().find(|e| e.0 == 40 && e.1 == 0).expect("eval after warm-up").2;
    let last = ev.last().unwrap();
    assert_eq!((last.0, last.1), (40, 300));
    assert!(last.2 - after_sft >= 0.3, "GRPO moved held-out reward from {after_sft:.3} to {:.3}", last.2);
}

fn file(dir: &std::path::Path, run: &str, name: &str) -> Vec<u8> {
    let ck = dir.join(run).join("checkpoints");
    let latest = std::fs::read_to_string(ck.join("latest")).unwrap();
    std::fs::read(ck.join(latest.trim()).join(name)).unwrap()
}

/// The job of `job`, with a 16-prompt training set and knapsack budgets.
fn knapsack_job(dir: &std::path::Path, steps: u64, sft_steps: u64) -> std::path::PathBuf {
    let path = job(dir, steps, sft_steps, "");
    let text = std::fs::read_to_string(&path).unwrap().replace("kind = \"arithmetic\"", "kind = \"arithmetic\"\ntrain_size = 16");
    std::fs::write(&path, format!("{text}\n[budget]\nstrategy = \"knapsack\"\nmin_outcomes = 4\nn_up = 32\n")).unwrap();
    path
}

/// Stopping after 3 steps and resuming to 6 ends bit-identical to 6 steps in one
/// go — with uniform budgets, and with knapsack budgets (whose per-prompt history
/// must come back from the checkpoint for the allocations to match).
#[test]
fn resume_is_exact() {
    for knapsack in [false, true] {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let make = |dir: &std::path::Path| if knapsack { knapsack_job(dir, 6, 4) } else { job(dir, 6, 4, "") };
        let full = events(&sluice().args(["train", "--json"]).arg(make(a.path())).output().unwrap());
        let jb = make(b.path());
        events(&sluice().args(["train", "--json", "--steps", "3"]).arg(&jb).output().unwrap());
        let resumed = events(&sluice().args(["train", "--json"]).arg(&jb).output().unwrap());
        let steps: Vec<u64> = resumed.iter().filter(|e| e["event"] == "step").map(|e| e["step"].as_u64().unwrap()).collect();
        assert_eq!(steps, vec![4, 5, 6], "the resumed run continues where the first stopped");
        for name in ["model.safetensors", "optimizer.safetensors", "trainer_state.json", "budget_history.json"] {
            assert!(file(a.path(), "run", name) == file(b.path(), "run", name), "{name} differs after resume (knapsack {knapsack})");
        }
        if knapsack {
            let sampled: Vec<u64> = full.iter().filter(|e| e["event"] == "step").map(|e| e["rollouts_sampled"].as_u64().unwrap()).collect();
            assert_eq!(sampled, vec![128; 6], "knapsack keeps the total");
        }
    }
    // --fresh refuses to clobber an existing run.
    let b = tempfile::tempdir().unwrap();
    let jb = job(b.path(), 1, 0, "");
    events(&sluice().args(["train", "--json"]).arg(&jb).output().unwrap());
    let o = sluice().args(["train", "--fresh"]).arg(&jb).output().unwrap();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("already has checkpoints"));
}

/// `kill -9` at arbitrary moments never leaves a torn checkpoint: `latest` always
/// names a complete one, and the run resumes from it to the end.
#[test]
fn killed_mid_checkpoint_resumes_from_last_good_one() {
    let dir = tempfile::tempdir().unwrap();
    let jb = job(dir.path(), 40, 0, "checkpoint_every = 1\nkeep_checkpoints = 2");
    for delay_ms in [900u64, 1300, 1700] {
        let mut child = sluice().args(["train", "--json"]).arg(&jb).stdout(std::process::Stdio::null()).spawn().unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let ck = dir.path().join("run/checkpoints");
        if let Ok(name) = std::fs::read_to_string(ck.join("latest")) {
            let d = ck.join(name.trim());
            for f in ["config.json", "model.safetensors", "tokenizer.json", "optimizer.safetensors", "trainer_state.json"] {
                assert!(d.join(f).exists(), "{} lacks {f}", d.display());
            }
        }
    }
    let ev = events(&sluice().args(["train", "--json"]).arg(&jb).output().unwrap());
    let last = ev.iter().rev().find(|e| e["event"] == "step").map(|e| e["step"].as_u64().unwrap());
    assert_eq!(last, Some(40));
    let ck = dir.path().join("run/checkpoints");
    let left: Vec<String> = std::fs::read_dir(&ck).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(left.iter().all(|n| !n.starts_with(".tmp-")), "stale temporaries left: {left:?}");
    assert_eq!(left.iter().filter(|n| n.starts_with("step-")).count(), 2, "keep_checkpoints = 2: {left:?}");
}

#[test]
fn bad_job_files_name_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = job(dir.path(), 1, 0, "learning_rate = 0.1");
    let o = sluice().arg("check").arg(&path).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("train") && err.contains("learning_rate"), "{err}");
    let o = sluice().arg("check").arg(job(dir.path(), 1, 0, "")).output().unwrap();
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("clip_low = 0.2"), "defaults are printed");
}
