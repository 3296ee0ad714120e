//! End-to-end tests of the `sluice` binary: real processes, real files.

mod dashboard;
mod dev;
mod otel;
mod train;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn sluice() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sluice"))
}

/// Writes a job file for the tiny arithmetic task into `dir`; `extra` is appended to `[train]`.
pub fn job(dir: &Path, steps: u64, sft_steps: u64, extra: &str) -> PathBuf {
    let text = format!(
        r#"[model]
preset = "tiny"
device = "cpu"

[task]
kind = "arithmetic"
digits = 1
operators = ["+"]

[sampling]
temperature = 1.0
max_new_tokens = 4

[grpo]
group_size = 8
clip_high = 0.28

[train]
steps = {steps}
prompts_per_step = 16
lr = 1e-3
sft_steps = {sft_steps}
sft_batch_size = 32
sft_lr = 3e-3
eval_prompts = 128
out_dir = "{out}"
{extra}
"#,
        out = dir.join("run").display()
    );
    let path = dir.join("job.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// The JSON events a `sluice train --json` run printed.
pub fn events(out: &Output) -> Vec<serde_json::Value> {
    assert!(out.status.success(), "sluice failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).expect("one JSON event per line")).collect()
}
