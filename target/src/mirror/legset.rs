//! The set of remote legs of a running mirror, changeable online.
//!
//! Legs live in fixed slots (`0..MAX_LEGS`, the metadata file's bitmap
//! slots); adding or removing a leg publishes a new immutable snapshot of the
//! slots under a mutex and bumps a version counter. The write path never
//! takes that mutex: each core keeps its own copy of the newest snapshot in
//! a [`LegCache`] (an `Rc`, so taking it per write is not an atomic
//! operation on a shared cache line) and re-reads the shared one only when
//! the version it loads (one `Acquire` load of a read-mostly word) moved.
//! A write takes one snapshot after it holds its overlap range and uses it
//! for its whole life, so it sees a consistent leg set.
//!
//! Why that is enough for a leg added under load (the engine relies on it):
//! the new leg's slot has every bitmap bit set *before* it is published; a
//! write that still uses the old snapshot does not send to the new leg, but
//! the full sync copies the write's region only under the same overlap
//! range, so after the write has reached the local volume; a write that
//! takes its range after the full sync released it happens after the
//! publication, and a snapshot taken after a publication (in happens-before
//! order) contains it (proved by the stress test below).
//!
//! Removing a leg publishes a snapshot without it; writes holding an older
//! snapshot may still send to the removed leg or set its bits, which is
//! harmless as long as its slot is not reused before they are done — the
//! engine only reuses a slot once the removed leg's supervisor has exited
//! (bits are cleared only by the supervisor's resync).

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

pub use super::meta::MAX_LEGS;

/// Errors changing the leg set.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LegSetError {
    /// No such slot.
    #[error("leg slot {0} does not exist (at most {MAX_LEGS} remote legs)")]
    NoSuchSlot(usize),
    /// Slot taken.
    #[error("leg slot {0} is in use")]
    SlotInUse(usize),
    /// Slot empty.
    #[error("no leg in slot {0}")]
    Empty(usize),
}

/// One immutable view of the slots.
pub struct Snapshot<T> {
    version: u64,
    slots: [Option<Arc<T>>; MAX_LEGS],
}

impl<T> Snapshot<T> {
    /// The version this view was published at.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The leg in slot `idx`.
    pub fn get(&self, idx: usize) -> Option<&Arc<T>> {
        self.slots.get(idx).and_then(Option::as_ref)
    }

    /// The present legs with their slots, in slot order.
    pub fn iter(&self) -> impl Iterator<Item = (usize, &Arc<T>)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().map(|l| (i, l)))
    }

    /// How many legs are present.
    pub fn len(&self) -> usize {
        self.slots.iter().filter(|s| s.is_some()).count()
    }

    /// No leg present.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<T> Clone for Snapshot<T> {
    fn clone(&self) -> Self {
        Snapshot {
            version: self.version,
            slots: self.slots.clone(),
        }
    }
}

/// The shared, versioned leg slots of one mirror.
pub struct LegSet<T> {
    version: AtomicU64,
    current: Mutex<Arc<Snapshot<T>>>,
}

impl<T> LegSet<T> {
    /// A set holding `legs` in their slots.
    pub fn new(legs: Vec<(usize, Arc<T>)>) -> Result<LegSet<T>, LegSetError> {
        let mut slots: [Option<Arc<T>>; MAX_LEGS] = Default::default();
        for (i, l) in legs {
            let s = slots.get_mut(i).ok_or(LegSetError::NoSuchSlot(i))?;
            if s.is_some() {
                return Err(LegSetError::SlotInUse(i));
            }
            *s = Some(l);
        }
        Ok(LegSet {
            version: AtomicU64::new(1),
            current: Mutex::new(Arc::new(Snapshot { version: 1, slots })),
        })
    }

    /// The newest snapshot (takes the mutex: control path only; the data
    /// path goes through a [`LegCache`]).
    pub fn snapshot(&self) -> Arc<Snapshot<T>> {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The leg in slot `idx` now.
    pub fn get(&self, idx: usize) -> Option<Arc<T>> {
        self.snapshot().get(idx).cloned()
    }

    /// The newest published version.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// Publishes one change of the slots: `f` gets the next version and a
    /// copy of the slots to change; nothing is published if it fails.
    pub fn update<R>(
        &self,
        f: impl FnOnce(u64, &mut [Option<Arc<T>>; MAX_LEGS]) -> Result<R, LegSetError>,
    ) -> Result<R, LegSetError> {
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let mut slots = cur.slots.clone();
        let version = cur.version + 1;
        let out = f(version, &mut slots)?;
        *cur = Arc::new(Snapshot { version, slots });
        // Under the mutex, after the snapshot: a reader that loads this
        // version and then takes the mutex finds this snapshot or a newer one.
        self.version.store(version, Ordering::Release);
        Ok(out)
    }

    /// Puts `leg` in the empty slot `idx`.
    pub fn insert(&self, idx: usize, leg: Arc<T>) -> Result<(), LegSetError> {
        self.update(|_, slots| {
            let s = slots.get_mut(idx).ok_or(LegSetError::NoSuchSlot(idx))?;
            if s.is_some() {
                return Err(LegSetError::SlotInUse(idx));
            }
            *s = Some(leg);
            Ok(())
        })
    }

    /// Takes the leg out of slot `idx`.
    pub fn remove(&self, idx: usize) -> Result<Arc<T>, LegSetError> {
        self.update(|_, slots| {
            let s = slots.get_mut(idx).ok_or(LegSetError::NoSuchSlot(idx))?;
            s.take().ok_or(LegSetError::Empty(idx))
        })
    }
}

/// One core's copy of the newest snapshot of a [`LegSet`].
pub struct LegCache<T> {
    cached: RefCell<Rc<Snapshot<T>>>,
}

impl<T> LegCache<T> {
    /// A cache primed with the set's current snapshot.
    pub fn new(set: &LegSet<T>) -> LegCache<T> {
        LegCache {
            cached: RefCell::new(Rc::new((*set.snapshot()).clone())),
        }
    }

    /// The newest snapshot: one atomic load when nothing changed.
    pub fn get(&self, set: &LegSet<T>) -> Rc<Snapshot<T>> {
        let v = set.version.load(Ordering::Acquire);
        let mut c = self.cached.borrow_mut();
        if c.version != v {
            *c = Rc::new((*set.snapshot()).clone());
        }
        c.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    #[test]
    fn slots_insert_remove_and_errors() {
        let set = LegSet::new(vec![(0, Arc::new(10u32))]).expect("set");
        assert!(matches!(
            LegSet::new(vec![(0, Arc::new(1u32)), (0, Arc::new(2))]),
            Err(LegSetError::SlotInUse(0))
        ));
        assert_eq!(set.insert(0, Arc::new(1)), Err(LegSetError::SlotInUse(0)));
        assert_eq!(
            set.insert(MAX_LEGS, Arc::new(1)),
            Err(LegSetError::NoSuchSlot(MAX_LEGS))
        );
        let cache = LegCache::new(&set);
        set.insert(2, Arc::new(12)).expect("insert");
        let snap = cache.get(&set);
        assert_eq!(
            snap.iter().map(|(i, l)| (i, **l)).collect::<Vec<_>>(),
            vec![(0, 10), (2, 12)]
        );
        assert_eq!(*set.remove(0).expect("remove"), 10);
        assert_eq!(set.remove(0).map(|_| ()), Err(LegSetError::Empty(0)));
        // The old snapshot is unchanged (a write in flight keeps its view).
        assert_eq!(snap.len(), 2);
        let now = cache.get(&set);
        assert_eq!(now.len(), 1);
        assert!(now.get(0).is_none() && now.get(2).is_some());
        assert_eq!(now.version(), set.version());
    }

    /// Readers on several threads, each through its own cache, while a
    /// writer adds and removes legs. Every leg value is the version it was
    /// published at, and slot 0 always holds the version of the snapshot
    /// (the writer rewrites it in each change), so a torn view is caught. The property the engine relies on is checked too: once a
    /// reader has seen the writer's "published" flag for version `v`
    /// (release/acquire), its next snapshot is at least `v`.
    #[test]
    fn stress_snapshots_are_consistent_and_never_stale() {
        const CHANGES: u64 = 20_000;
        let set = Arc::new(LegSet::new(vec![(0, Arc::new(1u64))]).expect("set"));
        let published = Arc::new(AtomicU64::new(1));
        let done = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(AtomicU64::new(0));
        let mut readers = Vec::new();
        for _ in 0..3 {
            let (set, published, done, seen) =
                (set.clone(), published.clone(), done.clone(), seen.clone());
            readers.push(std::thread::spawn(move || {
                let cache = LegCache::new(&set);
                let mut last = 0u64;
                let mut checks = 0u64;
                while !done.load(Ordering::Acquire) {
                    let floor = published.load(Ordering::Acquire);
                    let snap = cache.get(&set);
                    let v = snap.version();
                    assert!(v >= floor, "stale snapshot {v} after {floor} was published");
                    assert!(v >= last, "snapshot went back from {last} to {v}");
                    last = v;
                    assert_eq!(snap.get(0).map(|l| **l), Some(v), "torn snapshot");
                    for (_, l) in snap.iter() {
                        assert!(**l <= v, "leg from the future: {} in {v}", **l);
                    }
                    checks += 1;
                    seen.fetch_add(1, Ordering::Relaxed);
                }
                checks
            }));
        }
        // Enough changes, and enough reads interleaved with them (2 cores:
        // the readers may start late), within a bound.
        let t0 = std::time::Instant::now();
        let mut i = 0u64;
        while (i < CHANGES || seen.load(Ordering::Relaxed) < 3 * CHANGES)
            && t0.elapsed() < std::time::Duration::from_secs(20)
        {
            i += 1;
            let slot = 1 + (i as usize % (MAX_LEGS - 1));
            let v = set
                .update(|v, slots| {
                    slots[slot] = match slots[slot] {
                        Some(_) => None,
                        None => Some(Arc::new(v)),
                    };
                    slots[0] = Some(Arc::new(v));
                    Ok(v)
                })
                .expect("update");
            assert_eq!(set.version(), v);
            published.store(v, Ordering::Release);
        }
        done.store(true, Ordering::Release);
        let mut total = 0;
        for r in readers {
            total += r.join().expect("reader");
        }
        assert!(
            total >= 3 * CHANGES,
            "only {total} reads during {i} changes"
        );
    }
}
