//! ONI's intrinsic reward models behind one trait. Each turns what the
//! annotator said of a batch's captions into a value per caption, r_int(c),
//! before the per-episode count decay (`service.rs`):
//!
//! * [`Retrieval`] — the label: 1 for captions labelled helpful, else 0 (and 0
//!   until labelled).
//! * [`Classification`] — the label when there is one, else a classifier trained
//!   in the background on the labels: 1 when P(helpful) > `reward.threshold`.
//! * [`Ranking`] — a Bradley-Terry scorer trained on the annotator's pairwise
//!   preferences; its score, normalised by a running mean and std.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use sluice_core::config::{IntrinsicModel, RewardConfig};

use crate::classifier::Classifier;
use crate::labels::Preference;
use crate::ranker::{Normaliser, Ranker};

/// What a learnt model trains on: labels, or pairwise preferences.
#[derive(Debug)]
pub enum Annotations {
    Labels(Vec<(String, bool)>),
    Preferences(Vec<Preference>),
}

/// One intrinsic reward model.
pub trait Intrinsic: Send + Sync + std::fmt::Debug {
    /// `retrieval`, `classification` or `ranking`.
    fn name(&self) -> &'static str;
    /// Whether the annotator judges captions in pairs (then the store says of
    /// each caption whether it was compared, not its label).
    fn pairwise(&self) -> bool {
        false
    }
    /// Whether [`Intrinsic::train`] does anything (the background trainer runs only then).
    fn learns(&self) -> bool {
        false
    }
    /// r_int of each caption `(hash, text, what the store knows)`; captions
    /// left out are worth 0.
    fn values(&self, captions: &[(u64, &str, Option<bool>)]) -> HashMap<u64, f64>;
    /// Retrains on the newest annotations and swaps the new model in
    /// (blocking; run it off the async runtime). Returns how many it used.
    fn train(&self, _data: Annotations) -> usize {
        0
    }
    /// Annotations the current model was trained on (0 before the first training).
    fn trained_on(&self) -> u64 {
        0
    }
}

/// The job's model; `None` when `reward.model = "none"`.
pub fn build(cfg: &RewardConfig) -> Option<Box<dyn Intrinsic>> {
    match cfg.model {
        IntrinsicModel::None => None,
        IntrinsicModel::Retrieval => Some(Box::new(Retrieval)),
        IntrinsicModel::Classification => {
            Some(Box::new(Classification { threshold: cfg.threshold, model: RwLock::new(None) }))
        }
        IntrinsicModel::Ranking => Some(Box::new(Ranking { model: RwLock::new(None), normaliser: Normaliser::default() })),
    }
}

/// Epochs of each background training run.
const EPOCHS: usize = 200;

#[derive(Debug)]
pub struct Retrieval;

impl Intrinsic for Retrieval {
    fn name(&self) -> &'static str {
        "retrieval"
    }
    fn values(&self, captions: &[(u64, &str, Option<bool>)]) -> HashMap<u64, f64> {
        captions.iter().filter(|(_, _, label)| *label == Some(true)).map(|(h, _, _)| (*h, 1.0)).collect()
    }
}

#[derive(Debug)]
pub struct Classification {
    threshold: f64,
    model: RwLock<Option<Arc<Classifier>>>,
}

impl Intrinsic for Classification {
    fn name(&self) -> &'static str {
        "classification"
    }
    fn learns(&self) -> bool {
        true
    }
    fn values(&self, captions: &[(u64, &str, Option<bool>)]) -> HashMap<u64, f64> {
        let model = self.model.read().expect("classifier lock").clone();
        captions
            .iter()
            .filter(|(_, text, label)| {
                // The classifier answers for captions the annotator has not labelled yet.
                let predicted = || model.as_ref().map(|c| c.probability(text) > self.threshold);
                label.or_else(predicted) == Some(true)
            })
            .map(|(h, _, _)| (*h, 1.0))
            .collect()
    }
    fn train(&self, data: Annotations) -> usize {
        let Annotations::Labels(labels) = data else { return 0 };
        let c = Classifier::train(&labels, EPOCHS);
        let n = c.trained_on;
        *self.model.write().expect("classifier lock") = Some(Arc::new(c));
        n
    }
    fn trained_on(&self) -> u64 {
        self.model.read().expect("classifier lock").as_ref().map_or(0, |c| c.trained_on as u64)
    }
}

#[derive(Debug)]
pub struct Ranking {
    model: RwLock<Option<Arc<Ranker>>>,
    normaliser: Normaliser,
}

impl Intrinsic for Ranking {
    fn name(&self) -> &'static str {
        "ranking"
    }
    fn pairwise(&self) -> bool {
        true
    }
    fn learns(&self) -> bool {
        true
    }
    fn values(&self, captions: &[(u64, &str, Option<bool>)]) -> HashMap<u64, f64> {
        let Some(r) = self.model.read().expect("ranker lock").clone() else { return HashMap::new() };
        let raw: Vec<f64> = captions.iter().map(|(_, text, _)| r.score(text)).collect();
        captions.iter().map(|(h, _, _)| *h).zip(self.normaliser.normalise(&raw)).collect()
    }
    fn train(&self, data: Annotations) -> usize {
        let Annotations::Preferences(prefs) = data else { return 0 };
        let r = Ranker::train(&prefs, EPOCHS);
        let n = r.trained_on;
        *self.model.write().expect("ranker lock") = Some(Arc::new(r));
        // Scores of the new ranker get statistics of their own.
        self.normaliser.reset();
        n
    }
    fn trained_on(&self) -> u64 {
        self.model.read().expect("ranker lock").as_ref().map_or(0, |r| r.trained_on as u64)
    }
}
