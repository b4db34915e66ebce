//! Per-reactor counters: busy and idle time, I/Os submitted and completed,
//! `io_uring_enter` calls that submitted, tasks run, times blocked. The
//! reactor keeps them in plain fields and publishes them to atomics about
//! once a millisecond, so reading them over RPC costs the data path nothing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Counters as the reactor keeps them on its own thread.
#[derive(Debug, Default, Clone)]
pub(crate) struct LocalStats {
    pub busy: Duration,
    pub idle: Duration,
    pub ios_submitted: u64,
    pub ios_completed: u64,
    pub submit_calls: u64,
    pub tasks_run: u64,
    pub sleeps: u64,
}

impl LocalStats {
    pub(crate) fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            busy_ns: self.busy.as_nanos() as u64,
            idle_ns: self.idle.as_nanos() as u64,
            ios_submitted: self.ios_submitted,
            ios_completed: self.ios_completed,
            submit_calls: self.submit_calls,
            tasks_run: self.tasks_run,
            sleeps: self.sleeps,
        }
    }

    pub(crate) fn publish(&self, to: &ReactorStats) {
        to.busy_ns
            .store(self.busy.as_nanos() as u64, Ordering::Relaxed);
        to.idle_ns
            .store(self.idle.as_nanos() as u64, Ordering::Relaxed);
        to.ios_submitted
            .store(self.ios_submitted, Ordering::Relaxed);
        to.ios_completed
            .store(self.ios_completed, Ordering::Relaxed);
        to.submit_calls.store(self.submit_calls, Ordering::Relaxed);
        to.tasks_run.store(self.tasks_run, Ordering::Relaxed);
        to.sleeps.store(self.sleeps, Ordering::Relaxed);
    }
}

/// The published counters, readable from any thread.
#[derive(Debug, Default)]
pub(crate) struct ReactorStats {
    busy_ns: AtomicU64,
    idle_ns: AtomicU64,
    ios_submitted: AtomicU64,
    ios_completed: AtomicU64,
    submit_calls: AtomicU64,
    tasks_run: AtomicU64,
    sleeps: AtomicU64,
}

impl ReactorStats {
    pub(crate) fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            busy_ns: self.busy_ns.load(Ordering::Relaxed),
            idle_ns: self.idle_ns.load(Ordering::Relaxed),
            ios_submitted: self.ios_submitted.load(Ordering::Relaxed),
            ios_completed: self.ios_completed.load(Ordering::Relaxed),
            submit_calls: self.submit_calls.load(Ordering::Relaxed),
            tasks_run: self.tasks_run.load(Ordering::Relaxed),
            sleeps: self.sleeps.load(Ordering::Relaxed),
        }
    }
}

/// A copy of one reactor's counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Nanoseconds spent in loop turns that found work.
    pub busy_ns: u64,
    /// Nanoseconds spent spinning without work or blocked in the ring.
    pub idle_ns: u64,
    /// Operations submitted to the ring.
    pub ios_submitted: u64,
    /// Operations completed by the ring.
    pub ios_completed: u64,
    /// `io_uring_enter` calls that submitted new requests (not those that
    /// only waited or ran deferred completions), against `ios_submitted`.
    pub submit_calls: u64,
    /// Task polls.
    pub tasks_run: u64,
    /// Times the reactor blocked in the ring.
    pub sleeps: u64,
}
