//! The overlap detector: serialises overlapping writes of one volume.
//!
//! Overlapping writes in flight at the same time must land in the same order
//! on every leg, or the legs diverge. Each write registers its byte range
//! before it is issued ([`OverlapDetector::lock`]); if it overlaps ranges
//! registered before it (in flight, or themselves waiting), it waits until
//! every one of those has been released, i.e. completed on all legs.
//! Non-overlapping writes never wait for each other. Resync copies take the
//! same locks, so a copy and a new write to the same region never interleave.
//!
//! Shared by every core, so it is striped: the volume is cut into stripes of
//! `1 << stripe_shift` bytes hashed onto a fixed set of buckets, each a short
//! critical section over the few ranges in flight there. A range touches one
//! or two buckets (an I/O is at most one pool chunk), locked in ascending
//! order, so registration is atomic across them and cannot deadlock. Order
//! among overlapping writes is registration order (FIFO, no starvation).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

struct Waiter {
    remaining: AtomicUsize,
    waker: Mutex<Option<Waker>>,
}

struct Entry {
    id: u64,
    start: u64,
    end: u64,
    waiters: Vec<Arc<Waiter>>,
}

/// Byte-range serialisation for one volume.
pub struct OverlapDetector {
    stripe_shift: u32,
    buckets: Box<[Mutex<Vec<Entry>>]>,
    next_id: AtomicU64,
    waits: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl OverlapDetector {
    /// A detector with `buckets` buckets over stripes of `1 << stripe_shift` bytes.
    pub fn new(stripe_shift: u32, buckets: usize) -> Arc<Self> {
        Arc::new(OverlapDetector {
            stripe_shift,
            buckets: (0..buckets.max(1))
                .map(|_| Mutex::new(Vec::new()))
                .collect(),
            next_id: AtomicU64::new(1),
            waits: AtomicU64::new(0),
        })
    }

    /// How many registrations had to wait so far.
    pub fn waits(&self) -> u64 {
        self.waits.load(Ordering::Relaxed)
    }

    fn bucket_ids(&self, start: u64, end: u64) -> Vec<usize> {
        let first = start >> self.stripe_shift;
        let last = (end.max(start + 1) - 1) >> self.stripe_shift;
        let n = self.buckets.len() as u64;
        let mut ids: Vec<usize> = if last - first + 1 >= n {
            (0..self.buckets.len()).collect()
        } else {
            (first..=last).map(|s| (s % n) as usize).collect()
        };
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// Registers `[start, end)`; the guard is ready once every overlapping
    /// range registered before it has been released. Dropping the guard
    /// releases the range (whether or not it became ready).
    pub fn lock(self: &Arc<Self>, start: u64, end: u64) -> RangeGuard {
        let ids = self.bucket_ids(start, end);
        let waiter = Arc::new(Waiter {
            remaining: AtomicUsize::new(0),
            waker: Mutex::new(None),
        });
        let mut guards: Vec<MutexGuard<'_, Vec<Entry>>> =
            ids.iter().map(|&i| lock(&self.buckets[i])).collect();
        // Numbered under the bucket locks: overlapping ranges share a bucket,
        // so their ids follow their registration order.
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut seen: Vec<u64> = Vec::new();
        for g in guards.iter_mut() {
            for e in g.iter_mut() {
                if e.start < end && start < e.end && !seen.contains(&e.id) {
                    seen.push(e.id);
                    e.waiters.push(waiter.clone());
                }
            }
        }
        waiter.remaining.store(seen.len(), Ordering::Release);
        for g in guards.iter_mut() {
            g.push(Entry {
                id,
                start,
                end,
                waiters: Vec::new(),
            });
        }
        drop(guards);
        if !seen.is_empty() {
            self.waits.fetch_add(1, Ordering::Relaxed);
        }
        RangeGuard {
            det: self.clone(),
            id,
            start,
            end,
            waiter,
        }
    }

    fn release(&self, id: u64, start: u64, end: u64) {
        let mut woken = Vec::new();
        {
            let ids = self.bucket_ids(start, end);
            let mut guards: Vec<MutexGuard<'_, Vec<Entry>>> =
                ids.iter().map(|&i| lock(&self.buckets[i])).collect();
            for g in guards.iter_mut() {
                if let Some(pos) = g.iter().position(|e| e.id == id) {
                    let e = g.swap_remove(pos);
                    woken.extend(e.waiters);
                }
            }
        }
        for w in woken {
            if w.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
                if let Some(k) = lock(&w.waker).take() {
                    k.wake();
                }
            }
        }
    }

    /// Ranges registered right now (tests, status).
    pub fn in_flight(&self) -> usize {
        let mut ids: Vec<u64> = Vec::new();
        for b in self.buckets.iter() {
            ids.extend(lock(b).iter().map(|e| e.id));
        }
        ids.sort_unstable();
        ids.dedup();
        ids.len()
    }
}

/// A registered range; see [`OverlapDetector::lock`].
pub struct RangeGuard {
    det: Arc<OverlapDetector>,
    id: u64,
    start: u64,
    end: u64,
    waiter: Arc<Waiter>,
}

impl RangeGuard {
    /// Whether every earlier overlapping range has been released.
    pub fn is_ready(&self) -> bool {
        self.waiter.remaining.load(Ordering::Acquire) == 0
    }

    /// Waits until [`RangeGuard::is_ready`].
    pub async fn ready(&self) {
        std::future::poll_fn(|cx: &mut Context<'_>| {
            if self.is_ready() {
                return Poll::Ready(());
            }
            *lock(&self.waiter.waker) = Some(cx.waker().clone());
            if self.is_ready() {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await
    }

    /// The range.
    pub fn range(&self) -> (u64, u64) {
        (self.start, self.end)
    }
}

impl Drop for RangeGuard {
    fn drop(&mut self) {
        self.det.release(self.id, self.start, self.end);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[test]
    fn overlapping_waits_disjoint_does_not() {
        let d = OverlapDetector::new(16, 8);
        let a = d.lock(0, 4096);
        let b = d.lock(8192, 12288);
        assert!(a.is_ready() && b.is_ready());
        let c = d.lock(2048, 10240); // overlaps both
        assert!(!c.is_ready());
        let e = d.lock(4096, 8192); // overlaps only c (waiting)
        assert!(!e.is_ready());
        drop(a);
        assert!(!c.is_ready());
        drop(b);
        assert!(c.is_ready());
        assert!(!e.is_ready());
        drop(c);
        assert!(e.is_ready());
        drop(e);
        assert_eq!(d.in_flight(), 0);
        // Ranges spanning a stripe boundary and hashing collisions.
        let x = d.lock((1 << 16) - 512, (1 << 16) + 512);
        let y = d.lock((9 << 16) + 1024, (9 << 16) + 2048); // same bucket as stripe 1
        assert!(y.is_ready());
        let z = d.lock(1 << 16, (1 << 16) + 4096);
        assert!(!z.is_ready());
        drop(x);
        assert!(z.is_ready());
    }

    /// Many threads lock random overlapping ranges of a small space; every
    /// block records its holder with a compare-exchange, which fails if two
    /// overlapping ranges were ever held at once. Also checks that for each
    /// block, holders come in registration order.
    #[test]
    fn stress_no_two_overlapping_holders() {
        const BLOCKS: usize = 64;
        const BS: u64 = 512;
        let d = OverlapDetector::new(12, 4); // 8 blocks a stripe, 4 buckets: collisions
        let owner: Arc<Vec<AtomicU32>> = Arc::new((0..BLOCKS).map(|_| AtomicU32::new(0)).collect());
        let last_id: Arc<Vec<AtomicU64>> =
            Arc::new((0..BLOCKS).map(|_| AtomicU64::new(0)).collect());
        let threads: Vec<_> = (1..=4u32)
            .map(|t| {
                let (d, owner, last_id) = (d.clone(), owner.clone(), last_id.clone());
                std::thread::spawn(move || {
                    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(t);
                    for _ in 0..20_000 {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let first = (x % BLOCKS as u64) as usize;
                        let n = 1 + ((x >> 20) % 12) as usize;
                        let last = (first + n).min(BLOCKS);
                        let g = d.lock(first as u64 * BS, last as u64 * BS);
                        while !g.is_ready() {
                            std::thread::yield_now();
                        }
                        for b in first..last {
                            assert!(
                                owner[b]
                                    .compare_exchange(0, t, Ordering::SeqCst, Ordering::SeqCst)
                                    .is_ok(),
                                "block {b} held twice"
                            );
                            let prev = last_id[b].swap(g.id, Ordering::SeqCst);
                            assert!(prev < g.id, "block {b}: {} after {prev}", g.id);
                        }
                        for b in first..last {
                            owner[b].store(0, Ordering::SeqCst);
                        }
                        drop(g);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("stress thread");
        }
        assert_eq!(d.in_flight(), 0);
        assert!(d.waits() > 0, "the stress never contended");
    }
}
