//! The classification reward model (ONI): logistic regression on hashed
//! unigram and bigram features of the normalised caption, trained with tch on
//! the labels collected so far; a caption is helpful when
//! P(helpful) > `reward.threshold`. Training runs in the background; prediction
//! is a sparse dot product in plain Rust, so scoring never touches libtorch.

use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Tensor};

/// Feature buckets (hashed n-grams).
pub const BUCKETS: usize = 1 << 12;

/// The distinct feature buckets of a normalised caption.
pub fn features(caption: &str) -> Vec<usize> {
    let words: Vec<&str> = caption.split_whitespace().collect();
    let mut out: Vec<usize> = words
        .iter()
        .map(|w| crate::captions::hash(w))
        .chain(words.windows(2).map(|p| crate::captions::hash(&format!("{} {}", p[0], p[1])) ^ 0x9e37_79b9_7f4a_7c15))
        .map(|h| (h % BUCKETS as u64) as usize)
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// A trained model: one weight per bucket and a bias.
#[derive(Debug, Clone)]
pub struct Classifier {
    weights: Vec<f32>,
    bias: f32,
    /// Labels it was trained on.
    pub trained_on: usize,
}

impl Classifier {
    /// Full-batch training (Adam, class-balanced logistic loss, small L2) on
    /// `(caption, helpful)` pairs.
    pub fn train(data: &[(String, bool)], epochs: usize) -> Classifier {
        let n = data.len() as i64;
        let mut x = vec![0f32; data.len() * BUCKETS];
        for (i, (caption, _)) in data.iter().enumerate() {
            for b in features(caption) {
                x[i * BUCKETS + b] = 1.0;
            }
        }
        let x = Tensor::from_slice(&x).view([n, BUCKETS as i64]);
        let y: Vec<f32> = data.iter().map(|(_, h)| if *h { 1.0 } else { 0.0 }).collect();
        let positives = y.iter().sum::<f32>().max(1.0);
        let pos_weight = Tensor::from_slice(&[((n as f32 - positives) / positives).max(1e-3)]);
        let y = Tensor::from_slice(&y);
        let vs = nn::VarStore::new(Device::Cpu);
        // Zero init: the loss is convex, and no global RNG is involved.
        let zero = nn::LinearConfig { ws_init: nn::Init::Const(0.0), bs_init: Some(nn::Init::Const(0.0)), bias: true };
        let linear = nn::linear(vs.root(), BUCKETS as i64, 1, zero);
        let mut opt = nn::Adam::default().wd(1e-4).build(&vs, 0.05).expect("Adam over a CPU var store");
        for _ in 0..epochs {
            let logits = linear.forward(&x).squeeze_dim(1);
            let loss = logits.binary_cross_entropy_with_logits::<Tensor>(&y, None, Some(pos_weight.shallow_clone()), tch::Reduction::Mean);
            opt.backward_step(&loss);
        }
        let weights = Vec::<f32>::try_from(&linear.ws.detach().view([-1]).to_kind(Kind::Float)).expect("weights");
        let bias = linear.bs.as_ref().map_or(0.0, |b| b.double_value(&[0]) as f32);
        Classifier { weights, bias, trained_on: data.len() }
    }

    /// P(helpful) for a normalised caption.
    pub fn probability(&self, caption: &str) -> f64 {
        let z: f32 = self.bias + features(caption).iter().map(|&b| self.weights[b]).sum::<f32>();
        1.0 / (1.0 + (-z as f64).exp())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Text-adventure-like messages: progress (helpful) or none (unhelpful),
    /// with varied objects and places.
    fn synthetic(rng: &mut rand_chacha::ChaCha8Rng) -> (String, bool) {
        let colour = ["red", "blue", "green", "golden", "rusty", "small"][rng.gen_range(0..6)];
        let place = ["kitchen", "cellar", "tower", "garden", "hall", "library", "vault"][rng.gen_range(0..7)];
        let thing = ["key", "lamp", "map", "coin", "scroll", "rope"][rng.gen_range(0..6)];
        let helpful = rng.gen_bool(0.5);
        let text = if helpful {
            match rng.gen_range(0..4) {
                0 => format!("you pick up the {colour} {thing}"),
                1 => format!("the {colour} door to the {place} opens"),
                2 => format!("you enter the {place} for the first time"),
                _ => format!("you unlock the {place} with the {colour} {thing}"),
            }
        } else {
            match rng.gen_range(0..4) {
                0 => format!("you bump into the wall of the {place}"),
                1 => format!("nothing happens when you wave the {colour} {thing}"),
                2 => format!("the {colour} door to the {place} is still locked"),
                _ => format!("you look around the {place} again"),
            }
        };
        (crate::captions::normalise(&text), helpful)
    }

    #[test]
    fn learns_synthetic_captions_to_over_80_percent_held_out() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let train: Vec<(String, bool)> = (0..300).map(|_| synthetic(&mut rng)).collect();
        let test: Vec<(String, bool)> = (0..300).map(|_| synthetic(&mut rng)).filter(|c| !train.contains(c)).collect();
        let clf = Classifier::train(&train, 200);
        let correct = test.iter().filter(|(c, h)| (clf.probability(c) > 0.5) == *h).count();
        let accuracy = correct as f64 / test.len() as f64;
        {
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "classifier held-out accuracy {accuracy:.3} on {} captions", test.len());
        }
        assert!(test.len() > 50, "held-out set too small: {}", test.len());
        assert!(accuracy >= 0.8, "held-out accuracy {accuracy}");
    }
}
