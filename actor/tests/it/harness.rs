//! Starting learner and actor processes and talking to them.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use sluice_proto::v1::learner_client::LearnerClient;
use sluice_proto::v1::{LearnerStatus, StatusRequest};
use tonic::transport::Channel;

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

/// A child process whose stdout JSON lines are collected; killed on drop.
pub struct Proc {
    pub child: Child,
    pub events: Arc<Mutex<Vec<Value>>>,
    pub name: String,
}

impl Proc {
    pub fn spawn(name: &str, binary: &str, args: &[String]) -> Proc {
        let mut child = Command::new(bin(binary))
            .args(args)
            .env("OMP_NUM_THREADS", "1")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {binary}: {e}"));
        let events = Arc::new(Mutex::new(Vec::new()));
        let out = child.stdout.take().unwrap();
        let sink = events.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    sink.lock().unwrap().push(v);
                }
            }
        });
        Proc { child, events, name: name.to_string() }
    }

    /// Waits for an event satisfying `pred` and returns it.
    pub fn wait_event(&mut self, what: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = self.events.lock().unwrap().iter().find(|v| pred(v)) {
                return v.clone();
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                // Give the reader thread a moment to drain stdout.
                std::thread::sleep(Duration::from_millis(200));
                if let Some(v) = self.events.lock().unwrap().iter().find(|v| pred(v)) {
                    return v.clone();
                }
                panic!("{} exited ({status}) before {what}", self.name);
            }
            assert!(Instant::now() < deadline, "{}: no {what} within {timeout:?}", self.name);
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the process to exit and returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> i32 {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s.code().unwrap_or(-1);
            }
            assert!(Instant::now() < deadline, "{} did not exit within {timeout:?}", self.name);
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
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
        let mut proc = Proc::spawn("learner", "sluice-learner", &args);
        let ev = proc.wait_event("listening", Duration::from_secs(60), |v| v["event"] == "listening");
        let endpoint = format!("http://{}", ev["addr"].as_str().unwrap());
        Learner { proc, endpoint }
    }

    /// Starts a learner on a known port (so a restarted one can take it over).
    pub fn start_on(job: &Path, port: u16, extra: &[&str]) -> Learner {
        let mut args = vec![job.display().to_string(), "--listen".into(), format!("127.0.0.1:{port}")];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut proc = Proc::spawn("learner", "sluice-learner", &args);
        let ev = proc.wait_event("listening", Duration::from_secs(60), |v| v["event"] == "listening");
        Learner { proc, endpoint: format!("http://{}", ev["addr"].as_str().unwrap()) }
    }

    pub fn wait_finished(&mut self, timeout: Duration) {
        self.proc.wait_event("finished", timeout, |v| v["event"] == "finished");
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
    Proc::spawn(&format!("actor-{index}"), "sluice-actor", &args)
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

pub async fn client(endpoint: &str) -> LearnerClient<Channel> {
    sluice_actor::actor::connect(endpoint).await.unwrap()
}

pub fn status(endpoint: &str) -> LearnerStatus {
    runtime().block_on(async {
        client(endpoint).await.status(StatusRequest { job_id: String::new() }).await.unwrap().into_inner()
    })
}

/// A free loopback port (bound and released; good enough on a quiet test machine).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

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
