//! `sluice dev JOB.toml`: the whole system on one machine, as real processes.
//!
//! Starts an orchestrator (in-memory store, or `--redis URL`), submits the
//! job, then starts the reward server, the learner ranks and the actors on
//! loopback ports, all with a bearer token (`SLUICE_TOKEN`, or one generated
//! for this run; passed in the environment, never on a command line). It follows the job's events
//! (progress bar, or JSON lines with `--json`), restarts a child that crashes
//! (a learner resumes from its newest checkpoint; an actor's work is handed
//! out again when its lease expires), and on Ctrl-C stops the learners and
//! actors first (the learner checkpoints) and then the servers.
//!
//! Each child's stdout and stderr go to `<train.out_dir>/logs/<role>-<rank>.log`.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use sluice_core::config::JobConfig;
use sluice_proto::v1::{self, event::Body, JobState};

use crate::client::{describe, exit, state_name, Failure, Outcome, Remote};

/// What `sluice dev` was asked for.
#[derive(Debug, Clone)]
pub struct DevOptions {
    pub job: PathBuf,
    /// `--set section.key=value` overrides of the job file, in order.
    pub overrides: Vec<String>,
    /// Keep the orchestrator's state in Redis instead of memory.
    pub redis: Option<String>,
    /// Where the sluice binaries are (default: next to this one).
    pub bin_dir: Option<PathBuf>,
    pub json: bool,
    /// Worker lease in seconds (how soon a dead actor's work is handed out again).
    pub lease_s: f64,
    /// Restarts allowed per child before the job is given up.
    pub max_restarts: u32,
    /// Serve the web dashboard here (port 0: a free one); `None`: none.
    pub dashboard: Option<String>,
}

/// A supervised child process.
struct Proc {
    role: &'static str,
    rank: usize,
    bin: PathBuf,
    args: Vec<String>,
    child: Child,
    restarts: u32,
    /// Exited for good (cleanly, or after the job ended).
    done: bool,
}

/// `(role, rank, JSON line)` from a child's stdout.
type Line = (&'static str, usize, serde_json::Value);

struct Supervisor {
    bin_dir: PathBuf,
    logs: PathBuf,
    token: String,
    /// The job's id once submitted (a resource attribute of the workers).
    job: Option<String>,
    procs: Vec<Proc>,
    lines: mpsc::Sender<Line>,
    json: bool,
}

fn free_port() -> Outcome<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| Failure::new(exit::ERROR, format!("no free port: {e}")))?;
    Ok(l.local_addr().map_err(|e| Failure::new(exit::ERROR, e.to_string()))?.port())
}

fn say(json: bool, bar: &ProgressBar, value: serde_json::Value, human: String) {
    if json {
        println!("{value}");
    } else if bar.is_hidden() {
        eprintln!("{human}");
    } else {
        bar.println(human);
    }
}

impl Supervisor {
    fn spawn_child(&self, role: &'static str, rank: usize, bin: &Path, args: &[String]) -> Outcome<Child> {
        let path = self.logs.join(format!("{role}-{rank}.log"));
        let open = || OpenOptions::new().create(true).append(true).open(&path);
        let log = open().map_err(|e| Failure::new(exit::ERROR, format!("{}: {e}", path.display())))?;
        let mut cmd = Command::new(bin);
        self.telemetry_env(&mut cmd, role, rank);
        let mut child = cmd
            .args(args)
            .env("SLUICE_TOKEN", &self.token)
            // Children die with `sluice dev`, even when it is killed with SIGKILL.
            .env(sluice_core::signal::PARENT_ENV, std::process::id().to_string())
            .env("OMP_NUM_THREADS", std::env::var("OMP_NUM_THREADS").unwrap_or_else(|_| "1".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            // Its own process group: the terminal's Ctrl-C reaches only `sluice dev`,
            // which then stops the children in order.
            .process_group(0)
            .spawn()
            .map_err(|e| Failure::new(exit::ERROR, format!("cannot start {}: {e}", bin.display())))?;
        let out = child.stdout.take().expect("piped");
        let tx = self.lines.clone();
        let mut log: File = open().map_err(|e| Failure::new(exit::ERROR, format!("{}: {e}", path.display())))?;
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = writeln!(log, "{line}");
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                    let _ = tx.send((role, rank, v));
                }
            }
        });
        Ok(child)
    }

    /// OpenTelemetry resource attributes of a child: `sluice.role`,
    /// `sluice.rank` and (once submitted) `sluice.job`, before the user's own
    /// `OTEL_RESOURCE_ATTRIBUTES` (which win). An `OTEL_SERVICE_NAME` given to
    /// `sluice dev` becomes every child's `service.namespace`; each keeps its
    /// binary's `service.name`, so the four roles stay four services.
    fn telemetry_env(&self, cmd: &mut Command, role: &str, rank: usize) {
        let mut attrs = vec![format!("sluice.role={role}"), format!("sluice.rank={rank}")];
        if let Some(job) = &self.job {
            attrs.push(format!("sluice.job={job}"));
        }
        if let Some(ns) = std::env::var("OTEL_SERVICE_NAME").ok().filter(|s| !s.is_empty()) {
            attrs.push(format!("service.namespace={}", ns.replace([',', '='], "_")));
            cmd.env_remove("OTEL_SERVICE_NAME");
        }
        if let Some(user) = std::env::var("OTEL_RESOURCE_ATTRIBUTES").ok().filter(|s| !s.is_empty()) {
            attrs.push(user);
        }
        cmd.env("OTEL_RESOURCE_ATTRIBUTES", attrs.join(","));
    }

    fn start(&mut self, role: &'static str, rank: usize, binary: &str, args: Vec<String>, bar: &ProgressBar) -> Outcome<u32> {
        let bin = self.bin_dir.join(binary);
        if !bin.exists() {
            return Err(Failure::new(
                exit::ERROR,
                format!("{} is missing (build the workspace, or pass --bin-dir)", bin.display()),
            ));
        }
        let child = self.spawn_child(role, rank, &bin, &args)?;
        let pid = child.id();
        say(
            self.json,
            bar,
            serde_json::json!({"event": "started", "source": "dev", "role": role, "rank": rank, "pid": pid}),
            format!("started {role} {rank} (pid {pid})"),
        );
        self.procs.push(Proc { role, rank, bin, args, child, restarts: 0, done: false });
        Ok(pid)
    }

    fn signal(&self, roles: &[&str], sig: Signal) {
        for p in self.procs.iter().filter(|p| !p.done && roles.contains(&p.role)) {
            let _ = kill(Pid::from_raw(p.child.id() as i32), sig);
        }
    }

    /// Waits until every child of `roles` has exited (true) or `timeout` passed.
    fn wait_exit(&mut self, roles: &[&str], timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let mut alive = false;
            for p in self.procs.iter_mut().filter(|p| !p.done && roles.contains(&p.role)) {
                match p.child.try_wait() {
                    Ok(Some(_)) | Err(_) => p.done = true,
                    Ok(None) => alive = true,
                }
            }
            if !alive {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops everything: `first` roles with SIGINT (they finish their step and
    /// checkpoint), then the rest with SIGTERM, then SIGKILL for stragglers.
    fn shutdown(&mut self, first: &[&str], grace: Duration) {
        const ALL: [&str; 4] = ["learner", "actor", "reward", "orchestrator"];
        self.signal(first, Signal::SIGINT);
        self.wait_exit(first, grace);
        self.signal(&ALL, Signal::SIGTERM);
        if !self.wait_exit(&ALL, Duration::from_secs(10)) {
            self.signal(&ALL, Signal::SIGKILL);
            self.wait_exit(&ALL, Duration::from_secs(5));
        }
    }
}

/// Waits for a `listening` line from `(role, rank)` (other lines are not
/// needed) and returns it.
fn wait_listening(
    rx: &mpsc::Receiver<Line>,
    sup: &mut Supervisor,
    role: &str,
    rank: usize,
    timeout: Duration,
) -> Outcome<serde_json::Value> {
    let deadline = Instant::now() + timeout;
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok((r, k, v)) if r == role && k == rank && v["event"] == "listening" => return Ok(v),
            Ok(_) | Err(_) => {}
        }
        if let Some(p) = sup.procs.iter_mut().find(|p| p.role == role && p.rank == rank) {
            if let Ok(Some(status)) = p.child.try_wait() {
                let log = sup.logs.join(format!("{role}-{rank}.log"));
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                // The binaries end with `Error: ...` (a backtrace may follow it).
                let last = text
                    .lines()
                    .rev()
                    .find(|l| l.starts_with("Error:"))
                    .or_else(|| text.lines().rev().find(|l| !l.trim().is_empty()))
                    .unwrap_or("")
                    .trim();
                return Err(Failure::new(
                    exit::ERROR,
                    format!("{role} {rank} exited ({status}) before listening: {last} (log: {})", log.display()),
                ));
            }
        }
        if Instant::now() > deadline {
            return Err(Failure::new(exit::ERROR, format!("{role} {rank} did not start listening within {timeout:?}")));
        }
    }
}

/// Follows the job's events on a thread of its own (reconnecting after an
/// orchestrator restart), sending `(seq, json, state)` to the returned channel.
fn follow(remote: Remote, job: String, stop: Arc<AtomicBool>) -> mpsc::Receiver<v1::JobEvent> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async move {
            let mut next = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let attempt = async {
                    let mut c = remote.client().await.map_err(|f| f.message)?;
                    let req = v1::WatchJobRequest { job_id: job.clone(), from_seq: next, no_follow: false };
                    let mut s = c.watch_job(remote.req(req)).await.map_err(|s| s.to_string())?.into_inner();
                    while let Some(e) = s.message().await.map_err(|s| s.to_string())? {
                        next = e.seq + 1;
                        if tx.send(e).is_err() {
                            return Ok(true);
                        }
                    }
                    Ok::<bool, String>(true)
                }
                .await;
                match attempt {
                    Ok(_) => return,
                    Err(e) => tracing::debug!(error = %e, "watch interrupted; reconnecting"),
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
    });
    rx
}

/// Runs the job; the exit code is 0 when it succeeded.
pub fn run(opts: DevOptions, stop: Arc<AtomicBool>) -> Outcome<i32> {
    let (text, cfg) = JobConfig::load(&opts.job, &opts.overrides).map_err(|e| Failure::new(exit::USAGE, e.to_string()))?;
    let bin_dir = match &opts.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf))
            .ok_or_else(|| Failure::new(exit::ERROR, "cannot find the sluice binaries; pass --bin-dir"))?,
    };
    let logs = cfg.train.out_dir.join("logs");
    std::fs::create_dir_all(&logs).map_err(|e| Failure::new(exit::ERROR, format!("{}: {e}", logs.display())))?;
    // SLUICE_TOKEN when set (so `sluice status` can reach the run), else a fresh one.
    let token = match std::env::var("SLUICE_TOKEN") {
        Ok(t) if !t.is_empty() => t,
        _ => (0..32).map(|_| format!("{:x}", rand::random::<u8>() & 15)).collect(),
    };
    let (tx, rx) = mpsc::channel::<Line>();
    let mut sup = Supervisor { bin_dir, logs: logs.clone(), token: token.clone(), job: None, procs: Vec::new(), lines: tx, json: opts.json };
    let bar = if opts.json { ProgressBar::hidden() } else { ProgressBar::new(cfg.train.steps) };
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}").expect("valid template"),
    );
    let text = absolute_paths(&text).map_err(|e| Failure::new(exit::USAGE, e))?;
    let result = supervise(&opts, &cfg, &text, &mut sup, &rx, &bar, &token, stop.clone());
    bar.finish_and_clear();
    match &result {
        // Interrupted or failed: stop learners and actors first (they checkpoint).
        Err(_) | Ok(exit::INTERRUPTED) => sup.shutdown(&["learner", "actor"], Duration::from_secs(60)),
        Ok(_) => sup.shutdown(&[], Duration::ZERO),
    }
    if !opts.json {
        eprintln!("logs: {}   checkpoints and metrics.jsonl: {}", logs.display(), cfg.train.out_dir.display());
    }
    result
}

/// The job's input paths made absolute (against the working directory), so the
/// submitted spec means what the file meant. Dev's workers then take `/` as their
/// models and data root: the file and the machine are the user's own.
fn absolute_paths(text: &str) -> Result<String, String> {
    let mut doc: toml::Table = toml::from_str(text).map_err(|e| e.to_string())?;
    let cwd = std::env::current_dir().map_err(|e| format!("working directory: {e}"))?;
    let fields: [&[&str]; 4] = [&["model", "path"], &["task", "path"], &["task", "eval_path"], &["reward", "llm", "prompt_file"]];
    for field in fields {
        let (last, parents) = field.split_last().expect("non-empty");
        let mut table = Some(&mut doc);
        for key in parents {
            table = table.and_then(|t| t.get_mut(*key)).and_then(toml::Value::as_table_mut);
        }
        if let Some(toml::Value::String(p)) = table.and_then(|t| t.get_mut(*last)) {
            if Path::new(p.as_str()).is_relative() {
                *p = cwd.join(&*p).display().to_string();
            }
        }
    }
    toml::to_string(&doc).map_err(|e| e.to_string())
}

#[allow(clippy::too_many_arguments)]
fn supervise(
    opts: &DevOptions,
    cfg: &JobConfig,
    spec_toml: &str,
    sup: &mut Supervisor,
    rx: &mpsc::Receiver<Line>,
    bar: &ProgressBar,
    token: &str,
    stop: Arc<AtomicBool>,
) -> Outcome<i32> {
    let s = |x: &str| x.to_string();
    // Orchestrator.
    let port = free_port()?;
    let store = opts.redis.clone().unwrap_or_else(|| "memory".into());
    let mut args = vec![s("--listen"), format!("127.0.0.1:{port}"), s("--store"), store, s("--lease-s"), opts.lease_s.to_string()];
    if let Some(at) = &opts.dashboard {
        // A port of our choosing, so a restarted orchestrator serves the same URL.
        let at = match at.strip_suffix(":0") {
            Some(host) => format!("{host}:{}", free_port()?),
            None => at.clone(),
        };
        args.extend([s("--dashboard"), at]);
    }
    sup.start("orchestrator", 0, "sluice-orchestrator", args, bar)?;
    let listening = wait_listening(rx, sup, "orchestrator", 0, Duration::from_secs(60))?;
    let addr = listening["addr"].as_str().unwrap_or_default();
    let remote = Remote { endpoint: format!("http://{addr}"), token: Some(token.to_string()), tls_ca: None };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let job = rt.block_on(async {
        let mut c = remote.client().await?;
        Ok::<_, Failure>(c.submit_job(remote.req(v1::SubmitJobRequest { spec_toml: spec_toml.to_string() })).await?.into_inner())
    })?;
    say(
        opts.json,
        bar,
        serde_json::json!({"event": "submitted", "source": "dev", "job": job.id, "endpoint": remote.endpoint}),
        format!("job {} on orchestrator {} (token in SLUICE_TOKEN of the children)", job.id, remote.endpoint),
    );
    if let Some(url) = listening["dashboard"].as_str() {
        // The token leaves the address bar at once (it becomes a cookie).
        let open = format!("{url}jobs/{}?token={}", job.id, sluice_dashboard::auth::encode_path(token));
        say(opts.json, bar, serde_json::json!({"event": "dashboard", "source": "dev", "url": open}), format!("dashboard: {open}"));
    }
    sup.job = Some(job.id.clone());
    let worker_args = |role_args: Vec<String>| {
        let mut a = vec![s("--orchestrator"), remote.endpoint.clone(), s("--job-id"), job.id.clone()];
        a.extend([s("--models-root"), s("/"), s("--data-root"), s("/")]);
        a.extend(role_args);
        a
    };
    // Reward server.
    let reward = if cfg.resources.reward_server {
        let port = free_port()?;
        let args = vec![opts.job.display().to_string(), s("--listen"), format!("127.0.0.1:{port}"), s("--job-id"), job.id.clone()];
        sup.start("reward", 0, "sluice-reward-server", args, bar)?;
        Some(format!("http://{}", wait_listening(rx, sup, "reward", 0, Duration::from_secs(60))?["addr"].as_str().unwrap_or_default()))
    } else {
        None
    };
    // Learners.
    let world = cfg.resources.learners;
    let rendezvous = format!("127.0.0.1:{}", free_port()?);
    // Rank 0's weights broadcast group, which every rank names to its actors.
    let broadcast = format!("127.0.0.1:{}", free_port()?);
    let mut learners = Vec::new();
    for rank in 0..world {
        let port = free_port()?;
        let mut a = vec![s("--listen"), format!("127.0.0.1:{port}"), s("--rank"), rank.to_string(), s("--world-size"), world.to_string()];
        // The run directory is the job file's (an orchestrated job's would be <runs-root>/<job id>).
        a.extend([s("--out"), cfg.train.out_dir.display().to_string()]);
        if world > 1 {
            a.extend([s("--rendezvous"), rendezvous.clone()]);
        }
        if cfg.rollout.weight_transport == sluice_core::kinds::WeightTransport::Broadcast {
            a.extend([s("--weights-broadcast"), broadcast.clone()]);
        }
        sup.start("learner", rank, "sluice-learner", worker_args(a), bar)?;
        learners.push(format!("http://127.0.0.1:{port}"));
    }
    for rank in 0..world {
        wait_listening(rx, sup, "learner", rank, Duration::from_secs(300))?;
    }
    // Actors.
    let n = cfg.resources.actors;
    for i in 0..n {
        let mut a = vec![s("--learner"), learners.join(","), s("--index"), i.to_string(), s("--actors"), n.to_string()];
        a.extend([s("--seed"), (cfg.train.seed + i as u64).to_string()]);
        if let Some(r) = &reward {
            a.extend([s("--reward"), r.clone()]);
        }
        sup.start("actor", i, "sluice-actor", worker_args(a), bar)?;
    }

    let events = follow(remote.clone(), job.id.clone(), stop.clone());
    let mut final_state: Option<i32> = None;
    let mut last_step = 0u64;
    loop {
        if stop.load(Ordering::SeqCst) {
            say(opts.json, bar, serde_json::json!({"event": "interrupted", "source": "dev"}), "interrupted: stopping".into());
            return Ok(exit::INTERRUPTED);
        }
        while rx.try_recv().is_ok() {}
        while let Ok(e) = events.try_recv() {
            let (state, step) = (e.state, e.event.as_ref().and_then(|ev| match &ev.body {
                Some(Body::Step(m)) => Some(m),
                _ => None,
            }));
            if let Some(m) = step {
                bar.set_position(m.step);
                bar.set_message(format!(
                    "reward {:.3}  eff-grad {:.2}  staleness {:.2}  {:.0} train tok/s",
                    m.reward_mean, m.effective_gradient_ratio, m.staleness_mean, m.train_tokens_per_s,
                ));
                last_step = m.step;
            }
            if opts.json {
                println!("{}", e.json);
            } else if step.is_none() || bar.is_hidden() {
                if let Some(line) = e.event.as_ref().and_then(describe) {
                    say(false, bar, serde_json::Value::Null, line);
                }
            }
            if matches!(JobState::try_from(state), Ok(JobState::Succeeded | JobState::Failed | JobState::Cancelled)) {
                final_state = Some(state);
            }
        }
        if let Some(state) = final_state {
            // Learners linger briefly so actors hear the end; then stop everything.
            sup.wait_exit(&["learner", "actor"], Duration::from_secs(30));
            let ok = state == JobState::Succeeded as i32;
            let step = last_step;
            say(
                opts.json,
                bar,
                serde_json::json!({"event": "finished", "source": "dev", "job": job.id, "state": state_name(state), "steps": step}),
                format!("job {} {} after {step} steps", job.id, state_name(state)),
            );
            return Ok(if ok { 0 } else { exit::JOB_FAILED });
        }
        // Restart crashed children (a clean exit before the job ends is a crash
        // too, except a learner or actor whose work is done).
        for i in 0..sup.procs.len() {
            let p = &mut sup.procs[i];
            if p.done {
                continue;
            }
            let Ok(Some(status)) = p.child.try_wait() else { continue };
            if status.success() && matches!(p.role, "learner" | "actor") {
                p.done = true;
                continue;
            }
            if p.role == "orchestrator" && opts.redis.is_none() {
                // Its memory store died with it: a new one would know no job and
                // every worker would wait for one forever.
                let msg = format!(
                    "the orchestrator exited ({status}) and the job's state, kept in its memory, went with it; \
                     run with --redis URL to survive an orchestrator restart"
                );
                say(opts.json, bar, serde_json::json!({"event": "failed", "source": "dev", "reason": msg}), msg.clone());
                return Err(Failure::new(exit::JOB_FAILED, msg));
            }
            if p.restarts >= opts.max_restarts {
                let msg = format!("{} {} crashed {} times; giving up", p.role, p.rank, p.restarts + 1);
                rt.block_on(async {
                    if let Ok(mut c) = remote.client().await {
                        let _ = c.cancel_job(remote.req(v1::CancelJobRequest { job_id: job.id.clone(), reason: msg.clone() })).await;
                    }
                });
                return Err(Failure::new(exit::JOB_FAILED, msg));
            }
            p.restarts += 1;
            let (role, rank, bin, args) = (p.role, p.rank, p.bin.clone(), p.args.clone());
            let child = sup.spawn_child(role, rank, &bin, &args)?;
            let pid = child.id();
            let p = &mut sup.procs[i];
            p.child = child;
            say(
                opts.json,
                bar,
                serde_json::json!({"event": "restarted", "source": "dev", "role": role, "rank": rank, "pid": pid, "exit": status.to_string(), "restarts": p.restarts}),
                format!("{role} {rank} exited ({status}); restarted (pid {pid})"),
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
