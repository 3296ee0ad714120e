//! Training checkpoints: written whole or not at all.
//!
//! Layout under `<out_dir>/checkpoints/`:
//!
//! ```text
//! step-00000040/            one complete checkpoint, numbered by sft_step + step
//!   config.json             Hugging Face model config  } loadable by transformers
//!   model.safetensors       policy weights             } and by `Policy::load`
//!   tokenizer.json
//!   optimizer.safetensors   AdamW moments (m.*, v.*, master.*)
//!   budget_history.json     per-prompt outcomes (knapsack budgets)
//!   work_ids.json           orchestrator work items trained on (ranges)
//!   multipliers.json        Lagrange multipliers of reward constraints
//!   reward_weights.json     reward component weights (they move with reward.dynamic)
//!   trainer_state.json      step counters, data cursor, seed, optimizer t
//! latest                    name of the newest complete checkpoint
//! ```
//!
//! A checkpoint is first written to `.tmp-step-...-<pid>`, every file is fsynced,
//! then the directory is renamed into place and `latest` is replaced by an
//! atomic rename. A crash at any point leaves `latest` naming the previous
//! complete checkpoint; stale temporary directories are removed on the next save.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sluice_core::budget::History;
use sluice_model::hf::Policy;
use sluice_core::tokenizer::Tokenizer;
use tch::Tensor;

use crate::error::{Error, Result};
use crate::ingest::WorkIds;
use crate::optim::AdamW;

/// Counters that, with the weights and optimizer state, determine the rest of the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrainerState {
    /// GRPO steps completed.
    pub step: u64,
    /// Supervised warm-up steps completed.
    pub sft_step: u64,
    /// Next index into the task's training split.
    pub cursor: u64,
    /// Seed of sampling; per-step RNG streams derive from (seed, phase, step).
    pub seed: u64,
    /// Completed optimizer updates (AdamW t); also the policy version.
    pub optimizer_t: i64,
}

/// Per-prompt outcomes for knapsack budgets, in each checkpoint.
const HISTORY: &str = "budget_history.json";
/// The orchestrator work items trained on, in each checkpoint.
const WORK_IDS: &str = "work_ids.json";
/// Lagrange multipliers of the job's reward constraints, in each checkpoint.
const MULTIPLIERS: &str = "multipliers.json";
/// Reward component weights, in each checkpoint.
const REWARD_WEIGHTS: &str = "reward_weights.json";

/// What a run has recorded besides counters and tensors.
#[derive(Debug, Clone, Copy)]
pub struct Records<'a> {
    pub history: &'a History,
    pub work_ids: &'a WorkIds,
    pub multipliers: &'a std::collections::BTreeMap<String, f64>,
    pub reward_weights: &'a std::collections::BTreeMap<String, f64>,
}

pub fn checkpoints_dir(out_dir: &Path) -> PathBuf {
    out_dir.join("checkpoints")
}

fn io<T>(path: &Path, r: std::io::Result<T>) -> Result<T> {
    r.map_err(|e| Error::io(path, e))
}

fn fsync_file(path: &Path) -> Result<()> {
    io(path, File::open(path).and_then(|f| f.sync_all()))
}

fn fsync_dir(path: &Path) -> Result<()> {
    io(path, File::open(path).and_then(|f| f.sync_all()))
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = io(path, File::create(path))?;
    io(path, f.write_all(bytes))?;
    io(path, f.sync_all())
}

/// Writes a complete checkpoint for `state` and points `latest` at it; keeps the newest `keep`.
pub fn save(
    out_dir: &Path,
    policy: &Policy,
    tokenizer: &Tokenizer,
    opt: &AdamW,
    state: &TrainerState,
    records: Records<'_>,
    keep: usize,
) -> Result<PathBuf> {
    let root = checkpoints_dir(out_dir);
    io(&root, fs::create_dir_all(&root))?;
    remove_stale_temporaries(&root)?;
    let name = format!("step-{:08}", state.sft_step + state.step);
    let tmp = root.join(format!(".tmp-{name}-{}", std::process::id()));
    io(&tmp, fs::create_dir_all(&tmp))?;

    policy.save(&tmp)?;
    tokenizer.save_dir(&tmp)?;
    let opt_path = tmp.join("optimizer.safetensors");
    Tensor::write_safetensors(&opt.state_tensors(), &opt_path)?;
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "optimizer.safetensors",
    ] {
        fsync_file(&tmp.join(f))?;
    }
    write_synced(&tmp.join(HISTORY), &serde_json::to_vec(records.history).expect("history serialises"))?;
    write_synced(&tmp.join(WORK_IDS), &serde_json::to_vec(records.work_ids).expect("work ids serialise"))?;
    write_synced(&tmp.join(MULTIPLIERS), &serde_json::to_vec(records.multipliers).expect("multipliers serialise"))?;
    write_synced(&tmp.join(REWARD_WEIGHTS), &serde_json::to_vec(records.reward_weights).expect("weights serialise"))?;
    // Written last: its presence marks the directory complete.
    let state_json = serde_json::to_vec_pretty(state).expect("state serialises");
    write_synced(&tmp.join("trainer_state.json"), &state_json)?;
    fsync_dir(&tmp)?;

    let dst = root.join(&name);
    if dst.exists() {
        io(&dst, fs::remove_dir_all(&dst))?;
    }
    io(&dst, fs::rename(&tmp, &dst))?;
    fsync_dir(&root)?;

    let latest_tmp = root.join(format!(".latest-{}", std::process::id()));
    write_synced(&latest_tmp, name.as_bytes())?;
    io(&root, fs::rename(&latest_tmp, root.join("latest")))?;
    fsync_dir(&root)?;
    prune(&root, &name, keep)?;
    Ok(dst)
}

fn remove_stale_temporaries(root: &Path) -> Result<()> {
    for entry in io(root, fs::read_dir(root))? {
        let entry = io(root, entry)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(".tmp-") {
            io(&entry.path(), fs::remove_dir_all(entry.path()))?;
        } else if name.starts_with(".latest-") {
            io(&entry.path(), fs::remove_file(entry.path()))?;
        }
    }
    Ok(())
}

fn prune(root: &Path, newest: &str, keep: usize) -> Result<()> {
    let mut names: Vec<String> = io(root, fs::read_dir(root))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("step-") && n.as_str() <= newest)
        .collect();
    names.sort();
    let excess = names.len().saturating_sub(keep.max(1));
    for n in &names[..excess] {
        let p = root.join(n);
        io(&p, fs::remove_dir_all(&p))?;
    }
    Ok(())
}

/// The newest complete checkpoint under `out_dir`, if any.
pub fn latest(out_dir: &Path) -> Result<Option<PathBuf>> {
    let root = checkpoints_dir(out_dir);
    let pointer = root.join("latest");
    match fs::read_to_string(&pointer) {
        Ok(name) => {
            let dir = root.join(name.trim());
            if !dir.join("trainer_state.json").exists() {
                return Err(Error::Checkpoint(format!("{} names {}, which is incomplete", pointer.display(), dir.display())));
            }
            Ok(Some(dir))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(pointer, e)),
    }
}

/// Reads the trainer state of a checkpoint directory.
pub fn read_state(dir: &Path) -> Result<TrainerState> {
    let path = dir.join("trainer_state.json");
    let text = io(&path, fs::read_to_string(&path))?;
    serde_json::from_str(&text).map_err(|e| Error::Checkpoint(format!("{}: {e}", path.display())))
}

/// A JSON record of a checkpoint; the default for checkpoints written before it was saved.
fn read_record<T: Default + serde::de::DeserializeOwned>(dir: &Path, name: &str) -> Result<T> {
    let path = dir.join(name);
    match fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text).map_err(|e| Error::Checkpoint(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// The knapsack outcome history of a checkpoint.
pub fn read_history(dir: &Path) -> Result<History> {
    read_record(dir, HISTORY)
}

/// The work items a checkpoint's run had trained on.
pub fn read_work_ids(dir: &Path) -> Result<WorkIds> {
    read_record(dir, WORK_IDS)
}

/// The reward-constraint multipliers of a checkpoint (empty when it has none).
pub fn read_multipliers(dir: &Path) -> Result<std::collections::BTreeMap<String, f64>> {
    read_record(dir, MULTIPLIERS)
}

/// The reward component weights of a checkpoint (empty when it has none).
pub fn read_reward_weights(dir: &Path) -> Result<std::collections::BTreeMap<String, f64>> {
    read_record(dir, REWARD_WEIGHTS)
}

/// Restores weights and optimizer moments from a checkpoint directory.
pub fn restore(dir: &Path, policy: &mut Policy, opt: &mut AdamW) -> Result<TrainerState> {
    let state = read_state(dir)?;
    policy.load_weights(dir)?;
    let opt_path = dir.join("optimizer.safetensors");
    let tensors = Tensor::read_safetensors(&opt_path)
        .map_err(|e| Error::Checkpoint(format!("{}: {e}", opt_path.display())))?;
    opt.load_state_tensors(tensors, state.optimizer_t)?;
    Ok(state)
}
