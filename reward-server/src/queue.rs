//! The bounded newest-first queue of captions waiting for a label. When full,
//! the oldest caption is dropped (and counted): recent behaviour matters most.
//! A caption is queued at most once until its label is stored.

use std::collections::{HashSet, VecDeque};
use std::sync::Mutex;

use tokio::sync::Notify;

#[derive(Debug, Default)]
struct Inner {
    items: VecDeque<(u64, String)>,
    /// Queued or being annotated.
    pending: HashSet<u64>,
    dropped: u64,
}

#[derive(Debug)]
pub struct CaptionQueue {
    inner: Mutex<Inner>,
    capacity: usize,
    pub notify: Notify,
}

impl CaptionQueue {
    pub fn new(capacity: usize) -> Self {
        CaptionQueue { inner: Mutex::new(Inner::default()), capacity: capacity.max(1), notify: Notify::new() }
    }

    /// Queues a caption unless it is already pending; drops the oldest when full.
    pub fn push(&self, hash: u64, caption: String) {
        let mut q = self.inner.lock().expect("queue lock");
        if !q.pending.insert(hash) {
            return;
        }
        q.items.push_front((hash, caption));
        if q.items.len() > self.capacity {
            if let Some((old, _)) = q.items.pop_back() {
                q.pending.remove(&old);
                q.dropped += 1;
            }
        }
        drop(q);
        self.notify.notify_one();
    }

    /// Takes up to `n` captions, newest first. They stay pending until [`CaptionQueue::done`].
    pub fn pop_batch(&self, n: usize) -> Vec<(u64, String)> {
        let mut q = self.inner.lock().expect("queue lock");
        let k = n.min(q.items.len());
        q.items.drain(..k).collect()
    }

    /// Marks captions as no longer pending (labelled, or given up on).
    pub fn done(&self, hashes: impl IntoIterator<Item = u64>) {
        let mut q = self.inner.lock().expect("queue lock");
        for h in hashes {
            q.pending.remove(&h);
        }
    }

    pub fn len(&self) -> usize {
        self.inner.lock().expect("queue lock").items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn dropped(&self) -> u64 {
        self.inner.lock().expect("queue lock").dropped
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_first_bounded_and_deduplicated() {
        let q = CaptionQueue::new(3);
        for h in 1..=5u64 {
            q.push(h, format!("c{h}"));
        }
        q.push(5, "c5".into());
        assert_eq!((q.len(), q.dropped()), (3, 2));
        let batch: Vec<u64> = q.pop_batch(2).into_iter().map(|(h, _)| h).collect();
        assert_eq!(batch, vec![5, 4]);
        // Still pending until done: not queued again.
        q.push(5, "c5".into());
        assert_eq!(q.len(), 1);
        q.done([5]);
        q.push(5, "c5".into());
        assert_eq!(q.len(), 2);
    }
}
