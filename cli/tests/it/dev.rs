//! `sluice dev`, the orchestrator and the job commands as real processes, with
//! a real `redis-server`: a job runs to completion, killed workers and a killed
//! orchestrator lose nothing, and bad input gets one clear message and the
//! documented exit code.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;
use sluice_testkit::{free_port, kill9, Proc, Redis};

use crate::sluice;

pub(crate) const TOKEN: &str = "dev-test-token";
/// Prompts (work items) per step of every test job.
pub(crate) const PPS: u64 = 16;

/// Starts `cmd` with the test token (see [`sluice_testkit::Proc`]: its own
/// process group; it and every child it announced die with the test).
pub(crate) fn spawn(name: &str, mut cmd: Command) -> Proc {
    cmd.env("SLUICE_TOKEN", TOKEN).env("OMP_NUM_THREADS", "1").env("RUST_LOG", "warn");
    Proc::spawn(name, cmd)
}

pub(crate) fn bin(name: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_BIN_EXE_sluice")).with_file_name(name);
    assert!(path.exists(), "{} is missing: run `cargo build --workspace` first", path.display());
    path
}

/// A small job: SFT warm-up then GRPO on single-digit addition; `extra` ends the file.
pub(crate) fn job_file(dir: &Path, name: &str, steps: u64, extra: &str) -> PathBuf {
    job_file_with(dir, name, steps, "", extra)
}

/// [`job_file`] with lines added to `[task]`.
fn job_file_with(dir: &Path, name: &str, steps: u64, task: &str, extra: &str) -> PathBuf {
    let text = format!(
        r#"name = "{name}"
[model]
preset = "tiny"
device = "cpu"
init_seed = 0
[task]
kind = "arithmetic"
digits = 1
operators = ["+"]
{task}
[sampling]
temperature = 1.0
max_new_tokens = 4
[grpo]
group_size = 8
clip_high = 0.28
[train]
steps = {steps}
prompts_per_step = {PPS}
lr = 1e-3
sft_steps = 40
sft_batch_size = 32
sft_lr = 3e-3
eval_prompts = 128
checkpoint_every = 4
out_dir = "{out}"
{extra}
"#,
        out = dir.join(format!("run-{name}")).display()
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// `sluice <args> --endpoint E --json` with the test token.
fn cli(endpoint: &str, args: &[&str]) -> Output {
    sluice().args(args).args(["--endpoint", endpoint, "--json"]).env("SLUICE_TOKEN", TOKEN).output().unwrap()
}

fn json_of(out: &Output) -> Value {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

/// An orchestrator on `port` (0: it picks one) and its endpoint.
fn orchestrator(store: &str, port: u16) -> (Proc, String) {
    let mut cmd = Command::new(bin("sluice-orchestrator"));
    cmd.args(["--listen", &format!("127.0.0.1:{port}"), "--store", store, "--lease-s", "2"]);
    let mut p = spawn("orchestrator", cmd);
    let v = p.wait_line("listening", Duration::from_secs(30), |v| v["event"] == "listening");
    let endpoint = format!("http://{}", v["addr"].as_str().expect("listening line has addr"));
    (p, endpoint)
}

/// Exact accounting of a finished job's work items.
fn check_accounting(status: &Value, steps: u64) {
    let p = &status["progress"];
    let n = |k: &str| p[k].as_u64().unwrap_or_else(|| panic!("{k} missing in {p}"));
    assert_eq!(status["state"], "succeeded", "{status}");
    assert_eq!(n("step"), steps);
    assert_eq!(n("work_created"), n("work_completed") + n("work_outstanding"), "{p}");
    assert!(n("work_dispatched") >= n("work_completed"), "{p}");
    assert!(n("work_completed") >= steps * PPS, "at least one step's worth of items per step: {p}");
    // What became of completed items, as the learners reported: every step's
    // groups are trained items (more when a restarted learner trained steps
    // after its checkpoint again), and no item is counted under two fates.
    let fated = ["work_trained", "work_dropped_stale", "work_dropped_invalid", "work_filtered", "work_unused"].map(n);
    assert!(n("work_trained") >= steps * PPS, "{p}");
    assert!(fated.iter().sum::<u64>() <= n("work_created"), "{p}");
    assert_eq!(n("work_dropped_invalid"), 0, "{p}");
}

/// The learner's training steps from metrics.jsonl: every step trained exactly
/// `prompts_per_step` groups (none lost, none twice).
fn trained_groups(run: &Path) -> Vec<u64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["event"] == "step")
        .map(|v| v["groups_trained"].as_u64().unwrap())
        .collect()
}

/// The README's main job as shipped (examples/arithmetic.toml, 300 steps, out_dir
/// moved into the test's directory): it learns as the README says, and the job
/// commands see it while it runs.
#[test]
fn dev_job_learns_and_the_cli_sees_it() {
    let dir = tempfile::tempdir().unwrap();
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/arithmetic.toml");
    let run = dir.path().join("run-devjob");
    let text = std::fs::read_to_string(example).unwrap();
    assert!(text.contains("out_dir = \"runs/arithmetic\"") && text.contains("steps = 300"), "the example changed; update this test");
    let text = text.replace("out_dir = \"runs/arithmetic\"", &format!("out_dir = \"{}\"", run.display())).replace("device = \"auto\"", "device = \"cpu\"");
    let job = dir.path().join("devjob.toml");
    std::fs::write(&job, text).unwrap();
    let mut cmd = sluice();
    cmd.args(["dev", job.to_str().unwrap(), "--json"]);
    let mut dev = spawn("sluice dev", cmd);
    let sub = dev.wait_line("submitted", Duration::from_secs(60), |v| v["event"] == "submitted");
    let (endpoint, id) = (sub["endpoint"].as_str().unwrap().to_string(), sub["job"].as_str().unwrap().to_string());

    // While it runs: status and logs answer; a wrong token is refused with exit 7.
    dev.wait_line("a step", Duration::from_secs(300), |v| v["event"] == "step");
    let s = json_of(&cli(&endpoint, &["status", &id]));
    assert_eq!(s["state"], "running", "{s}");
    assert!(s["progress"]["live_workers"].as_u64().unwrap() >= 2, "the learner and the actor hold leases: {s}");
    let logs = cli(&endpoint, &["logs", &id]);
    assert!(logs.status.success());
    assert!(String::from_utf8_lossy(&logs.stdout).lines().any(|l| l.contains("\"step\"")), "logs show steps");
    let listed = json_of(&cli(&endpoint, &["list"]));
    assert_eq!(listed[0]["id"], id);
    let wrong = sluice().args(["status", &id, "--endpoint", &endpoint]).env("SLUICE_TOKEN", "guess").output().unwrap();
    assert_eq!(wrong.status.code(), Some(7), "{}", String::from_utf8_lossy(&wrong.stderr));
    let unknown = cli(&endpoint, &["status", "no-such-job"]);
    assert_eq!(unknown.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no-such-job"));

    assert_eq!(dev.wait_exit(Duration::from_secs(600)), 0, "the job succeeded");
    let lines = dev.lines();
    let evals: Vec<f64> = lines.iter().filter(|v| v["event"] == "eval").map(|v| v["reward_mean"].as_f64().unwrap()).collect();
    // Before the warm-up, after it, then every 50 GRPO steps. The run is
    // asynchronous (timing moves it), so the check is on the mean of the
    // second half: GRPO itself raises held-out reward well above the warm-up.
    assert_eq!(evals.len(), 8, "{evals:?}");
    let late = evals[4..].iter().sum::<f64>() / 4.0;
    assert!(late - evals[1] >= 0.2, "held-out reward from step 150 on averages {late:.3}, after the warm-up {:.3}: {evals:?}", evals[1]);
    assert!(run.join("checkpoints/latest").exists(), "checkpoints written");
    assert_eq!(trained_groups(&run), vec![PPS; 300]);
    for role in ["orchestrator-0", "reward-0", "learner-0", "actor-0"] {
        assert!(run.join(format!("logs/{role}.log")).exists(), "{role} log");
    }
    assert!(lines.iter().any(|v| v["event"] == "finished" && v["state"] == "succeeded"));
}

#[test]
fn killed_actor_and_learner_lose_nothing_and_redis_keeps_the_job() {
    let redis = Redis::start();
    let url = redis.url.clone();
    let dir = tempfile::tempdir().unwrap();
    // Long enough that the kills below land before the job ends (it no longer
    // wastes time sampling rounds nobody trains).
    let steps = 200;
    let job = job_file(dir.path(), "faults", steps, "[resources]\nactors = 2\nreward_server = false\n[rollout]\nmax_staleness = 1");
    let mut cmd = sluice();
    cmd.args(["dev", job.to_str().unwrap(), "--json", "--redis", &url, "--lease-s", "2"]);
    let mut dev = spawn("sluice dev", cmd);
    let pid = |dev: &mut Proc, role: &str, rank: u64| {
        let v = dev.wait_line(role, Duration::from_secs(60), |v| v["event"] == "started" && v["role"] == role && v["rank"] == rank);
        v["pid"].as_u64().unwrap()
    };
    let mut actor = pid(&mut dev, "actor", 0);
    let learner = pid(&mut dev, "learner", 0);
    dev.wait_line("step 3", Duration::from_secs(300), |v| v["event"] == "step" && v["step"].as_u64() >= Some(3));
    // Kill actor 0 until a kill lands while it holds work items: the moment its
    // log (its stdout, which `sluice dev` copies there) says it took items, before
    // it has sampled and reported them, so its lease expires with items held and
    // the orchestrator hands them out again.
    let count = |dev: &Proc, event: &str| dev.lines().iter().filter(|v| v["event"] == event).count();
    let mut actor_log = Tail { path: dir.path().join("run-faults/logs/actor-0.log"), pos: 0 };
    // Every actor pid killed so far: `wait_line` finds the first matching line,
    // and earlier restarts' lines are still there.
    let mut killed = Vec::new();
    for attempt in 0.. {
        assert!(attempt < 16, "no kill of the actor landed while it held work");
        let lost = count(&dev, "worker_lost");
        actor_log.took_work();
        let deadline = Instant::now() + Duration::from_secs(60);
        while !actor_log.took_work() {
            assert!(Instant::now() < deadline, "actor 0 took no work items");
            std::thread::sleep(Duration::from_micros(200));
        }
        kill9(actor);
        killed.push(actor);
        let deadline = Instant::now() + Duration::from_secs(60);
        while count(&dev, "worker_lost") == lost {
            assert!(Instant::now() < deadline, "the killed actor's lease never expired");
            std::thread::sleep(Duration::from_millis(50));
        }
        if count(&dev, "redispatched") > 0 {
            eprintln!("the kill landed on attempt {attempt}");
            break;
        }
        let restarted = dev.wait_line("actor restart", Duration::from_secs(60), |v| {
            v["event"] == "restarted" && v["role"] == "actor" && v["rank"] == 0 && !killed.iter().any(|&k| v["pid"].as_u64() == Some(k))
        });
        actor = restarted["pid"].as_u64().unwrap();
    }
    dev.wait_line("step 10", Duration::from_secs(300), |v| v["event"] == "step" && v["step"].as_u64() >= Some(10));
    kill9(learner);
    dev.wait_line("learner restart", Duration::from_secs(60), |v| v["event"] == "restarted" && v["role"] == "learner");
    assert_eq!(dev.wait_exit(Duration::from_secs(900)), 0, "the job completes");

    // The orchestrator is gone with dev mode; a new one on the same Redis has the job.
    let (_orch, endpoint) = orchestrator(&url, 0);
    let id = dev.lines().iter().find(|v| v["event"] == "submitted").unwrap()["job"].as_str().unwrap().to_string();
    let status = json_of(&cli(&endpoint, &["status", &id]));
    check_accounting(&status, steps);
    assert!(status["progress"]["work_redispatched"].as_u64().unwrap() >= 1, "{status}");
    // The learner resumed from a checkpoint: steps after it ran again, each on
    // exactly prompts_per_step groups (the metrics file keeps both runs' lines).
    let trained = trained_groups(&dir.path().join("run-faults"));
    assert!(trained.len() as u64 >= steps, "{trained:?}");
    assert!(trained.iter().all(|&g| g == PPS), "{trained:?}");
    let logs = cli(&endpoint, &["logs", &id]);
    assert!(String::from_utf8_lossy(&logs.stdout).contains("worker_lost"));
}

/// What a log file gained since the last look.
struct Tail {
    path: PathBuf,
    pos: u64,
}

impl Tail {
    /// Whether the lines appended since the last call include an actor's `work` event.
    fn took_work(&mut self) -> bool {
        use std::io::{Read, Seek, SeekFrom};
        let Ok(mut f) = std::fs::File::open(&self.path) else { return false };
        let len = f.metadata().map_or(0, |m| m.len());
        if len <= self.pos {
            return false;
        }
        let mut text = String::new();
        f.seek(SeekFrom::Start(self.pos)).unwrap();
        f.take(len - self.pos).read_to_string(&mut text).unwrap_or_default();
        // Up to the last whole line; a partial one is read again next time.
        let whole = text.rfind('\n').map_or(0, |i| i + 1);
        self.pos += whole as u64;
        text[..whole].contains("\"event\":\"work\"")
    }
}

/// The `round` events of a job's log: each round's rollout budgets.
fn rounds(endpoint: &str, id: &str) -> Vec<Vec<u64>> {
    let logs = cli(endpoint, &["logs", id]);
    String::from_utf8_lossy(&logs.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["event"] == "round")
        .map(|v| v["sizes"].as_array().unwrap().iter().map(|n| n.as_u64().unwrap()).collect())
        .collect()
}

/// Two faults in one job: the orchestrator killed with SIGKILL and started
/// again on the same Redis at step 4, then Redis itself killed with SIGKILL for
/// two seconds and started again from its append-only file at step 12. The
/// job finishes with every work item accounted for and every step trained on
/// exactly `prompts_per_step` groups.
#[test]
fn orchestrator_restart_and_a_redis_outage_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut redis = Redis::start_durable(dir.path());
    let url = redis.url.clone();
    let steps = 40;
    // Knapsack budgets over 32 prompts that come round every other step.
    let job = job_file_with(
        dir.path(),
        "restart",
        steps,
        "train_size = 32",
        "[rollout]\nmax_staleness = 1\n[budget]\nstrategy = \"knapsack\"\nmin_outcomes = 4",
    );
    let (mut orch, endpoint) = orchestrator(&url, 0);
    let port: u16 = endpoint.rsplit(':').next().unwrap().parse().unwrap();
    let sub = json_of(&cli(&endpoint, &["submit", job.to_str().unwrap()]));
    let id = sub["id"].as_str().unwrap().to_string();
    assert_eq!(sub["state"], "queued");

    let worker = |binary: &str, extra: &[&str]| {
        let mut cmd = Command::new(bin(binary));
        cmd.args(["--orchestrator", &endpoint, "--job-id", &id]).args(extra);
        cmd.arg("--runs-root").arg(dir.path().join("runs"));
        spawn(if binary == "sluice-learner" { "learner" } else { "actor" }, cmd)
    };
    let mut learner = worker("sluice-learner", &["--listen", "127.0.0.1:0"]);
    let addr = learner.wait_line("listening", Duration::from_secs(60), |v| v["event"] == "listening")["addr"].as_str().unwrap().to_string();
    let mut actor = worker("sluice-actor", &["--learner", &format!("http://{addr}")]);
    learner.wait_line("step 4", Duration::from_secs(300), |v| v["event"] == "step" && v["step"].as_u64() >= Some(4));

    orch.kill9();
    let (_orch, _) = orchestrator(&url, port);

    learner.wait_line("step 12", Duration::from_secs(300), |v| v["event"] == "step" && v["step"].as_u64() >= Some(12));
    redis.kill9();
    // While Redis is down the orchestrator answers UNAVAILABLE (exit 5), not a stale state.
    let down = cli(&endpoint, &["status", &id]);
    assert_eq!(down.status.code(), Some(5), "{}", String::from_utf8_lossy(&down.stderr));
    std::thread::sleep(Duration::from_secs(2));
    redis.restart();

    assert_eq!(learner.wait_exit(Duration::from_secs(600)), 0);
    assert_eq!(actor.wait_exit(Duration::from_secs(60)), 0);
    let status = json_of(&cli(&endpoint, &["status", &id]));
    check_accounting(&status, steps);
    // One learner, never restarted: exactly the groups of its steps were trained,
    // though the orchestrator and Redis died while fates were being reported.
    assert_eq!(status["progress"]["work_trained"].as_u64(), Some(steps * PPS), "{status}");
    // A submitted job's run directory is <runs-root>/<job id>, not its out_dir.
    assert!(!dir.path().join("run-restart").exists());
    assert_eq!(trained_groups(&dir.path().join("runs").join(&id)), vec![PPS; steps as usize]);
    // Every round keeps the total (16 prompts x 8); once prompts have history,
    // knapsack moves rollouts between them.
    let rounds = rounds(&endpoint, &id);
    assert!(rounds.len() as u64 >= steps, "{rounds:?}");
    assert!(rounds.iter().all(|r| r.len() as u64 == PPS && r.iter().sum::<u64>() == PPS * 8), "{rounds:?}");
    assert!(rounds.iter().any(|r| r.iter().any(|&n| n != 8)), "some round is not uniform: {rounds:?}");
    // Cancelling a finished job is refused (exit 4) and changes nothing.
    let again = cli(&endpoint, &["cancel", &id]);
    assert_eq!(again.status.code(), Some(4), "{}", String::from_utf8_lossy(&again.stderr));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already succeeded"));
}

#[test]
fn cancel_stops_the_workers() {
    let dir = tempfile::tempdir().unwrap();
    let job = job_file(dir.path(), "cancel", 500, "");
    let (_orch, endpoint) = orchestrator("memory", 0);
    let id = json_of(&cli(&endpoint, &["submit", job.to_str().unwrap()]))["id"].as_str().unwrap().to_string();
    let mut cmd = Command::new(bin("sluice-learner"));
    cmd.args(["--orchestrator", &endpoint, "--listen", "127.0.0.1:0"]).arg("--runs-root").arg(dir.path().join("runs"));
    let mut learner = spawn("learner", cmd);
    let addr = learner.wait_line("listening", Duration::from_secs(60), |v| v["event"] == "listening")["addr"].as_str().unwrap().to_string();
    let mut cmd = Command::new(bin("sluice-actor"));
    cmd.args(["--orchestrator", &endpoint, "--learner", &format!("http://{addr}")]);
    let mut actor = spawn("actor", cmd);
    // Cancel while both are at work: the learner has trained, the actor has sent.
    learner.wait_line("a step", Duration::from_secs(300), |v| v["event"] == "step");
    actor.wait_line("a sent batch", Duration::from_secs(60), |v| v["event"] == "sent");
    let running = cli(&endpoint, &["delete", &id]);
    assert_eq!(running.status.code(), Some(4), "a running job is not deleted");
    assert!(String::from_utf8_lossy(&running.stderr).contains("cancel it first"));
    let c = json_of(&cli(&endpoint, &["cancel", &id, "--reason", "test says stop"]));
    assert_eq!(c["state"], "cancelled");
    assert_eq!(learner.wait_exit(Duration::from_secs(120)), 0, "the learner stops after its step");
    assert_eq!(actor.wait_exit(Duration::from_secs(120)), 0, "the actor stops after its batch");
    let st = json_of(&cli(&endpoint, &["status", &id]));
    assert!(st["progress"]["step"].as_u64().unwrap() < 500, "{st}");
    let s = json_of(&cli(&endpoint, &["status", &id]));
    assert_eq!(s["message"], "test says stop");
    let logs = sluice().args(["logs", &id, "--follow", "--endpoint", &endpoint]).env("SLUICE_TOKEN", TOKEN).output().unwrap();
    assert_eq!(logs.status.code(), Some(6), "following a cancelled job exits 6");
    // Ended, it can be deleted; then it is gone (exit 3), and so is a second delete.
    let listed = json_of(&cli(&endpoint, &["list", "--limit", "5"]));
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(json_of(&cli(&endpoint, &["delete", &id]))["deleted"], id.as_str());
    assert_eq!(cli(&endpoint, &["status", &id]).status.code(), Some(3));
    assert_eq!(cli(&endpoint, &["delete", &id]).status.code(), Some(3));
    assert_eq!(json_of(&cli(&endpoint, &["list"])), serde_json::json!([]));
}

/// A submitted job names paths on hosts it does not own: the orchestrator opens
/// none of them (a FIFO as `task.path` does not block it), and a worker keeps
/// the job inside its roots — the run directory is `<runs-root>/<job id>`
/// whatever `out_dir` says, and a model path outside `--models-root` fails the
/// job with the field named.
#[test]
fn submitted_jobs_stay_inside_the_workers_roots() {
    let dir = tempfile::tempdir().unwrap();
    let (_orch, endpoint) = orchestrator("memory", 0);
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_string()
    };
    // A FIFO nobody writes to: opening it would block forever.
    let fifo = dir.path().join("fifo.jsonl");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let data_job = write(
        "fifo.toml",
        &format!("name = \"fifo\"\n[model]\npreset = \"tiny\"\n[task]\nkind = \"dataset\"\npath = {:?}\n", fifo.display().to_string()),
    );
    let t = Instant::now();
    let sub = json_of(&cli(&endpoint, &["submit", &data_job]));
    assert_eq!(sub["state"], "queued");
    assert!(t.elapsed() < Duration::from_secs(10), "submit took {:?}", t.elapsed());
    assert_eq!(json_of(&cli(&endpoint, &["list"])).as_array().map(Vec::len), Some(1));
    cli(&endpoint, &["cancel", sub["id"].as_str().unwrap()]);

    let common = "[model]\npreset = \"tiny\"\ndevice = \"cpu\"\n[task]\nkind = \"arithmetic\"\ndigits = 1\n\
        [sampling]\nmax_new_tokens = 4\n[grpo]\ngroup_size = 4\n";
    let escape = write(
        "escape.toml",
        &format!("name = \"escape\"\n{common}[train]\nsteps = 2\nprompts_per_step = 4\nsft_steps = 0\ncheckpoint_every = 1\nout_dir = \"../victim\"\n"),
    );
    let id = json_of(&cli(&endpoint, &["submit", &escape]))["id"].as_str().unwrap().to_string();
    let runs = dir.path().join("runs");
    let worker = |binary: &str, args: &[&str]| {
        let mut cmd = Command::new(bin(binary));
        cmd.args(["--orchestrator", &endpoint, "--job-id", &id]).args(args).arg("--runs-root").arg(&runs);
        cmd.current_dir(dir.path());
        spawn(binary, cmd)
    };
    let mut learner = worker("sluice-learner", &["--listen", "127.0.0.1:0"]);
    let addr = learner.wait_line("listening", Duration::from_secs(60), |v| v["event"] == "listening")["addr"].as_str().unwrap().to_string();
    let mut actor = worker("sluice-actor", &["--learner", &format!("http://{addr}")]);
    assert_eq!(learner.wait_exit(Duration::from_secs(300)), 0);
    assert_eq!(actor.wait_exit(Duration::from_secs(60)), 0);
    assert!(runs.join(&id).join("checkpoints").is_dir(), "the run directory is <runs-root>/<job id>");
    assert!(!dir.path().join("victim").exists() && !dir.path().parent().unwrap().join("victim").exists());

    let models = dir.path().join("models");
    std::fs::create_dir_all(&models).unwrap();
    let outside = write(
        "outside.toml",
        "name = \"outside\"\n[model]\npath = \"/etc\"\n[task]\nkind = \"arithmetic\"\n[train]\nsteps = 2\n",
    );
    let id = json_of(&cli(&endpoint, &["submit", &outside]))["id"].as_str().unwrap().to_string();
    let mut cmd = Command::new(bin("sluice-learner"));
    cmd.args(["--orchestrator", &endpoint, "--job-id", &id, "--listen", "127.0.0.1:0"]);
    cmd.arg("--runs-root").arg(&runs).arg("--models-root").arg(&models);
    let out = cmd.env("SLUICE_TOKEN", TOKEN).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("model.path") && err.contains("outside"), "{err}");
    let status = json_of(&cli(&endpoint, &["status", &id]));
    assert_eq!(status["state"], "failed", "{status}");
    assert!(status["message"].as_str().unwrap().contains("model.path"), "{status}");
}

#[test]
fn bad_input_gets_one_clear_message_and_an_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[model]\npreset = \"tiny\"\n[task]\nkind = \"arithmetic\"\n[resources]\nlearners = 3\n").unwrap();
    for args in [vec!["dev", bad.to_str().unwrap()], vec!["submit", bad.to_str().unwrap()]] {
        let out = sluice().args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("resources.learners") && err.lines().count() == 1, "{args:?}: {err}");
    }
    // Nothing listens on the endpoint: exit 5.
    let out = sluice().args(["list", "--endpoint", &format!("http://127.0.0.1:{}", free_port())]).output().unwrap();
    assert_eq!(out.status.code(), Some(5), "{}", String::from_utf8_lossy(&out.stderr));
    // An unreachable Redis: the orchestrator says so and exits non-zero, and so does dev mode.
    let dead = format!("redis://127.0.0.1:{}", free_port());
    let out = Command::new(bin("sluice-orchestrator")).args(["--listen", "127.0.0.1:0", "--store", &dead]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&dead) && !err.contains("panicked"), "{err}");
    let good = job_file(dir.path(), "nored", 2, "");
    let out = sluice().args(["dev", good.to_str().unwrap(), "--redis", &dead]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("orchestrator") && err.contains(&dead), "{err}");
}

#[test]
fn a_bgpo_job_on_a_diffusion_policy_runs_through_dev_mode() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run-bgpo");
    let text = format!(
        "name = \"bgpo\"\nalgorithm = \"bgpo\"\n[model]\npreset = \"tiny-diffusion\"\ndevice = \"cpu\"\n\
         [task]\nkind = \"arithmetic\"\ndigits = 1\noperators = [\"+\"]\n\
         [sampling]\nmax_new_tokens = 4\ndiffusion_steps = 4\nblock_length = 2\n[grpo]\ngroup_size = 4\n[bgpo]\nmc_samples = 2\n\
         [train]\nsteps = 6\nprompts_per_step = 8\nsft_steps = 20\nsft_lr = 3e-3\neval_prompts = 16\ncheckpoint_every = 3\nout_dir = \"{}\"\n\
         [rollout]\nmax_staleness = 0\nweight_transport = \"broadcast\"\nweights_dtype = \"bf16\"\n\
         [resources]\nreward_server = false\n",
        run.display()
    );
    let job = dir.path().join("bgpo.toml");
    std::fs::write(&job, text).unwrap();
    let mut cmd = sluice();
    cmd.args(["dev", job.to_str().unwrap(), "--json"]);
    let mut dev = spawn("sluice dev", cmd);
    assert_eq!(dev.wait_exit(Duration::from_secs(600)), 0, "the BGPO job succeeded");
    let steps: Vec<Value> = dev.lines().into_iter().filter(|v| v["event"] == "step").collect();
    assert_eq!(steps.len(), 6);
    for s in &steps {
        assert_eq!(s["groups_trained"], 8, "{s}");
        assert_eq!(s["response_len_mean"], 4.0, "diffusion responses have the fixed length: {s}");
        assert!(s["grad_norm"].as_f64().unwrap().is_finite() && s["skipped_updates"] == 0, "{s}");
    }
    // Weights went by broadcast through dev mode (learner and actor in the
    // orchestrator's job group): every version after the first, synchronously.
    let log = |name: &str| -> Vec<Value> {
        std::fs::read_to_string(run.join("logs").join(name)).unwrap().lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
    };
    let synced: Vec<Value> = log("actor-0.log").into_iter().filter(|v| v["event"] == "synced").collect();
    assert!(synced.iter().filter(|v| v["broadcast"] == true).count() >= 4, "{synced:?}");
    assert!(log("learner-0.log").iter().any(|v| v["event"] == "published" && v["broadcast_members"] == 1));
    // The checkpoint is a diffusion policy directory (its config names the mask token).
    let latest = std::fs::read_to_string(run.join("checkpoints/latest")).unwrap();
    let cfg: Value = serde_json::from_str(&std::fs::read_to_string(run.join("checkpoints").join(latest.trim()).join("config.json")).unwrap()).unwrap();
    assert!(cfg["mask_token_id"].as_i64().is_some(), "{cfg}");
    // GRPO on a diffusion policy is refused before anything starts.
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[model]\npreset = \"tiny-diffusion\"\n[task]\nkind = \"arithmetic\"\n").unwrap();
    let out = sluice().args(["dev", bad.to_str().unwrap()]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("algorithm"), "{}", String::from_utf8_lossy(&out.stderr));
}

/// `kill -9` of `sluice dev` leaves no orphans: every child it started (in a
/// process group of its own, so the terminal's Ctrl-C reaches only dev) gets
/// SIGTERM from the kernel when dev dies and exits.
#[test]
fn children_die_with_a_killed_dev() {
    let dir = tempfile::tempdir().unwrap();
    let job = job_file(dir.path(), "orphans", 10_000, "");
    let mut cmd = sluice();
    cmd.args(["dev", job.to_str().unwrap(), "--json"]);
    let mut dev = spawn("sluice dev", cmd);
    dev.wait_line("step 1", Duration::from_secs(300), |v| v["event"] == "step" && v["step"].as_u64() >= Some(1));
    let children: Vec<u64> =
        dev.lines().iter().filter(|v| v["event"] == "started").filter_map(|v| v["pid"].as_u64()).collect();
    assert!(children.len() >= 4, "orchestrator, reward server, learner, actor: {children:?}");
    // Running, not a zombie waiting for whoever inherited it to reap it.
    let alive = |pid: u64| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|s| s.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')))
    };
    assert!(children.iter().all(|&p| alive(p)));
    kill9(dev.pid());
    let deadline = Instant::now() + Duration::from_secs(30);
    while children.iter().any(|&p| alive(p)) {
        let left: Vec<u64> = children.iter().copied().filter(|&p| alive(p)).collect();
        assert!(Instant::now() < deadline, "children outlived a killed `sluice dev`: {left:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// With the in-memory store, an orchestrator that dies takes the job with it:
/// `sluice dev` says so and fails (exit 6) instead of starting an empty one that
/// every worker would wait on forever.
#[test]
fn a_dead_memory_orchestrator_fails_the_job_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let job = job_file(dir.path(), "memory", 10_000, "");
    let mut cmd = sluice();
    cmd.args(["dev", job.to_str().unwrap(), "--json"]);
    let mut dev = spawn("sluice dev", cmd);
    let orch = dev.wait_line("orchestrator", Duration::from_secs(60), |v| v["event"] == "started" && v["role"] == "orchestrator");
    dev.wait_line("step 1", Duration::from_secs(300), |v| v["event"] == "step" && v["step"].as_u64() >= Some(1));
    kill9(orch["pid"].as_u64().unwrap());
    let failed = dev.wait_line("failed", Duration::from_secs(60), |v| v["event"] == "failed");
    assert!(failed["reason"].as_str().unwrap().contains("--redis"), "{failed}");
    assert_eq!(dev.wait_exit(Duration::from_secs(180)), 6, "the job failed");
    assert!(!dev.lines().iter().any(|v| v["event"] == "restarted" && v["role"] == "orchestrator"));
}
