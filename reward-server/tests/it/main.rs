//! The reward server as a real process, with a real `redis-server`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sluice_proto::v1::reward_client::RewardClient;
use sluice_proto::v1::{AnnotationStats, AnnotationStatsRequest, ItemScore, ScoreItem, ScoreRequest};

/// A child process killed on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A private redis-server (see [`sluice_testkit::Redis`]) and its URL.
fn redis() -> (sluice_testkit::Redis, String) {
    let r = sluice_testkit::Redis::start();
    let url = r.url.clone();
    (r, url)
}

fn server(job: &Path, store: &str) -> (Killed, String) {
    server_with(job, store, &[])
}

fn server_with(job: &Path, store: &str, extra: &[&str]) -> (Killed, String) {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_sluice-reward-server"));
    let mut child = Command::new(bin)
        .args([job.to_str().unwrap(), "--listen", "127.0.0.1:0", "--store", store])
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
    assert_eq!(v["event"], "listening");
    (Killed(child), format!("http://{}", v["addr"].as_str().unwrap()))
}

fn job(dir: &Path, extra: &str) -> PathBuf {
    let path = dir.join("job.toml");
    std::fs::write(
        &path,
        format!("name = \"rw\"\n[model]\npreset = \"tiny\"\n[task]\nkind = \"arithmetic\"\n{extra}"),
    )
    .unwrap();
    path
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

fn score(endpoint: &str, items: Vec<ScoreItem>) -> (Vec<ItemScore>, u64) {
    rt().block_on(async {
        let mut c = RewardClient::connect(endpoint.to_string()).await.unwrap();
        let r = c.score(ScoreRequest { job_id: "rw".into(), items }).await.unwrap().into_inner();
        (r.scores, r.reward_model_version)
    })
}

fn stats(endpoint: &str) -> AnnotationStats {
    rt().block_on(async {
        let mut c = RewardClient::connect(endpoint.to_string()).await.unwrap();
        c.annotation_statistics(AnnotationStatsRequest { job_id: "rw".into() }).await.unwrap().into_inner()
    })
}

fn item(id: &str, verifier: &str, answer: &str, response: &str, captions: &[&str]) -> ScoreItem {
    ScoreItem {
        id: id.into(),
        verifier: verifier.into(),
        answer: answer.into(),
        response: response.into(),
        captions: captions.iter().map(|c| c.to_string()).collect(),
        env_reward: None,
    }
}

const ONI: &str = "[reward]\nint_coef = 0.5\nmodel = \"retrieval\"\n\
                   [[reward.rubric]]\npattern = \"key\"\nlabel = \"helpful\"\n\
                   [[reward.rubric]]\npattern = \".\"\nlabel = \"unhelpful\"\n";

#[test]
fn a_bad_item_gets_an_error_and_the_rest_of_the_batch_is_scored() {
    let dir = tempfile::tempdir().unwrap();
    let (_s, ep) = server(&job(dir.path(), ONI), "memory");
    let (scores, _) = score(
        &ep,
        vec![
            item("ok", "numeric", "42", "so \\boxed{42}", &["you see a key"]),
            item("unknown", "python", "1", "1", &[]),
            item("empty-caption", "exact", "a", "a", &["   "]),
            item("countdown", "countdown", "10:2,5", "2*5", &[]),
            item("wrong", "numeric", "42", "41", &[]),
        ],
    );
    let by_id = |id: &str| scores.iter().find(|s| s.id == id).unwrap().clone();
    assert_eq!(scores.len(), 5);
    assert!(by_id("unknown").error.contains("unknown verifier `python`"), "{:?}", by_id("unknown"));
    assert!(by_id("empty-caption").error.contains("caption 0"), "{:?}", by_id("empty-caption"));
    let ok = by_id("ok");
    assert!(ok.error.is_empty() && ok.extrinsic == 1.0 && ok.total == 1.0, "{ok:?}");
    assert_eq!(by_id("countdown").extrinsic, 1.0);
    assert_eq!(by_id("wrong").total, 0.0);
    let refused = rt().block_on(async {
        let mut c = RewardClient::connect(ep.clone()).await.unwrap();
        c.score(ScoreRequest { job_id: "other".into(), items: vec![] }).await.unwrap_err()
    });
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
}

fn wait_labelled(ep: &str, n: u64) -> AnnotationStats {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = stats(ep);
        if s.labelled >= n {
            return s;
        }
        assert!(Instant::now() < deadline, "only {} of {n} captions labelled: {s:?}", s.labelled);
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn labels_are_learned_in_the_background_and_survive_a_restart_in_redis() {
    let dir = tempfile::tempdir().unwrap();
    let (_redis, url) = redis();
    let job = job(dir.path(), ONI);
    let (mut s1, ep) = server_with(&job, &url, &["--job-id", "rw-1"]);
    let episode = || vec![item("e", "", "", "", &["You found a KEY.", "a wall", "you found a key."])];
    // Unlabelled: intrinsic 0 now, nothing waits.
    let (first, v0) = score(&ep, episode());
    assert_eq!(first[0].intrinsic, 0.0);
    let st = wait_labelled(&ep, 2);
    assert!(st.annotator.contains("rubric"), "{}", st.annotator);
    // "key" helpful (twice in the episode: 1 + 1/2^3), "wall" unhelpful.
    let (second, v1) = score(&ep, episode());
    assert!((second[0].intrinsic - 1.125).abs() < 1e-12, "{:?}", second[0]);
    assert!((second[0].total - 0.5 * 1.125).abs() < 1e-12);
    assert!(v1 >= 1 && v1 >= v0, "the reward model version moves when labels arrive ({v0} -> {v1})");
    // A new reward-server process answers from the labels in Redis at once.
    drop(std::mem::replace(&mut s1, Killed(Command::new("true").spawn().unwrap())));
    let (_s2, ep2) = server_with(&job, &url, &["--job-id", "rw-1"]);
    let (third, _) = score(&ep2, episode());
    assert!((third[0].intrinsic - 1.125).abs() < 1e-12, "{:?}", third[0]);
    let st2 = stats(&ep2);
    assert_eq!((st2.labelled, st2.annotated), (2, 0), "{st2:?}");
    // Another job with the same name starts from no labels: labels are kept per job id.
    let (_s3, ep3) = server_with(&job, &url, &["--job-id", "rw-2"]);
    let (fourth, _) = score(&ep3, episode());
    assert_eq!(fourth[0].intrinsic, 0.0, "job rw-2 saw job rw-1's labels: {:?}", fourth[0]);
}

/// With a token, every Reward call without it (or with another) is refused
/// with UNAUTHENTICATED and scores nothing; gRPC health stays open for probes.
#[test]
fn a_token_protected_server_refuses_anonymous_calls() {
    let dir = tempfile::tempdir().unwrap();
    let (_s, ep) = server_with(&job(dir.path(), ONI), "memory", &["--token", "s3cret"]);
    // Refused calls carry captions: had one got through, they would be looked up and queued.
    let items = || vec![item("a", "exact", "x", "x", &["you see a key"])];
    rt().block_on(async {
        let mut c = RewardClient::connect(ep.clone()).await.unwrap();
        for token in [None, Some("guess")] {
            let req = sluice_proto::auth::request(ScoreRequest { job_id: "rw".into(), items: items() }, token);
            let err = c.score(req).await.expect_err("refused");
            assert_eq!(err.code(), tonic::Code::Unauthenticated, "token {token:?}: {err}");
            let req = sluice_proto::auth::request(AnnotationStatsRequest { job_id: "rw".into() }, token);
            assert_eq!(c.annotation_statistics(req).await.unwrap_err().code(), tonic::Code::Unauthenticated);
        }
        let plain = vec![item("a", "exact", "x", "x", &[])];
        let req = sluice_proto::auth::request(ScoreRequest { job_id: "rw".into(), items: plain }, Some("s3cret"));
        assert_eq!(c.score(req).await.unwrap().into_inner().scores[0].extrinsic, 1.0);
        let channel = tonic::transport::Channel::from_shared(ep.clone()).unwrap().connect().await.unwrap();
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
        let st = health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.unwrap().into_inner();
        assert_eq!(st.status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
    });
    // Nothing the anonymous calls sent was scored or counted.
    let st = rt().block_on(async {
        let mut c = RewardClient::connect(ep.clone()).await.unwrap();
        let req = sluice_proto::auth::request(AnnotationStatsRequest { job_id: "rw".into() }, Some("s3cret"));
        c.annotation_statistics(req).await.unwrap().into_inner()
    });
    assert_eq!((st.lookups, st.queued, st.labelled), (0, 0, 0), "{st:?}");
}

#[test]
fn queue_overflow_is_counted_and_not_fatal() {
    let dir = tempfile::tempdir().unwrap();
    // A queue of 4 captions, drained one at a time.
    let small = ONI.replacen("model = \"retrieval\"\n", "model = \"retrieval\"\nqueue_capacity = 4\nbatch_size = 1\n", 1);
    let (_s, ep) = server(&job(dir.path(), &small), "memory");
    let captions: Vec<String> = (0..200).map(|i| format!("caption number {i}")).collect();
    let refs: Vec<&str> = captions.iter().map(String::as_str).collect();
    let (scores, _) = score(&ep, vec![item("many", "", "", "", &refs)]);
    assert!(scores[0].error.is_empty());
    let st = stats(&ep);
    assert!(st.dropped > 0, "{st:?}");
    assert_eq!(st.queue_capacity, 4);
    assert!(st.labelled + st.dropped + st.queued <= 200, "{st:?}");
    // Still serving, and the survivors get labelled: once the queue is empty,
    // every one of the 201 captions was either labelled or dropped.
    let (again, _) = score(&ep, vec![item("x", "exact", "a", "a", &["one more"])]);
    assert_eq!(again[0].total, 1.0);
    let deadline = Instant::now() + Duration::from_secs(20);
    let st = loop {
        let st = stats(&ep);
        if st.queued == 0 && st.labelled + st.dropped == 201 {
            break st;
        }
        assert!(Instant::now() < deadline, "captions neither labelled nor dropped: {st:?}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(st.labelled >= 4, "at least a full queue of survivors is labelled: {st:?}");
    assert_eq!(st.annotated, st.labelled, "{st:?}");
}

/// A fake OpenAI-compatible endpoint: `mode` 0 answers (helpful when the
/// caption mentions a key; for a pair, prefers the one that mentions a key),
/// 1 answers after 2 s, 2 fails with 500, 3 returns garbage.
struct FakeLlm {
    base_url: String,
    mode: std::sync::Arc<std::sync::atomic::AtomicU8>,
    requests: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

fn fake_llm(mode: u8) -> FakeLlm {
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
    use std::sync::Arc;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base_url = format!("http://{}/v1", listener.local_addr().unwrap());
    let mode = Arc::new(AtomicU8::new(mode));
    let requests = Arc::new(AtomicU64::new(0));
    let (m, n) = (mode.clone(), requests.clone());
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let (m, n) = (m.clone(), n.clone());
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let body = loop {
                    let k = match conn.read(&mut chunk) {
                        Ok(0) | Err(_) => return,
                        Ok(k) => k,
                    };
                    buf.extend_from_slice(&chunk[..k]);
                    let text = String::from_utf8_lossy(&buf).to_string();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let len = text[..end]
                            .lines()
                            .find_map(|l| l.to_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse::<usize>().unwrap()))
                            .unwrap_or(0);
                        if buf.len() >= end + 4 + len {
                            break text[end + 4..].to_string();
                        }
                    }
                };
                n.fetch_add(1, Ordering::SeqCst);
                let mode = m.load(Ordering::SeqCst);
                if mode == 1 {
                    std::thread::sleep(Duration::from_secs(2));
                }
                let user = serde_json::from_str::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v["messages"][1]["content"].as_str().map(String::from))
                    .unwrap_or_default();
                let verdict = match user.split_once("\nMessage 2: ") {
                    Some((a, b)) => match (a.contains("key"), b.contains("key")) {
                        (true, false) => "ANSWER: 1",
                        (false, true) => "ANSWER: 2",
                        _ => "ANSWER: tie",
                    },
                    None if user.contains("key") => "LABEL: helpful",
                    None => "LABEL: unhelpful",
                };
                let (status, payload) = match mode {
                    2 => ("500 Internal Server Error", "{\"error\":\"overloaded\"}".to_string()),
                    3 => ("200 OK", "<html>this is not json".to_string()),
                    _ => (
                        "200 OK",
                        serde_json::json!({"choices": [{"message": {"role": "assistant", "content": format!("Thinking.\n{verdict}")}}]})
                            .to_string(),
                    ),
                };
                let _ = write!(
                    conn,
                    "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{payload}",
                    payload.len()
                );
            });
        }
    });
    FakeLlm { base_url, mode, requests }
}

fn llm_job(dir: &Path, llm: &FakeLlm) -> PathBuf {
    job(
        dir,
        &format!(
            "[reward]\nint_coef = 1.0\nmodel = \"retrieval\"\nbatch_size = 8\n\
             [reward.llm]\nbase_url = \"{}\"\nmodel = \"judge\"\ntimeout_s = 5\nretries = 1\nconcurrency = 2\n",
            llm.base_url
        ),
    )
}

#[test]
fn score_latency_stays_bounded_while_the_llm_stalls() {
    use std::sync::atomic::Ordering;
    let dir = tempfile::tempdir().unwrap();
    let llm = fake_llm(1);
    let (_s, ep) = server(&llm_job(dir.path(), &llm), "memory");
    let mut latencies = rt().block_on(async {
        let mut c = RewardClient::connect(ep.clone()).await.unwrap();
        let mut out = Vec::new();
        for i in 0..200 {
            let items = vec![item(&i.to_string(), "numeric", "3", "3", &[&format!("room {i} has a key"), &format!("wall {i}")])];
            let t0 = Instant::now();
            let r = c.score(ScoreRequest { job_id: "rw".into(), items }).await.unwrap().into_inner();
            out.push(t0.elapsed().as_secs_f64());
            assert_eq!(r.scores[0].extrinsic, 1.0);
        }
        out
    });
    latencies.sort_by(f64::total_cmp);
    let (p50, p99) = (latencies[100], latencies[197]);
    {
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "Score latency while the LLM stalls 2 s per request: p50 {:.2} ms, p99 {:.2} ms", p50 * 1e3, p99 * 1e3);
    }
    assert!(p99 < 0.25, "p99 {p99} s: scoring waited for the annotator");
    let st = stats(&ep);
    assert!(st.queued > 0 && st.annotator.contains("llm"), "{st:?}");
    // The endpoint recovers: labels arrive and intrinsic rewards follow.
    llm.mode.store(0, Ordering::SeqCst);
    wait_labelled(&ep, 4);
    assert!(llm.requests.load(Ordering::SeqCst) >= 4);
}

#[test]
fn failing_and_garbage_answers_are_survived() {
    use std::sync::atomic::Ordering;
    let dir = tempfile::tempdir().unwrap();
    let llm = fake_llm(2);
    let (_s, ep) = server(&llm_job(dir.path(), &llm), "memory");
    score(&ep, vec![item("a", "", "", "", &["a key on the floor"])]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while stats(&ep).failures == 0 {
        assert!(Instant::now() < deadline, "500s were never counted as failures");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(stats(&ep).labelled, 0, "a failed request stores no label");
    // Garbage bodies: unparseable answers count as unhelpful.
    llm.mode.store(3, Ordering::SeqCst);
    wait_labelled(&ep, 1);
    let (s, _) = score(&ep, vec![item("a", "", "", "", &["a key on the floor"])]);
    assert_eq!(s[0].intrinsic, 0.0, "garbage must not label a caption helpful");
    // A healthy endpoint labels a new caption helpful.
    llm.mode.store(0, Ordering::SeqCst);
    score(&ep, vec![item("b", "", "", "", &["the key opens the door"])]);
    wait_labelled(&ep, 2);
    let (s, _) = score(&ep, vec![item("b", "", "", "", &["the key opens the door"])]);
    assert_eq!(s[0].intrinsic, 1.0);
}

#[test]
fn the_classifier_answers_for_captions_not_labelled_yet() {
    let dir = tempfile::tempdir().unwrap();
    let (_redis, url) = redis();
    // Labels come from a rubric; the classifier generalises to unseen captions.
    let body = "[reward]\nint_coef = 1.0\nmodel = \"classification\"\ntrain_min_labels = 20\n\
                [[reward.rubric]]\npattern = \"opens|pick up\"\nlabel = \"helpful\"\n";
    let (_s, ep) = server(&job(dir.path(), body), &url);
    let places = ["kitchen", "cellar", "tower", "garden", "hall", "vault", "attic", "crypt"];
    let mut train = Vec::new();
    for (i, p) in places.iter().enumerate() {
        train.push(format!("the door to the {p} opens"));
        train.push(format!("you pick up the lamp in the {p}"));
        train.push(format!("you bump into the wall of the {p}"));
        train.push(format!("nothing happens in the {p} number {i}"));
    }
    let refs: Vec<&str> = train.iter().map(String::as_str).collect();
    score(&ep, vec![item("train", "", "", "", &refs)]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while stats(&ep).classifier_labels < 20 {
        assert!(Instant::now() < deadline, "the classifier was never trained: {:?}", stats(&ep));
        std::thread::sleep(Duration::from_millis(100));
    }
    // Unseen places: the first score comes from the classifier, before any label exists.
    let (s, _) = score(
        &ep,
        vec![
            item("good", "", "", "", &["the door to the library opens"]),
            item("bad", "", "", "", &["you bump into the wall of the library"]),
        ],
    );
    assert_eq!((s[0].intrinsic, s[1].intrinsic), (1.0, 0.0), "{s:?}");
    assert_eq!(stats(&ep).model, "classification");
}

#[test]
fn the_ranker_learns_llm_preferences_and_they_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (_redis, url) = redis();
    let llm = fake_llm(0);
    let body = format!(
        "[reward]\nint_coef = 1.0\nmodel = \"ranking\"\ntrain_min_labels = 12\nbatch_size = 8\n\
         [reward.llm]\nbase_url = \"{}\"\nmodel = \"judge\"\ntimeout_s = 5\nretries = 1\nconcurrency = 4\n",
        llm.base_url
    );
    let path = job(dir.path(), &body);
    let (s1, ep) = server(&path, &url);
    let places = ["kitchen", "cellar", "tower", "garden", "hall", "vault", "attic", "crypt"];
    let mut train = Vec::new();
    for p in places {
        train.push(format!("you find a key in the {p}"));
        train.push(format!("you bump into the wall of the {p}"));
        train.push(format!("you look around the {p}"));
    }
    let refs: Vec<&str> = train.iter().map(String::as_str).collect();
    let (first, _) = score(&ep, vec![item("train", "", "", "", &refs)]);
    assert_eq!(first[0].intrinsic, 0.0, "no ranker yet: no intrinsic reward");
    let deadline = Instant::now() + Duration::from_secs(30);
    while stats(&ep).ranker_preferences < 12 {
        assert!(Instant::now() < deadline, "the ranker was never trained: {:?}", stats(&ep));
        std::thread::sleep(Duration::from_millis(100));
    }
    let st = stats(&ep);
    assert_eq!((st.model.as_str(), st.preferences), ("ranking", 12), "{st:?}");
    // Held-out place; normalised scores: the caption with a key ranks above the others.
    let held_out = |ep: &str| {
        let (s, _) = score(
            ep,
            vec![
                item("key", "", "", "", &["you find a key in the library"]),
                item("wall", "", "", "", &["you bump into the wall of the library"]),
                item("look", "", "", "", &["you look around the library"]),
            ],
        );
        (s[0].intrinsic, s[1].intrinsic, s[2].intrinsic)
    };
    let (key, wall, look) = held_out(&ep);
    assert!(key > 0.5 && key > wall + 1.0 && key > look + 1.0, "key {key}, wall {wall}, look {look}");
    // The three new captions are judged too (one pair, and the odd one against the last caption judged).
    while stats(&ep).preferences < 14 {
        assert!(Instant::now() < deadline, "held-out captions were not judged: {:?}", stats(&ep));
        std::thread::sleep(Duration::from_millis(50));
    }
    // Preferences live in Redis: a new server retrains from them without asking the LLM again.
    drop(s1);
    let asked = llm.requests.load(std::sync::atomic::Ordering::SeqCst);
    let (_s2, ep2) = server(&path, &url);
    let deadline = Instant::now() + Duration::from_secs(30);
    while stats(&ep2).ranker_preferences < 12 {
        assert!(Instant::now() < deadline, "the ranker was not retrained after a restart: {:?}", stats(&ep2));
        std::thread::sleep(Duration::from_millis(100));
    }
    let (key2, wall2, _) = held_out(&ep2);
    assert!(key2 > wall2 + 1.0, "after restart: key {key2}, wall {wall2}");
    assert_eq!(llm.requests.load(std::sync::atomic::Ordering::SeqCst), asked, "nothing was judged twice");
}
