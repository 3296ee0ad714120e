//! `sluice-worker`: the client side of the orchestrator, for workers
//! (learners, actors) and the CLI. It links neither Redis nor libtorch.
//!
//! [`Link::register`] registers a worker for a job (waiting while the
//! orchestrator is unreachable or has no job yet) and returns the job spec;
//! [`Link::spawn_heartbeats`] keeps the lease alive in the background and sets
//! the worker's stop flag when the job is cancelled or failed. A worker the
//! orchestrator no longer knows (restarted without Redis, or lease expired)
//! registers again under a new id.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sluice_proto::auth;
use sluice_proto::v1::orchestrator_client::OrchestratorClient;
use sluice_proto::v1::{self, JobState};
use sluice_proto::Channel;
use tonic::transport::{ClientTlsConfig, Endpoint};
use tonic::Code;

pub mod error;

pub use error::{Error, Result};

/// A gRPC client of the orchestrator (the CLI uses it directly).
pub async fn connect(endpoint: &str, tls: Option<&ClientTlsConfig>) -> Result<OrchestratorClient<Channel>> {
    let transport = |reason: String| Error::Transport { endpoint: endpoint.to_string(), reason };
    let mut ep = Endpoint::from_shared(endpoint.to_string()).map_err(|e| transport(e.to_string()))?;
    if let Some(tls) = tls {
        ep = ep.tls_config(tls.clone()).map_err(|e| transport(e.to_string()))?;
    }
    let channel = ep
        .connect_timeout(Duration::from_secs(3))
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|e| transport(format!("{e} (is the orchestrator running?)")))?;
    Ok(OrchestratorClient::new(sluice_proto::serve::Traced(channel))
        .max_decoding_message_size(sluice_core::limits::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(sluice_core::limits::MAX_MESSAGE_BYTES))
}

/// What a worker tells the orchestrator on each heartbeat.
#[derive(Debug, Default)]
pub struct Progress {
    pub step: AtomicU64,
    pub finished: AtomicBool,
    /// A failure that ends the job (empty: none).
    pub error: Mutex<String>,
}

/// A registered worker's connection to the orchestrator.
#[derive(Debug, Clone)]
pub struct Link {
    client: OrchestratorClient<Channel>,
    token: Option<String>,
    request: v1::RegisterWorkerRequest,
    pub job_id: String,
    worker_id: Arc<Mutex<String>>,
    pub lease_ms: u64,
}

fn retryable(s: &tonic::Status) -> bool {
    matches!(s.code(), Code::Unavailable | Code::Unknown | Code::DeadlineExceeded | Code::Cancelled)
}

impl Link {
    /// Registers as `request.role` for `request.job_id` (empty: the oldest live
    /// job), retrying while the orchestrator is unreachable or has no job, until
    /// `stop`. Returns the link and the job (its `spec_toml` configures the worker).
    pub async fn register(
        endpoint: &str,
        token: Option<String>,
        tls: Option<&ClientTlsConfig>,
        request: v1::RegisterWorkerRequest,
        stop: &AtomicBool,
    ) -> Result<(Link, v1::Job)> {
        let mut wait = Duration::from_millis(100);
        loop {
            if stop.load(Ordering::SeqCst) {
                return Err(Error::Transport { endpoint: endpoint.into(), reason: "stopped before registering".into() });
            }
            let attempt = async {
                let mut client = connect(endpoint, tls).await?;
                let r = client.register_worker(auth::request(request.clone(), token.as_deref())).await?.into_inner();
                Ok::<_, Error>((client, r))
            }
            .await;
            match attempt {
                Ok((client, r)) => {
                    let job = r.job.ok_or_else(|| Error::Invalid("registration answer without a job".into()))?;
                    tracing::info!(worker = %r.worker_id, job = %job.id, "registered with the orchestrator");
                    let link = Link {
                        client,
                        token,
                        request: v1::RegisterWorkerRequest { job_id: job.id.clone(), ..request },
                        job_id: job.id.clone(),
                        worker_id: Arc::new(Mutex::new(r.worker_id)),
                        lease_ms: r.lease_ms,
                    };
                    return Ok((link, job));
                }
                Err(Error::Status(s)) if s.code() == Code::NotFound && request.job_id.is_empty() => {
                    tracing::debug!("no job yet; waiting");
                }
                Err(Error::Status(s)) if !retryable(&s) => return Err(Error::Status(s)),
                Err(e) => tracing::debug!(error = %e, "orchestrator not reachable; retrying"),
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(2));
        }
    }

    pub fn worker_id(&self) -> String {
        self.worker_id.lock().expect("worker id lock").clone()
    }

    fn req<T>(&self, msg: T) -> tonic::Request<T> {
        auth::request(msg, self.token.as_deref())
    }

    /// Registers again under a new id (the orchestrator forgot this worker).
    async fn reregister(&self) -> Result<()> {
        let r = self.client.clone().register_worker(self.req(self.request.clone())).await?.into_inner();
        tracing::warn!(worker = %r.worker_id, "registered again with the orchestrator");
        *self.worker_id.lock().expect("worker id lock") = r.worker_id;
        Ok(())
    }

    /// Runs `call` with the current worker id; registers again once on NOT_FOUND.
    async fn with_worker<T, F, Fut>(&self, call: F) -> Result<T>
    where
        F: Fn(String) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, tonic::Status>>,
    {
        match call(self.worker_id()).await {
            Err(s) if s.code() == Code::NotFound && s.message().contains("register again") => {
                self.reregister().await?;
                Ok(call(self.worker_id()).await?)
            }
            other => Ok(other?),
        }
    }

    pub async fn heartbeat(&self, step: u64, finished: bool, error: &str) -> Result<JobState> {
        let r = self
            .with_worker(|worker_id| {
                let mut c = self.client.clone();
                let msg = v1::HeartbeatRequest { worker_id, job_id: self.job_id.clone(), step, finished, error: error.into() };
                let req = self.req(msg);
                async move { c.heartbeat(req).await }
            })
            .await?;
        Ok(JobState::try_from(r.into_inner().state).unwrap_or(JobState::Unspecified))
    }

    /// Sends training events and (learners) work-item fates.
    pub async fn report_events(&self, events: Vec<v1::Event>, fates: Option<v1::WorkFates>) -> Result<()> {
        self.with_worker(|worker_id| {
            let mut c = self.client.clone();
            let req = self.req(v1::ReportEventsRequest {
                worker_id,
                job_id: self.job_id.clone(),
                events: events.clone(),
                fates: fates.clone(),
            });
            async move { c.report_events(req).await }
        })
        .await?;
        Ok(())
    }

    pub async fn next_work(&self, max_items: u32) -> Result<v1::NextWorkResponse> {
        let r = self
            .with_worker(|worker_id| {
                let mut c = self.client.clone();
                let req = self.req(v1::NextWorkRequest { worker_id, job_id: self.job_id.clone(), max_items });
                async move { c.next_work(req).await }
            })
            .await?;
        Ok(r.into_inner())
    }

    /// Reports a work item's rewards; false when it was already complete.
    pub async fn report_outcome(&self, work_id: u64, rewards: Vec<f64>) -> Result<bool> {
        let mut c = self.client.clone();
        let msg = v1::ReportOutcomeRequest { worker_id: self.worker_id(), job_id: self.job_id.clone(), work_id, rewards };
        Ok(c.report_outcome(self.req(msg)).await?.into_inner().counted)
    }

    /// Heartbeats every third of the lease with `progress`, until `stop` is
    /// set or the job ends; sets `stop` when the job is cancelled or failed.
    /// Unreachable orchestrator: logged and retried (the lease may expire).
    pub fn spawn_heartbeats(&self, progress: Arc<Progress>, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<()> {
        let link = self.clone();
        let every = Duration::from_millis((self.lease_ms / 3).clamp(50, 5000));
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let error = progress.error.lock().expect("error lock").clone();
                let step = progress.step.load(Ordering::SeqCst);
                match link.heartbeat(step, progress.finished.load(Ordering::SeqCst), &error).await {
                    Ok(JobState::Cancelled | JobState::Failed) => {
                        tracing::warn!(job = %link.job_id, "the job was cancelled or failed; stopping");
                        stop.store(true, Ordering::SeqCst);
                        return;
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
                }
                tokio::time::sleep(every).await;
            }
        })
    }
}

/// A worker's blocking handle on the orchestrator, for the synchronous
/// learner and actor loops: it owns a small runtime that keeps the lease alive
/// and ships events in the background.
#[derive(Debug)]
pub struct Session {
    rt: tokio::runtime::Runtime,
    pub link: Link,
    pub progress: Arc<Progress>,
    events: Option<tokio::sync::mpsc::UnboundedSender<Report>>,
    reporter: Option<tokio::task::JoinHandle<()>>,
    heartbeats: tokio::task::JoinHandle<()>,
}

/// What the reporter task sends: an event, or work-item fates (merged).
enum Report {
    Event(Box<v1::Event>),
    Fates(v1::WorkFates),
}

fn merge_fates(into: &mut Option<v1::WorkFates>, f: v1::WorkFates) {
    let Some(a) = into else {
        *into = Some(f);
        return;
    };
    a.trained.extend(f.trained);
    a.stale.extend(f.stale);
    a.invalid.extend(f.invalid);
    a.filtered.extend(f.filtered);
    a.unused.extend(f.unused);
}

/// How a worker reaches the orchestrator.
#[derive(Debug, Clone, Default)]
pub struct Connection {
    pub endpoint: String,
    pub token: Option<String>,
    /// CA certificate (PEM) for an `https://` orchestrator.
    pub tls_ca: Option<std::path::PathBuf>,
}

impl Session {
    /// Registers (see [`Link::register`]) and starts heartbeats; `stop` is set
    /// when the job is cancelled or failed.
    pub fn start(conn: &Connection, request: v1::RegisterWorkerRequest, stop: Arc<AtomicBool>) -> Result<(Session, v1::Job)> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("sluice-orchestrator-link")
            .enable_all()
            .build()
            .map_err(|e| Error::Io { what: "async runtime".into(), source: e })?;
        let tls = conn
            .tls_ca
            .as_deref()
            .map(sluice_proto::tls::client_config)
            .transpose()
            .map_err(|reason| Error::Transport { endpoint: conn.endpoint.clone(), reason })?;
        let (link, job) = rt.block_on(Link::register(&conn.endpoint, conn.token.clone(), tls.as_ref(), request, &stop))?;
        let progress = Arc::new(Progress::default());
        let heartbeats = {
            let _guard = rt.enter();
            link.spawn_heartbeats(progress.clone(), stop)
        };
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Report>();
        let reporter = {
            let link = link.clone();
            rt.spawn(async move {
                let (mut batch, mut fates) = (Vec::new(), None);
                let add = |r: Report, batch: &mut Vec<v1::Event>, fates: &mut Option<v1::WorkFates>| match r {
                    Report::Event(e) => batch.push(*e),
                    Report::Fates(f) => merge_fates(fates, f),
                };
                loop {
                    if batch.is_empty() && fates.is_none() {
                        match rx.recv().await {
                            Some(r) => add(r, &mut batch, &mut fates),
                            None => return,
                        }
                    }
                    while let Ok(r) = rx.try_recv() {
                        add(r, &mut batch, &mut fates);
                    }
                    match link.report_events(batch.clone(), fates.clone()).await {
                        Ok(()) => {
                            batch.clear();
                            fates = None;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "reporting events failed; retrying");
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                    }
                }
            })
        };
        Ok((Session { rt, link, progress, events: Some(tx), reporter: Some(reporter), heartbeats }, job))
    }

    /// Queues a training event for the job's log.
    pub fn event(&self, event: v1::Event) {
        if let Some(tx) = &self.events {
            let _ = tx.send(Report::Event(Box::new(event)));
        }
    }

    /// Queues what a learner did with some work items (sent with the next
    /// events, retried like them).
    pub fn fates(&self, fates: v1::WorkFates) {
        let empty = [&fates.trained, &fates.stale, &fates.invalid, &fates.filtered, &fates.unused].iter().all(|v| v.is_empty());
        if let Some(tx) = self.events.as_ref().filter(|_| !empty) {
            let _ = tx.send(Report::Fates(fates));
        }
    }

    pub fn next_work(&self, max_items: u32) -> Result<v1::NextWorkResponse> {
        self.rt.block_on(self.link.next_work(max_items))
    }

    pub fn report_outcome(&self, work_id: u64, rewards: Vec<f64>) -> Result<bool> {
        self.rt.block_on(self.link.report_outcome(work_id, rewards))
    }

    /// Sends the queued events and a last heartbeat (`finished`, or the error
    /// that ends the job), retrying for up to 30 s while the orchestrator is
    /// unreachable (e.g. restarting), then stops the background tasks.
    pub fn finish(mut self, finished: bool, error: Option<String>) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        self.events.take();
        if let Some(r) = self.reporter.take() {
            let _ = self.rt.block_on(async { tokio::time::timeout_at(deadline, r).await });
        }
        self.heartbeats.abort();
        let step = self.progress.step.load(Ordering::SeqCst);
        let error = error.unwrap_or_default();
        let link = &self.link;
        let last = self.rt.block_on(async {
            loop {
                match tokio::time::timeout_at(deadline, link.heartbeat(step, finished, &error)).await {
                    Ok(Ok(_)) => return Ok(()),
                    Ok(Err(Error::Status(s))) if !retryable(&s) => return Err(Error::Status(s)),
                    Err(_) => return Err(Error::Invalid("no answer within 30 s".into())),
                    Ok(Err(e)) if tokio::time::Instant::now() >= deadline => return Err(e),
                    Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(250)).await,
                }
            }
        });
        if let Err(e) = last {
            tracing::warn!(error = %e, "last heartbeat to the orchestrator failed");
        }
        self.rt.shutdown_timeout(Duration::from_secs(1));
    }
}

/// Where a job from an orchestrator may read and write on this host (flags of
/// every worker binary; see `sluice_core::paths`). A job from a file given on
/// the command line is the operator's own and is not confined.
#[derive(clap::Args, Debug, Clone)]
pub struct RootArgs {
    /// Each orchestrated job writes only to `<runs-root>/<job id>` (checkpoints,
    /// metrics); its `train.out_dir` is ignored.
    #[arg(long, env = "SLUICE_RUNS_ROOT", default_value = "runs")]
    pub runs_root: std::path::PathBuf,
    /// A submitted job's `model.path` must resolve under this directory
    /// (relative paths are joined to it); without it, no model path is accepted.
    #[arg(long, env = "SLUICE_MODELS_ROOT")]
    pub models_root: Option<std::path::PathBuf>,
    /// A submitted job's `task.path`, `task.eval_path` and judge prompt file
    /// must resolve under this directory; without it, none is accepted.
    #[arg(long, env = "SLUICE_DATA_ROOT")]
    pub data_root: Option<std::path::PathBuf>,
}

impl RootArgs {
    pub fn roots(&self) -> sluice_core::paths::Roots {
        sluice_core::paths::Roots { runs: self.runs_root.clone(), models: self.models_root.clone(), data: self.data_root.clone() }
    }
}

/// A worker's job: from its file, or — with an orchestrator connection — from
/// the orchestrator it registers with (`request`), which then also gets the
/// worker's session; that job's paths are confined to `roots`. `overrides`
/// (`--set section.key=value`) change a job file; an orchestrator's job was
/// fixed when it was submitted.
pub fn load_job(
    file: Option<&std::path::Path>,
    overrides: &[String],
    orchestrator: Option<Connection>,
    roots: &RootArgs,
    request: v1::RegisterWorkerRequest,
    stop: Arc<AtomicBool>,
) -> Result<(sluice_core::config::JobConfig, Option<Session>)> {
    match (file, orchestrator) {
        (_, Some(_)) if !overrides.is_empty() => {
            Err(Error::Invalid("--set changes a job file; with --orchestrator the job is the one submitted (use `sluice submit --set`)".into()))
        }
        (_, Some(conn)) => {
            let (session, job) = Session::start(&conn, request, stop)?;
            let confined = sluice_core::config::JobConfig::from_toml(&job.spec_toml)
                .and_then(|mut cfg| roots.roots().apply(&mut cfg, &job.id).map(|()| cfg));
            match confined {
                Ok(cfg) => Ok((cfg, Some(session))),
                Err(e) => {
                    // The job cannot run on this worker: say so, so it fails with the reason.
                    session.finish(false, Some(e.to_string()));
                    Err(e.into())
                }
            }
        }
        (Some(path), None) => Ok((sluice_core::config::JobConfig::load(path, overrides)?.1, None)),
        (None, None) => Err(Error::Invalid("give a job file or --orchestrator".into())),
    }
}
