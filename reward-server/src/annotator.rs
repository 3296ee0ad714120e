//! Annotators turn captions into helpful / unhelpful labels.
//!
//! [`Annotator::Llm`] asks an OpenAI-compatible endpoint ([`crate::llm`]);
//! [`Annotator::Rubric`] is the embedded annotator for dev mode and tests
//! without an LLM: the job's regex rules, first match wins, no match is
//! unhelpful. [`run`] is the background loop that drains the queue.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use regex::Regex;
use sluice_core::config::{RewardConfig, RubricRule};

use crate::error::{Error, Result};
use crate::labels::LabelStore;
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
            Some(llm) => Ok(Annotator::Llm(LlmAnnotator::new(llm)?)),
            None => Self::rubric(&cfg.rubric),
        }
    }

    pub fn rubric(rules: &[RubricRule]) -> Result<Self> {
        let rules = rules
            .iter()
            .map(|r| {
                let re = Regex::new(&r.pattern).map_err(|e| Error::Annotator(format!("rubric pattern: {e}")))?;
                Ok((re, r.label == "helpful"))
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
}

/// Counters of the annotation pipeline.
#[derive(Debug, Default)]
pub struct Counters {
    pub annotated: AtomicU64,
    pub failures: AtomicU64,
    /// Bumped whenever new labels reach the store: the reward model's version.
    pub version: AtomicU64,
}

/// Drains the queue in batches forever: label, store, mark done. A failed
/// batch is counted, put back, and retried after a backoff.
pub async fn run(
    queue: Arc<CaptionQueue>,
    store: Arc<LabelStore>,
    annotator: Arc<Annotator>,
    batch_size: usize,
    counters: Arc<Counters>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let batch = queue.pop_batch(batch_size);
        if batch.is_empty() {
            let _ = tokio::time::timeout(Duration::from_millis(200), queue.notify.notified()).await;
            continue;
        }
        let texts: Vec<String> = batch.iter().map(|(_, t)| t.clone()).collect();
        let outcome = match annotator.label(&texts).await {
            Ok(labels) => {
                let rows: Vec<(u64, String, bool)> =
                    batch.iter().zip(labels).map(|((h, t), l)| (*h, t.clone(), l)).collect();
                store.put_many(&rows).await
            }
            Err(e) => Err(e),
        };
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
