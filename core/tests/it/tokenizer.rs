//! A real tokenizer: Qwen3's `tokenizer.json` (byte-level BPE, fetched by
//! `scripts/setup.sh` into `.tools/tokenizers/qwen3`) encodes exactly as the
//! Python `tokenizers` library does, decodes back, and finds its end token.

use std::path::{Path, PathBuf};
use std::process::Command;

use sluice_core::tokenizer::Tokenizer;

pub fn qwen3_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/tokenizers/qwen3");
    assert!(dir.join("tokenizer.json").exists(), "{} is missing: run ./scripts/setup.sh (it fetches it)", dir.display());
    dir
}

const TEXTS: &[&str] = &[
    "What is 17 * 23? Think step by step, then answer with #### and the number.",
    "  leading spaces,\ttabs and\n\nnewlines   ",
    "def f(x):\n    return x ** 2  # squares\n",
    "Ünïcödé, 中文文本, emoji 🙂🚀 and café",
    "1234567890 3.14159 -42 1e-5",
    "<|im_start|>user\nhi<|im_end|>\n",
    "",
];

#[test]
fn qwen3_tokenizer_matches_python_tokenizers() {
    let dir = qwen3_dir();
    let tok = Tokenizer::from_file(&dir.join("tokenizer.json"), None).unwrap();
    assert!(tok.vocab_size() >= 151_643, "vocabulary of {}", tok.vocab_size());
    let ours: Vec<Vec<i64>> = TEXTS.iter().map(|t| tok.encode(t).unwrap()).collect();
    let script = "import json, sys\nfrom tokenizers import Tokenizer\n\
        t = Tokenizer.from_file(sys.argv[1])\ntexts = json.loads(sys.stdin.read())\n\
        print(json.dumps([t.encode(s, add_special_tokens=False).ids for s in texts]))\n";
    let mut child = Command::new(sluice_testkit::python())
        .args(["-c", script])
        .arg(dir.join("tokenizer.json"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), serde_json::to_string(TEXTS).unwrap().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "python tokenizers failed");
    let theirs: Vec<Vec<i64>> = serde_json::from_slice(&out.stdout).unwrap();
    for ((text, a), b) in TEXTS.iter().zip(&ours).zip(&theirs) {
        assert_eq!(a, b, "ids differ for {text:?}");
    }
    // Byte-level BPE: decoding gives the text back (special tokens aside).
    for (text, ids) in TEXTS.iter().zip(&ours).take(5) {
        assert_eq!(&tok.decode(ids).unwrap(), text);
    }
    // Special tokens are single ids; the end token is one of them.
    assert_eq!(ours[5].iter().filter(|&&i| i >= 151_643).count(), 2, "{:?}", ours[5]);
    assert!(tok.eos_id() >= 151_643, "eos {}", tok.eos_id());
}
