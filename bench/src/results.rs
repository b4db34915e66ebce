//! What a run measured, and how the per-core pieces become one report.
//!
//! Each reactor records latencies into its own `hdrhistogram` (nanoseconds,
//! 3 significant digits, fixed bounds so that recording never allocates) and
//! counts its I/Os in plain integers, so the hot loop shares nothing across
//! cores. At the end the histograms are merged here and turned into a
//! [`Report`], a plain serialisable struct that the text table and the JSON
//! output both print from, so the two can never disagree.

use crate::config::{BackendKind, LoadConfig};
use crate::error::BenchError;
use crate::targetcpu::{TargetCpu, TargetReactor};
use hdrhistogram::Histogram;
use mirrorpoint_poller::StatsSnapshot;
use serde::Serialize;
use std::time::Duration;

/// Highest latency the histograms hold (longer ones are clamped to it).
pub const MAX_LATENCY_NS: u64 = 60_000_000_000;

/// A latency histogram with the bounds every core uses.
pub fn new_histogram() -> Result<Histogram<u64>, BenchError> {
    Histogram::new_with_bounds(1, MAX_LATENCY_NS, 3)
        .map_err(|e| BenchError::Histogram(e.to_string()))
}

/// What one reactor measured.
#[derive(Debug)]
pub struct CoreResult {
    /// Reactor index.
    pub core: usize,
    /// Latency of every measured I/O, in nanoseconds.
    pub latency: Histogram<u64>,
    /// Measured reads.
    pub reads: u64,
    /// Measured writes.
    pub writes: u64,
    /// Every measured I/O (completion, latency), when a timeline was asked for.
    pub samples: Vec<crate::timeline::Sample>,
}

/// CPU time of the process (all threads), from `getrusage(RUSAGE_SELF)`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuTimes {
    /// User time.
    pub user: Duration,
    /// System time.
    pub system: Duration,
}

impl CpuTimes {
    /// The process's CPU time so far.
    pub fn now() -> CpuTimes {
        // SAFETY: an all-zero rusage is a valid value of the plain C struct.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: getrusage writes one rusage into the struct we pass.
        let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
        if rc != 0 {
            return CpuTimes::default();
        }
        let tv = |t: libc::timeval| {
            Duration::from_secs(t.tv_sec.max(0) as u64)
                + Duration::from_micros(t.tv_usec.max(0) as u64)
        };
        CpuTimes {
            user: tv(ru.ru_utime),
            system: tv(ru.ru_stime),
        }
    }

    /// Time spent between `earlier` and `self`.
    pub fn since(self, earlier: CpuTimes) -> CpuTimes {
        CpuTimes {
            user: self.user.saturating_sub(earlier.user),
            system: self.system.saturating_sub(earlier.system),
        }
    }
}

/// Latency summary in microseconds.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LatencyUs {
    /// Number of latencies recorded (equals `ops`).
    pub samples: u64,
    /// Smallest.
    pub min: f64,
    /// Mean.
    pub avg: f64,
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p99_9: f64,
    /// Largest.
    pub max: f64,
}

/// CPU use over the measured window.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CpuUsage {
    /// User seconds, all threads.
    pub user_s: f64,
    /// System seconds, all threads.
    pub sys_s: f64,
    /// (user + sys) per I/O, in microseconds.
    pub us_per_io: f64,
}

/// One reactor over the measured window.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ReactorUsage {
    /// Reactor index.
    pub reactor: usize,
    /// The CPU it ran on.
    pub cpu: usize,
    /// Share of loop time spent in turns that found work, in percent.
    pub busy_pct: f64,
    /// Operations it submitted to its ring.
    pub ios_submitted: u64,
    /// Operations its ring completed.
    pub ios_completed: u64,
    /// `io_uring_enter` calls that submitted (fio's equivalent: its
    /// submit calls, one per I/O with the default `iodepth_batch`).
    pub submit_calls: u64,
    /// Times it blocked in the ring.
    pub sleeps: u64,
    /// Measured I/Os its tasks did.
    pub ops: u64,
}

/// Per-reactor counters at the start and end of the measured window.
#[derive(Debug, Clone, Copy)]
pub struct ReactorWindow {
    /// Reactor index.
    pub reactor: usize,
    /// Its CPU.
    pub cpu: usize,
    /// Counters when measuring started.
    pub start: StatsSnapshot,
    /// Counters when measuring ended.
    pub end: StatsSnapshot,
}

/// The result of one run: everything the table and the JSON show.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Report {
    /// "local" or "nvmf".
    pub mode: &'static str,
    /// Volume backend (`local`).
    pub backend: Option<BackendKind>,
    /// The backing file (uring).
    pub file: Option<String>,
    /// Whether the uring backend uses O_DIRECT.
    pub o_direct: Option<bool>,
    /// Volume size in bytes.
    pub volume_bytes: u64,
    /// Volume block size.
    pub block_size: u32,
    /// fio's name of the workload.
    pub workload: &'static str,
    /// Percentage of reads.
    pub rwmixread: u8,
    /// Bytes per I/O.
    pub bs: u64,
    /// I/Os in flight per core.
    pub qd: usize,
    /// CPUs used.
    pub cores: Vec<usize>,
    /// Reactors spun instead of sleeping.
    pub busy_poll: bool,
    /// Microseconds a reactor spun without work before blocking.
    pub idle_timeout_us: u64,
    /// When the bench's reactors handed disk requests to the kernel
    /// (`local` only: over NVMe/TCP the disk is the target's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk_submit: Option<String>,
    /// Warm-up seconds (not measured).
    pub ramp_s: f64,
    /// Measured seconds.
    pub time_s: f64,
    /// Measured I/Os.
    pub ops: u64,
    /// Measured reads.
    pub reads: u64,
    /// Measured writes.
    pub writes: u64,
    /// I/Os per second.
    pub iops: f64,
    /// Throughput in MiB/s.
    pub mib_s: f64,
    /// Latency per I/O.
    pub lat_us: LatencyUs,
    /// CPU time over the measured window.
    pub cpu: CpuUsage,
    /// Each reactor over the measured window.
    pub reactors: Vec<ReactorUsage>,
    /// The NVMe/TCP session (`nvmf`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nvmf: Option<NvmfSession>,
    /// The target's CPU time over the measured window (`nvmf --target-pid`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_cpu: Option<TargetCpuReport>,
    /// The target's reactors' own busy time over the measured window
    /// (`nvmf --target-rpc`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_reactors: Option<TargetReactorsReport>,
    /// Latency over time and the events run during the window.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeline: Option<crate::timeline::TimelineReport>,
}

/// What an `nvmf` run connected to.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct NvmfSession {
    /// Target address.
    pub addr: String,
    /// Subsystem NQN.
    pub nqn: String,
    /// Namespace driven.
    pub nsid: u32,
    /// Controller ID.
    pub cntlid: u16,
    /// I/O queues (TCP connections) used.
    pub connections: usize,
    /// I/Os in flight per connection.
    pub qd_per_connection: usize,
    /// Header digests negotiated.
    pub header_digest: bool,
    /// Data digests negotiated.
    pub data_digest: bool,
    /// I/O queues connected with SQ flow control (off: reads may end with a
    /// SUCCESS-flagged C2HData).
    pub sq_flow_control: bool,
}

/// One target thread's CPU time over the window.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TargetThreadCpu {
    /// Thread ID.
    pub tid: u32,
    /// Its name (`comm`).
    pub name: String,
    /// User seconds.
    pub user_s: f64,
    /// System seconds.
    pub sys_s: f64,
    /// (user + sys) per measured I/O, in microseconds.
    pub us_per_io: f64,
    /// Seconds on a CPU by the scheduler's clock (`schedstat`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_cpu_s: Option<f64>,
    /// Seconds runnable but not running (preempted), from `schedstat`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runqueue_wait_s: Option<f64>,
}

/// The target's CPU time over the measured window, from `/proc/PID/stat`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TargetCpuReport {
    /// Target process.
    pub pid: u32,
    /// Clock ticks per second of the counters (their resolution).
    pub clock_ticks_per_s: u64,
    /// User seconds, all threads.
    pub user_s: f64,
    /// System seconds, all threads.
    pub sys_s: f64,
    /// (user + sys) per measured I/O, in microseconds.
    pub us_per_io: f64,
    /// Measured I/Os per second of target CPU time (IOPS per busy core).
    pub iops_per_core_s: f64,
    /// Share of one core the target used, in percent.
    pub core_pct: f64,
    /// Threads that used CPU in the window, busiest first.
    pub threads: Vec<TargetThreadCpu>,
}

impl TargetCpuReport {
    /// The report of `cpu` for `ops` I/Os over `secs` seconds.
    pub fn new(cpu: &TargetCpu, ops: u64, secs: f64) -> TargetCpuReport {
        let per_io = |s: f64| if ops > 0 { s * 1e6 / ops as f64 } else { 0.0 };
        let total = cpu.user_s + cpu.sys_s;
        let mut threads: Vec<_> = cpu
            .threads
            .iter()
            .filter(|t| t.user_s + t.sys_s > 0.0)
            .map(|t| TargetThreadCpu {
                tid: t.tid,
                name: t.name.clone(),
                user_s: t.user_s,
                sys_s: t.sys_s,
                us_per_io: per_io(t.user_s + t.sys_s),
                on_cpu_s: t.on_cpu_s,
                runqueue_wait_s: t.runqueue_wait_s,
            })
            .collect();
        threads.sort_by(|a, b| (b.user_s + b.sys_s).total_cmp(&(a.user_s + a.sys_s)));
        TargetCpuReport {
            pid: cpu.pid,
            clock_ticks_per_s: cpu.ticks_per_s,
            user_s: cpu.user_s,
            sys_s: cpu.sys_s,
            us_per_io: per_io(total),
            iops_per_core_s: if total > 0.0 { ops as f64 / total } else { 0.0 },
            core_pct: 100.0 * total / secs.max(f64::MIN_POSITIVE),
            threads,
        }
    }
}

/// One target reactor over the window, by its own accounting.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TargetReactorUsage {
    /// Reactor index.
    pub index: u64,
    /// CPU it is pinned to.
    pub lcore: u64,
    /// Seconds in loop turns that found work (`busy_ns`).
    pub busy_s: f64,
    /// Seconds spinning idle or blocked (`idle_ns`).
    pub idle_s: f64,
    /// Busy microseconds per measured I/O.
    pub busy_us_per_io: f64,
    /// Ring operations it submitted.
    pub ring_ops: u64,
}

/// The target's reactors over the measured window, from its own
/// `framework_get_reactors` counters (SPDK-style busy time: loop turns that
/// found work; the idle spin is not counted).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TargetReactorsReport {
    /// Busy seconds, all reactors.
    pub busy_s: f64,
    /// Busy microseconds per measured I/O, all reactors.
    pub busy_us_per_io: f64,
    /// Measured I/Os per busy second (IOPS per busy core).
    pub iops_per_busy_core_s: f64,
    /// Busy share of one core, in percent.
    pub busy_core_pct: f64,
    /// Ring operations submitted per measured I/O, all reactors.
    pub ring_ops_per_io: f64,
    /// Each reactor.
    pub reactors: Vec<TargetReactorUsage>,
}

impl TargetReactorsReport {
    /// The report of `reactors` for `ops` I/Os over `secs` seconds.
    pub fn new(reactors: &[TargetReactor], ops: u64, secs: f64) -> TargetReactorsReport {
        let per_io = |x: f64| if ops > 0 { x / ops as f64 } else { 0.0 };
        let busy: f64 = reactors.iter().map(|r| r.busy_s).sum();
        let ring_ops: u64 = reactors.iter().map(|r| r.ring_ops).sum();
        TargetReactorsReport {
            busy_s: busy,
            busy_us_per_io: per_io(busy * 1e6),
            iops_per_busy_core_s: if busy > 0.0 { ops as f64 / busy } else { 0.0 },
            busy_core_pct: 100.0 * busy / secs.max(f64::MIN_POSITIVE),
            ring_ops_per_io: per_io(ring_ops as f64),
            reactors: reactors
                .iter()
                .map(|r| TargetReactorUsage {
                    index: r.index,
                    lcore: r.lcore,
                    busy_s: r.busy_s,
                    idle_s: r.idle_s,
                    busy_us_per_io: per_io(r.busy_s * 1e6),
                    ring_ops: r.ring_ops,
                })
                .collect(),
        }
    }
}

/// Run facts the driver knows besides the measurements.
#[derive(Debug, Clone)]
pub struct RunFacts {
    /// Volume size in bytes.
    pub volume_bytes: u64,
    /// Volume block size.
    pub block_size: u32,
    /// O_DIRECT in use (uring only).
    pub o_direct: Option<bool>,
    /// The reactors' idle timeout.
    pub idle_timeout: Duration,
    /// The reactors' disk submission policy, when they did disk I/O.
    pub disk_submit: Option<mirrorpoint_poller::DiskSubmit>,
    /// The measured window as it really was.
    pub measured: Duration,
    /// CPU time over it.
    pub cpu: CpuTimes,
    /// Reactor counters around it.
    pub windows: Vec<ReactorWindow>,
    /// The timeline's events, as they ran.
    pub events: Vec<crate::timeline::EventRun>,
}

fn us(ns: f64) -> f64 {
    ns / 1000.0
}

/// Merges per-core results into the report.
pub fn build_report(
    config: &LoadConfig,
    facts: &RunFacts,
    cores: &[CoreResult],
) -> Result<Report, BenchError> {
    let mut all = new_histogram()?;
    for c in cores {
        all.add(&c.latency)
            .map_err(|e| BenchError::Histogram(e.to_string()))?;
    }
    let reads: u64 = cores.iter().map(|c| c.reads).sum();
    let writes: u64 = cores.iter().map(|c| c.writes).sum();
    let ops = reads + writes;
    let secs = facts.measured.as_secs_f64().max(f64::MIN_POSITIVE);
    let cpu_total = (facts.cpu.user + facts.cpu.system).as_secs_f64();
    let lat = if all.is_empty() {
        LatencyUs {
            samples: 0,
            min: 0.0,
            avg: 0.0,
            p50: 0.0,
            p99: 0.0,
            p99_9: 0.0,
            max: 0.0,
        }
    } else {
        LatencyUs {
            samples: all.len(),
            min: us(all.min() as f64),
            avg: us(all.mean()),
            p50: us(all.value_at_quantile(0.50) as f64),
            p99: us(all.value_at_quantile(0.99) as f64),
            p99_9: us(all.value_at_quantile(0.999) as f64),
            max: us(all.max() as f64),
        }
    };
    let reactors = facts
        .windows
        .iter()
        .map(|w| {
            let busy = w.end.busy_ns.saturating_sub(w.start.busy_ns) as f64;
            let idle = w.end.idle_ns.saturating_sub(w.start.idle_ns) as f64;
            let ops = cores
                .iter()
                .find(|c| c.core == w.reactor)
                .map(|c| c.reads + c.writes)
                .unwrap_or(0);
            ReactorUsage {
                reactor: w.reactor,
                cpu: w.cpu,
                busy_pct: if busy + idle > 0.0 {
                    100.0 * busy / (busy + idle)
                } else {
                    0.0
                },
                ios_submitted: w.end.ios_submitted.saturating_sub(w.start.ios_submitted),
                ios_completed: w.end.ios_completed.saturating_sub(w.start.ios_completed),
                submit_calls: w.end.submit_calls.saturating_sub(w.start.submit_calls),
                sleeps: w.end.sleeps.saturating_sub(w.start.sleeps),
                ops,
            }
        })
        .collect();
    Ok(Report {
        mode: "local",
        backend: None,
        file: None,
        o_direct: facts.o_direct,
        volume_bytes: facts.volume_bytes,
        block_size: facts.block_size,
        workload: config.workload.name(),
        rwmixread: config.read_percent,
        bs: config.bs,
        qd: config.qd,
        cores: config.cores.clone(),
        busy_poll: config.busy_poll,
        idle_timeout_us: facts.idle_timeout.as_micros() as u64,
        disk_submit: facts.disk_submit.map(|d| d.to_string()),
        ramp_s: config.ramp.as_secs_f64(),
        time_s: secs,
        ops,
        reads,
        writes,
        iops: ops as f64 / secs,
        mib_s: (ops * config.bs) as f64 / secs / (1024.0 * 1024.0),
        lat_us: lat,
        cpu: CpuUsage {
            user_s: facts.cpu.user.as_secs_f64(),
            sys_s: facts.cpu.system.as_secs_f64(),
            us_per_io: if ops > 0 {
                cpu_total * 1e6 / ops as f64
            } else {
                0.0
            },
        },
        reactors,
        nvmf: None,
        target_cpu: None,
        target_reactors: None,
        timeline: config.timeline.as_ref().map(|t| {
            let samples: Vec<&[crate::timeline::Sample]> =
                cores.iter().map(|c| c.samples.as_slice()).collect();
            crate::timeline::build(t, facts.measured, &samples, &facts.events)
        }),
    })
}
