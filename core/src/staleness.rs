//! Bounded staleness: the one rule of how old a rollout may be, used by all
//! three parties — the learner (which groups it trains on), the actor (when
//! its policy must re-sync before sampling) and the orchestrator (how many
//! rounds of work may be open at once).
//!
//! A group sampled by policy version `v` and trained when the learner is at
//! version `now` has lag `now − v`. It is trained only when `0 ≤ lag ≤ max`;
//! `max = 0` is synchronous on-policy training. A version ahead of the
//! learner's can only come from another incarnation of the learner (a restart
//! from an older checkpoint) and is never trained.

pub use crate::limits::MAX_STALENESS;

/// A job's staleness bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Staleness {
    max: u64,
}

/// What the rule says about one group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Trainable, `lag` versions behind (0 = on-policy).
    Fresh { lag: u64 },
    /// More than the bound behind.
    Stale { lag: u64 },
    /// Sampled by a version the learner has not reached.
    Future { ahead: u64 },
}

impl Staleness {
    /// The bound; values above [`MAX_STALENESS`] are clamped (validation refuses them first).
    pub fn new(max: u64) -> Staleness {
        Staleness { max: max.min(MAX_STALENESS) }
    }

    pub fn max(self) -> u64 {
        self.max
    }

    /// Synchronous: each version's rollouts are trained by that version.
    pub fn is_synchronous(self) -> bool {
        self.max == 0
    }

    /// The verdict on a group sampled at `sampled_at` for a learner at `learner_at`.
    pub fn verdict(self, sampled_at: u64, learner_at: u64) -> Verdict {
        match learner_at.checked_sub(sampled_at) {
            None => Verdict::Future { ahead: sampled_at - learner_at },
            Some(lag) if lag > self.max => Verdict::Stale { lag },
            Some(lag) => Verdict::Fresh { lag },
        }
    }

    /// Actor: a policy at version `held` must re-sync before sampling for a
    /// learner at `learner_at` when what it would sample is no longer fresh.
    pub fn must_resync(self, held: u64, learner_at: u64) -> bool {
        !matches!(self.verdict(held, learner_at), Verdict::Fresh { .. })
    }

    /// Orchestrator: rounds of work open at once (`max + 1`), so a round's
    /// rollouts can still be trained when the learner reaches its last version.
    pub fn open_rounds(self) -> usize {
        self.max as usize + 1
    }

    /// Orchestrator: round `round` (trained at step `round`) may open once the
    /// learner has finished `round - max` steps: its rollouts are then sampled
    /// at most `max` versions before the step that trains them, so none are
    /// generated only to be dropped as stale.
    pub fn may_open(self, round: u64, learner_step: u64) -> bool {
        round <= learner_step.saturating_add(self.max)
    }

    /// Learner: one counter per trainable lag, `0..=max`.
    pub fn lags(self) -> usize {
        self.max as usize + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_at_the_edges() {
        let s = Staleness::new(2);
        assert_eq!(s.verdict(5, 5), Verdict::Fresh { lag: 0 });
        assert_eq!(s.verdict(3, 5), Verdict::Fresh { lag: 2 });
        assert_eq!(s.verdict(2, 5), Verdict::Stale { lag: 3 });
        assert_eq!(s.verdict(6, 5), Verdict::Future { ahead: 1 });
        assert!(!s.must_resync(3, 5) && s.must_resync(2, 5) && s.must_resync(6, 5));
        assert_eq!((s.open_rounds(), s.lags()), (3, 3));
        let sync = Staleness::new(0);
        assert!(sync.is_synchronous() && sync.must_resync(4, 5) && !sync.must_resync(5, 5));
        assert_eq!(sync.verdict(0, u64::MAX), Verdict::Stale { lag: u64::MAX });
        assert_eq!(Staleness::new(u64::MAX).max(), MAX_STALENESS);
    }
}
