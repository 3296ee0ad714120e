//! A policy as a Hugging Face model directory: `config.json`, `model.safetensors`
//! (or sharded `model.safetensors.index.json`), `tokenizer.json`.
//!
//! Loading walks the var store: every parameter the model has must be in the
//! checkpoint with the same shape, or the error names the tensor and both shapes.
//! Extra tensors in the file (a tied `lm_head.weight`, old rotary buffers) are
//! ignored with a debug log.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde_json::Value;
use tch::{nn, Device, Kind, Tensor};

use sluice_core::config::ModelSection;
use crate::error::{Error, Result};
use crate::model::{init_parameters, Model, ModelConfig};
use sluice_core::tokenizer::{Tokenizer, DEFAULT_ALPHABET};

/// A decoder with its own parameter store.
pub struct Policy {
    vs: nn::VarStore,
    model: Model,
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy").field("config", self.model.config()).field("kind", &self.kind()).finish()
    }
}

impl Policy {
    /// Random init with a fixed seed (normal(0, 0.02) weights, unit norms, zero
    /// biases; see [`init_parameters`]): the same weights for the same seed on
    /// any device, whatever else runs in the process.
    pub fn random(config: &ModelConfig, device: Device, kind: Kind, seed: i64) -> Self {
        let mut policy = Policy::unfilled(config, device, Kind::Float);
        init_parameters(&policy.vs, seed as u64);
        if kind != Kind::Float {
            policy.vs.set_kind(kind);
        }
        policy
    }

    /// The model's parameters with norms 1 and every other weight 0, for a
    /// checkpoint to be copied into.
    fn unfilled(config: &ModelConfig, device: Device, kind: Kind) -> Self {
        let mut vs = nn::VarStore::new(device);
        let model = Model::new(&vs.root(), config);
        if kind != Kind::Float {
            vs.set_kind(kind);
        }
        Policy { vs, model }
    }

    /// Loads a Hugging Face directory onto `device`, cast to `kind`.
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        let config = read_config(dir)?;
        let mut policy = Policy::unfilled(&config, device, kind);
        policy.load_weights(dir)?;
        Ok(policy)
    }

    /// Copies the tensors of the checkpoint in `dir` into this policy's parameters.
    pub fn load_weights(&mut self, dir: &Path) -> Result<()> {
        let files = weight_files(dir)?;
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        for file in &files {
            let named = Tensor::read_safetensors(file)
                .map_err(|e| Error::Checkpoint { file: file.clone(), reason: e.to_string() })?;
            tensors.extend(named);
        }
        self.set_parameters(tensors, dir)
    }

    /// Copies named tensors into the parameters (converting device and dtype),
    /// checking that every parameter is present with its shape; `source` names
    /// where they came from in errors. Tensors the model does not use are ignored.
    pub fn set_parameters(&self, tensors: HashMap<String, Tensor>, source: &Path) -> Result<()> {
        let vars = self.vs.variables();
        let mut names: Vec<_> = vars.keys().collect();
        names.sort();
        for name in &names {
            let var = &vars[*name];
            let expected = var.size();
            let Some(src) = tensors.get(*name) else {
                return Err(Error::MissingTensor { file: source.to_path_buf(), name: name.to_string(), expected });
            };
            if src.size() != expected {
                return Err(Error::ShapeMismatch {
                    file: source.to_path_buf(),
                    name: name.to_string(),
                    expected,
                    found: src.size(),
                });
            }
        }
        tch::no_grad(|| {
            for name in names {
                let mut var = vars[name].shallow_clone();
                var.copy_(&tensors[name].to_device(var.device()).to_kind(var.kind()));
            }
        });
        for extra in tensors.keys().filter(|k| !vars.contains_key(*k)) {
            tracing::debug!(tensor = %extra, "ignoring tensor the model does not use");
        }
        Ok(())
    }

    /// Writes `config.json` and `model.safetensors` into `dir` (which must exist).
    pub fn save(&self, dir: &Path) -> Result<()> {
        let cfg = self.config().to_hf_json(self.kind());
        let text = serde_json::to_string_pretty(&cfg).expect("json value serialises");
        let cfg_path = dir.join("config.json");
        std::fs::write(&cfg_path, text).map_err(|e| Error::io(&cfg_path, e))?;
        let path = dir.join("model.safetensors");
        Tensor::write_safetensors(&self.named_parameters(), &path)
            .map_err(|e| Error::Checkpoint { file: path, reason: e.to_string() })
    }

    /// Parameters sorted by name (the Hugging Face tensor names).
    pub fn named_parameters(&self) -> Vec<(String, Tensor)> {
        let mut v: Vec<_> = self.vs.variables().into_iter().collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Copies every parameter of `other` (same config) into this policy.
    pub fn copy_from(&mut self, other: &Policy) -> Result<()> {
        self.vs.copy(&other.vs)?;
        Ok(())
    }

    pub fn model(&self) -> &Model {
        &self.model
    }
    pub fn config(&self) -> &ModelConfig {
        self.model.config()
    }
    pub fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }
    pub fn var_store_mut(&mut self) -> &mut nn::VarStore {
        &mut self.vs
    }
    pub fn device(&self) -> Device {
        self.vs.device()
    }
    /// The dtype of the parameters.
    pub fn kind(&self) -> Kind {
        self.model.kind()
    }
}

/// Builds the policy and tokenizer a job's `[model]` section names: a random-init
/// preset with the character-level tokenizer, or a local Hugging Face directory.
pub fn load_policy(m: &ModelSection) -> Result<(Policy, Tokenizer)> {
    let (device, kind) = (crate::device::device(m.device), crate::device::kind(m.dtype));
    let (config, tokenizer) = open_model(m)?;
    let policy = match &m.path {
        Some(dir) if m.preset.is_none() => {
            let mut policy = Policy::unfilled(&config, device, kind);
            policy.load_weights(dir)?;
            policy
        }
        _ => Policy::random(&config, device, kind, m.init_seed),
    };
    Ok((policy, tokenizer))
}

/// The model config and tokenizer of a `[model]` section, without the weights
/// (`sluice check`): a preset's, or a directory's `config.json` and tokenizer
/// files, after checking that its weight files are there.
pub fn open_model(m: &ModelSection) -> Result<(ModelConfig, Tokenizer)> {
    if let Some(preset) = &m.preset {
        let tokenizer = Tokenizer::char_level(DEFAULT_ALPHABET)?;
        let mut mc = ModelConfig::preset(preset, tokenizer.vocab_size())?;
        mc.eos_token_ids = vec![tokenizer.eos_id()];
        mc.pad_token_id = Some(tokenizer.pad_id());
        return Ok((mc, tokenizer));
    }
    let dir = m.path.as_ref().ok_or_else(|| Error::config("model", "set `preset` or `path`"))?;
    let config = read_config(dir)?;
    weight_files(dir)?;
    let tokenizer = Tokenizer::from_dir(dir, &config.eos_token_ids)?;
    if tokenizer.vocab_size() > config.vocab_size {
        return Err(Error::config(
            format!("{} (vocab_size)", dir.join("config.json").display()),
            format!("the tokenizer has {} tokens, more than the model's {}", tokenizer.vocab_size(), config.vocab_size),
        ));
    }
    Ok((config, tokenizer))
}

/// Reads and validates `config.json` of a Hugging Face directory.
pub fn read_config(dir: &Path) -> Result<ModelConfig> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| Error::Checkpoint { file: path.clone(), reason: format!("not valid JSON: {e}") })?;
    ModelConfig::from_hf_json(&v).map_err(|e| match e {
        Error::Core(sluice_core::Error::Config { path: field, reason }) => Error::config(format!("{} ({field})", path.display()), reason),
        other => other,
    })
}

/// The safetensors files of a directory: a single `model.safetensors` or the shards of an index.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&index).map_err(|_| Error::Checkpoint {
        file: dir.to_path_buf(),
        reason: "neither model.safetensors nor model.safetensors.index.json exists".into(),
    })?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| Error::Checkpoint { file: index.clone(), reason: format!("not valid JSON: {e}") })?;
    let map = v.get("weight_map").and_then(Value::as_object).ok_or_else(|| Error::Checkpoint {
        file: index.clone(),
        reason: "no `weight_map` object".into(),
    })?;
    let shards: BTreeMap<&str, ()> = map.values().filter_map(Value::as_str).map(|s| (s, ())).collect();
    Ok(shards.keys().map(|s| dir.join(s)).collect())
}
