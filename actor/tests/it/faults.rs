//! Bad input and killed processes.

use std::time::Duration;

use serde_json::Value;

use sluice_proto::{packed, v1};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

use crate::harness::*;

fn good(job: &str, group_id: u64, group_size: u32, index: u32) -> v1::Rollout {
    v1::Rollout {
        job_id: job.into(),
        actor_id: "test".into(),
        group_id,
        group_size,
        index,
        prompt_id: 1,
        prompt_tokens: packed::tokens(&[5, 6, 7]),
        response_tokens: packed::tokens(&[8, 1]),
        logprobs: packed::floats(&[-1.0, -0.5]),
        rewards: Some(v1::Rewards { extrinsic: 1.0, intrinsic: 0.0, total: 1.0 }),
        policy_version: 0,
        finish: v1::FinishReason::Stop as i32,
        ..Default::default()
    }
}

/// Sends `msgs` on one stream and returns the first error status, or the acks
/// for groups when the stream stays healthy.
fn send(endpoint: &str, msgs: Vec<v1::Rollout>, expect_groups: usize) -> Result<Vec<v1::PushAck>, tonic::Status> {
    runtime().block_on(async {
        let mut c = client(endpoint).await;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let mut acks = c.push_rollouts(ReceiverStream::new(rx)).await?.into_inner();
        for m in msgs {
            if tx.send(m).await.is_err() {
                break;
            }
        }
        // Read until the wanted acks arrived, or (expecting none) until the
        // refusal arrives or the stream stays quiet for a while.
        let mut got = Vec::new();
        while expect_groups == 0 || got.len() < expect_groups {
            match tokio::time::timeout(Duration::from_secs(2), acks.message()).await {
                Ok(Err(s)) => return Err(s),
                Ok(Ok(Some(a))) if a.group_id != 0 => got.push(a),
                Ok(Ok(Some(_))) => {}
                Ok(Ok(None)) | Err(_) => break,
            }
        }
        Ok(got)
    })
}

#[test]
fn malformed_rollouts_get_invalid_argument_and_the_learner_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let body = format!("{TINY}[grpo]\ngroup_size = 2\n[train]\nsteps = 100\n[rollout]\nmax_rollout_bytes = 2048\n");
    let job = write_job(dir.path(), "bad", &body);
    let out = dir.path().join("out");
    let learner = Learner::start(&job, &["--out", out.to_str().unwrap(), "--fresh"]);
    let ep = &learner.endpoint;

    let mut nan = good("bad", 1, 1, 0);
    nan.logprobs = packed::floats(&[f32::NAN, -0.5]);
    let mut vocab = good("bad", 1, 1, 0);
    vocab.response_tokens = packed::tokens(&[1_000_000, 1]);
    let mut big = good("bad", 1, 1, 0);
    big.prompt_tokens = packed::tokens(&[5; 3000]);
    let cases: Vec<(&str, Vec<v1::Rollout>, &str)> = vec![
        ("unknown_job", vec![good("someone-else", 1, 1, 0)], "unknown job"),
        ("non_finite", vec![nan], "not finite"),
        ("token_out_of_vocab", vec![vocab], "outside the vocabulary"),
        ("too_large", vec![big], "max_rollout_bytes"),
        ("group_mismatch", vec![good("bad", 1, 2, 0), good("bad", 1, 3, 1)], "group_size"),
    ];
    for (kind, msgs, words) in &cases {
        let err = send(ep, msgs.clone(), 0).expect_err(kind);
        assert_eq!(err.code(), Code::InvalidArgument, "{kind}: {err}");
        assert!(err.message().contains(words), "{kind}: `{}` lacks `{words}`", err.message());
    }
    let st = status(ep);
    for (kind, _, _) in &cases {
        assert_eq!(st.rejected.get(*kind), Some(&1), "{kind} not counted: {:?}", st.rejected);
    }
    assert_eq!(st.accepted_groups, 0, "nothing from a refused stream is kept");
    // Still serving: a good group is accepted.
    let acks = send(ep, vec![good("bad", 7, 2, 0), good("bad", 7, 2, 1)], 1).unwrap();
    assert!(acks[0].accepted && acks[0].group_id == 7);
    assert_eq!(status(ep).accepted_groups, 1);
    // One group per orchestrator work item: a second group for work 42 (a
    // re-dispatched item) is refused as a duplicate, on any stream.
    let work = |group_id: u64| {
        (0..2).map(|i| v1::Rollout { work_id: 42, ..good("bad", group_id, 2, i) }).collect::<Vec<_>>()
    };
    assert!(send(ep, work(8), 1).unwrap()[0].accepted);
    let again = send(ep, work(9), 1).unwrap();
    assert!(!again[0].accepted && again[0].reason() == sluice_proto::v1::AckReason::Duplicate, "{:?}", again[0]);
    let st = status(ep);
    assert_eq!((st.accepted_groups, st.dropped_duplicate_groups), (2, 1));
}

/// The work items a learner trained on are in its checkpoint: after a restart
/// it still refuses a second group for one of them (a re-dispatched item whose
/// first group was trained before the restart), and takes new ones.
#[test]
fn a_restarted_learner_still_refuses_work_it_trained_on() {
    let dir = tempfile::tempdir().unwrap();
    let body = format!("{TINY}[grpo]\ngroup_size = 2\n[train]\nsteps = 1\nprompts_per_step = 2\nsft_steps = 0\ncheckpoint_every = 1\n");
    let job = write_job(dir.path(), "ids", &body);
    let out = dir.path().join("out");
    let group = |work_id: u64, group_id: u64, version: u64| -> Vec<v1::Rollout> {
        (0..2)
            .map(|i| {
                let mut r = v1::Rollout { work_id, policy_version: version, ..good("ids", group_id, 2, i) };
                r.rewards = Some(v1::Rewards { extrinsic: i as f64, intrinsic: 0.0, total: i as f64 });
                r
            })
            .collect()
    };
    let mut learner = Learner::start(&job, &["--out", out.to_str().unwrap(), "--fresh", "--linger-s", "0"]);
    let both = [group(101, 1, 0), group(102, 2, 0)].concat();
    assert!(send(&learner.endpoint, both, 2).unwrap().iter().all(|a| a.accepted));
    assert_eq!(learner.proc.wait_exit(Duration::from_secs(120)), 0, "one step, checkpointed");
    let saved: Value = serde_json::from_str(&std::fs::read_to_string(out.join("checkpoints/step-00000001/work_ids.json")).unwrap()).unwrap();
    assert_eq!(saved, serde_json::json!({"101": 102}), "one range, 101..=102");

    let learner = Learner::start(&job, &["--out", out.to_str().unwrap(), "--set", "train.steps=2"]);
    assert_eq!(status(&learner.endpoint).version, 1, "resumed after step 1");
    let again = send(&learner.endpoint, group(101, 3, 1), 1).unwrap();
    assert!(!again[0].accepted && again[0].reason() == v1::AckReason::Duplicate, "{:?}", again[0]);
    let fresh = send(&learner.endpoint, group(103, 4, 1), 1).unwrap();
    assert!(fresh[0].accepted, "{:?}", fresh[0]);
    assert_eq!(status(&learner.endpoint).dropped_duplicate_groups, 1);
}

#[test]
fn killed_actors_leave_no_partial_group_and_a_restarted_actor_rejoins() {
    let dir = tempfile::tempdir().unwrap();
    let body = format!(
        "{TINY}[sampling]\nmax_new_tokens = 6\n[grpo]\ngroup_size = 4\n[train]\nsteps = 6\nprompts_per_step = 8\neval_prompts = 4\n\
         [rollout]\nmax_staleness = 1\nbuffer_groups = 2\n"
    );
    let job = write_job(dir.path(), "kill", &body);
    let out = dir.path().join("out");
    let mut learner = Learner::start(&job, &["--out", out.to_str().unwrap(), "--fresh", "--linger-s", "30"]);
    // A stream that dies after half a group.
    let half = vec![good("kill", 1, 4, 0), good("kill", 1, 4, 1)];
    runtime().block_on(async {
        let mut c = client(&learner.endpoint).await;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let _acks = c.push_rollouts(ReceiverStream::new(rx)).await.unwrap();
        for m in half {
            tx.send(m).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }); // runtime dropped: connection torn down mid-group
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while status(&learner.endpoint).dropped_partial_groups < 1 {
        assert!(std::time::Instant::now() < deadline, "the partial group was not dropped");
        std::thread::sleep(Duration::from_millis(50));
    }
    // A real actor killed with SIGKILL mid-run, then restarted.
    let mut first = actor(&job, &learner.endpoint, 0, 1, &[]);
    first.wait_line("a sent batch", Duration::from_secs(60), |v| v["event"] == "sent");
    first.kill9();
    let mut second = actor(&job, &learner.endpoint, 0, 1, &["--seed", "1"]);
    learner.wait_finished(Duration::from_secs(180));
    second.wait_line("done", Duration::from_secs(60), |v| v["event"] == "done");
    assert_eq!(second.wait_exit(Duration::from_secs(30)), 0);
    let st = status(&learner.endpoint);
    assert_eq!(st.accepted_groups * 4, st.accepted_rollouts, "only whole groups are accepted");
    let steps: Vec<_> = metrics(&out).into_iter().filter(|e| e["event"] == "step").collect();
    assert_eq!(steps.len(), 6);
    for e in steps {
        assert_eq!((e["groups_trained"].as_u64(), e["rollouts_trained"].as_u64()), (Some(8), Some(32)), "{e}");
    }
}

#[test]
fn a_restarted_learner_resumes_from_its_checkpoint_and_actors_reconnect() {
    let dir = tempfile::tempdir().unwrap();
    let body = format!(
        "{TINY}[sampling]\nmax_new_tokens = 6\n[grpo]\ngroup_size = 4\n\
         [train]\nsteps = 8\nprompts_per_step = 8\neval_prompts = 4\ncheckpoint_every = 2\n\
         [rollout]\nmax_staleness = 1\nbuffer_groups = 4\n"
    );
    let job = write_job(dir.path(), "restart", &body);
    let out = dir.path().join("out");
    let mut learner = Learner::start(&job, &["--out", out.to_str().unwrap(), "--linger-s", "30"]);
    let mut a = actor(&job, &learner.endpoint, 0, 1, &[]);
    let ck = learner.proc.wait_line("a checkpoint", Duration::from_secs(120), |v| v["event"] == "checkpoint");
    let saved = ck["step"].as_u64().unwrap();
    let port = learner.port();
    learner.proc.kill9();
    let mut again = Learner::start_on(&job, port, &["--out", out.to_str().unwrap(), "--linger-s", "30"]);
    let listening = again.proc.wait_line("listening", Duration::from_secs(10), |v| v["event"] == "listening");
    let resumed = listening["version"].as_u64().unwrap();
    assert!(resumed >= saved, "resumed at version {resumed}, but step {saved} was checkpointed");
    again.wait_finished(Duration::from_secs(180));
    a.wait_line("done", Duration::from_secs(60), |v| v["event"] == "done");
    assert_eq!(a.wait_exit(Duration::from_secs(30)), 0);
    let connects = a.lines().iter().filter(|v| v["event"] == "connected").count();
    assert!(connects >= 2, "the actor should have reconnected to the restarted learner");
    let st = status(&again.endpoint);
    assert_eq!(st.version, 8);
    // The restarted run's first step continues where the checkpoint left off.
    let first_after = again.proc.wait_line("a step", Duration::from_secs(1), |v| v["event"] == "step");
    assert_eq!(first_after["step"].as_u64().unwrap(), resumed + 1);
}

#[test]
fn a_fast_sender_is_slowed_down_not_buffered_without_bound() {
    let dir = tempfile::tempdir().unwrap();
    // The learner spends its time in a long warm-up, so nothing drains the buffer.
    let body = format!("{TINY}[grpo]\ngroup_size = 2\n[train]\nsft_steps = 100000\n[rollout]\nbuffer_groups = 4\n");
    let job = write_job(dir.path(), "flood", &body);
    let out = dir.path().join("out");
    let learner = Learner::start(&job, &["--out", out.to_str().unwrap(), "--fresh"]);
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let rt = runtime();
    let counter = sent.clone();
    let ep = learner.endpoint.clone();
    let total: u64 = 2_000_000;
    rt.spawn(async move {
        let mut c = client(&ep).await;
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let _acks = c.push_rollouts(ReceiverStream::new(rx)).await.unwrap();
        for k in 0..total / 2 {
            for i in 0..2 {
                if tx.send(good("flood", k + 1, 2, i)).await.is_err() {
                    return;
                }
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
    });
    // Wait until the sender is stuck: its count has not moved for a second.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let (mut n, mut since) = (sent.load(std::sync::atomic::Ordering::SeqCst), std::time::Instant::now());
    while since.elapsed() < Duration::from_secs(1) {
        assert!(std::time::Instant::now() < deadline, "the sender never stopped ({n} rollouts out)");
        std::thread::sleep(Duration::from_millis(50));
        let now = sent.load(std::sync::atomic::Ordering::SeqCst);
        if now != n {
            (n, since) = (now, std::time::Instant::now());
        }
    }
    let st = status(&learner.endpoint);
    let one = prost::Message::encoded_len(&good("flood", 1, 2, 0)) as u64;
    let bytes = n * one;
    eprintln!("sender got {n} rollouts ({bytes} bytes) out before it blocked; learner buffered {} groups", st.buffered_groups);
    assert_eq!(st.buffered_groups, 4, "the buffer should be full");
    assert_eq!(st.accepted_groups, 4, "nothing beyond the buffer is accepted");
    // What got out is bounded by the buffer plus the HTTP/2 stream window
    // (8 MiB) plus socket buffers: far below what the sender tried.
    assert!(bytes < 16 << 20, "{bytes} bytes in flight");
    assert!(n * 20 < total, "{n} of {total} rollouts got out");
}
