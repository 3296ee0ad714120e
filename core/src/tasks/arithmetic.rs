//! Synthetic arithmetic: `a+b=` → `c`.

use rand::Rng;

use super::{parse_expression, problem_rng, Problem, Split, Task, Verifier};
use crate::config::ArithmeticConfig;
use crate::error::{Error, Result};

#[derive(Debug, Clone)]
pub struct Arithmetic {
    cfg: ArithmeticConfig,
}

impl Arithmetic {
    pub fn new(cfg: ArithmeticConfig) -> Result<Self> {
        cfg.validate("task")?;
        Ok(Arithmetic { cfg })
    }
}

impl Task for Arithmetic {
    fn name(&self) -> &str {
        "arithmetic"
    }

    fn problem(&self, split: Split, index: u64) -> Problem {
        let index = match split {
            Split::Train if self.cfg.train_size > 0 => index % self.cfg.train_size,
            _ => index,
        };
        let mut rng = problem_rng(self.cfg.seed, split, index);
        let max = 10i64.pow(self.cfg.digits) - 1;
        let mut prompt = rng.gen_range(0..=max).to_string();
        for _ in 1..self.cfg.operands {
            prompt.push(self.cfg.operators[rng.gen_range(0..self.cfg.operators.len())]);
            prompt.push_str(&rng.gen_range(0..=max).to_string());
        }
        // Usual precedence (* before + -), evaluated by the same parser the verifiers use.
        let value = parse_expression(&prompt).ok().and_then(|e| e.eval()).expect("generated expression is valid");
        prompt.push('=');
        Problem { id: index, prompt, answer: value.to_string(), verifier: Verifier::Numeric, messages: vec![] }
    }
}

impl crate::config::ArithmeticConfig {
    pub fn validate(&self, prefix: &str) -> Result<()> {
        if !(1..=6).contains(&self.digits) {
            return Err(Error::config(format!("{prefix}.digits"), "must be between 1 and 6"));
        }
        if !(2..=4).contains(&self.operands) {
            return Err(Error::config(format!("{prefix}.operands"), "must be between 2 and 4"));
        }
        if self.operators.is_empty() {
            return Err(Error::config(format!("{prefix}.operators"), "must not be empty"));
        }
        if let Some(op) = self.operators.iter().find(|c| !matches!(c, '+' | '-' | '*')) {
            return Err(Error::config(format!("{prefix}.operators"), format!("unknown operator `{op}` (use + - *)")));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An evaluator independent of the task's parser: numbers and operators
    /// split by hand, products folded first, then sums and differences.
    fn evaluate(prompt: &str) -> i64 {
        let mut terms: Vec<(char, i64)> = Vec::new(); // (sign op, product)
        let (mut op, mut product, mut num) = ('+', 1i64, String::new());
        for c in prompt.chars().chain(std::iter::once('+')) {
            if c.is_ascii_digit() {
                num.push(c);
                continue;
            }
            let n: i64 = num.parse().unwrap();
            num.clear();
            product *= n;
            if c != '*' {
                terms.push((op, product));
                op = c;
                product = 1;
            }
        }
        terms.iter().map(|&(o, v)| if o == '-' { -v } else { v }).sum()
    }

    #[test]
    fn the_independent_evaluator_agrees_with_hand_computed_values() {
        assert_eq!(evaluate("2+3*4"), 14);
        assert_eq!(evaluate("10-2*3-1"), 3);
        assert_eq!(evaluate("7*8*9"), 504);
        assert_eq!(evaluate("5-9"), -4);
    }

    #[test]
    fn deterministic_and_correct() {
        let t = Arithmetic::new(ArithmeticConfig { digits: 2, operands: 3, operators: vec!['+', '-', '*'], seed: 5, train_size: 0 }).unwrap();
        for i in 0..50 {
            let p = t.problem(Split::Train, i);
            assert_eq!(p, t.problem(Split::Train, i));
            assert_eq!(evaluate(p.prompt.trim_end_matches('=')).to_string(), p.answer, "{}", p.prompt);
            assert_eq!(p.score(&p.answer), 1.0);
            assert_eq!(p.score(&format!(" {} ", p.answer)), 1.0);
            assert_eq!(p.score("x"), 0.0);
        }
        let train: Vec<_> = (0..20).map(|i| t.problem(Split::Train, i).prompt).collect();
        let eval: Vec<_> = (0..20).map(|i| t.problem(Split::Eval, i).prompt).collect();
        assert_ne!(train, eval);
    }

    #[test]
    fn bad_config_names_field() {
        let e = Arithmetic::new(ArithmeticConfig { digits: 1, operands: 2, operators: vec!['/'], seed: 0, train_size: 0 }).unwrap_err();
        assert!(e.to_string().contains("task.operators"), "{e}");
    }
}
