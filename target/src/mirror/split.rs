//! Split mirror: a consistent point-in-time copy of a volume, taken by
//! freezing one remote leg at an exact point of the write stream while hosts
//! keep writing (US 7,111,137).
//!
//! # The split point
//! The [`SplitGate`] wraps the group's [`Sequencer`] and adds two in-flight
//! counters indexed by epoch parity. A write *enters* the gate (counts
//! itself under the epoch it saw, takes its stamp with the one `fetch_add`,
//! and moves its count if the stamp's epoch differs) and holds a [`Ticket`]
//! until every leg has it (or has it in its bitmap). A split is one
//! `fetch_add(1 << SEQ_BITS)`: before it, the leg's [`LegSplit::from`] is set
//! to the new epoch, so every write stamped after the split skips the leg
//! (and sets the leg's dirty bit instead, exactly as for a degraded leg) and
//! every write stamped before it is sent to the leg as usual. The split then
//! waits until the old epoch's counter is zero: at that instant every write
//! of the old epoch has completed on the leg, and no later write will touch
//! it. Writes of both epochs run side by side meanwhile (no quiesce).
//!
//! Why two counters and not one per write: the wait must cover exactly the
//! old epoch (new writes keep coming and must not hold the split up), and a
//! counter per epoch parity suffices because splits of a gate are serialised
//! (a second split cannot start before the first one's old epoch drained, so
//! a writer can be at most one epoch behind the stamp it gets). The `loom`
//! model at the bottom checks the two promises of the issue over every
//! interleaving: no new-epoch write reaches the split image, and no write
//! acknowledged before the split is missing from it. (It runs with loom's
//! preemption bound of 3; it fails, "a write reached the image after the
//! split", when a writer counts itself only after taking its stamp.)
//!
//! # Where the image lives
//! The split leg is hosted by another site (`serve_leg` over its storage
//! servers' extents). That site is told with a `SplitCtl{Freeze}`: it
//! persists the split in its allocation record, stops taking the primary's
//! writes for that allocation, and registers a [`SplitImage`] volume over the
//! same extents, so the frozen data is an ordinary volume there (listed by
//! `bdev_get_bdevs`, exportable over NVMe/TCP and iSCSI), read-only, or a
//! writable clone whose writes are tracked in a persistent bitmap
//! ([`ImageBits`]). Exposing the image on the site that holds its data needs
//! no new data path and costs the primary nothing.
//!
//! # Rejoin and promote
//! After the split the primary's dirty bitmap of the leg holds every region
//! written since the split point. `mirror_rejoin` asks the leg's site for
//! the image's bitmap (`SplitCtl{Query}`, which first stops the image taking
//! writes), ORs it into the leg's bitmap (durably), ends the split there
//! (`SplitCtl{End}`: the image volume goes away) and lets the leg reconnect
//! as `degraded`: the ordinary resync copies exactly bits(primary) ∪
//! bits(image), primary to leg. `mirror_split_promote` detaches the image
//! (`SplitCtl{Promote}`): it stays a writable volume of its own, the leg
//! stays `split` for good.
//!
//! # Crash safety
//! The primary records the split in the mirror's record in three phases:
//! `pending` (before the sequencer split), `split` (after the leg's site
//! confirmed the freeze), `rejoining` (before the rejoin starts). A restart
//! that finds `pending` or `rejoining` runs the rejoin to its end, which
//! is idempotent on both sides (`Query`/`End` of a leg that is not split
//! answer with an empty bitmap): a split interrupted by `kill -9` rolls
//! back, a rejoin interrupted finishes. Every region written while the leg
//! skipped writes is in the leg's bitmap or, after a crash, in the activity
//! log's extents, which a restart marks dirty for every leg.

#[cfg(loom)]
use loom::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
#[cfg(not(loom))]
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
// Plain `Arc` even under loom: only the atomics are modelled.
use std::sync::Arc;

use super::sequencer::{Sequencer, Stamp};
use serde::{Deserialize, Serialize};

/// Where a leg's split stands, as the primary records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SplitPhase {
    /// Asked for, not confirmed by the leg's site: a restart rolls it back.
    Pending,
    /// Frozen; the image exists on the leg's site.
    Split,
    /// Being merged back: a restart finishes it.
    Rejoining,
    /// The image is a volume of its own; the leg stays split.
    Promoted,
}

/// A leg's split, as recorded by the primary and shown in `mirror_get_status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitInfo {
    /// Phase.
    pub phase: SplitPhase,
    /// First epoch after the split.
    pub epoch: u32,
    /// First sequence number after the split: writes numbered below it are
    /// in the image, from it on they are not.
    pub sequence: u64,
    /// The image volume's name on the leg's site.
    pub image: String,
    /// The image is a writable clone.
    pub writable: bool,
}

/// One consistency group's sequencer plus the per-epoch in-flight counts a
/// split waits on.
#[derive(Debug)]
pub struct SplitGate {
    seq: Sequencer,
    inflight: [AtomicU64; 2],
    busy: AtomicBool,
}

/// A write's membership in its epoch; dropping it says the write is done
/// on every leg.
#[derive(Debug)]
pub struct Ticket {
    gate: Arc<SplitGate>,
    slot: usize,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.gate.inflight[self.slot].fetch_sub(1, Ordering::SeqCst);
    }
}

/// The right to split a gate (one split at a time).
#[derive(Debug)]
pub struct SplitPermit<'a> {
    gate: &'a SplitGate,
}

impl Drop for SplitPermit<'_> {
    fn drop(&mut self) {
        self.gate.busy.store(false, Ordering::SeqCst);
    }
}

fn slot(epoch: u32) -> usize {
    (epoch & 1) as usize
}

impl SplitGate {
    /// Starts at `epoch`, next sequence number `next_seq`.
    pub fn new(epoch: u32, next_seq: u64) -> Self {
        SplitGate {
            seq: Sequencer::new(epoch, next_seq),
            inflight: [AtomicU64::new(0), AtomicU64::new(0)],
            busy: AtomicBool::new(false),
        }
    }

    /// Stamps a write and counts it in its epoch until the ticket drops.
    pub fn enter(self: &Arc<Self>) -> (Stamp, Ticket) {
        let seen = self.seq.peek().epoch;
        let mut s = slot(seen);
        self.inflight[s].fetch_add(1, Ordering::SeqCst);
        let stamp = self.seq.next();
        if slot(stamp.epoch) != s {
            // A split came between the look and the stamp: count under the
            // stamp's epoch before leaving the other one, so the split that
            // waits for the old epoch cannot miss the write.
            let n = slot(stamp.epoch);
            self.inflight[n].fetch_add(1, Ordering::SeqCst);
            self.inflight[s].fetch_sub(1, Ordering::SeqCst);
            s = n;
        }
        (
            stamp,
            Ticket {
                gate: self.clone(),
                slot: s,
            },
        )
    }

    /// The stamp the next write would get (status only).
    pub fn peek(&self) -> Stamp {
        self.seq.peek()
    }

    /// Takes the right to split, or `None` while another split of this gate
    /// is still waiting for its old epoch.
    pub fn try_begin(&self) -> Option<SplitPermit<'_>> {
        self.busy
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .ok()
            .map(|_| SplitPermit { gate: self })
    }

    /// The split: `before(new_epoch)` runs first (it tells the legs being
    /// split which epoch they stop at), then the epoch moves on in one
    /// atomic add. Returns the split point: the first stamp of the new
    /// epoch.
    pub fn split(&self, _permit: &SplitPermit<'_>, before: impl FnOnce(u32)) -> Stamp {
        let next = self.seq.peek().epoch.wrapping_add(1);
        before(next);
        self.seq.split()
    }

    /// Writes of `epoch` (or of an epoch of the same parity) not yet done.
    pub fn inflight(&self, epoch: u32) -> u64 {
        self.inflight[slot(epoch)].load(Ordering::SeqCst)
    }
}

/// A leg's split state on the primary.
#[derive(Debug)]
pub struct LegSplit {
    /// Writes of this epoch or later skip the leg (`u32::MAX`: not split).
    from: AtomicU32,
    /// The recorded split (status, rejoin).
    info: std::sync::Mutex<Option<SplitInfo>>,
}

impl Default for LegSplit {
    fn default() -> Self {
        LegSplit {
            from: AtomicU32::new(u32::MAX),
            info: std::sync::Mutex::new(None),
        }
    }
}

impl LegSplit {
    /// The recorded split.
    pub fn info(&self) -> Option<SplitInfo> {
        self.info.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Records the split.
    pub fn set_info(&self, info: Option<SplitInfo>) {
        *self.info.lock().unwrap_or_else(|p| p.into_inner()) = info;
    }

    /// Whether a write of `epoch` must skip the leg.
    pub fn skips(&self, epoch: u32) -> bool {
        epoch >= self.from.load(Ordering::SeqCst)
    }

    /// Writes of `epoch` and later skip the leg.
    pub fn set_from(&self, epoch: u32) {
        self.from.store(epoch, Ordering::SeqCst);
    }

    /// Every write skips the leg (a split leg after a restart: the
    /// sequencer starts over, the leg stays frozen).
    pub fn skip_all(&self) {
        self.from.store(0, Ordering::SeqCst);
    }

    /// The leg takes writes again.
    pub fn clear(&self) {
        self.from.store(u32::MAX, Ordering::SeqCst);
    }

    /// Whether writes skip the leg at all.
    pub fn active(&self) -> bool {
        self.from.load(Ordering::SeqCst) != u32::MAX
    }
}

pub mod ops;

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn tickets_count_per_epoch_and_split_moves_on() {
        let g = Arc::new(SplitGate::new(1, 1));
        let (a, ta) = g.enter();
        assert_eq!(a, Stamp { epoch: 1, seq: 1 });
        assert_eq!(g.inflight(1), 1);
        let p = g.try_begin().expect("first split");
        assert!(g.try_begin().is_none(), "one split at a time");
        let mut told = None;
        let at = g.split(&p, |e| told = Some(e));
        assert_eq!(told, Some(2));
        assert_eq!(at, Stamp { epoch: 2, seq: 2 });
        let (b, tb) = g.enter();
        assert_eq!(b, Stamp { epoch: 2, seq: 2 });
        assert_eq!(g.inflight(1), 1);
        assert_eq!(g.inflight(2), 1);
        drop(ta);
        assert_eq!(
            g.inflight(1),
            0,
            "old epoch drained, new write still running"
        );
        drop(tb);
        drop(p);
        assert!(g.try_begin().is_some());
    }

    #[test]
    fn leg_split_skips_from_its_epoch() {
        let l = LegSplit::default();
        assert!(!l.active() && !l.skips(7));
        l.set_from(5);
        assert!(!l.skips(4) && l.skips(5) && l.skips(6));
        l.skip_all();
        assert!(l.skips(0));
        l.clear();
        assert!(!l.skips(u32::MAX - 1));
    }

    /// Writers on several threads against repeated splits: after each
    /// split's old epoch drains, the image (what reached the split leg) holds
    /// exactly the writes stamped before the split point, and a write
    /// stamped after it never reaches the image.
    #[test]
    fn stress_split_image_is_exact() {
        use std::sync::Mutex;
        const WRITERS: usize = 4;
        const SPLITS: usize = 50;
        let gate = Arc::new(SplitGate::new(1, 1));
        let leg = Arc::new(LegSplit::default());
        // seq -> reached the image
        let image = Arc::new(Mutex::new(Vec::<u64>::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let writers: Vec<_> = (0..WRITERS)
            .map(|_| {
                let (gate, leg, image, stop) =
                    (gate.clone(), leg.clone(), image.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let (st, t) = gate.enter();
                        if !leg.skips(st.epoch) {
                            image.lock().unwrap_or_else(|p| p.into_inner()).push(st.seq);
                        }
                        drop(t);
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        for _ in 0..SPLITS {
            std::thread::sleep(std::time::Duration::from_micros(200));
            leg.clear();
            image.lock().unwrap_or_else(|p| p.into_inner()).clear();
            let p = gate.try_begin().expect("no other split");
            let at = gate.split(&p, |e| leg.set_from(e));
            while gate.inflight(at.epoch - 1) != 0 {
                std::thread::yield_now();
            }
            let snap = image.lock().unwrap_or_else(|p| p.into_inner()).clone();
            std::thread::sleep(std::time::Duration::from_micros(200));
            let later = image.lock().unwrap_or_else(|p| p.into_inner()).clone();
            assert_eq!(
                snap, later,
                "a write reached the image after the split drained"
            );
            assert!(
                snap.iter().all(|&s| s < at.seq),
                "a write at or after the split point {} reached the image",
                at.seq
            );
        }
        stop.store(true, Ordering::Relaxed);
        let total: u64 = writers.into_iter().map(|w| w.join().expect("writer")).sum();
        assert!(total > 0);
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::thread;

    /// Two writers, one of which finished (acknowledged) before the split
    /// was asked for, the other racing with it; a split that waits for its
    /// old epoch. Over every interleaving: the image (the split leg) holds
    /// every write stamped before the split point and the acknowledged
    /// one, and no write stamped after it, at the moment the split returns
    /// and after everything finished.
    #[test]
    fn split_image_is_exact() {
        // The spin-wait of the split makes the full state space huge; a
        // preemption bound of 3 is loom's recommended setting and covers
        // every interleaving with up to 3 forced preemptions.
        let mut b = loom::model::Builder::new();
        if b.preemption_bound.is_none() {
            b.preemption_bound = Some(3);
        }
        b.check(|| {
            let gate = Arc::new(SplitGate::new(1, 1));
            let leg = Arc::new(LegSplit::default());
            // Bit w: writer w's write reached the image.
            let image = Arc::new(AtomicU64::new(0));
            let acked = Arc::new(AtomicBool::new(false));
            let seqs = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
            let writer = |w: usize| {
                let (gate, leg, image, acked, seqs) = (
                    gate.clone(),
                    leg.clone(),
                    image.clone(),
                    acked.clone(),
                    seqs.clone(),
                );
                move || {
                    let (st, t) = gate.enter();
                    seqs[w].store(st.seq, Ordering::SeqCst);
                    if !leg.skips(st.epoch) {
                        image.fetch_or(1 << w, Ordering::SeqCst);
                    }
                    drop(t);
                    if w == 0 {
                        acked.store(true, Ordering::SeqCst);
                    }
                }
            };
            let w0 = thread::spawn(writer(0));
            let w1 = thread::spawn(writer(1));
            // The split request: was writer 0 acknowledged before it?
            let acked_before = acked.load(Ordering::SeqCst);
            let p = gate.try_begin().expect("only split");
            let at = gate.split(&p, |e| leg.set_from(e));
            while gate.inflight(at.epoch - 1) != 0 {
                thread::yield_now();
            }
            let snap = image.load(Ordering::SeqCst);
            w0.join().expect("writer 0");
            w1.join().expect("writer 1");
            let end = image.load(Ordering::SeqCst);
            assert_eq!(snap, end, "a write reached the image after the split");
            if acked_before {
                assert!(snap & 1 != 0, "an acknowledged write is missing");
            }
            for w in 0..2 {
                let s = seqs[w].load(Ordering::SeqCst);
                let inside = snap & (1 << w) != 0;
                assert_eq!(
                    inside,
                    s < at.seq,
                    "writer {w} seq {s}, split at {}",
                    at.seq
                );
            }
        });
    }
}
