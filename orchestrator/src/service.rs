//! The orchestrator's state and the `sluice.v1.Orchestrator` gRPC service.
//!
//! [`Orchestrator`] holds every job's [`Job`] driver, each under its own async
//! mutex, and the live workers, and writes each mutation through to the
//! [`Store`] before answering (so a restart with Redis loses no answered
//! request). A call holds only its job's lock across the store write, so calls
//! on different jobs do not wait for each other's Redis round trip. Workers
//! keep a lease alive by heartbeats; [`Orchestrator::sweep`] drops workers
//! whose lease ran out and puts their work items back in the queue.

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sluice_core::limits::{ECHOED_ID_CHARS, MAX_ID_BYTES, MAX_LIST_PAGE, MAX_WORK_ITEMS_PER_CALL};
use sluice_proto::v1::{self, event::Body, orchestrator_server};
use tokio::sync::{mpsc, Mutex, OwnedMutexGuard, RwLock, RwLockReadGuard};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::driver::{Changes, Job, JobState};
use crate::error::{Error, Result};
use crate::store::{Store, Worker};

/// The orchestrator's OpenTelemetry counters (no-ops unless exporting).
struct Counters {
    dispatched: opentelemetry::metrics::Counter<u64>,
    completed: opentelemetry::metrics::Counter<u64>,
    duplicates: opentelemetry::metrics::Counter<u64>,
    redispatched: opentelemetry::metrics::Counter<u64>,
}

fn counters() -> &'static Counters {
    static C: std::sync::OnceLock<Counters> = std::sync::OnceLock::new();
    C.get_or_init(|| {
        let m = sluice_core::telemetry::meter();
        Counters {
            dispatched: m.u64_counter("sluice.orchestrator.work_dispatched").with_unit("{item}").build(),
            completed: m.u64_counter("sluice.orchestrator.work_completed").with_unit("{item}").build(),
            duplicates: m.u64_counter("sluice.orchestrator.duplicate_outcomes").with_unit("{outcome}").build(),
            redispatched: m.u64_counter("sluice.orchestrator.work_redispatched").with_unit("{item}").build(),
        }
    })
}

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// A registered worker and when its lease runs out.
#[derive(Debug, Clone)]
struct Live {
    worker: Worker,
    deadline_ms: u64,
}

type Workers = HashMap<String, Live>;

/// The job map. Calls read-lock it and then lock the one job they touch, which
/// they hold across that job's store write: calls on one job are serialised
/// (memory and store change together), calls on different jobs are not.
/// Adding or removing a job, and re-reading everything after a store failure,
/// take the write lock.
#[derive(Debug, Default)]
struct State {
    jobs: BTreeMap<String, Arc<Mutex<Job>>>,
    /// Memory store only (Redis hands out job numbers itself).
    next_job: u64,
}

/// The orchestrator: jobs, workers, dispatch.
#[derive(Debug)]
pub struct Orchestrator {
    state: RwLock<State>,
    /// Live workers; a plain mutex, never held across an await.
    workers: std::sync::Mutex<Workers>,
    store: Store,
    /// A worker's lease lasts this long after each heartbeat.
    pub lease_ms: u64,
}

fn state_wire(s: JobState) -> v1::JobState {
    match s {
        JobState::Queued => v1::JobState::Queued,
        JobState::Running => v1::JobState::Running,
        JobState::Succeeded => v1::JobState::Succeeded,
        JobState::Failed => v1::JobState::Failed,
        JobState::Cancelled => v1::JobState::Cancelled,
    }
}

fn not_found(id: &str) -> Error {
    Error::NotFound(format!("job `{}`", clip(id)))
}

/// The worker `id`, which must work for `job`.
fn worker_of<'w>(workers: &'w Workers, id: &str, job: &str) -> Result<&'w Live> {
    let live = workers.get(id).ok_or_else(|| Error::NotFound(format!("worker `{}` (register again)", clip(id))))?;
    if live.worker.job != job {
        return Err(Error::Invalid(format!("worker `{}` works for job `{}`, not `{}`", clip(id), live.worker.job, clip(job))));
    }
    Ok(live)
}

impl Orchestrator {
    /// Opens the orchestrator over `store`, restoring whatever it holds.
    pub async fn open(store: Store, lease: Duration) -> Result<Orchestrator> {
        let lease_ms = lease.as_millis().max(1) as u64;
        let (state, workers) = Self::restore(&store, lease_ms).await?;
        if !state.jobs.is_empty() {
            tracing::info!(jobs = state.jobs.len(), workers = workers.len(), "restored state from {}", store.describe());
        }
        Ok(Orchestrator { state: RwLock::new(state), workers: std::sync::Mutex::new(workers), store, lease_ms })
    }

    /// The jobs and workers as the store holds them.
    async fn restore(store: &Store, lease_ms: u64) -> Result<(State, Workers)> {
        let snap = store.load().await?;
        let now = now_ms();
        let mut state = State { next_job: snap.next_job, ..State::default() };
        for job in snap.jobs {
            state.jobs.insert(job.rec.id.clone(), Arc::new(Mutex::new(job)));
        }
        // Workers whose lease was alive get a fresh one: they are heard from or expire.
        let workers = snap.workers.into_iter().map(|w| (w.id.clone(), Live { worker: w, deadline_ms: now + lease_ms })).collect();
        Ok((state, workers))
    }

    fn workers(&self) -> std::sync::MutexGuard<'_, Workers> {
        self.workers.lock().expect("workers lock")
    }

    /// Re-reads jobs and workers from the store if a write failed since the
    /// last look (memory may then hold changes the store does not: they are
    /// dropped, as the call that made them was answered UNAVAILABLE). While the
    /// store stays unreachable this fails UNAVAILABLE.
    async fn recover(&self) -> Result<()> {
        if !self.store.is_failed() {
            return Ok(());
        }
        // The flag is taken under the write lock: no call runs on the old state meanwhile.
        let mut st = self.state.write().await;
        if !self.store.take_failed() {
            return Ok(()); // another call re-read it while this one waited
        }
        match Self::restore(&self.store, self.lease_ms).await {
            Ok((fresh, workers)) => {
                tracing::warn!(jobs = fresh.jobs.len(), "state read back from {} after a store failure", self.store.describe());
                *st = fresh;
                *self.workers() = workers;
                Ok(())
            }
            Err(e) => {
                self.store.mark_failed();
                Err(e)
            }
        }
    }

    /// The job map, read-locked (after [`Orchestrator::recover`]).
    async fn read(&self) -> Result<RwLockReadGuard<'_, State>> {
        self.recover().await?;
        Ok(self.state.read().await)
    }

    /// Job `id`, locked, with the map read-locked. If a store write failed
    /// while this call waited for the job, the state is re-read first: no call
    /// builds on a change the store may lack.
    async fn job(&self, id: &str) -> Result<(RwLockReadGuard<'_, State>, OwnedMutexGuard<Job>)> {
        loop {
            let st = self.read().await?;
            let job = st.jobs.get(id).cloned().ok_or_else(|| not_found(id))?;
            let guard = job.lock_owned().await;
            if !self.store.is_failed() {
                return Ok((st, guard));
            }
        }
    }

    /// A job as the API shows it.
    fn wire(&self, job: &Job) -> v1::Job {
        let p = &job.rec.progress;
        let live = self.workers().values().filter(|l| l.worker.job == job.rec.id).count() as u32;
        v1::Job {
            id: job.rec.id.clone(),
            name: job.rec.name.clone(),
            state: state_wire(job.rec.state) as i32,
            spec_toml: job.rec.spec_toml.clone(),
            created_unix_ms: job.rec.created_ms,
            updated_unix_ms: job.rec.updated_ms,
            message: job.rec.message.clone(),
            progress: Some(v1::JobProgress {
                step: p.step,
                total_steps: p.total_steps,
                work_created: p.work_created,
                work_dispatched: p.work_dispatched,
                work_completed: p.work_completed,
                work_redispatched: p.work_redispatched,
                duplicate_outcomes: p.duplicate_outcomes,
                rollouts_completed: p.rollouts_completed,
                live_workers: live,
                epoch: p.epoch,
                work_outstanding: job.items.len() as u64,
                events_dropped: p.events_dropped,
                work_hinted: p.work_hinted,
                work_trained: p.work_trained,
                work_dropped_stale: p.work_dropped_stale,
                work_dropped_invalid: p.work_dropped_invalid,
                work_filtered: p.work_filtered,
                work_unused: p.work_unused,
            }),
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub async fn submit(&self, spec_toml: String) -> Result<v1::Job> {
        // A bad (or oversized) spec is refused before it costs a job number or a lock.
        let cfg = sluice_core::config::JobConfig::from_toml(&spec_toml)?;
        self.recover().await?;
        let n = match self.store.next_job_number().await? {
            Some(n) => n,
            None => {
                let mut st = self.state.write().await;
                st.next_job += 1;
                st.next_job
            }
        };
        let id = format!("{}-{n}", cfg.name);
        let (job, ch) = Job::submit(id.clone(), spec_toml, now_ms())?;
        // Nobody else sees the job yet: written first, then added.
        self.store.apply(&job, &ch).await?;
        let out = self.wire(&job);
        self.state.write().await.jobs.insert(id.clone(), Arc::new(Mutex::new(job)));
        tracing::info!(job = %id, "submitted");
        Ok(out)
    }

    pub async fn get(&self, id: &str) -> Result<v1::Job> {
        let (_st, job) = self.job(id).await?;
        Ok(self.wire(&job))
    }

    /// One page of job summaries (no spec), newest first, and the token of
    /// the next page (empty after the last). `token` is the previous page's.
    pub async fn list(&self, page_size: usize, token: &str) -> Result<(Vec<v1::Job>, String)> {
        let after = if token.is_empty() {
            None
        } else {
            let bad = || Error::Invalid(format!("page_token `{}` is not one this orchestrator gave", clip(token)));
            let (ms, id) = token.split_once(':').ok_or_else(bad)?;
            Some((ms.parse::<u64>().map_err(|_| bad())?, id.to_string()))
        };
        let size = if page_size == 0 { 100 } else { page_size.min(MAX_LIST_PAGE) };
        let st = self.read().await?;
        let mut keys = Vec::with_capacity(st.jobs.len());
        for (id, job) in &st.jobs {
            keys.push((job.lock().await.rec.created_ms, id));
        }
        // Newest first; ties by id, so the order (and the token) is total.
        keys.sort_by(|a, b| b.cmp(a));
        let start = match &after {
            None => 0,
            Some((ms, id)) => keys.partition_point(|&(m, i)| (m, i) >= (*ms, id)),
        };
        let mut page = Vec::new();
        for (_, id) in keys[start..].iter().take(size) {
            let mut job = self.wire(&*st.jobs[*id].lock().await);
            job.spec_toml.clear();
            page.push(job);
        }
        let next = match page.last() {
            Some(last) if start + page.len() < keys.len() => format!("{}:{}", last.created_unix_ms, last.id),
            _ => String::new(),
        };
        Ok((page, next))
    }

    /// How many jobs the orchestrator holds.
    pub async fn job_count(&self) -> Result<usize> {
        Ok(self.read().await?.jobs.len())
    }

    /// Forgets an ended job and everything stored with it (under the write
    /// lock: no call may touch the job between its keys going and its entry).
    pub async fn delete(&self, id: &str) -> Result<()> {
        self.recover().await?;
        let mut st = self.state.write().await;
        let job = st.jobs.get(id).cloned().ok_or_else(|| not_found(id))?;
        let state = job.lock().await.rec.state;
        if !state.is_final() {
            return Err(Error::Precondition(format!("job `{id}` is {}: cancel it first (sluice cancel {id})", state.name())));
        }
        let workers: Vec<String> = self.workers().values().filter(|l| l.worker.job == id).map(|l| l.worker.id.clone()).collect();
        self.store.delete_job(id, &workers).await?;
        let mut live = self.workers();
        for w in &workers {
            live.remove(w);
        }
        drop(live);
        st.jobs.remove(id);
        tracing::info!(job = %id, "deleted");
        Ok(())
    }

    pub async fn cancel(&self, id: &str, reason: &str) -> Result<v1::Job> {
        let (_st, mut job) = self.job(id).await?;
        if job.rec.state.is_final() {
            return Err(Error::Precondition(format!("job `{id}` already {}", job.rec.state.name())));
        }
        let reason = if reason.is_empty() { "cancelled by the user" } else { reason };
        let ch = job.set_state(JobState::Cancelled, reason, now_ms());
        self.store.apply(&job, &ch).await?;
        tracing::info!(job = %id, "cancelled");
        Ok(self.wire(&job))
    }

    /// Events from `from` on, and the job's state.
    pub async fn events(&self, id: &str, from: u64) -> Result<(Vec<(u64, String)>, JobState)> {
        let (_st, job) = self.job(id).await?;
        let out = job.events.iter().enumerate().skip(from as usize).map(|(i, e)| (i as u64, e.clone())).collect();
        Ok((out, job.rec.state))
    }

    pub async fn register(&self, req: v1::RegisterWorkerRequest) -> Result<v1::RegisterWorkerResponse> {
        if !matches!(req.role.as_str(), "actor" | "learner" | "reward") {
            return Err(Error::Invalid(format!("role `{}` is not one of actor, learner, reward", clip(&req.role))));
        }
        for (field, value) in [("name", &req.name), ("address", &req.address), ("job_id", &req.job_id)] {
            if value.len() > MAX_ID_BYTES {
                return Err(Error::Invalid(format!("{field} is {} bytes, over the limit of {MAX_ID_BYTES}", value.len())));
            }
        }
        let job_id = if req.job_id.is_empty() {
            // The oldest job not ended.
            let st = self.read().await?;
            let mut oldest: Option<(u64, String)> = None;
            for (id, job) in &st.jobs {
                let job = job.lock().await;
                let key = (job.rec.created_ms, id.clone());
                if !job.rec.state.is_final() && oldest.as_ref().is_none_or(|o| key < *o) {
                    oldest = Some(key);
                }
            }
            oldest.map(|(_, id)| id).ok_or_else(|| Error::NotFound("no queued or running job".into()))?
        } else {
            req.job_id.clone()
        };
        let now = now_ms();
        let (_st, mut job) = self.job(&job_id).await?;
        if job.rec.state.is_final() {
            return Err(Error::Precondition(format!("job `{job_id}` already {}", job.rec.state.name())));
        }
        let name = if req.name.is_empty() { req.role.clone() } else { req.name.clone() };
        let worker = Worker {
            id: format!("{name}-{:08x}", rand::random::<u32>()),
            job: job_id.clone(),
            role: req.role.clone(),
            name,
            address: req.address.clone(),
            rank: req.rank,
        };
        let mut ch = Changes::default();
        if job.rec.state == JobState::Queued {
            ch = job.set_state(JobState::Running, "", now);
        }
        let joined = v1::WorkerJoined {
            worker: worker.id.clone(),
            role: worker.role.clone(),
            rank: worker.rank,
            address: worker.address.clone(),
        };
        job.event(&mut ch, now, Body::Worker(joined));
        self.store.apply(&job, &ch).await?;
        self.store.put_worker(&worker, self.lease_ms).await?;
        tracing::info!(worker = %worker.id, role = %worker.role, job = %job_id, "worker registered");
        self.workers().insert(worker.id.clone(), Live { worker: worker.clone(), deadline_ms: now + self.lease_ms });
        Ok(v1::RegisterWorkerResponse { worker_id: worker.id, job: Some(self.wire(&job)), lease_ms: self.lease_ms })
    }

    pub async fn heartbeat(&self, req: v1::HeartbeatRequest) -> Result<v1::HeartbeatResponse> {
        let (_st, mut job) = self.job(&req.job_id).await?;
        let now = now_ms();
        let worker = {
            let mut workers = self.workers();
            let worker = worker_of(&workers, &req.worker_id, &req.job_id)?.worker.clone();
            workers.get_mut(&req.worker_id).expect("found above").deadline_ms = now + self.lease_ms;
            worker
        };
        self.store.put_worker(&worker, self.lease_ms).await?;
        let mut ch = Changes::default();
        ch.record |= job.learner_step(req.step, now);
        if !req.error.is_empty() {
            let msg = format!("{} failed: {}", worker.name, req.error);
            let mut more = job.set_state(JobState::Failed, &msg, now);
            ch.record |= more.record;
            ch.events.append(&mut more.events);
        } else if req.finished && worker.role == "learner" && worker.rank == 0 {
            let mut more = job.set_state(JobState::Succeeded, "", now);
            ch.record |= more.record;
            ch.events.append(&mut more.events);
        }
        self.store.apply(&job, &ch).await?;
        Ok(v1::HeartbeatResponse { state: state_wire(job.rec.state) as i32, lease_ms: self.lease_ms })
    }

    pub async fn report_events(&self, req: v1::ReportEventsRequest) -> Result<u64> {
        let (_st, mut job) = self.job(&req.job_id).await?;
        worker_of(&self.workers(), &req.worker_id, &req.job_id)?;
        let ch = job.report(&req.worker_id, &req.events, req.fates.as_ref(), now_ms())?;
        self.store.apply(&job, &ch).await?;
        Ok(job.events.len() as u64)
    }

    #[tracing::instrument(skip_all, fields(job = %req.job_id, worker = %req.worker_id))]
    pub async fn next_work(&self, req: v1::NextWorkRequest) -> Result<v1::NextWorkResponse> {
        let (_st, mut job) = self.job(&req.job_id).await?;
        worker_of(&self.workers(), &req.worker_id, &req.job_id)?;
        if job.rec.state.is_final() {
            return Ok(v1::NextWorkResponse { done: true, ..Default::default() });
        }
        let max = (req.max_items as usize).clamp(1, MAX_WORK_ITEMS_PER_CALL);
        let (items, ch) = job.next_work(&req.worker_id, max, now_ms());
        self.store.apply(&job, &ch).await?;
        counters().dispatched.add(items.len() as u64, &[]);
        // An actor with nothing to do polls again this soon: rounds open as
        // the learner reports its steps, which can be every few milliseconds.
        let retry_after_ms = if items.is_empty() { 20 } else { 0 };
        let items = items
            .into_iter()
            .map(|i| v1::WorkItem { id: i.id, prompt_index: i.prompt_index, n: i.n as u32, attempt: i.attempt, hint: i.hint, round: i.round })
            .collect();
        Ok(v1::NextWorkResponse { items, done: false, retry_after_ms })
    }

    #[tracing::instrument(skip_all, fields(job = %req.job_id, work = req.work_id))]
    pub async fn report_outcome(&self, req: v1::ReportOutcomeRequest) -> Result<bool> {
        // A worker whose lease expired may still report: the first outcome counts.
        let (_st, mut job) = self.job(&req.job_id).await?;
        let (counted, ch) = job.outcome(req.work_id, &req.rewards, now_ms())?;
        self.store.apply(&job, &ch).await?;
        let c = counters();
        if counted { c.completed.add(1, &[]) } else { c.duplicates.add(1, &[]) }
        Ok(counted)
    }

    /// Drops workers whose lease ran out at `now` and re-queues their work.
    pub async fn sweep(&self, now: u64) -> Result<usize> {
        let st = self.read().await?;
        let expired: Vec<Live> = {
            let mut workers = self.workers();
            let gone: Vec<String> = workers.values().filter(|l| l.deadline_ms < now).map(|l| l.worker.id.clone()).collect();
            gone.iter().filter_map(|id| workers.remove(id)).collect()
        };
        for live in &expired {
            self.store.remove_worker(&live.worker.id).await?;
            if let Some(job) = st.jobs.get(&live.worker.job) {
                let mut job = job.lock().await;
                if self.store.is_failed() {
                    return Err(Error::Store("a store write failed; the state is read back first".into()));
                }
                let mut ch = job.release(&live.worker.id, now);
                counters().redispatched.add(ch.items.len() as u64, &[]);
                job.event(&mut ch, now, Body::WorkerLost(v1::WorkerLost { worker: live.worker.id.clone() }));
                self.store.apply(&job, &ch).await?;
            }
            tracing::warn!(worker = %live.worker.id, "lease expired");
        }
        Ok(expired.len())
    }
}

/// The tonic service over a shared [`Orchestrator`].
#[derive(Debug, Clone)]
pub struct OrchestratorService {
    inner: Arc<Orchestrator>,
}

impl OrchestratorService {
    pub fn new(inner: Arc<Orchestrator>) -> Self {
        OrchestratorService { inner }
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;


/// `s` cut to 64 characters for an error message (a client's ids are echoed, not its payloads).
fn clip(s: &str) -> String {
    match s.char_indices().nth(ECHOED_ID_CHARS) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

fn need(field: &str, value: &str) -> Result<(), Status> {
    if value.is_empty() {
        Err(Status::invalid_argument(format!("{field} is empty")))
    } else {
        Ok(())
    }
}

#[tonic::async_trait]
impl orchestrator_server::Orchestrator for OrchestratorService {
    type WatchJobStream = BoxStream<v1::JobEvent>;

    async fn submit_job(&self, r: Request<v1::SubmitJobRequest>) -> Result<Response<v1::Job>, Status> {
        Ok(Response::new(self.inner.submit(r.into_inner().spec_toml).await?))
    }

    async fn get_job(&self, r: Request<v1::GetJobRequest>) -> Result<Response<v1::Job>, Status> {
        let r = r.into_inner();
        need("job_id", &r.job_id)?;
        Ok(Response::new(self.inner.get(&r.job_id).await?))
    }

    async fn list_jobs(&self, r: Request<v1::ListJobsRequest>) -> Result<Response<v1::ListJobsResponse>, Status> {
        let r = r.into_inner();
        let (jobs, next_page_token) = self.inner.list(r.page_size as usize, &r.page_token).await?;
        Ok(Response::new(v1::ListJobsResponse { jobs, next_page_token }))
    }

    async fn delete_job(&self, r: Request<v1::DeleteJobRequest>) -> Result<Response<v1::DeleteJobResponse>, Status> {
        let r = r.into_inner();
        need("job_id", &r.job_id)?;
        self.inner.delete(&r.job_id).await?;
        Ok(Response::new(v1::DeleteJobResponse {}))
    }

    async fn cancel_job(&self, r: Request<v1::CancelJobRequest>) -> Result<Response<v1::Job>, Status> {
        let r = r.into_inner();
        need("job_id", &r.job_id)?;
        Ok(Response::new(self.inner.cancel(&r.job_id, &r.reason).await?))
    }

    async fn watch_job(&self, r: Request<v1::WatchJobRequest>) -> Result<Response<Self::WatchJobStream>, Status> {
        let r = r.into_inner();
        need("job_id", &r.job_id)?;
        // Unknown job: an error now, not an empty stream.
        self.inner.events(&r.job_id, u64::MAX).await?;
        let (tx, rx) = mpsc::channel(256);
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let mut next = r.from_seq;
            loop {
                // A watcher that went away stops the polling.
                if tx.is_closed() {
                    return;
                }
                let (events, state) = match inner.events(&r.job_id, next).await {
                    Ok(x) => x,
                    Err(e) => {
                        let _ = tx.send(Err(Status::from(e))).await;
                        return;
                    }
                };
                for (seq, json) in events {
                    let event = sluice_proto::events::from_json(&json).ok();
                    let e = v1::JobEvent { seq, unix_ms: now_ms(), json, state: state_wire(state) as i32, event };
                    if tx.send(Ok(e)).await.is_err() {
                        return;
                    }
                    next = seq + 1;
                }
                if r.no_follow || state.is_final() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn register_worker(
        &self,
        r: Request<v1::RegisterWorkerRequest>,
    ) -> Result<Response<v1::RegisterWorkerResponse>, Status> {
        Ok(Response::new(self.inner.register(r.into_inner()).await?))
    }

    async fn heartbeat(&self, r: Request<v1::HeartbeatRequest>) -> Result<Response<v1::HeartbeatResponse>, Status> {
        let r = r.into_inner();
        need("worker_id", &r.worker_id)?;
        Ok(Response::new(self.inner.heartbeat(r).await?))
    }

    async fn report_events(
        &self,
        r: Request<v1::ReportEventsRequest>,
    ) -> Result<Response<v1::ReportEventsResponse>, Status> {
        let r = r.into_inner();
        need("worker_id", &r.worker_id)?;
        Ok(Response::new(v1::ReportEventsResponse { next_seq: self.inner.report_events(r).await? }))
    }

    async fn next_work(&self, r: Request<v1::NextWorkRequest>) -> Result<Response<v1::NextWorkResponse>, Status> {
        let r = r.into_inner();
        need("worker_id", &r.worker_id)?;
        Ok(Response::new(self.inner.next_work(r).await?))
    }

    async fn report_outcome(
        &self,
        r: Request<v1::ReportOutcomeRequest>,
    ) -> Result<Response<v1::ReportOutcomeResponse>, Status> {
        let r = r.into_inner();
        need("job_id", &r.job_id)?;
        Ok(Response::new(v1::ReportOutcomeResponse { counted: self.inner.report_outcome(r).await? }))
    }
}
