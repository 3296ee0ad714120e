//! The `sluice.v1.Reward` gRPC service.
//!
//! `Score` takes a batch: each item gets its verifier reward and, with an
//! intrinsic model, the sum over its captions of label / N^beta (N: the
//! caption's occurrences so far in the item's episode). Captions without a
//! label count 0 and are queued for the annotator; nothing here waits for it.
//! With the classification model, captions without a label are answered by
//! the latest classifier (trained in the background) until labelled. With the
//! ranking model every caption is worth its Bradley-Terry score, normalised by
//! the running mean and std; captions not compared yet are queued for a pairwise
//! judgement.
//! A bad item (unknown verifier, malformed caption) gets an `error` and no
//! score; the rest of the batch is scored as usual.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use sluice_core::config::RewardConfig;
use sluice_core::tasks::{Verifier, VERIFIER_NAMES};
use sluice_proto::v1::reward_server::Reward;
use sluice_proto::v1::{AnnotationStats, AnnotationStatsRequest, ItemScore, ScoreItem, ScoreRequest, ScoreResponse};
use tonic::{Request, Response, Status};

use crate::annotator::Counters;
use crate::captions;
use crate::labels::LabelStore;
use crate::queue::CaptionQueue;
use crate::intrinsic::Intrinsic;

use sluice_core::limits::{MAX_RESPONSE_BYTES, MAX_SCORE_ITEMS};

/// Everything the service shares with the annotator loop.
#[derive(Debug)]
pub struct State {
    pub job: String,
    pub cfg: RewardConfig,
    pub store: Arc<LabelStore>,
    pub queue: Arc<CaptionQueue>,
    pub counters: Arc<Counters>,
    pub annotator_name: String,
    /// The intrinsic reward model (`None`: `reward.model = "none"`).
    pub intrinsic: Option<Box<dyn Intrinsic>>,
    pub lookups: AtomicU64,
    pub hits: AtomicU64,
    pub store_errors: AtomicU64,
}

#[derive(Debug, Clone)]
pub struct RewardService {
    state: Arc<State>,
}

impl RewardService {
    pub fn new(state: Arc<State>) -> Self {
        RewardService { state }
    }
}

/// An item that passed its checks: extrinsic reward and caption hashes.
struct Checked {
    extrinsic: f64,
    captions: Vec<(String, u64)>,
}

fn check_item(item: &ScoreItem) -> Result<Checked, String> {
    if item.response.len() > MAX_RESPONSE_BYTES {
        return Err(format!("response is {} bytes, over the limit of {MAX_RESPONSE_BYTES}", item.response.len()));
    }
    let extrinsic = if item.verifier.is_empty() {
        match item.env_reward {
            Some(r) if !r.is_finite() => return Err(format!("env_reward {r} is not a finite number")),
            Some(r) => r,
            None => 0.0,
        }
    } else if item.env_reward.is_some() {
        return Err("give a verifier or an env_reward, not both".into());
    } else {
        let v = Verifier::parse(&item.verifier).ok_or_else(|| {
            format!("unknown verifier `{}` (one of {})", item.verifier, VERIFIER_NAMES.join(", "))
        })?;
        v.check_answer(&item.answer).map_err(|why| format!("answer: {why}"))?;
        v.score(&item.answer, &item.response)
    };
    let captions = item
        .captions
        .iter()
        .enumerate()
        .map(|(i, c)| captions::check(c).map_err(|why| format!("caption {i}: {why}")))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Checked { extrinsic, captions })
}

/// Checks and verifies every item on a blocking thread (regexes and long
/// responses must not hold up the async runtime, which also answers health
/// probes); an item whose verifier panicked fails alone, with a reason.
async fn check_items(items: Vec<ScoreItem>) -> (Vec<ScoreItem>, Vec<Result<Checked, String>>) {
    let work = tokio::task::spawn_blocking(move || {
        let checked = items
            .iter()
            .map(|item| {
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check_item(item)))
                    .unwrap_or_else(|_| Err(format!("verifier `{}` failed on this item (internal error)", item.verifier)))
            })
            .collect();
        (items, checked)
    });
    work.await.expect("the checking thread returns (panics are caught per item)")
}

impl State {
    /// Scores a batch (the work behind `Score`).
    pub async fn score(&self, items: Vec<ScoreItem>) -> Vec<ItemScore> {
        let (items, checked) = check_items(items).await;
        let intrinsic_on = self.intrinsic.is_some();
        // One store round trip for every distinct caption of the batch; then
        // each caption's value r_int(c) before the count decay.
        let mut values: HashMap<u64, f64> = HashMap::new();
        if let Some(model) = &self.intrinsic {
            let mut texts: HashMap<u64, &str> = HashMap::new();
            for c in checked.iter().flatten() {
                for (text, h) in &c.captions {
                    texts.entry(*h).or_insert(text);
                }
            }
            let hashes: Vec<u64> = texts.keys().copied().collect();
            self.lookups.fetch_add(hashes.len() as u64, Ordering::Relaxed);
            let known = if model.pairwise() {
                self.store.ranked_many(&hashes).await.map(|r| r.into_iter().map(|k| k.then_some(true)).collect())
            } else {
                self.store.get_many(&hashes).await
            };
            let found = known.unwrap_or_else(|e| {
                // Never make training wait: score as unlabelled and say so.
                self.store_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "label store unavailable; intrinsic rewards are 0 for this batch");
                vec![None; hashes.len()]
            });
            for (h, label) in hashes.iter().zip(&found) {
                if label.is_some() {
                    self.hits.fetch_add(1, Ordering::Relaxed);
                } else {
                    self.queue.push(*h, texts[h].to_string());
                }
            }
            let captions: Vec<(u64, &str, Option<bool>)> = hashes.iter().zip(found).map(|(h, k)| (*h, texts[h], k)).collect();
            values = model.values(&captions);
        }
        let (ext_coef, int_coef, beta) = (self.cfg.ext_coef, self.cfg.int_coef, self.cfg.beta);
        items
            .iter()
            .zip(checked)
            .map(|(item, c)| match c {
                Err(error) => ItemScore { id: item.id.clone(), error, ..Default::default() },
                Ok(c) => {
                    let mut seen: HashMap<u64, u32> = HashMap::new();
                    let mut intrinsic = 0.0;
                    if intrinsic_on {
                        for (_, h) in &c.captions {
                            let n = seen.entry(*h).or_insert(0);
                            *n += 1;
                            if let Some(v) = values.get(h) {
                                intrinsic += v / (*n as f64).powf(beta);
                            }
                        }
                    }
                    ItemScore {
                        id: item.id.clone(),
                        extrinsic: c.extrinsic,
                        intrinsic,
                        total: ext_coef * c.extrinsic + int_coef * intrinsic,
                        error: String::new(),
                    }
                }
            })
            .collect()
    }

    pub fn version(&self) -> u64 {
        self.counters.version.load(Ordering::SeqCst)
    }

    fn check_job(&self, job: &str) -> Result<(), Status> {
        if job != self.job {
            return Err(Status::invalid_argument(format!("unknown job `{job}`: this reward server serves `{}`", self.job)));
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl Reward for RewardService {
    async fn score(&self, request: Request<ScoreRequest>) -> Result<Response<ScoreResponse>, Status> {
        let req = request.into_inner();
        self.state.check_job(&req.job_id)?;
        if req.items.len() > MAX_SCORE_ITEMS {
            return Err(Status::invalid_argument(format!("{} items, over the limit of {MAX_SCORE_ITEMS}", req.items.len())));
        }
        let span = tracing::info_span!("score", items = req.items.len());
        let scores = tracing::Instrument::instrument(self.state.score(req.items), span).await;
        items_scored().add(scores.len() as u64, &[]);
        Ok(Response::new(ScoreResponse { scores, reward_model_version: self.state.version() }))
    }

    async fn annotation_statistics(
        &self,
        request: Request<AnnotationStatsRequest>,
    ) -> Result<Response<AnnotationStats>, Status> {
        let s = &self.state;
        s.check_job(&request.into_inner().job_id)?;
        let labelled = s.store.count().await?;
        let preferences = s.store.preference_count().await?;
        Ok(Response::new(AnnotationStats {
            annotator: s.annotator_name.clone(),
            labelled,
            queued: s.queue.len() as u64,
            queue_capacity: s.queue.capacity() as u64,
            dropped: s.queue.dropped(),
            annotated: s.counters.annotated.load(Ordering::SeqCst),
            failures: s.counters.failures.load(Ordering::SeqCst),
            lookups: s.lookups.load(Ordering::Relaxed),
            hits: s.hits.load(Ordering::Relaxed),
            reward_model_version: s.version(),
            model: s.intrinsic.as_ref().map_or("none", |m| m.name()).into(),
            classifier_labels: s.intrinsic.as_ref().filter(|m| m.learns() && !m.pairwise()).map_or(0, |m| m.trained_on()),
            preferences,
            ranker_preferences: s.intrinsic.as_ref().filter(|m| m.pairwise()).map_or(0, |m| m.trained_on()),
            batches: s.counters.batches.load(Ordering::Relaxed),
            annotate_seconds: s.counters.annotate_micros.load(Ordering::Relaxed) as f64 / 1e6,
        }))
    }
}

/// Items scored (an OpenTelemetry counter; a no-op unless exporting).
fn items_scored() -> &'static opentelemetry::metrics::Counter<u64> {
    static C: std::sync::OnceLock<opentelemetry::metrics::Counter<u64>> = std::sync::OnceLock::new();
    C.get_or_init(|| sluice_core::telemetry::meter().u64_counter("sluice.reward.items_scored").with_unit("{item}").build())
}
