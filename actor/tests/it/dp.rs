//! Data-parallel learners: two ranks, each on half of every batch, end with the
//! parameters one learner reaches on the whole batch.

use std::time::Duration;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use sluice_proto::codec::{encode, Placement};
use sluice_core::config::JobConfig;
use sluice_model::hf::load_policy;
use sluice_model::collect::collect_groups;
use sluice_core::rollout::Group;
use sluice_core::tasks::{self, Split};
use sluice_proto::v1::{self, WeightsRequest};
use tokio_stream::wrappers::ReceiverStream;

use crate::harness::*;

const STEPS: usize = 3;
const PER_STEP: usize = 4;

fn job_body() -> String {
    format!(
        "{TINY}[sampling]\nmax_new_tokens = 6\n[grpo]\ngroup_size = 4\nkl_coef = 0.02\nepochs = 2\n\
         [train]\nsteps = {STEPS}\nprompts_per_step = {PER_STEP}\nlr = 0.001\nmicro_batch_size = 3\neval_prompts = 2\n\
         [rollout]\nmax_staleness = 100\n"
    )
}

/// Rollouts sampled by the initial policy, with made-up rewards that vary
/// inside each group (so every group has a gradient).
fn groups(cfg: &JobConfig) -> Vec<Group> {
    let (policy, tokenizer) = load_policy(&cfg.model).unwrap();
    let task = tasks::build(&cfg.task).unwrap();
    let problems: Vec<_> = (0..(STEPS * PER_STEP) as u64).map(|i| task.problem(Split::Train, i)).collect();
    let mut sampling = cfg.sampling.clone();
    sampling.stop_token_ids.push(tokenizer.eos_id());
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let mut groups = collect_groups(policy.model(), &tokenizer, &problems, &vec![4; problems.len()], &sampling, 0, &mut rng, None).unwrap().groups;
    for (gi, g) in groups.iter_mut().enumerate() {
        for (i, r) in g.rollouts.iter_mut().enumerate() {
            r.reward = ((gi * 7 + i * 3) % 5) as f64 / 4.0;
        }
    }
    groups
}

/// Streams `groups` (in order) to a learner and waits for every ack.
fn push(endpoint: &str, job: &str, groups: &[&Group]) {
    runtime().block_on(async {
        let mut client = client(endpoint).await;
        let (tx, rx) = tokio::sync::mpsc::channel::<v1::Rollout>(64);
        let mut acks = client.push_rollouts(ReceiverStream::new(rx)).await.unwrap().into_inner();
        for (k, g) in groups.iter().enumerate() {
            let at = Placement { job, actor: "test", group_id: k as u64 + 1, group_size: g.rollouts.len(), work_id: 0, trace: "" };
            for (i, r) in g.rollouts.iter().enumerate() {
                tx.send(encode(r, at, i, None)).await.unwrap();
            }
        }
        let mut accepted = 0;
        while accepted < groups.len() {
            let ack = acks.message().await.unwrap().expect("ack");
            if ack.group_id != 0 {
                assert!(ack.accepted, "group {} refused: {:?}", ack.group_id, ack.reason());
                accepted += 1;
            }
        }
    });
}

fn weights(endpoint: &str, job: &str) -> Vec<u8> {
    runtime().block_on(async {
        let mut c = client(endpoint).await;
        let mut s = c.get_weights(WeightsRequest { job_id: job.into(), ..Default::default() }).await.unwrap().into_inner();
        let mut out = Vec::new();
        while let Some(chunk) = s.message().await.unwrap() {
            out.extend_from_slice(&chunk.data);
        }
        out
    })
}

#[test]
fn two_ranks_on_half_batches_match_one_rank_on_whole_batches() {
    let dir = tempfile::tempdir().unwrap();
    let job = write_job(dir.path(), "dp", &job_body());
    let cfg = JobConfig::from_file(&job).unwrap();
    let all = groups(&cfg);

    // One learner, whole batches.
    let single_out = dir.path().join("single");
    let mut single = Learner::start(&job, &["--out", single_out.to_str().unwrap(), "--fresh"]);
    push(&single.endpoint, "dp", &all.iter().collect::<Vec<_>>());
    single.wait_finished(Duration::from_secs(180));
    assert_eq!(single.proc.wait_exit(Duration::from_secs(60)), 0);

    // Two learners; rank r gets the r-th half of every step's groups.
    let rdv = format!("127.0.0.1:{}", free_port());
    let outs = [dir.path().join("rank0"), dir.path().join("rank1")];
    let start = |rank: usize| {
        let r = rank.to_string();
        let args = ["--out", outs[rank].to_str().unwrap(), "--fresh", "--rank", &r, "--world-size", "2", "--rendezvous", &rdv, "--linger-s", "60"];
        Learner::start(&job, &args)
    };
    let (mut r0, mut r1) = std::thread::scope(|s| {
        let a = s.spawn(|| start(0));
        let b = s.spawn(|| start(1));
        (a.join().unwrap(), b.join().unwrap())
    });
    let half = PER_STEP / 2;
    let shard = |rank: usize| -> Vec<&Group> {
        all.chunks(PER_STEP).flat_map(|step| &step[rank * half..(rank + 1) * half]).collect()
    };
    std::thread::scope(|s| {
        s.spawn(|| push(&r0.endpoint, "dp", &shard(0)));
        s.spawn(|| push(&r1.endpoint, "dp", &shard(1)));
    });
    r0.wait_finished(Duration::from_secs(180));
    r1.wait_finished(Duration::from_secs(180));
    let (w0, w1) = (weights(&r0.endpoint, "dp"), weights(&r1.endpoint, "dp"));
    assert!(w0 == w1, "ranks disagree after the same all-reduced steps");

    let one = read_tensors(&latest_weights(&single_out));
    let two = read_tensors(&latest_weights(&outs[0]));
    let init = load_policy(&cfg.model).unwrap().0.named_parameters();
    assert_eq!(one.len(), two.len());
    let (mut worst, mut moved) = (0f64, 0f64);
    for (((n1, a), (n2, b)), (_, p0)) in one.iter().zip(&two).zip(&init) {
        assert_eq!(n1, n2);
        worst = worst.max((a - b).abs().max().double_value(&[]));
        moved = moved.max((a - p0).abs().max().double_value(&[]));
    }
    eprintln!("max abs difference 2 ranks vs 1 rank: {worst:e} (largest parameter move {moved:e})");
    assert!(worst <= 1e-5, "2 ranks differ from 1 rank by {worst}");
    assert!(moved > 1e-3, "training did not move the parameters ({moved}), the comparison proves nothing");
    // Both runs trained on every group.
    let steps = |out: &std::path::Path| {
        metrics(out).into_iter().filter(|e| e["event"] == "step").map(|e| e["groups_trained"].as_u64().unwrap()).collect::<Vec<_>>()
    };
    assert_eq!(steps(&single_out), vec![PER_STEP as u64; STEPS]);
    assert_eq!(steps(&outs[0]), vec![PER_STEP as u64; STEPS]);
    drop((r0, r1));

    // A rank dies after step 1: its peer fails instead of hanging, both are
    // restarted without --fresh, resume from rank 0's checkpoint of step 1, and
    // end bit for bit where the uninterrupted two-rank run ended.
    let text = job_body().replace("eval_prompts = 2\n", "eval_prompts = 2\ncheckpoint_every = 1\n");
    let crash_dir = dir.path().join("crash");
    std::fs::create_dir_all(&crash_dir).unwrap();
    let job = write_job(&crash_dir, "dp", &text);
    let outs = [crash_dir.join("rank0"), crash_dir.join("rank1")];
    let start = |rank: usize, rdv: &str, fresh: bool| {
        let r = rank.to_string();
        let mut args = vec!["--out", outs[rank].to_str().unwrap(), "--rank", &r, "--world-size", "2", "--rendezvous", rdv, "--linger-s", "60"];
        if fresh {
            args.push("--fresh");
        }
        Learner::start(&job, &args)
    };
    let pair = |rdv: &str, fresh: bool| {
        std::thread::scope(|s| {
            let a = s.spawn(|| start(0, rdv, fresh));
            let b = s.spawn(|| start(1, rdv, fresh));
            (a.join().unwrap(), b.join().unwrap())
        })
    };
    let step_shard = |step: usize, rank: usize| -> Vec<&Group> { all[step * PER_STEP + rank * half..step * PER_STEP + (rank + 1) * half].iter().collect() };
    let rdv = format!("127.0.0.1:{}", free_port());
    let (mut r0, mut r1) = pair(&rdv, true);
    std::thread::scope(|s| {
        s.spawn(|| push(&r0.endpoint, "dp", &step_shard(0, 0)));
        s.spawn(|| push(&r1.endpoint, "dp", &step_shard(0, 1)));
    });
    r0.proc.wait_line("checkpoint of step 1", Duration::from_secs(120), |v| v["event"] == "checkpoint" && v["step"] == 1);
    r1.proc.kill9();
    push(&r0.endpoint, "dp", &step_shard(1, 0));
    let code = r0.proc.wait_exit(Duration::from_secs(120));
    assert_ne!(code, 0, "rank 0 must fail when its peer is gone, not train alone");
    let rdv = format!("127.0.0.1:{}", free_port());
    let (mut r0, mut r1) = pair(&rdv, false);
    let resumed = r0.proc.wait_line("listening", Duration::from_secs(10), |v| v["event"] == "listening");
    assert_eq!(resumed["version"], 1, "rank 0 resumes at its step-1 checkpoint");
    std::thread::scope(|s| {
        s.spawn(|| push(&r0.endpoint, "dp", &(1..STEPS).flat_map(|k| step_shard(k, 0)).collect::<Vec<_>>()));
        s.spawn(|| push(&r1.endpoint, "dp", &(1..STEPS).flat_map(|k| step_shard(k, 1)).collect::<Vec<_>>()));
    });
    r0.wait_finished(Duration::from_secs(180));
    r1.wait_finished(Duration::from_secs(180));
    assert!(weights(&r1.endpoint, "dp") == w0, "rank 1 after the crash and resume differs from the uninterrupted run");
    let after = read_tensors(&latest_weights(&outs[0]));
    for ((n, a), (_, b)) in after.iter().zip(&two) {
        assert!(a.equal(b), "{n}: the resumed two-rank run differs from the uninterrupted one");
    }
}
