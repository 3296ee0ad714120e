//! Where a job from an orchestrator may read and write on a worker's host.
//!
//! A job submitted remotely names paths (`model.path`, `task.path`,
//! `train.out_dir`, …) that a worker would otherwise open as given: `../victim`
//! or `/etc` from any token holder. A worker therefore resolves each one under
//! a root its operator configured ([`Roots`]): relative paths are joined to the
//! root, absolute ones must already lie inside it, `..` is refused outright,
//! and a path that exists is resolved through its symlinks and must still be
//! inside the (equally resolved) root. Each job writes only to its own run
//! directory, `<runs root>/<job id>`.
//!
//! Jobs a user runs from their own file (`sluice train`, a worker given a job
//! file) are not confined: the file is theirs and so is the machine.

use std::path::{Component, Path, PathBuf};

use crate::config::{JobConfig, TaskConfig};
use crate::error::{Error, Result};

/// The roots of one worker. `None` for models or data: such a job may name no
/// path of that kind on this worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Roots {
    /// Each orchestrated job's run directory is `<runs>/<job id>`.
    pub runs: PathBuf,
    /// `model.path` resolves under it.
    pub models: Option<PathBuf>,
    /// `task.path`, `task.eval_path` and `reward.llm.prompt_file` resolve under it.
    pub data: Option<PathBuf>,
}

/// `path` resolved under `root`, or an error naming `field`.
pub fn confine(root: &Path, path: &Path, field: &str) -> Result<PathBuf> {
    let refuse = |why: String| Error::config(field, format!("{}: {why}", path.display()));
    if path.components().any(|c| c == Component::ParentDir) {
        return Err(refuse("`..` is not allowed in a submitted job's paths".into()));
    }
    let joined = if path.is_absolute() {
        if !path.starts_with(root) {
            return Err(refuse(format!("outside this worker's root {}", root.display())));
        }
        path.to_path_buf()
    } else {
        root.join(path)
    };
    // Symlinks: what exists must resolve inside the resolved root.
    if let (Ok(real_root), Ok(real)) = (root.canonicalize(), joined.canonicalize()) {
        if !real.starts_with(&real_root) {
            return Err(refuse(format!("resolves to {}, outside this worker's root {}", real.display(), root.display())));
        }
    }
    Ok(joined)
}

/// A job id usable as one directory name (what the orchestrator makes:
/// `<name>-<n>`; anything else is refused rather than cleaned up).
pub fn job_dir_name(job_id: &str) -> Result<&str> {
    let ok = !job_id.is_empty()
        && job_id.len() <= 256
        && !job_id.starts_with('.')
        && job_id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(job_id)
    } else {
        Err(Error::config("job id", "not usable as a directory name (letters, digits, `-`, `_`, `.`; not starting with `.`)"))
    }
}

impl Roots {
    /// Rewrites every path of a job from an orchestrator to its confined form;
    /// the run directory becomes `<runs>/<job id>` whatever `train.out_dir` said.
    pub fn apply(&self, cfg: &mut JobConfig, job_id: &str) -> Result<()> {
        cfg.train.out_dir = self.runs.join(job_dir_name(job_id)?);
        let under = |root: &Option<PathBuf>, what: &str, path: &Path, field: &str| -> Result<PathBuf> {
            match root {
                Some(root) => confine(root, path, field),
                None => Err(Error::config(
                    field,
                    format!("{}: this worker has no {what} root, so a submitted job may not name one (start it with --{what}-root)", path.display()),
                )),
            }
        };
        if let Some(p) = &cfg.model.path {
            cfg.model.path = Some(under(&self.models, "models", p, "model.path")?);
        }
        if let TaskConfig::Dataset(d) = &mut cfg.task {
            d.path = under(&self.data, "data", &d.path, "task.path")?;
            if let Some(p) = &d.eval_path {
                d.eval_path = Some(under(&self.data, "data", p, "task.eval_path")?);
            }
        }
        if let Some(llm) = &mut cfg.reward.llm {
            if let Some(p) = &llm.prompt_file {
                llm.prompt_file = Some(under(&self.data, "data", p, "reward.llm.prompt_file")?);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_resolve_inside_the_root_or_are_refused_by_field() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("data");
        std::fs::create_dir_all(root.join("gsm8k")).unwrap();
        assert_eq!(confine(&root, Path::new("gsm8k/train.jsonl"), "task.path").unwrap(), root.join("gsm8k/train.jsonl"));
        assert_eq!(confine(&root, &root.join("gsm8k"), "task.path").unwrap(), root.join("gsm8k"));
        for bad in ["../victim", "gsm8k/../../x", "/etc/passwd"] {
            let e = confine(&root, Path::new(bad), "task.path").unwrap_err().to_string();
            assert!(e.contains("task.path") && e.contains(bad), "{bad}: {e}");
        }
        // A symlink inside the root that points out of it.
        std::os::unix::fs::symlink(dir.path(), root.join("escape")).unwrap();
        let e = confine(&root, Path::new("escape"), "model.path").unwrap_err().to_string();
        assert!(e.contains("outside this worker's root"), "{e}");
        // A prefix that is not a path component is not inside.
        let e = confine(&root, &dir.path().join("data-other/x"), "model.path").unwrap_err().to_string();
        assert!(e.contains("outside"), "{e}");
    }

    #[test]
    fn job_ids_must_be_plain_directory_names() {
        assert!(job_dir_name("gsm8k-12").is_ok());
        for bad in ["", "..", ".hidden", "a/b", "x\u{7}", "a b"] {
            assert!(job_dir_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn apply_confines_every_path_and_pins_the_run_directory() {
        let text = "name = \"t\"\n[model]\npath = \"qwen\"\n[task]\nkind = \"dataset\"\npath = \"gsm8k.jsonl\"\n[train]\nout_dir = \"../victim\"\n";
        let mut cfg = JobConfig::from_toml(text).unwrap();
        let roots = Roots { runs: "/srv/runs".into(), models: Some("/srv/models".into()), data: Some("/srv/data".into()) };
        roots.apply(&mut cfg, "t-3").unwrap();
        assert_eq!(cfg.train.out_dir, Path::new("/srv/runs/t-3"));
        assert_eq!(cfg.model.path.as_deref(), Some(Path::new("/srv/models/qwen")));
        let TaskConfig::Dataset(d) = &cfg.task else { panic!() };
        assert_eq!(d.path, Path::new("/srv/data/gsm8k.jsonl"));
        // No data root: a dataset job is refused, naming the field and the flag.
        let mut cfg = JobConfig::from_toml(text).unwrap();
        let e = Roots { data: None, ..roots }.apply(&mut cfg, "t-3").unwrap_err().to_string();
        assert!(e.contains("task.path") && e.contains("--data-root"), "{e}");
    }
}
