//! Logits parity with Hugging Face `transformers` on the same weights.
//!
//! A Python helper (run with the project venv's interpreter, `SLUICE_PYTHON`)
//! builds tiny random models, saves them with `save_pretrained` and records
//! their logits; sluice loads the directory and must agree within 1e-4 (fp32).
//! `SLUICE_TEST_DEVICE=cuda` loads the sluice side on the GPU (the reference
//! stays on the CPU in fp32): the GPU check script runs this binary that way.

use std::path::Path;
use std::process::Command;

use serde_json::{json, Value};
use sluice_model::hf::Policy;
use sluice_model::Error;
use sluice_testkit::python;
use tch::{Device, Kind, Tensor};

/// Runs the reference script; returns (model dir, HF logits, their shape).
fn reference(dir: &Path, spec: &Value) -> (Vec<f32>, Vec<i64>) {
    // Where it was built, else relative to the working directory (the GPU check
    // carries this binary to another machine and runs it from the repository root).
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/hf_reference.py");
    let script = if built.exists() { built } else { Path::new("model/tests/hf_reference.py").to_path_buf() };
    let out = Command::new(python())
        .arg(&script)
        .arg(dir)
        .arg(spec.to_string())
        .env("HF_HUB_OFFLINE", "1")
        .env("TRANSFORMERS_VERBOSITY", "error")
        .output()
        .expect("python runs");
    assert!(out.status.success(), "hf_reference.py failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("logits.json")).unwrap()).unwrap();
    let logits = v["logits"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
    let shape = v["shape"].as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect();
    (logits, shape)
}

fn ids() -> Vec<Vec<i64>> {
    vec![vec![1, 5, 9, 2, 33, 17, 4, 8, 60, 3, 11, 7], vec![0, 44, 21, 21, 13, 50, 6, 90, 2, 2, 70, 19]]
}

/// The device the parity checks load sluice's side on (`SLUICE_TEST_DEVICE`).
fn test_device() -> Device {
    match std::env::var("SLUICE_TEST_DEVICE").as_deref() {
        Ok("cuda") => {
            assert!(tch::Cuda::is_available(), "SLUICE_TEST_DEVICE=cuda but libtorch sees no CUDA device");
            Device::Cuda(0)
        }
        Ok("cpu") | Err(_) => Device::Cpu,
        Ok(other) => panic!("SLUICE_TEST_DEVICE must be cpu or cuda, not {other:?}"),
    }
}

fn check(spec: Value, kind: Kind, tol: f64) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let (want, shape) = reference(dir.path(), &spec);
    let device = test_device();
    let policy = Policy::load(dir.path(), device, kind).unwrap();
    let input = Tensor::from_slice(&ids().concat()).view([2, 12]).to_device(device);
    let got = tch::no_grad(|| policy.model().forward(&input)).to_kind(Kind::Float).to_device(Device::Cpu);
    assert_eq!(got.size(), shape);
    let want = Tensor::from_slice(&want).view(shape.as_slice());
    let diff = (&got - &want).abs().max().double_value(&[]);
    let scale = want.abs().max().double_value(&[]);
    assert!(diff <= tol, "{spec}: max |logit diff| {diff:e} > {tol:e} (logits up to {scale:.2})");
    eprintln!("parity {} on {device:?} ({kind:?}): max |diff| = {diff:.2e} (logit scale {scale:.2})", spec["name"]);
    diff
}

#[test]
fn qwen2_gqa_tied_embeddings_matches_transformers() {
    check(
        json!({"name": "qwen2-gqa-tied", "arch": "qwen2", "seed": 1, "ids": ids(), "config": {
            "vocab_size": 97, "hidden_size": 64, "intermediate_size": 112, "num_hidden_layers": 2,
            "num_attention_heads": 8, "num_key_value_heads": 2, "tie_word_embeddings": true,
            "max_position_embeddings": 128, "rms_norm_eps": 1e-6}}),
        Kind::Float,
        1e-4,
    );
}

#[test]
fn qwen2_untied_mqa_rope_theta_1e6_matches_transformers() {
    check(
        json!({"name": "qwen2-mqa-untied-theta1e6", "arch": "qwen2", "seed": 2, "ids": ids(), "config": {
            "vocab_size": 101, "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 3,
            "num_attention_heads": 4, "num_key_value_heads": 1, "tie_word_embeddings": false,
            "rope_theta": 1000000.0, "max_position_embeddings": 128, "rms_norm_eps": 1e-5}}),
        Kind::Float,
        1e-4,
    );
}

#[test]
fn llama_untied_attention_bias_explicit_head_dim_matches_transformers() {
    check(
        json!({"name": "llama-bias-headdim", "arch": "llama", "seed": 3, "ids": ids(), "config": {
            "vocab_size": 113, "hidden_size": 48, "intermediate_size": 80, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "attention_bias": true,
            "tie_word_embeddings": false, "rope_theta": 500000.0, "max_position_embeddings": 128}}),
        Kind::Float,
        1e-4,
    );
}

#[test]
fn llama3_rope_scaling_matches_transformers_and_matters() {
    // Llama 3.1's frequency rescaling with a small original context (16), so that
    // positions 0..12 span the low, blended and high frequency bands of head_dim 16.
    let spec = json!({"name": "llama3-rope", "arch": "llama", "seed": 6, "ids": ids(), "config": {
        "vocab_size": 97, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": true,
        "max_position_embeddings": 128, "rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0,
            "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16}}});
    check(spec.clone(), Kind::Float, 1e-4);
    // The same weights without the scaling give other logits: the test sees it.
    let dir = tempfile::tempdir().unwrap();
    let (want, shape) = reference(dir.path(), &spec);
    let path = dir.path().join("config.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(cfg["rope_parameters"]["rope_type"], "llama3", "{cfg}");
    cfg["rope_parameters"] = json!({"rope_type": "default", "rope_theta": 10000.0});
    std::fs::write(&path, cfg.to_string()).unwrap();
    let plain = Policy::load(dir.path(), Device::Cpu, Kind::Float).unwrap();
    let got = tch::no_grad(|| plain.model().forward(&Tensor::from_slice(&ids().concat()).view([2, 12])));
    let diff = (got - Tensor::from_slice(&want).view(shape.as_slice())).abs().max().double_value(&[]);
    assert!(diff > 1e-2, "unscaled rope gave the same logits (max diff {diff:e})");
    // Older files spell it `rope_scaling` next to `rope_theta`; an unknown type names the field.
    cfg["rope_parameters"] = Value::Null;
    cfg["rope_scaling"] = json!({"rope_type": "yarn", "factor": 4.0});
    std::fs::write(&path, cfg.to_string()).unwrap();
    let e = Policy::load(dir.path(), Device::Cpu, Kind::Float).unwrap_err().to_string();
    assert!(e.contains("rope_scaling.rope_type") && e.contains("yarn") && e.contains("llama3"), "{e}");
}

#[test]
fn qwen3_qk_norm_untied_matches_transformers() {
    check(
        json!({"name": "qwen3-qknorm", "arch": "qwen3", "seed": 7, "ids": ids(), "config": {
            "vocab_size": 103, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "tie_word_embeddings": false,
            "rope_theta": 1000000.0, "max_position_embeddings": 128, "rms_norm_eps": 1e-6}}),
        Kind::Float,
        1e-4,
    );
}

#[test]
fn mistral_sliding_window_matches_transformers() {
    // A window of 5 over 12 tokens: positions 5.. no longer see the start.
    check(
        json!({"name": "mistral-window5", "arch": "mistral", "seed": 8, "ids": ids(), "config": {
            "vocab_size": 91, "hidden_size": 64, "intermediate_size": 112, "num_hidden_layers": 2,
            "num_attention_heads": 8, "num_key_value_heads": 2, "tie_word_embeddings": false,
            "sliding_window": 5, "max_position_embeddings": 128, "rms_norm_eps": 1e-5}}),
        Kind::Float,
        1e-4,
    );
}

#[test]
fn bf16_weights_match_transformers_bf16_loosely() {
    // bf16 keeps 8 bits of mantissa; both sides round differently inside matmuls.
    // Documented tolerance: 0.1 absolute on logits of scale ~3-5.
    check(
        json!({"name": "qwen2-bf16", "arch": "qwen2", "seed": 4, "ids": ids(), "dtype": "bfloat16", "config": {
            "vocab_size": 97, "hidden_size": 64, "intermediate_size": 112, "num_hidden_layers": 2,
            "num_attention_heads": 8, "num_key_value_heads": 2, "tie_word_embeddings": true,
            "max_position_embeddings": 128}}),
        Kind::BFloat16,
        0.1,
    );
}

#[test]
fn save_then_load_round_trips_and_bad_checkpoints_name_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let spec = json!({"name": "roundtrip", "arch": "qwen2", "seed": 5, "ids": ids(), "config": {
        "vocab_size": 97, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": true,
        "max_position_embeddings": 64}});
    reference(dir.path(), &spec);
    let a = Policy::load(dir.path(), Device::Cpu, Kind::Float).unwrap();
    let again = tempfile::tempdir().unwrap();
    a.save(again.path()).unwrap();
    let b = Policy::load(again.path(), Device::Cpu, Kind::Float).unwrap();
    assert_eq!(a.config(), b.config());
    for ((na, ta), (nb, tb)) in a.named_parameters().iter().zip(b.named_parameters()) {
        assert_eq!(na, &nb);
        assert!(ta.equal(&tb), "{na} changed in the round trip");
    }

    // A tensor with the wrong shape: the error names it and both shapes.
    let named = a.named_parameters();
    let broken: Vec<(String, Tensor)> = named
        .iter()
        .map(|(n, t)| if n == "model.layers.0.mlp.up_proj.weight" { (n.clone(), t.narrow(0, 0, 10)) } else { (n.clone(), t.shallow_clone()) })
        .collect();
    Tensor::write_safetensors(&broken, again.path().join("model.safetensors")).unwrap();
    match Policy::load(again.path(), Device::Cpu, Kind::Float) {
        Err(Error::ShapeMismatch { name, expected, found, .. }) => {
            assert_eq!(name, "model.layers.0.mlp.up_proj.weight");
            assert_eq!((expected, found), (vec![64, 32], vec![10, 32]));
        }
        other => panic!("expected a shape error, got {other:?}"),
    }
    // A missing tensor.
    let missing: Vec<(String, Tensor)> = named.iter().filter(|(n, _)| n != "model.norm.weight").map(|(n, t)| (n.clone(), t.shallow_clone())).collect();
    Tensor::write_safetensors(&missing, again.path().join("model.safetensors")).unwrap();
    let e = Policy::load(again.path(), Device::Cpu, Kind::Float).unwrap_err().to_string();
    assert!(e.contains("model.norm.weight") && e.contains("missing"), "{e}");
    // An unknown architecture names the field.
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(again.path().join("config.json")).unwrap()).unwrap();
    cfg["model_type"] = json!("mamba");
    std::fs::write(again.path().join("config.json"), cfg.to_string()).unwrap();
    let e = Policy::load(again.path(), Device::Cpu, Kind::Float).unwrap_err().to_string();
    assert!(e.contains("model_type") && e.contains("mamba"), "{e}");
}
