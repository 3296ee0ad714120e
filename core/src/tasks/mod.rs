//! Environments that turn a seed into a prompt and score the policy's answer.
//!
//! Every task here is single-turn and verifiable: `problem(split, index)` is a
//! pure function of the task's seed, the split and the index (so a data cursor is
//! just an integer), and `score` runs the task's [`Verifier`] on the response text.
//! The `eval` split draws from a different stream than `train`, so held-out
//! problems are (with overwhelming probability, or by construction for JSONL files
//! with an `eval_path`) not the training ones.

mod arithmetic;
mod countdown;
mod expr;
mod jsonl;

pub use arithmetic::Arithmetic;
pub use countdown::Countdown;
pub use expr::{parse_expression, Expr, Rational};
pub use jsonl::JsonlTask;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::config::TaskConfig;
use crate::error::Result;

/// Which stream of problems to draw from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Eval,
}

/// One prompt with its reference answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Problem {
    /// Stable identifier within (task, split): the index it was drawn at, or the JSONL line.
    pub id: u64,
    pub prompt: String,
    /// Reference answer, in the verifier's format.
    pub answer: String,
    pub verifier: Verifier,
}

impl Problem {
    /// Scores a response in [0, 1].
    pub fn score(&self, response: &str) -> f64 {
        self.verifier.score(&self.answer, response)
    }
}

/// Named answer checkers. None of them evaluates code: Countdown parses the
/// expression with its own grammar of integers, `+ - * /` and parentheses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verifier {
    /// Trimmed response equals the trimmed answer.
    Exact,
    /// The response (trimmed) is a number equal to the answer (|diff| <= 1e-6).
    Numeric,
    /// Answer is `TARGET:N1,N2,..`; the response is an expression that uses each
    /// number exactly once and evaluates (exactly, in rationals) to TARGET. A
    /// trailing `= TARGET` is allowed.
    Countdown,
}

impl Verifier {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "exact" => Some(Verifier::Exact),
            "numeric" => Some(Verifier::Numeric),
            "countdown" => Some(Verifier::Countdown),
            _ => None,
        }
    }

    pub fn score(self, answer: &str, response: &str) -> f64 {
        let ok = match self {
            Verifier::Exact => response.trim() == answer.trim(),
            Verifier::Numeric => match (response.trim().parse::<f64>(), answer.trim().parse::<f64>()) {
                (Ok(a), Ok(b)) => (a - b).abs() <= 1e-6,
                _ => false,
            },
            Verifier::Countdown => countdown::check(answer, response),
        };
        if ok {
            1.0
        } else {
            0.0
        }
    }
}

/// A source of problems.
pub trait Task: Send + Sync {
    fn name(&self) -> &str;
    /// The problem at `index` of `split`; deterministic.
    fn problem(&self, split: Split, index: u64) -> Problem;
    /// Example completions for supervised warm-up: the reference answer as the policy should write it.
    fn demonstration(&self, problem: &Problem) -> String {
        problem.answer.clone()
    }
}

/// The RNG for one problem: a pure function of (seed, split, index).
pub(crate) fn problem_rng(seed: u64, split: Split, index: u64) -> ChaCha8Rng {
    let stream = match split {
        Split::Train => 0x7261_696e,
        Split::Eval => 0x6576_616c,
    };
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    rng.set_stream(stream);
    rng
}

/// Builds the task a config describes.
pub fn build(cfg: &TaskConfig) -> Result<Box<dyn Task>> {
    Ok(match cfg {
        TaskConfig::Arithmetic(c) => Box::new(Arithmetic::new(c.clone())?),
        TaskConfig::Countdown(c) => Box::new(Countdown::new(c.clone())?),
        TaskConfig::Jsonl(c) => Box::new(JsonlTask::open(c)?),
    })
}
