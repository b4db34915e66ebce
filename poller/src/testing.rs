//! Helpers for tests of code built on the poller's futures.
//!
//! A future polled by hand in a unit test needs a `Waker` whose wakes can be
//! counted, to assert that a completion wakes its waiter exactly once (or
//! not at all). The poller's own modules and the target's use the same one.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Wake, Waker};

/// Counts the wakes of the wakers made from it.
#[derive(Debug, Default)]
pub struct WakeCount(AtomicUsize);

impl WakeCount {
    /// Wakes so far.
    pub fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }

    /// Wakes since the last `take`, resetting the count.
    pub fn take(&self) -> usize {
        self.0.swap(0, Ordering::SeqCst)
    }
}

impl Wake for WakeCount {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// A waker and the counter of its wakes.
pub fn counting_waker() -> (Arc<WakeCount>, Waker) {
    let count = Arc::new(WakeCount::default());
    (count.clone(), Waker::from(count))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_and_refs_all_count() {
        let (count, w) = counting_waker();
        w.wake_by_ref();
        let copy = w.clone();
        copy.wake();
        w.wake();
        assert_eq!(count.take(), 3);
        assert_eq!(count.get(), 0);
    }
}
