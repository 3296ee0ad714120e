//! Run directories as a [`Source`]: each directory's `metrics.jsonl` (what
//! `sluice train` and every learner append, one JSON event per line) is a
//! job, followed as it grows (`sluice dashboard RUN_DIR...`).

use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::SystemTime;

use serde_json::{json, Value};

use crate::source::{Error, Events, Result, Source};

/// Runs whose file was written within this many seconds show as running.
const LIVE_S: u64 = 60;

/// Lines read so far from one `metrics.jsonl`.
#[derive(Debug, Default)]
struct Tail {
    offset: u64,
    /// The start of a line not yet ended by a newline.
    partial: Vec<u8>,
    lines: Vec<String>,
    last_step: u64,
}

#[derive(Debug)]
struct Run {
    id: String,
    dir: PathBuf,
    read: Mutex<Tail>,
}

/// One job per run directory.
#[derive(Debug)]
pub struct RunDirs {
    runs: Vec<Run>,
}

impl RunDirs {
    /// The runs in `dirs`: each must hold a `metrics.jsonl`. A run's id is its
    /// directory's name (made unique with `-2`, `-3`, ... when two share one).
    pub fn open(dirs: &[PathBuf]) -> Result<RunDirs> {
        let mut runs: Vec<Run> = Vec::new();
        for dir in dirs {
            let file = dir.join("metrics.jsonl");
            if !file.is_file() {
                return Err(Error::NotFound(format!(
                    "{}: no metrics.jsonl (give the run directory: train.out_dir of the job file)",
                    dir.display()
                )));
            }
            let base = dir.canonicalize().ok().and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()));
            let base = base.unwrap_or_else(|| "run".into());
            let mut id = base.clone();
            let mut n = 1;
            while runs.iter().any(|r| r.id == id) {
                n += 1;
                id = format!("{base}-{n}");
            }
            runs.push(Run { id, dir: dir.clone(), read: Mutex::new(Tail::default()) });
        }
        Ok(RunDirs { runs })
    }

    fn run(&self, id: &str) -> Result<&Run> {
        self.runs.iter().find(|r| r.id == id).ok_or_else(|| Error::NotFound(format!("run `{id}`")))
    }
}

impl Run {
    fn file(&self) -> PathBuf {
        self.dir.join("metrics.jsonl")
    }

    /// Reads what was appended since the last call.
    fn refresh(&self) -> Result<std::sync::MutexGuard<'_, Tail>> {
        let path = self.file();
        let io = |e| Error::Io { what: path.display().to_string(), source: e };
        let mut r = self.read.lock().unwrap_or_else(|p| p.into_inner());
        let mut f = std::fs::File::open(&path).map_err(io)?;
        let len = f.metadata().map_err(io)?.len();
        if len < r.offset {
            // Rewritten from the start: read it again.
            *r = Tail::default();
        }
        if len > r.offset {
            f.seek(SeekFrom::Start(r.offset)).map_err(io)?;
            let mut buf = Vec::with_capacity((len - r.offset) as usize);
            f.take(len - r.offset).read_to_end(&mut buf).map_err(io)?;
            r.offset += buf.len() as u64;
            let mut all = std::mem::take(&mut r.partial);
            all.extend_from_slice(&buf);
            let end = all.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
            r.partial = all.split_off(end);
            for line in String::from_utf8_lossy(&all).lines() {
                // Only whole JSON objects (a torn last line of a killed run is skipped).
                let Ok(v) = serde_json::from_str::<Value>(line) else { continue };
                if !v.is_object() {
                    continue;
                }
                if v["event"] == "step" {
                    r.last_step = v["step"].as_u64().unwrap_or(r.last_step);
                }
                r.lines.push(line.to_string());
            }
        }
        Ok(r)
    }

    fn summary(&self) -> Result<Value> {
        let modified = std::fs::metadata(self.file()).and_then(|m| m.modified()).ok();
        let age = modified.and_then(|m| SystemTime::now().duration_since(m).ok()).map_or(u64::MAX, |d| d.as_secs());
        let created = modified.and_then(|m| m.duration_since(SystemTime::UNIX_EPOCH).ok()).map_or(0, |d| d.as_millis() as u64);
        let step = self.refresh()?.last_step;
        Ok(json!({
            "id": self.id,
            "name": self.id,
            "state": if age < LIVE_S { "running" } else { "idle" },
            "message": self.dir.display().to_string(),
            "updated_unix_ms": created,
            "progress": {"step": step},
        }))
    }
}

impl Source for RunDirs {
    async fn jobs(&self) -> Result<Vec<Value>> {
        self.runs.iter().map(Run::summary).collect()
    }

    async fn job(&self, id: &str) -> Result<Value> {
        self.run(id)?.summary()
    }

    async fn events(&self, id: &str, from: u64) -> Result<Events> {
        let r = self.run(id)?.refresh()?;
        let from = usize::try_from(from).unwrap_or(usize::MAX).min(r.lines.len());
        let events = r.lines[from..].iter().enumerate().map(|(i, l)| ((from + i) as u64, l.clone())).collect();
        // A local run never says it ended: the file is followed like `tail -f`.
        Ok(Events { events, finished: false })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[tokio::test]
    async fn a_growing_file_is_followed_line_by_line() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run-a");
        std::fs::create_dir(&run).unwrap();
        let mut f = std::fs::File::create(run.join("metrics.jsonl")).unwrap();
        write!(f, "{{\"event\":\"step\",\"step\":1}}\n{{\"event\":\"step\",\"st").unwrap();
        let runs = RunDirs::open(&[run.clone(), run.clone()]).unwrap();
        let ids: Vec<String> = runs.jobs().await.unwrap().iter().map(|j| j["id"].as_str().unwrap().to_string()).collect();
        assert_eq!(ids, ["run-a", "run-a-2"]);
        let e = runs.events("run-a", 0).await.unwrap();
        assert_eq!(e.events.len(), 1, "the torn line waits for its end");
        write!(f, "ep\":2}}\n\n").unwrap();
        let e = runs.events("run-a", 1).await.unwrap();
        assert_eq!(e.events, vec![(1, "{\"event\":\"step\",\"step\":2}".to_string())]);
        assert_eq!(runs.job("run-a").await.unwrap()["progress"]["step"], 2);
        assert!(matches!(runs.events("nope", 0).await, Err(Error::NotFound(_))));
        assert!(RunDirs::open(&[dir.path().join("missing")]).is_err());
    }
}
