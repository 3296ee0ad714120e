//! The web dashboard in a real browser (Debian's headless Chromium through
//! chromedriver): a `sluice dev` job's page streams while the job runs;
//! finished jobs are read back from Redis by a new orchestrator, each page
//! shows its own job's steps, evaluations and completions; no token is
//! refused; `sluice dashboard RUN_DIR` follows a local run's metrics.jsonl.
//! A screenshot of the job page is left in `target/tmp/dashboard-job.png`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use sluice_testkit::browser::{http, Browser};
use sluice_testkit::Redis;

use crate::dev::{bin, job_file, spawn, TOKEN};
use crate::sluice;

fn browser() -> Option<Browser> {
    let b = Browser::start(1400, 2400);
    if b.is_none() {
        eprintln!("SKIPPED: /usr/bin/chromium or /usr/bin/chromedriver is missing (scripts/setup.sh installs Debian's chromium and chromium-driver)");
    }
    b
}

/// The steps of a run's `step` and `eval` events (from its metrics.jsonl).
fn run_steps(run: &Path, event: &str) -> Vec<u64> {
    let mut v: Vec<u64> = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["event"] == event)
        .map(|e| e["step"].as_u64().unwrap())
        .collect();
    v.dedup();
    v
}

/// What the job page drew, once its event stream ended.
const DRAWN: &str = r#"
const s = window.sluice;
if (!s || !s.done) return null;
const r = s.plots.reward;
const rows = [...document.querySelectorAll('#completions tbody tr')];
return {
  x: r.data[0],
  held_out: r.data[0].filter((_, i) => r.data[4][i] != null),
  points: document.getElementById('plot-reward').dataset.points,
  rows: rows.map(t => +t.cells[0].textContent),
  generation: s.plots.throughput.data[1],
  name: document.getElementById('job-name').textContent,
  state: s.state || null,
};"#;

fn numbers(v: &Value) -> Vec<u64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as u64).collect()
}

/// Opens a finished job's page and checks it shows exactly that run's steps,
/// held-out evaluations and completions.
fn check_job_page(browser: &Browser, dash: &str, id: &str, run: &Path) -> Value {
    browser.goto(&format!("{dash}jobs/{id}"));
    let v = browser.wait_for("the page drawn to the stream's end", DRAWN, Duration::from_secs(60), |v| !v.is_null() && v["state"] == "succeeded");
    let steps = run_steps(run, "step");
    assert_eq!(numbers(&v["x"]), steps, "{id}: one reward point per training step");
    assert_eq!(v["points"], steps.len().to_string());
    let evals: Vec<u64> = run_steps(run, "eval").into_iter().filter(|s| steps.contains(s)).collect();
    assert!(!evals.is_empty());
    assert_eq!(numbers(&v["held_out"]), evals, "{id}: held-out reward at each evaluated step");
    let rows = numbers(&v["rows"]);
    assert!(!rows.is_empty(), "{id}: completions shown");
    let all_evals = run_steps(run, "eval");
    assert!(rows.iter().all(|s| all_evals.contains(s)), "{id}: completions of its own evaluations only: {rows:?} vs {all_evals:?}");
    assert!(v["name"].as_str().unwrap().starts_with(id), "{v}");
    // The actors' generation speed reaches the learner's steps (each group carries its share of its batch's time).
    let generation = v["generation"].as_array().unwrap();
    assert!(generation.iter().all(|g| g.as_f64().is_some_and(|x| x > 0.0)), "generation tokens/s per step: {generation:?}");
    v
}

#[test]
fn the_dashboard_shows_jobs_live_and_finished_in_a_real_browser() {
    let Some(browser) = browser() else { return };
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    // Job A also has an intrinsic (ONI) reward: captions are response lines, labelled by a rubric.
    let oni = "[reward]\nint_coef = 0.5\nmodel = \"retrieval\"\nresponse_captions = \"lines\"\n[[reward.rubric]]\npattern = \"1\"\nlabel = \"helpful\"";
    let run_dev = |name: &str, steps: u64, watch: Option<&Browser>| -> String {
        let extra = if watch.is_some() { format!("eval_every = 4\n{oni}") } else { "eval_every = 4".to_string() };
        let job = job_file(dir.path(), name, steps, &extra);
        let mut cmd = sluice();
        cmd.args(["dev", job.to_str().unwrap(), "--json", "--redis", &redis.url]);
        let mut dev = spawn(name, cmd);
        let url = dev.wait_line("dashboard URL", Duration::from_secs(60), |v| v["event"] == "dashboard")["url"].as_str().unwrap().to_string();
        assert!(url.contains("?token="), "{url}");
        if let Some(b) = watch {
            // Opened as soon as the job is submitted: the page streams while it runs.
            b.goto(&url);
            assert!(!b.url().contains("token="), "the token left the address bar: {}", b.url());
            b.wait_for("events streamed live", "return window.sluice ? window.sluice.events : 0", Duration::from_secs(60), |v| {
                v.as_u64() >= Some(1)
            });
        }
        assert_eq!(dev.wait_exit(Duration::from_secs(300)), 0, "{name} completes");
        if let Some(b) = watch {
            // What the live page drew while the job ran: steps in order, none twice.
            let x = numbers(&b.eval("return window.sluice.plots.reward.data[0]"));
            assert!(!x.is_empty() && x.windows(2).all(|w| w[0] < w[1]) && x.iter().all(|&s| s <= steps), "live page steps: {x:?}");
        }
        dev.lines().iter().find(|v| v["event"] == "submitted").unwrap()["job"].as_str().unwrap().to_string()
    };
    let a = run_dev("dash-a", 12, Some(&browser));
    let b = run_dev("dash-b", 5, None);

    // A new orchestrator on the same Redis serves both finished jobs from their stored events.
    let mut cmd = Command::new(bin("sluice-orchestrator"));
    cmd.args(["--listen", "127.0.0.1:0", "--store", &redis.url, "--dashboard", "127.0.0.1:0"]);
    let mut orch = spawn("orchestrator", cmd);
    let listening = orch.wait_line("listening", Duration::from_secs(30), |v| v["event"] == "listening");
    let dash = listening["dashboard"].as_str().unwrap().to_string();
    let addr = dash.trim_start_matches("http://").trim_end_matches('/').to_string();

    // Without the token nothing is shown.
    let get = |path: &str, headers: &[(&str, &str)]| http(&addr, "GET", path, headers, None).unwrap();
    assert_eq!(get("/api/jobs", &[]).0, 401);
    assert_eq!(get(&format!("/api/jobs/{a}/events"), &[("Authorization", "Bearer guess")]).0, 401);
    let (code, body) = get(&format!("/jobs/{a}"), &[]);
    assert_eq!(code, 401);
    assert!(body.contains("<form") && !body.contains("plot-reward"), "a login form, not the job page: {body}");
    assert_eq!(get("/?token=guess", &[]).0, 401);
    let (code, body) = get("/api/jobs", &[("Authorization", &format!("Bearer {TOKEN}"))]);
    assert_eq!(code, 200);
    assert!(body.contains(&a) && body.contains(&b), "{body}");
    assert_eq!(get("/api/jobs/nope-1/events", &[("Authorization", &format!("Bearer {TOKEN}"))]).0, 404);

    // The jobs page, logged in by the token that becomes a cookie.
    browser.goto(&format!("{dash}?token={TOKEN}"));
    assert!(!browser.url().contains("token="), "{}", browser.url());
    let listed = |v: &Value| v.as_array().is_some_and(|ids| [&a, &b].iter().all(|id| ids.iter().any(|x| x == id.as_str())));
    browser.wait_for("both jobs listed", "return [...document.querySelectorAll('#jobs tbody tr')].map(r => r.dataset.job)", Duration::from_secs(30), listed);

    // Each job's page shows its own steps, evaluations and completions only.
    check_job_page(&browser, &dash, &a, &dir.path().join("run-dash-a"));
    // Actor 0 reported the reward server's annotation counters at least once.
    let labelled = browser.eval("const o = window.sluice.plots.oni; return o.data[1].filter(x => x != null)");
    assert!(!labelled.as_array().unwrap().is_empty(), "annotation (ONI) counters plotted: {labelled}");
    let png = browser.screenshot();
    assert!(png.starts_with(b"\x89PNG") && png.len() > 20_000, "a screenshot with something drawn ({} bytes)", png.len());
    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard-job.png");
    std::fs::write(&shot, &png).unwrap();
    eprintln!("screenshot: {}", shot.display());
    check_job_page(&browser, &dash, &b, &dir.path().join("run-dash-b"));
}

#[test]
fn sluice_dashboard_follows_a_local_run() {
    let Some(browser) = browser() else { return };
    let dir = tempfile::tempdir().unwrap();
    let job = crate::job(dir.path(), 3, 10, "eval_every = 3");
    let out = sluice().args(["train", job.to_str().unwrap(), "--json"]).env("OMP_NUM_THREADS", "1").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let run = dir.path().join("run");

    let mut cmd = sluice();
    cmd.args(["dashboard", run.to_str().unwrap(), "--listen", "127.0.0.1:0", "--json"]);
    // spawn() sets SLUICE_TOKEN: this dashboard wants it too.
    let mut dash = spawn("sluice dashboard", cmd);
    let url = dash.wait_line("listening", Duration::from_secs(30), |v| v["event"] == "listening")["url"].as_str().unwrap().to_string();
    browser.goto(&format!("{url}jobs/run?token={TOKEN}"));
    let steps = "return window.sluice ? window.sluice.steps : 0";
    browser.wait_for("the run's 3 steps", steps, Duration::from_secs(30), |v| v.as_u64() == Some(3));
    let rows = browser.eval("return document.querySelectorAll('#completions tbody tr').length");
    assert!(rows.as_u64() >= Some(1), "completions of the run's evaluations: {rows}");

    // A line appended to metrics.jsonl shows up without a reload.
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let mut last: Value = serde_json::from_str(text.lines().rev().find(|l| l.contains("\"event\":\"step\"")).unwrap()).unwrap();
    last["step"] = 4.into();
    let mut f = std::fs::OpenOptions::new().append(true).open(run.join("metrics.jsonl")).unwrap();
    std::io::Write::write_all(&mut f, format!("{last}\n").as_bytes()).unwrap();
    browser.wait_for("the appended step", steps, Duration::from_secs(30), |v| v.as_u64() == Some(4));
}
