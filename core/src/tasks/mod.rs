//! Environments that turn a seed into a prompt and score the policy's answer.
//!
//! Most tasks are single-turn and verifiable; the text [`Adventure`] is
//! multi-turn ([`Task::episode`]): the policy's actions and the environment's
//! observations alternate, and the reward comes from the environment.
//! `problem(split, index)` is a
//! pure function of the task's seed, the split and the index (so a data cursor is
//! just an integer), and `score` runs the task's [`Verifier`] on the response text.
//! The `eval` split draws from a different stream than `train`, so held-out
//! problems are (with overwhelming probability, or by construction for JSONL files
//! with an `eval_path`) not the training ones.

mod adventure;
mod arithmetic;
mod countdown;
mod expr;
mod dataset;
mod verify;

pub use adventure::{Adventure, World};
pub use arithmetic::Arithmetic;
pub use countdown::Countdown;
pub use expr::{parse_expression, Expr, Rational};
pub use dataset::{DatasetSummary, DatasetTask};
pub use verify::{extract_answer, parse_number, Number, Verifier, VERIFIER_NAMES};

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::config::TaskConfig;

#[cfg(test)]
mod pass_tests {
    #[test]
    fn pass_at_k_matches_the_binomial_form() {
        use super::pass_at_k;
        assert!((pass_at_k(5, 2, 1) - 0.4).abs() < 1e-12);
        assert!((pass_at_k(5, 2, 2) - 0.7).abs() < 1e-12, "1 - C(3,2)/C(5,2)");
        assert_eq!((pass_at_k(5, 0, 3), pass_at_k(5, 3, 3), pass_at_k(4, 4, 1)), (0.0, 1.0, 1.0));
    }
}
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
    /// A conversation to render with the chat template instead of `prompt`
    /// (datasets with a `messages` column); `prompt` then holds its last user turn.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub messages: Vec<crate::chat::Message>,
}

impl Problem {
    /// Scores a response in [0, 1].
    pub fn score(&self, response: &str) -> f64 {
        self.verifier.score(&self.answer, response)
    }

    /// This problem with a hint appended to its prompt (and to its last user
    /// turn): `template` with `{answer}`, `{answer_len}` and `{answer_first}`
    /// filled from the reference answer (NuRL's hint for an all-fail prompt).
    pub fn with_hint(&self, template: &str) -> Problem {
        let answer = self.answer.trim();
        let hint = template
            .replace("{answer_len}", &answer.chars().count().to_string())
            .replace("{answer_first}", &answer.chars().next().map(String::from).unwrap_or_default())
            .replace("{answer}", answer);
        let mut p = self.clone();
        p.prompt = format!("{}\n{hint}", self.prompt);
        if let Some(turn) = p.messages.iter_mut().rev().find(|m| m.role == "user") {
            turn.content = format!("{}\n{hint}", turn.content);
        }
        p
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
    /// Multi-turn tasks: the environment behind `problem`, at its start
    /// (`problem.prompt` is its first observation). None for single-turn tasks.
    fn episode(&self, _problem: &Problem) -> Option<Box<dyn Episode>> {
        None
    }
    /// Multi-turn tasks: actions per episode at most.
    fn max_turns(&self) -> usize {
        1
    }
}

/// What a multi-turn environment answers to one action.
#[derive(Debug, Clone, PartialEq)]
pub struct Turn {
    /// Text appended to the context after the action (environment tokens: never trained on).
    pub observation: String,
    pub reward: f64,
    pub done: bool,
    /// Messages for the intrinsic reward (ONI captions).
    pub captions: Vec<String>,
}

/// A running multi-turn environment.
pub trait Episode: Send {
    fn step(&mut self, action: &str) -> Turn;
}

/// The unbiased pass@k estimate for one problem from `n` samples of which `c`
/// were correct (Chen et al. 2021, "Evaluating Large Language Models Trained on
/// Code", eq. 1): `1 - C(n-c, k) / C(n, k)`, as a stable product.
pub fn pass_at_k(n: usize, c: usize, k: usize) -> f64 {
    assert!(k >= 1 && k <= n && c <= n, "pass@{k} from {c}/{n}");
    if n - c < k {
        return 1.0;
    }
    1.0 - ((n - c + 1)..=n).map(|i| 1.0 - k as f64 / i as f64).product::<f64>()
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
        TaskConfig::Dataset(c) => Box::new(DatasetTask::open(c)?),
        TaskConfig::Adventure(c) => Box::new(Adventure::new(c.clone())?),
    })
}

#[cfg(test)]
mod hint_tests {
    use super::*;

    #[test]
    fn a_hint_fills_its_placeholders_and_follows_the_prompt_and_the_last_user_turn() {
        let p = Problem {
            id: 3,
            prompt: "7*8=".into(),
            answer: " 56 ".into(),
            verifier: Verifier::Numeric,
            messages: vec![crate::chat::Message::new("user", "7*8="), crate::chat::Message::new("assistant", "?"), crate::chat::Message::new("user", "again: 7*8=")],
        };
        let h = p.with_hint("({answer_len} digits, starts {answer_first}; it is {answer})");
        assert_eq!(h.prompt, "7*8=\n(2 digits, starts 5; it is 56)");
        assert_eq!(h.messages[2].content, "again: 7*8=\n(2 digits, starts 5; it is 56)");
        assert_eq!(h.messages[0].content, "7*8=", "earlier turns unchanged");
        assert_eq!((h.id, h.answer.as_str()), (3, " 56 "), "the verifier still checks the same answer");
    }
}
