//! The `sluice.v1.Learner` gRPC service: rollout ingest with backpressure,
//! versioned chunked weights, and status.
//!
//! The service shares [`Shared`] with the training loop ([`crate::node`]):
//! complete groups go through a bounded channel (when it is full the stream
//! handler stops reading, HTTP/2 flow control fills up, and the actor's sends
//! block), and the loop publishes each new version's weights here.

use std::collections::{BTreeMap, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use prost::bytes::Bytes;
use sluice_core::kinds::Dtype;
use sluice_core::rollout::Group;
use sluice_core::staleness::{Staleness, Verdict};
use sluice_proto::v1::learner_server::Learner;
use sluice_proto::v1::{self, AckReason, LearnerStatus, PushAck, StatusRequest, WeightsChunk, WeightsRequest};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use crate::ingest::{check, Assembler, Limits, WorkIds, TOO_MANY_PARTIAL_GROUPS};

/// One version's weights as safetensors bytes.
#[derive(Debug)]
pub struct Published {
    pub version: u64,
    pub bytes: Bytes,
    pub dtype: Dtype,
}

/// The changes from version `base` to `version` (`sluice_model::weights::delta`).
#[derive(Debug, Clone)]
pub struct Delta {
    pub base: u64,
    pub version: u64,
    pub bytes: Bytes,
}

/// Counters reported by `Status`.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub accepted_rollouts: u64,
    pub accepted_groups: u64,
    pub rejected: BTreeMap<String, u64>,
    pub dropped_stale_groups: u64,
    pub dropped_future_groups: u64,
    pub dropped_partial_groups: u64,
    pub dropped_duplicate_groups: u64,
    pub staleness_histogram: Vec<u64>,
}

/// State shared by the gRPC handlers and the training loop.
#[derive(Debug)]
pub struct Shared {
    pub limits: Limits,
    pub incarnation: u64,
    pub rank: usize,
    pub world: usize,
    pub staleness: Staleness,
    pub groups_per_step: usize,
    pub chunk_bytes: usize,
    pub capacity: usize,
    version: watch::Sender<u64>,
    weights: Mutex<VecDeque<Arc<Published>>>,
    /// Deltas between consecutive published versions, oldest first.
    deltas: Mutex<VecDeque<Delta>>,
    ingest: mpsc::Sender<Group>,
    pub stats: Mutex<Stats>,
    pub finished: AtomicBool,
    /// Orchestrator work ids of the groups accepted so far, starting from those
    /// the checkpoint says were trained (at most one group per id, across restarts).
    work_ids: Mutex<WorkIds>,
    /// Incomplete groups held by all rollout streams (bounded by
    /// `sluice_core::limits::MAX_PARTIAL_GROUPS`).
    pub open_groups: Arc<std::sync::atomic::AtomicUsize>,
    /// What became of work items since the last report to the orchestrator.
    fates: Mutex<v1::WorkFates>,
    /// Rank 0's weights broadcast group (`LearnerStatus.weights_broadcast`), once known.
    pub weights_broadcast: std::sync::OnceLock<String>,
}

/// What became of a work item's group at this learner (`v1::WorkFates`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    Trained,
    /// Older than `max_staleness` (at ingest or when its step came), or of a
    /// version this learner incarnation never published.
    Stale,
    /// A rollout failed the checks.
    Invalid,
    /// No reward variance (`grpo.filter_zero_variance`).
    Filtered,
    /// Buffered or arriving when the job ended.
    Unused,
}

/// Versions whose weights stay downloadable (so a download that started just
/// before a step can finish or resume).
const KEEP_VERSIONS: usize = 2;

/// Deltas kept: an actor up to this many versions behind gets their chain.
const KEEP_DELTAS: usize = 16;

impl Shared {
    /// The shared state and the receiving end of the ingest buffer.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        limits: Limits,
        rank: usize,
        world: usize,
        version: u64,
        max_staleness: u64,
        groups_per_step: usize,
        capacity: usize,
        chunk_bytes: usize,
        trained: WorkIds,
    ) -> (Arc<Self>, mpsc::Receiver<Group>) {
        let (tx, rx) = mpsc::channel(capacity);
        let incarnation = rand::random::<u64>() | 1;
        let staleness = Staleness::new(max_staleness);
        let stats = Stats { staleness_histogram: vec![0; staleness.lags()], ..Stats::default() };
        let shared = Shared {
            limits,
            incarnation,
            rank,
            world,
            staleness,
            groups_per_step,
            chunk_bytes,
            capacity,
            version: watch::Sender::new(version),
            weights: Mutex::new(VecDeque::new()),
            deltas: Mutex::new(VecDeque::new()),
            ingest: tx,
            stats: Mutex::new(stats),
            finished: AtomicBool::new(false),
            work_ids: Mutex::new(trained),
            open_groups: Arc::default(),
            fates: Mutex::default(),
            weights_broadcast: std::sync::OnceLock::new(),
        };
        (Arc::new(shared), rx)
    }

    pub fn version(&self) -> u64 {
        *self.version.borrow()
    }

    /// Marks the job finished and tells every connected actor.
    pub fn finish(&self) {
        self.finished.store(true, Ordering::SeqCst);
        self.version.send_modify(|_| {});
    }

    /// Makes `bytes` the newest downloadable weights; then announces `version`
    /// (actors that hear of a version can always download it).
    /// `delta`, when given, leads from an earlier published version to this one.
    pub fn publish(&self, version: u64, bytes: Bytes, dtype: Dtype, delta: Option<Delta>) {
        let p = Arc::new(Published { version, bytes, dtype });
        {
            let mut d = self.deltas.lock().expect("deltas lock");
            match delta {
                Some(delta) => d.push_back(delta),
                // A full version with no delta breaks every chain through it.
                None => d.clear(),
            }
            while d.len() > KEEP_DELTAS {
                d.pop_front();
            }
        }
        {
            let mut w = self.weights.lock().expect("weights lock");
            w.push_back(p);
            while w.len() > KEEP_VERSIONS {
                w.pop_front();
            }
        }
        self.version.send_replace(version);
    }

    fn newest(&self) -> Option<Arc<Published>> {
        self.weights.lock().expect("weights lock").back().cloned()
    }

    fn find(&self, version: u64) -> Option<Arc<Published>> {
        self.weights.lock().expect("weights lock").iter().find(|p| p.version == version).cloned()
    }

    /// The deltas from `have` to `target` laid end to end, when they are kept
    /// and together less than half of `full` bytes.
    fn chain(&self, have: u64, target: u64, full: usize) -> Option<Bytes> {
        let d = self.deltas.lock().expect("deltas lock");
        let start = d.iter().position(|x| x.base == have)?;
        let mut parts = Vec::new();
        let mut at = have;
        for x in d.iter().skip(start) {
            if at == target {
                break;
            }
            if x.base != at {
                return None;
            }
            parts.push(x.bytes.clone());
            at = x.version;
        }
        let len: usize = parts.iter().map(|b| b.len()).sum();
        (at == target && len * 2 < full).then(|| Bytes::from(parts.concat()))
    }

    fn ack(&self, group_id: u64, accepted: bool, reason: AckReason) -> PushAck {
        PushAck {
            group_id,
            accepted,
            reason: reason as i32,
            learner_version: self.version(),
            incarnation: self.incarnation,
            finished: self.finished.load(Ordering::SeqCst),
        }
    }

    /// Records the fate of work item `work_id` (0: not orchestrated; nothing to record).
    pub fn fate(&self, work_id: u64, fate: Fate) {
        if work_id == 0 {
            return;
        }
        let mut f = self.fates.lock().expect("fates lock");
        match fate {
            Fate::Trained => f.trained.push(work_id),
            Fate::Stale => f.stale.push(work_id),
            Fate::Invalid => f.invalid.push(work_id),
            Fate::Filtered => f.filtered.push(work_id),
            Fate::Unused => f.unused.push(work_id),
        }
    }

    /// The fates recorded since the last call.
    pub fn take_fates(&self) -> v1::WorkFates {
        std::mem::take(&mut *self.fates.lock().expect("fates lock"))
    }

    /// Counts a group dropped for its verdict (stale or future).
    pub fn count_drop(&self, verdict: Verdict) {
        let mut s = self.stats.lock().expect("stats lock");
        match verdict {
            Verdict::Future { .. } => s.dropped_future_groups += 1,
            Verdict::Stale { .. } => s.dropped_stale_groups += 1,
            Verdict::Fresh { .. } => {}
        }
    }

    /// Puts a complete group in the buffer (waiting while it is full) unless it
    /// is already too old, answers a work item already answered (`work_id`,
    /// 0 for none), or the job is finished; returns the ack for the actor.
    async fn ingest(&self, group: Group, group_id: u64, work_id: u64) -> PushAck {
        if self.finished.load(Ordering::SeqCst) {
            self.fate(work_id, Fate::Unused);
            return self.ack(group_id, false, AckReason::Finished);
        }
        let verdict = self.staleness.verdict(group.oldest_version(), self.version());
        let refused = match verdict {
            Verdict::Fresh { .. } => None,
            Verdict::Stale { .. } => Some(AckReason::Stale),
            Verdict::Future { .. } => Some(AckReason::Future),
        };
        if let Some(reason) = refused {
            self.count_drop(verdict);
            self.fate(work_id, Fate::Stale);
            return self.ack(group_id, false, reason);
        }
        if work_id != 0 && !self.work_ids.lock().expect("work ids lock").insert(work_id) {
            self.stats.lock().expect("stats lock").dropped_duplicate_groups += 1;
            return self.ack(group_id, false, AckReason::Duplicate);
        }
        let n = group.rollouts.len() as u64;
        if self.ingest.send(group).await.is_err() {
            // The training loop is done and closed the buffer.
            self.fate(work_id, Fate::Unused);
            return self.ack(group_id, false, AckReason::Finished);
        }
        let mut s = self.stats.lock().expect("stats lock");
        s.accepted_groups += 1;
        s.accepted_rollouts += n;
        drop(s);
        self.ack(group_id, true, AckReason::Accepted)
    }

    /// Groups waiting in the buffer.
    pub fn buffered(&self) -> usize {
        self.capacity - self.ingest.capacity()
    }
}

/// The tonic service.
#[derive(Debug, Clone)]
pub struct LearnerService {
    shared: Arc<Shared>,
}

impl LearnerService {
    pub fn new(shared: Arc<Shared>) -> Self {
        LearnerService { shared }
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Reads one actor stream until it ends, answering on `tx`.
async fn serve_push(shared: Arc<Shared>, mut inbound: Streaming<v1::Rollout>, tx: mpsc::Sender<Result<PushAck, Status>>) {
    let mut asm = Assembler::new(shared.open_groups.clone());
    let mut versions = shared.version.subscribe();
    versions.mark_unchanged();
    loop {
        tokio::select! {
            msg = inbound.message() => {
                let wire = match msg {
                    Ok(Some(wire)) => wire,
                    Ok(None) => break,
                    Err(status) => {
                        // An undecodable or oversized message: the sender hears why.
                        tracing::warn!(%status, "rollout stream ended with an error");
                        let _ = tx.send(Err(Status::invalid_argument(format!("unreadable rollout stream: {}", status.message())))).await;
                        break;
                    }
                };
                let added = check(&wire, &shared.limits).and_then(|r| asm.add(&wire, r));
                match added {
                    Err(refusal) => {
                        *shared.stats.lock().expect("stats lock").rejected.entry(refusal.kind.to_string()).or_default() += 1;
                        shared.fate(wire.work_id, Fate::Invalid);
                        tracing::warn!(actor = %wire.actor_id, kind = refusal.kind, reason = %refusal.reason, "refused a rollout");
                        let status = if refusal.kind == TOO_MANY_PARTIAL_GROUPS {
                            Status::resource_exhausted(refusal.reason)
                        } else {
                            Status::invalid_argument(refusal.reason)
                        };
                        let _ = tx.send(Err(status)).await;
                        break;
                    }
                    Ok(None) => {}
                    Ok(Some(group)) => {
                        let ack = shared.ingest(group, wire.group_id, wire.work_id).await;
                        if tx.send(Ok(ack)).await.is_err() {
                            break;
                        }
                    }
                }
            }
            changed = versions.changed() => {
                if changed.is_err() {
                    break;
                }
                let ack = shared.ack(0, false, AckReason::Version);
                if tx.send(Ok(ack)).await.is_err() {
                    break;
                }
            }
        }
    }
    let partial = asm.pending() as u64;
    if partial > 0 {
        shared.stats.lock().expect("stats lock").dropped_partial_groups += partial;
        tracing::info!(groups = partial, "dropped incomplete groups of a closed stream");
    }
}

#[tonic::async_trait]
impl Learner for LearnerService {
    type PushRolloutsStream = BoxStream<PushAck>;
    type GetWeightsStream = BoxStream<WeightsChunk>;

    async fn push_rollouts(
        &self,
        request: Request<Streaming<v1::Rollout>>,
    ) -> Result<Response<Self::PushRolloutsStream>, Status> {
        let (tx, rx) = mpsc::channel(64);
        // The first message tells the actor where the learner stands.
        let _ = tx.try_send(Ok(self.shared.ack(0, false, AckReason::Version)));
        tokio::spawn(serve_push(self.shared.clone(), request.into_inner(), tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_weights(&self, request: Request<WeightsRequest>) -> Result<Response<Self::GetWeightsStream>, Status> {
        let req = request.into_inner();
        let shared = &self.shared;
        if req.job_id != shared.limits.job {
            return Err(Status::invalid_argument(format!(
                "unknown job `{}`: this learner serves `{}`",
                req.job_id, shared.limits.job
            )));
        }
        let newest = shared.newest().ok_or_else(|| Status::unavailable("no weights published yet"))?;
        let p = if req.version == 0 {
            newest
        } else {
            shared.find(req.version).ok_or_else(|| {
                Status::not_found(format!("version {} is not kept; the newest is {}", req.version, newest.version))
            })?
        };
        if req.offset > 0 && req.incarnation != shared.incarnation {
            return Err(Status::failed_precondition("the learner restarted since that download began; start over"));
        }
        // An actor holding an earlier version of this incarnation gets the
        // changes since, when they are kept and under half the whole.
        let delta_from = req.have_version.filter(|&h| req.have_incarnation == shared.incarnation && h < p.version);
        let (bytes, delta_from) = match delta_from.and_then(|h| Some((shared.chain(h, p.version, p.bytes.len())?, h))) {
            Some((chain, h)) => (chain, Some(h)),
            None if req.offset > 0 && req.have_version.is_some() => {
                return Err(Status::not_found("the deltas of that download are no longer kept; start over"));
            }
            None => (p.bytes.clone(), None),
        };
        let total = bytes.len() as u64;
        if req.offset > total {
            return Err(Status::out_of_range(format!("offset {} is past the end ({total} bytes)", req.offset)));
        }
        let (tx, rx) = mpsc::channel(4);
        let (incarnation, chunk, version, dtype) = (shared.incarnation, shared.chunk_bytes, p.version, p.dtype.to_string());
        drop(p);
        tokio::spawn(async move {
            let mut offset = req.offset as usize;
            loop {
                let end = (offset + chunk).min(bytes.len());
                let msg = WeightsChunk {
                    version,
                    incarnation,
                    total_bytes: total,
                    offset: offset as u64,
                    data: bytes.slice(offset..end),
                    dtype: dtype.clone(),
                    delta_from,
                };
                if tx.send(Ok(msg)).await.is_err() || end == bytes.len() {
                    break;
                }
                offset = end;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn status(&self, request: Request<StatusRequest>) -> Result<Response<LearnerStatus>, Status> {
        let req = request.into_inner();
        let s = &self.shared;
        if !req.job_id.is_empty() && req.job_id != s.limits.job {
            return Err(Status::invalid_argument(format!("unknown job `{}`: this learner serves `{}`", req.job_id, s.limits.job)));
        }
        let stats = s.stats.lock().expect("stats lock").clone();
        let newest = s.newest();
        Ok(Response::new(LearnerStatus {
            job_id: s.limits.job.clone(),
            rank: s.rank as u32,
            world_size: s.world as u32,
            version: s.version(),
            incarnation: s.incarnation,
            weights_version: newest.as_ref().map_or(0, |p| p.version),
            weights_ready: newest.is_some(),
            buffered_groups: s.buffered() as u64,
            buffer_capacity: s.capacity as u64,
            accepted_rollouts: stats.accepted_rollouts,
            accepted_groups: stats.accepted_groups,
            rejected: stats.rejected.into_iter().collect(),
            dropped_stale_groups: stats.dropped_stale_groups,
            dropped_partial_groups: stats.dropped_partial_groups,
            staleness_histogram: stats.staleness_histogram,
            max_staleness: s.staleness.max(),
            groups_per_step: s.groups_per_step as u64,
            finished: s.finished.load(Ordering::SeqCst),
            dropped_future_groups: stats.dropped_future_groups,
            dropped_duplicate_groups: stats.dropped_duplicate_groups,
            weights_broadcast: s.weights_broadcast.get().cloned().unwrap_or_default(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_core::rollout::{FinishReason, Rollout};

    fn group(work_id: u64, version: u64) -> Group {
        let r = Rollout {
            prompt_id: 1,
            prompt_tokens: vec![1, 2],
            response_tokens: vec![3],
            logprobs: Some(vec![-0.5]),
            loss_mask: vec![],
            captions: vec![],
            switches: Vec::new(),
            reward: 1.0,
            extrinsic: 1.0,
            intrinsic: 0.0,
            version,
            finish: FinishReason::Stop,
        };
        Group { prompt_id: 1, work_id, rollouts: vec![r.clone(), r], trace: None, generate_s: 0.0 }
    }

    /// Ingest records each group's fate for the orchestrator: stale when
    /// refused for its version, unused once the job is finished; an accepted
    /// group has none until its step; a duplicate adds nothing; and a report
    /// empties the record.
    #[tokio::test]
    async fn ingest_records_the_fate_of_refused_groups() {
        let limits = Limits { job: "j".into(), vocab_size: 50, max_tokens: 64, max_rollout_bytes: 4096, max_group_size: 8, needs_logprobs: true };
        let (shared, _rx) = Shared::new(limits, 0, 1, 5, 1, 1, 4, 1024, WorkIds::default());
        assert!(shared.ingest(group(7, 5), 1, 7).await.accepted);
        assert!(!shared.ingest(group(7, 5), 2, 7).await.accepted, "duplicate");
        assert_eq!(shared.ingest(group(8, 3), 3, 8).await.reason(), AckReason::Stale);
        assert_eq!(shared.ingest(group(0, 3), 4, 0).await.reason(), AckReason::Stale, "no work id: nothing to record");
        shared.finish();
        assert_eq!(shared.ingest(group(9, 5), 5, 9).await.reason(), AckReason::Finished);
        let f = shared.take_fates();
        assert_eq!((f.trained, f.stale, f.invalid, f.filtered, f.unused), (vec![], vec![8], vec![], vec![], vec![9]));
        assert_eq!(shared.take_fates(), v1::WorkFates::default());
    }
}
