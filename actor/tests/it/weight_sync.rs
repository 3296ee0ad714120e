//! Weight sync: bit-exact after a sync; an interrupted download leaves the
//! actor's policy as it was and resumes (or restarts after a learner restart).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use sluice_actor::sync::{apply, WeightSync};
use sluice_core::config::JobConfig;
use sluice_model::hf::{load_policy, Policy};

use crate::harness::*;

/// Forwards one connection to `upstream` and cuts it after `limit` bytes have
/// come back from the server. Returns the proxy's endpoint.
fn cutting_proxy(upstream: &str, limit: usize) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let upstream = upstream.trim_start_matches("http://").to_string();
    let passed = Arc::new(AtomicUsize::new(0));
    let counter = passed.clone();
    std::thread::spawn(move || {
        let (client, _) = listener.accept().unwrap();
        let server = TcpStream::connect(&upstream).unwrap();
        let (mut c_in, mut s_out) = (client.try_clone().unwrap(), server.try_clone().unwrap());
        std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            while let Ok(n) = c_in.read(&mut buf) {
                if n == 0 || s_out.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
        let (mut s_in, mut c_out) = (server, client);
        let mut buf = [0u8; 8192];
        loop {
            let n = match s_in.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let room = limit.saturating_sub(counter.load(Ordering::SeqCst)).min(n);
            let _ = c_out.write_all(&buf[..room]);
            counter.fetch_add(room, Ordering::SeqCst);
            if room < n {
                break;
            }
        }
        let _ = c_out.shutdown(Shutdown::Both);
        let _ = s_in.shutdown(Shutdown::Both);
    });
    (endpoint, passed)
}

fn params(p: &Policy) -> HashMap<String, tch::Tensor> {
    p.named_parameters().into_iter().map(|(n, t)| (n, t.detach().copy())).collect()
}

fn same_bits(a: &HashMap<String, tch::Tensor>, b: &HashMap<String, tch::Tensor>) -> bool {
    a.len() == b.len() && a.iter().all(|(n, t)| b.get(n).is_some_and(|u| t.equal(u)))
}

#[test]
fn interrupted_sync_keeps_the_old_version_then_resumes_and_matches_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let body = format!("{TINY}[train]\nsteps = 100\n[rollout]\nweight_chunk_bytes = 1024\n");
    let job = write_job(dir.path(), "ws", &body);
    let cfg = JobConfig::from_file(&job).unwrap();
    let out = dir.path().join("out");
    let mut learner = Learner::start(&job, &["--out", out.to_str().unwrap(), "--fresh"]);
    learner.proc.wait_line("published", std::time::Duration::from_secs(60), |v| v["event"] == "published");

    // The actor's policy starts from a different init, so a copy is visible.
    let mut actor_model = cfg.model.clone();
    actor_model.init_seed = 99;
    let (policy, _) = load_policy(&actor_model).unwrap();
    let before = params(&policy);
    let learner_params = params(&load_policy(&cfg.model).unwrap().0);
    assert!(!same_bits(&before, &learner_params));

    let rt = runtime();
    let mut sync = WeightSync::default();
    // 1. Cut mid-stream: an error, some bytes held, the policy untouched.
    let (via_proxy, _) = cutting_proxy(&learner.endpoint, 120_000);
    let cut = rt.block_on(async { sync.download(&mut client(&via_proxy).await, "ws").await });
    assert!(cut.is_err(), "the download should fail when the connection is cut");
    let held = sync.partial_bytes();
    assert!(held > 0, "nothing was received before the cut");
    assert!(same_bits(&params(&policy), &before), "a partial download changed the policy");

    // 2. Resume directly: continues at the held byte and ends bit-exact.
    let synced = rt.block_on(async { sync.download(&mut client(&learner.endpoint).await, "ws").await }).unwrap();
    assert_eq!(synced.resumed_from, held as u64);
    assert!(synced.bytes > held);
    apply(&policy, sync.blob().unwrap(), synced.version).unwrap();
    assert!(same_bits(&params(&policy), &learner_params), "synced weights differ from the learner's");

    // 3. Learner restarted between the cut and the retry: the old bytes are
    //    useless (another incarnation), so the download starts over.
    let mut sync = WeightSync::default();
    let (policy_before, _) = load_policy(&actor_model).unwrap();
    let policy = policy_before;
    let (via_proxy, _) = cutting_proxy(&learner.endpoint, 120_000);
    assert!(rt.block_on(async { sync.download(&mut client(&via_proxy).await, "ws").await }).is_err());
    assert!(sync.partial_bytes() > 0);
    let port = learner.port();
    learner.proc.kill9();
    let mut restarted = Learner::start_on(&job, port, &["--out", out.to_str().unwrap(), "--fresh"]);
    restarted.proc.wait_line("published", std::time::Duration::from_secs(60), |v| v["event"] == "published");
    let synced = rt.block_on(async { sync.download(&mut client(&restarted.endpoint).await, "ws").await }).unwrap();
    assert_eq!(synced.resumed_from, 0, "a download from another incarnation must start over");
    apply(&policy, sync.blob().unwrap(), synced.version).unwrap();
    assert!(same_bits(&params(&policy), &learner_params));
}

/// After real training steps, what an actor downloads and applies is the
/// learner's trained weights bit for bit: in f32 exactly the checkpoint of the
/// same version, in bf16 exactly that checkpoint rounded to bf16 (the wire
/// dtype) and widened back by the actor. Small chunks, so a dropped, repeated
/// or reordered chunk would show.
#[test]
fn trained_weights_reach_the_actor_bit_for_bit_in_f32_and_bf16() {
    for wire in ["f32", "bf16"] {
        let dir = tempfile::tempdir().unwrap();
        let body = format!(
            "{TINY}[sampling]\nmax_new_tokens = 4\n[grpo]\ngroup_size = 4\n\
             [train]\nsteps = 3\nprompts_per_step = 4\nlr = 0.01\nsft_steps = 10\nsft_lr = 0.003\neval_prompts = 4\ncheckpoint_every = 3\n\
             [rollout]\nmax_staleness = 1\nweights_dtype = \"{wire}\"\nweight_chunk_bytes = 4096\n"
        );
        let job = write_job(dir.path(), "trained", &body);
        let cfg = JobConfig::from_file(&job).unwrap();
        let out = dir.path().join("out");
        let mut learner = Learner::start(&job, &["--out", out.to_str().unwrap(), "--linger-s", "60"]);
        let mut a = actor(&job, &learner.endpoint, 0, 1, &[]);
        learner.wait_finished(std::time::Duration::from_secs(240));
        a.wait_line("done", std::time::Duration::from_secs(60), |v| v["event"] == "done");
        assert_eq!(status(&learner.endpoint).version, 3);

        let trained: HashMap<String, tch::Tensor> = read_tensors(&latest_weights(&out)).into_iter().collect();
        let init = params(&load_policy(&cfg.model).unwrap().0);
        let moved = init.iter().filter(|(n, t)| !t.equal(&trained[*n])).count();
        // (The supervised warm-up moves every tensor; GRPO steps may add little.)
        assert!(moved * 2 > init.len(), "training changed only {moved} of {} tensors", init.len());

        let rt = runtime();
        let mut sync = WeightSync::default();
        let synced = rt.block_on(async { sync.download(&mut client(&learner.endpoint).await, "trained").await }).unwrap();
        let bytes = sync.blob().unwrap();
        assert_eq!(synced.version, 3, "the newest version is served");
        let wire_kind = if wire == "bf16" { tch::Kind::BFloat16 } else { tch::Kind::Float };
        let on_wire: HashMap<String, tch::Tensor> = sluice_model::weights::decode(bytes).unwrap().into_iter().collect();
        assert_eq!(on_wire.len(), trained.len());
        for (name, t) in &trained {
            let w = &on_wire[name];
            assert_eq!(w.kind(), wire_kind, "{name}");
            assert!(w.equal(&t.to_kind(wire_kind)), "{name} on the wire differs from the learner's version-3 weights ({wire})");
        }
        let mut actor_model = cfg.model.clone();
        actor_model.init_seed = 99;
        let (policy, _) = load_policy(&actor_model).unwrap();
        apply(&policy, bytes, synced.version).unwrap();
        for (name, p) in params(&policy) {
            let want = trained[&name].to_kind(wire_kind).to_kind(p.kind());
            assert!(p.equal(&want), "{name}: the actor's weights differ from the learner's ({wire})");
        }
    }
}

/// A trainer in this process and a learner service on loopback that serves
/// what it publishes: job `name` (`body` after the job line), chunks of `chunk` bytes.
struct Served {
    cfg: JobConfig,
    trainer: sluice_learner::trainer::Trainer,
    rt: tokio::runtime::Runtime,
    shared: Arc<sluice_learner::service::Shared>,
    endpoint: String,
    _dir: tempfile::TempDir,
}

fn served(name: &str, body: &str, chunk: usize) -> Served {
    let dir = tempfile::tempdir().unwrap();
    let job = write_job(dir.path(), name, body);
    let mut cfg = JobConfig::from_file(&job).unwrap();
    cfg.train.out_dir = dir.path().join("out");
    let trainer = sluice_learner::trainer::Trainer::new(cfg.clone(), false).unwrap();
    let limits = sluice_learner::ingest::Limits {
        job: name.into(),
        vocab_size: 100,
        max_tokens: 64,
        max_rollout_bytes: 4096,
        max_group_size: 8,
        needs_logprobs: true,
    };
    let rt = runtime();
    let (shared, _rx) = sluice_learner::service::Shared::new(limits, 0, 1, 0, 1, 4, 8, chunk, Default::default());
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    rt.spawn(sluice_learner::node::serve(shared.clone(), listener, None, None, std::future::pending()));
    Served { cfg, trainer, rt, shared, endpoint, _dir: dir }
}

/// Delta sync after real GRPO steps (a trainer in this process publishing
/// through the learner's `GrpcPublisher` and service on loopback): an actor
/// that holds a version gets only the changes since — one version behind, and
/// a chain of two — and what it rebuilds is, byte for byte, the blob a full
/// download gives; its policy then equals the trainer's rounded to the wire
/// dtype. A resumed delta download stays a delta; an actor of another
/// incarnation gets the whole blob.
#[test]
fn delta_sync_after_real_steps_is_bit_exact_with_a_full_sync() {
    use sluice_learner::publish::{GrpcPublisher, WeightPublisher};
    for wire in [sluice_core::kinds::Dtype::Bf16, sluice_core::kinds::Dtype::F32] {
        let body = format!(
            "{TINY}[sampling]\nmax_new_tokens = 4\n[grpo]\ngroup_size = 4\n[train]\nsteps = 3\nprompts_per_step = 4\nlr = 1e-6\n\
             [rollout]\nweight_chunk_bytes = 1024\n"
        );
        let Served { cfg, mut trainer, rt, shared, endpoint, _dir } = served("delta", &body, 1024);
        let mut publisher = GrpcPublisher::new(shared.clone(), wire, true);
        let step = |trainer: &mut sluice_learner::trainer::Trainer, publisher: &mut GrpcPublisher| {
            trainer.grpo_step().unwrap();
            publisher.publish(trainer.state().step, trainer.policy()).unwrap()
        };
        publisher.publish(0, trainer.policy()).unwrap();

        let mut sync = WeightSync::with_deltas();
        let first = rt.block_on(async { sync.download(&mut client(&endpoint).await, "delta").await }).unwrap();
        assert_eq!((first.version, first.delta_from), (0, None));
        let p1 = step(&mut trainer, &mut publisher);
        let one = rt.block_on(async { sync.download(&mut client(&endpoint).await, "delta").await }).unwrap();
        let p2 = step(&mut trainer, &mut publisher);
        let p3 = step(&mut trainer, &mut publisher);
        // Two versions behind: 1 -> 2 -> 3, cut once (after a 16 KiB HTTP/2 frame) and resumed.
        let (via_proxy, _) = cutting_proxy(&endpoint, 24_000);
        let cut = rt.block_on(async { sync.download(&mut client(&via_proxy).await, "delta").await });
        assert!(cut.is_err() && sync.partial_bytes() > 0, "{wire}: {cut:?}");
        let chain = rt.block_on(async { sync.download(&mut client(&endpoint).await, "delta").await }).unwrap();
        assert_eq!(chain.version, 3);
        assert!(chain.resumed_from > 0, "{wire}");
        if wire == sluice_core::kinds::Dtype::Bf16 {
            // At a post-training learning rate few bf16 values move: deltas
            // (here 7-13% of the blob) rather than the whole. In f32 nearly
            // every value moves, no delta is under half the blob, and whole
            // versions are served.
            for p in [p1, p2, p3] {
                assert!(p.delta_bytes > 0 && p.delta_bytes * 5 < p.bytes, "{p:?}");
            }
            assert_eq!((one.version, one.delta_from, one.bytes), (1, Some(0), p1.delta_bytes));
            assert_eq!((chain.delta_from, chain.bytes), (Some(1), p2.delta_bytes + p3.delta_bytes));
        }

        let mut full = WeightSync::default();
        let whole = rt.block_on(async { full.download(&mut client(&endpoint).await, "delta").await }).unwrap();
        assert_eq!((whole.version, whole.delta_from), (3, None));
        assert!(sync.blob().unwrap() == full.blob().unwrap(), "{wire}: the rebuilt blob differs from the full one");
        assert!(chain.bytes < whole.bytes || chain.delta_from.is_none(), "{wire}: {} vs {}", chain.bytes, whole.bytes);
        let (policy, _) = load_policy(&cfg.model).unwrap();
        apply(&policy, sync.blob().unwrap(), 3).unwrap();
        let kind = sluice_model::device::kind(wire);
        let trained = params(trainer.policy());
        for (name, p) in params(&policy) {
            assert!(p.equal(&trained[&name].to_kind(kind).to_kind(p.kind())), "{wire}: {name}");
        }
        // Holding a version of another learner incarnation: the whole blob.
        let ask = |incarnation: u64| sluice_proto::v1::WeightsRequest {
            job_id: "delta".into(),
            have_version: Some(2),
            have_incarnation: incarnation,
            ..Default::default()
        };
        let first_chunk = |req| rt.block_on(async { client(&endpoint).await.get_weights(req).await.unwrap().into_inner().message().await.unwrap().unwrap() });
        let deltas_kept = wire == sluice_core::kinds::Dtype::Bf16;
        assert_eq!(first_chunk(ask(shared.incarnation)).delta_from, deltas_kept.then_some(2));
        assert_eq!(first_chunk(ask(shared.incarnation ^ 2)).delta_from, None);
    }
}

/// The weights broadcast group after real GRPO steps (a trainer in this
/// process publishing through the learner's `BroadcastPublisher`): an actor's
/// `BroadcastSubscriber` that joined gets each version staged by the group,
/// and its policy equals, bit for bit, one synced over `GetWeights` — the
/// trainer's weights rounded to the wire dtype. Before it was a member (and
/// for a version it cannot have, e.g. another incarnation's) it downloads.
#[test]
fn broadcast_sync_after_real_steps_is_bit_exact_with_a_grpc_sync() {
    use sluice_actor::sync::{BroadcastSubscriber, GrpcSubscriber, WeightSubscriber};
    use sluice_learner::publish::{BroadcastPublisher, GrpcPublisher, WeightPublisher};
    for wire in [sluice_core::kinds::Dtype::Bf16, sluice_core::kinds::Dtype::F32] {
        let body = format!("{TINY}[sampling]\nmax_new_tokens = 4\n[grpo]\ngroup_size = 4\n[train]\nsteps = 8\nprompts_per_step = 4\nlr = 1e-3\n");
        let Served { cfg, mut trainer, rt, shared, endpoint, _dir } = served("bcast", &body, 1 << 16);
        let auth = sluice_learner::collective::GroupAuth::new(Some("t0k"), "bcast");
        let root = sluice_collective::weights::Root::bind("127.0.0.1:0", &auth, shared.incarnation).unwrap();
        let group = root.local_addr().to_string();
        let mut publisher = BroadcastPublisher::new(GrpcPublisher::new(shared.clone(), wire, false), root, wire);
        let inc = shared.incarnation;
        let p0 = publisher.publish(0, trainer.policy()).unwrap();
        assert_eq!(p0.broadcast.map(|b| b.0), Some(0), "nobody joined yet");

        let subscriber = |seed: i64| {
            let mut m = cfg.model.clone();
            m.init_seed = seed;
            load_policy(&m).unwrap().0
        };
        let mut grpc = GrpcSubscriber::new("bcast", None, false, rt.handle().clone());
        grpc.attach(rt.block_on(client(&endpoint)));
        let mut sub = BroadcastSubscriber::new(grpc, Some("t0k"), "bcast", wire);
        let policy = subscriber(99);
        let first = sub.pull(&policy, (0, inc)).unwrap();
        assert_eq!((first.version, first.broadcast), (0, false), "version 0 was published before the group had members");
        sub.join(&group, &policy).unwrap();
        // The member is in the group from the next version on.
        let joined = loop {
            trainer.grpo_step().unwrap();
            let v = trainer.state().step;
            let p = publisher.publish(v, trainer.policy()).unwrap();
            if p.broadcast.map(|b| b.0) == Some(1) {
                break v;
            }
            assert!(v < 8, "the subscriber never joined the group: {:?}", sub.member().map(|m| m.status()));
        };
        let got = sub.pull(&policy, (joined, inc)).unwrap();
        assert_eq!((got.version, got.broadcast, got.delta_from), (joined, true, None), "{wire}");
        // One more version, by broadcast too.
        trainer.grpo_step().unwrap();
        let v = joined + 1;
        publisher.publish(v, trainer.policy()).unwrap();
        let got = sub.pull(&policy, (v, inc)).unwrap();
        assert_eq!((got.version, got.broadcast), (v, true), "{wire}");

        let mut full = WeightSync::default();
        let whole = rt.block_on(async { full.download(&mut client(&endpoint).await, "bcast").await }).unwrap();
        assert_eq!(whole.version, v);
        let by_grpc = subscriber(5);
        apply(&by_grpc, full.blob().unwrap(), v).unwrap();
        let kind = sluice_model::device::kind(wire);
        let trained = params(trainer.policy());
        let (ours, theirs) = (params(&policy), params(&by_grpc));
        for (name, p) in &ours {
            assert!(p.equal(&theirs[name]), "{wire}: {name} differs between broadcast and GetWeights");
            assert!(p.equal(&trained[name].to_kind(kind).to_kind(p.kind())), "{wire}: {name} is not the trainer's");
        }
        // A version of another incarnation is never taken from the group: download.
        let other = sub.pull(&policy, (v, inc ^ 2)).unwrap();
        assert!(!other.broadcast, "{wire}");
    }
}
