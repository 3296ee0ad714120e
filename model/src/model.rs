//! Autoregressive decoder with the Qwen2 / Qwen3 / Llama / Mistral layout, in tch.
//!
//! Pre-norm transformer: token embedding, `num_hidden_layers` blocks of
//! (RMSNorm → grouped-query self-attention with rotary position embeddings →
//! residual, RMSNorm → SwiGLU MLP → residual), a final RMSNorm and a language
//! model head that may share the embedding matrix (`tie_word_embeddings`).
//! The families differ in a few switches, all in [`ModelConfig`]:
//! * Qwen2 puts a bias on the q/k/v projections; Llama, Qwen3 and Mistral put one
//!   on all four projections only when `attention_bias` is set.
//! * Qwen3 normalises each query and key head (RMSNorm over `head_dim`, before
//!   the rotary embedding; `q_norm`, `k_norm`).
//! * Mistral attends over a sliding window of the last `sliding_window` positions.
//! * Llama 3.1+ rescales the rotary frequencies (`rope_type: llama3`, see [`RopeScaling`]).
//!
//! Parameter paths equal the Hugging Face tensor names
//! (`model.layers.3.self_attn.q_proj.weight`), so loading a checkpoint is a walk
//! over the var store (see [`crate::hf`]). Numerics follow `transformers`'
//! `modeling_qwen2.py` / `modeling_llama.py`: RMSNorm in fp32, rotary tables in
//! fp32 with the "rotate half" convention, softmax scale `head_dim^-0.5`.
//!
//! References: Qwen2 technical report (arXiv 2407.10671); RoFormer (arXiv 2104.09864);
//! GQA (arXiv 2305.13245); GLU variants (arXiv 2002.05202).

use serde_json::{json, Value};
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};

/// Architecture family, as `config.json`'s `model_type` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Qwen2,
    Qwen3,
    Llama,
    Mistral,
}

impl Arch {
    const ALL: [Arch; 4] = [Arch::Qwen2, Arch::Qwen3, Arch::Llama, Arch::Mistral];

    fn hf_names(self) -> (&'static str, &'static str) {
        match self {
            Arch::Qwen2 => ("qwen2", "Qwen2ForCausalLM"),
            Arch::Qwen3 => ("qwen3", "Qwen3ForCausalLM"),
            Arch::Llama => ("llama", "LlamaForCausalLM"),
            Arch::Mistral => ("mistral", "MistralForCausalLM"),
        }
    }
}

/// How the rotary frequencies are rescaled for long contexts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    /// `inv_freq[i] = theta^(-2i/d)`.
    None,
    /// Position interpolation: every frequency divided by `factor`.
    Linear { factor: f64 },
    /// Llama 3.1: low frequencies (wavelength above `original / low_freq_factor`)
    /// divided by `factor`, high ones (below `original / high_freq_factor`) kept,
    /// and the band between blended linearly in `original / wavelength`.
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: f64 },
}

impl RopeScaling {
    /// The inverse frequencies of a `head_dim`-wide rotary embedding with base `theta`.
    pub fn inv_freq(self, head_dim: i64, theta: f64) -> Vec<f64> {
        let plain = (0..head_dim / 2).map(|i| theta.powf(-(2 * i) as f64 / head_dim as f64));
        match self {
            RopeScaling::None => plain.collect(),
            RopeScaling::Linear { factor } => plain.map(|f| f / factor).collect(),
            RopeScaling::Llama3 { factor, low_freq_factor: low, high_freq_factor: high, original_max_position_embeddings: old } => plain
                .map(|f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < old / high {
                        f
                    } else if wavelen > old / low {
                        f / factor
                    } else {
                        let smooth = (old / wavelen - low) / (high - low);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect(),
        }
    }

    /// The `rope_parameters` object of `config.json`.
    fn to_hf_json(self, theta: f64) -> Value {
        match self {
            RopeScaling::None => json!({"rope_type": "default", "rope_theta": theta}),
            RopeScaling::Linear { factor } => json!({"rope_type": "linear", "rope_theta": theta, "factor": factor}),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => json!({
                "rope_type": "llama3", "rope_theta": theta, "factor": factor, "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor, "original_max_position_embeddings": original_max_position_embeddings as i64,
            }),
        }
    }

    /// Parses `rope_parameters` (transformers >= 5) or `rope_scaling` (older files);
    /// `field` names the key in errors.
    fn from_hf_json(r: &Value, field: &str) -> Result<Self> {
        let ty = r.get("rope_type").or_else(|| r.get("type")).and_then(Value::as_str).unwrap_or("default");
        let num = |k: &str| -> Result<f64> {
            r.get(k)
                .and_then(Value::as_f64)
                .filter(|x| x.is_finite() && *x > 0.0)
                .ok_or_else(|| Error::config(format!("config.json: {field}.{k}"), "missing or not a positive number"))
        };
        match ty {
            "default" => Ok(RopeScaling::None),
            "linear" => Ok(RopeScaling::Linear { factor: num("factor")? }),
            "llama3" => {
                let (low, high) = (num("low_freq_factor")?, num("high_freq_factor")?);
                if high <= low {
                    return Err(Error::config(
                        format!("config.json: {field}.high_freq_factor"),
                        format!("{high} must exceed low_freq_factor {low}"),
                    ));
                }
                Ok(RopeScaling::Llama3 {
                    factor: num("factor")?,
                    low_freq_factor: low,
                    high_freq_factor: high,
                    original_max_position_embeddings: num("original_max_position_embeddings")?,
                })
            }
            other => Err(Error::config(
                format!("config.json: {field}.rope_type"),
                format!("`{other}` unsupported (supported: default, linear, llama3)"),
            )),
        }
    }
}

/// Hyper-parameters of the decoder, as found in a Hugging Face `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub num_key_value_heads: i64,
    pub head_dim: i64,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: i64,
    /// Bias on q/k/v (Qwen2 always; Llama when `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on o_proj (`attention_bias` outside Qwen2).
    pub o_bias: bool,
    /// Per-head RMSNorm on queries and keys (Qwen3).
    pub qk_norm: bool,
    /// Each position attends to at most this many positions, itself included (Mistral).
    pub sliding_window: Option<i64>,
    pub bos_token_id: Option<i64>,
    /// `eos_token_id`: one id or several (Llama 3 instruct ends on any of three).
    pub eos_token_ids: Vec<i64>,
    pub pad_token_id: Option<i64>,
    /// Set for a masked diffusion LM (LLaDA style, `sluice_core::diffusion`):
    /// the id of the mask token; the same blocks then attend bidirectionally.
    pub mask_token_id: Option<i64>,
}

/// Small random-init presets for tests, benchmarks and `sluice dev`. The
/// `-diffusion` ones are masked diffusion LMs: one extra vocabulary row, the mask token.
pub use sluice_core::config::PRESETS;

impl ModelConfig {
    /// A named preset with the given vocabulary size.
    pub fn preset(name: &str, vocab_size: i64) -> Result<Self> {
        if let Some(base) = name.strip_suffix("-diffusion").filter(|b| matches!(*b, "tiny" | "small")) {
            let mut c = Self::preset(base, vocab_size + 1)?;
            c.mask_token_id = Some(vocab_size);
            return Ok(c);
        }
        let (hidden, inter, layers, heads, kv, tie) = match name {
            // ~0.1M parameters besides the embedding: learns arithmetic in minutes on 2 cores.
            "tiny" => (64, 176, 2, 4, 2, true),
            // ~3M parameters.
            "small" => (256, 704, 4, 8, 2, true),
            // Qwen2-0.5B shapes (random init), for throughput benchmarks.
            "qwen2-0.5b" => (896, 4864, 24, 14, 2, true),
            other => {
                return Err(Error::config(
                    "model.preset",
                    format!("unknown preset `{other}`; known: {}", PRESETS.join(", ")),
                ))
            }
        };
        Ok(ModelConfig {
            arch: Arch::Qwen2,
            vocab_size,
            hidden_size: hidden,
            intermediate_size: inter,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: kv,
            head_dim: hidden / heads,
            rms_norm_eps: 1e-6,
            rope_theta: 10000.0,
            rope_scaling: RopeScaling::None,
            tie_word_embeddings: tie,
            max_position_embeddings: 4096,
            qkv_bias: true,
            o_bias: false,
            qk_norm: false,
            sliding_window: None,
            bos_token_id: None,
            eos_token_ids: vec![],
            pad_token_id: None,
            mask_token_id: None,
        })
    }

    /// Switches a preset to another family's layout (`qwen2`, `qwen3`, `llama`,
    /// `mistral`): the biases and q/k norms that family has.
    pub fn set_arch(&mut self, name: &str) -> Result<()> {
        let arch = Arch::ALL.into_iter().find(|a| a.hf_names().0 == name).ok_or_else(|| {
            let known: Vec<_> = Arch::ALL.iter().map(|a| a.hf_names().0).collect();
            Error::config("arch", format!("`{name}` is not one of {}", known.join(", ")))
        })?;
        self.arch = arch;
        self.qkv_bias = arch == Arch::Qwen2;
        self.o_bias = false;
        self.qk_norm = arch == Arch::Qwen3;
        Ok(())
    }

    /// True for a masked diffusion LM.
    pub fn is_diffusion(&self) -> bool {
        self.mask_token_id.is_some()
    }

    /// Parses a Hugging Face `config.json` value. Fields that would change the
    /// computation in ways this implementation does not support are errors that
    /// name the field; purely informational fields are ignored.
    pub fn from_hf_json(v: &Value) -> Result<Self> {
        let arch = match v.get("model_type").and_then(Value::as_str) {
            Some(name) => Arch::ALL.into_iter().find(|a| a.hf_names().0 == name).ok_or_else(|| {
                let known: Vec<_> = Arch::ALL.iter().map(|a| a.hf_names().0).collect();
                Error::config(
                    "config.json: model_type",
                    format!("unsupported architecture `{name}` (supported: {})", known.join(", ")),
                )
            })?,
            None => return Err(Error::config("config.json: model_type", "missing")),
        };
        let int = |k: &str| -> Result<i64> {
            v.get(k)
                .and_then(Value::as_i64)
                .ok_or_else(|| Error::config(format!("config.json: {k}"), "missing or not an integer"))
        };
        let opt_int = |k: &str| -> Option<i64> {
            match v.get(k) {
                Some(Value::Number(n)) => n.as_i64(),
                Some(Value::Array(a)) => a.first().and_then(Value::as_i64),
                _ => None,
            }
        };
        let hidden_size = int("hidden_size")?;
        let heads = int("num_attention_heads")?;
        let kv = opt_int("num_key_value_heads").unwrap_or(heads);
        if heads % kv != 0 {
            return Err(Error::config(
                "config.json: num_key_value_heads",
                format!("{kv} does not divide num_attention_heads {heads}"),
            ));
        }
        let act = v.get("hidden_act").and_then(Value::as_str).unwrap_or("silu");
        if act != "silu" {
            return Err(Error::config("config.json: hidden_act", format!("`{act}` unsupported, only silu")));
        }
        if v.get("use_sliding_window").and_then(Value::as_bool) == Some(true) {
            return Err(Error::config("config.json: use_sliding_window", "sliding-window attention is not supported"));
        }
        if v.get("mlp_bias").and_then(Value::as_bool) == Some(true) {
            return Err(Error::config("config.json: mlp_bias", "MLP bias is not supported"));
        }
        // transformers >= 5 keeps rope settings in `rope_parameters`; older files in `rope_theta`/`rope_scaling`.
        let rope = v.get("rope_parameters").filter(|r| !r.is_null());
        let rope_scaling = match (rope, v.get("rope_scaling").filter(|s| !s.is_null())) {
            (Some(r), _) => RopeScaling::from_hf_json(r, "rope_parameters")?,
            (None, Some(s)) => RopeScaling::from_hf_json(s, "rope_scaling")?,
            (None, None) => RopeScaling::None,
        };
        let rope_theta = rope
            .and_then(|r| r.get("rope_theta"))
            .or_else(|| v.get("rope_theta"))
            .and_then(Value::as_f64)
            .unwrap_or(10000.0);
        let attention_bias = v.get("attention_bias").and_then(Value::as_bool).unwrap_or(false);
        let (qkv_bias, o_bias) = match arch {
            Arch::Qwen2 => (true, false),
            Arch::Qwen3 | Arch::Llama | Arch::Mistral => (attention_bias, attention_bias),
        };
        // Qwen2/3 keep a `sliding_window` size that only `use_sliding_window` (refused above) turns on.
        let sliding_window = match (arch, v.get("sliding_window")) {
            (Arch::Mistral, Some(Value::Number(n))) => Some(n.as_i64().filter(|w| *w > 0).ok_or_else(|| {
                Error::config("config.json: sliding_window", format!("{n} is not a positive integer"))
            })?),
            _ => None,
        };
        Ok(ModelConfig {
            arch,
            vocab_size: int("vocab_size")?,
            hidden_size,
            intermediate_size: int("intermediate_size")?,
            num_hidden_layers: int("num_hidden_layers")?,
            num_attention_heads: heads,
            num_key_value_heads: kv,
            head_dim: opt_int("head_dim").unwrap_or(hidden_size / heads),
            rms_norm_eps: v.get("rms_norm_eps").and_then(Value::as_f64).unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            tie_word_embeddings: v.get("tie_word_embeddings").and_then(Value::as_bool).unwrap_or(false),
            max_position_embeddings: opt_int("max_position_embeddings").unwrap_or(4096),
            qkv_bias,
            o_bias,
            qk_norm: arch == Arch::Qwen3,
            sliding_window,
            bos_token_id: opt_int("bos_token_id"),
            eos_token_ids: sluice_core::tokenizer::token_ids(v.get("eos_token_id")),
            pad_token_id: opt_int("pad_token_id"),
            mask_token_id: opt_int("mask_token_id"),
        })
    }

    /// The `config.json` that `transformers` reads back into the same model.
    pub fn to_hf_json(&self, dtype: Kind) -> Value {
        let (model_type, class) = self.arch.hf_names();
        let dtype = if dtype == Kind::BFloat16 { "bfloat16" } else { "float32" };
        let mut v = json!({
            "architectures": [class],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": self.rope_scaling.to_hf_json(self.rope_theta),
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "use_sliding_window": false,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "torch_dtype": dtype,
            "dtype": dtype,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": match self.eos_token_ids.as_slice() {
                [] => Value::Null,
                [one] => json!(one),
                many => json!(many),
            },
            "pad_token_id": self.pad_token_id,
        });
        if self.arch != Arch::Qwen2 {
            v["attention_bias"] = json!(self.o_bias);
        }
        if self.arch == Arch::Mistral {
            v["sliding_window"] = json!(self.sliding_window);
        }
        if let Some(m) = self.mask_token_id {
            v["mask_token_id"] = json!(m);
        }
        v
    }

    /// Number of parameters of a model with this config.
    pub fn num_params(&self) -> i64 {
        let (d, f, h, kv, hd) =
            (self.hidden_size, self.intermediate_size, self.num_attention_heads, self.num_key_value_heads, self.head_dim);
        let attn = d * h * hd * 2
            + d * kv * hd * 2
            + if self.qkv_bias { h * hd + 2 * kv * hd } else { 0 }
            + if self.o_bias { d } else { 0 }
            + if self.qk_norm { 2 * hd } else { 0 };
        let layer = attn + 3 * d * f + 2 * d;
        let emb = self.vocab_size * d * if self.tie_word_embeddings { 1 } else { 2 };
        emb + self.num_hidden_layers * layer + d
    }
}

/// Root-mean-square layer norm, computed in fp32 like transformers.
#[derive(Debug)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(vs: nn::Path, dim: i64, eps: f64) -> Self {
        RmsNorm { weight: vs.var("weight", &[dim], nn::Init::Const(1.0)), eps }
    }
    fn forward(&self, xs: &Tensor) -> Tensor {
        let kind = xs.kind();
        let x = xs.to_kind(Kind::Float);
        let var = x.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
        let x = x * (var + self.eps).rsqrt();
        &self.weight * x.to_kind(kind)
    }
}

/// cos/sin tables for the given positions, shared by all layers of one forward.
struct Rotary {
    cos: Tensor,
    sin: Tensor,
}

impl Rotary {
    /// `positions`: [B, T] int64; `inv_freq`: [head_dim / 2] fp32. Tables come out
    /// as [B, 1, T, head_dim] in `kind`.
    fn new(positions: &Tensor, inv_freq: &Tensor, kind: Kind) -> Self {
        let freqs = positions.to_kind(Kind::Float).unsqueeze(-1) * inv_freq.view([1, 1, -1]);
        let emb = Tensor::cat(&[&freqs, &freqs], -1).unsqueeze(1);
        Rotary { cos: emb.cos().to_kind(kind), sin: emb.sin().to_kind(kind) }
    }
    fn apply(&self, x: &Tensor) -> Tensor {
        let half = x.size()[3] / 2;
        let x1 = x.narrow(3, 0, half);
        let x2 = x.narrow(3, half, half);
        let rotated = Tensor::cat(&[&x2.neg(), &x1], 3);
        x * &self.cos + rotated * &self.sin
    }
}

fn linear(vs: nn::Path, i: i64, o: i64, bias: bool) -> nn::Linear {
    // Zeros until `init_parameters` draws them (or a checkpoint is loaded).
    let cfg = nn::LinearConfig {
        ws_init: nn::Init::Const(0.0),
        bs_init: Some(nn::Init::Const(0.0)),
        bias,
    };
    nn::linear(vs, i, o, cfg)
}

#[derive(Debug)]
struct Attention {
    q_proj: nn::Linear,
    k_proj: nn::Linear,
    v_proj: nn::Linear,
    o_proj: nn::Linear,
    /// Qwen3's per-head norms.
    qk_norm: Option<(RmsNorm, RmsNorm)>,
    heads: i64,
    kv_heads: i64,
    head_dim: i64,
}

impl Attention {
    fn new(vs: nn::Path, c: &ModelConfig) -> Self {
        let (d, h, kv, hd) = (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        Attention {
            q_proj: linear(&vs / "q_proj", d, h * hd, c.qkv_bias),
            k_proj: linear(&vs / "k_proj", d, kv * hd, c.qkv_bias),
            v_proj: linear(&vs / "v_proj", d, kv * hd, c.qkv_bias),
            o_proj: linear(&vs / "o_proj", h * hd, d, c.o_bias),
            qk_norm: c.qk_norm.then(|| {
                (RmsNorm::new(&vs / "q_norm", hd, c.rms_norm_eps), RmsNorm::new(&vs / "k_norm", hd, c.rms_norm_eps))
            }),
            heads: h,
            kv_heads: kv,
            head_dim: hd,
        }
    }

    fn forward(&self, xs: &Tensor, rope: &Rotary, mask: Option<&Tensor>, cache: Option<LayerCache>) -> Tensor {
        let (b, t, _) = xs.size3().expect("attention input is [B, T, D]");
        let mut q = self.q_proj.forward(xs).view([b, t, self.heads, self.head_dim]);
        let mut k = self.k_proj.forward(xs).view([b, t, self.kv_heads, self.head_dim]);
        if let Some((qn, kn)) = &self.qk_norm {
            (q, k) = (qn.forward(&q), kn.forward(&k));
        }
        let (q, k) = (q.transpose(1, 2), k.transpose(1, 2));
        let v = self.v_proj.forward(xs).view([b, t, self.kv_heads, self.head_dim]).transpose(1, 2);
        let q = rope.apply(&q);
        let k = rope.apply(&k);
        let (k, v) = match cache {
            Some(c) => {
                // Write this step's keys/values into the preallocated cache, attend over the prefix.
                c.k.narrow(2, c.offset, t).copy_(&k);
                c.v.narrow(2, c.offset, t).copy_(&v);
                (c.k.narrow(2, 0, c.offset + t), c.v.narrow(2, 0, c.offset + t))
            }
            None => (k, v),
        };
        let rep = self.heads / self.kv_heads;
        let (k, v) = if rep > 1 { (repeat_kv(&k, rep), repeat_kv(&v, rep)) } else { (k, v) };
        let scale = (self.head_dim as f64).powf(-0.5);
        let y = match mask {
            Some(m) => Tensor::scaled_dot_product_attention(&q, &k, &v, Some(m), 0.0, false, scale, false),
            None => Tensor::scaled_dot_product_attention::<Tensor>(&q, &k, &v, None, 0.0, true, scale, false),
        };
        let y = y.transpose(1, 2).contiguous().view([b, t, self.heads * self.head_dim]);
        self.o_proj.forward(&y)
    }
}

/// [B, kv, T, hd] -> [B, kv * rep, T, hd], each kv head serving `rep` query heads.
fn repeat_kv(x: &Tensor, rep: i64) -> Tensor {
    let (b, kv, t, hd) = x.size4().expect("kv is [B, kv, T, hd]");
    x.unsqueeze(2).expand([b, kv, rep, t, hd], false).reshape([b, kv * rep, t, hd])
}

#[derive(Debug)]
struct Mlp {
    gate_proj: nn::Linear,
    up_proj: nn::Linear,
    down_proj: nn::Linear,
}

impl Mlp {
    fn new(vs: nn::Path, c: &ModelConfig) -> Self {
        let (d, f) = (c.hidden_size, c.intermediate_size);
        Mlp {
            gate_proj: linear(&vs / "gate_proj", d, f, false),
            up_proj: linear(&vs / "up_proj", d, f, false),
            down_proj: linear(&vs / "down_proj", f, d, false),
        }
    }
    fn forward(&self, xs: &Tensor) -> Tensor {
        // SwiGLU: down(silu(gate(x)) * up(x))
        self.down_proj.forward(&(self.gate_proj.forward(xs).silu() * self.up_proj.forward(xs)))
    }
}

#[derive(Debug)]
struct DecoderLayer {
    self_attn: Attention,
    mlp: Mlp,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
}

impl DecoderLayer {
    fn new(vs: nn::Path, c: &ModelConfig) -> Self {
        DecoderLayer {
            self_attn: Attention::new(&vs / "self_attn", c),
            mlp: Mlp::new(&vs / "mlp", c),
            input_layernorm: RmsNorm::new(&vs / "input_layernorm", c.hidden_size, c.rms_norm_eps),
            post_attention_layernorm: RmsNorm::new(&vs / "post_attention_layernorm", c.hidden_size, c.rms_norm_eps),
        }
    }
    fn forward(&self, xs: &Tensor, rope: &Rotary, mask: Option<&Tensor>, cache: Option<LayerCache>) -> Tensor {
        let h = xs + self.self_attn.forward(&self.input_layernorm.forward(xs), rope, mask, cache);
        &h + self.mlp.forward(&self.post_attention_layernorm.forward(&h))
    }
}

/// One layer's view of the KV cache during a forward pass.
struct LayerCache<'a> {
    k: &'a Tensor,
    v: &'a Tensor,
    offset: i64,
}

/// Preallocated key/value cache: `[B, kv_heads, capacity, head_dim]` per layer.
#[derive(Debug)]
pub struct KvCache {
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Number of positions already written.
    len: i64,
    capacity: i64,
}

impl KvCache {
    pub fn new(c: &ModelConfig, batch: i64, capacity: i64, kind: Kind, device: Device) -> Self {
        let shape = [batch, c.num_key_value_heads, capacity, c.head_dim];
        let mk = || (0..c.num_hidden_layers).map(|_| Tensor::zeros(shape, (kind, device))).collect::<Vec<_>>();
        KvCache { k: mk(), v: mk(), len: 0, capacity }
    }
    pub fn len(&self) -> i64 {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn capacity(&self) -> i64 {
        self.capacity
    }

    /// Reorders every row's columns by `order` `[B, capacity]` (a permutation
    /// per row) and keeps the first `len` (continuous batching packs each
    /// row's live columns to the front).
    pub fn pack(&mut self, order: &Tensor, len: i64) {
        for t in self.k.iter_mut().chain(self.v.iter_mut()) {
            let (b, h, c, d) = t.size4().expect("cache is [B, H, C, D]");
            let idx = order.view([b, 1, c, 1]).expand([b, h, c, d], false);
            *t = t.gather(2, &idx, false);
        }
        self.len = len;
    }
}

/// Random init of a freshly built model: every weight matrix (not norms, not
/// biases) from normal(0, 0.02). Each parameter's values come from its own
/// ChaCha stream keyed by `seed` and the parameter's name, drawn on the host
/// and copied to the parameter's device: the same seed gives the same weights
/// on every device and thread, and libtorch's global RNG is never used (tests
/// running in parallel cannot disturb each other's init).
pub fn init_parameters(vs: &nn::VarStore, seed: u64) {
    use rand::{Rng, SeedableRng};
    for (name, mut t) in vs.variables() {
        if name.contains("norm") || name.ends_with(".bias") {
            continue;
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(sluice_core::fnv1a(name.as_bytes()));
        let n = t.numel();
        let mut values = Vec::with_capacity(n + 1);
        while values.len() < n {
            // Box-Muller: two standard normals from two uniforms in (0, 1].
            let (u1, u2): (f64, f64) = (1.0 - rng.gen::<f64>(), rng.gen::<f64>());
            let r = (-2.0 * u1.ln()).sqrt() * 0.02;
            let (s, c) = (2.0 * std::f64::consts::PI * u2).sin_cos();
            values.push((r * c) as f32);
            values.push((r * s) as f32);
        }
        values.truncate(n);
        let host = Tensor::from_slice(&values).reshape(t.size()).to_kind(t.kind()).to_device(t.device());
        tch::no_grad(|| t.copy_(&host));
    }
}

/// The decoder: `model.*` tensors plus the optional untied `lm_head`.
#[derive(Debug)]
pub struct Model {
    embed_tokens: nn::Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Option<nn::Linear>,
    /// Rotary inverse frequencies `[head_dim / 2]`, fp32 on the model's device.
    inv_freq: Tensor,
    config: ModelConfig,
}

impl Model {
    /// Builds the parameters under `vs`: norms 1, biases 0, every other weight 0
    /// until [`init_parameters`] draws it or a checkpoint is copied in. Nothing
    /// here touches libtorch's global RNG.
    pub fn new(vs: &nn::Path, config: &ModelConfig) -> Self {
        let m = vs / "model";
        let emb_cfg = nn::EmbeddingConfig { ws_init: nn::Init::Const(0.0), ..Default::default() };
        let embed_tokens = nn::embedding(&m / "embed_tokens", config.vocab_size, config.hidden_size, emb_cfg);
        let layers = (0..config.num_hidden_layers).map(|i| DecoderLayer::new(&m / "layers" / i, config)).collect();
        let norm = RmsNorm::new(&m / "norm", config.hidden_size, config.rms_norm_eps);
        let lm_head = (!config.tie_word_embeddings)
            .then(|| linear(vs / "lm_head", config.hidden_size, config.vocab_size, false));
        let inv_freq: Vec<f32> =
            config.rope_scaling.inv_freq(config.head_dim, config.rope_theta).into_iter().map(|f| f as f32).collect();
        let inv_freq = Tensor::from_slice(&inv_freq).to_device(vs.device());
        Model { embed_tokens, layers, norm, lm_head, inv_freq, config: config.clone() }
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }
    /// Device of the parameters.
    pub fn device(&self) -> Device {
        self.embed_tokens.ws.device()
    }
    /// Dtype of the parameters.
    pub fn kind(&self) -> Kind {
        self.embed_tokens.ws.kind()
    }

    /// Final hidden states `[B, T, D]`.
    ///
    /// * `positions` `[B, T]`: rotary positions of the input tokens.
    /// * `mask`: boolean `[B, 1, T, K]` (true = may attend), or `None` for a plain
    ///   causal mask over an unpadded / right-padded batch without cache.
    /// * `cache`: when given, keys/values are written at `cache.len()` and the
    ///   cache advances by `T`.
    ///
    /// A sliding window (Mistral) is laid over the mask by index in the batch
    /// (cache slot), as `transformers` does.
    pub fn hidden(&self, input_ids: &Tensor, positions: &Tensor, mask: Option<&Tensor>, cache: Option<&mut KvCache>) -> Tensor {
        let t = input_ids.size()[1];
        let offset = cache.as_deref().map_or(0, |c| c.len);
        let windowed = self.windowed(mask, t, offset, input_ids.device());
        let mask = windowed.as_ref().or(mask);
        let mut xs = self.embed_tokens.forward(input_ids);
        let rope = Rotary::new(positions, &self.inv_freq, xs.kind());
        for (i, layer) in self.layers.iter().enumerate() {
            let lc = cache.as_deref().map(|c| LayerCache { k: &c.k[i], v: &c.v[i], offset: c.len });
            xs = layer.forward(&xs, &rope, mask, lc);
        }
        if let Some(c) = cache {
            c.len += t;
        }
        self.norm.forward(&xs)
    }

    /// `mask` with the sliding window laid over it, when the window is shorter
    /// than the `offset + t` keys (`None`: `mask` applies as it is).
    fn windowed(&self, mask: Option<&Tensor>, t: i64, offset: i64, device: Device) -> Option<Tensor> {
        self.config.sliding_window.filter(|w| offset + t > *w).map(|w| {
            let q = Tensor::arange_start(offset, offset + t, (Kind::Int64, device)).view([t, 1]);
            let k = Tensor::arange(offset + t, (Kind::Int64, device)).view([1, offset + t]);
            let window = k.le_tensor(&q).logical_and(&k.gt_tensor(&(&q - w))).view([1, 1, t, offset + t]);
            match mask {
                Some(m) => m.logical_and(&window),
                None => window,
            }
        })
    }

    /// [`Model::hidden`] of an unpadded or right-padded batch (causal mask, no
    /// cache) with activation checkpointing per decoder layer: the forward pass
    /// runs without a graph and keeps only each layer's input `[B, T, D]`;
    /// [`LayerCheckpoints::backward`] recomputes one layer at a time with a
    /// graph. The returned hidden states carry no graph.
    pub fn hidden_checkpointed(&self, input_ids: &Tensor, positions: &Tensor) -> (Tensor, LayerCheckpoints) {
        tch::no_grad(|| {
            let mut xs = self.embed_tokens.forward(input_ids);
            let rope = Rotary::new(positions, &self.inv_freq, xs.kind());
            let mask = self.windowed(None, input_ids.size()[1], 0, input_ids.device());
            let mut inputs = Vec::with_capacity(self.layers.len() + 1);
            for layer in &self.layers {
                let next = layer.forward(&xs, &rope, mask.as_ref(), None);
                inputs.push(xs);
                xs = next;
            }
            let out = self.norm.forward(&xs);
            inputs.push(xs);
            let ck = LayerCheckpoints { input_ids: input_ids.shallow_clone(), positions: positions.shallow_clone(), mask, inputs };
            (out, ck)
        })
    }

    /// Vocabulary logits for hidden states `[.., D]` → `[.., V]`, in the parameter dtype.
    pub fn logits(&self, hidden: &Tensor) -> Tensor {
        match &self.lm_head {
            Some(head) => head.forward(hidden),
            None => hidden.matmul(&self.embed_tokens.ws.tr()),
        }
    }

    /// Logits of an unpadded or right-padded batch `[B, T]` with positions `0..T`.
    pub fn forward(&self, input_ids: &Tensor) -> Tensor {
        let (b, t) = input_ids.size2().expect("input_ids is [B, T]");
        let positions = Tensor::arange(t, (Kind::Int64, input_ids.device())).unsqueeze(0).expand([b, t], false);
        self.logits(&self.hidden(input_ids, &positions, None, None))
    }
}

/// What [`Model::hidden_checkpointed`] kept: the token ids, positions and mask,
/// and the input of each decoder layer plus the final norm's (`L + 1` tensors
/// `[B, T, D]`), in place of every activation autograd would hold.
#[derive(Debug)]
pub struct LayerCheckpoints {
    input_ids: Tensor,
    positions: Tensor,
    mask: Option<Tensor>,
    inputs: Vec<Tensor>,
}

impl LayerCheckpoints {
    /// Back-propagates `grad` (the loss's gradient with respect to the hidden
    /// states `hidden_checkpointed` returned) into `model`'s parameters, from
    /// the final norm down to the embeddings, one recomputed layer at a time;
    /// each layer's graph and checkpoint are freed before the next. The
    /// gradients are those of [`Model::hidden`] with a graph.
    pub fn backward(mut self, model: &Model, grad: &Tensor) {
        let rope = Rotary::new(&self.positions, &model.inv_freq, model.kind());
        let through = |x: Tensor, g: &Tensor, f: &dyn Fn(&Tensor) -> Tensor| -> Tensor {
            let x = x.detach().set_requires_grad(true);
            (f(&x).to_kind(Kind::Float) * g.to_kind(Kind::Float)).sum(Kind::Float).backward();
            x.grad()
        };
        let last = self.inputs.pop().expect("the final norm's input is kept");
        let mut g = through(last, grad, &|x| model.norm.forward(x));
        for (layer, x) in model.layers.iter().zip(std::mem::take(&mut self.inputs)).rev() {
            g = through(x, &g, &|x| layer.forward(x, &rope, self.mask.as_ref(), None));
        }
        let emb = model.embed_tokens.forward(&self.input_ids);
        (emb.to_kind(Kind::Float) * g.to_kind(Kind::Float)).sum(Kind::Float).backward();
    }
}

/// Log-probabilities (fp32) of `targets` under `logits / temperature`.
/// `logits` `[.., V]`, `targets` `[..]` int64 → `[..]`.
pub fn token_logprobs(logits: &Tensor, targets: &Tensor, temperature: f64) -> Tensor {
    let scaled = if temperature > 0.0 && temperature != 1.0 {
        logits.to_kind(Kind::Float) / temperature
    } else {
        logits.to_kind(Kind::Float)
    };
    scaled.log_softmax(-1, Kind::Float).gather(-1, &targets.unsqueeze(-1), false).squeeze_dim(-1)
}
