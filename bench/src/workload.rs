//! What each I/O is: its offset and whether it reads or writes.
//!
//! Every task owns a [`Pattern`] and asks it for the next I/O, so choosing
//! costs a few integer operations and touches no shared state. Sequential
//! tasks each walk their own slice of the volume (task *k* of *n* starts at
//! *k/n* of the way in and wraps at the end), so in-flight I/Os of one core
//! never overlap. Random offsets come from wyrand, a 64-bit PRNG that is one
//! add and one 128-bit multiply per number, seeded per task so that runs are
//! reproducible; a number is mapped onto the slots with Lemire's
//! multiply-shift instead of `%`, which avoids a division per I/O.

/// wyrand: small, fast and good enough for picking offsets and mixes.
#[derive(Debug, Clone)]
pub struct WyRand {
    state: u64,
}

impl WyRand {
    /// A generator from a seed (any value, zero included).
    pub fn new(seed: u64) -> Self {
        WyRand { state: seed }
    }

    /// The next 64 random bits.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0xa076_1d64_78bd_642f);
        let t = u128::from(self.state) * u128::from(self.state ^ 0xe703_7ed1_a0b4_28db);
        ((t >> 64) as u64) ^ (t as u64)
    }

    /// A number in `0..n` (n > 0), without division.
    #[inline]
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

/// One I/O to issue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NextIo {
    /// Byte offset, a multiple of the I/O size.
    pub offset: u64,
    /// Read (else write).
    pub read: bool,
}

/// The offsets and directions one task issues.
#[derive(Debug, Clone)]
pub struct Pattern {
    /// I/O size in bytes.
    bs: u64,
    /// Number of `bs`-sized slots on the volume.
    slots: u64,
    /// Next slot for sequential patterns.
    cursor: u64,
    random: bool,
    read_percent: u8,
    rng: WyRand,
}

impl Pattern {
    /// The pattern of task `task` out of `tasks` (over all cores).
    ///
    /// `volume_bytes` must hold at least one `bs` I/O; the tail that is not a
    /// whole `bs` is never touched.
    pub fn new(
        random: bool,
        read_percent: u8,
        bs: u64,
        volume_bytes: u64,
        task: u64,
        tasks: u64,
        seed: u64,
    ) -> Self {
        let slots = (volume_bytes / bs).max(1);
        let tasks = tasks.max(1);
        let cursor = ((u128::from(slots) * u128::from(task % tasks)) / u128::from(tasks)) as u64;
        Pattern {
            bs,
            slots,
            cursor,
            random,
            read_percent,
            // Distinct, well-spread seeds per task.
            rng: WyRand::new(seed ^ task.wrapping_mul(0x9e37_79b9_7f4a_7c15)),
        }
    }

    /// The next I/O.
    #[inline]
    pub fn next_io(&mut self) -> NextIo {
        let slot = if self.random {
            self.rng.below(self.slots)
        } else {
            let s = self.cursor;
            self.cursor += 1;
            if self.cursor == self.slots {
                self.cursor = 0;
            }
            s
        };
        let read = match self.read_percent {
            100 => true,
            0 => false,
            p => self.rng.below(100) < u64::from(p),
        };
        NextIo {
            offset: slot * self.bs,
            read,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_offsets_are_aligned_in_range_and_spread() {
        let mut p = Pattern::new(true, 100, 4096, (1 << 20) + 100, 0, 1, 7);
        let mut seen = [false; 256];
        for _ in 0..10_000 {
            let io = p.next_io();
            assert!(io.read);
            assert_eq!(io.offset % 4096, 0);
            assert!(io.offset + 4096 <= 1 << 20);
            seen[(io.offset / 4096) as usize] = true;
        }
        assert!(seen.iter().all(|&s| s), "every slot hit in 10k draws");
    }

    #[test]
    fn sequential_tasks_start_apart_and_wrap() {
        let mut a = Pattern::new(false, 0, 512, 4 * 512, 0, 2, 1);
        let mut b = Pattern::new(false, 0, 512, 4 * 512, 1, 2, 1);
        let offs: Vec<u64> = (0..5).map(|_| a.next_io().offset).collect();
        assert_eq!(offs, vec![0, 512, 1024, 1536, 0]);
        let io = b.next_io();
        assert_eq!(
            io,
            NextIo {
                offset: 1024,
                read: false
            }
        );
    }

    #[test]
    fn mix_follows_the_percentage() {
        let mut p = Pattern::new(true, 70, 4096, 1 << 30, 3, 8, 42);
        let reads = (0..100_000).filter(|_| p.next_io().read).count();
        assert!((68_000..72_000).contains(&reads), "{reads}");
    }
}
