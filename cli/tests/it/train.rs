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
    let all = events(&out);
    // Each evaluation shows its first three held-out prompts with their greedy
    // completions and rewards.
    for e in all.iter().filter(|e| e["event"] == "eval") {
        let samples = e["samples"].as_array().unwrap();
        assert_eq!(samples.len(), 3, "{e}");
        for s in samples {
            let (prompt, reward) = (s["prompt"].as_str().unwrap(), s["reward"].as_f64().unwrap());
            assert!(prompt.ends_with('=') && s["completion"].is_string() && (reward == 0.0 || reward == 1.0), "{s}");
        }
    }
    let ev = evals(&all);
    eprintln!("evaluations (sft_step, step, reward): {ev:?}");
    let after_sft = ev.iter().find(|e| e.0 == 40 && e.1 == 0).expect("eval after warm-up").2;
    let last = ev.last().unwrap();
    assert_eq!((last.0, last.1), (40, 300));
    assert_eq!(ev.len(), 8, "before and after the warm-up, then every 50 steps");
    // The whole second half of the run, not just its last point, is well above
    // the warm-up, and the run does not fall back at the end.
    let late: Vec<f64> = ev.iter().filter(|e| e.1 >= 150).map(|e| e.2).collect();
    let late_mean = late.iter().sum::<f64>() / late.len() as f64;
    let peak = ev.iter().map(|e| e.2).fold(0.0, f64::max);
    assert!(late_mean - after_sft >= 0.25, "mean held-out reward from step 150 on is {late_mean:.3} (after warm-up {after_sft:.3})");
    assert!(late.iter().all(|&r| r - after_sft >= 0.15), "a late evaluation fell back: {ev:?}");
    // One evaluation of 128 prompts has a standard error of ~0.045 near 0.4,
    // so the last point alone is held to less than the late mean.
    assert!(last.2 - after_sft >= 0.3, "GRPO moved held-out reward from {after_sft:.3} to {:.3}", last.2);
    assert!(last.2 >= peak - 0.2, "the run collapsed from its peak {peak:.3} to {:.3}", last.2);
}

/// `train.activation_checkpointing` (decoder layers recomputed in backward)
/// trains the same steps: losses, gradient norms and rewards agree with the
/// plain run to float tolerance.
#[test]
fn activation_checkpointing_trains_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let jb = job(dir.path(), 3, 2, "");
    let run = |on: bool| -> Vec<serde_json::Value> {
        let o = sluice()
            .args(["train", "--json", "--fresh", "--set", &format!("train.activation_checkpointing={on}"), "--out"])
            .arg(dir.path().join(format!("run-{on}")))
            .arg(&jb)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        events(&o).into_iter().filter(|e| e["event"] == "step" || e["event"] == "sft").collect()
    };
    let (plain, ckpt) = (run(false), run(true));
    assert_eq!(plain.len(), 5, "2 warm-up and 3 GRPO steps");
    assert_eq!(plain.len(), ckpt.len());
    for (a, b) in plain.iter().zip(&ckpt) {
        for key in ["loss", "grad_norm", "pg_loss", "reward_mean"] {
            let (Some(x), Some(y)) = (a[key].as_f64(), b[key].as_f64()) else { continue };
            assert!((x - y).abs() <= 1e-4 * x.abs().max(1.0), "{key}: {x} vs {y}\n{a}\n{b}");
        }
    }
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

/// `kill -9` inside a checkpoint write never leaves a torn checkpoint: `latest`
/// always names a complete one, and the run resumes from it and ends bit for
/// bit where an uninterrupted run ends. The test watches for this process's
/// temporary checkpoint directory and kills the moment it appears, until kills
/// have landed inside a save (the temporary is still there afterwards).
#[test]
fn killed_inside_a_checkpoint_write_resumes_exactly() {
    const STEPS: u64 = 30;
    let extra = "checkpoint_every = 1\nkeep_checkpoints = 2";
    let reference = tempfile::tempdir().unwrap();
    events(&sluice().args(["train", "--json"]).arg(job(reference.path(), STEPS, 0, extra)).output().unwrap());

    let dir = tempfile::tempdir().unwrap();
    let jb = job(dir.path(), STEPS, 0, extra);
    let ck = dir.path().join("run/checkpoints");
    let temporaries = |pid: u32| -> Vec<std::path::PathBuf> {
        let suffix = format!("-{pid}");
        std::fs::read_dir(&ck)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.path())
                    .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(".tmp-"))
                    .filter(|p| p.file_name().unwrap().to_string_lossy().ends_with(&suffix))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut landed = 0;
    for attempt in 0.. {
        assert!(attempt < 25, "no kill landed inside a checkpoint write in 25 tries");
        let mut child = sluice().args(["train", "--json"]).arg(&jb).stdout(std::process::Stdio::null()).spawn().unwrap();
        let pid = child.id();
        // Each run's first save completes (so the run advances); the kill
        // aims at its second.
        let mut seen: Vec<std::path::PathBuf> = Vec::new();
        loop {
            for t in temporaries(pid) {
                if !seen.contains(&t) {
                    seen.push(t);
                }
            }
            if seen.len() >= 2 {
                child.kill().unwrap(); // SIGKILL
                break;
            }
            assert!(child.try_wait().unwrap().is_none(), "the run finished before a kill landed");
            std::thread::sleep(Duration::from_micros(200));
        }
        child.wait().unwrap();
        if !temporaries(pid).is_empty() {
            landed += 1;
        }
        // Whatever the kill interrupted, `latest` names a complete checkpoint.
        if let Ok(name) = std::fs::read_to_string(ck.join("latest")) {
            let d = ck.join(name.trim());
            for f in ["config.json", "model.safetensors", "tokenizer.json", "optimizer.safetensors", "trainer_state.json"] {
                assert!(d.join(f).exists(), "{} lacks {f}", d.display());
            }
        }
        if landed == 2 {
            break;
        }
    }
    assert!(ck.join("latest").exists(), "at least one checkpoint completed between the kills");
    let ev = events(&sluice().args(["train", "--json"]).arg(&jb).output().unwrap());
    let last = ev.iter().rev().find(|e| e["event"] == "step").map(|e| e["step"].as_u64().unwrap());
    assert_eq!(last, Some(STEPS));
    for name in ["model.safetensors", "optimizer.safetensors", "trainer_state.json"] {
        assert!(file(reference.path(), "run", name) == file(dir.path(), "run", name), "{name} differs from the uninterrupted run");
    }
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

/// Ctrl-C (SIGINT) — and SIGTERM, what Kubernetes and `sluice dev` send — lets
/// the step in progress finish, writes a checkpoint of exactly that step, exits
/// 130; running again continues at the next step.
#[test]
fn ctrl_c_finishes_the_step_checkpoints_and_exits_130() {
    interrupted_run_checkpoints("INT");
}

#[test]
fn sigterm_is_handled_like_ctrl_c() {
    interrupted_run_checkpoints("TERM");
}

fn interrupted_run_checkpoints(signal: &str) {
    let dir = tempfile::tempdir().unwrap();
    let jb = job(dir.path(), 1000, 0, "checkpoint_every = 0");
    let mut cmd = sluice_testkit::Proc::command(env!("CARGO_BIN_EXE_sluice"));
    cmd.args(["train", "--json"]).arg(&jb);
    let mut p = sluice_testkit::Proc::spawn("sluice train", cmd);
    p.wait_line("step 2", Duration::from_secs(120), |v| v["event"] == "step" && v["step"].as_u64() >= Some(2));
    p.signal(signal);
    assert_eq!(p.wait_exit(Duration::from_secs(120)), 130, "an interrupted run exits 130 (SIG{signal})");
    let lines = p.lines();
    let last = lines.iter().filter(|v| v["event"] == "step").map(|v| v["step"].as_u64().unwrap()).max().unwrap();
    assert!(last < 1000, "stopped early");
    let ck = lines.iter().rev().find(|v| v["event"] == "checkpoint").expect("a checkpoint on the way out");
    assert_eq!(ck["step"].as_u64(), Some(last), "the checkpoint holds the last finished step");
    let state: serde_json::Value = serde_json::from_slice(&file(dir.path(), "run", "trainer_state.json")).unwrap();
    assert_eq!(state["step"].as_u64(), Some(last));
    let more = (last + 2).to_string();
    let ev = events(&sluice().args(["train", "--json", "--steps", &more]).arg(&jb).output().unwrap());
    let steps: Vec<u64> = ev.iter().filter(|e| e["event"] == "step").map(|e| e["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, vec![last + 1, last + 2], "the next run continues after the interrupted one");
}

/// Every job file in examples/ is valid as shipped.
#[test]
fn every_example_job_file_checks() {
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut n = 0;
    for entry in std::fs::read_dir(&examples).unwrap() {
        let path = entry.unwrap().path();
        // gsm8k.toml needs a model directory and data: `gsm8k_example_checks_and_trains` gives it both.
        if path.extension().is_some_and(|e| e == "toml") && !path.ends_with("gsm8k.toml") {
            let o = sluice().arg("check").arg(&path).output().unwrap();
            assert!(o.status.success(), "{}: {}", path.display(), String::from_utf8_lossy(&o.stderr));
            assert!(String::from_utf8_lossy(&o.stdout).contains("[model]"), "{}", path.display());
            n += 1;
        }
    }
    assert!(n >= 3, "only {n} examples found in {}", examples.display());
}

/// `sluice init-model` writes the same directory for the same seed, another for
/// another seed; `transformers` loads it with no missing or unexpected tensor,
/// and a job trains from it.
#[test]
fn init_model_writes_a_deterministic_loadable_directory() {
    let dir = tempfile::tempdir().unwrap();
    let init = |name: &str, seed: &str| {
        let out = dir.path().join(name);
        let o = sluice().args(["init-model", "--preset", "tiny", "--seed", seed, "--out"]).arg(&out).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        for f in ["config.json", "model.safetensors", "tokenizer.json"] {
            assert!(out.join(f).exists(), "{f} missing");
        }
        std::fs::read(out.join("model.safetensors")).unwrap()
    };
    let (a, b, c) = (init("a", "3"), init("b", "3"), init("c", "4"));
    assert!(a == b, "the same seed gives the same weights");
    assert!(a != c, "another seed gives other weights");

    let python = sluice_testkit::python();
    let script = "import sys\nfrom transformers import AutoModelForCausalLM\n\
        m, info = AutoModelForCausalLM.from_pretrained(sys.argv[1], output_loading_info=True)\n\
        bad = {k: v for k, v in info.items() if v}\nassert not bad, bad\nprint(sum(p.numel() for p in m.parameters()))\n";
    let o = std::process::Command::new(&python).args(["-c", script]).arg(dir.path().join("a")).output().unwrap();
    assert!(o.status.success(), "transformers could not load it: {}", String::from_utf8_lossy(&o.stderr));

    let jb = job(dir.path(), 1, 0, "");
    let text = std::fs::read_to_string(&jb).unwrap().replace("preset = \"tiny\"", &format!("path = \"{}\"", dir.path().join("a").display()));
    std::fs::write(&jb, text).unwrap();
    let ev = events(&sluice().args(["train", "--json"]).arg(&jb).output().unwrap());
    assert!(ev.iter().any(|e| e["event"] == "step" && e["step"] == 1), "a job trains from the directory");
}

/// `--set section.key=value` changes one option of the job file: `check` shows
/// it, `train` runs with it, and a wrong key or value names the field and the
/// override (exit 2).
#[test]
fn set_overrides_options_and_names_bad_fields() {
    let dir = tempfile::tempdir().unwrap();
    let jb = job(dir.path(), 5, 0, "");
    let o = sluice().args(["check", "--set", "train.lr=1e-5", "--set", "train.steps=2"]).arg(&jb).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("# --set train.lr=1e-5") && out.contains("lr = 0.00001") && out.contains("steps = 2"), "{out}");
    let ev = events(&sluice().args(["train", "--json", "--set", "train.steps=2"]).arg(&jb).output().unwrap());
    assert_eq!(ev.iter().filter(|e| e["event"] == "step").count(), 2, "train ran the overridden step count");
    for (set, field) in [("train.nope=1", "train.nope"), ("train.lr=fast", "train.lr"), ("train", "section.key=value")] {
        let o = sluice().args(["check", "--set", set]).arg(&jb).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{set}: {err}");
        assert!(err.contains(field) && err.contains(set) && err.lines().count() == 1, "{set}: {err}");
    }
}

/// `examples/gsm8k.toml` as shipped, on GSM8K-format shards written here and a
/// random-init Qwen3-layout policy with Qwen3's real tokenizer: `check` finds the
/// rows and renders the first prompt with the chat template; `train` runs GRPO
/// steps and its checkpoint keeps the template and every end id.
#[test]
fn gsm8k_example_checks_and_trains() {
    let dir = tempfile::tempdir().unwrap();
    let qwen3 = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/tokenizers/qwen3");
    let model = dir.path().join("tiny-qwen3");
    let o = sluice()
        .args(["init-model", "--preset", "tiny", "--arch", "qwen3", "--tokenizer"])
        .arg(&qwen3)
        .arg("--out")
        .arg(&model)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Writing again into it is refused.
    let o = sluice().args(["init-model", "--out"]).arg(&model).output().unwrap();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("--force"));
    let data = dir.path().join("gsm8k/main");
    std::fs::create_dir_all(&data).unwrap();
    let rows = |lo: u32, hi: u32| -> String {
        (lo..hi)
            .map(|i| {
                serde_json::json!({"question": format!("Tom has {i} apples and buys {i} more. How many now?"),
                    "answer": format!("{i} + {i} = <<{i}+{i}={}>>{}\n#### {}", 2 * i, 2 * i, 2 * i)})
                .to_string()
                    + "\n"
            })
            .collect()
    };
    std::fs::write(data.join("train-00000-of-00001.jsonl"), rows(0, 40)).unwrap();
    std::fs::write(data.join("test-00000-of-00001.jsonl"), rows(100, 110)).unwrap();
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/gsm8k.toml");
    let sets = [format!("model.path={}", model.display()), format!("task.path={}", data.display())];
    let mut check = sluice();
    check.args(["check", "--json"]);
    for s in &sets {
        check.args(["--set", s]);
    }
    let o = check.arg(&example).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let opens = &r["opens"];
    assert_eq!((opens["data"]["train_rows"].as_u64(), opens["data"]["eval_rows"].as_u64()), (Some(40), Some(10)));
    assert_eq!(opens["model"]["architecture"], "qwen3");
    assert_eq!(opens["prompt_format"], "chat");
    let text = opens["first_prompt"]["text"].as_str().unwrap();
    assert!(text.starts_with("<|im_start|>system\nSolve the problem step by step."), "{text}");
    assert!(text.contains("<|im_start|>user\nTom has"), "{text}");
    assert!(text.ends_with("<|im_start|>assistant\n<think>\n\n</think>\n\n"), "enable_thinking = false: {text}");
    assert!(opens["model"]["stop_ids"].as_array().unwrap().contains(&serde_json::json!(151_645)), "<|im_end|> stops");

    let out = dir.path().join("run");
    let mut train = sluice();
    train.args(["train", "--json", "--steps", "2", "--out"]).arg(&out);
    for s in sets.iter().map(String::as_str).chain([
        "model.dtype=f32",
        "model.device=cpu",
        "train.prompts_per_step=2",
        "grpo.group_size=2",
        "sampling.max_new_tokens=6",
        "train.eval_every=0",
        "train.warmup_steps=1",
    ]) {
        train.args(["--set", s]);
    }
    let o = train.arg(&example).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let steps: Vec<serde_json::Value> = events(&o).into_iter().filter(|e| e["event"] == "step").collect();
    assert_eq!(steps.len(), 2, "{}", String::from_utf8_lossy(&o.stdout));
    let ckpt = std::fs::read_dir(out.join("checkpoints")).unwrap().map(|e| e.unwrap().path()).find(|p| p.is_dir()).unwrap();
    let tc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(ckpt.join("tokenizer_config.json")).unwrap()).unwrap();
    assert!(tc["chat_template"].as_str().unwrap().contains("enable_thinking"), "the chat template is kept");
    let gc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(ckpt.join("generation_config.json")).unwrap()).unwrap();
    // One id is written as a number, several as a list (both as transformers writes them).
    assert_eq!(gc["eos_token_id"], serde_json::json!(151_645), "{gc}");

    // `sluice eval` on that checkpoint: held-out rows, prompts rendered as in training.
    let mut eval = sluice();
    eval.args(["eval", "--json", "--problems", "3", "--samples", "4", "--checkpoint"]).arg(&ckpt);
    for s in sets.iter().map(String::as_str).chain(["model.dtype=f32", "model.device=cpu", "sampling.max_new_tokens=4"]) {
        eval.args(["--set", s]);
    }
    let o = eval.arg(&example).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!((r["problems"].as_u64(), r["model"].as_str()), (Some(3), Some(ckpt.to_str().unwrap())));
    let shown = r["first_prompt"].as_str().unwrap();
    let n: u32 = shown.split("Tom has ").nth(1).and_then(|t| t.split(' ').next()).and_then(|t| t.parse().ok()).unwrap();
    assert!((100..110).contains(&n), "a held-out (test shard) row: {shown}");
    let p: Vec<f64> = ["pass@1", "pass@2", "pass@4"].iter().map(|k| r["pass_at_k"][k].as_f64().unwrap()).collect();
    assert!(p.windows(2).all(|w| w[0] <= w[1] + 1e-12) && p.iter().all(|x| (0.0..=1.0).contains(x)), "{r}");

    // `sluice generate` on that checkpoint: a prompt file with a plain line and
    // a conversation, a system turn, seeded sampling.
    let prompts = dir.path().join("prompts.txt");
    std::fs::write(
        &prompts,
        "What is 3 + 4?\n\n{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}, {\"role\": \"assistant\", \"content\": \"Hello\"}, {\"role\": \"user\", \"content\": \"Add 1 and 2\"}]}\n",
    )
    .unwrap();
    let generate = || {
        let o = sluice()
            .args(["generate", "--json", "--max-new-tokens", "5", "--temperature", "1", "--seed", "7", "--system", "Be brief."])
            .arg("--prompt-file")
            .arg(&prompts)
            .arg(&ckpt)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    };
    let first = generate();
    let lines: Vec<serde_json::Value> = first.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2, "{first}");
    let p0 = lines[0]["prompt"].as_str().unwrap();
    assert!(p0.starts_with("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 3 + 4?<|im_end|>"), "{p0}");
    let p1 = lines[1]["prompt"].as_str().unwrap();
    assert!(p1.contains("<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>user\nAdd 1 and 2<|im_end|>"), "{p1}");
    assert!(p1.ends_with("<|im_start|>assistant\n"), "the assistant's turn is opened: {p1}");
    for l in &lines {
        assert!(l["tokens"].as_u64().unwrap() <= 5 && ["stop", "length"].contains(&l["finish"].as_str().unwrap()), "{l}");
    }
    assert_eq!(generate(), first, "the same seed samples the same completions");
    // A malformed prompt line names the file and line, before any model loads.
    std::fs::write(&prompts, "fine\n{\"text\": 1}\n").unwrap();
    let o = sluice().arg("generate").arg("--prompt-file").arg(&prompts).arg(&ckpt).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("prompts.txt:2") && err.contains("messages"), "{err}");
}
