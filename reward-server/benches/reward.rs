//! Reward-server benchmarks, each with a baseline measured in the same run.
//!
//! * `score`: `Score` items/s over gRPC (one in-process server, batches of 256)
//!   for verifier-only and ONI (retrieval, 4 captions per item, rubric
//!   annotator, memory store) modes, against calling the verifiers directly.
//! * `annotate`: labels/s from the LLM annotator against a fake endpoint that
//!   answers after a fixed latency, against the ideal concurrency / latency.
//!
//! `cargo bench -p sluice-reward-server --bench reward -- [score|annotate]`

use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_core::config::JobConfig;
use sluice_core::tasks::Verifier;
use sluice_proto::v1::reward_client::RewardClient;
use sluice_proto::v1::{AnnotationStatsRequest, ScoreItem, ScoreRequest};

fn job(extra: &str) -> JobConfig {
    JobConfig::from_toml(&format!("name = \"bench\"\n[model]\npreset = \"tiny\"\n[task]\nkind = \"arithmetic\"\n{extra}")).unwrap()
}

fn items(n: usize, captions: usize, salt: usize) -> Vec<ScoreItem> {
    (0..n)
        .map(|i| ScoreItem {
            id: i.to_string(),
            verifier: "numeric".into(),
            answer: format!("{}", i * 7),
            response: format!("Let me add the numbers step by step. First {i}, then {}. So the answer is \\boxed{{{}}}", i * 6, i * 7),
            captions: (0..captions).map(|c| format!("you open door {} of room {}", c, (i + salt) % 512)).collect(),
            env_reward: None,
        })
        .collect()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn serve(rt: &tokio::runtime::Runtime, job: &JobConfig) -> String {
    let state = rt.block_on(sluice_reward_server::server::start(job, "bench")).unwrap();
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap();
    rt.spawn(sluice_reward_server::server::serve(state, listener, None, None, std::future::pending()));
    format!("http://{addr}")
}

/// `--smoke`: the smallest sizes, one pass, so CI can run the code (no figures).
fn smoke() -> bool {
    std::env::args().any(|a| a == "--smoke")
}

fn score() {
    let (batch, batches) = if smoke() { (8usize, 2usize) } else { (256, 200) };
    // Baseline: the verifier alone, in this thread.
    let direct_items = items(batch, 0, 0);
    let t0 = Instant::now();
    let mut sink = 0.0;
    for _ in 0..batches {
        for it in &direct_items {
            sink += Verifier::Numeric.score(&it.answer, &it.response);
        }
    }
    let direct = (batch * batches) as f64 / t0.elapsed().as_secs_f64();
    assert!(sink > 0.0);
    println!("## score: batches of {batch} numeric items (+ 4 captions each in ONI mode), {batches} batches");
    println!("| mode | gRPC items/s | direct verifier items/s | ratio |");
    println!("|---|---|---|---|");
    let rubric = "[reward]\nint_coef = 0.1\nmodel = \"retrieval\"\n[[reward.rubric]]\npattern = \"door [0-3]\"\nlabel = \"helpful\"\n";
    for (mode, extra, captions) in [("verifier only", "", 0usize), ("ONI retrieval", rubric, 4)] {
        let rt = runtime();
        let ep = serve(&rt, &job(extra));
        let reqs: Vec<ScoreRequest> = (0..batches)
            .map(|b| ScoreRequest { job_id: "bench".into(), items: items(batch, captions, b * 3) })
            .collect();
        let secs = rt.block_on(async {
            let mut c = RewardClient::connect(ep).await.unwrap();
            let t0 = Instant::now();
            for r in reqs {
                let s = c.score(r).await.unwrap().into_inner();
                assert_eq!(s.scores.len(), batch);
            }
            t0.elapsed().as_secs_f64()
        });
        let rate = (batch * batches) as f64 / secs;
        println!("| {mode} | {rate:.0} | {direct:.0} | {:.2} |", rate / direct);
    }
}

/// A fake chat-completions endpoint answering every request after `latency`.
fn fake_endpoint(latency: Duration) -> (String, Arc<AtomicU64>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let served = Arc::new(AtomicU64::new(0));
    let counter = served.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let counter = counter.clone();
            std::thread::spawn(move || {
                let mut conn = conn;
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Ok(k) = conn.read(&mut chunk) else { return };
                    if k == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..k]);
                    let text = String::from_utf8_lossy(&buf);
                    if let Some(end) = text.find("\r\n\r\n") {
                        let len = text[..end]
                            .lines()
                            .find_map(|l| l.to_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse::<usize>().unwrap()))
                            .unwrap_or(0);
                        if buf.len() >= end + 4 + len {
                            break;
                        }
                    }
                }
                std::thread::sleep(latency);
                let body = r#"{"choices":[{"message":{"role":"assistant","content":"LABEL: helpful"}}]}"#;
                let _ = write!(conn, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
                counter.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    (url, served)
}

fn annotate() {
    let latency = Duration::from_millis(50);
    let n = if smoke() { 8usize } else { 400 };
    println!("## annotate: {n} captions, fake endpoint answering after {} ms", latency.as_millis());
    println!("| concurrency | labels/s | ideal (concurrency / latency) | ratio |");
    println!("|---|---|---|---|");
    for concurrency in if smoke() { vec![4usize] } else { vec![4, 16] } {
        let (url, _served) = fake_endpoint(latency);
        let rt = runtime();
        let extra = format!(
            "[reward]\nint_coef = 0.1\nmodel = \"retrieval\"\nbatch_size = 64\n[reward.llm]\nbase_url = \"{url}\"\nmodel = \"judge\"\nconcurrency = {concurrency}\n"
        );
        let ep = serve(&rt, &job(&extra));
        let secs = rt.block_on(async {
            let mut c = RewardClient::connect(ep).await.unwrap();
            let req = ScoreRequest {
                job_id: "bench".into(),
                items: (0..n)
                    .map(|i| ScoreItem { id: i.to_string(), captions: vec![format!("caption {i}")], ..Default::default() })
                    .collect(),
            };
            let t0 = Instant::now();
            c.score(req).await.unwrap();
            loop {
                let s = c.annotation_statistics(AnnotationStatsRequest { job_id: "bench".into() }).await.unwrap().into_inner();
                if s.labelled as usize >= n {
                    break t0.elapsed().as_secs_f64();
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        let rate = n as f64 / secs;
        let ideal = concurrency as f64 / latency.as_secs_f64();
        println!("| {concurrency} | {rate:.0} | {ideal:.0} | {:.2} |", rate / ideal);
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let want = |name: &str| args.is_empty() || args.iter().any(|a| a == name);
    if want("score") {
        score();
    }
    if want("annotate") {
        annotate();
    }
}
