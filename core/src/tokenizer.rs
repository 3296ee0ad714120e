//! Text ↔ token ids through the `tokenizers` crate (`tokenizer.json`).
//!
//! Real checkpoints bring their own `tokenizer.json`. Random-init presets use a
//! character-level tokenizer built by [`Tokenizer::char_level`], written out as an
//! ordinary `tokenizer.json` (BPE with no merges), so both take the same code path.

use std::path::Path;

use serde_json::{json, Map, Value};

use crate::chat::{ChatTemplate, Message};
use crate::config::PromptConfig;
use crate::error::{Error, Result};
use crate::tasks::Problem;

/// Special tokens of the character-level tokenizer, in id order.
pub const PAD: &str = "<pad>";
pub const EOS: &str = "<eos>";
pub const UNK: &str = "<unk>";

/// Characters of the default character-level vocabulary: enough for the
/// arithmetic, Countdown and JSONL example tasks.
pub const DEFAULT_ALPHABET: &str =
    "0123456789+-*/()=<>.,:;?! abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ[]_'\"\n";

/// How a problem becomes the prompt text.
#[derive(Debug, Clone, PartialEq)]
enum PromptFormat {
    /// The prompt as written, through the tokenizer's post-processor (BOS where it adds one).
    Raw,
    /// The messages rendered with the chat template, generation prompt opened.
    Chat { system: Option<String>, vars: Map<String, Value> },
}

/// A checkpoint's text interface: `tokenizer.json`, plus what
/// `tokenizer_config.json` and `generation_config.json` say about special
/// tokens, the chat template and the tokens that end a response.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    eos_id: i64,
    pad_id: i64,
    bos_id: Option<i64>,
    /// `add_bos_token` of `tokenizer_config.json`, when it says.
    add_bos: Option<bool>,
    /// Every id that ends a response, `eos_id` first.
    stop_ids: Vec<i64>,
    chat: Option<ChatTemplate>,
    /// `tokenizer_config.json` as found, without its chat template (written back on save).
    config: Map<String, Value>,
    prompt: PromptFormat,
    /// Where it was loaded from, for errors.
    origin: String,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("eos_id", &self.eos_id)
            .field("stop_ids", &self.stop_ids)
            .field("chat", &self.chat.is_some())
            .finish()
    }
}

/// A special token as `tokenizer_config.json` writes it: a string or `{"content": …}`.
fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

/// `eos_token_id` of `config.json` / `generation_config.json`: an id or a list of ids.
pub fn token_ids(v: Option<&Value>) -> Vec<i64> {
    match v {
        Some(Value::Number(n)) => n.as_i64().into_iter().collect(),
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_i64).collect(),
        _ => vec![],
    }
}

fn read_json(path: &Path) -> Result<Option<Map<String, Value>>> {
    match std::fs::read_to_string(path) {
        Ok(text) => match serde_json::from_str(&text) {
            Ok(Value::Object(m)) => Ok(Some(m)),
            Ok(_) => Err(Error::Tokenizer(format!("{}: not a JSON object", path.display()))),
            Err(e) => Err(Error::Tokenizer(format!("{}: {e}", path.display()))),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(path, e)),
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json` alone. The end-of-sequence token is `eos_token_id`
    /// when given, else the first of `<eos>`, `<|endoftext|>`, `</s>`,
    /// `<|im_end|>` that exists.
    pub fn from_file(path: &Path, eos_id: Option<i64>) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        Self::wrap(inner, eos_id.into_iter().collect(), Map::new(), None, path.display().to_string())
    }

    /// Loads a checkpoint directory: `tokenizer.json`, and when present
    /// `tokenizer_config.json` (special tokens, `add_bos_token`, `chat_template`),
    /// `chat_template.jinja` and `generation_config.json` (`eos_token_id`).
    /// `model_eos` are the ids `config.json` lists; every one of them, those of
    /// `generation_config.json` and the tokenizer's `eos_token` end a response.
    pub fn from_dir(dir: &Path, model_eos: &[i64]) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let mut config = read_json(&cfg_path)?.unwrap_or_default();
        let mut stops = model_eos.to_vec();
        if let Some(gen) = read_json(&dir.join("generation_config.json"))? {
            stops.extend(token_ids(gen.get("eos_token_id")));
        }
        let template = match config.remove("chat_template") {
            Some(Value::String(t)) => Some((t, cfg_path.display().to_string())),
            // A list of named templates: the `default` one.
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template").and_then(Value::as_str))
                .map(|t| (t.to_string(), format!("{} (default)", cfg_path.display()))),
            _ => {
                let file = dir.join("chat_template.jinja");
                match std::fs::read_to_string(&file) {
                    Ok(t) => Some((t, file.display().to_string())),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                    Err(e) => return Err(Error::io(&file, e)),
                }
            }
        };
        Self::wrap(inner, stops, config, template, dir.display().to_string())
    }

    fn wrap(
        inner: tokenizers::Tokenizer,
        eos_ids: Vec<i64>,
        config: Map<String, Value>,
        template: Option<(String, String)>,
        origin: String,
    ) -> Result<Self> {
        let id_of = |t: &str| inner.token_to_id(t).map(i64::from);
        let find = |names: &[&str]| names.iter().find_map(|n| id_of(n));
        let eos_token = token_text(config.get("eos_token"));
        let eos_id = eos_ids
            .first()
            .copied()
            .or_else(|| eos_token.as_deref().and_then(id_of))
            .or_else(|| find(&[EOS, "<|endoftext|>", "</s>", "<|im_end|>"]))
            .ok_or_else(|| Error::Tokenizer(format!("{origin}: no end-of-sequence token found")))?;
        let mut stop_ids = vec![eos_id];
        for id in eos_ids.into_iter().chain(eos_token.as_deref().and_then(id_of)) {
            if !stop_ids.contains(&id) {
                stop_ids.push(id);
            }
        }
        let pad_id = token_text(config.get("pad_token")).as_deref().and_then(id_of).or_else(|| find(&[PAD, "<|endoftext|>"])).unwrap_or(eos_id);
        let bos_token = token_text(config.get("bos_token"));
        let bos_id = bos_token.as_deref().and_then(id_of);
        let add_bos = config.get("add_bos_token").and_then(Value::as_bool);
        let chat = template
            .map(|(source, origin)| ChatTemplate::new(&source, &origin, bos_token, eos_token))
            .transpose()?;
        Ok(Tokenizer { inner, eos_id, pad_id, bos_id, add_bos, stop_ids, chat, config, prompt: PromptFormat::Raw, origin })
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

    /// A character-level tokenizer over `alphabet` (no chat template).
    pub fn char_level(alphabet: &str) -> Result<Self> {
        let text = Self::char_level_json(alphabet).to_string();
        let inner = tokenizers::Tokenizer::from_bytes(text.as_bytes()).map_err(|e| Error::Tokenizer(e.to_string()))?;
        let config = json!({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "pad_token": PAD,
            "unk_token": UNK, "clean_up_tokenization_spaces": false});
        let Value::Object(config) = config else { unreachable!("a JSON object literal") };
        Self::wrap(inner, vec![], config, None, "the character-level tokenizer".into())
    }

    /// Writes `tokenizer.json` alone to `path`.
    pub fn save(&self, path: &Path) -> Result<()> {
        self.inner.save(path, false).map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))
    }

    /// Writes `tokenizer.json`, `tokenizer_config.json` (with the chat template)
    /// and `generation_config.json` (every stop id as `eos_token_id`) into `dir`,
    /// so that `transformers` reloads the same template and stops at the same tokens.
    pub fn save_dir(&self, dir: &Path) -> Result<()> {
        self.save(&dir.join("tokenizer.json"))?;
        let mut config = self.config.clone();
        if let Some(chat) = &self.chat {
            config.insert("chat_template".into(), chat.source().into());
        }
        let text = |id: i64| u32::try_from(id).ok().and_then(|i| self.inner.id_to_token(i));
        if !config.contains_key("eos_token") {
            config.insert("eos_token".into(), text(self.eos_id).into());
        }
        if !config.contains_key("pad_token") {
            config.insert("pad_token".into(), text(self.pad_id).into());
        }
        config.entry("tokenizer_class").or_insert_with(|| "PreTrainedTokenizerFast".into());
        let eos = if self.stop_ids.len() == 1 { json!(self.eos_id) } else { json!(self.stop_ids) };
        let gen = json!({"bos_token_id": self.bos_id, "eos_token_id": eos, "pad_token_id": self.pad_id});
        for (name, v) in [("tokenizer_config.json", Value::Object(config)), ("generation_config.json", gen)] {
            let path = dir.join(name);
            let text = serde_json::to_string_pretty(&v).expect("json value serialises");
            std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
        }
        Ok(())
    }

    /// Ids of `text` as written: no special tokens added (responses, observations).
    pub fn encode(&self, text: &str) -> Result<Vec<i64>> {
        self.encode_with(text, false)
    }

    fn encode_with(&self, text: &str, special: bool) -> Result<Vec<i64>> {
        let enc = self.inner.encode(text, special).map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().iter().map(|&i| i64::from(i)).collect())
    }

    /// Ids of a raw prompt the way `transformers` tokenizes one: through the
    /// post-processor (Llama 3's adds `<|begin_of_text|>`), with BOS added or
    /// dropped as `add_bos_token` says.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<i64>> {
        let mut ids = self.encode_with(text, true)?;
        if let Some(bos) = self.bos_id {
            match self.add_bos {
                Some(true) if ids.first() != Some(&bos) => ids.insert(0, bos),
                // Only a BOS the post-processor added (the text may start with one itself).
                Some(false) if ids.first() == Some(&bos) && ids.len() > self.encode(text)?.len() => {
                    ids.remove(0);
                }
                _ => {}
            }
        }
        Ok(ids)
    }

    /// Sets how problems become prompts (`[prompt]` of the job). Chat needs a
    /// template: asking for it on a tokenizer without one is an error naming
    /// `prompt.chat`; left unset, chat is used exactly when there is a template.
    pub fn set_prompt(&mut self, cfg: &PromptConfig) -> Result<()> {
        let chat = match (cfg.chat, &self.chat) {
            (Some(true), None) => {
                return Err(Error::config(
                    "prompt.chat",
                    format!("{} has no chat template (tokenizer_config.json `chat_template` or chat_template.jinja)", self.origin),
                ))
            }
            (Some(on), _) => on,
            (None, t) => t.is_some(),
        };
        if !chat && (cfg.system.is_some() || !cfg.template_vars.is_empty()) {
            return Err(Error::config("prompt.system", "a system prompt and template variables need chat prompts"));
        }
        self.prompt = if chat {
            PromptFormat::Chat { system: cfg.system.clone(), vars: cfg.template_vars.clone() }
        } else {
            PromptFormat::Raw
        };
        Ok(())
    }

    /// True when problems are rendered with the chat template.
    pub fn chat_prompts(&self) -> bool {
        matches!(self.prompt, PromptFormat::Chat { .. })
    }

    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat.as_ref()
    }

    /// The prompt text of `problem`: its messages (or its prompt as one user
    /// turn, after the configured system turn) through the chat template with
    /// the assistant's turn opened, or the raw prompt.
    pub fn render_problem(&self, problem: &Problem) -> Result<String> {
        match (&self.prompt, &self.chat) {
            (PromptFormat::Chat { system, vars }, Some(chat)) => {
                let mut messages = Vec::new();
                let given = if problem.messages.is_empty() {
                    vec![Message::new("user", problem.prompt.clone())]
                } else {
                    problem.messages.clone()
                };
                if let Some(system) = system.as_ref().filter(|_| given[0].role != "system") {
                    messages.push(Message::new("system", system.clone()));
                }
                messages.extend(given);
                chat.render(&messages, true, vars)
            }
            _ if !problem.messages.is_empty() => Err(Error::config(
                "prompt.chat",
                "the task gives chat messages; they need a tokenizer with a chat template and chat prompts",
            )),
            _ => Ok(problem.prompt.clone()),
        }
    }

    /// The prompt ids of `problem` (see [`Tokenizer::render_problem`]): a
    /// rendered chat holds its own special tokens, a raw prompt goes through
    /// [`Tokenizer::encode_prompt`].
    pub fn encode_problem(&self, problem: &Problem) -> Result<Vec<i64>> {
        let text = self.render_problem(problem)?;
        if self.chat_prompts() {
            self.encode(&text)
        } else {
            self.encode_prompt(&text)
        }
    }

    /// Every id that ends a response: the model's `eos_token_id` (all of a
    /// list), `generation_config.json`'s, and the tokenizer's `eos_token`.
    pub fn stop_ids(&self) -> &[i64] {
        &self.stop_ids
    }
    pub fn bos_id(&self) -> Option<i64> {
        self.bos_id
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
