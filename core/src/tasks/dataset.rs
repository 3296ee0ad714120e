//! Problems from datasets as people have them: JSONL files, Parquet files, or a
//! directory of shards in the Hugging Face `datasets` layout
//! (`data/train-00000-of-00002.parquet`, …).
//!
//! Each row is mapped by column names ([`DatasetConfig`]): the prompt column
//! holds text, or a list of `{role, content}` messages (TRL's conversational
//! format, rendered with the chat template); the answer column holds the
//! reference, from which [`AnswerFormat`] extracts the final answer (`#### 72`
//! as in GSM8K, the last `\boxed{}` as in MATH). A `verifier` column, when
//! present, names the row's verifier; otherwise the job's `verifier` applies.
//! Rows may be shuffled with a seed (the same order on every process), and a
//! problem's id is its row number in file order, so it stays stable.

use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde_json::Value;

use super::{Problem, Split, Task, Verifier};
use crate::chat::Message;
use crate::config::{AnswerFormat, DatasetConfig};
use crate::error::{Error, Result};

#[derive(Debug, Clone)]
pub struct DatasetTask {
    train: Vec<Problem>,
    eval: Vec<Problem>,
}

/// What opening a dataset found, for `sluice check`.
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetSummary {
    pub train_files: Vec<PathBuf>,
    pub train_rows: usize,
    pub eval_files: Vec<PathBuf>,
    pub eval_rows: usize,
}

impl DatasetTask {
    pub fn open(cfg: &DatasetConfig) -> Result<Self> {
        Self::open_with_summary(cfg).map(|(t, _)| t)
    }

    /// Opens every file and maps every row; errors name the file, the row and the column.
    pub fn open_with_summary(cfg: &DatasetConfig) -> Result<(Self, DatasetSummary)> {
        let (train_files, found_eval) = shards(&cfg.path)?;
        let eval_files = match &cfg.eval_path {
            Some(p) => shards(p)?.0,
            None => found_eval,
        };
        let mut train = read_all(&train_files, cfg)?;
        let mut eval = if eval_files.is_empty() { train.clone() } else { read_all(&eval_files, cfg)? };
        if let Some(seed) = cfg.shuffle_seed {
            train.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
            eval.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x6576_616c));
        }
        let summary = DatasetSummary { train_rows: train.len(), eval_rows: eval.len(), train_files, eval_files };
        Ok((DatasetTask { train, eval }, summary))
    }
}

fn is_data_file(p: &Path) -> bool {
    matches!(p.extension().and_then(|e| e.to_str()), Some("jsonl" | "json" | "parquet"))
}

/// The files of `path`: the file itself, or the data files under a directory
/// (recursively, sorted). In a directory whose files are named by split
/// (`train-*`, `test-*`, `validation-*`), the `train` ones are the training
/// files and the `test` (else `validation`) ones the held-out files.
fn shards(path: &Path) -> Result<(Vec<PathBuf>, Vec<PathBuf>)> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_dir() {
        return Ok((vec![path.to_path_buf()], vec![]));
    }
    let mut files = Vec::new();
    let mut stack = vec![path.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))? {
            let p = entry.map_err(|e| Error::io(&dir, e))?.path();
            if p.is_dir() {
                stack.push(p);
            } else if is_data_file(&p) {
                files.push(p);
            }
        }
    }
    files.sort();
    let named = |prefix: &str| -> Vec<PathBuf> {
        files.iter().filter(|f| f.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(prefix))).cloned().collect()
    };
    let train = named("train");
    if train.is_empty() {
        if files.is_empty() {
            return Err(Error::Dataset { file: path.to_path_buf(), reason: "no .jsonl, .json or .parquet files in it".into() });
        }
        return Ok((files, vec![]));
    }
    let eval = [named("test"), named("validation")].into_iter().find(|v| !v.is_empty()).unwrap_or_default();
    Ok((train, eval))
}

fn read_all(files: &[PathBuf], cfg: &DatasetConfig) -> Result<Vec<Problem>> {
    let mut out = Vec::new();
    for file in files {
        let before = out.len();
        let mut push = |n: usize, row: Value| -> Result<()> {
            let id = out.len() as u64;
            let problem = map_row(&row, cfg, id).map_err(|reason| Error::Dataset { file: file.clone(), reason: format!("row {}: {reason}", n + 1) })?;
            out.push(problem);
            Ok(())
        };
        match file.extension().and_then(|e| e.to_str()) {
            Some("parquet") => read_parquet(file, cfg, &mut push)?,
            _ => read_jsonl(file, &mut push)?,
        }
        if out.len() == before {
            return Err(Error::Dataset { file: file.clone(), reason: "no rows".into() });
        }
    }
    Ok(out)
}

fn read_jsonl(file: &Path, push: &mut dyn FnMut(usize, Value) -> Result<()>) -> Result<()> {
    let text = std::fs::read_to_string(file).map_err(|e| Error::io(file, e))?;
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let row: Value = serde_json::from_str(line)
            .map_err(|e| Error::Dataset { file: file.to_path_buf(), reason: format!("row {}: {e}", n + 1) })?;
        push(n, row)?;
    }
    Ok(())
}

fn read_parquet(file: &Path, cfg: &DatasetConfig, push: &mut dyn FnMut(usize, Value) -> Result<()>) -> Result<()> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let bad = |reason: String| Error::Dataset { file: file.to_path_buf(), reason };
    let f = std::fs::File::open(file).map_err(|e| Error::io(file, e))?;
    let reader = SerializedFileReader::new(f).map_err(|e| bad(format!("not a readable Parquet file: {e}")))?;
    // A missing column is named before any row is read.
    let schema = reader.metadata().file_metadata().schema_descr();
    let columns: Vec<&str> = schema.root_schema().get_fields().iter().map(|f| f.name()).collect();
    for want in cfg.columns() {
        if !columns.contains(&want) {
            return Err(bad(format!("no column `{want}` (columns: {})", columns.join(", "))));
        }
    }
    let rows = reader.get_row_iter(None).map_err(|e| bad(e.to_string()))?;
    for (n, row) in rows.enumerate() {
        let row = row.map_err(|e| bad(format!("row {}: {e}", n + 1)))?;
        push(n, row.to_json_value())?;
    }
    Ok(())
}

/// One row → one problem, or why not (naming the column).
fn map_row(row: &Value, cfg: &DatasetConfig, id: u64) -> std::result::Result<Problem, String> {
    let obj = row.as_object().ok_or("not a JSON object")?;
    let column = |name: &str| {
        obj.get(name).filter(|v| !v.is_null()).ok_or_else(|| {
            let mut have: Vec<&str> = obj.keys().map(String::as_str).collect();
            have.sort_unstable();
            format!("no column `{name}` (columns: {})", have.join(", "))
        })
    };
    let (prompt, messages) = match column(&cfg.prompt_field)? {
        Value::String(s) => (s.clone(), vec![]),
        Value::Array(_) => {
            let messages: Vec<Message> = serde_json::from_value(column(&cfg.prompt_field)?.clone())
                .map_err(|e| format!("column `{}`: not a list of {{role, content}} messages: {e}", cfg.prompt_field))?;
            let last_user = messages.iter().rev().find(|m| m.role == "user").map(|m| m.content.clone());
            let prompt = last_user.ok_or_else(|| format!("column `{}`: no user message", cfg.prompt_field))?;
            (prompt, messages)
        }
        other => return Err(format!("column `{}`: expected text or messages, found {other}", cfg.prompt_field)),
    };
    let raw = match column(&cfg.answer_field)? {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        other => return Err(format!("column `{}`: expected text or a number, found {other}", cfg.answer_field)),
    };
    let answer = cfg.answer_format.extract(&raw).map_err(|why| format!("column `{}`: {why}", cfg.answer_field))?;
    let verifier = match obj.get("verifier").and_then(Value::as_str) {
        Some(name) => Verifier::parse(name)
            .ok_or_else(|| format!("column `verifier`: unknown verifier `{name}` ({})", super::VERIFIER_NAMES.join(", ")))?,
        None => cfg.verifier,
    };
    verifier.check_answer(&answer).map_err(|why| format!("column `{}`: {why}", cfg.answer_field))?;
    Ok(Problem { id, prompt, answer, verifier, messages })
}

impl AnswerFormat {
    /// The final answer inside a reference solution.
    pub fn extract(self, text: &str) -> std::result::Result<String, String> {
        match self {
            AnswerFormat::Plain => Ok(text.trim().to_string()),
            AnswerFormat::Gsm8k => {
                let i = text.rfind("####").ok_or("no `#### <answer>` line (answer_format = \"gsm8k\")")?;
                let answer = text[i + 4..].trim().replace(',', "");
                if answer.is_empty() {
                    return Err("nothing after `####`".into());
                }
                Ok(answer)
            }
            AnswerFormat::Boxed => super::verify::last_boxed(text)
                .map(|s| s.trim().to_string())
                .ok_or_else(|| "no \\boxed{...} (answer_format = \"boxed\")".into()),
        }
    }
}

impl Task for DatasetTask {
    fn name(&self) -> &str {
        "dataset"
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

    fn cfg(path: &Path) -> DatasetConfig {
        toml::from_str(&format!("path = {:?}", path.display().to_string())).unwrap()
    }

    #[test]
    fn reads_rows_and_reports_bad_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.jsonl");
        std::fs::write(&p, "{\"prompt\":\"2+2=\",\"answer\":4,\"verifier\":\"numeric\"}\n\n{\"prompt\":\"Use 1 2 to make 3\",\"answer\":\"3:1,2\",\"verifier\":\"countdown\"}\n").unwrap();
        let t = DatasetTask::open(&cfg(&p)).unwrap();
        let a = t.problem(Split::Train, 0);
        assert_eq!(a.score("4.0"), 1.0);
        assert_eq!(t.problem(Split::Train, 1).score("1+2"), 1.0);
        assert_eq!(t.problem(Split::Train, 2), a, "index wraps");
        std::fs::write(&p, "{\"prompt\":\"x\",\"answer\":\"y\",\"verifier\":\"python\"}\n").unwrap();
        let e = DatasetTask::open(&cfg(&p)).unwrap_err().to_string();
        assert!(e.contains("d.jsonl") && e.contains("row 1") && e.contains("python"), "{e}");
    }

    #[test]
    fn gsm8k_rows_map_extract_and_shuffle_stably() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("train.jsonl");
        let rows: String = (0..20)
            .map(|i| format!("{{\"question\":\"q{i}\",\"answer\":\"work <<{i}*100={}>>\\n#### {},{:03}\"}}\n", i * 100, i, 0))
            .collect();
        std::fs::write(&p, rows).unwrap();
        let mut c: DatasetConfig = toml::from_str(&format!(
            "path = {:?}\nprompt_field = \"question\"\nanswer_format = \"gsm8k\"\nverifier = \"numeric\"",
            p.display().to_string()
        ))
        .unwrap();
        let t = DatasetTask::open(&c).unwrap();
        let first = t.problem(Split::Train, 3);
        assert_eq!((first.prompt.as_str(), first.answer.as_str(), first.id), ("q3", "3000", 3));
        assert_eq!(first.score("so the answer is \\boxed{3,000}"), 1.0);
        c.shuffle_seed = Some(7);
        let (a, b) = (DatasetTask::open(&c).unwrap(), DatasetTask::open(&c).unwrap());
        let order = |t: &DatasetTask| (0..20).map(|i| t.problem(Split::Train, i).id).collect::<Vec<_>>();
        assert_eq!(order(&a), order(&b), "the same seed gives the same order");
        assert_ne!(order(&a), (0..20).collect::<Vec<_>>(), "shuffled");
        let mut sorted = order(&a);
        sorted.sort_unstable();
        assert_eq!(sorted, (0..20).collect::<Vec<_>>(), "every row once, ids kept");
        // The wrong column names the file, the row and the columns it has.
        c.prompt_field = "prompt".into();
        let e = DatasetTask::open(&c).unwrap_err().to_string();
        assert!(e.contains("train.jsonl") && e.contains("row 1") && e.contains("`prompt`") && e.contains("question"), "{e}");
    }

    #[test]
    fn boxed_answers_messages_and_shard_directories() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        let row = |q: &str, a: &str| {
            serde_json::json!({"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": q}],
                "solution": a})
            .to_string()
        };
        std::fs::write(data.join("train-00000-of-00002.jsonl"), row("a", "so $\\boxed{\\frac{1}{2}}$") + "\n").unwrap();
        std::fs::write(data.join("train-00001-of-00002.jsonl"), row("b", "\\boxed{3}") + "\n").unwrap();
        std::fs::write(data.join("test-00000-of-00001.jsonl"), row("c", "\\boxed{4}") + "\n").unwrap();
        let c: DatasetConfig = toml::from_str(&format!(
            "path = {:?}\nanswer_field = \"solution\"\nanswer_format = \"boxed\"\nverifier = \"numeric\"",
            dir.path().display().to_string()
        ))
        .unwrap();
        let (t, summary) = DatasetTask::open_with_summary(&c).unwrap();
        assert_eq!((summary.train_rows, summary.eval_rows, summary.train_files.len()), (2, 1, 2));
        let p = t.problem(Split::Train, 0);
        assert_eq!((p.prompt.as_str(), p.answer.as_str(), p.messages.len()), ("a", "\\frac{1}{2}", 2));
        assert_eq!(p.score("0.5"), 1.0);
        assert_eq!(t.problem(Split::Train, 1).id, 1, "ids run on across shards");
        assert_eq!(t.problem(Split::Eval, 0).prompt, "c");
        std::fs::write(data.join("train-00001-of-00002.jsonl"), row("b", "no box") + "\n").unwrap();
        let e = DatasetTask::open(&c).unwrap_err().to_string();
        assert!(e.contains("train-00001-of-00002.jsonl") && e.contains("boxed"), "{e}");
    }
}
