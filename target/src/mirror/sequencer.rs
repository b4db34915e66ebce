//! The sequencer: the one shared, contended word on the mirror write path.
//!
//! One `AtomicU64` per consistency group (a mirrored volume is a group of
//! one) hands every write its sequence number **and** the split epoch it
//! belongs to in a single `fetch_add`: the epoch lives in the high
//! [`EPOCH_BITS`] bits, the sequence in the low [`SEQ_BITS`]. A split is one
//! atomic add of `1 << SEQ_BITS` (the epoch goes up by one, the sequence is
//! untouched), so in the word's single modification order every write is
//! either before the split (old epoch) or after it (new epoch); no write can
//! get a sequence number after the split and still the old epoch, which is
//! what reading the epoch in a second, separate load would allow.
//!
//! The `loom` model at the bottom checks that over every interleaving of
//! concurrent writers and a split (`scripts/test.sh` runs it with
//! `RUSTFLAGS="--cfg loom"`).

#[cfg(loom)]
use loom::sync::atomic::{AtomicU64, Ordering};
#[cfg(not(loom))]
use std::sync::atomic::{AtomicU64, Ordering};

/// Bits of the sequence number (2^40 writes per epoch: 35 years at 1 M IOPS).
pub const SEQ_BITS: u32 = 40;
/// Bits of the epoch.
pub const EPOCH_BITS: u32 = 64 - SEQ_BITS;
const SEQ_MASK: u64 = (1 << SEQ_BITS) - 1;

/// A sequence number and the epoch it was issued in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Stamp {
    /// Split epoch.
    pub epoch: u32,
    /// Sequence number within the group (never reset by a split).
    pub seq: u64,
}

impl Stamp {
    fn from_word(w: u64) -> Stamp {
        Stamp {
            epoch: (w >> SEQ_BITS) as u32,
            seq: w & SEQ_MASK,
        }
    }
}

/// One consistency group's sequencer.
#[derive(Debug)]
pub struct Sequencer {
    word: AtomicU64,
}

impl Sequencer {
    /// Starts at `epoch`, next sequence number `next_seq`.
    pub fn new(epoch: u32, next_seq: u64) -> Self {
        let epoch = u64::from(epoch) & ((1 << EPOCH_BITS) - 1);
        Sequencer {
            word: AtomicU64::new((epoch << SEQ_BITS) | (next_seq & SEQ_MASK)),
        }
    }

    /// The stamp of one write: its sequence number and epoch, from one
    /// atomic operation.
    pub fn next(&self) -> Stamp {
        Stamp::from_word(self.word.fetch_add(1, Ordering::AcqRel))
    }

    /// Splits the stream: bumps the epoch in one atomic add. Returns the
    /// stamp the next write will get (new epoch, first sequence number of
    /// it): writes numbered below it belong to the old epoch.
    pub fn split(&self) -> Stamp {
        let before = Stamp::from_word(self.word.fetch_add(1 << SEQ_BITS, Ordering::AcqRel));
        Stamp {
            epoch: before.epoch.wrapping_add(1),
            seq: before.seq,
        }
    }

    /// The stamp the next write would get (status only; racy by nature).
    pub fn peek(&self) -> Stamp {
        Stamp::from_word(self.word.load(Ordering::Acquire))
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn stamps_count_up_and_split_bumps_epoch_only() {
        let s = Sequencer::new(3, 10);
        assert_eq!(s.next(), Stamp { epoch: 3, seq: 10 });
        assert_eq!(s.next(), Stamp { epoch: 3, seq: 11 });
        assert_eq!(s.split(), Stamp { epoch: 4, seq: 12 });
        assert_eq!(s.next(), Stamp { epoch: 4, seq: 12 });
        assert_eq!(s.peek(), Stamp { epoch: 4, seq: 13 });
    }

    #[test]
    fn threads_get_unique_sequence_numbers() {
        let s = std::sync::Arc::new(Sequencer::new(0, 0));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let s = s.clone();
                std::thread::spawn(move || (0..10_000).map(|_| s.next().seq).collect::<Vec<_>>())
            })
            .collect();
        let mut all: Vec<u64> = handles
            .into_iter()
            .flat_map(|h| h.join().expect("thread"))
            .collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 40_000);
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::sync::Arc;
    use loom::thread;

    /// Every write numbered at or after the split's first sequence number
    /// carries the new epoch, every write before it the old one, and no
    /// sequence number is handed out twice.
    #[test]
    fn split_is_exact() {
        loom::model(|| {
            let s = Arc::new(Sequencer::new(7, 100));
            let writers: Vec<_> = (0..2)
                .map(|_| {
                    let s = s.clone();
                    thread::spawn(move || [s.next(), s.next()])
                })
                .collect();
            let split = s.split();
            let mut stamps: Vec<Stamp> = writers
                .into_iter()
                .flat_map(|w| w.join().expect("writer"))
                .collect();
            assert_eq!(split.epoch, 8);
            for st in &stamps {
                if st.seq >= split.seq {
                    assert_eq!(st.epoch, 8, "{st:?} after split {split:?}");
                } else {
                    assert_eq!(st.epoch, 7, "{st:?} before split {split:?}");
                }
            }
            stamps.sort();
            stamps.dedup_by_key(|s| s.seq);
            assert_eq!(stamps.len(), 4);
        });
    }
}
