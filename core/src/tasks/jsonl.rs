//! Problems from JSONL files: one `{"prompt": .., "answer": .., "verifier": ..}` per line.
//! `verifier` is optional (default `exact`) and names a [`Verifier`].

use std::path::Path;

use serde::Deserialize;

use super::{Problem, Split, Task, Verifier};
use crate::config::JsonlConfig;
use crate::error::{Error, Result};

#[derive(Debug, Clone)]
pub struct JsonlTask {
    train: Vec<Problem>,
    eval: Vec<Problem>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Row {
    prompt: String,
    answer: serde_json::Value,
    #[serde(default)]
    verifier: Option<String>,
}

impl JsonlTask {
    pub fn open(cfg: &JsonlConfig) -> Result<Self> {
        let train = read(&cfg.path)?;
        let eval = match &cfg.eval_path {
            Some(p) => read(p)?,
            None => train.clone(),
        };
        Ok(JsonlTask { train, eval })
    }
}

fn read(path: &Path) -> Result<Vec<Problem>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}:{}", path.display(), n + 1);
        let row: Row = serde_json::from_str(line).map_err(|e| Error::Task(format!("{}: {e}", at())))?;
        let name = row.verifier.as_deref().unwrap_or("exact");
        let verifier = Verifier::parse(name).ok_or_else(|| {
            Error::Task(format!("{}: unknown verifier `{name}` ({})", at(), super::VERIFIER_NAMES.join(", ")))
        })?;
        let answer = match row.answer {
            serde_json::Value::String(s) => s,
            other => other.to_string(),
        };
        verifier.check_answer(&answer).map_err(|why| Error::Task(format!("{}: answer: {why}", at())))?;
        out.push(Problem { id: n as u64, prompt: row.prompt, answer, verifier });
    }
    if out.is_empty() {
        return Err(Error::Task(format!("{}: no problems", path.display())));
    }
    Ok(out)
}

impl Task for JsonlTask {
    fn name(&self) -> &str {
        "jsonl"
    }
    fn problem(&self, split: Split, index: u64) -> Problem {
        let rows = match split {
            Split::Train => &self.train,
            Split::Eval => &self.eval,
        };
        rows[(index % rows.len() as u64) as usize].clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_rows_and_reports_bad_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.jsonl");
        std::fs::write(&p, "{\"prompt\":\"2+2=\",\"answer\":4,\"verifier\":\"numeric\"}\n\n{\"prompt\":\"Use 1 2 to make 3\",\"answer\":\"3:1,2\",\"verifier\":\"countdown\"}\n").unwrap();
        let t = JsonlTask::open(&JsonlConfig { path: p.clone(), eval_path: None }).unwrap();
        let a = t.problem(Split::Train, 0);
        assert_eq!(a.score("4.0"), 1.0);
        assert_eq!(t.problem(Split::Train, 1).score("1+2"), 1.0);
        assert_eq!(t.problem(Split::Train, 2), a, "index wraps");
        std::fs::write(&p, "{\"prompt\":\"x\",\"answer\":\"y\",\"verifier\":\"python\"}\n").unwrap();
        let e = JsonlTask::open(&JsonlConfig { path: p.clone(), eval_path: None }).unwrap_err().to_string();
        assert!(e.contains("d.jsonl:1") && e.contains("python"), "{e}");
    }
}
