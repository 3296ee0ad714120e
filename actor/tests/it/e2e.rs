//! A learner and two actor processes train a job to the end.

use std::time::Duration;

use sluice_proto::v1::StatusRequest;

use crate::harness::*;

fn run(max_staleness: u64, steps: u64) -> (Vec<serde_json::Value>, sluice_proto::v1::LearnerStatus, Vec<serde_json::Value>) {
    run_with(max_staleness, steps, 6, "")
}

fn run_with(
    max_staleness: u64,
    steps: u64,
    new_tokens: u64,
    rollout: &str,
) -> (Vec<serde_json::Value>, sluice_proto::v1::LearnerStatus, Vec<serde_json::Value>) {
    let dir = tempfile::tempdir().unwrap();
    let body = format!(
        "{TINY}[sampling]\nmax_new_tokens = {new_tokens}\n[grpo]\ngroup_size = 4\n\
         [train]\nsteps = {steps}\nprompts_per_step = 8\nlr = 0.001\neval_prompts = 4\ncheckpoint_every = 2\n\
         [rollout]\nmax_staleness = {max_staleness}\nbuffer_groups = 4\n{rollout}"
    );
    let job = write_job(dir.path(), "e2e", &body);
    let out = dir.path().join("out");
    let mut learner = Learner::start(&job, &["--out", out.to_str().unwrap(), "--linger-s", "60"]);
    let mut actors: Vec<Proc> = (0..2).map(|i| actor(&job, &learner.endpoint, i, 2, &[])).collect();
    learner.wait_finished(Duration::from_secs(240));
    let status = status(&learner.endpoint);
    let mut done = Vec::new();
    for a in &mut actors {
        done.push(a.wait_line("done", Duration::from_secs(60), |v| v["event"] == "done"));
        assert_eq!(a.wait_exit(Duration::from_secs(30)), 0, "{} failed", a.name);
    }
    (metrics(&out), status, done)
}

fn check_common(metrics: &[serde_json::Value], status: &sluice_proto::v1::LearnerStatus, done: &[serde_json::Value], steps: u64) {
    let step_events: Vec<_> = metrics.iter().filter(|e| e["event"] == "step").collect();
    assert_eq!(step_events.len() as u64, steps);
    for e in &step_events {
        // Complete groups only: 8 prompts x 4 rollouts, every step.
        assert_eq!(e["groups_trained"], 8, "{e}");
        assert_eq!(e["rollouts_trained"], 32, "{e}");
    }
    assert!(status.finished);
    assert_eq!(status.version, steps);
    let hist: u64 = status.staleness_histogram.iter().sum();
    assert_eq!(hist, steps * 8, "every trained group is in the staleness histogram");
    assert!(status.rejected.is_empty(), "{:?}", status.rejected);
    // What the actors say they sent is what the learner counted.
    let accepted: u64 = done.iter().map(|d| d["groups_accepted"].as_u64().unwrap()).sum();
    assert_eq!(accepted, status.accepted_groups, "actors {done:?} vs learner {status:?}");
    assert_eq!(status.accepted_rollouts, status.accepted_groups * 4);
    assert!(metrics.iter().any(|e| e["event"] == "checkpoint"));
}

#[test]
fn synchronous_training_uses_only_on_policy_groups() {
    let (metrics, status, done) = run(0, 4);
    check_common(&metrics, &status, &done, 4);
    assert_eq!(status.staleness_histogram, vec![32], "staleness 0 trains on current-version groups only");
    assert_eq!(status.dropped_stale_groups, 0, "in synchronous mode actors wait instead of producing stale groups");
}

#[test]
fn asynchronous_training_bounds_staleness() {
    let (metrics, status, done) = run(2, 5);
    check_common(&metrics, &status, &done, 5);
    let staleness: Vec<f64> = metrics.iter().filter(|e| e["event"] == "step").map(|e| e["staleness_mean"].as_f64().unwrap()).collect();
    assert!(staleness.iter().all(|&s| (0.0..=2.0).contains(&s)), "{staleness:?}");
    // Asynchronous for real: actors refresh only when more than max_staleness
    // behind, so groups sampled at version v are trained at v+1 and v+2 too. A
    // learner that waited for fresh groups (or actors that re-synced every
    // version) would put every group at lag 0.
    let lagged: u64 = status.staleness_histogram[1..].iter().sum();
    assert!(lagged >= 8, "at least a step's worth of groups trained at lag > 0: {:?}", status.staleness_histogram);
    assert!(staleness.iter().any(|&s| s > 0.0), "{staleness:?}");
    assert_eq!(status.staleness_histogram.len(), 3, "lags 0..=max_staleness");
}

/// Interruptible generation: actors that hear of a new version mid-batch
/// fetch it and sample the rest of their rows with it. The learner trains
/// such rollouts (their versions pass its checks; the oldest is within the
/// staleness bound) and counts them.
#[test]
fn interruptible_actors_switch_weights_mid_generation() {
    let (metrics, status, done) = run_with(2, 10, 48, "interruptible = true\n");
    check_common(&metrics, &status, &done, 10);
    let interrupted: u64 = metrics.iter().filter(|e| e["event"] == "step").map(|e| e["interrupted_rollouts"].as_u64().unwrap()).sum();
    assert!(interrupted > 0, "no trained rollout was sampled by two versions");
}

#[test]
fn two_learner_ranks_with_an_actor_each_train_in_step() {
    let dir = tempfile::tempdir().unwrap();
    let body = format!(
        "{TINY}[sampling]\nmax_new_tokens = 6\n[grpo]\ngroup_size = 4\n\
         [train]\nsteps = 4\nprompts_per_step = 8\nlr = 0.001\neval_prompts = 4\n[rollout]\nmax_staleness = 1\n"
    );
    let job = write_job(dir.path(), "dp2", &body);
    let out = dir.path().join("out");
    let rdv = format!("127.0.0.1:{}", free_port());
    let start = |rank: usize| {
        let r = rank.to_string();
        Learner::start(&job, &["--out", out.to_str().unwrap(), "--rank", &r, "--world-size", "2", "--rendezvous", &rdv, "--linger-s", "60"])
    };
    let (mut r0, mut r1) = std::thread::scope(|s| {
        let a = s.spawn(|| start(0));
        let b = s.spawn(|| start(1));
        (a.join().unwrap(), b.join().unwrap())
    });
    let learners = format!("{},{}", r0.endpoint, r1.endpoint);
    let mut actors: Vec<Proc> = (0..2).map(|i| actor(&job, &learners, i, 2, &[])).collect();
    r0.wait_finished(Duration::from_secs(240));
    r1.wait_finished(Duration::from_secs(240));
    let (s0, s1) = (status(&r0.endpoint), status(&r1.endpoint));
    assert_eq!((s0.version, s1.version), (4, 4));
    assert_eq!((s0.world_size, s1.rank), (2, 1));
    // Each rank trained 4 groups per step from its own actor.
    assert_eq!(s0.staleness_histogram.iter().sum::<u64>(), 16);
    assert_eq!(s1.staleness_histogram.iter().sum::<u64>(), 16);
    let steps: Vec<_> = metrics(&out).into_iter().filter(|e| e["event"] == "step").collect();
    assert!(steps.iter().all(|e| e["groups_trained"] == 8), "global groups per step: {steps:?}");
    for a in &mut actors {
        a.wait_line("done", Duration::from_secs(60), |v| v["event"] == "done");
    }
}

#[test]
fn actors_score_through_the_reward_server_with_bearer_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let body = format!(
        "{TINY}[sampling]\nmax_new_tokens = 6\n[grpo]\ngroup_size = 4\n\
         [train]\nsteps = 3\nprompts_per_step = 4\neval_prompts = 4\n[rollout]\nmax_staleness = 1\n\
         [reward]\nint_coef = 0.1\nmodel = \"retrieval\"\nresponse_captions = \"lines\"\n\
         [[reward.rubric]]\npattern = \"[0-9]\"\nlabel = \"helpful\"\n"
    );
    let job = write_job(dir.path(), "rw", &body);
    // Both servers require a bearer token; the actor has it.
    let token = ["--token".to_string(), "s3cret".to_string()];
    let mut reward = spawn(
        "reward-server",
        "sluice-reward-server",
        &[job.display().to_string(), "--listen".into(), "127.0.0.1:0".into(), token[0].clone(), token[1].clone()],
    );
    let listening = reward.wait_line("listening", Duration::from_secs(30), |v| v["event"] == "listening");
    let reward_ep = format!("http://{}", listening["addr"].as_str().unwrap());
    let out = dir.path().join("out");
    let mut learner = Learner::start(&job, &["--out", out.to_str().unwrap(), "--linger-s", "30", "--token", "s3cret"]);
    // A wrong token is refused and the actor stops with a clear error instead of retrying forever.
    let mut intruder = actor(&job, &learner.endpoint, 0, 1, &["--token", "guess"]);
    assert_ne!(intruder.wait_exit(Duration::from_secs(60)), 0);
    let mut a = actor(&job, &learner.endpoint, 0, 1, &["--reward", &reward_ep, "--token", "s3cret"]);
    learner.wait_finished(Duration::from_secs(180));
    a.wait_line("done", Duration::from_secs(60), |v| v["event"] == "done");
    let (stats, version, anonymous) = runtime().block_on(async {
        let auth = |m| sluice_proto::auth::request(m, Some("s3cret"));
        let mut c = sluice_proto::v1::reward_client::RewardClient::connect(reward_ep.clone()).await.unwrap();
        let stats = c.annotation_statistics(auth(sluice_proto::v1::AnnotationStatsRequest { job_id: "rw".into() }));
        let stats = stats.await.unwrap().into_inner();
        let mut l = client(&learner.endpoint).await;
        let version = l.status(sluice_proto::auth::request(StatusRequest { job_id: String::new() }, Some("s3cret")));
        let version = version.await.unwrap().into_inner().version;
        let anonymous = l.status(StatusRequest { job_id: String::new() }).await.unwrap_err();
        (stats, version, anonymous)
    });
    assert!(stats.lookups > 0, "the actor never asked the reward server: {stats:?}");
    let sent: Vec<_> = a.lines().iter().filter(|v| v["event"] == "sent").cloned().collect();
    assert!(!sent.is_empty());
    assert_eq!(version, 3);
    assert_eq!(anonymous.code(), tonic::Code::Unauthenticated, "{anonymous}");
}

#[test]
fn actors_play_text_adventure_episodes_scored_by_the_reward_server() {
    let dir = tempfile::tempdir().unwrap();
    let body = "[model]\npreset = \"tiny\"\ndevice = \"cpu\"\n\
                [task]\nkind = \"adventure\"\nrooms = 2\nmax_turns = 4\nlayouts = 2\n\
                [sampling]\nmax_new_tokens = 1\n[grpo]\ngroup_size = 4\n\
                [train]\nsteps = 4\nprompts_per_step = 2\neval_prompts = 2\n[rollout]\nmax_staleness = 0\n\
                [reward]\nint_coef = 0.5\nmodel = \"retrieval\"\n\
                [[reward.rubric]]\npattern = \"nothing happens\"\nlabel = \"unhelpful\"\n\
                [[reward.rubric]]\npattern = \".\"\nlabel = \"helpful\"\n";
    let job = write_job(dir.path(), "adv", body);
    let mut reward = spawn("reward-server", "sluice-reward-server", &[job.display().to_string(), "--listen".into(), "127.0.0.1:0".into()]);
    let listening = reward.wait_line("listening", Duration::from_secs(30), |v| v["event"] == "listening");
    let reward_ep = format!("http://{}", listening["addr"].as_str().unwrap());
    let out = dir.path().join("out");
    let mut learner = Learner::start(&job, &["--out", out.to_str().unwrap(), "--linger-s", "30"]);
    let mut a = actor(&job, &learner.endpoint, 0, 1, &["--reward", &reward_ep]);
    learner.wait_finished(Duration::from_secs(180));
    a.wait_line("done", Duration::from_secs(60), |v| v["event"] == "done");
    // Every episode step produced a caption the reward server looked up (4 turns x 8 episodes per batch at most).
    let stats = runtime().block_on(async {
        let mut c = sluice_proto::v1::reward_client::RewardClient::connect(reward_ep.clone()).await.unwrap();
        c.annotation_statistics(sluice_proto::v1::AnnotationStatsRequest { job_id: "adv".into() }).await.unwrap().into_inner()
    });
    assert!(stats.lookups > 0 && stats.annotated > 0, "{stats:?}");
    let steps: Vec<_> = metrics(&out).into_iter().filter(|e| e["event"] == "step").collect();
    // Four steps: labels are made asynchronously, so the first batches may be
    // scored before any caption has one (the intrinsic part is then 0).
    assert_eq!(steps.len(), 4);
    // Responses interleave actions and observations: far longer than the 4 one-token actions.
    for s in &steps {
        assert!(s["response_len_mean"].as_f64().unwrap() > 20.0, "{s}");
        assert_eq!(s["rollouts_trained"], 8);
    }
    // The learner sees the split on the wire: what it trains on vs the environment's own reward.
    assert!(
        steps.iter().any(|s| s["reward_mean"].as_f64().unwrap() > s["extrinsic_mean"].as_f64().unwrap()),
        "{steps:?}"
    );
    let sent: Vec<_> = a.lines().iter().filter(|v| v["event"] == "sent").cloned().collect();
    // The reward the learner trains on includes the intrinsic part; the environment's own is the goal only.
    assert!(sent.iter().any(|v| v["reward_mean"].as_f64().unwrap() > v["extrinsic_mean"].as_f64().unwrap()), "{sent:?}");
}

/// A CA, and a certificate for 127.0.0.1 signed by it, as PEM files in `dir`: (ca, cert, key).
fn test_certificates(dir: &std::path::Path) -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "sluice test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap().signed_by(&key, &ca, &ca_key).unwrap();
    let write = |name: &str, pem: String| {
        let p = dir.join(name);
        std::fs::write(&p, pem).unwrap();
        p.display().to_string()
    };
    (write("ca.pem", ca.pem()), write("server.pem", cert.pem()), write("server.key", key.serialize_pem()))
}

#[test]
fn learner_reward_server_and_actor_talk_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = test_certificates(dir.path());
    let body = format!(
        "{TINY}[sampling]\nmax_new_tokens = 4\n[grpo]\ngroup_size = 4\n\
         [train]\nsteps = 2\nprompts_per_step = 4\neval_prompts = 4\n[rollout]\nmax_staleness = 0\n"
    );
    let job = write_job(dir.path(), "tls", &body);
    let tls = ["--tls-cert".to_string(), cert, "--tls-key".to_string(), key];
    let mut args = vec![job.display().to_string(), "--listen".into(), "127.0.0.1:0".into()];
    args.extend(tls.iter().cloned());
    let mut reward = spawn("reward-server", "sluice-reward-server", &args);
    let listening = reward.wait_line("listening", Duration::from_secs(30), |v| v["event"] == "listening");
    let reward_ep = format!("https://{}", listening["addr"].as_str().unwrap());
    let out = dir.path().join("out");
    let mut extra = vec!["--out", out.to_str().unwrap(), "--linger-s", "30"];
    extra.extend(tls.iter().map(String::as_str));
    let mut learner = Learner::start(&job, &extra);
    let https = learner.endpoint.replace("http://", "https://");
    // Plain HTTP/2 is not served any more.
    assert!(runtime().block_on(async {
        let mut c = client(&learner.endpoint).await;
        c.status(StatusRequest { job_id: String::new() }).await
    })
    .is_err());
    // A client that trusts another CA refuses both servers' certificates.
    let other = tempfile::tempdir().unwrap();
    let (other_ca, _, _) = test_certificates(other.path());
    let untrusted = sluice_proto::tls::client_config(std::path::Path::new(&other_ca)).unwrap();
    for ep in [&https, &reward_ep] {
        let r = runtime().block_on(sluice_actor::link::channel(ep, Some(&untrusted)));
        let err = r.expect_err("a server signed by an untrusted CA must be refused");
        eprintln!("{ep} with an untrusted CA: {err}");
    }
    // And the same client with the right CA gets through.
    let trusted = sluice_proto::tls::client_config(std::path::Path::new(&ca)).unwrap();
    runtime().block_on(sluice_actor::link::channel(&https, Some(&trusted))).expect("the right CA is trusted");
    let mut a = actor(&job, &https, 0, 1, &["--reward", &reward_ep, "--tls-ca", &ca]);
    learner.wait_finished(Duration::from_secs(180));
    a.wait_line("done", Duration::from_secs(60), |v| v["event"] == "done");
    assert_eq!(metrics(&out).iter().filter(|e| e["event"] == "step").count(), 2);
    let synced = a.lines().iter().filter(|v| v["event"] == "synced").count();
    assert!(synced >= 2, "weights came over TLS: {synced} syncs");
}

/// `rollout.weight_transport = "broadcast"`: the learner pushes each version to
/// the actors in its weights broadcast group (TCP collective on CPU). Actors
/// download only what the group did not bring them: version 0 (published
/// before they joined) and a version during which the group re-formed. An
/// actor killed mid-run ends its generation; the survivor and the restarted
/// actor rejoin and get the later versions by broadcast. Synchronous
/// training, so every version is needed by both actors.
#[test]
fn actors_get_weights_by_broadcast_and_rejoin_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let body = format!(
        "{TINY}[sampling]\nmax_new_tokens = 6\n[grpo]\ngroup_size = 4\n\
         [train]\nsteps = 40\nprompts_per_step = 8\nlr = 0.001\neval_prompts = 4\neval_every = 100\n\
         [rollout]\nmax_staleness = 0\nweights_dtype = \"bf16\"\nweight_transport = \"broadcast\"\n"
    );
    let job = write_job(dir.path(), "bcast", &body);
    let out = dir.path().join("out");
    let mut learner = Learner::start(&job, &["--out", out.to_str().unwrap(), "--linger-s", "60"]);
    let st = status(&learner.endpoint);
    assert!(st.weights_broadcast.starts_with("127.0.0.1:"), "rank 0 names its group: {st:?}");
    let mut a0 = actor(&job, &learner.endpoint, 0, 2, &[]);
    let mut a1 = actor(&job, &learner.endpoint, 1, 2, &[]);
    // Both joined: a version went to two members; then actor 1 is killed.
    learner.proc.wait_line("a version broadcast to both actors", Duration::from_secs(120), |v| {
        v["event"] == "published" && v["broadcast_members"] == 2
    });
    a1.wait_line("a broadcast sync", Duration::from_secs(60), |v| v["event"] == "synced" && v["broadcast"] == true);
    a1.kill9();
    let mut a1b = actor(&job, &learner.endpoint, 1, 2, &["--seed", "1"]);
    learner.wait_finished(Duration::from_secs(240));
    let st = status(&learner.endpoint);
    assert_eq!(st.version, 40);
    assert_eq!(st.staleness_histogram, vec![320], "synchronous: every group trained at its own version");
    for a in [&mut a0, &mut a1b] {
        a.wait_line("done", Duration::from_secs(60), |v| v["event"] == "done");
        assert_eq!(a.wait_exit(Duration::from_secs(30)), 0, "{} failed", a.name);
    }
    let synced = |p: &Proc| -> Vec<(u64, bool)> {
        p.lines().into_iter().filter(|v| v["event"] == "synced").map(|v| (v["version"].as_u64().unwrap(), v["broadcast"] == true)).collect()
    };
    let published: Vec<_> = learner.proc.lines().into_iter().filter(|v| v["event"] == "published").collect();
    let (s0, s1) = (synced(&a0), synced(&a1b));
    let members: Vec<String> = published.iter().map(|v| format!("{}:{}", v["version"], v["broadcast_members"])).collect();
    let report = format!("actor 0 synced {s0:?}; restarted actor 1 synced {s1:?}; version:members {members:?}");
    let version = |v: &serde_json::Value| v["version"].as_u64().unwrap();
    // The version whose broadcast failed on the killed actor's socket, and the
    // first after it that reached both the survivor and the restarted actor.
    let failed = published.iter().find(|v| v["broadcast_members"].is_null()).map(version).expect(&report);
    let reformed = published.iter().filter(|v| version(v) > failed && v["broadcast_members"] == 2).map(version).next().expect(&report);
    assert!(reformed <= failed + 20, "the group took too long to re-form: {report}");
    // Every version either actor needed while both were in the group came by
    // broadcast: from the first version both got until the failure, and from
    // the re-formed group on. Version 0 (published before anyone joined) was
    // downloaded; otherwise either (a member joins, or rejoins, from the next
    // version on; one may have taken the failed version whole).
    let both = published.iter().find(|v| v["broadcast_members"] == 2).map(version).expect(&report);
    assert!(both < failed, "{report}");
    assert_eq!(s0.len(), 41, "actor 0 needed every version: {report}");
    for &(v, by_broadcast) in &s0 {
        if v == 0 || (both..failed).contains(&v) || v >= reformed {
            assert_eq!(by_broadcast, v > 0, "actor 0, version {v}: {report}");
        }
    }
    assert!(s1.iter().filter(|s| s.0 >= reformed).all(|s| s.1), "{report}");
    assert!(s1.iter().filter(|s| s.1).count() >= 10, "{report}");
    // The root counted its members each version: both until the job's end.
    assert!(published.iter().filter(|v| version(v) >= reformed).all(|v| v["broadcast_members"] == 2), "{report}");
}
