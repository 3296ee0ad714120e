//! A learner process: one rank of a job's data-parallel learner group.
//!
//! It serves `sluice.v1.Learner` (and gRPC health) on a tokio runtime, and runs
//! the training loop on the calling thread: warm-up, then for each step it takes
//! `prompts_per_step / world_size` complete groups from the ingest buffer
//! (dropping any older than `max_staleness`), trains with the other ranks, bumps
//! the policy version and publishes the new weights. Rank 0 evaluates, writes
//! checkpoints and `metrics.jsonl`; a restart resumes from the newest checkpoint.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use sluice_core::config::JobConfig;
use sluice_core::rollout::Group;
use sluice_core::staleness::Verdict;
use sluice_worker::Session;
use sluice_proto::auth;
use sluice_proto::v1::{self, learner_server::LearnerServer};
use tch::Device;
use tokio::sync::mpsc;
use tonic::service::interceptor::InterceptedService;
use sluice_proto::tls::ServerFiles;
use tonic::transport::ServerTlsConfig;

use crate::collective::{Collective, GroupAuth, Single, TcpCollective};
use crate::nccl::NcclCollective;
use crate::error::{Error, Result};
use crate::ingest::Limits;
use crate::service::{Fate, LearnerService, Shared};
use crate::metrics::{Event, StepMetrics};
use crate::publish::{BroadcastPublisher, GrpcPublisher, WeightPublisher};
use sluice_core::kinds::WeightTransport;
use crate::source::{informative, Drawn, Feed, RolloutSource};
use crate::trainer::Trainer;

/// Where this rank listens and how it finds the others.
#[derive(Debug)]
pub struct NodeOptions {
    pub job: JobConfig,
    /// gRPC listen address (`host:port`; port 0 picks a free one).
    pub listen: String,
    pub rank: usize,
    pub world_size: usize,
    /// Rank 0's collective address (`host:port`); needed when world_size > 1.
    pub rendezvous: Option<String>,
    /// With `rollout.weight_transport = "broadcast"`: where rank 0's weights
    /// broadcast group listens (default: the gRPC listen host, a free port),
    /// and, on other ranks, the address they tell their actors (rank 0's,
    /// reachable from the actors).
    pub weights_broadcast: Option<String>,
    /// Resume from the newest checkpoint in the job's out_dir.
    pub resume: bool,
    /// Gradient collective between ranks.
    pub collective: CollectiveKind,
    /// How long to keep answering after the last step (so actors learn the job finished).
    pub linger: Duration,
    /// Bearer token every Learner call must carry (`sluice_proto::auth`); None: no check.
    pub token: Option<String>,
    /// Serve TLS with this certificate and key (`sluice_proto::tls`); None: plain HTTP/2.
    pub tls: Option<ServerFiles>,
    /// The orchestrator this learner registered with: it gets the learner's
    /// step events (rank 0) and, on heartbeats, its progress; a cancelled job
    /// stops the learner after the current step.
    pub session: Option<Session>,
}

/// Which collective backend data-parallel ranks use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CollectiveKind {
    /// NCCL when the policy is on a CUDA device, otherwise TCP.
    Auto,
    /// The CPU collective over TCP (any device; tensors are staged through host memory).
    Tcp,
    /// NCCL (the policy must be on a CUDA device).
    Nccl,
}

impl std::str::FromStr for CollectiveKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(CollectiveKind::Auto),
            "tcp" => Ok(CollectiveKind::Tcp),
            "nccl" => Ok(CollectiveKind::Nccl),
            other => Err(format!("`{other}` is not one of auto, tcp, nccl")),
        }
    }
}

/// What members of the job's groups prove: the job's token, and the job (its
/// orchestrator id, or its name for a job file).
fn group_auth(opts: &NodeOptions, session: Option<&Session>) -> GroupAuth {
    let group = session.map_or(opts.job.name.as_str(), |s| s.link.job_id.as_str());
    GroupAuth::new(opts.token.as_deref(), group)
}

/// How this rank publishes versions: `GetWeights` always; with
/// `rollout.weight_transport = "broadcast"`, rank 0 also pushes each version to
/// its weights broadcast group, and every rank tells actors where it is.
fn build_publisher(opts: &NodeOptions, session: Option<&Session>, shared: &Arc<Shared>, listen: std::net::SocketAddr) -> Result<Box<dyn WeightPublisher>> {
    let r = &opts.job.rollout;
    let grpc = GrpcPublisher::new(shared.clone(), r.weights_dtype, r.delta_weights);
    if r.weight_transport != WeightTransport::Broadcast {
        return Ok(Box::new(grpc));
    }
    if opts.rank > 0 {
        match &opts.weights_broadcast {
            Some(a) => {
                let _ = shared.weights_broadcast.set(a.clone());
            }
            None => tracing::warn!("no --weights-broadcast address on this rank: its actors download every version"),
        }
        return Ok(Box::new(grpc));
    }
    let bind = opts.weights_broadcast.clone().unwrap_or_else(|| std::net::SocketAddr::new(listen.ip(), 0).to_string());
    let root = sluice_collective::weights::Root::bind(&bind, &group_auth(opts, session), shared.incarnation)?;
    let _ = shared.weights_broadcast.set(root.local_addr().to_string());
    Ok(Box::new(BroadcastPublisher::new(grpc, root, r.weights_dtype)))
}

/// The ranks' group: they prove the job's token and agree on the job and the world size.
fn build_collective(opts: &NodeOptions, session: Option<&Session>, world: usize) -> Result<Box<dyn Collective>> {
    if world == 1 {
        return Ok(Box::new(Single));
    }
    let addr = opts
        .rendezvous
        .as_deref()
        .ok_or_else(|| Error::Collective("a rendezvous address is required with more than one rank".into()))?;
    let tcp = TcpCollective::connect(opts.rank, world, addr, &group_auth(opts, session), Duration::from_secs(300))?;
    let device = sluice_model::device::device(opts.job.model.device);
    match (opts.collective, device) {
        (CollectiveKind::Tcp, _) | (CollectiveKind::Auto, Device::Cpu) => Ok(Box::new(tcp)),
        (_, Device::Cuda(i)) => Ok(Box::new(NcclCollective::new(tcp, i)?)),
        (CollectiveKind::Nccl, other) => {
            Err(Error::Collective(format!("the nccl collective needs a CUDA policy, not {other:?}")))
        }
        (CollectiveKind::Auto, other) => Err(Error::Collective(format!("no collective for device {other:?}"))),
    }
}

/// What the learner reports as it runs (printed as JSON lines by the binary).
/// Training events keep their own tags (`sft`, `step`, `eval`, `checkpoint`).
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum NodeEvent<'a> {
    Listening { addr: String, rank: usize, world_size: usize, version: u64 },
    /// `delta_bytes`: the delta from the version before (0: none);
    /// `broadcast_members`: actors it was broadcast to (broadcast transport only).
    Published {
        version: u64,
        bytes: usize,
        delta_bytes: usize,
        seconds: f64,
        #[serde(skip_serializing_if = "Option::is_none")]
        broadcast_members: Option<usize>,
        #[serde(skip_serializing_if = "Option::is_none")]
        broadcast_seconds: Option<f64>,
    },
    Finished { version: u64 },
    #[serde(untagged)]
    Train(&'a Event),
}

/// Serves the Learner service and gRPC health on `listener` until `shutdown`
/// resolves. With a `token`, Learner calls without it are refused (health stays
/// open); with `tls`, only TLS connections are served.
pub async fn serve(
    shared: Arc<Shared>,
    listener: tokio::net::TcpListener,
    token: Option<&str>,
    tls: Option<ServerTlsConfig>,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::result::Result<(), tonic::transport::Error> {
    let svc = LearnerServer::new(LearnerService::new(shared))
        .max_decoding_message_size(sluice_core::limits::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(sluice_core::limits::MAX_MESSAGE_BYTES);
    let svc = InterceptedService::new(svc, auth::Check::new(token));
    sluice_proto::serve::serve::<LearnerServer<LearnerService>>(listener, tls, shutdown, |s| s.add_service(svc)).await
}

fn build_runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("sluice-learner-io")
        .enable_all()
        .build()
        .map_err(|e| Error::Training(format!("cannot start the async runtime: {e}")))
}

/// Runs one learner rank until the job's steps are done or `stop` is set.
pub fn run(mut opts: NodeOptions, stop: Arc<AtomicBool>, mut report: impl FnMut(&NodeEvent)) -> Result<()> {
    let session = opts.session.take();
    let result = run_rank(&opts, session.as_ref(), stop.clone(), &mut report);
    if let Some(s) = session {
        let finished = result.is_ok() && !stop.load(Ordering::SeqCst);
        s.finish(finished, result.as_ref().err().map(|e| e.to_string()));
    }
    result
}

fn run_rank(
    opts: &NodeOptions,
    session: Option<&Session>,
    stop: Arc<AtomicBool>,
    report: &mut dyn FnMut(&NodeEvent),
) -> Result<()> {
    let cfg = opts.job.clone();
    let world = opts.world_size.max(1);
    if !cfg.train.prompts_per_step.is_multiple_of(world) {
        return Err(sluice_core::Error::config(
            "train.prompts_per_step",
            format!("{} is not divisible by the {world} learner ranks", cfg.train.prompts_per_step),
        )
        .into());
    }
    let comm = build_collective(opts, session, world)?;
    let mut trainer = Trainer::with_collective(cfg.clone(), opts.resume, comm)?;
    let mc = trainer.policy().config().clone();
    let limits = Limits {
        job: cfg.name.clone(),
        vocab_size: mc.vocab_size as usize,
        max_tokens: mc.max_position_embeddings as usize,
        max_rollout_bytes: cfg.rollout.max_rollout_bytes,
        max_group_size: cfg.rollout.max_group_size,
        needs_logprobs: cfg.algorithm != sluice_core::config::Algorithm::Bgpo,
    };
    let per_rank = cfg.train.prompts_per_step / world;
    let (shared, mut rx) = Shared::new(
        limits,
        opts.rank,
        world,
        trainer.state().step,
        cfg.rollout.max_staleness,
        per_rank,
        cfg.rollout.buffer_groups,
        cfg.rollout.weight_chunk_bytes,
        trainer.work_ids().clone(),
    );

    let rt = build_runtime()?;
    let listener = rt
        .block_on(tokio::net::TcpListener::bind(&opts.listen))
        .map_err(|e| Error::io(format!("listen address {}", opts.listen), e))?;
    let addr = listener.local_addr().map_err(|e| Error::io("listener", e))?;
    // Before the server answers: its status names the weights broadcast group.
    let publisher = RefCell::new(build_publisher(opts, session, &shared, addr)?);
    let (shutdown_tx, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
    let tls = opts.tls.as_ref().map(ServerFiles::config).transpose().map_err(Error::Server)?;
    let (token, shared_for_server) = (opts.token.clone(), shared.clone());
    let server = rt.spawn(async move {
        serve(shared_for_server, listener, token.as_deref(), tls, async {
            let _ = shutdown_rx.await;
        })
        .await
    });
    report(&NodeEvent::Listening { addr: addr.to_string(), rank: opts.rank, world_size: world, version: shared.version() });
    tracing::info!(%addr, rank = opts.rank, world, "learner serving");

    let publish = |trainer: &Trainer, report: &mut dyn FnMut(&NodeEvent)| -> Result<()> {
        let p = publisher.borrow_mut().publish(trainer.state().step, trainer.policy())?;
        report(&NodeEvent::Published {
            version: p.version,
            bytes: p.bytes,
            delta_bytes: p.delta_bytes,
            seconds: p.seconds,
            broadcast_members: p.broadcast.map(|b| b.0),
            broadcast_seconds: p.broadcast.map(|b| b.1),
        });
        Ok(())
    };

    // Rank 0's training events also go to the orchestrator (`sluice logs`).
    let mut report = |e: &NodeEvent| {
        if let (Some(s), NodeEvent::Train(t)) = (session, e) {
            if let Event::Step(m) = t {
                s.progress.step.store(m.step, Ordering::SeqCst);
            }
            if opts.rank == 0 {
                s.event(v1::Event::from(*t));
            }
        }
        report(e)
    };
    let report = RefCell::new(&mut report);
    let mut published = false;
    let instruments = Instruments::new();
    let mut buffer = ActorBuffer {
        shared: &shared,
        rt: &rt,
        rx: &mut rx,
        need: per_rank,
        filter: cfg.grpo.filter_zero_variance,
        stop: &stop,
        drawn: Vec::new(),
    };
    // Every rank reports what became of the work items that reached it.
    let report_fates = |shared: &Shared| {
        if let Some(s) = session {
            s.fates(shared.take_fates());
        }
    };
    let result = trainer.run_with(
        &stop,
        |e| (report.borrow_mut())(&NodeEvent::Train(e)),
        |t| {
            if !published {
                publish(t, &mut *report.borrow_mut())?;
                published = true;
            }
            let span = tracing::info_span!("train_step", step = t.state().step + 1, rank = opts.rank);
            let _entered = span.enter();
            let stepped = t.step(&mut buffer);
            buffer.settle(matches!(stepped, Ok(Some(_))));
            report_fates(&shared);
            let Some(m) = stepped? else { return Ok(None) };
            publish(t, &mut *report.borrow_mut())?;
            instruments.record(&m);
            Ok(Some(m))
        },
    );
    // Finished first, then close the buffer: a stream blocked on a full buffer
    // wakes up, and every actor hears that the job is over.
    shared.finish();
    buffer.close();
    report_fates(&shared);
    (report.borrow_mut())(&NodeEvent::Finished { version: shared.version() });
    if result.is_ok() && !stop.load(Ordering::SeqCst) {
        std::thread::sleep(opts.linger);
    }
    let _ = shutdown_tx.send(());
    // Groups that arrived while the learner lingered were refused as unused.
    report_fates(&shared);
    let _ = rt.block_on(async { tokio::time::timeout(Duration::from_secs(5), server).await });
    rt.shutdown_timeout(Duration::from_secs(1));
    result
}

/// The learner's OpenTelemetry instruments (no-ops unless exporting).
struct Instruments {
    steps: opentelemetry::metrics::Counter<u64>,
    groups: opentelemetry::metrics::Counter<u64>,
    step_seconds: opentelemetry::metrics::Histogram<f64>,
    wait_seconds: opentelemetry::metrics::Histogram<f64>,
    reward: opentelemetry::metrics::Gauge<f64>,
    effective_gradient_ratio: opentelemetry::metrics::Gauge<f64>,
    staleness: opentelemetry::metrics::Gauge<f64>,
}

impl Instruments {
    fn new() -> Self {
        let m = sluice_core::telemetry::meter();
        Instruments {
            steps: m.u64_counter("sluice.learner.steps").with_unit("{step}").with_description("GRPO steps trained").build(),
            groups: m.u64_counter("sluice.learner.groups_trained").with_unit("{group}").build(),
            step_seconds: m.f64_histogram("sluice.learner.step.duration").with_unit("s").build(),
            wait_seconds: m.f64_histogram("sluice.learner.wait.duration").with_unit("s").build(),
            reward: m.f64_gauge("sluice.learner.reward_mean").with_unit("1").build(),
            effective_gradient_ratio: m.f64_gauge("sluice.learner.effective_gradient_ratio").with_unit("1").build(),
            staleness: m.f64_gauge("sluice.learner.staleness_mean").with_unit("{version}").build(),
        }
    }

    fn record(&self, m: &StepMetrics) {
        self.steps.add(1, &[]);
        self.groups.add(m.groups_trained as u64, &[]);
        self.step_seconds.record(m.step_seconds, &[]);
        self.wait_seconds.record(m.wait_seconds, &[]);
        self.reward.record(m.reward_mean, &[]);
        self.effective_gradient_ratio.record(m.effective_gradient_ratio, &[]);
        self.staleness.record(m.staleness_mean, &[]);
    }
}

/// The actors' rollouts, as the ingest service assembled them: each step
/// takes `need` trainable groups, dropping (and counting) groups the
/// staleness rule refuses and, with dynamic sampling, groups without reward
/// variance. Stops when `stop` is set or the buffer closes.
struct ActorBuffer<'a> {
    shared: &'a Shared,
    rt: &'a tokio::runtime::Runtime,
    rx: &'a mut mpsc::Receiver<Group>,
    need: usize,
    filter: bool,
    stop: &'a AtomicBool,
    /// Work ids of the groups handed to the step in progress.
    drawn: Vec<u64>,
}

impl ActorBuffer<'_> {
    /// The step that drew the last groups finished (`trained`) or did not.
    fn settle(&mut self, trained: bool) {
        for id in self.drawn.drain(..) {
            self.shared.fate(id, if trained { Fate::Trained } else { Fate::Unused });
        }
    }

    /// The job ended: whatever is still buffered will not be trained.
    fn close(&mut self) {
        self.settle(false);
        self.rx.close();
        while let Ok(g) = self.rx.try_recv() {
            self.shared.fate(g.work_id, Fate::Unused);
        }
    }
}

impl RolloutSource for ActorBuffer<'_> {
    fn next(&mut self, t: &mut dyn Feed) -> Result<Option<Drawn>> {
        let t0 = Instant::now();
        let version = t.state().step;
        let (mut groups, mut lags) = (Vec::with_capacity(self.need), Vec::with_capacity(self.need));
        while groups.len() < self.need {
            if self.stop.load(Ordering::SeqCst) {
                return Ok(None);
            }
            let g = match self.rt.block_on(async { tokio::time::timeout(Duration::from_millis(100), self.rx.recv()).await }) {
                Ok(Some(g)) => g,
                Ok(None) => return Ok(None),
                Err(_) => continue,
            };
            match self.shared.staleness.verdict(g.oldest_version(), version) {
                Verdict::Fresh { .. } if !informative(self.filter, &g) => {
                    tracing::debug!(prompt = g.prompt_id, "dropped a group without reward variance");
                    self.shared.fate(g.work_id, Fate::Filtered);
                }
                Verdict::Fresh { lag } => {
                    lags.push(lag);
                    groups.push(g);
                }
                dropped => {
                    self.shared.count_drop(dropped);
                    self.shared.fate(g.work_id, Fate::Stale);
                }
            }
        }
        let mut s = self.shared.stats.lock().expect("stats lock");
        for &lag in &lags {
            s.staleness_histogram[lag as usize] += 1;
        }
        drop(s);
        // The step's span (train_step) links to the batches that sampled its groups.
        let step_span = tracing::Span::current();
        let mut linked = std::collections::BTreeSet::new();
        for t in groups.iter().filter_map(|g| g.trace.as_deref()) {
            if linked.insert(t) {
                sluice_core::telemetry::link(&step_span, t);
            }
        }
        // The rewards the learner reports are those of the groups it trains on.
        self.drawn = groups.iter().map(|g| g.work_id).collect();
        // Generation speed of the actors that sampled these groups (those that said how long it took).
        let timed = groups.iter().filter(|g| g.generate_s > 0.0);
        let generated: usize = timed.clone().flat_map(|g| &g.rollouts).map(|r| r.response_tokens.len()).sum();
        let generate_s: f64 = timed.map(|g| g.generate_s).sum();
        let mut d = Drawn::of(groups);
        d.lags = lags;
        d.generated_tokens = generated;
        d.generate_s = generate_s;
        d.wait_s = t0.elapsed().as_secs_f64();
        Ok(Some(d))
    }
}
