//! The ranking reward model (ONI): a Bradley-Terry scorer learnt from the
//! annotator's pairwise preferences, and the running normalisation of its scores.
//!
//! Bradley-Terry: P(a better than b) = σ(s(a) − s(b)), with s(c) = w·φ(c) over the
//! same hashed n-gram features as the classifier ([`crate::classifier::features`]).
//! Training minimises the cross-entropy between that probability and each
//! pair's outcome (1, 0, or 0.5 for a tie) with Adam in tch. Like the classifier,
//! scoring is a sparse dot product in plain Rust.
//!
//! The reward is the score normalised by the running mean and standard
//! deviation of the scores handed out since the scorer was last retrained
//! ([`Normaliser`]), so its scale does not drift with the number of labels.

use std::sync::Mutex;

use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Tensor};

use crate::classifier::{features, BUCKETS};
use crate::labels::Preference;

/// A trained scorer: one weight per feature bucket.
#[derive(Debug, Clone)]
pub struct Ranker {
    weights: Vec<f32>,
    /// Preferences it was trained on.
    pub trained_on: usize,
}

impl Ranker {
    /// Full-batch training on preferences. The bias of s cancels in s(a) − s(b), so
    /// the model is linear without one: the input is φ(a) − φ(b).
    pub fn train(prefs: &[Preference], epochs: usize) -> Ranker {
        let n = prefs.len() as i64;
        let mut x = vec![0f32; prefs.len() * BUCKETS];
        for (i, p) in prefs.iter().enumerate() {
            let row = &mut x[i * BUCKETS..(i + 1) * BUCKETS];
            for b in features(&p.a) {
                row[b] += 1.0;
            }
            for b in features(&p.b) {
                row[b] -= 1.0;
            }
        }
        let x = Tensor::from_slice(&x).view([n, BUCKETS as i64]);
        let y: Vec<f32> = prefs.iter().map(|p| p.outcome as f32).collect();
        let y = Tensor::from_slice(&y);
        let vs = nn::VarStore::new(Device::Cpu);
        let linear = nn::linear(vs.root(), BUCKETS as i64, 1, nn::LinearConfig { bias: false, ws_init: nn::Init::Const(0.0), bs_init: None });
        let mut opt = nn::Adam::default().wd(1e-4).build(&vs, 0.05).expect("Adam over a CPU var store");
        for _ in 0..epochs {
            let logits = linear.forward(&x).squeeze_dim(1);
            let loss = logits.binary_cross_entropy_with_logits::<Tensor>(&y, None, None, tch::Reduction::Mean);
            opt.backward_step(&loss);
        }
        let weights = Vec::<f32>::try_from(&linear.ws.detach().view([-1]).to_kind(Kind::Float)).expect("weights");
        Ranker { weights, trained_on: prefs.len() }
    }

    /// The Bradley-Terry score s(c) of a normalised caption.
    pub fn score(&self, caption: &str) -> f64 {
        features(caption).iter().map(|&b| self.weights[b] as f64).sum()
    }

    /// P(a better than b).
    pub fn prefer(&self, a: &str, b: &str) -> f64 {
        1.0 / (1.0 + (self.score(b) - self.score(a)).exp())
    }
}

/// Running mean and standard deviation (Welford), reset when the scorer changes.
#[derive(Debug, Default)]
pub struct Normaliser {
    inner: Mutex<(u64, f64, f64)>,
}

impl Normaliser {
    /// Adds `xs` to the statistics, then returns each normalised by the updated
    /// mean and std (0 while fewer than two values have been seen or the std is 0).
    pub fn normalise(&self, xs: &[f64]) -> Vec<f64> {
        let mut g = self.inner.lock().expect("normaliser lock");
        let (n, mean, m2) = &mut *g;
        for &x in xs {
            *n += 1;
            let d = x - *mean;
            *mean += d / *n as f64;
            *m2 += d * (x - *mean);
        }
        let std = if *n > 1 { (*m2 / (*n - 1) as f64).sqrt() } else { 0.0 };
        xs.iter().map(|&x| if std > 1e-9 { (x - *mean) / std } else { 0.0 }).collect()
    }

    pub fn reset(&self) {
        *self.inner.lock().expect("normaliser lock") = (0, 0.0, 0.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Captions with a hidden quality (0..3); a noisy judge prefers the better one.
    fn caption(rng: &mut rand_chacha::ChaCha8Rng) -> (String, u32) {
        let place = ["kitchen", "cellar", "tower", "garden", "hall"][rng.gen_range(0..5)];
        let q = rng.gen_range(0..3u32);
        let text = match q {
            0 => format!("you bump into the wall of the {place}"),
            1 => format!("you walk into the {place}"),
            _ => format!("you unlock the door of the {place}"),
        };
        (crate::captions::normalise(&text), q)
    }

    #[test]
    fn bradley_terry_recovers_the_order_of_a_noisy_judge() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let prefs: Vec<Preference> = (0..400)
            .map(|_| {
                let ((a, qa), (b, qb)) = (caption(&mut rng), caption(&mut rng));
                let outcome = if qa == qb || rng.gen_bool(0.1) { 0.5 } else if qa > qb { 1.0 } else { 0.0 };
                Preference { a, b, outcome }
            })
            .collect();
        let r = Ranker::train(&prefs, 200);
        let s = |t: &str| r.score(&crate::captions::normalise(t));
        // Held-out places: the words that carry quality must have been learnt.
        let (low, mid, high) =
            (s("you bump into the wall of the vault"), s("you walk into the vault"), s("you unlock the door of the vault"));
        assert!(low < mid && mid < high, "scores {low} {mid} {high}");
        assert!(r.prefer("you unlock the door of the attic", "you bump into the wall of the attic") > 0.8);
    }

    #[test]
    fn normaliser_standardises_and_resets() {
        let n = Normaliser::default();
        assert_eq!(n.normalise(&[5.0]), vec![0.0]);
        let z = n.normalise(&[1.0, 3.0]);
        // Values 5, 1, 3: mean 3, std 2.
        assert!((z[0] + 1.0).abs() < 1e-12 && z[1].abs() < 1e-12, "{z:?}");
        n.reset();
        assert_eq!(n.normalise(&[7.0]), vec![0.0]);
    }
}
