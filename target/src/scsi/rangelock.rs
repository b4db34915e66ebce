//! A per-LU block range lock, so COMPARE AND WRITE is atomic against every
//! other write to the same blocks, from any session on any core.
//!
//! Writes take their range shared (they never wait for each other); COMPARE
//! AND WRITE takes it exclusive. The state is one small mutex-protected list
//! (ranges held, wakers waiting), touched once at acquire and once at
//! release, never across an await; a waiter is a plain `Waker`, so a task on
//! one reactor is woken by a release on another. New shared requests queue
//! behind an overlapping exclusive waiter so COMPARE AND WRITE cannot be
//! starved by a stream of writes.

use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};

#[derive(Debug, Clone, Copy)]
struct Held {
    id: u64,
    start: u64,
    end: u64,
    exclusive: bool,
}

#[derive(Default)]
struct Inner {
    next_id: u64,
    held: Vec<Held>,
    /// Exclusive requests waiting (id, range), for fairness.
    waiting_exclusive: Vec<(u64, u64, u64)>,
    wakers: Vec<Waker>,
}

/// The lock table of one logical unit.
#[derive(Default)]
pub(crate) struct RangeLocks {
    inner: Mutex<Inner>,
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

impl RangeLocks {
    /// Locks blocks `start..end` (an empty range is widened to one block).
    pub fn lock(&self, start: u64, end: u64, exclusive: bool) -> Acquire<'_> {
        Acquire {
            locks: self,
            start,
            end: end.max(start.saturating_add(1)),
            exclusive,
            ticket: None,
        }
    }

    fn release(&self, id: u64) {
        let wakers = {
            let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            g.held.retain(|h| h.id != id);
            std::mem::take(&mut g.wakers)
        };
        for w in wakers {
            w.wake();
        }
    }

    #[cfg(test)]
    pub fn held(&self) -> usize {
        self.inner.lock().map(|g| g.held.len()).unwrap_or(0)
    }
}

/// Future of a range lock.
pub(crate) struct Acquire<'a> {
    locks: &'a RangeLocks,
    start: u64,
    end: u64,
    exclusive: bool,
    /// Our place among exclusive waiters, once queued.
    ticket: Option<u64>,
}

impl<'a> Future for Acquire<'a> {
    type Output = RangeGuard<'a>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<RangeGuard<'a>> {
        let this = self.get_mut();
        let mut g = this.locks.inner.lock().unwrap_or_else(|p| p.into_inner());
        let me = (this.start, this.end);
        let busy = g
            .held
            .iter()
            .any(|h| overlaps(me, (h.start, h.end)) && (this.exclusive || h.exclusive));
        // Shared requests yield to an exclusive one queued on the same blocks;
        // exclusive ones to exclusive ones queued earlier.
        let yield_to_waiter = g.waiting_exclusive.iter().any(|&(t, s, e)| {
            overlaps(me, (s, e)) && (!this.exclusive || this.ticket.map_or(true, |mine| t < mine))
        });
        if !busy && !yield_to_waiter {
            let id = g.next_id;
            g.next_id += 1;
            g.held.push(Held {
                id,
                start: this.start,
                end: this.end,
                exclusive: this.exclusive,
            });
            if let Some(t) = this.ticket.take() {
                g.waiting_exclusive.retain(|w| w.0 != t);
            }
            return Poll::Ready(RangeGuard {
                locks: this.locks,
                id,
            });
        }
        if this.exclusive && this.ticket.is_none() {
            let t = g.next_id;
            g.next_id += 1;
            g.waiting_exclusive.push((t, this.start, this.end));
            this.ticket = Some(t);
        }
        g.wakers.push(cx.waker().clone());
        Poll::Pending
    }
}

impl Drop for Acquire<'_> {
    fn drop(&mut self) {
        if let Some(t) = self.ticket.take() {
            let wakers = {
                let mut g = self.locks.inner.lock().unwrap_or_else(|p| p.into_inner());
                g.waiting_exclusive.retain(|w| w.0 != t);
                std::mem::take(&mut g.wakers)
            };
            for w in wakers {
                w.wake();
            }
        }
    }
}

/// A held range; released on drop.
pub(crate) struct RangeGuard<'a> {
    locks: &'a RangeLocks,
    id: u64,
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        self.locks.release(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::task::Wake;

    struct Flag(std::sync::atomic::AtomicBool);
    impl Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    fn poll<F: Future + Unpin>(f: &mut F, flag: &Arc<Flag>) -> Poll<F::Output> {
        let waker = Waker::from(flag.clone());
        let mut cx = Context::from_waker(&waker);
        Pin::new(f).poll(&mut cx)
    }

    #[test]
    fn shared_share_exclusive_excludes() {
        let l = RangeLocks::default();
        let flag = Arc::new(Flag(Default::default()));
        let a = match poll(&mut l.lock(0, 8, false), &flag) {
            Poll::Ready(g) => g,
            Poll::Pending => panic!("first shared"),
        };
        let b = match poll(&mut l.lock(4, 12, false), &flag) {
            Poll::Ready(g) => g,
            Poll::Pending => panic!("second shared"),
        };
        // Disjoint exclusive is fine.
        assert!(poll(&mut l.lock(12, 16, true), &flag).is_ready());
        let mut x = l.lock(6, 7, true);
        assert!(poll(&mut x, &flag).is_pending());
        // A new shared request on those blocks queues behind the exclusive one.
        let mut s = l.lock(6, 7, false);
        assert!(poll(&mut s, &flag).is_pending());
        drop(a);
        assert!(flag.0.load(std::sync::atomic::Ordering::SeqCst));
        assert!(poll(&mut x, &flag).is_pending(), "b still overlaps");
        drop(b);
        let gx = match poll(&mut x, &flag) {
            Poll::Ready(g) => g,
            Poll::Pending => panic!("exclusive after release"),
        };
        assert!(poll(&mut s, &flag).is_pending());
        drop(gx);
        assert!(poll(&mut s, &flag).is_ready());
        assert_eq!(l.held(), 0);
    }

    #[test]
    fn dropped_waiter_unblocks_others() {
        let l = RangeLocks::default();
        let flag = Arc::new(Flag(Default::default()));
        let g = match poll(&mut l.lock(0, 1, false), &flag) {
            Poll::Ready(g) => g,
            Poll::Pending => panic!(),
        };
        let mut x = l.lock(0, 1, true);
        assert!(poll(&mut x, &flag).is_pending());
        drop(x);
        assert!(poll(&mut l.lock(0, 1, false), &flag).is_ready());
        drop(g);
    }
}
