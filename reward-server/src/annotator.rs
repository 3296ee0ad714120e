//! Annotators turn captions into helpful / unhelpful labels.
//!
//! [`Annotator::Llm`] asks an OpenAI-compatible endpoint ([`crate::llm`]);
//! [`Annotator::Rubric`] is the embedded annotator for dev mode and tests
//! without an LLM: the job's regex rules, first match wins, no match is
//! unhelpful. [`run`] is the background loop that drains the queue: it labels
//! captions one by one, or for the ranking model judges them in pairs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use regex::Regex;
use sluice_core::config::{IntrinsicModel, RewardConfig, RubricRule};

use crate::error::{Error, Result};
use crate::labels::{LabelStore, Preference};
use crate::llm::LlmAnnotator;
use crate::queue::CaptionQueue;

pub enum Annotator {
    Rubric(Vec<(Regex, bool)>),
    Llm(LlmAnnotator),
}

impl Annotator {
    /// The LLM annotator when the job names an endpoint, else the rubric.
    pub fn from_config(cfg: &RewardConfig) -> Result<Self> {
        match &cfg.llm {
            Some(llm) => Ok(Annotator::Llm(LlmAnnotator::new(llm, cfg.model == IntrinsicModel::Ranking)?)),
            None => Self::rubric(&cfg.rubric),
        }
    }

    pub fn rubric(rules: &[RubricRule]) -> Result<Self> {
        let rules = rules
            .iter()
            .map(|r| {
                let re = Regex::new(&r.pattern).map_err(|e| Error::Annotator(format!("rubric pattern: {e}")))?;
                Ok((re, r.label.is_helpful()))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Annotator::Rubric(rules))
    }

    /// What produces the labels, for status output.
    pub fn name(&self) -> String {
        match self {
            Annotator::Rubric(rules) => format!("rubric ({} keyword/regex rules, no LLM)", rules.len()),
            Annotator::Llm(llm) => llm.name(),
        }
    }

    /// Labels for normalised captions, in order.
    pub async fn label(&self, captions: &[String]) -> Result<Vec<bool>> {
        match self {
            Annotator::Rubric(rules) => Ok(captions
                .iter()
                .map(|c| rules.iter().find(|(re, _)| re.is_match(c)).is_some_and(|(_, helpful)| *helpful))
                .collect()),
            Annotator::Llm(llm) => llm.label(captions).await,
        }
    }

    /// P(first better) for each pair. The rubric prefers a helpful caption over
    /// an unhelpful one and calls everything else a tie.
    pub async fn compare(&self, pairs: &[(String, String)]) -> Result<Vec<f64>> {
        match self {
            Annotator::Rubric(_) => {
                let mut out = Vec::with_capacity(pairs.len());
                for (a, b) in pairs {
                    let l = self.label(&[a.clone(), b.clone()]).await?;
                    out.push(match (l[0], l[1]) {
                        (true, false) => 1.0,
                        (false, true) => 0.0,
                        _ => 0.5,
                    });
                }
                Ok(out)
            }
            Annotator::Llm(llm) => llm.compare(pairs).await,
        }
    }
}

/// Counters of the annotation pipeline.
#[derive(Debug, Default)]
pub struct Counters {
    pub annotated: AtomicU64,
    pub failures: AtomicU64,
    /// Batches judged or failed, and the microseconds they took in all.
    pub batches: AtomicU64,
    pub annotate_micros: AtomicU64,
    /// Bumped whenever new labels reach the store: the reward model's version.
    pub version: AtomicU64,
}

/// Judges one batch: labels (or, with `ranking`, preferences between
/// consecutive captions; an odd one out is paired with `partner`, the last
/// caption judged before). Returns how many new judgements reached the store.
async fn judge(
    batch: &[(u64, String)],
    ranking: bool,
    partner: &mut Option<(u64, String)>,
    store: &LabelStore,
    annotator: &Annotator,
) -> Result<u64> {
    if !ranking {
        let texts: Vec<String> = batch.iter().map(|(_, t)| t.clone()).collect();
        let labels = annotator.label(&texts).await?;
        let rows: Vec<(u64, String, bool)> = batch.iter().zip(labels).map(|((h, t), l)| (*h, t.clone(), l)).collect();
        return store.put_many(&rows).await;
    }
    let mut items: Vec<&(u64, String)> = batch.iter().collect();
    if items.len() % 2 == 1 {
        match partner.as_ref() {
            Some(p) if p.0 != items[0].0 => items.push(p),
            // Nothing to compare with yet: the caption stays unranked and is queued again when seen.
            _ => {
                items.pop();
            }
        }
    }
    let pairs: Vec<(String, String)> = items.chunks(2).map(|p| (p[0].1.clone(), p[1].1.clone())).collect();
    let outcomes = annotator.compare(&pairs).await?;
    let rows: Vec<(u64, u64, Preference)> = items
        .chunks(2)
        .zip(outcomes)
        .map(|(p, outcome)| (p[0].0, p[1].0, Preference { a: p[0].1.clone(), b: p[1].1.clone(), outcome }))
        .collect();
    store.put_preferences(&rows).await?;
    if let Some(last) = batch.last() {
        *partner = Some(last.clone());
    }
    Ok(rows.len() as u64)
}

/// Drains the queue in batches forever: judge, store, mark done. A failed
/// batch is counted, put back, and retried after a backoff.
pub async fn run(
    queue: Arc<CaptionQueue>,
    store: Arc<LabelStore>,
    annotator: Arc<Annotator>,
    batch_size: usize,
    ranking: bool,
    counters: Arc<Counters>,
) {
    let mut backoff = Duration::from_millis(100);
    let mut partner = None;
    loop {
        let batch = queue.pop_batch(batch_size);
        if batch.is_empty() {
            let _ = tokio::time::timeout(Duration::from_millis(200), queue.notify.notified()).await;
            continue;
        }
        let t0 = std::time::Instant::now();
        let outcome = judge(&batch, ranking, &mut partner, &store, &annotator).await;
        counters.batches.fetch_add(1, Ordering::Relaxed);
        counters.annotate_micros.fetch_add(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
        match outcome {
            Ok(added) => {
                counters.annotated.fetch_add(batch.len() as u64, Ordering::SeqCst);
                if added > 0 {
                    counters.version.fetch_add(1, Ordering::SeqCst);
                }
                queue.done(batch.iter().map(|(h, _)| *h));
                backoff = Duration::from_millis(100);
            }
            Err(e) => {
                counters.failures.fetch_add(1, Ordering::SeqCst);
                tracing::warn!(error = %e, captions = batch.len(), "annotation batch failed; retrying later");
                queue.done(batch.iter().map(|(h, _)| *h));
                for (h, t) in batch {
                    queue.push(h, t);
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}
