//! Weight sync: bit-exact after a sync; an interrupted download leaves the
//! actor's policy as it was and resumes (or restarts after a learner restart).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use sluice_actor::sync::{apply, WeightSync};
use sluice_core::config::JobConfig;
use sluice_core::hf::{load_policy, Policy};

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
    let port = free_port();
    let mut learner = Learner::start_on(&job, port, &["--out", out.to_str().unwrap(), "--fresh"]);
    learner.proc.wait_event("published", std::time::Duration::from_secs(60), |v| v["event"] == "published");

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
    learner.proc.kill9();
    let mut restarted = Learner::start_on(&job, port, &["--out", out.to_str().unwrap(), "--fresh"]);
    restarted.proc.wait_event("published", std::time::Duration::from_secs(60), |v| v["event"] == "published");
    let (synced, bytes) = rt.block_on(async { sync.download(&mut client(&restarted.endpoint).await, "ws").await }).unwrap();
    assert_eq!(synced.resumed_from, 0, "a download from another incarnation must start over");
    apply(&mut policy, &bytes, synced.version).unwrap();
    assert!(same_bits(&params(&policy), &learner_params));
}
