//! Timers of one reactor: a min-heap of deadlines and the wakers waiting on
//! them. The reactor fires what is due each loop turn and, when it blocks,
//! bounds the wait by the earliest deadline, so a timer needs no SQE of its own.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::task::Waker;
use std::time::Instant;

/// Identifies one registered timer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TimerId(u64);

/// The deadline heap.
#[derive(Default)]
pub struct TimerQueue {
    heap: BinaryHeap<Reverse<(Instant, TimerId)>>,
    wakers: HashMap<TimerId, Waker>,
    next_id: u64,
}

impl TimerQueue {
    /// Registers a waker for a deadline.
    pub fn insert(&mut self, deadline: Instant, waker: Waker) -> TimerId {
        let id = TimerId(self.next_id);
        self.next_id += 1;
        self.heap.push(Reverse((deadline, id)));
        self.wakers.insert(id, waker);
        id
    }

    /// Replaces the waker of a live timer (a task polled from a new context).
    pub fn update(&mut self, id: TimerId, waker: &Waker) {
        if let Some(w) = self.wakers.get_mut(&id) {
            if !w.will_wake(waker) {
                *w = waker.clone();
            }
        }
    }

    /// Forgets a timer (its future was dropped or completed).
    pub fn cancel(&mut self, id: TimerId) {
        self.wakers.remove(&id);
    }

    /// Wakes every timer due at `now`; returns how many fired.
    pub fn fire(&mut self, now: Instant) -> usize {
        let mut fired = 0;
        while let Some(Reverse((deadline, id))) = self.heap.peek().copied() {
            if deadline > now {
                break;
            }
            self.heap.pop();
            if let Some(w) = self.wakers.remove(&id) {
                w.wake();
                fired += 1;
            }
        }
        fired
    }

    /// The earliest live deadline.
    pub fn next_deadline(&mut self) -> Option<Instant> {
        while let Some(Reverse((deadline, id))) = self.heap.peek().copied() {
            if self.wakers.contains_key(&id) {
                return Some(deadline);
            }
            self.heap.pop();
        }
        None
    }

    /// Live timers.
    pub fn len(&self) -> usize {
        self.wakers.len()
    }

    /// No live timers.
    pub fn is_empty(&self) -> bool {
        self.wakers.is_empty()
    }

    /// Takes every waker out (teardown).
    pub fn drain(&mut self) -> Vec<Waker> {
        self.heap.clear();
        self.wakers.drain().map(|(_, w)| w).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::counting_waker;
    use std::time::Duration;

    #[test]
    fn fires_in_deadline_order_and_skips_cancelled() {
        let (count, waker) = counting_waker();
        let mut q = TimerQueue::default();
        let t0 = Instant::now();
        let a = q.insert(t0 + Duration::from_millis(5), waker.clone());
        let _b = q.insert(t0 + Duration::from_millis(1), waker.clone());
        let _c = q.insert(t0 + Duration::from_millis(9), waker);
        assert_eq!(q.next_deadline(), Some(t0 + Duration::from_millis(1)));
        q.cancel(a);
        assert_eq!(q.fire(t0 + Duration::from_millis(6)), 1);
        assert_eq!(q.next_deadline(), Some(t0 + Duration::from_millis(9)));
        assert_eq!(q.fire(t0 + Duration::from_millis(10)), 1);
        assert_eq!(count.get(), 2);
        assert!(q.is_empty());
        assert_eq!(q.next_deadline(), None);
    }
}
