//! Text ↔ token ids through the `tokenizers` crate (`tokenizer.json`).
//!
//! Real checkpoints bring their own `tokenizer.json`. Random-init presets use a
//! character-level tokenizer built by [`Tokenizer::char_level`], written out as an
//! ordinary `tokenizer.json` (BPE with no merges), so both take the same code path.

use std::path::Path;

use serde_json::{json, Value};

use crate::error::{Error, Result};

/// Special tokens of the character-level tokenizer, in id order.
pub const PAD: &str = "<pad>";
pub const EOS: &str = "<eos>";
pub const UNK: &str = "<unk>";

/// Characters of the default character-level vocabulary: enough for the
/// arithmetic, Countdown and JSONL example tasks.
pub const DEFAULT_ALPHABET: &str =
    "0123456789+-*/()=<>.,:;?! abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ[]_'\"\n";

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    eos_id: i64,
    pad_id: i64,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer").field("vocab_size", &self.vocab_size()).field("eos_id", &self.eos_id).finish()
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json`. The end-of-sequence token is `eos_token_id` from the
    /// model config when given, else the first of `<eos>`, `<|endoftext|>`, `</s>`,
    /// `<|im_end|>` that exists.
    pub fn from_file(path: &Path, eos_id: Option<i64>) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        Self::wrap(inner, eos_id)
    }

    fn wrap(inner: tokenizers::Tokenizer, eos_id: Option<i64>) -> Result<Self> {
        let find = |names: &[&str]| names.iter().find_map(|n| inner.token_to_id(n)).map(i64::from);
        let eos_id = eos_id
            .or_else(|| find(&[EOS, "<|endoftext|>", "</s>", "<|im_end|>"]))
            .ok_or_else(|| Error::Tokenizer("no end-of-sequence token found".into()))?;
        let pad_id = find(&[PAD, "<|endoftext|>"]).unwrap_or(eos_id);
        Ok(Tokenizer { inner, eos_id, pad_id })
    }

    /// The `tokenizer.json` of a character-level tokenizer: ids 0..3 are `<pad>`,
    /// `<eos>`, `<unk>`, then one id per character of `alphabet`.
    pub fn char_level_json(alphabet: &str) -> Value {
        let mut vocab = serde_json::Map::new();
        let mut added = Vec::new();
        for (i, s) in [PAD, EOS, UNK].iter().enumerate() {
            vocab.insert((*s).to_string(), json!(i));
            added.push(json!({"id": i, "content": s, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true}));
        }
        for c in alphabet.chars() {
            let n = vocab.len();
            vocab.entry(c.to_string()).or_insert(json!(n));
        }
        json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": null,
            "post_processor": null,
            "decoder": {"type": "Fuse"},
            "model": {"type": "BPE", "dropout": null, "unk_token": UNK, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab, "merges": []}
        })
    }

    /// A character-level tokenizer over `alphabet`.
    pub fn char_level(alphabet: &str) -> Result<Self> {
        let text = Self::char_level_json(alphabet).to_string();
        let inner = tokenizers::Tokenizer::from_bytes(text.as_bytes()).map_err(|e| Error::Tokenizer(e.to_string()))?;
        Self::wrap(inner, None)
    }

    /// Writes `tokenizer.json` to `path`.
    pub fn save(&self, path: &Path) -> Result<()> {
        self.inner.save(path, false).map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))
    }

    pub fn encode(&self, text: &str) -> Result<Vec<i64>> {
        let enc = self.inner.encode(text, false).map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().iter().map(|&i| i64::from(i)).collect())
    }

    /// Decodes ids, dropping special tokens (so a trailing EOS vanishes).
    pub fn decode(&self, ids: &[i64]) -> Result<String> {
        let ids: Vec<u32> = ids.iter().map(|&i| u32::try_from(i).unwrap_or(u32::MAX)).collect();
        self.inner.decode(&ids, true).map_err(|e| Error::Tokenizer(e.to_string()))
    }

    pub fn vocab_size(&self) -> i64 {
        self.inner.get_vocab_size(true) as i64
    }
    pub fn eos_id(&self) -> i64 {
        self.eos_id
    }
    pub fn pad_id(&self) -> i64 {
        self.pad_id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn char_level_round_trip_and_file() {
        let tok = Tokenizer::char_level(DEFAULT_ALPHABET).unwrap();
        let ids = tok.encode("12+7=19").unwrap();
        assert_eq!(ids.len(), 7);
        assert!(ids.iter().all(|&i| i >= 3));
        let mut with_eos = ids.clone();
        with_eos.push(tok.eos_id());
        assert_eq!(tok.decode(&with_eos).unwrap(), "12+7=19");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        tok.save(&path).unwrap();
        let again = Tokenizer::from_file(&path, None).unwrap();
        assert_eq!(again.encode("a b?").unwrap(), tok.encode("a b?").unwrap());
        assert_eq!(again.vocab_size(), tok.vocab_size());
        assert_eq!((again.pad_id(), again.eos_id()), (0, 1));
    }
}
