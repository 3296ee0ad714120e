//! Data-plane benchmarks, each a ratio against a baseline measured in the same run.
//!
//! * `ingest`: rollouts/s and MB/s into one learner service from 1, 2 and 4
//!   concurrent PushRollouts streams (validation and group assembly included;
//!   a task drains the buffer in place of training), against a raw TCP copy of
//!   the same encoded bytes over as many loopback connections.
//! * `weights`: one full GetWeights download of a Qwen2-0.5B-sized tensor set
//!   (through the actor's resumable client), against a raw loopback copy of the
//!   same bytes.
//! * `broadcast`: one version of the same Qwen2-0.5B-sized tensor set (bf16)
//!   pushed by the learner's weights broadcast group (TCP collective) to 1
//!   and 2 members until each has it staged, against as many concurrent
//!   GetWeights downloads and as many raw loopback copies of the same bytes.
//! * `delta`: weight sync after real GRPO steps of the small preset in bf16
//!   (a trainer in this process publishing through the learner's
//!   `GrpcPublisher`): bytes and seconds of an actor's delta download one
//!   version behind, against a full download of the same version, at two
//!   learning rates (1e-6, a post-training rate, and 1e-3, the toy examples').
//! * `staleness`: wall-clock per training step of a real learner process with
//!   2 (and 1) real actor processes, max_staleness 4 against 0 (binaries from
//!   `--bin-dir`, default: next to this bench's `sluice-actor`).
//! * `stale-objective`: held-out reward of the arithmetic job (tiny preset, as
//!   in `examples/arithmetic.toml`) trained by a learner and two actors at
//!   max_staleness 0 and 4, with plain GRPO and with decoupled PPO, three
//!   seeds each (not a timing: a learning-curve comparison).
//!
//! * `time-to-reward`: wall-clock to the same held-out reward, synchronous
//!   against asynchronous (max_staleness 4, decoupled PPO), without and with
//!   interruptible generation and continuous batching, on long-tailed responses.
//!
//! `cargo bench -p sluice-actor --bench dataplane -- [ingest|weights|broadcast|delta|staleness|stale-objective|time-to-reward]... [--smoke]`
//! (scripts/bench-dataplane.sh builds the release binaries first).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Instant;

use prost::Message;
use sluice_actor::sync::WeightSync;
use sluice_learner::ingest::Limits;
use sluice_learner::service::Shared;
use sluice_proto::{packed, v1};
use tokio_stream::wrappers::ReceiverStream;

const JOB: &str = "bench";

/// `--smoke`: the smallest sizes, one pass, so CI can run the code (no figures).
fn smoke() -> bool {
    std::env::args().any(|a| a == "--smoke")
}

fn rollout(group: u64, index: u32, prompt: usize, response: usize) -> v1::Rollout {
    v1::Rollout {
        job_id: JOB.into(),
        actor_id: "bench".into(),
        group_id: group,
        group_size: 8,
        index,
        prompt_id: group,
        prompt_tokens: packed::tokens(&(0..prompt as i64).map(|i| (i * 7919) % 32000).collect::<Vec<_>>()),
        response_tokens: packed::tokens(&(0..response as i64).map(|i| (i * 104729 + index as i64) % 32000).collect::<Vec<_>>()),
        logprobs: packed::floats(&(0..response).map(|i| -((i % 97) as f32) / 10.0).collect::<Vec<_>>()),
        rewards: Some(v1::Rewards { extrinsic: 1.0, intrinsic: 0.0, total: 1.0 }),
        policy_version: 0,
        finish: v1::FinishReason::Stop as i32,
        ..Default::default()
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// A learner service in this process whose buffer is drained as fast as it fills.
fn start_learner(rt: &tokio::runtime::Runtime, chunk: usize) -> (String, Arc<Shared>) {
    let limits = Limits {
        job: JOB.into(),
        vocab_size: 32000,
        max_tokens: 1 << 16,
        max_rollout_bytes: 8 << 20,
        max_group_size: 1024,
        needs_logprobs: true,
    };
    let (shared, mut rx) = Shared::new(limits, 0, 1, 0, 4, 8, 64, chunk, Default::default());
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap();
    rt.spawn(async move { while rx.recv().await.is_some() {} });
    rt.spawn(sluice_learner::node::serve(shared.clone(), listener, None, None, std::future::pending()));
    (format!("http://{addr}"), shared)
}

/// Seconds to move `per_stream` bytes over each of `streams` loopback TCP connections.
fn raw_tcp(streams: usize, per_stream: &[u8]) -> f64 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let expected = per_stream.len();
    let server = std::thread::spawn(move || {
        let handles: Vec<_> = (0..streams)
            .map(|_| {
                let (mut s, _) = listener.accept().unwrap();
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 1 << 16];
                    let mut got = 0;
                    while got < expected {
                        let n = s.read(&mut buf).unwrap();
                        assert!(n > 0);
                        got += n;
                    }
                    s.write_all(&[1]).unwrap();
                })
            })
            .collect();
        handles.into_iter().for_each(|h| h.join().unwrap());
    });
    let t0 = Instant::now();
    std::thread::scope(|sc| {
        for _ in 0..streams {
            sc.spawn(|| {
                let mut s = TcpStream::connect(addr).unwrap();
                s.write_all(per_stream).unwrap();
                let mut ack = [0u8; 1];
                s.read_exact(&mut ack).unwrap();
            });
        }
    });
    let secs = t0.elapsed().as_secs_f64();
    server.join().unwrap();
    secs
}

fn ingest() {
    let (groups, g, prompt, response) = (if smoke() { 16u64 } else { 2000 }, 8u32, 128, std::env::var("RESP").ok().and_then(|v| v.parse().ok()).unwrap_or(512));
    let msgs: Vec<v1::Rollout> =
        (0..groups).flat_map(|k| (0..g).map(move |i| rollout(k + 1, i, prompt, response))).collect();
    let per_stream_bytes: usize = msgs.iter().map(|m| m.encoded_len() + 5).sum(); // + gRPC frame header
    let mut raw = Vec::with_capacity(per_stream_bytes);
    for m in &msgs {
        raw.push(0u8);
        raw.extend((m.encoded_len() as u32).to_be_bytes());
        m.encode(&mut raw).unwrap();
    }
    println!("## ingest: {groups} groups x {g} rollouts per stream, prompt {prompt} + response {response} tokens, {:.1} KB per rollout", per_stream_bytes as f64 / msgs.len() as f64 / 1024.0);
    println!("| streams | gRPC rollouts/s | gRPC MB/s | raw TCP MB/s | ratio |");
    println!("|---|---|---|---|---|");
    for streams in if smoke() { vec![2usize] } else { vec![1, 2, 4] } {
        let rt = runtime();
        let (endpoint, shared) = start_learner(&rt, 1 << 20);
        let clients: Vec<_> =
            (0..streams).map(|_| rt.block_on(sluice_actor::link::connect(&endpoint)).unwrap()).collect();
        let t0 = Instant::now();
        rt.block_on(async {
            let mut tasks = Vec::new();
            for mut c in clients {
                let msgs = msgs.clone();
                tasks.push(tokio::spawn(async move {
                    let (tx, rx) = tokio::sync::mpsc::channel(64);
                    let mut acks = c.push_rollouts(ReceiverStream::new(rx)).await.unwrap().into_inner();
                    let sender = tokio::spawn(async move {
                        for m in msgs {
                            tx.send(m).await.unwrap();
                        }
                        tx
                    });
                    let mut acked = 0;
                    while acked < groups {
                        let a = acks.message().await.unwrap().unwrap();
                        if a.group_id != 0 {
                            assert!(a.accepted);
                            acked += 1;
                        }
                    }
                    drop(sender.await);
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
        });
        let grpc_s = t0.elapsed().as_secs_f64();
        let accepted = shared.stats.lock().unwrap().accepted_rollouts;
        assert_eq!(accepted, groups * g as u64 * streams as u64);
        drop(rt);
        let tcp_s = raw_tcp(streams, &raw);
        let total_mb = (per_stream_bytes * streams) as f64 / 1e6;
        println!(
            "| {streams} | {:.0} | {:.0} | {:.0} | {:.2} |",
            accepted as f64 / grpc_s,
            total_mb / grpc_s,
            total_mb / tcp_s,
            tcp_s / grpc_s
        );
    }
}

fn weights() {
    let cfg = if smoke() {
        sluice_model::model::ModelConfig::preset("tiny", 100).unwrap()
    } else {
        sluice_model::model::ModelConfig::preset("qwen2-0.5b", 151_936).unwrap()
    };
    let t0 = Instant::now();
    let policy = sluice_model::hf::Policy::random(&cfg, tch::Device::Cpu, tch::Kind::BFloat16, 0);
    let params: i64 = policy.named_parameters().iter().map(|(_, t)| t.numel() as i64).sum();
    let bytes = sluice_model::weights::encode(&policy.named_parameters(), tch::Kind::BFloat16).unwrap();
    let encode_s = t0.elapsed().as_secs_f64();
    drop(policy);
    println!("## weights: {:.0}M parameters, bf16 on the wire, {:.2} GB (init + encode {encode_s:.1} s)", params as f64 / 1e6, bytes.len() as f64 / 1e9);
    println!("| chunk | gRPC GetWeights s | GB/s | raw TCP s | ratio |");
    println!("|---|---|---|---|---|");
    for chunk in if smoke() { vec![4096usize] } else { vec![1 << 20, 4 << 20] } {
        let rt = runtime();
        let (endpoint, shared) = start_learner(&rt, chunk);
        shared.publish(0, bytes.clone().into(), sluice_core::kinds::Dtype::Bf16, None);
        let mut client = rt.block_on(sluice_actor::link::connect(&endpoint)).unwrap();
        let mut sync = WeightSync::default();
        let t0 = Instant::now();
        let s = rt.block_on(sync.download(&mut client, JOB)).unwrap();
        let grpc_s = t0.elapsed().as_secs_f64();
        assert!(sync.blob() == Some(&bytes[..]) && s.version == 0);
        drop(sync);
        drop(rt);
        let tcp_s = raw_tcp(1, &bytes);
        println!(
            "| {} MiB | {grpc_s:.2} | {:.2} | {tcp_s:.2} | {:.2} |",
            chunk >> 20,
            bytes.len() as f64 / 1e9 / grpc_s,
            tcp_s / grpc_s
        );
    }
}

/// The weights broadcast group against GetWeights and raw TCP (see the module docs).
fn broadcast() {
    use sluice_collective::weights::{Member, Root};
    use sluice_collective::GroupAuth;
    let cfg = if smoke() {
        sluice_model::model::ModelConfig::preset("tiny", 100).unwrap()
    } else {
        sluice_model::model::ModelConfig::preset("qwen2-0.5b", 151_936).unwrap()
    };
    let policy = sluice_model::hf::Policy::random(&cfg, tch::Device::Cpu, tch::Kind::BFloat16, 0);
    let params = policy.named_parameters();
    let bytes = sluice_model::weights::encode(&params, tch::Kind::BFloat16).unwrap();
    let payload: usize = params.iter().map(|(_, t)| t.numel() * 2).sum();
    println!("## broadcast: {:.2} GB of bf16 parameters per member", payload as f64 / 1e9);
    println!("| members | broadcast s | gRPC GetWeights s (concurrent) | raw TCP s (concurrent) | broadcast / raw TCP | broadcast / gRPC |");
    println!("|---|---|---|---|---|---|");
    let auth = GroupAuth::new(Some("bench"), JOB);
    for members in [1usize, 2] {
        // Downloads first: each measurement starts on a machine the others left alone.
        let rt = runtime();
        let (endpoint, shared) = start_learner(&rt, 1 << 20);
        shared.publish(0, bytes.clone().into(), sluice_core::kinds::Dtype::Bf16, None);
        let t0 = Instant::now();
        rt.block_on(async {
            let downloads = (0..members).map(|_| {
                let endpoint = endpoint.clone();
                async move {
                    let mut client = sluice_actor::link::connect(&endpoint).await.unwrap();
                    let mut sync = WeightSync::default();
                    sync.download(&mut client, JOB).await.unwrap();
                }
            });
            futures_join(downloads).await;
        });
        let grpc_s = t0.elapsed().as_secs_f64();
        drop(rt);
        let mut root = Root::bind("127.0.0.1:0", &auth, 1).unwrap();
        let addr = root.local_addr().to_string();
        let staging = || params.iter().map(|(n, t)| (n.clone(), t.zeros_like())).collect::<Vec<_>>();
        let joined: Vec<Member> = (0..members).map(|_| Member::join(&addr, &auth, staging()).unwrap()).collect();
        // Version 1 forms the generation (once every member was admitted); version 2 is timed.
        let mut v = 0;
        loop {
            v += 1;
            if root.broadcast(v, &params).unwrap().members == members {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        for m in &joined {
            m.with_version(v, 1, std::time::Duration::from_secs(600), |_, _, _| ()).expect("first version staged");
        }
        let t0 = Instant::now();
        root.broadcast(v + 1, &params).unwrap();
        for m in &joined {
            m.with_version(v + 1, 1, std::time::Duration::from_secs(600), |_, _, _| ()).expect("version staged");
        }
        let bcast_s = t0.elapsed().as_secs_f64();
        drop(joined);
        drop(root);

        let tcp_s = raw_tcp(members, &bytes[..payload.min(bytes.len())]);
        println!("| {members} | {bcast_s:.2} | {grpc_s:.2} | {tcp_s:.2} | {:.2} | {:.2} |", tcp_s / bcast_s, grpc_s / bcast_s);
    }
}

/// Runs every future to completion concurrently (on the current task).
async fn futures_join<F: std::future::Future<Output = ()> + Send + 'static>(futures: impl Iterator<Item = F>) {
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    for h in handles {
        h.await.unwrap();
    }
}

/// Delta vs full weight sync after real GRPO steps (see the module docs).
fn delta() {
    use sluice_learner::publish::{GrpcPublisher, WeightPublisher};
    let steps = if smoke() { 2 } else { 10 };
    println!("## delta: small preset, bf16 on the wire, {steps} GRPO steps, 1 MiB chunks, loopback");
    println!("| lr | full bytes | delta bytes, mean (min-max) | delta / full bytes | full sync s | delta sync s | delta / full time | publish s (encode + delta) |");
    println!("|---|---|---|---|---|---|---|---|");
    for lr in [1e-6, 1e-3] {
        let dir = tempfile::tempdir().unwrap();
        let preset = if smoke() { "tiny" } else { "small" };
        let text = format!(
            "name = \"{JOB}\"\n[model]\npreset = \"{preset}\"\ndevice = \"cpu\"\n[task]\nkind = \"arithmetic\"\n\
             [grpo]\ngroup_size = 8\n[sampling]\nmax_new_tokens = 8\n\
             [train]\nprompts_per_step = 8\nlr = {lr}\nout_dir = \"{}\"\n",
            dir.path().join("out").display()
        );
        let cfg = sluice_core::config::JobConfig::from_toml(&text).unwrap();
        let mut trainer = sluice_learner::trainer::Trainer::new(cfg, false).unwrap();
        let rt = runtime();
        let (endpoint, shared) = start_learner(&rt, 1 << 20);
        let mut publisher = GrpcPublisher::new(shared.clone(), sluice_core::kinds::Dtype::Bf16, true);
        publisher.publish(0, trainer.policy()).unwrap();
        let mut client = rt.block_on(sluice_actor::link::connect(&endpoint)).unwrap();
        let mut sync = WeightSync::with_deltas();
        rt.block_on(sync.download(&mut client, JOB)).unwrap();
        let (mut full_b, mut delta_b, mut full_s, mut delta_s, mut encode_s) = (0usize, Vec::new(), 0.0, 0.0, 0.0);
        for _ in 0..steps {
            trainer.grpo_step().unwrap();
            let t0 = Instant::now();
            let p = publisher.publish(trainer.state().step, trainer.policy()).unwrap();
            encode_s += t0.elapsed().as_secs_f64();
            let d = rt.block_on(sync.download(&mut client, JOB)).unwrap();
            assert_eq!(d.version, p.version);
            delta_s += d.seconds;
            delta_b.push(d.bytes);
            let mut full = WeightSync::default();
            let f = rt.block_on(full.download(&mut client, JOB)).unwrap();
            assert!(full.blob() == sync.blob(), "the delta-built blob differs from the full one");
            full_s += f.seconds;
            full_b = f.bytes;
        }
        let n = steps as f64;
        let mean = delta_b.iter().sum::<usize>() as f64 / n;
        println!(
            "| {lr:e} | {full_b} | {mean:.0} ({}-{}) | {:.3} | {:.4} | {:.4} | {:.2} | {:.3} |",
            delta_b.iter().min().unwrap(),
            delta_b.iter().max().unwrap(),
            mean / full_b as f64,
            full_s / n,
            delta_s / n,
            delta_s / full_s,
            encode_s / n,
        );
    }
}

fn bin_dir() -> PathBuf {
    let args: Vec<String> = std::env::args().collect();
    match args.iter().position(|a| a == "--bin-dir") {
        Some(i) => PathBuf::from(&args[i + 1]),
        None => PathBuf::from(env!("CARGO_BIN_EXE_sluice-actor")).parent().unwrap().to_path_buf(),
    }
}

/// Seconds per step of a learner with `n_actors` actors (steps after the first, which includes warm-up).
fn run_job(bins: &std::path::Path, dir: &std::path::Path, staleness: u64, steps: u64, n_actors: usize) -> f64 {
    let body = format!(
        "name = \"bench\"\n[model]\npreset = \"small\"\ndevice = \"cpu\"\n[task]\nkind = \"arithmetic\"\ndigits = 2\n\
         [sampling]\nmax_new_tokens = 16\n[grpo]\ngroup_size = 8\n\
         [train]\nsteps = {steps}\nprompts_per_step = 8\neval_prompts = 8\nmicro_batch_size = 32\n\
         [rollout]\nmax_staleness = {staleness}\nbuffer_groups = 16\n"
    );
    let run = run_learner_and_actors(bins, dir, &format!("s{staleness}"), &body, n_actors);
    run.seconds_per_step(steps)
}

/// What a learner reported while a job ran.
struct Run {
    /// When each step event arrived.
    step_times: Vec<Instant>,
    /// (step, held-out reward) of each evaluation.
    evals: Vec<(u64, f64)>,
    /// Per step: mean staleness and mean behaviour weight.
    staleness: Vec<f64>,
    weights: Vec<f64>,
    /// Seconds from the learner's start to each evaluation.
    eval_seconds: Vec<f64>,
    /// Trained rollouts sampled by more than one version (interruptible generation).
    interrupted: u64,
}

impl Run {
    /// Seconds per step after the first (which includes warm-up).
    fn seconds_per_step(&self, steps: u64) -> f64 {
        (*self.step_times.last().unwrap() - self.step_times[0]).as_secs_f64() / (steps - 1) as f64
    }
}

/// Runs the job `body` with one learner and `n_actors` actor processes to the end.
fn run_learner_and_actors(bins: &std::path::Path, dir: &std::path::Path, tag: &str, body: &str, n_actors: usize) -> Run {
    let job = dir.join(format!("job-{tag}.toml"));
    std::fs::write(&job, body).unwrap();
    let out = dir.join(format!("out-{tag}"));
    let started = Instant::now();
    let mut learner = Command::new(bins.join("sluice-learner"))
        .args([job.to_str().unwrap(), "--listen", "127.0.0.1:0", "--out", out.to_str().unwrap(), "--fresh", "--linger-s", "2"])
        .env("OMP_NUM_THREADS", "1")
        .env("RUST_LOG", "error")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = learner.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<serde_json::Value>();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str(&line) {
                let _ = tx.send(v);
            }
        }
    });
    let listening = rx.iter().find(|v| v["event"] == "listening").unwrap();
    let endpoint = format!("http://{}", listening["addr"].as_str().unwrap());
    let mut actors: Vec<_> = (0..n_actors)
        .map(|i| {
            Command::new(bins.join("sluice-actor"))
                .args([job.to_str().unwrap(), "--learner", &endpoint, "--index", &i.to_string(), "--actors", &n_actors.to_string()])
                .env("OMP_NUM_THREADS", "1")
                .env("RUST_LOG", "error")
                .stdout(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut run = Run {
        step_times: Vec::new(),
        evals: Vec::new(),
        staleness: Vec::new(),
        weights: Vec::new(),
        eval_seconds: Vec::new(),
        interrupted: 0,
    };
    for v in rx.iter() {
        if v["event"] == "step" {
            run.step_times.push(Instant::now());
            run.staleness.push(v["staleness_mean"].as_f64().unwrap_or(0.0));
            run.weights.push(v["behaviour_weight_mean"].as_f64().unwrap_or(0.0));
            run.interrupted += v["interrupted_rollouts"].as_u64().unwrap_or(0);
        }
        if v["event"] == "eval" {
            run.evals.push((v["step"].as_u64().unwrap_or(0), v["reward_mean"].as_f64().unwrap_or(f64::NAN)));
            run.eval_seconds.push(started.elapsed().as_secs_f64());
        }
        if v["event"] == "finished" {
            break;
        }
    }
    let _ = learner.wait();
    for a in &mut actors {
        let _ = a.wait();
    }
    run
}

fn mean_sd(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let m = v.iter().sum::<f64>() / n;
    let var = if v.len() > 1 { v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0) } else { 0.0 };
    (m, var.sqrt())
}

/// Held-out reward at max_staleness 0 and 4, plain GRPO and decoupled PPO,
/// three seeds each, with the same job otherwise (examples/arithmetic.toml's
/// policy, task and optimiser).
fn stale_objective() {
    let bins = bin_dir();
    let dir = tempfile::tempdir().unwrap();
    let (steps, seeds, every) = if smoke() { (4u64, 1u64, 2u64) } else { (300, 3, 25) };
    println!("## stale-objective: learner + 2 actors, arithmetic (tiny preset), {steps} steps, {seeds} seeds; held-out reward");
    println!("| max_staleness | objective | final reward (mean of last 3 evals), mean ± sd | mean reward over all evals | mean staleness | mean behaviour weight |");
    println!("|---|---|---|---|---|---|");
    for staleness in [0u64, 4] {
        for decoupled in [false, true] {
            let (mut finals, mut areas, mut stale, mut w) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for seed in 0..seeds {
                let body = format!(
                    "name = \"bench\"\n[model]\npreset = \"tiny\"\ndevice = \"cpu\"\ninit_seed = {seed}\n\
                     [task]\nkind = \"arithmetic\"\ndigits = 1\noperands = 2\noperators = [\"+\"]\n\
                     [sampling]\ntemperature = 1.0\nmax_new_tokens = 4\n\
                     [grpo]\ngroup_size = 8\nclip_high = 0.28\ndecoupled = {decoupled}\n\
                     [train]\nsteps = {steps}\nprompts_per_step = 16\nlr = 1e-3\nsft_steps = 40\nsft_batch_size = 32\n\
                     sft_lr = 3e-3\neval_every = {every}\neval_prompts = 128\nseed = {seed}\n\
                     [rollout]\nmax_staleness = {staleness}\nbuffer_groups = 64\n"
                );
                let run = run_learner_and_actors(&bins, dir.path(), &format!("o{staleness}{decoupled}{seed}"), &body, 2);
                let r: Vec<f64> = run.evals.iter().map(|e| e.1).collect();
                let tail = &r[r.len().saturating_sub(3)..];
                finals.push(tail.iter().sum::<f64>() / tail.len().max(1) as f64);
                areas.push(r.iter().sum::<f64>() / r.len().max(1) as f64);
                stale.push(run.staleness.iter().sum::<f64>() / run.staleness.len().max(1) as f64);
                w.push(run.weights.iter().sum::<f64>() / run.weights.len().max(1) as f64);
                eprintln!("staleness {staleness} decoupled {decoupled} seed {seed}: evals {:?}", run.evals);
            }
            let (f, fsd) = mean_sd(&finals);
            let (a, asd) = mean_sd(&areas);
            let name = if decoupled { "decoupled PPO" } else { "GRPO" };
            println!(
                "| {staleness} | {name} | {f:.3} ± {fsd:.3} | {a:.3} ± {asd:.3} | {:.2} | {} |",
                mean_sd(&stale).0,
                if decoupled { format!("{:.3}", mean_sd(&w).0) } else { "—".into() }
            );
        }
    }
}

fn staleness() {
    let bins = bin_dir();
    let dir = tempfile::tempdir().unwrap();
    let steps = if smoke() { 3 } else { 21 };
    println!("## staleness: learner + actors, preset small, 8 prompts x 8 rollouts per step, {steps} steps");
    println!("| actors | max_staleness 0 (sync) s/step | max_staleness 4 (async) s/step | async / sync |");
    println!("|---|---|---|---|");
    for n in if smoke() { vec![1usize] } else { vec![2, 1] } {
        let sync_s = run_job(&bins, dir.path(), 0, steps, n);
        let async_s = run_job(&bins, dir.path(), 4, steps, n);
        println!("| {n} | {sync_s:.3} | {async_s:.3} | {:.2} |", async_s / sync_s);
    }
}

/// Wall-clock to the same held-out reward: synchronous GRPO against
/// asynchronous decoupled PPO (max_staleness 4), without and with interruptible
/// generation and continuous batching, on the arithmetic job with long-tailed
/// responses (answers take ~3 tokens, but a row that does not stop runs to 24).
/// The target is 90% of the synchronous run's final reward (same seed).
fn time_to_reward() {
    let bins = bin_dir();
    let dir = tempfile::tempdir().unwrap();
    let (steps, seeds, every) = if smoke() { (4u64, 1u64, 2u64) } else { (150, 3, 10) };
    let conditions = [
        ("sync (max_staleness 0), GRPO", 0u64, false, ""),
        ("async (4), decoupled", 4, true, ""),
        ("async (4), decoupled, interruptible, 32 slots", 4, true, "interruptible = true\n"),
    ];
    println!("## time-to-reward: learner + 2 actors, arithmetic (tiny preset), max_new_tokens 24, {steps} steps, {seeds} seeds");
    println!("| condition | final reward (mean of last 2 evals) | seconds to target, per seed | whole run s | sync / this (to target) | interrupted rollouts |");
    println!("|---|---|---|---|---|---|");
    let mut sync_to_target = vec![f64::NAN; seeds as usize];
    let mut targets = vec![f64::NAN; seeds as usize];
    for (name, staleness, decoupled, extra) in conditions {
        let (mut finals, mut to_target, mut wall, mut interrupted) = (Vec::new(), Vec::new(), Vec::new(), 0);
        for seed in 0..seeds {
            let slots = if extra.is_empty() { 0 } else { 32 };
            let body = format!(
                "name = \"bench\"\n[model]\npreset = \"tiny\"\ndevice = \"cpu\"\ninit_seed = {seed}\n\
                 [task]\nkind = \"arithmetic\"\ndigits = 1\noperands = 2\noperators = [\"+\"]\n\
                 [sampling]\ntemperature = 1.0\nmax_new_tokens = 24\nslots = {slots}\n\
                 [grpo]\ngroup_size = 8\nclip_high = 0.28\ndecoupled = {decoupled}\n\
                 [train]\nsteps = {steps}\nprompts_per_step = 16\nlr = 1e-3\nsft_steps = 40\nsft_batch_size = 32\n\
                 sft_lr = 3e-3\neval_every = {every}\neval_prompts = 128\nseed = {seed}\n\
                 [rollout]\nmax_staleness = {staleness}\nbuffer_groups = 64\n{extra}"
            );
            let run = run_learner_and_actors(&bins, dir.path(), &format!("t{staleness}{}{seed}", extra.len()), &body, 2);
            let r: Vec<f64> = run.evals.iter().map(|e| e.1).collect();
            let tail = &r[r.len().saturating_sub(2)..];
            let fin = tail.iter().sum::<f64>() / tail.len().max(1) as f64;
            if staleness == 0 {
                targets[seed as usize] = 0.9 * fin;
            }
            let target = targets[seed as usize];
            let t = r.iter().zip(&run.eval_seconds).find(|(&x, _)| x >= target).map_or(f64::NAN, |(_, &t)| t);
            if staleness == 0 {
                sync_to_target[seed as usize] = t;
            }
            eprintln!("{name} seed {seed}: evals {:?} at {:?} s", run.evals, run.eval_seconds);
            finals.push(fin);
            to_target.push(t);
            wall.push(*run.eval_seconds.last().unwrap_or(&f64::NAN));
            interrupted += run.interrupted;
        }
        // Over the seeds where both runs reached the target.
        let ratio: Vec<f64> = sync_to_target.iter().zip(&to_target).map(|(s, t)| s / t).filter(|r| r.is_finite()).collect();
        let (f, fsd) = mean_sd(&finals);
        let shown = |t: &f64| if t.is_finite() { format!("{t:.1}") } else { "not reached".into() };
        println!(
            "| {name} | {f:.3} ± {fsd:.3} | {} | {:.1} | {} | {interrupted} |",
            to_target.iter().map(shown).collect::<Vec<_>>().join(", "),
            mean_sd(&wall).0,
            if ratio.is_empty() { "—".to_string() } else { format!("{:.2} ({} of {seeds} seeds)", mean_sd(&ratio).0, ratio.len()) },
        );
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let want = |name: &str| args.is_empty() || args.iter().any(|a| a == name);
    if want("ingest") {
        ingest();
    }
    if want("weights") {
        weights();
    }
    if want("broadcast") {
        broadcast();
    }
    if want("delta") {
        delta();
    }
    if want("staleness") {
        staleness();
    }
    if want("stale-objective") {
        stale_objective();
    }
    if want("time-to-reward") {
        time_to_reward();
    }
}
