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
    let (mut policy, _) = load_policy(&actor_model).unwrap();
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
    let (synced, bytes) = rt.block_on(async { sync.download(&mut client(&learner.endpoint).await, "ws").await }).unwrap();
    assert_eq!(synced.resumed_from, held as u64);
    assert!(synced.bytes > held);
    apply(&mut policy, &bytes, synced.version).unwrap();
    assert!(same_bits(&params(&policy), &learner_params), "synced weights differ from the learner's");

    // 3. Learner restarted between the cut and the retry: the old bytes are
    //    useless (another incarnation), so the download starts over.
    let mut sync = WeightSync::default();
    let (policy_before, _) = load_policy(&actor_model).unwrap();
    let mut policy = policy_before;
    let (via_proxy, _) = cutting_proxy(&learner.endpoint, 120_000);
    assert!(rt.block_on(async { sync.download(&mut client(&via_proxy).await, "ws").await }).is_err());
    assert!(sync.partial_bytes() > 0);
    let port = learner.port();
    learner.proc.kill9();
    let mut restarted = Learner::start_on(&job, port, &["--out", out.to_str().unwrap(), "--fresh"]);
    restarted.proc.wait_line("published", std::time::Duration::from_secs(60), |v| v["event"] == "published");
    let (synced, bytes) = rt.block_on(async { sync.download(&mut client(&restarted.endpoint).await, "ws").await }).unwrap();
    assert_eq!(synced.resumed_from, 0, "a download from another incarnation must start over");
    apply(&mut policy, &bytes, synced.version).unwrap();
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
        let (synced, bytes) =
            rt.block_on(async { WeightSync::default().download(&mut client(&learner.endpoint).await, "trained").await }).unwrap();
        assert_eq!(synced.version, 3, "the newest version is served");
        let wire_kind = if wire == "bf16" { tch::Kind::BFloat16 } else { tch::Kind::Float };
        let on_wire: HashMap<String, tch::Tensor> = sluice_model::weights::decode(&bytes).unwrap().into_iter().collect();
        assert_eq!(on_wire.len(), trained.len());
        for (name, t) in &trained {
            let w = &on_wire[name];
            assert_eq!(w.kind(), wire_kind, "{name}");
            assert!(w.equal(&t.to_kind(wire_kind)), "{name} on the wire differs from the learner's version-3 weights ({wire})");
        }
        let mut actor_model = cfg.model.clone();
        actor_model.init_seed = 99;
        let (mut policy, _) = load_policy(&actor_model).unwrap();
        apply(&mut policy, &bytes, synced.version).unwrap();
        for (name, p) in params(&policy) {
            let want = trained[&name].to_kind(wire_kind).to_kind(p.kind());
            assert!(p.equal(&want), "{name}: the actor's weights differ from the learner's ({wire})");
        }
    }
}
