//! How completions are sampled: the `[sampling]` section of a job and the
//! settings of the masked-diffusion sampler derived from it. The samplers
//! themselves live in `sluice-model` (`generate`, `diffusion`).

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How to sample completions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SamplingParams {
    /// Softmax temperature; 0 means greedy.
    pub temperature: f64,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches `top_p` (1 = off).
    pub top_p: f64,
    /// Keep only the `top_k` most likely tokens (0 = off).
    pub top_k: i64,
    /// Maximum number of generated tokens per completion.
    pub max_new_tokens: i64,
    /// Generation stops for a row once it samples one of these (the token is kept).
    /// Every end-of-sequence id of the checkpoint is always added (see [`SamplingParams::stop_at`]).
    pub stop_token_ids: Vec<i64>,
    /// Generation also stops for a row once its text contains one of these; the
    /// text scored ends before the stop string (tokens are kept as sampled).
    pub stop: Vec<String>,
    /// Continuous batching: rows decoded at once; when a row ends its slot takes
    /// the next prompt of the batch at once (0 = every row at once, static).
    /// Outputs do not depend on it (each row samples from its own stream).
    pub slots: usize,
    /// Diffusion policies only: denoising steps for the whole response
    /// (`max_new_tokens` tokens, all generated); 0 means one per token.
    pub diffusion_steps: usize,
    /// Diffusion policies only: tokens per block, revealed left to right
    /// (semi-autoregressive); 0 means one block.
    pub block_length: usize,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            max_new_tokens: 16,
            stop_token_ids: vec![],
            stop: vec![],
            slots: 0,
            diffusion_steps: 0,
            block_length: 0,
        }
    }
}

impl SamplingParams {
    pub fn validate(&self, prefix: &str) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(Error::config(format!("{prefix}.temperature"), "must be a finite number >= 0"));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::config(format!("{prefix}.top_p"), "must be in (0, 1]"));
        }
        if self.top_k < 0 {
            return Err(Error::config(format!("{prefix}.top_k"), "must be >= 0"));
        }
        use crate::limits::{MAX_NEW_TOKENS, MAX_STOP_BYTES, MAX_STOP_STRINGS};
        if !(1..=MAX_NEW_TOKENS).contains(&self.max_new_tokens) {
            return Err(Error::config(format!("{prefix}.max_new_tokens"), format!("must be between 1 and {MAX_NEW_TOKENS}")));
        }
        if self.stop.len() > MAX_STOP_STRINGS {
            return Err(Error::config(format!("{prefix}.stop"), format!("at most {MAX_STOP_STRINGS} stop strings")));
        }
        if let Some(i) = self.stop.iter().position(|s| s.is_empty() || s.len() > MAX_STOP_BYTES) {
            return Err(Error::config(format!("{prefix}.stop[{i}]"), format!("must be 1 to {MAX_STOP_BYTES} bytes")));
        }
        if self.slots > crate::limits::MAX_SLOTS {
            return Err(Error::config(format!("{prefix}.slots"), format!("must be at most {}", crate::limits::MAX_SLOTS)));
        }
        if self.stop_token_ids.len() > MAX_STOP_STRINGS {
            return Err(Error::config(format!("{prefix}.stop_token_ids"), format!("at most {MAX_STOP_STRINGS} ids")));
        }
        self.diffusion().validate(prefix)
    }

    /// Adds `ids` (a tokenizer's stop ids) to `stop_token_ids`.
    pub fn stop_at(&mut self, ids: &[i64]) {
        for id in ids {
            if !self.stop_token_ids.contains(id) {
                self.stop_token_ids.push(*id);
            }
        }
    }

    /// `text` up to the first stop string in it.
    pub fn cut_at_stop<'t>(&self, text: &'t str) -> &'t str {
        let end = self.stop.iter().filter_map(|s| text.find(s.as_str())).min().unwrap_or(text.len());
        &text[..end]
    }

    /// The diffusion sampler's settings (`sluice_model::diffusion`).
    pub fn diffusion(&self) -> DiffusionSampling {
        let len = self.max_new_tokens.max(1) as usize;
        DiffusionSampling {
            gen_length: len,
            steps: if self.diffusion_steps == 0 { len } else { self.diffusion_steps },
            block_length: if self.block_length == 0 { len } else { self.block_length },
            temperature: self.temperature,
        }
    }
}

/// How a diffusion policy samples a response.
#[derive(Debug, Clone, PartialEq)]
pub struct DiffusionSampling {
    /// Response tokens (fixed; the policy fills every position).
    pub gen_length: usize,
    /// Denoising steps over the whole response (divided evenly among blocks).
    pub steps: usize,
    /// Tokens per block; blocks are revealed left to right.
    pub block_length: usize,
    /// Sampling temperature; 0 is greedy.
    pub temperature: f64,
}

impl DiffusionSampling {
    pub fn validate(&self, field: &str) -> Result<()> {
        let bad = |k: &str, why: &str| Err(Error::config(format!("{field}.{k}"), why));
        if self.gen_length == 0 {
            return bad("gen_length", "must be >= 1");
        }
        if self.block_length == 0 || !self.gen_length.is_multiple_of(self.block_length) {
            return bad("block_length", "must divide the response length (max_new_tokens)");
        }
        let blocks = self.gen_length / self.block_length;
        if self.steps == 0 || !self.steps.is_multiple_of(blocks) {
            return bad("diffusion_steps", "must be a positive multiple of the number of blocks");
        }
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad("temperature", "must be >= 0");
        }
        Ok(())
    }
}

