//! The actor loop.
//!
//! Connect to a learner (retrying with backoff), open one `PushRollouts`
//! stream, and repeat: refresh weights when the learner is more than
//! `max_staleness` versions ahead (or restarted), sample a batch of groups with
//! the current policy, score them with the task's verifier, and send each group
//! whole. Sends block when the learner's buffer is full (backpressure). With
//! `max_staleness = 0` the actor waits for the learner to train on a version
//! before sampling again, so nothing it sends goes stale.
//!
//! With an orchestrator session the actor samples the work items it is handed
//! (`NextWork`: prompt and rollout budget) instead of choosing prompts itself,
//! tags each group with its work id, and reports each item's rewards once the
//! group is sent. Items of a batch that could not be sent are kept and sampled
//! again after reconnecting (the learner accepts one group per work id).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use sluice_core::config::JobConfig;
use sluice_model::hf::load_policy;
use sluice_model::collect::collect;
use sluice_core::tasks::{self, Split};
use sluice_proto::v1;
use tokio::sync::{mpsc, Notify};
use tokio_stream::wrappers::ReceiverStream;
use sluice_worker::Session;
use sluice_proto::auth;
use tonic::Code;

use crate::error::{Error, Result};
use crate::link::{broadcast_addr, connect_with, read_acks, wait_for, Backoff, LearnerView};
use crate::reward::{annotation_progress, rescore};
use crate::sync::{BroadcastSubscriber, GrpcSubscriber, WeightSubscriber};
use sluice_core::kinds::WeightTransport;
use sluice_proto::codec::{encode, Placement};

/// Who this actor is and where it sends.
#[derive(Debug, Clone)]
pub struct ActorOptions {
    pub job: JobConfig,
    /// Learner endpoints (`http://host:port`); actor `index` uses `learners[index % len]`.
    pub learners: Vec<String>,
    pub actor_id: String,
    /// This actor's index among `actors` (it samples prompts index, index + actors, ...).
    pub index: usize,
    pub actors: usize,
    pub seed: u64,
    /// Stop after sending this many groups (None: until the learner finishes).
    pub max_groups: Option<u64>,
    /// Reward server endpoint; without one the actor scores with the task verifier itself.
    pub reward: Option<String>,
    /// Bearer token for the learner and the reward server (`sluice_proto::auth`).
    pub token: Option<String>,
    /// CA certificate (PEM) to trust for `https://` learners and reward server.
    pub tls_ca: Option<std::path::PathBuf>,
}

/// What the actor reports (printed as JSON lines by the binary).
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum ActorEvent {
    Connected { endpoint: String, learner_version: u64 },
    /// `bytes` downloaded: the changes since `delta_from` when set, else the
    /// whole blob; `broadcast`: staged by the weights broadcast group instead.
    Synced { version: u64, bytes: usize, delta_from: Option<u64>, resumed_from: u64, seconds: f64, broadcast: bool },
    /// `extrinsic_mean`: the task's own reward (verifier, or environment for
    /// episodes); `reward_mean`: what the learner trains on (with intrinsic reward).
    Sent {
        version: u64,
        groups: usize,
        rollouts: usize,
        extrinsic_mean: f64,
        reward_mean: f64,
        generate_s: f64,
        send_s: f64,
    },
    Disconnected { reason: String },
    /// Work items taken from the orchestrator (their ids), before sampling them.
    Work { items: Vec<u64> },
    Done { groups_sent: u64, groups_accepted: u64, groups_dropped: u64, version: u64 },
}

impl ActorEvent {
    fn synced(s: &crate::sync::Synced) -> Self {
        ActorEvent::Synced {
            version: s.version,
            bytes: s.bytes,
            delta_from: s.delta_from,
            resumed_from: s.resumed_from,
            seconds: s.seconds,
            broadcast: s.broadcast,
        }
    }
}

/// How often actor 0 at most reports the reward server's annotation counters
/// (the first time with its first batch; then only when they changed): a
/// long job's log holds steps, not a report every few seconds.
const ANNOTATION_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Runs until the learner reports the job finished, `max_groups` is reached or
/// `stop` is set. Connection failures are retried with backoff. With a
/// `session`, work comes from the orchestrator (see the module docs).
pub fn run(
    opts: ActorOptions,
    session: Option<&Session>,
    stop: Arc<AtomicBool>,
    mut report: impl FnMut(&ActorEvent),
) -> Result<()> {
    let cfg = &opts.job;
    let endpoint = opts.learners[opts.index % opts.learners.len().max(1)].clone();
    let (policy, mut tokenizer) = load_policy(&cfg.model)?;
    tokenizer.set_prompt(&cfg.prompt)?;
    let task = tasks::build(&cfg.task)?;
    let mut sampling = cfg.sampling.clone();
    sampling.stop_at(tokenizer.stop_ids());
    let g = cfg.grpo.group_size;
    let per_batch = if cfg.rollout.prompts_per_batch > 0 {
        cfg.rollout.prompts_per_batch
    } else {
        cfg.train.prompts_per_step.div_ceil(opts.actors.max(1))
    };
    let staleness = cfg.rollout.staleness();
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    rng.set_stream(opts.index as u64);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| Error::Transport { endpoint: endpoint.clone(), reason: format!("runtime: {e}") })?;

    let tls = opts.tls_ca.as_deref().map(sluice_proto::tls::client_config).transpose().map_err(|reason| {
        Error::Transport { endpoint: endpoint.clone(), reason }
    })?;
    let grpc = GrpcSubscriber::new(&cfg.name, opts.token.clone(), cfg.rollout.delta_weights, rt.handle().clone());
    // The learner's groups are the job's: its orchestrator id, or its name.
    let group = session.map_or(cfg.name.as_str(), |s| s.link.job_id.as_str());
    let mut weights = BroadcastSubscriber::new(grpc, opts.token.as_deref(), group, cfg.rollout.weights_dtype);
    let token = opts.token.as_deref();
    let mut mine: Option<(u64, u64)> = None; // (version, incarnation) the policy holds
    let mut sent_at: Option<(u64, u64)> = None;
    let mut cursor: u64 = 0;
    let (mut groups_sent, mut next_group_id) = (0u64, 1u64);
    let mut backoff = Backoff::new();
    let view = Arc::new(Mutex::new(LearnerView::default()));
    let notify = Arc::new(Notify::new());
    let mut totals = (0u64, 0u64);
    let mut reward_client = None;
    let mut annotation_at: Option<Instant> = None;
    let mut annotation_last = None;
    // Work items taken from the orchestrator and not yet delivered, and the
    // outcomes of delivered ones not yet reported.
    let mut held: Vec<v1::WorkItem> = Vec::new();
    // The oldest weights the held items may be sampled with (round - max_staleness).
    let mut need_version = 0u64;
    // Sent work items not yet reported: id, rewards, and the item's span (its trace).
    let mut outcomes: Vec<(u64, Vec<f64>, tracing::Span)> = Vec::new();
    let instruments = Instruments::new();

    'connection: while !stop.load(Ordering::SeqCst) {
        let mut client = match rt.block_on(connect_with(&endpoint, tls.as_ref())) {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "learner not reachable");
                backoff.wait(&stop);
                continue;
            }
        };
        let (tx, rx) = mpsc::channel::<v1::Rollout>(2 * g);
        let acks = match rt.block_on(client.push_rollouts(auth::request(ReceiverStream::new(rx), token))) {
            Ok(r) => r.into_inner(),
            Err(status) if status.code() == Code::Unauthenticated => return Err(Error::Status(status)),
            Err(status) => {
                report(&ActorEvent::Disconnected { reason: status.to_string() });
                backoff.wait(&stop);
                continue;
            }
        };
        {
            let mut v = view.lock().expect("view lock");
            totals.0 += v.accepted;
            totals.1 += v.dropped;
            *v = LearnerView::default();
        }
        rt.spawn(read_acks(acks, view.clone(), notify.clone()));
        weights.attach(client.clone());
        if cfg.rollout.weight_transport == WeightTransport::Broadcast {
            join_broadcast(&rt, &mut client, token, &cfg.name, &endpoint, &mut weights, &policy);
        }
        // The learner's first message says where it stands.
        if !wait_for(&rt, &view, &notify, &stop, |v| v.heard || v.closed.is_some()) {
            break;
        }
        if let Some(reason) = view.lock().expect("view lock").closed.clone() {
            report(&ActorEvent::Disconnected { reason });
            backoff.wait(&stop);
            continue;
        }
        backoff.reset();
        report(&ActorEvent::Connected {
            endpoint: endpoint.clone(),
            learner_version: view.lock().expect("view lock").version,
        });

        loop {
            if stop.load(Ordering::SeqCst) {
                break 'connection;
            }
            let (lv, linc, finished, closed) = {
                let v = view.lock().expect("view lock");
                (v.version, v.incarnation, v.finished, v.closed.clone())
            };
            if finished {
                break 'connection;
            }
            if let Some(reason) = closed {
                report(&ActorEvent::Disconnected { reason });
                backoff.wait(&stop);
                continue 'connection;
            }
            let behind = match mine {
                None => true,
                Some((v, inc)) => inc != linc || staleness.must_resync(v, lv) || (v < need_version && lv > v),
            };
            if behind {
                match weights.pull(&policy, (lv, linc)) {
                    Ok(s) => {
                        mine = Some((s.version, s.incarnation));
                        report(&ActorEvent::synced(&s));
                    }
                    Err(Error::Status(s)) if s.code() == Code::Unauthenticated => return Err(Error::Status(s)),
                    // Weights that do not fit the policy will not fit next time either.
                    Err(e @ (Error::Model(_) | Error::Torch(_))) => return Err(e),
                    Err(e) => {
                        report(&ActorEvent::Disconnected { reason: format!("weight sync: {e}") });
                        backoff.wait(&stop);
                        continue 'connection;
                    }
                }
                continue;
            }
            let (version, incarnation) = mine.expect("synced");
            if staleness.is_synchronous() && sent_at == Some((version, incarnation)) {
                // Synchronous mode: this version's batch is out; wait for the next version.
                wait_for(&rt, &view, &notify, &stop, |v| {
                    v.version != version || v.incarnation != incarnation || v.finished || v.closed.is_some()
                });
                continue;
            }
            let (problems, sizes) = match session {
                None => {
                    let problems: Vec<_> = (0..per_batch)
                        .map(|k| task.problem(Split::Train, (cursor + k as u64) * opts.actors as u64 + opts.index as u64))
                        .collect();
                    cursor += per_batch as u64;
                    let sizes = vec![g; problems.len()];
                    (problems, sizes)
                }
                Some(s) => {
                    report_outcomes(s, &mut outcomes);
                    if held.is_empty() {
                        match s.next_work(per_batch as u32) {
                            Ok(r) if r.done => break 'connection,
                            Ok(r) if r.items.is_empty() => {
                                // Nothing yet (the learner has not caught up): poll again
                                // after the short delay the orchestrator asks for, not
                                // after an error backoff that grows to seconds.
                                let until = Instant::now() + Duration::from_millis(r.retry_after_ms.clamp(5, 1000));
                                while Instant::now() < until && !stop.load(Ordering::SeqCst) {
                                    std::thread::sleep(Duration::from_millis(5));
                                }
                                continue;
                            }
                            Ok(r) => {
                                held = r.items;
                                report(&ActorEvent::Work { items: held.iter().map(|w| w.id).collect() });
                                let last = held.iter().map(|w| w.round).max().unwrap_or(0);
                                need_version = last.saturating_sub(staleness.max());
                                if mine.is_some_and(|(v, _)| v < need_version) {
                                    // Rollouts for a round this far ahead would be stale at
                                    // its step: fetch newer weights first.
                                    continue;
                                }
                            }
                            Err(sluice_worker::Error::Status(st)) if st.code() == Code::Unauthenticated => {
                                return Err(Error::Orchestrator(st.to_string()))
                            }
                            Err(e) => tracing::warn!(error = %e, "no work from the orchestrator; retrying"),
                        }
                        if held.is_empty() {
                            backoff.wait(&stop);
                            continue;
                        }
                        backoff.reset();
                    }
                    let problems = held
                        .iter()
                        .map(|w| {
                            let p = task.problem(Split::Train, w.prompt_index);
                            if w.hint { p.with_hint(&cfg.hints.template) } else { p }
                        })
                        .collect();
                    (problems, held.iter().map(|w| w.n as usize).collect())
                }
            };
            // One trace per batch (sampling), and one per work item: each item's
            // Score and ReportOutcome calls are its children, its rollouts carry
            // its traceparent (the learner's step links to it), and it links to
            // the batch that sampled it.
            let batch_span = tracing::info_span!("actor_batch", version, prompts = problems.len());
            let item_spans: Vec<tracing::Span> = held
                .iter()
                .map(|w| {
                    let s = tracing::info_span!(parent: None, "work_item", work = w.id, prompt = w.prompt_index, n = w.n);
                    s.follows_from(&batch_span);
                    s
                })
                .collect();
            let _in_batch = batch_span.enter();
            let span = tracing::info_span!("sample_batch", version, prompts = problems.len());
            // Interruptible generation: at a token boundary, a newer version of
            // this learner incarnation is fetched and sampling goes on with it.
            let mut newer: Option<u64> = None;
            let mut lost = false;
            let mut hook = || -> Option<u64> {
                let (lv, linc) = {
                    let v = view.lock().expect("view lock");
                    (v.version, v.incarnation)
                };
                let cur = newer.unwrap_or(version);
                if lost || linc != incarnation || lv <= cur {
                    return None;
                }
                match weights.pull(&policy, (lv, linc)) {
                    Ok(s) if s.incarnation == incarnation && s.version > cur => {
                        newer = Some(s.version);
                        report(&ActorEvent::synced(&s));
                        Some(s.version)
                    }
                    Ok(_) => {
                        // Weights of another incarnation (the learner restarted):
                        // this batch's versions mean nothing now.
                        lost = true;
                        None
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "weight sync during generation failed; going on with the weights held");
                        None
                    }
                }
            };
            let interrupt: Option<sluice_model::generate::Interrupt> = cfg.rollout.interruptible.then_some(&mut hook);
            let collected = span.in_scope(|| {
                collect(policy.model(), &tokenizer, task.as_ref(), &problems, &sizes, &sampling, version, &mut rng, interrupt)
            });
            if let Some(v) = newer {
                mine = Some((v, incarnation));
            }
            if lost {
                // Sample the batch again with the new incarnation's weights.
                mine = None;
                continue;
            }
            let mut collected = collected?;
            let t_score = Instant::now();
            if let Some(endpoint) = &opts.reward {
                if !rescore(&rt, endpoint, token, tls.as_ref(), &mut reward_client, cfg, task.as_ref(), &problems, &mut collected.groups, &tokenizer, &item_spans, &stop)? {
                    break 'connection;
                }
                // Actor 0 passes the annotation pipeline's counters on to the job's log.
                if let Some(s) = session.filter(|_| opts.index == 0 && annotation_at.is_none_or(|t| t.elapsed() >= ANNOTATION_EVERY)) {
                    annotation_at = Some(Instant::now());
                    if let Some(a) = annotation_progress(&rt, &mut reward_client, token, &cfg.name) {
                        let counts = Some((a.labelled, a.queued, a.dropped, a.annotated, a.failures, a.lookups));
                        if counts != annotation_last {
                            annotation_last = counts;
                            s.event(sluice_proto::events::event(v1::event::Body::Annotation(a)));
                        }
                    }
                }
            }
            let score_s = t_score.elapsed().as_secs_f64();
            let t_send = Instant::now();
            let created = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
            // Each group carries its share of the batch's generation time, by response tokens.
            let tokens = |g: &sluice_core::rollout::Group| g.rollouts.iter().map(|r| r.response_tokens.len()).sum::<usize>();
            let batch_tokens = collected.groups.iter().map(tokens).sum::<usize>().max(1) as f64;
            let (mut rollouts, mut reward, mut extrinsic) = (0usize, 0.0, 0.0);
            // The learner links its step to each work item's trace (or this batch's).
            let batch_trace = sluice_core::telemetry::traceparent().unwrap_or_default();
            for (k, group) in collected.groups.iter().enumerate() {
                let work_id = held.get(k).map_or(0, |w| w.id);
                let trace = match item_spans.get(k) {
                    Some(s) => s.in_scope(sluice_core::telemetry::traceparent).unwrap_or_default(),
                    None => batch_trace.clone(),
                };
                let at = Placement {
                    job: &cfg.name,
                    actor: &opts.actor_id,
                    group_id: next_group_id,
                    group_size: group.rollouts.len(),
                    work_id,
                    trace: &trace,
                };
                next_group_id += 1;
                let generate_s = collected.generate_s * tokens(group) as f64 / batch_tokens;
                let timings = v1::Timings { generate_s, score_s, created_unix_ms: created };
                for (i, r) in group.rollouts.iter().enumerate() {
                    if tx.blocking_send(encode(r, at, i, Some(timings))).is_err() {
                        continue 'connection;
                    }
                    rollouts += 1;
                    reward += r.reward;
                    extrinsic += r.extrinsic;
                }
                groups_sent += 1;
            }
            sent_at = Some((version, incarnation));
            instruments.record(collected.groups.len(), rollouts, collected.generate_s);
            if let Some(s) = session {
                // Sent: the learner has them (or drops them); the items are done.
                for ((w, group), span) in held.drain(..).zip(&collected.groups).zip(item_spans) {
                    outcomes.push((w.id, group.rollouts.iter().map(|r| r.extrinsic).collect(), span));
                }
                report_outcomes(s, &mut outcomes);
            }
            report(&ActorEvent::Sent {
                version,
                groups: collected.groups.len(),
                rollouts,
                extrinsic_mean: extrinsic / rollouts.max(1) as f64,
                reward_mean: reward / rollouts.max(1) as f64,
                generate_s: collected.generate_s,
                send_s: t_send.elapsed().as_secs_f64(),
            });
            if opts.max_groups.is_some_and(|m| groups_sent >= m) {
                // Let the learner ack what is in flight before closing the stream.
                let want = groups_sent;
                let base = totals;
                wait_for(&rt, &view, &notify, &stop, |v| {
                    base.0 + base.1 + v.accepted + v.dropped >= want || v.closed.is_some() || v.finished
                });
                break 'connection;
            }
        }
    }
    if let Some(s) = session {
        report_outcomes(s, &mut outcomes);
    }
    let v = view.lock().expect("view lock");
    report(&ActorEvent::Done {
        groups_sent,
        groups_accepted: totals.0 + v.accepted,
        groups_dropped: totals.1 + v.dropped,
        version: mine.map_or(0, |m| m.0),
    });
    Ok(())
}

/// Joins the weights broadcast group the learner names in its status (a
/// learner without one, or an unreachable status, leaves the actor on gRPC
/// downloads; a learner restart may name a new address).
fn join_broadcast(
    rt: &tokio::runtime::Runtime,
    client: &mut sluice_proto::v1::learner_client::LearnerClient<sluice_proto::Channel>,
    token: Option<&str>,
    job: &str,
    endpoint: &str,
    weights: &mut BroadcastSubscriber,
    policy: &sluice_model::hf::Policy,
) {
    let req = auth::request(v1::StatusRequest { job_id: job.into() }, token);
    match rt.block_on(client.status(req)) {
        Ok(s) => match broadcast_addr(endpoint, &s.into_inner().weights_broadcast) {
            Some(addr) => {
                if let Err(e) = weights.join(&addr, policy) {
                    tracing::warn!(error = %e, "cannot join the weights broadcast group; downloading over gRPC");
                }
            }
            None => tracing::warn!("the learner names no weights broadcast group; downloading over gRPC"),
        },
        Err(status) => tracing::warn!(%status, "learner status unavailable; weights over gRPC for now"),
    }
}

/// The actor's OpenTelemetry instruments (no-ops unless exporting).
struct Instruments {
    groups: opentelemetry::metrics::Counter<u64>,
    rollouts: opentelemetry::metrics::Counter<u64>,
    generate_seconds: opentelemetry::metrics::Histogram<f64>,
}

impl Instruments {
    fn new() -> Self {
        let m = sluice_core::telemetry::meter();
        Instruments {
            groups: m.u64_counter("sluice.actor.groups_sent").with_unit("{group}").build(),
            rollouts: m.u64_counter("sluice.actor.rollouts_sent").with_unit("{rollout}").build(),
            generate_seconds: m.f64_histogram("sluice.actor.generate.duration").with_unit("s").build(),
        }
    }

    fn record(&self, groups: usize, rollouts: usize, generate_s: f64) {
        self.groups.add(groups as u64, &[]);
        self.rollouts.add(rollouts as u64, &[]);
        self.generate_seconds.record(generate_s, &[]);
    }
}

/// Reports work-item outcomes to the orchestrator, oldest first; keeps those it
/// could not deliver (orchestrator unreachable) for the next call. An outcome
/// the orchestrator refuses (item unknown, e.g. after it restarted without
/// Redis) is dropped.
fn report_outcomes(session: &Session, outcomes: &mut Vec<(u64, Vec<f64>, tracing::Span)>) {
    while let Some((id, rewards, span)) = outcomes.first().cloned() {
        // In the work item's trace.
        match span.in_scope(|| session.report_outcome(id, rewards)) {
            Ok(_) => {}
            Err(sluice_worker::Error::Status(s)) if matches!(s.code(), Code::NotFound | Code::InvalidArgument) => {
                tracing::warn!(work = id, status = %s, "outcome refused; dropped");
            }
            Err(e) => {
                tracing::warn!(error = %e, work = id, "outcome not reported yet; will retry");
                return;
            }
        }
        outcomes.remove(0);
    }
}
