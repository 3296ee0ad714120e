//! Chat templates and special tokens against `transformers`: the same rendered
//! text and token ids as `apply_chat_template`, the same prompt ids as calling
//! the tokenizer (BOS from the post-processor), and an exported directory that
//! `transformers` reloads with the same template and end-of-sequence ids.

use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::{json, Value};
use sluice_core::chat::Message;
use sluice_core::config::PromptConfig;
use sluice_core::tasks::{Problem, Verifier};
use sluice_core::tokenizer::Tokenizer;

use crate::tokenizer::qwen3_dir;

/// Asks `chat_reference.py` what transformers makes of `dir`.
fn reference(dir: &Path, chats: &[Value], prompts: &[&str]) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/chat_reference.py");
    let mut child = Command::new(sluice_testkit::python())
        .arg(&script)
        .env("HF_HUB_OFFLINE", "1")
        .env("TRANSFORMERS_VERBOSITY", "error")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let req = json!({"dir": dir, "chats": chats, "prompts": prompts});
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), req.to_string().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "chat_reference.py failed:\n{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn messages(v: &Value) -> Vec<Message> {
    serde_json::from_value(v["messages"].clone()).unwrap()
}

/// Renders every chat with sluice and compares text and ids with transformers.
fn assert_same_chats(tok: &Tokenizer, chats: &[Value], theirs: &Value) {
    let template = tok.chat_template().expect("a chat template");
    for (i, chat) in chats.iter().enumerate() {
        let vars = chat.get("vars").and_then(Value::as_object).cloned().unwrap_or_default();
        let add = chat["add_generation_prompt"].as_bool().unwrap();
        let text = template.render(&messages(chat), add, &vars).unwrap();
        assert_eq!(text, theirs["rendered"][i].as_str().unwrap(), "chat {i} renders differently");
        let ids = tok.encode(&text).unwrap();
        let want: Vec<i64> = serde_json::from_value(theirs["chat_ids"][i].clone()).unwrap();
        assert_eq!(ids, want, "chat {i} tokenizes differently");
    }
}

fn qwen3_chats() -> Vec<Value> {
    vec![
        json!({"messages": [{"role": "user", "content": "What is 17 * 23?"}], "add_generation_prompt": true}),
        json!({"messages": [
            {"role": "system", "content": "You are a careful math tutor."},
            {"role": "user", "content": "Natalia sold 48 clips in April. How many in May, half as many?"},
            {"role": "assistant", "content": "<think>\nHalf of 48 is 24.\n</think>\n\nShe sold 24 clips in May."},
            {"role": "user", "content": "And altogether?"}], "add_generation_prompt": true}),
        json!({"messages": [
            {"role": "user", "content": "Say hi"},
            {"role": "assistant", "content": "Hi! 🙂 中文"}], "add_generation_prompt": false}),
        json!({"messages": [{"role": "user", "content": "  spaces\n\nand lines  "}], "add_generation_prompt": true,
            "vars": {"enable_thinking": false}}),
    ]
}

#[test]
fn qwen3_chat_template_matches_transformers() {
    let dir = qwen3_dir();
    let tok = Tokenizer::from_dir(&dir, &[]).unwrap();
    let chats = qwen3_chats();
    let theirs = reference(&dir, &chats, &["plain prompt"]);
    assert_same_chats(&tok, &chats, &theirs);
    // Qwen3 has no BOS: a raw prompt is its text alone.
    let want: Vec<i64> = serde_json::from_value(theirs["prompt_ids"][0].clone()).unwrap();
    assert_eq!(tok.encode_prompt("plain prompt").unwrap(), want);
    // `<|im_end|>` (the tokenizer's eos_token) ends a response.
    let im_end = tok.encode("<|im_end|>").unwrap();
    assert!(tok.stop_ids().contains(&im_end[0]), "{:?} lacks {im_end:?}", tok.stop_ids());
}

/// A template written for a test model: BOS from `bos_token`, a system block,
/// several turns, EOS after each assistant turn, jinja2 filters and whitespace control.
const TEST_TEMPLATE: &str = "{{ bos_token }}
{%- for m in messages %}
    {%- if m.role == 'system' %}
<<SYS>>{{ m.content | trim }}<</SYS>>
    {% elif m.role == 'user' %}
[USER {{ loop.index0 // 2 + 1 }}] {{ m.content }}
    {% else %}
[{{ m.role | upper }}] {{ m.content }}{{ eos_token }}
    {% endif %}
{%- endfor %}
{%- if add_generation_prompt %}[ASSISTANT] {% endif %}";

/// Qwen3's tokenizer.json with a post-processor that puts `<|endoftext|>` first
/// (as Llama 3's puts `<|begin_of_text|>`), the test template, and a
/// `generation_config.json` listing two end ids.
fn bos_model_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut tj: Value = serde_json::from_str(&std::fs::read_to_string(qwen3_dir().join("tokenizer.json")).unwrap()).unwrap();
    let bos_id = tj["added_tokens"].as_array().unwrap().iter().find(|t| t["content"] == "<|endoftext|>").unwrap()["id"].clone();
    tj["post_processor"] = json!({"type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [bos_id], "tokens": ["<|endoftext|>"]}}});
    std::fs::write(dir.path().join("tokenizer.json"), tj.to_string()).unwrap();
    let cfg = json!({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>",
        "eos_token": {"__type": "AddedToken", "content": "<|im_end|>", "lstrip": false, "normalized": false, "rstrip": false, "single_word": false, "special": true}, "pad_token": "<|endoftext|>", "chat_template": TEST_TEMPLATE});
    std::fs::write(dir.path().join("tokenizer_config.json"), cfg.to_string()).unwrap();
    std::fs::write(dir.path().join("generation_config.json"), json!({"eos_token_id": [151645, 151643]}).to_string()).unwrap();
    dir
}

fn test_chats() -> Vec<Value> {
    vec![
        json!({"messages": [
            {"role": "system", "content": "  Answer with a number.  "},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "3+5?"}], "add_generation_prompt": true}),
        json!({"messages": [{"role": "user", "content": "only one turn"}], "add_generation_prompt": false}),
    ]
}

#[test]
fn a_written_template_with_bos_system_and_turns_matches_transformers() {
    let dir = bos_model_dir();
    let tok = Tokenizer::from_dir(dir.path(), &[]).unwrap();
    let chats = test_chats();
    let prompts = ["What is 6 * 7?", "<|endoftext|>already has one"];
    let theirs = reference(dir.path(), &chats, &prompts);
    assert_same_chats(&tok, &chats, &theirs);
    // A raw prompt gets the post-processor's BOS, exactly once.
    for (i, p) in prompts.iter().enumerate() {
        let want: Vec<i64> = serde_json::from_value(theirs["prompt_ids"][i].clone()).unwrap();
        assert_eq!(tok.encode_prompt(p).unwrap(), want, "prompt {p:?}");
    }
    assert_eq!(tok.bos_id(), Some(151_643));
    // Every id generation_config.json lists ends a response, the tokenizer's eos first.
    assert_eq!(tok.stop_ids(), &[151_645, 151_643]);

    // A plain prompt as one user turn after the configured system turn: the same
    // ids transformers gives for those messages.
    let mut tok = tok;
    tok.set_prompt(&PromptConfig { chat: None, system: Some("Answer with a number.".into()), template_vars: Default::default() })
        .unwrap();
    let problem = Problem { id: 0, prompt: "3+5?".into(), answer: "8".into(), verifier: Verifier::Numeric, messages: vec![] };
    let chat = json!({"messages": [{"role": "system", "content": "Answer with a number."}, {"role": "user", "content": "3+5?"}],
        "add_generation_prompt": true});
    let theirs = reference(dir.path(), std::slice::from_ref(&chat), &[]);
    let want: Vec<i64> = serde_json::from_value(theirs["chat_ids"][0].clone()).unwrap();
    assert_eq!(tok.encode_problem(&problem).unwrap(), want);
}

#[test]
fn an_exported_tokenizer_reloads_in_transformers_with_its_template_and_eos_ids() {
    let src = bos_model_dir();
    let tok = Tokenizer::from_dir(src.path(), &[]).unwrap();
    let out = tempfile::tempdir().unwrap();
    tok.save_dir(out.path()).unwrap();
    let chats = test_chats();
    let theirs = reference(out.path(), &chats, &["What is 6 * 7?"]);
    assert_same_chats(&tok, &chats, &theirs);
    assert_eq!(theirs["eos_token_id"], json!([151_645, 151_643]));
    let want: Vec<i64> = serde_json::from_value(theirs["prompt_ids"][0].clone()).unwrap();
    assert_eq!(tok.encode_prompt("What is 6 * 7?").unwrap(), want);
    // And sluice reads back what it wrote.
    let again = Tokenizer::from_dir(out.path(), &[]).unwrap();
    assert_eq!(again.stop_ids(), tok.stop_ids());
    assert_eq!(again.chat_template().unwrap().source(), TEST_TEMPLATE);
}

#[test]
fn chat_problems_without_a_template_are_errors_that_name_the_field() {
    let mut tok = Tokenizer::char_level(sluice_core::tokenizer::DEFAULT_ALPHABET).unwrap();
    let e = tok.set_prompt(&PromptConfig { chat: Some(true), ..Default::default() }).unwrap_err().to_string();
    assert!(e.contains("prompt.chat") && e.contains("no chat template"), "{e}");
    // Left unset: raw prompts; a task that gives messages then cannot be rendered.
    tok.set_prompt(&PromptConfig::default()).unwrap();
    assert!(!tok.chat_prompts());
    let p = Problem { id: 0, prompt: "hi".into(), answer: "x".into(), verifier: Verifier::Exact, messages: vec![Message::new("user", "hi")] };
    let e = tok.encode_problem(&p).unwrap_err().to_string();
    assert!(e.contains("prompt.chat"), "{e}");
    // A template that fails while rendering names where it came from.
    let dir = bos_model_dir();
    let cfg_path = dir.path().join("tokenizer_config.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["chat_template"] = json!("{% if messages[0].role != 'system' %}{{ raise_exception('a system turn comes first') }}{% endif %}");
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let mut tok = Tokenizer::from_dir(dir.path(), &[]).unwrap();
    tok.set_prompt(&PromptConfig::default()).unwrap();
    assert!(tok.chat_prompts(), "a template turns chat on by default");
    let e = tok.encode_problem(&p).unwrap_err().to_string();
    assert!(e.contains("tokenizer_config.json") && e.contains("a system turn comes first"), "{e}");
}
