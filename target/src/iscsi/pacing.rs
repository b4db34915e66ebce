//! Receive pacing behind a deep queue of writes: whether the connection's
//! reader waits before its next receive, and for how long.
//!
//! Why it exists: an initiator in lock step (fio's libiscsi engine) keeps a
//! deep queue and sends one write for each answer it reads, header and data
//! with separate system calls. Taking each write the moment it arrives costs
//! a receive or two per write and keeps both CPUs on the same socket at
//! once; on a loopback connection that contention can double the kernel's
//! cost per write on both sides and hold there (BENCHMARKS.md, iSCSI,
//! sessions 8 and 9). So behind a deep queue the reader waits a little and
//! then takes what gathered with one batch receive.
//!
//! Why the wait adapts: the initiator's pace is not fixed. The same fio runs
//! at twice the rate in the machine's fast state as in its contended one, so
//! a fixed 15 µs gathered about 13 writes a receive in one and 6 in the
//! other. The [`Pacer`] aims each paced receive at a share of the queue the
//! initiator shows (3/8 of its depth, at most 12 writes): a batch short of
//! that lengthens the next wait by a microsecond, a longer one shortens it,
//! within 5–40 µs. The aim follows the depth so that a shallower queue
//! (QD 16) is not made to wait for writes its initiator cannot send yet; a
//! queue of 8 or less is never paced at all.

use std::time::Duration;

use super::pdu::StatSn;

/// Responses the initiator must not yet have acknowledged, as of the write
/// just read, for the reader to pace: a queue deeper than 8.
const PACE_MIN_UNACKED: u32 = 8;
/// Above this many the ExpStatSN is taken as stale or bogus, not as a
/// queue depth (initiators keep at most a few hundred commands in flight).
const PACE_MAX_UNACKED: u32 = 1024;

/// The first wait of a connection, and the bounds and step of later ones.
const WAIT_FIRST: Duration = Duration::from_micros(15);
const WAIT_MIN: Duration = Duration::from_micros(5);
const WAIT_MAX: Duration = Duration::from_micros(40);
const WAIT_STEP: Duration = Duration::from_micros(1);

/// Writes a paced receive aims at: this share of the queue depth...
const AIM_SHARE_NUM: u32 = 3;
const AIM_SHARE_DEN: u32 = 8;
/// ...within these bounds (a batch receive takes at most 16).
const AIM_MIN: usize = 2;
const AIM_MAX: usize = 12;
/// Paced receives over which the deepest queue seen becomes the estimate,
/// so the estimate also falls when the initiator's queue does.
const DEPTH_WINDOW: u32 = 256;

/// Our answers the initiator had not yet read when it sent a command:
/// `next_stat_sn` (the StatSN our next response takes) less the command's
/// ExpStatSN, in serial arithmetic. `None` for an ExpStatSN ahead of ours
/// or too far behind to be a queue.
pub(super) fn unacked(next_stat_sn: StatSn, exp_stat_sn: StatSn) -> Option<u32> {
    let n = next_stat_sn.0.wrapping_sub(exp_stat_sn.0);
    (n < PACE_MAX_UNACKED).then_some(n)
}

/// Whether the reader, having just taken a write with immediate data whole
/// and with nothing else received behind it, waits before its next receive,
/// given the write's [`unacked`] answers: it does when the initiator still
/// had at least [`PACE_MIN_UNACKED`] of our responses to read when it sent
/// it. That initiator sends a write for each answer it reads, so commands
/// keep coming whether or not we are waiting for them. A shallow queue (QD 8 or less,
/// QD 1 above all) never waits: there the initiator waits for us.
pub(super) fn paces_after(unacked: u32) -> bool {
    unacked >= PACE_MIN_UNACKED
}

/// One connection's paced wait, adapted after every paced receive (see the
/// module doc).
#[derive(Debug)]
pub(super) struct Pacer {
    wait: Duration,
    /// The initiator's queue depth as we estimate it: the most answers it
    /// has shown unread (0 before the first paced receive).
    depth: u32,
    /// The most answers shown unread in the current window...
    window_deepest: u32,
    /// ...and the paced receives in it so far.
    window_receives: u32,
}

impl Pacer {
    pub(super) fn new() -> Self {
        Pacer {
            wait: WAIT_FIRST,
            depth: 0,
            window_deepest: 0,
            window_receives: 0,
        }
    }

    /// How long to wait before the next paced receive.
    pub(super) fn wait(&self) -> Duration {
        self.wait
    }

    /// How many writes a paced receive aims to take.
    pub(super) fn aim(&self) -> usize {
        let share = self.depth * AIM_SHARE_NUM / AIM_SHARE_DEN;
        usize::try_from(share)
            .unwrap_or(AIM_MAX)
            .clamp(AIM_MIN, AIM_MAX)
    }

    /// Learns from a paced receive: it took `took` writes, and the
    /// initiator showed `unacked` answers unread in the write that made us
    /// wait and in the last one taken (`None` where an ExpStatSN said
    /// nothing usable).
    pub(super) fn after_receive(&mut self, took: usize, unacked: [Option<u32>; 2]) {
        let deepest = unacked.into_iter().flatten().max().unwrap_or(0);
        self.window_deepest = self.window_deepest.max(deepest);
        self.depth = self.depth.max(deepest);
        self.window_receives += 1;
        if self.window_receives >= DEPTH_WINDOW {
            self.depth = self.window_deepest;
            self.window_deepest = 0;
            self.window_receives = 0;
        }
        let aim = self.aim();
        if took < aim {
            self.wait = (self.wait + WAIT_STEP).min(WAIT_MAX);
        } else if took > aim {
            self.wait = self.wait.saturating_sub(WAIT_STEP).max(WAIT_MIN);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only a queue deeper than 8, read off the write's ExpStatSN, makes
    /// the reader wait; QD 1, shallow queues and stale or bogus ExpStatSNs
    /// (ahead of ours, or absurdly far behind) never do, across the wrap.
    #[test]
    fn the_reader_paces_only_behind_a_deep_queue() {
        let at = |next: u32, exp: u32| unacked(StatSn(next), StatSn(exp)).is_some_and(paces_after);
        assert!(!at(100, 100), "QD 1: the initiator has read every answer");
        assert!(!at(107, 100), "7 answers unread: QD 8");
        assert!(at(108, 100), "8 answers unread");
        assert!(at(131, 100), "QD 32");
        assert!(at(5, u32::MAX - 10), "across the serial wrap");
        assert!(!at(100, 101), "an ExpStatSN ahead of ours");
        assert!(
            !at(100 + PACE_MAX_UNACKED, 100),
            "too far behind to be a queue"
        );
        assert_eq!(unacked(StatSn(131), StatSn(100)), Some(31));
        assert_eq!(unacked(StatSn(100), StatSn(101)), None);
    }

    /// The aim is 3/8 of the deepest queue the initiator shows, within
    /// 2..=12: a QD 32 initiator (31 answers unread at most) gets 11, a
    /// QD 16 one 5.
    #[test]
    fn the_aim_follows_the_queue_depth() {
        let aim_at = |deepest: u32| {
            let mut p = Pacer::new();
            p.after_receive(0, [Some(deepest), None]);
            p.aim()
        };
        assert_eq!(aim_at(31), 11);
        assert_eq!(aim_at(15), 5);
        assert_eq!(aim_at(8), 3);
        assert_eq!(aim_at(200), AIM_MAX);
        assert_eq!(Pacer::new().aim(), AIM_MIN, "nothing seen yet");
    }

    /// Short batches lengthen the wait a step at a time up to 40 µs, long
    /// ones shorten it down to 5 µs, one on the aim keeps it.
    #[test]
    fn the_wait_moves_toward_the_aim_within_bounds() {
        let mut p = Pacer::new();
        let deep = [Some(31), Some(20)];
        p.after_receive(3, deep);
        assert_eq!(p.wait(), WAIT_FIRST + WAIT_STEP);
        p.after_receive(11, deep);
        assert_eq!(p.wait(), WAIT_FIRST + WAIT_STEP, "on the aim: kept");
        for _ in 0..100 {
            p.after_receive(1, deep);
        }
        assert_eq!(p.wait(), WAIT_MAX);
        for _ in 0..100 {
            p.after_receive(16, deep);
        }
        assert_eq!(p.wait(), WAIT_MIN);
    }

    /// The depth estimate rises at once and falls at the end of a window,
    /// to the deepest queue seen in that window (so one window after the
    /// queue got shallower); ExpStatSNs that said nothing are left out.
    #[test]
    fn the_depth_estimate_follows_the_initiator_down() {
        let mut p = Pacer::new();
        p.after_receive(11, [Some(31), None]);
        assert_eq!(p.aim(), 11);
        for _ in 1..DEPTH_WINDOW {
            p.after_receive(5, [Some(15), None]);
        }
        assert_eq!(p.aim(), 11, "the window that saw QD 32 ends");
        for _ in 0..DEPTH_WINDOW {
            p.after_receive(5, [Some(15), None]);
        }
        assert_eq!(p.aim(), 5, "a whole window of QD 16");
        p.after_receive(5, [None, None]);
        assert_eq!(p.aim(), 5);
    }
}
