//! Rollout budgets: how many rollouts each prompt of a batch gets.
//!
//! `uniform` gives every prompt the default N (`grpo.group_size`). `knapsack`
//! follows "Knapsack RL" (DESIGN.md, "Knapsack budget allocation"): with p a
//! prompt's recent success rate and N its rollouts,
//!
//! * ProbNonZeroGrad(N, p) = 1 − p^N − (1 − p)^N — the chance that a group of N
//!   has unequal rewards, i.e. a non-zero GRPO gradient;
//! * InfoGain(p) = p(1 − p)²;  Value(N, p) = ProbNonZeroGrad(N, p) · InfoGain(p).
//!
//! The batch keeps its uniform total, prompts × default N. Prompts with too
//! little history (< `min_outcomes`) get the default N; prompts with p = 0 or
//! p = 1 get N_low; prompts with 0 < p < 1 get N_low plus a share of the rest
//! found by exact dynamic programming,
//! dp[i][w] = max(dp[i−1][w], max_k dp[i−1][w−k] + Value(N_low + k, p_i)),
//! with N_low + k ≤ N_up. What the 0 < p < 1 prompts cannot use — their cost
//! estimate is ln(1 − α) / ln(max(p, 1 − p)), the rollouts after which a
//! non-zero gradient is α-likely — is the surplus: it goes to the p = 0
//! prompts (hard prompts may still be solved with more tries), or to the
//! other prompts when there is none. The total is always conserved.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::config::{BudgetConfig, BudgetStrategy};

/// Parameters of the knapsack allocation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Knapsack {
    /// Rollouts of a prompt without enough history, and the per-prompt average of the total.
    pub default_n: usize,
    /// Rollouts of a prompt with p = 0 or p = 1, and the least any 0 < p < 1 prompt gets.
    pub n_low: usize,
    /// Most rollouts the dynamic program gives one prompt.
    pub n_up: usize,
    /// Confidence of the cost estimate.
    pub alpha: f64,
}

/// ProbNonZeroGrad(N, p) · InfoGain(p).
pub fn value(n: usize, p: f64) -> f64 {
    let n = n as i32;
    (1.0 - p.powi(n) - (1.0 - p).powi(n)) * p * (1.0 - p) * (1.0 - p)
}

/// Rollouts after which a group of a 0 < p < 1 prompt has unequal rewards with
/// probability `alpha`: ln(1 − α) / ln(max(p, 1 − p)).
pub fn cost_estimate(p: f64, alpha: f64) -> f64 {
    (1.0 - alpha).ln() / p.max(1.0 - p).ln()
}

impl Knapsack {
    /// Rollouts per prompt, given each prompt's success rate (None: not enough history).
    pub fn allocate(&self, rates: &[Option<f64>]) -> Vec<usize> {
        let total = rates.len() * self.default_n;
        let mid: Vec<usize> = (0..rates.len()).filter(|&i| rates[i].is_some_and(|p| p > 0.0 && p < 1.0)).collect();
        let zeros: Vec<usize> = (0..rates.len()).filter(|&i| rates[i] == Some(0.0)).collect();
        let mut n: Vec<usize> = rates.iter().map(|r| if r.is_some() { self.n_low } else { self.default_n }).collect();
        let mut left = total.saturating_sub(n.iter().sum());
        if left == 0 {
            return n;
        }
        if mid.is_empty() {
            if zeros.is_empty() {
                return vec![self.default_n; rates.len()];
            }
            spread(&mut n, &zeros, left);
            return n;
        }
        // Surplus beyond the estimated cost of the 0 < p < 1 prompts.
        let usable: usize = mid
            .iter()
            .map(|&i| cost_estimate(rates[i].expect("mid prompts have a rate"), self.alpha).min(self.n_up as f64) as usize)
            .sum();
        if usable < left {
            let others: Vec<usize> = if zeros.is_empty() {
                (0..rates.len()).filter(|i| !mid.contains(i)).collect()
            } else {
                zeros.clone()
            };
            if !others.is_empty() {
                spread(&mut n, &others, left - usable);
                left = usable;
            }
        }
        let ps: Vec<f64> = mid.iter().map(|&i| rates[i].expect("mid prompts have a rate")).collect();
        let extra = self.solve(&ps, left);
        let used: usize = extra.iter().sum();
        for (&i, k) in mid.iter().zip(extra) {
            n[i] += k;
        }
        // Only when every 0 < p < 1 prompt reached N_up: keep the total anyway.
        if used < left {
            spread(&mut n, &mid, left - used);
        }
        n
    }

    /// Exact DP: extra rollouts k_i ∈ [0, N_up − N_low] per prompt, Σ k_i ≤ budget,
    /// maximising Σ Value(N_low + k_i, p_i). Among equal values, fewer rollouts.
    fn solve(&self, ps: &[f64], budget: usize) -> Vec<usize> {
        let kmax = self.n_up.saturating_sub(self.n_low);
        // best[w]: best value using exactly w extra rollouts over the items so far.
        let mut best = vec![f64::NEG_INFINITY; budget + 1];
        best[0] = 0.0;
        let mut choice = vec![vec![0usize; budget + 1]; ps.len()];
        for (i, &p) in ps.iter().enumerate() {
            let gain: Vec<f64> = (0..=kmax).map(|k| value(self.n_low + k, p)).collect();
            let mut next = vec![f64::NEG_INFINITY; budget + 1];
            for w in 0..=budget {
                for k in 0..=kmax.min(w) {
                    let prev = best[w - k];
                    if prev == f64::NEG_INFINITY {
                        continue;
                    }
                    let v = prev + gain[k];
                    if v > next[w] + 1e-15 {
                        next[w] = v;
                        choice[i][w] = k;
                    }
                }
            }
            best = next;
        }
        // The fullest budget reachable (all of it unless every prompt is at N_up).
        let mut w = (0..=budget).rev().find(|&w| best[w] > f64::NEG_INFINITY).unwrap_or(0);
        let mut out = vec![0; ps.len()];
        for i in (0..ps.len()).rev() {
            out[i] = choice[i][w];
            w -= out[i];
        }
        out
    }
}

/// Adds `amount` over `to` as evenly as possible (the first ones get the remainder).
fn spread(n: &mut [usize], to: &[usize], amount: usize) {
    for (j, &i) in to.iter().enumerate() {
        n[i] += amount / to.len() + usize::from(j < amount % to.len());
    }
}

/// Each prompt's last outcomes (rewards clamped to [0, 1]), across epochs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct History {
    window: usize,
    /// Ordered, so checkpoints are byte-for-byte reproducible.
    outcomes: BTreeMap<u64, VecDeque<f64>>,
}

impl History {
    pub fn new(window: usize) -> Self {
        History { window: window.max(1), outcomes: BTreeMap::new() }
    }

    pub fn record(&mut self, prompt: u64, rewards: impl IntoIterator<Item = f64>) {
        let q = self.outcomes.entry(prompt).or_default();
        for r in rewards {
            q.push_back(r.clamp(0.0, 1.0));
            if q.len() > self.window {
                q.pop_front();
            }
        }
    }

    /// The kept outcomes of `prompt`, oldest first.
    pub fn outcomes(&self, prompt: u64) -> Vec<f64> {
        self.outcomes.get(&prompt).map(|q| q.iter().copied().collect()).unwrap_or_default()
    }

    /// Replaces the kept outcomes of `prompt` (e.g. when loading them from a store).
    pub fn set(&mut self, prompt: u64, outcomes: Vec<f64>) {
        self.outcomes.remove(&prompt);
        self.record(prompt, outcomes);
    }

    /// The success rate over the kept outcomes, or None with fewer than `min_outcomes`.
    pub fn rate(&self, prompt: u64, min_outcomes: usize) -> Option<f64> {
        let q = self.outcomes.get(&prompt)?;
        (q.len() >= min_outcomes.max(1)).then(|| q.iter().sum::<f64>() / q.len() as f64)
    }

}

/// Rollouts per prompt under a job's `[budget]`: `default_n` each (uniform), or
/// the knapsack allocation over the prompts' success rates in `history`.
pub fn sizes(cfg: &BudgetConfig, default_n: usize, history: &History, prompt_ids: &[u64]) -> Vec<usize> {
    match cfg.strategy {
        BudgetStrategy::Uniform => vec![default_n; prompt_ids.len()],
        BudgetStrategy::Knapsack => {
            let k = Knapsack { default_n, n_low: cfg.n_low, n_up: cfg.n_up, alpha: cfg.alpha };
            let rates: Vec<Option<f64>> = prompt_ids.iter().map(|&p| history.rate(p, cfg.min_outcomes)).collect();
            k.allocate(&rates)
        }
    }
}

/// Share of rollouts in groups whose rewards are not all equal (non-zero GRPO advantage).
pub fn effective_gradient_ratio(groups: &[Vec<f64>]) -> f64 {
    let total: usize = groups.iter().map(Vec::len).sum();
    let effective: usize =
        groups.iter().filter(|g| g.iter().any(|&r| (r - g[0]).abs() > 1e-12)).map(Vec::len).sum();
    effective as f64 / total.max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: Knapsack = Knapsack { default_n: 4, n_low: 2, n_up: 128, alpha: 0.9 };

    #[test]
    fn value_matches_hand_computed_numbers() {
        // p = 0.5: (1 - 2 * 0.5^N) * 0.125.
        assert!((value(2, 0.5) - 0.0625).abs() < 1e-12);
        assert!((value(4, 0.5) - 0.109375).abs() < 1e-12);
        assert_eq!(value(8, 0.0), 0.0);
        assert_eq!(value(8, 1.0), 0.0);
        // ln(0.1) / ln(0.9) = 21.85...
        assert!((cost_estimate(0.9, 0.9) - 21.854).abs() < 1e-3);
        assert!((cost_estimate(0.1, 0.9) - 21.854).abs() < 1e-3);
    }

    #[test]
    fn unseen_prompts_get_the_default_and_extremes_feed_the_hard_ones() {
        assert_eq!(K.allocate(&[None, None, None]), vec![4, 4, 4]);
        // p = 1 and p = 0: N_low each; nothing to optimise, the rest goes to p = 0.
        assert_eq!(K.allocate(&[Some(1.0), Some(0.0), None]), vec![2, 6, 4]);
        // All solved: nothing is worth more than anything else: uniform.
        assert_eq!(K.allocate(&[Some(1.0), Some(1.0)]), vec![4, 4]);
    }

    #[test]
    fn hand_checked_dynamic_programme() {
        // Two p = 0.5 prompts, 4 extra rollouts: (4, 4) is worth 0.21875 > (3, 5) 0.2109 > (2, 6) 0.1836.
        assert_eq!(K.allocate(&[Some(0.5), Some(0.5)]), vec![4, 4]);
        // p = 0.5, 0.9, 0: total 12, bases 2 + 2 + 2, 6 to share. Estimated costs 3 + 21 >= 6: no surplus.
        // Marginal values of p = 0.5 (0.031, 0.016, 0.0078, 0.0039, 0.0020, 0.00098) all beat
        // p = 0.9's best (0.00081), so all six go to p = 0.5.
        assert_eq!(K.allocate(&[Some(0.5), Some(0.9), Some(0.0)]), vec![8, 2, 2]);
        // Surplus: default 8, p = 0.5 and p = 0: total 16, 12 to share, the p = 0.5 prompt's cost
        // estimate is 3 (3.32 floored), so 9 go to the p = 0 prompt and 3 to the p = 0.5 one.
        let k8 = Knapsack { default_n: 8, ..K };
        assert_eq!(k8.allocate(&[Some(0.5), Some(0.0)]), vec![5, 11]);
    }

    #[test]
    fn dynamic_programme_is_optimal_and_conserves_the_total() {
        // Brute force over all splits for small cases.
        let k = Knapsack { default_n: 4, n_low: 2, n_up: 7, alpha: 0.99 };
        let rates = [0.3, 0.6, 0.85];
        let budget = 6;
        let mut best = (f64::NEG_INFINITY, vec![]);
        for a in 0..=5usize {
            for b in 0..=5usize {
                for c in 0..=5usize {
                    if a + b + c <= budget {
                        let v = value(2 + a, rates[0]) + value(2 + b, rates[1]) + value(2 + c, rates[2]);
                        if v > best.0 + 1e-15 {
                            best = (v, vec![a, b, c]);
                        }
                    }
                }
            }
        }
        let got = k.solve(&rates, budget);
        let v: f64 = got.iter().zip(rates).map(|(&x, p)| value(2 + x, p)).sum();
        assert!((v - best.0).abs() < 1e-12, "dp {got:?} ({v}) vs brute force {:?} ({})", best.1, best.0);
        for rates in [vec![Some(0.2), Some(0.5), None, Some(1.0), Some(0.0)], vec![Some(0.05); 6], vec![Some(0.5); 3]] {
            for default_n in [2, 4, 8, 16] {
                let k = Knapsack { default_n, n_low: 2, n_up: 32, alpha: 0.9 };
                let n = k.allocate(&rates);
                assert_eq!(n.iter().sum::<usize>(), rates.len() * default_n, "{rates:?} default {default_n}: {n:?}");
                assert!(n.iter().all(|&x| x >= 2), "{n:?}");
            }
        }
    }

    #[test]
    fn history_keeps_the_last_outcomes() {
        let mut h = History::new(4);
        h.record(7, [1.0, 1.0, 0.0]);
        assert_eq!(h.rate(7, 4), None);
        h.record(7, [0.0, 0.0]);
        // Last 4: 1, 0, 0, 0.
        assert_eq!(h.rate(7, 4), Some(0.25));
        assert_eq!(h.rate(8, 1), None);
        assert_eq!(effective_gradient_ratio(&[vec![1.0, 0.0], vec![1.0, 1.0, 1.0], vec![0.0, 0.5, 0.5]]), 5.0 / 8.0);
    }
}
