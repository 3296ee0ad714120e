//! Sets of orchestrator work ids.

use std::collections::BTreeMap;

/// Orchestrator work ids, as sorted disjoint inclusive ranges (the ids of one
/// job are handed out in sequence, so a long run's set stays a few ranges).
/// Two users: the learner's record of the work items it took (kept in every
/// checkpoint as `work_ids.json`, so a restarted learner still refuses a
/// second group for an item it trained before), and the orchestrator's record
/// of the items whose fate a learner reported (each counted once).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct WorkIds(BTreeMap<u64, u64>);

impl WorkIds {
    pub fn contains(&self, id: u64) -> bool {
        self.0.range(..=id).next_back().is_some_and(|(_, &end)| id <= end)
    }

    /// Adds `id`; false when it was already there.
    pub fn insert(&mut self, id: u64) -> bool {
        if self.contains(id) {
            return false;
        }
        let mut start = id;
        let mut end = id;
        if let Some((&s, &e)) = self.0.range(..id).next_back() {
            if e.checked_add(1) == Some(id) {
                start = s;
            }
        }
        if let Some(next) = id.checked_add(1) {
            if let Some(e) = self.0.remove(&next) {
                end = e;
            }
        }
        self.0.insert(start, end);
        true
    }

    /// Every id, ascending.
    pub fn ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.0.iter().flat_map(|(&s, &e)| s..=e)
    }

    /// How many disjoint ranges hold the ids.
    pub fn ranges(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::WorkIds;

    #[test]
    fn work_ids_merge_into_ranges_and_round_trip_as_json() {
        let mut w = WorkIds::default();
        for id in [5, 3, 4, 10, 1, 2, 9, u64::MAX, 0] {
            assert!(w.insert(id), "{id}");
        }
        assert!(!w.insert(4) && !w.insert(u64::MAX));
        assert_eq!(w.ranges(), 3, "{w:?}");
        assert_eq!(w.ids().take(8).collect::<Vec<_>>(), vec![0, 1, 2, 3, 4, 5, 9, 10]);
        assert!(w.contains(3) && !w.contains(6) && !w.contains(11) && w.contains(u64::MAX));
        let json = serde_json::to_string(&w).unwrap();
        assert_eq!(serde_json::from_str::<WorkIds>(&json).unwrap(), w);
    }
}
