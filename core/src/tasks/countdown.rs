//! Countdown: combine the given numbers with `+ - * /` to reach a target.
//!
//! Problems are generated solvable: the target is the value of a random
//! expression over all the numbers (integer intermediate results only).
//! Answer format (also for JSONL rows): `TARGET:N1,N2,...`.

use rand::seq::SliceRandom;
use rand::Rng;

use super::{parse_expression, problem_rng, Problem, Rational, Split, Task, Verifier};
use crate::config::CountdownConfig;
use crate::error::{Error, Result};

#[derive(Debug, Clone)]
pub struct Countdown {
    cfg: CountdownConfig,
}

impl Countdown {
    pub fn new(cfg: CountdownConfig) -> Result<Self> {
        if !(2..=6).contains(&cfg.numbers) {
            return Err(Error::config("task.numbers", "must be between 2 and 6"));
        }
        if !(1..=1000).contains(&cfg.max_number) {
            return Err(Error::config("task.max_number", "must be between 1 and 1000"));
        }
        Ok(Countdown { cfg })
    }
}

impl Task for Countdown {
    fn name(&self) -> &str {
        "countdown"
    }

    fn problem(&self, split: Split, index: u64) -> Problem {
        let mut rng = problem_rng(self.cfg.seed, split, index);
        loop {
            let nums: Vec<i64> = (0..self.cfg.numbers).map(|_| rng.gen_range(1..=self.cfg.max_number)).collect();
            let mut order = nums.clone();
            order.shuffle(&mut rng);
            let mut acc = order[0];
            let mut ok = true;
            for &x in &order[1..] {
                acc = match rng.gen_range(0..4) {
                    0 => acc + x,
                    1 if acc >= x => acc - x,
                    1 => x - acc,
                    2 => acc * x,
                    _ if acc % x == 0 => acc / x,
                    _ => acc + x,
                };
                ok &= acc > 0 && acc <= 100_000;
            }
            if !ok {
                continue;
            }
            let list = nums.iter().map(i64::to_string).collect::<Vec<_>>();
            return Problem {
                id: index,
                prompt: format!("Use {} to make {acc}. Expression:", list.join(" ")),
                answer: format!("{acc}:{}", list.join(",")),
                verifier: Verifier::Countdown,
                messages: vec![],
            };
        }
    }

    fn demonstration(&self, problem: &Problem) -> String {
        solve(&problem.answer).unwrap_or_default()
    }
}

/// Parses `TARGET:N1,N2,..`.
fn parse_answer(answer: &str) -> Option<(i64, Vec<i64>)> {
    let (target, nums) = answer.split_once(':')?;
    let nums = nums.split(',').map(|n| n.trim().parse().ok()).collect::<Option<Vec<i64>>>()?;
    Some((target.trim().parse().ok()?, nums))
}

/// The Countdown verifier: each number used exactly once, exact value equals the target.
pub(super) fn check(answer: &str, response: &str) -> bool {
    let Some((target, mut nums)) = parse_answer(answer) else { return false };
    let text = response.trim();
    // Allow "expr = target".
    let text = match text.rsplit_once('=') {
        Some((lhs, rhs)) if rhs.trim().parse::<i64>() == Ok(target) => lhs,
        Some(_) => return false,
        None => text,
    };
    let Ok(expr) = parse_expression(text) else { return false };
    let mut used = expr.numbers();
    used.sort_unstable();
    nums.sort_unstable();
    used == nums && expr.eval() == Some(Rational::int(target))
}

/// A left-to-right solution by brute force over orders and operators, used as the
/// supervised demonstration. `None` if no left-fold solution exists.
fn solve(answer: &str) -> Option<String> {
    let (target, nums) = parse_answer(answer)?;
    fn go(acc: i64, text: String, rest: &[i64], target: i64) -> Option<String> {
        if rest.is_empty() {
            return (acc == target).then_some(text);
        }
        for i in 0..rest.len() {
            let x = rest[i];
            let mut others = rest.to_vec();
            others.remove(i);
            // Parenthesise the running expression once it has an operator, so precedence cannot change it.
            let t = if text.bytes().all(|b| b.is_ascii_digit()) { text.clone() } else { format!("({text})") };
            let mut cands = vec![(acc + x, format!("{t}+{x}")), (acc * x, format!("{t}*{x}"))];
            if acc >= x {
                cands.push((acc - x, format!("{t}-{x}")));
            } else {
                cands.push((x - acc, format!("{x}-{t}")));
            }
            if x != 0 && acc % x == 0 {
                cands.push((acc / x, format!("{t}/{x}")));
            }
            for (v, t) in cands {
                if let Some(s) = go(v, t, &others, target) {
                    return Some(s);
                }
            }
        }
        None
    }
    (0..nums.len()).find_map(|i| {
        let mut rest = nums.clone();
        let first = rest.remove(i);
        go(first, first.to_string(), &rest, target)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifier_accepts_only_valid_solutions() {
        let a = "24:4,6,1";
        assert!(check(a, "4*6*1"));
        assert!(check(a, " (6*4)/1 = 24"));
        assert!(!check(a, "4*6"), "must use every number");
        assert!(!check(a, "4*6*1*1"), "must use each number once");
        assert!(!check(a, "4*6+1"));
        assert!(!check(a, "4*6*1 = 25"));
        assert!(!check(a, "24"));
        assert!(!check(a, "__import__('os').system('true')"));
        assert!(!check("bad", "1"));
        assert!(check("2:1,2", "2/1") && !check("1:3,6", "3/(6-3)"));
    }

    #[test]
    fn generated_problems_are_solvable_and_deterministic() {
        let t = Countdown::new(CountdownConfig { numbers: 3, max_number: 20, seed: 11 }).unwrap();
        for i in 0..30 {
            let p = t.problem(Split::Train, i);
            assert_eq!(p, t.problem(Split::Train, i));
            let demo = t.demonstration(&p);
            assert_eq!(p.score(&demo), 1.0, "{} -> {demo}", p.answer);
        }
    }
}
