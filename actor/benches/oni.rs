//! The ONI claim and the "training never waits" benchmark, on the text
//! adventure, with real processes: `sluice-reward-server`, `sluice-learner`
//! and one `sluice-actor` that scores through the reward server.
//!
//! * `claim`: for each seed, a job with the ONI intrinsic reward (rubric
//!   annotator, retrieval model) and the same job with extrinsic reward only
//!   (`int_coef = 0`), equal steps, equal seeds. Reports the share of
//!   training episodes that reach the treasure (the actor's extrinsic reward,
//!   before intrinsic shaping) per window of steps, and the learner's greedy
//!   success rate at the end; writes `oni-success.csv` and `oni-success.svg`
//!   to `--out` (default: the current directory).
//! * `stalled`: learner steps/s with an LLM annotator whose endpoint accepts
//!   connections and never answers, against the same job with no annotator
//!   (`model = "none"`).
//!
//! `plot` (alone) redraws the SVG from the CSV in `--out`.
//!
//! `cargo bench -p sluice-actor --bench oni -- [claim] [stalled] [plot] [--seeds 3]
//! [--steps 100] [--rooms 2] [--only oni|extrinsic] [--bin-dir target/release] [--out docs]`

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use serde_json::Value;

fn flag(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).map(|i| args[i + 1].clone())
}

fn bin_dir() -> PathBuf {
    flag("--bin-dir").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_BIN_EXE_sluice-actor")).parent().unwrap().to_path_buf()
    })
}

/// Rooms of the adventure (`--rooms`, default 2).
fn rooms() -> usize {
    flag("--rooms").map_or(2, |r| r.parse().unwrap())
}

/// The adventure job: `rooms()` rooms, 6 turns, 8 layouts, tiny policy, sync RL.
fn job(dir: &Path, name: &str, seed: u64, steps: u64, reward: &str) -> PathBuf {
    let rooms = rooms();
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            "name = \"{name}\"\n[model]\npreset = \"tiny\"\ndevice = \"cpu\"\ninit_seed = {seed}\n\
             [task]\nkind = \"adventure\"\nrooms = {rooms}\nmax_turns = 6\nlayouts = 8\nseed = {seed}\n\
             [sampling]\ntemperature = 1.0\nmax_new_tokens = 1\n\
             [grpo]\ngroup_size = 8\nclip_high = 0.28\nloss_agg = \"token-mean\"\n\
             [rollout]\nmax_staleness = 0\n\
             [train]\nsteps = {steps}\nprompts_per_step = 4\nlr = 3e-3\nseed = {seed}\neval_every = 0\neval_prompts = 8\n\
             checkpoint_every = 0\n\
             {reward}"
        ),
    )
    .unwrap();
    path
}

const RUBRIC: &str = "[[reward.rubric]]\npattern = \"take the key|unlock|treasure|you enter the|door is locked\"\nlabel = \"helpful\"\n";

/// A child process whose JSON-line stdout arrives on a channel; killed on drop.
struct Proc {
    child: Child,
    events: Receiver<Value>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(bin: &Path, args: &[&str]) -> Proc {
    let mut child = Command::new(bin)
        .args(args)
        .env("OMP_NUM_THREADS", "1")
        .env("RUST_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e}", bin.display()));
    let stdout = child.stdout.take().unwrap();
    let (tx, events) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                let _ = tx.send(v);
            }
        }
    });
    Proc { child, events }
}

fn listening(p: &Proc) -> String {
    let v = p.events.iter().find(|v| v["event"] == "listening").expect("process exited before listening");
    format!("http://{}", v["addr"].as_str().unwrap())
}

/// What one run produced.
struct Run {
    /// Per policy version: share of training episodes that reached the goal.
    success: Vec<f64>,
    /// Per policy version: mean reward trained on (extrinsic + intrinsic).
    reward: Vec<f64>,
    /// The learner's final greedy evaluation (success rate on the 8 layouts).
    eval: f64,
    /// Seconds per learner step, after the first.
    step_s: f64,
}

fn run(bins: &Path, job: &Path, out: &Path) -> Run {
    let reward = spawn(&bins.join("sluice-reward-server"), &[job.to_str().unwrap(), "--listen", "127.0.0.1:0"]);
    let reward_ep = listening(&reward);
    let learner = spawn(
        &bins.join("sluice-learner"),
        &[job.to_str().unwrap(), "--listen", "127.0.0.1:0", "--out", out.to_str().unwrap(), "--fresh", "--linger-s", "2"],
    );
    let learner_ep = listening(&learner);
    let actor = spawn(&bins.join("sluice-actor"), &[job.to_str().unwrap(), "--learner", &learner_ep, "--reward", &reward_ep]);
    let (mut first, mut last, mut steps, mut eval) = (None, Instant::now(), 0u64, 0.0);
    for v in learner.events.iter() {
        match v["event"].as_str() {
            Some("step") => {
                last = Instant::now();
                first.get_or_insert(last);
                steps += 1;
            }
            Some("eval") => eval = v["reward_mean"].as_f64().unwrap(),
            Some("finished") => break,
            _ => {}
        }
    }
    let (mut success, mut reward) = (Vec::new(), Vec::new());
    while let Ok(v) = actor.events.recv_timeout(Duration::from_secs(5)) {
        if v["event"] == "sent" {
            success.push(v["extrinsic_mean"].as_f64().unwrap());
            reward.push(v["reward_mean"].as_f64().unwrap());
        }
        if v["event"] == "done" {
            break;
        }
    }
    // Batch k was sampled by version k and trained at step k + 1; a batch sent after the last step is unused.
    success.truncate(steps as usize);
    reward.truncate(steps as usize);
    let step_s = (last - first.unwrap_or(last)).as_secs_f64() / steps.saturating_sub(1).max(1) as f64;
    Run { success, reward, eval, step_s }
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len().max(1) as f64
}

fn claim(bins: &Path, seeds: u64, steps: u64, out_dir: &Path) {
    let dir = tempfile::tempdir().unwrap();
    let windows = 4usize;
    let w = (steps as usize).div_ceil(windows);
    let rooms = rooms();
    println!("## ONI claim: text adventure ({rooms} rooms, 6 turns, 8 layouts), tiny policy, 4 prompts x 8 episodes per step, {steps} steps");
    println!("Share of training episodes reaching the treasure, by window of steps; final greedy success on the 8 layouts;");
    println!("mean reward trained on (extrinsic + intrinsic) in the last window. The two runs of a seed ran");
    println!("side by side on the machine, so s/step includes that contention.\n");
    let header: String = (0..windows).map(|k| format!(" steps {}-{} |", k * w + 1, ((k + 1) * w).min(steps as usize))).collect();
    println!("| reward | seed |{header} final greedy | trained reward, last window | s/step |");
    println!("|---|---|{}---|---|---|", "---|".repeat(windows));
    let mut csv = String::from("reward,seed,step,success\n");
    let mut curves: Vec<(String, Vec<Vec<f64>>)> = Vec::new();
    let only = flag("--only");
    let conditions: Vec<(&str, &str, String)> = [
        ("extrinsic only", "extrinsic", "[reward]\nint_coef = 0.0\nmodel = \"none\"\n".to_string()),
        ("ONI (rubric, retrieval)", "oni", format!("[reward]\nint_coef = 0.5\nbeta = 3.0\nmodel = \"retrieval\"\n{RUBRIC}")),
    ]
    .into_iter()
    .filter(|(_, short, _)| only.as_deref().is_none_or(|o| o == *short))
    .collect();
    // The two conditions of a seed run side by side (each job is a synchronous
    // actor/learner pair that leaves a core idle half the time).
    let mut results: Vec<Vec<Run>> = conditions.iter().map(|_| Vec::new()).collect();
    for seed in 0..seeds {
        let runs: Vec<Run> = std::thread::scope(|scope| {
            let handles: Vec<_> = conditions
                .iter()
                .map(|(_, short, reward)| {
                    let name = format!("oni-{short}-{seed}");
                    let path = job(dir.path(), &name, seed, steps, reward);
                    let out = dir.path().join(&name);
                    scope.spawn(move || run(bins, &path, &out))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (k, r) in runs.into_iter().enumerate() {
            results[k].push(r);
        }
    }
    for ((label, short, _), runs) in conditions.iter().zip(&results) {
        for (seed, r) in runs.iter().enumerate() {
            let cells: String = r.success.chunks(w).map(|c| format!(" {:.3} |", mean(c))).collect();
            let last = r.reward.chunks(w).last().map_or(0.0, mean);
            println!("| {label} | {seed} |{cells} {:.3} | {last:.3} | {:.2} |", r.eval, r.step_s);
            for (i, s) in r.success.iter().enumerate() {
                csv.push_str(&format!("{short},{seed},{},{s}\n", i + 1));
            }
        }
        curves.push((label.to_string(), runs.iter().map(|r| r.success.clone()).collect()));
    }
    std::fs::write(out_dir.join("oni-success.csv"), csv).unwrap();
    std::fs::write(out_dir.join("oni-success.svg"), svg(&curves, steps as usize)).unwrap();
    println!("\nwrote {0}/oni-success.csv and {0}/oni-success.svg", out_dir.display());
}

/// Success-rate curves (mean over seeds, smoothed over 10 steps) as an SVG line chart.
fn svg(curves: &[(String, Vec<Vec<f64>>)], steps: usize) -> String {
    let (w, h, pad) = (640.0, 360.0, 48.0);
    let smoothed: Vec<Vec<f64>> = curves
        .iter()
        .map(|(_, seeds)| {
            let n = seeds.iter().map(Vec::len).min().unwrap_or(0);
            let avg: Vec<f64> = (0..n).map(|i| mean(&seeds.iter().map(|c| c[i]).collect::<Vec<_>>())).collect();
            (0..n).map(|i| mean(&avg[i.saturating_sub(9)..=i])).collect()
        })
        .collect();
    let top = smoothed.iter().flatten().fold(0.0f64, |a, &b| a.max(b));
    let y_max = [0.05, 0.1, 0.2, 0.25, 0.5, 1.0].into_iter().find(|&m| m >= top).unwrap_or(1.0);
    let x = |i: f64| pad + (w - 2.0 * pad) * i / steps.max(1) as f64;
    let y = |v: f64| h - pad - (h - 2.0 * pad) * v / y_max;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <line x1=\"{pad}\" y1=\"{0}\" x2=\"{1}\" y2=\"{0}\" stroke=\"black\"/>\n<line x1=\"{pad}\" y1=\"{pad}\" x2=\"{pad}\" y2=\"{0}\" stroke=\"black\"/>\n",
        h - pad,
        w - pad
    );
    for k in 0..=4 {
        let v = y_max * k as f64 / 4.0;
        s.push_str(&format!("<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{v:.2}</text>\n", pad - 4.0, y(v) + 4.0));
    }
    s.push_str(&format!("<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">RL step ({steps})</text>\n", w / 2.0, h - 12.0));
    s.push_str(&format!(
        "<text x=\"14\" y=\"{}\" transform=\"rotate(-90 14 {})\" text-anchor=\"middle\">episodes reaching the goal</text>\n",
        h / 2.0,
        h / 2.0
    ));
    for (ci, ((label, seeds), line)) in curves.iter().zip(&smoothed).enumerate() {
        let colour = ["#d62728", "#1f77b4"][ci % 2];
        let pts: String =
            line.iter().enumerate().map(|(i, &v)| format!("{:.1},{:.1} ", x((i + 1) as f64), y(v))).collect();
        s.push_str(&format!("<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" points=\"{pts}\"/>\n"));
        s.push_str(&format!(
            "<text x=\"{}\" y=\"{}\" fill=\"{colour}\">{label} (mean of {} seeds)</text>\n",
            pad + 10.0,
            pad + 14.0 + 16.0 * ci as f64,
            seeds.len()
        ));
    }
    s.push_str("</svg>\n");
    s
}

/// Redraws `oni-success.svg` from the `oni-success.csv` in `dir` (`plot`).
fn replot(dir: &Path) {
    let text = std::fs::read_to_string(dir.join("oni-success.csv")).expect("oni-success.csv");
    let mut curves: Vec<(String, Vec<Vec<f64>>)> = Vec::new();
    let mut steps = 0;
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        let label = if f[0] == "oni" { "ONI (rubric, retrieval)" } else { "extrinsic only" };
        let seed: usize = f[1].parse().unwrap();
        steps = steps.max(f[2].parse().unwrap());
        if curves.last().is_none_or(|c| c.0 != label) {
            curves.push((label.to_string(), Vec::new()));
        }
        let seeds = &mut curves.last_mut().unwrap().1;
        if seeds.len() <= seed {
            seeds.resize(seed + 1, Vec::new());
        }
        seeds[seed].push(f[3].parse().unwrap());
    }
    std::fs::write(dir.join("oni-success.svg"), svg(&curves, steps)).unwrap();
    println!("wrote {}/oni-success.svg", dir.display());
}

/// An "LLM endpoint" that accepts connections and never answers.
fn stalled_endpoint() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming().map_while(Result::ok) {
            held.push(conn);
        }
    });
    url
}

fn stalled(bins: &Path, steps: u64) {
    let dir = tempfile::tempdir().unwrap();
    let llm = stalled_endpoint();
    println!("## RL steps/s with the annotator stalled vs no annotator (text adventure, {steps} steps)");
    println!("| annotator | s/step | steps/s |");
    println!("|---|---|---|");
    let none = job(dir.path(), "none", 0, steps, "[reward]\nint_coef = 0.0\nmodel = \"none\"\n");
    let stalled = job(
        dir.path(),
        "stalled",
        0,
        steps,
        &format!(
            "[reward]\nint_coef = 0.5\nmodel = \"retrieval\"\n[reward.llm]\nbase_url = \"{llm}\"\nmodel = \"judge\"\ntimeout_s = 600\nretries = 0\n"
        ),
    );
    let a = run(bins, &none, &dir.path().join("none"));
    let b = run(bins, &stalled, &dir.path().join("stalled"));
    println!("| none (model = none) | {:.3} | {:.3} |", a.step_s, 1.0 / a.step_s);
    println!("| LLM endpoint that never answers | {:.3} | {:.3} |", b.step_s, 1.0 / b.step_s);
    println!("\nstalled / none steps/s: {:.3}", a.step_s / b.step_s);
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut names = Vec::new();
    let mut i = 0;
    while i < args.len() {
        if args[i].starts_with("--") {
            i += if args[i] == "--bench" { 1 } else { 2 };
            continue;
        }
        names.push(args[i].clone());
        i += 1;
    }
    let want = |n: &str| names.is_empty() || names.iter().any(|a| a == n);
    if names == ["plot"] {
        return replot(&PathBuf::from(flag("--out").unwrap_or_else(|| ".".into())));
    }
    let bins = bin_dir();
    let steps: u64 = flag("--steps").map_or(100, |s| s.parse().unwrap());
    let seeds: u64 = flag("--seeds").map_or(3, |s| s.parse().unwrap());
    let out = PathBuf::from(flag("--out").unwrap_or_else(|| ".".into()));
    if want("claim") {
        claim(&bins, seeds, steps, &out);
    }
    if want("stalled") {
        stalled(&bins, steps.min(30));
    }

}
