//! Starting learner and actor processes and talking to them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use sluice_proto::v1::learner_client::LearnerClient;
use sluice_proto::v1::{LearnerStatus, StatusRequest};
use sluice_proto::Channel;

/// A sibling binary of this test's package (built by `cargo build --workspace`).
pub fn bin(name: &str) -> PathBuf {
    let actor = PathBuf::from(env!("CARGO_BIN_EXE_sluice-actor"));
    let path = actor.with_file_name(name);
    assert!(path.exists(), "{} is missing: run `cargo build --workspace` (scripts/test.sh does) first", path.display());
    path
}

/// Model and task every test job uses.
pub const TINY: &str = "[model]\npreset = \"tiny\"\ndevice = \"cpu\"\ninit_seed = 7\n[task]\nkind = \"arithmetic\"\n";

/// Writes `<dir>/<name>.toml`: the job name, then `body` (TOML sections).
/// Learners get their output directory through `--out`.
pub fn write_job(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, format!("name = \"{name}\"\n{body}")).unwrap();
    path
}

pub use sluice_testkit::Proc;

/// Starts a workspace binary with `args` (see [`sluice_testkit::Proc`]).
pub fn spawn(name: &str, binary: &str, args: &[String]) -> Proc {
    let mut cmd = Proc::command(bin(binary));
    cmd.args(args);
    Proc::spawn(name, cmd)
}

/// A learner process and its gRPC endpoint.
pub struct Learner {
    pub proc: Proc,
    pub endpoint: String,
}

impl Learner {
    pub fn start(job: &Path, extra: &[&str]) -> Learner {
        let mut args = vec![job.display().to_string(), "--listen".into(), "127.0.0.1:0".into()];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut proc = spawn("learner", "sluice-learner", &args);
        let ev = proc.wait_line("listening", Duration::from_secs(60), |v| v["event"] == "listening");
        let endpoint = format!("http://{}", ev["addr"].as_str().unwrap());
        Learner { proc, endpoint }
    }

    /// The port it listens on (the first start binds port 0; a restarted
    /// learner takes this port over with [`Learner::start_on`]).
    pub fn port(&self) -> u16 {
        self.endpoint.rsplit(':').next().and_then(|p| p.parse().ok()).expect("endpoint has a port")
    }

    /// Starts a learner on the port a killed one listened on.
    pub fn start_on(job: &Path, port: u16, extra: &[&str]) -> Learner {
        let mut args = vec![job.display().to_string(), "--listen".into(), format!("127.0.0.1:{port}")];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut proc = spawn("learner", "sluice-learner", &args);
        let ev = proc.wait_line("listening", Duration::from_secs(60), |v| v["event"] == "listening");
        Learner { proc, endpoint: format!("http://{}", ev["addr"].as_str().unwrap()) }
    }

    pub fn wait_finished(&mut self, timeout: Duration) {
        self.proc.wait_line("finished", timeout, |v| v["event"] == "finished");
    }
}

pub fn actor(job: &Path, learner: &str, index: usize, actors: usize, extra: &[&str]) -> Proc {
    let mut args = vec![
        job.display().to_string(),
        "--learner".into(),
        learner.to_string(),
        "--index".into(),
        index.to_string(),
        "--actors".into(),
        actors.to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    spawn(&format!("actor-{index}"), "sluice-actor", &args)
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

pub async fn client(endpoint: &str) -> LearnerClient<Channel> {
    sluice_actor::link::connect(endpoint).await.unwrap()
}

pub fn status(endpoint: &str) -> LearnerStatus {
    runtime().block_on(async {
        client(endpoint).await.status(StatusRequest { job_id: String::new() }).await.unwrap().into_inner()
    })
}

pub use sluice_testkit::free_port;

/// Named tensors of a safetensors file.
pub fn read_tensors(path: &Path) -> Vec<(String, tch::Tensor)> {
    let mut v = tch::Tensor::read_safetensors(path).unwrap();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// The model.safetensors of the newest checkpoint in `out_dir`.
pub fn latest_weights(out_dir: &Path) -> PathBuf {
    let latest = std::fs::read_to_string(out_dir.join("checkpoints/latest")).unwrap();
    out_dir.join("checkpoints").join(latest.trim()).join("model.safetensors")
}

pub fn metrics(out_dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(out_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}
