//! `sluice generate`: completions from a checkpoint, its prompts rendered with
//! the chat template as in training. Prompts come from `--prompt`, a prompt
//! file (plain lines, or JSON lines with `prompt` or `messages`), standard input,
//! or an interactive chat when standard input is a terminal.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};
use sluice_core::chat::Message;
use sluice_core::config::{JobConfig, ModelSection, PromptConfig};
use sluice_core::sampling::SamplingParams;
use sluice_core::tasks::{Problem, Verifier};
use sluice_core::tokenizer::Tokenizer;
use sluice_model::collect::{complete, Sample};
use sluice_model::hf::{load_policy, Policy};

/// Prompts generated per batch.
const BATCH: usize = 32;

/// `sluice generate`'s arguments.
#[derive(Debug, clap::Args)]
pub struct GenerateOptions {
    /// A Hugging Face model directory (e.g. runs/x/checkpoints/step-00000100),
    /// or a job file: its model, `[prompt]` and `[sampling]` settings.
    pub source: PathBuf,
    /// A prompt (repeatable). Without prompts and without --prompt-file, prompts
    /// are read from standard input, or asked for interactively on a terminal.
    #[arg(long = "prompt", short = 'p', value_name = "TEXT")]
    pub prompts: Vec<String>,
    /// One prompt per line: plain text, or JSON with "prompt" or "messages"
    /// ([{"role": "user", "content": "…"}, …]).
    #[arg(long, value_name = "FILE")]
    pub prompt_file: Option<PathBuf>,
    /// A system turn before every prompt (chat prompts only).
    #[arg(long)]
    pub system: Option<String>,
    /// Send prompts as they are, without the chat template.
    #[arg(long)]
    pub raw: bool,
    /// Tokens per completion (default: the job's, or 256 for a directory).
    #[arg(long)]
    pub max_new_tokens: Option<i64>,
    /// 0 is greedy (default: the job's, or 0.7 for a directory).
    #[arg(long)]
    pub temperature: Option<f64>,
    #[arg(long)]
    pub top_p: Option<f64>,
    #[arg(long)]
    pub top_k: Option<i64>,
    /// Seed of sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long)]
    pub device: Option<String>,
    /// f32 or bf16.
    #[arg(long)]
    pub dtype: Option<String>,
    /// Options of a job file (`--set sampling.stop=["\n"]`); repeatable.
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub overrides: Vec<String>,
    /// One JSON object per completion: prompt (rendered), completion, tokens, finish.
    #[arg(long)]
    pub json: bool,
}

/// A loaded model ready to answer.
struct Generator {
    policy: Policy,
    tokenizer: Tokenizer,
    sampling: SamplingParams,
    rng: ChaCha8Rng,
}

impl Generator {
    fn open(o: &GenerateOptions) -> Result<Self> {
        let (model, mut prompt, mut sampling) = if o.source.is_dir() {
            anyhow::ensure!(o.overrides.is_empty(), "--set applies to a job file; a model directory takes the flags");
            let mut text = format!("path = {}\n", toml::Value::String(o.source.display().to_string()));
            for (key, v) in [("device", &o.device), ("dtype", &o.dtype)] {
                if let Some(v) = v {
                    text += &format!("{key} = {}\n", toml::Value::String(v.clone()));
                }
            }
            let model: ModelSection = toml::from_str(&text).context("--device / --dtype")?;
            (model, PromptConfig::default(), SamplingParams { temperature: 0.7, max_new_tokens: 256, ..Default::default() })
        } else if o.source.is_file() {
            let mut overrides = o.overrides.clone();
            overrides.extend(o.device.iter().map(|d| format!("model.device={d}")));
            overrides.extend(o.dtype.iter().map(|d| format!("model.dtype={d}")));
            let cfg = JobConfig::load(&o.source, &overrides)?.1;
            (cfg.model, cfg.prompt, cfg.sampling)
        } else {
            bail!("{}: no such model directory or job file", o.source.display());
        };
        if o.raw {
            prompt.chat = Some(false);
        }
        if o.system.is_some() {
            prompt.system = o.system.clone();
        }
        sampling.max_new_tokens = o.max_new_tokens.unwrap_or(sampling.max_new_tokens);
        sampling.temperature = o.temperature.unwrap_or(sampling.temperature);
        sampling.top_p = o.top_p.unwrap_or(sampling.top_p);
        sampling.top_k = o.top_k.unwrap_or(sampling.top_k);
        sampling.validate("sampling")?;
        let (policy, mut tokenizer) = load_policy(&model)?;
        tokenizer.set_prompt(&prompt)?;
        sampling.stop_at(tokenizer.stop_ids());
        Ok(Generator { policy, tokenizer, sampling, rng: ChaCha8Rng::seed_from_u64(o.seed) })
    }

    fn complete(&mut self, problems: &[Problem]) -> Result<Vec<Sample>> {
        Ok(complete(self.policy.model(), &self.tokenizer, problems, &self.sampling, &mut self.rng)?)
    }
}

/// A prompt (plain text, or a conversation ending on a user turn) as the
/// problem type the renderer takes; no answer, nothing is scored.
fn problem(id: u64, prompt: String, messages: Vec<Message>) -> Problem {
    Problem { id, prompt, answer: String::new(), verifier: Verifier::Exact, messages }
}

/// One prompt from a line of a prompt file: JSON with `prompt` or `messages`,
/// or the line itself.
fn parse_line(id: u64, line: &str, origin: &str) -> Result<Problem> {
    if !line.trim_start().starts_with('{') {
        return Ok(problem(id, line.to_string(), vec![]));
    }
    let v: Value = serde_json::from_str(line).with_context(|| format!("{origin}: not a JSON object"))?;
    if let Some(m) = v.get("messages") {
        let messages: Vec<Message> = serde_json::from_value(m.clone())
            .with_context(|| format!("{origin}: `messages` must be a list of {{\"role\", \"content\"}}"))?;
        let last = messages.iter().rev().find(|m| m.role == "user").map(|m| m.content.clone()).unwrap_or_default();
        return Ok(problem(id, last, messages));
    }
    match v.get("prompt").and_then(Value::as_str) {
        Some(p) => Ok(problem(id, p.to_string(), vec![])),
        None => bail!("{origin}: a JSON line needs a string `prompt` or a `messages` list"),
    }
}

fn read_prompts(reader: impl BufRead, origin: &str) -> Result<Vec<Problem>> {
    let mut out = Vec::new();
    for (i, line) in reader.lines().enumerate() {
        let line = line.with_context(|| format!("{origin}: reading line {}", i + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        out.push(parse_line(out.len() as u64, &line, &format!("{origin}:{}", i + 1))?);
    }
    Ok(out)
}

fn report(s: &Sample) -> Value {
    json!({
        "prompt": s.prompt,
        "completion": s.text,
        "tokens": s.completion.tokens.len(),
        "finish": format!("{:?}", s.completion.finish).to_lowercase(),
    })
}

/// Runs `sluice generate`; returns the process exit code.
pub fn run(o: &GenerateOptions) -> Result<i32> {
    let stdin = std::io::stdin();
    let mut problems: Vec<Problem> =
        o.prompts.iter().enumerate().map(|(i, p)| problem(i as u64, p.clone(), vec![])).collect();
    if let Some(path) = &o.prompt_file {
        let f = std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
        problems.extend(read_prompts(std::io::BufReader::new(f), &path.display().to_string())?);
    } else if problems.is_empty() && !stdin.is_terminal() {
        problems = read_prompts(stdin.lock(), "stdin")?;
    }
    let interactive = problems.is_empty() && o.prompt_file.is_none() && stdin.is_terminal();
    let mut g = Generator::open(o)?;
    if interactive {
        return chat(&mut g, o.json);
    }
    for chunk in problems.chunks(BATCH) {
        for s in g.complete(chunk)? {
            if o.json {
                println!("{}", report(&s));
            } else {
                println!("{}", s.text);
                if chunk.len() > 1 || problems.len() > 1 {
                    println!("---");
                }
            }
        }
    }
    Ok(0)
}

/// The interactive loop: each line is a user turn; with chat prompts the
/// conversation so far goes with it (`/reset` starts over, `/quit` or end of
/// input ends).
fn chat(g: &mut Generator, json: bool) -> Result<i32> {
    let chat = g.tokenizer.chat_prompts();
    eprintln!(
        "{} — type a prompt; {}/quit or Ctrl-D ends",
        if chat { "chat (the conversation is kept)" } else { "raw prompts (no chat template)" },
        if chat { "/reset forgets the conversation, " } else { "" }
    );
    let mut history: Vec<Message> = Vec::new();
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        eprint!("> ");
        std::io::stderr().flush().ok();
        let Some(line) = lines.next().transpose()? else { break };
        match line.trim() {
            "" => continue,
            "/quit" | "/exit" => break,
            "/reset" => {
                history.clear();
                continue;
            }
            _ => {}
        }
        let p = if chat {
            history.push(Message::new("user", line.clone()));
            problem(0, line, history.clone())
        } else {
            problem(0, line, vec![])
        };
        let s = g.complete(std::slice::from_ref(&p))?.remove(0);
        if chat {
            history.push(Message::new("assistant", s.text.clone()));
        }
        if json {
            println!("{}", report(&s));
        } else {
            println!("{}", s.text);
        }
    }
    Ok(0)
}
